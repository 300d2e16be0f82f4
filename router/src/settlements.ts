/**
 * Operator endpoints for payment, read from the escrow (v2) on chain (the chain is the truth for money):
 *   GET /v1/lanes         every funded lane: payer (the voucher key), owner, payout, the agents quoting that
 *                         payout, remaining, settled, relayer fees, the pending withdrawal
 *   GET /v1/settlements   Settled, SettledPartial and SettleSkipped events, oldest first (?payer=0x…&agent=0x… filter)
 * ethers loads only when the router is given a chain.
 */

import { MeshError, skipReasonName, verifyQuote } from '@edge-mesh/protocol';
import type { ethers } from 'ethers';
import type { FastifyInstance } from 'fastify';
import type { RouterChainOptions, RouterHandle } from './handle.ts';
import { ANY_ERROR, errorResponse } from './http-errors.ts';

const LOG_RANGE = 5_000;

export async function registerSettlementRoutes(app: FastifyInstance, router: RouterHandle, chain: RouterChainOptions): Promise<void> {
  const { ethers } = await import('ethers');
  const { checkFollowedBlock, EscrowClient, ESCROW_ABI, toChainError } = await import('@edge-mesh/contracts');
  const iface = new ethers.Interface(ESCROW_ABI);
  const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: chain.escrow });
  const from = chain.fromBlock ?? 0;

  /**
   * The escrow's `event` logs, read once: each event keeps what was read, the next block to read and the hash
   * of the last block read, so a call reads only the blocks since the last one (in bounded ranges), never the
   * whole history again. The node is asked whether that block is still on the chain (`checkFollowedBlock`): a reorg
   * under what was kept (that block replaced) drops the event's logs and reads them again from the start, so a
   * settlement the reorg undid is not listed; a node behind that block is waited for, what was kept served meanwhile.
   * Filters apply to what is kept. A chain that cannot be read fails with MESH_CHAIN_UNREACHABLE (503).
   */
  const seen = new Map<string, { next: number; hash: string | undefined; logs: ethers.Log[]; reading: Promise<void> | undefined }>();
  const hashOf = async (block: number) => (await chain.provider.getBlock(block))?.hash ?? undefined;
  const catchUp = async (event: string) => {
    let entry = seen.get(event);
    if (!entry) {
      entry = { next: from, hash: undefined, logs: [], reading: undefined };
      seen.set(event, entry);
    }
    const e = entry;
    // One reader per event at a time: concurrent requests wait for the same read.
    e.reading ??= (async () => {
      try {
        let head: number;
        if (e.next > from) {
          const check = await checkFollowedBlock(chain.provider, { number: e.next - 1, hash: e.hash }, { action: `${event} logs` });
          // A node behind (a load balancer's) as often as a chain gone shorter: what is kept is served until the
          // chain is past that block again, when its hash tells a reorg.
          if (check.state === 'node-behind') return;
          if (check.state === 'replaced') {
            e.next = from;
            e.hash = undefined;
            e.logs = [];
          }
          head = check.head.number;
        } else head = await chain.provider.getBlockNumber();
        while (e.next <= head) {
          const to = Math.min(head, e.next + LOG_RANGE - 1);
          // The range's last block before its logs: a reorg in between changes that hash, seen by the next call.
          const hash = await hashOf(to);
          if (hash === undefined) return; // not on this node yet: read on the next call
          e.logs.push(
            ...(await chain.provider.getLogs({
              address: escrow.escrow,
              topics: [iface.getEvent(event)!.topicHash],
              fromBlock: e.next,
              toBlock: to,
            })),
          );
          e.next = to + 1;
          e.hash = hash;
        }
      } catch (err) {
        throw toChainError(err, `${event} logs`);
      } finally {
        e.reading = undefined;
      }
    })();
    await e.reading;
    return e.logs;
  };
  const logs = async (event: string, topics: (string | null)[] = []) =>
    (await catchUp(event)).filter((log) => topics.every((t, i) => t === null || log.topics[i + 1]?.toLowerCase() === t.toLowerCase()));

  const topicOf = (value: unknown, what: string): string | null => {
    if (value === undefined) return null;
    if (typeof value !== 'string' || !ethers.isAddress(value)) {
      throw new MeshError('MESH_BAD_REQUEST', `${what} is not an EVM address`, { details: { field: what } });
    }
    return ethers.zeroPadValue(ethers.getAddress(value), 32);
  };
  const agentsByPayout = () => {
    const map = new Map<string, string[]>();
    for (const { id, status } of router.agents()) {
      if (!status.quote) continue;
      let payout: string;
      try {
        payout = verifyQuote(status.quote, { agentId: id }).payout.toLowerCase();
      } catch {
        continue;
      }
      map.set(payout, [...(map.get(payout) ?? []), id]);
    }
    return map;
  };

  app.get(
    '/v1/lanes',
    {
      schema: {
        tags: ['operator'],
        summary:
          'Payment lanes on the escrow: funded, settled and remaining per (payer voucher key, agent), with owner and pending withdrawal',
        response: { 503: errorResponse('MESH_CHAIN_UNREACHABLE: the chain cannot be read now'), ...ANY_ERROR },
      },
    },
    async () => {
      const seen = new Map<string, { payer: string; payout: string }>();
      for (const log of await logs('LaneFunded')) {
        const ev = iface.parseLog(log)!;
        const payer = (ev.args[0] as string).toLowerCase();
        const payout = (ev.args[1] as string).toLowerCase();
        seen.set(`${payer}:${payout}`, { payer, payout });
      }
      const agents = agentsByPayout();
      const lanes = await Promise.all(
        [...seen.values()].map(async ({ payer, payout }) => {
          const lane = await escrow.laneOf(payer, payout);
          return {
            payer,
            owner: lane.owner.toLowerCase(),
            payout,
            agents: agents.get(payout) ?? [],
            remaining_micros: Number(lane.remaining),
            settled_micros: Number(lane.settled),
            fee_settled_micros: Number(lane.feeSettled),
            withdraw_micros: Number(lane.withdrawAmount),
            thaw_end: Number(lane.thawEnd),
            lapse_at: Number(lane.lapseAt),
          };
        }),
      );
      return { chain_id: Number(escrow.domain.chainId), escrow: escrow.escrow, lanes };
    },
  );

  app.get(
    '/v1/settlements',
    {
      schema: {
        tags: ['operator'],
        summary: 'Settlements on chain (Settled, SettledPartial and SettleSkipped events); filter with ?payer= and ?agent=',
        response: {
          400: errorResponse('MESH_BAD_REQUEST: payer or agent is not an EVM address (details.field)'),
          503: errorResponse('MESH_CHAIN_UNREACHABLE: the chain cannot be read now'),
          ...ANY_ERROR,
        },
      },
    },
    async (request) => {
      const q = request.query as { payer?: unknown; agent?: unknown };
      const topics = [topicOf(q.payer, 'payer'), topicOf(q.agent, 'agent')];
      const events = [
        ...(await logs('Settled', topics)),
        ...(await logs('SettledPartial', topics)),
        ...(await logs('SettleSkipped', topics)),
      ].sort((a, b) => a.blockNumber - b.blockNumber || a.index - b.index);
      const settlements = events.map((log) => {
        const ev = iface.parseLog(log)!;
        const base = {
          tx: log.transactionHash,
          block: log.blockNumber,
          payer: (ev.args[0] as string).toLowerCase(),
          payout: (ev.args[1] as string).toLowerCase(),
        };
        if (ev.name === 'SettleSkipped') {
          return { ...base, kind: 'skipped', reason: skipReasonName(ev.args[2] as bigint), cumulative_micros: Number(ev.args[3]) };
        }
        const partial = ev.name === 'SettledPartial';
        return {
          ...base,
          kind: partial ? 'partial' : 'settled',
          cumulative_micros: Number(ev.args[2]),
          delta_micros: Number(ev.args[3]),
          fee_micros: Number(ev.args[4]),
          ...(partial ? { unpaid_micros: Number(ev.args[5]) } : {}),
          receipts_root: ev.args[partial ? 6 : 5] as string,
        };
      });
      const sum = (field: 'delta_micros' | 'fee_micros') =>
        settlements.reduce((s, e) => s + (field in e ? (e as Record<typeof field, number>)[field] : 0), 0);
      return { settlements, settled_micros: sum('delta_micros'), fees_micros: sum('fee_micros') };
    },
  );
}
