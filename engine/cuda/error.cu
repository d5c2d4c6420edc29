// Turns CUDA runtime and cuBLAS failures into SP_E* codes with a message that
// names the error, the call and where it was made.
#include "common.cuh"

#include <stdarg.h>
#include <stdio.h>

static const char *base_name(const char *path)
{
    const char *b = path;
    for (const char *p = path; *p; p++)
        if (*p == '/')
            b = p + 1;
    return b;
}

int se__cuda_fail(struct se_cuda_err *e, cudaError_t rc, const char *call, const char *file,
                  int line)
{
    int code = SP_EBACKEND;
    if (rc == cudaErrorMemoryAllocation)
        code = SP_ENOMEM;
    else if (rc == cudaErrorNoDevice || rc == cudaErrorInsufficientDriver ||
             rc == cudaErrorInvalidDevice || rc == cudaErrorDevicesUnavailable)
        code = SP_ENODEV;
    if (e) {
        e->code = code;
        snprintf(e->msg, sizeof e->msg, "CUDA error %s (%s) in %s at %s:%d", cudaGetErrorName(rc),
                 cudaGetErrorString(rc), call, base_name(file), line);
    }
    return code;
}

int se__cublas_fail(struct se_cuda_err *e, cublasStatus_t rc, const char *call, const char *file,
                    int line)
{
    int code = rc == CUBLAS_STATUS_ALLOC_FAILED ? SP_ENOMEM : SP_EBACKEND;
    if (e) {
        e->code = code;
        snprintf(e->msg, sizeof e->msg, "cuBLAS error %s (%s) in %s at %s:%d",
                 cublasGetStatusName(rc), cublasGetStatusString(rc), call, base_name(file), line);
    }
    return code;
}

int se__cuda_failf(struct se_cuda_err *e, int code, const char *fmt, ...)
{
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
        e->code = code;
    }
    return code;
}
