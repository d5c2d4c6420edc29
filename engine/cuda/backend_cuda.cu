// The CUDA backend: se_backend_i on one GPU (see backend_cuda.h).
//
// forward() reads top to bottom: stage the batch's integer inputs in pinned
// host memory, copy them to the device in one transfer, enqueue the layers
// (enqueue_pass), copy the wanted logits back and synchronise once. All
// device buffers are allocated before the first pass and grown only when a
// batch is larger than any before (which drops the captured graphs, since
// they hold the old addresses).
#include "backend_cuda.h"
#include "host.h"
#include "ops.cuh"
#include "spool/sample.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SE_CU_INITIAL_TOKENS 512
#define SE_CU_GRAPH_MAX      256
#define SE_CU_CUBLAS_WS      (32u << 20)

static const int graph_sizes[] = {1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256};
#define N_GRAPH_SIZES ((int)(sizeof graph_sizes / sizeof graph_sizes[0]))

struct layer_dev {
    se_bf16 *attn_norm, *ffn_norm; // (hidden)
    se_bf16 *wqkv;                 // (q_dim + 2 * kv_dim, hidden): wq, wk, wv stacked
    float *bqkv;                   // (q_dim + 2 * kv_dim) or NULL
    se_bf16 *wo;                   // (hidden, q_dim)
    se_bf16 *wgu;                  // (2 * intermediate, hidden): w_gate, w_up stacked
    se_bf16 *wdown;                // (hidden, intermediate)
    se_bf16 *k_cache, *v_cache;    // (n_blocks + 1, n_kv, block_size, head_dim)
};

// Offsets (in int32 elements) of the per-pass integer inputs inside in_h / in_d.
struct input_layout {
    size_t tokens, positions, slots, tok_seq, logit_rows, seq_bt_off, seq_ntok, tiles, bt, total;
};

struct graph_entry {
    int n; // padded batch size, 0 = not captured
    cudaGraphExec_t exec;
};

struct cuda_ctx {
    int device;
    float mem_frac;
    struct se_cuda_err err;
    char dev_name[320];
    int n_sm;
    cudaStream_t stream;
    cublasHandle_t cublas;
    void *cublas_ws;

    bool loaded;
    struct se_model_config cfg;
    int q_dim, kv_dim, qkv_dim;
    se_bf16 *embed, *final_norm, *lm_head; // lm_head == embed when tied
    struct layer_dev *layers;
    float *inv_freq; // (head_dim / 2)
    void **allocs;   // every device allocation of the weights, for free()
    int n_allocs, cap_allocs;

    int n_blocks, block_size; // n_blocks usable blocks; block n_blocks is the spare
    void *kv_mem;

    // Per-pass buffers for up to cap_t tokens (and as many logit rows).
    int cap_t, cap_bt;
    float *x;        // (cap_t, hidden) residual stream
    float *delta;    // (cap_t, hidden) attention / MLP output before the residual add
    se_bf16 *xn;     // (cap_t, max(hidden, intermediate)) bf16 GEMM input
    float *qkv;      // (cap_t, qkv_dim)
    se_bf16 *attn;   // (cap_t, q_dim)
    float *gu;       // (cap_t, 2 * intermediate)
    float *partial;  // split-attention partials
    se_bf16 *xl;     // (cap_t, hidden) normed rows whose logits are wanted
    float *logits_d; // (cap_t, vocab)
    int32_t *in_d, *in_h;
    struct input_layout lay;

    bool graphs_on;
    struct graph_entry graphs[N_GRAPH_SIZES];

    // Device sampling (cuda_sample): sized on first use, grown when needed.
    int last_n_logits; // logit rows of the last successful forward (0 = none)
    int smp_cap_rows;
    size_t smp_cap_hist;
    float *smp_work;     // (2 * rows, vocab)
    int32_t *smp_counts; // (rows, vocab), zero between calls
    struct se_cu_sample_row *smp_rows_d, *smp_rows_h;
    int32_t *smp_hist_d, *smp_hist_h;
    struct se_cu_sample_out *smp_out_d, *smp_out_h;
};

static void ctx_failf(struct cuda_ctx *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void ctx_failf(struct cuda_ctx *c, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err.msg, sizeof c->err.msg, fmt, ap);
    va_end(ap);
    c->err.code = code;
}

static double gib(size_t b)
{
    return (double)b / (1024.0 * 1024.0 * 1024.0);
}

// Allocates device memory, reporting an out-of-memory failure with the numbers.
static int dev_alloc(struct cuda_ctx *c, void **p, size_t bytes, const char *what)
{
    *p = NULL;
    if (bytes == 0)
        return 0;
    cudaError_t rc = cudaMalloc(p, bytes);
    if (rc == cudaSuccess)
        return 0;
    (void)cudaGetLastError();
    size_t fr = 0, tot = 0;
    cudaMemGetInfo(&fr, &tot);
    if (rc == cudaErrorMemoryAllocation) {
        ctx_failf(c, SP_ENOMEM,
                  "out of device memory on GPU %d (%s): %s needs %.3f GiB, %.3f GiB free of %.3f "
                  "GiB; use a smaller model, a smaller KV cache or a lower memory fraction",
                  c->device, c->dev_name, what, gib(bytes), gib(fr), gib(tot));
        return SP_ENOMEM;
    }
    return se__cuda_fail(&c->err, rc, what, __FILE__, __LINE__);
}

static int weight_alloc(struct cuda_ctx *c, void **p, size_t bytes, const char *what)
{
    if (c->n_allocs == c->cap_allocs) {
        int cap = c->cap_allocs ? 2 * c->cap_allocs : 64;
        void **a = (void **)realloc(c->allocs, (size_t)cap * sizeof *a);
        if (!a) {
            ctx_failf(c, SP_ENOMEM, "out of host memory");
            return SP_ENOMEM;
        }
        c->allocs = a;
        c->cap_allocs = cap;
    }
    int rc = dev_alloc(c, p, bytes, what);
    if (rc == 0)
        c->allocs[c->n_allocs++] = *p;
    return rc;
}

