/*
 * The scheduling policy of a step (see docs/architecture.md, "Engine"):
 *
 * 1. Admission, in priority order (live before batch, then submission
 *    order, so a preempted sequence comes back before newer ones): a waiting
 *    sequence takes the leading full blocks of its tokens that the prefix
 *    cache holds, and fresh blocks for the rest of its tokens so far. It is
 *    admitted while a running slot is free and the blocks leave one spare
 *    block per running sequence (room to grow). A live sequence that does not
 *    fit preempts running batch sequences, latest admitted first. A batch
 *    sequence whose next block is being computed right now by a running one
 *    waits a step, so that sequences sharing a prompt compute it once. Otherwise the
 *    first sequence that does not fit stops admission (no overtaking).
 * 2. Growth: each running sequence, in priority order, takes the blocks its
 *    tokens need; when none is left the lowest-priority, most recently
 *    admitted running sequence (possibly itself) is preempted.
 * 3. The batch, within max_batch_tokens: live decode tokens, live prompt
 *    chunks (leaving batch decode tokens at least half the budget), batch
 *    decode tokens, batch prompt chunks (submission order). Decode tokens go
 *    before prompt chunks of their class, so that a long prompt never
 *    stalls decoding, and a live prompt is not held behind batch decoding.
 */
#include <stdlib.h>

#include "internal.h"

/* Computes the chain hashes of the first upto blocks of s (all full). */
static void ensure_hashes(struct seq *s, int upto, int bs)
{
    for (int i = s->n_hashed; i < upto; i++)
        s->hashes[i] = se__block_hash(i ? s->hashes[i - 1] : 0, s->tokens + (size_t)i * bs, bs);
    if (upto > s->n_hashed)
        s->n_hashed = upto;
}

void se__publish_full(se_engine_t *e, struct seq *s)
{
    int bs = e->opts.block_size;
    int full = s->n_fed / bs;
    if (e->opts.no_prefix_cache || full <= s->n_published)
        return;
    ensure_hashes(s, full, bs);
    for (int i = s->n_published; i < full; i++)
        se__blocks_publish(&e->blocks, s->blocks[i], s->hashes[i], s->tokens + (size_t)i * bs);
    s->n_published = full;
}

