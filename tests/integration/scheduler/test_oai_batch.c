/*
 * The Batch API handlers (scheduler/oai_batch.c) against a real PostgreSQL,
 * through a stand-in for the HTTP server: this file implements the parts of
 * http.h the handlers use (a call is a struct filled by the test; an answer
 * is recorded), so each handler runs exactly as under h2o, on a libuv loop
 * with the scheduler's asynchronous connection. Checks: multipart and raw
 * uploads, content read back, batches made, listed, cancelled and finalized
 * (the job run through the lease functions), every error status with its
 * field, and that another tenant's ids are 404 while an admin key sees every
 * tenant's; DELETE /v1/files/{id}; and that a create_batch stalled on a
 * lock runs on the Batch API's own connection (s.batchdb), leaving the work
 * connection (s.db) free.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>
#include <uv.h>

#include "oai_batch.h"
#include "pgtest.h"
#include "scheduler.h"

/* ---- The stand-in server ------------------------------------------------- */

struct sh_call {
    const char *method, *path;
    const char *params[4];
    const char *query[4][2];
    const char *headers[4][2];
    const char *body;
    size_t body_len;
    struct sched_principal who;
    json_t *json;
    bool answered;
    int status;
    char *resp;
    size_t resp_len;
    char ctype[64];
    char retry_after[16];
};

const char *sh_method(const sh_call_t *c)
{
    return c->method;
}
const char *sh_path(const sh_call_t *c)
{
    return c->path;
}
const char *sh_param(const sh_call_t *c, int i)
{
    return i >= 0 && i < 4 ? c->params[i] : NULL;
}
const char *sh_query(sh_call_t *c, const char *name)
{
    for (int i = 0; i < 4 && c->query[i][0]; i++)
        if (strcmp(c->query[i][0], name) == 0)
            return c->query[i][1];
    return NULL;
}
const char *sh_header(sh_call_t *c, const char *lname)
{
    for (int i = 0; i < 4 && c->headers[i][0]; i++)
        if (strcmp(c->headers[i][0], lname) == 0)
            return c->headers[i][1];
    return NULL;
}
const void *sh_body(const sh_call_t *c, size_t *len)
{
    *len = c->body_len;
    return c->body;
}
const struct sched_principal *sh_principal(const sh_call_t *c)
{
    return &c->who;
}
double sh_started(const sh_call_t *c)
{
    (void)c;
    return 0;
}
static void answer(sh_call_t *c, int status, const char *ctype, const void *body, size_t len)
{
    if (c->answered)
        fail_msg("%s %s answered twice", c->method, c->path);
    c->answered = true;
    c->status = status;
    snprintf(c->ctype, sizeof c->ctype, "%s", ctype);
    c->resp = malloc(len + 1);
    memcpy(c->resp, body, len);
    c->resp[len] = '\0';
    c->resp_len = len;
}
json_t *sh_json_body(sh_call_t *c)
{
    json_error_t e;
    c->json = json_loadb(c->body, c->body_len, 0, &e);
    if (!json_is_object(c->json)) {
        const char *m = "{\"error\": {\"message\": \"not a JSON object\"}}";
        answer(c, 400, "application/json", m, strlen(m));
        return NULL;
    }
    return c->json;
}
void sh_add_header(sh_call_t *c, const char *name, const char *value)
{
    if (strcmp(name, "Retry-After") == 0)
        snprintf(c->retry_after, sizeof c->retry_after, "%s", value);
}
void sh_respond_json(sh_call_t *c, int status, json_t *body)
{
    char *s = json_dumps(body, JSON_COMPACT);
    answer(c, status, "application/json", s, strlen(s));
    free(s);
    json_decref(body);
}
void sh_respond_raw(sh_call_t *c, int status, const char *content_type, const void *body,
                    size_t len)
{
    answer(c, status, content_type, body, len);
}
void sh_respond_error(sh_call_t *c, int status, const char *type, const char *param,
                      const char *code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    json_t *e = json_pack("{s:{s:s, s:s, s:s?, s:s?}}", "error", "message", msg, "type", type,
                          "param", param, "code", code);
    sh_respond_json(c, status, e);
}

