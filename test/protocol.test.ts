import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { reconnectDelayMs, summarize } from '@edge-mesh/client';
import {
  cborNestsDeeper,
  checkTensor,
  decodeMessage,
  decodeTensor,
  decodeTensorMap,
  ERROR_CODES,
  encodeMessage,
  encodeTensor,
  generateIdentity,
  type InferRequest,
  isValidId,
  MAX_SIGNED_RECEIPT_BYTES,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  parseTopic,
  requestIdHex,
  signReceipt,
  tensorFromJson,
  tensorToJson,
  topics,
} from '@edge-mesh/protocol';

const code = (c: string) => (err: unknown) => err instanceof MeshError && err.code === c;

describe('topics', () => {
  test('builders and parser agree, identity at a fixed level', () => {
    assert.equal(topics.agentRequest('agent-1', 'app-1'), 'mesh/v1/agent/agent-1/req/app-1');
    assert.deepEqual(parseTopic(topics.agentRequest('agent-1', 'app-1')), { kind: 'request', agentId: 'agent-1', senderId: 'app-1' });
    assert.deepEqual(parseTopic(topics.clientReply('app-1', 'agent-1')), { kind: 'reply', clientId: 'app-1', agentId: 'agent-1' });
    assert.deepEqual(parseTopic(topics.agentStatus('agent-1')), { kind: 'status', agentId: 'agent-1' });
    assert.deepEqual(parseTopic(topics.agentLoad('agent-1')), { kind: 'load', agentId: 'agent-1' });
    assert.deepEqual(parseTopic(topics.agentCancel('agent-1', 'app-1')), { kind: 'cancel', agentId: 'agent-1', senderId: 'app-1' });
    for (const bad of [
      'mesh/v1/agent/+/status',
      'mesh/v1/agent/__proto__/status',
      'mesh/v2/agent/agent-1/status',
      'mesh/v1/agent/agent-1/status/x',
      'mesh/v1/client/app-1/res/#',
      '',
    ]) {
      assert.equal(parseTopic(bad), undefined, bad);
    }
  });

  test('ids are restricted to a safe alphabet', () => {
    for (const ok of ['agent-1', 'abc', 'a'.repeat(64)]) assert.ok(isValidId(ok), ok);
    for (const bad of ['ab', 'Agent', '__proto__', 'a/b', 'a+b', '#', '-abc', 'a'.repeat(65), 'é-abc', 42])
      assert.ok(!isValidId(bad), String(bad));
  });
});

