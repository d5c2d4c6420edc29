/*
 * PostgreSQL connections for Spool's daemons and tools.
 *
 * Two ways to talk to the server:
 *
 * - Blocking helpers (sp_pg_connect, sp_pg_exec_ok) for tools, tests and
 *   start-up code: the caller owns the PGconn and frees it with PQfinish.
 *
 * - sp_pgconn_t, an asynchronous connection driven by a libuv loop, for the
 *   daemons. It connects without blocking the loop, runs queued queries one at
 *   a time in FIFO order, delivers LISTEN/NOTIFY, and reconnects by itself
 *   (capped exponential backoff with full jitter) when the connection breaks.
 *
 * Queue semantics of sp_pgconn_t (every query gets exactly one callback):
 *
 * - Queries are sent in the order they were queued, one at a time (the next is
 *   sent when the previous one's result has arrived). Each runs at most once.
 * - A query queued while there is no connection (before the first connect, or
 *   between a break and the reconnect) waits and is sent, in order, once the
 *   connection is back (after the LISTENs are re-issued), unless it has
 *   waited longer than opts.queue_wait_ms: then its callback gets res NULL and
 *   an error naming the server and the last connection error. The age check
 *   runs whenever a connection attempt ends or a retry timer fires, so a
 *   query may wait up to one retry delay (or one connect timeout) longer.
 * - The query being executed when the connection breaks fails: its callback
 *   gets res NULL (or the server's FATAL result, if one arrived) and an error
 *   saying the outcome is unknown; it is never re-sent, because it may have
 *   taken effect.
 * - sp_pgconn_close fails every query still queued or running (res NULL).
 *
 * Loop and thread rules: an sp_pgconn_t belongs to one uv_loop_t. Every
 * function here that takes an sp_pgconn_t, and every callback, runs on that
 * loop's thread; none of them is thread-safe. Callbacks are never called from
 * inside sp_pgconn_open, sp_pgconn_query, sp_pgconn_listen or sp_pgconn_close;
 * they come from the loop. A callback may call sp_pgconn_query,
 * sp_pgconn_listen and sp_pgconn_close on its own connection.
 *
 * Host names are resolved by libpq synchronously: give unix socket
 * directories or hostaddr= to keep the loop from waiting on DNS. Over TCP, a
 * peer that vanished without closing is noticed only through a failing query
 * or libpq's keepalives_* options: put those in the DSN.
 */
#ifndef SPOOL_PG_H
#define SPOOL_PG_H

#include <stdbool.h>
#include <stddef.h>

#include <libpq-fe.h>
#include <uv.h>

#include "spool/backoff.h"

/* ---- Blocking helpers ---------------------------------------------------- */

/*
 * Connects to dsn, retrying with backoff (50 ms doubling to 2 s, full jitter)
 * until connected or timeout_ms has passed; timeout_ms 0 makes one attempt,
 * a negative timeout_ms retries forever. One attempt never outlasts the time
 * left (or 10 s when there is no deadline). Every failure is retried (the
 * server may be starting, the database may be about to be created) except a
 * DSN that does not parse. Notices go to sp_log instead of stderr.
 *
 * Returns 0 and *out (the caller frees it with PQfinish), or SP_EINVAL (bad
 * DSN), SP_ETIMEDOUT (no connection in time) or SP_EDB (the single attempt of
 * timeout_ms 0 failed), with *out NULL and err (may be NULL) holding a message
 * that names the DSN's host, port, dbname and user (never the password), the
 * number of attempts and the last server message.
 */
int sp_pg_connect(const char *dsn, int timeout_ms, PGconn **out, char *err, size_t errcap);

/*
 * Runs sql (one or more statements, no parameters) and discards the result.
 * Returns 0 when it succeeded, SP_EDB with err holding the server's message
 * and SQLSTATE, or SP_ECLOSED when the connection is broken.
 */
int sp_pg_exec_ok(PGconn *conn, const char *sql, char *err, size_t errcap);

/* Sends conn's notices to sp_log (warnings at warn, the rest at debug) instead of stderr. */
void sp_pg_log_notices(PGconn *conn);

/*
 * Writes a one-line description of a failed result into buf: the primary
 * message and "(SQLSTATE xxxxx)"; for res NULL, the connection's message.
 * Returns buf.
 */
char *sp_pg_result_error(const PGconn *conn, const PGresult *res, char *buf, size_t cap);

