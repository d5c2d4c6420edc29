/*
 * se_sample: penalties, temperature, top-k / top-p / min-p and the seeded
 * draw, without sorting the vocabulary when it can be avoided.
 *
 * Every candidate set the filters can produce is a prefix of one order of the
 * vocabulary: logit descending, ties to the lower id (top-k keeps a prefix,
 * top-p keeps a prefix of that, min-p keeps the tokens with p >= min_p * p_max,
 * again a prefix). Weights are w = exp((double)l - (double)max) in double.
 * Two ways of working on such a prefix:
 *
 * - listed: the candidates are in cand[], sorted (top-k by a bounded heap;
 *   top-p and min-p from the head, or from the histogram buckets they need);
 * - head: the tokens within HEAD_NATS of the maximum, listed and sorted
 *   (usually a handful); the draw walks them first and most draws end there;
 * - histogram: one pass files each token into one of SE__SAMPLE_NB buckets
 *   by (max - l), which orders buckets as the tokens are ordered; the draw
 *   finds the bucket in which the cumulative weight crosses u * total and
 *   sorts only that bucket. Built only when the head does not suffice.
 *
 * Totals are summed in index order (four partial sums) and the histogram sums
 * bucket by bucket, not strictly in the sorted order; the token chosen
 * differs from the sequential definition only when u * total lies within
 * rounding (about 1e-16 relative) of a cumulative boundary. Which path runs
 * is a function of the inputs alone, so results stay deterministic.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "spool/error.h"
#include "sample_int.h"

/* Tokens more than this many nats below the maximum share the last bucket. */
#define RANGE_MAX 40.0f
/*
 * Most draws land among the few tokens near the maximum: those within
 * HEAD_NATS of it (at most HEAD_MAX of them) are listed first, and the
 * histogram is built only when the draw, or top-p, needs more.
 */
#define HEAD_NATS 9.0f
#define HEAD_MAX  1024
/* min-p at or above this (> exp(-HEAD_NATS)) keeps only head tokens. */
#define HEAD_MIN_P 2e-4

/* The logits of one draw and what one pass over them found. */
struct dist {
    const float *l;
    size_t n;
    float max;      /* largest logit */
    float min;      /* smallest finite logit */
    int32_t argmax; /* lowest id holding max */
    double sum;     /* sum over the vocabulary of exp(l - max) */
};

/* The candidates after the filters. */
struct cands {
    bool listed;   /* cand[0..len) holds every candidate, best first, weights in cand_w */
    size_t len;    /* number of candidates when listed */
    size_t head;   /* not listed: cand[0..head) holds the head, buckets not yet filed */
    size_t prefix; /* cand[0..prefix) is the start of the whole vocabulary's order */
};

se_sampler_t *se_sampler_new(int n_vocab)
{
    if (n_vocab <= 0)
        return NULL;
    size_t n = (size_t)n_vocab;
    se_sampler_t *sm = calloc(1, sizeof(*sm));
    if (!sm)
        return NULL;
    sm->n_vocab = n_vocab;
    sm->count = calloc(n, sizeof(*sm->count));
    sm->seen = calloc(n, sizeof(*sm->seen));
    sm->touched = malloc(n * sizeof(*sm->touched));
    sm->w = malloc(n * sizeof(*sm->w));
    sm->bucket = malloc(n * sizeof(*sm->bucket));
    sm->cand = malloc(n * sizeof(*sm->cand));
    sm->tmp = malloc(n * sizeof(*sm->tmp));
    sm->cand_w = malloc(n * sizeof(*sm->cand_w));
    if (!sm->count || !sm->seen || !sm->touched || !sm->w || !sm->bucket || !sm->cand || !sm->tmp ||
        !sm->cand_w) {
        se_sampler_free(sm);
        return NULL;
    }
    return sm;
}

void se_sampler_free(se_sampler_t *sm)
{
    if (!sm)
        return;
    free(sm->count);
    free(sm->seen);
    free(sm->touched);
    free(sm->w);
    free(sm->bucket);
    free(sm->cand);
    free(sm->tmp);
    free(sm->cand_w);
    free(sm);
}

/*
 * Finds max, its lowest id and the finite min. Returns SP_EBACKEND for NaN or
 * +inf logits, or if all are -inf.
 */
