/*
 * rpc.c — ggml's RPC backend: serving this machine's devices to other machines, connecting to
 * such workers, and surviving a worker that goes away.
 *
 * ggml's RPC client (ggml-rpc.cpp) aborts the process when it cannot connect, when the
 * handshake fails and when a connection drops in the middle of a call. So:
 *   - before ggml connects, the driver opens its own connection and sends the protocol's first
 *     message (HELLO) to check that a worker of the same protocol version answers;
 *   - every call on a model with workers runs on a helper thread (pie_rpc_call); ggml's abort
 *     reaches the driver's abort hook (log.c), which, for an abort inside ggml-rpc, parks the
 *     aborting thread for good and wakes the callers, whose calls fail with PIE_ERR_BACKEND.
 * The parked thread keeps ggml's connection object for that endpoint alive and unusable, and
 * ggml keeps one per endpoint string for the process's life; so after each failure endpoints
 * are handed to ggml with the port written with one more leading zero (ggml parses the port as
 * a number), which names the same worker with a fresh connection.
 *
 * Process-wide state (the abort hook is process-wide): the count of failures seen and the
 * endpoints in use by loaded models, behind one mutex.
 */
#include "internal.h"

#include "ggml-rpc.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ggml-rpc's wire facts this file relies on (ggml-rpc.cpp and transport.h, not installed):
 * a request is | command (1 byte) | size (8 bytes) | data |, a reply | size (8 bytes) | data |;
 * HELLO is command 14 on every protocol version; its request carries 24 bytes of transport
 * capabilities (all 0 = plain TCP) and its reply starts with major, minor, patch. */
#define RPC_HELLO_CMD      14
#define RPC_HELLO_CAPS     24
#define RPC_HELLO_REPLY    (4 + RPC_HELLO_CAPS)
#define PROBE_TIMEOUT_MS   5000

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t  g_cv = PTHREAD_COND_INITIALIZER;
static bool     g_client;             /* this process connected to a worker: park RPC aborts   */
static uint64_t g_failures;           /* RPC aborts seen by the hook so far                     */
static char     g_why[256];           /* the last one's message                                */
static char     g_in_use[64][PIE_RPC_ENDPOINT]; /* endpoints of loaded models (one entry per model) */

/* ------------------------------------------------------------------------------------------ */
/* Endpoints                                                                                  */
/* ------------------------------------------------------------------------------------------ */

/* "host:port" -> host and port; false when it is not one. */
static bool split_endpoint(const char *ep, char *host, size_t host_size, int *port) {
    const char *colon = strrchr(ep, ':');
    if (!colon || colon == ep || (size_t)(colon - ep) >= host_size || !colon[1]) return false;
    char *end;
    long p = strtol(colon + 1, &end, 10);
    if (*end || p < 1 || p > 65535) return false;
    memcpy(host, ep, (size_t)(colon - ep));
    host[colon - ep] = 0;
    if (host[0] == '[') { /* [v6-address] */
        size_t n = strlen(host);
        if (n < 3 || host[n - 1] != ']') return false;
        memmove(host, host + 1, n - 2);
        host[n - 2] = 0;
    }
    *port = (int)p;
    return true;
}

int32_t pie_rpc_parse(const char *list, pie_rpc *out) {
    memset(out, 0, sizeof(*out));
    const char *s = list;
    while (s && *s) {
        const char *comma = strchr(s, ',');
        size_t n = comma ? (size_t)(comma - s) : strlen(s);
        char ep[PIE_RPC_ENDPOINT], host[PIE_RPC_ENDPOINT];
        int port;
        if (n == 0 || n >= PIE_RPC_ENDPOINT - 32) /* room for the leading zeros of ggml_spelling */
            return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "bad RPC worker list '%s': each entry is HOST:PORT", list);
        memcpy(ep, s, n);
        ep[n] = 0;
        if (!split_endpoint(ep, host, sizeof(host), &port))
            return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "bad RPC worker '%s': expected HOST:PORT with a port in 1..65535", ep);
        if (out->n >= PIE_MAX_DEVICES - 1)
            return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "more than %d RPC workers", PIE_MAX_DEVICES - 1);
        for (int i = 0; i < out->n; i++)
            if (strcmp(out->endpoint[i], ep) == 0)
                return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "RPC worker '%s' is listed twice", ep);
        snprintf(out->endpoint[out->n++], PIE_RPC_ENDPOINT, "%s", ep);
        s = comma ? comma + 1 : NULL;
    }
    pthread_mutex_lock(&g_mu);
    out->failures = g_failures;
    pthread_mutex_unlock(&g_mu);
    return PIE_OK;
}

