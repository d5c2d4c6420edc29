/*
 * The sampler: the seeded uniform draw (golden values shared with the CUDA
 * sampler), greedy, the draw's frequencies, the filters' candidate sets,
 * penalties, log-probabilities, determinism and resume, validation, and stop
 * strings.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "spool/error.h"
#include "spool/sample.h"
#include "../../../engine/sample/sample_int.h"

/*
 * Counting allocations. Under AddressSanitizer, through its malloc hook;
 * otherwise this executable's malloc, calloc and realloc replace the C
 * library's and forward to glibc's own entry points.
 */
static long n_allocs;
#if defined(__SANITIZE_ADDRESS__)
#define COUNT_ALLOCS 1
int __sanitizer_install_malloc_and_free_hooks(void (*malloc_hook)(const volatile void *, size_t),
                                              void (*free_hook)(const volatile void *));
static void count_malloc(const volatile void *p, size_t n)
{
    (void)p;
    (void)n;
    n_allocs++;
}
static void count_free(const volatile void *p)
{
    (void)p;
}
static void count_allocs_init(void)
{
    static int installed;
    /* Both hooks are required; installing again would count twice. */
    if (!installed)
        installed = __sanitizer_install_malloc_and_free_hooks(count_malloc, count_free);
    assert_true(installed > 0);
}
#elif defined(__GLIBC__)
#define COUNT_ALLOCS 1
extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t n, size_t size);
extern void *__libc_realloc(void *p, size_t n);
void *malloc(size_t n)
{
    n_allocs++;
    return __libc_malloc(n);
}
void *calloc(size_t n, size_t size)
{
    n_allocs++;
    return __libc_calloc(n, size);
}
void *realloc(void *p, size_t n)
{
    n_allocs++;
    return __libc_realloc(p, n);
}
static void count_allocs_init(void) {}
#endif

/* A small deterministic generator for test data (not the sampler's RNG). */
static uint64_t test_rng = 1;
static double test_uniform(void)
{
    test_rng = test_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(test_rng >> 11) * 0x1.0p-53;
}

static void random_logits(float *l, size_t n, double spread, uint64_t seed)
{
    test_rng = seed;
    for (size_t i = 0; i < n; i++)
        l[i] = (float)((test_uniform() - 0.5) * spread);
}

/* log-softmax of l/t in double. */
static void log_softmax(const float *l, size_t n, float t, double *out)
{
    double mx = -INFINITY, sum = 0.0;
    for (size_t i = 0; i < n; i++)
        if ((double)(l[i] / t) > mx)
            mx = (double)(l[i] / t);
    for (size_t i = 0; i < n; i++)
        sum += exp((double)(l[i] / t) - mx);
    for (size_t i = 0; i < n; i++)
        out[i] = (double)(l[i] / t) - mx - log(sum);
}

/*
 * Golden values of the RNG, computed once with this independent Python
 * (arbitrary-precision ints masked to 64 bits, then k * 2.0**-53):
 *
 *   M = (1 << 64) - 1
 *   def sm(x):
 *       z = (x + 0x9E3779B97F4A7C15) & M
 *       z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
 *       z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
 *       return z ^ (z >> 31)
 *   k = sm(seed ^ sm(pos)) >> 11; print(hex(k), k * 2.0**-53)
 *
 * splitmix64(0) = 0xe220a8397b1dcdaf is also the published first output of
 * SplitMix64 seeded with 0. The CUDA sampler's test checks the same table.
 */
static void uniform_golden(void **state)
{
    (void)state;
    assert_true(se__splitmix64(0) == 0xe220a8397b1dcdafull);
    assert_true(se__splitmix64(1) == 0x910a2dec89025cc1ull);
    assert_true(se__splitmix64(UINT64_MAX) == 0xe4d971771b652c20ull);
    static const struct {
        uint64_t seed, pos, k;
        double u;
    } golden[] = {
        {0x0ull, 0ull, 0x14e0dba5e9a32full, 0.6524484863740322},
        {0x0ull, 1ull, 0xbc835610e872cull, 0.36818951565166946},
        {0x1ull, 0ull, 0x1169fb5191256ull, 0.03401170130434639},
        {0x2aull, 7ull, 0xdd570c4bbe4d1ull, 0.4323047487697754},
        {0x3039ull, 100000ull, 0x91173bf9ca8bfull, 0.2833803884907623},
        {0xffffffffffffffffull, 3ull, 0x8313f65a828b8ull, 0.25601167540414504},
        {0x123456789abcdefull, 1099511627776ull, 0xef8101b41561cull, 0.4677811176613349},
    };
    for (size_t i = 0; i < sizeof(golden) / sizeof(golden[0]); i++) {
        double u = se_sample_uniform(golden[i].seed, golden[i].pos);
        assert_true(u == golden[i].u);
        assert_true(u * 0x1.0p53 == (double)golden[i].k);
    }
}

