/*
 * The scheduler's HTTP front end to end: the real spool-scheduler (argv[1])
 * as a child process on a real PostgreSQL (pgtest), spoken to with curl,
 * and fake workers (threads speaking the wire protocol over blocking
 * sockets) that register a model and answer LIVE_REQUEST with TOKENS.
 *
 * Every wait polls with a generous deadline, so the tests hold on a loaded
 * machine.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <arpa/inet.h>
#include <cmocka.h>
#include <jansson.h>

#include "pgtest.h"
#include "spool/wire.h"

#define WAIT_MS 20000

static const char *sched_bin;
static const char *node_script; /* tests/node/openai_live.mjs */
static struct pgt pg;
static PGconn *db;
static char tmpdir[256];
static pid_t sched_pid;
static int http_port, worker_port;

static const char DIGEST[] = "1111111111111111111111111111111111111111111111111111111111111111";

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

/* ---- SQL ----------------------------------------------------------------- */

static char *sql_scalar(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *sql_scalar(const char *fmt, ...)
{
    char sql[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    char *v = pgt_scalar(db, sql);
    if (!v)
        fail_msg("%s: no value (%s)", sql, PQerrorMessage(db));
    return v;
}

/* Creates an API key; returns the key (static buffer per slot) and its id. */
static const char *make_key(const char *tenant, const char *scopes, long long *id)
{
    static char keys[8][128];
    static int next;
    char *k = keys[next++ % 8];
    char *v = sql_scalar("SELECT id || ' ' || key FROM spool.create_api_key('%s', 'test', '%s')",
                         tenant, scopes);
    assert_int_equal(sscanf(v, "%lld %127s", id, k), 2);
    free(v);
    return k;
}

/* ---- HTTP through curl ---------------------------------------------------- */

struct resp {
    int status;
    char *body;
    char *headers;
    json_t *json; /* the body parsed, or NULL */
};

static void resp_free(struct resp *r)
{
    free(r->body);
    free(r->headers);
    json_decref(r->json);
    memset(r, 0, sizeof *r);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return strdup("");
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    size_t got = fread(buf, 1, (size_t)n, fp);
    buf[got] = '\0';
    fclose(fp);
    if (len)
        *len = got;
    return buf;
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, len, fp), len);
    fclose(fp);
}

/*
 * Starts curl in the background as request n: METHOD http://127.0.0.1:PORT/PATH
 * with the bearer key (NULL: no header) and body (NULL: none); extra: more
 * curl arguments (NULL-ended). Collect it with curl_wait.
 */
