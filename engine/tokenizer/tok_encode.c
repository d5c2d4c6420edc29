/*
 * Encoding: text -> ids, in Hugging Face's order: added tokens are cut out
 * of the raw text, each remaining section is normalized, cut again at
 * normalized added tokens, pre-tokenized into pieces, and each piece is run
 * through BPE. All working memory lives in one struct enc owned by the call,
 * so a tokenizer can encode on several threads at once.
 */
#include "tok_internal.h"

#include "spool/error.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

struct span {
    size_t off, len;
};

struct spans {
    struct span *v;
    size_t n, cap;
};

struct heap_item {
    int32_t rank;
    int32_t left; /* symbol index; ties go to the leftmost pair */
    int32_t right;
    int32_t left_id, right_id, merged;
};

struct enc {
    const se_tokenizer_t *tok;
    int32_t *ids;
    size_t n_ids, cap_ids;
    struct se__buf clean; /* the input made valid UTF-8, when it was not */
    struct se__buf norm;  /* the normalized section */
    struct se__buf arena[2];
    struct spans pieces[2];
    struct se__buf mapped; /* byte-level mapped piece, for ignore_merges */
    /* BPE symbols: a doubly linked list over arrays, and the candidate heap. */
    int32_t *sym_id, *sym_prev, *sym_next;
    size_t cap_sym;
    struct heap_item *heap;
    size_t n_heap, cap_heap;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    int rc;
};

static int push_ids(struct enc *e, const int32_t *ids, size_t n)
{
    if (n == 0)
        return 0;
    if (e->n_ids + n > e->cap_ids) {
        size_t cap = e->cap_ids ? e->cap_ids : 256;
        while (cap < e->n_ids + n)
            cap *= 2;
        int32_t *p = realloc(e->ids, cap * sizeof *p);
        if (!p)
            return e->rc = SP_ENOMEM;
        e->ids = p;
        e->cap_ids = cap;
    }
    memcpy(e->ids + e->n_ids, ids, n * sizeof *ids);
    e->n_ids += n;
    return 0;
}

static int push_span(struct spans *s, size_t off, size_t len)
{
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        struct span *p = realloc(s->v, cap * sizeof *p);
        if (!p)
            return SP_ENOMEM;
        s->v = p;
        s->cap = cap;
    }
    s->v[s->n++] = (struct span){off, len};
    return 0;
}

/* ---- character classes ---- */

