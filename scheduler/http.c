/*
 * The scheduler's HTTP server: h2o (the libuv build, 2.2.5) on the
 * scheduler's loop. See http.h for the contract handlers code against.
 *
 * One h2o handler at "/" receives every request after h2o has read its
 * whole body; it makes an sh_call_t (malloc'd, outliving the h2o request if
 * the client leaves), matches the route tables below, checks the bearer key
 * for routes that need one (auth.h), and calls the route's handler.
 *
 * Life of a call:
 *
 *   open --respond_* / stream_end--> answered --data handed to h2o--> freed
 *     |                                 ^
 *     +--client gone (req disposed)-----+ (the handler still answers; that frees it)
 *
 * h2o's request (and its memory pool) may die before the call is answered:
 * an "anchor" allocated in the pool tells the call when that happens, and
 * the streaming generator's stop callback does the same while a response
 * is being streamed. Every byte handed to h2o is copied into the request's
 * pool first, so it stays valid until h2o has written it.
 *
 * Bodies over max_body: h2o refuses them itself (413 in plain text, before
 * any handler runs); a filter on every path rewrites that answer into an
 * OpenAI-style error object.
 *
 * Shutdown: sh_server_stop closes the listener, ends every open call (503,
 * or the end of its stream) and shuts the read side of every client socket,
 * so that h2o sees EOF and closes idle keep-alive connections at once.
 */
#include "http.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <h2o.h>

#include "auth.h"
#include "live.h"
#include "metrics.h"
#include "models.h"
#include "oai_batch.h"
#include "scheduler.h"
#include "spool/error.h"
#include "spool/log.h"

#define SH_MAX_PARAMS 8

/* ---- Route tables -------------------------------------------------------- */

static void handle_healthz(struct sched *s, sh_call_t *c);
static void handle_readyz(struct sched *s, sh_call_t *c);

static const struct sh_route core_routes[] = {
    {"GET", "/healthz", 0, handle_healthz},
    {"GET", "/readyz", 0, handle_readyz},
};
static const int core_n_routes = sizeof core_routes / sizeof core_routes[0];

/*
 * Every route table, matched in this order. A group of endpoints adds its
 * table with one line here (its header declares NAME_routes and
 * NAME_n_routes).
 */
static const struct {
    const struct sh_route *routes;
    const int *n;
} route_tables[] = {
    {core_routes, &core_n_routes},
    {sched_models_routes, &sched_models_n_routes},
    {sched_live_routes, &sched_live_n_routes},
    {sched_batch_routes, &sched_batch_n_routes},
    {sched_metrics_routes, &sched_metrics_n_routes},
};

/* ---- State --------------------------------------------------------------- */

struct sh_conn { /* one accepted client socket, for shutdown and disconnect checks */
    struct sh_conn *prev, *next;
    struct sh_server *srv;
    struct sockaddr_storage peer;
    uv_tcp_t tcp;
};

struct sh_server {
    struct sched *s;
    struct sh_config cfg;
    char *port_file;
    h2o_globalconf_t gc;
    h2o_context_t ctx;
    h2o_accept_ctx_t actx;
    uv_tcp_t *listener;
    uv_timer_t retry; /* tries the listen address again while it is in use; at stop,
                         waits for the connections to close */
    int stop_ticks;
    struct sockaddr_storage addr;
    int bound_port;
    struct sh_conn *conns;
    uv_timer_t watch; /* looks for clients that left while their answer is pending */
    bool watching;
    sh_call_t *calls;   /* unanswered calls */
    sh_call_t *zombies; /* ended by sh_server_stop, awaiting the handler's answer */
    bool stopping;
};

struct anchor { /* lives in the request's pool; tells the call when it dies */
    sh_call_t *call;
};

struct stream_gen { /* lives in the request's pool while streaming */
    h2o_generator_t super;
    sh_call_t *call;
};

struct qparam {
    char *name, *value;
};

