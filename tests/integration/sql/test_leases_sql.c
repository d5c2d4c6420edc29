/* The claim and completion paths: planning, fenced leases, exactly-once
 * results, checkpoints, expiry, retries and job completion. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "pgtest.h"
#include "pgtest_sql.h"

static struct pgt t;
static PGconn *c;

#define ok(...)  pgt_ok(c, __VA_ARGS__)
#define num(...) pgt_num(c, __VA_ARGS__)

static char *str(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *str(const char *fmt, ...)
{
    static char buf[4096];
    char sql[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    char *v = pgt_scalar(c, sql);
    snprintf(buf, sizeof buf, "%s", v ? v : "(null)");
    free(v);
    return buf;
}

static const char *error_of(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static const char *error_of(const char *fmt, ...)
{
    static char msg[1024];
    char sql[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_FATAL_ERROR)
        fail_msg("expected an error from: %s", sql);
    snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
    PQclear(r);
    return msg;
}

static long worker;

static int setup(void **state)
{
    (void)state;
    pgt_start(&t, true);
    c = pgt_connect(&t);
    ok("INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, "
       "n_params, context_length) VALUES ('tiny', 1, repeat('a', 64), 'file:///x', 1, 'llama', "
       "'bf16', 1, 128)");
    worker =
        num("INSERT INTO spool.workers (name, capacity_type) VALUES ('w1', 'spot') RETURNING id");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    PQfinish(c);
    pgt_stop(&t);
    return 0;
}

static long new_job(int n_requests)
{
    long job = num("SELECT spool.submit_job('tiny')");
    ok("INSERT INTO spool.requests (job_id, custom_id, prompt) SELECT %ld, 'r' || i, 'p' || i "
       "FROM generate_series(1, %d) i",
       job, n_requests);
    ok("SELECT spool.seal_job(%ld)", job);
    return job;
}

static long shard_of(long job, int nth)
{
    return num("SELECT id FROM spool.shards WHERE job_id = %ld ORDER BY id OFFSET %d LIMIT 1", job,
               nth);
}

static long req_id(long job, int nth)
{
    return num("SELECT id FROM spool.requests WHERE job_id = %ld ORDER BY id OFFSET %d LIMIT 1",
               job, nth);
}

static void result_json(char *buf, size_t cap, long id, const char *state, const char *output)
{
    snprintf(buf, cap,
             "{\"id\": %ld, \"state\": \"%s\", \"output\": \"%s\", \"finish_reason\": \"stop\", "
             "\"tokens_in\": 3, \"tokens_out\": 2, \"gpu_seconds\": 0.5, \"retry_after_ms\": 200, "
             "\"error\": %s}",
             id, state, output, strcmp(state, "succeeded") ? "\"engine error\"" : "null");
}

static void planning_cuts_shards(void **state)
{
    (void)state;
    long job = new_job(25);
    assert_int_equal(num("SELECT spool.plan_shards(%ld, 10)", job), 3);
    assert_int_equal(num("SELECT spool.plan_shards(%ld, 10)", job), 0); /* once only */
    assert_string_equal(
        str("SELECT string_agg(n_requests::text, ',' ORDER BY id) FROM spool.shards "
            "WHERE job_id = %ld",
            job),
        "10,10,5");
    assert_string_equal(str("SELECT state FROM spool.jobs WHERE id = %ld", job), "running");
    assert_non_null(
        strstr(error_of("SELECT spool.plan_shards(%ld, 0)", job), "shard_size must be"));
}