static pid_t curl_spawn(int n, const char *method, const char *path, const char *key,
                        const char *body, size_t body_len, const char *const *extra)
{
    char bodyf[400], outf[400], hdrf[400], codef[400], url[512], auth[400], data[420];
    snprintf(bodyf, sizeof bodyf, "%s/req%d", tmpdir, n);
    snprintf(outf, sizeof outf, "%s/out%d", tmpdir, n);
    snprintf(hdrf, sizeof hdrf, "%s/hdr%d", tmpdir, n);
    snprintf(codef, sizeof codef, "%s/code%d", tmpdir, n);
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", http_port, path);
    const char *argv[64];
    int a = 0;
    argv[a++] = "curl";
    argv[a++] = "-s";
    argv[a++] = "-o";
    argv[a++] = outf;
    argv[a++] = "-D";
    argv[a++] = hdrf;
    argv[a++] = "-w";
    argv[a++] = "%{http_code}";
    argv[a++] = "-X";
    argv[a++] = method;
    argv[a++] = "--max-time";
    argv[a++] = "60";
    if (key) {
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", key);
        argv[a++] = "-H";
        argv[a++] = auth;
    }
    if (body) {
        write_file(bodyf, body, body_len);
        snprintf(data, sizeof data, "@%s", bodyf);
        argv[a++] = "-H";
        argv[a++] = "Content-Type: application/json";
        argv[a++] = "--data-binary";
        argv[a++] = data;
    }
    for (int i = 0; extra && extra[i]; i++)
        argv[a++] = extra[i];
    argv[a++] = url;
    argv[a] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(codef, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        execvp("curl", (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static struct resp curl_wait(int n, pid_t pid)
{
    char bodyf[400], outf[400], hdrf[400], codef[400];
    snprintf(bodyf, sizeof bodyf, "%s/req%d", tmpdir, n);
    snprintf(outf, sizeof outf, "%s/out%d", tmpdir, n);
    snprintf(hdrf, sizeof hdrf, "%s/hdr%d", tmpdir, n);
    snprintf(codef, sizeof codef, "%s/code%d", tmpdir, n);
    int st;
    waitpid(pid, &st, 0);
    char *code = read_file(codef, NULL);
    struct resp out = {.status = atoi(code)};
    free(code);
    out.body = read_file(outf, NULL);
    out.headers = read_file(hdrf, NULL);
    out.json = json_loads(out.body, 0, NULL);
    unlink(bodyf);
    unlink(outf);
    unlink(hdrf);
    unlink(codef);
    return out;
}

static int next_req(void)
{
    static int seq = 1000;
    return seq++;
}

static struct resp http_ex(const char *method, const char *path, const char *key, const char *body,
                           size_t body_len, const char *const *extra)
{
    int n = next_req();
    return curl_wait(n, curl_spawn(n, method, path, key, body, body_len, extra));
}

static struct resp http(const char *method, const char *path, const char *key, const char *body)
{
    return http_ex(method, path, key, body, body ? strlen(body) : 0, NULL);
}

/* The error object's field ("type", "message", "param", "code"), or "". */
static const char *err_field(const struct resp *r, const char *field)
{
    json_t *v = json_object_get(json_object_get(r->json, "error"), field);
    return json_is_string(v) ? json_string_value(v) : "";
}

static void assert_error(const struct resp *r, int status, const char *type)
{
    if (r->status != status || strcmp(err_field(r, "type"), type) != 0)
        fail_msg("expected %d %s, got %d: %s", status, type, r->status, r->body);
    assert_true(strlen(err_field(r, "message")) > 0);
    assert_non_null(json_object_get(json_object_get(r->json, "error"), "param"));
    assert_non_null(json_object_get(json_object_get(r->json, "error"), "code"));
}

/* ---- The scheduler -------------------------------------------------------- */

static int read_port(const char *path)
{
    FILE *fp = fopen(path, "r");
    if (!fp)
        return 0;
    int port = 0;
    if (fscanf(fp, "%d", &port) != 1)
        port = 0;
    fclose(fp);
    return port;
}

static void print_log(void)
{
    char p[400];
    snprintf(p, sizeof p, "%s/sched.log", tmpdir);
    char *log = read_file(p, NULL);
    fprintf(stderr, "---- scheduler log ----\n%s\n----\n", log);
    free(log);
}

static void start_scheduler(const char *max_body, const char *timeout_ms)
{
    char pf[400], hpf[400], logf[400];
    snprintf(pf, sizeof pf, "%s/port", tmpdir);
    snprintf(hpf, sizeof hpf, "%s/http-port", tmpdir);
    snprintf(logf, sizeof logf, "%s/sched.log", tmpdir);
    unlink(pf);
    unlink(hpf);
    sched_pid = fork();
    assert_true(sched_pid >= 0);
    if (sched_pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        int fd = open(logf, O_WRONLY | O_CREAT | O_APPEND, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        for (int i = 3; i < 1024; i++)
            close(i);
        execl(sched_bin, sched_bin, "--dsn", pg.dsn, "--listen", "127.0.0.1:0", "--port-file", pf,
              "--http-listen", "127.0.0.1:0", "--http-port-file", hpf, "--http-max-body", max_body,
              "--request-timeout-ms", timeout_ms, "--heartbeat-ms", "500", "--lock-retry-ms", "100",
              "--sweep-ms", "200", (char *)NULL);
        _exit(127);
    }
    long long t0 = now_ms();
    while ((http_port = read_port(hpf)) == 0 || (worker_port = read_port(pf)) == 0) {
        int st;
        if (waitpid(sched_pid, &st, WNOHANG) == sched_pid) {
            print_log();
            fail_msg("the scheduler exited early");
        }
        if (now_ms() - t0 > WAIT_MS) {
            print_log();
            fail_msg("the scheduler did not become active");
        }
        sleep_ms(20);
    }
}

static void stop_scheduler(void)
{
    if (sched_pid <= 0)
        return;
    long long t0 = now_ms();
    kill(sched_pid, SIGTERM);
    int st;
    assert_int_equal(waitpid(sched_pid, &st, 0), sched_pid);
    sched_pid = 0;
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        print_log();
        fail_msg("the scheduler did not exit cleanly (status %d)", st);
    }
    /* Idle keep-alive clients must not hold the shutdown up. */
    assert_true(now_ms() - t0 < 5000);
}

/* ---- Fake workers ---------------------------------------------------------- */

struct fake_worker {
    int fd;
    pthread_t thread;
    pthread_mutex_t mu;
    uint64_t worker_id;
    /* What LIVE_REQUEST gets: n_pieces TOKENS frames of these texts, delay_ms apart. */
    const char *const *pieces;
    int n_pieces;
    int delay_ms;
    bool hang; /* never answer (for timeouts and cancellation) */
    /* Observed. */
    int n_live, n_cancel, n_live_chat;
    struct sp_wire_live_request last; /* owned copies of the last LIVE_REQUEST */
    struct sp_wire_frame last_frame;
    bool stop;
};

static int send_frame(struct fake_worker *w, const struct sp_wire_frame *f)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    char err[256];
    int rc = sp_wire_encode(&sb, f, err, sizeof err);
    if (rc == 0) {
        pthread_mutex_lock(&w->mu);
        size_t off = 0;
        while (off < sb.size) {
            ssize_t n = send(w->fd, sb.data + off, sb.size - off, MSG_NOSIGNAL);
            if (n <= 0) {
                rc = -1;
                break;
            }
            off += (size_t)n;
        }
        pthread_mutex_unlock(&w->mu);
    }
    msgpack_sbuffer_destroy(&sb);
    return rc;
}

/* Reads the next frame (blocking); returns 1, or 0 at EOF/error. */
static int read_frame(struct fake_worker *w, struct sp_wire_decoder *d, struct sp_wire_frame *f)
{
    for (;;) {
        int rc = sp_wire_decoder_next(d, f);
        if (rc == 1)
            return 1;
        if (rc != SP_EAGAIN)
            return 0;
        char buf[65536];
        ssize_t n = recv(w->fd, buf, sizeof buf, 0);
        if (n <= 0)
            return 0;
        sp_wire_decoder_feed(d, buf, (size_t)n);
    }
}

static void send_final(struct fake_worker *w, uint64_t rid, const char *reason)
{
    struct sp_wire_frame t = {.type = SP_WIRE_TOKENS};
    t.tokens.request_id = rid;
    t.tokens.finish_reason = reason;
    send_frame(w, &t);
}

/* Waits up to ms for a frame; returns 1 with it, 0 when none came, -1 at EOF. */
static int poll_frame(struct fake_worker *w, struct sp_wire_decoder *d, struct sp_wire_frame *f,
                      int ms)
{
    long long end = now_ms() + ms;
    for (;;) {
        int rc = sp_wire_decoder_next(d, f);
        if (rc == 1)
            return 1;
        if (rc != SP_EAGAIN)
            return -1;
        long long left = end - now_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = w->fd, .events = POLLIN};
        if (poll(&p, 1, (int)left) <= 0)
            continue;
        char buf[65536];
        ssize_t n = recv(w->fd, buf, sizeof buf, 0);
        if (n <= 0)
            return -1;
        sp_wire_decoder_feed(d, buf, (size_t)n);
    }
}

static void *worker_main(void *arg)
{
    struct fake_worker *w = arg;
    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, 0);
    struct sp_wire_frame f = {0};
    while (!w->stop && read_frame(w, &d, &f)) {
        if (f.type == SP_WIRE_CANCEL) {
            __atomic_fetch_add(&w->n_cancel, 1, __ATOMIC_SEQ_CST);
            send_final(w, f.cancel.request_id, "cancelled");
        } else if (f.type == SP_WIRE_LIVE_REQUEST) {
            uint64_t rid = f.live.request_id;
            pthread_mutex_lock(&w->mu);
            w->n_live++;
            if (f.live.n_messages)
                w->n_live_chat++;
            sp_wire_frame_free(&w->last_frame);
            sp_wire_frame_move(&w->last_frame, &f);
            pthread_mutex_unlock(&w->mu);
            if (w->hang)
                continue;
            uint32_t out = 0;
            bool cancelled = false;
            for (int i = 0; i < w->n_pieces && !cancelled; i++) {
                /* Wait between pieces, but hear a CANCEL at once. */
                struct sp_wire_frame g = {0};
                int got;
                while (w->delay_ms && (got = poll_frame(w, &d, &g, w->delay_ms)) == 1) {
                    if (g.type == SP_WIRE_CANCEL) {
                        __atomic_fetch_add(&w->n_cancel, 1, __ATOMIC_SEQ_CST);
                        send_final(w, g.cancel.request_id, "cancelled");
                        cancelled = g.cancel.request_id == rid;
                    }
                    sp_wire_frame_free(&g);
                    if (cancelled)
                        break;
                }
                if (cancelled)
                    break;
                struct sp_wire_frame t = {.type = SP_WIRE_TOKENS};
                int32_t id = 100 + i;
                t.tokens.request_id = rid;
                t.tokens.token_ids = &id;
                t.tokens.n_token_ids = 1;
                t.tokens.text = w->pieces[i];
                t.tokens.text_len = strlen(w->pieces[i]);
                t.tokens.finish_reason = i == w->n_pieces - 1 ? "stop" : NULL;
                send_frame(w, &t);
                out++;
            }
            struct sp_wire_frame u = {.type = SP_WIRE_USAGE};
            u.usage.has_request_id = true;
            u.usage.request_id = rid;
            u.usage.tokens_in = 7;
            u.usage.tokens_out = out;
            send_frame(w, &u);
        }
        sp_wire_frame_free(&f);
    }
    sp_wire_frame_free(&f);
    sp_wire_decoder_free(&d);
    return NULL;
}

/* Connects a fake worker with the test model loaded and waits for REGISTERED. */
static struct fake_worker *worker_start(const char *const *pieces, int n_pieces, int delay_ms)
{
    struct fake_worker *w = calloc(1, sizeof *w);
    pthread_mutex_init(&w->mu, NULL);
    w->pieces = pieces;
    w->n_pieces = n_pieces;
    w->delay_ms = delay_ms;
    w->fd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(w->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)worker_port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    assert_int_equal(connect(w->fd, (struct sockaddr *)&a, sizeof a), 0);
    char digest[80];
    snprintf(digest, sizeof digest, "sha256:%s", DIGEST);
    struct sp_wire_model m = {"demo", 2, digest};
    struct sp_wire_frame f = {.type = SP_WIRE_REGISTER};
    f.reg = (struct sp_wire_register){.name = "fake",
                                      .gpu_type = "cpu",
                                      .gpu_memory = 1,
                                      .models = &m,
                                      .n_models = 1,
                                      .max_batch = 8,
                                      .backend = "cpu"};
    assert_int_equal(send_frame(w, &f), 0);
    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, 0);
    struct sp_wire_frame r = {0};
    assert_int_equal(read_frame(w, &d, &r), 1);
    assert_int_equal(r.type, SP_WIRE_REGISTERED);
    w->worker_id = r.registered.worker_id;
    sp_wire_frame_free(&r);
    assert_int_equal(sp_wire_decoder_pending(&d), 0);
    sp_wire_decoder_free(&d);
    /* One heartbeat with free slots. */
    struct sp_wire_frame hb = {.type = SP_WIRE_HEARTBEAT};
    hb.heartbeat = (struct sp_wire_heartbeat){.worker_id = w->worker_id, .free_slots = 8};
    send_frame(w, &hb);
    pthread_create(&w->thread, NULL, worker_main, w);
    return w;
}

