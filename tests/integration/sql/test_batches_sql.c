/*
 * The OpenAI Batch API in SQL (migration 0009) against a real PostgreSQL:
 * a batch made from a JSONL file with good and bad lines, its job run
 * through the batch lane's own lease functions, the output and error files
 * written by finalize_batches, cancel and expiry, batches that fail as a
 * whole, and row-level security between two tenants' database roles.
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

#include "pgtest.h"
#include "pgtest_sql.h"

static struct pgt t;
static PGconn *c;

#define ok(...) pgt_ok(c, __VA_ARGS__)

/* Runs sql with params; returns the first value of the first row (new string, "" for NULL). */
static char *val(const char *sql, int n, const char *const *params)
{
    PGresult *r = PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) < 1)
        fail_msg("%s: %s", sql, PQresultErrorMessage(r));
    char *v = strdup(PQgetvalue(r, 0, 0));
    PQclear(r);
    return v;
}

/* Runs sql expecting an error; returns the message and the COLUMN field (static). */
static const char *err_of(const char *sql, int n, const char *const *params, const char **column)
{
    static char msg[1024], col[128];
    PGresult *r = PQexecParams(c, sql, n, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(r) != PGRES_FATAL_ERROR)
        fail_msg("expected an error from: %s", sql);
    snprintf(msg, sizeof msg, "%s", PQresultErrorMessage(r));
    const char *cn = PQresultErrorField(r, PG_DIAG_COLUMN_NAME);
    snprintf(col, sizeof col, "%s", cn ? cn : "");
    if (column)
        *column = col;
    PQclear(r);
    return msg;
}

static json_t *jval(const char *sql, int n, const char *const *params)
{
    char *v = val(sql, n, params);
    json_error_t e;
    json_t *j = json_loads(v, 0, &e);
    if (!j)
        fail_msg("%s: not JSON (%s): %s", sql, e.text, v);
    free(v);
    return j;
}

static const char *jstr(json_t *o, const char *path_a, const char *path_b)
{
    json_t *v = json_object_get(o, path_a);
    if (path_b)
        v = json_object_get(v, path_b);
    return json_string_value(v);
}

static long long jint(json_t *o, const char *a, const char *b)
{
    json_t *v = json_object_get(o, a);
    if (b)
        v = json_object_get(v, b);
    if (!json_is_integer(v))
        fail_msg("%s.%s is not an integer", a, b ? b : "");
    return json_integer_value(v);
}

/* Parses JSONL into an array of objects. */
static json_t *jsonl(const char *text)
{
    json_t *arr = json_array();
    const char *p = text;
    while (*p) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len) {
            json_error_t je;
            json_t *o = json_loadb(p, len, 0, &je);
            if (!o)
                fail_msg("bad JSONL line: %.*s", (int)len, p);
            json_array_append_new(arr, o);
        }
        p += len + (e ? 1 : 0);
    }
    return arr;
}

static char *upload(const char *tenant, const char *content)
{
    const char *p[] = {tenant, content};
    return val("SELECT spool.create_file($1, 'batch', 'in.jsonl', $2) ->> 'id'", 2, p);
}

static json_t *create_batch(const char *tenant, const char *file, const char *endpoint)
{
    const char *p[] = {tenant, file, endpoint};
    return jval("SELECT spool.create_batch($1, $2, $3, '24h', '{\"run\": \"t\"}')", 3, p);
}

static int setup(void **state)
{
    (void)state;
    pgt_start(&t, true);
    c = pgt_connect(&t);
    ok("INSERT INTO spool.models (name, version, digest, uri, size_bytes, architecture, dtype, "
       "n_params, context_length) VALUES ('tiny', 1, repeat('1', 64), 'file:///store/1', 100, "
       "'LlamaForCausalLM', 'bf16', 1000, 256)");
    ok("INSERT INTO spool.workers (name) VALUES ('w')");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    PQfinish(c);
    pgt_stop(&t);
    return 0;
}

/*
 * Runs every request of a job through the lease path as a worker would:
 * plan, lease, start, complete (custom_id "fail*" fails, the rest succeed
 * with output "out:<custom_id>"), release.
 */