static int scan(struct dist *d)
{
    float mx, mn;
    if (se__sample_range(d->l, d->n, &mx, &mn) || mx == INFINITY || mx == -INFINITY)
        return SP_EBACKEND;
    size_t am = 0;
    while (d->l[am] != mx)
        am++;
    d->max = mx;
    d->min = mn;
    d->argmax = (int32_t)am;
    return 0;
}

/* Computes every token's weight into sm->w and their sum. */
static void weigh(se_sampler_t *sm, struct dist *d)
{
    se__sample_weights(d->l, d->n, (double)d->max, sm->w);
    /* Four partial sums: one chain of dependent additions would cost 4 cycles an entry. */
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    size_t i = 0;
    for (; i + 4 <= d->n; i += 4) {
        s0 += sm->w[i];
        s1 += sm->w[i + 1];
        s2 += sm->w[i + 2];
        s3 += sm->w[i + 3];
    }
    for (; i < d->n; i++)
        s0 += sm->w[i];
    d->sum = (s0 + s1) + (s2 + s3);
}

/*
 * Files the tokens with w >= cutoff and w > 0 into buckets (the others get
 * SE__SAMPLE_NO_BUCKET), after weigh.
 */
static void file_buckets(se_sampler_t *sm, const struct dist *d, double cutoff)
{
    float range = d->max - d->min;
    if (!(range <= RANGE_MAX))
        range = RANGE_MAX;
    float scale = range > 0.0f ? (float)(SE__SAMPLE_NB - 1) / range : 0.0f;
    /* Two sets of sums, for even and odd ids, so that neighbours in the same
     * bucket do not wait on each other's store; added up in a fixed order. */
    memset(sm->mass, 0, sizeof(sm->mass));
    memset(sm->mass2, 0, sizeof(sm->mass2));
    for (size_t i = 0; i < d->n; i++) {
        double w = sm->w[i];
        if (w == 0.0 || w < cutoff) {
            sm->bucket[i] = SE__SAMPLE_NO_BUCKET;
            continue;
        }
        /* (max - l) * scale is monotone in l, so buckets keep the tokens' order. */
        float b = (d->max - d->l[i]) * scale;
        unsigned bi = b < (float)(SE__SAMPLE_NB - 1) ? (unsigned)b : SE__SAMPLE_NB - 1;
        sm->bucket[i] = (uint16_t)bi;
        if (i & 1)
            sm->mass2[bi] += w;
        else
            sm->mass[bi] += w;
    }
    for (unsigned b = 0; b < SE__SAMPLE_NB; b++)
        sm->mass[b] += sm->mass2[b];
}

/* Lists the tokens of buckets lo..hi into cand[], sorted, with their weights; returns how many. */
static size_t gather(se_sampler_t *sm, const struct dist *d, unsigned lo, unsigned hi)
{
    size_t g = 0;
    for (size_t i = 0; i < d->n; i++) {
        unsigned b = sm->bucket[i];
        if (b >= lo && b <= hi)
            sm->cand[g++] = (struct se__cand){d->l[i], (int32_t)i};
    }
    se__cand_sort(sm->cand, g, sm->tmp);
    for (size_t j = 0; j < g; j++)
        sm->cand_w[j] = sm->w[sm->cand[j].id];
    return g;
}

/*
 * Lists the head, the tokens with l >= max - HEAD_NATS (w >= about 1.2e-4),
 * into cand[], sorted, with their weights, after weigh. A threshold on the
 * logit keeps it a prefix of the order. Returns how many, or 0 when there are
 * more than HEAD_MAX (a flat distribution: the histogram is then cheaper).
 */
static size_t list_head(se_sampler_t *sm, const struct dist *d)
{
    const float lt = d->max - HEAD_NATS;
    size_t g = 0;
    for (size_t i = 0; i < d->n; i++) {
        if (d->l[i] >= lt) {
            if (g == HEAD_MAX)
                return 0;
            sm->cand[g++] = (struct se__cand){d->l[i], (int32_t)i};
        }
    }
    se__cand_sort(sm->cand, g, sm->tmp);
    for (size_t j = 0; j < g; j++)
        sm->cand_w[j] = sm->w[sm->cand[j].id];
    return g;
}

/* Top-p without top-k: lists the smallest prefix whose weight reaches target, sorting only the
 * buckets it spans. */
