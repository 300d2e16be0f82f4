/**
 * The agent's settlement relayer: turns the best voucher of each lane into stablecoin on chain
 * (escrow v2: docs/settlement.md, "The escrow contract").
 *
 * What a lane owes the agent is what its best voucher adds beyond what the chain has settled, as far as the
 * lane holds: min(cumulative - settled, remaining). A lane that owes nothing is never sent, whatever else
 * holds (an unfunded lane's voucher waits for a top-up). A lane that owes something is due when
 *   - it owes at least `overheadFactor` (100) × gas per voucher × gas price (at most 1 % goes to gas), or
 *   - a withdrawal is pending on it (a `WithdrawRequested` event, or `laneOf` shows a request that has not
 *     lapsed: the owner is leaving, settle before the thaw ends), or
 *   - `maxIntervalMs` has passed since the lane was last settled (or first seen unsettled).
 * Due lanes go together into one `settle(payout, entries)` transaction, up to `maxBatch` per transaction.
 *
 * Chain reads. `laneOf` is read when a lane's voucher first goes beyond what is known settled, after any
 * escrow event on one of this agent's lanes (funding, withdrawal, settlement: they are watched by log
 * filter), and once more for each due lane right before sending, so gas is never spent on a lane that
 * owes nothing.
 *
 * Reorgs. The events are hints (a lane's funds read again, a lane made due), and `settled` is what the chain
 * says. The follower keeps the hash of the last block it read and asks the node about it each time
 * (`checkFollowedBlock`, @edge-mesh/contracts); when that block is replaced, and when a block past one of this
 * settler's own settlements has been read without that settlement's event (a reorg dropped it), the lanes
 * concerned are read again and their `settled` taken as the chain has it, even when lower than what was
 * recorded: a settlement a reorg undid is sent again. A node behind that block is waited for.
 *
 * Crash safety. Before a transaction is sent, its intent (the lanes and the voucher cumulative each is
 * settled to) is written to `level` with fsync. After it is mined the outcome replaces the intent. On
 * start, any intent left behind is reconciled with `laneOf(payer, payout).settled` on chain: lanes the
 * chain shows settled are recorded as such, the others stay due and are settled at once. The escrow pays
 * only `cumulative - settled` and skips a stale voucher, so sending a voucher twice never pays twice;
 * the intent makes sure nothing owed is forgotten and nothing paid is counted twice.
 *
 * A transaction is waited for `receiptTimeoutMs`, not forever: a node may drop or evict it, and a settler
 * waiting on it would never settle again (a pending withdrawal included). Past the timeout the intent is
 * reconciled as after a crash, except that one whose transaction may still be mined (its nonce unused on
 * chain) is kept, its lanes due: the next settlement takes that nonce (at a higher fee while the old one is
 * pending, at the going fee if it was dropped) and inherits the intent, so only one of them can be mined and
 * whichever is gets recorded. The same holds after a restart.
 *
 * Relay mode (`relays`): the due lanes' vouchers are POSTed to a relay (router/relay.ts) instead of sent
 * from the agent's own account, so the agent needs no gas. Nothing is sent from here, so there is no intent
 * to keep: the lanes are watched on chain as above, and a lane a relay has not settled within `relayWaitMs`
 * of first taking it goes to the next relay (and, with a `runner`, after every relay failed it, out from the
 * agent's account).
 */
import path from 'node:path';
import {
  checkFollowedBlock,
  DEFAULT_CHAIN_TIMEOUT_MS,
  ESCROW_ABI,
  EscrowClient,
  type SettleOutcome,
  withChainTimeout,
} from '@edge-mesh/contracts';
import { type EscrowDomain, MeshError, type SignedVoucher } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { Level } from 'level';
import type { Logger } from 'pino';
import { postToRelay } from './relay-handoff.ts';

