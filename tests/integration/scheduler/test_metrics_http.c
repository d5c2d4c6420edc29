/*
 * GET /metrics end to end: the real spool-scheduler (argv[1]) with its HTTP
 * server, a real PostgreSQL (pgtest), a fake worker on the test's libuv loop
 * speaking the wire protocol, and curl as the HTTP client. The worker's
 * heartbeat values appear in the gauges; a live request through
 * /v1/completions (the fake worker answers with TOKENS and USAGE) moves the
 * live request, token and latency metrics; a batch shard's PROGRESS, USAGE
 * and DONE move the token and request counters; a DRAIN counts a
 * preemption; every scrape passes the strict checker and the official
 * Python parser (argv[2]: prom_parse.py).
 */
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <uv.h>

#include "../../unit/common/prom_check.h"
#include "pgtest.h"
#include "spool/wire_conn.h"

#define WAIT_MS 20000 /* generous: a loaded 2-core machine */

static const char *sched_bin, *parse_script;
static struct pgt pg;
static PGconn *db;
static uv_loop_t loop;
static char tmpdir[256], port_file[300], http_port_file[300];

static const char DIGEST[] = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

static void ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ok(const char *fmt, ...)
{
    char sql[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    PGresult *r = PQexec(db, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

static long long num(const char *sql)
{
    PGresult *r = PQexec(db, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    long long v =
        PQntuples(r) && !PQgetisnull(r, 0, 0) ? strtoll(PQgetvalue(r, 0, 0), NULL, 10) : -1;
    PQclear(r);
    return v;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

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

/* ---- The fake worker ---------------------------------------------------- */

struct fw {
    uv_tcp_t *tcp;
    sp_wire_conn_t *conn;
    uv_timer_t hb;
    bool registered;
    uint64_t worker_id;
    struct sp_wire_heartbeat beat; /* what it reports */
    uint64_t shard, token;
    bool assigned;
    int n_live;
};

static void send_frame(struct fw *w, struct sp_wire_frame *f)
{
    assert_non_null(w->conn);
    assert_int_equal(sp_wire_conn_send(w->conn, f), 0);
}

static void on_hb(uv_timer_t *t)
{
    struct fw *w = t->data;
    if (!w->conn || !w->registered)
        return;
    struct sp_wire_frame f = {.type = SP_WIRE_HEARTBEAT};
    f.heartbeat = w->beat;
    f.heartbeat.worker_id = w->worker_id;
    send_frame(w, &f);
}

static void on_frame(sp_wire_conn_t *c, struct sp_wire_frame *f)
{
    struct fw *w = sp_wire_conn_data(c);
    if (f->type == SP_WIRE_REGISTERED) {
        w->registered = true;
        w->worker_id = f->registered.worker_id;
        uv_timer_start(&w->hb, on_hb, 0, f->registered.heartbeat_ms);
    } else if (f->type == SP_WIRE_LIVE_REQUEST) {
        /* Three tokens, the last one finishing, then the request's usage. */
        static const char *const pieces[] = {"a", "b", "c"};
        for (int i = 0; i < 3; i++) {
            struct sp_wire_frame t = {.type = SP_WIRE_TOKENS};
            int32_t id = 100 + i;
            t.tokens.request_id = f->live.request_id;
            t.tokens.token_ids = &id;
            t.tokens.n_token_ids = 1;
            t.tokens.text = pieces[i];
            t.tokens.text_len = 1;
            t.tokens.finish_reason = i == 2 ? "stop" : NULL;
            send_frame(w, &t);
        }
        struct sp_wire_frame u = {.type = SP_WIRE_USAGE};
        u.usage = (struct sp_wire_usage){.has_request_id = true,
                                         .request_id = f->live.request_id,
                                         .tokens_in = 7,
                                         .tokens_out = 3};
        send_frame(w, &u);
        w->n_live++;
    } else if (f->type == SP_WIRE_ASSIGN && !w->assigned) {
        w->assigned = true;
        w->shard = f->assign.shard_id;
        w->token = f->assign.lease_token;
    }
}

static void on_close(sp_wire_conn_t *c, int err)
{
    (void)err;
    struct fw *w = sp_wire_conn_data(c);
    free(w->tcp);
    w->tcp = NULL;
    w->conn = NULL;
    w->registered = false;
}

static void on_connect(uv_connect_t *req, int status)
{
    struct fw *w = req->data;
    free(req);
    assert_int_equal(status, 0);
    assert_int_equal(sp_wire_conn_open(&w->conn, (uv_stream_t *)w->tcp, 0, on_frame, on_close, w),
                     0);
    char digest[80];
    snprintf(digest, sizeof digest, "sha256:%s", DIGEST);
    struct sp_wire_model m = {"m", 1, digest};
    struct sp_wire_frame f = {.type = SP_WIRE_REGISTER};
    f.reg = (struct sp_wire_register){
        .name = "fw-\"metrics\"", /* a quote, escaped in the label value */
        .gpu_type = "cpu",
        .gpu_memory = 1 << 30,
        .capacity = SP_WIRE_ON_DEMAND,
        .price_per_hour = 0.5,
        .models = &m,
        .n_models = 1,
        .max_batch = 8,
        .backend = "cpu",
    };
    send_frame(w, &f);
}

static void fw_connect(struct fw *w, int port)
{
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    w->tcp = malloc(sizeof *w->tcp);
    uv_tcp_init(&loop, w->tcp);
    uv_timer_init(&loop, &w->hb);
    w->hb.data = w;
    uv_connect_t *req = malloc(sizeof *req);
    req->data = w;
    assert_int_equal(uv_tcp_connect(req, w->tcp, (struct sockaddr *)&addr, on_connect), 0);
}

static bool wait_until(bool (*cond)(void *), void *arg, unsigned timeout_ms)
{
    uint64_t end = now_ms() + timeout_ms;
    for (;;) {
        uv_run(&loop, UV_RUN_NOWAIT);
        if (cond(arg))
            return true;
        if (now_ms() > end)
            return false;
        usleep(5000);
    }
}

static bool is_registered(void *arg)
{
    return ((struct fw *)arg)->registered;
}

static bool is_assigned(void *arg)
{
    return ((struct fw *)arg)->assigned;
}

/* ---- Scraping ----------------------------------------------------------- */

static int http_port;

/* GET /metrics with curl; returns the body (caller frees) after checking it. */
static char *scrape(void)
{
    char hdr[400], body[400], cmd[1200];
    snprintf(hdr, sizeof hdr, "%s/headers", tmpdir);
    snprintf(body, sizeof body, "%s/body", tmpdir);
    snprintf(cmd, sizeof cmd,
             "curl -sS --max-time 10 -o '%s' -D '%s' -w '%%{http_code}' "
             "http://127.0.0.1:%d/metrics",
             body, hdr, http_port);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char code[16] = "";
    if (!fgets(code, sizeof code, p))
        code[0] = '\0';
    assert_int_equal(pclose(p), 0);
    assert_string_equal(code, "200");
    /* The content type, exactly. */
    FILE *h = fopen(hdr, "r");
    assert_non_null(h);
    char line[512];
    bool ct = false;
    while (fgets(line, sizeof line, h))
        if (strncasecmp(line, "content-type:", 13) == 0) {
            line[strcspn(line, "\r\n")] = '\0';
            const char *v = line + 13;
            while (*v == ' ')
                v++;
            assert_string_equal(v, "text/plain; version=0.0.4; charset=utf-8");
            ct = true;
        }
    fclose(h);
    assert_true(ct);
    FILE *b = fopen(body, "r");
    assert_non_null(b);
    fseek(b, 0, SEEK_END);
    long n = ftell(b);
    rewind(b);
    char *text = malloc((size_t)n + 1);
    assert_int_equal(fread(text, 1, (size_t)n, b), (size_t)n);
    text[n] = '\0';
    fclose(b);
    char err[256];
    if (prom_check(text, err, sizeof err) != 0)
        fail_msg("strict check: %s\n%s", err, text);
    snprintf(cmd, sizeof cmd, "/usr/bin/python3 '%s' '%s' >/dev/null", parse_script, body);
    int st = system(cmd);
    if (st != 0)
        fail_msg("the Python parser refused /metrics (status %d; 3: run ops/setup)\n%s", st, text);
    unlink(body);
    unlink(hdr);
    return text;
}

static double value_of(const char *text, const char *prefix)
{
    size_t n = strlen(prefix);
    for (const char *p = text; *p;) {
        if (strncmp(p, prefix, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        const char *nl = strchr(p, '\n');
        if (!nl)
            break;
        p = nl + 1;
    }
    return NAN;
}

/* Scrapes until the sample has the value (the scheduler handles frames asynchronously). */
static const char *want_prefix;
static double want_value;
static bool scraped_value(void *arg)
{
    (void)arg;
    char *t = scrape();
    bool ok_ = value_of(t, want_prefix) == want_value;
    free(t);
    return ok_;
}

static void expect(const char *prefix, double v)
{
    want_prefix = prefix;
    want_value = v;
    if (!wait_until(scraped_value, NULL, WAIT_MS)) {
        char *t = scrape();
        fail_msg("%s: want %g, got %g in\n%s", prefix, v, value_of(t, prefix), t);
    }
}

/*
 * POST /v1/completions with curl in a child process while the loop runs (the
 * fake worker answering it lives on this loop); returns the HTTP status.
 */
static pid_t curl_pid;
static int curl_status;
static bool curl_done(void *arg)
{
    (void)arg;
    return waitpid(curl_pid, &curl_status, WNOHANG) == curl_pid;
}

static int post_completion(const char *key)
{
    char out[400], auth[200];
    snprintf(out, sizeof out, "%s/live", tmpdir);
    snprintf(auth, sizeof auth, "Authorization: Bearer %s", key);
    char url[100];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/completions", http_port);
    curl_pid = fork();
    assert_true(curl_pid >= 0);
    if (curl_pid == 0) {
        int fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0 || dup2(fd, 1) < 0)
            _exit(127);
        execlp("curl", "curl", "-sS", "--max-time", "20", "-o", "/dev/null", "-w", "%{http_code}",
               "-H", auth, "-H", "Content-Type: application/json", "-d",
               "{\"model\": \"m\", \"prompt\": \"hi\", \"max_tokens\": 3}", url, (char *)NULL);
        _exit(127);
    }
    assert_true(wait_until(curl_done, NULL, WAIT_MS));
    assert_true(WIFEXITED(curl_status) && WEXITSTATUS(curl_status) == 0);
    FILE *fp = fopen(out, "r");
    assert_non_null(fp);
    int code = 0;
    assert_int_equal(fscanf(fp, "%d", &code), 1);
    fclose(fp);
    unlink(out);
    return code;
}

/* ---- The test ----------------------------------------------------------- */

static void metrics_follow_the_worker(void **state)
{
    (void)state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        for (int fd = 3; fd < 1024; fd++)
            close(fd);
        execl(sched_bin, sched_bin, "--dsn", pg.dsn, "--listen", "127.0.0.1:0", "--port-file",
              port_file, "--http-listen", "127.0.0.1:0", "--http-port-file", http_port_file,
              "--heartbeat-ms", "200", "--lease-ttl-ms", "5000", "--sweep-ms", "100",
              "--shard-size", "4", (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (uint64_t end = now_ms() + WAIT_MS; (!port || !http_port) && now_ms() < end;
         usleep(20000)) {
        port = read_port(port_file);
        http_port = read_port(http_port_file);
    }
    assert_true(port > 0 && http_port > 0);

    /* Before any worker: the families are there, the scheduler is active. */
    char *t = scrape();
    assert_true(value_of(t, "spool_scheduler_active") == 1);
    assert_true(value_of(t, "spool_workers{state=\"active\",capacity=\"on-demand\"}") == 0);
    assert_non_null(strstr(t, "# TYPE spool_time_to_first_token_seconds histogram\n"));
    free(t);

    ok("INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, "
       "n_params, context_length) VALUES ('m', 1, '%s', 'file:///m', 1, 'llama', 'bf16', 1, 2048)",
       DIGEST);
    struct fw w = {.beat = {.free_slots = 5,
                            .kv_blocks_free = 30,
                            .kv_blocks_total = 128,
                            .running = 3,
                            .queued = 2}};
    fw_connect(&w, port);
    assert_true(wait_until(is_registered, &w, WAIT_MS));
    expect("spool_workers{state=\"active\",capacity=\"on-demand\"}", 1);
    expect("spool_worker_kv_blocks_used{worker=\"fw-\\\"metrics\\\"\"}", 98);
    t = scrape();
    assert_true(value_of(t, "spool_worker_kv_blocks_total{worker=\"fw-\\\"metrics\\\"\"}") == 128);
    assert_true(value_of(t, "spool_worker_running_sequences{worker=\"fw-\\\"metrics\\\"\"}") == 3);
    assert_true(value_of(t, "spool_worker_queued_sequences{worker=\"fw-\\\"metrics\\\"\"}") == 2);
    assert_true(value_of(t, "spool_worker_free_slots{worker=\"fw-\\\"metrics\\\"\"}") == 5);
    assert_true(value_of(t, "spool_worker_max_batch{worker=\"fw-\\\"metrics\\\"\"}") == 8);
    free(t);
    /* The next heartbeats change the gauges. */
    w.beat.running = 6;
    w.beat.kv_blocks_free = 0;
    expect("spool_worker_running_sequences{worker=\"fw-\\\"metrics\\\"\"}", 6);
    expect("spool_worker_kv_blocks_used{worker=\"fw-\\\"metrics\\\"\"}", 128);

    /* A live request: its status, tokens and latencies. */
    char *key = NULL;
    {
        PGresult *r = PQexec(db, "SELECT key FROM spool.create_api_key('acme', 'metrics', "
                                 "'{inference}')");
        assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
        key = strdup(PQgetvalue(r, 0, 0));
        PQclear(r);
    }
    assert_int_equal(post_completion(key), 200);
    assert_int_equal(w.n_live, 1);
    expect("spool_requests_total{lane=\"live\",model=\"m@1\",status=\"200\"}", 1);
    t = scrape();
    assert_true(value_of(t, "spool_tokens_total{direction=\"in\",lane=\"live\",model=\"m@1\"}") ==
                7);
    assert_true(value_of(t, "spool_tokens_total{direction=\"out\",lane=\"live\",model=\"m@1\"}") ==
                3);
    assert_true(
        value_of(t, "spool_time_to_first_token_seconds_count{lane=\"live\",model=\"m@1\"}") == 1);
    assert_true(value_of(t, "spool_time_to_first_token_seconds_sum{lane=\"live\",model=\"m@1\"}") >
                0);
    assert_true(
        value_of(t, "spool_time_per_output_token_seconds_count{lane=\"live\",model=\"m@1\"}") == 1);
    assert_true(value_of(t, "spool_request_duration_seconds_count{lane=\"live\",model=\"m@1\"}") ==
                1);
    /* The first token came before the last byte. */
    assert_true(value_of(t, "spool_time_to_first_token_seconds_sum{lane=\"live\",model=\"m@1\"}") <=
                value_of(t, "spool_request_duration_seconds_sum{lane=\"live\",model=\"m@1\"}"));
    free(t);
    free(key);

    /* A batch shard: PROGRESS, USAGE, DONE. */
    long long job = num("SELECT spool.submit_job('m', 'acme', '{}', 0)");
    ok("INSERT INTO spool.requests (job_id, prompt) SELECT %lld, 'p' || g FROM "
       "generate_series(1, 4) g",
       job);
    ok("SELECT spool.seal_job(%lld)", job);
    assert_true(wait_until(is_assigned, &w, WAIT_MS));
    const char *out = "spool_tokens_total{direction=\"out\",lane=\"batch\",model=\"m@1\"}";
    const char *in = "spool_tokens_total{direction=\"in\",lane=\"batch\",model=\"m@1\"}";
    struct sp_wire_frame f = {.type = SP_WIRE_PROGRESS};
    f.progress = (struct sp_wire_progress){w.shard, w.token, 2, 7};
    send_frame(&w, &f);
    expect(out, 7);
    f.progress = (struct sp_wire_progress){w.shard, w.token, 3, 9};
    send_frame(&w, &f);
    expect(out, 9);
    f = (struct sp_wire_frame){.type = SP_WIRE_USAGE};
    f.usage = (struct sp_wire_usage){.has_shard_id = true,
                                     .shard_id = w.shard,
                                     .tokens_in = 20,
                                     .tokens_out = 11,
                                     .gpu_seconds = 0.1};
    send_frame(&w, &f);
    f = (struct sp_wire_frame){.type = SP_WIRE_DONE};
    f.done = (struct sp_wire_done){w.shard, w.token, 3, 1};
    send_frame(&w, &f);
    expect("spool_requests_total{lane=\"batch\",model=\"m@1\",status=\"failed\"}", 1);
    t = scrape();
    assert_true(value_of(t, out) == 11);
    assert_true(value_of(t, in) == 20);
    assert_true(value_of(t, "spool_requests_total{lane=\"batch\",model=\"m@1\","
                            "status=\"succeeded\"}") == 3);
    free(t);

    /* A spot notice: DRAIN counts a preemption and the worker is draining. */
    f = (struct sp_wire_frame){.type = SP_WIRE_DRAIN};
    f.drain = (struct sp_wire_drain){"spot notice", 1000};
    send_frame(&w, &f);
    expect("spool_preemptions_total{source=\"spot notice\"}", 1);
    expect("spool_workers{state=\"draining\",capacity=\"on-demand\"}", 1);
    assert_int_equal(num("SELECT count(*) FROM spool.preemptions"), 1);

    /* The worker leaves: its gauges go. */
    sp_wire_conn_close(w.conn);
    uv_close((uv_handle_t *)&w.hb, NULL);
    expect("spool_workers{state=\"draining\",capacity=\"on-demand\"}", 0);
    t = scrape();
    assert_null(strstr(t, "spool_worker_running_sequences{"));
    free(t);

    kill(pid, SIGTERM);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

static int setup(void **state)
{
    (void)state;
    pgt_start(&pg, true);
    db = pgt_connect(&pg);
    PQclear(PQexec(db, "SET client_min_messages = warning"));
    uv_loop_init(&loop);
    snprintf(port_file, sizeof port_file, "%s/port", tmpdir);
    snprintf(http_port_file, sizeof http_port_file, "%s/http-port", tmpdir);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    PQfinish(db);
    pgt_stop(&pg);
    unlink(port_file);
    unlink(http_port_file);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s PATH-TO-spool-scheduler PROM_PARSE_PY\n", argv[0]);
        return 2;
    }
    sched_bin = argv[1];
    parse_script = argv[2];
    signal(SIGPIPE, SIG_IGN);
    const char *tag = getenv("SPOOL_TEST_TAG");
    snprintf(tmpdir, sizeof tmpdir, "/tmp/ssm-%s-XXXXXX", tag ? tag : "x");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(metrics_follow_the_worker, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    rmdir(tmpdir);
    return rc;
}
