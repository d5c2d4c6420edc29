/*
 * sp_pgconn_t: one PostgreSQL connection driven by a libuv loop.
 *
 * States (one function changes each transition):
 *
 *   WAIT --timer--> CONNECTING --PQconnectPoll OK--> SETUP --LISTENs done--> READY
 *    ^                  |  (attempt_failed)            |  (broken)              |
 *    +------------------+------------------------------+------------------------+
 *   any state --sp_pgconn_close--> CLOSED (handles closing, then freed)
 *
 * SETUP is skipped when there is no channel to LISTEN on. The one timer
 * serves every state: the retry delay in WAIT, the attempt's deadline in
 * CONNECTING, and in SETUP/READY a deferred "the socket failed" from
 * sp_pgconn_query (which must not call callbacks itself).
 *
 * The uv_poll_t lives in its own allocation because the socket can change
 * (during an attempt, and at every reconnect) while the old handle still waits
 * for its close callback. A watch must never outlive the socket it was made
 * for: during an attempt libpq may close a socket and get the same number back
 * for a new one, and an epoll MOD on that number would fail (libuv aborts).
 * So every step of an attempt stops and restarts the watch (epoll DEL + ADD).
 * libuv 1.44's uv_poll_start happens to do that itself; the explicit stop keeps
 * this correct without relying on it.
 */
#include "spool/error.h"
#include "spool/log.h"
#include "spool/pg.h"
#include "pg_internal.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum state { ST_WAIT, ST_CONNECTING, ST_SETUP, ST_READY, ST_CLOSED };
enum qkind { Q_USER, Q_LISTEN, Q_SETUP };

/* One queued statement; sql and params live in the same allocation. */
struct pgq {
    struct pgq *next;
    enum qkind kind;
    sp_pgconn_result_cb cb;
    void *arg;
    uint64_t queued_ms; /* uv_hrtime in ms, for queue_wait_ms */
    int nparams;
    char *sql;
    char **params;
};

struct pgpoll {
    uv_poll_t h;
    sp_pgconn_t *conn;
    int fd;
};

struct sp_pgconn {
    uv_loop_t *loop;
    char *dsn;
    char where[256]; /* host/port/dbname/user for messages */
    struct sp_pgconn_opts o;
    enum state state;
    PGconn *pg;
    struct pgpoll *poll; /* the current socket's handle, or NULL */
    uv_timer_t timer;
    struct sp_backoff backoff;
    struct pgq *head, *tail; /* not yet sent */
    struct pgq *inflight;    /* sent, its result not complete */
    PGresult *inflight_res;  /* the result kept for inflight so far */
    bool want_write;         /* PQflush returned 1: watch for writable */
    bool io_error;           /* a send from sp_pgconn_query failed; handled by the timer */
    unsigned failures;       /* failed attempts since the last success */
    char **channels;
    size_t nchannels, capchannels;
    unsigned pending_closes; /* uv_close callbacks still to come */
    void (*close_cb)(void *arg);
    void *close_arg;
    char last_err[512];
};

static void on_poll(uv_poll_t *h, int status, int events);
static void on_timer(uv_timer_t *t);
static void broken(sp_pgconn_t *c, const char *why);

static uint64_t mono_ms(void)
{
    return uv_hrtime() / 1000000u;
}

/* ---- queue --------------------------------------------------------------- */

static struct pgq *q_new(enum qkind kind, const char *sql, int nparams, const char *const *params)
{
    size_t size = sizeof(struct pgq) + (size_t)nparams * sizeof(char *) + strlen(sql) + 1;
    for (int i = 0; i < nparams; i++)
        if (params[i])
            size += strlen(params[i]) + 1;
    struct pgq *q = calloc(1, size);
    if (!q)
        return NULL;
    q->kind = kind;
    q->nparams = nparams;
    q->params = (char **)(q + 1);
    char *p = (char *)(q->params + nparams);
    for (int i = 0; i < nparams; i++) {
        if (params[i]) {
            size_t n = strlen(params[i]) + 1;
            q->params[i] = memcpy(p, params[i], n);
            p += n;
        }
    }
    q->sql = strcpy(p, sql);
    q->queued_ms = mono_ms();
    return q;
}

