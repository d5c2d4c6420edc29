/*
 * The OpenAI Batch API (see oai_batch.h). Each handler checks its input,
 * sends one query to a function of migrations 0009/0011, which does the work
 * in one transaction and renders the OpenAI object as JSON, and answers from
 * the query's callback. The queries go on the Batch API's own connection
 * (s->batchdb), never on the work connection (s->db): a create_batch over a
 * big file takes seconds, and sweeps, key checks and the live lane must not
 * wait behind it. Batch API requests wait for each other, in order.
 *
 * Tenants: a new file or batch belongs to the key's tenant (sh_principal).
 * Reads, cancels and deletes pass the key's tenant, and the SQL functions
 * touch only that tenant's rows, so another tenant's id reads as unknown:
 * 404. An admin key (SCHED_SCOPE_ADMIN) passes NULL, "every tenant": an
 * operator lists, reads, cancels and deletes any tenant's batches and files.
 *
 * Database errors map to HTTP: invalid_parameter_value (22023) and
 * no_data_found (P0002) raised by the functions are the caller's mistakes
 * (400, naming the field from the error's COLUMN), object_in_use (55006) is
 * 409, text that is not UTF-8 is 400, any other server error is 500, and a
 * query that could not run (no connection) is 503 with Retry-After.
 */
#include "oai_batch.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>

#include "multipart.h"
#include "scheduler.h"
#include "spool/log.h"

static void handle_file_create(struct sched *s, sh_call_t *c);
static void handle_file_list(struct sched *s, sh_call_t *c);
static void handle_file_get(struct sched *s, sh_call_t *c);
static void handle_file_content(struct sched *s, sh_call_t *c);
static void handle_batch_create(struct sched *s, sh_call_t *c);
static void handle_batch_list(struct sched *s, sh_call_t *c);
static void handle_batch_get(struct sched *s, sh_call_t *c);
static void handle_batch_cancel(struct sched *s, sh_call_t *c);
static void handle_file_delete(struct sched *s, sh_call_t *c);

const struct sh_route sched_batch_routes[] = {
    {"POST", "/v1/files", SCHED_SCOPE_BATCH, handle_file_create},
    {"GET", "/v1/files", SCHED_SCOPE_BATCH, handle_file_list},
    {"GET", "/v1/files/{id}", SCHED_SCOPE_BATCH, handle_file_get},
    {"GET", "/v1/files/{id}/content", SCHED_SCOPE_BATCH, handle_file_content},
    {"DELETE", "/v1/files/{id}", SCHED_SCOPE_BATCH, handle_file_delete},
    {"POST", "/v1/batches", SCHED_SCOPE_BATCH, handle_batch_create},
    {"GET", "/v1/batches", SCHED_SCOPE_BATCH, handle_batch_list},
    {"GET", "/v1/batches/{id}", SCHED_SCOPE_BATCH, handle_batch_get},
    {"POST", "/v1/batches/{id}/cancel", SCHED_SCOPE_BATCH, handle_batch_cancel},
};
const int sched_batch_n_routes = sizeof sched_batch_routes / sizeof sched_batch_routes[0];

/* The most parts a file upload may have (purpose, file, and a few extra fields). */
#define MAX_PARTS 16

/* The key's tenant: the owner of what the call creates. */
static const char *tenant_of(sh_call_t *c)
{
    const struct sched_principal *p = sh_principal(c);
    return p ? p->tenant : NULL;
}

/*
 * Whose files and batches the call may read, cancel or delete: the key's
 * tenant, or NULL (every tenant) for an admin key. Without a principal
 * (never, on these routes) no tenant's: "".
 */
static const char *scope_of(sh_call_t *c)
{
    const struct sched_principal *p = sh_principal(c);
    if (!p)
        return "";
    return p->scopes & SCHED_SCOPE_ADMIN ? NULL : p->tenant;
}

static void unavailable(sh_call_t *c)
{
    sh_add_header(c, "Retry-After", "1");
    sh_respond_error(c, 503, "service_unavailable", NULL, NULL,
                     "the database cannot be reached now; retry");
}

static const char *field(const PGresult *res, int code)
{
    const char *v = res ? PQresultErrorField(res, code) : NULL;
    return v ? v : "";
}

/*
 * Answers a failed query. A query that did not run (res NULL) is 503; the
 * errors the 0009 functions raise on purpose are 400 naming the field; any
 * other is 500 (logged).
 */
