/*
 * `spool keys create|list|revoke` and `spool tenants create|list`: API keys
 * for the HTTP lane and the tenants they belong to (migrations 0007, 0008).
 *
 * A key is made by spool.create_api_key in the database, which stores only
 * its SHA-256; create prints the key once and it cannot be shown again.
 * list never prints keys or hashes. revoke calls spool.revoke_api_key, whose
 * NOTIFY makes running schedulers forget the key at once.
 */
#include "cli.h"

#include <errno.h>
#include <getopt.h>
#include <libpq-fe.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

static const char dsn_help[] =
    "  --dsn DSN      database (default $SPOOL_DSN, else the running 'spool dev' cluster)\n";

/*
 * Parses the options of a command whose only option is --dsn (and --help).
 * Returns -1 to go on (optind at the first operand, *dsn set when given), or
 * the exit code: CLI_OK after --help, a usage error for anything else.
 */
static int dsn_only_options(int argc, char **argv, const char *prog, const char *usage,
                            const char **dsn)
{
    static const struct option opts[] = {
        {"dsn", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'd':
            *dsn = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            fputs(dsn_help, stdout);
            return CLI_OK;
        default:
            return cli_usage_error(prog, "bad option");
        }
    }
    return -1;
}

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
    return c;
}

/* Prints a server error (with its hint) and returns CLI_FAIL; clears r. */
static int db_fail(PGresult *r, const char *what)
{
    const char *hint = PQresultErrorField(r, PG_DIAG_MESSAGE_HINT);
    const char *msg = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
    cli_fail("%s: %s%s%s", what, msg ? msg : PQresultErrorMessage(r), hint ? "\nhint: " : "",
             hint ? hint : "");
    PQclear(r);
    return CLI_FAIL;
}

/* Tenant names as spool.tenants checks them: 1 to 64 of [A-Za-z0-9_.-]. */
static bool tenant_ok(const char *t)
{
    size_t n = strlen(t);
    return n >= 1 && n <= 64 &&
           strspn(t, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                     "0123456789_.-") == n;
}

/* Parses a positive int (1 .. INT_MAX) into out as decimal text. */
static bool parse_limit(const char *v, char *out, size_t cap)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *v == '\0' || *end != '\0' || n < 1 || n > INT_MAX)
        return false;
    snprintf(out, cap, "%ld", n);
    return true;
}

/*
 * Turns "inference,batch" into the array literal "{inference,batch}".
 * Returns NULL (and the offending word in bad) for an unknown, empty or
 * repeated scope.
 */
static const char *parse_scopes(const char *v, char *out, size_t cap, char *bad, size_t badcap)
{
    static const char *const known[] = {"inference", "batch", "admin"};
    bool seen[3] = {false};
    size_t len = 0;
    out[len++] = '{';
    const char *p = v;
    for (;;) {
        size_t n = strcspn(p, ",");
        int which = -1;
        for (int k = 0; k < 3; k++)
            if (n == strlen(known[k]) && strncmp(p, known[k], n) == 0)
                which = k;
        if (which < 0 || seen[which]) {
            snprintf(bad, badcap, "%.*s", (int)n, p);
            return NULL;
        }
        seen[which] = true;
        len += (size_t)snprintf(out + len, cap - len, "%s%s", len > 1 ? "," : "", known[which]);
        if (p[n] == '\0')
            break;
        p += n + 1;
    }
    snprintf(out + len, cap - len, "}");
    return out;
}

