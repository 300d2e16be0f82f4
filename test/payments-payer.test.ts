/**
 * The payer's side against dishonest agents (docs/settlement.md, "Who can lose what"): a real broker, a
 * real local chain with the escrow (its payout registry), the SDK paying with a wallet, and scripted agents
 * that sign whatever receipts they like. Each test asserts what the honest payer paid.
 */
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, describe, type TestContext, test } from 'node:test';
import { openMeshConnection } from '@edge-mesh/client';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import {
  type AgentStatus,
  agentBindingMessage,
  decodeMessage,
  type EscrowDomain,
  encodeMessage,
  generateIdentity,
  hashTensorMap,
  type Identity,
  type InferRequest,
  type LaneInfo,
  type MeshError,
  type ModelPrice,
  PROTOCOL_VERSION,
  parseTopic,
  RECEIPT_STATUS,
  type Receipt,
  receiptLeaf,
  type SignedReceipt,
  signBytes,
  signQuote,
  signReceipt,
  signStatus,
  toHex,
  topics,
  type VoucherMessage,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import type { ConnectOptions, Mesh } from '@edge-mesh/sdk';
import { ethers } from 'ethers';
import { Level } from 'level';
import { agentFor, brokerFor, meshFor, modelsDir, tempDir, waitFor } from './helpers.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let domain: EscrowDomain;
let nextAccount = 1;

before(async () => {
  chain = await startLocalChain({ accounts: 96 });
  deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  domain = { chainId: deployment.chainId, escrow: deployment.escrow };
});
after(() => chain?.close());

/** A funded chain account's wallet: payouts register with it, payers sign with it. */
function account(): ethers.Wallet {
  return chain.wallet(nextAccount++);
}

/** Registers `identity`'s Ed25519 key for `payout` in the escrow (sent by the payout account). */
async function register(payout: ethers.Wallet, identity: Identity): Promise<void> {
  const client = await EscrowClient.connect({ runner: payout, escrow: deployment.escrow });
  await client.registerAgent(identity.publicKey, signBytes(identity, agentBindingMessage(domain, payout.address.toLowerCase())));
}

const KWS_HASH = `0x${'ab'.repeat(32)}`;
/** What a scripted agent answers with. */
const OUTPUTS = { out: { dtype: 'float32', shape: [1, 1], data: new Uint8Array(4) } };
const kwsPrice: ModelPrice = { name: 'kws', modelHash: KWS_HASH, baseMicros: 0, unitMicros: 2, minChargeMicros: 0 };

interface Scripted {
  identity: Identity;
  /** Requests received, in order. */
  requests: { req: InferRequest; senderId: string }[];
  vouchers: VoucherMessage[];
  resyncs: number;
  /** Resyncs are answered from what was issued (default); false counts them and answers none. */
  answerResyncs: boolean;
  /** Receipt seqs its resync answers leave out. */
  withhold: Set<number>;
  /** Receipts issued, by seq. */
  issued: Map<number, SignedReceipt>;
  /** Signs the next receipt on the sender's lane (input and output hashes of `req` and the scripted result, unless given). */
  receipt(payer: string, fields: Partial<Receipt> & { requestId: Uint8Array }, req?: InferRequest): SignedReceipt;
  /** Sends a result (with a receipt and lane info, and receipts of earlier answers as `earlier`) for request `id`. */
  answer(senderId: string, id: Uint8Array, receipt?: SignedReceipt, lane?: LaneInfo, earlier?: SignedReceipt[]): void;
  /** Sends receipts by themselves, as an agent sends those of answers no later answer carried. */
  sendReceipts(senderId: string, payer: string, receipts: SignedReceipt[]): void;
  /** Sends an error reply. */
  fail(senderId: string, id: Uint8Array, code: string, receipt?: SignedReceipt): void;
  lane(): LaneInfo;
}

/**
 * An agent that announces a signed status and quote for `kws` with payout `payout`, hands every request to
 * `onRequest`, answers resyncs from what it issued, and records vouchers.
 */
async function scriptedAgent(
  t: TestContext,
  brokerUrl: string,
  payout: string,
  onRequest: (a: Scripted, req: InferRequest, senderId: string) => void,
  price: ModelPrice = kwsPrice,
  creditMicros?: number,
): Promise<Scripted> {
  const identity = generateIdentity('agent');
  const connection = openMeshConnection(brokerUrl, { identity });
  t.after(() => connection.close());
  await connection.firstConnect;
  const client = connection.client;
  let seq = 0;
  let cumulative = 0;
  let prev = ZERO_HASH;
  let paid = 0;
  const a: Scripted = {
    identity,
    requests: [],
    vouchers: [],
    resyncs: 0,
    answerResyncs: true,
    withhold: new Set(),
    issued: new Map(),
    receipt(payer, fields, req) {
      const p = fields.price ?? 2;
      const asked = req ?? a.requests.find((x) => Buffer.from(x.req.id).equals(Buffer.from(fields.requestId)))?.req;
      const r: Receipt = {
        v: 1,
        chainId: Number(domain.chainId),
        escrow: domain.escrow.toLowerCase(),
        payer,
        agentKey: identity.publicKey,
        seq: seq + 1,
        modelHash: Buffer.from(KWS_HASH.slice(2), 'hex'),
        inputHash: asked ? hashTensorMap(asked.inputs) : new Uint8Array(32),
        outputHash: hashTensorMap(OUTPUTS),
        status: RECEIPT_STATUS.ok,
        unitsUsed: 1,
        price: p,
        cumulative: cumulative + p,
        startedAt: Date.now() - 1,
        finishedAt: Date.now(),
        prevReceipt: prev,
        ...fields,
      };
      const { receipt, leaf } = signReceipt(identity, r);
      seq = r.seq;
      cumulative = r.cumulative;
      prev = leaf;
      a.issued.set(r.seq, receipt);
      return receipt;
    },
    answer(senderId, id, receipt, lane, earlier) {
      const outputs = OUTPUTS;
      client.publish(
        topics.clientReply(senderId, identity.id),
        encodeMessage({
          v: PROTOCOL_VERSION,
          kind: 'res',
          id,
          agent: identity.id,
          model: 'kws',
          outputs,
          queueMs: 0,
          execMs: 0.01,
          ...(receipt ? { receipt } : {}),
          lane: lane ?? a.lane(),
          ...(earlier ? { earlier } : {}),
        }),
        { qos: 1 },
      );
    },
    sendReceipts(senderId, payer, receipts) {
      client.publish(
        topics.clientReply(senderId, identity.id),
        encodeMessage({ v: PROTOCOL_VERSION, kind: 'receipts', agent: identity.id, payer, receipts, lane: a.lane() }),
        { qos: 1 },
      );
    },
    fail(senderId, id, code, receipt) {
      // Reports the lane paid at 0, as an agent that lost its vouchers would.
      const lane = { seq, paid: 0 };
      client.publish(
        topics.clientReply(senderId, identity.id),
        encodeMessage({
          v: PROTOCOL_VERSION,
          kind: 'err',
          id,
          agent: identity.id,
          code,
          message: code,
          ...(receipt ? { receipt } : {}),
          lane,
        }),
        { qos: 1 },
      );
    },
    lane: () => ({ seq, paid }),
  };
  client.on('message', (topic, payload) => {
    const parsed = parseTopic(topic);
    if (parsed?.kind === 'request') {
      const req = decodeMessage(payload, ['req']);
      a.requests.push({ req, senderId: parsed.senderId });
      onRequest(a, req, parsed.senderId);
    } else if (parsed?.kind === 'voucher') {
      const m = decodeMessage(payload, ['voucher', 'resync']);
      if (m.kind === 'voucher') {
        a.vouchers.push(m);
        paid = Math.max(paid, m.cumulative);
      } else {
        a.resyncs++;
        if (!a.answerResyncs) return;
        const receipts = [...a.issued.values()].filter((r) => r.seq > m.afterSeq && !a.withhold.has(r.seq)).sort((x, y) => x.seq - y.seq);
        client.publish(
          topics.clientReply(parsed.senderId, identity.id),
          encodeMessage({ v: PROTOCOL_VERSION, kind: 'receipts', agent: identity.id, payer: m.payer, receipts, lane: a.lane() }),
          { qos: 1 },
        );
      }
    }
  });
  await new Promise<void>((resolve, reject) =>
    client.subscribe([topics.agentRequest(identity.id, '+'), topics.agentVoucher(identity.id, '+')], { qos: 1 }, (err) =>
      err ? reject(err) : resolve(),
    ),
  );
  const quote = signQuote(identity, {
    payout,
    chainId: Number(domain.chainId),
    escrow: domain.escrow.toLowerCase(),
    issuedAt: Date.now(),
    validUntil: Date.now() + 3_600_000,
    models: [price],
    ...(creditMicros !== undefined ? { creditMicros } : {}),
  });
  const status: AgentStatus = {
    v: PROTOCOL_VERSION,
    kind: 'status',
    agent: identity.id,
    state: 'online',
    ts: Date.now(),
    session: 'scripted',
    models: [
      {
        name: 'kws',
        version: '1',
        sha256: KWS_HASH.slice(2),
        priceMicros: 2,
        latencyMs: 0.01,
        inputs: [{ name: 'onnx::Flatten_0', dtype: 'float32', shape: [1, 25, 96] }],
        outputs: [{ name: 'out', dtype: 'float32', shape: [1, 1] }],
      },
    ],
    workers: 1,
    quote,
  };
  await new Promise<void>((resolve) =>
    client.publish(topics.agentStatus(identity.id), encodeMessage(signStatus(identity, status)), { qos: 1, retain: true }, () => resolve()),
  );
  return a;
}

/** An SDK client paying with a fresh funded-chain wallet (the payout check reads the chain through it). */
async function payingMesh(
  t: TestContext,
  brokerUrl: string,
  extra: Record<string, unknown> = {},
  connectOptions: Partial<ConnectOptions> = {},
): Promise<{ mesh: Mesh; payer: string; wallet: ethers.Wallet }> {
  const wallet = account();
  const mesh = await meshFor(t, {
    brokerUrl,
    ...connectOptions,
    payment: { signer: wallet, domain, dataDir: await tempDir(t), voucherDelayMs: 0, ...extra },
  });
  return { mesh, payer: wallet.address.toLowerCase(), wallet };
}

/** An app that restarts: `open` makes an SDK client paying from the same wallet, identity and data folder each time. */
async function restartingApp(t: TestContext, brokerUrl: string) {
  const wallet = account();
  const identity = generateIdentity('app');
  const dataDir = await tempDir(t);
  const open = () => meshFor(t, { brokerUrl, identity, payment: { signer: wallet, domain, dataDir, voucherDelayMs: 0 } });
  return { open, wallet, dataDir };
}

/** Funds the payer's lane to `payout` (a real agent extends credit only against money on the lane). */
async function fund(wallet: ethers.Wallet, payout: string, micros = 1_000_000n): Promise<void> {
  const client = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
  await client.mint(wallet.address, micros);
  await client.fund(wallet.address, payout, micros);
}

const kws = () => sampleInputs('kws', 1);
const lastVoucher = (a: Scripted) => a.vouchers.at(-1)?.cumulative ?? 0;

/** The registered scripted agent of `laneLosingReply`, on `brokerUrl`. */
async function agentLosingReply(t: TestContext, brokerUrl: string, lost: number, withhold = false): Promise<Scripted> {
  const payoutWallet = account();
  let n = 0;
  const agent = await scriptedAgent(t, brokerUrl, payoutWallet.address.toLowerCase(), (a, req, sender) => {
    n++;
    const receipt = a.receipt(req.pay!.payer, { requestId: req.id });
    if (n !== lost) a.answer(sender, req.id, receipt);
    else if (withhold) a.withhold.add(receipt.seq);
  });
  await register(payoutWallet, agent.identity);
  return agent;
}

/**
 * A scripted agent whose reply to its `lost`-th request is lost on the way (its receipt stays in the agent's journal;
 * with `withhold`, it is also left out of every resync answer), and a paying mesh that found it. `pinned` sends it a
 * request.
 */
async function laneLosingReply(t: TestContext, lost: number, withhold = false) {
  const broker = await brokerFor(t);
  const agent = await agentLosingReply(t, broker.url, lost, withhold);
  const { mesh } = await payingMesh(t, broker.url);
  await mesh.waitForModel('kws');
  const pinned = (deadlineMs: number) => mesh.infer('kws', kws(), { deadlineMs, agentId: agent.identity.id });
  return { agent, mesh, pinned };
}

/** A registered scripted agent that answers every request with its receipt; `creditMicros` is the window it quotes. */
async function answeringAgent(t: TestContext, brokerUrl: string, creditMicros?: number): Promise<Scripted> {
  const payoutWallet = account();
  const agent = await scriptedAgent(
    t,
    brokerUrl,
    payoutWallet.address.toLowerCase(),
    (a, req, sender) => a.answer(sender, req.id, a.receipt(req.pay!.payer, { requestId: req.id })),
    kwsPrice,
    creditMicros,
  );
  await register(payoutWallet, agent.identity);
  return agent;
}

/**
 * Agent A, with a window of one request, whose requests wait in `held` for the test to answer them, and agent B, with
 * a window of `creditB`, answering at once; both registered, on a new broker.
 */
async function heldAndOpenAgents(t: TestContext, creditB: number) {
  const broker = await brokerFor(t);
  const held: { sender: string; req: InferRequest }[] = [];
  const payoutA = account();
  const a = await scriptedAgent(t, broker.url, payoutA.address.toLowerCase(), (_x, req, sender) => held.push({ sender, req }), kwsPrice, 2);
  await register(payoutA, a.identity);
  const b = await answeringAgent(t, broker.url, creditB);
  return { broker, held, a, b };
}

/** Requests to `agentId` from four callers, each sending its next as soon as its last is answered, for `ms`. */
async function steadyStream(mesh: Mesh, agentId: string, ms: number): Promise<{ served: number; elapsed: number }> {
  const started = Date.now();
  let served = 0;
  await Promise.all(
    Array.from({ length: 4 }, async () => {
      while (Date.now() - started < ms) {
        await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId });
        served++;
      }
    }),
  );
  return { served, elapsed: Date.now() - started };
}

