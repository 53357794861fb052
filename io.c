/* io.c - bytes <-> arrays: safetensors, JSON, tokenizers, evaluation-set CSVs, PPM/PNG. Safe
 * against hostile files.
 *
 * Nothing read from a file is trusted: every length is checked against the bytes that are left
 * before it is used, every size computation is checked for overflow, and a bad file gives an
 * Error naming the file and the problem, never a crash.
 *
 * Contents: errors and small helpers; files and the machine (mapped files, the machine's memory,
 * atomic writes, directories); f16 / bf16; JSON (arena, parser, typed lookups); safetensors
 * (name table, reader, writer, sharded models, synthetic models); tokenizer (Unicode, the
 * pre-tokenizer, byte-level BPE, tokenizer.json, encoding); specs; evaluation sets (CSV); images
 * (PPM, PNG). */
#include "io.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#ifdef __APPLE__
#include <sys/sysctl.h>
#endif
#include <unistd.h>

/* === errors and small helpers === */

/* The start and the end of whole[0 .. n) around " ... " into msg[0 .. size), neither cut inside
 * a UTF-8 character. */
static void error_keep_ends(char *msg, size_t size, const char *whole, size_t n) {
    static const char gap[] = " ... ";
    size_t head = (size - sizeof gap) / 2, tail = n - (size - sizeof gap - head);
    while (head > 0 && ((unsigned char)whole[head] & 0xC0) == 0x80) head--;
    while (tail < n && ((unsigned char)whole[tail] & 0xC0) == 0x80) tail++;
    memcpy(msg, whole, head);
    memcpy(msg + head, gap, sizeof gap - 1);
    memcpy(msg + head + sizeof gap - 1, whole + tail, n - tail + 1);
}

int error_setv(Error *e, const char *fmt, va_list ap) {
    if (!e) return -1;
    va_list again;
    va_copy(again, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    char *whole = n >= (int)sizeof e->msg ? malloc((size_t)n + 1) : NULL;
    vsnprintf(whole ? whole : e->msg, whole ? (size_t)n + 1 : sizeof e->msg, fmt, again);
    va_end(again);
    if (whole) error_keep_ends(e->msg, sizeof e->msg, whole, (size_t)n);
    free(whole);
    return -1;
}

int error_set(Error *e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    error_setv(e, fmt, ap);
    va_end(ap);
    return -1;
}

/* --- small helpers --- */

/* *out = a * b, or true when that overflows. */
static bool mul_overflows(uint64_t a, uint64_t b, uint64_t *out) {
    if (a != 0 && b > UINT64_MAX / a) return true;
    *out = a * b;
    return false;
}

/* File formats are little-endian (PNG big-endian) whatever the host is; byte loads also need no
 * alignment, and compilers turn them into single loads. */
static uint16_t load_le16(const unsigned char *p) {
    return (uint16_t)(p[0] | p[1] << 8);
}

static uint32_t load_le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t load_le64(const unsigned char *p) {
    return (uint64_t)load_le32(p) | (uint64_t)load_le32(p + 4) << 32;
}

static void store_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void store_be32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (24 - 8 * i));
}

static bool is_digit(unsigned char c) {
    return c >= '0' && c <= '9';
}

static bool has_suffix(const char *s, const char *suffix) {
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && memcmp(s + n - k, suffix, k) == 0;
}

static int compare_strings(const void *a, const void *b) {
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Length of the well-formed UTF-8 sequence at s (avail bytes readable), or 0 when there is none:
 * no overlong forms, no surrogates, nothing above U+10FFFF (Unicode 15, table 3-7). */
size_t utf8_sequence_length(const unsigned char *s, size_t avail) {
    if (avail == 0) return 0;
    unsigned char c = s[0];
    if (c < 0x80) return 1;
    size_t n;
    unsigned char lo = 0x80, hi = 0xBF; /* range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        n = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
        n = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        n = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        return 0;
    }
    if (avail < n || s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < n; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return n;
}

size_t utf8_count(const char *s) {
    const unsigned char *u = (const unsigned char *)s;
    size_t n = strlen(s), count = 0;
    for (size_t i = 0; i < n; count++) {
        size_t k = utf8_sequence_length(u + i, n - i);
        i += k ? k : 1;
    }
    return count;
}

static bool utf8_valid(const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_sequence_length(u + i, n - i);
        if (k == 0) return false;
        i += k;
    }
    return true;
}

/* Room for a name in an error message. */
#define PRINTABLE_BYTES 96

/* s with control characters shown as '?' and cut to fit buf, so that a hostile name cannot break
 * a one-line error message. */
static const char *printable(const char *s, char *buf, size_t size) {
    size_t n = 0;
    for (; *s && n + 4 < size; s++) buf[n++] = ((unsigned char)*s < 0x20 || *s == 0x7f) ? '?' : *s;
    if (*s) {
        for (; n > 0 && ((unsigned char)*s & 0xC0) == 0x80; n--) s--; /* never cut a character in two */
        memcpy(buf + n, "...", 3);
        n += 3;
    }
    buf[n] = '\0';
    return buf;
}

/* "[2, 3, 4]" into buf. */
static const char *format_shape(int ndim, const int64_t *shape, char *buf, size_t size) {
    size_t n = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < ndim && n < size; i++)
        n += (size_t)snprintf(buf + n, size - n, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (n < size) snprintf(buf + n, size - n, "]");
    return buf;
}

int path_join(char *path, size_t size, const char *dir, const char *name, Error *e) {
    int n = snprintf(path, size, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= size) return error_set(e, "path too long: %s/%s", dir, name);
    return 0;
}

/* The directory part of path ("." when it has none), malloc'd. */
static char *path_dirname(const char *path) {
    const char *slash = strrchr(path, '/');
    if (!slash) return strdup(".");
    if (slash == path) return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

/* === files and the machine === */

/* --- mapped files --- */

/* A file's bytes, mapped read-only; an empty file maps to nothing. */
typedef struct MappedFile {
    const unsigned char *bytes;
    size_t size;
    void *map;
} MappedFile;

static int map_file(MappedFile *m, const char *path, Error *e) {
    memset(m, 0, sizeof *m);
    /* non-blocking: a FIFO in place of a file must not wait for a writer before it is refused */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) return error_set(e, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        return error_set(e, "%s: cannot stat: %s", path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return error_set(e, "%s: not a regular file", path);
    }
    if ((uintmax_t)sb.st_size > SIZE_MAX) {
        close(fd);
        return error_set(e, "%s: too large to map", path);
    }
    m->size = (size_t)sb.st_size;
    if (m->size > 0) {
        void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int err = errno;
            close(fd);
            return error_set(e, "%s: cannot map: %s", path, strerror(err));
        }
        m->map = p;
        m->bytes = p;
    }
    close(fd);
    return 0;
}

static void unmap_file(MappedFile *m) {
    if (m->map) munmap(m->map, m->size);
    memset(m, 0, sizeof *m);
}

/* --- the machine --- */

#ifdef __APPLE__
/* macOS keeps no MemAvailable: the physical memory (hw.memsize) stands for it. */
size_t memory_available(void) {
    uint64_t bytes = 0;
    size_t len = sizeof bytes;
    if (sysctlbyname("hw.memsize", &bytes, &len, NULL, 0) != 0) return 0;
    return bytes > SIZE_MAX ? SIZE_MAX : (size_t)bytes;
}
#else
/* Linux: MemAvailable of /proc/meminfo, the kernel's estimate of what can be allocated without
 * swapping (free memory plus the caches it can drop). */
size_t memory_available(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    unsigned long long kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %llu kB", &kib) == 1) break;
    fclose(f);
    return kib > SIZE_MAX / 1024 ? SIZE_MAX : (size_t)kib * 1024;
}
#endif

/* --- atomic files --- */

struct AtomicFile {
    FILE *file;
    char *path;
    char *tmp_path;
};

static void atomic_free(AtomicFile *f) {
    free(f->path);
    free(f->tmp_path);
    free(f);
}

/* Creates the temporary file without following a link someone put in its place. */
static int atomic_create(const char *tmp_path) {
    int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW;
    int fd = open(tmp_path, flags, 0666);
    if (fd < 0 && errno == EEXIST) { /* left behind by a dead process that had our pid */
        unlink(tmp_path);
        fd = open(tmp_path, flags, 0666);
    }
    return fd;
}

int atomic_open(AtomicFile **out, const char *path, Error *e) {
    *out = NULL;
    AtomicFile *f = calloc(1, sizeof *f);
    size_t tmp_size = strlen(path) + 32;
    if (f) {
        f->path = strdup(path);
        f->tmp_path = malloc(tmp_size);
    }
    if (!f || !f->path || !f->tmp_path) {
        if (f) atomic_free(f);
        return error_set(e, "%s: out of memory", path);
    }
    snprintf(f->tmp_path, tmp_size, "%s.tmp.%ld", path, (long)getpid());
    int fd = atomic_create(f->tmp_path);
    if (fd < 0) {
        error_set(e, "%s: cannot create %s: %s", path, f->tmp_path, strerror(errno));
        atomic_free(f);
        return -1;
    }
    f->file = fdopen(fd, "wb");
    if (!f->file) {
        error_set(e, "%s: cannot open %s: %s", path, f->tmp_path, strerror(errno));
        close(fd);
        unlink(f->tmp_path);
        atomic_free(f);
        return -1;
    }
    *out = f;
    return 0;
}

int atomic_write(AtomicFile *f, const void *data, size_t n, Error *e) {
    if (n > 0 && fwrite(data, 1, n, f->file) != n)
        return error_set(e, "%s: cannot write %s: %s", f->path, f->tmp_path, strerror(errno));
    return 0;
}

/* A rename is only durable once its directory is synced too; some file systems refuse, and the
 * data itself is already safe, so failure here is not an error. */
static void sync_directory_of(const char *path) {
    char *dir = path_dirname(path);
    int fd = dir ? open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dir);
}

int atomic_commit(AtomicFile *f, Error *e) {
    int rc = 0;
    if (fflush(f->file) != 0 || fsync(fileno(f->file)) != 0)
        rc = error_set(e, "%s: cannot write %s: %s", f->path, f->tmp_path, strerror(errno));
    if (fclose(f->file) != 0 && rc == 0)
        rc = error_set(e, "%s: cannot close %s: %s", f->path, f->tmp_path, strerror(errno));
    if (rc == 0 && rename(f->tmp_path, f->path) != 0)
        rc = error_set(e, "%s: cannot rename %s into place: %s", f->path, f->tmp_path, strerror(errno));
    if (rc == 0) sync_directory_of(f->path);
    else unlink(f->tmp_path);
    atomic_free(f);
    return rc;
}

void atomic_abort(AtomicFile *f) {
    if (!f) return;
    fclose(f->file);
    unlink(f->tmp_path);
    atomic_free(f);
}

int file_read_all(const char *path, char **text, size_t *len, Error *e) {
    MappedFile file;
    *text = NULL;
    if (map_file(&file, path, e)) return -1; /* a regular file, or an error (a FIFO: at once) */
    size_t size = file.size;
    char *copy = malloc(size + 1);
    if (copy) {
        if (size) memcpy(copy, file.bytes, size);
        copy[size] = '\0';
    }
    unmap_file(&file);
    if (!copy) return error_set(e, "%s: out of memory", path);
    *text = copy;
    *len = size;
    return 0;
}

int write_file_atomic(const char *path, const void *data, size_t n, Error *e) {
    AtomicFile *f;
    if (atomic_open(&f, path, e)) return -1;
    if (atomic_write(f, data, n, e)) {
        atomic_abort(f);
        return -1;
    }
    return atomic_commit(f, e);
}

/* --- directories --- */

void dir_list_free(char **names, size_t count) {
    for (size_t i = 0; i < count; i++) free(names[i]);
    free(names);
}

/* The file path names once written: its directory resolved by realpath (links, "..", "."), then
 * its last component, into out (false when the directory does not resolve or it is too long). */
static bool path_resolve(const char *path, char *out, size_t len) {
    const char *slash = strrchr(path, '/');
    char dir[PATH_BYTES];
    int n = slash == path ? snprintf(dir, sizeof dir, "/")
                          : snprintf(dir, sizeof dir, "%.*s", slash ? (int)(slash - path) : 1,
                                     slash ? path : ".");
    if (n < 0 || (size_t)n >= sizeof dir) return false;
    char *real = realpath(dir, NULL);
    if (!real) return false;
    n = snprintf(out, len, "%s/%s", real, slash ? slash + 1 : path);
    free(real);
    return n >= 0 && (size_t)n < len;
}

bool paths_same(const char *a, const char *b) {
    char ra[PATH_BYTES], rb[PATH_BYTES];
    return !strcmp(a, b) || (path_resolve(a, ra, sizeof ra) && path_resolve(b, rb, sizeof rb) &&
                             !strcmp(ra, rb));
}

int dir_make(const char *dir, Error *e) {
    struct stat sb;
    if (mkdir(dir, 0777) == 0 || (errno == EEXIST && stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode)))
        return 0;
    return error_set(e, "%s: cannot create directory: %s", dir,
                     errno == EEXIST ? "a file of that name exists" : strerror(errno));
}

int dir_list(const char *dir, char ***names, size_t *count, Error *e) {
    *names = NULL;
    *count = 0;
    DIR *d = opendir(dir);
    if (!d) return error_set(e, "%s: cannot open directory: %s", dir, strerror(errno));
    char **list = NULL;
    size_t n = 0, capacity = 0;
    struct dirent *entry;
    while ((entry = readdir(d)) != NULL) {
        if (!strcmp(entry->d_name, ".") || !strcmp(entry->d_name, "..")) continue;
        if (n == capacity) {
            size_t wanted = capacity ? 2 * capacity : 16;
            char **grown = wanted <= SIZE_MAX / sizeof *list ? realloc(list, wanted * sizeof *list) : NULL;
            if (!grown) break;
            list = grown;
            capacity = wanted;
        }
        if (!(list[n] = strdup(entry->d_name))) break;
        n++;
    }
    bool complete = entry == NULL;
    closedir(d);
    if (!complete) {
        dir_list_free(list, n);
        return error_set(e, "%s: out of memory listing the directory", dir);
    }
    if (n > 1) qsort(list, n, sizeof *list, compare_strings);
    *names = list;
    *count = n;
    return 0;
}

/* === f16 / bf16 === */

/* bf16 is the top half of an f32. */
float bf16_to_f32(uint16_t h) {
    return bits_float((uint32_t)h << 16);
}

uint16_t f32_to_bf16(float f) {
    uint32_t u = float_bits(f);
    /* Truncating a NaN could drop every payload bit and leave inf, so force the quiet bit. */
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)(u >> 16 | 0x0040);
    uint32_t round_half_even = 0x7fffu + (u >> 16 & 1);
    return (uint16_t)((u + round_half_even) >> 16);
}

/* f16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits. */
float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exponent = (uint32_t)h >> 10 & 0x1f;
    uint32_t mantissa = h & 0x3ffu;
    uint32_t magnitude;
    if (exponent == 0x1f) /* inf or NaN, payload kept */
        magnitude = 0x7f800000u | mantissa << 13;
    else if (exponent != 0) /* normal: rebias the exponent from 15 to 127 */
        magnitude = (exponent + 112) << 23 | mantissa << 13;
    else /* zero or subnormal: mantissa * 2^-24, exact in f32 */
        magnitude = float_bits((float)mantissa * 0x1p-24f);
    return bits_float(sign | magnitude);
}

/* value >> shift rounded to nearest, ties to even; 1 <= shift <= 31. */
static uint32_t shift_right_round_even(uint32_t value, int shift) {
    uint32_t kept = value >> shift;
    uint32_t rest = value & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    return kept + (rest > half || (rest == half && (kept & 1)));
}

uint16_t f32_to_f16(float f) {
    uint32_t u = float_bits(f);
    uint16_t sign = (uint16_t)(u >> 16 & 0x8000);
    uint32_t magnitude = u & 0x7fffffffu;
    int exponent = (int)(magnitude >> 23);
    uint32_t mantissa = magnitude & 0x7fffffu;
    if (magnitude > 0x7f800000u) return sign | 0x7e00 | (uint16_t)(mantissa >> 13); /* NaN */
    if (magnitude >= 0x477ff000u) return sign | 0x7c00; /* 65520 and up round to inf */
    if (exponent >= 113) /* f16 normal; a rounding carry moves into the exponent by itself */
        return sign | (uint16_t)shift_right_round_even((uint32_t)(exponent - 112) << 23 | mantissa, 13);
    if (exponent < 102) return sign; /* below 2^-25, half the smallest subnormal: rounds to 0 */
    /* f16 subnormal: in units of 2^-24 the value is (2^23 + mantissa) * 2^(exponent - 126). */
    return sign | (uint16_t)shift_right_round_even(0x800000u | mantissa, 126 - exponent);
}

