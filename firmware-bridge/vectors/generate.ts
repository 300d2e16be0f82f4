/**
 * Writes golden.json: fixed keys and bodies → packet → serial frame. The TypeScript and C tests both
 * check their bytes against it, which keeps the two sides compatible. Regenerate only on purpose
 * (a change here is a wire-format change): `npx tsx firmware-bridge/vectors/generate.ts`.
 */
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { cborMap, encodeCbor } from '../src/cbor.ts';
import { FrameType, sealFrame } from '../src/frame.ts';
import { encodeSerialFrame } from '../src/link.ts';
import { inferRequestBody, K } from '../src/messages.ts';

const key = Buffer.from('000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f', 'hex');
const key2 = Buffer.from('c0ffee00'.repeat(8), 'hex');
const window = Buffer.alloc(16);
for (const [i, v] of [0, 1, -1, 256, -256, 32767, -32768, 1000].entries()) window.writeInt16LE(v, i * 2);
const longWindow = Buffer.alloc(600);
for (let i = 0; i < 300; i++) longWindow.writeInt16LE(((i * 37) % 512) - 256, i * 2);

const cases = [
  {
    name: 'hello',
    key,
    type: FrameType.HELLO,
    deviceId: 0x1a2b3c4d,
    epoch: 1,
    seq: 1,
    direction: 0,
    body: cborMap([
      [K.hello.fw, 'fb-c 1.0'],
      [K.hello.maxFrame, 8192],
      [K.hello.sleepPeriodS, 0],
      [K.hello.keepaliveS, 30],
    ]),
  },
  {
    name: 'welcome',
    key,
    type: FrameType.WELCOME,
    deviceId: 0x1a2b3c4d,
    epoch: 1,
    seq: 1,
    direction: 1,
    body: cborMap([
      [
        K.welcome.models,
        [
          [1, 'kws'],
          [2, 'ocr-cls'],
        ],
      ],
      [K.welcome.timeMs, 1767225600000],
      [K.welcome.maxFrame, 8192],
      [K.welcome.keepaliveS, 30],
    ]),
  },
  {
    name: 'infer-request',
    key,
    type: FrameType.INFER_REQ,
    deviceId: 0x1a2b3c4d,
    epoch: 1,
    seq: 2,
    direction: 0,
    body: inferRequestBody({ modelId: 1, tensor: { tag: 77, bytes: window }, scale: 0.5, shape: [1, 8], deadlineMs: 200, want: 1 }),
  },
  {
    name: 'infer-result',
    key,
    type: FrameType.INFER_RESP,
    deviceId: 0x1a2b3c4d,
    epoch: 1,
    seq: 2,
    direction: 1,
    body: cborMap([
      [K.inferResp.label, 0],
      [K.inferResp.score, 0.25],
      [K.inferResp.latencyMs, 3],
      [K.inferResp.agent, 'agent-abcdefgh'],
      [K.inferResp.receiptRef, Buffer.from('0123456789abcdef', 'hex')],
      [K.inferResp.output, { tag: 85, bytes: Buffer.from('0000803e', 'hex') }],
      [K.inferResp.outputShape, [1, 1]],
    ]),
  },
  {
    name: 'error-unknown-model',
    key,
    type: FrameType.ERROR,
    deviceId: 0x1a2b3c4d,
    epoch: 1,
    seq: 3,
    direction: 1,
    body: cborMap([
      [K.error.code, 2],
      [K.error.message, 'no model has id 9'],
    ]),
  },
  {
    name: 'poll-zero-bytes-in-header',
    key: key2,
    type: FrameType.POLL,
    deviceId: 0x00000100,
    epoch: 0x0100,
    seq: 0x00010000,
    direction: 0,
    body: new Map(),
  },
  {
    name: 'ack-with-pending',
    key: key2,
    type: FrameType.ACK,
    deviceId: 0x00000100,
    epoch: 0x0100,
    seq: 0x00010000,
    direction: 1,
    body: cborMap([[K.pending, 2]]),
  },
  {
    name: 'telemetry',
    key: key2,
    type: FrameType.TELEMETRY,
    deviceId: 0xfffffffe,
    epoch: 65535,
    seq: 4294967295,
    direction: 0,
    body: cborMap([
      [
        K.telemetry.readings,
        [
          [0, 21.5],
          [1, -3],
        ],
      ],
    ]),
  },
  {
    name: 'long-body-cobs-blocks',
    key,
    type: FrameType.INFER_REQ,
    deviceId: 7,
    epoch: 2,
    seq: 9,
    direction: 0,
    body: inferRequestBody({ modelId: 2, tensor: { tag: 77, bytes: longWindow }, scale: 1 / 1024, deadlineMs: 1000 }),
  },
];

const vectors = cases.map((c) => {
  const body = encodeCbor(c.body);
  const packet = sealFrame(c.key, c, c.direction, body);
  return {
    name: c.name,
    key: c.key.toString('hex'),
    type: c.type,
    deviceId: c.deviceId,
    epoch: c.epoch,
    seq: c.seq,
    direction: c.direction,
    nonce: Buffer.concat([Buffer.from(packet.subarray(1, 11)), Buffer.from([c.direction, 0])]).toString('hex'),
    body: body.toString('hex'),
    packet: packet.toString('hex'),
    serialFrame: encodeSerialFrame(packet).toString('hex'),
  };
});
const out = path.join(import.meta.dirname, 'golden.json');
writeFileSync(
  out,
  `${JSON.stringify({ about: 'Frame protocol v1 golden vectors: key, header fields and CBOR body → packet → serial frame (docs/firmware-protocol.md)', vectors }, null, 2)}\n`,
);
console.log(`wrote ${vectors.length} vectors to ${out}`);
