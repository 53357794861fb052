/* test_world.c - the words world of io.h: the font, scenes, the corruptions and their masks,
 * and the oracle (clean renders read back, also noisy and blurred; corruptions flagged).
 *
 * The rates are measured over fixed seeds and printed; the thresholds the tests hold them to are
 * stated where they are checked. */
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../train/world.h"
#include "harness.h"

enum { PIXELS = WORLD_W * WORLD_H, BYTES = PIXELS * 3 };

/* ---- image degradations, as a small generative model's samples show them --------------------- */

/* Adds noise of standard deviation sigma (a sum of four uniforms: Gaussian-ish), clamped. */
static void add_noise(uint8_t *rgb, unsigned long long *state, double sigma) {
    for (int i = 0; i < BYTES; i++) {
        double n = 0;
        for (int k = 0; k < 4; k++) n += harness_rand(state);
        double v = rgb[i] + n * sigma / sqrt(4.0 / 3.0);
        rgb[i] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : lround(v));
    }
}

/* A 3x3 box blur, edges clamped. */
static void box_blur(uint8_t *rgb) {
    uint8_t src[BYTES];
    memcpy(src, rgb, sizeof src);
    for (int y = 0; y < WORLD_H; y++)
        for (int x = 0; x < WORLD_W; x++)
            for (int k = 0; k < 3; k++) {
                int sum = 0;
                for (int dy = -1; dy <= 1; dy++)
                    for (int dx = -1; dx <= 1; dx++) {
                        int yy = y + dy < 0 ? 0 : y + dy >= WORLD_H ? WORLD_H - 1 : y + dy;
                        int xx = x + dx < 0 ? 0 : x + dx >= WORLD_W ? WORLD_W - 1 : x + dx;
                        sum += src[(yy * WORLD_W + xx) * 3 + k];
                    }
                rgb[(y * WORLD_W + x) * 3 + k] = (uint8_t)((sum + 4) / 9);
            }
}

