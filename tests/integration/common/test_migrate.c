/* Migrations against a real PostgreSQL: apply, no-op, changed file, failure, races. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "pgtest.h"
#include "spool/error.h"
#include "spool/migrate.h"

static void write_file(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int migrate_dir(const char *dsn, const char *dir, int *applied, char *err, size_t cap)
{
    struct sp_migration *m;
    size_t n;
    int rc = sp_migrations_load_dir(dir, &m, &n, err, cap);
    if (rc)
        return rc;
    PGconn *c = PQconnectdb(dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        snprintf(err, cap, "%s", PQerrorMessage(c));
        PQfinish(c);
        sp_migrations_free(m, n);
        return SP_EDB;
    }
    PQclear(PQexec(c, "SET client_min_messages = warning"));
    rc = sp_migrate(c, m, n, applied, err, cap);
    PQfinish(c);
    sp_migrations_free(m, n);
    return rc;
}

static long count(PGconn *c, const char *sql)
{
    char *v = pgt_scalar(c, sql);
    long n = v ? strtol(v, NULL, 10) : -1;
    free(v);
    return n;
}

static void apply_noop_changed_and_failed(void **state)
{
    (void)state;
    struct pgt t;
    pgt_start(&t, false);
    char dir[] = "/tmp/spm-XXXXXX";
    assert_non_null(mkdtemp(dir));
    write_file(dir, "0001_a.sql", "CREATE TABLE spool.t (x int);");
    write_file(dir, "0002_b.sql",
               "INSERT INTO spool.t VALUES (1); INSERT INTO spool.t VALUES (2);");
    write_file(dir, "README.txt", "not a migration");

    char err[1024] = "";
    int applied = -1;
    assert_int_equal(migrate_dir(t.dsn, dir, &applied, err, sizeof err), 0);
    assert_int_equal(applied, 2);
    assert_int_equal(migrate_dir(t.dsn, dir, &applied, err, sizeof err), 0);
    assert_int_equal(applied, 0);

    PGconn *c = pgt_connect(&t);
    assert_int_equal(count(c, "SELECT count(*) FROM spool.t"), 2);
    assert_int_equal(count(c, "SELECT count(*) FROM spool.schema_migrations"), 2);
    char *sum =
        pgt_scalar(c, "SELECT checksum FROM spool.schema_migrations WHERE name = '0001_a.sql'");
    char want[65];
    const char *text = "CREATE TABLE spool.t (x int);";
    sp_sha256_hex(text, strlen(text), want);
    assert_string_equal(sum, want);
    free(sum);

    /* A failing migration is rolled back whole, names its file, and is not recorded. */
    write_file(dir, "0003_bad.sql", "INSERT INTO spool.t VALUES (3); SELEC oops;");
    assert_int_equal(migrate_dir(t.dsn, dir, &applied, err, sizeof err), SP_EDB);
    assert_non_null(strstr(err, "0003_bad.sql"));
    assert_int_equal(count(c, "SELECT count(*) FROM spool.t"), 2);
    assert_int_equal(count(c, "SELECT count(*) FROM spool.schema_migrations"), 2);
    unlink(strcat(strcpy((char[600]){0}, dir), "/0003_bad.sql"));

    /* Editing an applied file is an error naming it. */
    write_file(dir, "0001_a.sql", "CREATE TABLE spool.t (x bigint);");
    err[0] = '\0';
    assert_int_equal(migrate_dir(t.dsn, dir, &applied, err, sizeof err), SP_ECHECKSUM);
    assert_non_null(strstr(err, "0001_a.sql"));
    assert_non_null(strstr(err, "changed"));

    /* The lock is released even after an error: another migrator gets through. */
    write_file(dir, "0001_a.sql", text);
    write_file(dir, "0004_c.sql", "INSERT INTO spool.t VALUES (4);");
    assert_int_equal(migrate_dir(t.dsn, dir, &applied, err, sizeof err), 0);
    assert_int_equal(applied, 1);
    assert_int_equal(count(c, "SELECT count(*) FROM spool.t"), 3);

    PQfinish(c);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
    pgt_stop(&t);
}

static void concurrent_migrators_apply_each_file_once(void **state)
{
    (void)state;
    struct pgt t;
    pgt_start(&t, false);
    char dir[] = "/tmp/spm-XXXXXX";
    assert_non_null(mkdtemp(dir));
    write_file(dir, "0001_log.sql", "CREATE TABLE spool.applied_log (name text);");
    for (int i = 2; i <= 8; i++) {
        char name[64], sql[256];
        snprintf(name, sizeof name, "%04d_m.sql", i);
        snprintf(sql, sizeof sql,
                 "INSERT INTO spool.applied_log VALUES ('%s'); SELECT pg_sleep(0.02);", name);
        write_file(dir, name, sql);
    }
    enum { RACERS = 6 };
    int fds[RACERS][2];
    pid_t pids[RACERS];
    for (int i = 0; i < RACERS; i++) {
        assert_int_equal(pipe(fds[i]), 0);
        fflush(NULL);
        pids[i] = fork();
        assert_true(pids[i] >= 0);
        if (pids[i] == 0) {
            char err[1024];
            int applied = 0;
            int rc = migrate_dir(t.dsn, dir, &applied, err, sizeof err);
            if (rc)
                fprintf(stderr, "racer %d: %s\n", i, err);
            if (write(fds[i][1], &applied, sizeof applied) != sizeof applied)
                _exit(3);
            _exit(rc ? 1 : 0);
        }
        close(fds[i][1]);
    }
    int total = 0;
    for (int i = 0; i < RACERS; i++) {
        int st, applied = 0;
        assert_int_equal(read(fds[i][0], &applied, sizeof applied), (ssize_t)sizeof applied);
        close(fds[i][0]);
        assert_int_equal(waitpid(pids[i], &st, 0), pids[i]);
        assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
        total += applied;
    }
    assert_int_equal(total, 8);
    PGconn *c = pgt_connect(&t);
    assert_int_equal(count(c, "SELECT count(*) FROM spool.applied_log"), 7);
    assert_int_equal(count(c, "SELECT count(DISTINCT name) FROM spool.applied_log"), 7);
    assert_int_equal(count(c, "SELECT count(*) FROM spool.schema_migrations"), 8);
    PQfinish(c);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
    pgt_stop(&t);
}

static void builtin_migrations_apply(void **state)
{
    (void)state;
    struct pgt t;
    pgt_start(&t, true);
    PGconn *c = pgt_connect(&t);
    char *v = pgt_scalar(c, "SELECT spool.schema_version()");
    assert_non_null(v);
    assert_string_equal(v, sp_builtin_migrations[sp_builtin_migrations_count - 1].name);
    free(v);
    char err[256];
    int applied = -1;
    assert_int_equal(sp_migrate(c, sp_builtin_migrations, sp_builtin_migrations_count, &applied,
                                err, sizeof err),
                     0);
    assert_int_equal(applied, 0);
    PQfinish(c);
    pgt_stop(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(apply_noop_changed_and_failed),
        cmocka_unit_test(concurrent_migrators_apply_each_file_once),
        cmocka_unit_test(builtin_migrations_apply),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
