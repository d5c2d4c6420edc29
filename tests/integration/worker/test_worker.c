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
 * The live lane (worker/live.c), with the fake scheduler sending LIVE_REQUEST
 * and CANCEL and recording TOKENS, USAGE and ERROR per request: a text and a
 * chat request stream what `spool generate` gives for the same input and
 * seed; stop strings; refusals (bad sampling value, wrong model, prompt too
 * long) are ERRORs naming the problem; CANCEL and a lost connection free the
 * sequence (HEARTBEAT's running count drops back); and a live request sent
 * while a batch shard fills every engine slot gets its first token within
 * two engine steps, while the batch job still completes with its exact
 * outputs.
 *
 * Usage: integration_worker_worker WORKER_EXE MODELS_DIR SPOOL_EXE
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

#include <fcntl.h>

#include <cmocka.h>
#include <jansson.h>
#include <uv.h>

#include "pgtest.h"
#include "pgtest_sql.h"
#include "spool/bundle.h"
#include "spool/engine.h"
#include "spool/wire_conn.h"

static const char *worker_exe, *models_dir, *spool_exe;
static char model_dir[1024], tmp[256], store_dir[512], cache_dir[512];
static struct pgt t;
static PGconn *c;

/* ---- SQL helpers ---- */

#define ok(...)  pgt_ok(c, __VA_ARGS__)
#define num(...) pgt_num(c, __VA_ARGS__)

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

/* What the fake scheduler received about one live request. */
struct fs_live {
    uint64_t id;
    int frames;           /* TOKENS frames */
    int frames_after_end; /* TOKENS or USAGE after the request's USAGE (must stay 0) */
    int32_t ids[1024];    /* token ids, in order */
    int n_ids;
    int n_logprobs;   /* logprobs received, one per token when asked for */
    char text[16384]; /* the concatenated text */
    size_t text_len;
    bool bad_utf8;   /* some frame's text was not complete UTF-8 on its own */
    char finish[16]; /* the last TOKENS' finish_reason; "" before it */
    bool usage;      /* USAGE arrived (after the last TOKENS) */
    uint64_t tokens_in, tokens_out;
    double gpu_seconds;
    char code[32], message[1024]; /* an ERROR for this request */
    double t_first;               /* when the first token arrived */
};

#define FS_MAX_LIVE 32

static struct {
    pthread_t thread;
    uv_loop_t loop;
    uv_tcp_t server;
    uv_async_t stop, drop, drain, send;
    int port;
    PGconn *db;
    pthread_mutex_t mu;
    pthread_cond_t sent_cv;
    long job; /* the job whose pending shards are assigned on REGISTER */
    int registers, reregisters, dones, releases, drains, goodbyes, heartbeats;
    char last_release[1024];
    /* The live lane. */
    sp_wire_conn_t *conn;          /* the latest registered connection */
    struct sp_wire_frame *to_send; /* handed to the loop thread by fs_send */
    bool sent;
    int send_rc;
    uint32_t hb_running, hb_queued, hb_kv_total; /* the last HEARTBEAT */
    char reg_model[256];                         /* REGISTER's models: "name@version digest" */
    struct fs_live lives[FS_MAX_LIVE];
    int n_lives;
} fs = {.mu = PTHREAD_MUTEX_INITIALIZER, .sent_cv = PTHREAD_COND_INITIALIZER};

/* True when s[0, n) is complete, valid UTF-8 (no character cut at either end). */
static bool utf8_ok(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned b = s[i];
        size_t k = b < 0x80             ? 0
                   : (b & 0xE0) == 0xC0 ? 1
                   : (b & 0xF0) == 0xE0 ? 2
                   : (b & 0xF8) == 0xF0 ? 3
                                        : 9;
        if (k == 9 || i + k >= n)
            return false;
        for (size_t j = 1; j <= k; j++)
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
        i += k + 1;
    }
    return true;
}

