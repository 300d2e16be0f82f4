/**
 * The bridge core: takes packets from any transport, authenticates them, serves them and hands back
 * the reply packet. It is a mesh client on its devices' behalf through an injected `BridgeMesh` (the
 * CLI passes the SDK's `connect()` result), so this part depends on nothing but `protocol/`.
 *
 * For every packet, in this order (cheap checks first, nothing decoded before the tag verifies):
 *   1. size and header version; 2. device known and not revoked; 3. replay window: stale epoch and
 *   too-old sequence numbers are dropped; 4. ChaCha20-Poly1305 with the header as AAD;
 *   5. a sequence number already seen gets its cached reply again (never served twice);
 *   6. the body is decoded (bounded CBOR) and served.
 * Frames that fail 1-5 are dropped silently and counted in `stats.dropped`: answering them would
 * tell an attacker which check failed, and a reply can only be sealed under a fresh (epoch, seq).
 */
import { EventEmitter } from 'node:events';
import { encodeCbor as encodeMeshCbor, MeshError, type MeshErrorCode, type ModelInfo, type Tensor, topics } from '@edge-mesh/protocol';
import type { Logger } from 'pino';
import { type CborMap, type CborValue, cborMap, decodeCbor, encodeCbor, isCborError, type Tagged, TYPED_ARRAY_TAGS } from './cbor.ts';
import {
  BridgeErrorCode,
  type FrameHeader,
  FrameType,
  HEADER_BYTES,
  MAX_PACKET_BYTES,
  MESH_TO_WIRE,
  openFrame,
  readHeader,
  sealFrame,
  TAG_BYTES,
} from './frame.ts';
import { K, readHello, readInferRequest, Want } from './messages.ts';
import { type DeviceRegistry, longIdOf } from './registry.ts';
import { ReplayWindow, SEQ_PERSIST_STEP } from './replay.ts';

/** What the bridge needs from a mesh client; the SDK's `Mesh` fits it. */
export interface BridgeMesh {
  readonly clientId: string;
  infer(
    model: string,
    inputs: Record<string, Tensor>,
    options: { deadlineMs: number },
  ): Promise<{ requestId: string; agentId: string; outputs: Record<string, Tensor>; timings: { totalMs: number } }>;
  models(): ModelInfo[];
  publish?(topic: string, payload: Uint8Array, options: { retain?: boolean; qos?: 0 | 1 }): Promise<void>;
}

/**
 * What the bridge would keep as a receipt for one device request. Signed usage receipts are built
 * in another issue; until then `onReceipt` is the hook where the bridge hands each one over.
 */
export interface DeviceReceipt {
  bridgeId: string;
  device: string;
  deviceId: number;
  epoch: number;
  seq: number;
  model: string;
  requestId: string | undefined;
  agentId: string | undefined;
  ok: boolean;
  code: string | undefined;
  latencyMs: number;
}

export type Availability = 'online' | 'asleep' | 'offline';

export interface BridgeOptions {
  mesh: BridgeMesh;
  registry: DeviceRegistry;
  /** Model names in wire order: a device's model id N is `models[N - 1]` (sent in WELCOME). */
  models: string[];
  logger?: Logger;
  /** Deadline when a request carries none (ms). */
  defaultDeadlineMs?: number;
  /** Requests one device may have in flight. */
  maxInFlightPerDevice?: number;
  /** How often availability is re-evaluated (ms). */
  availabilityTickMs?: number;
  /** An always-on device is offline after keepalive × 2.5 of silence (default keepalive 30 s). */
  defaultKeepaliveS?: number;
  /** A sleepy device counts as awake this long after its last frame (ms). */
  awakeWindowMs?: number;
  /** Grace added to a sleepy device's period before it counts as offline (ms). */
  sleepGraceMs?: number;
  /** Downlinks kept per device, and how long each waits for a poll (ms). */
  maxDownlinks?: number;
  downlinkTtlMs?: number;
  onReceipt?: (receipt: DeviceReceipt) => void;
  now?: () => number;
}

