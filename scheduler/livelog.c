/*
 * The live-request log (see livelog.h): a ring of fixed-size records in
 * memory, written to spool.live_requests as one INSERT ... SELECT FROM
 * jsonb_to_recordset($1) per batch on a connection of its own.
 */
#include "livelog.h"

#include <inttypes.h>
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <uv.h>

#include "auth.h"
#include "scheduler.h"
#include "spool/error.h"
#include "spool/log.h"
#include "spool/pg.h"

/* One statement whatever the batch size, so the server plans it once per connection. */
static const char insert_sql[] =
    "INSERT INTO spool.live_requests (at, key_id, tenant, model_id, endpoint, status, tokens_in, "
    "tokens_out, ttft_ms, latency_ms, worker_id, finish_reason) "
    "SELECT to_timestamp(r.at), r.key_id, r.tenant, r.model_id, r.endpoint, r.status, "
    "r.tokens_in, r.tokens_out, r.ttft_ms, r.latency_ms, r.worker_id, r.finish_reason "
    "FROM jsonb_to_recordset($1::jsonb) AS r(at double precision, key_id bigint, tenant text, "
    "model_id bigint, endpoint text, status smallint, tokens_in int, tokens_out int, "
    "ttft_ms double precision, latency_ms double precision, worker_id bigint, finish_reason text)";

#define WARN_EVERY_MS 10000

/* A queued record: fixed size, so that recording allocates nothing. */
struct entry {
    double at; /* Unix time, seconds */
    int64_t key_id, model_id, worker_id;
    double ttft_ms, latency_ms;
    int status;
    uint32_t tokens_in, tokens_out;
    char tenant[72];
    char endpoint[64];
    char finish_reason[32];
};

struct sched_livelog {
    struct sched *s;
    sp_pgconn_t *conn;
    uv_timer_t timer; /* the periodic flush; during stop, the deadline */
    unsigned flush_ms, batch_rows, stop_wait_ms;

    struct entry *ring; /* cap entries; count of them from head on are unsent */
    size_t cap, head, count;
    char *batch; /* JSON of the batch in flight, or to be sent again; NULL when none */
    size_t batch_n;

    bool inflight, stopping, closing;
    int open_handles; /* the timer and the connection, until their close callbacks */
    struct sched_livelog_stats st;
    uint64_t drops_unreported;
    uint64_t last_warn_ms; /* uv_now of the last warning about drops; 0: never */
};

static void copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

static json_t *id_or_null(int64_t v)
{
    return v > 0 ? json_integer(v) : json_null();
}

/* A JSON string, or null for "" and for text that is not valid UTF-8 (cut by copy_str). */
static json_t *str_or_null(const char *v)
{
    json_t *j = *v ? json_string(v) : NULL;
    return j ? j : json_null();
}

static json_t *ms_or_null(double v)
{
    return isfinite(v) && v > 0 ? json_real(v) : json_null();
}

static json_t *entry_json(const struct entry *e)
{
    json_t *endpoint = json_string(e->endpoint);
    return json_pack("{s:f, s:o, s:o, s:o, s:o, s:i, s:I, s:I, s:o, s:f, s:o, s:o}", "at", e->at,
                     "key_id", id_or_null(e->key_id), "tenant", str_or_null(e->tenant), "model_id",
                     id_or_null(e->model_id), "endpoint",
                     endpoint ? endpoint : json_string("(not UTF-8)"), "status", e->status,
                     "tokens_in", (json_int_t)e->tokens_in, "tokens_out", (json_int_t)e->tokens_out,
                     "ttft_ms", ms_or_null(e->ttft_ms), "latency_ms",
                     isfinite(e->latency_ms) ? e->latency_ms : 0.0, "worker_id",
                     id_or_null(e->worker_id), "finish_reason", str_or_null(e->finish_reason));
}

/* Takes up to batch_rows records off the ring into l->batch. Returns 0 or SP_ENOMEM. */
static int build_batch(struct sched_livelog *l)
{
    size_t n = l->count < l->batch_rows ? l->count : l->batch_rows;
    json_t *arr = json_array();
    if (!arr)
        return SP_ENOMEM;
    for (size_t i = 0; i < n; i++) {
        json_t *row = entry_json(&l->ring[(l->head + i) % l->cap]);
        if (!row || json_array_append_new(arr, row)) {
            json_decref(arr);
            return SP_ENOMEM;
        }
    }
    char *text = json_dumps(arr, JSON_COMPACT);
    json_decref(arr);
    if (!text)
        return SP_ENOMEM;
    l->batch = text;
    l->batch_n = n;
    l->head = (l->head + n) % l->cap;
    l->count -= n;
    return 0;
}

