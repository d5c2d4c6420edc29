/* Capped exponential backoff with full jitter: bounds, growth, cap, spread, determinism. */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "spool/backoff.h"

/* Every delay lies in [0, min(cap, base * 2^attempt)], and attempt counts the calls. */
static void delays_stay_within_the_bound(void **state)
{
    (void)state;
    for (uint64_t seed = 0; seed < 50; seed++) {
        struct sp_backoff b;
        sp_backoff_init(&b, 100, 5000, seed);
        for (unsigned n = 0; n < 40; n++) {
            uint64_t bound = 100ull << (n < 20 ? n : 20);
            if (bound > 5000)
                bound = 5000;
            assert_int_equal(sp_backoff_ceiling(&b), bound);
            unsigned d = sp_backoff_next(&b);
            assert_true(d <= bound);
            assert_int_equal(b.attempt, n + 1);
        }
    }
}

/* The bound doubles: 100, 200, 400, 800, 1600, 3200, then the cap. */
static void bound_doubles_then_caps(void **state)
{
    (void)state;
    struct sp_backoff b;
    sp_backoff_init(&b, 100, 5000, 7);
    const unsigned want[] = {100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        assert_int_equal(sp_backoff_ceiling(&b), want[i]);
        sp_backoff_next(&b);
    }
    /* The largest delay over many draws comes close to each bound: the range is used. */
    unsigned max_first = 0, max_late = 0;
    for (int i = 0; i < 2000; i++) {
        sp_backoff_reset(&b);
        unsigned d = sp_backoff_next(&b);
        max_first = d > max_first ? d : max_first;
        for (int k = 0; k < 10; k++)
            d = sp_backoff_next(&b);
        max_late = d > max_late ? d : max_late;
    }
    assert_true(max_first >= 95 && max_first <= 100);
    assert_true(max_late >= 4900 && max_late <= 5000);
}

/* Millions of calls never overflow the shift nor leave the cap. */
static void no_overflow_after_many_attempts(void **state)
{
    (void)state;
    struct sp_backoff b;
    sp_backoff_init(&b, UINT_MAX / 2, UINT_MAX, 1);
    for (int i = 0; i < 100; i++)
        (void)sp_backoff_next(&b);
    assert_int_equal(sp_backoff_ceiling(&b), UINT_MAX);
    b.attempt = UINT_MAX - 1;
    (void)sp_backoff_next(&b);
    (void)sp_backoff_next(&b);
    assert_int_equal(b.attempt, UINT_MAX);
    assert_int_equal(sp_backoff_ceiling(&b), UINT_MAX);
}

/* Degenerate parameters are repaired rather than dividing by zero or inverting the range. */
static void degenerate_parameters(void **state)
{
    (void)state;
    struct sp_backoff b;
    sp_backoff_init(&b, 0, 0, 3);
    assert_int_equal(b.base_ms, 1);
    assert_int_equal(b.cap_ms, 1);
    for (int i = 0; i < 100; i++)
        assert_true(sp_backoff_next(&b) <= 1);
    sp_backoff_init(&b, 500, 100, 3);
    assert_int_equal(b.cap_ms, 500);
    for (int i = 0; i < 100; i++)
        assert_true(sp_backoff_next(&b) <= 500);
}

/* Full jitter: delays under the cap spread evenly over [0, cap], not bunched near the top. */
static void jitter_spreads_evenly(void **state)
{
    (void)state;
    struct sp_backoff b;
    sp_backoff_init(&b, 1000, 1000, 42);
    enum { N = 20000, BUCKETS = 10 };
    unsigned hist[BUCKETS] = {0};
    double sum = 0;
    for (int i = 0; i < N; i++) {
        unsigned d = sp_backoff_next(&b);
        assert_true(d <= 1000);
        hist[d * BUCKETS / 1001]++;
        sum += d;
    }
    /* Each tenth gets 2000 expected; 1700..2300 is over six standard deviations wide. */
    for (int k = 0; k < BUCKETS; k++)
        assert_true(hist[k] > 1700 && hist[k] < 2300);
    double mean = sum / N;
    assert_true(mean > 480 && mean < 520);
    /* Distinct values, not a handful repeated. */
    unsigned seen[1001] = {0}, distinct = 0;
    sp_backoff_init(&b, 1000, 1000, 43);
    for (int i = 0; i < 5000; i++) {
        unsigned d = sp_backoff_next(&b);
        distinct += !seen[d]++;
    }
    assert_true(distinct > 900);
}

/* The same seed gives the same delays; another seed gives others; reset starts the bound over. */
static void determinism_by_seed_and_reset(void **state)
{
    (void)state;
    struct sp_backoff a, b, c;
    sp_backoff_init(&a, 50, 2000, 12345);
    sp_backoff_init(&b, 50, 2000, 12345);
    sp_backoff_init(&c, 50, 2000, 12346);
    unsigned same = 0;
    for (int i = 0; i < 100; i++) {
        unsigned x = sp_backoff_next(&a), y = sp_backoff_next(&b), z = sp_backoff_next(&c);
        assert_int_equal(x, y);
        same += x == z;
    }
    assert_true(same < 10);
    assert_int_equal(a.attempt, 100);
    sp_backoff_reset(&a);
    assert_int_equal(a.attempt, 0);
    assert_int_equal(sp_backoff_ceiling(&a), 50);
    assert_true(sp_backoff_next(&a) <= 50);
    /* Reset keeps the generator going: the same bounds, but not the first sequence again. */
    sp_backoff_reset(&b);
    struct sp_backoff fresh;
    sp_backoff_init(&fresh, 50, 2000, 12345);
    unsigned differ = 0;
    for (int i = 0; i < 8; i++) {
        unsigned x = sp_backoff_next(&b);
        differ += x != sp_backoff_next(&fresh);
    }
    assert_true(differ > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(delays_stay_within_the_bound),
        cmocka_unit_test(bound_doubles_then_caps),
        cmocka_unit_test(no_overflow_after_many_attempts),
        cmocka_unit_test(degenerate_parameters),
        cmocka_unit_test(jitter_spreads_evenly),
        cmocka_unit_test(determinism_by_seed_and_reset),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
