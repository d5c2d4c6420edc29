/*
 * The wire protocol codec and streaming decoder: every frame type round-trips,
 * streams decode in any split, and each kind of bad input is refused with the
 * right code and a reason naming what was wrong.
 *
 * `unit_common_wire --write-corpus DIR` writes the fuzz seed corpus
 * (tests/fuzz/corpus/wire) from the same sample frames.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "spool/wire.h"
#include "wire_samples.h"

#define ALL_TYPES for (int t = SP_WIRE_REGISTER; t < SP_WIRE__TYPE_END; t++)

static void encode_ok(msgpack_sbuffer *sb, const struct sp_wire_frame *f)
{
    char err[200];
    int rc = sp_wire_encode(sb, f, err, sizeof err);
    if (rc)
        fail_msg("encode %s: %s (%s)", sp_wire_type_name(f->type), err, sp_err_name(rc));
}

/* Decodes bytes that should hold exactly one frame; returns next()'s code. */
static int decode_one(const void *p, size_t n, uint32_t max, struct sp_wire_frame *f, char *reason,
                      size_t cap)
{
    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, max);
    assert_int_equal(sp_wire_decoder_feed(&d, p, n), 0);
    int rc = sp_wire_decoder_next(&d, f);
    snprintf(reason, cap, "%s", sp_wire_decoder_reason(&d));
    if (rc == 1) {
        assert_int_equal(sp_wire_decoder_pending(&d), 0);
        struct sp_wire_frame none;
        assert_int_equal(sp_wire_decoder_next(&d, &none), SP_EAGAIN);
    } else if (rc != SP_EAGAIN) {
        /* Failure is sticky: the same code again, and feed refuses too. */
        struct sp_wire_frame none;
        assert_int_equal(sp_wire_decoder_next(&d, &none), rc);
        assert_int_equal(sp_wire_decoder_feed(&d, "x", 1), rc);
        assert_true(reason[0] != '\0');
    }
    sp_wire_decoder_free(&d);
    return rc;
}

static void roundtrip_every_type(void **state)
{
    (void)state;
    int checked = 0;
    ALL_TYPES
    {
        for (int full = 0; full <= 1; full++) {
            struct sp_wire_frame in, out, again;
            wire_sample(t, full, &in);
            msgpack_sbuffer sb, sb2;
            msgpack_sbuffer_init(&sb);
            msgpack_sbuffer_init(&sb2);
            encode_ok(&sb, &in);
            char reason[256];
            int rc = decode_one(sb.data, sb.size, 0, &out, reason, sizeof reason);
            if (rc != 1)
                fail_msg("decode %s (full=%d): %s", sp_wire_type_name(t), full, reason);
            assert_int_equal(out.type, t);
            if (!sp_wire_frame_equal(&in, &out))
                fail_msg("%s (full=%d) changed in a round trip", sp_wire_type_name(t), full);
            /* Encoding is canonical: the decoded frame encodes to the same bytes. */
            encode_ok(&sb2, &out);
            assert_int_equal(sb.size, sb2.size);
            assert_memory_equal(sb.data, sb2.data, sb.size);
            /* Move hands the storage over; the source is left empty. */
            sp_wire_frame_move(&again, &out);
            assert_null(out.mem);
            assert_true(sp_wire_frame_equal(&in, &again));
            sp_wire_frame_free(&again);
            sp_wire_frame_free(&out); /* harmless on an emptied frame */
            msgpack_sbuffer_destroy(&sb);
            msgpack_sbuffer_destroy(&sb2);
            checked++;
        }
    }
    assert_int_equal(checked, 2 * (SP_WIRE__TYPE_END - 1));
}

