/* The SQL API of the batch lane against a real PostgreSQL: submission,
 * pinning, idempotency, sealing, cancelling, the status view. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pgtest.h"

static struct pgt t;
static PGconn *c;

static void ok(const char *sql)
{
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

/* Runs sql expecting an error; returns the message (static). */
static const char *err_of(PGconn *conn, const char *sql)
{
    static char msg[1024];
    PGresult *r = PQexec(conn, sql);
    if (PQresultStatus(r) != PGRES_FATAL_ERROR)
        fail_msg("expected an error from: %s", sql);
    snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
    PQclear(r);
    return msg;
}

static char *val(const char *sql)
{
    char *v = pgt_scalar(c, sql);
    if (!v)
        fail_msg("no value from: %s", sql);
    return v;
}

static void expect(const char *sql, const char *want)
{
    char *v = val(sql);
    if (strcmp(v, want) != 0)
        fail_msg("%s: got '%s', want '%s'", sql, v, want);
    free(v);
}

static int setup(void **state)
{
    (void)state;
    pgt_start(&t, true);
    c = pgt_connect(&t);
    for (int v = 1; v <= 3; v++) {
        char sql[512];
        snprintf(sql, sizeof sql,
                 "INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, "
                 "dtype, n_params, context_length) VALUES ('tiny', %d, repeat('%d', 64), "
                 "'file:///store/%d', 100, 'LlamaForCausalLM', 'bf16', 1000, 256)",
                 v, v, v);
        ok(sql);
    }
    ok("SELECT spool.set_alias('tiny', 'prod', 2)");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    PQfinish(c);
    pgt_stop(&t);
    return 0;
}

static void model_references_resolve(void **state)
{
    (void)state;
    expect("SELECT version FROM spool.models WHERE id = spool.resolve_model('tiny')", "2");
    expect("SELECT version FROM spool.models WHERE id = spool.resolve_model('tiny@3')", "3");
    expect("SELECT version FROM spool.models WHERE id = spool.resolve_model('tiny@prod')", "2");
    expect("SELECT version FROM spool.models WHERE id = spool.resolve_model('tiny@sha256:' || "
           "repeat('1', 64))",
           "1");
    assert_non_null(
        strstr(err_of(c, "SELECT spool.resolve_model('nope')"), "unknown model \"nope\""));
    assert_non_null(
        strstr(err_of(c, "SELECT spool.resolve_model('tiny@9')"), "no version or alias \"9\""));
    assert_non_null(strstr(err_of(c, "SELECT spool.submit_job('tiny@canary')"), "\"canary\""));
    expect("SELECT count(*) FROM spool.model_alias_history WHERE name = 'tiny'", "1");
}

static void submission_is_transactional_and_pinned(void **state)
{
    (void)state;
    ok("CREATE TABLE public.my_prompts (k text, p text)");
    ok("INSERT INTO public.my_prompts SELECT 'k' || i, 'prompt ' || i FROM generate_series(1, 50) "
       "i");
    ok("BEGIN");
    char *job = val("SELECT spool.submit_job('tiny', 'acme', '{\"max_tokens\": 8}')");
    char sql[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.requests (job_id, custom_id, prompt) SELECT %s, k, p FROM "
             "public.my_prompts",
             job);
    ok(sql);
    snprintf(sql, sizeof sql, "INSERT INTO spool.requests (job_id, custom_id) VALUES (%s, 'bad')",
             job);
    ok(sql);
    snprintf(sql, sizeof sql, "SELECT spool.seal_job(%s)", job);
    ok(sql);

    /* Another session sees nothing before commit. */
    PGconn *other = pgt_connect(&t);
    PGresult *r = PQexec(other, "SELECT count(*) FROM spool.jobs WHERE tenant = 'acme'");
    assert_string_equal(PQgetvalue(r, 0, 0), "0");
    PQclear(r);
    ok("COMMIT");
    r = PQexec(other, "SELECT count(*) FROM spool.jobs WHERE tenant = 'acme'");
    assert_string_equal(PQgetvalue(r, 0, 0), "1");
    PQclear(r);

    /* Moving the alias does not move the job. */
    ok("SELECT spool.set_alias('tiny', 'prod', 3)");
    snprintf(
        sql, sizeof sql,
        "SELECT model || '@' || model_version || ' ' || state || ' ' || total || ' ' || failed "
        "FROM spool.job_status WHERE job_id = %s",
        job);
    expect(sql, "tiny@2 queued 51 1");
    snprintf(sql, sizeof sql,
             "SELECT error FROM spool.requests WHERE job_id = %s AND custom_id = 'bad'", job);
    char *e = val(sql);
    assert_non_null(strstr(e, "no input"));
    free(e);

    /* A sealed job takes no more requests, with a clear error, in another transaction. */
    snprintf(sql, sizeof sql, "INSERT INTO spool.requests (job_id, prompt) VALUES (%s, 'late')",
             job);
    assert_non_null(strstr(err_of(other, sql), "requests can only be added to an open job"));
    /*
     * The check runs once per statement (0010): one row for a sealed job
     * among rows for an open one refuses the whole statement, and a job
     * that does not exist is refused too.
     */
    char *open_job = val("SELECT spool.submit_job('tiny')");
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.requests (job_id, prompt) SELECT j, 'p' FROM unnest(ARRAY[%s, "
             "%s, %s]) j",
             open_job, job, open_job);
    assert_non_null(strstr(err_of(other, sql), "is queued; requests can only be added to an open"));
    snprintf(sql, sizeof sql, "SELECT count(*) FROM spool.requests WHERE job_id = %s", open_job);
    expect(sql, "0");
    assert_non_null(strstr(err_of(other, "INSERT INTO spool.requests (job_id, prompt) VALUES "
                                         "(987654, 'p')"),
                           "987654"));
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.requests (job_id, prompt) SELECT %s, 'p' || i FROM "
             "generate_series(1, 3) i",
             open_job);
    ok(sql);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM spool.requests WHERE job_id = %s", open_job);
    expect(sql, "3");
    free(open_job);
    PQfinish(other);
    free(job);
    ok("SELECT spool.set_alias('tiny', 'prod', 2)");
}

