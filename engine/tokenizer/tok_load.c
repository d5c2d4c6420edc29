/*
 * Loading a Hugging Face tokenizer.json (and tokenizer_config.json) into the
 * immutable struct se_tokenizer. Every problem is reported with the file name
 * and the JSON field that was wrong; nothing here crashes on malformed input.
 */
#include "tok_internal.h"

#include "spool/error.h"

#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct loader {
    se_tokenizer_t *tok;
    const char *file;
    char *err;
    size_t errcap;
};

__attribute__((format(printf, 3, 4))) static int fail(struct loader *L, int code, const char *fmt,
                                                      ...)
{
    if (L->err && L->errcap) {
        int k = snprintf(L->err, L->errcap, "%s: ", L->file);
        if (k < 0 || (size_t)k >= L->errcap)
            k = 0;
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(L->err + k, L->errcap - (size_t)k, fmt, ap);
        va_end(ap);
    }
    return code;
}

static const char *jstr(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static bool jbool(json_t *obj, const char *key, bool dflt)
{
    json_t *v = json_object_get(obj, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

/* A token written in the config as "text" or as {"content": "text", ...}. */
static const char *token_text(json_t *v)
{
    if (json_is_string(v))
        return json_string_value(v);
    if (json_is_object(v))
        return jstr(v, "content");
    return NULL;
}

static int set_piece(struct loader *L, int32_t id, const char *s, size_t n)
{
    se_tokenizer_t *t = L->tok;
    char *copy = malloc(n + 1);
    if (!copy)
        return SP_ENOMEM;
    memcpy(copy, s, n);
    copy[n] = '\0';
    free(t->piece[id]);
    t->piece[id] = copy;
    t->piece_len[id] = (uint32_t)n;
    return 0;
}

/* ---- model ---- */

static int load_vocab(struct loader *L, json_t *model, json_t *added)
{
    se_tokenizer_t *t = L->tok;
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return fail(L, SP_ECORRUPT, "model.vocab is missing or not an object");
    int64_t max_id = -1;
    const char *key;
    json_t *val;
    json_object_foreach(vocab, key, val)
    {
        if (!json_is_integer(val) || json_integer_value(val) < 0 ||
            json_integer_value(val) >= (1 << 30))
            return fail(L, SP_ECORRUPT, "model.vocab[\"%.60s\"] is not a valid id", key);
        if (json_integer_value(val) > max_id)
            max_id = json_integer_value(val);
    }
    size_t i;
    json_array_foreach(added, i, val)
    {
        json_t *id = json_object_get(val, "id");
        if (!json_is_object(val) || !json_is_integer(id) || json_integer_value(id) < 0 ||
            json_integer_value(id) >= (1 << 30) || !json_is_string(json_object_get(val, "content")))
            return fail(L, SP_ECORRUPT,
                        "added_tokens[%zu] needs an integer id and a content string", i);
        if (json_integer_value(id) > max_id)
            max_id = json_integer_value(id);
    }
    if (max_id < 0)
        return fail(L, SP_ECORRUPT, "the vocabulary is empty");
    /* Ids are dense in real files; a stray huge id must not allocate gigabytes. */
    size_t entries = json_object_size(vocab) + json_array_size(added);
    if ((size_t)max_id >= entries * 2 + 1024)
        return fail(L, SP_ECORRUPT, "ids are not dense: id %lld for %zu entries", (long long)max_id,
                    entries);
    t->n_vocab = (int32_t)(max_id + 1);
    t->piece = calloc((size_t)t->n_vocab, sizeof *t->piece);
    t->piece_len = calloc((size_t)t->n_vocab, sizeof *t->piece_len);
    t->special = calloc((size_t)t->n_vocab, sizeof *t->special);
    t->added = calloc((size_t)t->n_vocab, sizeof *t->added);
    if (!t->piece || !t->piece_len || !t->special || !t->added)
        return SP_ENOMEM;
    size_t key_len;
    json_object_keylen_foreach(vocab, key, key_len, val)
    {
        int32_t id = (int32_t)json_integer_value(val);
        if (set_piece(L, id, key, key_len))
            return SP_ENOMEM;
    }
    return 0;
}

static int load_added(struct loader *L, json_t *added)
{
    se_tokenizer_t *t = L->tok;
    size_t n = json_array_size(added);
    t->added_tok = calloc(n ? n : 1, sizeof *t->added_tok);
    if (!t->added_tok)
        return SP_ENOMEM;
    size_t i;
    json_t *a;
    json_array_foreach(added, i, a)
    {
        struct se__added *x = &t->added_tok[t->n_added];
        json_t *c = json_object_get(a, "content");
        x->id = (int32_t)json_integer_value(json_object_get(a, "id"));
        x->len = json_string_length(c);
        if (x->len == 0)
            continue; /* an empty added token can never match */
        x->content = malloc(x->len + 1);
        if (!x->content)
            return SP_ENOMEM;
        memcpy(x->content, json_string_value(c), x->len + 1);
        x->special = jbool(a, "special", false);
        x->lstrip = jbool(a, "lstrip", false);
        x->rstrip = jbool(a, "rstrip", false);
        x->single_word = jbool(a, "single_word", false);
        x->normalized = jbool(a, "normalized", !x->special);
        if (set_piece(L, x->id, x->content, x->len))
            return SP_ENOMEM;
        t->special[x->id] = x->special;
        t->added[x->id] = true;
        t->n_added++;
    }
    return 0;
}

static int cmp_added(const void *a, const void *b)
{
    const struct se__added *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

static int load_merges(struct loader *L, json_t *model)
{
    se_tokenizer_t *t = L->tok;
    json_t *merges = json_object_get(model, "merges");
    if (!merges)
        merges = json_array(); /* a BPE with no merges is valid (characters only) */
    else
        json_incref(merges);
    int rc = 0;
    if (!json_is_array(merges)) {
        rc = fail(L, SP_ECORRUPT, "model.merges is not an array");
        goto out;
    }
    if ((rc = se__pairmap_init(&t->merges, json_array_size(merges))))
        goto out;
    size_t i;
    json_t *m;
    char *joined = NULL;
    size_t joined_cap = 0;
    json_array_foreach(merges, i, m)
    {
        const char *a, *b;
        size_t na, nb;
        if (json_is_string(m)) {
            a = json_string_value(m);
            const char *sp = strchr(a, ' ');
            if (!sp || strchr(sp + 1, ' ')) {
                rc = fail(L, SP_ECORRUPT,
                          "model.merges[%zu] (\"%.60s\") is not two pieces separated by one space",
                          i, a);
                break;
            }
            na = (size_t)(sp - a);
            b = sp + 1;
            nb = strlen(b);
        } else if (json_is_array(m) && json_array_size(m) == 2 &&
                   json_is_string(json_array_get(m, 0)) && json_is_string(json_array_get(m, 1))) {
            a = json_string_value(json_array_get(m, 0));
            na = json_string_length(json_array_get(m, 0));
            b = json_string_value(json_array_get(m, 1));
            nb = json_string_length(json_array_get(m, 1));
        } else {
            rc = fail(L, SP_ECORRUPT, "model.merges[%zu] is neither \"a b\" nor [\"a\", \"b\"]", i);
            break;
        }
        int32_t ia = se__strmap_get(&t->vocab, t, a, na), ib = se__strmap_get(&t->vocab, t, b, nb);
        if (na + nb + 1 > joined_cap) {
            joined_cap = (na + nb + 1) * 2;
            char *p = realloc(joined, joined_cap);
            if (!p) {
                rc = SP_ENOMEM;
                break;
            }
            joined = p;
        }
        memcpy(joined, a, na);
        memcpy(joined + na, b, nb);
        int32_t im = se__strmap_get(&t->vocab, t, joined, na + nb);
        if (ia < 0 || ib < 0 || im < 0) {
            rc = fail(L, SP_ECORRUPT,
                      "model.merges[%zu] (\"%.*s\" + \"%.*s\"): \"%.*s\" is not in "
                      "the vocabulary",
                      i, (int)(na > 40 ? 40 : na), a, (int)(nb > 40 ? 40 : nb), b,
                      ia < 0   ? (int)(na > 40 ? 40 : na)
                      : ib < 0 ? (int)(nb > 40 ? 40 : nb)
                               : (int)(na + nb > 80 ? 80 : na + nb),
                      ia < 0   ? a
                      : ib < 0 ? b
                               : joined);
            break;
        }
        se__pairmap_put(&t->merges, ia, ib, (int32_t)i, im);
    }
    free(joined);
out:
    json_decref(merges);
    return rc;
}

static int load_model(struct loader *L, json_t *root)
{
    se_tokenizer_t *t = L->tok;
    json_t *model = json_object_get(root, "model");
    if (!json_is_object(model))
        return fail(L, SP_ECORRUPT, "no \"model\" object: this is not a tokenizer.json");
    const char *type = jstr(model, "type");
    if (type && strcmp(type, "BPE") != 0)
        return fail(L, SP_EUNSUPPORTED,
                    "model type \"%s\" is not supported (only BPE tokenizers are)", type);
    if (!type && !json_object_get(model, "merges"))
        return fail(L, SP_EUNSUPPORTED,
                    "the model has no type and no merges; only BPE is supported");
    const char *cont = jstr(model, "continuing_subword_prefix");
    const char *eow = jstr(model, "end_of_word_suffix");
    if ((cont && *cont) || (eow && *eow))
        return fail(L, SP_EUNSUPPORTED,
                    "BPE with continuing_subword_prefix or end_of_word_suffix is not supported");
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added) && !json_is_null(added))
        return fail(L, SP_ECORRUPT, "added_tokens is not an array");
    if (!json_is_array(added))
        added = NULL;
    json_t *empty = json_array();
    int rc = load_vocab(L, model, added ? added : empty);
    if (!rc)
        rc = load_added(L, added ? added : empty);
    json_decref(empty);
    if (rc)
        return rc;
    if ((rc = se__strmap_init(&t->vocab, (size_t)t->n_vocab)))
        return rc;
    /* Added tokens first, so that their id wins for a string that is both. */
    for (size_t i = 0; i < t->n_added; i++)
        se__strmap_put(&t->vocab, t, t->added_tok[i].id);
    for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->piece[id])
            se__strmap_put(&t->vocab, t, id);
    qsort(t->added_tok, t->n_added, sizeof *t->added_tok, cmp_added);
    for (size_t i = 0; i < t->n_added; i++)
        t->added_first[(unsigned char)t->added_tok[i].content[0]] |=
            t->added_tok[i].normalized ? 2 : 1;

    t->unk = -1;
    const char *unk = jstr(model, "unk_token");
    if (unk) {
        t->unk = se__strmap_get(&t->vocab, t, unk, strlen(unk));
        if (t->unk < 0)
            return fail(L, SP_ECORRUPT, "model.unk_token \"%.60s\" is not in the vocabulary", unk);
    }
    t->byte_fallback = jbool(model, "byte_fallback", false);
    t->fuse_unk = jbool(model, "fuse_unk", false);
    t->ignore_merges = jbool(model, "ignore_merges", false);
    for (int b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        t->byte_token[b] = se__strmap_get(&t->vocab, t, name, 6);
    }
    return load_merges(L, model);
}

/* ---- normalizer ---- */

static int add_norm(struct loader *L, json_t *n, const char *where)
{
    se_tokenizer_t *t = L->tok;
    if (json_is_null(n) || !n)
        return 0;
    const char *type = json_is_object(n) ? jstr(n, "type") : NULL;
    if (!type)
        return fail(L, SP_ECORRUPT, "%s has no type", where);
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(n, "normalizers");
        if (!json_is_array(list))
            return fail(L, SP_ECORRUPT, "%s: Sequence without a normalizers array", where);
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x)
        {
            int rc = add_norm(L, x, where);
            if (rc)
                return rc;
        }
        return 0;
    }
    struct se__norm step = {0};
    if (strcmp(type, "NFC") == 0)
        step.kind = SE_NORM_NFC;
    else if (strcmp(type, "NFD") == 0)
        step.kind = SE_NORM_NFD;
    else if (strcmp(type, "NFKC") == 0)
        step.kind = SE_NORM_NFKC;
    else if (strcmp(type, "NFKD") == 0)
        step.kind = SE_NORM_NFKD;
    else if (strcmp(type, "Prepend") == 0) {
        const char *p = jstr(n, "prepend");
        if (!p)
            return fail(L, SP_ECORRUPT, "%s: Prepend without a prepend string", where);
        step.kind = SE_NORM_PREPEND;
        step.a = strdup(p);
    } else if (strcmp(type, "Replace") == 0) {
        const char *pat = jstr(json_object_get(n, "pattern"), "String");
        const char *content = jstr(n, "content");
        if (!pat || !content)
            return fail(L, SP_EUNSUPPORTED,
                        "%s: only Replace with a String pattern and a content is supported", where);
        if (!*pat)
            return fail(L, SP_ECORRUPT, "%s: Replace with an empty pattern", where);
        step.kind = SE_NORM_REPLACE;
        step.a = strdup(pat);
        step.b = strdup(content);
    } else
        return fail(L, SP_EUNSUPPORTED, "%s type \"%s\" is not supported", where, type);
    struct se__norm *p = realloc(t->norm, (t->n_norm + 1) * sizeof *p);
    bool missing = (step.kind == SE_NORM_PREPEND && !step.a) ||
                   (step.kind == SE_NORM_REPLACE && (!step.a || !step.b));
    if (!p || missing) {
        if (p)
            t->norm = p;
        free(step.a);
        free(step.b);
        return SP_ENOMEM;
    }
    t->norm = p;
    t->norm[t->n_norm++] = step;
    return 0;
}

