/*
 * Fuzz driver for multipart/form-data parsing (scheduler/multipart.c). The
 * first byte gives the boundary's length (1 to 70), the next bytes the
 * boundary, the rest the body. Every part must lie inside the body, carry a
 * non-empty name, and be followed by its delimiter; a failure must explain
 * itself.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "multipart.h"
#include "spool/error.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t blen = 1 + data[0] % SCHED_MP_MAX_BOUNDARY;
    if (size < 1 + blen)
        return 0;
    char boundary[SCHED_MP_MAX_BOUNDARY + 1];
    memcpy(boundary, data + 1, blen);
    boundary[blen] = '\0';
    if (strlen(boundary) != blen)
        return 0; /* a NUL inside: not a boundary a header could carry */
    const uint8_t *body = data + 1 + blen;
    size_t len = size - 1 - blen;
    /* A copy of exactly len bytes, so that ASan sees any read past the end. */
    uint8_t *copy = malloc(len ? len : 1);
    if (!copy)
        return 0;
    memcpy(copy, body, len);
    struct sched_mp_part parts[8];
    size_t n = 0;
    char err[256] = "";
    int rc = sched_mp_parse(copy, len, boundary, parts, 8, &n, err, sizeof err);
    if (rc != 0 && (rc != SP_EINVAL || !err[0]))
        abort();
    if (n > 8)
        abort();
    for (size_t i = 0; i < n; i++) {
        const struct sched_mp_part *p = &parts[i];
        if (!p->name[0] || strnlen(p->name, sizeof p->name) == sizeof p->name ||
            strnlen(p->filename, sizeof p->filename) == sizeof p->filename)
            abort();
        if (p->data < (const char *)copy || p->data + p->len > (const char *)copy + len)
            abort();
        const char *after = p->data + p->len;
        if ((size_t)((const char *)copy + len - after) < 4 + blen ||
            memcmp(after, "\r\n--", 4) != 0 || memcmp(after + 4, boundary, blen) != 0)
            abort();
    }
    free(copy);
    return 0;
}
