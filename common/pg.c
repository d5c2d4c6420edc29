/* Blocking PostgreSQL helpers: connect with retry, exec, error and DSN descriptions. */
#include "spool/pg.h"
#include "spool/error.h"
#include "spool/log.h"
#include "pg_internal.h"

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* The bound of one attempt when the caller's timeout does not give one. */
#define SP_PG_ATTEMPT_MS 10000

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void sleep_ms(unsigned ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

void sp__pg_one_line(char *buf, size_t cap, const char *msg)
{
    size_t n = 0;
    if (!cap)
        return;
    for (const char *p = msg ? msg : ""; *p && n + 1 < cap; p++) {
        if (*p == '\n') {
            while (p[1] == '\n' || p[1] == '\t' || p[1] == ' ')
                p++;
            if (p[1] && n + 2 < cap) {
                buf[n++] = ';';
                buf[n++] = ' ';
            }
            continue;
        }
        buf[n++] = *p == '\t' ? ' ' : *p;
    }
    while (n > 0 && (buf[n - 1] == ' ' || buf[n - 1] == ';'))
        n--;
    buf[n] = '\0';
}

static void log_notice(void *arg, const PGresult *res)
{
    (void)arg;
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    char msg[1024];
    sp__pg_one_line(msg, sizeof msg, PQresultErrorMessage(res));
    if (sev && (!strcmp(sev, "WARNING") || !strcmp(sev, "FATAL") || !strcmp(sev, "PANIC")))
        sp_warn("postgres: %s", msg);
    else
        sp_debug("postgres: %s", msg);
}

void sp_pg_log_notices(PGconn *conn)
{
    if (conn)
        PQsetNoticeReceiver(conn, log_notice, NULL);
}

int sp_pg_dsn_describe(const char *dsn, char *buf, size_t cap)
{
    char *perr = NULL;
    PQconninfoOption *opts = dsn ? PQconninfoParse(dsn, &perr) : NULL;
    if (!opts) {
        PQfreemem(perr);
        snprintf(buf, cap, "(unparsable DSN)");
        return SP_EINVAL;
    }
    static const char *const keys[] = {"host", "hostaddr", "port", "dbname", "user"};
    size_t n = 0;
    buf[0] = '\0';
    for (size_t k = 0; k < sizeof keys / sizeof keys[0]; k++)
        for (PQconninfoOption *o = opts; o->keyword; o++)
            if (!strcmp(o->keyword, keys[k]) && o->val && *o->val && n < cap)
                n +=
                    (size_t)snprintf(buf + n, cap - n, "%s%s=%s", n ? " " : "", o->keyword, o->val);
    if (!buf[0])
        snprintf(buf, cap, "(libpq defaults)");
    PQconninfoFree(opts);
    return 0;
}

char *sp_pg_result_error(const PGconn *conn, const PGresult *res, char *buf, size_t cap)
{
    const char *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    if (primary) {
        const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        char line[1024];
        sp__pg_one_line(line, sizeof line, primary);
        snprintf(buf, cap, "%s: %s (SQLSTATE %s)", sev ? sev : "ERROR", line, state ? state : "?");
    } else if (res && *PQresultErrorMessage(res)) {
        sp__pg_one_line(buf, cap, PQresultErrorMessage(res));
    } else if (res && PQresultStatus(res) != PGRES_FATAL_ERROR) {
        snprintf(buf, cap, "unexpected result status %s", PQresStatus(PQresultStatus(res)));
    } else if (conn && *PQerrorMessage(conn)) {
        sp__pg_one_line(buf, cap, PQerrorMessage(conn));
    } else {
        snprintf(buf, cap, "unknown PostgreSQL error");
    }
    return buf;
}

int sp_pg_exec_ok(PGconn *conn, const char *sql, char *err, size_t errcap)
{
    PGresult *r = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(r);
    if (r && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)) {
        PQclear(r);
        return 0;
    }
    if (err && errcap)
        sp_pg_result_error(conn, r, err, errcap);
    PQclear(r);
    return PQstatus(conn) == CONNECTION_BAD ? SP_ECLOSED : SP_EDB;
}

