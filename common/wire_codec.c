/*
 * Encoding, decoding, equality and freeing of frames, driven by the tables in
 * wire_schema.c. Decoded strings and arrays live in blocks chained from the
 * frame's `mem`, so one sp_wire_frame_free() releases a whole frame.
 */
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spool/wire.h"
#include "wire_int.h"

#define BODY_OFF offsetof(struct sp_wire_frame, reg)

/* One allocation owned by a decoded frame; data is suitably aligned for any type. */
struct block {
    struct block *next;
    max_align_t data[];
};

const char *sp_wire_type_name(int type)
{
    switch (type) {
#define XX(num, name, member)                                                                      \
    case num:                                                                                      \
        return #name;
        SP_WIRE_TYPE_MAP(XX)
#undef XX
    default:
        return "UNKNOWN";
    }
}

unsigned sp_wire_type_senders(int type)
{
    switch (type) {
    case SP_WIRE_REGISTER:
    case SP_WIRE_HEARTBEAT:
    case SP_WIRE_PROGRESS:
    case SP_WIRE_DONE:
    case SP_WIRE_RELEASE:
    case SP_WIRE_TOKENS:
    case SP_WIRE_USAGE:
        return SP_WIRE_FROM_WORKER;
    case SP_WIRE_REGISTERED:
    case SP_WIRE_ASSIGN:
    case SP_WIRE_LIVE_REQUEST:
    case SP_WIRE_CANCEL:
    case SP_WIRE_REVOKE:
        return SP_WIRE_FROM_SCHEDULER;
    case SP_WIRE_DRAIN:
    case SP_WIRE_GOODBYE:
    case SP_WIRE_ERROR:
        return SP_WIRE_FROM_WORKER | SP_WIRE_FROM_SCHEDULER;
    default:
        return 0;
    }
}

const char *sp_wire_capacity_name(enum sp_wire_capacity capacity)
{
    return capacity == SP_WIRE_ON_DEMAND ? "on-demand" : "spot";
}

void sp_wire_frame_free(struct sp_wire_frame *f)
{
    if (!f)
        return;
    struct block *b = f->mem;
    while (b) {
        struct block *next = b->next;
        free(b);
        b = next;
    }
    memset(f, 0, sizeof *f);
}

void sp_wire_frame_move(struct sp_wire_frame *dst, struct sp_wire_frame *src)
{
    *dst = *src;
    memset(src, 0, sizeof *src);
}

/* Field access by offset. */
#define AT(base, off, T)  ((T *)(void *)((char *)(base) + (off)))
#define CAT(base, off, T) ((const T *)(const void *)((const char *)(base) + (off)))

/* Rules that span fields, shared by encoder (SP_EINVAL) and decoder (SP_EPROTO). */
static const char *check_frame(const struct sp_wire_frame *f)
{
    if (f->type == SP_WIRE_TOKENS && f->tokens.n_logprobs != 0 &&
        f->tokens.n_logprobs != f->tokens.n_token_ids)
        return "key 'logprobs' must have one entry per token id";
    if (f->type == SP_WIRE_USAGE && f->usage.has_request_id == f->usage.has_shard_id)
        return "exactly one of the keys 'request_id' and 'shard_id' must be present";
    return NULL;
}

/*
 * Where a value sits in a body: a chain of keys and array indexes on the
 * stack, formatted ("models[1].digest") only when a message needs it.
 */
struct path {
    const struct path *up; /* NULL at the body */
    const char *key;       /* NULL for an array element */
    uint32_t index;
};

static size_t path_fmt(const struct path *p, char *buf, size_t cap)
{
    size_t n = p->up ? path_fmt(p->up, buf, cap) : 0;
    if (n >= cap)
        return n;
    int w = p->key ? snprintf(buf + n, cap - n, "%s%s", n ? "." : "", p->key)
                   : snprintf(buf + n, cap - n, "[%u]", p->index);
    return n + (w > 0 ? (size_t)w : 0);
}