// ---- weights ----

static float elem_f32(const struct se_tensor *t, size_t i)
{
    switch (t->dtype) {
    case SE_DTYPE_F32: {
        float f;
        memcpy(&f, (const char *)t->data + 4 * i, 4);
        return f;
    }
    case SE_DTYPE_F16: {
        uint16_t h;
        memcpy(&h, (const char *)t->data + 2 * i, 2);
        return se__cu_f16_to_f32(h);
    }
    default: {
        uint16_t h;
        memcpy(&h, (const char *)t->data + 2 * i, 2);
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    }
}

static size_t tensor_elems(const struct se_tensor *t)
{
    size_t n = 1;
    for (int d = 0; d < t->n_dims; d++)
        n *= (size_t)t->shape[d];
    return n;
}

// Copies tensor t (any dtype) into dst as bf16, n elements expected.
static int upload_bf16(struct cuda_ctx *c, se_bf16 *dst, const struct se_tensor *t, size_t n)
{
    if (!t || tensor_elems(t) != n) {
        ctx_failf(c, SP_ECORRUPT, "tensor %s has %zu elements, expected %zu",
                  t ? t->name : "(missing)", t ? tensor_elems(t) : (size_t)0, n);
        return SP_ECORRUPT;
    }
    if (t->dtype == SE_DTYPE_BF16) {
        SE_CU_CHECK(&c->err, cudaMemcpy(dst, t->data, n * 2, cudaMemcpyHostToDevice));
        return 0;
    }
    // Converted in chunks through one staging buffer.
    const size_t chunk = (size_t)1 << 22;
    uint16_t *stage = (uint16_t *)malloc((n < chunk ? n : chunk) * 2);
    if (!stage) {
        ctx_failf(c, SP_ENOMEM, "out of host memory converting %s to bf16", t->name);
        return SP_ENOMEM;
    }
    for (size_t at = 0; at < n; at += chunk) {
        size_t k = n - at < chunk ? n - at : chunk;
        for (size_t i = 0; i < k; i++)
            stage[i] = se__cu_f32_to_bf16(elem_f32(t, at + i));
        cudaError_t rc = cudaMemcpy(dst + at, stage, k * 2, cudaMemcpyHostToDevice);
        if (rc != cudaSuccess) {
            free(stage);
            return se__cuda_fail(&c->err, rc, "cudaMemcpy(weights)", __FILE__, __LINE__);
        }
    }
    free(stage);
    return 0;
}

static int upload_f32(struct cuda_ctx *c, float *dst, const struct se_tensor *t, size_t n)
{
    if (!t || tensor_elems(t) != n) {
        ctx_failf(c, SP_ECORRUPT, "tensor %s has %zu elements, expected %zu",
                  t ? t->name : "(missing)", t ? tensor_elems(t) : (size_t)0, n);
        return SP_ECORRUPT;
    }
    float *stage = (float *)malloc(n * sizeof *stage);
    if (!stage) {
        ctx_failf(c, SP_ENOMEM, "out of host memory converting %s", t->name);
        return SP_ENOMEM;
    }
    for (size_t i = 0; i < n; i++)
        stage[i] = elem_f32(t, i);
    cudaError_t rc = cudaMemcpy(dst, stage, n * sizeof *stage, cudaMemcpyHostToDevice);
    free(stage);
    if (rc != cudaSuccess)
        return se__cuda_fail(&c->err, rc, "cudaMemcpy(bias)", __FILE__, __LINE__);
    return 0;
}

static size_t weight_bytes(const struct se_model_config *cfg, bool tied)
{
    const size_t h = (size_t)cfg->hidden_size, qd = (size_t)cfg->n_heads * cfg->head_dim,
                 kvd = (size_t)cfg->n_kv_heads * cfg->head_dim, im = cfg->intermediate_size;
    size_t layer = 2 * h + (qd + 2 * kvd) * h + h * qd + 3 * im * h;
    size_t b =
        2 * ((size_t)cfg->n_layers * layer + h + (size_t)cfg->vocab_size * h * (tied ? 1 : 2));
    if (cfg->qkv_bias)
        b += (size_t)cfg->n_layers * (qd + 2 * kvd) * 4;
    return b;
}

static size_t pass_bytes(const struct cuda_ctx *c, int cap_t)
{
    const struct se_model_config *cfg = &c->cfg;
    const size_t h = cfg->hidden_size, im = cfg->intermediate_size;
    const size_t wide = h > im ? h : im;
    size_t per_tok = 4 * h * 2 + 2 * wide + 4 * (size_t)c->qkv_dim + 2 * (size_t)c->q_dim +
                     4 * 2 * im + 2 * h + 4 * (size_t)cfg->vocab_size +
                     4 * (size_t)cfg->n_heads * (cfg->head_dim + 2) + 4 * 12;
    return per_tok * cap_t +
           4 * (size_t)(2 * c->n_sm) * cfg->n_heads * (cfg->head_dim + 2); // split partials
}

static int cuda_load(void *vctx, const struct se_model_config *cfg, const struct se_weights *w)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    int rc;
    SE_CU_CHECK(&c->err, cudaSetDevice(c->device));
    if (c->loaded) {
        ctx_failf(c, SP_ESTATE, "load called twice");
        return SP_ESTATE;
    }
    if (cfg->head_dim > 256 || cfg->head_dim % 2 || cfg->n_kv_heads <= 0 ||
        cfg->n_heads % cfg->n_kv_heads || w->n_layers != cfg->n_layers) {
        ctx_failf(c, SP_EUNSUPPORTED,
                  "the CUDA backend supports head_dim even and <= 256 with n_heads a multiple of "
                  "n_kv_heads; this model has head_dim %d, %d heads, %d kv heads",
                  cfg->head_dim, cfg->n_heads, cfg->n_kv_heads);
        return SP_EUNSUPPORTED;
    }
    c->cfg = *cfg;
    c->q_dim = cfg->n_heads * cfg->head_dim;
    c->kv_dim = cfg->n_kv_heads * cfg->head_dim;
    c->qkv_dim = c->q_dim + 2 * c->kv_dim;
    const bool tied = cfg->tie_embeddings || w->lm_head == w->embed || !w->lm_head;

    size_t fr = 0, tot = 0;
    SE_CU_CHECK(&c->err, cudaMemGetInfo(&fr, &tot));
    const size_t need = weight_bytes(cfg, tied) + pass_bytes(c, SE_CU_INITIAL_TOKENS);
    if (need > fr) {
        ctx_failf(c, SP_ENOMEM,
                  "model does not fit on GPU %d (%s): its bf16 weights and buffers need %.2f GiB, "
                  "%.2f GiB of %.2f GiB are free",
                  c->device, c->dev_name, gib(need), gib(fr), gib(tot));
        return SP_ENOMEM;
    }

    const size_t h = cfg->hidden_size, im = cfg->intermediate_size, V = cfg->vocab_size;
    if ((rc = weight_alloc(c, (void **)&c->embed, V * h * 2, "embedding")) ||
        (rc = upload_bf16(c, c->embed, w->embed, V * h)))
        return rc;
    if (tied) {
        c->lm_head = c->embed;
    } else if ((rc = weight_alloc(c, (void **)&c->lm_head, V * h * 2, "lm_head")) ||
               (rc = upload_bf16(c, c->lm_head, w->lm_head, V * h))) {
        return rc;
    }
    if ((rc = weight_alloc(c, (void **)&c->final_norm, h * 2, "final norm")) ||
        (rc = upload_bf16(c, c->final_norm, w->final_norm, h)))
        return rc;
    c->layers = (struct layer_dev *)calloc((size_t)cfg->n_layers, sizeof *c->layers);
    if (!c->layers) {
        ctx_failf(c, SP_ENOMEM, "out of host memory");
        return SP_ENOMEM;
    }
    const size_t qd = c->q_dim, kvd = c->kv_dim;
    for (int l = 0; l < cfg->n_layers; l++) {
        const struct se_layer_weights *lw = &w->layers[l];
        struct layer_dev *d = &c->layers[l];
        if ((rc = weight_alloc(c, (void **)&d->attn_norm, h * 2, "layer weights")) ||
            (rc = upload_bf16(c, d->attn_norm, lw->attn_norm, h)) ||
            (rc = weight_alloc(c, (void **)&d->ffn_norm, h * 2, "layer weights")) ||
            (rc = upload_bf16(c, d->ffn_norm, lw->ffn_norm, h)) ||
            (rc = weight_alloc(c, (void **)&d->wqkv, (qd + 2 * kvd) * h * 2, "layer weights")) ||
            (rc = upload_bf16(c, d->wqkv, lw->wq, qd * h)) ||
            (rc = upload_bf16(c, d->wqkv + qd * h, lw->wk, kvd * h)) ||
            (rc = upload_bf16(c, d->wqkv + (qd + kvd) * h, lw->wv, kvd * h)) ||
            (rc = weight_alloc(c, (void **)&d->wo, h * qd * 2, "layer weights")) ||
            (rc = upload_bf16(c, d->wo, lw->wo, h * qd)) ||
            (rc = weight_alloc(c, (void **)&d->wgu, 2 * im * h * 2, "layer weights")) ||
            (rc = upload_bf16(c, d->wgu, lw->w_gate, im * h)) ||
            (rc = upload_bf16(c, d->wgu + im * h, lw->w_up, im * h)) ||
            (rc = weight_alloc(c, (void **)&d->wdown, h * im * 2, "layer weights")) ||
            (rc = upload_bf16(c, d->wdown, lw->w_down, h * im)))
            return rc;
        if (cfg->qkv_bias) {
            if ((rc = weight_alloc(c, (void **)&d->bqkv, (qd + 2 * kvd) * 4, "biases")) ||
                (rc = upload_f32(c, d->bqkv, lw->bq, qd)) ||
                (rc = upload_f32(c, d->bqkv + qd, lw->bk, kvd)) ||
                (rc = upload_f32(c, d->bqkv + qd + kvd, lw->bv, kvd)))
                return rc;
        }
    }
    float *inv = (float *)malloc((size_t)cfg->head_dim / 2 * sizeof *inv);
    if (!inv) {
        ctx_failf(c, SP_ENOMEM, "out of host memory");
        return SP_ENOMEM;
    }
    se__cu_rope_inv_freq(cfg, inv);
    rc = weight_alloc(c, (void **)&c->inv_freq, (size_t)cfg->head_dim / 2 * 4, "rope table");
    if (rc == 0 && cudaMemcpy(c->inv_freq, inv, (size_t)cfg->head_dim / 2 * 4,
                              cudaMemcpyHostToDevice) != cudaSuccess)
        rc = se__cuda_fail(&c->err, cudaGetLastError(), "cudaMemcpy(inv_freq)", __FILE__, __LINE__);
    free(inv);
    if (rc)
        return rc;
    c->loaded = true;
    return 0;
}

