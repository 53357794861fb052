/* fuzz_json.c - libFuzzer target for the JSON parser as the config, index, preprocessor and eval
 * item readers use it: a parse that fails must leave nothing behind; one that succeeds must give
 * a tree whose every value can be walked and read back (counts within the document, strings
 * NUL-terminated at their length), and the typed lookups must answer or refuse, never crash. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../io.h"

/* Every value under v, each string's length checked; the number of values. */
static size_t walk(const JsonValue *v, int depth) {
    if (depth > 10000) __builtin_trap(); /* the parser bounds nesting */
    size_t n = 1;
    if (v->type == JSON_STRING && strlen(v->string) > v->length) __builtin_trap();
    if (v->type == JSON_ARRAY)
        for (size_t i = 0; i < v->count; i++) n += walk(&v->items[i], depth + 1);
    if (v->type == JSON_OBJECT)
        for (size_t i = 0; i < v->count; i++) n += walk(&v->members[i].value, depth + 1);
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    JsonDoc *doc = NULL;
    Error e;
    if (json_parse(&doc, (const char *)data, size, "fuzz.json", &e) != 0) {
        if (doc) __builtin_trap();
        return 0;
    }
    const JsonValue *root = json_root(doc);
    walk(root, 0);
    static const char *const keys[] = {"num_layers", "hidden_size", "patch_size", "size",
                                       "weight_map", "image_mean", "rows", "settings"};
    for (size_t k = 0; k < COUNT(keys); k++) {
        int small;
        int64_t whole, values[8];
        double number;
        bool flag;
        const char *text;
        size_t count;
        json_get_int_in(root, keys[k], 1, 4096, &small, &e);
        json_get_int(root, keys[k], &whole, &e);
        json_get_float(root, keys[k], &number, &e);
        json_get_bool(root, keys[k], &flag, &e);
        json_get_string(root, keys[k], &text, &e);
        json_get_int_array(root, keys[k], values, 8, &count, &e);
    }
    /* the unimplemented-key checks, over keys that fuzzed documents hold */
    static const KeyDefault defaults[] = {{"size", "null|true"}, {"rows", "\"x\"|2|0.5"},
                                          {"resample", "2"}, {"a", "false"}};
    json_require_defaults(root, defaults, COUNT(defaults), &e);
    json_free(doc);
    return 0;
}
