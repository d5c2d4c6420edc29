/*
 * The engine step: schedule (sched.c), one forward pass, sampling, finish
 * reasons, text and events. See spool/engine.h.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static bool is_eos(const se_engine_t *e, int32_t t)
{
    for (int i = 0; i < e->cfg->n_eos; i++)
        if (e->cfg->eos_ids[i] == t)
            return true;
    int32_t te = e->opts.tok ? se_tokenizer_eos(e->opts.tok) : -1;
    return te >= 0 && te == t && e->cfg->n_eos == 0;
}

int se__reserve_events(se_engine_t *e, int cap)
{
    if (cap <= e->events_cap)
        return 0;
    struct se_event *ne = realloc(e->events, (size_t)cap * sizeof(*ne));
    if (!ne)
        return SP_ENOMEM;
    e->events = ne;
    e->events_cap = cap;
    return 0;
}

struct se_event *se__add_event(se_engine_t *e, struct seq *s, int32_t token, float logprob)
{
    struct se_event *ev = &e->events[e->n_events++];
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

static void finish(se_engine_t *e, struct seq *s)
{
    se__release_blocks(e, s);
    e->n_running--;
    e->n_live--;
    s->state = SEQ_FINISHED;
}

/* Samples the next token of s from its logits row and records it; 0 or an SP_E* code. */
static int sample_one(se_engine_t *e, struct seq *s, float *lg)
{
    struct se_sample_result r;
    int n_gen = s->n_tokens - s->n_prompt;
    int rc = se_sample(e->sampler, &s->sp, lg, s->tokens, (size_t)s->n_prompt,
                       s->tokens + s->n_prompt, (size_t)n_gen, &r);
    if (rc) {
        snprintf(e->err, sizeof(e->err), "sampling failed: %s", sp_strerror(rc));
        return rc;
    }
    s->tokens[s->n_tokens++] = r.token;
    s->u_decode++;
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
    if (!se__push_text(s, r.token, false) ||
        (s->finish != SE_FINISH_NONE && !se__push_text(s, -1, true))) {
        snprintf(e->err, sizeof(e->err), "out of memory decoding text");
        return SP_ENOMEM;
    }
    struct se_event *ev = se__add_event(e, s, r.token, r.logprob);
    emit_text(s, ev);
    return 0;
}

static int step(se_engine_t *e, int *n_tokens)
{
    *n_tokens = 0;
    int cap = e->opts.max_seqs + 2 * e->n_live;
    for (struct seq *s = e->head; s; s = s->next)
        cap += s->event_due;
    int rc = se__reserve_events(e, cap);
    if (rc)
        return rc;
    for (struct seq *s = e->head; s; s = s->next)
        if (s->event_due) {
            s->event_due = false;
            struct se_event *ev = se__add_event(e, s, -1, 0);
            if (s->finish == SE_FINISH_LENGTH)
                emit_text(s, ev);
        }
    int ns = se__schedule(e, n_tokens);
    if (ns <= 0)
        return ns;
    /* Rows ascend with k: sequences were laid out in batch order. */
    int n_logits = 0;
    for (int k = 0; k < ns; k++)
        if (e->seq_ctx[k] == e->batch_seqs[k]->n_tokens)
            e->logit_rows[n_logits++] = e->seq_start[k] + e->seq_n[k] - 1;
    struct se_batch b = {.n_tokens = *n_tokens,
                         .tokens = e->tokens,
                         .positions = e->positions,
                         .n_seqs = ns,
                         .seq_start = e->seq_start,
                         .seq_n_tokens = e->seq_n,
                         .seq_ctx_len = e->seq_ctx,
                         .block_tables = e->tables,
                         .n_logits = n_logits,
                         .logit_rows = e->logit_rows};
    rc = e->be.i->forward(e->be.ctx, &b, e->logits);
    if (rc) {
        snprintf(e->err, sizeof(e->err), "%s", e->be.i->last_error(e->be.ctx));
        return rc == SP_ENOMEM ? rc : SP_EBACKEND;
    }
    int row = 0;
    for (int k = 0; k < ns; k++) {
        struct seq *s = e->batch_seqs[k];
        s->n_fed = e->seq_ctx[k];
        se__publish_full(e, s);
        if (s->n_fed < s->n_tokens)
            continue; /* more of the prompt to come */
        rc = sample_one(e, s, e->logits + (size_t)row++ * e->cfg->vocab_size);
        if (rc)
            return rc;
        if (s->finish != SE_FINISH_NONE)
            finish(e, s);
    }
    return 0;
}

int se_engine_step(se_engine_t *e, const struct se_event **events)
{
    int64_t t0 = se__now_ns();
    *events = NULL;
    se__reap(e);
    e->n_events = 0;
    int rc = se__usage_begin(e);
    int n_tokens = 0;
    if (!rc)
        rc = step(e, &n_tokens);
    int urc = se__usage_end(e, t0, n_tokens);
    if (rc < 0)
        return rc;
    if (urc < 0)
        return urc;
    *events = e->events;
    return e->n_events;
}
