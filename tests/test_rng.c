/* test_rng.c - PyTorch's CPU generator (mt19937 and torch.randn) against
 * tests/golden/rng.safetensors, written by tools/golden_rng.py from torch 1.13.
 *
 * Every comparison is bit for bit: the goal is the exact latent torch draws for a seed. The
 * golden file comes from torch's AVX2 normal kernel (see the caveat in the script). */
#include "../tensor.h"
#include "harness.h"

#define GOLDEN_PATH "tests/golden/rng.safetensors"

/* Passes when got and want hold the same float bits; reports the first difference. */
static void check_bits(const char *what, const float *got, const float *want, size_t n) {
    size_t bad = 0, first = 0;
    for (size_t i = 0; i < n; i++) {
        if (memcmp(&got[i], &want[i], sizeof got[i]) != 0 && bad++ == 0) first = i;
    }
    CHECK(bad == 0, "%s: %zu values, %zu differ in any bit", what, n, bad);
    if (bad) printf("        first at [%zu]: got %.9g want %.9g\n", first, got[first], want[first]);
}

/* int64 random_() keeps random64() % 2^63, so of each pair of draws the file has the first
 * without its top bit and the second whole. */
static void test_mt19937(const SafeTensors *st, uint64_t seed) {
    enum { DRAWS = 1400 };
    char name[64];
    snprintf(name, sizeof name, "mt.%llu.hi", (unsigned long long)seed);
    float *hi = golden_load(st, name, DRAWS);
    snprintf(name, sizeof name, "mt.%llu.lo", (unsigned long long)seed);
    float *lo = golden_load(st, name, DRAWS);
    if (hi && lo) {
        TorchGenerator g;
        torch_generator_seed(&g, seed);
        int bad = 0;
        for (int i = 0; i < DRAWS; i++) {
            uint32_t got = torch_generator_random(&g);
            if (i % 2 == 0) got &= 0x7fffffffu;
            uint32_t want = ((uint32_t)hi[i] << 16) | (uint32_t)lo[i];
            bad += got != want;
        }
        CHECK(bad == 0, "mt19937 seed %llu: %d of %d draws differ", (unsigned long long)seed, bad,
              DRAWS);
    }
    free(hi);
    free(lo);
}

static void test_randn_small(const SafeTensors *st, size_t n) {
    char name[64];
    snprintf(name, sizeof name, "randn.%zu", n);
    float *want = golden_load(st, name, n);
    float *got = malloc(n * sizeof *got);
    if (want && got) {
        TorchGenerator g;
        torch_generator_seed(&g, 1234);
        torch_randn(&g, got, n);
        check_bits(name, got, want, n);
    }
    free(want);
    free(got);
}

/* The golden script's checksum of every value's bits (mod 2^31 - 1, so it fits in int64 there). */
static uint32_t bits_checksum(const float *x, size_t n) {
    const uint64_t p = 2147483647u;
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &x[i], sizeof bits);
        sum = (sum + (uint64_t)bits * (i % 65521 + 1) % p) % p;
    }
    return (uint32_t)sum;
}

/* Big tensors: the file keeps the first and last 64 values and a checksum of all the bits. */
static void test_randn_big(const SafeTensors *st, size_t n) {
    char name[64];
    float *got = malloc(n * sizeof *got);
    snprintf(name, sizeof name, "randn.%zu.head", n);
    float *head = golden_load(st, name, 64);
    snprintf(name, sizeof name, "randn.%zu.tail", n);
    float *tail = golden_load(st, name, 64);
    snprintf(name, sizeof name, "randn.%zu.check", n);
    float *check = golden_load(st, name, 2);
    if (got && head && tail && check) {
        TorchGenerator g;
        torch_generator_seed(&g, 1234);
        torch_randn(&g, got, n);
        snprintf(name, sizeof name, "randn.%zu.head", n);
        check_bits(name, got, head, 64);
        snprintf(name, sizeof name, "randn.%zu.tail", n);
        check_bits(name, got + n - 64, tail, 64);
        uint32_t want = ((uint32_t)check[0] << 16) | (uint32_t)check[1];
        uint32_t have = bits_checksum(got, n);
        CHECK(have == want, "randn.%zu: checksum of all bits %u, torch's %u", n, have, want);
    }
    free(got);
    free(head);
    free(tail);
    free(check);
}

/* Successive calls continue one stream, including the cached second Box-Muller value that the
 * scalar path (n < 16) keeps between calls and the block path (n >= 16) leaves alone. */
static void test_sequence(const SafeTensors *st) {
    static const size_t sizes[] = {1, 1, 3, 17, 2, 16};
    TorchGenerator g;
    torch_generator_seed(&g, 7);
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        char name[32];
        snprintf(name, sizeof name, "seq.%zu", k);
        float *want = golden_load(st, name, sizes[k]);
        float got[32];
        torch_randn(&g, got, sizes[k]);
        if (want) check_bits(name, got, want, sizes[k]);
        free(want);
    }
}

/* manual_seed drops the cached Box-Muller value, so a reseeded generator starts afresh. */
static void test_reseed(const SafeTensors *st) {
    float *want = golden_load(st, "reseed", 3);
    TorchGenerator g;
    float got[3];
    torch_generator_seed(&g, 5);
    torch_randn(&g, got, 1);
    torch_generator_seed(&g, 5);
    torch_randn(&g, got, 3);
    if (want) check_bits("reseed", got, want, 3);
    free(want);
}

static void test_latent(const SafeTensors *st, int C, int h, int w, uint64_t seed) {
    char name[64];
    snprintf(name, sizeof name, "latent.%dx%dx%d", C, h, w);
    size_t n = (size_t)C * h * w;
    float *want = golden_load(st, name, n);
    float *got = malloc(n * sizeof *got);
    Error e = {{0}};
    if (want && got) {
        CHECK(latent_noise_tokens(seed, C, h, w, got, &e) == 0, "%s: %s", name, e.msg);
        check_bits(name, got, want, n);
    }
    free(want);
    free(got);
}

int main(void) {
    SafeTensors *st = golden_open(GOLDEN_PATH);
    if (!st) return harness_finish("test_rng");
    static const uint64_t seeds[] = {0, 1, 42, 4444, (UINT64_C(1) << 32) + 5, INT64_MAX};
    for (size_t i = 0; i < sizeof seeds / sizeof seeds[0]; i++) test_mt19937(st, seeds[i]);
    static const size_t small[] = {1, 2, 7, 15, 16, 17, 31, 32, 33, 1000};
    for (size_t i = 0; i < sizeof small / sizeof small[0]; i++) test_randn_small(st, small[i]);
    test_randn_big(st, 4096 * 3 + 5);
    test_randn_big(st, 128 * 64 * 64);
    test_sequence(st);
    test_reseed(st);
    test_latent(st, 128, 16, 16, 0);
    test_latent(st, 128, 3, 5, 42);
    test_latent(st, 16, 4, 6, 4444);
    test_latent(st, 128, 4, 4, (UINT64_C(1) << 32) + 5);
    st_close(st);
    return harness_finish("test_rng");
}
