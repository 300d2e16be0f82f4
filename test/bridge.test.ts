/**
 * The firmware bridge's codecs and its handling of hostile input, against a fake mesh that counts
 * what it is asked to run (the real mesh is in bridge-e2e.test.ts). Every bad-input case is its own
 * test; the fuzz runs push 100,000+ random and mutated frames through each parser.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import dgram from 'node:dgram';
import { once } from 'node:events';
import { stat } from 'node:fs/promises';
import path from 'node:path';
import { describe, type TestContext, test } from 'node:test';
import { mulberry32 } from '@edge-mesh/client';
import {
  Bridge,
  BridgeErrorCode,
  type BridgeMesh,
  type CborValue,
  cborMap,
  cobsDecode,
  cobsEncode,
  crc16,
  type DeviceRecord,
  DeviceRegistry,
  decodeCbor,
  encodeCbor,
  encodeSerialFrame,
  FrameType,
  HEADER_BYTES,
  int16Tensor,
  isCborError,
  K,
  listenUdp,
  MAX_PACKET_BYTES,
  MAX_RESENDS,
  MESH_TO_WIRE,
  meshErrorOfWire,
  openFrame,
  readHeader,
  readInferRequest,
  replyError,
  SerialDeframer,
  SimDevice,
  sealFrame,
  WIRE_TO_MESH,
} from '@edge-mesh/firmware-bridge';
import { MeshError, type ModelInfo, type Tensor, topics } from '@edge-mesh/protocol';
import golden from '../firmware-bridge/vectors/golden.json' with { type: 'json' };
import { ROOT, tempDir, waitFor } from './helpers.ts';

/** A mesh that sums its input: deterministic, instant, and it counts the calls. */
function fakeMesh(): BridgeMesh & { calls: number; delayMs: number; published: { topic: string; retain: boolean }[] } {
  const model = (name: string, shape: (number | string)[]): ModelInfo =>
    ({
      name,
      version: '1',
      sha256: '0'.repeat(64),
      priceMicros: 1,
      latencyMs: 0.1,
      inputs: [{ name: 'x', dtype: 'float32', shape }],
      outputs: [],
    }) as ModelInfo;
  const fake = {
    clientId: 'bridge-aaaaaaaaaaaaaaaaaaaaaaaaaa',
    calls: 0,
    delayMs: 0,
    published: [] as { topic: string; retain: boolean }[],
    models: () => [model('sum', [1, 8]), model('free', [1, 'n'])],
    async infer(_model: string, inputs: Record<string, Tensor>, options: { deadlineMs: number }) {
      fake.calls++;
      if (fake.delayMs) await new Promise((r) => setTimeout(r, fake.delayMs));
      if (options.deadlineMs === 1) throw new MeshError('MESH_DEADLINE_EXCEEDED', 'too late');
      const x = inputs.x!.data as Float32Array;
      const out = new Float32Array([x.reduce((a, b) => a + b, 0), -1]);
      return {
        requestId: '00112233445566778899aabbccddeeff',
        agentId: 'agent-fake',
        outputs: { y: { dtype: 'float32', shape: [1, 2], data: out } as Tensor },
        timings: { totalMs: 0 },
      };
    },
    async publish(topic: string, _payload: Uint8Array, options: { retain?: boolean }) {
      fake.published.push({ topic, retain: options.retain ?? false });
    },
  };
  return fake;
}

interface Rig {
  bridge: Bridge;
  mesh: ReturnType<typeof fakeMesh>;
  registry: DeviceRegistry;
  record: DeviceRecord;
  device: SimDevice;
  /** Replies the bridge sent, in order. */
  sent: Buffer[];
  /** Hands a packet to the bridge as a transport would, and waits until it is served. */
  feed: (packet: Uint8Array) => Promise<void>;
}

async function rig(t: TestContext, options: { registry?: DeviceRegistry; now?: () => number } = {}): Promise<Rig> {
  const registry = options.registry ?? DeviceRegistry.inMemory();
  const record = await registry.provision({ name: 'unit' });
  const mesh = fakeMesh();
  const bridge = new Bridge({
    mesh,
    registry,
    models: ['sum', 'free'],
    availabilityTickMs: 20,
    ...(options.now ? { now: options.now } : {}),
  });
  t.after(() => bridge.close());
  const sent: Buffer[] = [];
  let device: SimDevice | undefined;
  const feed = (packet: Uint8Array) =>
    bridge.handlePacket(packet, (reply) => {
      sent.push(reply);
      device?.receive(reply);
    });
  device = new SimDevice({ deviceId: record.deviceId, key: Buffer.from(record.key, 'hex'), epoch: 1, send: (p) => void feed(p) });
  return { bridge, mesh, registry, record, device, sent, feed };
}

const samples = Int16Array.from([1, 2, 3, 4, 5, 6, 7, 8]);
const inferBody = (extra: [number, CborValue][] = []) =>
  cborMap([[K.inferReq.model, 1], [K.inferReq.tensor, int16Tensor(samples)], [K.inferReq.scale, 0.5], ...extra]);

/** Sends `packet`, which the bridge must drop for `reason` without replying or running anything. */
async function assertDropped(r: Rig, packet: Uint8Array, reason: keyof Bridge['stats']['dropped']) {
  const before = r.bridge.stats.dropped[reason];
  const sent = r.sent.length;
  const calls = r.mesh.calls;
  await r.feed(packet);
  assert.equal(r.bridge.stats.dropped[reason], before + 1, `dropped as ${reason}`);
  assert.equal(r.sent.length, sent, 'no reply');
  assert.equal(r.mesh.calls, calls, 'nothing ran');
}

/** The bridge still serves a good request afterwards. */
async function assertStillServes(r: Rig) {
  const reply = await r.device.request(FrameType.INFER_REQ, inferBody());
  assert.equal(reply.type, FrameType.INFER_RESP);
  assert.equal((reply.body as Map<number, unknown>).get(K.inferResp.score), 18);
}