/* The endpoint as handed to ggml: the port with one leading zero per failure seen so far. */
static void ggml_spelling(const char *ep, uint64_t failures, char *out, size_t size) {
    const char *colon = strrchr(ep, ':');
    int n = snprintf(out, size, "%.*s:", (int)(colon - ep), ep);
    for (uint64_t i = 0; i < failures && (size_t)n + 1 < size; i++) out[n++] = '0';
    snprintf(out + n, size - (size_t)n, "%s", colon + 1);
}

/* ------------------------------------------------------------------------------------------ */
/* Probing a worker with plain sockets                                                        */
/* ------------------------------------------------------------------------------------------ */

/* A TCP connection to `ep` within timeout_ms: the socket, or -1 with *why set. */
static int dial(const char *ep, int timeout_ms, const char **why) {
    char host[PIE_RPC_ENDPOINT], port_s[8];
    int port;
    if (!split_endpoint(ep, host, sizeof(host), &port)) { *why = "not HOST:PORT"; return -1; }
    snprintf(port_s, sizeof(port_s), "%d", port);
    struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL;
    if (getaddrinfo(host, port_s, &hints, &res) != 0 || !res) { *why = "unknown host"; return -1; }
    int fd = -1;
    *why = "connection refused";
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        int rc = connect(fd, a->ai_addr, a->ai_addrlen);
        if (rc != 0 && errno == EINPROGRESS) {
            struct pollfd p = { .fd = fd, .events = POLLOUT };
            int err = 0;
            socklen_t len = sizeof(err);
            if (poll(&p, 1, timeout_ms) == 1 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) rc = 0;
            else *why = err ? strerror(err) : "no answer";
        } else if (rc != 0) {
            *why = strerror(errno);
        }
        if (rc != 0) { close(fd); fd = -1; }
    }
    freeaddrinfo(res);
    return fd;
}

/* Sends or receives exactly n bytes before the deadline (ms on a monotonic clock). */
static bool io_all(int fd, void *buf, size_t n, bool send_it, int timeout_ms) {
    uint8_t *p = buf;
    while (n > 0) {
        struct pollfd pf = { .fd = fd, .events = send_it ? POLLOUT : POLLIN };
        if (poll(&pf, 1, timeout_ms) != 1) return false;
        ssize_t k = send_it ? send(fd, p, n, MSG_NOSIGNAL) : recv(fd, p, n, 0);
        if (k <= 0) return false;
        p += k;
        n -= (size_t)k;
    }
    return true;
}

/* Checks that a ggml RPC worker of this protocol version answers at `ep`. */
static int32_t probe(const char *ep) {
    const char *why;
    int fd = dial(ep, PROBE_TIMEOUT_MS, &why);
    if (fd < 0)
        return pie_set_error(PIE_ERR_BACKEND, "cannot connect to RPC worker %s: %s (is `pie-local worker` running there?)", ep, why);
    uint8_t req[1 + 8 + RPC_HELLO_CAPS] = { RPC_HELLO_CMD };
    const uint64_t req_size = RPC_HELLO_CAPS;
    memcpy(req + 1, &req_size, 8);
    uint64_t size = 0;
    uint8_t reply[RPC_HELLO_REPLY];
    int32_t st = PIE_OK;
    if (!io_all(fd, req, sizeof(req), true, PROBE_TIMEOUT_MS) || !io_all(fd, &size, 8, false, PROBE_TIMEOUT_MS)) {
        st = pie_set_error(PIE_ERR_BACKEND,
                           "RPC worker %s did not answer the handshake within %d s: it is not a ggml RPC worker, runs "
                           "another ggml RPC protocol than this one (%s), or is busy with another client (a worker "
                           "serves one at a time)", ep, PROBE_TIMEOUT_MS / 1000, pie_rpc_version());
    } else if (size != RPC_HELLO_REPLY || !io_all(fd, reply, sizeof(reply), false, PROBE_TIMEOUT_MS) ||
               reply[0] != RPC_PROTO_MAJOR_VERSION || reply[1] > RPC_PROTO_MINOR_VERSION) {
        char theirs[32] = "unknown";
        if (size == RPC_HELLO_REPLY) snprintf(theirs, sizeof(theirs), "%d.%d.%d", reply[0], reply[1], reply[2]);
        st = pie_set_error(PIE_ERR_UNSUPPORTED,
                           "RPC worker %s speaks ggml RPC protocol %s but this ggml speaks %s; install the same "
                           "llama-cpp-python version on both machines", ep, theirs, pie_rpc_version());
    }
    close(fd);
    return st;
}

