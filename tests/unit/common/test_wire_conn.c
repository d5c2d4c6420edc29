/*
 * sp_wire_conn over real loopback TCP in a libuv loop: a server and a client
 * exchange frames and part with GOODBYE + shutdown; a raw client that sends an
 * oversize length prefix, or garbage after a good frame, has its connection
 * closed with the reason logged and told to it in an ERROR frame.
 */
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "spool/log.h"
#include "spool/wire_conn.h"
#include "wire_samples.h"

#define HEARTBEATS 100
#define BIG_TEXT   (300 * 1024) /* spans many reads */

/* State of one test; callbacks find it through this pointer. */
static struct ctx {
    uv_loop_t loop;
    uv_tcp_t server;
    uv_timer_t timer;
    int port;
    int open_conns; /* conns and raw clients not yet closed */
    /* server side */
    int srv_register, srv_heartbeat, srv_tokens, srv_goodbye, srv_other;
    int srv_close_err;
    char srv_reason[320];
    /* client side (sp_wire_conn) */
    int cli_registered, cli_goodbye;
    uint64_t cli_worker_id;
    int cli_close_err;
    char *big_text;
    /* raw client */
    const uint8_t *raw_send;
    size_t raw_send_len;
    uint8_t *raw_got;
    size_t raw_got_len;
    int raw_eof;
    int raw_shutdown; /* shut the write side once the bytes are written */
} * T;

static void maybe_finish(void)
{
    if (--T->open_conns == 0) {
        uv_close((uv_handle_t *)&T->server, NULL);
        uv_close((uv_handle_t *)&T->timer, NULL);
    }
}

static void on_timeout(uv_timer_t *t)
{
    fail_msg("test did not finish within 20 s");
}

static void send_ok(sp_wire_conn_t *c, const struct sp_wire_frame *f)
{
    int rc = sp_wire_conn_send(c, f);
    if (rc)
        fail_msg("send %s: %s", sp_wire_type_name(f->type), sp_err_name(rc));
}

/* ---- server ---- */

static void srv_on_frame(sp_wire_conn_t *c, struct sp_wire_frame *f)
{
    struct sp_wire_frame out;
    switch (f->type) {
    case SP_WIRE_REGISTER:
        T->srv_register++;
        assert_string_equal(f->reg.name, "worker-a100-7");
        assert_int_equal(f->reg.n_models, 2);
        memset(&out, 0, sizeof out);
        out.type = SP_WIRE_REGISTERED;
        out.registered = (struct sp_wire_registered){77, 1000, 15000};
        send_ok(c, &out);
        break;
    case SP_WIRE_HEARTBEAT:
        assert_int_equal(f->heartbeat.worker_id, 77);
        assert_int_equal(f->heartbeat.queued, (uint32_t)T->srv_heartbeat);
        T->srv_heartbeat++;
        break;
    case SP_WIRE_TOKENS:
        T->srv_tokens++;
        assert_int_equal(f->tokens.text_len, BIG_TEXT);
        assert_memory_equal(f->tokens.text, T->big_text, BIG_TEXT);
        break;
    case SP_WIRE_GOODBYE:
        T->srv_goodbye++;
        assert_string_equal(f->goodbye.reason, "done");
        wire_sample(SP_WIRE_GOODBYE, 1, &out);
        send_ok(c, &out);
        assert_int_equal(sp_wire_conn_shutdown(c), 0);
        assert_int_equal(sp_wire_conn_send(c, &out), SP_ECLOSED);
        break;
    default:
        T->srv_other++;
        break;
    }
}

static void srv_on_close(sp_wire_conn_t *c, int err)
{
    T->srv_close_err = err;
    snprintf(T->srv_reason, sizeof T->srv_reason, "%s", sp_wire_conn_reason(c));
    free(sp_wire_conn_stream(c)); /* closed by now: ours to free */
    maybe_finish();
}

static void on_connection(uv_stream_t *server, int status)
{
    assert_int_equal(status, 0);
    uv_tcp_t *tcp = malloc(sizeof *tcp);
    uv_tcp_init(&T->loop, tcp);
    assert_int_equal(uv_accept(server, (uv_stream_t *)tcp), 0);
    sp_wire_conn_t *c;
    assert_int_equal(
        sp_wire_conn_open(&c, (uv_stream_t *)tcp, 1 << 20, srv_on_frame, srv_on_close, NULL), 0);
    assert_non_null(strstr(sp_wire_conn_peer(c), "127.0.0.1:"));
}

static void start(struct ctx *ctx, int conns)
{
    memset(ctx, 0, sizeof *ctx);
    T = ctx;
    T->open_conns = conns;
    T->srv_close_err = T->cli_close_err = 1;
    assert_int_equal(uv_loop_init(&T->loop), 0);
    uv_tcp_init(&T->loop, &T->server);
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", 0, &addr);
    assert_int_equal(uv_tcp_bind(&T->server, (struct sockaddr *)&addr, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&T->server, 16, on_connection), 0);
    struct sockaddr_in bound;
    int len = sizeof bound;
    uv_tcp_getsockname(&T->server, (struct sockaddr *)&bound, &len);
    T->port = ntohs(bound.sin_port);
    uv_timer_init(&T->loop, &T->timer);
    uv_timer_start(&T->timer, on_timeout, 20000, 0);
}