static int keys_create(int argc, char **argv)
{
    const char *prog = "spool keys create";
    const char *usage =
        "usage: spool keys create --tenant T [--name N] [--scopes LIST] [--rpm N] [--tpm N]\n"
        "                         [--json] [--dsn DSN]\n\n"
        "Creates an API key for the HTTP lane and prints it with its id. The key is shown\n"
        "only now: the database keeps its SHA-256 alone. The tenant is created if new.\n"
        "  --tenant T     the tenant the key acts for (1-64 of A-Z a-z 0-9 _ . -)\n"
        "  --name N       a label for listings\n"
        "  --scopes LIST  comma-separated: inference, batch, admin (default inference,batch)\n"
        "  --rpm N        at most N requests per minute (default: unlimited)\n"
        "  --tpm N        at most N tokens (prompt + completion) per minute (default: unlimited)\n"
        "  --json         print one JSON object\n";
    static const struct option opts[] = {
        {"tenant", required_argument, NULL, 't'},
        {"name", required_argument, NULL, 'n'},
        {"scopes", required_argument, NULL, 's'},
        {"rpm", required_argument, NULL, 'r'},
        {"tpm", required_argument, NULL, 'T'},
        {"json", no_argument, NULL, 'j'},
        {"dsn", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *tenant = NULL, *name = "", *scopes = "{inference,batch}", *dsn = NULL;
    char rpm_s[16], tpm_s[16], scopes_buf[64], bad[64];
    const char *rpm = NULL, *tpm = NULL;
    bool json = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 't':
            tenant = optarg;
            break;
        case 'n':
            name = optarg;
            break;
        case 's':
            scopes = parse_scopes(optarg, scopes_buf, sizeof scopes_buf, bad, sizeof bad);
            if (!scopes)
                return cli_usage_error(prog,
                                       "--scopes: '%s' is not a scope, or is given twice "
                                       "(use inference, batch, admin)",
                                       bad);
            break;
        case 'r':
            if (!parse_limit(optarg, rpm_s, sizeof rpm_s))
                return cli_usage_error(prog, "--rpm wants a whole number >= 1, got '%s'", optarg);
            rpm = rpm_s;
            break;
        case 'T':
            if (!parse_limit(optarg, tpm_s, sizeof tpm_s))
                return cli_usage_error(prog, "--tpm wants a whole number >= 1, got '%s'", optarg);
            tpm = tpm_s;
            break;
        case 'j':
            json = true;
            break;
        case 'd':
            dsn = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            fputs(dsn_help, stdout);
            return CLI_OK;
        default:
            return cli_usage_error(prog, "bad option");
        }
    }
    if (optind < argc)
        return cli_usage_error(prog, "unexpected argument '%s'", argv[optind]);
    if (!tenant)
        return cli_usage_error(prog, "--tenant is required");
    if (!tenant_ok(tenant))
        return cli_usage_error(prog,
                               "tenant name '%s' is invalid: use 1 to 64 letters, digits, "
                               "'_', '.' or '-'",
                               tenant);
    PGconn *c = connect_db(dsn);
    if (!c)
        return CLI_FAIL;
    /* Two statements in one transaction: the key's row is visible only to the second. */
    PQclear(PQexec(c, "BEGIN"));
    const char *p[5] = {tenant, name, scopes, rpm, tpm};
    PGresult *r = PQexecParams(c,
                               "SELECT id, key FROM spool.create_api_key($1, $2, $3::text[], "
                               "$4::int, $5::int)",
                               5, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        int rc = db_fail(r, "creating the key");
        PQfinish(c);
        return rc;
    }
    const char *kp[2] = {PQgetvalue(r, 0, 0), PQgetvalue(r, 0, 1)};
    PGresult *k = PQexecParams(
        c,
        "SELECT id, $2::text, tenant, name, prefix, array_to_string(scopes, ','), "
        "       json_build_object('id', id, 'key', $2::text, 'tenant', tenant, 'name', name, "
        "         'prefix', prefix, 'scopes', scopes, 'rpm_limit', rpm_limit, "
        "         'tpm_limit', tpm_limit, 'created_at', created_at) "
        "  FROM spool.api_keys WHERE id = $1::bigint",
        2, NULL, kp, NULL, NULL, 0);
    PQclear(r);
    r = k;
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        int rc = db_fail(r, "reading the new key");
        PQfinish(c);
        return rc;
    }
    PGresult *done = PQexec(c, "COMMIT");
    if (PQresultStatus(done) != PGRES_COMMAND_OK) {
        PQclear(r);
        int rc = db_fail(done, "committing the key");
        PQfinish(c);
        return rc;
    }
    PQclear(done);
    if (json) {
        printf("%s\n", PQgetvalue(r, 0, 6));
    } else {
        printf("id      %s\ntenant  %s\nscopes  %s\nkey     %s\n", PQgetvalue(r, 0, 0),
               PQgetvalue(r, 0, 2), PQgetvalue(r, 0, 5), PQgetvalue(r, 0, 1));
        fprintf(stderr, "Store the key now: it is not shown again (Spool keeps only its "
                        "SHA-256).\n");
    }
    PQclear(r);
    PQfinish(c);
    return CLI_OK;
}

