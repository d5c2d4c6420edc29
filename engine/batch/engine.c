/*
 * The engine: sequences, a simple KV block allocator, and one batched
 * forward pass + sampling per step. See spool/engine.h.
 *
 * Scheduling, per step: every running sequence whose prompt is done feeds its
 * last token (decode); then sequences still in their prompt feed chunks, in
 * submission order, within max_batch_tokens (chunked prefill). A waiting
 * sequence is admitted when a running slot and KV blocks for its whole
 * reservation (prompt + max_tokens, capped at the context) are free, so a
 * running sequence never lacks a block. Preemption, priorities and prefix
 * sharing are left to the next layer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../cpu/cpu.h"
#include "../model/weights.h"
#include "spool/engine.h"
#include "spool/log.h"

enum seq_state { SEQ_WAITING, SEQ_RUNNING, SEQ_FINISHED };

struct seq {
    int32_t id;
    uint64_t user;
    enum seq_state state;
    int32_t *tokens; /* prompt then generated; capacity max_total */
    int n_prompt, n_tokens, n_fed, max_total;
    struct se_sampling sp;
    char *stops[SE_MAX_STOP];
    int32_t *blocks;
    int n_blocks;
    se_detok_t *detok;
    char *text;
    size_t text_len, text_cap, emitted;
    enum se_finish finish;
    bool event_due; /* finished outside a step (cancel, resume at max_tokens) */
    struct seq *next;
};

struct se_engine {
    const se_model_t *model;
    const struct se_model_config *cfg;
    struct se_engine_opts opts;
    struct se_backend be;
    bool be_ok;
    se_sampler_t *sampler;
    char err[512];

    int n_blocks, *free_blocks, n_free;
    struct seq *head, *tail; /* active and just-finished sequences, in submission order */
    int n_running, n_live;
    int32_t next_id;

    /* Step buffers, sized at open. */
    int32_t *tokens, *positions, *seq_start, *seq_n, *seq_ctx, *logit_rows;
    const int32_t **tables;
    struct seq **batch_seqs;
    float *logits;
    struct se_event *events;
    int events_cap;
};

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
    struct se_cpu_opts co = {.n_threads = o->n_threads, .max_tokens = o->max_batch_tokens};
    int rc = se__backend_cpu_new(&co, &e->be);
    if (rc)
        goto nomem;
    e->be_ok = true;
    if ((rc = e->be.i->load(e->be.ctx, e->cfg, se__model_weights(model)))) {
        snprintf(err, errcap, "%s", e->be.i->last_error(e->be.ctx));
        goto fail;
    }
    int64_t per_seq = (e->cfg->max_position + bs - 1) / bs;
    int64_t want = per_seq * o->max_seqs;
    if (e->be.i->kv_blocks_for) {
        size_t budget = o->kv_bytes ? o->kv_bytes : (size_t)1 << 30;
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
    e->n_blocks = (int)want;
    if ((rc = e->be.i->kv_alloc(e->be.ctx, e->n_blocks, bs))) {
        snprintf(err, errcap, "%s", e->be.i->last_error(e->be.ctx));
        goto fail;
    }
    e->free_blocks = malloc((size_t)e->n_blocks * sizeof(int));
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
    if (!e->free_blocks || !e->tokens || !e->positions || !e->seq_start || !e->seq_n ||
        !e->seq_ctx || !e->logit_rows || !e->tables || !e->batch_seqs || !e->logits ||
        !e->sampler) {
        se_engine_close(e);
        goto nomem;
    }
    /* A stack: blocks are handed out from the top, n_blocks - 1 first. */
    for (int i = 0; i < e->n_blocks; i++)
        e->free_blocks[e->n_free++] = i;
    sp_debug("engine: %d KV blocks of %d tokens, %d tokens per step, %d sequences", e->n_blocks, bs,
             T, S);
    *out = e;
    return 0;
nomem:
    snprintf(err, errcap, "out of memory creating the engine");
    return SP_ENOMEM;
fail:
    se_engine_close(e);
    return rc == SP_ENOMEM ? SP_ENOMEM : SP_EBACKEND;
}