/*
 * Writes "host=... port=... dbname=... user=..." for dsn into buf (only the
 * keys it sets; never the password), for log and error messages. Returns 0,
 * or SP_EINVAL with "(unparsable DSN)" in buf.
 */
int sp_pg_dsn_describe(const char *dsn, char *buf, size_t cap);

/* ---- Asynchronous connection in a libuv loop ----------------------------- */

typedef struct sp_pgconn sp_pgconn_t;

/*
 * Gets a query's outcome, exactly once per query. err is NULL when the query
 * succeeded (res has status PGRES_COMMAND_OK or PGRES_TUPLES_OK); otherwise err
 * is a one-line message, and res is the server's error result or NULL when no
 * result arrived (connection lost, query waited too long, connection closed).
 * res and err belong to the helper and are valid only during the callback
 * (res is PQclear'ed after it returns).
 */
typedef void (*sp_pgconn_result_cb)(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg);

struct sp_pgconn_opts {
    unsigned backoff_base_ms;    /* bound of the first retry delay; 0: 100 */
    unsigned backoff_cap_ms;     /* bound of every retry delay; 0: 5000 */
    unsigned connect_timeout_ms; /* one connection attempt; 0: 10000 */
    unsigned queue_wait_ms;      /* how long a query may wait for a connection; 0: 30000 */

    /* Called each time the connection is ready: connected, LISTENs re-issued. */
    void (*on_up)(sp_pgconn_t *conn, void *arg);
    /*
     * Called each time a ready connection is lost (not for failed attempts
     * to connect, and not on sp_pgconn_close); err says why. Reconnecting has
     * already been scheduled.
     */
    void (*on_down)(sp_pgconn_t *conn, const char *err, void *arg);
    /* A NOTIFY on a LISTENed channel; payload is "" when none was given. */
    void (*on_notify)(sp_pgconn_t *conn, const char *channel, const char *payload, void *arg);
    void *arg; /* passed to the three callbacks above */
};

/*
 * Creates a connection on loop and starts connecting from the loop (the first
 * attempt begins at once when the loop runs). opts may be NULL (defaults, no
 * callbacks); it is copied. It keeps trying until sp_pgconn_close.
 * Returns 0 and *out, or SP_EINVAL (dsn does not parse) or SP_ENOMEM.
 */
int sp_pgconn_open(uv_loop_t *loop, const char *dsn, const struct sp_pgconn_opts *opts,
                   sp_pgconn_t **out);

/*
 * Queues sql with nparams text parameters (params[i] NULL is SQL NULL; params
 * may be NULL when nparams is 0); sql must be one statement. sql and params
 * are copied. cb (may be NULL) gets the outcome later, from the loop, exactly
 * once. Not for COPY.
 * Returns 0, or SP_EINVAL (sql NULL, nparams out of range), SP_ECLOSED (after
 * sp_pgconn_close) or SP_ENOMEM; then cb is never called.
 */
int sp_pgconn_query(sp_pgconn_t *conn, const char *sql, int nparams, const char *const *params,
                    sp_pgconn_result_cb cb, void *arg);

/*
 * LISTENs on channel (any name up to 63 bytes; quoted, so case and spaces are
 * kept) from now on, and again after every reconnect. When connected, the
 * LISTEN is queued like a query, so a query queued after it runs after it.
 * Listening twice on a channel is the same as once.
 * Returns 0, or SP_EINVAL (empty or too long), SP_ECLOSED or SP_ENOMEM.
 */
int sp_pgconn_listen(sp_pgconn_t *conn, const char *channel);

/* True while the connection is ready (between on_up and on_down). */
bool sp_pgconn_is_up(const sp_pgconn_t *conn);

/* The last connection error ("" when none); valid until the next loop callback. */
const char *sp_pgconn_last_error(const sp_pgconn_t *conn);

/*
 * Closes the connection: the server connection ends now, and after the
 * libuv handles have closed, every query still queued or running gets its
 * callback (res NULL, "connection closed"), then close_cb (may be NULL) is
 * called, then conn is freed. conn must not be used after this call except by
 * those callbacks (where sp_pgconn_query returns SP_ECLOSED). Calling it again
 * before close_cb ran does nothing.
 */
void sp_pgconn_close(sp_pgconn_t *conn, void (*close_cb)(void *arg), void *arg);

#endif
