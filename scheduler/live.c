/*
 * The live lane, scheduler side: see live.h.
 *
 * A request's life:
 *
 *   validate --> resolve model (SQL, cached) --> pick worker --> LIVE_REQUEST
 *     --> TOKENS ... TOKENS(finish_reason) --> USAGE --> answer, live_finish
 *
 * Other endings: ERROR from the worker; the client leaving (CANCEL at
 * once); the request timeout (CANCEL, 504); the worker's connection lost
 * (502). Each ends in live_finish(), the one place where a finished request
 * is counted (metrics, the live-request log) and freed; frames that arrive
 * for a finished request find no request and are dropped.
 *
 * Streaming: each TOKENS frame becomes one SSE event, formatted into a
 * buffer that the request reuses (no allocation per token once it has
 * grown), from a prefix and suffix made once per request.
 */
#include "live.h"
#include "metrics.h"

#include <inttypes.h>
#include <stdarg.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

#include "auth.h"
#include "scheduler.h"
#include "spool/error.h"
#include "spool/log.h"

#define LIVE_PRIORITY    100  /* live work runs ahead of batch work on the worker */
#define MODEL_CACHE_MS   2000 /* a resolved model reference is reused this long */
#define MODEL_CACHE_SIZE 64
#define USAGE_WAIT_MS    2000 /* after the last TOKENS, how long USAGE may take */

static void handle_completions(struct sched *s, sh_call_t *c);
static void handle_chat(struct sched *s, sh_call_t *c);

const struct sh_route sched_live_routes[] = {
    {"POST", "/v1/completions", SCHED_SCOPE_INFERENCE, handle_completions},
    {"POST", "/v1/chat/completions", SCHED_SCOPE_INFERENCE, handle_chat},
};
const int sched_live_n_routes = sizeof sched_live_routes / sizeof sched_live_routes[0];

/* ---- State --------------------------------------------------------------- */

struct resolved {
    char ref[200];
    int64_t model_id;
    char name[132];
    uint32_t version;
    char digest[80]; /* "sha256:<hex>" as workers report it */
    uint64_t expires;
};

struct live_state {
    struct live_req *reqs; /* in flight */
    uint64_t next_id;
    struct resolved cache[MODEL_CACHE_SIZE];
    unsigned cache_next;
};

struct live_req {
    struct sched *s;
    struct live_req *prev, *next;
    sh_call_t *c; /* NULL once answered */
    json_t *body; /* the request (a reference), for the messages and prompt */
    uint64_t id;  /* request_id on the wire */
    bool chat, stream, include_usage;
    const char *endpoint;
    char cid[48]; /* "chatcmpl-..." / "cmpl-..." */
    int64_t created;
    double started; /* sh_started of the call */
    int64_t key_id;
    char tenant[72];
    struct sched_principal who; /* the caller, for settling its token bucket */
    uint32_t rate_tokens;       /* tokens taken from who's bucket at admission */
    bool rate_charged;
    bool resolving; /* a query holds the request */
    struct resolved model;
    char label[160]; /* "demo@3" */
    struct sp_wire_sampling sampling;
    const char *stop[4];
    struct sched_worker *w; /* referenced while sent */
    uv_timer_t timer;       /* request timeout, then the wait for USAGE */
    bool timer_on;
    bool sent, got_last, started_stream;
    char finish[16];
    uint32_t tokens_in, tokens_out;
    bool has_usage;
    double t_first; /* monotonic seconds of the first token, 0 before */
    double t_sent;  /* when LIVE_REQUEST was sent */
    int status;
    bool want_logprobs; /* the client asked for them (chat: logprobs, completions: logprobs N) */
    json_t *lp;         /* non-streaming: the logprobs gathered so far, in OpenAI's shape */
    size_t out_bytes;   /* text bytes generated so far (completions' text_offset) */
    char *text;         /* gathered text (non-streaming) */
    size_t text_len, text_cap;
    char *pre, *post; /* an SSE event's fixed parts, around the escaped text */
    char *ev;         /* the event being formatted */
    size_t ev_cap;
};

static struct live_state *state_of(struct sched *s)
{
    if (!s->live) {
        s->live = calloc(1, sizeof *s->live);
        srandom((unsigned)time(NULL) ^ (unsigned)getpid());
    }
    return s->live;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- Finishing ----------------------------------------------------------- */

static void free_req(uv_handle_t *h)
{
    struct live_req *r = h->data;
    json_decref(r->body);
    json_decref(r->lp);
    free(r->text);
    free(r->pre);
    free(r->post);
    free(r->ev);
    free(r);
}

/*
 * The one place where every live request ends, answered or not: it is
 * counted and logged here, then freed. status is the HTTP status sent (499
 * when the client left first).
 */
static void live_finish(struct live_req *r, int status)
{
    struct sched *s = r->s;
    struct live_state *st = s->live;
    r->status = status;
    if (r->prev)
        r->prev->next = r->next;
    else if (st->reqs == r)
        st->reqs = r->next;
    if (r->next)
        r->next->prev = r->prev;
    r->prev = r->next = NULL;

    double end = now_s();
    double started = r->started;
    /* Counted in the metrics and the rate limits, and logged, off the path of any token. */
    double ttft_s = r->t_first > 0 ? r->t_first - started : -1;
    double tpot_s =
        r->t_first > 0 && r->tokens_out > 1 ? (end - r->t_first) / (double)(r->tokens_out - 1) : -1;
    sched_metrics_live_done(s, r->label, status, ttft_s, tpot_s, end - started, r->tokens_in,
                            r->tokens_out);
    if (r->rate_charged) /* the real count replaces the estimate taken at admission */
        sched_rate_settle(s, &r->who,
                          (int64_t)r->tokens_in + r->tokens_out - (int64_t)r->rate_tokens);
    sched_livelog_record(s, &(struct sched_live_record){
                                .key_id = r->key_id,
                                .tenant = r->tenant[0] ? r->tenant : NULL,
                                .model_id = r->model.model_id,
                                .endpoint = r->endpoint,
                                .status = status,
                                .tokens_in = r->tokens_in,
                                .tokens_out = r->tokens_out,
                                .ttft_s = r->t_first > 0 ? r->t_first - started : 0,
                                .latency_s = end - started,
                                .worker_id = r->w ? r->w->id : 0,
                                .finish_reason = r->finish[0] ? r->finish : NULL,
                            });
    sp_debug("live %" PRIu64 " %s %s: %d, %u in, %u out, %.3f ms in all; sent after %.3f ms, "
             "first token %.3f ms after sending",
             r->id, r->endpoint, r->label, status, r->tokens_in, r->tokens_out,
             (end - started) * 1e3, r->t_sent > 0 ? (r->t_sent - started) * 1e3 : -1.0,
             r->t_first > 0 && r->t_sent > 0 ? (r->t_first - r->t_sent) * 1e3 : -1.0);
    r->c = NULL;
    if (r->w) {
        if (r->w->live_inflight)
            r->w->live_inflight--;
        sched_worker_unref(r->w);
        r->w = NULL;
    }
    uv_close((uv_handle_t *)&r->timer, free_req);
}

/* Answers a request that is not streaming yet (or ends a stream with an error event). */
static void fail(struct live_req *r, int status, const char *type, const char *param,
                 const char *code, const char *msg)
{
    sh_call_t *c = r->c;
    if (c && r->started_stream) {
        json_t *e = json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", msg, "type", type,
                              "param", param ? json_string(param) : json_null(), "code",
                              code ? json_string(code) : json_null());
        char *txt = json_dumps(e, JSON_COMPACT);
        json_decref(e);
        if (txt) {
            sh_stream_write(c, "data: ", 6);
            sh_stream_write(c, txt, strlen(txt));
            sh_stream_write(c, "\n\n", 2);
            free(txt);
        }
        sh_stream_end(c);
    } else if (c) {
        sh_respond_error(c, status, type, param, code, "%s", msg);
    }
    r->c = NULL;
    live_finish(r, status);
}

