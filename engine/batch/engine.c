/*
 * The engine's sequences: open (backend selection, KV budget), close,
 * submit, cancel. See spool/engine.h; the scheduling policy is in sched.c,
 * the step in step.c.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../cpu/cpu.h"
#include "../model/weights.h"
#include "../null/null.h"
#include "internal.h"
#include "spool/log.h"
#include "spool_config.h"
#if SPOOL_HAVE_CUDA
#include "../cuda/backend_cuda.h"
#endif

const char *se_finish_name(enum se_finish f)
{
    switch (f) {
    case SE_FINISH_EOS:
    case SE_FINISH_STOP:
    case SE_FINISH_STOP_STRING:
        return "stop";
    case SE_FINISH_LENGTH:
        return "length";
    case SE_FINISH_CANCELED:
        return "canceled";
    case SE_FINISH_NONE:
        break;
    }
    return "none";
}

const char *se_engine_error(const se_engine_t *e)
{
    return e->err;
}

int se_engine_n_active(const se_engine_t *e)
{
    return e->n_live;
}

/* Creates the backend named in opts; 0 or an SP_E* code with err filled in. */
static int backend_new(se_engine_t *e, char *err, size_t errcap)
{
    const char *name = e->opts.backend && *e->opts.backend ? e->opts.backend : "cpu";
    int rc;
    if (!strcmp(name, "cpu")) {
        struct se_cpu_opts co = {.n_threads = e->opts.n_threads,
                                 .max_tokens = e->opts.max_batch_tokens};
        rc = se__backend_cpu_new(&co, &e->be);
    } else if (!strcmp(name, "null")) {
        rc = se__backend_null_new(e->opts.null_step_us, &e->be);
    } else if (!strcmp(name, "cuda")) {
#if SPOOL_HAVE_CUDA
        return se__backend_cuda_new(e->opts.cuda_device, 0.9f, &e->be, err, errcap);
#else
        snprintf(err, errcap, "backend \"cuda\": this build has no CUDA support");
        return SP_EUNSUPPORTED;
#endif
    } else {
        snprintf(err, errcap, "unknown backend \"%s\" (cpu, null or cuda)", name);
        return SP_EINVAL;
    }
    if (rc)
        snprintf(err, errcap, "out of memory creating the %s backend", name);
    return rc;
}

int se_engine_open(const se_model_t *model, const struct se_engine_opts *opts, se_engine_t **out,
                   char *err, size_t errcap)
{
    *out = NULL;
    se_engine_t *e = calloc(1, sizeof(*e));
    if (!e)
        goto nomem;
    e->model = model;
    e->cfg = se_model_get_config(model);
    e->opts = opts ? *opts : (struct se_engine_opts){0};
    struct se_engine_opts *o = &e->opts;
    if (o->max_batch_tokens <= 0)
        o->max_batch_tokens = 256;
    if (o->max_seqs <= 0)
        o->max_seqs = 32;
    if (o->max_seqs > o->max_batch_tokens)
        o->max_seqs = o->max_batch_tokens;
    if (o->block_size <= 0)
        o->block_size = 16;
    int bs = o->block_size;
    int rc = backend_new(e, err, errcap);
    if (rc) {
        free(e);
        return rc;
    }
    e->be_ok = true;
    if ((rc = e->be.i->load(e->be.ctx, e->cfg, se__model_weights(model)))) {
        snprintf(err, errcap, "%s", e->be.i->last_error(e->be.ctx));
        goto fail;
    }
    int64_t per_seq = (e->cfg->max_position + bs - 1) / bs;
    int64_t want = per_seq * o->max_seqs;
    if (e->be.i->kv_blocks_for) {
        /* Without a budget a GPU backend takes its own share of the device memory. */
        bool gpu = !strcmp(e->be.i->name, "cuda");
        size_t budget = o->kv_bytes ? o->kv_bytes : gpu ? 0 : (size_t)1 << 30;
        int fit = e->be.i->kv_blocks_for(e->be.ctx, budget, bs);
        if (o->kv_bytes || fit < want)
            want = fit;
    }
    if (want < 1) {
        snprintf(err, errcap, "KV cache budget of %zu bytes holds no block of %d tokens",
                 o->kv_bytes, bs);
        rc = SP_EINVAL;
        goto fail;
    }
    if ((rc = e->be.i->kv_alloc(e->be.ctx, (int)want, bs))) {
        snprintf(err, errcap, "%s", e->be.i->last_error(e->be.ctx));
        goto fail;
    }
    int T = o->max_batch_tokens, S = o->max_seqs;
    e->tokens = malloc((size_t)T * 4);
    e->positions = malloc((size_t)T * 4);
    e->seq_start = malloc((size_t)S * 4);
    e->seq_n = malloc((size_t)S * 4);
    e->seq_ctx = malloc((size_t)S * 4);
    e->logit_rows = malloc((size_t)S * 4);
    e->tables = malloc((size_t)S * sizeof(*e->tables));
    e->batch_seqs = malloc((size_t)S * sizeof(*e->batch_seqs));
    e->logits = malloc((size_t)S * e->cfg->vocab_size * sizeof(float));
    e->sampler = se_sampler_new(e->cfg->vocab_size);
    if (se__blocks_init(&e->blocks, (int)want, bs) || !e->tokens || !e->positions ||
        !e->seq_start || !e->seq_n || !e->seq_ctx || !e->logit_rows || !e->tables ||
        !e->batch_seqs || !e->logits || !e->sampler) {
        se_engine_close(e);
        goto nomem;
    }
    sp_debug("engine: %s backend, %d KV blocks of %d tokens, %d tokens per step, %d sequences",
             e->be.i->name, (int)want, bs, T, S);
    *out = e;
    return 0;
nomem:
    snprintf(err, errcap, "out of memory creating the engine");
    return SP_ENOMEM;
fail:
    se_engine_close(e);
    return rc == SP_ENOMEM || rc == SP_EINVAL ? rc : SP_EBACKEND;
}

