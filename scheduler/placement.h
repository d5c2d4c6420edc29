/*
 * Placement: which pending shard goes to which worker. A pure function over
 * a snapshot (no I/O), so that the policy can be tested on its own; the
 * caller (scheduler/sweep.c) takes the snapshot from PostgreSQL and leases
 * what this returns.
 *
 * Policy, in order:
 *
 * 1. Priority classes: every shard of a higher job priority is considered
 *    before any shard of a lower one.
 * 2. Within a class, weighted fair share between tenants: the next shard
 *    comes from the tenant with the smallest (requests leased / weight),
 *    counting what this round has already placed (ties: the tenant whose
 *    next shard comes first in the input order). Within a tenant, the input
 *    order: earlier deadline first (none last), older job, shard order.
 * 3. Capacity: a worker takes work while its leased requests are below its
 *    target, fill x max_batch, so that its engine batch stays full while
 *    shards start and finish. max_batch (from REGISTER), not the
 *    heartbeat's free_slots: free_slots falls to 0 exactly when the batch
 *    is full of work we leased, and says nothing about what to lease next; the shard that crosses
 * the target is still given (a worker with room always gets at least one shard). Draining workers
 * take nothing, nor (decided by the caller, sweep.c) workers that missed three heartbeats.
 * 4. The worker for a shard: one with the job's pinned model (by digest)
 *    loaded, else any; among those, the least loaded relative to its target;
 *    then the earlier one in the input.
 *
 * Placement stops when no worker has room left.
 */
#ifndef SPOOL_SCHED_PLACEMENT_H
#define SPOOL_SCHED_PLACEMENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct place_worker {
    int64_t load;               /* requests leased now; placement adds to it */
    int64_t target;             /* fill x max_batch, at least 1 */
    bool accepting;             /* false while draining */
    const char *const *digests; /* models loaded ("sha256:<hex>"), n_digests of them */
    size_t n_digests;
};

struct place_shard {
    int n_requests;
    int priority;
    const char *tenant;
    double tenant_weight;  /* > 0 */
    int64_t tenant_leased; /* requests the tenant has leased now */
    const char *digest;    /* the job's pinned model, "sha256:<hex>" */
};

/* One decision: shards[shard] goes to workers[worker]. */
struct place_assignment {
    size_t shard;
    size_t worker;
};

/*
 * Places shards (n_shards, sorted by priority descending, then deadline, job
 * and shard: the order of spool.placement_candidates) on workers. Writes at
 * most n_shards assignments to out (caller-allocated, n_shards entries) in
 * the order they were decided, and adds each placed shard's requests to its
 * worker's load. Returns the number of assignments, or SP_ENOMEM.
 */
int sched_place(struct place_worker *workers, size_t n_workers, const struct place_shard *shards,
                size_t n_shards, struct place_assignment *out);

#endif
