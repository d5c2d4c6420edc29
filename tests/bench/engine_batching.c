/*
 * Continuous batching benchmark (not part of meson test; prints, asserts
 * nothing): aggregate decode tokens/s at batch 1, 8, 32 and 64 on the
 * ~100M-parameter test model with the CPU backend, the speed-up of batch 32
 * over batch 1, and what the prefix cache saves on 256 prompts sharing a
 * 1,000-token system prompt.
 *
 *   engine_batching [MODEL_DIR] [N_THREADS] [--full | --decode-only]
 *
 * MODEL_DIR defaults to bench-models/bench-100m (written by mkmodel.py when
 * it holds no config.json). Decode rates count only steps in which every
 * sequence decodes (no prompt work). Without --full the no-cache prefix run
 * covers 8 of the 256 prompts and is scaled up (prefill cost is linear in
 * the prompt count); --full runs all 256.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "bench_util.h"
#include "spool/engine.h"
#include "spool_config.h"

#define DECODE 32 /* decode steps measured per batch size */

static se_model_t *model;
static int n_threads;

static se_engine_t *open_engine_on(const char *backend, int max_seqs, int max_batch_tokens,
                                   bool no_prefix)
{
    struct se_engine_opts o = {.backend = backend,
                               .n_threads = n_threads,
                               .max_seqs = max_seqs,
                               .max_batch_tokens = max_batch_tokens,
                               .kv_bytes = (size_t)1 << 30,
                               .no_prefix_cache = no_prefix};
    se_engine_t *e;
    char err[1024];
    if (se_engine_open(model, &o, &e, err, sizeof(err))) {
        fprintf(stderr, "engine_batching: %s\n", err);
        exit(1);
    }
    return e;
}

static se_engine_t *open_engine(int max_seqs, int max_batch_tokens, bool no_prefix)
{
    return open_engine_on("cpu", max_seqs, max_batch_tokens, no_prefix);
}

static void submit(se_engine_t *e, const int32_t *p, size_t n, int max_tokens)
{
    struct se_seq_params q = {.prompt = p, .n_prompt = n};
    se_sampling_default(&q.sampling);
    q.sampling.temperature = 0;
    q.sampling.ignore_eos = true;
    q.sampling.max_tokens = max_tokens;
    int32_t id;
    char err[512];
    if (se_engine_submit(e, &q, &id, err, sizeof(err))) {
        fprintf(stderr, "engine_batching: %s\n", err);
        exit(1);
    }
}

/* Runs to the end; returns seconds and decode tokens of the decode-only steps, and the total. */
static double run(se_engine_t *e, long *dec_tokens, double *dec_s)
{
    double t0 = bench_now();
    *dec_tokens = 0;
    *dec_s = 0;
    for (;;) {
        const struct se_event *ev;
        int n = se_engine_step(e, &ev);
        if (n < 0) {
            fprintf(stderr, "engine_batching: %s\n", se_engine_error(e));
            exit(1);
        }
        const struct se_step_usage *u = se_engine_last_usage(e);
        long pre = 0, dec = 0;
        for (int i = 0; i < u->n_seqs; i++) {
            pre += u->seqs[i].n_prefill + u->seqs[i].n_recompute;
            dec += u->seqs[i].n_decode;
        }
        if (pre == 0 && dec > 0) {
            *dec_tokens += dec;
            *dec_s += (double)u->wall_ns * 1e-9;
        }
        if (n == 0 && se_engine_n_active(e) == 0)
            break;
    }
    return bench_now() - t0;
}

