/*
 * The scheduler's HTTP front (the live lane and the OpenAI-compatible API),
 * served by h2o on the scheduler's libuv loop.
 *
 * Files:
 *   http.c      the server: listener, h2o set-up, routing, authentication,
 *               the sh_call life cycle, responses, streaming
 *   (handlers)  one file per group of endpoints, each exporting a route table
 *
 * A handler gets an sh_call_t: one HTTP request to answer. It answers at once
 * or later (after database queries, after a worker's tokens), but it answers
 * exactly once, with one of sh_respond_json, sh_respond_raw, sh_respond_error,
 * or by sh_stream_start ... sh_stream_end. The call stays valid until then,
 * even when the client has gone away: answering a call whose client left is
 * allowed and only frees it (sh_alive says whether anyone is listening, and
 * sh_on_gone asks to be told at once). After answering, the handler must not
 * touch the call again.
 *
 * Errors are OpenAI-style objects:
 *   {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
 * with types invalid_request_error (400, 404, 413), authentication_error
 * (401), permission_error (403), rate_limit_error (429), server_error (500)
 * and service_unavailable (503).
 *
 * Everything runs on the scheduler's loop thread; nothing here is
 * thread-safe.
 */
#ifndef SPOOL_SCHEDULER_HTTP_H
#define SPOOL_SCHEDULER_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

struct sched;
typedef struct sh_call sh_call_t;

/* Who is calling, once the call's bearer key has been checked (auth.h). */
struct sched_principal {
    int64_t key_id;
    char tenant[72];
    char key_prefix[24]; /* the key's first characters, for logs */
    unsigned scopes;     /* SCHED_SCOPE_* bits */
    uint32_t rpm_limit;  /* requests per minute, 0: unlimited */
    uint32_t tpm_limit;  /* tokens per minute, 0: unlimited */
};

#define SCHED_SCOPE_INFERENCE 1u /* /v1/completions, /v1/chat/completions, /v1/models */
#define SCHED_SCOPE_BATCH     2u /* /v1/files, /v1/batches */
#define SCHED_SCOPE_ADMIN     4u /* everything, every tenant */

/*
 * A route: METHOD and a path pattern whose segments are literal or "{name}"
 * (one segment, captured in order: sh_param(c, 0), ...). needs is the scope
 * a key must hold (0: no key needed, as for /healthz). The server matches
 * routes in table order; a path that matches no route gets 404, a path that
 * matches with another method gets 405.
 */
struct sh_route {
    const char *method;  /* "GET", "POST", "DELETE" */
    const char *pattern; /* "/v1/batches/{id}/cancel" */
    unsigned needs;      /* SCHED_SCOPE_* bit, or 0 */
    void (*handle)(struct sched *s, sh_call_t *c);
};

/* ---- The request --------------------------------------------------------- */

const char *sh_method(const sh_call_t *c);
/* The path without its query string, NUL-terminated. */
const char *sh_path(const sh_call_t *c);
/* A path parameter by position ("{id}"), NUL-terminated; NULL past the last. */
const char *sh_param(const sh_call_t *c, int i);
/* A query-string parameter, URL-decoded, or NULL; valid until the call is answered. */
const char *sh_query(sh_call_t *c, const char *name);
/* A request header by lower-case name, NUL-terminated, or NULL. */
const char *sh_header(sh_call_t *c, const char *lname);
/* The whole request body (the server has read it all); len may be 0. */
const void *sh_body(const sh_call_t *c, size_t *len);
/*
 * The body parsed as a JSON object. On failure it answers the call itself
 * (400 invalid_request_error naming the line and column, or saying the body
 * is not an object) and returns NULL: the handler then just returns. The
 * object belongs to the call (do not decref); valid until answered.
 */
json_t *sh_json_body(sh_call_t *c);
/* The caller, for a route with needs != 0; NULL on routes without a key. */
const struct sched_principal *sh_principal(const sh_call_t *c);
/* Seconds (CLOCK_MONOTONIC) when the request's headers arrived. */
double sh_started(const sh_call_t *c);

/* ---- Answering ----------------------------------------------------------- */

/* Adds a response header (copied); call before answering. */
void sh_add_header(sh_call_t *c, const char *name, const char *value);
/* Answers with a JSON body (takes over the reference to body). */
void sh_respond_json(sh_call_t *c, int status, json_t *body);
/* Answers with bytes (copied) of the given content type. */
void sh_respond_raw(sh_call_t *c, int status, const char *content_type, const void *body,
                    size_t len);
/*
 * Answers with an OpenAI-style error object. param and code may be NULL
 * (sent as null). The message is a printf format.
 */
void sh_respond_error(sh_call_t *c, int status, const char *type, const char *param,
                      const char *code, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

/* True while the client is connected and the call is unanswered. */
bool sh_alive(const sh_call_t *c);
/*
 * Asks to be told when the client goes away before the call is answered
 * (at most one callback per call; replaces an earlier one). The callback
 * runs on the loop; the call is still valid in it and must still be
 * answered (or ended, if streaming) by the handler, at once or later.
 */
void sh_on_gone(sh_call_t *c, void (*cb)(sh_call_t *c, void *arg), void *arg);

/*
 * Streaming (Server-Sent Events and other chunked bodies): start once, write
 * any number of times, end once. Writes are buffered by the server while a
 * previous write is still going out, so a handler may write as tokens
 * arrive without waiting. sh_stream_end finishes the body and answers the
 * call. Writing to a call whose client left is allowed and drops the bytes.
 */
void sh_stream_start(sh_call_t *c, int status, const char *content_type);
void sh_stream_write(sh_call_t *c, const void *buf, size_t len);
void sh_stream_end(sh_call_t *c);

/* ---- The server ---------------------------------------------------------- */

struct sh_config {
    char host[256];
    int port;                    /* 0: the kernel picks one */
    const char *port_file;       /* NULL, or where the bound port is written */
    size_t max_body;             /* larger bodies get 413; 0: 100 MiB */
    unsigned request_timeout_ms; /* a live request's whole time; 0: 600000 */
};

/*
 * Starts listening (every scheduler serves HTTP, active or standby). Returns
 * 0, or SP_EIO for an address that does not parse. An address in use is
 * not fatal: it is logged and tried again every 2 s.
 */
int sh_server_start(struct sched *s, const struct sh_config *cfg);
/* Stops listening and ends every open call. */
void sh_server_stop(struct sched *s);
/* The server's configuration (defaults filled in), or NULL before sh_server_start. */
const struct sh_config *sh_server_config(struct sched *s);
/* The bound HTTP port, or 0 while not listening. */
int sh_server_port(struct sched *s);

#endif