static void send_cancel(struct live_req *r)
{
    if (!r->sent || !r->w || !r->w->conn)
        return;
    struct sp_wire_frame f = {.type = SP_WIRE_CANCEL};
    f.cancel.request_id = r->id;
    sp_wire_conn_send(r->w->conn, &f);
}

/* ---- SSE formatting ------------------------------------------------------ */

/* Appends s (n bytes) JSON-escaped to r->ev at *len, growing it as needed. */
static bool ev_reserve(struct live_req *r, size_t need)
{
    if (need <= r->ev_cap)
        return true;
    size_t cap = r->ev_cap ? r->ev_cap : 512;
    while (cap < need)
        cap *= 2;
    char *p = realloc(r->ev, cap);
    if (!p)
        return false;
    r->ev = p;
    r->ev_cap = cap;
    return true;
}

static size_t ev_escape(struct live_req *r, size_t len, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    if (!ev_reserve(r, len + 6 * n + 2))
        return len;
    char *o = r->ev + len;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        switch (ch) {
        case '"':
            *o++ = '\\';
            *o++ = '"';
            break;
        case '\\':
            *o++ = '\\';
            *o++ = '\\';
            break;
        case '\n':
            *o++ = '\\';
            *o++ = 'n';
            break;
        case '\r':
            *o++ = '\\';
            *o++ = 'r';
            break;
        case '\t':
            *o++ = '\\';
            *o++ = 't';
            break;
        case '\b':
            *o++ = '\\';
            *o++ = 'b';
            break;
        case '\f':
            *o++ = '\\';
            *o++ = 'f';
            break;
        default:
            if (ch < 0x20) {
                memcpy(o, "\\u00", 4);
                o[4] = hex[ch >> 4];
                o[5] = hex[ch & 15];
                o += 6;
            } else {
                *o++ = (char)ch;
            }
        }
    }
    return (size_t)(o - r->ev);
}

static size_t ev_append(struct live_req *r, size_t len, const char *s, size_t n)
{
    if (!ev_reserve(r, len + n + 1))
        return len;
    memcpy(r->ev + len, s, n);
    return len + n;
}

/* The head of every chunk: `data: {"id":...,"model":"demo@3",` */
static size_t ev_head(struct live_req *r)
{
    return ev_append(r, 0, r->pre, strlen(r->pre));
}

/* Sends one chunk carrying text (chat: delta.content; completions: text). */
static void stream_text(struct live_req *r, const char *text, size_t n, const char *finish,
                        json_t *lp)
{
    size_t len = ev_head(r);
    if (r->chat) {
        if (finish) {
            const char a[] = "\"choices\":[{\"index\":0,\"delta\":{},";
            len = ev_append(r, len, a, sizeof a - 1);
        } else {
            const char a[] = "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"";
            len = ev_append(r, len, a, sizeof a - 1);
            len = ev_escape(r, len, text, n);
            len = ev_append(r, len, "\"},", 3);
        }
    } else {
        const char a[] = "\"choices\":[{\"text\":\"";
        len = ev_append(r, len, a, sizeof a - 1);
        len = ev_escape(r, len, text, n);
        const char b[] = "\",\"index\":0,";
        len = ev_append(r, len, b, sizeof b - 1);
    }
    if (finish) {
        const char a[] = "\"logprobs\":null,\"finish_reason\":\"";
        len = ev_append(r, len, a, sizeof a - 1);
        len = ev_escape(r, len, finish, strlen(finish));
        len = ev_append(r, len, "\"}]", 3);
    } else if (lp) {
        char *j = json_dumps(lp, JSON_COMPACT);
        len = ev_append(r, len, "\"logprobs\":", 11);
        len = ev_append(r, len, j ? j : "null", j ? strlen(j) : 4);
        free(j);
        const char a[] = ",\"finish_reason\":null}]";
        len = ev_append(r, len, a, sizeof a - 1);
    } else {
        const char a[] = "\"logprobs\":null,\"finish_reason\":null}]";
        len = ev_append(r, len, a, sizeof a - 1);
    }
    len = ev_append(r, len, r->post, strlen(r->post));
    sh_stream_write(r->c, r->ev, len);
}