/* Spot checks that decoding copies real values, not only values equal to themselves. */
static void decoded_values(void **state)
{
    (void)state;
    struct sp_wire_frame in, out;
    msgpack_sbuffer sb;
    char reason[256];

    wire_sample(SP_WIRE_REGISTER, 1, &in);
    msgpack_sbuffer_init(&sb);
    encode_ok(&sb, &in);
    assert_int_equal(decode_one(sb.data, sb.size, 0, &out, reason, sizeof reason), 1);
    assert_string_equal(out.reg.name, "worker-a100-7");
    assert_ptr_not_equal(out.reg.name, in.reg.name);
    assert_int_equal(out.reg.capacity, SP_WIRE_ON_DEMAND);
    assert_int_equal(out.reg.gpu_memory, 85899345920ull);
    assert_true(out.reg.price_per_hour == 1.89);
    assert_int_equal(out.reg.n_models, 2);
    assert_string_equal(out.reg.models[1].name, "qwen2-0.5b");
    assert_string_equal(out.reg.models[1].digest, sample_models[1].digest);
    assert_true(out.reg.has_worker_id);
    assert_int_equal(out.reg.worker_id, 42);
    sp_wire_frame_free(&out);
    msgpack_sbuffer_destroy(&sb);

    wire_sample(SP_WIRE_TOKENS, 0, &in);
    msgpack_sbuffer_init(&sb);
    encode_ok(&sb, &in);
    assert_int_equal(decode_one(sb.data, sb.size, 0, &out, reason, sizeof reason), 1);
    assert_int_equal(out.tokens.text_len, sizeof sample_text - 1);
    assert_memory_equal(out.tokens.text, sample_text, sizeof sample_text); /* incl. NUL end */
    assert_null(out.tokens.finish_reason);
    assert_null(out.tokens.logprobs);
    assert_int_equal(out.tokens.token_ids[5], 2147483647);
    sp_wire_frame_free(&out);
    msgpack_sbuffer_destroy(&sb);

    wire_sample(SP_WIRE_LIVE_REQUEST, 1, &in);
    msgpack_sbuffer_init(&sb);
    encode_ok(&sb, &in);
    assert_int_equal(decode_one(sb.data, sb.size, 0, &out, reason, sizeof reason), 1);
    assert_false(out.live.prompt.is_text);
    assert_int_equal(out.live.prompt.n_tokens, 6);
    assert_int_equal(out.live.sampling.top_k, 40);
    assert_true(out.live.sampling.temperature == 0.7);
    assert_string_equal(out.live.sampling.stop[0], "\n\nUser:");
    assert_int_equal(out.live.priority, -3);
    assert_int_equal(out.live.n_messages, 2);
    assert_string_equal(out.live.messages[1].role, "user");
    assert_string_equal(out.live.messages[1].content, "Name a queue.");
    sp_wire_frame_free(&out);
    msgpack_sbuffer_destroy(&sb);

    /* The minimal LIVE_REQUEST has no sampling keys and no digest. */
    wire_sample(SP_WIRE_LIVE_REQUEST, 0, &in);
    msgpack_sbuffer_init(&sb);
    encode_ok(&sb, &in);
    assert_int_equal(decode_one(sb.data, sb.size, 0, &out, reason, sizeof reason), 1);
    assert_null(out.live.model.digest);
    assert_false(out.live.sampling.has_temperature);
    assert_true(out.live.prompt.is_text);
    assert_string_equal(out.live.prompt.text, "Write a haiku about queues.");
    assert_int_equal(out.live.n_messages, 0);
    assert_null(out.live.messages);
    sp_wire_frame_free(&out);
    msgpack_sbuffer_destroy(&sb);
}

/* A stream of n frames cycling through every type, full and minimal. */
static void build_stream(msgpack_sbuffer *sb, int n, struct sp_wire_frame *expect)
{
    msgpack_sbuffer_init(sb);
    for (int i = 0; i < n; i++) {
        wire_sample(SP_WIRE_REGISTER + i % 14, (i / 14) % 2, &expect[i]);
        encode_ok(sb, &expect[i]);
    }
}

static uint64_t rng;
static uint64_t rnd(void)
{
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Feeds the stream in chunks (max_chunk 1 = byte by byte) and checks every frame in order. */
static void feed_in_splits(const msgpack_sbuffer *sb, const struct sp_wire_frame *expect, int n,
                           size_t max_chunk)
{
    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, 0);
    int got = 0;
    size_t off = 0;
    while (off < sb->size) {
        size_t chunk = max_chunk == 1 ? 1 : 1 + rnd() % max_chunk;
        if (chunk > sb->size - off)
            chunk = sb->size - off;
        assert_int_equal(sp_wire_decoder_feed(&d, sb->data + off, chunk), 0);
        off += chunk;
        struct sp_wire_frame f;
        int rc;
        while ((rc = sp_wire_decoder_next(&d, &f)) == 1) {
            assert_true(got < n);
            if (!sp_wire_frame_equal(&expect[got], &f))
                fail_msg("frame %d (%s) differs", got, sp_wire_type_name(expect[got].type));
            sp_wire_frame_free(&f);
            got++;
        }
        if (rc != SP_EAGAIN)
            fail_msg("next: %s: %s", sp_err_name(rc), sp_wire_decoder_reason(&d));
    }
    assert_int_equal(got, n);
    assert_int_equal(sp_wire_decoder_pending(&d), 0);
    sp_wire_decoder_free(&d);
}

