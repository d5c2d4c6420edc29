/* The KV block allocator and prefix cache; see blocks.h. */
#include "blocks.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool/error.h"

int se__blocks_init(struct se__blocks *b, int n, int bs)
{
    memset(b, 0, sizeof(*b));
    b->n = n;
    b->bs = bs;
    b->n_buckets = 16;
    while (b->n_buckets < 2 * n)
        b->n_buckets *= 2;
    b->ref = calloc((size_t)n, sizeof(int));
    b->published = calloc((size_t)n, sizeof(bool));
    b->hash = calloc((size_t)n, sizeof(uint64_t));
    b->toks = calloc((size_t)n * (size_t)bs, sizeof(int32_t));
    b->free_stack = malloc((size_t)n * sizeof(int));
    b->lru_prev = malloc((size_t)n * sizeof(int));
    b->lru_next = malloc((size_t)n * sizeof(int));
    b->chain = malloc((size_t)n * sizeof(int));
    b->bucket = malloc((size_t)b->n_buckets * sizeof(int));
    if (!b->ref || !b->published || !b->hash || !b->toks || !b->free_stack || !b->lru_prev ||
        !b->lru_next || !b->chain || !b->bucket)
        return SP_ENOMEM;
    /* A stack: blocks are handed out from the top, n - 1 first. */
    for (int i = 0; i < n; i++)
        b->free_stack[b->n_free++] = i;
    for (int i = 0; i < b->n_buckets; i++)
        b->bucket[i] = -1;
    b->lru_head = b->lru_tail = -1;
    return 0;
}

void se__blocks_free(struct se__blocks *b)
{
    free(b->ref);
    free(b->published);
    free(b->hash);
    free(b->toks);
    free(b->free_stack);
    free(b->lru_prev);
    free(b->lru_next);
    free(b->chain);
    free(b->bucket);
    memset(b, 0, sizeof(*b));
}

static uint64_t mix(uint64_t x)
{
    /* splitmix64's finaliser. */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

uint64_t se__block_hash(uint64_t parent, const int32_t *toks, int bs)
{
    uint64_t h = mix(parent ^ 0x9e3779b97f4a7c15ULL);
    for (int i = 0; i < bs; i++)
        h = mix(h ^ (uint32_t)toks[i]) + (uint64_t)i;
    return h;
}

int se__blocks_available(const struct se__blocks *b)
{
    return b->n_free + b->n_cached;
}

static void lru_unlink(struct se__blocks *b, int id)
{
    int p = b->lru_prev[id], n = b->lru_next[id];
    if (p >= 0)
        b->lru_next[p] = n;
    else
        b->lru_head = n;
    if (n >= 0)
        b->lru_prev[n] = p;
    else
        b->lru_tail = p;
    b->n_cached--;
}

static void lru_append(struct se__blocks *b, int id)
{
    b->lru_prev[id] = b->lru_tail;
    b->lru_next[id] = -1;
    if (b->lru_tail >= 0)
        b->lru_next[b->lru_tail] = id;
    else
        b->lru_head = id;
    b->lru_tail = id;
    b->n_cached++;
}

static void unpublish(struct se__blocks *b, int id)
{
    int *pp = &b->bucket[b->hash[id] & (uint64_t)(b->n_buckets - 1)];
    while (*pp != id)
        pp = &b->chain[*pp];
    *pp = b->chain[id];
    b->published[id] = false;
}

int se__blocks_alloc(struct se__blocks *b)
{
    int id;
    if (b->n_free > 0) {
        id = b->free_stack[--b->n_free];
    } else if (b->lru_head >= 0) {
        id = b->lru_head;
        lru_unlink(b, id);
        unpublish(b, id);
    } else {
        return -1;
    }
    b->ref[id] = 1;
    return id;
}

void se__blocks_release(struct se__blocks *b, int id)
{
    if (--b->ref[id] > 0)
        return;
    if (b->published[id])
        lru_append(b, id);
    else
        b->free_stack[b->n_free++] = id;
}

static int find(const struct se__blocks *b, uint64_t h, const int32_t *toks)
{
    for (int id = b->bucket[h & (uint64_t)(b->n_buckets - 1)]; id >= 0; id = b->chain[id])
        if (b->hash[id] == h &&
            !memcmp(b->toks + (size_t)id * (size_t)b->bs, toks, (size_t)b->bs * sizeof(int32_t)))
            return id;
    return -1;
}

bool se__blocks_contains(const struct se__blocks *b, uint64_t h, const int32_t *toks)
{
    return find(b, h, toks) >= 0;
}

int se__blocks_lookup(struct se__blocks *b, uint64_t h, const int32_t *toks)
{
    int id = find(b, h, toks);
    if (id < 0)
        return -1;
    if (b->ref[id]++ == 0)
        lru_unlink(b, id);
    return id;
}

void se__blocks_publish(struct se__blocks *b, int id, uint64_t h, const int32_t *toks)
{
    if (b->published[id] || find(b, h, toks) >= 0)
        return;
    b->hash[id] = h;
    memcpy(b->toks + (size_t)id * (size_t)b->bs, toks, (size_t)b->bs * sizeof(int32_t));
    int *bk = &b->bucket[h & (uint64_t)(b->n_buckets - 1)];
    b->chain[id] = *bk;
    *bk = id;
    b->published[id] = true;
}

int se__blocks_check(const struct se__blocks *b, int *n_free, int *n_cached, int *n_used, char *err,
                     size_t errcap)
{
    /* seen[i]: 1 on the free stack, 2 on the LRU list; each block must be in one state. */
    unsigned char *seen = calloc((size_t)b->n, 1);
    if (!seen) {
        snprintf(err, errcap, "out of memory checking the KV blocks");
        return -1;
    }
    int rc = -1, nc = 0, nu = 0;
    for (int i = 0; i < b->n_free; i++) {
        int id = b->free_stack[i];
        if (id < 0 || id >= b->n || seen[id] || b->ref[id] || b->published[id]) {
            snprintf(err, errcap, "KV block %d on the free stack is also in use or listed twice",
                     id);
            goto out;
        }
        seen[id] = 1;
    }
    int prev = -1;
    for (int id = b->lru_head; id >= 0; prev = id, id = b->lru_next[id]) {
        if (seen[id] || b->ref[id] || !b->published[id] || b->lru_prev[id] != prev) {
            snprintf(err, errcap, "KV block %d on the LRU list is also free, in use or unlinked",
                     id);
            goto out;
        }
        seen[id] = 2;
        nc++;
    }
    if (prev != b->lru_tail || nc != b->n_cached) {
        snprintf(err, errcap, "the LRU list holds %d blocks, its count says %d", nc, b->n_cached);
        goto out;
    }
    for (int id = 0; id < b->n; id++) {
        if (seen[id])
            continue;
        if (b->ref[id] <= 0) {
            snprintf(err, errcap, "KV block %d is lost: neither free, cached nor referenced", id);
            goto out;
        }
        nu++;
    }
    *n_free = b->n_free;
    *n_cached = nc;
    *n_used = nu;
    rc = 0;
out:
    free(seen);
    return rc;
}