void bf16_to_f32_array(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

void f16_to_f32_array(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

/* === JSON === */

/* --- arena --- */

/* A JSON document's values and strings live in a few big blocks, freed at once. */
typedef struct ArenaBlock {
    struct ArenaBlock *next;
    size_t used, size;
    max_align_t data[];
} ArenaBlock;

typedef struct Arena {
    ArenaBlock *head;
} Arena;

#define ARENA_BLOCK_BYTES 65536

/* n bytes aligned to align (a power of two at most max_align_t's): strings take align 1, so a
 * document of short strings does not pay 16 bytes for each. */
static void *arena_alloc(Arena *a, size_t n, size_t align) {
    if (n > SIZE_MAX - _Alignof(max_align_t) - sizeof(ArenaBlock)) return NULL;
    ArenaBlock *b = a->head;
    size_t at = b ? (b->used + align - 1) & ~(align - 1) : 0;
    if (!b || at > b->size || b->size - at < n) {
        size_t size = n > ARENA_BLOCK_BYTES ? n : ARENA_BLOCK_BYTES;
        b = malloc(sizeof *b + size);
        if (!b) return NULL;
        b->next = a->head;
        b->size = size;
        a->head = b;
        at = 0;
    }
    b->used = at + n;
    return (unsigned char *)b->data + at;
}

static void arena_free(Arena *a) {
    while (a->head) {
        ArenaBlock *next = a->head->next;
        free(a->head);
        a->head = next;
    }
}

/* --- JSON parser --- */

struct JsonDoc {
    Arena arena;
    const JsonValue *root;
};

/* Longest number literal accepted; Python writes any double in 24 characters. */
#define JSON_NUMBER_MAX_CHARS 256

/* Recursive descent over text. The items of every open array (members of every open object)
 * wait on a stack until it closes, then move to the arena in one exactly-sized piece. */
typedef struct JsonParser {
    const unsigned char *text;
    size_t len, pos;
    int depth;
    const char *source;
    Arena *arena;
    JsonValue *items;
    size_t item_count, item_capacity;
    JsonMember *members;
    size_t member_count, member_capacity;
    Error *e;
} JsonParser;

static int json_error(JsonParser *p, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* "<source>: invalid JSON at line L, column C: <what>". */
static int json_error(JsonParser *p, const char *fmt, ...) {
    char what[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    size_t line = 1, column = 1;
    for (size_t i = 0; i < p->pos && i < p->len; i++) {
        if (p->text[i] == '\n') {
            line++;
            column = 1;
        } else {
            column++;
        }
    }
    return error_set(p->e, "%s: invalid JSON at line %zu, column %zu: %s", p->source, line, column, what);
}

static void json_skip_space(JsonParser *p) {
    while (p->pos < p->len) {
        unsigned char c = p->text[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        p->pos++;
    }
}

/* The next byte, or 0 at the end (0 never starts or continues a valid token). */
static unsigned char json_peek(const JsonParser *p) {
    return p->pos < p->len ? p->text[p->pos] : 0;
}

/* stack (count elements of size `size`) with room for one more, or NULL when out of memory. */
static void *json_stack_reserve(JsonParser *p, void *stack, size_t count, size_t *capacity, size_t size) {
    if (count < *capacity) return stack;
    size_t wanted = *capacity ? *capacity * 2 : 16;
    void *grown = wanted <= SIZE_MAX / size ? realloc(stack, wanted * size) : NULL;
    if (!grown) {
        json_error(p, "out of memory");
        return NULL;
    }
    *capacity = wanted;
    return grown;
}

/* count elements of size `size` copied into the arena (NULL when count is 0). */
static int json_to_arena(JsonParser *p, const void *src, size_t count, size_t size, const void **out) {
    *out = NULL;
    if (count == 0) return 0;
    void *dst = count <= SIZE_MAX / size
                    ? arena_alloc(p->arena, count * size, _Alignof(JsonValue))
                    : NULL;
    if (!dst) return json_error(p, "out of memory");
    memcpy(dst, src, count * size);
    *out = dst;
    return 0;
}

static int json_parse_value(JsonParser *p, JsonValue *out);

static int json_hex_digit(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The 4 hex digits at text[at .. at+4), which must end by `end`; false when they are not. */
static bool json_hex4(const JsonParser *p, size_t at, size_t end, uint32_t *out) {
    if (at > end || end - at < 4) return false;
    uint32_t v = 0;
    for (size_t i = at; i < at + 4; i++) {
        int d = json_hex_digit(p->text[i]);
        if (d < 0) return false;
        v = v << 4 | (uint32_t)d;
    }
    *out = v;
    return true;
}

/* Appends code point cp (valid, not a surrogate) to dst as UTF-8; returns the bytes written. */
static size_t utf8_encode(uint32_t cp, char *dst) {
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        dst[0] = (char)(0xC0 | cp >> 6);
        dst[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | cp >> 12);
        dst[1] = (char)(0x80 | (cp >> 6 & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | cp >> 18);
    dst[1] = (char)(0x80 | (cp >> 12 & 0x3F));
    dst[2] = (char)(0x80 | (cp >> 6 & 0x3F));
    dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* \uXXXX at p->pos (a UTF-16 unit; a high surrogate needs its low half right after). */
static int json_parse_unicode_escape(JsonParser *p, size_t end, char *dst, size_t *n) {
    uint32_t cp, low;
    if (!json_hex4(p, p->pos + 2, end, &cp)) return json_error(p, "bad \\u escape");
    p->pos += 6;
    if (cp >= 0xD800 && cp <= 0xDBFF) {
        bool paired = end - p->pos >= 6 && p->text[p->pos] == '\\' && p->text[p->pos + 1] == 'u' &&
                      json_hex4(p, p->pos + 2, end, &low) && low >= 0xDC00 && low <= 0xDFFF;
        if (!paired) return json_error(p, "unpaired surrogate in a \\u escape");
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
        p->pos += 6;
    } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
        return json_error(p, "unpaired surrogate in a \\u escape");
    }
    if (cp == 0) return json_error(p, "\\u0000 is not supported (strings are C strings)");
    *n += utf8_encode(cp, dst + *n);
    return 0;
}

/* The escape at p->pos (a backslash, with at least one byte after it before end). */
static int json_parse_escape(JsonParser *p, size_t end, char *dst, size_t *n) {
    static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
    unsigned char c = p->text[p->pos + 1];
    if (c == 'u') return json_parse_unicode_escape(p, end, dst, n);
    const char *hit = c ? strchr(from, c) : NULL;
    if (!hit) return json_error(p, "unknown escape '\\%c'", c >= 0x20 && c < 0x7f ? c : '?');
    dst[(*n)++] = to[hit - from];
    p->pos += 2;
    return 0;
}

/* The string whose opening quote is at p->pos, decoded into the arena. Escapes only ever
 * shrink text, so the raw length bounds the decoded one. */
static int json_parse_string(JsonParser *p, const char **out, size_t *length) {
    size_t start = p->pos + 1, end = start;
    while (end < p->len && p->text[end] != '"') end += p->text[end] == '\\' ? 2 : 1;
    if (end >= p->len) return json_error(p, "unterminated string");
    char *dst = arena_alloc(p->arena, end - start + 1, 1);
    if (!dst) return json_error(p, "out of memory");
    size_t n = 0;
    p->pos = start;
    while (p->pos < end) {
        unsigned char c = p->text[p->pos];
        if (c == '\\') {
            if (json_parse_escape(p, end, dst, &n)) return -1;
        } else if (c < 0x20) {
            return json_error(p, "control character in a string");
        } else {
            size_t k = utf8_sequence_length(p->text + p->pos, end - p->pos);
            if (k == 0) return json_error(p, "invalid UTF-8 in a string");
            memcpy(dst + n, p->text + p->pos, k);
            n += k;
            p->pos += k;
        }
    }
    p->pos = end + 1;
    dst[n] = '\0';
    *out = dst;
    *length = n;
    return 0;
}

/* An integer literal ("-"? digits) as int64; false when it does not fit. */
static bool json_integer(const char *s, int64_t *out) {
    bool negative = *s == '-';
    if (negative) s++;
    uint64_t limit = negative ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    uint64_t v = 0;
    for (; *s; s++) {
        uint64_t digit = (uint64_t)(*s - '0');
        if (v > (limit - digit) / 10) return false;
        v = v * 10 + digit;
    }
    if (!negative) *out = (int64_t)v;
    else *out = v == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)v;
    return true;
}

/* Skips the digits at p->pos; false when there is not at least one. */
static bool json_skip_digits(JsonParser *p) {
    size_t start = p->pos;
    while (is_digit(json_peek(p))) p->pos++;
    return p->pos > start;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static int json_parse_number(JsonParser *p, JsonValue *out) {
    size_t start = p->pos;
    bool integral = true;
    if (json_peek(p) == '-') p->pos++;
    if (json_peek(p) == '0') p->pos++;
    else if (!json_skip_digits(p)) return json_error(p, "expected a digit");
    if (json_peek(p) == '.') {
        integral = false;
        p->pos++;
        if (!json_skip_digits(p)) return json_error(p, "expected a digit after '.'");
    }
    if (json_peek(p) == 'e' || json_peek(p) == 'E') {
        integral = false;
        p->pos++;
        if (json_peek(p) == '+' || json_peek(p) == '-') p->pos++;
        if (!json_skip_digits(p)) return json_error(p, "expected a digit in the exponent");
    }
    size_t n = p->pos - start;
    if (n > JSON_NUMBER_MAX_CHARS) return json_error(p, "number longer than %d characters", JSON_NUMBER_MAX_CHARS);
    char literal[JSON_NUMBER_MAX_CHARS + 1];
    memcpy(literal, p->text + start, n);
    literal[n] = '\0';
    out->type = JSON_NUMBER;
    out->number = strtod(literal, NULL); /* the "C" locale: diamond never calls setlocale */
    if (!(out->number >= -DBL_MAX && out->number <= DBL_MAX))
        return json_error(p, "number out of range");
    out->is_integer = integral && json_integer(literal, &out->integer);
    return 0;
}

/* true, false or null. */
static int json_parse_word(JsonParser *p, JsonValue *out) {
    static const struct {
        const char *word;
        JsonType type;
        bool boolean;
    } words[] = {{"true", JSON_BOOL, true}, {"false", JSON_BOOL, false}, {"null", JSON_NULL, false}};
    for (size_t i = 0; i < COUNT(words); i++) {
        size_t n = strlen(words[i].word);
        if (p->len - p->pos >= n && memcmp(p->text + p->pos, words[i].word, n) == 0) {
            out->type = words[i].type;
            out->boolean = words[i].boolean;
            p->pos += n;
            return 0;
        }
    }
    unsigned char c = json_peek(p);
    return json_error(p, "unexpected character '%c'", c >= 0x20 && c < 0x7f ? c : '?');
}

static int json_parse_array(JsonParser *p, JsonValue *out) {
    size_t first = p->item_count;
    p->pos++; /* '[' */
    json_skip_space(p);
    if (json_peek(p) == ']') {
        p->pos++;
    } else {
        for (;;) {
            JsonValue item;
            if (json_parse_value(p, &item)) return -1;
            JsonValue *items = json_stack_reserve(p, p->items, p->item_count, &p->item_capacity, sizeof item);
            if (!items) return -1;
            p->items = items;
            p->items[p->item_count++] = item;
            json_skip_space(p);
            unsigned char c = json_peek(p);
            p->pos++;
            if (c == ']') break;
            if (c != ',') {
                p->pos--;
                return json_error(p, "expected ',' or ']' in an array");
            }
        }
    }
    out->type = JSON_ARRAY;
    out->count = p->item_count - first;
    const void *items;
    if (json_to_arena(p, p->items + first, out->count, sizeof *p->items, &items)) return -1;
    out->items = items;
    p->item_count = first;
    return 0;
}

/* Sorts the keys of an object to find any that repeat. */
static int json_check_unique_keys(JsonParser *p, const JsonValue *object) {
    if (object->count < 2) return 0;
    const char **keys = malloc(object->count * sizeof *keys);
    if (!keys) return json_error(p, "out of memory");
    for (size_t i = 0; i < object->count; i++) keys[i] = object->members[i].key;
    qsort(keys, object->count, sizeof *keys, compare_strings);
    int rc = 0;
    for (size_t i = 1; i < object->count; i++) {
        if (rc) break;
        if (strcmp(keys[i - 1], keys[i]) == 0) {
            char buf[PRINTABLE_BYTES];
            rc = json_error(p, "duplicate key \"%s\"", printable(keys[i], buf, sizeof buf));
        }
    }
    free(keys);
    return rc;
}

static int json_parse_member(JsonParser *p) {
    JsonMember member;
    size_t key_length;
    json_skip_space(p);
    if (json_peek(p) != '"') return json_error(p, "expected a string key");
    if (json_parse_string(p, &member.key, &key_length)) return -1;
    json_skip_space(p);
    if (json_peek(p) != ':') return json_error(p, "expected ':' after a key");
    p->pos++;
    if (json_parse_value(p, &member.value)) return -1;
    JsonMember *members = json_stack_reserve(p, p->members, p->member_count, &p->member_capacity, sizeof member);
    if (!members) return -1;
    p->members = members;
    p->members[p->member_count++] = member;
    return 0;
}

static int json_parse_object(JsonParser *p, JsonValue *out) {
    size_t first = p->member_count;
    p->pos++; /* '{' */
    json_skip_space(p);
    if (json_peek(p) == '}') {
        p->pos++;
    } else {
        for (;;) {
            if (json_parse_member(p)) return -1;
            json_skip_space(p);
            unsigned char c = json_peek(p);
            p->pos++;
            if (c == '}') break;
            if (c != ',') {
                p->pos--;
                return json_error(p, "expected ',' or '}' in an object");
            }
        }
    }
    out->type = JSON_OBJECT;
    out->count = p->member_count - first;
    const void *members;
    if (json_to_arena(p, p->members + first, out->count, sizeof *p->members, &members)) return -1;
    out->members = members;
    p->member_count = first;
    return json_check_unique_keys(p, out);
}

static int json_parse_value(JsonParser *p, JsonValue *out) {
    memset(out, 0, sizeof *out);
    out->source = p->source;
    json_skip_space(p);
    unsigned char c = json_peek(p);
    if (p->pos >= p->len) return json_error(p, "unexpected end of input");
    if (c == '"') {
        out->type = JSON_STRING;
        return json_parse_string(p, &out->string, &out->length);
    }
    if (c == '-' || is_digit(c)) return json_parse_number(p, out);
    if (c != '[' && c != '{') return json_parse_word(p, out);
    if (p->depth >= JSON_MAX_DEPTH) return json_error(p, "nested deeper than %d levels", JSON_MAX_DEPTH);
    p->depth++;
    int rc = c == '[' ? json_parse_array(p, out) : json_parse_object(p, out);
    p->depth--;
    return rc;
}

int json_parse(JsonDoc **out, const char *text, size_t len, const char *source, Error *e) {
    *out = NULL;
    JsonDoc *doc = calloc(1, sizeof *doc);
    size_t source_size = strlen(source) + 1;
    char *name = doc ? arena_alloc(&doc->arena, source_size, 1) : NULL;
    JsonValue *root = name ? arena_alloc(&doc->arena, sizeof *root, _Alignof(JsonValue)) : NULL;
    if (!root) {
        if (doc) arena_free(&doc->arena);
        free(doc);
        return error_set(e, "%s: out of memory", source);
    }
    memcpy(name, source, source_size);
    JsonParser p = {.text = (const unsigned char *)text, .len = len, .source = name, .arena = &doc->arena, .e = e};
    int rc = json_parse_value(&p, root);
    if (rc == 0) {
        json_skip_space(&p);
        if (p.pos < p.len) rc = json_error(&p, "unexpected data after the value");
    }
    free(p.items);
    free(p.members);
    if (rc != 0) {
        json_free(doc);
        return -1;
    }
    doc->root = root;
    *out = doc;
    return 0;
}

int json_parse_file(JsonDoc **out, const char *path, Error *e) {
    MappedFile file;
    *out = NULL;
    if (map_file(&file, path, e)) return -1;
    int rc = file.size > JSON_FILE_MAX
                 ? error_set(e, "%s: %zu bytes; a JSON file is read up to %d MiB (configs and "
                                "indexes take kilobytes)", path, file.size, JSON_FILE_MAX >> 20)
                 : json_parse(out, (const char *)file.bytes, file.size, path, e);
    unmap_file(&file);
    return rc;
}

const JsonValue *json_root(const JsonDoc *doc) {
    return doc->root;
}

void json_free(JsonDoc *doc) {
    if (!doc) return;
    arena_free(&doc->arena);
    free(doc);
}

/* --- JSON lookups --- */

const JsonValue *json_get(const JsonValue *object, const char *key) {
    if (!object || object->type != JSON_OBJECT) return NULL;
    for (size_t i = 0; i < object->count; i++)
        if (strcmp(object->members[i].key, key) == 0) return &object->members[i].value;
    return NULL;
}

static const char *json_type_name(const JsonValue *v) {
    switch (v->type) {
    case JSON_NULL: return "null";
    case JSON_BOOL: return "a boolean";
    case JSON_NUMBER: return v->is_integer ? "an integer" : "a non-integer number";
    case JSON_STRING: return "a string";
    case JSON_ARRAY: return "an array";
    case JSON_OBJECT: return "an object";
    }
    return "?";
}

/* The member key of object, or NULL with an error naming the key. */
static const JsonValue *json_require(const JsonValue *object, const char *key, Error *e) {
    if (!object || object->type != JSON_OBJECT) {
        error_set(e, "%s: cannot look up key '%s' in %s", object ? object->source : "JSON", key,
                  object ? json_type_name(object) : "nothing");
        return NULL;
    }
    const JsonValue *v = json_get(object, key);
    if (!v) error_set(e, "%s: key '%s' is missing", object->source, key);
    return v;
}

static int json_wrong_type(const JsonValue *v, const char *key, const char *expected, Error *e) {
    return error_set(e, "%s: key '%s' is %s, expected %s", v->source, key, json_type_name(v), expected);
}

int json_get_int(const JsonValue *object, const char *key, int64_t *out, Error *e) {
    const JsonValue *v = json_require(object, key, e);
    if (!v) return -1;
    if (v->type != JSON_NUMBER || !v->is_integer) return json_wrong_type(v, key, "an integer", e);
    *out = v->integer;
    return 0;
}

int json_get_int_in(const JsonValue *object, const char *key, int64_t lo, int64_t hi, int *out,
                    Error *e) {
    int64_t v = 0;
    if (json_get_int(object, key, &v, e)) return -1;
    if (v < lo || v > hi || v < INT_MIN || v > INT_MAX)
        return error_set(e, "%s: key '%s' is %lld, expected %lld..%lld", object->source, key,
                         (long long)v, (long long)lo, (long long)hi);
    *out = (int)v;
    return 0;
}

int json_get_float(const JsonValue *object, const char *key, double *out, Error *e) {
    const JsonValue *v = json_require(object, key, e);
    if (!v) return -1;
    if (v->type != JSON_NUMBER) return json_wrong_type(v, key, "a number", e);
    *out = v->number;
    return 0;
}

int json_get_bool(const JsonValue *object, const char *key, bool *out, Error *e) {
    const JsonValue *v = json_require(object, key, e);
    if (!v) return -1;
    if (v->type != JSON_BOOL) return json_wrong_type(v, key, "a boolean", e);
    *out = v->boolean;
    return 0;
}

int json_get_string(const JsonValue *object, const char *key, const char **out, Error *e) {
    const JsonValue *v = json_require(object, key, e);
    if (!v) return -1;
    if (v->type != JSON_STRING) return json_wrong_type(v, key, "a string", e);
    *out = v->string;
    return 0;
}

int json_get_int_array(const JsonValue *object, const char *key, int64_t *out, size_t capacity,
                       size_t *count, Error *e) {
    const JsonValue *v = json_require(object, key, e);
    if (!v) return -1;
    if (v->type != JSON_ARRAY) return json_wrong_type(v, key, "an array of integers", e);
    if (v->count > capacity)
        return error_set(e, "%s: key '%s' has %zu entries, at most %zu allowed", v->source, key, v->count, capacity);
    for (size_t i = 0; i < v->count; i++) {
        const JsonValue *item = &v->items[i];
        if (item->type != JSON_NUMBER || !item->is_integer)
            return error_set(e, "%s: key '%s'[%zu] is %s, expected an integer", v->source, key, i,
                             json_type_name(item));
    }
    for (size_t i = 0; i < v->count; i++) out[i] = v->items[i].integer;
    *count = v->count;
    return 0;
}

/* Whether v is the JSON literal lit[0 .. len): null, true, false, a "string" without escapes,
 * or a number (within a relative 1e-9). */
static bool json_is_literal(const JsonValue *v, const char *lit, size_t len) {
    if (len >= 2 && lit[0] == '"')
        return v->type == JSON_STRING && v->length == len - 2 &&
               !memcmp(v->string, lit + 1, len - 2);
    if (len == 4 && !memcmp(lit, "null", 4)) return v->type == JSON_NULL;
    if (len == 4 && !memcmp(lit, "true", 4)) return v->type == JSON_BOOL && v->boolean;
    if (len == 5 && !memcmp(lit, "false", 5)) return v->type == JSON_BOOL && !v->boolean;
    char number[32];
    if (v->type != JSON_NUMBER || len >= sizeof number) return false;
    memcpy(number, lit, len);
    number[len] = '\0';
    double want = strtod(number, NULL);
    return fabs(v->number - want) <= 1e-9 * fabs(want);
}

/* Whether v is one of the '|'-separated literals in accepts. */
static bool json_is_one_of(const JsonValue *v, const char *accepts) {
    for (const char *at = accepts;;) {
        size_t len = strcspn(at, "|");
        if (json_is_literal(v, at, len)) return true;
        if (!at[len]) return false;
        at += len + 1;
    }
}

/* v in a few words for a message: the number, boolean or (start of the) string, else its type. */
static void json_describe(const JsonValue *v, char *buf, size_t size) {
    switch (v->type) {
    case JSON_NULL: snprintf(buf, size, "null"); break;
    case JSON_BOOL: snprintf(buf, size, "%s", v->boolean ? "true" : "false"); break;
    case JSON_NUMBER: snprintf(buf, size, "%.10g", v->number); break;
    case JSON_STRING: {
        char text[48];
        snprintf(buf, size, "\"%s\"", printable(v->string, text, sizeof text));
        break;
    }
    default: snprintf(buf, size, "%s", json_type_name(v)); break;
    }
}

int json_require_defaults(const JsonValue *object, const KeyDefault *keys, size_t n, Error *e) {
    for (size_t i = 0; i < n; i++) {
        const JsonValue *v = json_get(object, keys[i].key);
        if (!v || json_is_one_of(v, keys[i].accepts)) continue;
        char value[64];
        json_describe(v, value, sizeof value);
        return error_set(e, "%s: key '%s' is %s; diamond implements only %s", object->source,
                         keys[i].key, value, keys[i].accepts);
    }
    return 0;
}

/* === safetensors === */

static const struct {
    const char *name;
    size_t size;
} dtype_info[] = {
    [DTYPE_F32] = {"F32", 4}, [DTYPE_F16] = {"F16", 2}, [DTYPE_BF16] = {"BF16", 2}, [DTYPE_F64] = {"F64", 8},
    [DTYPE_I64] = {"I64", 8}, [DTYPE_I32] = {"I32", 4}, [DTYPE_I16] = {"I16", 2},   [DTYPE_I8] = {"I8", 1},
    [DTYPE_U8] = {"U8", 1},   [DTYPE_BOOL] = {"BOOL", 1},
};

#define DTYPE_COUNT COUNT(dtype_info)

const char *dtype_name(DType dtype) {
    return (size_t)dtype < DTYPE_COUNT ? dtype_info[dtype].name : "?";
}

size_t dtype_size(DType dtype) {
    return (size_t)dtype < DTYPE_COUNT ? dtype_info[dtype].size : 0;
}

static bool dtype_parse(const char *name, DType *out) {
    for (size_t i = 0; i < DTYPE_COUNT; i++) {
        if (strcmp(dtype_info[i].name, name) == 0) {
            *out = (DType)i;
            return true;
        }
    }
    return false;
}

/* --- name table: open addressing, linear probing, FNV-1a --- */

typedef struct NameSlot {
    const char *name; /* NULL: empty */
    size_t value;
} NameSlot;

typedef struct NameTable {
    NameSlot *slots;
    size_t mask; /* capacity - 1, capacity a power of two */
} NameTable;

static uint64_t name_hash(const char *s) {
    uint64_t h = 14695981039346656037u;
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211u;
    }
    return h;
}

/* Room for count names with the table at most half full, so probes stay short and end. */
static int name_table_init(NameTable *t, size_t count) {
    size_t capacity = 16;
    while (capacity / 2 < count) {
        if (capacity > SIZE_MAX / 2 / sizeof(NameSlot)) return -1;
        capacity *= 2;
    }
    t->slots = calloc(capacity, sizeof *t->slots);
    t->mask = capacity - 1;
    return t->slots ? 0 : -1;
}

static void name_table_free(NameTable *t) {
    free(t->slots);
    t->slots = NULL;
}

/* Adds name -> value; false when name is already there. name must outlive the table. */
static bool name_table_insert(NameTable *t, const char *name, size_t value) {
    for (size_t i = (size_t)name_hash(name) & t->mask;; i = (i + 1) & t->mask) {
        if (!t->slots[i].name) {
            t->slots[i].name = name;
            t->slots[i].value = value;
            return true;
        }
        if (strcmp(t->slots[i].name, name) == 0) return false;
    }
}

static bool name_table_find(const NameTable *t, const char *name, size_t *value) {
    if (!t->slots) return false;
    for (size_t i = (size_t)name_hash(name) & t->mask; t->slots[i].name; i = (i + 1) & t->mask) {
        if (strcmp(t->slots[i].name, name) == 0) {
            *value = t->slots[i].value;
            return true;
        }
    }
    return false;
}

/* --- reader --- */

struct SafeTensors {
    char *path;
    MappedFile file; /* mapped by st_open; empty for st_open_memory */
    JsonDoc *header; /* tensor names and metadata point into it */
    const JsonValue *metadata;
    StTensor *tensors; /* in header order */
    size_t count;
    NameTable names; /* name -> index into tensors */
};

/* Where a tensor's bytes lie in the data area. */
typedef struct ByteSpan {
    uint64_t begin, end;
    size_t tensor;
} ByteSpan;

/* "__metadata__" must map strings to strings. */
static int st_check_metadata(const SafeTensors *st, const JsonValue *metadata, Error *e) {
    if (metadata->type != JSON_OBJECT) return error_set(e, "%s: __metadata__ is not an object", st->path);
    for (size_t i = 0; i < metadata->count; i++) {
        if (metadata->members[i].value.type != JSON_STRING) {
            char buf[PRINTABLE_BYTES];
            return error_set(e, "%s: __metadata__ entry '%s' is not a string", st->path,
                             printable(metadata->members[i].key, buf, sizeof buf));
        }
    }
    return 0;
}

/* shape: a JSON array of at most ST_MAX_DIMS non-negative integers whose product, in bytes,
 * fits in 64 bits. Fills t's ndim, shape, numel and nbytes. */
static int st_parse_shape(const SafeTensors *st, const char *name, const JsonValue *shape, StTensor *t, Error *e) {
    if (shape->type != JSON_ARRAY) return error_set(e, "%s: tensor '%s': shape is not an array", st->path, name);
    if (shape->count > ST_MAX_DIMS)
        return error_set(e, "%s: tensor '%s': %zu dimensions, at most %d supported", st->path, name, shape->count,
                         ST_MAX_DIMS);
    t->ndim = (int)shape->count;
    uint64_t numel = 1;
    for (size_t i = 0; i < shape->count; i++) {
        const JsonValue *dim = &shape->items[i];
        if (dim->type != JSON_NUMBER || !dim->is_integer || dim->integer < 0)
            return error_set(e, "%s: tensor '%s': shape[%zu] is not a non-negative integer", st->path, name, i);
        t->shape[i] = dim->integer;
        if (mul_overflows(numel, (uint64_t)dim->integer, &numel))
            return error_set(e, "%s: tensor '%s': shape overflows 64 bits", st->path, name);
    }
    uint64_t nbytes;
    if (numel > INT64_MAX || mul_overflows(numel, dtype_size(t->dtype), &nbytes) || nbytes > SIZE_MAX)
        return error_set(e, "%s: tensor '%s': shape overflows 64 bits", st->path, name);
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)nbytes;
    return 0;
}

/* A JSON integer that is not negative. */
static bool json_is_count(const JsonValue *v) {
    return v->type == JSON_NUMBER && v->is_integer && v->integer >= 0;
}

/* data_offsets: [begin, end] within the data area, spanning exactly the tensor's bytes. */
static int st_parse_offsets(const SafeTensors *st, const char *name, const JsonValue *offsets, uint64_t data_size,
                            const StTensor *t, ByteSpan *span, Error *e) {
    bool valid = offsets->type == JSON_ARRAY && offsets->count == 2 &&
                 json_is_count(&offsets->items[0]) && json_is_count(&offsets->items[1]);
    if (!valid)
        return error_set(e, "%s: tensor '%s': data_offsets is not a pair of non-negative integers", st->path, name);
    uint64_t begin = (uint64_t)offsets->items[0].integer, end = (uint64_t)offsets->items[1].integer;
    if (end < begin)
        return error_set(e, "%s: tensor '%s': data_offsets [%llu, %llu] end before they begin", st->path, name,
                         (unsigned long long)begin, (unsigned long long)end);
    if (end > data_size)
        return error_set(e, "%s: tensor '%s': data_offsets [%llu, %llu] run past the %llu bytes of data", st->path,
                         name, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_size);
    if (end - begin != t->nbytes) {
        char shape[160];
        return error_set(e, "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes but %s %s needs %zu",
                         st->path, name, (unsigned long long)begin, (unsigned long long)end,
                         (unsigned long long)(end - begin), dtype_name(t->dtype),
                         format_shape(t->ndim, t->shape, shape, sizeof shape), t->nbytes);
    }
    span->begin = begin;
    span->end = end;
    return 0;
}

/* One header entry: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, nothing else. */
static int st_parse_entry(const SafeTensors *st, const JsonMember *entry, const unsigned char *data,
                          uint64_t data_size, StTensor *t, ByteSpan *span, Error *e) {
    char buf[PRINTABLE_BYTES];
    const char *name = printable(entry->key, buf, sizeof buf);
    const JsonValue *v = &entry->value;
    if (v->type != JSON_OBJECT) return error_set(e, "%s: tensor '%s': entry is not an object", st->path, name);
    const JsonValue *dtype = NULL, *shape = NULL, *offsets = NULL;
    for (size_t i = 0; i < v->count; i++) {
        const char *key = v->members[i].key;
        const JsonValue *field = &v->members[i].value;
        if (!strcmp(key, "dtype")) dtype = field;
        else if (!strcmp(key, "shape")) shape = field;
        else if (!strcmp(key, "data_offsets")) offsets = field;
        else {
            char key_buf[PRINTABLE_BYTES];
            return error_set(e, "%s: tensor '%s': unknown field '%s'", st->path, name,
                             printable(key, key_buf, sizeof key_buf));
        }
    }
    if (!dtype || !shape || !offsets)
        return error_set(e, "%s: tensor '%s': missing field '%s'", st->path, name,
                         !dtype ? "dtype" : !shape ? "shape" : "data_offsets");
    if (dtype->type != JSON_STRING) return error_set(e, "%s: tensor '%s': dtype is not a string", st->path, name);
    if (!dtype_parse(dtype->string, &t->dtype)) {
        char dtype_buf[PRINTABLE_BYTES];
        return error_set(e, "%s: tensor '%s': unknown dtype '%s'", st->path, name,
                         printable(dtype->string, dtype_buf, sizeof dtype_buf));
    }
    t->name = entry->key;
    if (st_parse_shape(st, name, shape, t, e) || st_parse_offsets(st, name, offsets, data_size, t, span, e))
        return -1;
    t->data = data + span->begin;
    return 0;
}

static int compare_spans(const void *a, const void *b) {
    const ByteSpan *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

/* Sorted by where they begin, each tensor must begin at or after the end of the one before
 * (which then also ends after every earlier one). */
static int st_check_overlaps(const SafeTensors *st, ByteSpan *spans, Error *e) {
    if (st->count > 1) qsort(spans, st->count, sizeof *spans, compare_spans);
    for (size_t i = 1; i < st->count; i++) {
        if (spans[i].begin < spans[i - 1].end) {
            char a[PRINTABLE_BYTES], b[PRINTABLE_BYTES];
            return error_set(e, "%s: tensors '%s' and '%s' overlap (bytes [%llu, %llu) and [%llu, %llu))", st->path,
                             printable(st->tensors[spans[i - 1].tensor].name, a, sizeof a),
                             printable(st->tensors[spans[i].tensor].name, b, sizeof b),
                             (unsigned long long)spans[i - 1].begin, (unsigned long long)spans[i - 1].end,
                             (unsigned long long)spans[i].begin, (unsigned long long)spans[i].end);
        }
    }
    return 0;
}

static int st_index_names(SafeTensors *st, Error *e) {
    if (name_table_init(&st->names, st->count)) return error_set(e, "%s: out of memory", st->path);
    for (size_t i = 0; i < st->count; i++) {
        if (!name_table_insert(&st->names, st->tensors[i].name, i)) {
            char buf[PRINTABLE_BYTES];
            return error_set(e, "%s: duplicate tensor name '%s'", st->path, printable(st->tensors[i].name, buf, sizeof buf));
        }
    }
    return 0;
}

/* The file: an 8-byte little-endian header length N, N bytes of JSON, then the data area. Checks
 * N against the file and the header limit, parses the JSON, and checks each entry (dtype, shape,
 * offsets inside the data area and matching the shape's bytes, a name given once) and that no two
 * tensors overlap. */
static int st_parse(SafeTensors *st, const unsigned char *bytes, size_t size, Error *e) {
    if (size < 8) return error_set(e, "%s: %zu bytes, too short for a safetensors file", st->path, size);
    uint64_t header_len = load_le64(bytes);
    if (header_len > ST_MAX_HEADER_BYTES)
        return error_set(e, "%s: header length %llu is over the %u byte limit", st->path,
                         (unsigned long long)header_len, ST_MAX_HEADER_BYTES);
    if (header_len > size - 8)
        return error_set(e, "%s: header length %llu runs past the end of the %zu byte file", st->path,
                         (unsigned long long)header_len, size);
    if (json_parse(&st->header, (const char *)bytes + 8, (size_t)header_len, st->path, e)) return -1;
    const JsonValue *root = json_root(st->header);
    if (root->type != JSON_OBJECT) return error_set(e, "%s: header is not a JSON object", st->path);
    const unsigned char *data = bytes + 8 + header_len;
    uint64_t data_size = size - 8 - header_len;

    st->tensors = calloc(root->count ? root->count : 1, sizeof *st->tensors);
    ByteSpan *spans = calloc(root->count ? root->count : 1, sizeof *spans);
    int rc = st->tensors && spans ? 0 : error_set(e, "%s: out of memory", st->path);
    for (size_t i = 0; i < root->count; i++) {
        if (rc) break;
        const JsonMember *m = &root->members[i];
        if (!strcmp(m->key, "__metadata__")) {
            st->metadata = &m->value;
            rc = st_check_metadata(st, &m->value, e);
        } else {
            spans[st->count].tensor = st->count;
            rc = st_parse_entry(st, m, data, data_size, &st->tensors[st->count], &spans[st->count], e);
            st->count++;
        }
    }
    if (rc == 0) rc = st_check_overlaps(st, spans, e);
    if (rc == 0) rc = st_index_names(st, e);
    free(spans);
    return rc;
}

int st_open_memory(SafeTensors **out, const void *bytes, size_t size, const char *name, Error *e) {
    *out = NULL;
    SafeTensors *st = calloc(1, sizeof *st);
    if (!st || !(st->path = strdup(name))) {
        free(st);
        return error_set(e, "%s: out of memory", name);
    }
    if (st_parse(st, bytes, size, e)) {
        st_close(st);
        return -1;
    }
    *out = st;
    return 0;
}

int st_open(SafeTensors **out, const char *path, Error *e) {
    MappedFile file;
    *out = NULL;
    if (map_file(&file, path, e)) return -1;
    if (st_open_memory(out, file.bytes, file.size, path, e)) {
        unmap_file(&file);
        return -1;
    }
    (*out)->file = file;
    return 0;
}

void st_close(SafeTensors *st) {
    if (!st) return;
    name_table_free(&st->names);
    free(st->tensors);
    json_free(st->header);
    unmap_file(&st->file);
    free(st->path);
    free(st);
}

size_t st_count(const SafeTensors *st) {
    return st->count;
}

const StTensor *st_at(const SafeTensors *st, size_t i) {
    return i < st->count ? &st->tensors[i] : NULL;
}

const StTensor *st_find(const SafeTensors *st, const char *name) {
    size_t i;
    return name_table_find(&st->names, name, &i) ? &st->tensors[i] : NULL;
}

const char *st_path(const SafeTensors *st) {
    return st->path;
}

const char *st_metadata(const SafeTensors *st, const char *key) {
    const JsonValue *v = json_get(st->metadata, key);
    return v ? v->string : NULL;
}

/* Elements [start, start + n) of t, converted to f32 (the caller has checked the range). */
static void tensor_convert_range(const StTensor *t, int64_t start, int64_t n, float *dst) {
    const unsigned char *src = (const unsigned char *)t->data + (size_t)start * dtype_size(t->dtype);
    if (t->dtype == DTYPE_F32) {
        #pragma omp parallel for schedule(static) if (n > (1 << 18))
        for (int64_t i = 0; i < n; i++) dst[i] = bits_float(load_le32(src + 4 * i));
    } else if (t->dtype == DTYPE_F16) {
        #pragma omp parallel for schedule(static) if (n > (1 << 18))
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(load_le16(src + 2 * i));
    } else {
        #pragma omp parallel for schedule(static) if (n > (1 << 18))
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(load_le16(src + 2 * i));
    }
}

static int tensor_check_convertible(const StTensor *t, const char *file, Error *e) {
    char buf[PRINTABLE_BYTES];
    if (t->dtype != DTYPE_F32 && t->dtype != DTYPE_F16 && t->dtype != DTYPE_BF16)
        return error_set(e, "%s: tensor '%s' is %s; only F32, F16 and BF16 convert to f32", file,
                         printable(t->name, buf, sizeof buf), dtype_name(t->dtype));
    return 0;
}

static int tensor_read_f32(const StTensor *t, const char *file, float *dst, int64_t n, Error *e) {
    char buf[PRINTABLE_BYTES];
    if (tensor_check_convertible(t, file, e)) return -1;
    if (n != t->numel)
        return error_set(e, "%s: tensor '%s' has %lld elements, the caller expects %lld", file,
                         printable(t->name, buf, sizeof buf), (long long)t->numel, (long long)n);
    tensor_convert_range(t, 0, n, dst);
    return 0;
}

int st_read_f32(const SafeTensors *st, const char *name, float *dst, int64_t n, Error *e) {
    const StTensor *t = st_find(st, name);
    if (!t) {
        char buf[PRINTABLE_BYTES];
        return error_set(e, "%s: no tensor named '%s'", st->path, printable(name, buf, sizeof buf));
    }
    return tensor_read_f32(t, st->path, dst, n, e);
}

/* --- writer --- */

/* A growable byte buffer; after a failed allocation it stays failed and appends nothing. */
typedef struct ByteBuf {
    char *data;
    size_t len, capacity;
    bool failed;
} ByteBuf;

static void buf_append(ByteBuf *b, const void *src, size_t n) {
    if (b->failed) return;
    if (n > b->capacity - b->len) {
        size_t wanted = b->capacity ? b->capacity : 256;
        while (wanted - b->len < n && wanted <= SIZE_MAX / 2) wanted *= 2;
        char *grown = wanted - b->len >= n ? realloc(b->data, wanted) : NULL;
        if (!grown) {
            b->failed = true;
            return;
        }
        b->data = grown;
        b->capacity = wanted;
    }
    memcpy(b->data + b->len, src, n);
    b->len += n;
}

static void buf_printf(ByteBuf *b, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

static void buf_printf(ByteBuf *b, const char *fmt, ...) {
    char text[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof text) b->failed = true;
    else buf_append(b, text, (size_t)n);
}

/* s as a JSON string: quotes, backslashes and control characters escaped, UTF-8 kept. */
static void buf_json_string(ByteBuf *b, const char *s) {
    buf_append(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char escaped[2] = {'\\', (char)c};
            buf_append(b, escaped, 2);
        } else if (c < 0x20) {
            buf_printf(b, "\\u%04x", c);
        } else {
            buf_append(b, s, 1);
        }
    }
    buf_append(b, "\"", 1);
}

/* A tensor st_write can store; its byte count goes to *nbytes. */
static int st_check_write_tensor(const char *path, const StWriteTensor *t, size_t index, uint64_t *nbytes,
                                 Error *e) {
    char buf[PRINTABLE_BYTES];
    if (!t->name) return error_set(e, "%s: tensor %zu has no name", path, index);
    const char *name = printable(t->name, buf, sizeof buf);
    if (!utf8_valid(t->name, strlen(t->name))) return error_set(e, "%s: tensor '%s': name is not valid UTF-8", path, name);
    if (!strcmp(t->name, "__metadata__")) return error_set(e, "%s: '__metadata__' is not a tensor name", path);
    if (dtype_size(t->dtype) == 0) return error_set(e, "%s: tensor '%s': invalid dtype %d", path, name, (int)t->dtype);
    if (t->ndim < 0 || t->ndim > ST_MAX_DIMS)
        return error_set(e, "%s: tensor '%s': %d dimensions, 0 to %d supported", path, name, t->ndim, ST_MAX_DIMS);
    uint64_t numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 0 || mul_overflows(numel, (uint64_t)t->shape[i], &numel))
            return error_set(e, "%s: tensor '%s': invalid shape", path, name);
    }
    if (mul_overflows(numel, dtype_size(t->dtype), nbytes) || *nbytes > SIZE_MAX)
        return error_set(e, "%s: tensor '%s': invalid shape", path, name);
    if (*nbytes > 0 && !t->data) return error_set(e, "%s: tensor '%s': no data", path, name);
    return 0;
}

/* The JSON header for tensors laid out back to back, padded with spaces to a multiple of 8
 * bytes as the Python library does, so the data area starts 8-byte aligned. */
static int st_build_header(const char *path, const StWriteTensor *tensors, const uint64_t *nbytes, size_t n,
                           ByteBuf *header, Error *e) {
    uint64_t offset = 0;
    buf_append(header, "{", 1);
    for (size_t i = 0; i < n; i++) {
        const StWriteTensor *t = &tensors[i];
        if (i) buf_append(header, ",", 1);
        buf_json_string(header, t->name);
        buf_printf(header, ":{\"dtype\":\"%s\",\"shape\":[", dtype_name(t->dtype));
        for (int d = 0; d < t->ndim; d++) buf_printf(header, "%s%lld", d ? "," : "", (long long)t->shape[d]);
        if (nbytes[i] > UINT64_MAX - offset) return error_set(e, "%s: tensors too large", path);
        buf_printf(header, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                   (unsigned long long)(offset + nbytes[i]));
        offset += nbytes[i];
    }
    buf_append(header, "}", 1);
    static const char spaces[8] = "        ";
    buf_append(header, spaces, (8 - header->len % 8) % 8); /* the data starts 8-byte aligned */
    if (header->failed) return error_set(e, "%s: out of memory", path);
    if (header->len > ST_MAX_HEADER_BYTES) return error_set(e, "%s: header over %u bytes", path, ST_MAX_HEADER_BYTES);
    return 0;
}

/* Validates the tensors, gives their byte counts, and rejects repeated names. */
static int st_check_write_tensors(const char *path, const StWriteTensor *tensors, size_t n, uint64_t *nbytes,
                                  Error *e) {
    NameTable names;
    if (name_table_init(&names, n)) return error_set(e, "%s: out of memory", path);
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        if (rc) break;
        rc = st_check_write_tensor(path, &tensors[i], i, &nbytes[i], e);
        if (rc == 0 && !name_table_insert(&names, tensors[i].name, i)) {
            char buf[PRINTABLE_BYTES];
            rc = error_set(e, "%s: duplicate tensor name '%s'", path, printable(tensors[i].name, buf, sizeof buf));
        }
    }
    name_table_free(&names);
    return rc;
}

int st_write(const char *path, const StWriteTensor *tensors, size_t n, Error *e) {
    uint64_t *nbytes = calloc(n ? n : 1, sizeof *nbytes);
    ByteBuf header = {0};
    AtomicFile *f = NULL;
    int rc = nbytes ? 0 : error_set(e, "%s: out of memory", path);
    if (rc == 0) rc = st_check_write_tensors(path, tensors, n, nbytes, e);
    if (rc == 0) rc = st_build_header(path, tensors, nbytes, n, &header, e);
    if (rc == 0) rc = atomic_open(&f, path, e);
    if (rc == 0) {
        unsigned char length[8];
        store_le64(length, header.len);
        rc = atomic_write(f, length, sizeof length, e);
        if (rc == 0) rc = atomic_write(f, header.data, header.len, e);
        for (size_t i = 0; i < n; i++) {
            if (rc) break;
            rc = atomic_write(f, tensors[i].data, (size_t)nbytes[i], e);
        }
        if (rc == 0) rc = atomic_commit(f, e);
        else atomic_abort(f);
    }
    free(header.data);
    free(nbytes);
    return rc;
}

/* --- sharded models --- */

struct StModel {
    char *path;
    SafeTensors **shards;
    size_t shard_count;
    const StTensor **tensors;
    size_t *tensor_shard; /* the shard each tensor lives in */
    size_t count;
    NameTable names; /* name -> index into tensors */
    StTensor *synthetic; /* st_model_random's tensors (their names owned), else NULL */
    bool any;            /* st_model_random_any's model */
    uint64_t seed;       /* a random model's seed and kind */
    RandomKind kind;
};

static int st_model_index_names(StModel *m, Error *e) {
    if (name_table_init(&m->names, m->count)) return error_set(e, "%s: out of memory", m->path);
    for (size_t i = 0; i < m->count; i++) {
        if (!name_table_insert(&m->names, m->tensors[i]->name, i)) {
            char buf[PRINTABLE_BYTES];
            return error_set(e, "%s: duplicate tensor name '%s'", m->path, printable(m->tensors[i]->name, buf, sizeof buf));
        }
    }
    return 0;
}

/* Arrays for up to `shards` shards and `tensors` tensors. */
static int st_model_alloc(StModel *m, size_t shards, size_t tensors, Error *e) {
    m->shards = calloc(shards ? shards : 1, sizeof *m->shards);
    m->tensors = calloc(tensors ? tensors : 1, sizeof *m->tensors);
    m->tensor_shard = calloc(tensors ? tensors : 1, sizeof *m->tensor_shard);
    if (!m->shards || !m->tensors || !m->tensor_shard) return error_set(e, "%s: out of memory", m->path);
    return 0;
}

static int st_model_open_file(StModel *m, const char *path, Error *e) {
    SafeTensors *st;
    if (st_open(&st, path, e)) return -1;
    if (st_model_alloc(m, 1, st_count(st), e)) {
        st_close(st);
        return -1;
    }
    m->shards[m->shard_count++] = st;
    for (size_t i = 0; i < st_count(st); i++) m->tensors[m->count++] = st_at(st, i);
    return st_model_index_names(m, e);
}

/* A shard must be a plain file name in the index's directory: the index cannot point elsewhere. */
static bool shard_name_valid(const char *name) {
    return name[0] && strcmp(name, ".") && strcmp(name, "..") && !strchr(name, '/');
}

/* The shard called file (opening it on first use), as an index into m->shards. */
static int st_model_shard_for(StModel *m, NameTable *opened, const char *dir, const char *file, size_t *shard,
                              Error *e) {
    if (name_table_find(opened, file, shard)) return 0;
    char path[PATH_BYTES];
    if (path_join(path, sizeof path, dir, file, e) || st_open(&m->shards[m->shard_count], path, e))
        return -1;
    *shard = m->shard_count++;
    name_table_insert(opened, file, *shard);
    return 0;
}

/* Opens every shard that weight_map names and finds each listed tensor in its shard. */
static int st_model_load_weight_map(StModel *m, const JsonValue *map, const char *dir, Error *e) {
    NameTable opened = {0}; /* shard file name -> index into m->shards */
    if (st_model_alloc(m, map->count, map->count, e)) return -1;
    if (name_table_init(&opened, map->count)) return error_set(e, "%s: out of memory", m->path);
    int rc = 0;
    for (size_t i = 0; i < map->count; i++) {
        if (rc) break;
        const char *name = map->members[i].key;
        const JsonValue *file = &map->members[i].value;
        char name_buf[PRINTABLE_BYTES], file_buf[PRINTABLE_BYTES];
        size_t shard = 0;
        if (file->type != JSON_STRING || !shard_name_valid(file->string)) {
            rc = error_set(e, "%s: weight_map entry '%s' is not a file name in the index's directory", m->path,
                           printable(name, name_buf, sizeof name_buf));
            break;
        }
        rc = st_model_shard_for(m, &opened, dir, file->string, &shard, e);
        const StTensor *t = rc == 0 ? st_find(m->shards[shard], name) : NULL;
        if (rc == 0 && !t)
            rc = error_set(e, "%s: tensor '%s' is listed in shard '%s' but that file has no such tensor", m->path,
                           printable(name, name_buf, sizeof name_buf), printable(file->string, file_buf, sizeof file_buf));
        if (rc == 0) {
            m->tensors[m->count] = t;
            m->tensor_shard[m->count++] = shard;
        }
    }
    name_table_free(&opened);
    return rc;
}

static int st_model_open_index(StModel *m, const char *index_path, Error *e) {
    JsonDoc *doc;
    if (json_parse_file(&doc, index_path, e)) return -1;
    const JsonValue *map = json_get(json_root(doc), "weight_map");
    char *dir = path_dirname(index_path);
    int rc;
    if (!dir) rc = error_set(e, "%s: out of memory", index_path);
    else if (!map || map->type != JSON_OBJECT) rc = error_set(e, "%s: no \"weight_map\" object", index_path);
    else if (map->count == 0) rc = error_set(e, "%s: \"weight_map\" is empty", index_path);
    else rc = st_model_load_weight_map(m, map, dir, e);
    if (rc == 0) rc = st_model_index_names(m, e);
    free(dir);
    json_free(doc);
    return rc;
}

/* A directory: its one index, or else its one .safetensors file. */
static int st_model_open_dir(StModel *m, const char *dir, Error *e) {
    char **names;
    size_t count, indexes = 0, files = 0;
    const char *index = NULL, *file = NULL;
    if (dir_list(dir, &names, &count, e)) return -1;
    for (size_t i = 0; i < count; i++) {
        if (has_suffix(names[i], ".safetensors.index.json")) {
            index = names[i];
            indexes++;
        } else if (has_suffix(names[i], ".safetensors")) {
            file = names[i];
            files++;
        }
    }
    int rc;
    char path[PATH_BYTES];
    if (indexes > 1) rc = error_set(e, "%s: %zu *.safetensors.index.json files; name one", dir, indexes);
    else if (indexes == 0 && files > 1) rc = error_set(e, "%s: %zu .safetensors files and no index; name one", dir, files);
    else if (indexes == 0 && files == 0) rc = error_set(e, "%s: no .safetensors file or index", dir);
    else if (path_join(path, sizeof path, dir, index ? index : file, e)) rc = -1;
    else rc = index ? st_model_open_index(m, path, e) : st_model_open_file(m, path, e);
    dir_list_free(names, count);
    return rc;
}

int st_model_open(StModel **out, const char *path, Error *e) {
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0) return error_set(e, "%s: cannot open: %s", path, strerror(errno));
    StModel *m = calloc(1, sizeof *m);
    if (!m || !(m->path = strdup(path))) {
        free(m);
        return error_set(e, "%s: out of memory", path);
    }
    int rc;
    if (S_ISDIR(sb.st_mode)) rc = st_model_open_dir(m, path, e);
    else if (has_suffix(path, ".json")) rc = st_model_open_index(m, path, e);
    else rc = st_model_open_file(m, path, e);
    if (rc) {
        st_model_close(m);
        return -1;
    }
    *out = m;
    return 0;
}

void st_model_close(StModel *m) {
    if (!m) return;
    if (m->synthetic)
        for (size_t i = 0; i < m->count; i++) free((char *)m->synthetic[i].name);
    free(m->synthetic);
    for (size_t i = 0; i < m->shard_count; i++) st_close(m->shards[i]);
    free(m->shards);
    free(m->tensors);
    free(m->tensor_shard);
    name_table_free(&m->names);
    free(m->path);
    free(m);
}

size_t st_model_count(const StModel *m) {
    return m->count;
}

const StTensor *st_model_at(const StModel *m, size_t i) {
    return i < m->count ? m->tensors[i] : NULL;
}

const StTensor *st_model_find(const StModel *m, const char *name) {
    size_t i;
    return name_table_find(&m->names, name, &i) ? m->tensors[i] : NULL;
}

/* --- synthetic models --- */

uint64_t mix64(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9u;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBu;
    return x ^ (x >> 31);
}

/* Element i from a hash of (seed, name, i) alone, so any element can be made independently, in
 * any order, by any thread: elements [start, start + n) into dst. */
static void uniform_fill_range(uint64_t seed, const char *name, int64_t start, int64_t n,
                               float *dst) {
    uint64_t key = mix64(name_hash(name) ^ mix64(seed));
    #pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i++) {
        /* the top 24 bits -> uniform in [-1, 1), exact in float */
        uint64_t index = (uint64_t)(start + i);
        dst[i] = (float)(mix64(key + index * 0x9E3779B97F4A7C15u) >> 40) / 8388608.0f - 1.0f;
    }
}

void st_uniform_fill(uint64_t seed, const char *name, int64_t n, float *dst) {
    uniform_fill_range(seed, name, 0, n, dst);
}

static bool name_ends_with(const char *name, const char *suffix) {
    size_t n = strlen(name), k = strlen(suffix);
    return n >= k && !strcmp(name + n - k, suffix);
}

/* Elements [start, start + n) of st_random_fill's tensor: offset + scale * uniform(-1, 1). */
static void random_fill_range(uint64_t seed, RandomKind kind, const char *name, int ndim,
                              const int64_t *shape, int64_t start, int64_t n, float *dst) {
    if (n <= 0) return;
    uniform_fill_range(seed, name, start, n, dst);
    bool matrix = ndim >= 2;
    if (kind == RANDOM_FOR_TRAINING && matrix) {
        int64_t numel = 1;
        for (int d = 0; d < ndim; d++) numel *= shape[d];
        float bound = 1.0f / sqrtf((float)(numel / shape[0]));
        for (int64_t i = 0; i < n; i++) dst[i] *= bound;
        return;
    }
    if (kind == RANDOM_FOR_TRAINING) {
        bool zero = name_ends_with(name, ".bias") || name_ends_with(name, "running_mean");
        for (int64_t i = 0; i < n; i++) dst[i] = zero ? 0.0f : 1.0f;
        return;
    }
    float scale = matrix ? 1.0f / sqrtf((float)shape[ndim - 1]) : 0.1f;
    float offset = matrix ? 0.0f : 1.0f;
    #pragma omp parallel for schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i++) dst[i] = offset + scale * dst[i];
}

void st_random_fill(uint64_t seed, RandomKind kind, const char *name, int ndim,
                    const int64_t *shape, float *dst) {
    int64_t n = 1;
    for (int d = 0; d < ndim; d++) n *= shape[d];
    random_fill_range(seed, kind, name, ndim, shape, 0, n, dst);
}

static int st_random_read(const StModel *m, const StTensor *t, float *dst, int64_t n, Error *e) {
    char buf[PRINTABLE_BYTES];
    if (n != t->numel)
        return error_set(e, "%s: tensor '%s' has %lld elements, %lld requested", m->path,
                         printable(t->name, buf, sizeof buf), (long long)t->numel, (long long)n);
    st_random_fill(m->seed, m->kind, t->name, t->ndim, t->shape, dst);
    return 0;
}

/* Checks one spec and makes its tensor (name copied). */
static int st_random_tensor(const char *path, const StTensorSpec *spec, size_t i, StTensor *t,
                            Error *e) {
    if (!spec->name) return error_set(e, "%s: tensor %zu has no name", path, i);
    char buf[PRINTABLE_BYTES];
    if (spec->ndim < 0 || spec->ndim > ST_MAX_DIMS)
        return error_set(e, "%s: tensor '%s' has %d dims, expected 0 .. %d", path,
                         printable(spec->name, buf, sizeof buf), spec->ndim, ST_MAX_DIMS);
    *t = (StTensor){.dtype = DTYPE_F32, .ndim = spec->ndim, .numel = 1};
    for (int d = 0; d < spec->ndim; d++) {
        int64_t size = spec->shape[d];
        if (size < 0 || (size > 0 && t->numel > INT64_MAX / 4 / size))
            return error_set(e, "%s: tensor '%s' has a negative or too large shape", path,
                             printable(spec->name, buf, sizeof buf));
        t->shape[d] = size;
        t->numel *= size;
    }
    t->name = strdup(spec->name);
    return t->name ? 0 : error_set(e, "%s: out of memory", path);
}

int st_model_random(StModel **out, const StTensorSpec *specs, size_t n, uint64_t seed,
                    RandomKind kind, Error *e) {
    *out = NULL;
    char path[64];
    snprintf(path, sizeof path, "random model (seed %llu)", (unsigned long long)seed);
    StModel *m = calloc(1, sizeof *m);
    int rc = m && (m->path = strdup(path)) && st_model_alloc(m, 0, n, e) == 0 &&
                     (m->synthetic = calloc(n ? n : 1, sizeof *m->synthetic))
                 ? 0
                 : error_set(e, "%s: out of memory", path);
    if (m) {
        m->seed = seed;
        m->kind = kind;
    }
    for (size_t i = 0; i < n; i++) {
        if (rc) break;
        rc = st_random_tensor(path, &specs[i], i, &m->synthetic[i], e);
        if (rc == 0) m->tensors[m->count++] = &m->synthetic[i];
    }
    if (rc == 0) rc = st_model_index_names(m, e);
    if (rc) {
        st_model_close(m);
        return -1;
    }
    *out = m;
    return 0;
}

int st_model_random_any(StModel **out, uint64_t seed, RandomKind kind, Error *e) {
    if (st_model_random(out, NULL, 0, seed, kind, e)) return -1;
    (*out)->any = true;
    return 0;
}

bool st_model_random_any_source(const StModel *m, uint64_t *seed, RandomKind *kind) {
    if (m->any) {
        *seed = m->seed;
        *kind = m->kind;
    }
    return m->any;
}

int st_model_read_f32(const StModel *m, const char *name, float *dst, int64_t n, Error *e) {
    size_t i;
    if (!name_table_find(&m->names, name, &i)) {
        char buf[PRINTABLE_BYTES];
        return error_set(e, "%s: no tensor named '%s'", m->path, printable(name, buf, sizeof buf));
    }
    if (m->synthetic) return st_random_read(m, &m->synthetic[i], dst, n, e);
    return tensor_read_f32(m->tensors[i], st_path(m->shards[m->tensor_shard[i]]), dst, n, e);
}

int st_model_read_rows_f32(const StModel *m, const char *name, int64_t first, int64_t rows,
                           float *dst, Error *e) {
    size_t i;
    char buf[PRINTABLE_BYTES];
    if (!name_table_find(&m->names, name, &i))
        return error_set(e, "%s: no tensor named '%s'", m->path, printable(name, buf, sizeof buf));
    const StTensor *t = m->synthetic ? &m->synthetic[i] : m->tensors[i];
    int64_t per_row = t->ndim > 0 && t->shape[0] > 0 ? t->numel / t->shape[0] : 0;
    if (t->ndim == 0 || first < 0 || rows < 0 || first > t->shape[0] - rows)
        return error_set(e, "%s: rows %lld .. %lld of tensor '%s' are out of its range", m->path,
                         (long long)first, (long long)(first + rows - 1),
                         printable(name, buf, sizeof buf));
    if (m->synthetic) {
        random_fill_range(m->seed, m->kind, t->name, t->ndim, t->shape, first * per_row,
                          rows * per_row, dst);
        return 0;
    }
    if (tensor_check_convertible(t, st_path(m->shards[m->tensor_shard[i]]), e)) return -1;
    tensor_convert_range(t, first * per_row, rows * per_row, dst);
    return 0;
}

size_t st_model_shard_count(const StModel *m) {
    return m->shard_count;
}

const SafeTensors *st_model_shard(const StModel *m, size_t i) {
    return i < m->shard_count ? m->shards[i] : NULL;
}

/* === tokenizer ===
 * Byte-level BPE as Hugging Face's tokenizers library runs a Qwen2/Qwen3 tokenizer.json
 * (Qwen2TokenizerFast):
 *   1. the added tokens (<|im_start|>, <think>, ...) are found whole in the raw text, the
 *      leftmost first and of those the longest, and become their ids;
 *   2. each stretch of text between them is NFC-normalised (normalizer {"type": "NFC"}),
 *   3. split into pieces by the pre-tokenizer's regex (TOKENIZER_SPLIT_PATTERN, matched by hand
 *      in pretoken_length),
 *   4. each piece's UTF-8 bytes become printable characters (GPT-2's byte-to-unicode table,
 *      the ByteLevel pre-tokenizer), one vocabulary symbol each,
 *   5. and adjacent symbols are merged by rank, the lowest-ranked pair first and the leftmost of
 *      equal ones, until no pair of the merge list is left (bpe_merge).
 * The Unicode tables (letters, numbers, White_Space, NFC data) are generated into io_unicode.h
 * by tools/gen_unicode.py. */

#include "io_unicode.h"

#define COUNT_OF(a) (sizeof(a) / sizeof *(a))

/* The Split pre-tokenizer's pattern that pretoken_length implements; any other is refused. */
#define TOKENIZER_SPLIT_PATTERN                                                                  \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|" \
    "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"

/* --- Unicode: properties and NFC --- */

static bool in_ranges(const UnicodeRange *r, size_t n, uint32_t cp) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < r[mid].first) hi = mid;
        else if (cp > r[mid].last) lo = mid + 1;
        else return true;
    }
    return false;
}