// ---- KV cache ----

static size_t kv_block_bytes(const struct cuda_ctx *c, int block_size)
{
    return 2 * (size_t)c->cfg.n_layers * c->cfg.n_kv_heads * block_size * c->cfg.head_dim * 2;
}

static int cuda_kv_blocks_for(void *vctx, size_t bytes, int block_size)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    if (!c->loaded || block_size <= 0) {
        ctx_failf(c, SP_ESTATE, "kv_blocks_for needs a loaded model and block_size > 0");
        return SP_ESTATE;
    }
    SE_CU_CHECK(&c->err, cudaSetDevice(c->device));
    if (bytes == 0) {
        size_t fr = 0, tot = 0;
        SE_CU_CHECK(&c->err, cudaMemGetInfo(&fr, &tot));
        // Buffers for the first passes come out of what is free now.
        const size_t keep = pass_bytes(c, SE_CU_INITIAL_TOKENS) + (256u << 20);
        bytes = fr > keep ? (size_t)((double)(fr - keep) * c->mem_frac) : 0;
    }
    size_t n = bytes / kv_block_bytes(c, block_size);
    if (n > 0)
        n--; // the spare block for graph padding
    return n > 0x7fffffff ? 0x7fffffff : (int)n;
}

static void free_pass_buffers(struct cuda_ctx *c);
static int alloc_pass_buffers(struct cuda_ctx *c, int cap_t, int cap_bt);

