/*
 * Per-request sampling parameters: the job's params (a JSON object) with the
 * request's params laid over them, key by key. Types are checked here (a
 * field of the wrong JSON type is an error naming it); ranges by the engine's
 * se_sampling_validate, whose message names the field and its allowed range.
 * A live request's `sampling` map (wire.h) goes through the same checks, as a
 * JSON object, so both lanes accept and refuse the same values; its errors
 * name the field as "sampling.NAME" instead of "params.NAME".
 */
#include "worker.h"

#include "spool/error.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* The worker's default for max_tokens when neither job nor request sets it. */
#define WK_DEFAULT_MAX_TOKENS 256

static json_t *get(json_t *job, json_t *req, const char *key)
{
    json_t *v = json_is_object(req) ? json_object_get(req, key) : NULL;
    if (!v && json_is_object(job))
        v = json_object_get(job, key);
    return json_is_null(v) ? NULL : v;
}

static int number(json_t *job, json_t *req, const char *pfx, const char *key, float *out, char *err,
                  size_t errcap)
{
    json_t *v = get(job, req, key);
    if (!v)
        return 0;
    if (!json_is_number(v)) {
        snprintf(err, errcap, "%s.%s must be a number", pfx, key);
        return SP_EINVAL;
    }
    *out = (float)json_number_value(v);
    return 0;
}

static int integer(json_t *job, json_t *req, const char *pfx, const char *key, long long lo,
                   long long hi, long long *out, char *err, size_t errcap)
{
    json_t *v = get(job, req, key);
    if (!v)
        return 1;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        snprintf(err, errcap, "%s.%s must be an integer in [%lld, %lld]", pfx, key, lo, hi);
        return SP_EINVAL;
    }
    *out = json_integer_value(v);
    return 0;
}

/* The checks of both lanes; pfx names the object in messages ("params", "sampling"). */
static int sampling_from(json_t *job, json_t *req, const char *pfx, int n_vocab,
                         struct se_sampling *sp, char *err, size_t errcap)
{
    se_sampling_default(sp);
    sp->max_tokens = WK_DEFAULT_MAX_TOKENS;
    int rc;
    long long v;
    if ((rc = number(job, req, pfx, "temperature", &sp->temperature, err, errcap)) ||
        (rc = number(job, req, pfx, "top_p", &sp->top_p, err, errcap)) ||
        (rc = number(job, req, pfx, "min_p", &sp->min_p, err, errcap)) ||
        (rc = number(job, req, pfx, "repetition_penalty", &sp->repetition_penalty, err, errcap)) ||
        (rc = number(job, req, pfx, "presence_penalty", &sp->presence_penalty, err, errcap)) ||
        (rc = number(job, req, pfx, "frequency_penalty", &sp->frequency_penalty, err, errcap)))
        return rc;
    if ((rc = integer(job, req, pfx, "max_tokens", 1, 1 << 24, &v, err, errcap)) < 0)
        return rc;
    if (rc == 0)
        sp->max_tokens = (int)v;
    if ((rc = integer(job, req, pfx, "top_k", 0, 1 << 30, &v, err, errcap)) < 0)
        return rc;
    if (rc == 0)
        sp->top_k = (int)v;
    if ((rc = integer(job, req, pfx, "seed", 0, INT64_MAX, &v, err, errcap)) < 0)
        return rc;
    if (rc == 0)
        sp->seed = (uint64_t)v;
    json_t *ie = get(job, req, "ignore_eos");
    if (ie && !json_is_boolean(ie)) {
        snprintf(err, errcap, "%s.ignore_eos must be true or false", pfx);
        return SP_EINVAL;
    }
    sp->ignore_eos = ie && json_is_true(ie);

