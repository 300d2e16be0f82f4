/**
 * The agent's request path: an inference request is decoded, refused if its id was seen before,
 * checked against the model, admitted on its payer's lane when it pays (or refused
 * MESH_PAYMENT_REQUIRED when it does not and the agent serves only paid work), and queued; when its
 * job finishes (or is refused) the reply goes back to the sender, with where the lane stands when the request
 * paid; a paid answer's receipt follows it (receipt-post.ts), an error's comes with it. Cancels, vouchers and
 * resyncs arrive here too.
 */
import type { MeshLogger } from '@edge-mesh/client';
import {
  decodeMessage,
  decodeTensorMap,
  encodeMessage,
  encodeTensorMap,
  hashTensorMap,
  type InferReply,
  type InferRequest,
  type LaneInfo,
  MeshError,
  PROTOCOL_VERSION,
  RECEIPT_STATUS,
  type ReceiptStatus,
  type Resync,
  requestIdHex,
  type SignedReceipt,
  toMeshError,
  type VoucherMessage,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import type { JobResult } from './executor.ts';
import type { Faults } from './faults.ts';
import { checkInputs } from './models.ts';
import type { AgentPayments, InputHash } from './payments.ts';
import { earlierRoomBytes, ReceiptPost } from './receipt-post.ts';
import type { Job, Scheduler } from './scheduler.ts';
import { largestHolder } from './shares.ts';
import { type AgentCounters, countError } from './types.ts';
import { joinUnits, type UnitSpec, unitsOf } from './units.ts';
import type { LoadedModel } from './worker-protocol.ts';

/** Largest cancel and voucher (or resync) messages read; each is a few hundred bytes. */
const MAX_CANCEL_BYTES = 1024;
const MAX_VOUCHER_BYTES = 4096;

export type Remembered = 'ok' | 'replay' | 'full' | 'given-up';

/**
 * How far ahead a request's deadline may be by default: 10 minutes (the router's largest `deadline_ms`) and a minute
 * more for a sender whose clock runs ahead of the agent's. The agent remembers a request's id until its deadline, so
 * a later one would hold its place in the replay guard for as long.
 */
export const DEFAULT_MAX_DEADLINE_MS = 660_000;

/** One sender's remembered ids, a min-heap by deadline (entries whose id was forgotten stay until they surface). */
class DeadlineHeap {
  readonly deadlines: number[] = [];
  readonly keys: string[] = [];

  get length(): number {
    return this.keys.length;
  }

  push(deadline: number, key: string): void {
    const d = this.deadlines;
    const k = this.keys;
    let i = d.length;
    d.push(deadline);
    k.push(key);
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (d[parent]! <= deadline) break;
      d[i] = d[parent]!;
      k[i] = k[parent]!;
      i = parent;
    }
    d[i] = deadline;
    k[i] = key;
  }

  /** Drops the last entry pushed if it is `key` (a forget right after its remember leaves nothing behind). */
  dropLast(key: string): boolean {
    if (this.keys.at(-1) !== key) return false;
    this.keys.pop();
    this.deadlines.pop();
    return true;
  }

  pop(): void {
    const d = this.deadlines;
    const k = this.keys;
    const lastD = d.pop()!;
    const lastK = k.pop()!;
    const n = d.length;
    if (n === 0) return;
    let i = 0;
    for (;;) {
      const left = 2 * i + 1;
      if (left >= n) break;
      const right = left + 1;
      const child = right < n && d[right]! < d[left]! ? right : left;
      if (d[child]! >= lastD) break;
      d[i] = d[child]!;
      k[i] = k[child]!;
      i = child;
    }
    d[i] = lastD;
    k[i] = lastK;
  }

  /** Keeps only the entries `live` says are still remembered, as a heap again. */
  rebuild(live: (key: string, deadline: number) => boolean): void {
    const entries = this.keys.map((key, i) => [this.deadlines[i]!, key] as const).filter(([d, key]) => live(key, d));
    this.keys.length = 0;
    this.deadlines.length = 0;
    for (const [d, key] of entries) this.push(d, key);
  }
}

/**
 * Request ids seen and not yet expired, each until its deadline, so a replayed (or redelivered)
 * request is refused and never runs twice.
 *
 * Bounded at `limit` ids held (and as many set aside, below), and fair between senders. While there is room every request is remembered. When the
 * guard is full, a sender holding at least two fewer ids than the sender holding the most takes a place from that
 * sender: its id with the earliest deadline is given up. So no sender, nor several acting together, can keep
 * another out: each newcomer takes places from the largest holder until their counts differ by at most one.
 *
 * Giving an id up must not let its request run twice. A given-up id is set aside: no longer counted for its sender,
 * still known as a replay until its deadline, up to `limit` of them (so the guard knows at most twice `limit` ids).
 * Only when that store is full does a given-up id leave a coarser trace: its sender's floor, the latest deadline
 * given up this way. A request from that sender with a deadline at or before its floor could be one of them sent
 * again, and is refused ('given-up'); its later requests are not affected. Only the sender holding the most pays for
 * this, and only once `limit` ids were given up within their deadlines.
 *
 * Each sender's ids are kept in a heap by deadline, so expiring ids (`prune`) and giving one up cost the ids
 * dropped, not a walk over all of them. A full guard prunes before it gives up a place, at most once per
 * PRUNE_WHEN_FULL_MS.
 */