export type DropReason =
  | 'size'
  | 'header'
  | 'unknown-device'
  | 'revoked'
  | 'stale-epoch'
  | 'too-old'
  | 'bad-seq'
  | 'auth'
  | 'replayed'
  | 'in-progress'
  | 'other-source'
  | 'resend-limit'
  | 'store';

export interface BridgeStats {
  packets: number;
  served: number;
  retransmits: number;
  requests: number;
  ok: number;
  errors: number;
  dropped: Record<DropReason, number>;
}

interface Downlink {
  id: number;
  payload: Uint8Array;
  expires: number;
}

interface DeviceState {
  replay: ReplayWindow;
  /** The replay mark on disk: after a crash, nothing of an older epoch, nor at or below `floor` in `epoch`, is served. */
  durable: { epoch: number; floor: number };
  /** The write of the device's mark under way, if any (one at a time: frames arriving meanwhile share the next). */
  marking: Promise<void> | undefined;
  lastSeen: number;
  sleepPeriodS: number;
  keepaliveS: number;
  /** Set by a SLEEP frame: asleep from now until then. */
  sleepingUntil: number | undefined;
  availability: Availability | undefined;
  inFlight: number;
  /** The largest packet the device takes (its HELLO's key 2; the protocol's largest until it says). */
  maxFrame: number;
  downlinks: Downlink[];
  nextDownlinkId: number;
}

export type SendReply = (packet: Buffer) => void;

/** The store refused a replay mark: the frame it was for is not served (MeshError `details.reason`). */
const MARK_NOT_SAVED = 'replay-mark-not-saved';

/** The least a device may say it takes (HELLO key 2): room for an error reply. */
export const MIN_DEVICE_FRAME = 128;
/** Header, tag and the DOWNLINK body's CBOR around its payload (id, pending count), with room to spare. */
const DOWNLINK_OVERHEAD = 64;

/** A cached reply is sent again at most this many times (a device tries three times; the rest is someone replaying). */
export const MAX_RESENDS = 4;

/**
 * A request the bridge itself refuses before or after the mesh ran it: a MeshError whose message is meant for the
 * device and goes out in the ERROR frame as is (a mesh error from the SDK goes out as its code only).
 */
function deviceRefusal(code: MeshErrorCode, message: string): MeshError {
  return new MeshError(code, message, { details: { forDevice: true } });
}

/** A device tensor (typed integer or float array times scale) as float32, element by element. */
export function tensorToFloat32(t: Tagged, scale: number): Float32Array {
  const dv = new DataView(t.bytes.buffer, t.bytes.byteOffset, t.bytes.byteLength);
  const size = TYPED_ARRAY_TAGS[t.tag as keyof typeof TYPED_ARRAY_TAGS].size;
  const n = t.bytes.byteLength / size;
  const out = new Float32Array(n);
  const s = Math.fround(scale);
  switch (t.tag) {
    case 64:
      for (let i = 0; i < n; i++) out[i] = dv.getUint8(i) * s;
      break;
    case 72:
      for (let i = 0; i < n; i++) out[i] = dv.getInt8(i) * s;
      break;
    case 69:
      for (let i = 0; i < n; i++) out[i] = dv.getUint16(i * 2, true) * s;
      break;
    case 77:
      for (let i = 0; i < n; i++) out[i] = dv.getInt16(i * 2, true) * s;
      break;
    case 78:
      for (let i = 0; i < n; i++) out[i] = dv.getInt32(i * 4, true) * s;
      break;
    default:
      for (let i = 0; i < n; i++) out[i] = dv.getFloat32(i * 4, true) * s;
  }
  return out;
}

