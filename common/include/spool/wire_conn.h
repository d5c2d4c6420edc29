/*
 * A wire-protocol connection over a libuv stream (TCP, pipe): reads and
 * decodes frames, calls on_frame for each, and sends frames with uv_write.
 *
 * Lifecycle: sp_wire_conn_open() -> frames flow -> closed (by
 * sp_wire_conn_close(), by the peer, by an I/O error, or by a malformed or
 * oversize frame) -> on_close(conn, err) runs once, after uv_close() has
 * finished -> the conn is freed when on_close returns.
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
 * SP_ECLOSED when the peer closed, SP_EIO on a read or write error,
 * SP_ETOOBIG / SP_ECORRUPT / SP_EPROTO for a bad frame, SP_ENOMEM.
 * sp_wire_conn_reason() says more. The conn is freed after it returns.
 */
typedef void (*sp_wire_close_cb)(sp_wire_conn_t *c, int err);

/*
 * Starts reading on stream. max_frame bounds frames in both directions (0 =
 * SP_WIRE_MAX_FRAME_DEFAULT). data is the caller's, see sp_wire_conn_data().
 * Returns 0 with *out set; SP_ENOMEM or SP_EIO (uv_read_start failed), in
 * which case the stream is left to the caller untouched.
 */
int sp_wire_conn_open(sp_wire_conn_t **out, uv_stream_t *stream, uint32_t max_frame,
                      sp_wire_frame_cb on_frame, sp_wire_close_cb on_close, void *data);

/*
 * Encodes f and queues it for writing. Returns 0; SP_ECLOSED when the conn is
 * closing; SP_EINVAL when f breaks a protocol rule (logged with the reason);
 * SP_ETOOBIG when the encoded frame exceeds max_frame; SP_ENOMEM; SP_EIO when
 * uv_write refuses it. A write that fails later closes the conn with SP_EIO.
 */
int sp_wire_conn_send(sp_wire_conn_t *c, const struct sp_wire_frame *f);

/* Stops reading and closes the stream (queued writes are cancelled); on_close gets err 0. */
void sp_wire_conn_close(sp_wire_conn_t *c);

void *sp_wire_conn_data(const sp_wire_conn_t *c);
uv_stream_t *sp_wire_conn_stream(const sp_wire_conn_t *c);
/* "127.0.0.1:40000" for TCP, "stream" otherwise; for log lines. */
const char *sp_wire_conn_peer(const sp_wire_conn_t *c);
/* Why the conn closed ("" while open). */
const char *sp_wire_conn_reason(const sp_wire_conn_t *c);
/* Bytes queued for writing and not yet taken by the kernel (for back-pressure). */
size_t sp_wire_conn_write_queue(const sp_wire_conn_t *c);

#endif
