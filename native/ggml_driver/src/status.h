/*
 * status.h — the error and log helpers every C file of the driver uses. Free of ggml, so the
 * sampler and its unit-test build (tests/test_sampler_unit.py) need nothing but status.c.
 */
#ifndef PIE_STATUS_H
#define PIE_STATUS_H

#include "pie_driver.h"

/* status.c: sets this thread's last error (pie_last_error) and returns `status`, so a failure
 * reads `return pie_set_error(PIE_ERR_..., "what went wrong: %s", why);`. */
int32_t pie_set_error(int32_t status, const char *fmt, ...);

/* log.c: one message to the callback of pie_log_set (dropped when none is set). */
void pie_log(int32_t level, const char *fmt, ...);

/* log.c: routes ggml's logs (and fatal errors) through pie_log unless pie_log_set already
 * did, so ggml never prints, even before the host sets a callback. */
void pie_log_capture_ggml(void);

#endif /* PIE_STATUS_H */
