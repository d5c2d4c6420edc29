/*
 * The OpenAI Batch API over HTTP (oai_batch.c): files and batches, backed by
 * batch-lane jobs through the SQL functions of migration 0009.
 *
 *   POST /v1/files                   multipart/form-data (purpose, file), or a
 *                                    raw JSONL body with ?purpose=batch&filename=
 *   GET  /v1/files                   ?purpose= &limit= &after=
 *   GET  /v1/files/{id}
 *   GET  /v1/files/{id}/content
 *   DELETE /v1/files/{id}            409 while a batch that has not ended reads it
 *   POST /v1/batches                 {input_file_id, endpoint, completion_window, metadata}
 *   GET  /v1/batches                 ?limit= &after=
 *   GET  /v1/batches/{id}
 *   POST /v1/batches/{id}/cancel
 *
 * Every route needs SCHED_SCOPE_BATCH and acts only on the key's tenant:
 * another tenant's id is 404, as is an unknown one. An admin key
 * (SCHED_SCOPE_ADMIN) lists, reads, cancels and deletes every tenant's; what
 * it creates is its own tenant's. The queries run on the Batch API's own
 * connection, s->batchdb (scheduler.h), which the caller opens.
 */
#ifndef SPOOL_SCHEDULER_OAI_BATCH_H
#define SPOOL_SCHEDULER_OAI_BATCH_H

#include "http.h"

extern const struct sh_route sched_batch_routes[];
extern const int sched_batch_n_routes;

#endif
