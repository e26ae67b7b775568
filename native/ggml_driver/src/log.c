/*
 * log.c — the log callback and ggml's log and abort hooks (see pie_log_set in pie_driver.h).
 *
 * The callback is the library's one process-wide setting: ggml's logger, which it receives,
 * is process-wide itself. Everything else lives in a model handle or is thread-local.
 */
#include "status.h"

#include "ggml.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static pie_log_callback log_callback;
static void *log_user_data;

void pie_log(int32_t level, const char *fmt, ...) {
    if (!log_callback) return;
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    log_callback(level, buf, log_user_data);
}

/* ggml logs in fragments (GGML_LOG_LEVEL_CONT continues the previous line); trailing newlines
 * are dropped so each callback gets one clean message. */
static void ggml_logger(enum ggml_log_level level, const char *text, void *user_data) {
    (void)user_data;
    static _Thread_local int32_t last_level = PIE_LOG_INFO;
    int32_t lv;
    switch (level) {
        case GGML_LOG_LEVEL_DEBUG: lv = PIE_LOG_DEBUG; break;
        case GGML_LOG_LEVEL_WARN:  lv = PIE_LOG_WARN; break;
        case GGML_LOG_LEVEL_ERROR: lv = PIE_LOG_ERROR; break;
        case GGML_LOG_LEVEL_CONT:  lv = last_level; break;
        default:                   lv = PIE_LOG_INFO; break;
    }
    last_level = lv;
    size_t n = strlen(text);
    while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r')) n--;
    if (n > 0) pie_log(lv, "%.*s", (int)n, text);
}

bool pie_rpc_on_abort(const char *message); /* rpc.c: parks the thread for an abort inside ggml-rpc */

/* ggml aborts the process once this returns; an abort inside its RPC client never returns
 * (rpc.c turns it into an error of the call that was waiting on the connection). */
static void ggml_abort_logger(const char *message) {
    pie_log(PIE_LOG_ERROR, "ggml fatal error: %s", message);
    pie_rpc_on_abort(message);
}

static void install_ggml_hooks(void) {
    ggml_log_set(ggml_logger, NULL);
    ggml_set_abort_callback(ggml_abort_logger);
}

void pie_log_capture_ggml(void) {
    if (!log_callback) install_ggml_hooks();
}

void pie_log_set(pie_log_callback callback, void *user_data) {
    log_callback = callback;
    log_user_data = user_data;
    install_ggml_hooks();
}