static int cuda_kv_alloc(void *vctx, int n_blocks, int block_size)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    if (!c->loaded || c->kv_mem || n_blocks <= 0 || block_size <= 0) {
        ctx_failf(c, SP_ESTATE, "kv_alloc needs a loaded model, no cache yet and positive sizes");
        return SP_ESTATE;
    }
    SE_CU_CHECK(&c->err, cudaSetDevice(c->device));
    const size_t per_layer = (size_t)(n_blocks + 1) * c->cfg.n_kv_heads * block_size *
                             c->cfg.head_dim; // elements of K (or V) in one layer
    int rc = dev_alloc(c, &c->kv_mem, 2 * (size_t)c->cfg.n_layers * per_layer * 2, "the KV cache");
    if (rc)
        return rc;
    se_bf16 *kv = (se_bf16 *)c->kv_mem;
    for (int l = 0; l < c->cfg.n_layers; l++) {
        c->layers[l].k_cache = kv + (size_t)(2 * l) * per_layer;
        c->layers[l].v_cache = kv + (size_t)(2 * l + 1) * per_layer;
    }
    // Zeroed so that a stale slot can never hold NaN (which 0 * NaN would spread).
    SE_CU_CHECK(&c->err, cudaMemset(c->kv_mem, 0, 2 * (size_t)c->cfg.n_layers * per_layer * 2));
    c->n_blocks = n_blocks;
    c->block_size = block_size;
    // Block tables of one pass: every block once, plus room for shared prefixes and padding
    // (grown when a pass needs more).
    return alloc_pass_buffers(c, SE_CU_INITIAL_TOKENS, n_blocks + 2 * SE_CU_GRAPH_MAX + 1);
}

static int cuda_kv_copy(void *vctx, int dst, int src)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    if (!c->kv_mem || dst < 0 || src < 0 || dst >= c->n_blocks || src >= c->n_blocks) {
        ctx_failf(c, SP_EINVAL, "kv_copy: blocks %d -> %d out of range [0, %d)", src, dst,
                  c->n_blocks);
        return SP_EINVAL;
    }
    SE_CU_CHECK(&c->err, cudaSetDevice(c->device));
    const size_t blk = (size_t)c->cfg.n_kv_heads * c->block_size * c->cfg.head_dim;
    for (int l = 0; l < c->cfg.n_layers; l++) {
        SE_CU_CHECK(&c->err, cudaMemcpyAsync(c->layers[l].k_cache + dst * blk,
                                             c->layers[l].k_cache + src * blk, blk * 2,
                                             cudaMemcpyDeviceToDevice, c->stream));
        SE_CU_CHECK(&c->err, cudaMemcpyAsync(c->layers[l].v_cache + dst * blk,
                                             c->layers[l].v_cache + src * blk, blk * 2,
                                             cudaMemcpyDeviceToDevice, c->stream));
    }
    return 0;
}

// ---- per-pass buffers and graphs ----

static void drop_graphs(struct cuda_ctx *c)
{
    for (int i = 0; i < N_GRAPH_SIZES; i++) {
        if (c->graphs[i].n)
            cudaGraphExecDestroy(c->graphs[i].exec);
        c->graphs[i].n = 0;
    }
}

static void free_pass_buffers(struct cuda_ctx *c)
{
    drop_graphs(c);
    void *bufs[] = {c->x,  c->delta, c->xn,      c->qkv,      c->attn,
                    c->gu, c->xl,    c->partial, c->logits_d, c->in_d};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        if (bufs[i])
            cudaFree(bufs[i]);
    if (c->in_h)
        cudaFreeHost(c->in_h);
    c->x = c->delta = c->qkv = c->gu = c->partial = c->logits_d = NULL;
    c->xn = c->attn = c->xl = NULL;
    c->in_d = c->in_h = NULL;
    c->cap_t = c->cap_bt = 0;
}

static int alloc_pass_buffers(struct cuda_ctx *c, int cap_t, int cap_bt)
{
    free_pass_buffers(c);
    const struct se_model_config *cfg = &c->cfg;
    const size_t h = cfg->hidden_size, im = cfg->intermediate_size, T = cap_t;
    const size_t wide = h > im ? h : im;
    const size_t parts = (T + 2 * (size_t)c->n_sm) * cfg->n_heads * (cfg->head_dim + 2);
    int rc;
    if ((rc = dev_alloc(c, (void **)&c->x, T * h * 4, "activations")) ||
        (rc = dev_alloc(c, (void **)&c->delta, T * h * 4, "activations")) ||
        (rc = dev_alloc(c, (void **)&c->xn, T * wide * 2, "activations")) ||
        (rc = dev_alloc(c, (void **)&c->qkv, T * c->qkv_dim * 4, "activations")) ||
        (rc = dev_alloc(c, (void **)&c->attn, T * c->q_dim * 2, "activations")) ||
        (rc = dev_alloc(c, (void **)&c->gu, T * 2 * im * 4, "activations")) ||
        (rc = dev_alloc(c, (void **)&c->xl, T * h * 2, "activations")) ||
        (rc = dev_alloc(c, (void **)&c->partial, parts * 4, "attention partials")) ||
        (rc = dev_alloc(c, (void **)&c->logits_d, T * cfg->vocab_size * 4, "logits")))
        return rc;
    struct input_layout *L = &c->lay;
    size_t at = 0;
    L->tokens = at, at += T;
    L->positions = at, at += T;
    L->slots = at, at += T;
    L->tok_seq = at, at += T;
    L->logit_rows = at, at += T;
    L->seq_bt_off = at, at += T;
    L->seq_ntok = at, at += T;
    L->tiles = at, at += 2 * T;
    L->bt = at, at += (size_t)cap_bt;
    L->total = at;
    if ((rc = dev_alloc(c, (void **)&c->in_d, at * 4, "batch inputs")))
        return rc;
    SE_CU_CHECK(&c->err, cudaMallocHost((void **)&c->in_h, at * 4));
    c->cap_t = cap_t;
    c->cap_bt = cap_bt;
    return 0;
}