static void run_and_stop(void)
{
    uv_run(&T->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&T->loop), 0);
}

/* ---- client over sp_wire_conn ---- */

static void cli_on_frame(sp_wire_conn_t *c, struct sp_wire_frame *f)
{
    struct sp_wire_frame out;
    if (f->type == SP_WIRE_REGISTERED) {
        T->cli_registered++;
        T->cli_worker_id = f->registered.worker_id;
        for (uint32_t i = 0; i < HEARTBEATS; i++) {
            memset(&out, 0, sizeof out);
            out.type = SP_WIRE_HEARTBEAT;
            out.heartbeat = (struct sp_wire_heartbeat){77, 1, 2, 3, 4, i};
            send_ok(c, &out);
        }
        memset(&out, 0, sizeof out);
        out.type = SP_WIRE_TOKENS;
        out.tokens.request_id = 5;
        out.tokens.text = T->big_text;
        out.tokens.text_len = BIG_TEXT;
        send_ok(c, &out);
        memset(&out, 0, sizeof out);
        out.type = SP_WIRE_GOODBYE;
        out.goodbye.reason = "done";
        send_ok(c, &out);
        assert_int_equal(sp_wire_conn_shutdown(c), 0);
    } else if (f->type == SP_WIRE_GOODBYE) {
        T->cli_goodbye++;
    }
}

static void cli_on_close(sp_wire_conn_t *c, int err)
{
    T->cli_close_err = err;
    free(sp_wire_conn_stream(c));
    maybe_finish();
}

static void cli_on_connect(uv_connect_t *req, int status)
{
    assert_int_equal(status, 0);
    sp_wire_conn_t *c;
    assert_int_equal(sp_wire_conn_open(&c, req->handle, 1 << 20, cli_on_frame, cli_on_close, NULL),
                     0);
    struct sp_wire_frame f;
    wire_sample(SP_WIRE_REGISTER, 1, &f);
    send_ok(c, &f);
    free(req);
}

static void connect_to_server(uv_tcp_t *tcp, uv_connect_cb cb)
{
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", T->port, &addr);
    uv_tcp_init(&T->loop, tcp);
    uv_connect_t *req = malloc(sizeof *req);
    assert_int_equal(uv_tcp_connect(req, tcp, (struct sockaddr *)&addr, cb), 0);
}

static void exchange_and_goodbye(void **state)
{
    (void)state;
    struct ctx ctx;
    start(&ctx, 2);
    T->big_text = malloc(BIG_TEXT);
    for (size_t i = 0; i < BIG_TEXT; i++)
        T->big_text[i] = (char)('a' + i % 26);
    connect_to_server(malloc(sizeof(uv_tcp_t)), cli_on_connect);
    run_and_stop();
    assert_int_equal(T->srv_register, 1);
    assert_int_equal(T->srv_heartbeat, HEARTBEATS);
    assert_int_equal(T->srv_tokens, 1);
    assert_int_equal(T->srv_goodbye, 1);
    assert_int_equal(T->srv_other, 0);
    assert_int_equal(T->cli_registered, 1);
    assert_int_equal(T->cli_worker_id, 77);
    assert_int_equal(T->cli_goodbye, 1);
    /* Both sides shut down and then saw the other's EOF: a clean close. */
    assert_int_equal(T->srv_close_err, 0);
    assert_int_equal(T->cli_close_err, 0);
    free(T->big_text);
}

/* ---- raw client: sends fixed bytes, records everything until EOF ---- */

static void raw_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    T->raw_got = realloc(T->raw_got, T->raw_got_len + 65536);
    *buf = uv_buf_init((char *)T->raw_got + T->raw_got_len, 65536);
}

static void raw_closed(uv_handle_t *h)
{
    free(h);
    maybe_finish();
}

static void raw_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    if (nread > 0) {
        T->raw_got_len += (size_t)nread;
    } else if (nread < 0) {
        T->raw_eof = nread == UV_EOF ? 1 : -1;
        uv_close((uv_handle_t *)s, raw_closed);
    }
}

static void raw_shut(uv_shutdown_t *req, int status)
{
    free(req);
}

static void raw_written(uv_write_t *req, int status)
{
    assert_int_equal(status, 0);
    if (T->raw_shutdown) {
        uv_shutdown_t *sh = malloc(sizeof *sh);
        assert_int_equal(uv_shutdown(sh, req->handle, raw_shut), 0);
    }
    free(req);
}

static void raw_on_connect(uv_connect_t *req, int status)
{
    assert_int_equal(status, 0);
    uv_write_t *w = malloc(sizeof *w);
    uv_buf_t b = uv_buf_init((char *)T->raw_send, (unsigned)T->raw_send_len);
    assert_int_equal(uv_write(w, req->handle, &b, 1, raw_written), 0);
    assert_int_equal(uv_read_start(req->handle, raw_alloc, raw_read), 0);
    free(req);
}

