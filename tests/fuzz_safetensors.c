/* fuzz_safetensors.c - libFuzzer target: any bytes as a safetensors file, and as a JSON document.
 * Whatever opens must only hand out tensors that lie inside the input, be found again by name,
 * and read back as f32 without trouble; ASan and UBSan watch every access. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../io.h"

/* Touches every value of a JSON tree, so a bad pointer anywhere in it shows. */
static size_t json_walk(const JsonValue *v) {
    size_t n = 1;
    if (v->type == JSON_STRING) n += strlen(v->string) == v->length;
    for (size_t i = 0; v->type == JSON_ARRAY && i < v->count; i++) n += json_walk(&v->items[i]);
    for (size_t i = 0; v->type == JSON_OBJECT && i < v->count; i++) {
        n += strlen(v->members[i].key);
        n += json_walk(&v->members[i].value);
    }
    return n;
}

static void fuzz_json(const uint8_t *data, size_t size) {
    JsonDoc *doc = NULL;
    Error e;
    if (json_parse(&doc, (const char *)data, size, "fuzz.json", &e) != 0) return;
    const JsonValue *root = json_root(doc);
    int64_t i;
    double x;
    bool b;
    const char *s;
    int64_t ints[8];
    size_t count;
    json_walk(root);
    json_get_int(root, "a", &i, &e);
    json_get_float(root, "a", &x, &e);
    json_get_bool(root, "a", &b, &e);
    json_get_string(root, "a", &s, &e);
    json_get_int_array(root, "a", ints, 8, &count, &e);
    json_free(doc);
}

static void fuzz_safetensors(const uint8_t *data, size_t size) {
    SafeTensors *st = NULL;
    Error e;
    if (st_open_memory(&st, data, size, "fuzz.safetensors", &e) != 0) return;
    for (size_t i = 0; i < st_count(st); i++) {
        const StTensor *t = st_at(st, i);
        const uint8_t *p = t->data;
        if (p < data || p > data + size || t->nbytes > (size_t)(data + size - p)) __builtin_trap();
        if (t->nbytes != (size_t)t->numel * dtype_size(t->dtype) || st_find(st, t->name) != t) __builtin_trap();
        if (t->dtype != DTYPE_F32 && t->dtype != DTYPE_F16 && t->dtype != DTYPE_BF16) continue;
        float *values = malloc(t->numel > 0 ? (size_t)t->numel * sizeof *values : 1);
        if (values && st_read_f32(st, t->name, values, t->numel, &e) != 0) __builtin_trap();
        free(values);
    }
    st_metadata(st, "format");
    st_close(st);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fuzz_json(data, size);
    fuzz_safetensors(data, size);
    return 0;
}
