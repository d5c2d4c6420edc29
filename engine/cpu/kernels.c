/* CPU kernels; see kernels.h. */
#include "kernels.h"

#include <cblas.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

static float half_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {
            /* Subnormal: normalise. */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void se__to_f32(float *dst, const void *src, enum se_dtype t, size_t n)
{
    const uint8_t *s = src;
    switch (t) {
    case SE_DTYPE_F32:
        memcpy(dst, src, n * 4);
        break;
    case SE_DTYPE_BF16:
        for (size_t k = 0; k < n; k++) {
            uint16_t h;
            memcpy(&h, s + 2 * k, 2);
            uint32_t bits = (uint32_t)h << 16;
            memcpy(&dst[k], &bits, 4);
        }
        break;
    case SE_DTYPE_F16:
        for (size_t k = 0; k < n; k++) {
            uint16_t h;
            memcpy(&h, s + 2 * k, 2);
            dst[k] = half_to_f32(h);
        }
        break;
    }
}

void se__rmsnorm(float *y, const float *x, const float *w, int n, float eps)
{
    double ss = 0;
    for (int k = 0; k < n; k++)
        ss += (double)x[k] * x[k];
    float r = (float)(1.0 / sqrt(ss / n + eps));
    for (int k = 0; k < n; k++)
        y[k] = x[k] * r * w[k];
}

static float dot_f32(const void *w, const float *b, int n)
{
    const float *a = w;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    int k = 0;
    for (; k + 8 <= n; k += 8) {
        s0 += a[k] * b[k];
        s1 += a[k + 1] * b[k + 1];
        s2 += a[k + 2] * b[k + 2];
        s3 += a[k + 3] * b[k + 3];
        s4 += a[k + 4] * b[k + 4];
        s5 += a[k + 5] * b[k + 5];
        s6 += a[k + 6] * b[k + 6];
        s7 += a[k + 7] * b[k + 7];
    }
    for (; k < n; k++)
        s0 += a[k] * b[k];
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
}

/* 16-bit rows, generic: widened in blocks of 64 then dotted. */
static float dot_16(const void *w, const float *b, int n, enum se_dtype t)
{
    float tmp[64], s = 0;
    const uint8_t *p = w;
    for (int k = 0; k < n; k += 64) {
        int m = n - k < 64 ? n - k : 64;
        se__to_f32(tmp, p + 2 * (size_t)k, t, (size_t)m);
        s += dot_f32(tmp, b + k, m);
    }
    return s;
}

static float dot_bf16(const void *w, const float *b, int n)
{
    return dot_16(w, b, n, SE_DTYPE_BF16);
}

static float dot_f16(const void *w, const float *b, int n)
{
    return dot_16(w, b, n, SE_DTYPE_F16);
}

#if defined(__x86_64__)
#include <immintrin.h>

__attribute__((target("avx2,fma"))) static float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static float dot_f32_avx2(const void *w, const float *b, int n)
{
    const float *a = w;
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(),
           c3 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 32 <= n; k += 32) {
        c0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), c0);
        c1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), c1);
        c2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), _mm256_loadu_ps(b + k + 16), c2);
        c3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), _mm256_loadu_ps(b + k + 24), c3);
    }
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
    for (; k < n; k++)
        s += a[k] * b[k];
    return s;
}

__attribute__((target("avx2,fma"))) static __m256 bf16x8(const uint16_t *p)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

__attribute__((target("avx2,fma"))) static float dot_bf16_avx2(const void *w, const float *b, int n)
{
    const uint16_t *a = w;
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(),
           c3 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 32 <= n; k += 32) {
        c0 = _mm256_fmadd_ps(bf16x8(a + k), _mm256_loadu_ps(b + k), c0);
        c1 = _mm256_fmadd_ps(bf16x8(a + k + 8), _mm256_loadu_ps(b + k + 8), c1);
        c2 = _mm256_fmadd_ps(bf16x8(a + k + 16), _mm256_loadu_ps(b + k + 16), c2);
        c3 = _mm256_fmadd_ps(bf16x8(a + k + 24), _mm256_loadu_ps(b + k + 24), c3);
    }
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
    if (k < n)
        s += dot_16(a + k, b + k, n - k, SE_DTYPE_BF16);
    return s;
}

