/* io.h - bytes <-> arrays: safetensors, JSON, PPM/PNG. The lowest layer: includes no other diamond header. */
#ifndef DIAMOND_IO_H
#define DIAMOND_IO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ---- errors ---------------------------------------------------------------------------------
 * Functions that can fail return 0 on success and -1 on failure, filling an Error with one line
 * that names the file, tensor or option at fault. main() prints it. */
typedef struct Error {
    char msg[512];
} Error;

/* Formats msg into e (when e is not NULL) and returns -1, so callers can `return error_set(...)`. */
int error_set(Error *e, const char *fmt, ...)
#if defined(__GNUC__) || defined(__clang__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* ---- section: JSON (owned by the io work) ---- */

/* bf16 / f16 <-> f32. To-f32 is exact; from-f32 rounds to nearest even and keeps NaN a NaN. */
float bf16_to_f32(uint16_t h);
uint16_t f32_to_bf16(float f);
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
void bf16_to_f32_array(const uint16_t *src, float *dst, size_t n);
void f16_to_f32_array(const uint16_t *src, float *dst, size_t n);

/* ---- end section: JSON ---- */

/* ---- section: safetensors (owned by the io work) ---- */

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

/* ---- end section: safetensors ---- */

/* ---- section: images (owned by the io work) ---- */

/* ---- end section: images ---- */

#endif
