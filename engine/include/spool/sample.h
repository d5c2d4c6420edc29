/*
 * Sampling: choosing the next token from logits.
 *
 * Randomness is a pure function of (seed, position): the uniform draw for the
 * token at position p (its index in prompt + generated tokens) depends on
 * nothing else, so a generation interrupted after k tokens and resumed from
 * prompt + those k tokens continues exactly as if never interrupted, on any
 * worker and in any batch.
 *
 * Order of operations (as in vLLM / Hugging Face): penalties (repetition,
 * presence, frequency) on the raw logits, then temperature, then top-k, top-p
 * and min-p filtering, then a draw. temperature == 0 is greedy (argmax after
 * penalties; ties go to the lowest id).
 *
 * The exact definition (the RNG, the order of candidates, the draw) is in
 * docs/architecture.md, "Sampling"; the CUDA sampler implements the same one.
 */
#ifndef SPOOL_SAMPLE_H
#define SPOOL_SAMPLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SE_MAX_LOGPROBS 20
#define SE_MAX_STOP     16

struct se_sampling {
    float temperature;        /* 0 = greedy; default 1 */
    int top_k;                /* 0 = off */
    float top_p;              /* in (0, 1]; 1 = off */
    float min_p;              /* in [0, 1); 0 = off */
    float repetition_penalty; /* > 0; 1 = off; over prompt and generated tokens */
    float presence_penalty;   /* in [-2, 2]; 0 = off; over generated tokens */
    float frequency_penalty;  /* in [-2, 2]; 0 = off; over generated tokens */
    uint64_t seed;
    int max_tokens;           /* > 0 */
    int logprobs;             /* 0..SE_MAX_LOGPROBS alternatives to report */
    bool ignore_eos;
    int n_stop_ids;           /* extra stop token ids, besides the model's eos */
    int32_t stop_ids[SE_MAX_STOP];
    int n_stop;               /* stop strings (not owned) */
    const char *stop[SE_MAX_STOP];
};

/* Fills s with the defaults: temperature 1, no filters, no penalties, seed 0, max_tokens 16. */
void se_sampling_default(struct se_sampling *s);

/*
 * Checks every field; returns 0 or SP_EINVAL with err naming the field and its
 * allowed range ("top_p must be in (0, 1], got 1.5").
 */
int se_sampling_validate(const struct se_sampling *s, int n_vocab, char *err, size_t errcap);

/*
 * Log-probabilities are natural logs under the distribution the token was
 * drawn from before truncation: penalties and temperature applied, softmax
 * over the whole vocabulary, top-k / top-p / min-p not applied (greedy: the
 * penalised distribution at temperature 1). top_* are sorted, most probable
 * first, ties to the lower id.
 */
struct se_sample_result {
    int32_t token;
    float logprob; /* log-probability of token under the final distribution */
    int n_top;     /* alternatives reported (= logprobs requested, or fewer) */
    int32_t top_ids[SE_MAX_LOGPROBS];
    float top_logprobs[SE_MAX_LOGPROBS];
};

/*
 * Scratch space for sampling over a vocabulary of n_vocab; one per thread
 * (a sampler is not thread-safe, but holds no state between calls, so any
 * sampler may serve any sequence). Allocated once, about 43 bytes per
 * vocabulary entry, so that sampling allocates nothing per token.
 * se_sampler_new returns NULL when n_vocab <= 0 or memory is short; the caller
 * frees it with se_sampler_free (NULL is allowed).
 */
typedef struct se_sampler se_sampler_t;
se_sampler_t *se_sampler_new(int n_vocab);
void se_sampler_free(se_sampler_t *s);

/*
 * Samples the token at position (= n_prompt + n_generated) from logits
 * (n_vocab floats, modified in place: on return they hold the penalised,
 * temperature-scaled logits). prompt/generated are the sequence so far, for
 * the penalties: keep them apart when resuming (presence and frequency count
 * generated tokens only); they are read only when a penalty is on. s should
 * have passed se_sampling_validate; out-of-range values cannot make this
 * unsafe, only meaningless. Returns 0, SP_EINVAL (a history token outside
 * [0, n_vocab), a negative or NaN temperature, a NULL argument) or
 * SP_EBACKEND (a NaN or +inf logit, or every logit -inf).
 */
int se_sample(se_sampler_t *sm, const struct se_sampling *s, float *logits, const int32_t *prompt,
              size_t n_prompt, const int32_t *generated, size_t n_generated,
              struct se_sample_result *out);

/* The uniform draw in [0, 1) used for (seed, position); exposed for tests and the GPU sampler. */
double se_sample_uniform(uint64_t seed, uint64_t position);

/*
 * Stop strings over generated text. Returns the offset in text (len bytes) at
 * which the earliest stop string begins, or -1 when none occurs. *safe (may be
 * NULL) receives how many bytes may be emitted to a streaming client now: all
 * of text except a tail that could still grow into a stop string (or, when one
 * was found, the text before it), never ending inside a UTF-8 character nor
 * with a character still incomplete at the end of text. Streaming callers
 * pass only the text not yet emitted (the held-back tail plus the new piece):
 * no stop string can begin in text already emitted.
 */
long se_stop_find(const struct se_sampling *s, const char *text, size_t len, size_t *safe);

#endif
