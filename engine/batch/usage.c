/*
 * Usage accounting: per step, the wall time of the whole se_engine_step call
 * and, for every sequence that did work, its prefill, cached, recomputed and
 * decode tokens (counted by sched.c and step.c into the sequence's u_*
 * fields); totals since open. See spool/engine.h.
 */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

int64_t se__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int se__usage_begin(se_engine_t *e)
{
    e->last.n_seqs = 0;
    /* A sequence is noted at most once per step, and only live ones are. */
    int cap = e->n_live + 1;
    if (cap > e->usage_cap) {
        struct se_seq_usage *nu = realloc(e->usage, (size_t)cap * 2 * sizeof(*nu));
        struct seq **ns = nu ? realloc(e->noted, (size_t)cap * 2 * sizeof(*ns)) : NULL;
        if (nu)
            e->usage = nu;
        if (!ns)
            return SP_ENOMEM;
        e->noted = ns;
        e->usage_cap = cap * 2;
    }
    return 0;
}

void se__usage_note(se_engine_t *e, struct seq *s)
{
    if (s->u_listed)
        return;
    s->u_listed = true;
    e->noted[e->last.n_seqs++] = s;
}

int se__usage_end(se_engine_t *e, int64_t t0_ns, int n_tokens)
{
    struct se_engine_stats *t = &e->totals;
    for (int i = 0; i < e->last.n_seqs; i++) {
        struct seq *s = e->noted[i];
        e->usage[i] = (struct se_seq_usage){.seq = s->id,
                                            .user = s->user,
                                            .priority = s->prio,
                                            .n_prefill = s->u_prefill,
                                            .n_cached = s->u_cached,
                                            .n_recompute = s->u_recompute,
                                            .n_decode = s->u_decode};
        t->n_prefill += s->u_prefill;
        t->n_cached += s->u_cached;
        t->n_recompute += s->u_recompute;
        t->n_decode += s->u_decode;
        s->u_prefill = s->u_cached = s->u_recompute = s->u_decode = 0;
        s->u_listed = false;
    }
    e->last.seqs = e->usage;
    e->last.n_tokens = n_tokens;
    e->last.wall_ns = se__now_ns() - t0_ns;
    t->busy_ns += e->last.wall_ns;
    t->n_steps++;
    return 0;
}

const struct se_step_usage *se_engine_last_usage(const se_engine_t *e)
{
    return &e->last;
}

int se_engine_stats(se_engine_t *e, struct se_engine_stats *st)
{
    *st = e->totals;
    st->n_blocks = e->blocks.n;
    if (se__blocks_check(&e->blocks, &st->n_blocks_free, &st->n_blocks_cached, &st->n_blocks_used,
                         e->err, sizeof(e->err)))
        return SP_ECORRUPT;
    st->n_running = e->n_running;
    st->n_waiting = e->n_live - e->n_running;
    return 0;
}
