/**
 * Following a chain: whether the last block a follower read is still on the chain, for the three parts that
 * follow the escrow's events (the agent's lane funds and settler, the router's settlement listing). One rule,
 * each caller deciding what to do with the answer:
 *
 * - `on-chain`: the node has the block, with the hash the follower recorded: nothing it read was replaced;
 * - `node-behind`: the node's head is below the block, or the node does not have it. A load-balanced endpoint
 *   answers from a node a block or two behind as often as a chain goes shorter, and the two cannot be told apart
 *   from here: wait until the node is past the block, when its hash tells;
 * - `replaced`: the node has another block at that height: a reorg dropped blocks the follower read.
 *
 * Every call to the node is bounded by one deadline: a node that never answers gives MESH_CHAIN_UNREACHABLE
 * instead of holding the follower (and whatever waits on it) for ever.
 */
import { MeshError } from '@edge-mesh/protocol';
import type { ethers } from 'ethers';
import { toChainError } from './escrow.ts';

/** What the node says of the last block followed: see the module's comment. */
export type FollowedBlockState = 'on-chain' | 'node-behind' | 'replaced';

/** A block as a follower keeps it. */
export interface ChainBlock {
  number: number;
  hash: string;
  /** Unix seconds. */
  timestamp: number;
}

export interface FollowedBlockCheck {
  state: FollowedBlockState;
  /** The node's latest block (its head), as read for this check. */
  head: ChainBlock;
  /** The node's hash for the followed block, when it has that block (the caller's hash when unknown is taken from here). */
  hash: string | undefined;
}

/** How long a check waits for the node unless told (ms). */
export const DEFAULT_CHAIN_TIMEOUT_MS = 10_000;

/**
 * `work` bounded by `timeoutMs`: past it, MESH_CHAIN_UNREACHABLE (details `action`, `timeoutMs`); an error of the work
 * is passed on as it is. The work itself is not stopped: its late answer is dropped.
 */
export async function withChainTimeout<T>(work: Promise<T>, timeoutMs: number, action: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          new MeshError('MESH_CHAIN_UNREACHABLE', `${action}: the node did not answer within ${timeoutMs} ms`, {
            details: { action, timeoutMs },
          }),
        ),
      timeoutMs,
    );
    timer.unref();
  });
  try {
    return await Promise.race([work, late]);
  } finally {
    clearTimeout(timer);
    // A late rejection of the abandoned work must not surface as unhandled.
    work.catch(() => {});
  }
}

/** A block of the node, or undefined when it has none by that tag. */
async function blockOf(provider: ethers.Provider, tag: number | 'latest'): Promise<ChainBlock | undefined> {
  const block = await provider.getBlock(tag);
  if (!block?.hash) return undefined;
  return { number: block.number, hash: block.hash, timestamp: block.timestamp };
}

/**
 * Whether block `followed.number`, recorded with `followed.hash`, is still on the chain as `provider` sees it (see the
 * module's comment). An unknown hash (a record older than hashes) is not compared: a node that has the block answers
 * `on-chain` and gives its hash. Throws MESH_CHAIN_UNREACHABLE when the node fails or does not answer within
 * `timeoutMs` (default DEFAULT_CHAIN_TIMEOUT_MS), or has no latest block; the error's message and `details.action`
 * name `action`, what the caller was doing (default `block N`).
 */
export async function checkFollowedBlock(
  provider: ethers.Provider,
  followed: { number: number; hash: string | undefined },
  { timeoutMs = DEFAULT_CHAIN_TIMEOUT_MS, action = `block ${followed.number}` }: { timeoutMs?: number; action?: string } = {},
): Promise<FollowedBlockCheck> {
  if (!Number.isSafeInteger(followed.number) || followed.number < 0) {
    throw new MeshError('MESH_BAD_REQUEST', `the followed block must be a block number, not ${followed.number}`, {
      details: { field: 'number' },
    });
  }
  return withChainTimeout(
    (async (): Promise<FollowedBlockCheck> => {
      const head = await blockOf(provider, 'latest').catch((err: unknown) => {
        throw toChainError(err, action);
      });
      if (!head) {
        throw new MeshError('MESH_CHAIN_UNREACHABLE', `${action}: the node returned no latest block`, { details: { action } });
      }
      if (head.number < followed.number) return { state: 'node-behind', head, hash: undefined };
      const now =
        head.number === followed.number
          ? head
          : await blockOf(provider, followed.number).catch((err: unknown) => {
              throw toChainError(err, action);
            });
      if (!now) return { state: 'node-behind', head, hash: undefined };
      const state = followed.hash === undefined || now.hash === followed.hash ? 'on-chain' : 'replaced';
      return { state, head, hash: now.hash };
    })(),
    timeoutMs,
    action,
  );
}
