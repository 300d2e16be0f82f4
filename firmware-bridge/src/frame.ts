/**
 * Frame protocol v1 (docs/firmware-protocol.md): one packet is
 *
 *   byte 0       version (3 high bits, = 1) and type (5 low bits)
 *   bytes 1-4    device id, u32 little-endian
 *   bytes 5-6    epoch, u16 LE (the device bumps and stores it once per boot)
 *   bytes 7-10   sequence, u32 LE (counts from 1 within an epoch)
 *   bytes 11..   CBOR body encrypted with ChaCha20-Poly1305 (RFC 8439), then the 16-byte tag
 *
 * The 11-byte header is the AEAD's associated data, so a changed header fails the tag. The nonce is
 * `device id (4, LE) ‖ epoch (2, LE) ‖ seq (4, LE) ‖ direction (1) ‖ 0x00`: direction 0 is a device's
 * uplink, 1 is the bridge's reply to that uplink (same device, epoch and seq). A (key, nonce) pair is
 * never used twice as long as the device never reuses an (epoch, seq) for different bytes.
 */
import { createCipheriv, createDecipheriv } from 'node:crypto';
import { MeshError, type MeshErrorCode } from '@edge-mesh/protocol';

export const FRAME_VERSION = 1;
export const HEADER_BYTES = 11;
export const TAG_BYTES = 16;
export const KEY_BYTES = 32;
/** The largest packet the bridge accepts (header + body + tag); a device may announce less in HELLO. */
export const MAX_PACKET_BYTES = 8192;

export const FrameType = {
  HELLO: 1,
  WELCOME: 2,
  INFER_REQ: 3,
  INFER_RESP: 4,
  TELEMETRY: 5,
  DOWNLINK: 6,
  ACK: 7,
  SLEEP: 8,
  POLL: 9,
  ERROR: 31,
} as const;
export type FrameTypeName = keyof typeof FrameType;
export type FrameTypeCode = (typeof FrameType)[FrameTypeName];

export const Direction = { UPLINK: 0, REPLY: 1 } as const;

/** Error codes carried in an ERROR body (key 1). */
export const BridgeErrorCode = {
  BAD_BODY: 1,
  UNKNOWN_MODEL: 2,
  BAD_INPUT: 3,
  TOO_LARGE: 4,
  BUSY: 5,
  DEADLINE: 6,
  NO_AGENT: 7,
  INFERENCE_FAILED: 8,
  INTERNAL: 9,
  UNSUPPORTED_TYPE: 10,
} as const;
export type BridgeErrorName = keyof typeof BridgeErrorCode;

/**
 * The mesh error each wire code stands for, where a device's ERROR frame becomes a JavaScript error (a TypeScript
 * device, a test, a benchmark). The wire codes themselves are protocol bytes (docs/firmware-protocol.md) and stay.
 */
export const WIRE_TO_MESH = {
  [BridgeErrorCode.BAD_BODY]: 'MESH_BAD_REQUEST',
  [BridgeErrorCode.UNKNOWN_MODEL]: 'MESH_UNKNOWN_MODEL',
  [BridgeErrorCode.BAD_INPUT]: 'MESH_BAD_INPUT',
  [BridgeErrorCode.TOO_LARGE]: 'MESH_TOO_LARGE',
  [BridgeErrorCode.BUSY]: 'MESH_BUSY',
  [BridgeErrorCode.DEADLINE]: 'MESH_DEADLINE_EXCEEDED',
  [BridgeErrorCode.NO_AGENT]: 'MESH_NO_AGENT',
  [BridgeErrorCode.INFERENCE_FAILED]: 'MESH_INFERENCE_FAILED',
  [BridgeErrorCode.INTERNAL]: 'MESH_INTERNAL',
  [BridgeErrorCode.UNSUPPORTED_TYPE]: 'MESH_BAD_REQUEST',
} as const satisfies Record<number, MeshErrorCode>;

/**
 * The wire code the bridge answers a device with when a request fails with a mesh error; codes without an entry
 * (an internal failure, an unexpected one) go out as INTERNAL. An unknown model name maps to NO_AGENT: the device's
 * model id was valid, only nobody serves the model now.
 */
