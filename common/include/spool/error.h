/*
 * One error table for all of Spool's libraries.
 *
 * Functions return 0 (or a non-negative count) on success and a negative SP_E*
 * code on failure. SP_EAGAIN is not a failure: a non-blocking step returns it
 * to say "call me again when there is more input" (as nginx's NGX_AGAIN).
 * A handle keeps a longer message for the last failure; this table only names
 * the kind of failure.
 */
#ifndef SPOOL_ERROR_H
#define SPOOL_ERROR_H

#define SP_ERRNO_MAP(XX)                                                                           \
    XX(EAGAIN, "again: more input needed")                                                         \
    XX(EINVAL, "invalid argument")                                                                 \
    XX(ENOMEM, "out of memory")                                                                    \
    XX(EIO, "input/output error")                                                                  \
    XX(ENOENT, "no such file or object")                                                           \
    XX(EEXIST, "already exists")                                                                   \
    XX(EPERM, "permission denied")                                                                 \
    XX(EDB, "database error")                                                                      \
    XX(EPROTO, "protocol error")                                                                   \
    XX(ETOOBIG, "too large")                                                                       \
    XX(ECORRUPT, "corrupt or malformed data")                                                      \
    XX(ECHECKSUM, "checksum mismatch")                                                             \
    XX(EUNSUPPORTED, "unsupported")                                                                \
    XX(ETIMEDOUT, "timed out")                                                                     \
    XX(ECLOSED, "connection closed")                                                               \
    XX(ESTATE, "invalid state for this operation")                                                 \
    XX(ECONTEXT, "longer than the model context")                                                  \
    XX(ECHILD, "child process failed")                                                             \
    XX(EBACKEND, "compute backend error")                                                          \
    XX(ENODEV, "no compute device")                                                                \
    XX(ECANCELED, "canceled")

enum sp_errno {
    SP_OK = 0,
#define XX(code, msg) SP_##code,
    SP__ERRNO_FIRST = -1000,
    SP_ERRNO_MAP(XX)
#undef XX
        SP__ERRNO_LAST
};

/* Returns a static description of err ("unknown error" for codes outside the table). */
const char *sp_strerror(int err);
/* Returns the static name of err, such as "SP_EINVAL". */
const char *sp_err_name(int err);

#endif
