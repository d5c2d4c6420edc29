// Paged attention for decode: each token attends to positions [0, pos] of its
// own sequence through the sequence's block table.
//
// One thread block per (token, kv head, head group, split). The block serves
// up to SE_GB query heads that share the kv head (grouped-query attention), so
// each key and value is read once for the whole group. Its 4 warps take keys
// in turn; a lane holds DPL consecutive dimensions of q, k, v and of the
// accumulator. The softmax is online (running max and sum), merged across the
// warps at the end. With n_splits > 1 the positions are split across blocks
// (flash-decoding) and attn_decode_combine_kernel merges the splits; the
// number of splits depends only on the batch size, so a captured CUDA graph
// stays valid as contexts grow.
#include "ops.cuh"

#define SE_GB    8 // query heads per block
#define SE_WARPS 4

template <int DPL>
__global__ void __launch_bounds__(SE_WARPS * 32)
    attn_decode_kernel(const float *__restrict__ qkv, int row_stride,
                       const se_bf16 *__restrict__ kc, const se_bf16 *__restrict__ vc,
                       se_cu_attn_meta m, int n_heads, int n_kv, int hd, int bs, float scale,
                       int n_splits, int n_hgroups, float *__restrict__ partial,
                       se_bf16 *__restrict__ out)
{
    __shared__ float sm_m[SE_WARPS][SE_GB], sm_l[SE_WARPS][SE_GB];
    __shared__ float sm_acc[SE_WARPS][SE_GB][DPL * 32];

    const int t = blockIdx.x;
    const int kvh = blockIdx.y / n_hgroups, hg = blockIdx.y % n_hgroups;
    const int split = blockIdx.z;
    const int seq = m.tok_seq[t];
    if (m.skip_multi && m.seq_n_tokens[seq] > 1)
        return;
    const int group = n_heads / n_kv;
    const int h0 = kvh * group + hg * SE_GB;
    const int gcount = min(SE_GB, group - hg * SE_GB);
    const int L = m.tok_pos[t] + 1;
    const int chunk = (L + n_splits - 1) / n_splits;
    const int j0 = split * chunk, j1 = min(L, j0 + chunk);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int32_t *bt = m.bt_flat + m.seq_bt_off[seq];

    float q[SE_GB][DPL], acc[SE_GB][DPL], mx[SE_GB], l[SE_GB];
#pragma unroll
    for (int g = 0; g < SE_GB; g++) {
        mx[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane * DPL + i;
            acc[g][i] = 0.0f;
            q[g][i] = (g < gcount && d < hd)
                          ? qkv[(size_t)t * row_stride + (size_t)(h0 + g) * hd + d] * scale
                          : 0.0f;
        }
    }

    for (int j = j0 + warp; j < j1; j += SE_WARPS) {
        const size_t base = (((size_t)bt[j / bs] * n_kv + kvh) * bs + j % bs) * hd;
        float kf[DPL], vf[DPL];
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane * DPL + i;
            kf[i] = d < hd ? __bfloat162float(kc[base + d]) : 0.0f;
            vf[i] = d < hd ? __bfloat162float(vc[base + d]) : 0.0f;
        }
#pragma unroll
        for (int g = 0; g < SE_GB; g++) {
            if (g >= gcount)
                break;
            float sc = 0.0f;
#pragma unroll
            for (int i = 0; i < DPL; i++)
                sc += q[g][i] * kf[i];
            sc = se_warp_sum(sc);
            const float mn = fmaxf(mx[g], sc);
            const float corr = expf(mx[g] - mn), p = expf(sc - mn);
            l[g] = l[g] * corr + p;
#pragma unroll
            for (int i = 0; i < DPL; i++)
                acc[g][i] = acc[g][i] * corr + p * vf[i];
            mx[g] = mn;
        }
    }