/* The record of live request id (created on first use); call with fs.mu held. */
static struct fs_live *fs_live_of(uint64_t id)
{
    for (int i = 0; i < fs.n_lives; i++)
        if (fs.lives[i].id == id)
            return &fs.lives[i];
    if (fs.n_lives == FS_MAX_LIVE)
        return NULL;
    struct fs_live *l = &fs.lives[fs.n_lives++];
    memset(l, 0, sizeof(*l));
    l->id = id;
    return l;
}

static void fs_on_live_frame(struct sp_wire_frame *f)
{
    pthread_mutex_lock(&fs.mu);
    if (f->type == SP_WIRE_TOKENS) {
        struct fs_live *l = fs_live_of(f->tokens.request_id);
        if (l) {
            if (l->usage || l->finish[0])
                l->frames_after_end++;
            l->frames++;
            if (!utf8_ok((const unsigned char *)f->tokens.text, f->tokens.text_len))
                l->bad_utf8 = true;
            for (uint32_t i = 0; i < f->tokens.n_token_ids && l->n_ids < 1024; i++)
                l->ids[l->n_ids++] = f->tokens.token_ids[i];
            if (f->tokens.n_token_ids && l->t_first == 0)
                l->t_first = now_s();
            l->n_logprobs += (int)f->tokens.n_logprobs;
            if (l->text_len + f->tokens.text_len < sizeof(l->text)) {
                memcpy(l->text + l->text_len, f->tokens.text, f->tokens.text_len);
                l->text_len += f->tokens.text_len;
            }
            if (f->tokens.finish_reason)
                snprintf(l->finish, sizeof(l->finish), "%s", f->tokens.finish_reason);
        }
    } else if (f->type == SP_WIRE_USAGE && f->usage.has_request_id) {
        struct fs_live *l = fs_live_of(f->usage.request_id);
        if (l) {
            if (l->usage || !l->finish[0])
                l->frames_after_end++; /* USAGE twice, or before the last TOKENS */
            l->usage = true;
            l->tokens_in = f->usage.tokens_in;
            l->tokens_out = f->usage.tokens_out;
            l->gpu_seconds = f->usage.gpu_seconds;
        }
    } else if (f->type == SP_WIRE_ERROR && f->error.has_request_id) {
        struct fs_live *l = fs_live_of(f->error.request_id);
        if (l) {
            snprintf(l->code, sizeof(l->code), "%s", f->error.code);
            snprintf(l->message, sizeof(l->message), "%s", f->error.message);
        }
    }
    pthread_mutex_unlock(&fs.mu);
}

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
        fs.conn = conn;
        fs.hb_running = fs.hb_queued = 0;
        if (f->reg.n_models == 1)
            snprintf(fs.reg_model, sizeof fs.reg_model, "%s@%u %s", f->reg.models[0].name,
                     f->reg.models[0].version, f->reg.models[0].digest);
        else
            snprintf(fs.reg_model, sizeof fs.reg_model, "%u models", f->reg.n_models);
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
        if (f->type == SP_WIRE_HEARTBEAT) {
            fs.heartbeats++;
            fs.hb_running = f->heartbeat.running;
            fs.hb_queued = f->heartbeat.queued;
            fs.hb_kv_total = f->heartbeat.kv_blocks_total;
        }
        pthread_mutex_unlock(&fs.mu);
        break;
    case SP_WIRE_TOKENS:
    case SP_WIRE_USAGE:
    case SP_WIRE_ERROR:
        fs_on_live_frame(f);
        break;
    default:
        break;
    }
}

