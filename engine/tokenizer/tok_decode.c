/*
 * Decoding: ids -> text. se_tokenizer_decode is the streaming decoder fed all
 * ids at once, so the two agree by construction: bytes of an incomplete UTF-8
 * character wait in d->pending until the next token completes them, or are
 * replaced by U+FFFD where the full decode would replace them (at the end,
 * before an added token in byte-level decoding, before a non-byte token after
 * byte fallback).
 */
#include "tok_internal.h"

#include "spool/error.h"

#include <stdlib.h>
#include <string.h>

struct se_detok {
    const se_tokenizer_t *tok;
    bool skip_special;
    struct se__buf pending; /* raw bytes not yet decided */
    struct se__buf out;     /* text completed by the current call */
    struct se__buf tmp;
    int strip_left; /* leading spaces of the whole text still to strip */
    bool first;     /* the next token is the first one decoded */
};

static void detok_init(se_detok_t *d, const se_tokenizer_t *tok, bool skip_special)
{
    memset(d, 0, sizeof *d);
    d->tok = tok;
    d->skip_special = skip_special;
    d->strip_left = tok->dec == SE_DEC_SP ? tok->dec_strip_start : 0;
    d->first = true;
}

static void detok_release(se_detok_t *d)
{
    free(d->pending.p);
    free(d->out.p);
    free(d->tmp.p);
}

/* Appends finished text to the output, applying the decoder's leading Strip. */
static int emit(se_detok_t *d, const char *s, size_t n)
{
    while (d->strip_left > 0 && n > 0) {
        if (*s != ' ') {
            d->strip_left = 0;
            break;
        }
        s++;
        n--;
        d->strip_left--;
    }
    return se__buf_add(&d->out, s, n);
}

/* Decides what it can of the pending bytes; with final, all of them. */
static int drain(se_detok_t *d, bool final)
{
    if (d->pending.len == 0)
        return 0;
    d->tmp.len = 0;
    size_t used =
        se__utf8_lossy(&d->tmp, (const unsigned char *)d->pending.p, d->pending.len, final);
    if (d->tmp.len && emit(d, d->tmp.p, d->tmp.len))
        return SP_ENOMEM;
    memmove(d->pending.p, d->pending.p + used, d->pending.len - used);
    d->pending.len -= used;
    return 0;
}

static int byte_of_fallback(const char *p, size_t n)
{
    if (n != 6 || memcmp(p, "<0x", 3) != 0 || p[5] != '>')
        return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = p[i];
        int x = c >= '0' && c <= '9'   ? c - '0'
                : c >= 'A' && c <= 'F' ? c - 'A' + 10
                : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                       : -1;
        if (x < 0)
            return -1;
        v = v * 16 + x;
    }
    return v;
}

static int feed_bytelevel(se_detok_t *d, int32_t id)
{
    const se_tokenizer_t *t = d->tok;
    const char *p = t->piece[id];
    size_t n = t->piece_len[id];
    if (t->added[id]) {
        /* Added tokens are text as written; pending bytes end before them. */
        if (drain(d, true))
            return SP_ENOMEM;
        return emit(d, p, n);
    }
    if (se__buf_reserve(&d->pending, n))
        return SP_ENOMEM;
    size_t start = d->pending.len;
    for (size_t i = 0; i < n;) {
        size_t cl = se__utf8_valid_len((const unsigned char *)p + i, n - i);
        uint32_t cp = cl ? se__utf8_get((const unsigned char *)p + i, &cl) : 0xFFFFFFFFu;
        int b = cp < 324 ? t->unbyte[cp] : -1;
        if (b < 0) {
            /* Not a byte-level piece: its own bytes stand (as Hugging Face does). */
            d->pending.len = start;
            se__buf_add(&d->pending, p, n);
            break;
        }
        d->pending.p[d->pending.len++] = (char)b;
        i += cl;
    }
    return drain(d, false);
}