/* The allocation-free sort and top-k selection order exactly as qsort with se__cand_cmp does. */
static void sort_and_top_k_match_qsort(void **state)
{
    (void)state;
    enum { N = 5000 };
    struct se__cand *a = malloc(N * sizeof(*a)), *b = malloc(N * sizeof(*b)),
                    *tmp = malloc(N * sizeof(*tmp));
    float *l = malloc(N * sizeof(float));
    static const size_t sizes[] = {0, 1, 2, 15, 16, 17, 33, 100, 1000, N};
    for (size_t t = 0; t < sizeof(sizes) / sizeof(sizes[0]); t++) {
        size_t n = sizes[t];
        /* Few distinct values, so that many ties need the id rule. */
        test_rng = 1000 + n;
        for (size_t i = 0; i < n; i++) {
            l[i] = (float)(int)(test_uniform() * 20.0) - 10.0f;
            a[i] = b[i] = (struct se__cand){l[i], (int32_t)(n - 1 - i)};
        }
        se__cand_sort(a, n, tmp);
        qsort(b, n, sizeof(*b), se__cand_cmp);
        assert_memory_equal(a, b, n * sizeof(*a));
        static const size_t ks[] = {1, 5, 64, 999};
        for (size_t j = 0; j < 4 && n > 0; j++) {
            size_t k = ks[j] < n ? ks[j] : n;
            for (size_t i = 0; i < n; i++)
                b[i] = (struct se__cand){l[i], (int32_t)i};
            qsort(b, n, sizeof(*b), se__cand_cmp);
            se__top_k(l, n, k, a);
            assert_memory_equal(a, b, k * sizeof(*a));
        }
    }
    free(a);
    free(b);
    free(tmp);
    free(l);
}

/* se_sample allocates nothing once its sampler exists, on a Qwen-sized vocabulary, in every mode.
 */
static void no_allocation_per_token(void **state)
{
    (void)state;
#ifdef COUNT_ALLOCS
    enum { NV = 151936 };
    float *base = malloc(NV * sizeof(float)), *l = malloc(NV * sizeof(float));
    int32_t hist[64];
    for (int i = 0; i < 64; i++)
        hist[i] = i * 1000;
    /* A flat bulk, so that top-p and the draw have large buckets to sort. */
    random_logits(base, NV, 3.0, 21);
    se_sampler_t *sm = se_sampler_new(NV);
    struct se_sampling s;
    struct se_sample_result r;
    static const struct {
        float t, top_p, min_p, rep;
        int top_k, logprobs;
    } modes[] = {
        {0.0f, 1.0f, 0.0f, 1.0f, 0, 5},    {1.0f, 1.0f, 0.0f, 1.0f, 0, 0},
        {0.8f, 0.95f, 0.0f, 1.1f, 0, 20},  {1.2f, 1.0f, 0.05f, 1.0f, 0, 1},
        {0.7f, 0.9f, 0.1f, 1.3f, 5000, 3},
    };
    count_allocs_init();
    long before = n_allocs;
    for (size_t m = 0; m < sizeof(modes) / sizeof(modes[0]); m++) {
        se_sampling_default(&s);
        s.temperature = modes[m].t;
        s.top_p = modes[m].top_p;
        s.min_p = modes[m].min_p;
        s.repetition_penalty = modes[m].rep;
        s.frequency_penalty = 0.5f;
        s.top_k = modes[m].top_k;
        s.logprobs = modes[m].logprobs;
        for (uint64_t seed = 0; seed < 3; seed++) {
            s.seed = seed;
            memcpy(l, base, NV * sizeof(float));
            assert_int_equal(se_sample(sm, &s, l, hist, 32, hist + 32, 32, &r), 0);
        }
    }
    assert_int_equal(n_allocs - before, 0);
    se_sampler_free(sm);
    free(base);
    free(l);
#else
    skip();
#endif
}

static void greedy_argmax_lowest_id(void **state)
{
    (void)state;
    se_sampler_t *sm = se_sampler_new(6);
    struct se_sampling s;
    se_sampling_default(&s);
    s.temperature = 0.0f;
    s.logprobs = 3;
    struct se_sample_result r;
    float l[6] = {1.0f, 5.0f, 3.0f, 5.0f, -INFINITY, 5.0f};
    float copy[6];
    memcpy(copy, l, sizeof(l));
    for (uint64_t seed = 0; seed < 5; seed++) {
        s.seed = seed;
        memcpy(l, copy, sizeof(l));
        assert_int_equal(se_sample(sm, &s, l, NULL, 0, NULL, 0, &r), 0);
        assert_int_equal(r.token, 1);
    }
    /* Log-probabilities at temperature 1, even though greedy. */
    double lp[6];
    log_softmax(copy, 6, 1.0f, lp);
    assert_float_equal(r.logprob, lp[1], 1e-6);
    assert_int_equal(r.n_top, 3);
    assert_int_equal(r.top_ids[0], 1);
    assert_int_equal(r.top_ids[1], 3);
    assert_int_equal(r.top_ids[2], 5);
    /* A repetition penalty on token 1 moves the argmax to the next tie, 3. */
    int32_t gen[1] = {1};
    memcpy(l, copy, sizeof(l));
    s.repetition_penalty = 1.5f;
    assert_int_equal(se_sample(sm, &s, l, NULL, 0, gen, 1, &r), 0);
    assert_int_equal(r.token, 3);
    /* A NaN logit is a backend failure, not a token. */
    memcpy(l, copy, sizeof(l));
    l[2] = NAN;
    assert_int_equal(se_sample(sm, &s, l, NULL, 0, NULL, 0, &r), SP_EBACKEND);
    se_sampler_free(sm);
}

/* A prompt of zeros, long enough to place a draw at any position the tests use. */
static const int32_t zeros[20000];

/* Chi-square statistic of observed counts against expected probabilities. */
static double chi_square(const long *obs, const double *p, size_t k, long n)
{
    double x2 = 0.0;
    for (size_t i = 0; i < k; i++) {
        double e = p[i] * (double)n;
        x2 += ((double)obs[i] - e) * ((double)obs[i] - e) / e;
    }
    return x2;
}