describe('tensors', () => {
  test('round trip keeps every byte and lands in an aligned buffer', () => {
    const data = Float32Array.from({ length: 24 }, (_, i) => Math.fround(i * 0.1 - 1));
    const wire = encodeTensor({ dtype: 'float32', shape: [2, 3, 4], data });
    // Received payloads often start at odd offsets: place the bytes at offset 1.
    const odd = new Uint8Array(wire.data.byteLength + 1);
    odd.set(wire.data, 1);
    const back = decodeTensor('x', { ...wire, data: odd.subarray(1) });
    assert.ok(back.data instanceof Float32Array);
    assert.equal(back.data.byteOffset % 4, 0);
    assert.deepEqual([...back.data], [...data]);
    const ints = decodeTensor('i', encodeTensor({ dtype: 'int64', shape: [], data: BigInt64Array.of(16000n) }));
    assert.deepEqual([...ints.data], [16000n]);
  });

  test("adopt: a received message's byte strings become the tensors' data without a copy; views into larger buffers are copied", () => {
    const data = Float32Array.from({ length: 2400 }, (_, i) => i);
    const sent: InferRequest = {
      v: PROTOCOL_VERSION,
      kind: 'req',
      id: newRequestId(),
      deadline: Date.now() + 1000,
      model: 'kws',
      inputs: { x: encodeTensor({ dtype: 'float32', shape: [1, 25, 96], data }) },
    };
    // Received at an odd offset inside a larger buffer, as a socket read delivers it.
    const encoded = encodeMessage(sent);
    const chunk = Buffer.alloc(encoded.length + 3);
    encoded.copy(chunk, 3);
    const received = decodeMessage(chunk.subarray(3), ['req']);
    const wire = received.inputs.x!;
    assert.equal(wire.data.byteLength, wire.data.buffer.byteLength, 'the decoder copied the byte string out of the payload');
    const adopted = decodeTensorMap(received.inputs, 1 << 20, { adopt: true }).x!;
    assert.equal(adopted.data.buffer, wire.data.buffer, 'no second copy');
    assert.deepEqual([...adopted.data], [...data]);
    assert.notEqual(decodeTensorMap(received.inputs).x!.data.buffer, wire.data.buffer, 'copied unless asked');
    // A view into a larger buffer (another tensor's bytes, a pooled Buffer) is never taken over.
    const view = decodeTensor('x', { ...wire, data: chunk.subarray(0, 9600) }, 1 << 20, { adopt: true });
    assert.notEqual(view.data.buffer, chunk.buffer);
    assert.equal(view.data.buffer.byteLength, 9600);
  });

  test('strict checks: dtype allow-list, shape × itemsize == bytes, element cap', () => {
    const data = new Uint8Array(16);
    assert.throws(() => decodeTensor('x', { dtype: 'string', shape: [4], data }), code('MESH_BAD_TENSOR'));
    assert.throws(() => decodeTensor('x', { dtype: '__proto__', shape: [4], data }), code('MESH_BAD_TENSOR'));
    assert.throws(() => decodeTensor('x', { dtype: 'float32', shape: [5], data }), code('MESH_BAD_TENSOR'));
    assert.throws(() => decodeTensor('x', { dtype: 'float64', shape: [4], data }), code('MESH_BAD_TENSOR'));
    assert.throws(() => decodeTensor('x', { dtype: 'float32', shape: [2.5], data }), code('MESH_BAD_TENSOR'));
    assert.throws(() => decodeTensor('x', { dtype: 'float32', shape: [-4], data }), code('MESH_BAD_TENSOR'));
    assert.throws(() => decodeTensor('x', { dtype: 'float32', shape: [2 ** 40, 2 ** 40], data }), code('MESH_TOO_LARGE'));
    assert.throws(() => decodeTensor('x', { dtype: 'uint8', shape: [16], data }, 8), code('MESH_TOO_LARGE'));
    assert.throws(() => decodeTensor('x', { dtype: 'uint8', shape: [1, 1, 1, 1, 1, 1, 1, 1, 16], data }), code('MESH_BAD_TENSOR'));
    assert.equal(decodeTensor('x', { dtype: 'float32', shape: [2, 2], data }).data.length, 4);
    assert.equal(decodeTensor('x', { dtype: 'float32', shape: [0, 7], data: new Uint8Array(0) }).data.length, 0);
  });

  test('apps get the same checks before sending', () => {
    assert.throws(() => checkTensor('x', { dtype: 'float32', shape: [3], data: new Float32Array(4) }), code('MESH_BAD_TENSOR'));
    assert.throws(() => checkTensor('x', { dtype: 'float32', shape: [4], data: new Float64Array(4) }), code('MESH_BAD_TENSOR'));
    assert.doesNotThrow(() => checkTensor('x', { dtype: 'bool', shape: [4], data: new Uint8Array(4) }));
  });

  test('JSON tensors for the CLI', () => {
    const t = tensorFromJson(
      'x',
      'float32',
      [2, 2],
      [
        [1, 2],
        [3, 4],
      ],
    );
    assert.deepEqual([...t.data], [1, 2, 3, 4]);
    assert.deepEqual([...tensorFromJson('sr', 'int64', [], 16000).data], [16000n]);
    // Rows mixed with values, as many entries as values: still read in row-major order.
    assert.deepEqual([...tensorFromJson('x', 'float32', [3], [[1], 2, 3]).data], [1, 2, 3]);
    assert.deepEqual([...tensorFromJson('x', 'float32', [2], [[], [1, 2]]).data], [1, 2]);
    assert.deepEqual([...tensorFromJson('x', 'bool', [2], [true, false]).data], [1, 0]);
    assert.throws(() => tensorFromJson('x', 'float32', [2], [1, null]), code('MESH_BAD_TENSOR'));
    assert.deepEqual(tensorToJson(tensorFromJson('x', 'float32', [2], [0.5, -2])).data, [0.5, -2]);
    assert.deepEqual(tensorToJson({ dtype: 'int64', shape: [2], data: new BigInt64Array([3n, 2n ** 60n]) }).data, [
      3,
      (2n ** 60n).toString(),
    ]);
    assert.throws(() => tensorFromJson('x', 'float32', [3], [1, 2]), code('MESH_BAD_TENSOR'));
    assert.throws(() => tensorFromJson('x', 'float32', [2], ['a', 'b']), code('MESH_BAD_TENSOR'));
    // JSON.parse('1e400') is Infinity; 1e39 overflows a float32; neither is a value the sender wrote.
    assert.throws(() => tensorFromJson('x', 'float32', [2], JSON.parse('[1, 1e400]')), code('MESH_BAD_TENSOR'));
    assert.throws(() => tensorFromJson('x', 'float32', [1], [-1e39]), code('MESH_BAD_TENSOR'));
    assert.throws(() => tensorFromJson('x', 'float64', [1], [Number.NaN]), code('MESH_BAD_TENSOR'));
    assert.deepEqual([...tensorFromJson('x', 'float64', [1], [1e300]).data], [1e300]);
    assert.throws(() => tensorFromJson('x', 'int64', [1], JSON.parse('[1e400]')), code('MESH_BAD_TENSOR'));
    assert.throws(() => tensorFromJson('x', 'int32', [1], JSON.parse('[1e400]')), code('MESH_BAD_TENSOR'));
  });
});

