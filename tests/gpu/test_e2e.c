/*
 * End-to-end GPU test: the CPU backend (engine/cpu, fp32) and the CUDA
 * backend (engine/cuda, bf16) run the same tiny test models of
 * tests/tools/mkmodel.py over the same batches.
 *
 * For each model, N_PROMPTS random prompts (1 to MAX_PROMPT tokens) are
 * decoded greedily for N_GEN tokens by both backends, GROUP sequences at a
 * time in one flattened batch: each pass gives every sequence its next prompt
 * chunk (at most CHUNK tokens: chunked prefill) or its last generated token
 * (decode), so that passes mix prefill and decode until the shortest prompts
 * are done, and pure-decode passes (CUDA graphs on the CUDA backend) follow.
 * Block tables are interleaved and reversed, so that no sequence's blocks
 * are contiguous. Each backend continues with its own greedy token.
 *
 * Checks, per model:
 * - logits: wherever both backends have seen the same tokens so far, the
 *   relative L2 error of the CUDA logits against the CPU's is at most
 *   LOGITS_TOL (bf16 weights and activations round at 2^-9 relative);
 * - greedy tokens: at least 95% of the prompts produce all N_GEN tokens equal
 *   to the CPU's. The others are listed with the step of the first divergence
 *   and the CPU's gap between its two best logits there (a near-tie may go
 *   either way in bf16).
 *
 * Usage: gpu_e2e MODELS_DIR [NAME...]   (default: every model in MODELS_DIR
 * but bench-*). Exits 77 without a GPU, 1 when a model fails, 0 otherwise.
 */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cpu/cpu.h"
#include "cuda/backend_cuda.h"
#include "model/weights.h"
#include "spool/engine.h"

#define N_PROMPTS   200
#define N_GEN       32
#define MAX_PROMPT  64
#define GROUP       50 /* sequences decoded together */
#define CHUNK       7  /* most prompt tokens of one sequence in one pass */
#define BLOCK       16
#define MAX_CTX     (MAX_PROMPT + N_GEN)
#define SEQ_BLOCKS  ((MAX_CTX + BLOCK - 1) / BLOCK)
#define N_BLOCKS    (GROUP * SEQ_BLOCKS)
#define MAX_BATCH   (GROUP * CHUNK)
#define LOGITS_TOL  2e-2
#define MIN_MATCHED (N_PROMPTS * 95 / 100)
#define MAX_LISTED  20 /* differing prompts printed per model */

/* One prompt's decoding by both backends (k = 0: CPU, 1: CUDA). */
struct seq {
    int32_t toks[2][MAX_CTX];
    int n_prompt, n, cached, gen;
    int diverged;       /* step of the first different token + 1; 0 = none */
    int32_t div_tok[2]; /* the two tokens there */
    float div_margin;   /* the CPU's best minus second-best logit there */
};

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static int rnd(int n)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (int)(rng % (uint64_t)n);
}

