/*
 * status.c — status names and the thread-local last error (see pie_last_error in pie_driver.h).
 */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[1024];

int32_t pie_set_error(int32_t status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    return status;
}

const char *pie_last_error(void) { return last_error; }

const char *pie_status_name(int32_t status) {
    switch (status) {
        case PIE_OK:                   return "ok";
        case PIE_ERR_IO:               return "io";
        case PIE_ERR_FORMAT:           return "format";
        case PIE_ERR_UNSUPPORTED:      return "unsupported";
        case PIE_ERR_OUT_OF_MEMORY:    return "out_of_memory";
        case PIE_ERR_INVALID_ARGUMENT: return "invalid_argument";
        case PIE_ERR_BACKEND:          return "backend";
        default:                       return "unknown";
    }
}
