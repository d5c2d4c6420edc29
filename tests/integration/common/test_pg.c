/*
 * The PostgreSQL helpers against a real server: blocking connect with retry
 * and timeout; the libuv connection's queue, parameters, errors, LISTEN/NOTIFY,
 * reconnect after a server restart (LISTEN re-established, queued queries run
 * after it, the running one fails), queue expiry while down, and close.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "pgtest.h"
#include "spool/error.h"
#include "spool/pg.h"

struct events {
    int ups, downs, notifies, order;
    char down_err[512];
    char chan[8][80], payload[8][80];
};

static struct events ev;

/*
 * One cluster for all tests (initdb is the slow part); a test that stops the
 * server starts it again, and each test begins by making sure it runs.
 */
static struct pgt pg;

static int group_setup(void **state)
{
    (void)state;
    pgt_start(&pg, false);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    pgt_stop(&pg);
    return 0;
}

static void ensure_running(void)
{
    if (sp_cluster_pid(&pg.cluster) <= 0)
        assert_int_equal(sp_cluster_start(&pg.cluster, NULL), 0);
    memset(&ev, 0, sizeof ev);
}

static uint64_t now_ms(void)
{
    return uv_hrtime() / 1000000u;
}

/* ---- running the loop until something happened ------------------------- */

static void tick(uv_timer_t *t)
{
    (void)t;
}

/* Runs loop until cond holds or ms passed; a 10 ms tick keeps uv_run from blocking longer. */
#define RUN_UNTIL(loop, cond, ms)                                                                  \
    do {                                                                                           \
        uv_timer_t tk_;                                                                            \
        uv_timer_init((loop), &tk_);                                                               \
        uv_timer_start(&tk_, tick, 10, 10);                                                        \
        uint64_t end_ = now_ms() + (ms);                                                           \
        while (!(cond) && now_ms() < end_)                                                         \
            uv_run((loop), UV_RUN_ONCE);                                                           \
        uv_close((uv_handle_t *)&tk_, NULL);                                                       \
        uv_run((loop), UV_RUN_NOWAIT);                                                             \
    } while (0)

/* ---- what the callbacks saw ---------------------------------------------- */

struct qres {
    bool done;
    int order;  /* position among all completed queries */
    int ups_at; /* ev.ups when it completed */
    bool had_res;
    int status;
    char value[128];
    char err[1024];
    struct qres *chain; /* when set, the callback queues another query into it */
    int *close_into;    /* when set, the callback closes the connection */
};

static void on_result(sp_pgconn_t *c, PGresult *res, const char *err, void *arg);
static void on_closed(void *arg);

static void on_up(sp_pgconn_t *c, void *arg)
{
    (void)c, (void)arg;
    ev.ups++;
}

static void on_down(sp_pgconn_t *c, const char *err, void *arg)
{
    (void)arg;
    assert_false(sp_pgconn_is_up(c));
    ev.downs++;
    snprintf(ev.down_err, sizeof ev.down_err, "%s", err);
}

static void on_notify(sp_pgconn_t *c, const char *channel, const char *payload, void *arg)
{
    (void)c, (void)arg;
    if (ev.notifies < 8) {
        snprintf(ev.chan[ev.notifies], sizeof ev.chan[0], "%s", channel);
        snprintf(ev.payload[ev.notifies], sizeof ev.payload[0], "%s", payload);
    }
    ev.notifies++;
}

static void on_result(sp_pgconn_t *c, PGresult *res, const char *err, void *arg)
{
    struct qres *q = arg;
    assert_false(q->done); /* exactly once */
    q->done = true;
    q->order = ++ev.order;
    q->ups_at = ev.ups;
    q->had_res = res != NULL;
    q->status = res ? (int)PQresultStatus(res) : -1;
    if (res && !err && PQntuples(res) > 0)
        snprintf(q->value, sizeof q->value, "%s",
                 PQgetisnull(res, 0, 0) ? "(null)" : PQgetvalue(res, 0, 0));
    if (err) {
        assert_true(err[0] != '\0');
        snprintf(q->err, sizeof q->err, "%s", err);
    }
    if (q->chain)
        assert_int_equal(sp_pgconn_query(c, "SELECT 'chained'", 0, NULL, on_result, q->chain), 0);
    if (q->close_into) {
        sp_pgconn_close(c, on_closed, q->close_into);
        assert_int_equal(sp_pgconn_query(c, "SELECT 3", 0, NULL, on_result, q), SP_ECLOSED);
        assert_int_equal(sp_pgconn_listen(c, "x"), SP_ECLOSED);
    }
}