/** The shape to run: the device's, or the model's with one free dimension filled from the element count. */
function resolveShape(modelShape: (number | string)[], deviceShape: number[] | undefined, count: number): number[] {
  const shape =
    deviceShape ??
    (() => {
      const free = modelShape.filter((d) => typeof d !== 'number' || d < 0).length;
      const known = modelShape.reduce<number>((a, d) => (typeof d === 'number' && d >= 0 ? a * d : a), 1);
      if (free === 0) return modelShape as number[];
      if (free === 1 && known > 0 && count % known === 0)
        return modelShape.map((d) => (typeof d === 'number' && d >= 0 ? d : count / known));
      throw deviceRefusal('MESH_BAD_INPUT', 'the model has free dimensions: send a shape (key 5)');
    })();
  if (shape.reduce((a, d) => a * d, 1) !== count)
    throw deviceRefusal('MESH_BAD_INPUT', `shape [${shape.join(',')}] does not hold ${count} elements`);
  return shape;
}

function argmax(data: ArrayLike<number>): [number, number] {
  let best = 0;
  for (let i = 1; i < data.length; i++) if (data[i]! > data[best]!) best = i;
  return [best, data.length ? data[best]! : 0];
}

export class Bridge extends EventEmitter {
  readonly stats: BridgeStats = {
    packets: 0,
    served: 0,
    retransmits: 0,
    requests: 0,
    ok: 0,
    errors: 0,
    dropped: {
      size: 0,
      header: 0,
      'unknown-device': 0,
      revoked: 0,
      'stale-epoch': 0,
      'too-old': 0,
      'bad-seq': 0,
      auth: 0,
      replayed: 0,
      'in-progress': 0,
      'other-source': 0,
      'resend-limit': 0,
      store: 0,
    },
  };
  readonly id: string;
  private readonly states = new Map<number, DeviceState>();
  private readonly keys = new Map<number, Buffer>();
  private readonly timer: NodeJS.Timeout;
  private readonly now: () => number;
  private readonly inflight = new Set<Promise<unknown>>();
  private closed = false;

  constructor(private readonly options: BridgeOptions) {
    super();
    this.id = options.mesh.clientId;
    this.now = options.now ?? Date.now;
    this.timer = setInterval(() => this.tick(), options.availabilityTickMs ?? 1000);
    this.timer.unref();
  }

  /** Per-device state: replay window from the persisted high-water mark, availability, downlinks. */
  private state(deviceId: number): DeviceState {
    let s = this.states.get(deviceId);
    if (!s) {
      const record = this.options.registry.get(deviceId)!;
      s = {
        replay: record.epoch > 0 || record.seqFloor > 0 ? new ReplayWindow(record.epoch, record.seqFloor) : new ReplayWindow(),
        durable: { epoch: record.epoch, floor: record.seqFloor },
        marking: undefined,
        lastSeen: 0,
        sleepPeriodS: 0,
        keepaliveS: this.options.defaultKeepaliveS ?? 30,
        sleepingUntil: undefined,
        availability: undefined,
        inFlight: 0,
        maxFrame: MAX_PACKET_BYTES,
        downlinks: [],
        nextDownlinkId: 1,
      };
      this.states.set(deviceId, s);
    }
    return s;
  }

  private keyOf(deviceId: number, hex: string): Buffer {
    let key = this.keys.get(deviceId);
    if (!key) {
      key = Buffer.from(hex, 'hex');
      this.keys.set(deviceId, key);
    }
    return key;
  }

  private drop(reason: DropReason, h?: FrameHeader): void {
    this.stats.dropped[reason]++;
    this.emit('drop', reason, h);
  }