static void q_push(sp_pgconn_t *c, struct pgq *q)
{
    q->next = NULL;
    if (c->tail)
        c->tail->next = q;
    else
        c->head = q;
    c->tail = q;
}

static void q_push_front(sp_pgconn_t *c, struct pgq *q)
{
    q->next = c->head;
    c->head = q;
    if (!c->tail)
        c->tail = q;
}

static struct pgq *q_pop(sp_pgconn_t *c)
{
    struct pgq *q = c->head;
    if (q) {
        c->head = q->next;
        if (!c->head)
            c->tail = NULL;
        q->next = NULL;
    }
    return q;
}

/* Gives a user entry its one callback, then frees it and res. Internal entries are just freed. */
static void q_finish(sp_pgconn_t *c, struct pgq *q, PGresult *res, const char *err)
{
    if (q->kind == Q_USER && q->cb)
        q->cb(c, res, err, q->arg);
    PQclear(res);
    free(q);
}

/* Writes "LISTEN "a"; LISTEN "b"" (quoted identifiers) for the given channels into a new string. */
static char *listen_sql(char *const *channels, size_t n)
{
    size_t cap = 1;
    for (size_t i = 0; i < n; i++)
        cap += 10 + 2 * strlen(channels[i]) + 2;
    char *s = malloc(cap), *p = s;
    if (!s)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        p += sprintf(p, "%sLISTEN \"", i ? "; " : "");
        for (const char *ch = channels[i]; *ch; ch++) {
            if (*ch == '"')
                *p++ = '"';
            *p++ = *ch;
        }
        *p++ = '"';
    }
    *p = '\0';
    return s;
}

/* ---- socket and handles -------------------------------------------------- */

static void maybe_free(sp_pgconn_t *c);

static void on_poll_closed(uv_handle_t *h)
{
    struct pgpoll *p = h->data;
    sp_pgconn_t *c = p->conn;
    free(p);
    c->pending_closes--;
    maybe_free(c);
}

static void drop_poll(sp_pgconn_t *c)
{
    if (!c->poll)
        return;
    uv_close((uv_handle_t *)&c->poll->h, on_poll_closed);
    c->pending_closes++;
    c->poll = NULL;
}

/* Ends the server connection: the watch goes before the socket does. */
static void teardown_pg(sp_pgconn_t *c)
{
    drop_poll(c);
    if (c->pg)
        PQfinish(c->pg);
    c->pg = NULL;
    c->want_write = false;
    c->io_error = false;
}

/*
 * Watches PQsocket for events. restart: stop and start the watch even when the
 * socket number is unchanged (during an attempt, see the top of the file).
 */
static int watch(sp_pgconn_t *c, int events, bool restart)
{
    int fd = PQsocket(c->pg);
    if (fd < 0)
        return SP_ECLOSED;
    if (c->poll && c->poll->fd != fd)
        drop_poll(c);
    if (!c->poll) {
        struct pgpoll *p = calloc(1, sizeof *p);
        if (!p)
            return SP_ENOMEM;
        if (uv_poll_init(c->loop, &p->h, fd) != 0) {
            free(p);
            return SP_EIO;
        }
        p->h.data = p;
        p->conn = c;
        p->fd = fd;
        c->poll = p;
    } else if (restart) {
        uv_poll_stop(&c->poll->h);
    }
    return uv_poll_start(&c->poll->h, events, on_poll) ? SP_EIO : 0;
}

/* Watches for results and notifications, and for writable while output is pending. */
static int arm(sp_pgconn_t *c)
{
    return watch(c, UV_READABLE | (c->want_write ? UV_WRITABLE : 0), false);
}

static int flush(sp_pgconn_t *c)
{
    int r = PQflush(c->pg);
    if (r < 0)
        return SP_EIO;
    c->want_write = r == 1;
    return arm(c);
}

/*
 * Sends the head of the queue when nothing is in flight and the state allows
 * (only the SETUP entry in SETUP). Calls no callbacks; returns SP_EIO when the
 * connection failed (the entry stays queued unless it was already sent).
 */
