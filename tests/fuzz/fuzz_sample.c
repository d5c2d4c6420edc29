/*
 * Fuzz driver for the sampler. The first byte picks what to drive:
 * even: se_stop_find on fuzzed stop strings and text, checked against a
 * brute-force search (earliest match; the held-back tail; never ending inside
 * a character of valid UTF-8); odd: se_sample on fuzzed logits (with NaN,
 * +-inf) and parameters, checked for a valid token and sane log-probabilities.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "spool/error.h"
#include "spool/sample.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool valid_utf8_boundary(const uint8_t *t, size_t len, size_t pos)
{
    return pos == len || (t[pos] & 0xC0) != 0x80;
}

static bool is_valid_utf8(const uint8_t *t, size_t len)
{
    for (size_t i = 0; i < len;) {
        size_t n = t[i] < 0x80                    ? 1
                   : t[i] >= 0xC2 && t[i] <= 0xDF ? 2
                   : t[i] >= 0xE0 && t[i] <= 0xEF ? 3
                   : t[i] >= 0xF0 && t[i] <= 0xF4 ? 4
                                                  : 0;
        if (n == 0 || i + n > len)
            return false;
        for (size_t j = 1; j < n; j++)
            if ((t[i + j] & 0xC0) != 0x80)
                return false;
        i += n;
    }
    return true;
}

static void drive_stop(const uint8_t *data, size_t size)
{
    static char stops[SE_MAX_STOP][9];
    struct se_sampling s;
    se_sampling_default(&s);
    size_t p = 0;
    s.n_stop = size > 0 ? data[p++] % 5 : 0;
    for (int i = 0; i < s.n_stop; i++) {
        size_t len = p < size ? 1 + data[p++] % 8 : 1;
        for (size_t j = 0; j < len; j++) {
            uint8_t c = p < size ? data[p++] : 'a';
            stops[i][j] = c ? (char)c : 'a';
        }
        stops[i][len] = '\0';
        s.stop[i] = stops[i];
    }
    char err[256];
    (void)se_sampling_validate(&s, 10, err, sizeof(err));
    const uint8_t *text = data + p;
    size_t len = size - p, safe = 0;
    long found = se_stop_find(&s, (const char *)text, len, &safe);

    /* Brute force: earliest match, and the longest tail that is a proper prefix. */
    long want = -1;
    size_t hold = 0;
    for (int i = 0; i < s.n_stop; i++) {
        size_t sl = strlen(s.stop[i]);
        for (size_t o = 0; o + sl <= len; o++)
            if (memcmp(text + o, s.stop[i], sl) == 0 && (want < 0 || (long)o < want)) {
                want = (long)o;
                break;
            }
        for (size_t j = 1; j < sl && j <= len; j++)
            if (memcmp(text + len - j, s.stop[i], j) == 0 && j > hold)
                hold = j;
    }
    if (found != want)
        abort();
    size_t limit = want >= 0 ? (size_t)want : len - hold;
    if (safe > limit || safe + 3 < limit)
        abort();
    if (is_valid_utf8(text, len) && !valid_utf8_boundary(text, len, safe))
        abort();
}

static float byte_logit(uint8_t b)
{
    switch (b) {
    case 255:
        return -INFINITY;
    case 254:
        return NAN;
    case 253:
        return INFINITY;
    default:
        return ((float)b - 128.0f) / 8.0f;
    }
}

static void drive_sample(const uint8_t *data, size_t size)
{
    if (size < 12)
        return;
    int n_vocab = 1 + data[0] % 64;
    struct se_sampling s;
    se_sampling_default(&s);
    s.temperature = (float)data[1] / 50.0f;
    s.top_k = data[2] % (n_vocab + 2);
    s.top_p = ((float)data[3] + 1.0f) / 256.0f;
    s.min_p = (float)data[4] / 256.0f;
    s.repetition_penalty = 0.5f + (float)data[5] / 64.0f;
    s.presence_penalty = ((float)data[6] - 128.0f) / 64.0f;
    s.frequency_penalty = ((float)data[7] - 128.0f) / 64.0f;
    s.logprobs = data[8] % (SE_MAX_LOGPROBS + 1);
    s.seed = data[9];
    size_t n_hist = data[10] % 16, n_prompt = n_hist / 2;
    data += 11;
    size = size - 11;
    char err[256];
    if (se_sampling_validate(&s, n_vocab, err, sizeof(err)) != 0)
        return;
    float logits[64];
    int32_t hist[16];
    bool bad = false;
    for (int i = 0; i < n_vocab; i++) {
        logits[i] = byte_logit(i < (int)size ? data[i] : 0);
        bad |= isnan(logits[i]) || logits[i] == INFINITY;
    }
    for (size_t i = 0; i < n_hist; i++)
        hist[i] = (int32_t)((i + (size > 0 ? data[(i * 7) % size] : 0)) % (size_t)n_vocab);
    se_sampler_t *sm = se_sampler_new(n_vocab);
    if (!sm)
        abort();
    struct se_sample_result r;
    int rc = se_sample(sm, &s, logits, hist, n_prompt, hist + n_prompt, n_hist - n_prompt, &r);
    if (rc == 0) {
        if (bad || r.token < 0 || r.token >= n_vocab || !(r.logprob <= 1e-5f) ||
            logits[r.token] == -INFINITY)
            abort();
        for (int j = 1; j < r.n_top; j++)
            if (r.top_logprobs[j] > r.top_logprobs[j - 1])
                abort();
    } else if (rc != SP_EBACKEND) {
        abort();
    }
    se_sampler_free(sm);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size == 0)
        return 0;
    if (data[0] & 1)
        drive_sample(data + 1, size - 1);
    else
        drive_stop(data + 1, size - 1);
    return 0;
}