static void idempotency_key_returns_existing_job(void **state)
{
    (void)state;
    char *a =
        val("SELECT spool.submit_job('tiny', 'acme', idempotency_key => 'nightly-2026-11-28')");
    char *b =
        val("SELECT spool.submit_job('tiny@3', 'acme', idempotency_key => 'nightly-2026-11-28')");
    char *other =
        val("SELECT spool.submit_job('tiny', 'globex', idempotency_key => 'nightly-2026-11-28')");
    assert_string_equal(a, b);
    assert_string_not_equal(a, other);
    free(a), free(b), free(other);
}

static void cancel_keeps_finished_results(void **state)
{
    (void)state;
    char *job = val("SELECT spool.submit_job('tiny')");
    char sql[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.requests (job_id, prompt) SELECT %s, 'p' || i FROM "
             "generate_series(1, 10) i",
             job);
    ok(sql);
    snprintf(sql, sizeof sql, "SELECT spool.seal_job(%s)", job);
    ok(sql);
    snprintf(
        sql, sizeof sql,
        "UPDATE spool.requests SET state = 'succeeded', output = 'done' WHERE id IN (SELECT id "
        "FROM spool.requests WHERE job_id = %s ORDER BY id LIMIT 3)",
        job);
    ok(sql);
    snprintf(sql, sizeof sql, "SELECT (spool.cancel_job(%s)).state", job);
    expect(sql, "cancelled");
    snprintf(
        sql, sizeof sql,
        "SELECT string_agg(state, ',' ORDER BY state) FROM (SELECT state || ':' || count(*) AS "
        "state FROM spool.requests WHERE job_id = %s GROUP BY state) s",
        job);
    expect(sql, "cancelled:7,succeeded:3");
    snprintf(sql, sizeof sql, "SELECT cancelled FROM spool.job_status WHERE job_id = %s", job);
    expect(sql, "7");
    free(job);
}

static void bad_submissions_are_clear_errors(void **state)
{
    (void)state;
    assert_non_null(strstr(err_of(c, "SELECT spool.submit_job('tiny', params => '[1]')"),
                           "job params must be a JSON object"));
    assert_non_null(strstr(err_of(c, "SELECT spool.submit_job('')"), "model reference is empty"));
    assert_non_null(
        strstr(err_of(c, "SELECT spool.seal_job(999999)"), "job 999999 does not exist"));
    assert_non_null(strstr(err_of(c, "SELECT spool.submit_job('tiny', 'bad tenant!')"),
                           "tenant name \"bad tenant!\" is invalid"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(model_references_resolve),
        cmocka_unit_test(submission_is_transactional_and_pinned),
        cmocka_unit_test(idempotency_key_returns_existing_job),
        cmocka_unit_test(cancel_keeps_finished_results),
        cmocka_unit_test(bad_submissions_are_clear_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
