/* CPU kernels; see kernels.h. */
#include "kernels.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

/* Below this many rows, the threaded matrix-vector kernel beats sgemm. */
#define GEMM_MIN_ROWS 4

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

static float dot(const float *a, const float *b, int n)
{
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

struct matvec_job {
    float *out;
    const float *x, *W, *bias;
    int n, o, i;
};

static void matvec_part(void *arg, int t, int nt)
{
    const struct matvec_job *j = arg;
    int r0 = (int)((int64_t)j->o * t / nt), r1 = (int)((int64_t)j->o * (t + 1) / nt);
    for (int r = r0; r < r1; r++) {
        const float *w = j->W + (size_t)r * j->i;
        float b = j->bias ? j->bias[r] : 0.0f;
        for (int q = 0; q < j->n; q++)
            j->out[(size_t)q * j->o + r] = dot(w, j->x + (size_t)q * j->i, j->i) + b;
    }
}

void se__linear(struct se_pool *pool, float *out, const float *x, int n, const float *W,
                const float *bias, int o, int i)
{
    if (n < GEMM_MIN_ROWS) {
        struct matvec_job j = {out, x, W, bias, n, o, i};
        se__pool_run(pool, matvec_part, &j);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, o, i, 1.0f, x, i, W, i, 0.0f, out, o);
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
