/*
 * Live requests: the scheduler sends LIVE_REQUEST, the worker streams TOKENS
 * back as the engine produces them and ends each request with a TOKENS frame
 * carrying its finish reason, then USAGE. docs/protocol.md has the frames;
 * docs/architecture.md ("The worker's live path") the rules.
 *
 * A live request enters the same engine as the batch shards, in the live
 * priority class: it is admitted ahead of waiting batch sequences, preempts
 * running batch ones (by recompute) when slots or KV blocks are short, and its
 * tokens are scheduled first in every step, so it overtakes the batch work
 * already running. Nothing on this path touches PostgreSQL: frames are sent
 * from the step's events before the shard runner writes anything.
 *
 * Every request ends exactly one way: refused at once with ERROR
 * {request_id, code, message} (nothing else is sent for it), or, once
 * accepted, a last TOKENS whose finish_reason is stop, length, cancelled or
 * error, followed by one USAGE.
 *
 * Lifetime of a struct wk_live: created on LIVE_REQUEST, linked in w->lives;
 * its engine sequence carries it as a tagged pointer (WK_TAG_LIVE). When the
 * engine reports its end, it is freed. When it ends early (CANCEL, a lost
 * connection, a drain) it is cancelled in the engine and marked `ended`: its
 * final frames are sent at once, and it is freed when the engine delivers
 * the cancelled sequence's event (the next step), so the tag never dangles.
 * wk_live_forget_all frees the rest when the engine itself is closed.
 */
#include "worker.h"

#include "spool/error.h"
#include "spool/log.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct wk_live {
    uint64_t id;   /* request_id */
    int32_t seq;   /* engine id */
    bool ended;    /* its last frames are sent (or cannot be): awaiting the engine's event */
    bool logprobs; /* the request asked for logprobs: send each token's */
    int n_prompt, n_generated;
    double gpu_s;         /* attributed step time, seconds */
    uint64_t step_in;     /* w->n_steps when it arrived */
    uint64_t first_steps; /* steps from arrival to its first token; 0 before that token */
    double t_in, t_first; /* monotonic seconds: arrival, first token */
    struct wk_live *next;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void unlink_free(struct worker *w, struct wk_live *q)
{
    for (struct wk_live **pp = &w->lives; *pp; pp = &(*pp)->next) {
        if (*pp == q) {
            *pp = q->next;
            w->n_lives--;
            break;
        }
    }
    free(q);
}

/* The wire's finish_reason for an engine finish. */
static const char *finish_reason(enum se_finish f)
{
    switch (f) {
    case SE_FINISH_EOS:
    case SE_FINISH_STOP:
    case SE_FINISH_STOP_STRING:
        return "stop";
    case SE_FINISH_LENGTH:
        return "length";
    case SE_FINISH_CANCELED:
        return "cancelled";
    case SE_FINISH_NONE:
        break;
    }
    return NULL;
}

/* The request's last frames: TOKENS with no tokens and the finish reason, then USAGE. */
static void send_end(struct worker *w, struct wk_live *q, const char *finish)
{
    struct sp_wire_frame t = {.type = SP_WIRE_TOKENS,
                              .tokens = {.request_id = q->id, .text = "", .finish_reason = finish}};
    wk_conn_send(w, &t);
    struct sp_wire_frame u = {.type = SP_WIRE_USAGE,
                              .usage = {.has_request_id = true,
                                        .request_id = q->id,
                                        .tokens_in = (uint64_t)q->n_prompt,
                                        .tokens_out = (uint64_t)q->n_generated,
                                        .gpu_seconds = q->gpu_s}};
    wk_conn_send(w, &u);
}

/* One line per request when it ends: the operator's record, and what the tests read. */
static void log_end(struct wk_live *q, const char *finish)
{
    double t = now_s();
    if (q->first_steps)
        sp_info("live request %" PRIu64 " %s: %d prompt tokens, %d generated, first token after "
                "%" PRIu64 " steps (%.1f ms), %.1f ms in all, %.4f gpu s",
                q->id, finish, q->n_prompt, q->n_generated, q->first_steps,
                (q->t_first - q->t_in) * 1e3, (t - q->t_in) * 1e3, q->gpu_s);
    else
        sp_info("live request %" PRIu64 " %s: %d prompt tokens, no token generated, %.1f ms in all",
                q->id, finish, q->n_prompt, (t - q->t_in) * 1e3);
}

void wk_live_charge(struct wk_live *q, double seconds)
{
    q->gpu_s += seconds;
}

