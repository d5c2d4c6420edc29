/* The null backend; see null.h. */
#include "null.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "spool/error.h"

struct null_ctx {
    int step_us;
    int vocab, n_blocks, bs;
    size_t token_bytes; /* what a real backend's KV would take per token (fp32 K and V) */
    uint64_t *slots;    /* (n_blocks * bs) */
    char err[256];
};

static int null_load(void *vctx, const struct se_model_config *cfg, const struct se_weights *w)
{
    (void)w;
    struct null_ctx *c = vctx;
    c->vocab = cfg->vocab_size;
    c->token_bytes = (size_t)2 * (size_t)cfg->n_layers * (size_t)cfg->n_kv_heads *
                     (size_t)cfg->head_dim * sizeof(float);
    if (!c->token_bytes)
        c->token_bytes = 1;
    return 0;
}

static int null_kv_blocks_for(void *vctx, size_t bytes, int block_size)
{
    struct null_ctx *c = vctx;
    size_t n = bytes / (c->token_bytes * (size_t)block_size);
    return n > (1u << 30) ? 1 << 30 : (int)n;
}

static int null_kv_alloc(void *vctx, int n_blocks, int block_size)
{
    struct null_ctx *c = vctx;
    c->slots = calloc((size_t)n_blocks * (size_t)block_size, sizeof(uint64_t));
    if (!c->slots) {
        snprintf(c->err, sizeof(c->err), "out of memory for %d KV blocks", n_blocks);
        return SP_ENOMEM;
    }
    c->n_blocks = n_blocks;
    c->bs = block_size;
    return 0;
}

static uint64_t mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* The slot of position p through table, or NULL (with err set) for a bad block id. */
static uint64_t *slot(struct null_ctx *c, const int32_t *table, int p)
{
    int id = table[p / c->bs];
    if (id < 0 || id >= c->n_blocks) {
        snprintf(c->err, sizeof(c->err), "block id %d at position %d is outside the cache (%d)", id,
                 p, c->n_blocks);
        return NULL;
    }
    return &c->slots[(size_t)id * (size_t)c->bs + (size_t)(p % c->bs)];
}

static int null_forward(void *vctx, const struct se_batch *b, float *logits)
{
    struct null_ctx *c = vctx;
    int r = 0;
    for (int k = 0; k < b->n_seqs; k++) {
        const int32_t *table = b->block_tables[k];
        for (int j = 0; j < b->seq_n_tokens[k]; j++) {
            int i = b->seq_start[k] + j, p = b->positions[i];
            uint64_t prev = 0x5eed;
            if (p > 0) {
                uint64_t *ps = slot(c, table, p - 1);
                if (!ps)
                    return SP_EBACKEND;
                prev = *ps;
            }
            uint64_t *s = slot(c, table, p);
            if (!s)
                return SP_EBACKEND;
            *s = mix(prev ^ ((uint64_t)(uint32_t)b->tokens[i] << 20) ^ (uint64_t)p);
            if (r < b->n_logits && b->logit_rows[r] == i) {
                if (logits) {
                    float *row = logits + (size_t)r * (size_t)c->vocab;
                    memset(row, 0, (size_t)c->vocab * sizeof(float));
                    row[*s % (uint64_t)c->vocab] = 30.0f;
                }
                r++;
            }
        }
    }
    if (c->step_us > 0) {
        struct timespec ts = {.tv_sec = c->step_us / 1000000,
                              .tv_nsec = (long)(c->step_us % 1000000) * 1000};
        while (nanosleep(&ts, &ts))
            ;
    }
    return 0;
}

static int null_kv_copy(void *vctx, int dst, int src)
{
    struct null_ctx *c = vctx;
    memcpy(c->slots + (size_t)dst * (size_t)c->bs, c->slots + (size_t)src * (size_t)c->bs,
           (size_t)c->bs * sizeof(uint64_t));
    return 0;
}

static const char *null_last_error(void *vctx)
{
    return ((struct null_ctx *)vctx)->err;
}

static void null_free(void *vctx)
{
    struct null_ctx *c = vctx;
    free(c->slots);
    free(c);
}

static const struct se_backend_i null_i = {
    .name = "null",
    .load = null_load,
    .kv_blocks_for = null_kv_blocks_for,
    .kv_alloc = null_kv_alloc,
    .forward = null_forward,
    .kv_copy = null_kv_copy,
    .last_error = null_last_error,
    .free = null_free,
};

int se__backend_null_new(int step_us, struct se_backend *out)
{
    struct null_ctx *c = calloc(1, sizeof(*c));
    if (!c)
        return SP_ENOMEM;
    c->step_us = step_us;
    out->i = &null_i;
    out->ctx = c;
    return 0;
}
