/**
 * The envelope's own CBOR writer and reader (protocol/src/cbor-encode.ts, cbor-decode.ts) against cborg with the
 * envelope's options: the same bytes for every value, random and chosen, and cborg's behaviour for what the writer
 * leaves to it; and a reader that, whenever it answers rather than leave a payload to cborg, answers what cborg
 * answers, over random, mutated and chosen payloads.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { mulberry32, type Rng } from '@edge-mesh/client';
import {
  decodeCbor,
  decodeMessage,
  decodeTensorMap,
  encodeCbor,
  encodeMessage,
  encodeTensorMap,
  type InferReply,
  type InferRequest,
  newRequestId,
  PROTOCOL_VERSION,
  type WireTensor,
} from '@edge-mesh/protocol';
import { decode as cborgDecode, encode as cborgEncode } from 'cborg';
import { decodeDirect, LEAVE_TO_CBORG } from '../protocol/src/cbor-decode.ts';
import { encodeDirect } from '../protocol/src/cbor-encode.ts';

const cborg = (value: unknown) => Buffer.from(cborgEncode(value, { float64: true, mapSorter: undefined }));

const INTEGERS = [
  0,
  1,
  23,
  24,
  255,
  256,
  65535,
  65536,
  2 ** 32 - 1,
  2 ** 32,
  2 ** 53 - 1,
  -1,
  -24,
  -25,
  -256,
  -257,
  -65536,
  -65537,
  -(2 ** 32),
  -(2 ** 32) - 1,
  -(2 ** 53 - 1),
];
const FLOATS = [0.5, -0.5, 1.1, 2 ** 53, -(2 ** 53), 1e300, 5e-324, Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, -0];
const STRINGS = [
  '',
  'a',
  'kind',
  'x'.repeat(23),
  'x'.repeat(24),
  'y'.repeat(300),
  'é',
  'héllo wörld',
  '日本語',
  '🙂',
  '\ud800',
  'a\udc00b',
  '\u0000',
];

function randomString(next: Rng): string {
  const pick = next();
  if (pick < 0.3) return STRINGS[Math.floor(next() * STRINGS.length)]!;
  const length = Math.floor(next() * (next() < 0.01 ? 70_000 : 40));
  let s = '';
  for (let i = 0; i < length; i++) {
    const r = next();
    s += String.fromCharCode(r < 0.8 ? 32 + Math.floor(next() * 95) : r < 0.95 ? Math.floor(next() * 0x800) : Math.floor(next() * 0x10000));
  }
  return s;
}

function randomBytes(next: Rng): Uint8Array {
  const length = Math.floor(next() * (next() < 0.01 ? 200_000 : 64));
  const bytes = next() < 0.5 ? new Uint8Array(length) : Buffer.allocUnsafe(length);
  const start = Math.floor(next() * 256);
  for (let i = 0; i < length; i++) bytes[i] = (start + i * 31) & 255;
  // A view into a larger buffer, as a decoded tensor or a pooled Buffer is.
  if (next() < 0.3 && length > 2) return bytes.subarray(1, length - 1);
  return bytes;
}

function randomValue(next: Rng, depth: number): unknown {
  const r = next();
  if (depth > 3 || r < 0.45) {
    const s = next();
    if (s < 0.2) return INTEGERS[Math.floor(next() * INTEGERS.length)];
    if (s < 0.3) return Math.floor((next() - 0.5) * 2 ** (next() * 60));
    if (s < 0.45) return next() < 0.5 ? FLOATS[Math.floor(next() * FLOATS.length)] : (next() - 0.5) * 10 ** Math.floor(next() * 20);
    if (s < 0.7) return randomString(next);
    if (s < 0.85) return randomBytes(next);
    return [null, undefined, true, false][Math.floor(next() * 4)];
  }
  if (r < 0.7) {
    const length = Math.floor(next() * (depth === 0 && next() < 0.05 ? 300 : 5));
    return Array.from({ length }, () => randomValue(next, depth + 1));
  }
  const record: Record<string, unknown> = next() < 0.1 ? Object.create(null) : {};
  const size = Math.floor(next() * (depth === 0 && next() < 0.05 ? 40 : 6));
  for (let i = 0; i < size; i++) {
    // Integer-like keys too: Object.keys puts them first, in both encoders.
    const key = next() < 0.15 ? String(Math.floor(next() * 100)) : randomString(next);
    record[key] = randomValue(next, depth + 1);
  }
  return record;
}

test('the envelope writes the bytes cborg writes, for 20,000 random values over five seeds', () => {
  for (const seed of [1, 2, 3, 4, 5]) {
    const next = mulberry32(seed);
    for (let i = 0; i < 4_000; i++) {
      const value = randomValue(next, 0);
      // The writer itself, not cborg behind it: every random value is of a kind it takes.
      const ours = encodeDirect(value);
      if (ours === undefined) assert.fail(`seed ${seed}, value ${i}: left to cborg`);
      const theirs = cborg(value);
      if (!ours.equals(theirs))
        assert.fail(`seed ${seed}, value ${i}: ${ours.toString('hex').slice(0, 200)} ≠ ${theirs.toString('hex').slice(0, 200)}`);
    }
  }
});

test('boundary values, one at a time', () => {
  const holey: unknown[] = [];
  holey[0] = 'a hole follows';
  holey[2] = 1;
  for (const value of [...INTEGERS, ...FLOATS, ...STRINGS, null, undefined, true, false, [], {}, new Uint8Array(0), holey]) {
    assert.deepEqual(encodeCbor(value), cborg(value), `value ${String(value)}`);
  }
});

test('real messages: a request with a tensor and a reply, the same bytes, and they decode back', () => {
  const id = newRequestId();
  const inputs = encodeTensorMap({ x: { dtype: 'float32', shape: [1, 25, 96], data: new Float32Array(2400).map((_, i) => i / 7) } });
  const req: InferRequest = { v: PROTOCOL_VERSION, kind: 'req', id, model: 'kws', inputs, deadline: Date.now() + 1000 };
  assert.deepEqual(encodeMessage(req), cborg(req));
  const back = decodeMessage(encodeMessage(req), ['req']);
  assert.deepEqual(back.inputs, req.inputs);
  const res: InferReply = {
    v: PROTOCOL_VERSION,
    kind: 'res',
    id,
    agent: 'a'.repeat(43),
    model: 'kws',
    outputs: inputs,
    queueMs: 0.25,
    execMs: 0.021,
    rif: 3,
    workMs: 0.75,
  };
  assert.deepEqual(encodeMessage(res), cborg(res));
});

test('what the writer does not know goes to cborg, which encodes or refuses it as before', () => {
  class Point {
    x = 1;
  }
  const others: unknown[] = [
    new Map([['a', 1]]),
    { n: 10n },
    { f: new Float32Array([1.5, 2]) },
    new Point(),
    { deep: JSON.parse(`${'['.repeat(40)}1${']'.repeat(40)}`) },
  ];
  for (const value of others) {
    assert.equal(encodeDirect(value), undefined);
    assert.deepEqual(encodeCbor(value), cborg(value));
  }
  const cycle: Record<string, unknown> = { a: 1 };
  cycle.self = cycle;
  assert.throws(() => encodeCbor(cycle), /circular/i);
  assert.throws(() => encodeCbor({ f: () => 1 }), /unsupported type/i);
  // And the writer is fine after a refusal.
  assert.deepEqual(encodeCbor({ ok: [1, 'two'] }), cborg({ ok: [1, 'two'] }));
});

test('a value larger than the reused buffer, then a small one: both right', () => {
  const big = { data: new Uint8Array(3 * 1024 * 1024).fill(7), tail: 'end' };
  assert.deepEqual(encodeCbor(big), cborg(big));
  assert.deepEqual(encodeCbor({ small: 1 }), cborg({ small: 1 }));
  // Results do not share bytes: encoding again does not change an earlier result.
  const first = encodeCbor({ a: 'first' });
  const copy = Buffer.from(first);
  encodeCbor({ a: 'second, longer' });
  assert.deepEqual(first, copy);
});

const cborgRead = (bytes: Uint8Array) => cborgDecode(bytes, { useMaps: false, rejectDuplicateMapKeys: true });

/** The reader's answer must be cborg's; a payload it leaves to cborg is cborg's to answer anyway. */
function sameAsCborg(bytes: Uint8Array, where: string): boolean {
  const ours = decodeDirect(bytes);
  if (ours === LEAVE_TO_CBORG) return false;
  let theirs: unknown;
  try {
    theirs = cborgRead(bytes);
  } catch (err) {
    assert.fail(
      `${where}: the reader answered where cborg refuses (${(err as Error).message}): ${Buffer.from(bytes).toString('hex').slice(0, 200)}`,
    );
  }
  assert.deepStrictEqual(ours, theirs, where);
  return true;
}

