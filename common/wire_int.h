/*
 * Private to common/wire*.c: the tables that describe each frame body, so
 * that encoding, decoding, equality and freeing are written once and driven
 * by data (wire_schema.c holds the tables, wire_codec.c the code).
 */
#ifndef SPOOL_WIRE_INT_H
#define SPOOL_WIRE_INT_H

#include <stddef.h>
#include <stdint.h>

#include "spool/wire.h"

enum wire_kind {
    WK_U64,          /* uint64_t; msgpack non-negative int */
    WK_U32,          /* uint32_t; msgpack non-negative int <= 2^32-1 */
    WK_I32,          /* int32_t; msgpack int in int32 range */
    WK_F64,          /* double; msgpack float 32/64 or int, sent as float 64 */
    WK_BOOL,         /* bool; msgpack bool */
    WK_STR,          /* char *, NUL-free; msgpack str */
    WK_TEXT,         /* char * + size_t length at n_off; msgpack str, any bytes */
    WK_CAPACITY,     /* enum sp_wire_capacity; msgpack str "spot" | "on-demand" */
    WK_STRUCT,       /* embedded struct described by sub; msgpack map */
    WK_STRUCT_ARRAY, /* pointer + uint32_t count at n_off; msgpack array of maps */
    WK_TOKEN_ARRAY,  /* int32_t * + count; msgpack array of ints in [0, 2^31-1] */
    WK_F32_ARRAY,    /* float * + count; msgpack array of numbers, sent as float 32 */
    WK_STR_ARRAY,    /* char ** + count; msgpack array of NUL-free str */
    WK_PROMPT,       /* struct sp_wire_prompt; msgpack array of token ids, or str */
};

/* A required field must be present. A WF_NIL field is sent as nil when absent. */
enum { WF_REQUIRED = 1, WF_NIL = 2 };

struct wire_schema;

struct wire_field {
    const char *key;
    uint8_t kind;
    uint8_t flags;
    int32_t off;     /* offset of the value in the struct */
    int32_t has_off; /* offset of its bool has_ flag, or -1 */
    int32_t n_off;   /* offset of the count (uint32_t) or text length (size_t), or -1 */
    const struct wire_schema *sub; /* WK_STRUCT and WK_STRUCT_ARRAY */
};

struct wire_schema {
    const char *name;
    size_t size; /* of the C struct */
    const struct wire_field *fields;
    unsigned n_fields;
};

/* The body schema of a frame type, or NULL for an unknown type. */
const struct wire_schema *sp__wire_body_schema(int type);

#endif