struct sh_call {
    struct sh_server *srv;
    sh_call_t *prev, *next;
    h2o_req_t *req; /* NULL once the client is gone */
    struct anchor *anchor;
    struct stream_gen *gen;
    const struct sh_route *route;
    char method[16];
    char *path;
    char *pbuf; /* the path parameters, NUL-separated */
    const char *params[SH_MAX_PARAMS];
    int n_params;
    struct qparam *query;
    int n_query;
    bool query_parsed;
    json_t *json;
    struct sched_principal principal;
    bool has_principal;
    double started;
    void (*gone_cb)(sh_call_t *c, void *arg);
    void *gone_arg;
    bool streaming;       /* sh_stream_start was called */
    bool answered;        /* the answer (or the stream's end) has begun */
    bool inflight;        /* a stream write is with h2o; the next waits for proceed */
    bool by_server;       /* ended by sh_server_stop, not by its handler */
    bool handler_done;    /* the handler has answered too (after by_server) */
    bool zombie;          /* h2o is done with it; waits for the handler's answer */
    struct sh_conn *conn; /* its client socket, found by sh_on_gone (may be NULL) */
    char *pend;           /* stream bytes not yet handed to h2o */
    size_t pend_len, pend_cap;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static struct sh_server *server_of(struct sched *s)
{
    return s->http;
}

const struct sh_config *sh_server_config(struct sched *s)
{
    return s->http ? &s->http->cfg : NULL;
}

/* ---- The call's life ----------------------------------------------------- */

static void list_remove(sh_call_t **head, sh_call_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else if (*head == c)
        *head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

static void list_push(sh_call_t **head, sh_call_t *c)
{
    c->prev = NULL;
    c->next = *head;
    if (*head)
        (*head)->prev = c;
    *head = c;
}

/* Cuts the ties between the call and h2o's request (which may live on). */
static void detach(sh_call_t *c)
{
    if (c->anchor)
        c->anchor->call = NULL;
    if (c->gen)
        c->gen->call = NULL;
    c->anchor = NULL;
    c->gen = NULL;
    c->req = NULL;
}

static void call_free(sh_call_t *c)
{
    detach(c);
    list_remove(c->zombie ? &c->srv->zombies : &c->srv->calls, c);
    json_decref(c->json);
    for (int i = 0; i < c->n_query; i++) {
        free(c->query[i].name);
        free(c->query[i].value);
    }
    free(c->query);
    free(c->path);
    free(c->pbuf);
    free(c->pend);
    free(c);
}

/*
 * h2o needs nothing more of the call: free it, unless sh_server_stop ended
 * it and its handler has not answered yet (it then waits, as a zombie,
 * for that answer, which frees it).
 */
static void release(sh_call_t *c)
{
    detach(c);
    if (c->by_server && !c->handler_done) {
        if (!c->zombie) {
            list_remove(&c->srv->calls, c);
            list_push(&c->srv->zombies, c);
            c->zombie = true;
        }
        return;
    }
    call_free(c);
}

/* The client went away (h2o disposed of its request) before the call was done. */
static void client_gone(sh_call_t *c)
{
    if (!c->req)
        return;
    detach(c);
    if (c->answered) {
        /* A stream's end was waiting for the previous write: nothing more to do. */
        release(c);
        return;
    }
    if (c->gone_cb) {
        void (*cb)(sh_call_t *, void *) = c->gone_cb;
        c->gone_cb = NULL;
        cb(c, c->gone_arg);
    }
}

static void anchor_dispose(void *p)
{
    struct anchor *a = p;
    if (a->call)
        client_gone(a->call);
}

/*
 * A handler's answer to a call the server already ended: it only frees the
 * call (now, or once h2o is done with it). Returns true when that was the case.
 */
static bool handler_late(sh_call_t *c)
{
    if (!c->by_server)
        return false;
    c->handler_done = true;
    if (c->zombie)
        call_free(c);
    return true;
}

static const char *reason_of(int status)
{
    switch (status) {
    case 200:
        return "OK";
    case 201:
        return "Created";
    case 204:
        return "No Content";
    case 400:
        return "Bad Request";
    case 401:
        return "Unauthorized";
    case 403:
        return "Forbidden";
    case 404:
        return "Not Found";
    case 405:
        return "Method Not Allowed";
    case 409:
        return "Conflict";
    case 413:
        return "Payload Too Large";
    case 422:
        return "Unprocessable Entity";
    case 429:
        return "Too Many Requests";
    case 500:
        return "Internal Server Error";
    case 502:
        return "Bad Gateway";
    case 503:
        return "Service Unavailable";
    case 504:
        return "Gateway Timeout";
    default:
        return status < 400 ? "OK" : "Error";
    }
}

static void set_status(sh_call_t *c, int status, const char *content_type)
{
    h2o_req_t *req = c->req;
    req->res.status = status;
    req->res.reason = reason_of(status);
    if (content_type)
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL, content_type,
                       strlen(content_type));
    if (c->srv->stopping)
        req->http1_is_persistent = 0;
}

/* ---- The request --------------------------------------------------------- */

const char *sh_method(const sh_call_t *c)
{
    return c->method;
}

const char *sh_path(const sh_call_t *c)
{
    return c->path;
}

const char *sh_param(const sh_call_t *c, int i)
{
    return i >= 0 && i < c->n_params ? c->params[i] : NULL;
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* URL-decodes n bytes of s ('+' is a space) into a new string. */
static char *url_decode(const char *s, size_t n)
{
    char *out = malloc(n + 1), *o = out;
    if (!out)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '+') {
            *o++ = ' ';
        } else if (s[i] == '%' && i + 2 < n && hexval((unsigned char)s[i + 1]) >= 0 &&
                   hexval((unsigned char)s[i + 2]) >= 0) {
            *o++ = (char)(hexval((unsigned char)s[i + 1]) * 16 + hexval((unsigned char)s[i + 2]));
            i += 2;
        } else {
            *o++ = s[i];
        }
    }
    *o = '\0';
    return out;
}

