/**
 * Receipts that follow their answers. A paid answer leaves as soon as its job is done; its receipt is signed and
 * journaled off the answer's path, with the receipts of the other answers of the next few milliseconds
 * (AgentPaymentOptions.receiptIssueMs, 5 ms by default; at once, in the next event-loop turn, when the lane's window
 * has no room or ISSUE_BATCH answers wait), and then rides on the next answer to
 * the same client (the reply's `earlier` field), or leaves on its own, in one `receipts` message per lane, when no
 * answer has carried it within the lane's linger (AgentPaymentOptions.receiptLingerMs, 20 ms by default), or at once when
 * the lane's credit window has no room left (its client waits for room that only a voucher for these receipts makes). So a stream of requests costs no message of its own for its receipts.
 *
 * What this costs the agent: an answer that left before its receipt was journaled is not paid if the agent dies in
 * between (at most the answers of the last `receiptIssueMs`, and their receipts never existed: nothing is billed
 * twice). Why the wait: issued one turn after each answer, a receipt's signature and journal write land on the agent's
 * core while the next request is on its way, on every request; issued together every few milliseconds they cost less
 * (one write) and meet fewer requests (docs/agent.md, "Receipts issued together"). What it
 * costs the payer: nothing; it pays a receipt only once it has the answer the receipt names (docs/settlement.md).
 */
import type { MeshLogger } from '@edge-mesh/client';
import {
  encodeMessage,
  hashTensorMap,
  type InferReply,
  MAX_SIGNED_RECEIPT_BYTES,
  RECEIPT_STATUS,
  type SignedReceipt,
} from '@edge-mesh/protocol';
import type { AgentPayments } from './payments.ts';
import type { Job } from './scheduler.ts';

/** Receipts one answer carries at most (the schema's `earlier`). */
const MAX_EARLIER = 256;

/** Answers whose receipts wait to be issued, at most: then they are issued in the next turn, not at the timer. */
export const ISSUE_BATCH = 64;

/** Flush rounds at most: jobs keep finishing while a flush waits for the journal, but not for ever. */
const MAX_FLUSH_ROUNDS = 8;

/** Bytes of a reply besides its outputs' data and its `earlier` receipts (ids, names, timings, lane), bounded generously. */
const REPLY_FIELDS_BYTES = 1_024;

/**
 * The bytes left for `earlier` receipts in a reply carrying `outputs`, under the receiver's size cap
 * `maxMessageBytes`: a reply near the cap carries fewer receipts, or none, rather than one the client would refuse.
 */
export function earlierRoomBytes(maxMessageBytes: number, outputs: InferReply['outputs']): number {
  let used = REPLY_FIELDS_BYTES;
  for (const [name, t] of Object.entries(outputs)) used += t.data.byteLength + name.length + t.dtype.length + 9 * t.shape.length + 32;
  return maxMessageBytes - used;
}

interface Answered {
  job: Job;
  outputs: InferReply['outputs'];
  startedAt: number;
  finishedAt: number;
}

interface Ready {
  payer: string;
  senderId: string;
  receipts: SignedReceipt[];
  keys: string[];
}

export interface ReceiptPostOptions {
  agentId: string;
  payments: AgentPayments;
  logger: MeshLogger;
  /** Publishes a message to `senderId`'s reply topic. */
  reply: (senderId: string, payload: Buffer) => void;
  /** The receipt of the answer to request `key` was sent (kept with that answer for redelivery). */
  sent: (key: string, payer: string, receipt: SignedReceipt) => void;
}

export class ReceiptPost {
  /** Paid jobs answered, receipts not issued yet. */
  private answered: Answered[] = [];
  /** The next issue: in the next turn, or at the end of `receiptIssueMs`. */
  private issueNow: NodeJS.Immediate | undefined;
  private issueTimer: NodeJS.Timeout | undefined;
  /** Receipts signed and being journaled: how many, and when the last of them is ready (or dropped). */
  private journaling = 0;
  private journaled: Promise<void> = Promise.resolve();
  /** Receipts issued and journaled, not sent yet, per client and lane (`payer senderId`). */
  private readonly ready = new Map<string, Ready>();
  private linger: NodeJS.Timeout | undefined;
  /**
   * Lanes hurried (`hurry`) whose answers wait to be issued: their receipts go once journaled, not at the linger. The
   * next issue takes them all (it takes every waiting answer), so this names only lanes with answers in `answered`.
   */
  private hurried = new Set<string>();
  /**
   * Per lane (payer), the seqs of receipts of another kind (`sendInOrder`) whose messages have not gone yet: the
   * lane's receipts after the first of them wait here until it has, so that none reaches the client ahead of it.
   */
  private readonly behind = new Map<string, number[]>();

  constructor(private readonly options: ReceiptPostOptions) {}

  /** Whether receipts wait here (to be issued, or to be sent). */
  get pending(): boolean {
    return this.answered.length > 0 || this.journaling > 0 || this.ready.size > 0;
  }

