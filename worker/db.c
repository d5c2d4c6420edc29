/* The worker's PostgreSQL connection: blocking libpq on the loop thread. */
#include "worker.h"

#include "spool/error.h"
#include "spool/log.h"
#include "spool/pg.h"

#include <stdio.h>
#include <string.h>

int wk_db_connect(struct worker *w, char *err, size_t errcap)
{
    /* Retry for a while: the server may be restarting. */
    return sp_pg_connect(w->cfg.dsn, 30000, &w->db, err, errcap);
}

/* True when res is check_lease's refusal (SQLSTATE 55P03, "lease lost"). */
static bool lease_lost(const PGresult *res)
{
    const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    const char *msg = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    return st && strcmp(st, "55P03") == 0 && msg && strstr(msg, "lease lost");
}

int wk_db_call(struct worker *w, const char *sql, int n, const char *const *params, PGresult **res,
               char *err, size_t errcap)
{
    if (res)
        *res = NULL;
    for (int attempt = 0; attempt < 2; attempt++) {
        PGresult *r = PQexecParams(w->db, sql, n, NULL, params, NULL, NULL, 0);
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
            if (res)
                *res = r;
            else
                PQclear(r);
            return 0;
        }
        char buf[512];
        sp_pg_result_error(w->db, r, buf, sizeof(buf));
        snprintf(err, errcap, "%s", buf);
        bool lost = r && lease_lost(r);
        PQclear(r);
        if (lost)
            return SP_ESTATE;
        if (PQstatus(w->db) == CONNECTION_OK)
            return SP_EDB;
        sp_warn("database connection lost (%s); reconnecting", buf);
        PQreset(w->db);
        if (PQstatus(w->db) != CONNECTION_OK) {
            snprintf(err, errcap, "database unreachable: %s", PQerrorMessage(w->db));
            return SP_EDB;
        }
    }
    return SP_EDB;
}
