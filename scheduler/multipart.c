/*
 * multipart/form-data parsing (see multipart.h). The body is
 *
 *   preamble "--" B (CRLF headers CRLF CRLF data CRLF "--" B)* "--" epilogue
 *
 * where each delimiter is found by searching for CRLF "--" B, so a part's
 * data may hold any bytes except that sequence (which is what the boundary
 * guarantees). Bare LF line ends are accepted in headers, as some clients
 * send them; part data is never altered.
 */
#include "multipart.h"

#include <ctype.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "spool/error.h"

static int fail(char *err, size_t errcap, const char *msg)
{
    snprintf(err, errcap, "%s", msg);
    return SP_EINVAL;
}

/*
 * Finds parameter key (case-insensitive) in "type; k=v; k2="v2"" between p
 * and end, and copies its value (unquoted, backslash escapes resolved) into
 * out. Returns 1 found, 0 absent, SP_EINVAL too long for cap.
 */
static int param(const char *p, const char *end, const char *key, char *out, size_t cap)
{
    size_t klen = strlen(key);
    const char *q = memchr(p, ';', (size_t)(end - p));
    while (q && q < end) {
        q++;
        while (q < end && (*q == ' ' || *q == '\t'))
            q++;
        const char *eq = q;
        while (eq < end && *eq != '=' && *eq != ';')
            eq++;
        const char *kend = eq;
        while (kend > q && (kend[-1] == ' ' || kend[-1] == '\t'))
            kend--;
        bool match = (size_t)(kend - q) == klen && strncasecmp(q, key, klen) == 0;
        if (eq >= end || *eq == ';') {
            q = eq < end ? eq : NULL;
            continue;
        }
        const char *v = eq + 1;
        while (v < end && (*v == ' ' || *v == '\t'))
            v++;
        size_t o = 0;
        const char *after;
        if (v < end && *v == '"') {
            const char *r = v + 1;
            while (r < end && *r != '"') {
                if (*r == '\\' && r + 1 < end)
                    r++;
                if (match) {
                    if (o + 1 >= cap)
                        return SP_EINVAL;
                    out[o++] = *r;
                }
                r++;
            }
            after = r < end ? r + 1 : end;
        } else {
            const char *r = v;
            while (r < end && *r != ';' && *r != ' ' && *r != '\t') {
                if (match) {
                    if (o + 1 >= cap)
                        return SP_EINVAL;
                    out[o++] = *r;
                }
                r++;
            }
            after = r;
        }
        if (match) {
            out[o] = '\0';
            return 1;
        }
        q = memchr(after, ';', (size_t)(end - after));
    }
    return 0;
}

int sched_mp_boundary(const char *content_type, char *out, char *err, size_t errcap)
{
    if (!content_type)
        return fail(err, errcap, "Content-Type must be multipart/form-data with a boundary");
    const char *end = content_type + strlen(content_type);
    const char *semi = memchr(content_type, ';', (size_t)(end - content_type));
    const char *tend = semi ? semi : end;
    while (tend > content_type && isspace((unsigned char)tend[-1]))
        tend--;
    const char *t = content_type;
    while (t < tend && isspace((unsigned char)*t))
        t++;
    if ((size_t)(tend - t) != strlen("multipart/form-data") ||
        strncasecmp(t, "multipart/form-data", (size_t)(tend - t)) != 0)
        return fail(err, errcap, "Content-Type must be multipart/form-data with a boundary");
    int rc = param(content_type, end, "boundary", out, SCHED_MP_MAX_BOUNDARY + 1);
    if (rc < 0)
        return fail(err, errcap, "the multipart boundary is longer than 70 characters");
    if (rc == 0 || !out[0])
        return fail(err, errcap, "Content-Type multipart/form-data has no boundary parameter");
    return 0;
}

/*
 * Undoes the WHATWG form-data escapes of a filename in place: browsers and
 * undici (the openai npm client) send '"' as %22, LF as %0A and CR as %0D.
 */