export interface SettlerOptions {
  /**
   * Sends the settle transactions and pays their gas; any account will do (the payee is inside each voucher).
   * Optional with `relays`: then the agent needs no gas, and a runner only settles what no relay would.
   */
  runner?: ethers.Signer;
  /**
   * Relay base URLs (router/relay.ts): due lanes are handed to a relay instead of sent from `runner`; the
   * lanes are then watched on chain, and a relay that has not settled a lane within `relayWaitMs` is replaced
   * by the next (and, after every relay, by `runner` if there is one).
   */
  relays?: string[];
  /** How long a relay has to settle a lane it was handed before the next one is tried (default 30 s). */
  relayWaitMs?: number;
  /** Sent to every relay as `Authorization: Bearer` (a router with HTTP auth on needs a credential with the `relay` scope). */
  relayCredential?: string;
  /** Micro-dollars owed-but-unsettled that make a lane due; by default `overheadFactor` × gasPerVoucher × gas price. */
  thresholdMicros?: number;
  /** Default 100: settle when gas is at most 1 % of the amount. */
  overheadFactor?: number;
  /** Gas one voucher adds to a batch (default 15,000, measured 14.4k at 50). */
  gasPerVoucher?: number;
  /** Micro-dollars per whole native coin (ETH), to price gas in dollars (default 3,000 USD). */
  nativeUsdMicros?: number;
  /** Settle an unsettled lane at least this often (default 24 h). */
  maxIntervalMs?: number;
  /** How often lanes and withdraw events are checked (default 5 s). */
  checkEveryMs?: number;
  /** Lanes per transaction (default 50). */
  maxBatch?: number;
  /** How long a settlement transaction is waited for before it is sent again on the same nonce (default 3 minutes). */
  receiptTimeoutMs?: number;
  /** Settle every unsettled lane when the agent stops (default false). */
  settleOnClose?: boolean;
  /** Fault injection for crash tests: SIGKILL this process after the intent is written, or after the transaction is sent. */
  crashAt?: 'after-intent' | 'after-send';
}

/** What the settler needs from the agent's journal: each lane's best voucher. `payer` is the voucher key (the lane's signer). */
export interface SettlerLane {
  payer: string;
  voucher: { cumulative: number; feeCumulative?: number; receiptsRoot: string; sig: string } | undefined;
}

export interface SettlementRecord {
  hash: string;
  blockNumber: number;
  gasUsed: string;
  /** Paid to the payout address (deferred payouts included). */
  paidMicros: number;
  /** Relayer fees paid to this settler's account. */
  feesMicros: number;
  /** Payouts whose token transfer failed: they wait in the escrow's `claimable`. */
  deferredMicros: number;
  /** `partial`: the lane ran short; the same voucher pays the rest after a top-up. */
  lanes: { payer: string; cumulative: number; delta: number; partial: boolean }[];
  skipped: { payer: string; reason: string; cumulative: number }[];
  reasons: string[];
  at: number;
}

export interface SettlerCounters {
  txs: number;
  settledMicros: number;
  feesMicros: number;
  deferredMicros: number;
  skipped: number;
  failures: number;
  reconciled: number;
  /** `laneOf` reads. */
  laneReads: number;
  /** Vouchers a relay said it took. */
  relayHandoffs: number;
  /** Vouchers a relay refused (its reason is logged). */
  relayRefusals: number;
  /** Lanes a relay took and had not settled within `relayWaitMs`. */
  relayMisses: number;
  /** Posts to a relay that failed (unreachable, a bad answer). */
  relayFailures: number;
  /** Paid to the payout by settlements others sent (relays), as seen in the escrow's events. */
  relayedMicros: number;
}

interface Intent {
  id: string;
  at: number;
  reasons: string[];
  lanes: { payer: string; cumulative: number }[];
  /** The latest transaction sent for it. */
  hash?: string;
  /** Every transaction sent for it (with those of an intent it replaced): any one of them may be mined. */
  hashes?: string[];
  /** The nonce of the latest. */
  nonce?: number;
}

interface LaneState {
  /** What the chain has settled on this lane (as last read or settled by us). */
  settled: number;
  /** When the lane was last settled, or first seen owing; the max-interval clock. */
  since: number;
  /** A withdraw request was seen and not yet answered by a settlement. */
  withdraw: boolean;
  /** Left over from an intent found after a restart: settle at once. */
  recovered: boolean;
  /** The lane's funds as last read; undefined until read, and again after an escrow event on the lane. */
  remaining: number | undefined;
  /** Chain seconds until which a withdrawal request is pending (its lapse time); 0 when none. */
  withdrawUntil: number;
  /**
   * The voucher last handed to a relay, and when (relay mode; memory only: handing it again is harmless); `first`
   * is when that relay first took the lane with nothing settled since, and `base` what was settled then.
   */
  handed?: { cumulative: number; at: number; relay: string; first: number; base: number };
  /** Relays that failed this lane so far: the next hand-off goes to the next relay. */
  misses?: number;
  /** A reorg may have undone what is known of the lane: read it again, believing the chain's `settled` even when lower. */
  verify?: boolean;
}

const INTENT = 'intent!';
const SETTLED = 'settled!';
const LANE = 'lane!';
const META = 'meta!';

const LOG_RANGE = 5_000;
const escrowInterface = new ethers.Interface(ESCROW_ABI);
const topic = (name: string) => escrowInterface.getEvent(name)!.topicHash;
const WITHDRAW_TOPIC = topic('WithdrawRequested');
const SETTLED_TOPICS = new Set([topic('Settled'), topic('SettledPartial')]);
/** Events that change a lane's funds, settlement or withdrawal (all index signer and agent). */
const LANE_TOPICS = ['LaneFunded', 'WithdrawRequested', 'WithdrawCancelled', 'Withdrawn', 'Settled', 'SettledPartial'].map(topic);

