/* test_io.c - the io layer: f16/bf16 conversions, JSON, safetensors (a golden file written by
 * Python, round trips, malformed files), sharded models, atomic writes, PPM and PNG.
 * Files the tests write go to a fresh mkdtemp directory that is removed at the end. */
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"

/* ---- helpers ---------------------------------------------------------------------------------- */

static bool same_bits(float a, float b) {
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y;
}

/* Elements whose bits differ, treating any two NaNs as equal. */
static size_t float_mismatches(const float *got, const float *want, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        if (!(isnan(got[i]) && isnan(want[i])) && !same_bits(got[i], want[i])) bad++;
    return bad;
}

static uint16_t le16(const unsigned char *p) {
    return (uint16_t)(p[0] | p[1] << 8);
}

/* A tensor's raw 16-bit patterns. */
static uint16_t *load_bits16(const StTensor *t) {
    uint16_t *bits = malloc((size_t)t->numel * sizeof *bits + 1);
    for (int64_t i = 0; i < t->numel; i++) bits[i] = le16((const unsigned char *)t->data + 2 * i);
    return bits;
}

static bool contains(const char *s, const char *needle) {
    return strstr(s, needle) != NULL;
}

static int write_bytes(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) return -1;
    size_t written = n ? fwrite(data, 1, n, f) : 0;
    return fclose(f) == 0 && written == n ? 0 : -1;
}

/* The whole file, malloc'd, or NULL. */
static unsigned char *read_bytes(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *data = malloc(n > 0 ? (size_t)n : 1);
    *size = fread(data, 1, (size_t)n, f);
    fclose(f);
    return data;
}

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *path = malloc(n);
    snprintf(path, n, "%s/%s", dir, name);
    return path;
}

static bool exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

static void remove_tree(const char *path) {
    struct stat sb;
    if (lstat(path, &sb) != 0) return;
    if (S_ISDIR(sb.st_mode)) {
        char **names;
        size_t count;
        Error e;
        if (dir_list(path, &names, &count, &e) == 0) {
            for (size_t i = 0; i < count; i++) {
                char *child = join(path, names[i]);
                remove_tree(child);
                free(child);
            }
            dir_list_free(names, count);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* Number of entries in dir, to see that no temporary file was left behind. */
static size_t dir_entries(const char *dir) {
    char **names;
    size_t count;
    Error e;
    if (dir_list(dir, &names, &count, &e)) return SIZE_MAX;
    dir_list_free(names, count);
    return count;
}

/* A safetensors image: 8-byte little-endian header length, header, data. */
static unsigned char *st_image(const char *header, const void *data, size_t data_len, size_t *size) {
    size_t h = strlen(header);
    *size = 8 + h + data_len;
    unsigned char *b = malloc(*size);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)((uint64_t)h >> (8 * i));
    memcpy(b + 8, header, h);
    if (data_len) memcpy(b + 8 + h, data, data_len);
    return b;
}

/* ---- conversions ------------------------------------------------------------------------------ */

static void test_conversion_edges(void) {
    CHECK(f16_to_f32(0x0001) == 0x1p-24f, "f16 smallest subnormal");
    CHECK(f16_to_f32(0x03ff) == 1023 * 0x1p-24f, "f16 largest subnormal");
    CHECK(f16_to_f32(0x0400) == 0x1p-14f, "f16 smallest normal");
    CHECK(f16_to_f32(0x7bff) == 65504.0f, "f16 largest finite");
    CHECK(f16_to_f32(0x3c00) == 1.0f && f16_to_f32(0xc000) == -2.0f, "f16 1 and -2");
    CHECK(isinf(f16_to_f32(0x7c00)) && f16_to_f32(0xfc00) < 0 && isinf(f16_to_f32(0xfc00)), "f16 +-inf");
    CHECK(isnan(f16_to_f32(0x7e00)) && isnan(f16_to_f32(0x7c01)) && isnan(f16_to_f32(0xfe00)), "f16 NaNs");
    CHECK(f16_to_f32(0x8000) == 0.0f && signbit(f16_to_f32(0x8000)), "f16 -0");

    CHECK(f32_to_f16(65504.0f) == 0x7bff && f32_to_f16(65519.0f) == 0x7bff, "f16 below overflow stays finite");
    CHECK(f32_to_f16(65520.0f) == 0x7c00 && f32_to_f16(-1e9f) == 0xfc00, "f16 overflow rounds to inf");
    CHECK(f32_to_f16(INFINITY) == 0x7c00 && f32_to_f16(-INFINITY) == 0xfc00, "f16 inf");
    CHECK(f32_to_f16(-0.0f) == 0x8000 && f32_to_f16(0.0f) == 0, "f16 signed zeros");
    CHECK(f32_to_f16(1e-8f) == 0 && f32_to_f16(0x1p-25f) == 0, "f16 underflow (2^-25 ties to even 0)");
    CHECK(f32_to_f16(0x1.000002p-25f) == 1, "f16 just above 2^-25 rounds up to the smallest subnormal");
    CHECK(f32_to_f16(3 * 0x1p-25f) == 2, "f16 subnormal tie to even (1.5 -> 2)");
    CHECK(f32_to_f16(1023.5f * 0x1p-24f) == 0x400, "f16 subnormal rounds up into the normals");
    CHECK(f32_to_f16(1.0f + 0x1p-11f) == 0x3c00, "f16 tie to even (down)");
    CHECK(f32_to_f16(1.0f + 3 * 0x1p-11f) == 0x3c02, "f16 tie to even (up)");
    CHECK(f32_to_f16(2049.0f) == f32_to_f16(2048.0f), "f16 2049 ties to 2048");
    uint16_t qnan = f32_to_f16(NAN), snan;
    float signalling;
    uint32_t sbits = 0x7f800001u;
    memcpy(&signalling, &sbits, 4);
    snan = f32_to_f16(signalling);
    CHECK((qnan & 0x7c00) == 0x7c00 && (qnan & 0x3ff) && (snan & 0x7c00) == 0x7c00 && (snan & 0x3ff),
          "f16 NaN stays NaN, even with only low payload bits");

    CHECK(bf16_to_f32(0x3f80) == 1.0f && bf16_to_f32(0xc049) == -3.140625f, "bf16 to f32");
    CHECK(bf16_to_f32(0x0001) == 0x1p-133f, "bf16 subnormal");
    CHECK(f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80 && f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82, "bf16 ties to even");
    CHECK(f32_to_bf16(3.4028235e38f) == 0x7f80, "bf16 max float rounds to inf");
    uint16_t bnan = f32_to_bf16(signalling);
    CHECK((bnan & 0x7f80) == 0x7f80 && (bnan & 0x7f), "bf16 NaN with low payload stays NaN");
    CHECK(f32_to_bf16(-0.0f) == 0x8000, "bf16 -0");

    /* Every non-NaN pattern survives the trip through f32 and back. */
    size_t f16_bad = 0, bf16_bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7c00) != 0x7c00 || (h & 0x3ff) == 0) f16_bad += f32_to_f16(f16_to_f32((uint16_t)h)) != h;
        if ((h & 0x7f80) != 0x7f80 || (h & 0x7f) == 0) bf16_bad += f32_to_bf16(bf16_to_f32((uint16_t)h)) != h;
    }
    CHECK(f16_bad == 0, "f16 -> f32 -> f16 is the identity (%zu differ)", f16_bad);
    CHECK(bf16_bad == 0, "bf16 -> f32 -> bf16 is the identity (%zu differ)", bf16_bad);

    uint16_t patterns[37];
    float a[37], b[37];
    for (int i = 0; i < 37; i++) patterns[i] = (uint16_t)(i * 1777 + 3);
    f16_to_f32_array(patterns, a, 37);
    for (int i = 0; i < 37; i++) b[i] = f16_to_f32(patterns[i]);
    CHECK(float_mismatches(a, b, 37) == 0, "f16_to_f32_array matches the scalar conversion");
    bf16_to_f32_array(patterns, a, 37);
    for (int i = 0; i < 37; i++) b[i] = bf16_to_f32(patterns[i]);
    CHECK(float_mismatches(a, b, 37) == 0, "bf16_to_f32_array matches the scalar conversion");
}

/* ---- JSON ------------------------------------------------------------------------------------- */

static JsonDoc *parse(const char *text, Error *e) {
    JsonDoc *doc = NULL;
    json_parse(&doc, text, strlen(text), "test.json", e);
    return doc;
}

/* A message longer than Error holds keeps its start and its end (the reason), cut in the middle
 * between whole characters. */
static void test_long_error(void) {
    char path[5000];
    memset(path, 'a', sizeof path - 1);
    for (size_t i = 100; i + 2 < sizeof path; i += 7) memcpy(path + i, "\xc3\xa9", 2);
    path[sizeof path - 1] = '\0';
    Error e = {{0}};
    error_set(&e, "%s: the reason comes last", path);
    size_t n = strlen(e.msg);
    const char *end = "the reason comes last";
    CHECK(n < sizeof e.msg && n > sizeof e.msg - 8 && !strncmp(e.msg, "aaaa", 4) &&
              !strcmp(e.msg + n - strlen(end), end) && strstr(e.msg, " ... "),
          "a %zu-byte message keeps its start, ' ... ' and its reason in %zu bytes",
          strlen(path) + 23, n);
    CHECK(utf8_count(e.msg) > 0 && !strstr(e.msg, "\xc3 ") && !strstr(e.msg, " \xa9"),
          "no character is cut in two");
    error_set(&e, "short: %d", 7);
    CHECK(!strcmp(e.msg, "short: 7"), "a short message is kept whole");
}