static void on_closed(void *arg)
{
    int *closed = arg;
    *closed = ++ev.order;
}

static struct sp_pgconn_opts test_opts(unsigned queue_wait_ms)
{
    return (struct sp_pgconn_opts){.backoff_base_ms = 20,
                                   .backoff_cap_ms = 200,
                                   .connect_timeout_ms = 3000,
                                   .queue_wait_ms = queue_wait_ms,
                                   .on_up = on_up,
                                   .on_down = on_down,
                                   .on_notify = on_notify};
}

static void exec_other(const char *sql)
{
    PGconn *o = pgt_connect(&pg);
    char err[512];
    assert_int_equal(sp_pg_exec_ok(o, sql, err, sizeof err), 0);
    PQfinish(o);
}

/* ---- blocking ------------------------------------------------------------ */

struct starter {
    struct sp_cluster *cluster;
    int rc;
};

static void *start_later(void *arg)
{
    struct starter *s = arg;
    usleep(300 * 1000);
    s->rc = sp_cluster_start(s->cluster, NULL);
    return NULL;
}

static void blocking_connect_retry_timeout_and_errors(void **state)
{
    (void)state;
    ensure_running();
    char err[1024];
    PGconn *c = NULL;

    /* The server comes up 300 ms after the first attempt: the retries find it. */
    assert_int_equal(sp_cluster_stop(&pg.cluster, false), 0);
    struct starter s = {&pg.cluster, -1};
    pthread_t th;
    uint64_t t0 = now_ms();
    assert_int_equal(pthread_create(&th, NULL, start_later, &s), 0);
    int rc = sp_pg_connect(pg.dsn, 20000, &c, err, sizeof err);
    uint64_t took = now_ms() - t0;
    pthread_join(th, NULL);
    assert_int_equal(s.rc, 0);
    if (rc)
        fail_msg("sp_pg_connect: %s", err);
    assert_non_null(c);
    assert_true(took >= 250);

    assert_int_equal(
        sp_pg_exec_ok(c, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)", err, sizeof err), 0);
    assert_int_equal(sp_pg_exec_ok(c, "SELECT x FROM t", err, sizeof err), 0);
    assert_int_equal(sp_pg_exec_ok(c, "SELECT nope FROM t", err, sizeof err), SP_EDB);
    assert_non_null(strstr(err, "column \"nope\" does not exist"));
    assert_non_null(strstr(err, "SQLSTATE 42703"));
    PQfinish(c);

    /* No server: the timeout is kept, and the message names the target but not the password. */
    assert_int_equal(sp_cluster_stop(&pg.cluster, false), 0);
    char dsn[700];
    snprintf(dsn, sizeof dsn, "%s password=secret123", pg.dsn);
    t0 = now_ms();
    c = (PGconn *)&pg; /* must be reset to NULL */
    assert_int_equal(sp_pg_connect(dsn, 400, &c, err, sizeof err), SP_ETIMEDOUT);
    took = now_ms() - t0;
    assert_null(c);
    assert_true(took >= 390 && took < 3000);
    assert_non_null(strstr(err, "dbname=spool_test"));
    assert_non_null(strstr(err, pg.cluster.dir));
    assert_non_null(strstr(err, "attempts in"));
    assert_non_null(strstr(err, "No such file or directory")); /* libpq's last message */
    assert_null(strstr(err, "secret123"));
    assert_null(strchr(err, '\n'));

    /* timeout 0: one attempt, SP_EDB. */
    assert_int_equal(sp_pg_connect(dsn, 0, &c, err, sizeof err), SP_EDB);
    assert_non_null(strstr(err, "after 1 attempt in"));

    /* A DSN that does not parse is not retried. */
    t0 = now_ms();
    assert_int_equal(sp_pg_connect("host=/tmp bogus_option=1", 5000, &c, err, sizeof err),
                     SP_EINVAL);
    assert_true(now_ms() - t0 < 1000);
    assert_non_null(strstr(err, "bogus_option"));

    char where[256];
    assert_int_equal(sp_pg_dsn_describe(dsn, where, sizeof where), 0);
    assert_null(strstr(where, "secret"));
    assert_non_null(strstr(where, "user=postgres"));
    assert_int_equal(sp_pg_dsn_describe("postgresql://u:pw@localhost:6000/db", where, sizeof where),
                     0);
    assert_string_equal(where, "host=localhost port=6000 dbname=db user=u");
    assert_int_equal(sp_pg_dsn_describe("=broken", where, sizeof where), SP_EINVAL);
}

/* ---- asynchronous -------------------------------------------------------- */

static void async_queue_notify_and_restart(void **state)
{
    (void)state;
    ensure_running();
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct sp_pgconn_opts o = test_opts(30000);
    sp_pgconn_t *c;
    assert_int_equal(sp_pgconn_open(&loop, "host=/tmp nope=1", &o, &c), SP_EINVAL);
    assert_int_equal(sp_pgconn_open(&loop, pg.dsn, &o, &c), 0);

    assert_int_equal(sp_pgconn_listen(c, "jobs"), 0);
    assert_int_equal(sp_pgconn_listen(c, "We\"ird ch"), 0);
    assert_int_equal(sp_pgconn_listen(c, "jobs"), 0);
    assert_int_equal(sp_pgconn_listen(c, ""), SP_EINVAL);
    assert_int_equal(
        sp_pgconn_listen(c, "a123456789012345678901234567890123456789012345678901234567890123"),
        SP_EINVAL);
    assert_int_equal(sp_pgconn_query(c, NULL, 0, NULL, on_result, NULL), SP_EINVAL);
    assert_int_equal(sp_pgconn_query(c, "SELECT 1", -1, NULL, on_result, NULL), SP_EINVAL);

    /* Queued before the connection exists: they run after it, in order, with parameters. */
    struct qres q[6] = {0};
    for (int i = 0; i < 5; i++) {
        char a[16];
        snprintf(a, sizeof a, "%d", i);
        const char *p[2] = {a, "7"};
        assert_int_equal(
            sp_pgconn_query(c, "SELECT $1::int * 10 + $2::int", 2, p, on_result, &q[i]), 0);
    }
    const char *pnull[1] = {NULL};
    assert_int_equal(
        sp_pgconn_query(c, "SELECT coalesce($1, 'was null')", 1, pnull, on_result, &q[5]), 0);
    assert_false(q[0].done); /* never called from inside sp_pgconn_query */
    RUN_UNTIL(&loop, q[5].done, 10000);
    assert_true(q[5].done);
    assert_int_equal(ev.ups, 1);
    assert_true(sp_pgconn_is_up(c));
    for (int i = 0; i < 5; i++) {
        char want[16];
        snprintf(want, sizeof want, "%d", i * 10 + 7);
        assert_true(q[i].done);
        assert_int_equal(q[i].order, i + 1);
        assert_int_equal(q[i].ups_at, 1);
        assert_string_equal(q[i].err, "");
        assert_string_equal(q[i].value, want);
    }
    assert_string_equal(q[5].value, "was null");

    /* A failing query reports the server's error; the connection stays usable. */
    struct qres bad = {0}, good = {0};
    assert_int_equal(sp_pgconn_query(c, "SELECT 1/0", 0, NULL, on_result, &bad), 0);
    assert_int_equal(sp_pgconn_query(c, "SELECT 'still ok'", 0, NULL, on_result, &good), 0);
    RUN_UNTIL(&loop, good.done, 5000);
    assert_true(bad.had_res);
    assert_int_equal(bad.status, PGRES_FATAL_ERROR);
    assert_non_null(strstr(bad.err, "division by zero"));
    assert_non_null(strstr(bad.err, "SQLSTATE 22012"));
    assert_string_equal(good.value, "still ok");
    assert_string_equal(good.err, "");

    /* NOTIFY from another session: the LISTENed channels arrive, others do not. */
    exec_other("NOTIFY other, 'not listened'; NOTIFY jobs, 'hello'; "
               "SELECT pg_notify('We\"ird ch', '')");
    RUN_UNTIL(&loop, ev.notifies >= 2, 5000);
    assert_int_equal(ev.notifies, 2);
    assert_string_equal(ev.chan[0], "jobs");
    assert_string_equal(ev.payload[0], "hello");
    assert_string_equal(ev.chan[1], "We\"ird ch");
    assert_string_equal(ev.payload[1], "");

    /* Restart the server while a query runs: it fails, on_down fires. */
    struct qres sleeper = {0};
    assert_int_equal(sp_pgconn_query(c, "SELECT pg_sleep(30)", 0, NULL, on_result, &sleeper), 0);
    RUN_UNTIL(&loop, false, 100);
    assert_int_equal(sp_cluster_stop(&pg.cluster, false), 0);
    RUN_UNTIL(&loop, ev.downs == 1 && sleeper.done, 5000);
    assert_int_equal(ev.downs, 1);
    assert_false(sp_pgconn_is_up(c));
    assert_true(ev.down_err[0] != '\0');
    assert_true(sleeper.done);
    assert_non_null(strstr(sleeper.err, "outcome is unknown"));

    /* Queued while down: waits for the reconnect, then runs (and may queue more). */
    struct qres chained = {0}, later = {.chain = &chained};
    const char *p1[1] = {"queued"};
    assert_int_equal(
        sp_pgconn_query(c, "SELECT $1::text || ' while down'", 1, p1, on_result, &later), 0);
    RUN_UNTIL(&loop, false, 300);
    assert_false(later.done);
    assert_int_equal(ev.ups, 1);
    assert_int_not_equal(sp_pgconn_last_error(c)[0], '\0');
    assert_int_equal(sp_cluster_start(&pg.cluster, NULL), 0);
    RUN_UNTIL(&loop, chained.done, 10000);
    assert_int_equal(ev.ups, 2);
    assert_true(sp_pgconn_is_up(c));
    assert_string_equal(later.err, "");
    assert_string_equal(later.value, "queued while down");
    assert_int_equal(later.ups_at, 2);
    assert_string_equal(chained.value, "chained");
    assert_true(chained.order > later.order);
    assert_string_equal(sp_pgconn_last_error(c), "");

    /* LISTEN was re-issued by itself: a NOTIFY after the restart arrives. */
    exec_other("NOTIFY jobs, 'after restart'");
    RUN_UNTIL(&loop, ev.notifies >= 3, 5000);
    assert_int_equal(ev.notifies, 3);
    assert_string_equal(ev.chan[2], "jobs");
    assert_string_equal(ev.payload[2], "after restart");

    /* A channel added while up is listened before the queries queued after it. */
    struct qres after_listen = {0};
    assert_int_equal(sp_pgconn_listen(c, "late"), 0);
    assert_int_equal(sp_pgconn_query(c, "SELECT 1", 0, NULL, on_result, &after_listen), 0);
    RUN_UNTIL(&loop, after_listen.done, 5000);
    exec_other("NOTIFY late, 'x'");
    RUN_UNTIL(&loop, ev.notifies >= 4, 5000);
    assert_string_equal(ev.chan[3], "late");

    /* Close with a query pending: it gets its callback before close_cb. */
    struct qres pending = {0};
    int closed = 0;
    assert_int_equal(sp_pgconn_query(c, "SELECT pg_sleep(10)", 0, NULL, on_result, &pending), 0);
    sp_pgconn_close(c, on_closed, &closed);
    sp_pgconn_close(c, on_closed, &closed); /* a second call does nothing */
    assert_false(pending.done);
    RUN_UNTIL(&loop, closed, 5000);
    assert_true(pending.done);
    assert_false(pending.had_res);
    assert_non_null(strstr(pending.err, "closed"));
    assert_true(closed > pending.order);
    assert_int_equal(ev.downs, 1); /* close is not a loss */
    assert_int_equal(uv_loop_close(&loop), 0);
}

static void async_queue_wait_expires_and_close_while_down(void **state)
{
    (void)state;
    ensure_running();
    assert_int_equal(sp_cluster_stop(&pg.cluster, false), 0);
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct sp_pgconn_opts o = test_opts(150);
    sp_pgconn_t *c;
    assert_int_equal(sp_pgconn_open(&loop, pg.dsn, &o, &c), 0);
    assert_int_equal(sp_pgconn_listen(c, "jobs"), 0);

    /* No server: the query fails once it has waited queue_wait_ms, without a result. */
    struct qres q = {0};
    uint64_t t0 = now_ms();
    assert_int_equal(sp_pgconn_query(c, "SELECT 1", 0, NULL, on_result, &q), 0);
    RUN_UNTIL(&loop, q.done, 5000);
    uint64_t took = now_ms() - t0;
    assert_true(q.done);
    assert_true(took >= 150 && took < 2000);
    assert_false(q.had_res);
    assert_non_null(strstr(q.err, "no connection to PostgreSQL"));
    assert_non_null(strstr(q.err, "dbname=spool_test"));
    assert_non_null(strstr(q.err, "not sent"));
    assert_int_equal(ev.ups, 0);
    assert_int_equal(ev.downs, 0);

    /* Closed while down: queued queries fail with "closed", then close_cb, nothing leaks. */
    struct qres a = {0}, b = {0};
    int closed = 0;
    assert_int_equal(sp_pgconn_query(c, "SELECT 1", 0, NULL, on_result, &a), 0);
    assert_int_equal(sp_pgconn_query(c, "SELECT 2", 0, NULL, on_result, &b), 0);
    sp_pgconn_close(c, on_closed, &closed);
    RUN_UNTIL(&loop, closed, 5000);
    assert_true(a.done && b.done);
    assert_true(a.order < b.order && b.order < closed);
    assert_non_null(strstr(a.err, "closed before the query was sent"));
    assert_int_equal(ev.ups, 0);
    assert_int_equal(ev.downs, 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/* A callback may close its own connection; the queries behind it still get their callback. */
static void close_from_a_callback(void **state)
{
    (void)state;
    ensure_running();
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct sp_pgconn_opts o = test_opts(30000);
    sp_pgconn_t *c;
    assert_int_equal(sp_pgconn_open(&loop, pg.dsn, &o, &c), 0);
    int closed = 0;
    struct qres first = {.close_into = &closed}, second = {0};
    assert_int_equal(sp_pgconn_query(c, "SELECT 1", 0, NULL, on_result, &first), 0);
    assert_int_equal(sp_pgconn_query(c, "SELECT 2", 0, NULL, on_result, &second), 0);
    RUN_UNTIL(&loop, closed, 10000);
    assert_string_equal(first.value, "1");
    assert_true(second.done);
    assert_false(second.had_res);
    assert_non_null(strstr(second.err, "closed before the query was sent"));
    assert_true(first.order < second.order && second.order < closed);
    assert_int_equal(ev.ups, 1);
    assert_int_equal(ev.downs, 0);
    assert_int_equal(uv_loop_close(&loop), 0);
}

/*
 * The socket changes during an attempt: with prefer-standby and two hosts
 * (both our primary), libpq connects, rejects, connects to the next, rejects,
 * then connects again for any server, closing and opening sockets (usually
 * with the same number) inside PQconnectPoll. Then a parameter of 8 MB does
 * not fit the socket buffer, so PQflush returns 1 until the loop drained it.
 */
static void socket_changes_and_large_writes(void **state)
{
    (void)state;
    ensure_running();
    uv_loop_t loop;
    uv_loop_init(&loop);
    struct sp_pgconn_opts o = test_opts(30000);
    char dsn[1200];
    snprintf(dsn, sizeof dsn,
             "host=%s/run,%s/run port=5432,5432 user=postgres dbname=spool_test "
             "target_session_attrs=prefer-standby",
             pg.cluster.dir, pg.cluster.dir);
    sp_pgconn_t *c;
    assert_int_equal(sp_pgconn_open(&loop, dsn, &o, &c), 0);
    size_t big = 8u << 20;
    char *text = malloc(big + 1);
    assert_non_null(text);
    for (size_t i = 0; i < big; i++)
        text[i] = (char)('a' + i % 26);
    text[big] = '\0';
    const char *p[1] = {text};
    struct qres q1 = {0}, q2 = {0};
    assert_int_equal(sp_pgconn_query(c, "SELECT length($1)", 1, p, on_result, &q1), 0);
    free(text); /* the query keeps its own copy */
    assert_int_equal(sp_pgconn_query(c, "SELECT 'after the big one'", 0, NULL, on_result, &q2), 0);
    RUN_UNTIL(&loop, q2.done, 10000);
    assert_int_equal(ev.ups, 1);
    assert_string_equal(q1.err, "");
    assert_string_equal(q1.value, "8388608");
    assert_string_equal(q2.value, "after the big one");
    assert_true(q1.order < q2.order);
    int closed = 0;
    sp_pgconn_close(c, on_closed, &closed);
    RUN_UNTIL(&loop, closed, 5000);
    assert_int_equal(uv_loop_close(&loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(blocking_connect_retry_timeout_and_errors),
        cmocka_unit_test(async_queue_notify_and_restart),
        cmocka_unit_test(async_queue_wait_expires_and_close_while_down),
        cmocka_unit_test(close_from_a_callback),
        cmocka_unit_test(socket_changes_and_large_writes),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
