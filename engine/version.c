#include "spool/engine.h"

#include "spool_config.h"

#include <stdio.h>

#if SPOOL_HAVE_CUDA
int se__cuda_device_count(char *err, size_t errcap);
int se__cuda_device_name(int dev, char *buf, size_t cap);
#endif

const char *se_version(void)
{
    return SPOOL_VERSION;
}

int se_cuda_devices(char *err, size_t errcap)
{
#if SPOOL_HAVE_CUDA
    int n = se__cuda_device_count(err, errcap);
    return n < 0 ? SP_ENODEV : n;
#else
    snprintf(err, errcap,
             "this build of spool has no CUDA backend (nvcc was not found at build time)");
    return SP_EUNSUPPORTED;
#endif
}
