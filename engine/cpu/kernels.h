/*
 * Numeric kernels of the CPU backend, all fp32, row-major, single-threaded
 * unless they take a pool. Shapes are given in the comments as (rows, cols).
 */
#ifndef SPOOL_ENGINE_CPU_KERNELS_H
#define SPOOL_ENGINE_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "../backend.h"
#include "pool.h"

/* Converts n elements of src (dtype t) to fp32. src may be unaligned. */
void se__to_f32(float *dst, const void *src, enum se_dtype t, size_t n);

/* y = x * rsqrt(mean(x^2) + eps) * w, for one row of n. */
void se__rmsnorm(float *y, const float *x, const float *w, int n, float eps);

/*
 * out (n, o) = x (n, i) . W^T with W (o, i), plus bias (o) when not NULL.
 * Many rows go to OpenBLAS sgemm; few rows to a threaded kernel that reads
 * W once for all rows.
 */
void se__linear(struct se_pool *pool, float *out, const float *x, int n, const float *W,
                const float *bias, int o, int i);

/* x (n_heads, head_dim) rotated in place with cos/sin (head_dim / 2), HF rotate_half. */
void se__rope(float *x, int n_heads, int head_dim, const float *cos_, const float *sin_);

#endif