static void fenced_results_are_written_once(void **state)
{
    (void)state;
    long job = new_job(4);
    ok("SELECT spool.plan_shards(%ld, 10)", job);
    long shard = shard_of(job, 0);
    long tok1 = num("SELECT spool.lease_shard(%ld, %ld, '30 s')", shard, worker);
    assert_true(tok1 > 0);
    /* A leased shard cannot be leased again. */
    assert_string_equal(str("SELECT spool.lease_shard(%ld, %ld, '30 s')", shard, worker), "(null)");
    long r0 = req_id(job, 0), r1 = req_id(job, 1), r2 = req_id(job, 2), r3 = req_id(job, 3);
    ok("SELECT spool.start_requests(%ld, %ld, ARRAY[%ld, %ld, %ld, %ld])", shard, tok1, r0, r1, r2,
       r3);
    ok("SELECT spool.checkpoint_requests(%ld, %ld, '[{\"id\": %ld, \"tokens\": [5, 6, 7]}]')",
       shard, tok1, r2);
    char a[512], b[512];
    result_json(a, sizeof a, r0, "succeeded", "first");
    result_json(b, sizeof b, r1, "succeeded", "second");
    assert_int_equal(num("SELECT spool.complete_requests(%ld, %ld, '[%s, %s]')", shard, tok1, a, b),
                     2);

    /* The lease expires (the worker froze); the shard goes back with its checkpoint. */
    ok("UPDATE spool.shards SET lease_expires_at = now() - interval '1 s' WHERE id = %ld", shard);
    assert_int_equal(num("SELECT count(*) FROM spool.expire_leases()"), 1);
    assert_string_equal(
        str("SELECT state || ' ' || checkpoint::text FROM spool.requests WHERE id = %ld", r2),
        "pending {5,6,7}");
    assert_int_equal(
        num("SELECT count(*) FROM spool.preemptions WHERE worker_id = %ld AND source = "
            "'lease-expired'",
            worker),
        1);

    /* The old holder can no longer write anything. */
    result_json(a, sizeof a, r2, "succeeded", "stale");
    assert_non_null(
        strstr(error_of("SELECT spool.complete_requests(%ld, %ld, '[%s]')", shard, tok1, a),
               "lease lost"));
    assert_non_null(strstr(
        error_of("SELECT spool.checkpoint_requests(%ld, %ld, '[]')", shard, tok1), "lease lost"));
    assert_non_null(
        strstr(error_of("SELECT spool.release_shard(%ld, %ld)", shard, tok1), "lease lost"));

    /* A new lease has a larger token; re-sending finished results changes nothing. */
    long tok2 = num("SELECT spool.lease_shard(%ld, %ld, '30 s')", shard, worker);
    assert_true(tok2 > tok1);
    result_json(a, sizeof a, r0, "succeeded", "DUPLICATE");
    result_json(b, sizeof b, r2, "succeeded", "third");
    char d[512];
    result_json(d, sizeof d, r3, "succeeded", "fourth");
    assert_int_equal(
        num("SELECT spool.complete_requests(%ld, %ld, '[%s, %s, %s]')", shard, tok2, a, b, d), 2);
    assert_string_equal(str("SELECT output FROM spool.requests WHERE id = %ld", r0), "first");
    assert_string_equal(str("SELECT spool.release_shard(%ld, %ld)", shard, tok2), "done");
    assert_string_equal(
        str("SELECT state || ' ' || succeeded || ' ' || failed || ' ' || tokens_in || "
            "' ' || tokens_out FROM spool.job_status WHERE job_id = %ld",
            job),
        "succeeded 4 0 12 8");
}

static void retries_back_off_then_fail(void **state)
{
    (void)state;
    long job = new_job(1);
    ok("SELECT spool.plan_shards(%ld, 10)", job);
    long shard = shard_of(job, 0), r = req_id(job, 0);
    char res[512];
    for (int attempt = 1; attempt <= 3; attempt++) {
        long tok = num("SELECT spool.lease_shard(%ld, %ld, '30 s')", shard, worker);
        if (attempt > 1) {
            /* Still backing off: not started yet. */
            assert_int_equal(
                num("SELECT spool.start_requests(%ld, %ld, ARRAY[%ld])", shard, tok, r), 0);
            usleep(250000);
        }
        assert_int_equal(num("SELECT spool.start_requests(%ld, %ld, ARRAY[%ld])", shard, tok, r),
                         1);
        result_json(res, sizeof res, r, "retry", "");
        assert_int_equal(
            num("SELECT spool.complete_requests(%ld, %ld, '[%s]', 3)", shard, tok, res), 1);
        const char *want = attempt < 3 ? "pending" : "done";
        assert_string_equal(str("SELECT spool.release_shard(%ld, %ld)", shard, tok), want);
        if (attempt < 3)
            assert_int_equal(
                num("SELECT (next_attempt_at > now())::int FROM spool.requests WHERE id = %ld", r),
                1);
    }
    assert_string_equal(str("SELECT state FROM spool.requests WHERE id = %ld", r), "failed");
    assert_non_null(strstr(str("SELECT error FROM spool.requests WHERE id = %ld", r),
                           "gave up after 3 attempts"));
    assert_string_equal(str("SELECT state FROM spool.jobs WHERE id = %ld", job), "failed");
}

