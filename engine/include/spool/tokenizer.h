/*
 * Tokenizers read from Hugging Face tokenizer.json files: byte-level BPE
 * (GPT-2 / Llama 3 / Qwen style, regex pre-tokenization through PCRE2) and
 * SentencePiece-style BPE (Metaspace, byte fallback <0xNN>), with added and
 * special tokens and the normalizers these families use. Encoding and decoding
 * agree with Hugging Face's own implementation.
 *
 * A tokenizer is immutable once opened and may be used from several threads
 * (each call keeps its working memory to itself; a se_detok_t belongs to one
 * thread at a time).
 *
 * Supported tokenizer.json parts: model BPE (merges as "a b" or ["a", "b"],
 * unk_token, fuse_unk, byte_fallback, ignore_merges); normalizers NFC, NFD,
 * NFKC, NFKD, Prepend, Replace (string pattern) and Sequences of them;
 * pre-tokenizers Split (regex or string, Isolated or Removed), ByteLevel
 * (with or without the GPT-2 regex, add_prefix_space) and Metaspace
 * (prepend_scheme always / first / never, split); post-processors
 * TemplateProcessing and ByteLevel; decoders ByteLevel, Metaspace and
 * Sequences of Replace, ByteFallback, Fuse and Strip (leading spaces).
 * Anything else (WordPiece, Unigram, ...) is SP_EUNSUPPORTED, naming it.
 *
 * Where Hugging Face's Rust library (what models are trained with) and its
 * JavaScript port differ, this follows the Rust library: \s in Split patterns
 * is Unicode White_Space as in Oniguruma (U+0085 included, U+FEFF and U+180E
 * not), and bytes decoded by ByteFallback keep a leading U+FEFF.
 * clean_up_tokenization_spaces is not applied (the supported families set it
 * false). Added tokens match leftmost-longest; lstrip / rstrip take the
 * whitespace beside the token into it and single_word requires no letter,
 * digit or '_' beside it, as in Rust.
 */
#ifndef SPOOL_TOKENIZER_H
#define SPOOL_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct se_tokenizer se_tokenizer_t;

/*
 * Opens dir/tokenizer.json and, when present, dir/tokenizer_config.json (chat
 * template, bos/eos, additional_special_tokens; whether a bos is added comes
 * from tokenizer.json's post-processor, as in Hugging Face). Returns 0, or SP_ENOENT / SP_ECORRUPT /
 * SP_EUNSUPPORTED with err naming the file and what was wrong in it.
 */
int se_tokenizer_open(const char *dir, se_tokenizer_t **out, char *err, size_t errcap);
/* As se_tokenizer_open, from explicit files; config_path may be NULL. */
int se_tokenizer_open_files(const char *tokenizer_json, const char *config_path,
                            se_tokenizer_t **out, char *err, size_t errcap);
/*
 * As se_tokenizer_open_files, from the contents of the files in memory (as
 * a fuzzer or a caller holding them in an archive has them); config_json may
 * be NULL. Messages name the files "tokenizer.json" and "tokenizer_config.json".
 */
int se_tokenizer_open_buffer(const char *json, size_t len, const char *config_json,
                             size_t config_len, se_tokenizer_t **out, char *err, size_t errcap);
void se_tokenizer_close(se_tokenizer_t *tok);

/* Number of ids (vocabulary plus added tokens): one past the largest id. */
int se_tokenizer_n_vocab(const se_tokenizer_t *tok);
/* The token's string as stored in the vocabulary, or NULL for an unknown id. */
const char *se_tokenizer_piece(const se_tokenizer_t *tok, int32_t id);
/* The id of an exact vocabulary or added-token string, or -1. */
int32_t se_tokenizer_id(const se_tokenizer_t *tok, const char *piece);
/* bos id from tokenizer_config.json / post-processor, or -1 when the family has none. */
int32_t se_tokenizer_bos(const se_tokenizer_t *tok);
/* eos id from tokenizer_config.json, or -1. */
int32_t se_tokenizer_eos(const se_tokenizer_t *tok);
/* True when id is a special added token. */
bool se_tokenizer_is_special(const se_tokenizer_t *tok, int32_t id);

/*
 * Encodes len bytes of text as Hugging Face's encode(text, add_special_tokens)
 * does: special tokens written in the text are recognised; with add_special
 * the post-processor's tokens (such as a bos) are added. Invalid UTF-8 is
 * never an error: each maximal invalid subsequence is first replaced by
 * U+FFFD (the WHATWG / Python errors="replace" rule), so the result is that of
 * encoding the lossily decoded string. On success *ids is malloc'd (caller
 * frees, also when *n is 0) and holds *n ids. Returns SP_EINVAL for text NULL
 * with len > 0, SP_ENOMEM.
 */
int se_tokenizer_encode(const se_tokenizer_t *tok, const char *text, size_t len, bool add_special,
                        int32_t **ids, size_t *n);

/*
 * Decodes ids as Hugging Face's decode(ids, skip_special_tokens) does (without
 * clean_up_tokenization_spaces, which the supported families turn off). Bytes
 * that do not form valid UTF-8 become U+FFFD, one per maximal invalid
 * subsequence (also after ByteFallback, where Rust writes one per byte; such
 * bytes never come from encoding a text). On success *text is malloc'd, NUL-terminated, with *len bytes.
 * Returns SP_EINVAL for an id outside the vocabulary.
 */
int se_tokenizer_decode(const se_tokenizer_t *tok, const int32_t *ids, size_t n, bool skip_special,
                        char **text, size_t *len);

/*
 * Streaming decoder: feed tokens one at a time and receive only complete text;
 * it never emits half a UTF-8 character (bytes of an incomplete character wait
 * for the next token) and gives the same text in total as se_tokenizer_decode.
 */
typedef struct se_detok se_detok_t;
se_detok_t *se_detok_new(const se_tokenizer_t *tok, bool skip_special);
/*
 * Adds id; *out points at the newly completed text (valid until the next call)
 * and *len is its length, possibly 0. Returns 0 or a negative SP_E* code.
 */
int se_detok_push(se_detok_t *d, int32_t id, const char **out, size_t *len);
/* Emits what is left at the end of the sequence (invalid bytes become U+FFFD). */
int se_detok_finish(se_detok_t *d, const char **out, size_t *len);
void se_detok_free(se_detok_t *d);

/* Chat templates. */
struct se_chat_msg {
    const char *role; /* "system", "user", "assistant" */
    const char *content;
};

/*
 * Renders messages in the model family's chat format (Llama 3, ChatML / Qwen,
 * Mistral / Llama 2 [INST]), chosen from tokenizer_config.json's
 * chat_template, and appends the assistant's turn opening when
 * add_generation_prompt. The text includes any bos, written as text, so encode
 * it with add_special false. On success *text is malloc'd. Returns
 * SP_EUNSUPPORTED (err says which template was found) when the template is
 * none of the known families, SP_EINVAL for a bad role or ordering.
 */
int se_chat_render(const se_tokenizer_t *tok, const struct se_chat_msg *msgs, size_t n,
                   bool add_generation_prompt, char **text, char *err, size_t errcap);

#endif
