/*
 * The scheduler-worker wire protocol: typed frames, their msgpack encoding and
 * a streaming decoder. docs/protocol.md is the specification; this header is
 * its C binding.
 *
 * A frame on the wire is a 4-byte big-endian length N followed by N bytes of
 * msgpack: the array [version, type, body], body a map with string keys.
 *
 * Ownership: a frame filled by the caller for encoding points at the caller's
 * memory (its `mem` is NULL) and sp_wire_frame_free() does nothing to it. A
 * frame produced by the decoder owns copies of every string and array in
 * storage hung off `mem`; one sp_wire_frame_free() releases all of it.
 * sp_wire_frame_move() hands that storage to another frame variable.
 *
 * Thread-safety: none of these functions share state between frames or
 * decoders; one decoder must not be used by two threads at once.
 */
#ifndef SPOOL_WIRE_H
#define SPOOL_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <msgpack.h>

#include "spool/error.h"

/* The protocol's major version; a frame with any other version is SP_EPROTO. */
#define SP_WIRE_VERSION 1
/* Bytes of the length prefix. */
#define SP_WIRE_PREFIX 4
/* Largest frame (msgpack bytes after the prefix) a decoder accepts by default. */
#define SP_WIRE_MAX_FRAME_DEFAULT (16u * 1024 * 1024)

/* Frame types; the numbers are part of the protocol. */
#define SP_WIRE_TYPE_MAP(XX)                                                                       \
    XX(1, REGISTER, reg)                                                                           \
    XX(2, REGISTERED, registered)                                                                  \
    XX(3, HEARTBEAT, heartbeat)                                                                    \
    XX(4, ASSIGN, assign)                                                                          \
    XX(5, PROGRESS, progress)                                                                      \
    XX(6, DONE, done)                                                                              \
    XX(7, RELEASE, release)                                                                        \
    XX(8, DRAIN, drain)                                                                            \
    XX(9, GOODBYE, goodbye)                                                                        \
    XX(10, LIVE_REQUEST, live)                                                                     \
    XX(11, TOKENS, tokens)                                                                         \
    XX(12, CANCEL, cancel)                                                                         \
    XX(13, USAGE, usage)                                                                           \
    XX(14, ERROR, error)                                                                           \
    XX(15, REVOKE, revoke)

enum sp_wire_type {
    SP_WIRE_NONE = 0,
#define XX(num, name, member) SP_WIRE_##name = num,
    SP_WIRE_TYPE_MAP(XX)
#undef XX
        SP_WIRE__TYPE_END
};

/* Who may send a frame type (bit set, see sp_wire_type_senders()). */
enum sp_wire_sender { SP_WIRE_FROM_WORKER = 1, SP_WIRE_FROM_SCHEDULER = 2 };

enum sp_wire_capacity { SP_WIRE_SPOT = 0, SP_WIRE_ON_DEMAND = 1 };

/*
 * Strings: `const char *` fields are NUL-terminated UTF-8 without embedded NUL bytes
 * (the decoder rejects a NUL inside them). Fields that carry generated or user
 * text (a text prompt, a text piece) also have a byte length and may hold any
 * bytes; they are NUL-terminated as well for convenience.
 *
 * Optional scalars have a `has_` flag; an optional string or array is absent
 * when NULL / count 0 (an empty optional array is not sent).
 */

/* A model version: name and version always; digest ("sha256:<hex>") where pinned. */
struct sp_wire_model {
    const char *name;
    uint32_t version;
    const char *digest; /* required in REGISTER and ASSIGN, optional (NULL) in LIVE_REQUEST */
};

struct sp_wire_register { /* worker -> scheduler, first frame on a connection */
    const char *name;     /* worker name, unique per fleet (host name, pod name) */
    const char *gpu_type; /* "H200", "A100-80GB", "cpu" */
    uint64_t gpu_memory;  /* bytes */
    enum sp_wire_capacity capacity;
    double price_per_hour; /* USD per hour for this worker's GPU */
    struct sp_wire_model *models;
    uint32_t n_models;
    uint32_t max_batch;  /* most sequences the engine runs at once */
    const char *backend; /* engine backend: "cuda", "cpu" */
    bool has_worker_id;  /* set when reconnecting: the id REGISTERED gave before */
    uint64_t worker_id;
};

struct sp_wire_registered { /* scheduler -> worker, answer to REGISTER */
    uint64_t worker_id;
    uint32_t heartbeat_ms; /* send HEARTBEAT at least this often */
    uint32_t lease_ttl_ms; /* a lease not renewed by a heartbeat for this long expires */
};

struct sp_wire_heartbeat { /* worker -> scheduler */
    uint64_t worker_id;
    uint32_t free_slots; /* sequences the engine could admit now */
    uint32_t kv_blocks_free;
    uint32_t kv_blocks_total;
    uint32_t running; /* sequences in the engine */
    uint32_t queued;  /* sequences waiting for admission */
};

