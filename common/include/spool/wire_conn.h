/*
 * A wire-protocol connection over a libuv stream (TCP, pipe): reads and
 * decodes frames, calls on_frame for each, and sends frames with uv_write.
 *
 * States:
 *
 *   open --sp_wire_conn_shutdown()--> shut down --peer's EOF--> closing
 *     |                                   |                        |
 *     +--close(), EOF, error, bad frame---+------------------------+
 *                                                                  v
 *                      on_close(conn, err) after uv_close() has finished;
 *                      the conn is freed when on_close returns.
 *
 * In "shut down" the conn sends nothing more (queued frames are flushed, then
 * the write side is shut, so the peer reads EOF) but still delivers the
 * frames it reads, until the peer closes too. That is how GOODBYE is meant
 * to be sent: send it, then shut down. sp_wire_conn_close() closes at once
 * from any state and cancels queued writes.
 *
 * Ownership: the caller allocates and initialises the stream handle and keeps
 * owning its memory; the conn takes over stream->data and closes the handle.
 * In on_close the handle is closed, so the caller may free it there. The conn
 * owns each send's encoded bytes until libuv's write callback.
 *
 * A malformed or oversize frame closes the connection: the reason is logged
 * with sp_warn, an ERROR frame naming it is written if the socket takes it at
 * once (best effort, never waited for), and on_close gets the decoder's code.
 *
 * The program must ignore SIGPIPE (libuv writes with write(2)), or a peer
 * that goes away kills it.
 *
 * Thread-safety: like libuv, use a conn only from its loop's thread.
 */
#ifndef SPOOL_WIRE_CONN_H
#define SPOOL_WIRE_CONN_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "spool/wire.h"

typedef struct sp_wire_conn sp_wire_conn_t;

/*
 * Called for each frame received, in order. f belongs to the conn and is freed
 * when the callback returns; keep it with sp_wire_frame_move(). The callback
 * may send, and may close the conn (no further frame is then delivered).
 */
typedef void (*sp_wire_frame_cb)(sp_wire_conn_t *c, struct sp_wire_frame *f);
/*
 * Called once when the conn is closed. err is 0 after sp_wire_conn_close(),
 * or after a shutdown that the peer answered by closing; SP_ECLOSED when the
 * peer closed first, SP_EIO on a read or write error,
 * SP_ETOOBIG / SP_ECORRUPT / SP_EPROTO for a bad frame, SP_ENOMEM.
 * sp_wire_conn_reason() says more. The conn is freed after it returns.
 */
typedef void (*sp_wire_close_cb)(sp_wire_conn_t *c, int err);

/*
 * Starts reading on stream. max_frame bounds frames in both directions (0 =
 * SP_WIRE_MAX_FRAME_DEFAULT). data is the caller's, see sp_wire_conn_data().
 * on_frame is required, on_close optional. Returns 0 with *out set;
 * SP_EINVAL, SP_ENOMEM or SP_EIO (uv_read_start failed), in which case the
 * stream is left to the caller untouched.
 */
int sp_wire_conn_open(sp_wire_conn_t **out, uv_stream_t *stream, uint32_t max_frame,
                      sp_wire_frame_cb on_frame, sp_wire_close_cb on_close, void *data);

/*
 * Encodes f and queues it for writing. Returns 0; SP_ECLOSED when the conn is
 * shut down or closing; SP_EINVAL when f breaks a protocol rule (logged with the reason);
 * SP_ETOOBIG when the encoded frame exceeds max_frame; SP_ENOMEM; SP_EIO when
 * uv_write refuses it. A write that fails later closes the conn with SP_EIO.
 */
int sp_wire_conn_send(sp_wire_conn_t *c, const struct sp_wire_frame *f);

/* Stops reading and closes the stream now (queued writes are cancelled); on_close gets err 0. */
void sp_wire_conn_close(sp_wire_conn_t *c);
/*
 * Flushes queued frames, then shuts the write side; the conn closes (err 0)
 * when the peer closes its side. Returns 0, SP_ECLOSED when already shut down
 * or closing, or SP_EIO (the conn is then closed with SP_EIO). A peer that
 * never closes keeps the conn open: bound that with a timer that calls
 * sp_wire_conn_close().
 */
int sp_wire_conn_shutdown(sp_wire_conn_t *c);

void *sp_wire_conn_data(const sp_wire_conn_t *c);
uv_stream_t *sp_wire_conn_stream(const sp_wire_conn_t *c);
/* "127.0.0.1:40000" for TCP, "stream" otherwise; for log lines. */
const char *sp_wire_conn_peer(const sp_wire_conn_t *c);
/* Why the conn closed ("" while open). */
const char *sp_wire_conn_reason(const sp_wire_conn_t *c);
/* Bytes queued for writing and not yet taken by the kernel (for back-pressure). */
size_t sp_wire_conn_write_queue(const sp_wire_conn_t *c);

#endif