static void drop_batch(struct sched_livelog *l)
{
    free(l->batch);
    l->batch = NULL;
    l->batch_n = 0;
}

static void on_handle_closed(struct sched_livelog *l)
{
    if (--l->open_handles > 0)
        return;
    if (l->s->livelog == l)
        l->s->livelog = NULL;
    drop_batch(l);
    free(l->ring);
    free(l);
}

static void on_timer_closed(uv_handle_t *h)
{
    on_handle_closed(h->data);
}

static void on_conn_closed(void *arg)
{
    on_handle_closed(arg);
}

/* Ends the log: what is still unsent is counted as dropped. */
static void close_all(struct sched_livelog *l)
{
    if (l->closing)
        return;
    l->closing = true;
    size_t lost = l->count + l->batch_n;
    if (lost) {
        l->st.dropped += lost;
        sp_warn("live-request log: %zu records not written at shutdown (%s)", lost,
                sp_pgconn_is_up(l->conn) ? "the database did not confirm them in time"
                                         : "the database is unavailable");
    }
    uv_timer_stop(&l->timer);
    uv_close((uv_handle_t *)&l->timer, on_timer_closed);
    sp_pgconn_close(l->conn, on_conn_closed, l);
}

static void on_inserted(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg);

/* Sends the pending batch, or the next one, when the connection is up and idle. */
static void send_batch(struct sched_livelog *l)
{
    if (l->inflight || l->closing || !sp_pgconn_is_up(l->conn))
        return;
    if (!l->batch) {
        if (!l->count)
            return;
        if (build_batch(l)) {
            sp_warn("live-request log: out of memory building a batch; trying again later");
            return;
        }
    }
    const char *params[1] = {l->batch};
    int rc = sp_pgconn_query(l->conn, insert_sql, 1, params, on_inserted, l);
    if (rc) {
        sp_warn("live-request log: cannot send a batch: %s; trying again later", sp_strerror(rc));
        return;
    }
    l->inflight = true;
}

/* After a batch is settled: more to send, or (stopping) the end. */
static void next_batch(struct sched_livelog *l)
{
    if (l->stopping && !l->count && !l->batch)
        close_all(l);
    else if (l->stopping || l->count >= l->batch_rows)
        send_batch(l);
}

static void on_inserted(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    struct sched_livelog *l = arg;
    l->inflight = false;
    if (l->closing)
        return; /* closed meanwhile: the batch was counted as lost */
    if (!err) {
        l->st.written += l->batch_n;
        l->st.statements++;
        drop_batch(l);
        next_batch(l);
        return;
    }
    l->st.failures++;
    if (res) {
        /* The server refused it: sending it again would fail again. */
        sp_warn("live-request log: the database refused a batch of %zu records, dropped: %s",
                l->batch_n, err);
        l->st.dropped += l->batch_n;
        drop_batch(l);
        next_batch(l);
        return;
    }
    /* No answer (the connection broke): send it again once reconnected. */
    sp_info("live-request log: a batch of %zu records is unconfirmed (%s); it is sent again "
            "after the reconnect",
            l->batch_n, err);
}

static void on_tick(uv_timer_t *t)
{
    send_batch(t->data);
}

static void on_deadline(uv_timer_t *t)
{
    close_all(t->data);
}

static void on_up(sp_pgconn_t *conn, void *arg)
{
    (void)conn;
    struct sched_livelog *l = arg;
    if (l->st.failures || l->count)
        sp_info("live-request log: database connection up; %zu records waiting",
                l->count + l->batch_n);
    send_batch(l);
}

static void on_down(sp_pgconn_t *conn, const char *err, void *arg)
{
    (void)conn;
    struct sched_livelog *l = arg;
    sp_warn("live-request log: database connection lost (%s); records wait in memory (at most "
            "%zu)",
            err, l->cap);
}