/* Unicode White_Space, as Rust's char::is_whitespace. */
static bool is_ws(uint32_t c)
{
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

static bool is_word(uint32_t c)
{
    if (c == '_')
        return true;
    utf8proc_category_t cat = utf8proc_category((utf8proc_int32_t)c);
    return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
           (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

/* The code point ending just before s + off (valid UTF-8). */
static uint32_t cp_before(const char *s, size_t off)
{
    size_t i = off;
    while (i > 0 && ((unsigned char)s[i - 1] & 0xC0) == 0x80)
        i--;
    if (i > 0)
        i--;
    size_t n;
    return se__utf8_get((const unsigned char *)s + i, &n);
}

/* ---- added tokens ---- */

/*
 * Finds the leftmost-longest added token (of the normalized or the
 * unnormalized kind) in s[from..n); on success sets the match [*ms, *me) with
 * lstrip/rstrip whitespace included, and the token's id.
 */
static bool find_added(const se_tokenizer_t *t, bool normalized, const char *s, size_t from,
                       size_t n, size_t floor, size_t *ms, size_t *me, int32_t *id)
{
    uint8_t bit = normalized ? 2 : 1;
    for (size_t i = from; i < n; i++) {
        if (!(t->added_first[(unsigned char)s[i]] & bit))
            continue;
        for (size_t k = 0; k < t->n_added; k++) {
            const struct se__added *a = &t->added_tok[k];
            if (a->normalized != normalized || a->len > n - i || a->content[0] != s[i] ||
                memcmp(a->content, s + i, a->len) != 0)
                continue;
            size_t end = i + a->len;
            if (a->single_word) {
                if (i > floor && is_word(cp_before(s, i)))
                    continue;
                size_t cl;
                if (end < n && is_word(se__utf8_get((const unsigned char *)s + end, &cl)))
                    continue;
            }
            size_t start = i;
            if (a->lstrip)
                while (start > floor && is_ws(cp_before(s, start))) {
                    /* Step back over one whole character. */
                    size_t j = start - 1;
                    while (j > floor && ((unsigned char)s[j] & 0xC0) == 0x80)
                        j--;
                    start = j;
                }
            if (a->rstrip)
                while (end < n) {
                    size_t cl;
                    uint32_t c = se__utf8_get((const unsigned char *)s + end, &cl);
                    if (!is_ws(c))
                        break;
                    end += cl;
                }
            *ms = start;
            *me = end;
            *id = a->id;
            return true;
        }
    }
    return false;
}

/* ---- normalization ---- */

static int normalize(struct enc *e, const char *s, size_t n)
{
    const se_tokenizer_t *t = e->tok;
    struct se__buf *b = &e->norm;
    b->len = 0;
    if (se__buf_add(b, s, n))
        return SP_ENOMEM;
    for (size_t k = 0; k < t->n_norm; k++) {
        const struct se__norm *st = &t->norm[k];
        switch (st->kind) {
        case SE_NORM_NFC:
        case SE_NORM_NFD:
        case SE_NORM_NFKC:
        case SE_NORM_NFKD: {
            bool ascii = true;
            for (size_t i = 0; i < b->len && ascii; i++)
                ascii = (unsigned char)b->p[i] < 0x80;
            if (ascii)
                break;
            int opt = UTF8PROC_STABLE;
            if (st->kind == SE_NORM_NFC)
                opt |= UTF8PROC_COMPOSE;
            else if (st->kind == SE_NORM_NFD)
                opt |= UTF8PROC_DECOMPOSE;
            else if (st->kind == SE_NORM_NFKC)
                opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
            else
                opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
            utf8proc_uint8_t *out = NULL;
            utf8proc_ssize_t m =
                utf8proc_map((const utf8proc_uint8_t *)b->p, (utf8proc_ssize_t)b->len, &out,
                             (utf8proc_option_t)opt);
            if (m < 0)
                return m == UTF8PROC_ERROR_NOMEM ? SP_ENOMEM : SP_EINVAL;
            b->len = 0;
            int rc = se__buf_add(b, out, (size_t)m);
            free(out);
            if (rc)
                return rc;
            break;
        }
        case SE_NORM_PREPEND: {
            if (b->len == 0)
                break; /* Hugging Face prepends only to non-empty text */
            size_t pl = strlen(st->a);
            if (se__buf_reserve(b, pl))
                return SP_ENOMEM;
            memmove(b->p + pl, b->p, b->len + 1);
            memcpy(b->p, st->a, pl);
            b->len += pl;
            break;
        }
        case SE_NORM_REPLACE: {
            size_t pl = strlen(st->a), cl = strlen(st->b);
            if (!memmem(b->p, b->len, st->a, pl))
                break;
            struct se__buf *tmp = &e->mapped;
            tmp->len = 0;
            size_t i = 0;
            while (i < b->len) {
                const char *hit = memmem(b->p + i, b->len - i, st->a, pl);
                size_t stop = hit ? (size_t)(hit - b->p) : b->len;
                if (se__buf_add(tmp, b->p + i, stop - i))
                    return SP_ENOMEM;
                if (!hit)
                    break;
                if (se__buf_add(tmp, st->b, cl))
                    return SP_ENOMEM;
                i = stop + pl;
            }
            b->len = 0;
            if (se__buf_add(b, tmp->p ? tmp->p : "", tmp->len))
                return SP_ENOMEM;
            break;
        }
        }
    }
    return 0;
}

/* ---- pre-tokenization ---- */

static int regex_split(struct enc *e, pcre2_code *re, bool keep_matches, const char *src,
                       struct span in, struct se__buf *dst, struct spans *out)
{
    const char *s = src + in.off;
    size_t n = in.len, pos = 0, last = 0;
    while (pos <= n) {
        int r = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
        if (r == PCRE2_ERROR_NOMATCH)
            break;
        if (r < 0)
            return r == PCRE2_ERROR_NOMEMORY ? SP_ENOMEM : SP_EINVAL;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) {
            /* An empty match splits nothing; step over one character. */
            if (ms >= n)
                break;
            size_t cl;
            se__utf8_get((const unsigned char *)s + ms, &cl);
            pos = ms + cl;
            continue;
        }
        if (ms > last) {
            if (push_span(out, dst->len, ms - last) || se__buf_add(dst, s + last, ms - last))
                return SP_ENOMEM;
        }
        if (keep_matches) {
            if (push_span(out, dst->len, me - ms) || se__buf_add(dst, s + ms, me - ms))
                return SP_ENOMEM;
        }
        last = pos = me;
    }
    if (n > last) {
        if (push_span(out, dst->len, n - last) || se__buf_add(dst, s + last, n - last))
            return SP_ENOMEM;
    }
    return 0;
}

static int pre_step(struct enc *e, const struct se__pre *st, bool first_section, int from)
{
    struct se__buf *src = &e->arena[from], *dst = &e->arena[!from];
    struct spans *in = &e->pieces[from], *out = &e->pieces[!from];
    dst->len = 0;
    out->n = 0;
    for (size_t k = 0; k < in->n; k++) {
        struct span sp = in->v[k];
        int rc = 0;
        switch (st->kind) {
        case SE_PRE_SPLIT:
            rc = regex_split(e, st->re, st->behavior == SE_SPLIT_ISOLATED, src->p, sp, dst, out);
            break;
        case SE_PRE_BYTELEVEL:
            if (st->add_prefix_space && (sp.len == 0 || src->p[sp.off] != ' ')) {
                /* Prefix in a temporary copy, then split that. */
                struct se__buf *tmp = &e->mapped;
                tmp->len = 0;
                if (se__buf_add(tmp, " ", 1) || se__buf_add(tmp, src->p + sp.off, sp.len))
                    return SP_ENOMEM;
                struct span whole = {0, tmp->len};
                if (st->re)
                    rc = regex_split(e, st->re, true, tmp->p, whole, dst, out);
                else if (push_span(out, dst->len, tmp->len) || se__buf_add(dst, tmp->p, tmp->len))
                    rc = SP_ENOMEM;
            } else if (st->re) {
                rc = regex_split(e, st->re, true, src->p, sp, dst, out);
            } else if (push_span(out, dst->len, sp.len) ||
                       se__buf_add(dst, src->p + sp.off, sp.len)) {
                rc = SP_ENOMEM;
            }
            break;
        case SE_PRE_METASPACE: {
            const char *rep = st->replacement;
            size_t rl = strlen(rep);
            size_t start = dst->len;
            bool prepend = st->prepend == SE_PREPEND_ALWAYS ||
                           (st->prepend == SE_PREPEND_FIRST && first_section && k == 0);
            /* Spaces become the replacement first, so a leading space also counts. */
            if (prepend && !(sp.len >= rl && memcmp(src->p + sp.off, rep, rl) == 0) &&
                !(sp.len > 0 && src->p[sp.off] == ' '))
                rc = se__buf_add(dst, rep, rl);
            for (size_t i = 0; i < sp.len && !rc; i++) {
                char c = src->p[sp.off + i];
                rc = c == ' ' ? se__buf_add(dst, rep, rl) : se__buf_add(dst, &c, 1);
            }
            if (rc)
                return rc;
            size_t end = dst->len;
            if (!st->split) {
                if (end > start)
                    rc = push_span(out, start, end - start);
                break;
            }
            /* Split before each replacement (it begins the next word). */
            size_t w = start;
            for (size_t i = start; i < end && !rc;) {
                if (end - i >= rl && memcmp(dst->p + i, rep, rl) == 0) {
                    if (i > w) {
                        rc = push_span(out, w, i - w);
                        w = i;
                    }
                    i += rl;
                } else {
                    i++;
                }
            }
            if (!rc && end > w)
                rc = push_span(out, w, end - w);
            break;
        }
        }
        if (rc)
            return rc;
    }
    return 0;
}

/* ---- BPE ---- */

static bool heap_less(const struct heap_item *a, const struct heap_item *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->left < b->left;
}

static int heap_push(struct enc *e, struct heap_item it)
{
    if (e->n_heap == e->cap_heap) {
        size_t cap = e->cap_heap ? e->cap_heap * 2 : 256;
        struct heap_item *p = realloc(e->heap, cap * sizeof *p);
        if (!p)
            return SP_ENOMEM;
        e->heap = p;
        e->cap_heap = cap;
    }
    size_t i = e->n_heap++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!heap_less(&it, &e->heap[parent]))
            break;
        e->heap[i] = e->heap[parent];
        i = parent;
    }
    e->heap[i] = it;
    return 0;
}

