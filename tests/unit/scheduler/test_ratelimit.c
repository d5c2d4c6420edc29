/*
 * Per-key rate limits (scheduler/ratelimit.c) with a clock the test moves:
 * bursts up to the per-minute limit, continuous refill, Retry-After in whole
 * seconds rounded up and which limit it was, the token bucket's debt and
 * settling, independent keys, changed limits, and the table dropping
 * buckets that have refilled.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "auth.h"
#include "ratelimit.h"
#include "scheduler.h"

static double now_s;

static double fake_clock(void *arg)
{
    (void)arg;
    return now_s;
}

static struct sched s;

static int setup(void **state)
{
    (void)state;
    memset(&s, 0, sizeof s);
    now_s = 1000;
    s.rate = sched_rate_new(fake_clock, NULL);
    assert_non_null(s.rate);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    sched_rate_stop(&s);
    assert_null(s.rate);
    return 0;
}

static struct sched_principal key(int64_t id, uint32_t rpm, uint32_t tpm)
{
    struct sched_principal p = {.key_id = id, .rpm_limit = rpm, .tpm_limit = tpm};
    strcpy(p.tenant, "acme");
    return p;
}

/* Admits or refuses; on refusal checks retry-after and which. */
static void admit(const struct sched_principal *p, uint32_t tokens)
{
    uint32_t retry = 12345;
    const char *which = "untouched";
    if (!sched_rate_admit(&s, p, tokens, &retry, &which))
        fail_msg("refused at t=%.3f (retry %u, %s)", now_s, retry, which);
    assert_int_equal(retry, 12345);
    assert_string_equal(which, "untouched");
}

static void refuse(const struct sched_principal *p, uint32_t tokens, uint32_t want_retry,
                   const char *want_which)
{
    uint32_t retry = 0;
    const char *which = NULL;
    if (sched_rate_admit(&s, p, tokens, &retry, &which))
        fail_msg("admitted at t=%.3f, want a refusal", now_s);
    assert_int_equal(retry, want_retry);
    assert_string_equal(which, want_which);
}

static void requests_per_minute(void **state)
{
    (void)state;
    struct sched_principal p = key(7, 2, 0);
    admit(&p, 100);
    admit(&p, 100);
    /* The bucket is empty: one request refills in 60 / 2 = 30 s. */
    refuse(&p, 100, 30, "requests");
    now_s += 10;
    refuse(&p, 100, 20, "requests");
    now_s += 19.9; /* 0.1 s left: rounded up to a whole second */
    refuse(&p, 100, 1, "requests");
    now_s += 0.1;
    admit(&p, 100);
    refuse(&p, 1, 30, "requests");
    /* Refill is continuous: 45 s give 1.5 requests. */
    now_s += 45;
    admit(&p, 1);
    refuse(&p, 1, 15, "requests");
    /* The bucket never holds more than the minute's limit. */
    now_s += 3600;
    admit(&p, 1);
    admit(&p, 1);
    refuse(&p, 1, 30, "requests");
}

static void tokens_per_minute(void **state)
{
    (void)state;
    struct sched_principal p = key(8, 0, 1000);
    admit(&p, 600);
    admit(&p, 400);
    /* 1000 tokens per minute: 50 tokens take 3 s. */
    refuse(&p, 50, 3, "tokens");
    refuse(&p, 1, 1, "tokens");
    /* The requests used fewer tokens than expected: 300 come back at once. */
    sched_rate_settle(&s, &p, -300);
    admit(&p, 300);
    refuse(&p, 1, 1, "tokens");
    /* A refund never fills the bucket past its limit. */
    sched_rate_settle(&s, &p, -5000);
    admit(&p, 1000);
    refuse(&p, 100, 6, "tokens");
    /* More tokens than expected: the bucket goes into debt and later requests wait. */
    now_s += 60; /* full again */
    admit(&p, 100);
    sched_rate_settle(&s, &p, 1900); /* 1000 - 2000 = -1000 */
    refuse(&p, 100, 66, "tokens");   /* (100 + 1000) * 60 / 1000 */
    now_s += 66;
    admit(&p, 100);
}