/* ---- Test fixture -------------------------------------------------------- */

static struct pgt t;
static PGconn *pc;
static uv_loop_t loop;
static struct sched s;

static int setup(void **state)
{
    (void)state;
    pgt_start(&t, true);
    pc = pgt_connect(&t);
    PGresult *r = PQexec(
        pc, "INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, "
            "dtype, n_params, context_length) VALUES ('tiny', 1, repeat('1', 64), 'file:///x', "
            "100, 'LlamaForCausalLM', 'bf16', 1000, 256); INSERT INTO spool.workers (name) "
            "VALUES ('w')");
    assert_int_equal(PQresultStatus(r), PGRES_COMMAND_OK);
    PQclear(r);
    uv_loop_init(&loop);
    s.loop = &loop;
    assert_int_equal(sp_pgconn_open(&loop, t.dsn, NULL, &s.db), 0);
    assert_int_equal(sp_pgconn_open(&loop, t.dsn, NULL, &s.batchdb), 0);
    for (int i = 0; i < 500 && !(sp_pgconn_is_up(s.db) && sp_pgconn_is_up(s.batchdb)); i++)
        uv_run(&loop, UV_RUN_NOWAIT), uv_sleep(10);
    assert_true(sp_pgconn_is_up(s.db));
    assert_true(sp_pgconn_is_up(s.batchdb));
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    sp_pgconn_close(s.db, NULL, NULL);
    sp_pgconn_close(s.batchdb, NULL, NULL);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&loop), 0);
    PQfinish(pc);
    pgt_stop(&t);
    return 0;
}

static const struct sh_route *route(const char *method, const char *pattern)
{
    for (int i = 0; i < sched_batch_n_routes; i++)
        if (strcmp(sched_batch_routes[i].method, method) == 0 &&
            strcmp(sched_batch_routes[i].pattern, pattern) == 0) {
            assert_int_equal(sched_batch_routes[i].needs, SCHED_SCOPE_BATCH);
            return &sched_batch_routes[i];
        }
    fail_msg("no route %s %s", method, pattern);
    return NULL;
}

/* Starts the call's handler as tenant's key with scopes; the loop answers it later. */
static void start_as(sh_call_t *c, const char *pattern, const char *tenant, unsigned scopes)
{
    snprintf(c->who.tenant, sizeof c->who.tenant, "%s", tenant);
    c->who.scopes = scopes;
    if (!c->path)
        c->path = pattern;
    route(c->method, pattern)->handle(&s, c);
}

/* Runs the loop until the call is answered (3 s at most). */
static void wait_answer(sh_call_t *c, const char *pattern)
{
    for (int i = 0; i < 3000 && !c->answered; i++)
        uv_run(&loop, UV_RUN_NOWAIT), uv_sleep(1);
    if (!c->answered)
        fail_msg("%s %s was not answered", c->method, pattern);
}

/* Runs the call's handler as an admin key of tenant, and the loop until it is answered. */
static void run_admin(sh_call_t *c, const char *pattern, const char *tenant)
{
    start_as(c, pattern, tenant, SCHED_SCOPE_ADMIN);
    wait_answer(c, pattern);
}

/* Runs the call's handler and the loop until it is answered. */
static void run(sh_call_t *c, const char *pattern, const char *tenant)
{
    start_as(c, pattern, tenant, SCHED_SCOPE_BATCH);
    wait_answer(c, pattern);
}

static void done(sh_call_t *c)
{
    free(c->resp);
    json_decref(c->json);
}

/* The response as JSON (owned by the caller). */
static json_t *resp_json(const sh_call_t *c)
{
    json_error_t e;
    json_t *j = json_loads(c->resp, 0, &e);
    if (!j)
        fail_msg("response is not JSON: %s", c->resp);
    return j;
}