#pragma unroll
    for (int g = 0; g < SE_GB; g++) {
        if (lane == 0) {
            sm_m[warp][g] = mx[g];
            sm_l[warp][g] = l[g];
        }
#pragma unroll
        for (int i = 0; i < DPL; i++)
            sm_acc[warp][g][lane * DPL + i] = acc[g][i];
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < gcount * hd; idx += blockDim.x) {
        const int g = idx / hd, d = idx % hd;
        float M = -INFINITY;
        for (int w = 0; w < SE_WARPS; w++)
            M = fmaxf(M, sm_m[w][g]);
        float lsum = 0.0f, a = 0.0f;
        for (int w = 0; w < SE_WARPS; w++) {
            const float f = sm_m[w][g] == -INFINITY ? 0.0f : expf(sm_m[w][g] - M);
            lsum += f * sm_l[w][g];
            a += f * sm_acc[w][g][d];
        }
        const int h = h0 + g;
        if (n_splits == 1) {
            out[(size_t)t * n_heads * hd + (size_t)h * hd + d] =
                __float2bfloat16_rn(lsum > 0.0f ? a / lsum : 0.0f);
        } else {
            float *pp = partial + (((size_t)t * n_heads + h) * n_splits + split) * (hd + 2);
            if (d == 0) {
                pp[0] = M;
                pp[1] = lsum;
            }
            pp[2 + d] = a;
        }
    }
}

__global__ void attn_decode_combine_kernel(const float *__restrict__ partial, se_cu_attn_meta m,
                                           int n_heads, int hd, int n_splits,
                                           se_bf16 *__restrict__ out)
{
    const int t = blockIdx.x, h = blockIdx.y;
    if (m.skip_multi && m.seq_n_tokens[m.tok_seq[t]] > 1)
        return;
    const float *pp = partial + ((size_t)t * n_heads + h) * n_splits * (hd + 2);
    float M = -INFINITY;
    for (int s = 0; s < n_splits; s++)
        M = fmaxf(M, pp[s * (hd + 2)]);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float lsum = 0.0f, a = 0.0f;
        for (int s = 0; s < n_splits; s++) {
            const float ms = pp[s * (hd + 2)];
            const float f = ms == -INFINITY ? 0.0f : expf(ms - M);
            lsum += f * pp[s * (hd + 2) + 1];
            a += f * pp[s * (hd + 2) + 2 + d];
        }
        out[(size_t)t * n_heads * hd + (size_t)h * hd + d] =
            __float2bfloat16_rn(lsum > 0.0f ? a / lsum : 0.0f);
    }
}

int se__cu_attn_decode_splits(int n, int n_kv, int n_sm)
{
    const int blocks = n * n_kv;
    int splits = blocks > 0 ? (2 * n_sm + blocks - 1) / blocks : 1;
    return splits < 1 ? 1 : (splits > 32 ? 32 : splits);
}

int se__cu_attn_decode(struct se_cuda_err *e, cudaStream_t s, const float *qkv, int row_stride,
                       const se_bf16 *k_cache, const se_bf16 *v_cache,
                       const struct se_cu_attn_meta *m, int n, int n_heads, int n_kv, int head_dim,
                       int block_size, float scale, int n_splits, float *partial, se_bf16 *out)
{
    if (n <= 0)
        return 0;
    if (head_dim > 256 || head_dim <= 0 || n_kv <= 0 || n_heads % n_kv != 0)
        return se__cuda_failf(e, SP_EUNSUPPORTED,
                              "attention: head_dim %d, %d heads over %d kv heads is not supported "
                              "(head_dim <= 256, heads a multiple of kv heads)",
                              head_dim, n_heads, n_kv);
    if (n_splits < 1)
        n_splits = 1;
    const int group = n_heads / n_kv;
    const int n_hgroups = (group + SE_GB - 1) / SE_GB;
    const dim3 grid(n, n_kv * n_hgroups, n_splits);
    const int dpl = head_dim <= 32 ? 1 : head_dim <= 64 ? 2 : head_dim <= 128 ? 4 : 8;
#define LAUNCH(D)                                                                                  \
    attn_decode_kernel<D><<<grid, SE_WARPS * 32, 0, s>>>(qkv, row_stride, k_cache, v_cache, *m,    \
                                                         n_heads, n_kv, head_dim, block_size,      \
                                                         scale, n_splits, n_hgroups, partial, out)
    switch (dpl) {
    case 1:
        LAUNCH(1);
        break;
    case 2:
        LAUNCH(2);
        break;
    case 4:
        LAUNCH(4);
        break;
    default:
        LAUNCH(8);
        break;
    }
#undef LAUNCH
    SE_CU_CHECK_LAUNCH(e, "attn_decode_kernel");
    if (n_splits > 1) {
        attn_decode_combine_kernel<<<dim3(n, n_heads), 128, 0, s>>>(partial, *m, n_heads, head_dim,
                                                                    n_splits, out);
        SE_CU_CHECK_LAUNCH(e, "attn_decode_combine_kernel");
    }
    return 0;
}