static void test_json_valid(void) {
    Error e = {{0}};
    const char *text = " {\"a\": 1, \"b\": [1, 2.5, -3e2, true, false, null, []],\n"
                       "  \"c\": {\"d\": \"x\\n\\u00e9\\ud83d\\ude00\\\"\\\\\\/\\t\", \"e\": {}},"
                       "  \"max\": 9223372036854775807, \"min\": -9223372036854775808,"
                       "  \"big\": 9223372036854775808, \"negzero\": -0, \"frac\": 0.1, \"raw\": \"\xc3\xa9\xf0\x9f\x98\x80\"} \n";
    JsonDoc *doc = parse(text, &e);
    CHECK(doc != NULL, "valid JSON parses (%s)", doc ? "" : e.msg);
    if (!doc) return;
    const JsonValue *root = json_root(doc);
    CHECK(root->type == JSON_OBJECT && root->count == 9, "root object with 9 members");
    CHECK(!strcmp(root->members[0].key, "a") && !strcmp(root->members[8].key, "raw"), "members keep file order");
    const JsonValue *b = json_get(root, "b");
    CHECK(b && b->type == JSON_ARRAY && b->count == 7, "array of 7");
    if (b && b->count == 7) {
        CHECK(b->items[0].is_integer && b->items[0].integer == 1, "integer item");
        CHECK(!b->items[1].is_integer && b->items[1].number == 2.5, "fraction item");
        CHECK(!b->items[2].is_integer && b->items[2].number == -300.0, "exponent item");
        CHECK(b->items[3].type == JSON_BOOL && b->items[3].boolean && !b->items[4].boolean, "booleans");
        CHECK(b->items[5].type == JSON_NULL && b->items[6].type == JSON_ARRAY && b->items[6].count == 0,
              "null and empty array");
    }
    const JsonValue *d = json_get(json_get(root, "c"), "d");
    const char *want = "x\n\xc3\xa9\xf0\x9f\x98\x80\"\\/\t";
    CHECK(d && d->type == JSON_STRING && !strcmp(d->string, want) && d->length == strlen(want),
          "escapes, \\u00e9 and a surrogate pair decode to UTF-8");
    const JsonValue *raw = json_get(root, "raw");
    CHECK(raw && !strcmp(raw->string, "\xc3\xa9\xf0\x9f\x98\x80"), "raw UTF-8 kept");
    int64_t i = 0;
    CHECK(json_get_int(root, "max", &i, &e) == 0 && i == INT64_MAX, "INT64_MAX");
    CHECK(json_get_int(root, "min", &i, &e) == 0 && i == INT64_MIN, "INT64_MIN");
    CHECK(json_get_int(root, "negzero", &i, &e) == 0 && i == 0, "-0 is the integer 0");
    int in = 7;
    CHECK(json_get_int_in(root, "negzero", 0, 4, &in, &e) == 0 && in == 0, "0 in 0..4");
    CHECK(json_get_int_in(root, "negzero", 1, 4, &in, &e) != 0 && in == 0 &&
              strstr(e.msg, "key 'negzero' is 0, expected 1..4"),
          "below the range: the key, value and range named (%s)", e.msg);
    CHECK(json_get_int_in(root, "max", 0, INT64_MAX, &in, &e) != 0 && in == 0,
          "INT64_MAX does not fit an int, whatever the range");
    const JsonValue *big = json_get(root, "big");
    CHECK(big && !big->is_integer && big->number == 9223372036854775808.0, "2^63 is a number, not an int64");
    double x = 0;
    CHECK(json_get_float(root, "frac", &x, &e) == 0 && x == 0.1, "0.1");
    CHECK(json_get(root, "nope") == NULL && json_get(b, "a") == NULL, "json_get on absent key / non-object");
    static const KeyDefault at_default[] = {
        {"nope", "1"}, {"a", "2|1"}, {"frac", "0.1000000000001"}, {"b", "null|[]"}};
    CHECK(json_require_defaults(root, at_default, 3, &e) == 0,
          "absent keys and values among the accepted ones pass (%s)", e.msg);
    CHECK(json_require_defaults(root, at_default, 4, &e) != 0 &&
              strstr(e.msg, "test.json: key 'b' is an array; diamond implements only null|[]"),
          "another value is refused, naming it: %s", e.msg);
    static const KeyDefault string_default[] = {{"d", "\"x\""}};
    CHECK(json_require_defaults(json_get(root, "c"), string_default, 1, &e) != 0 &&
              strstr(e.msg, "key 'd' is \"x?\xc3\xa9"),
          "a string that differs is refused: %s", e.msg);
    CHECK(sizeof(JsonValue) <= 32, "a parsed value takes at most 32 bytes (%zu)",
          sizeof(JsonValue));
    json_free(doc);

    char deep[2 * JSON_MAX_DEPTH + 1];
    for (int k = 0; k < JSON_MAX_DEPTH; k++) {
        deep[k] = '[';
        deep[2 * JSON_MAX_DEPTH - 1 - k] = ']';
    }
    deep[2 * JSON_MAX_DEPTH] = '\0';
    doc = parse(deep, &e);
    CHECK(doc != NULL, "nesting of exactly JSON_MAX_DEPTH parses");
    json_free(doc);
    for (const char *const *s = (const char *const[]){"0", "-1.5e-3", "\"\"", "true", "null", " [ ] ", NULL}; *s; s++) {
        doc = parse(*s, &e);
        CHECK(doc != NULL, "scalar document '%s' parses", *s);
        json_free(doc);
    }
}