/* ------------------------------------------------------------------------------------------ */
/* Connecting                                                                                 */
/* ------------------------------------------------------------------------------------------ */

static ggml_backend_reg_t rpc_reg(void) {
    if (ggml_backend_dev_count() == 0) ggml_backend_load_all();
    return ggml_backend_reg_by_name("RPC");
}

int32_t pie_rpc_available(void) { return rpc_reg() != NULL; }

const char *pie_rpc_version(void) {
    static const char version[] = { '0' + RPC_PROTO_MAJOR_VERSION, '.', '0' + RPC_PROTO_MINOR_VERSION, '.',
                                    '0' + RPC_PROTO_PATCH_VERSION, 0 };
    _Static_assert(RPC_PROTO_MAJOR_VERSION < 10 && RPC_PROTO_MINOR_VERSION < 10 && RPC_PROTO_PATCH_VERSION < 10,
                   "pie_rpc_version formats single digits");
    return version;
}

static bool in_use(const char *ep) {
    for (size_t i = 0; i < sizeof(g_in_use) / sizeof(g_in_use[0]); i++)
        if (strcmp(g_in_use[i], ep) == 0) return true;
    return false;
}

static void mark_in_use(const char *ep, bool on) {
    for (size_t i = 0; i < sizeof(g_in_use) / sizeof(g_in_use[0]); i++) {
        if (on ? g_in_use[i][0] == 0 : strcmp(g_in_use[i], ep) == 0) {
            snprintf(g_in_use[i], PIE_RPC_ENDPOINT, "%s", on ? ep : "");
            return;
        }
    }
}

int32_t pie_rpc_connect(pie_rpc *rpc, ggml_backend_dev_t *devs, int32_t cap, int32_t *n_devs) {
    *n_devs = 0;
    if (rpc->n == 0) return PIE_OK;
    ggml_backend_reg_t reg = rpc_reg();
    if (!reg)
        return pie_set_error(PIE_ERR_UNSUPPORTED, "this ggml has no RPC backend; reinstall llama-cpp-python with "
                             "CMAKE_ARGS=\"-DGGML_RPC=ON\" (see the README's install)");
    typedef ggml_backend_reg_t (*add_server_fn)(const char *endpoint);
    add_server_fn add_server = (add_server_fn)ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server");
    if (!add_server) return pie_set_error(PIE_ERR_UNSUPPORTED, "this ggml's RPC backend has no ggml_backend_rpc_add_server");

    pthread_mutex_lock(&g_mu);
    g_client = true;
    pthread_mutex_unlock(&g_mu);
    for (int i = 0; i < rpc->n; i++) {
        char spelled[PIE_RPC_ENDPOINT];
        ggml_spelling(rpc->endpoint[i], rpc->failures, spelled, sizeof(spelled));
        pthread_mutex_lock(&g_mu);
        const bool shared = in_use(spelled); /* this process already talks to it: no second client */
        pthread_mutex_unlock(&g_mu);
        int32_t st;
        if (!shared && (st = probe(rpc->endpoint[i])) != PIE_OK) return st;
        ggml_backend_reg_t r = add_server(spelled);
        const size_t n = r ? ggml_backend_reg_dev_count(r) : 0;
        if (n == 0) return pie_set_error(PIE_ERR_BACKEND, "RPC worker %s offers no device", rpc->endpoint[i]);
        for (size_t j = 0; j < n; j++) {
            if (*n_devs >= cap) return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "more than %d devices", cap);
            rpc->dev_worker[*n_devs] = i;
            devs[(*n_devs)++] = ggml_backend_reg_dev_get(r, j);
        }
        pthread_mutex_lock(&g_mu);
        mark_in_use(spelled, true);
        snprintf(rpc->spelled[i], PIE_RPC_ENDPOINT, "%s", spelled);
        pthread_mutex_unlock(&g_mu);
    }
    return PIE_OK;
}

