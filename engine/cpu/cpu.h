/*
 * The CPU backend: fp32 arithmetic over weights converted to fp32 once at
 * load, OpenBLAS sgemm for products over many tokens, a threaded
 * matrix-vector kernel for few tokens (decode), and the pool of pool.h for
 * everything else. All scratch memory is sized at kv_alloc for max_tokens
 * tokens per forward pass; forward never allocates.
 */
#ifndef SPOOL_ENGINE_CPU_H
#define SPOOL_ENGINE_CPU_H

#include "../backend.h"

struct se_cpu_opts {
    int n_threads;  /* 0 = all online cores */
    int max_tokens; /* most tokens in one forward pass; 0 = 512 */
};

/*
 * Creates a CPU backend in *out (free with out->i->free(out->ctx)). opts may
 * be NULL for the defaults. Returns 0 or SP_ENOMEM.
 */
int se__backend_cpu_new(const struct se_cpu_opts *opts, struct se_backend *out);

#endif
