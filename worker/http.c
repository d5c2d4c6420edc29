/*
 * A tiny HTTP/1.0 GET client on libuv, for the cloud metadata endpoints the
 * preemption watch polls (plain HTTP on a link-local or loopback address).
 * HTTP/1.0 with "Connection: close": the body is whatever arrives before the
 * server closes, so no chunked decoding is needed. Responses are capped at
 * 64 KiB; a longer one is cut (the callers read a status and a word).
 */
#include "worker.h"

#include "spool/error.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HTTP_MAX 65536

struct http_req {
    uv_tcp_t tcp;
    uv_connect_t conn;
    uv_write_t wr;
    uv_timer_t timer;
    uv_getaddrinfo_t gai;
    char host[256], port[8];
    char *out;
    char *in;
    size_t in_len;
    wk_http_cb cb;
    void *arg;
    int status; /* result handed to cb; 0 until decided */
    bool tcp_open, done, resolving;
    int closing;
};

/* Drops one of the references counted in closing (handles closing, a lookup running). */
static void unref(struct http_req *r)
{
    if (--r->closing == 0) {
        free(r->out);
        free(r->in);
        free(r);
    }
}

static void req_free_cb(uv_handle_t *h)
{
    unref(h->data);
}

/* Calls cb once with the outcome, then closes everything. */
static void finish(struct http_req *r, int err)
{
    if (r->done)
        return;
    r->done = true;
    if (err) {
        r->cb(r->arg, err, "", 0);
    } else {
        int status = 0;
        char *body = "";
        size_t blen = 0;
        if (r->in && sscanf(r->in, "HTTP/%*d.%*d %d", &status) == 1) {
            char *b = strstr(r->in, "\r\n\r\n");
            if (b) {
                body = b + 4;
                blen = r->in_len - (size_t)(body - r->in);
            }
        }
        r->cb(r->arg, status > 0 ? status : SP_EPROTO, body, blen);
    }
    r->closing = 1 + r->resolving;
    uv_timer_stop(&r->timer);
    uv_close((uv_handle_t *)&r->timer, req_free_cb);
    if (r->tcp_open) {
        r->closing++;
        uv_close((uv_handle_t *)&r->tcp, req_free_cb);
    }
}

static void on_timeout(uv_timer_t *t)
{
    finish(t->data, SP_ETIMEDOUT);
}

static void on_alloc(uv_handle_t *h, size_t hint, uv_buf_t *buf)
{
    struct http_req *r = h->data;
    (void)hint;
    if (!r->in)
        r->in = malloc(HTTP_MAX + 1);
    buf->base = r->in ? r->in + r->in_len : NULL;
    buf->len = r->in ? HTTP_MAX - r->in_len : 0;
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct http_req *r = s->data;
    (void)buf;
    if (n > 0) {
        r->in_len += (size_t)n;
        r->in[r->in_len] = 0;
        if (r->in_len < HTTP_MAX)
            return;
    }
    if (n == 0)
        return;
    if (n < 0 && n != UV_EOF && r->in_len == 0) {
        finish(r, SP_EIO);
        return;
    }
    if (r->in)
        r->in[r->in_len] = 0;
    finish(r, r->in ? 0 : SP_EIO);
}

static void on_write(uv_write_t *wr, int status)
{
    struct http_req *r = wr->data;
    if (status < 0)
        finish(r, SP_EIO);
}

static void on_connect(uv_connect_t *c, int status)
{
    struct http_req *r = c->data;
    if (r->done)
        return;
    if (status < 0) {
        finish(r, SP_EIO);
        return;
    }
    uv_buf_t b = uv_buf_init(r->out, (unsigned)strlen(r->out));
    r->wr.data = r;
    if (uv_write(&r->wr, (uv_stream_t *)&r->tcp, &b, 1, on_write) ||
        uv_read_start((uv_stream_t *)&r->tcp, on_alloc, on_read))
        finish(r, SP_EIO);
}

static void on_resolved(uv_getaddrinfo_t *g, int status, struct addrinfo *ai)
{
    struct http_req *r = g->data;
    r->resolving = false;
    if (r->done) {
        uv_freeaddrinfo(ai);
        unref(r);
        return;
    }
    if (status < 0 || !ai) {
        uv_freeaddrinfo(ai);
        finish(r, SP_EIO);
        return;
    }
    uv_tcp_init(r->timer.loop, &r->tcp);
    r->tcp.data = r;
    r->tcp_open = true;
    r->conn.data = r;
    int rc = uv_tcp_connect(&r->conn, &r->tcp, ai->ai_addr, on_connect);
    uv_freeaddrinfo(ai);
    if (rc)
        finish(r, SP_EIO);
}

int wk_http_get(uv_loop_t *loop, const char *base_url, const char *path, const char *headers,
                unsigned timeout_ms, wk_http_cb cb, void *arg)
{
    if (strncmp(base_url, "http://", 7) != 0)
        return SP_EINVAL;
    const char *h = base_url + 7;
    size_t hl = strcspn(h, ":/");
    struct http_req *r = calloc(1, sizeof(*r));
    if (!r)
        return SP_ENOMEM;
    if (hl == 0 || hl >= sizeof(r->host)) {
        free(r);
        return SP_EINVAL;
    }
    memcpy(r->host, h, hl);
    snprintf(r->port, sizeof(r->port), "80");
    if (h[hl] == ':') {
        size_t pl = strcspn(h + hl + 1, "/");
        if (pl == 0 || pl >= sizeof(r->port)) {
            free(r);
            return SP_EINVAL;
        }
        memcpy(r->port, h + hl + 1, pl);
        r->port[pl] = 0;
    }
    /* The base URL's own path (if any) comes before path. */
    const char *bpath = h + strcspn(h, "/");
    size_t bl = strlen(bpath);
    while (bl && bpath[bl - 1] == '/')
        bl--;
    size_t need = bl + strlen(path) + strlen(r->host) + (headers ? strlen(headers) : 0) + 128;
    r->out = malloc(need);
    if (!r->out) {
        free(r);
        return SP_ENOMEM;
    }
    snprintf(r->out, need, "GET %.*s%s HTTP/1.0\r\nHost: %s\r\n%sConnection: close\r\n\r\n",
             (int)bl, bpath, path, r->host, headers ? headers : "");
    r->cb = cb;
    r->arg = arg;
    uv_timer_init(loop, &r->timer);
    r->timer.data = r;
    uv_timer_start(&r->timer, on_timeout, timeout_ms, 0);
    r->gai.data = r;
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    if (uv_getaddrinfo(loop, &r->gai, on_resolved, r->host, r->port, &hints)) {
        r->done = true;
        r->closing = 1;
        uv_close((uv_handle_t *)&r->timer, req_free_cb);
        return SP_EINVAL;
    }
    r->resolving = true;
    return 0;
}
