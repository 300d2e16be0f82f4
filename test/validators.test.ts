/**
 * The ahead-of-time validators (docs/protocol.md, "Validation"): the committed generated modules are what
 * the generator gives today, their schemas equal the TypeBox ones, their checks and error messages agree
 * with TypeBox's own compiler on valid and mutated values, and the running packages load no TypeBox.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import * as generated from '@edge-mesh/protocol';
import {
  admit,
  decodeMessage,
  encodeMessage,
  generateIdentity,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  signQuote,
  type Validator,
} from '@edge-mesh/protocol';
import type { TSchema } from '@sinclair/typebox';
import { TypeCompiler } from '@sinclair/typebox/compiler';
import * as manifestGenerated from '../edge-agent/src/manifest.generated.ts';
import * as manifestSchemas from '../edge-agent/src/manifest-schema.ts';
import { render, TARGETS } from '../protocol/scripts/generate-validators.ts';
import * as schemas from '../protocol/src/schemas.ts';
import { ROOT, tempDir } from './helpers.ts';

const run = promisify(execFile);

test('the committed generated validators are what the generator gives (run npm run generate)', async () => {
  for (const target of TARGETS) {
    assert.equal(await readFile(path.join(ROOT, target.out), 'utf8'), await render(target), `${target.out} is stale`);
  }
});

/** [name, TypeBox schema, generated schema, generated validator] for every schema of both modules. */
function pairs(): [string, TSchema, TSchema, Validator<unknown>][] {
  const out: [string, TSchema, TSchema, Validator<unknown>][] = [];
  for (const [source, gen] of [
    [schemas, generated],
    [manifestSchemas, manifestGenerated],
  ] as [Record<string, unknown>, Record<string, unknown>][]) {
    for (const [name, schema] of Object.entries(source)) {
      if (!name.endsWith('Schema')) continue;
      const check = gen[`check${name.slice(0, -'Schema'.length)}`] as Validator<unknown> | undefined;
      assert.ok(check, `no generated checker for ${name}`);
      out.push([name, schema as TSchema, gen[name] as TSchema, check]);
    }
  }
  return out;
}

test('generated schemas equal the TypeBox schemas, Kind and Optional markers included', () => {
  const all = pairs();
  assert.ok(all.length >= 30, `only ${all.length} schemas`);
  for (const [name, schema, plain, check] of all) {
    assert.deepStrictEqual(plain, schema, name);
    assert.equal(check.schema, plain, name);
  }
});