static struct heap_item heap_pop(struct enc *e)
{
    struct heap_item top = e->heap[0], last = e->heap[--e->n_heap];
    size_t i = 0, n = e->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n)
            break;
        if (c + 1 < n && heap_less(&e->heap[c + 1], &e->heap[c]))
            c++;
        if (!heap_less(&e->heap[c], &last))
            break;
        e->heap[i] = e->heap[c];
        i = c;
    }
    if (n)
        e->heap[i] = last;
    return top;
}

static int try_pair(struct enc *e, int32_t left)
{
    int32_t right = e->sym_next[left];
    if (right < 0)
        return 0;
    int32_t merged;
    int32_t rank = se__pairmap_get(&e->tok->merges, e->sym_id[left], e->sym_id[right], &merged);
    if (rank < 0)
        return 0;
    return heap_push(
        e, (struct heap_item){rank, left, right, e->sym_id[left], e->sym_id[right], merged});
}

static int reserve_syms(struct enc *e, size_t n)
{
    if (n <= e->cap_sym)
        return 0;
    size_t cap = e->cap_sym ? e->cap_sym : 256;
    while (cap < n)
        cap *= 2;
    int32_t *a = realloc(e->sym_id, cap * sizeof *a);
    if (a)
        e->sym_id = a;
    int32_t *b = realloc(e->sym_prev, cap * sizeof *b);
    if (b)
        e->sym_prev = b;
    int32_t *c = realloc(e->sym_next, cap * sizeof *c);
    if (c)
        e->sym_next = c;
    if (!a || !b || !c)
        return SP_ENOMEM;
    e->cap_sym = cap;
    return 0;
}