static void run_job(const char *job)
{
    const char *p[] = {job};
    char *n = val("SELECT spool.plan_shards($1, 1000)", 1, p);
    assert_string_equal(n, "1");
    free(n);
    char *shard = val("SELECT id FROM spool.shards WHERE job_id = $1", 1, p);
    const char *p2[] = {shard};
    char *token = val("SELECT spool.lease_shard($1, (SELECT id FROM spool.workers LIMIT 1), "
                      "'1 minute')",
                      1, p2);
    const char *p3[] = {shard, token, job};
    free(val("SELECT spool.start_requests($1, $2, (SELECT array_agg(id) FROM spool.requests "
             "WHERE job_id = $3))",
             3, p3));
    free(val("SELECT spool.complete_requests($1, $2, (SELECT jsonb_agg(jsonb_build_object("
             "'id', id, 'state', CASE WHEN custom_id LIKE 'fail%' THEN 'failed' ELSE 'succeeded' "
             "END, 'output', 'out:' || custom_id, 'finish_reason', CASE WHEN custom_id LIKE "
             "'long%' THEN 'length' ELSE 'stop' END, 'tokens_in', 4, 'tokens_out', 2, 'error', "
             "CASE WHEN custom_id LIKE 'fail%' THEN 'params.temperature must be a number' END, "
             "'model_id', (SELECT id FROM spool.models LIMIT 1))) FROM spool.requests WHERE "
             "job_id = $3))",
             3, p3));
    char *st = val("SELECT spool.release_shard($1, $2)", 2, p3);
    assert_string_equal(st, "done");
    free(st);
    free(shard);
    free(token);
}

static const char *good_and_bad =
    "{\"custom_id\": \"a\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], "
    "\"max_tokens\": 5, \"temperature\": 0}}\n"
    "{\"custom_id\": \"long-b\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", "
    "\"body\": {\"model\": \"tiny\", \"messages\": [{\"role\": \"system\", \"content\": \"s\"}, "
    "{\"role\": \"user\", \"content\": \"yo\"}], \"max_completion_tokens\": 7, \"seed\": 3, "
    "\"stop\": [\"x\"], \"user\": \"ignored\"}}\r\n"
    "{not json\n"
    "\n"
    "{\"custom_id\": \"a\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"dup\"}]}}\n"
    "{\"custom_id\": \"c\", \"method\": \"POST\", \"url\": \"/v1/completions\", \"body\": "
    "{\"model\": \"tiny\", \"prompt\": \"x\"}}\n"
    "{\"custom_id\": \"d\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"other\", \"messages\": [{\"role\": \"user\", \"content\": \"m\"}]}}\n"
    "{\"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {\"model\": \"tiny\", "
    "\"messages\": [{\"role\": \"user\", \"content\": \"m\"}]}}\n"
    "{\"custom_id\": \"e\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\"}}\n"
    "{\"custom_id\": \"g\", \"method\": \"GET\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"m\"}]}}\n"
    "{\"custom_id\": \"h\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"n\": 2, \"messages\": [{\"role\": \"user\", \"content\": \"m\"}]}}\n"
    "[1, 2]\n"
    "{\"custom_id\": \"fail-f\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", "
    "\"body\": {\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"ok\"}], "
    "\"temperature\": \"hot\"}}\n";

/* Expected bad lines: line number, code, a piece of the message. */
static const struct {
    int line;
    const char *code, *msg;
} bad_lines[] = {
    {3, "invalid_json", "not valid JSON"},
    {5, "duplicate_custom_id", "custom_id \"a\" was already used on line 1"},
    {6, "invalid_request", "url must be \"/v1/chat/completions\""},
    {7, "model_mismatch", "body.model is \"other\""},
    {8, "missing_required_parameter", "custom_id must be a non-empty string"},
    {9, "missing_required_parameter", "body.messages must be a non-empty array"},
    {10, "invalid_request", "method must be \"POST\""},
    {11, "unsupported_parameter", "body.n must be 1"},
    {12, "invalid_json", "must be a JSON object, got array"},
};
#define N_BAD (sizeof bad_lines / sizeof bad_lines[0])

