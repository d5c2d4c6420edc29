/*
 * libspool-engine: model loading, tokenizer, sampler, KV cache and the
 * batching step, over interchangeable compute backends. It knows nothing of
 * PostgreSQL or sockets. Public names start with se_; internal non-static
 * ones with se__. Errors are the negative SP_E* codes of spool/error.h.
 */
#ifndef SPOOL_ENGINE_H
#define SPOOL_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "spool/error.h"
#include "spool/model.h"
#include "spool/sample.h"
#include "spool/tokenizer.h"

const char *se_version(void);

/*
 * Returns the number of CUDA devices, SP_ENODEV when there is none (err says
 * why, with the CUDA error name), or SP_EUNSUPPORTED when built without CUDA.
 */
int se_cuda_devices(char *err, size_t errcap);

/*
 * Running sequences: an engine owns a compute backend and a paged KV cache
 * for one open model and runs every active sequence together, one flattened
 * batch per se_engine_step (continuous batching: decode tokens one per
 * sequence, prompts in chunks within a token budget). It is single-threaded:
 * one caller at a time.
 *
 * A sequence moves WAITING -> RUNNING (admitted: KV blocks for its tokens so
 * far, full prompt blocks shared from the prefix cache where they match) ->
 * FINISHED (its event carries the finish reason; its blocks are released at
 * once). Blocks are taken one at a time as a sequence grows; when none is
 * left, the lowest-priority, most recently admitted running sequence is
 * preempted (RUNNING -> WAITING, blocks released, its tokens so far
 * recomputed when it is admitted again; an event reports it). Live
 * sequences are admitted, scheduled and kept ahead of batch ones. The policy
 * is described in docs/architecture.md, "Engine".
 */
typedef struct se_engine se_engine_t;

struct se_engine_opts {
    int n_threads;        /* CPU backend threads; 0 = all online cores */
    int max_batch_tokens; /* tokens per step (prefill chunk budget); 0 = 256 */
    int max_seqs;         /* sequences running at once; 0 = 32 */
    int block_size;       /* KV cache block, in tokens; 0 = 16 */
    size_t kv_bytes;      /* KV cache budget; 0 = max_seqs full contexts, at most 1 GiB */
    /* Optional (may be NULL, not owned, must outlive the engine): needed for stop strings and text.
     */
    const se_tokenizer_t *tok;
    /*
     * The compute backend: "cpu" (NULL or "" too), "null" (no arithmetic: each
     * token is a hash of the sequence's tokens read back through the KV cache,
     * see null_step_us), or "cuda" (device cuda_device; only when built with
     * CUDA, else se_engine_open fails with SP_EUNSUPPORTED).
     */
    const char *backend;
    int null_step_us; /* null backend: wall time added to every forward pass, in microseconds */
    int cuda_device;
    bool no_prefix_cache; /* never share KV blocks between sequences */
};

/*
 * Creates an engine over model (not owned; it must outlive the engine) with
 * the backend named in opts->backend. opts may be NULL. Returns 0, SP_ENOMEM,
 * SP_EINVAL (unknown backend, a KV budget that holds no block),
 * SP_EUNSUPPORTED (cuda in a build without CUDA), SP_ENODEV (no GPU) or
 * SP_EBACKEND, with err saying why.
 */
int se_engine_open(const se_model_t *model, const struct se_engine_opts *opts, se_engine_t **out,
                   char *err, size_t errcap);
void se_engine_close(se_engine_t *e);

/* Priority classes: live sequences are admitted and scheduled ahead of batch ones. */
enum se_priority {
    SE_PRIORITY_BATCH = 0,
    SE_PRIORITY_LIVE = 1,
};

struct se_seq_params {
    const int32_t *prompt; /* copied; at least one token */
    size_t n_prompt;
    /*
     * Tokens this sequence already generated before an interruption; copied.
     * They are fed as context and count toward max_tokens, and sampling
     * continues at position n_prompt + n_resume exactly as if never stopped.
     */
    const int32_t *resume;
    size_t n_resume;
    struct se_sampling sampling; /* stop strings are copied; they need opts.tok */
    uint64_t user;               /* the caller's opaque tag, returned in events and usage */
    enum se_priority priority;   /* SE_PRIORITY_BATCH (0, the default) or SE_PRIORITY_LIVE */
    /*
     * Alternatively to prompt (which must then be NULL): a conversation,
     * rendered with the tokenizer's chat template (needs opts.tok) and
     * tokenized; not kept after submit.
     */
    const struct se_chat_msg *messages;
    size_t n_messages;
};

enum se_finish {
    SE_FINISH_NONE = 0,    /* still running */
    SE_FINISH_EOS,         /* the model's end-of-sequence token */
    SE_FINISH_STOP,        /* a stop token id (sampling.stop_ids) */
    SE_FINISH_STOP_STRING, /* a stop string; the text ends before it */
    SE_FINISH_LENGTH,      /* max_tokens, or the context is full */
    SE_FINISH_CANCELED,    /* se_engine_cancel */
};
/* "stop", "stop", "stop", "length", "canceled" (OpenAI's names), or "none". */
const char *se_finish_name(enum se_finish f);

