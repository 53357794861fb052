/* fuzz_tokenizer.c - libFuzzer target for the tokenizer. The first byte picks what the rest is:
 *   even: a tokenizer.json. A parse that fails must leave nothing behind; one that succeeds must
 *         encode a fixed text to ids within its vocabulary.
 *   odd:  a prompt for Qwen3's real tokenizer (tests/fixtures/qwen3-tokenizer, loaded once, run
 *         from the repository root). Invalid UTF-8 must be refused, anything else encoded to
 *         ids within the vocabulary; NFC must be idempotent. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../io.h"

static void check_ids(const Tokenizer *t, const TokenIds *ids) {
    for (size_t i = 0; i < ids->count; i++)
        if (ids->ids[i] < 0 || ids->ids[i] >= tokenizer_vocab_size(t)) __builtin_trap();
}

static void fuzz_json(const uint8_t *data, size_t size) {
    Tokenizer *t = NULL;
    Error e;
    if (tokenizer_from_json(&t, (const char *)data, size, "fuzz.json", &e) != 0) {
        if (t) __builtin_trap();
        return;
    }
    const char *text = "Hello, world! It's 2026 <|im_end|>\n\t caf\xc3\xa9";
    TokenIds ids = {0};
    if (tokenizer_encode(t, text, strlen(text), &ids, &e) == 0) check_ids(t, &ids);
    token_ids_free(&ids);
    tokenizer_free(t);
}

static void fuzz_prompt(const uint8_t *data, size_t size) {
    static Tokenizer *qwen3;
    Error e;
    if (!qwen3 && tokenizer_load(&qwen3, "tests/fixtures/qwen3-tokenizer", &e) != 0) {
        fprintf(stderr, "fuzz_tokenizer: %s (run from the repository root)\n", e.msg);
        abort();
    }
    TokenIds ids = {0};
    int rc = tokenizer_encode(qwen3, (const char *)data, size, &ids, &e);
    char *once = NULL, *twice = NULL;
    size_t n1 = 0, n2 = 0;
    int nfc = utf8_nfc((const char *)data, size, &once, &n1, &e);
    if ((rc == 0) != (nfc == 0)) __builtin_trap(); /* both refuse exactly invalid UTF-8 */
    if (rc == 0) {
        check_ids(qwen3, &ids);
        if (utf8_nfc(once, n1, &twice, &n2, &e) != 0 || n1 != n2 || memcmp(once, twice, n1))
            __builtin_trap();
    }
    free(once);
    free(twice);
    token_ids_free(&ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    if (data[0] & 1) fuzz_prompt(data + 1, size - 1);
    else fuzz_json(data + 1, size - 1);
    return 0;
}