/* The regex's classes: \p{L}, \p{N}, \s (White_Space, as Oniguruma's \s) and the rest. They do
 * not overlap. */
typedef enum CharClass { CHAR_LETTER, CHAR_NUMBER, CHAR_SPACE, CHAR_OTHER } CharClass;

static CharClass char_class(uint32_t cp) {
    if (cp < 0x80) { /* the common case without a search */
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return CHAR_LETTER;
        if (cp >= '0' && cp <= '9') return CHAR_NUMBER;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return CHAR_SPACE;
        return CHAR_OTHER;
    }
    if (in_ranges(unicode_letters, COUNT_OF(unicode_letters), cp)) return CHAR_LETTER;
    if (in_ranges(unicode_numbers, COUNT_OF(unicode_numbers), cp)) return CHAR_NUMBER;
    if (in_ranges(unicode_white_space, COUNT_OF(unicode_white_space), cp)) return CHAR_SPACE;
    return CHAR_OTHER;
}

static int combining_class(uint32_t cp) {
    size_t lo = 0, hi = COUNT_OF(unicode_combining);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < unicode_combining[mid].first) hi = mid;
        else if (cp > unicode_combining[mid].last) lo = mid + 1;
        else return unicode_combining[mid].ccc;
    }
    return 0;
}

