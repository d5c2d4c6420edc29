/*
 * Private interface of the sampler, shared by its source files and its unit
 * tests. Nothing here is part of the engine's public API.
 */
#ifndef SPOOL_SAMPLE_INT_H
#define SPOOL_SAMPLE_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "spool/sample.h"

/* Number of buckets of the log-probability histogram used to avoid sorting the vocabulary. */
#define SE__SAMPLE_NB 1024
/* Bucket value of a token that is not a candidate (zero weight, or removed by min-p). */
#define SE__SAMPLE_NO_BUCKET 0xFFFF

/* A candidate token and its (penalised, temperature-scaled) logit. */
struct se__cand {
    float logit;
    int32_t id;
};

struct se_sampler {
    int n_vocab;
    /* Penalty bookkeeping. count and seen are all zero between calls: only the
     * entries listed in touched[0..n_touched) are ever set, and they are reset
     * from that list, so a call costs O(history), not O(n_vocab). */
    int32_t *count;   /* (n_vocab) occurrences among the generated tokens */
    uint8_t *seen;    /* (n_vocab) 1 while the token is on the touched list */
    int32_t *touched; /* (n_vocab) distinct tokens of the history */
    /* Draw scratch. */
    double *w;                   /* (n_vocab) exp(l - max) per token id */
    uint16_t *bucket;            /* (n_vocab) histogram bucket per token id */
    struct se__cand *cand;       /* (n_vocab) candidate list, best first */
    struct se__cand *tmp;        /* (n_vocab) merge space for sorting cand */
    double *cand_w;              /* (n_vocab) exp(l - max) of cand[j] */
    double mass[SE__SAMPLE_NB];  /* sum of w per bucket, candidates only (> 0 iff not empty) */
    double mass2[SE__SAMPLE_NB]; /* the odd ids' part of mass, while it is summed */
};

/* The splitmix64 finaliser (Steele, Lea, Flood 2014), as defined in docs/architecture.md. */
uint64_t se__splitmix64(uint64_t x);

/*
 * Applies the repetition, presence and frequency penalties to logits
 * (sm->n_vocab floats) in place. Returns 0, or SP_EINVAL when a history token
 * is outside [0, n_vocab) (logits are then unspecified, the sampler intact).
 */
int se__sample_penalize(se_sampler_t *sm, const struct se_sampling *s, float *logits,
                        const int32_t *prompt, size_t n_prompt, const int32_t *generated,
                        size_t n_generated);

/*
 * Runs the top-k, top-p and min-p filters on already penalised and
 * temperature-scaled logits and writes the surviving token ids, most probable
 * first (ties: lower id first), to ids[0..min(cap, n)). Returns n, the number
 * of candidates, or a negative SP_E* code. For tests: se_sample uses the same
 * code but never lists every candidate when it need not.
 */
long se__sample_filter(se_sampler_t *sm, const struct se_sampling *s, const float *logits,
                       int32_t *ids, size_t cap);

/*
 * Sets w[i] = exp((double)logits[i] - max) for i < n (0 for -inf logits). The
 * only exp over the whole vocabulary; vectorised where the compiler allows.
 */
void se__sample_weights(const float *restrict logits, size_t n, double max, double *restrict w);

/*
 * One vectorised pass: *max = the largest logit, *min_finite = the smallest
 * one above -inf (+inf when none); returns true if any logit is NaN.
 */
bool se__sample_range(const float *restrict logits, size_t n, float *max, float *min_finite);

/* logits[i] = logits[i] / temperature, vectorised. */
void se__sample_scale(float *logits, size_t n, float temperature);

/* Orders a before b when a is more probable, or equally probable with a lower id (qsort order). */
int se__cand_cmp(const void *a, const void *b);

/*
 * Sorts a[0..n) best first (higher logit, then lower id) using tmp (n
 * entries) as merge space; allocates nothing. O(n log n).
 */
void se__cand_sort(struct se__cand *a, size_t n, struct se__cand *tmp);

/*
 * Selects the k best of logits[0..n) (higher logit first, ties to the lower
 * id) into out[0..k), sorted best first; 0 < k <= n. O(n log k), no allocation.
 */
void se__top_k(const float *logits, size_t n, size_t k, struct se__cand *out);

#endif
