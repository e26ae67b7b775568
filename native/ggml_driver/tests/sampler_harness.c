/*
 * sampler_harness.c — builds sampler.c alone into a shared library for the unit tests
 * (tests/test_sampler_unit.py), with the one symbol it borrows from driver.c.
 */
#include <stdarg.h>
#include <stdio.h>

#include "../src/sampler.h"

static char last_error[512];

int32_t pie_set_error(int32_t status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof(last_error), fmt, ap);
    va_end(ap);
    return status;
}

const char *harness_last_error(void) { return last_error; }