/* Draws n tokens at positions 0..n-1 and counts them. */
static void draw_counts(se_sampler_t *sm, const struct se_sampling *s, const float *l, size_t nv,
                        long n, long *counts, float *scratch)
{
    struct se_sample_result r;
    memset(counts, 0, nv * sizeof(*counts));
    for (long p = 0; p < n; p++) {
        memcpy(scratch, l, nv * sizeof(*l));
        /* The position is n_prompt + n_generated: a prompt of p zeros. */
        assert_int_equal(se_sample(sm, s, scratch, zeros, (size_t)p, NULL, 0, &r), 0);
        assert_true(r.token >= 0 && (size_t)r.token < nv);
        counts[r.token]++;
    }
}

static void frequencies_match_softmax(void **state)
{
    (void)state;
    enum { NV = 6, N = 20000 };
    float l[NV] = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, -3.0f}, scratch[NV];
    long counts[NV];
    double lp[NV], p[NV];
    se_sampler_t *sm = se_sampler_new(NV);
    struct se_sampling s;
    se_sampling_default(&s);
    s.temperature = 0.8f;
    s.seed = 7;
    draw_counts(sm, &s, l, NV, N, counts, scratch);
    log_softmax(l, NV, s.temperature, lp);
    for (int i = 0; i < NV; i++)
        p[i] = exp(lp[i]);
    /* 5 degrees of freedom: P(X2 > 25.7) = 1e-4; the seed makes the outcome fixed. */
    double x2 = chi_square(counts, p, NV, N);
    assert_true(x2 < 25.7);

    /* top-k 3: the same, renormalised over the three best. */
    s.top_k = 3;
    s.seed = 8;
    draw_counts(sm, &s, l, NV, N, counts, scratch);
    double z = p[0] + p[1] + p[2];
    double p3[3] = {p[0] / z, p[1] / z, p[2] / z};
    assert_int_equal(counts[3] + counts[4] + counts[5], 0);
    assert_true(chi_square(counts, p3, 3, N) < 18.4); /* 2 dof, 1e-4 */
    se_sampler_free(sm);

    /* A larger vocabulary goes through the histogram: the top 10 tokens and the rest. */
    enum { NB = 3000, NL = 20000 };
    float *big = malloc(NB * sizeof(float)), *bscratch = malloc(NB * sizeof(float));
    long *bcounts = malloc(NB * sizeof(long));
    double *blp = malloc(NB * sizeof(double));
    random_logits(big, NB, 16.0, 11);
    sm = se_sampler_new(NB);
    se_sampling_default(&s);
    s.seed = 12345;
    s.temperature = 1.3f;
    draw_counts(sm, &s, big, NB, NL, bcounts, bscratch);
    log_softmax(big, NB, s.temperature, blp);
    struct se__cand top[10];
    float scaled[NB];
    for (int i = 0; i < NB; i++)
        scaled[i] = big[i] / s.temperature;
    se__top_k(scaled, NB, 10, top);
    long obs[11] = {0};
    double pe[11];
    double rest = 1.0;
    for (int j = 0; j < 10; j++) {
        obs[j] = bcounts[top[j].id];
        pe[j] = exp(blp[top[j].id]);
        rest -= pe[j];
    }
    obs[10] = NL;
    for (int j = 0; j < 10; j++)
        obs[10] -= obs[j];
    pe[10] = rest;
    assert_true(chi_square(obs, pe, 11, NL) < 35.6); /* 10 dof, 1e-4 */
    se_sampler_free(sm);

    /*
     * Draws in the head and beyond it: token 0 at logit 0 (the whole head)
     * and 2999 tokens at -9.5 + small offsets, which hold about 20% of the
     * mass. Token 0 and ten groups of the others.
     */
    sm = se_sampler_new(NB);
    se_sampling_default(&s);
    s.seed = 4242;
    for (int i = 0; i < NB; i++)
        big[i] = i == 0 ? 0.0f : -9.5f + 0.1f * (float)(i % 7);
    draw_counts(sm, &s, big, NB, NL, bcounts, bscratch);
    log_softmax(big, NB, 1.0f, blp);
    long grp[11] = {0};
    double pg[11] = {0};
    for (int i = 0; i < NB; i++) {
        int g = i == 0 ? 0 : 1 + (i - 1) * 10 / (NB - 1);
        grp[g] += bcounts[i];
        pg[g] += exp(blp[i]);
    }
    assert_true(pg[0] > 0.7 && pg[0] < 0.9);
    assert_true(chi_square(grp, pg, 11, NL) < 35.6); /* 10 dof, 1e-4 */
    free(big);
    free(bscratch);
    free(bcounts);
    free(blp);
    se_sampler_free(sm);
}

/* Reference filter: full sort, then top-k, top-p, min-p exactly as documented. */
static size_t reference_filter(const float *l, size_t n, const struct se_sampling *s, int32_t *ids)
{
    struct se__cand *c = malloc(n * sizeof(*c));
    double *w = malloc(n * sizeof(*w));
    for (size_t i = 0; i < n; i++)
        c[i] = (struct se__cand){l[i], (int32_t)i};
    qsort(c, n, sizeof(*c), se__cand_cmp);
    size_t len = s->top_k > 0 && (size_t)s->top_k < n ? (size_t)s->top_k : n;
    double total = 0.0;
    for (size_t j = 0; j < len; j++) {
        w[j] = exp((double)c[j].logit - (double)c[0].logit);
        total += w[j];
    }
    if (s->top_p < 1.0f) {
        double cum = 0.0;
        size_t j;
        for (j = 0; j < len - 1; j++) {
            cum += w[j];
            if (cum >= (double)s->top_p * total)
                break;
        }
        len = j + 1;
    }
    if (s->min_p > 0.0f) {
        size_t j = 1;
        while (j < len && w[j] >= (double)s->min_p * w[0])
            j++;
        len = j;
    }
    while (len > 1 && w[len - 1] == 0.0)
        len--;
    for (size_t j = 0; j < len; j++)
        ids[j] = c[j].id;
    free(c);
    free(w);
    return len;
}

