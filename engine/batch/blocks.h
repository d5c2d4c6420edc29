/*
 * The KV block allocator and prefix cache (internal to engine/batch).
 *
 * Every block is in exactly one state: FREE (on the free stack), USED
 * (referenced by ref > 0 sequences) or CACHED (holding a prefix-cache entry,
 * referenced by none, on the LRU list and evictable). A full block whose
 * tokens are known may be published under its chain hash (the hash of its
 * parent block's hash and its own token ids); se__blocks_lookup then hands
 * it to other sequences, reference-counted. Only full blocks are published,
 * so a shared block is never written again. Allocation takes a free block
 * first, else evicts the least recently released cached block.
 *
 * Single-threaded; no allocation after se__blocks_init.
 */
#ifndef SPOOL_ENGINE_BATCH_BLOCKS_H
#define SPOOL_ENGINE_BATCH_BLOCKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct se__blocks {
    int n, bs;
    int *ref;        /* (n) sequences referencing the block */
    bool *published; /* (n) in the hash table */
    uint64_t *hash;  /* (n) chain hash, when published */
    int32_t *toks;   /* (n * bs) token ids, when published (to rule out hash collisions) */
    int *free_stack, n_free;
    int *lru_prev, *lru_next, lru_head, lru_tail, n_cached; /* CACHED blocks, oldest first */
    int *bucket, *chain, n_buckets;                         /* hash table: chains of block ids */
};

/* Returns 0 or SP_ENOMEM; se__blocks_free releases the arrays (also after a failed init). */
int se__blocks_init(struct se__blocks *b, int n, int bs);
void se__blocks_free(struct se__blocks *b);

/* The chain hash of a block of bs tokens after a block whose hash is parent (0 for the first). */
uint64_t se__block_hash(uint64_t parent, const int32_t *toks, int bs);

/* Blocks that se__blocks_alloc can still hand out (free + cached). */
int se__blocks_available(const struct se__blocks *b);

/* Takes a block (ref 1), evicting a cached one if none is free; -1 when none is left. */
int se__blocks_alloc(struct se__blocks *b);

/* Drops one reference; at 0 a published block becomes CACHED, any other FREE. */
void se__blocks_release(struct se__blocks *b, int id);

/* The published block with this hash and these tokens, with one more reference; or -1. */
int se__blocks_lookup(struct se__blocks *b, uint64_t h, const int32_t *toks);

/* True when a block with this hash and tokens is published. */
bool se__blocks_contains(const struct se__blocks *b, uint64_t h, const int32_t *toks);

/*
 * Publishes used block id (now full and never to be written again) under h.
 * Does nothing when an identical block is already published (id then stays
 * private and is freed on release).
 */
void se__blocks_publish(struct se__blocks *b, int id, uint64_t h, const int32_t *toks);

/*
 * Recounts every block's state. Returns 0 and the counts, or -1 with why
 * (a block in two states or none, a list out of order) written to err.
 */
int se__blocks_check(const struct se__blocks *b, int *n_free, int *n_cached, int *n_used, char *err,
                     size_t errcap);

#endif
