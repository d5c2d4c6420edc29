/* `spool db`: schema migrations. */
#include "cli.h"

#include "spool/error.h"
#include "spool/migrate.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>

static int db_migrate(int argc, char **argv)
{
    const char *usage =
        "usage: spool db migrate [--dsn DSN] [--dir DIR]\n\n"
        "Applies the schema migrations not yet applied, each in its own transaction.\n"
        "  --dsn DSN   database (default $SPOOL_DSN, else the running 'spool dev' cluster)\n"
        "  --dir DIR   read migrations from DIR instead of those built into spool\n";
    static const struct option opts[] = {
        {"dsn", required_argument, NULL, 'd'},
        {"dir", required_argument, NULL, 'D'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *dsn_flag = NULL, *dir = NULL;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'd':
            dsn_flag = optarg;
            break;
        case 'D':
            dir = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            return CLI_OK;
        default:
            return cli_usage_error("spool db migrate", "bad option");
        }
    }
    if (optind < argc)
        return cli_usage_error("spool db migrate", "unexpected argument '%s'", argv[optind]);
    const char *dsn = cli_dsn(dsn_flag);
    if (!dsn)
        return cli_fail("no database: set SPOOL_DSN, pass --dsn, or run 'spool dev up'");

    char err[1024];
    struct sp_migration *loaded = NULL;
    const struct sp_migration *m = sp_builtin_migrations;
    size_t n = sp_builtin_migrations_count;
    if (dir) {
        if (sp_migrations_load_dir(dir, &loaded, &n, err, sizeof err))
            return cli_fail("%s", err);
        m = loaded;
    }
    PGconn *conn = PQconnectdb(dsn);
    int rc = CLI_OK;
    if (PQstatus(conn) != CONNECTION_OK) {
        rc = cli_fail("cannot connect to the database (%s): %s", dsn, PQerrorMessage(conn));
    } else {
        int applied = 0;
        if (sp_migrate(conn, m, n, &applied, err, sizeof err))
            rc = cli_fail("%s", err);
        else
            printf("%d migration(s) applied, %zu already present\n", applied, n - (size_t)applied);
    }
    PQfinish(conn);
    if (loaded)
        sp_migrations_free(loaded, n);
    return rc;
}

static int db_status(int argc, char **argv)
{
    const char *usage = "usage: spool db status [--dsn DSN]\n\nLists the applied migrations.\n";
    const char *dsn_flag = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return fputs(usage, stdout), CLI_OK;
        if (strcmp(argv[i], "--dsn") == 0 && i + 1 < argc)
            dsn_flag = argv[++i];
        else
            return cli_usage_error("spool db status", "unexpected argument '%s'", argv[i]);
    }
    const char *dsn = cli_dsn(dsn_flag);
    if (!dsn)
        return cli_fail("no database: set SPOOL_DSN, pass --dsn, or run 'spool dev up'");
    PGconn *conn = PQconnectdb(dsn);
    if (PQstatus(conn) != CONNECTION_OK) {
        cli_fail("cannot connect to the database (%s): %s", dsn, PQerrorMessage(conn));
        PQfinish(conn);
        return CLI_FAIL;
    }
    PGresult *r = PQexec(conn, "SELECT name, checksum, applied_at, applied_by FROM "
                               "spool.schema_migrations ORDER BY name");
    int rc = CLI_OK;
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        rc = cli_fail("no migrations applied yet (%s)", PQresultErrorMessage(r));
    else
        for (int i = 0; i < PQntuples(r); i++)
            printf("%s  %.12s  %s  %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
                   PQgetvalue(r, i, 2), PQgetvalue(r, i, 3));
    PQclear(r);
    PQfinish(conn);
    return rc;
}

static const struct cli_cmd db_commands[] = {
    {"migrate", "apply schema migrations", db_migrate},
    {"status", "list applied migrations", db_status},
    {NULL, NULL, NULL},
};

int cmd_db(int argc, char **argv)
{
    return cli_dispatch("spool db", "Database administration.", db_commands, argc, argv);
}