describe('envelope', () => {
  const req = (): InferRequest => ({
    v: PROTOCOL_VERSION,
    kind: 'req',
    id: newRequestId(),
    deadline: Date.now() + 1000,
    model: 'kws',
    inputs: { x: encodeTensor({ dtype: 'float32', shape: [2], data: Float32Array.of(1.5, -2) }) },
  });

  test('requests round trip through CBOR and validate against their schema', () => {
    const m = req();
    const back = decodeMessage(encodeMessage(m), ['req']);
    assert.equal(requestIdHex(back.id), requestIdHex(m.id));
    assert.equal(back.deadline, m.deadline);
    assert.deepEqual([...decodeTensor('x', back.inputs.x!).data], [1.5, -2]);
  });

  test('a signed receipt with every field at its largest encodes within MAX_SIGNED_RECEIPT_BYTES', () => {
    const big = Number.MAX_SAFE_INTEGER;
    const agent = generateIdentity('agent');
    const { receipt } = signReceipt(agent, {
      v: 1,
      chainId: big,
      escrow: `0x${'ff'.repeat(20)}`,
      payer: `0x${'ee'.repeat(20)}`,
      agentKey: agent.publicKey,
      seq: big,
      requestId: new Uint8Array(16).fill(255),
      modelHash: new Uint8Array(32).fill(255),
      inputHash: new Uint8Array(32).fill(255),
      outputHash: new Uint8Array(32).fill(255),
      status: 4,
      unitsUsed: 0xffffffff,
      price: big,
      cumulative: big,
      startedAt: big,
      finishedAt: big,
      prevReceipt: new Uint8Array(32).fill(255),
    });
    const batch = (n: number) =>
      encodeMessage({
        v: PROTOCOL_VERSION,
        kind: 'receipts',
        agent: 'agent-x',
        payer: receipt.payer,
        receipts: Array(n).fill(receipt),
        lane: { seq: 1, paid: 0 },
      });
    const each = (batch(11).byteLength - batch(1).byteLength) / 10;
    assert.ok(each <= MAX_SIGNED_RECEIPT_BYTES, `a receipt takes ${each} bytes`);
    assert.ok(each > MAX_SIGNED_RECEIPT_BYTES / 2, `the bound is not far above what a receipt takes (${each})`);
  });

  test('request ids are 128-bit and distinct', () => {
    const ids = new Set(Array.from({ length: 2000 }, () => requestIdHex(newRequestId())));
    assert.equal(ids.size, 2000);
    assert.equal(newRequestId().byteLength, 16);
  });

  test('malformed payloads are coded errors, with the id when it is readable', () => {
    assert.throws(() => decodeMessage(Buffer.from([0xff, 0xfe]), ['req']), code('MESH_BAD_REQUEST'));
    assert.throws(() => decodeMessage(Buffer.alloc(50_000, 0x81), ['req']), code('MESH_BAD_REQUEST'));
    assert.throws(() => decodeMessage(Buffer.from('5bffffffffffffffff00', 'hex'), ['req']), code('MESH_BAD_REQUEST'));
    assert.throws(() => decodeMessage(encodeMessage(req()), ['res']), code('MESH_BAD_REQUEST'));
    assert.throws(() => decodeMessage(Buffer.alloc(100), ['req'], 50), code('MESH_TOO_LARGE'));
    const m = req();
    try {
      decodeMessage(encodeMessage({ ...m, model: '../etc' }), ['req']);
      assert.fail('should throw');
    } catch (err) {
      assert.ok(err instanceof MeshError && err.code === 'MESH_BAD_REQUEST');
      assert.equal(requestIdHex(err.details!.id as Uint8Array), requestIdHex(m.id));
    }
    // After a failure the shared decoder still works.
    assert.equal(decodeMessage(encodeMessage(m), ['req']).model, 'kws');
  });

  test('nesting depth is checked before decoding, without building values', () => {
    const nest = (open: number, depth: number, leaf: number[]) => Buffer.from([...Array(depth).fill(open), ...leaf]);
    assert.equal(cborNestsDeeper(nest(0x81, 16, [0x01])), false);
    assert.equal(cborNestsDeeper(nest(0x81, 17, [0x01])), true);
    assert.equal(cborNestsDeeper(nest(0xa1, 17, [0x01])), true);
    assert.equal(cborNestsDeeper(nest(0xc6, 40, [0x00])), true);
    assert.equal(cborNestsDeeper(nest(0x9f, 20, [])), true);
    // Siblings do not add up: a long flat array of small arrays stays shallow.
    assert.equal(cborNestsDeeper(Buffer.from([0x98, 100, ...Array(100).fill([0x82, 0x01, 0x02]).flat()])), false);
    assert.equal(cborNestsDeeper(Buffer.from([0x9f, 0x80, 0x9f, 0xff, 0x5f, 0x41, 0x00, 0xff, 0xff])), false);
    // Real messages pass, including a status with models, shapes and a signature.
    const status = encodeMessage({
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: 'agent-1',
      state: 'online',
      ts: Date.now(),
      models: [
        {
          name: 'kws',
          version: '1',
          sha256: 'a'.repeat(64),
          priceMicros: 1,
          latencyMs: 0.1,
          inputs: [{ name: 'x', dtype: 'float32', shape: [1, 'n', 96] }],
          outputs: [],
        },
      ],
    });
    assert.equal(cborNestsDeeper(status), false);
    assert.equal(cborNestsDeeper(encodeMessage(req())), false);
    assert.throws(() => decodeMessage(Buffer.alloc(4 * 1024 * 1024 - 1, 0x81), ['req']), code('MESH_BAD_REQUEST'));
  });

  test('a bounded fuzz run of random and mutated payloads never crashes or hangs', () => {
    let seed = 7;
    const rand = () => {
      seed = (seed * 1103515245 + 12345) >>> 0;
      return seed / 2 ** 32;
    };
    const base = encodeMessage(req());
    const started = Date.now();
    let accepted = 0;
    for (let i = 0; i < 20_000; i++) {
      let bytes: Buffer;
      if (i % 2 === 0) {
        bytes = Buffer.from(base);
        for (let k = 0; k < 1 + Math.floor(rand() * 4); k++) bytes[Math.floor(rand() * bytes.length)] = Math.floor(rand() * 256);
      } else {
        bytes = Buffer.alloc(Math.floor(rand() * 64));
        for (let k = 0; k < bytes.length; k++) bytes[k] = Math.floor(rand() * 256);
      }
      try {
        const m = decodeMessage(bytes, ['req']);
        for (const [name, t] of Object.entries(m.inputs)) {
          try {
            decodeTensor(name, t);
          } catch (err) {
            assert.ok(err instanceof MeshError, String(err));
          }
        }
        accepted++;
      } catch (err) {
        assert.ok(err instanceof MeshError, `non-coded error: ${String(err)}`);
      }
    }
    assert.ok(accepted > 0, 'some mutations keep a valid message');
    assert.ok(Date.now() - started < 60_000);
  });
});

