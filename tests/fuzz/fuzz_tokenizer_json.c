/*
 * Fuzz driver: a tokenizer.json from arbitrary bytes (se_tokenizer_open_buffer)
 * must load or fail cleanly; when it loads, encoding, decoding, streaming and
 * chat rendering of a few short strings must not crash, and the streaming
 * decoder must agree with the full decode.
 */
#include "spool/tokenizer.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void exercise(const se_tokenizer_t *tok, const char *text, size_t len)
{
    int32_t *ids = NULL;
    size_t n = 0;
    if (se_tokenizer_encode(tok, text, len, true, &ids, &n) != 0)
        return;
    for (int skip = 0; skip < 2; skip++) {
        char *dec = NULL;
        size_t dl = 0;
        if (se_tokenizer_decode(tok, ids, n, skip, &dec, &dl) != 0)
            continue;
        se_detok_t *d = se_detok_new(tok, skip);
        size_t at = 0;
        for (size_t i = 0; d && i <= n; i++) {
            const char *out;
            size_t ol;
            int rc = i < n ? se_detok_push(d, ids[i], &out, &ol) : se_detok_finish(d, &out, &ol);
            if (rc)
                abort();
            if (at + ol > dl || memcmp(dec + at, out, ol) != 0)
                abort(); /* streaming must reproduce the full decode */
            at += ol;
        }
        if (d && at != dl)
            abort();
        se_detok_free(d);
        free(dec);
    }
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[512];
    se_tokenizer_t *tok = NULL;
    if (se_tokenizer_open_buffer((const char *)data, size, NULL, 0, &tok, err, sizeof err) != 0)
        return 0;
    static const char *const texts[] = {"",
                                        "Hello world",
                                        " a  b\n\tc",
                                        "ab<s>ab <|x|>",
                                        "\xc3\xa9t\xc3\xa9 \xe6\x97\xa5\xf0\x9f\x98\x80",
                                        "\xff\xfe bad \xe6\x97"};
    for (size_t i = 0; i < sizeof texts / sizeof texts[0]; i++)
        exercise(tok, texts[i], strlen(texts[i]));
    /* The input itself as text, bounded. */
    exercise(tok, (const char *)data, size < 256 ? size : 256);
    for (int32_t id = -1; id <= se_tokenizer_n_vocab(tok); id++)
        (void)se_tokenizer_piece(tok, id), (void)se_tokenizer_is_special(tok, id);
    struct se_chat_msg m[] = {{"system", "s"}, {"user", "u"}};
    char *text = NULL;
    if (se_chat_render(tok, m, 2, true, &text, err, sizeof err) == 0)
        free(text);
    se_tokenizer_close(tok);
    return 0;
}
