/*
 * The engine's sequences over the CPU backend on mkmodel.py's tiny Llama
 * (argv[1] is the models directory): batching does not change greedy
 * output, seeded sampling repeats, a generation stopped after k tokens and
 * resumed from prompt + k tokens continues identically, finish reasons,
 * admission beyond max_seqs and the KV cache, and input errors.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "spool/engine.h"

#define MAXGEN 64

static const char *models_dir;
static se_model_t *model;
static se_tokenizer_t *tok;

struct out {
    int32_t ids[MAXGEN];
    int n;
    enum se_finish finish;
    char text[4096];
    size_t text_len;
};

static se_engine_t *open_engine(int max_seqs, size_t kv_bytes)
{
    struct se_engine_opts o = {.n_threads = 2,
                               .max_batch_tokens = 32,
                               .max_seqs = max_seqs,
                               .block_size = 4,
                               .kv_bytes = kv_bytes,
                               .tok = tok};
    se_engine_t *e;
    char err[512];
    int rc = se_engine_open(model, &o, &e, err, sizeof(err));
    if (rc)
        fail_msg("se_engine_open: %s", err);
    return e;
}

/* Runs every submitted sequence to the end, collecting events by user tag. */
static void run_all(se_engine_t *e, struct out *outs)
{
    for (int guard = 0; guard < 10000; guard++) {
        const struct se_event *ev;
        int n = se_engine_step(e, &ev);
        assert_true(n >= 0);
        for (int k = 0; k < n; k++) {
            struct out *o = &outs[ev[k].user];
            if (ev[k].token >= 0) {
                assert_true(o->n < MAXGEN);
                o->ids[o->n++] = ev[k].token;
            }
            o->finish = ev[k].finish;
            assert_true(o->text_len + ev[k].text_len < sizeof(o->text));
            memcpy(o->text + o->text_len, ev[k].text, ev[k].text_len);
            o->text_len += ev[k].text_len;
        }
        if (n == 0 && se_engine_n_active(e) == 0)
            return;
    }
    fail_msg("engine did not finish");
}

static const int32_t PROMPTS[3][9] = {
    {5, 17, 200, 33, 4, 91, 120, 7, 64},
    {250, 3, 3, 18},
    {1, 2, 3, 4, 5, 6, 7},
};
static const size_t PLEN[3] = {9, 4, 7};

static void submit(se_engine_t *e, int p, const struct se_sampling *sp, const int32_t *resume,
                   size_t n_resume, uint64_t user)
{
    struct se_seq_params q = {.prompt = PROMPTS[p],
                              .n_prompt = PLEN[p],
                              .resume = resume,
                              .n_resume = n_resume,
                              .sampling = *sp,
                              .user = user};
    int32_t id;
    char err[512];
    int rc = se_engine_submit(e, &q, &id, err, sizeof(err));
    if (rc)
        fail_msg("submit: %s", err);
}

static struct se_sampling sampling(float temperature, int max_tokens, uint64_t seed)
{
    struct se_sampling s;
    se_sampling_default(&s);
    s.temperature = temperature;
    s.max_tokens = max_tokens;
    s.seed = seed;
    s.ignore_eos = true;
    return s;
}

static void test_batching_keeps_greedy(void **state)
{
    (void)state;
    struct se_sampling sp = sampling(0, 20, 0);
    struct out together[3] = {0}, alone[3] = {0};
    se_engine_t *e = open_engine(8, 0);
    for (int p = 0; p < 3; p++)
        submit(e, p, &sp, NULL, 0, (uint64_t)p);
    run_all(e, together);
    for (int p = 0; p < 3; p++) {
        submit(e, p, &sp, NULL, 0, (uint64_t)p);
        run_all(e, alone);
    }
    se_engine_close(e);
    for (int p = 0; p < 3; p++) {
        assert_int_equal(together[p].n, 20);
        assert_int_equal(together[p].finish, SE_FINISH_LENGTH);
        assert_memory_equal(together[p].ids, alone[p].ids, 20 * sizeof(int32_t));
        assert_int_equal(together[p].text_len, alone[p].text_len);
    }
}