static void worker_stop(struct fake_worker *w)
{
    w->stop = true;
    shutdown(w->fd, SHUT_RDWR);
    pthread_join(w->thread, NULL);
    close(w->fd);
    sp_wire_frame_free(&w->last_frame);
    pthread_mutex_destroy(&w->mu);
    free(w);
}

/* ---- Fixtures -------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    pgt_start(&pg, true);
    db = pgt_connect(&pg);
    char *v = sql_scalar(
        "INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, "
        "n_params, context_length) VALUES ('demo', 1, '%s', 'file:///m1', 1, 'llama', 'bf16', 1, "
        "2048), ('demo', 2, '%s', 'file:///m2', 1, 'llama', 'bf16', 1, 4096) RETURNING 'ok'",
        "2222222222222222222222222222222222222222222222222222222222222222", DIGEST);
    free(v);
    v = sql_scalar("INSERT INTO spool.model_aliases (name, alias, version) VALUES "
                   "('demo', 'prod', 2), ('demo', 'old', 1) RETURNING 'ok'");
    free(v);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (sched_pid > 0) {
        kill(sched_pid, SIGKILL);
        waitpid(sched_pid, NULL, 0);
        sched_pid = 0;
    }
    PQfinish(db);
    pgt_stop(&pg);
    return 0;
}

/* ---- Tests ------------------------------------------------------------------ */

