/*
 * The CPU backend (see cpu.h): load, paged KV cache, forward.
 */
#include "cpu.h"

#include <cblas.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kernels.h"
#include "pool.h"
#include "spool/error.h"

struct cpu_layer {
    float *attn_norm, *ffn_norm, *bq, *bk, *bv; /* small: fp32 copies */
    struct se_mat wq, wk, wv, wo, w_gate, w_up, w_down;
};

struct cpu {
    struct se_model_config cfg;
    int max_tokens;
    struct se_pool *pool;
    char err[512];

    /*
     * Matrices stay in their storage dtype, in the model's mapping (f32 ones
     * are copied only when misaligned: owned[]); vectors are fp32 copies.
     */
    struct se_mat embed, lm_head;
    float *final_norm;
    struct cpu_layer *layers;
    float **owned;
    int n_owned;
    size_t max_mat; /* elements of the largest 16-bit matrix, for wscratch */

    /* Paged KV cache: per layer, (n_blocks, block_size, n_kv_heads, head_dim). */
    int n_blocks, block_size, max_ctx;
    float **k_cache, **v_cache;
    /* Rotary table: (max_ctx, head_dim / 2) cosines and sines. */
    float *rope_cos, *rope_sin;

    /* Scratch, sized for max_tokens at kv_alloc. */
    float *x, *xn, *q, *k, *v, *att, *tmp, *gate, *up, *rows;
    float *scores;   /* (n_threads, max_ctx) */
    float *wscratch; /* a 16-bit matrix widened for sgemm (max_mat floats) */

    /* The batch being run, for the attention job. */
    const struct se_batch *batch;
    int layer;
};

static int fail(struct cpu *c, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct cpu *c, int rc, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof(c->err), fmt, ap);
    va_end(ap);
    return rc;
}

static float *convert(const struct se_tensor *t)
{
    if (!t)
        return NULL;
    size_t n = t->nbytes / (t->dtype == SE_DTYPE_F32 ? 4 : 2);
    float *f = malloc(n ? n * sizeof(float) : 1);
    if (f)
        se__to_f32(f, t->data, t->dtype, n);
    return f;
}

/* Takes ownership of f (freed with the backend); false when out of memory. */
static bool own(struct cpu *c, float *f)
{
    float **no = realloc(c->owned, (size_t)(c->n_owned + 1) * sizeof(*no));
    if (!no)
        return false;
    c->owned = no;
    c->owned[c->n_owned++] = f;
    return true;
}

static int mat(struct cpu *c, const struct se_tensor *t, struct se_mat *m)
{
    m->dtype = t->dtype;
    m->rows = (int)t->shape[0];
    m->cols = (int)t->shape[1];
    m->data = t->data;
    size_t n = (size_t)m->rows * m->cols;
    if (t->dtype == SE_DTYPE_F32 && (uintptr_t)t->data % sizeof(float)) {
        float *f = convert(t);
        if (!f || !own(c, f)) {
            free(f);
            return SP_ENOMEM;
        }
        m->data = f;
    }
    if (t->dtype != SE_DTYPE_F32 && n > c->max_mat)
        c->max_mat = n;
    return 0;
}

/*
 * The budget for fp32 copies of the 16-bit matrices: SPOOL_CPU_F32_BYTES
 * when set (0 turns the copies off), else a quarter of physical memory.
 */
static size_t f32_budget(void)
{
    const char *env = getenv("SPOOL_CPU_F32_BYTES");
    if (env && *env)
        return (size_t)strtoull(env, NULL, 10);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    return pages > 0 && psz > 0 ? (size_t)pages / 4 * (size_t)psz : 0;
}

/* The k-th of the matrices se__linear multiplies: 7 per layer, then lm_head. */
static struct se_mat *gemm_mat(struct cpu *c, int k)
{
    if (k == 7 * c->cfg.n_layers)
        return &c->lm_head;
    struct cpu_layer *L = &c->layers[k / 7];
    struct se_mat *m[7] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
    return m[k % 7];
}

/*
 * Widens every 16-bit matrix that sgemm multiplies (the layers' and lm_head,
 * not the embedding, which is only read by row) to a transposed fp32 copy once, so that
 * batches of 16 tokens and more stop paying a conversion per product: 4 more
 * bytes per parameter, made only when all of them fit f32_budget(); otherwise
 * (or out of memory) sgemm keeps widening into wscratch per call. Decode
 * below 16 tokens still reads the 16-bit weights.
 */
