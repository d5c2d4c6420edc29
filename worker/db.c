/*
 * The worker's PostgreSQL connection, run by a thread of its own.
 *
 * Operations (a statement, its copied parameters, a callback) go into a FIFO
 * under a mutex; the database thread takes them one at a time, runs each with
 * blocking libpq on its connection and hands it back: a synchronous one by
 * marking it done (its caller waits on a condition variable), an
 * asynchronous one through a done list and a uv_async_t, whose callback on
 * the loop thread runs the operation's callback. One thread and one FIFO
 * keep statements in submission order, so a shard's writes reach the server
 * in the order they were made.
 */
#include "worker.h"

#include "spool/error.h"
#include "spool/log.h"
#include "spool/pg.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct wk_db_op {
    const char *sql; /* a string constant */
    int n;
    char **params; /* owned copies (async), or the caller's (sync) */
    bool owned;
    wk_db_cb cb;
    void *arg;
    bool sync, done;
    /* Filled by the database thread. */
    int rc;
    PGresult *res;
    bool conn_ok;
    char err[512];
    struct wk_db_op *next;
};

struct wk_db {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work;                    /* queue non-empty or quit */
    pthread_cond_t done;                    /* an operation finished */
    struct wk_db_op *head, *tail;           /* to run */
    struct wk_db_op *done_head, *done_tail; /* asynchronous ones run, callbacks due */
    bool quit, closed, busy;
    uv_async_t async;
    int n_out; /* asynchronous operations submitted whose callback has not run (loop thread) */
};

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

/* Runs op on conn (the database thread, or the caller before the thread starts). */
static void exec_op(PGconn *conn, struct wk_db_op *op)
{
    op->res = NULL;
    op->conn_ok = true;
    op->rc = SP_EDB;
    for (int attempt = 0; attempt < 2; attempt++) {
        PGresult *r = PQexecParams(conn, op->sql, op->n, NULL, (const char *const *)op->params,
                                   NULL, NULL, 0);
        ExecStatusType st = PQresultStatus(r);
        if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) {
            op->res = r;
            op->rc = 0;
            return;
        }
        char buf[512];
        sp_pg_result_error(conn, r, buf, sizeof(buf));
        snprintf(op->err, sizeof(op->err), "%s", buf);
        bool lost = r && lease_lost(r);
        PQclear(r);
        if (lost) {
            op->rc = SP_ESTATE;
            return;
        }
        if (PQstatus(conn) == CONNECTION_OK)
            return;
        sp_warn("database connection lost (%s); reconnecting", buf);
        PQreset(conn);
        if (PQstatus(conn) != CONNECTION_OK) {
            snprintf(op->err, sizeof(op->err), "database unreachable: %s", PQerrorMessage(conn));
            op->conn_ok = false;
            return;
        }
    }
}

