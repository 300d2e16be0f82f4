/**
 * The agent's side of payment: a signed quote, a receipt per request a payer's lane takes on, the
 * receipt journal and the best voucher per lane in `level`, lane grants, and the credit rule.
 *
 * - Journal: every receipt is appended to the receipt log (receipt-log.ts: one write(2) on the main
 *   thread) before the reply that carries it is published; receipts move from the log into `level` in
 *   batches off the request path, with their lanes' new heads, and a crash's log is read back on open.
 *   Lane records (grants, vouchers) are written to `level` directly. Writes are group-committed: ops
 *   queued while a batch is written go together in the next one, and `syncWrites` (fdatasync) costs
 *   one sync per burst, not per request.
 * - Lanes are granted: a paid request from mesh client C naming payer P runs on lane (P, payout) only
 *   once C has shown a grant signed by P's voucher key naming this payout and C (docs/settlement.md,
 *   "Lanes and grants"). The grant is checked once and stored; a newer one moves the lane.
 * - Credit only against money that is there (docs/settlement.md, "The credit rule"): the escrow's view
 *   of the lane (lane-funds.ts) must cover everything the lane owes plus this request's maximum price,
 *   no withdrawal may be pending, and the unpaid work stays within the credit window.
 * - Vouchers must recover to the lane's payer, pay more than the best one held, and carry a relayer fee
 *   within the escrow's cap (else the escrow would skip them); a worse one never replaces the best.
 */
