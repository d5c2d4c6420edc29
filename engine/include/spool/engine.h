/*
 * libspool-engine: model loading, tokenizer, sampler, KV cache and the
 * batching step, over interchangeable compute backends. It knows nothing of
 * PostgreSQL or sockets. Public names start with se_; internal non-static
 * ones with se__. Errors are the negative SP_E* codes of spool/error.h.
 */
#ifndef SPOOL_ENGINE_H
#define SPOOL_ENGINE_H

#include <stddef.h>

#include "spool/error.h"

const char *se_version(void);

/*
 * Returns the number of CUDA devices, SP_ENODEV when there is none (err says
 * why, with the CUDA error name), or SP_EUNSUPPORTED when built without CUDA.
 */
int se_cuda_devices(char *err, size_t errcap);

#endif
