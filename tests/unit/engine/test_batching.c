/*
 * Continuous batching (argv[1] is the models directory, mkmodel.py's tiny
 * Llama): batch invariance on the CPU backend (each sequence's tokens are
 * the same alone, with 63 others, with prefix-cache hits, without the
 * prefix cache, and when preempted and recomputed under a tiny KV budget;
 * greedy and seeded), priority (a live sequence's first token within two
 * steps while batch sequences saturate the engine; no batch starvation),
 * no lost blocks after 10,000 random submit/cancel/step cycles (null
 * backend), and usage accounting (step times sum to busy time; per-sequence
 * token counts add up).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "spool/engine.h"

#define NSEQ   64
#define MAXGEN 24
#define MAXP   40

static const char *models_dir;
static se_model_t *model;

struct out {
    int32_t ids[512];
    int n;
    enum se_finish finish;
    int n_preempted, recompute; /* preemption events and their n_recompute */
    long prefill, cached, recomputed, decode;
    int32_t seq;
};

static se_engine_t *open_engine(const char *backend, int max_seqs, int max_batch_tokens,
                                size_t kv_bytes, bool no_prefix, int step_us)
{
    struct se_engine_opts o = {.n_threads = 1,
                               .max_batch_tokens = max_batch_tokens,
                               .max_seqs = max_seqs,
                               .block_size = 4,
                               .kv_bytes = kv_bytes,
                               .backend = backend,
                               .null_step_us = step_us,
                               .no_prefix_cache = no_prefix};
    se_engine_t *e;
    char err[512];
    int rc = se_engine_open(model, &o, &e, err, sizeof(err));
    if (rc)
        fail_msg("se_engine_open: %s", err);
    return e;
}

/* Collects one step's events and usage into outs (indexed by user tag). */
static int step(se_engine_t *e, struct out *outs, int64_t *wall_sum)
{
    const struct se_event *ev;
    int n = se_engine_step(e, &ev);
    if (n < 0)
        fail_msg("step: %s", se_engine_error(e));
    for (int k = 0; k < n; k++) {
        struct out *o = &outs[ev[k].user];
        if (ev[k].preempted) {
            assert_int_equal(ev[k].token, -1);
            o->n_preempted++;
            o->recompute += ev[k].n_recompute;
            continue;
        }
        if (ev[k].token >= 0) {
            assert_true(o->n < 512);
            o->ids[o->n++] = ev[k].token;
        }
        o->finish = ev[k].finish;
    }
    const struct se_step_usage *u = se_engine_last_usage(e);
    int fed = 0;
    for (int i = 0; i < u->n_seqs; i++) {
        struct out *o = &outs[u->seqs[i].user];
        o->prefill += u->seqs[i].n_prefill;
        o->cached += u->seqs[i].n_cached;
        o->recomputed += u->seqs[i].n_recompute;
        o->decode += u->seqs[i].n_decode;
        fed += u->seqs[i].n_prefill + u->seqs[i].n_recompute;
    }
    /* The forward pass holds the prefill and recomputed tokens, plus at most one decode token per
     * sequence. */
    assert_true(u->n_tokens >= fed && u->n_tokens <= fed + u->n_seqs);
    if (wall_sum)
        *wall_sum += u->wall_ns;
    return n;
}

static void run_all(se_engine_t *e, struct out *outs, int64_t *wall_sum)
{
    for (int guard = 0; guard < 100000; guard++) {
        int n = step(e, outs, wall_sum);
        if (n == 0 && se_engine_n_active(e) == 0)
            return;
    }
    fail_msg("engine did not finish");
}

static void assert_no_blocks_used(se_engine_t *e)
{
    struct se_engine_stats st;
    if (se_engine_stats(e, &st))
        fail_msg("allocator accounting: %s", se_engine_error(e));
    assert_int_equal(st.n_blocks_used, 0);
    assert_int_equal(st.n_blocks_free + st.n_blocks_cached, st.n_blocks);
    assert_int_equal(st.n_running + st.n_waiting, 0);
}

