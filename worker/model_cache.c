/*
 * The loaded model version. A worker holds one model version at a time: one
 * model, tokenizer and engine, shared by batch shards and live requests. An
 * ASSIGN for another version is taken only when the engine is idle, live
 * requests included (the old version is then closed); otherwise the shard is
 * released for another worker (shards.c). A worker started with --model
 * (live.c) is pinned: it never swaps its version, so the live requests the
 * scheduler routes to it keep finding it. Several engines side by side are a
 * later step.
 */
#include "worker.h"

#include "spool/error.h"
#include "spool/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void wk_model_unload(struct worker *w)
{
    /* Only ended live requests can remain (a load waits for an idle engine): they go with it. */
    wk_live_forget_all(w);
    se_engine_close(w->eng);
    w->eng = NULL;
    if (w->tok)
        se_tokenizer_close(w->tok);
    w->tok = NULL;
    se_model_close(w->model);
    w->model = NULL;
    w->digest[0] = 0;
    w->model_id = 0;
}

int wk_model_load(struct worker *w, const char *digest, char *err, size_t errcap)
{
    if (w->eng && strcmp(w->digest, digest) == 0)
        return 0;
    if (w->pinned[0] && strcmp(w->pinned, digest) != 0) {
        snprintf(err, errcap,
                 "this worker serves live requests for %s (--model %s) and runs no other "
                 "model; %s must go to another worker",
                 w->pinned, w->cfg.model_ref, digest);
        return SP_ESTATE;
    }
    if (w->eng && se_engine_n_active(w->eng) > 0) {
        snprintf(err, errcap,
                 "this worker is running model %s (batch or live sequences) and holds one model "
                 "at a time; %s must wait for another worker",
                 w->digest, digest);
        return SP_ESTATE;
    }
    if (strncmp(digest, "sha256:", 7) != 0 || strlen(digest) != 71) {
        snprintf(err, errcap, "model digest '%s' is not \"sha256:\" and 64 hex digits", digest);
        return SP_EINVAL;
    }
    const char *hex = digest + 7;
    const char *p[1] = {hex};
    PGresult *r;
    int rc = wk_db_call(
        w, "SELECT id, uri, name, version FROM spool.models WHERE digest = $1 ORDER BY id LIMIT 1",
        1, p, &r, err, errcap);
    if (rc)
        return rc;
    if (PQntuples(r) == 0) {
        PQclear(r);
        snprintf(err, errcap, "no model with digest %s is registered in spool.models", digest);
        return SP_ENOENT;
    }
    int64_t id = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
    char uri[1024];
    snprintf(uri, sizeof(uri), "%s", PQgetvalue(r, 0, 1));
    char name[136];
    snprintf(name, sizeof(name), "%s", PQgetvalue(r, 0, 2));
    uint32_t version = (uint32_t)strtoul(PQgetvalue(r, 0, 3), NULL, 10);
    PQclear(r);

    char dir[1024], e2[1024];
    rc = sp_model_cache_fetch(&w->store, uri, hex, w->cfg.model_cache, w->cfg.model_cache_limit,
                              dir, sizeof(dir), e2, sizeof(e2));
    if (rc) {
        snprintf(err, errcap, "cannot fetch model %s from %s: %s", digest, uri, e2);
        return rc;
    }
    wk_model_unload(w);
    rc = se_model_open(dir, &w->model, e2, sizeof(e2));
    if (!rc)
        rc = se_tokenizer_open(dir, &w->tok, e2, sizeof(e2));
    if (!rc) {
        struct se_engine_opts eo = {.n_threads = w->cfg.threads,
                                    .max_seqs = w->cfg.max_batch,
                                    .kv_bytes = w->cfg.kv_bytes,
                                    .backend = w->cfg.backend,
                                    .tok = w->tok};
        rc = se_engine_open(w->model, &eo, &w->eng, e2, sizeof(e2));
    }
    if (rc) {
        snprintf(err, errcap, "cannot open model %s (%s): %s", digest, dir, e2);
        wk_model_unload(w);
        return rc;
    }
    const struct se_model_config *cfg = se_model_get_config(w->model);
    w->n_ctx = cfg->max_position;
    w->n_vocab = cfg->vocab_size;
    snprintf(w->digest, sizeof(w->digest), "%s", digest);
    w->model_id = id;
    snprintf(w->model_name, sizeof(w->model_name), "%s", name);
    w->model_version = version;
    sp_info("loaded model %s (%s, %d layers, context %d) from %s", digest, cfg->arch_name,
            cfg->n_layers, cfg->max_position, dir);
    return 0;
}
