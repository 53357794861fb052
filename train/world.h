/* train/world.h - the words world: the procedural scenes the embedded models are trained in.
 *
 * A word of 2-4 symbols drawn with our own 5x7 bitmap font on a plain background, every scene made
 * from a seed; corruptions of it with exact pixel masks (the detector's training data); and an
 * oracle that reads an image back by template matching against the font (evaluation only, never
 * guidance). Images are [WORLD_H, WORLD_W, 3] uint8 as in Image; masks are [WORLD_H, WORLD_W]
 * uint8. Nothing here reads files or allocates. */
#ifndef DIAMOND_TRAIN_WORLD_H
#define DIAMOND_TRAIN_WORLD_H

#include <stdbool.h>
#include <stdint.h>

#include "../io.h"

#define WORLD_W 64
#define WORLD_H 32
#define WORLD_ALPHABET "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
#define WORLD_SYMBOLS 36
#define WORLD_WORD_MIN 2
#define WORLD_WORD_MAX 4
/* The font: WORLD_FONT_H rows of WORLD_FONT_W cells per symbol. */
#define WORLD_FONT_W 5
#define WORLD_FONT_H 7
/* A font cell is WORLD_SCALE_X pixels wide and WORLD_SCALE_Y tall, and every scene is laid out
 * alike: the word centred, its glyphs WORLD_SPACING pixels apart, each glyph box and its spacing
 * 16 pixels wide, so each glyph fills two columns of the embedded models' 8x8-pixel latent tokens
 * at the same place in them. One height and one placement are what let the 1.6 M-parameter flow
 * model write words right most of the time: trained 8000 steps on words of 14 straight-stroked
 * symbols, it drew 25% of its glyphs right with glyphs 2 or 3 pixels per cell tall shifted by up
 * to 1 pixel across and 3 down, and 91% with one height and no shift (weights/README.md). */
#define WORLD_SCALE_X 2
#define WORLD_SCALE_Y 3
#define WORLD_SPACING 6
/* Background and text differ in luminance (Rec. 709 weights) by at least this fraction of 255. */
#define WORLD_MIN_CONTRAST 0.35

/* A pixel rectangle: columns x .. x+w-1, rows y .. y+h-1. */
typedef struct WorldBox {
    int x, y, w, h;
} WorldBox;

typedef struct WorldScene {
    char word[WORLD_WORD_MAX + 1]; /* upper case, NUL-terminated */
    int length;
    uint8_t background[3], ink[3];
    int scale_x, scale_y; /* pixels per font cell */
    /* Glyph i covers glyph[i]: WORLD_FONT_W * scale_x by WORLD_FONT_H * scale_y pixels, its
     * font cell (r, c) the block at (x + c * scale_x, y + r * scale_y). */
    WorldBox glyph[WORLD_WORD_MAX];
} WorldScene;

/* The font rows of symbol c (upper or lower case), bit WORLD_FONT_W-1-c set when column c is
 * ink; -1 when c is not in WORLD_ALPHABET. */
int world_glyph_rows(char c, uint8_t rows[WORLD_FONT_H]);

/* A scene from seed: word (its letters upper-cased) or, when NULL, a word of uniformly drawn
 * length and symbols; colours with WORLD_MIN_CONTRAST; the word centred. Fails, naming the word,
 * when it is too short, too long or has another character. */
int world_scene(uint64_t seed, const char *word, WorldScene *out, Error *e);
/* Draws s into rgb [WORLD_H, WORLD_W, 3]: hard-edged pixels, ink or background only. */
void world_render(const WorldScene *s, uint8_t *rgb);

/* The corruption types, each damaging one glyph beyond reading (see world_corrupt). */
typedef enum WorldCorruption {
    WORLD_REMOVE_STROKE, /* a band of the glyph's strokes erased */
    WORLD_ADD_STROKE,    /* a bar of text colour through the glyph */
    WORLD_BLEND,         /* another symbol drawn over the glyph, slightly offset */
    WORLD_MELT,          /* the lower half's strokes dripping downwards */
    WORLD_DISPLACE,      /* half of the glyph shifted by 2-3 px, or copied beside itself */
    WORLD_SMUDGE,        /* an elliptic blob of a mix of text and background colour */
    WORLD_CORRUPTION_COUNT
} WorldCorruption;
#define WORLD_CORRUPT_ANY (-1)

/* "remove_stroke", "add_stroke", ...; NULL outside 0 .. WORLD_CORRUPTION_COUNT-1. */
const char *world_corruption_name(int type);

/* What world_corrupt did. */
typedef struct WorldDamage {
    int type;
    int count;                   /* glyphs damaged: 1 or 2 */
    int glyph[2];                /* their indices in the word; glyph[1] is -1 when count is 1 */
    int changed;                 /* pixels that differ from the clean render */
} WorldDamage;

