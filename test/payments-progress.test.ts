/**
 * Work paid as done (docs/settlement.md, "Progress receipts"): a real broker on port 0, a real agent that
 * runs the `spin` ONNX model (test/spin-model.ts) in units (manifest `units`, docs/agent.md), the SDK paying
 * with a wallet, and the escrow on a real local chain. A job of N units sends a progress message with a
 * signed `partial` receipt per unit; the payer pays each for the unit outputs it delivered, a cancel for
 * the units done when it arrived, a timeout adds 0, and what settles on chain is each unit once.
 */
import assert from 'node:assert/strict';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { type AgentHandle, startAgent } from '@edge-mesh/agent';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { generateIdentity, MeshError, RECEIPT_STATUS, type SignedReceipt, type Tensor } from '@edge-mesh/protocol';
import { connect, type Mesh } from '@edge-mesh/sdk';
import { brokerFor, quiet, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, registeredAgent, settleEntry } from './payer.ts';
import { SPIN_WIDTH, spinInputs, writeSpinModel } from './spin-model.ts';

let chain: LocalChain;
let deployment: MeshDeployment;

before(async () => {
  chain = await startLocalChain({ accounts: 5 });
  deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
});
after(() => chain?.close());

const UNIT = 3;
const BASE = 2;
const MAX_UNITS = 8;

/** N units of spin input: row i is a distinct vector (spin multiplies by the identity, so each output row equals its input row). */
const rows = (n: number, seed: number): Record<string, Tensor> => spinInputs(seed, n);

const statusOf = (r: SignedReceipt) => r.status;

