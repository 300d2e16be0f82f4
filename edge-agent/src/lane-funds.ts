/**
 * The escrow's view of this agent's lanes: what each payer's lane holds, what has been settled on it,
 * and any withdrawal in progress. The credit rule (payments.ts, docs/settlement.md "The credit rule")
 * extends credit only against money that is there, so it reads the chain here, and only here:
 *
 * - the escrow's events for this payout (funding, withdrawals, settlements) are followed by polling
 *   `eth_getLogs` in bounded block ranges, up to the *followed head*: `confirmations` blocks below the
 *   latest, or the node's `safe`/`finalized` block. Blocks above it may still be dropped by a reorg and are
 *   not believed. The checkpoint (the next block to read, and the hash of the last block read) is kept in
 *   the agent's store, so a restart resumes where it stopped instead of looking back a fixed number of blocks;
 * - a lane's first use catches the follower up and reads `laneOf(payer, payout)` at the followed head, so
 *   the read and the events after it describe one chain; an event at or before the block a lane was read at
 *   is already in that read and is skipped;
 * - the view heals itself: every poll asks the node whether the last block it followed is still on the chain
 *   with the hash it recorded (`checkFollowedBlock`, @edge-mesh/contracts). When that block was replaced (a reorg
 *   dropped blocks the follower had read), every lane is dropped from the view and read again with `laneOf` at
 *   the new followed head, and the follower goes on from there: an event that the reorg removed no longer counts,
 *   and no credit is given against a lane until it is read again. A node behind that block (its head below it,
 *   or the block not found: a load-balanced endpoint's lagging node) is waited for: the view is kept, and the
 *   poll does not count as a read of the events. Lanes in use are also read again every `refreshMs`;
 * - every call to the node is bounded (`chainTimeoutMs`), and a lane's first read has its own bound
 *   (`readTimeoutMs`): a node that never answers fails the request with MESH_CHAIN_UNREACHABLE, never holds it.
 *
 * Written against escrow v2: `laneOf → remaining, settled, feeSettled, owner, withdrawAmount, thawEnd,
 * lapseAt`; a withdrawal takes a fixed amount between its thaw's end and its lapse, and a settlement pays
 * the agent first and then a relayer fee, both from the lane. Switching to another escrow means changing
 * this module only: the rest of the agent sees `LaneFundsView`.
 */
import { checkFollowedBlock, DEFAULT_CHAIN_TIMEOUT_MS, ESCROW_ABI, EscrowClient, withChainTimeout } from '@edge-mesh/contracts';
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
  /**
   * How far behind the chain's head events are believed: a number of blocks below the latest, or the node's
   * `safe` or `finalized` block (default 0: the latest block, right for a local dev chain only; see
   * `defaultConfirmations`).
   */
  confirmations?: Confirmations;
  /** Lanes used since the last refresh are read again with `laneOf` this often (default 60,000 ms). */
  refreshMs?: number;
  /** Longest wait for one answer of the node (a block, a range of events, a `laneOf`) before MESH_CHAIN_UNREACHABLE (default 10,000 ms). */
  chainTimeoutMs?: number;
  /**
   * Longest wait of a lane's first read (`track`), its turn behind a poll included, before MESH_CHAIN_UNREACHABLE
   * (default 15,000 ms).
   */
  readTimeoutMs?: number;
}

/** How deep a block must be before its events count: blocks below the latest, or a block tag of the node. */
export type Confirmations = number | 'safe' | 'finalized';

/** Chain ids of local development chains (Hardhat, Anvil, Ganache, geth --dev): nothing there reorganises unasked. */
const LOCAL_CHAIN_IDS = new Set([31337n, 1337n]);

/** The depth used on any other chain when none is given. */
export const PUBLIC_CHAIN_CONFIRMATIONS = 12;

/** The default depth for a chain: 0 on a local development chain, `PUBLIC_CHAIN_CONFIRMATIONS` blocks elsewhere. */
export function defaultConfirmations(chainId: bigint | number): Confirmations {
  const id = typeof chainId === 'bigint' ? chainId : Number.isSafeInteger(chainId) ? BigInt(chainId) : -1n;
  return LOCAL_CHAIN_IDS.has(id) ? 0 : PUBLIC_CHAIN_CONFIRMATIONS;
}

