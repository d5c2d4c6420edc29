/*
 * Fuzz driver for the wire decoder: feeds the input to a streaming decoder in
 * splits derived from the input itself (so a crash reproduces from the file
 * alone), and for every frame it yields checks that encoding succeeds, that
 * the encoding decodes to an equal frame, and that re-encoding that frame
 * gives the same bytes. After a failure the decoder must stay failed with the
 * same code and a reason.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool/wire.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void die(const char *what, const struct sp_wire_frame *f)
{
    fprintf(stderr, "fuzz_wire: %s (frame type %s)\n", what, f ? sp_wire_type_name(f->type) : "-");
    abort();
}

static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void roundtrip(const struct sp_wire_frame *f)
{
    msgpack_sbuffer a, b;
    msgpack_sbuffer_init(&a);
    msgpack_sbuffer_init(&b);
    char err[200];
    if (sp_wire_encode(&a, f, err, sizeof err))
        die(err, f);
    /* Re-encoding may grow a frame (ints sent where floats go), so no limit here. */
    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, UINT32_MAX);
    struct sp_wire_frame g;
    if (sp_wire_decoder_feed(&d, a.data, a.size) || sp_wire_decoder_next(&d, &g) != 1)
        die(sp_wire_decoder_reason(&d), f);
    if (!sp_wire_frame_equal(f, &g))
        die("decode(encode(frame)) differs from frame", f);
    struct sp_wire_frame none;
    if (sp_wire_decoder_next(&d, &none) != SP_EAGAIN)
        die("bytes left after one encoded frame", f);
    if (sp_wire_encode(&b, &g, err, sizeof err))
        die(err, &g);
    if (a.size != b.size || memcmp(a.data, b.data, a.size))
        die("encoding is not canonical", f);
    sp_wire_frame_free(&g);
    sp_wire_decoder_free(&d);
    msgpack_sbuffer_destroy(&a);
    msgpack_sbuffer_destroy(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint64_t seed = 1469598103934665603ull; /* FNV-1a of the input picks the splits */
    for (size_t i = 0; i < size; i++)
        seed = (seed ^ data[i]) * 1099511628211ull;
    size_t max_chunk = (size_t[]){1, 3, 16, 256, SIZE_MAX}[mix(&seed) % 5];

    struct sp_wire_decoder d;
    sp_wire_decoder_init(&d, 1 << 20);
    size_t off = 0;
    int rc = SP_EAGAIN;
    while (off < size && (rc == SP_EAGAIN || rc == 1)) {
        size_t chunk = max_chunk == SIZE_MAX ? size - off : 1 + mix(&seed) % max_chunk;
        if (chunk > size - off)
            chunk = size - off;
        if (sp_wire_decoder_feed(&d, data + off, chunk))
            die("feed failed on a healthy decoder", NULL);
        off += chunk;
        struct sp_wire_frame f;
        while ((rc = sp_wire_decoder_next(&d, &f)) == 1) {
            roundtrip(&f);
            sp_wire_frame_free(&f);
        }
    }
    if (rc != SP_EAGAIN) {
        struct sp_wire_frame f;
        if (rc >= 0 || !sp_wire_decoder_reason(&d)[0])
            die("failure without a negative code and a reason", NULL);
        if (sp_wire_decoder_next(&d, &f) != rc || sp_wire_decoder_feed(&d, "", 0) != rc)
            die("decoder did not stay failed", NULL);
    }
    sp_wire_decoder_free(&d);
    return 0;
}
