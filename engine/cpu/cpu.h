/*
 * The CPU backend: fp32 arithmetic; OpenBLAS sgemm for products over many
 * tokens, on fp32 copies of 16-bit weights made once at load when they fit
 * the budget (SPOOL_CPU_F32_BYTES, default a quarter of physical memory); a
 * threaded matrix-vector kernel reading the weights in their storage dtype
 * for few tokens (decode); and the pool of pool.h for everything else. All scratch memory is sized
 * at kv_alloc for max_tokens tokens per forward pass; forward never allocates.
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