static void seq_free(struct seq *s)
{
    free(s->tokens);
    for (int i = 0; i < SE_MAX_STOP; i++)
        free(s->stops[i]);
    free(s->blocks);
    free(s->hashes);
    if (s->detok)
        se_detok_free(s->detok);
    free(s->text);
    free(s);
}

void se_engine_close(se_engine_t *e)
{
    if (!e)
        return;
    for (struct seq *s = e->head, *n; s; s = n) {
        n = s->next;
        seq_free(s);
    }
    if (e->be_ok)
        e->be.i->free(e->be.ctx);
    if (e->sampler)
        se_sampler_free(e->sampler);
    se__blocks_free(&e->blocks);
    free(e->tokens);
    free(e->positions);
    free(e->seq_start);
    free(e->seq_n);
    free(e->seq_ctx);
    free(e->logit_rows);
    free(e->tables);
    free(e->batch_seqs);
    free(e->logits);
    free(e->events);
    free(e->order);
    free(e->usage);
    free(e->noted);
    free(e);
}

static struct seq *find_seq(const se_engine_t *e, int32_t id)
{
    for (struct seq *s = e->head; s; s = s->next)
        if (s->id == id)
            return s;
    return NULL;
}

const int32_t *se_engine_seq_tokens(const se_engine_t *e, int32_t id, int *n)
{
    struct seq *s = find_seq(e, id);
    if (!s) {
        *n = 0;
        return NULL;
    }
    *n = s->n_tokens - s->n_prompt;
    return s->tokens + s->n_prompt;
}

bool se__push_text(struct seq *s, int32_t t, bool finish)
{
    if (!s->detok)
        return true;
    const char *piece = NULL;
    size_t len = 0;
    int rc =
        finish ? se_detok_finish(s->detok, &piece, &len) : se_detok_push(s->detok, t, &piece, &len);
    if (rc)
        return false;
    if (s->text_len + len + 1 > s->text_cap) {
        size_t cap = s->text_cap ? s->text_cap * 2 : 256;
        while (cap < s->text_len + len + 1)
            cap *= 2;
        char *nt = realloc(s->text, cap);
        if (!nt)
            return false;
        s->text = nt;
        s->text_cap = cap;
    }
    memcpy(s->text + s->text_len, piece, len);
    s->text_len += len;
    s->text[s->text_len] = 0;
    return true;
}

/* Renders and tokenizes p->messages into *ids (malloc'd). */
static int chat_prompt(se_engine_t *e, const struct se_seq_params *p, int32_t **ids, size_t *n,
                       char *err, size_t errcap)
{
    if (!e->opts.tok) {
        snprintf(err, errcap, "chat messages need a tokenizer (se_engine_opts.tok)");
        return SP_EINVAL;
    }
    char *text = NULL;
    int rc = se_chat_render(e->opts.tok, p->messages, p->n_messages, true, &text, err, errcap);
    if (rc)
        return rc;
    rc = se_tokenizer_encode(e->opts.tok, text, strlen(text), false, ids, n);
    free(text);
    if (rc)
        snprintf(err, errcap, "cannot tokenize the rendered chat: %s", sp_strerror(rc));
    return rc;
}