#define STREAM_FRAMES 280

static void stream_byte_by_byte(void **state)
{
    (void)state;
    static struct sp_wire_frame expect[STREAM_FRAMES];
    msgpack_sbuffer sb;
    build_stream(&sb, STREAM_FRAMES, expect);
    feed_in_splits(&sb, expect, STREAM_FRAMES, 1);
    msgpack_sbuffer_destroy(&sb);
}

static void stream_random_splits(void **state)
{
    (void)state;
    static struct sp_wire_frame expect[STREAM_FRAMES];
    msgpack_sbuffer sb;
    build_stream(&sb, STREAM_FRAMES, expect);
    static const size_t max_chunks[] = {2, 3, 7, 64, 500, 4096, 100000};
    for (uint64_t seed = 1; seed <= 20; seed++) {
        rng = seed;
        feed_in_splits(&sb, expect, STREAM_FRAMES, max_chunks[seed % 7]);
    }
    msgpack_sbuffer_destroy(&sb);
}

static void oversize_prefix_alone(void **state)
{
    (void)state;
    struct sp_wire_decoder d;
    struct sp_wire_frame f;
    sp_wire_decoder_init(&d, 1024);
    /* 1025 announced, one over the limit; only the prefix is ever sent, byte by byte. */
    const uint8_t prefix[4] = {0, 0, 0x04, 0x01};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(sp_wire_decoder_feed(&d, &prefix[i], 1), 0);
        assert_int_equal(sp_wire_decoder_next(&d, &f), SP_EAGAIN);
    }
    assert_int_equal(sp_wire_decoder_feed(&d, &prefix[3], 1), 0);
    assert_int_equal(sp_wire_decoder_next(&d, &f), SP_ETOOBIG);
    assert_non_null(strstr(sp_wire_decoder_reason(&d), "1025 bytes"));
    assert_non_null(strstr(sp_wire_decoder_reason(&d), "1024"));
    assert_int_equal(sp_wire_decoder_next(&d, &f), SP_ETOOBIG);
    assert_int_equal(sp_wire_decoder_feed(&d, "more", 4), SP_ETOOBIG);
    sp_wire_decoder_free(&d);

    /* Exactly the limit is fine; the default limit is 16 MiB. */
    struct sp_wire_frame in, out;
    wire_sample(SP_WIRE_ERROR, 1, &in);
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    encode_ok(&sb, &in);
    char reason[256];
    uint32_t n = (uint32_t)sb.size - 4;
    assert_int_equal(decode_one(sb.data, sb.size, n, &out, reason, sizeof reason), 1);
    sp_wire_frame_free(&out);
    assert_int_equal(decode_one(sb.data, sb.size, n - 1, &out, reason, sizeof reason), SP_ETOOBIG);
    msgpack_sbuffer_destroy(&sb);
    const uint8_t big[4] = {0x01, 0x00, 0x00, 0x01}; /* 16 MiB + 1 */
    assert_int_equal(decode_one(big, 4, 0, &out, reason, sizeof reason), SP_ETOOBIG);
}

static void truncated_never_yields(void **state)
{
    (void)state;
    ALL_TYPES
    {
        struct sp_wire_frame in, f;
        wire_sample(t, 1, &in);
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        encode_ok(&sb, &in);
        struct sp_wire_decoder d;
        sp_wire_decoder_init(&d, 0);
        for (size_t i = 0; i + 1 < sb.size; i++) {
            assert_int_equal(sp_wire_decoder_feed(&d, sb.data + i, 1), 0);
            assert_int_equal(sp_wire_decoder_next(&d, &f), SP_EAGAIN);
        }
        assert_int_equal(sp_wire_decoder_pending(&d), sb.size - 1);
        assert_string_equal(sp_wire_decoder_reason(&d), "");
        sp_wire_decoder_free(&d);
        msgpack_sbuffer_destroy(&sb);
    }
}