describe('link layer and codecs', () => {
  test('CRC-16/CCITT-FALSE check value and COBS round trips, including 254-byte runs', () => {
    assert.equal(crc16(Buffer.from('123456789')), 0x29b1);
    const rng = mulberry32(1);
    for (let n = 0; n < 800; n += 13) {
      const data = Buffer.from(Array.from({ length: n }, () => (rng() < 0.2 ? 0 : Math.floor(rng() * 256))));
      const enc = cobsEncode(data);
      assert.ok(!enc.includes(0));
      assert.deepEqual(cobsDecode(enc), data);
    }
    const ones = Buffer.alloc(600, 1);
    assert.deepEqual(cobsDecode(cobsEncode(ones)), ones);
  });

  test('golden vectors: the TypeScript side seals, frames and opens byte for byte', () => {
    for (const v of golden.vectors) {
      const key = Buffer.from(v.key, 'hex');
      const body = Buffer.from(v.body, 'hex');
      const packet = sealFrame(key, v, v.direction, body);
      assert.equal(packet.toString('hex'), v.packet, v.name);
      assert.equal(encodeSerialFrame(packet).toString('hex'), v.serialFrame, v.name);
      assert.deepEqual(openFrame(key, packet, readHeader(packet)!, v.direction), body);
      assert.equal(encodeCbor(decodeCbor(body)).toString('hex'), v.body, `${v.name}: CBOR round trip`);
    }
  });

  test('CBOR bombs are refused before anything is allocated for them', () => {
    const bombs: [string, Buffer][] = [
      ['array declaring 2^32-1 items', Buffer.from('9affffffff', 'hex')],
      ['map declaring 2^64-1 pairs', Buffer.from('bbffffffffffffffff', 'hex')],
      ['byte string declaring 4 GiB', Buffer.from('5affffffff00', 'hex')],
      ['indefinite-length array', Buffer.from('9f01ff', 'hex')],
      ['indefinite-length byte string', Buffer.from('5f4101ff', 'hex')],
      ['nesting 1,000 deep', Buffer.alloc(1000, 0x81)],
      ['100,000 tiny items', Buffer.concat([Buffer.from('9a000186a0', 'hex'), Buffer.alloc(100_000, 0)])],
      ['unknown tag', Buffer.from('d9d9f700', 'hex')],
      ['tag 77 on a non-string', Buffer.from('d84d01', 'hex')],
      ['int16 array of odd length', Buffer.from('d84d43010203', 'hex')],
      ['integer above 2^53', Buffer.from('1bffffffffffffffff', 'hex')],
      ['text key', Buffer.from('a1616101', 'hex')],
      ['duplicate key', Buffer.from('a201010102', 'hex')],
      ['invalid UTF-8', Buffer.from('62c328', 'hex')],
      ['trailing bytes', Buffer.from('0101', 'hex')],
      ['truncated', Buffer.from('1a0001', 'hex')],
    ];
    for (const [what, bytes] of bombs) {
      assert.throws(
        () => decodeCbor(bytes),
        (err: unknown) => isCborError(err) && err.code === 'MESH_BAD_REQUEST',
        what,
      );
    }
  });

  test('deframer: random bytes never throw and it resyncs at the next 0x00', () => {
    const got: Buffer[] = [];
    const deframer = new SerialDeframer((p) => got.push(p), 256);
    const rng = mulberry32(3);
    const good = encodeSerialFrame(Buffer.from('a valid packet'));
    for (let i = 0; i < 2000; i++) {
      deframer.push(Buffer.from(Array.from({ length: Math.floor(rng() * 64) }, () => Math.floor(rng() * 256))));
      deframer.push(good);
    }
    assert.equal(got.filter((p) => p.toString() === 'a valid packet').length, 2000, 'every good frame after noise came through');
    // An oversized frame is dropped and the next one is read.
    deframer.push(Buffer.concat([Buffer.alloc(2000, 7), good]));
    assert.equal(got.at(-1)!.toString(), 'a valid packet');
    assert.ok(deframer.counters.overflow >= 1);
  });
});