test('a job in units is paid pro rata by progress receipts, a cancel for the units done, a timeout adds 0, and the chain pays each unit once', async (t) => {
  const payerWallet = chain.wallet(1);
  // An agent key registered for its payout; the app's owner funds its lane.
  const { identity: agentIdentity, payout, domain } = await registeredAgent(deployment, chain.wallet(2));
  await fundOwnLane(payerWallet, deployment.escrow, payout, 1_000_000n);

  // The models folder: spin, run in units of one row, written by this test.
  const modelsDir = await tempDir(t, 'edge-mesh-units-');
  const entry = await writeSpinModel(modelsDir, {
    name: 'spin-units',
    priceMicros: UNIT,
    units: { maxUnits: MAX_UNITS },
    notes: undefined,
  });
  await writeFile(path.join(modelsDir, 'manifest.json'), JSON.stringify({ models: [entry] }));

  const broker = await brokerFor(t);
  const agent: AgentHandle = await startAgent({
    brokerUrl: broker.url,
    modelsDir,
    identity: agentIdentity,
    workers: 1,
    inlineMaxMs: 0,
    // The job whose deadline passes after some progress must be taken on, not refused at admission.
    admission: false,
    logger: quiet,
    payment: {
      payout,
      domain,
      dataDir: await tempDir(t),
      provider: chain.provider,
      fundsPollMs: 100,
      prices: { 'spin-units': { baseMicros: BASE } },
    },
  });
  t.after(() => agent.close());
  const mesh: Mesh = await connect({
    brokerUrl: broker.url,
    identity: generateIdentity('app'),
    logger: quiet,
    payment: { signer: payerWallet, domain, voucherDelayMs: 5 },
  });
  t.after(() => mesh.close());
  await mesh.waitForModel('spin-units');
  const journal = () => agent.payments!.receipts(payerWallet.address);
  const owed = () => mesh.lanes()[0]?.owedMicros ?? 0;

  // 1. Five units run to the end: four progress messages (units 1–4) with their rows, then the result.
  const seen: { units: number; rows: number }[] = [];
  const input = rows(5, 1);
  const done = await mesh.infer('spin-units', input, {
    deadlineMs: 20_000,
    onProgress: (p) => seen.push({ units: p.units, rows: p.outputs.y!.shape[0]! }),
  });
  assert.deepEqual(
    seen,
    [1, 2, 3, 4].map((units) => ({ units, rows: 1 })),
  );
  assert.deepEqual(done.outputs.y!.shape, [5, SPIN_WIDTH]);
  const y = done.outputs.y!.data as Float32Array;
  const x = input.x!.data as Float32Array;
  assert.ok(
    x.every((v, i) => Math.abs(v - y[i]!) < 1e-5),
    'every unit ran: its output row is its input row',
  );
  // The answer's receipt follows it (issued with those of the next few ms): here once the app has it.
  assert.ok(await mesh.receiptsIn(5_000), "the answer's receipt came");
  let receipts = await journal();
  assert.deepEqual(receipts.map(statusOf), [1, 1, 1, 1, 0].map(Number));
  assert.deepEqual(
    receipts.map((r) => r.price),
    [UNIT, UNIT, UNIT, UNIT, BASE + UNIT],
  );
  const whole = BASE + 5 * UNIT;
  await waitFor(() => owed() === whole, 5_000, 'the payer owing the whole job, each unit once');
  assert.equal(mesh.lanes()[0]!.refused, 0);

  // 2. A cancel mid-job: the app aborts at the first progress message; the agent charges the units done
  // when the cancel arrived, whose outputs it sends before the cancelled receipt.
  const controller = new AbortController();
  let delivered = 0;
  await assert.rejects(
    mesh.infer('spin-units', rows(MAX_UNITS, 2), {
      deadlineMs: 20_000,
      signal: controller.signal,
      onProgress: (p) => {
        delivered += p.outputs.y!.shape[0]!;
        controller.abort();
      },
    }),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_CANCELLED',
  );
  await waitFor(() => agent.loadReport().inFlight === 0 && agent.loadReport().queued === 0, 10_000, 'the cancelled job ending');
  // One progress receipt or more: a busy machine may run a unit more before the cancel arrives.
  const cancelledBy = Date.now() + 10_000;
  for (;;) {
    const journaled = await journal();
    if (journaled.at(-1)?.status === RECEIPT_STATUS.cancelled && mesh.lanes()[0]!.receipts === journaled.length) break;
    assert.ok(
      Date.now() < cancelledBy,
      `the cancelled receipt journaled and every receipt linked: ${journaled.length} journaled, ${mesh.lanes()[0]!.receipts} linked`,
    );
    await new Promise((r) => setTimeout(r, 20));
  }
  receipts = await journal();
  const cancelled = receipts.at(-1)!;
  assert.equal(cancelled.status, RECEIPT_STATUS.cancelled);
  const unitsAtCancel = cancelled.unitsUsed;
  assert.ok(unitsAtCancel >= 1 && unitsAtCancel < MAX_UNITS, `cancelled after ${unitsAtCancel} of ${MAX_UNITS} units`);
  assert.equal(cancelled.price, 0, 'the cancel adds nothing to the progress already charged (minCharge 0)');
  const partials = receipts.slice(5, -1);
  assert.ok(partials.every((r) => r.status === RECEIPT_STATUS.partial));
  assert.equal(partials.at(-1)!.unitsUsed, unitsAtCancel);
  await waitFor(() => owed() === whole + UNIT * unitsAtCancel, 5_000, 'the payer owing the units done at the cancel');
  assert.equal(mesh.lanes()[0]!.refused, 0);
  assert.ok(delivered >= 1);

  // 3. A job whose deadline passes after some progress: the progress that came in time is paid, the timeout adds 0.
  const before = owed();
  const late = await mesh.infer('spin-units', rows(MAX_UNITS, 3), { deadlineMs: 60 }).then(
    () => undefined,
    (err: unknown) => err,
  );
  assert.ok(late instanceof MeshError && late.code === 'MESH_DEADLINE_EXCEEDED', String(late));
  // The job can be in neither the queue nor a run while the agent admits it on its lane (asynchronously, when it
  // cannot be admitted at once), so an idle load report alone does not say it has ended: wait for its timeout receipt in the journal, and for the app to have
  // linked every receipt journaled.
  const until = Date.now() + 10_000;
  for (;;) {
    const journaled = await journal();
    const idle = agent.loadReport().inFlight === 0 && agent.loadReport().queued === 0;
    if (idle && journaled.at(-1)?.status === RECEIPT_STATUS.timeout && mesh.lanes()[0]!.receipts === journaled.length) break;
    assert.ok(
      Date.now() < until,
      `the late job ending and every receipt linked: ${journaled.length} journaled (last status ${journaled.at(-1)?.status}), ${mesh.lanes()[0]!.receipts} linked`,
    );
    await new Promise((r) => setTimeout(r, 20));
  }
  receipts = await journal();
  const last = receipts.at(-1)!;
  assert.equal(last.status, RECEIPT_STATUS.timeout);
  assert.equal(last.price, 0);
  const lateJob = receipts.filter((r) => Buffer.from(r.requestId).equals(Buffer.from(last.requestId)));
  const charged = lateJob.reduce((sum, r) => sum + r.price, 0);
  const paidLate = owed() - before;
  assert.ok(paidLate <= charged && paidLate % UNIT === 0, `paid ${paidLate} of ${charged} charged by progress`);
  assert.ok(paidLate < BASE + MAX_UNITS * UNIT, 'a job that timed out is never paid in full');

  // 4. More units than the model takes: a coded refusal, no receipt, and the agent goes on serving.
  await assert.rejects(
    mesh.infer('spin-units', rows(MAX_UNITS + 1, 4), { deadlineMs: 5_000 }),
    (err: unknown) => err instanceof MeshError && err.code === 'MESH_BAD_INPUT',
  );
  assert.equal((await journal()).length, receipts.length);
  await mesh.infer('spin-units', rows(2, 5), { deadlineMs: 20_000 });
  // The answer's receipt follows it.
  assert.ok(await mesh.receiptsIn());
  const total = owed();
  assert.equal(total, whole + UNIT * unitsAtCancel + paidLate + BASE + 2 * UNIT);

  // 5. The chain pays what the payer owes, each unit once: the agent's best voucher settles exactly that.
  await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === total, 5_000, 'the last voucher');
  const best = agent.payments!.lanes()[0]!.voucher!;
  const relayer = await EscrowClient.connect({ runner: chain.wallet(3), escrow: deployment.escrow });
  const outcome = await relayer.settle(payout, [settleEntry(payout, best)]);
  assert.deepEqual(outcome.skipped, []);
  assert.equal(outcome.paid, BigInt(total));
  assert.equal((await relayer.laneOf(payerWallet.address, payout)).settled, BigInt(total));
});