test('the reader answers what cborg answers, for random values and for mutations of them', () => {
  let direct = 0;
  let total = 0;
  for (const seed of [11, 12, 13, 14, 15]) {
    const next = mulberry32(seed);
    for (let i = 0; i < 3_000; i++) {
      const encoded = cborg(randomValue(next, 0));
      // As a Buffer (what MQTT hands over) and as a plain Uint8Array.
      const forms = [encoded, new Uint8Array(encoded)];
      for (const bytes of forms) {
        total++;
        if (sameAsCborg(bytes, `seed ${seed}, value ${i}`)) direct++;
      }
      // Mutations: a flipped byte, a cut, bytes appended.
      const mutated = Buffer.from(encoded);
      if (mutated.length > 0) mutated[Math.floor(next() * mutated.length)] = Math.floor(next() * 256);
      sameAsCborg(mutated, `seed ${seed}, value ${i}, flipped`);
      sameAsCborg(encoded.subarray(0, Math.floor(next() * encoded.length)), `seed ${seed}, value ${i}, cut`);
      sameAsCborg(Buffer.concat([encoded, Buffer.from([Math.floor(next() * 256)])]), `seed ${seed}, value ${i}, appended`);
    }
  }
  // Most random values have only ASCII text, which the reader takes itself: it is tested, not bypassed.
  assert.ok(direct > total / 3, `read directly ${direct} of ${total}`);
});

