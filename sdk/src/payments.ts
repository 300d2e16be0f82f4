/**
 * The payer's side of payment in the SDK (docs/settlement.md, "The payer"): per agent, a lane; every
 * receipt linked into it; and what the payer owes (and only that) paid with EIP-712 vouchers.
 *
 * What a dishonest agent could try, and what stops it here:
 * - Billing work nobody asked for: a receipt is paid only for a request this client sent to that agent,
 *   whose reply came before the deadline by this client's clock, with a status the reply bears out (an ok
 *   receipt needs a result; a cancelled one needs a cancel this client sent), units within the quote's
 *   `maxUnits` and prices by the quote this lane was opened with (a price rise needs `acceptQuote`).
 * - Quoting someone else's payout: a lane opens only when the escrow's registry says the quoted payout
 *   belongs to the agent's key (`agentKeyOf`), so nobody collects on another agent's work.
 * - Wedging the lane: a receipt this client does not pay is still linked into the lane's hash chain (it is
 *   just not paid), a gap in the seq asks the agent for the receipts it sent (`resync`), and a voucher the
 *   agent reports not having is sent again. A receipt that breaks the chain itself stops paying that agent.
 *
 * Vouchers: signed one lane at a time, after the receipts they pay were linked; while a lane owes less
 * than half the agent's quoted credit window its voucher waits `voucherDelayMs` for more, so one signature
 * pays for many receipts. `cumulative` is what this client owes on the lane; `seq` says which receipts it
 * had checked. With `dataDir`, lane state is stored (`level`) before the voucher that depends on it is signed.
 */
import path from 'node:path';
import type { MeshLogger as Logger } from '@edge-mesh/client';
import {
  type AgentStatus,
  decodeCbor,
  type EscrowDomain,
  encodeCbor,
  encodeMessage,
  FEE_CAP_DIVISOR,
  fromHex,
  hashTensorMap,
  keccak256Bytes,
  type LaneGrant,
  type LaneInfo,
  type LaneState,
  LaneVerifier,
  type LinkedReceipt,
  MeshError,
  maxRequestMicros,
  merkleRoot,
  type PaymentField,
  PROTOCOL_VERSION,
  type ProgressMessage,
  type Quote,
  RECEIPT_STATUS,
  type ReceiptBatch,
  type ReceiptContext,
  receiptPriceMicros,
  requestIdHex,
  type SignedReceipt,
  signLaneGrant,
  signVoucher,
  type TypedDataSigner,
  toHex,
  topics,
  type VoucherMessage,
  verifyQuote,
} from '@edge-mesh/protocol';

/** Reads the chain: an ethers v6 Provider fits as it is. */
export interface ChainReader {
  call(tx: { to: string; data: string }): Promise<string>;
}

export interface PaymentOptions {
  /** The payer's voucher key (an EIP-712 signer: an ethers v6 Wallet fits): its address is the lane's payer. */
  signer: TypedDataSigner & { provider?: ChainReader | null };
  /** The chain and escrow the vouchers are for; agents whose quote names another are not paid (nor asked to bill). */
  domain: EscrowDomain;
  /**
   * Reads the escrow to check that a quoted payout is registered to the agent's key (default: the
   * signer's provider). Without one, `connect` refuses payment unless `checkPayouts` is false.
   */
  chain?: ChainReader;
  /** Check every quoted payout against the escrow's registry before paying that agent (default true). */
  checkPayouts?: boolean;
  /** Refuse (do not pay) any receipt priced above this, whatever the quote says. */
  maxPriceMicros?: number;
  /**
   * Called when an agent's new quote would raise what a request may cost (any model's most by the quote).
   * True adopts it; by default the lane keeps the prices it was opened with, and receipts above them are not paid.
   */
  acceptQuote?: (current: Quote, next: Quote) => boolean;
  /** Folder for lane state (a level store per chain id and escrow inside it); needs the `level` package. */
  dataDir?: string;
  /**
   * While a lane owes less than half the agent's quoted credit window, its voucher waits this long
   * for more receipts to cover, so one signature pays for many requests (default 50).
   */
  voucherDelayMs?: number;
  /**
   * The share of each voucher paid as a relayer fee to whoever settles it on chain, so that an agent needs
   * no gas of its own (docs/settlement.md, "The relay"): each voucher carries
   * `feeCumulative = floor(cumulative × relayerFee)`. At most 0.1 (the escrow's cap); default 0.01.
   */
  relayerFee?: number;
  /**
   * Receipts this client refused only because their reply came after the deadline by its own clock (`late`:
   * the agent finished in time by its signed clock, the answer reached this process too late) count against the
   * agent's credit window as refused work, and a window of them closes the lane (docs/settlement.md, "Late
   * answers"). With this on (the default), when that is all that keeps a lane closed, the client pays those late
   * answers, which it did receive, to reopen it; off, the lane stays closed and requests go to other agents.
   */
  payLateToReopen?: boolean;
}

/** Late receipts a lane keeps for payLateToReopen; more are refused for good. */
const MAX_LATE = 1024;

/** The SDK's default relayer fee: 1 % of what each voucher pays the agent (docs/settlement.md, "The relay"). */
export const DEFAULT_RELAYER_FEE = 0.01;
/** Fee shares are applied in parts per million, in integers: no float rounding reaches a signed amount. */
const FEE_PPM = 1_000_000n;

/**
 * The fee total a voucher for `cumulative` carries at `feePpm` parts per million, never below the fee an
 * earlier voucher of the lane carried (`previous`), and never above the escrow's cap (a tenth of `cumulative`).
 */
export function voucherFee(cumulative: number, feePpm: bigint, previous = 0): number {
  const cap = BigInt(cumulative) / FEE_CAP_DIVISOR;
  let fee = (BigInt(cumulative) * feePpm) / FEE_PPM;
  if (fee < BigInt(previous)) fee = BigInt(previous);
  if (fee > cap) fee = cap;
  return Number(fee);
}

export interface LaneView {
  agentId: string;
  payer: string;
  payout: string;
  /** Receipts linked into the lane (paid or not). */
  receipts: number;
  /** Receipts held, not linked yet: ahead of a gap (one before them is missing), or waiting for their reply. */
  held: number;
  /** Answers in whose receipts have not come yet (an agent sends a receipt just after its answer). */
  receiptsDue: number;
  /** What this client owes: the receipts it accepted. */
  owedMicros: number;
  /** What the agent billed, by its receipts. */
  billedMicros: number;
  /** What the latest signed voucher pays the agent. */
  paidMicros: number;
  /** The relayer fee total of the latest signed voucher: what the lane pays whoever settles it, on top of `paidMicros`. */
  feeMicros: number;
  /** What the lane pays for this agent's work at most: `paidMicros + feeMicros` (work + fee). */
  spentMicros: number;
  /** Receipts linked but not paid (see `lastRefusal`). */
  refused: number;
  lastRefusal: string | undefined;
  /** Late answers paid after all to reopen the lane (`payLateToReopen`); they stay counted in `refused` too. */
  lateRepaid: number;
  /** Why this lane no longer pays, if it does not. */
  broken: string | undefined;
}

/** The few calls made on the lane store (a `level` database, loaded only with `dataDir`). */
interface LaneStore {
  open(): Promise<void>;
  batch(ops: ({ type: 'put'; key: string; value: StoredLane | string } | { type: 'del'; key: string })[]): Promise<void>;
  iterator(range: { gte?: string; lt?: string }): AsyncIterable<[string, StoredLane | string]>;
  close(): Promise<void>;
}

/**
 * A lane's recent final request ids (LaneState `closed`, up to 2,048) are stored one key each, beside the lane's
 * record, so that a save writes only those added since the last one (a whole list was ~70 KB of JSON, written
 * twice per voucher). Keys sort after every agent id.
 */
const CLOSED_PREFIX = '~closed!';
const closedKey = (agentId: string, ordinal: number) => `${CLOSED_PREFIX}${agentId}!${String(ordinal).padStart(12, '0')}`;

/** What the store holds of a lane's request ids: ordinals [low, next), the newest of them `last`. */
interface ClosedStore {
  low: number;
  next: number;
  last: string | undefined;
}

interface StoredLane {
  payout: string;
  agentKey: string;
  state: LaneState;
  paid: number;
  pendingLeaves: string[];
  voucher: (Omit<VoucherMessage, 'receiptsRoot' | 'sig'> & { receiptsRoot: string; sig: string }) | undefined;
  grant: (Omit<LaneGrant, 'sig'> & { sig: string }) | undefined;
  /** Receipts held behind a gap when the lanes closed, with what was known of their requests then. */
  ahead?: StoredAhead[];
}