/* ---- pre-tokenizer ---- */

/*
 * Rewrites \s and \S as explicit classes of Unicode White_Space, which is what
 * Oniguruma (used by Hugging Face for these patterns) means by \s; PCRE2's UCP
 * \s also matches U+180E, which the models' tokenizers never saw as space.
 */
#define WS_CLASS                                                                                   \
    "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{"   \
    "202F}\\x{205F}\\x{3000}"
static char *rewrite_ws(const char *pat)
{
    struct se__buf b = {0};
    bool in_class = false;
    for (const char *p = pat; *p; p++) {
        if (*p == '\\' && p[1]) {
            if (p[1] == 's') {
                se__buf_add(&b, in_class ? WS_CLASS : "[" WS_CLASS "]",
                            strlen(WS_CLASS) + (in_class ? 0 : 2));
            } else if (p[1] == 'S' && !in_class) {
                se__buf_add(&b, "[^" WS_CLASS "]", strlen(WS_CLASS) + 3);
            } else {
                se__buf_add(&b, p, 2);
            }
            p++;
            continue;
        }
        if (!in_class && *p == '[') {
            in_class = true;
            se__buf_add(&b, p, 1);
            /* A ] right after [ or [^ is a literal. */
            if (p[1] == '^') {
                se__buf_add(&b, ++p, 1);
            }
            if (p[1] == ']')
                se__buf_add(&b, ++p, 1);
            continue;
        }
        if (in_class && *p == '[' && p[1] == ':') {
            const char *end = strstr(p, ":]");
            if (end) {
                se__buf_add(&b, p, (size_t)(end + 2 - p));
                p = end + 1;
                continue;
            }
        }
        if (in_class && *p == ']')
            in_class = false;
        se__buf_add(&b, p, 1);
    }
    if (!b.p)
        se__buf_add(&b, "", 0);
    return b.p;
}

