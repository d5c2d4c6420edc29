/*
 * The shard runner. An ASSIGN brings a shard under a lease: its pending
 * requests are started (spool.start_requests), tokenized and submitted into
 * the worker's one engine, so the batch stays full across shards and jobs.
 * Finished sequences become results, written in batches with
 * spool.complete_requests (every 100 ms, or at 64 results); in-flight
 * sequences are checkpointed with spool.checkpoint_requests every
 * --checkpoint-tokens tokens or --checkpoint-seconds seconds. A shard with
 * nothing left is released (spool.release_shard) and reported with DONE.
 * These writes go to the database thread (db.c) without waiting: the engine
 * keeps stepping while they run, and their callbacks (on the loop thread)
 * find the shard again by id and lease token.
 *
 * Fencing: every write carries the shard's lease token. When one is refused
 * ("lease lost"), the shard's sequences are cancelled in the engine and its
 * unwritten results dropped: nothing more is written for it.
 *
 * The step loop here serves live requests too (live.c): each step's events
 * are sorted by the sequence's tag, live ones first, so their TOKENS leave
 * before any batch result is written to PostgreSQL.
 *
 * GPU time: each step's wall time, as the engine reports it in its usage, is
 * split among the sequences in it by the tokens each computed
 * (gpu_time.c), so a long prompt's prefill costs its request more than a
 * decode token costs another's.
 *
 * Test aid: with SPOOL_WORKER_TRACE=PATH every sequence's progress is
 * appended to PATH, one line per event, "REALTIME_NS PID REQUEST KIND N":
 * kind S when the request enters the engine (N = the checkpointed tokens it
 * resumes from), G after each step that gave it a token (N = its generated
 * tokens, resumed ones included). Each step's lines go out in one write(2)
 * right after the step and before any checkpoint of it, so they survive a
 * kill -9 (tests/e2e/batch.sh kill measures recomputed tokens with them).
 */
#include "worker.h"

#include "spool/error.h"
#include "spool/log.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WK_FLUSH_MS      100
#define WK_FLUSH_RESULTS 64

static void u64s(char *buf, uint64_t v)
{
    snprintf(buf, 24, "%" PRIu64, v);
}

/* ---- Progress trace (test aid) ---- */

static char trace_buf[16384];
static size_t trace_len;

static void trace_flush(struct worker *w)
{
    if (w->trace_fd >= 0 && trace_len) {
        ssize_t n = write(w->trace_fd, trace_buf, trace_len);
        (void)n;
    }
    trace_len = 0;
}