void wk_live_event(struct worker *w, struct wk_live *q, const struct se_event *ev)
{
    if (q->ended) {
        if (ev->finish != SE_FINISH_NONE)
            unlink_free(w, q);
        return;
    }
    if (ev->token < 0 && ev->finish == SE_FINISH_NONE)
        return; /* a preemption: it is recomputed, its output so far stands */
    q->n_prompt = ev->n_prompt;
    q->n_generated = ev->n_generated;
    int32_t token = ev->token;
    float logprob = ev->logprob;
    bool has = token >= 0;
    if (has && !q->first_steps) {
        q->first_steps = w->n_steps - q->step_in;
        q->t_first = now_s();
    }
    const char *finish = finish_reason(ev->finish);
    struct sp_wire_frame f = {.type = SP_WIRE_TOKENS,
                              .tokens = {.request_id = q->id,
                                         .token_ids = has ? &token : NULL,
                                         .n_token_ids = has ? 1 : 0,
                                         .text = ev->text ? ev->text : "",
                                         .text_len = ev->text ? ev->text_len : 0,
                                         .finish_reason = finish,
                                         .logprobs = has && q->logprobs ? &logprob : NULL,
                                         .n_logprobs = has && q->logprobs ? 1 : 0}};
    wk_conn_send(w, &f);
    if (!finish)
        return;
    struct sp_wire_frame u = {.type = SP_WIRE_USAGE,
                              .usage = {.has_request_id = true,
                                        .request_id = q->id,
                                        .tokens_in = (uint64_t)q->n_prompt,
                                        .tokens_out = (uint64_t)q->n_generated,
                                        .gpu_seconds = q->gpu_s}};
    wk_conn_send(w, &u);
    log_end(q, finish);
    unlink_free(w, q);
}

/* Ends q early: cancelled in the engine, final frames sent when finish is set. */
static void end_early(struct worker *w, struct wk_live *q, const char *finish)
{
    q->ended = true;
    if (w->eng)
        se_engine_cancel(w->eng, q->seq);
    if (finish)
        send_end(w, q, finish);
    log_end(q, finish ? finish : "dropped");
}

void wk_live_cancel(struct worker *w, uint64_t request_id)
{
    for (struct wk_live *q = w->lives; q; q = q->next) {
        if (q->id == request_id && !q->ended) {
            end_early(w, q, "cancelled");
            wk_shards_kick(w); /* delivers the cancelled sequence's event, which frees q */
            return;
        }
    }
    sp_debug("CANCEL of live request %" PRIu64 ", which is not running here", request_id);
}

void wk_live_end_all(struct worker *w, const char *finish, const char *why)
{
    int n = 0;
    for (struct wk_live *q = w->lives; q; q = q->next) {
        if (!q->ended) {
            end_early(w, q, finish);
            n++;
        }
    }
    if (n)
        sp_warn("%d live requests ended (%s)", n, why);
}

void wk_live_forget_all(struct worker *w)
{
    while (w->lives) {
        struct wk_live *q = w->lives;
        w->lives = q->next;
        free(q);
    }
    w->n_lives = 0;
}

/* ---- LIVE_REQUEST ---- */

static int fail(char *err, size_t errcap, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t errcap, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errcap, fmt, ap);
    va_end(ap);
    return code;
}

/* Renders a chat with the model's template (adding the assistant's turn) into prompt ids. */
static int chat_ids(struct worker *w, const struct sp_wire_live_request *r, int32_t **ids,
                    size_t *n, char *err, size_t errcap)
{
    if (!r->prompt.is_text || r->prompt.text_len != 0)
        return fail(err, errcap, SP_EINVAL,
                    "prompt must be empty text when messages is given (a chat is rendered from "
                    "messages alone)");
    struct se_chat_msg *m = calloc(r->n_messages, sizeof(*m));
    if (!m)
        return fail(err, errcap, SP_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < r->n_messages; i++) {
        m[i].role = r->messages[i].role;
        m[i].content = r->messages[i].content;
    }
    char *text = NULL, e2[512];
    int rc = se_chat_render(w->tok, m, r->n_messages, true, &text, e2, sizeof(e2));
    free(m);
    if (rc)
        return fail(err, errcap, rc == SP_ENOMEM ? SP_ENOMEM : SP_EINVAL, "messages: %s", e2);
    /* As `spool generate --chat` does: the template writes the special tokens itself. */
    rc = se_tokenizer_encode(w->tok, text, strlen(text), false, ids, n);
    free(text);
    if (rc)
        return fail(err, errcap, rc, "cannot tokenize the rendered chat: %s", sp_strerror(rc));
    return 0;
}