  /**
   * Handles one packet from a transport. `send` gets the reply packet, if any; `from` names where the packet
   * came from (a UDP address and port) on transports that have addresses. Never throws; the returned promise
   * settles when the packet has been fully served (tests and benchmarks await it).
   */
  handlePacket(packet: Uint8Array, send: SendReply, from?: string): Promise<void> {
    this.stats.packets++;
    if (this.closed) return Promise.resolve();
    if (packet.byteLength < HEADER_BYTES + TAG_BYTES || packet.byteLength > MAX_PACKET_BYTES) {
      this.drop('size');
      return Promise.resolve();
    }
    const h = readHeader(packet);
    if (!h) {
      this.drop('header');
      return Promise.resolve();
    }
    const record = this.options.registry.get(h.deviceId);
    if (!record) {
      this.drop('unknown-device', h);
      return Promise.resolve();
    }
    if (record.revokedAt !== undefined) {
      this.drop('revoked', h);
      return Promise.resolve();
    }
    const s = this.state(h.deviceId);
    const verdict = s.replay.check(h.epoch, h.seq);
    if (verdict === 'stale-epoch' || verdict === 'too-old' || verdict === 'bad-seq') {
      this.drop(verdict, h);
      return Promise.resolve();
    }
    const key = this.keyOf(h.deviceId, record.key);
    const plain = openFrame(key, packet, h, 0);
    if (!plain) {
      this.drop('auth', h);
      return Promise.resolve();
    }
    const digest = Buffer.from(packet.subarray(packet.byteLength - TAG_BYTES)).toString('base64');
    if (verdict === 'seen') {
      const cached = s.replay.cached(h.epoch, h.seq);
      if (!cached || cached.digest !== digest) {
        this.drop('replayed', h);
      } else if (cached.reply === undefined) {
        this.drop('in-progress', h);
      } else if (cached.from !== from) {
        // The device's own retransmits come from where its first copy came from; a copy from elsewhere is a
        // captured frame replayed from a forged source, and the cached reply (up to a full packet for a
        // 28-byte POLL) would go to whoever that source names.
        this.drop('other-source', h);
      } else if (cached.resends >= MAX_RESENDS) {
        this.drop('resend-limit', h);
      } else {
        cached.resends++;
        this.stats.retransmits++;
        send(cached.reply);
      }
      return Promise.resolve();
    }
    // Fresh and authentic: record it before serving, so a copy arriving meanwhile is recognised.
    s.replay.accept(h.epoch, h.seq);
    s.replay.pending(h.epoch, h.seq, digest, from);
    this.seen(h.deviceId, s);
    // Served only once the mark on disk covers the frame: a reply that left before a crash, for a frame the
    // restarted bridge would take as new, would let a replay run it again and seal a second, different reply
    // under the same nonce. serve() answers every failure it knows with an ERROR frame; anything else is
    // logged, never thrown.
    const covering = this.markCovering(h.deviceId, s, h.epoch, h.seq);
    const serve = () => this.serve(h, s, key, plain, digest, send);
    const work = (covering ? covering.then(serve) : serve()).catch((err: Error) => {
      if (err instanceof MeshError && err.details?.reason === MARK_NOT_SAVED) {
        this.drop('store', h);
        this.options.logger?.error({ err: err.message, device: longIdOf(h.deviceId) }, 'replay mark not saved: frame not served');
      } else this.options.logger?.error({ err: err.message, device: longIdOf(h.deviceId) }, 'bridge could not serve a frame');
    });
    this.inflight.add(work);
    void work.finally(() => this.inflight.delete(work));
    return work;
  }

  /**
   * Undefined when the device's mark on disk already covers (epoch, seq); else a promise that settles once a
   * write that covers it is done (rejecting with a MeshError, `details.reason` MARK_NOT_SAVED, when the store refuses). One write per device at a
   * time, of the window's latest mark: a device sending faster than the disk syncs shares writes, so no device
   * can queue more than one synced write at a time in front of the others'. Within an epoch the floor is moved
   * on ahead of use (half a step before it is reached), so a steady device seldom waits.
   */
  private markCovering(deviceId: number, s: DeviceState, epoch: number, seq: number): Promise<void> | undefined {
    const covers = () => s.durable.epoch > epoch || (s.durable.epoch === epoch && seq <= s.durable.floor);
    if (covers()) {
      if (s.durable.epoch === epoch && seq > s.durable.floor - SEQ_PERSIST_STEP / 2 && !s.marking)
        void this.writeMark(deviceId, s).catch((err: Error) =>
          this.options.logger?.error({ err: err.message, device: longIdOf(deviceId) }, 'cannot persist a replay mark'),
        );
      return undefined;
    }
    const wait = async (): Promise<void> => {
      while (!covers()) await (s.marking ?? this.writeMark(deviceId, s));
    };
    return wait();
  }