void pie_rpc_release(pie_rpc *rpc) {
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < rpc->n; i++)
        if (rpc->spelled[i][0]) mark_in_use(rpc->spelled[i], false);
    pthread_mutex_unlock(&g_mu);
}

/* ------------------------------------------------------------------------------------------ */
/* Serving                                                                                    */
/* ------------------------------------------------------------------------------------------ */

int32_t pie_rpc_serve(const char *endpoint, int32_t n_threads) {
    pie_log_capture_ggml();
    ggml_backend_reg_t reg = rpc_reg();
    if (!reg)
        return pie_set_error(PIE_ERR_UNSUPPORTED, "this ggml has no RPC backend; reinstall llama-cpp-python with "
                             "CMAKE_ARGS=\"-DGGML_RPC=ON\" (see the README's install)");
    char host[PIE_RPC_ENDPOINT];
    int port;
    if (!endpoint || !split_endpoint(endpoint, host, sizeof(host), &port))
        return pie_set_error(PIE_ERR_INVALID_ARGUMENT, "bad endpoint '%s': expected HOST:PORT with a port in 1..65535",
                             endpoint ? endpoint : "(null)");
    typedef void (*start_fn)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *);
    start_fn start = (start_fn)ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_start_server");
    if (!start) return pie_set_error(PIE_ERR_UNSUPPORTED, "this ggml's RPC backend has no ggml_backend_rpc_start_server");

    /* the GPUs when there are any (a client splits layers by memory, and the host's memory
     * would draw most of them to a slow CPU), else the CPU */
    ggml_backend_dev_t devs[PIE_MAX_DEVICES];
    size_t n = 0;
    for (size_t i = 0; i < ggml_backend_dev_count() && n < PIE_MAX_DEVICES; i++) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_GPU) devs[n++] = d;
    }
    if (n == 0) devs[n++] = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    /* the port must be free: ggml's server only prints when it cannot listen */
    const char *why;
    int fd = dial(endpoint, 1000, &why);
    if (fd >= 0) {
        close(fd);
        return pie_set_error(PIE_ERR_IO, "something already listens on %s", endpoint);
    }
    start(endpoint, NULL, (size_t)(n_threads > 0 ? n_threads : 1), n, devs);
    return pie_set_error(PIE_ERR_IO, "the RPC server at %s stopped (cannot listen there?)", endpoint);
}

/* ------------------------------------------------------------------------------------------ */
/* Calls that survive a dropped worker                                                        */
/* ------------------------------------------------------------------------------------------ */

/* Only a client parks: a worker process (pie_rpc_serve) that trips an assert of ggml-rpc aborts,
 * and its clients see the dropped connection. */
bool pie_rpc_on_abort(const char *message) {
    pthread_mutex_lock(&g_mu);
    if (!g_client || !strstr(message, "ggml-rpc")) {
        pthread_mutex_unlock(&g_mu);
        return false;
    }
    g_failures++;
    snprintf(g_why, sizeof(g_why), "%s", strstr(message, "ggml-rpc")); /* without the build's path */
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
    for (;;) pause(); /* parked for good: ggml's state on this thread's stack stays untouched */
}

typedef struct {
    int32_t (*fn)(void *);
    void   *arg;
    int32_t status;
    char    error[512];
    bool    done, abandoned;
} rpc_job;

static void *job_main(void *p) {
    rpc_job *job = p;
    const int32_t st = job->fn(job->arg);
    pthread_mutex_lock(&g_mu);
    job->status = st;
    snprintf(job->error, sizeof(job->error), "%s", st == PIE_OK ? "" : pie_last_error());
    job->done = true;
    const bool orphan = job->abandoned;
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
    if (orphan) free(job);
    return NULL;
}

/* Names the workers of `rpc` that no longer accept connections into `out`; false when all do. */
static bool gone_workers(const pie_rpc *rpc, char *out, size_t size) {
    out[0] = 0;
    for (int i = 0; i < rpc->n; i++) {
        const char *why;
        int fd = dial(rpc->endpoint[i], 1000, &why);
        if (fd >= 0) { close(fd); continue; }
        size_t len = strlen(out);
        snprintf(out + len, size - len, "%s%s (%s)", len ? ", " : "", rpc->endpoint[i], why);
    }
    return out[0] != 0;
}