/* ---- decoding ---- */

struct dec {
    struct block **mem;
    const char *frame; /* type name, for messages */
    char *err;
    size_t errcap;
};

static void *dalloc(struct dec *d, size_t n)
{
    struct block *b = malloc(sizeof *b + (n ? n : 1));
    if (!b)
        return NULL;
    b->next = *d->mem;
    *d->mem = b;
    return b->data;
}

static const char *obj_type_name(const msgpack_object *o)
{
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        return "nil";
    case MSGPACK_OBJECT_BOOLEAN:
        return "bool";
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return "non-negative int";
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return "negative int";
    case MSGPACK_OBJECT_FLOAT32:
        return "float 32";
    case MSGPACK_OBJECT_FLOAT64:
        return "float 64";
    case MSGPACK_OBJECT_STR:
        return "str";
    case MSGPACK_OBJECT_ARRAY:
        return "array";
    case MSGPACK_OBJECT_MAP:
        return "map";
    case MSGPACK_OBJECT_BIN:
        return "bin";
    case MSGPACK_OBJECT_EXT:
        return "ext";
    default:
        return "unknown";
    }
}

__attribute__((format(printf, 3, 4))) static int fail(struct dec *d, const struct path *path,
                                                      const char *fmt, ...)
{
    if (d->err && d->errcap) {
        char where[192];
        path_fmt(path, where, sizeof where);
        int n = snprintf(d->err, d->errcap, "%s: key '%s' ", d->frame, where);
        if (n >= 0 && (size_t)n < d->errcap) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(d->err + n, d->errcap - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return SP_EPROTO;
}

static int oom(struct dec *d)
{
    if (d->err && d->errcap)
        snprintf(d->err, d->errcap, "%s: out of memory while decoding", d->frame);
    return SP_ENOMEM;
}

static int wrong_type(struct dec *d, const struct path *path, const char *want,
                      const msgpack_object *o)
{
    return fail(d, path, "must be %s, got %s", want, obj_type_name(o));
}

/* Copies a msgpack str; NUL-free strings reject embedded NUL bytes. */
static int copy_str(struct dec *d, const struct path *path, const msgpack_object *o, bool nul_free,
                    const char **out, size_t *len)
{
    if (o->type != MSGPACK_OBJECT_STR)
        return wrong_type(d, path, "a str", o);
    uint32_t n = o->via.str.size;
    if (nul_free && n && memchr(o->via.str.ptr, '\0', n))
        return fail(d, path, "must not contain a NUL byte");
    char *s = dalloc(d, (size_t)n + 1);
    if (!s)
        return oom(d);
    if (n)
        memcpy(s, o->via.str.ptr, n);
    s[n] = '\0';
    *out = s;
    if (len)
        *len = n;
    return 0;
}

static int get_token(struct dec *d, const struct path *path, const msgpack_object *o, int32_t *out)
{
    if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
        return wrong_type(d, path, "a token id (int in [0, 2^31-1])", o);
    if (o->via.u64 > INT32_MAX)
        return fail(d, path, "= %llu is out of range for a token id",
                    (unsigned long long)o->via.u64);
    *out = (int32_t)o->via.u64;
    return 0;
}

static int get_number(struct dec *d, const struct path *path, const msgpack_object *o, double *out)
{
    switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        *out = o->via.f64;
        return 0;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        *out = (double)o->via.u64;
        return 0;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        *out = (double)o->via.i64;
        return 0;
    default:
        return wrong_type(d, path, "a number", o);
    }
}

/* Converts without undefined behaviour: finite values beyond float's range become infinities. */
static float to_float(double x)
{
    if (x > FLT_MAX)
        return INFINITY;
    if (x < -FLT_MAX)
        return -INFINITY;
    return (float)x;
}

static int decode_struct(struct dec *d, const struct wire_schema *s, const msgpack_object *map,
                         void *base, const struct path *at);

static int decode_array(struct dec *d, const struct wire_field *fl, const msgpack_object *o,
                        void *base, const struct path *path)
{
    if (o->type != MSGPACK_OBJECT_ARRAY)
        return wrong_type(d, path, "an array", o);
    uint32_t n = o->via.array.size;
    const msgpack_object *items = o->via.array.ptr;
    struct path ip = {path, NULL, 0};
    const struct path *ipath = &ip;
    size_t elem = fl->kind == WK_STRUCT_ARRAY  ? fl->sub->size
                  : fl->kind == WK_TOKEN_ARRAY ? sizeof(int32_t)
                  : fl->kind == WK_F32_ARRAY   ? sizeof(float)
                                               : sizeof(char *);
    void *arr = NULL;
    if (n) {
        arr = dalloc(d, (size_t)n * elem);
        if (!arr)
            return oom(d);
        memset(arr, 0, (size_t)n * elem);
    }
    for (uint32_t i = 0; i < n; i++) {
        ip.index = i;
        int rc = 0;
        double x = 0; /* set by get_number; initialised for -O3's maybe-uninitialized */
        switch (fl->kind) {
        case WK_STRUCT_ARRAY:
            if (items[i].type != MSGPACK_OBJECT_MAP)
                return wrong_type(d, ipath, "a map", &items[i]);
            rc = decode_struct(d, fl->sub, &items[i], (char *)arr + i * elem, ipath);
            break;
        case WK_TOKEN_ARRAY:
            rc = get_token(d, ipath, &items[i], (int32_t *)arr + i);
            break;
        case WK_F32_ARRAY:
            rc = get_number(d, ipath, &items[i], &x);
            if (rc == 0)
                ((float *)arr)[i] = to_float(x);
            break;
        default: /* WK_STR_ARRAY */
            rc = copy_str(d, ipath, &items[i], true, (const char **)arr + i, NULL);
            break;
        }
        if (rc)
            return rc;
    }
    *AT(base, fl->off, void *) = arr;
    *AT(base, fl->n_off, uint32_t) = n;
    return 0;
}

static int decode_value(struct dec *d, const struct wire_field *fl, const msgpack_object *o,
                        void *base, const struct path *path)
{
    double x = 0; /* set by get_number; initialised for -O3's maybe-uninitialized */
    switch (fl->kind) {
    case WK_U64:
        if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            return wrong_type(d, path, "a non-negative int", o);
        *AT(base, fl->off, uint64_t) = o->via.u64;
        break;
    case WK_U32:
        if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER)
            return wrong_type(d, path, "a non-negative int", o);
        if (o->via.u64 > UINT32_MAX)
            return fail(d, path, "= %llu is out of range (at most 2^32-1)",
                        (unsigned long long)o->via.u64);
        *AT(base, fl->off, uint32_t) = (uint32_t)o->via.u64;
        break;
    case WK_I32:
        if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
            if (o->via.u64 > INT32_MAX)
                return fail(d, path, "= %llu is out of range for int32",
                            (unsigned long long)o->via.u64);
            *AT(base, fl->off, int32_t) = (int32_t)o->via.u64;
        } else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
            if (o->via.i64 < INT32_MIN)
                return fail(d, path, "= %lld is out of range for int32", (long long)o->via.i64);
            *AT(base, fl->off, int32_t) = (int32_t)o->via.i64;
        } else {
            return wrong_type(d, path, "an int", o);
        }
        break;
    case WK_F64:
        if (get_number(d, path, o, &x))
            return SP_EPROTO;
        *AT(base, fl->off, double) = x;
        break;
    case WK_BOOL:
        if (o->type != MSGPACK_OBJECT_BOOLEAN)
            return wrong_type(d, path, "a bool", o);
        *AT(base, fl->off, bool) = o->via.boolean;
        break;
    case WK_STR:
        return copy_str(d, path, o, true, AT(base, fl->off, const char *), NULL);
    case WK_TEXT:
        return copy_str(d, path, o, false, AT(base, fl->off, const char *),
                        AT(base, fl->n_off, size_t));
    case WK_CAPACITY:
        if (o->type != MSGPACK_OBJECT_STR)
            return wrong_type(d, path, "a str", o);
        if (o->via.str.size == 4 && !memcmp(o->via.str.ptr, "spot", 4))
            *AT(base, fl->off, enum sp_wire_capacity) = SP_WIRE_SPOT;
        else if (o->via.str.size == 9 && !memcmp(o->via.str.ptr, "on-demand", 9))
            *AT(base, fl->off, enum sp_wire_capacity) = SP_WIRE_ON_DEMAND;
        else
            return fail(d, path, "must be \"spot\" or \"on-demand\"");
        break;
    case WK_STRUCT:
        if (o->type != MSGPACK_OBJECT_MAP)
            return wrong_type(d, path, "a map", o);
        return decode_struct(d, fl->sub, o, AT(base, fl->off, char), path);
    case WK_PROMPT: {
        struct sp_wire_prompt *p = AT(base, fl->off, struct sp_wire_prompt);
        if (o->type == MSGPACK_OBJECT_STR) {
            p->is_text = true;
            return copy_str(d, path, o, false, &p->text, &p->text_len);
        }
        if (o->type != MSGPACK_OBJECT_ARRAY)
            return wrong_type(d, path, "an array of token ids or a str", o);
        static const struct wire_field tokens = {
            "prompt", WK_TOKEN_ARRAY,
            0,        offsetof(struct sp_wire_prompt, tokens),
            -1,       offsetof(struct sp_wire_prompt, n_tokens),
            NULL};
        return decode_array(d, &tokens, o, p, path);
    }
    default:
        return decode_array(d, fl, o, base, path);
    }
    return 0;
}