/* Expects an OpenAI error with status and param (NULL: any). */
static void expect_error(const sh_call_t *c, int status, const char *param, const char *in_msg)
{
    if (c->status != status)
        fail_msg("status %d, want %d: %s", c->status, status, c->resp);
    json_t *j = resp_json(c);
    json_t *e = json_object_get(j, "error");
    assert_non_null(json_string_value(json_object_get(e, "message")));
    if (param)
        assert_string_equal(json_string_value(json_object_get(e, "param")), param);
    if (in_msg && !strstr(json_string_value(json_object_get(e, "message")), in_msg))
        fail_msg("message '%s' lacks '%s'", json_string_value(json_object_get(e, "message")),
                 in_msg);
    json_decref(j);
}

static const char *jsonl =
    "{\"custom_id\": \"a\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"h\\u00e9\"}]}}\n"
    "garbage\n"
    "{\"custom_id\": \"b\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}}\n";

/* Uploads jsonl as the openai npm client does; returns the file id (new string). */
static char *upload(const char *tenant)
{
    char body[4096];
    int n = snprintf(body, sizeof body,
                     "------formdata-undici-1\r\n"
                     "Content-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n%s\r\n"
                     "------formdata-undici-1\r\n"
                     "Content-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                     "------formdata-undici-1--\r\n",
                     jsonl);
    sh_call_t c = {.method = "POST", .body = body, .body_len = (size_t)n};
    c.headers[0][0] = "content-type";
    c.headers[0][1] = "multipart/form-data; boundary=----formdata-undici-1";
    run(&c, "/v1/files", tenant);
    if (c.status != 200)
        fail_msg("upload: %d %s", c.status, c.resp);
    json_t *j = resp_json(&c);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "file");
    assert_string_equal(json_string_value(json_object_get(j, "filename")), "in.jsonl");
    assert_string_equal(json_string_value(json_object_get(j, "purpose")), "batch");
    assert_int_equal(json_integer_value(json_object_get(j, "bytes")), strlen(jsonl));
    char *id = strdup(json_string_value(json_object_get(j, "id")));
    json_decref(j);
    done(&c);
    return id;
}

static char *create(const char *tenant, const char *file)
{
    char body[512];
    snprintf(body, sizeof body,
             "{\"input_file_id\": \"%s\", \"endpoint\": \"/v1/chat/completions\", "
             "\"completion_window\": \"24h\", \"metadata\": {\"k\": \"v\"}}",
             file);
    sh_call_t c = {.method = "POST", .body = body, .body_len = strlen(body)};
    run(&c, "/v1/batches", tenant);
    if (c.status != 200)
        fail_msg("create: %d %s", c.status, c.resp);
    json_t *j = resp_json(&c);
    assert_string_equal(json_string_value(json_object_get(j, "status")), "in_progress");
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "metadata"), "k")),
                        "v");
    json_t *rc = json_object_get(j, "request_counts");
    assert_int_equal(json_integer_value(json_object_get(rc, "total")), 3);
    assert_int_equal(json_integer_value(json_object_get(rc, "failed")), 1);
    char *id = strdup(json_string_value(json_object_get(j, "id")));
    json_decref(j);
    done(&c);
    return id;
}

/* Runs query with $1 = batch. */
static void sql(const char *query, const char *batch)
{
    const char *p[] = {batch};
    PGresult *r = PQexecParams(pc, query, 1, NULL, p, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK && PQresultStatus(r) != PGRES_COMMAND_OK)
        fail_msg("%s: %s", query, PQresultErrorMessage(r));
    PQclear(r);
}

