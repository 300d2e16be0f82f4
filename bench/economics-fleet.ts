/**
 * The parts of the `economics` benchmark (bench/economics.ts): an in-memory network, agents and payers.
 *
 * Every agent is edge-agent's own request path (`AgentRequests`) over its own paid side (`openPaidSide`:
 * `AgentPayments` with its journal, grants, credit rule and lane funds read from the chain, and the
 * `Settler`); only the ONNX worker pool is replaced, by a scheduler that answers at once with a small
 * tensor. Every payer is the SDK's `PayerLanes`, fed exactly as sdk/src/index.ts feeds it (statuses,
 * `payField`, `noteRequest`, `noteAttempt`, `onReply` for every reply that carries a receipt or lane info,
 * `onReceiptBatch`, `flush` and one retry on MESH_CREDIT_EXCEEDED while it owes the agent).
 *
 * Dishonest parties are the same real objects with one thing changed, the way a stranger running the
 * code could change it: an agent that tampers with what it passes to `issue`, answers late, drops
 * replies or ignores resyncs; a payer that never funds its lanes, stops or rewrites its vouchers,
 * withdraws, or drains its lane through relayer fees. What each does is in docs/benchmarks.md.
 *
 * The network carries encoded messages between them (no MQTT: the broker's topic ACL is stood for by
 * stamping each message with its real sender), losing each one with a fixed probability and delaying
 * it by a uniform random time. The ledger records what the harness knows and the parties do not: which
 * replies reached which payer before the deadline, and which receipts were tampered with.
 */
import { readReply } from '@edge-mesh/client';
import { EscrowClient } from '@edge-mesh/contracts';
import {
  type AgentStatus,
  decodeMessage,
  type EscrowDomain,
  encodeMessage,
  encodeTensorMap,
  generateIdentity,
  hashTensorMap,
  type Identity,
  type InferReply,
  type InferRequest,
  MeshError,
  newRequestId,
  PROTOCOL_VERSION,
  parseTopic,
  RECEIPT_STATUS,
  requestIdHex,
  type SignedReceipt,
  signLaneGrant,
  signStatus,
  signVoucher,
  type Tensor,
  toHex,
  type VoucherMessage,
  verifyStatus,
} from '@edge-mesh/protocol';
import type { ethers } from 'ethers';
import type { Logger } from 'pino';
import { Faults } from '../edge-agent/src/faults.ts';
import type { ManifestEntry } from '../edge-agent/src/manifest.ts';
import { closePaidSide, openPaidSide, type PaidSide } from '../edge-agent/src/paid.ts';
import type { AgentPayments, PaidJob, ReceiptFacts } from '../edge-agent/src/payments.ts';
import { AgentRequests, ReplayGuard } from '../edge-agent/src/requests.ts';
import type { Job } from '../edge-agent/src/scheduler.ts';
import { newAgentCounters } from '../edge-agent/src/types.ts';
import type { LoadedModel } from '../edge-agent/src/worker-protocol.ts';
import { PayerLanes } from '../sdk/src/payments.ts';
import type { Rng } from './sim/rng.ts';

export const MODEL = 'kws';
const MODEL_SHA = 'ab'.repeat(32);
const INPUTS = [{ name: 'x', dtype: 'float32' as const, shape: [1, 4] }];
const OUTPUTS = [{ name: 'y', dtype: 'float32' as const, shape: [1, 2] }];

export type MessageKind = 'request' | 'reply' | 'voucher' | 'resync' | 'receipts';
const KINDS: MessageKind[] = ['request', 'reply', 'voucher', 'resync', 'receipts'];

/** A party the network delivers to; `up` is false while it restarts (what arrives then is lost). */
export interface Endpoint {
  up: boolean;
}

/** Counts what a logger was told (the real classes report refusals and their reasons through their logger). */
export class CountingLogger {
  readonly messages: Record<string, number> = {};
  /** Receipts a payer linked and did not pay, by agent id and reason. */
  readonly unpaid = new Map<string, Record<string, number>>();
  readonly errors: string[] = [];

  private note(fields: object, message?: string): void {
    const m = message ?? '';
    this.messages[m] = (this.messages[m] ?? 0) + 1;
    const { reason, agentId } = fields as { reason?: unknown; agentId?: unknown };
    if (m === 'receipt linked, not paid' && typeof reason === 'string' && typeof agentId === 'string') {
      const by = this.unpaid.get(agentId) ?? {};
      by[reason] = (by[reason] ?? 0) + 1;
      this.unpaid.set(agentId, by);
    }
  }

  readonly debug = (): void => {};
  readonly info = (fields: object, message?: string): void => this.note(fields, message);
  readonly warn = (fields: object, message?: string): void => this.note(fields, message);
  readonly error = (fields: object, message?: string): void => {
    this.note(fields, message);
    if (this.errors.length < 20) this.errors.push(`${message ?? ''}: ${JSON.stringify(fields)}`);
  };
  readonly child = (): CountingLogger => this;

  /** The same object, typed for the parts that declare a pino logger. */
  get pino(): Logger {
    return this as unknown as Logger;
  }
}