static int submit(se_engine_t *e, const struct se_seq_params *p, const int32_t *prompt,
                  size_t n_prompt, int32_t *id, char *err, size_t errcap)
{
    const struct se_model_config *cfg = e->cfg;
    if (!prompt || n_prompt == 0) {
        snprintf(err, errcap, "the prompt is empty");
        return SP_EINVAL;
    }
    if (p->priority != SE_PRIORITY_BATCH && p->priority != SE_PRIORITY_LIVE) {
        snprintf(err, errcap, "priority must be SE_PRIORITY_BATCH or SE_PRIORITY_LIVE, got %d",
                 (int)p->priority);
        return SP_EINVAL;
    }
    size_t n_in = n_prompt + p->n_resume;
    for (size_t i = 0; i < n_in; i++) {
        int32_t t = i < n_prompt ? prompt[i] : p->resume[i - n_prompt];
        if (t < 0 || t >= cfg->vocab_size) {
            snprintf(err, errcap, "token %zu of the %s is %d, outside the vocabulary (0 to %d)",
                     i < n_prompt ? i : i - n_prompt, i < n_prompt ? "prompt" : "resume", t,
                     cfg->vocab_size - 1);
            return SP_EINVAL;
        }
    }
    if (n_in >= (size_t)cfg->max_position) {
        snprintf(err, errcap,
                 "the prompt has %zu tokens; the model's context holds %d, leaving no room to "
                 "generate",
                 n_in, cfg->max_position);
        return SP_ECONTEXT;
    }
    int rc = se_sampling_validate(&p->sampling, cfg->vocab_size, err, errcap);
    if (rc)
        return rc;
    if (p->sampling.n_stop > 0 && !e->opts.tok) {
        snprintf(err, errcap, "stop strings need a tokenizer (se_engine_opts.tok)");
        return SP_EINVAL;
    }
    int bs = e->opts.block_size;
    int64_t max_total = (int64_t)n_prompt + p->sampling.max_tokens;
    if (max_total > cfg->max_position)
        max_total = cfg->max_position;
    if (max_total < (int64_t)n_in)
        max_total = (int64_t)n_in;
    /* A sequence alone must fit, or preempting everything else could not save it. */
    int need = (int)((max_total + bs - 1) / bs);
    if (need > e->blocks.n) {
        snprintf(err, errcap, "the sequence needs %d KV blocks; the cache has %d", need,
                 e->blocks.n);
        return SP_ETOOBIG;
    }
    struct seq *s = calloc(1, sizeof(*s));
    if (!s)
        return SP_ENOMEM;
    s->max_total = (int)max_total;
    s->tokens = malloc((size_t)s->max_total * sizeof(int32_t));
    s->blocks = malloc((size_t)need * sizeof(int32_t));
    s->hashes = malloc((size_t)need * sizeof(uint64_t));
    if (!s->tokens || !s->blocks || !s->hashes)
        goto nomem;
    memcpy(s->tokens, prompt, n_prompt * sizeof(int32_t));
    if (p->n_resume)
        memcpy(s->tokens + n_prompt, p->resume, p->n_resume * sizeof(int32_t));
    s->n_prompt = (int)n_prompt;
    s->n_in = s->n_tokens = (int)n_in;
    s->sp = p->sampling;
    for (int i = 0; i < p->sampling.n_stop; i++) {
        s->stops[i] = strdup(p->sampling.stop[i]);
        if (!s->stops[i])
            goto nomem;
        s->sp.stop[i] = s->stops[i];
    }
    if (e->opts.tok) {
        s->detok = se_detok_new(e->opts.tok, true);
        if (!s->detok)
            goto nomem;
        for (size_t i = 0; i < p->n_resume; i++)
            if (!se__push_text(s, p->resume[i], false))
                goto nomem;
        s->emitted = s->text_len;
    }
    s->id = e->next_id++;
    s->user = p->user;
    s->prio = p->priority;
    s->state = SEQ_WAITING;
    if ((int)p->n_resume >= p->sampling.max_tokens || s->n_tokens >= cfg->max_position) {
        s->state = SEQ_FINISHED;
        s->finish = SE_FINISH_LENGTH;
        s->event_due = true;
    } else {
        e->n_live++;
    }
    if (e->tail)
        e->tail->next = s;
    else
        e->head = s;
    e->tail = s;
    *id = s->id;
    return 0;
nomem:
    seq_free(s);
    snprintf(err, errcap, "out of memory");
    return SP_ENOMEM;
}

int se_engine_submit(se_engine_t *e, const struct se_seq_params *p, int32_t *id, char *err,
                     size_t errcap)
{
    if (p->prompt || !p->messages)
        return submit(e, p, p->prompt, p->n_prompt, id, err, errcap);
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = chat_prompt(e, p, &ids, &n, err, errcap);
    if (!rc)
        rc = submit(e, p, ids, n, id, err, errcap);
    free(ids);
    return rc;
}

void se__release_blocks(se_engine_t *e, struct seq *s)
{
    for (int i = 0; i < s->n_blocks; i++)
        se__blocks_release(&e->blocks, s->blocks[i]);
    s->n_blocks = 0;
    s->n_published = 0;
    s->n_fed = 0;
}

int se_engine_cancel(se_engine_t *e, int32_t id)
{
    struct seq *s = find_seq(e, id);
    if (!s || s->state == SEQ_FINISHED)
        return SP_ENOENT;
    se__release_blocks(e, s);
    if (s->state == SEQ_RUNNING)
        e->n_running--;
    e->n_live--;
    s->state = SEQ_FINISHED;
    s->finish = SE_FINISH_CANCELED;
    s->event_due = true;
    return 0;
}

void se__reap(se_engine_t *e)
{
    struct seq **pp = &e->head, *prev = NULL;
    while (*pp) {
        struct seq *s = *pp;
        if (s->state == SEQ_FINISHED && !s->event_due) {
            *pp = s->next;
            seq_free(s);
        } else {
            prev = s;
            pp = &s->next;
        }
    }
    e->tail = prev;
}