/* Builds frames by hand: a prefix placeholder, then msgpack, then the real prefix. */
static void begin(msgpack_sbuffer *sb, msgpack_packer *pk)
{
    msgpack_sbuffer_init(sb);
    msgpack_packer_init(pk, sb, msgpack_sbuffer_write);
    msgpack_sbuffer_write(sb, "\0\0\0\0", 4);
}

static void finish(msgpack_sbuffer *sb)
{
    size_t n = sb->size - 4;
    uint8_t *p = (uint8_t *)sb->data;
    p[0] = (uint8_t)(n >> 24);
    p[1] = (uint8_t)(n >> 16);
    p[2] = (uint8_t)(n >> 8);
    p[3] = (uint8_t)n;
}

static void key(msgpack_packer *pk, const char *k)
{
    msgpack_pack_str(pk, strlen(k));
    msgpack_pack_str_body(pk, k, strlen(k));
}

static void expect_error(const void *p, size_t n, int code, const char *const *needles)
{
    struct sp_wire_frame f;
    char reason[256];
    int rc = decode_one(p, n, 0, &f, reason, sizeof reason);
    if (rc != code)
        fail_msg("want %s, got %s (%s)", sp_err_name(code), sp_err_name(rc), reason);
    for (; *needles; needles++)
        if (!strstr(reason, *needles))
            fail_msg("reason \"%s\" lacks \"%s\"", reason, *needles);
}

#define EXPECT(p, n, code, ...) expect_error(p, n, code, (const char *const[]){__VA_ARGS__, NULL})

static void garbage_msgpack(void **state)
{
    (void)state;
    /* 0xc1 is never valid msgpack. */
    const uint8_t reserved[] = {0, 0, 0, 3, 0x92, 0x01, 0xc1};
    EXPECT(reserved, sizeof reserved, SP_ECORRUPT, "0xc1");
    /* Bytes after the object, inside the frame. */
    const uint8_t trailing[] = {0, 0, 0, 6, 0x93, 0x01, 0x0c, 0x80, 0xc0, 0xc0};
    EXPECT(trailing, sizeof trailing, SP_ECORRUPT, "2 trailing bytes");
    /* The object ends after the frame does. */
    const uint8_t shortobj[] = {0, 0, 0, 3, 0x93, 0x01, 0x0c};
    EXPECT(shortobj, sizeof shortobj, SP_ECORRUPT, "truncated");
    /* An array announcing 2^32-1 elements in a 5-byte frame: refused before msgpack-c allocates. */
    const uint8_t huge[] = {0, 0, 0, 5, 0xdd, 0xff, 0xff, 0xff, 0xff};
    EXPECT(huge, sizeof huge, SP_ECORRUPT, "frame 1");
    const uint8_t str_over[] = {0, 0, 0, 3, 0xd9, 0x20, 'a'};
    EXPECT(str_over, sizeof str_over, SP_ECORRUPT, "truncated");
    const uint8_t empty[] = {0, 0, 0, 0};
    EXPECT(empty, sizeof empty, SP_ECORRUPT, "empty");
    /* 30 nested arrays. */
    uint8_t deep[4 + 31];
    memset(deep, 0x91, sizeof deep);
    deep[0] = deep[1] = deep[2] = 0;
    deep[3] = 31;
    deep[sizeof deep - 1] = 0xc0;
    EXPECT(deep, sizeof deep, SP_ECORRUPT, "nested deeper");
    /* 24 levels is the limit: the bytes pass, the shape does not; 25 do not pass. */
    uint8_t limit[4 + 25];
    memset(limit, 0x91, sizeof limit);
    limit[0] = limit[1] = limit[2] = 0;
    limit[3] = 25;
    limit[sizeof limit - 1] = 0xc0;
    EXPECT(limit, sizeof limit, SP_EPROTO, "another length");
    uint8_t over[4 + 26];
    memset(over, 0x91, sizeof over);
    over[0] = over[1] = over[2] = 0;
    over[3] = 26;
    over[sizeof over - 1] = 0xc0;
    EXPECT(over, sizeof over, SP_ECORRUPT, "deeper than 24");
    /* Valid msgpack, but a number rather than a frame. */
    const uint8_t number[] = {0, 0, 0, 1, 0x05};
    EXPECT(number, sizeof number, SP_EPROTO, "got non-negative int");
}