/* Prints a result set as aligned columns with a header. */
static void print_table(PGresult *r)
{
    int nf = PQnfields(r), nt = PQntuples(r);
    int w[16] = {0};
    for (int f = 0; f < nf && f < 16; f++) {
        w[f] = (int)strlen(PQfname(r, f));
        for (int t = 0; t < nt; t++) {
            int l = PQgetlength(r, t, f);
            if (l > w[f])
                w[f] = l;
        }
    }
    for (int f = 0; f < nf && f < 16; f++)
        printf("%-*s%s", f + 1 < nf ? w[f] : 0, PQfname(r, f), f + 1 < nf ? "  " : "\n");
    for (int t = 0; t < nt; t++)
        for (int f = 0; f < nf && f < 16; f++)
            printf("%-*s%s", f + 1 < nf ? w[f] : 0, PQgetvalue(r, t, f), f + 1 < nf ? "  " : "\n");
}

static int keys_list(int argc, char **argv)
{
    const char *prog = "spool keys list";
    const char *usage = "usage: spool keys list [--tenant T] [--all] [--json] [--dsn DSN]\n\n"
                        "Lists API keys (never the keys or their hashes): id, tenant, name, the "
                        "key's\nfirst characters, scopes, limits, when created and revoked.\n"
                        "  --tenant T     only tenant T's keys\n"
                        "  --all          revoked keys too\n"
                        "  --json         print a JSON array\n";
    static const struct option opts[] = {
        {"tenant", required_argument, NULL, 't'}, {"all", no_argument, NULL, 'a'},
        {"json", no_argument, NULL, 'j'},         {"dsn", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},         {NULL, 0, NULL, 0},
    };
    const char *tenant = NULL, *dsn = NULL;
    bool all = false, json = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 't':
            tenant = optarg;
            break;
        case 'a':
            all = true;
            break;
        case 'j':
            json = true;
            break;
        case 'd':
            dsn = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            fputs(dsn_help, stdout);
            return CLI_OK;
        default:
            return cli_usage_error(prog, "bad option");
        }
    }
    if (optind < argc)
        return cli_usage_error(prog, "unexpected argument '%s'", argv[optind]);
    PGconn *c = connect_db(dsn);
    if (!c)
        return CLI_FAIL;
    const char *p[2] = {tenant, all ? "t" : "f"};
    const char *sql =
        json ? "SELECT coalesce(json_agg(json_build_object('id', id, 'tenant', tenant, 'name', "
               "  name, 'prefix', prefix, 'scopes', scopes, 'rpm_limit', rpm_limit, 'tpm_limit', "
               "  tpm_limit, 'created_at', created_at, 'created_by', created_by, 'revoked_at', "
               "  revoked_at, 'revoked_by', revoked_by) ORDER BY id), '[]') "
               "FROM spool.api_keys WHERE ($1::text IS NULL OR tenant = $1) "
               "AND ($2::bool OR revoked_at IS NULL)"
             : "SELECT id, tenant, CASE name WHEN '' THEN '-' ELSE name END AS name, prefix, "
               "  array_to_string(scopes, ',') AS scopes, coalesce(rpm_limit::text, '-') AS rpm, "
               "  coalesce(tpm_limit::text, '-') AS tpm, "
               "  to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS "
               "created, "
               "  coalesce(to_char(revoked_at AT TIME ZONE 'UTC', "
               "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), '-') AS revoked "
               "FROM spool.api_keys WHERE ($1::text IS NULL OR tenant = $1) "
               "AND ($2::bool OR revoked_at IS NULL) ORDER BY id";
    PGresult *r = PQexecParams(c, sql, 2, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        int rc = db_fail(r, "listing keys");
        PQfinish(c);
        return rc;
    }
    if (json)
        printf("%s\n", PQgetvalue(r, 0, 0));
    else
        print_table(r);
    PQclear(r);
    PQfinish(c);
    return CLI_OK;
}

