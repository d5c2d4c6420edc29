/*
 * GET /v1/models and GET /v1/models/{id}: the registered model versions in
 * OpenAI's list shape. Each version is one entry whose id is "name@N" (the
 * exact version, as live answers name it), with its aliases; GET
 * /v1/models/{id} accepts any model reference (name, name@alias, name@N)
 * and answers with the version it resolves to.
 */
#include "models.h"

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "scheduler.h"
#include "spool/log.h"

static void handle_list(struct sched *s, sh_call_t *c);
static void handle_one(struct sched *s, sh_call_t *c);

const struct sh_route sched_models_routes[] = {
    {"GET", "/v1/models", SCHED_SCOPE_INFERENCE, handle_list},
    {"GET", "/v1/models/{id}", SCHED_SCOPE_INFERENCE, handle_one},
};
const int sched_models_n_routes = sizeof sched_models_routes / sizeof sched_models_routes[0];

/* Columns: name, version, created (epoch s), aliases (comma-separated), context_length. */
#define MODEL_COLUMNS                                                                              \
    "m.name, m.version, extract(epoch FROM m.created_at)::bigint, "                                \
    "coalesce((SELECT string_agg(a.alias, ',' ORDER BY a.alias) FROM spool.model_aliases a "       \
    "WHERE a.name = m.name AND a.version = m.version), ''), m.context_length "

static json_t *model_object(PGresult *res, int row)
{
    char id[200];
    snprintf(id, sizeof id, "%s@%s", PQgetvalue(res, row, 0), PQgetvalue(res, row, 1));
    json_t *aliases = json_array();
    char *list = strdup(PQgetvalue(res, row, 3));
    for (char *save = NULL, *a = list ? strtok_r(list, ",", &save) : NULL; a;
         a = strtok_r(NULL, ",", &save))
        json_array_append_new(aliases, json_string(a));
    free(list);
    return json_pack("{s:s, s:s, s:I, s:s, s:s, s:I, s:o, s:I}", "id", id, "object", "model",
                     "created", (json_int_t)strtoll(PQgetvalue(res, row, 2), NULL, 10), "owned_by",
                     "spool", "name", PQgetvalue(res, row, 0), "version",
                     (json_int_t)strtoll(PQgetvalue(res, row, 1), NULL, 10), "aliases", aliases,
                     "context_length", (json_int_t)strtoll(PQgetvalue(res, row, 4), NULL, 10));
}

static void on_list(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    sh_call_t *c = arg;
    if (err) {
        sp_warn("http: listing models: %s", err);
        sh_respond_error(c, 503, "service_unavailable", NULL, NULL,
                         "the model registry cannot be read now; retry");
        return;
    }
    json_t *data = json_array();
    for (int i = 0; i < PQntuples(res); i++)
        json_array_append_new(data, model_object(res, i));
    sh_respond_json(c, 200, json_pack("{s:s, s:o}", "object", "list", "data", data));
}

static void handle_list(struct sched *s, sh_call_t *c)
{
    if (sp_pgconn_query(s->db,
                        "SELECT " MODEL_COLUMNS "FROM spool.models m ORDER BY m.name, m.version", 0,
                        NULL, on_list, c) != 0)
        sh_respond_error(c, 503, "service_unavailable", NULL, NULL,
                         "the model registry cannot be read now; retry");
}

static const char *sqlstate(const PGresult *res)
{
    const char *v = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
    return v ? v : "";
}

static const char *primary(const PGresult *res)
{
    const char *v = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    return v ? v : "";
}

static void on_one(sp_pgconn_t *conn, PGresult *res, const char *err, void *arg)
{
    (void)conn;
    sh_call_t *c = arg;
    if (err && strcmp(sqlstate(res), "P0002") == 0) {
        sh_respond_error(c, 404, "invalid_request_error", "model", "model_not_found",
                         "model '%s' does not exist: %s", sh_param(c, 0), primary(res));
        return;
    }
    if (err && res) {
        sh_respond_error(c, 400, "invalid_request_error", "model", "invalid_model",
                         "model '%s': %s", sh_param(c, 0), primary(res));
        return;
    }
    if (err || PQntuples(res) != 1) {
        sh_respond_error(c, 503, "service_unavailable", NULL, NULL,
                         "the model registry cannot be read now; retry");
        return;
    }
    sh_respond_json(c, 200, model_object(res, 0));
}

static void handle_one(struct sched *s, sh_call_t *c)
{
    const char *p[] = {sh_param(c, 0)};
    if (sp_pgconn_query(s->db,
                        "SELECT " MODEL_COLUMNS
                        "FROM spool.models m WHERE m.id = spool.resolve_model($1)",
                        1, p, on_one, c) != 0)
        sh_respond_error(c, 503, "service_unavailable", NULL, NULL,
                         "the model registry cannot be read now; retry");
}