struct sp_wire_assign { /* scheduler -> worker */
    uint64_t shard_id;
    uint64_t job_id;
    uint64_t lease_token;       /* fencing token: every write for this shard carries it */
    struct sp_wire_model model; /* digest required */
    uint32_t lease_ms;          /* the lease expires this long after the frame was sent */
};

struct sp_wire_progress { /* worker -> scheduler */
    uint64_t shard_id;
    uint64_t lease_token;
    uint64_t requests_done; /* requests of the shard finished so far (cumulative) */
    uint64_t tokens_out;    /* tokens generated so far (cumulative) */
};

struct sp_wire_done { /* worker -> scheduler: every request of the shard is finished */
    uint64_t shard_id;
    uint64_t lease_token;
    uint64_t succeeded;
    uint64_t failed;
};

struct sp_wire_release { /* worker -> scheduler: gives a shard back unfinished */
    uint64_t shard_id;
    uint64_t lease_token;
    const char *reason; /* "preempted", "draining", "model_unavailable", "error: ..." */
};

struct sp_wire_drain { /* either direction: stop taking new work */
    const char *reason;
    uint32_t deadline_ms; /* finish or release everything within this long */
};

struct sp_wire_goodbye { /* either direction: the sender closes after this frame */
    const char *reason;
};

/* Sampling parameters of a live request; every one is optional (engine default). */
struct sp_wire_sampling {
    bool has_temperature, has_top_k, has_top_p, has_min_p, has_repetition_penalty;
    bool has_presence_penalty, has_frequency_penalty, has_seed, has_max_tokens, has_logprobs;
    bool has_ignore_eos;
    double temperature;
    int32_t top_k;
    double top_p;
    double min_p;
    double repetition_penalty;
    double presence_penalty;
    double frequency_penalty;
    uint64_t seed;
    uint32_t max_tokens;
    uint32_t logprobs; /* alternatives to report per token */
    bool ignore_eos;
    int32_t *stop_ids; /* extra stop token ids */
    uint32_t n_stop_ids;
    const char **stop; /* stop strings */
    uint32_t n_stop;
};

/* A prompt is either token ids or text. */
struct sp_wire_prompt {
    bool is_text;
    int32_t *tokens; /* when !is_text */
    uint32_t n_tokens;
    const char *text; /* when is_text: text_len bytes, NUL-terminated */
    size_t text_len;
};

/* One chat message of a live chat request. */
struct sp_wire_message {
    const char *role;    /* "system", "user", "assistant", "tool" */
    const char *content; /* the message's text */
};

struct sp_wire_live_request { /* scheduler -> worker */
    uint64_t request_id;
    struct sp_wire_model model; /* digest optional */
    struct sp_wire_prompt prompt;
    struct sp_wire_sampling sampling;
    int32_t priority; /* higher runs first; live work is above batch work */
    /*
     * Optional (protocol 1.1): a chat. When present, the worker renders these
     * messages with the model's chat template (adding the assistant's turn)
     * and the prompt must be empty text.
     */
    struct sp_wire_message *messages;
    uint32_t n_messages;
};

struct sp_wire_tokens { /* worker -> scheduler: the next tokens of a live request */
    uint64_t request_id;
    int32_t *token_ids;
    uint32_t n_token_ids;
    const char *text; /* text_len bytes decoded from token_ids (complete UTF-8 only) */
    size_t text_len;
    const char *finish_reason; /* NULL while generating; "stop", "length", "cancelled", "error" */
    float *logprobs;           /* NULL, or one per token id */
    uint32_t n_logprobs;
};

struct sp_wire_cancel { /* scheduler -> worker */
    uint64_t request_id;
};

struct sp_wire_usage { /* worker -> scheduler: for exactly one of request_id, shard_id */
    bool has_request_id;
    uint64_t request_id;
    bool has_shard_id;
    uint64_t shard_id;
    uint64_t tokens_in;
    uint64_t tokens_out;
    double gpu_seconds;
};

struct sp_wire_error {   /* either direction */
    const char *code;    /* an error name from Spool's table, such as "SP_EPROTO" */
    const char *message; /* what was wrong, for people */
    bool has_request_id;
    uint64_t request_id;
};

struct sp_wire_revoke { /* scheduler -> worker: a lease is void (its job was cancelled) */
    uint64_t shard_id;
    uint64_t lease_token; /* the lease being revoked, from ASSIGN */
    const char *reason;   /* "cancelled", or free text */
};

struct sp_wire_frame {
    enum sp_wire_type type;
    union {
        struct sp_wire_register reg;
        struct sp_wire_registered registered;
        struct sp_wire_heartbeat heartbeat;
        struct sp_wire_assign assign;
        struct sp_wire_progress progress;
        struct sp_wire_done done;
        struct sp_wire_release release;
        struct sp_wire_drain drain;
        struct sp_wire_goodbye goodbye;
        struct sp_wire_live_request live;
        struct sp_wire_tokens tokens;
        struct sp_wire_cancel cancel;
        struct sp_wire_usage usage;
        struct sp_wire_error error;
        struct sp_wire_revoke revoke;
    };
    void *mem; /* storage owned by a decoded frame; NULL for caller-built frames */
};