static void oversized_request_waits_for_a_full_bucket(void **state)
{
    (void)state;
    struct sched_principal p = key(9, 0, 1000);
    admit(&p, 10);
    /* 5000 tokens can never fit a 1000-token bucket: it waits until the bucket is full. */
    refuse(&p, 5000, 1, "tokens"); /* 10 tokens short: 0.6 s */
    now_s += 0.6;
    admit(&p, 5000);
    /* Now 4000 in debt: 4001 tokens short for one token = 240.06 s. */
    refuse(&p, 1, 241, "tokens");
}

static void both_limits_report_the_longer_wait(void **state)
{
    (void)state;
    struct sched_principal p = key(10, 60, 600); /* one request per second, 10 tokens per second */
    admit(&p, 600);
    /* Requests would wait 0 s, tokens 10 s for 100. */
    refuse(&p, 100, 10, "tokens");
    now_s += 10;
    for (int i = 0; i < 59; i++)
        admit(&p, 0);
    /* 59 requests were left, 10 s refilled the bucket to its cap of 60: one is left. */
    admit(&p, 0);
    /* Request bucket empty (1 s), token bucket holds 100 (5 tokens need none). */
    refuse(&p, 5, 1, "requests");
    /* A refusal charges nothing: the token bucket still pays for 100. */
    now_s += 1;
    admit(&p, 100);
    refuse(&p, 1, 1, "requests");
}

static void keys_are_independent_and_unlimited_keys_cost_nothing(void **state)
{
    (void)state;
    struct sched_principal a = key(1, 1, 0), b = key(2, 1, 0), free_key = key(3, 0, 0);
    admit(&a, 1);
    refuse(&a, 1, 60, "requests");
    admit(&b, 1);
    refuse(&b, 1, 60, "requests");
    for (int i = 0; i < 1000; i++)
        admit(&free_key, 1000000);
    assert_int_equal(sched_rate_size(s.rate), 2);
}

static void changed_limits_apply_at_once(void **state)
{
    (void)state;
    struct sched_principal p = key(5, 10, 0);
    for (int i = 0; i < 5; i++)
        admit(&p, 1);
    /* The key's limit drops to 3 per minute: 5 left is more than the new capacity. */
    p.rpm_limit = 3;
    admit(&p, 1);
    admit(&p, 1);
    admit(&p, 1);
    refuse(&p, 1, 20, "requests");
    /* A token limit is added: its bucket starts full. */
    p.tpm_limit = 100;
    now_s += 20;
    admit(&p, 100);
    refuse(&p, 1, 20, "requests");
    /* 20 s later: one request, but 33.3 tokens (50 need 10 s more). */
    now_s += 20;
    refuse(&p, 50, 10, "tokens");
}

static void full_buckets_are_dropped_when_the_table_grows(void **state)
{
    (void)state;
    for (int64_t id = 1; id <= 5000; id++) {
        struct sched_principal p = key(id, 100, 0);
        admit(&p, 1);
    }
    assert_int_equal(sched_rate_size(s.rate), 5000);
    /*
     * A minute later every bucket is full again: when new keys make the table
     * grow (at 8192 buckets), the old ones are dropped.
     */
    now_s += 61;
    for (int64_t id = 10001; id <= 14000; id++) {
        struct sched_principal p = key(id, 100, 0);
        admit(&p, 1);
    }
    assert_int_equal(sched_rate_size(s.rate), 4000);
    /* A key whose bucket is not full survives the rebuilds with its state. */
    struct sched_principal hot = key(777777, 1, 0);
    admit(&hot, 1);
    now_s += 61;
    admit(&hot, 1);
    for (int64_t id = 20001; id <= 22000; id++) {
        struct sched_principal p = key(id, 100, 0);
        admit(&p, 1);
    }
    refuse(&hot, 1, 60, "requests");
    assert_int_equal(sched_rate_size(s.rate), 2001);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(requests_per_minute, setup, teardown),
        cmocka_unit_test_setup_teardown(tokens_per_minute, setup, teardown),
        cmocka_unit_test_setup_teardown(oversized_request_waits_for_a_full_bucket, setup, teardown),
        cmocka_unit_test_setup_teardown(both_limits_report_the_longer_wait, setup, teardown),
        cmocka_unit_test_setup_teardown(keys_are_independent_and_unlimited_keys_cost_nothing, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(changed_limits_apply_at_once, setup, teardown),
        cmocka_unit_test_setup_teardown(full_buckets_are_dropped_when_the_table_grows, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