static void parse_query(sh_call_t *c)
{
    c->query_parsed = true;
    if (!c->req || c->req->query_at == SIZE_MAX)
        return;
    const char *q = c->req->path.base + c->req->query_at + 1;
    const char *end = c->req->path.base + c->req->path.len;
    while (q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q));
        if (!amp)
            amp = end;
        if (amp > q) {
            const char *eq = memchr(q, '=', (size_t)(amp - q));
            const char *ne = eq ? eq : amp;
            struct qparam *np = realloc(c->query, (size_t)(c->n_query + 1) * sizeof *np);
            if (!np)
                return;
            c->query = np;
            np[c->n_query].name = url_decode(q, (size_t)(ne - q));
            np[c->n_query].value = eq ? url_decode(eq + 1, (size_t)(amp - eq - 1)) : strdup("");
            if (!np[c->n_query].name || !np[c->n_query].value) {
                free(np[c->n_query].name);
                free(np[c->n_query].value);
                return;
            }
            c->n_query++;
        }
        q = amp + 1;
    }
}

const char *sh_query(sh_call_t *c, const char *name)
{
    if (!c->query_parsed)
        parse_query(c);
    for (int i = 0; i < c->n_query; i++)
        if (strcmp(c->query[i].name, name) == 0)
            return c->query[i].value;
    return NULL;
}

const char *sh_header(sh_call_t *c, const char *lname)
{
    if (!c->req)
        return NULL;
    size_t n = strlen(lname);
    h2o_headers_t *h = &c->req->headers;
    for (size_t i = 0; i < h->size; i++) {
        h2o_iovec_t *name = h->entries[i].name;
        if (name->len == n && strncasecmp(name->base, lname, n) == 0) {
            /* NUL-terminated copy in the request's pool. */
            h2o_iovec_t v = h->entries[i].value;
            return h2o_strdup(&c->req->pool, v.base, v.len).base;
        }
    }
    return NULL;
}

const void *sh_body(const sh_call_t *c, size_t *len)
{
    if (!c->req || !c->req->entity.base) {
        *len = 0;
        return "";
    }
    *len = c->req->entity.len;
    return c->req->entity.base;
}

json_t *sh_json_body(sh_call_t *c)
{
    if (c->json)
        return c->json;
    size_t len;
    const void *body = sh_body(c, &len);
    if (len == 0) {
        sh_respond_error(c, 400, "invalid_request_error", NULL, "invalid_json",
                         "the request body is empty: send a JSON object");
        return NULL;
    }
    json_error_t e;
    json_t *j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &e);
    if (!j) {
        sh_respond_error(c, 400, "invalid_request_error", NULL, "invalid_json",
                         "the request body is not valid JSON: line %d, column %d: %s", e.line,
                         e.column, e.text);
        return NULL;
    }
    if (!json_is_object(j)) {
        json_decref(j);
        sh_respond_error(c, 400, "invalid_request_error", NULL, "invalid_json",
                         "the request body must be a JSON object");
        return NULL;
    }
    c->json = j;
    return j;
}

const struct sched_principal *sh_principal(const sh_call_t *c)
{
    return c->has_principal ? &c->principal : NULL;
}

double sh_started(const sh_call_t *c)
{
    return c->started;
}

/* ---- Answering ----------------------------------------------------------- */

void sh_add_header(sh_call_t *c, const char *name, const char *value)
{
    if (!c->req)
        return;
    h2o_mem_pool_t *pool = &c->req->pool;
    size_t n = strlen(name);
    h2o_iovec_t lname = h2o_strdup(pool, name, n);
    for (size_t i = 0; i < n; i++)
        lname.base[i] = (char)h2o_tolower(lname.base[i]);
    h2o_iovec_t v = h2o_strdup(pool, value, strlen(value));
    h2o_add_header_by_str(pool, &c->req->res.headers, lname.base, n, 1, NULL, v.base, v.len);
}

static void answer_raw(sh_call_t *c, int status, const char *content_type, const void *body,
                       size_t len)
{
    if (c->answered)
        return;
    c->answered = true;
    h2o_req_t *req = c->req;
    if (req) {
        set_status(c, status, content_type);
        req->res.content_length = len;
    }
    release(c);
    if (req)
        h2o_send_inline(req, body, len);
}

void sh_respond_raw(sh_call_t *c, int status, const char *content_type, const void *body,
                    size_t len)
{
    if (!handler_late(c))
        answer_raw(c, status, content_type, body, len);
}