/* Hangul syllables decompose and compose by arithmetic (Unicode 15, section 3.12). */
enum {
    HANGUL_S = 0xAC00, HANGUL_L = 0x1100, HANGUL_V = 0x1161, HANGUL_T = 0x11A7,
    HANGUL_L_COUNT = 19, HANGUL_V_COUNT = 21, HANGUL_T_COUNT = 28,
    HANGUL_N_COUNT = HANGUL_V_COUNT * HANGUL_T_COUNT, HANGUL_S_COUNT = HANGUL_L_COUNT * HANGUL_N_COUNT,
};

/* A growing array of code points. */
typedef struct CodePoints {
    uint32_t *cp;
    size_t n, cap;
} CodePoints;

/* Room for one more of a growing array's count elements of `size` bytes (its capacity doubles,
 * from `first`); -1, the array unchanged, when out of memory. */
static int array_reserve(void **data, size_t *cap, size_t count, size_t size, size_t first) {
    if (count < *cap) return 0;
    size_t grown_cap = *cap ? 2 * *cap : first;
    void *grown = grown_cap < SIZE_MAX / size ? realloc(*data, grown_cap * size) : NULL;
    if (!grown) return -1;
    *data = grown;
    *cap = grown_cap;
    return 0;
}

static int code_points_push(CodePoints *c, uint32_t cp) {
    void *data = c->cp;
    if (array_reserve(&data, &c->cap, c->n, sizeof *c->cp, 64)) return -1;
    c->cp = data;
    c->cp[c->n++] = cp;
    return 0;
}