static int pump(sp_pgconn_t *c)
{
    struct pgq *q = c->head;
    if (c->inflight || !c->pg || !q)
        return 0;
    if (!(c->state == ST_READY || (c->state == ST_SETUP && q->kind == Q_SETUP)))
        return 0;
    q_pop(c);
    int ok = q->kind == Q_USER ? PQsendQueryParams(c->pg, q->sql, q->nparams, NULL,
                                                   (const char *const *)q->params, NULL, NULL, 0)
                               : PQsendQuery(c->pg, q->sql);
    if (!ok) {
        q_push_front(c, q);
        return SP_EIO;
    }
    c->inflight = q;
    return flush(c);
}

/* ---- connecting ---------------------------------------------------------- */

/* Fails queued user queries that have waited longer than queue_wait_ms for a connection. */
static void expire_queue(sp_pgconn_t *c)
{
    uint64_t now = mono_ms();
    struct pgq *expired = NULL, **tailp = &expired;
    for (struct pgq **pp = &c->head; *pp;) {
        struct pgq *q = *pp;
        if (q->kind == Q_USER && now - q->queued_ms >= c->o.queue_wait_ms) {
            *pp = q->next;
            q->next = NULL;
            *tailp = q;
            tailp = &q->next;
        } else {
            pp = &q->next;
        }
    }
    c->tail = NULL;
    for (struct pgq *q = c->head; q; q = q->next)
        c->tail = q;
    /* Detached first: the callbacks may queue more or close the connection. */
    while (expired) {
        struct pgq *q = expired;
        expired = q->next;
        char err[1024];
        snprintf(err, sizeof err,
                 "no connection to PostgreSQL (%s) for %llu ms, the query was not sent: %s",
                 c->where, (unsigned long long)(now - q->queued_ms),
                 c->last_err[0] ? c->last_err : "still connecting");
        q_finish(c, q, NULL, err);
    }
}

static void attempt_failed(sp_pgconn_t *c, const char *why)
{
    sp__pg_one_line(c->last_err, sizeof c->last_err, why);
    teardown_pg(c);
    c->state = ST_WAIT;
    unsigned delay = sp_backoff_next(&c->backoff);
    uv_timer_start(&c->timer, on_timer, delay, 0);
    if (c->failures++ == 0)
        sp_warn("cannot connect to PostgreSQL (%s): %s; retrying", c->where, c->last_err);
    else
        sp_debug("cannot connect to PostgreSQL (%s), attempt %u: %s; next in %u ms", c->where,
                 c->failures, c->last_err, delay);
    expire_queue(c);
}

static void start_attempt(sp_pgconn_t *c)
{
    c->state = ST_CONNECTING;
    c->pg = PQconnectStart(c->dsn);
    if (!c->pg)
        return attempt_failed(c, "out of memory");
    sp_pg_log_notices(c->pg);
    if (PQstatus(c->pg) == CONNECTION_BAD)
        return attempt_failed(c, PQerrorMessage(c->pg));
    uv_timer_start(&c->timer, on_timer, c->o.connect_timeout_ms, 0);
    /* libpq's rule: before the first PQconnectPoll, wait as if it returned WRITING. */
    if (watch(c, UV_WRITABLE, true))
        return attempt_failed(c, "cannot watch the socket");
}

static void become_ready(sp_pgconn_t *c)
{
    c->state = ST_READY;
    if (c->failures)
        sp_info("connected to PostgreSQL (%s) after %u failed attempts", c->where, c->failures);
    c->failures = 0;
    c->last_err[0] = '\0';
    if (c->o.on_up)
        c->o.on_up(c, c->o.arg);
    if (c->state == ST_READY && pump(c))
        broken(c, NULL);
}

static void connected(sp_pgconn_t *c)
{
    uv_timer_stop(&c->timer);
    if (PQsetnonblocking(c->pg, 1) != 0)
        return attempt_failed(c, PQerrorMessage(c->pg));
    sp_backoff_reset(&c->backoff);
    if (arm(c))
        return attempt_failed(c, "cannot watch the socket");
    if (!c->nchannels)
        return become_ready(c);
    char *sql = listen_sql(c->channels, c->nchannels);
    struct pgq *q = sql ? q_new(Q_SETUP, sql, 0, NULL) : NULL;
    free(sql);
    if (!q)
        return attempt_failed(c, "out of memory");
    q_push_front(c, q);
    c->state = ST_SETUP;
    if (pump(c))
        broken(c, NULL);
}

