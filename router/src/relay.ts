/**
 * The voucher relay (docs/settlement.md, "The relay"): takes signed vouchers from anyone, settles the ones
 * worth settling on the escrow from its own account (which pays the gas and earns the vouchers' relayer
 * fees), so that an agent needs no gas of its own.
 *
 *   POST /v1/relay/vouchers   { vouchers: [{ payer, agent, cumulative, feeCumulative, receiptsRoot, sig }] }
 *   GET  /v1/relay            the relay's account, its minimum fee and counters
 *
 * Every sender is assumed to lie. Before a voucher costs gas it must:
 *   - be well formed, with a fee within the escrow's cap (else the escrow skips it as FEE_TOO_HIGH);
 *   - carry a fee at all (a fee-0 voucher pays the relay nothing);
 *   - recover to the payer it names (a voucher a stranger made up recovers to someone else);
 *   - pay the agent something new and the relay at least `minFeeMicros`, by a simulation of its settlement
 *     (`settle` as a static call from the relay's account, against the latest block): a stale voucher, an
 *     unfunded lane or one whose fee increase is too small pays nothing and is refused.
 * Accepted vouchers wait `batchMs` and go out in one `settle(agent, …)` per agent (the best voucher per
 * lane). Right before sending, each is simulated again and the batch as a whole, so what changed in between
 * (another relayer settled the lane, the owner withdrew) costs no gas either.
 *
 * A transaction is waited for `receiptTimeoutMs`, not forever (a node may drop or evict it, and every later
 * send would wait behind it): past it, its vouchers go back in the queue and the next transaction takes its
 * nonce, at a higher fee while it is still pending, so at most one of them is mined.
 *
 * The relay cannot steal: the payee is inside each signed voucher and the escrow pays it. What a lying sender
 * can still cost it is the gas of a transaction that a front-run made worthless between the last
 * simulation and the block (the escrow then skips the voucher as stale): the relayer risks only its gas.
 */

import { KeyedBuckets } from '@edge-mesh/client';
import {
  checkVoucher,
  FEE_CAP_DIVISOR,
  MAX_UINT64,
  MAX_UINT96,
  MeshError,
  packVouchers,
  type SignedVoucher,
  splitVoucherSignature,
  type Voucher,
} from '@edge-mesh/protocol';
import type { ethers } from 'ethers';
import type { FastifyInstance } from 'fastify';
import { callerOf } from './http-auth.ts';
import { ANY_ERROR, errorResponse, installErrorHandlers } from './http-errors.ts';

export interface RelayOptions {
  /** The account that sends settlements, pays their gas and collects the fees: an ethers Signer with a provider. */
  runner: ethers.Signer;
  /** The MeshEscrow's address. */
  escrow: string;
  /** Least relayer fee (µUSD) a voucher's settlement must pay this relay, by simulation (default 1; never below 1). */
  minFeeMicros?: number;
  /** How long accepted vouchers wait to go out together, per agent (default 2,000 ms). */
  batchMs?: number;
  /** Most vouchers per settle transaction (default 50). */
  maxBatch?: number;
  /** Most vouchers per POST (default 100). */
  maxPerRequest?: number;
  /** Most vouchers waiting per agent; more are refused as `busy` (default 1,000). */
  maxPending?: number;
  /**
   * Vouchers one caller (its credential, else its address) may hand over a second, sustained (default 20) and at once
   * (default 200); past that the POST is refused MESH_RATE_LIMITED. Each voucher costs a signer recovery on this
   * thread (several ms on a small machine): vouchers without limit would starve the router's routing. An agent hands
   * its due lanes over every few seconds, far below the default.
   */
  vouchersPerSecond?: number;
  voucherBurst?: number;
  /** How long a settle transaction is waited for before its vouchers are queued again and it is replaced (default 3 minutes). */
  receiptTimeoutMs?: number;
  logger?: { info(obj: object, msg: string): void; warn(obj: object, msg: string): void };
}

/** A voucher as the relay takes it over HTTP; amounts as decimal strings or integers. */
export interface RelayVoucherInput {
  /** The lane's voucher signer (the app's voucher key). */
  payer: string;
  /** The agent's payout address: the payee, inside the signed voucher. */
  agent: string;
  cumulative: string | number;
  feeCumulative?: string | number;
  receiptsRoot: string;
  /** 65-byte hex r | s | v. */
  sig: string;
}