describe('bridge: requests', () => {
  test('hello gets the model table; a request is served with the scaled samples; raw outputs on request', async (t) => {
    const r = await rig(t);
    const welcome = await r.device.hello();
    assert.equal(welcome.type, FrameType.WELCOME);
    assert.deepEqual((welcome.body as Map<number, unknown>).get(K.welcome.models), [
      [1, 'sum'],
      [2, 'free'],
    ]);
    const reply = await r.device.request(FrameType.INFER_REQ, inferBody([[K.inferReq.want, 1]]));
    const body = reply.body as Map<number, unknown>;
    assert.equal(body.get(K.inferResp.label), 0);
    assert.equal(body.get(K.inferResp.score), 18);
    assert.deepEqual(Buffer.from(body.get(K.inferResp.receiptRef) as Uint8Array).toString('hex'), '0011223344556677');
    assert.deepEqual((body.get(K.inferResp.output) as { tag: number }).tag, 85);
    // A free dimension is filled from the element count.
    r.device.seq; // same device, next sequence number
    const free = await r.device.request(
      FrameType.INFER_REQ,
      cborMap([
        [K.inferReq.model, 2],
        [K.inferReq.tensor, int16Tensor(samples)],
      ]),
    );
    assert.equal((free.body as Map<number, unknown>).get(K.inferResp.score), 36);
  });

  test('coded errors: unknown model, bad shape, bad body, deadline, unknown frame type; the bridge keeps serving', async (t) => {
    const r = await rig(t);
    const meshCodes: string[] = [];
    const code = async (type: number, body: Map<number, CborValue>) => {
      const packet = r.device.frame(type, body);
      const reply = await r.device.exchange(packet);
      assert.equal(reply.type, FrameType.ERROR);
      // Where the ERROR frame becomes a JavaScript error it is a MeshError that keeps the wire code.
      const err = replyError(reply);
      assert.ok(err instanceof MeshError);
      assert.equal(err.details?.wireCode, (reply.body as Map<number, unknown>).get(K.error.code));
      meshCodes.push(err.code);
      return (reply.body as Map<number, unknown>).get(K.error.code);
    };
    assert.equal(
      await code(
        FrameType.INFER_REQ,
        cborMap([
          [K.inferReq.model, 9],
          [K.inferReq.tensor, int16Tensor(samples)],
        ]),
      ),
      BridgeErrorCode.UNKNOWN_MODEL,
    );
    assert.equal(await code(FrameType.INFER_REQ, inferBody([[K.inferReq.shape, [3, 3]]])), BridgeErrorCode.BAD_INPUT);
    assert.equal(await code(FrameType.INFER_REQ, cborMap([[K.inferReq.model, 1]])), BridgeErrorCode.BAD_BODY);
    assert.equal(await code(FrameType.INFER_REQ, inferBody([[K.inferReq.deadlineMs, 1]])), BridgeErrorCode.DEADLINE);
    assert.equal(await code(17, new Map()), BridgeErrorCode.UNSUPPORTED_TYPE);
    assert.deepEqual(meshCodes, ['MESH_UNKNOWN_MODEL', 'MESH_BAD_INPUT', 'MESH_BAD_REQUEST', 'MESH_DEADLINE_EXCEEDED', 'MESH_BAD_REQUEST']);
    assert.equal(replyError(await r.device.request(FrameType.INFER_REQ, inferBody())), undefined, 'a result is no error');
    await assertStillServes(r);
  });

  test('wire codes and mesh codes map both ways; every wire code has a mesh code', () => {
    for (const [name, wire] of Object.entries(BridgeErrorCode)) {
      const err = meshErrorOfWire(wire, 'from the device');
      assert.equal(err.code, WIRE_TO_MESH[wire], name);
      assert.deepEqual(err.details, { wireCode: wire, wireName: name });
    }
    // The mesh errors a request can end in go out as a wire code; read back on the device side they name the same kind.
    const roundTrip = Object.fromEntries(Object.entries(MESH_TO_WIRE).map(([mesh, wire]) => [mesh, meshErrorOfWire(wire!, '').code]));
    assert.deepEqual(roundTrip, {
      MESH_BAD_INPUT: 'MESH_BAD_INPUT',
      MESH_BAD_TENSOR: 'MESH_BAD_INPUT',
      MESH_BAD_REQUEST: 'MESH_BAD_INPUT',
      MESH_TOO_LARGE: 'MESH_TOO_LARGE',
      MESH_BUSY: 'MESH_BUSY',
      MESH_OVERLOADED: 'MESH_BUSY',
      MESH_DEADLINE_EXCEEDED: 'MESH_DEADLINE_EXCEEDED',
      MESH_NO_AGENT: 'MESH_NO_AGENT',
      MESH_UNKNOWN_MODEL: 'MESH_NO_AGENT',
      MESH_INFERENCE_FAILED: 'MESH_INFERENCE_FAILED',
    });
    assert.equal(meshErrorOfWire(200, 'unknown').code, 'MESH_INTERNAL');
  });

  test('registry and device errors are coded MeshErrors', async () => {
    const coded = (code: string) => (err: unknown) => err instanceof MeshError && err.code === code;
    const registry = DeviceRegistry.inMemory();
    const record = await registry.provision({ name: 'one' });
    await assert.rejects(registry.provision({ deviceId: record.deviceId }), coded('MESH_BAD_REQUEST'));
    await assert.rejects(registry.provision({ key: new Uint8Array(16) }), coded('MESH_BAD_REQUEST'));
    await assert.rejects(registry.revoke(0x0badf00d), coded('MESH_NOT_FOUND'));
    // A device whose frames reach no bridge gives up with MESH_TIMEOUT after its tries.
    const lonely = new SimDevice({ deviceId: record.deviceId, key: Buffer.from(record.key, 'hex'), epoch: 1, send: () => {} });
    await assert.rejects(
      lonely.request(FrameType.POLL, new Map(), { timeoutMs: 20, tries: 2 }),
      (err: unknown) => coded('MESH_TIMEOUT')(err) && (err as MeshError).details?.tries === 2,
    );
  });

  test('CBOR bombs inside an authenticated body get BAD_BODY and run nothing', async (t) => {
    const r = await rig(t);
    const calls = r.mesh.calls;
    for (const bomb of ['9affffffff', '5affffffff', '9f01ff', '81'.repeat(200), 'd9d9f700', 'a1616101']) {
      const reply = await r.device.exchange(
        sealFrame(
          Buffer.from(r.record.key, 'hex'),
          { type: FrameType.INFER_REQ, deviceId: r.record.deviceId, epoch: 1, seq: ++r.device.seq },
          0,
          Buffer.from(bomb, 'hex'),
        ),
      );
      assert.equal(reply.type, FrameType.ERROR, bomb);
      assert.equal((reply.body as Map<number, unknown>).get(K.error.code), BridgeErrorCode.BAD_BODY);
    }
    assert.equal(r.mesh.calls, calls);
    await assertStillServes(r);
  });

  test('a retransmit gets the cached reply byte for byte and is never run twice', async (t) => {
    const r = await rig(t);
    const packet = r.device.frame(FrameType.INFER_REQ, inferBody());
    const first = await r.device.exchange(packet);
    const second = await r.device.exchange(packet);
    assert.deepEqual(second.packet, first.packet);
    assert.equal(r.mesh.calls, 1);
    assert.equal(r.bridge.stats.retransmits, 1);
  });

  test('a cached reply goes only to the address its request came from, and at most MAX_RESENDS times', async (t) => {
    const r = await rig(t);
    // A POLL is 28 bytes; its reply can carry a full packet of downlink: sent to any source that replays the
    // captured frame, it would make the bridge a reflector, hundreds of times bigger than what it is sent.
    r.bridge.queueDownlink(r.record.deviceId, Buffer.alloc(4_000, 7));
    const poll = r.device.frame(FrameType.POLL, new Map());
    const to = { device: [] as Buffer[], victim: [] as Buffer[] };
    await r.bridge.handlePacket(poll, (p) => to.device.push(p), '10.0.0.5:5683');
    assert.equal(to.device.length, 1);
    assert.ok(to.device[0]!.byteLength > 4_000);
    for (let i = 0; i < 50; i++) await r.bridge.handlePacket(poll, (p) => to.victim.push(p), '192.0.2.9:53');
    assert.equal(to.victim.length, 0, 'nothing to the forged source');
    assert.equal(r.bridge.stats.dropped['other-source'], 50);
    for (let i = 0; i < MAX_RESENDS + 3; i++) await r.bridge.handlePacket(poll, (p) => to.device.push(p), '10.0.0.5:5683');
    assert.equal(to.device.length, 1 + MAX_RESENDS, 'the device own retransmits are answered, up to the limit');
    assert.ok(to.device.every((p) => p.equals(to.device[0]!)));
    assert.equal(r.bridge.stats.dropped['resend-limit'], 3);
    assert.equal(r.bridge.stats.retransmits, MAX_RESENDS);
    await assertStillServes(r);
  });

  test('a device that moves its mark on every frame shares synced writes: one at a time, not one per frame', async (t) => {
    const r = await rig(t);
    const saveMark = r.registry.saveMark.bind(r.registry);
    let writes = 0;
    let writing = 0;
    let mostAtOnce = 0;
    r.registry.saveMark = async (...args) => {
      writes++;
      mostAtOnce = Math.max(mostAtOnce, ++writing);
      // A synced write to a Pi's SD card.
      await new Promise((resolve) => setTimeout(resolve, 20));
      await saveMark(...args);
      writing--;
    };
    // Each frame 65 past the last: past the floor written ahead of it, so none is covered by the mark on disk.
    const frames = Array.from({ length: 200 }, () => {
      r.device.seq += 64;
      return r.device.frame(FrameType.POLL, new Map());
    });
    await Promise.all(frames.map((f) => r.feed(f)));
    assert.equal(r.sent.length, 200, 'every frame served');
    assert.equal(mostAtOnce, 1);
    assert.ok(writes <= 3, `${writes} writes for 200 frames`);
    const record = r.registry.get(r.record.deviceId)!;
    assert.ok(record.seqFloor >= r.device.seq, `floor ${record.seqFloor} covers seq ${r.device.seq}`);
  });

  test('a reply the transport cannot send leaves the request counted once, as ok', async (t) => {
    const r = await rig(t);
    const outcomes: boolean[] = [];
    r.bridge.on('request', (receipt: { ok: boolean }) => outcomes.push(receipt.ok));
    // As a UDP socket closed under a request in flight throws on send.
    await r.bridge.handlePacket(r.device.frame(FrameType.INFER_REQ, inferBody()), () => {
      throw new Error('Not running');
    });
    assert.deepEqual(outcomes, [true]);
    assert.deepEqual([r.bridge.stats.requests, r.bridge.stats.ok, r.bridge.stats.errors], [1, 1, 0]);
    await assertStillServes(r);
  });

  test('a frame is not served when its replay mark cannot be saved', async (t) => {
    const r = await rig(t);
    r.registry.saveMark = async () => {
      throw new Error('disk full');
    };
    await assertDropped(r, r.device.frame(FrameType.INFER_REQ, inferBody()), 'store');
  });

  test('a retransmit while the first copy is being served is dropped; the one reply answers both', async (t) => {
    const r = await rig(t);
    r.mesh.delayMs = 50;
    const packet = r.device.frame(FrameType.INFER_REQ, inferBody());
    const a = r.feed(packet);
    await assertDropped(r, packet, 'in-progress');
    await a;
    assert.equal(r.sent.length, 1);
    assert.equal(r.mesh.calls, 1);
  });
});