/* cp's full canonical decomposition appended to out. */
static int decompose(uint32_t cp, CodePoints *out) {
    if (cp >= HANGUL_S && cp < HANGUL_S + HANGUL_S_COUNT) {
        uint32_t s = cp - HANGUL_S, t = s % HANGUL_T_COUNT;
        if (code_points_push(out, HANGUL_L + s / HANGUL_N_COUNT) ||
            code_points_push(out, HANGUL_V + s % HANGUL_N_COUNT / HANGUL_T_COUNT))
            return -1;
        return t ? code_points_push(out, HANGUL_T + t) : 0;
    }
    size_t lo = 0, hi = COUNT_OF(unicode_decompositions);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const UnicodeDecomposition *d = &unicode_decompositions[mid];
        if (cp < d->code) hi = mid;
        else if (cp > d->code) lo = mid + 1;
        else return decompose(d->first, out) || (d->second && decompose(d->second, out)) ? -1 : 0;
    }
    return code_points_push(out, cp);
}

/* Sorts each run of non-starters by combining class, keeping the order of equal ones. */
static void canonical_order(CodePoints *c) {
    for (size_t i = 1; i < c->n; i++) {
        uint32_t cp = c->cp[i];
        int ccc = combining_class(cp);
        if (ccc == 0) continue;
        size_t j = i;
        for (; j > 0 && combining_class(c->cp[j - 1]) > ccc; j--) c->cp[j] = c->cp[j - 1];
        c->cp[j] = cp;
    }
}

/* The primary composite of (a, b), or 0 when there is none. */
static uint32_t compose_pair(uint32_t a, uint32_t b) {
    if (a >= HANGUL_L && a < HANGUL_L + HANGUL_L_COUNT && b >= HANGUL_V &&
        b < HANGUL_V + HANGUL_V_COUNT)
        return HANGUL_S + ((a - HANGUL_L) * HANGUL_V_COUNT + (b - HANGUL_V)) * HANGUL_T_COUNT;
    if (a >= HANGUL_S && a < HANGUL_S + HANGUL_S_COUNT && (a - HANGUL_S) % HANGUL_T_COUNT == 0 &&
        b > HANGUL_T && b < HANGUL_T + HANGUL_T_COUNT)
        return a + (b - HANGUL_T);
    size_t lo = 0, hi = COUNT_OF(unicode_compositions);
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const UnicodeComposition *c = &unicode_compositions[mid];
        if (a < c->first || (a == c->first && b < c->second)) hi = mid;
        else if (a > c->first || b > c->second) lo = mid + 1;
        else return c->composite;
    }
    return 0;
}

/* Canonical composition in place: each character joins the last starter before it when the
 * pair has a primary composite and no character between them blocks it (a starter, or one of
 * the same or a higher combining class). */
static void canonical_compose(CodePoints *c) {
    if (c->n == 0) return;
    size_t starter = 0, n = 1;
    int last = combining_class(c->cp[0]) ? 256 : 0; /* nothing joins a leading non-starter */
    for (size_t i = 1; i < c->n; i++) {
        uint32_t cp = c->cp[i];
        int ccc = combining_class(cp);
        /* last == 0: the starter itself came last (every starter becomes `starter`) */
        uint32_t composite = last < ccc || last == 0 ? compose_pair(c->cp[starter], cp) : 0;
        if (composite) {
            c->cp[starter] = composite;
            continue;
        }
        if (ccc == 0) starter = n;
        last = ccc;
        c->cp[n++] = cp;
    }
    c->n = n;
}

/* The code point of the valid UTF-8 sequence of k bytes at s. */
static uint32_t utf8_decode(const unsigned char *s, size_t k) {
    static const unsigned char lead_mask[5] = {0, 0x7F, 0x1F, 0x0F, 0x07};
    uint32_t cp = s[0] & lead_mask[k];
    for (size_t i = 1; i < k; i++) cp = cp << 6 | (s[i] & 0x3F);
    return cp;
}

/* NFC of the valid UTF-8 text[0 .. len) as code points into out. */
static int nfc_code_points(const char *text, size_t len, CodePoints *out) {
    const unsigned char *u = (const unsigned char *)text;
    out->n = 0;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_sequence_length(u + i, len - i);
        if (decompose(utf8_decode(u + i, k), out)) return -1;
        i += k;
    }
    canonical_order(out);
    canonical_compose(out);
    return 0;
}

int utf8_nfc(const char *text, size_t len, char **out, size_t *out_len, Error *e) {
    *out = NULL;
    if (!utf8_valid(text, len)) return error_set(e, "the text is not valid UTF-8");
    CodePoints c = {0};
    int rc = nfc_code_points(text, len, &c);
    char *s = rc == 0 && c.n < SIZE_MAX / 4 ? malloc(4 * c.n + 1) : NULL;
    size_t n = 0;
    if (s)
        for (size_t i = 0; i < c.n; i++) n += utf8_encode(c.cp[i], s + n);
    free(c.cp);
    if (!s) return error_set(e, "out of memory normalising %zu bytes", len);
    s[n] = '\0';
    *out = s;
    *out_len = n;
    return 0;
}

/* --- the pre-tokenizer's regex, by hand --- */

static bool is_newline(uint32_t cp) {
    return cp == '\r' || cp == '\n';
}

/* (?i:'s|'t|'re|'ve|'m|'ll|'d) at cp: its length, or 0. Case-insensitive as Oniguruma's (?i)
 * under Unicode case folding, where U+017F (long s) folds to s. */