export class ReplayGuard {
  /** While full, the least time between two prunes. */
  static readonly PRUNE_WHEN_FULL_MS = 100;
  private readonly seen = new Map<string, { deadline: number; sender: string }>();
  private readonly bySender = new Map<string, DeadlineHeap>();
  /** Ids remembered per sender. */
  private readonly held = new Map<string, number>();
  /** Ids given up to make room, by id: their deadlines (at most `limit`). */
  private readonly aside = new Map<string, number>();
  private readonly asideHeap = new DeadlineHeap();
  /** Per sender, the latest deadline of an id given up when `limit` ids were set aside already. */
  private readonly floors = new Map<string, number>();
  private lastFullPrune = Number.NEGATIVE_INFINITY;
  /** Ids given up so far to make room for other senders. */
  givenUp = 0;

  constructor(readonly limit: number) {}

  get size(): number {
    return this.seen.size;
  }

  /** Ids `sender` holds now. */
  heldBy(sender: string): number {
    return this.held.get(sender) ?? 0;
  }

  /** Whether `key` is remembered (held or set aside). */
  has(key: string): boolean {
    return this.seen.has(key) || this.aside.has(key);
  }

  /** Ids given up and set aside, still known until their deadlines. */
  get setAside(): number {
    return this.aside.size;
  }

  /**
   * 'replay' when `key` is remembered; 'given-up' when its deadline is at or before the latest of its sender's ids
   * given up to make room (it cannot be told from one of them); 'full' when there is no room and `sender` holds as
   * many as anyone (within one); else 'ok'. A request whose deadline has passed is not remembered: the scheduler
   * refuses it, and any replay of it, anyway.
   */
  remember(key: string, sender: string, deadline: number, nowMs: number): Remembered {
    if (this.seen.has(key) || this.aside.has(key)) return 'replay';
    if (deadline < nowMs) return 'ok';
    if (deadline <= (this.floors.get(sender) ?? Number.NEGATIVE_INFINITY)) return 'given-up';
    if (this.seen.size >= this.limit && !this.makeRoom(sender, nowMs)) return 'full';
    this.seen.set(key, { deadline, sender });
    this.held.set(sender, this.heldBy(sender) + 1);
    let heap = this.bySender.get(sender);
    if (!heap) {
      heap = new DeadlineHeap();
      this.bySender.set(sender, heap);
    }
    heap.push(deadline, key);
    return 'ok';
  }

  /** A request that never ran may come again (the SDK retries it once its voucher is out). */
  forget(key: string): void {
    if (this.aside.delete(key)) {
      if (this.asideHeap.length > 2 * this.aside.size + 64) this.asideHeap.rebuild((k, d) => this.aside.get(k) === d);
      return;
    }
    const entry = this.seen.get(key);
    if (!entry) return;
    this.seen.delete(key);
    const held = this.release(entry.sender);
    const heap = this.bySender.get(entry.sender);
    if (!heap || heap.dropLast(key)) return;
    // Left in the heap until it surfaces; a sender that forgets many out of order has its heap compacted.
    if (heap.length > 2 * held + 64) heap.rebuild((k, d) => this.isLive(k, d, entry.sender));
  }

  /** Drops the ids whose deadline has passed, and the floors that have. */
  prune(nowMs: number): void {
    for (const [sender, heap] of this.bySender) {
      while (heap.length > 0 && heap.deadlines[0]! < nowMs) {
        const key = heap.keys[0]!;
        if (this.isLive(key, heap.deadlines[0]!, sender)) {
          this.seen.delete(key);
          this.release(sender);
        }
        heap.pop();
      }
      if (heap.length === 0) this.bySender.delete(sender);
    }
    const aside = this.asideHeap;
    while (aside.length > 0 && aside.deadlines[0]! < nowMs) {
      if (this.aside.get(aside.keys[0]!) === aside.deadlines[0]) this.aside.delete(aside.keys[0]!);
      aside.pop();
    }
    for (const [sender, floor] of this.floors) if (floor < nowMs) this.floors.delete(sender);
  }

  /** At `limit`: prune (rate-limited), then take a place from the largest holder if `sender` holds two fewer. */
  private makeRoom(sender: string, nowMs: number): boolean {
    if (nowMs - this.lastFullPrune >= ReplayGuard.PRUNE_WHEN_FULL_MS) {
      this.lastFullPrune = nowMs;
      this.prune(nowMs);
      if (this.seen.size < this.limit) return true;
    }
    const largest = largestHolder(this.held, (n) => n);
    const heap = largest && this.bySender.get(largest.key);
    if (!largest || !heap || this.heldBy(sender) + 1 >= largest.size) return false;
    const top = largest.key;
    while (heap.length > 0) {
      const key = heap.keys[0]!;
      const deadline = heap.deadlines[0]!;
      heap.pop();
      if (!this.isLive(key, deadline, top)) continue;
      this.seen.delete(key);
      this.release(top);
      if (this.aside.size < this.limit) {
        this.aside.set(key, deadline);
        this.asideHeap.push(deadline, key);
      } else this.floors.set(top, Math.max(this.floors.get(top) ?? Number.NEGATIVE_INFINITY, deadline));
      this.givenUp++;
      return true;
    }
    return false;
  }