static int keys_revoke(int argc, char **argv)
{
    const char *prog = "spool keys revoke";
    const char *usage = "usage: spool keys revoke ID [--dsn DSN]\n\n"
                        "Revokes the API key with id ID (see 'spool keys list'). Running "
                        "schedulers\nrefuse it at once. Revoking a revoked key changes nothing.\n";
    const char *dsn = NULL;
    int done = dsn_only_options(argc, argv, prog, usage, &dsn);
    if (done >= 0)
        return done;
    if (optind != argc - 1)
        return cli_usage_error(prog, "give exactly one key id");
    char id[24];
    const char *v = argv[optind];
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno || *v == '\0' || *end != '\0' || n < 1)
        return cli_usage_error(prog, "'%s' is not a key id (a whole number, see 'spool keys list')",
                               v);
    snprintf(id, sizeof id, "%lld", n);
    PGconn *c = connect_db(dsn);
    if (!c)
        return CLI_FAIL;
    const char *p[1] = {id};
    PGresult *r =
        PQexecParams(c,
                     "SELECT spool.revoke_api_key($1::bigint), a.tenant, a.prefix, "
                     "  to_char(a.revoked_at AT TIME ZONE 'UTC', "
                     "          'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') "
                     "FROM (SELECT 1) one LEFT JOIN spool.api_keys a ON a.id = $1::bigint",
                     1, NULL, p, NULL, NULL, 0);
    int rc = CLI_OK;
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        rc = db_fail(r, "revoking the key");
        PQfinish(c);
        return rc;
    }
    if (PQgetisnull(r, 0, 1))
        rc = cli_fail("no API key has id %s (see 'spool keys list --all')", id);
    else if (PQgetvalue(r, 0, 0)[0] == 't')
        printf("revoked key %s (tenant %s, %s...)\n", id, PQgetvalue(r, 0, 1), PQgetvalue(r, 0, 2));
    else
        printf("key %s (tenant %s) was already revoked at %s\n", id, PQgetvalue(r, 0, 1),
               PQgetvalue(r, 0, 3));
    PQclear(r);
    PQfinish(c);
    return rc;
}

static const struct cli_cmd keys_commands[] = {
    {"create", "create an API key (printed once)", keys_create},
    {"list", "list API keys (never the keys themselves)", keys_list},
    {"revoke", "revoke an API key", keys_revoke},
    {NULL, NULL, NULL},
};

int cmd_keys(int argc, char **argv)
{
    return cli_dispatch("spool keys", "API keys for the HTTP lane (stored only as SHA-256).",
                        keys_commands, argc, argv);
}