/** Valid values for the schemas the mesh checks on its running path. */
function samples(): Record<string, unknown> {
  const agent = generateIdentity('agent');
  const operator = generateIdentity('operator');
  const bytes = (n: number, fill = 7) => new Uint8Array(n).fill(fill);
  const address = `0x${'ab'.repeat(20)}`;
  const receipt = {
    v: 1,
    chainId: 31337,
    escrow: address,
    payer: address,
    agentKey: bytes(32),
    seq: 3,
    requestId: bytes(16),
    modelHash: bytes(32),
    inputHash: bytes(32),
    outputHash: bytes(32),
    status: 0,
    unitsUsed: 1,
    price: 10,
    cumulative: 30,
    startedAt: 1,
    finishedAt: 2,
    prevReceipt: bytes(32),
    sig: bytes(64),
  };
  const voucher = { v: 1, kind: 'voucher', payer: address, agent: address, cumulative: 5, receiptsRoot: bytes(32), sig: bytes(65), seq: 2 };
  const tensor = { dtype: 'float32', shape: [1, 2], data: bytes(8) };
  const model = {
    name: 'kws',
    version: '1',
    sha256: 'a'.repeat(64),
    priceMicros: 10,
    latencyMs: 1.5,
    inputs: [{ name: 'x', dtype: 'float32', shape: [1, 'n', 96] }],
    outputs: [{ name: 'y', dtype: 'float32', shape: [1, 1] }],
  };
  return {
    InferRequestSchema: {
      v: PROTOCOL_VERSION,
      kind: 'req',
      id: newRequestId(),
      deadline: Date.now() + 50,
      model: 'kws',
      inputs: { x: tensor },
      pay: { payer: address, grant: { payer: address, agent: address, client: 'app-abc', issuedAt: 1, sig: bytes(65) }, voucher },
    },
    InferReplySchema: {
      v: 1,
      kind: 'res',
      id: bytes(16),
      agent: 'agent-abc',
      model: 'kws',
      outputs: { y: tensor },
      queueMs: 0,
      execMs: 1.25,
      receipt,
      lane: { seq: 3, paid: 20 },
    },
    ErrorReplySchema: { v: 1, kind: 'err', id: bytes(16), agent: 'agent-abc', code: 'MESH_BUSY', message: 'busy', receipt },
    CancelSchema: { v: 1, kind: 'cancel', id: bytes(16) },
    AgentStatusSchema: {
      v: 1,
      kind: 'status',
      agent: agent.id,
      state: 'online',
      ts: 1,
      session: 's',
      models: [model],
      hardware: { platform: 'linux', arch: 'x64', cpus: 4, cpuModel: 'cpu', memoryMb: 1024 },
      providers: ['cpu'],
      workers: 1,
      queueLimit: 8,
      publicKey: agent.publicKey,
      quote: signQuote(agent, { payout: address, chainId: 1, escrow: address, issuedAt: 1, validUntil: 2, models: [] }),
      sig: bytes(64),
    },
    AgentLoadSchema: {
      v: 1,
      kind: 'load',
      agent: 'agent-abc',
      ts: 1,
      seq: 2,
      queued: 0,
      inFlight: 1,
      workers: 1,
      models: { kws: { queued: 0, inFlight: 1, serviceMs: 2, served: 9, failed: 0 } },
    },
    RouteRequestSchema: { v: 1, kind: 'route', id: bytes(16), model: 'kws', budgetMs: 50, bytes: 100, exclude: ['agent-abc'] },
    LeaseSchema: {
      v: 1,
      kind: 'lease',
      id: bytes(16),
      router: 'router-abc',
      model: 'kws',
      agents: [{ agent: 'agent-abc', predictedMs: 3, serviceMs: 2, timeoutMs: 30, hedgeAfterMs: 10 }],
      ttlMs: 1000,
    },
    VoucherMessageSchema: voucher,
    ResyncSchema: { v: 1, kind: 'resync', payer: address, afterSeq: 0 },
    ReceiptBatchSchema: { v: 1, kind: 'receipts', agent: 'agent-abc', payer: address, receipts: [receipt], lane: { seq: 3, paid: 20 } },
    AdminAckSchema: { v: 1, kind: 'ack', id: 'agent-abc', ok: false, code: 'MESH_UNAUTHORIZED', message: 'no' },
    SignedReceiptSchema: receipt,
    SignedRecordSchema: admit(operator, agent),
    KeyFileSchema: { v: 1, kind: 'edge-mesh-key', role: 'app', id: 'app-x', publicKey: 'k', seed: 's' },
    ManifestSchema: {
      models: [
        { name: 'kws', version: '1', file: 'kws.onnx', sha256: 'b'.repeat(64), priceMicros: 0, warmup: { sr: { shape: [], fill: 16000 } } },
      ],
    },
  };
}

/** Small deterministic random source, so a failure reproduces. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const ODD_VALUES: unknown[] = [
  undefined,
  null,
  true,
  0,
  -1,
  1.5,
  Number.NaN,
  Number.POSITIVE_INFINITY,
  2 ** 53,
  '',
  'x'.repeat(70),
  'MESH_X',
  'agent-abc',
  '0xzz',
  [],
  [1, 2, 3, 4, 5, 6, 7, 8, 9],
  {},
  new Uint8Array(0),
  new Uint8Array(16),
  new Uint8Array(65),
  new Date(0),
];

/** A copy of `value` with one randomly chosen place replaced, removed or given an extra key. */
function mutate(value: unknown, random: () => number): unknown {
  if (value instanceof Uint8Array || typeof value !== 'object' || value === null || random() < 0.25) {
    return ODD_VALUES[Math.floor(random() * ODD_VALUES.length)];
  }
  if (Array.isArray(value)) {
    const copy = [...value];
    if (copy.length === 0 || random() < 0.2) copy.push(ODD_VALUES[Math.floor(random() * ODD_VALUES.length)]);
    else {
      const i = Math.floor(random() * copy.length);
      copy[i] = mutate(copy[i], random);
    }
    return copy;
  }
  const copy: Record<string, unknown> = { ...(value as Record<string, unknown>) };
  const keys = Object.keys(copy);
  const roll = random();
  if (roll < 0.1) copy.extra = 1;
  else if (roll < 0.2 && keys.length > 0) delete copy[keys[Math.floor(random() * keys.length)]!];
  else if (keys.length > 0) {
    const key = keys[Math.floor(random() * keys.length)]!;
    copy[key] = mutate(copy[key], random);
  }
  return copy;
}