describe('errors, backoff, stats', () => {
  test('every code has a status and the error keeps its cause', () => {
    for (const [name, info] of Object.entries(ERROR_CODES)) {
      assert.match(name, /^MESH_[A-Z_]+$/);
      assert.ok(info.httpStatus >= 400 && info.httpStatus < 600);
    }
    const cause = new Error('root');
    const err = new MeshError('MESH_BUSY', 'full', { cause });
    assert.equal(err.cause, cause);
    assert.equal(err.httpStatus, 429);
    assert.ok(err.retryable);
    assert.deepEqual(JSON.parse(JSON.stringify(err)), { code: 'MESH_BUSY', message: 'full' });
  });

  test('reconnect delays grow, stay capped and are jittered', () => {
    assert.equal(
      reconnectDelayMs(0, { baseMs: 100 }, () => 0),
      50,
    );
    assert.equal(
      reconnectDelayMs(0, { baseMs: 100 }, () => 1),
      100,
    );
    assert.equal(
      reconnectDelayMs(3, { baseMs: 100 }, () => 1),
      800,
    );
    assert.equal(
      reconnectDelayMs(50, { baseMs: 100, maxMs: 5000 }, () => 1),
      5000,
    );
    // Defaults: the first retry within 100 ms, none later than 1 s (docs/operations.md, "Recovery").
    assert.ok(reconnectDelayMs(0, {}, () => 1) <= 100);
    assert.equal(
      reconnectDelayMs(50, {}, () => 1),
      1000,
    );
    assert.notEqual(
      reconnectDelayMs(4, {}, () => 0.1),
      reconnectDelayMs(4, {}, () => 0.9),
    );
  });

  test('percentiles use nearest rank', () => {
    const s = summarize(Array.from({ length: 100 }, (_, i) => 100 - i));
    assert.equal(s.p50, 50);
    assert.equal(s.p99, 99);
    assert.equal(s.max, 100);
    assert.ok(Number.isNaN(summarize([]).p50));
  });
});
