/*
 * The streaming frame decoder: reassembles length-prefixed frames from bytes
 * fed in any split, checks each frame's msgpack before msgpack-c sees it, and
 * turns it into a typed frame (wire_codec.c).
 *
 * Why a check before msgpack-c: msgpack-c allocates an array's or map's
 * element table as soon as it reads the header, so a 6-byte frame announcing
 * 2^32 elements would make it ask for 64 GiB. The walk below rejects any
 * container that announces more elements than bytes remain, which bounds
 * msgpack-c's memory by a small multiple of the frame size.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool/wire.h"

/* Deepest nesting accepted; below msgpack-c's own limit (32), above any frame's needs. */
#define MAX_DEPTH 24
/* Buffer kept between frames; a larger one (grown for a big frame) is freed once empty. */
#define KEEP_BUF (256 * 1024)

__attribute__((format(printf, 3, 4))) static int fail(struct sp_wire_decoder *d, int err,
                                                      const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->reason, sizeof d->reason, fmt, ap);
    va_end(ap);
    d->err = err;
    return err;
}

void sp_wire_decoder_init(struct sp_wire_decoder *d, uint32_t max_frame)
{
    memset(d, 0, sizeof *d);
    d->max_frame = max_frame ? max_frame : SP_WIRE_MAX_FRAME_DEFAULT;
}

void sp_wire_decoder_free(struct sp_wire_decoder *d)
{
    free(d->buf);
    memset(d, 0, sizeof *d);
}

const char *sp_wire_decoder_reason(const struct sp_wire_decoder *d)
{
    return d->reason;
}

size_t sp_wire_decoder_pending(const struct sp_wire_decoder *d)
{
    return d->len - d->pos;
}

int sp_wire_decoder_feed(struct sp_wire_decoder *d, const void *bytes, size_t n)
{
    if (d->err)
        return d->err;
    if (d->pos) { /* drop consumed bytes first, so the buffer holds at most one frame's worth */
        memmove(d->buf, d->buf + d->pos, d->len - d->pos);
        d->len -= d->pos;
        d->pos = 0;
    }
    if (n > d->cap - d->len) {
        size_t cap = d->cap ? d->cap : 4096;
        while (cap - d->len < n)
            cap *= 2;
        uint8_t *buf = realloc(d->buf, cap);
        if (!buf)
            return fail(d, SP_ENOMEM, "out of memory buffering %zu bytes", d->len + n);
        d->buf = buf;
        d->cap = cap;
    }
    if (n)
        memcpy(d->buf + d->len, bytes, n);
    d->len += n;
    return 0;
}

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/*
 * Checks that p[0, n) is exactly one well-formed msgpack object, nested at
 * most MAX_DEPTH deep, with no container announcing more elements than bytes
 * remain. Returns NULL or why not (in why).
 */