/* Prompt i: a shared prefix of 12 tokens (3 blocks) for even i, then a tail of its own. */
static size_t make_prompt(int i, int32_t *p)
{
    size_t n = 0;
    if (i % 2 == 0)
        for (int k = 0; k < 12; k++)
            p[n++] = 10 + k;
    size_t tail = 3 + (size_t)(i * 7 % 17);
    for (size_t k = 0; k < tail; k++)
        p[n++] = (int32_t)((i * 31 + (int)k * 13) % 290);
    return n;
}

static struct se_sampling sampling_for(int i)
{
    struct se_sampling s;
    se_sampling_default(&s);
    s.ignore_eos = true;
    s.max_tokens = 8 + i % (MAXGEN - 8);
    if (i % 2) { /* seeded sampling for odd i, greedy for even */
        s.temperature = 0.9f;
        s.top_p = 0.95f;
        s.seed = 1000 + (uint64_t)i;
    } else {
        s.temperature = 0;
    }
    return s;
}

/* Submits sequence i; max_tokens 0 keeps sampling_for(i)'s. */
static int32_t submit_n(se_engine_t *e, int i, enum se_priority prio, int max_tokens)
{
    int32_t p[MAXP];
    size_t n = make_prompt(i, p);
    struct se_seq_params q = {.prompt = p,
                              .n_prompt = n,
                              .sampling = sampling_for(i),
                              .user = (uint64_t)i,
                              .priority = prio};
    if (max_tokens)
        q.sampling.max_tokens = max_tokens;
    int32_t id;
    char err[512];
    if (se_engine_submit(e, &q, &id, err, sizeof(err)))
        fail_msg("submit: %s", err);
    return id;
}

static int32_t submit_i(se_engine_t *e, int i, enum se_priority prio)
{
    return submit_n(e, i, prio, 0);
}

/* Runs all NSEQ sequences together in e; checks them against ref and the usage identities. */
static void run_together(se_engine_t *e, const struct out *ref, struct out *outs)
{
    memset(outs, 0, NSEQ * sizeof(*outs));
    for (int i = 0; i < NSEQ; i++)
        submit_i(e, i, i % 5 == 0 ? SE_PRIORITY_LIVE : SE_PRIORITY_BATCH);
    run_all(e, outs, NULL);
    for (int i = 0; i < NSEQ; i++) {
        int32_t p[MAXP];
        size_t np = make_prompt(i, p);
        assert_int_equal(outs[i].finish, SE_FINISH_LENGTH);
        assert_int_equal(outs[i].n, ref[i].n);
        assert_memory_equal(outs[i].ids, ref[i].ids, (size_t)ref[i].n * sizeof(int32_t));
        /* Usage: prompt + generated + recomputed tokens, each counted once. */
        assert_int_equal(outs[i].decode, outs[i].n);
        assert_int_equal(outs[i].prefill + outs[i].cached + outs[i].recomputed,
                         (long)np + outs[i].recompute);
    }
    assert_no_blocks_used(e);
}

