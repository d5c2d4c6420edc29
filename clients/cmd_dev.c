/* `spool dev`: a private PostgreSQL cluster under $SPOOL_HOME (default ./.spool). */
#include "cli.h"

#include "spool/cluster.h"
#include "spool/error.h"
#include "spool/migrate.h"

#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bool want_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return true;
    return false;
}

static int open_cluster(struct sp_cluster *c)
{
    int rc = sp_cluster_init(c, cli_spool_home(), "spool");
    if (rc)
        return cli_fail("%s", c->err);
    return CLI_OK;
}

static int dev_up(int argc, char **argv)
{
    const char *usage = "usage: spool dev up\n\n"
                        "Starts the private PostgreSQL cluster in $SPOOL_HOME (default ./.spool),\n"
                        "creating it on first use, applies the migrations and prints the DSN on\n"
                        "stdout (so that: export SPOOL_DSN=\"$(spool dev up)\").\n";
    if (want_help(argc, argv))
        return fputs(usage, stdout), CLI_OK;
    if (argc > 1)
        return cli_usage_error("spool dev up", "unexpected argument '%s'", argv[1]);
    struct sp_cluster c;
    if (open_cluster(&c))
        return CLI_FAIL;
    bool fresh = !sp_cluster_exists(&c);
    if (fresh)
        fprintf(stderr, "creating a PostgreSQL cluster in %s\n", c.dir);
    if (sp_cluster_start(&c, NULL))
        return cli_fail("%s", c.err);
    char dsn[512];
    sp_cluster_dsn(&c, NULL, dsn, sizeof dsn);
    PGconn *conn = PQconnectdb(dsn);
    if (PQstatus(conn) != CONNECTION_OK) {
        cli_fail("cannot connect to %s: %s", dsn, PQerrorMessage(conn));
        PQfinish(conn);
        return CLI_FAIL;
    }
    char err[1024];
    int applied = 0;
    int rc = sp_migrate(conn, sp_builtin_migrations, sp_builtin_migrations_count, &applied, err,
                        sizeof err);
    PQfinish(conn);
    if (rc)
        return cli_fail("%s", err);
    fprintf(stderr, "PostgreSQL is running in %s (pid %ld); %d migration(s) applied\n", c.dir,
            sp_cluster_pid(&c), applied);
    printf("%s\n", dsn);
    return CLI_OK;
}

static int dev_down(int argc, char **argv)
{
    const char *usage = "usage: spool dev down\n\nStops the private PostgreSQL cluster (its data "
                        "stays in $SPOOL_HOME).\n";
    if (want_help(argc, argv))
        return fputs(usage, stdout), CLI_OK;
    if (argc > 1)
        return cli_usage_error("spool dev down", "unexpected argument '%s'", argv[1]);
    struct sp_cluster c;
    if (open_cluster(&c))
        return CLI_FAIL;
    if (!sp_cluster_exists(&c)) {
        fprintf(stderr, "no cluster in %s; nothing to stop\n", c.dir);
        return CLI_OK;
    }
    if (sp_cluster_stop(&c, false))
        return cli_fail("%s", c.err);
    fprintf(stderr, "PostgreSQL in %s stopped\n", c.dir);
    return CLI_OK;
}

static int dev_status(int argc, char **argv)
{
    const char *usage = "usage: spool dev status\n\nSays whether the private PostgreSQL cluster "
                        "runs; exits 0 when it does, 1 when not.\n";
    if (want_help(argc, argv))
        return fputs(usage, stdout), CLI_OK;
    if (argc > 1)
        return cli_usage_error("spool dev status", "unexpected argument '%s'", argv[1]);
    struct sp_cluster c;
    if (open_cluster(&c))
        return CLI_FAIL;
    if (!sp_cluster_exists(&c)) {
        printf("cluster: none in %s (run 'spool dev up')\n", c.dir);
        return CLI_FAIL;
    }
    long pid = sp_cluster_pid(&c);
    char dsn[512];
    sp_cluster_dsn(&c, NULL, dsn, sizeof dsn);
    if (pid <= 0) {
        printf("cluster: stopped\ndirectory: %s\n", c.dir);
        return CLI_FAIL;
    }
    printf("cluster: running\npid: %ld\ndirectory: %s\ndsn: %s\n", pid, c.dir, dsn);
    return CLI_OK;
}

static int dev_psql(int argc, char **argv)
{
    const char *usage = "usage: spool dev psql [PSQL-ARGS...]\n\nRuns psql connected to the "
                        "private cluster's database; arguments go to psql.\n";
    if (argc > 1 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0))
        return fputs(usage, stdout), CLI_OK;
    struct sp_cluster c;
    if (open_cluster(&c))
        return CLI_FAIL;
    if (sp_cluster_pid(&c) <= 0)
        return cli_fail("the private cluster in %s is not running (run 'spool dev up')", c.dir);
    char dsn[512];
    sp_cluster_dsn(&c, NULL, dsn, sizeof dsn);
    char **args = calloc((size_t)argc + 2, sizeof *args);
    if (!args)
        return cli_fail("out of memory");
    args[0] = "psql";
    args[1] = dsn;
    for (int i = 1; i < argc; i++)
        args[i + 1] = argv[i];
    execvp("psql", args);
    free(args);
    return cli_fail("cannot run psql: %s", strerror(errno));
}

static const struct cli_cmd dev_commands[] = {
    {"up", "start the private cluster (creating it) and apply migrations", dev_up},
    {"down", "stop the private cluster", dev_down},
    {"status", "say whether the private cluster runs", dev_status},
    {"psql", "open psql on the private cluster", dev_psql},
    {NULL, NULL, NULL},
};

int cmd_dev(int argc, char **argv)
{
    return cli_dispatch("spool dev",
                        "A private PostgreSQL 15 cluster for development, in $SPOOL_HOME "
                        "(default ./.spool),\non a unix socket only.",
                        dev_commands, argc, argv);
}