  /**
   * Whether a heap entry of `sender` is still its remembered id. An id is remembered for one sender at a time, but a
   * sender that forgot an id leaves its entry behind, and another sender may then have the same id remembered: the
   * sender is part of the check, or one sender's stale entry would release the other's id.
   */
  private isLive(key: string, deadline: number, sender: string): boolean {
    const entry = this.seen.get(key);
    return entry !== undefined && entry.deadline === deadline && entry.sender === sender;
  }

  private release(sender: string): number {
    const n = this.heldBy(sender) - 1;
    if (n > 0) this.held.set(sender, n);
    else this.held.delete(sender);
    return Math.max(0, n);
  }
}

/**
 * A paid job's receipt status from how it ended: ok; cancelled by its sender before the deadline;
 * timeout for a deadline drop, or a cancel once the deadline has passed (the sender giving up on a late
 * job); failed otherwise.
 */
export function receiptStatus(err: MeshError | undefined, expired: boolean): ReceiptStatus {
  if (!err) return RECEIPT_STATUS.ok;
  if (err.code === 'MESH_CANCELLED' && !expired) return RECEIPT_STATUS.cancelled;
  if (err.code === 'MESH_DEADLINE_EXCEEDED' || err.code === 'MESH_CANCELLED') return RECEIPT_STATUS.timeout;
  return RECEIPT_STATUS.failed;
}

/**
 * Units charged by the quote's rule: the units of work done (docs/settlement.md, "What a request
 * costs"). A one-shot model's single unit is done only when its run returns a result: an ok run is 1
 * unit, and a cancel costs the units done when it arrived, which for a one-shot run is 0 whether it was
 * queued or running (its result is discarded; a cancel that comes after the result finds nothing to
 * cancel). Failures and timeouts cost 0.
 */
export function unitsUsed(status: ReceiptStatus, unitsDone: number): number {
  return status === RECEIPT_STATUS.ok || status === RECEIPT_STATUS.cancelled ? unitsDone : 0;
}

/** The agent's queue as a reply carries it (Scheduler.queueClaim). */
export interface QueueClaim {
  rif: number;
  workMs: number;
}

/** The error reply for request `id` (its message cut to what the schema allows), with the agent's queue when known. */
export function errorReply(
  agentId: string,
  id: Uint8Array,
  err: MeshError,
  receipt?: SignedReceipt,
  lane?: LaneInfo,
  queue?: QueueClaim,
): Buffer {
  return encodeMessage({
    v: PROTOCOL_VERSION,
    kind: 'err',
    id,
    agent: agentId,
    code: err.code,
    message: err.message.slice(0, 2048),
    ...(queue ? { rif: queue.rif, workMs: queue.workMs } : {}),
    ...(receipt ? { receipt } : {}),
    ...(lane ? { lane } : {}),
  });
}

export interface RequestsOptions {
  agentId: string;
  maxMessageBytes: number;
  maxElements: number;
  /** Models as the workers loaded them, by name. */
  models: ReadonlyMap<string, LoadedModel>;
  /** Which loaded slot serves (model, version) during a rollout (deploy.ts); absent: the model's name is its slot. */
  resolve?: (model: string, version: string | undefined) => { key: string; version?: string } | undefined;
  /** Models that run in units (manifest `units`), by name. */
  units?: ReadonlyMap<string, UnitSpec>;
  replays: ReplayGuard;
  /** How far ahead of now a request's deadline may be; a later one is refused before its id is remembered. */
  maxDeadlineMs?: number;
  /** Present when the agent takes payment. */
  payments: AgentPayments | undefined;
  counters: AgentCounters;
  faults: Faults;
  logger: MeshLogger;
  /** Publishes a reply to `senderId`, `afterMs` from now (connection.ts adds the link delay). */
  reply: (senderId: string, payload: Buffer, afterMs?: number) => void;
  /** True once the agent is closing: held (delayed) requests are dropped. */
  closed: () => boolean;
  /** Sees every served request's queue and compute time (metrics.ts, when the metrics port is on). */
  onServed?: (model: string, queueMs: number, execMs: number) => void;
}

type Queue = Pick<Scheduler, 'submit' | 'cancel' | 'queueClaim'> & Partial<Pick<Scheduler, 'holds'>>;

/** A reply kept for redelivery and, for a paid answer, the receipt that followed it (receipt-post.ts). */
interface KeptReply {
  senderId: string;
  bytes: Buffer;
  receipt?: { payer: string; receipt: SignedReceipt };
  /** Its place in the orders of kept replies, with its deadline. */
  slot: KeptSlot;
}

/** A kept reply's place in an order: its key and deadline, not its bytes (a dropped reply's slot may linger there). */
interface KeptSlot {
  key: string;
  expiresAt: number;
}