static void expect_set(se_sampler_t *sm, const float *l, int top_k, float top_p, float min_p,
                       const int32_t *want, size_t n_want)
{
    struct se_sampling s;
    se_sampling_default(&s);
    s.top_k = top_k;
    s.top_p = top_p;
    s.min_p = min_p;
    int32_t got[16];
    long n = se__sample_filter(sm, &s, l, got, 16);
    if (n != (long)n_want)
        fail_msg("top_k %d top_p %g min_p %g: %ld candidates, want %zu", top_k, (double)top_p,
                 (double)min_p, n, n_want);
    for (size_t j = 0; j < n_want; j++)
        assert_int_equal(got[j], want[j]);
}

static void filters_keep_expected_sets(void **state)
{
    (void)state;
    /*
     * Order: 1 and 3 (logit 3), 2 and 6 (2), 0 (1), 4 (0.5), 7 (0), 5 (-1).
     * Probabilities .3310 .3310 .1218 .1218 .0448 .0272 .0165 .0061, cumulative
     * .3310 .6620 .7838 .9056 .9504 .9776 .9941 1; p / p_max = 1 1 .368 .368
     * .135 .082 .050 .018.
     */
    float l[8] = {1.0f, 3.0f, 2.0f, 3.0f, 0.5f, -1.0f, 2.0f, 0.0f};
    se_sampler_t *sm = se_sampler_new(8);
    expect_set(sm, l, 0, 1.0f, 0.0f, (int32_t[]){1, 3, 2, 6, 0, 4, 7, 5}, 8);
    expect_set(sm, l, 1, 1.0f, 0.0f, (int32_t[]){1}, 1);
    expect_set(sm, l, 3, 1.0f, 0.0f, (int32_t[]){1, 3, 2}, 3);
    expect_set(sm, l, 4, 1.0f, 0.0f, (int32_t[]){1, 3, 2, 6}, 4);
    expect_set(sm, l, 100, 1.0f, 0.0f, (int32_t[]){1, 3, 2, 6, 0, 4, 7, 5}, 8);
    expect_set(sm, l, 0, 0.3f, 0.0f, (int32_t[]){1}, 1);
    expect_set(sm, l, 0, 0.5f, 0.0f, (int32_t[]){1, 3}, 2);
    expect_set(sm, l, 0, 0.7f, 0.0f, (int32_t[]){1, 3, 2}, 3);
    expect_set(sm, l, 0, 0.9f, 0.0f, (int32_t[]){1, 3, 2, 6}, 4);
    expect_set(sm, l, 0, 0.95f, 0.0f, (int32_t[]){1, 3, 2, 6, 0}, 5);
    expect_set(sm, l, 0, 1.0f, 0.4f, (int32_t[]){1, 3}, 2);
    expect_set(sm, l, 0, 1.0f, 0.1f, (int32_t[]){1, 3, 2, 6, 0}, 5);
    expect_set(sm, l, 0, 1.0f, 0.05f, (int32_t[]){1, 3, 2, 6, 0, 4}, 6);
    /* top-k 4 renormalised: .3656 .3656 .1344 .1344, so top-p .8 keeps three. */
    expect_set(sm, l, 4, 0.8f, 0.0f, (int32_t[]){1, 3, 2}, 3);
    expect_set(sm, l, 4, 0.8f, 0.5f, (int32_t[]){1, 3}, 2);
    /* top-k 6 renormalised: cumulative .3387 .6775 .8020 .9266 .9724. */
    expect_set(sm, l, 6, 0.95f, 0.1f, (int32_t[]){1, 3, 2, 6, 0}, 5);
    expect_set(sm, l, 6, 0.95f, 0.2f, (int32_t[]){1, 3, 2, 6}, 4);
    se_sampler_free(sm);

    /* Tokens with probability zero (-inf) are never candidates. */
    float masked[4] = {-INFINITY, 0.0f, -INFINITY, 0.0f};
    sm = se_sampler_new(4);
    expect_set(sm, masked, 0, 1.0f, 0.0f, (int32_t[]){1, 3}, 2);
    expect_set(sm, masked, 3, 1.0f, 0.0f, (int32_t[]){1, 3}, 2);
    se_sampler_free(sm);

    /* A large random vocabulary against the full-sort reference, every filter combination. */
    enum { NV = 20000 };
    float *big = malloc(NV * sizeof(float));
    int32_t *got = malloc(NV * sizeof(int32_t)), *want = malloc(NV * sizeof(int32_t));
    sm = se_sampler_new(NV);
    static const int ks[] = {0, 1, 40, 5000};
    static const float ps[] = {1.0f, 0.5f, 0.9f, 0.999f};
    static const float mps[] = {0.0f, 1e-5f, 0.01f, 0.2f};
    /* Spreads: flat (no head), steep (a head of a few hundred tokens near the
     * maximum), and two levels (one token, then 5000 just beyond the head,
     * 27% of the mass: top-p must look past the head). */
    static const double spreads[] = {2.0, 20.0, 80.0, 400.0, 4000.0, -1.0};
    for (int spread = 0; spread < 6; spread++) {
        random_logits(big, NV, spreads[spread] > 0 ? spreads[spread] : 1.0, 100 + spread);
        if (spreads[spread] < 0) {
            for (int i = 0; i < NV; i++)
                big[i] = i == 777 ? 0.0f : i < 5000 ? -9.5f - big[i] * 0.01f : -30.0f + big[i];
        }
        for (size_t a = 0; a < 4; a++)
            for (size_t b = 0; b < 4; b++)
                for (size_t c = 0; c < 4; c++) {
                    struct se_sampling s;
                    se_sampling_default(&s);
                    s.top_k = ks[a];
                    s.top_p = ps[b];
                    s.min_p = mps[c];
                    long n = se__sample_filter(sm, &s, big, got, NV);
                    size_t nw = reference_filter(big, NV, &s, want);
                    if (n != (long)nw)
                        fail_msg("spread %d k %d p %g min_p %g: %ld candidates, want %zu", spread,
                                 s.top_k, (double)s.top_p, (double)s.min_p, n, nw);
                    assert_memory_equal(got, want, nw * sizeof(int32_t));
                }
    }
    free(big);
    free(got);
    free(want);
    se_sampler_free(sm);
}