/** An in-memory network: per-message loss and delay, and delivery only to parties that are up. */
export class Network {
  readonly sent = Object.fromEntries(KINDS.map((k) => [k, 0])) as Record<MessageKind, number>;
  readonly lost = Object.fromEntries(KINDS.map((k) => [k, 0])) as Record<MessageKind, number>;
  /** Messages that arrived while their receiver was restarting. */
  lostToRestarts = 0;
  inflight = 0;
  /** Per receiver and sender, when the last message sent between them arrives (performance.now()). */
  private readonly lastArrival = new WeakMap<Endpoint, Map<string, number>>();

  constructor(
    private readonly rng: Rng,
    public loss: number,
    private readonly delayMs: readonly [number, number],
  ) {}

  /**
   * Sends one message. With `from`, messages from one sender to one receiver are meant to arrive in the
   * order sent, as MQTT delivers one client's publishes on a topic to a subscriber: a later one is due no
   * earlier than the one before. Not strictly so: each is a timer of its own, and Node counts a timer from
   * the event loop's cached time, so two due within the same millisecond can fire in either order (about
   * 6 % of such pairs on a busy loop). The payment code must not depend on that order: the SDK holds a
   * resync's receipt whose reply is still due (sdk/src/payments.ts, `onReceiptBatch`).
   */
  send(kind: MessageKind, to: Endpoint, deliver: () => void, dropped?: () => void, from?: string): void {
    this.sent[kind]++;
    if (this.loss > 0 && this.rng.next() < this.loss) {
      this.lost[kind]++;
      dropped?.();
      return;
    }
    this.inflight++;
    let delay = this.rng.uniform(this.delayMs[0], this.delayMs[1]);
    if (from !== undefined) {
      const now = performance.now();
      const last = this.lastArrival.get(to) ?? new Map<string, number>();
      this.lastArrival.set(to, last);
      const at = Math.max(now + delay, last.get(from) ?? 0);
      last.set(from, at);
      delay = at - now;
    }
    setTimeout(() => {
      this.inflight--;
      if (!to.up) {
        this.lostToRestarts++;
        dropped?.();
        return;
      }
      deliver();
    }, delay);
  }
}

/** What the harness knows and the parties do not. */
export class Ledger {
  /** Receipts a dishonest agent tampered with, by `${agentId}|${payer}|${seq}`, with how. */
  readonly tampered = new Map<string, string>();
  /** Which client sent each request id (hex): receipts billed to a payer for another client's request are impersonation. */
  readonly senderOf = new Map<string, string>();
  /** Per lane `${payer}|${agentId}`: the value of the work the payer asked for and got in time, and what that took. */
  readonly value = new Map<string, { micros: number; receipts: number }>();
  /** Replies that reached a payer as its clock passed the deadline (counted as owed: the payer may judge either way). */
  ambiguous = 0;
  /** Replies of honest agents that reached their payer after the deadline (the event loop was slow). */
  lateHonest = 0;
  /** Receipts billed to an honest payer's lane for a request some other client sent. */
  impersonated = 0;

  tamperKey(agentId: string, payer: string, seq: number): string {
    return `${agentId}|${payer}|${seq}`;
  }
}

export type AgentBehaviour = 'honest' | 'invent' | 'inflate' | 'ok-on-error' | 'late' | 'squat' | 'drop' | 'refuse-resync';

export interface AgentSetup {
  behaviour: AgentBehaviour;
  /** The account whose address is the payout (and that registers the agent's key and sends its settlements). */
  wallet: ethers.Wallet;
  /** The payout the quote names: the wallet's own, except for a squatter. */
  payout: string;
  domain: EscrowDomain;
  provider: ethers.Provider;
  dataDir: string;
  priceMicros: number;
  creditRequests: number;
  /** The settler's threshold in micro-dollars; no settler when undefined. */
  settleThresholdMicros: number | undefined;
}

/** An agent: edge-agent's request path and paid side, with an instant model. */
export class SimAgent implements Endpoint {
  readonly identity: Identity = generateIdentity('agent');
  readonly id = this.identity.id;
  up = true;
  /** Requests taken from the network and not yet answered (this generation). */
  busy = 0;
  /** Of those, requests a late agent holds on purpose until past their deadline. */
  holding = 0;
  side!: PaidSide;
  restarts = 0;
  readonly logger = new CountingLogger();
  /** What admission refused, by payer and reason (`details.reason` of MESH_CREDIT_EXCEEDED and MESH_FORBIDDEN, else the code). */
  readonly refusals = new Map<string, Record<string, number>>();
  /** The paid side's counters of the instances before the last restart. */
  private readonly pastCounters: Record<string, number> = {};
  /** What this agent did that an honest one would not, by kind. */
  readonly cheats: Record<string, number> = {};
  private requests!: AgentRequests;

  /** Receipts of answers sent that are not sent yet (they follow their answers). */
  get receiptsWaiting(): boolean {
    return this.requests.receiptsWaiting;
  }
  private generation = 0;
  /** Counters behind the dishonest patterns (every other one, every third, …). */
  private readonly nth = { issued: 0, jobs: 0, replies: 0, batches: 0 };
  private readonly deadlines = new Map<string, number>();
  private readonly session = toHex(newRequestId()).slice(2);

  constructor(
    readonly setup: AgentSetup,
    private readonly net: Network,
    private readonly ledger: Ledger,
    private readonly payerByClient: Map<string, SimPayer | SimImpersonator>,
  ) {}

  get behaviour(): AgentBehaviour {
    return this.setup.behaviour;
  }

  get payments(): AgentPayments {
    return this.side.payments;
  }

