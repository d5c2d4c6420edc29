// Matrix products through cuBLAS: bf16 inputs, fp32 compute and accumulation.
//
// y(n, m) = x(n, k) @ w(m, k)^T. In cuBLAS's column-major terms, w is a
// (k, m) matrix used transposed, x a (k, n) matrix, and y an (m, n) matrix.
#include "ops.cuh"

int se__cu_gemm(struct se_cuda_err *e, cublasHandle_t h, const se_bf16 *x, int n, int k,
                const se_bf16 *w, int m, void *y, int y_is_bf16, float beta)
{
    if (n <= 0)
        return 0;
    const float alpha = 1.0f;
    SE_CU_CHECK(e, cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &alpha, w, CUDA_R_16BF, k, x,
                                CUDA_R_16BF, k, &beta, y, y_is_bf16 ? CUDA_R_16BF : CUDA_R_32F, m,
                                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return 0;
}
