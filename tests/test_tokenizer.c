/* test_tokenizer.c - the byte-level BPE tokenizer and NFC against independent references:
 *   - tests/golden/tokenizer.txt: ids of 1667 strings (ASCII, numbers, contractions in every case,
 *     punctuation, whitespace mixes, precomposed and decomposed accents, Greek ... emoji, the klein
 *     chat template, texts over 512 tokens) from the npm package @lenml/tokenizers (a port of
 *     transformers.js) over Qwen3's real tokenizer.json (tests/fixtures/qwen3-tokenizer), written
 *     by tools/golden_tokenizer.mjs;
 *   - tests/golden/nfc.txt: NFC cases of the Unicode consortium's NormalizationTest-15.0.0.txt
 *     (tools/golden_nfc.py);
 *   - the errors: invalid UTF-8, tokenizer files missing, of another model type, another
 *     pre-tokenizer, options we do not implement, merges naming unknown tokens. */
#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"

#define QWEN3_TOKENIZER "tests/fixtures/qwen3-tokenizer"

/* A line's hex field -> bytes into buf (NUL-terminated); its length, or -1 when malformed. */
static long hex_bytes(const char *hex, size_t n, char *buf, size_t size) {
    if (n % 2 || n / 2 >= size) return -1;
    for (size_t i = 0; i < n; i += 2) {
        unsigned v;
        if (sscanf(hex + i, "%2x", &v) != 1) return -1;
        buf[i / 2] = (char)v;
    }
    buf[n / 2] = '\0';
    return (long)(n / 2);
}

/* "id id id" -> ids; the count, or -1 when there are more than cap */
static long parse_ids(const char *s, int32_t *ids, long cap) {
    long n = 0;
    char *end;
    for (long v = strtol(s, &end, 10); end != s; v = strtol(s, &end, 10)) {
        if (n == cap) return -1;
        ids[n++] = (int32_t)v;
        s = end;
    }
    return n;
}

static void test_golden_ids(const Tokenizer *t) {
    FILE *f = fopen("tests/golden/tokenizer.txt", "r");
    CHECK(f != NULL, "open tests/golden/tokenizer.txt");
    if (!f) return;
    enum { LINE = 1 << 16, MAX_IDS = 8192 };
    char *line = malloc(LINE), *text = malloc(LINE);
    int32_t *want = malloc(MAX_IDS * sizeof *want);
    long cases = 0, wrong = 0, long_texts = 0;
    while (line && text && want && fgets(line, LINE, f)) {
        if (line[0] == '#') continue;
        char *tab = strchr(line, '\t');
        long len = tab ? hex_bytes(line, (size_t)(tab - line), text, LINE) : -1;
        long n = len >= 0 ? parse_ids(tab + 1, want, MAX_IDS) : -1;
        if (n < 0) {
            CHECK(0, "tokenizer.txt: malformed line %ld", cases + 1);
            break;
        }
        TokenIds got = {0};
        Error e = {{0}};
        bool same = tokenizer_encode(t, text, (size_t)len, &got, &e) == 0 &&
                    got.count == (size_t)n &&
                    (n == 0 || !memcmp(got.ids, want, (size_t)n * sizeof *want));
        if (!same && wrong++ < 5)
            printf("        case %ld (%ld bytes '%.40s'): got %zu ids, want %ld %s\n", cases + 1,
                   len, text, got.count, n, e.msg);
        long_texts += n > 512;
        token_ids_free(&got);
        cases++;
    }
    CHECK(cases >= 1000 && wrong == 0, "golden ids: %ld of %ld strings differ", wrong, cases);
    CHECK(long_texts >= 3, "golden ids: %ld texts over 512 tokens", long_texts);
    free(line);
    free(text);
    free(want);
    fclose(f);
}

/* "1E0A 0323" -> UTF-8 into buf; its length, or -1 */
static long code_points_utf8(const char *s, char *buf, size_t size) {
    size_t n = 0;
    char *end;
    for (unsigned long cp = strtoul(s, &end, 16); end != s; cp = strtoul(s, &end, 16)) {
        if (n + 4 >= size || cp > 0x10FFFF) return -1;
        if (cp < 0x80) buf[n++] = (char)cp;
        else if (cp < 0x800) buf[n++] = (char)(0xC0 | cp >> 6), buf[n++] = (char)(0x80 | (cp & 0x3F));
        else if (cp < 0x10000)
            buf[n++] = (char)(0xE0 | cp >> 12), buf[n++] = (char)(0x80 | (cp >> 6 & 0x3F)),
            buf[n++] = (char)(0x80 | (cp & 0x3F));
        else
            buf[n++] = (char)(0xF0 | cp >> 18), buf[n++] = (char)(0x80 | (cp >> 12 & 0x3F)),
            buf[n++] = (char)(0x80 | (cp >> 6 & 0x3F)), buf[n++] = (char)(0x80 | (cp & 0x3F));
        s = end;
    }
    buf[n] = '\0';
    return (long)n;
}