static void wrong_version_and_type(void **state)
{
    (void)state;
    msgpack_sbuffer sb;
    msgpack_packer pk;

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 2);
    msgpack_pack_uint32(&pk, SP_WIRE_CANCEL);
    msgpack_pack_map(&pk, 1);
    key(&pk, "request_id");
    msgpack_pack_uint32(&pk, 1);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "version 2");
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, 99);
    msgpack_pack_map(&pk, 0);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "unknown frame type 99");
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint64(&pk, 1ull << 40);
    msgpack_pack_map(&pk, 0);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "unknown frame type 1099511627776");
    msgpack_sbuffer_destroy(&sb);

    /* Shapes: a map instead of the array, an array of 2, a body that is not a map. */
    begin(&sb, &pk);
    msgpack_pack_map(&pk, 0);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "[version, type, body]", "got map");
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, 1);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "another length");
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_GOODBYE);
    msgpack_pack_array(&pk, 0);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "GOODBYE: body must be a map, got array");
    msgpack_sbuffer_destroy(&sb);
}

/* HEARTBEAT with one key replaced: skip names a key left out, bad names a key given as str. */
static void heartbeat_with(msgpack_sbuffer *sb, const char *skip, const char *bad)
{
    static const char *keys[] = {"worker_id",       "free_slots", "kv_blocks_free",
                                 "kv_blocks_total", "running",    "queued"};
    msgpack_packer pk;
    begin(sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_HEARTBEAT);
    msgpack_pack_map(&pk, skip ? 6 : 7);
    for (int i = 0; i < 6; i++) {
        if (skip && !strcmp(keys[i], skip))
            continue;
        key(&pk, keys[i]);
        if (bad && !strcmp(keys[i], bad))
            key(&pk, "seven");
        else
            msgpack_pack_uint32(&pk, 7);
    }
    key(&pk, "some_future_key"); /* unknown keys are ignored */
    msgpack_pack_array(&pk, 2);
    msgpack_pack_nil(&pk);
    msgpack_pack_map(&pk, 0);
    finish(sb);
}

