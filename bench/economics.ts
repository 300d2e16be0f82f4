/**
 * economics: what honest agents and payers lose to dishonest ones, over many simulated hours, with the
 * real payment code (docs/settlement.md) and a real local chain (docs/benchmarks.md, "economics").
 *
 * A fleet of honest and dishonest agents and payers (bench/economics-fleet.ts) trades through an
 * in-memory network that loses and delays messages. Time runs in rounds: each round every payer sends
 * its requests, the network settles, then the chain's clock moves on by `roundSeconds` (increaseTime),
 * every agent reads the escrow's events, and every `settleEveryRounds` rounds each agent's relayer
 * settles the lanes that are due. Funding, registration, withdrawals (with their thaw), settlements and
 * the fee attack are real transactions. Scripted events happen at fixed rounds: a payer stops its
 * vouchers, another asks to withdraw and withdraws after the thaw, another drains its lane through a
 * relayer fee, an honest agent and an honest payer restart from their stores. At the end the network
 * heals, two more rounds let lost vouchers and receipts be caught up, every agent settles what it
 * holds, and the chain is read.
 *
 * What is measured against what (the last JSON line; fields in docs/benchmarks.md):
 * - honest_agents_paid_of_owed: on-chain payments to honest agents on honest payers' lanes ÷ the value of
 *   the work those payers asked for and got in time (the ledger's count, not the payer's);
 * - honest_payers_overpaid_micros: what honest payers' lanes paid out (to agent and relayer) beyond that
 *   value, over every agent;
 * - max_honest_loss_windows: per (honest party, dishonest party), what the honest one lost in the
 *   agent's credit windows: an honest agent's billed-but-unpaid work on a dishonest payer's lane, an
 *   honest payer's overpayment to a dishonest agent;
 * - gas_per_receipt: the honest agents' settlement gas ÷ the receipts those settlements paid for.
 */

import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, startLocalChain } from '@edge-mesh/contracts/dev';
import { agentBindingMessage, type EscrowDomain, MAX_UINT96, MeshError, signBytes, signVoucher, toHex } from '@edge-mesh/protocol';
import { type AgentBehaviour, Ledger, Network, type PayerBehaviour, SimAgent, SimImpersonator, SimPayer } from './economics-fleet.ts';
import type { BenchContext, BenchResult } from './lib.ts';
import { Rng } from './sim/rng.ts';

export const DISHONEST_AGENTS: readonly AgentBehaviour[] = ['invent', 'inflate', 'ok-on-error', 'late', 'squat', 'drop', 'refuse-resync'];
export const DISHONEST_PAYERS: readonly PayerBehaviour[] = [
  'never-fund',
  'underfund',
  'stop-vouchers',
  'refuse-receipts',
  'withdraw',
  'fee-relay',
];

export interface EconomicsConfig {
  seed: number;
  honestAgents: number;
  honestPayers: number;
  rounds: number;
  /** Simulated seconds per round (the chain's clock moves this much after each). */
  roundSeconds: number;
  /** The relayers check their lanes every this many rounds. */
  settleEveryRounds: number;
  /** Requests per lane per round: to an honest agent, to a dishonest agent, and the fee relayer's (a heavy user). */
  perRound: { honest: number; dishonestAgent: number; heavy: number };
  /** How many of the honest payers also use the dishonest agents. */
  dishonestAgentUsers: number;
  /** Probability that any one message is lost. */
  loss: number;
  delayMs: [number, number];
  deadlineMs: number;
  priceMicros: number;
  creditRequests: number;
  /** A lane is due for settlement once it owes this many requests' worth. */
  settleReceipts: number;
  thawSeconds: number;
  voucherDelayMs: number;
}

export function quickConfig(seed = 1): EconomicsConfig {
  return {
    seed,
    honestAgents: 2,
    honestPayers: 40,
    rounds: 8,
    roundSeconds: 900,
    settleEveryRounds: 4,
    perRound: { honest: 25, dishonestAgent: 2, heavy: 80 },
    dishonestAgentUsers: 10,
    loss: 0.005,
    delayMs: [1, 10],
    // Long enough that a loaded machine's event loop never makes an honest reply late.
    deadlineMs: 5_000,
    priceMicros: 120,
    creditRequests: 16,
    settleReceipts: 75,
    thawSeconds: 3_600,
    // Vouchers wait up to a second for more receipts (the SDK's default is 50 ms): at these rates a lane
    // then signs about one voucher per half credit window instead of one per request.
    voucherDelayMs: 1_000,
  };
}

/** Twelve simulated hours; each honest agent's relayer then settles about 48 lanes per transaction (its batch is 50). */
export function fullConfig(seed = 1): EconomicsConfig {
  return { ...quickConfig(seed), honestAgents: 3, honestPayers: 46, rounds: 48 };
}