static void test_json_invalid(void) {
    static const struct {
        const char *text, *error;
    } cases[] = {
        {"", "end of input"},
        {"   ", "end of input"},
        {"{", "expected a string key"},
        {"[1,]", "unexpected character"},
        {"[1 2]", "expected ',' or ']'"},
        {"{\"a\" 1}", "expected ':'"},
        {"{\"a\":1,}", "expected a string key"},
        {"{\"a\":}", "unexpected character"},
        {"{1:2}", "expected a string key"},
        {"01", "unexpected data"},
        {"1.", "digit after '.'"},
        {".5", "unexpected character"},
        {"+1", "unexpected character"},
        {"-", "expected a digit"},
        {"1e", "exponent"},
        {"1e999", "out of range"},
        {"tru", "unexpected character"},
        {"nul", "unexpected character"},
        {"NaN", "unexpected character"},
        {"Infinity", "unexpected character"},
        {"\"abc", "unterminated"},
        {"\"abc\\\"", "unterminated"},
        {"\"a\\x\"", "unknown escape"},
        {"\"\\u12\"", "bad \\u escape"},
        {"\"\\u12g4\"", "bad \\u escape"},
        {"\"\\ud800\"", "unpaired surrogate"},
        {"\"\\udc00\"", "unpaired surrogate"},
        {"\"\\ud800\\u0041\"", "unpaired surrogate"},
        {"\"\\u0000\"", "\\u0000"},
        {"\"tab\there\"", "control character"},
        {"\"\xc3\x28\"", "invalid UTF-8"},
        {"\"\xed\xa0\x80\"", "invalid UTF-8"},
        {"\"\xc0\xaf\"", "invalid UTF-8"},
        {"\"\xe0\x80\xaf\"", "invalid UTF-8"},
        {"\"\xf4\x90\x80\x80\"", "invalid UTF-8"},
        {"\"\xf0\x9f\x98\"", "invalid UTF-8"},
        {"\"\xff\"", "invalid UTF-8"},
        {"[1] x", "unexpected data"},
        {"{} {}", "unexpected data"},
        {"{\"a\":1,\"b\":2,\"a\":3}", "duplicate key \"a\""},
        {"{\"x\":{\"k\":1,\"k\":1}}", "duplicate key \"k\""},
        {"\xef\xbb\xbf{}", "unexpected character"},
        {"[\"a\"\n,\n  x]", "line 3, column 3"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        Error e = {{0}};
        JsonDoc *doc = parse(cases[i].text, &e);
        CHECK(doc == NULL && contains(e.msg, cases[i].error) && contains(e.msg, "test.json"),
              "invalid JSON #%zu rejected with \"%s\" (got: %s)", i, cases[i].error, e.msg);
        json_free(doc);
    }
    char deep[2 * JSON_MAX_DEPTH + 3];
    for (int k = 0; k < JSON_MAX_DEPTH + 1; k++) {
        deep[k] = '[';
        deep[2 * JSON_MAX_DEPTH + 1 - k] = ']';
    }
    deep[2 * JSON_MAX_DEPTH + 2] = '\0';
    Error e = {{0}};
    JsonDoc *doc = parse(deep, &e);
    CHECK(doc == NULL && contains(e.msg, "nested deeper"), "nesting past JSON_MAX_DEPTH rejected (%s)", e.msg);
    /* The text need not be NUL-terminated: parse a prefix. */
    doc = NULL;
    CHECK(json_parse(&doc, "[1]garbage", 3, "prefix", &e) == 0, "parses exactly len bytes");
    json_free(doc);
}

static void test_json_lookups(void) {
    Error e = {{0}};
    JsonDoc *doc = parse("{\"hidden\": 64, \"eps\": 1e-6, \"use_bias\": true, \"name\": \"vae\","
                         " \"channels\": [128, 256, 512], \"f\": 1.5, \"mixed\": [1, \"x\"]}",
                         &e);
    CHECK(doc != NULL, "config parses");
    if (!doc) return;
    const JsonValue *cfg = json_root(doc);
    int64_t i = 0;
    double x = 0;
    bool flag = false;
    const char *s = NULL;
    int64_t channels[4] = {0};
    size_t count = 0;
    CHECK(json_get_int(cfg, "hidden", &i, &e) == 0 && i == 64, "get int");
    CHECK(json_get_float(cfg, "eps", &x, &e) == 0 && x == 1e-6, "get float");
    CHECK(json_get_float(cfg, "hidden", &x, &e) == 0 && x == 64.0, "get float accepts an integer");
    CHECK(json_get_bool(cfg, "use_bias", &flag, &e) == 0 && flag, "get bool");
    CHECK(json_get_string(cfg, "name", &s, &e) == 0 && !strcmp(s, "vae"), "get string");
    CHECK(json_get_int_array(cfg, "channels", channels, 4, &count, &e) == 0 && count == 3 && channels[2] == 512,
          "get int array");

    i = 7;
    CHECK(json_get_int(cfg, "layers", &i, &e) != 0 && i == 7 && !strcmp(e.msg, "test.json: key 'layers' is missing"),
          "missing key named (%s)", e.msg);
    CHECK(json_get_int(cfg, "f", &i, &e) != 0 && contains(e.msg, "key 'f' is a non-integer number, expected an integer"),
          "float where an int is wanted (%s)", e.msg);
    CHECK(json_get_bool(cfg, "name", &flag, &e) != 0 && contains(e.msg, "key 'name' is a string, expected a boolean"),
          "string where a bool is wanted (%s)", e.msg);
    CHECK(json_get_string(cfg, "hidden", &s, &e) != 0 && contains(e.msg, "'hidden' is an integer, expected a string"),
          "int where a string is wanted (%s)", e.msg);
    CHECK(json_get_float(cfg, "channels", &x, &e) != 0 && contains(e.msg, "an array, expected a number"),
          "array where a float is wanted (%s)", e.msg);
    CHECK(json_get_int_array(cfg, "channels", channels, 2, &count, &e) != 0 && contains(e.msg, "at most 2"),
          "int array over capacity (%s)", e.msg);
    CHECK(json_get_int_array(cfg, "mixed", channels, 4, &count, &e) != 0 && contains(e.msg, "'mixed'[1] is a string"),
          "int array with a string (%s)", e.msg);
    CHECK(json_get_int(json_get(cfg, "hidden"), "x", &i, &e) != 0 && contains(e.msg, "cannot look up key 'x'"),
          "lookup in a non-object (%s)", e.msg);
    json_free(doc);
}

/* ---- safetensors: the golden file from Python ------------------------------------------------- */

static void test_golden(void) {
    SafeTensors *st = golden_open("tests/golden/io.safetensors");
    if (!st) return;
    CHECK(st_count(st) == 13, "golden file has 13 tensors (got %zu)", st_count(st));
    CHECK(st_metadata(st, "format") && !strcmp(st_metadata(st, "format"), "pt") && !st_metadata(st, "nope"),
          "__metadata__ read");
    CHECK(st_at(st, 0) && !strcmp(st_at(st, 0)->name, "f32") && st_at(st, st_count(st)) == NULL, "header order");

    const StTensor *f32 = st_find(st, "f32"), *f64 = st_find(st, "f32_as_f64");
    CHECK(f32 && f32->dtype == DTYPE_F32 && f32->ndim == 3 && f32->shape[0] == 3 && f32->shape[1] == 1 &&
              f32->shape[2] == 7 && f32->numel == 21 && f32->nbytes == 84,
          "f32 tensor: dtype and shape [3, 1, 7]");
    if (f32 && f64 && f64->dtype == DTYPE_F64) {
        float got[21], want[21];
        Error e = {{0}};
        CHECK(st_read_f32(st, "f32", got, 21, &e) == 0, "st_read_f32 F32");
        for (int i = 0; i < 21; i++) {
            double d;
            memcpy(&d, (const unsigned char *)f64->data + 8 * i, 8);
            want[i] = (float)d;
        }
        CHECK(float_mismatches(got, want, 21) == 0, "F32 values match Python's (bit for bit)");
    }

    float *f16 = golden_load(st, "f16_all", 65536), *f16_want = golden_load(st, "f16_all_as_f32", 65536);
    if (f16 && f16_want) {
        check_close("f16 -> f32 vs torch, exact (NaN matches NaN)", f16, f16_want, 65536, 0.0f, 0.0f);
        CHECK(float_mismatches(f16, f16_want, 65536) == 0, "all 65536 f16 patterns convert like torch's .float(), bit for bit");
        uint16_t *bits = load_bits16(st_find(st, "f16_all"));
        f16_to_f32_array(bits, f16, 65536);
        CHECK(float_mismatches(f16, f16_want, 65536) == 0, "f16_to_f32_array matches torch");
        free(bits);
    }
    free(f16);
    free(f16_want);

    float *bf16 = golden_load(st, "bf16_sample", 4096), *bf16_want = golden_load(st, "bf16_sample_as_f32", 4096);
    if (bf16 && bf16_want) {
        check_close("bf16 -> f32 vs torch, exact (NaN matches NaN)", bf16, bf16_want, 4096, 0.0f, 0.0f);
        CHECK(float_mismatches(bf16, bf16_want, 4096) == 0, "bf16 patterns convert like torch's .float(), bit for bit");
        uint16_t *bits = load_bits16(st_find(st, "bf16_sample"));
        bf16_to_f32_array(bits, bf16, 4096);
        CHECK(float_mismatches(bf16, bf16_want, 4096) == 0, "bf16_to_f32_array matches torch");
        free(bits);
    }
    free(bf16);
    free(bf16_want);

    const StTensor *src = st_find(st, "round_src"), *to_f16 = st_find(st, "round_src_to_f16"),
                   *to_bf16 = st_find(st, "round_src_to_bf16");
    if (src && to_f16 && to_bf16 && src->numel == to_f16->numel && src->numel == to_bf16->numel) {
        size_t n = (size_t)src->numel, f16_bad = 0, bf16_bad = 0;
        float *values = golden_load(st, "round_src", n);
        uint16_t *want16 = load_bits16(to_f16), *wantb = load_bits16(to_bf16);
        for (size_t i = 0; values && i < n; i++) {
            uint16_t h = f32_to_f16(values[i]), b = f32_to_bf16(values[i]);
            if (isnan(values[i])) {
                f16_bad += !isnan(f16_to_f32(h));
                bf16_bad += !isnan(bf16_to_f32(b));
            } else {
                f16_bad += h != want16[i];
                bf16_bad += b != wantb[i];
            }
        }
        CHECK(values && f16_bad == 0, "f32_to_f16 matches torch's .half() on %zu values incl. ties (%zu differ)", n, f16_bad);
        CHECK(values && bf16_bad == 0, "f32_to_bf16 matches torch's .bfloat16() on %zu values (%zu differ)", n, bf16_bad);
        free(values);
        free(want16);
        free(wantb);
    } else {
        CHECK(0, "golden rounding tensors present");
    }

    const StTensor *i64 = st_find(st, "i64");
    int64_t want_i64[5] = {0, -1, (int64_t)1 << 62, INT64_MIN, 123456789012};
    CHECK(i64 && i64->dtype == DTYPE_I64 && i64->numel == 5 && memcmp(i64->data, want_i64, sizeof want_i64) == 0,
          "I64 values");
    const StTensor *scalar = st_find(st, "scalar"), *empty = st_find(st, "empty");
    float value = 0;
    Error e = {{0}};
    CHECK(scalar && scalar->ndim == 0 && scalar->numel == 1 && st_read_f32(st, "scalar", &value, 1, &e) == 0 &&
              value == 42.5f,
          "scalar of shape []");
    CHECK(empty && empty->ndim == 2 && empty->shape[0] == 0 && empty->numel == 0 && empty->nbytes == 0 &&
              st_read_f32(st, "empty", NULL, 0, &e) == 0,
          "empty tensor of shape [0, 3]");
    float odd[2] = {0};
    CHECK(st_read_f32(st, "odd \"name\" \\ with \xc3\xa9, \xf0\x9f\x98\x80 and\ttab", odd, 2, &e) == 0 && odd[0] == 1.5f &&
              odd[1] == -2.0f,
          "name written by json.dumps with \\u escapes and a surrogate pair is found");

    CHECK(st_read_f32(st, "f32", odd, 2, &e) != 0 && contains(e.msg, "has 21 elements, the caller expects 2"),
          "st_read_f32 checks the count (%s)", e.msg);
    CHECK(st_read_f32(st, "i64", odd, 5, &e) != 0 && contains(e.msg, "is I64"), "st_read_f32 refuses I64 (%s)", e.msg);
    CHECK(st_read_f32(st, "missing", odd, 1, &e) != 0 && contains(e.msg, "io.safetensors: no tensor named 'missing'"),
          "st_read_f32 on an absent name (%s)", e.msg);
    CHECK(st_find(st, "missing") == NULL && st_find(st, "") == NULL, "st_find of absent names");
    st_close(st);
}

/* ---- safetensors: round trips through st_write -------------------------------------------------- */

static void test_roundtrip(const char *dir) {
    float f32[21];
    unsigned long long seed = 1;
    for (int i = 0; i < 21; i++) f32[i] = harness_rand(&seed);
    uint16_t f16[5] = {0x3c00, 0x0001, 0x7bff, 0xfc00, 0x8000}, bf16[6] = {0x3f80, 0x4049, 0, 1, 0xff7f, 0x7fc0};
    double f64[2] = {1.0 / 3.0, -1e300};
    int64_t i64[3] = {INT64_MIN, 0, INT64_MAX};
    int32_t i32[4] = {-1, 2, INT32_MIN, INT32_MAX};
    int16_t i16[2] = {-32768, 32767};
    int8_t i8[3] = {-128, 0, 127};
    uint8_t u8[7] = {0, 1, 2, 3, 250, 254, 255}, flags[2] = {0, 1};
    float scalar = 3.25f;
    const char *odd = "quote\" back\\slash new\nline \x01 \xc3\xa9";
    StWriteTensor tensors[] = {
        {"f32", DTYPE_F32, 3, {3, 1, 7}, f32},   {"f16", DTYPE_F16, 1, {5}, f16},
        {"bf16", DTYPE_BF16, 2, {2, 3}, bf16},   {"f64", DTYPE_F64, 1, {2}, f64},
        {"i64", DTYPE_I64, 1, {3}, i64},         {"i32", DTYPE_I32, 2, {2, 2}, i32},
        {"i16", DTYPE_I16, 1, {2}, i16},         {"i8", DTYPE_I8, 1, {3}, i8},
        {"u8", DTYPE_U8, 1, {7}, u8},            {"bool", DTYPE_BOOL, 1, {2}, flags},
        {"scalar", DTYPE_F32, 0, {0}, &scalar},  {"empty", DTYPE_F32, 3, {2, 0, 5}, NULL},
        {odd, DTYPE_U8, 1, {1}, u8},
    };
    size_t n = sizeof tensors / sizeof tensors[0];
    char *path = join(dir, "roundtrip.safetensors");
    Error e = {{0}};
    CHECK(st_write(path, tensors, n, &e) == 0, "st_write of every dtype (%s)", e.msg);
    CHECK(dir_entries(dir) == 1, "no temporary file left behind");

    size_t size = 0;
    unsigned char *bytes = read_bytes(path, &size);
    uint64_t header_len = 0;
    for (int i = 0; bytes && size >= 8 && i < 8; i++) header_len |= (uint64_t)bytes[i] << (8 * i);
    CHECK(bytes && header_len % 8 == 0 && header_len + 8 <= size && bytes[8] == '{',
          "header length is a multiple of 8 (%llu)", (unsigned long long)header_len);
    if (bytes && header_len % 8 == 0 && header_len + 8 <= size) {
        size_t last = 8 + (size_t)header_len - 1;
        while (last > 8 && bytes[last] == ' ') last--;
        CHECK(bytes[last] == '}', "header padded with spaces after the closing brace");
    }
    free(bytes);

    SafeTensors *st = NULL;
    CHECK(st_open(&st, path, &e) == 0, "st_write output reopens (%s)", e.msg);
    if (st) {
        CHECK(st_count(st) == n, "same tensor count");
        size_t bad = 0;
        for (size_t i = 0; i < n && i < st_count(st); i++) {
            const StTensor *t = st_at(st, i);
            const StWriteTensor *w = &tensors[i];
            bool ok = !strcmp(t->name, w->name) && t->dtype == w->dtype && t->ndim == w->ndim;
            for (int d = 0; ok && d < w->ndim; d++) ok = t->shape[d] == w->shape[d];
            ok = ok && t->nbytes == (size_t)t->numel * dtype_size(w->dtype) && (t->nbytes == 0 || memcmp(t->data, w->data, t->nbytes) == 0);
            if (!ok) {
                printf("        round trip differs at '%s'\n", w->name);
                bad++;
            }
        }
        CHECK(bad == 0, "names (with quotes, backslash, newline, control byte, UTF-8), dtypes, shapes, bytes survive");
        float back[21];
        CHECK(st_read_f32(st, "f32", back, 21, &e) == 0 && memcmp(back, f32, sizeof f32) == 0, "f32 values survive");
        float halfs[6];
        CHECK(st_read_f32(st, "f16", halfs, 5, &e) == 0 && halfs[0] == 1.0f && halfs[1] == 0x1p-24f &&
                  halfs[2] == 65504.0f && isinf(halfs[3]) && signbit(halfs[4]),
              "F16 read as f32");
        CHECK(st_read_f32(st, "bf16", halfs, 6, &e) == 0 && halfs[0] == 1.0f && halfs[1] == 3.140625f && isnan(halfs[5]),
              "BF16 read as f32");
        st_close(st);
    }

    /* Overwriting replaces the file whole. */
    StWriteTensor one = {"only", DTYPE_F32, 1, {1}, &scalar};
    CHECK(st_write(path, &one, 1, &e) == 0 && st_open(&st, path, &e) == 0 && st_count(st) == 1 && st_find(st, "only"),
          "st_write replaces an existing file");
    st_close(st);
    CHECK(st_write(path, NULL, 0, &e) == 0 && st_open(&st, path, &e) == 0 && st_count(st) == 0, "a file with no tensors");
    st_close(st);

    /* Refused inputs leave the old file alone. */
    StWriteTensor dup[2] = {{"a", DTYPE_F32, 1, {1}, &scalar}, {"a", DTYPE_F32, 1, {1}, &scalar}};
    CHECK(st_write(path, dup, 2, &e) != 0 && contains(e.msg, "duplicate tensor name 'a'"), "duplicate names refused (%s)", e.msg);
    StWriteTensor bad_utf8 = {"\xff", DTYPE_F32, 1, {1}, &scalar};
    CHECK(st_write(path, &bad_utf8, 1, &e) != 0 && contains(e.msg, "UTF-8"), "non-UTF-8 name refused (%s)", e.msg);
    StWriteTensor many_dims = {"m", DTYPE_F32, 9, {1}, &scalar};
    CHECK(st_write(path, &many_dims, 1, &e) != 0 && contains(e.msg, "dimensions"), "9 dimensions refused (%s)", e.msg);
    StWriteTensor negative = {"neg", DTYPE_F32, 1, {-1}, &scalar};
    CHECK(st_write(path, &negative, 1, &e) != 0 && contains(e.msg, "invalid shape"), "negative size refused");
    StWriteTensor overflow = {"big", DTYPE_F32, 3, {INT64_MAX, INT64_MAX, 2}, &scalar};
    CHECK(st_write(path, &overflow, 1, &e) != 0 && contains(e.msg, "invalid shape"), "overflowing shape refused");
    StWriteTensor metadata = {"__metadata__", DTYPE_F32, 1, {1}, &scalar};
    CHECK(st_write(path, &metadata, 1, &e) != 0, "'__metadata__' as a tensor name refused");
    StWriteTensor no_data = {"nodata", DTYPE_F32, 1, {4}, NULL};
    CHECK(st_write(path, &no_data, 1, &e) != 0 && contains(e.msg, "no data"), "missing data refused");
    CHECK(st_open(&st, path, &e) == 0 && st_count(st) == 0, "the file from before is intact");
    st_close(st);
    CHECK(dir_entries(dir) == 1, "still no temporary files");

    char *missing_dir = join(dir, "no/such/dir.safetensors");
    CHECK(st_write(missing_dir, &one, 1, &e) != 0 && contains(e.msg, missing_dir), "unwritable path names the file (%s)",
          e.msg);
    free(missing_dir);
    remove(path);
    free(path);
}

/* ---- safetensors: malformed files --------------------------------------------------------------- */

static void expect_rejected(const char *what, const unsigned char *bytes, size_t size, const char *error) {
    SafeTensors *st = NULL;
    Error e = {{0}};
    int rc = st_open_memory(&st, bytes, size, "bad.safetensors", &e);
    CHECK(rc != 0 && st == NULL && contains(e.msg, "bad.safetensors") && contains(e.msg, error) && !strchr(e.msg, '\n'),
          "%s: rejected with \"%s\" (got: %s)", what, error, e.msg);
    st_close(st);
}

static void expect_header_rejected(const char *what, const char *header, size_t data_len, const char *error) {
    unsigned char data[64] = {0};
    size_t size;
    unsigned char *bytes = st_image(header, data, data_len, &size);
    expect_rejected(what, bytes, size, error);
    free(bytes);
}

static void test_malformed(const char *dir) {
    unsigned char raw[16] = {0};
    expect_rejected("empty file", raw, 0, "too short");
    expect_rejected("5-byte file", raw, 5, "too short");
    raw[0] = 100;
    expect_rejected("header longer than the file", raw, 16, "runs past the end");
    memset(raw, 0xff, 8);
    expect_rejected("header length 2^64-1", raw, 16, "over the");
    memset(raw, 0, 8);
    raw[3] = 0x10; /* 256 MiB */
    expect_rejected("header length 256 MiB", raw, 16, "over the");

    static const struct {
        const char *what, *header;
        size_t data;
        const char *error;
    } cases[] = {
        {"invalid JSON", "{\"a\":", 0, "invalid JSON"},
        {"empty header", "", 0, "unexpected end"},
        {"non-object header", "[1, 2]", 0, "not a JSON object"},
        {"string header", "\"x\"", 0, "not a JSON object"},
        {"trailing garbage", "{} x", 0, "unexpected data"},
        {"entry not an object", "{\"a\": 3}", 0, "entry is not an object"},
        {"offsets out of bounds", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4, "run past"},
        {"offsets far out of bounds",
         "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[18446744073709551614,18446744073709551615]}}", 4,
         "data_offsets is not a pair"},
        {"offsets past the data", "{\"a\":{\"dtype\":\"U8\",\"shape\":[7],\"data_offsets\":[9223372036854775800,9223372036854775807]}}",
         4, "run past"},
        {"overlapping tensors",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
         12, "tensors 'a' and 'b' overlap"},
        {"same bytes twice",
         "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"a\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
         8, "overlap"},
        {"empty tensor inside another",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
         8, "overlap"},
        {"end before begin", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", 8, "end before"},
        {"size mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 12, "hold 8 bytes but F32 [3] needs 12"},
        {"shape overflows", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],\"data_offsets\":[0,0]}}", 0,
         "overflows"},
        {"bytes overflow", "{\"a\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}", 0,
         "overflows"},
        {"overflow hidden by a zero", "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}}",
         0, "overflows"},
        {"dimension past int64", "{\"a\":{\"dtype\":\"F32\",\"shape\":[99999999999999999999],\"data_offsets\":[0,0]}}", 0,
         "shape[0] is not a non-negative integer"},
        {"negative dimension", "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 0, "shape[0]"},
        {"fractional dimension", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", 8, "shape[0]"},
        {"shape not an array", "{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8, "shape is not an array"},
        {"nine dimensions", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
         "9 dimensions"},
        {"unknown dtype", "{\"a\":{\"dtype\":\"F8_E4M3\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, "unknown dtype 'F8_E4M3'"},
        {"dtype not a string", "{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "dtype is not a string"},
        {"missing dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "missing field 'dtype'"},
        {"missing data_offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", 4, "missing field 'data_offsets'"},
        {"unknown field", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"x\":1}}", 4, "unknown field 'x'"},
        {"offsets not a pair", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", 8, "not a pair"},
        {"negative offset", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 8, "not a pair"},
        {"non-UTF-8 name", "{\"\xff\xfe\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "invalid UTF-8"},
        {"overlong UTF-8 name", "{\"\xc0\xae\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "invalid UTF-8"},
        {"lone surrogate name", "{\"\\ud800\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "surrogate"},
        {"duplicate names",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
         8, "duplicate key \"a\""},
        {"metadata not strings", "{\"__metadata__\":{\"k\":1}}", 0, "__metadata__ entry 'k' is not a string"},
        {"metadata not an object", "{\"__metadata__\":[]}", 0, "__metadata__ is not an object"},
        {"deep nesting", "{\"__metadata__\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}", 0,
         "nested deeper"},
        {"name with a newline", "{\"a\\nb\":{\"dtype\":\"X\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, "tensor 'a?b'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_header_rejected(cases[i].what, cases[i].header, cases[i].data, cases[i].error);

    /* Files that are odd but valid. */
    static const struct {
        const char *what, *header;
        size_t data;
        size_t tensors;
    } valid[] = {
        {"no tensors", "{}", 0, 0},
        {"header padded with spaces", "{}      ", 0, 0},
        {"gaps and unused bytes in the data area",
         "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[3,4]},\"b\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[9,10]}}",
         16, 2},
        {"empty tensors at one offset",
         "{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},\"b\":{\"dtype\":\"I8\",\"shape\":[3,0],\"data_offsets\":[4,4]},"
         "\"c\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}}",
         4, 3},
        {"huge dimension times zero", "{\"a\":{\"dtype\":\"F32\",\"shape\":[0,9223372036854775807],\"data_offsets\":[0,0]}}", 0, 1},
        {"metadata only", "{\"__metadata__\":{\"format\":\"pt\"}}", 0, 0},
    };
    for (size_t i = 0; i < sizeof valid / sizeof valid[0]; i++) {
        unsigned char data[16] = {0};
        size_t size;
        unsigned char *bytes = st_image(valid[i].header, data, valid[i].data, &size);
        SafeTensors *st = NULL;
        Error e = {{0}};
        CHECK(st_open_memory(&st, bytes, size, "odd.safetensors", &e) == 0 && st_count(st) == valid[i].tensors,
              "valid: %s (%s)", valid[i].what, st ? "" : e.msg);
        st_close(st);
        free(bytes);
    }

    /* Through the file system: a truncated file, an empty file and a directory. */
    char *path = join(dir, "truncated.safetensors");
    const char *header = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    unsigned char data[16] = {0};
    size_t size;
    unsigned char *bytes = st_image(header, data, sizeof data, &size);
    SafeTensors *st = NULL;
    Error e = {{0}};
    write_bytes(path, bytes, size - 1);
    CHECK(st_open(&st, path, &e) != 0 && contains(e.msg, path) && contains(e.msg, "run past"),
          "truncated file rejected, naming it (%s)", e.msg);
    write_bytes(path, bytes, 0);
    CHECK(st_open(&st, path, &e) != 0 && contains(e.msg, "too short"), "empty file rejected (%s)", e.msg);
    write_bytes(path, bytes, size);
    CHECK(st_open(&st, path, &e) == 0 && st_count(st) == 1, "the whole file opens");
    st_close(st);
    CHECK(st_open(&st, dir, &e) != 0 && contains(e.msg, "not a regular file"), "a directory is refused (%s)", e.msg);
    char *missing = join(dir, "missing.safetensors");
    CHECK(st_open(&st, missing, &e) != 0 && contains(e.msg, "cannot open"), "missing file (%s)", e.msg);
    remove(path);
    free(missing);
    free(path);
    free(bytes);
}

/* ---- sharded models ----------------------------------------------------------------------------- */

static void write_shard(const char *dir, const char *file, const char *const *names, size_t n, float first) {
    float values[8][2];
    StWriteTensor tensors[8];
    for (size_t i = 0; i < n; i++) {
        values[i][0] = first + (float)i;
        values[i][1] = -values[i][0];
        tensors[i] = (StWriteTensor){names[i], DTYPE_F32, 1, {2}, values[i]};
    }
    char *path = join(dir, file);
    Error e = {{0}};
    if (st_write(path, tensors, n, &e)) printf("        cannot write shard: %s\n", e.msg);
    free(path);
}

static void write_text(const char *dir, const char *file, const char *text) {
    char *path = join(dir, file);
    write_bytes(path, text, strlen(text));
    free(path);
}

static void test_sharded(const char *base) {
    char *dir = join(base, "model");
    mkdir(dir, 0777);
    write_shard(dir, "model-00001-of-00002.safetensors", (const char *[]){"x", "y"}, 2, 1.0f);
    write_shard(dir, "model-00002-of-00002.safetensors", (const char *[]){"z", "unlisted"}, 2, 10.0f);
    write_text(dir, "model.safetensors.index.json",
               "{\"metadata\": {\"total_size\": 24}, \"weight_map\": {\"x\": \"model-00001-of-00002.safetensors\","
               " \"z\": \"model-00002-of-00002.safetensors\", \"y\": \"model-00001-of-00002.safetensors\"}}");
    char *index = join(dir, "model.safetensors.index.json");
    const char *paths[2] = {dir, index};
    for (int k = 0; k < 2; k++) {
        StModel *m = NULL;
        Error e = {{0}};
        CHECK(st_model_open(&m, paths[k], &e) == 0, "sharded model opens by %s (%s)", k ? "index" : "directory", e.msg);
        if (!m) continue;
        CHECK(st_model_count(m) == 3 && st_model_shard_count(m) == 2, "3 listed tensors in 2 shards");
        CHECK(!strcmp(st_model_at(m, 0)->name, "x") && !strcmp(st_model_at(m, 2)->name, "y") && !st_model_at(m, 3),
              "index order");
        float v[2] = {0};
        CHECK(st_model_read_f32(m, "z", v, 2, &e) == 0 && v[0] == 10.0f && v[1] == -10.0f, "z read from shard 2");
        CHECK(st_model_read_f32(m, "y", v, 2, &e) == 0 && v[0] == 2.0f, "y read from shard 1");
        CHECK(st_model_find(m, "x") && st_model_find(m, "x")->numel == 2 && !st_model_find(m, "w"), "st_model_find");
        CHECK(st_model_find(m, "unlisted") == NULL, "tensors the index does not list are not the model's");
        CHECK(st_model_read_f32(m, "z", v, 3, &e) != 0 && contains(e.msg, "model-00002-of-00002.safetensors"),
              "count error names the shard (%s)", e.msg);
        CHECK(st_model_read_f32(m, "w", v, 2, &e) != 0 && contains(e.msg, "no tensor named 'w'"), "absent tensor (%s)", e.msg);
        CHECK(st_model_shard(m, 1) && st_count(st_model_shard(m, 1)) == 2 && !st_model_shard(m, 2), "shards reachable");
        st_model_close(m);
    }

    static const struct {
        const char *what, *index, *error;
    } bad[] = {
        {"tensor missing from its shard", "{\"weight_map\": {\"x\": \"model-00001-of-00002.safetensors\", \"w\": \"model-00001-of-00002.safetensors\"}}",
         "tensor 'w' is listed in shard 'model-00001-of-00002.safetensors' but that file has no such tensor"},
        {"tensor in the other shard", "{\"weight_map\": {\"z\": \"model-00001-of-00002.safetensors\"}}", "no such tensor"},
        {"shard outside the directory", "{\"weight_map\": {\"x\": \"../model-00001-of-00002.safetensors\"}}", "not a file name"},
        {"shard is not a string", "{\"weight_map\": {\"x\": 1}}", "not a file name"},
        {"missing shard file", "{\"weight_map\": {\"x\": \"model-00009.safetensors\"}}", "cannot open"},
        {"no weight_map", "{\"metadata\": {}}", "no \"weight_map\" object"},
        {"empty weight_map", "{\"weight_map\": {}}", "empty"},
        {"index not JSON", "{\"weight_map\": ", "invalid JSON"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(dir, "bad.safetensors.index.json", bad[i].index);
        char *bad_index = join(dir, "bad.safetensors.index.json");
        StModel *m = NULL;
        Error e = {{0}};
        CHECK(st_model_open(&m, bad_index, &e) != 0 && m == NULL && contains(e.msg, bad[i].error),
              "index %s rejected (%s)", bad[i].what, e.msg);
        free(bad_index);
    }
    StModel *m = NULL;
    Error e = {{0}};
    CHECK(st_model_open(&m, dir, &e) != 0 && contains(e.msg, "2 *.safetensors.index.json files"),
          "a directory with two indexes is ambiguous (%s)", e.msg);
    char *bad_index = join(dir, "bad.safetensors.index.json");
    remove(bad_index);
    remove(index);
    CHECK(st_model_open(&m, dir, &e) != 0 && contains(e.msg, "2 .safetensors files and no index"),
          "two files without an index are ambiguous (%s)", e.msg);

    char *single = join(base, "single");
    mkdir(single, 0777);
    CHECK(st_model_open(&m, single, &e) != 0 && contains(e.msg, "no .safetensors file"), "empty directory (%s)", e.msg);
    write_shard(single, "diffusion_pytorch_model.safetensors", (const char *[]){"a", "b", "c"}, 3, 5.0f);
    write_text(single, "config.json", "{}");
    CHECK(st_model_open(&m, single, &e) == 0 && st_model_count(m) == 3 && st_model_shard_count(m) == 1,
          "a directory with one .safetensors file (%s)", e.msg);
    float v[2] = {0};
    CHECK(m && st_model_read_f32(m, "c", v, 2, &e) == 0 && v[0] == 7.0f, "read from the single file");
    st_model_close(m);
    char *file = join(single, "diffusion_pytorch_model.safetensors");
    m = NULL;
    CHECK(st_model_open(&m, file, &e) == 0 && st_model_count(m) == 3, "a .safetensors file as a model");
    st_model_close(m);
    char *missing = join(base, "nothing-here");
    CHECK(st_model_open(&m, missing, &e) != 0 && contains(e.msg, "cannot open"), "missing path (%s)", e.msg);
    free(missing);
    free(file);
    free(single);
    free(bad_index);
    free(index);
    free(dir);
}

/* ---- atomic writes and directories -------------------------------------------------------------- */

/* st_model_random: names and shapes without files, values made on every read. */
static void test_random_model(void) {
    const StTensorSpec specs[] = {
        {"blocks.0.proj.weight", 2, {3, 16}},
        {"blocks.0.norm.weight", 1, {5}},
        {"conv.weight", 4, {2, 3, 3, 3}},
    };
    StModel *m = NULL, *again = NULL, *other = NULL;
    Error e = {{0}};
    CHECK(st_model_random(&m, specs, 3, 7, RANDOM_FOR_TIMING, &e) == 0, "random model (%s)",
          e.msg);
    if (!m) return;
    const StTensor *t = st_model_find(m, "conv.weight");
    CHECK(st_model_count(m) == 3 && st_model_shard_count(m) == 0 && !st_model_shard(m, 0),
          "3 tensors, no shards");
    CHECK(t && t->ndim == 4 && t->shape[3] == 3 && t->numel == 54 && t->dtype == DTYPE_F32 &&
              t->data == NULL && t->nbytes == 0 && !strcmp(st_model_at(m, 0)->name, specs[0].name),
          "tensors by name and shape, no data");
    CHECK(!st_model_find(m, "absent"), "absent names are not found");

    float w[48], w2[48], norm[5], other_w[48];
    bool in_range = st_model_read_f32(m, specs[0].name, w, 48, &e) == 0, varied = false;
    for (int i = 0; i < 48; i++) {
        in_range &= w[i] >= -0.25f && w[i] < 0.25f; /* uniform(-1, 1) / sqrt(16) */
        varied |= w[i] != w[0];
    }
    CHECK(in_range && varied, "a matrix is uniform(-1, 1) / sqrt(its last dim): %g", w[0]);
    in_range = st_model_read_f32(m, specs[1].name, norm, 5, &e) == 0;
    for (int i = 0; i < 5; i++) in_range &= norm[i] >= 0.9f && norm[i] < 1.1f;
    CHECK(in_range, "a vector is 1 + 0.1 uniform(-1, 1): %g", norm[0]);

    /* the same seed and name give the same values whatever the rest of the model */
    CHECK(st_model_random(&again, specs, 1, 7, RANDOM_FOR_TIMING, &e) == 0 &&
              st_model_read_f32(again, specs[0].name, w2, 48, &e) == 0 &&
              !memcmp(w, w2, sizeof w) && st_model_read_f32(m, specs[0].name, w2, 48, &e) == 0 &&
              !memcmp(w, w2, sizeof w),
          "values repeat for the same seed and name (%s)", e.msg);
    CHECK(st_model_random(&other, specs, 1, 8, RANDOM_FOR_TIMING, &e) == 0 &&
              st_model_read_f32(other, specs[0].name, other_w, 48, &e) == 0 &&
              memcmp(w, other_w, sizeof w),
          "another seed gives other values (%s)", e.msg);
    CHECK(st_model_read_f32(m, specs[0].name, w, 47, &e) != 0 && contains(e.msg, "48 elements"),
          "a wrong count is refused (%s)", e.msg);
    CHECK(st_model_read_f32(m, "absent", w, 1, &e) != 0 && contains(e.msg, "no tensor named"),
          "an absent name is refused (%s)", e.msg);
    st_model_close(m);
    st_model_close(again);
    st_model_close(other);

    const StTensorSpec twice[] = {{"x", 1, {2}}, {"x", 1, {3}}};
    const StTensorSpec deep[] = {{"x", ST_MAX_DIMS + 1, {1}}};
    const StTensorSpec negative[] = {{"x", 2, {2, -1}}};
    m = NULL;
    CHECK(st_model_random(&m, twice, 2, 1, RANDOM_FOR_TIMING, &e) != 0 && !m &&
              contains(e.msg, "duplicate"),
          "a repeated name is refused (%s)", e.msg);
    CHECK(st_model_random(&m, deep, 1, 1, RANDOM_FOR_TIMING, &e) != 0 && !m &&
              contains(e.msg, "dims"),
          "too many dims are refused (%s)", e.msg);
    CHECK(st_model_random(&m, negative, 1, 1, RANDOM_FOR_TIMING, &e) != 0 && !m &&
              contains(e.msg, "shape"),
          "a negative dim is refused (%s)", e.msg);
}

/* path_join: dir/name when it fits, a clear error naming both when it does not. */
static void test_path_join(void) {
    char path[16];
    Error e = {{0}};
    CHECK(path_join(path, sizeof path, "a/b", "c.json", &e) == 0 && !strcmp(path, "a/b/c.json"),
          "path_join a/b + c.json (got %s)", path);
    CHECK(path_join(path, sizeof path, "dir", "exactly.fit", &e) == 0 && strlen(path) == 15,
          "path_join fills the buffer to its last byte (got %s)", path);
    CHECK(path_join(path, sizeof path, "dir", "one_too_long", &e) != 0 &&
              contains(e.msg, "path too long") && contains(e.msg, "dir/one_too_long"),
          "path_join refuses a path one byte too long (%s)", e.msg);
}

static void test_atomic(const char *base) {
    char *dir = join(base, "atomic");
    mkdir(dir, 0777);
    char *path = join(dir, "a.txt");
    Error e = {{0}};
    CHECK(write_file_atomic(path, "hello", 5, &e) == 0, "write_file_atomic");
    size_t size = 0;
    unsigned char *bytes = read_bytes(path, &size);
    CHECK(bytes && size == 5 && !memcmp(bytes, "hello", 5), "contents written");
    free(bytes);

    AtomicFile *f = NULL;
    char tmp_path[512];
    snprintf(tmp_path, sizeof tmp_path, "%s.tmp.%ld", path, (long)getpid());
    CHECK(atomic_open(&f, path, &e) == 0 && atomic_write(f, "bye", 3, &e) == 0, "atomic_open + atomic_write");
    CHECK(exists(tmp_path) && dir_entries(dir) == 2, "the temporary file <path>.tmp.<pid> exists while writing");
    bytes = read_bytes(path, &size);
    CHECK(bytes && size == 5, "readers still see the old file while the new one is written");
    free(bytes);
    atomic_abort(f);
    CHECK(!exists(tmp_path) && dir_entries(dir) == 1, "atomic_abort removes the temporary file");
    bytes = read_bytes(path, &size);
    CHECK(bytes && size == 5 && !memcmp(bytes, "hello", 5), "an aborted write leaves the old file");
    free(bytes);

    char *deeper = join(dir, "missing/a.txt");
    CHECK(write_file_atomic(deeper, "x", 1, &e) != 0 && contains(e.msg, deeper), "error names the file (%s)", e.msg);
    free(deeper);

    write_text(dir, "c", "");
    write_text(dir, "B", "");
    char **names;
    size_t count;
    CHECK(dir_list(dir, &names, &count, &e) == 0 && count == 3 && !strcmp(names[0], "B") && !strcmp(names[1], "a.txt") &&
              !strcmp(names[2], "c"),
          "dir_list sorted, without . and ..");
    dir_list_free(names, count);
    CHECK(dir_list(path, &names, &count, &e) != 0 && contains(e.msg, "cannot open directory"), "dir_list on a file");

    char *made = join(dir, "made");
    CHECK(dir_make(made, &e) == 0 && dir_make(made, &e) == 0 && dir_entries(made) == 0,
          "dir_make creates a directory and accepts an existing one");
    CHECK(dir_make(path, &e) != 0 && contains(e.msg, path) && contains(e.msg, "file"),
          "dir_make over a file names it (%s)", e.msg);
    char *dotted = join(dir, "./made/../x.png"), *plain = join(dir, "x.png");
    char *other = join(dir, "y.png");
    CHECK(paths_same(plain, plain) && paths_same(plain, dotted) && !paths_same(plain, other) &&
              paths_same("/nonexistent-dir/a.png", "/nonexistent-dir/a.png") &&
              !paths_same("/nonexistent-dir/a.png", "/nonexistent-dir/./a.png"),
          "paths_same: equal names, and names equal once their directories resolve");
    free(dotted), free(plain), free(other);
    free(made);

    /* a FIFO where a config belongs is refused at once (not waited on), as by the CSV reader;
     * a JSON file past JSON_FILE_MAX is refused before it is parsed */
    char *fifo = join(dir, "fifo.json"), *big = join(dir, "big.json");
    alarm(20); /* a regression would block forever: fail instead */
    JsonDoc *doc = NULL;
    char *text = NULL;
    size_t len = 0;
    CHECK(mkfifo(fifo, 0600) == 0 && json_parse_file(&doc, fifo, &e) != 0 && !doc &&
              contains(e.msg, "not a regular file") && file_read_all(fifo, &text, &len, &e) != 0 &&
              contains(e.msg, "not a regular file"),
          "a FIFO is refused without blocking: %s", e.msg);
    alarm(0);
    FILE *out = fopen(big, "wb");
    for (int i = 0; out && i < (JSON_FILE_MAX >> 10) + 1; i++) fprintf(out, "%1024s", "");
    if (out) fclose(out);
    CHECK(json_parse_file(&doc, big, &e) != 0 && !doc && contains(e.msg, "up to 4 MiB"),
          "a JSON file over 4 MiB is refused: %s", e.msg);
    unlink(fifo), unlink(big);
    free(fifo), free(big);
    free(path);
    free(dir);
}

/* ---- PPM ---------------------------------------------------------------------------------------- */

static void fill_pattern(Image *img) {
    for (int y = 0; y < img->height; y++)
        for (int x = 0; x < img->width; x++)
            for (int c = 0; c < 3; c++)
                img->rgb[((size_t)y * img->width + x) * 3 + c] = (uint8_t)(x * 7 + y * 13 + c * 101);
}

static void test_ppm(const char *dir) {
    Image img, back;
    Error e = {{0}};
    CHECK(image_alloc(&img, 7, 5, &e) == 0 && img.rgb && img.rgb[0] == 0, "image_alloc zero-filled");
    fill_pattern(&img);
    char *path = join(dir, "img.ppm");
    CHECK(ppm_write(path, &img, &e) == 0, "ppm_write (%s)", e.msg);
    CHECK(ppm_read(&back, path, &e) == 0 && back.width == 7 && back.height == 5 && !memcmp(back.rgb, img.rgb, 7 * 5 * 3),
          "PPM round trip");
    image_free(&back);
    size_t size = 0;
    unsigned char *bytes = read_bytes(path, &size);
    CHECK(bytes && size == 11 + 105 && !memcmp(bytes, "P6\n7 5\n255\n", 11), "PPM header as written");
    free(bytes);

    unsigned char file[256];
    const char *header = "P6\n# a comment\n7 # width\n\t5\r\n# more\n255\n";
    size_t h = strlen(header);
    memcpy(file, header, h);
    memcpy(file + h, img.rgb, 105);
    memcpy(file + h + 105, "trailing", 8);
    CHECK(ppm_parse(&back, file, h + 113, "commented.ppm", &e) == 0 && back.width == 7 && !memcmp(back.rgb, img.rgb, 105),
          "PPM with comments, odd whitespace and trailing bytes (%s)", e.msg);
    image_free(&back);
    CHECK(ppm_parse(&back, file, h + 104, "short.ppm", &e) != 0 && contains(e.msg, "truncated: 104 of 105") && !back.rgb,
          "PPM with one byte missing (%s)", e.msg);

    static const struct {
        const char *text, *error;
    } bad[] = {
        {"", "not a binary PPM"},
        {"P3\n1 1\n255\n", "not a binary PPM"},
        {"P6", "not a binary PPM"},
        {"P61 1 255\n", "not a binary PPM"},
        {"P6\n", "expected the width"},
        {"P6\n7", "expected the height"},
        {"P6\n7 5\n", "expected the maxval"},
        {"P6\n7 x 5\n255\n", "expected the height"},
        {"P6\n-7 5\n255\n", "expected the width"},
        {"P6\n7 5\n65535\n", "maxval 65535"},
        {"P6\n7 5\n15\n", "maxval 15"},
        {"P6\n0 5\n255\n", "outside 1..16384"},
        {"P6\n16385 1\n255\n", "outside 1..16384"},
        {"P6\n99999999999999999999 1\n255\n", "width is too large"},
        {"P6\n1 1\n255", "whitespace after the maxval"},
        {"P6\n1 1\n255#\n", "whitespace after the maxval"},
        {"P6\n1 1\n255\n", "truncated: 0 of 3"},
        {"P6\n16384 16384\n255\n", "truncated: 0 of 805306368"},
        {"P6 # comment without end", "expected the width"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(ppm_parse(&back, bad[i].text, strlen(bad[i].text), "bad.ppm", &e) != 0 && contains(e.msg, bad[i].error) &&
                  contains(e.msg, "bad.ppm") && !back.rgb,
              "bad PPM #%zu rejected with \"%s\" (got: %s)", i, bad[i].error, e.msg);
    }
    CHECK(ppm_parse(&back, "P6 1 1 255 abc", 14, "tiny.ppm", &e) == 0 && back.rgb[2] == 'c', "minimal PPM on one line");
    image_free(&back);
    char *missing = join(dir, "missing.ppm");
    CHECK(ppm_read(&back, missing, &e) != 0 && contains(e.msg, missing), "missing PPM (%s)", e.msg);
    free(missing);

    Image none = {0, 5, NULL};
    CHECK(ppm_write(path, &none, &e) != 0 && contains(e.msg, "outside"), "ppm_write refuses width 0");
    Image nopixels = {2, 2, NULL};
    CHECK(ppm_write(path, &nopixels, &e) != 0 && contains(e.msg, "no pixels"), "ppm_write refuses missing pixels");
    CHECK(image_alloc(&back, 16385, 1, &e) != 0 && !back.rgb, "image_alloc refuses 16385 wide");
    remove(path);
    free(path);
    image_free(&img);
}

/* ---- PNG: parsed back by an independent, deliberately simple decoder ---------------------------- */

static uint32_t be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Bit by bit, straight from the definition. */
static uint32_t slow_crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1)));
    }
    return ~c;
}

static uint32_t slow_adler32(const unsigned char *p, size_t n) {
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < n; i++) {
        a = (a + p[i]) % 65521;
        b = (b + a) % 65521;
    }
    return b << 16 | a;
}

/* Deflate's bits, first bit of each byte lowest; reading past the end marks it bad. */
typedef struct BitReader {
    const unsigned char *p;
    size_t n, pos; /* pos in bits */
    bool bad;
} BitReader;

static uint32_t read_bits(BitReader *b, int n) {
    uint32_t v = 0;
    for (int i = 0; i < n; i++, b->pos++) {
        if (b->pos / 8 >= b->n) {
            b->bad = true;
            return 0;
        }
        v |= (uint32_t)(b->p[b->pos / 8] >> (b->pos % 8) & 1) << i;
    }
    return v;
}

/* A literal/length symbol of the fixed code, bit by bit as RFC 1951 3.2.6 tabulates it:
 * 7-bit codes 0-23 are 256-279, 8-bit 48-191 are 0-143 and 192-199 are 280-287, 9-bit 400-511
 * are 144-255. */
static int fixed_symbol(BitReader *b) {
    uint32_t code = 0;
    for (int len = 1; len <= 9 && !b->bad; len++) {
        code = code << 1 | read_bits(b, 1);
        if (len == 7 && code <= 23) return 256 + (int)code;
        if (len == 8 && code >= 48 && code <= 191) return (int)code - 48;
        if (len == 8 && code >= 192 && code <= 199) return 280 + (int)code - 192;
        if (len == 9 && code >= 400) return 144 + (int)code - 400;
    }
    return -1;
}

/* A zlib stream of fixed-Huffman deflate blocks (all png_write and the golden use) inflated
 * into out (at most cap bytes); its length, or -1 when the stream is malformed, uses another
 * block type, points outside what was written or fails its Adler-32. */
static long inflate_fixed(const unsigned char *z, size_t n, unsigned char *out, size_t cap) {
    int length_base[29], length_extra[29], distance_base[30], distance_extra[30];
    for (int c = 0; c < 29; c++) { /* RFC 1951 3.2.5, from the rule behind its table */
        length_extra[c] = c < 8 || c == 28 ? 0 : (c - 4) / 4;
        length_base[c] = c == 0 ? 3 : c == 28 ? 258 : length_base[c - 1] + (1 << length_extra[c - 1]);
    }
    for (int d = 0; d < 30; d++) {
        distance_extra[d] = d < 4 ? 0 : d / 2 - 1;
        distance_base[d] = d == 0 ? 1 : distance_base[d - 1] + (1 << distance_extra[d - 1]);
    }
    if (n < 6 || (z[0] & 0x0f) != 8 || (z[0] * 256 + z[1]) % 31 != 0 || (z[1] & 0x20)) return -1;
    BitReader b = {z + 2, n - 6, 0, false};
    size_t len = 0;
    bool final = false;
    while (!final && !b.bad) {
        final = read_bits(&b, 1);
        if (read_bits(&b, 2) != 1) return -1;
        for (int symbol; (symbol = fixed_symbol(&b)) != 256;) {
            if (symbol < 0 || symbol > 285 || b.bad) return -1;
            if (symbol < 256) {
                if (len == cap) return -1;
                out[len++] = (unsigned char)symbol;
                continue;
            }
            int l = symbol - 257, length = length_base[l] + (int)read_bits(&b, length_extra[l]);
            uint32_t d = 0;
            for (int i = 0; i < 5; i++) d = d << 1 | read_bits(&b, 1);
            if (d > 29) return -1;
            size_t distance = (size_t)distance_base[d] + read_bits(&b, distance_extra[d]);
            if (distance > len || (size_t)length > cap - len) return -1;
            for (int i = 0; i < length; i++, len++) out[len] = out[len - distance];
        }
    }
    if (b.bad || (b.pos + 7) / 8 != n - 6) return -1; /* the Adler-32 follows the last byte */
    return be32(z + n - 4) == slow_adler32(out, len) ? (long)len : -1;
}

/* The rows of `raw` (filter byte, then 3 * width bytes) reversed into pixels as the PNG
 * specification defines each filter; false for an unknown filter type. */
static bool unfilter(unsigned char *raw, int width, int height, unsigned char *rgb) {
    size_t row = (size_t)width * 3;
    for (int y = 0; y < height; y++) {
        const unsigned char *in = raw + (size_t)y * (row + 1) + 1;
        unsigned char *out = rgb + (size_t)y * row, *up = y ? out - row : NULL;
        int type = in[-1];
        if (type > 4) return false;
        for (size_t i = 0; i < row; i++) {
            int a = i >= 3 ? out[i - 3] : 0, b = up ? up[i] : 0, c = up && i >= 3 ? up[i - 3] : 0;
            int p = a + b - c, pa = abs(p - a), pb = abs(p - b), pc = abs(p - c);
            int paeth = pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
            int predicted = type == 0 ? 0 : type == 1 ? a : type == 2 ? b : type == 3 ? (a + b) / 2 : paeth;
            out[i] = (unsigned char)(in[i] + predicted);
        }
    }
    return true;
}

/* The golden: zlib's own fixed-Huffman stream (tools/golden_deflate.py) of a pattern made here
 * too, so the inflater that checks png_write is itself checked against zlib. */
static void test_inflate_golden(void) {
    enum { N = 100000 };
    unsigned char *want = malloc(N), *got = malloc(N + 1);
    uint32_t x = 12345;
    for (int i = 0; i < N; i++) {
        if (i < 20000) {
            x = (x * 1103515245u + 12345u) & 0x7fffffffu;
            want[i] = (unsigned char)(x >> 16 & 255);
        } else {
            want[i] = i < 50000 ? (unsigned char)(i / 7 % 251) : i < 80000 ? 0 : want[i - 31000] ^ (i % 1000 == 0);
        }
    }
    size_t size = 0;
    unsigned char *z = read_bytes("tests/golden/deflate_fixed.z", &size);
    CHECK(z != NULL, "read tests/golden/deflate_fixed.z");
    long len = z ? inflate_fixed(z, size, got, N + 1) : -1;
    CHECK(len == N && !memcmp(got, want, N), "the test inflater reads zlib's fixed-Huffman stream "
          "(%zu bytes) back to the %d bytes it was made from (got %ld)", size, N, len);
    if (z) { /* a flipped bit in the data fails it */
        z[size / 2] ^= 0x10;
        len = inflate_fixed(z, size, got, N + 1);
        CHECK(len < 0 || memcmp(got, want, N), "the test inflater notices a flipped bit");
    }
    free(z);
    free(want);
    free(got);
}

/* Checks signature, chunk CRCs, IHDR, the zlib stream in the IDAT chunks (inflated by the
 * simple inflater above, Adler-32 checked) and that its filtered scanlines give back img.
 * Reports each failure; returns whether all passed. */
static bool verify_png(const char *path, const Image *img, size_t *file_size) {
    size_t size = 0, pos = 8, idat_len = 0, chunks = 0, bad_crc = 0;
    unsigned char *png = read_bytes(path, &size);
    unsigned char *idat = malloc(size + 1);
    bool ok = png && size > 8 && !memcmp(png, "\x89PNG\r\n\x1a\n", 8), ihdr_ok = false, iend_last = false;
    CHECK(ok, "%s: PNG signature", path);
    while (ok && pos + 12 <= size) {
        uint32_t len = be32(png + pos);
        if (len > size - pos - 12) break;
        const unsigned char *type = png + pos + 4, *data = png + pos + 8;
        bad_crc += slow_crc32(type, 4 + (size_t)len) != be32(data + len);
        if (chunks == 0)
            ihdr_ok = !memcmp(type, "IHDR", 4) && len == 13 && be32(data) == (uint32_t)img->width &&
                      be32(data + 4) == (uint32_t)img->height && data[8] == 8 && data[9] == 2 && !data[10] && !data[11] &&
                      !data[12];
        if (!memcmp(type, "IDAT", 4)) {
            memcpy(idat + idat_len, data, len);
            idat_len += len;
        }
        iend_last = !memcmp(type, "IEND", 4) && len == 0 && pos + 12 == size;
        pos += 12 + (size_t)len;
        chunks++;
    }
    CHECK(ok && bad_crc == 0 && chunks >= 3, "%s: %zu chunks, all CRCs right", path, chunks);
    CHECK(ihdr_ok, "%s: IHDR first, 8-bit RGB, %dx%d", path, img->width, img->height);
    CHECK(iend_last, "%s: IEND last", path);

    size_t row = (size_t)img->width * 3, raw_cap = (size_t)img->height * (row + 1);
    unsigned char *raw = malloc(raw_cap + 1), *rgb = malloc(raw_cap);
    long raw_len = inflate_fixed(idat, idat_len, raw, raw_cap + 1);
    CHECK(raw_len >= 0, "%s: a zlib stream of fixed-Huffman blocks, Adler-32 right", path);
    bool pixels = raw_len == (long)raw_cap && unfilter(raw, img->width, img->height, rgb) &&
                  !memcmp(rgb, img->rgb, (size_t)img->height * row);
    CHECK(pixels, "%s: the unfiltered scanlines hold the image", path);
    if (file_size) *file_size = size;
    free(rgb);
    free(raw);
    free(idat);
    free(png);
    return ok && bad_crc == 0 && ihdr_ok && iend_last && pixels;
}

/* A picture like the demo's: flat blocks of a few colours, each pixel repeated scale x scale. */
static void fill_blocks(Image *img, int scale) {
    for (int y = 0; y < img->height; y++)
        for (int x = 0; x < img->width; x++)
            for (int k = 0; k < 3; k++)
                img->rgb[((size_t)y * img->width + x) * 3 + k] =
                    (unsigned char)((x / scale / 5 + y / scale / 3) % 4 * 60 + k * 20);
}

/* Noise no filter or match can shrink: the fixed code's 9-bit literals, stream longer than
 * the image. */
static void fill_noise(Image *img) {
    uint32_t x = 7;
    for (size_t i = 0; i < (size_t)img->width * img->height * 3; i++) {
        x = x * 1664525u + 1013904223u;
        img->rgb[i] = (unsigned char)(x >> 24);
    }
}

/* bytes as the file dir/name; its path (to free). */
static char *write_named(const char *dir, const char *name, const void *bytes, size_t n) {
    char *path = join(dir, name);
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(bytes, 1, n, f);
        fclose(f);
    }
    return path;
}

/* png_write_text and png_read_text: the text back, the image still valid; absent keys and text
 * chunks give NULL; hostile files give errors, never a read past their end. */
static void test_png_text(const char *dir) {
    Image img;
    Error e = {{0}};
    char *path = join(dir, "text.png"), *text = NULL;
    const char *said = "prompt: a fox \xc3\xa9\nseed: 42\n";
    if (image_alloc(&img, 5, 3, &e)) return;
    fill_pattern(&img);
    CHECK(png_write_text(path, &img, "parameters", said, &e) == 0 && verify_png(path, &img, NULL),
          "png_write_text writes a valid PNG: %s", e.msg);
    CHECK(png_read_text(path, "parameters", &text, &e) == 0 && text && !strcmp(text, said),
          "png_read_text gives the text back: %s", text ? text : e.msg);
    free(text);
    CHECK(png_read_text(path, "other", &text, &e) == 0 && !text, "another key: none");
    CHECK(png_write(path, &img, &e) == 0 && png_read_text(path, "parameters", &text, &e) == 0 &&
              !text, "a PNG without text: none");
    CHECK(png_write_text(path, &img, "", "x", &e) != 0, "an empty key is refused");
    image_free(&img);
    /* hand-made files: the signature, then one chunk header whose length runs past the end */
    static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    unsigned char bad[8 + 12 + 4];
    memcpy(bad, sig, 8);
    memcpy(bad + 8, "\x7f\xff\xff\xf0iTXtparameters", 20 - 4);
    char *hostile = write_named(dir, "hostile.png", bad, 8 + 12);
    CHECK(png_read_text(hostile, "parameters", &text, &e) != 0 && !text &&
              contains(e.msg, "runs past the end"),
          "a chunk longer than the file is an error: %s", e.msg);
    unlink(hostile);
    free(hostile);
    char *cut = write_named(dir, "cut.png", sig, 8);
    CHECK(png_read_text(cut, "parameters", &text, &e) != 0 && contains(e.msg, "truncated"),
          "a PNG that ends after its signature is an error: %s", e.msg);
    unlink(cut);
    free(cut);
    char *ppm = write_named(dir, "not.png", "P6\n1 1\n255\nabc", 14);
    CHECK(png_read_text(ppm, "parameters", &text, &e) != 0 && contains(e.msg, "not a PNG"),
          "a file without the PNG signature is an error: %s", e.msg);
    unlink(ppm);
    free(ppm);
    /* an iTXt with a compressed text, and one whose fields run out: skipped, not misread */
    unsigned char skip[8 + 3 * 12 + 40];
    size_t n = 8;
    memcpy(skip, sig, 8);
    const struct {
        const char *data;
        uint32_t len;
    } chunks[] = {{"parameters\0\1\0\0\0zz", 17}, {"parameters\0\0\0ab", 15}};
    for (int c = 0; c < 2; c++) {
        unsigned char len[4] = {0, 0, 0, (unsigned char)chunks[c].len};
        memcpy(skip + n, len, 4);
        memcpy(skip + n + 4, "iTXt", 4);
        memcpy(skip + n + 8, chunks[c].data, chunks[c].len);
        memset(skip + n + 8 + chunks[c].len, 0, 4); /* CRC, not checked */
        n += 12 + chunks[c].len;
    }
    memcpy(skip + n, "\0\0\0\0IEND\xae\x42\x60\x82", 12);
    char *odd = write_named(dir, "odd.png", skip, n + 12);
    CHECK(png_read_text(odd, "parameters", &text, &e) == 0 && !text,
          "compressed and malformed text chunks are skipped: %s", text ? text : "none");
    free(text);
    unlink(odd);
    free(odd);
    unlink(path);
    free(path);
}

static void test_png(const char *dir) {
    CHECK(slow_crc32((const unsigned char *)"123456789", 9) == 0xCBF43926u, "test CRC-32 check value");
    CHECK(slow_adler32((const unsigned char *)"Wikipedia", 9) == 0x11E60398u, "test Adler-32 check value");
    test_inflate_golden();
    /* 1x1, a small odd size, scanlines over several 64 KiB deflate segments and IDAT chunks,
     * and scanlines ending exactly at a segment's end (15 rows of 1 + 1456 * 3 bytes is 65535,
     * 1542 rows of 1 + 28 * 3 are 131082) */
    static const int sizes[][2] = {{1, 1}, {7, 5}, {300, 300}, {1456, 15}, {28, 1542}};
    char *path = join(dir, "img.png");
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        for (int kind = 0; kind < 3; kind++) {
            Image img;
            Error e = {{0}};
            if (image_alloc(&img, sizes[i][0], sizes[i][1], &e)) continue;
            if (kind == 0) fill_pattern(&img);
            if (kind == 1) fill_blocks(&img, 4);
            if (kind == 2) fill_noise(&img);
            CHECK(png_write(path, &img, &e) == 0, "png_write %dx%d (%s)", img.width, img.height, e.msg);
            verify_png(path, &img, NULL);
            image_free(&img);
        }
    }
    /* the demo's kind of picture compresses: a 1000x600 picture of 4x4 blocks */
    Image blocks;
    Error e = {{0}};
    size_t size = 0;
    if (image_alloc(&blocks, 1000, 600, &e) == 0) {
        fill_blocks(&blocks, 4);
        CHECK(png_write(path, &blocks, &e) == 0, "png_write 1000x600 blocks (%s)", e.msg);
        bool valid = verify_png(path, &blocks, &size);
        CHECK(valid && size < 1000 * 600 * 3 / 50,
              "a 1000x600 picture of 4x4 blocks takes %zu bytes, under 2%% of its 1800000", size);
        image_free(&blocks);
    }
    CHECK(dir_entries(dir) == 1, "png_write leaves no temporary file");
    Image none = {3, 0, NULL};
    CHECK(png_write(path, &none, &e) != 0 && contains(e.msg, "outside"), "png_write refuses height 0");
    remove(path);
    free(path);
    test_png_text(dir);
}

int main(void) {
    char tmp[] = "/tmp/diamond-test-io-XXXXXX";
    if (!mkdtemp(tmp)) {
        perror("mkdtemp");
        return 1;
    }
    test_conversion_edges();
    test_long_error();
    test_json_valid();
    test_json_invalid();
    test_json_lookups();
    test_golden();
    test_roundtrip(tmp);
    test_malformed(tmp);
    test_sharded(tmp);
    test_random_model();
    test_path_join();
    test_atomic(tmp);
    char *images = join(tmp, "images");
    mkdir(images, 0777);
    test_ppm(images);
    test_png(images);
    free(images);
    remove_tree(tmp);
    return harness_finish("test_io");
}