  get creditMicros(): number {
    return this.setup.creditRequests * this.setup.priceMicros;
  }

  private cheat(kind: string): void {
    this.cheats[kind] = (this.cheats[kind] ?? 0) + 1;
  }

  async start(): Promise<void> {
    const { setup } = this;
    const entry: ManifestEntry = { name: MODEL, version: '1', file: 'kws.onnx', sha256: MODEL_SHA, priceMicros: setup.priceMicros };
    this.side = await openPaidSide(
      this.identity,
      {
        payout: setup.payout,
        domain: setup.domain,
        dataDir: setup.dataDir,
        provider: setup.provider,
        creditRequests: setup.creditRequests,
        // Each receipt issued in the turn after its answer, not with those of the next 5 ms: with so small a window
        // (creditRequests 4 in the test) the refusing payer's halved vouchers then check seqs close to what was billed,
        // so its refusals reach a window by that rule ('refused') and not first by the unpaid window's ('window').
        // Under a loaded machine the 5 ms default left that rule untried in one run of five (test/economics.test.ts).
        receiptIssueMs: 0,
        // Read at every round's chain step (catchUp), not on a timer of its own.
        fundsPollMs: 3_600_000,
        ...(setup.settleThresholdMicros !== undefined
          ? { settle: { runner: setup.wallet, thresholdMicros: setup.settleThresholdMicros, checkEveryMs: 2_000_000_000 } }
          : {}),
      },
      [entry],
      this.logger.pino,
    );
    this.instrument(this.side.payments);
    const generation = ++this.generation;
    this.busy = 0;
    this.holding = 0;
    const models = new Map<string, LoadedModel>([
      [MODEL, { name: MODEL, inputs: INPUTS, outputs: OUTPUTS, provider: 'cpu', latencyMs: 1 }],
    ]);
    this.requests = new AgentRequests({
      agentId: this.id,
      maxMessageBytes: 1 << 20,
      maxElements: 1 << 20,
      models,
      replays: new ReplayGuard(1 << 20),
      payments: this.side.payments,
      counters: newAgentCounters(),
      faults: new Faults(),
      logger: this.logger,
      reply: (senderId, payload) => this.reply(generation, senderId, payload),
      closed: () => generation !== this.generation || !this.up,
    });
    this.requests.attach({
      submit: (job) => this.submit(generation, job),
      cancel: () => false,
      // The instant model queues nothing: what it holds is what it has not answered yet.
      queueClaim: () => ({ rif: this.busy, workMs: 0 }),
    });
  }

  /** The paid side's counters summed over restarts (receipts, vouchers refused, grants refused, resyncs refused, …). */
  paymentCounters(): Record<string, number> {
    const out: Record<string, number> = { ...this.pastCounters };
    for (const [k, v] of Object.entries(this.side.payments.counters)) out[k] = (out[k] ?? 0) + v;
    return out;
  }

  /** The signed status with the quote, as the agent announces it. */
  status(): AgentStatus {
    return signStatus(this.identity, {
      v: PROTOCOL_VERSION,
      kind: 'status',
      agent: this.id,
      state: 'online',
      ts: Date.now(),
      session: this.session,
      models: [
        {
          name: MODEL,
          version: '1',
          sha256: MODEL_SHA,
          priceMicros: this.setup.priceMicros,
          latencyMs: 1,
          inputs: INPUTS,
          outputs: OUTPUTS,
        },
      ],
      workers: 1,
      quote: this.payments.signedQuote(),
    });
  }

  /** Wraps the paid side's calls: to count refusals, to keep the barrier's books, and for a dishonest agent to cheat. */
  private instrument(payments: AgentPayments): void {
    const admit = payments.admit.bind(payments);
    payments.admit = async (...args) => {
      try {
        return await admit(...args);
      } catch (err) {
        const reason = String((err as MeshError).details?.reason ?? (err as MeshError).code);
        const payer = args[0].toLowerCase();
        const by = this.refusals.get(payer) ?? {};
        by[reason] = (by[reason] ?? 0) + 1;
        this.refusals.set(payer, by);
        throw err;
      }
    };
    const acceptVoucher = payments.acceptVoucher.bind(payments);
    payments.acceptVoucher = (senderId, message) => {
      this.busy++;
      return acceptVoucher(senderId, message).finally(() => this.busy--);
    };
    const resync = payments.resync.bind(payments);
    payments.resync = (senderId, request, agentId) => {
      this.busy++;
      return resync(senderId, request, agentId).finally(() => this.busy--);
    };
    // issueAll, which `issue` calls too: every receipt the agent signs, an answer's (issued together) or another kind's.
    const issueAll = payments.issueAll.bind(payments);
    payments.issueAll = (items) => {
      const tampered = items.map(({ job, facts }) => this.tamper(job, facts));
      const out = issueAll(tampered.map(([job, facts]) => ({ job, facts })));
      for (const [i, { job, facts }] of items.entries()) {
        const how = tampered[i]![2];
        if (how) this.ledger.tampered.set(this.ledger.tamperKey(this.id, job.payer, out.receipts[i]!.seq), how);
        const sender = this.ledger.senderOf.get(requestIdHex(facts.requestId));
        const owner = this.payerByClient.get(sender ?? '');
        if (sender !== undefined && (!(owner instanceof SimPayer) || owner.address !== job.payer)) this.ledger.impersonated++;
      }
      return out;
    };
  }