static void db_error(sh_call_t *c, PGresult *res, const char *err, const char *what)
{
    if (!res) {
        sp_warn("http: %s: %s", what, err);
        unavailable(c);
        return;
    }
    const char *state = field(res, PG_DIAG_SQLSTATE);
    const char *col = field(res, PG_DIAG_COLUMN_NAME);
    const char *msg = field(res, PG_DIAG_MESSAGE_PRIMARY);
    if (strcmp(state, "55006") == 0) {
        sh_respond_error(c, 409, "invalid_request_error", *col ? col : NULL, "in_use", "%s", msg);
    } else if (strcmp(state, "22023") == 0 || strcmp(state, "P0002") == 0) {
        sh_respond_error(c, 400, "invalid_request_error", *col ? col : NULL,
                         strcmp(state, "P0002") == 0 ? "not_found" : "invalid_value", "%s", msg);
    } else if (strcmp(state, "22021") == 0 || strcmp(state, "22P05") == 0) {
        sh_respond_error(c, 400, "invalid_request_error", "file", "invalid_encoding",
                         "the file is not valid UTF-8 text: %s", msg);
    } else {
        sp_warn("http: %s: %s", what, err);
        sh_respond_error(c, 500, "server_error", NULL, NULL, "%s failed: %s", what, msg);
    }
}

/*
 * The common end of a query that returns one JSON text (or NULL for "not
 * found"): 200 with the text as the body, or 404 naming the object.
 */
static void answer_json_text(sh_call_t *c, PGresult *res, const char *err, const char *what,
                             const char *kind)
{
    if (err) {
        db_error(c, res, err, what);
        return;
    }
    if (PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        sh_respond_error(c, 404, "invalid_request_error", "id", "not_found", "no %s with id '%s'",
                         kind, sh_param(c, 0) ? sh_param(c, 0) : "");
        return;
    }
    sh_respond_raw(c, 200, "application/json", PQgetvalue(res, 0, 0),
                   (size_t)PQgetlength(res, 0, 0));
}

static void query(struct sched *s, sh_call_t *c, const char *sql, int n, const char *const *p,
                  sp_pgconn_result_cb cb)
{
    if (!s->batchdb || sp_pgconn_query(s->batchdb, sql, n, p, cb, c) != 0)
        unavailable(c);
}

/*
 * A list's limit from ?limit=: absent gives dflt; otherwise an integer in
 * [1, max]. Returns false after answering 400.
 */
static bool limit_param(sh_call_t *c, int dflt, int max, char out[16])
{
    const char *v = sh_query(c, "limit");
    long n = dflt;
    if (v) {
        char *end;
        n = strtol(v, &end, 10);
        if (!*v || *end || n < 1 || n > max) {
            sh_respond_error(c, 400, "invalid_request_error", "limit", "invalid_value",
                             "limit must be an integer from 1 to %d, got '%s'", max, v);
            return false;
        }
    }
    snprintf(out, 16, "%ld", n);
    return true;
}

/* ---- Files --------------------------------------------------------------- */