static pcre2_code *compile_re(struct loader *L, const char *pat, bool literal, const char *where,
                              int *rc)
{
    char *rewritten = literal ? NULL : rewrite_ws(pat);
    int code;
    PCRE2_SIZE off;
    uint32_t opts = PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)(literal ? pat : rewritten), PCRE2_ZERO_TERMINATED,
                                   opts, &code, &off, NULL);
    free(rewritten);
    if (!re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        *rc = fail(L, SP_EUNSUPPORTED, "%s: cannot compile the pattern \"%.80s\": %s", where, pat,
                   (char *)msg);
        return NULL;
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* when JIT is unavailable, matching interprets */
    return re;
}

static const char gpt2_pattern[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int add_pre(struct loader *L, json_t *n, const char *where)
{
    se_tokenizer_t *t = L->tok;
    if (json_is_null(n) || !n)
        return 0;
    const char *type = json_is_object(n) ? jstr(n, "type") : NULL;
    if (!type)
        return fail(L, SP_ECORRUPT, "%s has no type", where);
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(n, "pretokenizers");
        if (!json_is_array(list))
            return fail(L, SP_ECORRUPT, "%s: Sequence without a pretokenizers array", where);
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x)
        {
            int rc = add_pre(L, x, where);
            if (rc)
                return rc;
        }
        return 0;
    }
    struct se__pre step = {0};
    int rc = 0;
    if (strcmp(type, "Split") == 0) {
        json_t *pat = json_object_get(n, "pattern");
        const char *re = jstr(pat, "Regex"), *lit = jstr(pat, "String");
        const char *beh = jstr(n, "behavior");
        if ((!re && !lit) || (lit && !*lit))
            return fail(L, SP_ECORRUPT, "%s: Split needs a pattern {\"Regex\"} or {\"String\"}",
                        where);
        if (jbool(n, "invert", false))
            return fail(L, SP_EUNSUPPORTED, "%s: Split with invert true is not supported", where);
        step.kind = SE_PRE_SPLIT;
        if (!beh || strcmp(beh, "Isolated") == 0)
            step.behavior = SE_SPLIT_ISOLATED;
        else if (strcmp(beh, "Removed") == 0)
            step.behavior = SE_SPLIT_REMOVED;
        else
            return fail(L, SP_EUNSUPPORTED, "%s: Split behavior \"%s\" is not supported", where,
                        beh);
        step.re = compile_re(L, re ? re : lit, !re, where, &rc);
        if (!step.re)
            return rc;
    } else if (strcmp(type, "ByteLevel") == 0) {
        step.kind = SE_PRE_BYTELEVEL;
        step.add_prefix_space = jbool(n, "add_prefix_space", false);
        if (jbool(n, "use_regex", true)) {
            step.re = compile_re(L, gpt2_pattern, false, where, &rc);
            if (!step.re)
                return rc;
        }
        t->byte_level_model = true;
    } else if (strcmp(type, "Metaspace") == 0) {
        step.kind = SE_PRE_METASPACE;
        const char *rep = jstr(n, "replacement");
        const char *scheme = jstr(n, "prepend_scheme");
        if (!scheme)
            step.prepend =
                jbool(n, "add_prefix_space", true) ? SE_PREPEND_ALWAYS : SE_PREPEND_NEVER;
        else if (strcmp(scheme, "always") == 0)
            step.prepend = SE_PREPEND_ALWAYS;
        else if (strcmp(scheme, "first") == 0)
            step.prepend = SE_PREPEND_FIRST;
        else if (strcmp(scheme, "never") == 0)
            step.prepend = SE_PREPEND_NEVER;
        else
            return fail(L, SP_ECORRUPT, "%s: unknown prepend_scheme \"%s\"", where, scheme);
        step.split = jbool(n, "split", true);
        step.replacement = strdup(rep && *rep ? rep : "\xe2\x96\x81");
        if (!step.replacement)
            return SP_ENOMEM;
    } else
        return fail(L, SP_EUNSUPPORTED, "%s type \"%s\" is not supported", where, type);
    struct se__pre *p = realloc(t->pre, (t->n_pre + 1) * sizeof *p);
    if (!p) {
        if (step.re)
            pcre2_code_free(step.re);
        free(step.replacement);
        return SP_ENOMEM;
    }
    t->pre = p;
    t->pre[t->n_pre++] = step;
    return 0;
}