/* Prefill of n prompts of a shared 1,000-token system prompt + 8 tokens of their own. */
static void prefix_run(int n, bool no_prefix, double *secs, long *computed, long *cached)
{
    static int32_t p[1008];
    se_engine_t *e = open_engine(64, 256, no_prefix);
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < 1000; k++)
            p[k] = 100 + (k * 37) % 20000;
        for (int k = 0; k < 8; k++)
            p[1000 + k] = 3 + (i * 8 + k) % 31000;
        submit(e, p, 1008, 1);
    }
    long d;
    double ds;
    *secs = run(e, &d, &ds);
    struct se_engine_stats st;
    se_engine_stats(e, &st);
    *computed = st.n_prefill + st.n_recompute;
    *cached = st.n_cached;
    se_engine_close(e);
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "bench-models/bench-100m";
    n_threads = argc > 2 ? atoi(argv[2]) : (int)sysconf(_SC_NPROCESSORS_ONLN);
    bool full = argc > 3 && !strcmp(argv[3], "--full");
    bool decode_only = argc > 3 && !strcmp(argv[3], "--decode-only");
    char path[1024];
    struct stat st;
    snprintf(path, sizeof(path), "%s/config.json", dir);
    if (stat(path, &st) != 0) {
        char parent[1024];
        snprintf(parent, sizeof(parent), "%s", dir);
        char *slash = strrchr(parent, '/');
        const char *name = slash ? slash + 1 : parent;
        if (slash)
            *slash = 0;
        char cmd[4096];
        snprintf(cmd, sizeof(cmd), "/usr/bin/python3 %s/tests/tools/mkmodel.py '%s' '%s'",
                 SPOOL_SOURCE_ROOT, slash ? parent : ".", name);
        fprintf(stderr, "writing the benchmark model: %s\n", cmd);
        if (system(cmd) != 0) {
            fprintf(stderr, "engine_batching: mkmodel.py failed\n");
            return 1;
        }
    }
    char err[1024];
    if (se_model_open(dir, &model, err, sizeof(err))) {
        fprintf(stderr, "engine_batching: %s\n", err);
        return 1;
    }
    printf("engine_batching: %s, CPU backend, %d threads\n", dir, n_threads);
    static const int batches[] = {1, 8, 32, 64};
    double tps[4];
    int32_t prompt[16];
    for (int b = 0; b < 4; b++) {
        int B = batches[b];
        se_engine_t *e = open_engine(B, 256, true);
        for (int i = 0; i < B; i++) {
            for (int k = 0; k < 16; k++)
                prompt[k] = 5 + (i * 16 + k * 7) % 31000;
            submit(e, prompt, 16, DECODE + 1);
        }
        long dec;
        double ds;
        double total = run(e, &dec, &ds);
        tps[b] = dec / ds;
        printf("  batch %2d: %6ld decode tokens in %.2f s of decode steps: %8.1f tokens/s "
               "(run %.2f s)\n",
               B, dec, ds, tps[b], total);
        se_engine_close(e);
    }
    printf("  speed-up of batch 32 over batch 1: %.1fx (goal 10x)\n", tps[2] / tps[0]);
    /* The engine's own cost: the null backend does no arithmetic. */
    {
        se_engine_t *e = open_engine_on("null", 64, 256, true);
        for (int i = 0; i < 64; i++) {
            for (int k = 0; k < 16; k++)
                prompt[k] = 5 + (i * 16 + k * 7) % 31000;
            submit(e, prompt, 16, 1001);
        }
        long dec;
        double ds;
        run(e, &dec, &ds);
        printf("  engine overhead (null backend, batch 64, 32000-entry vocabulary): %.1f us per "
               "decode step, %.2f us per token\n",
               ds / (dec / 64.0) * 1e6, ds / dec * 1e6);
        se_engine_close(e);
    }
    if (decode_only) {
        se_model_close(model);
        return 0;
    }

    double s_on, s_off;
    long comp_on, cached_on, comp_off, cached_off;
    prefix_run(256, false, &s_on, &comp_on, &cached_on);
    int n_off = full ? 256 : 8;
    prefix_run(n_off, true, &s_off, &comp_off, &cached_off);
    double scale = 256.0 / n_off;
    printf("  prefix cache, 256 prompts of a shared 1000-token system prompt + 8 tokens:\n");
    printf("    with cache:    %7ld prompt tokens computed, %7ld from the cache, %.2f s\n", comp_on,
           cached_on, s_on);
    printf("    without cache: %7.0f prompt tokens computed, %.2f s%s\n", comp_off * scale,
           s_off * scale, full ? "" : " (8 prompts measured, scaled to 256)");
    printf("    saved: %.1f%% of the prefill tokens, %.1fx less time\n",
           100.0 * (1 - comp_on / (comp_off * scale)), s_off * scale / s_on);
    se_model_close(model);
    return 0;
}
