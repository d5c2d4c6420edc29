/*
 * sp_wire_conn: the wire protocol over a libuv stream. See spool/wire_conn.h
 * for the contract and the state diagram. sp_wire_conn_shutdown() moves
 * OPEN -> SHUT; only close_with() moves to CLOSING, and only on_uv_close()
 * frees.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool/log.h"
#include "spool/wire_conn.h"

#define READ_BUF 65536

struct sp_wire_conn {
    uv_stream_t *stream;
    sp_wire_frame_cb on_frame;
    sp_wire_close_cb on_close;
    void *data;
    struct sp_wire_decoder dec;
    uint32_t max_frame;
    enum { OPEN, SHUT, CLOSING } state;
    uv_shutdown_t shutdown_req;
    int close_err;
    char peer[64];
    char reason[320];
    char rbuf[READ_BUF]; /* libuv reads here; one read is in flight at a time */
};

/* One uv_write and the bytes it owns until its callback. */
struct write_req {
    uv_write_t req;
    msgpack_sbuffer sb;
};

static void on_uv_close(uv_handle_t *h)
{
    sp_wire_conn_t *c = h->data;
    h->data = NULL;
    if (c->on_close)
        c->on_close(c, c->close_err);
    sp_wire_decoder_free(&c->dec);
    free(c);
}

__attribute__((format(printf, 3, 4))) static void close_with(sp_wire_conn_t *c, int err,
                                                             const char *fmt, ...)
{
    if (c->state == CLOSING)
        return;
    c->state = CLOSING;
    c->close_err = err;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->reason, sizeof c->reason, fmt, ap);
    va_end(ap);
    uv_read_stop(c->stream);
    uv_close((uv_handle_t *)c->stream, on_uv_close);
}

void sp_wire_conn_close(sp_wire_conn_t *c)
{
    close_with(c, 0, "closed locally");
}

static void on_shutdown(uv_shutdown_t *req, int status)
{
    sp_wire_conn_t *c = req->data;
    if (status < 0 && status != UV_ECANCELED && c->state != CLOSING) {
        sp_warn("wire %s: shutdown failed: %s", c->peer, uv_strerror(status));
        close_with(c, SP_EIO, "shutdown failed: %s", uv_strerror(status));
    }
}

int sp_wire_conn_shutdown(sp_wire_conn_t *c)
{
    if (c->state != OPEN)
        return SP_ECLOSED;
    c->state = SHUT;
    c->shutdown_req.data = c;
    int r = uv_shutdown(&c->shutdown_req, c->stream, on_shutdown);
    if (r) {
        close_with(c, SP_EIO, "shutdown failed: %s", uv_strerror(r));
        return SP_EIO;
    }
    return 0;
}

/* Tells the peer why, if the socket takes the bytes right now; never waits. */
static void send_error_now(sp_wire_conn_t *c, int err, const char *reason)
{
    if (c->state != OPEN || uv_stream_get_write_queue_size(c->stream) != 0)
        return;
    struct sp_wire_frame f = {.type = SP_WIRE_ERROR};
    f.error.code = sp_err_name(err);
    f.error.message = reason;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    if (sp_wire_encode(&sb, &f, NULL, 0) == 0) {
        uv_buf_t b = uv_buf_init(sb.data, (unsigned)sb.size);
        (void)uv_try_write(c->stream, &b, 1);
    }
    msgpack_sbuffer_destroy(&sb);
}

