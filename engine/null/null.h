/*
 * The null backend: implements backend.h without arithmetic, to measure the
 * engine's and the job system's own overhead without a model, and to test
 * the KV bookkeeping fast.
 *
 * Each KV slot holds one 64-bit value: for the token t at position p,
 * h(p) = mix(h(p - 1) read back from the cache through the block table,
 * t, p). The logits of a row are 0 except for token h % vocab_size, at 30:
 * so the next token is a deterministic function of the whole sequence, and
 * a wrong block table, a stale shared block or a lost block changes it.
 * Every forward pass sleeps step_us microseconds (the "model" rate). Block
 * ids are checked: an out-of-range id fails the pass with SP_EBACKEND.
 */
#ifndef SPOOL_ENGINE_NULL_H
#define SPOOL_ENGINE_NULL_H

#include "../backend.h"

/* Fills *out (free with out->i->free(out->ctx)); 0 or SP_ENOMEM. */
int se__backend_null_new(int step_us, struct se_backend *out);

#endif