/* Appends an initial symbol (or, for unknown characters, byte fallback / unk). */
static int add_char_symbols(struct enc *e, const char *s, size_t cl, size_t *n)
{
    const se_tokenizer_t *t = e->tok;
    int32_t id = se__strmap_get(&t->vocab, t, s, cl);
    int32_t tmp[4];
    size_t k = 0;
    if (id >= 0) {
        tmp[k++] = id;
    } else {
        bool all = t->byte_fallback;
        for (size_t i = 0; i < cl && all; i++)
            all = t->byte_token[(unsigned char)s[i]] >= 0;
        if (all) {
            for (size_t i = 0; i < cl; i++)
                tmp[k++] = t->byte_token[(unsigned char)s[i]];
        } else if (t->unk >= 0) {
            if (t->fuse_unk && *n > 0 && e->sym_id[*n - 1] == t->unk)
                return 0;
            tmp[k++] = t->unk;
        }
    }
    for (size_t i = 0; i < k; i++)
        e->sym_id[(*n)++] = tmp[i];
    return 0;
}

static int bpe_piece(struct enc *e, const char *s, size_t len)
{
    const se_tokenizer_t *t = e->tok;
    if (len == 0)
        return 0;
    if (t->byte_level_model) {
        if (t->ignore_merges) {
            struct se__buf *m = &e->mapped;
            m->len = 0;
            for (size_t i = 0; i < len; i++) {
                char u[4];
                size_t ul = se__utf8_put(se__byte_to_cp((unsigned char)s[i]), u);
                if (se__buf_add(m, u, ul))
                    return SP_ENOMEM;
            }
            int32_t id = se__strmap_get(&t->vocab, t, m->p, m->len);
            if (id >= 0)
                return push_ids(e, &id, 1);
        }
    } else if (t->ignore_merges) {
        int32_t id = se__strmap_get(&t->vocab, t, s, len);
        if (id >= 0)
            return push_ids(e, &id, 1);
    }
    if (reserve_syms(e, len + 1)) /* at most one symbol per byte */
        return SP_ENOMEM;
    size_t n = 0;
    if (t->byte_level_model) {
        for (size_t i = 0; i < len; i++) {
            int32_t id = t->byte_sym[(unsigned char)s[i]];
            if (id >= 0)
                e->sym_id[n++] = id;
            else if (t->unk >= 0 && !(t->fuse_unk && n > 0 && e->sym_id[n - 1] == t->unk))
                e->sym_id[n++] = t->unk;
        }
    } else {
        for (size_t i = 0; i < len;) {
            size_t cl = se__utf8_valid_len((const unsigned char *)s + i, len - i);
            if (cl == 0)
                cl = 1;
            add_char_symbols(e, s + i, cl, &n);
            i += cl;
        }
    }
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++) {
        e->sym_prev[i] = (int32_t)i - 1;
        e->sym_next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    e->n_heap = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if (try_pair(e, (int32_t)i))
            return SP_ENOMEM;
    while (e->n_heap) {
        struct heap_item it = heap_pop(e);
        /* Skip stale candidates: a side was merged away or changed. */
        if (e->sym_id[it.left] != it.left_id || e->sym_next[it.left] != it.right ||
            e->sym_id[it.right] != it.right_id)
            continue;
        e->sym_id[it.left] = it.merged;
        int32_t after = e->sym_next[it.right];
        e->sym_next[it.left] = after;
        if (after >= 0)
            e->sym_prev[after] = it.left;
        e->sym_id[it.right] = -1;
        e->sym_next[it.right] = -2;
        if (e->sym_prev[it.left] >= 0 && try_pair(e, e->sym_prev[it.left]))
            return SP_ENOMEM;
        if (try_pair(e, it.left))
            return SP_ENOMEM;
    }
    for (int32_t i = 0; i >= 0; i = e->sym_next[i])
        if (push_ids(e, &e->sym_id[i], 1))
            return SP_ENOMEM;
    return 0;
}