/** Replies kept for redelivery: at most this many, and this many bytes in all (the oldest go first). */
export const KEPT_REPLIES = 1_024;
const KEPT_REPLY_BYTES = 16 * 1024 * 1024;

/**
 * Kept replies oldest first, with those dropped since still in place until they reach the front (`live` tells):
 * taking the oldest is then O(1), where finding it by iterating the map from its start skipped every entry deleted
 * since the map last compacted (up to about a thousand, on every request under a steady stream). It holds slots, not
 * replies: a dropped reply's bytes are not kept alive here.
 */
class KeptOrder {
  private items: KeptSlot[] = [];
  private head = 0;

  constructor(private readonly live: (slot: KeptSlot) => boolean) {}

  push(slot: KeptSlot): void {
    this.items.push(slot);
  }

  /** The oldest reply still kept, left in place. */
  oldest(): KeptSlot | undefined {
    while (this.head < this.items.length && !this.live(this.items[this.head]!)) this.head++;
    if (this.head > 64 && this.head * 2 > this.items.length) {
      this.items = this.items.slice(this.head);
      this.head = 0;
    }
    return this.items[this.head];
  }

  /**
   * Drops the replies no longer kept once they outnumber those kept (`kept` of them): memory stays O(kept). Called on
   * every push and every drop (whichever way a reply goes), so that holds for an order that takes no push for long.
   */
  tidy(kept: number): void {
    if (this.items.length - this.head > 2 * kept + 64) {
      this.items = this.items.slice(this.head).filter(this.live);
      this.head = 0;
    }
  }
}

/**
 * The replies sent lately, by request id, until their request's deadline: a sender whose connection dropped with the
 * reply in flight sends the same request again (same id), and gets the same reply back (the same receipt, so nothing is
 * billed twice and nothing runs twice). Only to the sender the reply was for.
 *
 * Bounded in count and bytes, and shared between senders: past a bound, expired replies go first, then the oldest
 * reply of the sender holding the most (by count past the count bound, by bytes past the byte bound). So one sender's
 * stream of cheap requests (sent and cancelled at once, say) cannot push out every other sender's kept replies.
 */
export class SentReplies {
  private readonly byKey = new Map<string, KeptReply>();
  private bytes = 0;
  private readonly isKept = (slot: KeptSlot): boolean => this.byKey.get(slot.key)?.slot === slot;
  /** Every kept reply, oldest first. */
  private readonly order = new KeptOrder(this.isKept);
  /** Per sender: replies kept, their bytes, and the sender's replies oldest first. */
  private readonly bySender = new Map<string, { count: number; bytes: number; order: KeptOrder }>();

  keep(key: string, senderId: string, bytes: Buffer, expiresAt: number): void {
    if (bytes.byteLength > KEPT_REPLY_BYTES / 4) return;
    this.drop(key);
    const slot: KeptSlot = { key, expiresAt };
    this.byKey.set(key, { senderId, bytes, slot });
    this.bytes += bytes.byteLength;
    let own = this.bySender.get(senderId);
    if (!own) {
      own = { count: 0, bytes: 0, order: new KeptOrder(this.isKept) };
      this.bySender.set(senderId, own);
    }
    own.count++;
    own.bytes += bytes.byteLength;
    own.order.push(slot);
    own.order.tidy(own.count);
    this.order.push(slot);
    this.order.tidy(this.byKey.size);
    if (this.byKey.size <= KEPT_REPLIES && this.bytes <= KEPT_REPLY_BYTES) return;
    const now = Date.now();
    for (let oldest = this.order.oldest(); oldest && oldest.expiresAt <= now; oldest = this.order.oldest()) this.drop(oldest.key);
    while (this.byKey.size > KEPT_REPLIES || this.bytes > KEPT_REPLY_BYTES) {
      const by = this.byKey.size > KEPT_REPLIES ? 'count' : 'bytes';
      const top = largestHolder(this.bySender, (held) => held[by]);
      const oldest = top && this.bySender.get(top.key)?.order.oldest();
      if (!oldest) break;
      this.drop(oldest.key);
    }
  }

  /** The receipt that followed the reply to `key`, if it is still kept. */
  follow(key: string, payer: string, receipt: SignedReceipt): void {
    const kept = this.byKey.get(key);
    if (kept) kept.receipt = { payer, receipt };
  }

  /** The reply to `key` if it went to `senderId` and its deadline has not passed. */
  get(key: string, senderId: string): KeptReply | undefined {
    const kept = this.byKey.get(key);
    if (!kept || kept.senderId !== senderId) return undefined;
    if (kept.slot.expiresAt <= Date.now()) {
      this.drop(key);
      return undefined;
    }
    return kept;
  }

  private drop(key: string): void {
    const kept = this.byKey.get(key);
    if (!kept) return;
    this.bytes -= kept.bytes.byteLength;
    this.byKey.delete(key);
    const held = this.bySender.get(kept.senderId)!;
    held.count--;
    held.bytes -= kept.bytes.byteLength;
    if (held.count === 0) this.bySender.delete(kept.senderId);
    else held.order.tidy(held.count);
    this.order.tidy(this.byKey.size);
  }
}

