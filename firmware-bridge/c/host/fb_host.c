/*
 * fb_host: the reference client on a POSIX host, over UDP or a serial device (a tty or a pty).
 * It implements fb_port_t with sockets / termios, a monotonic clock and an epoch file, then runs
 * HELLO and the requested inferences and prints one JSON line per result.
 *
 *   fb_host --udp 127.0.0.1:5685 --device-id 0x1a2b3c4d --key <64 hex> --epoch-file dev.epoch \
 *           --model kws --input window.i16 --scale 0.001 --shape 1,25,96 [--count N] [--raw] [--retransmit]
 *   fb_host --serial /dev/ttyUSB0 ...
 */
#define _DEFAULT_SOURCE
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "../fb.h"

typedef struct {
    int fd;
    int is_udp;
    struct sockaddr_in peer;
    uint8_t key[32];
    const char *epoch_file;
} host_ctx_t;

static int host_send(void *ctx, const uint8_t *buf, size_t n) {
    host_ctx_t *h = ctx;
    if (h->is_udp) return sendto(h->fd, buf, n, 0, (struct sockaddr *)&h->peer, sizeof h->peer) == (ssize_t)n ? 0 : -1;
    while (n) {
        ssize_t w = write(h->fd, buf, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return -1;
        }
        buf += w;
        n -= (size_t)w;
    }
    return 0;
}

static int host_recv(void *ctx, uint8_t *buf, size_t cap, uint32_t timeout_ms) {
    host_ctx_t *h = ctx;
    struct pollfd p = {h->fd, POLLIN, 0};
    int rc = poll(&p, 1, (int)timeout_ms);
    if (rc == 0) return 0;
    if (rc < 0) return errno == EINTR ? 0 : -1;
    ssize_t n = h->is_udp ? recv(h->fd, buf, cap, 0) : read(h->fd, buf, cap);
    if (n < 0) return (errno == EINTR || errno == EAGAIN) ? 0 : -1;
    return (int)n;
}

static uint32_t host_now(void *ctx) {
    struct timespec ts;
    (void)ctx;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint32_t)(ts.tv_sec * 1000u + ts.tv_nsec / 1000000u);
}

static int host_load_key(void *ctx, uint8_t key[32]) {
    memcpy(key, ((host_ctx_t *)ctx)->key, 32);
    return 0;
}

static int host_load_epoch(void *ctx, uint16_t *epoch) {
    host_ctx_t *h = ctx;
    unsigned v = 0;
    FILE *f = h->epoch_file ? fopen(h->epoch_file, "r") : NULL;
    *epoch = 0;
    if (!f) return 0;
    if (fscanf(f, "%u", &v) == 1) *epoch = (uint16_t)v;
    fclose(f);
    return 0;
}

static int host_store_epoch(void *ctx, uint16_t epoch) {
    host_ctx_t *h = ctx;
    FILE *f;
    if (!h->epoch_file) return 0;
    f = fopen(h->epoch_file, "w");
    if (!f) return -1;
    fprintf(f, "%u\n", (unsigned)epoch);
    return fclose(f) == 0 ? 0 : -1;
}

static int hex_to_bytes(const char *hex, uint8_t *out, size_t n) {
    if (strlen(hex) != n * 2) return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (uint8_t)v;
    }
    return 0;
}

static int open_serial(const char *path) {
    struct termios t;
    int fd = open(path, O_RDWR | O_NOCTTY);
    if (fd < 0) return -1;
    if (tcgetattr(fd, &t) == 0) {
        cfmakeraw(&t);
        cfsetispeed(&t, B115200);
        cfsetospeed(&t, B115200);
        t.c_cc[VMIN] = 0;
        t.c_cc[VTIME] = 0;
        tcsetattr(fd, TCSANOW, &t);
    }
    return fd;
}

static void print_result(const char *what, int rc, const fb_client_t *c, const fb_result_t *r) {
    if (rc != FB_OK) {
        printf("{\"what\":\"%s\",\"ok\":false,\"rc\":%d,\"error\":%d,\"epoch\":%u,\"seq\":%u}\n", what, rc,
               rc == FB_ERR_REMOTE ? c->last_error : 0, c->epoch, c->seq);
        fflush(stdout);
        return;
    }
    printf("{\"what\":\"%s\",\"ok\":true,\"label\":%u,\"score\":%.9g,\"latency_ms\":%u,\"agent\":\"%s\",\"epoch\":%u,\"seq\":%u,\"receipt_ref\":\"",
           what, r->label, (double)r->score, r->latency_ms, r->agent, c->epoch, c->seq);
    for (int i = 0; i < 8; i++) printf("%02x", r->receipt_ref[i]);
    printf("\",\"output_hex\":\"");
    for (size_t i = 0; i < r->output_n; i++) {
        const uint8_t *b = (const uint8_t *)&r->output[i];
        printf("%02x%02x%02x%02x", b[0], b[1], b[2], b[3]); /* little-endian host */
    }
    printf("\"}\n");
    fflush(stdout);
}

static fb_client_t client; /* static: it holds every buffer */
static int16_t samples[FB_MAX_PACKET / 2];
static float output[1024];