type Due = { payer: string; entry: SignedVoucher; cumulative: number; reason: string };

/** Every transaction sent for an intent (an intent written before `hashes` existed has only `hash`). */
function hashesOf(intent: Intent): string[] {
  return intent.hashes ?? (intent.hash ? [intent.hash] : []);
}

export class Settler {
  readonly counters: SettlerCounters = {
    txs: 0,
    settledMicros: 0,
    feesMicros: 0,
    deferredMicros: 0,
    skipped: 0,
    failures: 0,
    reconciled: 0,
    laneReads: 0,
    relayHandoffs: 0,
    relayRefusals: 0,
    relayMisses: 0,
    relayFailures: 0,
    relayedMicros: 0,
  };
  private readonly lanes = new Map<string, LaneState>();
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private closed = false;
  private nextLogBlock = 0;
  /** The hash of block `nextLogBlock - 1` when it was read. */
  private logHash: string | undefined;
  /** This settler's mined settlements whose `Settled` event the follower has not read yet: by hash, their block and lanes. */
  private readonly unseen = new Map<string, { block: number; payers: string[] }>();
  private seq = 0;
  /** Transactions this settler sent itself (their settlements are counted by `record`, not as relayed). */
  private readonly ownTxs = new Set<string>();
  /** Intents whose transaction was not mined in time and may still be: the next settlement takes their nonce. */
  private unmined: { key: string; intent: Intent }[] = [];
  private readonly provider: ethers.Provider;

  private constructor(
    private readonly escrow: EscrowClient,
    private readonly db: Level<string, unknown>,
    private readonly payout: string,
    private readonly source: () => SettlerLane[],
    private readonly options: SettlerOptions,
    private readonly logger: Logger,
  ) {
    this.provider = escrow.runner.provider!;
  }

  /** Opens the settler's store in `<dataDir>/settler-<chainId>-<escrow>`, reconciles left-over intents, and starts checking. */
  static async start(
    params: {
      payout: string;
      domain: EscrowDomain;
      dataDir: string;
      lanes: () => SettlerLane[];
      logger: Logger;
      /** Reads the chain when there is no runner (relay mode). */
      provider?: ethers.Provider;
    },
    options: SettlerOptions,
  ): Promise<Settler> {
    const runner = options.runner ?? params.provider;
    if (!runner || (!options.runner && !options.relays?.length))
      throw new MeshError('MESH_CONFIG', 'settling needs a runner that pays gas (--evm-key) or a relay (--relay URL) and a provider');
    for (const url of options.relays ?? []) {
      if (!URL.canParse(url)) throw new MeshError('MESH_CONFIG', `relay ${JSON.stringify(url)} is not a URL`);
    }
    const escrow = await EscrowClient.connect({
      runner,
      escrow: params.domain.escrow,
      ...(options.receiptTimeoutMs !== undefined ? { receiptTimeoutMs: options.receiptTimeoutMs } : {}),
    });
    if (escrow.domain.chainId !== BigInt(params.domain.chainId)) {
      throw new MeshError('MESH_CONFIG', `the settler's chain is ${escrow.domain.chainId}, the agent bills on ${params.domain.chainId}`, {
        details: { settlerChainId: String(escrow.domain.chainId), agentChainId: String(params.domain.chainId) },
      });
    }
    const location = path.join(params.dataDir, `settler-${params.domain.chainId}-${params.domain.escrow.toLowerCase()}`);
    const db = new Level<string, unknown>(location, { valueEncoding: 'json' });
    await db.open();
    const settler = new Settler(
      escrow,
      db,
      ethers.getAddress(params.payout),
      params.lanes,
      options,
      params.logger.child({ part: 'settler' }),
    );
    try {
      await settler.load();
      await settler.reconcile();
    } catch (err) {
      await db.close();
      throw err;
    }
    settler.schedule();
    return settler;
  }

  private async load(): Promise<void> {
    for await (const [key, value] of this.db.iterator({ gte: LANE, lt: `${LANE}~` })) {
      this.lanes.set(key.slice(LANE.length), { ...(value as LaneState), recovered: false, remaining: undefined, withdrawUntil: 0 });
    }
    for await (const value of this.db.values({ gte: SETTLED, lt: `${SETTLED}~` })) {
      const r = value as SettlementRecord;
      this.counters.txs++;
      this.counters.settledMicros += r.paidMicros;
      this.counters.feesMicros += r.feesMicros ?? 0;
      this.counters.deferredMicros += r.deferredMicros ?? 0;
      this.counters.skipped += r.skipped.length;
    }
    const meta = (await this.db.get(`${META}state`).catch(() => undefined)) as ReturnType<Settler['meta']> | undefined;
    this.nextLogBlock = meta?.nextLogBlock ?? 0;
    this.logHash = meta?.logHash;
    for (const [hash, own] of meta?.unseen ?? []) this.unseen.set(hash, own);
    this.seq = meta?.seq ?? 0;
  }