static void good_lines_run_bad_lines_go_to_the_error_file(void **state)
{
    (void)state;
    char *file = upload("acme", good_and_bad);
    json_t *b = create_batch("acme", file, "/v1/chat/completions");
    assert_string_equal(jstr(b, "object", NULL), "batch");
    assert_string_equal(jstr(b, "status", NULL), "in_progress");
    assert_string_equal(jstr(b, "input_file_id", NULL), file);
    assert_string_equal(jstr(b, "metadata", "run"), "t");
    assert_true(json_is_null(json_object_get(b, "output_file_id")));
    assert_int_equal(jint(b, "request_counts", "total"), 3 + N_BAD);
    assert_int_equal(jint(b, "request_counts", "failed"), N_BAD);
    assert_int_equal(jint(b, "request_counts", "completed"), 0);
    assert_int_equal(strncmp(jstr(b, "id", NULL), "batch_", 6), 0);
    const char *p[] = {jstr(b, "id", NULL)};

    /* The valid lines became requests of one sealed job, in line order. */
    char *job = val("SELECT job_id FROM spool.batches WHERE id = $1", 1, p);
    const char *pj[] = {job};
    char *rows = val("SELECT string_agg(custom_id || '|' || coalesce(messages::text, '') || '|' "
                     "|| params::text, E'\\n' ORDER BY id) FROM spool.requests WHERE job_id = $1",
                     1, pj);
    assert_string_equal(
        rows, "a|[{\"role\": \"user\", \"content\": \"hi\"}]|{\"max_tokens\": 5, \"temperature\": "
              "0}\n"
              "long-b|[{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", "
              "\"content\": \"yo\"}]|{\"seed\": 3, \"stop\": [\"x\"], \"user\": \"ignored\", "
              "\"max_tokens\": 7}\n"
              "fail-f|[{\"role\": \"user\", \"content\": \"ok\"}]|{\"temperature\": \"hot\"}");
    free(rows);
    char *st = val("SELECT state || ' ' || total || ' ' || m.name FROM spool.jobs j JOIN "
                   "spool.models m ON m.id = j.model_id WHERE j.id = $1",
                   1, pj);
    assert_string_equal(st, "queued 3 tiny");
    free(st);

    /* Not due yet: finalize does nothing. */
    char *n = val("SELECT spool.finalize_batches()", 0, NULL);
    assert_string_equal(n, "0");
    free(n);

    run_job(job);
    n = val("SELECT spool.finalize_batches()", 0, NULL);
    assert_string_equal(n, "1");
    free(n);
    n = val("SELECT spool.finalize_batches()", 0, NULL);
    assert_string_equal(n, "0");
    free(n);

    const char *pt[] = {"acme", p[0]};
    json_t *done = jval("SELECT spool.batch_get($1, $2)", 2, pt);
    assert_string_equal(jstr(done, "status", NULL), "completed");
    assert_true(json_is_integer(json_object_get(done, "completed_at")));
    assert_true(json_is_integer(json_object_get(done, "finalizing_at")));
    assert_int_equal(jint(done, "request_counts", "total"), 3 + N_BAD);
    assert_int_equal(jint(done, "request_counts", "completed"), 2);
    assert_int_equal(jint(done, "request_counts", "failed"), 1 + N_BAD);

    /* The output file: one line per succeeded request, in OpenAI's shape. */
    const char *po[] = {"acme", jstr(done, "output_file_id", NULL)};
    json_t *fo = jval("SELECT spool.file_get($1, $2)", 2, po);
    assert_string_equal(jstr(fo, "purpose", NULL), "batch_output");
    char *out = val("SELECT spool.file_content($1, $2)", 2, po);
    json_t *lines = jsonl(out);
    assert_int_equal(json_array_size(lines), 2);
    const char *want_ids[] = {"a", "long-b"};
    for (size_t i = 0; i < 2; i++) {
        json_t *l = json_array_get(lines, i);
        assert_string_equal(jstr(l, "custom_id", NULL), want_ids[i]);
        assert_true(json_is_null(json_object_get(l, "error")));
        assert_int_equal(strncmp(jstr(l, "id", NULL), "batch_req_", 10), 0);
        json_t *resp = json_object_get(l, "response");
        assert_int_equal(jint(resp, "status_code", NULL), 200);
        assert_non_null(jstr(resp, "request_id", NULL));
        json_t *body = json_object_get(resp, "body");
        assert_string_equal(jstr(body, "object", NULL), "chat.completion");
        assert_string_equal(jstr(body, "model", NULL), "tiny@1");
        json_t *ch = json_array_get(json_object_get(body, "choices"), 0);
        char want[64];
        snprintf(want, sizeof want, "out:%s", want_ids[i]);
        assert_string_equal(jstr(ch, "message", "content"), want);
        assert_string_equal(jstr(ch, "message", "role"), "assistant");
        assert_string_equal(jstr(ch, "finish_reason", NULL), i == 1 ? "length" : "stop");
        assert_int_equal(jint(body, "usage", "prompt_tokens"), 4);
        assert_int_equal(jint(body, "usage", "completion_tokens"), 2);
        assert_int_equal(jint(body, "usage", "total_tokens"), 6);
    }

    /* The error file: the failed request, then every bad line with its number. */
    const char *pe[] = {"acme", jstr(done, "error_file_id", NULL)};
    char *errs = val("SELECT spool.file_content($1, $2)", 2, pe);
    json_t *el = jsonl(errs);
    assert_int_equal(json_array_size(el), 1 + N_BAD);
    json_t *f0 = json_array_get(el, 0);
    assert_string_equal(jstr(f0, "custom_id", NULL), "fail-f");
    assert_true(json_is_null(json_object_get(f0, "response")));
    assert_string_equal(jstr(f0, "error", "code"), "request_failed");
    assert_string_equal(jstr(f0, "error", "message"), "params.temperature must be a number");
    for (size_t i = 0; i < N_BAD; i++) {
        json_t *l = json_array_get(el, i + 1);
        json_t *e = json_object_get(l, "error");
        assert_true(json_is_null(json_object_get(l, "response")));
        assert_int_equal(jint(e, "line", NULL), bad_lines[i].line);
        assert_string_equal(jstr(e, "code", NULL), bad_lines[i].code);
        if (!strstr(jstr(e, "message", NULL), bad_lines[i].msg))
            fail_msg("line %d: message '%s' lacks '%s'", bad_lines[i].line,
                     jstr(e, "message", NULL), bad_lines[i].msg);
        char prefix[32];
        snprintf(prefix, sizeof prefix, "line %d: ", bad_lines[i].line);
        assert_int_equal(strncmp(jstr(e, "message", NULL), prefix, strlen(prefix)), 0);
    }
    /* Custom ids are kept where the line had one. */
    assert_string_equal(jstr(json_array_get(el, 2), "custom_id", NULL), "a");
    assert_true(json_is_null(json_object_get(json_array_get(el, 1), "custom_id")));

    /* Listings, newest first, with paging. */
    json_t *list = jval("SELECT spool.batch_list('acme', 1)", 0, NULL);
    assert_string_equal(jstr(list, "object", NULL), "list");
    assert_int_equal(json_array_size(json_object_get(list, "data")), 1);
    json_t *files = jval("SELECT spool.file_list('acme', 'batch_output')", 0, NULL);
    assert_int_equal(json_array_size(json_object_get(files, "data")), 2);
    assert_string_equal(jstr(files, "first_id", NULL), pe[1]); /* the error file came last */

    json_decref(b);
    json_decref(done);
    json_decref(fo);
    json_decref(lines);
    json_decref(el);
    json_decref(list);
    json_decref(files);
    free(out);
    free(errs);
    free(job);
    free(file);
}

