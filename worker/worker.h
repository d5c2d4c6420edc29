/*
 * spool-worker's internal interface, shared by its files:
 *
 *   main.c        flags, start-up, the libuv loop, shutdown
 *   conn.c        the scheduler connection: REGISTER, HEARTBEAT, reconnect
 *   db.c          the blocking PostgreSQL connection and the fenced calls
 *   model_cache.c fetching the pinned model version and opening its engine
 *   params.c      job + request parameters -> struct se_sampling
 *   shards.c      the shard runner: requests in, engine steps, results out
 *   live.c        live requests: LIVE_REQUEST in, TOKENS and USAGE out, CANCEL
 *   preempt.c     notice sources (SIGTERM, file, AWS, GCP) and the drain
 *   http.c        a tiny HTTP/1.0 GET client over libuv TCP (metadata polls)
 *   gpu_time.c    a step's wall time split among its sequences by their work
 *
 * Threading: everything runs on the one libuv loop thread, the engine steps
 * included (one step per loop turn while sequences are active, from an idle
 * handle, so the frames that arrived during a step are read and a live
 * request submitted before the next step), except PostgreSQL: one database
 * thread (db.c) owns the connection and runs statements in FIFO order. The
 * hot statements (ASSIGN's reads and start_requests, complete_requests,
 * checkpoint_requests, the final release_shard) are submitted without
 * waiting, their outcome handled by a callback on the loop; rare paths (a
 * model load, a refusal's release, the drain, start-up) still wait for
 * theirs. No engine or libuv handle is touched off the loop.
 */
#ifndef SPOOL_WORKER_H
#define SPOOL_WORKER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <libpq-fe.h>
#include <uv.h>

#include "spool/backoff.h"
#include "spool/bundle.h"
#include "spool/engine.h"
#include "spool/wire.h"
#include "spool/wire_conn.h"

#define WK_MAX_NOTICES 8

enum wk_notice_kind { WK_NOTICE_FILE, WK_NOTICE_AWS, WK_NOTICE_GCP };

struct wk_notice {
    enum wk_notice_kind kind;
    const char *arg; /* file path or base URL (argv memory) */
    bool in_flight;  /* an HTTP poll is running */
    struct worker *w;
};

struct wk_config {
    const char *dsn;
    const char *scheduler; /* host:port */
    const char *name;
    const char *gpu_type;
    enum sp_wire_capacity capacity;
    double price_per_hour;
    const char *model_store; /* NULL: $SPOOL_MODEL_STORE etc., see sp_store_open */
    const char *model_cache;
    uint64_t model_cache_limit; /* bytes; 0 = no limit */
    int max_batch;
    size_t kv_bytes; /* 0 = engine default */
    int threads;     /* 0 = all cores */
    const char *backend;
    int checkpoint_tokens;     /* checkpoint a sequence after this many new tokens */
    double checkpoint_seconds; /* and every this many seconds */
    struct wk_notice notices[WK_MAX_NOTICES];
    int n_notices;
    double drain_deadline; /* seconds */
    int step_delay_ms;     /* test aid (SPOOL_WORKER_STEP_DELAY_MS): pause between steps */
    /*
     * --model REF: the version loaded at start-up and announced in REGISTER
     * for live requests. The worker then runs that version only: a shard of
     * another one is released (model_unavailable). NULL: none at start-up.
     */
    const char *model_ref;
};

struct wk_shard;
struct wk_live;

/*
 * The engine's `user` tag of a sequence is a pointer: to a struct wk_seq (a
 * batch request) or, with the lowest bit set, to a struct wk_live (both are
 * malloc'd, so that bit is otherwise 0).
 */
#define WK_TAG_LIVE ((uint64_t)1)
static inline bool wk_tag_is_live(uint64_t user)
{
    return (user & WK_TAG_LIVE) != 0;
}