/** Rounds at which the scripted events happen. */
function schedule(c: EconomicsConfig) {
  const half = Math.ceil(c.rounds / 2);
  let feeAttack = c.rounds;
  for (let r = half + 1; r < c.rounds; r++) {
    if ((r + 1) % c.settleEveryRounds === 0) {
      feeAttack = r;
      break;
    }
  }
  return {
    stopVouchers: Math.max(2, Math.floor(c.rounds / 4)),
    withdraw: Math.max(2, Math.floor(c.rounds / 4)),
    agentRestart: Math.max(2, half - 1),
    payerRestart: Math.min(c.rounds, half + 1),
    /** The round before a settlement check, past the middle: the lane then owes the most that is not settled. */
    feeAttack,
  };
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export interface EconomicsRun {
  result: BenchResult;
  /** Per behaviour, how many times it was actually exercised. */
  exercised: Record<string, number>;
}

/** Runs the fleet with `config`; `log` gets the progress. */
export async function runEconomics(config: EconomicsConfig, log: (line: string) => void): Promise<EconomicsRun> {
  const c = config;
  const at = schedule(c);
  const rng = new Rng(c.seed, 'economics');
  const net = new Network(Rng.stream(c.seed, 'network'), c.loss, c.delayMs);
  const ledger = new Ledger();
  const honestAgentCount = c.honestAgents;
  const agentCount = honestAgentCount + DISHONEST_AGENTS.length;
  const payerCount = c.honestPayers + DISHONEST_PAYERS.length;
  const started = performance.now();
  const dir = await mkdtemp(path.join(os.tmpdir(), 'edge-mesh-economics-'));
  const chain: LocalChain = await startLocalChain({ accounts: 2 + agentCount + payerCount, startTimeoutMs: 40_000, log });
  try {
    const deployment = await deployMesh(chain.wallet(0), { thawSeconds: c.thawSeconds });
    const domain: EscrowDomain = { chainId: deployment.chainId, escrow: deployment.escrow };
    log(`escrow ${deployment.escrow}; chain up in ${Math.round(performance.now() - started)} ms`);

    // --- the fleet
    const agents = new Map<string, SimAgent>();
    const byClient = new Map<string, SimPayer | SimImpersonator>();
    const agentList: SimAgent[] = [];
    const behaviours: AgentBehaviour[] = [...Array<AgentBehaviour>(honestAgentCount).fill('honest'), ...DISHONEST_AGENTS];
    let account = 1;
    const settleThreshold = c.settleReceipts * c.priceMicros;
    for (const [i, behaviour] of behaviours.entries()) {
      const wallet = chain.wallet(account++);
      const payout = behaviour === 'squat' ? agentList[0]!.setup.payout : wallet.address.toLowerCase();
      const agent = new SimAgent(
        {
          behaviour,
          wallet,
          payout,
          domain,
          provider: chain.provider,
          dataDir: path.join(dir, `agent-${i}`),
          priceMicros: c.priceMicros,
          creditRequests: c.creditRequests,
          settleThresholdMicros: behaviour === 'squat' ? undefined : settleThreshold,
        },
        net,
        ledger,
        byClient,
      );
      agentList.push(agent);
      agents.set(agent.id, agent);
    }
    await Promise.all(
      agentList.map(async (a) => {
        await a.start();
        if (a.behaviour === 'squat') return; // it cannot register a payout it does not hold
        const escrow = await EscrowClient.connect({ runner: a.setup.wallet, escrow: domain.escrow });
        await escrow.registerAgent(a.identity.publicKey, signBytes(a.identity, agentBindingMessage(domain, a.setup.payout)));
      }),
    );
    const honestAgents = agentList.filter((a) => a.behaviour === 'honest');
    const payerBehaviours: PayerBehaviour[] = [...Array<PayerBehaviour>(c.honestPayers).fill('honest'), ...DISHONEST_PAYERS];
    const payers: SimPayer[] = payerBehaviours.map(
      (behaviour, i) =>
        new SimPayer(
          {
            behaviour,
            wallet: chain.wallet(account++),
            domain,
            provider: chain.provider,
            dataDir: path.join(dir, `payer-${i}`),
            deadlineMs: c.deadlineMs,
            voucherDelayMs: c.voucherDelayMs,
          },
          i,
          net,
          ledger,
          agents,
        ),
    );
    for (const p of payers) byClient.set(p.clientId, p);
    const impersonator = new SimImpersonator(net, ledger, domain, chain.wallet(account++));
    byClient.set(impersonator.clientId, impersonator);
    const honestPayers = payers.filter((p) => p.behaviour === 'honest');
    const payerOf = (b: PayerBehaviour) => payers.find((p) => p.behaviour === b)!;
    const statuses = agentList.map((a) => () => a.status());
    for (const p of payers) p.follow(statuses);
    await Promise.all(payers.map((p) => p.open()));

    // --- funding: honest payers fund every lane (an agent extends credit only against money on the lane)
    const perLaneHonest = BigInt(Math.ceil(c.rounds * c.perRound.honest * c.priceMicros * 1.6) + 10 * c.priceMicros);
    const perLaneOther = BigInt(Math.ceil((c.rounds + 2) * c.perRound.dishonestAgent * c.priceMicros * 2) + 10 * c.priceMicros);
    const heavyTopUp = BigInt(c.perRound.heavy * c.priceMicros);
    const fundingOf = (p: SimPayer, a: SimAgent): bigint => {
      if (a.behaviour === 'squat') return 0n;
      switch (p.behaviour) {
        case 'honest':
          if (a.behaviour === 'honest') return perLaneHonest;
          return p.index < c.dishonestAgentUsers ? perLaneOther : 0n;
        case 'never-fund':
          return 0n;
        case 'underfund':
          return a.behaviour === 'honest' ? BigInt(3 * c.priceMicros) : 0n;
        case 'fee-relay':
          return a.behaviour === 'honest' ? heavyTopUp : 0n;
        default:
          return a.behaviour === 'honest' ? perLaneHonest : 0n;
      }
    };
    await Promise.all(
      payers.map(async (p) => {
        const amounts = agentList.map((a) => fundingOf(p, a));
        const total =
          amounts.reduce((x, y) => x + y, 0n) +
          (p.behaviour === 'fee-relay' ? heavyTopUp * BigInt(2 * c.rounds * (c.honestAgents + 1)) : 0n);
        if (total === 0n) return;
        await p.escrow.mint(p.address, total);
        for (const [i, a] of agentList.entries()) {
          if (amounts[i]! > 0n) await p.escrow.fund(p.address, a.setup.payout, amounts[i]!, { approveMax: true });
        }
      }),
    );
    await Promise.all(agentList.map((a) => a.payments.funds.catchUp()));
    log(
      `fleet: ${agentList.length} agents, ${payers.length} payers + 1 impersonator; funded in ${Math.round(performance.now() - started)} ms`,
    );

    // --- traffic
    const requestsFor = (p: SimPayer, a: SimAgent): number => {
      if (p.behaviour === 'honest') {
        if (a.behaviour === 'honest') return c.perRound.honest;
        return p.index < c.dishonestAgentUsers ? c.perRound.dishonestAgent : 0;
      }
      if (a.behaviour !== 'honest') return 0;
      return p.behaviour === 'fee-relay' ? c.perRound.heavy : c.perRound.honest;
    };
    const laneTask = async (p: SimPayer, a: SimAgent, n: number): Promise<void> => {
      // Lanes start spread over the first 300 ms, one request at a time (two at once for the short ones).
      await sleep(rng.uniform(0, 300));
      const parallel = n <= 2 ? n : 1;
      await Promise.all(
        Array.from({ length: parallel }, async (_, w) => {
          for (let i = w; i < n; i += parallel) await p.request(a, rng);
        }),
      );
    };
    // Requests to the late agent end only at their deadline: rounds do not wait for them (they run on into
    // the next round; the end of the run waits for them all).
    const background: Promise<void>[] = [];
    const traffic = async (scale = 1): Promise<void> => {
      const tasks: Promise<void>[] = [];
      for (const p of payers) {
        for (const a of agentList) {
          const n = scale === 1 ? requestsFor(p, a) : Math.min(requestsFor(p, a), scale);
          if (n > 0) (a.behaviour === 'late' ? background : tasks).push(laneTask(p, a, n));
        }
      }
      for (const a of honestAgents) tasks.push(impersonator.attack(honestPayers[Math.min(1, honestPayers.length - 1)]!, a));
      await Promise.all(tasks);
    };
    const idle = async (): Promise<void> => {
      // A payer holding a resync's receipt until its reply or deadline, or about to ask again, is not idle either.
      const moving = () =>
        net.inflight > 0 ||
        agentList.some((a) => a.up && (a.busy - a.holding > 0 || a.receiptsWaiting)) ||
        payers.some((p) => p.up && p.lanes.awaiting() > 0);
      for (let waited = 0; moving(); waited += 5) {
        if (waited > 30_000) {
          const busy = agentList.filter((a) => a.up && a.busy - a.holding > 0).map((a) => `${a.behaviour}:${a.busy - a.holding}`);
          const awaiting = payers.filter((p) => p.up && p.lanes.awaiting() > 0).map((p) => `${p.behaviour}:${p.lanes.awaiting()}`);
          throw new MeshError(
            'MESH_TIMEOUT',
            `the simulated network did not settle within 30 s (in flight ${net.inflight}; busy agents ${busy.join(' ') || 'none'}; payers awaiting replies ${awaiting.join(' ') || 'none'})`,
          );
        }
        await sleep(5);
      }
    };
    /** Until nothing moves: vouchers owed are signed (as the lanes' own timers would), delivered and taken. */
    const quiesce = async (): Promise<void> => {
      for (let i = 0; i < 3; i++) {
        await idle();
        await Promise.all(payers.filter((p) => p.up).map((p) => p.lanes.flush()));
        await idle();
      }
    };

    // --- the chain's side of a round
    const chainNow = async () => (await chain.provider.getBlock('latest'))!.timestamp;
    const events: Record<string, unknown> = {};
    const withdrawals: { thawEnd: number; agent: SimAgent; done: boolean; amount: number }[] = [];
    const feeAttack = { relayed: 0, feeMicros: 0, agents: [] as { payout: string; settledBefore: number; remainingBefore: number }[] };
    const settleTicks = { failures: 0 };
    const heavy = payerOf('fee-relay');
    const attackFee = async (): Promise<void> => {
      // The voucher key relays its own voucher for what the agent already holds, taking the largest fee the
      // escrow allows: a tenth of what the settlement newly pays the agent (FEE_CAP_DIVISOR). That fee comes
      // out of the money backing the agent's unsettled work; the agent's credit rule keeps it back.
      heavy.vouchers = 'drop';
      for (const a of honestAgents) {
        const lane = await heavy.escrow.laneOf(heavy.address, a.setup.payout);
        const vouchered = BigInt(heavy.lanes.lanesView().find((l) => l.agentId === a.id)?.paidMicros ?? 0);
        feeAttack.agents.push({ payout: a.setup.payout, settledBefore: Number(lane.settled), remainingBefore: Number(lane.remaining) });
        if (vouchered <= lane.settled) continue;
        const fee = lane.feeSettled + (vouchered - lane.settled) / 10n;
        const voucher = { agent: a.setup.payout, cumulative: vouchered, feeCumulative: fee, receiptsRoot: toHex(new Uint8Array(32)) };
        const sig = await signVoucher(heavy.setup.wallet, domain, voucher);
        const out = await heavy.escrow.settle(a.setup.payout, [{ voucher, signature: sig }]);
        feeAttack.relayed++;
        feeAttack.feeMicros += Number(out.fees);
      }
    };
    const chainStep = async (round: number, settle: boolean): Promise<void> => {
      if (round === at.feeAttack) await attackFee();
      else if (round < at.feeAttack) {
        // The fee relayer keeps each lane just funded: what it owes and has not settled, plus the next round's
        // work (agents read the escrow's events at the end of each round). So the money on the lane is little
        // more than what backs the agent's unsettled work.
        for (const a of honestAgents) {
          const lane = await heavy.escrow.laneOf(heavy.address, a.setup.payout);
          const owes = BigInt(heavy.lanes.lanesView().find((l) => l.agentId === a.id)?.owedMicros ?? 0) - lane.settled;
          const target = (owes > 0n ? owes : 0n) + heavyTopUp + BigInt(4 * c.priceMicros);
          if (target > lane.remaining) await heavy.escrow.fund(heavy.address, a.setup.payout, target - lane.remaining);
        }
      }
      const now = await chainNow();
      for (const w of withdrawals) {
        if (!w.done && now >= w.thawEnd) {
          const out = await payerOf('withdraw').escrow.withdraw(payerOf('withdraw').address, w.agent.setup.payout);
          w.done = true;
          w.amount = Number(out.amount);
        }
      }
      await chain.increaseTime(c.roundSeconds);
      await Promise.all(agentList.map((a) => a.payments.funds.catchUp()));
      if (settle) {
        await Promise.all(
          agentList.map(async (a) => {
            try {
              await a.side.settler?.tick();
            } catch (err) {
              settleTicks.failures++;
              log(`settlement check of ${a.behaviour} agent failed: ${(err as Error).message}`);
            }
          }),
        );
      }
    };

    // --- the run
    for (let round = 1; round <= c.rounds; round++) {
      const t0 = performance.now();
      if (round === at.stopVouchers) payerOf('stop-vouchers').vouchers = 'drop';
      if (round === 1) payerOf('refuse-receipts').vouchers = 'halve';
      const mid: Promise<void>[] = [];
      const midRound = (what: () => Promise<void>) =>
        mid.push(
          sleep(150).then(async () => {
            await what();
          }),
        );
      if (round === at.withdraw) {
        midRound(async () => {
          const w = payerOf('withdraw');
          w.vouchers = 'drop';
          for (const a of honestAgents) {
            const out = await w.escrow.requestWithdraw(w.address, a.setup.payout, MAX_UINT96);
            withdrawals.push({ thawEnd: Number(out.thawEnd), agent: a, done: false, amount: 0 });
          }
          events.withdraw_requested_round = round;
        });
      }
      if (round === at.agentRestart) {
        midRound(async () => {
          await honestAgents[0]!.restart(100);
          for (const p of payers) if (p.up) p.onStatus(honestAgents[0]!.status());
          events.agent_restart_round = round;
        });
      }
      if (round === at.payerRestart) {
        midRound(async () => {
          await honestPayers[0]!.restart(100);
          events.payer_restart_round = round;
        });
      }
      await Promise.all([traffic(), ...mid]);
      await quiesce();
      await chainStep(round, round % c.settleEveryRounds === 0);
      const sent = payers.reduce((s, p) => s + p.counters.requests, 0);
      log(
        `round ${round}/${c.rounds} (${((round * c.roundSeconds) / 3600).toFixed(2)} h): ${sent} requests so far, ` +
          `${net.lost.request + net.lost.reply + net.lost.voucher + net.lost.resync + net.lost.receipts} messages lost, ${Math.round(performance.now() - t0)} ms`,
      );
    }

    // --- the end: the network heals, lost vouchers and receipts are caught up, everything owed is settled
    net.loss = 0;
    for (let d = 0; d < 2; d++) {
      await sleep(600); // past the lanes' resend and resync spacing
      await traffic(2);
      await quiesce();
    }
    await Promise.all(background);
    await quiesce();
    for (const w of withdrawals) {
      if (w.done) continue;
      const now = await chainNow();
      if (now < w.thawEnd) await chain.increaseTime(w.thawEnd - now);
      const out = await payerOf('withdraw').escrow.withdraw(payerOf('withdraw').address, w.agent.setup.payout);
      w.done = true;
      w.amount = Number(out.amount);
    }
    await chain.increaseTime(c.roundSeconds);
    await Promise.all(agentList.map((a) => a.payments.funds.catchUp()));
    await Promise.all(agentList.map((a) => a.side.settler?.settleNow()));
    log(`drained and settled in ${Math.round(performance.now() - started)} ms`);

    // --- what the chain and the parties say
    const reader = await EscrowClient.connect({ runner: chain.provider, escrow: domain.escrow });
    const lanesOnChain = new Map<string, { settled: number; feeSettled: number; remaining: number }>();
    const payingAgents = agentList.filter((a) => a.behaviour !== 'squat');
    await Promise.all(
      payers.map(async (p) => {
        for (const a of payingAgents) {
          const l = await reader.laneOf(p.address, a.setup.payout);
          lanesOnChain.set(`${p.address}|${a.id}`, {
            settled: Number(l.settled),
            feeSettled: Number(l.feeSettled),
            remaining: Number(l.remaining),
          });
        }
      }),
    );
    const onChain = (p: SimPayer, a: SimAgent) => lanesOnChain.get(`${p.address}|${a.id}`) ?? { settled: 0, feeSettled: 0, remaining: 0 };
    const valueFor = (p: SimPayer, a: SimAgent) => ledger.value.get(`${p.address}|${a.id}`)?.micros ?? 0;
    const billedOf = (p: SimPayer, a: SimAgent) => a.payments.lanesSummary().find((l) => l.payer === p.address)?.owedMicros ?? 0;
    const signedOf = (p: SimPayer, a: SimAgent) => p.lanes.lanesView().find((l) => l.agentId === a.id)?.paidMicros ?? 0;

    // Honest agents, honest payers: paid ÷ owed.
    let owed = 0;
    let paid = 0;
    let networkLossMax = 0;
    let networkLossMicros = 0;
    const short: Record<string, number>[] = [];
    for (const p of honestPayers) {
      for (const a of honestAgents) {
        owed += valueFor(p, a);
        paid += onChain(p, a).settled;
        if (onChain(p, a).settled !== valueFor(p, a) && short.length < 5) {
          const view = p.lanes.lanesView().find((l) => l.agentId === a.id);
          const held = a.payments.lanesSummary().find((l) => l.payer === p.address);
          short.push({
            payer: p.index,
            value: valueFor(p, a),
            settled: onChain(p, a).settled,
            payer_owes: view?.owedMicros ?? -1,
            payer_signed: view?.paidMicros ?? -1,
            agent_best_voucher: held?.paidMicros ?? -1,
            agent_billed: held?.owedMicros ?? -1,
          });
        }
        const lost = Math.max(0, billedOf(p, a) - onChain(p, a).settled);
        networkLossMicros += lost;
        networkLossMax = Math.max(networkLossMax, lost / a.creditMicros);
      }
    }
    // Honest payers: what left their lanes beyond the value of what they got, to any agent.
    let overpaid = 0;
    let signedBeyond = 0;
    for (const p of honestPayers) {
      for (const a of payingAgents) {
        const out = onChain(p, a).settled + onChain(p, a).feeSettled;
        overpaid += Math.max(0, out - valueFor(p, a));
        signedBeyond += Math.max(0, signedOf(p, a) - valueFor(p, a));
      }
    }
    // Losses per (honest party, dishonest party), in the agent's credit windows.
    const lossWindows: Record<string, number> = {};
    const payerBreakdown: Record<string, unknown> = {};
    for (const p of payers.filter((x) => x.behaviour !== 'honest')) {
      let lossMicros = 0;
      let worst = 0;
      const refusals: Record<string, number> = {};
      for (const a of honestAgents) {
        const lost = Math.max(0, billedOf(p, a) - onChain(p, a).settled);
        lossMicros += lost;
        worst = Math.max(worst, lost / a.creditMicros);
        for (const [k, v] of Object.entries(a.refusals.get(p.address) ?? {})) refusals[k] = (refusals[k] ?? 0) + v;
      }
      lossWindows[`payer:${p.behaviour}`] = round3(worst);
      payerBreakdown[p.behaviour] = {
        requests: p.counters.requests,
        served: p.counters.ok,
        outcomes: p.outcomes,
        agents_refused: refusals,
        billed_micros: honestAgents.reduce((s, a) => s + billedOf(p, a), 0),
        paid_micros: honestAgents.reduce((s, a) => s + onChain(p, a).settled, 0),
        honest_agents_loss_micros: lossMicros,
        loss_windows: round3(worst),
        vouchers_dropped: p.counters.vouchersDropped,
        vouchers_rewritten: p.counters.vouchersRewritten,
      };
    }
    Object.assign(payerBreakdown.withdraw as object, {
      withdrawals: withdrawals.map((w) => ({ amount_micros: w.amount, done: w.done })),
      requested_round: events.withdraw_requested_round,
    });
    Object.assign(payerBreakdown['fee-relay'] as object, {
      attack_round: at.feeAttack,
      fee_vouchers_relayed: feeAttack.relayed,
      fees_taken_micros: feeAttack.feeMicros,
      lanes_before_attack: feeAttack.agents,
    });
    Object.assign(payerBreakdown['stop-vouchers'] as object, { stopped_round: at.stopVouchers });
    const impersonation = {
      outcomes: impersonator.outcomes,
      receipts_billed_to_victim: ledger.impersonated,
      grants_refused: honestAgents.reduce((s, a) => s + (a.paymentCounters().grantsRefused ?? 0), 0),
      resyncs_refused: honestAgents.reduce((s, a) => s + (a.paymentCounters().resyncsRefused ?? 0), 0),
      vouchers_refused: honestAgents.reduce((s, a) => s + (a.paymentCounters().vouchersRefused ?? 0), 0),
    };
    payerBreakdown.impersonate = impersonation;
    lossWindows['payer:impersonate'] = 0;

    const agentBreakdown: Record<string, unknown> = {};
    for (const a of agentList.filter((x) => x.behaviour !== 'honest')) {
      let value = 0;
      let out = 0;
      let over = 0;
      const unpaid: Record<string, number> = {};
      let lanesRefused = 0;
      for (const p of honestPayers) {
        if (a.behaviour !== 'squat') {
          value += valueFor(p, a);
          const o = onChain(p, a).settled + onChain(p, a).feeSettled;
          out += o;
          over = Math.max(over, Math.max(0, o - valueFor(p, a)) / a.creditMicros);
        }
        for (const [k, v] of Object.entries(p.logger.unpaid.get(a.id) ?? {})) unpaid[k] = (unpaid[k] ?? 0) + v;
        if (p.lanes.refusedView().some((r) => r.agentId === a.id)) lanesRefused++;
      }
      lossWindows[`agent:${a.behaviour}`] = round3(over);
      agentBreakdown[a.behaviour] = {
        cheats: a.cheats,
        receipts_unpaid_by_honest_payers: unpaid,
        honest_lanes_refused: lanesRefused,
        value_delivered_micros: value,
        paid_by_honest_payers_micros: out,
        honest_payers_loss_windows: round3(over),
      };
    }

    // Gas: what the honest agents' relayers spent, per receipt their settlements paid for.
    // The run's steady state is what the relayers settled on their own triggers; the settlement of every
    // lane's tail when the run ends ('close') is counted apart.
    const gasOf = async (final: boolean) => {
      const out = { gas: 0, vouchers: 0, micros: 0, txs: 0, batches: [] as number[] };
      for (const a of honestAgents) {
        for (const s of await a.side.settler!.settlements()) {
          if (s.reasons.includes('close') !== final) continue;
          out.gas += Number(s.gasUsed);
          out.vouchers += s.lanes.length;
          out.micros += s.paidMicros;
          out.batches.push(s.lanes.length);
          out.txs++;
        }
      }
      return out;
    };
    const steady = await gasOf(false);
    const final = await gasOf(true);
    const receiptsSettled = steady.micros / c.priceMicros;
    const gasPerReceipt = receiptsSettled > 0 ? round1(steady.gas / receiptsSettled) : null;
    const receiptsAll = (steady.micros + final.micros) / c.priceMicros;

    const receipts = agentList.reduce((s, a) => s + a.payments.lanesSummary().reduce((x, l) => x + l.receipts, 0), 0);
    const lanes = agentList.reduce((s, a) => s + a.payments.lanesSummary().length, 0);
    const maxLoss = Math.max(...Object.values(lossWindows));
    const paidOfOwed = owed > 0 ? round4(paid / owed) : null;
    const honestCutOff = honestPayers.reduce(
      (s, p) =>
        s + honestAgents.filter((a) => (a.refusals.get(p.address)?.window ?? 0) + (a.refusals.get(p.address)?.refused ?? 0) > 0).length,
      0,
    );
    const requests = payers.reduce((s, p) => s + p.counters.requests, 0);
    const errors = [...agentList.flatMap((a) => a.logger.errors), ...payers.flatMap((p) => p.logger.errors)];

    const result: BenchResult = {
      honest_agents_paid_of_owed: paidOfOwed,
      honest_payers_overpaid_micros: overpaid,
      max_honest_loss_windows: round3(maxLoss),
      gas_per_receipt: gasPerReceipt,
      receipts,
      lanes,
      goals: {
        honest_payers_overpaid_micros: { goal: '== 0', met: overpaid === 0 },
        max_honest_loss_windows: { goal: '<= 1', met: maxLoss <= 1 },
        honest_agents_paid_of_owed: { goal: '>= 0.999', met: paidOfOwed !== null && paidOfOwed >= 0.999 },
        gas_per_receipt: { goal: '<= 150', met: gasPerReceipt !== null && gasPerReceipt <= 150 },
      },
      loss_windows_by_behaviour: lossWindows,
      honest_agents_owed_micros: owed,
      honest_agents_paid_micros: paid,
      honest_lanes_paid_other_than_owed: short,
      honest_payers_signed_beyond_value_micros: signedBeyond,
      honest_network_loss: {
        micros: networkLossMicros,
        max_lane_windows: round3(networkLossMax),
        honest_lanes_ever_refused_for_window_or_refusals: honestCutOff,
        replies_late_by_the_event_loop: ledger.lateHonest,
        replies_at_the_deadline_tick: ledger.ambiguous,
      },
      settlement: {
        txs: steady.txs,
        vouchers_settled: steady.vouchers,
        receipts_settled: Math.round(receiptsSettled),
        receipts_per_settled_voucher: steady.vouchers > 0 ? round1(receiptsSettled / steady.vouchers) : null,
        vouchers_per_tx: steady.batches,
        gas: steady.gas,
        final: {
          txs: final.txs,
          vouchers_settled: final.vouchers,
          receipts_settled: Math.round(final.micros / c.priceMicros),
          gas: final.gas,
        },
        gas_per_receipt_with_final: receiptsAll > 0 ? round1((steady.gas + final.gas) / receiptsAll) : null,
        check_failures: settleTicks.failures,
      },
      behaviours: { agents: agentBreakdown, payers: payerBreakdown },
      requests,
      requests_ok: payers.reduce((s, p) => s + p.counters.ok, 0),
      honest_payers_retried_after_credit_exceeded: honestPayers.reduce((s, p) => s + p.counters.retried, 0),
      honest_payers_unpaid_receipts_from_honest_agents: unpaidFromHonest(honestPayers, honestAgents),
      messages: {
        sent: net.sent,
        lost: net.lost,
        lost_to_restarts: net.lostToRestarts,
        loss_probability: c.loss,
        delay_ms: c.delayMs,
        transport: 'in-memory between the real objects (no MQTT broker): each message carries its authenticated sender',
      },
      restarts: { agents: agentList.reduce((s, a) => s + a.restarts, 0), payers: payers.reduce((s, p) => s + p.restarts, 0), ...events },
      simulated_hours: round2((c.rounds * c.roundSeconds) / 3600),
      rounds: c.rounds,
      fleet: {
        honest_agents: c.honestAgents,
        honest_payers: c.honestPayers,
        dishonest_agents: DISHONEST_AGENTS,
        dishonest_payers: [...DISHONEST_PAYERS, 'impersonate'],
        requests_per_lane_per_round: c.perRound,
        price_micros: c.priceMicros,
        credit_window_micros: c.creditRequests * c.priceMicros,
        settle_threshold_micros: settleThreshold,
        settle_every_simulated_s: c.settleEveryRounds * c.roundSeconds,
        thaw_s: c.thawSeconds,
        deadline_ms: c.deadlineMs,
      },
      logged_errors: errors.slice(0, 10),
      chain: 'hardhat 2 (EDR) local chain, escrow v2',
      seed: c.seed,
      run_s: round1((performance.now() - started) / 1000),
    };

    const exercised: Record<string, number> = {
      'agent:invent': count(agentBreakdown, 'invent', 'unsolicited'),
      'agent:inflate': count(agentBreakdown, 'inflate', 'units') + count(agentBreakdown, 'inflate', 'price'),
      'agent:ok-on-error': count(agentBreakdown, 'ok-on-error', 'status'),
      'agent:late': count(agentBreakdown, 'late', 'late'),
      'agent:squat': (agentBreakdown.squat as { honest_lanes_refused: number }).honest_lanes_refused,
      'agent:drop': count(agentBreakdown, 'drop', 'no-reply'),
      'agent:refuse-resync': agentList.find((a) => a.behaviour === 'refuse-resync')!.cheats['resync-ignored'] ?? 0,
      'payer:never-fund': refusalsOf(payerBreakdown, 'never-fund', 'funds'),
      'payer:underfund': refusalsOf(payerBreakdown, 'underfund', 'funds'),
      'payer:stop-vouchers': refusalsOf(payerBreakdown, 'stop-vouchers', 'window'),
      'payer:refuse-receipts': refusalsOf(payerBreakdown, 'refuse-receipts', 'refused'),
      'payer:withdraw': withdrawals.filter((w) => w.done && w.amount > 0).length,
      'payer:withdraw-refused': refusalsOf(payerBreakdown, 'withdraw', 'withdrawal'),
      'payer:fee-relay': feeAttack.relayed,
      'payer:impersonate': impersonation.grants_refused + (impersonator.outcomes.MESH_FORBIDDEN ?? 0),
      'network:lost': Object.values(net.lost).reduce((x, y) => x + y, 0),
      'restart:agent': agentList.reduce((s, a) => s + a.restarts, 0),
      'restart:payer': payers.reduce((s, p) => s + p.restarts, 0),
    };
    result.exercised = exercised;
    for (const a of agentList) await a.close();
    for (const p of payers) await p.close().catch(() => {});
    return { result, exercised };
  } finally {
    await chain.close();
    await rm(dir, { recursive: true, force: true });
  }
}

function count(breakdown: Record<string, unknown>, behaviour: string, reason: string): number {
  return (
    (breakdown[behaviour] as { receipts_unpaid_by_honest_payers: Record<string, number> }).receipts_unpaid_by_honest_payers[reason] ?? 0
  );
}

function refusalsOf(breakdown: Record<string, unknown>, behaviour: string, reason: string): number {
  return (breakdown[behaviour] as { agents_refused: Record<string, number> }).agents_refused[reason] ?? 0;
}

/** Receipts honest payers linked from honest agents and did not pay, by reason (lost replies, restarts, the SDK's own refusals). */
function unpaidFromHonest(payers: SimPayer[], agents: SimAgent[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const p of payers) {
    for (const a of agents) for (const [k, v] of Object.entries(p.logger.unpaid.get(a.id) ?? {})) out[k] = (out[k] ?? 0) + v;
  }
  return out;
}

const round1 = (v: number) => Math.round(v * 10) / 10;
const round2 = (v: number) => Math.round(v * 100) / 100;
const round3 = (v: number) => Math.round(v * 1000) / 1000;
const round4 = (v: number) => Math.round(v * 10000) / 10000;

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const seed = typeof ctx.args.seed === 'string' ? Number(ctx.args.seed) : 1;
  const config = ctx.quick ? quickConfig(seed) : fullConfig(seed);
  const num = (key: string) => (typeof ctx.args[key] === 'string' ? Number(ctx.args[key]) : undefined);
  config.rounds = num('rounds') ?? config.rounds;
  config.honestAgents = num('agents') ?? config.honestAgents;
  config.honestPayers = num('payers') ?? config.honestPayers;
  config.loss = num('loss') ?? config.loss;
  const { result } = await runEconomics(config, ctx.log);
  return { ...result, quick: ctx.quick };
}