static void files_and_batches_through_the_handlers(void **state)
{
    (void)state;
    char *file = upload("ta");

    /* Content back, byte for byte; metadata; another tenant gets 404. */
    sh_call_t c = {.method = "GET", .params = {file}};
    run(&c, "/v1/files/{id}/content", "ta");
    assert_int_equal(c.status, 200);
    assert_string_equal(c.resp, jsonl);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {file}};
    run(&c, "/v1/files/{id}", "ta");
    assert_int_equal(c.status, 200);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {file}};
    run(&c, "/v1/files/{id}/content", "tb");
    expect_error(&c, 404, "id", NULL);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {file}};
    run(&c, "/v1/files/{id}", "tb");
    expect_error(&c, 404, "id", NULL);
    done(&c);

    char *batch = create("ta", file);
    c = (sh_call_t){.method = "GET", .params = {batch}};
    run(&c, "/v1/batches/{id}", "tb");
    expect_error(&c, 404, "id", "no batch");
    done(&c);
    c = (sh_call_t){.method = "POST", .params = {batch}};
    run(&c, "/v1/batches/{id}/cancel", "tb");
    expect_error(&c, 404, "id", NULL);
    done(&c);

    /* B cannot make a batch of A's file. */
    char body[256];
    snprintf(body, sizeof body,
             "{\"input_file_id\": \"%s\", \"endpoint\": \"/v1/chat/completions\", "
             "\"completion_window\": \"24h\"}",
             file);
    c = (sh_call_t){.method = "POST", .body = body, .body_len = strlen(body)};
    run(&c, "/v1/batches", "tb");
    expect_error(&c, 400, "input_file_id", "no file");
    done(&c);

    /* Run the job as a worker would; the next read finalizes the batch. */
    sql("SELECT spool.plan_shards(job_id, 100) FROM spool.batches WHERE id = $1", batch);
    sql("SELECT spool.start_requests(s.id, spool.lease_shard(s.id, (SELECT id FROM "
        "spool.workers LIMIT 1), '1 minute'), ARRAY(SELECT id FROM spool.requests r WHERE "
        "r.job_id = s.job_id)) FROM spool.shards s JOIN spool.batches b ON b.job_id = s.job_id "
        "WHERE b.id = $1",
        batch);
    sql("SELECT spool.complete_requests(s.id, s.lease_token, (SELECT jsonb_agg(jsonb_build_object("
        "'id', id, 'state', 'succeeded', 'output', 'ok ' || custom_id, 'finish_reason', 'stop', "
        "'tokens_in', 3, 'tokens_out', 2)) FROM spool.requests r WHERE r.job_id = s.job_id)), "
        "spool.release_shard(s.id, s.lease_token) FROM spool.shards s JOIN spool.batches b ON "
        "b.job_id = s.job_id WHERE b.id = $1",
        batch);
    c = (sh_call_t){.method = "GET", .params = {batch}};
    run(&c, "/v1/batches/{id}", "ta");
    assert_int_equal(c.status, 200);
    json_t *j = resp_json(&c);
    assert_string_equal(json_string_value(json_object_get(j, "status")), "completed");
    json_t *rc = json_object_get(j, "request_counts");
    assert_int_equal(json_integer_value(json_object_get(rc, "completed")), 2);
    char *out = strdup(json_string_value(json_object_get(j, "output_file_id")));
    char *errf = strdup(json_string_value(json_object_get(j, "error_file_id")));
    json_decref(j);
    done(&c);

    c = (sh_call_t){.method = "GET", .params = {out}};
    run(&c, "/v1/files/{id}/content", "ta");
    assert_int_equal(c.status, 200);
    assert_non_null(strstr(c.resp, "\"custom_id\": \"a\""));
    assert_non_null(strstr(c.resp, "\"content\": \"ok b\""));
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {errf}};
    run(&c, "/v1/files/{id}/content", "ta");
    assert_int_equal(c.status, 200);
    assert_non_null(strstr(c.resp, "\"line\": 2"));
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {out}};
    run(&c, "/v1/files/{id}/content", "tb");
    assert_int_equal(c.status, 404);
    done(&c);

    /* Lists: A's batches and files; B's are empty; limit checked. */
    c = (sh_call_t){.method = "GET", .query = {{"limit", "1"}}};
    run(&c, "/v1/batches", "ta");
    assert_int_equal(c.status, 200);
    j = resp_json(&c);
    assert_string_equal(json_string_value(json_object_get(j, "first_id")), batch);
    json_decref(j);
    done(&c);
    c = (sh_call_t){.method = "GET"};
    run(&c, "/v1/batches", "tb");
    j = resp_json(&c);
    assert_int_equal(json_array_size(json_object_get(j, "data")), 0);
    json_decref(j);
    done(&c);
    c = (sh_call_t){.method = "GET", .query = {{"purpose", "batch_output"}}};
    run(&c, "/v1/files", "ta");
    j = resp_json(&c);
    assert_int_equal(json_array_size(json_object_get(j, "data")), 2);
    json_decref(j);
    done(&c);
    c = (sh_call_t){.method = "GET", .query = {{"limit", "0"}}};
    run(&c, "/v1/batches", "ta");
    expect_error(&c, 400, "limit", NULL);
    done(&c);

    /* Cancel: a second batch becomes cancelling, then cancelled when read. */
    char *b2 = create("ta", file);
    c = (sh_call_t){.method = "POST", .params = {b2}};
    run(&c, "/v1/batches/{id}/cancel", "ta");
    assert_int_equal(c.status, 200);
    assert_non_null(strstr(c.resp, "\"status\": \"cancelling\""));
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {b2}};
    run(&c, "/v1/batches/{id}", "ta");
    assert_non_null(strstr(c.resp, "\"status\": \"cancelled\""));
    done(&c);

    free(b2);
    free(out);
    free(errf);
    free(batch);
    free(file);
}

