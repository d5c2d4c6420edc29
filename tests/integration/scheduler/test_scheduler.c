/*
 * spool-scheduler end to end: the real binary (argv[1]) as a child process,
 * a real PostgreSQL per test (pgtest), and fake workers written here that
 * speak the wire protocol over sp_wire_conn on a libuv loop driven by the
 * test itself. Every wait polls for a condition with a generous deadline,
 * so the tests hold on a loaded machine; short heartbeat and lease settings
 * keep them quick.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
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

#include "pgtest.h"
#include "pgtest_sql.h"
#include "spool/wire_conn.h"

#define HEARTBEAT_MS 300
#define LEASE_TTL_MS 2000
#define WAIT_MS      20000 /* generous: a loaded 2-core machine */

static const char *sched_bin;
static struct pgt pg;
static PGconn *db;
static uv_loop_t loop;
static char tmpdir[256];
/* One cluster for the whole file; each test gets a fresh database made from
 * the migrated one (advisory locks are per database, so tests do not meet). */
static char test_dsn[600];

static const char DIGEST_A[] = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
static const char DIGEST_B[] = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

/* ---- SQL helpers --------------------------------------------------------- */

static void ensure_db(void)
{
    if (PQstatus(db) != CONNECTION_OK)
        PQreset(db);
}

#define ok(...)  (ensure_db(), pgt_ok(db, __VA_ARGS__))
#define num(...) (ensure_db(), pgt_num(db, __VA_ARGS__))

static void add_model(const char *name, const char *digest)
{
    ok("INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, "
       "n_params, context_length) VALUES ('%s', 1, '%s', 'file:///m', 1, 'llama', 'bf16', 1, 2048)",
       name, digest);
}

/* Submits and seals a job of n requests; returns its id. */
static long long submit(const char *model, const char *tenant, int priority, int n)
{
    long long job = num("SELECT spool.submit_job('%s', '%s', '{}', %d)", model, tenant, priority);
    ok("INSERT INTO spool.requests (job_id, prompt) SELECT %lld, 'p' || g FROM "
       "generate_series(1, %d) g",
       job, n);
    ok("SELECT spool.seal_job(%lld)", job);
    return job;
}

/* ---- the scheduler process ----------------------------------------------- */

static pid_t start_scheduler_on(const char *dsn_in, const char *port_file)
{
    char dsn[600];
    snprintf(dsn, sizeof dsn, "%s", dsn_in);
    unlink(port_file);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the test */
        for (int fd = 3; fd < 1024; fd++)
            close(fd);
        char hb[16], ttl[16];
        snprintf(hb, sizeof hb, "%d", HEARTBEAT_MS);
        snprintf(ttl, sizeof ttl, "%d", LEASE_TTL_MS);
        execl(sched_bin, sched_bin, "--dsn", dsn, "--listen", "127.0.0.1:0", "--port-file",
              port_file, "--heartbeat-ms", hb, "--lease-ttl-ms", ttl, "--sweep-ms", "200",
              "--lock-retry-ms", "200", "--shard-size", "4", "--fill", "2", (char *)NULL);
        _exit(127);
    }
    return pid;
}

static pid_t start_scheduler(const char *port_file)
{
    return start_scheduler_on(test_dsn, port_file);
}