static size_t contraction_length(const uint32_t *cp, size_t n) {
    static const char *const suffixes[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    if (n < 2 || cp[0] != '\'') return 0;
    for (size_t k = 0; k < COUNT_OF(suffixes); k++) {
        size_t len = strlen(suffixes[k]), i = 0;
        for (; i < len && 1 + i < n; i++) {
            uint32_t c = cp[1 + i] == 0x17F ? 's' : cp[1 + i];
            if (c > 0x7F || (char)((c >= 'A' && c <= 'Z') ? c + 32 : c) != suffixes[k][i]) break;
        }
        if (i == len) return 1 + len;
    }
    return 0;
}

/* How many code points of cp[0 .. n) (n >= 1) the pattern's first matching alternative takes:
 *   (?i:'s|'t|'re|'ve|'m|'ll|'d)   a contraction
 *   [^\r\n\p{L}\p{N}]?\p{L}+       letters, with one optional leading non-letter
 *   \p{N}                          ONE digit
 *    ?[^\s\p{L}\p{N}]+[\r\n]*      symbols, an optional space before, line breaks after
 *   \s*[\r\n]+                     blanks up to the last line break of the run
 *   \s+(?!\S)                      blanks not followed by a non-blank: the run, less its last
 *                                  blank when something follows (that one joins the next piece)
 *   \s+                            a lone blank before a non-blank
 * Every code point is a letter, a number, a blank or other, so some alternative always matches. */
static size_t pretoken_length(const uint32_t *cp, size_t n) {
    size_t k = contraction_length(cp, n);
    if (k) return k;
    CharClass first = char_class(cp[0]);
    bool lead = first != CHAR_LETTER && first != CHAR_NUMBER && !is_newline(cp[0]);
    k = lead && n > 1 && char_class(cp[1]) == CHAR_LETTER ? 1 : 0;
    if (char_class(cp[k]) == CHAR_LETTER) {
        while (k < n && char_class(cp[k]) == CHAR_LETTER) k++;
        return k;
    }
    if (first == CHAR_NUMBER) return 1;
    k = cp[0] == ' ' && n > 1 && char_class(cp[1]) == CHAR_OTHER ? 1 : 0;
    if (char_class(cp[k]) == CHAR_OTHER) {
        while (k < n && char_class(cp[k]) == CHAR_OTHER) k++;
        while (k < n && is_newline(cp[k])) k++;
        return k;
    }
    size_t run = 0, line_end = 0; /* cp[0] is a blank */
    for (; run < n && char_class(cp[run]) == CHAR_SPACE; run++)
        if (is_newline(cp[run])) line_end = run + 1;
    if (line_end) return line_end;
    return run == n || run == 1 ? run : run - 1;
}

/* --- byte-level BPE --- */

/* GPT-2's byte-to-unicode table: the printable bytes ! .. ~, ¡ .. ¬ and ® .. ÿ stand for
 * themselves, the other 68 for U+0100 onwards in byte order. */
static uint32_t byte_level_char(unsigned b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    if (printable) return b;
    uint32_t k = 0;
    for (unsigned c = 0; c < b; c++)
        k += !((c >= '!' && c <= '~') || (c >= 0xA1 && c <= 0xAC) || (c >= 0xAE));
    return 256 + k;
}

/* The merge list as a hash table: (left id, right id) -> (rank, merged id). */
typedef struct MergeSlot {
    uint64_t pair; /* left << 32 | right */
    int32_t rank;  /* -1: empty */
    int32_t id;
} MergeSlot;

typedef struct MergeTable {
    MergeSlot *slots;
    size_t mask;
} MergeTable;

static uint64_t merge_key(int32_t left, int32_t right) {
    return (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
}

static int merge_table_init(MergeTable *t, size_t count) {
    size_t capacity = 16;
    while (capacity / 2 < count) {
        if (capacity > SIZE_MAX / 2 / sizeof(MergeSlot)) return -1;
        capacity *= 2;
    }
    if (!(t->slots = malloc(capacity * sizeof *t->slots))) return -1;
    for (size_t i = 0; i < capacity; i++) t->slots[i].rank = -1;
    t->mask = capacity - 1;
    return 0;
}

/* false when the pair is already there (HF keeps the first; so do we). */
static bool merge_table_insert(MergeTable *t, int32_t left, int32_t right, int32_t rank, int32_t id) {
    uint64_t key = merge_key(left, right);
    for (size_t i = (size_t)mix64(key) & t->mask;; i = (i + 1) & t->mask) {
        if (t->slots[i].rank < 0) {
            t->slots[i] = (MergeSlot){.pair = key, .rank = rank, .id = id};
            return true;
        }
        if (t->slots[i].pair == key) return false;
    }
}

static const MergeSlot *merge_table_find(const MergeTable *t, int32_t left, int32_t right) {
    uint64_t key = merge_key(left, right);
    for (size_t i = (size_t)mix64(key) & t->mask; t->slots[i].rank >= 0; i = (i + 1) & t->mask)
        if (t->slots[i].pair == key) return &t->slots[i];
    return NULL;
}

/* One symbol of a word being merged: a doubly linked list over the word's bytes. */
typedef struct BpeSymbol {
    int32_t id;
    int32_t prev, next; /* -1 at the ends */
    bool merged_away;
} BpeSymbol;

/* A possible merge of symbol `left` with the one after it. */
typedef struct BpeCandidate {
    int32_t rank, left;
} BpeCandidate;

/* A binary min-heap of candidates by (rank, left): the lowest rank first, then the leftmost. */
typedef struct BpeHeap {
    BpeCandidate *items;
    size_t n;
} BpeHeap;

static bool candidate_before(BpeCandidate a, BpeCandidate b) {
    return a.rank < b.rank || (a.rank == b.rank && a.left < b.left);
}

static void heap_push(BpeHeap *h, BpeCandidate c) {
    size_t i = h->n++;
    for (; i > 0 && candidate_before(c, h->items[(i - 1) / 2]); i = (i - 1) / 2)
        h->items[i] = h->items[(i - 1) / 2];
    h->items[i] = c;
}

static BpeCandidate heap_pop(BpeHeap *h) {
    BpeCandidate top = h->items[0], last = h->items[--h->n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->n) break;
        if (child + 1 < h->n && candidate_before(h->items[child + 1], h->items[child])) child++;
        if (!candidate_before(h->items[child], last)) break;
        h->items[i] = h->items[child];
        i = child;
    }
    if (h->n) h->items[i] = last;
    return top;
}

/* Pushes the merge of symbol left with its successor, when the merge list has one. */
static void bpe_consider(const MergeTable *merges, const BpeSymbol *s, int32_t left, BpeHeap *h) {
    if (left < 0 || s[left].next < 0) return;
    const MergeSlot *m = merge_table_find(merges, s[left].id, s[s[left].next].id);
    if (m) heap_push(h, (BpeCandidate){.rank = m->rank, .left = left});
}

/* Merges the n symbols s[0 .. n) (linked in order) by rank, as HF's BPE does: the candidate
 * popped is applied when its pair is still there (ranks are unique, so an unchanged rank is an
 * unchanged pair). heap has room for 3n candidates: n at the start, two per merge after. */
static void bpe_merge(const MergeTable *merges, BpeSymbol *s, int32_t n, BpeHeap *heap) {
    heap->n = 0;
    for (int32_t i = 0; i + 1 < n; i++) bpe_consider(merges, s, i, heap);
    while (heap->n) {
        BpeCandidate c = heap_pop(heap);
        int32_t right = s[c.left].next;
        if (s[c.left].merged_away || right < 0) continue;
        const MergeSlot *m = merge_table_find(merges, s[c.left].id, s[right].id);
        if (!m || m->rank != c.rank) continue;
        s[c.left].id = m->id;
        s[c.left].next = s[right].next;
        if (s[right].next >= 0) s[s[right].next].prev = c.left;
        s[right].merged_away = true;
        bpe_consider(merges, s, s[c.left].prev, heap);
        bpe_consider(merges, s, c.left, heap);
    }
}

/* --- loading tokenizer.json --- */

typedef struct AddedToken {
    char *content;
    size_t length;
    int32_t id;
} AddedToken;

struct Tokenizer {
    int32_t byte_ids[256];     /* the vocabulary id of each byte's byte-level character */
    MergeTable merges;
    char *vocab_text;          /* the vocabulary's strings, NUL-separated, for vocab */
    NameTable vocab;           /* byte-level string -> id: for ignore_merges */
    bool ignore_merges;        /* a piece that is a whole vocabulary entry skips merging */
    AddedToken *added;
    size_t n_added;
    int32_t pad_id, vocab_size;
    char path[PATH_BYTES];     /* tokenizer.json, for messages */
};

void tokenizer_free(Tokenizer *t) {
    if (!t) return;
    free(t->merges.slots);
    free(t->vocab_text);
    name_table_free(&t->vocab);
    for (size_t i = 0; i < t->n_added; i++) free(t->added[i].content);
    free(t->added);
    free(t);
}

/* Largest id a tokenizer may use: embedding tables beyond 2^24 rows are not a thing. */
#define TOKENIZER_MAX_ID (1 << 24)

/* v must be a JSON value `expected` (null, false or "" mean "off" for the options we refuse to
 * pretend to support). */
static bool json_is_off(const JsonValue *v) {
    return !v || v->type == JSON_NULL || (v->type == JSON_BOOL && !v->boolean) ||
           (v->type == JSON_STRING && v->length == 0);
}

static bool json_string_is(const JsonValue *v, const char *s) {
    return v && v->type == JSON_STRING && !strcmp(v->string, s);
}

/* normalizer {"type": "NFC"} (or none), pre_tokenizer Sequence [Split(pattern, Isolated),
 * ByteLevel(add_prefix_space false, use_regex false)]: the pipeline implemented here. */
static int tokenizer_check_pipeline(const JsonValue *root, const char *path, Error *e) {
    const JsonValue *norm = json_get(root, "normalizer");
    if (norm && norm->type != JSON_NULL && !json_string_is(json_get(norm, "type"), "NFC"))
        return error_set(e, "%s: normalizer is not {\"type\": \"NFC\"}: diamond implements "
                         "Qwen2/Qwen3's byte-level BPE only", path);
    const JsonValue *pre = json_get(root, "pre_tokenizer");
    const JsonValue *steps = pre ? json_get(pre, "pretokenizers") : NULL;
    const JsonValue *split = steps && steps->type == JSON_ARRAY && steps->count == 2
                                 ? &steps->items[0] : NULL;
    const JsonValue *bytes = split ? &steps->items[1] : NULL;
    const JsonValue *pattern = split ? json_get(split, "pattern") : NULL;
    bool ok = json_string_is(json_get(pre, "type"), "Sequence") && split &&
              json_string_is(json_get(split, "type"), "Split") &&
              json_string_is(json_get(pattern, "Regex"), TOKENIZER_SPLIT_PATTERN) &&
              json_string_is(json_get(split, "behavior"), "Isolated") &&
              json_is_off(json_get(split, "invert")) &&
              json_string_is(json_get(bytes, "type"), "ByteLevel") &&
              json_is_off(json_get(bytes, "add_prefix_space")) &&
              json_is_off(json_get(bytes, "use_regex"));
    if (!ok)
        return error_set(e, "%s: pre_tokenizer is not Qwen2/Qwen3's (Split on their regex, "
                         "Isolated, then ByteLevel without prefix space or regex)", path);
    return 0;
}

/* model: {"type": "BPE", ...} with none of the options diamond does not implement. */
static int tokenizer_check_model(const JsonValue *model, const char *path, Error *e) {
    const JsonValue *type = json_get(model, "type");
    if (!model || model->type != JSON_OBJECT)
        return error_set(e, "%s: no \"model\" object", path);
    if (!json_string_is(type, "BPE"))
        return error_set(e, "%s: model type '%s' is not supported: diamond reads byte-level BPE "
                         "tokenizers (Qwen2/Qwen3)", path,
                         type && type->type == JSON_STRING ? type->string : "?");
    static const char *const off[] = {"dropout", "unk_token", "continuing_subword_prefix",
                                      "end_of_word_suffix", "byte_fallback"};
    for (size_t i = 0; i < COUNT_OF(off); i++)
        if (!json_is_off(json_get(model, off[i])))
            return error_set(e, "%s: model.%s is set: diamond implements BPE without it", path,
                             off[i]);
    return 0;
}

/* model.vocab: string -> id, copied into t->vocab_text and indexed by t->vocab. */
static int tokenizer_read_vocab(Tokenizer *t, const JsonValue *vocab, Error *e) {
    if (!vocab || vocab->type != JSON_OBJECT || vocab->count == 0)
        return error_set(e, "%s: model.vocab is not a non-empty object", t->path);
    size_t bytes = 0;
    for (size_t i = 0; i < vocab->count; i++) bytes += strlen(vocab->members[i].key) + 1;
    if (!(t->vocab_text = malloc(bytes)) || name_table_init(&t->vocab, vocab->count))
        return error_set(e, "%s: out of memory for the vocabulary", t->path);
    char *at = t->vocab_text;
    for (size_t i = 0; i < vocab->count; i++) {
        const JsonMember *m = &vocab->members[i];
        char buf[PRINTABLE_BYTES];
        if (!m->value.is_integer || m->value.integer < 0 || m->value.integer >= TOKENIZER_MAX_ID)
            return error_set(e, "%s: vocab entry '%s' has no id in 0 .. %d", t->path,
                             printable(m->key, buf, sizeof buf), TOKENIZER_MAX_ID - 1);
        size_t n = strlen(m->key) + 1;
        memcpy(at, m->key, n);
        name_table_insert(&t->vocab, at, (size_t)m->value.integer); /* keys are unique JSON keys */
        if (m->value.integer >= t->vocab_size) t->vocab_size = (int32_t)m->value.integer + 1;
        at += n;
    }
    return 0;
}

/* Every byte's byte-level character must be a vocabulary entry (there is no unknown token). */
static int tokenizer_byte_ids(Tokenizer *t, Error *e) {
    for (unsigned b = 0; b < 256; b++) {
        char s[5] = {0};
        size_t id;
        utf8_encode(byte_level_char(b), s);
        if (!name_table_find(&t->vocab, s, &id))
            return error_set(e, "%s: the vocabulary has no entry for byte 0x%02X", t->path, b);
        t->byte_ids[b] = (int32_t)id;
    }
    return 0;
}

/* The two halves of merge i: "a b" (one space; byte-level symbols hold none) or ["a", "b"]. */
static int tokenizer_merge_halves(const Tokenizer *t, const JsonValue *merge, size_t i,
                                  char *left, char *right, size_t size, Error *e) {
    const char *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    if (merge->type == JSON_STRING) {
        const char *space = strchr(merge->string, ' ');
        if (space && !strchr(space + 1, ' ')) {
            a = merge->string, na = (size_t)(space - merge->string);
            b = space + 1, nb = strlen(b);
        }
    } else if (merge->type == JSON_ARRAY && merge->count == 2 &&
               merge->items[0].type == JSON_STRING && merge->items[1].type == JSON_STRING) {
        a = merge->items[0].string, na = merge->items[0].length;
        b = merge->items[1].string, nb = merge->items[1].length;
    }
    if (!a || na == 0 || nb == 0)
        return error_set(e, "%s: merge %zu is neither \"a b\" nor [\"a\", \"b\"]", t->path, i);
    if (na + nb >= size) return error_set(e, "%s: merge %zu is too long", t->path, i);
    memcpy(left, a, na);
    left[na] = '\0';
    memcpy(right, b, nb);
    right[nb] = '\0';
    return 0;
}

/* model.merges, ranked by their order: both halves and their join must be vocabulary entries. */
static int tokenizer_read_merges(Tokenizer *t, const JsonValue *merges, Error *e) {
    if (!merges || merges->type != JSON_ARRAY || merges->count >= TOKENIZER_MAX_ID)
        return error_set(e, "%s: model.merges is not an array of at most %d merges", t->path,
                         TOKENIZER_MAX_ID - 1);
    if (merge_table_init(&t->merges, merges->count))
        return error_set(e, "%s: out of memory for the merges", t->path);
    enum { HALF = 1024 };
    char left[HALF], right[HALF], joined[2 * HALF];
    for (size_t i = 0; i < merges->count; i++) {
        size_t a, b, ab;
        if (tokenizer_merge_halves(t, &merges->items[i], i, left, right, HALF, e)) return -1;
        snprintf(joined, sizeof joined, "%s%s", left, right);
        char buf[PRINTABLE_BYTES];
        if (!name_table_find(&t->vocab, left, &a) || !name_table_find(&t->vocab, right, &b) ||
            !name_table_find(&t->vocab, joined, &ab))
            return error_set(e, "%s: merge %zu ('%s') names a token the vocabulary lacks",
                             t->path, i, printable(joined, buf, sizeof buf));
        merge_table_insert(&t->merges, (int32_t)a, (int32_t)b, (int32_t)i, (int32_t)ab);
    }
    return 0;
}

/* added_tokens: matched whole in the raw text. Options that change how they match (stripping
 * spaces around them, whole words only, matching after normalisation) are refused. */
static int tokenizer_read_added(Tokenizer *t, const JsonValue *added, Error *e) {
    if (!added) return 0;
    if (added->type != JSON_ARRAY) return error_set(e, "%s: added_tokens is not an array", t->path);
    if (!(t->added = calloc(added->count ? added->count : 1, sizeof *t->added)))
        return error_set(e, "%s: out of memory", t->path);
    for (size_t i = 0; i < added->count; i++) {
        const JsonValue *a = &added->items[i], *id = json_get(a, "id");
        const JsonValue *content = json_get(a, "content");
        if (!id || !id->is_integer || id->integer < 0 || id->integer >= TOKENIZER_MAX_ID ||
            !content || content->type != JSON_STRING || content->length == 0)
            return error_set(e, "%s: added_tokens[%zu] needs an id in 0 .. %d and a non-empty "
                             "content", t->path, i, TOKENIZER_MAX_ID - 1);
        static const char *const off[] = {"single_word", "lstrip", "rstrip", "normalized"};
        for (size_t k = 0; k < COUNT_OF(off); k++)
            if (!json_is_off(json_get(a, off[k])))
                return error_set(e, "%s: added token '%s' sets %s, which diamond does not "
                                 "implement", t->path, content->string, off[k]);
        AddedToken *tok = &t->added[t->n_added++];
        if (!(tok->content = strdup(content->string)))
            return error_set(e, "%s: out of memory", t->path);
        tok->length = content->length;
        tok->id = (int32_t)id->integer;
        if (tok->id >= t->vocab_size) t->vocab_size = tok->id + 1;
    }
    return 0;
}

static int tokenizer_read_json(Tokenizer *t, const JsonValue *root, Error *e) {
    const JsonValue *model = json_get(root, "model");
    if (tokenizer_check_pipeline(root, t->path, e) || tokenizer_check_model(model, t->path, e) ||
        tokenizer_read_vocab(t, json_get(model, "vocab"), e) || tokenizer_byte_ids(t, e) ||
        tokenizer_read_merges(t, json_get(model, "merges"), e) ||
        tokenizer_read_added(t, json_get(root, "added_tokens"), e))
        return -1;
    const JsonValue *ignore = json_get(model, "ignore_merges");
    t->ignore_merges = ignore && ignore->type == JSON_BOOL && ignore->boolean;
    return 0;
}

/* The id of token text: an added token or a vocabulary entry; -1 when neither. */
static int32_t tokenizer_token_id(const Tokenizer *t, const char *text) {
    for (size_t i = 0; i < t->n_added; i++)
        if (!strcmp(t->added[i].content, text)) return t->added[i].id;
    size_t id;
    return name_table_find(&t->vocab, text, &id) ? (int32_t)id : -1;
}

/* tokenizer_config.json's pad_token ("<|endoftext|>" or {"content": ...}); Qwen2Tokenizer's
 * default "<|endoftext|>" when the file does not name one. */
static int tokenizer_read_config(Tokenizer *t, const char *path, Error *e) {
    JsonDoc *doc;
    if (json_parse_file(&doc, path, e)) return -1;
    const JsonValue *pad = json_get(json_root(doc), "pad_token");
    if (pad && pad->type == JSON_OBJECT) pad = json_get(pad, "content");
    const char *name = pad && pad->type == JSON_STRING ? pad->string : "<|endoftext|>";
    int rc = 0;
    if (pad && pad->type != JSON_STRING && pad->type != JSON_NULL)
        rc = error_set(e, "%s: pad_token is neither a string nor {\"content\": string}", path);
    else if ((t->pad_id = tokenizer_token_id(t, name)) < 0)
        rc = error_set(e, "%s: the pad token '%s' is not a token of the tokenizer", path, name);
    json_free(doc);
    return rc;
}

int tokenizer_from_json(Tokenizer **out, const char *text, size_t len, const char *source,
                        Error *e) {
    *out = NULL;
    Tokenizer *t = calloc(1, sizeof *t);
    if (!t) return error_set(e, "out of memory loading %s", source);
    t->pad_id = -1;
    JsonDoc *doc = NULL;
    int n = snprintf(t->path, sizeof t->path, "%s", source);
    int rc = n < 0 || (size_t)n >= sizeof t->path ? error_set(e, "name too long: %s", source)
             : json_parse(&doc, text, len, t->path, e) || tokenizer_read_json(t, json_root(doc), e);
    json_free(doc);
    if (rc) {
        tokenizer_free(t);
        return -1;
    }
    *out = t;
    return 0;
}

int tokenizer_load(Tokenizer **out, const char *dir, Error *e) {
    *out = NULL;
    char path[PATH_BYTES], config[PATH_BYTES];
    MappedFile file = {0};
    if (path_join(path, sizeof path, dir, "tokenizer.json", e) ||
        path_join(config, sizeof config, dir, "tokenizer_config.json", e) ||
        map_file(&file, path, e))
        return -1;
    int rc = tokenizer_from_json(out, (const char *)file.bytes, file.size, path, e) ||
             tokenizer_read_config(*out, config, e);
    unmap_file(&file);
    if (rc) {
        tokenizer_free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

int32_t tokenizer_vocab_size(const Tokenizer *t) {
    return t->vocab_size;
}

int32_t tokenizer_pad_id(const Tokenizer *t) {
    return t->pad_id;
}

/* --- encoding --- */

/* A growing array of ids. */
static int ids_push(TokenIds *ids, int32_t id) {
    void *data = ids->ids;
    if (array_reserve(&data, &ids->capacity, ids->count, sizeof *ids->ids, 256)) return -1;
    ids->ids = data;
    ids->ids[ids->count++] = id;
    return 0;
}

/* Scratch of one encode call: the NFC text's code points, one piece's bytes and symbols, and
 * the merge heap. */
typedef struct EncodeScratch {
    CodePoints text;
    char *bytes;
    BpeSymbol *symbols;
    BpeCandidate *heap;
    size_t capacity; /* bytes of the longest piece they fit */
} EncodeScratch;

static void encode_scratch_free(EncodeScratch *s) {
    free(s->text.cp);
    free(s->bytes);
    free(s->symbols);
    free(s->heap);
}

static int encode_scratch_fit(EncodeScratch *s, size_t bytes) {
    if (bytes <= s->capacity) return 0;
    if (bytes > INT32_MAX / 3) return -1;
    free(s->bytes);
    free(s->symbols);
    free(s->heap);
    s->bytes = malloc(bytes + 1);
    s->symbols = malloc(bytes * sizeof *s->symbols);
    s->heap = malloc(3 * bytes * sizeof *s->heap);
    s->capacity = s->bytes && s->symbols && s->heap ? bytes : 0;
    return s->capacity ? 0 : -1;
}

/* One pre-tokenizer piece cp[0 .. n) -> its BPE ids appended to ids. */
static int encode_piece(const Tokenizer *t, const uint32_t *cp, size_t n, EncodeScratch *s,
                        TokenIds *ids) {
    if (encode_scratch_fit(s, 4 * n)) return -1;
    size_t len = 0;
    for (size_t i = 0; i < n; i++) len += utf8_encode(cp[i], s->bytes + len);
    if (t->ignore_merges) {
        char *chars = malloc(2 * len + 1); /* byte-level characters take 1-2 bytes each */
        if (!chars) return -1;
        size_t m = 0, id;
        for (size_t i = 0; i < len; i++)
            m += utf8_encode(byte_level_char((unsigned char)s->bytes[i]), chars + m);
        chars[m] = '\0';
        bool whole = name_table_find(&t->vocab, chars, &id);
        free(chars);
        if (whole) return ids_push(ids, (int32_t)id);
    }
    for (size_t i = 0; i < len; i++)
        s->symbols[i] = (BpeSymbol){.id = t->byte_ids[(unsigned char)s->bytes[i]],
                                    .prev = (int32_t)i - 1,
                                    .next = i + 1 < len ? (int32_t)i + 1 : -1};
    BpeHeap heap = {.items = s->heap};
    bpe_merge(&t->merges, s->symbols, (int32_t)len, &heap);
    if (len == 0) return 0;
    for (int32_t i = 0; i >= 0; i = s->symbols[i].next) /* the list of symbols ends at -1 */
        if (ids_push(ids, s->symbols[i].id)) return -1;
    return 0;
}

/* Text between added tokens: NFC, pre-tokenizer pieces, BPE. */
static int encode_text(const Tokenizer *t, const char *text, size_t len, EncodeScratch *s,
                       TokenIds *ids) {
    if (nfc_code_points(text, len, &s->text)) return -1;
    for (size_t i = 0; i < s->text.n;) {
        size_t k = pretoken_length(s->text.cp + i, s->text.n - i);
        if (encode_piece(t, s->text.cp + i, k, s, ids)) return -1;
        i += k;
    }
    return 0;
}

/* The added token starting at text (the longest when several do), or NULL. */
static const AddedToken *added_token_at(const Tokenizer *t, const char *text, size_t len) {
    const AddedToken *best = NULL;
    for (size_t i = 0; i < t->n_added; i++) {
        const AddedToken *a = &t->added[i];
        if (a->length <= len && !memcmp(text, a->content, a->length) &&
            (!best || a->length > best->length))
            best = a;
    }
    return best;
}

/* text -> ids (io.h): valid UTF-8 checked, added tokens matched whole, then each stretch between
 * them NFC-normalised, pre-tokenized (pretoken_length) and merged by rank (bpe_merge). */
int tokenizer_encode(const Tokenizer *t, const char *text, size_t len, TokenIds *ids, Error *e) {
    const unsigned char *u = (const unsigned char *)text;
    for (size_t i = 0; i < len;) {
        size_t k = utf8_sequence_length(u + i, len - i);
        if (k == 0) return error_set(e, "the text is not valid UTF-8 (at byte %zu)", i);
        i += k;
    }
    EncodeScratch s = {0};
    int rc = 0;
    size_t start = 0; /* of the text not yet encoded */
    for (size_t i = 0; i <= len;) {
        if (rc) break;
        const AddedToken *a = i < len ? added_token_at(t, text + i, len - i) : NULL;
        if (i < len && !a) {
            i++;
            continue;
        }
        rc = encode_text(t, text + start, i - start, &s, ids);
        if (rc == 0 && a) rc = ids_push(ids, a->id);
        i += a ? a->length : 1;
        start = i;
    }
    encode_scratch_free(&s);
    return rc ? error_set(e, "out of memory tokenizing %zu bytes", len) : 0;
}

void token_ids_free(TokenIds *ids) {
    free(ids->ids);
    *ids = (TokenIds){0};
}

/* === specs === */

/* The index of the key named name[0 .. len), or -1. */
static int spec_key_find(const SpecKey *keys, int n_keys, const char *name, size_t len) {
    for (int k = 0; k < n_keys; k++)
        if (strlen(keys[k].name) == len && !strncmp(keys[k].name, name, len)) return k;
    return -1;
}

int spec_parse_keys(const char *what, const char *list, const SpecKey *keys, int n_keys,
                           Error *e) {
    while (list && *list) {
        const char *comma = strchr(list, ',');
        size_t len = comma ? (size_t)(comma - list) : strlen(list);
        const char *eq = memchr(list, '=', len);
        if (!eq) return error_set(e, "%s: expected key=value, got '%.*s'", what, (int)len, list);
        int k = spec_key_find(keys, n_keys, list, (size_t)(eq - list));
        if (k < 0)
            return error_set(e, "%s: unknown key '%.*s'", what, (int)(eq - list), list);
        char number[64];
        size_t nlen = len - (size_t)(eq - list) - 1;
        char *end = number;
        double v = NAN;
        if (nlen > 0 && nlen < sizeof number) {
            memcpy(number, eq + 1, nlen);
            number[nlen] = '\0';
            v = strtod(number, &end);
        }
        if (nlen == 0 || nlen >= sizeof number || *end || !isfinite(v) || v < keys[k].lo ||
            v > keys[k].hi || (keys[k].integer && v != floor(v)))
            return error_set(e, "%s: %s must be %s in [%g, %g], got '%.*s'", what, keys[k].name,
                             keys[k].integer ? "a whole number" : "a number", keys[k].lo,
                             keys[k].hi, (int)nlen, eq + 1);
        *keys[k].value = v;
        list = comma ? comma + 1 : NULL;
    }
    return 0;
}

int spec_type(const char *spec, const char *const *names, int n_names) {
    const char *colon = strchr(spec, ':');
    size_t len = colon ? (size_t)(colon - spec) : strlen(spec);
    for (int i = 0; i < n_names; i++)
        if (strlen(names[i]) == len && !strncmp(names[i], spec, len)) return i;
    return -1;
}

const char *spec_keys_after_colon(const char *spec) {
    const char *colon = strchr(spec, ':');
    return colon ? colon + 1 : NULL;
}

/* === evaluation sets (CSV) === */

void eval_csv_free(EvalCsv *c) {
    for (size_t i = 0; i < c->n; i++) free(c->rows[i].input), free(c->rows[i].path);
    free(c->rows);
    *c = (EvalCsv){0};
}

#define EVAL_CSV_MAX_FIELDS 32

/* The record at text[*pos] (RFC 4180: fields split by commas, a quoted field may hold commas,
 * newlines and "" for a quote) into fields[0 .. *count), pointers into buf, which the record
 * overwrites; *pos moves past the record's line end. */
static int eval_csv_record(const char *text, size_t len, size_t *pos, char *buf, char **fields,
                           int *count, const char *path, int line, Error *e) {
    size_t p = *pos, out = 0;
    *count = 0;
    for (;;) {
        if (*count == EVAL_CSV_MAX_FIELDS)
            return error_set(e, "%s:%d: more than %d fields", path, line, EVAL_CSV_MAX_FIELDS);
        fields[(*count)++] = buf + out;
        if (p < len && text[p] == '"') {
            for (p++;; p++) {
                if (p >= len) return error_set(e, "%s:%d: unterminated quoted field", path, line);
                if (text[p] == '"' && (p + 1 >= len || text[p + 1] != '"')) break;
                if (text[p] == '"') p++;
                buf[out++] = text[p];
            }
            p++;
            if (p + 1 < len && text[p] == '\r' && text[p + 1] == '\n') p++;
            if (p < len && text[p] != ',' && text[p] != '\n')
                return error_set(e, "%s:%d: text after a quoted field", path, line);
        } else {
            for (; p < len && text[p] != ',' && text[p] != '\n'; p++) {
                if (text[p] == '"')
                    return error_set(e, "%s:%d: a quote inside an unquoted field (quote the "
                                        "whole field)", path, line);
                buf[out++] = text[p];
            }
            if (out > 0 && buf[out - 1] == '\r' && (p >= len || text[p] == '\n')) out--; /* CRLF */
        }
        buf[out++] = '\0';
        if (p >= len || text[p] == '\n') break;
        p++; /* the comma */
    }
    *pos = p < len ? p + 1 : p;
    return 0;
}

/* The column named name in the header, or -1. Spaces around names are ignored. */
static int eval_csv_column(char **header, int count, const char *name) {
    for (int k = 0; k < count; k++) {
        const char *h = header[k];
        while (*h == ' ') h++;
        size_t n = strlen(h);
        while (n > 0 && h[n - 1] == ' ') n--;
        if (n == strlen(name) && !strncmp(h, name, n)) return k;
    }
    return -1;
}

int parse_seed(const char *s, uint64_t *seed) {
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9') return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end || v > (unsigned long long)INT64_MAX) return -1;
    *seed = v;
    return 0;
}

/* path relative to the directory of csv (as written when absolute). */
static char *eval_resolve(const char *csv, const char *path) {
    const char *slash = strrchr(csv, '/');
    int dir = path[0] == '/' || !slash ? 0 : (int)(slash - csv) + 1;
    size_t n = (size_t)dir + strlen(path) + 1;
    char *out = malloc(n);
    if (out) snprintf(out, n, "%.*s%s", dir, csv, path);
    return out;
}

/* One data row into c: its prompt or embeddings from column col, its seed from seed_col (< 0:
 * none). */
static int eval_csv_add(EvalCsv *c, char **fields, int col, int seed_col, const char *path,
                        int line, Error *e) {
    EvalRow *rows = realloc(c->rows, (c->n + 1) * sizeof *rows);
    if (!rows) return error_set(e, "%s: out of memory", path);
    c->rows = rows;
    EvalRow *r = &rows[c->n];
    *r = (EvalRow){.index = (int64_t)c->n};
    if (!fields[col][0])
        return error_set(e, "%s:%d: empty %s", path, line,
                         c->prompts ? "prompt" : "embeddings path");
    if (seed_col >= 0 && parse_seed(fields[seed_col], &r->seed))
        return error_set(e, "%s:%d: seed must be a whole number in 0..2^63-1, got '%s'", path,
                         line, fields[seed_col]);
    r->input = strdup(fields[col]);
    r->path = c->prompts ? NULL : eval_resolve(path, fields[col]);
    c->n++;
    if (!r->input || (!c->prompts && !r->path)) return error_set(e, "%s: out of memory", path);
    return 0;
}

int eval_csv_read(const char *path, bool need_seed, EvalCsv *c, Error *e) {
    char *text = NULL;
    size_t len = 0;
    *c = (EvalCsv){0};
    if (file_read_all(path, &text, &len, e)) return -1;
    int rc = eval_csv_parse(text, len, path, need_seed, c, e);
    free(text);
    return rc;
}

int eval_csv_parse(const char *text, size_t len, const char *path, bool need_seed, EvalCsv *c,
                   Error *e) {
    char *buf = NULL, *fields[EVAL_CSV_MAX_FIELDS], *header[EVAL_CSV_MAX_FIELDS];
    size_t pos = 0;
    *c = (EvalCsv){0};
    const char *nul = memchr(text, '\0', len);
    if (nul) { /* C strings would end there: a prompt cut short, silently */
        int at = 1;
        for (const char *p = text; p < nul; p++) at += *p == '\n';
        return error_set(e, "%s:%d: a NUL byte (a CSV is text)", path, at);
    }
    if (len >= 3 && !memcmp(text, "\xEF\xBB\xBF", 3)) pos = 3;
    char *head = malloc(len + 1);
    int rc = (buf = malloc(len + 1)) && head ? 0 : error_set(e, "%s: out of memory", path);
    int line = 1, n_header = 0, col = -1, seed_col = -1;
    if (rc == 0) rc = eval_csv_record(text, len, &pos, head, header, &n_header, path, line, e);
    if (rc == 0) {
        col = eval_csv_column(header, n_header, "embeddings");
        if (col < 0 && (col = eval_csv_column(header, n_header, "prompt")) >= 0) c->prompts = true;
        seed_col = eval_csv_column(header, n_header, "seed");
        if (col < 0 || (need_seed && seed_col < 0))
            rc = error_set(e, "%s: the header must name the columns `prompt%s` or `embeddings%s` "
                              "(got '%s%s')", path, need_seed ? ",seed" : "",
                           need_seed ? ",seed" : "", header[0], n_header > 1 ? ",..." : "");
    }
    while (pos < len) {
        if (rc) break;
        int count, start_line = ++line;
        size_t from = pos;
        rc = eval_csv_record(text, len, &pos, buf, fields, &count, path, start_line, e);
        for (size_t p = from; p + 1 < pos; p++) line += text[p] == '\n'; /* quoted newlines */
        if (rc || (count == 1 && !fields[0][0])) continue;
        if (count != n_header)
            rc = error_set(e, "%s:%d: %d fields, the header has %d", path, start_line, count,
                           n_header);
        else
            rc = eval_csv_add(c, fields, col, need_seed ? seed_col : -1, path, start_line, e);
    }
    if (rc == 0 && c->n == 0) rc = error_set(e, "%s: no data rows", path);
    free(buf);
    free(head);
    if (rc) eval_csv_free(c);
    return rc;
}

/* === images === */

static bool image_size_valid(long width, long height) {
    return width >= 1 && width <= IMAGE_MAX_SIDE && height >= 1 && height <= IMAGE_MAX_SIDE;
}

static size_t image_bytes(const Image *img) {
    return (size_t)img->width * (size_t)img->height * 3;
}

void image_from_signed(const float *chw, int width, int height, uint8_t *rgb) {
    size_t plane = (size_t)width * (size_t)height;
    for (size_t p = 0; p < plane; p++)
        for (int c = 0; c < 3; c++) {
            float v = (chw[c * plane + p] + 1.0f) / 2.0f;
            v = v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f;
            rgb[p * 3 + c] = (uint8_t)(v * 255.0f);
        }
}

int image_alloc(Image *img, int width, int height, Error *e) {
    img->width = img->height = 0;
    img->rgb = NULL;
    if (!image_size_valid(width, height))
        return error_set(e, "image size %dx%d is outside 1..%d", width, height, IMAGE_MAX_SIDE);
    img->rgb = calloc((size_t)width * (size_t)height, 3);
    if (!img->rgb) return error_set(e, "out of memory for a %dx%d image", width, height);
    img->width = width;
    img->height = height;
    return 0;
}

void image_free(Image *img) {
    free(img->rgb);
    img->rgb = NULL;
    img->width = img->height = 0;
}

static int image_check(const char *path, const Image *img, Error *e) {
    if (!image_size_valid(img->width, img->height))
        return error_set(e, "%s: image size %dx%d is outside 1..%d", path, img->width, img->height, IMAGE_MAX_SIDE);
    if (!img->rgb) return error_set(e, "%s: image has no pixels", path);
    return 0;
}

/* --- PPM --- */

static bool is_ppm_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

/* The next decimal number of a PPM header after whitespace and '#' comments. */
static int ppm_header_number(const unsigned char *b, size_t size, size_t *pos, const char *what,
                             const char *source, long *out, Error *e) {
    size_t i = *pos;
    for (;;) {
        while (i < size && is_ppm_space(b[i])) i++;
        if (i >= size || b[i] != '#') break;
        while (i < size && b[i] != '\n' && b[i] != '\r') i++;
    }
    if (i >= size || !is_digit(b[i])) return error_set(e, "%s: PPM header: expected the %s", source, what);
    long v = 0;
    for (; i < size && is_digit(b[i]); i++) {
        v = v * 10 + (b[i] - '0');
        if (v > 1000000) return error_set(e, "%s: PPM %s is too large", source, what);
    }
    *pos = i;
    *out = v;
    return 0;
}

int ppm_parse(Image *out, const void *bytes, size_t size, const char *source, Error *e) {
    const unsigned char *b = bytes;
    size_t pos = 2;
    long width, height, maxval;
    out->width = out->height = 0;
    out->rgb = NULL;
    if (size < 3 || b[0] != 'P' || b[1] != '6' || !(is_ppm_space(b[2]) || b[2] == '#'))
        return error_set(e, "%s: not a binary PPM (P6) file", source);
    if (ppm_header_number(b, size, &pos, "width", source, &width, e) ||
        ppm_header_number(b, size, &pos, "height", source, &height, e) ||
        ppm_header_number(b, size, &pos, "maxval", source, &maxval, e))
        return -1;
    if (!image_size_valid(width, height))
        return error_set(e, "%s: PPM size %ldx%ld is outside 1..%d", source, width, height, IMAGE_MAX_SIDE);
    if (maxval != 255) return error_set(e, "%s: PPM maxval %ld; only 8-bit (255) is supported", source, maxval);
    if (pos >= size || !is_ppm_space(b[pos]))
        return error_set(e, "%s: PPM header: expected whitespace after the maxval", source);
    pos++;
    size_t need = (size_t)width * (size_t)height * 3;
    if (size - pos < need)
        return error_set(e, "%s: PPM pixel data truncated: %zu of %zu bytes", source, size - pos, need);
    if (image_alloc(out, (int)width, (int)height, e)) return -1;
    memcpy(out->rgb, b + pos, need);
    return 0;
}

int ppm_read(Image *out, const char *path, Error *e) {
    MappedFile file;
    out->width = out->height = 0;
    out->rgb = NULL;
    if (map_file(&file, path, e)) return -1;
    int rc = ppm_parse(out, file.bytes, file.size, path, e);
    unmap_file(&file);
    return rc;
}

int ppm_write(const char *path, const Image *img, Error *e) {
    if (image_check(path, img, e)) return -1;
    char header[48];
    int n = snprintf(header, sizeof header, "P6\n%d %d\n255\n", img->width, img->height);
    AtomicFile *f;
    if (atomic_open(&f, path, e)) return -1;
    if (atomic_write(f, header, (size_t)n, e) || atomic_write(f, img->rgb, image_bytes(img), e)) {
        atomic_abort(f);
        return -1;
    }
    return atomic_commit(f, e);
}

/* --- PNG --- */

/* The image data is one zlib stream (RFC 1950) holding one deflate block (RFC 1951) with the
 * fixed Huffman codes: each scanline behind the PNG filter that makes its bytes smallest, then
 * LZ77 matches found through hash chains. Matches stay inside a segment of DEFLATE_SEGMENT
 * filtered bytes, so the writer holds one segment, not the image; the compressed bytes leave in
 * IDAT chunks of up to PNG_IDAT_BYTES. */
#define DEFLATE_SEGMENT 65536
#define DEFLATE_WINDOW 32768 /* the farthest a match may point back */
#define DEFLATE_MIN_MATCH 3
#define DEFLATE_MAX_MATCH 258
#define DEFLATE_HASH_BITS 15
#define DEFLATE_MAX_CHAIN 64 /* candidates tried per position: enough for pictures of blocks */
#define DEFLATE_END_OF_BLOCK 256
#define PNG_IDAT_BYTES 65536
#define PNG_FILTERS 5 /* none, sub, up, average, Paeth */
/* Adler-32 sums stay below 2^32 for this many bytes between reductions (zlib's NMAX). */
#define ADLER_RUN 5552

typedef struct PngWriter {
    AtomicFile *file;
    Error *e;
    uint32_t crc_table[256];
    uint32_t crc;              /* of the chunk being written */
    uint32_t adler_a, adler_b; /* of the filtered scanlines */
    uint64_t bits;             /* deflate output not yet in whole bytes, first bit lowest */
    int n_bits;
    size_t idat_len;
    unsigned char idat[PNG_IDAT_BYTES + 8];
    size_t segment_len;
    unsigned char segment[DEFLATE_SEGMENT];
    int32_t head[1 << DEFLATE_HASH_BITS]; /* last position + 1 of each hash in the segment */
    int32_t prev[DEFLATE_SEGMENT];        /* the position + 1 before it with the same hash */
    unsigned char *rows;       /* [PNG_FILTERS][1 + 3 width]: a scanline under each filter */
} PngWriter;

/* CRC-32 as PNG and zlib use it: reflected polynomial 0xEDB88320. */
static void crc_table_init(uint32_t table[256]) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        table[n] = c;
    }
}

static void adler_update(uint32_t *a, uint32_t *b, const unsigned char *p, size_t n) {
    while (n > 0) {
        size_t run = n < ADLER_RUN ? n : ADLER_RUN;
        for (size_t i = 0; i < run; i++) {
            *a += p[i];
            *b += *a;
        }
        *a %= 65521;
        *b %= 65521;
        p += run;
        n -= run;
    }
}

/* Bytes inside a chunk: written and added to its CRC. */
static int png_put(PngWriter *w, const void *data, size_t n) {
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) w->crc = w->crc_table[(w->crc ^ p[i]) & 0xff] ^ (w->crc >> 8);
    return atomic_write(w->file, data, n, w->e);
}