static void bad_requests_name_the_field(void **state)
{
    (void)state;
    static const struct {
        const char *body, *param, *msg;
    } cases[] = {
        {"{\"endpoint\": \"/v1/completions\"}", "input_file_id", "required"},
        {"{\"input_file_id\": 5, \"endpoint\": \"/v1/completions\"}", "input_file_id", "string"},
        {"{\"input_file_id\": \"file-x\"}", "endpoint", "required"},
        {"{\"input_file_id\": \"file-x\", \"endpoint\": \"/v1/embeddings\"}", "endpoint",
         "endpoint must be"},
        {"{\"input_file_id\": \"file-x\", \"endpoint\": \"/v1/completions\", "
         "\"completion_window\": \"1h\"}",
         "completion_window", "24h"},
        {"{\"input_file_id\": \"file-x\", \"endpoint\": \"/v1/completions\", \"metadata\": [1]}",
         "metadata", NULL},
        {"{\"input_file_id\": \"file-x\", \"endpoint\": \"/v1/completions\"}", "input_file_id",
         "no file with id \"file-x\""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        sh_call_t c = {.method = "POST", .body = cases[i].body, .body_len = strlen(cases[i].body)};
        run(&c, "/v1/batches", "ta");
        expect_error(&c, 400, cases[i].param, cases[i].msg);
        done(&c);
    }
    sh_call_t c = {.method = "POST", .body = "[1]", .body_len = 3};
    run(&c, "/v1/batches", "ta");
    assert_int_equal(c.status, 400);
    done(&c);

    /* Uploads: bad multipart, no file part, a wrong purpose, NUL and bad UTF-8. */
    static const struct {
        const char *ctype, *body;
        size_t len;
        const char *param, *msg;
    } up[] = {
        {"multipart/form-data", "x", 1, NULL, "no boundary"},
        {"multipart/form-data; boundary=B",
         "--B\r\nContent-Disposition: form-data; "
         "name=\"purpose\"\r\n\r\nbatch\r\n--B--",
         0, "file", "no part named \"file\""},
        {"multipart/form-data; boundary=B",
         "--B\r\nContent-Disposition: form-data; "
         "name=\"file\"; filename=\"f\"\r\n\r\nx\r\n--B--",
         0, "purpose", "no part named \"purpose\""},
        {"multipart/form-data; boundary=B",
         "--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--B\r\n"
         "Content-Disposition: form-data; name=\"file\"; filename=\"f\"\r\n\r\nx\r\n--B--",
         0, "purpose", "must be \"batch\""},
        {"application/jsonl", "ab\0c", 4, "file", "NUL byte at byte 2"},
        {"application/jsonl", "ab\xff", 3, "file", "invalid sequence at byte 2"},
    };
    for (size_t i = 0; i < sizeof up / sizeof up[0]; i++) {
        sh_call_t u = {.method = "POST",
                       .body = up[i].body,
                       .body_len = up[i].len ? up[i].len : strlen(up[i].body)};
        u.headers[0][0] = "content-type";
        u.headers[0][1] = up[i].ctype;
        run(&u, "/v1/files", "ta");
        expect_error(&u, 400, up[i].param, up[i].msg);
        done(&u);
    }
    /* A raw JSONL body with the purpose and name in the query string. */
    sh_call_t r = {.method = "POST",
                   .body = "{}\n",
                   .body_len = 3,
                   .query = {{"purpose", "batch"}, {"filename", "raw.jsonl"}}};
    run(&r, "/v1/files", "ta");
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.resp, "\"filename\": \"raw.jsonl\""));
    done(&r);
}

