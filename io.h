/* io.h - bytes <-> arrays: safetensors, JSON, tokenizers, evaluation-set CSVs, PPM/PNG. The lowest
 * layer: includes no other diamond header. */
#ifndef DIAMOND_IO_H
#define DIAMOND_IO_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* === errors ===
 * Functions that can fail return 0 on success and -1 on failure, filling an Error with one line
 * that names the file, tensor or option at fault. main() prints it. */
/* The entries of a table. */
#define COUNT(table) (sizeof (table) / sizeof *(table))

typedef struct Error {
    char msg[2048];
} Error;

/* Formats msg into e (when e is not NULL) and returns -1, so callers can `return error_set(...)`.
 * A message too long for msg (long paths) loses bytes from its middle, never its start or its
 * end, where the reason is. */
int error_set(Error *e, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* The same with the arguments in a va_list (which it leaves to the caller to end). */
int error_setv(Error *e, const char *fmt, va_list ap);

/* === bf16 and f16 === */

/* The bits of a float and back (bit-level conversions and math). */
static inline uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float bits_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* bf16 / f16 <-> f32. To-f32 is exact; from-f32 rounds to nearest even and keeps NaN a NaN. */
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
void bf16_to_f32_array(const uint16_t *src, float *dst, size_t n);
void f16_to_f32_array(const uint16_t *src, float *dst, size_t n);

/* === JSON === */

/* JSON documents (config files, safetensors headers). A document owns a read-only tree of values.
 * Parsing is strict: RFC 8259 grammar, valid UTF-8, nothing but whitespace after the value, at
 * most JSON_MAX_DEPTH nested arrays/objects, no duplicate keys in an object, and no U+0000 in
 * strings (they are handed out as C strings). */
#define JSON_MAX_DEPTH 64

typedef enum JsonType { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } JsonType;

typedef struct JsonValue JsonValue;
typedef struct JsonMember JsonMember;

/* 32 bytes: the fields of each type share their storage, so read only those of v->type. */
struct JsonValue {
    JsonType type;
    bool boolean;                      /* JSON_BOOL */
    bool is_integer;                   /* JSON_NUMBER written without fraction or exponent, within
                                        * int64; false for every other type */
    union {
        struct {
            int64_t integer;           /* JSON_NUMBER when is_integer */
            double number;             /* JSON_NUMBER, always */
        };
        struct {
            const char *string;        /* JSON_STRING, NUL-terminated UTF-8 */
            size_t length;             /* JSON_STRING: bytes, without the NUL */
        };
        struct {
            size_t count;              /* JSON_ARRAY: items; JSON_OBJECT: members */
            union {
                const JsonValue *items;    /* JSON_ARRAY */
                const JsonMember *members; /* JSON_OBJECT, in file order */
            };
        };
    };
    const char *source;                /* the document's name, for error messages */
};

struct JsonMember {
    const char *key;
    JsonValue value;
};

typedef struct JsonDoc JsonDoc;

/* Parses len bytes of text (need not be NUL-terminated); source names it in error messages. */
int json_parse(JsonDoc **out, const char *text, size_t len, const char *source, Error *e);
/* A regular file of at most JSON_FILE_MAX bytes (configs, indexes, eval items: kilobytes). A
 * document takes at most ~33 bytes of memory per byte of text, the worst case being a long array
 * of one-digit numbers (4 MiB of "[0,0,...]": 134 MB peak RSS; Qwen3's 11 MB tokenizer.json,
 * read by the tokenizer without this limit: 55 MB). */
#define JSON_FILE_MAX (4 << 20)
int json_parse_file(JsonDoc **out, const char *path, Error *e);
const JsonValue *json_root(const JsonDoc *doc);
void json_free(JsonDoc *doc);

/* The member `key` of an object; NULL when absent or when object is not an object. */
const JsonValue *json_get(const JsonValue *object, const char *key);
/* Typed lookups for config files. Each fails with "<source>: key 'k' is missing" or
 * "<source>: key 'k' is a string, expected an integer" and leaves *out alone on failure.
 * json_get_float accepts any number; json_get_int only integers written as such. */
int json_get_int(const JsonValue *object, const char *key, int64_t *out, Error *e);
/* An integer key in lo..hi (and in int's range) into *out; the error names the file, key and range:
 * the one reader of a config's integers. */
int json_get_int_in(const JsonValue *object, const char *key, int64_t lo, int64_t hi, int *out,
                    Error *e);
int json_get_float(const JsonValue *object, const char *key, double *out, Error *e);
int json_get_bool(const JsonValue *object, const char *key, bool *out, Error *e);
/* *out points into the document and lives until json_free. */
int json_get_string(const JsonValue *object, const char *key, const char **out, Error *e);
/* An array of at most capacity integers into out[0 .. *count). */
int json_get_int_array(const JsonValue *object, const char *key, int64_t *out, size_t capacity,
                       size_t *count, Error *e);
/* A key of an upstream config that diamond does not implement: it must be absent or hold one of
 * the values `accepts` lists, JSON literals separated by '|' (null, true, false, a number, a
 * "string"; numbers match within a relative 1e-9). */
typedef struct KeyDefault {
    const char *key;
    const char *accepts;
} KeyDefault;
/* The first of keys[0 .. n) whose value is not accepted fails, naming the file, key, value and
 * what diamond implements. */
int json_require_defaults(const JsonValue *object, const KeyDefault *keys, size_t n, Error *e);

/* === files and the machine === */

/* Every writer goes through this: the bytes go to "<path>.tmp.<pid>", which is flushed, fsynced
 * and renamed over path only when everything was written, so a reader never sees half a file.
 * Both atomic_commit and atomic_abort (which removes the temporary file) free f; after a failed
 * atomic_write call atomic_abort. */
typedef struct AtomicFile AtomicFile;

int atomic_open(AtomicFile **out, const char *path, Error *e);
int atomic_write(AtomicFile *f, const void *data, size_t n, Error *e);
int atomic_commit(AtomicFile *f, Error *e);
void atomic_abort(AtomicFile *f);
/* The whole file in one call. */
int write_file_atomic(const char *path, const void *data, size_t n, Error *e);
/* path's whole contents (a regular file: a FIFO or device is refused), NUL-terminated, into a
 * new buffer *text of *len bytes before the NUL. */
int file_read_all(const char *path, char **text, size_t *len, Error *e);

/* The entry names of a directory without "." and "..", sorted bytewise; free with dir_list_free. */
int dir_list(const char *dir, char ***names, size_t *count, Error *e);
void dir_list_free(char **names, size_t count);
/* Creates directory `dir` (one level) unless it already is one. */
int dir_make(const char *dir, Error *e);
/* true when the paths name the same file, once written: equal, or equal with their directories
 * resolved (x.png and ./x.png, d/../x.png, a link to the directory). */
bool paths_same(const char *a, const char *b);

/* === safetensors === */

typedef enum DType {
    DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_F64,
    DTYPE_I64, DTYPE_I32, DTYPE_I16, DTYPE_I8, DTYPE_U8, DTYPE_BOOL,
} DType;

#define ST_MAX_DIMS 8

/* One tensor of an open safetensors file; data points into the mapped file (not aligned). */
typedef struct StTensor {
    const char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    int64_t numel;
    const void *data;
    size_t nbytes;
} StTensor;

typedef struct SafeTensors SafeTensors;

/* Maps and validates a whole file; every later lookup is safe. */
int st_open(SafeTensors **out, const char *path, Error *e);
void st_close(SafeTensors *st);
size_t st_count(const SafeTensors *st);
const StTensor *st_at(const SafeTensors *st, size_t i);
const StTensor *st_find(const SafeTensors *st, const char *name); /* NULL when absent */
/* Converts a F32/F16/BF16 tensor into dst (n floats, which must equal its numel). */
int st_read_f32(const SafeTensors *st, const char *name, float *dst, int64_t n, Error *e);

/* What st_write stores: data holds numel elements of dtype, little-endian. */
typedef struct StWriteTensor {
    const char *name;
    DType dtype;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
} StWriteTensor;

/* Writes a safetensors file atomically (temporary name, then rename). */
int st_write(const char *path, const StWriteTensor *tensors, size_t n, Error *e);

/* The header may claim at most this many bytes: real headers take tens of kilobytes, and the
 * parsed values of a hostile header cost ~70 bytes per byte (the Python library allows 100 MB,
 * which took 7 GB here before it was refused). */
#define ST_MAX_HEADER_BYTES 16000000u

/* "F32", "BF16", ... and the bytes of one element. */
const char *dtype_name(DType dtype);
size_t dtype_size(DType dtype);

/* Like st_open over bytes the caller keeps alive until st_close; name is used in messages. */
int st_open_memory(SafeTensors **out, const void *bytes, size_t size, const char *name, Error *e);
/* The path (or name) the file was opened with. */
const char *st_path(const SafeTensors *st);
/* A value of the header's "__metadata__" string map; NULL when absent. */
const char *st_metadata(const SafeTensors *st, const char *key);

/* A model stored as one or more safetensors files, found by one name:
 *   - a .safetensors file;
 *   - a "*.safetensors.index.json" whose "weight_map" maps tensor name -> shard file (a plain
 *     file name in the index's directory); every listed tensor must be in its shard;
 *   - a directory holding exactly one such index, or else exactly one .safetensors file.
 * Its tensors are those the index lists (in index order), or all of the single file's. */
typedef struct StModel StModel;

int st_model_open(StModel **out, const char *path, Error *e);
void st_model_close(StModel *m);
size_t st_model_count(const StModel *m);
const StTensor *st_model_at(const StModel *m, size_t i);
const StTensor *st_model_find(const StModel *m, const char *name); /* NULL when absent */
int st_model_read_f32(const StModel *m, const char *name, float *dst, int64_t n, Error *e);
/* Rows [first, first + rows) of tensor `name` (slices of its first dim: an embedding's rows)
 * into dst, converted to f32; works on st_model_random's models too. */
int st_model_read_rows_f32(const StModel *m, const char *name, int64_t first, int64_t rows,
                           float *dst, Error *e);
size_t st_model_shard_count(const StModel *m);
const SafeTensors *st_model_shard(const StModel *m, size_t i);

/* The name and shape of one tensor of a synthetic model. */
typedef struct StTensorSpec {
    const char *name;
    int ndim;
    int64_t shape[ST_MAX_DIMS];
} StTensorSpec;

/* The two distributions random weights are drawn from, each value from a hash of
 * (seed, tensor name, element index) alone, so any slice can be made on its own, on every read:
 * - RANDOM_FOR_TIMING: the model's activations stay O(1), to time and size a model without its
 *   files: uniform(-1, 1) / sqrt(last dim) for tensors of two or more dims, 1 + 0.1 uniform(-1, 1)
 *   for the others (norm weights and variances stay positive);
 * - RANDOM_FOR_TRAINING: as PyTorch's layers initialise themselves, to train from scratch:
 *   uniform(-1, 1) / sqrt(fan_in) for tensors of two or more dims (nn.Linear's and nn.Conv2d's
 *   bound, fan_in = numel / shape[0]), 0 for biases and running means, 1 for the others. */
typedef enum { RANDOM_FOR_TIMING, RANDOM_FOR_TRAINING } RandomKind;

/* A model made from names and shapes alone, its values drawn as kind says: no storage is
 * allocated for the weights. Its tensors are F32 with data NULL and nbytes 0, and it has no
 * shards, so ONLY st_model_read_f32 and st_model_read_rows_f32 may read them. Names are copied;
 * a repeated name, a negative dim or more than ST_MAX_DIMS dims is an error. */
int st_model_random(StModel **out, const StTensorSpec *specs, size_t n, uint64_t seed,
                    RandomKind kind, Error *e);
/* A random model of any tensor at any shape, for loaders that know the shapes they want (nn.c's
 * params_load): it lists no tensors and st_model_find finds none; st_model_random_any_source
 * tells it apart, and st_random_fill makes each tensor's values. */
int st_model_random_any(StModel **out, uint64_t seed, RandomKind kind, Error *e);
/* true, with its seed and kind, when m came from st_model_random_any. */
bool st_model_random_any_source(const StModel *m, uint64_t *seed, RandomKind *kind);
/* The values a random model of that seed and kind gives the tensor (name, shape) into
 * dst[product of shape]. */
void st_random_fill(uint64_t seed, RandomKind kind, const char *name, int ndim,
                    const int64_t *shape, float *dst);
/* dst[0 .. n-1] uniform in [-1, 1) from a hash of (seed, name, index): st_random_fill's source. */
void st_uniform_fill(uint64_t seed, const char *name, int64_t n, float *dst);
/* splitmix64's finaliser, a bijection of 64-bit values in which every input bit reaches every
 * output bit: the hash behind every seeded stream (random weights, training batches, scenes). */
uint64_t mix64(uint64_t x);

/* The memory this process could still allocate without swapping, in bytes: Linux's MemAvailable
 * (/proc/meminfo), macOS's physical memory (hw.memsize); 0 when unknown. */
size_t memory_available(void);

/* The size of a path buffer: Linux's PATH_MAX (the system refuses longer paths anyway). */
#define PATH_BYTES 4096
/* dir + "/" + name into path[size]; an error naming both when that does not fit. */
int path_join(char *path, size_t size, const char *dir, const char *name, Error *e);

/* === tokenizer ===
 * Byte-level BPE as Hugging Face's tokenizers library runs Qwen2/Qwen3's tokenizer.json (see
 * io.c): added tokens matched whole, NFC, the Split pre-tokenizer's regex, GPT-2's byte-level
 * characters, merges by rank. A tokenizer.json of another kind (WordPiece, Unigram, another
 * pre-tokenizer or normalizer, options such as byte_fallback) is refused with a message naming
 * what differs, never tokenized approximately. */
typedef struct Tokenizer Tokenizer;

/* ids[0 .. count) of one encoding; grows as needed. Zero-initialise; free with token_ids_free. */
typedef struct TokenIds {
    int32_t *ids;
    size_t count, capacity;
} TokenIds;

/* The NFC form of UTF-8 text[0 .. len) (Unicode 15.0, tools/gen_unicode.py) as a new
 * NUL-terminated string *out of *out_len bytes; invalid UTF-8 is an error. */
int utf8_nfc(const char *text, size_t len, char **out, size_t *out_len, Error *e);
/* The bytes of the UTF-8 character at s (at most avail bytes), or 0 when none starts there. */
size_t utf8_sequence_length(const unsigned char *s, size_t avail);
/* The characters of the NUL-terminated s, each byte that starts none counting as one. */
size_t utf8_count(const char *s);
/* <dir>/tokenizer.json and <dir>/tokenizer_config.json (its pad_token). */
int tokenizer_load(Tokenizer **out, const char *dir, Error *e);
/* The same from tokenizer.json's bytes alone (source names them in messages); without a config
 * the tokenizer has no pad token (tokenizer_pad_id -1). */
int tokenizer_from_json(Tokenizer **out, const char *text, size_t len, const char *source,
                        Error *e);
void tokenizer_free(Tokenizer *t);
/* text[0 .. len) (UTF-8; anything else is an error naming the byte) -> its ids appended to ids,
 * as tokenizer(text, add_special_tokens=False): special-token texts in it become their ids. */
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, TokenIds *ids, Error *e);
void token_ids_free(TokenIds *ids);
/* One more than the largest id the tokenizer can give. */
int32_t tokenizer_vocab_size(const Tokenizer *t);
/* The pad token's id, -1 when there is none. */
int32_t tokenizer_pad_id(const Tokenizer *t);

