/**
 * The escrow's view of this agent's lanes: what each payer's lane holds, what has been settled on it,
 * and any withdrawal in progress. The credit rule (payments.ts, docs/settlement.md "The credit rule")
 * extends credit only against money that is there, so it reads the chain here, and only here:
 *
 * - a lane's first use reads `laneOf(payer, payout)` at the latest block and remembers that block;
 * - afterwards the escrow's events for this payout (funding, withdrawals, settlements) are followed by
 *   polling `eth_getLogs` in bounded block ranges from a checkpoint kept in the agent's store, so a
 *   restart resumes where it stopped instead of looking back a fixed number of blocks;
 * - an event at or before the block a lane was read at is already in that read and is skipped, so a
 *   read and the follower never count the same change twice.
 *
 * Written against escrow v2: `laneOf → remaining, settled, feeSettled, owner, withdrawAmount, thawEnd,
 * lapseAt`; a withdrawal takes a fixed amount between its thaw's end and its lapse, and a settlement pays
 * the agent first and then a relayer fee, both from the lane. Switching to another escrow means changing
 * this module only: the rest of the agent sees `LaneFundsView`.
 */
import { ESCROW_ABI, EscrowClient } from '@edge-mesh/contracts';
import { MeshError } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import type { Logger } from 'pino';

/** A lane as the escrow sees it, in micro-dollars (token units). */
export interface LaneFundsView {
  /** Funds left on the lane. */
  remaining: number;
  /** The highest voucher cumulative the escrow has paid out on the lane. */
  settled: number;
  /** A withdrawal is in progress (thawing or armed; a lapsed one is not). */
  withdrawPending: boolean;
  /** What a withdrawal in progress would take (its fixed amount, at most what is left); 0 when none is pending. */
  pendingWithdrawal: number;
  /** A withdrawal is pending and its thaw has passed: the payer may take the money at any moment. */
  withdrawArmed: boolean;
  /** Unix seconds the pending withdrawal's thaw ends (0: none). */
  thawEnd: number;
}

/** Where the follower keeps its checkpoint (the agent's payment store). */
export interface LaneFundsStore {
  get(key: string): Promise<unknown>;
  put(key: string, value: unknown): Promise<void>;
}

export interface LaneFundsOptions {
  /** Reads only: any ethers provider for the escrow's chain. */
  provider: ethers.Provider;
  escrow: string;
  /** The agent's payout address: the second half of every lane. */
  payout: string;
  /** The chain id the agent bills on; the provider must be on it. */
  chainId: bigint;
  store: LaneFundsStore;
  logger: Logger;
  /** How often the escrow's events are polled (default 4,000 ms). */
  pollMs?: number;
  /** Most blocks asked of one `eth_getLogs` (default 2,000): a long gap is caught up in several steps. */
  maxBlockRange?: number;
  /** With no successful poll for this long, the view is stale and no new credit is given (default 60,000 ms, at least 3 polls). */
  maxStaleMs?: number;
}

interface LaneState {
  remaining: bigint;
  settled: bigint;
  withdrawAmount: bigint;
  thawEnd: bigint;
  lapseAt: bigint;
  /** The block the lane was read at: events up to it are already counted. */
  asOf: number;
}

const CHECKPOINT_KEY = 'funds!checkpoint';
const escrowInterface = new ethers.Interface(ESCROW_ABI);
const EVENTS = ['LaneFunded', 'WithdrawRequested', 'WithdrawCancelled', 'Withdrawn', 'Settled', 'SettledPartial'] as const;
const EVENT_TOPICS = EVENTS.map((name) => escrowInterface.getEvent(name)!.topicHash);

const minBig = (a: bigint, b: bigint): bigint => (a < b ? a : b);
const toMicros = (v: bigint): number => (v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v));

export class LaneFunds {
  /** The escrow's thaw period in seconds (the settle horizon's default is built from it). */
  readonly thawSeconds: number;
  counters = { polls: 0, pollFailures: 0, events: 0, reads: 0 };
  private readonly lanes = new Map<string, LaneState>();
  private readonly reading = new Map<string, Promise<LaneState>>();
  private readonly contract: ethers.Contract;
  private readonly payoutTopic: string;
  private readonly pollMs: number;
  private readonly maxBlockRange: number;
  private readonly maxStaleMs: number;
  /** The next block whose events have not been applied. */
  private nextBlock: number;
  /** The latest block's timestamp as last seen, in Unix seconds: the escrow's clock for thaws. */
  private chainTimeS = 0;
  private lastPollOk: number;
  private timer: NodeJS.Timeout | undefined;
  private polling: Promise<void> | undefined;
  private closed = false;

  private constructor(
    private readonly options: LaneFundsOptions,
    thawSeconds: number,
    startBlock: number,
    chainTimeS: number,
  ) {
    this.thawSeconds = thawSeconds;
    this.nextBlock = startBlock;
    this.chainTimeS = chainTimeS;
    this.lastPollOk = Date.now();
    this.contract = new ethers.Contract(options.escrow, ESCROW_ABI, options.provider);
    this.payoutTopic = ethers.zeroPadValue(ethers.getAddress(options.payout), 32);
    this.pollMs = options.pollMs ?? 4_000;
    this.maxBlockRange = options.maxBlockRange ?? 2_000;
    this.maxStaleMs = Math.max(options.maxStaleMs ?? 60_000, 3 * this.pollMs);
  }