/* True when the list response c has an element with this id. */
static bool lists(const sh_call_t *c, const char *id)
{
    json_t *j = resp_json(c);
    json_t *e;
    size_t i;
    bool found = false;
    json_array_foreach(json_object_get(j, "data"), i, e)
    {
        if (strcmp(json_string_value(json_object_get(e, "id")), id) == 0)
            found = true;
    }
    json_decref(j);
    return found;
}

static void admin_keys_see_every_tenant(void **state)
{
    (void)state;
    char *file = upload("ta2");
    char *batch = create("ta2", file);

    /* An admin key of another tenant lists and reads ta2's batch and file. */
    sh_call_t c = {.method = "GET"};
    run_admin(&c, "/v1/batches", "ops");
    assert_int_equal(c.status, 200);
    assert_true(lists(&c, batch));
    done(&c);
    c = (sh_call_t){.method = "GET"};
    run_admin(&c, "/v1/files", "ops");
    assert_int_equal(c.status, 200);
    assert_true(lists(&c, file));
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {batch}};
    run_admin(&c, "/v1/batches/{id}", "ops");
    assert_int_equal(c.status, 200);
    assert_non_null(strstr(c.resp, file));
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {file}};
    run_admin(&c, "/v1/files/{id}", "ops");
    assert_int_equal(c.status, 200);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {file}};
    run_admin(&c, "/v1/files/{id}/content", "ops");
    assert_int_equal(c.status, 200);
    assert_string_equal(c.resp, jsonl);
    done(&c);

    /* An ordinary key of another tenant sees none of it. */
    c = (sh_call_t){.method = "GET"};
    run(&c, "/v1/batches", "tb2");
    assert_int_equal(c.status, 200);
    assert_false(lists(&c, batch));
    done(&c);
    c = (sh_call_t){.method = "GET"};
    run(&c, "/v1/files", "tb2");
    assert_false(lists(&c, file));
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {batch}};
    run(&c, "/v1/batches/{id}", "tb2");
    expect_error(&c, 404, "id", NULL);
    done(&c);

    /* What an admin creates is its own tenant's: ta2's file is no input for it. */
    char body[256];
    snprintf(body, sizeof body,
             "{\"input_file_id\": \"%s\", \"endpoint\": \"/v1/chat/completions\"}", file);
    c = (sh_call_t){.method = "POST", .body = body, .body_len = strlen(body)};
    run_admin(&c, "/v1/batches", "ops");
    expect_error(&c, 400, "input_file_id", "no file");
    done(&c);

    /* The admin cancels ta2's batch. */
    c = (sh_call_t){.method = "POST", .params = {batch}};
    run_admin(&c, "/v1/batches/{id}/cancel", "ops");
    assert_int_equal(c.status, 200);
    assert_non_null(strstr(c.resp, "\"status\": \"cancelling\""));
    done(&c);
    free(batch);
    free(file);
}