static void trace_add(struct worker *w, uint64_t req, char kind, int n)
{
    if (w->trace_fd < 0)
        return;
    if (trace_len + 96 > sizeof(trace_buf))
        trace_flush(w);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    trace_len += (size_t)snprintf(
        trace_buf + trace_len, sizeof(trace_buf) - trace_len, "%" PRId64 " %d %" PRIu64 " %c %d\n",
        (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec, (int)getpid(), req, kind, n);
}

/* ---- Shard and sequence bookkeeping ---- */

static void seq_free(struct wk_seq *q)
{
    if (!q)
        return;
    free(q->text);
    free(q);
}

/*
 * Appends n bytes of output. PostgreSQL text cannot hold a NUL byte, so a NUL
 * (a model may generate one) is stored as U+FFFD; the same for every run, so
 * a resumed output still equals an uninterrupted one.
 */
static bool seq_append_raw(struct wk_seq *q, const char *s, size_t n)
{
    if (q->text_len + n + 1 > q->text_cap) {
        size_t cap = q->text_cap ? q->text_cap * 2 : 256;
        while (cap < q->text_len + n + 1)
            cap *= 2;
        char *t = realloc(q->text, cap);
        if (!t)
            return false;
        q->text = t;
        q->text_cap = cap;
    }
    memcpy(q->text + q->text_len, s, n);
    q->text_len += n;
    q->text[q->text_len] = 0;
    return true;
}

static bool seq_append(struct wk_seq *q, const char *s, size_t n)
{
    while (n) {
        const char *z = memchr(s, 0, n);
        size_t k = z ? (size_t)(z - s) : n;
        if (!seq_append_raw(q, s, k) || (z && !seq_append_raw(q, "\xEF\xBF\xBD", 3)))
            return false;
        s += k + (z != NULL);
        n -= k + (z != NULL);
    }
    return true;
}

static void shard_unlink_seq(struct wk_shard *s, struct wk_seq *q)
{
    for (struct wk_seq **pp = &s->seqs; *pp; pp = &(*pp)->next) {
        if (*pp == q) {
            *pp = q->next;
            s->n_inflight--;
            q->next = NULL;
            return;
        }
    }
}

static void shard_free(struct worker *w, struct wk_shard *s)
{
    for (struct wk_shard **pp = &w->shards; *pp; pp = &(*pp)->next) {
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    }
    json_decref(s->results);
    free(s);
}

/* Cancels every sequence of s in the engine; their events free them later. */
static void shard_cancel_seqs(struct worker *w, struct wk_shard *s)
{
    while (s->seqs) {
        struct wk_seq *q = s->seqs;
        shard_unlink_seq(s, q);
        q->shard = NULL;
        if (w->eng)
            se_engine_cancel(w->eng, q->seq);
        q->next = w->orphans;
        w->orphans = q;
    }
}

static void shard_lost(struct worker *w, struct wk_shard *s, const char *err)
{
    sp_warn("shard %" PRIu64 " (lease %" PRIu64 "): %s; dropping %d running sequences and %zu "
            "unwritten results",
            s->id, s->token, err, s->n_inflight, json_array_size(s->results));
    shard_cancel_seqs(w, s);
    shard_free(w, s);
}

void wk_shard_revoke(struct worker *w, const struct sp_wire_revoke *r)
{
    for (struct wk_shard *s = w->shards; s; s = s->next) {
        if (s->id == r->shard_id && s->token == r->lease_token) {
            shard_lost(w, s, r->reason && *r->reason ? r->reason : "revoked by the scheduler");
            return;
        }
    }
    sp_debug("REVOKE for shard %" PRIu64 " (lease %" PRIu64 "), which this worker no longer runs",
             r->shard_id, r->lease_token);
}

static void send_release(struct worker *w, struct wk_shard *s, const char *reason)
{
    struct sp_wire_frame f = {
        .type = SP_WIRE_RELEASE,
        .release = {.shard_id = s->id, .lease_token = s->token, .reason = reason}};
    wk_conn_send(w, &f);
}

/* Gives a shard back to the queue in the database and tells the scheduler. */
static void release_db(struct worker *w, uint64_t shard, uint64_t token, const char *reason,
                       char *state, size_t statecap)
{
    char a[24], b[24], err[512];
    u64s(a, shard);
    u64s(b, token);
    const char *p[3] = {a, b, reason};
    PGresult *r;
    int rc = wk_db_call(w, "SELECT spool.release_shard($1, $2, $3)", 3, p, &r, err, sizeof(err));
    if (rc) {
        sp_warn("shard %" PRIu64 ": release failed: %s", shard, err);
        snprintf(state, statecap, "%s", rc == SP_ESTATE ? "lost" : "error");
        return;
    }
    snprintf(state, statecap, "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
}

/* The shard with this id and lease, or NULL when it was lost, revoked or released meanwhile. */
static struct wk_shard *find_shard(struct worker *w, uint64_t id, uint64_t token)
{
    for (struct wk_shard *s = w->shards; s; s = s->next)
        if (s->id == id && s->token == token)
            return s;
    return NULL;
}

/* What an asynchronous write's callback needs to find its shard again. */
struct shard_ref {
    uint64_t id, token;
};

static void on_released(struct worker *w, int rc, PGresult *res, bool conn_ok, const char *err,
                        void *arg)
{
    (void)conn_ok;
    struct shard_ref *ref = arg;
    struct wk_shard *s = find_shard(w, ref->id, ref->token);
    free(ref);
    if (!s)
        return;
    const char *st = rc == SP_ESTATE ? "lost" : rc ? "error" : PQgetvalue(res, 0, 0);
    if (rc)
        sp_warn("shard %" PRIu64 ": release failed: %s", s->id, err);
    sp_info("shard %" PRIu64 " finished: %" PRIu64 " succeeded, %" PRIu64 " failed; now %s", s->id,
            s->succeeded, s->failed, st);
    struct sp_wire_frame u = {.type = SP_WIRE_USAGE,
                              .usage = {.has_shard_id = true,
                                        .shard_id = s->id,
                                        .tokens_in = s->tokens_in,
                                        .tokens_out = s->tokens_out,
                                        .gpu_seconds = s->gpu_s}};
    wk_conn_send(w, &u);
    if (strcmp(st, "done") == 0) {
        struct sp_wire_frame f = {.type = SP_WIRE_DONE,
                                  .done = {.shard_id = s->id,
                                           .lease_token = s->token,
                                           .succeeded = s->succeeded,
                                           .failed = s->failed}};
        wk_conn_send(w, &f);
    } else if (strcmp(st, "pending") == 0) {
        send_release(w, s, "requests wait for a retry");
    }
    shard_free(w, s);
}

/*
 * A shard with nothing in flight and nothing unwritten: release it (behind
 * its last writes on the database thread) and report when that is done.
 */
static void shard_finish(struct worker *w, struct wk_shard *s)
{
    char a[24], b[24];
    u64s(a, s->id);
    u64s(b, s->token);
    const char *p[3] = {a, b, "done"};
    struct shard_ref *ref = malloc(sizeof(*ref));
    if (!ref)
        return; /* out of memory: tried again at the next flush */
    *ref = (struct shard_ref){s->id, s->token};
    if (wk_db_submit(w, "SELECT spool.release_shard($1, $2, $3)", 3, p, on_released, ref)) {
        free(ref);
        return;
    }
    s->finishing = true;
}

/* Releases s when it has nothing left: no sequence, result or write. */
static void maybe_finish(struct worker *w, struct wk_shard *s)
{
    if (s->n_inflight == 0 && json_array_size(s->results) == 0 && !s->writing &&
        !s->ckpt_inflight && !s->finishing && !s->starting && !w->draining)
        shard_finish(w, s);
}

/* ---- Results ---- */

static void add_result(struct wk_shard *s, json_t *res)
{
    json_array_append_new(s->results, res);
}

static void add_failure(struct worker *w, struct wk_shard *s, uint64_t id, const char *state,
                        const char *error)
{
    add_result(s, json_pack("{s:I, s:s, s:s, s:I}", "id", (json_int_t)id, "state", state, "error",
                            error, "model_id", (json_int_t)w->model_id));
    if (strcmp(state, "failed") == 0)
        s->failed++;
}

static void shard_flush(struct worker *w, struct wk_shard *s);

/* A complete_requests write in flight: its shard and the results it carries. */
struct flush_op {
    struct shard_ref ref;
    json_t *batch;
};

static void on_flushed(struct worker *w, int rc, PGresult *res, bool conn_ok, const char *err,
                       void *arg)
{
    (void)res;
    struct flush_op *fo = arg;
    struct wk_shard *s = find_shard(w, fo->ref.id, fo->ref.token);
    json_t *batch = fo->batch;
    free(fo);
    if (!s) { /* lost or revoked meanwhile: its results are dropped */
        json_decref(batch);
        return;
    }
    s->writing = false;
    if (rc == SP_ESTATE) {
        json_decref(batch);
        shard_lost(w, s, err);
        return;
    }
    if (rc) {
        /* Back in front of what finished meanwhile, for the next try. */
        json_array_extend(batch, s->results);
        json_decref(s->results);
        s->results = batch;
        if (conn_ok && ++s->write_failures >= 3) {
            /*
             * The server refuses these results themselves (not the
             * connection): store each request as failed with the server's
             * reason rather than retrying for ever.
             */
            sp_error("shard %" PRIu64 ": the database refuses %zu results (%s); failing them",
                     s->id, json_array_size(s->results), err);
            json_t *old = s->results;
            s->results = json_array();
            size_t i;
            json_t *r;
            char msg[700];
            snprintf(msg, sizeof(msg), "the result could not be stored: %s", err);
            json_array_foreach(old, i, r)
            {
                const char *st = json_string_value(json_object_get(r, "state"));
                if (st && strcmp(st, "succeeded") == 0) {
                    s->succeeded--;
                    s->failed++;
                }
                add_result(s, json_pack("{s:O, s:s, s:s}", "id", json_object_get(r, "id"), "state",
                                        "failed", "error", msg));
            }
            json_decref(old);
            shard_flush(w, s);
        } else {
            sp_warn("shard %" PRIu64 ": writing %zu results failed (will retry): %s", s->id,
                    json_array_size(s->results), err);
        }
        return;
    }
    json_decref(batch);
    s->write_failures = 0;
    struct sp_wire_frame f = {.type = SP_WIRE_PROGRESS,
                              .progress = {.shard_id = s->id,
                                           .lease_token = s->token,
                                           .requests_done = s->succeeded + s->failed,
                                           .tokens_out = s->tokens_out}};
    wk_conn_send(w, &f);
    if (json_array_size(s->results) >= WK_FLUSH_RESULTS)
        shard_flush(w, s);
    else
        maybe_finish(w, s);
}

/*
 * Submits s's unwritten results in one complete_requests, unless a write of
 * s is still in flight (one at a time per shard: a refusal puts its results
 * back in front, and the next write carries them with the newer ones).
 */
static void shard_flush(struct worker *w, struct wk_shard *s)
{
    if (s->writing || s->finishing || json_array_size(s->results) == 0)
        return;
    char a[24], b[24];
    u64s(a, s->id);
    u64s(b, s->token);
    char *js = json_dumps(s->results, JSON_COMPACT);
    struct flush_op *fo = malloc(sizeof(*fo));
    json_t *batch = json_array();
    const char *p[3] = {a, b, js};
    if (!js || !fo || !batch ||
        wk_db_submit(w, "SELECT spool.complete_requests($1, $2, $3::jsonb)", 3, p, on_flushed,
                     fo)) {
        free(js); /* out of memory: tried again at the next flush */
        free(fo);
        json_decref(batch);
        return;
    }
    free(js);
    fo->ref = (struct shard_ref){s->id, s->token};
    fo->batch = s->results;
    s->results = batch;
    s->writing = true;
}

void wk_shards_flush(struct worker *w)
{
    struct wk_shard *next;
    for (struct wk_shard *s = w->shards; s; s = next) {
        next = s->next;
        shard_flush(w, s);
        maybe_finish(w, s);
    }
}

/* ---- Checkpoints ---- */

/* A checkpoint_requests write in flight: per sequence, the token count it saves. */
struct ckpt_op {
    struct shard_ref ref;
    long *unsaved; /* the drain's count of tokens left unsaved, or NULL */
    size_t n;
    struct {
        uint64_t req_id;
        int n;
    } seqs[];
};

/* Stepping waited for a checkpoint's commit (ckpt_blocks): it goes on. */
static void ckpt_resume(struct worker *w)
{
    if (w->ckpt_wait) {
        w->ckpt_wait = false;
        wk_shards_kick(w);
    }
}

static void on_checkpointed(struct worker *w, int rc, PGresult *res, bool conn_ok, const char *err,
                            void *arg)
{
    (void)res;
    (void)conn_ok;
    struct ckpt_op *co = arg;
    struct wk_shard *s = find_shard(w, co->ref.id, co->ref.token);
    if (!s) {
        free(co);
        ckpt_resume(w);
        return;
    }
    s->ckpt_inflight = false;
    if (rc == SP_ESTATE) {
        free(co);
        shard_lost(w, s, err);
        ckpt_resume(w);
        return;
    }
    if (rc) {
        sp_warn("shard %" PRIu64 ": checkpoint failed: %s", s->id, err);
        s->ckpt_failed_ms = uv_now(w->loop);
        if (!s->ckpt_failed_ms)
            s->ckpt_failed_ms = 1;
    } else {
        s->ckpt_failed_ms = 0;
    }
    for (struct wk_seq *q = s->seqs; q; q = q->next) {
        for (size_t i = 0; i < co->n; i++) {
            if (co->seqs[i].req_id != q->req_id)
                continue;
            if (rc == 0 && co->seqs[i].n > q->n_ckpt)
                q->n_ckpt = co->seqs[i].n;
            break;
        }
        if (rc && co->unsaved && w->eng) {
            int n = 0;
            se_engine_seq_tokens(w->eng, q->seq, &n);
            *co->unsaved += n - q->n_ckpt;
        }
    }
    free(co);
    ckpt_resume(w);
    maybe_finish(w, s);
}

/*
 * Submits the generated tokens of s's sequences that moved on since their
 * last checkpoint, unless a checkpoint of s is in flight. unsaved (the
 * drain's count) gets the tokens of a checkpoint that fails.
 */
static void shard_checkpoint(struct worker *w, struct wk_shard *s, long *unsaved)
{
    if (s->ckpt_inflight || s->finishing || !w->eng)
        return;
    s->ckpt_due = false;
    json_t *arr = json_array();
    struct ckpt_op *co = malloc(sizeof(*co) + (size_t)s->n_inflight * sizeof(co->seqs[0]));
    if (!arr || !co)
        goto oom;
    co->n = 0;
    co->unsaved = unsaved;
    co->ref = (struct shard_ref){s->id, s->token};
    for (struct wk_seq *q = s->seqs; q; q = q->next) {
        int n = 0;
        const int32_t *t = se_engine_seq_tokens(w->eng, q->seq, &n);
        if (!t || n <= q->n_ckpt)
            continue;
        json_t *ids = json_array();
        for (int i = 0; i < n; i++)
            json_array_append_new(ids, json_integer(t[i]));
        json_array_append_new(arr,
                              json_pack("{s:I, s:o}", "id", (json_int_t)q->req_id, "tokens", ids));
        co->seqs[co->n].req_id = q->req_id;
        co->seqs[co->n].n = n;
        co->n++;
    }
    if (co->n == 0) {
        json_decref(arr);
        free(co);
        return;
    }
    char a[24], b[24];
    u64s(a, s->id);
    u64s(b, s->token);
    char *js = json_dumps(arr, JSON_COMPACT);
    json_decref(arr);
    arr = NULL;
    const char *p[3] = {a, b, js};
    int rc = js ? wk_db_submit(w, "SELECT spool.checkpoint_requests($1, $2, $3::jsonb)", 3, p,
                               on_checkpointed, co)
                : SP_ENOMEM;
    free(js);
    if (rc)
        goto oom;
    s->ckpt_inflight = true;
    return;
oom:
    sp_warn("shard %" PRIu64 ": checkpoint failed: out of memory", s->id);
    if (unsaved)
        for (struct wk_seq *q = s->seqs; q; q = q->next)
            *unsaved += q->n_gen - q->n_ckpt;
    json_decref(arr);
    free(co);
}

void wk_shards_checkpoint(struct worker *w, bool all)
{
    struct wk_shard *next;
    for (struct wk_shard *s = w->shards; s; s = next) {
        next = s->next;
        if (all || s->ckpt_due)
            shard_checkpoint(w, s, NULL);
    }
}

/*
 * The recompute bound: a sequence never has more than --checkpoint-tokens
 * generated tokens without a committed checkpoint. Checkpoints are written
 * early (at 3/4 of it), so the engine rarely waits; but while a sequence is
 * at the bound and its checkpoint is in flight, the next step waits for the
 * commit (on_checkpointed resumes stepping). After a failed checkpoint the
 * engine goes on for a second (as it would with the database away).
 */
static bool ckpt_blocks(struct worker *w)
{
    int k = w->cfg.checkpoint_tokens;
    uint64_t now = uv_now(w->loop);
    for (struct wk_shard *s = w->shards; s; s = s->next) {
        if (s->ckpt_failed_ms && now - s->ckpt_failed_ms < 1000)
            continue;
        for (struct wk_seq *q = s->seqs; q; q = q->next) {
            if (q->n_gen - q->n_ckpt < k)
                continue;
            shard_checkpoint(w, s, NULL);
            if (s->ckpt_inflight)
                return true;
            break;
        }
    }
    return false;
}

/* ---- Stepping ---- */

static void finish_seq(struct worker *w, struct wk_seq *q, const struct se_event *ev)
{
    struct wk_shard *s = q->shard;
    shard_unlink_seq(s, q);
    int n = 0;
    const int32_t *t = se_engine_seq_tokens(w->eng, q->seq, &n);
    json_t *ids = json_array();
    for (int i = 0; t && i < n; i++)
        json_array_append_new(ids, json_integer(t[i]));
    double cost = w->cfg.price_per_hour * q->gpu_s / 3600.0;
    json_t *res =
        json_pack("{s:I, s:s, s:s%, s:o, s:s, s:i, s:i, s:f, s:f, s:I}", "id",
                  (json_int_t)q->req_id, "state", "succeeded", "output", q->text ? q->text : "",
                  q->text_len, "output_tokens", ids, "finish_reason", se_finish_name(ev->finish),
                  "tokens_in", ev->n_prompt, "tokens_out", ev->n_generated, "gpu_seconds", q->gpu_s,
                  "cost", cost, "model_id", (json_int_t)w->model_id);
    add_result(s, res);
    s->succeeded++;
    s->tokens_in += (uint64_t)ev->n_prompt;
    s->tokens_out += (uint64_t)ev->n_generated;
    s->gpu_s += q->gpu_s;
    seq_free(q);
    if (json_array_size(s->results) >= WK_FLUSH_RESULTS)
        shard_flush(w, s);
}

static void free_orphan(struct worker *w, struct wk_seq *q)
{
    for (struct wk_seq **pp = &w->orphans; *pp; pp = &(*pp)->next) {
        if (*pp == q) {
            *pp = q->next;
            seq_free(q);
            return;
        }
    }
}

/*
 * The engine failed a step: every batch sequence in it ends as "retry", every
 * live one with finish_reason error, and the engine is reopened.
 */
static void engine_failed(struct worker *w, int rc)
{
    char msg[600];
    snprintf(msg, sizeof(msg), "engine step failed (%s): %s", sp_err_name(rc),
             se_engine_error(w->eng));
    sp_error("%s; requeueing every running request", msg);
    wk_live_end_all(w, "error", msg);
    for (struct wk_shard *s = w->shards; s; s = s->next) {
        while (s->seqs) {
            struct wk_seq *q = s->seqs;
            shard_unlink_seq(s, q);
            add_failure(w, s, q->req_id, "retry", msg);
            seq_free(q);
        }
    }
    while (w->orphans) {
        struct wk_seq *q = w->orphans;
        w->orphans = q->next;
        seq_free(q);
    }
    se_engine_close(w->eng);
    w->eng = NULL;
    wk_live_forget_all(w);
    struct se_engine_opts eo = {.n_threads = w->cfg.threads,
                                .max_seqs = w->cfg.max_batch,
                                .kv_bytes = w->cfg.kv_bytes,
                                .backend = w->cfg.backend,
                                .tok = w->tok};
    char err[512];
    if (se_engine_open(w->model, &eo, &w->eng, err, sizeof(err))) {
        sp_error("cannot reopen the engine: %s", err);
        wk_model_unload(w);
    }
    wk_shards_flush(w);
}

/* Divides the last step's wall time among its sequences by the tokens computed for each. */
static void charge_step(struct worker *w)
{
    /*
     * The step's time, by each sequence's work in it (gpu_time.c). Every
     * sequence listed is still alive here: one that finished in this step is
     * freed below, with its event. Live sequences carry a tagged pointer.
     */
    const struct se_step_usage *u = se_engine_last_usage(w->eng);
    long weight = wk_gpu_weight(u);
    for (int i = 0; i < u->n_seqs; i++) {
        const struct se_seq_usage *s = &u->seqs[i];
        double share = wk_gpu_share(u, weight, i);
        if (wk_tag_is_live(s->user)) {
            wk_live_charge((struct wk_live *)(uintptr_t)(s->user & ~WK_TAG_LIVE), share);
        } else {
            struct wk_seq *q = (struct wk_seq *)(uintptr_t)s->user;
            if (q->shard) /* not an orphan of a lost shard */
                q->gpu_s += share;
        }
    }
}

/*
 * True while the engine has sequences, or live requests ended early whose
 * cancel events are still to come (they free them; see live.c). Orphans of
 * lost shards are not counted: after a model swap their engine is gone, and
 * they wait for wk_shards_stop.
 */
static bool has_work(struct worker *w)
{
    return w->eng && (se_engine_n_active(w->eng) > 0 || w->n_lives > 0);
}

static void step(struct worker *w);

static void on_step_timer(uv_timer_t *t)
{
    step(t->data);
}

static void on_step_idle(uv_idle_t *h)
{
    step(h->data);
}

/* Stops stepping; wk_shards_kick starts it again. */
static void step_pause(struct worker *w)
{
    uv_idle_stop(&w->step_idle);
    uv_timer_stop(&w->step_timer);
    w->stepping = false;
}

/*
 * One engine step. Without a step delay it runs from an idle handle: once
 * per loop turn, each turn polling sockets first (without blocking), so a
 * LIVE_REQUEST or CANCEL that arrived during a step is handled before the
 * next one. (A 0 ms timer would not do: libuv runs a timer restarted from its
 * own callback again in the same pass, never polling in between.)
 */
static void step(struct worker *w)
{
    if (w->stopping || w->exiting || !w->eng) {
        step_pause(w);
        return;
    }
    if (ckpt_blocks(w)) {
        step_pause(w);
        w->ckpt_wait = true;
        return;
    }
    const struct se_event *ev;
    int n = se_engine_step(w->eng, &ev);
    if (n < 0) {
        step_pause(w);
        engine_failed(w, n);
        return;
    }
    w->n_steps++;
    charge_step(w);
    if (w->trace_fd >= 0) {
        for (int i = 0; i < n; i++) {
            if (wk_tag_is_live(ev[i].user))
                continue;
            const struct wk_seq *q = (const struct wk_seq *)(uintptr_t)ev[i].user;
            if (q->shard && ev[i].token >= 0)
                trace_add(w, q->req_id, 'G', ev[i].n_generated);
        }
        trace_flush(w);
    }
    /* Live events first: their frames go out before any batch bookkeeping. */
    for (int i = 0; i < n; i++)
        if (wk_tag_is_live(ev[i].user))
            wk_live_event(w, (struct wk_live *)(uintptr_t)(ev[i].user & ~WK_TAG_LIVE), &ev[i]);
    int early = w->cfg.checkpoint_tokens - w->cfg.checkpoint_tokens / 4;
    if (early >= w->cfg.checkpoint_tokens && early > 1)
        early--;
    for (int i = 0; i < n; i++) {
        if (wk_tag_is_live(ev[i].user))
            continue;
        struct wk_seq *q = (struct wk_seq *)(uintptr_t)ev[i].user;
        if (!q->shard) { /* cancelled with a lost shard */
            if (ev[i].finish != SE_FINISH_NONE)
                free_orphan(w, q);
            continue;
        }
        if (ev[i].n_generated > q->n_gen)
            q->n_gen = ev[i].n_generated;
        if (ev[i].text_len && !seq_append(q, ev[i].text, ev[i].text_len))
            sp_error("out of memory keeping the output of request %" PRIu64, q->req_id);
        if (ev[i].finish != SE_FINISH_NONE)
            finish_seq(w, q, &ev[i]);
        else if (q->n_gen - q->n_ckpt >= early)
            q->shard->ckpt_due = true;
    }
    wk_shards_checkpoint(w, false);
    if (!has_work(w)) {
        step_pause(w);
        wk_shards_flush(w);
    } else if (w->cfg.step_delay_ms > 0) {
        uv_timer_start(&w->step_timer, on_step_timer, (uint64_t)w->cfg.step_delay_ms, 0);
    }
}

void wk_shards_kick(struct worker *w)
{
    if (!w->stepping && !w->stopping && !w->exiting && has_work(w)) {
        w->stepping = true;
        if (w->cfg.step_delay_ms > 0)
            uv_timer_start(&w->step_timer, on_step_timer, 0, 0);
        else
            uv_idle_start(&w->step_idle, on_step_idle);
    }
}

/* ---- ASSIGN ---- */

/* Text of the resumed tokens, as the engine's streaming decoder has shown it. */
static bool prime_text(struct worker *w, struct wk_seq *q, const int32_t *ids, size_t n)
{
    se_detok_t *d = se_detok_new(w->tok, true);
    if (!d)
        return false;
    bool ok = true;
    for (size_t i = 0; ok && i < n; i++) {
        const char *piece;
        size_t len;
        ok = se_detok_push(d, ids[i], &piece, &len) == 0 && seq_append(q, piece, len);
    }
    se_detok_free(d);
    return ok;
}

/* Renders a messages array with the chat template; 0, or an error in err. */
static int render_chat(struct worker *w, json_t *msgs, char **text, char *err, size_t errcap)
{
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        snprintf(err, errcap, "messages must be a non-empty JSON array of {\"role\", \"content\"}");
        return SP_EINVAL;
    }
    size_t n = json_array_size(msgs);
    struct se_chat_msg *m = calloc(n, sizeof(*m));
    if (!m) {
        snprintf(err, errcap, "out of memory");
        return SP_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *o = json_array_get(msgs, i);
        json_t *r = json_object_get(o, "role"), *c = json_object_get(o, "content");
        if (!json_is_string(r) || !json_is_string(c)) {
            free(m);
            snprintf(err, errcap, "messages[%zu] needs string \"role\" and \"content\"", i);
            return SP_EINVAL;
        }
        m[i].role = json_string_value(r);
        m[i].content = json_string_value(c);
    }
    char e2[400];
    int rc = se_chat_render(w->tok, m, n, true, text, e2, sizeof(e2));
    free(m);
    if (rc)
        snprintf(err, errcap, "messages: %s", e2);
    return rc;
}

/*
 * Tokenizes and submits one request row; returns 0, or an error in err that
 * fails this request alone.
 */
static int submit_row(struct worker *w, struct wk_shard *s, json_t *jparams, uint64_t id,
                      const char *prompt, const char *messages, const char *params,
                      const char *ckpt, char *err, size_t errcap)
{
    json_t *rparams = NULL, *msgs = NULL, *cj = NULL;
    char *text = NULL;
    int32_t *ids = NULL, *resume = NULL;
    size_t n_ids = 0, n_resume = 0;
    struct wk_seq *q = NULL;
    int rc = 0;
    json_error_t je;
    if (params && !(rparams = json_loads(params, 0, &je))) {
        snprintf(err, errcap, "params is not valid JSON: %s", je.text);
        rc = SP_EINVAL;
        goto out;
    }
    struct se_sampling sp;
    if ((rc = wk_params_sampling(jparams, rparams, w->n_vocab, &sp, err, errcap)))
        goto out;
    bool chat = false;
    if (messages) {
        if (!(msgs = json_loads(messages, 0, &je))) {
            snprintf(err, errcap, "messages is not valid JSON: %s", je.text);
            rc = SP_EINVAL;
            goto out;
        }
        if ((rc = render_chat(w, msgs, &text, err, errcap)))
            goto out;
        chat = true;
    } else if (prompt) {
        if (!*prompt) {
            snprintf(err, errcap, "prompt is empty: give some text to continue");
            rc = SP_EINVAL;
            goto out;
        }
        text = strdup(prompt);
    } else {
        snprintf(err, errcap, "request has no input: set prompt (text) or messages (a JSON array)");
        rc = SP_EINVAL;
        goto out;
    }
    if (!text || se_tokenizer_encode(w->tok, text, strlen(text), !chat, &ids, &n_ids)) {
        snprintf(err, errcap, "cannot tokenize the prompt (out of memory)");
        rc = SP_ENOMEM;
        goto out;
    }
    if (n_ids == 0) {
        snprintf(err, errcap, "prompt encodes to no tokens: give some text to continue");
        rc = SP_EINVAL;
        goto out;
    }
    if (n_ids >= (size_t)w->n_ctx) {
        snprintf(err, errcap,
                 "prompt is %zu tokens, longer than the model's context of %d tokens (leave room "
                 "for the output): shorten it",
                 n_ids, w->n_ctx);
        rc = SP_ECONTEXT;
        goto out;
    }
    if (ckpt && (cj = json_loads(ckpt, 0, &je)) && json_is_array(cj) && json_array_size(cj) > 0) {
        n_resume = json_array_size(cj);
        resume = malloc(n_resume * sizeof(int32_t));
        if (!resume) {
            rc = SP_ENOMEM;
            snprintf(err, errcap, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < n_resume; i++)
            resume[i] = (int32_t)json_integer_value(json_array_get(cj, i));
    }
    q = calloc(1, sizeof(*q));
    if (!q || (n_resume && !prime_text(w, q, resume, n_resume))) {
        rc = SP_ENOMEM;
        snprintf(err, errcap, "out of memory");
        goto out;
    }
    q->req_id = id;
    q->shard = s;
    q->n_prompt = (int)n_ids;
    q->n_ckpt = (int)n_resume;
    q->n_gen = (int)n_resume;
    struct se_seq_params p = {.prompt = ids,
                              .n_prompt = n_ids,
                              .resume = resume,
                              .n_resume = n_resume,
                              .sampling = sp,
                              .user = (uint64_t)(uintptr_t)q};
    char e2[400];
    if ((rc = se_engine_submit(w->eng, &p, &q->seq, e2, sizeof(e2)))) {
        snprintf(err, errcap, "%s", e2);
        goto out;
    }
    q->next = s->seqs;
    s->seqs = q;
    s->n_inflight++;
    trace_add(w, id, 'S', (int)n_resume);
    q = NULL;
out:
    seq_free(q);
    json_decref(rparams);
    json_decref(msgs);
    json_decref(cj);
    free(text);
    free(ids);
    free(resume);
    return rc;
}

static void refuse(struct worker *w, uint64_t shard_id, uint64_t token, const char *why)
{
    char st[32];
    sp_error("shard %" PRIu64 " refused: %s", shard_id, why);
    release_db(w, shard_id, token, why, st, sizeof(st));
    char reason[700];
    snprintf(reason, sizeof(reason), "model_unavailable: %s", why);
    struct sp_wire_frame f = {
        .type = SP_WIRE_RELEASE,
        .release = {.shard_id = shard_id, .lease_token = token, .reason = reason}};
    wk_conn_send(w, &f);
}

/*
 * An ASSIGN being started, through three statements on the database thread:
 * the job's params and pinned digest, start_requests, then the rows. The
 * shard is in w->shards from the start (marked starting, so nothing
 * finishes it), so a REVOKE meanwhile finds and drops it; each callback
 * finds it again by id and lease token.
 */
struct start_op {
    struct shard_ref ref;
    char digest[72];
    json_t *jparams;
    bool started;     /* start_requests succeeded */
    bool rows_queued; /* on_rows will come (and free this) */
};

static void start_op_free(struct start_op *so)
{
    json_decref(so->jparams);
    free(so);
}

/* The start failed: give the shard back. */
static void start_failed(struct worker *w, struct wk_shard *s, int rc, const char *err)
{
    if (rc == SP_ESTATE) {
        shard_lost(w, s, err);
        return;
    }
    sp_error("shard %" PRIu64 ": cannot read its requests: %s", s->id, err);
    char st[32];
    release_db(w, s->id, s->token, "error", st, sizeof(st));
    send_release(w, s, "error: cannot read the shard's requests");
    shard_free(w, s);
}

static void on_rows(struct worker *w, int rc, PGresult *r, bool conn_ok, const char *err, void *arg)
{
    (void)conn_ok;
    struct start_op *so = arg;
    struct wk_shard *s = find_shard(w, so->ref.id, so->ref.token);
    if (!s || !so->started) { /* lost, or start_requests failed (handled there) */
        start_op_free(so);
        return;
    }
    s->starting = false;
    if (rc) {
        start_failed(w, s, rc, err);
        start_op_free(so);
        return;
    }
    if (w->draining || !w->eng) {
        /* A drain began meanwhile: it releases the shard, its requests untouched. */
        start_op_free(so);
        return;
    }
    char e[1024];
    int rows = PQntuples(r), n_resumed = 0;
    for (int i = 0; i < rows; i++) {
        uint64_t id = strtoull(PQgetvalue(r, i, 0), NULL, 10);
#define COL(c) (PQgetisnull(r, i, c) ? NULL : PQgetvalue(r, i, c))
        const char *ck = COL(4);
        if (submit_row(w, s, so->jparams, id, COL(1), COL(2), COL(3), ck, e, sizeof(e)))
            add_failure(w, s, id, "failed", e);
        else if (ck)
            n_resumed++;
#undef COL
    }
    trace_flush(w);
    start_op_free(so);
    sp_info("shard %" PRIu64 ": %d requests started (%d resumed from checkpoints), %" PRIu64
            " refused",
            s->id, s->n_inflight, n_resumed, s->failed);
    if (s->n_inflight == 0) {
        shard_flush(w, s);
        maybe_finish(w, s);
    }
    wk_shards_kick(w);
}

static void on_started(struct worker *w, int rc, PGresult *r, bool conn_ok, const char *err,
                       void *arg)
{
    (void)r;
    (void)conn_ok;
    struct start_op *so = arg;
    struct wk_shard *s = find_shard(w, so->ref.id, so->ref.token);
    if (s && rc) {
        s->starting = false;
        start_failed(w, s, rc, err);
    } else if (s) {
        so->started = true;
    }
    if (!so->rows_queued) /* the read could not be queued: on_rows never comes */
        start_op_free(so);
}

static void on_job(struct worker *w, int rc, PGresult *r, bool conn_ok, const char *err, void *arg)
{
    (void)conn_ok;
    struct start_op *so = arg;
    struct wk_shard *s = find_shard(w, so->ref.id, so->ref.token);
    char e[1024];
    if (!s) {
        start_op_free(so);
        return;
    }
    if (rc || PQntuples(r) != 1 || strcmp(PQgetvalue(r, 0, 1), so->digest) != 0) {
        if (rc)
            snprintf(e, sizeof(e), "%s", err);
        else if (PQntuples(r) != 1)
            snprintf(e, sizeof(e), "job %" PRIu64 " does not exist", s->job_id);
        else
            snprintf(e, sizeof(e), "job %" PRIu64 " is pinned to %s, but ASSIGN names %s",
                     s->job_id, PQgetvalue(r, 0, 1), so->digest);
        uint64_t id = s->id, token = s->token;
        shard_free(w, s);
        start_op_free(so);
        refuse(w, id, token, e);
        return;
    }
    if (w->draining) {
        s->starting = false; /* the drain releases it */
        start_op_free(so);
        return;
    }
    so->jparams = json_loads(PQgetvalue(r, 0, 0), 0, NULL);
    char a1[24], a2[24];
    u64s(a1, s->id);
    u64s(a2, s->token);
    const char *p2[2] = {a1, a2};
    /* Both at once: the FIFO runs the read after start_requests, and on_rows checks it. */
    if (wk_db_submit(w,
                     "SELECT spool.start_requests($1, $2, ARRAY(SELECT r.id FROM spool.requests r "
                     "JOIN spool.shards s ON s.id = $1 WHERE r.job_id = s.job_id AND r.id BETWEEN "
                     "s.first_request_id AND s.last_request_id AND r.state = 'pending'))",
                     2, p2, on_started, so)) {
        /* Out of memory: the lease expires and the shard goes to another worker. */
        sp_error("out of memory starting shard %" PRIu64, s->id);
        shard_free(w, s);
        start_op_free(so);
        return;
    }
    if (wk_db_submit(w,
                     "SELECT r.id, r.prompt, r.messages::text, r.params::text, "
                     "array_to_json(r.checkpoint)::text FROM spool.requests r JOIN "
                     "spool.shards s ON s.id = $1 AND s.lease_token = $2 WHERE r.job_id = "
                     "s.job_id AND r.id BETWEEN s.first_request_id AND s.last_request_id AND "
                     "r.state = 'running' ORDER BY r.id",
                     2, p2, on_rows, so) == 0) {
        so->rows_queued = true;
    } else {
        sp_error("out of memory starting shard %" PRIu64, s->id);
        shard_free(w, s); /* on_started frees so */
    }
}

void wk_shard_assign(struct worker *w, const struct sp_wire_assign *a)
{
    char err[1024], a3[24];
    sp_info("ASSIGN shard %" PRIu64 " of job %" PRIu64 " (lease %" PRIu64 ", model %s@%u %s)",
            a->shard_id, a->job_id, a->lease_token, a->model.name, a->model.version,
            a->model.digest);
    if (w->draining) {
        struct wk_shard tmp = {.id = a->shard_id, .token = a->lease_token};
        char st[32];
        release_db(w, a->shard_id, a->lease_token, "draining", st, sizeof(st));
        send_release(w, &tmp, "draining");
        return;
    }
    int rc = wk_model_load(w, a->model.digest, err, sizeof(err));
    if (rc) {
        refuse(w, a->shard_id, a->lease_token, err);
        return;
    }
    struct wk_shard *s = calloc(1, sizeof(*s));
    struct start_op *so = calloc(1, sizeof(*so));
    if (!s || !so || !(s->results = json_array())) {
        free(s);
        free(so);
        sp_error("out of memory taking shard %" PRIu64, a->shard_id);
        return;
    }
    s->id = a->shard_id;
    s->job_id = a->job_id;
    s->token = a->lease_token;
    s->starting = true;
    so->ref = (struct shard_ref){s->id, s->token};
    snprintf(so->digest, sizeof(so->digest), "%s", a->model.digest);
    u64s(a3, a->job_id);
    /* The job must be pinned to the version the scheduler named (checked in on_job). */
    const char *pj[1] = {a3};
    if (wk_db_submit(w,
                     "SELECT j.params::text, 'sha256:' || m.digest FROM spool.jobs j "
                     "JOIN spool.models m ON m.id = j.model_id WHERE j.id = $1",
                     1, pj, on_job, so)) {
        json_decref(s->results);
        free(s);
        free(so);
        sp_error("out of memory taking shard %" PRIu64, a->shard_id);
        return;
    }
    s->next = w->shards;
    w->shards = s;
}

/* ---- Drain ---- */

void wk_shards_release_all(struct worker *w, const char *reason, int *n_seqs, long *tokens_lost,
                           int *n_shards)
{
    *n_seqs = 0;
    *tokens_lost = 0;
    *n_shards = 0;
    /*
     * In order, each phase waited for: what was already submitted (a refusal
     * loses its shard), the unwritten results, a checkpoint of every
     * in-flight sequence, then the releases. The loop is held meanwhile, as
     * a drain has nothing better to do.
     */
    wk_db_settle(w);
    for (struct wk_shard *s = w->shards; s; s = s->next)
        shard_flush(w, s);
    wk_db_settle(w);
    for (struct wk_shard *s = w->shards; s; s = s->next)
        shard_checkpoint(w, s, tokens_lost);
    wk_db_settle(w);
    while (w->shards) {
        struct wk_shard *s = w->shards;
        int inflight = s->n_inflight;
        *n_seqs += inflight;
        shard_cancel_seqs(w, s);
        char st[32];
        release_db(w, s->id, s->token, reason, st, sizeof(st));
        sp_info("shard %" PRIu64 " released (%s): %d sequences checkpointed; now %s", s->id, reason,
                inflight, st);
        if (strcmp(st, "done") == 0) {
            struct sp_wire_frame f = {.type = SP_WIRE_DONE,
                                      .done = {.shard_id = s->id,
                                               .lease_token = s->token,
                                               .succeeded = s->succeeded,
                                               .failed = s->failed}};
            wk_conn_send(w, &f);
        } else {
            send_release(w, s, reason);
        }
        (*n_shards)++;
        shard_free(w, s);
    }
}

/* ---- Set-up ---- */

static void on_flush(uv_timer_t *t)
{
    wk_shards_flush(t->data);
}

static void on_ckpt(uv_timer_t *t)
{
    wk_shards_checkpoint(t->data, true);
}

void wk_shards_start(struct worker *w)
{
    uv_timer_init(w->loop, &w->step_timer);
    uv_idle_init(w->loop, &w->step_idle);
    w->step_idle.data = w;
    uv_timer_init(w->loop, &w->flush_timer);
    uv_timer_init(w->loop, &w->ckpt_timer);
    w->step_timer.data = w->flush_timer.data = w->ckpt_timer.data = w;
    uv_timer_start(&w->flush_timer, on_flush, WK_FLUSH_MS, WK_FLUSH_MS);
    uint64_t ck = (uint64_t)(w->cfg.checkpoint_seconds * 1000);
    if (ck)
        uv_timer_start(&w->ckpt_timer, on_ckpt, ck, ck);
    w->trace_fd = -1;
    const char *trace = getenv("SPOOL_WORKER_TRACE");
    if (trace && *trace) {
        w->trace_fd = open(trace, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (w->trace_fd < 0)
            sp_warn("SPOOL_WORKER_TRACE: cannot open %s: %s", trace, strerror(errno));
    }
}

void wk_shards_stop(struct worker *w)
{
    uv_close((uv_handle_t *)&w->step_timer, NULL);
    uv_close((uv_handle_t *)&w->step_idle, NULL);
    uv_close((uv_handle_t *)&w->flush_timer, NULL);
    uv_close((uv_handle_t *)&w->ckpt_timer, NULL);
    trace_flush(w);
    if (w->trace_fd >= 0)
        close(w->trace_fd);
    w->trace_fd = -1;
    while (w->shards) {
        struct wk_shard *s = w->shards;
        while (s->seqs) {
            struct wk_seq *q = s->seqs;
            shard_unlink_seq(s, q);
            seq_free(q);
        }
        shard_free(w, s);
    }
    while (w->orphans) {
        struct wk_seq *q = w->orphans;
        w->orphans = q->next;
        seq_free(q);
    }
}

void wk_shards_load(struct worker *w, struct sp_wire_heartbeat *hb)
{
    *hb = (struct sp_wire_heartbeat){.worker_id = hb->worker_id};
    struct se_engine_stats st;
    int running = 0, queued = 0;
    if (w->eng && se_engine_stats(w->eng, &st) == 0) {
        running = st.n_running;
        queued = st.n_waiting;
        /* Cached blocks hold a prefix-cache entry nobody uses: they are taken when needed. */
        hb->kv_blocks_free = (uint32_t)(st.n_blocks_free + st.n_blocks_cached);
        hb->kv_blocks_total = (uint32_t)st.n_blocks;
    } else if (w->eng) {
        sp_error("engine accounting: %s", se_engine_error(w->eng));
        running = se_engine_n_active(w->eng);
    }
    hb->running = (uint32_t)running;
    hb->queued = (uint32_t)queued;
    int free_slots = w->cfg.max_batch - running - queued;
    hb->free_slots = free_slots > 0 ? (uint32_t)free_slots : 0;
}
