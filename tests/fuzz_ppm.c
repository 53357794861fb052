/* fuzz_ppm.c - libFuzzer target: any bytes as a PPM image. A parse that succeeds must give an
 * image within the size limits that survives being written out as a plain PPM and parsed again. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../io.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    Image img, again;
    Error e;
    if (ppm_parse(&img, data, size, "fuzz.ppm", &e) != 0) {
        if (img.rgb) __builtin_trap();
        return 0;
    }
    if (img.width < 1 || img.width > IMAGE_MAX_SIDE || img.height < 1 || img.height > IMAGE_MAX_SIDE) __builtin_trap();
    size_t pixels = (size_t)img.width * (size_t)img.height * 3;
    char header[48];
    size_t h = (size_t)snprintf(header, sizeof header, "P6\n%d %d\n255\n", img.width, img.height);
    uint8_t *plain = malloc(h + pixels);
    if (plain) {
        memcpy(plain, header, h);
        memcpy(plain + h, img.rgb, pixels);
        if (ppm_parse(&again, plain, h + pixels, "again.ppm", &e) != 0 || again.width != img.width ||
            again.height != img.height || memcmp(again.rgb, img.rgb, pixels) != 0)
            __builtin_trap();
        image_free(&again);
        free(plain);
    }
    image_free(&img);
    return 0;
}
