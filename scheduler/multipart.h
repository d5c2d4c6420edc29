/*
 * multipart/form-data bodies (RFC 7578), as the openai clients upload files.
 *
 * Pure functions over a body held in memory: nothing is allocated, parts
 * point into the caller's body (which must outlive them); only the
 * Content-Disposition parameters are copied (unquoted) into the part. Safe
 * from any thread.
 */
#ifndef SPOOL_SCHEDULER_MULTIPART_H
#define SPOOL_SCHEDULER_MULTIPART_H

#include <stdbool.h>
#include <stddef.h>

#define SCHED_MP_MAX_BOUNDARY 70 /* RFC 2046 */

struct sched_mp_part {
    char name[128];     /* Content-Disposition name="..." (required) */
    char filename[256]; /* filename="..." (%22, %0A, %0D decoded), "" when absent */
    bool has_filename;  /* a filename parameter was present (even empty) */
    const char *data;   /* the part's bytes, inside the body */
    size_t len;
};

/*
 * Reads the boundary parameter of a Content-Type header value
 * ("multipart/form-data; boundary=..." or quoted) into out (at least
 * SCHED_MP_MAX_BOUNDARY + 1 bytes). Returns 0, or SP_EINVAL with a message in
 * err when the type is not multipart/form-data or the boundary is missing,
 * empty or longer than 70 characters.
 */
int sched_mp_boundary(const char *content_type, char *out, char *err, size_t errcap);

/*
 * Splits body into its parts. Up to max parts are stored in parts; *n gets
 * their number. Returns 0, or SP_EINVAL with a message in err (no opening or
 * closing delimiter, a part without Content-Disposition form-data and a
 * name, headers not ended by an empty line, a parameter too long, more than
 * max parts).
 */
int sched_mp_parse(const void *body, size_t len, const char *boundary, struct sched_mp_part *parts,
                   size_t max, size_t *n, char *err, size_t errcap);

#endif