static void make_f32_copies(struct cpu *c)
{
    int n_mats = 7 * c->cfg.n_layers + 1;
    size_t total = 0;
    for (int k = 0; k < n_mats; k++) {
        struct se_mat *m = gemm_mat(c, k);
        if (m->dtype != SE_DTYPE_F32)
            total += (size_t)m->rows * m->cols * sizeof(float);
    }
    if (total == 0 || total > f32_budget())
        return;
    for (int k = 0; k < n_mats; k++) {
        struct se_mat *m = gemm_mat(c, k);
        if (m->dtype == SE_DTYPE_F32)
            continue;
        float *f = malloc((size_t)m->rows * m->cols * sizeof(float));
        if (!f || !own(c, f)) {
            free(f);
            return; /* the rest keep the per-call widening */
        }
        se__widen_transposed(c->pool, f, m);
        m->f32 = f;
    }
    c->max_mat = 0; /* every product has its copy: no scratch needed */
}

static void free_layer(struct cpu_layer *L)
{
    free(L->attn_norm);
    free(L->ffn_norm);
    free(L->bq);
    free(L->bk);
    free(L->bv);
}

static int cpu_load(void *ctx, const struct se_model_config *cfg, const struct se_weights *w)
{
    struct cpu *c = ctx;
    if (c->layers)
        return fail(c, SP_ESTATE, "cpu backend: load called twice");
    c->cfg = *cfg;
    c->layers = calloc((size_t)cfg->n_layers, sizeof(*c->layers));
    c->final_norm = convert(w->final_norm);
    if (!c->layers || !c->final_norm || mat(c, w->embed, &c->embed) ||
        mat(c, w->lm_head, &c->lm_head))
        return fail(c, SP_ENOMEM, "cpu backend: out of memory loading the weights");
    for (int i = 0; i < cfg->n_layers; i++) {
        const struct se_layer_weights *s = &w->layers[i];
        struct cpu_layer *L = &c->layers[i];
        L->attn_norm = convert(s->attn_norm);
        L->ffn_norm = convert(s->ffn_norm);
        L->bq = convert(s->bq);
        L->bk = convert(s->bk);
        L->bv = convert(s->bv);
        if (!L->attn_norm || !L->ffn_norm || (cfg->qkv_bias && (!L->bq || !L->bk || !L->bv)) ||
            mat(c, s->wq, &L->wq) || mat(c, s->wk, &L->wk) || mat(c, s->wv, &L->wv) ||
            mat(c, s->wo, &L->wo) || mat(c, s->w_gate, &L->w_gate) || mat(c, s->w_up, &L->w_up) ||
            mat(c, s->w_down, &L->w_down))
            return fail(c, SP_ENOMEM, "cpu backend: out of memory loading layer %d", i);
    }
    make_f32_copies(c);
    return 0;
}

static size_t kv_block_bytes(const struct cpu *c, int block_size)
{
    return 2 * (size_t)c->cfg.n_layers * (size_t)block_size * (size_t)c->cfg.n_kv_heads *
           (size_t)c->cfg.head_dim * sizeof(float);
}

static int cpu_kv_blocks_for(void *ctx, size_t bytes, int block_size)
{
    struct cpu *c = ctx;
    if (!c->layers || block_size <= 0)
        return 0;
    size_t n = bytes / kv_block_bytes(c, block_size);
    return n > (size_t)(1 << 30) ? 1 << 30 : (int)n;
}

/* Inverse frequencies, with Llama 3's scaling when configured (as transformers'
 * _compute_llama3_parameters). */
static void inv_freqs(const struct se_model_config *cfg, double *f)
{
    int half = cfg->head_dim / 2;
    for (int k = 0; k < half; k++) {
        double inv = 1.0 / pow(cfg->rope_theta, (2.0 * k) / cfg->head_dim);
        if (cfg->rope_llama3) {
            double old = cfg->rope_original_max_position;
            double low_wl = old / cfg->rope_low_freq_factor;
            double high_wl = old / cfg->rope_high_freq_factor;
            double wl = 2 * M_PI / inv;
            if (wl > low_wl) {
                inv = inv / cfg->rope_factor;
            } else if (wl >= high_wl) {
                double smooth = (old / wl - cfg->rope_low_freq_factor) /
                                (cfg->rope_high_freq_factor - cfg->rope_low_freq_factor);
                inv = (1 - smooth) * inv / cfg->rope_factor + smooth * inv;
            }
        }
        f[k] = inv;
    }
}