import path from 'node:path';
import { KeyedBuckets, throttledWarn, type WarnThrottled } from '@edge-mesh/client';
import {
  decodeCbor,
  type EscrowDomain,
  encodeCbor,
  FEE_CAP_DIVISOR,
  fromHex,
  type Identity,
  type LaneGrant,
  type LaneInfo,
  MeshError,
  type ModelPrice,
  maxRequestMicros,
  PROTOCOL_VERSION,
  RECEIPT_STATUS,
  RECEIPT_VERSION,
  type ReceiptBatch,
  type Resync,
  receiptLeaf,
  receiptPriceMicros,
  type SignedQuote,
  type SignedReceipt,
  signQuote,
  signReceipt,
  toHex,
  type VoucherMessage,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import type { ethers } from 'ethers';
import { Level } from 'level';
import type { Logger } from 'pino';
import { type Confirmations, defaultConfirmations, LaneFunds, type LaneFundsView, parseConfirmations } from './lane-funds.ts';
import { type LoggedReceipt, ReceiptLog } from './receipt-log.ts';
import { SignerRecovery } from './recover.ts';
import type { SettlerOptions } from './settler.ts';

export interface AgentPaymentOptions {
  /** The EVM address the agent is paid to: the second half of every lane. */
  payout: string;
  /** The chain and escrow the receipts and vouchers are for. */
  domain: EscrowDomain;
  /** Folder for the receipt journal and vouchers (a level store per chain id and escrow inside it). */
  dataDir: string;
  /** Unpaid amount allowed per lane, in ok prices of the dearest model (default 8). */
  creditRequests?: number;
  /** Unpaid amount allowed per lane in micro-dollars; overrides creditRequests. */
  creditMicros?: number;
  /** Per-model price overrides; by default unit = the manifest's priceMicros per inference, base and minCharge 0. */
  prices?: Record<string, Partial<Pick<ModelPrice, 'baseMicros' | 'unitMicros' | 'minChargeMicros'>>>;
  /** How long a signed quote holds; it is signed again when half of that has passed. */
  quoteTtlMs?: number;
  /** fsync every journal batch (survives power loss, not only a killed process). */
  syncWrites?: boolean;
  /**
   * Payer lanes that may be granted to one client (default 4). Each lane's credit is backed by its own
   * money on chain; this also bounds how many windows one admitted client can hold open at once.
   */
  maxLanesPerClient?: number;
  /** Run the settlement relayer (edge-agent/settler.ts): settle the best vouchers on chain by its policy. */
  settle?: SettlerOptions;
  /**
   * Reads the escrow's chain (lane balances, withdrawals, settlements): required, because credit is
   * given only against money on the lane. When absent, the settler's runner's provider is used.
   */
  provider?: ethers.Provider;
  /** Serve requests that name no payer too, for free (default false: MESH_PAYMENT_REQUIRED). */
  serveUnpaid?: boolean;
  /**
   * How long a paid answer's receipt waits to ride on the next answer to its client before it is sent by itself
   * (default 20 ms; receipt-post.ts). A lane whose window has no room gets its receipts at once.
   */
  receiptLingerMs?: number;
  /**
   * How long a paid answer's receipt may wait to be signed and journaled with those of the answers after it (default
   * 5 ms; 0: in the next event-loop turn; receipt-post.ts). An agent that dies loses the receipts of at most this long.
   */
  receiptIssueMs?: number;
  /** How often the escrow's events are read (default 4,000 ms). */
  fundsPollMs?: number;
  /** Most blocks per `eth_getLogs` when catching up (default 2,000). */
  fundsMaxBlockRange?: number;
  /**
   * How deep the escrow's events must be before they count: blocks below the latest, or `safe`/`finalized`
   * (default: 0 on a local dev chain, chain id 31337 or 1337; 12 blocks on any other). See docs/settlement.md, "Reorgs".
   */
  confirmations?: Confirmations;
  /** Lanes in use are read again with `laneOf` this often, whatever the events say (default 60,000 ms). */
  fundsRefreshMs?: number;
}

interface StoredVoucher {
  cumulative: number;
  receiptsRoot: string;
  feeCumulative: number;
  sig: string;
}

interface Lane {
  payer: string;
  /** The mesh client the payer granted the lane to. */
  senderId: string;
  /** The grant held (absent in a journal written before grants: the first valid grant binds such a lane). */
  grant?: { issuedAt: number; sig: string };
  seq: number;
  cumulative: number;
  lastLeaf: string;
  /** Cumulative amount of the best voucher. */
  paid: number;
  voucher: StoredVoucher | undefined;
  /** The highest receipt seq a voucher said the payer had checked, and what the agent had billed up to it. */
  checkedSeq?: number;
  checkedBilled?: number;
}

export interface LaneSummary {
  payer: string;
  /** The mesh client the lane is granted to. */
  senderId: string;
  receipts: number;
  owedMicros: number;
  paidMicros: number;
  /** Maximum prices reserved for requests still running. */
  reservedMicros: number;
  /** What the payer refused: billed up to the seq its best voucher says it checked, minus what that voucher pays. */
  refusedMicros: number;
  voucher: StoredVoucher | undefined;
  /** The escrow's view of the lane, once read. */
  funds: LaneFundsView | undefined;
}

/** What the agent holds for a paying request between admission and its receipt. */
export interface PaidJob {
  payer: string;
  price: ModelPrice;
  /** What is still reserved for the job: its most by the quote, less what its progress receipts charged. */
  reservedMicros: number;
  /** The hash of the request's inputs (hashTensorMap), for its receipts: taken on first use, then kept. */
  inputHash: () => Uint8Array;
  /** What the job's receipts charged so far (its progress receipts). */
  chargedMicros: number;
}

/**
 * A paid request's input hash as admission takes it: the hash, or how to take it. A request's path only passes the
 * way (requests.ts): the 9.6 KB of a wake-word input are hashed when its receipt is issued, after its answer left.
 */
export type InputHash = Uint8Array | (() => Uint8Array);

function inputHashOnce(inputHash: InputHash): () => Uint8Array {
  if (typeof inputHash !== 'function') return () => inputHash;
  let hash: Uint8Array | undefined;
  return () => {
    hash ??= inputHash();
    return hash;
  };
}

/** Receipts per `receipts` message (the schema's cap) and messages per resync; the payer asks again from where a batch stops. */
export const RESYNC_BATCH = 256;
const RESYNC_MAX_BATCHES = 4;
/**
 * Resyncs answered per lane: RESYNC_BURST at once, then RESYNC_PER_SECOND. One answer reads up to 1,024 receipts from
 * the journal and sends them, some 300 KB for a resync of a few dozen bytes; the SDK asks at most once per 500 ms a
 * lane. Past this a resync is not answered (the SDK asks again while its gap stays open).
 */
export const RESYNC_BURST = 4;
export const RESYNC_PER_SECOND = 2;
/** A grant dated further ahead than this is refused: it would pin the lane against the payer's own later grants. */
const GRANT_FUTURE_SLACK_MS = 10 * 60_000;
/**
 * Lane grant signatures checked per client: GRANT_CHECKS_BURST at once (maxLanesPerClient when that is more), then
 * one per GRANT_CHECK_EVERY_MS. An honest client has one checked per lane it opens here (at most maxLanesPerClient),
 * and again only when it restarts without its data folder; a grant costs its sender nothing, and its check a
 * signature recovery.
 */
/**
 * Receipts that charge nothing on a request that could have been charged, for an end its payer chose (cancelled
 * before its result, or timed out), per lane: FREE_RECEIPTS_BURST at once, then FREE_RECEIPTS_PER_SECOND, and
 * FREE_RECEIPTS_PER_PAID more for each receipt that charges something. Each is journaled for good (some 700 bytes), and
 * a request cancelled at once costs its payer nothing: past this, the lane's paid requests are refused
 * MESH_RATE_LIMITED until the bucket refills. A failure (the model's, or a place given up in a full queue) is the
 * agent's side and does not count: another app could otherwise spend an honest lane's bucket by displacing its jobs.
 */
export const FREE_RECEIPTS_BURST = 256;
export const FREE_RECEIPTS_PER_SECOND = 1;
export const FREE_RECEIPTS_PER_PAID = 4;
/**
 * Vouchers on a lane whose signature did not recover to its payer: FORGED_VOUCHERS_BURST, then
 * FORGED_VOUCHERS_PER_SECOND; past that the lane's vouchers are refused unchecked until the bucket refills. Only the
 * lane's client reaches the check, and an honest payer never sends one: its vouchers are not held back by this.
 */
export const FORGED_VOUCHERS_BURST = 8;
export const FORGED_VOUCHERS_PER_SECOND = 1;
export const GRANT_CHECKS_BURST = 8;
export const GRANT_CHECK_EVERY_MS = 10_000;

export interface ReceiptFacts {
  requestId: Uint8Array;
  status: number;
  unitsUsed: number;
  outputHash: Uint8Array;
  startedAt: number;
  finishedAt: number;
}

const LANE_PREFIX = 'lane!';
/** How long a paid answer's receipt waits for the next answer to its client by default (receiptLingerMs). */
export const DEFAULT_RECEIPT_LINGER_MS = 20;
/** How long a paid answer's receipt may wait to be issued with later ones by default (receiptIssueMs). */
export const DEFAULT_RECEIPT_ISSUE_MS = 5;
/** Times an admission refused for credit waits for the payer's vouchers under check and tries again, at most. */
const MAX_VOUCHER_WAITS = 4;
const RECEIPT_PREFIX = 'rcpt!';
const receiptKey = (payer: string, seq: number) => `${RECEIPT_PREFIX}${payer}!${String(seq).padStart(16, '0')}`;
/** A receipt as the journal stores it (CBOR, base64 in the JSON value), and read back. */
const receiptPut = (payer: string, receipt: SignedReceipt) => ({
  type: 'put' as const,
  key: receiptKey(payer, receipt.seq),
  value: Buffer.from(encodeCbor(receipt)).toString('base64'),
});
const storedReceipt = (value: string) => decodeCbor(Buffer.from(value, 'base64')) as SignedReceipt;
/** Receipts move from the log into `level` once this many wait, or MIGRATE_AFTER_MS after the first of them. */
const MIGRATE_EVERY = 512;
const MIGRATE_AFTER_MS = 1_000;
/** Receipts the log may hold that could not be moved into `level` (it fails): past this, paid requests are refused. */
const MAX_UNMIGRATED = 65_536;

export class AgentPayments {
  readonly payout: string;
  readonly domain: EscrowDomain;
  private readonly chainId: number;
  private readonly escrow: string;
  private readonly creditMicros: number;
  /** The most one request of the dearest model costs. */
  private readonly dearestMicros: number;
  private readonly quoteTtlMs: number;
  /** See AgentPaymentOptions.receiptLingerMs. */
  readonly receiptLingerMs: number;
  /** See AgentPaymentOptions.receiptIssueMs. */
  readonly receiptIssueMs: number;
  private readonly sync: boolean;
  private readonly lanes = new Map<string, Lane>();
  private readonly lanesPerClient = new Map<string, number>();
  private readonly maxLanesPerClient: number;
  private readonly reserved = new Map<string, number>();
  /** The best voucher per lane that is on disk: only these are settled, so a crash never forgets one that was sent. */
  private readonly durableVouchers = new Map<string, StoredVoucher>();
  /** Per payer, receipts issued by this process whose reply has not gone out yet, by seq (see `resync`). */
  private readonly unsent = new Map<string, Map<number, SignedReceipt>>();
  private readonly prices = new Map<string, ModelPrice>();
  /** Lanes whose refusals filled the window, already logged. */
  private readonly cutOff = new Set<string>();
  private quote: { signed: SignedQuote; renewAt: number } | undefined;
  private pendingOps: { type: 'put'; key: string; value: unknown }[] = [];
  private pendingWaiters: { resolve: () => void; reject: (err: unknown) => void }[] = [];
  private writing = false;
  /** Receipts in the log not yet moved into `level`, oldest first, and by payer and seq for reads. */
  private logged: LoggedReceipt[] = [];
  private readonly unmigrated = new Map<string, Map<number, SignedReceipt>>();
  /** Log segments whose receipts are being moved (or failed to move) into `level`. */
  private rotated: string[] = [];
  private migrating: Promise<void> | undefined;
  /** The move queued behind the one running, shared by every call made meanwhile. */
  private migrateNext: Promise<void> | undefined;
  /** The last move failed: the next waits for the timer. */
  private migrateFailed = false;
  private migrateTimer: NodeJS.Timeout | undefined;
  private closing = false;
  /** Checks voucher signatures on a worker thread. */
  private readonly recovery: SignerRecovery;
  /** Voucher signatures checked so far (recovered, on the signature worker): what vouchers have cost to check. */
  get voucherSignaturesChecked(): number {
    return this.recovery.checked;
  }
  /** Lane grant signatures checked so far (on the same worker). */
  get grantSignaturesChecked(): number {
    return this.recovery.grantsChecked;
  }
  /** Resyncs answered per lane (RESYNC_BURST, RESYNC_PER_SECOND). */
  private readonly resyncBudget = new KeyedBuckets(RESYNC_BURST, RESYNC_PER_SECOND);
  /** Forged vouchers per lane (FORGED_VOUCHERS_BURST, FORGED_VOUCHERS_PER_SECOND). */
  private readonly forgedVouchers = new KeyedBuckets(FORGED_VOUCHERS_BURST, FORGED_VOUCHERS_PER_SECOND);
  /** Free receipts per lane (FREE_RECEIPTS_BURST, FREE_RECEIPTS_PER_SECOND, FREE_RECEIPTS_PER_PAID). */
  private readonly freeReceipts = new KeyedBuckets(FREE_RECEIPTS_BURST, FREE_RECEIPTS_PER_SECOND);
  /** Grant checks per client (GRANT_CHECKS_BURST, or maxLanesPerClient when more, then one per GRANT_CHECK_EVERY_MS). */
  private readonly grantBudget: KeyedBuckets;
  /** Refused vouchers and grants: one warning a second per client and kind, the repeats at debug. */
  private readonly warnRefused: WarnThrottled;
  /** Grants being checked, by payer, client, date and signature: the same grant on a burst of requests shares one check. */
  private readonly grantChecks = new Map<string, Promise<void>>();
  /** Per payer, the vouchers being checked (see `admit`), by sender, cumulative and signature. */
  private readonly checking = new Map<string, Map<string, Promise<boolean>>>();
  /** Requests naming no payer are served free (else MESH_PAYMENT_REQUIRED). */
  readonly serveUnpaid: boolean;
  /** Seconds a voucher must stay settleable to be taken. */
  counters = {
    receipts: 0,
    vouchers: 0,
    vouchersRefused: 0,
    /** Of those, refused unchecked: their lane had as many found forged lately as FORGED_VOUCHERS_BURST allows. */
    vouchersLimited: 0,
    creditRefusals: 0,
    /** Paid requests refused because their lane had as many free receipts lately as FREE_RECEIPTS_BURST allows. */
    freeReceiptsLimited: 0,
    grants: 0,
    grantsRefused: 0,
    /** Grants refused unchecked: their client had as many checked lately as its budget allows (GRANT_CHECKS_BURST, or maxLanesPerClient when more). */
    grantsLimited: 0,
    resyncs: 0,
    resyncsRefused: 0,
    /** Resyncs from the lane's client not answered: past RESYNC_BURST and RESYNC_PER_SECOND. */
    resyncsLimited: 0,
  };

  private constructor(
    private readonly identity: Identity,
    private readonly db: Level<string, unknown>,
    private readonly log: ReceiptLog,
    options: AgentPaymentOptions,
    models: { name: string; sha256: string; priceMicros: number; units?: { maxUnits: number } }[],
    private readonly logger: Logger,
    /** The escrow's view of the lanes. */
    readonly funds: LaneFunds,
  ) {
    this.payout = options.payout.toLowerCase();
    this.domain = options.domain;
    this.chainId = Number(options.domain.chainId);
    this.escrow = options.domain.escrow.toLowerCase();
    this.quoteTtlMs = options.quoteTtlMs ?? 86_400_000;
    this.receiptLingerMs = options.receiptLingerMs ?? DEFAULT_RECEIPT_LINGER_MS;
    this.receiptIssueMs = options.receiptIssueMs ?? DEFAULT_RECEIPT_ISSUE_MS;
    this.sync = options.syncWrites ?? false;
    this.recovery = new SignerRecovery(logger);
    this.warnRefused = throttledWarn(logger);
    this.recovery.start();
    this.maxLanesPerClient = options.maxLanesPerClient ?? 4;
    // A client opening (or, after a restart, granting again) every lane it may hold has them all checked at once.
    this.grantBudget = new KeyedBuckets(Math.max(GRANT_CHECKS_BURST, this.maxLanesPerClient), 1_000 / GRANT_CHECK_EVERY_MS);
    this.serveUnpaid = options.serveUnpaid ?? false;
    for (const m of models) {
      const o = options.prices?.[m.name] ?? {};
      this.prices.set(m.name, {
        name: m.name,
        modelHash: `0x${m.sha256}`,
        baseMicros: o.baseMicros ?? 0,
        unitMicros: o.unitMicros ?? m.priceMicros,
        minChargeMicros: o.minChargeMicros ?? 0,
        ...(m.units ? { maxUnits: m.units.maxUnits } : {}),
      });
    }
    // The window holds creditRequests whole requests of the dearest model, at its most units.
    const dearest = Math.max(0, ...[...this.prices.values()].map((p) => maxRequestMicros(p)));
    this.dearestMicros = dearest;
    this.creditMicros = options.creditMicros ?? (options.creditRequests ?? 8) * dearest;
  }

  static async open(
    identity: Identity,
    options: AgentPaymentOptions,
    models: { name: string; sha256: string; priceMicros: number; units?: { maxUnits: number } }[],
    logger: Logger,
  ): Promise<AgentPayments> {
    const problems: string[] = [];
    if (!/^0x[0-9a-fA-F]{40}$/.test(options.payout)) problems.push(`payout ${JSON.stringify(options.payout)} is not an EVM address`);
    if (!/^0x[0-9a-fA-F]{40}$/.test(options.domain.escrow))
      problems.push(`escrow ${JSON.stringify(options.domain.escrow)} is not an EVM address`);
    if (options.creditRequests !== undefined && !(Number.isInteger(options.creditRequests) && options.creditRequests >= 1))
      problems.push('creditRequests must be a positive integer');
    if (options.creditMicros !== undefined && !(Number.isSafeInteger(options.creditMicros) && options.creditMicros >= 0))
      problems.push('creditMicros must be a non-negative integer');
    if (options.receiptLingerMs !== undefined && !(Number.isFinite(options.receiptLingerMs) && options.receiptLingerMs >= 0))
      problems.push('receiptLingerMs must be a non-negative number of milliseconds');
    if (options.receiptIssueMs !== undefined && !(Number.isFinite(options.receiptIssueMs) && options.receiptIssueMs >= 0))
      problems.push('receiptIssueMs must be a non-negative number of milliseconds');
    let confirmations: Confirmations = defaultConfirmations(options.domain.chainId);
    if (options.confirmations !== undefined) {
      try {
        confirmations = parseConfirmations(options.confirmations);
      } catch (err) {
        problems.push((err as Error).message);
      }
    }
    if (options.fundsRefreshMs !== undefined && !(Number.isSafeInteger(options.fundsRefreshMs) && options.fundsRefreshMs >= 1))
      problems.push('fundsRefreshMs must be a positive integer');
    const provider = options.provider ?? options.settle?.runner?.provider ?? undefined;
    if (!provider)
      problems.push(
        'taking payment needs a chain provider (payment.provider; --rpc URL or MESH_RPC_URL on the command line): credit is given only against money on the lane, read from the escrow',
      );
    if (problems.length || !provider) throw new MeshError('MESH_CONFIG', `invalid payment options: ${problems.join('; ')}`);
    // Keyed by chain and escrow, so a fresh local chain never mixes with old lanes.
    const location = path.join(options.dataDir, `payments-${options.domain.chainId}-${options.domain.escrow.toLowerCase()}`);
    const db = new Level<string, unknown>(location, { valueEncoding: 'json' });
    await db.open();
    let funds: LaneFunds;
    let opened: ReturnType<typeof ReceiptLog.open>;
    try {
      opened = ReceiptLog.open(`${location}-log`, { syncWrites: options.syncWrites ?? false });
    } catch (err) {
      await db.close();
      throw err;
    }
    try {
      funds = await LaneFunds.open({
        provider,
        escrow: options.domain.escrow,
        payout: options.payout,
        chainId: BigInt(options.domain.chainId),
        store: { get: (key) => db.get(key), put: (key, value) => db.put(key, value, { sync: true }) },
        logger,
        ...(options.fundsPollMs !== undefined ? { pollMs: options.fundsPollMs } : {}),
        ...(options.fundsMaxBlockRange !== undefined ? { maxBlockRange: options.fundsMaxBlockRange } : {}),
        ...(options.fundsRefreshMs !== undefined ? { refreshMs: options.fundsRefreshMs } : {}),
        confirmations,
      });
    } catch (err) {
      await opened.log.close();
      await db.close();
      throw err;
    }
    const payments = new AgentPayments(identity, db, opened.log, options, models, logger, funds);
    for await (const [key, value] of db.iterator({ gte: LANE_PREFIX, lt: `${LANE_PREFIX}~` })) {
      const lane = value as Lane;
      payments.lanes.set(key.slice(LANE_PREFIX.length), lane);
      if (lane.voucher) payments.durableVouchers.set(lane.payer, lane.voucher);
      if (lane.grant) payments.lanesPerClient.set(lane.senderId, (payments.lanesPerClient.get(lane.senderId) ?? 0) + 1);
    }
    try {
      await payments.recoverLog(opened.replay);
    } catch (err) {
      await payments.recovery.close();
      await opened.log.close();
      await funds.close();
      await db.close();
      throw err;
    }
    return payments;
  }

  /**
   * Receipts a crash left in the log (written before their replies, never moved into `level`): each lane's
   * head moves to its newest receipt, and they are stored with the lanes before the old segments go.
   */
  private async recoverLog(replay: ReturnType<typeof ReceiptLog.open>['replay']): Promise<void> {
    if (replay.droppedBytes > 0)
      this.logger.warn({ bytes: replay.droppedBytes }, 'receipt log: a record cut short (a crash mid-write) was dropped');
    if (replay.records.length === 0) {
      for (const segment of replay.segments) this.log.remove(segment);
      return;
    }
    const ops: { type: 'put'; key: string; value: unknown }[] = [];
    const moved = new Set<string>();
    for (const { payer, receipt } of replay.records) {
      ops.push(receiptPut(payer, receipt));
      let lane = this.lanes.get(payer);
      if (!lane) {
        // Its grant's record did not reach the disk before the crash. The lane's head must: without it the next
        // receipt would take this one's seq again (a fork the payer refuses). Bound again by the next grant.
        this.logger.warn(
          { payer, seq: receipt.seq },
          'receipt log: a receipt for a lane with no record; the lane is kept without its grant',
        );
        lane = { payer, senderId: '', seq: 0, cumulative: 0, lastLeaf: toHex(ZERO_HASH), paid: 0, voucher: undefined };
        this.lanes.set(payer, lane);
      }
      if (receipt.seq > lane.seq) {
        lane.seq = receipt.seq;
        lane.cumulative = receipt.cumulative;
        lane.lastLeaf = toHex(receiptLeaf(receipt));
        moved.add(payer);
      }
    }
    for (const payer of moved) ops.push({ type: 'put', key: LANE_PREFIX + payer, value: { ...this.lanes.get(payer)! } });
    await this.db.batch(ops, { sync: true });
    for (const segment of replay.segments) this.log.remove(segment);
    this.logger.info({ receipts: replay.records.length, lanes: moved.size }, 'receipt log: receipts from before a stop stored');
  }

  /** The signed quote for the status, signed again before it expires. */
  signedQuote(nowMs = Date.now()): SignedQuote {
    if (!this.quote || nowMs >= this.quote.renewAt) {
      const signed = signQuote(this.identity, {
        payout: this.payout,
        chainId: this.chainId,
        escrow: this.escrow,
        issuedAt: nowMs,
        validUntil: nowMs + this.quoteTtlMs,
        models: [...this.prices.values()],
        creditMicros: this.creditMicros,
      });
      this.quote = { signed, renewAt: nowMs + this.quoteTtlMs / 2 };
    }
    return this.quote.signed;
  }

  /**
   * Admits a paying request from `senderId` on the lane of `payerAddress` (taking `grant` first when
   * it is newer than the one held), under the credit rule (docs/settlement.md, "The credit rule").
   * Reserves the request's maximum price until its receipt is issued (or `release`). Throws
   * MESH_FORBIDDEN (no grant for this client), MESH_CREDIT_EXCEEDED (`details.reason`: `funds`,
   * `withdrawal`, `window` or `refused`) or MESH_CHAIN_UNREACHABLE (the lane cannot be read).
   *
   * `voucher`: one the request carries. Its check (acceptVoucher, on the signature worker) starts once the request's
   * grant, if any, is taken (so a request that moves the lane to its client brings a voucher that is that client's).
   * The request is admitted without it when the window has room; when it has none and vouchers of the payer are
   * being checked, admission waits for them and tries again (a few times at most, should more keep coming). So a
   * request sent with, or right after, the voucher that makes room for it is admitted, as when vouchers were checked
   * on this thread as they came. A refusal is counted once, when it is final.
   */
  async admit(
    payerAddress: string,
    senderId: string,
    model: string,
    inputHash: InputHash,
    grant?: LaneGrant,
    units = 1,
    voucher?: VoucherMessage,
  ): Promise<PaidJob> {
    const payer = payerAddress.toLowerCase();
    const price = this.prices.get(model);
    if (!price) throw new MeshError('MESH_UNKNOWN_MODEL', `model ${model} has no price here`);
    if (this.logged.length >= MAX_UNMIGRATED)
      throw new MeshError('MESH_BUSY', 'the receipt journal is not being written (see the log): paid work waits until it is');
    if (grant) await this.takeGrant(payer, senderId, grant);
    if (voucher) void this.acceptVoucher(senderId, voucher).catch(() => false);
    for (let round = 0; ; round++) {
      try {
        return await this.admitOnce(payer, senderId, price, inputHash, units);
      } catch (err) {
        if (err instanceof MeshError && err.details?.reason === 'free-receipts') this.counters.freeReceiptsLimited++;
        if (!(err instanceof MeshError && err.code === 'MESH_CREDIT_EXCEEDED')) throw err;
        const checking = this.checking.get(payer);
        if (!checking || round >= MAX_VOUCHER_WAITS) {
          this.counters.creditRefusals++;
          throw err;
        }
        await Promise.allSettled([...checking.values()]);
      }
    }
  }

  /**
   * `admit` without waiting, in the common case: the lane is already granted to `senderId` (a grant the request
   * carries is not newer than the one held), its funds have been read, the escrow's events are fresh and the
   * window has room. Otherwise it returns undefined, having changed nothing, and the caller awaits `admit`, which
   * checks the same and refuses or waits as it must. A paid request admitted here is handed to its model in the
   * same event-loop turn as an unpaid one, so its reply leaves with the request's PUBACK (connection.ts, holdWrites).
   */
  admitNow(
    payerAddress: string,
    senderId: string,
    model: string,
    inputHash: InputHash,
    grant?: LaneGrant,
    units = 1,
    voucher?: VoucherMessage,
  ): PaidJob | undefined {
    const payer = payerAddress.toLowerCase();
    const price = this.prices.get(model);
    const lane = this.lanes.get(payer);
    if (!price || this.logged.length >= MAX_UNMIGRATED || !lane?.grant || lane.senderId !== senderId) return undefined;
    if (grant && grant.issuedAt > lane.grant.issuedAt) return undefined;
    const funds = this.funds.view(payer);
    if (!funds || !this.funds.fresh()) return undefined;
    let job: PaidJob;
    try {
      job = this.reserve(payer, senderId, funds, price, inputHash, units);
    } catch {
      // `admit` starts the voucher's check (once: a check started here as well would count a refusal twice).
      return undefined;
    }
    // A check is asynchronous: started after the reservation, it could not have changed it.
    if (voucher) void this.acceptVoucher(senderId, voucher).catch(() => false);
    return job;
  }

  private async admitOnce(payer: string, senderId: string, price: ModelPrice, inputHash: InputHash, units: number): Promise<PaidJob> {
    // Refused before the chain is read for a lane this client may not use; checked again after the read.
    this.grantedLane(payer, senderId);
    this.funds.assertFresh();
    return this.reserve(payer, senderId, await this.funds.track(payer), price, inputHash, units);
  }

  /** The lane of `payer` when it is granted to `senderId`; throws MESH_FORBIDDEN otherwise. */
  private grantedLane(payer: string, senderId: string): Lane {
    const lane = this.lanes.get(payer);
    if (!lane?.grant || lane.senderId !== senderId) {
      throw new MeshError(
        'MESH_FORBIDDEN',
        `client ${senderId} holds no lane grant from payer ${payer} here: send pay.grant, signed by the payer's voucher key for agent ${this.payout} and this client`,
        { details: { payer, reason: 'no-grant' } },
      );
    }
    return lane;
  }

  /**
   * The grant, freshness and credit rules for one request, given the lane's `funds`: reserves its most and returns
   * the job, or throws (MESH_FORBIDDEN, MESH_CHAIN_UNREACHABLE, MESH_CREDIT_EXCEEDED). Synchronous: nothing (a grant
   * moving the lane to another client, another admission) slips between the checks and the reservation.
   */
  private reserve(payer: string, senderId: string, funds: LaneFundsView, price: ModelPrice, inputHash: InputHash, units: number): PaidJob {
    const lane = this.grantedLane(payer, senderId);
    this.funds.assertFresh();
    const maxPrice = Math.max(receiptPriceMicros(price, RECEIPT_STATUS.ok, units), price.minChargeMicros);
    if (maxPrice > 0 && !this.freeReceipts.has(payer)) {
      throw new MeshError(
        'MESH_RATE_LIMITED',
        `lane of ${payer} had ${FREE_RECEIPTS_BURST} receipts that charged nothing lately (cancelled or timed out), the most it may (then ${FREE_RECEIPTS_PER_SECOND} a second, and ${FREE_RECEIPTS_PER_PAID} more per paid one): try again later`,
        { details: { payer, reason: 'free-receipts' } },
      );
    }
    const reserved = this.reserved.get(payer) ?? 0;
    const refuse = (reason: string, message: string, extra: Record<string, unknown> = {}): never => {
      throw new MeshError('MESH_CREDIT_EXCEEDED', message, {
        details: { payer, reason, paidMicros: lane.paid, billedMicros: lane.cumulative, ...extra },
      });
    };
    if (funds.withdrawPending || funds.withdrawArmed || funds.pendingWithdrawal > 0) {
      refuse('withdrawal', `payer ${payer} is withdrawing its lane (thaw ends at ${funds.thawEnd} s): no new credit`, {
        thawEnd: funds.thawEnd,
        armed: funds.withdrawArmed,
      });
    }
    const unvouched = Math.max(0, lane.cumulative - lane.paid);
    const vouchedUnsettled = Math.max(0, lane.paid - funds.settled);
    // The payer may settle its own vouchers and take a relayer fee of up to a tenth of what a settlement
    // pays this agent; what it could pay the agent now is at most all that is owed with this request.
    const owed = vouchedUnsettled + unvouched + reserved;
    const feeAllowance = Math.floor((owed + maxPrice) / Number(FEE_CAP_DIVISOR));
    const cover = funds.remaining - owed - funds.pendingWithdrawal - feeAllowance;
    if (cover < maxPrice) {
      // Behind a confirmation depth a deposit just made is not in the view yet: the payer is told so, not only to fund.
      const depth = this.funds.depth();
      const asOf = depth.words ? ` as of block ${depth.block} (${depth.words})` : '';
      refuse(
        'funds',
        `lane of ${payer} holds ${funds.remaining} micro-dollars on chain${asOf} and owes ${owed} not yet settled (plus up to ${feeAllowance} in relayer fees): it cannot cover ${maxPrice} more; fund the lane${depth.words ? ', or wait for a deposit to be that deep' : ''}`,
        {
          remainingMicros: funds.remaining,
          settledMicros: funds.settled,
          coverMicros: cover,
          asOfBlock: depth.block,
          confirmations: depth.confirmations,
        },
      );
    }
    const refused = this.refusedOf(lane);
    if (refused > 0 && refused + maxPrice > this.creditMicros) {
      if (!this.cutOff.has(payer)) {
        this.cutOff.add(payer);
        this.logger.warn(
          { payer, refusedMicros: refused, creditMicros: this.creditMicros },
          'payer refused a credit window of receipts: no further credit',
        );
      }
      refuse(
        'refused',
        `payer ${payer} refused ${refused} micro-dollars of receipts, a whole credit window (${this.creditMicros}): no further credit`,
        {
          refusedMicros: refused,
        },
      );
    }
    if (unvouched + reserved + maxPrice > this.creditMicros) {
      refuse(
        'window',
        `lane of ${payer} owes ${unvouched + reserved} micro-dollars unpaid; the credit window is ${this.creditMicros}: send a voucher`,
        { unpaidMicros: unvouched + reserved },
      );
    }
    this.reserved.set(payer, reserved + maxPrice);
    return { payer, price, reservedMicros: maxPrice, inputHash: inputHashOnce(inputHash), chargedMicros: 0 };
  }

  /** Where the lane of `payerAddress` stands, for `senderId`'s replies; undefined unless it is granted to that client. */
  /**
   * Whether `payer`'s lane owes so much, unpaid by a voucher (reserved work counted), that one more request of the
   * dearest model would not fit in the credit window: its client waits for room, which only a voucher for receipts it
   * has makes (receipt-post.ts sends the receipts at once then).
   */
  paymentDue(payer: string): boolean {
    const lane = this.lanes.get(payer);
    if (!lane) return false;
    return Math.max(0, lane.cumulative - lane.paid) + (this.reserved.get(payer) ?? 0) + this.dearestMicros > this.creditMicros;
  }

  laneInfo(payerAddress: string, senderId: string): LaneInfo | undefined {
    const lane = this.lanes.get(payerAddress.toLowerCase());
    return lane?.grant && lane.senderId === senderId ? { seq: lane.seq, paid: lane.paid } : undefined;
  }

  /**
   * Takes a lane grant when it is newer than the one held: it must name this payout and `senderId`, be
   * signed by the payer's voucher key, and not be dated ahead. The same grant again is not checked twice,
   * nor the same grant on several requests while it is checked. A grant no newer than the one held changes
   * nothing. Throws MESH_FORBIDDEN for a bad grant; MESH_RATE_LIMITED when `senderId` had as many grants checked
   * lately as it may (GRANT_CHECKS_BURST), and MESH_BUSY when the signature worker's share of it is full.
   */
  private takeGrant(payer: string, senderId: string, grant: LaneGrant): Promise<void> {
    const held = this.lanes.get(payer)?.grant;
    if (held && grant.issuedAt <= held.issuedAt) return Promise.resolve();
    const key = `${payer} ${senderId} ${grant.issuedAt} ${toHex(grant.sig)}`;
    const same = this.grantChecks.get(key);
    if (same) return same;
    const check = this.checkGrant(payer, senderId, grant);
    this.grantChecks.set(key, check);
    const done = () => this.grantChecks.delete(key);
    check.then(done, done);
    return check;
  }

  private async checkGrant(payer: string, senderId: string, grant: LaneGrant): Promise<void> {
    const bad = (why: string): never => {
      this.counters.grantsRefused++;
      this.warnRefused(`${senderId} grant`, { senderId, payer, why }, 'lane grant refused');
      throw new MeshError('MESH_FORBIDDEN', `lane grant refused: ${why}`, { details: { payer, reason: 'bad-grant' } });
    };
    if (grant.payer !== payer) bad(`it is from payer ${grant.payer}, the request names ${payer}`);
    if (grant.agent !== this.payout) bad(`it names agent ${grant.agent}, this agent is paid at ${this.payout}`);
    if (grant.client !== senderId) bad(`it names client ${grant.client}, the request comes from ${senderId}`);
    if (grant.issuedAt > Date.now() + GRANT_FUTURE_SLACK_MS) bad('it is dated in the future');
    // A client at its lane limit would be refused after the check: refused before it instead.
    if (this.lanes.get(payer)?.senderId !== senderId && (this.lanesPerClient.get(senderId) ?? 0) >= this.maxLanesPerClient) {
      this.counters.grantsRefused++;
      throw new MeshError('MESH_FORBIDDEN', `client ${senderId} already has ${this.maxLanesPerClient} payer lanes here (the limit)`, {
        details: { payer, reason: 'lanes-per-client' },
      });
    }
    if (!this.grantBudget.take(senderId)) {
      this.counters.grantsLimited++;
      this.logger.debug({ senderId, payer }, 'lane grant not checked: its client had too many checked lately');
      throw new MeshError(
        'MESH_RATE_LIMITED',
        `client ${senderId} had ${this.grantBudget.burst} lane grants checked here lately, the most it may (then one per ${GRANT_CHECK_EVERY_MS / 1_000} s): try again later`,
        { details: { payer, reason: 'grant-checks' } },
      );
    }
    let signer: string;
    try {
      // On the signature worker (recover.ts): the main thread serves requests meanwhile.
      signer = await this.recovery.recoverGrant(
        this.domain,
        { agent: this.payout, client: senderId, issuedAt: grant.issuedAt },
        toHex(grant.sig),
        senderId,
      );
    } catch (err) {
      const e = err as Error;
      if (e instanceof MeshError && (e.code === 'MESH_BUSY' || e.code === 'MESH_SHUTTING_DOWN')) {
        // Not checked: the client's try again is not counted twice.
        this.grantBudget.give(senderId, 1);
        throw e;
      }
      return bad(`unreadable signature: ${e.message}`);
    }
    if (signer !== payer) bad(`it is signed by ${signer}, not the payer`);
    // Checked: bind (or move) the lane. Another grant may have been taken while this one was checked.
    const current = this.lanes.get(payer);
    if (current?.grant && grant.issuedAt <= current.grant.issuedAt) return;
    const previousClient = current?.grant ? current.senderId : undefined;
    if (previousClient !== senderId) {
      const open = this.lanesPerClient.get(senderId) ?? 0;
      if (open >= this.maxLanesPerClient) {
        this.counters.grantsRefused++;
        throw new MeshError('MESH_FORBIDDEN', `client ${senderId} already has ${open} payer lanes here (the limit)`, {
          details: { payer, reason: 'lanes-per-client' },
        });
      }
      this.lanesPerClient.set(senderId, open + 1);
      if (previousClient !== undefined)
        this.lanesPerClient.set(previousClient, Math.max(0, (this.lanesPerClient.get(previousClient) ?? 1) - 1));
    }
    const next: Lane = current ?? { payer, senderId, seq: 0, cumulative: 0, lastLeaf: toHex(ZERO_HASH), paid: 0, voucher: undefined };
    next.senderId = senderId;
    next.grant = { issuedAt: grant.issuedAt, sig: toHex(grant.sig) };
    this.lanes.set(payer, next);
    this.counters.grants++;
    if (previousClient !== undefined && previousClient !== senderId)
      this.logger.info({ payer, from: previousClient, to: senderId }, 'lane moved to another client by a newer grant');
    await this.write([{ type: 'put', key: LANE_PREFIX + payer, value: { ...next } }]);
  }

  /** What the payer refused: billed up to the seq its vouchers say it checked, minus what its best voucher pays. */
  private refusedOf(lane: Lane): number {
    return Math.max(0, (lane.checkedBilled ?? 0) - lane.paid);
  }

  /** Gives back a reservation for a request that was refused before it was taken on (no receipt). */
  release(job: PaidJob): void {
    this.unreserve(job, job.reservedMicros);
  }

  private unreserve(job: PaidJob, micros: number): void {
    const take = Math.min(micros, job.reservedMicros);
    job.reservedMicros -= take;
    this.reserved.set(job.payer, Math.max(0, (this.reserved.get(job.payer) ?? 0) - take));
  }

  /**
   * Signs the next receipt of the job's lane and journals it. The receipt is final at once (seq,
   * chain); `durable` resolves when it is written, and only then may it leave the agent.
   */
  issue(job: PaidJob, facts: ReceiptFacts): { receipt: SignedReceipt; durable: Promise<void> } {
    const { receipts, durable } = this.issueAll([{ job, facts }]);
    return { receipt: receipts[0]!, durable };
  }

  /**
   * `issue` for several jobs at once, in order (a lane's seqs follow the list), journaled together with one write:
   * `durable` resolves when all of them are written and rejects when none could be.
   */
  issueAll(items: readonly { job: PaidJob; facts: ReceiptFacts }[]): { receipts: SignedReceipt[]; durable: Promise<void> } {
    // The heads of the lanes these receipts go on: should the log refuse them, they never leave the agent, so their
    // lanes go back to where they were and the next receipts take these seqs (no gap the payer could never fill).
    const heads = new Map<string, Pick<Lane, 'seq' | 'cumulative' | 'lastLeaf'>>();
    for (const { job } of items) {
      const lane = this.lanes.get(job.payer);
      if (lane && !heads.has(job.payer)) heads.set(job.payer, { seq: lane.seq, cumulative: lane.cumulative, lastLeaf: lane.lastLeaf });
    }
    const records = items.map(({ job, facts }) => ({ payer: job.payer, receipt: this.signNext(job, facts) }));
    let durable: Promise<void>;
    try {
      this.log.appendAll(records);
      durable = this.log.durable();
      for (const record of records) {
        this.logged.push(record);
        const byPayer = this.unmigrated.get(record.payer) ?? new Map<number, SignedReceipt>();
        this.unmigrated.set(record.payer, byPayer);
        byPayer.set(record.receipt.seq, record.receipt);
      }
      if (this.logged.length >= MIGRATE_EVERY && !this.migrating && !this.migrateFailed) void this.migrate();
      else if (!this.migrateTimer) {
        this.migrateTimer = setTimeout(() => void this.migrate(), MIGRATE_AFTER_MS);
        this.migrateTimer.unref();
      }
    } catch (err) {
      // Unless part of the batch stayed on disk (the log could not cut it off), where the next open would read it back.
      if ((err as MeshError).details?.partKept !== true) {
        for (const [payer, head] of heads) Object.assign(this.lanes.get(payer)!, head);
        for (const { payer, receipt } of records) this.replied(payer, receipt);
        this.counters.receipts -= records.length;
      }
      durable = Promise.reject(err);
    }
    return { receipts: records.map((r) => r.receipt), durable };
  }

  /** Prices, signs and chains the next receipt of the job's lane (not journaled yet). */
  private signNext(job: PaidJob, facts: ReceiptFacts): SignedReceipt {
    // A progress receipt charges part of the job's reservation; the final one gives back the rest.
    const price = receiptPriceMicros(job.price, facts.status, facts.unitsUsed, job.chargedMicros);
    // A request that could have been charged, cancelled or timed out with nothing charged (nor by its progress
    // receipts), spends one of the lane's free receipts; one that charges earns some back.
    if (price > 0) this.freeReceipts.give(job.payer, FREE_RECEIPTS_PER_PAID);
    else if (
      (facts.status === RECEIPT_STATUS.cancelled || facts.status === RECEIPT_STATUS.timeout) &&
      job.chargedMicros === 0 &&
      job.reservedMicros > 0
    )
      this.freeReceipts.spend(job.payer);
    if (facts.status === RECEIPT_STATUS.partial) this.unreserve(job, price);
    else this.release(job);
    job.chargedMicros += price;
    const lane = this.lanes.get(job.payer)!;
    const { receipt, leaf } = signReceipt(this.identity, {
      v: RECEIPT_VERSION,
      chainId: this.chainId,
      escrow: this.escrow,
      payer: job.payer,
      agentKey: this.identity.publicKey,
      seq: lane.seq + 1,
      requestId: facts.requestId,
      modelHash: fromHex(job.price.modelHash),
      inputHash: job.inputHash(),
      outputHash: facts.outputHash,
      status: facts.status,
      unitsUsed: facts.unitsUsed,
      price,
      cumulative: lane.cumulative + price,
      startedAt: Math.round(facts.startedAt),
      finishedAt: Math.round(facts.finishedAt),
      prevReceipt: fromHex(lane.lastLeaf),
    });
    lane.seq = receipt.seq;
    lane.cumulative = receipt.cumulative;
    lane.lastLeaf = toHex(leaf);
    this.counters.receipts++;
    const unsent = this.unsent.get(job.payer) ?? new Map<number, SignedReceipt>();
    this.unsent.set(job.payer, unsent);
    unsent.set(receipt.seq, receipt);
    return receipt;
  }

  /**
   * Moves the receipts waiting in the log into `level` (with their lanes' heads), then deletes the log
   * segments they were in. One move at a time, and at most one waiting behind it; after a failed one the
   * next waits for the timer (MIGRATE_AFTER_MS), not for the next receipt.
   */
  private migrate(): Promise<void> {
    clearTimeout(this.migrateTimer);
    this.migrateTimer = undefined;
    if (this.migrateNext) return this.migrateNext;
    const run = (this.migrating ?? Promise.resolve()).then(() => {
      if (this.migrateNext === run) this.migrateNext = undefined;
      return this.migrateNow();
    });
    if (this.migrating) this.migrateNext = run;
    this.migrating = run;
    const clear = () => {
      if (this.migrating === run) this.migrating = undefined;
    };
    run.then(clear, clear);
    return run;
  }

  private async migrateNow(): Promise<void> {
    if (this.logged.length === 0 && this.rotated.length === 0) return;
    const retry = () => {
      this.migrateFailed = true;
      if (!this.migrateTimer && !this.closing) {
        this.migrateTimer = setTimeout(() => void this.migrate(), MIGRATE_AFTER_MS);
        this.migrateTimer.unref();
      }
    };
    const records = this.logged;
    this.logged = [];
    if (records.length > 0) {
      try {
        this.rotated.push(this.log.rotate());
      } catch (err) {
        // No new segment (the folder is gone or full): appends stay on the current one, and the records wait.
        this.logged = records.concat(this.logged);
        this.logger.error({ err: (err as Error).message }, 'receipt log: no new segment; receipts stay in the log');
        retry();
        return;
      }
    }
    const payers = new Set(records.map((r) => r.payer));
    const ops: { type: 'put'; key: string; value: unknown }[] = records.map(({ payer, receipt }) => receiptPut(payer, receipt));
    for (const payer of payers) {
      const lane = this.lanes.get(payer);
      if (lane) ops.push({ type: 'put', key: LANE_PREFIX + payer, value: { ...lane } });
    }
    try {
      if (ops.length > 0) await this.write(ops);
    } catch (err) {
      // Still in the log (and in memory for reads): the next move takes them again.
      this.logged = records.concat(this.logged);
      this.logger.error({ err: (err as Error).message, receipts: records.length }, 'receipts not moved from the log into the journal');
      retry();
      return;
    }
    this.migrateFailed = false;
    // Receipts that came while this move ran: the next move starts now if they are a batch already.
    if (this.logged.length >= MIGRATE_EVERY) void this.migrate();
    try {
      for (const segment of this.rotated) this.log.remove(segment);
      this.rotated = [];
    } catch (err) {
      this.logger.error({ err: (err as Error).message }, 'receipt log: a moved segment was not deleted; tried again with the next');
      retry();
    }
    for (const { payer, receipt } of records) {
      const byPayer = this.unmigrated.get(payer);
      byPayer?.delete(receipt.seq);
      if (byPayer?.size === 0) this.unmigrated.delete(payer);
    }
  }

  /**
   * Takes a voucher: it must be for this payout, on a lane the agent holds, signed by that lane's
   * payer, and pay more than the best voucher held but no more than the lane holds (a cumulative voucher
   * needs no expiry: it stays settleable). Anything else is refused (logged and counted) and never
   * replaces the best. Its `seq` says how far the payer had checked: what was billed up to there and is
   * not paid is what the payer refused. Returns whether it became the best; resolves once stored.
   */
  acceptVoucher(senderId: string, message: VoucherMessage): Promise<boolean> {
    const payer = message.payer.toLowerCase();
    // The SDK sends its best voucher again on each request until a reply's lane info shows it held: while it is
    // being checked, the same voucher from the same client is that check, not another one.
    const key = `${senderId} ${message.cumulative} ${message.feeCumulative ?? 0} ${toHex(message.receiptsRoot)} ${toHex(message.sig)}`;
    const pending = this.checking.get(payer) ?? new Map<string, Promise<boolean>>();
    const same = pending.get(key);
    if (same) return same;
    const check = this.checkVoucher(senderId, message);
    this.checking.set(payer, pending);
    pending.set(key, check);
    const done = () => {
      pending.delete(key);
      if (pending.size === 0 && this.checking.get(payer) === pending) this.checking.delete(payer);
    };
    check.then(done, done);
    return check;
  }

  private async checkVoucher(senderId: string, message: VoucherMessage): Promise<boolean> {
    const refuse = (why: string) => {
      this.counters.vouchersRefused++;
      this.warnRefused(`${senderId} voucher`, { senderId, payer: message.payer, cumulative: message.cumulative, why }, 'voucher refused');
      return false;
    };
    const lane = this.lanes.get(message.payer);
    if (!lane) return refuse('no lane of this payer here');
    // The lane's payer sends its vouchers from the client its grant names; anyone else's is refused before its
    // signature costs anything to check.
    if (lane.senderId !== senderId) return refuse(`sent by client ${senderId}; the lane is granted to ${lane.senderId}`);
    if (message.agent !== this.payout) return refuse('voucher pays another payout address');
    // The escrow skips a voucher whose fee total is above a tenth of its total (FEE_TOO_HIGH): held, it
    // would be worth nothing on chain, so it must never replace a settleable one.
    const fee = message.feeCumulative ?? 0;
    if (!Number.isSafeInteger(fee) || fee < 0 || BigInt(fee) * FEE_CAP_DIVISOR > BigInt(message.cumulative))
      return refuse(`relayer fee ${fee} is above the escrow's cap (a tenth of ${message.cumulative}): the escrow would skip it`);
    if (message.cumulative === lane.paid) return false; // the best one again (a piggyback repeated)
    if (message.cumulative < lane.paid) return refuse(`pays ${message.cumulative}, less than the best voucher held (${lane.paid})`);
    // Receipts leave this agent only once journaled, so a payer's voucher never pays past what this agent billed:
    // one that does was made up, and is refused before its signature costs anything to check.
    if (message.cumulative > lane.cumulative)
      return refuse(`pays ${message.cumulative}, more than this agent billed on the lane (${lane.cumulative})`);
    if (!this.forgedVouchers.has(lane.payer)) {
      this.counters.vouchersLimited++;
      return refuse(
        `${FORGED_VOUCHERS_BURST} forged vouchers on this lane lately, the most it may have checked (then ${FORGED_VOUCHERS_PER_SECOND} a second)`,
      );
    }
    let signer: string;
    try {
      // On the signature worker (recover.ts): the main thread serves requests meanwhile.
      signer = await this.recovery.recoverVoucher(
        this.domain,
        {
          agent: this.payout,
          cumulative: BigInt(message.cumulative),
          receiptsRoot: toHex(message.receiptsRoot),
          feeCumulative: BigInt(message.feeCumulative ?? 0),
        },
        toHex(message.sig),
        senderId,
        lane.payer,
      );
    } catch (err) {
      const e = err as Error;
      if (e instanceof MeshError && (e.code === 'MESH_BUSY' || e.code === 'MESH_SHUTTING_DOWN')) return refuse(e.message);
      this.forgedVouchers.take(lane.payer);
      return refuse(`unreadable signature: ${e.message}`);
    }
    if (signer.toLowerCase() !== lane.payer) {
      this.forgedVouchers.take(lane.payer);
      return refuse(`signed by ${signer}, not the payer`);
    }
    // The payer cannot have checked receipts it was never sent, nor unchecked what it checked before.
    let checked: { seq: number; billed: number } | undefined;
    if (message.seq !== undefined) {
      const seq = Math.min(message.seq, lane.seq);
      if (seq > (lane.checkedSeq ?? 0)) {
        const billed = await this.billedAt(lane, seq);
        if (billed !== undefined) checked = { seq, billed };
      }
    }
    // Another voucher may have been taken while the journal was read.
    if (message.cumulative <= lane.paid) return false;
    const refusedBefore = this.refusedOf(lane);
    lane.paid = message.cumulative;
    if (checked) {
      lane.checkedSeq = checked.seq;
      lane.checkedBilled = checked.billed;
    }
    const refused = this.refusedOf(lane);
    if (refused > refusedBefore)
      this.logger.warn({ senderId, payer: lane.payer, refusedMicros: refused, checkedSeq: lane.checkedSeq }, 'payer refused receipts');
    const voucher = {
      cumulative: message.cumulative,
      receiptsRoot: toHex(message.receiptsRoot),
      feeCumulative: message.feeCumulative ?? 0,
      sig: toHex(message.sig),
    };
    lane.voucher = voucher;
    this.counters.vouchers++;
    await this.write([{ type: 'put', key: LANE_PREFIX + lane.payer, value: { ...lane } }]);
    if (voucher.cumulative > (this.durableVouchers.get(lane.payer)?.cumulative ?? 0)) this.durableVouchers.set(lane.payer, voucher);
    return true;
  }

  /** The lane's cumulative billed at receipt `seq` (0 before the first), from the journal; undefined if not found. */
  private async billedAt(lane: Lane, seq: number): Promise<number | undefined> {
    if (seq <= 0) return 0;
    if (seq === lane.seq) return lane.cumulative;
    const logged = this.unmigrated.get(lane.payer)?.get(seq);
    if (logged) return logged.cumulative;
    const value = await this.db.get(receiptKey(lane.payer, seq));
    if (typeof value !== 'string') return undefined;
    return storedReceipt(value).cumulative;
  }

  /**
   * The reply that carries `receipt` of `payer`'s lane has gone out (or never will): a resync may return it. Only that
   * receipt: one the journal refused gave its seq back to the lane (`issueAll`), and a later receipt may hold it now.
   */
  replied(payer: string, receipt: SignedReceipt): void {
    const unsent = this.unsent.get(payer);
    if (unsent?.get(receipt.seq) === receipt) unsent.delete(receipt.seq);
    if (unsent?.size === 0) this.unsent.delete(payer);
  }

  /**
   * Answers a resync: the journal's receipts of the lane after `afterSeq`, in seq order, in messages of
   * at most RESYNC_BATCH receipts (at most RESYNC_MAX_BATCHES messages; the payer asks again from where
   * they stop). Only the client the lane is granted to is answered, at most RESYNC_BURST times at once and
   * RESYNC_PER_SECOND after: undefined for anyone else, or past that. `answering` is called once a resync is to be
   * answered, before the journal is read (the agent sends the lane's waiting receipts then: receipt-post.ts, `hurry`).
   */
  async resync(
    senderId: string,
    request: Resync,
    agentId: string,
    answering?: (payer: string) => void,
  ): Promise<ReceiptBatch[] | undefined> {
    const lane = this.lanes.get(request.payer);
    if (!lane?.grant || lane.senderId !== senderId) {
      this.counters.resyncsRefused++;
      this.logger.debug({ senderId, payer: request.payer }, 'resync from a client the lane is not granted to: ignored');
      return undefined;
    }
    if (!this.resyncBudget.take(lane.payer)) {
      this.counters.resyncsLimited++;
      this.logger.debug({ senderId, payer: lane.payer }, 'resync past the lane’s rate: ignored');
      return undefined;
    }
    this.counters.resyncs++;
    answering?.(lane.payer);
    const receipts = await this.journal(lane.payer, request.afterSeq, RESYNC_BATCH * RESYNC_MAX_BATCHES);
    // A receipt whose reply has not gone out yet stops the batch there: sent ahead of its reply, it would
    // reach the payer before the answer it stands for, and be refused as 'no-reply'. The reply brings it.
    const unsent = this.unsent.get(lane.payer);
    if (unsent && unsent.size > 0) {
      const first = Math.min(...unsent.keys());
      const stop = receipts.findIndex((r) => r.seq >= first);
      if (stop >= 0) receipts.length = stop;
    }
    return this.receiptBatches(lane.payer, receipts, agentId);
  }

  /**
   * `receipts` of `payer`'s lane as `receipts` messages of at most RESYNC_BATCH each (one, empty, for none), each
   * with where the lane stands now.
   */
  receiptBatches(payer: string, receipts: readonly SignedReceipt[], agentId: string): ReceiptBatch[] {
    const lane = this.lanes.get(payer);
    const info = { seq: lane?.seq ?? receipts.at(-1)?.seq ?? 0, paid: lane?.paid ?? 0 };
    const batches: ReceiptBatch[] = [];
    for (let i = 0; i < receipts.length || batches.length === 0; i += RESYNC_BATCH) {
      batches.push({
        v: PROTOCOL_VERSION,
        kind: 'receipts',
        agent: agentId,
        payer,
        receipts: receipts.slice(i, i + RESYNC_BATCH),
        lane: info,
      });
    }
    return batches;
  }

  lanesSummary(): LaneSummary[] {
    return [...this.lanes.values()].map((l) => ({
      payer: l.payer,
      senderId: l.senderId,
      receipts: l.seq,
      owedMicros: l.cumulative,
      paidMicros: l.paid,
      reservedMicros: this.reserved.get(l.payer) ?? 0,
      refusedMicros: this.refusedOf(l),
      voucher: l.voucher,
      funds: this.funds.view(l.payer, false),
    }));
  }

  /** Each lane's best voucher that is already stored: what a settler may send. */
  durableVoucherLanes(): { payer: string; voucher: StoredVoucher | undefined }[] {
    return [...this.durableVouchers].map(([payer, voucher]) => ({ payer, voucher }));
  }

  /** The journal of one lane, in seq order. */
  receipts(payerAddress: string): Promise<SignedReceipt[]> {
    return this.journal(payerAddress.toLowerCase(), 0);
  }

  /** A lane's receipts after `afterSeq` in seq order, at most `limit`: those in `level` and those still in the log. */
  private async journal(payer: string, afterSeq: number, limit = Number.POSITIVE_INFINITY): Promise<SignedReceipt[]> {
    // Taken first: a receipt that moves into `level` while the range is read is then found in one or the other.
    const logged = [...(this.unmigrated.get(payer)?.values() ?? [])].filter((r) => r.seq > afterSeq);
    const bySeq = new Map<number, SignedReceipt>();
    for await (const value of this.db.values({
      gt: receiptKey(payer, afterSeq),
      lt: `${RECEIPT_PREFIX}${payer}!~`,
      ...(Number.isFinite(limit) ? { limit } : {}),
    })) {
      const receipt = storedReceipt(value as string);
      bySeq.set(receipt.seq, receipt);
    }
    for (const r of logged) bySeq.set(r.seq, r);
    return [...bySeq.values()].sort((a, b) => a.seq - b.seq).slice(0, limit);
  }

  async close(): Promise<void> {
    // Checks still waiting for the worker are refused; those past it finish (and store their voucher) first.
    await this.recovery.close();
    await Promise.allSettled([...this.checking.values()].flatMap((checks) => [...checks.values()]));
    await this.funds.close();
    // Every receipt in the log goes into `level`; the log's files go once nothing is left in them.
    this.closing = true;
    await this.migrate();
    clearTimeout(this.migrateTimer);
    while (this.writing || this.pendingOps.length > 0) await new Promise((r) => setTimeout(r, 5));
    try {
      await this.log.close(this.logged.length === 0 && this.rotated.length === 0);
    } finally {
      await this.db.close();
    }
  }

  /** Group commit: every op queued while a batch is written goes in the next batch. */
  private write(ops: { type: 'put'; key: string; value: unknown }[]): Promise<void> {
    if (ops.length === 0) return Promise.resolve();
    this.pendingOps.push(...ops);
    const done = new Promise<void>((resolve, reject) => this.pendingWaiters.push({ resolve, reject }));
    if (!this.writing) void this.flush();
    return done;
  }

  private async flush(): Promise<void> {
    this.writing = true;
    while (this.pendingOps.length > 0) {
      const ops = this.pendingOps;
      const waiters = this.pendingWaiters;
      this.pendingOps = [];
      this.pendingWaiters = [];
      try {
        // A lane record names its head receipt: with syncWrites, that receipt is synced in the log before the
        // record is (the log's fdatasync covers every receipt appended before this call).
        if (this.sync) await this.log.durable();
        await this.db.batch(ops, { sync: this.sync });
        for (const w of waiters) w.resolve();
      } catch (err) {
        this.logger.error({ err: (err as Error).message }, 'receipt journal write failed');
        for (const w of waiters) w.reject(err);
      }
    }
    this.writing = false;
  }
}