// What one pass needs besides the buffers: its sizes and how to run attention.
struct pass {
    int n;          // tokens (padded for a graph)
    int n_logits;   // logit rows computed
    int n_tiles;    // prefill tiles (0 for decode only)
    bool has_multi; // some sequence has more than one token here
    bool has_single;
};

// Enqueues one forward pass over the inputs already in in_d. No host sync.
static int enqueue_pass(struct cuda_ctx *c, const struct pass *p)
{
    const struct se_model_config *cfg = &c->cfg;
    struct se_cuda_err *e = &c->err;
    cudaStream_t s = c->stream;
    const int n = p->n, H = cfg->hidden_size, IM = cfg->intermediate_size;
    const int32_t *in = c->in_d;
    const struct input_layout *L = &c->lay;
    struct se_cu_attn_meta meta;
    meta.tok_seq = in + L->tok_seq;
    meta.tok_pos = in + L->positions;
    meta.seq_bt_off = in + L->seq_bt_off;
    meta.bt_flat = in + L->bt;
    meta.seq_n_tokens = in + L->seq_ntok;
    meta.skip_multi = p->has_multi;
    const float scale = 1.0f / sqrtf((float)cfg->head_dim);
    const int splits = se__cu_attn_decode_splits(n, cfg->n_kv_heads, c->n_sm);
    int rc;

    if ((rc =
             se__cu_get_rows_bf16_f32(e, s, c->embed, cfg->vocab_size, H, in + L->tokens, n, c->x)))
        return rc;
    for (int l = 0; l < cfg->n_layers; l++) {
        const struct layer_dev *d = &c->layers[l];
        if ((rc = se__cu_add_rms_norm(e, s, c->x, l ? c->delta : NULL, d->attn_norm, n, H,
                                      cfg->rms_eps, c->xn)) ||
            (rc = se__cu_gemm(e, c->cublas, c->xn, n, H, d->wqkv, c->qkv_dim, c->qkv, 0, 0.0f)) ||
            (rc = se__cu_rope(e, s, c->qkv, n, c->qkv_dim, cfg->n_heads, cfg->n_kv_heads,
                              cfg->head_dim, d->bqkv, in + L->positions, c->inv_freq)) ||
            (rc = se__cu_kv_write(e, s, c->qkv, n, c->qkv_dim, c->q_dim, c->q_dim + c->kv_dim,
                                  cfg->n_kv_heads, cfg->head_dim, in + L->slots, d->k_cache,
                                  d->v_cache, c->block_size)))
            return rc;
        if (p->has_single &&
            (rc = se__cu_attn_decode(e, s, c->qkv, c->qkv_dim, d->k_cache, d->v_cache, &meta, n,
                                     cfg->n_heads, cfg->n_kv_heads, cfg->head_dim, c->block_size,
                                     scale, splits, c->partial, c->attn)))
            return rc;
        if (p->n_tiles &&
            (rc = se__cu_attn_prefill(e, s, c->qkv, c->qkv_dim, d->k_cache, d->v_cache, &meta,
                                      in + L->tiles, p->n_tiles, cfg->n_heads, cfg->n_kv_heads,
                                      cfg->head_dim, c->block_size, scale, c->attn)))
            return rc;
        if ((rc = se__cu_gemm(e, c->cublas, c->attn, n, c->q_dim, d->wo, H, c->delta, 0, 0.0f)) ||
            (rc = se__cu_add_rms_norm(e, s, c->x, c->delta, d->ffn_norm, n, H, cfg->rms_eps,
                                      c->xn)) ||
            (rc = se__cu_gemm(e, c->cublas, c->xn, n, H, d->wgu, 2 * IM, c->gu, 0, 0.0f)) ||
            (rc = se__cu_swiglu(e, s, c->gu, n, IM, c->xn)) ||
            (rc = se__cu_gemm(e, c->cublas, c->xn, n, IM, d->wdown, H, c->delta, 0, 0.0f)))
            return rc;
    }
    if ((rc =
             se__cu_add_rms_norm(e, s, c->x, c->delta, c->final_norm, n, H, cfg->rms_eps, c->xn)) ||
        (rc = se__cu_get_rows_bf16_bf16(e, s, c->xn, n, H, in + L->logit_rows, p->n_logits,
                                        c->xl)) ||
        (rc = se__cu_gemm(e, c->cublas, c->xl, p->n_logits, H, c->lm_head, cfg->vocab_size,
                          c->logits_d, 0, 0.0f)))
        return rc;
    return 0;
}

static int padded_size(int n)
{
    for (int i = 0; i < N_GRAPH_SIZES; i++)
        if (graph_sizes[i] >= n)
            return i;
    return -1;
}