int main(int argc, char **argv) {
    host_ctx_t h;
    const char *udp = NULL, *serial = NULL, *model = "kws", *input = NULL;
    uint32_t device_id = 0, shape[8], deadline = 1000, count = 1, sleep_period = 0, timeout = 1000;
    uint8_t rank = 0;
    float scale = 1.0f;
    int raw = 0, retransmit = 0, poll_once = 0, have_key = 0;
    size_t n = 0;
    memset(&h, 0, sizeof h);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--raw")) raw = 1;
        else if (!strcmp(a, "--retransmit")) retransmit = 1;
        else if (!strcmp(a, "--poll")) poll_once = 1;
        else if (!v) {
            fprintf(stderr, "missing value for %s\n", a);
            return 2;
        } else {
            i++;
            if (!strcmp(a, "--udp")) udp = v;
            else if (!strcmp(a, "--serial")) serial = v;
            else if (!strcmp(a, "--device-id")) device_id = (uint32_t)strtoul(v, NULL, 0);
            else if (!strcmp(a, "--key")) have_key = hex_to_bytes(v, h.key, 32) == 0;
            else if (!strcmp(a, "--epoch-file")) h.epoch_file = v;
            else if (!strcmp(a, "--model")) model = v;
            else if (!strcmp(a, "--input")) input = v;
            else if (!strcmp(a, "--scale")) scale = strtof(v, NULL);
            else if (!strcmp(a, "--deadline")) deadline = (uint32_t)strtoul(v, NULL, 10);
            else if (!strcmp(a, "--count")) count = (uint32_t)strtoul(v, NULL, 10);
            else if (!strcmp(a, "--sleep-period")) sleep_period = (uint32_t)strtoul(v, NULL, 10);
            else if (!strcmp(a, "--timeout")) timeout = (uint32_t)strtoul(v, NULL, 10);
            else if (!strcmp(a, "--shape")) {
                char buf[128], *tok;
                snprintf(buf, sizeof buf, "%s", v);
                for (tok = strtok(buf, ","); tok && rank < 8; tok = strtok(NULL, ",")) shape[rank++] = (uint32_t)strtoul(tok, NULL, 10);
            } else {
                fprintf(stderr, "unknown option %s\n", a);
                return 2;
            }
        }
    }
    if ((!udp == !serial) || !device_id || !have_key) {
        fprintf(stderr, "usage: fb_host (--udp HOST:PORT | --serial PATH) --device-id N --key HEX64 [--epoch-file F]\n"
                        "               [--model NAME --input FILE.i16 --scale F --shape A,B,C --deadline MS --count N --raw --retransmit --poll]\n");
        return 2;
    }
    if (input) {
        FILE *f = fopen(input, "rb");
        if (!f) {
            perror(input);
            return 2;
        }
        n = fread(samples, 2, sizeof samples / 2, f); /* little-endian host */
        fclose(f);
    }
    if (udp) {
        char host[64];
        const char *colon = strrchr(udp, ':');
        if (!colon || (size_t)(colon - udp) >= sizeof host) return 2;
        memcpy(host, udp, (size_t)(colon - udp));
        host[colon - udp] = 0;
        h.is_udp = 1;
        h.fd = socket(AF_INET, SOCK_DGRAM, 0);
        h.peer.sin_family = AF_INET;
        h.peer.sin_port = htons((uint16_t)atoi(colon + 1));
        if (inet_pton(AF_INET, host, &h.peer.sin_addr) != 1) return 2;
    } else {
        h.fd = open_serial(serial);
    }
    if (h.fd < 0) {
        perror("open");
        return 1;
    }
    fb_port_t port = {&h, host_send, host_recv, host_now, host_load_key, host_load_epoch, host_store_epoch};
    fb_config_t cfg = {&port, &fb_crypto_sodium, device_id, serial ? FB_LINK_SERIAL : FB_LINK_DATAGRAM, timeout, 3};
    int rc = fb_init(&client, &cfg);
    if (rc) {
        fprintf(stderr, "fb_init failed: %d\n", rc);
        return 1;
    }
    rc = fb_hello(&client, sleep_period, 30);
    printf("{\"what\":\"hello\",\"ok\":%s,\"rc\":%d,\"epoch\":%u,\"models\":%u}\n", rc == FB_OK ? "true" : "false", rc, client.epoch, client.n_models);
    fflush(stdout);
    if (rc) return 1;
    int failures = 0;
    if (input) {
        uint16_t id = fb_model_id(&client, model);
        for (uint32_t k = 0; k < count; k++) {
            fb_result_t res;
            memset(&res, 0, sizeof res);
            res.output = raw ? output : NULL;
            res.output_cap = raw ? sizeof output / sizeof output[0] : 0;
            rc = fb_infer(&client, id, samples, n, scale, rank ? shape : NULL, rank, deadline, raw, &res);
            print_result("infer", rc, &client, &res);
            failures += rc != FB_OK;
            if (retransmit && rc == FB_OK) {
                fb_result_t again;
                memset(&again, 0, sizeof again);
                again.output = raw ? output + 512 : NULL;
                again.output_cap = raw ? 512 : 0;
                rc = fb_infer_retransmit(&client, &again);
                print_result("retransmit", rc, &client, &again);
                failures += rc != FB_OK;
            }
        }
    }
    if (poll_once) {
        uint8_t payload[256];
        size_t len = 0;
        rc = fb_poll(&client, payload, sizeof payload, &len);
        printf("{\"what\":\"poll\",\"rc\":%d,\"payload_hex\":\"", rc);
        for (size_t i = 0; i < len; i++) printf("%02x", payload[i]);
        printf("\"}\n");
    }
    close(h.fd);
    return failures ? 1 : 0;
}