/* ---- post-processor ---- */

static int push_id(int32_t **arr, size_t *n, int32_t id)
{
    int32_t *p = realloc(*arr, (*n + 1) * sizeof *p);
    if (!p)
        return SP_ENOMEM;
    *arr = p;
    p[(*n)++] = id;
    return 0;
}

static int load_template(struct loader *L, json_t *n)
{
    se_tokenizer_t *t = L->tok;
    json_t *single = json_object_get(n, "single");
    json_t *specials = json_object_get(n, "special_tokens");
    if (!json_is_array(single))
        return fail(L, SP_ECORRUPT, "post_processor: TemplateProcessing without a single template");
    bool seen_a = false;
    size_t i;
    json_t *item;
    json_array_foreach(single, i, item)
    {
        json_t *sp = json_object_get(item, "SpecialToken");
        json_t *seq = json_object_get(item, "Sequence");
        if (seq) {
            seen_a = true;
            continue;
        }
        const char *name = jstr(sp, "id");
        if (!name)
            return fail(L, SP_ECORRUPT,
                        "post_processor.single[%zu] is neither a SpecialToken nor a "
                        "Sequence",
                        i);
        json_t *ids = json_object_get(json_object_get(specials, name), "ids");
        if (!json_is_array(ids))
            return fail(L, SP_ECORRUPT, "post_processor: special token \"%.60s\" has no ids", name);
        size_t k;
        json_t *id;
        json_array_foreach(ids, k, id)
        {
            if (!json_is_integer(id) || json_integer_value(id) < 0 ||
                json_integer_value(id) >= t->n_vocab)
                return fail(L, SP_ECORRUPT,
                            "post_processor: special token \"%.60s\" has an id "
                            "outside the vocabulary",
                            name);
            int rc = seen_a
                         ? push_id(&t->post_post, &t->n_post_post, (int32_t)json_integer_value(id))
                         : push_id(&t->post_pre, &t->n_post_pre, (int32_t)json_integer_value(id));
            if (rc)
                return rc;
        }
    }
    return 0;
}

