// Rotary position embedding on q and k (with the optional q/k/v bias added
// first), in place on the fp32 output of the fused QKV projection.
#include "host.h"
#include "ops.cuh"

#include <math.h>

__global__ void rope_kernel(float *__restrict__ qkv, int row_stride, int n_heads, int n_kv,
                            int head_dim, const float *__restrict__ bias,
                            const int32_t *__restrict__ pos, const float *__restrict__ inv_freq)
{
    float *row = qkv + (size_t)blockIdx.x * row_stride;
    const int half = head_dim / 2;
    const float p = (float)pos[blockIdx.x];
    const int n_rot = (n_heads + n_kv) * half; // rotated pairs (q and k heads)
    for (int j = threadIdx.x; j < n_rot; j += blockDim.x) {
        const int h = j / half, i = j % half;
        const int a = h * head_dim + i, b = a + half;
        float x1 = row[a], x2 = row[b];
        if (bias) {
            x1 += bias[a];
            x2 += bias[b];
        }
        // As Hugging Face: the angle is computed in fp32 as pos * inv_freq.
        float sn, cs;
        sincosf(p * inv_freq[i], &sn, &cs);
        row[a] = x1 * cs - x2 * sn;
        row[b] = x2 * cs + x1 * sn;
    }
    if (bias) {
        const int v0 = (n_heads + n_kv) * head_dim, nv = n_kv * head_dim;
        for (int j = threadIdx.x; j < nv; j += blockDim.x)
            row[v0 + j] += bias[v0 + j];
    }
}

int se__cu_rope(struct se_cuda_err *e, cudaStream_t s, float *qkv, int n, int row_stride,
                int n_heads, int n_kv, int head_dim, const float *bias, const int32_t *pos,
                const float *inv_freq)
{
    if (n <= 0)
        return 0;
    rope_kernel<<<n, 256, 0, s>>>(qkv, row_stride, n_heads, n_kv, head_dim, bias, pos, inv_freq);
    SE_CU_CHECK_LAUNCH(e, "rope_kernel");
    return 0;
}

extern "C" void se__cu_rope_inv_freq(const struct se_model_config *cfg, float *out)
{
    const int hd = cfg->head_dim;
    for (int i = 0; i < hd / 2; i++) {
        double f = 1.0 / pow((double)cfg->rope_theta, (double)(2 * i) / hd);
        if (cfg->rope_llama3) {
            // As transformers' _compute_llama3_parameters: low frequencies (long
            // wavelengths) divided by factor, high ones kept, a smooth blend between.
            const double old = cfg->rope_original_max_position;
            const double lo_wl = old / cfg->rope_low_freq_factor;
            const double hi_wl = old / cfg->rope_high_freq_factor;
            const double wl = 2.0 * 3.14159265358979323846 / f;
            if (wl > lo_wl) {
                f = f / cfg->rope_factor;
            } else if (wl >= hi_wl) {
                const double sm = (old / wl - cfg->rope_low_freq_factor) /
                                  (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
                f = (1.0 - sm) * f / cfg->rope_factor + sm * f;
            }
        }
        out[i] = (float)f;
    }
}