describe('the payer pays only what it asked for', () => {
  test('a receipt for a request never sent, one with units beyond the quote and an ok receipt on an error reply are not paid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    const payout = payoutWallet.address.toLowerCase();
    let n = 0;
    const agent = await scriptedAgent(t, broker.url, payout, (a, req, sender) => {
      const payer = req.pay!.payer;
      n++;
      if (n === 1) {
        // Honest work, then a receipt for a request id it invented, pushed on the same reply topic.
        a.answer(sender, req.id, a.receipt(payer, { requestId: req.id }));
        a.answer(sender, ethers.randomBytes(16), a.receipt(payer, { requestId: ethers.randomBytes(16), unitsUsed: 1, price: 2 }));
      } else if (n === 2) {
        // 400,000 units of a model quoted per inference.
        a.answer(sender, req.id, a.receipt(payer, { requestId: req.id, unitsUsed: 400_000, price: 800_000 }));
      } else {
        // Billed as ok on an error reply.
        a.fail(sender, req.id, 'MESH_INFERENCE_FAILED', a.receipt(payer, { requestId: req.id }));
      }
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id }));
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 4, 5_000, 'four receipts linked');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.owedMicros, 2, 'only the one real request is owed');
    assert.equal(lane.billedMicros, 2 + 2 + 800_000 + 2);
    assert.equal(lane.refused, 3);
    await waitFor(() => lastVoucher(agent) === 2, 5_000, 'a voucher for 2');
    assert.ok(
      agent.vouchers.every((v) => v.cumulative <= 2),
      JSON.stringify(agent.vouchers.map((v) => v.cumulative)),
    );
  });

  test('receipts the agent did not sign, hidden in a voucher batch behind honest ones, are caught before the voucher and not paid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    // Whoever sits between agent and payer (a relay, the network) signs receipts 3 and 4 in the agent's name.
    const forger = generateIdentity('agent');
    let n = 0;
    const agent = await scriptedAgent(
      t,
      broker.url,
      payoutWallet.address.toLowerCase(),
      (a, req, sender) => {
        n++;
        // A broken lane sends requests unpaid: nothing to bill.
        if (!req.pay) return a.answer(sender, req.id);
        const receipt = a.receipt(req.pay.payer, { requestId: req.id });
        a.answer(sender, req.id, n <= 2 ? receipt : { ...receipt, sig: signBytes(forger, receiptLeaf(receipt)) });
      },
      kwsPrice,
      // A window of 16 at 2 a request: the voucher waits until 8 is owed, after the fourth receipt, so one
      // signature check covers all four.
      16,
    );
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url, { voucherDelayMs: 60_000 });
    await mesh.waitForModel('kws');
    for (let i = 0; i < 4; i++) await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    await waitFor(() => mesh.lanes()[0]?.broken !== undefined, 5_000, 'the lane broken at the voucher');
    await waitFor(() => agent.vouchers.length >= 1, 5_000, 'a voucher for what the agent signed');
    assert.deepEqual(
      agent.vouchers.map((v) => [v.cumulative, v.seq]),
      [[4, 2]],
      'one voucher, for receipts 1 and 2 only',
    );
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.owedMicros, 4);
    assert.match(lane.broken!, /receipt 3/);
    // Nothing more is paid to that lane: the next request goes without a payment field.
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    assert.equal(agent.requests.at(-1)!.req.pay, undefined);
    assert.equal(agent.vouchers.length, 1);
  });

  test("a reply after the deadline by the payer's clock is not paid, whatever time its receipt states", async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      // Claims to finish at once, answers 300 ms later: past the 100 ms deadline.
      const receipt = a.receipt(req.pay!.payer, { requestId: req.id, finishedAt: Date.now(), startedAt: Date.now() - 1 });
      setTimeout(() => a.answer(sender, req.id, receipt), 300);
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 100, agentId: agent.identity.id }), /MESH_DEADLINE_EXCEEDED|within/);
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 1, 5_000, 'the late receipt linked');
    assert.equal(mesh.lanes()[0]!.owedMicros, 0);
    assert.equal(mesh.lanes()[0]!.lastRefusal, 'late');
    assert.equal(agent.vouchers.length, 0, 'nothing was signed');
  });

  test('a request refused by one agent and served by another is paid to the one that served it', async (t) => {
    const broker = await brokerFor(t);
    const attempts: string[] = [];
    for (let i = 0; i < 2; i++) {
      const payoutWallet = account();
      const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
        attempts.push(a.identity.id);
        // The first attempt anywhere is refused before it is taken on (no receipt); the SDK tries the other agent.
        if (attempts.length === 1) a.fail(sender, req.id, 'MESH_BUSY');
        else a.answer(sender, req.id, a.receipt(req.pay!.payer, { requestId: req.id }));
      });
      await register(payoutWallet, agent.identity);
    }
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.agents().length === 2, 5_000, 'both agents seen');
    const result = await mesh.infer('kws', kws(), { deadlineMs: 3_000 });
    assert.equal(attempts.length, 2);
    assert.notEqual(attempts[0], attempts[1], 'the second attempt went to the other agent');
    assert.equal(result.agentId, attempts[1]);
    await waitFor(() => mesh.lanes().some((l) => l.receipts === 1), 5_000, 'the receipt linked');
    const lane = mesh.lanes().find((l) => l.agentId === attempts[1])!;
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 2, 'the agent that served it is owed for it');
    // The answer's receipt is in, but the refusal came without one: the refusing agent may still run a first copy of
    // the request (an agent refuses a second copy so) and bill it, so the request stays remembered until a minute past
    // its deadline.
    assert.equal(mesh.counters.paidRequestsRemembered, 1);
  });

  test("an agent's receipt for a request sent to another agent does not make the payer forget it: the agent that ran it is paid", async (t) => {
    const broker = await brokerFor(t);
    const kept: { a: Scripted; sender: string; req: InferRequest }[] = [];
    const agents: Scripted[] = [];
    for (let i = 0; i < 2; i++) {
      const payoutWallet = account();
      agents.push(
        await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => kept.push({ a, sender, req })),
      );
      await register(payoutWallet, agents[i]!.identity);
    }
    const [honest, liar] = agents as [Scripted, Scripted];
    const { mesh, payer } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 2, 5_000, 'both lanes open');
    const result = mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: honest.identity.id });
    await waitFor(() => kept.length === 1, 5_000, 'the request at the honest agent');
    const { sender, req } = kept[0]!;
    // The other agent, which never got the request, sends a final receipt for it on its own lane.
    liar.sendReceipts(sender, payer, [liar.receipt(payer, { requestId: req.id })]);
    await waitFor(() => mesh.lanes().some((l) => l.agentId === liar.identity.id && l.receipts === 1), 5_000, "the liar's receipt linked");
    assert.equal(mesh.counters.paidRequestsRemembered, 1, 'still remembered: the agent it went to owes its receipt');
    honest.answer(sender, req.id, honest.receipt(payer, { requestId: req.id }));
    await result;
    await waitFor(() => mesh.lanes().every((l) => l.receipts === 1), 5_000, "the honest agent's receipt linked");
    const lane = (id: string) => mesh.lanes().find((l) => l.agentId === id)!;
    assert.equal(lane(honest.identity.id).refused, 0, `refused: ${lane(honest.identity.id).lastRefusal}`);
    assert.equal(lane(honest.identity.id).owedMicros, 2);
    assert.equal(lane(liar.identity.id).lastRefusal, 'unsolicited');
    assert.equal(lane(liar.identity.id).owedMicros, 0);
    assert.equal(mesh.counters.paidRequestsRemembered, 0);
  });

  test('an agent that refused a second copy of a request without a receipt, and then answers the first, is paid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    let kept: { a: Scripted; sender: string; req: InferRequest } | undefined;
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      kept = { a, sender, req };
      // As the agent refuses a copy of a request whose first copy it is still admitting (a replayed id): no receipt.
      a.fail(sender, req.id, 'MESH_BAD_REQUEST');
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id }), /BAD_REQUEST/);
    // The first copy runs and is answered before the deadline; its receipt follows the answer.
    const { a, sender, req } = kept!;
    a.answer(sender, req.id);
    a.sendReceipts(sender, req.pay!.payer, [a.receipt(req.pay!.payer, { requestId: req.id })]);
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 1, 5_000, 'the receipt linked');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 2, 'the work answered before the deadline is paid');
    assert.equal(mesh.counters.paidRequestsRemembered, 0, 'its receipt in: forgotten');
  });

  test('an agent that refused without a receipt and answers anyway, after another agent served the request, is paid', async (t) => {
    const broker = await brokerFor(t);
    const kept: { a: Scripted; sender: string; req: InferRequest }[] = [];
    for (let i = 0; i < 2; i++) {
      const payoutWallet = account();
      const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
        kept.push({ a, sender, req });
        // The first attempt is refused without a receipt (MESH_BUSY) while the agent still runs a first copy of it.
        if (kept.length === 1) a.fail(sender, req.id, 'MESH_BUSY');
      });
      await register(payoutWallet, agent.identity);
    }
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.agents().length === 2 && mesh.lanes().length === 2, 5_000, 'both agents seen, both lanes open');
    const result = mesh.infer('kws', kws(), { deadlineMs: 5_000 });
    await waitFor(() => kept.length === 2, 5_000, 'the second attempt sent');
    const [first, second] = kept as [(typeof kept)[number], (typeof kept)[number]];
    // The refusing agent answers all the same (its receipt follows later), then the other agent, with its receipt.
    first.a.answer(first.sender, first.req.id);
    await new Promise((r) => setTimeout(r, 100));
    second.a.answer(second.sender, second.req.id, second.a.receipt(second.req.pay!.payer, { requestId: second.req.id }));
    assert.equal((await result).agentId, second.a.identity.id);
    await waitFor(() => mesh.lanes().some((l) => l.receipts === 1), 5_000, "the second agent's receipt linked");
    first.a.sendReceipts(first.sender, first.req.pay!.payer, [first.a.receipt(first.req.pay!.payer, { requestId: first.req.id })]);
    await waitFor(() => mesh.lanes().every((l) => l.receipts === 1), 5_000, "the first agent's receipt linked");
    for (const lane of mesh.lanes()) assert.equal(lane.refused, 0, `${lane.agentId} refused: ${lane.lastRefusal}`);
    assert.equal(mesh.counters.paidRequestsRemembered, 0, 'both receipts in: forgotten');
  });

  for (const first of ['the first attempt', 'the hedge'] as const)
    test(`a hedged request is remembered until every attempt has its receipt: ${first} answers, then the other agent, after the app has its result, and is paid too`, async (t) => {
      const broker = await brokerFor(t);
      // Both agents keep the request; the test answers them in turn.
      const kept: { a: Scripted; sender: string; req: InferRequest }[] = [];
      for (let i = 0; i < 2; i++) {
        const payoutWallet = account();
        const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) =>
          kept.push({ a, sender, req }),
        );
        await register(payoutWallet, agent.identity);
      }
      const { mesh } = await payingMesh(t, broker.url, {}, { minHedgeAfterMs: 50, tailBudget: { hedgeRatio: 1, hedgeCap: 10 } });
      await mesh.waitForModel('kws');
      await waitFor(() => mesh.agents().length === 2 && mesh.lanes().length === 2, 5_000, 'both agents seen, both lanes open');
      const result = mesh.infer('kws', kws(), { deadlineMs: 5_000 });
      await waitFor(() => kept.length === 2, 5_000, 'the hedge sent');
      const answer = ({ a, sender, req }: (typeof kept)[number]) =>
        a.answer(sender, req.id, a.receipt(req.pay!.payer, { requestId: req.id }));
      const [winner, loser] = first === 'the first attempt' ? [kept[0]!, kept[1]!] : [kept[1]!, kept[0]!];
      answer(winner);
      assert.equal((await result).agentId, winner.a.identity.id);
      await waitFor(() => mesh.lanes().some((l) => l.receipts === 1), 5_000, "the winner's receipt linked");
      assert.equal(mesh.counters.paidRequestsRemembered, 1, 'the other attempt owes its receipt: the request is remembered');
      // The other agent answers now, before the deadline, with its receipt: the work was asked for and delivered.
      answer(loser);
      await waitFor(() => mesh.lanes().every((l) => l.receipts === 1), 5_000, "the other agent's receipt linked");
      for (const lane of mesh.lanes()) assert.equal(lane.refused, 0, `${lane.agentId} refused: ${lane.lastRefusal}`);
      assert.equal(mesh.counters.paidRequestsRemembered, 0, 'both receipts in: the request is forgotten');
    });

  test('a request refused with MESH_CREDIT_EXCEEDED and served when the SDK tries the same agent again is paid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    let n = 0;
    const agent = await scriptedAgent(
      t,
      broker.url,
      payoutWallet.address.toLowerCase(),
      (a, req, sender) => {
        n++;
        // The second request's first attempt is refused before it is taken on (no receipt, lane info only), as
        // an agent waiting for a voucher refuses; the SDK sends its voucher and tries again, and it is served.
        if (n === 2) a.fail(sender, req.id, 'MESH_CREDIT_EXCEEDED');
        else a.answer(sender, req.id, a.receipt(req.pay!.payer, { requestId: req.id }));
      },
      kwsPrice,
      100,
    );
    await register(payoutWallet, agent.identity);
    // A window of 100 and vouchers that wait: the payer still owes the agent when the refusal comes, which is
    // when the SDK retries.
    const { mesh } = await payingMesh(t, broker.url, { voucherDelayMs: 60_000 });
    await mesh.waitForModel('kws');
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    // Not pinned (a pinned request is tried once): the only agent is tried again.
    const second = await mesh.infer('kws', kws(), { deadlineMs: 3_000 });
    assert.equal(second.agentId, agent.identity.id);
    assert.equal(n, 3, 'the second request was tried twice');
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 2, 5_000, 'both receipts linked');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 4, 'both requests are owed: the refusal before the retry took nothing on');
  });

  test('a quote that raises prices is not taken without the app; receipts above the opening prices are not paid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      a.answer(sender, req.id, a.receipt(req.pay!.payer, { requestId: req.id, price: 20 }));
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 1, 5_000, 'the receipt linked');
    assert.equal(mesh.lanes()[0]!.owedMicros, 0, 'a price of 20 against a quote of 2');
    assert.equal(mesh.lanes()[0]!.lastRefusal, 'price');
  });
});