void sh_respond_json(sh_call_t *c, int status, json_t *body)
{
    char *text = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    if (!text) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                                  "\"server_error\",\"param\":null,\"code\":null}}";
        sh_respond_raw(c, 500, "application/json", oom, sizeof oom - 1);
        return;
    }
    sh_respond_raw(c, status, "application/json", text, strlen(text));
    free(text);
}

static json_t *error_object(int status, const char *type, const char *param, const char *code,
                            const char *msg)
{
    (void)status;
    return json_pack("{s:{s:s, s:s, s:o, s:o}}", "error", "message", msg, "type", type, "param",
                     param ? json_string(param) : json_null(), "code",
                     code ? json_string(code) : json_null());
}

void sh_respond_error(sh_call_t *c, int status, const char *type, const char *param,
                      const char *code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    sh_respond_json(c, status, error_object(status, type, param, code, msg));
}

bool sh_alive(const sh_call_t *c)
{
    return c->req != NULL && !c->answered;
}

static bool same_peer(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
    if (a->ss_family != b->ss_family)
        return false;
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
    return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
}

/*
 * h2o (HTTP/1) reads nothing from a connection while its request is being
 * handled, so a client that leaves before the answer starts is noticed
 * only when the answer is written. For calls that asked to be told, a
 * timer peeks at their sockets every WATCH_MS: end of stream means the
 * client has gone. The socket is found by the client's address.
 */
#define WATCH_MS 100

static void on_watch(uv_timer_t *t)
{
    struct sh_server *srv = t->data;
    bool any = false;
    for (sh_call_t *c = srv->calls, *next; c; c = next) {
        next = c->next;
        if (!c->req || c->answered || !c->gone_cb || !c->conn)
            continue;
        any = true;
        uv_os_fd_t fd;
        char b;
        if (uv_fileno((uv_handle_t *)&c->conn->tcp, &fd) != 0)
            continue;
        ssize_t n = recv(fd, &b, 1, MSG_PEEK | MSG_DONTWAIT);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
            /* The request lives on in h2o until the answer is written; the call is told now. */
            void (*cb)(sh_call_t *, void *) = c->gone_cb;
            c->gone_cb = NULL;
            cb(c, c->gone_arg); /* may answer, and so free, c (next was read before) */
        }
    }
    if (!any) {
        uv_timer_stop(t);
        srv->watching = false;
    }
}

void sh_on_gone(sh_call_t *c, void (*cb)(sh_call_t *c, void *arg), void *arg)
{
    c->gone_cb = cb;
    c->gone_arg = arg;
    struct sh_server *srv = c->srv;
    if (!cb || !c->req || c->conn || srv->stopping)
        return;
    struct sockaddr_storage peer;
    memset(&peer, 0, sizeof peer);
    if (!c->req->conn->callbacks->get_peername ||
        c->req->conn->callbacks->get_peername(c->req->conn, (struct sockaddr *)&peer) == 0)
        return;
    for (struct sh_conn *k = srv->conns; k; k = k->next) {
        if (same_peer(&k->peer, &peer)) {
            c->conn = k;
            break;
        }
    }
    if (c->conn && !srv->watching) {
        srv->watching = true;
        uv_timer_start(&srv->watch, on_watch, WATCH_MS, WATCH_MS);
    }
}

/* Hands the pending bytes (and the end, once answered) to h2o when it can take them. */
static void flush(sh_call_t *c)
{
    if (!c->req) {
        if (c->answered)
            release(c);
        return;
    }
    if (c->inflight || (c->pend_len == 0 && !c->answered))
        return;
    h2o_req_t *req = c->req;
    h2o_iovec_t buf = {NULL, 0};
    if (c->pend_len) {
        buf = h2o_strdup(&req->pool, c->pend, c->pend_len);
        buf.len = c->pend_len;
        c->pend_len = 0;
    }
    if (c->answered) {
        release(c);
        h2o_send(req, &buf, buf.len ? 1 : 0, H2O_SEND_STATE_FINAL);
        return;
    }
    c->inflight = true;
    h2o_send(req, &buf, 1, H2O_SEND_STATE_IN_PROGRESS);
}

static void gen_proceed(h2o_generator_t *g, h2o_req_t *req)
{
    (void)req;
    sh_call_t *c = ((struct stream_gen *)g)->call;
    if (!c)
        return;
    c->inflight = false;
    flush(c);
}

static void gen_stop(h2o_generator_t *g, h2o_req_t *req)
{
    (void)req;
    sh_call_t *c = ((struct stream_gen *)g)->call;
    if (c)
        client_gone(c);
}