  /**
   * Checks the escrow (code, chain id), reads its thaw period and the follower's checkpoint (the
   * current block on first start), and starts following. Throws MESH_CONFIG or MESH_CHAIN_UNREACHABLE.
   */
  static async open(options: LaneFundsOptions): Promise<LaneFunds> {
    const escrow = await EscrowClient.connect({ runner: options.provider, escrow: options.escrow });
    if (escrow.domain.chainId !== BigInt(options.chainId)) {
      throw new MeshError('MESH_CONFIG', `the RPC endpoint is on chain ${escrow.domain.chainId}, the agent bills on ${options.chainId}`, {
        details: { rpcChainId: String(escrow.domain.chainId), agentChainId: String(options.chainId) },
      });
    }
    const thawSeconds = Number(await escrow.thawSeconds());
    const latest = await LaneFunds.latestBlock(options.provider);
    const stored = (await options.store.get(CHECKPOINT_KEY)) as number | undefined;
    const funds = new LaneFunds(options, thawSeconds, typeof stored === 'number' ? stored : latest.number + 1, latest.timestamp);
    if (typeof stored !== 'number') await options.store.put(CHECKPOINT_KEY, funds.nextBlock);
    funds.schedule();
    return funds;
  }

  private static async latestBlock(provider: ethers.Provider): Promise<{ number: number; timestamp: number }> {
    let block: ethers.Block | null;
    try {
      block = await provider.getBlock('latest');
    } catch (err) {
      throw new MeshError('MESH_CHAIN_UNREACHABLE', `latest block: ${(err as Error).message}`, {
        cause: err,
        details: { action: 'latest block' },
      });
    }
    if (!block)
      throw new MeshError('MESH_CHAIN_UNREACHABLE', 'latest block: the node returned none', { details: { action: 'latest block' } });
    return { number: block.number, timestamp: block.timestamp };
  }

  /** The lane as last known, or undefined before its first read (see `track`). */
  view(payer: string): LaneFundsView | undefined {
    const lane = this.lanes.get(payer.toLowerCase());
    return lane ? this.viewOf(lane) : undefined;
  }

  /** The lane's view, reading it from the chain on first use (concurrent first uses share one read). */
  async track(payerAddress: string): Promise<LaneFundsView> {
    const payer = payerAddress.toLowerCase();
    const known = this.lanes.get(payer);
    if (known) return this.viewOf(known);
    let read = this.reading.get(payer);
    if (!read) {
      read = this.read(payer).finally(() => this.reading.delete(payer));
      this.reading.set(payer, read);
    }
    return this.viewOf(await read);
  }

  /** Now in Unix seconds by the later of this clock and the chain's last block seen: expiries and thaws are judged by block time. */
  nowS(nowMs = Date.now()): number {
    return Math.max(this.chainTimeS, Math.floor(nowMs / 1000));
  }

  /** Whether the escrow's events were read recently enough to give credit (see `assertFresh`). */
  fresh(nowMs = Date.now()): boolean {
    return nowMs - this.lastPollOk <= this.maxStaleMs;
  }

  /** Throws MESH_CHAIN_UNREACHABLE when the events have not been read for too long: withdrawals could go unseen. */
  assertFresh(nowMs = Date.now()): void {
    if (!this.fresh(nowMs)) {
      throw new MeshError(
        'MESH_CHAIN_UNREACHABLE',
        `the escrow's events were last read ${Math.round((nowMs - this.lastPollOk) / 1000)} s ago: no new credit until the chain answers`,
        { details: { action: 'escrow events', lastReadMs: this.lastPollOk } },
      );
    }
  }