/* One request in the engine. */
struct wk_seq {
    uint64_t req_id;
    struct wk_shard *shard;
    int32_t seq;  /* engine id */
    int n_prompt; /* prompt tokens */
    int n_ckpt;   /* generated tokens saved by the last committed checkpoint */
    int n_gen;    /* generated tokens so far (resumed ones included) */
    double gpu_s; /* attributed step time, seconds */
    char *text;   /* output so far: the resumed tokens' text, then each event's (malloc'd) */
    size_t text_len, text_cap;
    struct wk_seq *next; /* in the shard's list (or the worker's orphans) */
};

/* A shard under lease. */
struct wk_shard {
    uint64_t id, job_id, token;
    struct wk_shard *next;
    struct wk_seq *seqs; /* in-flight sequences */
    int n_inflight;
    json_t *results; /* finished, not yet written: JSON array for complete_requests */
    uint64_t succeeded, failed, tokens_in, tokens_out;
    double gpu_s;
    int write_failures; /* consecutive refusals of complete_requests */
    bool ckpt_due;
    /*
     * Writes in flight on the database thread (db.c): at most one
     * complete_requests (its results are out of `results`), one
     * checkpoint_requests and the final release_shard per shard.
     */
    bool writing, ckpt_inflight, finishing;
    bool starting;           /* ASSIGN's reads are in flight (shards.c): nothing runs yet */
    uint64_t ckpt_failed_ms; /* uv_now of the last failed checkpoint; 0 = none */
};

struct worker {
    struct wk_config cfg;
    uv_loop_t *loop;
    PGconn *db; /* owned by the database thread once wk_db_start ran (db.c) */
    struct wk_db *dbt;
    struct sp_store store;

    /* The loaded model version (one at a time). */
    char digest[72]; /* "sha256:HEX", "" when none */
    char pinned[72]; /* the --model version: the only one this worker loads; "" without --model */
    char model_name[136];
    uint32_t model_version;
    int64_t model_id;
    se_model_t *model;
    se_tokenizer_t *tok;
    se_engine_t *eng;
    int n_ctx, n_vocab;

    struct wk_shard *shards;
    /* Sequences cancelled with their shard (lease lost): freed when their last event arrives. */
    struct wk_seq *orphans;
    /* Live requests in the engine, and those ended but awaiting their engine event (live.c). */
    struct wk_live *lives;
    int n_lives;
    uint64_t n_steps; /* engine steps since start-up (live.c counts steps to the first token) */

    /* Scheduler connection (conn.c). */
    uv_tcp_t *tcp;
    uv_connect_t connect_req;
    sp_wire_conn_t *sc;
    bool registered;
    bool said_goodbye; /* GOODBYE sent: the connection is not reopened */
    bool has_id;
    uint64_t worker_id;
    uint32_t heartbeat_ms;
    struct sp_backoff backoff;
    uv_timer_t reconnect_timer, heartbeat_timer;

    /* Shard runner (shards.c). */
    uv_timer_t step_timer, flush_timer, ckpt_timer;
    uv_idle_t step_idle; /* steps once per loop turn, after I/O was polled */
    bool stepping;
    bool ckpt_wait; /* stepping paused until a checkpoint commits (the recompute bound) */
    /* Test aid (SPOOL_WORKER_TRACE=PATH): progress lines appended per step; -1 when off. */
    int trace_fd;

    /* Preemption (preempt.c). */
    uv_timer_t notice_timer, exit_timer;
    uv_signal_t sigterm, sigint;
    bool draining; /* no new work: a notice, SIGINT, or a DRAIN on this connection */
    bool exiting;  /* a notice or SIGINT: the worker drains and exits */
    bool stopping; /* the loop is closing down */
    int exit_code;
};

/* ---- conn.c ---- */
void wk_conn_start(struct worker *w);
/* Sends f when connected and registered (REGISTER itself is sent by conn.c); drops it otherwise. */
void wk_conn_send(struct worker *w, const struct sp_wire_frame *f);
/* Sends GOODBYE and shuts the connection down; no reconnect afterwards. */
void wk_conn_goodbye(struct worker *w, const char *reason);
void wk_conn_close(struct worker *w);