/* What one step did for one sequence. */
struct se_event {
    int32_t seq; /* from se_engine_submit */
    uint64_t user;
    int32_t token; /* the token generated this step, or -1 (canceled) */
    float logprob; /* its log-probability under the sampling distribution */
    enum se_finish finish;
    /* Text completed by this token and safe to show (held back while it could start a stop string;
     * never half a UTF-8 character); empty without a tokenizer. */
    const char *text;
    size_t text_len;
    int n_prompt;    /* usage: prompt tokens */
    int n_generated; /* usage: generated tokens so far, resumed ones included */
    /*
     * Set on an event that reports a preemption (token -1, finish NONE): the
     * sequence lost its KV blocks and waits again; n_recompute tokens (those
     * it had in the cache) will be fed again, or found in the prefix cache,
     * when it is readmitted. Its output so far stays valid.
     */
    bool preempted;
    int n_recompute;
};

/*
 * Queues a sequence; *seq receives its id. Returns 0, SP_EINVAL (empty
 * prompt, bad token id, invalid sampling or priority, a chat that cannot be
 * rendered: err names the field), SP_ECONTEXT (prompt + resume fill the
 * model's context) or SP_ETOOBIG (the sequence alone would not fit in the KV
 * cache).
 */
int se_engine_submit(se_engine_t *e, const struct se_seq_params *p, int32_t *seq, char *err,
                     size_t errcap);

/*
 * Runs one forward pass over the running sequences (admitting waiting ones
 * first, preempting as the policy says) and samples. *events (owned by the
 * engine, valid until the next step) receives one event per sequence that
 * produced a token or finished, and one per preemption (preempted set).
 * se_engine_last_usage then describes the step.
 * Returns the number of events (0 when nothing is left to do), or a negative
 * SP_E* code (SP_EBACKEND: se_engine_error says why).
 */
int se_engine_step(se_engine_t *e, const struct se_event **events);

/* Finishes a waiting or running sequence; its event comes with the next step. */
int se_engine_cancel(se_engine_t *e, int32_t seq);

/*
 * Usage of one step for one sequence, for cost attribution. Every token the
 * step fed to the model is counted once, as n_prefill (prompt or resume
 * tokens computed for the first time) or n_recompute (tokens computed again
 * after a preemption) or, for a decode token, by the n_decode of the token
 * it produced. n_cached are prompt tokens (or tokens lost to a preemption)
 * whose KV was found in the prefix cache: no work. Over a sequence's life,
 * sum(n_prefill + n_cached + n_recompute) = n_prompt + n_resume + the
 * n_recompute of its preemption events, and sum(n_decode) = tokens generated.
 */
struct se_seq_usage {
    int32_t seq;
    uint64_t user;
    enum se_priority priority;
    int n_prefill, n_cached, n_recompute;
    int n_decode; /* tokens sampled for it this step (0 or 1) */
};

/* Usage of the last step (valid until the next step). */
struct se_step_usage {
    int64_t wall_ns; /* the whole se_engine_step call, scheduling and sampling included */
    int n_tokens;    /* tokens in the forward pass */
    int n_seqs;
    const struct se_seq_usage *seqs; /* (n_seqs) every sequence that did work or used the cache */
};
const struct se_step_usage *se_engine_last_usage(const se_engine_t *e);

/* Totals since se_engine_open, and the KV allocator's own accounting. */
struct se_engine_stats {
    int64_t busy_ns; /* time spent in se_engine_step; the sum of every step's wall_ns */
    int64_t n_steps;
    int64_t n_preemptions;
    int64_t n_prefill, n_cached, n_recompute, n_decode; /* sums of se_seq_usage */
    int n_blocks;                                       /* KV blocks in the cache */
    int n_blocks_free;                                  /* never used or freed */
    int n_blocks_cached; /* holding a prefix-cache entry, referenced by no sequence (evictable) */
    int n_blocks_used;   /* referenced by at least one sequence */
    int n_running, n_waiting;
};
/*
 * Fills *st. Returns 0, or SP_ECORRUPT when the allocator's accounting is
 * inconsistent (a block counted twice or lost; se_engine_error says which).
 */
int se_engine_stats(se_engine_t *e, struct se_engine_stats *st);

/* Sequences waiting or running. */
int se_engine_n_active(const se_engine_t *e);

/* The generated token ids of a sequence (resumed ones included), valid until its finish event has
 * been returned and the next step runs. */
const int32_t *se_engine_seq_tokens(const se_engine_t *e, int32_t seq, int *n);

/* The message of the last failure (never NULL). */
const char *se_engine_error(const se_engine_t *e);

#endif