describe('payouts and lanes that cannot be squatted or wedged', () => {
  test("an agent quoting another agent's payout is not paid; the real agent, registered on chain, is", async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    const payout = payoutWallet.address.toLowerCase();
    const realIdentity = generateIdentity('agent');
    await register(payoutWallet, realIdentity);
    // The squatter announces first, quoting the real agent's payout.
    const squatter = await scriptedAgent(t, broker.url, payout, (a, req, sender) =>
      a.answer(sender, req.id, req.pay ? a.receipt(req.pay.payer, { requestId: req.id }) : undefined),
    );
    const { mesh, wallet } = await payingMesh(t, broker.url);
    await fund(wallet, payout);
    await mesh.waitForModel('kws');
    const real = await agentFor(t, {
      brokerUrl: broker.url,
      modelsDir: await modelsDir(),
      identity: realIdentity,
      payment: { payout, domain, dataDir: await tempDir(t), provider: chain.provider },
    });
    await mesh.waitForModel('kws', 10_000, 2);
    await waitFor(() => mesh.lanes().some((l) => l.agentId === real.id), 5_000, "the real agent's lane");
    assert.ok(!mesh.lanes().some((l) => l.agentId === squatter.identity.id), 'no lane with the squatter');
    const result = await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: real.id });
    assert.equal(result.agentId, real.id);
    await waitFor(() => (mesh.lanes().find((l) => l.agentId === real.id)?.owedMicros ?? 0) > 0, 5_000, 'the real agent is owed');
    // The squatter gets requests without a payment field (so nothing it bills is ever paid).
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: squatter.identity.id });
    assert.equal(squatter.requests.at(-1)!.req.pay, undefined);
  });

  test('a lost reply does not wedge the lane: the payer asks for the receipts again and goes on paying', async (t) => {
    const { agent, mesh, pinned } = await laneLosingReply(t, 2);
    await pinned(3_000);
    await assert.rejects(pinned(300));
    for (let i = 0; i < 5; i++) await pinned(3_000);
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 7, 5_000, 'all seven receipts linked');
    assert.ok(agent.resyncs >= 1, 'a resync was asked for');
    // Paid: the six answered requests. Not paid: the one whose answer never arrived.
    assert.equal(mesh.lanes()[0]!.owedMicros, 12);
    await waitFor(() => lastVoucher(agent) === 12, 5_000, 'the voucher pays 12');
  });

  test('a resync lost on the way is asked again, with nothing else coming to trigger it', async (t) => {
    const { agent, mesh, pinned } = await laneLosingReply(t, 2);
    // The first resync is lost too (as with a broker node's death at QoS 0): the agent never sees it.
    agent.answerResyncs = false;
    await pinned(3_000);
    await assert.rejects(pinned(300));
    await pinned(3_000);
    await waitFor(() => agent.resyncs >= 1, 5_000, 'a resync for the missing receipt');
    agent.answerResyncs = true;
    assert.equal(mesh.lanes()[0]!.held, 1, 'the third receipt is held behind the gap');
    // No request follows: only the SDK's own retry can fill the gap.
    await waitFor(() => mesh.lanes()[0]!.receipts === 3, 5_000, 'the gap filled by a second ask');
    assert.equal(agent.resyncs, 2, 'asked once more');
    assert.equal(mesh.lanes()[0]!.held, 0);
    // Paid: the two answered requests; not the one whose answer never arrived.
    assert.equal(mesh.lanes()[0]!.owedMicros, 4);
  });

  test('a voucher the agent reports not having is sent again', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    let n = 0;
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      n++;
      // Work, then a refusal (a receipt priced 0) that reports the lane paid at 0, as an agent that lost its voucher would.
      if (n === 1) a.answer(sender, req.id, a.receipt(req.pay!.payer, { requestId: req.id }));
      else
        a.fail(
          sender,
          req.id,
          'MESH_BUSY',
          a.receipt(req.pay!.payer, { requestId: req.id, status: RECEIPT_STATUS.failed, unitsUsed: 0, price: 0 }),
        );
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    await waitFor(() => agent.vouchers.length >= 1, 5_000, 'the first voucher');
    await new Promise((r) => setTimeout(r, 600));
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id }), /busy/i);
    await waitFor(() => agent.vouchers.filter((v) => v.cumulative === 2).length >= 2, 5_000, 'the voucher for 2 again');
    assert.ok(toHex(agent.vouchers[0]!.sig) === toHex(agent.vouchers[1]!.sig), 'the same signed voucher, not a new one');
  });
});