/*
 * One connection attempt bounded by limit_ms, driven by
 * PQconnectPoll and poll(2) so that a server that accepts but never answers
 * cannot hold us past the deadline. Returns the connection or NULL with msg.
 */
static PGconn *attempt(const char *dsn, int limit_ms, char *msg, size_t cap)
{
    PGconn *c = PQconnectStart(dsn);
    if (!c) {
        snprintf(msg, cap, "out of memory");
        return NULL;
    }
    sp_pg_log_notices(c);
    uint64_t end = now_ms() + (uint64_t)limit_ms;
    /* libpq's rule: before the first PQconnectPoll, wait as if it returned WRITING. */
    PostgresPollingStatusType st = PGRES_POLLING_WRITING;
    while (PQstatus(c) != CONNECTION_BAD && st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
        struct pollfd pfd = {.fd = PQsocket(c),
                             .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT};
        if (pfd.fd < 0)
            break;
        uint64_t now = now_ms();
        int wait = now >= end ? 0 : (int)(end - now);
        int n = poll(&pfd, 1, wait);
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0) {
            snprintf(msg, cap, "no answer within %d ms", limit_ms);
            PQfinish(c);
            return NULL;
        }
        st = PQconnectPoll(c);
    }
    if (PQstatus(c) == CONNECTION_OK)
        return c;
    sp__pg_one_line(msg, cap, PQerrorMessage(c));
    PQfinish(c);
    return NULL;
}

int sp_pg_connect(const char *dsn, int timeout_ms, PGconn **out, char *err, size_t errcap)
{
    char tmp[8];
    if (!err || !errcap)
        err = tmp, errcap = sizeof tmp;
    *out = NULL;
    char *perr = NULL;
    PQconninfoOption *parsed = dsn ? PQconninfoParse(dsn, &perr) : NULL;
    if (!parsed) {
        char why[256];
        sp__pg_one_line(why, sizeof why, perr ? perr : "no connection string");
        PQfreemem(perr);
        snprintf(err, errcap, "invalid PostgreSQL connection string: %s", why);
        return SP_EINVAL;
    }
    PQconninfoFree(parsed);
    char where[256];
    sp_pg_dsn_describe(dsn, where, sizeof where);

    struct sp_backoff b;
    sp_backoff_init(&b, 50, 2000, now_ms() ^ ((uint64_t)getpid() << 32));
    uint64_t start = now_ms();
    uint64_t deadline = start + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0);
    char last[512] = "";
    int attempts = 0;
    for (;;) {
        attempts++;
        /* The last attempt may run a little past the deadline rather than not at all. */
        int limit = SP_PG_ATTEMPT_MS;
        if (timeout_ms > 0) {
            uint64_t now = now_ms();
            limit = now + 100 >= deadline ? 100 : (int)(deadline - now);
        }
        PGconn *c = attempt(dsn, limit, last, sizeof last);
        if (c) {
            if (attempts > 1)
                sp_info("connected to PostgreSQL (%s) after %d attempts", where, attempts);
            *out = c;
            return 0;
        }
        if (attempts == 1 && timeout_ms != 0)
            sp_debug("cannot connect to PostgreSQL (%s) yet: %s; retrying", where, last);
        uint64_t now = now_ms();
        if (timeout_ms >= 0 && now >= deadline)
            break;
        unsigned delay = sp_backoff_next(&b);
        if (timeout_ms >= 0 && now + delay > deadline)
            delay = (unsigned)(deadline - now);
        sleep_ms(delay);
    }
    snprintf(err, errcap, "cannot connect to PostgreSQL (%s) after %d attempt%s in %llu ms: %s",
             where, attempts, attempts == 1 ? "" : "s", (unsigned long long)(now_ms() - start),
             last);
    return timeout_ms == 0 ? SP_EDB : SP_ETIMEDOUT;
}