  /** Writes the window's current mark (its epoch, its highest seq + SEQ_PERSIST_STEP). */
  private writeMark(deviceId: number, s: DeviceState): Promise<void> {
    const mark = { epoch: s.replay.epoch, floor: s.replay.seqMax + SEQ_PERSIST_STEP };
    const run = this.options.registry.saveMark(deviceId, mark.epoch, mark.floor).then(
      () => {
        if (mark.epoch > s.durable.epoch || (mark.epoch === s.durable.epoch && mark.floor > s.durable.floor)) s.durable = mark;
      },
      (err: Error) => {
        throw new MeshError('MESH_INTERNAL', `replay mark not saved: ${err.message}`, { details: { reason: MARK_NOT_SAVED } });
      },
    );
    s.marking = run;
    const clear = () => {
      if (s.marking === run) s.marking = undefined;
    };
    run.then(clear, clear);
    return run;
  }

  private reply(h: FrameHeader, s: DeviceState, key: Buffer, asked: number, body: CborMap, digest: string, send: SendReply): void {
    if (s.downlinks.length) body.set(K.pending, s.downlinks.length);
    let type = asked;
    let plain = encodeCbor(body);
    if (HEADER_BYTES + plain.byteLength + TAG_BYTES > s.maxFrame) {
      // The device said it takes no more: a bigger reply would be lost on it, and its retransmits would get the
      // same one from the cache. It gets a small error instead, sealed under the nonce the big one would have used.
      type = FrameType.ERROR;
      plain = encodeCbor(
        cborMap([
          [K.error.code, BridgeErrorCode.TOO_LARGE],
          [K.error.message, `reply of ${HEADER_BYTES + plain.byteLength + TAG_BYTES} B > max frame ${s.maxFrame}`],
        ]),
      );
    }
    const packet = sealFrame(key, { type, deviceId: h.deviceId, epoch: h.epoch, seq: h.seq }, 1, plain);
    s.replay.remember(h.epoch, h.seq, digest, packet);
    this.stats.served++;
    if (!this.closed) send(packet);
  }