static void missing_and_mistyped_keys(void **state)
{
    (void)state;
    msgpack_sbuffer sb;
    struct sp_wire_frame f;
    char reason[256];

    heartbeat_with(&sb, NULL, NULL);
    assert_int_equal(decode_one(sb.data, sb.size, 0, &f, reason, sizeof reason), 1);
    assert_int_equal(f.heartbeat.kv_blocks_total, 7);
    sp_wire_frame_free(&f);
    msgpack_sbuffer_destroy(&sb);

    heartbeat_with(&sb, "kv_blocks_free", NULL);
    EXPECT(sb.data, sb.size, SP_EPROTO, "HEARTBEAT", "'kv_blocks_free'", "missing");
    msgpack_sbuffer_destroy(&sb);

    heartbeat_with(&sb, NULL, "free_slots");
    EXPECT(sb.data, sb.size, SP_EPROTO, "HEARTBEAT", "'free_slots'", "got str");
    msgpack_sbuffer_destroy(&sb);

    /* Nested: a model without its digest in REGISTER names the path. */
    struct sp_wire_model models[2] = {sample_models[0], sample_models[1]};
    models[1].digest = NULL;
    struct sp_wire_frame in;
    wire_sample(SP_WIRE_REGISTER, 1, &in);
    in.reg.models = models;
    char err[200];
    msgpack_sbuffer_init(&sb);
    assert_int_equal(sp_wire_encode(&sb, &in, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "models[1].digest"));
    assert_int_equal(sb.size, 0); /* a failed encode leaves the buffer as it was */
    msgpack_sbuffer_destroy(&sb);

    msgpack_packer pk;
    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_ASSIGN);
    msgpack_pack_map(&pk, 5);
    key(&pk, "shard_id");
    msgpack_pack_uint32(&pk, 1);
    key(&pk, "job_id");
    msgpack_pack_uint32(&pk, 1);
    key(&pk, "lease_token");
    msgpack_pack_int32(&pk, -1); /* a negative fencing token */
    key(&pk, "model");
    msgpack_pack_map(&pk, 0);
    key(&pk, "lease_ms");
    msgpack_pack_uint32(&pk, 1);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "ASSIGN: key 'lease_token'", "negative int");
    msgpack_sbuffer_destroy(&sb);

    /* Out of range, duplicate key, NUL in a name, a non-str key, a bad capacity. */
    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_DRAIN);
    msgpack_pack_map(&pk, 2);
    key(&pk, "reason");
    key(&pk, "x");
    key(&pk, "deadline_ms");
    msgpack_pack_uint64(&pk, 1ull << 32);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "DRAIN: key 'deadline_ms'", "out of range");
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_CANCEL);
    msgpack_pack_map(&pk, 2);
    key(&pk, "request_id");
    msgpack_pack_uint32(&pk, 1);
    key(&pk, "request_id");
    msgpack_pack_uint32(&pk, 2);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "CANCEL: key 'request_id' appears twice");
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_GOODBYE);
    msgpack_pack_map(&pk, 1);
    key(&pk, "reason");
    msgpack_pack_str(&pk, 3);
    msgpack_pack_str_body(&pk, "a\0b", 3);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "GOODBYE: key 'reason'", "NUL");
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_GOODBYE);
    msgpack_pack_map(&pk, 2);
    key(&pk, "reason");
    key(&pk, "bye");
    msgpack_pack_uint32(&pk, 5);
    msgpack_pack_nil(&pk);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "GOODBYE", "key of type non-negative int");
    msgpack_sbuffer_destroy(&sb);

    /* Numbers: an int where a double goes is accepted; a str is not. */
    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_USAGE);
    msgpack_pack_map(&pk, 4);
    key(&pk, "request_id");
    msgpack_pack_uint32(&pk, 9);
    key(&pk, "tokens_in");
    msgpack_pack_uint32(&pk, 1);
    key(&pk, "tokens_out");
    msgpack_pack_uint32(&pk, 2);
    key(&pk, "gpu_seconds");
    msgpack_pack_int32(&pk, -3);
    finish(&sb);
    assert_int_equal(decode_one(sb.data, sb.size, 0, &f, reason, sizeof reason), 1);
    assert_true(f.usage.gpu_seconds == -3.0);
    assert_true(f.usage.has_request_id && !f.usage.has_shard_id);
    sp_wire_frame_free(&f);
    msgpack_sbuffer_destroy(&sb);
}

static void cross_field_rules(void **state)
{
    (void)state;
    struct sp_wire_frame in;
    msgpack_sbuffer sb;
    msgpack_packer pk;
    char err[200];

    /* USAGE needs exactly one of request_id and shard_id, on both sides. */
    wire_sample(SP_WIRE_USAGE, 1, &in);
    in.usage.has_request_id = true;
    msgpack_sbuffer_init(&sb);
    assert_int_equal(sp_wire_encode(&sb, &in, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "exactly one"));
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_USAGE);
    msgpack_pack_map(&pk, 3);
    key(&pk, "tokens_in");
    msgpack_pack_uint32(&pk, 1);
    key(&pk, "tokens_out");
    msgpack_pack_uint32(&pk, 2);
    key(&pk, "gpu_seconds");
    msgpack_pack_double(&pk, 0.5);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "USAGE", "exactly one");
    msgpack_sbuffer_destroy(&sb);

    /* TOKENS: logprobs, when present, one per token id. */
    wire_sample(SP_WIRE_TOKENS, 1, &in);
    in.tokens.n_logprobs = 2;
    msgpack_sbuffer_init(&sb);
    assert_int_equal(sp_wire_encode(&sb, &in, err, sizeof err), SP_EINVAL);
    assert_non_null(strstr(err, "logprobs"));
    msgpack_sbuffer_destroy(&sb);

    begin(&sb, &pk);
    msgpack_pack_array(&pk, 3);
    msgpack_pack_uint32(&pk, 1);
    msgpack_pack_uint32(&pk, SP_WIRE_TOKENS);
    msgpack_pack_map(&pk, 5);
    key(&pk, "request_id");
    msgpack_pack_uint32(&pk, 1);
    key(&pk, "token_ids");
    msgpack_pack_array(&pk, 2);
    msgpack_pack_uint32(&pk, 5);
    msgpack_pack_uint32(&pk, 6);
    key(&pk, "text");
    key(&pk, "ab");
    key(&pk, "finish_reason");
    msgpack_pack_nil(&pk);
    key(&pk, "logprobs");
    msgpack_pack_array(&pk, 1);
    msgpack_pack_float(&pk, -1.0f);
    finish(&sb);
    EXPECT(sb.data, sb.size, SP_EPROTO, "TOKENS", "one entry per token id");
    msgpack_sbuffer_destroy(&sb);

    /* A required string left NULL, and an unknown type, are caller errors. */
    wire_sample(SP_WIRE_RELEASE, 1, &in);
    in.release.reason = NULL;
    msgpack_sbuffer_init(&sb);
    assert_int_equal(sp_wire_encode(&sb, &in, err, sizeof err), SP_EINVAL);
    assert_string_equal(err, "RELEASE: key 'reason' is required but NULL");
    in.type = (enum sp_wire_type)77;
    assert_int_equal(sp_wire_encode(&sb, &in, err, sizeof err), SP_EINVAL);
    assert_int_equal(sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
}

