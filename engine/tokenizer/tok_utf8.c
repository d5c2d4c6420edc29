/* UTF-8 helpers and the byte-level alphabet shared by encoding and decoding. */
#include "tok_internal.h"

#include "spool/error.h"

#include <stdlib.h>
#include <string.h>

int se__buf_reserve(struct se__buf *b, size_t extra)
{
    if (b->len + extra + 1 <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p)
        return SP_ENOMEM;
    b->p = p;
    b->cap = cap;
    return 0;
}

int se__buf_add(struct se__buf *b, const void *p, size_t n)
{
    if (se__buf_reserve(b, n))
        return SP_ENOMEM;
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
    b->p[b->len] = '\0';
    return 0;
}

/*
 * Length of the valid prefix of a character at s, following the table of
 * well-formed sequences (Unicode 3.9, table 3-7): returns the full length when
 * the character is complete and valid, and otherwise the negated number of
 * bytes that form a valid but maybe incomplete prefix (0 means s[0] itself is
 * invalid, which the caller replaces by one U+FFFD).
 */
static int char_prefix(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    int need;
    unsigned lo = 0x80, hi = 0xBF;
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        need = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        need = 3;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 4;
        if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
    } else
        return 0;
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= n)
            return -i;
        unsigned x = s[i];
        if (i == 1 ? (x < lo || x > hi) : (x < 0x80 || x > 0xBF))
            return -i;
    }
    return need;
}

size_t se__utf8_valid_len(const unsigned char *s, size_t n)
{
    if (n == 0)
        return 0;
    int k = char_prefix(s, n);
    return k > 0 ? (size_t)k : 0;
}

size_t se__utf8_lossy(struct se__buf *dst, const unsigned char *src, size_t n, bool final)
{
    static const char fffd[3] = {(char)0xEF, (char)0xBF, (char)0xBD};
    size_t i = 0, run = 0;
    while (i < n) {
        int k = char_prefix(src + i, n - i);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        /* Flush the valid run before the bad or incomplete character. */
        if (i > run && se__buf_add(dst, src + run, i - run))
            return run;
        size_t bad = k == 0 ? 1 : (size_t)-k;
        if (!final && i + bad == n) {
            /* A valid prefix cut off by the end of the input: wait for more. */
            return i;
        }
        if (se__buf_add(dst, fffd, 3))
            return i;
        i += bad;
        run = i;
    }
    if (n > run)
        se__buf_add(dst, src + run, n - run);
    return n;
}

size_t se__utf8_put(uint32_t cp, char *out)
{
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

uint32_t se__utf8_get(const unsigned char *s, size_t *len)
{
    unsigned c = s[0];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    if (c < 0xE0) {
        *len = 2;
        return ((c & 0x1Fu) << 6) | (s[1] & 0x3Fu);
    }
    if (c < 0xF0) {
        *len = 3;
        return ((c & 0x0Fu) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3Fu);
    }
    *len = 4;
    return ((c & 0x07u) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3Fu);
}

/*
 * GPT-2's byte-to-unicode table: printable Latin-1 bytes stand for
 * themselves, the other 68 bytes for U+0100 onwards, in byte order.
 */
static bool printable(unsigned b)
{
    return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
}

uint32_t se__byte_to_cp(unsigned b)
{
    if (printable(b))
        return b;
    uint32_t n = 0;
    for (unsigned x = 0; x < b; x++)
        n += !printable(x);
    return 256 + n;
}

int se__cp_to_byte(uint32_t cp)
{
    if (cp < 256)
        return printable(cp) ? (int)cp : -1;
    uint32_t n = 0;
    for (unsigned x = 0; x < 256; x++) {
        if (!printable(x)) {
            if (256 + n == cp)
                return (int)x;
            n++;
        }
    }
    return -1;
}