/** Why a voucher was refused (no gas was spent on it). */
export type RelayRefusal =
  | 'malformed'
  | 'fee-above-cap'
  | 'no-fee'
  | 'not-signer'
  | 'stale'
  | 'unfunded'
  | 'fee-too-low'
  | 'chain-unreachable'
  | 'busy';

export interface RelayVerdict {
  payer: string;
  agent: string;
  cumulative: string;
  accepted: boolean;
  reason?: RelayRefusal;
  /** By simulation: what settling it now would pay the agent and this relay. */
  paidMicros?: number;
  feeMicros?: number;
}

export interface RelayCounters {
  received: number;
  accepted: number;
  refused: number;
  /** Refusals by reason. */
  refusals: Partial<Record<RelayRefusal, number>>;
  txs: number;
  /** Paid to agents and to this relay by the relay's transactions. */
  paidMicros: number;
  feesMicros: number;
  /** Vouchers the escrow skipped in a sent transaction (a front-run between simulation and block). */
  skipped: number;
  /** Vouchers dropped at the second simulation, before sending. */
  dropped: number;
  gasUsed: string;
  failures: number;
}

interface Pending {
  payer: string;
  entry: SignedVoucher;
}

const ADDRESS = /^0x[0-9a-fA-F]{40}$/;

export class VoucherRelay {
  readonly counters: RelayCounters = {
    received: 0,
    accepted: 0,
    refused: 0,
    refusals: {},
    txs: 0,
    paidMicros: 0,
    feesMicros: 0,
    skipped: 0,
    dropped: 0,
    gasUsed: '0',
    failures: 0,
  };
  /** agent (checksummed) → payer (lower-case) → the best accepted voucher. */
  private readonly pending = new Map<string, Map<string, Pending>>();
  private timer: NodeJS.Timeout | undefined;
  private sending: Promise<void> = Promise.resolve();
  /** The last transaction that was not mined in time: the next one takes its nonce. */
  private unmined: import('@edge-mesh/contracts').Unmined | undefined;
  private closed = false;
  readonly minFeeMicros: number;

  private constructor(
    private readonly ethers: typeof import('ethers').ethers,
    private readonly escrow: import('@edge-mesh/contracts').EscrowClient,
    private readonly contract: ethers.Contract,
    private readonly recover: typeof import('@edge-mesh/contracts').recoverVoucherSigner,
    readonly address: string,
    private readonly options: RelayOptions,
  ) {
    this.minFeeMicros = Math.max(1, Math.floor(options.minFeeMicros ?? 1));
  }

  static async start(options: RelayOptions): Promise<VoucherRelay> {
    const { ethers } = await import('ethers');
    const { EscrowClient, ESCROW_ABI, recoverVoucherSigner } = await import('@edge-mesh/contracts');
    if (!options.runner.provider) throw new MeshError('MESH_CONFIG', 'the relay needs a signer connected to a provider');
    const escrow = await EscrowClient.connect({
      runner: options.runner,
      escrow: options.escrow,
      ...(options.receiptTimeoutMs !== undefined ? { receiptTimeoutMs: options.receiptTimeoutMs } : {}),
    });
    const contract = new ethers.Contract(escrow.escrow, ESCROW_ABI, options.runner);
    return new VoucherRelay(ethers, escrow, contract, recoverVoucherSigner, (await options.runner.getAddress()).toLowerCase(), options);
  }

  get chainId(): bigint {
    return this.escrow.domain.chainId;
  }

  get escrowAddress(): string {
    return this.escrow.escrow;
  }

  /** Checks each voucher (see the file's comment) and queues the ones worth settling. */
  async submit(inputs: readonly RelayVoucherInput[]): Promise<RelayVerdict[]> {
    const max = this.options.maxPerRequest ?? 100;
    if (inputs.length > max)
      throw new MeshError('MESH_BAD_REQUEST', `at most ${max} vouchers per request`, { details: { field: 'vouchers' } });
    const verdicts: RelayVerdict[] = [];
    for (const [i, input] of inputs.entries()) {
      // A voucher refused before its chain read (a bad signature) awaits nothing: without this, a POST of such
      // vouchers would hold the thread for all their signer recoveries in one go.
      if (i > 0) await new Promise((resolve) => setImmediate(resolve));
      verdicts.push(await this.check(input));
    }
    for (const v of verdicts) {
      if (v.accepted) this.counters.accepted++;
      else {
        this.counters.refused++;
        this.counters.refusals[v.reason!] = (this.counters.refusals[v.reason!] ?? 0) + 1;
      }
    }
    if (verdicts.some((v) => v.accepted)) this.schedule();
    return verdicts;
  }