static void fs_on_close(sp_wire_conn_t *conn, int err)
{
    (void)err;
    pthread_mutex_lock(&fs.mu);
    if (fs.conn == conn)
        fs.conn = NULL;
    pthread_mutex_unlock(&fs.mu);
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

/* Sends the frame fs_send handed over on the latest registered connection. */
static void fs_on_send(uv_async_t *a)
{
    (void)a;
    pthread_mutex_lock(&fs.mu);
    struct sp_wire_frame *f = fs.to_send;
    sp_wire_conn_t *conn = fs.conn;
    pthread_mutex_unlock(&fs.mu);
    if (!f)
        return;
    int rc = conn ? sp_wire_conn_send(conn, f) : -1;
    pthread_mutex_lock(&fs.mu);
    fs.to_send = NULL;
    fs.sent = true;
    fs.send_rc = rc;
    pthread_cond_broadcast(&fs.sent_cv);
    pthread_mutex_unlock(&fs.mu);
}

/* Sends f (built in the caller's memory) to the worker; returns once it is encoded. */
static void fs_send(struct sp_wire_frame *f)
{
    pthread_mutex_lock(&fs.mu);
    fs.to_send = f;
    fs.sent = false;
    pthread_mutex_unlock(&fs.mu);
    uv_async_send(&fs.send);
    pthread_mutex_lock(&fs.mu);
    while (!fs.sent)
        pthread_cond_wait(&fs.sent_cv, &fs.mu);
    int rc = fs.send_rc;
    pthread_mutex_unlock(&fs.mu);
    assert_int_equal(rc, 0);
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
    uv_async_init(&fs.loop, &fs.send, fs_on_send);
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

/*
 * Starts a worker; with model, --model MODEL (live requests); with log, its
 * stderr goes to that file.
 */
static pid_t start_worker_ex(const char *name, int step_delay_ms, const char *notice,
                             const char *model, const char *log)
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
    if (model) {
        argv[n++] = "--model";
        argv[n++] = model;
    }
    argv[n] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (log) {
            int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (fd < 0 || dup2(fd, 2) < 0)
                _exit(126);
            close(fd);
            setenv("SPOOL_LOG_LEVEL", "info", 1); /* the lines the live tests read */
        }
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

static pid_t start_worker(const char *name, int step_delay_ms, const char *notice)
{
    return start_worker_ex(name, step_delay_ms, notice, NULL, NULL);
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

/* ---- The live lane ---- */

static void fs_live_reset(void)
{
    pthread_mutex_lock(&fs.mu);
    fs.n_lives = 0;
    fs.job = 0;
    pthread_mutex_unlock(&fs.mu);
}

/* A copy of what arrived so far for request id (all zero when nothing did). */
static struct fs_live live_get(uint64_t id)
{
    struct fs_live l = {.id = id};
    pthread_mutex_lock(&fs.mu);
    for (int i = 0; i < fs.n_lives; i++)
        if (fs.lives[i].id == id)
            l = fs.lives[i];
    pthread_mutex_unlock(&fs.mu);
    return l;
}

/* Waits until request id ended (USAGE after its last TOKENS, or an ERROR). */
static struct fs_live wait_live_end(uint64_t id, double timeout_s)
{
    double end = now_s() + timeout_s;
    struct fs_live l;
    for (;;) {
        l = live_get(id);
        if (l.usage || l.code[0])
            return l;
        if (now_s() > end)
            fail_msg("live request %" PRIu64 " did not end within %.0f s (%d TOKENS, finish '%s')",
                     id, timeout_s, l.frames, l.finish);
        usleep(5000);
    }
}

static void wait_live_tokens(uint64_t id, int n, double timeout_s)
{
    double end = now_s() + timeout_s;
    while (live_get(id).n_ids < n) {
        if (now_s() > end)
            fail_msg("live request %" PRIu64 ": fewer than %d tokens within %.0f s", id, n,
                     timeout_s);
        usleep(5000);
    }
}

/* Waits for a HEARTBEAT sent after this call with running == want (and queued, unless < 0). */
static void wait_hb(uint32_t want, int queued, double timeout_s)
{
    int seen = fs_get(&fs.heartbeats);
    double end = now_s() + timeout_s;
    for (;;) {
        pthread_mutex_lock(&fs.mu);
        bool ok = fs.heartbeats > seen && fs.hb_running == want &&
                  (queued < 0 || fs.hb_queued == (uint32_t)queued);
        uint32_t r = fs.hb_running, q = fs.hb_queued;
        pthread_mutex_unlock(&fs.mu);
        if (ok)
            return;
        if (now_s() > end)
            fail_msg("no HEARTBEAT with running %u (queued %d) within %.0f s (last: %u, %u)", want,
                     queued, timeout_s, r, q);
        usleep(10000);
    }
}

/* Waits until a worker registered (more than `before` registrations) and the connection is up. */
static void wait_registered(int before)
{
    double end = now_s() + 60;
    for (;;) {
        pthread_mutex_lock(&fs.mu);
        bool ok = fs.registers > before && fs.conn;
        pthread_mutex_unlock(&fs.mu);
        if (ok)
            return;
        if (now_s() > end)
            fail_msg("the worker did not register");
        usleep(10000);
    }
}

static char *model_digest(void)
{
    return str("SELECT 'sha256:' || digest FROM spool.models WHERE id = %ld", model_id);
}

static void send_live(uint64_t id, uint32_t version, const char *digest, const char *prompt,
                      const struct sp_wire_message *msgs, uint32_t n_msgs,
                      const struct sp_wire_sampling *sp)
{
    struct sp_wire_frame f = {
        .type = SP_WIRE_LIVE_REQUEST,
        .live = {.request_id = id,
                 .model = {.name = "tiny", .version = version, .digest = digest},
                 .prompt = {.is_text = true, .text = prompt, .text_len = strlen(prompt)},
                 .sampling = *sp,
                 .priority = 0,
                 .messages = (struct sp_wire_message *)msgs,
                 .n_messages = n_msgs}};
    fs_send(&f);
}

/* A LIVE_REQUEST whose prompt is token ids. */
static void send_live_ids(uint64_t id, const int32_t *ids, uint32_t n,
                          const struct sp_wire_sampling *sp)
{
    struct sp_wire_frame f = {.type = SP_WIRE_LIVE_REQUEST,
                              .live = {.request_id = id,
                                       .model = {.name = "tiny", .version = 1},
                                       .prompt = {.tokens = (int32_t *)ids, .n_tokens = n},
                                       .sampling = *sp}};
    fs_send(&f);
}

static void send_cancel(uint64_t id)
{
    struct sp_wire_frame f = {.type = SP_WIRE_CANCEL, .cancel = {.request_id = id}};
    fs_send(&f);
}

/* `spool generate --json` for one --prompt or --chat; returns its JSON object. */
static json_t *generate(const char *flag, const char *input, int max_tokens, double temperature,
                        int seed)
{
    char cmd[4096];
    snprintf(cmd, sizeof cmd,
             "'%s' generate --model '%s' --threads 1 --json --max-tokens %d --temperature %g "
             "--seed %d %s '%s'",
             spool_exe, model_dir, max_tokens, temperature, seed, flag, input);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = 0;
    assert_int_equal(pclose(p), 0);
    json_error_t je;
    json_t *o = json_loads(buf, JSON_ALLOW_NUL, &je);
    if (!o)
        fail_msg("spool generate printed no JSON (%s): %s", je.text, buf);
    return o;
}

/* The streamed request equals spool generate's output: text, token ids, finish and usage. */
static void check_like_generate(const struct fs_live *l, json_t *g)
{
    json_t *text = json_object_get(g, "text"), *ids = json_object_get(g, "token_ids");
    size_t glen = json_string_length(text);
    if (glen != l->text_len || memcmp(json_string_value(text), l->text, glen) != 0)
        fail_msg("live request %" PRIu64 ": streamed text (%zu bytes) differs from spool "
                 "generate's (%zu bytes): \"%.*s\" vs \"%s\"",
                 l->id, l->text_len, glen, (int)l->text_len, l->text, json_string_value(text));
    assert_int_equal(l->n_ids, (int)json_array_size(ids));
    for (int i = 0; i < l->n_ids; i++)
        assert_int_equal(l->ids[i], json_integer_value(json_array_get(ids, (size_t)i)));
    assert_string_equal(l->finish, json_string_value(json_object_get(g, "finish_reason")));
    assert_int_equal(l->tokens_in, json_integer_value(json_object_get(g, "prompt_tokens")));
    assert_int_equal(l->tokens_out, json_integer_value(json_object_get(g, "completion_tokens")));
    assert_true(l->gpu_seconds > 0);
    assert_false(l->bad_utf8);
    assert_int_equal(l->frames_after_end, 0);
    assert_true(l->frames >= l->n_ids); /* one TOKENS per token, then the last */
}

/* The number of engine steps from arrival to the first token, from the worker's log line. */
static long first_token_steps(const char *log, uint64_t id)
{
    char want[64];
    snprintf(want, sizeof want, "live request %" PRIu64 " ", id);
    double end = now_s() + 10;
    while (now_s() < end) {
        FILE *f = fopen(log, "r");
        char line[2048];
        while (f && fgets(line, sizeof line, f)) {
            const char *p = strstr(line, want), *q = p ? strstr(p, "first token after ") : NULL;
            if (q) {
                fclose(f);
                return strtol(q + strlen("first token after "), NULL, 10);
            }
        }
        if (f)
            fclose(f);
        usleep(20000);
    }
    fail_msg("no 'first token after' line for live request %" PRIu64 " in %s", id, log);
    return -1;
}

static bool log_has(const char *log, const char *needle)
{
    FILE *f = fopen(log, "r");
    char line[2048];
    bool found = false;
    while (f && !found && fgets(line, sizeof line, f))
        found = strstr(line, needle) != NULL;
    if (f)
        fclose(f);
    return found;
}

static const struct sp_wire_message chat[2] = {
    {.role = "system", .content = "You are terse."},
    {.role = "user", .content = "Name a colour."},
};
static const char chat_json[] = "[{\"role\": \"system\", \"content\": \"You are terse.\"}, "
                                "{\"role\": \"user\", \"content\": \"Name a colour.\"}]";

static void expect_refusal(uint64_t id, const char *code, const char *needle)
{
    struct fs_live l = wait_live_end(id, 30);
    if (strcmp(l.code, code) != 0 || !strstr(l.message, needle))
        fail_msg("live request %" PRIu64 ": got ERROR %s \"%s\"; want %s naming \"%s\"", id, l.code,
                 l.message, code, needle);
    assert_int_equal(l.frames, 0);
    assert_false(l.usage);
}

static void live_streams_like_generate(void **state)
{
    (void)state;
    fs_live_reset();
    char log[600];
    snprintf(log, sizeof log, "%s/live-generate.log", tmp);
    int regs = fs_get(&fs.registers);
    pid_t w = start_worker_ex("w-live", 0, NULL, "tiny@1", log);
    wait_registered(regs);
    char *digest = model_digest(), want[256];
    snprintf(want, sizeof want, "tiny@1 %s", digest);
    pthread_mutex_lock(&fs.mu);
    char reg[256];
    snprintf(reg, sizeof reg, "%s", fs.reg_model);
    pthread_mutex_unlock(&fs.mu);
    assert_string_equal(reg, want); /* REGISTER announces the --model version */

    struct sp_wire_sampling s1 = {.has_temperature = true,
                                  .temperature = 0.8,
                                  .has_seed = true,
                                  .seed = 42,
                                  .has_max_tokens = true,
                                  .max_tokens = 24};
    struct sp_wire_sampling s2 = {.has_temperature = true,
                                  .temperature = 0.7,
                                  .has_seed = true,
                                  .seed = 7,
                                  .has_max_tokens = true,
                                  .max_tokens = 20,
                                  .has_logprobs = true};
    send_live(1, 1, NULL, "Once upon a time", NULL, 0, &s1);
    send_live(2, 1, digest, "", chat, 2, &s2);
    struct fs_live l1 = wait_live_end(1, 60), l2 = wait_live_end(2, 60);
    assert_string_equal(l1.code, "");
    assert_string_equal(l2.code, "");
    json_t *g1 = generate("--prompt", "Once upon a time", 24, 0.8, 42);
    json_t *g2 = generate("--chat", chat_json, 20, 0.7, 7);
    check_like_generate(&l1, g1);
    check_like_generate(&l2, g2);
    assert_int_equal(l2.n_logprobs, l2.n_ids); /* asked for: one per token */
    assert_int_equal(l1.n_logprobs, 0);
    json_decref(g1);
    json_decref(g2);

    /* A stop string: the text ends before its first occurrence, finish "stop". */
    size_t at = 1;
    while (at < l1.text_len && ((unsigned char)l1.text[at] & 0xC0) == 0x80)
        at++; /* the start of the second character */
    size_t cl = 1;
    while (at + cl < l1.text_len && ((unsigned char)l1.text[at + cl] & 0xC0) == 0x80)
        cl++;
    if (at >= l1.text_len || memchr(l1.text + at, 0, cl))
        fail_msg("the reference output is too short for a stop string: \"%s\"", l1.text);
    char stop[8] = {0};
    memcpy(stop, l1.text + at, cl);
    const char *stops[1] = {stop};
    struct sp_wire_sampling s3 = s1;
    s3.stop = stops;
    s3.n_stop = 1;
    send_live(3, 1, NULL, "Once upon a time", NULL, 0, &s3);
    struct fs_live l3 = wait_live_end(3, 60);
    const char *first = memmem(l1.text, l1.text_len, stop, cl);
    assert_non_null(first);
    assert_int_equal(l3.text_len, (size_t)(first - l1.text));
    assert_memory_equal(l3.text, l1.text, l3.text_len);
    assert_string_equal(l3.finish, "stop");
    assert_false(l3.bad_utf8);

    /* A prompt of token ids: the ids of the same text give the same stream. */
    char e[512];
    se_tokenizer_t *tok;
    assert_int_equal(se_tokenizer_open(model_dir, &tok, e, sizeof e), 0);
    int32_t *ids;
    size_t n_ids;
    assert_int_equal(se_tokenizer_encode(tok, "Once upon a time", 16, true, &ids, &n_ids), 0);
    se_tokenizer_close(tok);
    send_live_ids(4, ids, (uint32_t)n_ids, &s1);
    struct fs_live l4 = wait_live_end(4, 60);
    assert_int_equal(l4.n_ids, l1.n_ids);
    assert_memory_equal(l4.ids, l1.ids, sizeof(int32_t) * (size_t)l1.n_ids);
    assert_int_equal(l4.text_len, l1.text_len);
    assert_memory_equal(l4.text, l1.text, l1.text_len);
    ids[0] = 1 << 30; /* outside the vocabulary */
    send_live_ids(5, ids, (uint32_t)n_ids, &s1);
    expect_refusal(5, "SP_EINVAL", "outside the vocabulary");
    free(ids);
    free(digest);
    stop_worker(w);
}

static void live_refusals_name_the_problem(void **state)
{
    (void)state;
    fs_live_reset();
    int regs = fs_get(&fs.registers);
    pid_t w = start_worker_ex("w-refuse", 0, NULL, "tiny@1", NULL);
    wait_registered(regs);
    struct sp_wire_sampling ok_sp = {.has_max_tokens = true, .max_tokens = 3};
    struct sp_wire_sampling top_p = {.has_top_p = true, .top_p = 1.5};
    struct sp_wire_sampling top_k = {.has_top_k = true, .top_k = -1};
    send_live(10, 1, NULL, "hello", NULL, 0, &top_p);
    expect_refusal(10, "SP_EINVAL", "top_p");
    send_live(11, 1, NULL, "hello", NULL, 0, &top_k);
    expect_refusal(11, "SP_EINVAL", "sampling.top_k");
    send_live(12, 2, NULL, "hello", NULL, 0, &ok_sp);
    expect_refusal(12, "SP_ENOENT", "tiny@2 is not loaded");
    char bad_digest[72] = "sha256:";
    memset(bad_digest + 7, 'b', 64);
    send_live(13, 1, bad_digest, "hello", NULL, 0, &ok_sp);
    expect_refusal(13, "SP_ENOENT", "is not loaded");
    char *long_prompt = str("SELECT repeat('lorem ipsum ', 400)");
    send_live(14, 1, NULL, long_prompt, NULL, 0, &ok_sp);
    free(long_prompt);
    expect_refusal(14, "SP_ECONTEXT", "longer than the model's context of 256 tokens");
    const struct sp_wire_message robot[1] = {{.role = "robot", .content = "x"}};
    send_live(15, 1, NULL, "", robot, 1, &ok_sp);
    expect_refusal(15, "SP_EINVAL", "messages");
    send_live(16, 1, NULL, "x", chat, 2, &ok_sp);
    expect_refusal(16, "SP_EINVAL", "prompt must be empty text when messages is given");
    send_live(17, 1, NULL, "", NULL, 0, &ok_sp);
    expect_refusal(17, "SP_EINVAL", "prompt is empty");
    /* The worker still serves after refusals. */
    send_live(18, 1, NULL, "hello", NULL, 0, &ok_sp);
    struct fs_live l = wait_live_end(18, 60);
    assert_string_equal(l.code, "");
    assert_true(l.n_ids >= 1 && l.n_ids <= 3);
    /* After a DRAIN from the scheduler, new live requests are refused. */
    struct sp_wire_frame drain = {.type = SP_WIRE_DRAIN,
                                  .drain = {.reason = "shutdown", .deadline_ms = 10000}};
    fs_send(&drain);
    send_live(19, 1, NULL, "hello", NULL, 0, &ok_sp);
    expect_refusal(19, "SP_ESTATE", "is draining");
    stop_worker(w);

    /* A --model that does not resolve stops the worker at start-up, naming it. */
    char log[600];
    snprintf(log, sizeof log, "%s/live-badmodel.log", tmp);
    pid_t bad = start_worker_ex("w-badmodel", 0, NULL, "tiny@9", log);
    int st = wait_worker(bad, 60);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 1);
    assert_true(log_has(log, "--model tiny@9"));
    assert_true(log_has(log, "has no version or alias \"9\""));
}

static void live_cancel_and_lost_connection_free_sequences(void **state)
{
    (void)state;
    fs_live_reset();
    char log[600];
    snprintf(log, sizeof log, "%s/live-cancel.log", tmp);
    int regs = fs_get(&fs.registers);
    pid_t w = start_worker_ex("w-cancel", 30, NULL, "tiny@1", log);
    wait_registered(regs);
    struct sp_wire_sampling longer = {.has_max_tokens = true,
                                      .max_tokens = 200,
                                      .has_ignore_eos = true,
                                      .ignore_eos = true,
                                      .has_seed = true,
                                      .seed = 1};
    send_live(20, 1, NULL, "A long story", NULL, 0, &longer);
    wait_live_tokens(20, 3, 60);
    wait_hb(1, 0, 10);
    pthread_mutex_lock(&fs.mu);
    assert_true(fs.hb_kv_total > 0);
    pthread_mutex_unlock(&fs.mu);
    send_cancel(20);
    struct fs_live l = wait_live_end(20, 10);
    assert_string_equal(l.finish, "cancelled");
    assert_true(l.tokens_out >= 3 && l.tokens_out < 200);
    wait_hb(0, 0, 10); /* the sequence is gone from the engine */
    usleep(300000);
    struct fs_live later = live_get(20);
    assert_int_equal(later.frames, l.frames); /* nothing after the last TOKENS */
    assert_int_equal(later.frames_after_end, 0);
    send_cancel(20); /* a second CANCEL is ignored */

    /* A lost connection cancels every live request: nobody could receive their tokens. */
    send_live(21, 1, NULL, "Another long story", NULL, 0, &longer);
    send_live(22, 1, NULL, "And a third", NULL, 0, &longer);
    wait_live_tokens(21, 3, 60);
    wait_live_tokens(22, 3, 60);
    regs = fs_get(&fs.registers);
    uv_async_send(&fs.drop);
    wait_registered(regs);
    wait_hb(0, 0, 10);
    assert_string_equal(live_get(21).finish, "");
    assert_true(log_has(log, "2 live requests ended (the scheduler connection closed)"));
    /* Still serving on the new connection. */
    struct sp_wire_sampling small = {.has_max_tokens = true, .max_tokens = 2};
    send_live(23, 1, NULL, "hello", NULL, 0, &small);
    assert_string_equal(wait_live_end(23, 60).code, "");
    /* A preemption notice ends running live requests with finish_reason error, then USAGE. */
    send_live(24, 1, NULL, "A story cut short", NULL, 0, &longer);
    wait_live_tokens(24, 2, 60);
    stop_worker(w);                             /* SIGTERM */
    struct fs_live cut = wait_live_end(24, 10); /* frames sent before exiting */
    assert_string_equal(cut.finish, "error");
    assert_true(cut.usage);
    assert_int_equal(cut.frames_after_end, 0);
}

/*
 * THE check of the live lane: a batch shard fills every engine slot (16
 * running, the rest of its 24 requests waiting); a live request sent then
 * gets its first token within two engine steps (counted by the worker: steps
 * from arrival to first token, read from its log), streams what spool
 * generate gives, and the batch job still completes with exactly its outputs.
 */
static void live_overtakes_saturated_batch(void **state)
{
    (void)state;
    fs_live_reset();
    long job = make_job("tiny@1", 24, "48");
    seal_and_plan(job, 24);
    char log[600];
    snprintf(log, sizeof log, "%s/live-saturated.log", tmp);
    pid_t w = start_worker_ex("w-saturated", 40, NULL, "tiny@1", log);
    wait_hb(16, -1, 60); /* every slot taken (queued: 8 less those finished early) */
    pthread_mutex_lock(&fs.mu);
    uint32_t queued = fs.hb_queued;
    pthread_mutex_unlock(&fs.mu);
    struct sp_wire_sampling sp = {.has_temperature = true,
                                  .temperature = 0.8,
                                  .has_seed = true,
                                  .seed = 5,
                                  .has_max_tokens = true,
                                  .max_tokens = 12};
    double t0 = now_s();
    send_live(30, 1, NULL, "The live request", NULL, 0, &sp);
    struct fs_live l = wait_live_end(30, 60);
    long done = num("SELECT count(*) FROM spool.requests WHERE job_id = %ld AND state = "
                    "'succeeded'",
                    job);
    assert_true(done < 24); /* the batch was still running all along */
    long steps = first_token_steps(log, 30);
    fprintf(stderr,
            "live request under a saturated batch (16 running, %u queued): first token after %ld "
            "engine steps, %.1f ms (40 ms pause between steps); %ld of 24 batch requests done "
            "when it ended\n",
            queued, steps, (l.t_first - t0) * 1e3, done);
    assert_true(steps >= 1 && steps <= 2);
    json_t *g = generate("--prompt", "The live request", 12, 0.8, 5);
    check_like_generate(&l, g);
    json_decref(g);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM spool.jobs WHERE id = %ld AND state = 'succeeded'", job);
    wait_sql(120, 1, sql);
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
    if (argc != 4) {
        fprintf(stderr, "usage: %s WORKER_EXE MODELS_DIR SPOOL_EXE\n", argv[0]);
        return 2;
    }
    worker_exe = argv[1];
    models_dir = argv[2];
    spool_exe = argv[3];
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
        cmocka_unit_test(live_streams_like_generate),
        cmocka_unit_test(live_refusals_name_the_problem),
        cmocka_unit_test(live_cancel_and_lost_connection_free_sequences),
        cmocka_unit_test(live_overtakes_saturated_batch),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