test('random bytes: the reader never answers what cborg refuses', () => {
  const next = mulberry32(21);
  for (let i = 0; i < 20_000; i++) {
    const bytes = Buffer.alloc(1 + Math.floor(next() * 24));
    for (let j = 0; j < bytes.length; j++) bytes[j] = Math.floor(next() * 256);
    // Start with a map head often, as a message does.
    if (next() < 0.5) bytes[0] = 0xa0 | Math.floor(next() * 4);
    sameAsCborg(bytes, `random ${i}`);
  }
});

test('chosen payloads: edges of integers, keys cborg refuses or treats specially', () => {
  const cases: [string, Buffer][] = [
    ['largest safe uint in 8 bytes', Buffer.from('1b001fffffffffffff', 'hex')],
    ['2^53 in 8 bytes', Buffer.from('1b0020000000000000', 'hex')],
    ['small uint in 8 bytes', Buffer.from('1b0000000000000005', 'hex')],
    ['negative in 8 bytes', Buffer.from('3b001ffffffffffffe', 'hex')],
    ['duplicate key', Buffer.from('a2616101616102', 'hex')],
    ['__proto__ key', Buffer.from(`a1${Buffer.from([0x69]).toString('hex')}${Buffer.from('__proto__').toString('hex')}a0`, 'hex')],
    ['toString key', Buffer.from(`a168${Buffer.from('toString').toString('hex')}01`, 'hex')],
    ['integer key', Buffer.from('a10101', 'hex')],
    ['float16', Buffer.from('f93c00', 'hex')],
    ['float32', Buffer.from('fa3fc00000', 'hex')],
    ['tag', Buffer.from('c11a514b67b0', 'hex')],
    ['indefinite map', Buffer.from('bf616101ff', 'hex')],
    ['two items', Buffer.from('0101', 'hex')],
    ['empty', Buffer.alloc(0)],
    ['array claiming more than there is', Buffer.from('9a7fffffff01', 'hex')],
    ['non-ASCII text', Buffer.from('62c3a9', 'hex')],
    ['simple value 16', Buffer.from('f0', 'hex')],
  ];
  for (const [name, bytes] of cases) {
    sameAsCborg(bytes, name);
    let ours: unknown;
    let theirs: unknown;
    try {
      ours = decodeCbor(bytes);
    } catch (err) {
      ours = `refused: ${(err as Error).constructor.name}`;
    }
    try {
      theirs = cborgRead(bytes);
    } catch (err) {
      theirs = `refused: ${(err as Error).constructor.name}`;
    }
    assert.deepStrictEqual(ours, theirs, name);
  }
  // The usual shape of a message is read directly.
  const req = encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: newRequestId() });
  assert.notEqual(decodeDirect(req), LEAVE_TO_CBORG);
  // A key seen before comes back as the same string, from the cache, and is still right.
  const a = decodeDirect(encodeCbor({ someKey: 1 })) as Record<string, number>;
  const b = decodeDirect(encodeCbor({ someKey: 2, someKez: 3 })) as Record<string, number>;
  assert.deepStrictEqual([a.someKey, b.someKey, b.someKez], [1, 2, 3]);
});