static void files_are_deleted_unless_a_batch_reads_them(void **state)
{
    (void)state;
    char *file = upload("td");
    char *batch = create("td", file);

    /* In use by an open batch: 409 naming the batch; another tenant: 404. */
    sh_call_t c = {.method = "DELETE", .params = {file}};
    run(&c, "/v1/files/{id}", "td");
    expect_error(&c, 409, "id", batch);
    done(&c);
    c = (sh_call_t){.method = "DELETE", .params = {file}};
    run(&c, "/v1/files/{id}", "te");
    expect_error(&c, 404, "id", "no file");
    done(&c);

    /* Once the batch has ended, the file goes; the batch still names it. */
    c = (sh_call_t){.method = "POST", .params = {batch}};
    run(&c, "/v1/batches/{id}/cancel", "td");
    assert_int_equal(c.status, 200);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {batch}};
    run(&c, "/v1/batches/{id}", "td");
    assert_non_null(strstr(c.resp, "\"status\": \"cancelled\""));
    json_t *j = resp_json(&c);
    char *errf = strdup(json_string_value(json_object_get(j, "error_file_id")));
    json_decref(j);
    done(&c);
    c = (sh_call_t){.method = "DELETE", .params = {file}};
    run(&c, "/v1/files/{id}", "td");
    assert_int_equal(c.status, 200);
    j = resp_json(&c);
    assert_string_equal(json_string_value(json_object_get(j, "id")), file);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "file");
    assert_true(json_is_true(json_object_get(j, "deleted")));
    json_decref(j);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {file}};
    run(&c, "/v1/files/{id}", "td");
    expect_error(&c, 404, "id", NULL);
    done(&c);
    c = (sh_call_t){.method = "DELETE", .params = {file}};
    run(&c, "/v1/files/{id}", "td");
    expect_error(&c, 404, "id", NULL);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {batch}};
    run(&c, "/v1/batches/{id}", "td");
    assert_int_equal(c.status, 200);
    assert_non_null(strstr(c.resp, file));
    done(&c);

    /* A deleted file makes no batch. */
    char body[256];
    snprintf(body, sizeof body,
             "{\"input_file_id\": \"%s\", \"endpoint\": \"/v1/chat/completions\"}", file);
    c = (sh_call_t){.method = "POST", .body = body, .body_len = strlen(body)};
    run(&c, "/v1/batches", "td");
    expect_error(&c, 400, "input_file_id", "no file");
    done(&c);

    /* An admin key deletes another tenant's (output) file. */
    c = (sh_call_t){.method = "DELETE", .params = {errf}};
    run_admin(&c, "/v1/files/{id}", "ops");
    assert_int_equal(c.status, 200);
    done(&c);
    c = (sh_call_t){.method = "GET", .params = {errf}};
    run(&c, "/v1/files/{id}/content", "td");
    assert_int_equal(c.status, 404);
    done(&c);
    free(errf);
    free(batch);
    free(file);
}

static void on_work_query(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    (void)res;
    if (err)
        fail_msg("the work connection's query failed: %s", err);
    *(bool *)arg = true;
}

