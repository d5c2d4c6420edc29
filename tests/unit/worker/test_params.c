/* The worker's parameter merge: job params with request params laid over them. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "worker.h"

static int merge(const char *job, const char *req, struct se_sampling *sp, char *err, size_t cap)
{
    json_t *j = job ? json_loads(job, 0, NULL) : NULL;
    json_t *r = req ? json_loads(req, 0, NULL) : NULL;
    int rc = wk_params_sampling(j, r, 300, sp, err, cap);
    json_decref(j);
    json_decref(r);
    return rc;
}

static void request_overrides_job(void **state)
{
    (void)state;
    struct se_sampling sp;
    char err[256];
    assert_int_equal(merge("{\"temperature\": 0.5, \"max_tokens\": 10, \"seed\": 3}",
                           "{\"max_tokens\": 20, \"top_k\": 5, \"stop\": [\"a\", \"b\"]}", &sp, err,
                           sizeof err),
                     0);
    assert_true(sp.temperature == 0.5f);
    assert_int_equal(sp.max_tokens, 20);
    assert_int_equal(sp.seed, 3);
    assert_int_equal(sp.top_k, 5);
    assert_int_equal(sp.n_stop, 2);
    assert_int_equal(merge(NULL, NULL, &sp, err, sizeof err), 0);
    assert_int_equal(sp.max_tokens, 256); /* the worker's default */
    assert_int_equal(merge(NULL, "{\"stop\": \"x\", \"top_p\": null}", &sp, err, sizeof err), 0);
    assert_int_equal(sp.n_stop, 1);
    assert_true(sp.top_p == 1.0f);
}

static void bad_values_name_the_field(void **state)
{
    (void)state;
    struct se_sampling sp;
    char err[256];
    assert_int_equal(merge(NULL, "{\"top_p\": 1.5}", &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "top_p"));
    assert_int_equal(merge("{\"temperature\": \"hot\"}", NULL, &sp, err, sizeof err), SP_EINVAL);
    assert_string_equal(err, "params.temperature must be a number");
    assert_int_equal(merge(NULL, "{\"max_tokens\": 0}", &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "params.max_tokens"));
    assert_int_equal(merge(NULL, "{\"stop\": [1]}", &sp, err, sizeof err), SP_EINVAL);
    assert_string_equal(err, "params.stop[0] must be a non-empty string");
    assert_int_equal(merge(NULL, "{\"stop_ids\": [300]}", &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "params.stop_ids[0]"));
    assert_int_equal(merge(NULL, "{\"ignore_eos\": 1}", &sp, err, sizeof err), SP_EINVAL);
    assert_int_equal(merge(NULL, "{\"seed\": -1}", &sp, err, sizeof err), SP_EINVAL);
}

/* A live request's sampling map: the same checks, named as sampling.NAME. */
static void wire_sampling(void **state)
{
    (void)state;
    struct se_sampling sp;
    char err[256];
    const char *stops[2] = {"END", "\n\n"};
    int32_t stop_ids[1] = {7};
    struct sp_wire_sampling ws = {.has_temperature = true,
                                  .temperature = 0.25,
                                  .has_top_k = true,
                                  .top_k = 40,
                                  .has_top_p = true,
                                  .top_p = 0.9,
                                  .has_seed = true,
                                  .seed = UINT64_MAX,
                                  .has_max_tokens = true,
                                  .max_tokens = 12,
                                  .has_logprobs = true,
                                  .logprobs = 3,
                                  .has_ignore_eos = true,
                                  .ignore_eos = true,
                                  .stop = stops,
                                  .n_stop = 2,
                                  .stop_ids = stop_ids,
                                  .n_stop_ids = 1};
    assert_int_equal(wk_params_wire(&ws, 300, &sp, err, sizeof err), 0);
    assert_true(sp.temperature == 0.25f && sp.top_p == 0.9f);
    assert_int_equal(sp.top_k, 40);
    assert_true(sp.seed == UINT64_MAX); /* any u64, beyond JSON's integers */
    assert_int_equal(sp.max_tokens, 12);
    assert_int_equal(sp.logprobs, 3);
    assert_true(sp.ignore_eos);
    assert_int_equal(sp.n_stop, 2);
    assert_ptr_equal(sp.stop[0], stops[0]); /* into the frame, which outlives the submit */
    assert_ptr_equal(sp.stop[1], stops[1]);
    assert_int_equal(sp.n_stop_ids, 1);
    assert_int_equal(sp.stop_ids[0], 7);

    struct sp_wire_sampling empty = {0};
    assert_int_equal(wk_params_wire(&empty, 300, &sp, err, sizeof err), 0);
    assert_int_equal(sp.max_tokens, 256); /* the batch lane's default */
    assert_true(sp.temperature == 1.0f);

    struct sp_wire_sampling bad = {.has_top_p = true, .top_p = 1.5};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "top_p"));
    bad = (struct sp_wire_sampling){.has_top_k = true, .top_k = -1};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "sampling.top_k"));
    bad = (struct sp_wire_sampling){.has_temperature = true, .temperature = NAN};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_string_equal(err, "sampling.temperature must be a finite number");
    bad = (struct sp_wire_sampling){.has_max_tokens = true, .max_tokens = 0};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "sampling.max_tokens"));
    bad = (struct sp_wire_sampling){.has_logprobs = true, .logprobs = 21};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "sampling.logprobs"));
    int32_t big[1] = {300};
    bad = (struct sp_wire_sampling){.stop_ids = big, .n_stop_ids = 1};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "sampling.stop_ids[0]"));
    const char *empty_stop[1] = {""};
    bad = (struct sp_wire_sampling){.stop = empty_stop, .n_stop = 1};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_string_equal(err, "sampling.stop[0] must be a non-empty string");
    const char *latin1[1] = {"caf\xe9"};
    bad = (struct sp_wire_sampling){.stop = latin1, .n_stop = 1};
    assert_int_equal(wk_params_wire(&bad, 300, &sp, err, sizeof err), SP_EINVAL);
    assert_string_equal(err, "sampling.stop[0] must be valid UTF-8");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(request_overrides_job),
        cmocka_unit_test(bad_values_name_the_field),
        cmocka_unit_test(wire_sampling),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
