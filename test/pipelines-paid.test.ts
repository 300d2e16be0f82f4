/**
 * Paid pipelines (docs/pipelines.md, "Paying for stages"): every model stage is an ordinary paid request, so each
 * stage is receipted once by the agent that served it and paid with vouchers; an answer the pipeline refuses (a
 * dishonest stage agent's wrong-shaped outputs) is receipted but not paid. A real broker, real agents that take
 * payment on a real local chain, the SDK paying with a wallet.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { after, before, type TestContext, test } from 'node:test';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { ensurePipelineModelsFolder } from '@edge-mesh/demo';
import type { Tensor } from '@edge-mesh/protocol';
import { agentFor, brokerFor, meshFor, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, registeredAgent } from './payer.ts';
import { flattenModel } from './spin-model.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let fullDir: string;

before(async () => {
  fullDir = path.join(os.tmpdir(), 'edge-mesh-test-pipeline-models');
  await ensurePipelineModelsFolder(fullDir, { verify: false });
  chain = await startLocalChain({ accounts: 6 });
  deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
});
after(() => chain?.close());

type Entry = { name: string; file: string; sha256: string; priceMicros: number };

async function subsetDir(t: TestContext, models: readonly string[]): Promise<string> {
  const manifest = JSON.parse(await readFile(path.join(fullDir, 'manifest.json'), 'utf8')) as { models: Entry[] };
  const dir = await tempDir(t, 'edge-mesh-paid-');
  const picked = manifest.models.filter((m) => models.includes(m.name));
  for (const m of picked) await copyFile(path.join(fullDir, m.file), path.join(dir, m.file));
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: picked }));
  return dir;
}

/** `oww-embedding` as a model that flattens its input: its answers have the wrong shape, at the real one's price. */
async function lyingEmbeddingDir(t: TestContext, priceMicros: number): Promise<string> {
  const dir = await tempDir(t, 'edge-mesh-liar-');
  const model = flattenModel('input_1', 'conv2d_19', [16, 76, 32, 1]);
  await writeFile(path.join(dir, 'flatten.onnx'), model);
  const entry = {
    name: 'oww-embedding',
    version: '1',
    file: 'flatten.onnx',
    sha256: createHash('sha256').update(model).digest('hex'),
    priceMicros,
    warmup: { input_1: { shape: [16, 76, 32, 1] } },
  };
  await writeFile(path.join(dir, 'manifest.json'), JSON.stringify({ models: [entry] }));
  return dir;
}

function audio(): Tensor {
  const n = 32_000;
  const data = new Int16Array(n);
  for (let i = 0; i < n; i++) data[i] = Math.round(4_000 * Math.sin((2 * Math.PI * 180 * i) / 16_000) * Math.sin((Math.PI * i) / n));
  return { dtype: 'int16', shape: [1, n], data };
}

test('each stage is receipted once by its agent and paid; a stage answer the pipeline refuses is not paid', async (t) => {
  const payer = chain.wallet(1);
  const agents = await Promise.all([2, 3, 4].map((i) => registeredAgent(deployment, chain.wallet(i))));
  for (const a of agents) await fundOwnLane(payer, deployment.escrow, a.payout, 1_000_000n);
  const manifest = JSON.parse(await readFile(path.join(fullDir, 'manifest.json'), 'utf8')) as { models: Entry[] };
  const price = (name: string) => manifest.models.find((m) => m.name === name)!.priceMicros;

  const broker = await brokerFor(t);
  const paid = async (i: number, modelsDir: string) => {
    const { identity, payout, domain } = agents[i]!;
    return agentFor(t, {
      brokerUrl: broker.url,
      identity,
      modelsDir,
      payment: { payout, domain, dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100 },
    });
  };
  const a = await paid(0, await subsetDir(t, ['oww-melspectrogram', 'oww-hey-jarvis']));
  const b = await paid(1, await subsetDir(t, ['oww-embedding']));
  const liar = await paid(2, await lyingEmbeddingDir(t, price('oww-embedding')));
  const domain = agents[0]!.domain;
  const mesh = await meshFor(t, { brokerUrl: broker.url, payment: { signer: payer, domain, dataDir: await tempDir(t) } });
  for (const m of ['oww-melspectrogram', 'oww-hey-jarvis']) await mesh.waitForModel(m, 20_000);
  await mesh.waitForModel('oww-embedding', 20_000, 2);

  const runs = 4;
  let refusedRuns = 0;
  for (let i = 0; i < runs; i++) {
    const result = await mesh.pipeline('wakeword', { audio: audio() }, { deadlineMs: 20_000 });
    assert.deepEqual(
      result.stages.map((s) => s.agentId),
      [a.id, b.id, a.id],
    );
    for (const r of result.rejected) {
      assert.equal(r.agentId, liar.id);
      assert.equal(r.error.code, 'MESH_BAD_TENSOR');
    }
    refusedRuns += result.rejected.length;
  }
  // The liar looks fastest: it is tried first while it is not excluded (each pipeline run excludes it afresh).
  assert.ok(refusedRuns >= 1, 'the liar was tried');

  const lane = (agentId: string) => mesh.lanes().find((l) => l.agentId === agentId);
  const perStage = { a: price('oww-melspectrogram') + price('oww-hey-jarvis'), b: price('oww-embedding') };
  // Each stage receipted once, by the agent that served it, and paid in full.
  await waitFor(() => lane(a.id)?.paidMicros === runs * perStage.a && lane(b.id)?.paidMicros === runs * perStage.b, 20_000, 'stages paid');
  assert.equal(lane(a.id)!.receipts, 2 * runs);
  assert.equal(lane(b.id)!.receipts, runs);
  assert.equal(lane(a.id)!.refused + lane(b.id)!.refused, 0);
  // The liar signed a receipt for every answer, and none of them is owed.
  await waitFor(() => (lane(liar.id)?.receipts ?? 0) === refusedRuns, 10_000, "the liar's receipts linked");
  assert.equal(lane(liar.id)!.owedMicros, 0);
  assert.equal(lane(liar.id)!.refused, refusedRuns);
  assert.equal(lane(liar.id)!.lastRefusal, 'outputs');
  assert.equal(lane(liar.id)!.paidMicros, 0);
});
