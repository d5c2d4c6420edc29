/*
 * spool-worker as a real child process against a real PostgreSQL and a fake
 * scheduler (sp_wire_conn on a libuv loop in a thread of this test): on
 * REGISTER it records a workers row, answers REGISTERED, leases every
 * pending shard of the current job with spool.lease_shard and sends ASSIGN.
 *
 * Covered: a job of 100 requests completes with the outputs the engine
 * gives for the same prompt and parameters (computed here with a direct
 * engine run); bad requests fail alone with clear errors; a model whose
 * bundle does not match its digest is refused and the shard released;
 * fencing (after the shard is re-leased, the worker writes nothing more);
 * preemption by SIGTERM, by a notice file and by a fake AWS metadata
 * endpoint: the worker exits 0 within its deadline with checkpoints written
 * and shards released, and a second worker resumes to byte-identical outputs.
 *
 * Usage: integration_worker_worker WORKER_EXE MODELS_DIR
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>
#include <uv.h>

#include "pgtest.h"
#include "spool/bundle.h"
#include "spool/engine.h"
#include "spool/wire_conn.h"

static const char *worker_exe, *models_dir;
static char model_dir[1024], tmp[256], store_dir[512], cache_dir[512];
static struct pgt t;
static PGconn *c;

/* ---- SQL helpers ---- */