static void completions_endpoint_and_listing_pages(void **state)
{
    (void)state;
    char *file = upload("pager", "{\"custom_id\": \"p1\", \"method\": \"POST\", \"url\": "
                                 "\"/v1/completions\", \"body\": {\"model\": \"tiny@1\", "
                                 "\"prompt\": \"Once upon\", \"max_tokens\": 3}}\n");
    char *ids[3];
    for (int i = 0; i < 3; i++) {
        json_t *b = create_batch("pager", file, "/v1/completions");
        ids[i] = strdup(jstr(b, "id", NULL));
        json_decref(b);
    }
    const char *p[] = {ids[0]};
    char *job = val("SELECT job_id FROM spool.batches WHERE id = $1", 1, p);
    const char *pj[] = {job};
    char *row = val("SELECT coalesce(prompt, 'NULL') || '|' || coalesce(messages::text, 'NULL') "
                    "|| '|' || params::text FROM spool.requests WHERE job_id = $1",
                    1, pj);
    assert_string_equal(row, "Once upon|NULL|{\"max_tokens\": 3}");
    run_job(job);
    const char *pg[] = {"pager", ids[0]};
    json_t *b = jval("SELECT spool.batch_get($1, $2)", 2, pg); /* finalizes on read */
    assert_string_equal(jstr(b, "status", NULL), "completed");
    assert_true(json_is_null(json_object_get(b, "error_file_id")));
    const char *po[] = {"pager", jstr(b, "output_file_id", NULL)};
    char *out = val("SELECT spool.file_content($1, $2)", 2, po);
    json_t *all = jsonl(out);
    json_t *l = json_array_get(all, 0);
    json_t *body = json_object_get(json_object_get(l, "response"), "body");
    assert_string_equal(jstr(body, "object", NULL), "text_completion");
    assert_string_equal(jstr(json_array_get(json_object_get(body, "choices"), 0), "text", NULL),
                        "out:p1");

    /* Pages of 2: newest first, then the rest after the last id. */
    json_t *pg1 = jval("SELECT spool.batch_list('pager', 2)", 0, NULL);
    assert_true(json_is_true(json_object_get(pg1, "has_more")));
    assert_string_equal(jstr(pg1, "first_id", NULL), ids[2]);
    assert_string_equal(jstr(pg1, "last_id", NULL), ids[1]);
    const char *pa[] = {jstr(pg1, "last_id", NULL)};
    json_t *pg2 = jval("SELECT spool.batch_list('pager', 2, $1)", 1, pa);
    assert_false(json_is_true(json_object_get(pg2, "has_more")));
    assert_int_equal(json_array_size(json_object_get(pg2, "data")), 1);
    assert_string_equal(jstr(pg2, "first_id", NULL), ids[0]);

    json_decref(all);
    json_decref(b);
    json_decref(pg1);
    json_decref(pg2);
    free(out);
    free(row);
    free(job);
    free(file);
    for (int i = 0; i < 3; i++)
        free(ids[i]);
}