/* Runs a raw client against the server, capturing the server's log lines. */
static void run_raw(const uint8_t *bytes, size_t n, char *log, size_t logcap)
{
    FILE *tmp = tmpfile();
    assert_non_null(tmp);
    sp_log_init("test");
    sp_log_set_level(SP_LOG_WARN);
    sp_log_set_fd(fileno(tmp));
    T->raw_send = bytes;
    T->raw_send_len = n;
    connect_to_server(malloc(sizeof(uv_tcp_t)), raw_on_connect);
    run_and_stop();
    sp_log_set_fd(2);
    rewind(tmp);
    size_t got = fread(log, 1, logcap - 1, tmp);
    log[got] = '\0';
    fclose(tmp);
}

/* Decodes what the raw client received; returns the number of frames, the last in *last. */
static int received_frames(struct sp_wire_frame *last)
{
    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, 0);
    assert_int_equal(sp_wire_decoder_feed(&d, T->raw_got, T->raw_got_len), 0);
    int n = 0, rc;
    struct sp_wire_frame f;
    memset(last, 0, sizeof *last);
    while ((rc = sp_wire_decoder_next(&d, &f)) == 1) {
        sp_wire_frame_free(last);
        sp_wire_frame_move(last, &f);
        n++;
    }
    assert_int_equal(rc, SP_EAGAIN);
    assert_int_equal(sp_wire_decoder_pending(&d), 0);
    sp_wire_decoder_free(&d);
    return n;
}

static void oversize_prefix_closes(void **state)
{
    (void)state;
    struct ctx ctx;
    start(&ctx, 2);
    static const uint8_t prefix[4] = {0xff, 0xff, 0xff, 0xff};
    char log[4096];
    run_raw(prefix, sizeof prefix, log, sizeof log);
    assert_int_equal(T->srv_close_err, SP_ETOOBIG);
    assert_non_null(strstr(T->srv_reason, "4294967295 bytes, over the limit of 1048576"));
    assert_non_null(strstr(log, "wire 127.0.0.1:"));
    assert_non_null(strstr(log, "4294967295 bytes, over the limit"));
    assert_non_null(strstr(log, "SP_ETOOBIG"));
    assert_int_equal(T->raw_eof, 1);
    struct sp_wire_frame f;
    assert_int_equal(received_frames(&f), 1);
    assert_int_equal(f.type, SP_WIRE_ERROR);
    assert_string_equal(f.error.code, "SP_ETOOBIG");
    assert_non_null(strstr(f.error.message, "over the limit"));
    sp_wire_frame_free(&f);
    free(T->raw_got);
}

static void garbage_after_good_frame_closes(void **state)
{
    (void)state;
    struct ctx ctx;
    start(&ctx, 2);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    struct sp_wire_frame f;
    wire_sample(SP_WIRE_REGISTER, 1, &f);
    assert_int_equal(sp_wire_encode(&sb, &f, NULL, 0), 0);
    static const uint8_t garbage[] = {0, 0, 0, 3, 0x92, 0x01, 0xc1};
    msgpack_sbuffer_write(&sb, (const char *)garbage, sizeof garbage);
    char log[4096];
    run_raw((const uint8_t *)sb.data, sb.size, log, sizeof log);
    assert_int_equal(T->srv_register, 1); /* the good frame was delivered first */
    assert_int_equal(T->srv_close_err, SP_ECORRUPT);
    assert_non_null(strstr(log, "frame 2"));
    assert_non_null(strstr(log, "0xc1"));
    assert_int_equal(T->raw_eof, 1);
    /* REGISTERED for the good frame, then ERROR for the bad one. */
    assert_int_equal(received_frames(&f), 2);
    assert_int_equal(f.type, SP_WIRE_ERROR);
    assert_string_equal(f.error.code, "SP_ECORRUPT");
    sp_wire_frame_free(&f);
    msgpack_sbuffer_destroy(&sb);
    free(T->raw_got);
}

static void peer_close_mid_frame(void **state)
{
    (void)state;
    struct ctx ctx;
    start(&ctx, 2);
    T->raw_shutdown = 1;
    static const uint8_t partial[] = {0, 0, 0, 9, 0x93, 0x01};
    char log[4096];
    run_raw(partial, sizeof partial, log, sizeof log);
    assert_int_equal(T->srv_close_err, SP_ECLOSED);
    assert_non_null(strstr(log, "inside a frame (6 bytes pending)"));
    assert_int_equal(T->raw_eof, 1);
    assert_int_equal(T->raw_got_len, 0);
    free(T->raw_got);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN); /* a write to a closed peer must fail, not kill the test */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(exchange_and_goodbye),
        cmocka_unit_test(oversize_prefix_closes),
        cmocka_unit_test(garbage_after_good_frame_closes),
        cmocka_unit_test(peer_close_mid_frame),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
