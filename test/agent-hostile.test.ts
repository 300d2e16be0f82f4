/**
 * The agent as the target of a dishonest app that also pays, or pretends to (docs/security.md, "A dishonest app at an
 * agent"): a real local chain with the escrow, a real broker, a real ONNX agent, an honest payer (test/payer.ts) and
 * an attacker speaking the envelope by hand. Each test floods one message an agent takes from strangers and checks
 * what it cost the honest side: the agent's signature checks, replies and work, and the honest payer's service.
 */
import assert from 'node:assert/strict';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { after, before, describe, type TestContext, test } from 'node:test';
import type { AgentPaymentOptions } from '@edge-mesh/agent';
import { KeyedBuckets } from '@edge-mesh/client';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type ErrorReply,
  encodeMessage,
  encodeTensorMap,
  fromHex,
  type InferReply,
  type InferRequest,
  newRequestId,
  PROTOCOL_VERSION,
  signLaneGrant,
  signVoucher,
  topics,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import {
  FORGED_VOUCHERS_BURST,
  FORGED_VOUCHERS_PER_SECOND,
  FREE_RECEIPTS_BURST,
  RESYNC_BURST,
  RESYNC_PER_SECOND,
} from '../edge-agent/src/payments.ts';
import { agentFor, brokerFor, rawClient, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, TestPayer } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextWallet = 1;

const domain = () => ({ chainId: deployment.chainId, escrow: deployment.escrow });
const codeOf = (r: InferReply | ErrorReply) => (r.kind === 'err' ? r.code : 'ok');
const tally = (codes: string[]) => {
  const counts: Record<string, number> = {};
  for (const c of codes) counts[c] = (counts[c] ?? 0) + 1;
  return counts;
};

async function paidAgent(t: TestContext, brokerUrl: string, extra: Partial<AgentPaymentOptions> = {}, metricsPort?: number) {
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const agent = await agentFor(t, {
    brokerUrl,
    ...(metricsPort !== undefined ? { metricsPort } : {}),
    payment: { payout, domain: domain(), dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100, ...extra },
  });
  return { agent, payout };
}

async function fundedPayer(t: TestContext, brokerUrl: string, payout: string, clientId: string, options: { autoPay?: boolean } = {}) {
  const wallet = chain.wallet(nextWallet++);
  await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
  const payer = await TestPayer.open(t, brokerUrl, { wallet, domain: domain(), clientId, ...options });
  await payer.waitForModel('kws');
  return payer;
}

/** A paid wake-word request with `pay` as given (a forged or real grant, or none), due in `deadlineInMs`. */
function kwsRequest(inputs: InferRequest['inputs'], pay: InferRequest['pay'], deadlineInMs = 30_000, id = newRequestId()): InferRequest {
  return { v: PROTOCOL_VERSION, kind: 'req', id, deadline: Date.now() + deadlineInMs, model: 'kws', inputs, pay };
}

