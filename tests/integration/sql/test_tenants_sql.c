/*
 * Tenants as database roles (migrations 0007 and 0008) against a real
 * PostgreSQL: two tenants, each connected as its own LOGIN role, submit jobs
 * and requests; row-level security keeps each from seeing, updating or
 * inserting into the other's jobs, requests and live-request records
 * (spool.job_status included), and spool.submit_job takes the caller's own
 * tenant. A tenant role granted before 0008 can read live_requests after it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pgtest.h"
#include "spool/migrate.h"

static struct pgt t;
static PGconn *owner;

static void ok(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

/* Runs sql expecting an error containing want. */
static void refused(PGconn *c, const char *sql, const char *want)
{
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_FATAL_ERROR)
        fail_msg("expected an error from: %s", sql);
    if (!strstr(PQresultErrorMessage(r), want))
        fail_msg("%s: error '%s' does not say '%s'", sql, PQresultErrorMessage(r), want);
    PQclear(r);
}

/* Runs an UPDATE or DELETE and returns how many rows it changed. */
static long changed(PGconn *c, const char *sql)
{
    PGresult *r = PQexec(c, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    long n = atol(PQcmdTuples(r));
    PQclear(r);
    return n;
}

static char *val(PGconn *c, const char *sql)
{
    char *v = pgt_scalar(c, sql);
    if (!v)
        fail_msg("no value from: %s", sql);
    return v;
}

static void expect(PGconn *c, const char *sql, const char *want)
{
    char *v = val(c, sql);
    if (strcmp(v, want) != 0)
        fail_msg("%s: got '%s', want '%s'", sql, v, want);
    free(v);
}

static long num(PGconn *c, const char *sql)
{
    char *v = val(c, sql);
    long n = atol(v);
    free(v);
    return n;
}

static PGconn *connect_as(const char *dsn, const char *role)
{
    char buf[700];
    snprintf(buf, sizeof buf, "%s user=%s", dsn, role);
    PGconn *c = PQconnectdb(buf);
    if (PQstatus(c) != CONNECTION_OK)
        fail_msg("connect as %s: %s", role, PQerrorMessage(c));
    return c;
}

static int setup(void **state)
{
    (void)state;
    pgt_start(&t, true);
    owner = pgt_connect(&t);
    ok(owner, "INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, "
              "dtype, n_params, context_length) VALUES ('tiny', 1, repeat('1', 64), "
              "'file:///store/1', 100, 'LlamaForCausalLM', 'bf16', 1000, 256)");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    PQfinish(owner);
    pgt_stop(&t);
    return 0;
}

struct tenant {
    const char *name, *role;
    PGconn *c;
    long sealed_job, open_job;
};

/* As the tenant's own role: one sealed job with two requests, one open job with one. */
static void submit_as(struct tenant *tn)
{
    tn->c = connect_as(t.dsn, tn->role);
    ok(tn->c, "BEGIN");
    tn->sealed_job = num(tn->c, "SELECT spool.submit_job('tiny')");
    char sql[512];
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.requests (job_id, custom_id, prompt) VALUES (%ld, 'a', 'hi'), "
             "(%ld, 'b', 'there')",
             tn->sealed_job, tn->sealed_job);
    ok(tn->c, sql);
    snprintf(sql, sizeof sql, "SELECT spool.seal_job(%ld)", tn->sealed_job);
    ok(tn->c, sql);
    ok(tn->c, "COMMIT");
    tn->open_job = num(tn->c, "SELECT spool.submit_job('tiny', params => '{\"max_tokens\": 4}')");
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.requests (job_id, custom_id, prompt) VALUES (%ld, 'c', 'open')",
             tn->open_job);
    ok(tn->c, sql);
    /* submit_job gave the caller's own tenant. */
    snprintf(sql, sizeof sql,
             "SELECT string_agg(DISTINCT tenant, ',') FROM spool.jobs WHERE id IN (%ld, %ld)",
             tn->sealed_job, tn->open_job);
    expect(owner, sql, tn->name);
}

