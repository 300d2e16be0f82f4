/**
 * A device written in TypeScript: the same frames the C client sends, for the simulated device of
 * `npm start`, the benchmark and tests. It keeps its epoch and sequence, retransmits the same bytes
 * on a timeout (so the bridge's reply cache answers), and matches replies by (epoch, seq).
 */
import dgram from 'node:dgram';
import { MeshError } from '@edge-mesh/protocol';
import { type CborMap, type CborValue, cborMap, decodeCbor, encodeCbor, type Tagged } from './cbor.ts';
import { FrameType, meshErrorOfWire, openFrame, readHeader, sealFrame } from './frame.ts';
import { inferRequestBody, K } from './messages.ts';

export interface DeviceReply {
  type: number;
  body: CborValue;
  packet: Buffer;
}

/** The MeshError an ERROR reply stands for (its wire code mapped by WIRE_TO_MESH), or undefined for any other reply. */
export function replyError(reply: DeviceReply): MeshError | undefined {
  if (reply.type !== FrameType.ERROR) return undefined;
  const body = reply.body instanceof Map ? reply.body : new Map();
  const code = body.get(K.error.code);
  const message = body.get(K.error.message);
  return meshErrorOfWire(typeof code === 'number' ? code : -1, typeof message === 'string' ? message : 'error frame');
}

export interface SimDeviceOptions {
  deviceId: number;
  key: Uint8Array;
  /** The epoch of this boot (a real device bumps and stores it before its first frame). */
  epoch: number;
  send: (packet: Buffer) => void;
}

export class SimDevice {
  seq = 0;
  readonly deviceId: number;
  epoch: number;
  private readonly key: Buffer;
  private readonly waiting = new Map<number, (reply: DeviceReply) => void>();
  models = new Map<string, number>();

  constructor(private readonly options: SimDeviceOptions) {
    this.deviceId = options.deviceId;
    this.epoch = options.epoch;
    this.key = Buffer.from(options.key);
  }

  /** Seals one uplink frame with the next sequence number. */
  frame(type: number, body: CborMap): Buffer {
    this.seq++;
    return sealFrame(this.key, { type, deviceId: this.deviceId, epoch: this.epoch, seq: this.seq }, 0, encodeCbor(body));
  }

  /** Feeds a packet from the bridge; replies that do not verify are ignored. */
  receive(packet: Buffer): void {
    const h = readHeader(packet);
    if (!h || h.deviceId !== this.deviceId || h.epoch !== this.epoch) return;
    const waiter = this.waiting.get(h.seq);
    if (!waiter) return;
    const plain = openFrame(this.key, packet, h, 1);
    if (!plain) return;
    this.waiting.delete(h.seq);
    waiter({ type: h.type, body: plain.byteLength ? decodeCbor(plain) : new Map(), packet });
  }

  /** Sends `packet` (an already sealed frame) and waits for its reply, resending the same bytes on timeout. */
  exchange(packet: Buffer, { timeoutMs = 2_000, tries = 3 } = {}): Promise<DeviceReply> {
    const h = readHeader(packet)!;
    return new Promise((resolve, reject) => {
      let left = tries;
      let timer: NodeJS.Timeout;
      const attempt = () => {
        if (left-- === 0) {
          this.waiting.delete(h.seq);
          return reject(
            new MeshError('MESH_TIMEOUT', `no reply to frame ${h.epoch}:${h.seq} after ${tries} tries`, {
              details: { epoch: h.epoch, seq: h.seq, tries },
            }),
          );
        }
        this.options.send(packet);
        timer = setTimeout(attempt, timeoutMs);
      };
      this.waiting.set(h.seq, (reply) => {
        clearTimeout(timer);
        resolve(reply);
      });
      attempt();
    });
  }

  request(type: number, body: CborMap, options?: { timeoutMs?: number; tries?: number }): Promise<DeviceReply> {
    return this.exchange(this.frame(type, body), options);
  }

  async hello(options: { sleepPeriodS?: number; keepaliveS?: number; fw?: string } = {}): Promise<DeviceReply> {
    const reply = await this.request(
      FrameType.HELLO,
      cborMap([
        [K.hello.fw, options.fw ?? 'sim-device 1.0'],
        [K.hello.sleepPeriodS, options.sleepPeriodS],
        [K.hello.keepaliveS, options.keepaliveS],
      ]),
    );
    if (reply.type === FrameType.WELCOME && reply.body instanceof Map) {
      const table = reply.body.get(K.welcome.models);
      if (Array.isArray(table)) for (const entry of table) if (Array.isArray(entry)) this.models.set(String(entry[1]), Number(entry[0]));
    }
    return reply;
  }

  infer(
    modelId: number,
    tensor: Tagged,
    options: { scale?: number; shape?: number[]; deadlineMs?: number; want?: number; timeoutMs?: number; tries?: number } = {},
  ): Promise<DeviceReply> {
    return this.request(FrameType.INFER_REQ, inferRequestBody({ modelId, tensor, ...options }), options);
  }
}

/** int16 samples as an RFC 8746 tag-77 typed array (little-endian). */
export function int16Tensor(samples: Int16Array): Tagged {
  const bytes = Buffer.allocUnsafe(samples.length * 2);
  for (let i = 0; i < samples.length; i++) bytes.writeInt16LE(samples[i]!, i * 2);
  return { tag: 77, bytes };
}

/** A SimDevice on a UDP socket of its own, talking to a bridge at host:port. */
export async function udpDevice(
  options: Omit<SimDeviceOptions, 'send'> & { host: string; port: number },
): Promise<{ device: SimDevice; close: () => Promise<void> }> {
  const socket = dgram.createSocket('udp4');
  const device = new SimDevice({ ...options, send: (packet) => socket.send(packet, options.port, options.host) });
  socket.on('message', (msg) => device.receive(msg));
  await new Promise<void>((resolve) => socket.bind(0, '127.0.0.1', () => resolve()));
  return { device, close: () => new Promise<void>((resolve) => socket.close(() => resolve())) };
}