static void stream_usage_and_done(struct live_req *r)
{
    if (r->include_usage) {
        char tail[200];
        size_t len = ev_head(r);
        int n = snprintf(tail, sizeof tail,
                         "\"choices\":[],\"usage\":{\"prompt_tokens\":%u,\"completion_tokens\":%u,"
                         "\"total_tokens\":%u}}\n\n",
                         r->tokens_in, r->tokens_out, r->tokens_in + r->tokens_out);
        len = ev_append(r, len, tail, (size_t)n);
        sh_stream_write(r->c, r->ev, len);
    }
    sh_stream_write(r->c, "data: [DONE]\n\n", 14);
}

static void begin_stream(struct live_req *r)
{
    char pre[400];
    snprintf(pre, sizeof pre,
             "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%" PRId64 ",\"model\":\"%s\",",
             r->cid, r->chat ? "chat.completion.chunk" : "text_completion", r->created, r->label);
    r->pre = strdup(pre);
    r->post = strdup(r->include_usage ? ",\"usage\":null}\n\n" : "}\n\n");
    sh_add_header(r->c, "Cache-Control", "no-cache");
    sh_add_header(r->c, "X-Accel-Buffering", "no");
    sh_stream_start(r->c, 200, "text/event-stream; charset=utf-8");
    r->started_stream = true;
    if (r->chat) {
        /* OpenAI's first chunk names the role. */
        size_t len = ev_head(r);
        const char a[] = "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":"
                         "\"\"},\"logprobs\":null,\"finish_reason\":null}]";
        len = ev_append(r, len, a, sizeof a - 1);
        len = ev_append(r, len, r->post, strlen(r->post));
        sh_stream_write(r->c, r->ev, len);
    }
}

/* ---- Answering ----------------------------------------------------------- */

/* The gathered logprobs (a new reference), an empty set, or null when not asked for. */
static json_t *lp_or_null(struct live_req *r)
{
    if (r->lp)
        return json_incref(r->lp);
    if (!r->want_logprobs)
        return json_null();
    if (r->chat)
        return json_pack("{s:[], s:n}", "content", "refusal");
    return json_pack("{s:[], s:[], s:n, s:[]}", "tokens", "token_logprobs", "top_logprobs",
                     "text_offset");
}

static void answer_whole(struct live_req *r)
{
    json_t *usage = json_pack("{s:i, s:i, s:i}", "prompt_tokens", (json_int_t)r->tokens_in,
                              "completion_tokens", (json_int_t)r->tokens_out, "total_tokens",
                              (json_int_t)(r->tokens_in + r->tokens_out));
    json_t *text = json_stringn(r->text ? r->text : "", r->text_len);
    if (!text)
        text = json_stringn_nocheck(r->text ? r->text : "", r->text_len);
    json_t *choice;
    if (r->chat)
        choice = json_pack("{s:i, s:{s:s, s:o, s:n}, s:o, s:s}", "index", 0, "message", "role",
                           "assistant", "content", text, "refusal", "logprobs", lp_or_null(r),
                           "finish_reason", r->finish);
    else
        choice = json_pack("{s:o, s:i, s:o, s:s}", "text", text, "index", 0, "logprobs",
                           lp_or_null(r), "finish_reason", r->finish);
    json_t *body =
        json_pack("{s:s, s:s, s:I, s:s, s:[o], s:o}", "id", r->cid, "object",
                  r->chat ? "chat.completion" : "text_completion", "created",
                  (json_int_t)r->created, "model", r->label, "choices", choice, "usage", usage);
    sh_respond_json(r->c, 200, body);
}

/* The request is complete (USAGE arrived, or it was late): answer and finish. */
static void complete(struct live_req *r)
{
    if (!r->finish[0])
        snprintf(r->finish, sizeof r->finish, "stop");
    if (r->stream) {
        stream_usage_and_done(r);
        sh_stream_end(r->c);
    } else {
        answer_whole(r);
    }
    live_finish(r, 200);
}

static void on_timer(uv_timer_t *t)
{
    struct live_req *r = t->data;
    if (r->got_last) { /* USAGE never came: answer without it */
        sp_warn("live %" PRIu64 ": no USAGE from worker %" PRId64 " after the last tokens", r->id,
                r->w ? r->w->id : 0);
        complete(r);
        return;
    }
    send_cancel(r);
    char msg[160];
    snprintf(msg, sizeof msg, "the request did not finish within %u ms and was cancelled",
             sh_server_config(r->s)->request_timeout_ms);
    fail(r, 504, "server_error", NULL, "timeout", msg);
}

static void on_gone(sh_call_t *c, void *arg)
{
    struct live_req *r = arg;
    (void)c;
    if (r->resolving) { /* on_resolved finishes it */
        sh_respond_error(r->c, 499, "invalid_request_error", NULL, NULL, "client closed request");
        r->c = NULL;
        return;
    }
    send_cancel(r);
    if (r->started_stream)
        sh_stream_end(r->c);
    else
        sh_respond_error(r->c, 499, "invalid_request_error", NULL, NULL, "client closed request");
    live_finish(r, 499);
}

static struct live_req *find(struct sched *s, uint64_t id)
{
    for (struct live_req *r = s->live ? s->live->reqs : NULL; r; r = r->next)
        if (r->id == id)
            return r;
    return NULL;
}

/*
 * One TOKENS frame's logprobs in OpenAI's shape (chat: {"content": [...]},
 * completions: tokens, token_logprobs, top_logprobs, text_offset), or NULL.
 * The worker reports the chosen token's log-probability only, and text per
 * frame: a token's text is the frame's text when the frame has one token;
 * otherwise the first token carries it all. Alternatives are not reported
 * (top_logprobs is empty, or null for completions).
 */