static void seq_free(struct seq *s)
{
    free(s->tokens);
    for (int i = 0; i < SE_MAX_STOP; i++)
        free(s->stops[i]);
    free(s->blocks);
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
    free(e->free_blocks);
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

/* Appends the detokenized text of token t; false when out of memory. */
static bool push_text(struct seq *s, int32_t t, bool finish)
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

int se_engine_submit(se_engine_t *e, const struct se_seq_params *p, int32_t *id, char *err,
                     size_t errcap)
{
    const struct se_model_config *cfg = e->cfg;
    if (!p->prompt || p->n_prompt == 0) {
        snprintf(err, errcap, "the prompt is empty");
        return SP_EINVAL;
    }
    size_t n_in = p->n_prompt + p->n_resume;
    for (size_t i = 0; i < n_in; i++) {
        int32_t t = i < p->n_prompt ? p->prompt[i] : p->resume[i - p->n_prompt];
        if (t < 0 || t >= cfg->vocab_size) {
            snprintf(err, errcap, "token %zu of the %s is %d, outside the vocabulary (0 to %d)",
                     i < p->n_prompt ? i : i - p->n_prompt, i < p->n_prompt ? "prompt" : "resume",
                     t, cfg->vocab_size - 1);
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
    int64_t max_total = (int64_t)p->n_prompt + p->sampling.max_tokens;
    if (max_total > cfg->max_position)
        max_total = cfg->max_position;
    int need = (int)((max_total + e->opts.block_size - 1) / e->opts.block_size);
    if (need > e->n_blocks) {
        snprintf(err, errcap, "the sequence needs %d KV blocks; the cache has %d", need,
                 e->n_blocks);
        return SP_ETOOBIG;
    }
    struct seq *s = calloc(1, sizeof(*s));
    if (!s)
        return SP_ENOMEM;
    s->max_total = (int)(max_total > (int64_t)n_in ? max_total : (int64_t)n_in);
    s->tokens = malloc((size_t)s->max_total * sizeof(int32_t));
    s->blocks = malloc((size_t)need * sizeof(int32_t));
    if (!s->tokens || !s->blocks)
        goto nomem;
    memcpy(s->tokens, p->prompt, p->n_prompt * sizeof(int32_t));
    if (p->n_resume)
        memcpy(s->tokens + p->n_prompt, p->resume, p->n_resume * sizeof(int32_t));
    s->n_prompt = (int)p->n_prompt;
    s->n_tokens = (int)n_in;
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
            if (!push_text(s, p->resume[i], false))
                goto nomem;
        s->emitted = s->text_len;
    }
    s->id = e->next_id++;
    s->user = p->user;
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

static void release(se_engine_t *e, struct seq *s)
{
    for (int i = 0; i < s->n_blocks; i++)
        e->free_blocks[e->n_free++] = s->blocks[i];
    s->n_blocks = 0;
    if (s->state == SEQ_RUNNING)
        e->n_running--;
    if (s->state != SEQ_FINISHED)
        e->n_live--;
    s->state = SEQ_FINISHED;
}

int se_engine_cancel(se_engine_t *e, int32_t id)
{
    struct seq *s = find_seq(e, id);
    if (!s || s->state == SEQ_FINISHED)
        return SP_ENOENT;
    release(e, s);
    s->finish = SE_FINISH_CANCELED;
    s->event_due = true;
    return 0;
}

/* Drops sequences whose finish event was returned by the previous step. */
static void reap(se_engine_t *e)
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

static void admit(se_engine_t *e)
{
    for (struct seq *s = e->head; s && e->n_running < e->opts.max_seqs; s = s->next) {
        if (s->state != SEQ_WAITING)
            continue;
        int need = (s->max_total + e->opts.block_size - 1) / e->opts.block_size;
        if (need > e->n_free)
            break; /* first come, first served: later ones wait too */
        for (int i = 0; i < need; i++)
            s->blocks[i] = e->free_blocks[--e->n_free];
        s->n_blocks = need;
        s->state = SEQ_RUNNING;
        e->n_running++;
    }
}

static bool is_eos(const se_engine_t *e, int32_t t)
{
    for (int i = 0; i < e->cfg->n_eos; i++)
        if (e->cfg->eos_ids[i] == t)
            return true;
    int32_t te = e->opts.tok ? se_tokenizer_eos(e->opts.tok) : -1;
    return te >= 0 && te == t && e->cfg->n_eos == 0;
}

static struct se_event *add_event(se_engine_t *e, int *n, struct seq *s, int32_t token,
                                  float logprob)
{
    struct se_event *ev = &e->events[(*n)++];
    *ev = (struct se_event){.seq = s->id,
                            .user = s->user,
                            .token = token,
                            .logprob = logprob,
                            .finish = s->finish,
                            .n_prompt = s->n_prompt,
                            .n_generated = s->n_tokens - s->n_prompt};
    ev->text = s->text ? s->text + s->emitted : "";
    ev->text_len = 0;
    return ev;
}

/* Sets the event's text to what may be shown now, finding stop strings. */
static void emit_text(struct seq *s, struct se_event *ev)
{
    if (!s->detok)
        return;
    size_t safe = s->text_len;
    size_t from = s->emitted;
    if (s->sp.n_stop > 0) {
        /*
         * Text before emitted was shown already, so it cannot hold the start
         * of a stop string (se_stop_find held such tails back).
         */
        long at = se_stop_find(&s->sp, s->text + from, s->text_len - from, &safe);
        safe += from;
        if (at >= 0) {
            s->finish = ev->finish = SE_FINISH_STOP_STRING;
            safe = from + (size_t)at;
            s->text_len = safe;
        }
    }
    if (s->finish != SE_FINISH_NONE && s->finish != SE_FINISH_STOP_STRING)
        safe = s->text_len;
    ev->text = s->text + from;
    ev->text_len = safe - from;
    s->emitted = safe;
}

int se_engine_step(se_engine_t *e, const struct se_event **events)
{
    *events = NULL;
    reap(e);
    int cap = e->opts.max_seqs;
    for (struct seq *s = e->head; s; s = s->next)
        cap += s->event_due;
    if (cap > e->events_cap) {
        struct se_event *ne = realloc(e->events, (size_t)cap * sizeof(*ne));
        if (!ne)
            return SP_ENOMEM;
        e->events = ne;
        e->events_cap = cap;
    }
    int n_ev = 0;
    for (struct seq *s = e->head; s; s = s->next)
        if (s->event_due) {
            s->event_due = false;
            struct se_event *ev = add_event(e, &n_ev, s, -1, 0);
            if (s->finish == SE_FINISH_LENGTH)
                emit_text(s, ev);
        }
    admit(e);

    /* Build the batch: decode tokens first, then prompt chunks within the budget. */
    int budget = e->opts.max_batch_tokens, n = 0, ns = 0;
    for (int pass = 0; pass < 2; pass++)
        for (struct seq *s = e->head; s && budget > 0; s = s->next) {
            if (s->state != SEQ_RUNNING)
                continue;
            int pending = s->n_tokens - s->n_fed;
            bool decode = s->n_fed >= s->n_prompt && pending == 1;
            if ((pass == 0) != decode || pending <= 0)
                continue;
            int take = pending < budget ? pending : budget;
            e->seq_start[ns] = n;
            e->seq_n[ns] = take;
            e->seq_ctx[ns] = s->n_fed + take;
            e->tables[ns] = s->blocks;
            e->batch_seqs[ns] = s;
            for (int k = 0; k < take; k++) {
                e->tokens[n + k] = s->tokens[s->n_fed + k];
                e->positions[n + k] = s->n_fed + k;
            }
            n += take;
            budget -= take;
            ns++;
        }
    if (ns == 0) {
        *events = e->events;
        return n_ev;
    }
    /* Rows ascend with k: sequences were laid out in batch order. */
    int n_logits = 0;
    for (int k = 0; k < ns; k++)
        if (e->seq_ctx[k] == e->batch_seqs[k]->n_tokens)
            e->logit_rows[n_logits++] = e->seq_start[k] + e->seq_n[k] - 1;
    struct se_batch b = {.n_tokens = n,
                         .tokens = e->tokens,
                         .positions = e->positions,
                         .n_seqs = ns,
                         .seq_start = e->seq_start,
                         .seq_n_tokens = e->seq_n,
                         .seq_ctx_len = e->seq_ctx,
                         .block_tables = e->tables,
                         .n_logits = n_logits,
                         .logit_rows = e->logit_rows};
    int rc = e->be.i->forward(e->be.ctx, &b, e->logits);
    if (rc) {
        snprintf(e->err, sizeof(e->err), "%s", e->be.i->last_error(e->be.ctx));
        return rc == SP_ENOMEM ? rc : SP_EBACKEND;
    }
    int row = 0;
    for (int k = 0; k < ns; k++) {
        struct seq *s = e->batch_seqs[k];
        s->n_fed = e->seq_ctx[k];
        if (s->n_fed < s->n_tokens)
            continue; /* more of the prompt to come */
        float *lg = e->logits + (size_t)row++ * e->cfg->vocab_size;
        struct se_sample_result r;
        int n_gen = s->n_tokens - s->n_prompt;
        rc = se_sample(e->sampler, &s->sp, lg, s->tokens, (size_t)s->n_prompt,
                       s->tokens + s->n_prompt, (size_t)n_gen, &r);
        if (rc) {
            snprintf(e->err, sizeof(e->err), "sampling failed: %s", sp_strerror(rc));
            return rc;
        }
        s->tokens[s->n_tokens++] = r.token;
        n_gen++;
        bool stop_id = false;
        for (int i = 0; i < s->sp.n_stop_ids; i++)
            stop_id |= s->sp.stop_ids[i] == r.token;
        if (!s->sp.ignore_eos && is_eos(e, r.token))
            s->finish = SE_FINISH_EOS;
        else if (stop_id)
            s->finish = SE_FINISH_STOP;
        else if (n_gen >= s->sp.max_tokens || s->n_tokens >= s->max_total ||
                 s->n_tokens >= e->cfg->max_position)
            s->finish = SE_FINISH_LENGTH;
        if (!push_text(s, r.token, false) ||
            (s->finish != SE_FINISH_NONE && !push_text(s, -1, true))) {
            snprintf(e->err, sizeof(e->err), "out of memory decoding text");
            return SP_ENOMEM;
        }
        struct se_event *ev = add_event(e, &n_ev, s, r.token, r.logprob);
        emit_text(s, ev);
        if (s->finish != SE_FINISH_NONE)
            release(e, s);
    }
    *events = e->events;
    return n_ev;
}
