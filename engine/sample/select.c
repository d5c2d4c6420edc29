/*
 * Partial selection: the k best logits without sorting the vocabulary, by a
 * bounded heap whose root is the worst kept candidate. Scanning ids upwards,
 * a later id with a logit equal to the root's is worse (ties go to the lower
 * id), so only a strictly greater logit displaces the root and most tokens
 * cost one comparison. Sorting never allocates (glibc's qsort may call
 * malloc for a merge buffer), so that se_sample allocates nothing per token.
 */
#include <string.h>

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
    /* Heapsort in place: moving the worst to the end, one at a time, leaves the best first. */
    for (size_t end = k; end > 1; end--) {
        struct se__cand t = out[0];
        out[0] = out[end - 1];
        out[end - 1] = t;
        sift_down(out, end - 1, 0);
    }
}

/* Insertion sort of short runs, before merging. */
#define RUN 16

static inline bool before(const struct se__cand *a, const struct se__cand *b)
{
    return worse(b, a);
}

void se__cand_sort(struct se__cand *a, size_t n, struct se__cand *tmp)
{
    for (size_t lo = 0; lo < n; lo += RUN) {
        size_t hi = lo + RUN < n ? lo + RUN : n;
        for (size_t i = lo + 1; i < hi; i++) {
            struct se__cand x = a[i];
            size_t j = i;
            for (; j > lo && before(&x, &a[j - 1]); j--)
                a[j] = a[j - 1];
            a[j] = x;
        }
    }
    /* Bottom-up merges, alternating between a and tmp. */
    struct se__cand *src = a, *dst = tmp;
    for (size_t width = RUN; width < n; width *= 2) {
        for (size_t lo = 0; lo < n; lo += 2 * width) {
            size_t mid = lo + width < n ? lo + width : n,
                   hi = lo + 2 * width < n ? lo + 2 * width : n;
            size_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi)
                dst[o++] = before(&src[j], &src[i]) ? src[j++] : src[i++];
            while (i < mid)
                dst[o++] = src[i++];
            while (j < hi)
                dst[o++] = src[j++];
        }
        struct se__cand *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, n * sizeof(*a));
}