interface Lane {
  agentId: string;
  quote: Quote;
  verifier: LaneVerifier;
  /** What the latest signed voucher pays. */
  paid: number;
  /** The latest signed voucher's relayer fee total. */
  fee: number;
  /** Leaves of payable receipts not yet covered by a voucher. */
  pendingLeaves: Uint8Array[];
  /** Receipts refused only as `late`, with their price: paid if the lane would otherwise stay closed (payLateToReopen). */
  late: { seq: number; leaf: Uint8Array; price: number }[];
  lateRepaid: number;
  signing: boolean;
  timer: NodeJS.Timeout | undefined;
  refused: number;
  lastRefusal: string | undefined;
  voucher: VoucherMessage | undefined;
  grant: LaneGrant | undefined;
  /** The agent answered a paid request since the grant was sent: no need to send it again. */
  grantSeen: boolean;
  /** The agent refused this client for want of a grant after it had taken the grant: the grant rides along again. */
  grantResent: boolean;
  /**
   * Refused again with the grant along: the agent holds a newer grant of this payer, for another client (another
   * running client signs with the same voucher key). The lane is left to it: no request goes there from here.
   */
  taken: boolean;
  /**
   * Receipts that came ahead of a gap, by seq, with what was known when they came; and receipts of a resync
   * batch whose reply is still due (`awaiting`: the request's key), held until it comes or the deadline passes.
   */
  ahead: Map<number, Ahead>;
  /** Fires at the deadline of the receipt awaited first, to link it as it stands then. */
  awaitTimer: NodeJS.Timeout | undefined;
  resyncSentAt: number;
  /** A resync deferred to the end of the spacing (see `resync`). */
  resyncTimer: NodeJS.Timeout | undefined;
  /** Asks again while receipts stay missing after a resync (see `resync`). */
  resyncRetryTimer: NodeJS.Timeout | undefined;
  /** Fires RECEIPT_FOLLOW_MS after an answer whose receipt follows it, to ask for that receipt if it has not come. */
  followTimer: NodeJS.Timeout | undefined;
  /**
   * Answers in whose receipts have not come, by request key, with when they came: asked for past RECEIPT_FOLLOW_MS,
   * counted as due (`receiptsIn`), forgotten REMEMBER_SENT_MS after they came (the request is forgotten then too).
   */
  receiptsAwaited: Map<string, number>;
  /** Resyncs sent again since the lane last linked a receipt. */
  resyncRetries: number;
  voucherResentAt: number;
  broken: string | undefined;
  /**
   * Credit this client holds for its attempts in flight at the agent, by request key: the most each may
   * cost by the quote (what the agent reserves on admission), less what its progress receipts charged.
   */
  held: Map<string, { micros: number; timer: NodeJS.Timeout }>;
  heldMicros: number;
  /** The best voucher the agent has said it holds (its lane info): below `paid`, the voucher rides along with requests. */
  agentPaid: number;
  /** The lane's request ids in the store (see CLOSED_PREFIX). */
  closedStore: ClosedStore;
  /** Voucher signatures that failed in a row: each retry waits twice as long as the one before (`startPump`). */
  signFailures: number;
}

/** A receipt held out of the lane's chain for now: behind a gap, or before its reply. */
interface Ahead {
  receipt: SignedReceipt;
  context: ReceiptContext;
  /** The request key whose reply is awaited: the context is read again when the receipt links. */
  awaiting?: string;
}

/** A held receipt as stored with the lane (hex and base64 for the JSON store). */
interface StoredAhead {
  receipt: string;
  context: Omit<ReceiptContext, 'inputHash' | 'outputHash'> & { inputHash?: string; outputHash?: string };
}

/** Whether an agent's credit window has room for a request (see `PayerLanes.room`). */
export type CreditRoom = 'room' | 'full' | 'never' | 'taken';

/** What this client remembers of a request it sent. */
export interface Sent {
  deadline: number;
  /** The hash of its inputs (hashTensorMap), once taken (`inputHashOf`). */
  inputHash: Uint8Array | undefined;
  /** The inputs, until their hash is taken (in the turn after the request is sent, or when a receipt needs it first). */
  inputs: Parameters<typeof hashTensorMap>[0] | undefined;
  /** The leading dimension its inputs share (1 when they do not): the units it asks of a model that runs in units. */
  units: number;
  /**
   * The agent it went to first, and the reply that came back from it (kind, arrival, outputs hash), whether it was
   * cancelled, and the unit outputs its progress messages brought before the reply (`rows`); any other agents it
   * went to (hedged or tried again elsewhere) in `more`. Most requests go to one agent: no map of their own.
   */
  agent?: string;
  attempt?: Attempt;
  more?: Map<string, Attempt>;
  /** The request is over for the app (answered, failed or given up): no attempt starts after this. */
  settled: boolean;
}

/** One attempt of a sent request, at one agent (see `Sent`). */
interface Attempt {
  reply?: 'res' | 'err';
  arrivedAt?: number;
  outputHash?: Uint8Array;
  cancelled?: boolean;
  rows?: number;
  refusedOutputs?: boolean;
  /**
   * Its final receipt is linked: nothing more is owed for it. Once the request is settled and all its attempts are
   * over, it is forgotten (`forgetIfOver`). An error without a receipt does not end an attempt: an agent refuses a
   * second copy of a request so (a replayed id) while it still runs the first, whose answer and receipt come later.
   */
  over?: boolean;
}

/** The attempt of `s` at `agentId`, if it went there. */
function attemptAt(s: Sent | undefined, agentId: string): Attempt | undefined {
  if (!s) return undefined;
  return s.agent === agentId ? s.attempt : s.more?.get(agentId);
}

/** The leading dimension every tensor of a map shares, or undefined. */
function leadingRows(tensors: Record<string, { shape: number[] }>): number | undefined {
  let rows: number | undefined;
  for (const t of Object.values(tensors)) {
    const lead = t.shape[0];
    if (lead === undefined || (rows !== undefined && lead !== rows)) return undefined;
    rows = lead;
  }
  return rows;
}

/** Final request ids kept against duplicates per lane (the hash chain already refuses replayed receipts); stored with the lane. */
const REMEMBER_REQUESTS = 1024;
/** Requests remembered for their receipts: a minute past their deadline, or fewer when there are many (SentRequests). */
const REMEMBER_SENT_MS = 60_000;
export const MAX_SENT = 20_000;
/** Resync and voucher resend requests per lane are spaced by at least this. */
const RETRY_SPACING_MS = 500;
/**
 * A resync that leaves the gap open is sent again after RESYNC_RETRY_MS, doubling each time, at most
 * MAX_RESYNC_RETRIES times in a row (counted from the lane's last linked receipt): 31 s in all. The ask or its
 * answer can be lost with a broker node where requests and replies travel at QoS 0 (`publishQos`), and nothing else
 * may come to ask again.
 */
const RESYNC_RETRY_MS = 1_000;
/** The longest wait before a voucher whose signature failed is signed again. */
const MAX_SIGN_RETRY_MS = 60_000;
const MAX_RESYNC_RETRIES = 5;
/**
 * How long a receipt that follows its answer may take before the agent is asked for it (`resync`). An honest agent
 * sends it within its linger (20 ms by default) or with its next answer to this client; a broker node that dies
 * between the answer and the receipt loses the receipt alone (QoS 0), and nothing else would ask for it.
 */
const RECEIPT_FOLLOW_MS = 1_000;
/** Answers whose receipts are awaited, per lane, at most (the oldest is forgotten first). */
const MAX_AWAITED = 4_096;
/** How long closing waits for receipts missing before ones it holds, or due for answers in (see `close`). */
const CLOSE_GAP_WAIT_MS = 1_500;
/** Receipts linked before their signatures are checked, per lane, when no voucher comes sooner. */
const MAX_UNCHECKED = 256;
/** Receipts held ahead of a gap, per lane. */
const MAX_AHEAD = 1024;
/**
 * Credit held for an attempt is given back when its reply comes; without one (lost, or an agent that never
 * answers), this long after the request's deadline: an honest agent has answered or dropped it by then.
 */
const HOLD_GRACE_MS = 2_000;

/** A full store of sent requests looks for stale ones through all of them at most this often (SentRequests). */
const SENT_SWEEP_MS = 1_000;

/**
 * The requests this client sent, remembered for their receipts (a receipt for a request it does not remember is not
 * paid), oldest sent first. A request is forgotten as soon as it is settled and the final receipt of every attempt of
 * it is linked (PayerLanes.forgetIfOver): a steady stream of answered requests keeps only those whose receipts are
 * still to come. The others (no reply, a reply whose receipt never came, an error without a receipt) stay until
 * REMEMBER_SENT_MS past their deadline: the oldest of them go as new requests come (a look from the oldest on, at
 * most once every SENT_SWEEP_MS, up to the first not stale). Once MAX_SENT are remembered (an app with over 20,000
 * such requests, or before 2026-12-07 (late night), when every request stayed so long, an app sending over 20,000 ÷
 * (its deadline + 60 s) paid requests a second), a new one makes room: every request more than REMEMBER_SENT_MS past
 * its deadline goes, found by a walk of the whole store made at most once every SENT_SWEEP_MS, and while the store is
 * still full, the oldest sent. So a request costs one look at the oldest entry, and a walk of the store a second at
 * most, however many it holds; a request turned stale since the last walk stays until the next one, so in that second
 * a new request may send away the oldest where it could have sent away a stale one. Before 2026-12-07 (night) the
 * store was walked in full at every request once full: 178 µs a request at 20,000 remembered (`bench receipts`,
 * `sdk_note_request_full_us`).
 */