/* SIGTERM and an exit status of 0 (under ASan this includes the leak check). */
static void stop_scheduler(pid_t pid)
{
    kill(pid, SIGTERM);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
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

/* ---- fake workers -------------------------------------------------------- */

struct assign {
    uint64_t shard, job, token;
    char digest[80];
};

struct fw {
    char name[32];
    const char *digest; /* the model it has loaded (hex), or NULL */
    uint32_t max_batch;
    const char *port_files[2]; /* tried in turn when (re)connecting */
    int next_file;
    bool reconnect;
    bool heartbeat;
    bool heartbeat_first; /* break the protocol: HEARTBEAT instead of REGISTER */

    uv_tcp_t *tcp;
    sp_wire_conn_t *conn;
    bool registered;
    uint64_t worker_id;
    int registrations;
    uv_timer_t hb, retry;

    struct assign assigns[32];
    int n_assigns;
    struct sp_wire_revoke revokes[8];
    int n_revokes;
    int n_errors;
    int closes;
};

static void fw_connect(struct fw *w);

static void send_frame(struct fw *w, struct sp_wire_frame *f)
{
    if (w->conn)
        assert_int_equal(sp_wire_conn_send(w->conn, f), 0);
}

static void fw_on_hb(uv_timer_t *t)
{
    struct fw *w = t->data;
    if (!w->heartbeat || !w->conn || !w->registered)
        return;
    struct sp_wire_frame f = {.type = SP_WIRE_HEARTBEAT};
    f.heartbeat = (struct sp_wire_heartbeat){w->worker_id, w->max_batch, 100, 100, 0, 0};
    send_frame(w, &f);
}

static void fw_on_frame(sp_wire_conn_t *c, struct sp_wire_frame *f)
{
    struct fw *w = sp_wire_conn_data(c);
    switch (f->type) {
    case SP_WIRE_REGISTERED:
        w->registered = true;
        w->worker_id = f->registered.worker_id;
        w->registrations++;
        assert_int_equal(f->registered.heartbeat_ms, HEARTBEAT_MS);
        assert_int_equal(f->registered.lease_ttl_ms, LEASE_TTL_MS);
        uv_timer_start(&w->hb, fw_on_hb, 0, f->registered.heartbeat_ms);
        break;
    case SP_WIRE_ASSIGN:
        assert_true(w->n_assigns < 32);
        w->assigns[w->n_assigns].shard = f->assign.shard_id;
        w->assigns[w->n_assigns].job = f->assign.job_id;
        w->assigns[w->n_assigns].token = f->assign.lease_token;
        snprintf(w->assigns[w->n_assigns].digest, sizeof w->assigns[0].digest, "%s",
                 f->assign.model.digest);
        assert_int_equal(f->assign.lease_ms, LEASE_TTL_MS);
        w->n_assigns++;
        break;
    case SP_WIRE_REVOKE:
        assert_true(w->n_revokes < 8);
        w->revokes[w->n_revokes].shard_id = f->revoke.shard_id;
        w->revokes[w->n_revokes].lease_token = f->revoke.lease_token;
        w->n_revokes++;
        break;
    case SP_WIRE_ERROR:
        w->n_errors++;
        break;
    default:
        break;
    }
}

static void fw_on_retry(uv_timer_t *t)
{
    fw_connect(t->data);
}

static void fw_on_close(sp_wire_conn_t *c, int err)
{
    (void)err;
    struct fw *w = sp_wire_conn_data(c);
    free(w->tcp);
    w->tcp = NULL;
    w->conn = NULL;
    w->registered = false;
    w->closes++;
    uv_timer_stop(&w->hb);
    if (w->reconnect)
        uv_timer_start(&w->retry, fw_on_retry, 100, 0);
}

static void fw_send_register(struct fw *w)
{
    if (w->heartbeat_first) {
        struct sp_wire_frame h = {.type = SP_WIRE_HEARTBEAT};
        h.heartbeat = (struct sp_wire_heartbeat){1, 1, 1, 1, 0, 0};
        send_frame(w, &h);
        return;
    }
    struct sp_wire_model m = {"m", 1, NULL};
    char digest[80];
    struct sp_wire_frame f = {.type = SP_WIRE_REGISTER};
    f.reg = (struct sp_wire_register){
        .name = w->name,
        .gpu_type = "cpu",
        .gpu_memory = 1 << 30,
        .capacity = SP_WIRE_SPOT,
        .price_per_hour = 0.5,
        .max_batch = w->max_batch,
        .backend = "cpu",
        .has_worker_id = w->worker_id != 0,
        .worker_id = w->worker_id,
    };
    if (w->digest) {
        snprintf(digest, sizeof digest, "sha256:%s", w->digest);
        m.digest = digest;
        f.reg.models = &m;
        f.reg.n_models = 1;
    }
    send_frame(w, &f);
}

static void fw_on_connect(uv_connect_t *req, int status)
{
    struct fw *w = req->data;
    free(req);
    if (status < 0) {
        uv_close((uv_handle_t *)w->tcp, (uv_close_cb)free);
        w->tcp = NULL;
        if (w->reconnect)
            uv_timer_start(&w->retry, fw_on_retry, 100, 0);
        return;
    }
    assert_int_equal(
        sp_wire_conn_open(&w->conn, (uv_stream_t *)w->tcp, 0, fw_on_frame, fw_on_close, w), 0);
    fw_send_register(w);
}

static void fw_connect(struct fw *w)
{
    if (w->tcp)
        return;
    int port = 0;
    for (int i = 0; i < 2 && !port; i++) {
        const char *pf = w->port_files[w->next_file];
        w->next_file = (w->next_file + 1) % 2;
        if (pf)
            port = read_port(pf);
    }
    if (!port) {
        uv_timer_start(&w->retry, fw_on_retry, 100, 0);
        return;
    }
    struct sockaddr_in addr;
    uv_ip4_addr("127.0.0.1", port, &addr);
    w->tcp = malloc(sizeof *w->tcp);
    uv_tcp_init(&loop, w->tcp);
    uv_connect_t *req = malloc(sizeof *req);
    req->data = w;
    assert_int_equal(uv_tcp_connect(req, w->tcp, (struct sockaddr *)&addr, fw_on_connect), 0);
}

static void fw_init(struct fw *w, const char *name, const char *digest, uint32_t max_batch,
                    const char *port_file)
{
    memset(w, 0, sizeof *w);
    snprintf(w->name, sizeof w->name, "%s", name);
    w->digest = digest;
    w->max_batch = max_batch;
    w->port_files[0] = port_file;
    w->reconnect = true;
    w->heartbeat = true;
    uv_timer_init(&loop, &w->hb);
    uv_timer_init(&loop, &w->retry);
    w->hb.data = w->retry.data = w;
    fw_connect(w);
}

static void fw_close(struct fw *w)
{
    w->reconnect = false;
    uv_timer_stop(&w->retry);
    if (w->conn)
        sp_wire_conn_close(w->conn);
    uv_close((uv_handle_t *)&w->hb, NULL);
    uv_close((uv_handle_t *)&w->retry, NULL);
}

/* ---- waiting ------------------------------------------------------------- */

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Runs the loop until cond(arg) holds; false after timeout_ms. */
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

/* Runs the loop for ms milliseconds (for checks that something does NOT happen). */
static void run_for(unsigned ms)
{
    uint64_t end = now_ms() + ms;
    while (now_ms() < end) {
        uv_run(&loop, UV_RUN_NOWAIT);
        usleep(5000);
    }
}

static bool is_registered(void *arg)
{
    return ((struct fw *)arg)->registered;
}

static int want_assigns;
static bool has_assigns(void *arg)
{
    return ((struct fw *)arg)->n_assigns >= want_assigns;
}

static bool has_revoke(void *arg)
{
    return ((struct fw *)arg)->n_revokes > 0;
}

static bool was_closed(void *arg)
{
    return ((struct fw *)arg)->closes > 0;
}

static const char *sql_cond;
static bool sql_true(void *arg)
{
    (void)arg;
    return num("SELECT (%s)::int", sql_cond) == 1;
}

static bool wait_sql(const char *cond, unsigned timeout_ms)
{
    sql_cond = cond;
    return wait_until(sql_true, NULL, timeout_ms);
}

static bool file_exists(void *arg)
{
    return access(arg, F_OK) == 0;
}

/* ---- fixtures ------------------------------------------------------------ */

static char port_file[2][300];

static int test_no;

static int group_setup(void **state)
{
    (void)state;
    pgt_start(&pg, true);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    pgt_stop(&pg);
    return 0;
}

static int setup(void **state)
{
    (void)state;
    char admin_dsn[600], sql[256], name[32];
    sp_cluster_dsn(&pg.cluster, "postgres", admin_dsn, sizeof admin_dsn);
    PGconn *adm = PQconnectdb(admin_dsn);
    assert_int_equal(PQstatus(adm), CONNECTION_OK);
    snprintf(name, sizeof name, "t%d", ++test_no);
    snprintf(sql, sizeof sql, "CREATE DATABASE %s TEMPLATE %s", name, pg.cluster.dbname);
    PGresult *r = PQexec(adm, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
    PQfinish(adm);
    sp_cluster_dsn(&pg.cluster, name, test_dsn, sizeof test_dsn);
    db = PQconnectdb(test_dsn);
    assert_int_equal(PQstatus(db), CONNECTION_OK);
    PQclear(PQexec(db, "SET client_min_messages = warning"));
    uv_loop_init(&loop);
    add_model("m", DIGEST_A);
    add_model("n", DIGEST_B);
    for (int i = 0; i < 2; i++)
        snprintf(port_file[i], sizeof port_file[i], "%s/port%d", tmpdir, i);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    uv_run(&loop, UV_RUN_DEFAULT); /* let closing handles finish */
    assert_int_equal(uv_loop_close(&loop), 0);
    PQfinish(db);
    return 0;
}

/* Marks every request of a shard succeeded with its lease token, as a worker would. */
static void complete_shard(const struct assign *a)
{
    ok("SELECT spool.complete_requests(%" PRIu64 ", %" PRIu64
       ", (SELECT jsonb_agg(jsonb_build_object("
       "'id', r.id, 'state', 'succeeded', 'output', 'x')) FROM spool.requests r, spool.shards s "
       "WHERE s.id = %" PRIu64 " AND r.job_id = s.job_id AND r.id BETWEEN s.first_request_id "
       "AND s.last_request_id))",
       a->shard, a->token, a->shard);
}

static void send_done(struct fw *w, const struct assign *a)
{
    struct sp_wire_frame f = {.type = SP_WIRE_DONE};
    f.done = (struct sp_wire_done){a->shard, a->token, 4, 0};
    send_frame(w, &f);
}

/* ---- tests --------------------------------------------------------------- */

/*
 * REGISTER writes spool.workers; a sealed job is planned into shards, each
 * leased and ASSIGNed with the token the row holds; heartbeats renew the
 * leases past the ttl; DONE releases the shards and finishes the job;
 * GOODBYE marks the worker gone.
 */
static void register_plan_assign_renew_done(void **state)
{
    (void)state;
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a;
    fw_init(&a, "fw-a", DIGEST_A, 4, port_file[0]);
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    assert_int_equal(num("SELECT count(*) FROM spool.workers WHERE id = %" PRIu64
                         " AND name = 'fw-a' AND state = 'active' AND capacity_type = 'spot' "
                         "AND backend = 'cpu' AND price_per_hour = 0.5 AND models @> "
                         "'[{\"name\": \"m\", \"version\": 1, \"digest\": \"sha256:%s\"}]'",
                         a.worker_id, DIGEST_A),
                     1);

    long long job = submit("m", "acme", 0, 8); /* two shards of 4 */
    want_assigns = 2;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    assert_int_equal(num("SELECT count(*) FROM spool.shards WHERE job_id = %lld", job), 2);
    for (int i = 0; i < 2; i++) {
        struct assign *x = &a.assigns[i];
        assert_int_equal(x->job, job);
        assert_int_equal(num("SELECT count(*) FROM spool.shards WHERE id = %" PRIu64
                             " AND job_id = %lld AND state = 'leased' AND worker_id = %" PRIu64
                             " AND lease_token = %" PRIu64,
                             x->shard, job, a.worker_id, x->token),
                         1);
        char want[80];
        snprintf(want, sizeof want, "sha256:%s", DIGEST_A);
        assert_string_equal(x->digest, want);
    }
    assert_true(a.assigns[0].shard != a.assigns[1].shard);

    /* Heartbeats renew: the expiry moves forward and outlives the ttl. */
    long long exp0 = num("SELECT (extract(epoch FROM lease_expires_at) * 1000)::bigint FROM "
                         "spool.shards WHERE id = %" PRIu64,
                         a.assigns[0].shard);
    run_for(LEASE_TTL_MS + 1000);
    long long exp1 = num("SELECT (extract(epoch FROM lease_expires_at) * 1000)::bigint FROM "
                         "spool.shards WHERE id = %" PRIu64 " AND state = 'leased' AND "
                         "lease_token = %" PRIu64,
                         a.assigns[0].shard, a.assigns[0].token);
    assert_true(exp1 > exp0 + LEASE_TTL_MS / 2);
    assert_int_equal(a.n_assigns, 2); /* nothing re-assigned meanwhile */

    for (int i = 0; i < 2; i++) {
        complete_shard(&a.assigns[i]);
        send_done(&a, &a.assigns[i]);
    }
    char cond[256];
    snprintf(cond, sizeof cond, "SELECT state = 'succeeded' FROM spool.jobs WHERE id = %lld", job);
    assert_true(wait_sql(cond, WAIT_MS));
    assert_int_equal(
        num("SELECT count(*) FROM spool.shards WHERE job_id = %lld AND state = 'done'", job), 2);

    a.reconnect = false;
    struct sp_wire_frame g = {.type = SP_WIRE_GOODBYE};
    g.goodbye.reason = "test over";
    send_frame(&a, &g);
    snprintf(cond, sizeof cond, "SELECT state = 'gone' FROM spool.workers WHERE id = %" PRIu64,
             a.worker_id);
    assert_true(wait_sql(cond, WAIT_MS));
    fw_close(&a);
    stop_scheduler(sched);
}

/* A frame before REGISTER, or a frame only the scheduler sends, is ERROR + close. */
static void protocol_errors(void **state)
{
    (void)state;
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a;
    fw_init(&a, "fw-a", NULL, 4, port_file[0]);
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    a.reconnect = false;
    struct sp_wire_frame f = {.type = SP_WIRE_ASSIGN};
    f.assign = (struct sp_wire_assign){1, 1, 1, {"m", 1, "sha256:00"}, 1000};
    send_frame(&a, &f);
    assert_true(wait_until(was_closed, &a, WAIT_MS));
    assert_int_equal(a.n_errors, 1);
    fw_close(&a);

    /* A connection whose first frame is a HEARTBEAT. */
    struct fw c;
    fw_init(&c, "fw-c", NULL, 4, NULL);
    c.heartbeat_first = true;
    c.reconnect = false;
    c.port_files[0] = port_file[0];
    uv_timer_stop(&c.retry);
    fw_connect(&c);
    assert_true(wait_until(was_closed, &c, WAIT_MS));
    assert_int_equal(c.n_errors, 1);
    assert_false(c.registered);
    fw_close(&c);

    /* REGISTER twice on one connection. */
    struct fw b;
    fw_init(&b, "fw-b", NULL, 4, port_file[0]);
    b.reconnect = false;
    assert_true(wait_until(is_registered, &b, WAIT_MS));
    /* Register again on the same connection: also a protocol error. */
    fw_send_register(&b);
    assert_true(wait_until(was_closed, &b, WAIT_MS));
    assert_int_equal(b.n_errors, 1);
    fw_close(&b);
    stop_scheduler(sched);
}

/*
 * A worker that stops heartbeating loses its lease after the ttl, and the
 * shard goes to another worker under a higher token.
 */
static void expired_lease_reassigned(void **state)
{
    (void)state;
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a, b;
    fw_init(&a, "fw-a", DIGEST_A, 4, port_file[0]);
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    long long job = submit("m", "acme", 0, 4);
    want_assigns = 1;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    a.heartbeat = false; /* hung, but still connected */
    fw_init(&b, "fw-b", NULL, 4, port_file[0]);
    assert_true(wait_until(has_assigns, &b, WAIT_MS));
    assert_int_equal(b.assigns[0].shard, a.assigns[0].shard);
    assert_int_equal(b.assigns[0].job, job);
    assert_true(b.assigns[0].token > a.assigns[0].token);
    assert_int_equal(a.n_assigns, 1);
    assert_int_equal(num("SELECT count(*) FROM spool.shards WHERE id = %" PRIu64
                         " AND worker_id = %" PRIu64 " AND lease_token = %" PRIu64,
                         b.assigns[0].shard, b.worker_id, b.assigns[0].token),
                     1);
    assert_int_equal(num("SELECT count(*) FROM spool.preemptions WHERE worker_id = %" PRIu64
                         " AND source = 'lease-expired'",
                         a.worker_id),
                     1);
    /* The old token is fenced off. */
    ensure_db();
    char sql[256];
    snprintf(sql, sizeof sql, "SELECT spool.release_shard(%" PRIu64 ", %" PRIu64 ")",
             a.assigns[0].shard, a.assigns[0].token);
    PGresult *r = PQexec(db, sql);
    assert_int_equal(PQresultStatus(r), PGRES_FATAL_ERROR);
    PQclear(r);
    fw_close(&a);
    fw_close(&b);
    stop_scheduler(sched);
}

/* Placement prefers the worker that has the job's model loaded. */
static void model_affinity(void **state)
{
    (void)state;
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a, b;
    fw_init(&a, "fw-a", DIGEST_A, 4, port_file[0]);
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    fw_init(&b, "fw-b", DIGEST_B, 4, port_file[0]);
    assert_true(wait_until(is_registered, &b, WAIT_MS));
    long long jn = submit("n", "acme", 0, 4);
    want_assigns = 1;
    assert_true(wait_until(has_assigns, &b, WAIT_MS));
    assert_int_equal(b.assigns[0].job, jn);
    long long jm = submit("m", "acme", 0, 4);
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    assert_int_equal(a.assigns[0].job, jm);
    assert_int_equal(a.n_assigns, 1);
    assert_int_equal(b.n_assigns, 1);
    fw_close(&a);
    fw_close(&b);
    stop_scheduler(sched);
}

/*
 * Higher priority first: a worker with room for one shard gets the
 * priority-5 job's shard before the older priority-0 one. Cancelling a job
 * REVOKEs its lease on the worker, and its other shard is never assigned.
 */
static void priority_and_cancel(void **state)
{
    (void)state;
    long long low = submit("m", "acme", 0, 8);
    long long high = submit("m", "acme", 5, 4);
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a;
    fw_init(&a, "fw-a", DIGEST_A, 1, port_file[0]); /* target: 2 x 1 request */
    want_assigns = 1;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    assert_int_equal(a.assigns[0].job, high);
    run_for(500);
    assert_int_equal(a.n_assigns, 1); /* full: nothing more until it finishes */
    complete_shard(&a.assigns[0]);
    send_done(&a, &a.assigns[0]);
    want_assigns = 2;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    assert_int_equal(a.assigns[1].job, low);

    ok("SELECT spool.cancel_job(%lld)", low);
    assert_true(wait_until(has_revoke, &a, WAIT_MS));
    assert_int_equal(a.revokes[0].shard_id, a.assigns[1].shard);
    assert_int_equal(a.revokes[0].lease_token, a.assigns[1].token);
    run_for(800);
    assert_int_equal(a.n_assigns, 2); /* the cancelled job's other shard stays unassigned */
    fw_close(&a);
    stop_scheduler(sched);
}

/*
 * A worker's DRAIN stops assignment to it and records the preemption notice;
 * its RELEASE puts the shard back, and another worker resumes it.
 */
static void drain_stops_assignment(void **state)
{
    (void)state;
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a, b;
    fw_init(&a, "fw-a", DIGEST_A, 4, port_file[0]);
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    long long j1 = submit("m", "acme", 0, 4);
    want_assigns = 1;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    assert_int_equal(a.assigns[0].job, j1);

    /* The preemption notice, then the shard given back unfinished. */
    struct sp_wire_frame f = {.type = SP_WIRE_DRAIN};
    f.drain = (struct sp_wire_drain){"spot notice", 30000};
    send_frame(&a, &f);
    char cond[256];
    snprintf(cond, sizeof cond, "SELECT state = 'draining' FROM spool.workers WHERE id = %" PRIu64,
             a.worker_id);
    assert_true(wait_sql(cond, WAIT_MS));
    assert_int_equal(num("SELECT count(*) FROM spool.preemptions WHERE worker_id = %" PRIu64
                         " AND source = 'spot notice'",
                         a.worker_id),
                     1);
    struct sp_wire_frame r = {.type = SP_WIRE_RELEASE};
    r.release = (struct sp_wire_release){a.assigns[0].shard, a.assigns[0].token, "preempted"};
    send_frame(&a, &r);
    snprintf(
        cond, sizeof cond,
        "SELECT state = 'pending' AND lease_token IS NULL FROM spool.shards WHERE id = %" PRIu64,
        a.assigns[0].shard);
    assert_true(wait_sql(cond, WAIT_MS));

    long long j2 = submit("m", "acme", 0, 4);
    run_for(1000);
    assert_int_equal(a.n_assigns, 1); /* draining: nothing new, not even its own shard back */
    fw_init(&b, "fw-b", NULL, 4, port_file[0]);
    want_assigns = 2;
    assert_true(wait_until(has_assigns, &b, WAIT_MS));
    bool got_j1 = false, got_j2 = false;
    for (int i = 0; i < 2; i++) {
        if (b.assigns[i].job == (uint64_t)j1) {
            got_j1 = true;
            assert_int_equal(b.assigns[i].shard, a.assigns[0].shard);
            assert_true(b.assigns[i].token > a.assigns[0].token);
        }
        got_j2 |= b.assigns[i].job == (uint64_t)j2;
    }
    assert_true(got_j1 && got_j2);
    assert_int_equal(a.n_assigns, 1);
    fw_close(&a);
    fw_close(&b);
    stop_scheduler(sched);
}

/*
 * Two schedulers: one active, one standing by (no listener). kill -9 of the
 * active one: the standby takes the lock, opens its listener, the worker
 * reconnects (keeping its id) and gets work, within a few seconds.
 */
static void standby_takes_over(void **state)
{
    (void)state;
    pid_t s1 = start_scheduler(port_file[0]);
    assert_true(wait_until(file_exists, port_file[0], WAIT_MS));
    pid_t s2 = start_scheduler(port_file[1]);
    struct fw a;
    fw_init(&a, "fw-a", DIGEST_A, 4, port_file[0]);
    a.port_files[1] = port_file[1];
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    uint64_t id = a.worker_id;
    run_for(1000);
    assert_false(file_exists(port_file[1])); /* the standby does not listen */

    kill(s1, SIGKILL);
    int st;
    assert_int_equal(waitpid(s1, &st, 0), s1);
    uint64_t t0 = now_ms();
    assert_true(wait_until(file_exists, port_file[1], WAIT_MS));
    uint64_t took = now_ms() - t0;
    print_message("standby active %" PRIu64 " ms after kill -9\n", took);
    assert_true(took < 5000);
    unlink(port_file[0]); /* stale: its owner is dead */
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    assert_int_equal(a.worker_id, id);
    assert_true(a.registrations >= 2);
    long long job = submit("m", "acme", 0, 4);
    want_assigns = 1;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    assert_int_equal(a.assigns[0].job, job);
    fw_close(&a);
    stop_scheduler(s2);
}

/* A PostgreSQL restart: the scheduler steps down, reconnects, takes the lock again and goes on. */
static void postgres_restart(void **state)
{
    (void)state;
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a;
    fw_init(&a, "fw-a", DIGEST_A, 4, port_file[0]);
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    uint64_t id = a.worker_id;
    long long j1 = submit("m", "acme", 0, 4);
    want_assigns = 1;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    assert_int_equal(a.assigns[0].job, j1);

    assert_int_equal(sp_cluster_stop(&pg.cluster, false), 0);
    assert_true(wait_until(was_closed, &a, WAIT_MS)); /* it stopped acting */
    run_for(500);
    assert_int_equal(sp_cluster_start(&pg.cluster, NULL), 0);
    PQreset(db);

    assert_true(wait_until(is_registered, &a, WAIT_MS));
    assert_int_equal(a.worker_id, id);
    long long j2 = submit("m", "acme", 0, 4);
    want_assigns = 2;
    assert_true(wait_until(has_assigns, &a, WAIT_MS));
    bool got_j2 = false;
    for (int i = 1; i < a.n_assigns; i++)
        got_j2 |= a.assigns[i].job == (uint64_t)j2;
    /* j1's shard may come back first if its lease expired during the restart. */
    if (!got_j2) {
        want_assigns = 3;
        assert_true(wait_until(has_assigns, &a, WAIT_MS));
        for (int i = 1; i < a.n_assigns; i++)
            got_j2 |= a.assigns[i].job == (uint64_t)j2;
    }
    assert_true(got_j2);
    fw_close(&a);
    stop_scheduler(sched);
}

/*
 * A worker that reconnects (quoting its id) before its old connection was
 * seen to end keeps its row; the old connection is closed, and the row is
 * not marked gone by it.
 */
static void reconnect_replaces_old_connection(void **state)
{
    (void)state;
    pid_t sched = start_scheduler(port_file[0]);
    struct fw a, b;
    fw_init(&a, "fw-a", DIGEST_A, 4, port_file[0]);
    assert_true(wait_until(is_registered, &a, WAIT_MS));
    a.reconnect = false;
    fw_init(&b, "fw-a", DIGEST_A, 4, NULL);
    uv_timer_stop(&b.retry);
    b.worker_id = a.worker_id;
    b.port_files[0] = port_file[0];
    fw_connect(&b);
    assert_true(wait_until(is_registered, &b, WAIT_MS));
    assert_int_equal(b.worker_id, a.worker_id);
    assert_true(wait_until(was_closed, &a, WAIT_MS));
    run_for(500);
    assert_int_equal(num("SELECT count(*) FROM spool.workers WHERE id = %" PRIu64
                         " AND state = 'active'",
                         b.worker_id),
                     1);
    assert_int_equal(num("SELECT count(*) FROM spool.workers"), 1);
    long long job = submit("m", "acme", 0, 4);
    want_assigns = 1;
    assert_true(wait_until(has_assigns, &b, WAIT_MS));
    assert_int_equal(b.assigns[0].job, job);
    assert_int_equal(a.n_assigns, 0);
    fw_close(&a);
    fw_close(&b);
    stop_scheduler(sched);
}

/*
 * spool.placement_candidates' order and columns, without a scheduler:
 * priority, then deadline (none last), then job; tenant weight and the
 * tenant's leased requests; the pinned model.
 */
static void candidates_order(void **state)
{
    (void)state;
    ok("INSERT INTO spool.tenants (name, weight) VALUES ('heavy', 3)");
    long long none = submit("m", "acme", 0, 4);
    long long later =
        num("SELECT spool.submit_job('m', 'heavy', '{}', 0, now() + interval '1 hour')");
    ok("INSERT INTO spool.requests (job_id, prompt) VALUES (%lld, 'p')", later);
    ok("SELECT spool.seal_job(%lld)", later);
    long long soon =
        num("SELECT spool.submit_job('n', 'acme', '{}', 0, now() + interval '1 minute')");
    ok("INSERT INTO spool.requests (job_id, prompt) VALUES (%lld, 'p')", soon);
    ok("SELECT spool.seal_job(%lld)", soon);
    long long urgent = submit("m", "acme", 7, 4);
    assert_int_equal(num("SELECT spool.plan_queued(4)"), 4);
    ensure_db();
    PGresult *r = PQexec(db, "SELECT job_id, priority, tenant, tenant_weight, tenant_leased, "
                             "model_name, model_digest FROM spool.placement_candidates(10)");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_int_equal(PQntuples(r), 4);
    long long want[] = {urgent, soon, later, none};
    for (int i = 0; i < 4; i++)
        assert_int_equal(strtoll(PQgetvalue(r, i, 0), NULL, 10), want[i]);
    assert_string_equal(PQgetvalue(r, 2, 2), "heavy");
    assert_int_equal(strtoll(PQgetvalue(r, 2, 3), NULL, 10), 3);
    assert_string_equal(PQgetvalue(r, 1, 5), "n");
    char d[80];
    snprintf(d, sizeof d, "sha256:%s", DIGEST_B);
    assert_string_equal(PQgetvalue(r, 1, 6), d);
    PQclear(r);
    /* Leased requests count per tenant; a cancelled job's shards are not candidates. */
    long long wid =
        num("SELECT spool.register_worker(NULL, 'w', 'cpu', 0, 'spot', 0, 'cpu', '[]')");
    assert_true(num("SELECT spool.lease_shard(id, %lld, '1 minute') FROM spool.shards WHERE "
                    "job_id = %lld",
                    wid, urgent) > 0);
    assert_int_equal(num("SELECT tenant_leased FROM spool.placement_candidates(10) WHERE job_id = "
                         "%lld",
                         none),
                     4);
    ok("SELECT spool.cancel_job(%lld)", none);
    assert_int_equal(num("SELECT count(*) FROM spool.placement_candidates(10)"), 2);
    assert_int_equal(num("SELECT count(*) FROM spool.cancelled_leases(%lld)", none), 0);
    ok("SELECT spool.cancel_job(%lld)", urgent);
    assert_int_equal(num("SELECT count(*) FROM spool.cancelled_leases(%lld)", urgent), 1);
}

/* A database without the Spool schema is a setup error: exit 1, no listener. */
static void no_schema_exits_1(void **state)
{
    (void)state;
    char dsn[600];
    pgt_createdb(&pg, "empty", dsn, sizeof dsn);
    pid_t pid = start_scheduler_on(dsn, port_file[0]);
    int st = 0;
    pid_t r = 0;
    for (uint64_t end = now_ms() + WAIT_MS; r == 0 && now_ms() < end; usleep(20000))
        r = waitpid(pid, &st, WNOHANG);
    if (r == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, &st, 0);
        fail_msg("the scheduler kept running on a database without the schema");
    }
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 1);
    assert_false(file_exists(port_file[0]));
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
    snprintf(tmpdir, sizeof tmpdir, "/tmp/sst-%s-XXXXXX", tag ? tag : "x");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(register_plan_assign_renew_done, setup, teardown),
        cmocka_unit_test_setup_teardown(protocol_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(expired_lease_reassigned, setup, teardown),
        cmocka_unit_test_setup_teardown(model_affinity, setup, teardown),
        cmocka_unit_test_setup_teardown(priority_and_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(drain_stops_assignment, setup, teardown),
        cmocka_unit_test_setup_teardown(reconnect_replaces_old_connection, setup, teardown),
        cmocka_unit_test_setup_teardown(standby_takes_over, setup, teardown),
        cmocka_unit_test_setup_teardown(postgres_restart, setup, teardown),
        cmocka_unit_test_setup_teardown(no_schema_exits_1, setup, teardown),
        cmocka_unit_test_setup_teardown(candidates_order, setup, teardown),
    };
    int rc = cmocka_run_group_tests(tests, group_setup, group_teardown);
    for (int i = 0; i < 2; i++) {
        char p[400];
        snprintf(p, sizeof p, "%s/port%d", tmpdir, i);
        unlink(p);
        snprintf(p, sizeof p, "%s/port%d.tmp", tmpdir, i);
        unlink(p);
    }
    rmdir(tmpdir);
    return rc;
}