static int load_post(struct loader *L, json_t *n)
{
    if (!n || json_is_null(n))
        return 0;
    const char *type = json_is_object(n) ? jstr(n, "type") : NULL;
    if (!type)
        return fail(L, SP_ECORRUPT, "post_processor has no type");
    if (strcmp(type, "ByteLevel") == 0)
        return 0; /* only adjusts offsets */
    if (strcmp(type, "TemplateProcessing") == 0)
        return load_template(L, n);
    if (strcmp(type, "Sequence") == 0) {
        json_t *list = json_object_get(n, "processors");
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x)
        {
            int rc = load_post(L, x);
            if (rc)
                return rc;
        }
        return 0;
    }
    return fail(L, SP_EUNSUPPORTED, "post_processor type \"%s\" is not supported", type);
}

/* ---- decoder ---- */

static int load_decoder_step(struct loader *L, json_t *n, bool *fused)
{
    se_tokenizer_t *t = L->tok;
    const char *type = json_is_object(n) ? jstr(n, "type") : NULL;
    if (!type)
        return fail(L, SP_ECORRUPT, "decoder has no type");
    if (strcmp(type, "ByteLevel") == 0) {
        if (t->dec != SE_DEC_NONE)
            return fail(L, SP_EUNSUPPORTED, "decoder: ByteLevel combined with other decoders");
        t->dec = SE_DEC_BYTELEVEL;
        return 0;
    }
    if (t->dec == SE_DEC_BYTELEVEL)
        return fail(L, SP_EUNSUPPORTED, "decoder: ByteLevel combined with \"%s\"", type);
    t->dec = SE_DEC_SP;
    if (strcmp(type, "Replace") == 0) {
        const char *pat = jstr(json_object_get(n, "pattern"), "String");
        const char *content = jstr(n, "content");
        if (!pat || !*pat || !content || t->dec_replace_from)
            return fail(L, SP_EUNSUPPORTED,
                        "decoder: only one Replace with a String pattern is supported");
        t->dec_replace_from = strdup(pat);
        t->dec_replace_to = strdup(content);
        if (!t->dec_replace_from || !t->dec_replace_to)
            return SP_ENOMEM;
    } else if (strcmp(type, "ByteFallback") == 0) {
        t->dec_byte_fallback = true;
    } else if (strcmp(type, "Fuse") == 0) {
        *fused = true;
    } else if (strcmp(type, "Strip") == 0) {
        const char *c = jstr(n, "content");
        json_t *start = json_object_get(n, "start"), *stop = json_object_get(n, "stop");
        if (!c || strcmp(c, " ") != 0 || !*fused || (stop && json_integer_value(stop) != 0) ||
            json_integer_value(start) < 0 || json_integer_value(start) > 64)
            return fail(L, SP_EUNSUPPORTED,
                        "decoder: only Strip of leading spaces after Fuse is "
                        "supported");
        t->dec_strip_start = (int)json_integer_value(start);
    } else if (strcmp(type, "Metaspace") == 0) {
        const char *rep = jstr(n, "replacement");
        const char *scheme = jstr(n, "prepend_scheme");
        if (t->dec_replace_from)
            return fail(L, SP_EUNSUPPORTED, "decoder: Metaspace combined with Replace");
        t->dec_replace_from = strdup(rep && *rep ? rep : "\xe2\x96\x81");
        t->dec_replace_to = strdup(" ");
        if (!t->dec_replace_from || !t->dec_replace_to)
            return SP_ENOMEM;
        t->dec_strip_first =
            scheme ? strcmp(scheme, "never") != 0 : jbool(n, "add_prefix_space", true);
    } else
        return fail(L, SP_EUNSUPPORTED, "decoder type \"%s\" is not supported", type);
    return 0;
}

