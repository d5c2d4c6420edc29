/*
 * Repetition penalty as Hugging Face applies it (each distinct token of the
 * prompt and the generated text once: positive logits divided by r, negative
 * ones multiplied by r), then presence and frequency penalties as OpenAI
 * defines them (generated tokens only: logit -= presence * (count > 0) +
 * frequency * count), all in float, in that order.
 */
#include "spool/error.h"
#include "sample_int.h"

/* Puts tok on the touched list unless it is there; returns false if tok is out of range. */
static bool touch(se_sampler_t *sm, int32_t tok, size_t *n_touched)
{
    if (tok < 0 || tok >= sm->n_vocab)
        return false;
    if (!sm->seen[tok]) {
        sm->seen[tok] = 1;
        sm->touched[(*n_touched)++] = tok;
    }
    return true;
}

int se__sample_penalize(se_sampler_t *sm, const struct se_sampling *s, float *logits,
                        const int32_t *prompt, size_t n_prompt, const int32_t *generated,
                        size_t n_generated)
{
    const float rep = s->repetition_penalty, pres = s->presence_penalty,
                freq = s->frequency_penalty;
    bool use_rep = rep != 1.0f, use_counts = pres != 0.0f || freq != 0.0f;
    if (!use_rep && !use_counts)
        return 0;

    size_t n_touched = 0;
    int rc = 0;
    if (use_rep) {
        for (size_t i = 0; i < n_prompt && rc == 0; i++)
            if (!touch(sm, prompt[i], &n_touched))
                rc = SP_EINVAL;
    }
    for (size_t i = 0; i < n_generated && rc == 0; i++) {
        if (!touch(sm, generated[i], &n_touched))
            rc = SP_EINVAL;
        else
            sm->count[generated[i]]++;
    }

    for (size_t j = 0; j < n_touched; j++) {
        int32_t tok = sm->touched[j];
        if (rc == 0) {
            float l = logits[tok];
            if (use_rep)
                l = l > 0.0f ? l / rep : l * rep;
            if (use_counts) {
                int32_t c = sm->count[tok];
                l -= pres * (float)(c > 0) + freq * (float)c;
            }
            logits[tok] = l;
        }
        sm->seen[tok] = 0;
        sm->count[tok] = 0;
    }
    return rc;
}