/** A depth as written in a flag or a file ("12", "safe", "finalized"); anything else is MESH_CONFIG. */
export function parseConfirmations(value: unknown): Confirmations {
  if (value === 'safe' || value === 'finalized') return value;
  const n = typeof value === 'string' && value.trim() !== '' ? Number(value) : value;
  if (typeof n === 'number' && Number.isSafeInteger(n) && n >= 0) return n;
  throw new MeshError(
    'MESH_CONFIG',
    `confirmations must be a whole number of blocks (0 or more), "safe" or "finalized", not ${JSON.stringify(value)}`,
    {
      details: { field: 'confirmations' },
    },
  );
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

/** Where the follower stands: the next block to read, and the hash of the block before it (the last one read). */
export interface FundsCheckpoint {
  next: number;
  hash: string | undefined;
}

interface BlockRef {
  number: number;
  hash: string;
  timestamp: number;
}

const CHECKPOINT_KEY = 'funds!checkpoint';
const DEFAULT_READ_TIMEOUT_MS = 15_000;
/** `laneOf` calls made at once by a refresh or a turn of first reads. */
const LANE_READS_AT_ONCE = 8;
const escrowInterface = new ethers.Interface(ESCROW_ABI);
const EVENTS = ['LaneFunded', 'WithdrawRequested', 'WithdrawCancelled', 'Withdrawn', 'Settled', 'SettledPartial'] as const;
const EVENT_TOPICS = EVENTS.map((name) => escrowInterface.getEvent(name)!.topicHash);

const minBig = (a: bigint, b: bigint): bigint => (a < b ? a : b);
const toMicros = (v: bigint): number => (v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v));

export class LaneFunds {
  /** The escrow's thaw period in seconds (the settle horizon's default is built from it). */
  readonly thawSeconds: number;
  /**
   * `reorgs`: times the follower found blocks it had read replaced and read its lanes again; `behind`: polls that found
   * the node behind the last block followed and waited for it; `refreshes`: lanes read again on the timer.
   */
  counters = { polls: 0, pollFailures: 0, events: 0, reads: 0, reorgs: 0, behind: 0, refreshes: 0 };
  private readonly lanes = new Map<string, LaneState>();
  private readonly reading = new Map<string, Promise<LaneState>>();
  /** Lanes used since the last refresh. */
  private readonly used = new Set<string>();
  private readonly contract: ethers.Contract;
  private readonly payoutTopic: string;
  private readonly pollMs: number;
  private readonly maxBlockRange: number;
  private readonly maxStaleMs: number;
  private readonly refreshMs: number;
  private readonly confirmations: Confirmations;
  private readonly chainTimeoutMs: number;
  private readonly readTimeoutMs: number;
  /** The node's head when the last poll found it behind the last block followed (undefined: it was not). */
  private nodeBehind: number | undefined;
  /** The next block whose events have not been applied. */
  private nextBlock: number;
  /** The hash of block `nextBlock - 1` when it was read (undefined only for a checkpoint stored before hashes were). */
  private lastHash: string | undefined;
  /** The latest block's timestamp as last seen, in Unix seconds: the escrow's clock for thaws. */
  private chainTimeS = 0;
  private lastPollOk: number;
  private lastRefresh: number;
  /** Polls completed: a first read that finds one completed since it was asked for need not poll again. */
  private pollsDone = 0;
  private timer: NodeJS.Timeout | undefined;
  /** First reads waiting for the next turn of the lock (see `readSoon`). */
  private queued: { waiting: Map<string, { resolve: (lane: LaneState) => void; reject: (err: unknown) => void }> } | undefined;
  /** Polls, reads and re-reads run one at a time, so a read and the events applied after it describe one chain. */
  private lock: Promise<unknown> = Promise.resolve();
  private closed = false;

