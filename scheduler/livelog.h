/*
 * The live-request log: sched_livelog_record (auth.h) copies each finished
 * live request into a queue in memory; the queue is written to
 * spool.live_requests (migration 0008) in batches, one multi-row INSERT per
 * batch, on a PostgreSQL connection of its own (sp_pgconn_t), so that no
 * request ever waits for the database.
 *
 * A batch is written every flush_ms, or as soon as batch_rows records are
 * waiting, with at most batch_rows records per statement and one statement
 * at a time. While the database is away, records stay in the queue; the
 * queue holds at most capacity records, and a record arriving at a full
 * queue pushes out the oldest one (counted, and logged at most every 10 s).
 * A batch sent when the connection broke is sent again after the reconnect
 * (its outcome is unknown: if the server had committed it, its rows appear
 * twice); a batch the server refused (an error result) is dropped and
 * counted. On shutdown the queue is written out, waiting at most
 * stop_wait_ms.
 *
 * Everything runs on the scheduler's loop thread; nothing here is
 * thread-safe.
 */
#ifndef SPOOL_SCHEDULER_LIVELOG_H
#define SPOOL_SCHEDULER_LIVELOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sched;

struct sched_livelog_opts {
    const char *dsn;   /* NULL: s->cfg.dsn; copied */
    unsigned flush_ms; /* period of the flush; 0: 200 */
    unsigned
        batch_rows;    /* records per INSERT at most, and the count that flushes at once; 0: 256 */
    unsigned capacity; /* records held in memory at most; 0: 16384 */
    unsigned stop_wait_ms; /* how long shutdown waits for the last batches; 0: 3000 */
};

struct sched_livelog_stats {
    uint64_t recorded;   /* sched_livelog_record calls that queued a record */
    uint64_t written;    /* records the database has stored */
    uint64_t statements; /* INSERT statements that succeeded */
    uint64_t dropped;    /* records lost: pushed out of a full queue, refused, or left at stop */
    uint64_t failures;   /* INSERTs that failed (sent again or dropped) */
    size_t unsent;       /* records in memory, not yet stored */
    bool connected;      /* the log's database connection is up */
};

/*
 * Opens s->livelog on s->loop (opts may be NULL: defaults). Connecting
 * happens from the loop, and an unreachable database is waited for.
 * Returns 0, or SP_EINVAL (the DSN does not parse) or SP_ENOMEM.
 */
int sched_livelog_init(struct sched *s, const struct sched_livelog_opts *opts);
/*
 * Writes what is queued (within stop_wait_ms), then closes the connection
 * and the timer; s->livelog is freed and set to NULL once the libuv handles
 * have closed. Records arriving meanwhile are still taken. Idempotent.
 */
void sched_livelog_stop(struct sched *s);
/* Counters since init; zeros when there is no log. */
void sched_livelog_stats(const struct sched *s, struct sched_livelog_stats *out);

#endif