/* /healthz, /readyz, 404, 405, 413, malformed JSON, keys: missing, invalid, revoked, scope. */
static void server_basics(void **state)
{
    (void)state;
    start_scheduler("1000", "5000");

    struct resp r = http("GET", "/healthz", NULL, NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(json_string_value(json_object_get(r.json, "status")), "ok");
    resp_free(&r);

    /* Active with the database up, but no worker yet. */
    long long t0 = now_ms();
    for (;;) {
        r = http("GET", "/readyz", NULL, NULL);
        assert_int_equal(r.status, 503);
        const char *why = json_string_value(json_object_get(r.json, "reason"));
        if (why && strcmp(why, "no registered worker") == 0)
            break;
        assert_true(now_ms() - t0 < WAIT_MS);
        resp_free(&r);
        sleep_ms(50);
    }
    resp_free(&r);
    struct fake_worker *w = worker_start(NULL, 0, 0);
    r = http("GET", "/readyz", NULL, NULL);
    assert_int_equal(r.status, 200);
    resp_free(&r);

    r = http("GET", "/nope", NULL, NULL);
    assert_error(&r, 404, "invalid_request_error");
    resp_free(&r);
    r = http("GET", "/v1/models/demo/extra", NULL, NULL);
    assert_error(&r, 404, "invalid_request_error");
    resp_free(&r);

    r = http("POST", "/healthz", NULL, "{}");
    assert_error(&r, 405, "invalid_request_error");
    assert_non_null(strstr(r.headers, "allow: GET"));
    resp_free(&r);

    /* Over --http-max-body 1000: an error object, not h2o's plain text. */
    char big[1500];
    memset(big, ' ', sizeof big);
    big[0] = '{';
    big[sizeof big - 1] = '}';
    r = http_ex("POST", "/v1/chat/completions", NULL, big, sizeof big, NULL);
    assert_error(&r, 413, "invalid_request_error");
    assert_string_equal(err_field(&r, "code"), "request_too_large");
    resp_free(&r);

    /* Keys. */
    r = http("GET", "/v1/models", NULL, NULL);
    assert_error(&r, 401, "authentication_error");
    resp_free(&r);
    r = http("GET", "/v1/models", "sk-spool-nosuchkey", NULL);
    assert_error(&r, 401, "authentication_error");
    resp_free(&r);
    long long id, bid;
    const char *key = make_key("acme", "{inference}", &id);
    const char *bkey = make_key("acme", "{batch}", &bid);
    r = http("GET", "/v1/models", bkey, NULL);
    assert_error(&r, 403, "permission_error");
    resp_free(&r);
    r = http("GET", "/v1/models", key, NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(json_string_value(json_object_get(r.json, "object")), "list");
    json_t *data = json_object_get(r.json, "data");
    assert_int_equal(json_array_size(data), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(data, 1), "id")),
                        "demo@2");
    assert_string_equal(
        json_string_value(json_array_get(json_object_get(json_array_get(data, 1), "aliases"), 0)),
        "prod");
    resp_free(&r);
    r = http("GET", "/v1/models/demo@old", key, NULL);
    assert_int_equal(r.status, 200);
    assert_string_equal(json_string_value(json_object_get(r.json, "id")), "demo@1");
    resp_free(&r);
    r = http("GET", "/v1/models/nosuch", key, NULL);
    assert_error(&r, 404, "invalid_request_error");
    resp_free(&r);

    /* Malformed JSON names the line and column. */
    r = http("POST", "/v1/chat/completions", key, "{\n  \"model\": \"demo\",\n  oops\n}");
    assert_error(&r, 400, "invalid_request_error");
    assert_non_null(strstr(err_field(&r, "message"), "line 3"));
    assert_non_null(strstr(err_field(&r, "message"), "column"));
    resp_free(&r);
    r = http("POST", "/v1/chat/completions", key, "[1, 2]");
    assert_error(&r, 400, "invalid_request_error");
    resp_free(&r);

    /* Revoked: refused at once (NOTIFY), not after the cache's lifetime. */
    free(sql_scalar("SELECT spool.revoke_api_key(%lld)", id));
    t0 = now_ms();
    for (;;) {
        r = http("GET", "/v1/models", key, NULL);
        if (r.status == 401)
            break;
        assert_int_equal(r.status, 200);
        assert_true(now_ms() - t0 < 3000);
        resp_free(&r);
        sleep_ms(20);
    }
    assert_error(&r, 401, "authentication_error");
    assert_non_null(strstr(err_field(&r, "message"), "revoked"));
    resp_free(&r);

    worker_stop(w);
    stop_scheduler();
}

