/*
 * Per-request sampling parameters: the job's params (a JSON object) with the
 * request's params laid over them, key by key. Types are checked here (a
 * field of the wrong JSON type is an error naming it); ranges by the engine's
 * se_sampling_validate, whose message names the field and its allowed range.
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

static int number(json_t *job, json_t *req, const char *key, float *out, char *err, size_t errcap)
{
    json_t *v = get(job, req, key);
    if (!v)
        return 0;
    if (!json_is_number(v)) {
        snprintf(err, errcap, "params.%s must be a number", key);
        return SP_EINVAL;
    }
    *out = (float)json_number_value(v);
    return 0;
}

static int integer(json_t *job, json_t *req, const char *key, long long lo, long long hi,
                   long long *out, char *err, size_t errcap)
{
    json_t *v = get(job, req, key);
    if (!v)
        return 1;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        snprintf(err, errcap, "params.%s must be an integer in [%lld, %lld]", key, lo, hi);
        return SP_EINVAL;
    }
    *out = json_integer_value(v);
    return 0;
}

int wk_params_sampling(json_t *job, json_t *req, int n_vocab, struct se_sampling *sp, char *err,
                       size_t errcap)
{
    se_sampling_default(sp);
    sp->max_tokens = WK_DEFAULT_MAX_TOKENS;
    int rc;
    long long v;
    if ((rc = number(job, req, "temperature", &sp->temperature, err, errcap)) ||
        (rc = number(job, req, "top_p", &sp->top_p, err, errcap)) ||
        (rc = number(job, req, "min_p", &sp->min_p, err, errcap)) ||
        (rc = number(job, req, "repetition_penalty", &sp->repetition_penalty, err, errcap)) ||
        (rc = number(job, req, "presence_penalty", &sp->presence_penalty, err, errcap)) ||
        (rc = number(job, req, "frequency_penalty", &sp->frequency_penalty, err, errcap)))
        return rc;
    if ((rc = integer(job, req, "max_tokens", 1, 1 << 24, &v, err, errcap)) < 0)
        return rc;
    if (rc == 0)
        sp->max_tokens = (int)v;
    if ((rc = integer(job, req, "top_k", 0, 1 << 30, &v, err, errcap)) < 0)
        return rc;
    if (rc == 0)
        sp->top_k = (int)v;
    if ((rc = integer(job, req, "seed", 0, INT64_MAX, &v, err, errcap)) < 0)
        return rc;
    if (rc == 0)
        sp->seed = (uint64_t)v;
    json_t *ie = get(job, req, "ignore_eos");
    if (ie && !json_is_boolean(ie)) {
        snprintf(err, errcap, "params.ignore_eos must be true or false");
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
                snprintf(err, errcap, "params.stop[%zu] must be a non-empty string", i);
                return SP_EINVAL;
            }
            if (sp->n_stop >= SE_MAX_STOP) {
                snprintf(err, errcap, "params.stop has more than %d strings", SE_MAX_STOP);
                return SP_EINVAL;
            }
            sp->stop[sp->n_stop++] = json_string_value(s);
        }
    } else if (stop) {
        snprintf(err, errcap, "params.stop must be a string or an array of strings");
        return SP_EINVAL;
    }
    json_t *ids = get(job, req, "stop_ids");
    if (ids) {
        size_t i;
        json_t *s;
        if (!json_is_array(ids) || json_array_size(ids) > SE_MAX_STOP) {
            snprintf(err, errcap, "params.stop_ids must be an array of at most %d token ids",
                     SE_MAX_STOP);
            return SP_EINVAL;
        }
        json_array_foreach(ids, i, s)
        {
            if (!json_is_integer(s) || json_integer_value(s) < 0 ||
                json_integer_value(s) >= n_vocab) {
                snprintf(err, errcap, "params.stop_ids[%zu] must be a token id in [0, %d)", i,
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
        snprintf(err, errcap, "params.temperature must be finite");
        return SP_EINVAL;
    }
    return 0;
}
