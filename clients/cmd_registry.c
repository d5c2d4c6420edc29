/*
 * `spool models push|list|show|alias`: the versioned model registry.
 *
 * push packs a model directory into a bundle (spool/bundle.h), stores it in
 * the model store ($SPOOL_MODEL_STORE) and registers the next version of the
 * name in PostgreSQL; pushing the same bytes again is a no-op that names the
 * existing version.
 */
#include "cli.h"

#include "spool/bundle.h"
#include "spool/error.h"
#include "spool/model.h"

#include <getopt.h>
#include <libpq-fe.h>
#include <limits.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static bool has_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return true;
    return false;
}

/* Connects to the registry database and tags the session with the OS user. */
static PGconn *connect_db(const char *dsn_flag)
{
    const char *dsn = cli_dsn(dsn_flag);
    if (!dsn) {
        cli_fail("no database: set SPOOL_DSN, pass --dsn, or run 'spool dev up'");
        return NULL;
    }
    PGconn *c = PQconnectdb(dsn);
    if (PQstatus(c) != CONNECTION_OK) {
        cli_fail("cannot connect to the database: %s", PQerrorMessage(c));
        PQfinish(c);
        return NULL;
    }
    struct passwd *pw = getpwuid(geteuid());
    const char *who = pw ? pw->pw_name : "unknown";
    const char *params[1] = {who};
    PQclear(PQexecParams(c, "SELECT set_config('spool.actor', $1, false)", 1, NULL, params, NULL,
                         NULL, 0));
    return c;
}

/* Prints a server error (with its hint) and returns CLI_FAIL. */
static int db_fail(PGresult *r, const char *what)
{
    const char *hint = PQresultErrorField(r, PG_DIAG_MESSAGE_HINT);
    const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    cli_fail("%s: %s%s%s", what, msg ? msg : PQresultErrorMessage(r), hint ? "\nhint: " : "",
             hint ? hint : "");
    PQclear(r);
    return CLI_FAIL;
}