static int load_decoder(struct loader *L, json_t *n)
{
    if (!n || json_is_null(n))
        return 0;
    bool fused = false;
    if (json_is_object(n) && jstr(n, "type") && strcmp(jstr(n, "type"), "Sequence") == 0) {
        json_t *list = json_object_get(n, "decoders");
        if (!json_is_array(list))
            return fail(L, SP_ECORRUPT, "decoder: Sequence without a decoders array");
        size_t i;
        json_t *x;
        json_array_foreach(list, i, x)
        {
            int rc = load_decoder_step(L, x, &fused);
            if (rc)
                return rc;
        }
        return 0;
    }
    return load_decoder_step(L, n, &fused);
}

/* ---- files ---- */

static int load_tokenizer_json(struct loader *L, json_t *root)
{
    if (!json_is_object(root))
        return fail(L, SP_ECORRUPT, "the top level is not a JSON object");
    int rc = load_model(L, root);
    if (!rc)
        rc = add_norm(L, json_object_get(root, "normalizer"), "normalizer");
    if (!rc)
        rc = add_pre(L, json_object_get(root, "pre_tokenizer"), "pre_tokenizer");
    if (!rc)
        rc = load_post(L, json_object_get(root, "post_processor"));
    if (!rc)
        rc = load_decoder(L, json_object_get(root, "decoder"));
    if (rc)
        return rc;
    se_tokenizer_t *t = L->tok;
    if (!t->byte_level_model && t->n_pre == 0) {
        static const char mark[] = "\xe2\x96\x81";
        t->sp_word_split = true;
        for (int32_t id = 0; id < t->n_vocab && t->sp_word_split; id++) {
            const char *p = t->piece[id];
            if (!p || t->added[id])
                continue;
            for (const char *q = strstr(p, mark); q; q = strstr(q + 3, mark)) {
                if (q > p && !(q - p >= 3 && memcmp(q - 3, mark, 3) == 0)) {
                    t->sp_word_split = false;
                    break;
                }
            }
        }
    }
    for (int i = 0; i < 324; i++)
        t->unbyte[i] = -1;
    for (unsigned b = 0; b < 256; b++) {
        uint32_t cp = se__byte_to_cp(b);
        char s[4];
        size_t n = se__utf8_put(cp, s);
        t->unbyte[cp] = (int16_t)b;
        t->byte_sym[b] = se__strmap_get(&t->vocab, t, s, n);
    }
    return 0;
}

