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
 * A weight matrix (rows, cols) in its storage dtype, row-major. data may be
 * unaligned (it points into the safetensors mapping).
 */
struct se_mat {
    enum se_dtype dtype;
    const void *data;
    int rows, cols;
    /*
     * For a 16-bit matrix: an fp32 copy of W transposed, (cols, rows), made
     * once at load for the sgemm path (OpenBLAS multiplies x . Wt faster than
     * x . W^T: it packs the transposed layout more cheaply), or NULL (then
     * each sgemm widens W into wscratch). Owned by the backend.
     */
    const float *f32;
};

/* Widens a 16-bit W into dst (W.rows * W.cols floats), split over the pool. */
void se__widen(struct se_pool *pool, float *dst, const struct se_mat *W);
/* Widens a 16-bit W into dst transposed, (W.cols, W.rows), split over the pool. */
void se__widen_transposed(struct se_pool *pool, float *dst, const struct se_mat *W);

/*
 * Chooses the matrix-vector kernels for this CPU (AVX2+FMA+F16C when present)
 * and the sgemm threshold; call once.
 */
void se__kernels_init(void);
/* Which kernels se__kernels_init chose ("avx2" or "generic"). */
const char *se__kernels_name(void);

/*
 * out (n, W.rows) = x (n, W.cols) . W^T, plus bias (W.rows) when not NULL.
 * Fewer than se__gemm_min_rows rows go to a threaded kernel that reads W in
 * its storage dtype once for all rows (decode is bound by memory bandwidth,
 * so 16-bit weights are read as such); more rows go to OpenBLAS sgemm split by rows of
 * W over the pool, on W.f32 when set, else after converting a 16-bit W into
 * wscratch (W.rows x W.cols floats; unused otherwise, may then be NULL).
 */
void se__linear(struct se_pool *pool, float *out, const float *x, int n, const struct se_mat *W,
                const float *bias, float *wscratch);
extern int se__gemm_min_rows;

#define SE_MAX_FUSED 3
/*
 * As se__linear for n_mats matrices over the same x (same cols), out[m] and
 * bias[m] (may be NULL) for each; with few rows they run as one pool job.
 */
void se__linear_fused(struct se_pool *pool, int n_mats, float *const *out, const float *x, int n,
                      const struct se_mat *const *W, const float *const *bias, float *wscratch);

/* The dot product of a and b (n floats each), with the chosen kernels. */
float se__dot(const float *a, const float *b, int n);
/* y += a * x over n floats. */
void se__axpy(float *y, float a, const float *x, int n);

/* x (n_heads, head_dim) rotated in place with cos/sin (head_dim / 2), HF rotate_half. */
void se__rope(float *x, int n_heads, int head_dim, const float *cos_, const float *sin_);

#endif