static json_t *frame_logprobs(struct live_req *r, const struct sp_wire_tokens *t)
{
    if (!r->want_logprobs || !t->logprobs || t->n_logprobs != t->n_token_ids || !t->n_token_ids)
        return NULL;
    json_t *content = json_array(), *toks = json_array(), *vals = json_array(),
           *offs = json_array();
    for (uint32_t i = 0; i < t->n_token_ids; i++) {
        const char *piece = i == 0 ? t->text : "";
        size_t plen = i == 0 ? t->text_len : 0;
        json_t *tok = json_stringn(piece, plen);
        if (!tok)
            tok = json_stringn_nocheck(piece, plen);
        json_t *bytes = json_array();
        for (size_t k = 0; k < plen; k++)
            json_array_append_new(bytes, json_integer((unsigned char)piece[k]));
        if (r->chat) {
            json_array_append_new(content, json_pack("{s:o, s:f, s:o, s:[]}", "token", tok,
                                                     "logprob", (double)t->logprobs[i], "bytes",
                                                     bytes, "top_logprobs"));
        } else {
            json_decref(bytes);
            json_array_append_new(toks, tok);
            json_array_append_new(vals, json_real((double)t->logprobs[i]));
            json_array_append_new(offs, json_integer((json_int_t)(r->out_bytes + (i ? plen : 0))));
        }
    }
    if (r->chat) {
        json_decref(toks);
        json_decref(vals);
        json_decref(offs);
        return json_pack("{s:o, s:n}", "content", content, "refusal");
    }
    json_decref(content);
    return json_pack("{s:o, s:o, s:n, s:o}", "tokens", toks, "token_logprobs", vals, "top_logprobs",
                     "text_offset", offs);
}

/* Appends a frame's logprobs to the gathered ones (non-streaming). */
static void gather_logprobs(struct live_req *r, json_t *lp)
{
    if (!r->lp) {
        r->lp = lp;
        return;
    }
    const char *key;
    json_t *v;
    json_object_foreach(lp, key, v)
    {
        json_t *have = json_object_get(r->lp, key);
        if (json_is_array(have))
            json_array_extend(have, v);
    }
    json_decref(lp);
}

static void on_tokens(struct live_req *r, const struct sp_wire_tokens *t)
{
    if (r->got_last)
        return;
    if (t->n_token_ids && r->t_first == 0)
        r->t_first = now_s();
    r->tokens_out += t->n_token_ids;
    bool last = t->finish_reason != NULL;
    if (last) {
        snprintf(r->finish, sizeof r->finish, "%s", t->finish_reason);
        r->got_last = true;
    }
    if (last && strcmp(t->finish_reason, "error") == 0) {
        fail(r, 500, "server_error", NULL, "worker_error",
             "the worker failed while generating; retry");
        return;
    }
    json_t *lp = frame_logprobs(r, t);
    r->out_bytes += t->text_len;
    if (r->stream) {
        if (t->text_len || lp)
            stream_text(r, t->text, t->text_len, NULL, lp);
        json_decref(lp);
        if (last)
            stream_text(r, "", 0, r->finish, NULL);
    } else if (lp) {
        gather_logprobs(r, lp);
    }
    if (!r->stream && t->text_len) {
        if (r->text_len + t->text_len + 1 > r->text_cap) {
            size_t cap = r->text_cap ? r->text_cap : 256;
            while (cap < r->text_len + t->text_len + 1)
                cap *= 2;
            char *p = realloc(r->text, cap);
            if (!p) {
                fail(r, 500, "server_error", NULL, NULL, "out of memory");
                return;
            }
            r->text = p;
            r->text_cap = cap;
        }
        memcpy(r->text + r->text_len, t->text, t->text_len);
        r->text_len += t->text_len;
    }
    if (last) {
        /* USAGE follows; wait for it a little, not for the whole timeout. */
        uv_timer_start(&r->timer, on_timer, USAGE_WAIT_MS, 0);
    }
}

/* An ERROR from the worker for this request. */
static void on_worker_error(struct live_req *r, const struct sp_wire_error *e)
{
    char msg[600];
    snprintf(msg, sizeof msg, "%s", e->message);
    if (strcmp(e->code, "SP_ECONTEXT") == 0)
        fail(r, 400, "invalid_request_error", r->chat ? "messages" : "prompt",
             "context_length_exceeded", msg);
    else if (strcmp(e->code, "SP_EINVAL") == 0)
        fail(r, 400, "invalid_request_error", NULL, "invalid_value", msg);
    else
        fail(r, 500, "server_error", NULL, "worker_error", msg);
}

bool sched_live_frame(struct sched *s, struct sched_worker *w, const struct sp_wire_frame *f)
{
    struct live_req *r;
    switch (f->type) {
    case SP_WIRE_TOKENS:
        if ((r = find(s, f->tokens.request_id)) && r->w == w)
            on_tokens(r, &f->tokens);
        return true;
    case SP_WIRE_USAGE:
        if (!f->usage.has_request_id)
            return false;
        if ((r = find(s, f->usage.request_id)) && r->w == w) {
            r->tokens_in = (uint32_t)f->usage.tokens_in;
            r->tokens_out = (uint32_t)f->usage.tokens_out;
            r->has_usage = true;
            if (r->got_last)
                complete(r);
        }
        return true;
    case SP_WIRE_ERROR:
        if (!f->error.has_request_id)
            return false;
        if ((r = find(s, f->error.request_id)) && r->w == w)
            on_worker_error(r, &f->error);
        return true;
    default:
        return false;
    }
}

void sched_live_worker_lost(struct sched *s, struct sched_worker *w)
{
    for (struct live_req *r = s->live ? s->live->reqs : NULL, *next; r; r = next) {
        next = r->next;
        if (r->w == w)
            fail(r, 502, "server_error", NULL, "worker_lost",
                 "the worker serving this request disconnected; retry");
    }
}

void sched_live_stop(struct sched *s)
{
    for (struct live_req *r = s->live ? s->live->reqs : NULL, *next; r; r = next) {
        next = r->next;
        if (r->resolving) { /* its query's callback finishes it */
            if (r->c)
                sh_respond_error(r->c, 503, "service_unavailable", NULL, NULL,
                                 "the scheduler is shutting down; retry");
            r->c = NULL;
            continue;
        }
        send_cancel(r);
        fail(r, 503, "service_unavailable", NULL, NULL, "the scheduler is shutting down; retry");
    }
}

/* ---- Routing ------------------------------------------------------------- */

static bool has_digest(const struct sched_worker *w, const char *digest)
{
    for (size_t i = 0; i < w->n_digests; i++)
        if (strcmp(w->digests[i], digest) == 0)
            return true;
    return false;
}

/* The registered, non-draining worker with the version loaded and the most room. */
static struct sched_worker *pick_worker(struct sched *s, const char *digest)
{
    struct sched_worker *best = NULL;
    int64_t best_room = INT64_MIN;
    for (struct sched_worker *w = s->workers; w; w = w->next) {
        if (!w->conn || w->state != SW_ACTIVE || !has_digest(w, digest))
            continue;
        int64_t room = (int64_t)w->free_slots - (int64_t)w->live_inflight;
        if (room > best_room) {
            best = w;
            best_room = room;
        }
    }
    return best;
}