describe('bridge: hostile frames, each dropped without a reply', () => {
  test('line noise on the serial link', async (t) => {
    const r = await rig(t);
    const deframer = new SerialDeframer((p) => void r.feed(p), MAX_PACKET_BYTES);
    deframer.push(randomBytes(4096));
    deframer.push(Buffer.from([0]));
    const flipped = encodeSerialFrame(r.device.frame(FrameType.INFER_REQ, inferBody()));
    flipped[20]! ^= 0x10;
    deframer.push(flipped);
    assert.equal(r.mesh.calls, 0);
    assert.ok(deframer.counters.badCrc + deframer.counters.badCobs >= 1);
    await assertStillServes(r);
  });

  test('truncated frames', async (t) => {
    const r = await rig(t);
    const packet = r.device.frame(FrameType.INFER_REQ, inferBody());
    await assertDropped(r, packet.subarray(0, HEADER_BYTES + 15), 'size');
    await assertDropped(r, packet.subarray(0, packet.length - 1), 'auth');
    await assertStillServes(r);
  });

  test('oversized frames', async (t) => {
    const r = await rig(t);
    await assertDropped(r, Buffer.concat([r.device.frame(FrameType.INFER_REQ, inferBody()), Buffer.alloc(MAX_PACKET_BYTES)]), 'size');
    await assertStillServes(r);
  });

  test('a frame sealed with the wrong key', async (t) => {
    const r = await rig(t);
    const packet = sealFrame(
      randomBytes(32),
      { type: FrameType.INFER_REQ, deviceId: r.record.deviceId, epoch: 1, seq: 1 },
      0,
      encodeCbor(inferBody()),
    );
    await assertDropped(r, packet, 'auth');
    await assertStillServes(r);
  });

  test('a tampered header: every header byte changed in turn', async (t) => {
    const r = await rig(t);
    const packet = r.device.frame(FrameType.INFER_REQ, inferBody());
    for (let i = 0; i < HEADER_BYTES; i++) {
      const bad = Buffer.from(packet);
      bad[i]! ^= 0x01;
      // Byte 7 is the low byte of seq 1: flipped it is seq 0, which is never valid.
      const reason = i === 0 ? 'auth' : i <= 4 ? 'unknown-device' : i === 7 ? 'bad-seq' : 'auth';
      await assertDropped(r, bad, reason);
    }
    // The untouched frame is still good (the tampered copies did not burn its sequence number).
    await r.device.exchange(packet);
    assert.equal(r.mesh.calls, 1);
  });

  test('a replayed sequence number: new bytes under a used (epoch, seq), and an old one past the reply cache', async (t) => {
    const r = await rig(t);
    await assertStillServes(r);
    const seq = r.device.seq;
    // Same (epoch, seq), different body: a nonce reuse or a forgery; never served.
    const again = sealFrame(
      Buffer.from(r.record.key, 'hex'),
      { type: FrameType.INFER_REQ, deviceId: r.record.deviceId, epoch: 1, seq },
      0,
      encodeCbor(inferBody([[K.inferReq.scale, 2]])),
    );
    await assertDropped(r, again, 'replayed');
    // Push the first request out of the 16-reply cache; replaying it is then refused.
    const first = sealFrame(
      Buffer.from(r.record.key, 'hex'),
      { type: FrameType.TELEMETRY, deviceId: r.record.deviceId, epoch: 1, seq: ++r.device.seq },
      0,
      encodeCbor(cborMap([[1, []]])),
    );
    await r.device.exchange(first);
    for (let i = 0; i < 20; i++) await r.device.request(FrameType.POLL, new Map());
    await assertDropped(r, first, 'replayed');
    for (let i = 0; i < 70; i++) await r.device.request(FrameType.POLL, new Map());
    await assertDropped(r, first, 'too-old');
  });

  test('a stale epoch after the device moved on', async (t) => {
    const r = await rig(t);
    const old = r.device.frame(FrameType.INFER_REQ, inferBody());
    r.device.epoch = 2;
    r.device.seq = 0;
    await assertStillServes(r);
    await assertDropped(r, old, 'stale-epoch');
  });

  test('an unknown device', async (t) => {
    const r = await rig(t);
    const packet = sealFrame(
      Buffer.from(r.record.key, 'hex'),
      { type: FrameType.INFER_REQ, deviceId: (r.record.deviceId ^ 0x5a5a) >>> 0 || 1, epoch: 1, seq: 1 },
      0,
      encodeCbor(inferBody()),
    );
    await assertDropped(r, packet, 'unknown-device');
  });

  test('a revoked device', async (t) => {
    const r = await rig(t);
    await assertStillServes(r);
    await r.registry.revoke(r.record.deviceId);
    await assertDropped(r, r.device.frame(FrameType.INFER_REQ, inferBody()), 'revoked');
  });

  test('sequence number 0 and a frame of another version', async (t) => {
    const r = await rig(t);
    const zero = sealFrame(
      Buffer.from(r.record.key, 'hex'),
      { type: FrameType.POLL, deviceId: r.record.deviceId, epoch: 1, seq: 0 },
      0,
      encodeCbor(new Map()),
    );
    await assertDropped(r, zero, 'bad-seq');
    const v2 = r.device.frame(FrameType.POLL, new Map());
    v2[0] = (2 << 5) | FrameType.POLL;
    await assertDropped(r, v2, 'header');
  });
});