  /**
   * Intents left by a crash, or by a transaction that failed or timed out: read the chain's settled amount per
   * lane; what is not settled stays due. A mined transaction of the intent is recorded; one that may still be
   * mined (sent, and the account's nonce on chain not past it) keeps the intent, for the next settlement to
   * take its nonce; otherwise nothing of it was paid and it goes.
   */
  private async reconcile(): Promise<void> {
    this.unmined = [];
    let nextNonce: number | undefined;
    for await (const [key, value] of this.db.iterator({ gte: INTENT, lt: `${INTENT}~` })) {
      const intent = value as Intent;
      // The transactions were sent: if one was mined, its events say exactly what it paid.
      const receipts = await this.receipts(intent);
      const outcomes = receipts.filter((r) => r.status === 1).map((r) => this.parseOutcome(r));
      let pending = false;
      if (receipts.length === 0 && intent.nonce !== undefined && this.options.runner) {
        nextNonce ??= await this.accountNonce();
        pending = nextNonce <= intent.nonce;
      }
      let lanes = 0;
      for (const l of intent.lanes) {
        const state = this.state(l.payer);
        const onChain = await this.refresh(l.payer, state);
        if (onChain < l.cumulative) state.recovered = true;
        if (outcomes.some((o) => o.settled.some((s) => s.signer.toLowerCase() === l.payer))) lanes++;
        await this.db.put(LANE + l.payer, this.stored(state));
      }
      if (pending) {
        this.unmined.push({ key, intent });
        for (const hash of hashesOf(intent)) this.ownTxs.add(hash);
      } else if (outcomes.length > 0) {
        for (const outcome of outcomes) await this.record(intent, outcome, key);
      } else {
        await this.db.del(key, { sync: true } as never);
      }
      this.counters.reconciled++;
      this.logger.warn(
        { intent: intent.id, hash: intent.hash, nonce: intent.nonce, mined: outcomes.length > 0, pending, lanes },
        pending
          ? 'a settlement transaction is not mined yet: the next one takes its nonce'
          : 'reconciled an unfinished settlement intent with the chain',
      );
    }
  }

  /** The receipts of the intent's transactions that were mined (at most one per nonce). */
  private async receipts(intent: Intent): Promise<ethers.TransactionReceipt[]> {
    const out: ethers.TransactionReceipt[] = [];
    for (const hash of hashesOf(intent)) {
      const receipt = await this.provider.getTransactionReceipt(hash).catch(() => null);
      if (receipt) out.push(receipt);
    }
    return out;
  }

  /** The runner account's next nonce as the chain has it (its mined transactions). */
  private async accountNonce(): Promise<number> {
    return this.provider.getTransactionCount(await this.options.runner!.getAddress(), 'latest');
  }

  /** An unmined intent that has been mined since, or whose nonce went to another transaction, is reconciled. */
  private async checkUnmined(): Promise<void> {
    if (this.unmined.length === 0) return;
    const nextNonce = await this.accountNonce();
    for (const { intent } of this.unmined) {
      if (nextNonce > (intent.nonce ?? -1) || (await this.receipts(intent)).length > 0) return this.reconcile();
    }
  }

  private state(payer: string): LaneState {
    let s = this.lanes.get(payer);
    if (!s) {
      s = { settled: 0, since: Date.now(), withdraw: false, recovered: false, remaining: undefined, withdrawUntil: 0 };
      this.lanes.set(payer, s);
    }
    return s;
  }

  /**
   * Reads the lane from the chain into `s`; returns what it has settled. What is known settled only rises (a node
   * a little behind must not make a settlement look undone), unless `trust`: after a reorg the chain's word wins.
   */
  private async refresh(payer: string, s: LaneState, trust = false): Promise<number> {
    const lane = await this.escrow.laneOf(payer, this.payout);
    this.counters.laneReads++;
    s.settled = trust ? Number(lane.settled) : Math.max(s.settled, Number(lane.settled));
    s.remaining = Number(lane.remaining);
    s.withdrawUntil = Number(lane.lapseAt);
    return Number(lane.settled);
  }

  private stored(s: LaneState): Pick<LaneState, 'settled' | 'since' | 'withdraw'> {
    return { settled: s.settled, since: s.since, withdraw: s.withdraw };
  }

