// KV cache write: scatters each new token's K and V (fp32, from the QKV
// projection after rope) into its slot of the paged bf16 cache.
#include "ops.cuh"

__global__ void kv_write_kernel(const float *__restrict__ qkv, int row_stride, int k_off, int v_off,
                                int n_kv, int head_dim, const int32_t *__restrict__ slots,
                                se_bf16 *__restrict__ kc, se_bf16 *__restrict__ vc, int block_size)
{
    const float *row = qkv + (size_t)blockIdx.x * row_stride;
    const int slot = slots[blockIdx.x];
    if (slot < 0)
        return;
    const size_t blk = slot / block_size, off = slot % block_size;
    const int n = n_kv * head_dim;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const int h = j / head_dim, d = j % head_dim;
        const size_t at = ((blk * n_kv + h) * block_size + off) * head_dim + d;
        kc[at] = __float2bfloat16_rn(row[k_off + j]);
        vc[at] = __float2bfloat16_rn(row[v_off + j]);
    }
}

int se__cu_kv_write(struct se_cuda_err *e, cudaStream_t s, const float *qkv, int n, int row_stride,
                    int k_off, int v_off, int n_kv, int head_dim, const int32_t *slots,
                    se_bf16 *k_cache, se_bf16 *v_cache, int block_size)
{
    if (n <= 0)
        return 0;
    kv_write_kernel<<<n, 256, 0, s>>>(qkv, row_stride, k_off, v_off, n_kv, head_dim, slots, k_cache,
                                      v_cache, block_size);
    SE_CU_CHECK_LAUNCH(e, "kv_write_kernel");
    return 0;
}
