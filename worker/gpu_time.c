/*
 * Per-request GPU time from the engine's per-step usage.
 *
 * A step's wall time (se_step_usage.wall_ns: scheduling, the forward pass and
 * sampling) is split among the sequences listed in its usage in proportion to
 * the work each had in it: n_prefill + n_recompute + n_decode. Prompt (and
 * resume) tokens fed for the first time and tokens fed again after a
 * preemption each cost one row of the forward pass; a sampled token stands
 * for the row that produced its logits and for its sampling. (The row of a
 * plain decode token is counted by its n_decode alone; when a prompt's last
 * chunk yields the first token, that token's row is already in n_prefill and
 * its sampling adds one: the weight is within one token of the rows fed.)
 * Tokens found in the prefix cache (n_cached) cost nothing. So a 200-token
 * prompt chunk is charged 200 times what a decode token is charged in the
 * same step, and the shares of a step always add up to its wall time.
 */
#include "worker.h"

long wk_gpu_weight(const struct se_step_usage *u)
{
    long w = 0;
    for (int i = 0; i < u->n_seqs; i++)
        w += (long)u->seqs[i].n_prefill + u->seqs[i].n_recompute + u->seqs[i].n_decode;
    return w;
}

double wk_gpu_share(const struct se_step_usage *u, long weight, int i)
{
    double wall = (double)u->wall_ns * 1e-9;
    if (u->n_seqs <= 0)
        return 0;
    /* A step in which the listed sequences computed nothing (prefix-cache hits only). */
    if (weight <= 0)
        return wall / u->n_seqs;
    const struct se_seq_usage *s = &u->seqs[i];
    long mine = (long)s->n_prefill + s->n_recompute + s->n_decode;
    return wall * (double)mine / (double)weight;
}
