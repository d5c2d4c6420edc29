#include "spool/migrate.h"
#include "spool/error.h"
#include "spool/log.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

/* An arbitrary fixed key for pg_advisory_lock: "spool-migrate". */
#define MIGRATE_LOCK_KEY "7305813927361109"

void sp_sha256_hex(const void *data, size_t len, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned mdlen = 0;
    EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL);
    for (unsigned i = 0; i < mdlen && i < 32; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    hex[64] = '\0';
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp(((const struct sp_migration *)a)->name, ((const struct sp_migration *)b)->name);
}

void sp_migrations_free(struct sp_migration *m, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free((char *)m[i].name);
        free((char *)m[i].sql);
    }
    free(m);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n + 4096 + 1 > cap) {
            cap = cap ? cap * 2 : 8192;
            char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

int sp_migrations_load_dir(const char *dir, struct sp_migration **out, size_t *n, char *err,
                           size_t errcap)
{
    DIR *d = opendir(dir);
    if (!d) {
        snprintf(err, errcap, "cannot open migrations directory %s: %s", dir, strerror(errno));
        return SP_EIO;
    }
    struct sp_migration *m = NULL;
    size_t count = 0, cap = 0;
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d))) {
        size_t nl = strlen(e->d_name);
        if (nl < 5 || strcmp(e->d_name + nl - 4, ".sql") != 0)
            continue;
        if (count == cap) {
            cap = cap ? cap * 2 : 16;
            struct sp_migration *nm = realloc(m, cap * sizeof *m);
            if (!nm) {
                rc = SP_ENOMEM;
                break;
            }
            m = nm;
        }
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        size_t len = 0;
        char *sql = read_file(path, &len);
        if (!sql) {
            snprintf(err, errcap, "cannot read %s: %s", path, strerror(errno));
            rc = SP_EIO;
            break;
        }
        m[count].name = strdup(e->d_name);
        m[count].sql = sql;
        m[count].len = len;
        count++;
    }
    closedir(d);
    if (rc) {
        sp_migrations_free(m, count);
        return rc;
    }
    if (count)
        qsort(m, count, sizeof *m, cmp_name);
    *out = m;
    *n = count;
    return 0;
}

/* Runs sql; returns 0 or SP_EDB with the server's message in err. */
static int exec(PGconn *conn, const char *sql, const char *what, char *err, size_t errcap)
{
    PGresult *r = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(r);
    int rc = 0;
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
        const char *line = PQresultErrorField(r, PG_DIAG_STATEMENT_POSITION);
        snprintf(err, errcap, "%s: %s%s%s", what, PQresultErrorMessage(r),
                 line ? "at character position " : "", line ? line : "");
        rc = SP_EDB;
    }
    PQclear(r);
    return rc;
}

int sp_migrate(PGconn *conn, const struct sp_migration *m, size_t n, int *applied, char *err,
               size_t errcap)
{
    int rc, count = 0;
    if (applied)
        *applied = 0;
    if ((rc = exec(conn, "SELECT pg_advisory_lock(" MIGRATE_LOCK_KEY ")",
                   "taking the migration lock", err, errcap)))
        return rc;
    rc = exec(conn,
              "SET client_min_messages = warning;"
              "CREATE SCHEMA IF NOT EXISTS spool;"
              "CREATE TABLE IF NOT EXISTS spool.schema_migrations ("
              "  name text PRIMARY KEY,"
              "  checksum text NOT NULL,"
              "  applied_at timestamptz NOT NULL DEFAULT now(),"
              "  applied_by text NOT NULL DEFAULT current_user)",
              "creating spool.schema_migrations", err, errcap);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        char sum[65];
        sp_sha256_hex(m[i].sql, m[i].len, sum);
        const char *params[2] = {m[i].name, sum};
        PGresult *r =
            PQexecParams(conn, "SELECT checksum FROM spool.schema_migrations WHERE name = $1", 1,
                         NULL, params, NULL, NULL, 0);
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            snprintf(err, errcap, "reading spool.schema_migrations: %s", PQerrorMessage(conn));
            rc = SP_EDB;
        } else if (PQntuples(r) == 1) {
            if (strcmp(PQgetvalue(r, 0, 0), sum) != 0) {
                snprintf(err, errcap,
                         "migration %s was changed after it was applied (recorded sha256 %s, "
                         "file now %s); add a new migration instead of editing an applied one",
                         m[i].name, PQgetvalue(r, 0, 0), sum);
                rc = SP_ECHECKSUM;
            }
            PQclear(r);
            continue;
        }
        PQclear(r);
        if (rc)
            break;

        char what[300];
        snprintf(what, sizeof what, "migration %s failed", m[i].name);
        char *sql = malloc(m[i].len + 1);
        if (!sql) {
            rc = SP_ENOMEM;
            break;
        }
        memcpy(sql, m[i].sql, m[i].len);
        sql[m[i].len] = '\0';
        if ((rc = exec(conn, "BEGIN", what, err, errcap)) == 0 &&
            (rc = exec(conn, sql, what, err, errcap)) == 0) {
            r = PQexecParams(conn,
                             "INSERT INTO spool.schema_migrations (name, checksum) VALUES ($1, $2)",
                             2, NULL, params, NULL, NULL, 0);
            if (PQresultStatus(r) != PGRES_COMMAND_OK) {
                snprintf(err, errcap, "%s: recording it: %s", what, PQerrorMessage(conn));
                rc = SP_EDB;
            }
            PQclear(r);
        }
        free(sql);
        if (rc == 0 && (rc = exec(conn, "COMMIT", what, err, errcap)) == 0) {
            count++;
            sp_info("applied migration %s", m[i].name);
        } else {
            PQclear(PQexec(conn, "ROLLBACK"));
        }
    }
    char unlock_err[256];
    exec(conn, "SELECT pg_advisory_unlock(" MIGRATE_LOCK_KEY ")", "releasing the migration lock",
         unlock_err, sizeof unlock_err);
    if (applied)
        *applied = count;
    return rc;
}