export class SentRequests {
  private readonly byKey = new Map<string, Sent>();
  private sweepAt = Number.NEGATIVE_INFINITY;
  private headAt = Number.NEGATIVE_INFINITY;
  /** Entries looked at to make room, in all (for tests: about one per request once full, and a walk a second). */
  examined = 0;

  constructor(
    private readonly max = MAX_SENT,
    private readonly clock: () => number = Date.now,
  ) {}

  get size(): number {
    return this.byKey.size;
  }

  get(key: string): Sent | undefined {
    return this.byKey.get(key);
  }

  /** Remembers request `key`, making room first when the store is full. */
  note(key: string, sent: Sent): void {
    const now = this.clock();
    const stale = now - REMEMBER_SENT_MS;
    // The oldest requests, while they are stale, at most once every SENT_SWEEP_MS: requests whose receipts never came
    // go about a minute past their deadline, not only once the store is full. (Not at every request: iterating a Map
    // from its start steps over every entry deleted since it last compacted, and forgotten requests leave many.)
    if (now >= this.headAt) {
      this.headAt = now + SENT_SWEEP_MS;
      for (const [k, e] of this.byKey) {
        if (e.deadline >= stale) break;
        this.byKey.delete(k);
      }
    }
    if (this.byKey.size >= this.max) {
      if (now >= this.sweepAt) {
        this.sweepAt = now + SENT_SWEEP_MS;
        for (const [k, e] of this.byKey) {
          this.examined++;
          if (e.deadline < stale) this.byKey.delete(k);
        }
      }
      if (this.byKey.size >= this.max) {
        this.examined++;
        this.byKey.delete(this.byKey.keys().next().value!);
      }
    }
    this.byKey.delete(key);
    this.byKey.set(key, sent);
  }

  /** Forgets request `key`: nothing more is owed for it (PayerLanes.forgetIfOver). */
  forget(key: string): void {
    this.byKey.delete(key);
  }
}

/** The escrow's `agentKeyOf(address)` selector. */
const AGENT_KEY_OF = toHex(keccak256Bytes(new TextEncoder().encode('agentKeyOf(address)')).subarray(0, 4));

export class PayerLanes {
  private readonly lanes = new Map<string, Lane>();
  /** Agents whose lane is being opened (payout check, grant), or refused for good. */
  private readonly opening = new Map<string, Promise<void>>();
  private readonly refusedAgents = new Map<string, string>();
  private readonly stored = new Map<string, StoredLane>();
  /** Per agent, the request ids stored apart from its lane record (CLOSED_PREFIX), oldest first. */
  private readonly storedClosed = new Map<string, { ids: string[]; store: ClosedStore }>();
  private readonly sent = new SentRequests();
  private readonly chainId: number;
  private readonly escrow: string;
  private readonly maxPriceMicros: number;
  private readonly voucherDelayMs: number;
  private readonly chain: ChainReader | undefined;
  private readonly feePpm: bigint;
  private pumping = new Set<Promise<void>>();
  /**
   * Requests waiting for room in a credit window, with the agents they wait on: woken whenever credit may have been
   * freed; those agents' vouchers are due at once (`voucherDue`).
   */
  private roomWaiters = new Map<() => void, readonly string[]>();
  /** Closing: vouchers owed are signed and sent; replies are taken for payment until `closeWaited`. */
  private closing = false;
  /** `close` has waited for what was due: nothing waits for a reply any more (`replyDue`). */
  private closeWaited = false;
  /** `close` has signed its last vouchers: nothing is signed any more. */
  private shut = false;
  counters = { receipts: 0, refused: 0, vouchers: 0, resyncs: 0, vouchersResent: 0, lanesRefused: 0, lanesTaken: 0, lateRepaid: 0 };

  private constructor(
    readonly payer: string,
    private readonly options: PaymentOptions,
    private readonly clientId: string,
    private readonly db: LaneStore | undefined,
    private readonly publish: (topic: string, payload: Buffer) => void,
    private readonly logger: Logger,
  ) {
    this.chainId = Number(options.domain.chainId);
    this.escrow = options.domain.escrow.toLowerCase();
    this.maxPriceMicros = options.maxPriceMicros ?? Number.MAX_SAFE_INTEGER;
    this.voucherDelayMs = options.voucherDelayMs ?? 50;
    this.chain = options.chain ?? options.signer.provider ?? undefined;
    this.feePpm = BigInt(Math.round((options.relayerFee ?? DEFAULT_RELAYER_FEE) * Number(FEE_PPM)));
  }

  static async open(
    options: PaymentOptions,
    clientId: string,
    publish: (topic: string, payload: Buffer) => void,
    logger: Logger,
  ): Promise<PayerLanes> {
    const share = options.relayerFee ?? DEFAULT_RELAYER_FEE;
    if (!(typeof share === 'number' && share >= 0 && share <= 1 / Number(FEE_CAP_DIVISOR))) {
      throw new MeshError(
        'MESH_CONFIG',
        `payment.relayerFee must be a share between 0 and ${1 / Number(FEE_CAP_DIVISOR)} (the escrow's cap), got ${String(share)}`,
      );
    }
    const payer = (await options.signer.getAddress()).toLowerCase();
    if ((options.checkPayouts ?? true) && !options.chain && !options.signer.provider) {
      throw new MeshError(
        'MESH_CONFIG',
        'payment needs a chain reader to check quoted payouts against the escrow: give payment.chain (an ethers Provider), a signer with a provider, or checkPayouts: false',
      );
    }
    let db: LaneStore | undefined;
    if (options.dataDir) {
      // Loaded on demand: an app that pays without a data folder needs no level (an optional peer dependency).
      const { Level } = await import('level').catch((cause: unknown) => {
        throw new MeshError('MESH_CONFIG', 'payment.dataDir needs the `level` package: npm install level', { cause });
      });
      db = new Level<string, StoredLane | string>(
        path.join(options.dataDir, `payer-${options.domain.chainId}-${options.domain.escrow.toLowerCase()}-${payer}`),
        { valueEncoding: 'json' },
      );
      await db.open();
    }
    const lanes = new PayerLanes(payer, options, clientId, db, publish, logger);
    if (db) {
      for await (const [agentId, stored] of db.iterator({ lt: CLOSED_PREFIX })) lanes.stored.set(agentId, stored as StoredLane);
      for await (const [key, id] of db.iterator({ gte: CLOSED_PREFIX, lt: `${CLOSED_PREFIX}~` })) {
        const bang = key.lastIndexOf('!');
        const agentId = key.slice(CLOSED_PREFIX.length, bang);
        const ordinal = Number(key.slice(bang + 1));
        const entry = lanes.storedClosed.get(agentId) ?? { ids: [], store: { low: ordinal, next: ordinal, last: undefined } };
        entry.ids.push(id as string);
        entry.store.next = ordinal + 1;
        entry.store.last = id as string;
        lanes.storedClosed.set(agentId, entry);
      }
    }
    return lanes;
  }

  /** Reads an agent's (already verified) status: a quote for this payer's chain and escrow opens or refreshes its lane. */
  onStatus(agentId: string, status: AgentStatus): void {
    if (!status.quote) return;
    let quote: Quote;
    try {
      quote = verifyQuote(status.quote, { agentId });
    } catch (err) {
      this.logger.debug({ agentId, err: (err as Error).message }, 'ignoring quote');
      return;
    }
    if (quote.chainId !== this.chainId || quote.escrow !== this.escrow) return;
    const lane = this.lanes.get(agentId);
    if (lane && Buffer.from(lane.quote.agentKey).equals(Buffer.from(quote.agentKey)) && lane.quote.payout === quote.payout) {
      this.refreshQuote(lane, quote);
      return;
    }
    if (this.opening.has(agentId)) return;
    const opening = this.openLane(agentId, quote)
      .catch((err: unknown) => {
        this.refuseAgent(agentId, (err as Error).message);
      })
      .finally(() => this.opening.delete(agentId));
    this.opening.set(agentId, opening);
  }