static int feed_sp(se_detok_t *d, int32_t id)
{
    const se_tokenizer_t *t = d->tok;
    const char *p = t->piece[id];
    size_t n = t->piece_len[id];
    bool first = d->first;
    d->first = false;
    int b = t->dec_byte_fallback ? byte_of_fallback(p, n) : -1;
    if (b >= 0) {
        char c = (char)b;
        if (se__buf_add(&d->pending, &c, 1))
            return SP_ENOMEM;
        return drain(d, false);
    }
    if (drain(d, true))
        return SP_ENOMEM;
    const char *from = t->dec_replace_from;
    size_t fl = from ? strlen(from) : 0;
    struct se__buf *o = &d->tmp;
    o->len = 0;
    if (se__buf_add(o, "", 0))
        return SP_ENOMEM;
    for (size_t i = 0; i < n;) {
        const char *hit = fl ? memmem(p + i, n - i, from, fl) : NULL;
        size_t stop = hit ? (size_t)(hit - p) : n;
        if (se__buf_add(o, p + i, stop - i))
            return SP_ENOMEM;
        if (!hit)
            break;
        if (se__buf_add(o, t->dec_replace_to, strlen(t->dec_replace_to)))
            return SP_ENOMEM;
        i = stop + fl;
    }
    const char *s = o->p;
    size_t len = o->len;
    if (first && t->dec_strip_first && len && s[0] == ' ') {
        s++;
        len--;
    }
    return emit(d, s, len);
}

static int feed(se_detok_t *d, int32_t id)
{
    const se_tokenizer_t *t = d->tok;
    if (id < 0 || id >= t->n_vocab || !t->piece[id])
        return SP_EINVAL;
    if (d->skip_special && t->special[id])
        return 0;
    switch (t->dec) {
    case SE_DEC_BYTELEVEL:
        return feed_bytelevel(d, id);
    case SE_DEC_SP:
        return feed_sp(d, id);
    case SE_DEC_NONE:
    default:
        /* Without a decoder, Hugging Face joins the pieces with spaces. */
        if (!d->first && emit(d, " ", 1))
            return SP_ENOMEM;
        d->first = false;
        return emit(d, t->piece[id], t->piece_len[id]);
    }
}

int se_tokenizer_decode(const se_tokenizer_t *tok, const int32_t *ids, size_t n, bool skip_special,
                        char **text, size_t *len)
{
    se_detok_t d;
    detok_init(&d, tok, skip_special);
    *text = NULL;
    *len = 0;
    int rc = se__buf_add(&d.out, "", 0);
    for (size_t i = 0; i < n && !rc; i++)
        rc = feed(&d, ids[i]);
    if (!rc)
        rc = drain(&d, true);
    if (rc) {
        detok_release(&d);
        return rc;
    }
    *text = d.out.p;
    *len = d.out.len;
    d.out.p = NULL;
    detok_release(&d);
    return 0;
}

se_detok_t *se_detok_new(const se_tokenizer_t *tok, bool skip_special)
{
    se_detok_t *d = malloc(sizeof *d);
    if (!d)
        return NULL;
    detok_init(d, tok, skip_special);
    if (se__buf_reserve(&d->out, 256) || se__buf_reserve(&d->pending, 16) ||
        se__buf_reserve(&d->tmp, 256)) {
        se_detok_free(d);
        return NULL;
    }
    return d;
}

int se_detok_push(se_detok_t *d, int32_t id, const char **out, size_t *len)
{
    d->out.len = 0;
    d->out.p[0] = '\0';
    int rc = feed(d, id);
    *out = d->out.p;
    *len = rc ? 0 : d->out.len;
    return rc;
}

int se_detok_finish(se_detok_t *d, const char **out, size_t *len)
{
    d->out.len = 0;
    d->out.p[0] = '\0';
    int rc = drain(d, true);
    *out = d->out.p;
    *len = rc ? 0 : d->out.len;
    return rc;
}

void se_detok_free(se_detok_t *d)
{
    if (!d)
        return;
    detok_release(d);
    free(d);
}