static int id_of_text(se_tokenizer_t *t, const char *s)
{
    return s ? se__strmap_get(&t->vocab, t, s, strlen(s)) : -1;
}

static int load_config(struct loader *L, json_t *root)
{
    se_tokenizer_t *t = L->tok;
    if (!json_is_object(root))
        return fail(L, SP_ECORRUPT, "the top level is not a JSON object");
    const char *bos = token_text(json_object_get(root, "bos_token"));
    const char *eos = token_text(json_object_get(root, "eos_token"));
    if (bos && id_of_text(t, bos) >= 0) {
        t->bos = id_of_text(t, bos);
        t->bos_text = strdup(bos);
    }
    if (eos && id_of_text(t, eos) >= 0) {
        t->eos = id_of_text(t, eos);
        t->eos_text = strdup(eos);
    }
    json_t *extra = json_object_get(root, "additional_special_tokens");
    size_t i;
    json_t *x;
    json_array_foreach(extra, i, x)
    {
        int32_t id = id_of_text(t, token_text(x));
        if (id >= 0)
            t->special[id] = true;
    }
    json_t *tmpl = json_object_get(root, "chat_template");
    if (json_is_string(tmpl)) {
        t->chat_template = strdup(json_string_value(tmpl));
    } else if (json_is_array(tmpl)) {
        /* Named templates: [{"name": "default", "template": "..."}, ...]. */
        json_array_foreach(tmpl, i, x)
        {
            const char *name = jstr(x, "name"), *text = jstr(x, "template");
            if (name && text && strcmp(name, "default") == 0)
                t->chat_template = strdup(text);
        }
    }
    return 0;
}

static int load_file(struct loader *L, const char *path, json_t **out, size_t flags)
{
    json_error_t je;
    *out = json_load_file(path, JSON_ALLOW_NUL | flags, &je);
    if (*out)
        return 0;
    L->file = path;
    if (je.line <= 0 && strstr(je.text, "unable to open"))
        return fail(L, errno == ENOENT ? SP_ENOENT : SP_EIO, "cannot read the file: %s", je.text);
    return fail(L, SP_ECORRUPT, "invalid JSON at line %d, column %d: %s", je.line, je.column,
                je.text);
}

static int open_json(json_t *tok_root, const char *tok_path, json_t *cfg_root, const char *cfg_path,
                     se_tokenizer_t **out, char *err, size_t errcap)
{
    se_tokenizer_t *t = calloc(1, sizeof *t);
    if (!t)
        return SP_ENOMEM;
    t->bos = t->eos = t->unk = -1;
    t->path = strdup(tok_path);
    t->config_path = cfg_path ? strdup(cfg_path) : NULL;
    struct loader L = {t, tok_path, err, errcap};
    int rc = load_tokenizer_json(&L, tok_root);
    if (!rc && cfg_root) {
        L.file = cfg_path;
        rc = load_config(&L, cfg_root);
    }
    if (!rc && t->bos < 0 && t->n_post_pre == 1)
        t->bos = t->post_pre[0];
    if (rc) {
        if (rc == SP_ENOMEM)
            fail(&L, rc, "out of memory");
        se__tokenizer_free(t);
        return rc;
    }
    *out = t;
    return 0;
}