__attribute__((target("avx2,fma,f16c"))) static __m256 f16x8(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

__attribute__((target("avx2,fma,f16c"))) static float dot_f16_avx2(const void *w, const float *b,
                                                                   int n)
{
    const uint16_t *a = w;
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps(), c2 = _mm256_setzero_ps(),
           c3 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 32 <= n; k += 32) {
        c0 = _mm256_fmadd_ps(f16x8(a + k), _mm256_loadu_ps(b + k), c0);
        c1 = _mm256_fmadd_ps(f16x8(a + k + 8), _mm256_loadu_ps(b + k + 8), c1);
        c2 = _mm256_fmadd_ps(f16x8(a + k + 16), _mm256_loadu_ps(b + k + 16), c2);
        c3 = _mm256_fmadd_ps(f16x8(a + k + 24), _mm256_loadu_ps(b + k + 24), c3);
    }
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)));
    if (k < n)
        s += dot_16(a + k, b + k, n - k, SE_DTYPE_F16);
    return s;
}

/* Widening for the sgemm path. */
__attribute__((target("avx2,fma"))) static void widen_bf16_avx2(float *dst, const void *src,
                                                                size_t n)
{
    const uint16_t *a = src;
    size_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(dst + k, bf16x8(a + k));
    se__to_f32(dst + k, a + k, SE_DTYPE_BF16, n - k);
}

__attribute__((target("avx2,fma,f16c"))) static void widen_f16_avx2(float *dst, const void *src,
                                                                    size_t n)
{
    const uint16_t *a = src;
    size_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(dst + k, f16x8(a + k));
    se__to_f32(dst + k, a + k, SE_DTYPE_F16, n - k);
}