test('generated checks and their error messages agree with TypeBox on valid and mutated values', () => {
  const random = rng(20261204);
  const values = samples();
  const byName = new Map(pairs().map(([name, schema, , check]) => [name, { schema, check }]));
  let refused = 0;
  for (const [name, valid] of Object.entries(values)) {
    const pair = byName.get(name);
    assert.ok(pair, name);
    const typebox = TypeCompiler.Compile(pair.schema);
    assert.ok(pair.check.Check(valid), `${name}: the sample is valid (${[...typebox.Errors(valid)].map((e) => e.path).join(', ')})`);
    for (let i = 0; i < 400; i++) {
      let value: unknown = valid;
      for (let depth = 1 + Math.floor(random() * 3); depth > 0; depth--) value = mutate(value, random);
      const ours: boolean = pair.check.Check(value);
      assert.equal(ours, typebox.Check(value), `${name}: check of mutation ${i}`);
      if (!ours) {
        refused++;
        const a = pair.check.Errors(value).First();
        const b = typebox.Errors(value).First();
        assert.deepEqual([a?.path, a?.message, a?.type], [b?.path, b?.message, b?.type], `${name}: first error of mutation ${i}`);
      }
    }
  }
  assert.ok(refused > 1000, `only ${refused} refused mutations`);
});

test('a refused message still gets MESH_BAD_REQUEST saying where and what, in TypeBox words', () => {
  const bad = encodeMessage({ v: 1, kind: 'cancel', id: new Uint8Array(3) } as never);
  assert.throws(
    () => decodeMessage(bad, ['cancel']),
    (err: unknown) =>
      err instanceof MeshError &&
      err.code === 'MESH_BAD_REQUEST' &&
      err.message === 'invalid cancel message at /id: Expected byte length greater or equal to 16',
  );
});

/** Loads the packages in a fresh process (run from the repository) and lists every module it resolved or required. */
const TRACE = `
import { register, createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
const out = process.argv[1];
register('data:text/javascript,' + encodeURIComponent(\`
  import { appendFileSync } from 'node:fs';
  export async function resolve(specifier, context, next) {
    const r = await next(specifier, context);
    appendFileSync(\${JSON.stringify(out)}, r.url + '\\\\n');
    return r;
  }\`));
const protocol = await import('@edge-mesh/protocol');
await import('@edge-mesh/client');
await import('@edge-mesh/sdk');
await import('@edge-mesh/agent');
const id = protocol.newRequestId();
protocol.decodeMessage(protocol.encodeMessage({ v: 1, kind: 'cancel', id }), ['cancel']);
const require = createRequire(process.cwd() + '/');
const required = Object.keys(require.cache);
let refused = '';
if (process.argv[2] === 'bad') {
  try { protocol.decodeMessage(protocol.encodeMessage({ v: 1, kind: 'cancel', id: 'x' }), ['cancel']); } catch (err) { refused = err.message; }
}
const after = Object.keys(require.cache);
process.stdout.write(JSON.stringify({ resolved: readFileSync(out, 'utf8').split('\\n'), required, after, refused }));
`;

test('the protocol, client, SDK and agent packages load no TypeBox until a check fails', async (t) => {
  const dir = await tempDir(t, 'edge-mesh-trace-');
  const trace = async (mode: string) => {
    const out = path.join(dir, `${mode}.txt`);
    await writeFile(out, '');
    const { stdout } = await run(
      process.execPath,
      ['--conditions=@edge-mesh/source', '--import', 'tsx', '--input-type=module', '--eval', TRACE, out, mode],
      {
        cwd: ROOT,
        timeout: 60_000,
      },
    );
    return JSON.parse(stdout) as { resolved: string[]; required: string[]; after: string[]; refused: string };
  };
  const good = await trace('good');
  assert.ok(
    good.resolved.some((url) => url.includes('validators.generated')),
    'the trace sees the generated validators',
  );
  assert.deepEqual(
    [...good.resolved, ...good.required, ...good.after].filter((file) => file.includes('typebox') || file.includes('schemas.ts')),
    [],
  );
  const bad = await trace('bad');
  assert.match(bad.refused, /^invalid cancel message at \/id: /);
  assert.ok(
    bad.after.some((file) => file.includes('@sinclair/typebox')),
    'describing the refusal loaded TypeBox',
  );
});