int sched_livelog_init(struct sched *s, const struct sched_livelog_opts *opts)
{
    struct sched_livelog_opts o = opts ? *opts : (struct sched_livelog_opts){0};
    struct sched_livelog *l = calloc(1, sizeof *l);
    if (!l)
        return SP_ENOMEM;
    l->s = s;
    l->flush_ms = o.flush_ms ? o.flush_ms : 200;
    l->batch_rows = o.batch_rows ? o.batch_rows : 256;
    l->cap = o.capacity ? o.capacity : 16384;
    l->stop_wait_ms = o.stop_wait_ms ? o.stop_wait_ms : 3000;
    l->ring = malloc(l->cap * sizeof *l->ring);
    if (!l->ring) {
        free(l);
        return SP_ENOMEM;
    }
    struct sp_pgconn_opts po = {
        .backoff_cap_ms = 2000, .on_up = on_up, .on_down = on_down, .arg = l};
    int rc = sp_pgconn_open(s->loop, o.dsn ? o.dsn : s->cfg.dsn, &po, &l->conn);
    if (rc) {
        free(l->ring);
        free(l);
        return rc;
    }
    uv_timer_init(s->loop, &l->timer);
    l->timer.data = l;
    uv_timer_start(&l->timer, on_tick, l->flush_ms, l->flush_ms);
    l->open_handles = 2;
    s->livelog = l;
    return 0;
}

void sched_livelog_stop(struct sched *s)
{
    struct sched_livelog *l = s->livelog;
    if (!l || l->stopping)
        return;
    l->stopping = true;
    uv_timer_stop(&l->timer);
    if (!l->count && !l->batch) {
        close_all(l);
        return;
    }
    uv_timer_start(&l->timer, on_deadline, l->stop_wait_ms, 0);
    send_batch(l);
}

void sched_livelog_stats(const struct sched *s, struct sched_livelog_stats *out)
{
    const struct sched_livelog *l = s->livelog;
    *out = l ? l->st : (struct sched_livelog_stats){0};
    if (l) {
        out->unsent = l->count + l->batch_n;
        out->connected = !l->closing && sp_pgconn_is_up(l->conn);
    }
}

/* Logs drops at most every WARN_EVERY_MS. */
static void report_drops(struct sched_livelog *l)
{
    uint64_t now = uv_now(l->s->loop);
    if (l->last_warn_ms && now - l->last_warn_ms < WARN_EVERY_MS)
        return;
    l->last_warn_ms = now ? now : 1;
    sp_warn("live-request log: queue full (%zu records; the database is away or slow): %" PRIu64
            " oldest records dropped since the last warning, %" PRIu64 " in all",
            l->cap, l->drops_unreported, l->st.dropped);
    l->drops_unreported = 0;
}

void sched_livelog_record(struct sched *s, const struct sched_live_record *r)
{
    struct sched_livelog *l = s->livelog;
    if (!l || l->closing)
        return;
    if (l->count == l->cap) {
        l->head = (l->head + 1) % l->cap;
        l->count--;
        l->st.dropped++;
        l->drops_unreported++;
        report_drops(l);
    }
    struct entry *e = &l->ring[(l->head + l->count) % l->cap];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    e->at = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
    e->key_id = r->key_id;
    e->model_id = r->model_id;
    e->worker_id = r->worker_id;
    e->ttft_ms = r->ttft_s * 1e3;
    e->latency_ms = r->latency_s * 1e3;
    /* The table allows 0 (no response sent) and 100-599. */
    e->status = (r->status >= 100 && r->status <= 599) ? r->status : 0;
    e->tokens_in = r->tokens_in > INT32_MAX ? INT32_MAX : r->tokens_in;
    e->tokens_out = r->tokens_out > INT32_MAX ? INT32_MAX : r->tokens_out;
    copy_str(e->tenant, sizeof e->tenant, r->tenant);
    copy_str(e->endpoint, sizeof e->endpoint, r->endpoint);
    copy_str(e->finish_reason, sizeof e->finish_reason, r->finish_reason);
    l->count++;
    l->st.recorded++;
    /* A full batch goes out on the next loop turn, not inside the caller's call. */
    if (l->count >= l->batch_rows && !l->inflight && !l->stopping)
        uv_timer_start(&l->timer, on_tick, 0, l->flush_ms);
}