/* "REGISTER", ...; "UNKNOWN" for other values. */
const char *sp_wire_type_name(int type);
/* SP_WIRE_FROM_WORKER and/or SP_WIRE_FROM_SCHEDULER; 0 for an unknown type. */
unsigned sp_wire_type_senders(int type);
const char *sp_wire_capacity_name(enum sp_wire_capacity capacity);

/* Releases what a decoded frame owns and zeroes it; harmless on caller-built frames. */
void sp_wire_frame_free(struct sp_wire_frame *f);
/* Moves *src (and its storage) into *dst and zeroes *src; *dst must hold nothing. */
void sp_wire_frame_move(struct sp_wire_frame *dst, struct sp_wire_frame *src);
/* Deep equality of two frames' contents (floating fields bit-exact, NaN equal to NaN). */
bool sp_wire_frame_equal(const struct sp_wire_frame *a, const struct sp_wire_frame *b);

/*
 * Appends f as one frame (length prefix and msgpack) to out. Returns 0;
 * SP_EINVAL when f breaks a rule of the protocol (a required string is NULL,
 * an unknown type, logprobs not one per token, USAGE without exactly one of
 * request_id/shard_id), with err (may be NULL) saying which; SP_ETOOBIG when
 * the frame exceeds 4 GiB; SP_ENOMEM. On failure out is left as it was.
 */
int sp_wire_encode(msgpack_sbuffer *out, const struct sp_wire_frame *f, char *err, size_t errcap);

/*
 * Decodes one frame from the msgpack object [version, type, body] into f,
 * copying everything f needs. Returns 0; SP_EPROTO with err naming the frame
 * type and key when the shape is wrong (see docs/protocol.md); SP_ENOMEM. On
 * failure f holds nothing to free.
 */
int sp_wire_decode_object(const msgpack_object *obj, struct sp_wire_frame *f, char *err,
                          size_t errcap);

/*
 * The streaming decoder. Feed it bytes as they arrive, in any split, then
 * call sp_wire_decoder_next() until it returns SP_EAGAIN. The struct is
 * caller-allocated; its fields are private.
 *
 * States: reading (initial) -> failed (sticky: every later next() returns the
 * same negative code, and reason() says why). Bytes fed are buffered until
 * next() consumes them, so feed and drain alternately: the buffer then never
 * holds more than one frame plus one feed's worth of bytes.
 *
 * Memory: decoding a frame of N bytes costs msgpack-c at most about 16 * N
 * bytes for a moment (16 per array element, 32 per map pair, each at least
 * one byte on the wire), plus the decoded frame. Choose max_frame with that
 * in mind.
 */
struct sp_wire_decoder {
    uint8_t *buf; /* unconsumed bytes are buf[pos, len) */
    size_t len, pos, cap;
    uint32_t max_frame;
    int err;
    uint64_t frames; /* frames returned so far */
    char reason[256];
};

/* max_frame: the largest N accepted (0 = SP_WIRE_MAX_FRAME_DEFAULT). */
void sp_wire_decoder_init(struct sp_wire_decoder *d, uint32_t max_frame);
void sp_wire_decoder_free(struct sp_wire_decoder *d);
/* Buffers n bytes. Returns 0, SP_ENOMEM, or the sticky error of a failed decoder. */
int sp_wire_decoder_feed(struct sp_wire_decoder *d, const void *bytes, size_t n);
/*
 * Returns 1 with the next complete frame in *f (the caller frees it with
 * sp_wire_frame_free); SP_EAGAIN when the buffered bytes hold no complete
 * frame yet; or, and from then on for good:
 *   SP_ETOOBIG  the length prefix exceeds max_frame (known from the 4 prefix
 *               bytes alone; the body is never buffered),
 *   SP_ECORRUPT the N bytes are not exactly one msgpack object (malformed,
 *               truncated inside the frame, trailing bytes, N = 0, nesting
 *               deeper than 24),
 *   SP_EPROTO   valid msgpack of the wrong shape: not [version, type, body],
 *               another major version, an unknown type, a missing or
 *               mistyped key,
 *   SP_ENOMEM.
 */
int sp_wire_decoder_next(struct sp_wire_decoder *d, struct sp_wire_frame *f);
/* Why the decoder failed ("" while it has not): names the frame type and key where known. */
const char *sp_wire_decoder_reason(const struct sp_wire_decoder *d);
/* Bytes buffered and not yet returned as frames (a partial frame at end of stream). */
size_t sp_wire_decoder_pending(const struct sp_wire_decoder *d);

#endif