  private constructor(
    private readonly options: LaneFundsOptions,
    thawSeconds: number,
    checkpoint: FundsCheckpoint,
    chainTimeS: number,
  ) {
    this.thawSeconds = thawSeconds;
    this.nextBlock = checkpoint.next;
    this.lastHash = checkpoint.hash;
    this.chainTimeS = chainTimeS;
    this.lastPollOk = Date.now();
    this.lastRefresh = Date.now();
    this.contract = new ethers.Contract(options.escrow, ESCROW_ABI, options.provider);
    this.payoutTopic = ethers.zeroPadValue(ethers.getAddress(options.payout), 32);
    this.pollMs = options.pollMs ?? 4_000;
    this.maxBlockRange = options.maxBlockRange ?? 2_000;
    this.maxStaleMs = Math.max(options.maxStaleMs ?? 60_000, 3 * this.pollMs);
    this.refreshMs = options.refreshMs ?? 60_000;
    this.confirmations = options.confirmations === undefined ? 0 : parseConfirmations(options.confirmations);
    this.chainTimeoutMs = options.chainTimeoutMs ?? DEFAULT_CHAIN_TIMEOUT_MS;
    this.readTimeoutMs = options.readTimeoutMs ?? DEFAULT_READ_TIMEOUT_MS;
  }

  /**
   * Checks the escrow (code, chain id), reads its thaw period and the follower's checkpoint (the followed
   * head on first start), and starts following. Throws MESH_CONFIG or MESH_CHAIN_UNREACHABLE.
   */
  static async open(options: LaneFundsOptions): Promise<LaneFunds> {
    const escrow = await EscrowClient.connect({ runner: options.provider, escrow: options.escrow });
    if (escrow.domain.chainId !== BigInt(options.chainId)) {
      throw new MeshError('MESH_CONFIG', `the RPC endpoint is on chain ${escrow.domain.chainId}, the agent bills on ${options.chainId}`, {
        details: { rpcChainId: String(escrow.domain.chainId), agentChainId: String(options.chainId) },
      });
    }
    const thawSeconds = Number(await escrow.thawSeconds());
    const confirmations = options.confirmations === undefined ? 0 : parseConfirmations(options.confirmations);
    const timeoutMs = options.chainTimeoutMs ?? DEFAULT_CHAIN_TIMEOUT_MS;
    const latest = await LaneFunds.block(options.provider, 'latest', timeoutMs);
    // On the first start the follower begins at the followed head; a node without the block tag asked for fails here.
    const head = await LaneFunds.followedHead(options.provider, confirmations, latest, timeoutMs);
    const stored = (await options.store.get(CHECKPOINT_KEY)) as FundsCheckpoint | number | undefined;
    const checkpoint: FundsCheckpoint =
      typeof stored === 'number'
        ? { next: stored, hash: undefined }
        : stored && typeof stored.next === 'number'
          ? { next: stored.next, hash: typeof stored.hash === 'string' ? stored.hash : undefined }
          : { next: head.number + 1, hash: head.hash };
    const funds = new LaneFunds(options, thawSeconds, checkpoint, latest.timestamp);
    if (stored === undefined) await funds.saveCheckpoint();
    funds.schedule();
    return funds;
  }

  private static async block(provider: ethers.Provider, tag: number | string, timeoutMs: number): Promise<BlockRef> {
    const what = typeof tag === 'number' ? `block ${tag}` : `${tag} block`;
    let block: ethers.Block | null;
    try {
      block = await withChainTimeout(provider.getBlock(tag), timeoutMs, what);
    } catch (err) {
      if (err instanceof MeshError) throw err; // no answer within timeoutMs
      throw new MeshError('MESH_CHAIN_UNREACHABLE', `${what}: ${(err as Error).message}`, {
        cause: err,
        details: { action: what },
      });
    }
    if (!block?.hash) throw new MeshError('MESH_CHAIN_UNREACHABLE', `${what}: the node returned none`, { details: { action: what } });
    return { number: block.number, hash: block.hash, timestamp: block.timestamp };
  }

  /** The highest block whose events are believed: `confirmations` below `latest`, or the node's safe/finalized block. */
  private static async followedHead(
    provider: ethers.Provider,
    confirmations: Confirmations,
    latest: BlockRef,
    timeoutMs: number,
  ): Promise<BlockRef> {
    if (typeof confirmations !== 'number') {
      const tagged = await LaneFunds.block(provider, confirmations, timeoutMs);
      return tagged.number > latest.number ? latest : tagged;
    }
    const number = Math.max(0, latest.number - confirmations);
    return number === latest.number ? latest : LaneFunds.block(provider, number, timeoutMs);
  }