  private async check(input: RelayVoucherInput): Promise<RelayVerdict> {
    this.counters.received++;
    const base = { payer: String(input?.payer ?? ''), agent: String(input?.agent ?? ''), cumulative: String(input?.cumulative ?? '') };
    const refuse = (reason: RelayRefusal, extra: Partial<RelayVerdict> = {}): RelayVerdict => ({
      ...base,
      accepted: false,
      reason,
      ...extra,
    });
    let entry: SignedVoucher;
    let payer: string;
    try {
      ({ entry, payer } = parse(input, this.ethers));
    } catch (err) {
      return refuse(((err as MeshError).details?.reason as RelayRefusal | undefined) ?? 'malformed');
    }
    const fee = entry.voucher.feeCumulative ?? 0n;
    if (fee === 0n) return refuse('no-fee');
    let signer: string;
    try {
      signer = this.recover(this.escrow.domain, entry.voucher, entry.signature).toLowerCase();
    } catch {
      return refuse('malformed');
    }
    if (signer !== payer) return refuse('not-signer');
    const agent = entry.voucher.agent;
    const queue = this.pending.get(agent);
    const held = queue?.get(payer);
    if (held && held.entry.voucher.cumulative >= entry.voucher.cumulative) return refuse('stale');
    if (!held && (queue?.size ?? 0) >= (this.options.maxPending ?? 1_000)) return refuse('busy');
    let sim: { paid: bigint; fees: bigint; settled: bigint; remaining: bigint };
    try {
      sim = await this.simulateOne(payer, entry);
    } catch {
      return refuse('chain-unreachable');
    }
    const numbers = { paidMicros: Number(sim.paid), feeMicros: Number(sim.fees) };
    if (sim.paid === 0n) return refuse(entry.voucher.cumulative <= sim.settled ? 'stale' : 'unfunded', numbers);
    if (sim.fees < BigInt(this.minFeeMicros)) return refuse('fee-too-low', numbers);
    // Another voucher of the lane may have been accepted while this one was simulated.
    const q = this.pending.get(agent) ?? new Map<string, Pending>();
    const now = q.get(payer);
    if (now && now.entry.voucher.cumulative >= entry.voucher.cumulative) return refuse('stale', numbers);
    q.set(payer, { payer, entry });
    this.pending.set(agent, q);
    return { ...base, payer, agent, cumulative: entry.voucher.cumulative.toString(), accepted: true, ...numbers };
  }

  /** What settling this one voucher now would pay, by a static call from the relay's account; and the lane as read. */
  private async simulateOne(payer: string, entry: SignedVoucher) {
    const lane = await this.escrow.laneOf(payer, entry.voucher.agent);
    const { paid, fees } = await this.simulate(entry.voucher.agent, [entry]);
    return { paid, fees, settled: lane.settled, remaining: lane.remaining };
  }

  private async simulate(agent: string, entries: readonly SignedVoucher[]): Promise<{ paid: bigint; fees: bigint }> {
    const [paid, fees] = (await this.contract.getFunction('settle').staticCall(agent, packVouchers(entries), {
      from: this.address,
    })) as [bigint, bigint];
    return { paid, fees };
  }