static void whole_batch_failures_and_parameter_errors(void **state)
{
    (void)state;
    /* No valid line: the batch fails with the reasons, and an error file. */
    char *file = upload("acme", "nope\n{\"custom_id\": \"x\"}\n");
    json_t *b = create_batch("acme", file, "/v1/chat/completions");
    assert_string_equal(jstr(b, "status", NULL), "failed");
    assert_true(json_is_integer(json_object_get(b, "failed_at")));
    json_t *data = json_object_get(json_object_get(b, "errors"), "data");
    assert_int_equal(json_array_size(data), 3);
    assert_string_equal(jstr(json_array_get(data, 0), "code", NULL), "empty_batch");
    assert_int_equal(jint(json_array_get(data, 2), "line", NULL), 2);
    assert_false(json_is_null(json_object_get(b, "error_file_id")));
    json_decref(b);
    free(file);

    /* An unknown model fails the batch, naming the model. */
    file =
        upload("acme", "{\"custom_id\": \"x\", \"method\": \"POST\", \"url\": "
                       "\"/v1/completions\", \"body\": {\"model\": \"ghost\", \"prompt\": \"p\"}}");
    b = create_batch("acme", file, "/v1/completions");
    assert_string_equal(jstr(b, "status", NULL), "failed");
    json_t *e0 = json_array_get(json_object_get(json_object_get(b, "errors"), "data"), 0);
    assert_string_equal(jstr(e0, "code", NULL), "model_not_found");
    assert_non_null(strstr(jstr(e0, "message", NULL), "unknown model \"ghost\""));
    json_decref(b);

    /* Parameter errors raise, naming the field; nothing is created. */
    const char *col;
    const char *p1[] = {"acme", file, "/v1/embeddings"};
    assert_non_null(
        strstr(err_of("SELECT spool.create_batch($1, $2, $3)", 3, p1, &col), "endpoint must be"));
    assert_string_equal(col, "endpoint");
    const char *p2[] = {"acme", "file-nothere", "/v1/completions"};
    assert_non_null(strstr(err_of("SELECT spool.create_batch($1, $2, $3)", 3, p2, &col),
                           "no file with id \"file-nothere\""));
    assert_string_equal(col, "input_file_id");
    const char *p3[] = {"acme", file, "/v1/completions"};
    assert_non_null(strstr(err_of("SELECT spool.create_batch($1, $2, $3, '1h')", 3, p3, &col),
                           "completion_window must be \"24h\""));
    assert_string_equal(col, "completion_window");
    assert_non_null(
        strstr(err_of("SELECT spool.create_file('acme', 'fine-tune', 'f', 'x')", 0, NULL, &col),
               "purpose must be \"batch\""));
    assert_string_equal(col, "purpose");
    /* An output file cannot be the input of a batch. */
    char *outf =
        val("SELECT spool.create_file('acme', 'batch_output', 'o', 'x') ->> 'id'", 0, NULL);
    const char *p4[] = {"acme", outf, "/v1/completions"};
    assert_non_null(strstr(err_of("SELECT spool.create_batch($1, $2, $3)", 3, p4, &col),
                           "has purpose \"batch_output\""));
    free(outf);
    free(file);
}