static void connect_step(sp_pgconn_t *c)
{
    switch (PQconnectPoll(c->pg)) {
    case PGRES_POLLING_OK:
        return connected(c);
    case PGRES_POLLING_READING:
        if (watch(c, UV_READABLE, true))
            return attempt_failed(c, "cannot watch the socket");
        return;
    case PGRES_POLLING_WRITING:
        if (watch(c, UV_WRITABLE, true))
            return attempt_failed(c, "cannot watch the socket");
        return;
    default:
        return attempt_failed(c, PQerrorMessage(c->pg));
    }
}

/* ---- connected ----------------------------------------------------------- */

/*
 * The connection broke in SETUP or READY: the running query fails (it is never
 * re-sent: it may have taken effect), queued ones stay for the next connection,
 * and LISTENs are dropped from the queue because the next SETUP re-issues them.
 * why NULL: take libpq's message.
 */
static void broken(sp_pgconn_t *c, const char *why)
{
    bool was_up = c->state == ST_READY;
    sp__pg_one_line(c->last_err, sizeof c->last_err,
                    why     ? why
                    : c->pg ? PQerrorMessage(c->pg)
                            : "connection lost");
    if (!c->last_err[0])
        snprintf(c->last_err, sizeof c->last_err, "connection lost");
    teardown_pg(c);
    c->state = ST_WAIT;
    struct pgq *q = c->inflight;
    PGresult *res = c->inflight_res;
    c->inflight = NULL;
    c->inflight_res = NULL;
    for (struct pgq **pp = &c->head; *pp;) {
        if ((*pp)->kind != Q_USER) {
            struct pgq *dead = *pp;
            *pp = dead->next;
            free(dead);
        } else {
            pp = &(*pp)->next;
        }
    }
    c->tail = NULL;
    for (struct pgq *t = c->head; t; t = t->next)
        c->tail = t;
    uv_timer_start(&c->timer, on_timer, sp_backoff_next(&c->backoff), 0);
    sp_warn("lost the connection to PostgreSQL (%s): %s; reconnecting", c->where, c->last_err);

    char msg[sizeof c->last_err];
    snprintf(msg, sizeof msg, "%s", c->last_err);
    if (q) {
        ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
        if (st != PGRES_FATAL_ERROR && st != PGRES_NONFATAL_ERROR) {
            PQclear(res);
            res = NULL;
        }
        char detail[1024], err[1600];
        if (res)
            sp_pg_result_error(NULL, res, detail, sizeof detail);
        snprintf(err, sizeof err,
                 "connection to PostgreSQL (%s) lost while the query ran, its outcome is "
                 "unknown: %s",
                 c->where, res ? detail : msg);
        q_finish(c, q, res, err);
        if (c->state == ST_CLOSED)
            return;
    }
    if (was_up && c->o.on_down)
        c->o.on_down(c, msg, c->o.arg);
}

static bool failed_status(ExecStatusType st)
{
    return st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_SINGLE_TUPLE;
}

/* The in-flight entry's last result arrived. Returns false when processing must stop. */
static bool complete(sp_pgconn_t *c)
{
    struct pgq *q = c->inflight;
    PGresult *res = c->inflight_res;
    c->inflight = NULL;
    c->inflight_res = NULL;
    char err[1024];
    bool failed = !res || failed_status(PQresultStatus(res));
    if (failed)
        sp_pg_result_error(c->pg, res, err, sizeof err);
    switch (q->kind) {
    case Q_SETUP:
        q_finish(c, q, res, NULL);
        if (failed) {
            char why[1100];
            snprintf(why, sizeof why, "LISTEN failed: %s", err);
            broken(c, why);
            return false;
        }
        become_ready(c);
        break;
    case Q_LISTEN:
        if (failed)
            sp_error("PostgreSQL (%s): %s failed: %s", c->where, q->sql, err);
        q_finish(c, q, res, NULL);
        break;
    case Q_USER:
        q_finish(c, q, res, failed ? err : NULL);
        break;
    }
    return c->state == ST_READY || c->state == ST_SETUP;
}

