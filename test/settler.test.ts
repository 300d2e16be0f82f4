/**
 * The agent's settlement relayer on a real local chain, a real broker and real ONNX agents: each
 * trigger (threshold, interval, expiry, withdraw request), exact payment of the ok receipts, and
 * kill -9 of the relayer between its intent and its transaction, and right after sending it.
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, type TestContext, test } from 'node:test';
import type { SettlerOptions } from '@edge-mesh/agent';
import { ESCROW_ABI, EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { generateIdentity, MeshError } from '@edge-mesh/protocol';
import { startRouter } from '@edge-mesh/router';
import { ethers } from 'ethers';
import { agentFor, brokerFor, meshFor, quiet, spawnAgent, tempDir, waitFor } from './helpers.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextPayer = 1;
let nextRelayer = 10;

async function fundedLane(payout: string, amount = 1_000_000n): Promise<ethers.Wallet> {
  const wallet = chain.wallet(nextPayer++);
  const payer = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
  await payer.mint(wallet.address, amount);
  await payer.fund(payout, amount);
  return wallet;
}

async function paidMesh(
  t: TestContext,
  brokerUrl: string,
  signer: ethers.Wallet,
  extra: { voucherTtlS?: number; dataDir?: string; wait?: boolean } = {},
) {
  const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
  const mesh = await meshFor(t, {
    brokerUrl,
    maxMessageBytes: 16 << 20,
    payment: {
      signer,
      domain,
      dataDir: extra.dataDir ?? (await tempDir(t)),
      ...(extra.voucherTtlS ? { voucherTtlS: extra.voucherTtlS } : {}),
    },
  });
  if (extra.wait !== false) await mesh.waitForModel('kws');
  return mesh;
}

async function settlerAgent(t: TestContext, brokerUrl: string, settle: Partial<SettlerOptions>) {
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
  // Every model on the one worker, one job at a time, so a wake-word request can wait behind a detection
  // (inline, it would not).
  const agent = await agentFor(t, {
    brokerUrl,
    pipelineDepth: 1,
    inlineMaxMs: 0,
    maxMessageBytes: 16 << 20,
    payment: { payout, domain, dataDir: await tempDir(t), settle: { runner: chain.wallet(nextRelayer++), checkEveryMs: 100, ...settle } },
  });
  return { agent, payout };
}

async function serve(mesh: Awaited<ReturnType<typeof paidMesh>>, n: number, agentId?: string): Promise<void> {
  for (let i = 0; i < n; i++) await mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 5_000, ...(agentId ? { agentId } : {}) });
}

describe('settlement relayer', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 20 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('the threshold triggers a settlement; the payout holds exactly the ok receipts; timed-out work costs 0', async (t) => {
    const broker = await brokerFor(t, { maxPacketBytes: 16 << 20 });
    const { agent, payout } = await settlerAgent(t, broker.url, { thresholdMicros: 20, maxIntervalMs: 3_600_000 });
    const payer = await fundedLane(payout);
    const mesh = await paidMesh(t, broker.url, payer);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });

    await serve(mesh, 4); // 8 micro-dollars: under the threshold
    await new Promise((r) => setTimeout(r, 600));
    assert.equal(agent.payments!.settler!.counters.txs, 0, 'nothing settles below the threshold');
    // A large detection holds the worker; a request behind it times out in the queue and is billed 0.
    const big = mesh.infer(
      'ocr-det',
      { x: { dtype: 'float32', shape: [1, 3, 960, 960], data: new Float32Array(3 * 960 * 960) } },
      { deadlineMs: 20_000 },
    );
    await waitFor(() => agent.loadReport().inFlight === 1, 10_000, 'the detection running');
    await assert.rejects(
      mesh.infer('kws', sampleInputs('kws', 99), { deadlineMs: 40 }),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_DEADLINE_EXCEEDED',
    );
    await big;
    await serve(mesh, 4);
    const owed = mesh.lanes()[0]!.owedMicros;
    assert.ok(owed >= 20);
    // The ocr-det receipt took the lane past the threshold.
    await waitFor(() => agent.payments!.settler!.counters.txs >= 1, 5_000, 'the threshold settlement');
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === owed, 5_000, 'the last voucher');
    await new Promise((r) => setTimeout(r, 100));
    await agent.payments!.settler!.settleNow();

    const journal = await agent.payments!.receipts(payer.address);
    const okTotal = journal.filter((r) => r.status === 0).reduce((s, r) => s + r.price, 0);
    assert.ok(
      journal.some((r) => r.status === 3 && r.price === 0),
      'the timed-out request has a receipt priced 0',
    );
    assert.equal(okTotal, owed);
    assert.equal(await escrow.tokenBalance(payout), BigInt(okTotal));
    assert.equal((await escrow.laneOf(payer.address, payout)).settled, BigInt(okTotal));
    const records = await agent.payments!.settler!.settlements();
    assert.ok(
      records.some((r) => r.reasons.includes('threshold')),
      JSON.stringify(records.map((r) => r.reasons)),
    );
    assert.equal(
      records.reduce((s, r) => s + r.paidMicros, 0),
      okTotal,
    );
    assert.equal(agent.payments!.settler!.counters.settledMicros, okTotal);
  });

  test('the maximum interval settles a small amount; a near-expiry voucher settles at once', async (t) => {
    const broker = await brokerFor(t);
    const slow = await settlerAgent(t, broker.url, { thresholdMicros: 1e12, maxIntervalMs: 1_500 });
    const expiring = await settlerAgent(t, broker.url, { thresholdMicros: 1e12, maxIntervalMs: 3_600_000, expiryMarginS: 3_600 });
    const payerA = await fundedLane(slow.payout);
    const payerB = await fundedLane(expiring.payout);
    const meshA = await paidMesh(t, broker.url, payerA);
    const meshB = await paidMesh(t, broker.url, payerB, { voucherTtlS: 1_800 });
    await meshA.waitForModel('kws', 10_000, 2);
    await meshB.waitForModel('kws', 10_000, 2);
    await Promise.all([serve(meshA, 3, slow.agent.id), serve(meshB, 3, expiring.agent.id)]);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    const owedA = meshA.lanes().find((l) => l.agentId === slow.agent.id)!.owedMicros;
    const owedB = meshB.lanes().find((l) => l.agentId === expiring.agent.id)!.owedMicros;
    assert.equal(owedA, 6);
    assert.equal(owedB, 6);
    await waitFor(() => expiring.agent.payments!.settler!.counters.settledMicros === owedB, 5_000, 'the expiry settlement');
    assert.equal(slow.agent.payments!.settler!.counters.txs, 0, 'the interval has not passed yet');
    await waitFor(() => slow.agent.payments!.settler!.counters.settledMicros === owedA, 10_000, 'the interval settlement');
    assert.equal(await escrow.tokenBalance(slow.payout), BigInt(owedA));
    assert.equal(await escrow.tokenBalance(expiring.payout), BigInt(owedB));
    assert.deepEqual(
      (await slow.agent.payments!.settler!.settlements()).map((r) => r.reasons),
      [['interval']],
    );
    const expiryRecords = await expiring.agent.payments!.settler!.settlements();
    assert.ok(
      expiryRecords.length >= 1 && expiryRecords.every((r) => r.reasons.join() === 'expiry'),
      JSON.stringify(expiryRecords.map((r) => r.reasons)),
    );
  });

  test('a withdraw request settles the lane before the payer can leave', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await settlerAgent(t, broker.url, { thresholdMicros: 1e12, maxIntervalMs: 3_600_000 });
    const wallet = await fundedLane(payout);
    const mesh = await paidMesh(t, broker.url, wallet);
    await serve(mesh, 5);
    const owed = mesh.lanes()[0]!.owedMicros;
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === owed, 5_000, 'the last voucher');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(agent.payments!.settler!.counters.txs, 0);
    const payer = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
    await payer.requestWithdraw(payout);
    await waitFor(() => agent.payments!.settler!.counters.settledMicros === owed, 5_000, 'the withdraw-triggered settlement');
    assert.deepEqual(
      (await agent.payments!.settler!.settlements()).map((r) => r.reasons),
      [['withdraw']],
    );
    await chain.increaseTime(3_601);
    const back = await payer.withdraw(payout);
    assert.equal(back.amount, 1_000_000n - BigInt(owed));
    assert.equal(await payer.tokenBalance(payout), BigInt(owed));
  });

  test("the router's /v1/lanes and /v1/settlements read the escrow on chain", async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await settlerAgent(t, broker.url, { thresholdMicros: 1e12 });
    const wallet = await fundedLane(payout);
    const mesh = await paidMesh(t, broker.url, wallet);
    await serve(mesh, 4);
    const owed = mesh.lanes()[0]!.owedMicros;
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === owed, 5_000, 'the last voucher');
    await new Promise((r) => setTimeout(r, 100));
    await agent.payments!.settler!.settleNow();
    const router = await startRouter({
      brokerUrl: broker.url,
      identity: generateIdentity('router'),
      logger: quiet,
      http: {
        port: 0,
        processMetrics: false,
        chain: { provider: chain.provider, escrow: deployment.escrow, fromBlock: deployment.deployBlock },
      },
    });
    t.after(() => router.close());
    await router.waitForModel('kws', 10_000);
    const lanes = (await (await fetch(`${router.http!.url}/v1/lanes`)).json()) as {
      lanes: { payer: string; payout: string; agents: string[]; settled_micros: number; remaining_micros: number }[];
    };
    const lane = lanes.lanes.find((l) => l.payout === payout)!;
    assert.deepEqual(lane, {
      payer: wallet.address.toLowerCase(),
      payout,
      agents: [agent.id],
      remaining_micros: 1_000_000 - owed,
      settled_micros: owed,
      thaw_end: 0,
    });
    const res = await fetch(`${router.http!.url}/v1/settlements?agent=${payout}`);
    const body = (await res.json()) as { settlements: { kind: string; delta_micros: number; payer: string }[]; settled_micros: number };
    assert.equal(body.settled_micros, owed);
    assert.deepEqual(
      body.settlements.map((e) => [e.kind, e.delta_micros, e.payer]),
      [['settled', owed, wallet.address.toLowerCase()]],
    );
    assert.equal((await fetch(`${router.http!.url}/v1/settlements?payer=nope`)).status, 400);
  });

  test('kill -9 of the relayer between intent and send, and right after sending: nothing paid twice, nothing owed lost', async (t) => {
    const broker = await brokerFor(t);
    const identity = generateIdentity('agent');
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const dataDir = await tempDir(t);
    const keyFile = path.join(dataDir, 'relayer.key');
    await writeFile(keyFile, chain.privateKeys[nextRelayer++]!, { mode: 0o600 });
    const args = [
      ...['--payout', payout, '--escrow', deployment.escrow, '--chain-id', String(deployment.chainId), '--data', dataDir],
      ...['--settle', '--rpc', chain.rpcUrl, '--evm-key', keyFile, '--settle-threshold', '12', '--settle-check-ms', '100'],
    ];
    const spawnWith = async (crash: string | undefined) => {
      if (crash) process.env.MESH_SETTLER_CRASH = crash;
      try {
        return await spawnAgent(t, broker.url, identity, args);
      } finally {
        delete process.env.MESH_SETTLER_CRASH;
      }
    };
    const wallet = await fundedLane(payout);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    const mesh = await paidMesh(t, broker.url, wallet, { wait: false });
    const settledOnChain = async () => (await escrow.laneOf(wallet.address, payout)).settled;

    // 1. The relayer dies after writing its intent, before the transaction exists.
    let child = await spawnWith('after-intent');
    await mesh.waitForModel('kws', 10_000);
    await serve(mesh, 6);
    await once(child, 'exit');
    assert.equal(child.signalCode, 'SIGKILL');
    assert.equal(await settledOnChain(), 0n, 'no transaction was sent');
    const owed1 = mesh.lanes()[0]!.paidMicros;
    assert.equal(owed1, 12, 'six kws requests at 2 micro-dollars');

    // 2. Restarted, it finds the intent, sees nothing settled, settles, and dies right after sending.
    child = await spawnWith('after-send');
    await once(child, 'exit');
    assert.equal(child.signalCode, 'SIGKILL');
    assert.equal(await settledOnChain(), BigInt(owed1), 'the transaction was mined though its sender died');

    // 3. Restarted again: it reconciles the sent intent, serves more, settles the rest, exactly once.
    child = await spawnWith(undefined);
    await mesh.waitForModel('kws', 10_000);
    await serve(mesh, 6);
    const owed = mesh.lanes()[0]!.owedMicros;
    await waitFor(() => mesh.lanes()[0]!.paidMicros === owed, 5_000, 'the last voucher');
    const deadline = Date.now() + 10_000;
    while ((await settledOnChain()) !== BigInt(owed) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.equal(await settledOnChain(), BigInt(owed));
    assert.equal(await escrow.tokenBalance(payout), BigInt(owed), 'paid exactly what the receipts owe, once');
    child.kill('SIGTERM');
    await once(child, 'exit');

    // Every Settled event pays a fresh increase: their deltas add up to the balance.
    const contract = new ethers.Contract(deployment.escrow, ESCROW_ABI, chain.provider);
    const events = (await contract.queryFilter(
      contract.filters.Settled!(null, ethers.getAddress(payout)),
      deployment.deployBlock,
    )) as ethers.EventLog[];
    assert.equal(events.length, 2);
    assert.equal(
      events.reduce((s, e) => s + (e.args[3] as bigint), 0n),
      BigInt(owed),
    );
  });
});
