/**
 * Receipts and vouchers through the mesh: a real broker on port 0, real ONNX sessions, an agent that
 * takes payment on a real local chain (it gives credit only against money on the lane), and a payer
 * with a lane grant speaking over a bare MQTT connection (test/payer.ts). With MESH_TEST_ENGINE the same
 * tests run on an external engine (test/engines.ts).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { after, before, describe, type TestContext, test } from 'node:test';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type ErrorReply,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  type InferReply,
  type InferRequest,
  type LaneGrant,
  LaneVerifier,
  newRequestId,
  PROTOCOL_VERSION,
  RECEIPT_STATUS,
  type SignedReceipt,
  toHex,
  topics,
  verifyQuote,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { AgentPayments } from '../edge-agent/src/payments.ts';
import { ENGINE_SKIP } from './engines.ts';
import { agentFor, meshBrokerFor as brokerFor, quiet, spawnAgent, tempDir, waitFor } from './helpers.ts';
import { TestPayer } from './payer.ts';
import { SPIN_WIDTH, writeSpinModel, writeWidenModel } from './spin-model.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextWallet = 1;

const domain = () => ({ chainId: deployment.chainId, escrow: deployment.escrow });

async function fundedWallet(payout: string, amount = 1_000_000n): Promise<ethers.Wallet> {
  const wallet = chain.wallet(nextWallet++);
  const client = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
  await client.mint(wallet.address, amount);
  await client.fund(wallet.address, payout, amount);
  return wallet;
}

function paidRequest(payer: TestPayer, model: string, grant: LaneGrant | undefined, deadlineInMs = 10_000, seed = 1): InferRequest {
  return paidRequestWith(payer, model, grant, encodeTensorMap(sampleInputs(model, seed)), deadlineInMs);
}

/** A paid request with the given wire inputs (a model the demo has no sample inputs for). */
function paidRequestWith(
  payer: TestPayer,
  model: string,
  grant: LaneGrant | undefined,
  inputs: InferRequest['inputs'],
  deadlineInMs = 10_000,
): InferRequest {
  return {
    v: PROTOCOL_VERSION,
    kind: 'req',
    id: newRequestId(),
    deadline: Date.now() + deadlineInMs,
    model,
    inputs,
    pay: { payer: payer.payer, ...(grant ? { grant } : {}) },
  };
}

/** widen's one input, x [1, 1]. */
const WIDEN_INPUT = encodeTensorMap({ x: { dtype: 'float32', shape: [1, 1], data: new Float32Array([2]) } });

const receiptOf = (reply: InferReply | ErrorReply): SignedReceipt => {
  assert.ok(reply.receipt, `reply ${reply.kind} ${reply.kind === 'err' ? `${reply.code} ${reply.message}` : ''} carries a receipt`);
  return reply.receipt;
};

async function paidAgent(t: TestContext, brokerUrl: string, extra: Record<string, unknown> = {}) {
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const { payment, ...rest } = extra as { payment?: Record<string, unknown> };
  const agent = await agentFor(t, {
    brokerUrl,
    ...rest,
    payment: { payout, domain: domain(), dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100, ...payment },
  });
  return { agent, payout };
}

