/*
 * A DTLS 1.2 client on wolfSSL with RFC 9146 Connection ID, for tests/tests/interop_dtls.rs.
 * Our code, written against wolfSSL's API documentation (wolfssl/ssl.h); it is compiled and
 * linked with a wolfSSL built at test time under the target directory and runs only as a
 * separate process (wolfSSL is GPL-2.0-or-later). Nothing of it is shipped.
 *
 * Usage: wolfssl_cid_client HOST PORT CERT_CHAIN KEY CA SUITE CID OUT1 OUT2
 *   SUITE  a wolfSSL cipher list, e.g. ECDHE-ECDSA-AES128-CCM-8
 *   CID    the Connection ID we ask the server to put in its records (ASCII), or "off" for no
 *          Connection ID extension at all
 *   OUT1/OUT2  files the payloads of the two responses are written to
 *
 * It completes the handshake with the client certificate, sends a CoAP CON GET
 * /.well-known/est/crts, reads the response; then opens a new UDP socket (a new source port),
 * moves the session onto it with wolfSSL_set_dtls_fd_connected, closes the old one, and sends
 * the same request again. Output, one fact per line, "KEY k=v ...":
 *   HANDSHAKE suite=NAME
 *   CID enabled=0|1 tx=HEX rx=HEX      (tx: the CID in our records, the server's; rx: ours)
 *   LOCAL n=1|2 port=P
 *   RESPONSE n=1|2 code=C.DD type=T mid=M payload=LEN block2=NUM|none
 *   NORESPONSE n=1|2 error=E            (no answer after a CoAP retransmission: 2 x 2 s;
 *                                        E is -1 for a timeout, else wolfSSL's error)
 *   ERROR what=... code=E
 * Exit status: 0 both responses arrived, 3 the second did not, 1 any other failure.
 */
#include <wolfssl/options.h>
#include <wolfssl/ssl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE 4096
/* How long one CoAP request waits for its answer before it is sent again (once). */
#define ANSWER_WAIT_MS 2000

static void fail(const char *what, int code) {
    printf("ERROR what=%s code=%d\n", what, code);
    fflush(stdout);
    exit(1);
}

static void hex(const unsigned char *b, unsigned int n, char *out) {
    static const char digits[] = "0123456789abcdef";
    unsigned int i;
    for (i = 0; i < n; i++) {
        out[2 * i] = digits[b[i] >> 4];
        out[2 * i + 1] = digits[b[i] & 15];
    }
    out[2 * n] = '\0';
}

/* A UDP socket connected to the server: send/recv go to and come from it only. */
static int connected_socket(const struct sockaddr_in *server) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0)
        fail("socket", errno);
    if (connect(fd, (const struct sockaddr *)server, sizeof(*server)) != 0)
        fail("connect", errno);
    return fd;
}

/* After the handshake the sockets are non-blocking, so an unanswered request ends at our own
 * deadline: a blocking wolfSSL_read would wait forever once the handshake is done. */
static void set_nonblocking(WOLFSSL *ssl, int fd) {
    int flags = fcntl(fd, F_GETFL, 0);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0)
        fail("fcntl", errno);
    wolfSSL_dtls_set_using_nonblock(ssl, 1);
}

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

static int local_port(int fd) {
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    if (getsockname(fd, (struct sockaddr *)&a, &len) != 0)
        fail("getsockname", errno);
    return ntohs(a.sin_port);
}

/* CON GET /.well-known/est/crts with a 2-byte token. Returns its length. */
static int coap_get_crts(unsigned char *out, unsigned short mid, const unsigned char token[2]) {
    static const char *const path[] = {".well-known", "est", "crts"};
    int n = 0, i, prev = 0;
    out[n++] = 0x40 | 2; /* version 1, type CON (0), token length 2 */
    out[n++] = 0x01;     /* GET */
    out[n++] = (unsigned char)(mid >> 8);
    out[n++] = (unsigned char)(mid & 0xff);
    out[n++] = token[0];
    out[n++] = token[1];
    for (i = 0; i < 3; i++) {
        int len = (int)strlen(path[i]);
        int delta = 11 - prev; /* Uri-Path is option 11; every segment is under 13 bytes */
        out[n++] = (unsigned char)((delta << 4) | len);
        memcpy(out + n, path[i], (size_t)len);
        n += len;
        prev = 11;
    }
    return n;
}

struct coap_response {
    int type, code, mid;
    long block2; /* -1: no Block2 option */
    const unsigned char *payload;
    int payload_len;
};

/* An extended option delta or length (RFC 7252 §3.1); -1 when malformed. */
static int option_ext(int nibble, const unsigned char *m, int len, int *at) {
    if (nibble < 13)
        return nibble;
    if (nibble == 13) {
        if (*at + 1 > len)
            return -1;
        return 13 + m[(*at)++];
    }
    if (nibble == 14) {
        int v;
        if (*at + 2 > len)
            return -1;
        v = (m[*at] << 8) | m[*at + 1];
        *at += 2;
        return 269 + v;
    }
    return -1;
}