/* ---- The live lane ---------------------------------------------------------- */

static const char *const PIECES[] = {"Hel", "lo", " \"wor\\ld\"\n"};
static const char WHOLE[] = "Hello \"wor\\ld\"\n";

static void wait_ready(void)
{
    long long t0 = now_ms();
    for (;;) {
        struct resp r = http("GET", "/readyz", NULL, NULL);
        int st = r.status;
        resp_free(&r);
        if (st == 200)
            return;
        assert_true(now_ms() - t0 < WAIT_MS);
        sleep_ms(50);
    }
}

/* Replaces the value of every "id":"..." with ID and "created":N with T. */
static char *normalise(const char *in)
{
    char *out = malloc(strlen(in) + 1), *o = out;
    const char *p = in;
    while (*p) {
        if (strncmp(p, "\"id\":\"", 6) == 0) {
            memcpy(o, "\"id\":\"ID\"", 9);
            o += 9;
            p = strchr(p + 6, '"') + 1;
        } else if (strncmp(p, "\"created\":", 10) == 0) {
            memcpy(o, "\"created\":T", 11);
            o += 11;
            p += 10;
            while (*p >= '0' && *p <= '9')
                p++;
        } else {
            *o++ = *p++;
        }
    }
    *o = '\0';
    return out;
}

static const char *get_str(json_t *j, const char *path)
{
    /* path: "a.b.0.c" */
    char buf[200];
    snprintf(buf, sizeof buf, "%s", path);
    json_t *v = j;
    for (char *save = NULL, *k = strtok_r(buf, ".", &save); k && v; k = strtok_r(NULL, ".", &save))
        v = json_is_array(v) ? json_array_get(v, (size_t)atoi(k)) : json_object_get(v, k);
    return json_is_string(v) ? json_string_value(v) : "";
}

static long long get_int(json_t *j, const char *path)
{
    char buf[200];
    snprintf(buf, sizeof buf, "%s", path);
    json_t *v = j;
    for (char *save = NULL, *k = strtok_r(buf, ".", &save); k && v; k = strtok_r(NULL, ".", &save))
        v = json_is_array(v) ? json_array_get(v, (size_t)atoi(k)) : json_object_get(v, k);
    return json_is_integer(v) ? json_integer_value(v) : -1;
}