__attribute__((target("avx2,fma"))) static void axpy_avx2(float *y, float a, const float *x, int n)
{
    __m256 va = _mm256_set1_ps(a);
    int k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(y + k,
                         _mm256_fmadd_ps(va, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
    for (; k < n; k++)
        y[k] += a * x[k];
}
#endif

static void axpy_generic(float *y, float a, const float *x, int n)
{
    for (int k = 0; k < n; k++)
        y[k] += a * x[k];
}

static void (*axpy_fn)(float *y, float a, const float *x, int n) = axpy_generic;

void se__axpy(float *y, float a, const float *x, int n)
{
    axpy_fn(y, a, x, n);
}

static void widen_bf16(float *dst, const void *src, size_t n)
{
    se__to_f32(dst, src, SE_DTYPE_BF16, n);
}

static void widen_f16(float *dst, const void *src, size_t n)
{
    se__to_f32(dst, src, SE_DTYPE_F16, n);
}

typedef void (*widen_fn)(float *dst, const void *src, size_t n);
/* Indexed by enum se_dtype; f32 needs no widening. */
static widen_fn widens[3] = {NULL, widen_f16, widen_bf16};

typedef float (*dot_fn)(const void *w, const float *b, int n);
/* Indexed by enum se_dtype. */
static dot_fn dots[3] = {dot_f32, dot_f16, dot_bf16};
static const char *kernels_name = "generic";
/*
 * Measured on the 2-core test machine (2048 x 768 bf16, AVX2 widening
 * included, sgemm split over the pool): the matrix-vector kernel wins below
 * about 16 rows (0.6 vs 1.2 ms at 8), sgemm from 16 (2.7 vs 4.6 ms at 32).
 */
int se__gemm_min_rows = 16;

void se__kernels_init(void)
{
#if defined(__x86_64__)
    /*
     * For tests: SPOOL_CPU_KERNELS=generic forces the portable kernels and
     * SPOOL_CPU_GEMM_MIN_ROWS moves the sgemm threshold.
     */
    const char *rows = getenv("SPOOL_CPU_GEMM_MIN_ROWS");
    if (rows && atoi(rows) > 0)
        se__gemm_min_rows = atoi(rows);
    const char *force = getenv("SPOOL_CPU_KERNELS");
    if (force && !strcmp(force, "generic"))
        return;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        dots[SE_DTYPE_F32] = dot_f32_avx2;
        dots[SE_DTYPE_BF16] = dot_bf16_avx2;
        axpy_fn = axpy_avx2;
        widens[SE_DTYPE_BF16] = widen_bf16_avx2;
        if (__builtin_cpu_supports("f16c")) {
            dots[SE_DTYPE_F16] = dot_f16_avx2;
            widens[SE_DTYPE_F16] = widen_f16_avx2;
        }
        kernels_name = "avx2";
    }
#endif
}

float se__dot(const float *a, const float *b, int n)
{
    return dots[SE_DTYPE_F32](a, b, n);
}

const char *se__kernels_name(void)
{
    return kernels_name;
}

/*
 * Up to SE_MAX_FUSED products of the same input, run as one pool job: the
 * threads split the rows of all matrices together, so that decode pays one
 * dispatch for q, k and v (or gate and up) instead of one each.
 */
struct matvec_job {
    const float *x;
    int n, n_mats, total_rows;
    const struct se_mat *W[SE_MAX_FUSED];
    float *out[SE_MAX_FUSED];
    const float *bias[SE_MAX_FUSED];
};

static void matvec_part(void *arg, int t, int nt)
{
    const struct matvec_job *j = arg;
    int g0 = (int)((int64_t)j->total_rows * t / nt),
        g1 = (int)((int64_t)j->total_rows * (t + 1) / nt);
    int base = 0;
    for (int m = 0; m < j->n_mats && base < g1; base += j->W[m]->rows, m++) {
        const struct se_mat *W = j->W[m];
        int o = W->rows, in = W->cols;
        int r0 = g0 - base > 0 ? g0 - base : 0, r1 = g1 - base < o ? g1 - base : o;
        size_t row_bytes = (size_t)in * (W->dtype == SE_DTYPE_F32 ? 4 : 2);
        dot_fn dot = dots[W->dtype];
        for (int r = r0; r < r1; r++) {
            const uint8_t *w = (const uint8_t *)W->data + (size_t)r * row_bytes;
            float b = j->bias[m] ? j->bias[m][r] : 0.0f;
            for (int q = 0; q < j->n; q++)
                j->out[m][(size_t)q * o + r] = dot(w, j->x + (size_t)q * in, in) + b;
        }
    }
}

struct convert_job {
    float *dst;
    const struct se_mat *W;
};

static void convert_part(void *arg, int t, int nt)
{
    const struct convert_job *j = arg;
    size_t total = (size_t)j->W->rows * j->W->cols;
    size_t a = total * (size_t)t / (size_t)nt, b = total * (size_t)(t + 1) / (size_t)nt;
    widens[j->W->dtype](j->dst + a, (const uint8_t *)j->W->data + 2 * a, b - a);
}

void se__widen(struct se_pool *pool, float *dst, const struct se_mat *W)
{
    struct convert_job j = {dst, W};
    se__pool_run(pool, convert_part, &j);
}

/* Rows [r0, r1) of W, in blocks of 16 rows x 256 columns through a stack tile. */
static void transpose_part(void *arg, int t, int nt)
{
    const struct convert_job *j = arg;
    int o = j->W->rows, in = j->W->cols;
    int r0 = (int)((int64_t)o * t / nt), r1 = (int)((int64_t)o * (t + 1) / nt);
    float tile[16][256];
    for (int rb = r0; rb < r1; rb += 16) {
        int nr = r1 - rb < 16 ? r1 - rb : 16;
        for (int kb = 0; kb < in; kb += 256) {
            int nk = in - kb < 256 ? in - kb : 256;
            for (int r = 0; r < nr; r++)
                se__to_f32(tile[r], (const uint8_t *)j->W->data + 2 * ((size_t)(rb + r) * in + kb),
                           j->W->dtype, (size_t)nk);
            for (int k = 0; k < nk; k++)
                for (int r = 0; r < nr; r++)
                    j->dst[(size_t)(kb + k) * o + rb + r] = tile[r][k];
        }
    }
}

void se__widen_transposed(struct se_pool *pool, float *dst, const struct se_mat *W)
{
    struct convert_job j = {dst, W};
    se__pool_run(pool, transpose_part, &j);
}

/*
 * One sgemm per pool thread over its share of W's rows (out's columns):
 * OpenBLAS runs single-threaded (see cpu.c), so this is what uses every core.
 * Each output element is computed by the same kernel over the same inputs
 * whatever the split.
 */
struct gemm_job {
    float *out;
    const float *x, *w32;
    int n, o, i;
    bool transposed; /* w32 is (i, o), else (o, i) */
};

static void gemm_part(void *arg, int t, int nt)
{
    const struct gemm_job *j = arg;
    /* Slabs of whole 16-row groups keep OpenBLAS on its full-width kernels. */
    int groups = (j->o + 15) / 16;
    int r0 = (int)((int64_t)groups * t / nt) * 16, r1 = (int)((int64_t)groups * (t + 1) / nt) * 16;
    if (r1 > j->o)
        r1 = j->o;
    if (r1 <= r0)
        return;
    if (j->transposed)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, j->n, r1 - r0, j->i, 1.0f, j->x,
                    j->i, j->w32 + r0, j->o, 0.0f, j->out + r0, j->o);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, j->n, r1 - r0, j->i, 1.0f, j->x, j->i,
                    j->w32 + (size_t)r0 * j->i, j->i, 0.0f, j->out + r0, j->o);
}

