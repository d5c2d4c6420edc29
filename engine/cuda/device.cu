// Device discovery for the CUDA backend. Without a GPU (or without a driver),
// cudaGetDeviceCount fails and leaves its output untouched, so the code checks
// the return value and reports "no device" as an error of its own.
#include <cuda_runtime.h>

#include <stdio.h>

extern "C" int se__cuda_device_count(char *err, size_t errcap)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        snprintf(err, errcap, "no usable CUDA device: %s (%s)", cudaGetErrorName(e),
                 cudaGetErrorString(e));
        return -1;
    }
    return n;
}

extern "C" int se__cuda_device_name(int dev, char *buf, size_t cap)
{
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, dev);
    if (e != cudaSuccess)
        return -1;
    snprintf(buf, cap, "%s (sm_%d%d, %.1f GiB)", p.name, p.major, p.minor,
             (double)p.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return 0;
}
