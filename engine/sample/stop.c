/*
 * Stop strings over streamed text. The caller keeps the text it has not yet
 * emitted (the held-back tail of the previous call plus the new piece) and
 * passes only that: a stop string cannot begin in text already emitted,
 * because se_stop_find holds back every tail that could grow into one, so
 * each call costs O(held text x stop strings), not O(whole generation).
 */
#include <string.h>

#include "spool/sample.h"

/* Length of the UTF-8 sequence a lead byte announces (1 for ASCII and for bytes that cannot lead).
 */
static size_t utf8_len(unsigned char c)
{
    if (c >= 0xF0 && c <= 0xF7)
        return 4;
    if (c >= 0xE0)
        return c <= 0xEF ? 3 : 1;
    if (c >= 0xC0)
        return 2;
    return 1;
}

/*
 * Moves pos back to the start of the character it falls in, or to the start
 * of the last character when that character is still incomplete at the end
 * of the text. Invalid bytes count as characters of their own.
 */
static size_t utf8_floor(const unsigned char *t, size_t len, size_t pos)
{
    size_t start = pos;
    if (pos < len && (t[pos] & 0xC0) != 0x80)
        return pos; /* a character starts here */
    /* Find the lead byte of the character containing pos (or ending the text). */
    for (size_t back = 0; back < 4 && start > 0; back++) {
        start--;
        if ((t[start] & 0xC0) != 0x80) {
            size_t need = utf8_len(t[start]);
            if (need == 1 || start + need <= pos)
                return pos; /* pos is just after a complete (or invalid) character */
            return start;
        }
    }
    return pos; /* stray continuation bytes: nothing to wait for */
}

long se_stop_find(const struct se_sampling *s, const char *text, size_t len, size_t *safe)
{
    const unsigned char *t = (const unsigned char *)text;
    long found = -1;
    size_t hold = 0; /* longest tail of text that is a proper prefix of a stop string */
    for (int i = 0; s && i < s->n_stop; i++) {
        const char *stop = s->stop[i];
        if (!stop || !stop[0])
            continue;
        size_t sl = strlen(stop);
        const char *hit = memmem(text, len, stop, sl);
        if (hit && (found < 0 || hit - text < found))
            found = hit - text;
        /* Tails of length min(sl - 1, len) down to hold + 1. */
        for (size_t j = sl - 1 < len ? sl - 1 : len; j > hold; j--) {
            if (memcmp(text + len - j, stop, j) == 0) {
                hold = j;
                break;
            }
        }
    }
    if (safe)
        *safe = utf8_floor(t, len, found >= 0 ? (size_t)found : len - hold);
    return found;
}
