/**
 * The agent's side of payment: a signed quote, a receipt per request a payer's lane takes on, the
 * receipt journal and the best voucher per lane in `level`, and the credit window.
 *
 * - Journal: every receipt and its lane's new head are written in one batch, and the reply that
 *   carries the receipt is published only after that batch is written. Batches are group-committed:
 *   receipts issued while a write is running go together in the next one, so `syncWrites` (fsync per
 *   batch) costs one fsync per burst, not per request.
 * - Credit window: a lane is served while what it owes (receipts issued, plus the full ok price of
 *   requests it has running) minus what its best voucher pays stays within `creditRequests` ok prices
 *   of the agent's dearest model (or `creditMicros`). Beyond it the request is answered MESH_CREDIT_EXCEEDED and costs nothing.
 * - A lane is bound to the mesh id (broker-authenticated) that first named its payer; others naming
 *   the same payer are refused MESH_FORBIDDEN, and so is a client past `maxLanesPerClient` lanes.
 *   Vouchers must recover to the lane's payer.
 */
import path from 'node:path';
import { recoverVoucherSigner } from '@edge-mesh/contracts';
import {
  decodeCbor,
  type EscrowDomain,
  encodeCbor,
  fromHex,
  type Identity,
  MeshError,
  type ModelPrice,
  RECEIPT_STATUS,
  RECEIPT_VERSION,
  receiptPriceMicros,
  type SignedQuote,
  type SignedReceipt,
  signQuote,
  signReceipt,
  toHex,
  type VoucherMessage,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import { Level } from 'level';
import type { Logger } from 'pino';
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
   * Payer lanes one client may open (default 4). Each lane may owe up to the credit window, so this
   * bounds what one admitted client can leave unpaid; a client naming fresh payers cannot multiply it.
   */
  maxLanesPerClient?: number;
  /** Run the settlement relayer (edge-agent/settler.ts): settle the best vouchers on chain by its policy. */
  settle?: SettlerOptions;
}

interface StoredVoucher {
  cumulative: number;
  receiptsRoot: string;
  feeCumulative: number;
  sig: string;
}

interface Lane {
  payer: string;
  senderId: string;
  seq: number;
  cumulative: number;
  lastLeaf: string;
  /** Cumulative amount of the best voucher. */
  paid: number;
  voucher: StoredVoucher | undefined;
}

export interface LaneSummary {
  payer: string;
  senderId: string;
  receipts: number;
  owedMicros: number;
  paidMicros: number;
  /** Ok prices reserved for requests still running. */
  reservedMicros: number;
  voucher: StoredVoucher | undefined;
}

/** What the agent holds for a paying request between admission and its receipt. */
export interface PaidJob {
  payer: string;
  price: ModelPrice;
  reservedMicros: number;
  inputHash: Uint8Array;
}

export interface ReceiptFacts {
  requestId: Uint8Array;
  status: number;
  unitsUsed: number;
  outputHash: Uint8Array;
  startedAt: number;
  finishedAt: number;
}

const LANE_PREFIX = 'lane!';
const RECEIPT_PREFIX = 'rcpt!';
const receiptKey = (payer: string, seq: number) => `${RECEIPT_PREFIX}${payer}!${String(seq).padStart(16, '0')}`;

export class AgentPayments {
  readonly payout: string;
  readonly domain: EscrowDomain;
  private readonly chainId: number;
  private readonly escrow: string;
  private readonly creditMicros: number;
  private readonly quoteTtlMs: number;
  private readonly sync: boolean;
  private readonly lanes = new Map<string, Lane>();
  private readonly lanesPerClient = new Map<string, number>();
  private readonly maxLanesPerClient: number;
  private readonly reserved = new Map<string, number>();
  /** The best voucher per lane that is on disk: only these are settled, so a crash never forgets one that was sent. */
  private readonly durableVouchers = new Map<string, StoredVoucher>();
  private readonly prices = new Map<string, ModelPrice>();
  private quote: { signed: SignedQuote; renewAt: number } | undefined;
  private pendingOps: { type: 'put'; key: string; value: unknown }[] = [];
  private pendingWaiters: { resolve: () => void; reject: (err: unknown) => void }[] = [];
  private writing = false;
  counters = { receipts: 0, vouchers: 0, vouchersRefused: 0, creditRefusals: 0 };