static const char *two_chats =
    "{\"custom_id\": \"k1\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"1\"}]}}\n"
    "{\"custom_id\": \"k2\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": "
    "{\"model\": \"tiny\", \"messages\": [{\"role\": \"user\", \"content\": \"2\"}]}}\n";

static void cancel_and_expiry(void **state)
{
    (void)state;
    char *file = upload("acme", two_chats);
    json_t *b = create_batch("acme", file, "/v1/chat/completions");
    const char *p[] = {"acme", jstr(b, "id", NULL)};
    json_t *cb = jval("SELECT spool.cancel_batch($1, $2)", 2, p);
    assert_string_equal(jstr(cb, "status", NULL), "cancelling");
    assert_true(json_is_integer(json_object_get(cb, "cancelling_at")));
    char *n = val("SELECT spool.finalize_batches()", 0, NULL);
    assert_string_equal(n, "1");
    free(n);
    json_t *done = jval("SELECT spool.batch_get($1, $2)", 2, p);
    assert_string_equal(jstr(done, "status", NULL), "cancelled");
    assert_true(json_is_null(json_object_get(done, "output_file_id")));
    const char *pe[] = {"acme", jstr(done, "error_file_id", NULL)};
    char *errs = val("SELECT spool.file_content($1, $2)", 2, pe);
    json_t *el = jsonl(errs);
    assert_int_equal(json_array_size(el), 2);
    assert_string_equal(jstr(json_array_get(el, 1), "custom_id", NULL), "k2");
    assert_string_equal(jstr(json_array_get(el, 1), "error", "code"), "batch_cancelled");
    /* Cancelling a finished batch changes nothing. */
    json_t *again = jval("SELECT spool.cancel_batch($1, $2)", 2, p);
    assert_string_equal(jstr(again, "status", NULL), "cancelled");
    /* Another tenant's id is not found. */
    const char *po[] = {"other", p[1]};
    char *none = val("SELECT spool.cancel_batch($1, $2) IS NULL", 2, po);
    assert_string_equal(none, "t");
    free(none);

    /* Past its completion window a batch is expired: its job is cancelled. */
    json_t *b2 = create_batch("acme", file, "/v1/chat/completions");
    const char *p2[] = {jstr(b2, "id", NULL)};
    ok("UPDATE spool.batches SET expires_at = now() - interval '1 second' WHERE id = '%s'", p2[0]);
    n = val("SELECT spool.finalize_batches()", 0, NULL);
    assert_string_equal(n, "1");
    free(n);
    char *st = val("SELECT b.status || ' ' || j.state FROM spool.batches b JOIN spool.jobs j ON "
                   "j.id = b.job_id WHERE b.id = $1",
                   1, p2);
    assert_string_equal(st, "expired cancelled");
    free(st);

    json_decref(b);
    json_decref(cb);
    json_decref(done);
    json_decref(el);
    json_decref(again);
    json_decref(b2);
    free(errs);
    free(file);
}