static void test_batch_invariance(void **state)
{
    (void)state;
    static struct out alone[NSEQ], together[NSEQ];
    /* Alone: one at a time, no prefix cache. */
    se_engine_t *e = open_engine("cpu", 64, 256, 0, true, 0);
    for (int i = 0; i < NSEQ; i++) {
        submit_i(e, i, SE_PRIORITY_BATCH);
        run_all(e, alone, NULL);
        assert_int_equal(alone[i].n, sampling_for(i).max_tokens);
    }
    se_engine_close(e);

    struct se_engine_stats st;
    /* With 63 others and prefix-cache hits on the shared prefix. */
    e = open_engine("cpu", 64, 256, 0, false, 0);
    run_together(e, alone, together);
    assert_int_equal(se_engine_stats(e, &st), 0);
    /* The 25 batch sequences with the shared prefix compute it once (live ones do not wait). */
    assert_true(st.n_cached >= 12 * 24);
    assert_int_equal(st.n_preemptions, 0);
    se_engine_close(e);

    /* Without the prefix cache. */
    e = open_engine("cpu", 64, 256, 0, true, 0);
    run_together(e, alone, together);
    assert_int_equal(se_engine_stats(e, &st), 0);
    assert_int_equal(st.n_cached, 0);
    se_engine_close(e);

    /* A tiny KV budget (24 blocks of 4 tokens, 1 KB each): sequences are preempted and resumed. */
    e = open_engine("cpu", 16, 64, 24 * 1024, false, 0);
    run_together(e, alone, together);
    assert_int_equal(se_engine_stats(e, &st), 0);
    assert_true(st.n_preemptions > 0);
    int preempted = 0;
    for (int i = 0; i < NSEQ; i++)
        preempted += together[i].n_preempted > 0;
    assert_true(preempted > 0);
    print_message("tiny KV: %d sequences preempted, %lld preemptions, %lld tokens recomputed, "
                  "%lld from the prefix cache\n",
                  preempted, (long long)st.n_preemptions, (long long)st.n_recompute,
                  (long long)st.n_cached);
    se_engine_close(e);

    /* The same, without the prefix cache: recomputation alone. */
    e = open_engine("cpu", 16, 64, 24 * 1024, true, 0);
    run_together(e, alone, together);
    assert_int_equal(se_engine_stats(e, &st), 0);
    assert_true(st.n_preemptions > 0 && st.n_recompute > 0);
    se_engine_close(e);
}

/* Steps until the live sequence (user tag live) has its first token; returns the steps taken. */
static int steps_to_first_token(se_engine_t *e, struct out *outs, int live)
{
    for (int s = 1; s <= 10; s++) {
        step(e, outs, NULL);
        if (outs[live].n > 0)
            return s;
    }
    return 99;
}

static void test_live_priority(void **state)
{
    (void)state;
    static struct out outs[NSEQ + 4];
    for (int kv = 0; kv < 3; kv++) {
        memset(outs, 0, sizeof(outs));
        /*
         * kv == 0: 40 batch sequences, 8 running at a time; kv == 1: also out of KV blocks (28
         * blocks for 40 sequences of up to 10 blocks); kv == 2: 32 batch sequences decoding 100
         * tokens each in a budget of 32 tokens, which their decode tokens alone fill.
         */
        int n_batch = kv == 2 ? 32 : 40, max_tokens = kv == 2 ? 100 : 0;
        se_engine_t *e = kv == 2 ? open_engine("cpu", 32, 32, 0, false, 0)
                                 : open_engine("cpu", 8, 64, kv ? 28 * 1024 : 0, false, 0);
        for (int i = 0; i < n_batch; i++)
            submit_n(e, i, SE_PRIORITY_BATCH, max_tokens);
        for (int s = 0; s < 6; s++)
            step(e, outs, NULL);
        int dec = 0;
        for (int s = 0; kv == 2 && dec < 32; s++) {
            assert_true(s < 60);
            step(e, outs, NULL);
            const struct se_step_usage *u = se_engine_last_usage(e);
            dec = 0;
            for (int i = 0; i < u->n_seqs; i++)
                dec += u->seqs[i].n_decode;
            assert_int_equal(u->n_tokens, 32);
        }
        struct se_engine_stats st;
        assert_int_equal(se_engine_stats(e, &st), 0);
        assert_true(kv == 2 ? st.n_running == 32 : st.n_waiting > 0);
        /* Two live arrivals, one after the other. */
        for (int l = 0; l < 2; l++) {
            int live = 41 + l;
            submit_n(e, live, SE_PRIORITY_LIVE, 0);
            int took = steps_to_first_token(e, outs, live);
            print_message("case %d, live sequence %d: first token after %d step(s)\n", kv, l, took);
            assert_true(took <= 2);
        }
        /* No batch sequence starves: all of them finish in full. */
        run_all(e, outs, NULL);
        for (int i = 0; i < n_batch; i++) {
            assert_int_equal(outs[i].finish, SE_FINISH_LENGTH);
            assert_int_equal(outs[i].n, max_tokens ? max_tokens : sampling_for(i).max_tokens);
        }
        assert_no_blocks_used(e);
        se_engine_close(e);
    }
}