/* Returns the offset of the first byte that breaks UTF-8 (or is NUL), or len. */
static size_t utf8_bad_at(const unsigned char *p, size_t len)
{
    size_t i = 0;
    while (i < len) {
        unsigned char b = p[i];
        if (b == 0)
            return i;
        if (b < 0x80) {
            i++;
            continue;
        }
        size_t n;
        unsigned min;
        unsigned cp;
        if (b >= 0xC2 && b <= 0xDF) {
            n = 2, min = 0x80, cp = b & 0x1F;
        } else if (b >= 0xE0 && b <= 0xEF) {
            n = 3, min = 0x800, cp = b & 0x0F;
        } else if (b >= 0xF0 && b <= 0xF4) {
            n = 4, min = 0x10000, cp = b & 0x07;
        } else {
            return i;
        }
        if (len - i < n)
            return i;
        for (size_t k = 1; k < n; k++) {
            if ((p[i + k] & 0xC0) != 0x80)
                return i;
            cp = (cp << 6) | (p[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return i;
        i += n;
    }
    return len;
}

static void on_file_created(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "storing the file", "file");
}

static void handle_file_create(struct sched *s, sh_call_t *c)
{
    size_t len;
    const char *body = sh_body(c, &len);
    const char *ctype = sh_header(c, "content-type");
    const char *purpose = NULL, *filename = NULL, *data = NULL;
    size_t data_len = 0;
    char purpose_buf[64];
    struct sched_mp_part parts[MAX_PARTS];
    char err[256];

    if (ctype && strncasecmp(ctype, "multipart/", 10) == 0) {
        char boundary[SCHED_MP_MAX_BOUNDARY + 1];
        size_t n;
        if (sched_mp_boundary(ctype, boundary, err, sizeof err) ||
            sched_mp_parse(body, len, boundary, parts, MAX_PARTS, &n, err, sizeof err)) {
            sh_respond_error(c, 400, "invalid_request_error", NULL, "invalid_multipart", "%s", err);
            return;
        }
        for (size_t i = 0; i < n; i++) {
            if (strcmp(parts[i].name, "purpose") == 0) {
                if (parts[i].len >= sizeof purpose_buf) {
                    sh_respond_error(c, 400, "invalid_request_error", "purpose", "invalid_value",
                                     "purpose must be \"batch\"");
                    return;
                }
                memcpy(purpose_buf, parts[i].data, parts[i].len);
                purpose_buf[parts[i].len] = '\0';
                purpose = purpose_buf;
            } else if (strcmp(parts[i].name, "file") == 0) {
                data = parts[i].data;
                data_len = parts[i].len;
                filename = parts[i].filename;
            }
        }
        if (!data) {
            sh_respond_error(c, 400, "invalid_request_error", "file", "missing_required_parameter",
                             "the upload has no part named \"file\"");
            return;
        }
        if (!purpose) {
            sh_respond_error(c, 400, "invalid_request_error", "purpose",
                             "missing_required_parameter",
                             "the upload has no part named \"purpose\" (use \"batch\")");
            return;
        }
    } else {
        /* A raw JSONL body: purpose and filename from the query string. */
        data = body;
        data_len = len;
        purpose = sh_query(c, "purpose");
        filename = sh_query(c, "filename");
        if (!purpose)
            purpose = "batch";
    }
    if (strcmp(purpose, "batch") != 0) {
        sh_respond_error(c, 400, "invalid_request_error", "purpose", "invalid_value",
                         "purpose must be \"batch\", got \"%.40s\"", purpose);
        return;
    }
    size_t bad = utf8_bad_at((const unsigned char *)data, data_len);
    if (bad < data_len) {
        sh_respond_error(c, 400, "invalid_request_error", "file", "invalid_encoding",
                         "the file is not UTF-8 text: %s at byte %zu",
                         data[bad] ? "an invalid sequence" : "a NUL byte", bad);
        return;
    }
    if (filename &&
        utf8_bad_at((const unsigned char *)filename, strlen(filename)) < strlen(filename)) {
        sh_respond_error(c, 400, "invalid_request_error", "file", "invalid_encoding",
                         "the file's name is not UTF-8");
        return;
    }
    char *text = malloc(data_len + 1);
    if (!text) {
        sh_respond_error(c, 500, "server_error", NULL, NULL, "out of memory for the upload");
        return;
    }
    memcpy(text, data, data_len);
    text[data_len] = '\0';
    const char *p[] = {tenant_of(c), purpose, filename && *filename ? filename : NULL, text};
    query(s, c, "SELECT spool.create_file($1, $2, $3, $4)::text", 4, p, on_file_created);
    free(text); /* sp_pgconn_query copied it */
}

static void on_file_list(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "listing files", "file");
}

static void handle_file_list(struct sched *s, sh_call_t *c)
{
    char lim[16];
    if (!limit_param(c, 10000, 10000, lim))
        return;
    const char *p[] = {scope_of(c), sh_query(c, "purpose"), lim, sh_query(c, "after")};
    query(s, c, "SELECT spool.file_list($1, $2, $3::int, $4)::text", 4, p, on_file_list);
}

static void on_file_get(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "reading a file", "file");
}

static void handle_file_get(struct sched *s, sh_call_t *c)
{
    const char *p[] = {scope_of(c), sh_param(c, 0)};
    query(s, c, "SELECT spool.file_get($1, $2)::text", 2, p, on_file_get);
}