/* Checks r and submits it; 0, or an SP_E* code with err saying what was wrong and what to do. */
static int start(struct worker *w, const struct sp_wire_live_request *r, char *err, size_t errcap)
{
    if (w->draining)
        return fail(err, errcap, SP_ESTATE,
                    "worker %s is draining and takes no new requests: send it to another worker",
                    w->cfg.name);
    if (!w->eng)
        return fail(err, errcap, SP_ENOENT,
                    "worker %s has no model loaded: start it with --model NAME to serve live "
                    "requests",
                    w->cfg.name);
    const struct sp_wire_model *m = &r->model;
    if (strcmp(m->name, w->model_name) != 0 || m->version != w->model_version ||
        (m->digest && strcmp(m->digest, w->digest) != 0))
        return fail(err, errcap, SP_ENOENT,
                    "model %s@%u%s%s is not loaded on worker %s, which runs %s@%u (%s): route the "
                    "request to a worker that has it",
                    m->name, m->version, m->digest ? " " : "", m->digest ? m->digest : "",
                    w->cfg.name, w->model_name, w->model_version, w->digest);
    for (struct wk_live *q = w->lives; q; q = q->next)
        if (q->id == r->request_id && !q->ended)
            return fail(err, errcap, SP_EEXIST,
                        "live request %" PRIu64 " is already running on this worker",
                        r->request_id);
    struct se_sampling sp;
    int rc = wk_params_wire(&r->sampling, w->n_vocab, &sp, err, errcap);
    if (rc)
        return rc;

    int32_t *ids = NULL;
    size_t n_ids = 0;
    const int32_t *prompt;
    if (r->n_messages) {
        if ((rc = chat_ids(w, r, &ids, &n_ids, err, errcap)))
            return rc;
        prompt = ids;
    } else if (r->prompt.is_text) {
        if (r->prompt.text_len == 0)
            return fail(err, errcap, SP_EINVAL,
                        "prompt is empty: give some text to continue, or messages for a chat");
        if ((rc = se_tokenizer_encode(w->tok, r->prompt.text, r->prompt.text_len, true, &ids,
                                      &n_ids)))
            return fail(err, errcap, rc, "cannot tokenize the prompt: %s", sp_strerror(rc));
        prompt = ids;
    } else {
        prompt = r->prompt.tokens;
        n_ids = r->prompt.n_tokens;
    }
    if (n_ids == 0) {
        free(ids);
        return fail(err, errcap, SP_EINVAL,
                    "prompt encodes to no tokens: give some text to continue");
    }
    if (n_ids >= (size_t)w->n_ctx) {
        free(ids);
        return fail(err, errcap, SP_ECONTEXT,
                    "prompt is %zu tokens, longer than the model's context of %d tokens (leave "
                    "room for the output): shorten it",
                    n_ids, w->n_ctx);
    }
    struct wk_live *q = calloc(1, sizeof(*q));
    if (!q) {
        free(ids);
        return fail(err, errcap, SP_ENOMEM, "out of memory");
    }
    q->id = r->request_id;
    q->logprobs = r->sampling.has_logprobs;
    q->n_prompt = (int)n_ids;
    q->step_in = w->n_steps;
    q->t_in = now_s();
    struct se_seq_params p = {.prompt = prompt,
                              .n_prompt = n_ids,
                              .sampling = sp,
                              .user = (uint64_t)(uintptr_t)q | WK_TAG_LIVE,
                              .priority = SE_PRIORITY_LIVE};
    char e2[512];
    rc = se_engine_submit(w->eng, &p, &q->seq, e2, sizeof(e2));
    free(ids);
    if (rc) {
        free(q);
        return fail(err, errcap, rc, "%s", e2);
    }
    q->next = w->lives;
    w->lives = q;
    w->n_lives++;
    return 0;
}

void wk_live_request(struct worker *w, const struct sp_wire_live_request *r)
{
    char err[1024];
    int rc = start(w, r, err, sizeof(err));
    if (rc) {
        sp_info("live request %" PRIu64 " refused (%s): %s", r->request_id, sp_err_name(rc), err);
        struct sp_wire_frame e = {.type = SP_WIRE_ERROR,
                                  .error = {.code = sp_err_name(rc),
                                            .message = err,
                                            .has_request_id = true,
                                            .request_id = r->request_id}};
        wk_conn_send(w, &e);
        return;
    }
    sp_debug("live request %" PRIu64 " started", r->request_id);
    wk_shards_kick(w);
}

/* ---- --model ---- */

int wk_live_load(struct worker *w, char *err, size_t errcap)
{
    const char *p[1] = {w->cfg.model_ref};
    PGresult *r;
    char e2[1024];
    int rc = wk_db_call(w,
                        "SELECT 'sha256:' || digest FROM spool.models WHERE id = "
                        "spool.resolve_model($1)",
                        1, p, &r, e2, sizeof(e2));
    if (rc)
        return fail(err, errcap, rc, "--model %s: %s", w->cfg.model_ref, e2);
    char digest[72];
    snprintf(digest, sizeof(digest), "%s", PQgetvalue(r, 0, 0));
    PQclear(r);
    snprintf(w->pinned, sizeof(w->pinned), "%s", digest);
    if ((rc = wk_model_load(w, digest, e2, sizeof(e2))))
        return fail(err, errcap, rc, "--model %s: %s", w->cfg.model_ref, e2);
    sp_info("serving live requests for %s@%u (%s, from --model %s); shards of other models are "
            "released",
            w->model_name, w->model_version, w->digest, w->cfg.model_ref);
    return 0;
}