static void release_returns_unfinished_work(void **state)
{
    (void)state;
    long job = new_job(3);
    ok("SELECT spool.plan_shards(%ld, 10)", job);
    long shard = shard_of(job, 0);
    long tok = num("SELECT spool.lease_shard(%ld, %ld, '30 s')", shard, worker);
    long r0 = req_id(job, 0), r1 = req_id(job, 1);
    ok("SELECT spool.start_requests(%ld, %ld, ARRAY[%ld, %ld])", shard, tok, r0, r1);
    char a[512];
    result_json(a, sizeof a, r0, "succeeded", "x");
    ok("SELECT spool.complete_requests(%ld, %ld, '[%s]')", shard, tok, a);
    assert_string_equal(str("SELECT spool.release_shard(%ld, %ld, 'preempted')", shard, tok),
                        "pending");
    assert_string_equal(
        str("SELECT string_agg(state, ',' ORDER BY id) FROM spool.requests WHERE job_id = %ld",
            job),
        "succeeded,pending,pending");
    assert_string_equal(str("SELECT state FROM spool.jobs WHERE id = %ld", job), "running");
    /* Cancelling now keeps the finished request. */
    ok("SELECT spool.cancel_job(%ld)", job);
    assert_string_equal(
        str("SELECT string_agg(state, ',' ORDER BY id) FROM spool.requests WHERE job_id = %ld",
            job),
        "succeeded,cancelled,cancelled");
    assert_string_equal(str("SELECT state FROM spool.shards WHERE id = %ld", shard), "cancelled");
}

/*
 * finish_job_if_done (0010) looks at shards first: a job is finished by the
 * release of its last open shard, not by one whose requests happen to be the
 * last ones to finish while another shard, its results all written, is
 * still leased.
 */
static void job_finishes_with_its_last_shard(void **state)
{
    (void)state;
    long job = new_job(4);
    ok("SELECT spool.plan_shards(%ld, 2)", job);
    long s0 = shard_of(job, 0), s1 = shard_of(job, 1);
    long t0 = num("SELECT spool.lease_shard(%ld, %ld, '30 s')", s0, worker);
    long t1 = num("SELECT spool.lease_shard(%ld, %ld, '30 s')", s1, worker);
    char a[512], b[512];
    for (int i = 0; i < 4; i++) {
        long sh = i < 2 ? s0 : s1, tok = i < 2 ? t0 : t1, r = req_id(job, i);
        ok("SELECT spool.start_requests(%ld, %ld, ARRAY[%ld])", sh, tok, r);
        result_json(a, sizeof a, r, "succeeded", "x");
        ok("SELECT spool.complete_requests(%ld, %ld, '[%s]')", sh, tok, a);
    }
    /* Every request has its result, but s1 is still leased. */
    assert_string_equal(str("SELECT spool.release_shard(%ld, %ld)", s0, t0), "done");
    assert_string_equal(str("SELECT state FROM spool.jobs WHERE id = %ld", job), "running");
    assert_string_equal(str("SELECT spool.finish_job_if_done(%ld)", job), "f");
    assert_string_equal(str("SELECT spool.release_shard(%ld, %ld)", s1, t1), "done");
    assert_string_equal(str("SELECT state || ' ' || succeeded FROM spool.jobs WHERE id = %ld", job),
                        "succeeded 4");
    /* A request still pending with every shard ended (not made by the functions) keeps it open. */
    long job2 = new_job(2);
    ok("SELECT spool.plan_shards(%ld, 2)", job2);
    long s2 = shard_of(job2, 0);
    long t2 = num("SELECT spool.lease_shard(%ld, %ld, '30 s')", s2, worker);
    long r0 = req_id(job2, 0), r1 = req_id(job2, 1);
    ok("SELECT spool.start_requests(%ld, %ld, ARRAY[%ld, %ld])", s2, t2, r0, r1);
    result_json(a, sizeof a, r0, "succeeded", "x");
    result_json(b, sizeof b, r1, "succeeded", "y");
    ok("SELECT spool.complete_requests(%ld, %ld, '[%s, %s]')", s2, t2, a, b);
    ok("UPDATE spool.requests SET state = 'pending' WHERE id = %ld", r1);
    ok("UPDATE spool.shards SET state = 'done' WHERE id = %ld", s2);
    assert_string_equal(str("SELECT spool.finish_job_if_done(%ld)", job2), "f");
}

static void job_with_only_bad_requests_finishes_at_planning(void **state)
{
    (void)state;
    long job = num("SELECT spool.submit_job('tiny')");
    ok("INSERT INTO spool.requests (job_id, custom_id) VALUES (%ld, 'no-input')", job);
    ok("SELECT spool.seal_job(%ld)", job);
    assert_int_equal(num("SELECT spool.plan_shards(%ld, 10)", job), 0);
    assert_string_equal(str("SELECT state || ' ' || failed FROM spool.jobs WHERE id = %ld", job),
                        "failed 1");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(planning_cuts_shards),
        cmocka_unit_test(fenced_results_are_written_once),
        cmocka_unit_test(retries_back_off_then_fail),
        cmocka_unit_test(release_returns_unfinished_work),
        cmocka_unit_test(job_finishes_with_its_last_shard),
        cmocka_unit_test(job_with_only_bad_requests_finishes_at_planning),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