describe('a dishonest app at a paying agent', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 12 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('forged lane grants: checked off the main thread, a few per client, while an honest lane is served', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url, { creditRequests: 32 }, 0);
    const payments = agent.payments!;
    const honest = await fundedPayer(t, broker.url, payout, 'app-honest');
    assert.equal(codeOf(await honest.request('kws', sampleInputs('kws', 0))), 'ok');

    // The attacker needs no money: a grant naming some payer, signed by a key that is not that payer's. Each request
    // is well formed, for a served model, with a fresh id; only the grant is bad.
    const attacker = await rawClient(t, broker.url, 'app-forger');
    const forger = ethers.Wallet.createRandom();
    const terms = { agent: payout, client: attacker.clientId, issuedAt: Date.now() };
    const grant = {
      ...terms,
      payer: ethers.Wallet.createRandom().address.toLowerCase(),
      sig: fromHex(await signLaneGrant(forger, domain(), terms)),
    };
    const inputs = encodeTensorMap(sampleInputs('kws', 1));
    // Each grant dated a millisecond later than the one before (its signature, over the first, then recovers to some
    // other key): no two share a check.
    const forged = (i: number) => kwsRequest(inputs, { payer: grant.payer, grant: { ...grant, issuedAt: grant.issuedAt + i } });
    const grantsChecked = payments.grantSignaturesChecked;
    // What the flood holds the agent's thread (this process's) for: reported, not asserted (the machine is shared).
    const loop = monitorEventLoopDelay({ resolution: 5 });
    loop.enable();
    const FLOOD = 400;
    const flood = Array.from({ length: FLOOD }, (_, i) => {
      const request = forged(i);
      return attacker.request(agent.id, request.id, request, 30_000);
    });
    // The honest payer, meanwhile: served, every request.
    const served: string[] = [];
    for (let i = 0; i < 10; i++) served.push(codeOf(await honest.request('kws', sampleInputs('kws', 10 + i))));
    const codes = tally((await Promise.all(flood)).map(codeOf));
    loop.disable();
    t.diagnostic(
      `forged grants answered ${JSON.stringify(codes)}; event loop delay max ${(loop.max / 1e6).toFixed(1)} ms, p99 ${(loop.percentile(99) / 1e6).toFixed(1)} ms`,
    );
    assert.deepEqual(served, Array(10).fill('ok'));
    // Every forged request is refused, coded: a few for their grant, once its signature was checked; the rest for
    // checking too many of this client's grants, before any signature is checked.
    assert.equal((codes.MESH_FORBIDDEN ?? 0) + (codes.MESH_RATE_LIMITED ?? 0), FLOOD, JSON.stringify(codes));
    assert.ok((codes.MESH_FORBIDDEN ?? 0) <= 16, `${codes.MESH_FORBIDDEN} forged grants had their signature checked`);
    const checked = payments.grantSignaturesChecked - grantsChecked;
    assert.ok(checked >= 1 && checked <= 16, `${checked} grant signatures of the attacker's were checked`);
    assert.equal(codes.MESH_FORBIDDEN, checked, 'each grant checked was refused as forged');
    assert.equal(payments.counters.grantsLimited, FLOOD - checked);
    assert.equal(payments.lanes().length, 1, 'no lane was opened for the attacker');
    // On the agent's metrics, by kind.
    const metrics = await (await fetch(agent.metricsUrl!)).text();
    assert.match(metrics, new RegExp(`^edge_mesh_agent_payment_refusals_total\\{kind="grant_limited"\\} ${FLOOD - checked}$`, 'm'));
    assert.match(metrics, new RegExp(`^edge_mesh_agent_payment_refusals_total\\{kind="grant"\\} ${checked}$`, 'm'));

    // An honest client's first burst, each request carrying its new grant: one check, shared, and all served.
    const newcomer = await fundedPayer(t, broker.url, payout, 'app-newcomer');
    newcomer.lane(agent.id).grant = await newcomer.grant(agent.id);
    const before = payments.grantSignaturesChecked;
    const burst = await Promise.all(Array.from({ length: 12 }, (_, i) => newcomer.request('kws', sampleInputs('kws', 40 + i))));
    assert.deepEqual(burst.map(codeOf), Array(12).fill('ok'));
    assert.equal(payments.grantSignaturesChecked - before, 1, 'the grant on twelve requests was checked once');
  });

  test('a client the agent allows many lanes opens them all at once: its grant checks are not limited below its lane limit', async (t) => {
    // One client paying for many payers (a gateway app), allowed 12 lanes here by the operator: a start, or a restart
    // without its data folder, sends a grant per lane. The grant checks a client may have at once were fixed at 8,
    // below its lane limit, so the rest of its lanes waited a check every 10 s (MESH_RATE_LIMITED); now a client may
    // have as many checked at once as it may hold lanes.
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url, { maxLanesPerClient: 12 });
    const gateway = await rawClient(t, broker.url, 'app-gateway');
    const inputs = encodeTensorMap(sampleInputs('kws', 0));
    const requests: InferRequest[] = await Promise.all(
      Array.from({ length: 12 }, async () => {
        const payer = ethers.Wallet.createRandom();
        const terms = { agent: payout, client: gateway.clientId, issuedAt: Date.now() };
        const grant = { ...terms, payer: payer.address.toLowerCase(), sig: fromHex(await signLaneGrant(payer, domain(), terms)) };
        return kwsRequest(inputs, { payer: grant.payer, grant });
      }),
    );
    let replies = await Promise.all(requests.map((r) => gateway.request(agent.id, r.id, r, 30_000)));
    // The signature worker takes 8 of one client's at once (MESH_BUSY past that: try again); those are sent again.
    for (let round = 0; round < 3 && replies.some((r) => codeOf(r) === 'MESH_BUSY'); round++) {
      replies = await Promise.all(
        replies.map((reply, i) => {
          if (codeOf(reply) !== 'MESH_BUSY') return reply;
          const again = { ...requests[i]!, id: newRequestId() };
          return gateway.request(agent.id, again.id, again, 30_000);
        }),
      );
    }
    // Unfunded lanes: each refused for want of money, once its grant was taken.
    assert.deepEqual(tally(replies.map(codeOf)), { MESH_CREDIT_EXCEEDED: 12 });
    assert.equal(agent.payments!.lanes().length, 12);
    assert.equal(agent.payments!.counters.grantsLimited, 0);
  });

  test('a resync flood from the lane’s own client: a few answered at once, then two a second; the rest cost a lookup', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const payments = agent.payments!;
    const payer = await fundedPayer(t, broker.url, payout, 'app-resyncer');
    for (let i = 0; i < 3; i++) assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', i))), 'ok');
    // Each resync asks for the whole journal of the lane: a message of a few dozen bytes for one of every receipt.
    const resync = encodeMessage({ v: PROTOCOL_VERSION, kind: 'resync', payer: payer.payer, afterSeq: 0 });
    const answered = payments.counters.resyncs;
    const FLOOD = 200;
    for (let i = 0; i < FLOOD; i++) payer.publishRaw(topics.agentVoucher(agent.id, payer.clientId), resync);
    await waitFor(
      () => payments.counters.resyncs + (payments.counters.resyncsLimited ?? 0) - answered === FLOOD,
      10_000,
      'the resyncs read',
    );
    const got = payments.counters.resyncs - answered;
    t.diagnostic(`${got} of ${FLOOD} resyncs answered`);
    assert.ok(got >= RESYNC_BURST && got <= RESYNC_BURST + 20, `${got} answered`);
    assert.equal(payments.counters.resyncsLimited, FLOOD - got);
    // The lane's client is answered again once its rate allows: an honest resync after a pause.
    await new Promise((r) => setTimeout(r, 1_000 / RESYNC_PER_SECOND + 50));
    const batches = await payer.resync(agent.id, 0, 500);
    assert.equal(batches.length, 1);
    assert.deepEqual(
      batches[0]!.receipts.map((r) => r.seq),
      [1, 2, 3],
    );
    assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', 9))), 'ok', 'and served');
  });

  test('request and cancel at once: a lane gets a burst of receipts that charge nothing, then is refused until it pays or waits', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const payments = agent.payments!;
    // A lane funded for a single request is enough: a request cancelled at once costs its payer nothing.
    const wallet = chain.wallet(nextWallet++);
    await fundOwnLane(wallet, deployment.escrow, payout, 40n);
    const canceller = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-canceller' });
    await canceller.waitForModel('kws');
    assert.equal(codeOf(await canceller.request('kws', sampleInputs('kws', 0))), 'ok');
    const honest = await fundedPayer(t, broker.url, payout, 'app-bystander');
    assert.equal(codeOf(await honest.request('kws', sampleInputs('kws', 1))), 'ok');
    const grant = canceller.lane(agent.id).grant!;
    const inputs = encodeTensorMap(sampleInputs('kws', 2));
    const FLOOD = 600;
    for (let i = 0; i < FLOOD; i++) {
      const id = newRequestId();
      const request = kwsRequest(inputs, { payer: canceller.payer, grant }, 60_000, id);
      canceller.publishRaw(topics.agentRequest(agent.id, canceller.clientId), encodeMessage(request));
      canceller.publishRaw(topics.agentCancel(agent.id, canceller.clientId), encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id }));
      if (i % 50 === 49) await new Promise((r) => setTimeout(r, 5));
    }
    const lane = () => payments.lanes().find((l) => l.payer === canceller.payer)!;
    await waitFor(() => agent.counters.received >= FLOOD + 2, 30_000, 'the flood read');
    await waitFor(() => lane().reservedMicros === 0, 10_000, 'the flood answered');
    const receipts = lane().receipts - 1;
    const limited = payments.counters.freeReceiptsLimited ?? 0;
    t.diagnostic(`${receipts} receipts journaled for ${FLOOD} requests cancelled at once; ${limited} refused`);
    // The burst, what the rate refilled while the flood ran, and requests admitted before the bucket ran dry.
    assert.ok(receipts >= FREE_RECEIPTS_BURST && receipts <= FREE_RECEIPTS_BURST + 40, `${receipts} free receipts journaled`);
    assert.equal(lane().owedMicros, 2, 'only the first request charged anything');
    assert.equal(limited, FLOOD - receipts);
    // The lane's next paid request is refused, coded; another payer's lane is served.
    const refused = await canceller.request('kws', sampleInputs('kws', 3));
    assert.equal(codeOf(refused), 'MESH_RATE_LIMITED');
    assert.equal((refused as ErrorReply).receipt, undefined, 'no receipt for the refusal');
    assert.equal(codeOf(await honest.request('kws', sampleInputs('kws', 4))), 'ok');
  });

  test('forged vouchers on its own lane, paced to the signature worker: a few checked, then refused unchecked; the lane is paid after', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const payments = agent.payments!;
    const payer = await fundedPayer(t, broker.url, payout, 'app-forging', { autoPay: false });
    for (let i = 0; i < 3; i++) assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', i))), 'ok');
    // Vouchers within what was billed, each with its own root, signed by a key that is not the payer's.
    const honest = await payer.voucher(agent.id, { cumulative: 6, seq: 3, send: false });
    const forger = ethers.Wallet.createRandom();
    const forgery = async (i: number) => {
      const receiptsRoot = Uint8Array.from(honest.receiptsRoot);
      receiptsRoot[0] = i % 256;
      receiptsRoot[1] = i >> 8;
      const terms = { agent: payout, cumulative: 6n, receiptsRoot: ethers.hexlify(receiptsRoot), feeCumulative: 0n };
      return encodeMessage({ ...honest, receiptsRoot, sig: fromHex(await signVoucher(forger, domain(), terms)) });
    };
    const forged = await Promise.all(Array.from({ length: 120 }, (_, i) => forgery(i)));
    const checked = payments.voucherSignaturesChecked;
    // Sent a few at a time, each few once the ones before were answered: none is refused as busy, so without a bound
    // each would be checked.
    for (let i = 0; i < forged.length; i += 4) {
      for (const f of forged.slice(i, i + 4)) payer.publishRaw(topics.agentVoucher(agent.id, payer.clientId), f);
      await waitFor(() => payments.counters.vouchersRefused >= i + 4, 5_000, 'the forged vouchers refused');
    }
    const forgedChecked = payments.voucherSignaturesChecked - checked;
    t.diagnostic(`${forgedChecked} of ${forged.length} forged vouchers checked; ${payments.counters.vouchersLimited} refused unchecked`);
    assert.ok(forgedChecked <= FORGED_VOUCHERS_BURST + 4 + 2 * FORGED_VOUCHERS_PER_SECOND * 5, `${forgedChecked} checked`);
    assert.ok((payments.counters.vouchersLimited ?? 0) >= forged.length - forgedChecked - 4);
    assert.equal(payments.lanes()[0]!.paidMicros, 0, 'none was taken');
    // The payer's own voucher, once the bucket has refilled: taken.
    await new Promise((r) => setTimeout(r, 1_000 / FORGED_VOUCHERS_PER_SECOND + 100));
    payer.publishRaw(topics.agentVoucher(agent.id, payer.clientId), encodeMessage(honest));
    await waitFor(() => payments.lanes()[0]!.paidMicros === 6, 5_000, 'the honest voucher');
  });

  test("another app that knows a request's id can neither cancel it, nor get its reply, nor make it run or bill twice", async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const payer = await fundedPayer(t, broker.url, payout, 'app-victim');
    assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', 0))), 'ok');
    const attacker = await rawClient(t, broker.url, 'app-snoop');
    const request = kwsRequest(encodeTensorMap(sampleInputs('kws', 1)), { payer: payer.payer }, 10_000);
    // Its cancel rides right behind the request; thousands more name ids nobody sent.
    const reply = payer.send(agent.id, request);
    attacker.client.publish(
      topics.agentCancel(agent.id, attacker.clientId),
      Buffer.from(encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: request.id })),
      { qos: 1 },
    );
    for (let i = 0; i < 2_000; i++)
      attacker.client.publish(
        topics.agentCancel(agent.id, attacker.clientId),
        Buffer.from(encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: newRequestId() })),
        { qos: 0 },
      );
    const got = await reply;
    assert.equal(codeOf(got), 'ok', 'the victim is served');
    assert.equal(got.receipt?.status, 0, 'an ok receipt');
    // The same id from the attacker, once answered: refused as a replay, without the victim's outputs or receipt.
    const replay = await attacker.request(agent.id, request.id, { ...request, pay: undefined });
    assert.equal(codeOf(replay), 'MESH_BAD_REQUEST');
    assert.equal(replay.kind, 'err');
    assert.equal(replay.receipt, undefined);
    const lane = agent.payments!.lanes().find((l) => l.payer === payer.payer)!;
    assert.equal(lane.receipts, 2, 'billed once for each request');
    assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', 2))), 'ok', 'and served after');
  });
});

test('a sender budget: a burst, then the refill rate; one sender’s spending leaves the others theirs', () => {
  let now = 0;
  const budget = new KeyedBuckets(3, 2, () => now);
  assert.deepEqual(
    [1, 2, 3, 4].map(() => budget.take('a')),
    [true, true, true, false],
  );
  assert.equal(budget.take('b'), true, 'another sender has its own');
  now += 499;
  assert.equal(budget.take('a'), false);
  now += 1;
  assert.deepEqual([budget.take('a'), budget.take('a')], [true, false], 'two a second');
  now += 60_000;
  assert.deepEqual(
    [1, 2, 3, 4].map(() => budget.take('a')),
    [true, true, true, false],
    'never more than the burst',
  );
});
