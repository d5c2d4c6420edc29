/*
 * Model loading: config.json fields, safetensors checks and the errors a user
 * sees for broken model directories. Broken directories are written by the
 * test into a temporary directory; argv[1], when given, is the directory of
 * models made by tests/tools/mkmodel.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "model/safetensors.h"
#include "model/weights.h"
#include "spool/error.h"
#include "spool/model.h"

static const char *models_dir;

/* A tiny Llama: hidden 4, 1 layer, 2 heads of 2, 1 kv head, ffn 6, vocab 8. */
static const char *CONFIG =
    "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 4, \"intermediate_size\": 6,"
    " \"num_hidden_layers\": 1, \"num_attention_heads\": 2, \"num_key_value_heads\": 1,"
    " \"vocab_size\": 8, \"max_position_embeddings\": 64, \"rms_norm_eps\": 1e-5,"
    " \"rope_theta\": 10000.0, \"bos_token_id\": 1, \"eos_token_id\": 2,"
    " \"tie_word_embeddings\": false}";

struct tdef {
    const char *name;
    int64_t d0, d1;
};
static const struct tdef TENSORS[] = {
    {"model.embed_tokens.weight", 8, 4},
    {"model.layers.0.input_layernorm.weight", 4, 0},
    {"model.layers.0.self_attn.q_proj.weight", 4, 4},
    {"model.layers.0.self_attn.k_proj.weight", 2, 4},
    {"model.layers.0.self_attn.v_proj.weight", 2, 4},
    {"model.layers.0.self_attn.o_proj.weight", 4, 4},
    {"model.layers.0.post_attention_layernorm.weight", 4, 0},
    {"model.layers.0.mlp.gate_proj.weight", 6, 4},
    {"model.layers.0.mlp.up_proj.weight", 6, 4},
    {"model.layers.0.mlp.down_proj.weight", 4, 6},
    {"model.norm.weight", 4, 0},
    {"lm_head.weight", 8, 4},
};
#define N_TENSORS (sizeof(TENSORS) / sizeof(TENSORS[0]))
static const int64_t N_PARAMS = 32 + 4 + 16 + 8 + 8 + 16 + 4 + 24 + 24 + 24 + 4 + 32;

/* How write_model breaks the model. */
struct breakage {
    const char *skip;       /* leave this tensor out */
    const char *reshape;    /* give this tensor shape (3, 3) */
    const char *dtype;      /* dtype of every tensor ("F32" when NULL) */
    long truncate;          /* cut this many bytes off the end */
    bool overlap;           /* make the second tensor overlap the first */
    const char *raw_header; /* write this header instead */
    const char *config;     /* config.json text instead of CONFIG */
};

struct fixture {
    char dir[64];
};

