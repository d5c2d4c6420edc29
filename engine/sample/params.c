/*
 * Sampling parameters: defaults and validation. Validation runs once per
 * request (at submission), not per token; its messages name the field, the
 * allowed range and the value received, for the HTTP and batch front ends to
 * return as they are.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "spool/error.h"
#include "spool/sample.h"

/* Longest stop string accepted, in bytes. */
#define STOP_MAX_BYTES 256
/* Largest temperature accepted; beyond it the distribution is flat to float precision anyway. */
#define TEMPERATURE_MAX 100.0f

void se_sampling_default(struct se_sampling *s)
{
    memset(s, 0, sizeof(*s));
    s->temperature = 1.0f;
    s->top_k = 0;
    s->top_p = 1.0f;
    s->min_p = 0.0f;
    s->repetition_penalty = 1.0f;
    s->presence_penalty = 0.0f;
    s->frequency_penalty = 0.0f;
    s->seed = 0;
    s->max_tokens = 16;
    s->logprobs = 0;
    s->ignore_eos = false;
}

static int fail(char *err, size_t errcap, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errcap, const char *fmt, ...)
{
    if (err && errcap > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errcap, fmt, ap);
        va_end(ap);
    }
    return SP_EINVAL;
}

/* Returns the length of the valid UTF-8 sequence at s[0..len), or 0 if it is invalid. */
static size_t utf8_seq(const unsigned char *s, size_t len)
{
    size_t need;
    uint32_t cp;
    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xC2 && s[0] <= 0xDF) {
        need = 2;
        cp = s[0] & 0x1F;
    } else if (s[0] >= 0xE0 && s[0] <= 0xEF) {
        need = 3;
        cp = s[0] & 0x0F;
    } else if (s[0] >= 0xF0 && s[0] <= 0xF4) {
        need = 4;
        cp = s[0] & 0x07;
    } else {
        return 0;
    }
    if (len < need)
        return 0;
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    /* Overlong forms, surrogates and code points beyond U+10FFFF. */
    if ((need == 3 && cp < 0x800) || (need == 4 && cp < 0x10000) || cp > 0x10FFFF ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return need;
}

static bool utf8_valid(const char *s, size_t len)
{
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < len;) {
        size_t n = utf8_seq(p + i, len - i);
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

int se_sampling_validate(const struct se_sampling *s, int n_vocab, char *err, size_t errcap)
{
    if (n_vocab <= 0)
        return fail(err, errcap, "n_vocab must be > 0, got %d", n_vocab);
    if (!(s->temperature >= 0.0f && s->temperature <= TEMPERATURE_MAX))
        return fail(err, errcap, "temperature must be in [0, %g] (0 = greedy), got %g",
                    (double)TEMPERATURE_MAX, (double)s->temperature);
    if (s->top_k < 0)
        return fail(err, errcap, "top_k must be >= 0 (0 = off), got %d", s->top_k);
    if (!(s->top_p > 0.0f && s->top_p <= 1.0f))
        return fail(err, errcap, "top_p must be in (0, 1] (1 = off), got %g", (double)s->top_p);
    if (!(s->min_p >= 0.0f && s->min_p < 1.0f))
        return fail(err, errcap, "min_p must be in [0, 1) (0 = off), got %g", (double)s->min_p);
    if (!(s->repetition_penalty > 0.0f && isfinite(s->repetition_penalty)))
        return fail(err, errcap, "repetition_penalty must be a finite number > 0 (1 = off), got %g",
                    (double)s->repetition_penalty);
    if (!(s->presence_penalty >= -2.0f && s->presence_penalty <= 2.0f))
        return fail(err, errcap, "presence_penalty must be in [-2, 2] (0 = off), got %g",
                    (double)s->presence_penalty);
    if (!(s->frequency_penalty >= -2.0f && s->frequency_penalty <= 2.0f))
        return fail(err, errcap, "frequency_penalty must be in [-2, 2] (0 = off), got %g",
                    (double)s->frequency_penalty);
    if (s->max_tokens <= 0)
        return fail(err, errcap, "max_tokens must be > 0, got %d", s->max_tokens);
    if (s->logprobs < 0 || s->logprobs > SE_MAX_LOGPROBS)
        return fail(err, errcap, "logprobs must be in [0, %d], got %d", SE_MAX_LOGPROBS,
                    s->logprobs);
    if (s->n_stop_ids < 0 || s->n_stop_ids > SE_MAX_STOP)
        return fail(err, errcap, "stop_token_ids may hold at most %d ids, got %d", SE_MAX_STOP,
                    s->n_stop_ids);
    for (int i = 0; i < s->n_stop_ids; i++) {
        if (s->stop_ids[i] < 0 || s->stop_ids[i] >= n_vocab)
            return fail(err, errcap, "stop_token_ids[%d] must be in [0, %d), got %d", i, n_vocab,
                        (int)s->stop_ids[i]);
    }
    if (s->n_stop < 0 || s->n_stop > SE_MAX_STOP)
        return fail(err, errcap, "stop may hold at most %d strings, got %d", SE_MAX_STOP,
                    s->n_stop);
    for (int i = 0; i < s->n_stop; i++) {
        if (!s->stop[i] || s->stop[i][0] == '\0')
            return fail(err, errcap, "stop[%d] must be a non-empty string", i);
        size_t len = strnlen(s->stop[i], STOP_MAX_BYTES + 1);
        if (len > STOP_MAX_BYTES)
            return fail(err, errcap, "stop[%d] must be at most %d bytes long, got %zu", i,
                        STOP_MAX_BYTES, strlen(s->stop[i]));
        if (!utf8_valid(s->stop[i], len))
            return fail(err, errcap, "stop[%d] must be valid UTF-8", i);
    }
    return 0;
}
