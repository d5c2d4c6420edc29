/*
 * Private structures of the tokenizer (engine/tokenizer/). A tokenizer is
 * built once by tok_load.c and then only read, so every function here that
 * takes a const se_tokenizer_t is safe to call from several threads; the
 * per-call scratch memory lives in struct se__tok_scratch, owned by the caller.
 */
#ifndef SE_TOK_INTERNAL_H
#define SE_TOK_INTERNAL_H

#include "spool/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* String -> id map: open addressing over ids; keys are the pieces themselves. */
struct se__strmap {
    int32_t *slots; /* id, or -1 for empty */
    size_t mask;    /* capacity - 1 (capacity a power of two) */
    size_t count;
};

/* (left id, right id) -> merge rank and merged id. */
struct se__pairmap {
    uint64_t *keys; /* ((uint64_t)left << 32 | right) + 1; 0 = empty */
    int32_t *rank;
    int32_t *merged;
    size_t mask;
};

/* Normalizer steps, applied in order to each section of the input. */
enum se__norm_kind {
    SE_NORM_NFC,
    SE_NORM_NFD,
    SE_NORM_NFKC,
    SE_NORM_NFKD,
    SE_NORM_PREPEND,
    SE_NORM_REPLACE
};
struct se__norm {
    enum se__norm_kind kind;
    char *a, *b; /* PREPEND: a = text; REPLACE: a = pattern (a string), b = content */
};

/* Pre-tokenizer steps, applied in order; each refines the current pieces. */
enum se__pre_kind { SE_PRE_SPLIT, SE_PRE_BYTELEVEL, SE_PRE_METASPACE };
enum se__split_behavior { SE_SPLIT_ISOLATED, SE_SPLIT_REMOVED };
enum se__prepend { SE_PREPEND_ALWAYS, SE_PREPEND_FIRST, SE_PREPEND_NEVER };
struct se__pre {
    enum se__pre_kind kind;
    pcre2_code *re; /* SPLIT, and BYTELEVEL with use_regex (the GPT-2 pattern) */
    enum se__split_behavior behavior;
    bool add_prefix_space;    /* BYTELEVEL */
    enum se__prepend prepend; /* METASPACE */
    bool split;               /* METASPACE: split into words before each replacement */
    char *replacement;        /* METASPACE, UTF-8 */
};

/* How ids become text again. */
enum se__dec_kind {
    SE_DEC_NONE,      /* pieces joined as they are */
    SE_DEC_BYTELEVEL, /* pieces are byte-to-unicode mapped bytes */
    SE_DEC_SP,        /* Replace / ByteFallback / Fuse / Strip, or Metaspace */
};

struct se__added {
    int32_t id;
    char *content;
    size_t len;
    bool special, lstrip, rstrip, single_word, normalized;
};

struct se_tokenizer {
    char *path; /* tokenizer.json, for messages */

    /* Vocabulary: piece[id] (NULL for holes), NUL-terminated, with lengths. */
    int32_t n_vocab;
    char **piece;
    uint32_t *piece_len;
    struct se__strmap vocab; /* model vocabulary and added tokens */
    bool *special;           /* per id: special added token (skipped by skip_special) */
    bool *added;             /* per id: added token (decoded verbatim by ByteLevel) */

    /* The BPE model. */
    struct se__pairmap merges;
    int32_t unk;
    bool byte_fallback, fuse_unk, ignore_merges;
    int32_t byte_token[256]; /* <0xNN> ids for byte fallback, -1 when absent */
    int32_t byte_sym[256];   /* byte-level: id of the one-character piece of each byte */
    bool byte_level_model;   /* initial symbols are bytes (a ByteLevel pre-tokenizer) */
    int16_t unbyte[324];     /* byte-level code point (< 324) -> byte, or -1 */
    /*
     * SentencePiece-style models without a pre-tokenizer: no piece has "▁"
     * after another character, so no merge can cross the start of a word and
     * encoding may split the text before each such "▁" (the same result as one
     * BPE over the whole text, which would be quadratic in memory traffic).
     */
    bool sp_word_split;

    struct se__norm *norm;
    size_t n_norm;
    struct se__pre *pre;
    size_t n_pre;

    /* Added tokens, longest content first (leftmost-longest matching). */
    struct se__added *added_tok;
    size_t n_added;
    uint8_t added_first[256]; /* bit 0: an unnormalized, bit 1: a normalized token starts so */

    /* Post-processor (single sequence): ids before and after the text. */
    int32_t *post_pre, *post_post;
    size_t n_post_pre, n_post_post;

    /* Decoder. */
    enum se__dec_kind dec;
    char *dec_replace_from, *dec_replace_to; /* SP: Replace (e.g. "▁" -> " ") */
    bool dec_byte_fallback;
    int dec_strip_start;  /* SP: leading spaces stripped from the whole text */
    bool dec_strip_first; /* SP (Metaspace): one leading space of the first token */

    int32_t bos, eos;
    char *bos_text, *eos_text;
    char *chat_template; /* from tokenizer_config.json, or NULL */
    char *config_path;   /* for messages, or NULL */
};

/* Hash maps (tok_map.c). */
uint64_t se__hash(const char *s, size_t n);
int se__strmap_init(struct se__strmap *m, size_t expected);
void se__strmap_free(struct se__strmap *m);
/* Inserts id (whose piece must already be in tok->piece); a duplicate key keeps the old id. */
void se__strmap_put(struct se__strmap *m, const se_tokenizer_t *tok, int32_t id);
int32_t se__strmap_get(const struct se__strmap *m, const se_tokenizer_t *tok, const char *s,
                       size_t n);
int se__pairmap_init(struct se__pairmap *m, size_t expected);
void se__pairmap_free(struct se__pairmap *m);
/* Returns false when the pair is already present (the first rank wins). */
bool se__pairmap_put(struct se__pairmap *m, int32_t a, int32_t b, int32_t rank, int32_t merged);
/* Returns the rank, or -1; *merged receives the merged id. */
int32_t se__pairmap_get(const struct se__pairmap *m, int32_t a, int32_t b, int32_t *merged);

/* UTF-8 helpers (tok_utf8.c). */
/* Length of the character starting at s (1..4), or 0 when s[0..n) does not start with a valid one.
 */
size_t se__utf8_valid_len(const unsigned char *s, size_t n);
/*
 * Appends src[0..n) to dst as valid UTF-8, each maximal invalid subpart
 * replaced by U+FFFD (the WHATWG / Rust from_utf8_lossy rule). When final is
 * false, a valid but incomplete character at the end is not consumed; the
 * number of bytes consumed is returned.
 */
struct se__buf {
    char *p;
    size_t len, cap;
};
int se__buf_reserve(struct se__buf *b, size_t extra);
int se__buf_add(struct se__buf *b, const void *p, size_t n);
size_t se__utf8_lossy(struct se__buf *dst, const unsigned char *src, size_t n, bool final);
/* Encodes code point cp; returns the byte count. out must hold 4 bytes. */
size_t se__utf8_put(uint32_t cp, char *out);
/* Decodes one character of valid UTF-8; *len receives its length. */
uint32_t se__utf8_get(const unsigned char *s, size_t *len);

/* Byte-level alphabet (tok_utf8.c): the code point standing for each byte, and back (-1). */
uint32_t se__byte_to_cp(unsigned b);
int se__cp_to_byte(uint32_t cp);

/* Loading (tok_load.c) and the pieces of encoding (tok_encode.c). */
void se__tokenizer_free(se_tokenizer_t *tok);

#endif