static void *db_main(void *arg)
{
    struct worker *w = arg;
    struct wk_db *d = w->dbt;
    pthread_mutex_lock(&d->mu);
    for (;;) {
        while (!d->head && !d->quit)
            pthread_cond_wait(&d->work, &d->mu);
        if (!d->head)
            break; /* quit with nothing left to run */
        struct wk_db_op *op = d->head;
        d->head = op->next;
        if (!d->head)
            d->tail = NULL;
        op->next = NULL;
        d->busy = true;
        pthread_mutex_unlock(&d->mu);
        exec_op(w->db, op);
        pthread_mutex_lock(&d->mu);
        d->busy = false;
        if (op->sync) {
            op->done = true;
        } else {
            if (d->done_tail)
                d->done_tail->next = op;
            else
                d->done_head = op;
            d->done_tail = op;
            if (!d->closed)
                uv_async_send(&d->async);
        }
        pthread_cond_broadcast(&d->done);
    }
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

static void op_free(struct wk_db_op *op)
{
    if (op->owned && op->params) {
        for (int i = 0; i < op->n; i++)
            free(op->params[i]);
        free(op->params);
    }
    PQclear(op->res);
    free(op);
}

/* Runs the callbacks of finished asynchronous operations (loop thread, or after it). */
static void run_done(struct worker *w)
{
    struct wk_db *d = w->dbt;
    pthread_mutex_lock(&d->mu);
    struct wk_db_op *list = d->done_head;
    d->done_head = d->done_tail = NULL;
    pthread_mutex_unlock(&d->mu);
    while (list) {
        struct wk_db_op *op = list;
        list = op->next;
        d->n_out--;
        op->cb(w, op->rc, op->rc ? NULL : op->res, op->conn_ok, op->err, op->arg);
        op_free(op);
    }
}

static void on_async(uv_async_t *h)
{
    run_done(h->data);
}

int wk_db_start(struct worker *w)
{
    struct wk_db *d = calloc(1, sizeof(*d));
    if (!d)
        return SP_ENOMEM;
    pthread_mutex_init(&d->mu, NULL);
    pthread_cond_init(&d->work, NULL);
    pthread_cond_init(&d->done, NULL);
    uv_async_init(w->loop, &d->async, on_async);
    d->async.data = w;
    w->dbt = d;
    if (pthread_create(&d->thread, NULL, db_main, w) != 0) {
        uv_close((uv_handle_t *)&d->async, NULL);
        w->dbt = NULL;
        sp_error("cannot start the database thread");
        return SP_ENOMEM; /* d stays allocated: its handle closes with the loop */
    }
    return 0;
}

void wk_db_close(struct worker *w)
{
    struct wk_db *d = w->dbt;
    if (!d || d->closed)
        return;
    pthread_mutex_lock(&d->mu);
    d->closed = true;
    pthread_mutex_unlock(&d->mu);
    uv_close((uv_handle_t *)&d->async, NULL);
}

void wk_db_stop(struct worker *w)
{
    struct wk_db *d = w->dbt;
    if (d) {
        pthread_mutex_lock(&d->mu);
        d->quit = true;
        d->closed = true;
        pthread_cond_signal(&d->work);
        pthread_mutex_unlock(&d->mu);
        pthread_join(d->thread, NULL);
        run_done(w);
        pthread_mutex_destroy(&d->mu);
        pthread_cond_destroy(&d->work);
        pthread_cond_destroy(&d->done);
        free(d);
        w->dbt = NULL;
    }
    PQfinish(w->db);
    w->db = NULL;
}

static void enqueue(struct wk_db *d, struct wk_db_op *op)
{
    pthread_mutex_lock(&d->mu);
    if (d->tail)
        d->tail->next = op;
    else
        d->head = op;
    d->tail = op;
    pthread_cond_signal(&d->work);
    pthread_mutex_unlock(&d->mu);
}

int wk_db_call(struct worker *w, const char *sql, int n, const char *const *params, PGresult **res,
               char *err, size_t errcap)
{
    struct wk_db_op op = {.sql = sql, .n = n, .params = (char **)params, .sync = true};
    if (res)
        *res = NULL;
    struct wk_db *d = w->dbt;
    if (!d) {
        exec_op(w->db, &op); /* before the thread starts: the caller's thread owns w->db */
    } else {
        enqueue(d, &op);
        pthread_mutex_lock(&d->mu);
        while (!op.done)
            pthread_cond_wait(&d->done, &d->mu);
        pthread_mutex_unlock(&d->mu);
    }
    if (op.rc) {
        snprintf(err, errcap, "%s", op.err);
        return op.rc;
    }
    if (res)
        *res = op.res;
    else
        PQclear(op.res);
    return 0;
}

int wk_db_submit(struct worker *w, const char *sql, int n, const char *const *params, wk_db_cb cb,
                 void *arg)
{
    struct wk_db *d = w->dbt;
    struct wk_db_op *op = calloc(1, sizeof(*op));
    if (!op || !d)
        goto oom;
    op->sql = sql;
    op->n = n;
    op->owned = true;
    op->cb = cb;
    op->arg = arg;
    op->params = calloc((size_t)(n > 0 ? n : 1), sizeof(char *));
    if (!op->params)
        goto oom;
    for (int i = 0; i < n; i++)
        if (params[i] && !(op->params[i] = strdup(params[i])))
            goto oom;
    d->n_out++;
    enqueue(d, op);
    return 0;
oom:
    if (op)
        op_free(op);
    return SP_ENOMEM;
}

void wk_db_settle(struct worker *w)
{
    struct wk_db *d = w->dbt;
    if (!d)
        return;
    while (d->n_out > 0) {
        pthread_mutex_lock(&d->mu);
        while (!d->done_head)
            pthread_cond_wait(&d->done, &d->mu);
        pthread_mutex_unlock(&d->mu);
        run_done(w); /* callbacks may submit more: the loop waits for those too */
    }
}
