/*
 * threads.h — how many CPU threads a forward pass runs.
 *
 * An explicit count is used as given. "auto" (n_threads <= 0) starts from the cores this
 * process may actually use (physical cores, CPU affinity, cgroup CPU quota) and then adapts to
 * the load on the machine: ggml's workers meet at a barrier after every op, so one worker that
 * shares its core with another busy process stalls all of them (2 threads on 2 cores with one
 * core busy decode slower than 1 thread). The controller times each pass per batch shape, now
 * and then runs one pass with one thread fewer or more (sooner when a pass suddenly takes much
 * longer than its recent best), and keeps the count that was faster. Probes back off to one
 * pass in 64 while they keep losing, so an idle machine loses well under 1% to them.
 *
 * Free of ggml, so tests/test_threads_unit.py builds it alone and drives it with made-up times.
 */
#ifndef PIE_THREADS_H
#define PIE_THREADS_H

#include <stdbool.h>
#include <stdint.h>

#define PIE_THREADS_MAX    256 /* most threads the controller tracks (ggml allows 512) */
#define PIE_THREADS_SHAPES 4   /* batch shapes timed at once (least recently seen replaced) */

typedef struct {
    int64_t key;                         /* batch shape (pie_threads_shape_key), 0 = free */
    int64_t seen;                        /* step it was last used                         */
    double  recent[PIE_THREADS_MAX + 1]; /* smoothed seconds per pass at each count       */
    double  best[PIE_THREADS_MAX + 1];   /* best recent seconds at each count             */
    int32_t samples[PIE_THREADS_MAX + 1];
} pie_threads_shape;

typedef struct {
    bool    adaptive;
    int32_t max;         /* most threads: the CPUs allowed (auto) or the explicit count    */
    int32_t n;           /* threads of the passes that are not probes                      */
    int32_t running;     /* threads of the pass being timed                                */
    int32_t slot;        /* its shape                                                      */
    int64_t step;
    int32_t until_probe; /* passes of the current shape before the next probe              */
    int32_t probe_gap;   /* 8 .. 64: doubles while probes lose                             */
    int32_t direction;   /* -1 or +1: the next probe tries n + direction                   */
    pie_threads_shape shapes[PIE_THREADS_SHAPES];
} pie_threads;

/* The threads this process may use: physical cores, no more than the CPUs in its affinity
 * mask, no more than its cgroup CPU quota (rounded up); at least 1. */
int32_t pie_threads_allowed(void);

/* n >= 1 threads; adaptive: move between 1 and n with the load. */
void pie_threads_init(pie_threads *t, int32_t n, bool adaptive);

/* A key for a batch shape: passes with equal keys cost about the same. */
int64_t pie_threads_shape_key(int32_t n_tokens, int32_t n_outputs);

/* The threads to run the next pass with, and the time that pass took. */
int32_t pie_threads_begin(pie_threads *t, int64_t shape_key);
void    pie_threads_end(pie_threads *t, double seconds);

/* Seconds on a monotonic clock. */
double pie_threads_now(void);

#endif /* PIE_THREADS_H */