/* Chat and completions, streamed and not; the SSE stream byte for byte; validation. */
static void live_answers(void **state)
{
    (void)state;
    start_scheduler("1048576", "4000");
    struct fake_worker *w = worker_start(PIECES, 3, 0);
    wait_ready();
    long long id;
    const char *key = make_key("acme", "{inference}", &id);

    struct resp r = http("POST", "/v1/chat/completions", key,
                         "{\"model\": \"demo\", \"messages\": [{\"role\": \"system\", \"content\": "
                         "\"be brief\"}, {\"role\": \"user\", \"content\": [{\"type\": \"text\", "
                         "\"text\": \"hi\"}]}], \"temperature\": 0.5, \"top_p\": 0.9, "
                         "\"max_tokens\": 16, \"seed\": 42, \"stop\": [\"x\"]}");
    if (r.status != 200)
        fail_msg("chat: %d %s", r.status, r.body);
    assert_string_equal(get_str(r.json, "object"), "chat.completion");
    assert_string_equal(get_str(r.json, "model"), "demo@2");
    assert_int_equal(strncmp(get_str(r.json, "id"), "chatcmpl-", 9), 0);
    assert_string_equal(get_str(r.json, "choices.0.message.role"), "assistant");
    assert_string_equal(get_str(r.json, "choices.0.message.content"), WHOLE);
    assert_string_equal(get_str(r.json, "choices.0.finish_reason"), "stop");
    assert_int_equal(get_int(r.json, "usage.prompt_tokens"), 7);
    assert_int_equal(get_int(r.json, "usage.completion_tokens"), 3);
    assert_int_equal(get_int(r.json, "usage.total_tokens"), 10);
    resp_free(&r);
    pthread_mutex_lock(&w->mu);
    const struct sp_wire_live_request *lr = &w->last_frame.live;
    assert_int_equal(lr->n_messages, 2);
    assert_string_equal(lr->messages[0].role, "system");
    assert_string_equal(lr->messages[1].content, "hi");
    assert_true(lr->prompt.is_text);
    assert_int_equal(lr->prompt.text_len, 0);
    assert_string_equal(lr->model.name, "demo");
    assert_int_equal(lr->model.version, 2);
    assert_true(lr->priority > 0);
    assert_true(lr->sampling.has_temperature && lr->sampling.temperature == 0.5);
    assert_true(lr->sampling.has_top_p && lr->sampling.top_p == 0.9);
    assert_true(lr->sampling.has_max_tokens && lr->sampling.max_tokens == 16);
    assert_true(lr->sampling.has_seed && lr->sampling.seed == 42);
    assert_int_equal(lr->sampling.n_stop, 1);
    assert_string_equal(lr->sampling.stop[0], "x");
    pthread_mutex_unlock(&w->mu);

    r = http("POST", "/v1/completions", key,
             "{\"model\": \"demo@prod\", \"prompt\": \"Once\", \"max_tokens\": 3}");
    assert_int_equal(r.status, 200);
    assert_string_equal(get_str(r.json, "object"), "text_completion");
    assert_string_equal(get_str(r.json, "model"), "demo@2");
    assert_string_equal(get_str(r.json, "choices.0.text"), WHOLE);
    resp_free(&r);
    pthread_mutex_lock(&w->mu);
    assert_string_equal(w->last_frame.live.prompt.text, "Once");
    assert_int_equal(w->last_frame.live.n_messages, 0);
    pthread_mutex_unlock(&w->mu);
    r = http("POST", "/v1/completions", key,
             "{\"model\": \"demo@2\", \"prompt\": [5, 6, 7], \"max_completion_tokens\": 3}");
    assert_error(&r, 400, "invalid_request_error"); /* max_completion_tokens is chat's */
    assert_string_equal(err_field(&r, "param"), "max_completion_tokens");
    resp_free(&r);
    r = http("POST", "/v1/completions", key, "{\"model\": \"demo@2\", \"prompt\": [5, 6, 7]}");
    assert_int_equal(r.status, 200);
    resp_free(&r);
    pthread_mutex_lock(&w->mu);
    assert_false(w->last_frame.live.prompt.is_text);
    assert_int_equal(w->last_frame.live.prompt.n_tokens, 3);
    assert_int_equal(w->last_frame.live.prompt.tokens[2], 7);
    pthread_mutex_unlock(&w->mu);

    /* curl -N of a streamed chat with usage, byte for byte. */
    static const char *const nobuf[] = {"-N", NULL};
    const char *sbody =
        "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": "
        "\"hi\"}], \"stream\": true, \"stream_options\": {\"include_usage\": true}}";
    r = http_ex("POST", "/v1/chat/completions", key, sbody, strlen(sbody), nobuf);
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.headers, "content-type: text/event-stream"));
    char *norm = normalise(r.body);
#define HEAD                                                                                       \
    "data: "                                                                                       \
    "{\"id\":\"ID\",\"object\":\"chat.completion.chunk\",\"created\":T,\"model\":\"demo@2\","
    const char *expect =
        HEAD "\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},"
             "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n" HEAD
             "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"},\"logprobs\":null,"
             "\"finish_reason\":null}],\"usage\":null}\n\n" HEAD
             "\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"logprobs\":null,"
             "\"finish_reason\":null}],\"usage\":null}\n\n" HEAD
             "\"choices\":[{\"index\":0,\"delta\":{\"content\":\" \\\"wor\\\\ld\\\"\\n\"},"
             "\"logprobs\":null,\"finish_reason\":null}],\"usage\":null}\n\n" HEAD
             "\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":"
             "\"stop\"}],\"usage\":null}\n\n" HEAD
             "\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,"
             "\"total_tokens\":10}}\n\n"
             "data: [DONE]\n\n";
#undef HEAD
    if (strcmp(norm, expect) != 0)
        fail_msg("SSE stream differs:\n--- got ---\n%s\n--- expected ---\n%s", norm, expect);
    /* One id and one created for the whole stream. */
    char first_id[64];
    assert_int_equal(sscanf(r.body, "data: {\"id\":\"%63[^\"]", first_id), 1);
    int ids = 0;
    for (const char *p = r.body; (p = strstr(p, first_id)); p++)
        ids++;
    assert_int_equal(ids, 6);
    free(norm);
    resp_free(&r);

    /* Completions streamed, without usage. */
    const char *cbody = "{\"model\": \"demo\", \"prompt\": \"Once\", \"stream\": true}";
    r = http_ex("POST", "/v1/completions", key, cbody, strlen(cbody), nobuf);
    assert_int_equal(r.status, 200);
    norm = normalise(r.body);