void sh_stream_start(sh_call_t *c, int status, const char *content_type)
{
    if (c->streaming || c->answered || c->by_server)
        return;
    c->streaming = true;
    if (!c->req)
        return;
    h2o_req_t *req = c->req;
    set_status(c, status, content_type);
    struct stream_gen *g = h2o_mem_alloc_pool(&req->pool, sizeof *g);
    g->super.proceed = gen_proceed;
    g->super.stop = gen_stop;
    g->call = c;
    c->gen = g;
    h2o_start_response(req, &g->super);
    /* Send the headers now: a streaming client waits for them. */
    c->inflight = true;
    h2o_send(req, NULL, 0, H2O_SEND_STATE_IN_PROGRESS);
}

void sh_stream_write(sh_call_t *c, const void *buf, size_t len)
{
    if (!c->streaming || c->answered || !c->req || len == 0)
        return;
    if (c->pend_len + len > c->pend_cap) {
        size_t cap = c->pend_cap ? c->pend_cap : 4096;
        while (cap < c->pend_len + len)
            cap *= 2;
        char *p = realloc(c->pend, cap);
        if (!p)
            return;
        c->pend = p;
        c->pend_cap = cap;
    }
    memcpy(c->pend + c->pend_len, buf, len);
    c->pend_len += len;
    flush(c);
}

static void end_stream(sh_call_t *c)
{
    if (c->answered)
        return;
    if (!c->streaming) {
        /* Never started: an empty 200 answer. */
        answer_raw(c, 200, "text/plain", "", 0);
        return;
    }
    c->answered = true;
    flush(c);
}

void sh_stream_end(sh_call_t *c)
{
    if (!handler_late(c))
        end_stream(c);
}

/* ---- Routing ------------------------------------------------------------- */

/*
 * Matches path against pattern; on a match stores the {param} segments
 * (NUL-separated in a new buffer) in c. Returns true on a match.
 */
static bool match(const char *pattern, const char *path, sh_call_t *c)
{
    const char *p = pattern, *q = path;
    const char *caps[SH_MAX_PARAMS];
    size_t lens[SH_MAX_PARAMS];
    int n = 0;
    while (*p && *q) {
        if (*p != '/' || *q != '/')
            return false;
        p++;
        q++;
        const char *pe = strchr(p, '/'), *qe = strchr(q, '/');
        size_t pl = pe ? (size_t)(pe - p) : strlen(p);
        size_t ql = qe ? (size_t)(qe - q) : strlen(q);
        if (pl >= 2 && p[0] == '{' && p[pl - 1] == '}') {
            if (ql == 0 || n == SH_MAX_PARAMS)
                return false;
            caps[n] = q;
            lens[n++] = ql;
        } else if (pl != ql || memcmp(p, q, pl) != 0) {
            return false;
        }
        p += pl;
        q += ql;
    }
    if (*p || *q)
        return false;
    if (c) {
        size_t total = 0;
        for (int i = 0; i < n; i++)
            total += lens[i] + 1;
        free(c->pbuf);
        c->pbuf = malloc(total ? total : 1);
        if (!c->pbuf)
            return false;
        char *o = c->pbuf;
        for (int i = 0; i < n; i++) {
            memcpy(o, caps[i], lens[i]);
            o[lens[i]] = '\0';
            c->params[i] = o;
            o += lens[i] + 1;
        }
        c->n_params = n;
    }
    return true;
}

static void run_handler(sh_call_t *c)
{
    struct sched *s = c->srv->s;
    c->route->handle(s, c);
}

static void on_auth(void *arg, const struct sched_principal *p, int status, const char *message)
{
    sh_call_t *c = arg;
    if (!p) {
        const char *type = status == 401 ? "authentication_error" : "service_unavailable";
        if (status == 401)
            sh_add_header(c, "WWW-Authenticate", "Bearer");
        sh_respond_error(c, status, type, NULL, status == 401 ? "invalid_api_key" : NULL, "%s",
                         message ? message : "the API key could not be checked");
        return;
    }
    if (!(p->scopes & (c->route->needs | SCHED_SCOPE_ADMIN))) {
        sh_respond_error(c, 403, "permission_error", NULL, "insufficient_scope",
                         "this API key lacks the '%s' scope needed for %s %s",
                         c->route->needs == SCHED_SCOPE_BATCH   ? "batch"
                         : c->route->needs == SCHED_SCOPE_ADMIN ? "admin"
                                                                : "inference",
                         c->method, c->path);
        return;
    }
    c->principal = *p;
    c->has_principal = true;
    run_handler(c);
}