/* What tenant me may and may not do to tenant other's rows. */
static void check_isolation(struct tenant *me, struct tenant *other)
{
    PGconn *c = me->c;
    char sql[512];
    /* Seeing: only its own jobs, requests, status rows and live records. */
    snprintf(sql, sizeof sql, "%s", "SELECT string_agg(DISTINCT tenant, ',') FROM spool.jobs");
    expect(c, sql, me->name);
    assert_int_equal(num(c, "SELECT count(*) FROM spool.jobs"), 2);
    assert_int_equal(num(c, "SELECT count(*) FROM spool.requests"), 3);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM spool.requests WHERE job_id IN (%ld, %ld)",
             other->sealed_job, other->open_job);
    assert_int_equal(num(c, sql), 0);
    assert_int_equal(num(c, "SELECT count(*) FROM spool.job_status"), 2);
    snprintf(sql, sizeof sql, "SELECT count(*) FROM spool.job_status WHERE job_id = %ld",
             other->sealed_job);
    assert_int_equal(num(c, sql), 0);
    snprintf(sql, sizeof sql, "SELECT total FROM spool.job_status WHERE job_id = %ld",
             me->sealed_job);
    expect(c, sql, "2");
    expect(c, "SELECT string_agg(DISTINCT tenant, ',') FROM spool.live_requests", me->name);
    assert_int_equal(num(c, "SELECT count(*) FROM spool.live_requests"), 2);

    /* Updating the other's rows changes nothing; giving its own job away is refused. */
    snprintf(sql, sizeof sql, "UPDATE spool.jobs SET priority = 9 WHERE id = %ld",
             other->sealed_job);
    assert_int_equal(changed(c, sql), 0);
    snprintf(sql, sizeof sql, "UPDATE spool.requests SET prompt = 'stolen' WHERE job_id = %ld",
             other->open_job);
    assert_int_equal(changed(c, sql), 0);
    snprintf(sql, sizeof sql, "UPDATE spool.jobs SET tenant = '%s' WHERE id = %ld", other->name,
             me->open_job);
    refused(c, sql, "row-level security");
    snprintf(sql, sizeof sql, "SELECT spool.seal_job(%ld)", other->open_job);
    refused(c, sql, "does not exist");

    /* Inserting: no job for the other tenant, no request into the other's open job. */
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.jobs (tenant, model_id, model_ref) "
             "SELECT '%s', id, 'tiny' FROM spool.models LIMIT 1",
             other->name);
    refused(c, sql, "row-level security");
    snprintf(sql, sizeof sql, "SELECT spool.submit_job('tiny', '%s')", other->name);
    refused(c, sql, "cannot submit jobs for tenant");
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.requests (job_id, prompt) VALUES (%ld, 'injected')",
             other->open_job);
    /* Refused by the requests policy (0007); before 0010 the open-job trigger ran first. */
    refused(c, sql, "row-level security policy");

    /* The live-request log is read-only to tenants; the keys are not theirs to read. */
    snprintf(sql, sizeof sql,
             "INSERT INTO spool.live_requests (at, tenant, endpoint, status, latency_ms) "
             "VALUES (now(), '%s', '/v1/completions', 200, 1)",
             me->name);
    refused(c, sql, "permission denied");
    refused(c, "UPDATE spool.live_requests SET status = 500", "permission denied");
    refused(c, "DELETE FROM spool.live_requests", "permission denied");
    refused(c, "SELECT count(*) FROM spool.api_keys", "permission denied");

    /* The owner sees that nothing of the other's changed. */
    snprintf(sql, sizeof sql,
             "SELECT format('%%s %%s %%s', j.priority, j.tenant, "
             "(SELECT string_agg(prompt, ',') FROM spool.requests WHERE job_id = %ld)) "
             "FROM spool.jobs j WHERE id = %ld",
             other->open_job, other->open_job);
    char want[128];
    snprintf(want, sizeof want, "0 %s open", other->name);
    expect(owner, sql, want);
    snprintf(sql, sizeof sql, "SELECT priority FROM spool.jobs WHERE id = %ld", other->sealed_job);
    expect(owner, sql, "0");
}

