/*
 * The CUDA backend (engine/cuda): implements struct se_backend_i on one GPU.
 *
 * Weights live on the device in bf16 (f16 and f32 models are converted while
 * loading); q/k/v and gate/up are each fused into one matrix so that a layer
 * runs four GEMMs. The paged KV cache is bf16, (n_blocks, n_kv_heads,
 * block_size, head_dim) per layer for K and for V, plus one spare block that
 * padding tokens of captured decode graphs write into. forward() runs the
 * whole batch on one stream and synchronises only to read the logits back.
 * Decode-only batches (one token per sequence, every row's logits wanted) of
 * up to 256 tokens run as CUDA graphs captured once per padded batch size
 * (after the first pass of that size has run eagerly);
 * SPOOL_CUDA_GRAPHS=0 in the environment turns graphs off. It implements the
 * optional sample member (sampling on the device, from the logits of the
 * last forward, which may then be called with logits == NULL).
 *
 * A backend is used by one thread at a time (it owns one stream and one
 * cuBLAS handle).
 */
#ifndef SPOOL_ENGINE_CUDA_BACKEND_CUDA_H
#define SPOOL_ENGINE_CUDA_BACKEND_CUDA_H

#include <stddef.h>

#include "../backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Opens CUDA device `device` and fills *out. memory_fraction (in (0, 1]) is
 * the share of the device memory left free after the weights and buffers
 * that kv_blocks_for(ctx, 0, block_size) hands to the KV cache. Returns 0,
 * SP_ENODEV (no GPU, no driver, or no such device; err says which),
 * SP_EINVAL, or another SP_E* code with err filled in. The caller frees the
 * backend with out->i->free(out->ctx).
 */
int se__backend_cuda_new(int device, float memory_fraction, struct se_backend *out, char *err,
                         size_t errcap);

#ifdef __cplusplus
}
#endif

#endif
