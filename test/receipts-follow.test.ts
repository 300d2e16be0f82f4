/**
 * Receipts that follow their answers, at a real paying agent (edge-agent/src/receipt-post.ts, docs/settlement.md,
 * "Receipts follow their answers"): a real local chain with the escrow, a real broker, a real ONNX agent, and a payer
 * that speaks the envelope by hand so that each message the agent sends can be seen.
 */
import assert from 'node:assert/strict';
import { after, before, describe, type TestContext, test } from 'node:test';
import type { AgentPaymentOptions } from '@edge-mesh/agent';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import {
  decodeMessage,
  encodeMessage,
  encodeTensorMap,
  fromHex,
  generateIdentity,
  hashTensorMap,
  type InferReply,
  type InferRequest,
  MAX_SIGNED_RECEIPT_BYTES,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  RECEIPT_STATUS,
  type ReceiptBatch,
  requestIdHex,
  signLaneGrant,
  type Tensor,
  topics,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { AgentPayments } from '../edge-agent/src/payments.ts';
import { earlierRoomBytes, ISSUE_BATCH, ReceiptPost } from '../edge-agent/src/receipt-post.ts';
import type { Job } from '../edge-agent/src/scheduler.ts';
import { agentFor, brokerFor, quiet, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, TestPayer } from './payer.ts';
import { SPIN_DEPTH, spinInputs, writeSpinFolder } from './spin-model.ts';

/** The model a test agent serves, when not kws: its name, the folder it is in, and the inputs of request `i`. */
interface Served {
  model?: string;
  modelsDir?: string;
  inputsOf?: (i: number) => Record<string, Tensor>;
}

let chain: LocalChain;
let deployment: MeshDeployment;
let nextWallet = 1;
const domain = () => ({ chainId: deployment.chainId, escrow: deployment.escrow });

/**
 * A paying kws agent (or one serving `model` from `modelsDir`) and a funded payer that records every message the agent
 * sends it.
 */
async function setup(
  t: TestContext,
  payment: Partial<AgentPaymentOptions>,
  { model = 'kws', modelsDir, inputsOf = (i: number) => sampleInputs('kws', i) }: Served = {},
) {
  const broker = await brokerFor(t);
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    // A model of its own runs on a worker: the agent's event loop goes on while it runs.
    ...(modelsDir ? { modelsDir, inlineMaxMs: 0 } : {}),
    // Each receipt issued in the turn after its answer (receiptIssueMs 0), as these tests count on, unless a test says.
    payment: {
      payout,
      domain: domain(),
      dataDir: await tempDir(t),
      provider: chain.provider,
      fundsPollMs: 100,
      receiptIssueMs: 0,
      ...payment,
    },
  });
  const wallet = chain.wallet(nextWallet++);
  await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
  const payer = await TestPayer.open(t, broker.url, { wallet, domain: domain(), clientId: `app-${nextWallet}` });
  await payer.waitForModel(model);
  const grant = await payer.grant(agent.id);
  const seen: (InferReply | ReceiptBatch)[] = [];
  payer.client.on('message', (topic, payload) => {
    if (!topic.includes('/res/')) return;
    const m = decodeMessage(payload, ['res', 'err', 'receipts']);
    if (m.kind !== 'err') seen.push(m);
  });
  const send = (i: number, id = newRequestId()): InferRequest => {
    const request: InferRequest = {
      v: PROTOCOL_VERSION,
      kind: 'req',
      id,
      deadline: Date.now() + 30_000,
      model,
      inputs: encodeTensorMap(inputsOf(i)),
      pay: { payer: payer.payer, grant },
    };
    payer.client.publish(topics.agentRequest(agent.id, payer.clientId), encodeMessage(request), { qos: 1 });
    return request;
  };
  const answerTo = async (request: InferRequest, nth = 1): Promise<InferReply> => {
    const key = requestIdHex(request.id);
    const answers = () => seen.filter((m): m is InferReply => m.kind === 'res' && requestIdHex(m.id) === key);
    await waitFor(() => answers().length >= nth, 10_000, `answer ${nth} to ${key}`);
    return answers()[nth - 1]!;
  };
  const batches = () => seen.filter((m): m is ReceiptBatch => m.kind === 'receipts');
  return { agent, payer, seen, send, answerTo, batches, brokerUrl: broker.url };
}