  /** What a dishonest agent changes in a receipt before signing it; honest agents change nothing. */
  private tamper(job: PaidJob, facts: ReceiptFacts): [PaidJob, ReceiptFacts, string | undefined] {
    const ok = facts.status === RECEIPT_STATUS.ok;
    switch (this.behaviour) {
      case 'inflate': {
        if (!ok) break;
        this.nth.issued++;
        if (this.nth.issued % 4 === 1) {
          this.cheat('units');
          return [job, { ...facts, unitsUsed: 2 }, 'units'];
        }
        if (this.nth.issued % 4 === 3) {
          this.cheat('price');
          return [{ ...job, price: { ...job.price, unitMicros: job.price.unitMicros * 3 } }, facts, 'price'];
        }
        break;
      }
      case 'ok-on-error':
        if (facts.status === RECEIPT_STATUS.failed) {
          this.cheat('ok-on-error');
          return [job, { ...facts, status: RECEIPT_STATUS.ok, unitsUsed: 1 }, 'ok-on-error'];
        }
        break;
      case 'late': {
        // Answers after the deadline but states a finish in time: only the payer's own clock can tell.
        const deadline = this.deadlines.get(requestIdHex(facts.requestId));
        this.deadlines.delete(requestIdHex(facts.requestId));
        if (deadline === undefined) break;
        this.cheat('late');
        const finishedAt = Math.min(facts.finishedAt, deadline - 5);
        return [job, { ...facts, finishedAt, startedAt: Math.min(facts.startedAt, finishedAt) }, 'late'];
      }
      default:
        break;
    }
    return [job, facts, undefined];
  }

  /** The worker pool's stand-in: the result at once (a dishonest agent may fail it on purpose or hold it past the deadline). */
  private submit(generation: number, job: Job): void {
    if (job.deadline <= Date.now()) throw new MeshError('MESH_DEADLINE_EXCEEDED', `request ${job.key} arrived after its deadline`);
    const finish = () => {
      if (generation !== this.generation || !this.up) return; // a restart drops the queue
      job.startedAt = performance.now();
      if (this.behaviour === 'ok-on-error' && job.paid && this.nth.jobs++ % 2 === 1) {
        this.requests.finished(job, new MeshError('MESH_INFERENCE_FAILED', 'simulated runtime failure'));
        return;
      }
      const y = new Float32Array([job.inputs.x!.data[0] as number, 1]);
      this.requests.finished(job, undefined, { outputs: { y: { dtype: 'float32', shape: [1, 2], data: y } }, execMs: 0.1 });
    };
    if (this.behaviour === 'late' && job.paid) {
      this.deadlines.set(job.key, job.deadline);
      this.holding++;
      setTimeout(
        () => {
          if (generation === this.generation) this.holding--;
          finish();
        },
        job.deadline - Date.now() + 40,
      );
    } else setImmediate(finish);
  }

  /** A request from `senderId` arrives. */
  deliverRequest(senderId: string, payload: Buffer): void {
    this.busy++;
    this.requests.onRequest(senderId, payload);
  }

  /** A voucher or a resync from `senderId` arrives. */
  deliverVoucher(senderId: string, payload: Buffer): void {
    if (this.behaviour === 'refuse-resync') {
      const m = decodeMessage(payload, ['voucher', 'resync']);
      if (m.kind === 'resync') {
        this.cheat('resync-ignored');
        return;
      }
    }
    this.requests.onVoucher(senderId, payload);
  }

  /** AgentRequests' reply hook: a reply to a request (one per request) or a resync's receipts. */
  private reply(generation: number, senderId: string, payload: Buffer): void {
    const message = decodeMessage(payload, ['res', 'err', 'receipts']);
    if (message.kind !== 'receipts' && generation === this.generation) this.busy--;
    if (generation !== this.generation || !this.up) {
      this.net.lostToRestarts++;
      return;
    }
    const to = this.payerByClient.get(senderId);
    if (!to) return;
    // A paid answer (it says where its lane stands); its receipt follows it (edge-agent/src/receipt-post.ts).
    if (message.kind === 'res' && message.lane) {
      this.nth.replies++;
      if (this.behaviour === 'drop' && this.nth.replies % 2 === 0) {
        this.cheat('reply-dropped');
        to.dropped(this.id, message.id);
        return;
      }
      if (this.behaviour === 'refuse-resync' && this.nth.replies % 3 === 0) {
        this.cheat('reply-dropped');
        to.dropped(this.id, message.id);
        return;
      }
      if (this.behaviour === 'invent' && this.nth.replies % 2 === 0) void this.invent(generation, senderId, message);
      // Receipts follow their answers: an agent that loses receipts (and refuses to send them again) loses those an
      // answer carries, every other time.
      if (this.behaviour === 'refuse-resync' && message.earlier && this.nth.replies % 2 === 0) {
        this.cheat('receipts-dropped');
        const { earlier: _lost, ...answer } = message;
        this.send(to, 'reply', Buffer.from(encodeMessage(answer)), message.id);
        return;
      }
    }
    // ... and every other message of receipts that leaves by itself.
    if (message.kind === 'receipts' && this.behaviour === 'refuse-resync' && this.nth.batches++ % 2 === 1) {
      this.cheat('receipts-dropped');
      return;
    }
    this.send(to, message.kind === 'receipts' ? 'receipts' : 'reply', payload, message.kind === 'receipts' ? undefined : message.id);
  }

