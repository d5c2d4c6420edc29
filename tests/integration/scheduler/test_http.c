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
 * Runs curl: METHOD http://127.0.0.1:PORT/PATH with the bearer key (NULL:
 * no header) and body (NULL: none). extra: more curl arguments (NULL-ended).
 */
static struct resp http_ex(const char *method, const char *path, const char *key, const char *body,
                           size_t body_len, const char *const *extra)
{
    static int seq;
    char bodyf[400], outf[400], hdrf[400], url[512], auth[400];
    int n = __atomic_fetch_add(&seq, 1, __ATOMIC_SEQ_CST);
    snprintf(bodyf, sizeof bodyf, "%s/req%d", tmpdir, n);
    snprintf(outf, sizeof outf, "%s/out%d", tmpdir, n);
    snprintf(hdrf, sizeof hdrf, "%s/hdr%d", tmpdir, n);
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
    char data[420];
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
    int pfd[2];
    assert_int_equal(pipe(pfd), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(pfd[1], 1);
        close(pfd[0]);
        close(pfd[1]);
        execvp("curl", (char *const *)argv);
        _exit(127);
    }
    close(pfd[1]);
    char code[16] = "";
    size_t got = 0;
    ssize_t r;
    while (got < sizeof code - 1 && (r = read(pfd[0], code + got, sizeof code - 1 - got)) > 0)
        got += (size_t)r;
    code[got] = '\0';
    close(pfd[0]);
    int st;
    waitpid(pid, &st, 0);
    struct resp out = {.status = atoi(code)};
    out.body = read_file(outf, NULL);
    out.headers = read_file(hdrf, NULL);
    out.json = json_loads(out.body, 0, NULL);
    unlink(bodyf);
    unlink(outf);
    unlink(hdrf);
    return out;
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

static void *worker_main(void *arg)
{
    struct fake_worker *w = arg;
    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, 0);
    struct sp_wire_frame f = {0};
    while (!w->stop && read_frame(w, &d, &f)) {
        if (f.type == SP_WIRE_CANCEL) {
            __atomic_fetch_add(&w->n_cancel, 1, __ATOMIC_SEQ_CST);
            struct sp_wire_frame t = {.type = SP_WIRE_TOKENS};
            t.tokens.request_id = f.cancel.request_id;
            t.tokens.finish_reason = "cancelled";
            send_frame(w, &t);
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
            for (int i = 0; i < w->n_pieces; i++) {
                if (w->delay_ms)
                    sleep_ms(w->delay_ms);
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

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s PATH-TO-spool-scheduler\n", argv[0]);
        return 2;
    }
    sched_bin = argv[1];
    signal(SIGPIPE, SIG_IGN);
    const char *tag = getenv("SPOOL_TEST_TAG");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/sht-%s-XXXXXX", tag ? tag : "x");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(server_basics, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return rc;
}
