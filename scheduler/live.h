/*
 * The live lane, scheduler side (live.c): POST /v1/completions and POST
 * /v1/chat/completions. A request is validated, its model resolved
 * (spool.resolve_model, cached briefly), routed to the least loaded
 * registered worker that has that version loaded, and sent as LIVE_REQUEST;
 * the worker's TOKENS are relayed as Server-Sent Events (stream: true) or
 * gathered into one answer; its USAGE or ERROR ends the request.
 *
 * A request also ends when its client disconnects (CANCEL goes to the
 * worker at once), when it outlives sh_config.request_timeout_ms (CANCEL,
 * then 504 or an error event), or when its worker's connection is lost.
 *
 * Everything runs on the scheduler's loop; nothing here is thread-safe.
 */
#ifndef SPOOL_SCHEDULER_LIVE_H
#define SPOOL_SCHEDULER_LIVE_H

#include <stdbool.h>

#include "http.h"
#include "spool/wire.h"

struct sched;
struct sched_worker;

extern const struct sh_route sched_live_routes[];
extern const int sched_live_n_routes;

/*
 * A frame from a registered worker that concerns live requests (TOKENS,
 * USAGE with a request_id, ERROR with a request_id). Returns true when the
 * frame was a live request's (handled here), false otherwise.
 */
bool sched_live_frame(struct sched *s, struct sched_worker *w, const struct sp_wire_frame *f);
/* The worker's connection is gone: its live requests end with an error. */
void sched_live_worker_lost(struct sched *s, struct sched_worker *w);
/* Ends every live request (the scheduler is stopping). */
void sched_live_stop(struct sched *s);

#endif
