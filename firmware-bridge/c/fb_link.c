/* fb_link.c: CRC-16/CCITT-FALSE and COBS for the serial link (frame = 0x00 COBS(packet || crc16 LE) 0x00). */
#include "fb.h"

uint16_t fb_crc16(const uint8_t *b, size_t n) {
    uint16_t crc = 0xffff;
    for (size_t i = 0; i < n; i++) {
        crc ^= (uint16_t)b[i] << 8;
        for (int k = 0; k < 8; k++) crc = (crc & 0x8000) ? (uint16_t)((crc << 1) ^ 0x1021) : (uint16_t)(crc << 1);
    }
    return crc;
}

size_t fb_cobs_encode(const uint8_t *in, size_t n, uint8_t *out, size_t cap) {
    size_t code_at = 0, o = 1;
    uint8_t code = 1;
    if (cap < n + n / 254 + 1) return 0;
    for (size_t i = 0; i < n; i++) {
        if (in[i] == 0) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
        } else {
            out[o++] = in[i];
            if (++code == 0xff) {
                out[code_at] = code;
                code_at = o++;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    return o;
}

size_t fb_cobs_decode(const uint8_t *in, size_t n, uint8_t *out, size_t cap) {
    size_t i = 0, o = 0;
    while (i < n) {
        uint8_t code = in[i++];
        if (code == 0 || i + code - 1 > n) return 0;
        for (uint8_t k = 1; k < code; k++) {
            if (in[i] == 0 || o >= cap) return 0;
            out[o++] = in[i++];
        }
        if (code != 0xff && i < n) {
            if (o >= cap) return 0;
            out[o++] = 0;
        }
    }
    return o;
}

size_t fb_serial_encode(uint8_t *packet, size_t n, uint8_t *out, size_t cap) {
    uint16_t crc = fb_crc16(packet, n);
    size_t m;
    packet[n] = (uint8_t)crc;
    packet[n + 1] = (uint8_t)(crc >> 8);
    if (cap < 2) return 0;
    out[0] = 0;
    m = fb_cobs_encode(packet, n + 2, out + 1, cap - 2);
    if (m == 0) return 0;
    out[m + 1] = 0;
    return m + 2;
}