static void draws_stay_in_candidate_set(void **state)
{
    (void)state;
    enum { NV = 500 };
    float l[NV], scratch[NV];
    long counts[NV];
    int32_t want[NV];
    random_logits(l, NV, 10.0, 5);
    se_sampler_t *sm = se_sampler_new(NV);
    struct se_sampling s;
    se_sampling_default(&s);
    static const int ks[] = {0, 8};
    static const float ps[] = {1.0f, 0.6f};
    static const float mps[] = {0.0f, 0.3f};
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++)
            for (int c = 0; c < 2; c++) {
                s.top_k = ks[a];
                s.top_p = ps[b];
                s.min_p = mps[c];
                if (s.top_k == 0 && s.top_p == 1.0f && s.min_p == 0.0f)
                    continue;
                size_t nw = reference_filter(l, NV, &s, want);
                draw_counts(sm, &s, l, NV, 3000, counts, scratch);
                long in = 0;
                for (size_t j = 0; j < nw; j++) {
                    assert_true(counts[want[j]] > 0); /* every candidate here has p > 1/300 */
                    in += counts[want[j]];
                }
                assert_int_equal(in, 3000);
            }
    se_sampler_free(sm);
}

static void penalties_follow_formulas(void **state)
{
    (void)state;
    enum { NV = 7 };
    const float base[NV] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 1.0f, 0.0f};
    float l[NV];
    const int32_t prompt[] = {0, 1, 1, 6};
    const int32_t gen[] = {1, 3, 3, 3, 5};
    se_sampler_t *sm = se_sampler_new(NV);
    struct se_sampling s;
    se_sampling_default(&s);
    s.repetition_penalty = 1.3f;
    s.presence_penalty = 0.5f;
    s.frequency_penalty = 0.25f;
    const int gen_count[NV] = {0, 1, 0, 3, 0, 1, 0};
    const int in_history[NV] = {1, 1, 0, 1, 0, 1, 1};
    float want[NV];
    for (int i = 0; i < NV; i++) {
        float x = base[i];
        if (in_history[i])
            x = x > 0.0f ? x / s.repetition_penalty : x * s.repetition_penalty;
        x -= s.presence_penalty * (float)(gen_count[i] > 0) +
             s.frequency_penalty * (float)gen_count[i];
        want[i] = x;
    }
    /* Twice, so that counts left over from the first call would show. */
    for (int round = 0; round < 2; round++) {
        memcpy(l, base, sizeof(l));
        assert_int_equal(se__sample_penalize(sm, &s, l, prompt, 4, gen, 5), 0);
        for (int i = 0; i < NV; i++)
            assert_true(l[i] == want[i]);
    }
    /* Through se_sample at temperature 1, the logits are left penalised. */
    struct se_sample_result r;
    memcpy(l, base, sizeof(l));
    assert_int_equal(se_sample(sm, &s, l, prompt, 4, gen, 5, &r), 0);
    for (int i = 0; i < NV; i++)
        assert_true(l[i] == want[i]);
    /* Presence and frequency alone: prompt tokens untouched, negative values allowed. */
    s.repetition_penalty = 1.0f;
    s.presence_penalty = -0.5f;
    s.frequency_penalty = 0.0f;
    memcpy(l, base, sizeof(l));
    assert_int_equal(se__sample_penalize(sm, &s, l, prompt, 4, gen, 5), 0);
    for (int i = 0; i < NV; i++)
        assert_true(l[i] == base[i] + 0.5f * (float)(gen_count[i] > 0));
    /* An out-of-range history token is refused and leaves no residue (then presence -0.5, frequency
     * 1). */
    const int32_t bad[] = {3, 99};
    s.frequency_penalty = 1.0f;
    assert_int_equal(se__sample_penalize(sm, &s, l, NULL, 0, bad, 2), SP_EINVAL);
    assert_int_equal(se_sample(sm, &s, l, NULL, 0, bad, 2, &r), SP_EINVAL);
    memcpy(l, base, sizeof(l));
    assert_int_equal(se__sample_penalize(sm, &s, l, NULL, 0, gen, 1), 0);
    for (int i = 0; i < NV; i++)
        assert_true(l[i] == base[i] - (i == 1 ? 0.5f : 0.0f));
    se_sampler_free(sm);
}