/* Parses a CoAP message answering `token`; 0 on success. */
static int coap_parse(const unsigned char *m, int len, const unsigned char token[2],
                      struct coap_response *r) {
    int at, option = 0;
    if (len < 4 || (m[0] >> 6) != 1 || (m[0] & 15) != 2)
        return -1;
    if (len < 6 || m[4] != token[0] || m[5] != token[1])
        return -1;
    r->type = (m[0] >> 4) & 3;
    r->code = m[1];
    r->mid = (m[2] << 8) | m[3];
    r->block2 = -1;
    r->payload = NULL;
    r->payload_len = 0;
    at = 6;
    while (at < len) {
        int delta, olen, i;
        if (m[at] == 0xff) {
            at++;
            if (at == len)
                return -1; /* a payload marker needs a payload */
            r->payload = m + at;
            r->payload_len = len - at;
            return 0;
        }
        delta = m[at] >> 4;
        olen = m[at] & 15;
        at++;
        delta = option_ext(delta, m, len, &at);
        olen = option_ext(olen, m, len, &at);
        if (delta < 0 || olen < 0 || at + olen > len)
            return -1;
        option += delta;
        if (option == 23) { /* Block2 */
            r->block2 = 0;
            for (i = 0; i < olen; i++)
                r->block2 = (r->block2 << 8) | m[at + i];
        }
        at += olen;
    }
    return 0;
}

/* Sends request n (retransmitted once if unanswered), prints the response, writes its payload. */
static int exchange(WOLFSSL *ssl, int fd, int n, const char *out_path) {
    unsigned char req[64], buf[BUF_SIZE];
    unsigned char token[2] = {0x77, (unsigned char)n};
    unsigned short mid = (unsigned short)(0x5700 + n);
    int req_len = coap_get_crts(req, mid, token);
    int attempt, err = 0;
    for (attempt = 0; attempt < 2; attempt++) {
        int got;
        long deadline = now_ms() + ANSWER_WAIT_MS;
        if (wolfSSL_write(ssl, req, req_len) != req_len)
            fail("write", wolfSSL_get_error(ssl, 0));
        for (;;) {
            struct coap_response r;
            long left = deadline - now_ms();
            if (wolfSSL_pending(ssl) == 0) {
                struct pollfd p = {fd, POLLIN, 0};
                int ready;
                if (left <= 0) {
                    err = -1; /* no answer in time */
                    break;
                }
                ready = poll(&p, 1, (int)left);
                if (ready < 0 && errno != EINTR)
                    fail("poll", errno);
                if (ready <= 0)
                    continue;
            }
            got = wolfSSL_read(ssl, buf, sizeof(buf));
            if (got <= 0) {
                err = wolfSSL_get_error(ssl, got);
                if (err == WOLFSSL_ERROR_WANT_READ)
                    continue; /* nothing for us in that datagram */
                break;
            }
            if (coap_parse(buf, got, token, &r) != 0)
                continue; /* not our answer */
            if (r.type == 2 && r.code == 0)
                continue; /* an empty ACK: the response comes separately */
            printf("RESPONSE n=%d code=%d.%02d type=%d mid=%d payload=%d block2=", n, r.code >> 5,
                   r.code & 31, r.type, r.mid, r.payload_len);
            if (r.block2 < 0)
                printf("none\n");
            else
                printf("%ld\n", r.block2);
            fflush(stdout);
            if (r.type == 0) {
                /* A separate CON response: acknowledge it. */
                unsigned char ack[4] = {0x60, 0x00, (unsigned char)(r.mid >> 8),
                                        (unsigned char)(r.mid & 0xff)};
                wolfSSL_write(ssl, ack, sizeof(ack));
            }
            {
                FILE *f = fopen(out_path, "wb");
                if (f == NULL)
                    fail("open output", errno);
                if (r.payload_len > 0 &&
                    fwrite(r.payload, 1, (size_t)r.payload_len, f) != (size_t)r.payload_len)
                    fail("write output", errno);
                fclose(f);
            }
            return 0;
        }
    }
    printf("NORESPONSE n=%d error=%d\n", n, err);
    fflush(stdout);
    return -1;
}