static void dispatch(struct live_req *r)
{
    struct sched *s = r->s;
    snprintf(r->label, sizeof r->label, "%s@%u", r->model.name, r->model.version);
    struct sched_worker *w = s->active ? pick_worker(s, r->model.digest) : NULL;
    if (!w) {
        sh_add_header(r->c, "Retry-After", "2");
        char msg[400];
        snprintf(msg, sizeof msg,
                 s->active ? "no worker has model %s loaded now; retry later"
                           : "this scheduler is on standby; send requests to the active one "
                             "(model %s)",
                 r->label);
        fail(r, 503, "service_unavailable", "model", "no_worker", msg);
        return;
    }
    struct sp_wire_frame f = {.type = SP_WIRE_LIVE_REQUEST};
    struct sp_wire_live_request *lr = &f.live;
    lr->request_id = r->id;
    lr->model = (struct sp_wire_model){r->model.name, r->model.version, r->model.digest};
    lr->sampling = r->sampling;
    lr->priority = LIVE_PRIORITY;
    struct sp_wire_message *msgs = NULL;
    int32_t *toks = NULL;
    if (r->chat) {
        json_t *m = json_object_get(r->body, "messages");
        size_t n = json_array_size(m);
        msgs = calloc(n, sizeof *msgs);
        if (!msgs) {
            fail(r, 500, "server_error", NULL, NULL, "out of memory");
            return;
        }
        for (size_t i = 0; i < n; i++) {
            json_t *e = json_array_get(m, i);
            msgs[i].role = json_string_value(json_object_get(e, "role"));
            msgs[i].content = json_string_value(json_object_get(e, "_text"));
        }
        lr->messages = msgs;
        lr->n_messages = (uint32_t)n;
        lr->prompt = (struct sp_wire_prompt){.is_text = true, .text = "", .text_len = 0};
    } else {
        json_t *p = json_object_get(r->body, "_prompt");
        if (json_is_string(p)) {
            lr->prompt = (struct sp_wire_prompt){
                .is_text = true, .text = json_string_value(p), .text_len = json_string_length(p)};
        } else {
            size_t n = json_array_size(p);
            toks = calloc(n ? n : 1, sizeof *toks);
            if (!toks) {
                fail(r, 500, "server_error", NULL, NULL, "out of memory");
                return;
            }
            for (size_t i = 0; i < n; i++)
                toks[i] = (int32_t)json_integer_value(json_array_get(p, i));
            lr->prompt = (struct sp_wire_prompt){.tokens = toks, .n_tokens = (uint32_t)n};
        }
    }
    int rc = sp_wire_conn_send(w->conn, &f);
    free(msgs);
    free(toks);
    if (rc != 0) {
        sh_add_header(r->c, "Retry-After", "1");
        fail(r, 503, "service_unavailable", NULL, "worker_unavailable",
             "the chosen worker could not take the request; retry");
        return;
    }
    r->w = w;
    sched_worker_ref(w);
    w->live_inflight++;
    r->sent = true;
    r->t_sent = now_s();
    uv_timer_start(&r->timer, on_timer, sh_server_config(s)->request_timeout_ms, 0);
    if (r->stream)
        begin_stream(r);
}

static const char *sqlstate(const PGresult *res)
{
    const char *v = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return v ? v : "";
}

static void on_resolved(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    struct live_req *r = arg;
    struct sched *s = r->s;
    r->resolving = false;
    if (!r->c) { /* the client left meanwhile (on_gone answered it) */
        live_finish(r, 499);
        return;
    }
    if (err && (strcmp(sqlstate(res), "P0002") == 0 || strcmp(sqlstate(res), "22023") == 0)) {
        const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        char msg[400];
        snprintf(msg, sizeof msg, "%s (GET /v1/models lists the models)", m ? m : "unknown model");
        fail(r, 404, "invalid_request_error", "model", "model_not_found", msg);
        return;
    }
    if (err || PQntuples(res) != 1) {
        sp_warn("live: resolving model '%s': %s", r->model.ref, err ? err : "no row");
        sh_add_header(r->c, "Retry-After", "1");
        fail(r, 503, "service_unavailable", NULL, NULL,
             "the model registry cannot be read now; retry");
        return;
    }
    r->model.model_id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    snprintf(r->model.name, sizeof r->model.name, "%s", PQgetvalue(res, 0, 1));
    r->model.version = (uint32_t)strtoul(PQgetvalue(res, 0, 2), NULL, 10);
    snprintf(r->model.digest, sizeof r->model.digest, "sha256:%s", PQgetvalue(res, 0, 3));
    struct live_state *st = state_of(s);
    struct resolved *slot = &st->cache[st->cache_next++ % MODEL_CACHE_SIZE];
    *slot = r->model;
    slot->expires = uv_now(s->loop) + MODEL_CACHE_MS;
    dispatch(r);
}

static void resolve(struct live_req *r)
{
    struct sched *s = r->s;
    struct live_state *st = state_of(s);
    uint64_t now = uv_now(s->loop);
    for (int i = 0; i < MODEL_CACHE_SIZE; i++) {
        if (st->cache[i].expires > now && strcmp(st->cache[i].ref, r->model.ref) == 0) {
            r->model = st->cache[i];
            dispatch(r);
            return;
        }
    }
    const char *p[] = {r->model.ref};
    r->resolving = true;
    if (sp_pgconn_query(s->db,
                        "SELECT m.id, m.name, m.version, m.digest FROM spool.models m "
                        "WHERE m.id = spool.resolve_model($1)",
                        1, p, on_resolved, r) != 0) {
        r->resolving = false;
        sh_add_header(r->c, "Retry-After", "1");
        fail(r, 503, "service_unavailable", NULL, NULL,
             "the model registry cannot be read now; retry");
    }
}

/* ---- Validation ---------------------------------------------------------- */

struct verr {
    int status;
    const char *param;
    const char *code;
    char msg[400];
};

