/* The placement policy; see placement.h for the rules. */
#include "placement.h"

#include <stdlib.h>
#include <string.h>

#include "spool/error.h"

struct tenant {
    const char *name;
    double weight;
    int64_t leased; /* including this round's placements */
};

static bool has_room(const struct place_worker *w)
{
    return w->accepting && w->load < w->target;
}

static bool has_model(const struct place_worker *w, const char *digest)
{
    for (size_t i = 0; i < w->n_digests; i++)
        if (w->digests[i] && digest && strcmp(w->digests[i], digest) == 0)
            return true;
    return false;
}

/* Is a's load fraction smaller than b's? Cross-multiplied to stay in integers. */
static bool less_loaded(const struct place_worker *a, const struct place_worker *b)
{
    return (__int128)a->load * b->target < (__int128)b->load * a->target;
}

/* The worker for a shard of model digest, or n_workers when none has room. */
static size_t pick_worker(const struct place_worker *w, size_t n, const char *digest)
{
    size_t best = n;
    bool best_has = false;
    for (size_t i = 0; i < n; i++) {
        if (!has_room(&w[i]))
            continue;
        bool h = has_model(&w[i], digest);
        if (best == n || (h && !best_has) || (h == best_has && less_loaded(&w[i], &w[best]))) {
            best = i;
            best_has = h;
        }
    }
    return best;
}

int sched_place(struct place_worker *workers, size_t n_workers, const struct place_shard *shards,
                size_t n_shards, struct place_assignment *out)
{
    if (n_shards == 0 || n_workers == 0)
        return 0;
    struct tenant *tenants = calloc(n_shards, sizeof *tenants);
    size_t *tenant_of = calloc(n_shards, sizeof *tenant_of); /* shard -> tenant index */
    size_t *cursor = calloc(n_shards, sizeof *cursor);       /* tenant -> next shard */
    if (!tenants || !tenant_of || !cursor) {
        free(tenants);
        free(tenant_of);
        free(cursor);
        return SP_ENOMEM;
    }
    size_t n_tenants = 0;
    for (size_t i = 0; i < n_shards; i++) {
        size_t t = 0;
        while (t < n_tenants && strcmp(tenants[t].name, shards[i].tenant) != 0)
            t++;
        if (t == n_tenants) {
            tenants[t] = (struct tenant){shards[i].tenant,
                                         shards[i].tenant_weight > 0 ? shards[i].tenant_weight : 1,
                                         shards[i].tenant_leased};
            n_tenants++;
        }
        tenant_of[i] = t;
    }

    int n_out = 0;
    size_t class_start = 0;
    while (class_start < n_shards) {
        size_t class_end = class_start;
        while (class_end < n_shards && shards[class_end].priority == shards[class_start].priority)
            class_end++;
        /* Each tenant's cursor starts at its first shard in this class. */
        for (size_t t = 0; t < n_tenants; t++)
            cursor[t] = class_end;
        for (size_t i = class_end; i-- > class_start;)
            cursor[tenant_of[i]] = i;
        for (;;) {
            size_t best = n_tenants;
            for (size_t t = 0; t < n_tenants; t++) {
                if (cursor[t] >= class_end)
                    continue;
                if (best == n_tenants) {
                    best = t;
                    continue;
                }
                double st = (double)tenants[t].leased / tenants[t].weight;
                double sb = (double)tenants[best].leased / tenants[best].weight;
                if (st < sb || (st == sb && cursor[t] < cursor[best]))
                    best = t;
            }
            if (best == n_tenants)
                break;
            size_t k = cursor[best];
            size_t w = pick_worker(workers, n_workers, shards[k].digest);
            if (w == n_workers)
                goto done; /* no worker has room: nothing further fits */
            out[n_out++] = (struct place_assignment){k, w};
            workers[w].load += shards[k].n_requests;
            tenants[best].leased += shards[k].n_requests;
            size_t next = k + 1;
            while (next < class_end && tenant_of[next] != best)
                next++;
            cursor[best] = next;
        }
        class_start = class_end;
    }
done:
    free(tenants);
    free(tenant_of);
    free(cursor);
    return n_out;
}