  /** A lane opens once the payout is the agent's by the escrow's registry, and this client holds the payer's grant for it. */
  private async openLane(agentId: string, quote: Quote): Promise<void> {
    if (this.options.checkPayouts ?? true) {
      const registered = await this.registeredKey(quote.payout);
      if (registered !== toHex(quote.agentKey).toLowerCase()) {
        throw new MeshError(
          'MESH_FORBIDDEN',
          `payout ${quote.payout} is not registered to agent ${agentId}'s key (registry says ${registered})`,
        );
      }
    }
    const stored = this.stored.get(agentId);
    const resume = stored && stored.payout === quote.payout && stored.agentKey === toHex(quote.agentKey) ? stored : undefined;
    const grant = resume?.grant ? { ...resume.grant, sig: fromHex(resume.grant.sig) } : await this.signGrant(quote.payout);
    this.refusedAgents.delete(agentId);
    this.lanes.set(agentId, {
      agentId,
      quote,
      verifier: new LaneVerifier({
        payer: this.payer,
        quote,
        maxPriceMicros: this.maxPriceMicros,
        rememberRequests: REMEMBER_REQUESTS,
        deferSignatures: true,
        ...(resume
          ? {
              state: {
                ...resume.state,
                // Lanes stored before the ids were kept apart hold them in their record.
                closed: [...resume.state.closed, ...(this.storedClosed.get(agentId)?.ids ?? [])],
                payable: resume.state.payable ?? resume.state.cumulative,
              },
            }
          : {}),
      }),
      paid: resume?.paid ?? 0,
      fee: resume?.voucher?.feeCumulative ?? 0,
      pendingLeaves: resume?.pendingLeaves.map(fromHex) ?? [],
      signing: false,
      timer: undefined,
      refused: 0,
      late: [],
      lateRepaid: 0,
      lastRefusal: undefined,
      voucher: resume?.voucher
        ? { ...resume.voucher, receiptsRoot: fromHex(resume.voucher.receiptsRoot), sig: fromHex(resume.voucher.sig) }
        : undefined,
      grant,
      grantSeen: false,
      grantResent: false,
      taken: false,
      ahead: new Map((resume?.ahead ?? []).map(restoreAhead).map((a) => [a.receipt.seq, a])),
      awaitTimer: undefined,
      resyncTimer: undefined,
      resyncRetryTimer: undefined,
      followTimer: undefined,
      receiptsAwaited: new Map(),
      resyncRetries: 0,
      signFailures: 0,
      resyncSentAt: 0,
      voucherResentAt: 0,
      broken: undefined,
      held: new Map(),
      heldMicros: 0,
      agentPaid: 0,
      // Not resumed: the ids stored for an earlier lane with this agent go at the next save (last unset: all new).
      closedStore: closedStoreOf(this.storedClosed.get(agentId)?.store, resume !== undefined),
    });
    this.logger.info({ agentId, payout: quote.payout }, 'lane open');
    // Receipts stored behind a gap: ask for the missing ones now.
    const opened = this.lanes.get(agentId)!;
    if (opened.ahead.size > 0) this.resync(opened);
  }

  private async signGrant(payout: string): Promise<LaneGrant> {
    const issuedAt = Date.now();
    const sig = await signLaneGrant(this.options.signer, this.options.domain, { agent: payout, client: this.clientId, issuedAt });
    return { payer: this.payer, agent: payout, client: this.clientId, issuedAt, sig: fromHex(sig) };
  }

  /** The escrow's `agentKeyOf(payout)`, 0x hex. */
  private async registeredKey(payout: string): Promise<string> {
    if (!this.chain) throw new MeshError('MESH_CONFIG', 'no chain reader to check payouts');
    let out: string;
    try {
      out = await this.chain.call({
        to: this.options.domain.escrow,
        data: `${AGENT_KEY_OF}${payout.slice(2).toLowerCase().padStart(64, '0')}`,
      });
    } catch (cause) {
      throw new MeshError('MESH_CHAIN_UNREACHABLE', `cannot read the escrow's registry: ${(cause as Error).message}`, { cause });
    }
    if (typeof out !== 'string' || !/^0x[0-9a-fA-F]{64}$/.test(out))
      throw new MeshError('MESH_CHAIN_UNREACHABLE', 'the escrow answered agentKeyOf badly');
    return out.toLowerCase();
  }

  private refuseAgent(agentId: string, why: string): void {
    this.counters.lanesRefused++;
    this.refusedAgents.set(agentId, why);
    this.logger.warn({ agentId, err: why }, 'not paying this agent');
  }

  /**
   * The agent refused a request of this client with MESH_FORBIDDEN. After it had taken this client's grant, that is
   * a lane it no longer holds for this client: the next request carries the grant again (an agent that lost its
   * journal takes it back). Refused once more with the grant along, the agent holds a newer grant of this payer for
   * another client: the lane is left to that client (`room` says 'taken'), not fought over, since every move strands
   * the work in flight on it. Returns the error to give the app, when there is a better one to give.
   */
  onForbidden(agentId: string, error: MeshError): MeshError | undefined {
    const lane = this.lanes.get(agentId);
    if (!lane || lane.broken || lane.taken) return undefined;
    if (lane.grantSeen) {
      lane.grantSeen = false;
      lane.grantResent = true;
      return undefined;
    }
    if (!lane.grantResent) return undefined;
    lane.taken = true;
    this.counters.lanesTaken++;
    const why = `${this.takenReason(agentId)}; give each running client its own voucher key`;
    this.logger.warn({ agentId, payer: this.payer }, why);
    return new MeshError('MESH_FORBIDDEN', why, { cause: error, details: { agentId, payer: this.payer, reason: 'lane-taken' } });
  }

  /** Why requests do not go to `agentId` from here, when its lane went to another client (`room` says 'taken'). */
  takenReason(agentId: string): string | undefined {
    return this.lanes.get(agentId)?.taken
      ? `agent ${agentId} serves payer ${this.payer}'s lane to another client (a newer grant: another running client signs with this voucher key)`
      : undefined;
  }

  /** A new quote for an open lane: adopted when it costs no more per request, or when the app consents. */
  private refreshQuote(lane: Lane, quote: Quote): void {
    const most = (q: Quote) => new Map(q.models.map((m) => [m.modelHash, maxRequestMicros(m)]));
    const before = most(lane.quote);
    const rises = [...most(quote)].some(([hash, micros]) => micros > (before.get(hash) ?? 0));
    if (rises && !this.options.acceptQuote?.(lane.quote, quote)) {
      this.logger.warn({ agentId: lane.agentId }, 'quote raises prices: keeping the prices the lane was opened with');
      return;
    }
    lane.quote = quote;
    lane.verifier = new LaneVerifier({
      payer: this.payer,
      quote,
      maxPriceMicros: this.maxPriceMicros,
      state: lane.verifier.state,
      rememberRequests: REMEMBER_REQUESTS,
      deferSignatures: true,
    });
  }

  /**
   * The request's payment field for this agent, when this payer pays it: its grant until the agent has
   * answered a paid request, and the latest voucher until the agent's lane info says it holds it (the agent
   * takes a voucher that rides along before it admits the request, so credit this client counts as freed is
   * freed there too, whatever became of the voucher sent on its own).
   */
  payField(agentId: string): PaymentField | undefined {
    const lane = this.lanes.get(agentId);
    if (!lane || lane.broken) return undefined;
    return {
      payer: this.payer,
      ...(lane.grantSeen || !lane.grant ? {} : { grant: lane.grant }),
      ...(lane.voucher && lane.agentPaid < lane.paid ? { voucher: lane.voucher } : {}),
    };
  }

  /**
   * Whether the credit window `agentId` quoted has room now for request `key` (of `model`): what this client
   * counts as unpaid there (billed by receipts, less what its latest voucher pays, plus what it holds for
   * attempts in flight) plus the most this request may cost must stay within the window, as the agent's
   * credit rule requires (docs/settlement.md, "The credit rule"). 'room' also for an agent this client does
   * not pay or whose quote names no window; 'never' when the request cannot fit even with every voucher
   * signed (a window smaller than one request, or filled by receipts this client refused).
   */
  room(agentId: string, key: string, model: string): CreditRoom {
    const lane = this.lanes.get(agentId);
    if (lane?.taken) return 'taken';
    const credit = lane?.quote.creditMicros;
    if (!lane || lane.broken || credit === undefined) return 'room';
    const need = this.mostFor(lane, key, model);
    const billed = this.billedOf(lane);
    let refused = Math.max(0, lane.verifier.state.cumulative - (lane.verifier.state.payable ?? 0));
    if (refused + need > credit && lane.late.length > 0 && (this.options.payLateToReopen ?? true)) {
      this.payLate(lane);
      refused = Math.max(0, lane.verifier.state.cumulative - (lane.verifier.state.payable ?? 0));
    }
    if (refused + need > credit) return 'never';
    return billed - lane.paid + lane.heldMicros - (lane.held.get(key)?.micros ?? 0) + need <= credit ? 'room' : 'full';
  }

  /**
   * Pays the late answers of a lane whose refused work would otherwise keep it closed: their leaves join the next
   * voucher and what they charged becomes owed. Only receipts refused as `late` (answered, in time by the agent's
   * signed clock, after the deadline by this client's): never an unsolicited, unanswered or mispriced one.
   */
  private payLate(lane: Lane): void {
    // Only receipts the agent's signature covers: check the chain first; a lane that breaks pays nothing more.
    this.checkSignatures(lane);
    if (lane.broken) return;
    const signed = lane.late.filter((r) => r.seq <= lane.verifier.signedSeq);
    if (signed.length === 0) return;
    lane.late = lane.late.filter((r) => r.seq > lane.verifier.signedSeq);
    const micros = signed.reduce((sum, r) => sum + r.price, 0);
    for (const r of signed) lane.pendingLeaves.push(r.leaf);
    lane.verifier.state.payable = (lane.verifier.state.payable ?? 0) + micros;
    this.counters.lateRepaid += signed.length;
    lane.lateRepaid += signed.length;
    this.logger.warn(
      { agentId: lane.agentId, receipts: signed.length, micros },
      'paying answers that came after their deadlines: the agent counts them as refused and its lane would stay closed',
    );
    this.startPump(lane);
  }