static void ok(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void ok(const char *fmt, ...)
{
    char sql[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

static long num(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static long num(const char *fmt, ...)
{
    char sql[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    char *v = pgt_scalar(c, sql);
    if (!v)
        fail_msg("no value: %s", sql);
    long n = strtol(v, NULL, 10);
    free(v);
    return n;
}

static char *str(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *str(const char *fmt, ...)
{
    char sql[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    char *v = pgt_scalar(c, sql);
    return v ? v : strdup("(null)");
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Polls a SQL count until it is at least want; fails after timeout_s. */
static void wait_sql(double timeout_s, long want, const char *sql)
{
    double end = now_s() + timeout_s;
    long v = -1;
    while (now_s() < end) {
        v = num("%s", sql);
        if (v >= want)
            return;
        usleep(20000);
    }
    fail_msg("timed out waiting for %s >= %ld (last %ld)", sql, want, v);
}

/* ---- The fake scheduler ---- */

static struct {
    pthread_t thread;
    uv_loop_t loop;
    uv_tcp_t server;
    uv_async_t stop, drop, drain;
    int port;
    PGconn *db;
    pthread_mutex_t mu;
    long job; /* the job whose pending shards are assigned on REGISTER */
    int registers, reregisters, dones, releases, drains, goodbyes, heartbeats;
    char last_release[1024];
} fs = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void fs_close_cb(uv_handle_t *h)
{
    free(h);
}

static void fs_send_assigns(sp_wire_conn_t *conn, uint64_t wid)
{
    pthread_mutex_lock(&fs.mu);
    long job = fs.job;
    pthread_mutex_unlock(&fs.mu);
    char sql[1024];
    snprintf(sql, sizeof sql,
             "SELECT s.id, s.job_id, spool.lease_shard(s.id, %" PRIu64 ", '10 min'), m.name, "
             "m.version, 'sha256:' || m.digest FROM spool.shards s JOIN spool.jobs j ON j.id = "
             "s.job_id JOIN spool.models m ON m.id = j.model_id WHERE s.job_id = %ld AND s.state = "
             "'pending' ORDER BY s.id",
             wid, job);
    PGresult *r = PQexec(fs.db, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        fprintf(stderr, "fake scheduler: %s\n", PQresultErrorMessage(r));
        PQclear(r);
        return;
    }
    for (int i = 0; i < PQntuples(r); i++) {
        struct sp_wire_frame f = {
            .type = SP_WIRE_ASSIGN,
            .assign = {.shard_id = strtoull(PQgetvalue(r, i, 0), NULL, 10),
                       .job_id = strtoull(PQgetvalue(r, i, 1), NULL, 10),
                       .lease_token = strtoull(PQgetvalue(r, i, 2), NULL, 10),
                       .model = {.name = PQgetvalue(r, i, 3),
                                 .version = (uint32_t)atoi(PQgetvalue(r, i, 4)),
                                 .digest = PQgetvalue(r, i, 5)},
                       .lease_ms = 600000}};
        sp_wire_conn_send(conn, &f);
    }
    PQclear(r);
}

static void fs_on_frame(sp_wire_conn_t *conn, struct sp_wire_frame *f)
{
    switch (f->type) {
    case SP_WIRE_REGISTER: {
        uint64_t wid = f->reg.worker_id;
        if (!f->reg.has_worker_id) {
            char sql[512];
            snprintf(sql, sizeof sql,
                     "INSERT INTO spool.workers (name, capacity_type) VALUES ('%s', '%s') "
                     "RETURNING id",
                     f->reg.name, sp_wire_capacity_name(f->reg.capacity));
            char *v = pgt_scalar(fs.db, sql);
            wid = v ? strtoull(v, NULL, 10) : 0;
            free(v);
        }
        pthread_mutex_lock(&fs.mu);
        fs.registers++;
        fs.reregisters += f->reg.has_worker_id;
        pthread_mutex_unlock(&fs.mu);
        struct sp_wire_frame rf = {
            .type = SP_WIRE_REGISTERED,
            .registered = {.worker_id = wid, .heartbeat_ms = 200, .lease_ttl_ms = 600000}};
        sp_wire_conn_send(conn, &rf);
        fs_send_assigns(conn, wid);
        break;
    }
    case SP_WIRE_GOODBYE:
        pthread_mutex_lock(&fs.mu);
        fs.goodbyes++;
        pthread_mutex_unlock(&fs.mu);
        sp_wire_conn_close(conn);
        break;
    case SP_WIRE_DONE:
    case SP_WIRE_RELEASE:
    case SP_WIRE_DRAIN:
    case SP_WIRE_HEARTBEAT:
        pthread_mutex_lock(&fs.mu);
        if (f->type == SP_WIRE_DONE)
            fs.dones++;
        if (f->type == SP_WIRE_RELEASE) {
            fs.releases++;
            snprintf(fs.last_release, sizeof fs.last_release, "%s", f->release.reason);
        }
        if (f->type == SP_WIRE_DRAIN)
            fs.drains++;
        if (f->type == SP_WIRE_HEARTBEAT)
            fs.heartbeats++;
        pthread_mutex_unlock(&fs.mu);
        break;
    default:
        break;
    }
}

static void fs_on_close(sp_wire_conn_t *conn, int err)
{
    (void)err;
    free(sp_wire_conn_stream(conn));
}

static void fs_on_connection(uv_stream_t *server, int status)
{
    if (status < 0)
        return;
    uv_tcp_t *cl = malloc(sizeof(*cl));
    uv_tcp_init(&fs.loop, cl);
    sp_wire_conn_t *conn;
    if (uv_accept(server, (uv_stream_t *)cl) ||
        sp_wire_conn_open(&conn, (uv_stream_t *)cl, 0, fs_on_frame, fs_on_close, NULL))
        uv_close((uv_handle_t *)cl, fs_close_cb);
}

static void fs_walk_close(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) {
        if (h->type == UV_TCP && h != (uv_handle_t *)&fs.server)
            sp_wire_conn_close(h->data); /* a client conn: it frees its handle */
        else
            uv_close(h, NULL);
    }
}

static void fs_on_stop(uv_async_t *a)
{
    uv_walk(a->loop, fs_walk_close, NULL);
}

/* Closes every worker connection (the scheduler "crashes"); the server keeps listening. */
static void fs_walk_drop(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h) && h->type == UV_TCP && h != (uv_handle_t *)&fs.server)
        sp_wire_conn_close(h->data);
}

static void fs_on_drop(uv_async_t *a)
{
    uv_walk(a->loop, fs_walk_drop, NULL);
}

/* Sends DRAIN (a scheduler shutting down) on every worker connection. */
static void fs_walk_drain(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h) && h->type == UV_TCP && h != (uv_handle_t *)&fs.server) {
        struct sp_wire_frame f = {.type = SP_WIRE_DRAIN,
                                  .drain = {.reason = "shutdown", .deadline_ms = 10000}};
        sp_wire_conn_send(h->data, &f);
    }
}

static void fs_on_drain(uv_async_t *a)
{
    uv_walk(a->loop, fs_walk_drain, NULL);
}

static void *fs_main(void *arg)
{
    (void)arg;
    uv_run(&fs.loop, UV_RUN_DEFAULT);
    return NULL;
}

static void fs_start(void)
{
    fs.db = pgt_connect(&t);
    assert_int_equal(uv_loop_init(&fs.loop), 0);
    uv_tcp_init(&fs.loop, &fs.server);
    struct sockaddr_in a;
    uv_ip4_addr("127.0.0.1", 0, &a);
    assert_int_equal(uv_tcp_bind(&fs.server, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&fs.server, 16, fs_on_connection), 0);
    int len = sizeof a;
    uv_tcp_getsockname(&fs.server, (struct sockaddr *)&a, &len);
    fs.port = ntohs(a.sin_port);
    uv_async_init(&fs.loop, &fs.stop, fs_on_stop);
    uv_async_init(&fs.loop, &fs.drop, fs_on_drop);
    uv_async_init(&fs.loop, &fs.drain, fs_on_drain);
    pthread_create(&fs.thread, NULL, fs_main, NULL);
}

static void fs_stop(void)
{
    uv_async_send(&fs.stop);
    pthread_join(fs.thread, NULL);
    uv_loop_close(&fs.loop);
    PQfinish(fs.db);
}

static int fs_get(int *field)
{
    pthread_mutex_lock(&fs.mu);
    int v = *field;
    pthread_mutex_unlock(&fs.mu);
    return v;
}

/* ---- The fake cloud metadata endpoint (AWS and GCP paths) ---- */

static struct {
    int fd, port;
    pthread_t thread;
    volatile int notice; /* 0: 404, 1: 200 */
    volatile int polls;
} aws;

static void *aws_main(void *arg)
{
    (void)arg;
    for (;;) {
        int cfd = accept(aws.fd, NULL, NULL);
        if (cfd < 0)
            return NULL;
        char buf[2048];
        ssize_t n = read(cfd, buf, sizeof buf - 1);
        buf[n > 0 ? n : 0] = 0;
        const char *resp;
        bool notice = __atomic_load_n(&aws.notice, __ATOMIC_SEQ_CST);
        if (strstr(buf, "GET /computeMetadata/v1/instance/preempted ")) {
            /* GCP: the header is required, the body says TRUE or FALSE. */
            if (!strstr(buf, "\r\nMetadata-Flavor: Google\r\n"))
                resp = "HTTP/1.0 403 Forbidden\r\n\r\n";
            else if (notice)
                resp = "HTTP/1.0 200 OK\r\nMetadata-Flavor: Google\r\n\r\nTRUE";
            else
                resp = "HTTP/1.0 200 OK\r\nMetadata-Flavor: Google\r\n\r\nFALSE";
        } else if (!strstr(buf, "GET /latest/meta-data/spot/instance-action "))
            resp = "HTTP/1.0 400 Bad Request\r\n\r\n";
        else if (notice)
            resp = "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"
                   "{\"action\": \"terminate\", \"time\": \"2026-11-28T19:00:00Z\"}";
        else
            resp = "HTTP/1.0 404 Not Found\r\nContent-Type: text/html\r\n\r\nNot Found";
        __atomic_add_fetch(&aws.polls, 1, __ATOMIC_SEQ_CST);
        ssize_t wn = write(cfd, resp, strlen(resp));
        (void)wn;
        close(cfd);
    }
}

static void aws_start(void)
{
    aws.fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    assert_int_equal(bind(aws.fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(aws.fd, 16), 0);
    socklen_t len = sizeof a;
    getsockname(aws.fd, (struct sockaddr *)&a, &len);
    aws.port = ntohs(a.sin_port);
    aws.notice = 0;
    pthread_create(&aws.thread, NULL, aws_main, NULL);
}

static void aws_stop(void)
{
    shutdown(aws.fd, SHUT_RDWR);
    pthread_join(aws.thread, NULL);
    close(aws.fd);
}

/* ---- The worker process ---- */

/* Workers started and not yet reaped, killed by teardown when a test failed midway. */
static pid_t live_workers[16];

static void forget_worker(pid_t pid)
{
    for (int i = 0; i < 16; i++)
        if (live_workers[i] == pid)
            live_workers[i] = 0;
}

static pid_t start_worker(const char *name, int step_delay_ms, const char *notice)
{
    char sched[64], delay[16];
    snprintf(sched, sizeof sched, "127.0.0.1:%d", fs.port);
    snprintf(delay, sizeof delay, "%d", step_delay_ms);
    const char *argv[32] = {worker_exe, "--dsn",
                            t.dsn,      "--scheduler",
                            sched,      "--name",
                            name,       "--model-store",
                            store_dir,  "--model-cache",
                            cache_dir,  "--threads",
                            "1",        "--max-batch",
                            "16",       "--checkpoint-tokens",
                            "4",        "--checkpoint-seconds",
                            "1",        "--drain-deadline",
                            "8",        "--capacity",
                            "spot",     "--price-per-hour",
                            "3.6"};
    int n = 25;
    if (notice) {
        argv[n++] = "--preempt-notice";
        argv[n++] = notice;
    }
    argv[n] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("SPOOL_WORKER_STEP_DELAY_MS", delay, 1);
        execv(worker_exe, (char *const *)argv);
        _exit(127);
    }
    for (int i = 0; i < 16; i++) {
        if (!live_workers[i]) {
            live_workers[i] = pid;
            break;
        }
    }
    return pid;
}

/* Waits for pid to exit; returns its status (or fails after timeout_s). */
static int wait_worker(pid_t pid, double timeout_s)
{
    double end = now_s() + timeout_s;
    int st;
    while (now_s() < end) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            forget_worker(pid);
            return st;
        }
        usleep(20000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    forget_worker(pid);
    fail_msg("worker %d did not exit within %.0f s", (int)pid, timeout_s);
    return -1;
}

static void stop_worker(pid_t pid)
{
    kill(pid, SIGTERM);
    int st = wait_worker(pid, 30);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

/* ---- Reference outputs from a direct engine run ---- */

struct ref {
    long id;
    char *tokens; /* "{1,2,3}", as PostgreSQL prints int[] */
    char *text;
};

/*
 * Runs every request of job (prompt text or chat messages, the job's
 * temperature, the request's seed and max_tokens) through one engine here;
 * returns n refs in id order.
 */
static struct ref *reference(long job, int *n_out)
{
    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT r.id, r.prompt, r.messages::text, (r.params->>'seed')::bigint, "
             "(r.params->>'max_tokens')::int, (j.params->>'temperature')::float8 FROM "
             "spool.requests r JOIN spool.jobs j ON j.id = r.job_id WHERE r.job_id = %ld AND "
             "r.error IS NULL ORDER BY r.id",
             job);
    PGresult *r = PQexec(c, sql);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    int n = PQntuples(r);
    char err[512];
    se_model_t *m;
    se_tokenizer_t *tok;
    se_engine_t *e;
    assert_int_equal(se_model_open(model_dir, &m, err, sizeof err), 0);
    assert_int_equal(se_tokenizer_open(model_dir, &tok, err, sizeof err), 0);
    struct se_engine_opts eo = {.n_threads = 1, .max_seqs = 8, .tok = tok};
    assert_int_equal(se_engine_open(m, &eo, &e, err, sizeof err), 0);
    struct ref *refs = calloc((size_t)n, sizeof(*refs));
    json_t **ids = calloc((size_t)n, sizeof(*ids));
    size_t *tlen = calloc((size_t)n, sizeof(*tlen));
    for (int i = 0; i < n; i++) {
        refs[i].id = atol(PQgetvalue(r, i, 0));
        char *text;
        bool chat = !PQgetisnull(r, i, 2);
        if (chat) {
            json_t *msgs = json_loads(PQgetvalue(r, i, 2), 0, NULL);
            size_t nm = json_array_size(msgs);
            struct se_chat_msg cm[8];
            for (size_t k = 0; k < nm && k < 8; k++) {
                cm[k].role = json_string_value(json_object_get(json_array_get(msgs, k), "role"));
                cm[k].content =
                    json_string_value(json_object_get(json_array_get(msgs, k), "content"));
            }
            assert_int_equal(se_chat_render(tok, cm, nm, true, &text, err, sizeof err), 0);
            json_decref(msgs);
        } else {
            text = strdup(PQgetvalue(r, i, 1));
        }
        int32_t *p;
        size_t np;
        assert_int_equal(se_tokenizer_encode(tok, text, strlen(text), !chat, &p, &np), 0);
        free(text);
        struct se_seq_params sp = {.prompt = p, .n_prompt = np, .user = (uint64_t)i};
        se_sampling_default(&sp.sampling);
        sp.sampling.seed = (uint64_t)atoll(PQgetvalue(r, i, 3));
        sp.sampling.max_tokens = atoi(PQgetvalue(r, i, 4));
        sp.sampling.temperature = (float)atof(PQgetvalue(r, i, 5));
        int32_t seq;
        assert_int_equal(se_engine_submit(e, &sp, &seq, err, sizeof err), 0);
        free(p);
        ids[i] = json_array();
        refs[i].text = calloc(1, 1);
    }
    PQclear(r);
    for (;;) {
        const struct se_event *ev;
        int k = se_engine_step(e, &ev);
        assert_true(k >= 0);
        for (int j = 0; j < k; j++) {
            int i = (int)ev[j].user;
            if (ev[j].token >= 0 && ev[j].finish != SE_FINISH_CANCELED)
                json_array_append_new(ids[i], json_integer(ev[j].token));
            /* The worker stores a NUL byte as U+FFFD (PostgreSQL text cannot hold NUL). */
            for (size_t b = 0; b < ev[j].text_len; b++) {
                refs[i].text = realloc(refs[i].text, tlen[i] + 4);
                if (ev[j].text[b]) {
                    refs[i].text[tlen[i]++] = ev[j].text[b];
                } else {
                    memcpy(refs[i].text + tlen[i], "\xEF\xBF\xBD", 3);
                    tlen[i] += 3;
                }
                refs[i].text[tlen[i]] = 0;
            }
        }
        if (k == 0 && se_engine_n_active(e) == 0)
            break;
    }
    for (int i = 0; i < n; i++) {
        size_t cap = 16 + json_array_size(ids[i]) * 8, len = 0;
        refs[i].tokens = malloc(cap);
        len += (size_t)snprintf(refs[i].tokens + len, cap - len, "{");
        for (size_t k = 0; k < json_array_size(ids[i]); k++)
            len += (size_t)snprintf(refs[i].tokens + len, cap - len, "%s%lld", k ? "," : "",
                                    (long long)json_integer_value(json_array_get(ids[i], k)));
        snprintf(refs[i].tokens + len, cap - len, "}");
        json_decref(ids[i]);
    }
    free(ids);
    free(tlen);
    se_engine_close(e);
    se_tokenizer_close(tok);
    se_model_close(m);
    *n_out = n;
    return refs;
}

/* Asserts every good request of job succeeded with the reference's tokens and text. */
static void check_outputs(long job)
{
    int n;
    struct ref *refs = reference(job, &n);
    assert_true(n > 0);
    for (int i = 0; i < n; i++) {
        char *st = str("SELECT state FROM spool.requests WHERE id = %ld", refs[i].id);
        char *toks =
            str("SELECT output_tokens::text FROM spool.requests WHERE id = %ld", refs[i].id);
        char *out = str("SELECT output FROM spool.requests WHERE id = %ld", refs[i].id);
        if (strcmp(st, "succeeded") != 0 || strcmp(toks, refs[i].tokens) != 0 ||
            strcmp(out, refs[i].text) != 0)
            fail_msg("request %ld: %s, tokens %s (want %s), text \"%s\" (want \"%s\")", refs[i].id,
                     st, toks, refs[i].tokens, out, refs[i].text);
        free(st);
        free(toks);
        free(out);
        free(refs[i].tokens);
        free(refs[i].text);
    }
    free(refs);
}

/* ---- Set-up ---- */

static long model_id;

static int setup(void **state)
{
    (void)state;
    snprintf(model_dir, sizeof model_dir, "%s/llama-f32", models_dir);
    pgt_start(&t, true);
    c = pgt_connect(&t);
    /* Inside the cluster's directory, which the harness removes even when the test dies. */
    snprintf(tmp, sizeof tmp, "%s/worker-test", t.cluster.dir);
    assert_int_equal(mkdir(tmp, 0700), 0);
    snprintf(store_dir, sizeof store_dir, "%s/store", tmp);
    snprintf(cache_dir, sizeof cache_dir, "%s/cache", tmp);

    char bundle[600], hex[65], uri[1024], err[512];
    uint64_t size;
    snprintf(bundle, sizeof bundle, "%s/bundle.tar.zst", tmp);
    assert_int_equal(sp_bundle_pack(model_dir, bundle, hex, &size, err, sizeof err), 0);
    struct sp_store st;
    assert_int_equal(sp_store_open(store_dir, &st, err, sizeof err), 0);
    assert_int_equal(st.i->put(st.ctx, bundle, hex, uri, sizeof uri, err, sizeof err), 0);
    model_id = num("INSERT INTO spool.models (name, version, digest, uri, size_bytes, "
                   "architecture, dtype, n_params, context_length) VALUES ('tiny', 1, '%s', '%s', "
                   "%" PRIu64 ", 'LlamaForCausalLM', 'f32', 1, 256) RETURNING id",
                   hex, uri, size);

    /* A second version whose stored bytes do not match its digest. */
    char bad[600], fake[65], bad_uri[1024];
    memset(fake, 'b', 64);
    fake[64] = 0;
    snprintf(bad, sizeof bad, "%s/bad.tar.zst", tmp);
    FILE *in = fopen(bundle, "rb"), *out = fopen(bad, "wb");
    int ch;
    while ((ch = fgetc(in)) != EOF)
        fputc(ch, out);
    fputc('!', out);
    fclose(in);
    fclose(out);
    assert_int_equal(st.i->put(st.ctx, bad, fake, bad_uri, sizeof bad_uri, err, sizeof err), 0);
    ok("INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, "
       "n_params, context_length) VALUES ('tiny', 2, '%s', '%s', 1, 'LlamaForCausalLM', 'f32', 1, "
       "256)",
       fake, bad_uri);
    sp_store_close(&st);
    fs_start();
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < 16; i++) {
        if (live_workers[i]) {
            kill(live_workers[i], SIGKILL);
            waitpid(live_workers[i], NULL, 0);
        }
    }
    fs_stop();
    PQfinish(c);
    pgt_stop(&t); /* removes tmp with the cluster's directory */
    return 0;
}

/* A sealed and planned job on model ref: n requests "Item i ..." with seed i and max_tokens. */
static long make_job(const char *model, int n, const char *max_tokens_expr)
{
    long job = num("SELECT spool.submit_job('%s', 'default', '{\"temperature\": 0.9}')", model);
    ok("INSERT INTO spool.requests (job_id, custom_id, prompt, params) SELECT %ld, 'r' || i, "
       "'Item ' || i || ': the quick brown fox', jsonb_build_object('seed', i, 'max_tokens', %s) "
       "FROM generate_series(1, %d) i",
       job, max_tokens_expr, n);
    return job;
}

static void seal_and_plan(long job, int shard_size)
{
    ok("SELECT spool.seal_job(%ld)", job);
    ok("SELECT spool.plan_shards(%ld, %d)", job, shard_size);
    pthread_mutex_lock(&fs.mu);
    fs.job = job;
    pthread_mutex_unlock(&fs.mu);
}

/* ---- Tests ---- */

static void job_completes_with_engine_outputs(void **state)
{
    (void)state;
    long job = make_job("tiny@1", 100, "4 + i % 13");
    /* One chat request, and bad ones that must fail alone. */
    ok("INSERT INTO spool.requests (job_id, custom_id, messages, params) VALUES (%ld, 'chat', "
       "'[{\"role\": \"user\", \"content\": \"Say hi\"}]', '{\"seed\": 7, \"max_tokens\": 6}')",
       job);
    ok("INSERT INTO spool.requests (job_id, custom_id, prompt, params) VALUES "
       "(%ld, 'bad-top-p', 'x', '{\"top_p\": 1.5, \"seed\": 1, \"max_tokens\": 2}'), "
       "(%ld, 'bad-type', 'x', '{\"temperature\": \"hot\", \"seed\": 1, \"max_tokens\": 2}'), "
       "(%ld, 'too-long', repeat('lorem ipsum ', 400), '{\"seed\": 1, \"max_tokens\": 2}'), "
       "(%ld, 'bad-role', NULL, '{\"seed\": 1, \"max_tokens\": 2}')",
       job, job, job, job);
    ok("UPDATE spool.requests SET messages = '[{\"role\": \"robot\", \"content\": \"x\"}]' "
       "WHERE job_id = %ld AND custom_id = 'bad-role'",
       job);
    seal_and_plan(job, 40);
    pid_t w = start_worker("w-complete", 0, NULL);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM spool.jobs WHERE id = %ld AND state = 'succeeded'", job);
    wait_sql(120, 1, sql);
    assert_int_equal(
        num("SELECT count(*) FROM spool.shards WHERE job_id = %ld AND state = 'done'", job), 3);
    stop_worker(w);
    assert_int_equal(fs_get(&fs.dones), 3);
    assert_int_equal(num("SELECT succeeded FROM spool.jobs WHERE id = %ld", job), 101);
    assert_int_equal(num("SELECT failed FROM spool.jobs WHERE id = %ld", job), 4);

    char *e =
        str("SELECT error FROM spool.requests WHERE job_id = %ld AND custom_id = 'bad-top-p'", job);
    assert_non_null(strstr(e, "top_p"));
    free(e);
    e = str("SELECT error FROM spool.requests WHERE job_id = %ld AND custom_id = 'bad-type'", job);
    assert_non_null(strstr(e, "params.temperature must be a number"));
    free(e);
    e = str("SELECT error FROM spool.requests WHERE job_id = %ld AND custom_id = 'too-long'", job);
    assert_non_null(strstr(e, "longer than the model's context of 256 tokens"));
    free(e);
    e = str("SELECT error FROM spool.requests WHERE job_id = %ld AND custom_id = 'bad-role'", job);
    assert_non_null(strstr(e, "messages"));
    free(e);
    /* Usage and cost are recorded per request. */
    assert_int_equal(num("SELECT count(*) FROM spool.requests WHERE job_id = %ld AND state = "
                         "'succeeded' AND tokens_in > 0 AND tokens_out > 0 AND gpu_seconds > 0 "
                         "AND cost > 0 AND model_id = %ld",
                         job, model_id),
                     101);
    check_outputs(job);
}

static void reconnects_with_its_worker_id(void **state)
{
    (void)state;
    pthread_mutex_lock(&fs.mu);
    fs.job = 0;
    int registers = fs.registers, reregisters = fs.reregisters;
    pthread_mutex_unlock(&fs.mu);
    pid_t w = start_worker("w-reconnect", 0, NULL);
    double end = now_s() + 60;
    while (fs_get(&fs.registers) == registers && now_s() < end)
        usleep(20000);
    assert_int_equal(fs_get(&fs.registers), registers + 1);
    uv_async_send(&fs.drop);
    end = now_s() + 60;
    while (fs_get(&fs.reregisters) == reregisters && now_s() < end)
        usleep(20000);
    assert_int_equal(fs_get(&fs.reregisters), reregisters + 1);
    assert_int_equal(fs_get(&fs.registers), registers + 2);
    stop_worker(w);
}

static void digest_mismatch_is_refused(void **state)
{
    (void)state;
    long job = make_job("tiny@2", 3, "4");
    seal_and_plan(job, 10);
    int releases = fs_get(&fs.releases);
    pid_t w = start_worker("w-digest", 0, NULL);
    double end = now_s() + 60;
    while (fs_get(&fs.releases) == releases && now_s() < end)
        usleep(20000);
    pthread_mutex_lock(&fs.mu);
    char reason[1024];
    snprintf(reason, sizeof reason, "%s", fs.last_release);
    pthread_mutex_unlock(&fs.mu);
    assert_int_equal(fs_get(&fs.releases), releases + 1);
    if (!strstr(reason, "model_unavailable") || !strstr(reason, "does not match its digest"))
        fail_msg("RELEASE reason: %s", reason);
    assert_int_equal(num("SELECT count(*) FROM spool.shards WHERE job_id = %ld AND state = "
                         "'pending'",
                         job),
                     1);
    assert_int_equal(num("SELECT count(*) FROM spool.requests WHERE job_id = %ld AND state = "
                         "'pending' AND output IS NULL",
                         job),
                     3);
    stop_worker(w);
    ok("SELECT spool.cancel_job(%ld)", job);
}

static void lost_lease_stops_writes(void **state)
{
    (void)state;
    long job = make_job("tiny@1", 12, "200");
    seal_and_plan(job, 100);
    pid_t w = start_worker("w-fence", 20, NULL);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM spool.requests WHERE job_id = %ld AND checkpoint IS NOT NULL",
             job);
    wait_sql(60, 1, sql);
    long shard = num("SELECT id FROM spool.shards WHERE job_id = %ld", job);
    long token = num("SELECT lease_token FROM spool.shards WHERE id = %ld", shard);
    long other = num("INSERT INTO spool.workers (name) VALUES ('other') RETURNING id");
    ok("SELECT spool.release_shard(%ld, %ld)", shard, token);
    assert_true(num("SELECT spool.lease_shard(%ld, %ld, '10 min')", shard, other) > token);
#define SNAP_SQL                                                                                   \
    "SELECT md5(string_agg(id || state || coalesce(output, '') || coalesce(checkpoint::text, '') " \
    "|| coalesce(checkpoint_at::text, ''), ',' ORDER BY id)) FROM spool.requests WHERE job_id = "  \
    "%ld"
    char *before = str(SNAP_SQL, job);
    sleep(2); /* the worker steps, and would checkpoint every 4 tokens */
    char *after = str(SNAP_SQL, job);
    assert_string_equal(before, after);
    assert_int_equal(num("SELECT count(*) FROM spool.requests WHERE job_id = %ld AND state = "
                         "'succeeded'",
                         job),
                     0);
    assert_int_equal(waitpid(w, NULL, WNOHANG), 0); /* still running */
    free(before);
    free(after);
    stop_worker(w);
    ok("SELECT spool.cancel_job(%ld)", job);
}

enum source { SRC_SIGTERM, SRC_FILE, SRC_AWS, SRC_GCP };

static void preempt_and_resume(enum source src)
{
    long job = make_job("tiny@1", 12, "150");
    seal_and_plan(job, 6);
    char notice[600] = "", file[600];
    snprintf(file, sizeof file, "%s/preempt-notice", tmp);
    unlink(file);
    if (src == SRC_FILE)
        snprintf(notice, sizeof notice, "file:%s", file);
    if (src == SRC_AWS || src == SRC_GCP) {
        aws_start();
        snprintf(notice, sizeof notice, "%s:http://127.0.0.1:%d", src == SRC_AWS ? "aws" : "gcp",
                 aws.port);
    }
    int drains = fs_get(&fs.drains), goodbyes = fs_get(&fs.goodbyes);
    pid_t w = start_worker("w-preempt", 20, *notice ? notice : NULL);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM spool.requests WHERE job_id = %ld AND checkpoint IS NOT NULL",
             job);
    wait_sql(60, 1, sql);
    if (src == SRC_AWS || src == SRC_GCP)
        assert_true(__atomic_load_n(&aws.polls, __ATOMIC_SEQ_CST) >= 1); /* polled, 404 so far */
    double t0 = now_s();
    if (src == SRC_SIGTERM)
        kill(w, SIGTERM);
    else if (src == SRC_FILE)
        fclose(fopen(file, "w"));
    else
        __atomic_store_n(&aws.notice, 1, __ATOMIC_SEQ_CST);
    int st = wait_worker(w, 30);
    double took = now_s() - t0;
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
    assert_true(took < 8 + 1.5); /* the drain deadline, plus the notice's polling interval */
    if (src == SRC_AWS || src == SRC_GCP)
        aws_stop();
    unlink(file);

    /* Released with checkpoints, nothing running, the preemption recorded. */
    assert_int_equal(num("SELECT count(*) FROM spool.shards WHERE job_id = %ld AND state = "
                         "'leased'",
                         job),
                     0);
    assert_true(num("SELECT count(*) FROM spool.shards WHERE job_id = %ld AND state = 'pending'",
                    job) >= 1);
    assert_int_equal(num("SELECT count(*) FROM spool.requests WHERE job_id = %ld AND state = "
                         "'running'",
                         job),
                     0);
    assert_true(num("SELECT count(*) FROM spool.requests WHERE job_id = %ld AND state = 'pending' "
                    "AND checkpoint IS NOT NULL",
                    job) >= 1);
    const char *want = src == SRC_SIGTERM ? "sigterm"
                       : src == SRC_FILE  ? "notice-file"
                       : src == SRC_AWS   ? "aws"
                                          : "gcp";
    assert_int_equal(num("SELECT count(*) FROM spool.preemptions p JOIN spool.workers w ON w.id = "
                         "p.worker_id WHERE w.name = 'w-preempt' AND p.source = '%s' AND "
                         "p.shards_released >= 1 AND p.sequences >= 1 AND p.tokens_lost = 0",
                         want),
                     1);
    assert_int_equal(fs_get(&fs.drains), drains + 1);
    assert_int_equal(fs_get(&fs.goodbyes), goodbyes + 1);

    /* A second worker resumes from the checkpoints: the outputs equal an uninterrupted run. */
    pid_t w2 = start_worker("w-resume", 0, NULL);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM spool.jobs WHERE id = %ld AND state = 'succeeded'", job);
    wait_sql(120, 1, sql);
    stop_worker(w2);
    check_outputs(job);
}