int models_push(int argc, char **argv)
{
    const char *usage =
        "usage: spool models push DIR --name NAME [--alias ALIAS] [--dsn DSN] [--store DIR]\n\n"
        "Packs the model directory DIR (a Hugging Face model) into a bundle (tar + zstd),\n"
        "stores it in the model store by its sha256 and registers it as the next version\n"
        "of NAME. --alias also points ALIAS (e.g. prod) at the new version.\n"
        "  --store DIR  model store (default $SPOOL_MODEL_STORE, else $SPOOL_HOME/models)\n";
    static const struct option opts[] = {
        {"name", required_argument, NULL, 'n'}, {"alias", required_argument, NULL, 'a'},
        {"dsn", required_argument, NULL, 'd'},  {"store", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},       {NULL, 0, NULL, 0},
    };
    const char *name = NULL, *alias = NULL, *dsn = NULL, *store_loc = NULL;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'n':
            name = optarg;
            break;
        case 'a':
            alias = optarg;
            break;
        case 'd':
            dsn = optarg;
            break;
        case 's':
            store_loc = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            return CLI_OK;
        default:
            return cli_usage_error("spool models push", "bad option");
        }
    }
    if (optind != argc - 1)
        return cli_usage_error("spool models push", "give exactly one model directory");
    if (!name)
        return cli_usage_error("spool models push", "--name is required");
    const char *dir = argv[optind];

    char err[1024];
    se_model_t *model;
    if (se_model_open(dir, &model, err, sizeof err))
        return cli_fail("refusing to register %s: it does not load as a model: %s", dir, err);
    struct se_model_config cfg = *se_model_get_config(model);
    se_model_close(model);

    struct sp_store store;
    if (sp_store_open(store_loc, &store, err, sizeof err))
        return cli_fail("%s", err);
    char tmp[] = "/tmp/spool-bundle-XXXXXX";
    int fd = mkstemp(tmp);
    if (fd < 0) {
        sp_store_close(&store);
        return cli_fail("cannot create a temporary file");
    }
    close(fd);
    char digest[65], uri[PATH_MAX + 32];
    uint64_t size = 0;
    fprintf(stderr, "packing %s ...\n", dir);
    int rc = sp_bundle_pack(dir, tmp, digest, &size, err, sizeof err);
    if (rc == 0)
        rc = store.i->put(store.ctx, tmp, digest, uri, sizeof uri, err, sizeof err);
    unlink(tmp);
    sp_store_close(&store);
    if (rc)
        return cli_fail("%s", err);

    PGconn *c = connect_db(dsn);
    if (!c)
        return CLI_FAIL;
    char size_s[32], params_s[32], ctx_s[32];
    snprintf(size_s, sizeof size_s, "%llu", (unsigned long long)size);
    snprintf(params_s, sizeof params_s, "%lld", (long long)cfg.n_params);
    snprintf(ctx_s, sizeof ctx_s, "%d", cfg.max_position);
    const char *p[8] = {name,     digest, uri, size_s, cfg.arch_name, se_dtype_name(cfg.dtype),
                        params_s, ctx_s};
    PQclear(PQexec(c, "BEGIN"));
    PGresult *r = PQexecParams(
        c,
        "WITH lock AS (SELECT pg_advisory_xact_lock(hashtext('spool.models:' || $1))), "
        "old AS (SELECT version FROM spool.models, lock WHERE name = $1 AND digest = $2), "
        "ins AS (INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, "
        "  dtype, n_params, context_length, created_by) "
        "  SELECT $1, coalesce((SELECT max(version) FROM spool.models WHERE name = $1), 0) + 1, "
        "         $2, $3, $4::bigint, $5, $6, $7::bigint, $8::int, spool.actor() FROM lock "
        "  WHERE NOT EXISTS (SELECT 1 FROM old) RETURNING version) "
        "SELECT version, false FROM ins UNION ALL SELECT version, true FROM old",
        8, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        PQclear(PQexec(c, "ROLLBACK"));
        rc = db_fail(r, "registering the model");
        PQfinish(c);
        return rc;
    }
    int version = atoi(PQgetvalue(r, 0, 0));
    bool existed = PQgetvalue(r, 0, 1)[0] == 't';
    PQclear(r);
    if (alias) {
        char v[16];
        snprintf(v, sizeof v, "%d", version);
        const char *ap[3] = {name, alias, v};
        r = PQexecParams(c, "SELECT spool.set_alias($1, $2, $3::int)", 3, NULL, ap, NULL, NULL, 0);
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            PQclear(PQexec(c, "ROLLBACK"));
            rc = db_fail(r, "setting the alias");
            PQfinish(c);
            return rc;
        }
        PQclear(r);
    }
    r = PQexec(c, "COMMIT");
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        rc = db_fail(r, "committing");
        PQfinish(c);
        return rc;
    }
    PQclear(r);
    PQfinish(c);
    printf("%s %s@%d sha256:%s (%s, %s, %lld parameters, %.1f MB bundle)%s%s\n",
           existed ? "already registered as" : "registered", name, version, digest, cfg.arch_name,
           se_dtype_name(cfg.dtype), (long long)cfg.n_params, (double)size / 1e6,
           alias ? "; alias " : "", alias ? alias : "");
    return CLI_OK;
}

/* Prints a result set as aligned columns. */
static void print_table(PGresult *r)
{
    int nf = PQnfields(r), nt = PQntuples(r);
    int w[16] = {0};
    for (int f = 0; f < nf && f < 16; f++) {
        w[f] = (int)strlen(PQfname(r, f));
        for (int t = 0; t < nt; t++)
            if ((int)strlen(PQgetvalue(r, t, f)) > w[f])
                w[f] = (int)strlen(PQgetvalue(r, t, f));
    }
    for (int f = 0; f < nf && f < 16; f++)
        printf("%-*s%s", w[f], PQfname(r, f), f + 1 < nf ? "  " : "\n");
    for (int t = 0; t < nt; t++)
        for (int f = 0; f < nf && f < 16; f++)
            printf("%-*s%s", w[f], PQgetvalue(r, t, f), f + 1 < nf ? "  " : "\n");
}

