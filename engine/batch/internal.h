/*
 * The engine's internal state (engine/batch), shared by its files:
 * engine.c (open, close, submit, cancel), sched.c (admission, block growth,
 * preemption, the batch of a step), step.c (the step: forward, sampling,
 * events), usage.c (usage accounting) and blocks.c (allocator, prefix cache).
 */
#ifndef SPOOL_ENGINE_BATCH_INTERNAL_H
#define SPOOL_ENGINE_BATCH_INTERNAL_H

#include "../backend.h"
#include "blocks.h"
#include "spool/engine.h"

enum seq_state { SEQ_WAITING, SEQ_RUNNING, SEQ_FINISHED };

struct seq {
    int32_t id; /* also the submission order */
    uint64_t user;
    enum se_priority prio;
    enum seq_state state;
    int64_t admit_stamp; /* order of the latest admission (preemption picks the latest) */
    int32_t *tokens;     /* prompt then generated; capacity max_total */
    int n_prompt;        /* prompt tokens (resumed tokens count as generated) */
    int n_in;            /* prompt + resume: tokens given at submit */
    int n_tokens, n_fed, max_total;
    int hwm; /* most tokens ever fed (or cached): tokens below it are recomputed */
    struct se_sampling sp;
    char *stops[SE_MAX_STOP];
    int32_t *blocks;  /* block table, capacity ceil(max_total / block_size) */
    uint64_t *hashes; /* chain hash of each full block, once its tokens are known */
    int n_blocks;     /* blocks in the table */
    int n_hashed;     /* leading blocks whose hash is in hashes */
    int n_published;  /* leading blocks offered to the prefix cache */
    se_detok_t *detok;
    char *text;
    size_t text_len, text_cap, emitted;
    enum se_finish finish;
    bool event_due; /* finished outside a step (cancel, resume at max_tokens) */
    /* This step's usage. */
    int u_prefill, u_cached, u_recompute, u_decode;
    bool u_listed;
    struct seq *next;
};

struct se_engine {
    const se_model_t *model;
    const struct se_model_config *cfg;
    struct se_engine_opts opts;
    struct se_backend be;
    bool be_ok;
    se_sampler_t *sampler;
    char err[512];

    struct se__blocks blocks;
    struct seq *head, *tail; /* active and just-finished sequences, in submission order */
    int n_running, n_live;
    int32_t next_id;
    int64_t admit_counter;

    /* Step buffers, sized at open (order/events grow with the sequences). */
    int32_t *tokens, *positions, *seq_start, *seq_n, *seq_ctx, *logit_rows;
    const int32_t **tables;
    struct seq **batch_seqs;
    float *logits;
    struct se_event *events;
    int n_events, events_cap;
    struct seq **order; /* scratch: live sequences sorted for the scheduler */
    int order_cap;

    /* Usage. */
    struct se_seq_usage *usage; /* (usage_cap) the last step's, handed out */
    struct seq **noted;         /* (usage_cap) the sequences noted in this step */
    int usage_cap;
    struct se_step_usage last;
    struct se_engine_stats totals;
};

/* engine.c */
bool se__push_text(struct seq *s, int32_t t, bool finish);
/* Releases every block of s (the sequence then holds none and has fed nothing). */
void se__release_blocks(se_engine_t *e, struct seq *s);
/* Drops sequences whose finish event was returned by the previous step. */
void se__reap(se_engine_t *e);

/* sched.c: chooses this step's batch; fills the batch buffers. Returns sequences in the batch, or a
 * negative SP_E* code. */
int se__schedule(se_engine_t *e, int *n_tokens);
/* Publishes the blocks that the last forward filled completely. */
void se__publish_full(se_engine_t *e, struct seq *s);

/* step.c */
struct se_event *se__add_event(se_engine_t *e, struct seq *s, int32_t token, float logprob);
int se__reserve_events(se_engine_t *e, int n);

/* usage.c */
int se__usage_begin(se_engine_t *e);
void se__usage_note(se_engine_t *e, struct seq *s);
int se__usage_end(se_engine_t *e, int64_t t0_ns, int n_tokens);
int64_t se__now_ns(void);

#endif