/*
 * DRAIN from the scheduler: the worker checkpoints and releases its shards but
 * stays up; when it registers again (the scheduler came back) it takes the
 * shards again and finishes them with the outputs of an uninterrupted run.
 */
static void scheduler_drain_releases_and_worker_stays(void **state)
{
    (void)state;
    long job = make_job("tiny@1", 8, "150");
    seal_and_plan(job, 8);
    int releases = fs_get(&fs.releases), reregisters = fs_get(&fs.reregisters);
    pid_t w = start_worker("w-drain", 20, NULL);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM spool.requests WHERE job_id = %ld AND checkpoint IS NOT NULL",
             job);
    wait_sql(60, 1, sql);
    uv_async_send(&fs.drain);
    double end = now_s() + 60;
    while (fs_get(&fs.releases) == releases && now_s() < end)
        usleep(20000);
    pthread_mutex_lock(&fs.mu);
    char reason[64];
    snprintf(reason, sizeof reason, "%s", fs.last_release);
    pthread_mutex_unlock(&fs.mu);
    assert_string_equal(reason, "draining");
    assert_int_equal(num("SELECT count(*) FROM spool.shards WHERE job_id = %ld AND state = "
                         "'pending'",
                         job),
                     1);
    assert_true(num("SELECT count(*) FROM spool.requests WHERE job_id = %ld AND state = 'pending' "
                    "AND checkpoint IS NOT NULL",
                    job) >= 1);
    usleep(300000);
    assert_int_equal(waitpid(w, NULL, WNOHANG), 0); /* still up */
    /* The scheduler "restarts": the worker registers again and gets the shard back. */
    uv_async_send(&fs.drop);
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM spool.jobs WHERE id = %ld AND state = 'succeeded'", job);
    wait_sql(120, 1, sql);
    assert_true(fs_get(&fs.reregisters) > reregisters);
    stop_worker(w);
    check_outputs(job);
}

static void preempt_by_sigterm(void **state)
{
    (void)state;
    preempt_and_resume(SRC_SIGTERM);
}

static void preempt_by_notice_file(void **state)
{
    (void)state;
    preempt_and_resume(SRC_FILE);
}

static void preempt_by_aws_endpoint(void **state)
{
    (void)state;
    preempt_and_resume(SRC_AWS);
}

static void preempt_by_gcp_endpoint(void **state)
{
    (void)state;
    preempt_and_resume(SRC_GCP);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s WORKER_EXE MODELS_DIR\n", argv[0]);
        return 2;
    }
    worker_exe = argv[1];
    models_dir = argv[2];
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(job_completes_with_engine_outputs),
        cmocka_unit_test(reconnects_with_its_worker_id),
        cmocka_unit_test(digest_mismatch_is_refused),
        cmocka_unit_test(lost_lease_stops_writes),
        cmocka_unit_test(scheduler_drain_releases_and_worker_stays),
        cmocka_unit_test(preempt_by_sigterm),
        cmocka_unit_test(preempt_by_notice_file),
        cmocka_unit_test(preempt_by_aws_endpoint),
        cmocka_unit_test(preempt_by_gcp_endpoint),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