static void unescape_filename(char *f)
{
    char *w = f;
    for (char *r = f; *r; r++) {
        if (r[0] == '%' && r[1] == '2' && r[2] == '2') {
            *w++ = '"';
            r += 2;
        } else if (r[0] == '%' && r[1] == '0' && (r[2] == 'A' || r[2] == 'a')) {
            *w++ = '\n';
            r += 2;
        } else if (r[0] == '%' && r[1] == '0' && (r[2] == 'D' || r[2] == 'd')) {
            *w++ = '\r';
            r += 2;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
}

/* Parses one part's header block [h, hend) into part. */
static int headers(const char *h, const char *hend, struct sched_mp_part *part, char *err,
                   size_t errcap)
{
    bool disposition = false;
    while (h < hend) {
        const char *eol = memchr(h, '\n', (size_t)(hend - h));
        const char *le = eol ? eol : hend;
        const char *lend = le > h && le[-1] == '\r' ? le - 1 : le;
        const char *colon = memchr(h, ':', (size_t)(lend - h));
        if (colon && (size_t)(colon - h) == strlen("content-disposition") &&
            strncasecmp(h, "content-disposition", (size_t)(colon - h)) == 0) {
            const char *v = colon + 1;
            while (v < lend && (*v == ' ' || *v == '\t'))
                v++;
            if ((size_t)(lend - v) < strlen("form-data") ||
                strncasecmp(v, "form-data", strlen("form-data")) != 0)
                return fail(err, errcap, "a multipart part's Content-Disposition is not form-data");
            int rc = param(v, lend, "name", part->name, sizeof part->name);
            if (rc < 0)
                return fail(err, errcap, "a multipart part's name is longer than 127 bytes");
            if (rc == 0 || !part->name[0])
                return fail(err, errcap, "a multipart part's Content-Disposition has no name");
            rc = param(v, lend, "filename", part->filename, sizeof part->filename);
            if (rc < 0)
                return fail(err, errcap, "the uploaded file's name is longer than 255 bytes");
            part->has_filename = rc == 1;
            unescape_filename(part->filename);
            disposition = true;
        }
        h = eol ? eol + 1 : hend;
    }
    if (!disposition)
        return fail(err, errcap, "a multipart part has no Content-Disposition header");
    return 0;
}

int sched_mp_parse(const void *body, size_t len, const char *boundary, struct sched_mp_part *parts,
                   size_t max, size_t *n, char *err, size_t errcap)
{
    *n = 0;
    size_t blen = strlen(boundary);
    if (blen == 0 || blen > SCHED_MP_MAX_BOUNDARY)
        return fail(err, errcap, "the multipart boundary must be 1 to 70 characters");
    char delim[SCHED_MP_MAX_BOUNDARY + 5];
    int dlen = snprintf(delim, sizeof delim, "\r\n--%s", boundary);
    const char *b = body, *end = b + len;

    /* The first delimiter may open the body without a CRLF before it. */
    const char *p;
    if (len >= (size_t)dlen - 2 && memcmp(b, delim + 2, (size_t)dlen - 2) == 0)
        p = b + dlen - 2;
    else if ((p = memmem(b, len, delim, (size_t)dlen)) != NULL)
        p += dlen;
    else
        return fail(err, errcap, "the multipart body does not contain its boundary");

    for (;;) {
        /* After a delimiter: "--" closes, otherwise padding and a line end. */
        if (end - p >= 2 && p[0] == '-' && p[1] == '-')
            return 0;
        while (p < end && (*p == ' ' || *p == '\t'))
            p++;
        if (p < end && *p == '\r')
            p++;
        if (p >= end || *p != '\n')
            return fail(err, errcap, "the multipart body ends without its closing boundary");
        p++;
        /* Headers end at an empty line (CRLF CRLF, or LF LF). */
        const char *hend = NULL, *data = NULL;
        if (end - p >= 2 && p[0] == '\r' && p[1] == '\n') {
            hend = p;
            data = p + 2;
        } else if (p < end && p[0] == '\n') {
            hend = p;
            data = p + 1;
        } else {
            const char *x = memmem(p, (size_t)(end - p), "\r\n\r\n", 4);
            const char *y = memmem(p, (size_t)(end - p), "\n\n", 2);
            if (x && (!y || x < y)) {
                hend = x;
                data = x + 4;
            } else if (y) {
                hend = y;
                data = y + 2;
            }
        }
        if (!hend)
            return fail(err, errcap, "a multipart part's headers are not ended by an empty line");
        const char *dend = memmem(data, (size_t)(end - data), delim, (size_t)dlen);
        if (!dend)
            return fail(err, errcap, "the multipart body ends without its closing boundary");
        if (*n >= max)
            return fail(err, errcap, "the multipart body has too many parts");
        struct sched_mp_part *part = &parts[*n];
        memset(part, 0, sizeof *part);
        int rc = headers(p, hend, part, err, errcap);
        if (rc)
            return rc;
        part->data = data;
        part->len = (size_t)(dend - data);
        (*n)++;
        p = dend + dlen;
    }
}