export const MESH_TO_WIRE: Partial<Record<MeshErrorCode, number>> = {
  MESH_BAD_INPUT: BridgeErrorCode.BAD_INPUT,
  MESH_BAD_TENSOR: BridgeErrorCode.BAD_INPUT,
  MESH_BAD_REQUEST: BridgeErrorCode.BAD_INPUT,
  MESH_TOO_LARGE: BridgeErrorCode.TOO_LARGE,
  MESH_BUSY: BridgeErrorCode.BUSY,
  MESH_OVERLOADED: BridgeErrorCode.BUSY,
  MESH_DEADLINE_EXCEEDED: BridgeErrorCode.DEADLINE,
  MESH_NO_AGENT: BridgeErrorCode.NO_AGENT,
  MESH_UNKNOWN_MODEL: BridgeErrorCode.NO_AGENT,
  MESH_INFERENCE_FAILED: BridgeErrorCode.INFERENCE_FAILED,
};

/** A wire error code and message (an ERROR frame's body) as a MeshError; details keep the wire code and its name. */
export function meshErrorOfWire(code: number, message: string): MeshError {
  const meshCode: MeshErrorCode = (WIRE_TO_MESH as Record<number, MeshErrorCode>)[code] ?? 'MESH_INTERNAL';
  const name = Object.entries(BridgeErrorCode).find(([, v]) => v === code)?.[0];
  return new MeshError(meshCode, message, { details: { wireCode: code, ...(name ? { wireName: name } : {}) } });
}

export interface FrameHeader {
  type: number;
  deviceId: number;
  epoch: number;
  seq: number;
}

export function writeHeader(h: FrameHeader, out: Buffer = Buffer.allocUnsafe(HEADER_BYTES)): Buffer {
  out[0] = (FRAME_VERSION << 5) | (h.type & 0x1f);
  out.writeUInt32LE(h.deviceId >>> 0, 1);
  out.writeUInt16LE(h.epoch & 0xffff, 5);
  out.writeUInt32LE(h.seq >>> 0, 7);
  return out;
}

/** The header of a packet, or undefined when it is too short to hold header and tag, or of another version. */
export function readHeader(packet: Uint8Array): FrameHeader | undefined {
  if (packet.byteLength < HEADER_BYTES + TAG_BYTES) return undefined;
  const b0 = packet[0]!;
  if (b0 >> 5 !== FRAME_VERSION) return undefined;
  const dv = new DataView(packet.buffer, packet.byteOffset, HEADER_BYTES);
  return { type: b0 & 0x1f, deviceId: dv.getUint32(1, true), epoch: dv.getUint16(5, true), seq: dv.getUint32(7, true) };
}

export function nonceFor(deviceId: number, epoch: number, seq: number, direction: number): Buffer {
  const n = Buffer.alloc(12);
  n.writeUInt32LE(deviceId >>> 0, 0);
  n.writeUInt16LE(epoch & 0xffff, 4);
  n.writeUInt32LE(seq >>> 0, 6);
  n[10] = direction;
  return n;
}

/** Header ‖ ChaCha20-Poly1305(body) ‖ tag. */
export function sealFrame(key: Uint8Array, h: FrameHeader, direction: number, body: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(HEADER_BYTES + body.byteLength + TAG_BYTES);
  writeHeader(h, out);
  const cipher = createCipheriv('chacha20-poly1305', key, nonceFor(h.deviceId, h.epoch, h.seq, direction), { authTagLength: TAG_BYTES });
  cipher.setAAD(out.subarray(0, HEADER_BYTES), { plaintextLength: body.byteLength });
  const a = cipher.update(body);
  const b = cipher.final();
  a.copy(out, HEADER_BYTES);
  b.copy(out, HEADER_BYTES + a.byteLength);
  cipher.getAuthTag().copy(out, HEADER_BYTES + body.byteLength);
  return out;
}

/** The plaintext body, or undefined when the tag does not verify (wrong key, edited header or body). */
export function openFrame(key: Uint8Array, packet: Uint8Array, h: FrameHeader, direction: number): Buffer | undefined {
  const end = packet.byteLength - TAG_BYTES;
  const decipher = createDecipheriv('chacha20-poly1305', key, nonceFor(h.deviceId, h.epoch, h.seq, direction), {
    authTagLength: TAG_BYTES,
  });
  decipher.setAAD(packet.subarray(0, HEADER_BYTES), { plaintextLength: end - HEADER_BYTES });
  decipher.setAuthTag(packet.subarray(end));
  const a = decipher.update(packet.subarray(HEADER_BYTES, end));
  try {
    const b = decipher.final();
    return b.byteLength ? Buffer.concat([a, b]) : a;
  } catch {
    return undefined;
  }
}