/* ---- db.c ---- */
/*
 * The database thread. After wk_db_start, w->db belongs to one thread of its
 * own that runs statements from a FIFO, one at a time, in submission order
 * (so writes of a shard stay in order). Statements come from the loop thread
 * only, synchronously (wk_db_call, which waits) or asynchronously
 * (wk_db_submit, whose callback runs later on the loop thread). The database
 * thread touches nothing but its connection and the operations handed to it.
 *
 * Return codes besides 0: SP_EDB (err says why), SP_ESTATE (lease lost).
 */
int wk_db_connect(struct worker *w, char *err, size_t errcap);
/* Starts the database thread (after uv_default_loop, before uv_run). */
int wk_db_start(struct worker *w);
/* On the loop, when it stops: closes the completion handle; later callbacks run in wk_db_stop. */
void wk_db_close(struct worker *w);
/* After uv_run: ends the thread, runs what completions are left, closes the connection. */
void wk_db_stop(struct worker *w);
/*
 * Runs one parameterised statement and waits for it (behind every statement
 * submitted before it); on success *res (may be NULL to discard) holds the
 * result (caller PQclear's it). A broken connection is reset and the
 * statement sent once more (every worker statement is idempotent or fenced).
 * Blocks the loop: for rare paths (assignment, drain, start-up).
 */
int wk_db_call(struct worker *w, const char *sql, int n, const char *const *params, PGresult **res,
               char *err, size_t errcap);
/*
 * The outcome of a submitted statement, on the loop thread: rc as for
 * wk_db_call, res (freed after the callback returns; NULL on error),
 * conn_ok (false when the connection was broken after an error), err.
 */
typedef void (*wk_db_cb)(struct worker *w, int rc, PGresult *res, bool conn_ok, const char *err,
                         void *arg);
/*
 * Queues a statement (sql must be a string constant; params are copied) and
 * returns at once; cb(arg) runs on the loop thread when it is done. Returns 0,
 * or SP_ENOMEM (cb is then never called).
 */
int wk_db_submit(struct worker *w, const char *sql, int n, const char *const *params, wk_db_cb cb,
                 void *arg);
/* Waits until every submitted statement is done and its callback has run (the drain). */
void wk_db_settle(struct worker *w);

/* ---- model_cache.c ---- */
/*
 * Makes the model version with this digest ("sha256:HEX") the loaded one:
 * looks up its store URI in spool.models, fetches and verifies the bundle into
 * the cache, opens model, tokenizer and engine. Returns 0, SP_ESTATE when
 * another model still has sequences running, or an error with err saying
 * what (SP_ECHECKSUM for a digest mismatch).
 */
int wk_model_load(struct worker *w, const char *digest, char *err, size_t errcap);
void wk_model_unload(struct worker *w);

/* ---- params.c ---- */
/*
 * Fills *sp from the job's params overridden by the request's (both JSON
 * objects or NULL). Stop strings point into the JSON (valid while it lives).
 * Returns 0 or SP_EINVAL with err naming the field ("params.top_p must be ...").
 */
int wk_params_sampling(json_t *job, json_t *req, int n_vocab, struct se_sampling *sp, char *err,
                       size_t errcap);
/*
 * Fills *sp from a live request's sampling map with the same checks (and the
 * same default max_tokens); errors name the field as "sampling.NAME". Stop
 * strings point into ws (valid while the frame lives).
 */
int wk_params_wire(const struct sp_wire_sampling *ws, int n_vocab, struct se_sampling *sp,
                   char *err, size_t errcap);

/* ---- shards.c ---- */
/* Handles ASSIGN: fetches the model, reads and starts the shard's requests. */
void wk_shard_assign(struct worker *w, const struct sp_wire_assign *a);
/*
 * The scheduler voided a lease (its job was cancelled): the shard's sequences
 * are cancelled and nothing more is written for it (no RELEASE either).
 */
void wk_shard_revoke(struct worker *w, const struct sp_wire_revoke *r);
/* Writes the finished results of every shard (complete_requests). */
void wk_shards_flush(struct worker *w);
/* Checkpoints in-flight sequences: every shard when all, else those marked due. */
void wk_shards_checkpoint(struct worker *w, bool all);
/* Drain: checkpoints and releases every shard; returns sequences and tokens left unsaved. */
void wk_shards_release_all(struct worker *w, const char *reason, int *n_seqs, long *tokens_lost,
                           int *n_shards);