  private send(to: SimPayer | SimImpersonator, kind: MessageKind, payload: Buffer, id?: Uint8Array): void {
    this.net.send(
      kind,
      to,
      () => to.deliverReply(this.id, payload),
      () => {
        if (id) to.dropped(this.id, id);
      },
      this.id,
    );
  }

  /** A receipt for a request nobody sent, signed into the lane and pushed to the payer as a result. */
  private async invent(generation: number, senderId: string, real: InferReply): Promise<void> {
    const owner = this.payerByClient.get(senderId);
    if (!(owner instanceof SimPayer)) return;
    const payer = owner.address;
    const price = { name: MODEL, modelHash: `0x${MODEL_SHA}`, baseMicros: 0, unitMicros: this.setup.priceMicros, minChargeMicros: 0 };
    const id = newRequestId();
    const now = Date.now();
    this.busy++;
    try {
      const { receipt, durable } = this.payments.issue(
        { payer, price, reservedMicros: 0, chargedMicros: 0, inputHash: () => new Uint8Array(32).fill(7) },
        {
          requestId: id,
          status: RECEIPT_STATUS.ok,
          unitsUsed: 1,
          outputHash: hashTensorMap(real.outputs),
          startedAt: now - 1,
          finishedAt: now,
        },
      );
      this.ledger.tampered.set(this.ledger.tamperKey(this.id, payer, receipt.seq), 'invented');
      this.cheat('invented');
      await durable;
      if (generation !== this.generation || !this.up) return;
      const to = this.payerByClient.get(senderId);
      const { earlier: _carried, ...answer } = real;
      const reply: InferReply = { ...answer, id, receipt, lane: this.payments.laneInfo(payer, senderId) ?? real.lane! };
      if (to) this.send(to, 'reply', Buffer.from(encodeMessage(reply)), id);
    } finally {
      this.busy--;
    }
  }

  /** Stops as a crash would (what is queued is dropped; the journal keeps what was written), and starts again from the store. */
  async restart(downMs: number): Promise<void> {
    this.up = false;
    this.generation++;
    this.restarts++;
    for (const [k, v] of Object.entries(this.side.payments.counters)) this.pastCounters[k] = (this.pastCounters[k] ?? 0) + v;
    await closePaidSide(this.side);
    await new Promise((r) => setTimeout(r, downMs));
    await this.start();
    this.up = true;
  }

  async close(): Promise<void> {
    this.up = false;
    this.generation++;
    await closePaidSide(this.side);
  }
}

export type PayerBehaviour = 'honest' | 'never-fund' | 'underfund' | 'stop-vouchers' | 'refuse-receipts' | 'withdraw' | 'fee-relay';

/** How a request ended, as the app saw it. */
export type Outcome = 'ok' | 'lost' | 'deadline' | 'down' | 'no-lane' | string;

interface Waiter {
  resolve: (outcome: Outcome) => void;
  timer: NodeJS.Timeout;
}

export interface PayerSetup {
  behaviour: PayerBehaviour;
  wallet: ethers.Wallet;
  domain: EscrowDomain;
  provider: ethers.Provider;
  dataDir: string;
  deadlineMs: number;
  voucherDelayMs: number;
}

/** A payer: the SDK's PayerLanes, driven as the SDK's request engine drives it. */
export class SimPayer implements Endpoint {
  readonly address: string;
  readonly clientId: string;
  up = true;
  lanes!: PayerLanes;
  restarts = 0;
  /**
   * From the start of a restart until its lanes are open again the app sends nothing and takes no answers.
   * While its lanes close ('closing'), they still take the payment side of every reply, as the SDK's do between
   * `engine.close()` and `payments.close()`; while they open again ('opening'), replies reach nothing.
   */
  private restarting: 'closing' | 'opening' | undefined;
  /** Requests in flight when the app began to close (`${agentId}|${key}`): their answers, until the lanes close, are paid. */
  private readonly abandoned = new Set<string>();
  readonly logger = new CountingLogger();
  /** What happens to this payer's vouchers on the way out: sent, dropped, or rewritten to pay half. */
  vouchers: 'send' | 'drop' | 'halve' = 'send';
  readonly counters = { requests: 0, ok: 0, retried: 0, vouchersDropped: 0, vouchersRewritten: 0 };
  readonly outcomes: Record<string, number> = {};
  escrow!: EscrowClient;
  private readonly waiters = new Map<string, Waiter>();
  /** Answers waited for that came without a receipt, when they came (before and after reading the clock): their receipts follow. */
  private readonly answered = new Map<string, { before: number; after: number }>();
  /** Receipts that came before the answers they stand for, which are still waited for. */
  private readonly receiptsFirst = new Map<string, SignedReceipt>();
  /** The deadline of each request this payer sent, kept by the harness for the ledger. */
  private readonly deadlines = new Map<string, number>();
  private statuses: (() => AgentStatus)[] = [];

  constructor(
    readonly setup: PayerSetup,
    readonly index: number,
    private readonly net: Network,
    private readonly ledger: Ledger,
    private readonly agents: Map<string, SimAgent>,
  ) {
    this.address = setup.wallet.address.toLowerCase();
    this.clientId = `app-${setup.behaviour}-${index}`;
  }

