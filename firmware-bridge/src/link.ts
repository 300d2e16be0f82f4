/**
 * The serial link layer: a frame on the wire is `0x00 COBS(packet ‖ CRC-16 LE) 0x00`.
 *
 * - COBS removes every zero byte from the encoded frame, so 0x00 only ever means "frame boundary".
 *   After line noise the receiver drops bytes up to the next 0x00 and is back in step.
 * - CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final xor; "123456789" → 0x29B1)
 *   catches line errors cheaply before any cryptography runs. Authentication is the AEAD tag's job.
 * - A sender may put an extra 0x00 before a frame to flush noise the receiver holds; empty frames are ignored.
 */

const CRC_TABLE = (() => {
  const t = new Uint16Array(256);
  for (let i = 0; i < 256; i++) {
    let crc = i << 8;
    for (let b = 0; b < 8; b++) crc = crc & 0x8000 ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    t[i] = crc;
  }
  return t;
})();

export function crc16(bytes: Uint8Array, start = 0, end = bytes.byteLength): number {
  let crc = 0xffff;
  for (let i = start; i < end; i++) crc = ((crc << 8) & 0xffff) ^ CRC_TABLE[((crc >> 8) ^ bytes[i]!) & 0xff]!;
  return crc;
}

/** COBS-encodes `input` (the result has no zero bytes and is at most n + n/254 + 1 bytes long). */
export function cobsEncode(input: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(input.byteLength + Math.ceil(input.byteLength / 254) + 1);
  let codeAt = 0;
  let o = 1;
  let code = 1;
  for (let i = 0; i < input.byteLength; i++) {
    const byte = input[i]!;
    if (byte === 0) {
      out[codeAt] = code;
      codeAt = o++;
      code = 1;
    } else {
      out[o++] = byte;
      code++;
      if (code === 0xff) {
        out[codeAt] = code;
        codeAt = o++;
        code = 1;
      }
    }
  }
  out[codeAt] = code;
  return out.subarray(0, o);
}

/** Decodes one COBS block (no delimiters); undefined when it is malformed. */
export function cobsDecode(input: Uint8Array): Buffer | undefined {
  const out = Buffer.allocUnsafe(input.byteLength);
  let o = 0;
  let i = 0;
  while (i < input.byteLength) {
    const code = input[i++]!;
    if (code === 0) return undefined;
    const end = i + code - 1;
    if (end > input.byteLength) return undefined;
    while (i < end) {
      const byte = input[i++]!;
      if (byte === 0) return undefined;
      out[o++] = byte;
    }
    if (code !== 0xff && i < input.byteLength) out[o++] = 0;
  }
  return out.subarray(0, o);
}

/** `0x00 COBS(packet ‖ crc16-LE) 0x00`: what goes on the serial line for one packet. */
export function encodeSerialFrame(packet: Uint8Array): Buffer {
  const withCrc = Buffer.allocUnsafe(packet.byteLength + 2);
  withCrc.set(packet, 0);
  withCrc.writeUInt16LE(crc16(packet), packet.byteLength);
  const body = cobsEncode(withCrc);
  const out = Buffer.allocUnsafe(body.byteLength + 2);
  out[0] = 0;
  body.copy(out, 1);
  out[out.byteLength - 1] = 0;
  return out;
}

export interface DeframerCounters {
  frames: number;
  badCobs: number;
  badCrc: number;
  overflow: number;
}

/**
 * Splits a byte stream into packets. `push` never throws: bad COBS, a bad CRC or a frame longer than
 * `maxPacket` is counted and dropped, and the deframer resynchronises at the next 0x00.
 */
export class SerialDeframer {
  readonly counters: DeframerCounters = { frames: 0, badCobs: 0, badCrc: 0, overflow: 0 };
  private readonly buf: Buffer;
  private n = 0;
  private overflowing = false;

  constructor(
    private readonly onPacket: (packet: Buffer) => void,
    private readonly maxPacket: number,
  ) {
    // The encoded frame of a max-size packet plus its CRC.
    this.buf = Buffer.allocUnsafe(maxPacket + 2 + Math.ceil((maxPacket + 2) / 254) + 1);
  }

  push(chunk: Uint8Array): void {
    for (let i = 0; i < chunk.byteLength; i++) {
      const byte = chunk[i]!;
      if (byte !== 0) {
        if (this.overflowing) continue;
        if (this.n === this.buf.length) {
          this.overflowing = true;
          this.counters.overflow++;
          this.n = 0;
          continue;
        }
        this.buf[this.n++] = byte;
        continue;
      }
      if (this.overflowing) {
        this.overflowing = false;
        continue;
      }
      if (this.n === 0) continue;
      const encoded = this.buf.subarray(0, this.n);
      this.n = 0;
      const decoded = cobsDecode(encoded);
      if (!decoded || decoded.byteLength < 3) {
        this.counters.badCobs++;
        continue;
      }
      const end = decoded.byteLength - 2;
      if (crc16(decoded, 0, end) !== decoded.readUInt16LE(end)) {
        this.counters.badCrc++;
        continue;
      }
      if (end > this.maxPacket) {
        this.counters.overflow++;
        continue;
      }
      this.counters.frames++;
      // Copy: the buffer is reused for the next frame.
      this.onPacket(Buffer.from(decoded.subarray(0, end)));
    }
  }
}