static bool bad(struct verr *e, const char *param, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static bool bad(struct verr *e, const char *param, const char *code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->status = 400;
    e->param = param;
    e->code = code;
    return false;
}

static bool get_number(json_t *body, const char *key, double lo, double hi, bool *has, double *out,
                       struct verr *e)
{
    json_t *v = json_object_get(body, key);
    if (!v || json_is_null(v))
        return true;
    if (!json_is_number(v))
        return bad(e, key, "invalid_type", "'%s' must be a number", key);
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi))
        return bad(e, key, "invalid_value", "'%s' must be between %g and %g, got %g", key, lo, hi,
                   d);
    *has = true;
    *out = d;
    return true;
}

static bool get_uint(json_t *body, const char *key, int64_t lo, int64_t hi, bool *has, int64_t *out,
                     struct verr *e)
{
    json_t *v = json_object_get(body, key);
    if (!v || json_is_null(v))
        return true;
    if (!json_is_integer(v))
        return bad(e, key, "invalid_type", "'%s' must be an integer", key);
    int64_t n = json_integer_value(v);
    if (n < lo || n > hi)
        return bad(e, key, "invalid_value",
                   "'%s' must be between %" PRId64 " and %" PRId64 ", got %" PRId64, key, lo, hi,
                   n);
    *has = true;
    *out = n;
    return true;
}

/* The text of a chat message's content: a string or an array of text parts. */
static bool message_text(json_t *content, size_t i, json_t *msg, struct verr *e)
{
    static char param[64];
    snprintf(param, sizeof param, "messages[%zu].content", i);
    if (json_is_string(content)) {
        json_object_set(msg, "_text", content);
        return true;
    }
    if (json_is_null(content) || !content) {
        json_object_set_new(msg, "_text", json_string(""));
        return true;
    }
    if (!json_is_array(content))
        return bad(e, param, "invalid_type", "'%s' must be a string or an array of text parts",
                   param);
    size_t total = 0, k;
    json_t *part;
    json_array_foreach(content, k, part)
    {
        const char *type = json_string_value(json_object_get(part, "type"));
        json_t *text = json_object_get(part, "text");
        if (!type || strcmp(type, "text") != 0 || !json_is_string(text))
            return bad(e, param, "unsupported_content",
                       "'%s[%zu]': only parts of type 'text' are supported", param, k);
        total += json_string_length(text);
    }
    char *buf = malloc(total + 1);
    if (!buf)
        return bad(e, param, NULL, "out of memory");
    size_t off = 0;
    json_array_foreach(content, k, part)
    {
        json_t *text = json_object_get(part, "text");
        memcpy(buf + off, json_string_value(text), json_string_length(text));
        off += json_string_length(text);
    }
    json_object_set_new(msg, "_text", json_stringn_nocheck(buf, off));
    free(buf);
    return true;
}