static int decode_struct(struct dec *d, const struct wire_schema *s, const msgpack_object *map,
                         void *base, const struct path *at)
{
    const msgpack_object_kv *kv = map->via.map.ptr;
    uint32_t n = map->via.map.size;
    for (uint32_t i = 0; i < n; i++)
        if (kv[i].key.type != MSGPACK_OBJECT_STR) {
            if (d->err && d->errcap) {
                char where[192] = "body";
                if (at)
                    path_fmt(at, where, sizeof where);
                snprintf(d->err, d->errcap, "%s: map '%s' has a key of type %s (keys are str)",
                         d->frame, where, obj_type_name(&kv[i].key));
            }
            return SP_EPROTO;
        }
    for (unsigned fi = 0; fi < s->n_fields; fi++) {
        const struct wire_field *fl = &s->fields[fi];
        size_t klen = strlen(fl->key);
        const msgpack_object *found = NULL;
        struct path path = {at, fl->key, 0};
        for (uint32_t i = 0; i < n; i++) {
            if (kv[i].key.via.str.size != klen || memcmp(kv[i].key.via.str.ptr, fl->key, klen))
                continue;
            if (found)
                return fail(d, &path, "appears twice");
            found = &kv[i].val;
        }
        if (found && (fl->flags & WF_NIL) && found->type == MSGPACK_OBJECT_NIL)
            found = NULL;
        if (!found) {
            if (fl->flags & WF_REQUIRED)
                return fail(d, &path, "is missing");
            continue;
        }
        int rc = decode_value(d, fl, found, base, &path);
        if (rc)
            return rc;
        if (fl->has_off >= 0)
            *AT(base, fl->has_off, bool) = true;
    }
    return 0;
}