/* ---- the pipeline ---- */

/* BPE word by word, cutting before each "▁" that follows another character (see sp_word_split). */
static int bpe_words(struct enc *e, const char *s, size_t n)
{
    static const char mark[] = "\xe2\x96\x81";
    size_t w = 0;
    for (const char *q = memmem(s, n, mark, 3); q;
         q = memmem(q + 3, n - (size_t)(q + 3 - s), mark, 3)) {
        size_t at = (size_t)(q - s);
        if (at > w && !(at >= 3 && memcmp(s + at - 3, mark, 3) == 0)) {
            int rc = bpe_piece(e, s + w, at - w);
            if (rc)
                return rc;
            w = at;
        }
    }
    return bpe_piece(e, s + w, n - w);
}

/* A normalized sub-section without added tokens: pre-tokenize and run the model. */
static int encode_plain(struct enc *e, const char *s, size_t n, bool first_section)
{
    const se_tokenizer_t *t = e->tok;
    e->arena[0].len = 0;
    e->pieces[0].n = 0;
    if (se__buf_add(&e->arena[0], s, n) || push_span(&e->pieces[0], 0, n))
        return SP_ENOMEM;
    int cur = 0;
    for (size_t k = 0; k < t->n_pre; k++) {
        int rc = pre_step(e, &t->pre[k], first_section, cur);
        if (rc)
            return rc;
        cur = !cur;
    }
    if (t->n_pre == 0 && t->sp_word_split)
        return bpe_words(e, s, n);
    for (size_t k = 0; k < e->pieces[cur].n; k++) {
        struct span sp = e->pieces[cur].v[k];
        int rc = bpe_piece(e, e->arena[cur].p + sp.off, sp.len);
        if (rc)
            return rc;
    }
    return 0;
}