int se_tokenizer_open_files(const char *tokenizer_json, const char *config_path,
                            se_tokenizer_t **out, char *err, size_t errcap)
{
    struct loader L = {NULL, tokenizer_json, err, errcap};
    json_t *root = NULL, *cfg = NULL;
    *out = NULL;
    int rc = load_file(&L, tokenizer_json, &root, 0);
    if (rc)
        return rc;
    /* Configs hold integers beyond 64 bits (model_max_length): read numbers as reals. */
    if (config_path && (rc = load_file(&L, config_path, &cfg, JSON_DECODE_INT_AS_REAL))) {
        json_decref(root);
        return rc;
    }
    rc = open_json(root, tokenizer_json, cfg, config_path, out, err, errcap);
    json_decref(root);
    json_decref(cfg);
    return rc;
}

int se_tokenizer_open_buffer(const char *json, size_t len, const char *config_json,
                             size_t config_len, se_tokenizer_t **out, char *err, size_t errcap)
{
    json_error_t je;
    *out = NULL;
    struct loader L = {NULL, "tokenizer.json", err, errcap};
    json_t *root = json_loadb(json, len, JSON_ALLOW_NUL, &je);
    if (!root)
        return fail(&L, SP_ECORRUPT, "invalid JSON at line %d, column %d: %s", je.line, je.column,
                    je.text);
    json_t *cfg = NULL;
    if (config_json) {
        cfg = json_loadb(config_json, config_len, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &je);
        if (!cfg) {
            json_decref(root);
            L.file = "tokenizer_config.json";
            return fail(&L, SP_ECORRUPT, "invalid JSON at line %d, column %d: %s", je.line,
                        je.column, je.text);
        }
    }
    int rc = open_json(root, "tokenizer.json", cfg, cfg ? "tokenizer_config.json" : NULL, out, err,
                       errcap);
    json_decref(root);
    json_decref(cfg);
    return rc;
}

int se_tokenizer_open(const char *dir, se_tokenizer_t **out, char *err, size_t errcap)
{
    char tj[4096], cj[4096];
    snprintf(tj, sizeof tj, "%s/tokenizer.json", dir);
    snprintf(cj, sizeof cj, "%s/tokenizer_config.json", dir);
    FILE *f = fopen(cj, "rb");
    if (f)
        fclose(f);
    return se_tokenizer_open_files(tj, f ? cj : NULL, out, err, errcap);
}

void se__tokenizer_free(se_tokenizer_t *t)
{
    if (!t)
        return;
    for (int32_t i = 0; t->piece && i < t->n_vocab; i++)
        free(t->piece[i]);
    free(t->piece);
    free(t->piece_len);
    free(t->special);
    free(t->added);
    se__strmap_free(&t->vocab);
    se__pairmap_free(&t->merges);
    for (size_t i = 0; i < t->n_norm; i++) {
        free(t->norm[i].a);
        free(t->norm[i].b);
    }
    free(t->norm);
    for (size_t i = 0; i < t->n_pre; i++) {
        if (t->pre[i].re)
            pcre2_code_free(t->pre[i].re);
        free(t->pre[i].replacement);
    }
    free(t->pre);
    for (size_t i = 0; i < t->n_added; i++)
        free(t->added_tok[i].content);
    free(t->added_tok);
    free(t->post_pre);
    free(t->post_post);
    free(t->dec_replace_from);
    free(t->dec_replace_to);
    free(t->bos_text);
    free(t->eos_text);
    free(t->chat_template);
    free(t->config_path);
    free(t->path);
    free(t);
}

void se_tokenizer_close(se_tokenizer_t *tok)
{
    se__tokenizer_free(tok);
}

int se_tokenizer_n_vocab(const se_tokenizer_t *tok)
{
    return tok->n_vocab;
}

const char *se_tokenizer_piece(const se_tokenizer_t *tok, int32_t id)
{
    return id >= 0 && id < tok->n_vocab ? tok->piece[id] : NULL;
}

int32_t se_tokenizer_id(const se_tokenizer_t *tok, const char *piece)
{
    return se__strmap_get(&tok->vocab, tok, piece, strlen(piece));
}

int32_t se_tokenizer_bos(const se_tokenizer_t *tok)
{
    return tok->bos;
}

int32_t se_tokenizer_eos(const se_tokenizer_t *tok)
{
    return tok->eos;
}

bool se_tokenizer_is_special(const se_tokenizer_t *tok, int32_t id)
{
    return id >= 0 && id < tok->n_vocab && tok->special[id];
}