/* Collects results while libpq has complete ones. Returns false when processing must stop. */
static bool drain_results(sp_pgconn_t *c)
{
    while (c->inflight && !PQisBusy(c->pg)) {
        PGresult *r = PQgetResult(c->pg);
        if (!r) {
            if (!complete(c))
                return false;
            continue;
        }
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
            PQclear(r);
            broken(c, "COPY is not supported on an sp_pgconn_t connection");
            return false;
        }
        /* A multi-statement entry (the LISTENs) keeps its first error, else its last result. */
        if (!c->inflight_res) {
            c->inflight_res = r;
        } else if (failed_status(PQresultStatus(c->inflight_res))) {
            PQclear(r);
        } else {
            PQclear(c->inflight_res);
            c->inflight_res = r;
        }
    }
    return true;
}

static bool drain_notifies(sp_pgconn_t *c)
{
    PGnotify *n;
    while (c->pg && (n = PQnotifies(c->pg)) != NULL) {
        if (c->o.on_notify)
            c->o.on_notify(c, n->relname, n->extra ? n->extra : "", c->o.arg);
        PQfreemem(n);
        if (c->state != ST_READY && c->state != ST_SETUP)
            return false;
    }
    return true;
}

static void on_io(sp_pgconn_t *c, int events)
{
    if ((events & UV_READABLE) && !PQconsumeInput(c->pg))
        return broken(c, NULL);
    /* libpq's rule: after reading, flush again while output is pending. */
    if (c->want_write && flush(c))
        return broken(c, NULL);
    if (!drain_results(c) || !drain_notifies(c))
        return;
    if (PQstatus(c->pg) == CONNECTION_BAD)
        return broken(c, NULL);
    if (pump(c) || arm(c))
        broken(c, NULL);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    sp_pgconn_t *c = ((struct pgpoll *)h->data)->conn;
    if (status < 0) {
        char why[256];
        snprintf(why, sizeof why, "socket error: %s", uv_strerror(status));
        if (c->state == ST_CONNECTING)
            return attempt_failed(c, why);
        if (c->state == ST_SETUP || c->state == ST_READY)
            broken(c, why);
        return;
    }
    if (c->state == ST_CONNECTING)
        connect_step(c);
    else if (c->state == ST_SETUP || c->state == ST_READY)
        on_io(c, events);
}

static void on_timer(uv_timer_t *t)
{
    sp_pgconn_t *c = t->data;
    switch (c->state) {
    case ST_WAIT:
        expire_queue(c);
        if (c->state == ST_WAIT)
            start_attempt(c);
        break;
    case ST_CONNECTING: {
        char why[128];
        snprintf(why, sizeof why, "no connection within %u ms", c->o.connect_timeout_ms);
        attempt_failed(c, why);
        break;
    }
    case ST_SETUP:
    case ST_READY:
        if (c->io_error)
            broken(c, NULL);
        break;
    case ST_CLOSED:
        break;
    }
}

/* ---- public -------------------------------------------------------------- */

int sp_pgconn_open(uv_loop_t *loop, const char *dsn, const struct sp_pgconn_opts *opts,
                   sp_pgconn_t **out)
{
    *out = NULL;
    char where[256];
    if (!loop || sp_pg_dsn_describe(dsn, where, sizeof where))
        return SP_EINVAL;
    sp_pgconn_t *c = calloc(1, sizeof *c);
    if (!c || !(c->dsn = strdup(dsn))) {
        free(c);
        return SP_ENOMEM;
    }
    c->loop = loop;
    memcpy(c->where, where, sizeof where);
    if (opts)
        c->o = *opts;
    if (!c->o.backoff_base_ms)
        c->o.backoff_base_ms = 100;
    if (!c->o.backoff_cap_ms)
        c->o.backoff_cap_ms = 5000;
    if (!c->o.connect_timeout_ms)
        c->o.connect_timeout_ms = 10000;
    if (!c->o.queue_wait_ms)
        c->o.queue_wait_ms = 30000;
    sp_backoff_init(&c->backoff, c->o.backoff_base_ms, c->o.backoff_cap_ms,
                    uv_hrtime() ^ (uint64_t)(uintptr_t)c ^ ((uint64_t)getpid() << 40));
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->state = ST_WAIT;
    uv_timer_start(&c->timer, on_timer, 0, 0);
    *out = c;
    return 0;
}