// Runs the pass through the graph captured for its padded size. The first
// pass of a size runs eagerly (which also loads any lazily loaded kernels
// and cuBLAS modules outside a capture) and is then captured for the next
// ones; capture does not execute anything. When capture fails, graphs are
// turned off for good and every later pass runs eagerly.
static int run_graph(struct cuda_ctx *c, int gi, const struct pass *p)
{
    struct graph_entry *g = &c->graphs[gi];
    if (g->n) {
        SE_CU_CHECK(&c->err, cudaGraphLaunch(g->exec, c->stream));
        return 0;
    }
    int rc = enqueue_pass(c, p);
    if (rc)
        return rc;
    cudaGraph_t graph = NULL;
    SE_CU_CHECK(&c->err, cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    struct se_cuda_err saved = c->err;
    rc = enqueue_pass(c, p);
    cudaError_t ce = cudaStreamEndCapture(c->stream, &graph);
    if (rc == 0 && ce == cudaSuccess)
        ce = cudaGraphInstantiate(&g->exec, graph, 0);
    if (graph)
        cudaGraphDestroy(graph);
    if (rc || ce != cudaSuccess) {
        (void)cudaGetLastError();
        c->err = saved; // not a failure of this pass, which already ran
        c->graphs_on = false;
        return 0;
    }
    g->n = p->n;
    return 0;
}

static int grow_for(struct cuda_ctx *c, int n_tokens, size_t n_bt)
{
    if (n_tokens <= c->cap_t && n_bt <= (size_t)c->cap_bt)
        return 0;
    int cap_t = c->cap_t;
    while (cap_t < n_tokens)
        cap_t *= 2;
    size_t cap_bt = (size_t)c->cap_bt;
    while (cap_bt < n_bt)
        cap_bt *= 2;
    SE_CU_CHECK(&c->err, cudaStreamSynchronize(c->stream));
    return alloc_pass_buffers(c, cap_t, (int)cap_bt);
}

static int cuda_forward(void *vctx, const struct se_batch *b, float *logits)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    if (!c->kv_mem) {
        ctx_failf(c, SP_ESTATE, "forward before kv_alloc");
        return SP_ESTATE;
    }
    if (b->n_tokens <= 0 || b->n_seqs <= 0 || b->n_seqs > b->n_tokens || b->n_logits < 0 ||
        b->n_logits > b->n_tokens) {
        ctx_failf(c, SP_EINVAL, "forward: %d tokens, %d sequences, %d logit rows", b->n_tokens,
                  b->n_seqs, b->n_logits);
        return SP_EINVAL;
    }
    c->last_n_logits = 0;
    SE_CU_CHECK(&c->err, cudaSetDevice(c->device));
    const int bs = c->block_size;
    size_t n_bt = 1; // the spare block's entry comes first
    bool has_multi = false;
    for (int s = 0; s < b->n_seqs; s++) {
        n_bt += (size_t)(b->seq_ctx_len[s] + bs - 1) / bs;
        has_multi |= b->seq_n_tokens[s] > 1;
    }
    const bool decode_only = !has_multi && b->n_seqs == b->n_tokens && b->n_logits == b->n_tokens;
    const int gi = c->graphs_on && decode_only && b->n_tokens <= SE_CU_GRAPH_MAX
                       ? padded_size(b->n_tokens)
                       : -1;
    const int n = gi >= 0 ? graph_sizes[gi] : b->n_tokens;
    int rc = grow_for(c, n, n_bt + (size_t)n);
    if (rc)
        return rc;

    // Stage the inputs. Sequences first: block tables and their offsets.
    int32_t *in = c->in_h;
    const struct input_layout *L = &c->lay;
    size_t bt_at = 0;
    in[L->bt + bt_at++] = c->n_blocks; // spare block, for padding tokens
    int n_tiles = 0;
    bool has_single = false;
    for (int s = 0; s < b->n_seqs; s++) {
        const int nb = (b->seq_ctx_len[s] + bs - 1) / bs;
        in[L->seq_bt_off + s] = (int32_t)bt_at;
        in[L->seq_ntok + s] = b->seq_n_tokens[s];
        for (int k = 0; k < nb; k++) {
            const int32_t blk = b->block_tables[s][k];
            if (blk < 0 || blk >= c->n_blocks) {
                ctx_failf(c, SP_EINVAL,
                          "forward: sequence %d block table entry %d is block %d, "
                          "outside [0, %d)",
                          s, k, blk, c->n_blocks);
                return SP_EINVAL;
            }
            in[L->bt + bt_at++] = blk;
        }
        const int t0 = b->seq_start[s], nt = b->seq_n_tokens[s];
        if (t0 < 0 || nt <= 0 || t0 + nt > b->n_tokens) {
            ctx_failf(c, SP_EINVAL, "forward: sequence %d covers tokens [%d, %d) of %d", s, t0,
                      t0 + nt, b->n_tokens);
            return SP_EINVAL;
        }
        for (int t = t0; t < t0 + nt; t++) {
            const int pos = b->positions[t];
            if (pos < 0 || pos >= b->seq_ctx_len[s] || b->tokens[t] < 0 ||
                b->tokens[t] >= c->cfg.vocab_size) {
                ctx_failf(c, SP_EINVAL,
                          "forward: token %d (id %d) at position %d is outside "
                          "the vocabulary or the sequence's %d cached positions",
                          t, b->tokens[t], pos, b->seq_ctx_len[s]);
                return SP_EINVAL;
            }
            in[L->tokens + t] = b->tokens[t];
            in[L->positions + t] = pos;
            in[L->tok_seq + t] = s;
            in[L->slots + t] = b->block_tables[s][pos / bs] * bs + pos % bs;
        }
        if (nt > 1) {
            for (int k = 0; k < nt; k += SE_CU_PREFILL_TILE) {
                in[L->tiles + 2 * n_tiles] = t0 + k;
                in[L->tiles + 2 * n_tiles + 1] =
                    nt - k < SE_CU_PREFILL_TILE ? nt - k : SE_CU_PREFILL_TILE;
                n_tiles++;
            }
        } else {
            has_single = true;
        }
    }
    for (int i = 0; i < b->n_logits; i++) {
        if (b->logit_rows[i] < 0 || b->logit_rows[i] >= b->n_tokens) {
            ctx_failf(c, SP_EINVAL, "forward: logit row %d is %d, outside [0, %d)", i,
                      b->logit_rows[i], b->n_tokens);
            return SP_EINVAL;
        }
        in[L->logit_rows + i] = b->logit_rows[i];
    }
    // Padding tokens of a graph: one pseudo-sequence each, writing into the spare block.
    for (int t = b->n_tokens; t < n; t++) {
        in[L->tokens + t] = 0;
        in[L->positions + t] = 0;
        in[L->tok_seq + t] = t;
        in[L->slots + t] = c->n_blocks * bs;
        in[L->seq_bt_off + t] = 0;
        in[L->seq_ntok + t] = 1;
        in[L->logit_rows + t] = t;
    }
    SE_CU_CHECK(&c->err, cudaMemcpyAsync(c->in_d, c->in_h, (L->bt + bt_at) * 4,
                                         cudaMemcpyHostToDevice, c->stream));

    struct pass p;
    p.n = n;
    p.n_logits = gi >= 0 ? n : b->n_logits;
    p.n_tiles = n_tiles;
    p.has_multi = has_multi;
    p.has_single = has_single;
    rc = gi >= 0 ? run_graph(c, gi, &p) : enqueue_pass(c, &p);
    if (rc)
        return rc;
    if (b->n_logits > 0 && logits)
        SE_CU_CHECK(&c->err, cudaMemcpyAsync(logits, c->logits_d,
                                             (size_t)b->n_logits * c->cfg.vocab_size * 4,
                                             cudaMemcpyDeviceToHost, c->stream));
    SE_CU_CHECK(&c->err, cudaStreamSynchronize(c->stream));
    c->last_n_logits = b->n_logits;
    return 0;
}

