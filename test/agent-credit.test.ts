/**
 * Payments among strangers, the agent's side (docs/settlement.md, "The agent's side"): a real local
 * chain with the escrow, a real broker, real ONNX agents, and a payer spoken over a bare MQTT
 * connection (test/payer.ts). Each test states what the honest side lost: the agent's loss is what
 * it billed and can never settle, the payer's what it paid for work it did not get.
 */
import assert from 'node:assert/strict';
import { after, before, describe, type TestContext, test } from 'node:test';
import { startAgent } from '@edge-mesh/agent';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type ErrorReply,
  encodeMessage,
  encodeTensorMap,
  fromHex,
  generateIdentity,
  type InferReply,
  type InferRequest,
  LaneVerifier,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  signLaneGrant,
  signVoucher,
  toHex,
  topics,
  verifyQuote,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import pino from 'pino';
import { FORGED_VOUCHERS_BURST, FORGED_VOUCHERS_PER_SECOND } from '../edge-agent/src/payments.ts';
import { agentFor, brokerFor, modelsDir, quiet, rawClient, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, type PaidAgentExtra, paidAgentFor, settleEntry, TestPayer } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextWallet = 1;
const KWS = 2; // micro-dollars per kws inference (its manifest price)

const domain = () => ({ chainId: deployment.chainId, escrow: deployment.escrow });

/** A fresh funded (or not) payer wallet on the local chain. */
async function payerWallet(payout: string, fund: bigint): Promise<ethers.Wallet> {
  const wallet = chain.wallet(nextWallet++);
  if (fund > 0n) await fundOwnLane(wallet, deployment.escrow, payout, fund);
  return wallet;
}

/** A paid agent on this file's chain (test/payer.ts, `paidAgentFor`). */
const paidAgent = (t: TestContext, brokerUrl: string, extra: PaidAgentExtra = {}) =>
  paidAgentFor(t, brokerUrl, { provider: chain.provider, domain: domain() }, extra);

const codeOf = (r: InferReply | ErrorReply) => (r.kind === 'err' ? r.code : 'ok');

async function settleBest(agent: Awaited<ReturnType<typeof paidAgent>>['agent'], payout: string): Promise<bigint> {
  const best = agent.payments!.lanes()[0]!.voucher!;
  const relayer = await EscrowClient.connect({ runner: chain.wallet(0), escrow: deployment.escrow });
  const outcome = await relayer.settle(payout, [settleEntry(payout, best)]);
  assert.deepEqual(outcome.skipped, [], 'the best voucher settles');
  return outcome.paid;
}

