// Row gather: the token embedding lookup (bf16 table to fp32 or bf16
// activations) and the gather of the fp32 rows whose logits are wanted.
#include "ops.cuh"

template <typename Src, typename Dst>
__global__ void get_rows_kernel(const Src *__restrict__ table, int n_rows, int d,
                                const int32_t *__restrict__ ids, Dst *__restrict__ out)
{
    const int i = blockIdx.x;
    const int id = ids[i];
    const bool ok = id >= 0 && id < n_rows;
    const Src *src = table + (size_t)(ok ? id : 0) * d;
    Dst *dst = out + (size_t)i * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x)
        dst[j] = se_from_float<Dst>(ok ? se_to_float(src[j]) : 0.0f);
}

template <typename Src, typename Dst>
static int launch(struct se_cuda_err *e, cudaStream_t s, const Src *table, int n_rows, int d,
                  const int32_t *ids, int n, Dst *out)
{
    if (n <= 0)
        return 0;
    get_rows_kernel<Src, Dst><<<n, 256, 0, s>>>(table, n_rows, d, ids, out);
    SE_CU_CHECK_LAUNCH(e, "get_rows_kernel");
    return 0;
}

int se__cu_get_rows_bf16_f32(struct se_cuda_err *e, cudaStream_t s, const se_bf16 *table,
                             int n_rows, int d, const int32_t *ids, int n, float *out)
{
    return launch(e, s, table, n_rows, d, ids, n, out);
}

int se__cu_get_rows_bf16_bf16(struct se_cuda_err *e, cudaStream_t s, const se_bf16 *table,
                              int n_rows, int d, const int32_t *ids, int n, se_bf16 *out)
{
    return launch(e, s, table, n_rows, d, ids, n, out);
}

int se__cu_get_rows_f32(struct se_cuda_err *e, cudaStream_t s, const float *src, int n_rows, int d,
                        const int32_t *ids, int n, float *out)
{
    return launch(e, s, src, n_rows, d, ids, n, out);
}
