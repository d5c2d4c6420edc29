// Causal attention for chunked prefill over the paged cache.
//
// One thread block per (tile of up to SE_CU_PREFILL_TILE consecutive tokens of
// one sequence, query head). The tile's queries sit in shared memory; keys
// and values come through shared memory SE_KT positions at a time, fetched
// through the sequence's block table. Each of the 4 warps owns 4 query rows;
// lane j scores key j of the tile, and a lane accumulates dimensions lane +
// 32 i of the output. Query token r attends to positions [0, pos_r], which
// covers both the cached prefix and the earlier tokens of this chunk (their
// K and V were written into the cache before this kernel runs).
#include "ops.cuh"

#define SE_KT   32
#define SE_QT   SE_CU_PREFILL_TILE
#define SE_PW   4 // warps
#define SE_ROWS (SE_QT / SE_PW)

template <int DPL>
__global__ void __launch_bounds__(SE_PW * 32)
    attn_prefill_kernel(const float *__restrict__ qkv, int row_stride,
                        const se_bf16 *__restrict__ kc, const se_bf16 *__restrict__ vc,
                        se_cu_attn_meta m, const int32_t *__restrict__ tiles, int n_heads, int n_kv,
                        int hd, int bs, float scale, se_bf16 *__restrict__ out)
{
    extern __shared__ float smem[];
    float *q_s = smem;                   // (SE_QT, hd)
    float *k_s = q_s + SE_QT * hd;       // (SE_KT, hd + 1): padded against bank conflicts
    float *v_s = k_s + SE_KT * (hd + 1); // (SE_KT, hd)

    const int t0 = tiles[2 * blockIdx.x], cnt = tiles[2 * blockIdx.x + 1];
    const int h = blockIdx.y, kvh = h / (n_heads / n_kv);
    const int seq = m.tok_seq[t0];
    const int32_t *bt = m.bt_flat + m.seq_bt_off[seq];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    for (int idx = threadIdx.x; idx < SE_QT * hd; idx += blockDim.x) {
        const int r = idx / hd, d = idx % hd;
        q_s[idx] = r < cnt ? qkv[(size_t)(t0 + r) * row_stride + (size_t)h * hd + d] * scale : 0.0f;
    }
    int qpos[SE_ROWS];
    float mx[SE_ROWS], l[SE_ROWS], acc[SE_ROWS][DPL];
#pragma unroll
    for (int rr = 0; rr < SE_ROWS; rr++) {
        const int r = warp * SE_ROWS + rr;
        qpos[rr] = r < cnt ? m.tok_pos[t0 + r] : -1;
        mx[rr] = -INFINITY;
        l[rr] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++)
            acc[rr][i] = 0.0f;
    }
    const int kend = m.tok_pos[t0 + cnt - 1] + 1;

    for (int k0 = 0; k0 < kend; k0 += SE_KT) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < SE_KT * hd; idx += blockDim.x) {
            const int j = idx / hd, d = idx % hd, kp = k0 + j;
            float kv = 0.0f, vv = 0.0f;
            if (kp < kend) {
                const size_t at = (((size_t)bt[kp / bs] * n_kv + kvh) * bs + kp % bs) * hd + d;
                kv = __bfloat162float(kc[at]);
                vv = __bfloat162float(vc[at]);
            }
            k_s[j * (hd + 1) + d] = kv;
            v_s[j * hd + d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < SE_ROWS; rr++) {
            if (qpos[rr] < k0) // row absent, or every key of this tile is in its future
                continue;
            const float *qr = q_s + (warp * SE_ROWS + rr) * hd;
            const bool valid = k0 + lane <= qpos[rr];
            float sc = -INFINITY;
            if (valid) {
                sc = 0.0f;
                const float *kr = k_s + lane * (hd + 1);
                for (int d = 0; d < hd; d++)
                    sc += qr[d] * kr[d];
            }
            const float mn = fmaxf(mx[rr], se_warp_max(sc));
            const float corr = expf(mx[rr] - mn);
            const float p = valid ? expf(sc - mn) : 0.0f;
            l[rr] = l[rr] * corr + se_warp_sum(p);
#pragma unroll
            for (int i = 0; i < DPL; i++)
                acc[rr][i] *= corr;
            for (int j = 0; j < SE_KT; j++) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
#pragma unroll
                for (int i = 0; i < DPL; i++) {
                    const int d = lane + 32 * i;
                    if (d < hd)
                        acc[rr][i] += pj * v_s[j * hd + d];
                }
            }
            mx[rr] = mn;
        }
    }

#pragma unroll
    for (int rr = 0; rr < SE_ROWS; rr++) {
        const int r = warp * SE_ROWS + rr;
        if (r >= cnt)
            continue;
#pragma unroll
        for (int i = 0; i < DPL; i++) {
            const int d = lane + 32 * i;
            if (d < hd)
                out[(size_t)(t0 + r) * n_heads * hd + (size_t)h * hd + d] =
                    __float2bfloat16_rn(l[rr] > 0.0f ? acc[rr][i] / l[rr] : 0.0f);
        }
    }
}

int se__cu_attn_prefill(struct se_cuda_err *e, cudaStream_t s, const float *qkv, int row_stride,
                        const se_bf16 *k_cache, const se_bf16 *v_cache,
                        const struct se_cu_attn_meta *m, const int32_t *tiles, int n_tiles,
                        int n_heads, int n_kv, int head_dim, int block_size, float scale,
                        se_bf16 *out)
{
    if (n_tiles <= 0)
        return 0;
    if (head_dim > 256 || head_dim <= 0 || n_kv <= 0 || n_heads % n_kv != 0)
        return se__cuda_failf(e, SP_EUNSUPPORTED,
                              "attention: head_dim %d, %d heads over %d kv heads is not supported "
                              "(head_dim <= 256, heads a multiple of kv heads)",
                              head_dim, n_heads, n_kv);
    const size_t smem = sizeof(float) * ((size_t)SE_QT * head_dim + (size_t)SE_KT * (head_dim + 1) +
                                         (size_t)SE_KT * head_dim);
    const dim3 grid(n_tiles, n_heads);
    const int dpl = (head_dim + 31) / 32;
#define LAUNCH(D)                                                                                  \
    do {                                                                                           \
        if (smem > 48 * 1024)                                                                      \
            SE_CU_CHECK(e, cudaFuncSetAttribute(attn_prefill_kernel<D>,                            \
                                                cudaFuncAttributeMaxDynamicSharedMemorySize,       \
                                                (int)smem));                                       \
        attn_prefill_kernel<D><<<grid, SE_PW * 32, smem, s>>>(qkv, row_stride, k_cache, v_cache,   \
                                                              *m, tiles, n_heads, n_kv, head_dim,  \
                                                              block_size, scale, out);             \
    } while (0)
    if (dpl <= 1)
        LAUNCH(1);
    else if (dpl <= 2)
        LAUNCH(2);
    else if (dpl <= 4)
        LAUNCH(4);
    else
        LAUNCH(8);
#undef LAUNCH
    SE_CU_CHECK_LAUNCH(e, "attn_prefill_kernel");
    return 0;
}