static void top_p_histogram(se_sampler_t *sm, const struct dist *d, double target, struct cands *c)
{
    double cum = 0.0;
    unsigned b;
    for (b = 0; b < SE__SAMPLE_NB - 1; b++) {
        cum += sm->mass[b];
        if (cum >= target)
            break;
    }
    for (;;) {
        size_t g = gather(sm, d, 0, b), j;
        double acc = 0.0;
        for (j = 0; j < g; j++) {
            acc += sm->cand_w[j];
            if (acc >= target)
                break;
        }
        if (j < g || b == SE__SAMPLE_NB - 1) {
            /* Rounding can leave the sorted sum just short of the bucket sums: take one bucket
             * more. */
            c->listed = true;
            c->len = j < g ? j + 1 : g;
            c->prefix = g;
            return;
        }
        do
            b++;
        while (b < SE__SAMPLE_NB - 1 && sm->mass[b] == 0.0);
    }
}

static void select_candidates(se_sampler_t *sm, const struct se_sampling *s, struct dist *d,
                              struct cands *c)
{
    size_t k = s->top_k > 0 && (size_t)s->top_k < d->n ? (size_t)s->top_k : 0;
    bool top_p = s->top_p < 1.0f;
    double min_p = s->min_p > 0.0f ? (double)s->min_p : 0.0;

    if (k > 0) {
        weigh(sm, d);
        se__top_k(d->l, d->n, k, sm->cand);
        for (size_t j = 0; j < k; j++)
            sm->cand_w[j] = sm->w[sm->cand[j].id];
        c->listed = true;
        c->len = c->prefix = k;
        if (top_p) {
            /* Top-p over the top-k distribution, renormalised (as Hugging Face and vLLM). */
            double total = 0.0, acc = 0.0;
            for (size_t j = 0; j < k; j++)
                total += sm->cand_w[j];
            double target = (double)s->top_p * total;
            size_t j;
            for (j = 0; j < k - 1; j++) {
                acc += sm->cand_w[j];
                if (acc >= target)
                    break;
            }
            c->len = j + 1;
        }
    } else {
        weigh(sm, d);
        size_t g = list_head(sm, d);
        c->listed = false;
        c->len = c->head = c->prefix = 0;
        if (top_p) {
            double target = (double)s->top_p * d->sum, acc = 0.0;
            size_t j;
            for (j = 0; j < g; j++) {
                acc += sm->cand_w[j];
                if (acc >= target)
                    break;
            }
            if (j < g) {
                c->listed = true;
                c->len = j + 1;
                c->prefix = g;
            } else {
                file_buckets(sm, d, 0.0);
                top_p_histogram(sm, d, target, c);
            }
        } else if (g > 0 && min_p >= HEAD_MIN_P) {
            c->listed = true;
            c->len = c->prefix = g;
        } else if (g > 0 && min_p == 0.0) {
            c->head = c->prefix = g;
            return;
        } else {
            /* Min-p alone is applied by leaving the dropped tokens out of the buckets. */
            file_buckets(sm, d, min_p);
            return;
        }
    }
    if (min_p > 0.0) {
        double thr = min_p * sm->cand_w[0];
        size_t j = 1;
        while (j < c->len && sm->cand_w[j] >= thr)
            j++;
        c->len = j;
    }
    while (c->len > 1 && sm->cand_w[c->len - 1] == 0.0)
        c->len--;
}

static int32_t draw_listed(const se_sampler_t *sm, size_t len, double u)
{
    double total = 0.0, cum = 0.0;
    for (size_t j = 0; j < len; j++)
        total += sm->cand_w[j];
    double target = u * total;
    for (size_t j = 0; j < len; j++) {
        cum += sm->cand_w[j];
        if (cum > target)
            return sm->cand[j].id;
    }
    return sm->cand[len - 1].id;
}

/* Draws within the listed head when the cumulative weight crosses target there; else returns -1. */
static int32_t draw_head(const se_sampler_t *sm, size_t g, double target)
{
    double cum = 0.0;
    for (size_t j = 0; j < g; j++) {
        cum += sm->cand_w[j];
        if (cum > target)
            return sm->cand[j].id;
    }
    return -1;
}