describe('voucher cadence', () => {
  test('under a steady stream a lane gets one voucher per voucherDelayMs, not one per few receipts; closing pays the rest', async (t) => {
    const broker = await brokerFor(t);
    const agent = await answeringAgent(t, broker.url, 1_000_000);
    const delayMs = 250;
    const { mesh } = await payingMesh(t, broker.url, { voucherDelayMs: delayMs });
    await mesh.waitForModel('kws');
    // Four requests in flight at all times for ~1.5 s: receipts keep arriving while each voucher is signed.
    const { served, elapsed } = await steadyStream(mesh, agent.identity.id, 1_500);
    await waitFor(() => agent.vouchers.length >= 1, 5_000, 'a voucher while the stream ran');
    // Signed vouchers (one the agent's lane info shows it lacks is sent again: the same voucher, not counted twice).
    const signed = new Set(agent.vouchers.map((v) => v.cumulative)).size;
    // The window (500,000 requests) never fills: every voucher but the first waited delayMs after the one before.
    assert.ok(served >= 40, `a steady stream (${served} requests)`);
    assert.ok(signed <= Math.floor(elapsed / delayMs) + 1, `${signed} vouchers in ${elapsed} ms at ${delayMs} ms apart`);
    // ...and the lane is paid as it goes, not only at close.
    assert.ok(signed >= Math.floor(elapsed / delayMs) - 3, `only ${signed} vouchers in ${elapsed} ms at ${delayMs} ms apart`);
    await mesh.close();
    await waitFor(() => lastVoucher(agent) === 2 * served, 5_000, 'every receipt paid at close');
  });
});

