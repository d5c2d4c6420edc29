/*
 * The worker's GPU-time attribution (worker/gpu_time.c): a step's wall time
 * is split among its sequences by the tokens each computed in it. Checked on
 * made-up usage (exact shares, cache hits free, an equal split when nothing
 * was computed) and on a real engine (the null backend, 300 us per pass):
 * each step's shares add up to its wall time, and over all steps to the
 * engine's busy time (less the last, idle step, which lists no sequence); a
 * request with a 180-token prompt is charged more than each 3-token one
 * batched with it, and the same long prompt submitted again, now found in
 * the prefix cache, is charged less than the first time.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "spool/engine.h"
#include "spool/model.h"
#include "worker.h"

static const char *models_dir;

static void test_made_up_usage(void **state)
{
    (void)state;
    struct se_seq_usage s[3] = {
        {.n_prefill = 96, .n_recompute = 4},             /* a prompt chunk: 100 rows */
        {.n_decode = 1},                                 /* a decode token */
        {.n_cached = 64, .n_prefill = 3, .n_decode = 1}, /* cache hit + the rest */
    };
    struct se_step_usage u = {.wall_ns = 104000000, .n_tokens = 104, .n_seqs = 3, .seqs = s};
    long w = wk_gpu_weight(&u);
    assert_int_equal(w, 105);
    double a = wk_gpu_share(&u, w, 0), b = wk_gpu_share(&u, w, 1), c = wk_gpu_share(&u, w, 2);
    assert_true(fabs(a - 0.104 * 100 / 105) < 1e-12);
    assert_true(fabs(b - 0.104 * 1 / 105) < 1e-12);
    assert_true(fabs(c - 0.104 * 4 / 105) < 1e-12); /* the 64 cached tokens cost nothing */
    assert_true(fabs(a + b + c - 0.104) < 1e-12);

    /* Only prefix-cache hits: an equal split. */
    struct se_seq_usage h[2] = {{.n_cached = 32}, {.n_cached = 16}};
    struct se_step_usage uh = {.wall_ns = 2000000, .n_seqs = 2, .seqs = h};
    assert_int_equal(wk_gpu_weight(&uh), 0);
    assert_true(fabs(wk_gpu_share(&uh, 0, 0) - 0.001) < 1e-15);
    assert_true(fabs(wk_gpu_share(&uh, 0, 1) - 0.001) < 1e-15);

    /* No sequence: nothing to charge. */
    struct se_step_usage none = {.wall_ns = 5000000};
    assert_int_equal(wk_gpu_weight(&none), 0);
}

#define LONG_PROMPT 180
#define N_SHORT     6

static void make_prompt(int32_t *p, int n, int salt)
{
    for (int i = 0; i < n; i++)
        p[i] = (int32_t)(5 + (i * 7 + salt * 13) % 280);
}

/*
 * Runs e to completion; gpu[user] += each step's shares, frac[user] += share
 * / the step's wall time. Returns the sum of
 * wall_ns over the steps that listed a sequence (the last step, which finds
 * nothing to do, lists none); *all_ns adds every step's.
 */
static int64_t run(se_engine_t *e, double *gpu, double *frac, int n_users, int64_t *all_ns)
{
    int64_t walls = 0;
    for (;;) {
        const struct se_event *ev;
        int n = se_engine_step(e, &ev);
        assert_true(n >= 0);
        const struct se_step_usage *u = se_engine_last_usage(e);
        long w = wk_gpu_weight(u);
        double step = 0;
        for (int i = 0; i < u->n_seqs; i++) {
            assert_true(u->seqs[i].user < (uint64_t)n_users);
            double s = wk_gpu_share(u, w, i);
            gpu[u->seqs[i].user] += s;
            if (u->wall_ns > 0)
                frac[u->seqs[i].user] += s / ((double)u->wall_ns * 1e-9);
            step += s;
        }
        if (u->n_seqs)
            assert_true(fabs(step - (double)u->wall_ns * 1e-9) <= 1e-12 + 1e-9 * step);
        if (u->n_seqs)
            walls += u->wall_ns;
        *all_ns += u->wall_ns;
        if (n == 0 && se_engine_n_active(e) == 0)
            break;
    }
    return walls;
}

static void submit(se_engine_t *e, const int32_t *p, int n, uint64_t user)
{
    struct se_seq_params sp = {.prompt = p, .n_prompt = (size_t)n, .user = user};
    se_sampling_default(&sp.sampling);
    sp.sampling.temperature = 0;
    sp.sampling.max_tokens = 4;
    int32_t id;
    char err[256];
    assert_int_equal(se_engine_submit(e, &sp, &id, err, sizeof(err)), 0);
}

static void test_engine_attribution(void **state)
{
    (void)state;
    char dir[512], err[512];
    snprintf(dir, sizeof(dir), "%s/llama-f32", models_dir);
    se_model_t *model;
    if (se_model_open(dir, &model, err, sizeof(err)))
        fail_msg("%s", err);
    struct se_engine_opts o = {
        .n_threads = 1, .max_seqs = 16, .block_size = 4, .backend = "null", .null_step_us = 300};
    se_engine_t *e;
    if (se_engine_open(model, &o, &e, err, sizeof(err)))
        fail_msg("se_engine_open: %s", err);

    /*
     * Round 1: user 0 has the long prompt, users 1..N_SHORT 3-token ones, all
     * at once. Round 2, the same shape: user N (= N_SHORT + 1) has the same
     * long prompt again, now mostly in the prefix cache, with N_SHORT new
     * short ones.
     */
    enum { N = N_SHORT + 1, USERS = 2 * N };
    int32_t lp[LONG_PROMPT], sp[USERS][3];
    make_prompt(lp, LONG_PROMPT, 0);
    double gpu[USERS] = {0}, frac[USERS] = {0};
    int64_t walls = 0, all = 0;
    for (int round = 0; round < 2; round++) {
        submit(e, lp, LONG_PROMPT, (uint64_t)(round * N));
        for (int i = round * N + 1; i < round * N + N; i++) {
            make_prompt(sp[i], 3, i);
            submit(e, sp[i], 3, (uint64_t)i);
        }
        walls += run(e, gpu, frac, USERS, &all);
    }

    struct se_engine_stats st;
    assert_int_equal(se_engine_stats(e, &st), 0);
    assert_true(all == st.busy_ns);
    double total = 0;
    for (int i = 0; i < USERS; i++) {
        if (!(gpu[i] > 0))
            fail_msg("request %d was charged %g s", i, gpu[i]);
        total += gpu[i];
    }
    /* Every step's time is charged to someone, once. */
    assert_true(fabs(total - (double)walls * 1e-9) <= 1e-9 * total);
    /*
     * Who is charged more is compared in fractions of steps (share / the
     * step's wall time), which do not depend on how long each step happened
     * to take on a busy machine.
     */
    for (int i = 1; i < N; i++)
        assert_true(frac[0] > 2 * frac[i]); /* 1.31 against 0.45 steps */
    assert_true(st.n_cached > 0);
    assert_true(frac[N] < 0.75 * frac[0]); /* 1.31 against 0.65 steps */
    se_engine_close(e);
    se_model_close(model);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_gpu_time MODELS_DIR\n");
        return 1;
    }
    models_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_made_up_usage),
        cmocka_unit_test(test_engine_attribution),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