int main(int argc, char **argv) {
    struct sockaddr_in server;
    WOLFSSL_CTX *ctx;
    WOLFSSL *ssl;
    int fd1, fd2, ret;
    const char *cid;
    char name[128];

    if (argc != 10) {
        fprintf(stderr,
                "usage: %s HOST PORT CERT_CHAIN KEY CA SUITE CID|off OUT1 OUT2\n", argv[0]);
        return 2;
    }
    cid = argv[7];
    memset(&server, 0, sizeof(server));
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &server.sin_addr) != 1)
        fail("address", 0);

    if (wolfSSL_Init() != WOLFSSL_SUCCESS)
        fail("init", 0);
    ctx = wolfSSL_CTX_new(wolfDTLSv1_2_client_method());
    if (ctx == NULL)
        fail("ctx", 0);
    if ((ret = wolfSSL_CTX_load_verify_locations(ctx, argv[5], NULL)) != WOLFSSL_SUCCESS)
        fail("load CA", ret);
    if ((ret = wolfSSL_CTX_use_certificate_chain_file(ctx, argv[3])) != WOLFSSL_SUCCESS)
        fail("load certificate", ret);
    if ((ret = wolfSSL_CTX_use_PrivateKey_file(ctx, argv[4], WOLFSSL_FILETYPE_PEM)) !=
        WOLFSSL_SUCCESS)
        fail("load key", ret);
    if ((ret = wolfSSL_CTX_set_cipher_list(ctx, argv[6])) != WOLFSSL_SUCCESS)
        fail("cipher list", ret);

    ssl = wolfSSL_new(ctx);
    if (ssl == NULL)
        fail("ssl", 0);
    /* Handshake retransmission from 1 s, giving up after the 4 s timeout. */
    wolfSSL_dtls_set_timeout_init(ssl, 1);
    wolfSSL_dtls_set_timeout_max(ssl, 4);
    if (strcmp(cid, "off") != 0) {
        if ((ret = wolfSSL_dtls_cid_use(ssl)) != WOLFSSL_SUCCESS)
            fail("cid_use", ret);
        if ((ret = wolfSSL_dtls_cid_set(ssl, (unsigned char *)cid, (unsigned int)strlen(cid))) !=
            WOLFSSL_SUCCESS)
            fail("cid_set", ret);
    }
    fd1 = connected_socket(&server);
    if ((ret = wolfSSL_set_dtls_fd_connected(ssl, fd1)) != WOLFSSL_SUCCESS)
        fail("set fd", ret);
    printf("LOCAL n=1 port=%d\n", local_port(fd1));
    if ((ret = wolfSSL_connect(ssl)) != WOLFSSL_SUCCESS) {
        int e = wolfSSL_get_error(ssl, ret);
        printf("ERROR what=handshake code=%d reason=%s\n", e,
               wolfSSL_ERR_error_string((unsigned long)e, name));
        return 1;
    }
    printf("HANDSHAKE suite=%s version=%s\n", wolfSSL_get_cipher_name(ssl),
           wolfSSL_get_version(ssl));
    {
        unsigned char tx[256], rx[256];
        unsigned int tx_len = 0, rx_len = 0;
        char tx_hex[513] = "", rx_hex[513] = "";
        int enabled = 0;
        if (strcmp(cid, "off") != 0) {
            enabled = wolfSSL_dtls_cid_is_enabled(ssl);
            if (enabled) {
                if (wolfSSL_dtls_cid_get_tx_size(ssl, &tx_len) != WOLFSSL_SUCCESS ||
                    tx_len > sizeof(tx) ||
                    (tx_len > 0 &&
                     wolfSSL_dtls_cid_get_tx(ssl, tx, sizeof(tx)) != WOLFSSL_SUCCESS))
                    fail("cid_get_tx", 0);
                if (wolfSSL_dtls_cid_get_rx_size(ssl, &rx_len) != WOLFSSL_SUCCESS ||
                    rx_len > sizeof(rx) ||
                    (rx_len > 0 &&
                     wolfSSL_dtls_cid_get_rx(ssl, rx, sizeof(rx)) != WOLFSSL_SUCCESS))
                    fail("cid_get_rx", 0);
                hex(tx, tx_len, tx_hex);
                hex(rx, rx_len, rx_hex);
            }
        }
        printf("CID enabled=%d tx=%s rx=%s\n", enabled ? 1 : 0, tx_hex, rx_hex);
    }
    fflush(stdout);
    set_nonblocking(ssl, fd1);

    if (exchange(ssl, fd1, 1, argv[8]) != 0)
        return 1;

    /* A new socket, so a new source port; open it before closing the old one so the two differ. */
    fd2 = connected_socket(&server);
    set_nonblocking(ssl, fd2);
    if ((ret = wolfSSL_set_dtls_fd_connected(ssl, fd2)) != WOLFSSL_SUCCESS)
        fail("set new fd", ret);
    close(fd1);
    printf("LOCAL n=2 port=%d\n", local_port(fd2));
    fflush(stdout);
    ret = exchange(ssl, fd2, 2, argv[9]);

    wolfSSL_free(ssl);
    close(fd2);
    wolfSSL_CTX_free(ctx);
    wolfSSL_Cleanup();
    return ret == 0 ? 0 : 3;
}
