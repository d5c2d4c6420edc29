#include "spool/error.h"

const char *sp_strerror(int err)
{
    switch (err) {
    case SP_OK:
        return "success";
#define XX(code, msg)                                                                              \
    case SP_##code:                                                                                \
        return msg;
        SP_ERRNO_MAP(XX)
#undef XX
    default:
        return "unknown error";
    }
}

const char *sp_err_name(int err)
{
    switch (err) {
    case SP_OK:
        return "SP_OK";
#define XX(code, msg)                                                                              \
    case SP_##code:                                                                                \
        return "SP_" #code;
        SP_ERRNO_MAP(XX)
#undef XX
    default:
        return "SP_EUNKNOWN";
    }
}
