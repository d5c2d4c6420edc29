/*
 * Partial selection: the k best logits without sorting the vocabulary, by a
 * bounded heap whose root is the worst kept candidate. Scanning ids upwards,
 * a later id with a logit equal to the root's is worse (ties go to the lower
 * id), so only a strictly greater logit displaces the root and most tokens
 * cost one comparison.
 */
#include <stdlib.h>

#include "sample_int.h"

/* True when a ranks below b: lower logit, or the same logit and a higher id. */
static inline bool worse(const struct se__cand *a, const struct se__cand *b)
{
    return a->logit < b->logit || (a->logit == b->logit && a->id > b->id);
}

int se__cand_cmp(const void *pa, const void *pb)
{
    const struct se__cand *a = pa, *b = pb;
    if (a->logit != b->logit)
        return a->logit > b->logit ? -1 : 1;
    return a->id < b->id ? -1 : a->id > b->id;
}

/* Restores the heap below position i (root = worst). */
static void sift_down(struct se__cand *h, size_t k, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && worse(&h[l], &h[m]))
            m = l;
        if (r < k && worse(&h[r], &h[m]))
            m = r;
        if (m == i)
            return;
        struct se__cand t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

void se__top_k(const float *logits, size_t n, size_t k, struct se__cand *out)
{
    for (size_t i = 0; i < k; i++)
        out[i] = (struct se__cand){logits[i], (int32_t)i};
    for (size_t i = k / 2; i-- > 0;)
        sift_down(out, k, i);
    for (size_t i = k; i < n; i++) {
        if (logits[i] > out[0].logit) {
            out[0] = (struct se__cand){logits[i], (int32_t)i};
            sift_down(out, k, 0);
        }
    }
    qsort(out, k, sizeof(*out), se__cand_cmp);
}
