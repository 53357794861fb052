/* train/world.c - the words world of world.h: font, scenes, corruptions with their masks, and
 * the oracle.
 *
 * Contents: the font; randomness; scenes; drawing; corruptions; the oracle. */
#include "world.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

_Static_assert(WORLD_W <= 64, "the oracle keeps one image row in a uint64_t");
_Static_assert(sizeof WORLD_ALPHABET - 1 == WORLD_SYMBOLS, "WORLD_SYMBOLS counts WORLD_ALPHABET");
_Static_assert(WORLD_SCALE_Y >= ORACLE_SCALE_Y_MIN && WORLD_SCALE_Y <= ORACLE_SCALE_Y_MAX,
               "the oracle matches the world's glyph height");

/* === the font === */

/* The font, one string per row, '#' an ink cell, in WORLD_ALPHABET order. Look-alikes are drawn
 * apart: O is square while 0 is round with a diagonal, I has short bars while 1 has a flag and a
 * full base, S is round while 5 has a flat top and a square corner, 8 has an hourglass waist
 * while B has a straight spine, Z is flat on top while 2 is round. Every two symbols differ in
 * at least 4 cells, most in 5 or more (I and T in 4: their bars); tests/test_world.c checks it
 * and how far apart the oracle sees them. */
static const char world_font[WORLD_SYMBOLS][WORLD_FONT_H][WORLD_FONT_W + 1] = {
    {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"}, /* A */
    {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."}, /* B */
    {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."}, /* C */
    {"###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."}, /* D */
    {"#####", "#....", "#....", "####.", "#....", "#....", "#####"}, /* E */
    {"#####", "#....", "#....", "###..", "#....", "#....", "#...."}, /* F */
    {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"}, /* G */
    {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"}, /* H */
    {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."}, /* I */
    {"..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."}, /* J */
    {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"}, /* K */
    {"#....", "#....", "#....", "#....", "#....", "#....", "#####"}, /* L */
    {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"}, /* M */
    {"#...#", "##..#", "##..#", "#.#.#", "#..##", "#..##", "#...#"}, /* N */
    {"#####", "#...#", "#...#", "#...#", "#...#", "#...#", "#####"}, /* O */
    {"####.", "#...#", "####.", "#....", "#....", "#....", "#...."}, /* P */
    {".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"}, /* Q */
    {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"}, /* R */
    {".####", "#....", "#....", ".###.", "....#", "....#", "####."}, /* S */
    {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."}, /* T */
    {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."}, /* U */
    {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."}, /* V */
    {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "##.##", "#...#"}, /* W */
    {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"}, /* X */
    {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."}, /* Y */
    {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"}, /* Z */
    {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."}, /* 0 */
    {"..#..", ".##..", "#.#..", "..#..", "..#..", "..#..", "#####"}, /* 1 */
    {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"}, /* 2 */
    {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."}, /* 3 */
    {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."}, /* 4 */
    {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."}, /* 5 */
    {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."}, /* 6 */
    {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."}, /* 7 */
    {".###.", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", ".###."}, /* 8 */
    {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."}, /* 9 */
};

/* The index of c (either case) in WORLD_ALPHABET, or -1. */
static int world_symbol_index(char c) {
    if (c >= 'a' && c <= 'z') c = (char)(c - 'a' + 'A');
    const char *at = c ? strchr(WORLD_ALPHABET, c) : NULL;
    return at ? (int)(at - WORLD_ALPHABET) : -1;
}

static void world_font_rows(int symbol, uint8_t rows[WORLD_FONT_H]) {
    for (int r = 0; r < WORLD_FONT_H; r++) {
        rows[r] = 0;
        for (int c = 0; c < WORLD_FONT_W; c++)
            if (world_font[symbol][r][c] == '#') rows[r] |= (uint8_t)(1u << (WORLD_FONT_W - 1 - c));
    }
}

int world_glyph_rows(char c, uint8_t rows[WORLD_FONT_H]) {
    int symbol = world_symbol_index(c);
    if (symbol < 0) return -1;
    world_font_rows(symbol, rows);
    return 0;
}

/* === randomness: splitmix64, one generator per purpose, no global state === */

typedef struct WorldRng {
    uint64_t state;
} WorldRng;

/* Streams keep the draws for one purpose independent of how many another purpose made. */
enum { WORLD_STREAM_WORD = 1, WORLD_STREAM_COLOURS = 2, WORLD_STREAM_CORRUPT = 3 };

static WorldRng world_rng(uint64_t seed, uint64_t stream) {
    return (WorldRng){mix64(seed ^ mix64(stream))};
}

static uint64_t world_next(WorldRng *g) {
    g->state += 0x9E3779B97F4A7C15u;
    return mix64(g->state);
}

/* Uniform in 0 .. n-1 (multiply-shift: the bias is below 2^-32). */
static int world_below(WorldRng *g, int n) {
    return (int)(((world_next(g) >> 32) * (uint64_t)n) >> 32);
}

/* Uniform in lo .. hi, both included. */
static int world_between(WorldRng *g, int lo, int hi) {
    return lo + world_below(g, hi - lo + 1);
}

/* Uniform in [0, 1). */
static double world_unit(WorldRng *g) {
    return (double)(world_next(g) >> 11) / 9007199254740992.0;
}

/* === scenes === */

static double world_luminance(const uint8_t c[3]) {
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
}

static int world_set_word(WorldScene *s, const char *word, Error *e) {
    size_t n = strnlen(word, WORLD_WORD_MAX + 1);
    if (n < WORLD_WORD_MIN || n > WORLD_WORD_MAX)
        return error_set(e, "word '%.32s': %s than %d characters", word,
                         n < WORLD_WORD_MIN ? "shorter" : "longer",
                         n < WORLD_WORD_MIN ? WORLD_WORD_MIN : WORLD_WORD_MAX);
    for (size_t i = 0; i < n; i++) {
        int symbol = world_symbol_index(word[i]);
        if (symbol < 0)
            return error_set(e, "word '%s': character %zu ('%c') is not a letter or digit", word,
                             i + 1, word[i]);
        s->word[i] = WORLD_ALPHABET[symbol];
    }
    s->word[n] = '\0';
    s->length = (int)n;
    return 0;
}

static void world_draw_word(WorldRng *g, WorldScene *s) {
    s->length = world_between(g, WORLD_WORD_MIN, WORLD_WORD_MAX);
    for (int i = 0; i < s->length; i++) s->word[i] = WORLD_ALPHABET[world_below(g, WORLD_SYMBOLS)];
    s->word[s->length] = '\0';
}

/* Uniform colour pairs until one has the contrast; after 64 misses (rare: about half the pairs
 * have it) the text becomes black or white, whichever contrasts more. */
static void world_pick_colours(WorldRng *g, WorldScene *s) {
    for (int attempt = 0; attempt < 64; attempt++) {
        for (int k = 0; k < 3; k++) {
            s->background[k] = (uint8_t)world_below(g, 256);
            s->ink[k] = (uint8_t)world_below(g, 256);
        }
        if (fabs(world_luminance(s->background) - world_luminance(s->ink)) >=
            WORLD_MIN_CONTRAST * 255.0)
            return;
    }
    memset(s->ink, world_luminance(s->background) > 127.5 ? 0 : 255, sizeof s->ink);
}

/* The scale and the word's place: centred (rounded up and left). */
static void world_place(WorldScene *s) {
    s->scale_x = WORLD_SCALE_X;
    s->scale_y = WORLD_SCALE_Y;
    int glyph_w = WORLD_FONT_W * s->scale_x, glyph_h = WORLD_FONT_H * s->scale_y;
    int word_w = s->length * glyph_w + (s->length - 1) * WORLD_SPACING;
    int x0 = (WORLD_W - word_w) / 2, y0 = (WORLD_H - glyph_h) / 2;
    for (int i = 0; i < s->length; i++)
        s->glyph[i] = (WorldBox){x0 + i * (glyph_w + WORLD_SPACING), y0, glyph_w, glyph_h};
}

int world_scene(uint64_t seed, const char *word, WorldScene *out, Error *e) {
    memset(out, 0, sizeof *out);
    WorldRng word_rng = world_rng(seed, WORLD_STREAM_WORD),
             colours = world_rng(seed, WORLD_STREAM_COLOURS);
    if (word) {
        if (world_set_word(out, word, e)) return -1;
    } else {
        world_draw_word(&word_rng, out);
    }
    world_pick_colours(&colours, out);
    world_place(out);
    return 0;
}

/* === drawing === */

static void world_put(uint8_t *rgb, int x, int y, const uint8_t colour[3]) {
    if (x < 0 || x >= WORLD_W || y < 0 || y >= WORLD_H) return;
    memcpy(rgb + ((size_t)y * WORLD_W + (size_t)x) * 3, colour, 3);
}

static bool world_pixel_is(const uint8_t *rgb, int x, int y, const uint8_t colour[3]) {
    if (x < 0 || x >= WORLD_W || y < 0 || y >= WORLD_H) return false;
    return memcmp(rgb + ((size_t)y * WORLD_W + (size_t)x) * 3, colour, 3) == 0;
}

/* Symbol `symbol`'s ink cells as scale_x x scale_y blocks from (x, y), clipped to the image. */
static void world_draw_symbol(uint8_t *rgb, int symbol, int x, int y, int scale_x, int scale_y,
                              const uint8_t colour[3]) {
    uint8_t rows[WORLD_FONT_H];
    world_font_rows(symbol, rows);
    for (int r = 0; r < WORLD_FONT_H; r++)
        for (int c = 0; c < WORLD_FONT_W; c++) {
            if (!(rows[r] >> (WORLD_FONT_W - 1 - c) & 1)) continue;
            for (int py = 0; py < scale_y; py++)
                for (int px = 0; px < scale_x; px++)
                    world_put(rgb, x + c * scale_x + px, y + r * scale_y + py, colour);
        }
}

void world_render(const WorldScene *s, uint8_t *rgb) {
    for (int i = 0; i < WORLD_W * WORLD_H; i++) memcpy(rgb + (size_t)i * 3, s->background, 3);
    for (int i = 0; i < s->length; i++)
        world_draw_symbol(rgb, world_symbol_index(s->word[i]), s->glyph[i].x, s->glyph[i].y,
                          s->scale_x, s->scale_y, s->ink);
}

/* === corruptions === */

static const char *const world_corruption_names[WORLD_CORRUPTION_COUNT] = {
    "remove_stroke", "add_stroke", "blend", "melt", "displace", "smudge",
};

const char *world_corruption_name(int type) {
    return type >= 0 && type < WORLD_CORRUPTION_COUNT ? world_corruption_names[type] : NULL;
}

/* A damage must move at least this fraction of the glyph's ink pixels' worth of pixels across
 * the half-way line between text and background colour; a proposal short of it (a bar along an
 * existing stroke, a blend with a look-alike) is redrawn, at most WORLD_DAMAGE_TRIES times, and
 * the strongest proposal kept. Weaker damage is often still read as the glyph, by people and
 * by the oracle alike (tests/test_world.c measures, per type, how many damaged words it reads). */
#define WORLD_DAMAGE_MIN 0.3
#define WORLD_DAMAGE_TRIES 16

#define WORLD_IMAGE_BYTES (WORLD_W * WORLD_H * 3)

static WorldBox world_grow(WorldBox b, int dx, int dy) {
    return (WorldBox){b.x - dx, b.y - dy, b.w + 2 * dx, b.h + 2 * dy};
}

static bool world_inside(WorldBox b, int x, int y) {
    return x >= b.x && x < b.x + b.w && y >= b.y && y < b.y + b.h;
}

static void world_put_in(uint8_t *rgb, WorldBox clip, int x, int y, const uint8_t colour[3]) {
    if (world_inside(clip, x, y)) world_put(rgb, x, y, colour);
}

/* a + t (b - a), rounded. */
static void world_mix(const uint8_t a[3], const uint8_t b[3], double t, uint8_t out[3]) {
    for (int k = 0; k < 3; k++) out[k] = (uint8_t)lround(a[k] + t * (b[k] - a[k]));
}

static int world_distance2(const uint8_t *p, const uint8_t c[3]) {
    int d = 0;
    for (int k = 0; k < 3; k++) d += (p[k] - c[k]) * (p[k] - c[k]);
    return d;
}

/* Nearer the text colour than the background: how a reader would see the pixel. */
static bool world_inky(const WorldScene *s, const uint8_t *rgb, int x, int y) {
    const uint8_t *p = rgb + ((size_t)y * WORLD_W + (size_t)x) * 3;
    return world_distance2(p, s->ink) < world_distance2(p, s->background);
}

static int world_glyph_ink(const WorldScene *s, const uint8_t *rgb, int glyph) {
    WorldBox b = s->glyph[glyph];
    int n = 0;
    for (int y = b.y; y < b.y + b.h; y++)
        for (int x = b.x; x < b.x + b.w; x++) n += world_pixel_is(rgb, x, y, s->ink);
    return n;
}

/* A uniformly drawn ink pixel of the glyph into (*x, *y); the box's centre when it has none. */
static void world_random_ink(WorldRng *g, const WorldScene *s, int glyph, const uint8_t *rgb,
                             int *x, int *y) {
    WorldBox b = s->glyph[glyph];
    int n = world_glyph_ink(s, rgb, glyph), pick = n ? world_below(g, n) : -1;
    *x = b.x + b.w / 2;
    *y = b.y + b.h / 2;
    for (int py = b.y; py < b.y + b.h; py++)
        for (int px = b.x; px < b.x + b.w; px++)
            if (world_pixel_is(rgb, px, py, s->ink) && pick-- == 0) {
                *x = px;
                *y = py;
            }
}

/* One damage proposal of a type on glyph `glyph` of s, drawn into rgb (the image so far). */
typedef void (*WorldDamageFn)(WorldRng *g, const WorldScene *s, int glyph, uint8_t *rgb);

/* A rectangle of the glyph, 4 px or more each way and at most half its height, erased. */
static void world_remove_stroke(WorldRng *g, const WorldScene *s, int glyph, uint8_t *rgb) {
    WorldBox b = s->glyph[glyph];
    int w = world_between(g, 4, b.w), h = world_between(g, 4, b.h / 2);
    int x = b.x + world_between(g, 0, b.w - w), y = b.y + world_between(g, 0, b.h - h);
    for (int py = y; py < y + h; py++)
        for (int px = x; px < x + w; px++) world_put(rgb, px, py, s->background);
}

/* A 2 px thick bar from an ink pixel of the glyph across its box to the farther side:
 * horizontal, vertical or slanted (to a corner on that side), a third of the time each. */
static void world_add_stroke(WorldRng *g, const WorldScene *s, int glyph, uint8_t *rgb) {
    WorldBox b = s->glyph[glyph];
    int x0, y0;
    world_random_ink(g, s, glyph, rgb, &x0, &y0);
    int kind = world_below(g, 3);
    int far_x = x0 - b.x < b.w / 2 ? b.x + b.w - 2 : b.x,
        far_y = y0 - b.y < b.h / 2 ? b.y + b.h - 2 : b.y;
    int x1 = kind == 1 ? x0 : far_x, y1 = kind == 0 ? y0 : far_y;
    int steps = abs(x1 - x0) > abs(y1 - y0) ? abs(x1 - x0) : abs(y1 - y0);
    for (int i = 0; i <= steps; i++) {
        int x = steps ? x0 + (int)lround((double)i * (x1 - x0) / steps) : x0;
        int y = steps ? y0 + (int)lround((double)i * (y1 - y0) / steps) : y0;
        for (int k = 0; k < 4; k++) world_put_in(rgb, b, x + k % 2, y + k / 2, s->ink);
    }
}

/* Another symbol in the text colour over the glyph, offset by up to a cell each way, kept to
 * the box and a one pixel rim. */
static void world_blend(WorldRng *g, const WorldScene *s, int glyph, uint8_t *rgb) {
    int other = (world_symbol_index(s->word[glyph]) + 1 + world_below(g, WORLD_SYMBOLS - 1)) %
                WORLD_SYMBOLS;
    int dx = world_between(g, -s->scale_x, s->scale_x),
        dy = world_between(g, -s->scale_y, s->scale_y);
    WorldBox b = s->glyph[glyph], clip = world_grow(b, 1, 1);
    uint8_t mark[WORLD_IMAGE_BYTES];
    memset(mark, 0, sizeof mark);
    static const uint8_t on[3] = {1, 1, 1};
    world_draw_symbol(mark, other, b.x + dx, b.y + dy, s->scale_x, s->scale_y, on);
    for (int y = clip.y; y < clip.y + clip.h; y++)
        for (int x = clip.x; x < clip.x + clip.w; x++)
            if (world_pixel_is(mark, x, y, on)) world_put(rgb, x, y, s->ink);
}

/* The ink of rows [y0, y1) and columns [x0, x1) of rgb as bits (bit x of row y). */
static void world_ink_bits(const WorldScene *s, const uint8_t *rgb, int x0, int x1, int y0, int y1,
                           uint64_t bits[WORLD_H]) {
    for (int y = 0; y < WORLD_H; y++) {
        bits[y] = 0;
        if (y < y0 || y >= y1) continue;
        for (int x = x0 > 0 ? x0 : 0; x < x1 && x < WORLD_W; x++)
            if (world_pixel_is(rgb, x, y, s->ink)) bits[y] |= (uint64_t)1 << x;
    }
}

static bool world_bit(const uint64_t bits[WORLD_H], int x, int y) {
    return x >= 0 && x < WORLD_W && y >= 0 && y < WORLD_H && (bits[y] >> x & 1);
}

/* The lower half's strokes run down: each pixel column of the box and its rim drips (seven in
 * ten do) 2 .. `reach` px below every ink pixel of the lower half, taking ink from the columns
 * beside it too past the third pixel, so drips widen as they fall. */
static void world_melt(WorldRng *g, const WorldScene *s, int glyph, uint8_t *rgb) {
    WorldBox b = s->glyph[glyph];
    int split = b.y + b.h / 2, reach = world_between(g, 4, 9);
    uint64_t source[WORLD_H];
    world_ink_bits(s, rgb, b.x, b.x + b.w, split, b.y + b.h, source);
    for (int x = b.x - 1; x <= b.x + b.w; x++) {
        int drip = world_below(g, 10) < 3 ? 0 : world_between(g, 2, reach);
        for (int y = split + 1; y < WORLD_H; y++) {
            bool wet = false;
            for (int k = 1; k <= drip && !wet; k++)
                for (int dx = k > 3 ? -1 : 0; dx <= (k > 3 ? 1 : 0) && !wet; dx++)
                    wet = world_bit(source, x + dx, y - k);
            if (wet) world_put(rgb, x, y, s->ink);
        }
    }
}

/* The top or bottom part of the glyph moved 2-3 px sideways, or its left or right part 2-3 px up
 * or down (a third of the time copied there, the original kept), kept to the box, one pixel
 * either side and three above and below. */
static void world_displace(WorldRng *g, const WorldScene *s, int glyph, uint8_t *rgb) {
    WorldBox b = s->glyph[glyph], part = b, clip = world_grow(b, 1, 3);
    bool rows = world_below(g, 2), first = world_below(g, 2), copy = world_below(g, 3) == 0;
    int shift = world_between(g, 2, 3) * (world_below(g, 2) ? 1 : -1);
    if (rows) {
        int cut = s->scale_y * world_between(g, 2, WORLD_FONT_H - 2);
        part.h = first ? cut : b.h - cut;
        part.y = first ? b.y : b.y + cut;
    } else {
        int cut = s->scale_x * world_between(g, 2, WORLD_FONT_W - 2);
        part.w = first ? cut : b.w - cut;
        part.x = first ? b.x : b.x + cut;
    }
    uint64_t moved[WORLD_H];
    world_ink_bits(s, rgb, part.x, part.x + part.w, part.y, part.y + part.h, moved);
    for (int y = part.y; y < part.y + part.h && !copy; y++)
        for (int x = part.x; x < part.x + part.w; x++) world_put(rgb, x, y, s->background);
    for (int y = part.y; y < part.y + part.h; y++)
        for (int x = part.x; x < part.x + part.w; x++)
            if (world_bit(moved, x, y))
                world_put_in(rgb, clip, rows ? x + shift : x, rows ? y : y + shift, s->ink);
}

/* An elliptic blob of 4-6 by 4-7 px radius centred on an ink pixel, in a mix of the two colours
 * that reads as text (60-85% of the way to it) or as background (15-40%). */
static void world_smudge(WorldRng *g, const WorldScene *s, int glyph, uint8_t *rgb) {
    int cx, cy;
    world_random_ink(g, s, glyph, rgb, &cx, &cy);
    int rx = world_between(g, 4, 6), ry = world_between(g, 4, 7);
    double t = (world_below(g, 2) ? 0.6 : 0.15) + 0.25 * world_unit(g);
    uint8_t colour[3];
    world_mix(s->background, s->ink, t, colour);
    WorldBox clip = world_grow(s->glyph[glyph], 1, 1);
    for (int y = cy - ry; y <= cy + ry; y++)
        for (int x = cx - rx; x <= cx + rx; x++) {
            double u = (double)(x - cx) / rx, v = (double)(y - cy) / ry;
            if (u * u + v * v <= 1.0) world_put_in(rgb, clip, x, y, colour);
        }
}

static const WorldDamageFn world_damage_fns[WORLD_CORRUPTION_COUNT] = {
    world_remove_stroke, world_add_stroke, world_blend, world_melt, world_displace, world_smudge,
};

/* Pixels on the text side of the half-way line in one image and not in the other. */
static int world_flipped(const WorldScene *s, const uint8_t *a, const uint8_t *b) {
    int n = 0;
    for (int y = 0; y < WORLD_H; y++)
        for (int x = 0; x < WORLD_W; x++) n += world_inky(s, a, x, y) != world_inky(s, b, x, y);
    return n;
}

/* Damages one glyph of rgb with proposals of `type` until one is strong enough. */
static void world_damage_glyph(WorldRng *g, const WorldScene *s, int type, int glyph,
                               uint8_t *rgb) {
    uint8_t before[WORLD_IMAGE_BYTES], best[WORLD_IMAGE_BYTES];
    memcpy(before, rgb, sizeof before);
    int need = (int)ceil(WORLD_DAMAGE_MIN * world_glyph_ink(s, before, glyph)), best_flips = -1;
    for (int attempt = 0; attempt < WORLD_DAMAGE_TRIES; attempt++) {
        memcpy(rgb, before, sizeof before);
        world_damage_fns[type](g, s, glyph, rgb);
        int flips = world_flipped(s, before, rgb);
        if (flips >= need) return;
        if (flips > best_flips) {
            best_flips = flips;
            memcpy(best, rgb, sizeof best);
        }
    }
    memcpy(rgb, best, sizeof best);
}

/* mask = 1 on pixels that differ between clean and rgb and on their 8 neighbours; returns how
 * many differ. */
static int world_mask(const uint8_t *clean, const uint8_t *rgb, uint8_t *mask) {
    uint8_t changed[WORLD_W * WORLD_H];
    int n = 0;
    for (int i = 0; i < WORLD_W * WORLD_H; i++) {
        changed[i] = memcmp(clean + (size_t)i * 3, rgb + (size_t)i * 3, 3) != 0;
        n += changed[i];
    }
    for (int y = 0; y < WORLD_H; y++)
        for (int x = 0; x < WORLD_W; x++) {
            uint8_t near = 0;
            for (int ny = y - 1; ny <= y + 1; ny++)
                for (int nx = x - 1; nx <= x + 1; nx++)
                    if (nx >= 0 && nx < WORLD_W && ny >= 0 && ny < WORLD_H)
                        near |= changed[ny * WORLD_W + nx];
            mask[y * WORLD_W + x] = near;
        }
    return n;
}

/* A scene world_scene could have made: a word of the alphabet, glyph boxes inside the image. */
static int world_check_scene(const WorldScene *s, Error *e) {
    if (s->length < WORLD_WORD_MIN || s->length > WORLD_WORD_MAX)
        return error_set(e, "scene: word length %d is outside %d..%d", s->length, WORLD_WORD_MIN,
                         WORLD_WORD_MAX);
    for (int i = 0; i < s->length; i++) {
        WorldBox b = s->glyph[i];
        if (world_symbol_index(s->word[i]) < 0)
            return error_set(e, "scene: glyph %d ('%c') is not a letter or digit", i, s->word[i]);
        if (b.x < 0 || b.y < 0 || b.x + b.w > WORLD_W || b.y + b.h > WORLD_H)
            return error_set(e, "scene: glyph %d's box leaves the %dx%d image", i, WORLD_W,
                             WORLD_H);
    }
    return 0;
}

int world_corrupt(uint64_t seed, const WorldScene *s, int type, uint8_t *rgb, uint8_t *mask,
                  WorldDamage *damage, Error *e) {
    if (type != WORLD_CORRUPT_ANY && !world_corruption_name(type))
        return error_set(e, "corruption type %d is not one of 0..%d", type,
                         WORLD_CORRUPTION_COUNT - 1);
    if (world_check_scene(s, e)) return -1;
    WorldRng g = world_rng(seed, WORLD_STREAM_CORRUPT);
    /* drawn whether or not it is used, so a given type sees the same glyphs and shapes */
    int drawn = world_below(&g, WORLD_CORRUPTION_COUNT);
    WorldDamage d = {.type = type == WORLD_CORRUPT_ANY ? drawn : type};
    d.count = s->length >= 2 && world_below(&g, 4) == 0 ? 2 : 1;
    d.glyph[0] = world_below(&g, s->length);
    d.glyph[1] = (d.glyph[0] + 1 + world_below(&g, s->length - 1)) % s->length;
    if (d.count == 1) d.glyph[1] = -1;
    uint8_t clean[WORLD_IMAGE_BYTES];
    world_render(s, clean);
    memcpy(rgb, clean, sizeof clean);
    for (int i = 0; i < d.count; i++) world_damage_glyph(&g, s, d.type, d.glyph[i], rgb);
    d.changed = world_mask(clean, rgb, mask);
    if (damage) *damage = d;
    return 0;
}

/* === the oracle === */

static int popcount64(uint64_t v) {
    v = v - (v >> 1 & 0x5555555555555555u);
    v = (v & 0x3333333333333333u) + (v >> 2 & 0x3333333333333333u);
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0Fu;
    return (int)((v * 0x0101010101010101u) >> 56);
}

/* The per-channel median of the image's one pixel border. */
static void oracle_background(const uint8_t *rgb, uint8_t bg[3]) {
    int histogram[3][256] = {{0}}, n = 0;
    for (int y = 0; y < WORLD_H; y++)
        for (int x = 0; x < WORLD_W; x++) {
            if (y != 0 && y != WORLD_H - 1 && x != 0 && x != WORLD_W - 1) continue;
            for (int k = 0; k < 3; k++)
                histogram[k][rgb[((size_t)y * WORLD_W + (size_t)x) * 3 + k]]++;
            n++;
        }
    for (int k = 0; k < 3; k++) {
        int below = 0, v = 0;
        while (below + histogram[k][v] <= n / 2) below += histogram[k][v++];
        bg[k] = (uint8_t)v;
    }
}

/* How far each pixel is from the background, and the text level: the mean distance of the
 * pixels at least ORACLE_FAR_CUT as far as the farthest (the far colour cluster, averaged so one
 * noisy pixel does not set it). */
typedef struct OracleInk {
    int distance2[WORLD_W * WORLD_H];
    double level;
} OracleInk;

static void oracle_ink(const uint8_t *rgb, const uint8_t bg[3], OracleInk *ink) {
    int farthest = 0;
    for (int i = 0; i < WORLD_W * WORLD_H; i++) {
        ink->distance2[i] = world_distance2(rgb + (size_t)i * 3, bg);
        farthest = ink->distance2[i] > farthest ? ink->distance2[i] : farthest;
    }
    double sum = 0, n = 0;
    for (int i = 0; i < WORLD_W * WORLD_H; i++)
        if (ink->distance2[i] >= ORACLE_FAR_CUT * ORACLE_FAR_CUT * farthest) {
            sum += sqrt(ink->distance2[i]);
            n++;
        }
    ink->level = sum / n;
}

/* The pixels farther than fraction * level from the background as bits (bit x of bits[y]);
 * none when the level is below ORACLE_MIN_CONTRAST. */
static void oracle_threshold(const OracleInk *ink, double fraction, uint64_t bits[WORLD_H]) {
    double threshold = fraction * ink->level;
    for (int y = 0; y < WORLD_H; y++) {
        bits[y] = 0;
        for (int x = 0; x < WORLD_W && ink->level >= ORACLE_MIN_CONTRAST; x++)
            if (ink->distance2[y * WORLD_W + x] > threshold * threshold)
                bits[y] |= (uint64_t)1 << x;
    }
}

/* Drops ink pixels none of whose 8 neighbours is ink (noise, not strokes). */
static void oracle_drop_specks(uint64_t ink[WORLD_H]) {
    uint64_t keep[WORLD_H];
    for (int y = 0; y < WORLD_H; y++) {
        uint64_t up = y > 0 ? ink[y - 1] : 0, down = y + 1 < WORLD_H ? ink[y + 1] : 0;
        uint64_t around = up | down,
                 near = around | around << 1 | around >> 1 | ink[y] << 1 | ink[y] >> 1;
        keep[y] = ink[y] & near;
    }
    memcpy(ink, keep, sizeof keep);
}

/* A symbol as the oracle expects to see it: pixel rows (bit 0 the box's leftmost pixel) and the
 * offset of the ink's bounding box in that box. */
#define ORACLE_TEMPLATE_ROWS (WORLD_FONT_H * ORACLE_SCALE_Y_MAX + 2)

typedef struct OracleTemplate {
    uint64_t row[ORACLE_TEMPLATE_ROWS];
    int rows;
    int left, top;
} OracleTemplate;

/* Each symbol at each scale_y, sharp and as a 3x3 box blur thresholded at half shows it. */
enum { ORACLE_SCALES = ORACLE_SCALE_Y_MAX - ORACLE_SCALE_Y_MIN + 1, ORACLE_LOOKS = 2 };
typedef OracleTemplate OracleTemplates[WORLD_SYMBOLS][ORACLE_SCALES * ORACLE_LOOKS];

static void oracle_ink_box(OracleTemplate *t) {
    uint64_t seen = 0;
    t->top = -1;
    for (int y = 0; y < t->rows; y++) {
        seen |= t->row[y];
        if (t->row[y] && t->top < 0) t->top = y;
    }
    t->left = 0;
    while (seen && !(seen >> t->left & 1)) t->left++;
}

/* The symbol at scale_y in a box with a one pixel rim, blurred when `blurred`: a pixel is ink
 * when at least 5 of the 9 pixels around it are. */
static void oracle_template(int symbol, int scale_y, bool blurred, OracleTemplate *t) {
    uint8_t rows[WORLD_FONT_H];
    world_font_rows(symbol, rows);
    uint64_t sharp[ORACLE_TEMPLATE_ROWS] = {0};
    t->rows = WORLD_FONT_H * scale_y + 2;
    for (int y = 1; y < t->rows - 1; y++)
        for (int c = 0; c < WORLD_FONT_W; c++)
            if (rows[(y - 1) / scale_y] >> (WORLD_FONT_W - 1 - c) & 1)
                sharp[y] |= (((uint64_t)1 << WORLD_SCALE_X) - 1) << (1 + c * WORLD_SCALE_X);
    for (int y = 0; y < t->rows; y++) {
        t->row[y] = blurred ? 0 : sharp[y];
        for (int x = 0; x < WORLD_FONT_W * WORLD_SCALE_X + 2 && blurred; x++) {
            int n = 0;
            for (int ny = y - 1; ny <= y + 1; ny++)
                for (int nx = x - 1; nx <= x + 1; nx++)
                    n += ny >= 0 && ny < t->rows && nx >= 0 && (sharp[ny] >> nx & 1);
            if (n >= 5) t->row[y] |= (uint64_t)1 << x;
        }
    }
    oracle_ink_box(t);
}

static void oracle_templates(OracleTemplates templates) {
    for (int k = 0; k < WORLD_SYMBOLS; k++)
        for (int i = 0; i < ORACLE_SCALES * ORACLE_LOOKS; i++)
            oracle_template(k, ORACLE_SCALE_Y_MIN + i / ORACLE_LOOKS, i % ORACLE_LOOKS,
                            &templates[k][i]);
}

/* 1 - IoU of a glyph's ink (rows [top, bottom] of `ink`, already cut to its columns) and a
 * template whose box starts at (x, y); template pixels off the image count as mismatched. */
static double oracle_distance(const uint64_t ink[WORLD_H], int top, int bottom,
                              const OracleTemplate *t, int x, int y) {
    int from = top < y ? top : y, to = bottom > y + t->rows - 1 ? bottom : y + t->rows - 1;
    int mismatched = 0, either = 0;
    for (int py = from; py <= to; py++) {
        bool in_image = py >= 0 && py < WORLD_H;
        uint64_t seen = in_image ? ink[py] : 0, want = 0;
        if (py >= y && py < y + t->rows) {
            uint64_t row = t->row[py - y];
            uint64_t placed = x >= 64 || x <= -64 ? 0 : x >= 0 ? row << x : row >> -x;
            int lost = popcount64(row) - (in_image ? popcount64(placed) : 0);
            mismatched += lost;
            either += lost;
            want = in_image ? placed : 0;
        }
        mismatched += popcount64(seen ^ want);
        either += popcount64(seen | want);
    }
    return either ? (double)mismatched / either : 1.0;
}

/* The least distance of each symbol to the ink of columns [x0, x1] of bits, over every template
 * and -1..+1 pixel shifts of the ink boxes' alignment, folded into best[]; the ink's box into
 * *box (left alone when the columns hold no ink). */
static void oracle_match_bits(const uint64_t bits[WORLD_H], int x0, int x1,
                              const OracleTemplates templates, double best[WORLD_SYMBOLS],
                              WorldBox *box) {
    x0 = x0 < 0 ? 0 : x0;
    x1 = x1 >= WORLD_W ? WORLD_W - 1 : x1;
    uint64_t columns = (x1 - x0 + 1 >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << (x1 - x0 + 1)) - 1))
                       << x0;
    uint64_t ink[WORLD_H], seen = 0;
    int top = WORLD_H, bottom = -1;
    for (int y = 0; y < WORLD_H; y++) {
        ink[y] = bits[y] & columns;
        seen |= ink[y];
        if (ink[y]) {
            top = y < top ? y : top;
            bottom = y;
        }
    }
    if (bottom < 0) return;
    int left = x0, right = x1;
    while (!(seen >> left & 1)) left++;
    while (!(seen >> right & 1)) right--;
    *box = (WorldBox){left, top, right - left + 1, bottom - top + 1};
    for (int k = 0; k < WORLD_SYMBOLS; k++)
        for (int i = 0; i < ORACLE_SCALES * ORACLE_LOOKS; i++) {
            const OracleTemplate *t = &templates[k][i];
            for (int dy = -1; dy <= 1; dy++)
                for (int dx = -1; dx <= 1; dx++) {
                    double d = oracle_distance(ink, top, bottom, t, left + dx - t->left,
                                               top + dy - t->top);
                    best[k] = d < best[k] ? d : best[k];
                }
        }
}

/* The column span of each glyph where it is found. */
typedef struct OracleCores {
    int count;
    int x0[ORACLE_MAX_GLYPHS], x1[ORACLE_MAX_GLYPHS];
} OracleCores;

/* Runs of columns holding at least ORACLE_COLUMN_MIN ink pixels, as [x0[i], x1[i]]; their count. */
static int oracle_runs(const uint64_t bits[WORLD_H], int x0[ORACLE_MAX_GLYPHS],
                       int x1[ORACLE_MAX_GLYPHS]) {
    int count[WORLD_W] = {0}, n = 0;
    for (int y = 0; y < WORLD_H; y++)
        for (int x = 0; x < WORLD_W; x++) count[x] += (int)(bits[y] >> x & 1);
    for (int x = 0; x < WORLD_W; x++) {
        if (count[x] < ORACLE_COLUMN_MIN || (x > 0 && count[x - 1] >= ORACLE_COLUMN_MIN)) continue;
        x0[n] = x;
        while (x + 1 < WORLD_W && count[x + 1] >= ORACLE_COLUMN_MIN) x++;
        x1[n++] = x;
    }
    return n;
}

static void oracle_bits(const OracleInk *ink, double fraction, uint64_t bits[WORLD_H]) {
    oracle_threshold(ink, fraction, bits);
    oracle_drop_specks(bits);
}

/* The glyph cores within columns [lo, hi], from threshold `level` of ORACLE_FRACTIONS up: its
 * runs, each one wider than a glyph and its one pixel rim split again at the next threshold
 * (lower thresholds keep a blurred diagonal in one piece, higher ones keep glyphs apart that
 * blur and noise have joined), the widest kept as they are at the last. */
static void oracle_segment_range(const OracleInk *ink, size_t level, int lo, int hi,
                                 OracleCores *cores) {
    static const double fractions[] = {ORACLE_FRACTIONS};
    uint64_t bits[WORLD_H],
        columns = (hi - lo + 1 >= 64 ? ~(uint64_t)0 : (((uint64_t)1 << (hi - lo + 1)) - 1)) << lo;
    int x0[ORACLE_MAX_GLYPHS], x1[ORACLE_MAX_GLYPHS];
    oracle_bits(ink, fractions[level], bits);
    for (int y = 0; y < WORLD_H; y++) bits[y] &= columns;
    int runs = oracle_runs(bits, x0, x1);
    for (int i = 0; i < runs; i++) {
        bool last = level + 1 == COUNT(fractions);
        if (x1[i] - x0[i] + 1 > WORLD_FONT_W * WORLD_SCALE_X + 2 && !last) {
            oracle_segment_range(ink, level + 1, x0[i], x1[i], cores);
        } else if (cores->count < ORACLE_MAX_GLYPHS) {
            cores->x0[cores->count] = x0[i];
            cores->x1[cores->count++] = x1[i];
        }
    }
}

static int oracle_segment(const OracleInk *ink, OracleCores *cores) {
    cores->count = 0;
    oracle_segment_range(ink, 0, 0, WORLD_W - 1, cores);
    return cores->count;
}

/* The columns [*lo, *hi] of glyph `glyph` in bits: the runs that overlap its core and no other
 * one, with a column more on each side that no other run holds; false when there are none. */
static bool oracle_glyph_columns(const uint64_t bits[WORLD_H], const OracleCores *cores, int glyph,
                                 int *lo, int *hi) {
    int x0[ORACLE_MAX_GLYPHS], x1[ORACLE_MAX_GLYPHS], runs = oracle_runs(bits, x0, x1), first = -1,
                                                      last = -1;
    for (int i = 0; i < runs; i++) {
        int overlapped = 0, mine = 0;
        for (int c = 0; c < cores->count; c++)
            if (x0[i] <= cores->x1[c] && cores->x0[c] <= x1[i]) {
                overlapped++;
                mine += c == glyph;
            }
        if (overlapped != 1 || !mine) continue;
        first = first < 0 ? i : first;
        last = i;
    }
    if (first < 0) return false;
    *lo = x0[first] - (first > 0 && x1[first - 1] == x0[first] - 2 ? 0 : 1);
    *hi = x1[last] + (last + 1 < runs && x0[last + 1] == x1[last] + 2 ? 0 : 1);
    return true;
}

/* Matches glyph `glyph` at every threshold of ORACLE_FRACTIONS (a blurred image keeps its shape
 * at one of them, a sharp one at all). */
static void oracle_match(const OracleInk *ink, const OracleCores *cores, int glyph,
                         const OracleTemplates templates, OracleGlyph *out) {
    static const double fractions[] = {ORACLE_FRACTIONS};
    double best[WORLD_SYMBOLS];
    for (int k = 0; k < WORLD_SYMBOLS; k++) best[k] = 1.0;
    out->box = (WorldBox){cores->x0[glyph], 0, cores->x1[glyph] - cores->x0[glyph] + 1, 0};
    uint64_t previous[WORLD_H] = {0};
    for (size_t f = 0; f < COUNT(fractions); f++) {
        uint64_t bits[WORLD_H];
        oracle_bits(ink, fractions[f], bits);
        int lo, hi;
        /* a sharp image gives the same bits at every threshold: match them once */
        bool same = f > 0 && memcmp(bits, previous, sizeof bits) == 0;
        memcpy(previous, bits, sizeof bits);
        if (same || !oracle_glyph_columns(bits, cores, glyph, &lo, &hi)) continue;
        WorldBox box = out->box;
        oracle_match_bits(bits, lo, hi, templates, best, &box);
        if (box.x <= cores->x0[glyph] && box.x + box.w - 1 >= cores->x1[glyph]) out->box = box;
    }
    int first = 0;
    for (int k = 1; k < WORLD_SYMBOLS; k++) first = best[k] < best[first] ? k : first;
    double second = 1.0;
    for (int k = 0; k < WORLD_SYMBOLS; k++)
        if (k != first && best[k] < second) second = best[k];
    out->symbol = WORLD_ALPHABET[first];
    out->score = (float)best[first];
    out->second = (float)second;
    out->legible = best[first] <= ORACLE_MATCH_MAX && second - best[first] >= ORACLE_MARGIN_MIN;
}

int oracle_read(const uint8_t *rgb, int width, int height, OracleResult *r, Error *e) {
    memset(r, 0, sizeof *r);
    if (!rgb) return error_set(e, "oracle: no image");
    if (width != WORLD_W || height != WORLD_H)
        return error_set(e, "oracle: image is %dx%d, expected %dx%d", width, height, WORLD_W,
                         WORLD_H);
    OracleTemplates templates;
    oracle_templates(templates);
    OracleInk ink;
    oracle_background(rgb, r->background);
    oracle_ink(rgb, r->background, &ink);
    r->level = ink.level;
    OracleCores cores;
    r->count = oracle_segment(&ink, &cores);
    r->all_legible = r->count > 0;
    for (int i = 0; i < r->count; i++) {
        oracle_match(&ink, &cores, i, templates, &r->glyph[i]);
        r->text[i] = r->glyph[i].legible ? r->glyph[i].symbol : '?';
        r->all_legible = r->all_legible && r->glyph[i].legible;
    }
    r->text[r->count] = '\0';
    return 0;
}

bool oracle_reads_as(const OracleResult *r, const char *prompt) {
    if (!r->all_legible || !prompt || strlen(prompt) != (size_t)r->count) return false;
    for (int i = 0; i < r->count; i++)
        if (world_symbol_index(prompt[i]) < 0 ||
            WORLD_ALPHABET[world_symbol_index(prompt[i])] != r->text[i])
            return false;
    return true;
}

int oracle_artifact_mask(const OracleResult *r, uint8_t *mask) {
    memset(mask, 0, (size_t)WORLD_H * WORLD_W);
    int illegible = 0;
    for (int i = 0; i < r->count; i++) {
        if (r->glyph[i].legible) continue;
        WorldBox b = r->glyph[i].box;
        if (b.h < 1) b.y = 0, b.h = WORLD_H; /* never matched: its columns, every row */
        int x0 = b.x > 0 ? b.x - 1 : 0, y0 = b.y > 0 ? b.y - 1 : 0;
        int x1 = b.x + b.w < WORLD_W ? b.x + b.w : WORLD_W - 1;
        int y1 = b.y + b.h < WORLD_H ? b.y + b.h : WORLD_H - 1;
        for (int y = y0; y <= y1; y++)
            memset(mask + (size_t)y * WORLD_W + x0, 1, (size_t)(x1 - x0 + 1));
        illegible++;
    }
    return illegible;
}