static uint64_t rng_state = 88172645463325252ULL;
static uint32_t rnd(uint32_t n)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (uint32_t)(rng_state % n);
}

static void test_no_lost_blocks(void **state)
{
    (void)state;
    /* 40 blocks of 4 tokens: preemption is frequent; prompts share prefixes often. */
    se_engine_t *e = open_engine("null", 12, 48, 40 * 4 * 256, false, 0);
    int32_t ids[64];
    int n_ids = 0, finished = 0;
    char err[512];
    for (int cycle = 0; cycle < 10000; cycle++) {
        uint32_t a = rnd(10);
        if (a < 4 && n_ids < 64) {
            int32_t p[64];
            int np = 1 + (int)rnd(40), base = (int)rnd(3);
            for (int k = 0; k < np; k++)
                p[k] = k < 16 ? base * 50 + k : (int32_t)rnd(300);
            struct se_seq_params q = {.prompt = p, .n_prompt = (size_t)np, .user = 0};
            se_sampling_default(&q.sampling);
            q.sampling.max_tokens = 1 + (int)rnd(60);
            q.sampling.ignore_eos = rnd(2);
            q.priority = rnd(4) == 0 ? SE_PRIORITY_LIVE : SE_PRIORITY_BATCH;
            int rc = se_engine_submit(e, &q, &ids[n_ids], err, sizeof(err));
            if (rc == SP_ETOOBIG)
                continue;
            assert_int_equal(rc, 0);
            n_ids++;
        } else if (a < 5 && n_ids > 0) {
            int k = (int)rnd((uint32_t)n_ids);
            int rc = se_engine_cancel(e, ids[k]);
            assert_true(rc == 0 || rc == SP_ENOENT);
            ids[k] = ids[--n_ids];
        } else {
            const struct se_event *ev;
            int n = se_engine_step(e, &ev);
            if (n < 0)
                fail_msg("step: %s", se_engine_error(e));
            for (int k = 0; k < n; k++)
                if (ev[k].finish != SE_FINISH_NONE) {
                    finished++;
                    for (int j = 0; j < n_ids; j++)
                        if (ids[j] == ev[k].seq) {
                            ids[j] = ids[--n_ids];
                            break;
                        }
                }
            struct se_engine_stats st;
            if (se_engine_stats(e, &st))
                fail_msg("cycle %d: %s", cycle, se_engine_error(e));
        }
    }
    assert_true(finished > 100);
    struct se_engine_stats st;
    assert_int_equal(se_engine_stats(e, &st), 0);
    print_message("%d finished, %lld preemptions, %lld tokens from the prefix cache\n", finished,
                  (long long)st.n_preemptions, (long long)st.n_cached);
    assert_true(st.n_preemptions > 0);
    assert_true(st.n_cached > 0);
    /* Half of what is left is canceled, the rest runs to the end. */
    for (int j = 0; j < n_ids; j += 2)
        se_engine_cancel(e, ids[j]);
    for (int guard = 0; se_engine_n_active(e) > 0; guard++) {
        const struct se_event *ev;
        assert_true(guard < 100000);
        assert_true(se_engine_step(e, &ev) >= 0);
    }
    assert_no_blocks_used(e);
    se_engine_close(e);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void test_usage(void **state)
{
    (void)state;
    static struct out outs[NSEQ];
    /* The null backend taking 200 us per pass; a small budget to force preemptions. */
    se_engine_t *e = open_engine("null", 16, 64, 24 * 4 * 256, false, 200);
    for (int i = 0; i < 32; i++)
        submit_i(e, i, i % 3 ? SE_PRIORITY_BATCH : SE_PRIORITY_LIVE);
    int64_t walls = 0, t0 = now_ns();
    run_all(e, outs, &walls);
    int64_t elapsed = now_ns() - t0;
    struct se_engine_stats st;
    assert_int_equal(se_engine_stats(e, &st), 0);
    assert_true(st.n_preemptions > 0);
    /* No step time goes unreported: the step times are the busy time, within the caller's wall. */
    assert_true(walls == st.busy_ns);
    assert_true(st.busy_ns <= elapsed);
    assert_true(st.busy_ns >= (st.n_steps - 1) * 200000 / 2); /* every pass sleeps 200 us */
    long dec = 0, work = 0, want = 0;
    for (int i = 0; i < 32; i++) {
        int32_t p[MAXP];
        long np = (long)make_prompt(i, p);
        assert_int_equal(outs[i].n, sampling_for(i).max_tokens);
        /* Prompt length + generated tokens + recomputed tokens. */
        assert_int_equal(outs[i].prefill + outs[i].cached + outs[i].recomputed + outs[i].decode,
                         np + outs[i].n + outs[i].recompute);
        assert_int_equal(outs[i].decode, outs[i].n);
        dec += outs[i].decode;
        work += outs[i].prefill + outs[i].cached + outs[i].recomputed + outs[i].decode;
        want += np + outs[i].n + outs[i].recompute;
    }
    assert_int_equal(st.n_decode, dec);
    assert_int_equal(st.n_prefill + st.n_cached + st.n_recompute + st.n_decode, work);
    assert_int_equal(work, want);
    assert_no_blocks_used(e);
    se_engine_close(e);
}

static void test_backend_choice(void **state)
{
    (void)state;
    struct se_engine_opts o = {.backend = "tpu"};
    se_engine_t *e;
    char err[512];
    assert_int_equal(se_engine_open(model, &o, &e, err, sizeof(err)), SP_EINVAL);
    assert_non_null(strstr(err, "tpu"));
    /* Without a GPU, "cuda" fails cleanly, whether built with CUDA (no device) or not. */
    o.backend = "cuda";
    int rc = se_engine_open(model, &o, &e, err, sizeof(err));
    if (rc == 0) {
        se_engine_close(e); /* a machine with a GPU */
    } else {
        assert_true(rc == SP_ENODEV || rc == SP_EUNSUPPORTED);
        assert_null(e);
        assert_true(strlen(err) > 10);
    }
    /* Null backend output is a function of the tokens only: batch invariant too. */
    static struct out a[8], b[8];
    e = open_engine("null", 8, 64, 0, true, 0);
    for (int i = 0; i < 8; i++) {
        submit_i(e, i, SE_PRIORITY_BATCH);
        run_all(e, a, NULL);
    }
    se_engine_close(e);
    e = open_engine("null", 8, 16, 12 * 4 * 256, false, 0);
    for (int i = 0; i < 8; i++)
        submit_i(e, i, SE_PRIORITY_BATCH);
    run_all(e, b, NULL);
    for (int i = 0; i < 8; i++) {
        assert_int_equal(a[i].n, b[i].n);
        assert_memory_equal(a[i].ids, b[i].ids, (size_t)a[i].n * sizeof(int32_t));
    }
    assert_no_blocks_used(e);
    se_engine_close(e);
}

static int setup(void **state)
{
    (void)state;
    char dir[512], err[512];
    snprintf(dir, sizeof(dir), "%s/llama-f32", models_dir);
    if (se_model_open(dir, &model, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    se_model_close(model);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_batching MODELS_DIR\n");
        return 1;
    }
    models_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batch_invariance), cmocka_unit_test(test_live_priority),
        cmocka_unit_test(test_no_lost_blocks),   cmocka_unit_test(test_usage),
        cmocka_unit_test(test_backend_choice),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