  /**
   * Resolves when credit may have been freed on some lane (a voucher signed, a reply in, a hold given back)
   * or after `timeoutMs`, whichever is first; the waiter then asks `room` again. Vouchers owed to the agents
   * named are signed at once, not after `voucherDelayMs`: someone is waiting on them.
   */
  whenRoom(agentIds: readonly string[], timeoutMs: number): Promise<void> {
    for (const id of agentIds) {
      const lane = this.lanes.get(id);
      if (lane) this.startPump(lane);
    }
    return new Promise((resolve) => {
      const wake = () => {
        clearTimeout(timer);
        this.roomWaiters.delete(wake);
        resolve();
      };
      const timer = setTimeout(wake, Math.max(0, timeoutMs));
      this.roomWaiters.set(wake, agentIds);
    });
  }

  private wakeRoomWaiters(): void {
    for (const wake of [...this.roomWaiters.keys()]) wake();
  }

  /** What the agent may have billed on the lane, as far as this client has seen: receipts held behind a gap included. */
  private billedOf(lane: Lane): number {
    let billed = lane.verifier.state.cumulative;
    for (const { receipt } of lane.ahead.values()) if (receipt.cumulative > billed) billed = receipt.cumulative;
    return billed;
  }

  /**
   * The most request `key` of `model` may cost by the lane's quote: what the agent reserves when it admits
   * it (the ok price at the units asked, or the minimum charge); a model the quote does not price counts
   * as the dearest request it quotes.
   */
  private mostFor(lane: Lane, key: string, model: string): number {
    const price = lane.quote.models.find((m) => m.name === model);
    if (!price) return Math.max(0, ...lane.quote.models.map((m) => maxRequestMicros(m)));
    const units = price.maxUnits !== undefined ? Math.max(1, this.sent.get(key)?.units ?? 1) : 1;
    return Math.max(receiptPriceMicros(price, RECEIPT_STATUS.ok, units), price.minChargeMicros);
  }

  /** Holds credit for an attempt of `key` sent to the agent, until its reply (or HOLD_GRACE_MS past the deadline). */
  private hold(lane: Lane, key: string, model: string | undefined): void {
    this.unhold(lane, key);
    const micros = model === undefined ? 0 : this.mostFor(lane, key, model);
    const deadline = this.sent.get(key)?.deadline ?? Date.now();
    const timer = setTimeout(() => this.unhold(lane, key), Math.max(0, deadline - Date.now()) + HOLD_GRACE_MS);
    timer.unref?.();
    lane.held.set(key, { micros, timer });
    lane.heldMicros += micros;
  }

  /** Gives back what is held for `key`, or `micros` of it (a progress receipt charged that much of it). */
  private unhold(lane: Lane, key: string, micros?: number): void {
    const h = lane.held.get(key);
    if (!h) return;
    const take = micros === undefined ? h.micros : Math.min(micros, h.micros);
    h.micros -= take;
    lane.heldMicros = Math.max(0, lane.heldMicros - take);
    if (micros === undefined) {
      clearTimeout(h.timer);
      lane.held.delete(key);
    }
    if (take > 0 || micros === undefined) this.wakeRoomWaiters();
  }

  /**
   * Remembers what was sent, so the receipts for it can be held to it; kept until a minute past the deadline. `inputs`
   * must not change afterwards.
   */
  noteRequest(key: string, deadline: number, inputs: Parameters<typeof hashTensorMap>[0]): void {
    // Hashed off the send path, in the next turn: the caller hands over inputs nothing writes to any more (the SDK's
    // copy of the app's), and a receipt that needs the hash sooner takes it then (`inputHashOf`).
    // Every field from the start (one shape, kept in the object, not a property array added at the first attempt).
    const sent: Sent = {
      deadline,
      inputHash: undefined,
      inputs,
      units: leadingRows(inputs) ?? 1,
      agent: undefined,
      attempt: undefined,
      more: undefined,
      settled: false,
    };
    this.sent.note(key, sent);
    if (this.toHash.push(sent) === 1)
      setImmediate(() => {
        for (const s of this.toHash.splice(0)) this.inputHashOf(s);
      });
  }

  /** Requests remembered for the receipts still owed for them (SentRequests). */
  get remembered(): number {
    return this.sent.size;
  }

  /** Requests sent whose inputs are not hashed yet (see `noteRequest`). */
  private readonly toHash: Sent[] = [];

  private inputHashOf(s: Sent): Uint8Array {
    if (!s.inputHash) {
      s.inputHash = hashTensorMap(s.inputs!);
      s.inputs = undefined;
    }
    return s.inputHash;
  }

  /** An attempt of request `key` (of `model`) went to `agentId`: the most it may cost is held against that agent's credit window. */
  noteAttempt(key: string, agentId: string, model?: string): void {
    const s = this.sent.get(key);
    if (s && !attemptAt(s, agentId)) {
      if (s.agent === undefined) {
        s.agent = agentId;
        s.attempt = {};
      } else {
        s.more ??= new Map();
        s.more.set(agentId, {});
      }
    }
    const lane = this.lanes.get(agentId);
    if (lane && s) this.hold(lane, key, model);
  }

  /**
   * Request `key` is over for the app (answered, failed, or given up before it was sent): no attempt of it starts
   * after this. It is forgotten once every attempt it made is over too.
   */
  noteSettled(key: string): void {
    const s = this.sent.get(key);
    if (!s) return;
    s.settled = true;
    this.forgetIfOver(key, s);
  }

  /** Forgets a settled request whose attempts are all over: no receipt for it is owed any more. */
  private forgetIfOver(key: string, s: Sent): void {
    if (!s.settled || (s.attempt && !s.attempt.over)) return;
    if (s.more) for (const a of s.more.values()) if (!a.over) return;
    this.sent.forget(key);
  }

  /** This client cancelled the attempt at `agentId`. */
  noteCancel(key: string, agentId: string): void {
    const a = attemptAt(this.sent.get(key), agentId);
    if (a) a.cancelled = true;
  }

  /**
   * A reply from `agentId` for request `key`: its receipt (if any) is linked and, when owed, paid; its
   * lane info may ask for a resync or for the voucher again.
   */
  onReply(
    agentId: string,
    key: string,
    kind: 'res' | 'err',
    receipt: SignedReceipt | undefined,
    outputs: Parameters<typeof hashTensorMap>[0] | undefined,
    lane: LaneInfo | undefined,
    /** The app refused these outputs (InferOptions.checkOutputs): the receipt for them is linked, not paid. */
    refusedOutputs = false,
    /** For a reply taken after it came: when it came, and the hash of its outputs then (default: now, and hashed now). */
    came?: { arrivedAt: number; outputHash: Uint8Array | undefined },
  ): void {
    const arrivedAt = came?.arrivedAt ?? Date.now();
    const seen = attemptAt(this.sent.get(key), agentId);
    if (seen && refusedOutputs) seen.refusedOutputs = true;
    // An error without a receipt is a refusal before the agent took the request on (it costs nothing): it is
    // not the attempt's answer, which may still come when the SDK tries that agent again (MESH_CREDIT_EXCEEDED).
    if (seen && seen.reply === undefined && (kind === 'res' || receipt !== undefined)) {
      seen.reply = kind;
      seen.arrivedAt = arrivedAt;
      const outputHash = came ? came.outputHash : outputs && hashTensorMap(outputs);
      if (outputHash) seen.outputHash = outputHash;
    }
    const l = this.lanes.get(agentId);
    if (!l) {
      if (receipt) {
        this.counters.refused++;
        this.logger.warn({ agentId }, 'receipt from an agent without an open lane: not paid');
      }
      return;
    }
    // The attempt is over at the agent: what it reserved is billed by this receipt, or was given back. A paid
    // answer's receipt follows it in a `receipts` message (the agent signs it once the answer is out): what is
    // held for the attempt stays until that receipt is linked, or until the hold runs out.
    if (receipt || kind === 'err') this.unhold(l, key);
    if (lane) l.grantSeen = true;
    if (receipt) {
      // A receipt stands for the request its reply answers; one naming another request was never asked for here.
      const context = requestIdHex(receipt.requestId) === key ? this.contextOf(key, agentId) : { asked: false };
      this.take(l, receipt, context);
    } else if (kind === 'res' && [...l.ahead.values()].some((e) => e.awaiting === key)) {
      // Its receipt came first and waits for this answer: linked now (and what is held for it given back), not at
      // the deadline.
      this.linkAhead(l);
    } else if (kind === 'res' && seen?.reply === 'res' && !l.verifier.hasFinal(key)) {
      // Its receipt follows it: awaited, and asked for if it does not come.
      if (l.receiptsAwaited.size >= MAX_AWAITED) l.receiptsAwaited.delete(l.receiptsAwaited.keys().next().value!);
      l.receiptsAwaited.set(key, seen.arrivedAt ?? arrivedAt);
      this.armFollow(l);
    }
    if (lane) this.onLaneInfo(l, lane);
  }