static void protocol_error(sp_wire_conn_t *c, int err)
{
    const char *why = sp_wire_decoder_reason(&c->dec);
    sp_warn("wire %s: closing connection: %s (%s)", c->peer, why, sp_err_name(err));
    send_error_now(c, err, why);
    close_with(c, err, "%s", why);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    sp_wire_conn_t *c = h->data;
    *buf = uv_buf_init(c->rbuf, sizeof c->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    sp_wire_conn_t *c = s->data;
    if (c->state == CLOSING)
        return;
    if (nread == UV_EOF && c->state == SHUT) {
        close_with(c, 0, "closed after shutdown");
        return;
    }
    if (nread == UV_EOF) {
        size_t left = sp_wire_decoder_pending(&c->dec);
        if (left) {
            sp_warn("wire %s: peer closed the connection inside a frame (%zu bytes pending)",
                    c->peer, left);
            close_with(c, SP_ECLOSED, "peer closed the connection inside a frame (%zu bytes)",
                       left);
        } else {
            close_with(c, SP_ECLOSED, "peer closed the connection");
        }
        return;
    }
    if (nread < 0) {
        sp_warn("wire %s: read failed: %s", c->peer, uv_strerror((int)nread));
        close_with(c, SP_EIO, "read failed: %s", uv_strerror((int)nread));
        return;
    }
    int rc = sp_wire_decoder_feed(&c->dec, buf->base, (size_t)nread);
    while (rc == 0 && c->state != CLOSING) {
        struct sp_wire_frame f;
        rc = sp_wire_decoder_next(&c->dec, &f);
        if (rc == 1) {
            c->on_frame(c, &f);
            sp_wire_frame_free(&f);
            rc = 0;
        }
    }
    if (rc < 0 && rc != SP_EAGAIN && c->state != CLOSING)
        protocol_error(c, rc);
}

int sp_wire_conn_open(sp_wire_conn_t **out, uv_stream_t *stream, uint32_t max_frame,
                      sp_wire_frame_cb on_frame, sp_wire_close_cb on_close, void *data)
{
    if (!stream || !on_frame)
        return SP_EINVAL;
    sp_wire_conn_t *c = calloc(1, sizeof *c);
    if (!c)
        return SP_ENOMEM;
    c->stream = stream;
    c->on_frame = on_frame;
    c->on_close = on_close;
    c->data = data;
    c->max_frame = max_frame ? max_frame : SP_WIRE_MAX_FRAME_DEFAULT;
    if (c->max_frame > UINT32_MAX - SP_WIRE_PREFIX) /* so that a frame's bytes fit a uv_buf_t */
        c->max_frame = UINT32_MAX - SP_WIRE_PREFIX;
    sp_wire_decoder_init(&c->dec, c->max_frame);
    snprintf(c->peer, sizeof c->peer, "stream");
    if (stream->type == UV_TCP) {
        struct sockaddr_storage ss;
        int len = sizeof ss;
        if (uv_tcp_getpeername((uv_tcp_t *)stream, (struct sockaddr *)&ss, &len) == 0) {
            char ip[48] = "?";
            int port = 0;
            if (ss.ss_family == AF_INET) {
                struct sockaddr_in *a = (struct sockaddr_in *)&ss;
                uv_ip4_name(a, ip, sizeof ip);
                port = ntohs(a->sin_port);
            } else if (ss.ss_family == AF_INET6) {
                struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
                uv_ip6_name(a, ip, sizeof ip);
                port = ntohs(a->sin6_port);
            }
            snprintf(c->peer, sizeof c->peer, "%s:%d", ip, port);
        }
    }
    void *old = stream->data;
    stream->data = c;
    int r = uv_read_start(stream, on_alloc, on_read);
    if (r) {
        stream->data = old;
        sp_wire_decoder_free(&c->dec);
        free(c);
        return SP_EIO;
    }
    *out = c;
    return 0;
}

static void on_write(uv_write_t *req, int status)
{
    struct write_req *w = (struct write_req *)req;
    sp_wire_conn_t *c = req->data;
    msgpack_sbuffer_destroy(&w->sb);
    free(w);
    if (status < 0 && status != UV_ECANCELED && c->state != CLOSING) {
        sp_warn("wire %s: write failed: %s", c->peer, uv_strerror(status));
        close_with(c, SP_EIO, "write failed: %s", uv_strerror(status));
    }
}

int sp_wire_conn_send(sp_wire_conn_t *c, const struct sp_wire_frame *f)
{
    if (c->state != OPEN)
        return SP_ECLOSED;
    struct write_req *w = malloc(sizeof *w);
    if (!w)
        return SP_ENOMEM;
    msgpack_sbuffer_init(&w->sb);
    char err[200];
    int rc = sp_wire_encode(&w->sb, f, err, sizeof err);
    if (rc == 0 && w->sb.size - SP_WIRE_PREFIX > c->max_frame) {
        snprintf(err, sizeof err, "%s frame of %zu bytes exceeds the limit of %u",
                 sp_wire_type_name(f->type), w->sb.size - SP_WIRE_PREFIX, c->max_frame);
        rc = SP_ETOOBIG;
    }
    if (rc == 0) {
        uv_buf_t b = uv_buf_init(w->sb.data, (unsigned)w->sb.size);
        w->req.data = c;
        if (uv_write(&w->req, c->stream, &b, 1, on_write) == 0)
            return 0;
        snprintf(err, sizeof err, "uv_write refused the frame");
        rc = SP_EIO;
    }
    sp_warn("wire %s: cannot send: %s", c->peer, err);
    msgpack_sbuffer_destroy(&w->sb);
    free(w);
    return rc;
}

void *sp_wire_conn_data(const sp_wire_conn_t *c)
{
    return c->data;
}

uv_stream_t *sp_wire_conn_stream(const sp_wire_conn_t *c)
{
    return c->stream;
}

const char *sp_wire_conn_peer(const sp_wire_conn_t *c)
{
    return c->peer;
}

const char *sp_wire_conn_reason(const sp_wire_conn_t *c)
{
    return c->reason;
}

size_t sp_wire_conn_write_queue(const sp_wire_conn_t *c)
{
    return uv_stream_get_write_queue_size(c->stream);
}