/**
 * The payer's key that signs grants but refuses its first `refusals` vouchers (a busy hardware signer, a user
 * declining a prompt); `asked` gets the time of each voucher signature asked for.
 */
function refusingSigner(refusals: number) {
  const asked: number[] = [];
  const wallet = account();
  const signer = {
    provider: wallet.provider,
    getAddress: () => wallet.getAddress(),
    signTypedData: (d: ethers.TypedDataDomain, types: Record<string, ethers.TypedDataField[]>, value: Record<string, unknown>) => {
      if ('Voucher' in types) {
        asked.push(performance.now());
        if (asked.length <= refusals) return Promise.reject(new Error('the signer refused'));
      }
      return wallet.signTypedData(d, types, value);
    },
  };
  return { signer, asked };
}

describe('voucher signing that fails', () => {
  test('a voucher whose signature failed is signed again later, with no new receipt to prompt it', async (t) => {
    const broker = await brokerFor(t);
    const agent = await answeringAgent(t, broker.url);
    // The payer's key signs grants, but refuses its first voucher.
    const { signer, asked } = refusingSigner(1);
    const { mesh } = await payingMesh(t, broker.url, { signer });
    await mesh.waitForModel('kws');
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    // One request and then silence: the voucher for it comes all the same.
    await waitFor(() => lastVoucher(agent) === 2, 5_000, 'the voucher signed again');
    assert.equal(asked.length, 2, 'the first signature was refused');
    // The voucher that did go out covers the receipt the failed one was for: its root is that receipt's leaf.
    assert.equal(toHex(agent.vouchers.at(-1)!.receiptsRoot), toHex(receiptLeaf(agent.issued.get(1)!)));
  });

  test('a signer that keeps refusing is asked again less and less often', async (t) => {
    const broker = await brokerFor(t);
    const agent = await answeringAgent(t, broker.url);
    const { signer, asked } = refusingSigner(3);
    const { mesh } = await payingMesh(t, broker.url, { signer });
    await mesh.waitForModel('kws');
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    await waitFor(() => lastVoucher(agent) === 2, 10_000, 'the voucher signed at last');
    assert.equal(asked.length, 4, 'three refusals, then the signature');
    // Waits of 500, 1,000 and 2,000 ms (a timer never fires early; 15 ms for the clocks' rounding).
    const waits = asked.slice(1).map((at, i) => at - asked[i]!);
    for (const [i, wait] of waits.entries())
      assert.ok(wait >= 500 * 2 ** i - 15, `wait ${i + 1}: ${waits.map((w) => w.toFixed(0)).join(', ')} ms`);
  });
});

describe('a broken lane at close', () => {
  test('a lane broken after receipts it owes (its voucher still waiting) is paid what it owed before the break when the app closes', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    const agent = await scriptedAgent(
      t,
      broker.url,
      payoutWallet.address.toLowerCase(),
      (a, req, sender) => {
        // The first receipt is honest; the second names another receipt before it: the chain is broken.
        const fields = a.requests.length === 1 ? { requestId: req.id } : { requestId: req.id, prevReceipt: new Uint8Array(32).fill(7) };
        a.answer(sender, req.id, a.receipt(req.pay!.payer, fields));
      },
      kwsPrice,
      1_000_000,
    );
    await register(payoutWallet, agent.identity);
    // A wide window and a long voucher wait: the first receipt's voucher is still waiting when the lane breaks.
    const { mesh } = await payingMesh(t, broker.url, { voucherDelayMs: 20_000 });
    await mesh.waitForModel('kws');
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    await waitFor(() => mesh.lanes()[0]?.broken !== undefined, 5_000, 'the lane broken');
    assert.equal(agent.vouchers.length, 0, 'no voucher yet');
    assert.equal(mesh.lanes()[0]!.owedMicros, 2, 'the honest receipt is owed');
    await mesh.close();
    await waitFor(() => lastVoucher(agent) === 2, 5_000, 'the honest receipt paid at close');
    assert.equal(agent.vouchers.length, 1, 'one voucher');
    assert.equal(agent.resyncs, 0, 'a broken lane asks for no receipts: none of them would be paid');
  });
});

describe('requests waiting for room', () => {
  test("a request waiting for one agent's window does not hurry the vouchers of the payer's other lanes", async (t) => {
    // Agent A has a window of one request and holds its replies; B's window is roomy and it answers at once.
    const { broker, held, a, b } = await heldAndOpenAgents(t, 1_000_000);
    const delayMs = 250;
    const { mesh } = await payingMesh(t, broker.url, { voucherDelayMs: delayMs });
    await mesh.waitForModel('kws', 10_000, 2);
    await waitFor(() => mesh.lanes().length === 2, 5_000, 'both lanes open');
    // A's window is full with its first request in flight; the second waits for room there until its deadline.
    const first = mesh.infer('kws', kws(), { deadlineMs: 10_000, agentId: a.identity.id });
    await waitFor(() => held.length === 1, 5_000, 'the first request at agent A');
    const waiting = mesh.infer('kws', kws(), { deadlineMs: 2_500, agentId: a.identity.id }).catch((err: unknown) => err);
    await waitFor(() => mesh.counters.creditHeld >= 1, 5_000, 'the second request waiting for room at A');
    // Meanwhile a steady stream to B: its lane keeps the pace of voucherDelayMs.
    const { served, elapsed } = await steadyStream(mesh, b.identity.id, 1_500);
    const signed = new Set(b.vouchers.map((v) => v.cumulative)).size;
    assert.ok(served >= 40, `a steady stream (${served} requests)`);
    assert.ok(signed <= Math.floor(elapsed / delayMs) + 1, `${signed} vouchers to B in ${elapsed} ms at ${delayMs} ms apart`);
    a.answer(held[0]!.sender, held[0]!.req.id, a.receipt(held[0]!.req.pay!.payer, { requestId: held[0]!.req.id }));
    await first;
    await waiting;
  });
});

