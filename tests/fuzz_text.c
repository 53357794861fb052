/* fuzz_text.c - libFuzzer target for the small text readers of outside input. The first byte
 * picks one, the rest is its input:
 *   0: an eval CSV (with and without the seed column): rows must hold a non-empty input, and
 *      embeddings rows a resolved path;
 *   1: a PNG's 'parameters' text (png_find_text): an error or a NUL-terminated string;
 *   2: a TYPE:key=value spec (spec_type, spec_parse_keys): values stay within their ranges. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../io.h"

static void fuzz_csv(const char *text, size_t size) {
    for (int need_seed = 0; need_seed < 2; need_seed++) {
        EvalCsv c = {0};
        Error e;
        if (eval_csv_parse(text, size, "fuzz.csv", need_seed, &c, &e) == 0) {
            if (c.n == 0) __builtin_trap();
            for (size_t i = 0; i < c.n; i++)
                if (!c.rows[i].input[0] || (!c.prompts && !c.rows[i].path)) __builtin_trap();
        } else if (c.rows || c.n) {
            __builtin_trap();
        }
        eval_csv_free(&c);
    }
}

static void fuzz_png_text(const unsigned char *bytes, size_t size) {
    char *text = NULL;
    Error e;
    int rc = png_find_text(bytes, size, "fuzz.png", "parameters", &text, &e);
    if (rc != 0 && text) __builtin_trap();
    if (text && strlen(text) > size) __builtin_trap(); /* a copy of bytes of the input */
    free(text);
}

static void fuzz_spec(const char *bytes, size_t size) {
    char *spec = malloc(size + 1);
    if (!spec) return;
    memcpy(spec, bytes, size);
    spec[size] = '\0';
    static const char *const names[] = {"constant", "linear", "power"};
    double a = 0, b = 0;
    const SpecKey keys[] = {{"a", &a, -10, 10, false}, {"b", &b, 0, 100, true}};
    Error e;
    if (spec_type(spec, names, 3) >= -1 &&
        spec_parse_keys("fuzz", spec_keys_after_colon(spec), keys, 2, &e) == 0)
        if (!(a >= -10 && a <= 10) || !(b >= 0 && b <= 100) || b != floor(b)) __builtin_trap();
    free(spec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    if (data[0] % 3 == 0) fuzz_csv((const char *)data + 1, size - 1);
    if (data[0] % 3 == 1) fuzz_png_text(data + 1, size - 1);
    if (data[0] % 3 == 2) fuzz_spec((const char *)data + 1, size - 1);
    return 0;
}