static void test_seeded_repeat_and_resume(void **state)
{
    (void)state;
    struct se_sampling sp = sampling(1.0f, 24, 1234);
    sp.top_p = 0.95f;
    struct out full[2] = {0};
    se_engine_t *e = open_engine(8, 0);
    submit(e, 0, &sp, NULL, 0, 0);
    submit(e, 0, &sp, NULL, 0, 1); /* the same request twice in one batch */
    run_all(e, full);
    assert_int_equal(full[0].n, 24);
    assert_memory_equal(full[0].ids, full[1].ids, 24 * sizeof(int32_t));
    /* Another seed differs somewhere. */
    struct se_sampling other = sp;
    other.seed = 99;
    struct out o2[1] = {0};
    submit(e, 0, &other, NULL, 0, 0);
    run_all(e, o2);
    assert_memory_not_equal(full[0].ids, o2[0].ids, 24 * sizeof(int32_t));

    static const int ks[] = {1, 5, 12, 23};
    for (size_t i = 0; i < sizeof(ks) / sizeof(ks[0]); i++) {
        int k = ks[i];
        struct out r[1] = {0};
        submit(e, 0, &sp, full[0].ids, (size_t)k, 0);
        run_all(e, r);
        assert_int_equal(r[0].n, 24 - k);
        assert_int_equal(r[0].finish, SE_FINISH_LENGTH);
        assert_memory_equal(r[0].ids, full[0].ids + k, (size_t)(24 - k) * sizeof(int32_t));
        /* The text of the resumed part is the full text's tail. */
        assert_true(r[0].text_len <= full[0].text_len);
        assert_memory_equal(r[0].text, full[0].text + full[0].text_len - r[0].text_len,
                            r[0].text_len);
    }
    se_engine_close(e);
}

static void test_finish_reasons(void **state)
{
    (void)state;
    se_engine_t *e = open_engine(8, 0);
    struct se_sampling sp = sampling(0, 12, 0);
    struct out base[1] = {0};
    submit(e, 1, &sp, NULL, 0, 0);
    run_all(e, base);
    assert_int_equal(base[0].n, 12);

    /* A stop id ends the sequence at its first occurrence, token included. */
    struct se_sampling st = sp;
    st.n_stop_ids = 1;
    st.stop_ids[0] = base[0].ids[4];
    int first = 0;
    while (base[0].ids[first] != st.stop_ids[0])
        first++;
    struct out so[1] = {0};
    submit(e, 1, &st, NULL, 0, 0);
    run_all(e, so);
    assert_int_equal(so[0].finish, SE_FINISH_STOP);
    assert_int_equal(so[0].n, first + 1);

    struct se_sampling ss = sp;
    if (base[0].text_len > 4) {
        /* A stop string from the middle of the text: the text ends right before it. */
        char stop[4] = {0};
        size_t at = base[0].text_len / 2;
        memcpy(stop, base[0].text + at, 3);
        const char *hit = strstr(base[0].text, stop);
        assert_non_null(hit);
        ss.n_stop = 1;
        ss.stop[0] = stop;
        struct out sto[1] = {0};
        submit(e, 1, &ss, NULL, 0, 0);
        run_all(e, sto);
        assert_int_equal(sto[0].finish, SE_FINISH_STOP_STRING);
        assert_int_equal(sto[0].text_len, (size_t)(hit - base[0].text));
        assert_memory_equal(sto[0].text, base[0].text, sto[0].text_len);
    }

    /* Cancel before any step: one event, canceled, no token. */
    struct out c[1] = {0};
    struct se_seq_params q = {.prompt = PROMPTS[0], .n_prompt = PLEN[0], .sampling = sp};
    int32_t id;
    char err[256];
    assert_int_equal(se_engine_submit(e, &q, &id, err, sizeof(err)), 0);
    assert_int_equal(se_engine_cancel(e, id), 0);
    assert_int_equal(se_engine_cancel(e, id), SP_ENOENT);
    run_all(e, c);
    assert_int_equal(c[0].finish, SE_FINISH_CANCELED);
    assert_int_equal(c[0].n, 0);
    se_engine_close(e);
}

static void test_admission(void **state)
{
    (void)state;
    /* Two running at a time, and 12 KV blocks of 1 KB: two reservations of 4-5 blocks fit. */
    struct se_sampling sp = sampling(0, 10, 0);
    se_engine_t *e = open_engine(2, 12 * 1024);
    struct out outs[9] = {0};
    for (int i = 0; i < 9; i++)
        submit(e, i % 3, &sp, NULL, 0, (uint64_t)i);
    assert_int_equal(se_engine_n_active(e), 9);
    run_all(e, outs);
    for (int i = 0; i < 9; i++) {
        assert_int_equal(outs[i].n, 10);
        assert_memory_equal(outs[i].ids, outs[i % 3].ids, 10 * sizeof(int32_t));
    }
    se_engine_close(e);
}