  private schedule(): void {
    if (this.closed) return;
    this.timer = setTimeout(() => {
      this.running = this.tick()
        .catch((err: unknown) => {
          this.counters.failures++;
          this.logger.warn({ err: (err as Error).message }, 'settlement check failed; retrying later');
        })
        .finally(() => {
          this.running = undefined;
          this.schedule();
        });
    }, this.options.checkEveryMs ?? 5_000);
  }

  /** The owed-but-unsettled amount that makes a lane due on its own. */
  async thresholdMicros(): Promise<number> {
    if (this.options.thresholdMicros !== undefined) return this.options.thresholdMicros;
    const fee = await this.provider.getFeeData();
    const gasPrice = fee.gasPrice ?? fee.maxFeePerGas ?? 0n;
    const wei = BigInt(this.options.overheadFactor ?? 100) * BigInt(this.options.gasPerVoucher ?? 15_000) * gasPrice;
    return Number((wei * BigInt(this.options.nativeUsdMicros ?? 3_000_000_000)) / 10n ** 18n);
  }

  /**
   * Follows the escrow's events on this agent's lanes: any of them makes the lane's cached funds stale (read
   * again before deciding), and a withdrawal request marks the lane due.
   */
  private async watchLanes(): Promise<void> {
    const provider = this.provider;
    let head: number;
    // A first start looks back LOG_RANGE blocks; each query spans at most LOG_RANGE (public RPCs cap ranges).
    if (this.nextLogBlock === 0) {
      head = await withChainTimeout(provider.getBlockNumber(), DEFAULT_CHAIN_TIMEOUT_MS, 'latest block');
      this.nextLogBlock = Math.max(0, head - LOG_RANGE);
    } else {
      const last = this.nextLogBlock - 1;
      const check = await checkFollowedBlock(provider, { number: last, hash: this.logHash });
      head = check.head.number;
      if (check.state === 'node-behind') {
        // A node behind the one that answered before (a load balancer's), as often as a chain gone shorter. Its word on
        // `settled` would undo settlements it has not seen yet, so nothing is changed until the chain is past that
        // block again: its hash then tells a reorg.
        this.logger.debug({ last, head }, 'the node is behind the last block read: waiting for it');
        return;
      }
      if (check.state === 'replaced') {
        // A reorg replaced blocks already read: every lane is read again, its settlement as the chain now has it.
        for (const s of this.lanes.values()) {
          s.remaining = undefined;
          s.verify = true;
        }
        this.unseen.clear();
        this.logger.warn(
          { last, head, was: this.logHash, now: check.hash },
          'the chain reorganised under the settler: reading every lane again',
        );
        this.nextLogBlock = head + 1;
        this.logHash = check.head.hash;
        await this.db.put(`${META}state`, this.meta());
        return;
      }
      this.logHash = check.hash;
    }
    if (head < this.nextLogBlock) return;
    const latest = Math.min(head, this.nextLogBlock + LOG_RANGE - 1);
    // The range's last block before its logs: a reorg in between shows as a changed hash at the next check.
    const end = (await provider.getBlock(latest))?.hash ?? undefined;
    const logs = await provider.getLogs({
      address: this.escrow.escrow,
      topics: [LANE_TOPICS, null, ethers.zeroPadValue(this.payout, 32)],
      fromBlock: this.nextLogBlock,
      toBlock: latest,
    });
    for (const log of logs) {
      this.unseen.delete(log.transactionHash);
      const payer = ethers.getAddress(ethers.dataSlice(log.topics[1]!, 12)).toLowerCase();
      const s = this.state(payer);
      s.remaining = undefined;
      if (SETTLED_TOPICS.has(log.topics[0]!) && !this.ownTxs.has(log.transactionHash)) {
        // Settled by someone else (a relay): what it paid this agent.
        this.counters.relayedMicros += Number(escrowInterface.parseLog(log)!.args[3] as bigint);
      }
      if (log.topics[0] === WITHDRAW_TOPIC) {
        s.withdraw = true;
        await this.db.put(LANE + payer, this.stored(s));
        this.logger.info({ payer, block: log.blockNumber }, 'the lane owner asked to withdraw: settling the lane');
      }
    }
    for (const [hash, own] of this.unseen) {
      if (own.block > latest) continue;
      // Its block was read and its event was not there: a reorg took the settlement out.
      this.unseen.delete(hash);
      for (const payer of own.payers) {
        const s = this.state(payer);
        s.remaining = undefined;
        s.verify = true;
      }
      this.logger.warn(
        { hash, block: own.block, lanes: own.payers.length },
        'a settlement of this agent is no longer on the chain: its lanes are read again',
      );
    }
    this.nextLogBlock = latest + 1;
    this.logHash = end;
    await this.db.put(`${META}state`, this.meta());
  }