/* === specs: TYPE[:key=value,...] ===
 * The small grammar of options like --lambda-schedule power:start=12,end=1. */

/* One "key=value" a spec accepts: a finite number in [lo, hi], a whole one when integer. */
typedef struct SpecKey {
    const char *name;
    double *value;
    double lo, hi;
    bool integer;
} SpecKey;

/* Reads the "key=value,key=value" list after the colon of spec into the matching keys; `what`
 * names the option in errors ("--lambda-schedule power"). */
int spec_parse_keys(const char *what, const char *list, const SpecKey *keys, int n_keys,
                    Error *e);
/* The type name before the colon of spec (or all of it) as an index into names, or -1. */
int spec_type(const char *spec, const char *const *names, int n_names);
/* The key=value list after spec's colon, or NULL without one. */
const char *spec_keys_after_colon(const char *spec);

/* === evaluation sets (CSV) === */

/* One data row of a CSV. */
typedef struct EvalRow {
    int64_t index;      /* among the data rows, from 0 */
    char *input;        /* the prompt, or the embeddings path as written */
    char *path;         /* the embeddings path resolved against the CSV's directory; NULL for a
                           prompt */
    uint64_t seed;
} EvalRow;

typedef struct EvalCsv {
    EvalRow *rows;
    size_t n;
    bool prompts; /* a `prompt` column (through the text encoder), not `embeddings` */
} EvalCsv;

