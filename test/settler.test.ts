/**
 * The agent's settlement relayer on a real local chain (escrow v2), a real broker and real ONNX agents:
 * each trigger (threshold, interval, withdrawal pending), no gas spent on a lane that owes nothing (an
 * emptied lane waits for its top-up, then the same voucher pays the rest), exact payment of the ok
 * receipts, kill -9 of the relayer between its intent and its transaction and right after sending it, and a
 * settlement transaction the node drops or leaves pending, which is sent again on its nonce.
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
import {
  agentFor,
  brokerFor,
  expireBehindDetection,
  LARGE_DETECTION_BYTES,
  meshFor,
  quiet,
  spawnAgent,
  tempDir,
  waitFor,
} from './helpers.ts';
import { pendingFrom } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextPayer = 1;
let nextRelayer = 10;

/** A lane whose voucher key also owns it (the simplest set-up). */
async function fundedLane(payout: string, amount = 1_000_000n): Promise<ethers.Wallet> {
  const wallet = chain.wallet(nextPayer++);
  const payer = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
  await payer.mint(wallet.address, amount);
  await payer.fund(wallet.address, payout, amount);
  return wallet;
}

/** An app's voucher key whose lane a separate funding wallet owns (opened with the voucher key's consent). */
async function ownedLane(payout: string, amount: bigint): Promise<{ signer: ethers.Wallet; owner: EscrowClient }> {
  const signer = chain.wallet(nextPayer++);
  const ownerWallet = chain.wallet(nextPayer++);
  const app = await EscrowClient.connect({ runner: signer, escrow: deployment.escrow });
  const owner = await EscrowClient.connect({ runner: ownerWallet, escrow: deployment.escrow });
  await owner.mint(ownerWallet.address, amount * 10n);
  await owner.fund(signer.address, payout, amount, { consent: await app.signOwnerConsent(ownerWallet.address) });
  return { signer, owner };
}

async function paidMesh(t: TestContext, brokerUrl: string, signer: ethers.Wallet, extra: { dataDir?: string; wait?: boolean } = {}) {
  const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
  const mesh = await meshFor(t, {
    brokerUrl,
    maxMessageBytes: LARGE_DETECTION_BYTES,
    // These tests are about settling; payout registration has its own (test/payments-payer.test.ts).
    payment: { signer, domain, dataDir: extra.dataDir ?? (await tempDir(t)), checkPayouts: false },
  });
  if (extra.wait !== false) await mesh.waitForModel('kws');
  return mesh;
}

async function settlerAgent(t: TestContext, brokerUrl: string, settle: Partial<SettlerOptions>) {
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
  // Every model on the one worker, one job at a time, so a wake-word request can wait behind a detection
  // (inline, it would not).
  const runner = chain.wallet(nextRelayer++);
  const agent = await agentFor(t, {
    brokerUrl,
    pipelineDepth: 1,
    inlineMaxMs: 0,
    maxMessageBytes: LARGE_DETECTION_BYTES,
    payment: { payout, domain, dataDir: await tempDir(t), settle: { runner, checkEveryMs: 100, ...settle } },
  });
  return { agent, payout, runner: runner.address };
}

/** Blocks are mined only on request until the test ends (or the returned function is called). */
async function automineOff(t: TestContext): Promise<() => Promise<void>> {
  await chain.provider.send('evm_setAutomine', [false]);
  const on = async () => {
    await chain.provider.send('evm_setAutomine', [true]);
  };
  t.after(on);
  return on;
}

/** The Settled events that paid `payout`. */
async function settledEvents(payout: string): Promise<ethers.EventLog[]> {
  const contract = new ethers.Contract(deployment.escrow, ESCROW_ABI, chain.provider);
  return (await contract.queryFilter(
    contract.filters.Settled!(null, ethers.getAddress(payout)),
    deployment.deployBlock,
  )) as ethers.EventLog[];
}

async function serve(mesh: Awaited<ReturnType<typeof paidMesh>>, n: number, agentId?: string): Promise<void> {
  for (let i = 0; i < n; i++) await mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 5_000, ...(agentId ? { agentId } : {}) });
  assert.ok(await mesh.receiptsIn(), 'the receipts that follow the answers came');
}

