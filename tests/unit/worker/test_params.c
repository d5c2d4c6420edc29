/* The worker's parameter merge: job params with request params laid over them. */
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

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(request_overrides_job),
        cmocka_unit_test(bad_values_name_the_field),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
