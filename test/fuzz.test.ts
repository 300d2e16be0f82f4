/**
 * Bounded fuzzing of the decoders every received byte goes through: the CBOR envelope with its
 * schemas, and the tensor rules. 100,000+ inputs, seeded so a failure reproduces; every input must
 * end in a decoded message or a MeshError, never a crash, a non-coded error or a hang.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { mulberry32 } from '@edge-mesh/client';
import {
  decodeMessage,
  decodeTensor,
  decodeTensorMap,
  encodeMessage,
  encodeTensor,
  type InferRequest,
  MeshError,
  type MessageKind,
  newRequestId,
  PROTOCOL_VERSION,
} from '@edge-mesh/protocol';
import { encode as cborgEncode } from 'cborg';

const KINDS: MessageKind[] = ['req', 'res', 'err', 'cancel', 'status', 'load'];
const plainCbor = { encode: (value: unknown) => Buffer.from(cborgEncode(value)) };

function rng(seed: number) {
  const next = mulberry32(seed);
  return { next, int: (n: number) => Math.floor(next() * n) };
}

function validRequest(r: ReturnType<typeof rng>): InferRequest {
  const n = 1 + r.int(16);
  return {
    v: PROTOCOL_VERSION,
    kind: 'req',
    id: newRequestId(),
    deadline: Date.now() + 1000,
    model: 'kws',
    inputs: { x: encodeTensor({ dtype: 'float32', shape: [1, n], data: Float32Array.from({ length: n }, () => r.next() * 2 - 1) }) },
  };
}

/** Hand-built CBOR heads that stress a decoder: huge declared lengths, deep nesting, odd tags. */
function hostileCbor(r: ReturnType<typeof rng>): Buffer {
  switch (r.int(6)) {
    case 0: // byte string / text / array / map declaring up to 2^64-1 items with no body
      return Buffer.from([[0x5b, 0x7b, 0x9b, 0xbb][r.int(4)]!, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff - r.int(4)]);
    case 1: // deep nesting of arrays or maps
      return Buffer.alloc(1 + r.int(20_000), [0x81, 0xa1][r.int(2)]!);
    case 2: // indefinite-length containers never closed
      return Buffer.concat([Buffer.alloc(1 + r.int(5000), [0x9f, 0xbf, 0x5f][r.int(3)]!), Buffer.from([0x01])]);
    case 3: // tags around tags
      return Buffer.concat([Buffer.alloc(1 + r.int(2000), 0xc6 + r.int(10)), Buffer.from([0x00])]);
    case 4: // a map whose values are huge typed-array tags over tiny bodies
      return Buffer.from([0xa1, 0x61, 0x78, 0xd8, 0x40 + r.int(24), 0x5a, 0x7f, 0xff, 0xff, 0xff, 0x00]);
    default: // a valid-looking request map with every field of the wrong type
      return plainCbor.encode({ v: r.next(), kind: 'req', id: 'x'.repeat(r.int(40)), deadline: {}, model: [], inputs: 'nope' });
  }
}

function mutate(bytes: Buffer, r: ReturnType<typeof rng>): Buffer {
  const out = Buffer.from(bytes);
  switch (r.int(4)) {
    case 0:
      for (let k = 0; k < 1 + r.int(6); k++) out[r.int(out.length)] = r.int(256);
      return out;
    case 1:
      return out.subarray(0, r.int(out.length));
    case 2: {
      const at = r.int(out.length);
      return Buffer.concat([out.subarray(0, at), Buffer.from(Array.from({ length: 1 + r.int(8) }, () => r.int(256))), out.subarray(at)]);
    }
    default: {
      const at = r.int(out.length);
      out[at] = out[at]! ^ (1 << r.int(8));
      return out;
    }
  }
}

test('100,000+ fuzzed payloads through the envelope and tensor decoders: coded errors only, no hang', () => {
  const r = rng(20261125);
  const started = Date.now();
  const outcome = { decoded: 0, coded: 0, tensorsChecked: 0 };
  const base = [encodeMessage(validRequest(r)), encodeMessage(validRequest(r))];
  const total = 120_000;
  for (let i = 0; i < total; i++) {
    let payload: Buffer;
    const mode = i % 4;
    if (mode === 0) payload = mutate(base[i % 2]!, r);
    else if (mode === 1) payload = Buffer.from(Array.from({ length: r.int(96) }, () => r.int(256)));
    else if (mode === 2) payload = hostileCbor(r);
    else payload = mutate(encodeMessage(validRequest(r)), r);
    try {
      const m = decodeMessage(payload, KINDS);
      outcome.decoded++;
      if (m.kind === 'req' || m.kind === 'res') {
        const tensors = m.kind === 'req' ? m.inputs : m.outputs;
        try {
          decodeTensorMap(tensors, 1 << 16);
          outcome.tensorsChecked++;
        } catch (err) {
          assert.ok(err instanceof MeshError, `tensor decoder threw a non-coded error: ${String(err)}`);
          outcome.coded++;
        }
      }
    } catch (err) {
      assert.ok(err instanceof MeshError, `envelope decoder threw a non-coded error on input ${i}: ${String(err)}`);
      outcome.coded++;
    }
  }
  const elapsedMs = Date.now() - started;
  assert.ok(outcome.decoded > 1000, `mutations that stay valid exercise the tensor rules (${outcome.decoded})`);
  assert.ok(outcome.coded > total / 2);
  // Generous: about 10 s here; a hang or quadratic blow-up would take far longer.
  assert.ok(elapsedMs < 120_000, `fuzz run took ${elapsedMs} ms`);
  // The shared decoder still works after all that.
  const good = validRequest(r);
  assert.equal(decodeMessage(encodeMessage(good), ['req']).model, 'kws');
});

test('random tensor descriptors: every outcome is a valid aligned tensor or a coded error', () => {
  const r = rng(7);
  const dtypes = ['float32', 'float64', 'int64', 'uint8', 'bool', 'float16', 'int32', 'string', '__proto__', '', 'FLOAT32'];
  for (let i = 0; i < 100_000; i++) {
    const rank = r.int(10);
    const shape = Array.from({ length: rank }, () => (r.next() < 0.05 ? [-1, 1.5, 2 ** 53, Number.NaN][r.int(4)]! : r.int(5)));
    const bytes =
      r.next() < 0.5 ? r.int(200) : shape.reduce((a, b) => a * (Number.isFinite(b) ? Math.max(0, b) : 1), 1) * [1, 2, 4, 8][r.int(4)]!;
    const wire = { dtype: dtypes[r.int(dtypes.length)]!, shape, data: new Uint8Array(Math.min(bytes, 4096)).subarray(r.int(3)) };
    try {
      const t = decodeTensor('x', wire, 4096);
      assert.equal(t.data.byteOffset, 0);
      assert.equal(t.data.byteLength, wire.data.byteLength);
    } catch (err) {
      assert.ok(err instanceof MeshError, String(err));
    }
  }
});