static int png_chunk(PngWriter *w, const char type[4], const unsigned char *data, uint32_t length) {
    unsigned char len[4], crc[4];
    store_be32(len, length);
    w->crc = 0xffffffffu;
    if (atomic_write(w->file, len, 4, w->e) || png_put(w, type, 4) || png_put(w, data, length))
        return -1;
    store_be32(crc, w->crc ^ 0xffffffffu);
    return atomic_write(w->file, crc, 4, w->e);
}

/* The compressed bytes so far as one IDAT chunk. */
static int png_flush_idat(PngWriter *w) {
    int rc = w->idat_len ? png_chunk(w, "IDAT", w->idat, (uint32_t)w->idat_len) : 0;
    w->idat_len = 0;
    return rc;
}

/* Appends the n lowest bits of value, first bit lowest (deflate's order for all but Huffman
 * codes); n <= 32. */
static int deflate_bits(PngWriter *w, uint32_t value, int n) {
    w->bits |= (uint64_t)value << w->n_bits;
    w->n_bits += n;
    while (w->n_bits >= 8) {
        w->idat[w->idat_len++] = (unsigned char)w->bits;
        w->bits >>= 8;
        w->n_bits -= 8;
    }
    return w->idat_len >= PNG_IDAT_BYTES ? png_flush_idat(w) : 0;
}