describe('agents that play with the credit window', () => {
  test('an agent quoting a window smaller than one request gets no request: the SDK fails it at once with MESH_CREDIT_EXCEEDED', async (t) => {
    const broker = await brokerFor(t);
    // A window of 1 µUSD for a request of 2: every request would be refused, or held for ever.
    const agent = await answeringAgent(t, broker.url, 1);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const started = Date.now();
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 10_000 }), (err: MeshError) => {
      assert.equal(err.code, 'MESH_CREDIT_EXCEEDED');
      assert.equal(err.details?.reason, 'window-too-small');
      return true;
    });
    assert.ok(Date.now() - started < 5_000, 'failed without waiting for the deadline');
    assert.equal(agent.requests.length, 0, 'nothing was sent to it');
    assert.equal(mesh.lanes()[0]!.paidMicros, 0);
  });

  test('a request that gets no credit before its deadline fails with MESH_CREDIT_EXCEEDED and is never sent; the one in flight is paid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    const held: { sender: string; req: InferRequest }[] = [];
    // A window of one request; the first is answered only when the test says so.
    const agent = await scriptedAgent(
      t,
      broker.url,
      payoutWallet.address.toLowerCase(),
      (_a, req, sender) => held.push({ sender, req }),
      kwsPrice,
      2,
    );
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const first = mesh.infer('kws', kws(), { deadlineMs: 10_000 });
    await waitFor(() => held.length === 1, 5_000, 'the first request at the agent');
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 300 }), (err: MeshError) => {
      assert.equal(err.code, 'MESH_CREDIT_EXCEEDED');
      assert.equal(err.details?.reason, 'no-room');
      return true;
    });
    assert.equal(agent.requests.length, 1, 'the second request was held back, not sent');
    assert.equal(mesh.counters.creditHeld, 1);
    assert.equal(mesh.counters.creditFailed, 1);
    // The first is answered: it is paid, and the window has room again.
    agent.answer(held[0]!.sender, held[0]!.req.id, agent.receipt(held[0]!.req.pay!.payer, { requestId: held[0]!.req.id }));
    await first;
    await waitFor(() => lastVoucher(agent) === 2, 5_000, 'the first request paid');
    const third = mesh.infer('kws', kws(), { deadlineMs: 5_000 });
    await waitFor(() => held.length === 2, 5_000, 'the third request sent once the voucher freed the window');
    assert.ok(held[1]!.req.pay?.voucher, 'the voucher rides along until the agent says it holds it');
    assert.equal(held[1]!.req.pay!.voucher!.cumulative, 2);
    agent.answer(held[1]!.sender, held[1]!.req.id, agent.receipt(held[1]!.req.pay!.payer, { requestId: held[1]!.req.id }));
    await third;
    await waitFor(() => lastVoucher(agent) === 4, 5_000, 'the third request paid');
    assert.equal(mesh.lanes()[0]!.paidMicros, 4, 'two requests served, two paid, nothing more');
  });

  test('a request goes to another agent whose window has room instead of waiting for a full one', async (t) => {
    // Agent A has a window of one request and holds its reply until the test says so; B's window is roomy.
    const { broker, held, a, b } = await heldAndOpenAgents(t, 100);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws', 10_000, 2);
    await waitFor(() => mesh.lanes().length === 2, 5_000, 'both lanes open');
    const first = mesh.infer('kws', kws(), { deadlineMs: 10_000, agentId: a.identity.id });
    await waitFor(() => held.length === 1, 5_000, 'the first request at agent A');
    // A's window is full with the request in flight: the next ones go to B, none held back.
    for (let i = 0; i < 3; i++) {
      const r = await mesh.infer('kws', kws(), { deadlineMs: 5_000 });
      assert.equal(r.agentId, b.identity.id);
    }
    assert.equal(a.requests.length, 1, 'nothing more was sent to the full window');
    assert.equal(mesh.counters.creditHeld, 0, 'no request waited: another agent had room');
    a.answer(held[0]!.sender, held[0]!.req.id, a.receipt(held[0]!.req.pay!.payer, { requestId: held[0]!.req.id }));
    await first;
    await waitFor(() => lastVoucher(a) === 2 && lastVoucher(b) === 6, 5_000, 'both agents paid for what they served');
  });

  test('an agent that never acknowledges vouchers and refuses for credit does not make the SDK hang or pay more', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    let billed = 0;
    // It says its window is 10, refuses once 4 are unpaid by its own count (vouchers ignored), and its lane
    // info always says it holds no voucher.
    const agent = await scriptedAgent(
      t,
      broker.url,
      payoutWallet.address.toLowerCase(),
      (a, req, sender) => {
        if (billed >= 4) return a.fail(sender, req.id, 'MESH_CREDIT_EXCEEDED');
        billed += 2;
        const receipt = a.receipt(req.pay!.payer, { requestId: req.id });
        a.answer(sender, req.id, receipt, { seq: receipt.seq, paid: 0 });
      },
      kwsPrice,
      10,
    );
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const outcomes: string[] = [];
    const started = Date.now();
    for (let i = 0; i < 5; i++) {
      outcomes.push(
        await mesh.infer('kws', kws(), { deadlineMs: 2_000 }).then(
          () => 'ok',
          (err: MeshError) => err.code,
        ),
      );
    }
    assert.deepEqual(outcomes, ['ok', 'ok', 'MESH_CREDIT_EXCEEDED', 'MESH_CREDIT_EXCEEDED', 'MESH_CREDIT_EXCEEDED']);
    // Each refused request ended with the agent's refusal, well within its deadline: nothing waited for ever.
    assert.ok(Date.now() - started < 5 * 2_000, `took ${Date.now() - started} ms`);
    await waitFor(() => lastVoucher(agent) === 4, 5_000, 'the two served requests paid');
    await mesh.close();
    assert.equal(Math.max(...agent.vouchers.map((v) => v.cumulative)), 4, 'never more than the two requests served');
    assert.equal(mesh.lanes()[0]!.paidMicros, 4);
  });
});

describe('receipts that follow their answers', () => {
  /** A scripted agent that answers at once with the receipts ready (`earlier`) and makes this answer's receipt ready. */
  async function followingAgent(t: TestContext, brokerUrl: string, creditMicros?: number) {
    const payoutWallet = account();
    const ready: SignedReceipt[] = [];
    const state = { payer: '' };
    const agent = await scriptedAgent(
      t,
      brokerUrl,
      payoutWallet.address.toLowerCase(),
      (a, req, sender) => {
        state.payer = req.pay!.payer;
        // The lane as it stands before this answer's receipt, which the next answer carries.
        const lane = a.lane();
        a.answer(sender, req.id, undefined, lane, ready.length > 0 ? ready.splice(0) : undefined);
        ready.push(a.receipt(req.pay!.payer, { requestId: req.id }));
      },
      kwsPrice,
      creditMicros,
    );
    await register(payoutWallet, agent.identity);
    return { agent, ready, state };
  }

  test('each receipt on the next answer, the last by itself: all linked and paid', async (t) => {
    const broker = await brokerFor(t);
    const { agent, ready, state } = await followingAgent(t, broker.url);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    for (let i = 0; i < 5; i++) await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    // The first four receipts came on the answers after them; the last is due.
    assert.equal(mesh.lanes()[0]!.receipts, 4);
    assert.equal(mesh.lanes()[0]!.receiptsDue, 1);
    // Only the request whose receipt is still due is remembered.
    assert.equal(mesh.counters.paidRequestsRemembered, 1);
    agent.sendReceipts(mesh.clientId, state.payer, ready.splice(0));
    assert.ok(await mesh.receiptsIn(5_000), 'every receipt came');
    assert.equal(mesh.counters.paidRequestsRemembered, 0);
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.receipts, 5);
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 10);
    await waitFor(() => lastVoucher(agent) === 10, 5_000, 'the voucher pays all five');
  });

  test('an app that reuses its input buffer at once still pays: the input hash is of the bytes sent', async (t) => {
    const broker = await brokerFor(t);
    const { agent, ready, state } = await followingAgent(t, broker.url);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const inputs = kws();
    const answered = mesh.infer('kws', inputs, { deadlineMs: 5_000, agentId: agent.identity.id });
    // The next audio frame goes into the same buffer while the request is out (the SDK hashes the inputs later).
    for (const t of Object.values(inputs)) (t.data as Float32Array).fill(0.5);
    await answered;
    agent.sendReceipts(mesh.clientId, state.payer, ready.splice(0));
    assert.ok(await mesh.receiptsIn(5_000));
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 2);
  });

  test('what an answer may cost stays held against the window until its receipt comes', async (t) => {
    const broker = await brokerFor(t);
    // A window of one request: the next fits only once the last answer's receipt is in and paid.
    const { agent, ready, state } = await followingAgent(t, broker.url, 2);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const id = agent.identity.id;
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: id });
    assert.equal(mesh.lanes()[0]!.receiptsDue, 1, 'the answer is in, its receipt due');
    const second = mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: id });
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(agent.requests.length, 1, 'the second request is held back while the first receipt is due');
    agent.sendReceipts(mesh.clientId, state.payer, ready.splice(0));
    await second;
    assert.equal(agent.requests.length, 2);
    agent.sendReceipts(mesh.clientId, state.payer, ready.splice(0));
    assert.ok(await mesh.receiptsIn(5_000));
    assert.equal(mesh.lanes()[0]!.owedMicros, 4);
    assert.equal(mesh.lanes()[0]!.refused, 0);
  });

  test('a receipt lost after its answer (a broker node died between them) is asked for and paid', async (t) => {
    const broker = await brokerFor(t);
    // Answers carry nothing and no receipt ever leaves by itself: as if each one was lost on the way. The agent
    // issued (journaled) them, so a resync brings them.
    const { agent } = await followingAgent(t, broker.url);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    await mesh.infer('kws', kws(), { deadlineMs: 30_000, agentId: agent.identity.id });
    assert.equal(mesh.lanes()[0]!.receiptsDue, 1, 'the answer is in, its receipt due');
    assert.equal(agent.resyncs, 0);
    assert.ok(await mesh.receiptsIn(5_000), 'the lost receipt came when asked for');
    assert.ok(agent.resyncs >= 1, 'the client asked');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.receipts, 1);
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 2);
    await waitFor(() => lastVoucher(agent) === 2, 5_000, 'the voucher pays it');
  });

  test('receipts an answer carries for a request never answered, or for other outputs, are not paid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    let n = 0;
    let carried: SignedReceipt[] = [];
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      n++;
      const payer = req.pay!.payer;
      if (n === 1) {
        // Not answered, but billed on the next answer.
        carried = [a.receipt(payer, { requestId: req.id })];
        return;
      }
      if (n === 2) {
        // Answered, billed on the next answer for outputs it did not send, and a receipt for a request nobody sent.
        a.answer(sender, req.id, undefined, a.lane(), carried);
        carried = [
          a.receipt(payer, { requestId: req.id, outputHash: new Uint8Array(32).fill(9) }),
          a.receipt(payer, { requestId: new Uint8Array(16).fill(3) }),
        ];
        return;
      }
      a.answer(sender, req.id, undefined, a.lane(), carried);
      carried = [a.receipt(payer, { requestId: req.id })];
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const id = agent.identity.id;
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 300, agentId: id }), /MESH_|within|deadline/);
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: id });
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: id });
    await waitFor(() => mesh.lanes()[0]!.receipts === 3, 5_000, 'three receipts linked');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.refused, 3, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 0, 'nothing owed: the unanswered request, the other outputs and the request never sent');
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(lastVoucher(agent), 0, 'no voucher pays them');
  });

  test('a receipt that comes before its answer is linked and paid when the answer comes, not at the deadline', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    // Its receipt by itself first, then the answer: a network that does not keep the agent's order.
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      const lane = a.lane();
      a.sendReceipts(sender, req.pay!.payer, [a.receipt(req.pay!.payer, { requestId: req.id })]);
      setTimeout(() => a.answer(sender, req.id, undefined, lane), 100);
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    // A deadline far past the test's waits: what waited for the answer must not wait for the deadline too.
    await mesh.infer('kws', kws(), { deadlineMs: 60_000, agentId: agent.identity.id });
    assert.ok(await mesh.receiptsIn(5_000), 'the receipt is in with its answer');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.receipts, 1);
    assert.equal(lane.held, 0, 'nothing held any more');
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 2);
    await waitFor(() => lastVoucher(agent) === 2, 5_000, 'the voucher pays it');
  });
});