void se__linear(struct se_pool *pool, float *out, const float *x, int n, const struct se_mat *W,
                const float *bias, float *wscratch)
{
    int o = W->rows, i = W->cols;
    if (n < se__gemm_min_rows) {
        struct matvec_job j = {.x = x, .n = n, .n_mats = 1, .total_rows = o};
        j.W[0] = W;
        j.out[0] = out;
        j.bias[0] = bias;
        se__pool_run(pool, matvec_part, &j);
        return;
    }
    struct gemm_job g = {out, x, W->data, n, o, i, false};
    if (W->dtype != SE_DTYPE_F32 && W->f32) {
        g.w32 = W->f32;
        g.transposed = true;
    } else if (W->dtype != SE_DTYPE_F32) {
        se__widen(pool, wscratch, W);
        g.w32 = wscratch;
    }
    se__pool_run(pool, gemm_part, &g);
    if (bias)
        for (int q = 0; q < n; q++)
            for (int r = 0; r < o; r++)
                out[(size_t)q * o + r] += bias[r];
}

void se__rope(float *x, int n_heads, int head_dim, const float *cos_, const float *sin_)
{
    int half = head_dim / 2;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * head_dim;
        for (int k = 0; k < half; k++) {
            float a = v[k], b = v[k + half];
            v[k] = a * cos_[k] - b * sin_[k];
            v[k + half] = b * cos_[k] + a * sin_[k];
        }
    }
}

void se__linear_fused(struct se_pool *pool, int n_mats, float *const *out, const float *x, int n,
                      const struct se_mat *const *W, const float *const *bias, float *wscratch)
{
    if (n >= se__gemm_min_rows || n_mats > SE_MAX_FUSED) {
        for (int m = 0; m < n_mats; m++)
            se__linear(pool, out[m], x, n, W[m], bias[m], wscratch);
        return;
    }
    struct matvec_job j = {.x = x, .n = n, .n_mats = n_mats};
    for (int m = 0; m < n_mats; m++) {
        j.W[m] = W[m];
        j.out[m] = out[m];
        j.bias[m] = bias[m];
        j.total_rows += W[m]->rows;
    }
    se__pool_run(pool, matvec_part, &j);
}