/* Whether `sa` is the address `ep` resolves to. */
static bool is_peer(const struct sockaddr *sa, const struct addrinfo *ep) {
    for (const struct addrinfo *a = ep; a; a = a->ai_next) {
        if (a->ai_family != sa->sa_family) continue;
        if (sa->sa_family == AF_INET) {
            const struct sockaddr_in *x = (const void *)sa, *y = (const void *)a->ai_addr;
            if (x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr) return true;
        } else if (sa->sa_family == AF_INET6) {
            const struct sockaddr_in6 *x = (const void *)sa, *y = (const void *)a->ai_addr;
            if (x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0) return true;
        }
    }
    return false;
}

/* A lost model's connections to its other workers stay open for good (ggml's objects that own
 * them are held by the parked thread), and a worker serves one client at a time: so this shuts
 * down this process's connections to each of them that no other loaded model uses, and the
 * worker can serve the next load. Call with g_mu held. */
static void drop_connections(const pie_rpc *rpc) {
    for (int i = 0; i < rpc->n; i++) {
        int users = 0;
        for (size_t j = 0; j < sizeof(g_in_use) / sizeof(g_in_use[0]); j++) users += strcmp(g_in_use[j], rpc->spelled[i]) == 0;
        mark_in_use(rpc->spelled[i], false);
        if (users != 1) continue;
        char host[PIE_RPC_ENDPOINT], port_s[8];
        int port;
        struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL;
        if (!split_endpoint(rpc->endpoint[i], host, sizeof(host), &port)) continue;
        snprintf(port_s, sizeof(port_s), "%d", port);
        if (getaddrinfo(host, port_s, &hints, &res) != 0) continue;
        const long max_fd = sysconf(_SC_OPEN_MAX) > 0 && sysconf(_SC_OPEN_MAX) < 65536 ? sysconf(_SC_OPEN_MAX) : 65536;
        for (int fd = 0; fd < max_fd; fd++) {
            struct sockaddr_storage ss;
            socklen_t len = sizeof(ss);
            if (getpeername(fd, (struct sockaddr *)&ss, &len) == 0 && is_peer((struct sockaddr *)&ss, res))
                shutdown(fd, SHUT_RDWR);
        }
        freeaddrinfo(res);
    }
}

int32_t pie_rpc_call(pie_rpc *rpc, int32_t (*fn)(void *), void *arg) {
    if (rpc->n == 0) return fn(arg);
    if (rpc->dead) return pie_set_error(PIE_ERR_BACKEND, "%s", rpc->why);
    rpc_job *job = calloc(1, sizeof(*job));
    if (!job) return pie_set_error(PIE_ERR_OUT_OF_MEMORY, "cannot allocate an RPC call");
    job->fn = fn;
    job->arg = arg;
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int rc = pthread_create(&thread, &attr, job_main, job);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
        free(job);
        return pie_set_error(PIE_ERR_BACKEND, "cannot start a thread for an RPC call: %s", strerror(rc));
    }
    pthread_mutex_lock(&g_mu);
    for (;;) {
        while (!job->done && g_failures == rpc->failures) pthread_cond_wait(&g_cv, &g_mu);
        if (job->done) break;
        /* a worker connection dropped somewhere in this process: is it one of ours? */
        const uint64_t seen = g_failures;
        char why[256], gone[256];
        snprintf(why, sizeof(why), "%s", g_why);
        pthread_mutex_unlock(&g_mu);
        const bool ours = gone_workers(rpc, gone, sizeof(gone));
        pthread_mutex_lock(&g_mu);
        if (!ours) { rpc->failures = seen; continue; }
        job->abandoned = true; /* its thread is stuck in ggml for good, or frees the job itself */
        drop_connections(rpc);
        pthread_mutex_unlock(&g_mu);
        rpc->dead = true;
        snprintf(rpc->why, sizeof(rpc->why), "lost RPC worker %s; this model cannot run any more: load it again "
                 "once the worker is back (ggml: %s)", gone, why);
        return pie_set_error(PIE_ERR_BACKEND, "%s", rpc->why);
    }
    pthread_mutex_unlock(&g_mu);
    const int32_t st = job->status;
    if (st != PIE_OK) pie_set_error(st, "%s", job->error);
    free(job);
    return st;
}