static void logprobs_are_a_distribution(void **state)
{
    (void)state;
    enum { NV = 20 };
    float l[NV], base[NV];
    double lp[NV];
    random_logits(base, NV, 8.0, 3);
    se_sampler_t *sm = se_sampler_new(NV);
    struct se_sampling s;
    se_sampling_default(&s);
    s.logprobs = SE_MAX_LOGPROBS;
    s.temperature = 0.7f;
    struct se_sample_result r;
    /* Without and with filters: the reported distribution is the unfiltered one. */
    for (int filt = 0; filt < 2; filt++) {
        s.top_k = filt ? 2 : 0;
        s.top_p = filt ? 0.5f : 1.0f;
        for (uint64_t pos = 0; pos < 20; pos++) {
            memcpy(l, base, sizeof(l));
            assert_int_equal(se_sample(sm, &s, l, zeros, pos, NULL, 0, &r), 0);
            assert_int_equal(r.n_top, NV);
            log_softmax(base, NV, s.temperature, lp);
            double sum = 0.0;
            bool chosen_listed = false;
            for (int j = 0; j < NV; j++) {
                sum += exp(r.top_logprobs[j]);
                assert_float_equal(r.top_logprobs[j], lp[r.top_ids[j]], 1e-5);
                if (j > 0)
                    assert_true(r.top_logprobs[j] <= r.top_logprobs[j - 1]);
                if (r.top_ids[j] == r.token) {
                    chosen_listed = true;
                    assert_true(r.top_logprobs[j] == r.logprob);
                }
            }
            assert_true(chosen_listed);
            assert_float_equal(sum, 1.0, 1e-5);
        }
    }
    se_sampler_free(sm);

    /* Top 5 of a large vocabulary, against a full sort. */
    enum { NB = 10000 };
    float *big = malloc(NB * sizeof(float)), *cp = malloc(NB * sizeof(float));
    double *blp = malloc(NB * sizeof(double));
    int32_t *order = malloc(NB * sizeof(int32_t));
    random_logits(big, NB, 30.0, 4);
    big[17] = big[9000] = 20.0f; /* a tie at the top: lower id first */
    sm = se_sampler_new(NB);
    se_sampling_default(&s);
    s.logprobs = 5;
    s.temperature = 1.0f;
    s.top_p = 0.9f;
    memcpy(cp, big, NB * sizeof(float));
    assert_int_equal(se_sample(sm, &s, cp, NULL, 0, NULL, 0, &r), 0);
    log_softmax(big, NB, 1.0f, blp);
    struct se_sampling all;
    se_sampling_default(&all);
    reference_filter(big, NB, &all, order);
    assert_int_equal(order[0], 17);
    assert_int_equal(order[1], 9000);
    assert_int_equal(r.n_top, 5);
    for (int j = 0; j < 5; j++) {
        assert_int_equal(r.top_ids[j], order[j]);
        assert_float_equal(r.top_logprobs[j], blp[order[j]], 1e-5);
    }
    assert_float_equal(r.logprob, blp[r.token], 1e-5);
    free(big);
    free(cp);
    free(blp);
    free(order);
    se_sampler_free(sm);
}

static void draws_are_deterministic_and_independent(void **state)
{
    (void)state;
    enum { NV = 1000, N = 20000 };
    float base[NV], l[NV];
    random_logits(base, NV, 6.0, 9);
    se_sampler_t *a = se_sampler_new(NV), *b = se_sampler_new(NV);
    struct se_sampling s;
    se_sampling_default(&s);
    s.seed = 77;
    s.top_p = 0.95f;
    s.repetition_penalty = 1.1f;
    const int32_t hist[] = {5, 6, 7, 5};
    struct se_sample_result r1, r2;
    int differs = 0;
    for (uint64_t pos = 4; pos < 200; pos++) {
        memcpy(l, base, sizeof(l));
        assert_int_equal(se_sample(a, &s, l, hist, 4, NULL, 0, &r1), 0);
        memcpy(l, base, sizeof(l));
        assert_int_equal(se_sample(b, &s, l, hist, 4, NULL, 0, &r2), 0);
        assert_int_equal(r1.token, r2.token);
        assert_true(r1.logprob == r2.logprob);
        /* Another seed: mostly other tokens. */
        struct se_sampling t = s;
        t.seed = 78;
        memcpy(l, base, sizeof(l));
        assert_int_equal(se_sample(b, &t, l, hist, 4, NULL, 0, &r2), 0);
        differs += r1.token != r2.token;
    }
    assert_true(differs > 150);
    se_sampler_free(a);
    se_sampler_free(b);

    /* Successive positions: no lag-1 correlation, and pairs spread evenly over a 4x4 grid. */
    double mean = 0.0, var = 0.0, cov = 0.0, prev = se_sample_uniform(s.seed, 0);
    long grid[16] = {0};
    for (uint64_t p = 1; p <= N; p++) {
        double u = se_sample_uniform(s.seed, p);
        mean += u;
        var += (u - 0.5) * (u - 0.5);
        cov += (u - 0.5) * (prev - 0.5);
        grid[(int)(prev * 4) * 4 + (int)(u * 4)]++;
        prev = u;
    }
    mean /= N;
    assert_float_equal(mean, 0.5, 0.01);
    assert_true(fabs(cov / var) < 0.03);
    double pg[16];
    for (int i = 0; i < 16; i++)
        pg[i] = 1.0 / 16;
    assert_true(chi_square(grid, pg, 16, N) < 44.3); /* 15 dof, 1e-4 */
}

/* A toy model: logits as a fixed function of the last two tokens. */
static void toy_logits(float *l, size_t nv, const int32_t *hist, size_t n)
{
    int32_t a = n > 0 ? hist[n - 1] : 0, b = n > 1 ? hist[n - 2] : 0;
    for (size_t i = 0; i < nv; i++)
        l[i] = (float)(3.0 * sin(0.7 * (double)i + 0.31 * a + 0.11 * b) + 0.01 * (double)i);
}