  private schedule(): void {
    if (this.timer || this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.flush();
    }, this.options.batchMs ?? 2_000);
  }

  /** Sends what is queued now, one transaction per agent (up to `maxBatch` vouchers each); resolves once mined. */
  flush(): Promise<void> {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    const batches: { agent: string; items: Pending[] }[] = [];
    for (const [agent, q] of this.pending) {
      const items = [...q.values()];
      const max = this.options.maxBatch ?? 50;
      for (let i = 0; i < items.length; i += max) batches.push({ agent, items: items.slice(i, i + max) });
    }
    this.pending.clear();
    // One transaction at a time from this account.
    this.sending = this.sending.then(async () => {
      for (const b of batches) {
        await this.send(b.agent, b.items).catch((err: unknown) => {
          this.counters.failures++;
          this.options.logger?.warn({ agent: b.agent, err: (err as Error).message }, 'relay settlement failed');
        });
      }
    });
    return this.sending;
  }

  private async send(agent: string, items: Pending[]): Promise<void> {
    // Simulated again: the chain may have moved since the voucher was accepted.
    const keep: Pending[] = [];
    for (const item of items) {
      const sim = await this.simulate(agent, [item.entry]).catch(() => undefined);
      if (sim && sim.paid > 0n && sim.fees >= BigInt(this.minFeeMicros)) keep.push(item);
      else this.counters.dropped++;
    }
    if (keep.length === 0) return;
    const total = await this.simulate(
      agent,
      keep.map((k) => k.entry),
    );
    if (total.fees < BigInt(this.minFeeMicros) * BigInt(keep.length)) {
      this.counters.dropped += keep.length;
      return;
    }
    let outcome: import('@edge-mesh/contracts').SettleOutcome;
    try {
      outcome = await this.escrow.settle(
        agent,
        keep.map((k) => k.entry),
        this.unmined ? { replaces: this.unmined } : {},
      );
    } catch (err) {
      const details = (err as MeshError).details;
      if (details?.reason === 'receipt-timeout') {
        // Dropped, evicted or underpriced: the next transaction takes its nonce, and these vouchers go in it or a
        // later one (simulated again first, so nothing the stuck one paid meanwhile costs gas twice).
        this.unmined = { nonce: details.nonce as number, hashes: details.hashes as string[] };
        this.requeue(agent, keep);
      }
      throw err;
    }
    this.unmined = undefined;
    this.counters.txs++;
    this.counters.paidMicros += Number(outcome.paid);
    this.counters.feesMicros += Number(outcome.fees);
    this.counters.skipped += outcome.skipped.length;
    this.counters.gasUsed = (BigInt(this.counters.gasUsed) + outcome.gasUsed).toString();
    this.options.logger?.info(
      {
        agent,
        hash: outcome.hash,
        vouchers: keep.length,
        paidMicros: Number(outcome.paid),
        feesMicros: Number(outcome.fees),
        skipped: outcome.skipped.length,
      },
      'relayed a settlement',
    );
  }

  /** Puts vouchers back in the queue, unless a better one of the lane came in meanwhile. */
  private requeue(agent: string, items: Pending[]): void {
    const q = this.pending.get(agent) ?? new Map<string, Pending>();
    for (const item of items) {
      const held = q.get(item.payer);
      if (!held || held.entry.voucher.cumulative < item.entry.voucher.cumulative) q.set(item.payer, item);
    }
    this.pending.set(agent, q);
    this.schedule();
  }

  /** Vouchers waiting to be sent. */
  pendingCount(): number {
    let n = 0;
    for (const q of this.pending.values()) n += q.size;
    return n;
  }

  /** Sends what is queued, then stops. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.flush();
  }
}

/** A voucher from the wire, checked for shape and the escrow's fee cap; throws MESH_VOUCHER_INVALID with `details.reason`. */
function parse(input: RelayVoucherInput, ethers: typeof import('ethers').ethers): { entry: SignedVoucher; payer: string } {
  const fail = (reason: RelayRefusal): never => {
    throw new MeshError('MESH_VOUCHER_INVALID', reason, { details: { reason } });
  };
  if (typeof input !== 'object' || input === null) fail('malformed');
  if (typeof input.payer !== 'string' || !ADDRESS.test(input.payer)) fail('malformed');
  if (typeof input.agent !== 'string' || !ADDRESS.test(input.agent) || BigInt(input.agent) === 0n) fail('malformed');
  const amount = (value: unknown, max: bigint): bigint => {
    if (typeof value === 'number' && Number.isSafeInteger(value) && value >= 0) return BigInt(value);
    if (typeof value === 'string' && /^[0-9]{1,30}$/.test(value) && BigInt(value) <= max) return BigInt(value);
    return fail('malformed');
  };
  const cumulative = amount(input.cumulative, MAX_UINT96);
  const feeCumulative = amount(input.feeCumulative ?? 0, MAX_UINT64);
  if (cumulative > MAX_UINT96 || feeCumulative > MAX_UINT64) fail('malformed');
  if (feeCumulative * FEE_CAP_DIVISOR > cumulative) fail('fee-above-cap');
  const voucher: Voucher = { agent: ethers.getAddress(input.agent), cumulative, feeCumulative, receiptsRoot: String(input.receiptsRoot) };
  try {
    checkVoucher(voucher);
    splitVoucherSignature(String(input.sig));
  } catch {
    fail('malformed');
  }
  return { entry: { voucher, signature: String(input.sig) }, payer: input.payer.toLowerCase() };
}