  get behaviour(): PayerBehaviour {
    return this.setup.behaviour;
  }

  async open(): Promise<void> {
    this.escrow ??= await EscrowClient.connect({ runner: this.setup.wallet, escrow: this.setup.domain.escrow });
    this.lanes = await PayerLanes.open(
      {
        signer: this.setup.wallet,
        domain: this.setup.domain,
        chain: this.setup.provider,
        dataDir: this.setup.dataDir,
        voucherDelayMs: this.setup.voucherDelayMs,
        // The agents settle their own vouchers here; a fee would count as what the payer paid beyond the work.
        relayerFee: 0,
      },
      this.clientId,
      (topic, payload) => this.publish(topic, payload),
      this.logger,
    );
    for (const status of this.statuses) this.onStatus(status());
    await this.lanes.ready();
  }

  /** Agents whose statuses this payer follows (it reads them again after a restart, as retained statuses). */
  follow(statuses: (() => AgentStatus)[]): void {
    this.statuses = statuses;
  }

  /** A status as the SDK's fleet view hands it on: only when its signature holds. */
  onStatus(status: AgentStatus): void {
    if (verifyStatus(status)) this.lanes.onStatus(status.agent, status);
  }

  /** PayerLanes' publish hook: vouchers and resyncs to an agent. */
  private publish(topic: string, payload: Buffer): void {
    const parsed = parseTopic(topic);
    const agent = parsed?.kind === 'voucher' ? this.agents.get(parsed.agentId) : undefined;
    if (!agent || parsed?.kind !== 'voucher' || parsed.senderId !== this.clientId) return;
    const message = decodeMessage(payload, ['voucher', 'resync']);
    if (message.kind === 'voucher' && this.vouchers === 'drop') {
      this.counters.vouchersDropped++;
      return;
    }
    if (message.kind === 'voucher' && this.vouchers === 'halve') {
      void this.halve(agent, message);
      return;
    }
    this.net.send(message.kind, agent, () => agent.deliverVoucher(this.clientId, payload), undefined, this.clientId);
  }

  /** Refuses half of what it owes: the same voucher, signed again for half the amount (and the same checked seq). */
  private async halve(agent: SimAgent, message: VoucherMessage): Promise<void> {
    const cumulative = Math.floor(message.cumulative / 2);
    if (cumulative <= 0) return;
    const sig = await signVoucher(this.setup.wallet, this.setup.domain, {
      agent: message.agent,
      cumulative: BigInt(cumulative),
      receiptsRoot: toHex(message.receiptsRoot),
      feeCumulative: 0n,
    });
    this.counters.vouchersRewritten++;
    const payload = Buffer.from(encodeMessage({ ...message, cumulative, sig: Buffer.from(sig.slice(2), 'hex') }));
    this.net.send('voucher', agent, () => agent.deliverVoucher(this.clientId, payload));
  }

  /**
   * One request to `agent`, as `mesh.infer(model, inputs, { agentId })` makes it: remembered by the lanes,
   * paid through the lane's payment field, and tried once more after MESH_CREDIT_EXCEEDED while this
   * payer owes the agent (its voucher is flushed first). Resolves with how it ended.
   */
  async request(agent: SimAgent, rng: Rng): Promise<Outcome> {
    if (!this.up || this.restarting) return this.count('down');
    const pay = this.lanes.payField(agent.id);
    if (!pay) return this.count('no-lane');
    this.counters.requests++;
    const id = newRequestId();
    const key = requestIdHex(id);
    const deadline = Date.now() + this.setup.deadlineMs;
    const x: Tensor = { dtype: 'float32', shape: [1, 4], data: new Float32Array([rng.next(), rng.next(), rng.next(), rng.next()]) };
    const request: InferRequest = { v: PROTOCOL_VERSION, kind: 'req', id, deadline, model: MODEL, inputs: encodeTensorMap({ x }) };
    this.lanes.noteRequest(key, deadline, request.inputs);
    this.ledger.senderOf.set(key, this.clientId);
    this.deadlines.set(key, deadline);
    let outcome = await this.attempt(agent, request, key);
    if (outcome === 'MESH_CREDIT_EXCEEDED' && this.up && this.lanes.owes(agent.id)) {
      // The SDK's retrySameAfter: the agent waits for a voucher this client is about to send.
      this.counters.retried++;
      const lanes = this.lanes;
      await lanes.flush();
      // A restart while the voucher went out ends this request, as it would end the app's process.
      outcome = this.lanes === lanes ? await this.attempt(agent, request, key) : 'down';
    }
    if (outcome === 'ok') this.counters.ok++;
    return this.count(outcome);
  }

  private count(outcome: Outcome): Outcome {
    this.outcomes[outcome] = (this.outcomes[outcome] ?? 0) + 1;
    return outcome;
  }

  private attempt(agent: SimAgent, request: InferRequest, key: string): Promise<Outcome> {
    if (!this.up) return Promise.resolve('down');
    let pay = this.lanes.payField(agent.id);
    if (!pay) return Promise.resolve('no-lane');
    // A payer that stops or rewrites its vouchers does not let the real one ride along with its requests.
    if (this.vouchers !== 'send' && pay.voucher) {
      const { voucher: _riding, ...rest } = pay;
      pay = rest;
    }
    this.lanes.noteAttempt(key, agent.id, MODEL);
    const payload = Buffer.from(encodeMessage({ ...request, pay }));
    const waitKey = `${agent.id}|${key}`;
    return new Promise<Outcome>((resolve) => {
      const timer = setTimeout(() => this.settle(waitKey, 'deadline'), Math.max(0, request.deadline - Date.now()) + 1);
      this.waiters.set(waitKey, { resolve, timer });
      this.net.send(
        'request',
        agent,
        () => agent.deliverRequest(this.clientId, payload),
        () => this.settle(waitKey, 'lost'),
        this.clientId,
      );
    });
  }