static void route(sh_call_t *c)
{
    bool path_known = false;
    char allow[128] = "";
    for (size_t t = 0; t < sizeof route_tables / sizeof route_tables[0]; t++) {
        const struct sh_route *r = route_tables[t].routes;
        int n = *route_tables[t].n;
        for (int i = 0; i < n; i++) {
            if (!match(r[i].pattern, c->path, NULL))
                continue;
            if (strcmp(r[i].method, c->method) != 0) {
                if (!path_known || !strstr(allow, r[i].method))
                    snprintf(allow + strlen(allow), sizeof allow - strlen(allow), "%s%s",
                             path_known ? ", " : "", r[i].method);
                path_known = true;
                continue;
            }
            if (!match(r[i].pattern, c->path, c)) {
                sh_respond_error(c, 500, "server_error", NULL, NULL, "out of memory");
                return;
            }
            c->route = &r[i];
            if (r[i].needs == 0) {
                run_handler(c);
                return;
            }
            sched_auth_check(c->srv->s, sh_header(c, "authorization"), on_auth, c);
            return;
        }
    }
    if (path_known) {
        sh_add_header(c, "Allow", allow);
        sh_respond_error(c, 405, "invalid_request_error", NULL, "method_not_allowed",
                         "%s is not allowed on %s (allowed: %s)", c->method, c->path, allow);
        return;
    }
    sh_respond_error(c, 404, "invalid_request_error", NULL, "unknown_url", "unknown URL: %s %s",
                     c->method, c->path);
}

static int on_req(h2o_handler_t *self, h2o_req_t *req)
{
    struct sh_server *srv = *(struct sh_server **)(self + 1);
    sh_call_t *c = calloc(1, sizeof *c);
    size_t plen = req->query_at != SIZE_MAX ? req->query_at : req->path.len;
    struct anchor *a = h2o_mem_alloc_shared(&req->pool, sizeof *a, anchor_dispose);
    if (!c || !(c->path = malloc(plen + 1))) {
        free(c);
        a->call = NULL;
        return -1; /* h2o answers 404 */
    }
    c->srv = srv;
    c->req = req;
    c->anchor = a;
    a->call = c;
    c->started = now_s();
    memcpy(c->path, req->path.base, plen);
    c->path[plen] = '\0';
    snprintf(c->method, sizeof c->method, "%.*s", (int)req->method.len, req->method.base);
    list_push(&srv->calls, c);
    if (req->entity.base && req->entity.len > srv->cfg.max_body) {
        sh_respond_error(c, 413, "invalid_request_error", NULL, "request_too_large",
                         "the request body (%zu bytes) is larger than the limit of %zu bytes",
                         req->entity.len, srv->cfg.max_body);
        return 0;
    }
    route(c);
    return 0;
}

/* ---- 413 from h2o as an error object ------------------------------------- */

struct rewrite_ostream {
    h2o_ostream_t super;
    h2o_iovec_t body;
};

static void rewrite_send(h2o_ostream_t *self, h2o_req_t *req, h2o_iovec_t *bufs, size_t n,
                         h2o_send_state_t state)
{
    (void)bufs;
    (void)n;
    if (h2o_send_state_is_in_progress(state)) {
        h2o_ostream_send_next(self, req, NULL, 0, state);
        return;
    }
    h2o_ostream_send_next(self, req, &((struct rewrite_ostream *)self)->body, 1, state);
}

static void on_setup_ostream(h2o_filter_t *self, h2o_req_t *req, h2o_ostream_t **slot)
{
    (void)self;
    ssize_t ct = h2o_find_header(&req->res.headers, H2O_TOKEN_CONTENT_TYPE, -1);
    if (req->res.status == 413 && ct >= 0 && req->res.headers.entries[ct].value.len >= 10 &&
        memcmp(req->res.headers.entries[ct].value.base, "text/plain", 10) == 0) {
        /* h2o's own answer: replace its body and headers before anything is sent. */
        char msg[256];
        int len =
            snprintf(msg, sizeof msg,
                     "{\"error\":{\"message\":\"the request body is larger than the limit of %zu "
                     "bytes\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":"
                     "\"request_too_large\"}}",
                     req->conn->ctx->globalconf->max_request_entity_size);
        memset(&req->res.headers, 0, sizeof req->res.headers);
        h2o_add_header(&req->pool, &req->res.headers, H2O_TOKEN_CONTENT_TYPE, NULL,
                       H2O_STRLIT("application/json"));
        req->res.content_length = (size_t)len;
        req->res.reason = "Payload Too Large";
        struct rewrite_ostream *os =
            (struct rewrite_ostream *)h2o_add_ostream(req, sizeof *os, slot);
        os->super.do_send = rewrite_send;
        os->body = h2o_strdup(&req->pool, msg, (size_t)len);
        slot = &os->super.next;
    }
    h2o_setup_next_ostream(req, slot);
}

/* ---- Health -------------------------------------------------------------- */

static void handle_healthz(struct sched *s, sh_call_t *c)
{
    sh_respond_json(
        c, 200, json_pack("{s:s, s:s}", "status", "ok", "role", s->active ? "active" : "standby"));
}