describe('payments among strangers: the agent gives credit only against money that is there', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 30 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('taking payment needs a chain to read: no provider is MESH_CONFIG', async (t) => {
    const broker = await brokerFor(t);
    await assert.rejects(
      startAgent({
        brokerUrl: broker.url,
        modelsDir: await modelsDir(),
        logger: quiet,
        identity: generateIdentity('agent'),
        payment: { payout: `0x${'b0'.repeat(20)}`, domain: domain(), dataDir: await tempDir(t) },
      }),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG' && /provider/.test(err.message),
    );
  });

  test('an unfunded payer gets no work at all; unpaid requests get MESH_PAYMENT_REQUIRED unless the agent serves them free', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const wallet = await payerWallet(payout, 0n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-unfunded' });
    await payer.waitForModel('kws');
    const codes: string[] = [];
    for (let i = 0; i < 10; i++) codes.push(codeOf(await payer.request('kws', sampleInputs('kws', i))));
    assert.deepEqual(codes, Array(10).fill('MESH_CREDIT_EXCEEDED'));
    const lane = agent.payments!.lanes()[0]!;
    // The agent lost nothing: it did no work on credit.
    assert.equal(lane.receipts, 0);
    assert.equal(lane.owedMicros, 0);
    assert.equal(agent.counters.served, 0);

    // A request with no payer is refused, coded, and costs nothing.
    const raw = await rawClient(t, broker.url, 'app-free');
    const free = {
      v: PROTOCOL_VERSION,
      kind: 'req',
      id: newRequestId(),
      deadline: Date.now() + 5_000,
      model: 'kws',
      inputs: encodeTensorMap(sampleInputs('kws', 1)),
    } as const;
    const refused = await raw.request(agent.id, free.id, free);
    assert.equal(codeOf(refused), 'MESH_PAYMENT_REQUIRED');
    // An agent started with serveUnpaid serves it free, with no receipt.
    const { agent: generous } = await paidAgent(t, broker.url, { serveUnpaid: true });
    const again = { ...free, id: newRequestId() };
    const served = await raw.request(generous.id, again.id, again);
    assert.equal(served.kind, 'res');
    assert.equal(served.receipt, undefined);
  });

  test('a lane funded for N requests gets N and no more; funding it again reopens it; the agent is paid every one', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const n = 5;
    // n requests, plus the relayer fee the payer could take by settling them itself (a tenth of the pay).
    const wallet = await payerWallet(payout, BigInt(n * KWS + Math.floor((n * KWS) / 10)));
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-n' });
    await payer.waitForModel('kws');
    const codes: string[] = [];
    for (let i = 0; i < n + 3; i++) {
      const reply = await payer.request('kws', sampleInputs('kws', i));
      codes.push(codeOf(reply));
      if (i >= n) assert.match((reply as ErrorReply).message, /fund the lane/, 'refused for want of money, not of vouchers');
      // The payer's voucher for each receipt is in before the next request: what stops the lane is money.
      await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === payer.lanesView()[0]!.owedMicros, 3_000, 'the voucher');
    }
    assert.deepEqual(codes, [...Array(n).fill('ok'), ...Array(3).fill('MESH_CREDIT_EXCEEDED')]);
    assert.equal(await settleBest(agent, payout), BigInt(n * KWS), 'every request served is paid');

    // Settled: the lane holds only the fee margin and serves nothing; funded again, it serves that much.
    await agent.payments!.catchUpFunds();
    assert.equal(agent.payments!.lanes()[0]!.funds!.remaining, Math.floor((n * KWS) / 10));
    assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', 50))), 'MESH_CREDIT_EXCEEDED');
    await (await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow })).mint(wallet.address, 2n * BigInt(KWS));
    await (await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow })).fund(wallet.address, payout, 2n * BigInt(KWS));
    await agent.payments!.catchUpFunds();
    const more: string[] = [];
    for (let i = 0; i < 3; i++) {
      more.push(codeOf(await payer.request('kws', sampleInputs('kws', 60 + i))));
      await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === payer.lanesView()[0]!.owedMicros, 3_000, 'the voucher');
    }
    assert.deepEqual(more, ['ok', 'ok', 'MESH_CREDIT_EXCEEDED']);
    assert.equal(await settleBest(agent, payout), BigInt(2 * KWS));
    const lane = agent.payments!.lanes()[0]!;
    assert.equal(lane.owedMicros, (n + 2) * KWS);
    assert.equal(await payerClient().then((c) => c.tokenBalance(payout)), BigInt((n + 2) * KWS), 'the agent lost nothing');
  });

  test('a payer that settles its own vouchers with a relayer fee cannot leave served work uncovered', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const fund = 10 * KWS;
    const wallet = await payerWallet(payout, BigInt(fund));
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-fees' });
    await payer.waitForModel('kws');
    const codes: string[] = [];
    for (let i = 0; i < 10; i++) {
      codes.push(codeOf(await payer.request('kws', sampleInputs('kws', i))));
      await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === payer.lanesView()[0]!.owedMicros, 3_000, 'the voucher');
    }
    // The lane holds ten requests' worth, but a tenth of what is owed is kept back for the fee the payer
    // could pay itself: nine are served.
    assert.deepEqual(codes, [...Array(9).fill('ok'), 'MESH_CREDIT_EXCEEDED']);
    const owed = 9 * KWS;

    // The payer signs the total it owes with the largest fee the escrow allows and settles it itself.
    const v = { agent: payout, cumulative: BigInt(owed), feeCumulative: BigInt(owed) / 10n, receiptsRoot: ethers.ZeroHash };
    const own = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
    const out = await own.settle(payout, [{ voucher: v, signature: await signVoucher(wallet, domain(), v) }]);
    assert.deepEqual([out.paid, out.fees], [BigInt(owed), BigInt(owed) / 10n]);
    // The agent was paid every request it served: nothing it counted on went to the fee.
    assert.equal(await own.tokenBalance(payout), BigInt(owed), 'the agent lost nothing');
    await agent.payments!.catchUpFunds();
    assert.equal(agent.payments!.lanes()[0]!.funds!.remaining, fund - owed - Math.floor(owed / 10));
  });

  test('a voucher whose relayer fee is above the escrow cap is refused and never replaces the held one', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const wallet = await payerWallet(payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-fee-cap', autoPay: false });
    await payer.waitForModel('kws');
    for (let i = 0; i < 6; i++) assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', i))), 'ok');
    // 12 micro-dollars owed: a fee of 1 is within the escrow's cap (a tenth, 1.2).
    await payer.voucher(agent.id, { cumulative: 6 * KWS, fee: 1 });
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 6 * KWS, 3_000, 'the voucher with a fee');
    assert.equal(agent.payments!.lanes()[0]!.voucher!.feeCumulative, 1);
    for (let i = 0; i < 2; i++) assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', 20 + i))), 'ok');
    // A voucher that pays more but names a fee of 2 on 16 (above 1.6): the escrow would skip it (FEE_TOO_HIGH).
    const refusedBefore = agent.payments!.counters.vouchersRefused;
    await payer.voucher(agent.id, { cumulative: 8 * KWS, fee: 2 });
    await waitFor(() => agent.payments!.counters.vouchersRefused === refusedBefore + 1, 3_000, 'the refusal');
    const lane = agent.payments!.lanes()[0]!;
    assert.equal(lane.paidMicros, 6 * KWS, 'the held voucher is still the best');
    assert.deepEqual([lane.voucher!.cumulative, lane.voucher!.feeCumulative], [6 * KWS, 1]);
    // What the agent holds settles, fee and all; then a good voucher for the rest replaces it.
    const relayer = await EscrowClient.connect({ runner: chain.wallet(0), escrow: deployment.escrow });
    const first = await relayer.settle(payout, [settleEntry(payout, lane.voucher!)]);
    assert.deepEqual([first.paid, first.fees, first.skipped.length], [BigInt(6 * KWS), 1n, 0]);
    await payer.voucher(agent.id, { cumulative: 8 * KWS, fee: 1 });
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 8 * KWS, 3_000, 'the good voucher');
    const second = await relayer.settle(payout, [settleEntry(payout, agent.payments!.lanes()[0]!.voucher!)]);
    assert.deepEqual([second.paid, second.fees, second.skipped.length], [BigInt(2 * KWS), 0n, 0]);
    assert.equal(await relayer.tokenBalance(payout), BigInt(8 * KWS), 'the agent lost nothing');
  });

  test('a withdrawal request stops credit at once; once thawed (armed) it stays stopped, across a restart of the agent', async (t) => {
    const broker = await brokerFor(t);
    const identity = generateIdentity('agent');
    const dataDir = await tempDir(t);
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    let { agent } = await paidAgent(t, broker.url, { identity, dataDir, payout });
    const wallet = await payerWallet(payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-leaving' });
    await payer.waitForModel('kws');
    for (let i = 0; i < 2; i++) assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', i))), 'ok');
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 2 * KWS, 3_000, 'the voucher');

    const escrow = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
    await escrow.requestWithdraw(wallet.address, payout, 1_000_000n);
    await agent.payments!.catchUpFunds();
    assert.ok(agent.payments!.lanes()[0]!.funds!.thawEnd > 0, 'the agent saw the withdrawal request');
    const during: string[] = [];
    for (let i = 0; i < 5; i++) {
      const reply = await payer.request('kws', sampleInputs('kws', 10 + i));
      during.push(codeOf(reply));
      assert.match((reply as ErrorReply).message, /withdrawing/);
    }
    assert.deepEqual(during, Array(5).fill('MESH_CREDIT_EXCEEDED'));

    // The thaw passes: the withdrawal is armed. A restarted agent reads the lane afresh and still refuses.
    await chain.increaseTime(3_601);
    await agent.close();
    ({ agent } = await paidAgent(t, broker.url, { identity, dataDir, payout }));
    await payer.waitForModel('kws');
    const armed: string[] = [];
    for (let i = 0; i < 5; i++) armed.push(codeOf(await payer.request('kws', sampleInputs('kws', 20 + i))));
    assert.deepEqual(armed, Array(5).fill('MESH_CREDIT_EXCEEDED'));
    assert.equal(agent.payments!.lanes()[0]!.funds!.withdrawArmed, true);
    assert.equal(agent.payments!.lanes()[0]!.receipts, 2, 'no work after the request to withdraw');

    // The agent settles what it was owed before the payer takes the rest: it lost nothing.
    assert.equal(await settleBest(agent, payout), BigInt(2 * KWS));
    const back = await escrow.withdraw(wallet.address, payout);
    assert.equal(back.amount, 1_000_000n - BigInt(2 * KWS));
    assert.equal(await escrow.tokenBalance(payout), BigInt(2 * KWS));
  });

  test("a voucher that pays less, or one not signed by the lane's payer, never replaces the settleable one; the best stays settleable", async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const wallet = await payerWallet(payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-vouchers', autoPay: false });
    await payer.waitForModel('kws');
    for (let i = 0; i < 3; i++) assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', i))), 'ok');
    const agentId = agent.id;
    await payer.voucher(agentId, { cumulative: 3 * KWS, seq: 3 });
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 3 * KWS, 3_000, 'the good voucher');
    const refusedBefore = agent.payments!.counters.vouchersRefused;

    // Less than the best: refused.
    await payer.voucher(agentId, { cumulative: 2 * KWS, seq: 3 });
    // More, but signed by another key than the lane's payer (sent in the payer's name): refused.
    const forged = await payer.voucher(agentId, { cumulative: 5 * KWS, seq: 3, send: false });
    const strangerSig = await signVoucher(chain.wallet(nextWallet++), domain(), {
      agent: payout,
      cumulative: BigInt(5 * KWS),
      receiptsRoot: toHex(forged.receiptsRoot),
      feeCumulative: 0n,
    });
    payer.publishRaw(topics.agentVoucher(agentId, payer.clientId), encodeMessage({ ...forged, sig: fromHex(strangerSig) }));
    await waitFor(() => agent.payments!.counters.vouchersRefused === refusedBefore + 2, 3_000, 'two vouchers refused');
    const lane = agent.payments!.lanes()[0]!;
    assert.equal(lane.paidMicros, 3 * KWS);
    assert.equal(lane.voucher!.cumulative, 3 * KWS);
    // A cumulative voucher carries no expiry (escrow v2): what the agent keeps still settles a day later.
    await chain.increaseTime(86_400);
    assert.equal(await settleBest(agent, payout), BigInt(3 * KWS));
  });

  test("forged vouchers: another client's are refused before any signature is checked; after the lane client's own flood, a request and its honest voucher are taken", async (t) => {
    const broker = await brokerFor(t);
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    // The agent's log, kept: each refused voucher says why (at warn once a second per client, the repeats at debug).
    const warnings: { msg: string; why?: string; level: number }[] = [];
    const logger = pino({ level: 'debug' }, { write: (line: string) => void warnings.push(JSON.parse(line)) });
    const agent = await agentFor(t, {
      brokerUrl: broker.url,
      logger,
      payment: { payout, domain: domain(), dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100 },
    });
    const wallet = await payerWallet(payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-flooded', autoPay: false });
    await payer.waitForModel('kws');
    for (let i = 0; i < 3; i++) assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', i))), 'ok');
    const payments = agent.payments!;
    const forged = await payer.voucher(agent.id, { cumulative: 3 * KWS, seq: 3, send: false });
    const forgedSig = fromHex(
      await signVoucher(chain.wallet(nextWallet++), domain(), {
        agent: payout,
        cumulative: BigInt(3 * KWS),
        receiptsRoot: toHex(forged.receiptsRoot),
        feeCumulative: 0n,
      }),
    );
    const FLOOD = 200;
    const refusals = () => warnings.filter((w) => w.msg === 'voucher refused').map((w) => w.why ?? '');

    // Another client, naming the payer's lane: refused for who sent it, before its signature costs anything.
    const stranger = await TestPayer.open(t, broker.url, {
      wallet: chain.wallet(nextWallet++),
      domain: domain(),
      clientId: 'app-stranger',
    });
    await stranger.waitForModel('kws');
    const checkedBefore = payments.voucherSignaturesChecked;
    // Each one different (a voucher sent again while it is checked shares that check), each paying what was billed.
    const forgery = (i: number) => {
      const receiptsRoot = Uint8Array.from(forged.receiptsRoot);
      receiptsRoot[0] = i % 256;
      receiptsRoot[1] = i >> 8;
      return encodeMessage({ ...forged, receiptsRoot, sig: forgedSig });
    };
    for (let i = 0; i < FLOOD; i++) stranger.publishRaw(topics.agentVoucher(agent.id, stranger.clientId), forgery(i));
    await waitFor(() => refusals().length === FLOOD, 10_000, "the stranger's vouchers refused");
    assert.ok(
      refusals().every((why) => why.startsWith('sent by client')),
      `refused for the sender: ${[...new Set(refusals())].join(' | ')}`,
    );
    assert.equal(payments.voucherSignaturesChecked, checkedBefore, 'no signature of theirs was checked');
    // Nor do they flood the log: a warning a second at most, the rest at debug.
    const warned = warnings.filter((w) => w.msg === 'voucher refused' && w.level >= 40).length;
    assert.ok(warned >= 1 && warned <= 5, `${warned} of ${FLOOD} refusals logged at warn`);

    // The lane's own client, forging: refused (signature, too many of its own waiting, or too many of the lane's found
    // forged lately); a request behind it is served. A few signatures are checked, not the flood's.
    const ownBefore = payments.voucherSignaturesChecked;
    for (let i = 0; i < FLOOD; i++) payer.publishRaw(topics.agentVoucher(agent.id, payer.clientId), forgery(i));
    assert.equal(codeOf(await payer.request('kws', sampleInputs('kws', 9))), 'ok');
    await waitFor(() => refusals().length === 2 * FLOOD, 10_000, 'the forged vouchers refused');
    assert.ok(
      refusals()
        .slice(FLOOD)
        .every(
          (why) =>
            why.startsWith('signed by') ||
            why.includes("of this client's signatures are already waiting") ||
            why.includes('forged vouchers on this lane'),
        ),
      `refused as forged, as past the client's share or the lane's: ${[...new Set(refusals().slice(FLOOD))].join(' | ')}`,
    );
    const ownChecked = payments.voucherSignaturesChecked - ownBefore;
    assert.ok(ownChecked <= FORGED_VOUCHERS_BURST + 8, `${ownChecked} of the lane client's ${FLOOD} forged vouchers were checked`);
    assert.equal(payments.lanes()[0]!.paidMicros, 0, 'no forged voucher was taken');

    // The payer's own voucher, once the lane's budget for forged ones has refilled, is taken; sent fifty times at once
    // (as the SDK sends its best voucher again on each request until it is held), its signature is checked once.
    await new Promise((r) => setTimeout(r, 1_000 / FORGED_VOUCHERS_PER_SECOND + 100));
    const checked = payments.voucherSignaturesChecked;
    const honest = await payer.voucher(agent.id, { cumulative: 4 * KWS, seq: 4, send: false });
    for (let i = 0; i < 50; i++) payer.publishRaw(topics.agentVoucher(agent.id, payer.clientId), encodeMessage(honest));
    await waitFor(() => payments.lanes()[0]?.paidMicros === 4 * KWS, 5_000, 'the honest voucher');
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(payments.voucherSignaturesChecked - checked, 1, 'one check for the voucher sent fifty times');
  });

  test('lane squatting: a client naming a payer without its grant is refused; the payer’s grant works; a newer grant moves the lane', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const wallet = await payerWallet(payout, 1_000_000n);
    const squatter = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-squatter' });
    const owner = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-owner' });
    await owner.waitForModel('kws');
    await squatter.waitForModel('kws');
    const agentId = agent.id;
    const request = (grant: Awaited<ReturnType<TestPayer['grant']>> | undefined, seed: number): InferRequest => ({
      v: PROTOCOL_VERSION,
      kind: 'req',
      id: newRequestId(),
      deadline: Date.now() + 5_000,
      model: 'kws',
      inputs: encodeTensorMap(sampleInputs('kws', seed)),
      pay: { payer: owner.payer, ...(grant ? { grant } : {}) },
    });

    // The squatter first, before the real payer ever spoke: no grant, a grant for another client, a forged grant.
    const noGrant = await squatter.send(agentId, request(undefined, 1));
    assert.equal(codeOf(noGrant), 'MESH_FORBIDDEN');
    assert.match((noGrant as ErrorReply).message, /grant/);
    const othersGrant = await owner.grant(agentId); // the owner's grant names app-owner
    assert.equal(codeOf(await squatter.send(agentId, request(othersGrant, 2))), 'MESH_FORBIDDEN');
    const stranger = ethers.Wallet.createRandom();
    const forgedTerms = { agent: payout, client: 'app-squatter', issuedAt: Date.now() };
    const forged = { ...forgedTerms, payer: owner.payer, sig: fromHex(await signLaneGrant(stranger, domain(), forgedTerms)) };
    assert.equal(codeOf(await squatter.send(agentId, request(forged, 3))), 'MESH_FORBIDDEN');
    assert.equal(agent.payments!.lanes().length, 0, 'no lane was opened in the payer’s name');

    // The real payer's grant works, and the squatter is still refused.
    assert.equal(codeOf(await owner.request('kws', sampleInputs('kws', 4))), 'ok');
    assert.equal(codeOf(await squatter.send(agentId, request(undefined, 5))), 'MESH_FORBIDDEN');
    assert.equal(agent.payments!.lanes()[0]!.senderId, 'app-owner');

    // The payer moves its lane to another client with a newer grant; the old client is refused from then on.
    const moved = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-moved' });
    await moved.waitForModel('kws');
    const newer = await moved.grant(agentId, { issuedAt: Date.now() + 1 });
    const onMoved = await moved.send(agentId, request(newer, 6));
    assert.equal(onMoved.kind, 'res');
    assert.equal(onMoved.receipt!.seq, 2, 'the lane goes on where it was');
    assert.equal(agent.payments!.lanes()[0]!.senderId, 'app-moved');
    const old = await owner.send(agentId, request(othersGrant, 7));
    assert.equal(codeOf(old), 'MESH_FORBIDDEN', 'an older grant does not take the lane back');
    // What the squatter cost anyone: nothing was billed on its requests.
    assert.equal(agent.payments!.lanes()[0]!.receipts, 2);
  });

  test('a payer that refuses receipts costs the agent at most one credit window', async (t) => {
    const broker = await brokerFor(t);
    const window = 3 * KWS;
    const { agent, payout } = await paidAgent(t, broker.url, { creditMicros: window });
    const wallet = await payerWallet(payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-refuser', autoPay: false });
    await payer.waitForModel('kws');
    const agentId = agent.id;
    // The payer checks every receipt but pays only every other one (its vouchers say how far it checked).
    let paid = 0;
    let lastCode = 'ok';
    for (let i = 0; i < 50 && lastCode === 'ok'; i++) {
      const reply = await payer.request('kws', sampleInputs('kws', i));
      lastCode = codeOf(reply);
      if (lastCode !== 'ok') break;
      if (reply.receipt!.seq % 2 === 1) {
        paid += KWS;
        const want = paid;
        await payer.voucher(agentId, { cumulative: want, seq: reply.receipt!.seq });
        await waitFor(() => agent.payments!.lanes()[0]!.paidMicros === want, 3_000, 'the voucher');
      }
    }
    assert.equal(lastCode, 'MESH_CREDIT_EXCEEDED');
    let lane = agent.payments!.lanes()[0]!;
    assert.ok(lane.refusedMicros > 0, 'the agent learnt what the payer refused');
    assert.ok(
      lane.owedMicros - lane.paidMicros <= window,
      `the agent lost ${lane.owedMicros - lane.paidMicros}, at most one window (${window})`,
    );

    // A token voucher naming the last seq does not buy more work: it shows the payer refused a window's worth.
    const checked = payer.lane(agentId).verifier.state.seq;
    await payer.voucher(agentId, { cumulative: paid + 1, seq: checked });
    await waitFor(() => agent.payments!.lanes()[0]!.paidMicros === paid + 1, 3_000, 'the token voucher');
    const cut = await payer.request('kws', sampleInputs('kws', 99));
    assert.equal(codeOf(cut), 'MESH_CREDIT_EXCEEDED');
    assert.match((cut as ErrorReply).message, /refused/);
    lane = agent.payments!.lanes()[0]!;
    assert.equal(lane.refusedMicros, lane.owedMicros - lane.paidMicros);
    assert.ok(lane.owedMicros - lane.paidMicros <= window);
    // What it did pay settles.
    assert.equal(await settleBest(agent, payout), BigInt(lane.paidMicros));
  });

  test('a resync returns the journal’s receipts after a seq, only to the client the lane is granted to; paid replies say where the lane stands', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url);
    const wallet = await payerWallet(payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-resync' });
    await payer.waitForModel('kws');
    const agentId = agent.id;
    const replies: (InferReply | ErrorReply)[] = [];
    for (let i = 0; i < 5; i++) {
      replies.push(await payer.request('kws', sampleInputs('kws', i)));
      await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === (i + 1) * KWS, 3_000, 'the voucher');
    }
    // Every paid reply carries the lane as it stood when the answer left: its last seq (the answer's own receipt
    // follows the answer, so that is the one before), and the best voucher held.
    assert.deepEqual(
      replies.map((r) => r.lane?.seq),
      [0, 1, 2, 3, 4],
    );
    assert.deepEqual(
      replies.map((r) => r.receipt?.seq),
      [1, 2, 3, 4, 5],
      'each answer’s receipt came after it',
    );
    assert.deepEqual(
      replies.map((r) => r.lane?.paid),
      [0, 2, 4, 6, 8],
    );

    const batches = await payer.resync(agentId, 2);
    assert.equal(batches.length, 1);
    const journal = await agent.payments!.receipts(wallet.address);
    assert.deepEqual(
      batches[0]!.receipts.map((r) => r.seq),
      [3, 4, 5],
    );
    assert.deepEqual(batches[0]!.receipts, journal.slice(2));
    assert.deepEqual(batches[0]!.lane, { seq: 5, paid: 5 * KWS });
    // A payer that lost its state checks the whole lane again from the journal and goes on.
    const fresh = new LaneVerifier({ payer: payer.payer, quote: verifyQuote(agent.status().quote, { agentId }) });
    for (const r of (await payer.resync(agentId, 0))[0]!.receipts) fresh.verify(r);
    assert.equal(fresh.state.seq, 5);
    assert.equal(fresh.state.cumulative, 5 * KWS);

    // Another client asking for the same payer's lane gets nothing.
    const other = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-snoop' });
    await other.waitForModel('kws');
    assert.deepEqual(await other.resync(agentId, 0), []);
    assert.equal(agent.payments!.counters.resyncsRefused, 1);
  });

  test('resync answers in batches of at most 256 receipts, in seq order', async (t) => {
    const broker = await brokerFor(t);
    const count = 300;
    const { agent, payout } = await paidAgent(t, broker.url, { creditMicros: count * KWS });
    const wallet = await payerWallet(payout, 1_000_000n);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-batches', autoPay: false });
    await payer.waitForModel('kws');
    // Concurrent requests, ten at a time, so 300 receipts take a few seconds.
    for (let i = 0; i < count; i += 10) {
      const codes = await Promise.all(Array.from({ length: 10 }, (_, j) => payer.request('kws', sampleInputs('kws', i + j)).then(codeOf)));
      assert.deepEqual(codes, Array(10).fill('ok'));
    }
    const batches = await payer.resync(agent.id, 10, 2_000);
    assert.deepEqual(
      batches.map((b) => b.receipts.length),
      [256, count - 10 - 256],
    );
    const seqs = batches.flatMap((b) => b.receipts.map((r) => r.seq));
    assert.deepEqual(
      seqs,
      Array.from({ length: count - 10 }, (_, i) => i + 11),
    );
  });
});

async function payerClient(): Promise<EscrowClient> {
  return EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
}