/** A ReceiptPost over real AgentPayments for client `app-a` of a funded payer: what it sends alone is kept in `sent`. */
async function postFor(t: TestContext, options: Partial<AgentPaymentOptions>) {
  const identity = generateIdentity('agent');
  const payout = ethers.Wallet.createRandom().address.toLowerCase();
  const wallet = chain.wallet(nextWallet++);
  const payer = wallet.address.toLowerCase();
  await fundOwnLane(wallet, deployment.escrow, payout, 1_000_000n);
  const payments = await AgentPayments.open(
    identity,
    {
      payout,
      domain: domain(),
      dataDir: await tempDir(t),
      provider: chain.provider,
      receiptLingerMs: 600_000,
      receiptIssueMs: 0,
      ...options,
    },
    [{ name: 'kws', sha256: 'ab'.repeat(32), priceMicros: 1 }],
    quiet,
  );
  t.after(() => payments.close());
  const terms = { agent: payout, client: 'app-a', issuedAt: Date.now() };
  const grant = { ...terms, payer, sig: fromHex(await signLaneGrant(wallet, domain(), terms)) };
  const sent: ReceiptBatch[] = [];
  const post = new ReceiptPost({
    agentId: identity.id,
    payments,
    logger: quiet,
    reply: (_senderId, payload) => sent.push(decodeMessage(payload, ['receipts']) as ReceiptBatch),
    sent: () => {},
  });
  // Nothing is left to linger once the test ends.
  t.after(() => post.flush());
  const inputs = sampleInputs('kws', 1);
  /** A paid kws job of `app-a`, admitted. */
  const job = async (): Promise<Job> => {
    const id = newRequestId();
    return {
      key: requestIdHex(id),
      id,
      senderId: 'app-a',
      model: 'kws',
      inputs,
      deadline: Date.now() + 30_000,
      receivedAt: performance.now(),
      startedAt: performance.now(),
      paid: await payments.admit(payer, 'app-a', 'kws', hashTensorMap(encodeTensorMap(inputs)), grant),
    };
  };
  return { payer, post, sent, job };
}

/**
 * Journal writes of `post`'s payments held until `release` is called, and done in order, as a slow fdatasync
 * (syncWrites) holds them.
 */
function holdJournal(post: ReceiptPost) {
  const payments = (post as unknown as { options: { payments: AgentPayments } }).options.payments;
  let release!: () => void;
  const held = new Promise<void>((resolve) => {
    release = resolve;
  });
  let last: Promise<void> = Promise.resolve();
  // issueAll, which `issue` calls too: every receipt, an answer's or another kind's, is held.
  const issueAll = payments.issueAll.bind(payments);
  payments.issueAll = (items) => {
    const out = issueAll(items);
    last = Promise.all([last, out.durable, held]).then(() => {});
    return { receipts: out.receipts, durable: last };
  };
  return { payments, release };
}

const turn = () => new Promise((resolve) => setImmediate(resolve));