/* A Huffman code of n bits, sent from its highest bit down. */
static int deflate_code(PngWriter *w, uint32_t code, int n) {
    uint32_t reversed = 0;
    for (int i = 0; i < n; i++) reversed |= (code >> i & 1) << (n - 1 - i);
    return deflate_bits(w, reversed, n);
}

/* Literal/length symbol 0..287 in the fixed code (RFC 1951 3.2.6). */
static int deflate_symbol(PngWriter *w, int symbol) {
    if (symbol < 144) return deflate_code(w, 0x30 + (uint32_t)symbol, 8);
    if (symbol < 256) return deflate_code(w, 0x190 + (uint32_t)(symbol - 144), 9);
    if (symbol < 280) return deflate_code(w, (uint32_t)(symbol - 256), 7);
    return deflate_code(w, 0xC0 + (uint32_t)(symbol - 280), 8);
}

/* A match of `length` (3..258) bytes `distance` (1..32768) back: length symbol and extra bits,
 * distance code (5 bits in the fixed code) and extra bits. */
static int deflate_match(PngWriter *w, int length, int distance) {
    static const uint16_t length_base[29] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,
                                             15, 17, 19, 23, 27, 31, 35, 43, 51,  59,
                                             67, 83, 99, 115, 131, 163, 195, 227, 258};
    static const uint8_t length_extra[29] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2,
                                             2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
    static const uint16_t distance_base[30] = {
        1,   2,   3,   4,   5,   7,    9,    13,   17,   25,   33,   49,   65,    97,    129,
        193, 257, 385, 513, 769, 1025, 1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577};
    int l = 28, d = 29;
    while (length_base[l] > length) l--;
    while (distance_base[d] > distance) d--;
    return deflate_symbol(w, 257 + l) ||
                   deflate_bits(w, (uint32_t)(length - length_base[l]), length_extra[l]) ||
                   deflate_code(w, (uint32_t)d, 5) ||
                   deflate_bits(w, (uint32_t)(distance - distance_base[d]), d < 4 ? 0 : d / 2 - 1)
               ? -1
               : 0;
}

static uint32_t deflate_hash(const unsigned char *p) {
    uint32_t v = (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
    return (v * 2654435761u) >> (32 - DEFLATE_HASH_BITS);
}

/* Position i of the segment into its hash chain (it needs DEFLATE_MIN_MATCH bytes from i). */
static void deflate_insert(PngWriter *w, size_t i) {
    if (i + DEFLATE_MIN_MATCH > w->segment_len) return;
    uint32_t h = deflate_hash(w->segment + i);
    w->prev[i] = w->head[h];
    w->head[h] = (int32_t)i + 1;
}

/* The longest earlier match for position i through its hash chain: its length (0 when under
 * DEFLATE_MIN_MATCH) and *distance. */
static int deflate_longest(const PngWriter *w, size_t i, int *distance) {
    const unsigned char *s = w->segment;
    size_t limit = w->segment_len - i < DEFLATE_MAX_MATCH ? w->segment_len - i : DEFLATE_MAX_MATCH;
    int best = 0;
    if (limit < DEFLATE_MIN_MATCH) return 0;
    int32_t candidate = w->head[deflate_hash(s + i)];
    for (int tries = 0; candidate > 0 && tries < DEFLATE_MAX_CHAIN; tries++) {
        size_t j = (size_t)candidate - 1;
        if (i - j > DEFLATE_WINDOW) break;
        size_t n = 0;
        while (n < limit && s[j + n] == s[i + n]) n++;
        if ((int)n > best) {
            best = (int)n;
            *distance = (int)(i - j);
            if (n == limit) break;
        }
        candidate = w->prev[j];
    }
    return best >= DEFLATE_MIN_MATCH ? best : 0;
}

/* The segment's bytes as literals and greedy matches; then an empty segment. */
static int deflate_segment(PngWriter *w) {
    memset(w->head, 0, sizeof w->head);
    for (size_t i = 0; i < w->segment_len;) {
        int distance = 0, length = deflate_longest(w, i, &distance);
        if (length == 0 ? deflate_symbol(w, w->segment[i]) : deflate_match(w, length, distance))
            return -1;
        for (size_t end = i + (length ? (size_t)length : 1); i < end; i++) deflate_insert(w, i);
    }
    w->segment_len = 0;
    return 0;
}

/* Filtered scanline bytes into the stream. */
static int png_feed(PngWriter *w, const unsigned char *p, size_t n) {
    adler_update(&w->adler_a, &w->adler_b, p, n);
    while (n > 0) {
        if (w->segment_len == DEFLATE_SEGMENT && deflate_segment(w)) return -1;
        size_t take = DEFLATE_SEGMENT - w->segment_len;
        if (take > n) take = n;
        memcpy(w->segment + w->segment_len, p, take);
        w->segment_len += take;
        p += take;
        n -= take;
    }
    return 0;
}

/* PNG's Paeth predictor: of left, up and up-left, the one nearest left + up - up_left. */
static int png_paeth(int left, int up, int up_left) {
    int p = left + up - up_left, dl = abs(p - left), du = abs(p - up), dul = abs(p - up_left);
    return dl <= du && dl <= dul ? left : du <= dul ? up : up_left;
}

/* row [n] (3 bytes a pixel) under filter type into out: out[0] = type, out[1..n] the
 * differences from the prediction; prev is the row above (NULL for the first: all zeros). */
static void png_filter_row(int type, const unsigned char *row, const unsigned char *prev,
                           size_t n, unsigned char *out) {
    out[0] = (unsigned char)type;
    for (size_t i = 0; i < n; i++) {
        int left = i >= 3 ? row[i - 3] : 0, up = prev ? prev[i] : 0;
        int up_left = prev && i >= 3 ? prev[i - 3] : 0;
        int predicted = type == 1   ? left
                        : type == 2 ? up
                        : type == 3 ? (left + up) / 2
                        : type == 4 ? png_paeth(left, up, up_left)
                                    : 0;
        out[i + 1] = (unsigned char)(row[i] - predicted);
    }
}

/* The filtered scanline whose bytes, read as signed, have the least absolute sum (the PNG
 * specification's suggested heuristic). */
static const unsigned char *png_best_row(PngWriter *w, const unsigned char *row,
                                         const unsigned char *prev, size_t n) {
    const unsigned char *best = NULL;
    uint64_t best_cost = UINT64_MAX;
    for (int type = 0; type < PNG_FILTERS; type++) {
        unsigned char *out = w->rows + (size_t)type * (n + 1);
        png_filter_row(type, row, prev, n, out);
        uint64_t cost = 0;
        for (size_t i = 1; i <= n; i++) cost += out[i] < 128 ? out[i] : 256 - out[i];
        if (cost < best_cost) {
            best_cost = cost;
            best = out;
        }
    }
    return best;
}

/* The IDAT chunks: zlib header, one final fixed-Huffman block of the filtered scanlines, the
 * end-of-block code, the Adler-32 of the scanlines. */
static int png_write_idat(PngWriter *w, const Image *img) {
    size_t row_bytes = (size_t)img->width * 3;
    static const unsigned char zlib_header[2] = {0x78, 0x01}; /* deflate, 32K window; % 31 == 0 */
    w->adler_a = 1;
    w->adler_b = 0;
    w->bits = 0;
    w->n_bits = 0;
    w->segment_len = 0;
    memcpy(w->idat, zlib_header, 2);
    w->idat_len = 2;
    if (deflate_bits(w, 1 | 1 << 1, 3)) return -1; /* BFINAL 1, BTYPE 01: fixed codes */
    for (int y = 0; y < img->height; y++) {
        const unsigned char *row = img->rgb + (size_t)y * row_bytes;
        if (png_feed(w, png_best_row(w, row, y ? row - row_bytes : NULL, row_bytes), row_bytes + 1))
            return -1;
    }
    if (deflate_segment(w) || deflate_symbol(w, DEFLATE_END_OF_BLOCK) ||
        deflate_bits(w, 0, (8 - w->n_bits) % 8))
        return -1;
    unsigned char adler[4];
    store_be32(adler, w->adler_b << 16 | w->adler_a);
    for (int i = 0; i < 4; i++)
        if (deflate_bits(w, adler[i], 8)) return -1;
    return png_flush_idat(w);
}

/* text under key as an iTXt chunk (UTF-8, uncompressed): key, NUL, compression flag and method
 * 0, an empty language tag and translated keyword (NUL each), then the text. */
static int png_text_chunk(PngWriter *w, const char *key, const char *text) {
    size_t k = strlen(key), n = strlen(text);
    if (k < 1 || k > PNG_KEY_MAX || n > PNG_TEXT_MAX)
        return error_set(w->e, "a PNG text of %zu bytes under a key of %zu: at most %d and %d",
                         n, k, PNG_TEXT_MAX, PNG_KEY_MAX);
    unsigned char *data = malloc(k + 5 + n);
    if (!data) return error_set(w->e, "out of memory for the PNG text");
    memcpy(data, key, k);
    memset(data + k, 0, 5);
    memcpy(data + k + 5, text, n);
    int rc = png_chunk(w, "iTXt", data, (uint32_t)(k + 5 + n));
    free(data);
    return rc;
}

static const unsigned char png_signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

static int png_write_all(PngWriter *w, const Image *img, const char *key, const char *text) {
    unsigned char ihdr[13] = {0};
    store_be32(ihdr, (uint32_t)img->width);
    store_be32(ihdr + 4, (uint32_t)img->height);
    ihdr[8] = 8;  /* bits per channel */
    ihdr[9] = 2;  /* colour type: RGB; compression, filter and interlace methods stay 0 */
    if (atomic_write(w->file, png_signature, sizeof png_signature, w->e) ||
        png_chunk(w, "IHDR", ihdr, sizeof ihdr) || (key && png_text_chunk(w, key, text)) ||
        png_write_idat(w, img) || png_chunk(w, "IEND", NULL, 0))
        return -1;
    return 0;
}

int png_write(const char *path, const Image *img, Error *e) {
    return png_write_text(path, img, NULL, NULL, e);
}

int png_write_text(const char *path, const Image *img, const char *key, const char *text,
                   Error *e) {
    if (image_check(path, img, e)) return -1;
    PngWriter *w = malloc(sizeof *w);
    unsigned char *rows = malloc(PNG_FILTERS * ((size_t)img->width * 3 + 1));
    if (!w || !rows) {
        free(w);
        free(rows);
        return error_set(e, "%s: out of memory", path);
    }
    w->rows = rows;
    w->e = e;
    crc_table_init(w->crc_table);
    int rc = atomic_open(&w->file, path, e);
    if (rc == 0) rc = png_write_all(w, img, key, text);
    if (rc == 0) rc = atomic_commit(w->file, e);
    else if (w->file) atomic_abort(w->file);
    free(w->rows);
    free(w);
    return rc;
}

/* The bytes from p up to the first NUL before end, as a length; -1 when there is none. */
static long png_field(const unsigned char *p, const unsigned char *end) {
    const unsigned char *nul = memchr(p, 0, (size_t)(end - p));
    return nul ? (long)(nul - p) : -1;
}

/* The text of chunk data [p, end) when it is a tEXt or uncompressed iTXt under key, else NULL
 * (malformed text chunks are skipped as a reader of images skips them). */
static char *png_chunk_text(const unsigned char type[4], const unsigned char *p,
                            const unsigned char *end, const char *key) {
    bool itxt = !memcmp(type, "iTXt", 4);
    if (!itxt && memcmp(type, "tEXt", 4)) return NULL;
    long k = png_field(p, end);
    if (k < 1 || k > PNG_KEY_MAX || (size_t)k != strlen(key) || memcmp(p, key, (size_t)k))
        return NULL;
    p += k + 1;
    if (itxt) { /* compression flag 0 (method ignored), language tag, translated keyword */
        if (end - p < 2 || p[0] != 0) return NULL;
        p += 2;
        for (int field = 0; field < 2; field++) {
            long n = png_field(p, end);
            if (n < 0) return NULL;
            p += n + 1;
        }
    }
    char *text = malloc((size_t)(end - p) + 1);
    if (text) {
        memcpy(text, p, (size_t)(end - p));
        text[end - p] = '\0';
    }
    return text;
}

int png_read_text(const char *path, const char *key, char **text, Error *e) {
    MappedFile file;
    *text = NULL;
    if (map_file(&file, path, e)) return -1;
    int rc = png_find_text(file.bytes, file.size, path, key, text, e);
    unmap_file(&file);
    return rc;
}

int png_find_text(const unsigned char *bytes, size_t size, const char *path, const char *key,
                  char **text, Error *e) {
    const unsigned char *p = bytes, *end = p + size;
    *text = NULL;
    if (size < 8 || memcmp(p, png_signature, 8))
        return error_set(e, "%s: not a PNG file (no PNG signature)", path);
    p += 8;
    while (!*text) {
        if (end - p < 12)
            return error_set(e, "%s: truncated: a chunk header past the end of the file", path);
        uint32_t length = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
        const unsigned char *type = p + 4, *data = p + 8;
        if (length > (size_t)(end - data) - 4)
            return error_set(e, "%s: a %.4s chunk of %u bytes runs past the end of the file",
                             path, (const char *)type, length);
        if (!memcmp(type, "IEND", 4)) break;
        *text = png_chunk_text(type, data, data + length, key);
        p = data + length + 4; /* past the CRC */
    }
    return 0;
}