void wk_shards_start(struct worker *w);
void wk_shards_stop(struct worker *w);
/* Engine occupancy for HEARTBEAT: batch and live sequences alike. */
void wk_shards_load(struct worker *w, struct sp_wire_heartbeat *hb);
/* Starts stepping the engine if it has work (sequences, or events still to deliver). */
void wk_shards_kick(struct worker *w);

/* ---- live.c ---- */
/*
 * --model: resolves cfg.model_ref with spool.resolve_model and loads that
 * version (fetched, verified and opened as for a shard). Returns 0 or an
 * error with err saying what.
 */
int wk_live_load(struct worker *w, char *err, size_t errcap);
/*
 * LIVE_REQUEST: checks the model, prompt or chat and sampling, and submits
 * the request to the engine in the live class; a refusal is answered at once
 * with ERROR {request_id, code, message}.
 */
void wk_live_request(struct worker *w, const struct sp_wire_live_request *r);
/* CANCEL: ends the request now (final TOKENS "cancelled", USAGE); unknown ids are ignored. */
void wk_live_cancel(struct worker *w, uint64_t request_id);
/*
 * One engine event of a live sequence (tag decoded by the caller): sends
 * TOKENS, and on its end the final TOKENS and USAGE, then frees it.
 */
void wk_live_event(struct worker *w, struct wk_live *q, const struct se_event *ev);
/* Adds seconds of step time to a live request's GPU time. */
void wk_live_charge(struct wk_live *q, double seconds);
/*
 * Ends every live request. With a connection to tell (finish "error", or
 * "cancelled"), each gets its final TOKENS and USAGE; finish NULL sends
 * nothing (the scheduler is gone). Sequences are cancelled in the engine;
 * their events (which free them) come with the next step: the caller kicks
 * the engine unless it is stopping.
 */
void wk_live_end_all(struct worker *w, const char *finish, const char *why);
/* The engine was closed: frees every live request without touching it. */
void wk_live_forget_all(struct worker *w);

/* ---- preempt.c ---- */
void wk_preempt_start(struct worker *w);
void wk_preempt_stop(struct worker *w);
/* A preemption notice from source ("sigterm", "notice-file", "aws", "gcp"): drain and exit. */
void wk_preempt_notice(struct worker *w, const char *source);
/*
 * Drains and exits: stops stepping, checkpoints and releases every shard,
 * records the preemption (when preempted), GOODBYE, then closes the loop.
 */
void wk_drain(struct worker *w, const char *source, bool preempted);
/*
 * The scheduler sent DRAIN (shutdown, rebalance): checkpoint and release every
 * shard and take no more work on this connection; the worker stays up and
 * takes work again after its next REGISTERED (a restarted scheduler).
 */
void wk_drain_shards(struct worker *w, const char *reason);

/* ---- gpu_time.c ---- */
/* The work of step u: the sum over its sequences of n_prefill + n_recompute + n_decode. */
long wk_gpu_weight(const struct se_step_usage *u);
/*
 * Seconds of step u charged to u->seqs[i], given weight = wk_gpu_weight(u):
 * wall time x (its n_prefill + n_recompute + n_decode) / weight, or an equal
 * split when weight is 0. Over i the shares add up to u->wall_ns (0 when the
 * step lists no sequence).
 */
double wk_gpu_share(const struct se_step_usage *u, long weight, int i);

/* ---- http.c ---- */
/*
 * GETs base_url + path (http://HOST[:PORT] only) with extra header lines
 * (each "Name: value\r\n", may be NULL). cb gets the status (or a negative
 * SP_E* code) and the body (NUL-terminated, valid during the call).
 * timeout_ms bounds the whole exchange.
 */
typedef void (*wk_http_cb)(void *arg, int status, const char *body, size_t len);
int wk_http_get(uv_loop_t *loop, const char *base_url, const char *path, const char *headers,
                unsigned timeout_ms, wk_http_cb cb, void *arg);

#endif