static void handle_readyz(struct sched *s, sh_call_t *c)
{
    const char *why = NULL;
    int workers = 0;
    for (struct sched_worker *w = s->workers; w; w = w->next)
        if (w->conn && w->state == SW_ACTIVE)
            workers++;
    if (s->stopping)
        why = "shutting down";
    else if (!s->active)
        why = "standby: another scheduler is active";
    else if (!sched_db_up(s))
        why = "the database is unreachable";
    else if (workers == 0)
        why = "no registered worker";
    if (why) {
        sh_add_header(c, "Retry-After", "1");
        sh_respond_json(c, 503, json_pack("{s:s, s:s}", "status", "unavailable", "reason", why));
        return;
    }
    sh_respond_json(c, 200, json_pack("{s:s, s:i}", "status", "ready", "workers", workers));
}

/* ---- The server ---------------------------------------------------------- */

static void conn_closed(uv_handle_t *h)
{
    struct sh_conn *k = (struct sh_conn *)((char *)h - offsetof(struct sh_conn, tcp));
    struct sh_server *srv = k->srv;
    for (sh_call_t *c = srv->calls; c; c = c->next)
        if (c->conn == k)
            c->conn = NULL;
    for (sh_call_t *c = srv->zombies; c; c = c->next)
        if (c->conn == k)
            c->conn = NULL;
    if (k->prev)
        k->prev->next = k->next;
    else if (srv->conns == k)
        srv->conns = k->next;
    if (k->next)
        k->next->prev = k->prev;
    free(k);
}

static void free_handle(uv_handle_t *h)
{
    free(h);
}

static void on_accept(uv_stream_t *listener, int status)
{
    struct sh_server *srv = listener->data;
    if (status < 0) {
        sp_warn("http: accepting a connection: %s", uv_strerror(status));
        return;
    }
    struct sh_conn *k = calloc(1, sizeof *k);
    if (!k)
        return;
    k->srv = srv;
    uv_tcp_init(listener->loop, &k->tcp);
    if (uv_accept(listener, (uv_stream_t *)&k->tcp) != 0) {
        uv_close((uv_handle_t *)&k->tcp, conn_closed);
        return;
    }
    uv_tcp_nodelay(&k->tcp, 1);
    int plen = sizeof k->peer;
    uv_tcp_getpeername(&k->tcp, (struct sockaddr *)&k->peer, &plen);
    k->next = srv->conns;
    if (srv->conns)
        srv->conns->prev = k;
    srv->conns = k;
    /* h2o keeps its socket in the handle's data; conn_closed finds k by offset. */
    h2o_socket_t *sock = h2o_uv_socket_create((uv_stream_t *)&k->tcp, conn_closed);
    h2o_accept(&srv->actx, sock);
}

static int write_port_file(struct sh_server *srv)
{
    if (!srv->port_file)
        return 0;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", srv->port_file);
    FILE *fp = fopen(tmp, "w");
    if (!fp)
        return SP_EIO;
    fprintf(fp, "%d\n", srv->bound_port);
    if (fclose(fp) != 0 || rename(tmp, srv->port_file) != 0) {
        unlink(tmp);
        return SP_EIO;
    }
    return 0;
}

static void try_listen(uv_timer_t *t)
{
    struct sh_server *srv = t->data;
    struct sched *s = srv->s;
    if (srv->stopping || srv->listener)
        return;
    uv_tcp_t *l = malloc(sizeof *l);
    if (!l)
        return;
    uv_tcp_init(s->loop, l);
    l->data = srv;
    int rc;
    if ((rc = uv_tcp_bind(l, (struct sockaddr *)&srv->addr, 0)) != 0 ||
        (rc = uv_listen((uv_stream_t *)l, 512, on_accept)) != 0) {
        sp_error("http: cannot listen on %s:%d: %s; trying again in 2 s", srv->cfg.host,
                 srv->cfg.port, uv_strerror(rc));
        uv_close((uv_handle_t *)l, free_handle);
        uv_timer_start(&srv->retry, try_listen, 2000, 0);
        return;
    }
    struct sockaddr_storage bound;
    int len = sizeof bound;
    uv_tcp_getsockname(l, (struct sockaddr *)&bound, &len);
    srv->bound_port = bound.ss_family == AF_INET6
                          ? ntohs(((struct sockaddr_in6 *)&bound)->sin6_port)
                          : ntohs(((struct sockaddr_in *)&bound)->sin_port);
    srv->listener = l;
    if (write_port_file(srv) != 0)
        sp_error("http: cannot write the port file %s", srv->port_file);
    sp_info("http listening port=%d", srv->bound_port);
}