/* A section of the raw text without unnormalized added tokens. */
static int encode_section(struct enc *e, const char *s, size_t n, bool first_section)
{
    const se_tokenizer_t *t = e->tok;
    if (n == 0)
        return 0;
    int rc = normalize(e, s, n);
    if (rc)
        return rc;
    /* The normalized text is copied, since encode_plain reuses e->norm's neighbours. */
    size_t nl = e->norm.len;
    char *ns = malloc(nl + 1);
    if (!ns)
        return SP_ENOMEM;
    memcpy(ns, e->norm.p, nl + 1);
    size_t pos = 0;
    bool any_normalized = false;
    for (size_t k = 0; k < t->n_added; k++)
        any_normalized |= t->added_tok[k].normalized;
    while (pos < nl && !rc) {
        size_t ms = nl, me = nl;
        int32_t id = -1;
        bool hit = any_normalized && find_added(t, true, ns, pos, nl, pos, &ms, &me, &id);
        if (!hit)
            ms = me = nl;
        if (ms > pos)
            rc = encode_plain(e, ns + pos, ms - pos, first_section && pos == 0);
        if (!rc && hit)
            rc = push_ids(e, &id, 1);
        pos = me;
    }
    free(ns);
    return rc;
}

static void enc_free(struct enc *e)
{
    free(e->clean.p);
    free(e->norm.p);
    free(e->arena[0].p);
    free(e->arena[1].p);
    free(e->pieces[0].v);
    free(e->pieces[1].v);
    free(e->mapped.p);
    free(e->sym_id);
    free(e->sym_prev);
    free(e->sym_next);
    free(e->heap);
    if (e->md)
        pcre2_match_data_free(e->md);
    if (e->mctx)
        pcre2_match_context_free(e->mctx);
    if (e->jit)
        pcre2_jit_stack_free(e->jit);
}

int se_tokenizer_encode(const se_tokenizer_t *tok, const char *text, size_t len, bool add_special,
                        int32_t **ids, size_t *n)
{
    struct enc e = {.tok = tok};
    *ids = NULL;
    *n = 0;
    if (!text && len)
        return SP_EINVAL;
    int rc = 0;
    /* Invalid UTF-8 is replaced by U+FFFD first (see the header). */
    for (size_t i = 0; i < len;) {
        size_t cl = se__utf8_valid_len((const unsigned char *)text + i, len - i);
        if (cl == 0) {
            se__utf8_lossy(&e.clean, (const unsigned char *)text, len, true);
            if (!e.clean.p)
                return SP_ENOMEM;
            text = e.clean.p;
            len = e.clean.len;
            break;
        }
        i += cl;
    }
    e.md = pcre2_match_data_create(4, NULL);
    e.mctx = pcre2_match_context_create(NULL);
    e.jit = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
    if (!e.md || !e.mctx || !e.jit) {
        enc_free(&e);
        return SP_ENOMEM;
    }
    pcre2_jit_stack_assign(e.mctx, NULL, e.jit);
    if (add_special)
        rc = push_ids(&e, tok->post_pre, tok->n_post_pre);
    size_t pos = 0;
    while (pos < len && !rc) {
        size_t ms = len, me = len;
        int32_t id = -1;
        bool hit = find_added(tok, false, text, pos, len, pos, &ms, &me, &id);
        if (!hit)
            ms = me = len;
        if (ms > pos)
            rc = encode_section(&e, text + pos, ms - pos, pos == 0);
        if (!rc && hit)
            rc = push_ids(&e, &id, 1);
        pos = me;
    }
    if (!rc && add_special)
        rc = push_ids(&e, tok->post_post, tok->n_post_post);
    if (!rc && e.rc)
        rc = e.rc;
    if (rc) {
        free(e.ids);
        enc_free(&e);
        return rc;
    }
    enc_free(&e);
    if (!e.ids)
        e.ids = malloc(sizeof(int32_t)); /* a valid pointer even for no ids */
    if (!e.ids)
        return SP_ENOMEM;
    *ids = e.ids;
    *n = e.n_ids;
    return 0;
}