  private constructor(
    private readonly identity: Identity,
    private readonly db: Level<string, unknown>,
    options: AgentPaymentOptions,
    models: { name: string; sha256: string; priceMicros: number }[],
    private readonly logger: Logger,
  ) {
    this.payout = options.payout.toLowerCase();
    this.domain = options.domain;
    this.chainId = Number(options.domain.chainId);
    this.escrow = options.domain.escrow.toLowerCase();
    this.quoteTtlMs = options.quoteTtlMs ?? 86_400_000;
    this.sync = options.syncWrites ?? false;
    this.maxLanesPerClient = options.maxLanesPerClient ?? 4;
    for (const m of models) {
      const o = options.prices?.[m.name] ?? {};
      this.prices.set(m.name, {
        name: m.name,
        modelHash: `0x${m.sha256}`,
        baseMicros: o.baseMicros ?? 0,
        unitMicros: o.unitMicros ?? m.priceMicros,
        minChargeMicros: o.minChargeMicros ?? 0,
      });
    }
    const dearest = Math.max(0, ...[...this.prices.values()].map((p) => receiptPriceMicros(p, RECEIPT_STATUS.ok, 1)));
    this.creditMicros = options.creditMicros ?? (options.creditRequests ?? 8) * dearest;
  }

  static async open(
    identity: Identity,
    options: AgentPaymentOptions,
    models: { name: string; sha256: string; priceMicros: number }[],
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
    if (problems.length) throw new MeshError('MESH_CONFIG', `invalid payment options: ${problems.join('; ')}`);
    // Keyed by chain and escrow, so a fresh local chain never mixes with old lanes.
    const location = path.join(options.dataDir, `payments-${options.domain.chainId}-${options.domain.escrow.toLowerCase()}`);
    const db = new Level<string, unknown>(location, { valueEncoding: 'json' });
    await db.open();
    const payments = new AgentPayments(identity, db, options, models, logger);
    for await (const [key, value] of db.iterator({ gte: LANE_PREFIX, lt: `${LANE_PREFIX}~` })) {
      const lane = value as Lane;
      payments.lanes.set(key.slice(LANE_PREFIX.length), lane);
      if (lane.voucher) payments.durableVouchers.set(lane.payer, lane.voucher);
      payments.lanesPerClient.set(lane.senderId, (payments.lanesPerClient.get(lane.senderId) ?? 0) + 1);
    }
    return payments;
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
   * Admits a paying request: the lane must be this sender's and within its credit window. Reserves the
   * model's ok price until the receipt is issued (or `release`). Throws MESH_FORBIDDEN or MESH_CREDIT_EXCEEDED.
   */
  admit(payerAddress: string, senderId: string, model: string, inputHash: Uint8Array): PaidJob {
    const payer = payerAddress.toLowerCase();
    const price = this.prices.get(model);
    if (!price) throw new MeshError('MESH_UNKNOWN_MODEL', `model ${model} has no price here`);
    let lane = this.lanes.get(payer);
    if (lane && lane.senderId !== senderId) {
      throw new MeshError('MESH_FORBIDDEN', `the lane of payer ${payer} belongs to another client`, { details: { payer } });
    }
    if (!lane) {
      const open = this.lanesPerClient.get(senderId) ?? 0;
      if (open >= this.maxLanesPerClient) {
        throw new MeshError('MESH_FORBIDDEN', `client ${senderId} already has ${open} payer lanes here (the limit)`, {
          details: { payer },
        });
      }
      this.lanesPerClient.set(senderId, open + 1);
      lane = { payer, senderId, seq: 0, cumulative: 0, lastLeaf: toHex(ZERO_HASH), paid: 0, voucher: undefined };
      this.lanes.set(payer, lane);
    }
    const okPrice = receiptPriceMicros(price, RECEIPT_STATUS.ok, 1);
    const reserved = this.reserved.get(payer) ?? 0;
    const unpaid = lane.cumulative + reserved - lane.paid;
    if (okPrice > 0 && unpaid + okPrice > this.creditMicros) {
      this.counters.creditRefusals++;
      throw new MeshError(
        'MESH_CREDIT_EXCEEDED',
        `lane of ${payer} owes ${unpaid} micro-dollars unpaid; the credit window is ${this.creditMicros}: send a voucher`,
        {
          details: { payer, unpaidMicros: unpaid, paidMicros: lane.paid },
        },
      );
    }
    this.reserved.set(payer, reserved + okPrice);
    return { payer, price, reservedMicros: okPrice, inputHash };
  }

  /** Gives back a reservation for a request that was refused before it was taken on (no receipt). */
  release(job: PaidJob): void {
    this.reserved.set(job.payer, Math.max(0, (this.reserved.get(job.payer) ?? 0) - job.reservedMicros));
  }

  /**
   * Signs the next receipt of the job's lane and journals it. The receipt is final at once (seq,
   * chain); `durable` resolves when it is written, and only then may it leave the agent.
   */
  issue(job: PaidJob, facts: ReceiptFacts): { receipt: SignedReceipt; durable: Promise<void> } {
    this.release(job);
    const lane = this.lanes.get(job.payer)!;
    const price = receiptPriceMicros(job.price, facts.status, facts.unitsUsed);
    const { receipt, leaf } = signReceipt(this.identity, {
      v: RECEIPT_VERSION,
      chainId: this.chainId,
      escrow: this.escrow,
      payer: job.payer,
      agentKey: this.identity.publicKey,
      seq: lane.seq + 1,
      requestId: facts.requestId,
      modelHash: fromHex(job.price.modelHash),
      inputHash: job.inputHash,
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
    const durable = this.write([
      { type: 'put', key: receiptKey(job.payer, receipt.seq), value: Buffer.from(encodeCbor(receipt)).toString('base64') },
      { type: 'put', key: LANE_PREFIX + job.payer, value: { ...lane } },
    ]);
    return { receipt, durable };
  }

  /**
   * Takes a voucher from `senderId`: it must be for this payout, on the sender's lane, higher
   * than the best one and signed by the lane's payer. Returns whether it became the best; resolves once stored.
   */
  async acceptVoucher(senderId: string, message: VoucherMessage): Promise<boolean> {
    const refuse = (why: string) => {
      this.counters.vouchersRefused++;
      this.logger.warn({ senderId, payer: message.payer, cumulative: message.cumulative, why }, 'voucher refused');
      return false;
    };
    const lane = this.lanes.get(message.payer);
    if (!lane || lane.senderId !== senderId) return refuse('no lane of this payer for this sender');
    if (message.agent !== this.payout) return refuse('voucher pays another payout address');
    if (message.cumulative <= lane.paid) return false;
    let signer: string;
    try {
      signer = recoverVoucherSigner(
        this.domain,
        {
          agent: this.payout,
          cumulative: BigInt(message.cumulative),
          receiptsRoot: toHex(message.receiptsRoot),
          feeCumulative: BigInt(message.feeCumulative ?? 0),
        },
        toHex(message.sig),
      );
    } catch (err) {
      return refuse(`unreadable signature: ${(err as Error).message}`);
    }
    if (signer.toLowerCase() !== lane.payer) return refuse(`signed by ${signer}, not the payer`);
    lane.paid = message.cumulative;
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

  lanesSummary(): LaneSummary[] {
    return [...this.lanes.values()].map((l) => ({
      payer: l.payer,
      senderId: l.senderId,
      receipts: l.seq,
      owedMicros: l.cumulative,
      paidMicros: l.paid,
      reservedMicros: this.reserved.get(l.payer) ?? 0,
      voucher: l.voucher,
    }));
  }

  /** Each lane's best voucher that is already stored: what a settler may send. */
  durableVoucherLanes(): { payer: string; voucher: StoredVoucher | undefined }[] {
    return [...this.durableVouchers].map(([payer, voucher]) => ({ payer, voucher }));
  }

  /** The journal of one lane, in seq order. */
  async receipts(payerAddress: string): Promise<SignedReceipt[]> {
    const payer = payerAddress.toLowerCase();
    const out: SignedReceipt[] = [];
    for await (const value of this.db.values({ gte: `${RECEIPT_PREFIX}${payer}!`, lt: `${RECEIPT_PREFIX}${payer}!~` })) {
      out.push(decodeCbor(Buffer.from(value as string, 'base64')) as SignedReceipt);
    }
    return out;
  }

  async close(): Promise<void> {
    while (this.writing || this.pendingOps.length > 0) await new Promise((r) => setTimeout(r, 5));
    await this.db.close();
  }

  /** Group commit: every op queued while a batch is written goes in the next batch. */
  private write(ops: { type: 'put'; key: string; value: unknown }[]): Promise<void> {
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
