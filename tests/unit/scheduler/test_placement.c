/* The placement policy (scheduler/placement.c) on hand-made snapshots. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "placement.h"

#define DA "sha256:aaaa"
#define DB "sha256:bbbb"

static const char *const loaded_a[] = {DA};
static const char *const loaded_b[] = {DB};

static struct place_shard shard(int n, int prio, const char *tenant, double weight,
                                const char *digest)
{
    return (struct place_shard){n, prio, tenant, weight, 0, digest};
}

static void empty_inputs(void **state)
{
    (void)state;
    struct place_worker w = {0, 8, true, NULL, 0};
    struct place_shard s = shard(4, 0, "t", 1, DA);
    struct place_assignment out[1];
    assert_int_equal(sched_place(&w, 1, &s, 0, out), 0);
    assert_int_equal(sched_place(&w, 0, &s, 1, out), 0);
}

/* Higher priority first: with room for one shard, it is the priority-9 one. */
static void priority_first(void **state)
{
    (void)state;
    struct place_worker w = {0, 1, true, NULL, 0};
    struct place_shard s[] = {shard(4, 9, "t", 1, DA), shard(4, 0, "t", 1, DA)};
    struct place_assignment out[2];
    assert_int_equal(sched_place(&w, 1, s, 2, out), 1);
    assert_int_equal(out[0].shard, 0);
    assert_int_equal(w.load, 4);
}

/* A worker with the model loaded wins over an idle one without it. */
static void model_affinity(void **state)
{
    (void)state;
    struct place_worker w[] = {{0, 16, true, loaded_a, 1}, {8, 16, true, loaded_b, 1}};
    struct place_shard s[] = {shard(4, 0, "t", 1, DB), shard(4, 0, "t", 1, DA)};
    struct place_assignment out[2];
    assert_int_equal(sched_place(w, 2, s, 2, out), 2);
    assert_int_equal(out[0].shard, 0);
    assert_int_equal(out[0].worker, 1);
    assert_int_equal(out[1].shard, 1);
    assert_int_equal(out[1].worker, 0);
}

/* Capacity: a worker takes shards while below fill x max_batch; draining takes none. */
static void capacity_and_draining(void **state)
{
    (void)state;
    struct place_worker w[] = {{0, 10, true, NULL, 0}, {0, 100, false, NULL, 0}};
    struct place_shard s[] = {shard(4, 0, "t", 1, DA), shard(4, 0, "t", 1, DA),
                              shard(4, 0, "t", 1, DA), shard(4, 0, "t", 1, DA)};
    struct place_assignment out[4];
    /* 0 -> 4 -> 8 -> 12: the third shard crosses the target of 10, the fourth finds no room. */
    assert_int_equal(sched_place(w, 2, s, 4, out), 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(out[i].worker, 0);
    assert_int_equal(w[0].load, 12);
    assert_int_equal(w[1].load, 0);
}

/* Least loaded worker first among equals. */
static void spreads_load(void **state)
{
    (void)state;
    struct place_worker w[] = {{0, 100, true, NULL, 0}, {0, 100, true, NULL, 0}};
    struct place_shard s[] = {shard(4, 0, "t", 1, DA), shard(4, 0, "t", 1, DA),
                              shard(4, 0, "t", 1, DA), shard(4, 0, "t", 1, DA)};
    struct place_assignment out[4];
    assert_int_equal(sched_place(w, 2, s, 4, out), 4);
    assert_int_equal(w[0].load, 8);
    assert_int_equal(w[1].load, 8);
}

/*
 * Weighted fair share within a priority: tenant "big" (weight 3) and "small"
 * (weight 1) each have many shards; the first eight placements split 6:2.
 * A higher-priority tenant still goes first regardless of share.
 */
static void weighted_fair_share(void **state)
{
    (void)state;
    struct place_worker w = {0, 32, true, NULL, 0};
    struct place_shard s[20];
    s[0] = shard(4, 5, "urgent", 1, DA);
    s[0].tenant_leased = 1000;
    for (int i = 1; i < 20; i++)
        s[i] = shard(4, 0, i < 12 ? "small" : "big", i < 12 ? 1 : 3, DA);
    struct place_assignment out[20];
    int n = sched_place(&w, 1, s, 20, out);
    assert_int_equal(n, 8);
    assert_int_equal(out[0].shard, 0);
    int big = 0, small = 0;
    for (int i = 1; i < n; i++) {
        if (strcmp(s[out[i].shard].tenant, "big") == 0)
            big++;
        else
            small++;
    }
    /* 7 placements after the urgent one: shares 0/3 vs 0/1 tie -> small (first),
     * then big until 4/3 > 4/1 ... big gets 5, small 2. */
    assert_int_equal(big + small, 7);
    assert_true(big >= 5 && small >= 1 && small <= 2);
    /* Within a tenant, input order (deadline, job, shard) is kept. */
    size_t last_small = 0;
    for (int i = 1; i < n; i++)
        if (strcmp(s[out[i].shard].tenant, "small") == 0) {
            assert_true(out[i].shard > last_small);
            last_small = out[i].shard;
        }
}

/* A tenant already holding many leases yields to one holding none. */
static void existing_leases_count(void **state)
{
    (void)state;
    struct place_worker w = {0, 1, true, NULL, 0};
    struct place_shard s[] = {shard(4, 0, "hog", 1, DA), shard(4, 0, "new", 1, DA)};
    s[0].tenant_leased = 64;
    struct place_assignment out[2];
    assert_int_equal(sched_place(&w, 1, s, 2, out), 1);
    assert_int_equal(out[0].shard, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(empty_inputs),          cmocka_unit_test(priority_first),
        cmocka_unit_test(model_affinity),        cmocka_unit_test(capacity_and_draining),
        cmocka_unit_test(spreads_load),          cmocka_unit_test(weighted_fair_share),
        cmocka_unit_test(existing_leases_count),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