static bool validate(struct live_req *r, json_t *body, struct verr *e)
{
    static const char *const common[] = {"model",
                                         "stream",
                                         "stream_options",
                                         "max_tokens",
                                         "temperature",
                                         "top_p",
                                         "seed",
                                         "stop",
                                         "presence_penalty",
                                         "frequency_penalty",
                                         "n",
                                         "user",
                                         "top_k",
                                         "min_p",
                                         "repetition_penalty",
                                         "logit_bias",
                                         "metadata",
                                         "store",
                                         "service_tier",
                                         "ignore_eos",
                                         NULL};
    static const char *const chat_only[] = {"messages",
                                            "max_completion_tokens",
                                            "parallel_tool_calls",
                                            "response_format",
                                            "logprobs",
                                            "top_logprobs",
                                            NULL};
    static const char *const cmpl_only[] = {"prompt", "echo",     "best_of",
                                            "suffix", "logprobs", NULL};
    static const char *const unsupported[] = {
        "tools",      "tool_choice", "functions",          "function_call",    "audio",
        "prediction", "modalities",  "web_search_options", "reasoning_effort", NULL};
    const char *key;
    json_t *v;
    json_object_foreach(body, key, v)
    {
        bool known = false;
        for (int i = 0; unsupported[i]; i++) {
            if (strcmp(key, unsupported[i]) == 0) {
                if (json_is_null(v) || json_is_false(v) ||
                    (json_is_integer(v) && json_integer_value(v) == 0) ||
                    (json_is_array(v) && json_array_size(v) == 0))
                    known = true; /* the default: harmless */
                else
                    return bad(e, key, "unsupported_parameter",
                               "'%s' is not supported by this server", key);
            }
        }
        for (int i = 0; !known && common[i]; i++)
            known = strcmp(key, common[i]) == 0;
        for (int i = 0; !known && r->chat && chat_only[i]; i++)
            known = strcmp(key, chat_only[i]) == 0;
        for (int i = 0; !known && !r->chat && cmpl_only[i]; i++)
            known = strcmp(key, cmpl_only[i]) == 0;
        if (!known)
            return bad(e, key, "unknown_parameter", "unrecognized request argument '%s'", key);
    }
    /* model */
    v = json_object_get(body, "model");
    if (!v)
        return bad(e, "model", "missing_required_parameter",
                   "'model' is required: name, name@alias or name@VERSION");
    if (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) >= 200)
        return bad(e, "model", "invalid_type",
                   "'model' must be a non-empty string (name, "
                   "name@alias or name@VERSION)");
    snprintf(r->model.ref, sizeof r->model.ref, "%s", json_string_value(v));
    /* stream, stream_options */
    v = json_object_get(body, "stream");
    if (v && !json_is_null(v) && !json_is_boolean(v))
        return bad(e, "stream", "invalid_type", "'stream' must be a boolean");
    r->stream = json_is_true(v);
    v = json_object_get(body, "stream_options");
    if (v && !json_is_null(v)) {
        if (!r->stream)
            return bad(e, "stream_options", "invalid_value",
                       "'stream_options' is only allowed when 'stream' is true");
        if (!json_is_object(v))
            return bad(e, "stream_options", "invalid_type", "'stream_options' must be an object");
        json_t *iu = json_object_get(v, "include_usage");
        if (iu && !json_is_null(iu) && !json_is_boolean(iu))
            return bad(e, "stream_options.include_usage", "invalid_type",
                       "'stream_options.include_usage' must be a boolean");
        r->include_usage = json_is_true(iu);
    }
    /* n, best_of, echo, suffix, logit_bias, response_format */
    bool has = false;
    int64_t n = 1;
    if (!get_uint(body, "n", 1, 128, &has, &n, e))
        return false;
    if (n != 1)
        return bad(e, "n", "unsupported_parameter", "'n' must be 1: one choice per request");
    if (!get_uint(body, "best_of", 1, 128, &has, &n, e))
        return false;
    if (n != 1)
        return bad(e, "best_of", "unsupported_parameter", "'best_of' must be 1");
    v = json_object_get(body, "echo");
    if (json_is_true(v))
        return bad(e, "echo", "unsupported_parameter", "'echo' is not supported");
    v = json_object_get(body, "suffix");
    if (v && !json_is_null(v))
        return bad(e, "suffix", "unsupported_parameter", "'suffix' is not supported");
    v = json_object_get(body, "logit_bias");
    if (v && !json_is_null(v) && !(json_is_object(v) && json_object_size(v) == 0))
        return bad(e, "logit_bias", "unsupported_parameter", "'logit_bias' is not supported");
    v = json_object_get(body, "response_format");
    if (v && !json_is_null(v)) {
        const char *t = json_string_value(json_object_get(v, "type"));
        if (!t || strcmp(t, "text") != 0)
            return bad(e, "response_format", "unsupported_parameter",
                       "only 'response_format' {\"type\": \"text\"} is supported");
    }
    /* logprobs: the chosen token's only (the worker reports no alternatives) */
    struct sp_wire_sampling *sp = &r->sampling;
    v = json_object_get(body, "logprobs");
    if (r->chat) {
        if (v && !json_is_null(v) && !json_is_boolean(v))
            return bad(e, "logprobs", "invalid_type", "'logprobs' must be a boolean");
        r->want_logprobs = json_is_true(v);
        has = false;
        if (!get_uint(body, "top_logprobs", 0, 20, &has, &n, e))
            return false;
        if (has && !r->want_logprobs)
            return bad(e, "top_logprobs", "invalid_value", "'top_logprobs' needs 'logprobs': true");
        if (has && n > 0)
            return bad(e, "top_logprobs", "unsupported_parameter",
                       "alternatives are not reported: 'top_logprobs' must be 0 (each token's "
                       "own log-probability comes with 'logprobs': true)");
    } else if (v && !json_is_null(v)) {
        has = false;
        if (!get_uint(body, "logprobs", 0, 5, &has, &n, e))
            return false;
        if (n > 0)
            return bad(e, "logprobs", "unsupported_parameter",
                       "alternatives are not reported: 'logprobs' must be 0 (each token's own "
                       "log-probability is then given)");
        r->want_logprobs = true;
    }
    if (r->want_logprobs) {
        sp->has_logprobs = true;
        sp->logprobs = 0;
    }
    /* sampling */
    if (!get_number(body, "temperature", 0, 2, &sp->has_temperature, &sp->temperature, e) ||
        !get_number(body, "top_p", 0, 1, &sp->has_top_p, &sp->top_p, e) ||
        !get_number(body, "min_p", 0, 1, &sp->has_min_p, &sp->min_p, e) ||
        !get_number(body, "presence_penalty", -2, 2, &sp->has_presence_penalty,
                    &sp->presence_penalty, e) ||
        !get_number(body, "frequency_penalty", -2, 2, &sp->has_frequency_penalty,
                    &sp->frequency_penalty, e) ||
        !get_number(body, "repetition_penalty", 0.01, 10, &sp->has_repetition_penalty,
                    &sp->repetition_penalty, e))
        return false;
    if (sp->has_top_p && sp->top_p <= 0)
        return bad(e, "top_p", "invalid_value", "'top_p' must be greater than 0");
    int64_t x;
    has = false;
    if (!get_uint(body, "top_k", 0, INT32_MAX, &has, &x, e))
        return false;
    if (has) {
        sp->has_top_k = true;
        sp->top_k = (int32_t)x;
    }
    has = false;
    if (!get_uint(body, "seed", INT64_MIN, INT64_MAX, &has, &x, e))
        return false;
    if (has) {
        sp->has_seed = true;
        sp->seed = (uint64_t)x;
    }
    const char *mt = r->chat && json_object_get(body, "max_completion_tokens") &&
                             !json_is_null(json_object_get(body, "max_completion_tokens"))
                         ? "max_completion_tokens"
                         : "max_tokens";
    has = false;
    if (!get_uint(body, mt, 1, UINT32_MAX, &has, &x, e))
        return false;
    if (has) {
        sp->has_max_tokens = true;
        sp->max_tokens = (uint32_t)x;
    }
    v = json_object_get(body, "ignore_eos");
    if (v && !json_is_null(v)) {
        if (!json_is_boolean(v))
            return bad(e, "ignore_eos", "invalid_type", "'ignore_eos' must be a boolean");
        sp->has_ignore_eos = true;
        sp->ignore_eos = json_is_true(v);
    }
    v = json_object_get(body, "stop");
    if (json_is_string(v)) {
        if (json_string_length(v) == 0)
            return bad(e, "stop", "invalid_value", "'stop' strings must not be empty");
        r->stop[0] = json_string_value(v);
        sp->n_stop = 1;
    } else if (json_is_array(v)) {
        if (json_array_size(v) > 4)
            return bad(e, "stop", "invalid_value", "'stop' may hold at most 4 strings");
        size_t i;
        json_t *sv;
        json_array_foreach(v, i, sv)
        {
            if (!json_is_string(sv) || json_string_length(sv) == 0)
                return bad(e, "stop", "invalid_type", "'stop' must hold non-empty strings");
            r->stop[i] = json_string_value(sv);
        }
        sp->n_stop = (uint32_t)json_array_size(v);
    } else if (v && !json_is_null(v)) {
        return bad(e, "stop", "invalid_type", "'stop' must be a string or an array of strings");
    }
    if (sp->n_stop)
        sp->stop = r->stop;
    /* messages or prompt */
    if (r->chat) {
        json_t *m = json_object_get(body, "messages");
        if (!m)
            return bad(e, "messages", "missing_required_parameter", "'messages' is required");
        if (!json_is_array(m) || json_array_size(m) == 0)
            return bad(e, "messages", "invalid_type", "'messages' must be a non-empty array");
        size_t i;
        json_t *msg;
        json_array_foreach(m, i, msg)
        {
            static char param[48];
            snprintf(param, sizeof param, "messages[%zu].role", i);
            const char *role = json_string_value(json_object_get(msg, "role"));
            if (!json_is_object(msg) || !role)
                return bad(e, param, "invalid_type",
                           "'messages[%zu]' must be an object with a string 'role'", i);
            if (strcmp(role, "developer") == 0)
                json_object_set_new(msg, "role", json_string("system"));
            else if (strcmp(role, "system") != 0 && strcmp(role, "user") != 0 &&
                     strcmp(role, "assistant") != 0 && strcmp(role, "tool") != 0)
                return bad(e, param, "invalid_value",
                           "'%s' must be system, developer, user, assistant or tool, got '%s'",
                           param, role);
            if (!message_text(json_object_get(msg, "content"), i, msg, e))
                return false;
        }
    } else {
        json_t *p = json_object_get(body, "prompt");
        if (!p)
            return bad(e, "prompt", "missing_required_parameter", "'prompt' is required");
        if (json_is_array(p) && json_array_size(p) == 1 && json_is_string(json_array_get(p, 0)))
            p = json_array_get(p, 0);
        if (json_is_array(p)) {
            if (json_array_size(p) == 0)
                return bad(e, "prompt", "invalid_value", "'prompt' must not be empty");
            size_t i;
            json_t *t;
            json_array_foreach(p, i, t)
            {
                if (json_is_string(t) || json_is_array(t))
                    return bad(e, "prompt", "unsupported_parameter",
                               "one prompt per request: several prompts go to the Batch API "
                               "(/v1/batches)");
                if (!json_is_integer(t) || json_integer_value(t) < 0 ||
                    json_integer_value(t) > INT32_MAX)
                    return bad(e, "prompt", "invalid_type",
                               "'prompt' must be a string or an array of token ids");
            }
        } else if (!json_is_string(p)) {
            return bad(e, "prompt", "invalid_type",
                       "'prompt' must be a string or an array of token ids");
        }
        json_object_set(body, "_prompt", p);
    }
    return true;
}