  /**
   * Paid job `job` was answered with `outputs`, now: its `ok` receipt is issued with those of the answers of the next
   * `receiptIssueMs`, or in the next turn when that is 0, when ISSUE_BATCH answers wait, or when its lane's window has
   * no room for another request (its client then waits for room, which only a voucher for these receipts makes).
   */
  defer(job: Job, outputs: InferReply['outputs']): void {
    const finishedAt = Date.now();
    const startedAt = finishedAt - (performance.now() - (job.startedAt ?? job.receivedAt));
    this.answered.push({ job, outputs, startedAt, finishedAt });
    if (this.issueNow) return;
    const { payments } = this.options;
    if (payments.receiptIssueMs === 0 || this.answered.length >= ISSUE_BATCH || payments.paymentDue(job.paid!.payer)) this.issueNextTurn();
    else this.issueTimer ??= setTimeout(() => void this.issue(), payments.receiptIssueMs).unref();
  }

  /**
   * A request was just admitted on `payer`'s lane: when that left its window no room for another request, the lane's
   * receipts go now, those waiting to be issued (next turn) and those ready (at once). Its client may be waiting for
   * room, which only a voucher for these receipts makes, while the request runs.
   */
  admitted(payer: string): void {
    if (this.options.payments.paymentDue(payer)) this.hurry(payer);
  }

  /**
   * `payer`'s lane's receipts go now: those ready at once, those waiting to be issued in the next turn, sent once
   * journaled (not at the linger). For a lane whose client waits for room, or asks for the receipts it misses (a
   * resync). Receipts being journaled at this moment go at the linger or on the next answer, as usual.
   */
  hurry(payer: string): void {
    if (this.answered.some((a) => a.job.paid!.payer === payer)) {
      this.hurried.add(payer);
      this.issueNextTurn();
    }
    this.sendWhere((ready) => ready.payer === payer);
  }

  /** Issues what waits in the next turn (the timer's wait, if any, is cut short there). */
  private issueNextTurn(): void {
    this.issueNow ??= setImmediate(() => void this.issue());
  }

  /**
   * The receipts ready for `senderId` on `payer`'s lane, taken to ride on an answer about to leave (undefined when
   * there are none, or no room): at most `roomBytes` of them (MAX_SIGNED_RECEIPT_BYTES each). They count as sent.
   */
  take(payer: string, senderId: string, roomBytes = Number.POSITIVE_INFINITY): SignedReceipt[] | undefined {
    const key = `${payer} ${senderId}`;
    const ready = this.ready.get(key);
    if (!ready) return undefined;
    // At most what one reply may carry, and what fits beside its outputs under the receiver's size cap; the rest
    // wait for the next answer, or the linger.
    const most = Math.min(MAX_EARLIER, Math.floor(roomBytes / MAX_SIGNED_RECEIPT_BYTES), this.sendable(ready));
    if (!(most > 0)) return undefined;
    const taken: Ready = { payer, senderId, receipts: ready.receipts.splice(0, most), keys: ready.keys.splice(0, most) };
    if (ready.receipts.length === 0) this.ready.delete(key);
    this.delivered(taken);
    return taken.receipts;
  }

  /**
   * Issues what waits and sends every ready receipt now, those still being journaled once they are; resolves once
   * they are handed to the connection.
   */
  async flush(): Promise<void> {
    // Jobs answered while the journal is written (on close, the last jobs finishing) are flushed too: until none waits.
    for (let round = 0; round < MAX_FLUSH_ROUNDS; round++) {
      await this.issue();
      await this.journaled;
      clearTimeout(this.linger);
      this.linger = undefined;
      this.sendReady();
      if (!this.pending) return;
    }
  }

