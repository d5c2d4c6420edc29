/*
 * se_sample throughput on a Qwen-sized vocabulary (151,936), one thread, with
 * logits shaped like a language model's (Gaussian bulk, a few strong tokens).
 * Prints tokens/s per configuration (best of 5 rounds, in thread CPU time,
 * so that a shared machine's other jobs count as little as possible), the cost of a full sort of
 * the vocabulary (what the sampler avoids), and the machine's memory bandwidth with the token rate
 * that a single read of the logits would allow.
 *
 *   build/tests/bench_sample [seconds per configuration, default 1] [only configurations
 *                            whose name contains this]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "spool/sample.h"

#define N_VOCAB 151936
#define ROUNDS  5

static uint64_t rng = 42;
static double uniform(void)
{
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return ((double)(rng >> 11) + 0.5) * 0x1.0p-53;
}

static void make_logits(float *l, size_t n)
{
    for (size_t i = 0; i < n; i++)
        l[i] = (float)(2.5 * sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()));
    for (int j = 0; j < 8; j++)
        l[(size_t)(uniform() * (double)n)] = (float)(12.0 + 2.0 * j);
}

struct config {
    const char *name;
    float temperature, top_p, min_p, rep, presence, frequency;
    int top_k, logprobs, history;
};

static int cmp_float_desc(const void *pa, const void *pb)
{
    float a = *(const float *)pa, b = *(const float *)pb;
    return a < b ? 1 : a > b ? -1 : 0;
}

int main(int argc, char **argv)
{
    double secs = argc > 1 ? atof(argv[1]) : 1.0;
    const char *only = argc > 2 ? argv[2] : NULL;
    float *base = malloc(N_VOCAB * sizeof(float)), *l = malloc(N_VOCAB * sizeof(float));
    int32_t *hist = malloc(1024 * sizeof(int32_t));
    se_sampler_t *sm = se_sampler_new(N_VOCAB);
    if (!base || !l || !hist || !sm) {
        fprintf(stderr, "bench_sample: out of memory\n");
        return 1;
    }
    make_logits(base, N_VOCAB);
    for (int i = 0; i < 1024; i++)
        hist[i] = (int32_t)(uniform() * N_VOCAB);

    static const struct config configs[] = {
        {"greedy", 0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 0, 0},
        {"temperature 0.8", 0.8f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 0, 0},
        {"temperature 0.8 + logprobs 5", 0.8f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 5, 0},
        {"top-p 0.95", 1.0f, 0.95f, 0.0f, 1.0f, 0.0f, 0.0f, 0, 0, 0},
        {"min-p 0.05", 1.0f, 1.0f, 0.05f, 1.0f, 0.0f, 0.0f, 0, 0, 0},
        {"top-k 50 + top-p 0.9 + penalties (768 history)", 0.7f, 0.9f, 0.0f, 1.1f, 0.5f, 0.3f, 50,
         0, 768},
    };
    printf("se_sample, vocabulary %d, one thread, %.1f CPU s per line\n", N_VOCAB, secs);

    /* Every iteration copies fresh logits in (se_sample modifies them); that copy alone: */
    double t0 = bench_cpu_now();
    long iters = 0;
    do {
        memcpy(l, base, N_VOCAB * sizeof(float));
        iters++;
    } while (bench_cpu_now() - t0 < secs / 4);
    double copy_s = (bench_cpu_now() - t0) / (double)iters;
    printf("  %-48s %9.1f us/token (subtracted below)\n", "copy of the logits", copy_s * 1e6);

    for (size_t c = 0; c < sizeof(configs) / sizeof(configs[0]); c++) {
        const struct config *cf = &configs[c];
        if (only && !strstr(cf->name, only))
            continue;
        struct se_sampling s;
        se_sampling_default(&s);
        s.temperature = cf->temperature;
        s.top_k = cf->top_k;
        s.top_p = cf->top_p;
        s.min_p = cf->min_p;
        s.repetition_penalty = cf->rep;
        s.presence_penalty = cf->presence;
        s.frequency_penalty = cf->frequency;
        s.logprobs = cf->logprobs;
        s.seed = 1;
        size_t n_prompt = (size_t)cf->history * 2 / 3, n_gen = (size_t)cf->history - n_prompt;
        struct se_sample_result r;
        /* Best of ROUNDS rounds: the machine is shared, and the best round is the least disturbed.
         */
        double per = INFINITY;
        for (int round = 0; round < ROUNDS; round++) {
            iters = 0;
            t0 = bench_cpu_now();
            do {
                memcpy(l, base, N_VOCAB * sizeof(float));
                /* A new seed each time; the history (and so the position) stays the same. */
                s.seed = (uint64_t)iters;
                if (se_sample(sm, &s, l, hist, n_prompt, hist + n_prompt, n_gen, &r) < 0) {
                    fprintf(stderr, "bench_sample: se_sample failed\n");
                    return 1;
                }
                iters++;
            } while (bench_cpu_now() - t0 < secs / ROUNDS);
            double t = (bench_cpu_now() - t0) / (double)iters - copy_s;
            if (t < per)
                per = t;
        }
        printf("  %-48s %9.1f us/token %9.0f tokens/s\n", cf->name, per * 1e6, 1.0 / per);
    }

    /* What sorting the whole vocabulary would cost per token. */
    iters = 0;
    t0 = bench_cpu_now();
    do {
        memcpy(l, base, N_VOCAB * sizeof(float));
        qsort(l, N_VOCAB, sizeof(float), cmp_float_desc);
        iters++;
    } while (bench_cpu_now() - t0 < secs);
    double sort_s = (bench_cpu_now() - t0) / (double)iters - copy_s;
    printf("  %-48s %9.1f us/token %9.0f tokens/s\n", "(reference: qsort of the vocabulary)",
           sort_s * 1e6, 1.0 / sort_s);

    double bw1 = bench_membw_gbps((size_t)768 << 20, 1),
           bw2 = bench_membw_gbps((size_t)768 << 20, 2);
    printf("memory bandwidth (STREAM triad, 768 MiB): %.1f GB/s on 1 thread, %.1f GB/s on 2\n", bw1,
           bw2);
    printf("one read of the logits (%zu bytes) at the 1-thread figure: %.0f tokens/s\n",
           N_VOCAB * sizeof(float), bw1 * 1e9 / (double)(N_VOCAB * sizeof(float)));
    se_sampler_free(sm);
    free(base);
    free(l);
    free(hist);
    return 0;
}
