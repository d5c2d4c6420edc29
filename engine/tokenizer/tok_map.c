/* Open-addressing hash maps for the vocabulary and the merge table. */
#include "tok_internal.h"

#include "spool/error.h"

#include <stdlib.h>
#include <string.h>

uint64_t se__hash(const char *s, size_t n)
{
    /* FNV-1a with a final avalanche; pieces are short, so this is fast enough. */
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    return h;
}

static size_t capacity_for(size_t expected)
{
    size_t cap = 16;
    while (cap < expected * 2 + 1)
        cap <<= 1;
    return cap;
}

int se__strmap_init(struct se__strmap *m, size_t expected)
{
    size_t cap = capacity_for(expected);
    m->slots = malloc(cap * sizeof *m->slots);
    if (!m->slots)
        return SP_ENOMEM;
    memset(m->slots, 0xff, cap * sizeof *m->slots);
    m->mask = cap - 1;
    m->count = 0;
    return 0;
}

void se__strmap_free(struct se__strmap *m)
{
    free(m->slots);
    m->slots = NULL;
}

void se__strmap_put(struct se__strmap *m, const se_tokenizer_t *tok, int32_t id)
{
    const char *s = tok->piece[id];
    size_t n = tok->piece_len[id];
    for (size_t i = se__hash(s, n) & m->mask;; i = (i + 1) & m->mask) {
        int32_t cur = m->slots[i];
        if (cur < 0) {
            m->slots[i] = id;
            m->count++;
            return;
        }
        if (tok->piece_len[cur] == n && memcmp(tok->piece[cur], s, n) == 0)
            return;
    }
}

int32_t se__strmap_get(const struct se__strmap *m, const se_tokenizer_t *tok, const char *s,
                       size_t n)
{
    for (size_t i = se__hash(s, n) & m->mask;; i = (i + 1) & m->mask) {
        int32_t cur = m->slots[i];
        if (cur < 0)
            return -1;
        if (tok->piece_len[cur] == n && memcmp(tok->piece[cur], s, n) == 0)
            return cur;
    }
}

int se__pairmap_init(struct se__pairmap *m, size_t expected)
{
    size_t cap = capacity_for(expected);
    m->keys = calloc(cap, sizeof *m->keys);
    m->rank = malloc(cap * sizeof *m->rank);
    m->merged = malloc(cap * sizeof *m->merged);
    m->mask = cap - 1;
    if (!m->keys || !m->rank || !m->merged) {
        se__pairmap_free(m);
        return SP_ENOMEM;
    }
    return 0;
}

void se__pairmap_free(struct se__pairmap *m)
{
    free(m->keys);
    free(m->rank);
    free(m->merged);
    m->keys = NULL;
    m->rank = m->merged = NULL;
}

static uint64_t pair_key(int32_t a, int32_t b)
{
    return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
}

static size_t pair_slot(uint64_t key, size_t mask)
{
    uint64_t h = key * 0x9e3779b97f4a7c15ull;
    return (size_t)(h ^ (h >> 29)) & mask;
}

bool se__pairmap_put(struct se__pairmap *m, int32_t a, int32_t b, int32_t rank, int32_t merged)
{
    uint64_t key = pair_key(a, b);
    for (size_t i = pair_slot(key, m->mask);; i = (i + 1) & m->mask) {
        if (m->keys[i] == 0) {
            m->keys[i] = key;
            m->rank[i] = rank;
            m->merged[i] = merged;
            return true;
        }
        if (m->keys[i] == key)
            return false;
    }
}

int32_t se__pairmap_get(const struct se__pairmap *m, int32_t a, int32_t b, int32_t *merged)
{
    uint64_t key = pair_key(a, b);
    for (size_t i = pair_slot(key, m->mask);; i = (i + 1) & m->mask) {
        if (m->keys[i] == 0)
            return -1;
        if (m->keys[i] == key) {
            *merged = m->merged[i];
            return m->rank[i];
        }
    }
}