  /** What the follower keeps across restarts: where it stands, and this settler's settlements whose event it has not read. */
  private meta(): { nextLogBlock: number; seq: number; logHash?: string; unseen?: [string, { block: number; payers: string[] }][] } {
    return {
      nextLogBlock: this.nextLogBlock,
      seq: this.seq,
      ...(this.logHash ? { logHash: this.logHash } : {}),
      ...(this.unseen.size > 0 ? { unseen: [...this.unseen] } : {}),
    };
  }

  /** What the lane owes the agent now, by what is known of the chain: its voucher's increase, as far as the lane holds. */
  private static owed(v: NonNullable<SettlerLane['voucher']>, s: LaneState): number {
    return Math.max(0, Math.min(v.cumulative - s.settled, s.remaining ?? 0));
  }

  /** One check: follow the lanes' events, pick the due lanes, settle them in batches. */
  async tick(all = false): Promise<void> {
    await this.checkUnmined();
    await this.watchLanes();
    const threshold = all ? 0 : await this.thresholdMicros();
    const now = Date.now();
    const block = await this.provider.getBlock('latest');
    const chainNowS = Math.max(Math.floor(now / 1000), block?.timestamp ?? 0);
    const due: Due[] = [];
    for (const lane of this.source()) {
      const v = lane.voucher;
      if (!v) continue;
      const s = this.state(lane.payer);
      if (s.verify) {
        await this.refresh(lane.payer, s, true);
        s.verify = false;
        await this.db.put(LANE + lane.payer, this.stored(s));
      }
      if (v.cumulative <= s.settled) {
        s.withdraw = false;
        continue;
      }
      if (s.remaining === undefined) await this.refresh(lane.payer, s);
      if (s.handed && s.settled >= s.handed.cumulative) {
        // A relay settled what it was handed: the lane starts a new interval.
        s.handed = undefined;
        s.misses = 0;
        s.since = now;
        s.withdraw = false;
        await this.db.put(LANE + lane.payer, this.stored(s));
      }
      const owed = Settler.owed(v, s);
      if (owed <= 0) continue; // never spend gas on a lane that owes nothing
      let reason: string | undefined;
      if (all) reason = 'close';
      else if (s.recovered) reason = 'recovered';
      else if (s.withdraw || s.withdrawUntil > chainNowS) reason = 'withdraw';
      else if (owed >= threshold) reason = 'threshold';
      else if (now - s.since >= (this.options.maxIntervalMs ?? 86_400_000)) reason = 'interval';
      if (!reason) continue;
      due.push({
        payer: lane.payer,
        cumulative: v.cumulative,
        reason,
        entry: {
          voucher: {
            agent: this.payout,
            cumulative: BigInt(v.cumulative),
            feeCumulative: BigInt(v.feeCumulative ?? 0),
            receiptsRoot: v.receiptsRoot,
          },
          signature: v.sig,
        },
      });
    }
    const own = this.options.relays?.length ? await this.handOff(due) : due;
    const max = this.options.maxBatch ?? 50;
    for (let i = 0; i < own.length && !(this.closed && !all); i += max) {
      // Read again right before paying gas: another relayer or the owner may have moved the lane since.
      const batch: Due[] = [];
      for (const d of own.slice(i, i + max)) {
        const s = this.state(d.payer);
        await this.refresh(d.payer, s);
        if (Math.min(d.cumulative - s.settled, s.remaining ?? 0) > 0) batch.push(d);
      }
      if (batch.length > 0) await this.send(batch);
    }
  }

