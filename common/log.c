#include "spool/log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static _Atomic int log_level = SP_LOG_INFO;
static _Atomic bool log_json = false;
static _Atomic int log_fd = 2;
static char log_component[32] = "spool";

static const char *const level_names[] = {"debug", "info", "warn", "error", "off"};

int sp_log_parse_level(const char *name)
{
    for (int i = 0; i <= SP_LOG_OFF; i++)
        if (strcasecmp(name, level_names[i]) == 0)
            return i;
    if (strcasecmp(name, "warning") == 0)
        return SP_LOG_WARN;
    return -1;
}

void sp_log_init(const char *component)
{
    if (component)
        snprintf(log_component, sizeof log_component, "%s", component);
    const char *lv = getenv("SPOOL_LOG_LEVEL");
    if (lv && *lv) {
        int l = sp_log_parse_level(lv);
        if (l >= 0)
            log_level = l;
    }
    const char *fmt = getenv("SPOOL_LOG_FORMAT");
    if (fmt && strcasecmp(fmt, "json") == 0)
        log_json = true;
}

void sp_log_set_level(enum sp_log_level level)
{
    log_level = level;
}

void sp_log_set_json(bool json)
{
    log_json = json;
}

void sp_log_set_fd(int fd)
{
    log_fd = fd;
}

bool sp_log_enabled(enum sp_log_level level)
{
    return (int)level >= log_level && level < SP_LOG_OFF;
}

static void append(char *buf, size_t cap, size_t *len, const char *s, size_t n)
{
    if (*len >= cap - 1)
        return;
    if (n > cap - 1 - *len)
        n = cap - 1 - *len;
    memcpy(buf + *len, s, n);
    *len += n;
    buf[*len] = '\0';
}

/* Returns the length of the valid UTF-8 sequence at s, or 0 if it is not one. */
static size_t utf8_valid_len(const unsigned char *s)
{
    unsigned c = s[0];
    size_t n;
    unsigned min;
    if (c < 0x80)
        return 1;
    if ((c & 0xE0) == 0xC0)
        n = 2, min = 0x80;
    else if ((c & 0xF0) == 0xE0)
        n = 3, min = 0x800;
    else if ((c & 0xF8) == 0xF0)
        n = 4, min = 0x10000;
    else
        return 0;
    unsigned cp = c & (0x3F >> (n - 1));
    for (size_t i = 1; i < n; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return n;
}

void sp_json_escape(char *buf, size_t cap, size_t *len, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    char tmp[8];
    while (*p) {
        unsigned c = *p;
        if (c == '"' || c == '\\') {
            tmp[0] = '\\', tmp[1] = (char)c;
            append(buf, cap, len, tmp, 2);
            p++;
        } else if (c == '\n') {
            append(buf, cap, len, "\\n", 2), p++;
        } else if (c == '\r') {
            append(buf, cap, len, "\\r", 2), p++;
        } else if (c == '\t') {
            append(buf, cap, len, "\\t", 2), p++;
        } else if (c < 0x20 || c == 0x7F) {
            snprintf(tmp, sizeof tmp, "\\u%04x", c);
            append(buf, cap, len, tmp, 6), p++;
        } else if (c < 0x80) {
            append(buf, cap, len, (const char *)p, 1), p++;
        } else {
            size_t n = utf8_valid_len(p);
            if (n == 0) {
                snprintf(tmp, sizeof tmp, "\\u%04x", c);
                append(buf, cap, len, tmp, 6), p++;
            } else {
                append(buf, cap, len, (const char *)p, n), p += n;
            }
        }
    }
}

void sp_log(enum sp_log_level level, const char *fmt, ...)
{
    if (!sp_log_enabled(level))
        return;
    char msg[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);

    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char when[40];
    size_t w = strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(when + w, sizeof when - w, ".%03ldZ", ts.tv_nsec / 1000000);

    char line[8192];
    size_t len = 0;
    line[0] = '\0';
    if (log_json) {
        len =
            (size_t)snprintf(line, sizeof line, "{\"ts\":\"%s\",\"level\":\"%s\",\"component\":\"",
                             when, level_names[level]);
        sp_json_escape(line, sizeof line - 3, &len, log_component);
        append(line, sizeof line - 3, &len, "\",\"pid\":", 8);
        char pid[24];
        int pn = snprintf(pid, sizeof pid, "%d,\"msg\":\"", (int)getpid());
        append(line, sizeof line - 3, &len, pid, (size_t)pn);
        sp_json_escape(line, sizeof line - 3, &len, msg);
        append(line, sizeof line, &len, "\"}\n", 3);
    } else {
        len = (size_t)snprintf(line, sizeof line, "%s %-5s %s[%d]: ", when, level_names[level],
                               log_component, (int)getpid());
        if (len >= sizeof line)
            len = sizeof line - 1;
        append(line, sizeof line - 1, &len, msg, strlen(msg));
        append(line, sizeof line, &len, "\n", 1);
    }
    ssize_t off = 0;
    while ((size_t)off < len) {
        ssize_t n = write(log_fd, line + off, len - (size_t)off);
        if (n <= 0)
            break;
        off += n;
    }
}