/* Colours a bit off: every channel ramps by -12 .. +12 levels from left to right. */
static void add_ramp(uint8_t *rgb) {
    for (int y = 0; y < WORLD_H; y++)
        for (int x = 0; x < WORLD_W; x++)
            for (int k = 0; k < 3; k++) {
                int v = rgb[(y * WORLD_W + x) * 3 + k] + (24 * x) / (WORLD_W - 1) - 12;
                rgb[(y * WORLD_W + x) * 3 + k] = (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
}

static bool contains(const char *s, const char *needle) {
    return strstr(s, needle) != NULL;
}

static int popcount8(unsigned v) {
    int n = 0;
    for (; v; v &= v - 1) n++;
    return n;
}

/* ---- the font -------------------------------------------------------------------------------- */

static void test_font(void) {
    uint8_t rows[WORLD_SYMBOLS][WORLD_FONT_H], lower[WORLD_FONT_H];
    int bad = 0, empty = 0;
    for (int k = 0; k < WORLD_SYMBOLS; k++) {
        char c = WORLD_ALPHABET[k];
        bad += world_glyph_rows(c, rows[k]) != 0;
        int ink = 0;
        for (int r = 0; r < WORLD_FONT_H; r++) ink += popcount8(rows[k][r]);
        empty += ink < 5;
        if (c >= 'A' && c <= 'Z') {
            bad += world_glyph_rows((char)(c - 'A' + 'a'), lower) != 0;
            bad += memcmp(lower, rows[k], sizeof lower) != 0;
        }
    }
    CHECK(bad == 0 && empty == 0, "font: all %d symbols have rows (either case), none nearly empty",
          WORLD_SYMBOLS);
    CHECK(world_glyph_rows('-', lower) == -1 && world_glyph_rows('\0', lower) == -1 &&
              world_glyph_rows(' ', lower) == -1,
          "font: characters outside the alphabet have no rows");
    int closest = WORLD_FONT_W * WORLD_FONT_H, pair_a = 0, pair_b = 0;
    for (int a = 0; a < WORLD_SYMBOLS; a++)
        for (int b = a + 1; b < WORLD_SYMBOLS; b++) {
            int d = 0;
            for (int r = 0; r < WORLD_FONT_H; r++) d += popcount8(rows[a][r] ^ rows[b][r]);
            if (d < closest) {
                closest = d;
                pair_a = a;
                pair_b = b;
            }
        }
    /* I and T differ in 4 (the bars); the oracle's margins below say how far apart they look */
    CHECK(closest >= 4, "font: every two symbols differ in >= 4 cells (closest: %c %c, %d)",
          WORLD_ALPHABET[pair_a], WORLD_ALPHABET[pair_b], closest);
}

/* ---- scenes ---------------------------------------------------------------------------------- */

static double luminance(const uint8_t c[3]) {
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
}

/* What world_scene promises: a word of the alphabet, contrast, scale, boxes inside the margin,
 * the spacing, and a render of exactly the font's cells in two colours. */
static void test_scenes(void) {
    enum { SEEDS = 500, MARGIN = 2 };
    int bad_word = 0, bad_colour = 0, bad_box = 0, bad_render = 0, off_centre = 0,
        lengths[WORLD_WORD_MAX + 1] = {0};
    Error e = {{0}};
    for (uint64_t seed = 0; seed < SEEDS; seed++) {
        WorldScene s;
        if (world_scene(seed, NULL, &s, &e) != 0) {
            bad_word++;
            continue;
        }
        lengths[s.length]++;
        bad_word +=
            (int)strlen(s.word) != s.length || strspn(s.word, WORLD_ALPHABET) != strlen(s.word);
        bad_colour += fabs(luminance(s.ink) - luminance(s.background)) < WORLD_MIN_CONTRAST * 255.0;
        /* centred (within the rounding): each glyph and its spacing then fill two 8-pixel token
         * columns, the box 3 pixels into the first, whatever the word's length */
        int word_w = s.glyph[s.length - 1].x + s.glyph[s.length - 1].w - s.glyph[0].x;
        off_centre += abs(2 * s.glyph[0].x + word_w - WORLD_W) > 1 ||
                      abs(2 * s.glyph[0].y + s.glyph[0].h - WORLD_H) > 1 || s.glyph[0].x % 8 != 3;
        for (int i = 0; i < s.length; i++) {
            WorldBox b = s.glyph[i];
            bad_box += b.x < MARGIN || b.y < MARGIN || b.x + b.w > WORLD_W - MARGIN ||
                       b.y + b.h > WORLD_H - MARGIN ||
                       b.w != WORLD_FONT_W * WORLD_SCALE_X || b.h != WORLD_FONT_H * WORLD_SCALE_Y;
            if (i > 0)
                bad_box += b.x != s.glyph[i - 1].x + s.glyph[i - 1].w + WORLD_SPACING ||
                           b.y != s.glyph[i - 1].y;
        }
        uint8_t rgb[BYTES], want[BYTES];
        world_render(&s, rgb);
        for (int p = 0; p < PIXELS; p++) memcpy(want + p * 3, s.background, 3);
        for (int i = 0; i < s.length; i++) {
            uint8_t rows[WORLD_FONT_H];
            world_glyph_rows(s.word[i], rows);
            for (int y = 0; y < s.glyph[i].h; y++)
                for (int x = 0; x < s.glyph[i].w; x++)
                    if (rows[y / s.scale_y] >> (WORLD_FONT_W - 1 - x / s.scale_x) & 1)
                        memcpy(want + ((s.glyph[i].y + y) * WORLD_W + s.glyph[i].x + x) * 3, s.ink,
                               3);
        }
        bad_render += memcmp(rgb, want, sizeof rgb) != 0;
    }
    CHECK(bad_word == 0, "scenes: %d seeds give words of the alphabet (%d bad)", SEEDS, bad_word);
    CHECK(bad_colour == 0, "scenes: luminance contrast >= %.2f of the range (%d short)",
          WORLD_MIN_CONTRAST, bad_colour);
    CHECK(bad_box == 0,
          "scenes: glyph boxes inside the %d px margin, %d px apart, at the scale (%d bad)",
          MARGIN, WORLD_SPACING, bad_box);
    CHECK(off_centre == 0, "scenes: words centred, glyphs at one place on the token grid (%d off)",
          off_centre);
    CHECK(bad_render == 0,
          "scenes: renders hold exactly the font's cells in two colours (%d differ)", bad_render);
    CHECK(lengths[2] > 100 && lengths[3] > 100 && lengths[4] > 100,
          "scenes: lengths 2/3/4 %d/%d/%d of %d", lengths[2], lengths[3], lengths[4], SEEDS);
}

static void test_words(void) {
    WorldScene s;
    Error e = {{0}};
    CHECK(world_scene(1, "ab12", &s, &e) == 0 && strcmp(s.word, "AB12") == 0 && s.length == 4,
          "words: lower case accepted and upper-cased ('ab12' -> '%s')", s.word);
    static const char *bad[] = {"A", "", "ABCDE", "AB-1", "A B", "\xc3\xa9T"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        e.msg[0] = '\0';
        int rc = world_scene(1, bad[i], &s, &e);
        CHECK(rc == -1 && contains(e.msg, bad[i]), "words: '%s' refused, naming it: %s", bad[i],
              e.msg);
    }
    WorldScene a, b;
    world_scene(7, "XY", &a, &e);
    world_scene(7, NULL, &b, &e);
    CHECK(memcmp(a.ink, b.ink, 3) == 0 && a.glyph[0].y == b.glyph[0].y,
          "words: a given word changes neither colours nor height of the seed's scene");
}

/* ---- determinism ----------------------------------------------------------------------------- */

static void test_determinism(void) {
    Error e = {{0}};
    int differ = 0, distinct = 0;
    for (uint64_t seed = 0; seed < 50; seed++) {
        WorldScene s1, s2, s3;
        uint8_t a[BYTES], b[BYTES], c[BYTES], ma[PIXELS], mb[PIXELS];
        WorldDamage da, db;
        world_scene(seed, NULL, &s1, &e);
        world_scene(seed, NULL, &s2, &e);
        world_scene(seed + 1000, NULL, &s3, &e);
        differ += memcmp(&s1, &s2, sizeof s1) != 0;
        world_render(&s1, a);
        world_render(&s3, c);
        distinct += memcmp(a, c, sizeof a) != 0;
        world_corrupt(seed, &s1, WORLD_CORRUPT_ANY, a, ma, &da, &e);
        world_corrupt(seed, &s2, WORLD_CORRUPT_ANY, b, mb, &db, &e);
        differ += memcmp(a, b, sizeof a) != 0 || memcmp(ma, mb, sizeof ma) != 0 ||
                  memcmp(&da, &db, sizeof da) != 0;
        OracleResult ra, rb;
        oracle_read(a, WORLD_W, WORLD_H, &ra, &e);
        oracle_read(b, WORLD_W, WORLD_H, &rb, &e);
        differ += memcmp(&ra, &rb, sizeof ra) != 0;
    }
    CHECK(differ == 0,
          "determinism: same seed, same scene, render, corruption, mask and reading (%d differ)",
          differ);
    CHECK(distinct == 50, "determinism: other seeds give other renders (%d of 50)", distinct);
}

/* ---- the oracle on clean renders ------------------------------------------------------------- */

/* Every symbol at both heights the oracle matches (the world's, and squashed to scale_y 2),
 * inside a word, read back; the least margin to the next best symbol, sharp and blurred, is the
 * font's separation as the oracle sees it. */
static void test_every_symbol(void) {
    Error e = {{0}};
    int misread = 0, read = 0;
    double margin_sharp = 1, margin_blurred = 1;
    char worst_sharp = '?', worst_blurred = '?';
    for (int k = 0; k < WORLD_SYMBOLS; k++)
        for (int scale = ORACLE_SCALE_Y_MIN; scale <= ORACLE_SCALE_Y_MAX; scale++) {
            char word[3] = {WORLD_ALPHABET[k], WORLD_ALPHABET[(k + scale) % WORLD_SYMBOLS], '\0'};
            WorldScene s;
            uint8_t rgb[BYTES];
            world_scene((uint64_t)(k * 8 + scale), word, &s, &e);
            s.scale_y = scale;
            for (int i = 0; i < s.length; i++) s.glyph[i].h = WORLD_FONT_H * scale;
            for (int blurred = 0; blurred <= 1; blurred++) {
                world_render(&s, rgb);
                if (blurred) box_blur(rgb);
                OracleResult r;
                oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
                misread += !oracle_reads_as(&r, word);
                read++;
                double m = r.count ? r.glyph[0].second - r.glyph[0].score : 0;
                if (m < (blurred ? margin_blurred : margin_sharp)) {
                    *(blurred ? &margin_blurred : &margin_sharp) = m;
                    *(blurred ? &worst_blurred : &worst_sharp) = WORLD_ALPHABET[k];
                }
            }
        }
    CHECK(misread == 0,
          "oracle: every symbol at scale_y %d and %d, sharp and blurred, reads back (%d misread "
          "of %d)",
          ORACLE_SCALE_Y_MIN, ORACLE_SCALE_Y_MAX, misread, read);
    printf("  oracle: least margin to the next symbol: sharp %.3f (%c), blurred %.3f (%c)\n",
           margin_sharp, worst_sharp, margin_blurred, worst_blurred);
    CHECK(margin_sharp >= 2 * ORACLE_MARGIN_MIN && margin_blurred >= ORACLE_MARGIN_MIN + 0.04,
          "oracle: symbols separated by >= %.2f sharp (%.3f) and >= %.2f blurred (%.3f)",
          2 * ORACLE_MARGIN_MIN, margin_sharp, ORACLE_MARGIN_MIN + 0.04, margin_blurred);
}

enum { CLEAN, NOISY, BLURRED, NOISY_BLURRED, RAMPED, BLURRED_NOISY, LOOKS };
static const char *const look_names[LOOKS] = {
    "clean",           "noise (sigma 6)",   "3x3 box blur",
    "noise then blur", "ramp, noise, blur", "blur then noise",
};

static void test_clean_reads(void) {
    enum { SEEDS = 2000 };
    Error e = {{0}};
    int read[LOOKS] = {0}, first_miss[LOOKS];
    double worst[LOOKS] = {0};
    for (int v = 0; v < LOOKS; v++) first_miss[v] = -1;
    unsigned long long state = 12345;
    for (uint64_t seed = 0; seed < SEEDS; seed++) {
        WorldScene s;
        world_scene(100000 + seed, NULL, &s, &e);
        for (int v = 0; v < LOOKS; v++) {
            uint8_t rgb[BYTES];
            world_render(&s, rgb);
            if (v == RAMPED) add_ramp(rgb);
            if (v == NOISY || v == NOISY_BLURRED || v == RAMPED) add_noise(rgb, &state, 6.0);
            if (v == BLURRED || v == NOISY_BLURRED || v == RAMPED || v == BLURRED_NOISY)
                box_blur(rgb);
            if (v == BLURRED_NOISY) add_noise(rgb, &state, 6.0);
            OracleResult r;
            oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
            bool ok = oracle_reads_as(&r, s.word);
            read[v] += ok;
            if (!ok && first_miss[v] < 0) first_miss[v] = (int)seed;
            for (int i = 0; ok && i < r.count; i++) worst[v] = fmax(worst[v], r.glyph[i].score);
        }
    }
    for (int v = 0; v < LOOKS; v++)
        printf("  oracle: %-17s %4d / %d read (%.2f%%), worst distance read %.3f\n", look_names[v],
               read[v], SEEDS, 100.0 * read[v] / SEEDS, worst[v]);
    for (int v = CLEAN; v <= NOISY_BLURRED; v++)
        CHECK(read[v] == SEEDS,
              "oracle: %s renders of %d random scenes all read as their word (first miss: seed %d)",
              look_names[v], SEEDS, first_miss[v]);
    /* the harsher looks: colours off as well, or full-strength noise on 2 px strokes already
     * blurred to 2/3 of their contrast; what fails there is mostly a blurred diagonal (N, W, M)
     * cut off from its stems where noise joined the glyph to its neighbour */
    for (int v = RAMPED; v <= BLURRED_NOISY; v++)
        CHECK(read[v] >= SEEDS * 97 / 100, "oracle: %s renders read >= 97%% (%.2f%%)",
              look_names[v], 100.0 * read[v] / SEEDS);
}

static void test_blank_and_sizes(void) {
    Error e = {{0}};
    uint8_t rgb[BYTES];
    unsigned long long state = 99;
    bool none = true;
    for (int trial = 0; trial < 8; trial++) {
        uint8_t colour[3] = {(uint8_t)(trial * 37), (uint8_t)(255 - trial * 29),
                             (uint8_t)(trial * 91)};
        for (int p = 0; p < PIXELS; p++) memcpy(rgb + p * 3, colour, 3);
        if (trial % 2) add_noise(rgb, &state, 6.0);
        OracleResult r;
        int rc = oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
        none = none && rc == 0 && r.count == 0 && !r.all_legible && r.text[0] == '\0' &&
               !oracle_reads_as(&r, "AB");
    }
    CHECK(none, "oracle: blank images, plain and noisy, hold no glyphs and are not legible");
    OracleResult r;
    e.msg[0] = '\0';
    CHECK(oracle_read(rgb, WORLD_W - 1, WORLD_H, &r, &e) == -1 && contains(e.msg, "63x32"),
          "oracle: a 63x32 image refused: %s", e.msg);
    CHECK(oracle_read(rgb, WORLD_W, 2 * WORLD_H, &r, &e) == -1 && contains(e.msg, "64x64"),
          "oracle: a 64x64 image refused: %s", e.msg);
    CHECK(oracle_read(NULL, WORLD_W, WORLD_H, &r, &e) == -1, "oracle: no pixels refused: %s",
          e.msg);
    WorldScene s;
    world_scene(3, "AB", &s, &e);
    world_render(&s, rgb);
    oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
    CHECK(oracle_reads_as(&r, "AB") && oracle_reads_as(&r, "ab") && !oracle_reads_as(&r, "A") &&
              !oracle_reads_as(&r, "ABC") && !oracle_reads_as(&r, "AC") &&
              !oracle_reads_as(&r, NULL),
          "oracle: reads_as compares the whole word, ignoring case (read '%s')", r.text);
}

/* ---- corruptions ----------------------------------------------------------------------------- */

static void test_corruption_api(void) {
    bool names = true;
    for (int t = 0; t < WORLD_CORRUPTION_COUNT; t++) {
        names = names && world_corruption_name(t) && world_corruption_name(t)[0];
        for (int u = 0; u < t && names; u++)
            names = strcmp(world_corruption_name(t), world_corruption_name(u)) != 0;
    }
    CHECK(names && WORLD_CORRUPTION_COUNT == 6 && !world_corruption_name(-1) &&
              !world_corruption_name(WORLD_CORRUPTION_COUNT),
          "corruptions: %d types with distinct names, none outside the range",
          WORLD_CORRUPTION_COUNT);
    WorldScene s;
    Error e = {{0}};
    uint8_t rgb[BYTES], mask[PIXELS];
    world_scene(5, NULL, &s, &e);
    CHECK(world_corrupt(1, &s, WORLD_CORRUPTION_COUNT, rgb, mask, NULL, &e) == -1 &&
              contains(e.msg, "type 6"),
          "corruptions: an unknown type refused: %s", e.msg);
    WorldScene broken = s;
    broken.length = 0;
    CHECK(world_corrupt(1, &broken, 0, rgb, mask, NULL, &e) == -1 && contains(e.msg, "length"),
          "corruptions: a scene with no word refused: %s", e.msg);
    broken = s;
    broken.glyph[0].x = WORLD_W - 2;
    CHECK(world_corrupt(1, &broken, 0, rgb, mask, NULL, &e) == -1 && contains(e.msg, "box"),
          "corruptions: a glyph box off the image refused: %s", e.msg);
    int drawn[WORLD_CORRUPTION_COUNT] = {0}, twice = 0;
    for (uint64_t seed = 0; seed < 300; seed++) {
        WorldDamage d;
        world_corrupt(seed, &s, WORLD_CORRUPT_ANY, rgb, mask, &d, &e);
        drawn[d.type]++;
        twice += d.count == 2;
    }
    bool all = true;
    for (int t = 0; t < WORLD_CORRUPTION_COUNT; t++) all = all && drawn[t] > 20;
    CHECK(all && twice > 30 && twice < 120,
          "corruptions: drawn types all occur, two glyphs in %d of 300", twice);
}

/* The mask of one corruption: 0/1, and exactly the changed pixels dilated by one. Returns the
 * number of problems found. Changed pixels must also lie near the damaged glyphs: within their
 * box, one pixel either side, three above (a displaced part) and anywhere below (drips). */
static int mask_problems(const WorldScene *s, const uint8_t *clean, const uint8_t *rgb,
                         const uint8_t *mask, const WorldDamage *d) {
    int problems = 0, changed = 0, marked = 0;
    for (int y = 0; y < WORLD_H; y++)
        for (int x = 0; x < WORLD_W; x++) {
            int p = y * WORLD_W + x;
            bool differs = false, near = false;
            for (int k = 0; k < 3; k++)
                differs = differs || abs(clean[p * 3 + k] - rgb[p * 3 + k]) > 0;
            for (int ny = y - 1; ny <= y + 1; ny++)
                for (int nx = x - 1; nx <= x + 1; nx++)
                    if (nx >= 0 && nx < WORLD_W && ny >= 0 && ny < WORLD_H)
                        near = near || memcmp(clean + (ny * WORLD_W + nx) * 3,
                                              rgb + (ny * WORLD_W + nx) * 3, 3);
            changed += differs;
            marked += mask[p] != 0;
            problems += mask[p] > 1 || (differs && !mask[p]) || (mask[p] && !near);
            if (differs) {
                bool in_glyph = false;
                for (int i = 0; i < d->count; i++) {
                    WorldBox b = s->glyph[d->glyph[i]];
                    in_glyph = in_glyph || (x >= b.x - 1 && x <= b.x + b.w && y >= b.y - 3);
                }
                problems += !in_glyph;
            }
        }
    return problems + (changed == 0) + (marked == 0) + (changed != d->changed);
}

static void test_corruptions(void) {
    enum { SEEDS = 400 };
    Error e = {{0}};
    int total_flagged = 0;
    for (int t = 0; t < WORLD_CORRUPTION_COUNT; t++) {
        int flagged = 0, problems = 0, bad_damage = 0;
        long changed = 0;
        for (uint64_t seed = 0; seed < SEEDS; seed++) {
            WorldScene s;
            uint8_t clean[BYTES], rgb[BYTES], mask[PIXELS];
            WorldDamage d;
            world_scene(200000 + seed, NULL, &s, &e);
            world_render(&s, clean);
            if (world_corrupt(300000 + seed, &s, t, rgb, mask, &d, &e) != 0) {
                bad_damage++;
                continue;
            }
            bad_damage += d.type != t || d.count < 1 || d.count > 2 || d.glyph[0] < 0 ||
                          d.glyph[0] >= s.length ||
                          (d.count == 2 &&
                           (d.glyph[1] < 0 || d.glyph[1] >= s.length || d.glyph[1] == d.glyph[0]));
            if (bad_damage) continue;
            problems += mask_problems(&s, clean, rgb, mask, &d);
            changed += d.changed;
            OracleResult r;
            oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
            flagged += !oracle_reads_as(&r, s.word);
        }
        total_flagged += flagged;
        printf("  corruption %-14s flagged %5.1f%% of %d, %.1f pixels changed on average\n",
               world_corruption_name(t), 100.0 * flagged / SEEDS, SEEDS, (double)changed / SEEDS);
        CHECK(bad_damage == 0, "corruption %s: damage reports its type and glyphs (%d bad)",
              world_corruption_name(t), bad_damage);
        CHECK(problems == 0,
              "corruption %s: masks are 0/1, non-empty, the changed pixels dilated by one, "
              "changes within the damaged glyphs (%d problems)",
              world_corruption_name(t), problems);
        CHECK(flagged >= SEEDS * 85 / 100, "corruption %s: >= 85%% flagged by the oracle (%.1f%%)",
              world_corruption_name(t), 100.0 * flagged / SEEDS);
    }
    printf("  corruption all types     flagged %5.1f%%\n",
           100.0 * total_flagged / (SEEDS * WORLD_CORRUPTION_COUNT));
}

/* ---- the command: diamond world -------------------------------------------------------------- */

/* The exit status of `binary args` run with its output into log. */
static int run_command(const char *binary, const char *args, const char *log) {
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%s %s >%s 2>&1", binary, args, log);
    int status = system(cmd);
    return status != -1 && WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* diamond world writes the render, its corruption and the mask side by side, 4x; bad options
 * exit 2. */
/* oracle_artifact_mask: nothing on clean renders; on damaged ones exactly the illegible glyphs'
 * boxes grown by a pixel (inside the image), and the damage lies within them. */
static void test_artifact_mask(void) {
    int clean_marked = 0, count_wrong = 0, outside = 0, missed = 0, damaged = 0;
    for (uint64_t seed = 0; seed < 200; seed++) {
        WorldScene s;
        Error e = {{0}};
        uint8_t rgb[WORLD_H * WORLD_W * 3], mask[WORLD_H * WORLD_W], marked[WORLD_H * WORLD_W];
        OracleResult r;
        world_scene(seed + 5000, NULL, &s, &e);
        world_render(&s, rgb);
        oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
        clean_marked += oracle_artifact_mask(&r, marked) != 0 || memchr(marked, 1, sizeof marked);
        world_corrupt(seed, &s, WORLD_CORRUPT_ANY, rgb, mask, NULL, &e);
        oracle_read(rgb, WORLD_W, WORLD_H, &r, &e);
        int illegible = 0, n = oracle_artifact_mask(&r, marked);
        for (int i = 0; i < r.count; i++) illegible += !r.glyph[i].legible;
        count_wrong += n != illegible;
        for (int y = 0; y < WORLD_H; y++)
            for (int x = 0; x < WORLD_W; x++) {
                bool in = false;
                for (int i = 0; i < r.count; i++) {
                    WorldBox b = r.glyph[i].box;
                    if (b.h < 1) b.y = 0, b.h = WORLD_H;
                    in |= !r.glyph[i].legible && x >= b.x - 1 && x <= b.x + b.w && y >= b.y - 1 &&
                          y <= b.y + b.h;
                }
                outside += marked[y * WORLD_W + x] != in;
            }
        if (n == 0) continue;
        damaged++;
        /* a corrupted pixel, not a marked one: the damage should mostly be where the oracle
           failed to read */
        int hit = 0;
        for (int p = 0; p < WORLD_H * WORLD_W; p++) hit += mask[p] && marked[p];
        missed += hit == 0;
    }
    CHECK(clean_marked == 0, "clean renders: nothing marked (%d of 200 marked)", clean_marked);
    CHECK(count_wrong == 0, "the count returned is the illegible glyphs' (%d wrong)", count_wrong);
    CHECK(outside == 0, "marked = the illegible glyphs' boxes grown by a pixel (%d pixels off)",
          outside);
    CHECK(damaged > 150 && missed <= damaged / 10,
          "damaged renders: %d with an illegible glyph, %d of them marked away from the damage",
          damaged, missed);
}

static void test_cli(const char *argv0) {
    char binary[1024], file[512], dir[64] = "/tmp/test_world.XXXXXX", out[256], log[256],
        args[512];
    int named = harness_binary(argv0, file, sizeof file, binary, sizeof binary);
    if (named != 0 || access(file, X_OK) != 0 || !mkdtemp(dir)) {
        CHECK(0, "cli: %s is built and a temporary directory can be made", file);
        return;
    }
    snprintf(out, sizeof out, "%s/w.ppm", dir);
    snprintf(log, sizeof log, "%s/log", dir);
    snprintf(args, sizeof args, "world --word ab1 --seed 7 --corrupt --type melt -o %s", out);
    int rc = run_command(binary, args, log);
    Image img = {0};
    Error e = {{0}};
    bool read = rc == 0 && ppm_read(&img, out, &e) == 0;
    CHECK(read && img.width == (3 * (WORLD_W + 2) - 2) * 4 && img.height == WORLD_H * 4,
          "cli: diamond world --corrupt writes three panels 4x (exit %d, %dx%d)", rc, img.width,
          img.height);
    if (read) {
        WorldScene s;
        uint8_t want[3][BYTES], mask[PIXELS];
        world_scene(7, "AB1", &s, &e);
        world_render(&s, want[0]);
        world_corrupt(7, &s, WORLD_MELT, want[1], mask, NULL, &e);
        for (int p = 0; p < PIXELS; p++) memset(want[2] + p * 3, mask[p] ? 255 : 0, 3);
        int differ = 0;
        for (int panel = 0; panel < 3; panel++)
            for (int y = 0; y < img.height; y++)
                for (int x = 0; x < WORLD_W * 4; x++) {
                    const uint8_t *got =
                        img.rgb + ((size_t)y * img.width + panel * (WORLD_W + 2) * 4 + x) * 3;
                    differ += memcmp(got, want[panel] + ((y / 4) * WORLD_W + x / 4) * 3, 3) != 0;
                }
        CHECK(differ == 0,
              "cli: the panels are the render, its melt corruption and the mask (%d pixels differ)",
              differ);
    }
    image_free(&img);
    /* --list: a prompt CSV of the scenes' words */
    rc = run_command(binary, "world --list 3 --seed 40", log);
    FILE *f = fopen(log, "r");
    char listed[64] = {0}, want_list[64] = "prompt\n";
    if (f) {
        size_t n = fread(listed, 1, sizeof listed - 1, f);
        listed[n] = 0;
        fclose(f);
    }
    for (uint64_t k = 0; k < 3; k++) {
        WorldScene s;
        world_scene(40 + k, NULL, &s, &e);
        snprintf(want_list + strlen(want_list), sizeof want_list - strlen(want_list), "%s\n",
                 s.word);
    }
    CHECK(rc == 0 && !strcmp(listed, want_list),
          "cli: --list 3 prints the words of scenes 40..42: %s", listed);
    static const char *const bad[] = {
        "world -o %s/x.png --word A-B",
        "world --corrupt --type nope -o %s/x.png",
        "world --type melt -o %s/x.png",
        "world --seed -1 -o %s/x.png",
        "world --word AB -o %s/x.jpg",
        "world --word AB",
        "world --list 0",
        "world --list 3 -o %s/x.png",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        snprintf(args, sizeof args, bad[i], dir);
        rc = run_command(binary, args, log);
        CHECK(rc == 2, "cli: '%s' exits 2 (%d)", bad[i], rc);
    }
    char cleanup[128];
    snprintf(cleanup, sizeof cleanup, "rm -rf '%s'", dir);
    if (system(cleanup) != 0) printf("could not remove %s\n", dir);
}

int main(int argc, char **argv) {
    (void)argc;
    test_font();
    test_scenes();
    test_words();
    test_determinism();
    test_every_symbol();
    test_clean_reads();
    test_blank_and_sizes();
    test_corruption_api();
    test_corruptions();
    test_artifact_mask();
    test_cli(argv[0]);
    return harness_finish("test_world");
}