    json_t *stop = get(job, req, "stop");
    if (json_is_string(stop)) {
        sp->stop[sp->n_stop++] = json_string_value(stop);
    } else if (json_is_array(stop)) {
        size_t i;
        json_t *s;
        json_array_foreach(stop, i, s)
        {
            if (!json_is_string(s) || !*json_string_value(s)) {
                snprintf(err, errcap, "%s.stop[%zu] must be a non-empty string", pfx, i);
                return SP_EINVAL;
            }
            if (sp->n_stop >= SE_MAX_STOP) {
                snprintf(err, errcap, "%s.stop has more than %d strings", pfx, SE_MAX_STOP);
                return SP_EINVAL;
            }
            sp->stop[sp->n_stop++] = json_string_value(s);
        }
    } else if (stop) {
        snprintf(err, errcap, "%s.stop must be a string or an array of strings", pfx);
        return SP_EINVAL;
    }
    json_t *ids = get(job, req, "stop_ids");
    if (ids) {
        size_t i;
        json_t *s;
        if (!json_is_array(ids) || json_array_size(ids) > SE_MAX_STOP) {
            snprintf(err, errcap, "%s.stop_ids must be an array of at most %d token ids", pfx,
                     SE_MAX_STOP);
            return SP_EINVAL;
        }
        json_array_foreach(ids, i, s)
        {
            if (!json_is_integer(s) || json_integer_value(s) < 0 ||
                json_integer_value(s) >= n_vocab) {
                snprintf(err, errcap, "%s.stop_ids[%zu] must be a token id in [0, %d)", pfx, i,
                         n_vocab);
                return SP_EINVAL;
            }
            sp->stop_ids[sp->n_stop_ids++] = (int32_t)json_integer_value(s);
        }
    }
    char e2[256];
    if (se_sampling_validate(sp, n_vocab, e2, sizeof(e2))) {
        snprintf(err, errcap, "invalid sampling parameters: %s", e2);
        return SP_EINVAL;
    }
    if (!isfinite(sp->temperature)) {
        snprintf(err, errcap, "%s.temperature must be finite", pfx);
        return SP_EINVAL;
    }
    return 0;
}

int wk_params_sampling(json_t *job, json_t *req, int n_vocab, struct se_sampling *sp, char *err,
                       size_t errcap)
{
    return sampling_from(job, req, "params", n_vocab, sp, err, errcap);
}

/* Sets key to a finite number; SP_EINVAL naming it otherwise (JSON has no NaN or infinity). */
static int put_real(json_t *o, const char *key, double v, char *err, size_t errcap)
{
    if (!isfinite(v)) {
        snprintf(err, errcap, "sampling.%s must be a finite number", key);
        return SP_EINVAL;
    }
    return json_object_set_new(o, key, json_real(v)) ? SP_ENOMEM : 0;
}

int wk_params_wire(const struct sp_wire_sampling *ws, int n_vocab, struct se_sampling *sp,
                   char *err, size_t errcap)
{
    json_t *o = json_object();
    if (!o) {
        snprintf(err, errcap, "out of memory");
        return SP_ENOMEM;
    }
    int rc = 0;
#define REAL(k)                                                                                    \
    if (!rc && ws->has_##k)                                                                        \
    rc = put_real(o, #k, ws->k, err, errcap)
    REAL(temperature);
    REAL(top_p);
    REAL(min_p);
    REAL(repetition_penalty);
    REAL(presence_penalty);
    REAL(frequency_penalty);
#undef REAL
    if (!rc && ws->has_top_k && json_object_set_new(o, "top_k", json_integer(ws->top_k)))
        rc = SP_ENOMEM;
    if (!rc && ws->has_max_tokens &&
        json_object_set_new(o, "max_tokens", json_integer(ws->max_tokens)))
        rc = SP_ENOMEM;
    if (!rc && ws->has_ignore_eos &&
        json_object_set_new(o, "ignore_eos", json_boolean(ws->ignore_eos)))
        rc = SP_ENOMEM;
    if (!rc && ws->n_stop_ids) {
        json_t *a = json_array();
        for (uint32_t i = 0; a && i < ws->n_stop_ids; i++)
            json_array_append_new(a, json_integer(ws->stop_ids[i]));
        if (json_object_set_new(o, "stop_ids", a))
            rc = SP_ENOMEM;
    }
    if (!rc && ws->n_stop) {
        json_t *a = json_array();
        for (uint32_t i = 0; !rc && a && i < ws->n_stop; i++) {
            json_t *str = json_string(ws->stop[i]);
            if (!str) {
                snprintf(err, errcap, "sampling.stop[%u] must be valid UTF-8", i);
                rc = SP_EINVAL;
            }
            json_array_append_new(a, str);
        }
        if (json_object_set_new(o, "stop", a) && !rc)
            rc = SP_ENOMEM;
    }
    if (rc == SP_ENOMEM)
        snprintf(err, errcap, "out of memory");
    if (!rc)
        rc = sampling_from(NULL, o, "sampling", n_vocab, sp, err, errcap);
    json_decref(o);
    if (rc)
        return rc;
    /* The JSON strings are gone: point the stop strings at the frame's, in the same order. */
    for (int i = 0; i < sp->n_stop; i++)
        sp->stop[i] = ws->stop[i];
    /* The seed is any u64 on the wire (JSON integers stop at 2^63 - 1). */
    if (ws->has_seed)
        sp->seed = ws->seed;
    if (ws->has_logprobs) {
        if (ws->logprobs > SE_MAX_LOGPROBS) {
            snprintf(err, errcap, "sampling.logprobs must be an integer in [0, %d], got %u",
                     SE_MAX_LOGPROBS, ws->logprobs);
            return SP_EINVAL;
        }
        sp->logprobs = (int)ws->logprobs;
    }
    return 0;
}