int sh_server_start(struct sched *s, const struct sh_config *cfg)
{
    struct sh_server *srv = calloc(1, sizeof *srv);
    if (!srv)
        return SP_ENOMEM;
    srv->s = s;
    srv->cfg = *cfg;
    if (!srv->cfg.max_body)
        srv->cfg.max_body = 100u << 20;
    if (!srv->cfg.request_timeout_ms)
        srv->cfg.request_timeout_ms = 600000;
    srv->port_file = cfg->port_file ? strdup(cfg->port_file) : NULL;
    srv->cfg.port_file = srv->port_file;

    h2o_config_init(&srv->gc);
    srv->gc.server_name = h2o_iovec_init(H2O_STRLIT("spool"));
    srv->gc.max_request_entity_size = srv->cfg.max_body;
    srv->gc.http1.upgrade_to_http2 = 0;
    h2o_hostconf_t *host =
        h2o_config_register_host(&srv->gc, h2o_iovec_init(H2O_STRLIT("default")), 65535);
    h2o_pathconf_t *path = h2o_config_register_path(host, "/", 0);
    h2o_handler_t *h = h2o_create_handler(path, sizeof *h + sizeof srv);
    h->on_req = on_req;
    *(struct sh_server **)(h + 1) = srv;
    h2o_filter_t *f = h2o_create_filter(path, sizeof *f);
    f->on_setup_ostream = on_setup_ostream;
    /* h2o's own errors (413 before any handler) go through the host's fallback path. */
    f = h2o_create_filter(&host->fallback_path, sizeof *f);
    f->on_setup_ostream = on_setup_ostream;
    h2o_context_init(&srv->ctx, s->loop, &srv->gc);
    srv->actx.ctx = &srv->ctx;
    srv->actx.hosts = srv->gc.hosts;

    const char *hostname = srv->cfg.host[0] ? srv->cfg.host : "127.0.0.1";
    int rc = strchr(hostname, ':')
                 ? uv_ip6_addr(hostname, cfg->port, (struct sockaddr_in6 *)&srv->addr)
                 : uv_ip4_addr(hostname, cfg->port, (struct sockaddr_in *)&srv->addr);
    s->http = srv;
    uv_timer_init(s->loop, &srv->retry);
    srv->retry.data = srv;
    uv_timer_init(s->loop, &srv->watch);
    srv->watch.data = srv;
    if (rc != 0) {
        sp_error("http: bad address %s:%d", hostname, cfg->port);
        return SP_EIO;
    }
    try_listen(&srv->retry);
    return 0;
}

int sh_server_port(struct sched *s)
{
    return s->http && s->http->listener ? s->http->bound_port : 0;
}

static void shutdown_conns(struct sh_server *srv, int how)
{
    for (struct sh_conn *k = srv->conns; k; k = k->next) {
        uv_os_fd_t fd;
        if (uv_fileno((uv_handle_t *)&k->tcp, &fd) == 0)
            shutdown(fd, how);
    }
}

/*
 * After sh_server_stop: once every client connection has closed, h2o's
 * context is disposed (it holds libuv handles that would keep the loop
 * running). Connections still open after 2 s (a client that reads nothing)
 * are shut both ways, so that h2o's writes fail and it closes them.
 */
static void on_stop_tick(uv_timer_t *t)
{
    struct sh_server *srv = t->data;
    if (srv->conns) {
        if (++srv->stop_ticks == 100)
            shutdown_conns(srv, SHUT_RDWR);
        return;
    }
    uv_close((uv_handle_t *)&srv->retry, NULL);
    h2o_context_dispose(&srv->ctx);
}

void sh_server_stop(struct sched *s)
{
    struct sh_server *srv = server_of(s);
    if (!srv || srv->stopping)
        return;
    srv->stopping = true;
    uv_timer_stop(&srv->retry);
    uv_close((uv_handle_t *)&srv->watch, NULL);
    if (srv->listener) {
        uv_close((uv_handle_t *)srv->listener, free_handle);
        srv->listener = NULL;
        if (srv->port_file)
            unlink(srv->port_file);
    }
    /* End every open call; a handler that answers later only frees it. */
    static const char bye[] = "{\"error\":{\"message\":\"the scheduler is shutting down; "
                              "retry\",\"type\":\"service_unavailable\",\"param\":null,"
                              "\"code\":null}}";
    for (sh_call_t *c = srv->calls; c; c = c->next)
        if (!c->answered)
            c->by_server = true;
    for (bool again = true; again;) {
        again = false;
        for (sh_call_t *c = srv->calls; c; c = c->next) {
            if (!c->by_server || c->answered)
                continue;
            if (c->streaming)
                end_stream(c);
            else
                answer_raw(c, 503, "application/json", bye, sizeof bye - 1);
            again = true; /* the list may have changed */
            break;
        }
    }
    /* EOF on every client socket: h2o closes idle keep-alive connections now. */
    shutdown_conns(srv, SHUT_RD);
    uv_timer_start(&srv->retry, on_stop_tick, 0, 20);
}