  /** Signs and journals the receipts of the jobs answered so far; once journaled they are ready to go. */
  private issue(): Promise<void> {
    clearImmediate(this.issueNow);
    clearTimeout(this.issueTimer);
    this.issueNow = undefined;
    this.issueTimer = undefined;
    const answered = this.answered;
    this.answered = [];
    // The lanes hurried for these answers: this issue's, not the next one's (an issue still being journaled must not
    // unhurry answers that wait for the next).
    const hurried = this.hurried;
    this.hurried = new Set();
    if (answered.length === 0) return Promise.resolve();
    const { payments, logger } = this.options;
    // One journal write for all of them (payments.issueAll): they are written together or not at all.
    const { receipts, durable } = payments.issueAll(
      answered.map(({ job, outputs, startedAt, finishedAt }) => ({
        job: job.paid!,
        facts: {
          requestId: job.id,
          status: RECEIPT_STATUS.ok,
          // An answer is ok and done (requests.ts, receiptStatus and unitsUsed): every unit of a job that runs in units.
          unitsUsed: job.units ? job.units.total : 1,
          outputHash: hashTensorMap(outputs),
          startedAt,
          finishedAt,
        },
      })),
    );
    const issued = answered.map(({ job }, i) => ({ payer: job.paid!.payer, senderId: job.senderId, receipt: receipts[i]!, key: job.key }));
    this.journaling += issued.length;
    const done = durable.then(
      () => {
        for (const { payer, senderId, receipt, key } of issued) {
          const group = `${payer} ${senderId}`;
          const ready = this.ready.get(group) ?? { payer, senderId, receipts: [], keys: [] };
          this.ready.set(group, ready);
          ready.receipts.push(receipt);
          ready.keys.push(key);
        }
        // A lane whose window has no room for another request goes now: its client may be waiting for room, which
        // only a voucher for these receipts makes. So does a lane hurried for these answers (a resync), or since.
        this.sendWhere((ready) => hurried.has(ready.payer) || this.hurried.has(ready.payer) || payments.paymentDue(ready.payer));
        if (this.ready.size > 0)
          this.linger ??= setTimeout(() => {
            this.linger = undefined;
            this.sendReady();
          }, payments.receiptLingerMs).unref();
      },
      (err: unknown) => {
        // Not on disk, so never sent: the payer pays only receipts it has, and these answers go unpaid.
        logger.error({ err: (err as Error).message, receipts: issued.length }, 'receipts not journaled; not sent');
        for (const { payer, receipt } of issued) payments.replied(payer, receipt);
      },
    );
    const counted = done.finally(() => {
      this.journaling -= issued.length;
    });
    // A flush waits for every receipt being journaled, its own issue's and those of issues still under way.
    this.journaled = Promise.all([this.journaled, counted.catch(() => {})]).then(() => {});
    return counted;
  }

  /** Sends every ready receipt by itself: one `receipts` message per client and lane. */
  private sendReady(): void {
    this.sendWhere(() => true);
  }

  /**
   * Sends a message of its own that carries a receipt of another kind on `payer`'s lane (an error's, a progress's), in
   * the lane's order. The answers' receipts waiting to be issued are issued first (they take the seqs before it), then
   * `issueOwn` issues its receipt; the lane's receipts before it go (by themselves) once journaled, then `send` is
   * called with it, once it is journaled (`journaled` true) or could not be (false, and why). The lane's receipts issued
   * after it wait here until `send` has returned, and then go at once.
   */
  sendInOrder(
    payer: string,
    issueOwn: () => { receipt: SignedReceipt; durable: Promise<void> },
    send: (receipt: SignedReceipt, journaled: boolean, err?: unknown) => void,
  ): void {
    void this.issue();
    // Every receipt issued so far, this lane's before it among them, journaled (or dropped).
    const earlier = this.journaled;
    const { receipt, durable } = issueOwn();
    const seqs = this.behind.get(payer);
    if (seqs) seqs.push(receipt.seq);
    else this.behind.set(payer, [receipt.seq]);
    const release = () => {
      const now = this.behind.get(payer);
      const i = now?.indexOf(receipt.seq) ?? -1;
      if (i >= 0) now!.splice(i, 1);
      if (now?.length === 0) this.behind.delete(payer);
      // What waited behind it goes now: it was ready, and held back only for this message.
      this.sendWhere((ready) => ready.payer === payer);
    };
    void earlier
      .then(() => {
        this.sendWhere((ready) => ready.payer === payer);
        return durable;
      })
      .then(
        () => send(receipt, true),
        (err: unknown) => send(receipt, false, err),
      )
      .finally(release);
  }

  /** How many of a group's ready receipts may go now: those before the first receipt of another kind still to go. */
  private sendable(ready: Ready): number {
    const seqs = this.behind.get(ready.payer);
    if (!seqs) return ready.receipts.length;
    const first = Math.min(...seqs);
    const stop = ready.receipts.findIndex((r) => r.seq > first);
    return stop < 0 ? ready.receipts.length : stop;
  }

  /** Sends the ready receipts of the clients and lanes `which` picks, by themselves, and forgets them here. */
  private sendWhere(which: (ready: Ready) => boolean): void {
    const now: Ready[] = [];
    for (const [group, ready] of this.ready) {
      if (!which(ready)) continue;
      const n = this.sendable(ready);
      if (n === 0) continue;
      if (n === ready.receipts.length) this.ready.delete(group);
      now.push({ ...ready, receipts: ready.receipts.splice(0, n), keys: ready.keys.splice(0, n) });
    }
    this.send(now);
  }

  private send(readies: readonly Ready[]): void {
    const { agentId, payments } = this.options;
    for (const ready of readies) {
      for (const batch of payments.receiptBatches(ready.payer, ready.receipts, agentId))
        this.options.reply(ready.senderId, encodeMessage(batch));
      this.delivered(ready);
    }
  }

  private delivered({ payer, receipts, keys }: Ready): void {
    for (const [i, receipt] of receipts.entries()) {
      this.options.payments.replied(payer, receipt);
      this.options.sent(keys[i]!, payer, receipt);
    }
  }
}