/* Renders s into rgb and damages one glyph (two in a quarter of the cases, when the word has
 * them) with a corruption of `type`, or of a type drawn from seed when type is WORLD_CORRUPT_ANY.
 * mask [WORLD_H, WORLD_W] gets 1 on every pixel that differs from the clean render and on its
 * 8 neighbours (the changed region dilated by one pixel: the broken strokes and their edge,
 * never the whole glyph box), 0 elsewhere. damage may be NULL. */
int world_corrupt(uint64_t seed, const WorldScene *s, int type, uint8_t *rgb, uint8_t *mask,
                  WorldDamage *damage, Error *e);

/* --- the oracle ---
 * Reads a WORLD_W x WORLD_H image, deterministically, for evaluation only:
 *   - background: the per-channel median of the one pixel border;
 *   - text level: the mean distance from the background (RGB, Euclidean) of the pixels at least
 *     ORACLE_FAR_CUT as far as the farthest one (the far colour cluster); no ink at all when it
 *     is below ORACLE_MIN_CONTRAST (a blank or nearly uniform image);
 *   - ink at threshold f: pixels farther than f * level, ink pixels without an ink neighbour
 *     dropped as noise. A sharp render gives the same ink at every f of ORACLE_FRACTIONS; a
 *     blurred one (whose thin strokes never reach the text colour) keeps its shape at one of
 *     them: the half-way point between the colours lies between 0.5 and 0.85 of the level;
 *   - glyphs: runs of columns holding at least ORACLE_COLUMN_MIN ink pixels at the lowest f, a
 *     run wider than a glyph and its rim split again at the next f (blur and noise can join two
 *     glyphs at a low threshold, a blurred diagonal falls apart at a high one);
 *   - matching, at every f: the glyph's ink (its runs at that f) against every symbol at scale
 *     WORLD_SCALE_X x ORACLE_SCALE_Y_MIN..MAX, drawn sharp and as a 3x3 box blur thresholded at
 *     half, with the two ink boxes' top-left corners aligned and shifted by -1..+1 pixels each
 *     way. The distance is 1 - IoU of the two pixel sets (mismatched pixels over pixels inked in
 *     either); each symbol keeps its least distance over thresholds, scales and shifts;
 *   - a glyph is legible when its best distance is at most ORACLE_MATCH_MAX and the best other
 *     symbol's is at least ORACLE_MARGIN_MIN farther. Renders match at 0 sharp and at most
 *     about 0.15 noisy and blurred; damaged glyphs mostly lie above 0.2; two symbols of the font
 *     are at least 0.13 apart as seen after blur (tests/test_world.c measures all of these). */
#define ORACLE_MIN_CONTRAST 40.0
/* The glyph heights the oracle matches, pixels per font cell: the world's and a squashed one. It
 * reads as it did when the world drew both, so no glyph reads more easily than then. */
#define ORACLE_SCALE_Y_MIN 2
#define ORACLE_SCALE_Y_MAX 3
#define ORACLE_FAR_CUT 0.75
#define ORACLE_FRACTIONS 0.45, 0.55, 0.65, 0.75, 0.85
#define ORACLE_COLUMN_MIN 2
#define ORACLE_MATCH_MAX 0.2
#define ORACLE_MARGIN_MIN 0.08
#define ORACLE_MAX_GLYPHS (WORLD_W / 2)

typedef struct OracleGlyph {
    WorldBox box;      /* the glyph's ink bounding box where it was found */
    char symbol;       /* the best matching symbol */
    float score;       /* its distance, 0 (exact) .. 1 */
    float second;      /* the best other symbol's distance */
    bool legible;
} OracleGlyph;

typedef struct OracleResult {
    int count;                          /* glyphs found */
    char text[ORACLE_MAX_GLYPHS + 1];   /* one symbol per glyph, '?' when illegible */
    OracleGlyph glyph[ORACLE_MAX_GLYPHS];
    bool all_legible;                   /* at least one glyph, and every glyph legible */
    uint8_t background[3];
    double level;                       /* the text level: distance of the far cluster */
} OracleResult;

/* Reads rgb [height, width, 3]; refuses any size but WORLD_W x WORLD_H. Deterministic. */
int oracle_read(const uint8_t *rgb, int width, int height, OracleResult *r, Error *e);
/* true when every glyph is legible and the text equals prompt, ignoring case. */
bool oracle_reads_as(const OracleResult *r, const char *prompt);
/* The oracle's artifacts as a pixel mask [WORLD_H, WORLD_W]: 1 on the ink box of every glyph it
 * could not read (its columns when no shape was matched), grown by one pixel each way, 0
 * elsewhere. Returns the number of such glyphs. */
int oracle_artifact_mask(const OracleResult *r, uint8_t *mask);

#endif