static void test_golden_nfc(void) {
    FILE *f = fopen("tests/golden/nfc.txt", "r");
    CHECK(f != NULL, "open tests/golden/nfc.txt");
    if (!f) return;
    char line[1024], source[512], want[512];
    long cases = 0, wrong = 0;
    while (fgets(line, sizeof line, f)) {
        char *semi = strchr(line, ';');
        if (line[0] == '#' || !semi) continue;
        *semi = '\0';
        long ns = code_points_utf8(line, source, sizeof source);
        long nw = code_points_utf8(semi + 1, want, sizeof want);
        char *got = NULL;
        size_t n = 0;
        Error e = {{0}};
        bool same = ns >= 0 && nw >= 0 && utf8_nfc(source, (size_t)ns, &got, &n, &e) == 0 &&
                    n == (size_t)nw && !memcmp(got, want, n);
        if (!same && wrong++ < 5) printf("        NFC(%s) differs\n", line);
        free(got);
        cases++;
    }
    fclose(f);
    CHECK(cases > 10000 && wrong == 0, "NFC: %ld of %ld NormalizationTest cases differ", wrong,
          cases);
}

/* Ids of a few strings checked by hand against the rules the goldens exercise at scale. */
static void test_rules(const Tokenizer *t) {
    const struct {
        const char *text;
        int n;
        int32_t ids[8];
    } cases[] = {
        {"", 0, {0}},
        {"a<|im_end|>b", 3, {64, 151645, 65}},     /* added tokens matched whole */
        {"e\xcc\x81", 1, {963}},                   /* e + combining acute: NFC gives U+00E9 */
        {"\xc3\xa9", 1, {963}},
        {"1234567", 7, {16, 17, 18, 19, 20, 21, 22}}, /* \p{N} takes one digit at a time */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        TokenIds ids = {0};
        Error e = {{0}};
        int rc = tokenizer_encode(t, cases[i].text, strlen(cases[i].text), &ids, &e);
        CHECK(rc == 0 && ids.count == (size_t)cases[i].n &&
                  (ids.count == 0 || !memcmp(ids.ids, cases[i].ids, ids.count * sizeof(int32_t))),
              "ids of '%s' (%zu ids) %s", cases[i].text, ids.count, e.msg);
        token_ids_free(&ids);
    }
    CHECK(tokenizer_pad_id(t) == 151643, "pad id %d (<|endoftext|>)", tokenizer_pad_id(t));
    CHECK(tokenizer_vocab_size(t) == 151669, "vocab size %d", tokenizer_vocab_size(t));
}

static void test_invalid_utf8(const Tokenizer *t) {
    const char *bad[] = {"\xff", "ab\xc3", "\xed\xa0\x80" /* a surrogate */, "\xc0\xaf" /* overlong */};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        TokenIds ids = {0};
        Error e = {{0}};
        int rc = tokenizer_encode(t, bad[i], strlen(bad[i]), &ids, &e);
        CHECK(rc == -1 && strstr(e.msg, "not valid UTF-8"), "invalid UTF-8 %zu refused: %s", i,
              e.msg);
        token_ids_free(&ids);
    }
}

/* A tokenizer directory of tokenizer_config.json and the given tokenizer.json text. */
static int write_tokenizer(const char *dir, const char *json) {
    char path[256];
    Error e = {{0}};
    if (mkdir(dir, 0755) && errno != EEXIST) return -1;
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    if (write_file_atomic(path, json, strlen(json), &e)) return -1;
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    const char *config = "{\"pad_token\": \"<|endoftext|>\"}";
    return write_file_atomic(path, config, strlen(config), &e);
}