  /** The lane as last known, or undefined before its first read (see `track`). `use` (default true) counts the lane as in use. */
  view(payer: string, use = true): LaneFundsView | undefined {
    const key = payer.toLowerCase();
    const lane = this.lanes.get(key);
    if (lane && use) this.used.add(key);
    return lane ? this.viewOf(lane) : undefined;
  }

  /**
   * The lane's view, reading it from the chain on first use (concurrent first uses share one read). A first read not
   * done within `readTimeoutMs` (its turn behind a poll included) fails with MESH_CHAIN_UNREACHABLE; the read goes on,
   * and a later use takes its result.
   */
  async track(payerAddress: string): Promise<LaneFundsView> {
    const payer = payerAddress.toLowerCase();
    this.used.add(payer);
    const known = this.lanes.get(payer);
    if (known) return this.viewOf(known);
    let read = this.reading.get(payer);
    if (!read) {
      read = this.readSoon(payer).finally(() => this.reading.delete(payer));
      this.reading.set(payer, read);
    }
    return this.viewOf(await withChainTimeout(read, this.readTimeoutMs, `first read of lane ${payer}`));
  }

  /**
   * A first read, in the next turn of the lock: every first read asked for before that turn starts shares it (after
   * a reorg every lane in use is read again at once), caught up first (unless a poll ended since the turn was asked
   * for) so the lanes are read at the followed head, LANE_READS_AT_ONCE at a time, each lane's caller answered as
   * soon as its own read ends.
   */
  private readSoon(payer: string): Promise<LaneState> {
    let batch = this.queued;
    if (!batch) {
      const waiting = new Map<string, { resolve: (lane: LaneState) => void; reject: (err: unknown) => void }>();
      const asked = this.pollsDone;
      const turn = this.exclusive(async () => {
        if (this.queued?.waiting === waiting) this.queued = undefined;
        if (this.pollsDone === asked) await this.poll();
        if (this.nodeBehind !== undefined) {
          // No `laneOf` at a block the node does not have: the lane is read once the node is past it.
          throw new MeshError(
            'MESH_CHAIN_UNREACHABLE',
            `the node is behind the last block followed (its head ${this.nodeBehind}, followed ${this.nextBlock - 1}): the lane is read once it is past it`,
            { details: { action: 'laneOf', head: this.nodeBehind, followed: this.nextBlock - 1 } },
          );
        }
        const payers = [...waiting.keys()];
        const block = this.nextBlock - 1;
        for (let i = 0; i < payers.length; i += LANE_READS_AT_ONCE) {
          await Promise.all(
            payers.slice(i, i + LANE_READS_AT_ONCE).map(async (p) => {
              const caller = waiting.get(p)!;
              try {
                caller.resolve(this.lanes.get(p) ?? (await this.read(p, block)));
              } catch (err) {
                caller.reject(err);
              }
            }),
          );
        }
      });
      // A failed poll fails every read of the turn (a settled caller ignores it).
      turn.catch((err: unknown) => {
        for (const caller of waiting.values()) caller.reject(err);
      });
      batch = { waiting };
      this.queued = batch;
    }
    const { waiting } = batch;
    return new Promise<LaneState>((resolve, reject) => waiting.set(payer, { resolve, reject }));
  }

  /** Now in Unix seconds by the later of this clock and the chain's last block seen: expiries and thaws are judged by block time. */
  nowS(nowMs = Date.now()): number {
    return Math.max(this.chainTimeS, Math.floor(nowMs / 1000));
  }

  /**
   * How the view stands against the chain, for a payer told its lane holds too little: the last block followed, and
   * in words how deep a block must be to count (empty at a depth of 0).
   */
  depth(): { block: number; confirmations: Confirmations; words: string } {
    const c = this.confirmations;
    const words =
      c === 0
        ? ''
        : `${typeof c === 'number' ? `${c} block${c === 1 ? '' : 's'} below the latest` : `the node's ${c} block`}: a deposit counts once it is that deep`;
    return { block: this.nextBlock - 1, confirmations: c, words };
  }

