/*
 * The compute backend interface (internal to the engine), in the manner of
 * ggml's ggml_backend_i: a struct of function pointers with a context pointer.
 * The CPU backend (engine/cpu) and the CUDA backend (engine/cuda) implement
 * it; members marked optional may be NULL.
 *
 * The KV cache is paged: n_blocks blocks of block_size token slots, shared by
 * all sequences, each sequence owning the blocks listed in its block table.
 * Token t of a sequence lives in block block_table[t / block_size], slot
 * t % block_size. The batching layer (engine/batch) owns the allocation of
 * blocks; backends only read and write the slots they are told to.
 */
#ifndef SPOOL_ENGINE_BACKEND_H
#define SPOOL_ENGINE_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "spool/model.h"

struct se_sampling;
struct se_sample_result;

/* A tensor as stored in a safetensors file (row-major; shape[0] is the outermost). */
struct se_tensor {
    const char *name;
    enum se_dtype dtype;
    int n_dims;
    int64_t shape[4];
    const void *data; /* host memory (the mmap); never NULL for a loaded tensor */
    size_t nbytes;
};

/*
 * Per-layer weights, in Hugging Face's layout: a linear layer's weight is
 * (out_features, in_features). Biases are NULL unless config.qkv_bias.
 */
struct se_layer_weights {
    const struct se_tensor *attn_norm;     /* (hidden) */
    const struct se_tensor *wq, *wk, *wv;  /* (n_heads*head_dim | n_kv_heads*head_dim, hidden) */
    const struct se_tensor *bq, *bk, *bv;  /* (out) or NULL */
    const struct se_tensor *wo;            /* (hidden, n_heads*head_dim) */
    const struct se_tensor *ffn_norm;      /* (hidden) */
    const struct se_tensor *w_gate, *w_up; /* (intermediate, hidden) */
    const struct se_tensor *w_down;        /* (hidden, intermediate) */
};

struct se_weights {
    const struct se_tensor *embed;      /* (vocab, hidden) */
    const struct se_tensor *final_norm; /* (hidden) */
    const struct se_tensor *lm_head;    /* (vocab, hidden); == embed when tied */
    int n_layers;
    const struct se_layer_weights *layers;
};

/*
 * One forward pass over a flattened batch of tokens from several sequences.
 * A sequence's tokens are contiguous in the batch and in position order; a
 * sequence may contribute one token (decode) or a chunk of its prompt
 * (chunked prefill). The K and V of every token are written into the cache at
 * its position before attention, and attention covers positions
 * [0, position] of its own sequence.
 */
struct se_batch {
    int n_tokens;
    const int32_t *tokens;    /* (n_tokens) */
    const int32_t *positions; /* (n_tokens) position of each token in its sequence */
    int n_seqs;
    const int32_t *seq_start;    /* (n_seqs) index of the sequence's first token here */
    const int32_t *seq_n_tokens; /* (n_seqs) its tokens in this batch */
    const int32_t *seq_ctx_len;  /* (n_seqs) tokens cached after this pass (last position + 1) */
    const int32_t *const *block_tables; /* (n_seqs) -> (ceil(seq_ctx_len / block_size)) block ids */
    int n_logits;
    const int32_t *logit_rows; /* (n_logits) batch indices whose logits are wanted, ascending */
};

struct se_backend_i {
    const char *name;
    /* Prepares the weights (converting or uploading them); called once. */
    int (*load)(void *ctx, const struct se_model_config *cfg, const struct se_weights *w);
    /* Optional: how many KV blocks of block_size tokens fit in bytes (0 = backend's own budget). */
    int (*kv_blocks_for)(void *ctx, size_t bytes, int block_size);
    /* Allocates the paged KV cache for all layers; called once after load. */
    int (*kv_alloc)(void *ctx, int n_blocks, int block_size);
    /*
     * Runs the model over b. Writes n_logits rows of vocab_size fp32 logits
     * into logits (host memory, (n_logits, vocab_size)).
     */
    int (*forward)(void *ctx, const struct se_batch *b, float *logits);
    /* Optional: copies KV block src to dst in every layer (copy-on-write of a shared prefix block).
     */
    int (*kv_copy)(void *ctx, int dst, int src);
    /* The message of the last failure (never NULL). */
    const char *(*last_error)(void *ctx);
    void (*free)(void *ctx);
    /*
     * Optional (added last, so that initialisers written before it stay
     * valid): samples one token for each of the n_logits rows of the last
     * successful forward, on the device, as spool/sample.h defines it (the
     * same token as se_sample on those logits, up to the order of
     * floating-point sums). Row i uses s[i] and its sequence so far
     * (prompt[i], n_prompt[i], generated[i], n_generated[i]) for the
     * penalties; its position is n_prompt[i] + n_generated[i]. Fills
     * out[i].token and out[i].logprob; out[i].n_top = 0 (no alternatives).
     * A backend with sample also accepts logits == NULL in forward, leaving
     * the logits on the device.
     */
    int (*sample)(void *ctx, int n_rows, const struct se_sampling *s, const int32_t *const *prompt,
                  const size_t *n_prompt, const int32_t *const *generated,
                  const size_t *n_generated, struct se_sample_result *out);
};

struct se_backend {
    const struct se_backend_i *i;
    void *ctx;
};

#endif
