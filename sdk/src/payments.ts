/**
 * The payer's side of payment in the SDK: per agent lane, check every receipt (LaneVerifier against
 * the agent's signed quote) and pay what was verified with an EIP-712 voucher sent to the agent.
 *
 * - Vouchers are signed one lane at a time, after the receipts they cover were verified. Receipts
 *   verified while a voucher is being signed go into the next one, and while a lane owes less than
 *   half the agent's quoted credit window its voucher waits `voucherDelayMs` for more: one signature
 *   (about 3 ms of secp256k1 in ethers) pays for many receipts. `receiptsRoot` is the Merkle root of the leaves covered since the previous
 *   voucher (one leaf: the leaf itself).
 * - A voucher is signed only when the verified cumulative rose: a failed or timed-out request
 *   (priced 0 by the rule, which the verifier enforces) never makes a voucher pay more.
 * - With `dataDir`, lane state (verifier state, last voucher, leaves not yet covered) is stored in
 *   `level` before the voucher that depends on it is signed.
 */
import path from 'node:path';
import type { MeshLogger as Logger } from '@edge-mesh/client';
import {
  type AgentStatus,
  type EscrowDomain,
  encodeMessage,
  fromHex,
  hashTensorMap,
  type LaneState,
  LaneVerifier,
  MeshError,
  merkleRoot,
  type PaymentField,
  PROTOCOL_VERSION,
  type Quote,
  type SignedReceipt,
  signVoucher,
  type TypedDataSigner,
  toHex,
  topics,
  type VoucherMessage,
  verifyQuote,
} from '@edge-mesh/protocol';

export interface PaymentOptions {
  /** The payer's EVM key; its address is the lane's first half and signs the vouchers. */
  /** An EIP-712 signer: an ethers v6 Wallet fits as it is. */
  signer: TypedDataSigner;
  /** The chain and escrow the vouchers are for; agents whose quote names another are not paid (nor asked to bill). */
  domain: EscrowDomain;
  /** Refuse (do not pay) any receipt priced above this. */
  maxPriceMicros?: number;
  /** Folder for lane state (a level store per chain id and escrow inside it). */
  dataDir?: string;
  /**
   * While a lane owes less than half the agent's quoted credit window, its voucher waits this long
   * for more receipts to cover, so one signature pays for many requests (default 50).
   */
  voucherDelayMs?: number;
}

export interface LaneView {
  agentId: string;
  payer: string;
  payout: string;
  /** Receipts verified on the lane. */
  receipts: number;
  /** What the verified receipts add up to. */
  owedMicros: number;
  /** What the latest signed voucher pays. */
  paidMicros: number;
  /** Receipts refused by the checks (not paid). */
  refused: number;
  lastRefusal: string | undefined;
}

/** The few calls made on the lane store (a `level` database, loaded only with `dataDir`). */
interface LaneStore {
  open(): Promise<void>;
  put(key: string, value: StoredLane): Promise<void>;
  iterator(): AsyncIterable<[string, StoredLane]>;
  close(): Promise<void>;
}

interface StoredLane {
  payout: string;
  agentKey: string;
  state: LaneState;
  paid: number;
  pendingLeaves: string[];
  voucher: (Omit<VoucherMessage, 'receiptsRoot' | 'sig'> & { receiptsRoot: string; sig: string }) | undefined;
}

interface Lane {
  agentId: string;
  quote: Quote;
  verifier: LaneVerifier;
  paid: number;
  pendingLeaves: Uint8Array[];
  signing: boolean;
  timer: NodeJS.Timeout | undefined;
  refused: number;
  lastRefusal: string | undefined;
  voucher: VoucherMessage | undefined;
}

/** Final request ids kept against duplicates per lane (the hash chain already refuses replayed receipts); stored with the lane. */
const REMEMBER_REQUESTS = 1024;

interface Expectation {
  deadline: number;
  inputHash: Uint8Array;
}