describe('bridge: restarts, sleepy devices, downlinks', () => {
  test('after a restart the persisted high-water mark refuses old frames; the next epoch is served', async (t) => {
    const dir = await tempDir(t, 'edge-mesh-reg-');
    const registry = await DeviceRegistry.open(dir);
    const r = await rig(t, { registry });
    const captured = r.device.frame(FrameType.INFER_REQ, inferBody());
    await r.device.exchange(captured);
    await r.bridge.close();
    await registry.close();
    const reopened = await DeviceRegistry.open(dir);
    t.after(() => reopened.close());
    const record = reopened.get(r.record.deviceId)!;
    assert.equal(record.epoch, 1);
    const mesh = fakeMesh();
    const bridge = new Bridge({ mesh, registry: reopened, models: ['sum'] });
    t.after(() => bridge.close());
    const sent: Buffer[] = [];
    await bridge.handlePacket(captured, (p) => sent.push(p));
    assert.equal(sent.length, 0);
    assert.equal(mesh.calls, 0);
    assert.equal(bridge.stats.dropped.replayed + bridge.stats.dropped['too-old'], 1);
    const rebooted = new SimDevice({
      deviceId: record.deviceId,
      key: Buffer.from(record.key, 'hex'),
      epoch: 2,
      send: (p) => void bridge.handlePacket(p, (reply) => rebooted.receive(reply)),
    });
    const reply = await rebooted.request(FrameType.INFER_REQ, inferBody());
    assert.equal(reply.type, FrameType.INFER_RESP);
  });

  test('the registry folder is made readable by its owner only (it holds the device keys)', async (t) => {
    const dir = path.join(await tempDir(t, 'edge-mesh-reg-'), 'devices');
    const registry = await DeviceRegistry.open(dir);
    await registry.close();
    assert.equal((await stat(dir)).mode & 0o777, 0o700);
  });

  test('kill -9 right after a reply: the restarted bridge has the mark and refuses the captured frame', async (t) => {
    // Otherwise a replay after the crash runs the request again and seals a second, different reply under the
    // nonce of the first (ChaCha20-Poly1305 with a reused nonce leaks both plaintexts' XOR).
    const dir = await tempDir(t, 'edge-mesh-reg-');
    const registry = await DeviceRegistry.open(dir);
    const record = await registry.provision({ name: 'unit' });
    await registry.close();
    const device = new SimDevice({ deviceId: record.deviceId, key: Buffer.from(record.key, 'hex'), epoch: 1, send: () => {} });
    for (const [type, body] of [
      [FrameType.HELLO, cborMap([[1, 'sim']])],
      [FrameType.INFER_REQ, inferBody()],
    ] as const) {
      // Each in an epoch of its own: the floor written ahead for the first covers the next few seqs.
      device.epoch++;
      device.seq = 0;
      const captured = device.frame(type, body);
      const child = spawn(
        process.execPath,
        [
          '--conditions=@edge-mesh/source',
          '--import',
          'tsx',
          '--input-type=module',
          '--eval',
          `
import { Bridge, DeviceRegistry } from '@edge-mesh/firmware-bridge';
const [dir, hex] = process.argv.slice(-2);
const registry = await DeviceRegistry.open(dir);
const model = { name: 'sum', version: '1', sha256: '0'.repeat(64), priceMicros: 1, latencyMs: 0.1, inputs: [{ name: 'x', dtype: 'float32', shape: [1, 8] }], outputs: [] };
const mesh = {
  clientId: 'bridge-aaaaaaaaaaaaaaaaaaaaaaaaaa',
  models: () => [model],
  infer: async () => ({ requestId: '00'.repeat(16), agentId: 'agent-fake', outputs: { y: { dtype: 'float32', shape: [1, 1], data: new Float32Array([1]) } }, timings: { totalMs: 0 } }),
  publish: async () => {},
};
const bridge = new Bridge({ mesh, registry, models: ['sum'] });
void bridge.handlePacket(Buffer.from(hex, 'hex'), () => {
  process.stdout.write('replied\\n');
  process.kill(process.pid, 'SIGKILL');
});
`,
          dir,
          captured.toString('hex'),
        ],
        { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let out = '';
      let err = '';
      child.stdout.on('data', (d) => (out += d));
      child.stderr.on('data', (d) => (err += d));
      const [, signal] = (await once(child, 'exit')) as [number | null, string | null];
      assert.equal(signal, 'SIGKILL', `the child was killed after replying (its stderr: ${err})`);
      assert.equal(out, 'replied\n', `the bridge answered the ${type === FrameType.HELLO ? 'HELLO' : 'INFER_REQ'} before it was killed`);
      const reopened = await DeviceRegistry.open(dir);
      const mark = reopened.get(record.deviceId)!;
      assert.equal(mark.epoch, device.epoch);
      assert.ok(mark.seqFloor >= device.seq, `floor ${mark.seqFloor} covers seq ${device.seq}`);
      const mesh = fakeMesh();
      const bridge = new Bridge({ mesh, registry: reopened, models: ['sum'] });
      const sent: Buffer[] = [];
      await bridge.handlePacket(captured, (p) => sent.push(p));
      assert.equal(sent.length, 0, 'no second reply under the same nonce');
      assert.equal(mesh.calls, 0);
      await bridge.close();
      await reopened.close();
    }
  });

  test("a device's max frame (HELLO key 2) bounds what it is sent: downlinks that do not fit stay queued, big replies become TOO_LARGE", async (t) => {
    const r = await rig(t);
    r.bridge.queueDownlink(r.record.deviceId, Buffer.alloc(1_000, 1));
    r.bridge.queueDownlink(r.record.deviceId, Buffer.from('small'));
    const welcome = await r.device.request(FrameType.HELLO, cborMap([[K.hello.maxFrame, 256]]));
    assert.equal(welcome.type, FrameType.WELCOME);
    assert.throws(
      () => r.bridge.queueDownlink(r.record.deviceId, Buffer.alloc(1_000, 2)),
      (e: MeshError) => e.code === 'MESH_TOO_LARGE',
    );
    const first = await r.device.request(FrameType.POLL, new Map());
    assert.equal(first.type, FrameType.DOWNLINK);
    assert.equal(Buffer.from((first.body as Map<number, unknown>).get(K.downlink.payload) as Uint8Array).toString(), 'small');
    assert.equal((first.body as Map<number, unknown>).get(K.pending), 1, 'the big one is still queued');
    assert.ok(r.sent.every((p) => p.byteLength <= 256));
    // Told it takes bigger frames, the device gets the one that waited.
    await r.device.request(FrameType.HELLO, cborMap([[K.hello.maxFrame, 2_048]]));
    const second = await r.device.request(FrameType.POLL, new Map());
    assert.equal(((second.body as Map<number, unknown>).get(K.downlink.payload) as Uint8Array).byteLength, 1_000);
    // A raw output over the frame: a coded TOO_LARGE, not a reply the device cannot take.
    await r.device.request(FrameType.HELLO, cborMap([[K.hello.maxFrame, 128]]));
    const raw = await r.device.request(FrameType.INFER_REQ, inferBody([[K.inferReq.want, 1]]));
    assert.equal(raw.type, FrameType.ERROR);
    assert.equal((raw.body as Map<number, unknown>).get(K.error.code), BridgeErrorCode.TOO_LARGE);
    const tooSmall = await r.device.request(FrameType.HELLO, cborMap([[K.hello.maxFrame, 20]]));
    assert.equal((tooSmall.body as Map<number, unknown>).get(K.error.code), BridgeErrorCode.BAD_BODY);
  });

  test('a downlink past its time to live is not delivered', async (t) => {
    let now = 1_000_000;
    const r = await rig(t, { now: () => now });
    r.bridge.queueDownlink(r.record.deviceId, Buffer.from('stale'), 60_000);
    r.bridge.queueDownlink(r.record.deviceId, Buffer.from('fresh'));
    now += 61_000;
    const a = await r.device.request(FrameType.POLL, new Map());
    assert.equal(Buffer.from((a.body as Map<number, unknown>).get(K.downlink.payload) as Uint8Array).toString(), 'fresh');
    const b = await r.device.request(FrameType.POLL, new Map());
    assert.equal(b.type, FrameType.ACK);
    // The default time to live is an hour.
    r.bridge.queueDownlink(r.record.deviceId, Buffer.from('hour'));
    now += 3_600_001;
    assert.equal((await r.device.request(FrameType.POLL, new Map())).type, FrameType.ACK);
  });

  test('telemetry is published at the device telemetry topic, QoS 0, not retained', async (t) => {
    const r = await rig(t);
    const ack = await r.device.request(FrameType.TELEMETRY, cborMap([[K.telemetry.readings, [[0, 21.5]]]]));
    assert.equal(ack.type, FrameType.ACK);
    assert.deepEqual(
      r.mesh.published.filter((p) => p.topic.endsWith('/telemetry')),
      [{ topic: topics.deviceTelemetry(r.bridge.id, r.record.longId), retain: false }],
    );
  });

  test('a device with four requests in flight gets BUSY for a fifth, and is served again once they end', async (t) => {
    const r = await rig(t);
    r.mesh.delayMs = 100;
    const running = Array.from({ length: 4 }, () => r.device.request(FrameType.INFER_REQ, inferBody()));
    await waitFor(() => r.mesh.calls === 4, 2_000, 'four requests running');
    const fifth = await r.device.request(FrameType.INFER_REQ, inferBody());
    assert.equal(fifth.type, FrameType.ERROR);
    assert.equal((fifth.body as Map<number, unknown>).get(K.error.code), BridgeErrorCode.BUSY);
    assert.equal(r.mesh.calls, 4, 'the fifth did not run');
    for (const reply of await Promise.all(running)) assert.equal(reply.type, FrameType.INFER_RESP);
    r.mesh.delayMs = 0;
    await assertStillServes(r);
  });

  test('downlinks wait for the next poll, one per poll, and the count rides on every reply', async (t) => {
    const r = await rig(t);
    r.bridge.queueDownlink(r.record.deviceId, Buffer.from('first'));
    r.bridge.queueDownlink(r.record.deviceId, Buffer.from('second'));
    const ack = await r.device.request(FrameType.TELEMETRY, cborMap([[1, [[0, 21.5]]]]));
    assert.equal((ack.body as Map<number, unknown>).get(K.pending), 2);
    const a = await r.device.request(FrameType.POLL, new Map());
    assert.equal(a.type, FrameType.DOWNLINK);
    assert.equal(Buffer.from((a.body as Map<number, unknown>).get(K.downlink.payload) as Uint8Array).toString(), 'first');
    assert.equal((a.body as Map<number, unknown>).get(K.pending), 1);
    const b = await r.device.request(FrameType.POLL, new Map());
    assert.equal(Buffer.from((b.body as Map<number, unknown>).get(K.downlink.payload) as Uint8Array).toString(), 'second');
    const c = await r.device.request(FrameType.POLL, new Map());
    assert.equal(c.type, FrameType.ACK);
    assert.equal((c.body as Map<number, unknown>).get(K.pending), undefined);

    // Refused downlinks are coded: an unknown device, a payload too large for a frame, a full queue.
    const coded = (code: string) => (err: unknown) => err instanceof MeshError && err.code === code;
    assert.throws(() => r.bridge.queueDownlink(0x0badf00d, Buffer.from('x')), coded('MESH_NOT_FOUND'));
    assert.throws(() => r.bridge.queueDownlink(r.record.deviceId, Buffer.alloc(MAX_PACKET_BYTES)), coded('MESH_TOO_LARGE'));
    for (let i = 0; i < 16; i++) r.bridge.queueDownlink(r.record.deviceId, Buffer.from([i]));
    assert.throws(() => r.bridge.queueDownlink(r.record.deviceId, Buffer.from('one too many')), coded('MESH_BUSY'));
  });

  test('availability: a sleepy device goes online → asleep → offline on a fake clock; published retained', async (t) => {
    let clock = 1_000_000;
    const r = await rig(t, { now: () => clock });
    const seen: string[] = [];
    r.bridge.on('availability', (_d: string, state: string) => seen.push(state));
    await r.device.hello({ sleepPeriodS: 10 });
    assert.equal(r.bridge.availability(r.record.deviceId), 'online');
    clock += 6_000; // past the 5 s awake window
    await waitFor(() => r.bridge.availability(r.record.deviceId) === 'asleep', 2_000, 'asleep');
    clock += 30_000; // past period × 1.5 + 10 s grace
    await waitFor(() => r.bridge.availability(r.record.deviceId) === 'offline', 2_000, 'offline');
    await r.device.request(FrameType.POLL, new Map());
    assert.deepEqual(seen, ['online', 'asleep', 'offline', 'online']);
    assert.ok(r.mesh.published.filter((p) => p.topic.endsWith('/availability')).every((p) => p.retain));
    // An always-on device goes offline after 2.5 × keepalive.
    const r2 = await rig(t, { now: () => clock });
    await r2.device.hello({ keepaliveS: 4 });
    clock += 10_001;
    await waitFor(() => r2.bridge.availability(r2.record.deviceId) === 'offline', 2_000, 'always-on offline');
  });
});

describe('bridge: fuzz', () => {
  test('100,000 random and mutated frames through the bridge, 33,000 through the deframer, 60,000 bodies through the CBOR decoder: no throw, no hang', {
    timeout: 240_000,
  }, async (t) => {
    const r = await rig(t);
    const rng = mulberry32(0xb1d9e);
    const byte = () => Math.floor(rng() * 256);
    const key = Buffer.from(r.record.key, 'hex');
    const valid = Array.from({ length: 8 }, () => r.device.frame(FrameType.INFER_REQ, inferBody()));
    const deframer = new SerialDeframer((p) => void r.feed(p), MAX_PACKET_BYTES);
    let frames = 0;
    let packets = 0;
    for (let i = 0; i < 100_000; i++) {
      let packet: Buffer;
      const kind = i % 4;
      if (kind === 0) packet = Buffer.from(Array.from({ length: Math.floor(rng() * 96) }, byte));
      else if (kind === 1) {
        // A known device id so the frame reaches the replay and AEAD checks.
        packet = Buffer.from(Array.from({ length: 27 + Math.floor(rng() * 64) }, byte));
        packet[0] = (1 << 5) | (byte() & 0x1f);
        packet.writeUInt32LE(r.record.deviceId, 1);
      } else if (kind === 2) {
        packet = Buffer.from(valid[Math.floor(rng() * valid.length)]!);
        for (let k = 1 + Math.floor(rng() * 4); k > 0; k--) packet[Math.floor(rng() * packet.length)] = byte();
      } else {
        // Random bodies that authenticate: they reach the CBOR decoder and the request checks.
        const body = Buffer.from(Array.from({ length: Math.floor(rng() * 48) }, byte));
        if (rng() < 0.5 && body.length) body[0] = 0xa0 | (body[0]! & 0x07);
        packet = sealFrame(
          key,
          {
            type: [FrameType.INFER_REQ, FrameType.HELLO, FrameType.TELEMETRY, FrameType.SLEEP, FrameType.POLL][i % 5]!,
            deviceId: r.record.deviceId,
            epoch: 1,
            seq: 1000 + i,
          },
          0,
          body,
        );
      }
      await r.feed(packet);
      packets++;
      frames++;
      if (i % 3 === 0) {
        deframer.push(rng() < 0.5 ? encodeSerialFrame(packet) : packet);
        frames++;
      }
    }
    // Straight into the CBOR decoder and the request reader.
    for (let i = 0; i < 60_000; i++) {
      const bytes = Buffer.from(Array.from({ length: Math.floor(rng() * 40) }, byte));
      try {
        readInferRequest(decodeCbor(bytes));
      } catch (err) {
        assert.ok(isCborError(err), `only the decoder's MESH_BAD_REQUEST escapes: ${(err as Error).message}`);
      }
      frames++;
    }
    assert.equal(packets, 100_000, 'whole frames through the bridge');
    assert.ok(frames >= 190_000, `${frames} inputs`);
    // The fuzz used up sequence numbers of epoch 1: the device goes on in a new epoch.
    r.device.epoch = 2;
    r.device.seq = 0;
    await assertStillServes(r);
  });
});

describe('broker rules for bridge topics', () => {
  test("a bridge publishes (and retains) only its own devices' availability and telemetry; others may only read them", async () => {
    const { aclPublish, aclSubscribe, newSession, ACL_DENY } = await import('../broker/src/acl.ts');
    const { checkPublish } = await import('../broker/src/policy.ts');
    const { topics, MAX_TOPIC_BYTES, MAX_TOPIC_LEVELS } = await import('@edge-mesh/protocol');
    const limits = { maxTopicLevels: MAX_TOPIC_LEVELS, maxTopicBytes: MAX_TOPIC_BYTES };
    const bridge = newSession('bridge-aaaaaaaaaaaaaaaaaaaaaaaaaa', 'bridge', Infinity, 100);
    const other = 'bridge-bbbbbbbbbbbbbbbbbbbbbbbbbb';
    const app = newSession('app-cccccccccccccccccccccccccc', 'app', Infinity, 100);
    const own = topics.deviceAvailability(bridge.id, 'dev-0000abcd');
    assert.notEqual(aclPublish(bridge, own), ACL_DENY);
    assert.notEqual(aclPublish(bridge, topics.deviceTelemetry(bridge.id, 'dev-0000abcd')), ACL_DENY);
    assert.equal(aclPublish(bridge, topics.deviceAvailability(other, 'dev-0000abcd')), ACL_DENY, "another bridge's device");
    assert.equal(aclPublish(bridge, `${own}/x`), ACL_DENY);
    assert.equal(aclPublish(app, own), ACL_DENY, 'an app cannot speak for a device');
    assert.notEqual(
      aclPublish(bridge, topics.agentRequest('agent-dddddddddddddddddddddddddd', bridge.id)),
      ACL_DENY,
      'a bridge still sends requests',
    );
    assert.equal(checkPublish({ topic: own, qos: 1, retain: true }, bridge.id, limits), undefined, 'retained availability');
    assert.equal(
      checkPublish({ topic: topics.deviceTelemetry(bridge.id, 'dev-0000abcd'), qos: 0, retain: true }, bridge.id, limits),
      'retain-not-own-status',
    );
    assert.equal(
      checkPublish({ topic: topics.deviceAvailability(other, 'dev-0000abcd'), qos: 1, retain: true }, bridge.id, limits),
      'retain-not-own-status',
    );
    assert.ok(aclSubscribe(app, topics.allDeviceAvailability()));
    assert.ok(aclSubscribe(app, own));
  });
});

describe('UDP transport counters', () => {
  test('a datagram flood: what the kernel dropped is counted, every datagram read is counted, garbage counts as dropped frames', async (t) => {
    const r = await rig(t);
    // A small receive buffer, so a burst sent while this process does not read overflows it.
    const udp = await listenUdp(r.bridge, { port: 0, recvBufferSize: 4096 });
    t.after(() => udp.close());
    const sender = dgram.createSocket('udp4');
    t.after(() => new Promise<void>((resolve) => sender.close(() => resolve())));
    await new Promise<void>((resolve) => sender.bind(0, '127.0.0.1', () => resolve()));
    sender.connect(udp.port, '127.0.0.1');
    await new Promise((resolve) => sender.once('connect', resolve));
    const before = udp.stats();
    assert.equal(before.datagrams, 0);
    assert.equal(before.kernelDrops, 0, 'Linux reports this socket in /proc/net/udp');
    const flood = 2_000;
    const garbage = Buffer.alloc(600, 0x5a);
    // Sent in one synchronous loop: the bridge's socket is not read until it ends.
    for (let i = 0; i < flood; i++) sender.send(garbage);
    const settled = () => {
      const s = udp.stats();
      return s.datagrams + (s.kernelDrops ?? 0) >= flood;
    };
    const until = Date.now() + 10_000;
    while (!settled() && Date.now() < until) await new Promise((resolve) => setTimeout(resolve, 20));
    const after = udp.stats();
    assert.ok((after.kernelDrops ?? 0) > 0, `kernel drops ${after.kernelDrops}`);
    assert.equal(after.datagrams + after.kernelDrops!, flood, JSON.stringify(after));
    // Every datagram read was garbage: dropped by the bridge, unanswered.
    const droppedFrames = Object.values(r.bridge.stats.dropped).reduce((a, b) => a + b, 0);
    assert.equal(droppedFrames, after.datagrams);
    assert.equal(after.replies, 0);
    // The count survives close (the socket's /proc line does not).
    await udp.close();
    assert.equal(udp.stats().kernelDrops, after.kernelDrops);
  });
});