static void test_bad_input(void **state)
{
    (void)state;
    se_engine_t *e = open_engine(4, 0);
    struct se_sampling sp = sampling(0, 4, 0);
    char err[512];
    int32_t id;
    struct se_seq_params q = {.prompt = PROMPTS[0], .n_prompt = 0, .sampling = sp};
    assert_int_equal(se_engine_submit(e, &q, &id, err, sizeof(err)), SP_EINVAL);
    assert_non_null(strstr(err, "empty"));
    int32_t bad[2] = {1, 100000};
    q.prompt = bad;
    q.n_prompt = 2;
    assert_int_equal(se_engine_submit(e, &q, &id, err, sizeof(err)), SP_EINVAL);
    assert_non_null(strstr(err, "outside the vocabulary"));
    int ctx = se_model_get_config(model)->max_position;
    int32_t *lng = calloc((size_t)ctx, sizeof(int32_t));
    q.prompt = lng;
    q.n_prompt = (size_t)ctx;
    assert_int_equal(se_engine_submit(e, &q, &id, err, sizeof(err)), SP_ECONTEXT);
    assert_non_null(strstr(err, "context"));
    free(lng);
    q.prompt = PROMPTS[0];
    q.n_prompt = PLEN[0];
    q.sampling.top_p = 2;
    assert_int_equal(se_engine_submit(e, &q, &id, err, sizeof(err)), SP_EINVAL);
    assert_non_null(strstr(err, "top_p"));
    assert_int_equal(se_engine_n_active(e), 0);
    se_engine_close(e);
}

/* A conversation submitted as messages runs exactly as its rendered, tokenized prompt. */
static void test_chat_submit(void **state)
{
    (void)state;
    se_engine_t *e = open_engine(4, 0);
    struct se_sampling sp = sampling(0, 6, 0);
    struct se_chat_msg msgs[] = {{"system", "Be brief."}, {"user", "Hello there!"}};
    char *text = NULL, err[512];
    int32_t *ids = NULL;
    size_t n_ids = 0;
    assert_int_equal(se_chat_render(tok, msgs, 2, true, &text, err, sizeof(err)), 0);
    assert_int_equal(se_tokenizer_encode(tok, text, strlen(text), false, &ids, &n_ids), 0);
    struct out o[2] = {0};
    int32_t id;
    struct se_seq_params q = {.prompt = ids, .n_prompt = n_ids, .sampling = sp, .user = 0};
    assert_int_equal(se_engine_submit(e, &q, &id, err, sizeof(err)), 0);
    struct se_seq_params c = {
        .messages = msgs, .n_messages = 2, .sampling = sp, .user = 1, .priority = SE_PRIORITY_LIVE};
    assert_int_equal(se_engine_submit(e, &c, &id, err, sizeof(err)), 0);
    run_all(e, o);
    assert_int_equal(o[0].n, 6);
    assert_int_equal(o[1].n, 6);
    assert_memory_equal(o[0].ids, o[1].ids, 6 * sizeof(int32_t));
    /* A bad priority and a bad role are input errors. */
    c.priority = (enum se_priority)7;
    assert_int_equal(se_engine_submit(e, &c, &id, err, sizeof(err)), SP_EINVAL);
    assert_non_null(strstr(err, "priority"));
    struct se_chat_msg bad[] = {{"wizard", "hi"}};
    c.priority = SE_PRIORITY_BATCH;
    c.messages = bad;
    c.n_messages = 1;
    assert_int_equal(se_engine_submit(e, &c, &id, err, sizeof(err)), SP_EINVAL);
    free(text);
    free(ids);
    se_engine_close(e);
}

static int setup(void **state)
{
    (void)state;
    char dir[512], err[512];
    snprintf(dir, sizeof(dir), "%s/llama-f32", models_dir);
    if (se_model_open(dir, &model, err, sizeof(err)) ||
        se_tokenizer_open(dir, &tok, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    se_tokenizer_close(tok);
    se_model_close(model);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_engine MODELS_DIR\n");
        return 1;
    }
    models_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batching_keeps_greedy),
        cmocka_unit_test(test_seeded_repeat_and_resume),
        cmocka_unit_test(test_finish_reasons),
        cmocka_unit_test(test_admission),
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_chat_submit),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