static int32_t draw_histogram(se_sampler_t *sm, const struct dist *d, double u)
{
    double total = 0.0, cum = 0.0;
    unsigned last = 0;
    for (unsigned b = 0; b < SE__SAMPLE_NB; b++) {
        total += sm->mass[b];
        if (sm->mass[b] > 0.0)
            last = b;
    }
    double target = u * total;
    for (unsigned b = 0; b <= last; b++) {
        if (sm->mass[b] == 0.0)
            continue;
        if (b != last && cum + sm->mass[b] <= target) {
            cum += sm->mass[b];
            continue;
        }
        size_t g = gather(sm, d, b, b);
        for (size_t j = 0; j < g; j++) {
            cum += sm->cand_w[j];
            if (cum > target)
                return sm->cand[j].id;
        }
        if (b == last)
            return sm->cand[g - 1].id;
    }
    return d->argmax; /* not reached: the last bucket always returns */
}

/* Fills out with tok, its log-probability and the top alternatives under d's distribution. */
static void report(se_sampler_t *sm, const struct se_sampling *s, const struct dist *d,
                   const struct cands *c, int32_t tok, struct se_sample_result *out)
{
    double lse = (double)d->max + log(d->sum);
    out->token = tok;
    out->logprob = (float)((double)d->l[tok] - lse);
    size_t n_top = s->logprobs > 0 ? (size_t)s->logprobs : 0;
    if (n_top > SE_MAX_LOGPROBS)
        n_top = SE_MAX_LOGPROBS;
    if (n_top > d->n)
        n_top = d->n;
    out->n_top = (int)n_top;
    if (n_top == 0)
        return;
    struct se__cand buf[SE_MAX_LOGPROBS];
    const struct se__cand *top = buf;
    if (c && c->prefix >= n_top)
        top = sm->cand;
    else
        se__top_k(d->l, d->n, n_top, buf);
    for (size_t j = 0; j < n_top; j++) {
        out->top_ids[j] = top[j].id;
        out->top_logprobs[j] = (float)((double)top[j].logit - lse);
    }
}

int se_sample(se_sampler_t *sm, const struct se_sampling *s, float *logits, const int32_t *prompt,
              size_t n_prompt, const int32_t *generated, size_t n_generated,
              struct se_sample_result *out)
{
    if (!sm || !s || !logits || !out || !(s->temperature >= 0.0f))
        return SP_EINVAL;
    int rc = se__sample_penalize(sm, s, logits, prompt, n_prompt, generated, n_generated);
    if (rc < 0)
        return rc;
    memset(out, 0, sizeof(*out));
    struct dist d = {.l = logits, .n = (size_t)sm->n_vocab};

    if (s->temperature == 0.0f) {
        /* Greedy; log-probabilities from the penalised distribution at temperature 1. */
        if ((rc = scan(&d)) < 0)
            return rc;
        weigh(sm, &d);
        report(sm, s, &d, NULL, d.argmax, out);
        return 0;
    }
    if (s->temperature != 1.0f)
        se__sample_scale(logits, d.n, s->temperature);
    if ((rc = scan(&d)) < 0)
        return rc;
    struct cands c;
    select_candidates(sm, s, &d, &c);
    double u = se_sample_uniform(s->seed, (uint64_t)(n_prompt + n_generated));
    int32_t tok;
    if (c.listed) {
        tok = draw_listed(sm, c.len, u);
    } else if (c.head == 0 || (tok = draw_head(sm, c.head, u * d.sum)) < 0) {
        /* Beyond the head: the histogram over the whole vocabulary, with the same u. */
        if (c.head > 0)
            file_buckets(sm, &d, 0.0);
        c.prefix = 0;
        tok = draw_histogram(sm, &d, u);
    }
    report(sm, s, &d, &c, tok, out);
    return 0;
}

long se__sample_filter(se_sampler_t *sm, const struct se_sampling *s, const float *logits,
                       int32_t *ids, size_t cap)
{
    struct dist d = {.l = logits, .n = (size_t)sm->n_vocab};
    int rc = scan(&d);
    if (rc < 0)
        return rc;
    struct cands c;
    select_candidates(sm, s, &d, &c);
    if (!c.listed) {
        if (c.head > 0)
            file_buckets(sm, &d, 0.0);
        c.len = gather(sm, &d, 0, SE__SAMPLE_NB - 1);
    }
    for (size_t j = 0; j < c.len && j < cap; j++)
        ids[j] = sm->cand[j].id;
    return (long)c.len;
}