export class PayerLanes {
  private readonly lanes = new Map<string, Lane>();
  private readonly stored = new Map<string, StoredLane>();
  private readonly expectations = new Map<string, Expectation>();
  private readonly chainId: number;
  private readonly escrow: string;
  private readonly maxPriceMicros: number;
  private readonly voucherDelayMs: number;
  private pumping = new Set<Promise<void>>();
  counters = { receipts: 0, refused: 0, vouchers: 0 };

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
  }

  static async open(
    options: PaymentOptions,
    clientId: string,
    publish: (topic: string, payload: Buffer) => void,
    logger: Logger,
  ): Promise<PayerLanes> {
    const payer = (await options.signer.getAddress()).toLowerCase();
    let db: LaneStore | undefined;
    if (options.dataDir) {
      // Loaded on demand: an app that pays without a data folder needs no level (an optional peer dependency).
      const { Level } = await import('level').catch((cause: unknown) => {
        throw new MeshError('MESH_CONFIG', 'payment.dataDir needs the `level` package: npm install level', { cause });
      });
      db = new Level<string, StoredLane>(
        path.join(options.dataDir, `payer-${options.domain.chainId}-${options.domain.escrow.toLowerCase()}-${payer}`),
        { valueEncoding: 'json' },
      );
      await db.open();
    }
    const lanes = new PayerLanes(payer, options, clientId, db, publish, logger);
    if (db) for await (const [agentId, stored] of db.iterator()) lanes.stored.set(agentId, stored);
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
      lane.quote = quote;
      lane.verifier = new LaneVerifier({
        payer: this.payer,
        quote,
        maxPriceMicros: this.maxPriceMicros,
        state: lane.verifier.state,
        rememberRequests: REMEMBER_REQUESTS,
      });
      return;
    }
    for (const other of this.lanes.values()) {
      if (other.agentId !== agentId && other.quote.payout === quote.payout) {
        this.logger.warn(
          { agentId, payout: quote.payout, other: other.agentId },
          'payout address already used by another agent: not paying this one',
        );
        return;
      }
    }
    const stored = this.stored.get(agentId);
    const resume = stored && stored.payout === quote.payout && stored.agentKey === toHex(quote.agentKey) ? stored : undefined;
    this.lanes.set(agentId, {
      agentId,
      quote,
      verifier: new LaneVerifier({
        payer: this.payer,
        quote,
        maxPriceMicros: this.maxPriceMicros,
        rememberRequests: REMEMBER_REQUESTS,
        ...(resume ? { state: resume.state } : {}),
      }),
      paid: resume?.paid ?? 0,
      pendingLeaves: resume?.pendingLeaves.map(fromHex) ?? [],
      signing: false,
      timer: undefined,
      refused: 0,
      lastRefusal: undefined,
      voucher: resume?.voucher
        ? { ...resume.voucher, receiptsRoot: fromHex(resume.voucher.receiptsRoot), sig: fromHex(resume.voucher.sig) }
        : undefined,
    });
  }

  /** The request's payment field for this agent, when this payer pays it. */
  payField(agentId: string): PaymentField | undefined {
    return this.lanes.has(agentId) ? { payer: this.payer } : undefined;
  }

  /** Remembers what was sent, so the receipts for it (from every agent it went to) can be held to it; kept until a minute past the deadline. */
  noteRequest(key: string, deadline: number, inputs: Parameters<typeof hashTensorMap>[0]): void {
    if (this.expectations.size > 10_000) {
      const stale = Date.now() - 60_000;
      for (const [k, e] of this.expectations) if (e.deadline < stale) this.expectations.delete(k);
    }
    this.expectations.set(key, { deadline, inputHash: hashTensorMap(inputs) });
  }

  /** Checks a receipt from a reply (or error) of `agentId` and, when it verifies, has it paid. */
  onReceipt(agentId: string, requestKey: string, receipt: SignedReceipt, outputs: Parameters<typeof hashTensorMap>[0] | undefined): void {
    const lane = this.lanes.get(agentId);
    if (!lane) {
      this.counters.refused++;
      this.logger.warn({ agentId }, 'receipt from an agent without a known quote: not paid');
      return;
    }
    const expected = this.expectations.get(requestKey);
    try {
      const accepted = lane.verifier.verify(receipt, {
        ...(expected ? { deadline: expected.deadline, inputHash: expected.inputHash } : {}),
        ...(outputs ? { outputHash: hashTensorMap(outputs) } : {}),
      });
      lane.pendingLeaves.push(accepted.leaf.slice());
      this.counters.receipts++;
    } catch (err) {
      lane.refused++;
      lane.lastRefusal = (err as Error).message;
      this.counters.refused++;
      this.logger.warn({ agentId, err: (err as Error).message }, 'receipt refused: not paid');
      return;
    }
    const unpaid = lane.verifier.state.cumulative - lane.paid;
    if (unpaid <= 0) return;
    const credit = lane.quote.creditMicros;
    if (credit === undefined || 2 * unpaid >= credit) this.startPump(lane);
    else lane.timer ??= setTimeout(() => this.startPump(lane), this.voucherDelayMs);
  }

  private startPump(lane: Lane): void {
    clearTimeout(lane.timer);
    lane.timer = undefined;
    if (lane.signing || lane.verifier.state.cumulative <= lane.paid) return;
    const run = this.pump(lane).catch((err: unknown) =>
      this.logger.error({ agentId: lane.agentId, err: (err as Error).message }, 'voucher not signed'),
    );
    this.pumping.add(run);
    void run.finally(() => this.pumping.delete(run));
  }

  /** Signs and sends every voucher owed now, waiting ones included; resolves once they are out. */
  async flush(): Promise<void> {
    for (const lane of this.lanes.values()) if (lane.timer) this.startPump(lane);
    while (this.pumping.size > 0) await Promise.allSettled([...this.pumping]);
  }

  /** Whether this client owes `agentId` for verified receipts not yet paid by a voucher it sent. */
  owes(agentId: string): boolean {
    const lane = this.lanes.get(agentId);
    return lane !== undefined && lane.verifier.state.cumulative > lane.paid;
  }

  lanesView(): LaneView[] {
    return [...this.lanes.values()].map((l) => ({
      agentId: l.agentId,
      payer: this.payer,
      payout: l.quote.payout,
      receipts: l.verifier.state.seq,
      owedMicros: l.verifier.state.cumulative,
      paidMicros: l.paid,
      refused: l.refused,
      lastRefusal: l.lastRefusal,
    }));
  }

  /** Waits for vouchers being signed, then closes the store. */
  async close(): Promise<void> {
    await this.flush();
    await this.db?.close();
  }

  private async pump(lane: Lane): Promise<void> {
    lane.signing = true;
    try {
      while (lane.verifier.state.cumulative > lane.paid) {
        const cumulative = lane.verifier.state.cumulative;
        const leaves = lane.pendingLeaves;
        lane.pendingLeaves = [];
        const receiptsRoot = merkleRoot(leaves);
        // Stored before signing: a restart never signs for receipts it could not check again.
        await this.save(lane, leaves);
        const sig = await signVoucher(this.options.signer, this.options.domain, {
          agent: lane.quote.payout,
          cumulative: BigInt(cumulative),
          receiptsRoot: toHex(receiptsRoot),
          feeCumulative: 0n,
        });
        const message: VoucherMessage = {
          v: PROTOCOL_VERSION,
          kind: 'voucher',
          payer: this.payer,
          agent: lane.quote.payout,
          cumulative,
          receiptsRoot,
          feeCumulative: 0,
          sig: fromHex(sig),
        };
        lane.paid = cumulative;
        lane.voucher = message;
        await this.save(lane, []);
        this.counters.vouchers++;
        this.publish(topics.agentVoucher(lane.agentId, this.clientId), encodeMessage(message));
      }
    } finally {
      lane.signing = false;
    }
  }

  private async save(lane: Lane, inFlightLeaves: Uint8Array[]): Promise<void> {
    if (!this.db) return;
    const v = lane.voucher;
    await this.db.put(lane.agentId, {
      payout: lane.quote.payout,
      agentKey: toHex(lane.quote.agentKey),
      state: lane.verifier.state,
      paid: lane.paid,
      pendingLeaves: [...inFlightLeaves, ...lane.pendingLeaves].map(toHex),
      voucher: v
        ? {
            v: v.v,
            kind: v.kind,
            payer: v.payer,
            agent: v.agent,
            cumulative: v.cumulative,
            feeCumulative: v.feeCumulative ?? 0,
            receiptsRoot: toHex(v.receiptsRoot),
            sig: toHex(v.sig),
          }
        : undefined,
    });
  }
}