static int argmax(const float *x, int n)
{
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* The gap between the best and the second-best logit. */
static float margin(const float *x, int n)
{
    int b = argmax(x, n);
    float second = -INFINITY;
    for (int i = 0; i < n; i++)
        if (i != b && x[i] > second)
            second = x[i];
    return x[b] - second;
}

static double rel_err(const float *ref, const float *x, int n)
{
    double num = 0, den = 0;
    for (int i = 0; i < n; i++) {
        num += (double)(x[i] - ref[i]) * (x[i] - ref[i]);
        den += (double)ref[i] * ref[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

/* Per-pass batch arrays (one token array per backend; the rest is shared). */
struct pass {
    int32_t tokens[2][MAX_BATCH], positions[MAX_BATCH];
    int32_t seq_start[GROUP], seq_n[GROUP], seq_ctx[GROUP], logit_rows[GROUP];
    const int32_t *tables[GROUP];
    int seq_of_row[GROUP]; /* group index of each logits row's sequence */
};

struct stats {
    double worst, sum;
    long n_rows;
};

/*
 * Decodes sequences s[0..n) to the end with both backends. Returns 0, or -1
 * after printing the backend's error.
 */
static int run_group(struct se_backend *be[2], int vocab, struct seq *s, int n,
                     int32_t (*tables)[SEQ_BLOCKS], float *lg[2], struct pass *p, struct stats *st)
{
    for (;;) {
        int nt = 0, ns = 0, nl = 0;
        for (int i = 0; i < n; i++) {
            struct seq *q = &s[i];
            if (q->gen >= N_GEN)
                continue;
            const int take = q->n - q->cached < CHUNK ? q->n - q->cached : CHUNK;
            p->seq_start[ns] = nt;
            p->seq_n[ns] = take;
            p->seq_ctx[ns] = q->cached + take;
            p->tables[ns] = tables[i];
            for (int t = 0; t < take; t++) {
                p->tokens[0][nt + t] = q->toks[0][q->cached + t];
                p->tokens[1][nt + t] = q->toks[1][q->cached + t];
                p->positions[nt + t] = q->cached + t;
            }
            nt += take;
            if (q->cached + take == q->n) {
                p->logit_rows[nl] = nt - 1;
                p->seq_of_row[nl++] = i;
            }
            ns++;
        }
        if (ns == 0)
            return 0;
        for (int k = 0; k < 2; k++) {
            const struct se_batch b = {.n_tokens = nt,
                                       .tokens = p->tokens[k],
                                       .positions = p->positions,
                                       .n_seqs = ns,
                                       .seq_start = p->seq_start,
                                       .seq_n_tokens = p->seq_n,
                                       .seq_ctx_len = p->seq_ctx,
                                       .block_tables = p->tables,
                                       .n_logits = nl,
                                       .logit_rows = p->logit_rows};
            if (be[k]->i->forward(be[k]->ctx, &b, lg[k])) {
                fprintf(stderr, "%s forward (%d tokens, %d sequences): %s\n", be[k]->i->name, nt,
                        ns, be[k]->i->last_error(be[k]->ctx));
                return -1;
            }
        }
        for (int i = 0; i < n; i++)
            if (s[i].gen < N_GEN)
                s[i].cached += s[i].n - s[i].cached < CHUNK ? s[i].n - s[i].cached : CHUNK;
        for (int r = 0; r < nl; r++) {
            struct seq *q = &s[p->seq_of_row[r]];
            const float *c = lg[0] + (size_t)r * vocab, *g = lg[1] + (size_t)r * vocab;
            const int32_t t0 = argmax(c, vocab), t1 = argmax(g, vocab);
            if (!q->diverged) {
                /* Same tokens so far: the logits must agree. */
                const double e = rel_err(c, g, vocab);
                st->worst = e > st->worst ? e : st->worst;
                st->sum += e;
                st->n_rows++;
                if (t0 != t1) {
                    q->diverged = q->gen + 1;
                    q->div_tok[0] = t0;
                    q->div_tok[1] = t1;
                    q->div_margin = margin(c, vocab);
                }
            }
            q->toks[0][q->n] = t0;
            q->toks[1][q->n] = t1;
            q->n++;
            q->gen++;
        }
    }
}

/* Runs one model directory; returns 0 when it passes, 1 when it fails. */
static int run_model(const char *dir, const char *name)
{
    char path[4096], err[512];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    se_model_t *m;
    if (se_model_open(path, &m, err, sizeof(err))) {
        fprintf(stderr, "FAIL %s: %s\n", name, err);
        return 1;
    }
    const struct se_model_config *cfg = se_model_get_config(m);
    const int vocab = cfg->vocab_size;
    struct se_backend cpu = {0}, gpu = {0};
    const struct se_cpu_opts copts = {.n_threads = 0, .max_tokens = MAX_BATCH};
    int rc = se__backend_cpu_new(&copts, &cpu);
    if (rc) {
        fprintf(stderr, "FAIL %s: CPU backend: %s\n", name, sp_strerror(rc));
        se_model_close(m);
        return 1;
    }
    rc = se__backend_cuda_new(0, 0.5f, &gpu, err, sizeof(err));
    if (rc) {
        fprintf(stderr, "FAIL %s: CUDA backend: %s\n", name, err);
        cpu.i->free(cpu.ctx);
        se_model_close(m);
        return 1;
    }
    struct se_backend *be[2] = {&cpu, &gpu};
    int failed = 0;
    for (int k = 0; k < 2 && !failed; k++)
        if (be[k]->i->load(be[k]->ctx, cfg, se__model_weights(m)) ||
            be[k]->i->kv_alloc(be[k]->ctx, N_BLOCKS, BLOCK)) {
            fprintf(stderr, "FAIL %s: %s backend: %s\n", name, be[k]->i->name,
                    be[k]->i->last_error(be[k]->ctx));
            failed = 1;
        }

    struct seq *s = calloc(N_PROMPTS, sizeof(*s));
    struct pass *p = calloc(1, sizeof(*p));
    int32_t(*tables)[SEQ_BLOCKS] = calloc(GROUP, sizeof(*tables));
    float *lg[2] = {malloc((size_t)GROUP * vocab * sizeof(float)),
                    malloc((size_t)GROUP * vocab * sizeof(float))};
    if (!s || !p || !tables || !lg[0] || !lg[1]) {
        fprintf(stderr, "FAIL %s: out of memory\n", name);
        failed = 1;
    }
    /* Sequence i of a group owns blocks N_BLOCKS-1-(j*GROUP+i), j = 0..SEQ_BLOCKS-1. */
    for (int i = 0; i < GROUP && !failed; i++)
        for (int j = 0; j < SEQ_BLOCKS; j++)
            tables[i][j] = N_BLOCKS - 1 - (j * GROUP + i);
    for (int i = 0; i < N_PROMPTS && !failed; i++) {
        s[i].n_prompt = s[i].n = 1 + rnd(MAX_PROMPT);
        for (int t = 0; t < s[i].n; t++)
            s[i].toks[0][t] = s[i].toks[1][t] = rnd(vocab);
    }
    struct stats st = {0};
    for (int g = 0; g < N_PROMPTS && !failed; g += GROUP) {
        const int n = N_PROMPTS - g < GROUP ? N_PROMPTS - g : GROUP;
        if (run_group(be, vocab, s + g, n, tables, lg, p, &st))
            failed = 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);

    if (!failed) {
        int matched = 0;
        for (int i = 0; i < N_PROMPTS; i++)
            matched += !s[i].diverged;
        const int ok = st.worst <= LOGITS_TOL && matched >= MIN_MATCHED;
        printf("%s %-13s %3d/%d prompts x %d greedy tokens equal, logits rel err worst %.2e "
               "mean %.2e over %ld rows, %.1f s\n",
               ok ? "ok  " : "FAIL", name, matched, N_PROMPTS, N_GEN, st.worst,
               st.n_rows ? st.sum / (double)st.n_rows : 0.0, st.n_rows,
               (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
        /* The prompts that differ, the first MAX_LISTED of them in full. */
        int listed = 0;
        for (int i = 0; i < N_PROMPTS; i++)
            if (s[i].diverged && listed++ < MAX_LISTED)
                printf("     %-13s prompt %3d (%2d tokens): first different token at step %2d: "
                       "CPU %d, CUDA %d (CPU's top-2 gap %.3g)\n",
                       name, i, s[i].n_prompt, s[i].diverged - 1, s[i].div_tok[0], s[i].div_tok[1],
                       (double)s[i].div_margin);
        if (listed > MAX_LISTED)
            printf("     %-13s and %d more prompts\n", name, listed - MAX_LISTED);
        if (st.worst > LOGITS_TOL)
            printf("     %-13s logits differ by more than %.0e (relative L2)\n", name, LOGITS_TOL);
        failed = !ok;
    }
    free(lg[0]);
    free(lg[1]);
    free(tables);
    free(p);
    free(s);
    cpu.i->free(cpu.ctx);
    gpu.i->free(gpu.ctx);
    se_model_close(m);
    fflush(stdout);
    return failed;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
    char err[256];
    if (argc < 2) {
        fprintf(stderr, "usage: gpu_e2e MODELS_DIR [NAME...]\n");
        return 2;
    }
    if (se_cuda_devices(err, sizeof(err)) <= 0) {
        printf("no GPU: skipped (%s)\n", err);
        return 77;
    }
    const char *dir = argv[1];
    char *names[64];
    int n = 0;
    if (argc > 2) {
        for (int i = 2; i < argc && n < 64; i++)
            names[n++] = argv[i];
    } else {
        DIR *d = opendir(dir);
        if (!d) {
            fprintf(stderr,
                    "gpu_e2e: cannot open %s (build the test models: ninja -C BUILD "
                    "tests/models.stamp)\n",
                    dir);
            return 1;
        }
        struct dirent *e;
        char cfg[4096];
        struct stat sb;
        while ((e = readdir(d)) && n < 64) {
            snprintf(cfg, sizeof(cfg), "%s/%s/config.json", dir, e->d_name);
            if (e->d_name[0] != '.' && strncmp(e->d_name, "bench", 5) && !stat(cfg, &sb))
                names[n++] = strdup(e->d_name);
        }
        closedir(d);
        qsort(names, (size_t)n, sizeof(names[0]), cmp_str);
    }
    if (n == 0) {
        fprintf(stderr, "gpu_e2e: no models in %s\n", dir);
        return 1;
    }
    int failures = 0;
    for (int i = 0; i < n; i++)
        failures += run_model(dir, names[i]);
    printf("%d passed, %d failed\n", n - failures, failures);
    if (argc == 2)
        for (int i = 0; i < n; i++)
            free(names[i]);
    return failures ? 1 : 0;
}