static void free_sample_buffers(struct cuda_ctx *c)
{
    void *d[] = {c->smp_work, c->smp_counts, c->smp_rows_d, c->smp_hist_d, c->smp_out_d};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++)
        if (d[i])
            cudaFree(d[i]);
    void *h[] = {c->smp_rows_h, c->smp_hist_h, c->smp_out_h};
    for (size_t i = 0; i < sizeof h / sizeof h[0]; i++)
        if (h[i])
            cudaFreeHost(h[i]);
    c->smp_work = NULL;
    c->smp_counts = c->smp_hist_d = c->smp_hist_h = NULL;
    c->smp_rows_d = c->smp_rows_h = NULL;
    c->smp_out_d = c->smp_out_h = NULL;
    c->smp_cap_rows = 0;
    c->smp_cap_hist = 0;
}

static int reserve_sample_buffers(struct cuda_ctx *c, int rows, size_t hist)
{
    if (rows <= c->smp_cap_rows && hist <= c->smp_cap_hist)
        return 0;
    int cap_r = c->smp_cap_rows > rows ? c->smp_cap_rows : rows;
    size_t cap_h = c->smp_cap_hist > hist ? c->smp_cap_hist : hist;
    cap_h = cap_h < 4096 ? 4096 : cap_h + cap_h / 2;
    free_sample_buffers(c);
    const size_t V = c->cfg.vocab_size;
    int rc;
    if ((rc = dev_alloc(c, (void **)&c->smp_work, 2 * (size_t)cap_r * V * 4, "sampling")) ||
        (rc = dev_alloc(c, (void **)&c->smp_counts, (size_t)cap_r * V * 4, "sampling")) ||
        (rc = dev_alloc(c, (void **)&c->smp_rows_d, (size_t)cap_r * sizeof *c->smp_rows_d,
                        "sampling")) ||
        (rc = dev_alloc(c, (void **)&c->smp_hist_d, cap_h * 4, "sampling")) ||
        (rc = dev_alloc(c, (void **)&c->smp_out_d, (size_t)cap_r * sizeof *c->smp_out_d,
                        "sampling")))
        return rc;
    SE_CU_CHECK(&c->err, cudaMemset(c->smp_counts, 0, (size_t)cap_r * V * 4));
    SE_CU_CHECK(&c->err,
                cudaMallocHost((void **)&c->smp_rows_h, (size_t)cap_r * sizeof *c->smp_rows_h));
    SE_CU_CHECK(&c->err, cudaMallocHost((void **)&c->smp_hist_h, cap_h * 4));
    SE_CU_CHECK(&c->err,
                cudaMallocHost((void **)&c->smp_out_h, (size_t)cap_r * sizeof *c->smp_out_h));
    c->smp_cap_rows = cap_r;
    c->smp_cap_hist = cap_h;
    return 0;
}

static int cuda_sample(void *vctx, int n_rows, const struct se_sampling *s,
                       const int32_t *const *prompt, const size_t *n_prompt,
                       const int32_t *const *generated, const size_t *n_generated,
                       struct se_sample_result *out)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    if (n_rows <= 0 || n_rows != c->last_n_logits) {
        ctx_failf(c, SP_ESTATE, "sample: %d rows asked, the last forward left %d logit rows",
                  n_rows, c->last_n_logits);
        return SP_ESTATE;
    }
    SE_CU_CHECK(&c->err, cudaSetDevice(c->device));
    size_t hist = 0;
    for (int i = 0; i < n_rows; i++)
        hist += n_prompt[i] + n_generated[i];
    if (hist > 0x7fffffff) {
        ctx_failf(c, SP_ETOOBIG, "sample: %zu tokens of history", hist);
        return SP_ETOOBIG;
    }
    int rc = reserve_sample_buffers(c, n_rows, hist);
    if (rc)
        return rc;
    size_t at = 0;
    for (int i = 0; i < n_rows; i++) {
        struct se_cu_sample_row *r = &c->smp_rows_h[i];
        r->temperature = s[i].temperature;
        r->top_p = s[i].top_p;
        r->min_p = s[i].min_p;
        r->repetition_penalty = s[i].repetition_penalty;
        r->presence_penalty = s[i].presence_penalty;
        r->frequency_penalty = s[i].frequency_penalty;
        r->top_k = s[i].top_k;
        r->seed = s[i].seed;
        r->position = (uint64_t)(n_prompt[i] + n_generated[i]);
        r->hist_off = (int)at;
        r->n_prompt = (int)n_prompt[i];
        r->n_gen = (int)n_generated[i];
        if (n_prompt[i])
            memcpy(c->smp_hist_h + at, prompt[i], n_prompt[i] * 4);
        at += n_prompt[i];
        if (n_generated[i])
            memcpy(c->smp_hist_h + at, generated[i], n_generated[i] * 4);
        at += n_generated[i];
    }
    SE_CU_CHECK(&c->err, cudaMemcpyAsync(c->smp_rows_d, c->smp_rows_h,
                                         (size_t)n_rows * sizeof *c->smp_rows_h,
                                         cudaMemcpyHostToDevice, c->stream));
    if (at)
        SE_CU_CHECK(&c->err, cudaMemcpyAsync(c->smp_hist_d, c->smp_hist_h, at * 4,
                                             cudaMemcpyHostToDevice, c->stream));
    if ((rc =
             se__cu_sample(&c->err, c->stream, c->logits_d, n_rows, c->cfg.vocab_size,
                           c->smp_rows_d, c->smp_hist_d, c->smp_work, c->smp_counts, c->smp_out_d)))
        return rc;
    SE_CU_CHECK(&c->err,
                cudaMemcpyAsync(c->smp_out_h, c->smp_out_d, (size_t)n_rows * sizeof *c->smp_out_h,
                                cudaMemcpyDeviceToHost, c->stream));
    SE_CU_CHECK(&c->err, cudaStreamSynchronize(c->stream));
    for (int i = 0; i < n_rows; i++) {
        memset(&out[i], 0, sizeof out[i]);
        out[i].token = c->smp_out_h[i].token;
        out[i].logprob = c->smp_out_h[i].logprob;
    }
    return 0;
}

