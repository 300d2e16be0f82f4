/**
 * Settlement on a chain that reorganises (docs/settlement.md, "Reorgs"): a real local chain (Hardhat) whose
 * reorgs are made with `evm_snapshot` / `evm_revert` and mining, a real broker, a real ONNX agent, and a payer
 * spoken over a bare MQTT connection (test/payer.ts). A reorg here is: snapshot, transactions mined, the agent
 * sees them, revert to the snapshot, other blocks mined past the old height. Each test says what a dishonest
 * payer gains and what the agent loses.
 */
import assert from 'node:assert/strict';
import { after, before, describe, type TestContext, test } from 'node:test';
import { type SettlerOptions, startAgent } from '@edge-mesh/agent';
import { checkFollowedBlock, ESCROW_ABI, EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { type ErrorReply, generateIdentity, type InferReply, MeshError } from '@edge-mesh/protocol';
import { startRouterHttp } from '@edge-mesh/router';
import { ethers } from 'ethers';
import { LaneFunds, type LaneFundsOptions } from '../edge-agent/src/lane-funds.ts';
import { withTimeout } from './broker-fixtures.ts';
import { brokerFor, modelsDir, quiet, routerFor, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, type PaidAgentExtra, paidAgentFor, TestPayer } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextWallet = 1;
const KWS = 2; // micro-dollars per kws inference (its manifest price)

const domain = () => ({ chainId: deployment.chainId, escrow: deployment.escrow });
const codeOf = (r: InferReply | ErrorReply) => (r.kind === 'err' ? r.code : 'ok');

/** A paid agent on this file's chain (test/payer.ts, `paidAgentFor`). */
const paidAgent = (t: TestContext, brokerUrl: string, extra: PaidAgentExtra = {}) =>
  paidAgentFor(t, brokerUrl, { provider: chain.provider, domain: domain() }, extra);

const snapshot = (): Promise<string> => chain.provider.send('evm_snapshot', []);

/**
 * Undoes every block since `snap` and builds another branch past the old height: one transaction that touches
 * no lane (so the new blocks differ from the old ones), then empty blocks.
 */
async function reorgTo(snap: string): Promise<void> {
  const oldHeight = await chain.provider.getBlockNumber();
  assert.equal(await chain.provider.send('evm_revert', [snap]), true, 'reverted');
  const filler = chain.wallet(0);
  await (await filler.sendTransaction({ to: ethers.Wallet.createRandom().address, value: 1n })).wait();
  const now = await chain.provider.getBlockNumber();
  await chain.provider.send('hardhat_mine', [ethers.toQuantity(oldHeight - now + 2)]);
  assert.ok((await chain.provider.getBlockNumber()) > oldHeight, 'the new branch is longer');
}

async function serve(payer: TestPayer, n: number, from: number): Promise<string[]> {
  const codes: string[] = [];
  for (let i = 0; i < n; i++) codes.push(codeOf(await payer.request('kws', sampleInputs('kws', from + i))));
  return codes;
}

async function laneOnChain(payer: string, payout: string) {
  const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
  return escrow.laneOf(payer, payout);
}

/**
 * The local chain as a node `behind` blocks behind would answer it (a load balancer's node that lags): its head, its
 * blocks and its calls stop at the block `lag` names; `lag(undefined)` answers as the chain is.
 */
function laggingProvider(): { provider: ethers.JsonRpcProvider; lag: (head: number | undefined) => void } {
  let lagHead: number | undefined;
  const provider = new Proxy(chain.provider, {
    get(target, prop) {
      if (prop === 'getBlockNumber') return async () => lagHead ?? (await target.getBlockNumber());
      if (prop === 'getBlock')
        return async (tag: ethers.BlockTag) => {
          if (lagHead === undefined) return target.getBlock(tag);
          if (tag === 'latest') return target.getBlock(lagHead);
          return typeof tag === 'number' && tag > lagHead ? null : target.getBlock(tag);
        };
      if (prop === 'call') return (tx: ethers.TransactionRequest) => target.call(lagHead === undefined ? tx : { ...tx, blockTag: lagHead });
      const value = Reflect.get(target, prop, target);
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
  return {
    provider,
    lag: (head) => {
      lagHead = head;
    },
  };
}

/**
 * The local chain as a node that stops answering once `hang` is set: every read waits until `release` (or for ever),
 * as a node whose connection hangs does.
 */
function hangingProvider(): { provider: ethers.JsonRpcProvider; hang: (on: boolean) => void; release: () => void } {
  let hanging = false;
  let release!: () => void;
  const gate = new Promise<void>((r) => {
    release = r;
  });
  const READS = new Set(['getBlock', 'getBlockNumber', 'getLogs', 'call']);
  const provider = new Proxy(chain.provider, {
    get(target, prop) {
      const value = Reflect.get(target, prop, target);
      if (typeof value !== 'function') return value;
      const bound = value.bind(target) as (...args: unknown[]) => unknown;
      if (!READS.has(String(prop))) return bound;
      return async (...args: unknown[]) => {
        if (hanging) await gate;
        return bound(...args);
      };
    },
  });
  return {
    provider,
    hang: (on) => {
      hanging = on;
    },
    release: () => release(),
  };
}

/** A LaneFunds of its own on this file's chain (a random payout, an in-memory store, no polls unless asked), closed at the end. */
async function openFunds(
  t: TestContext,
  provider: ethers.Provider,
  extra: Partial<LaneFundsOptions> = {},
): Promise<{ funds: LaneFunds; payout: string }> {
  const stored = new Map<string, unknown>();
  const payout = extra.payout ?? ethers.Wallet.createRandom().address.toLowerCase();
  const funds = await LaneFunds.open({
    provider,
    escrow: deployment.escrow,
    chainId: BigInt(deployment.chainId),
    store: { get: async (k) => stored.get(k), put: async (k, v) => void stored.set(k, v) },
    logger: quiet,
    pollMs: 60_000,
    confirmations: 0,
    ...extra,
    payout,
  });
  t.after(() => funds.close());
  return { funds, payout };
}

const codeOfError = (err: unknown) => (err instanceof MeshError ? err.code : String(err));

describe('settlement on a chain that reorganises', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 30 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('a deposit reorged out no longer gives credit: the agent reads the lane again and refuses it', async (t) => {
    // The payer funds its lane, takes work on the strength of the deposit, and the deposit leaves the chain.
    // It gains the work served before the agent saw the reorg (here three requests: confirmations 0, the local
    // chain's default, believes the deposit at once; on a real chain `confirmations` keeps a deposit from
    // counting until it is that deep, next test). Before this fix the agent never read the lane again and went
    // on serving against money that was not there, without end; now the next poll sees the replaced block,
    // reads the lane (0 left) and refuses with MESH_CREDIT_EXCEEDED: the agent's loss stops at what it served
    // before the poll.
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const wallet = chain.wallet(nextWallet++);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-reorg-deposit' });
    await payer.waitForModel('kws');

    const snap = await snapshot();
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    assert.deepEqual(await serve(payer, 3, 0), ['ok', 'ok', 'ok'], 'served against the deposit');
    await agent.payments!.catchUpFunds();
    assert.equal(agent.payments!.lanes()[0]!.funds!.remaining, 1_000_000);

    await reorgTo(snap);
    assert.equal((await laneOnChain(wallet.address, payout)).remaining, 0n, 'the deposit is gone from the chain');
    await agent.payments!.catchUpFunds();
    assert.deepEqual(await serve(payer, 4, 10), Array(4).fill('MESH_CREDIT_EXCEEDED'), 'no credit against the vanished deposit');
    assert.equal(agent.payments!.lanes()[0]!.receipts, 3, 'no work after the reorg was seen');
    assert.equal(agent.payments!.lanes()[0]!.funds!.remaining, 0);
    assert.equal(agent.payments!.funds().counters.reorgs, 1);
  });

  test('after a reorg, a lane in use is read again on its own: not after every lane the agent ever read', async (t) => {
    // An agent with many lanes drops them all from its view on a reorg. Before this fix it read every one of them
    // again inside the poll, under the lock its paid requests' first reads wait on, so a lane in use waited for
    // every idle lane's laneOf (and for ever when the node hung on one). Now each lane is read on its next use,
    // and a burst of first uses shares one turn of the lock.
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const idle = Array.from({ length: 20 }, () => ethers.Wallet.createRandom().address.toLowerCase());
    // The node hangs on the idle lanes' laneOf once `hang` is set, until `release`.
    let hang = false;
    let release!: () => void;
    const gate = new Promise<void>((r) => {
      release = r;
    });
    const hangsOn = idle.map((a) => a.slice(2));
    const provider = new Proxy(chain.provider, {
      get(target, prop) {
        if (prop === 'call')
          return async (tx: ethers.TransactionRequest) => {
            const data = String(tx.data ?? '').toLowerCase();
            if (hang && hangsOn.some((h) => data.includes(h))) await gate;
            return target.call(tx);
          };
        const value = Reflect.get(target, prop, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    // Released before the funds close (after-hooks run in the order they are added).
    t.after(() => release());
    const { funds } = await openFunds(t, provider, { payout });
    const snap = await snapshot();
    const wallet = chain.wallet(nextWallet++);
    const active = wallet.address.toLowerCase();
    await fundOwnLane(wallet, deployment.escrow, payout, 5_000n);
    for (const payer of idle) await funds.track(payer);
    assert.equal((await funds.track(active)).remaining, 5_000);
    await funds.catchUp();

    await reorgTo(snap);
    await fundOwnLane(wallet, deployment.escrow, payout, 700n);
    hang = true;
    const reads = funds.counters.reads;
    await withTimeout(funds.catchUp(), 10_000, 'the poll that finds the reorg');
    assert.equal(funds.counters.reorgs, 1);
    assert.equal(funds.view(active), undefined, 'no credit against the lane until it is read again');
    const view = await withTimeout(funds.track(active), 10_000, 'the lane in use read again');
    assert.equal(view.remaining, 700, 'read on the new branch');
    assert.equal(funds.counters.reads - reads, 1, 'one laneOf: the idle lanes are read on their next use');

    // A burst of first uses after the reorg: each lane read once, the lanes the node answers not held by one it does not.
    hang = false;
    const burst = await withTimeout(Promise.all(idle.slice(0, 10).map((p) => funds.track(p))), 10_000, 'the burst');
    assert.ok(burst.every((v) => v.remaining === 0));
    assert.equal(funds.counters.reads - reads, 11);
  });

  test('with confirmations, a deposit counts only once it is that deep: one reorged out before then never gave credit', async (t) => {
    // With `confirmations: 3` the same payer gains nothing: its deposit gives no credit while it is shallower than
    // three blocks, so a reorg that takes it out inside that depth costs the agent no work at all. Before this
    // fix there was no such option and the agent served on the deposit at once.
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url, { confirmations: 3 });
    const wallet = chain.wallet(nextWallet++);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-reorg-deep' });
    await payer.waitForModel('kws');

    const snap = await snapshot();
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    assert.deepEqual(await serve(payer, 2, 0), Array(2).fill('MESH_CREDIT_EXCEEDED'), 'a deposit one block deep gives no credit');
    await reorgTo(snap);
    await agent.payments!.catchUpFunds();
    assert.deepEqual(await serve(payer, 2, 10), Array(2).fill('MESH_CREDIT_EXCEEDED'));
    assert.equal(agent.payments!.lanes()[0]!.receipts, 0, 'the agent did no work on the reorged deposit');

    // A deposit that stays: refused while shallow, served once three blocks deep.
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    await agent.payments!.catchUpFunds();
    assert.deepEqual(await serve(payer, 1, 20), ['MESH_CREDIT_EXCEEDED']);
    // The payer that just funded is told the deposit is not deep enough yet, not only to fund the lane (again).
    const shallow = (await payer.request('kws', sampleInputs('kws', 25))) as ErrorReply;
    assert.equal(shallow.code, 'MESH_CREDIT_EXCEEDED');
    assert.match(shallow.message, /3 blocks below the latest/, shallow.message);
    assert.match(shallow.message, /a deposit counts once it is that deep/, shallow.message);
    await chain.provider.send('hardhat_mine', ['0x3']);
    await agent.payments!.catchUpFunds();
    assert.deepEqual(await serve(payer, 2, 30), ['ok', 'ok']);
    const { checkpoint } = agent.payments!.funds();
    assert.equal(checkpoint.next - 1, (await chain.provider.getBlockNumber()) - 3, 'the follower stops three blocks below the head');
  });

  test('confirmations takes a number of blocks, safe or finalized; anything else is MESH_CONFIG and the agent does not start', async (t) => {
    const broker = await brokerFor(t);
    for (const confirmations of [-1, 1.5, 'soon']) {
      await assert.rejects(
        startAgent({
          brokerUrl: broker.url,
          modelsDir: await modelsDir(),
          logger: quiet,
          identity: generateIdentity('agent'),
          payment: {
            payout: ethers.Wallet.createRandom().address,
            domain: domain(),
            dataDir: await tempDir(t),
            provider: chain.provider,
            confirmations: confirmations as never,
          },
        }),
        (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG' && /confirmations must be/.test(err.message),
      );
    }
    // The local chain has both tags (each names its latest block there).
    const { agent } = await paidAgent(t, broker.url, { confirmations: 'finalized' });
    await agent.payments!.catchUpFunds();
    assert.equal(agent.payments!.funds().checkpoint.next - 1, await chain.provider.getBlockNumber());
  });

  test('a withdrawal request reorged out no longer blocks the lane', async (t) => {
    // The lane is funded for good; a withdrawal request appears and is taken out by a reorg. A dishonest payer
    // gains nothing here (it only blocks its own lane); the cost was the agent's: before this fix the request's
    // event, once read, closed the lane for good although the chain shows no withdrawal, and an honest payer's
    // money could never buy work from this agent again. Now the lane is read again and serves.
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const wallet = chain.wallet(nextWallet++);
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-reorg-withdraw' });
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 2, 0), ['ok', 'ok']);

    const snap = await snapshot();
    const escrow = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
    await escrow.requestWithdraw(wallet.address, payout, 1_000_000n);
    await agent.payments!.catchUpFunds();
    assert.ok(agent.payments!.lanes()[0]!.funds!.thawEnd > 0, 'the agent saw the withdrawal request');
    assert.deepEqual(await serve(payer, 2, 10), Array(2).fill('MESH_CREDIT_EXCEEDED'));

    await reorgTo(snap);
    assert.equal((await laneOnChain(wallet.address, payout)).thawEnd, 0n, 'no withdrawal on the chain');
    await agent.payments!.catchUpFunds();
    assert.deepEqual(await serve(payer, 3, 20), ['ok', 'ok', 'ok'], 'the lane serves again');
    assert.equal(agent.payments!.lanes()[0]!.funds!.thawEnd, 0);
    assert.equal(agent.payments!.lanes()[0]!.receipts, 5);
  });

  test('after a restart the checkpoint is not past a reorged block: a shorter chain, then a replaced one', async (t) => {
    // While the agent is stopped the chain drops the blocks its checkpoint stands on. Nobody gains money here;
    // before this fix the agent read lanes at its old checkpoint, a block the chain no longer had, and refused
    // every paid request (MESH_CHAIN_UNREACHABLE) until the chain grew back past it. Now the follower sees the
    // chain below its checkpoint (or the checkpoint's block replaced), moves to the chain as it is, and serves.
    const broker = await brokerFor(t);
    const identity = generateIdentity('agent');
    const dataDir = await tempDir(t);
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const wallet = chain.wallet(nextWallet++);
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    let { agent } = await paidAgent(t, broker.url, { identity, dataDir, payout });
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-reorg-restart' });
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 1, 0), ['ok']);

    // The agent follows three more blocks (each with a transaction), then stops; those blocks are dropped.
    const snap = await snapshot();
    for (let i = 0; i < 3; i++)
      await (await chain.wallet(0).sendTransaction({ to: ethers.Wallet.createRandom().address, value: 1n })).wait();
    await agent.payments!.catchUpFunds();
    const followed = await chain.provider.getBlockNumber();
    await agent.close();
    assert.equal(await chain.provider.send('evm_revert', [snap]), true);
    await (await chain.wallet(0).sendTransaction({ to: ethers.Wallet.createRandom().address, value: 2n })).wait();
    assert.ok((await chain.provider.getBlockNumber()) < followed, 'the chain is now shorter than what the agent followed');

    ({ agent } = await paidAgent(t, broker.url, { identity, dataDir, payout }));
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 2, 10), ['ok', 'ok'], 'served on the chain as it is');
    let { checkpoint } = agent.payments!.funds();
    assert.ok(checkpoint.next - 1 <= (await chain.provider.getBlockNumber()), 'the checkpoint is on the chain');
    assert.equal(checkpoint.hash, (await chain.provider.getBlock(checkpoint.next - 1))!.hash);

    // Stopped again, and the checkpoint's block is replaced by a longer branch: the restart notices the hash.
    await agent.payments!.catchUpFunds();
    const snap2 = await snapshot();
    await (await chain.wallet(0).sendTransaction({ to: ethers.Wallet.createRandom().address, value: 3n })).wait();
    await agent.payments!.catchUpFunds();
    const before = agent.payments!.funds().checkpoint;
    await agent.close();
    await reorgTo(snap2);
    assert.notEqual((await chain.provider.getBlock(before.next - 1))!.hash, before.hash, "the checkpoint's block was replaced");
    ({ agent } = await paidAgent(t, broker.url, { identity, dataDir, payout }));
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 1, 20), ['ok']);
    ({ checkpoint } = agent.payments!.funds());
    assert.equal(agent.payments!.funds().counters.reorgs, 1, 'the replaced block was seen');
    assert.equal(checkpoint.hash, (await chain.provider.getBlock(checkpoint.next - 1))!.hash);
    assert.equal(agent.payments!.lanes()[0]!.receipts, 4);
  });

  test('a lane in use is read again on a timer: an event the node never returned is corrected', async (t) => {
    // A node (or a load balancer in front of several) that misses a log and a reorg the checks do not catch look
    // the same to the follower: an event it never applies. Here the node drops every WithdrawRequested log. The
    // payer gains what it is served until the next refresh (one request here, within `fundsRefreshMs`); then
    // `laneOf` shows the withdrawal and the lane is refused, as if the event had been read.
    const broker = await brokerFor(t);
    const topic = new ethers.Interface(ESCROW_ABI).getEvent('WithdrawRequested')!.topicHash;
    const forgetful = new Proxy(chain.provider, {
      get(target, prop) {
        if (prop === 'getLogs')
          return async (filter: ethers.Filter) => (await target.getLogs(filter)).filter((log) => log.topics[0] !== topic);
        const value = Reflect.get(target, prop, target) as unknown;
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    const { agent, payout } = await paidAgent(t, broker.url, { provider: forgetful, fundsRefreshMs: 300 });
    const wallet = chain.wallet(nextWallet++);
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-refresh' });
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 1, 0), ['ok']);
    // Once read again on the timer, the lane is idle: it is not read again until it is used.
    await waitFor(() => agent.payments!.funds().counters.refreshes >= 1, 5_000, 'the first refresh');

    const escrow = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
    await escrow.requestWithdraw(wallet.address, payout, 1_000_000n);
    await agent.payments!.catchUpFunds();
    assert.equal(agent.payments!.lanes()[0]!.funds!.thawEnd, 0, 'the event was not seen');
    assert.deepEqual(await serve(payer, 1, 10), ['ok'], 'served on the view that missed it');
    await waitFor(() => (agent.payments!.lanes()[0]!.funds?.thawEnd ?? 0) > 0, 5_000, 'the lane read again');
    assert.deepEqual(await serve(payer, 2, 20), Array(2).fill('MESH_CREDIT_EXCEEDED'));
  });

  test('a node a block or two behind is not a reorg to the settler: nothing is settled twice', async (t) => {
    // A load-balanced RPC endpoint may answer one call from a node a block or two behind the one before. The
    // settler once took a head below the last block it had read (or that block not found) for a reorg: it believed
    // `settled` as that node had it, from before its own settlement, and sent the settlement again, paying gas for
    // nothing (the escrow pays only what is above `settled`). Now it waits for the node to have the block.
    const broker = await brokerFor(t);
    const { provider: lagging, lag } = laggingProvider();
    const runner = chain.wallet(nextWallet++).connect(lagging);
    const settle: SettlerOptions = { runner, checkEveryMs: 3_600_000, thresholdMicros: 1 };
    const { agent, payout } = await paidAgent(t, broker.url, { settle });
    const wallet = chain.wallet(nextWallet++);
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-lagging-node' });
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 3, 0), ['ok', 'ok', 'ok']);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 3 * KWS, 5_000, 'the voucher');
    const settler = agent.payments!.settler!;
    await settler.settleNow();
    assert.equal((await laneOnChain(wallet.address, payout)).settled, BigInt(3 * KWS), 'settled');
    const minedAt = (await settler.settlements())[0]!.blockNumber;
    await chain.provider.send('hardhat_mine', ['0x2']);
    await settler.settleNow(); // reads the settlement's event
    const txs = settler.counters.txs;

    lag(minedAt - 1); // the next answers come from a node without the settlement's block yet
    await settler.settleNow();
    lag(undefined);
    await settler.settleNow();
    assert.equal(settler.counters.txs, txs, 'no settlement sent again');
    assert.equal(await runner.getNonce('latest'), await chain.provider.getTransactionCount(runner.address, 'latest'));
    assert.equal(settler.settledByLane()[wallet.address.toLowerCase()], 3 * KWS);
  });

  test("a node behind is not a reorg to the router's /v1/settlements: what it read stays listed, the history is not read again", async (t) => {
    // The router keeps the escrow's logs it has read. One answer from a node behind the last block it read (head
    // below it, or the block not found) once made it drop them all and read the whole history again up to that
    // node's head: a settlement vanished from the listing until the node caught up, and every such answer cost a
    // read of everything since `fromBlock`.
    const broker = await brokerFor(t);
    const settle: SettlerOptions = { runner: chain.wallet(nextWallet++), checkEveryMs: 3_600_000, thresholdMicros: 1 };
    const { agent, payout } = await paidAgent(t, broker.url, { settle });
    const wallet = chain.wallet(nextWallet++);
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-router-lag' });
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 2, 0), ['ok', 'ok']);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 2 * KWS, 5_000, 'the voucher');
    await agent.payments!.settler!.settleNow();
    const minedAt = (await agent.payments!.settler!.settlements())[0]!.blockNumber;
    const { provider, lag } = laggingProvider();
    let logReads = 0;
    const counting = new Proxy(provider, {
      get(target, prop) {
        if (prop === 'getLogs')
          return (filter: ethers.Filter) => {
            logReads++;
            return target.getLogs(filter);
          };
        const value = Reflect.get(target, prop, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    const router = await routerFor(t, broker.url);
    const http = await startRouterHttp(router, {
      processMetrics: false,
      chain: { provider: counting, escrow: deployment.escrow, fromBlock: deployment.deployBlock },
    });
    t.after(() => http.close());
    const listed = async () => {
      const res = await fetch(`${http.url}/v1/settlements?agent=${payout}`);
      assert.equal(res.status, 200);
      return ((await res.json()) as { settlements: { block: number }[] }).settlements.map((s) => s.block);
    };
    assert.deepEqual(await listed(), [minedAt]);
    await chain.provider.send('hardhat_mine', ['0x2']);
    assert.deepEqual(await listed(), [minedAt]);
    const reads = logReads;

    lag(minedAt - 1);
    assert.deepEqual(await listed(), [minedAt], 'still listed while a node behind answers');
    assert.equal(logReads, reads, 'no logs read again');
    lag(undefined);
    assert.deepEqual(await listed(), [minedAt]);
  });

  test('a settlement reorged out is sent again: the settler reads the lane and believes the chain', async (t) => {
    // The agent's own settlement is mined and then dropped by a reorg (its transaction gone with the branch).
    // Before this fix the settler had recorded the lane as settled and never looked at it again: the payer
    // kept the money for work it had vouched for, and could withdraw it after the thaw. Now the follower reads
    // the settlement's block without its event, reads the lane again (settled 0) and settles it once more.
    // The router's /v1/settlements, which keeps the escrow's logs it has read, drops the undone settlement too.
    const broker = await brokerFor(t);
    const settle: SettlerOptions = { runner: chain.wallet(nextWallet++), checkEveryMs: 3_600_000, thresholdMicros: 1 };
    const { agent, payout } = await paidAgent(t, broker.url, { settle });
    const wallet = chain.wallet(nextWallet++);
    await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-reorg-settle' });
    await payer.waitForModel('kws');
    assert.deepEqual(await serve(payer, 3, 0), ['ok', 'ok', 'ok']);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 3 * KWS, 5_000, 'the voucher');
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    const router = await routerFor(t, broker.url);
    const http = await startRouterHttp(router, {
      processMetrics: false,
      chain: { provider: chain.provider, escrow: deployment.escrow, fromBlock: deployment.deployBlock },
    });
    t.after(() => http.close());
    const listed = async () => {
      const res = await fetch(`${http.url}/v1/settlements?agent=${payout}`);
      assert.equal(res.status, 200);
      return ((await res.json()) as { settlements: { block: number; delta_micros: number }[] }).settlements;
    };

    const snap = await snapshot();
    await agent.payments!.settler!.settleNow();
    assert.equal(await escrow.tokenBalance(payout), BigInt(3 * KWS), 'settled once');
    const first = await listed();
    assert.deepEqual(
      first.map((s) => s.delta_micros),
      [3 * KWS],
    );
    await reorgTo(snap);
    assert.equal(await escrow.tokenBalance(payout), 0n, 'the settlement left the chain with its branch');
    assert.equal((await laneOnChain(wallet.address, payout)).settled, 0n);
    assert.deepEqual(await listed(), [], 'the router no longer lists it');

    await agent.payments!.settler!.settleNow();
    assert.equal(await escrow.tokenBalance(payout), BigInt(3 * KWS), 'settled again after the reorg');
    assert.equal((await laneOnChain(wallet.address, payout)).settled, BigInt(3 * KWS));
    const again = await listed();
    assert.equal(again.length, 1);
    assert.ok(again[0]!.block > first[0]!.block, 'the settlement mined on the new branch');
  });

  test("a node a block or two behind is not a reorg to the agent's lane funds: the view is kept, and followed on once the node catches up", async (t) => {
    // A load-balanced endpoint may answer a poll from a node a block or two behind. Before this fix the agent's follower
    // took a head below its last block for a reorg: it dropped every lane from the view (no credit until each was read
    // again, and a reorg counted). Now it waits for the node, as the settler and the router do.
    const { provider, lag } = laggingProvider();
    const wallet = chain.wallet(nextWallet++);
    const { funds, payout } = await openFunds(t, provider);
    await fundOwnLane(wallet, deployment.escrow, payout, 5_000n);
    assert.equal((await funds.track(wallet.address)).remaining, 5_000);
    await chain.provider.send('hardhat_mine', ['0x2']);
    await funds.catchUp();
    const followed = funds.checkpoint();
    assert.equal(followed.next - 1, await chain.provider.getBlockNumber());
    const reads = funds.counters.reads;

    lag(followed.next - 3); // two blocks behind the last block followed
    await funds.catchUp();
    assert.equal(funds.counters.reorgs, 0, 'not taken for a reorg');
    assert.equal(funds.counters.behind, 1);
    assert.equal(funds.view(wallet.address)?.remaining, 5_000, 'the lane stays in the view');
    assert.deepEqual(funds.checkpoint(), followed, 'the checkpoint stays');
    // A lane first used meanwhile is not read at a block the node lacks: a coded refusal, read once the node has it.
    const other = ethers.Wallet.createRandom().address;
    await assert.rejects(
      funds.track(other),
      (err: unknown) => codeOfError(err) === 'MESH_CHAIN_UNREACHABLE' && /behind/.test((err as Error).message),
    );

    // The node catches up, past a deposit made meanwhile: the follower goes on from its checkpoint, the lane not read again.
    await fundOwnLane(wallet, deployment.escrow, payout, 700n);
    lag(undefined);
    await funds.catchUp();
    assert.equal(funds.counters.reorgs, 0);
    assert.equal(funds.view(wallet.address)?.remaining, 5_700, 'the deposit read from its event');
    assert.equal(funds.counters.reads, reads, 'no lane read again');
    assert.equal((await funds.track(other)).remaining, 0);
  });

  test("a hung node: a lane's first read fails with MESH_CHAIN_UNREACHABLE within its timeout, and the poll that hangs gives up too", async (t) => {
    // A node that stops answering (a connection that hangs) held the follower's poll, and every first read waits for
    // its turn behind the poll: before this fix a paid request from a payer new to the agent waited as long as the node
    // did, for ever with a provider without timeouts. Now the first read has its own bound (`readTimeoutMs`), and
    // each call of the poll one of its own (`chainTimeoutMs`), so the lock is freed and the view recovers.
    const { provider, hang, release } = hangingProvider();
    t.after(release);
    const { funds } = await openFunds(t, provider, { readTimeoutMs: 300, chainTimeoutMs: 2_000 });
    const payer = ethers.Wallet.createRandom().address;
    hang(true);
    const first = await withTimeout(
      funds.track(payer).then(
        () => 'read',
        (err: unknown) => err,
      ),
      10_000,
      'the first read behind a hung poll',
    );
    assert.ok(first instanceof MeshError, String(first));
    assert.equal(first.code, 'MESH_CHAIN_UNREACHABLE');
    assert.match(first.message, /first read of lane/);
    assert.equal(first.details?.timeoutMs, 300);
    // The poll under the lock gives up at its own bound, so the lock is freed.
    const poll = await withTimeout(
      funds.catchUp().then(
        () => 'polled',
        (err: unknown) => err,
      ),
      20_000,
      'a poll on a hung node',
    );
    assert.ok(poll instanceof MeshError, String(poll));
    assert.equal(poll.code, 'MESH_CHAIN_UNREACHABLE');
    assert.equal(poll.details?.timeoutMs, 2_000);

    hang(false);
    assert.equal((await withTimeout(funds.track(payer), 10_000, 'the read once the node answers')).remaining, 0);
  });

  test('checkFollowedBlock: the block still on the chain, a node behind it, the block replaced, a node that never answers', async () => {
    await chain.provider.send('hardhat_mine', ['0x3']);
    const n = (await chain.provider.getBlockNumber()) - 1;
    const block = (await chain.provider.getBlock(n))!;
    // On the chain with the recorded hash; an unknown hash is not compared, and the node's is given.
    let check = await checkFollowedBlock(chain.provider, { number: n, hash: block.hash! });
    assert.equal(check.state, 'on-chain');
    assert.equal(check.hash, block.hash);
    assert.equal(check.head.number, n + 1);
    check = await checkFollowedBlock(chain.provider, { number: n, hash: undefined });
    assert.deepEqual([check.state, check.hash], ['on-chain', block.hash]);
    // The head itself.
    check = await checkFollowedBlock(chain.provider, { number: n + 1, hash: check.head.hash });
    assert.equal(check.state, 'on-chain');

    // A node whose head is below the block, and one whose head is past it but that has not got it: behind, not replaced.
    const { provider, lag } = laggingProvider();
    lag(n - 2);
    check = await checkFollowedBlock(provider, { number: n, hash: block.hash! });
    assert.deepEqual([check.state, check.head.number, check.hash], ['node-behind', n - 2, undefined]);
    const missing = new Proxy(chain.provider, {
      get(target, prop) {
        if (prop === 'getBlock') return async (tag: ethers.BlockTag) => (tag === n ? null : target.getBlock(tag));
        const value = Reflect.get(target, prop, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    check = await checkFollowedBlock(missing, { number: n, hash: block.hash! });
    assert.equal(check.state, 'node-behind');

    // The block replaced by a reorg, and the chain past it: replaced, with the new hash.
    const snap = await snapshot();
    await (await chain.wallet(0).sendTransaction({ to: ethers.Wallet.createRandom().address, value: 1n })).wait();
    const mined = (await chain.provider.getBlock('latest'))!;
    await reorgTo(snap);
    check = await checkFollowedBlock(chain.provider, { number: mined.number, hash: mined.hash! });
    assert.equal(check.state, 'replaced');
    assert.notEqual(check.hash, mined.hash);
    assert.equal(check.hash, (await chain.provider.getBlock(mined.number))!.hash);

    // A node that never answers: a coded error at the timeout, not a wait for ever.
    const { provider: hung, hang, release } = hangingProvider();
    hang(true);
    try {
      const err = await withTimeout(
        checkFollowedBlock(hung, { number: n, hash: block.hash! }, { timeoutMs: 200 }).then(
          () => 'answered',
          (e: unknown) => e,
        ),
        10_000,
        'a check on a hung node',
      );
      assert.ok(err instanceof MeshError, String(err));
      assert.equal(err.code, 'MESH_CHAIN_UNREACHABLE');
      assert.equal(err.details?.timeoutMs, 200);
    } finally {
      release();
    }
    // A node that fails: coded too. A block number that is none: MESH_BAD_REQUEST.
    const failing = new Proxy(chain.provider, {
      get(target, prop) {
        if (prop === 'getBlock') return async () => Promise.reject(new Error('connection reset'));
        const value = Reflect.get(target, prop, target);
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    await assert.rejects(
      checkFollowedBlock(failing, { number: n, hash: block.hash! }),
      (err: unknown) => codeOfError(err) === 'MESH_CHAIN_UNREACHABLE',
    );
    await assert.rejects(
      checkFollowedBlock(chain.provider, { number: -1, hash: block.hash! }),
      (err: unknown) => codeOfError(err) === 'MESH_BAD_REQUEST',
    );
  });
});