  /** Where the follower stands: the next block it reads and the hash it recorded for the one before. */
  checkpoint(): FundsCheckpoint {
    return { next: this.nextBlock, hash: this.lastHash };
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

  /** Reads the events up to the followed head now (bounded ranges), healing the view first after a reorg; resolves when caught up. For tests and shutdown. */
  catchUp(): Promise<void> {
    return this.exclusive(() => this.poll());
  }

  async close(): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    await this.lock.catch(() => {});
  }

  /** Runs `fn` after everything queued before it (polls, reads), never beside them. */
  private exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.lock.then(fn, fn);
    this.lock = run.catch(() => {});
    return run;
  }

  private saveCheckpoint(): Promise<void> {
    return this.options.store.put(CHECKPOINT_KEY, { next: this.nextBlock, hash: this.lastHash } satisfies FundsCheckpoint);
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

  /** Reads the lane at `block` (the follower's last block: the events after it are applied by the polls that follow). */
  private async read(payer: string, block: number): Promise<LaneState> {
    let remaining: bigint;
    let settled: bigint;
    let withdrawAmount: bigint;
    let thawEnd: bigint;
    let lapseAt: bigint;
    try {
      [remaining, settled, , , withdrawAmount, thawEnd, lapseAt] = (await withChainTimeout(
        this.contract.getFunction('laneOf')(ethers.getAddress(payer), ethers.getAddress(this.options.payout), {
          blockTag: Math.max(0, block),
        }),
        this.chainTimeoutMs,
        'laneOf',
      )) as [bigint, bigint, bigint, string, bigint, bigint, bigint];
    } catch (err) {
      throw new MeshError('MESH_CHAIN_UNREACHABLE', `laneOf(${payer}) at block ${block}: ${(err as Error).message}`, {
        cause: err,
        details: { action: 'laneOf' },
      });
    }
    this.counters.reads++;
    const lane = { remaining, settled, withdrawAmount, thawEnd, lapseAt, asOf: block };
    this.lanes.set(payer, lane);
    this.options.logger.debug(
      { payer, block, remaining: String(remaining), settled: String(settled), thawEnd: String(thawEnd) },
      'lane read',
    );
    return lane;
  }

  private schedule(): void {
    if (this.closed) return;
    this.timer = setTimeout(() => {
      void this.exclusive(() => this.poll())
        .catch((err: unknown) => {
          this.counters.pollFailures++;
          this.options.logger.warn({ err: (err as Error).message }, 'escrow events not read; trying again');
        })
        .finally(() => this.schedule());
    }, this.pollMs);
    this.timer.unref();
  }

  /**
   * One poll (under the lock): asks the node whether the last block followed is still on the chain. A node behind it
   * is waited for (the view is kept; with no lane in the view, nothing depends on the blocks it lacks, and the
   * follower goes on from the node's followed head); a replaced block heals the view. Then every bounded range from
   * the checkpoint up to the followed head, each applied and checkpointed with the hash of its last block; then, when
   * due, the lanes in use are read again.
   */
  private async poll(): Promise<void> {
    const provider = this.options.provider;
    const timeoutMs = this.chainTimeoutMs;
    const last = this.nextBlock - 1;
    this.nodeBehind = undefined;
    let latest: BlockRef;
    let replaced: Record<string, unknown> | undefined;
    let behind = false;
    if (last < 0) latest = await LaneFunds.block(provider, 'latest', timeoutMs);
    else {
      const check = await checkFollowedBlock(provider, { number: last, hash: this.lastHash }, { timeoutMs });
      latest = check.head;
      if (check.state === 'node-behind') {
        if (this.lanes.size > 0) {
          // Not a reorg: a node that has not got the block yet. What was read stays; its events are read once it has.
          this.nodeBehind = latest.number;
          this.counters.behind++;
          this.options.logger.debug({ last, head: latest.number }, 'the node is behind the last block followed: waiting for it');
          return;
        }
        behind = true;
      } else if (check.state === 'replaced') replaced = { last, was: this.lastHash, now: check.hash };
      else if (this.lastHash === undefined) {
        // A checkpoint stored before hashes were: nothing is known of its block, and no lane was read against it.
        this.lastHash = check.hash;
        await this.saveCheckpoint();
      }
    }
    const head = await LaneFunds.followedHead(provider, this.confirmations, latest, timeoutMs);
    if (replaced) await this.heal(head, 'the last block followed was replaced', replaced);
    else if (behind) {
      // No lane is in the view (after a start, say): no read stands on the blocks the node lacks, so the follower goes on
      // from where the node is, whether it lags or the chain went shorter. Nothing is dropped: not a reorg.
      this.nextBlock = head.number + 1;
      this.lastHash = head.hash;
      await this.saveCheckpoint();
      this.options.logger.info(
        { last, head: head.number },
        'the node is behind the last block followed and no lane is read: following from its head',
      );
    }
    while (!this.closed && this.nextBlock <= head.number) {
      const from = this.nextBlock;
      const to = Math.min(head.number, from + this.maxBlockRange - 1);
      // The range's last block is fetched before its logs: if a reorg lands in between, its hash no longer
      // matches the chain at the next poll, and the view heals then.
      const end = to === head.number ? head : await LaneFunds.block(provider, to, timeoutMs);
      let logs: ethers.Log[];
      try {
        logs = await withChainTimeout(
          provider.getLogs({
            address: this.options.escrow,
            topics: [EVENT_TOPICS, null, this.payoutTopic],
            fromBlock: from,
            toBlock: to,
          }),
          timeoutMs,
          `escrow events ${from}-${to}`,
        );
      } catch (err) {
        throw new MeshError('MESH_CHAIN_UNREACHABLE', `escrow events ${from}-${to}: ${(err as Error).message}`, {
          cause: err,
          details: { action: 'escrow events' },
        });
      }
      for (const log of logs) this.apply(log);
      this.nextBlock = to + 1;
      this.lastHash = end.hash;
      await this.saveCheckpoint();
    }
    if (!this.closed && Date.now() - this.lastRefresh >= this.refreshMs) await this.refresh();
    this.chainTimeS = Math.max(this.chainTimeS, latest.timestamp);
    this.counters.polls++;
    this.pollsDone++;
    this.lastPollOk = Date.now();
  }

  /**
   * A reorg took blocks the follower had read: what their events did to the lanes cannot be told apart any more.
   * Every lane leaves the view (no credit against it until it is read again), and the follower moves to the followed
   * head. Each lane is read there on its next use (`track`), not here: reading every lane the agent knows under the
   * lock would hold each lane in use behind all the idle ones (and behind a read the node never answers).
   */
  private async heal(head: BlockRef, why: string, details: Record<string, unknown>): Promise<void> {
    const lanes = this.lanes.size;
    this.lanes.clear();
    this.nextBlock = head.number + 1;
    this.lastHash = head.hash;
    await this.saveCheckpoint();
    this.counters.reorgs++;
    this.options.logger.warn({ ...details, head: head.number, lanes }, `${why}: a reorg; each lane is read again on its next use`);
  }

  /** Reads the lanes in use again at the follower's last block (a reorg the checks missed is corrected here). */
  private async refresh(): Promise<void> {
    const payers: string[] = [];
    for (const p of this.used) {
      if (this.lanes.has(p)) payers.push(p);
      // A lane whose first read is still under way stays marked: the next refresh reads it, though it is not used again.
      if (!this.reading.has(p)) this.used.delete(p);
    }
    this.lastRefresh = Date.now();
    await this.readEach(payers, this.nextBlock - 1);
    this.counters.refreshes += payers.length;
  }

  private async readEach(payers: string[], block: number): Promise<void> {
    for (let i = 0; i < payers.length && !this.closed; i += LANE_READS_AT_ONCE) {
      await Promise.all(
        payers.slice(i, i + LANE_READS_AT_ONCE).map((payer) =>
          this.read(payer, block).catch((err: unknown) => {
            this.lanes.delete(payer);
            this.options.logger.warn({ payer, err: (err as Error).message }, 'lane not read again: it is read on its next use');
          }),
        ),
      );
    }
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