#define HEAD                                                                                       \
    "data: {\"id\":\"ID\",\"object\":\"text_completion\",\"created\":T,\"model\":\"demo@2\","
    expect = HEAD "\"choices\":[{\"text\":\"Hel\",\"index\":0,\"logprobs\":null,\"finish_reason\":"
                  "null}]}\n\n" HEAD
                  "\"choices\":[{\"text\":\"lo\",\"index\":0,\"logprobs\":null,\"finish_reason\":"
                  "null}]}\n\n" HEAD
                  "\"choices\":[{\"text\":\" \\\"wor\\\\ld\\\"\\n\",\"index\":0,\"logprobs\":null,"
                  "\"finish_reason\":null}]}\n\n" HEAD
                  "\"choices\":[{\"text\":\"\",\"index\":0,\"logprobs\":null,\"finish_reason\":"
                  "\"stop\"}]}\n\n"
                  "data: [DONE]\n\n";
#undef HEAD
    if (strcmp(norm, expect) != 0)
        fail_msg("SSE stream differs:\n--- got ---\n%s\n--- expected ---\n%s", norm, expect);
    free(norm);
    resp_free(&r);

    /* Validation: each error names its field. */
    static const struct {
        const char *path, *body, *param;
        int status;
    } bad[] = {
        {"/v1/chat/completions", "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}",
         "model", 400},
        {"/v1/chat/completions", "{\"model\": \"demo\"}", "messages", 400},
        {"/v1/chat/completions", "{\"model\": \"demo\", \"messages\": []}", "messages", 400},
        {"/v1/chat/completions", "{\"model\": \"demo\", \"messages\": [{\"role\": \"bot\"}]}",
         "messages[0].role", 400},
        {"/v1/chat/completions",
         "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"n\": "
         "2}",
         "n", 400},
        {"/v1/chat/completions",
         "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
         "\"tools\": [{\"type\": \"function\"}]}",
         "tools", 400},
        {"/v1/chat/completions",
         "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
         "\"temperature\": 5}",
         "temperature", 400},
        {"/v1/chat/completions",
         "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
         "\"max_tokens\": 0}",
         "max_tokens", 400},
        {"/v1/chat/completions",
         "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
         "\"frobnicate\": 1}",
         "frobnicate", 400},
        {"/v1/chat/completions",
         "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], "
         "\"stream_options\": {\"include_usage\": true}}",
         "stream_options", 400},
        {"/v1/completions", "{\"model\": \"demo\", \"prompt\": [\"a\", \"b\"]}", "prompt", 400},
        {"/v1/completions", "{\"model\": \"demo\", \"prompt\": 3}", "prompt", 400},
        {"/v1/completions", "{\"model\": \"demo\", \"prompt\": \"x\", \"stop\": 3}", "stop", 400},
        {"/v1/completions", "{\"model\": \"nosuch\", \"prompt\": \"x\"}", "model", 404},
        {"/v1/completions", "{\"model\": \"demo@9\", \"prompt\": \"x\"}", "model", 404},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        r = http("POST", bad[i].path, key, bad[i].body);
        if (r.status != bad[i].status || strcmp(err_field(&r, "param"), bad[i].param) != 0)
            fail_msg("%s %s: expected %d naming '%s', got %d: %s", bad[i].path, bad[i].body,
                     bad[i].status, bad[i].param, r.status, r.body);
        assert_error(&r, bad[i].status, "invalid_request_error");
        resp_free(&r);
    }

    /* demo@old is demo@1, which no worker has loaded: 503 with Retry-After. */
    r = http("POST", "/v1/completions", key, "{\"model\": \"demo@old\", \"prompt\": \"x\"}");
    assert_error(&r, 503, "service_unavailable");
    assert_non_null(strstr(r.headers, "retry-after:"));
    assert_non_null(strstr(err_field(&r, "message"), "demo@1"));
    resp_free(&r);

    /* The official openai npm client. */
    char outf[400], cmd[1200];
    snprintf(outf, sizeof outf, "%s/node.json", tmpdir);
    snprintf(cmd, sizeof cmd, "node '%s' %d '%s' > '%s'", node_script, http_port, key, outf);
    int rc = system(cmd);
    char *nout = read_file(outf, NULL);
    if (rc != 0)
        fail_msg("node %s failed (%d): %s", node_script, rc, nout);
    json_t *j = json_loads(nout, 0, NULL);
    if (!j)
        fail_msg("node printed no JSON: %s", nout);
    assert_string_equal(get_str(j, "chat"), WHOLE);
    assert_string_equal(get_str(j, "chat_model"), "demo@2");
    assert_string_equal(get_str(j, "chat_finish"), "stop");
    assert_int_equal(get_int(j, "chat_usage"), 10);
    assert_string_equal(get_str(j, "chat_stream"), WHOLE);
    assert_int_equal(get_int(j, "chat_stream_usage"), 10);
    assert_string_equal(get_str(j, "cmpl"), WHOLE);
    assert_string_equal(get_str(j, "cmpl_model"), "demo@2");
    assert_string_equal(get_str(j, "cmpl_stream"), WHOLE);
    assert_string_equal(get_str(j, "models.0"), "demo@1");
    assert_string_equal(get_str(j, "models.1"), "demo@2");
    assert_int_equal(get_int(j, "err_status"), 400);
    assert_string_equal(get_str(j, "err_param"), "n");
    json_decref(j);
    free(nout);

    worker_stop(w);
    stop_scheduler();
}

