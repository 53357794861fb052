/* io.c - bytes <-> arrays: safetensors, JSON, PPM/PNG. Safe against hostile files. */
#include "io.h"

#include <stdarg.h>
#include <stdio.h>

int error_set(Error *e, const char *fmt, ...) {
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    return -1;
}