int sp_wire_decode_object(const msgpack_object *obj, struct sp_wire_frame *f, char *err,
                          size_t errcap)
{
    memset(f, 0, sizeof *f);
    if (err && errcap)
        err[0] = '\0';
    const char *why = NULL;
    char buf[128];
    if (obj->type != MSGPACK_OBJECT_ARRAY || obj->via.array.size != 3) {
        snprintf(buf, sizeof buf, "a frame must be the array [version, type, body], got %s%s",
                 obj_type_name(obj), obj->type == MSGPACK_OBJECT_ARRAY ? " of another length" : "");
        why = buf;
    } else if (obj->via.array.ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER) {
        snprintf(buf, sizeof buf, "frame version must be a non-negative int, got %s",
                 obj_type_name(&obj->via.array.ptr[0]));
        why = buf;
    } else if (obj->via.array.ptr[0].via.u64 != SP_WIRE_VERSION) {
        snprintf(buf, sizeof buf, "protocol version %llu is not supported (this side speaks %d)",
                 (unsigned long long)obj->via.array.ptr[0].via.u64, SP_WIRE_VERSION);
        why = buf;
    } else if (obj->via.array.ptr[1].type != MSGPACK_OBJECT_POSITIVE_INTEGER ||
               !sp__wire_body_schema(
                   obj->via.array.ptr[1].via.u64 > 1000 ? 0 : (int)obj->via.array.ptr[1].via.u64)) {
        const msgpack_object *t = &obj->via.array.ptr[1];
        if (t->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
            snprintf(buf, sizeof buf, "unknown frame type %llu", (unsigned long long)t->via.u64);
        else
            snprintf(buf, sizeof buf, "frame type must be a non-negative int, got %s",
                     obj_type_name(t));
        why = buf;
    } else if (obj->via.array.ptr[2].type != MSGPACK_OBJECT_MAP) {
        snprintf(buf, sizeof buf, "%s: body must be a map, got %s",
                 sp_wire_type_name((int)obj->via.array.ptr[1].via.u64),
                 obj_type_name(&obj->via.array.ptr[2]));
        why = buf;
    }
    if (why) {
        if (err && errcap)
            snprintf(err, errcap, "%s", why);
        return SP_EPROTO;
    }
    int type = (int)obj->via.array.ptr[1].via.u64;
    struct block *mem = NULL;
    struct dec d = {&mem, sp_wire_type_name(type), err, errcap};
    f->type = (enum sp_wire_type)type;
    int rc = decode_struct(&d, sp__wire_body_schema(type), &obj->via.array.ptr[2],
                           (char *)f + BODY_OFF, NULL);
    f->mem = mem;
    if (!rc && (why = check_frame(f)) != NULL) {
        if (err && errcap)
            snprintf(err, errcap, "%s: %s", d.frame, why);
        rc = SP_EPROTO;
    }
    if (rc)
        sp_wire_frame_free(f);
    return rc;
}

/* ---- encoding ---- */

struct enc {
    msgpack_packer pk;
    const char *frame;
    char *err;
    size_t errcap;
    int rc;
};

static void enc_fail(struct enc *e, const struct path *path, const char *what)
{
    if (e->rc)
        return;
    e->rc = SP_EINVAL;
    if (e->err && e->errcap) {
        char where[192];
        path_fmt(path, where, sizeof where);
        snprintf(e->err, e->errcap, "%s: key '%s' %s", e->frame, where, what);
    }
}

static void pk(struct enc *e, int r)
{
    if (r && !e->rc)
        e->rc = SP_ENOMEM;
}

static void enc_str(struct enc *e, const char *s, size_t n)
{
    pk(e, msgpack_pack_str(&e->pk, n));
    pk(e, msgpack_pack_str_body(&e->pk, s, n));
}

static bool field_present(const struct wire_field *fl, const void *base)
{
    if (fl->flags & (WF_REQUIRED | WF_NIL))
        return true;
    if (fl->has_off >= 0)
        return *CAT(base, fl->has_off, bool);
    if (fl->kind == WK_STR)
        return *CAT(base, fl->off, char *) != NULL;
    return *CAT(base, fl->n_off, uint32_t) != 0; /* optional arrays */
}

static void encode_struct(struct enc *e, const struct wire_schema *s, const void *base,
                          const struct path *at);

static void encode_tokens(struct enc *e, const int32_t *ids, uint32_t n, const struct path *path)
{
    if (n && !ids)
        return enc_fail(e, path, "has a count but no array");
    pk(e, msgpack_pack_array(&e->pk, n));
    for (uint32_t i = 0; i < n; i++) {
        if (ids[i] < 0)
            return enc_fail(e, path, "holds a negative token id");
        pk(e, msgpack_pack_uint32(&e->pk, (uint32_t)ids[i]));
    }
}

static void encode_value(struct enc *e, const struct wire_field *fl, const void *base,
                         const struct path *path)
{
    struct path ip = {path, NULL, 0};
    const struct path *ipath = &ip;
    switch (fl->kind) {
    case WK_U64:
        pk(e, msgpack_pack_uint64(&e->pk, *CAT(base, fl->off, uint64_t)));
        break;
    case WK_U32:
        pk(e, msgpack_pack_uint32(&e->pk, *CAT(base, fl->off, uint32_t)));
        break;
    case WK_I32:
        pk(e, msgpack_pack_int32(&e->pk, *CAT(base, fl->off, int32_t)));
        break;
    case WK_F64:
        pk(e, msgpack_pack_double(&e->pk, *CAT(base, fl->off, double)));
        break;
    case WK_BOOL:
        pk(e, *CAT(base, fl->off, bool) ? msgpack_pack_true(&e->pk) : msgpack_pack_false(&e->pk));
        break;
    case WK_STR: {
        const char *s = *CAT(base, fl->off, char *);
        if (!s && (fl->flags & WF_NIL))
            pk(e, msgpack_pack_nil(&e->pk));
        else if (!s)
            enc_fail(e, path, "is required but NULL");
        else
            enc_str(e, s, strlen(s));
        break;
    }
    case WK_TEXT: {
        const char *s = *CAT(base, fl->off, char *);
        size_t n = *CAT(base, fl->n_off, size_t);
        if (!s && n)
            return enc_fail(e, path, "has a length but no text");
        if (n > UINT32_MAX)
            return enc_fail(e, path, "is longer than 4 GiB");
        enc_str(e, s ? s : "", n);
        break;
    }
    case WK_CAPACITY: {
        const char *name = sp_wire_capacity_name(*CAT(base, fl->off, enum sp_wire_capacity));
        enc_str(e, name, strlen(name));
        break;
    }
    case WK_STRUCT:
        encode_struct(e, fl->sub, CAT(base, fl->off, char), path);
        break;
    case WK_PROMPT: {
        const struct sp_wire_prompt *p = CAT(base, fl->off, struct sp_wire_prompt);
        if (p->is_text) {
            if (!p->text && p->text_len)
                return enc_fail(e, path, "has a length but no text");
            enc_str(e, p->text ? p->text : "", p->text_len);
        } else {
            encode_tokens(e, p->tokens, p->n_tokens, path);
        }
        break;
    }
    case WK_TOKEN_ARRAY:
        encode_tokens(e, *CAT(base, fl->off, int32_t *), *CAT(base, fl->n_off, uint32_t), path);
        break;
    default: { /* WK_STRUCT_ARRAY, WK_F32_ARRAY, WK_STR_ARRAY */
        const char *arr = *CAT(base, fl->off, char *);
        uint32_t n = *CAT(base, fl->n_off, uint32_t);
        if (n && !arr)
            return enc_fail(e, path, "has a count but no array");
        pk(e, msgpack_pack_array(&e->pk, n));
        for (uint32_t i = 0; i < n && !e->rc; i++) {
            ip.index = i;
            if (fl->kind == WK_STRUCT_ARRAY) {
                encode_struct(e, fl->sub, arr + i * fl->sub->size, ipath);
            } else if (fl->kind == WK_F32_ARRAY) {
                pk(e, msgpack_pack_float(&e->pk, ((const float *)(const void *)arr)[i]));
            } else {
                const char *s = ((char *const *)(const void *)arr)[i];
                if (!s)
                    return enc_fail(e, ipath, "is NULL");
                enc_str(e, s, strlen(s));
            }
        }
        break;
    }
    }
}

static void encode_struct(struct enc *e, const struct wire_schema *s, const void *base,
                          const struct path *at)
{
    uint32_t n = 0;
    for (unsigned fi = 0; fi < s->n_fields; fi++)
        n += field_present(&s->fields[fi], base);
    pk(e, msgpack_pack_map(&e->pk, n));
    for (unsigned fi = 0; fi < s->n_fields && !e->rc; fi++) {
        const struct wire_field *fl = &s->fields[fi];
        if (!field_present(fl, base))
            continue;
        struct path path = {at, fl->key, 0};
        enc_str(e, fl->key, strlen(fl->key));
        encode_value(e, fl, base, &path);
    }
}

int sp_wire_encode(msgpack_sbuffer *out, const struct sp_wire_frame *f, char *err, size_t errcap)
{
    const struct wire_schema *s = sp__wire_body_schema(f->type);
    if (err && errcap)
        err[0] = '\0';
    if (!s) {
        if (err && errcap)
            snprintf(err, errcap, "cannot encode unknown frame type %d", (int)f->type);
        return SP_EINVAL;
    }
    const char *why = check_frame(f);
    if (why) {
        if (err && errcap)
            snprintf(err, errcap, "%s: %s", s->name, why);
        return SP_EINVAL;
    }
    size_t start = out->size;
    struct enc e = {.frame = s->name, .err = err, .errcap = errcap};
    msgpack_packer_init(&e.pk, out, msgpack_sbuffer_write);
    static const char zero[SP_WIRE_PREFIX];
    pk(&e, msgpack_sbuffer_write(out, zero, sizeof zero));
    pk(&e, msgpack_pack_array(&e.pk, 3));
    pk(&e, msgpack_pack_uint32(&e.pk, SP_WIRE_VERSION));
    pk(&e, msgpack_pack_uint32(&e.pk, (uint32_t)f->type));
    if (!e.rc)
        encode_struct(&e, s, (const char *)f + BODY_OFF, NULL);
    if (!e.rc && out->size - start - SP_WIRE_PREFIX > UINT32_MAX) {
        e.rc = SP_ETOOBIG;
        if (err && errcap)
            snprintf(err, errcap, "%s: frame larger than 4 GiB", s->name);
    }
    if (e.rc) {
        if (e.rc == SP_ENOMEM && err && errcap)
            snprintf(err, errcap, "%s: out of memory while encoding", s->name);
        if (out->data)
            out->size = start;
        return e.rc;
    }
    size_t n = out->size - start - SP_WIRE_PREFIX;
    unsigned char *p = (unsigned char *)out->data + start;
    p[0] = (unsigned char)(n >> 24);
    p[1] = (unsigned char)(n >> 16);
    p[2] = (unsigned char)(n >> 8);
    p[3] = (unsigned char)n;
    return 0;
}

/* ---- equality ---- */

static bool same_double(double a, double b)
{
    return (isnan(a) && isnan(b)) || !memcmp(&a, &b, sizeof a);
}

static bool same_str(const char *a, const char *b)
{
    return a == b || (a && b && !strcmp(a, b));
}

static bool same_bytes(const char *a, size_t na, const char *b, size_t nb)
{
    return na == nb && (na == 0 || !memcmp(a, b, na));
}

static bool equal_struct(const struct wire_schema *s, const void *a, const void *b);

static bool equal_tokens(const int32_t *a, uint32_t na, const int32_t *b, uint32_t nb)
{
    return na == nb && (na == 0 || !memcmp(a, b, na * sizeof *a));
}

static bool equal_value(const struct wire_field *fl, const void *a, const void *b)
{
    switch (fl->kind) {
    case WK_U64:
        return *CAT(a, fl->off, uint64_t) == *CAT(b, fl->off, uint64_t);
    case WK_U32:
        return *CAT(a, fl->off, uint32_t) == *CAT(b, fl->off, uint32_t);
    case WK_I32:
        return *CAT(a, fl->off, int32_t) == *CAT(b, fl->off, int32_t);
    case WK_F64:
        return same_double(*CAT(a, fl->off, double), *CAT(b, fl->off, double));
    case WK_BOOL:
        return *CAT(a, fl->off, bool) == *CAT(b, fl->off, bool);
    case WK_STR:
        return same_str(*CAT(a, fl->off, char *), *CAT(b, fl->off, char *));
    case WK_TEXT:
        return same_bytes(*CAT(a, fl->off, char *), *CAT(a, fl->n_off, size_t),
                          *CAT(b, fl->off, char *), *CAT(b, fl->n_off, size_t));
    case WK_CAPACITY:
        return *CAT(a, fl->off, enum sp_wire_capacity) == *CAT(b, fl->off, enum sp_wire_capacity);
    case WK_STRUCT:
        return equal_struct(fl->sub, CAT(a, fl->off, char), CAT(b, fl->off, char));
    case WK_PROMPT: {
        const struct sp_wire_prompt *pa = CAT(a, fl->off, struct sp_wire_prompt);
        const struct sp_wire_prompt *pb = CAT(b, fl->off, struct sp_wire_prompt);
        if (pa->is_text != pb->is_text)
            return false;
        return pa->is_text ? same_bytes(pa->text, pa->text_len, pb->text, pb->text_len)
                           : equal_tokens(pa->tokens, pa->n_tokens, pb->tokens, pb->n_tokens);
    }
    case WK_TOKEN_ARRAY:
        return equal_tokens(*CAT(a, fl->off, int32_t *), *CAT(a, fl->n_off, uint32_t),
                            *CAT(b, fl->off, int32_t *), *CAT(b, fl->n_off, uint32_t));
    default: {
        const char *xa = *CAT(a, fl->off, char *), *xb = *CAT(b, fl->off, char *);
        uint32_t n = *CAT(a, fl->n_off, uint32_t);
        if (n != *CAT(b, fl->n_off, uint32_t))
            return false;
        for (uint32_t i = 0; i < n; i++) {
            if (fl->kind == WK_STRUCT_ARRAY) {
                if (!equal_struct(fl->sub, xa + i * fl->sub->size, xb + i * fl->sub->size))
                    return false;
            } else if (fl->kind == WK_F32_ARRAY) {
                float fa = ((const float *)(const void *)xa)[i];
                float fb = ((const float *)(const void *)xb)[i];
                if (!((isnan(fa) && isnan(fb)) || !memcmp(&fa, &fb, sizeof fa)))
                    return false;
            } else if (!same_str(((char *const *)(const void *)xa)[i],
                                 ((char *const *)(const void *)xb)[i])) {
                return false;
            }
        }
        return true;
    }
    }
}

static bool equal_struct(const struct wire_schema *s, const void *a, const void *b)
{
    for (unsigned fi = 0; fi < s->n_fields; fi++) {
        const struct wire_field *fl = &s->fields[fi];
        if (fl->has_off >= 0) {
            bool ha = *CAT(a, fl->has_off, bool);
            if (ha != *CAT(b, fl->has_off, bool))
                return false;
            if (!ha)
                continue;
        }
        if (!equal_value(fl, a, b))
            return false;
    }
    return true;
}

bool sp_wire_frame_equal(const struct sp_wire_frame *a, const struct sp_wire_frame *b)
{
    if (a->type != b->type)
        return false;
    const struct wire_schema *s = sp__wire_body_schema(a->type);
    if (!s)
        return true;
    return equal_struct(s, (const char *)a + BODY_OFF, (const char *)b + BODY_OFF);
}