describe('receipts that come before their replies', () => {
  test('a resync batch that overtakes a reply does not leave the answered request unpaid', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    const held: { sender: string; req: InferRequest; receipt: SignedReceipt }[] = [];
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      const receipt = a.receipt(req.pay!.payer, { requestId: req.id });
      // The first request's reply is held back; the second is answered at once, so the payer sees a gap and
      // asks for the receipts again, and this agent's batch carries the first receipt before its reply.
      if (held.length === 0) held.push({ sender, req, receipt });
      else a.answer(sender, req.id, receipt);
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const first = mesh.infer('kws', kws(), { deadlineMs: 10_000, agentId: agent.identity.id });
    await waitFor(() => held.length === 1, 5_000, 'the first request at the agent');
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    await waitFor(() => agent.resyncs >= 1, 5_000, 'a resync');
    // The batch (both receipts) has reached the payer before the first reply: nothing is linked yet.
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(mesh.lanes()[0]!.receipts, 0, 'the receipts wait for the reply that is due');
    agent.answer(held[0]!.sender, held[0]!.req.id, held[0]!.receipt);
    await first;
    await waitFor(() => mesh.lanes()[0]!.receipts === 2, 5_000, 'both receipts linked');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.refused, 0, `refused: ${lane.lastRefusal}`);
    assert.equal(lane.owedMicros, 4, 'both answered requests are owed');
    await waitFor(() => lastVoucher(agent) === 4, 5_000, 'the voucher pays 4');
  });

  test('a receipt from a resync whose reply never comes is linked unpaid at the deadline, and the lane goes on', async (t) => {
    const { agent, mesh, pinned } = await laneLosingReply(t, 1);
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const lost = pinned(600).catch((err: MeshError) => err.code);
    await waitFor(() => agent.requests.length === 1, 5_000, 'the first request at the agent');
    await pinned(5_000);
    assert.equal(await lost, 'MESH_DEADLINE_EXCEEDED');
    await waitFor(() => mesh.lanes()[0]!.receipts === 2, 5_000, 'both receipts linked after the deadline');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.refused, 1);
    assert.equal(lane.lastRefusal, 'no-reply');
    assert.equal(lane.owedMicros, 2, 'only the answered request is owed');
  });

  test('a receipt held behind a gap when the app closes is stored, and paid after the restart when the gap fills', async (t) => {
    const broker = await brokerFor(t);
    // The first reply is lost; the second is answered.
    const agent = await agentLosingReply(t, broker.url, 1);
    const { open } = await restartingApp(t, broker.url);
    let mesh = await open();
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    // Resyncs go unanswered until the app has restarted (a lossy link, or an agent busy restarting).
    agent.answerResyncs = false;
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 300, agentId: agent.identity.id }));
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    assert.equal(mesh.lanes()[0]!.receipts, 0, 'the answered receipt waits behind the lost one');
    const asked = agent.resyncs;
    await mesh.close();
    assert.ok(agent.resyncs > asked || asked > 0, 'the app asked for the missing receipt');
    agent.answerResyncs = true;
    mesh = await open();
    await mesh.waitForModel('kws');
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 2, 5_000, 'both receipts linked after the restart');
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.owedMicros, 2, 'the request the app got an answer for before it closed is owed');
    assert.equal(lane.refused, 1, 'the one never answered is not');
    await waitFor(() => lastVoucher(agent) === 2, 5_000, 'the voucher pays 2');
  });
});

describe("the payer's store", () => {
  test('request ids are stored one key each, only the new ones per save; a store from before that is taken and rewritten', async (t) => {
    const broker = await brokerFor(t);
    const agent = await agentLosingReply(t, broker.url, 0);
    const { open, wallet, dataDir } = await restartingApp(t, broker.url);
    const payer = wallet.address.toLowerCase();
    const location = path.join(dataDir, `payer-${domain.chainId}-${domain.escrow.toLowerCase()}-${payer}`);
    const serve = async (n: number) => {
      const mesh = await open();
      await mesh.waitForModel('kws');
      await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
      for (let i = 0; i < n; i++) await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
      await mesh.close();
    };
    /** The lane record's own list of ids and the ids kept apart, by key. */
    const read = async () => {
      const db = new Level<string, unknown>(location, { valueEncoding: 'json' });
      const apart = new Map<string, string>();
      let inline: string[] = [];
      for await (const [key, value] of db.iterator()) {
        if (key.startsWith('~closed!')) apart.set(key, value as string);
        else inline = (value as { state: { closed: string[] } }).state.closed;
      }
      await db.close();
      return { inline, apart };
    };
    await serve(5);
    const first = await read();
    assert.deepEqual(first.inline, [], 'the lane record no longer carries the list');
    assert.equal(first.apart.size, 5, 'one key per request answered');
    await serve(3);
    const second = await read();
    assert.equal(second.apart.size, 8);
    for (const [key, id] of first.apart) assert.equal(second.apart.get(key), id, 'earlier ids keep their keys: only new ones were written');

    // A store written before the ids were kept apart: the list inside the lane record.
    const db = new Level<string, unknown>(location, { valueEncoding: 'json' });
    const agentKey = [...(await db.keys().all())].find((k) => !k.startsWith('~closed!'))!;
    const record = (await db.get(agentKey)) as { state: { closed: string[] } };
    record.state.closed = [...second.apart.values()];
    await db.batch([
      { type: 'put', key: agentKey, value: record },
      ...[...second.apart.keys()].map((key) => ({ type: 'del' as const, key })),
    ]);
    await db.close();
    await serve(1);
    const third = await read();
    assert.deepEqual(third.inline, []);
    assert.deepEqual([...third.apart.values()].slice(0, 8), [...second.apart.values()], 'the old list moved out of the record, in order');
    assert.equal(third.apart.size, 9);
    assert.equal(agent.vouchers.at(-1)?.cumulative, 2 * 9, 'all nine paid');
  });
});

