/*
 * The CPU backend through backend.h: batch validation errors, kv_copy (a
 * copied block serves a sequence exactly as the original), and the thread
 * pool. argv[1] is the directory of mkmodel.py's models. Numerical agreement
 * with the reference is checked by engine/cpu-vs-reference.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cpu/cpu.h"
#include "cpu/pool.h"
#include "model/weights.h"
#include "spool/error.h"

static const char *models_dir;

struct fx {
    se_model_t *m;
    struct se_backend be;
    int vocab;
};

static int setup(void **state)
{
    struct fx *f = calloc(1, sizeof(*f));
    char dir[512], err[512];
    snprintf(dir, sizeof(dir), "%s/llama-f16", models_dir);
    if (se_model_open(dir, &f->m, err, sizeof(err))) {
        fprintf(stderr, "%s\n", err);
        return -1;
    }
    struct se_cpu_opts o = {.n_threads = 3, .max_tokens = 8};
    if (se__backend_cpu_new(&o, &f->be) ||
        f->be.i->load(f->be.ctx, se_model_get_config(f->m), se__model_weights(f->m)))
        return -1;
    f->vocab = se_model_get_config(f->m)->vocab_size;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fx *f = *state;
    f->be.i->free(f->be.ctx);
    se_model_close(f->m);
    free(f);
    return 0;
}

/* One sequence of n tokens at positions start..start+n-1 over table. */
static int run(struct fx *f, const int32_t *tokens, int n, int start, const int32_t *table,
               float *logits)
{
    int32_t pos[16], s0 = 0, nt = n, ctx = start + n, row = n - 1;
    for (int i = 0; i < n; i++)
        pos[i] = start + i;
    const int32_t *tables[1] = {table};
    struct se_batch b = {.n_tokens = n,
                         .tokens = tokens,
                         .positions = pos,
                         .n_seqs = 1,
                         .seq_start = &s0,
                         .seq_n_tokens = &nt,
                         .seq_ctx_len = &ctx,
                         .block_tables = tables,
                         .n_logits = 1,
                         .logit_rows = &row};
    return f->be.i->forward(f->be.ctx, &b, logits);
}

static void test_errors(void **state)
{
    struct fx *f = *state;
    float *lg = malloc((size_t)f->vocab * sizeof(float));
    int32_t toks[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, table[4] = {0, 1, 2, 3};
    assert_int_equal(run(f, toks, 2, 0, table, lg), SP_ESTATE);
    assert_int_equal(f->be.i->kv_alloc(f->be.ctx, 4, 4), 0);
    assert_int_equal(f->be.i->kv_alloc(f->be.ctx, 4, 4), SP_ESTATE);
    assert_int_equal(run(f, toks, 9, 0, table, lg), SP_EINVAL); /* more than max_tokens */
    assert_non_null(strstr(f->be.i->last_error(f->be.ctx), "1 to 8"));
    int32_t bad_table[2] = {0, 7};
    assert_int_equal(run(f, toks, 6, 0, bad_table, lg), SP_EINVAL);
    assert_non_null(strstr(f->be.i->last_error(f->be.ctx), "KV block 7"));
    assert_int_equal(run(f, toks, 4, 14, table, lg), SP_ECONTEXT); /* 18 > 16 slots */
    int32_t bad_tok[1] = {f->vocab};
    assert_int_equal(run(f, bad_tok, 1, 0, table, lg), SP_EINVAL);
    assert_non_null(strstr(f->be.i->last_error(f->be.ctx), "outside the vocabulary"));
    assert_int_equal(f->be.i->kv_copy(f->be.ctx, 9, 0), SP_EINVAL);
    free(lg);
}

static void test_kv_copy(void **state)
{
    struct fx *f = *state;
    assert_int_equal(f->be.i->kv_alloc(f->be.ctx, 6, 4), 0);
    float *a = malloc((size_t)f->vocab * sizeof(float)), *b = malloc((size_t)f->vocab * 4);
    int32_t prompt[6] = {11, 22, 33, 44, 55, 66}, next[1] = {77};
    int32_t t1[2] = {0, 1}, t2[2] = {4, 5};
    assert_int_equal(run(f, prompt, 6, 0, t1, a), 0);
    /* Block 1 is partly filled (slots 0-1): copy both, as copy-on-write would. */
    assert_int_equal(f->be.i->kv_copy(f->be.ctx, 4, 0), 0);
    assert_int_equal(f->be.i->kv_copy(f->be.ctx, 5, 1), 0);
    assert_int_equal(run(f, next, 1, 6, t1, a), 0);
    assert_int_equal(run(f, next, 1, 6, t2, b), 0);
    assert_memory_equal(a, b, (size_t)f->vocab * sizeof(float));
    /* A different history gives different logits (the cache is really read). */
    int32_t t3[2] = {2, 3};
    int32_t other[6] = {1, 1, 1, 1, 1, 1};
    assert_int_equal(run(f, other, 6, 0, t3, b), 0);
    assert_int_equal(run(f, next, 1, 6, t3, b), 0);
    assert_memory_not_equal(a, b, (size_t)f->vocab * sizeof(float));
    free(a);
    free(b);
}

static void add_part(void *arg, int i, int n)
{
    int *slots = arg;
    slots[i] += i + 1;
    (void)n;
}

static void test_pool(void **state)
{
    (void)state;
    for (int n = 1; n <= 4; n++) {
        struct se_pool *p = se__pool_new(n);
        assert_non_null(p);
        assert_int_equal(se__pool_size(p), n);
        int slots[4] = {0};
        for (int r = 0; r < 1000; r++)
            se__pool_run(p, add_part, slots);
        for (int i = 0; i < n; i++)
            assert_int_equal(slots[i], 1000 * (i + 1));
        se__pool_free(p);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_cpu MODELS_DIR\n");
        return 1;
    }
    models_dir = argv[1];
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_kv_copy, setup, teardown),
        cmocka_unit_test(test_pool),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
