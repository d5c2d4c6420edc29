// SwiGLU: silu(gate) * up, from the fused gate/up projection to the bf16 input of w_down.
#include "ops.cuh"

__global__ void swiglu_kernel(const float *__restrict__ gu, int inter, size_t total,
                              se_bf16 *__restrict__ out)
{
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total;
         k += (size_t)gridDim.x * blockDim.x) {
        const size_t r = k / inter, c = k % inter;
        const float g = gu[r * 2 * inter + c], u = gu[r * 2 * inter + inter + c];
        out[k] = __float2bfloat16_rn(g / (1.0f + expf(-g)) * u);
    }
}

int se__cu_swiglu(struct se_cuda_err *e, cudaStream_t s, const float *gu, int n, int inter,
                  se_bf16 *out)
{
    if (n <= 0)
        return 0;
    const size_t total = (size_t)n * inter;
    unsigned blocks = se_cdiv(total, 256);
    if (blocks > 65535u * 4)
        blocks = 65535u * 4;
    swiglu_kernel<<<blocks, 256, 0, s>>>(gu, inter, total, out);
    SE_CU_CHECK_LAUNCH(e, "swiglu_kernel");
    return 0;
}