static int cpu_kv_alloc(void *ctx, int n_blocks, int block_size)
{
    struct cpu *c = ctx;
    const struct se_model_config *cfg = &c->cfg;
    if (!c->layers)
        return fail(c, SP_ESTATE, "cpu backend: kv_alloc before load");
    if (c->k_cache)
        return fail(c, SP_ESTATE, "cpu backend: kv_alloc called twice");
    if (n_blocks <= 0 || block_size <= 0)
        return fail(c, SP_EINVAL, "cpu backend: kv_alloc needs positive n_blocks and block_size");
    c->n_blocks = n_blocks;
    c->block_size = block_size;
    int64_t cap = (int64_t)n_blocks * block_size;
    c->max_ctx = cap < cfg->max_position ? (int)cap : cfg->max_position;
    size_t per_layer = (size_t)n_blocks * block_size * cfg->n_kv_heads * cfg->head_dim;
    c->k_cache = calloc((size_t)cfg->n_layers, sizeof(float *));
    c->v_cache = calloc((size_t)cfg->n_layers, sizeof(float *));
    if (!c->k_cache || !c->v_cache)
        return fail(c, SP_ENOMEM, "cpu backend: out of memory");
    for (int l = 0; l < cfg->n_layers; l++) {
        c->k_cache[l] = calloc(per_layer, sizeof(float));
        c->v_cache[l] = calloc(per_layer, sizeof(float));
        if (!c->k_cache[l] || !c->v_cache[l])
            return fail(c, SP_ENOMEM, "cpu backend: out of memory for %d KV blocks", n_blocks);
    }
    int half = cfg->head_dim / 2;
    double *f = malloc((size_t)half * sizeof(double));
    c->rope_cos = malloc((size_t)c->max_ctx * half * sizeof(float));
    c->rope_sin = malloc((size_t)c->max_ctx * half * sizeof(float));
    if (!f || !c->rope_cos || !c->rope_sin) {
        free(f);
        return fail(c, SP_ENOMEM, "cpu backend: out of memory");
    }
    inv_freqs(cfg, f);
    for (int p = 0; p < c->max_ctx; p++)
        for (int k = 0; k < half; k++) {
            double a = p * f[k];
            c->rope_cos[(size_t)p * half + k] = (float)cos(a);
            c->rope_sin[(size_t)p * half + k] = (float)sin(a);
        }
    free(f);

    size_t T = (size_t)c->max_tokens, h = (size_t)cfg->hidden_size,
           qd = (size_t)cfg->n_heads * cfg->head_dim, kvd = (size_t)cfg->n_kv_heads * cfg->head_dim,
           ff = (size_t)cfg->intermediate_size;
    c->x = malloc(T * h * sizeof(float));
    c->xn = malloc(T * h * sizeof(float));
    c->tmp = malloc(T * h * sizeof(float));
    c->rows = malloc(T * h * sizeof(float));
    c->q = malloc(T * qd * sizeof(float));
    c->att = malloc(T * qd * sizeof(float));
    c->k = malloc(T * kvd * sizeof(float));
    c->v = malloc(T * kvd * sizeof(float));
    c->gate = malloc(T * ff * sizeof(float));
    c->up = malloc(T * ff * sizeof(float));
    c->scores = malloc((size_t)se__pool_size(c->pool) * c->max_ctx * sizeof(float));
    if (c->max_mat && !(c->wscratch = malloc(c->max_mat * sizeof(float))))
        return fail(c, SP_ENOMEM, "cpu backend: out of memory for scratch buffers");
    if (!c->x || !c->xn || !c->tmp || !c->rows || !c->q || !c->att || !c->k || !c->v || !c->gate ||
        !c->up || !c->scores)
        return fail(c, SP_ENOMEM, "cpu backend: out of memory for scratch buffers");
    return 0;
}