  /**
   * Relay mode: hands the due lanes to relays and returns those this settler must send itself (only with a
   * runner, once every relay has failed the lane). A lane handed to a relay waits `relayWaitMs` for the chain
   * to show it settled; then it counts as a miss and goes to the next relay. The relay's answer is a hint:
   * only the chain says a lane is settled.
   */
  private async handOff(due: Due[]): Promise<Due[]> {
    const relays = this.options.relays!;
    const wait = this.options.relayWaitMs ?? 30_000;
    const now = Date.now();
    const self: Due[] = [];
    const byRelay = new Map<string, Due[]>();
    for (const d of due) {
      const s = this.state(d.payer);
      const h = s.handed;
      if (h) {
        // A relay is timed from when it first took the lane, not from its latest hand-off: on a busy lane the
        // voucher rises at every check and goes to the same relay again, and one that never settles would keep
        // the lane for good. Anything settled on the lane since then starts its clock again.
        if (s.settled > h.base) {
          h.first = now;
          h.base = s.settled;
        }
        if (h.cumulative >= d.cumulative && now - h.at < wait) continue; // a relay has this voucher: wait for the chain
        if (now - h.first >= wait) {
          s.misses = (s.misses ?? 0) + 1;
          this.counters.relayMisses++;
          this.logger.warn(
            { payer: d.payer, relay: h.relay, waitedMs: now - h.first, cumulative: d.cumulative },
            'the relay has not settled the lane: handing it to the next one',
          );
          s.handed = undefined;
        }
      }
      if (this.options.runner && (s.misses ?? 0) >= relays.length) {
        self.push(d);
        continue;
      }
      const relay = relays[(s.misses ?? 0) % relays.length]!;
      byRelay.set(relay, [...(byRelay.get(relay) ?? []), d]);
    }
    for (const [relay, lanes] of byRelay) {
      for (let i = 0; i < lanes.length; i += 100) {
        const chunk = lanes.slice(i, i + 100);
        let answers: Awaited<ReturnType<typeof postToRelay>>;
        try {
          answers = await postToRelay(
            relay,
            chunk.map((d) => ({
              payer: d.payer,
              agent: this.payout,
              cumulative: d.entry.voucher.cumulative.toString(),
              feeCumulative: (d.entry.voucher.feeCumulative ?? 0n).toString(),
              receiptsRoot: d.entry.voucher.receiptsRoot,
              sig: d.entry.signature,
            })),
            10_000,
            this.options.relayCredential,
          );
        } catch (err) {
          this.counters.relayFailures++;
          this.logger.warn({ relay, lanes: chunk.length, err: (err as Error).message }, 'relay unreachable: the next one gets these lanes');
          for (const d of chunk) {
            const s = this.state(d.payer);
            s.misses = (s.misses ?? 0) + 1;
          }
          continue;
        }
        for (const [k, a] of answers.entries()) {
          const d = chunk[k]!;
          // Refused or taken, the lane waits before it is handed again: a refusal (its fee too small for this
          // relay, or settled meanwhile) is retried later, with the next relay.
          const s = this.state(d.payer);
          const same = s.handed?.relay === relay ? s.handed : undefined;
          s.handed = { cumulative: d.cumulative, at: now, relay, first: same?.first ?? now, base: same?.base ?? s.settled };
          if (a.accepted) this.counters.relayHandoffs++;
          else {
            this.counters.relayRefusals++;
            this.logger.info({ relay, payer: d.payer, cumulative: d.cumulative, reason: a.reason }, 'the relay refused a voucher');
          }
        }
      }
    }
    return self;
  }

  private async send(batch: Due[]): Promise<void> {
    const intent: Intent = {
      id: `${Date.now().toString(36)}-${++this.seq}`,
      at: Date.now(),
      reasons: [...new Set(batch.map((b) => b.reason))],
      lanes: batch.map((b) => ({ payer: b.payer, cumulative: b.cumulative })),
    };
    const key = INTENT + intent.id;
    // A transaction not mined in time is replaced by this one (same nonce) and its intent is folded into this
    // one: whichever of them is mined, this intent names its hash and its lanes.
    const carried = this.unmined;
    const last = carried.at(-1)?.intent;
    const replaces = last?.nonce !== undefined ? { nonce: last.nonce, hashes: carried.flatMap((u) => hashesOf(u.intent)) } : undefined;
    if (replaces) {
      intent.nonce = replaces.nonce;
      intent.hashes = replaces.hashes;
      intent.reasons = [...new Set([...carried.flatMap((u) => u.intent.reasons), ...intent.reasons])];
      for (const l of carried.flatMap((u) => u.intent.lanes)) {
        if (!intent.lanes.some((x) => x.payer === l.payer)) intent.lanes.push(l);
      }
    }
    // Durable before the transaction exists: a crash from here on is reconciled on the next start.
    const ops: { type: 'put' | 'del'; key: string; value?: unknown }[] = [
      { type: 'put', key, value: intent },
      { type: 'put', key: `${META}state`, value: this.meta() },
      ...carried.map((u) => ({ type: 'del' as const, key: u.key })),
    ];
    await this.db.batch(ops as never, { sync: true });
    this.unmined = [];
    if (this.options.crashAt === 'after-intent') process.kill(process.pid, 'SIGKILL');
    let outcome: SettleOutcome;
    try {
      outcome = await this.escrow.settle(
        this.payout,
        batch.map((b) => b.entry),
        {
          onSent: async (hash, nonce) => {
            this.ownTxs.add(hash);
            intent.hash = hash;
            intent.hashes = [...(intent.hashes ?? []), hash];
            intent.nonce = nonce;
            await this.db.put(key, intent, { sync: true } as never);
            if (this.options.crashAt === 'after-send') process.kill(process.pid, 'SIGKILL');
          },
          ...(replaces ? { replaces } : {}),
        },
      );
    } catch (err) {
      // Sent or not, mined or not: settle the books with the chain now, as after a crash (a transaction that
      // may still be mined keeps its intent, for the next settlement to replace).
      await this.reconcile().catch(() => {});
      throw err;
    }
    await this.record(intent, outcome, key);
    // Sent on a fresh nonce because the replaced one was used meanwhile: by an earlier transaction of ours, maybe.
    if (replaces)
      for (const receipt of await this.receipts(intent))
        if (receipt.hash !== outcome.hash && receipt.status === 1) await this.record(intent, this.parseOutcome(receipt), key);
  }