  private settle(waitKey: string, outcome: Outcome): void {
    const w = this.waiters.get(waitKey);
    if (!w) return;
    this.waiters.delete(waitKey);
    clearTimeout(w.timer);
    w.resolve(outcome);
  }

  /**
   * A message the network (or a dishonest agent) dropped: the simulated app stops waiting for it at once
   * instead of at the deadline, which only saves time; the payment code is told nothing.
   */
  dropped(agentId: string, id: Uint8Array): void {
    this.settle(`${agentId}|${requestIdHex(id)}`, 'lost');
  }

  /** A reply, or a resync's receipts, from `agentId`: handled as sdk/src/index.ts handles it. */
  deliverReply(agentId: string, payload: Buffer): void {
    const reading = readReply(agentId, payload);
    if (!reading) return;
    if (reading.batch) {
      this.lanes.onReceiptBatch(agentId, reading.batch);
      this.followed(agentId, reading.batch.receipts);
      return;
    }
    if (this.restarting === 'opening') return;
    const arrived = Date.now();
    // A reply for a request this instance is not waiting for (sent before a restart) reaches no app; one that
    // comes while the lanes close is paid as the SDK pays it, so the ledger counts it.
    const waiting = this.awaited(`${agentId}|${reading.key}`);
    const earlier = reading.reply?.earlier;
    if (earlier) this.lanes.onReceipts(agentId, earlier);
    if (reading.receipt || reading.lane) {
      this.lanes.onReply(agentId, reading.key, reading.error ? 'err' : 'res', reading.receipt, reading.reply?.outputs, reading.lane);
    }
    if (earlier) this.followed(agentId, earlier);
    if (waiting) {
      const kind = reading.error ? 'err' : 'res';
      const early = this.receiptsFirst.get(`${agentId}|${reading.key}`);
      this.receiptsFirst.delete(`${agentId}|${reading.key}`);
      const receipt = reading.receipt ?? (kind === 'res' ? early : undefined);
      if (receipt) this.record(agentId, reading.key, kind, receipt, arrived, Date.now());
      else if (kind === 'res') this.answered.set(`${agentId}|${reading.key}`, { before: arrived, after: Date.now() });
    }
    this.settle(`${agentId}|${reading.key}`, reading.error ? reading.error.code : 'ok');
  }

  /** Whether this instance takes an answer to `waitKey` (`${agentId}|${key}`) as one it asked for. */
  private awaited(waitKey: string): boolean {
    return this.waiters.has(waitKey) || (this.restarting === 'closing' && this.abandoned.has(waitKey));
  }

  /** Receipts that came after their answers: each is the value of an answer this payer got (see `record`). */
  private followed(agentId: string, receipts: readonly SignedReceipt[]): void {
    for (const receipt of receipts) {
      const key = requestIdHex(receipt.requestId);
      const answer = this.answered.get(`${agentId}|${key}`);
      if (!answer) {
        // The simulated network can deliver a receipt before its answer (MQTT keeps one sender's order; this
        // network does not): its value is the answer's, when that comes.
        if (this.awaited(`${agentId}|${key}`)) this.receiptsFirst.set(`${agentId}|${key}`, receipt);
        continue;
      }
      this.answered.delete(`${agentId}|${key}`);
      this.record(agentId, key, 'res', receipt, answer.before, answer.after);
    }
  }

  /**
   * The ledger's value of a reply: an ok receipt that is not tampered with, on a result, for a request this
   * payer sent to that agent and is still waiting for (an app that restarted never gets what it asked before), that arrived before the deadline by the clock the payer reads (read just before
   * and just after the payer reads it).
   */
  private record(
    agentId: string,
    key: string,
    kind: 'res' | 'err',
    receipt: SignedReceipt | undefined,
    before: number,
    after: number,
  ): void {
    if (!receipt || kind !== 'res' || receipt.status !== RECEIPT_STATUS.ok || receipt.price <= 0) return;
    if (requestIdHex(receipt.requestId) !== key || this.ledger.senderOf.get(key) !== this.clientId || receipt.payer !== this.address)
      return;
    const agent = this.agents.get(agentId);
    if (!agent || this.ledger.tampered.has(this.ledger.tamperKey(agentId, this.address, receipt.seq))) return;
    const deadline = this.deadlines.get(key);
    if (deadline === undefined) return;
    if (before > deadline) {
      if (agent.behaviour === 'honest') this.ledger.lateHonest++;
      return;
    }
    if (receipt.price !== agent.setup.priceMicros) return;
    // Between the two readings the clock passed the deadline: the payer read one of them, and either verdict
    // is right. Such a reply counts as owed, so that paying it is not counted as overpaying.
    if (after > deadline) this.ledger.ambiguous++;
    const lane = `${this.address}|${agentId}`;
    const v = this.ledger.value.get(lane) ?? { micros: 0, receipts: 0 };
    v.micros += receipt.price;
    v.receipts++;
    this.ledger.value.set(lane, v);
  }