describe('settlement relayer', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 24 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('the threshold triggers a settlement; the payout holds exactly the ok receipts; timed-out work costs 0', async (t) => {
    const broker = await brokerFor(t, { maxPacketBytes: LARGE_DETECTION_BYTES });
    const { agent, payout } = await settlerAgent(t, broker.url, { thresholdMicros: 20, maxIntervalMs: 3_600_000 });
    const payer = await fundedLane(payout);
    const mesh = await paidMesh(t, broker.url, payer);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });

    await serve(mesh, 4); // 8 micro-dollars: under the threshold
    await new Promise((r) => setTimeout(r, 600));
    assert.equal(agent.payments!.settler!.counters.txs, 0, 'nothing settles below the threshold');
    // A request behind a large detection times out in the queue and is billed 0.
    await expireBehindDetection(mesh, agent);
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

  test('the maximum interval settles a small amount; a lane that owes nothing costs no gas until it owes again', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await settlerAgent(t, broker.url, { thresholdMicros: 1e12, maxIntervalMs: 3_000 });
    // The lane holds exactly what three requests cost: the agent gives no credit beyond what is there.
    const { signer, owner } = await ownedLane(payout, 6n);
    const mesh = await paidMesh(t, broker.url, signer);
    await serve(mesh, 3);
    const owed = mesh.lanes()[0]!.owedMicros;
    assert.equal(owed, 6);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === owed, 5_000, 'the last voucher');
    const settler = agent.payments!.settler!;
    assert.equal(settler.counters.txs, 0, 'the interval has not passed yet');
    await waitFor(() => settler.counters.settledMicros === 6, 10_000, 'the interval settlement');
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    assert.equal(await escrow.tokenBalance(payout), 6n);
    let records = await settler.settlements();
    assert.deepEqual(
      records.map((r) => [r.reasons, r.lanes.map((l) => [l.delta, l.partial])]),
      [[['interval'], [[6, false]]]],
    );
    // Settled and empty, the lane owes the agent nothing: intervals pass with no transaction, and once the
    // settlement's own event is read the chain is not read again.
    await new Promise((r) => setTimeout(r, 1_000));
    const reads = settler.counters.laneReads;
    await new Promise((r) => setTimeout(r, 7_000));
    assert.equal(settler.counters.txs, 1, 'no gas on a lane that owes nothing');
    assert.equal(settler.counters.laneReads, reads, 'no chain read without an event on the lane');
    // The owner tops it up and the app asks for more: the next interval settles the new work.
    await owner.fund(signer.address, payout, 10n);
    await agent.payments!.catchUpFunds();
    await serve(mesh, 2);
    await waitFor(() => settler.counters.settledMicros === 10, 10_000, 'the new work settled');
    assert.equal(await escrow.tokenBalance(payout), 10n);
    records = await settler.settlements();
    assert.deepEqual(
      records.map((r) => r.lanes.map((l) => [l.delta, l.partial])),
      [[[6, false]], [[4, false]]],
    );
    const lane = await escrow.laneOf(signer.address, payout);
    assert.deepEqual([lane.settled, lane.remaining], [10n, 6n]);
  });

  test('a pending withdrawal settles the lane before the owner can leave; the voucher key cannot withdraw', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await settlerAgent(t, broker.url, { thresholdMicros: 1e12, maxIntervalMs: 3_600_000 });
    const { signer, owner } = await ownedLane(payout, 1_000_000n);
    const mesh = await paidMesh(t, broker.url, signer);
    await serve(mesh, 5);
    const owed = mesh.lanes()[0]!.owedMicros;
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === owed, 5_000, 'the last voucher');
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(agent.payments!.settler!.counters.txs, 0);
    // The owner asks for everything back.
    const { lapseAt } = await owner.requestWithdraw(signer.address, payout, 1_000_000n);
    await waitFor(() => agent.payments!.settler!.counters.settledMicros === owed, 5_000, 'the withdraw-triggered settlement');
    assert.deepEqual(
      (await agent.payments!.settler!.settlements()).map((r) => r.reasons),
      [['withdraw']],
    );
    // While the request is pending, new work is settled at once too.
    await serve(mesh, 2);
    const owed2 = mesh.lanes()[0]!.owedMicros;
    await waitFor(() => agent.payments!.settler!.counters.settledMicros === owed2, 5_000, 'settled again while the withdrawal is pending');
    assert.ok((await agent.payments!.settler!.settlements()).every((r) => r.reasons.join() === 'withdraw'));
    await chain.increaseTime(3_601);
    const app = await EscrowClient.connect({ runner: signer, escrow: deployment.escrow });
    await assert.rejects(
      app.withdraw(signer.address, payout),
      (e: unknown) => e instanceof MeshError && /^NotLaneOwner\(/.test(String(e.details?.reason)),
    );
    const back = await owner.withdraw(signer.address, payout);
    assert.equal(back.amount, 1_000_000n - BigInt(owed2));
    assert.equal(await owner.tokenBalance(payout), BigInt(owed2));
    assert.ok(lapseAt > 0n);
  });

  test('a settlement transaction the node drops is sent again after receiptTimeoutMs: the lane is paid, once', {
    timeout: 60_000,
  }, async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout, runner } = await settlerAgent(t, broker.url, {
      thresholdMicros: 10,
      maxIntervalMs: 3_600_000,
      receiptTimeoutMs: 1_000,
    });
    const payer = await fundedLane(payout);
    const mesh = await paidMesh(t, broker.url, payer);
    const settler = agent.payments!.settler!;
    const nonce = await chain.provider.getTransactionCount(runner, 'latest');
    const automineOn = await automineOff(t);
    await serve(mesh, 5); // 10 micro-dollars: the threshold
    const dropped = await pendingFrom(chain.provider, runner);
    assert.equal(dropped.nonce, nonce);
    await chain.provider.send('hardhat_dropTransaction', [dropped.hash]);
    await automineOn();
    // One timeout and a few checks later the lane is settled by a new transaction on the freed nonce.
    await waitFor(() => settler.counters.settledMicros === 10, 1_000 + 10 * 100 + 2_000, 'the settlement sent again');
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    assert.equal(await escrow.tokenBalance(payout), 10n);
    assert.equal((await escrow.laneOf(payer.address, payout)).settled, 10n);
    const records = await settler.settlements();
    assert.equal(records.length, 1);
    // Sent again on the nonce the drop freed (at the same fee and with the same data it is the same signed
    // transaction, so the same hash), and mined.
    assert.equal((await chain.provider.getTransaction(records[0]!.hash))!.nonce, nonce);
    assert.equal(await chain.provider.getTransactionCount(runner, 'latest'), nonce + 1, 'one transaction mined');
    assert.equal((await settledEvents(payout)).length, 1);
    assert.ok(settler.counters.failures >= 1, 'the timeout was counted');
  });

  test('a settlement transaction left pending is replaced on its nonce at a higher fee; whichever is mined is recorded, once', {
    timeout: 60_000,
  }, async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout, runner } = await settlerAgent(t, broker.url, {
      thresholdMicros: 1e12,
      maxIntervalMs: 3_600_000,
      receiptTimeoutMs: 1_000,
    });
    const { signer, owner } = await ownedLane(payout, 1_000_000n);
    const mesh = await paidMesh(t, broker.url, signer);
    await serve(mesh, 5);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 10, 5_000, 'the last voucher');
    const settler = agent.payments!.settler!;
    // Blocks stop, then the owner asks to withdraw: the settlement it triggers waits in the pool with it.
    const automineOn = await automineOff(t);
    const request = owner.requestWithdraw(signer.address, payout, 1_000_000n);
    await pendingFrom(chain.provider, await owner.address());
    await chain.provider.send('evm_mine', []);
    await request;
    const first = await pendingFrom(chain.provider, runner);
    const second = await pendingFrom(chain.provider, runner, [first.hash], 5_000);
    assert.equal(second.nonce, first.nonce, 'the same nonce');
    assert.ok(second.maxFeePerGas! > first.maxFeePerGas! && second.maxPriorityFeePerGas! > first.maxPriorityFeePerGas!, 'a higher fee');
    assert.equal(await chain.provider.getTransaction(first.hash), null, 'the first is out of the pool');
    await chain.provider.send('evm_mine', []);
    await automineOn();
    await waitFor(() => settler.counters.settledMicros === 10, 5_000, 'the replacement recorded');
    const records = await settler.settlements();
    assert.equal(records.length, 1);
    assert.ok(records[0]!.reasons.includes('withdraw'), JSON.stringify(records));
    assert.equal((await chain.provider.getTransaction(records[0]!.hash))!.nonce, first.nonce);
    assert.equal((await settledEvents(payout)).length, 1);
    assert.equal(await chain.provider.getTransactionCount(runner, 'latest'), first.nonce + 1, 'one transaction mined');
    // And the settler goes on: new work on the lane (the withdrawal still pending) is settled at once.
    await serve(mesh, 2);
    await waitFor(() => settler.counters.settledMicros === 14, 5_000, 'the next settlement');
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
    // A provider that counts the log ranges asked for: each request reads only the blocks since the last.
    const ranges: [number, number][] = [];
    const counted = new Proxy(chain.provider, {
      get(target, prop, receiver) {
        if (prop === 'getLogs')
          return (filter: ethers.Filter) => {
            ranges.push([Number(filter.fromBlock), Number(filter.toBlock)]);
            return target.getLogs(filter);
          };
        const value = Reflect.get(target, prop, receiver);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    const router = await startRouter({
      brokerUrl: broker.url,
      identity: generateIdentity('router'),
      logger: quiet,
      http: {
        port: 0,
        processMetrics: false,
        chain: { provider: counted, escrow: deployment.escrow, fromBlock: deployment.deployBlock },
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
      owner: wallet.address.toLowerCase(),
      payout,
      agents: [agent.id],
      remaining_micros: 1_000_000 - owed,
      settled_micros: owed,
      fee_settled_micros: 0,
      withdraw_micros: 0,
      thaw_end: 0,
      lapse_at: 0,
    });
    const res = await fetch(`${router.http!.url}/v1/settlements?agent=${payout}`);
    const body = (await res.json()) as { settlements: { kind: string; delta_micros: number; payer: string }[]; settled_micros: number };
    assert.equal(body.settled_micros, owed);
    assert.deepEqual(
      body.settlements.map((e) => [e.kind, e.delta_micros, e.payer]),
      [['settled', owed, wallet.address.toLowerCase()]],
    );
    assert.equal((await fetch(`${router.http!.url}/v1/settlements?payer=nope`)).status, 400);
    // Asked again, the router reads no block twice: every range starts after the last one read.
    const before = ranges.length;
    const head = await chain.provider.getBlockNumber();
    await fetch(`${router.http!.url}/v1/lanes`);
    await fetch(`${router.http!.url}/v1/settlements`);
    for (const [fromBlock] of ranges.slice(before))
      assert.ok(fromBlock > head - 1, `a range from block ${fromBlock} read again (head ${head})`);
    assert.ok(ranges.every(([f]) => f >= deployment.deployBlock));
  });

  test('kill -9 right after sending while the transaction is pending: restarted, the relayer replaces it on its nonce; one transaction, paid once', {
    timeout: 120_000,
  }, async (t) => {
    const broker = await brokerFor(t);
    const identity = generateIdentity('agent');
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const dataDir = await tempDir(t);
    const keyFile = path.join(dataDir, 'relayer.key');
    const relayer = chain.accounts[nextRelayer]!;
    await writeFile(keyFile, chain.privateKeys[nextRelayer++]!, { mode: 0o600 });
    const args = [
      ...['--payout', payout, '--escrow', deployment.escrow, '--chain-id', String(deployment.chainId), '--data', dataDir],
      ...['--settle', '--rpc', chain.rpcUrl, '--evm-key', keyFile, '--settle-threshold', '12', '--settle-check-ms', '100'],
    ];
    const wallet = await fundedLane(payout);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    const mesh = await paidMesh(t, broker.url, wallet, { wait: false });
    const nonce = await chain.provider.getTransactionCount(relayer, 'latest');
    process.env.MESH_SETTLER_CRASH = 'after-send';
    let child: Awaited<ReturnType<typeof spawnAgent>>;
    try {
      child = await spawnAgent(t, broker.url, identity, args);
    } finally {
      delete process.env.MESH_SETTLER_CRASH;
    }
    await mesh.waitForModel('kws', 10_000);
    const automineOn = await automineOff(t);
    await serve(mesh, 6);
    await once(child, 'exit');
    assert.equal(child.signalCode, 'SIGKILL');
    const first = await pendingFrom(chain.provider, relayer);
    assert.equal(first.nonce, nonce);
    // Restarted with the transaction still in the pool: its intent stays, and the lane goes out again on its nonce.
    child = await spawnAgent(t, broker.url, identity, args);
    const second = await pendingFrom(chain.provider, relayer, [first.hash], 20_000);
    assert.equal(second.nonce, nonce, 'the same nonce');
    assert.ok(second.maxFeePerGas! > first.maxFeePerGas!, 'a higher fee');
    await chain.provider.send('evm_mine', []);
    await automineOn();
    const deadline = Date.now() + 10_000;
    while ((await escrow.laneOf(wallet.address, payout)).settled !== 12n && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 100));
    assert.equal(await escrow.tokenBalance(payout), 12n, 'paid once');
    assert.equal(await chain.provider.getTransactionCount(relayer, 'latest'), nonce + 1, 'one transaction mined: no gas on a second');
    assert.equal((await settledEvents(payout)).length, 1);
    child.kill('SIGTERM');
    await once(child, 'exit');
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