static void names_and_senders(void **state)
{
    (void)state;
    assert_string_equal(sp_wire_type_name(SP_WIRE_LIVE_REQUEST), "LIVE_REQUEST");
    assert_string_equal(sp_wire_type_name(0), "UNKNOWN");
    assert_int_equal(sp_wire_type_senders(SP_WIRE_ASSIGN), SP_WIRE_FROM_SCHEDULER);
    assert_int_equal(sp_wire_type_senders(SP_WIRE_TOKENS), SP_WIRE_FROM_WORKER);
    assert_int_equal(sp_wire_type_senders(SP_WIRE_DRAIN),
                     SP_WIRE_FROM_WORKER | SP_WIRE_FROM_SCHEDULER);
    assert_int_equal(sp_wire_type_senders(SP_WIRE_REVOKE), SP_WIRE_FROM_SCHEDULER);
    assert_int_equal(sp_wire_type_senders(16), 0);
}

/* Writes one seed file per sample frame, plus one stream of several frames. */
static int write_corpus(const char *dir)
{
    char path[4096];
    msgpack_sbuffer all;
    msgpack_sbuffer_init(&all);
    ALL_TYPES
    {
        for (int full = 0; full <= 1; full++) {
            struct sp_wire_frame f;
            wire_sample(t, full, &f);
            msgpack_sbuffer sb;
            msgpack_sbuffer_init(&sb);
            if (sp_wire_encode(&sb, &f, NULL, 0) || sp_wire_encode(&all, &f, NULL, 0))
                return 1;
            snprintf(path, sizeof path, "%s/%02d-%s-%s", dir, t, sp_wire_type_name(t),
                     full ? "full" : "min");
            FILE *out = fopen(path, "wb");
            if (!out || fwrite(sb.data, 1, sb.size, out) != sb.size || fclose(out))
                return 1;
            msgpack_sbuffer_destroy(&sb);
        }
    }
    snprintf(path, sizeof path, "%s/stream-all", dir);
    FILE *out = fopen(path, "wb");
    if (!out || fwrite(all.data, 1, all.size, out) != all.size || fclose(out))
        return 1;
    msgpack_sbuffer_destroy(&all);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 3 && !strcmp(argv[1], "--write-corpus"))
        return write_corpus(argv[2]);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(roundtrip_every_type),      cmocka_unit_test(decoded_values),
        cmocka_unit_test(stream_byte_by_byte),       cmocka_unit_test(stream_random_splits),
        cmocka_unit_test(oversize_prefix_alone),     cmocka_unit_test(truncated_never_yields),
        cmocka_unit_test(garbage_msgpack),           cmocka_unit_test(wrong_version_and_type),
        cmocka_unit_test(missing_and_mistyped_keys), cmocka_unit_test(cross_field_rules),
        cmocka_unit_test(names_and_senders),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