export class AgentRequests {
  private scheduler: Queue | undefined;
  private readonly sent = new SentReplies();
  /** Receipts that follow their answers (paid agents only). */
  private readonly post: ReceiptPost | undefined;

  constructor(private readonly options: RequestsOptions) {
    const { agentId, payments, logger } = options;
    if (payments)
      this.post = new ReceiptPost({
        agentId,
        payments,
        logger,
        // Delayed as answers are (a test's fault: extraExecMs), so that no receipt overtakes its answer.
        reply: (senderId, payload) => options.reply(senderId, payload, options.faults.extraExecMs),
        sent: (key, payer, receipt) => this.sent.follow(key, payer, receipt),
      });
  }

  /** The queue requests go to; it calls `finished` for each job it takes. */
  attach(scheduler: Queue): void {
    this.scheduler = scheduler;
  }

  /** An inference request from `senderId` (already authenticated by the broker's topic ACL). */
  readonly onRequest = (senderId: string, payload: Buffer): void => {
    const { faults, closed } = this.options;
    if (faults.linkDelayMs > 0) {
      setTimeout(() => {
        if (!closed()) this.handleRequest(senderId, payload);
      }, faults.linkDelayMs).unref();
      return;
    }
    this.handleRequest(senderId, payload);
  };

  readonly onCancel = (senderId: string, payload: Buffer): void => {
    try {
      const cancel = decodeMessage(payload, ['cancel'], MAX_CANCEL_BYTES);
      this.queue().cancel(requestIdHex(cancel.id), senderId);
    } catch (err) {
      this.options.logger.debug({ senderId, err: (err as Error).message }, 'bad cancel dropped');
    }
  };

  /** A voucher, or a resync, on the agent's voucher topic from `senderId`. */
  readonly onVoucher = (senderId: string, payload: Buffer): void => {
    const { payments, logger, agentId } = this.options;
    if (!payments) return;
    let message: VoucherMessage | Resync;
    try {
      message = decodeMessage(payload, ['voucher', 'resync'], MAX_VOUCHER_BYTES);
    } catch (err) {
      logger.debug({ senderId, err: (err as Error).message }, 'bad voucher dropped');
      return;
    }
    if (message.kind === 'voucher') {
      void payments
        .acceptVoucher(senderId, message)
        .catch((err: unknown) => logger.error({ err: (err as Error).message }, 'voucher not stored'));
      return;
    }
    // The payer misses receipts: those of its lane still waiting to be issued or to linger go now, not at the end of
    // receiptIssueMs or the linger (the journal gives only receipts whose answers left, and those are sent).
    void payments
      .resync(senderId, message, agentId, (payer) => this.post?.hurry(payer))
      .then(
        (batches) => {
          for (const batch of batches ?? []) this.options.reply(senderId, encodeMessage(batch));
        },
        (err: unknown) => logger.error({ err: (err as Error).message }, 'resync not answered'),
      );
  };

  /**
   * The scheduler's callback after each unit of a job that runs in units: on a paid request, every
   * `progressEvery` units, a progress message with the outputs of the units since the last one and a
   * `partial` receipt for them (docs/settlement.md, "Progress receipts"). Unpaid jobs send no progress.
   */
  readonly progressed = (job: Job): void => {
    const u = job.units;
    if (!u || !job.paid || u.done - u.reported < u.every) return;
    this.sendProgress(job, u.done);
  };

  /** Sends the outputs of units [reported, upTo) with the partial receipt for `upTo` units. */
  private sendProgress(job: Job, upTo: number): void {
    const { agentId, payments, logger } = this.options;
    const u = job.units!;
    const paid = job.paid;
    if (!payments || !paid || upTo <= u.reported) return;
    const outputs = encodeTensorMap(joinUnits(u.parts.slice(u.reported, upTo)));
    u.reported = upTo;
    const nowPerf = performance.now();
    const issueOwn = () =>
      payments.issue(paid, {
        requestId: job.id,
        status: RECEIPT_STATUS.partial,
        unitsUsed: upTo,
        outputHash: hashTensorMap(outputs),
        startedAt: Date.now() - (nowPerf - (job.startedAt ?? job.receivedAt)),
        finishedAt: Date.now(),
      });
    const send = (receipt: SignedReceipt, withReceipt: boolean) => {
      this.options.reply(
        job.senderId,
        encodeMessage({
          v: PROTOCOL_VERSION,
          kind: 'progress',
          id: job.id,
          agent: agentId,
          units: upTo,
          outputs,
          ...(withReceipt ? { receipt } : {}),
          lane: payments.laneInfo(paid.payer, job.senderId),
        }),
      );
      payments.replied(paid.payer, receipt);
    };
    // Receipts that follow answers take their seqs first, and leave first; those after it, after it.
    this.post!.sendInOrder(paid.payer, issueOwn, (receipt, journaled, writeErr) => {
      if (!journaled) logger.error({ err: (writeErr as Error).message }, 'progress receipt not journaled; sending progress without it');
      send(receipt, journaled);
    });
  }