static const char *check_msgpack(const uint8_t *p, size_t n, char *why, size_t whycap)
{
    uint64_t rem[MAX_DEPTH + 1]; /* elements still to read at each level */
    uint64_t pending = 1;        /* elements still to read at all levels */
    int depth = 0;
    size_t pos = 0;
    rem[0] = 1;
    while (depth >= 0) {
        if (rem[depth] == 0) {
            depth--;
            continue;
        }
        rem[depth]--;
        pending--;
        if (pos >= n)
            goto truncated;
        uint8_t b = p[pos++];
        uint64_t items = 0, skip = 0;
        int lenbytes = 0;
        if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) {
            /* fixint, nil, bool */
        } else if (b <= 0x8f) {
            items = 2 * (uint64_t)(b & 0x0f);
        } else if (b <= 0x9f) {
            items = b & 0x0f;
        } else if (b <= 0xbf) {
            skip = b & 0x1f;
        } else if (b == 0xc1) {
            snprintf(why, whycap, "reserved byte 0xc1 at offset %zu", pos - 1);
            return why;
        } else {
            switch (b) {
            case 0xc4:
            case 0xc5:
            case 0xc6: /* bin 8/16/32 */
            case 0xd9:
            case 0xda:
            case 0xdb: /* str 8/16/32 */
                lenbytes = b <= 0xc6 ? 1 << (b - 0xc4) : 1 << (b - 0xd9);
                break;
            case 0xc7:
            case 0xc8:
            case 0xc9: /* ext 8/16/32: length, then a type byte */
                lenbytes = 1 << (b - 0xc7);
                skip = 1;
                break;
            case 0xca:
                skip = 4;
                break;
            case 0xcb:
                skip = 8;
                break;
            case 0xcc:
            case 0xcd:
            case 0xce:
            case 0xcf:
                skip = 1u << (b - 0xcc);
                break;
            case 0xd0:
            case 0xd1:
            case 0xd2:
            case 0xd3:
                skip = 1u << (b - 0xd0);
                break;
            case 0xd4:
            case 0xd5:
            case 0xd6:
            case 0xd7:
            case 0xd8: /* fixext: type + data */
                skip = 1 + (1u << (b - 0xd4));
                break;
            case 0xdc:
            case 0xdd: /* array 16/32 */
            case 0xde:
            case 0xdf: /* map 16/32 */ {
                int cb = (b == 0xdc || b == 0xde) ? 2 : 4;
                if (n - pos < (size_t)cb)
                    goto truncated;
                items = be(p + pos, cb);
                pos += (size_t)cb;
                if (b >= 0xde)
                    items *= 2;
                break;
            }
            default:
                goto truncated; /* not reached: every byte value is covered above */
            }
            if (lenbytes) {
                if (n - pos < (size_t)lenbytes)
                    goto truncated;
                skip += be(p + pos, lenbytes);
                pos += (size_t)lenbytes;
            }
        }
        if (skip > n - pos)
            goto truncated;
        pos += (size_t)skip;
        if (items) {
            pending += items;
            if (pending > n - pos)
                goto truncated;
            if (depth == MAX_DEPTH) {
                snprintf(why, whycap, "msgpack nested deeper than %d levels", MAX_DEPTH);
                return why;
            }
            rem[++depth] = items;
        }
    }
    if (pos != n) {
        snprintf(why, whycap, "%zu trailing bytes after the msgpack object", n - pos);
        return why;
    }
    return NULL;
truncated:
    snprintf(why, whycap, "msgpack truncated or announcing more elements than the frame holds");
    return why;
}

int sp_wire_decoder_next(struct sp_wire_decoder *d, struct sp_wire_frame *f)
{
    memset(f, 0, sizeof *f);
    if (d->err)
        return d->err;
    size_t avail = d->len - d->pos;
    if (avail < SP_WIRE_PREFIX)
        return SP_EAGAIN;
    const uint8_t *p = d->buf + d->pos;
    uint64_t n = be(p, SP_WIRE_PREFIX);
    unsigned long long idx = (unsigned long long)d->frames + 1;
    if (n > d->max_frame)
        return fail(d, SP_ETOOBIG, "frame %llu announces %llu bytes, over the limit of %u", idx,
                    (unsigned long long)n, d->max_frame);
    if (n == 0)
        return fail(d, SP_ECORRUPT, "frame %llu is empty (length 0)", idx);
    if (avail - SP_WIRE_PREFIX < n)
        return SP_EAGAIN;
    p += SP_WIRE_PREFIX;
    char why[160];
    if (check_msgpack(p, (size_t)n, why, sizeof why))
        return fail(d, SP_ECORRUPT, "frame %llu (%llu bytes) is not one msgpack object: %s", idx,
                    (unsigned long long)n, why);
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    size_t off = 0;
    msgpack_unpack_return ur = msgpack_unpack_next(&up, (const char *)p, (size_t)n, &off);
    if (ur != MSGPACK_UNPACK_SUCCESS || off != n) {
        msgpack_unpacked_destroy(&up);
        if (ur == MSGPACK_UNPACK_NOMEM_ERROR)
            return fail(d, SP_ENOMEM, "out of memory unpacking frame %llu (%llu bytes)", idx,
                        (unsigned long long)n);
        return fail(d, SP_ECORRUPT, "frame %llu (%llu bytes) is not one msgpack object", idx,
                    (unsigned long long)n);
    }
    char err[200];
    int rc = sp_wire_decode_object(&up.data, f, err, sizeof err);
    msgpack_unpacked_destroy(&up);
    if (rc)
        return fail(d, rc, "frame %llu: %s", idx, err);
    d->pos += SP_WIRE_PREFIX + (size_t)n;
    if (d->pos == d->len) {
        d->pos = d->len = 0;
        if (d->cap > KEEP_BUF) { /* a rare big frame should not pin its buffer for good */
            free(d->buf);
            d->buf = NULL;
            d->cap = 0;
        }
    }
    d->frames++;
    return 1;
}