int sp_pgconn_query(sp_pgconn_t *c, const char *sql, int nparams, const char *const *params,
                    sp_pgconn_result_cb cb, void *arg)
{
    if (!sql || nparams < 0 || nparams > 65535 || (nparams && !params))
        return SP_EINVAL;
    if (c->state == ST_CLOSED)
        return SP_ECLOSED;
    struct pgq *q = q_new(Q_USER, sql, nparams, params);
    if (!q)
        return SP_ENOMEM;
    q->cb = cb;
    q->arg = arg;
    q_push(c, q);
    if (pump(c) && !c->io_error) {
        /* Callbacks must not run inside this call: let the timer handle the failure. */
        c->io_error = true;
        uv_timer_start(&c->timer, on_timer, 0, 0);
    }
    return 0;
}

int sp_pgconn_listen(sp_pgconn_t *c, const char *channel)
{
    if (!channel || !*channel || strlen(channel) > 63)
        return SP_EINVAL;
    if (c->state == ST_CLOSED)
        return SP_ECLOSED;
    for (size_t i = 0; i < c->nchannels; i++)
        if (!strcmp(c->channels[i], channel))
            return 0;
    if (c->nchannels == c->capchannels) {
        size_t cap = c->capchannels ? 2 * c->capchannels : 4;
        char **ch = realloc(c->channels, cap * sizeof *ch);
        if (!ch)
            return SP_ENOMEM;
        c->channels = ch;
        c->capchannels = cap;
    }
    char *name = strdup(channel);
    if (!name)
        return SP_ENOMEM;
    /* Not connected: the next SETUP issues it with the others. */
    if (c->state == ST_SETUP || c->state == ST_READY) {
        char *sql = listen_sql(&name, 1);
        struct pgq *q = sql ? q_new(Q_LISTEN, sql, 0, NULL) : NULL;
        free(sql);
        if (!q) {
            free(name);
            return SP_ENOMEM;
        }
        q_push(c, q);
        if (pump(c) && !c->io_error) {
            c->io_error = true;
            uv_timer_start(&c->timer, on_timer, 0, 0);
        }
    }
    c->channels[c->nchannels++] = name;
    return 0;
}

bool sp_pgconn_is_up(const sp_pgconn_t *c)
{
    return c->state == ST_READY;
}

const char *sp_pgconn_last_error(const sp_pgconn_t *c)
{
    return c->last_err;
}

static void on_timer_closed(uv_handle_t *h)
{
    sp_pgconn_t *c = h->data;
    c->pending_closes--;
    maybe_free(c);
}

/* After the last close callback: fail what is left, tell the owner, free. */
static void maybe_free(sp_pgconn_t *c)
{
    if (c->state != ST_CLOSED || c->pending_closes)
        return;
    if (c->inflight) {
        PQclear(c->inflight_res);
        q_finish(c, c->inflight, NULL,
                 "connection closed while the query ran, its outcome is unknown");
    }
    struct pgq *q;
    while ((q = q_pop(c)) != NULL)
        q_finish(c, q, NULL, "connection closed before the query was sent");
    for (size_t i = 0; i < c->nchannels; i++)
        free(c->channels[i]);
    free(c->channels);
    free(c->dsn);
    if (c->close_cb)
        c->close_cb(c->close_arg);
    free(c);
}

void sp_pgconn_close(sp_pgconn_t *c, void (*close_cb)(void *arg), void *arg)
{
    if (!c || c->state == ST_CLOSED)
        return;
    c->state = ST_CLOSED;
    c->close_cb = close_cb;
    c->close_arg = arg;
    teardown_pg(c);
    uv_close((uv_handle_t *)&c->timer, on_timer_closed);
    c->pending_closes++;
}