  /** The scheduler's callback: a job ran (or was dropped); reply with its outputs or its error. */
  readonly finished = (job: Job, err: MeshError | undefined, result?: JobResult): void => {
    const { agentId, counters, faults, logger } = this.options;
    // A cancelled job that runs in units is paid for the units done when the cancel arrived: their outputs
    // go out first, as progress, if they have not yet.
    if (job.units?.atCancel !== undefined && err?.code === 'MESH_CANCELLED') this.sendProgress(job, job.units.atCancel);
    if (err) {
      if (err.code === 'MESH_INFERENCE_FAILED') logger.warn({ model: job.model, err: err.message }, 'inference failed');
      this.withReceipt(job, err, undefined, (receipt, lane) => this.replyError(job.senderId, job.id, err, receipt, lane, job));
      return;
    }
    const queueMs = job.startedAt! - job.receivedAt;
    this.options.onServed?.(job.model, queueMs, result!.execMs + faults.extraExecMs);
    const outputs = encodeTensorMap(result!.outputs);
    const { payments } = this.options;
    const paid = payments ? job.paid : undefined;
    const answer = (lane?: LaneInfo, earlier?: SignedReceipt[]) => {
      // The queue as it stands when the reply leaves.
      const { rif, workMs } = faults.claimed(this.queue().queueClaim(faults.reportedExtraMs));
      return encodeMessage({
        v: PROTOCOL_VERSION,
        kind: 'res',
        id: job.id,
        agent: agentId,
        model: job.served?.name ?? job.model,
        ...(job.served?.version !== undefined ? { version: job.served.version } : {}),
        outputs,
        queueMs: Math.max(0, queueMs),
        execMs: faults.reportedExecMs(result!.execMs),
        rif,
        workMs,
        ...(lane ? { lane } : {}),
        ...(earlier ? { earlier } : {}),
      });
    };
    // Near the cap (no room left for earlier receipts: earlierRoomBytes) the reply is encoded now, as it leaves (its
    // lane, its timings), and measured before anything is billed; further from it, it fits with room to spare.
    const room = earlierRoomBytes(this.options.maxMessageBytes, outputs);
    const near = room < 0 ? answer(paid ? payments!.laneInfo(paid.payer, job.senderId) : undefined) : undefined;
    if (near && near.byteLength > this.options.maxMessageBytes) {
      // A reply the client cannot read would only time out there: a coded error now, and nothing billed (failed).
      logger.warn(
        { model: job.model, bytes: near.byteLength, maxMessageBytes: this.options.maxMessageBytes },
        'outputs over the message cap',
      );
      const over = new MeshError(
        'MESH_TOO_LARGE',
        `the outputs of ${job.model} need a reply of ${near.byteLength} bytes, over this agent's message cap of ${this.options.maxMessageBytes}`,
      );
      this.withReceipt(job, over, undefined, (receipt, lane) => this.replyError(job.senderId, job.id, over, receipt, lane, job));
      return;
    }
    counters.served++;
    const reply = (bytes: Buffer) => {
      this.sent.keep(job.key, job.senderId, bytes, job.deadline);
      this.options.reply(job.senderId, bytes, faults.extraExecMs);
    };
    if (!paid || !payments) {
      reply(near ?? answer());
      return;
    }
    // A paid answer leaves now, with the receipts of earlier answers to its client that are ready; its own follows
    // it, signed and journaled off the answer's path (receipt-post.ts).
    const post = this.post!;
    const earlier = near ? undefined : post.take(paid.payer, job.senderId, room);
    reply(near ?? answer(payments.laneInfo(paid.payer, job.senderId), earlier));
    post.defer(job, outputs);
  };

  /** Whether receipts of answers sent wait to be issued or sent (receipt-post.ts). */
  get receiptsWaiting(): boolean {
    return this.post?.pending ?? false;
  }

  /** Issues and sends every receipt that follows an answer now (on close). */
  flushReceipts(): Promise<void> {
    return this.post?.pending ? this.post.flush() : Promise.resolve();
  }

  private queue(): Queue {
    if (!this.scheduler) throw new MeshError('MESH_INTERNAL', 'requests arrived before the agent attached its scheduler');
    return this.scheduler;
  }

  private countError(code: string): void {
    countError(this.options.counters, code);
  }

  /** An error reply; with `job`, one that answers that job, kept for redelivery like a result. */
  private replyError(senderId: string, id: Uint8Array, err: MeshError, receipt?: SignedReceipt, lane?: LaneInfo, job?: Job): void {
    this.countError(err.code);
    const { faults } = this.options;
    const queue = this.scheduler ? faults.claimed(this.scheduler.queueClaim(faults.reportedExtraMs)) : undefined;
    const bytes = errorReply(this.options.agentId, id, err, receipt, lane, queue);
    if (job) this.sent.keep(job.key, senderId, bytes, job.deadline);
    this.options.reply(senderId, bytes);
  }