/* Connected as tenant roles, each sees only its own files and batches. */
static void tenants_roles_see_only_their_own(void **state)
{
    (void)state;
    ok("CREATE ROLE ta LOGIN");
    ok("CREATE ROLE tb LOGIN");
    ok("SELECT spool.grant_tenant_role('ta', 'ta')");
    ok("SELECT spool.grant_tenant_role('tb', 'tb')");

    ok("SET ROLE ta");
    char *fa = upload("ta", two_chats);
    json_t *ba = create_batch("ta", fa, "/v1/chat/completions");
    assert_string_equal(jstr(ba, "status", NULL), "in_progress");
    char *n = val("SELECT count(*) FROM spool.files", 0, NULL);
    assert_string_equal(n, "1");
    free(n);
    /* The role cannot write another tenant's file. */
    err_of("SELECT spool.create_file('tb', 'batch', 'x', 'y')", 0, NULL, NULL);
    ok("RESET ROLE");

    ok("SET ROLE tb");
    n = val("SELECT count(*) FROM spool.files", 0, NULL);
    assert_string_equal(n, "0");
    free(n);
    n = val("SELECT count(*) FROM spool.batches", 0, NULL);
    assert_string_equal(n, "0");
    free(n);
    /* Even naming tenant ta, row-level security hides ta's rows. */
    const char *p[] = {"ta", jstr(ba, "id", NULL)};
    n = val("SELECT spool.batch_get($1, $2) IS NULL", 2, p);
    assert_string_equal(n, "t");
    free(n);
    n = val("SELECT spool.cancel_batch($1, $2) IS NULL", 2, p);
    assert_string_equal(n, "t");
    free(n);
    const char *pf[] = {"ta", fa};
    n = val("SELECT spool.file_content($1, $2) IS NULL", 2, pf);
    assert_string_equal(n, "t");
    free(n);
    ok("UPDATE spool.batches SET status = 'failed'"); /* no row it can see */
    ok("RESET ROLE");
    char *st = val("SELECT status FROM spool.batches WHERE id = $1", 1, &p[1]);
    assert_string_equal(st, "in_progress");
    free(st);

    /* The job runs; reading as ta's role finalizes with ta's rights, and
     * the output file is ta's alone. */
    char *job = val("SELECT job_id FROM spool.batches WHERE id = $1", 1, &p[1]);
    run_job(job);
    ok("SET ROLE ta");
    json_t *done = jval("SELECT spool.batch_get($1, $2)", 2, p);
    assert_string_equal(jstr(done, "status", NULL), "completed");
    const char *po[] = {"ta", jstr(done, "output_file_id", NULL)};
    n = val("SELECT count(*) FROM spool.files WHERE id = $2 AND tenant = $1", 2, po);
    assert_string_equal(n, "1");
    free(n);
    ok("RESET ROLE");
    ok("SET ROLE tb");
    n = val("SELECT count(*) FROM spool.files", 0, NULL);
    assert_string_equal(n, "0");
    free(n);
    ok("RESET ROLE");
    json_decref(done);
    free(job);
    json_decref(ba);
    free(fa);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(good_lines_run_bad_lines_go_to_the_error_file),
        cmocka_unit_test(completions_endpoint_and_listing_pages),
        cmocka_unit_test(whole_batch_failures_and_parameter_errors),
        cmocka_unit_test(cancel_and_expiry),
        cmocka_unit_test(tenants_roles_see_only_their_own),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