static void on_file_content(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    sh_call_t *c = arg;
    if (err) {
        db_error(c, res, err, "reading a file's content");
        return;
    }
    if (PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        sh_respond_error(c, 404, "invalid_request_error", "id", "not_found", "no file with id '%s'",
                         sh_param(c, 0));
        return;
    }
    sh_respond_raw(c, 200, "application/octet-stream", PQgetvalue(res, 0, 0),
                   (size_t)PQgetlength(res, 0, 0));
}

static void handle_file_content(struct sched *s, sh_call_t *c)
{
    const char *p[] = {scope_of(c), sh_param(c, 0)};
    query(s, c, "SELECT spool.file_content($1, $2)", 2, p, on_file_content);
}

static void on_file_deleted(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "deleting a file", "file");
}

static void handle_file_delete(struct sched *s, sh_call_t *c)
{
    const char *p[] = {scope_of(c), sh_param(c, 0)};
    query(s, c, "SELECT spool.delete_file($1, $2)::text", 2, p, on_file_deleted);
}

/* ---- Batches ------------------------------------------------------------- */

static void on_batch_created(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "creating the batch", "batch");
}

/* A required string member of the body, or NULL after answering 400. */
static const char *string_member(sh_call_t *c, json_t *body, const char *name, bool required)
{
    json_t *v = json_object_get(body, name);
    if (!v || json_is_null(v)) {
        if (required)
            sh_respond_error(c, 400, "invalid_request_error", name, "missing_required_parameter",
                             "%s is required", name);
        return NULL;
    }
    if (!json_is_string(v)) {
        sh_respond_error(c, 400, "invalid_request_error", name, "invalid_type",
                         "%s must be a string", name);
        return NULL;
    }
    return json_string_value(v);
}

static void handle_batch_create(struct sched *s, sh_call_t *c)
{
    json_t *body = sh_json_body(c);
    if (!body)
        return;
    const char *file = string_member(c, body, "input_file_id", true);
    if (!file)
        return;
    const char *endpoint = string_member(c, body, "endpoint", true);
    if (!endpoint)
        return;
    json_t *w = json_object_get(body, "completion_window");
    const char *window = "24h";
    if (w && !json_is_null(w) && !(window = string_member(c, body, "completion_window", false)))
        return;
    json_t *meta = json_object_get(body, "metadata");
    char *meta_text = NULL;
    if (meta && !json_is_null(meta)) {
        /* OpenAI's rule: at most 16 pairs, keys up to 64 and values up to 512 characters. */
        const char *k;
        json_t *v;
        bool okay = json_is_object(meta) && json_object_size(meta) <= 16;
        json_object_foreach(meta, k, v)
        {
            if (!json_is_string(v) || strlen(k) > 64 || json_string_length(v) > 512)
                okay = false;
        }
        if (!okay) {
            sh_respond_error(c, 400, "invalid_request_error", "metadata", "invalid_value",
                             "metadata must be an object of at most 16 string values (keys up to "
                             "64 characters, values up to 512)");
            return;
        }
        meta_text = json_dumps(meta, JSON_COMPACT);
    }
    const char *p[] = {tenant_of(c), file, endpoint, window, meta_text};
    query(s, c, "SELECT spool.create_batch($1, $2, $3, $4, $5::jsonb)::text", 5, p,
          on_batch_created);
    free(meta_text);
}

static void on_batch_list(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "listing batches", "batch");
}

static void handle_batch_list(struct sched *s, sh_call_t *c)
{
    char lim[16];
    if (!limit_param(c, 20, 100, lim))
        return;
    const char *p[] = {scope_of(c), lim, sh_query(c, "after")};
    query(s, c, "SELECT spool.batch_list($1, $2::int, $3)::text", 3, p, on_batch_list);
}

static void on_batch_get(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "reading a batch", "batch");
}

static void handle_batch_get(struct sched *s, sh_call_t *c)
{
    const char *p[] = {scope_of(c), sh_param(c, 0)};
    query(s, c, "SELECT spool.batch_get($1, $2)::text", 2, p, on_batch_get);
}

static void on_batch_cancel(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    answer_json_text(arg, res, err, "cancelling a batch", "batch");
}

static void handle_batch_cancel(struct sched *s, sh_call_t *c)
{
    const char *p[] = {scope_of(c), sh_param(c, 0)};
    query(s, c, "SELECT spool.cancel_batch($1, $2)::text", 2, p, on_batch_cancel);
}