static void write_text(const char *dir, const char *name, const char *text)
{
    char path[256];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void write_model(const char *dir, const struct breakage *b)
{
    write_text(dir, "config.json", b->config ? b->config : CONFIG);
    char header[8192];
    size_t o = 0;
    uint64_t off = 0;
    const char *dt = b->dtype ? b->dtype : "F32";
    size_t esz = !strcmp(dt, "F32") ? 4 : !strcmp(dt, "I8") ? 1 : 2;
    o += (size_t)snprintf(header + o, sizeof(header) - o, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (size_t i = 0; i < N_TENSORS; i++) {
        const struct tdef *t = &TENSORS[i];
        if (b->skip && !strcmp(b->skip, t->name))
            continue;
        int64_t d0 = t->d0, d1 = t->d1;
        if (b->reshape && !strcmp(b->reshape, t->name))
            d0 = 3, d1 = 3;
        uint64_t n = (uint64_t)(d0 * (d1 ? d1 : 1)) * esz;
        uint64_t begin = b->overlap && i == 1 ? off - 4 : off;
        char shape[64];
        if (d1)
            snprintf(shape, sizeof(shape), "[%lld,%lld]", (long long)d0, (long long)d1);
        else
            snprintf(shape, sizeof(shape), "[%lld]", (long long)d0);
        o += (size_t)snprintf(
            header + o, sizeof(header) - o,
            ",\"%s\":{\"dtype\":\"%s\",\"shape\":%s,\"data_offsets\":[%llu,%llu]}", t->name, dt,
            shape, (unsigned long long)begin, (unsigned long long)(begin + n));
        off = begin + n;
    }
    o += (size_t)snprintf(header + o, sizeof(header) - o, "}");
    const char *h = b->raw_header ? b->raw_header : header;
    uint64_t hlen = strlen(h);
    char path[256];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    uint8_t len8[8];
    for (int i = 0; i < 8; i++)
        len8[i] = (uint8_t)(hlen >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(h, 1, hlen, f);
    long data = (long)off - b->truncate;
    for (long i = 0; i < data; i++)
        fputc(i % 7, f); /* small finite values in every dtype */
    fclose(f);
}

static int setup(void **state)
{
    struct fixture *fx = calloc(1, sizeof(*fx));
    snprintf(fx->dir, sizeof(fx->dir), "/tmp/se-model-XXXXXX");
    if (!mkdtemp(fx->dir))
        return -1;
    *state = fx;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *fx = *state;
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", fx->dir);
    if (system(cmd) != 0)
        return -1;
    free(fx);
    return 0;
}

/* Opens the fixture's model expecting rc; the message must contain each of the strings. */
static void expect_open(const char *dir, int want, ...)
{
    se_model_t *m = NULL;
    char err[1024] = "";
    int rc = se_model_open(dir, &m, err, sizeof(err));
    if (rc != want)
        fail_msg("rc %s, expected %s: %s", sp_err_name(rc), sp_err_name(want), err);
    va_list ap;
    va_start(ap, want);
    for (const char *s; (s = va_arg(ap, const char *));)
        if (!strstr(err, s))
            fail_msg("message \"%s\" lacks \"%s\"", err, s);
    va_end(ap);
    if (rc == 0)
        se_model_close(m);
    else
        assert_null(m);
}

static void test_valid(void **state)
{
    struct fixture *fx = *state;
    write_model(fx->dir, &(struct breakage){0});
    write_text(fx->dir, "generation_config.json",
               "{\"eos_token_id\": [2, 5], \"bos_token_id\": 1}");
    se_model_t *m;
    char err[512];
    assert_int_equal(se_model_open(fx->dir, &m, err, sizeof(err)), 0);
    const struct se_model_config *c = se_model_get_config(m);
    assert_int_equal(c->arch, SE_ARCH_LLAMA);
    assert_string_equal(c->arch_name, "LlamaForCausalLM");
    assert_int_equal(c->dtype, SE_DTYPE_F32);
    assert_int_equal(c->head_dim, 2);
    assert_int_equal(c->n_kv_heads, 1);
    assert_int_equal(c->max_position, 64);
    assert_int_equal(c->n_params, N_PARAMS);
    assert_int_equal(c->n_eos, 2);
    assert_int_equal(c->eos_ids[1], 5);
    assert_int_equal(c->bos_id, 1);
    assert_false(c->tie_embeddings);
    assert_false(c->rope_llama3);
    const struct se_weights *w = se__model_weights(m);
    assert_int_equal(w->n_layers, 1);
    assert_ptr_not_equal(w->lm_head, w->embed);
    assert_int_equal(w->layers[0].w_down->shape[1], 6);
    assert_null(w->layers[0].bq);
    se_model_close(m);
}

static void test_missing_dir(void **state)
{
    (void)state;
    expect_open("/nonexistent/spool-model", SP_ENOENT, "/nonexistent/spool-model/config.json",
                NULL);
}

static void test_bad_config(void **state)
{
    struct fixture *fx = *state;
    write_model(fx->dir, &(struct breakage){.config = "{\"architectures\": [\"Llama"});
    expect_open(fx->dir, SP_ECORRUPT, "config.json:1:", "invalid JSON", NULL);
    write_model(fx->dir,
                &(struct breakage){.config = "{\"architectures\": [\"GPT2LMHeadModel\"]}"});
    expect_open(fx->dir, SP_EUNSUPPORTED, "GPT2LMHeadModel", "not supported", NULL);
    write_model(fx->dir,
                &(struct breakage){.config = "{\"architectures\": [\"LlamaForCausalLM\"], "
                                             "\"vocab_size\": 8, \"hidden_size\": \"big\"}"});
    expect_open(fx->dir, SP_ECORRUPT, "hidden_size", NULL);
    write_model(fx->dir,
                &(struct breakage){.config = "{\"architectures\": [\"LlamaForCausalLM\"]}"});
    expect_open(fx->dir, SP_ECORRUPT, "missing field \"vocab_size\"", NULL);
}

static void test_missing_tensor(void **state)
{
    struct fixture *fx = *state;
    write_model(fx->dir, &(struct breakage){.skip = "model.layers.0.mlp.up_proj.weight"});
    expect_open(fx->dir, SP_ECORRUPT, "missing tensor model.layers.0.mlp.up_proj.weight",
                "model.safetensors", NULL);
}

static void test_wrong_shape(void **state)
{
    struct fixture *fx = *state;
    write_model(fx->dir, &(struct breakage){.reshape = "model.layers.0.mlp.gate_proj.weight"});
    expect_open(fx->dir, SP_ECORRUPT, "model.layers.0.mlp.gate_proj.weight", "shape (3, 3)",
                "expected (6, 4)", NULL);
}

static void test_dtypes(void **state)
{
    struct fixture *fx = *state;
    write_model(fx->dir, &(struct breakage){.dtype = "BF16"});
    expect_open(fx->dir, 0, NULL);
    write_model(fx->dir, &(struct breakage){.dtype = "F16"});
    expect_open(fx->dir, 0, NULL);
    write_model(fx->dir, &(struct breakage){.dtype = "I8"});
    expect_open(fx->dir, SP_EUNSUPPORTED, "model.safetensors", "unsupported dtype I8", NULL);
}

static void test_truncated(void **state)
{
    struct fixture *fx = *state;
    write_model(fx->dir, &(struct breakage){.truncate = 3});
    expect_open(fx->dir, SP_ECORRUPT, "model.safetensors", "lm_head.weight", "truncated", NULL);
}

static void test_corrupt_header(void **state)
{
    struct fixture *fx = *state;
    write_model(fx->dir, &(struct breakage){.raw_header = "{\"a\": [1, 2"});
    expect_open(fx->dir, SP_ECORRUPT, "model.safetensors", "not valid JSON", NULL);
    write_model(fx->dir, &(struct breakage){.overlap = true});
    expect_open(fx->dir, SP_ECORRUPT, "overlapping", NULL);
    write_model(fx->dir, &(struct breakage){.raw_header = "{\"x\":{\"dtype\":\"F32\",\"shape\":[2],"
                                                          "\"data_offsets\":[0,4]}}"});
    expect_open(fx->dir, SP_ECORRUPT, "tensor x", "shape x element size is 8", NULL);
}

static void test_parse_header_length(void **state)
{
    (void)state;
    uint8_t buf[16] = {0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, '{', '}'};
    struct se_tensor *t;
    int n;
    char err[256];
    assert_int_equal(se__st_parse(buf, sizeof(buf), &t, &n, err, sizeof(err)), SP_ECORRUPT);
    assert_non_null(strstr(err, "header length"));
    buf[0] = 2, buf[1] = buf[2] = buf[3] = 0;
    assert_int_equal(se__st_parse(buf, 10, &t, &n, err, sizeof(err)), 0);
    assert_int_equal(n, 0);
    se__st_free_tensors(t, n);
    assert_int_equal(se__st_parse(buf, 5, &t, &n, err, sizeof(err)), SP_ECORRUPT);
}

/* The mkmodel.py models: sharded Llama 3 with rope scaling, tied Qwen2 with biases. */
static void test_real_dirs(void **state)
{
    (void)state;
    if (!models_dir)
        skip();
    char dir[512];
    se_model_t *m;
    char err[512];
    snprintf(dir, sizeof(dir), "%s/llama3-bf16", models_dir);
    assert_int_equal(se_model_open(dir, &m, err, sizeof(err)), 0);
    const struct se_model_config *c = se_model_get_config(m);
    assert_int_equal(c->dtype, SE_DTYPE_BF16);
    assert_true(c->rope_llama3);
    assert_int_equal(c->rope_original_max_position, 64);
    assert_true(c->rope_factor == 8.0f);
    assert_int_equal(c->head_dim, 16);
    assert_int_equal(c->n_eos, 2);
    assert_true(c->rope_theta == 500000.0f);
    se_model_close(m);
    snprintf(dir, sizeof(dir), "%s/qwen2-f16", models_dir);
    assert_int_equal(se_model_open(dir, &m, err, sizeof(err)), 0);
    c = se_model_get_config(m);
    assert_int_equal(c->arch, SE_ARCH_QWEN2);
    assert_true(c->qkv_bias && c->tie_embeddings);
    assert_int_equal(c->vocab_size, 151936);
    const struct se_weights *w = se__model_weights(m);
    assert_ptr_equal(w->lm_head, w->embed);
    assert_non_null(w->layers[1].bk);
    /* Tied: the embedding counts once. */
    assert_int_equal(c->n_params,
                     151936 * 16 + 16 +
                         2 * (2 * 16 + 16 * 16 + 8 * 16 * 2 + 16 * 16 + 16 + 8 * 2 + 3 * 16 * 32));
    se_model_close(m);
}

int main(int argc, char **argv)
{
    models_dir = argc > 1 ? argv[1] : NULL;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_valid, setup, teardown),
        cmocka_unit_test(test_missing_dir),
        cmocka_unit_test_setup_teardown(test_bad_config, setup, teardown),
        cmocka_unit_test_setup_teardown(test_missing_tensor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_wrong_shape, setup, teardown),
        cmocka_unit_test_setup_teardown(test_dtypes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_truncated, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_header, setup, teardown),
        cmocka_unit_test(test_parse_header_length),
        cmocka_unit_test(test_real_dirs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