test('what a sender or a caller could turn against the reader and writer', async () => {
  // Empty byte strings: each is an ArrayBuffer of its own here, so past a few hundred the payload is cborg's, which
  // shares one empty array between them (a payload of 4 MiB of them would otherwise cost seconds and a gigabyte).
  const empties = (n: number) => Buffer.concat([Buffer.from([0x99, n >> 8, n & 0xff]), Buffer.alloc(n, 0x40)]);
  assert.notEqual(decodeDirect(empties(256)), LEAVE_TO_CBORG);
  assert.equal(decodeDirect(empties(257)), LEAVE_TO_CBORG);
  assert.equal((decodeCbor(empties(5_000)) as Uint8Array[]).length, 5_000);

  // cborg's shared empty array must never be handed to a worker: adopting it would detach it for every later message.
  const emptyTensor = cborgEncode(
    { t: { dtype: 'float32', shape: [0], data: new Uint8Array(0) } },
    { float64: false, mapSorter: undefined },
  );
  const viaCborg = Buffer.concat([Buffer.from([0xa2]), Buffer.from(emptyTensor.subarray(1)), Buffer.from('63706164f90000', 'hex')]);
  for (let i = 0; i < 2; i++) {
    const wire = (decodeCbor(viaCborg) as { t: WireTensor }).t;
    const tensor = decodeTensorMap({ t: wire }, 1_000, { adopt: true }).t!;
    assert.notEqual(tensor.data.buffer, wire.data.buffer);
    structuredClone(tensor.data.buffer, { transfer: [tensor.data.buffer as ArrayBuffer] });
  }

  // A getter that encodes while a value is written: the inner value goes to cborg, both come out right.
  const outer = {
    k: 'outer',
    get r() {
      assert.deepEqual(encodeCbor({ x: 'inner value' }), cborg({ x: 'inner value' }));
      return 1;
    },
    z: 'tail',
  };
  assert.deepEqual(encodeCbor(outer), cborg(outer));

  // Values cborg types otherwise than their prototype says: its bytes, or its refusal.
  const ownIterator = [1, 2];
  Object.defineProperty(ownIterator, Symbol.iterator, {
    value: function* () {
      yield 7;
      yield 8;
    },
  });
  const tagged = Object.assign(Object.create(null), { tag: 1, value: 2, [Symbol.toStringTag]: 'Tagged' });
  const longLength = Object.defineProperty(new Uint8Array([1, 2, 3]), 'length', { value: 1 });
  class Bytes extends Uint8Array {}
  for (const value of [ownIterator, tagged, longLength, new Bytes([1, 2])]) {
    assert.equal(encodeDirect(value), undefined);
    assert.deepEqual(encodeCbor(value), cborg(value));
  }
  const dated = Object.assign(Object.create(null), { [Symbol.toStringTag]: 'Date' });
  assert.throws(() => cborg(dated));
  assert.throws(() => encodeCbor(dated));

  // Input that is not a plain Uint8Array or Buffer is cborg's to refuse, or to answer in its own kind.
  assert.equal(decodeDirect(new Uint8ClampedArray([0xa1, 0x61, 0x61, 0x01]) as unknown as Uint8Array), LEAVE_TO_CBORG);
  assert.throws(() => decodeCbor(new Uint8ClampedArray([0xa1, 0x61, 0x61, 0x01]) as unknown as Uint8Array));
  const sub = new Bytes(encodeCbor({ b: new Uint8Array([5]) }));
  assert.equal(decodeDirect(sub), LEAVE_TO_CBORG);
  assert.deepStrictEqual(decodeCbor(sub), cborgRead(sub));
});