static void tenants_see_and_change_only_their_own(void **state)
{
    (void)state;
    ok(owner, "CREATE ROLE tenant_a LOGIN");
    ok(owner, "CREATE ROLE tenant_b LOGIN");
    ok(owner, "CREATE ROLE outsider LOGIN");
    ok(owner, "SELECT spool.grant_tenant_role('acme', 'tenant_a')");
    ok(owner, "SELECT spool.grant_tenant_role('beta', 'tenant_b')");
    refused(owner, "SELECT spool.grant_tenant_role('gamma', 'no_such_role')", "does not exist");

    struct tenant a = {.name = "acme", .role = "tenant_a"};
    struct tenant b = {.name = "beta", .role = "tenant_b"};
    submit_as(&a);
    submit_as(&b);
    /* Live-request records are written by the scheduler, as the owner. */
    ok(owner, "INSERT INTO spool.live_requests (at, key_id, tenant, model_id, endpoint, status, "
              "tokens_in, tokens_out, latency_ms) VALUES "
              "(now(), 1, 'acme', 1, '/v1/completions', 200, 5, 7, 12.5), "
              "(now(), 1, 'acme', 1, '/v1/chat/completions', 429, 0, 0, 0.2), "
              "(now(), 2, 'beta', 1, '/v1/completions', 200, 3, 4, 9), "
              "(now(), 2, 'beta', 1, '/v1/completions', 500, 3, 0, 9), "
              "(now(), NULL, NULL, NULL, '/v1/completions', 401, 0, 0, 0.1)");

    check_isolation(&a, &b);
    check_isolation(&b, &a);

    /* The owner sees everything. */
    assert_int_equal(num(owner, "SELECT count(*) FROM spool.jobs"), 4);
    assert_int_equal(num(owner, "SELECT count(*) FROM spool.live_requests"), 5);

    /* A role that is no tenant's sees no row even where it has the privilege. */
    ok(owner, "GRANT USAGE ON SCHEMA spool TO outsider");
    ok(owner, "GRANT SELECT ON spool.jobs, spool.requests, spool.live_requests TO outsider");
    PGconn *o = connect_as(t.dsn, "outsider");
    assert_int_equal(num(o, "SELECT count(*) FROM spool.jobs"), 0);
    assert_int_equal(num(o, "SELECT count(*) FROM spool.requests"), 0);
    assert_int_equal(num(o, "SELECT count(*) FROM spool.live_requests"), 0);
    PQfinish(o);

    /* The owner's submit_job still defaults to 'default' and may name any tenant. */
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT tenant FROM spool.jobs WHERE id = %ld",
             num(owner, "SELECT spool.submit_job('tiny')"));
    expect(owner, sql, "default");
    snprintf(sql, sizeof sql, "SELECT tenant FROM spool.jobs WHERE id = %ld",
             num(owner, "SELECT spool.submit_job('tiny', 'acme')"));
    expect(owner, sql, "acme");
    PQfinish(a.c);
    PQfinish(b.c);
}

/* A tenant role granted under 0007 reads live_requests once 0008 is applied. */
static void roles_granted_before_0008_get_live_requests(void **state)
{
    (void)state;
    char dsn[512], err[1024];
    pgt_createdb(&t, "upgrade", dsn, sizeof dsn);
    PGconn *c = PQconnectdb(dsn);
    assert_int_equal(PQstatus(c), CONNECTION_OK);
    size_t upto = 0;
    while (upto < sp_builtin_migrations_count &&
           strcmp(sp_builtin_migrations[upto].name, "0008_live_requests.sql") != 0)
        upto++;
    assert_true(upto < sp_builtin_migrations_count);
    if (sp_migrate(c, sp_builtin_migrations, upto, NULL, err, sizeof err))
        fail_msg("%s", err);
    ok(c, "CREATE ROLE early_tenant LOGIN");
    ok(c, "SELECT spool.grant_tenant_role('early', 'early_tenant')");
    if (sp_migrate(c, sp_builtin_migrations, sp_builtin_migrations_count, NULL, err, sizeof err))
        fail_msg("%s", err);
    ok(c, "INSERT INTO spool.live_requests (at, tenant, endpoint, status, latency_ms) VALUES "
          "(now(), 'early', '/v1/completions', 200, 1), (now(), 'other', '/v1/completions', 200, "
          "1)");
    PGconn *e = connect_as(dsn, "early_tenant");
    expect(e, "SELECT string_agg(tenant, ',') FROM spool.live_requests", "early");
    PQfinish(e);
    PQfinish(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(tenants_see_and_change_only_their_own),
        cmocka_unit_test(roles_granted_before_0008_get_live_requests),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
