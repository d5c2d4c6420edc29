/*
 * CPU engine benchmark (not part of meson test): prefill and decode speed of
 * the CPU backend on a ~100M-parameter Llama-layout bf16 model, against this
 * machine's memory bandwidth measured in the same run.
 *
 *   engine_cpu [MODEL_DIR] [N_THREADS]
 *
 * MODEL_DIR defaults to bench-models/bench-100m under the current directory
 * and is written by tests/tools/mkmodel.py when it holds no config.json.
 * Decode at batch 1 reads every weight once per token, so its floor is
 * (weight bytes read per token) / (memory bandwidth); the benchmark prints
 * the floor and measured / floor. For real numbers unset OPENBLAS_CORETYPE
 * or set it to SkylakeX (see NOTES.md).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "cpu/cpu.h"
#include "model/weights.h"
#include "spool/error.h"
#include "spool/model.h"
#include "spool_config.h"

#define PROMPT 256
#define DECODE 64
#define BLOCK  16

static size_t mat_bytes(const struct se_tensor *t)
{
    return t ? t->nbytes : 0;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "bench-models/bench-100m";
    int n_threads = argc > 2 ? atoi(argv[2]) : (int)sysconf(_SC_NPROCESSORS_ONLN);
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
            fprintf(stderr, "engine_cpu: mkmodel.py failed\n");
            return 1;
        }
    }
    char err[1024];
    se_model_t *m;
    if (se_model_open(dir, &m, err, sizeof(err))) {
        fprintf(stderr, "engine_cpu: %s\n", err);
        return 1;
    }
    const struct se_model_config *cfg = se_model_get_config(m);
    const struct se_weights *w = se__model_weights(m);
    size_t wbytes = mat_bytes(w->lm_head);
    for (int l = 0; l < w->n_layers; l++) {
        const struct se_layer_weights *L = &w->layers[l];
        wbytes += mat_bytes(L->wq) + mat_bytes(L->wk) + mat_bytes(L->wv) + mat_bytes(L->wo) +
                  mat_bytes(L->w_gate) + mat_bytes(L->w_up) + mat_bytes(L->w_down);
    }

    double bw = bench_membw_gbps((size_t)768 << 20, n_threads);

    struct se_backend be;
    struct se_cpu_opts opts = {.n_threads = n_threads, .max_tokens = PROMPT};
    int n_blocks = (PROMPT + DECODE) / BLOCK + 1;
    if (se__backend_cpu_new(&opts, &be) || be.i->load(be.ctx, cfg, w) ||
        be.i->kv_alloc(be.ctx, n_blocks, BLOCK)) {
        fprintf(stderr, "engine_cpu: backend: %s\n", be.i->last_error(be.ctx));
        return 1;
    }
    int32_t *tokens = malloc(PROMPT * sizeof(int32_t)), *pos = malloc(PROMPT * sizeof(int32_t));
    int32_t *table = malloc((size_t)n_blocks * sizeof(int32_t));
    float *logits = malloc((size_t)cfg->vocab_size * sizeof(float));
    for (int i = 0; i < n_blocks; i++)
        table[i] = i;
    for (int i = 0; i < PROMPT; i++)
        tokens[i] = (int32_t)((i * 7919 + 13) % cfg->vocab_size), pos[i] = i;
    const int32_t *tables[1] = {table};
    int32_t start = 0, ntok = PROMPT, ctx = PROMPT, row = PROMPT - 1;
    struct se_batch b = {.n_tokens = PROMPT,
                         .tokens = tokens,
                         .positions = pos,
                         .n_seqs = 1,
                         .seq_start = &start,
                         .seq_n_tokens = &ntok,
                         .seq_ctx_len = &ctx,
                         .block_tables = tables,
                         .n_logits = 1,
                         .logit_rows = &row};
    double prefill_best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = bench_now();
        if (be.i->forward(be.ctx, &b, logits)) {
            fprintf(stderr, "engine_cpu: %s\n", be.i->last_error(be.ctx));
            return 1;
        }
        double dt = bench_now() - t0;
        if (dt < prefill_best)
            prefill_best = dt;
    }
    /* Decode at batch 1, greedy, after the prompt. */
    ntok = 1;
    b.n_tokens = 1;
    row = 0;
    double t0 = bench_now();
    for (int i = 0; i < DECODE; i++) {
        int best = 0;
        for (int v = 1; v < cfg->vocab_size; v++)
            if (logits[v] > logits[best])
                best = v;
        tokens[0] = best;
        pos[0] = PROMPT + i;
        ctx = PROMPT + i + 1;
        if (be.i->forward(be.ctx, &b, logits)) {
            fprintf(stderr, "engine_cpu: %s\n", be.i->last_error(be.ctx));
            return 1;
        }
    }
    double decode_s = (bench_now() - t0) / DECODE;
    double floor_s = wbytes / (bw * 1e9);
    const char *ct = getenv("OPENBLAS_CORETYPE");
    printf("model            %s (%s, %.1fM parameters, %s)\n", dir, cfg->arch_name,
           cfg->n_params / 1e6, se_dtype_name(cfg->dtype));
    printf("threads          %d (OPENBLAS_CORETYPE=%s)\n", n_threads, ct ? ct : "unset");
    printf("memory bandwidth %.1f GB/s (STREAM triad, bench_membw_gbps)\n", bw);
    printf("prefill          %.0f tokens/s (%d-token prompt, one pass)\n", PROMPT / prefill_best,
           PROMPT);
    printf("decode           %.1f tokens/s, %.2f ms/token (batch 1, %d tokens)\n", 1 / decode_s,
           decode_s * 1e3, DECODE);
    printf("decode floor     %.2f ms/token (%.1f MB of weights per token / bandwidth)\n",
           floor_s * 1e3, wbytes / 1e6);
    printf("measured/floor   %.2f\n", decode_s / floor_s);
    free(tokens);
    free(pos);
    free(table);
    free(logits);
    be.i->free(be.ctx);
    se_model_close(m);
    return 0;
}