/* The number of backends waiting on a lock in create_batch. */
static long waiting_creates(void)
{
    PGresult *r = PQexec(pc, "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                             "'Lock' AND query LIKE '%spool.create_batch%'");
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    long n = strtol(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
    return n;
}

/*
 * A create_batch held up (here deterministically: another session holds its
 * input file's row lock, which the new batch row's input check needs) keeps
 * only the Batch API's connection busy: the sweep's first query on the work
 * connection answers at once, and the batch is made correctly once the lock
 * goes.
 */
static void a_stalled_create_leaves_the_work_connection_free(void **state)
{
    (void)state;
    char *file = upload("tf");
    PGconn *locker = pgt_connect(&t);
    const char *p[] = {file};
    PGresult *r = PQexec(locker, "BEGIN");
    PQclear(r);
    r = PQexecParams(locker, "SELECT 1 FROM spool.files WHERE id = $1 FOR UPDATE", 1, NULL, p, NULL,
                     NULL, 0);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_int_equal(PQntuples(r), 1);
    PQclear(r);

    char body[256];
    snprintf(body, sizeof body,
             "{\"input_file_id\": \"%s\", \"endpoint\": \"/v1/chat/completions\"}", file);
    sh_call_t c = {.method = "POST", .body = body, .body_len = strlen(body)};
    start_as(&c, "/v1/batches", "tf", SCHED_SCOPE_BATCH);
    /* Wait until the server says create_batch is waiting for the lock. */
    int i;
    for (i = 0; i < 5000 && waiting_creates() == 0; i += 10)
        uv_run(&loop, UV_RUN_NOWAIT), uv_sleep(10);
    assert_int_equal(waiting_creates(), 1);
    assert_false(c.answered);

    /* The work connection answers while the create still waits. */
    bool swept = false;
    uint64_t t0 = uv_hrtime();
    assert_int_equal(sp_pgconn_query(s.db, "SELECT count(*) FROM spool.expire_leases()", 0, NULL,
                                     on_work_query, &swept),
                     0);
    for (i = 0; i < 2000 && !swept; i++)
        uv_run(&loop, UV_RUN_NOWAIT), uv_sleep(1);
    assert_true(swept);
    double ms = (double)(uv_hrtime() - t0) / 1e6;
    if (ms > 1000)
        fail_msg("the work connection took %.0f ms to answer", ms);
    assert_false(c.answered);
    assert_int_equal(waiting_creates(), 1);

    r = PQexec(locker, "COMMIT");
    PQclear(r);
    PQfinish(locker);
    wait_answer(&c, "/v1/batches");
    if (c.status != 200)
        fail_msg("create: %d %s", c.status, c.resp);
    json_t *j = resp_json(&c);
    assert_string_equal(json_string_value(json_object_get(j, "status")), "in_progress");
    json_t *rc = json_object_get(j, "request_counts");
    assert_int_equal(json_integer_value(json_object_get(rc, "total")), 3);
    assert_int_equal(json_integer_value(json_object_get(rc, "failed")), 1);
    json_decref(j);
    done(&c);
    free(file);
}

/* A bad chat message is named by its line, index and field in the batch's input errors. */
static void bad_messages_are_named_by_line_and_index(void **state)
{
    (void)state;
    static const char lines[] =
        "{\"custom_id\": \"ok\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", "
        "\"body\": {\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": "
        "\"x\"}]}}\n"
        "\n"
        "{\"custom_id\": \"parts\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", "
        "\"body\": {\"model\": \"tiny\", \"messages\": [{\"role\": \"system\", \"content\": "
        "\"s\"}, {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"x\"}]}]}}\n"
        "{\"custom_id\": \"role\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", "
        "\"body\": {\"model\": \"tiny\", \"messages\": [{\"content\": \"x\"}]}}\n";
    sh_call_t c = {.method = "POST",
                   .body = lines,
                   .body_len = strlen(lines),
                   .query = {{"purpose", "batch"}}};
    run(&c, "/v1/files", "tm");
    assert_int_equal(c.status, 200);
    json_t *j = resp_json(&c);
    char *file = strdup(json_string_value(json_object_get(j, "id")));
    json_decref(j);
    done(&c);
    char body[256];
    snprintf(body, sizeof body,
             "{\"input_file_id\": \"%s\", \"endpoint\": \"/v1/chat/completions\"}", file);
    c = (sh_call_t){.method = "POST", .body = body, .body_len = strlen(body)};
    run(&c, "/v1/batches", "tm");
    assert_int_equal(c.status, 200);
    j = resp_json(&c);
    const char *p[] = {json_string_value(json_object_get(j, "id"))};
    PGresult *r =
        PQexecParams(pc,
                     "SELECT string_agg(e ->> 'message', '|' ORDER BY (e ->> 'line')::int)"
                     " FROM spool.batches b, jsonb_array_elements(b.input_errors) e "
                     "WHERE b.id = $1",
                     1, NULL, p, NULL, NULL, 0);
    assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
    assert_string_equal(PQgetvalue(r, 0, 0),
                        "line 3: body.messages[1].content must be a string (content parts are "
                        "not supported)|line 4: body.messages[0].role must be a string");
    PQclear(r);
    json_decref(j);
    done(&c);
    free(file);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(files_and_batches_through_the_handlers),
        cmocka_unit_test(bad_requests_name_the_field),
        cmocka_unit_test(admin_keys_see_every_tenant),
        cmocka_unit_test(files_are_deleted_unless_a_batch_reads_them),
        cmocka_unit_test(a_stalled_create_leaves_the_work_connection_free),
        cmocka_unit_test(bad_messages_are_named_by_line_and_index),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