static int tenants_create(int argc, char **argv)
{
    const char *prog = "spool tenants create";
    const char *usage =
        "usage: spool tenants create NAME [--role ROLE] [--weight W] [--dsn DSN]\n\n"
        "Creates tenant NAME (or updates it when it exists).\n"
        "  --role ROLE    make the existing PostgreSQL role ROLE the tenant's: connected as\n"
        "                 ROLE, a session sees and writes only NAME's jobs and requests\n"
        "                 (row-level security; spool.grant_tenant_role)\n"
        "  --weight W     the tenant's share of workers against other tenants (> 0, default 1)\n";
    static const struct option opts[] = {
        {"role", required_argument, NULL, 'r'},
        {"weight", required_argument, NULL, 'w'},
        {"dsn", required_argument, NULL, 'd'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *role = NULL, *weight = NULL, *dsn = NULL;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'r':
            role = optarg;
            break;
        case 'w': {
            char *end;
            errno = 0;
            double w = strtod(optarg, &end);
            if (errno || *optarg == '\0' || *end != '\0' || !(w > 0) || w > 1e9)
                return cli_usage_error(prog, "--weight wants a number > 0, got '%s'", optarg);
            weight = optarg;
            break;
        }
        case 'd':
            dsn = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            fputs(dsn_help, stdout);
            return CLI_OK;
        default:
            return cli_usage_error(prog, "bad option");
        }
    }
    if (optind != argc - 1)
        return cli_usage_error(prog, "give exactly one tenant name");
    const char *name = argv[optind];
    if (!tenant_ok(name))
        return cli_usage_error(prog,
                               "tenant name '%s' is invalid: use 1 to 64 letters, digits, "
                               "'_', '.' or '-'",
                               name);
    PGconn *c = connect_db(dsn);
    if (!c)
        return CLI_FAIL;
    PQclear(PQexec(c, "BEGIN"));
    const char *p[2] = {name, weight};
    PGresult *r = PQexecParams(
        c,
        "INSERT INTO spool.tenants (name, weight) VALUES ($1, coalesce($2::float8, 1)) "
        "ON CONFLICT (name) DO UPDATE SET weight = coalesce($2::float8, tenants.weight) "
        "RETURNING xmax = 0, weight",
        2, NULL, p, NULL, NULL, 0);
    int rc = CLI_OK;
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1) {
        rc = db_fail(r, "creating the tenant");
        PQfinish(c);
        return rc;
    }
    bool created = PQgetvalue(r, 0, 0)[0] == 't';
    char wbuf[64];
    snprintf(wbuf, sizeof wbuf, "%s", PQgetvalue(r, 0, 1));
    PQclear(r);
    if (role) {
        const char *gp[2] = {name, role};
        r = PQexecParams(c, "SELECT spool.grant_tenant_role($1, $2)", 2, NULL, gp, NULL, NULL, 0);
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            rc = db_fail(r, "giving the tenant its role");
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
    printf("%s tenant %s (weight %s)", created ? "created" : "updated", name, wbuf);
    if (role)
        printf("; database role %s sees only its rows", role);
    printf("\n");
    return CLI_OK;
}

static int tenants_list(int argc, char **argv)
{
    const char *prog = "spool tenants list";
    const char *usage = "usage: spool tenants list [--dsn DSN]\n\n"
                        "Lists tenants: weight, database role, active API keys, jobs.\n";
    const char *dsn = NULL;
    int done = dsn_only_options(argc, argv, prog, usage, &dsn);
    if (done >= 0)
        return done;
    if (optind < argc)
        return cli_usage_error(prog, "unexpected argument '%s'", argv[optind]);
    PGconn *c = connect_db(dsn);
    if (!c)
        return CLI_FAIL;
    PGresult *r = PQexec(c, "SELECT t.name, t.weight, coalesce(t.db_role::text, '-') AS role, "
                            "  (SELECT count(*) FROM spool.api_keys k WHERE k.tenant = t.name "
                            "     AND k.revoked_at IS NULL) AS keys, "
                            "  (SELECT count(*) FROM spool.jobs j WHERE j.tenant = t.name) AS jobs "
                            "FROM spool.tenants t ORDER BY t.name");
    if (PQresultStatus(r) != PGRES_TUPLES_OK) {
        int rc = db_fail(r, "listing tenants");
        PQfinish(c);
        return rc;
    }
    print_table(r);
    PQclear(r);
    PQfinish(c);
    return CLI_OK;
}

static const struct cli_cmd tenants_commands[] = {
    {"create", "create or update a tenant, optionally with a database role", tenants_create},
    {"list", "list tenants", tenants_list},
    {NULL, NULL, NULL},
};

int cmd_tenants(int argc, char **argv)
{
    return cli_dispatch("spool tenants", "Tenants: who owns jobs and keys.", tenants_commands, argc,
                        argv);
}