static int simple_query(int argc, char **argv, const char *usage, const char *prog, int n_pos,
                        const char *sql, const char *what)
{
    const char *dsn = NULL;
    const char *pos[4] = {0};
    int npos = 0;
    if (has_help(argc, argv))
        return fputs(usage, stdout), CLI_OK;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--dsn") == 0 && i + 1 < argc)
            dsn = argv[++i];
        else if (argv[i][0] == '-')
            return cli_usage_error(prog, "unknown option '%s'", argv[i]);
        else if (npos < 4)
            pos[npos++] = argv[i];
    }
    if (npos != n_pos)
        return cli_usage_error(prog, "expected %d argument(s), got %d", n_pos, npos);
    PGconn *c = connect_db(dsn);
    if (!c)
        return CLI_FAIL;
    PGresult *r = PQexecParams(c, sql, n_pos, NULL, pos, NULL, NULL, 0);
    int rc = CLI_OK;
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        return db_fail(r, what), PQfinish(c), CLI_FAIL;
    print_table(r);
    PQclear(r);
    PQfinish(c);
    return rc;
}

int models_list(int argc, char **argv)
{
    return simple_query(
        argc, argv,
        "usage: spool models list [--dsn DSN]\n\nLists registered models: versions, newest, "
        "aliases.\n",
        "spool models list", 0,
        "SELECT m.name, count(*) AS versions, max(m.version) AS newest, "
        "  coalesce((SELECT string_agg(a.alias || '=' || a.version, ' ' ORDER BY a.alias) "
        "            FROM spool.model_aliases a WHERE a.name = m.name), '') AS aliases "
        "FROM spool.models m GROUP BY m.name ORDER BY m.name",
        "listing models");
}

int models_show(int argc, char **argv)
{
    if (has_help(argc, argv) || argc < 2 || !strchr(argv[1], '@'))
        return simple_query(
            argc, argv,
            "usage: spool models show NAME[@VERSION|@ALIAS] [--dsn DSN]\n\nShows a model's "
            "versions (or one version) with digest, size, architecture and aliases.\n",
            "spool models show", 1,
            "SELECT m.version, substr(m.digest, 1, 16) AS sha256, m.architecture, m.dtype, "
            "  m.n_params AS parameters, m.context_length AS context, "
            "  pg_size_pretty(m.size_bytes) AS size, "
            "  coalesce((SELECT string_agg(a.alias, ',') FROM spool.model_aliases a "
            "            WHERE a.name = m.name AND a.version = m.version), '') AS aliases, "
            "  to_char(m.created_at, 'YYYY-MM-DD HH24:MI') AS created, m.created_by "
            "FROM spool.models m WHERE m.name = $1 ORDER BY m.version",
            "showing the model");
    return simple_query(argc, argv, "", "spool models show", 1,
                        "SELECT m.name, m.version, m.digest AS sha256, m.uri, m.architecture, "
                        "m.dtype, m.n_params AS parameters, m.context_length AS context, "
                        "m.size_bytes AS bytes, m.created_at, m.created_by "
                        "FROM spool.models m WHERE m.id = spool.resolve_model($1)",
                        "showing the model");
}

int models_alias(int argc, char **argv)
{
    return simple_query(
        argc, argv,
        "usage: spool models alias NAME ALIAS VERSION [--dsn DSN]\n\nPoints ALIAS (such as "
        "prod or canary) at VERSION of NAME; the move is recorded with time and user.\n"
        "Jobs already submitted keep the version they were pinned to.\n",
        "spool models alias", 3,
        "SELECT $1::text AS name, $2::text AS alias, $3::int AS version FROM "
        "(SELECT spool.set_alias($1::text, $2::text, $3::int)) moved",
        "moving the alias");
}
