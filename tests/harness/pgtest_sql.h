/*
 * SQL helpers for cmocka tests on a pgtest cluster: include after
 * <cmocka.h>. A failing statement fails the current test (fail_msg) with the
 * statement and the server's message, so that the other tests still run.
 */
#ifndef SPOOL_PGTEST_SQL_H
#define SPOOL_PGTEST_SQL_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include <libpq-fe.h>

/* Runs a printf-formatted statement (or several) and discards the result. */
static inline void pgt_ok(PGconn *conn, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static inline void pgt_ok(PGconn *conn, const char *fmt, ...)
{
    char sql[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    PGresult *r = PQexec(conn, sql);
    if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
}

/* The first column of the first row of a printf-formatted query as a number; -1 when NULL or no
 * row. */
static inline long long pgt_num(PGconn *conn, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static inline long long pgt_num(PGconn *conn, const char *fmt, ...)
{
    char sql[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(sql, sizeof sql, fmt, ap);
    va_end(ap);
    PGresult *r = PQexec(conn, sql);
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    long long v =
        PQntuples(r) && !PQgetisnull(r, 0, 0) ? strtoll(PQgetvalue(r, 0, 0), NULL, 10) : -1;
    PQclear(r);
    return v;
}

#endif