/* Finds the sequence of batch token t (sequences are contiguous and in order). */
static int seq_of(const struct se_batch *b, int t, int hint)
{
    int s = hint;
    while (s + 1 < b->n_seqs && t >= b->seq_start[s + 1])
        s++;
    while (s > 0 && t < b->seq_start[s])
        s--;
    return s;
}

/* Attention for (token, head) pairs split across threads. */
static void attention_part(void *arg, int ti, int nt)
{
    struct cpu *c = arg;
    const struct se_batch *b = c->batch;
    const struct se_model_config *cfg = &c->cfg;
    int hd = cfg->head_dim, nh = cfg->n_heads, group = cfg->n_heads / cfg->n_kv_heads;
    int kvd = cfg->n_kv_heads * hd, bs = c->block_size;
    const float *kc = c->k_cache[c->layer], *vc = c->v_cache[c->layer];
    float *sc = c->scores + (size_t)ti * c->max_ctx;
    float scale = 1.0f / sqrtf((float)hd);
    int64_t total = (int64_t)b->n_tokens * nh;
    int64_t w0 = total * ti / nt, w1 = total * (ti + 1) / nt;
    int s = 0;
    for (int64_t w = w0; w < w1; w++) {
        int t = (int)(w / nh), h = (int)(w % nh), kvh = h / group;
        s = seq_of(b, t, s);
        const int32_t *bt = b->block_tables[s];
        int n_ctx = b->positions[t] + 1;
        const float *qv = c->q + (size_t)t * nh * hd + (size_t)h * hd;
        float mx = -INFINITY;
        for (int p = 0; p < n_ctx; p++) {
            size_t off = ((size_t)bt[p / bs] * bs + p % bs) * kvd + (size_t)kvh * hd;
            sc[p] = se__dot(qv, kc + off, hd) * scale;
            if (sc[p] > mx)
                mx = sc[p];
        }
        double sum = 0;
        for (int p = 0; p < n_ctx; p++) {
            sc[p] = expf(sc[p] - mx);
            sum += sc[p];
        }
        float inv = (float)(1.0 / sum);
        float *o = c->att + (size_t)t * nh * hd + (size_t)h * hd;
        memset(o, 0, (size_t)hd * sizeof(float));
        for (int p = 0; p < n_ctx; p++) {
            size_t off = ((size_t)bt[p / bs] * bs + p % bs) * kvd + (size_t)kvh * hd;
            se__axpy(o, sc[p] * inv, vc + off, hd);
        }
    }
}

static int check_batch(struct cpu *c, const struct se_batch *b)
{
    if (!c->k_cache)
        return fail(c, SP_ESTATE, "cpu backend: forward before kv_alloc");
    if (b->n_tokens <= 0 || b->n_tokens > c->max_tokens)
        return fail(c, SP_EINVAL, "cpu backend: batch of %d tokens (1 to %d allowed)", b->n_tokens,
                    c->max_tokens);
    if (b->n_logits < 0 || b->n_logits > b->n_tokens || b->n_seqs <= 0)
        return fail(c, SP_EINVAL, "cpu backend: bad n_logits or n_seqs");
    int next = 0;
    for (int s = 0; s < b->n_seqs; s++) {
        if (b->seq_start[s] != next || b->seq_n_tokens[s] <= 0)
            return fail(c, SP_EINVAL, "cpu backend: sequence %d is not contiguous in the batch", s);
        next += b->seq_n_tokens[s];
        int ctx = b->seq_ctx_len[s];
        if (ctx > c->max_ctx)
            return fail(c, SP_ECONTEXT, "cpu backend: sequence %d reaches %d tokens (limit %d)", s,
                        ctx, c->max_ctx);
        for (int j = 0; j < b->seq_n_tokens[s]; j++) {
            int t = b->seq_start[s] + j;
            if (b->positions[t] != ctx - b->seq_n_tokens[s] + j)
                return fail(c, SP_EINVAL,
                            "cpu backend: token %d of sequence %d has position %d, expected %d", t,
                            s, b->positions[t], ctx - b->seq_n_tokens[s] + j);
            if (b->tokens[t] < 0 || b->tokens[t] >= c->cfg.vocab_size)
                return fail(c, SP_EINVAL, "cpu backend: token id %d outside the vocabulary (%d)",
                            b->tokens[t], c->cfg.vocab_size);
        }
        for (int k = 0; k < (ctx + c->block_size - 1) / c->block_size; k++)
            if (b->block_tables[s][k] < 0 || b->block_tables[s][k] >= c->n_blocks)
                return fail(c, SP_EINVAL, "cpu backend: sequence %d uses KV block %d of %d", s,
                            b->block_tables[s][k], c->n_blocks);
    }
    if (next != b->n_tokens)
        return fail(c, SP_EINVAL, "cpu backend: sequences cover %d of %d tokens", next,
                    b->n_tokens);
    for (int r = 0; r < b->n_logits; r++)
        if (b->logit_rows[r] < 0 || b->logit_rows[r] >= b->n_tokens)
            return fail(c, SP_EINVAL, "cpu backend: logit row %d outside the batch",
                        b->logit_rows[r]);
    return 0;
}