  /**
   * Progress of request `key` at `agentId` (a model that runs in units): its unit outputs are counted for
   * the attempt while no reply has come, and its partial receipt is linked and paid for no more units than
   * were delivered so, below the units asked (protocol/src/receipts.ts, `ReceiptContext.rows`).
   */
  onProgress(agentId: string, key: string, progress: ProgressMessage): void {
    const arrivedAt = Date.now();
    const seen = attemptAt(this.sent.get(key), agentId);
    if (seen && seen.reply === undefined) seen.rows = (seen.rows ?? 0) + (leadingRows(progress.outputs) ?? 0);
    const l = this.lanes.get(agentId);
    const receipt = progress.receipt;
    if (!l) {
      if (receipt) {
        this.counters.refused++;
        this.logger.warn({ agentId }, 'progress receipt from an agent without an open lane: not paid');
      }
      return;
    }
    if (progress.lane) l.grantSeen = true;
    if (receipt) {
      const context: ReceiptContext =
        requestIdHex(receipt.requestId) === key
          ? { ...this.contextOf(key, agentId), reply: 'progress', arrivedAt, outputHash: hashTensorMap(progress.outputs) }
          : { asked: false };
      // Progress after the reply (or for a request never sent) brings nothing the payer owes.
      if (seen?.reply !== undefined) context.reply = undefined;
      // What the receipt charged comes out of the agent's reservation for the request (and is billed now).
      if (requestIdHex(receipt.requestId) === key && Number.isSafeInteger(receipt.price)) this.unhold(l, key, Math.max(0, receipt.price));
      this.take(l, receipt, context);
    }
    if (progress.lane) this.onLaneInfo(l, progress.lane);
  }

  /**
   * Receipts the agent sends after the answers they stand for, or again after a resync. One for a request whose reply is still due (asked, not
   * answered, deadline not passed) is not linked yet: the batch may have overtaken the reply, and linked
   * now it would be refused as 'no-reply' for an answer the app is about to get. It and the receipts after
   * it wait for that reply, or for the deadline, whichever comes first.
   */
  onReceiptBatch(agentId: string, batch: ReceiptBatch): void {
    if (batch.payer !== this.payer) return;
    this.onReceipts(agentId, batch.receipts);
    const l = this.lanes.get(agentId);
    if (l) this.onLaneInfo(l, batch.lane);
  }

  /** Receipts that came after their answers: a batch's, or those an answer carries for earlier ones (`earlier`). */
  onReceipts(agentId: string, receipts: readonly SignedReceipt[]): void {
    const l = this.lanes.get(agentId);
    if (!l) return;
    for (const receipt of receipts) {
      const key = requestIdHex(receipt.requestId);
      const context = this.contextOf(key, agentId);
      this.take(l, receipt, context, this.replyDue(context) ? key : undefined);
      // The receipt of an answer already here bills what was held for it.
      if (context.reply !== undefined) this.unhold(l, key);
    }
  }

  /**
   * The payer asked for the request and its reply may still come in time. While closing too, until its wait for
   * replies and receipts ends (`close`): the SDK takes the payment side of replies until its lanes are closed.
   */
  private replyDue(context: ReceiptContext): boolean {
    return (
      !this.closeWaited && context.asked && context.reply === undefined && context.deadline !== undefined && Date.now() <= context.deadline
    );
  }

  private contextOf(key: string, agentId: string): ReceiptContext {
    const s = this.sent.get(key);
    const a = attemptAt(s, agentId);
    if (!s || !a) return { asked: false };
    return {
      asked: true,
      deadline: s.deadline,
      inputHash: this.inputHashOf(s),
      units: s.units,
      rows: a.rows ?? 0,
      ...(a.outputHash ? { outputHash: a.outputHash } : {}),
      ...(a.reply ? { reply: a.reply, arrivedAt: a.arrivedAt! } : {}),
      ...(a.cancelled ? { cancelled: true } : {}),
      ...(a.refusedOutputs ? { refusedOutputs: true } : {}),
    };
  }

  /**
   * Links a receipt (or holds it until the gap before it is filled, or until the reply to request
   * `awaiting` comes) and pays it when it is owed.
   */
  private take(lane: Lane, receipt: SignedReceipt, context: ReceiptContext, awaiting?: string): void {
    if (lane.broken) return;
    if (awaiting !== undefined && Number.isSafeInteger(receipt.seq) && receipt.seq > lane.verifier.state.seq) {
      if (lane.ahead.size < MAX_AHEAD && !lane.ahead.has(receipt.seq)) lane.ahead.set(receipt.seq, { receipt, context, awaiting });
      this.armAwait(lane, context.deadline);
      return;
    }
    let linked: LinkedReceipt;
    try {
      linked = lane.verifier.link(receipt, context);
    } catch (err) {
      const reason = (err as MeshError).details?.reason;
      if (reason === 'replayed') return;
      if (reason === 'seq' && Number.isSafeInteger(receipt.seq) && receipt.seq > lane.verifier.state.seq) {
        if (lane.ahead.size < MAX_AHEAD) lane.ahead.set(receipt.seq, { receipt, context });
        // Nothing is missing when the next receipt is here, only waiting for its reply.
        if (!lane.ahead.get(lane.verifier.state.seq + 1)?.awaiting) this.resync(lane);
        return;
      }
      // The agent broke its own chain: nothing after this can be checked, so nothing after this is paid.
      lane.broken = (err as Error).message;
      this.counters.refused++;
      this.logger.warn({ agentId: lane.agentId, err: lane.broken }, 'lane broken: not paying this agent any more');
      return;
    }
    this.counters.receipts++;
    lane.resyncRetries = 0;
    const key = requestIdHex(receipt.requestId);
    lane.receiptsAwaited.delete(key);
    // The attempt's last receipt: the request may be forgotten (a partial receipt is followed by its final one).
    if (context.asked && receipt.status !== RECEIPT_STATUS.partial) {
      const s = this.sent.get(key);
      const a = attemptAt(s, lane.agentId);
      if (a) {
        a.over = true;
        this.forgetIfOver(key, s!);
      }
    }
    if (linked.payable) lane.pendingLeaves.push(linked.leaf.slice());
    else {
      if (linked.reason === 'late' && linked.price > 0 && lane.late.length < MAX_LATE)
        lane.late.push({ seq: receipt.seq, leaf: linked.leaf.slice(), price: linked.price });
      lane.refused++;
      lane.lastRefusal = linked.reason;
      this.counters.refused++;
      this.logger.info(
        { agentId: lane.agentId, seq: receipt.seq, requestId: requestIdHex(receipt.requestId), reason: linked.reason },
        'receipt linked, not paid',
      );
    }
    // Linked with its reply: a copy held from a resync batch is done with.
    lane.ahead.delete(receipt.seq);
    // A lane that owes nothing is never paid, so its signatures are checked in batches all the same.
    if (lane.verifier.unchecked >= MAX_UNCHECKED) this.checkSignatures(lane);
    if (lane.broken) return;
    // Receipts held after a gap may link now.
    if (this.linkAhead(lane)) return;
    // Held receipts remain behind a gap (the next one is missing, not waiting for its reply): ask for it.
    if (lane.ahead.size > 0 && !lane.ahead.has(lane.verifier.state.seq + 1)) this.resync(lane, true);
    this.schedule(lane);
  }

  /**
   * The signature check of every receipt linked since the last one (protocol/src/receipts.ts,
   * `checkSignatures`: one Ed25519 verification covers them through the hash chain). Receipts no valid
   * signature covers are taken out of what is owed and of the next voucher's leaves, and the lane breaks.
   */
  private checkSignatures(lane: Lane): void {
    const check = lane.verifier.checkSignatures();
    if (check.ok) return;
    lane.pendingLeaves.length -= check.unpaid;
    lane.broken = `receipt ${check.seq} and those after it are not signed by the agent`;
    this.counters.refused++;
    this.logger.warn(
      { agentId: lane.agentId, seq: check.seq, unpaid: check.unpaid },
      'lane broken: a receipt the agent did not sign; not paying this agent any more',
    );
  }

  /** Links the next held receipt, unless it still waits for its reply; whether it did. */
  private linkAhead(lane: Lane): boolean {
    const next = lane.ahead.get(lane.verifier.state.seq + 1);
    if (!next) return false;
    let context = next.context;
    if (next.awaiting !== undefined) {
      context = this.contextOf(next.awaiting, lane.agentId);
      if (this.replyDue(context)) {
        this.armAwait(lane, context.deadline);
        return false;
      }
    }
    lane.ahead.delete(next.receipt.seq);
    this.take(lane, next.receipt, context);
    // The receipt of an answer already here bills what was held for it.
    if (next.awaiting !== undefined && context.reply !== undefined) this.unhold(lane, next.awaiting);
    return true;
  }

  /** Links what waits for a reply once its deadline has passed (the reply, if it came, is in its context then). */
  private armAwait(lane: Lane, deadline: number | undefined): void {
    // Closing links what still waits at the end of its own wait.
    if (lane.awaitTimer || deadline === undefined || this.closing) return;
    lane.awaitTimer = setTimeout(
      () => {
        lane.awaitTimer = undefined;
        if (!this.linkAhead(lane)) this.schedule(lane);
      },
      Math.max(0, deadline - Date.now()) + 1,
    );
    lane.awaitTimer.unref?.();
  }

