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
 * batch per se_engine_step (prompts in chunks within a token budget, decode
 * tokens one per sequence). It is single-threaded: one caller at a time.
 *
 * A sequence moves WAITING -> RUNNING (admitted: its KV blocks for prompt +
 * max_tokens, capped at the context, are reserved) -> FINISHED (its event
 * carries the finish reason; its blocks return to the pool).
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
};

/*
 * Creates an engine over model (not owned; it must outlive the engine) with
 * the CPU backend. opts may be NULL. Returns 0, SP_ENOMEM or SP_EBACKEND with
 * err saying why.
 */
int se_engine_open(const se_model_t *model, const struct se_engine_opts *opts, se_engine_t **out,
                   char *err, size_t errcap);
void se_engine_close(se_engine_t *e);

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
    uint64_t user;               /* the caller's tag, returned in events */
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
};

/*
 * Queues a sequence; *seq receives its id. Returns 0, SP_EINVAL (empty
 * prompt, bad token id, invalid sampling: err names the field) or
 * SP_ECONTEXT (prompt + resume fill the model's context).
 */
int se_engine_submit(se_engine_t *e, const struct se_seq_params *p, int32_t *seq, char *err,
                     size_t errcap);

/*
 * Runs one forward pass over the running sequences (admitting waiting ones
 * first) and samples. *events (owned by the engine, valid until the next
 * step) receives one event per sequence that produced a token or finished.
 * Returns the number of events (0 when nothing is left to do), or a negative
 * SP_E* code (SP_EBACKEND: se_engine_error says why).
 */
int se_engine_step(se_engine_t *e, const struct se_event **events);

/* Finishes a waiting or running sequence; its event comes with the next step. */
int se_engine_cancel(se_engine_t *e, int32_t seq);

/* Sequences waiting or running. */
int se_engine_n_active(const se_engine_t *e);

/* The generated token ids of a sequence (resumed ones included), valid until its finish event has
 * been returned and the next step runs. */
const int32_t *se_engine_seq_tokens(const se_engine_t *e, int32_t seq, int *n);

/* The message of the last failure (never NULL). */
const char *se_engine_error(const se_engine_t *e);

#endif