static void write_kv(struct cpu *c, const struct se_batch *b, int layer)
{
    int kvd = c->cfg.n_kv_heads * c->cfg.head_dim, bs = c->block_size, s = 0;
    for (int t = 0; t < b->n_tokens; t++) {
        s = seq_of(b, t, s);
        int p = b->positions[t];
        size_t off = ((size_t)b->block_tables[s][p / bs] * bs + p % bs) * kvd;
        memcpy(c->k_cache[layer] + off, c->k + (size_t)t * kvd, (size_t)kvd * sizeof(float));
        memcpy(c->v_cache[layer] + off, c->v + (size_t)t * kvd, (size_t)kvd * sizeof(float));
    }
}

static int cpu_forward(void *ctx, const struct se_batch *b, float *logits)
{
    struct cpu *c = ctx;
    int rc = check_batch(c, b);
    if (rc)
        return rc;
    const struct se_model_config *cfg = &c->cfg;
    int n = b->n_tokens, h = cfg->hidden_size, hd = cfg->head_dim, half = hd / 2;
    int qd = cfg->n_heads * hd, kvd = cfg->n_kv_heads * hd, ff = cfg->intermediate_size;
    struct se_pool *pool = c->pool;

    size_t esz = c->embed.dtype == SE_DTYPE_F32 ? 4 : 2;
    for (int t = 0; t < n; t++)
        se__to_f32(c->x + (size_t)t * h,
                   (const uint8_t *)c->embed.data + (size_t)b->tokens[t] * h * esz, c->embed.dtype,
                   (size_t)h);
    for (int l = 0; l < cfg->n_layers; l++) {
        const struct cpu_layer *L = &c->layers[l];
        for (int t = 0; t < n; t++)
            se__rmsnorm(c->xn + (size_t)t * h, c->x + (size_t)t * h, L->attn_norm, h, cfg->rms_eps);
        float *qkv_out[3] = {c->q, c->k, c->v};
        const struct se_mat *qkv[3] = {&L->wq, &L->wk, &L->wv};
        const float *qkv_bias[3] = {L->bq, L->bk, L->bv};
        se__linear_fused(pool, 3, qkv_out, c->xn, n, qkv, qkv_bias, c->wscratch);
        for (int t = 0; t < n; t++) {
            size_t p = (size_t)b->positions[t] * half;
            se__rope(c->q + (size_t)t * qd, cfg->n_heads, hd, c->rope_cos + p, c->rope_sin + p);
            se__rope(c->k + (size_t)t * kvd, cfg->n_kv_heads, hd, c->rope_cos + p, c->rope_sin + p);
        }
        write_kv(c, b, l);
        c->batch = b;
        c->layer = l;
        se__pool_run(pool, attention_part, c);
        se__linear(pool, c->tmp, c->att, n, &L->wo, NULL, c->wscratch);
        for (size_t k = 0; k < (size_t)n * h; k++)
            c->x[k] += c->tmp[k];
        for (int t = 0; t < n; t++)
            se__rmsnorm(c->xn + (size_t)t * h, c->x + (size_t)t * h, L->ffn_norm, h, cfg->rms_eps);
        float *gu_out[2] = {c->gate, c->up};
        const struct se_mat *gu[2] = {&L->w_gate, &L->w_up};
        const float *gu_bias[2] = {NULL, NULL};
        se__linear_fused(pool, 2, gu_out, c->xn, n, gu, gu_bias, c->wscratch);
        for (size_t k = 0; k < (size_t)n * ff; k++) {
            float g = c->gate[k];
            c->gate[k] = g / (1.0f + expf(-g)) * c->up[k];
        }
        se__linear(pool, c->tmp, c->gate, n, &L->w_down, NULL, c->wscratch);
        for (size_t k = 0; k < (size_t)n * h; k++)
            c->x[k] += c->tmp[k];
    }
    if (b->n_logits == 0)
        return 0;
    for (int r = 0; r < b->n_logits; r++)
        se__rmsnorm(c->rows + (size_t)r * h, c->x + (size_t)b->logit_rows[r] * h, c->final_norm, h,
                    cfg->rms_eps);
    se__linear(pool, logits, c->rows, b->n_logits, &c->lm_head, NULL, c->wscratch);
    return 0;
}

