/*
 * The live-request log (scheduler/livelog.c) in a real libuv loop against a
 * real PostgreSQL: records arrive in spool.live_requests with their fields,
 * in batches (fewer INSERT statements, i.e. transactions, than records:
 * counted by distinct xmin), by size and by time; they survive a database
 * outage, with the queue bounded (the oldest records dropped and counted);
 * a batch the server refuses is dropped without blocking later ones; the
 * queue is written out on shutdown, and a shutdown with the database away
 * ends within its deadline.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "auth.h"
#include "livelog.h"
#include "pgtest.h"
#include "scheduler.h"

static struct pgt pg;
static uv_loop_t loop;
static struct sched s;

static PGconn *db(void)
{
    return pgt_connect(&pg);
}

static void exec_sql(const char *sql)
{
    PGconn *c = db();
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
    PQfinish(c);
}

static char *scalar(const char *sql)
{
    PGconn *c = db();
    char *v = pgt_scalar(c, sql);
    PQfinish(c);
    if (!v)
        fail_msg("no value from: %s", sql);
    return v;
}

static long num(const char *sql)
{
    char *v = scalar(sql);
    long n = atol(v);
    free(v);
    return n;
}

static void expect(const char *sql, const char *want)
{
    char *v = scalar(sql);
    if (strcmp(v, want) != 0)
        fail_msg("%s: got '%s', want '%s'", sql, v, want);
    free(v);
}

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

static void start(unsigned flush_ms, unsigned batch_rows, unsigned capacity, unsigned stop_wait_ms)
{
    if (sp_cluster_pid(&pg.cluster) <= 0)
        assert_int_equal(sp_cluster_start(&pg.cluster, NULL), 0);
    exec_sql("TRUNCATE spool.live_requests");
    memset(&s, 0, sizeof s);
    assert_int_equal(uv_loop_init(&loop), 0);
    s.loop = &loop;
    s.cfg.dsn = pg.dsn;
    struct sched_livelog_opts o = {.flush_ms = flush_ms,
                                   .batch_rows = batch_rows,
                                   .capacity = capacity,
                                   .stop_wait_ms = stop_wait_ms};
    assert_int_equal(sched_livelog_init(&s, &o), 0);
    assert_non_null(s.livelog);
}

/* Stops the log and runs the loop until every handle has closed. */
static uint64_t finish(void)
{
    uint64_t t0 = uv_hrtime();
    sched_livelog_stop(&s);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_null(s.livelog);
    assert_int_equal(uv_loop_close(&loop), 0);
    return (uv_hrtime() - t0) / 1000000;
}

static struct sched_livelog_stats stats(void)
{
    struct sched_livelog_stats st;
    sched_livelog_stats(&s, &st);
    return st;
}