  /** Closes its lanes (vouchers owed are signed and sent first, as `mesh.close()` does) and opens them again from its store. */
  async restart(downMs: number): Promise<void> {
    this.restarts++;
    // The app stops: its requests in flight end, it sends nothing more and takes no more answers; its lanes
    // close while connected (as `mesh.close()` closes payments before the connection), taking the receipts
    // that follow answers already in, so a receipt held behind a lost one can still be asked for again.
    this.restarting = 'closing';
    for (const key of [...this.waiters.keys()]) {
      this.abandoned.add(key);
      this.settle(key, 'down');
    }
    await this.lanes.close();
    this.up = false;
    // The next instance knows nothing of the answers this one got: receipts that come for them later are
    // refused by its lanes, and the ledger does not count them either (the agent's loss, as a network's).
    this.abandoned.clear();
    this.answered.clear();
    this.receiptsFirst.clear();
    this.restarting = 'opening';
    await new Promise((r) => setTimeout(r, downMs));
    // Up for messages while the lanes reopen, but the app sends nothing until they have: a request sent
    // now would be remembered by the closed lanes, and its receipt refused by the new ones.
    this.up = true;
    try {
      await this.open();
    } finally {
      this.restarting = undefined;
    }
  }

  async close(): Promise<void> {
    await this.lanes.close();
    this.up = false;
  }
}

/**
 * A client that tries to use honest payers' lanes without their grant: requests naming the victim's
 * address with no grant and with a grant it signed itself, resyncs and vouchers for the victim's lane.
 */
export class SimImpersonator implements Endpoint {
  up = true;
  readonly clientId = 'app-impersonator';
  readonly outcomes: Record<string, number> = {};
  private readonly key: ethers.Wallet;
  private readonly waiters = new Map<string, (o: Outcome) => void>();

  constructor(
    private readonly net: Network,
    private readonly ledger: Ledger,
    private readonly domain: EscrowDomain,
    wallet: ethers.Wallet,
  ) {
    this.key = wallet;
  }

  /** Tries `victim`'s lane at `agent` three ways; resolves when the answers are in (or lost). */
  async attack(victim: SimPayer, agent: SimAgent): Promise<void> {
    const forged = await signLaneGrant(this.key, this.domain, { agent: agent.setup.payout, client: this.clientId, issuedAt: Date.now() });
    const grant = {
      payer: victim.address,
      agent: agent.setup.payout,
      client: this.clientId,
      issuedAt: Date.now(),
      sig: Buffer.from(forged.slice(2), 'hex'),
    };
    for (const pay of [{ payer: victim.address }, { payer: victim.address, grant }]) {
      const id = newRequestId();
      const key = requestIdHex(id);
      this.ledger.senderOf.set(key, this.clientId);
      const x: Tensor = { dtype: 'float32', shape: [1, 4], data: new Float32Array(4) };
      const payload = Buffer.from(
        encodeMessage({
          v: PROTOCOL_VERSION,
          kind: 'req',
          id,
          deadline: Date.now() + 2_000,
          model: MODEL,
          inputs: encodeTensorMap({ x }),
          pay,
        }),
      );
      const outcome = await new Promise<Outcome>((resolve) => {
        const timer = setTimeout(() => resolve('deadline'), 2_100);
        this.waiters.set(`${agent.id}|${key}`, (o) => {
          clearTimeout(timer);
          resolve(o);
        });
        this.net.send(
          'request',
          agent,
          () => agent.deliverRequest(this.clientId, payload),
          () => this.waiters.get(`${agent.id}|${key}`)?.('lost'),
        );
      });
      this.waiters.delete(`${agent.id}|${key}`);
      this.outcomes[outcome] = (this.outcomes[outcome] ?? 0) + 1;
    }
    // A resync and a voucher for the victim's lane: the agent answers neither.
    const resync = Buffer.from(encodeMessage({ v: PROTOCOL_VERSION, kind: 'resync', payer: victim.address, afterSeq: 0 }));
    this.net.send('resync', agent, () => agent.deliverVoucher(this.clientId, resync));
    const sig = await signVoucher(this.key, this.domain, {
      agent: agent.setup.payout,
      cumulative: 1_000_000n,
      receiptsRoot: toHex(new Uint8Array(32)),
      feeCumulative: 0n,
    });
    const voucher: VoucherMessage = {
      v: PROTOCOL_VERSION,
      kind: 'voucher',
      payer: victim.address,
      agent: agent.setup.payout,
      cumulative: 1_000_000,
      receiptsRoot: new Uint8Array(32),
      feeCumulative: 0,
      sig: Buffer.from(sig.slice(2), 'hex'),
    };
    const vpayload = Buffer.from(encodeMessage(voucher));
    this.net.send('voucher', agent, () => agent.deliverVoucher(this.clientId, vpayload));
  }

  deliverReply(agentId: string, payload: Buffer): void {
    const reading = readReply(agentId, payload);
    if (!reading || reading.batch) return;
    this.waiters.get(`${agentId}|${reading.key}`)?.(reading.error ? reading.error.code : 'ok');
  }

  dropped(agentId: string, id: Uint8Array): void {
    this.waiters.get(`${agentId}|${requestIdHex(id)}`)?.('lost');
  }
}