describe('receipts and payment through the mesh', { skip: ENGINE_SKIP, timeout: 600_000 }, () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 20 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('the payer checks every receipt and pays exactly the ok work with vouchers; the agent keeps the best voucher; a payer that lost its state resyncs', async (t) => {
    const broker = await brokerFor(t);
    const { agent, payout } = await paidAgent(t, broker.url, { payment: { creditRequests: 2 } });
    const wallet = await fundedWallet(payout);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-payer' });
    await payer.waitForModel('kws');
    const price = agent.models.find((m) => m.name === 'kws')!.priceMicros;
    // More requests than the credit window: vouchers must keep up for all to be served.
    for (let i = 0; i < 12; i++) {
      await payer.infer('kws', sampleInputs('kws', i), { deadlineMs: 5_000 });
      await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === (i + 1) * price, 5_000, 'the voucher');
    }
    const [lane] = payer.lanesView();
    assert.equal(lane!.agentId, agent.id);
    assert.equal(lane!.payout, payout);
    assert.equal(lane!.receipts, 12);
    assert.equal(lane!.owedMicros, 12 * price);
    assert.equal(lane!.paidMicros, 12 * price);
    assert.equal(lane!.refused, 0);
    const agentLane = agent.payments!.lanes()[0]!;
    assert.equal(agentLane.payer, wallet.address.toLowerCase());
    assert.equal(agentLane.senderId, payer.clientId);
    assert.equal(agentLane.owedMicros, 12 * price);
    assert.equal(agentLane.refusedMicros, 0);
    assert.ok(agentLane.voucher && agentLane.voucher.cumulative === 12 * price);
    // The journal is the whole chain, and an independent verifier accepts it.
    const journal = await agent.payments!.receipts(wallet.address);
    assert.equal(journal.length, 12);
    const verifier = new LaneVerifier({ payer: wallet.address, quote: verifyQuote(agent.status().quote) });
    for (const r of journal) verifier.verify(r);
    assert.equal(verifier.state.cumulative, 12 * price);

    // The payer restarts with no lane state: it asks the agent for the lane's receipts, checks them, and goes on from seq 13.
    await payer.close();
    const again = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'app-payer' });
    await again.waitForModel('kws');
    assert.equal(await again.recover(agent.id), 12);
    for (let i = 0; i < 3; i++) await again.infer('kws', sampleInputs('kws', 20 + i), { deadlineMs: 5_000 });
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 15 * price, 5_000, 'vouchers after the restart');
    assert.equal(again.lanesView()[0]!.receipts, 15);
    assert.equal(again.lanesView()[0]!.refused, 0);
  });

  test('timed-out and cancelled requests cost 0, the chain stays whole, and a request naming no payer is refused MESH_PAYMENT_REQUIRED', async (t) => {
    const broker = await brokerFor(t, { maxPacketBytes: 16 << 20 });
    // One job at a time on the worker, so what waits behind it stays in the agent's queue; every model on
    // the worker (inline, the wake-word requests would not wait behind the detection).
    // Admission off, so the short deadline below is queued and expires there (on, it is refused at once, unbilled).
    const { agent, payout } = await paidAgent(t, broker.url, {
      pipelineDepth: 1,
      inlineMaxMs: 0,
      maxMessageBytes: 16 << 20,
      admission: false,
    });
    const wallet = await fundedWallet(payout);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'raw-payer', autoPay: false });
    await payer.waitForModel('kws');
    const grant = await payer.grant(agent.id);
    const verifier = new LaneVerifier({ payer: payer.payer, quote: verifyQuote(agent.status().quote, { agentId: agent.id }) });

    // A large detection (960 x 960, about ten times the sample) holds the only worker for 100 ms or more.
    const big = (): InferRequest => ({
      ...paidRequest(payer, 'ocr-det', grant, 20_000),
      inputs: { x: { dtype: 'float32', shape: [1, 3, 960, 960], data: new Uint8Array(3 * 960 * 960 * 4) } },
    });
    const firstReply = payer.send(agent.id, big(), 20_000);
    await waitFor(() => agent.loadReport().inFlight === 1, 10_000, 'the big detection running');
    // Behind it: a request whose deadline passes in the queue, and one the payer cancels before it runs.
    const short = paidRequest(payer, 'kws', grant);
    short.deadline = Date.now() + 40;
    const shortReply = payer.send(agent.id, short);
    const cancelled = paidRequest(payer, 'kws', grant, 20_000);
    const cancelledReply = payer.send(agent.id, cancelled, 20_000);
    await waitFor(() => agent.loadReport().queued === 2, 5_000, 'both queued');
    payer.client.publish(
      topics.agentCancel(agent.id, payer.clientId),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: cancelled.id }),
      {
        qos: 1,
      },
    );
    const replies = [await firstReply, await shortReply, await cancelledReply];
    assert.deepEqual(
      replies.map((r) => (r.kind === 'err' ? r.code : 'ok')),
      ['ok', 'MESH_DEADLINE_EXCEEDED', 'MESH_CANCELLED'],
    );
    const [ok, timeout, cancel] = replies.map(receiptOf);
    for (const r of [ok!, timeout!, cancel!].sort((a, b) => a.seq - b.seq)) verifier.verify(r);
    const det = agent.models.find((m) => m.name === 'ocr-det')!.priceMicros;
    assert.equal(ok!.status, RECEIPT_STATUS.ok);
    assert.equal(ok!.price, det);
    assert.equal(timeout!.status, RECEIPT_STATUS.timeout);
    assert.equal(timeout!.price, 0);
    assert.ok(Buffer.from(timeout!.outputHash).equals(Buffer.alloc(32)), 'no outputs, zero output hash');
    assert.equal(cancel!.status, RECEIPT_STATUS.cancelled);
    assert.equal(cancel!.unitsUsed, 0);
    assert.equal(cancel!.price, 0, 'cancelled before it ran: max(minCharge 0, 0 units)');
    assert.equal(verifier.state.cumulative, det);

    // A cancel while the run is under way costs the units done when it arrived: none yet for a one-shot model, not the full price.
    const running = big();
    const runningReply = payer.send(agent.id, running, 20_000);
    await waitFor(() => agent.loadReport().inFlight === 1, 10_000, 'the second detection running');
    payer.client.publish(
      topics.agentCancel(agent.id, payer.clientId),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: running.id }),
      {
        qos: 1,
      },
    );
    const stopped = await runningReply;
    assert.equal(stopped.kind === 'err' && stopped.code, 'MESH_CANCELLED');
    const stoppedReceipt = verifier.verify(receiptOf(stopped));
    assert.equal(receiptOf(stopped).status, RECEIPT_STATUS.cancelled);
    assert.equal(receiptOf(stopped).unitsUsed, 0);
    assert.equal(receiptOf(stopped).price, 0, 'max(minCharge 0, unit × 0 units done)');
    assert.equal(stoppedReceipt.cumulative, det);

    // Without a payer lane the agent refuses: it serves only paid work by default. No receipt, nothing owed.
    const free = paidRequest(payer, 'kws', undefined);
    delete free.pay;
    const freeReply = await payer.send(agent.id, free);
    assert.equal(freeReply.kind === 'err' && freeReply.code, 'MESH_PAYMENT_REQUIRED');
    assert.equal(freeReply.receipt, undefined);
    assert.equal(agent.payments!.lanes()[0]!.receipts, 4);
    assert.equal(agent.payments!.lanes()[0]!.owedMicros, det);
  });

  test("outputs over the agent's message cap: a coded MESH_TOO_LARGE at once, a failed receipt billed 0, and the agent serves on", async (t) => {
    // widen answers 128 KB for a 4-byte input; the agent's cap is 64 KB. Before, the agent sent the answer anyway and
    // billed it: a client under that cap dropped it and waited for its deadline, and paid for an answer it never read.
    const modelsDir = await tempDir(t);
    const widen = await writeWidenModel(modelsDir, 32_768, { priceMicros: 7 });
    const spin = await writeSpinModel(modelsDir, { priceMicros: 3 }, 4);
    await writeFile(path.join(modelsDir, 'manifest.json'), JSON.stringify({ models: [widen, spin] }));
    const broker = await brokerFor(t, { maxPacketBytes: 1 << 20 });
    const { agent, payout } = await paidAgent(t, broker.url, { modelsDir, maxMessageBytes: 64 << 10 });
    const wallet = await fundedWallet(payout);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'raw-payer-wide', autoPay: false });
    await payer.waitForModel('widen');
    const grant = await payer.grant(agent.id);
    const verifier = new LaneVerifier({ payer: payer.payer, quote: verifyQuote(agent.status().quote, { agentId: agent.id }) });
    const sent = Date.now();
    const wide = await payer.send(agent.id, paidRequestWith(payer, 'widen', grant, WIDEN_INPUT));
    assert.equal(wide.kind === 'err' && wide.code, 'MESH_TOO_LARGE', `got ${wide.kind}`);
    assert.ok(Date.now() - sent < 5_000, 'answered at once, not at the deadline');
    const wideReceipt = verifier.verify(receiptOf(wide));
    assert.equal(receiptOf(wide).status, RECEIPT_STATUS.failed);
    assert.equal(receiptOf(wide).price, 0);
    assert.equal(wideReceipt.cumulative, 0);
    // The agent serves on, and bills what it answers.
    const small = await payer.send(
      agent.id,
      paidRequestWith(
        payer,
        'spin',
        grant,
        encodeTensorMap({ x: { dtype: 'float32', shape: [1, SPIN_WIDTH], data: new Float32Array(SPIN_WIDTH) } }),
      ),
    );
    assert.equal(small.kind, 'res');
    assert.equal(verifier.verify(receiptOf(small)).cumulative, 3);
    assert.equal(agent.payments!.lanes()[0]!.owedMicros, 3);
  });

  test('outputs whose reply fits the cap only without its lane and timings: refused as too large too, not billed and dropped', async (t) => {
    // The check before billing measured a reply with no lane info and timings at 0; the reply that left had both. With
    // the cap between the two, the agent sent an answer over its own cap (a client under that cap drops it) and billed it.
    const identity = generateIdentity('agent');
    const width = 8_192;
    const outputs = encodeTensorMap({ y: { dtype: 'float32', shape: [1, width], data: new Float32Array(width).fill(2) } });
    const bare = encodeMessage({
      v: PROTOCOL_VERSION,
      kind: 'res',
      id: newRequestId(),
      agent: identity.id,
      model: 'widen',
      version: '1',
      outputs,
      queueMs: 0,
      execMs: 0,
      rif: 0,
      workMs: 0,
    }).byteLength;
    const modelsDir = await tempDir(t);
    const widen = await writeWidenModel(modelsDir, width, { priceMicros: 7 });
    await writeFile(path.join(modelsDir, 'manifest.json'), JSON.stringify({ models: [widen] }));
    const broker = await brokerFor(t, { maxPacketBytes: 1 << 20 });
    const { agent, payout } = await paidAgent(t, broker.url, { identity, modelsDir, maxMessageBytes: bare });
    const wallet = await fundedWallet(payout);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'raw-payer-near', autoPay: false });
    await payer.waitForModel('widen');
    const grant = await payer.grant(agent.id);
    const reply = await payer.send(agent.id, paidRequestWith(payer, 'widen', grant, WIDEN_INPUT));
    const { receipt: _receipt, ...sent } = reply;
    const bytes = encodeMessage(sent).byteLength;
    assert.ok(reply.kind === 'err' || bytes <= bare, `a ${reply.kind} of ${bytes} bytes went out over the agent's cap of ${bare}`);
    assert.equal(reply.kind === 'err' && reply.code, 'MESH_TOO_LARGE');
    assert.equal(receiptOf(reply).price, 0);
    assert.equal(agent.payments!.lanes()[0]!.owedMicros, 0);
  });

  test('the credit window: beyond it MESH_CREDIT_EXCEEDED until a voucher from the payer arrives; forged vouchers are refused; lanes per client are capped', async (t) => {
    const broker = await brokerFor(t);
    const kwsPrice = 2;
    const { agent, payout } = await paidAgent(t, broker.url, { payment: { creditMicros: 2 * kwsPrice } });
    const wallet = await fundedWallet(payout);
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'raw-credit', autoPay: false });
    await payer.waitForModel('kws');
    const price = agent.models.find((m) => m.name === 'kws')!.priceMicros;
    assert.equal(price, kwsPrice);
    const grant = await payer.grant(agent.id);
    const send = (m: InferRequest) => payer.send(agent.id, m);

    for (let i = 0; i < 2; i++) assert.equal((await send(paidRequest(payer, 'kws', grant))).kind, 'res');
    const refused = await send(paidRequest(payer, 'kws', grant));
    assert.equal(refused.kind === 'err' && refused.code, 'MESH_CREDIT_EXCEEDED');
    assert.equal(refused.receipt, undefined, 'a refused request costs nothing and takes no seq');
    assert.deepEqual(refused.lane, { seq: 2, paid: 0 }, 'the refusal says where the lane stands');

    // A voucher signed by someone else is refused; the window stays shut.
    const forger = await TestPayer.open(t, broker.url, { wallet: ethers.Wallet.createRandom(), domain: domain(), clientId: 'raw-forger' });
    await forger.waitForModel('kws');
    const forged = await forger.voucher(agent.id, { cumulative: 2 * price, seq: 2, send: false });
    payer.client.publish(topics.agentVoucher(agent.id, payer.clientId), encodeMessage({ ...forged, payer: payer.payer }), { qos: 1 });
    await waitFor(() => agent.payments!.counters.vouchersRefused === 1, 3_000, 'forged voucher refused');
    const stillRefused = await send(paidRequest(payer, 'kws', grant));
    assert.equal(stillRefused.kind === 'err' && stillRefused.code, 'MESH_CREDIT_EXCEEDED');

    // The forged voucher riding on a request, the window full: the request waits for its check, then is refused,
    // and the refusal is counted once.
    const creditRefusals = agent.payments!.counters.creditRefusals;
    const riddenForged = paidRequest(payer, 'kws', grant);
    riddenForged.pay!.voucher = { ...forged, payer: payer.payer };
    const forgedReply = await send(riddenForged);
    assert.equal(forgedReply.kind === 'err' && forgedReply.code, 'MESH_CREDIT_EXCEEDED');
    assert.equal(agent.payments!.counters.creditRefusals, creditRefusals + 1, 'one refusal counted');
    assert.equal(agent.payments!.lanes()[0]!.paidMicros, 0);

    // The payer's voucher for what it owes, riding on a request while the window is full: the request waits for the
    // voucher's check and is served within the room it makes.
    const ridden = paidRequest(payer, 'kws', grant);
    ridden.pay!.voucher = await payer.voucher(agent.id, { cumulative: 2 * price, seq: 2, send: false });
    const served = await send(ridden);
    assert.equal(served.kind, 'res');
    assert.equal(receiptOf(served).cumulative, 3 * price);
    assert.equal(agent.payments!.lanes()[0]!.paidMicros, 2 * price, 'the voucher was taken before the request');
    assert.equal(agent.payments!.counters.creditRefusals, creditRefusals + 1, 'no refusal counted for it');

    // A voucher can also ride on the next request. The window has room for the request without it, so it is not held
    // for the voucher's check (on the agent's signature worker), and the voucher is taken soon after.
    const piggy = paidRequest(payer, 'kws', grant);
    piggy.pay!.voucher = await payer.voucher(agent.id, { cumulative: 3 * price, seq: 3, send: false });
    assert.equal((await send(piggy)).kind, 'res');
    await waitFor(() => agent.payments!.lanes()[0]!.paidMicros === 3 * price, 3_000, 'the voucher that rode on the request is taken');

    // A client cannot multiply its credit without bound: even with grants, its lanes are capped (default 4).
    const many = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'raw-many' });
    await many.waitForModel('kws');
    const codes: string[] = [];
    for (let i = 0; i < 5; i++) {
      const other = await TestPayer.open(t, broker.url, {
        wallet: await fundedWallet(payout),
        domain: domain(),
        clientId: `raw-many-${i}`,
      });
      await other.waitForModel('kws');
      const m = paidRequest(other, 'kws', await other.grant(agent.id, { client: many.clientId }));
      const r = await many.send(agent.id, m);
      codes.push(r.kind === 'err' ? r.code : 'ok');
      await other.close();
    }
    assert.deepEqual(codes, ['ok', 'ok', 'ok', 'ok', 'MESH_FORBIDDEN']);
  });

  test('receipts and vouchers survive kill -9 of the agent and a restart on the same data folder', async (t) => {
    const broker = await brokerFor(t);
    const dataDir = await tempDir(t);
    const identity = generateIdentity('agent');
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const args = [
      ...['--payout', payout, '--escrow', deployment.escrow, '--chain-id', String(deployment.chainId), '--rpc', chain.rpcUrl],
      ...['--data', dataDir, '--credit-requests', '3'],
    ];
    let child = await spawnAgent(t, broker.url, identity, args);
    const wallet = await fundedWallet(payout);
    const agent = identity.id;
    const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: 'raw-durable', autoPay: false });
    await payer.waitForModel('kws');
    for (let i = 0; i < 3; i++) assert.equal((await payer.request('kws', sampleInputs('kws', i))).kind, 'res');
    const voucher = await payer.payChecked(agent);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal((await payer.request('kws', sampleInputs('kws', 3))).kind, 'res');

    child.kill('SIGKILL');
    await once(child, 'exit');
    child = await spawnAgent(t, broker.url, identity, args);
    // On a cluster the new status reaches the payer through another node, possibly after the agent logged it.
    await payer.waitForModel('kws');
    // The lane goes on where it stopped: seq 5 chains onto seq 4 (the payer's checks say so), the cumulative continues.
    const fifth = await payer.request('kws', sampleInputs('kws', 4));
    assert.equal(receiptOf(fifth).seq, 5);
    assert.equal(payer.lanesView()[0]!.refused, 0);
    assert.equal(payer.lanesView()[0]!.receipts, 5);

    child.kill('SIGTERM');
    await once(child, 'exit');
    const store = await AgentPayments.open(identity, { payout, domain: domain(), dataDir, provider: chain.provider }, [], quiet);
    t.after(() => store.close());
    const journal = await store.receipts(wallet.address);
    assert.deepEqual(
      journal.map((r) => r.seq),
      [1, 2, 3, 4, 5],
    );
    const lane = store.lanesSummary()[0]!;
    assert.equal(lane.owedMicros, payer.lanesView()[0]!.owedMicros);
    assert.equal(lane.senderId, payer.clientId, 'the grant survived too');
    assert.equal(lane.voucher?.cumulative, voucher.cumulative);
    assert.equal(lane.voucher?.sig, toHex(voucher.sig));
  });
});