static const char *cuda_last_error(void *vctx)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    return c->err.msg[0] ? c->err.msg : "no error";
}

static void cuda_free(void *vctx)
{
    struct cuda_ctx *c = (struct cuda_ctx *)vctx;
    if (!c)
        return;
    cudaSetDevice(c->device);
    if (c->stream)
        cudaStreamSynchronize(c->stream);
    free_pass_buffers(c);
    free_sample_buffers(c);
    for (int i = 0; i < c->n_allocs; i++)
        cudaFree(c->allocs[i]);
    free(c->allocs);
    if (c->kv_mem)
        cudaFree(c->kv_mem);
    free(c->layers);
    if (c->cublas)
        cublasDestroy(c->cublas);
    if (c->cublas_ws)
        cudaFree(c->cublas_ws);
    if (c->stream)
        cudaStreamDestroy(c->stream);
    free(c);
}

static const struct se_backend_i cuda_iface = {
    /* .name = */ "cuda",
    /* .load = */ cuda_load,
    /* .kv_blocks_for = */ cuda_kv_blocks_for,
    /* .kv_alloc = */ cuda_kv_alloc,
    /* .forward = */ cuda_forward,
    /* .kv_copy = */ cuda_kv_copy,
    /* .last_error = */ cuda_last_error,
    /* .free = */ cuda_free,
    /* .sample = */ cuda_sample,
};

static int open_device(struct cuda_ctx *c)
{
    SE_CU_CHECK(&c->err, cudaSetDevice(c->device));
    cudaDeviceProp prop;
    SE_CU_CHECK(&c->err, cudaGetDeviceProperties(&prop, c->device));
    snprintf(c->dev_name, sizeof c->dev_name, "%s, sm_%d%d", prop.name, prop.major, prop.minor);
    c->n_sm = prop.multiProcessorCount;
    if (prop.major < 8) {
        ctx_failf(c, SP_EUNSUPPORTED,
                  "GPU %d (%s) is older than sm_80; the CUDA backend needs "
                  "bf16 tensor cores (Ampere or newer)",
                  c->device, c->dev_name);
        return SP_EUNSUPPORTED;
    }
    SE_CU_CHECK(&c->err, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    SE_CU_CHECK(&c->err, cublasCreate(&c->cublas));
    SE_CU_CHECK(&c->err, cublasSetStream(c->cublas, c->stream));
    // A workspace of our own keeps cuBLAS from allocating during graph capture.
    int rc = dev_alloc(c, &c->cublas_ws, SE_CU_CUBLAS_WS, "cuBLAS workspace");
    if (rc)
        return rc;
    SE_CU_CHECK(&c->err, cublasSetWorkspace(c->cublas, c->cublas_ws, SE_CU_CUBLAS_WS));
    const char *g = getenv("SPOOL_CUDA_GRAPHS");
    c->graphs_on = !(g && strcmp(g, "0") == 0);
    return 0;
}

extern "C" int se__backend_cuda_new(int device, float memory_fraction, struct se_backend *out,
                                    char *err, size_t errcap)
{
    out->i = NULL;
    out->ctx = NULL;
    if (!(memory_fraction > 0.0f && memory_fraction <= 1.0f)) {
        snprintf(err, errcap, "CUDA memory fraction must be in (0, 1], got %g",
                 (double)memory_fraction);
        return SP_EINVAL;
    }
    int count = 0;
    cudaError_t ce = cudaGetDeviceCount(&count);
    if (ce != cudaSuccess || count == 0) {
        snprintf(err, errcap,
                 "no CUDA GPU available: %s (%s); run on a machine with an NVIDIA "
                 "GPU and driver, or use the CPU backend",
                 ce == cudaSuccess ? "cudaGetDeviceCount found 0 devices" : cudaGetErrorName(ce),
                 ce == cudaSuccess ? "no device" : cudaGetErrorString(ce));
        (void)cudaGetLastError();
        return SP_ENODEV;
    }
    if (device < 0 || device >= count) {
        snprintf(err, errcap, "CUDA device %d requested, but this machine has %d (0 to %d)", device,
                 count, count - 1);
        return SP_ENODEV;
    }
    struct cuda_ctx *c = (struct cuda_ctx *)calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errcap, "out of host memory");
        return SP_ENOMEM;
    }
    c->device = device;
    c->mem_frac = memory_fraction;
    int rc = open_device(c);
    if (rc) {
        snprintf(err, errcap, "%s", c->err.msg);
        cuda_free(c);
        return rc;
    }
    out->i = &cuda_iface;
    out->ctx = c;
    return 0;
}