  /** Reads the events up to the latest block now (bounded ranges); resolves when caught up. For tests and shutdown. */
  async catchUp(): Promise<void> {
    await this.polling;
    this.polling = this.pollAll();
    try {
      await this.polling;
    } finally {
      this.polling = undefined;
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    await this.polling?.catch(() => {});
  }

  private viewOf(lane: LaneState): LaneFundsView {
    // The chain's clock, not ours: a thaw ends and a request lapses by block time. Whichever is later
    // counts, so a clock that lags between polls never keeps an armed withdrawal looking unarmed.
    const now = this.nowS();
    const pending = lane.thawEnd !== 0n && now < Number(lane.lapseAt);
    return {
      remaining: toMicros(lane.remaining),
      settled: toMicros(lane.settled),
      withdrawPending: pending,
      pendingWithdrawal: pending ? toMicros(minBig(lane.withdrawAmount, lane.remaining)) : 0,
      withdrawArmed: pending && now >= Number(lane.thawEnd),
      thawEnd: pending ? Number(lane.thawEnd) : 0,
    };
  }

  private async read(payer: string): Promise<LaneState> {
    const latest = await LaneFunds.latestBlock(this.options.provider);
    // Never read behind the follower: events it already applied to no lane would be lost for this one.
    latest.number = Math.max(latest.number, this.nextBlock - 1);
    let remaining: bigint;
    let settled: bigint;
    let withdrawAmount: bigint;
    let thawEnd: bigint;
    let lapseAt: bigint;
    try {
      [remaining, settled, , , withdrawAmount, thawEnd, lapseAt] = (await this.contract.getFunction('laneOf')(
        ethers.getAddress(payer),
        ethers.getAddress(this.options.payout),
        {
          blockTag: latest.number,
        },
      )) as [bigint, bigint, bigint, string, bigint, bigint, bigint];
    } catch (err) {
      throw new MeshError('MESH_CHAIN_UNREACHABLE', `laneOf(${payer}): ${(err as Error).message}`, {
        cause: err,
        details: { action: 'laneOf' },
      });
    }
    this.counters.reads++;
    this.chainTimeS = Math.max(this.chainTimeS, latest.timestamp);
    // A poll may have moved on while this read was out: keep whichever saw the later block.
    const known = this.lanes.get(payer);
    if (known && known.asOf >= latest.number) return known;
    const lane = { remaining, settled, withdrawAmount, thawEnd, lapseAt, asOf: latest.number };
    this.lanes.set(payer, lane);
    this.options.logger.debug({ payer, remaining: String(remaining), settled: String(settled), thawEnd: String(thawEnd) }, 'lane read');
    return lane;
  }

  private schedule(): void {
    if (this.closed) return;
    this.timer = setTimeout(() => {
      if (this.polling) return this.schedule();
      this.polling = this.pollAll()
        .catch((err: unknown) => {
          this.counters.pollFailures++;
          this.options.logger.warn({ err: (err as Error).message }, 'escrow events not read; trying again');
        })
        .finally(() => {
          this.polling = undefined;
          this.schedule();
        });
    }, this.pollMs);
    this.timer.unref();
  }

  /** One poll: every bounded range from the checkpoint up to the latest block, each applied and checkpointed in turn. */
  private async pollAll(): Promise<void> {
    const latest = await LaneFunds.latestBlock(this.options.provider);
    while (!this.closed && this.nextBlock <= latest.number) {
      const from = this.nextBlock;
      const to = Math.min(latest.number, from + this.maxBlockRange - 1);
      let logs: ethers.Log[];
      try {
        logs = await this.options.provider.getLogs({
          address: this.options.escrow,
          topics: [EVENT_TOPICS, null, this.payoutTopic],
          fromBlock: from,
          toBlock: to,
        });
      } catch (err) {
        throw new MeshError('MESH_CHAIN_UNREACHABLE', `escrow events ${from}-${to}: ${(err as Error).message}`, {
          cause: err,
          details: { action: 'escrow events' },
        });
      }
      for (const log of logs) this.apply(log);
      this.nextBlock = to + 1;
      await this.options.store.put(CHECKPOINT_KEY, this.nextBlock);
    }
    this.chainTimeS = Math.max(this.chainTimeS, latest.timestamp);
    this.counters.polls++;
    this.lastPollOk = Date.now();
  }

  private apply(log: ethers.Log): void {
    const parsed = escrowInterface.parseLog(log);
    if (!parsed) return;
    const payer = (parsed.args[0] as string).toLowerCase();
    const lane = this.lanes.get(payer);
    // A lane not read yet is read whole on first use; one read at or after this block already has it.
    if (!lane || log.blockNumber <= lane.asOf) return;
    this.counters.events++;
    switch (parsed.name) {
      case 'LaneFunded':
        // LaneFunded(signer, agent, from, amount, remaining)
        lane.remaining = parsed.args[4] as bigint;
        break;
      case 'WithdrawRequested':
        // WithdrawRequested(signer, agent, amount, thawEnd, lapseAt): a new request replaces the pending one.
        lane.withdrawAmount = parsed.args[2] as bigint;
        lane.thawEnd = parsed.args[3] as bigint;
        lane.lapseAt = parsed.args[4] as bigint;
        break;
      case 'WithdrawCancelled':
        lane.withdrawAmount = 0n;
        lane.thawEnd = 0n;
        lane.lapseAt = 0n;
        break;
      case 'Withdrawn': {
        // Withdrawn(signer, agent, owner, amount)
        const amount = parsed.args[3] as bigint;
        lane.remaining = lane.remaining > amount ? lane.remaining - amount : 0n;
        lane.withdrawAmount = 0n;
        lane.thawEnd = 0n;
        lane.lapseAt = 0n;
        break;
      }
      case 'Settled':
      case 'SettledPartial': {
        // Settled(signer, agent, cumulative, paid, fee, …): the agent's pay and the relayer's fee both leave the lane.
        const paid = parsed.args[3] as bigint;
        const fee = parsed.args[4] as bigint;
        lane.settled += paid;
        const out = paid + fee;
        lane.remaining = lane.remaining > out ? lane.remaining - out : 0n;
        break;
      }
    }
    this.options.logger.debug({ payer, event: parsed.name, block: log.blockNumber }, 'escrow event');
  }
}