/* A `prompt[,seed]` or `embeddings[,seed]` CSV (need_seed: the seed column too; with both
 * columns, the embeddings). Blank lines are skipped and do not count as rows; every row has the
 * header's number of fields. */
int eval_csv_read(const char *path, bool need_seed, EvalCsv *c, Error *e);
/* The same from len bytes of text (path names it in errors). */
int eval_csv_parse(const char *text, size_t len, const char *path, bool need_seed, EvalCsv *c,
                   Error *e);
void eval_csv_free(EvalCsv *c);
/* A whole decimal seed in 0 .. 2^63 - 1 (a JSON integer). */
int parse_seed(const char *s, uint64_t *seed);

/* === images === */

/* Readers refuse images wider or taller than this, writers too. */
#define IMAGE_MAX_SIDE 16384

/* An 8-bit RGB image; rgb: [height, width, 3], interleaved, rows top to bottom. */
typedef struct Image {
    int width, height;
    uint8_t *rgb;
} Image;

/* Zero-filled pixels for 1 <= width, height <= IMAGE_MAX_SIDE. */
int image_alloc(Image *img, int width, int height, Error *e);
void image_free(Image *img);
/* A model's image chw [3, height, width] in [-1, 1] -> rgb [height, width, 3] as the pipelines
 * save it: ((x + 1) / 2) clipped to [0, 1], times 255, truncated (NaN becomes 0). */