  private handleRequest(senderId: string, payload: Buffer): void {
    const { agentId, maxMessageBytes, maxElements, models, replays, payments, counters, logger } = this.options;
    counters.received++;
    const receivedAt = performance.now();
    let request: InferRequest;
    try {
      request = decodeMessage(payload, ['req'], maxMessageBytes);
    } catch (err) {
      const meshErr = toMeshError(err, 'MESH_BAD_REQUEST');
      const id = meshErr.details?.id;
      if (id instanceof Uint8Array) this.replyError(senderId, id, meshErr);
      else {
        this.countError(meshErr.code);
        logger.debug({ senderId, err: meshErr.message }, 'unreadable request dropped');
      }
      return;
    }
    const key = requestIdHex(request.id);
    const now = Date.now();
    const { maxDeadlineMs = DEFAULT_MAX_DEADLINE_MS } = this.options;
    // A request sent again keeps its deadline, which a clock stepped back may now put too far ahead: the replay check
    // answers it as before.
    if (request.deadline - now > maxDeadlineMs && !replays.has(key)) {
      this.replyError(
        senderId,
        request.id,
        new MeshError('MESH_BAD_REQUEST', `deadline ${request.deadline - now} ms ahead; this agent takes at most ${maxDeadlineMs} ms`),
      );
      return;
    }
    const remembered = replays.remember(key, senderId, request.deadline, now);
    if (remembered === 'replay' || remembered === 'given-up') {
      // Its sender lost the connection before the reply came back and sent it again: the same reply again, or, while it
      // still runs, the reply when it is done. Nothing runs or is billed twice.
      const kept = this.sent.get(key, senderId);
      if (kept) {
        counters.replays++;
        logger.debug({ senderId, requestId: key }, 'request sent again: its reply redelivered');
        this.options.reply(senderId, kept.bytes);
        // The receipt that followed a paid answer goes again too (the payer's lane takes it once).
        if (kept.receipt && payments)
          for (const batch of payments.receiptBatches(kept.receipt.payer, [kept.receipt.receipt], agentId))
            this.options.reply(senderId, encodeMessage(batch));
        return;
      }
      if (this.scheduler?.holds?.(key)) {
        counters.replays++;
        logger.debug({ senderId, requestId: key }, 'request sent again while it runs');
        return;
      }
      if (remembered === 'given-up') {
        // Its sender held the most of the guard, and ids of its with deadlines up to this one's were given up to make
        // room for others: this may be one of them again. A later deadline is taken.
        this.replyError(
          senderId,
          request.id,
          new MeshError('MESH_BUSY', `${agentId} gave up older request ids of yours to make room; send with a later deadline`),
        );
        return;
      }
      counters.replays++;
      logger.debug({ senderId, requestId: key }, 'replayed request id refused');
      this.replyError(senderId, request.id, new MeshError('MESH_BAD_REQUEST', `replayed request id ${key}`));
      return;
    }
    if (remembered === 'full') {
      this.replyError(
        senderId,
        request.id,
        new MeshError(
          'MESH_BUSY',
          `${agentId} remembers ${replays.limit} unexpired request ids, ${replays.heldBy(senderId)} of them yours, as many as any sender's; try again later`,
        ),
      );
      return;
    }
    let inputs: Job['inputs'];
    let units: number | undefined;
    let slot: { key: string; version?: string } | undefined;
    const unitSpec = this.options.units?.get(request.model);
    try {
      slot = this.options.resolve?.(request.model, request.version);
      const model = models.get(slot?.key ?? request.model);
      if (!model) throw new MeshError('MESH_UNKNOWN_MODEL', `model ${request.model} is not served by ${agentId}`);
      // The request's byte strings are its own copies (decodeMessage): the job takes them over, and
      // request.inputs is read no more once the job is queued (a worker may take the buffers).
      inputs = decodeTensorMap(request.inputs, maxElements, { adopt: true });
      if (unitSpec) units = unitsOf(model, unitSpec, inputs);
      else checkInputs(model, inputs);
      if (payments && !request.pay && !payments.serveUnpaid) {
        throw new MeshError(
          'MESH_PAYMENT_REQUIRED',
          `${agentId} serves only paid requests: name a payer lane (pay.payer, with its grant) or ask another agent`,
        );
      }
    } catch (err) {
      const refusal = toMeshError(err, 'MESH_BAD_REQUEST');
      // Never taken on: the same request may come again (paid, or to this agent once it serves unpaid work).
      if (refusal.code === 'MESH_PAYMENT_REQUIRED') replays.forget(key);
      this.replyError(senderId, request.id, refusal);
      return;
    }
    if (this.options.faults.failRequests) {
      // An injected fault (tests and benchmarks): a broken runtime that fails every request at once. Nothing ran, nothing is owed.
      this.replyError(senderId, request.id, new MeshError('MESH_INFERENCE_FAILED', `${agentId}: injected fault, every request fails`));
      return;
    }
    const job: Job = {
      key,
      id: request.id,
      senderId,
      model: slot?.key ?? request.model,
      ...(slot ? { served: { name: request.model, ...(slot.version !== undefined ? { version: slot.version } : {}) } } : {}),
      inputs,
      deadline: request.deadline,
      receivedAt,
      ...(unitSpec && units !== undefined
        ? { units: { total: units, every: unitSpec.progressEvery, done: 0, reported: 0, parts: [], execMs: 0 } }
        : {}),
    };
    if (!payments || !request.pay) {
      this.submit(job);
      return;
    }
    const pay = request.pay;
    // Hashed when first needed (the receipt, after the answer left; before a worker takes the buffers: scheduler.ts).
    const encoded = request.inputs;
    const inputHash = () => hashTensorMap(encoded);
    const paid = payments.admitNow(pay.payer, job.senderId, request.model, inputHash, pay.grant, job.units?.total, pay.voucher);
    if (paid) this.queuePaid(job, paid, payments);
    else void this.admitPaid(job, request, inputHash, payments);
  }