static const char *const MANY[] = {"a", "b", "c", "d", "e", "f", "g", "h"};
static const char *const SLOW[40] = {"1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
                                     "1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
                                     "1", "2", "3", "4", "5", "6", "7", "8", "9", "10",
                                     "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"};

static int cancels(struct fake_worker *w)
{
    return __atomic_load_n(&w->n_cancel, __ATOMIC_SEQ_CST);
}

static void wait_cancels(struct fake_worker *w, int n)
{
    long long t0 = now_ms();
    while (cancels(w) < n) {
        if (now_ms() - t0 > 5000)
            fail_msg("expected %d CANCEL frames, the worker got %d", n, cancels(w));
        sleep_ms(20);
    }
}

/* 64 concurrent streams; a client that leaves; a timeout; a worker lost mid-request. */
static void live_concurrency_and_endings(void **state)
{
    (void)state;
    start_scheduler("1048576", "3000");
    struct fake_worker *w = worker_start(MANY, 8, 0);
    wait_ready();
    long long id;
    const char *key = make_key("acme", "{inference,batch}", &id);

    enum { N = 64 };
    static const char *const nobuf[] = {"-N", NULL};
    const char *sbody = "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": "
                        "\"hi\"}], \"stream\": true}";
    pid_t pids[N];
    int base = next_req();
    for (int i = 1; i < N; i++)
        next_req();
    for (int i = 0; i < N; i++)
        pids[i] =
            curl_spawn(base + i, "POST", "/v1/chat/completions", key, sbody, strlen(sbody), nobuf);
    for (int i = 0; i < N; i++) {
        struct resp r = curl_wait(base + i, pids[i]);
        if (r.status != 200 || strstr(r.body, "\"content\":\"h\"") == NULL || strlen(r.body) < 14 ||
            strcmp(r.body + strlen(r.body) - 14, "data: [DONE]\n\n") != 0)
            fail_msg("stream %d: %d %s", i, r.status, r.body);
        resp_free(&r);
    }
    assert_int_equal(w->n_live, N);
    assert_int_equal(cancels(w), 0);

    /* A client that disconnects mid-stream: the worker gets CANCEL. */
    w->pieces = SLOW;
    w->n_pieces = 40;
    w->delay_ms = 100;
    static const char *const leave[] = {"-N", "--max-time", "0.8", NULL};
    struct resp r = http_ex("POST", "/v1/chat/completions", key, sbody, strlen(sbody), leave);
    assert_int_equal(r.status, 200);
    assert_null(strstr(r.body, "[DONE]"));
    resp_free(&r);
    wait_cancels(w, 1);

    const char *body = "{\"model\": \"demo\", \"messages\": [{\"role\": \"user\", \"content\": "
                       "\"hi\"}]}";
    w->hang = true;
    int before = w->n_live;
    /* A request that outlives --request-timeout-ms: 504, and CANCEL. */
    r = http("POST", "/v1/chat/completions", key, body);
    assert_error(&r, 504, "server_error");
    assert_string_equal(err_field(&r, "code"), "timeout");
    resp_free(&r);
    wait_cancels(w, 2);
    assert_int_equal(w->n_live, before + 1);

    /* The worker's connection lost mid-request: 502, and readyz says no worker. */
    int n = next_req();
    pid_t pid = curl_spawn(n, "POST", "/v1/chat/completions", key, body, strlen(body), NULL);
    long long t0 = now_ms();
    while (w->n_live < before + 2) {
        assert_true(now_ms() - t0 < WAIT_MS);
        sleep_ms(20);
    }
    worker_stop(w);
    r = curl_wait(n, pid);
    assert_error(&r, 502, "server_error");
    assert_string_equal(err_field(&r, "code"), "worker_lost");
    resp_free(&r);
    r = http("POST", "/v1/chat/completions", key, body);
    assert_error(&r, 503, "service_unavailable");
    resp_free(&r);

    stop_scheduler();
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s PATH-TO-spool-scheduler PATH-TO-openai_live.mjs\n", argv[0]);
        return 2;
    }
    sched_bin = argv[1];
    node_script = argv[2];
    signal(SIGPIPE, SIG_IGN);
    const char *tag = getenv("SPOOL_TEST_TAG");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/sht-%s-XXXXXX", tag ? tag : "x");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(server_basics, setup, teardown),
        cmocka_unit_test_setup_teardown(live_answers, setup, teardown),
        cmocka_unit_test_setup_teardown(live_concurrency_and_endings, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return rc;
}
