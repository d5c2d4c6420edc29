// Shared definitions for the CUDA backend's kernels and host code.
//
// Every CUDA runtime and cuBLAS call goes through SE_CU_CHECK, which turns a
// failure into an SP_E* code (SP_ENOMEM for out-of-memory, SP_ENODEV when
// there is no usable device or driver, SP_EBACKEND otherwise), records a
// message naming the CUDA error and the call site in a struct se_cuda_err, and
// returns that code from the enclosing function. Launchers (the host
// functions in ops.cuh) check the launch with SE_CU_CHECK_LAUNCH.
#ifndef SPOOL_ENGINE_CUDA_COMMON_CUH
#define SPOOL_ENGINE_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

#include "spool/error.h"

// The last failure of a backend or of a test; msg is never empty after one.
struct se_cuda_err {
    int code;
    char msg[512];
};

// Records a CUDA runtime failure; returns the SP_E* code it maps to.
int se__cuda_fail(struct se_cuda_err *e, cudaError_t rc, const char *call, const char *file,
                  int line);
// Records a cuBLAS failure; returns the SP_E* code it maps to.
int se__cublas_fail(struct se_cuda_err *e, cublasStatus_t rc, const char *call, const char *file,
                    int line);
// Records a failure of our own (code is an SP_E* code, msg printf-style); returns code.
int se__cuda_failf(struct se_cuda_err *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static inline int se__cuda_check(struct se_cuda_err *e, cudaError_t rc, const char *call,
                                 const char *file, int line)
{
    return rc == cudaSuccess ? 0 : se__cuda_fail(e, rc, call, file, line);
}
static inline int se__cuda_check(struct se_cuda_err *e, cublasStatus_t rc, const char *call,
                                 const char *file, int line)
{
    return rc == CUBLAS_STATUS_SUCCESS ? 0 : se__cublas_fail(e, rc, call, file, line);
}

// Checks a CUDA runtime or cuBLAS call; on failure records it in *(err) and
// returns the SP_E* code from the enclosing function.
#define SE_CU_CHECK(err, call)                                                                     \
    do {                                                                                           \
        int se_rc_ = se__cuda_check((err), (call), #call, __FILE__, __LINE__);                     \
        if (se_rc_ != 0)                                                                           \
            return se_rc_;                                                                         \
    } while (0)

// Checks the launch just made (configuration errors; not the kernel's completion).
#define SE_CU_CHECK_LAUNCH(err, name)                                                              \
    do {                                                                                           \
        int se_rc_ = se__cuda_check((err), cudaGetLastError(), name, __FILE__, __LINE__);          \
        if (se_rc_ != 0)                                                                           \
            return se_rc_;                                                                         \
    } while (0)

// Warp and block reductions over blockDim.x threads (a multiple of 32, at most 1024).
static __device__ __forceinline__ float se_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
static __device__ __forceinline__ float se_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sums v over the block, in a fixed order (deterministic). scratch holds 32
// floats; every thread of the block must call it; all receive the sum.
static __device__ __forceinline__ float se_block_sum(float v, float *scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = se_warp_sum(v);
    __syncthreads();
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return se_warp_sum(v);
}
static __device__ __forceinline__ float se_block_max(float v, float *scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = se_warp_max(v);
    __syncthreads();
    if (lane == 0)
        scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;
    return se_warp_max(v);
}

static __device__ __forceinline__ float se_to_float(float x)
{
    return x;
}
static __device__ __forceinline__ float se_to_float(__nv_bfloat16 x)
{
    return __bfloat162float(x);
}
template <typename T> static __device__ __forceinline__ T se_from_float(float x);
template <> __device__ __forceinline__ float se_from_float<float>(float x)
{
    return x;
}
template <> __device__ __forceinline__ __nv_bfloat16 se_from_float<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

static inline unsigned se_cdiv(size_t a, size_t b)
{
    return (unsigned)((a + b - 1) / b);
}

#endif