  /** Queues a job; a refusal by the queue (busy, draining, deadline past) is answered at once. */
  private submit(job: Job): void {
    try {
      this.queue().submit(job);
    } catch (err) {
      this.replyError(job.senderId, job.id, toMeshError(err, 'MESH_BAD_REQUEST'));
    }
  }

  /**
   * A paying request that `admitNow` could not take at once: a piggybacked voucher is taken first (it may
   * reopen the window), then the lane's grant and credit are checked (the escrow's view of the lane may have
   * to be read on first use), then the job is queued. Refused before it is taken on: no receipt, nothing owed.
   */
  private async admitPaid(job: Job, request: InferRequest, inputHash: InputHash, payments: AgentPayments): Promise<void> {
    const { replays, closed } = this.options;
    const pay = request.pay!;
    let paid: Job['paid'];
    try {
      // A voucher riding on the request pays for work done before it: its signature is checked on a worker
      // (recover.ts) while this request is admitted against the credit it has without it; admit waits for it
      // only when the window has no room (AgentPayments.admit).
      paid = await payments.admit(pay.payer, job.senderId, request.model, inputHash, pay.grant, job.units?.total, pay.voucher);
    } catch (err) {
      const refusal = toMeshError(err, 'MESH_INTERNAL');
      // It never ran, so the same request may come again: the SDK retries it once its voucher is out.
      if (['MESH_CREDIT_EXCEEDED', 'MESH_CHAIN_UNREACHABLE', 'MESH_RATE_LIMITED', 'MESH_BUSY'].includes(refusal.code))
        replays.forget(job.key);
      this.replyError(job.senderId, job.id, refusal, undefined, payments.laneInfo(pay.payer, job.senderId));
      return;
    }
    if (closed()) {
      payments.release(paid);
      return;
    }
    this.queuePaid(job, paid, payments);
  }

  /** Queues an admitted paid job; a refusal by the queue gives its reservation back and is answered at once. */
  private queuePaid(job: Job, paid: NonNullable<Job['paid']>, payments: AgentPayments): void {
    job.paid = paid;
    try {
      this.queue().submit(job);
    } catch (err) {
      payments.release(paid);
      this.replyError(job.senderId, job.id, toMeshError(err, 'MESH_BAD_REQUEST'), undefined, payments.laneInfo(paid.payer, job.senderId));
      return;
    }
    // A request that fills the lane's window: the receipts its client needs to pay for room go now (receipt-post.ts).
    this.post?.admitted(paid.payer);
  }

  /**
   * A paid job's receipt, signed by the quote's rule (see receiptStatus, unitsUsed), for a job that did not
   * answer (an answer's receipt follows it: receipt-post.ts). The reply leaves once the receipt is journaled;
   * an unpaid job's reply leaves at once, without one.
   */
  private withReceipt(
    job: Job,
    err: MeshError | undefined,
    outputs: InferReply['outputs'] | undefined,
    send: (receipt: SignedReceipt | undefined, lane?: LaneInfo) => void,
  ): void {
    const { payments, logger } = this.options;
    if (!job.paid || !payments) {
      send(undefined);
      return;
    }
    const paid = job.paid;
    const status = receiptStatus(err, job.deadline <= Date.now());
    // One-shot models: the one unit is done when the run returns its outputs, and not before. A job that
    // runs in units: all of them when it returns, and when cancelled those done when the cancel arrived.
    const unitsDone = job.units ? (outputs ? job.units.total : (job.units.atCancel ?? 0)) : outputs ? 1 : 0;
    const nowPerf = performance.now();
    const epochOf = (perf: number) => Date.now() - (nowPerf - perf);
    const issueOwn = () =>
      payments.issue(paid, {
        requestId: job.id,
        status,
        unitsUsed: unitsUsed(status, unitsDone),
        outputHash: outputs ? hashTensorMap(outputs) : ZERO_HASH,
        startedAt: epochOf(job.startedAt ?? job.receivedAt),
        finishedAt: Date.now(),
      });
    // Receipts that follow answers take their seqs first, and leave first; those after it, after it.
    this.post!.sendInOrder(paid.payer, issueOwn, (receipt, journaled, writeErr) => {
      if (!journaled) logger.error({ err: (writeErr as Error).message }, 'receipt not journaled; replying without it');
      send(journaled ? receipt : undefined, payments.laneInfo(paid.payer, job.senderId));
      payments.replied(paid.payer, receipt);
    });
  }
}