/* ---- Rate limits --------------------------------------------------------- */

/*
 * The tokens a request is expected to use, for the key's token bucket: the
 * prompt (token ids counted; text estimated at 4 bytes a token, 4 more per
 * chat message) plus max_tokens (256 when not given). live_finish settles
 * the difference with the real count.
 */
static uint32_t expected_tokens(const struct live_req *r)
{
    uint64_t n = 0;
    if (r->chat) {
        size_t i;
        json_t *m;
        json_array_foreach(json_object_get(r->body, "messages"), i, m)
        {
            n += 4 + (json_string_length(json_object_get(m, "_text")) + 3) / 4;
        }
    } else {
        json_t *p = json_object_get(r->body, "_prompt");
        n = json_is_string(p) ? (json_string_length(p) + 3) / 4 : json_array_size(p);
    }
    n += r->sampling.has_max_tokens ? r->sampling.max_tokens : 256;
    return n > UINT32_MAX ? UINT32_MAX : (uint32_t)n;
}

/*
 * Admission against the key's rate limits, before any work is done for the
 * request (so a refused request costs no query and no worker). Returns
 * false after answering 429 with Retry-After.
 */
static bool admit(struct live_req *r, const struct sched_principal *who)
{
    uint32_t retry = 0;
    const char *which = "requests";
    uint32_t tokens = expected_tokens(r);
    if (!sched_rate_admit(r->s, who, tokens, &retry, &which)) {
        char ra[16], msg[300];
        snprintf(ra, sizeof ra, "%u", retry);
        sh_add_header(r->c, "Retry-After", ra);
        if (strcmp(which, "tokens") == 0)
            snprintf(msg, sizeof msg,
                     "rate limit reached: this key may use %u tokens per minute and this request "
                     "expects %u (prompt + max_tokens); retry after %u s",
                     who->tpm_limit, tokens, retry);
        else
            snprintf(msg, sizeof msg,
                     "rate limit reached: this key may make %u requests per minute; retry after "
                     "%u s",
                     who->rpm_limit, retry);
        fail(r, 429, "rate_limit_error", NULL, "rate_limit_exceeded", msg);
        return false;
    }
    r->who = *who;
    r->rate_tokens = tokens;
    r->rate_charged = true;
    return true;
}

/* ---- Handlers ------------------------------------------------------------ */

static void start(struct sched *s, sh_call_t *c, bool chat)
{
    json_t *body = sh_json_body(c);
    if (!body)
        return;
    struct live_state *st = state_of(s);
    struct live_req *r = calloc(1, sizeof *r);
    if (!st || !r) {
        free(r);
        sh_respond_error(c, 500, "server_error", NULL, NULL, "out of memory");
        return;
    }
    r->s = s;
    r->c = c;
    r->chat = chat;
    r->endpoint = chat ? "/v1/chat/completions" : "/v1/completions";
    r->body = json_incref(body);
    r->started = sh_started(c);
    const struct sched_principal *who = sh_principal(c);
    if (who) {
        r->key_id = who->key_id;
        snprintf(r->tenant, sizeof r->tenant, "%s", who->tenant);
    }
    r->id = ++st->next_id;
    r->created = (int64_t)time(NULL);
    snprintf(r->cid, sizeof r->cid, "%s-%016" PRIx64 "%08" PRIx64, chat ? "chatcmpl" : "cmpl",
             (uint64_t)random() << 31 ^ (uint64_t)random(), r->id);
    uv_timer_init(s->loop, &r->timer);
    r->timer.data = r;
    r->next = st->reqs;
    if (st->reqs)
        st->reqs->prev = r;
    st->reqs = r;
    struct verr e = {0};
    if (!validate(r, body, &e)) {
        fail(r, e.status, "invalid_request_error", e.param, e.code, e.msg);
        return;
    }
    if (who && !admit(r, who))
        return;
    sh_on_gone(c, on_gone, r);
    resolve(r);
}

static void handle_completions(struct sched *s, sh_call_t *c)
{
    start(s, c, false);
}

static void handle_chat(struct sched *s, sh_call_t *c)
{
    start(s, c, true);
}