  private parseOutcome(receipt: ethers.TransactionReceipt): SettleOutcome {
    return this.escrow.outcomeOf(receipt);
  }

  /** Replaces the intent with the outcome, in one durable batch. */
  private async record(intent: Intent, outcome: SettleOutcome, intentKey: string): Promise<void> {
    const rec: SettlementRecord = {
      hash: outcome.hash,
      blockNumber: outcome.blockNumber,
      gasUsed: outcome.gasUsed.toString(),
      paidMicros: Number(outcome.paid),
      feesMicros: Number(outcome.fees),
      deferredMicros: Number(outcome.deferred.reduce((a, d) => a + d.amount, 0n)),
      lanes: outcome.settled.map((s) => ({
        payer: s.signer.toLowerCase(),
        cumulative: Number(s.cumulative),
        delta: Number(s.paid),
        partial: s.partial,
      })),
      skipped: outcome.skipped.map((s) => ({ payer: s.signer.toLowerCase(), reason: s.reason, cumulative: Number(s.cumulative) })),
      reasons: intent.reasons,
      at: Date.now(),
    };
    // Believed once the follower reads its event; a block past it read without the event means a reorg undid it.
    if (rec.lanes.length > 0) this.unseen.set(rec.hash, { block: rec.blockNumber, payers: rec.lanes.map((l) => l.payer) });
    const ops: { type: 'put' | 'del'; key: string; value?: unknown }[] = [
      { type: 'del', key: intentKey },
      { type: 'put', key: `${META}state`, value: this.meta() },
      { type: 'put', key: `${SETTLED}${String(outcome.blockNumber).padStart(12, '0')}!${outcome.hash}`, value: rec },
    ];
    const now = Date.now();
    for (const l of intent.lanes) {
      const s = this.state(l.payer);
      const ev = rec.lanes.find((x) => x.payer === l.payer);
      if (ev && !ev.partial) {
        s.settled = Math.max(s.settled, ev.cumulative);
        s.remaining = undefined; // spent from: read again before the next decision
      } else {
        // Partial (the lane ran short) or skipped (someone settled it already, or it was emptied): believe the chain.
        await this.refresh(l.payer, s);
      }
      s.since = now;
      s.withdraw = false;
      s.recovered = false;
      ops.push({ type: 'put', key: LANE + l.payer, value: this.stored(s) });
    }
    await this.db.batch(ops as never, { sync: true });
    this.counters.txs++;
    this.counters.settledMicros += rec.paidMicros;
    this.counters.feesMicros += rec.feesMicros;
    this.counters.deferredMicros += rec.deferredMicros;
    this.counters.skipped += rec.skipped.length;
    if (rec.deferredMicros > 0) {
      this.logger.warn(
        { hash: rec.hash, deferredMicros: rec.deferredMicros },
        "the token refused a payout (a blacklisted or paused address?): it waits in the escrow's claimable, claim(payout) pays it",
      );
    }
    this.logger.info(
      {
        hash: rec.hash,
        lanes: rec.lanes.length,
        partial: rec.lanes.filter((x) => x.partial).length,
        paidMicros: rec.paidMicros,
        feesMicros: rec.feesMicros,
        skipped: rec.skipped.length,
        reasons: rec.reasons,
      },
      'settled',
    );
  }

  /** Settles every lane that owes the agent something, now. */
  async settleNow(): Promise<void> {
    while (this.running) await this.running;
    await this.tick(true);
  }

  /** The settlements this agent sent, oldest first. */
  async settlements(): Promise<SettlementRecord[]> {
    const out: SettlementRecord[] = [];
    for await (const value of this.db.values({ gte: SETTLED, lt: `${SETTLED}~` })) out.push(value as SettlementRecord);
    return out;
  }

  /** What the chain has settled per payer lane, as this settler knows it. */
  settledByLane(): Record<string, number> {
    return Object.fromEntries([...this.lanes].map(([payer, s]) => [payer, s.settled]));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    while (this.running) await this.running;
    if (this.options.settleOnClose) {
      await this.tick(true).catch((err: unknown) =>
        this.logger.warn({ err: (err as Error).message }, 'final settlement failed; it runs again on the next start'),
      );
    }
    await this.db.close();
  }
}
