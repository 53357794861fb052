/* vae_peak.c - peak memory and time of one VAE decode forward + backward to the tokens.
 *
 *   /usr/bin/python3 tools/ref_vae.py --real-random /tmp/vae-real   (real config, random bf16)
 *   make build/libdiamond.a
 *   cc -O3 -march=native -fopenmp -std=c11 -D_DEFAULT_SOURCE tools/vae_peak.c \
 *       build/libdiamond.a -lm -o build/vae_peak
 *   ./build/vae_peak /tmp/vae-real 256 [plain]
 *
 * Prints the tape's own peak (values + saved data + gradients) and the process's peak RSS
 * (getrusage), which adds the f32 weights and the allocator's slack. `plain` turns the block
 * checkpoints off, for comparison. Not part of `make test`. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "../nn.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double peak_rss_mb(void) {
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)u.ru_maxrss / 1024.0; /* kilobytes on Linux */
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s VAE_DIR IMAGE_SIDE [plain]\n", argv[0]);
        return 2;
    }
    Error e = {{0}};
    VaeDecoder *m = NULL;
    if (vae_decoder_open(&m, argv[1], WEIGHTS_FILES, 0, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        return 1;
    }
    bool checkpoint = !(argc > 3 && !strcmp(argv[3], "plain"));
    vae_decoder_set_checkpoint_levels(m, checkpoint ? VAE_CHECKPOINT_LEVELS : 0);
    const VaeConfig *c = vae_decoder_config(m);
    int side = atoi(argv[2]), down = c->patch_h << (c->n_blocks - 1);
    int h = side / down, w = side / down, packed = c->latent_channels * c->patch_h * c->patch_w;
    double rss_model = peak_rss_mb();
    Tensor *tokens = TENSOR_NEW(1, (int64_t)h * w, packed);
    Tensor *r = TENSOR_NEW(1, c->out_channels, (int64_t)h * down, (int64_t)w * down);
    if (!tokens || !r || h < 1) {
        fprintf(stderr, "bad size or out of memory\n");
        return 1;
    }
    unsigned long long s = 1;
    for (int64_t i = 0; i < tokens->numel; i++, s = s * 6364136223846793005ULL + 1)
        tokens->data[i] = (float)((s >> 40) & 0xFFFF) / 32768.0f - 1.0f;
    for (int64_t i = 0; i < r->numel; i++) r->data[i] = 1.0f / (float)r->numel;

    Tape *t = tape_new();
    Var *x = var_new(t, tokens, true);
    double t0 = now();
    Var *loss = ag_sum(t, ag_mul(t, vae_decode(t, m, x, h, w), var_new(t, r, false)));
    double t1 = now();
    size_t after_forward = tape_stats(t).value_bytes + tape_stats(t).saved_bytes;
    int rc = tape_check(t, &e) || tape_backward(t, loss, &e);
    double t2 = now();
    if (rc) fprintf(stderr, "%s\n", e.msg);
    printf("%dx%d image (%dx%d tokens), %s: forward %.1f s, backward %.1f s\n", side, side, h, w,
           checkpoint ? "checkpointed" : "plain", t1 - t0, t2 - t1);
    printf("tape: %.0f MB held after forward, peak %.0f MB; process peak RSS %.0f MB "
           "(%.0f MB after loading the weights)\n",
           after_forward / 1048576.0, tape_stats(t).peak_bytes / 1048576.0, peak_rss_mb(),
           rss_model);
    tape_free(t);
    tensor_free(tokens);
    tensor_free(r);
    vae_decoder_free(m);
    return rc ? 1 : 0;
}
