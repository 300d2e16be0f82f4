/**
 * Receipts and vouchers through the mesh: a real broker on port 0, real ONNX sessions, an agent that
 * takes payment, raw senders and the SDK paying with an ethers wallet. No chain here: vouchers are
 * checked by signature recovery (the settlement tests put them on a chain).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { describe, test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type ErrorReply,
  type EscrowDomain,
  encodeMessage,
  encodeTensorMap,
  fromHex,
  generateIdentity,
  type InferReply,
  type InferRequest,
  LaneVerifier,
  merkleRoot,
  newRequestId,
  PROTOCOL_VERSION,
  RECEIPT_STATUS,
  type SignedReceipt,
  signVoucher,
  toHex,
  topics,
  verifyQuote,
} from '@edge-mesh/protocol';
import { type Signer, Wallet } from 'ethers';
import { AgentPayments } from '../edge-agent/src/payments.ts';
import { agentFor, brokerFor, meshFor, quiet, rawClient, spawnAgent, tempDir, waitFor } from './helpers.ts';

const domain: EscrowDomain = { chainId: 31337n, escrow: `0x${'e5'.repeat(20)}` };
const payout = `0x${'b0'.repeat(20)}`;

function wire(model: string, seed = 1): InferRequest['inputs'] {
  return encodeTensorMap(sampleInputs(model, seed));
}

function paidRequest(model: string, payer: string, deadlineInMs = 10_000, seed = 1): InferRequest {
  return {
    v: PROTOCOL_VERSION,
    kind: 'req',
    id: newRequestId(),
    deadline: Date.now() + deadlineInMs,
    model,
    inputs: wire(model, seed),
    pay: { payer },
  };
}

const receiptOf = (reply: InferReply | ErrorReply): SignedReceipt => {
  assert.ok(reply.receipt, `reply ${reply.kind} ${reply.kind === 'err' ? `${reply.code} ${reply.message}` : ''} carries a receipt`);
  return reply.receipt;
};

async function voucherFor(wallet: Signer & { address: string }, cumulative: number, leaves: Uint8Array[]) {
  const receiptsRoot = merkleRoot(leaves);
  const expiry = Math.floor(Date.now() / 1000) + 3600;
  const sig = await signVoucher(wallet, domain, {
    agent: payout,
    cumulative: BigInt(cumulative),
    receiptsRoot: toHex(receiptsRoot),
    expiry: BigInt(expiry),
  });
  return {
    v: PROTOCOL_VERSION,
    kind: 'voucher',
    payer: wallet.address.toLowerCase(),
    agent: payout,
    cumulative,
    receiptsRoot,
    expiry,
    sig: fromHex(sig),
  } as const;
}

describe('receipts and payment through the mesh', () => {
  test('the SDK verifies every receipt and pays exactly the ok work with vouchers; the agent keeps the best voucher', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentFor(t, { brokerUrl: broker.url, payment: { payout, domain, dataDir: await tempDir(t), creditRequests: 2 } });
    const wallet = Wallet.createRandom();
    const identity = generateIdentity('app');
    const payerDir = await tempDir(t);
    const mesh = await meshFor(t, { brokerUrl: broker.url, identity, payment: { signer: wallet, domain, dataDir: payerDir } });
    await mesh.waitForModel('kws');
    const price = agent.models.find((m) => m.name === 'kws')!.priceMicros;
    // More requests than the credit window: vouchers must keep up for all to be served.
    for (let i = 0; i < 12; i++) await mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 5_000 });
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 12 * price, 5_000, 'vouchers for every receipt');
    const [lane] = mesh.lanes();
    assert.equal(lane!.agentId, agent.id);
    assert.equal(lane!.payout, payout);
    assert.equal(lane!.receipts, 12);
    assert.equal(lane!.owedMicros, 12 * price);
    assert.equal(lane!.paidMicros, 12 * price);
    assert.equal(lane!.refused, 0);
    const agentLane = agent.payments!.lanes()[0]!;
    assert.equal(agentLane.payer, wallet.address.toLowerCase());
    assert.equal(agentLane.owedMicros, 12 * price);
    assert.ok(agentLane.voucher && agentLane.voucher.cumulative === 12 * price);
    // The journal is the whole chain, and an independent verifier accepts it.
    const journal = await agent.payments!.receipts(wallet.address);
    assert.equal(journal.length, 12);
    const verifier = new LaneVerifier({ payer: wallet.address, quote: verifyQuote(agent.status().quote) });
    for (const r of journal) verifier.verify(r);
    assert.equal(verifier.state.cumulative, 12 * price);

    // The payer restarts on its data folder: the lane goes on from seq 13 and stays paid up.
    await mesh.close();
    const again = await meshFor(t, { brokerUrl: broker.url, identity, payment: { signer: wallet, domain, dataDir: payerDir } });
    await again.waitForModel('kws');
    for (let i = 0; i < 3; i++) await again.infer('kws', sampleInputs('kws', 20 + i), { deadlineMs: 5_000 });
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 15 * price, 5_000, 'vouchers after the restart');
    assert.equal(again.lanes()[0]!.receipts, 15);
    assert.equal(again.lanes()[0]!.refused, 0);
  });

  test('timed-out and cancelled requests cost 0, the chain stays whole, and a free request gets no receipt', async (t) => {
    const broker = await brokerFor(t, { maxPacketBytes: 16 << 20 });
    // One job at a time on the worker, so what waits behind it stays in the agent's queue; every model on
    // the worker (inline, the wake-word requests would not wait behind the detection).
    const agent = await agentFor(t, {
      brokerUrl: broker.url,
      pipelineDepth: 1,
      inlineMaxMs: 0,
      maxMessageBytes: 16 << 20,
      payment: { payout, domain, dataDir: await tempDir(t) },
    });
    const payer = Wallet.createRandom().address.toLowerCase();
    const raw = await rawClient(t, broker.url, 'raw-payer');
    const verifier = new LaneVerifier({ payer, quote: verifyQuote(agent.status().quote, { agentId: agent.id }) });

    // A large detection (960 x 960, about ten times the sample) holds the only worker for 100 ms or more.
    const big = (): InferRequest => ({
      ...paidRequest('ocr-det', payer, 20_000),
      inputs: { x: { dtype: 'float32', shape: [1, 3, 960, 960], data: new Uint8Array(3 * 960 * 960 * 4) } },
    });
    const first = big();
    const firstReply = raw.request(agent.id, first.id, first, 20_000);
    await waitFor(() => agent.loadReport().inFlight === 1, 10_000, 'the big detection running');
    // Behind it: a request whose deadline passes in the queue, and one the payer cancels before it runs.
    const short = paidRequest('kws', payer);
    short.deadline = Date.now() + 40;
    const shortReply = raw.request(agent.id, short.id, short);
    const cancelled = paidRequest('kws', payer, 20_000);
    const cancelledReply = raw.request(agent.id, cancelled.id, cancelled, 20_000);
    await waitFor(() => agent.loadReport().queued === 2, 5_000, 'both queued');
    raw.client.publish(
      topics.agentCancel(agent.id, 'raw-payer'),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'cancel', id: cancelled.id }),
      { qos: 1 },
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

    // Without a payer lane the agent serves as it always did: no receipt, nothing owed.
    const free = paidRequest('kws', payer);
    delete free.pay;
    const freeReply = await raw.request(agent.id, free.id, free);
    assert.equal(freeReply.kind, 'res');
    assert.equal(freeReply.receipt, undefined);
    assert.equal(agent.payments!.lanes()[0]!.receipts, 3);
    assert.equal(agent.payments!.lanes()[0]!.owedMicros, det);
  });

  test('the credit window: beyond it MESH_CREDIT_EXCEEDED until a voucher from the payer arrives; forged vouchers and lane squatters are refused', async (t) => {
    const broker = await brokerFor(t);
    const kwsPrice = 2;
    const agent = await agentFor(t, {
      brokerUrl: broker.url,
      payment: { payout, domain, dataDir: await tempDir(t), creditMicros: 2 * kwsPrice },
    });
    const wallet = Wallet.createRandom();
    const payer = wallet.address.toLowerCase();
    const raw = await rawClient(t, broker.url, 'raw-credit');
    const price = agent.models.find((m) => m.name === 'kws')!.priceMicros;
    assert.equal(price, kwsPrice);
    const send = (m: InferRequest) => raw.request(agent.id, m.id, m);

    const leaves: Uint8Array[] = [];
    const verifier = new LaneVerifier({ payer, quote: verifyQuote(agent.status().quote) });
    for (let i = 0; i < 2; i++) leaves.push(verifier.verify(receiptOf(await send(paidRequest('kws', payer)))).leaf.slice());
    const refused = await send(paidRequest('kws', payer));
    assert.equal(refused.kind === 'err' && refused.code, 'MESH_CREDIT_EXCEEDED');
    assert.equal(refused.receipt, undefined, 'a refused request costs nothing and takes no seq');

    // Another client naming the same payer cannot use (or exhaust) the lane.
    const squatter = await rawClient(t, broker.url, 'raw-squatter');
    const squat = paidRequest('kws', payer);
    const squatReply = await squatter.request(agent.id, squat.id, squat);
    assert.equal(squatReply.kind === 'err' && squatReply.code, 'MESH_FORBIDDEN');

    // Nor can a client multiply its credit by naming fresh payers: lanes per client are capped (default 4).
    const codes: string[] = [];
    for (let i = 0; i < 4; i++) {
      const m = paidRequest('kws', Wallet.createRandom().address.toLowerCase());
      const r = await squatter.request(agent.id, m.id, m);
      codes.push(r.kind === 'err' ? r.code : 'ok');
    }
    assert.deepEqual(codes, ['ok', 'ok', 'ok', 'ok']);
    const fifthLane = paidRequest('kws', Wallet.createRandom().address.toLowerCase());
    const fifthReply = await squatter.request(agent.id, fifthLane.id, fifthLane);
    assert.equal(fifthReply.kind === 'err' && fifthReply.code, 'MESH_FORBIDDEN');

    // A voucher signed by someone else is refused; the window stays shut.
    const forged = await voucherFor(Wallet.createRandom(), 2 * price, leaves);
    raw.client.publish(topics.agentVoucher(agent.id, 'raw-credit'), encodeMessage({ ...forged, payer }), { qos: 1 });
    await waitFor(() => agent.payments!.counters.vouchersRefused === 1, 3_000, 'forged voucher refused');
    const stillRefused = await send(paidRequest('kws', payer));
    assert.equal(stillRefused.kind === 'err' && stillRefused.code, 'MESH_CREDIT_EXCEEDED');

    // The payer's voucher for what it owes reopens the window.
    raw.client.publish(topics.agentVoucher(agent.id, 'raw-credit'), encodeMessage(await voucherFor(wallet, 2 * price, leaves)), { qos: 1 });
    await waitFor(() => agent.payments!.lanes()[0]!.paidMicros === 2 * price, 3_000, 'voucher accepted');
    const served = await send(paidRequest('kws', payer));
    assert.equal(served.kind, 'res');
    assert.equal(verifier.verify(receiptOf(served)).cumulative, 3 * price);

    // A voucher can also ride on the next request.
    const piggy = {
      ...paidRequest('kws', payer),
      pay: { payer, voucher: await voucherFor(wallet, 3 * price, [verifier.state.lastLeaf].map(fromHex)) },
    };
    assert.equal((await send(piggy)).kind, 'res');
    assert.equal(agent.payments!.lanes()[0]!.paidMicros, 3 * price);
  });

  test('receipts and vouchers survive kill -9 of the agent and a restart on the same data folder', async (t) => {
    const broker = await brokerFor(t);
    const dataDir = await tempDir(t);
    const identity = generateIdentity('agent');
    const args = [
      '--payout',
      payout,
      '--escrow',
      domain.escrow,
      '--chain-id',
      String(domain.chainId),
      '--data',
      dataDir,
      '--credit-requests',
      '3',
    ];
    let child = await spawnAgent(t, broker.url, identity, args);
    const wallet = Wallet.createRandom();
    const payer = wallet.address.toLowerCase();
    const raw = await rawClient(t, broker.url, 'raw-durable');
    const send = (m: InferRequest) => raw.request(agent, m.id, m, 10_000);
    const agent = identity.id;
    const watcher = await meshFor(t, { brokerUrl: broker.url });
    await watcher.waitForModel('kws');
    const quote = verifyQuote(watcher.agents().find((a) => a.id === agent)!.status.quote);
    const verifier = new LaneVerifier({ payer, quote });
    const leaves: Uint8Array[] = [];
    for (let i = 0; i < 3; i++) leaves.push(verifier.verify(receiptOf(await send(paidRequest('kws', payer)))).leaf.slice());
    const voucher = await voucherFor(wallet, verifier.state.cumulative, leaves);
    raw.client.publish(topics.agentVoucher(agent, 'raw-durable'), encodeMessage(voucher), { qos: 1 });
    await new Promise((r) => setTimeout(r, 300));
    const fourth = await send(paidRequest('kws', payer));
    assert.equal(fourth.kind, 'res');
    verifier.verify(receiptOf(fourth));

    child.kill('SIGKILL');
    await once(child, 'exit');
    child = await spawnAgent(t, broker.url, identity, args);
    // The lane goes on where it stopped: seq 5 chains onto seq 4, the cumulative continues.
    const fifth = await send(paidRequest('kws', payer));
    const accepted = verifier.verify(receiptOf(fifth));
    assert.equal(receiptOf(fifth).seq, 5);
    assert.equal(accepted.cumulative, verifier.state.cumulative);

    child.kill('SIGTERM');
    await once(child, 'exit');
    const store = await AgentPayments.open(identity, { payout, domain, dataDir }, [], quiet);
    t.after(() => store.close());
    const journal = await store.receipts(payer);
    assert.deepEqual(
      journal.map((r) => r.seq),
      [1, 2, 3, 4, 5],
    );
    const lane = store.lanesSummary()[0]!;
    assert.equal(lane.owedMicros, verifier.state.cumulative);
    assert.equal(lane.voucher?.cumulative, voucher.cumulative);
    assert.equal(lane.voucher?.sig, toHex(voucher.sig));
  });
});