static void generate(se_sampler_t *sm, const struct se_sampling *s, int32_t *seq, size_t n_prompt,
                     size_t from, size_t to)
{
    float l[50];
    struct se_sample_result r;
    for (size_t k = from; k < to; k++) {
        toy_logits(l, 50, seq, n_prompt + k);
        assert_int_equal(se_sample(sm, s, l, seq, n_prompt, seq + n_prompt, k, &r), 0);
        seq[n_prompt + k] = r.token;
    }
}

static void resume_continues_identically(void **state)
{
    (void)state;
    enum { NP = 3, NG = 40 };
    struct se_sampling s;
    se_sampling_default(&s);
    s.seed = 99;
    s.temperature = 0.9f;
    s.top_k = 20;
    s.top_p = 0.9f;
    s.repetition_penalty = 1.2f;
    s.presence_penalty = 0.3f;
    s.frequency_penalty = 0.2f;
    int32_t ref[NP + NG] = {4, 8, 15};
    se_sampler_t *sm = se_sampler_new(50);
    generate(sm, &s, ref, NP, 0, NG);
    static const size_t ks[] = {0, 1, 7, 20, 39};
    for (size_t i = 0; i < sizeof(ks) / sizeof(ks[0]); i++) {
        /* Another worker: a fresh sampler that has served another request first. */
        se_sampler_t *other = se_sampler_new(50);
        struct se_sampling o = s;
        o.seed = 1234;
        o.top_k = 0;
        int32_t noise[NP + 10] = {1, 2, 3};
        generate(other, &o, noise, NP, 0, 10);
        int32_t seq[NP + NG];
        memcpy(seq, ref, (NP + ks[i]) * sizeof(int32_t));
        generate(other, &s, seq, NP, ks[i], NG);
        assert_memory_equal(seq, ref, sizeof(ref));
        se_sampler_free(other);
    }
    se_sampler_free(sm);
}

static void expect_invalid(const struct se_sampling *s, const char *field, const char *value)
{
    char err[256] = "";
    assert_int_equal(se_sampling_validate(s, 1000, err, sizeof(err)), SP_EINVAL);
    if (!strstr(err, field) || (value && !strstr(err, value)))
        fail_msg("message \"%s\" should name %s and %s", err, field, value ? value : "-");
}

static void validation_names_field_and_value(void **state)
{
    (void)state;
    struct se_sampling s, d;
    char err[256];
    se_sampling_default(&d);
    assert_int_equal(se_sampling_validate(&d, 1000, err, sizeof(err)), 0);
    assert_true(d.temperature == 1.0f && d.top_p == 1.0f && d.max_tokens == 16);
    d.temperature = 0.0f;
    d.top_k = 1000;
    d.top_p = 1e-6f;
    d.min_p = 0.99f;
    d.presence_penalty = -2.0f;
    d.frequency_penalty = 2.0f;
    d.logprobs = SE_MAX_LOGPROBS;
    assert_int_equal(se_sampling_validate(&d, 1000, err, sizeof(err)), 0);
    se_sampling_default(&d);
#define BAD(stmt, field, value)                                                                    \
    do {                                                                                           \
        s = d;                                                                                     \
        stmt;                                                                                      \
        expect_invalid(&s, field, value);                                                          \
    } while (0)
    BAD(s.temperature = -0.5f, "temperature", "-0.5");
    BAD(s.temperature = NAN, "temperature", "nan");
    BAD(s.temperature = 101.0f, "temperature", "101");
    BAD(s.top_k = -1, "top_k", "-1");
    BAD(s.top_p = 0.0f, "top_p", "got 0");
    BAD(s.top_p = 1.5f, "top_p", "1.5");
    BAD(s.min_p = 1.0f, "min_p", "got 1");
    BAD(s.min_p = -0.1f, "min_p", "-0.1");
    BAD(s.repetition_penalty = 0.0f, "repetition_penalty", "got 0");
    BAD(s.repetition_penalty = INFINITY, "repetition_penalty", "inf");
    BAD(s.presence_penalty = 2.5f, "presence_penalty", "2.5");
    BAD(s.frequency_penalty = -3.0f, "frequency_penalty", "-3");
    BAD(s.max_tokens = 0, "max_tokens", "got 0");
    BAD(s.logprobs = 21, "logprobs", "21");
    BAD(s.logprobs = -1, "logprobs", "-1");
    BAD(s.n_stop_ids = 17, "stop_token_ids", "17");
    BAD((s.n_stop_ids = 2, s.stop_ids[0] = 5, s.stop_ids[1] = 1000), "stop_token_ids[1]", "1000");
    BAD((s.n_stop_ids = 1, s.stop_ids[0] = -1), "stop_token_ids[0]", "-1");
    BAD(s.n_stop = 17, "stop", "17");
    BAD((s.n_stop = 1, s.stop[0] = ""), "stop[0]", NULL);
    BAD((s.n_stop = 2, s.stop[0] = "a", s.stop[1] = NULL), "stop[1]", NULL);
    BAD((s.n_stop = 1, s.stop[0] = "\xff"), "stop[0]", "UTF-8");
    char longstop[300];
    memset(longstop, 'x', 299);
    longstop[299] = '\0';
    BAD((s.n_stop = 1, s.stop[0] = longstop), "stop[0]", "299");
#undef BAD
    s = d;
    assert_int_equal(se_sampling_validate(&s, 0, err, sizeof(err)), SP_EINVAL);
    assert_non_null(strstr(err, "n_vocab"));
    s.n_stop = 2;
    s.stop[0] = "</s>";
    s.stop[1] = "\xc3\xa9t\xc3\xa9"; /* "été" */
    longstop[256] = '\0';
    s.stop[0] = longstop;
    assert_int_equal(se_sampling_validate(&s, 10, err, sizeof(err)), 0);
}