#define PRE_TOKENIZER                                                                          \
    "\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", "   \
    "\"pattern\": {\"Regex\": \"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?"  \
    "\\\\p{L}+|\\\\p{N}| ?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|"           \
    "\\\\s+(?!\\\\S)|\\\\s+\"}, \"behavior\": \"Isolated\", \"invert\": false}, {\"type\": "     \
    "\"ByteLevel\", \"add_prefix_space\": false, \"use_regex\": false}]}"

static void test_refused(void) {
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/diamond-test-tokenizer-%d", (int)getpid());
    const struct {
        const char *json, *message;
    } cases[] = {
        {"{\"normalizer\": null, " PRE_TOKENIZER ", \"model\": {\"type\": \"WordPiece\", "
         "\"vocab\": {}}}", "model type 'WordPiece' is not supported"},
        {"{\"normalizer\": null, " PRE_TOKENIZER ", \"model\": {\"type\": \"Unigram\"}}",
         "model type 'Unigram' is not supported"},
        {"{\"normalizer\": {\"type\": \"NFKC\"}, " PRE_TOKENIZER ", \"model\": {}}",
         "normalizer is not"},
        {"{\"normalizer\": null, \"pre_tokenizer\": {\"type\": \"Whitespace\"}, \"model\": {}}",
         "pre_tokenizer is not Qwen2/Qwen3's"},
        {"{\"normalizer\": null, " PRE_TOKENIZER ", \"model\": {\"type\": \"BPE\", "
         "\"byte_fallback\": true, \"vocab\": {}, \"merges\": []}}", "model.byte_fallback is set"},
        {"{\"normalizer\": null, " PRE_TOKENIZER ", \"model\": {\"type\": \"BPE\", "
         "\"vocab\": {\"a\": 0}, \"merges\": []}}", "no entry for byte 0x00"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        Tokenizer *t = NULL;
        Error e = {{0}};
        int rc = write_tokenizer(dir, cases[i].json) ? 0 : tokenizer_load(&t, dir, &e);
        CHECK(rc == -1 && !t && strstr(e.msg, cases[i].message), "refused: want '%s', got '%s'",
              cases[i].message, e.msg);
        tokenizer_free(t);
    }
    Tokenizer *t = NULL;
    Error e = {{0}};
    CHECK(tokenizer_load(&t, "/nonexistent-tokenizer", &e) == -1 && strstr(e.msg, "tokenizer.json"),
          "missing tokenizer.json: %s", e.msg);
    char path[128];
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    remove(path);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    remove(path);
    rmdir(dir);
}

/* Merges written as "a b" strings (older tokenizer.json files) rank and merge as [a, b] pairs:
 * tiny-klein's tokenizer both ways (tools/ref_qwen3.py), the same ids. */
static void test_merge_forms(void) {
    Tokenizer *pairs = NULL, *strings = NULL;
    Error e = {{0}};
    CHECK(tokenizer_load(&pairs, "tests/fixtures/tiny-klein/tokenizer", &e) == 0 &&
              tokenizer_load(&strings, "tests/fixtures/tiny-klein-tokenizer-string-merges", &e) == 0,
          "load both forms: %s", e.msg);
    const char *texts[] = {"the cat sat on the mat", "<|im_start|>user\nthe fox<|im_end|>\n",
                           "that  thing\tthere\r\n", "THE CAT's hat"};
    for (size_t i = 0; pairs && strings && i < sizeof texts / sizeof *texts; i++) {
        TokenIds a = {0}, b = {0};
        int rc = tokenizer_encode(pairs, texts[i], strlen(texts[i]), &a, &e) ||
                 tokenizer_encode(strings, texts[i], strlen(texts[i]), &b, &e);
        CHECK(rc == 0 && a.count == b.count && a.count < strlen(texts[i]) &&
                  !memcmp(a.ids, b.ids, a.count * sizeof *a.ids),
              "'%s': %zu ids both ways, fewer than its bytes (merges applied)", texts[i], a.count);
        token_ids_free(&a);
        token_ids_free(&b);
    }
    tokenizer_free(pairs);
    tokenizer_free(strings);
}

int main(void) {
    Tokenizer *t = NULL;
    Error e = {{0}};
    CHECK(tokenizer_load(&t, QWEN3_TOKENIZER, &e) == 0, "load %s: %s", QWEN3_TOKENIZER, e.msg);
    if (t) {
        test_rules(t);
        test_golden_ids(t);
        test_invalid_utf8(t);
    }
    tokenizer_free(t);
    test_golden_nfc();
    test_merge_forms();
    test_refused();
    return harness_finish("test_tokenizer");
}