static void noop_timer(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until cond() holds; fails after timeout_ms. */
static void run_until(bool (*cond)(void), unsigned timeout_ms, const char *what)
{
    uv_timer_t tick;
    uv_timer_init(&loop, &tick);
    uv_timer_start(&tick, noop_timer, 2, 2);
    uint64_t t0 = uv_now(&loop);
    while (!cond()) {
        uv_run(&loop, UV_RUN_ONCE);
        if (uv_now(&loop) - t0 > timeout_ms)
            fail_msg("timed out waiting until %s", what);
    }
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
}

/* Runs the loop for ms milliseconds. */
static void run_for(unsigned ms)
{
    uv_timer_t t;
    uv_timer_init(&loop, &t);
    uv_timer_start(&t, noop_timer, ms, 0);
    while (uv_is_active((uv_handle_t *)&t))
        uv_run(&loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&loop, UV_RUN_NOWAIT);
}

static uint64_t want_written;

static bool all_written(void)
{
    struct sched_livelog_stats st = stats();
    return st.written >= want_written && st.unsent == 0;
}

static bool connected(void)
{
    return stats().connected;
}

static bool disconnected(void)
{
    return !stats().connected;
}

/* Record i: tokens_in = i identifies it. */
static void record(uint32_t i)
{
    struct sched_live_record r = {
        .key_id = 7,
        .tenant = "acme",
        .model_id = 3,
        .endpoint = "/v1/chat/completions",
        .status = 200,
        .tokens_in = i,
        .tokens_out = 10,
        .ttft_s = 0.0125,
        .latency_s = 0.1,
        .worker_id = 0,
        .finish_reason = "stop",
    };
    sched_livelog_record(&s, &r);
}

static void records_arrive_batched(void **state)
{
    (void)state;
    start(50, 64, 0, 0);
    /* 1000 records at once: batches of 64, sent as soon as they are full. */
    for (uint32_t i = 0; i < 1000; i++)
        record(i);
    /* A refused request without key, model or first token. */
    struct sched_live_record bare = {
        .endpoint = "/v1/completions", .status = 401, .latency_s = 0.0002};
    sched_livelog_record(&s, &bare);
    want_written = 1001;
    run_until(all_written, 20000, "1001 records are written");
    struct sched_livelog_stats st = stats();
    assert_int_equal(st.recorded, 1001);
    assert_int_equal(st.dropped, 0);
    assert_int_equal(st.statements, 16); /* ceil(1001 / 64) */

    /* Three more, well under a batch: written by the periodic flush, in one statement. */
    for (uint32_t i = 1000; i < 1003; i++)
        record(i);
    want_written = 1004;
    run_until(all_written, 5000, "the periodic flush");
    assert_int_equal(stats().statements, 17);

    /* Every record is there once, written by one transaction per statement. */
    assert_int_equal(num("SELECT count(*) FROM spool.live_requests"), 1004);
    assert_int_equal(num("SELECT count(DISTINCT tokens_in) FROM spool.live_requests WHERE "
                         "status = 200"),
                     1003);
    assert_int_equal(num("SELECT count(DISTINCT xmin::text) FROM spool.live_requests"), 17);
    expect("SELECT count(*) FROM spool.live_requests WHERE tokens_in >= 1000", "3");
    expect("SELECT count(DISTINCT xmin::text) FROM spool.live_requests WHERE tokens_in >= 1000",
           "1");
    /* The fields. */
    expect("SELECT format('%s|%s|%s|%s|%s|%s|%s|%s|%s|%s|%s', key_id, tenant, model_id, "
           "endpoint, status, tokens_out, ttft_ms, latency_ms, worker_id IS NULL, finish_reason, "
           "abs(extract(epoch FROM now() - at)) < 60) FROM spool.live_requests WHERE tokens_in = 5",
           "7|acme|3|/v1/chat/completions|200|10|12.5|100|t|stop|t");
    expect("SELECT format('%s|%s|%s|%s|%s|%s', key_id IS NULL, tenant IS NULL, model_id IS NULL, "
           "ttft_ms IS NULL, finish_reason IS NULL, latency_ms) FROM spool.live_requests "
           "WHERE status = 401",
           "t|t|t|t|t|0.2");
    finish();
}

static void records_survive_an_outage_within_the_bound(void **state)
{
    (void)state;
    start(20, 16, 64, 0);
    run_until(connected, 10000, "connected");
    for (uint32_t i = 0; i < 40; i++)
        record(i);
    want_written = 40;
    run_until(all_written, 10000, "the first 40 are written");

    assert_int_equal(sp_cluster_stop(&pg.cluster, false), 0);
    run_until(disconnected, 10000, "the log sees the database go");
    /* 100 records while the database is away, a few at a time: the queue keeps the last 64. */
    for (uint32_t i = 40; i < 140; i += 10) {
        for (uint32_t j = i; j < i + 10; j++)
            record(j);
        run_for(15);
    }
    struct sched_livelog_stats st = stats();
    assert_int_equal(st.recorded, 140);
    assert_int_equal(st.written, 40);
    assert_int_equal(st.unsent, 64);
    assert_int_equal(st.dropped, 36);

    assert_int_equal(sp_cluster_start(&pg.cluster, NULL), 0);
    want_written = 104;
    run_until(all_written, 20000, "the queued records are written after the restart");
    assert_int_equal(num("SELECT count(*) FROM spool.live_requests"), 104);
    assert_int_equal(num("SELECT count(*) FROM spool.live_requests WHERE tokens_in < 40"), 40);
    assert_int_equal(num("SELECT count(*) FROM spool.live_requests WHERE tokens_in BETWEEN 40 AND "
                         "75"),
                     0);
    assert_int_equal(num("SELECT count(DISTINCT tokens_in) FROM spool.live_requests WHERE "
                         "tokens_in >= 76"),
                     64);
    finish();
}

static void a_refused_batch_is_dropped_and_later_ones_go_on(void **state)
{
    (void)state;
    start(20, 16, 0, 0);
    run_until(connected, 10000, "connected");
    exec_sql("ALTER TABLE spool.live_requests RENAME TO live_requests_away");
    for (uint32_t i = 0; i < 5; i++)
        record(i);
    want_written = 0;
    run_until(all_written, 10000, "the batch is settled");
    struct sched_livelog_stats st = stats();
    assert_int_equal(st.dropped, 5);
    assert_true(st.failures >= 1);
    exec_sql("ALTER TABLE spool.live_requests_away RENAME TO live_requests");
    for (uint32_t i = 5; i < 8; i++)
        record(i);
    want_written = 3;
    run_until(all_written, 10000, "the next batch is written");
    assert_int_equal(num("SELECT count(*) FROM spool.live_requests"), 3);
    assert_int_equal(num("SELECT min(tokens_in) FROM spool.live_requests"), 5);
    finish();
}

static void shutdown_writes_the_queue(void **state)
{
    (void)state;
    /* Neither the period nor the batch size would flush these. */
    start(60000, 1000, 0, 0);
    run_until(connected, 10000, "connected");
    for (uint32_t i = 0; i < 30; i++)
        record(i);
    finish();
    assert_int_equal(num("SELECT count(*) FROM spool.live_requests"), 30);
    assert_int_equal(num("SELECT count(DISTINCT xmin::text) FROM spool.live_requests"), 1);
}

static void shutdown_with_the_database_away_ends_in_time(void **state)
{
    (void)state;
    start(60000, 1000, 0, 300);
    run_until(connected, 10000, "connected");
    assert_int_equal(sp_cluster_stop(&pg.cluster, false), 0);
    run_until(disconnected, 10000, "the log sees the database go");
    for (uint32_t i = 0; i < 5; i++)
        record(i);
    uint64_t ms = finish();
    assert_true(ms >= 250);
    assert_true(ms < 5000);
    assert_int_equal(sp_cluster_start(&pg.cluster, NULL), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(records_arrive_batched),
        cmocka_unit_test(records_survive_an_outage_within_the_bound),
        cmocka_unit_test(a_refused_batch_is_dropped_and_later_ones_go_on),
        cmocka_unit_test(shutdown_writes_the_queue),
        cmocka_unit_test(shutdown_with_the_database_away_ends_in_time),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