void image_from_signed(const float *chw, int width, int height, uint8_t *rgb);

/* Binary PPM (P6) with maxval 255; bytes after the first image are ignored. */
int ppm_parse(Image *out, const void *bytes, size_t size, const char *source, Error *e);
int ppm_read(Image *out, const char *path, Error *e);
int ppm_write(const char *path, const Image *img, Error *e);
/* 8-bit RGB PNG, compressed by our own deflate (per-row filters, LZ77, fixed Huffman codes). */
int png_write(const char *path, const Image *img, Error *e);
/* The same with text under key in an iTXt chunk (UTF-8), as the generation parameters of
 * stable-diffusion tools ride in their images. key: 1..PNG_KEY_MAX bytes; text up to
 * PNG_TEXT_MAX. */
#define PNG_KEY_MAX 79
#define PNG_TEXT_MAX (1 << 20)
int png_write_text(const char *path, const Image *img, const char *key, const char *text,
                   Error *e);
/* The text under key of the first tEXt or uncompressed iTXt chunk of the PNG at path, a new
 * string in *text (NULL when there is none); the chunks are walked with every length checked
 * against the file's end, their CRCs not checked, the image not decoded. */
int png_read_text(const char *path, const char *key, char **text, Error *e);
/* The same on size bytes of a PNG (path names it in errors). */
int png_find_text(const unsigned char *bytes, size_t size, const char *path, const char *key,
                  char **text, Error *e);

#endif