static int by_priority(const void *a, const void *b)
{
    const struct seq *x = *(struct seq *const *)a, *y = *(struct seq *const *)b;
    if (x->prio != y->prio)
        return x->prio > y->prio ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* The running sequence to preempt: lowest priority, then most recently admitted. */
static struct seq *victim(se_engine_t *e, enum se_priority below_or_at)
{
    struct seq *v = NULL;
    for (struct seq *s = e->head; s; s = s->next) {
        if (s->state != SEQ_RUNNING || s->prio > below_or_at)
            continue;
        if (!v || s->prio < v->prio || (s->prio == v->prio && s->admit_stamp > v->admit_stamp))
            v = s;
    }
    return v;
}

static void preempt(se_engine_t *e, struct seq *s)
{
    int had = s->n_fed;
    se__release_blocks(e, s);
    s->state = SEQ_WAITING;
    e->n_running--;
    e->totals.n_preemptions++;
    struct se_event *ev = se__add_event(e, s, -1, 0);
    ev->preempted = true;
    ev->n_recompute = had;
}

/* Tries to admit s; true when admitted. *defer is set when it waits for a prefix being computed. */
static bool admit(se_engine_t *e, struct seq *s, bool *defer)
{
    int bs = e->opts.block_size;
    struct se__blocks *b = &e->blocks;
    *defer = false;
    if (e->n_running >= e->opts.max_seqs) {
        struct seq *v = s->prio == SE_PRIORITY_LIVE ? victim(e, SE_PRIORITY_BATCH) : NULL;
        if (!v)
            return false;
        preempt(e, v);
    }
    /* Leave at least one token to feed: its logits give the next token. */
    int n_full = (s->n_tokens - 1) / bs, n_hit = 0;
    if (!e->opts.no_prefix_cache) {
        ensure_hashes(s, n_full, bs);
        while (n_hit < n_full) {
            int id = se__blocks_lookup(b, s->hashes[n_hit], s->tokens + (size_t)n_hit * bs);
            if (id < 0)
                break;
            s->blocks[n_hit++] = id;
        }
        s->n_blocks = n_hit;
        /* Live sequences do not wait: their latency matters more than the saving. */
        if (n_hit < n_full && s->prio == SE_PRIORITY_BATCH) {
            for (struct seq *r = e->head; r; r = r->next)
                if (r->state == SEQ_RUNNING && r->n_hashed > n_hit &&
                    r->hashes[n_hit] == s->hashes[n_hit] && r->n_fed < (n_hit + 1) * bs) {
                    se__release_blocks(e, s);
                    *defer = true;
                    return false;
                }
        }
    }
    /* Batch sequences leave a block per running sequence to grow into; live ones need not. */
    int total = (s->n_tokens + bs - 1) / bs, need = total - n_hit;
    bool live = s->prio == SE_PRIORITY_LIVE;
    while (se__blocks_available(b) < need + (live ? 0 : e->n_running)) {
        struct seq *v = live ? victim(e, SE_PRIORITY_BATCH) : NULL;
        if (!v) {
            se__release_blocks(e, s);
            return false;
        }
        preempt(e, v);
    }
    for (int i = n_hit; i < total; i++)
        s->blocks[i] = se__blocks_alloc(b);
    s->n_blocks = total;
    s->n_published = n_hit;
    s->n_fed = n_hit * bs;
    s->u_cached += s->n_fed;
    if (s->n_fed > s->hwm)
        s->hwm = s->n_fed;
    if (n_hit)
        se__usage_note(e, s);
    s->state = SEQ_RUNNING;
    s->admit_stamp = ++e->admit_counter;
    e->n_running++;
    return true;
}

/* Gives s the blocks its tokens need, preempting as the policy says; false when s was preempted. */
static bool grow(se_engine_t *e, struct seq *s)
{
    int bs = e->opts.block_size;
    int need = (s->n_tokens + bs - 1) / bs;
    while (s->n_blocks < need) {
        int id = se__blocks_alloc(&e->blocks);
        if (id >= 0) {
            s->blocks[s->n_blocks++] = id;
            continue;
        }
        struct seq *v = victim(e, SE_PRIORITY_LIVE);
        preempt(e, v);
        if (v == s)
            return false;
    }
    return true;
}

int se__schedule(se_engine_t *e, int *n_tokens_out)
{
    int n = 0;
    for (struct seq *s = e->head; s; s = s->next)
        if (s->state != SEQ_FINISHED)
            n++;
    if (n > e->order_cap) {
        struct seq **no = realloc(e->order, (size_t)n * 2 * sizeof(*no));
        if (!no)
            return SP_ENOMEM;
        e->order = no;
        e->order_cap = n * 2;
    }
    n = 0;
    for (struct seq *s = e->head; s; s = s->next)
        if (s->state != SEQ_FINISHED)
            e->order[n++] = s;
    qsort(e->order, (size_t)n, sizeof(*e->order), by_priority);

    for (int i = 0; i < n; i++) {
        struct seq *s = e->order[i];
        if (s->state != SEQ_WAITING)
            continue;
        bool defer;
        if (!admit(e, s, &defer) && !defer)
            break;
    }
    for (int i = 0; i < n; i++)
        if (e->order[i]->state == SEQ_RUNNING)
            grow(e, e->order[i]);

    /*
     * Four passes: live decode, live prefill, batch decode, batch prefill.
     * Live prompt chunks may take the budget that batch decode tokens would
     * use, but leave them at least half of it.
     */
    int budget = e->opts.max_batch_tokens, nt = 0, ns = 0, batch_dec = 0;
    for (int i = 0; i < n; i++) {
        struct seq *s = e->order[i];
        batch_dec += s->state == SEQ_RUNNING && s->prio == SE_PRIORITY_BATCH &&
                     s->n_fed >= s->n_in && s->n_tokens - s->n_fed == 1;
    }
    if (batch_dec > budget / 2)
        batch_dec = budget / 2;
    for (int pass = 0; pass < 4; pass++) {
        enum se_priority cls = pass < 2 ? SE_PRIORITY_LIVE : SE_PRIORITY_BATCH;
        bool want_decode = pass % 2 == 0;
        for (int i = 0; i < n; i++) {
            struct seq *s = e->order[i];
            int room = budget - (pass == 1 ? batch_dec : 0);
            if (room <= 0)
                break;
            if (s->state != SEQ_RUNNING || s->prio != cls)
                continue;
            int pending = s->n_tokens - s->n_fed;
            bool decode = s->n_fed >= s->n_in && pending == 1;
            if (want_decode != decode || pending <= 0)
                continue;
            int take = pending < room ? pending : room;
            e->seq_start[ns] = nt;
            e->seq_n[ns] = take;
            e->seq_ctx[ns] = s->n_fed + take;
            e->tables[ns] = s->blocks;
            e->batch_seqs[ns] = s;
            for (int k = 0; k < take; k++) {
                int p = s->n_fed + k;
                e->tokens[nt + k] = s->tokens[p];
                e->positions[nt + k] = p;
                if (p < s->hwm)
                    s->u_recompute++;
                else if (p < s->n_in)
                    s->u_prefill++;
            }
            if (s->n_fed + take > s->hwm)
                s->hwm = s->n_fed + take;
            se__usage_note(e, s);
            nt += take;
            budget -= take;
            ns++;
        }
    }
    *n_tokens_out = nt;
    return ns;
}