  private async serve(h: FrameHeader, s: DeviceState, key: Buffer, plain: Buffer, digest: string, send: SendReply): Promise<void> {
    const answer = (type: number, body: CborMap) => this.reply(h, s, key, type, body, digest, send);
    const fail = (code: number, message: string) =>
      answer(
        FrameType.ERROR,
        cborMap([
          [K.error.code, code],
          [K.error.message, message.slice(0, 96)],
        ]),
      );
    let body: CborValue;
    try {
      body = plain.byteLength === 0 ? new Map() : decodeCbor(plain);
    } catch (err) {
      return fail(BridgeErrorCode.BAD_BODY, isCborError(err) ? err.message : 'bad body');
    }
    switch (h.type) {
      case FrameType.HELLO: {
        const hello = readHello(body);
        if (typeof hello === 'string') return fail(BridgeErrorCode.BAD_BODY, hello);
        if (hello.maxFrame !== undefined && hello.maxFrame < MIN_DEVICE_FRAME)
          return fail(BridgeErrorCode.BAD_BODY, `key 2 (max frame) must be at least ${MIN_DEVICE_FRAME}`);
        s.maxFrame = Math.min(hello.maxFrame ?? MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        s.sleepPeriodS = hello.sleepPeriodS;
        if (hello.keepaliveS) s.keepaliveS = hello.keepaliveS;
        s.sleepingUntil = undefined;
        this.emit('hello', longIdOf(h.deviceId), hello);
        return answer(
          FrameType.WELCOME,
          cborMap([
            [K.welcome.models, this.options.models.map((name, i) => [i + 1, name])],
            [K.welcome.timeMs, this.now()],
            [K.welcome.maxFrame, MAX_PACKET_BYTES],
            [K.welcome.keepaliveS, s.keepaliveS],
          ]),
        );
      }
      case FrameType.INFER_REQ:
        return this.infer(h, s, body, answer, fail);
      case FrameType.TELEMETRY: {
        const readings = body instanceof Map ? body.get(K.telemetry.readings) : undefined;
        if (!Array.isArray(readings)) return fail(BridgeErrorCode.BAD_BODY, 'key 1 (readings) must be an array');
        this.emit('telemetry', longIdOf(h.deviceId), readings);
        void this.options.mesh
          .publish?.(
            topics.deviceTelemetry(this.id, longIdOf(h.deviceId)),
            encodeMeshCbor({ v: 1, kind: 'telemetry', device: longIdOf(h.deviceId), seq: h.seq, readings }),
            { qos: 0 },
          )
          .catch(() => {});
        return answer(FrameType.ACK, new Map());
      }
      case FrameType.SLEEP: {
        const duration = body instanceof Map ? body.get(K.sleep.durationS) : undefined;
        if (typeof duration !== 'number' || !Number.isInteger(duration) || duration < 0 || duration > 7 * 86_400) {
          return fail(BridgeErrorCode.BAD_BODY, 'key 1 (duration) must be 0 to 604800 s');
        }
        s.sleepingUntil = this.now() + duration * 1000;
        answer(FrameType.ACK, new Map());
        this.updateAvailability(h.deviceId, s);
        return;
      }
      case FrameType.POLL: {
        const t = this.now();
        s.downlinks = s.downlinks.filter((d) => d.expires > t);
        // The first that fits the device's frames; one that does not stays queued (until it expires, or the device
        // says in a HELLO that it takes bigger frames): taken off the queue, it would be lost.
        const at = s.downlinks.findIndex((d) => d.payload.byteLength + DOWNLINK_OVERHEAD <= s.maxFrame);
        const next = at >= 0 ? s.downlinks.splice(at, 1)[0] : undefined;
        if (!next) return answer(FrameType.ACK, new Map());
        return answer(
          FrameType.DOWNLINK,
          cborMap([
            [K.downlink.id, next.id],
            [K.downlink.payload, next.payload],
          ]),
        );
      }
      default:
        return fail(BridgeErrorCode.UNSUPPORTED_TYPE, `frame type ${h.type} is not served`);
    }
  }

  private async infer(
    h: FrameHeader,
    s: DeviceState,
    body: CborValue,
    answer: (type: number, body: CborMap) => void,
    fail: (code: number, message: string) => void,
  ): Promise<void> {
    const started = performance.now();
    const req = readInferRequest(body);
    if (typeof req === 'string') return fail(BridgeErrorCode.BAD_BODY, req);
    const model = this.options.models[req.modelId - 1];
    if (!model) return fail(BridgeErrorCode.UNKNOWN_MODEL, `no model has id ${req.modelId}`);
    this.stats.requests++;
    const receipt: DeviceReceipt = {
      bridgeId: this.id,
      device: longIdOf(h.deviceId),
      deviceId: h.deviceId,
      epoch: h.epoch,
      seq: h.seq,
      model,
      requestId: undefined,
      agentId: undefined,
      ok: false,
      code: undefined,
      latencyMs: 0,
    };
    const finish = (code: number | undefined, message: string) => {
      receipt.latencyMs = performance.now() - started;
      if (code === undefined) this.stats.ok++;
      else {
        this.stats.errors++;
        receipt.code = Object.entries(BridgeErrorCode).find(([, v]) => v === code)?.[0];
        fail(code, message);
      }
      // Receipts hook: once signed usage receipts exist, the bridge signs one here as itself, naming
      // the device (receipt.device) and embedding the agent's receipt for receipt.requestId.
      this.options.onReceipt?.(receipt);
      this.emit('request', receipt);
    };
    if (s.inFlight >= (this.options.maxInFlightPerDevice ?? 4))
      return finish(BridgeErrorCode.BUSY, 'too many requests in flight for this device');
    s.inFlight++;
    let out: CborMap;
    try {
      const info = this.options.mesh.models().find((m) => m.name === model);
      if (!info) throw deviceRefusal('MESH_NO_AGENT', `no live agent serves ${model}`);
      const input = info.inputs[0];
      if (info.inputs.length !== 1 || !input || input.dtype !== 'float32') {
        throw deviceRefusal('MESH_BAD_INPUT', `${model} needs inputs a device frame cannot carry (one float32 input)`);
      }
      const data = tensorToFloat32(req.tensor, req.scale);
      const shape = resolveShape(input.shape, req.shape, data.length);
      const deadlineMs = Math.max(1, req.deadlineMs ?? this.options.defaultDeadlineMs ?? 1000);
      const result = await this.options.mesh.infer(model, { [input.name]: { dtype: 'float32', shape, data } }, { deadlineMs });
      receipt.requestId = result.requestId;
      receipt.agentId = result.agentId;
      const first = Object.values(result.outputs)[0];
      const values =
        first && (first.dtype === 'float32' || first.dtype === 'float64')
          ? (first.data as Float32Array | Float64Array)
          : new Float32Array(0);
      const [label, score] = argmax(values);
      out = cborMap([
        [K.inferResp.label, label],
        [K.inferResp.score, Math.fround(score)],
        [K.inferResp.latencyMs, Math.round(performance.now() - started)],
        [K.inferResp.agent, result.agentId.slice(0, 14)],
        // The first 8 bytes of the mesh request id: what the device quotes to find the receipt.
        [K.inferResp.receiptRef, Buffer.from(result.requestId, 'hex').subarray(0, 8)],
      ]);
      if (req.want === Want.RAW && first) {
        const f32 = first.data instanceof Float32Array ? first.data : Float32Array.from(values);
        const bytes = Buffer.from(f32.buffer, f32.byteOffset, f32.byteLength);
        if (bytes.byteLength + 256 > s.maxFrame) throw deviceRefusal('MESH_TOO_LARGE', 'the output does not fit in a frame');
        out.set(K.inferResp.output, { tag: 85, bytes });
        out.set(K.inferResp.outputShape, first.shape);
      }
    } catch (err) {
      if (err instanceof MeshError) {
        finish(MESH_TO_WIRE[err.code] ?? BridgeErrorCode.INTERNAL, err.details?.forDevice === true ? err.message : err.code);
      } else {
        this.options.logger?.error({ err: (err as Error).message }, 'bridge request failed');
        finish(BridgeErrorCode.INTERNAL, 'internal error');
      }
      return;
    } finally {
      s.inFlight--;
    }
    // Outside the try: a request is finished once, ok or not; a reply the transport fails to send is the
    // transport's to count, not a second outcome of the request.
    receipt.ok = true;
    finish(undefined, '');
    answer(FrameType.INFER_RESP, out);
  }

  // ------------------------------------------------------------ availability and downlinks

  private seen(deviceId: number, s: DeviceState): void {
    s.lastSeen = this.now();
    s.sleepingUntil = undefined;
    this.updateAvailability(deviceId, s);
  }

  private availabilityOf(s: DeviceState, t: number): Availability {
    if (s.sleepingUntil !== undefined) {
      return t <= s.sleepingUntil + (this.options.sleepGraceMs ?? 10_000) ? 'asleep' : 'offline';
    }
    const silent = t - s.lastSeen;
    if (s.sleepPeriodS > 0) {
      if (silent <= (this.options.awakeWindowMs ?? 5_000)) return 'online';
      return silent <= s.sleepPeriodS * 1500 + (this.options.sleepGraceMs ?? 10_000) ? 'asleep' : 'offline';
    }
    return silent <= s.keepaliveS * 2500 ? 'online' : 'offline';
  }

  private updateAvailability(deviceId: number, s: DeviceState): void {
    const t = this.now();
    const next = this.availabilityOf(s, t);
    if (next === s.availability) return;
    s.availability = next;
    const device = longIdOf(deviceId);
    const nextWake = s.sleepingUntil ?? (s.sleepPeriodS > 0 ? s.lastSeen + s.sleepPeriodS * 1000 : undefined);
    this.emit('availability', device, next);
    const payload = encodeMeshCbor({
      v: 1,
      kind: 'availability',
      device,
      state: next,
      last_seen: s.lastSeen,
      ...(nextWake ? { next_wake: nextWake } : {}),
      via: this.id,
    });
    void this.options.mesh.publish?.(topics.deviceAvailability(this.id, device), payload, { retain: true, qos: 1 }).catch(() => {});
  }

  private tick(): void {
    for (const [deviceId, s] of this.states) if (s.lastSeen) this.updateAvailability(deviceId, s);
  }

  availability(deviceId: number): Availability | undefined {
    return this.states.get(deviceId)?.availability;
  }

  /** Queues a downlink for a device; it is delivered as the reply to the device's next POLL. */
  queueDownlink(deviceId: number, payload: Uint8Array, ttlMs = this.options.downlinkTtlMs ?? 3_600_000): number {
    const device = longIdOf(deviceId);
    if (!this.options.registry.get(deviceId)) throw new MeshError('MESH_NOT_FOUND', `no device ${device}`, { details: { device } });
    const s = this.state(deviceId);
    if (payload.byteLength + DOWNLINK_OVERHEAD > s.maxFrame) {
      throw new MeshError('MESH_TOO_LARGE', `downlink payload too large for ${device}'s frames (at most ${s.maxFrame} bytes)`, {
        details: { device, bytes: payload.byteLength, maxBytes: s.maxFrame - DOWNLINK_OVERHEAD },
      });
    }
    const max = this.options.maxDownlinks ?? 16;
    if (s.downlinks.length >= max) {
      throw new MeshError('MESH_BUSY', `device ${device} already has ${max} downlinks waiting`, { details: { device, waiting: max } });
    }
    const id = s.nextDownlinkId++;
    s.downlinks.push({ id, payload, expires: this.now() + ttlMs });
    return id;
  }

  /**
   * Stops serving: waits for requests in flight, then marks every device it announced as offline
   * (retained), since nobody serves them through this bridge any more. A crashed bridge leaves
   * their last state in place (no per-device will exists in MQTT 3.1.1).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    clearInterval(this.timer);
    await Promise.allSettled([...this.inflight]);
    this.closed = true;
    const publishes: Promise<void>[] = [];
    for (const [deviceId, s] of this.states) {
      if (s.availability === undefined || s.availability === 'offline') continue;
      s.availability = 'offline';
      const device = longIdOf(deviceId);
      const payload = encodeMeshCbor({ v: 1, kind: 'availability', device, state: 'offline', last_seen: s.lastSeen, via: this.id });
      const p = this.options.mesh.publish?.(topics.deviceAvailability(this.id, device), payload, { retain: true, qos: 1 });
      if (p) publishes.push(p.catch(() => {}));
    }
    await Promise.race([Promise.all(publishes), new Promise((r) => setTimeout(r, 1_000).unref())]);
  }
}