static int cpu_kv_copy(void *ctx, int dst, int src)
{
    struct cpu *c = ctx;
    if (!c->k_cache || dst < 0 || src < 0 || dst >= c->n_blocks || src >= c->n_blocks)
        return fail(c, SP_EINVAL, "cpu backend: kv_copy of block %d to %d out of range", src, dst);
    size_t blk = (size_t)c->block_size * c->cfg.n_kv_heads * c->cfg.head_dim;
    for (int l = 0; l < c->cfg.n_layers; l++) {
        memcpy(c->k_cache[l] + (size_t)dst * blk, c->k_cache[l] + (size_t)src * blk,
               blk * sizeof(float));
        memcpy(c->v_cache[l] + (size_t)dst * blk, c->v_cache[l] + (size_t)src * blk,
               blk * sizeof(float));
    }
    return 0;
}

static const char *cpu_last_error(void *ctx)
{
    return ((struct cpu *)ctx)->err;
}

static void cpu_free(void *ctx)
{
    struct cpu *c = ctx;
    if (!c)
        return;
    if (c->layers)
        for (int i = 0; i < c->cfg.n_layers; i++)
            free_layer(&c->layers[i]);
    free(c->layers);
    for (int i = 0; i < c->n_owned; i++)
        free(c->owned[i]);
    free(c->owned);
    free(c->final_norm);
    free(c->wscratch);
    for (int l = 0; c->k_cache && l < c->cfg.n_layers; l++)
        free(c->k_cache[l]);
    for (int l = 0; c->v_cache && l < c->cfg.n_layers; l++)
        free(c->v_cache[l]);
    free(c->k_cache);
    free(c->v_cache);
    float *bufs[] = {c->rope_cos, c->rope_sin, c->x,    c->xn, c->q,    c->k,     c->v,
                     c->att,      c->tmp,      c->gate, c->up, c->rows, c->scores};
    for (size_t i = 0; i < sizeof(bufs) / sizeof(bufs[0]); i++)
        free(bufs[i]);
    se__pool_free(c->pool);
    free(c);
}

static const struct se_backend_i cpu_i = {
    .name = "cpu",
    .load = cpu_load,
    .kv_blocks_for = cpu_kv_blocks_for,
    .kv_alloc = cpu_kv_alloc,
    .forward = cpu_forward,
    .kv_copy = cpu_kv_copy,
    .last_error = cpu_last_error,
    .free = cpu_free,
};

int se__backend_cpu_new(const struct se_cpu_opts *opts, struct se_backend *out)
{
    struct se_cpu_opts o = opts ? *opts : (struct se_cpu_opts){0};
    if (o.n_threads <= 0) {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        o.n_threads = nc > 0 ? (int)nc : 1;
    }
    if (o.max_tokens <= 0)
        o.max_tokens = 512;
    se__kernels_init();
    struct cpu *c = calloc(1, sizeof(*c));
    if (!c)
        return SP_ENOMEM;
    c->max_tokens = o.max_tokens;
    c->pool = se__pool_new(o.n_threads);
    if (!c->pool) {
        free(c);
        return SP_ENOMEM;
    }
    /*
     * The pool splits each sgemm across its threads, one single-threaded call
     * each, so that OpenBLAS's own threads never compete with the pool's
     * (this setting is process-wide).
     */
    openblas_set_num_threads(1);
    out->i = &cpu_i;
    out->ctx = c;
    return 0;
}