describe('receipts that follow their answers', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 20 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('a paid answer leaves before its receipt, which rides on the next answer to its client; closing sends the last', async (t) => {
    const { agent, send, answerTo, batches, payer } = await setup(t, { receiptLingerMs: 600_000 });
    const first = send(1);
    const a1 = await answerTo(first);
    assert.equal(a1.receipt, undefined, 'the answer does not wait for its receipt');
    assert.equal(a1.earlier, undefined);
    assert.deepEqual(a1.lane, { seq: 0, paid: 0 }, 'the lane as it stood when the answer left');
    const second = send(2);
    const a2 = await answerTo(second);
    assert.equal(a2.earlier?.length, 1, 'the first answer’s receipt rides on the second');
    const r1 = a2.earlier![0]!;
    assert.equal(r1.seq, 1);
    assert.equal(requestIdHex(r1.requestId), requestIdHex(first.id));
    assert.deepEqual(r1.outputHash, hashTensorMap(a1.outputs), 'it bills the outputs that answer carried');
    assert.equal(r1.payer, payer.payer);
    assert.equal(batches().length, 0, 'no message of its own');
    // The second receipt waits for an answer that will not come: closing the agent sends it.
    await agent.close();
    await waitFor(() => batches().length === 1, 5_000, 'the last receipt on close');
    assert.deepEqual(
      batches()[0]!.receipts.map((r) => [r.seq, requestIdHex(r.requestId)]),
      [[2, requestIdHex(second.id)]],
    );
  });

  test('with no answer to ride on, a receipt comes by itself after the linger; a lane whose window is full gets it at once', async (t) => {
    const lingering = await setup(t, { receiptLingerMs: 200 });
    const request = lingering.send(1);
    await lingering.answerTo(request);
    await waitFor(() => lingering.batches().length === 1, 5_000, 'the receipt by itself');
    assert.equal(requestIdHex(lingering.batches()[0]!.receipts[0]!.requestId), requestIdHex(request.id));

    // A window of one request, and a linger and an issue wait far longer than the test: the receipt cannot wait, its
    // client needs it to pay.
    const full = await setup(t, { receiptLingerMs: 600_000, receiptIssueMs: 600_000, creditRequests: 1 });
    const paid = full.send(1);
    await full.answerTo(paid);
    await waitFor(() => full.batches().length === 1, 10_000, 'the receipt at once');
    assert.equal(requestIdHex(full.batches()[0]!.receipts[0]!.requestId), requestIdHex(paid.id));
  });

  test('a request that fills its lane’s window sends the receipts that wait to be issued or to linger at once', async (t) => {
    // spin, about 16 times its usual length: a request that runs long enough for receipts to go while it runs.
    const modelsDir = await tempDir(t, 'edge-mesh-spin-');
    await writeSpinFolder(modelsDir, 16 * SPIN_DEPTH);
    const inputsOf = (i: number) => spinInputs(i);
    // A window of two requests, and a linger far longer than the test; the receipts wait to be issued as long, or not.
    for (const receiptIssueMs of [600_000, 0]) {
      const { seen, send, answerTo } = await setup(
        t,
        { receiptLingerMs: 600_000, receiptIssueMs, creditRequests: 2 },
        { model: 'spin', modelsDir, inputsOf },
      );
      // The first answer leaves a window with room for one more request: its receipt may wait.
      const first = send(1);
      await answerTo(first);
      // The second fills the window: its client waits for the first receipt to pay before it may send a third, and
      // so the receipt goes while the second runs, not once it is answered.
      const second = send(2);
      const secondAnswer = await answerTo(second);
      const firstReceiptAt = seen.findIndex(
        (m) => m.kind === 'receipts' && m.receipts.some((r) => requestIdHex(r.requestId) === requestIdHex(first.id)),
      );
      assert.ok(firstReceiptAt >= 0, `the first receipt came (receiptIssueMs ${receiptIssueMs})`);
      assert.ok(firstReceiptAt < seen.indexOf(secondAnswer), `before the second answer (receiptIssueMs ${receiptIssueMs})`);
    }
  });

  test('the receipts of answers close together are issued together, after receiptIssueMs, and ride on one answer', async (t) => {
    const { send, answerTo, batches } = await setup(t, { receiptLingerMs: 600_000, receiptIssueMs: 400 });
    const started = performance.now();
    const first: InferRequest[] = [];
    const answers: InferReply[] = [];
    // One after another, each sent once the one before was answered.
    for (let i = 1; i <= 3; i++) {
      first.push(send(i));
      answers.push(await answerTo(first.at(-1)!));
    }
    const answeredMs = performance.now() - started;
    // Three answers within the issue wait: none of them carries a receipt (none was issued yet). Issued in the turn
    // after each answer, the first answer's receipt would ride on the second.
    if (answeredMs < 300) for (const a of answers) assert.equal(a.earlier, undefined, `answered in ${Math.round(answeredMs)} ms`);
    await new Promise((resolve) => setTimeout(resolve, 500));
    const next = await answerTo(send(4));
    assert.deepEqual(
      next.earlier?.map((r) => r.seq),
      [1, 2, 3],
      'the three receipts, issued together once the wait ended, ride on the next answer',
    );
    assert.deepEqual(new Set(next.earlier!.map((r) => requestIdHex(r.requestId))), new Set(first.map((r) => requestIdHex(r.id))));
    assert.equal(batches().length, 0, 'no message of their own');
  });

  test('answers waiting for their receipts are issued in the next turn once ISSUE_BATCH of them wait', async (t) => {
    const { payer, post, job } = await postFor(t, { creditRequests: 1_000, receiptIssueMs: 600_000 });
    const inside = post as unknown as { ready: Map<string, { receipts: unknown[] }> };
    const jobs = await Promise.all(Array.from({ length: ISSUE_BATCH }, () => job()));
    for (const j of jobs.slice(0, -1)) post.defer(j, encodeTensorMap(sampleInputs('kws', 2)));
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(inside.ready.get(`${payer} app-a`), undefined, 'fewer than ISSUE_BATCH wait for the timer');
    post.defer(jobs.at(-1)!, encodeTensorMap(sampleInputs('kws', 2)));
    await waitFor(() => inside.ready.get(`${payer} app-a`)?.receipts.length === ISSUE_BATCH, 5_000, 'all issued');
  });

  test('a batch the journal refuses is never sent and gives its seqs back: the next receipts continue the lane with no gap', async (t) => {
    const { payer, post, sent, job } = await postFor(t, { creditRequests: 1_000 });
    const payments = (post as unknown as { options: { payments: AgentPayments } }).options.payments;
    const log = (payments as unknown as { log: { appendAll: (records: unknown[]) => void } }).log;
    const appendAll = log.appendAll.bind(log);
    let refuse = true;
    log.appendAll = (records) => {
      if (refuse) throw new MeshError('MESH_INTERNAL', 'receipts not written to the log: ENOSPC (injected)');
      appendAll(records);
    };
    const unhandled: unknown[] = [];
    const onUnhandled = (err: unknown) => unhandled.push(err);
    process.on('unhandledRejection', onUnhandled);
    t.after(() => process.off('unhandledRejection', onUnhandled));
    const outputs = encodeTensorMap(sampleInputs('kws', 2));
    const refused = await Promise.all([job(), job()]);
    for (const j of refused) post.defer(j, outputs);
    await turn();
    await turn();
    assert.equal(payments.laneInfo(payer, 'app-a')?.seq, 0, "the refused receipts' seqs are the lane's again");
    refuse = false;
    const accepted = await Promise.all([job(), job()]);
    for (const j of accepted) post.defer(j, outputs);
    await post.flush();
    const receipts = sent.flatMap((b) => b.receipts);
    assert.deepEqual(
      receipts.map((r) => [r.seq, requestIdHex(r.requestId)]),
      accepted.map((j, i) => [i + 1, j.key]),
      'only the journaled receipts left, as seqs 1 and 2',
    );
    assert.deepEqual(receipts[0]!.prevReceipt, ZERO_HASH, 'the first one chains from the lane’s start');
    assert.deepEqual(unhandled, [], 'no rejection left unhandled');
  });

  test('a hurried lane sends its waiting receipts once journaled and its ready ones at once, not at the issue wait or the linger', async (t) => {
    const outputs = encodeTensorMap(sampleInputs('kws', 2));
    // Waiting to be issued (receiptIssueMs 600 s): issued in the next turn, sent once journaled.
    const waiting = await postFor(t, { creditRequests: 1_000, receiptIssueMs: 600_000 });
    const first = await waiting.job();
    waiting.post.defer(first, outputs);
    waiting.post.hurry(`0x${'1'.repeat(40)}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
    assert.equal(waiting.sent.length, 0, 'another lane hurried: this receipt waits for receiptIssueMs');
    waiting.post.hurry(waiting.payer);
    await waitFor(() => waiting.sent.length === 1, 5_000, 'the waiting receipt, issued and sent');
    assert.deepEqual(
      waiting.sent[0]!.receipts.map((r) => requestIdHex(r.requestId)),
      [first.key],
    );
    // Issued and journaled, lingering (600 s): sent at once.
    const lingering = await postFor(t, { creditRequests: 1_000, receiptIssueMs: 0 });
    const inside = lingering.post as unknown as { ready: Map<string, { receipts: unknown[] }> };
    const second = await lingering.job();
    lingering.post.defer(second, outputs);
    await waitFor(() => inside.ready.get(`${lingering.payer} app-a`)?.receipts.length === 1, 5_000, 'issued');
    assert.equal(lingering.sent.length, 0);
    lingering.post.hurry(lingering.payer);
    assert.deepEqual(
      lingering.sent.flatMap((b) => b.receipts.map((r) => requestIdHex(r.requestId))),
      [second.key],
    );
  });

  test('a lane hurried again while its receipts are being journaled sends the next issue’s once journaled too', async (t) => {
    const outputs = encodeTensorMap(sampleInputs('kws', 2));
    const { payer, post, sent, job } = await postFor(t, { creditRequests: 1_000, receiptIssueMs: 600_000 });
    const { release } = holdJournal(post);
    const first = await job();
    post.defer(first, outputs);
    post.hurry(payer);
    await turn();
    // The first receipt is being journaled; a second answer, and the lane is hurried again (a resync).
    const second = await job();
    post.defer(second, outputs);
    post.hurry(payer);
    await turn();
    release();
    await waitFor(() => sent.flatMap((b) => b.receipts).length === 2, 5_000, 'both receipts, once journaled');
    assert.deepEqual(
      sent.flatMap((b) => b.receipts.map((r) => requestIdHex(r.requestId))),
      [first.key, second.key],
    );
    assert.equal((post as unknown as { hurried: Set<string> }).hurried.size, 0, 'no lane is left hurried');
  });

  test('a receipt of another kind leaves after the lane’s receipts before it and before those after it (sendInOrder)', async (t) => {
    const outputs = encodeTensorMap(sampleInputs('kws', 2));
    const { payer, post, sent, job } = await postFor(t, { creditRequests: 1_000, receiptIssueMs: 600_000 });
    const { payments, release } = holdJournal(post);
    /** Everything that left, in order: each receipt by its seq, the message of another kind as 'own'. */
    const left: (number | string)[] = [];
    const sentBefore = () => sent.flatMap((b) => b.receipts.map((r) => r.seq));
    let seen = 0;
    const note = () => {
      const all = sentBefore();
      left.push(...all.slice(seen));
      seen = all.length;
    };
    let writeOwn!: () => void;
    const ownWritten = new Promise<void>((resolve) => {
      writeOwn = resolve;
    });
    const first = await job();
    post.defer(first, outputs);
    // An error (or progress) of another job on the same lane: the waiting answer's receipt is issued first (seq 1).
    const other = await job();
    let ownSeq = 0;
    post.sendInOrder(
      payer,
      () => {
        const one = payments.issue(other.paid!, {
          requestId: other.id,
          status: RECEIPT_STATUS.failed,
          unitsUsed: 0,
          outputHash: new Uint8Array(32),
          startedAt: Date.now(),
          finishedAt: Date.now(),
        });
        ownSeq = one.receipt.seq;
        // Its own write ends last (after the later answer's): only the lane's order may hold that receipt back.
        return { receipt: one.receipt, durable: one.durable.then(() => ownWritten) };
      },
      (receipt, journaled) => {
        assert.equal(receipt.seq, ownSeq, 'the message carries its own receipt');
        note();
        left.push(journaled ? 'own' : 'own without its receipt');
      },
    );
    assert.equal(ownSeq, 2, 'issued after the waiting answer’s');
    // A later answer on the lane, hurried (a resync): issued after it (seq 3) while the journal still holds.
    const later = await job();
    post.defer(later, outputs);
    post.hurry(payer);
    await turn();
    release();
    await waitFor(() => sentBefore().length >= 1, 5_000, 'the first answer’s receipt');
    // The later answer's receipt is journaled, and waits.
    await new Promise((resolve) => setTimeout(resolve, 50));
    note();
    assert.deepEqual(left, [1], 'the receipt after it waits for it');
    writeOwn();
    await waitFor(() => sentBefore().length === 2, 5_000, 'both answers’ receipts');
    note();
    assert.deepEqual(left, [1, 'own', 3], 'in the lane’s order');
    assert.equal((post as unknown as { behind: Map<string, unknown> }).behind.size, 0, 'nothing held behind once it left');
  });

  test('a resync from the lane’s client brings the receipts that wait to be issued or to linger; one from another client does not', async (t) => {
    const { agent, payer, send, answerTo, seen, brokerUrl } = await setup(t, { receiptLingerMs: 600_000, receiptIssueMs: 600_000 });
    const request = send(1);
    await answerTo(request);
    const receiptOf = () =>
      seen.some((m) => m.kind === 'receipts' && m.receipts.some((r) => requestIdHex(r.requestId) === requestIdHex(request.id)));
    // A stranger names this payer's lane: it is not the lane's client, so nothing is sent (nor hurried).
    const stranger = await TestPayer.open(t, brokerUrl, { wallet: chain.wallet(nextWallet++), domain: domain(), clientId: 'app-stranger' });
    stranger.publishRaw(
      topics.agentVoucher(agent.id, stranger.clientId),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'resync', payer: payer.payer, afterSeq: 0 }),
    );
    await new Promise((resolve) => setTimeout(resolve, 300));
    assert.equal(receiptOf(), false, 'the receipt waits (receiptIssueMs and the linger are 600 s)');
    // The lane's client misses it (as the SDK does a second after the answer): it comes.
    await payer.resync(agent.id, 0, 0);
    await waitFor(receiptOf, 5_000, 'the receipt, after the resync');
  });

  test('a request sent again after its answer gets the answer and its receipt again, billed once', async (t) => {
    const { agent, send, answerTo, batches, payer } = await setup(t, { receiptLingerMs: 0 });
    const request = send(1);
    const answer = await answerTo(request);
    await waitFor(() => batches().length === 1, 5_000, 'the receipt');
    // The sender lost the connection before it saw them, and sends the same request again.
    send(1, request.id);
    const again = await answerTo(request, 2);
    assert.deepEqual(again.outputs, answer.outputs, 'the same answer');
    await waitFor(() => batches().length === 2, 5_000, 'the receipt again');
    assert.deepEqual(batches()[1]!.receipts, batches()[0]!.receipts, 'the same receipt');
    const journal = await agent.payments!.receipts(payer.payer);
    assert.equal(journal.length, 1, 'one receipt in the journal');
    assert.equal(agent.counters.served, 1, 'run once');
  });

  test('an answer near the size cap carries only the receipts that fit beside its outputs; the rest go later', async (t) => {
    const { payer, post, sent, job } = await postFor(t, { creditRequests: 100 });
    for (let i = 0; i < 5; i++) post.defer(await job(), encodeTensorMap(sampleInputs('kws', 2)));
    const inside = post as unknown as { ready: Map<string, { receipts: unknown[] }> };
    await waitFor(() => inside.ready.get(`${payer} app-a`)?.receipts.length === 5, 5_000, 'five receipts ready');
    // A 4 MiB cap and outputs 2.5 receipts short of it: two ride along; then none fits; then the rest.
    const cap = 4 * 1024 * 1024;
    const big = { y: { dtype: 'uint8', shape: [1], data: new Uint8Array(cap - 1_024 - 64 - Math.floor(2.5 * MAX_SIGNED_RECEIPT_BYTES)) } };
    const room = earlierRoomBytes(cap, big);
    assert.ok(room >= 2 * MAX_SIGNED_RECEIPT_BYTES && room < 3 * MAX_SIGNED_RECEIPT_BYTES, `room ${room}`);
    assert.deepEqual(
      post.take(payer, 'app-a', room)?.map((r) => r.seq),
      [1, 2],
    );
    assert.equal(post.take(payer, 'app-a', earlierRoomBytes(cap, { y: { ...big.y, data: new Uint8Array(cap) } })), undefined);
    assert.equal(earlierRoomBytes(cap, encodeTensorMap(sampleInputs('kws', 2))) > 256 * MAX_SIGNED_RECEIPT_BYTES, true);
    assert.deepEqual(
      post.take(payer, 'app-a')?.map((r) => r.seq),
      [3, 4, 5],
    );
    assert.equal(sent.length, 0, 'nothing went by itself');
  });

  test('receipts still being journaled (syncWrites) when the agent flushes are sent by that flush', async (t) => {
    const { post, sent, job: paidJob } = await postFor(t, { syncWrites: true });
    const job = await paidJob();
    post.defer(job, encodeTensorMap(sampleInputs('kws', 2)));
    // The next turn signs the receipt and starts its fdatasync, which ends in a later turn.
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(sent.length, 0);
    assert.ok(post.pending, 'a receipt being journaled still waits to be sent');
    // Closing the agent (or a receipt of another kind) flushes: the receipt goes before the flush resolves.
    await post.flush();
    assert.deepEqual(
      sent.flatMap((b) => b.receipts.map((r) => [r.seq, requestIdHex(r.requestId)])),
      [[1, job.key]],
    );
  });
});