  /**
   * A voucher waits `voucherDelayMs` for more receipts, unless the window is half used by what is owed, or
   * what is owed plus what is held for attempts in flight leaves no room for one more of the dearest
   * requests, or a request waits for room: then it is signed at once, so that the pipeline does not stall.
   */
  private schedule(lane: Lane): void {
    if (this.shut || (lane.verifier.state.payable ?? 0) <= lane.paid) return;
    if (this.voucherDue(lane)) this.startPump(lane);
    else lane.timer ??= setTimeout(() => this.startPump(lane), this.voucherDelayMs);
  }

  /** Whether the lane's next voucher is signed now rather than after `voucherDelayMs` (see `schedule`). */
  private voucherDue(lane: Lane): boolean {
    const credit = lane.quote.creditMicros;
    if (credit === undefined) return true;
    for (const agents of this.roomWaiters.values()) if (agents.includes(lane.agentId)) return true;
    const unpaid = (lane.verifier.state.payable ?? 0) - lane.paid;
    const dearest = Math.max(0, ...lane.quote.models.map((m) => maxRequestMicros(m)));
    return 2 * unpaid >= credit || this.billedOf(lane) - lane.paid + lane.heldMicros + dearest > credit;
  }

  /** The agent's view of the lane: receipts this client has not seen are asked for; a voucher it lacks is sent again. */
  private onLaneInfo(lane: Lane, info: LaneInfo): void {
    if (info.seq > lane.verifier.state.seq + lane.ahead.size) this.resync(lane);
    // What the agent says it holds stops the voucher riding along; never above what this client signed.
    if (Number.isSafeInteger(info.paid)) lane.agentPaid = Math.min(lane.paid, Math.max(lane.agentPaid, info.paid));
    const now = Date.now();
    if (lane.voucher && info.paid < lane.paid && !lane.signing && now - lane.voucherResentAt >= RETRY_SPACING_MS) {
      lane.voucherResentAt = now;
      this.counters.vouchersResent++;
      this.publish(topics.agentVoucher(lane.agentId, this.clientId), encodeMessage(lane.voucher));
    }
  }

  /** Whether an answer on `lane` has waited RECEIPT_FOLLOW_MS for its receipt (the oldest comes first). */
  private receiptsOverdue(lane: Lane): boolean {
    if (this.receiptsDue(lane) === 0) return false;
    return lane.receiptsAwaited.values().next().value! <= Date.now() - RECEIPT_FOLLOW_MS;
  }

  /** Receipts this lane waits for that an ask could bring: one missing before held ones, or one overdue. */
  private receiptsMissing(lane: Lane): boolean {
    return (lane.ahead.size > 0 && !lane.ahead.has(lane.verifier.state.seq + 1)) || this.receiptsOverdue(lane);
  }

  /**
   * Asks for the receipts of answers that came without them once RECEIPT_FOLLOW_MS has passed (`resync`, whose
   * retries, MAX_RESYNC_RETRIES of them, go on while they stay missing), and again for answers that came later, once
   * a receipt has linked since. One timer per lane, while receipts are awaited.
   */
  private armFollow(lane: Lane): void {
    if (lane.followTimer || this.closing) return;
    lane.followTimer = setTimeout(() => {
      lane.followTimer = undefined;
      if (lane.broken || this.closing) return;
      if (this.receiptsOverdue(lane) && !lane.resyncRetryTimer && lane.resyncRetries < MAX_RESYNC_RETRIES) this.resync(lane);
      if (this.receiptsDue(lane) > 0) this.armFollow(lane);
    }, RECEIPT_FOLLOW_MS);
    lane.followTimer.unref?.();
  }

