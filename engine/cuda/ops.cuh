// The CUDA backend's operations: one launcher per kernel, each defined in its
// own .cu file (get_rows.cu, rms_norm.cu, rope.cu, swiglu.cu, kv_write.cu,
// attn_decode.cu, attn_prefill.cu, sample.cu, gemm.cu).
//
// Conventions: row-major arrays; "(n, d)" is n rows of d elements. The
// residual stream and GEMM outputs are fp32; GEMM inputs, weights and the KV
// cache are bf16. Launchers enqueue on stream s without synchronising and
// return 0 or an SP_E* code with e filled in (launch errors only: a fault
// inside a kernel surfaces at the next synchronisation).
//
// The paged KV cache of one layer is (n_blocks, n_kv_heads, block_size,
// head_dim) bf16 for K and the same for V; token slot = block * block_size +
// offset in block (see backend.h for the block tables).
#ifndef SPOOL_ENGINE_CUDA_OPS_CUH
#define SPOOL_ENGINE_CUDA_OPS_CUH

#include "common.cuh"
#include "host.h"

typedef __nv_bfloat16 se_bf16;

// out(n, d) = table[ids[i]] for each i; ids outside [0, n_rows) give zero rows.
int se__cu_get_rows_bf16_f32(struct se_cuda_err *e, cudaStream_t s, const se_bf16 *table,
                             int n_rows, int d, const int32_t *ids, int n, float *out);
int se__cu_get_rows_bf16_bf16(struct se_cuda_err *e, cudaStream_t s, const se_bf16 *table,
                              int n_rows, int d, const int32_t *ids, int n, se_bf16 *out);
// out(n, d) = src[ids[i]] for fp32 rows (gathers the rows whose logits are wanted).
int se__cu_get_rows_f32(struct se_cuda_err *e, cudaStream_t s, const float *src, int n_rows, int d,
                        const int32_t *ids, int n, float *out);

// x(n, d) += add (when add != NULL), then out = x / sqrt(mean(x^2) + eps) * w.
int se__cu_add_rms_norm(struct se_cuda_err *e, cudaStream_t s, float *x, const float *add,
                        const se_bf16 *w, int n, int d, float eps, se_bf16 *out);

// qkv(n, row_stride): per token, q (n_heads*head_dim) then k (n_kv*head_dim)
// then v (n_kv*head_dim). Adds bias (n_heads+2*n_kv)*head_dim when not NULL,
// then rotates q and k in place (Hugging Face rotate_half: dimension i pairs
// with i + head_dim/2 at angle pos * inv_freq[i], inv_freq (head_dim/2)).
int se__cu_rope(struct se_cuda_err *e, cudaStream_t s, float *qkv, int n, int row_stride,
                int n_heads, int n_kv, int head_dim, const float *bias, const int32_t *pos,
                const float *inv_freq);

// The rope frequency table: se__cu_rope_inv_freq in host.h.

// out(n, inter) = silu(gu[:, :inter]) * gu[:, inter:], gu (n, 2*inter).
int se__cu_swiglu(struct se_cuda_err *e, cudaStream_t s, const float *gu, int n, int inter,
                  se_bf16 *out);

// Writes token i's K (qkv row i at column k_off) and V (column v_off), n_kv
// heads of head_dim each, into slot slots[i] of the layer's caches.
int se__cu_kv_write(struct se_cuda_err *e, cudaStream_t s, const float *qkv, int n, int row_stride,
                    int k_off, int v_off, int n_kv, int head_dim, const int32_t *slots,
                    se_bf16 *k_cache, se_bf16 *v_cache, int block_size);

// Where a token's sequence keeps its keys: tok_seq[t] is the token's sequence,
// tok_pos[t] its position; the sequence's block table starts at
// bt_flat[seq_bt_off[seq]]. The token attends to positions [0, tok_pos[t]].
struct se_cu_attn_meta {
    const int32_t *tok_seq;
    const int32_t *tok_pos;
    const int32_t *seq_bt_off;
    const int32_t *bt_flat;
    const int32_t
        *seq_n_tokens; // with skip_multi: tokens of a sequence with more than one are skipped
    int skip_multi;
};

// Paged attention for single tokens (decode), GQA-aware: one thread block per
// (token, kv head, split) serves all the query heads of that kv head's group.
// q is qkv (n, row_stride) at column 0; out (n, n_heads*head_dim) bf16.
// n_splits > 1 splits the positions (flash-decoding); partial then holds
// n * n_heads * n_splits * (head_dim + 2) floats. head_dim <= 256.
int se__cu_attn_decode(struct se_cuda_err *e, cudaStream_t s, const float *qkv, int row_stride,
                       const se_bf16 *k_cache, const se_bf16 *v_cache,
                       const struct se_cu_attn_meta *m, int n, int n_heads, int n_kv, int head_dim,
                       int block_size, float scale, int n_splits, float *partial, se_bf16 *out);
// How many splits attn_decode should use for n tokens (a function of n and the device only).
int se__cu_attn_decode_splits(int n, int n_kv, int n_sm);

// Causal attention for chunks of prompt tokens over the paged cache: tiles
// (n_tiles, 2) lists (first token, count <= SE_CU_PREFILL_TILE) of
// consecutive tokens of one sequence. Same q/out layout as attn_decode.
#define SE_CU_PREFILL_TILE 16
int se__cu_attn_prefill(struct se_cuda_err *e, cudaStream_t s, const float *qkv, int row_stride,
                        const se_bf16 *k_cache, const se_bf16 *v_cache,
                        const struct se_cu_attn_meta *m, const int32_t *tiles, int n_tiles,
                        int n_heads, int n_kv, int head_dim, int block_size, float scale,
                        se_bf16 *out);

// y(n, m) = x(n, k) @ w(m, k)^T + beta * y; bf16 inputs, fp32 compute; y fp32
// or bf16. The handle must already be bound to the stream.
int se__cu_gemm(struct se_cuda_err *e, cublasHandle_t h, const se_bf16 *x, int n, int k,
                const se_bf16 *w, int m, void *y, int y_is_bf16, float beta);

// Sampling on the device, one row of logits per sequence, exactly as
// spool/sample.h defines it (penalties, temperature, top-k, top-p, min-p, the
// (seed, position) draw; temperature 0 = greedy).
struct se_cu_sample_row {
    float temperature, top_p, min_p;
    float repetition_penalty, presence_penalty, frequency_penalty;
    int top_k;
    int hist_off; // the row's tokens in hist: n_prompt prompt tokens, then n_gen generated
    int n_prompt, n_gen;
    uint64_t seed;
    uint64_t position;
};
struct se_cu_sample_out {
    int32_t token;
    float logprob; // under the final (filtered, renormalised) distribution; greedy: log_softmax
    float logit;   // the chosen token's logit after penalties, before temperature
    float pad_;
};
// logits (n_rows, vocab) fp32 are not modified; work is 2 * n_rows * vocab
// floats of scratch; counts n_rows * vocab ints that must be zero on entry
// (they are zero again on return).
int se__cu_sample(struct se_cuda_err *e, cudaStream_t s, const float *logits, int n_rows, int vocab,
                  const struct se_cu_sample_row *rows, const int32_t *hist, float *work,
                  int32_t *counts, struct se_cu_sample_out *out);

#endif