describe('resyncs an agent cannot turn into a flood', () => {
  test('an agent that never sends a receipt it lost gets one resync per event, not one every 500 ms', async (t) => {
    // The second reply is lost, and its receipt is left out of every resync answer.
    const { agent, mesh, pinned } = await laneLosingReply(t, 2, true);
    await pinned(3_000);
    await assert.rejects(pinned(300));
    await pinned(3_000);
    await waitFor(() => agent.resyncs >= 1, 5_000, 'a resync for the missing receipt');
    await new Promise((r) => setTimeout(r, 2_500));
    // One ask for the gap the third reply showed, and one retry after 1 s (the next would come at 3 s): the answer
    // (without the receipt) asks nothing more by itself.
    assert.ok(agent.resyncs <= 2, `${agent.resyncs} resyncs in 2.5 s`);
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.receipts, 1, 'the lane stands before the gap');
    assert.equal(lane.owedMicros, 2);
  });
});

describe('receipts that follow their answers, at the edges', () => {
  test("a lost receipt is still asked for after the attempt's hold ran out (the SDK's default 1 s deadline, the first two asks lost)", async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    // Answers carry nothing and no receipt leaves by itself (as if each was lost with a broker node); the answer
    // leaves 300 ms after the request, as a model that takes 300 ms would.
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      const lane = a.lane();
      a.receipt(req.pay!.payer, { requestId: req.id });
      setTimeout(() => a.answer(sender, req.id, undefined, lane), 300);
    });
    await register(payoutWallet, agent.identity);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    // The first two asks are lost (the agent's node is down, or the ask's node): the third would bring it.
    agent.answerResyncs = false;
    const lose = setInterval(() => {
      if (agent.resyncs >= 2) agent.answerResyncs = true;
    }, 5);
    t.after(() => clearInterval(lose));
    await mesh.infer('kws', kws(), { deadlineMs: 1_000, agentId: agent.identity.id });
    await new Promise((r) => setTimeout(r, 8_000));
    const lane = mesh.lanes()[0]!;
    assert.equal(lane.receiptsDue, 0, 'nothing due any more by the SDK');
    assert.ok(agent.resyncs >= 3, `asked ${agent.resyncs} times in 8 s (docs: 1 s, doubling, five times)`);
    assert.equal(lane.receipts, 1, 'the receipt of the answer the app got is linked');
    assert.equal(lane.owedMicros, 2);
  });

  test('a receipt that came before its answer and waits behind a gap at close is paid after the restart', async (t) => {
    const broker = await brokerFor(t);
    const payoutWallet = account();
    let n = 0;
    const agent = await scriptedAgent(t, broker.url, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      n++;
      const payer = req.pay!.payer;
      // The first request's reply is lost (its receipt stays in the journal).
      if (n === 1) {
        a.receipt(payer, { requestId: req.id });
        return;
      }
      // The second: its receipt overtakes its answer (a network that does not keep the agent's order).
      const lane = a.lane();
      a.sendReceipts(sender, payer, [a.receipt(payer, { requestId: req.id })]);
      setTimeout(() => a.answer(sender, req.id, undefined, lane), 100);
    });
    await register(payoutWallet, agent.identity);
    const { open } = await restartingApp(t, broker.url);
    let mesh = await open();
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    agent.answerResyncs = false;
    await assert.rejects(mesh.infer('kws', kws(), { deadlineMs: 300, agentId: agent.identity.id }));
    await mesh.infer('kws', kws(), { deadlineMs: 5_000, agentId: agent.identity.id });
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(mesh.lanes()[0]!.receipts, 0, 'the answered receipt waits behind the lost one');
    assert.equal(mesh.lanes()[0]!.held, 1);
    await mesh.close();
    agent.answerResyncs = true;
    mesh = await open();
    await mesh.waitForModel('kws');
    await waitFor(() => (mesh.lanes()[0]?.receipts ?? 0) === 2, 5_000, 'both receipts linked after the restart');
    const lane = mesh.lanes()[0]!;
    assert.equal(
      lane.owedMicros,
      2,
      `the request the app got an answer for before it closed is owed (refused ${lane.refused}: ${lane.lastRefusal})`,
    );
  });
});

describe('closing while a receipt waits for an answer that never comes', () => {
  /** An agent whose first answer is lost on the way (a broker node died) while its receipt, sent after it, arrives. */
  async function losingFirstAnswer(t: TestContext, brokerUrl: string): Promise<Scripted> {
    const payoutWallet = account();
    let n = 0;
    const agent = await scriptedAgent(t, brokerUrl, payoutWallet.address.toLowerCase(), (a, req, sender) => {
      n++;
      const payer = req.pay!.payer;
      const receipt = a.receipt(payer, { requestId: req.id });
      if (n === 1) a.sendReceipts(sender, payer, [receipt]);
      else a.answer(sender, req.id, receipt);
    });
    await register(payoutWallet, agent.identity);
    return agent;
  }

  test('answers the app got, whose receipts sit behind one waiting for a lost answer, are paid when the app closes', async (t) => {
    const broker = await brokerFor(t);
    const agent = await losingFirstAnswer(t, broker.url);
    const { mesh } = await payingMesh(t, broker.url);
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const first = mesh.infer('kws', kws(), { deadlineMs: 6_000, agentId: agent.identity.id }).catch(() => undefined);
    await waitFor(() => mesh.lanes()[0]!.held === 1, 5_000, 'the first receipt held for its answer');
    await mesh.infer('kws', kws(), { deadlineMs: 6_000, agentId: agent.identity.id });
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(mesh.lanes()[0]!.held, 2, "the answered request's receipt waits behind the first");
    await mesh.close();
    await first;
    // The app got the second answer and is gone for good: the honest agent's receipt for it must be paid now.
    assert.equal(lastVoucher(agent), 4 - 2, `paid ${lastVoucher(agent)} at close for the answer the app got`);
  });

  test('after close, nothing the closed lanes held is linked or signed later (no timer outlives close)', async (t) => {
    const broker = await brokerFor(t);
    const agent = await losingFirstAnswer(t, broker.url);
    const wallet = account();
    let signedAfterClose = 0;
    let closed = false;
    // A remote signer (a wallet that prompts its user): it is asked only through signTypedData.
    const signer = {
      getAddress: () => wallet.getAddress(),
      signTypedData: (d: never, ty: never, v: never) => {
        if (closed) signedAfterClose++;
        return wallet.signTypedData(d, ty, v);
      },
    };
    // No store: what a dead instance does is not stopped by a closed database.
    const mesh = await meshFor(t, {
      brokerUrl: broker.url,
      payment: { signer, chain: wallet.provider!, domain, voucherDelayMs: 0 } as never,
    });
    await mesh.waitForModel('kws');
    await waitFor(() => mesh.lanes().length === 1, 5_000, 'the lane open');
    const first = mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id }).catch(() => undefined);
    await waitFor(() => mesh.lanes()[0]!.held === 1, 5_000, 'the first receipt held for its answer');
    await mesh.infer('kws', kws(), { deadlineMs: 3_000, agentId: agent.identity.id });
    await new Promise((r) => setTimeout(r, 100));
    await mesh.close();
    closed = true;
    await first;
    const atClose = mesh.lanes()[0]!.receipts;
    await new Promise((r) => setTimeout(r, 3_000));
    assert.equal(
      mesh.lanes()[0]!.receipts,
      atClose,
      `receipts linked by a closed client (and ${signedAfterClose} vouchers signed after close)`,
    );
    assert.equal(signedAfterClose, 0, 'vouchers signed by a closed client (a wallet prompt after close)');
  });
});