static void stop_find_cases(void **state)
{
    (void)state;
    struct se_sampling s;
    se_sampling_default(&s);
    size_t safe = 99;
    /* No stop strings: everything is safe. */
    assert_int_equal(se_stop_find(&s, "hello", 5, &safe), -1);
    assert_int_equal(safe, 5);

    s.n_stop = 2;
    s.stop[0] = "STOP";
    s.stop[1] = "\n\n";
    assert_int_equal(se_stop_find(&s, "Hello world", 11, &safe), -1);
    assert_int_equal(safe, 11);
    /* A stop string split across pieces: "ST" is held back, then found. */
    assert_int_equal(se_stop_find(&s, "Hello ST", 8, &safe), -1);
    assert_int_equal(safe, 6);
    assert_int_equal(se_stop_find(&s, "STO", 3, &safe), -1); /* the held tail alone */
    assert_int_equal(safe, 0);
    assert_int_equal(se_stop_find(&s, "STOP here", 9, &safe), 0);
    assert_int_equal(safe, 0);
    /* A tail that turned out not to be a stop string is released. */
    assert_int_equal(se_stop_find(&s, "STOrm", 5, &safe), -1);
    assert_int_equal(safe, 5);
    assert_int_equal(se_stop_find(&s, "a\n", 2, &safe), -1);
    assert_int_equal(safe, 1);
    assert_int_equal(se_stop_find(&s, "a\n\nb", 4, &safe), 1);
    assert_int_equal(safe, 1);
    assert_int_equal(se_stop_find(&s, "x STOP y \n\n", 11, NULL), 2);

    /* Overlapping stop strings: the earliest occurrence wins, whichever string it is. */
    s.stop[0] = "bcd";
    s.stop[1] = "abc";
    assert_int_equal(se_stop_find(&s, "xabcd", 5, &safe), 1);
    assert_int_equal(safe, 1);
    s.stop[0] = "abcd";
    s.stop[1] = "bc";
    assert_int_equal(se_stop_find(&s, "zabcd", 5, &safe), 1);
    s.stop[0] = "cd";
    s.stop[1] = "abcde";
    assert_int_equal(se_stop_find(&s, "abcdx", 5, &safe), 2);
    /* The longest held tail counts: "aba" of "abab", though "a" also matches "aa". */
    s.stop[0] = "aa";
    s.stop[1] = "abab";
    assert_int_equal(se_stop_find(&s, "xaba", 4, &safe), -1);
    assert_int_equal(safe, 1);
    /* A stop string itself repeating: "aab" in "xaaab". */
    s.n_stop = 1;
    s.stop[0] = "aab";
    assert_int_equal(se_stop_find(&s, "xaaab", 5, &safe), 2);
    assert_int_equal(se_stop_find(&s, "xaaa", 4, &safe), -1);
    assert_int_equal(safe, 2);

    /* Multibyte: never cut inside a character. "é" = c3 a9, "€" = e2 82 ac. */
    s.stop[0] = "\xe2\x82\xac\xe2\x82\xac"; /* "€€" */
    assert_int_equal(se_stop_find(&s, "caf\xc3\xa9 \xe2\x82\xac", 9, &safe), -1);
    assert_int_equal(safe, 6); /* "€" could start "€€" */
    assert_int_equal(se_stop_find(&s, "caf\xc3\xa9 \xe2\x82\xac\xe2\x82\xac!", 13, &safe), 6);
    assert_int_equal(safe, 6);
    /* A character still incomplete at the end of the text (a token split inside it). */
    s.stop[0] = "zz";
    assert_int_equal(se_stop_find(&s, "caf\xc3", 4, &safe), -1);
    assert_int_equal(safe, 3);
    assert_int_equal(se_stop_find(&s, "ab\xe2\x82", 4, &safe), -1);
    assert_int_equal(safe, 2);
    assert_int_equal(se_stop_find(&s, "ab\xe2\x82\xac", 5, &safe), -1);
    assert_int_equal(safe, 5);
    assert_int_equal(se_stop_find(&s, "\xf0\x9f\x98", 3, &safe), -1); /* 3 of 4 bytes of an emoji */
    assert_int_equal(safe, 0);
    /* A stop string that is a proper prefix of a multibyte character's bytes: "é" vs "ét". */
    s.stop[0] = "\xc3\xa9t";
    assert_int_equal(se_stop_find(&s, "caf\xc3", 4, &safe), -1);
    assert_int_equal(safe, 3);
    assert_int_equal(se_stop_find(&s, "caf\xc3\xa9", 5, &safe), -1);
    assert_int_equal(safe, 3);
    assert_int_equal(se_stop_find(&s, "caf\xc3\xa9s", 6, &safe), -1);
    assert_int_equal(safe, 6);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(uniform_golden),
        cmocka_unit_test(sort_and_top_k_match_qsort),
        cmocka_unit_test(no_allocation_per_token),
        cmocka_unit_test(greedy_argmax_lowest_id),
        cmocka_unit_test(frequencies_match_softmax),
        cmocka_unit_test(filters_keep_expected_sets),
        cmocka_unit_test(draws_stay_in_candidate_set),
        cmocka_unit_test(penalties_follow_formulas),
        cmocka_unit_test(logprobs_are_a_distribution),
        cmocka_unit_test(draws_are_deterministic_and_independent),
        cmocka_unit_test(resume_continues_identically),
        cmocka_unit_test(validation_names_field_and_value),
        cmocka_unit_test(stop_find_cases),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