/**
 * The most a voucher takes as JSON with room to spare (its six fields are at most ~450 bytes): the route's body
 * limit is this times `maxPerRequest`, so a body too big to be a list of vouchers is refused on its length
 * instead of being parsed whole first (the server's default limit is for inference bodies).
 */
export const VOUCHER_JSON_BYTES = 1024;

const voucherSchema = {
  type: 'object',
  required: ['payer', 'agent', 'cumulative', 'receiptsRoot', 'sig'],
  properties: {
    payer: { type: 'string', maxLength: 42 },
    agent: { type: 'string', maxLength: 42 },
    cumulative: {
      anyOf: [
        { type: 'string', maxLength: 30 },
        { type: 'integer', minimum: 0 },
      ],
    },
    feeCumulative: {
      anyOf: [
        { type: 'string', maxLength: 30 },
        { type: 'integer', minimum: 0 },
      ],
    },
    receiptsRoot: { type: 'string', maxLength: 66 },
    sig: { type: 'string', maxLength: 132 },
  },
} as const;

/** Mounts the relay's routes on `app`; the relay sends what is queued and stops when the app closes. */
export async function registerRelayRoutes(app: FastifyInstance, options: RelayOptions): Promise<VoucherRelay> {
  const relay = await VoucherRelay.start(options);
  const budget = new KeyedBuckets(options.voucherBurst ?? 200, options.vouchersPerSecond ?? 20);
  app.addHook('onClose', async () => relay.close());
  const maxPerRequest = options.maxPerRequest ?? 100;
  app.post(
    '/v1/relay/vouchers',
    {
      bodyLimit: (maxPerRequest + 1) * VOUCHER_JSON_BYTES,
      schema: {
        tags: ['operator'],
        summary:
          'Hand signed vouchers to this relay: it settles the ones that pay the agent something new and this relay at least its minimum fee, and pays the gas',
        body: {
          type: 'object',
          required: ['vouchers'],
          properties: { vouchers: { type: 'array', minItems: 1, maxItems: maxPerRequest, items: voucherSchema } },
        },
        response: { 400: errorResponse('MESH_BAD_REQUEST: the body is not a list of vouchers'), ...ANY_ERROR },
      },
    },
    async (request) => {
      const body = request.body as { vouchers: RelayVoucherInput[] };
      const caller = callerOf(request);
      const now = Date.now();
      for (let i = 0; i < body.vouchers.length; i++) {
        if (!budget.take(caller, now))
          throw new MeshError('MESH_RATE_LIMITED', 'too many vouchers from this caller; hand them over more slowly', {
            details: { reason: 'voucher-rate' },
          });
      }
      const results = await relay.submit(body.vouchers);
      return {
        relay: relay.address,
        chain_id: Number(relay.chainId),
        escrow: relay.escrowAddress,
        accepted: results.filter((r) => r.accepted).length,
        results,
      };
    },
  );
  app.get(
    '/v1/relay',
    { schema: { tags: ['operator'], summary: "The relay's account, minimum fee and counters", response: ANY_ERROR } },
    async () => ({
      relay: relay.address,
      chain_id: Number(relay.chainId),
      escrow: relay.escrowAddress,
      min_fee_micros: relay.minFeeMicros,
      pending: relay.pendingCount(),
      counters: relay.counters,
    }),
  );
  return relay;
}

export interface RelayServerOptions extends RelayOptions {
  port?: number;
  host?: string;
}

export interface RelayServer {
  readonly relay: VoucherRelay;
  readonly url: string;
  close(): Promise<void>;
}

/** A relay on its own HTTP server (`edge-mesh relay`): the same routes as a router started with a relay key. */
export async function startRelayServer(options: RelayServerOptions): Promise<RelayServer> {
  const { default: Fastify } = await import('fastify');
  const bodyLimit = 1 << 20;
  const app = Fastify({ logger: false, bodyLimit });
  installErrorHandlers(app, { bodyLimit });
  const relay = await registerRelayRoutes(app, options);
  const host = options.host ?? '127.0.0.1';
  await app.listen({ port: options.port ?? 0, host });
  const address = app.server.address();
  const port = typeof address === 'object' && address ? address.port : (options.port ?? 0);
  return {
    relay,
    url: `http://${host.includes(':') ? `[${host}]` : host}:${port}`,
    close: () => app.close(),
  };
}