  /**
   * Asks the agent for the receipts after the lane's last, at most every RETRY_SPACING_MS. With `defer`, an
   * ask within the spacing is deferred to its end (one at most), not dropped: the event that wanted it may
   * be the last one for a while (a gap left behind when receipts were linked). Only linking defers, never
   * a lane info or a batch, so an agent that does not fill the gap cannot keep a lane asking for ever.
   */
  private resync(lane: Lane, defer = false): void {
    // Nothing after a break is linked or paid: the receipts would be dropped as they came.
    if (lane.broken) return;
    const now = Date.now();
    if (now - lane.resyncSentAt < RETRY_SPACING_MS) {
      if (defer && !lane.resyncTimer && !this.closing) {
        lane.resyncTimer = setTimeout(
          () => {
            lane.resyncTimer = undefined;
            if (!lane.broken && lane.ahead.size > 0 && !lane.ahead.has(lane.verifier.state.seq + 1)) this.resync(lane);
          },
          RETRY_SPACING_MS - (now - lane.resyncSentAt),
        );
        lane.resyncTimer.unref?.();
      }
      return;
    }
    lane.resyncSentAt = now;
    this.counters.resyncs++;
    this.publish(
      topics.agentVoucher(lane.agentId, this.clientId),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'resync', payer: this.payer, afterSeq: lane.verifier.state.seq }),
    );
    if (!lane.resyncRetryTimer && !this.closing && lane.resyncRetries < MAX_RESYNC_RETRIES) {
      lane.resyncRetryTimer = setTimeout(
        () => {
          lane.resyncRetryTimer = undefined;
          if (lane.broken || this.closing || !this.receiptsMissing(lane)) return;
          lane.resyncRetries++;
          this.resync(lane);
        },
        RESYNC_RETRY_MS * 2 ** lane.resyncRetries,
      );
      lane.resyncRetryTimer.unref?.();
    }
  }

  private startPump(lane: Lane): void {
    clearTimeout(lane.timer);
    lane.timer = undefined;
    if (this.shut || lane.signing || (lane.verifier.state.payable ?? 0) <= lane.paid) return;
    const run = this.pump(lane).catch((err: unknown) => {
      lane.signFailures++;
      this.logger.error({ agentId: lane.agentId, err: (err as Error).message, failures: lane.signFailures }, 'voucher not signed');
      // Tried again later, whether or not another receipt comes to prompt it: each time twice as late (a signer
      // that keeps refusing, a user declining a wallet prompt, is not asked every half second), and without
      // keeping the process alive for it.
      if (!this.closing && !lane.broken && (lane.verifier.state.payable ?? 0) > lane.paid && !lane.timer) {
        const delay = Math.min(MAX_SIGN_RETRY_MS, Math.max(this.voucherDelayMs, RETRY_SPACING_MS) * 2 ** (lane.signFailures - 1));
        lane.timer = setTimeout(() => this.startPump(lane), delay);
        lane.timer.unref?.();
      }
    });
    this.pumping.add(run);
    void run.finally(() => this.pumping.delete(run));
  }

  /**
   * Signs and sends vouchers for everything owed when it is called, waiting ones included; resolves once they are
   * out, or when a round of signing pays nothing more (a voucher that could not be signed is tried again later).
   * Receipts linked meanwhile keep their own pace.
   */
  async flush(): Promise<void> {
    const owed = new Map<Lane, number>();
    for (const lane of this.lanes.values()) {
      const payable = lane.verifier.state.payable ?? 0;
      if (payable > lane.paid) owed.set(lane, payable);
    }
    for (;;) {
      let paidBefore = 0;
      for (const [lane, target] of owed) {
        // A broken lane is paid what it owed before the break, as its voucher timer would have paid it.
        if (lane.paid >= target) owed.delete(lane);
        else {
          paidBefore += lane.paid;
          this.startPump(lane);
        }
      }
      if (owed.size === 0 || this.pumping.size === 0) return;
      await Promise.allSettled([...this.pumping]);
      let paidAfter = 0;
      for (const lane of owed.keys()) paidAfter += lane.paid;
      if (paidAfter === paidBefore) return;
    }
  }

  /** Whether this client owes `agentId` for accepted receipts not yet paid by a voucher it sent. */
  owes(agentId: string): boolean {
    const lane = this.lanes.get(agentId);
    return lane !== undefined && (lane.verifier.state.payable ?? 0) > lane.paid;
  }

  /**
   * Receipts held for a reply that may still come in time, plus resyncs deferred to the end of their
   * spacing: work this client will do by itself within a deadline, without any message arriving.
   */
  awaiting(): number {
    let n = 0;
    for (const lane of this.lanes.values()) {
      // Past its deadline, a receipt that waited for its reply waits only for the gap before it, like any other.
      for (const a of lane.ahead.values()) if (a.awaiting !== undefined && Date.now() <= (a.context.deadline ?? 0)) n++;
      if (lane.resyncTimer) n++;
    }
    return n;
  }

  /** Answers on `lane` whose receipts have not come, in the last REMEMBER_SENT_MS. */
  private receiptsDue(lane: Lane): number {
    const forget = Date.now() - REMEMBER_SENT_MS;
    for (const [key, at] of lane.receiptsAwaited) {
      if (at > forget) break;
      lane.receiptsAwaited.delete(key);
    }
    return lane.receiptsAwaited.size;
  }

  /** Resolves once no answered attempt waits for its receipt (true), or after `timeoutMs` (false). */
  async receiptsIn(timeoutMs: number): Promise<boolean> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const due = [...this.lanes.values()].some((l) => !l.broken && this.receiptsDue(l) > 0);
      if (!due) return true;
      if (Date.now() >= until) return false;
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
  }

  /** Resolves once every lane being opened is open (or refused). */
  async ready(): Promise<void> {
    while (this.opening.size > 0) await Promise.allSettled([...this.opening.values()]);
  }

  lanesView(): LaneView[] {
    return [...this.lanes.values()].map((l) => ({
      agentId: l.agentId,
      payer: this.payer,
      payout: l.quote.payout,
      receipts: l.verifier.state.seq,
      held: l.ahead.size,
      receiptsDue: this.receiptsDue(l),
      owedMicros: l.verifier.state.payable ?? 0,
      billedMicros: l.verifier.state.cumulative,
      paidMicros: l.paid,
      feeMicros: l.fee,
      spentMicros: l.paid + l.fee,
      refused: l.refused,
      lateRepaid: l.lateRepaid,
      lastRefusal: l.lastRefusal,
      broken: l.broken,
    }));
  }

  /** Agents this client will not pay, with why. */
  refusedView(): { agentId: string; reason: string }[] {
    return [...this.refusedAgents].map(([agentId, reason]) => ({ agentId, reason }));
  }

  /**
   * Waits for vouchers being signed, then closes the store. A receipt held behind a gap (one before it was
   * lost) is linked only when the gap fills, and what is held in memory is gone after a restart: the
   * receipts are asked for again and awaited for up to `CLOSE_GAP_WAIT_MS` first, so that closing does not
   * leave unpaid an answer the app got.
   */
  async close(): Promise<void> {
    await this.ready();
    this.closing = true;
    // Requests waiting for credit give up now (the client is closing), not at their deadlines.
    this.wakeRoomWaiters();
    for (const lane of this.lanes.values()) {
      clearTimeout(lane.awaitTimer);
      lane.awaitTimer = undefined;
      clearTimeout(lane.resyncTimer);
      lane.resyncTimer = undefined;
      clearTimeout(lane.resyncRetryTimer);
      lane.resyncRetryTimer = undefined;
      clearTimeout(lane.followTimer);
      lane.followTimer = undefined;
      while (this.linkAhead(lane));
      for (const h of lane.held.values()) clearTimeout(h.timer);
      this.schedule(lane);
    }
    const until = Date.now() + CLOSE_GAP_WAIT_MS;
    for (;;) {
      const gaps = [...this.lanes.values()].filter((l) => l.ahead.size > 0 && !l.broken);
      // Receipts of answers already in are on their way: they are waited for as well.
      const due = [...this.lanes.values()].some((l) => !l.broken && this.receiptsDue(l) > 0);
      if ((gaps.length === 0 && !due) || Date.now() >= until) break;
      for (const lane of this.lanes.values()) if (!lane.broken && (lane.ahead.size > 0 || this.receiptsOverdue(lane))) this.resync(lane);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    // The wait is over: a receipt still waiting for its answer is linked as things stand (no answer: not paid), so
    // that the receipts behind it, for answers the app got, are paid now and not only by a later run.
    this.closeWaited = true;
    for (const lane of this.lanes.values()) while (!lane.broken && this.linkAhead(lane));
    await this.flush();
    // Nothing is signed after this: a reply that comes before the connection closes may still link its receipt, which
    // goes unpaid (a closed client prompts no wallet and sends nothing).
    this.shut = true;
    // Nothing runs after the store is closed: a voucher wait left by a lane the flush did not owe.
    for (const lane of this.lanes.values()) {
      clearTimeout(lane.timer);
      lane.timer = undefined;
    }
    // Receipts still held behind a gap are stored with what this client knew of their requests: the lanes
    // opened next link them, as this instance would have, when the agent sends the missing ones again.
    for (const lane of this.lanes.values()) if (lane.ahead.size > 0 && !lane.broken) await this.save(lane, []);
    await this.db?.close();
  }

  private async pump(lane: Lane): Promise<void> {
    lane.signing = true;
    let waits = false;
    try {
      for (let first = true; ; first = false) {
        // Receipts linked while the last voucher was signed wait for more, as any others do (`schedule`):
        // under a steady stream, signing again at once would sign one voucher per few receipts.
        if (!first && !this.closing && !this.voucherDue(lane)) {
          waits = true;
          break;
        }
        // No voucher is signed over a receipt whose signature was not checked.
        this.checkSignatures(lane);
        if ((lane.verifier.state.payable ?? 0) <= lane.paid) break;
        const cumulative = lane.verifier.state.payable ?? 0;
        const seq = lane.verifier.signedSeq;
        const leaves = lane.pendingLeaves;
        lane.pendingLeaves = [];
        const receiptsRoot = merkleRoot(leaves);
        const feeCumulative = voucherFee(cumulative, this.feePpm, lane.fee);
        let sig: string;
        try {
          // Stored before signing: a restart never signs for receipts it could not check again.
          await this.save(lane, leaves);
          sig = await signVoucher(this.options.signer, this.options.domain, {
            agent: lane.quote.payout,
            cumulative: BigInt(cumulative),
            receiptsRoot: toHex(receiptsRoot),
            feeCumulative: BigInt(feeCumulative),
          });
        } catch (err) {
          // The next voucher covers these receipts: its root is over their leaves too.
          lane.pendingLeaves = leaves.concat(lane.pendingLeaves);
          throw err;
        }
        lane.signFailures = 0;
        const message: VoucherMessage = {
          v: PROTOCOL_VERSION,
          kind: 'voucher',
          payer: this.payer,
          agent: lane.quote.payout,
          cumulative,
          receiptsRoot,
          feeCumulative,
          sig: fromHex(sig),
          seq,
        };
        lane.paid = cumulative;
        lane.fee = feeCumulative;
        lane.voucher = message;
        await this.save(lane, []);
        this.counters.vouchers++;
        this.publish(topics.agentVoucher(lane.agentId, this.clientId), encodeMessage(message));
        this.wakeRoomWaiters();
      }
    } finally {
      lane.signing = false;
    }
    if (waits) this.schedule(lane);
  }

  private async save(lane: Lane, inFlightLeaves: Uint8Array[]): Promise<void> {
    if (!this.db) return;
    const v = lane.voucher;
    const s = lane.verifier.state;
    // Request ids added since the last save get the next ordinals; those the verifier has let go are deleted.
    const store = { ...lane.closedStore };
    const ops: ({ type: 'put'; key: string; value: StoredLane | string } | { type: 'del'; key: string })[] = [];
    const from = store.last === undefined ? 0 : s.closed.lastIndexOf(store.last) + 1;
    for (const id of s.closed.slice(from)) ops.push({ type: 'put', key: closedKey(lane.agentId, store.next++), value: id });
    for (; store.low < store.next - s.closed.length; store.low++) ops.push({ type: 'del', key: closedKey(lane.agentId, store.low) });
    store.last = s.closed.at(-1);
    ops.push({
      type: 'put',
      key: lane.agentId,
      value: this.storedLane(lane, v, s, inFlightLeaves),
    });
    await this.db.batch(ops);
    lane.closedStore = store;
  }

  private storedLane(lane: Lane, v: VoucherMessage | undefined, s: LaneState, inFlightLeaves: Uint8Array[]): StoredLane {
    return {
      payout: lane.quote.payout,
      agentKey: toHex(lane.quote.agentKey),
      // A copy taken now: the lane goes on linking while the write is under way, and the unchecked
      // receipts stored must be the ones whose leaves are stored beside them. The request ids are stored apart.
      state: { ...s, open: { ...s.open }, closed: [], unchecked: [...(s.unchecked ?? [])] },
      paid: lane.paid,
      pendingLeaves: [...inFlightLeaves, ...lane.pendingLeaves].map(toHex),
      voucher: v ? { ...v, receiptsRoot: toHex(v.receiptsRoot), sig: toHex(v.sig) } : undefined,
      grant: lane.grant ? { ...lane.grant, sig: toHex(lane.grant.sig) } : undefined,
      // A receipt that waited for its answer is stored with what is known of that answer now: one that came while
      // the lanes closed makes it payable after the restart.
      ahead: [...lane.ahead.values()].map((a) =>
        storeAhead(a.awaiting !== undefined ? { ...a, context: this.contextOf(a.awaiting, lane.agentId) } : a),
      ),
    };
  }
}

/** A new lane's ClosedStore: a resumed lane's ids are those stored; otherwise they are all to be replaced. */
function closedStoreOf(stored: ClosedStore | undefined, resumed: boolean): ClosedStore {
  if (!stored) return { low: 0, next: 0, last: undefined };
  return resumed ? { ...stored } : { low: stored.low, next: stored.next, last: undefined };
}

function storeAhead({ receipt, context }: Ahead): StoredAhead {
  const { inputHash, outputHash, ...rest } = context;
  return {
    receipt: encodeCbor(receipt).toString('base64'),
    context: { ...rest, ...(inputHash ? { inputHash: toHex(inputHash) } : {}), ...(outputHash ? { outputHash: toHex(outputHash) } : {}) },
  };
}

function restoreAhead(stored: StoredAhead): Ahead {
  const { inputHash, outputHash, ...rest } = stored.context;
  return {
    receipt: decodeCbor(Buffer.from(stored.receipt, 'base64')) as SignedReceipt,
    context: {
      ...rest,
      ...(inputHash ? { inputHash: fromHex(inputHash) } : {}),
      ...(outputHash ? { outputHash: fromHex(outputHash) } : {}),
    },
  };
}
