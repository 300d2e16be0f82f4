/**
 * settlement: gas to settle vouchers on MeshEscrow, on a real local chain (Hardhat 2, cancun rules).
 *
 * Setup: N payers each fund a lane to one agent, and one warm-up settlement runs, so what is measured is
 * the steady state of a running mesh: every lane slot and the agent's token balance already hold a value
 * (the agent's very first payout, which turns its balance from zero to non-zero, is reported separately).
 * Then, with fresh vouchers each time:
 *   gas_single               one voucher in its own settle() transaction (21k base included)
 *   gas_per_voucher_batch50  settle() with 50 vouchers from 50 payers to one agent, divided by 50
 *   gas_per_receipt          gas_per_voucher_batch50 / receipts_per_voucher (100)
 * plus the per-voucher cost at other batch sizes, settleMany across agents, a batch of 50 whose vouchers
 * carry a relayer fee (one more transfer, to the sender), a partial batch (lanes short), skipped
 * vouchers, and the amortised gas per inference for R ∈ {1, 10, 100, 1000} receipts per voucher. Gas is
 * deterministic: one run per point.
 */

import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, startLocalChain } from '@edge-mesh/contracts/dev';
import { PACKED_VOUCHER_BYTES, type SignedVoucher } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import type { BenchContext, BenchResult } from './lib.ts';

const RECEIPTS_PER_VOUCHER = 100;
const PRICE_MICROS = 120n; // µUSD per inference: a realistic amount for the calldata's zero bytes
const GOAL_PER_VOUCHER = 15_000;
const GOAL_PER_RECEIPT = 150;

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const maxBatch = ctx.quick ? 50 : typeof ctx.args['max-batch'] === 'string' ? Math.max(50, Number(ctx.args['max-batch'])) : 100;
  const sizes = [1, 2, 5, 10, 20, 50, 100, 200].filter((n) => n <= maxBatch);
  const started = performance.now();
  const chain: LocalChain = await startLocalChain({ accounts: maxBatch + 2, startTimeoutMs: 40_000, log: ctx.log });
  try {
    const deployer = chain.wallet(0);
    const mesh = await deployMesh(deployer, { thawSeconds: 7 * 86_400 });
    ctx.log(`escrow ${mesh.escrow}, token ${mesh.token}, chain ${mesh.chainId}`);
    const relayer = await EscrowClient.connect({ runner: deployer, escrow: mesh.escrow });
    const agent = ethers.Wallet.createRandom().address;
    const agent2 = ethers.Wallet.createRandom().address;

    // Payers fund lanes in parallel (different senders); each payer's own transactions stay in order.
    const payers = await Promise.all(
      Array.from({ length: maxBatch }, (_, i) => EscrowClient.connect({ runner: chain.wallet(i + 1), escrow: mesh.escrow })),
    );
    await Promise.all(
      payers.map(async (p) => {
        const me = await p.address();
        await p.mint(me, 20_000_000n);
        await p.fundWithPermit(me, agent, 10_000_000n);
        await p.fundWithPermit(me, agent2, 5_000_000n);
      }),
    );
    ctx.log(`${maxBatch} payers funded in ${Math.round(performance.now() - started)} ms`);

    const cumulative = new Map<string, bigint>();
    const fees = new Map<string, bigint>();
    /** Next voucher of payer p to `to`: the lane's total grows by RECEIPTS_PER_VOUCHER inferences (and the fee by `fee`). */
    const next = async (p: EscrowClient, to = agent, fee = 0n): Promise<SignedVoucher> => {
      const key = `${await p.address()}:${to}`;
      const c = (cumulative.get(key) ?? 0n) + BigInt(RECEIPTS_PER_VOUCHER) * PRICE_MICROS;
      const f = (fees.get(key) ?? 0n) + fee;
      cumulative.set(key, c);
      fees.set(key, f);
      return p.signVoucher({
        agent: to,
        cumulative: c,
        feeCumulative: f,
        receiptsRoot: ethers.keccak256(ethers.toUtf8Bytes(`${key}:${c}`)),
      });
    };
    const batch = (n: number, to = agent, fee = 0n) => Promise.all(payers.slice(0, n).map((p) => next(p, to, fee)));

    // The agent's first payout: its token balance goes from zero to non-zero (a 20k-gas store).
    const first = await relayer.settle(agent, [await next(payers[0]!)]);
    const gasSingleFirst = Number(first.gasUsed);
    // Warm-up: every lane settled once.
    const warm = await relayer.settle(agent, await batch(maxBatch));
    if (warm.skipped.length > 0) throw new Error(`warm-up skipped ${warm.skipped.length} vouchers`);
    await relayer.settle(agent2, await batch(1, agent2));

    const perVoucher: Record<string, number> = {};
    let gasSingle = 0;
    let gasBatch50 = 0;
    for (const n of sizes) {
      const out = await relayer.settle(agent, await batch(n));
      if (out.settled.length !== n) throw new Error(`batch of ${n}: ${out.skipped.length} skipped`);
      const gas = Number(out.gasUsed);
      perVoucher[String(n)] = Math.round(gas / n);
      if (n === 1) gasSingle = gas;
      if (n === 50) gasBatch50 = gas;
      ctx.log(`batch ${String(n).padStart(3)}: ${gas} gas, ${Math.round(gas / n)} per voucher`);
    }

    // Relayer mode: two agents, 25 vouchers each.
    const many = await relayer.settleMany([
      { agent, entries: await batch(25) },
      { agent: agent2, entries: await batch(25, agent2) },
    ]);
    const settleManyPerVoucher = Math.round(Number(many.gasUsed) / 50);
    ctx.log(`settleMany 2 agents x 25: ${many.gasUsed} gas, ${settleManyPerVoucher} per voucher`);

    // Vouchers with a relayer fee (10 µUSD each): the first fee to the relayer turns its balance from zero to
    // non-zero, so a warm-up batch goes first; then the steady state.
    await relayer.settle(agent, await batch(50, agent, 10n));
    const withFee = await relayer.settle(agent, await batch(50, agent, 10n));
    if (withFee.settled.length !== 50 || withFee.fees !== 500n) throw new Error('fee batch did not pay every fee');
    const feePerVoucher = Math.round(Number(withFee.gasUsed) / 50);
    ctx.log(`batch  50 with relayer fees: ${withFee.gasUsed} gas, ${feePerVoucher} per voucher`);

    // Skipped vouchers must stay cheap too (a griefer's batch): 50 stale vouchers.
    const stale = await relayer.settle(
      agent,
      (await batch(50)).map((v) => ({ ...v })),
    );
    const replay = await relayer.settle(
      agent,
      await Promise.all(
        payers.slice(0, 50).map(async (p) => {
          const key = `${await p.address()}:${agent}`;
          const c = cumulative.get(key)!;
          return p.signVoucher({ agent, cumulative: c, feeCumulative: fees.get(key) ?? 0n, receiptsRoot: ethers.ZeroHash });
        }),
      ),
    );
    if (stale.settled.length !== 50 || replay.skipped.length !== 50) throw new Error('stale batch did not behave');
    const skippedPerVoucher = Math.round(Number(replay.gasUsed) / 50);

    const gasPerVoucher50 = Math.round(gasBatch50 / 50);
    const amortised: Record<string, { single: number; batch50: number }> = {};
    ctx.log('amortised gas per inference (receipts per voucher R):');
    for (const r of [1, 10, 100, 1000]) {
      amortised[String(r)] = { single: round1(gasSingle / r), batch50: round1(gasPerVoucher50 / r) };
      ctx.log(`  R=${String(r).padStart(4)}: single ${round1(gasSingle / r)}, batch of 50 ${round1(gasPerVoucher50 / r)}`);
    }
    const gasPerReceipt = round1(gasPerVoucher50 / RECEIPTS_PER_VOUCHER);
    return {
      gas_single: gasSingle,
      gas_per_voucher_batch50: gasPerVoucher50,
      receipts_per_voucher: RECEIPTS_PER_VOUCHER,
      gas_per_receipt: gasPerReceipt,
      goal_per_voucher_met: gasPerVoucher50 <= GOAL_PER_VOUCHER,
      goal_per_receipt_met: gasPerReceipt <= GOAL_PER_RECEIPT,
      gas_single_first_payout: gasSingleFirst,
      gas_per_voucher_by_batch: perVoucher,
      gas_per_voucher_settle_many_2x25: settleManyPerVoucher,
      gas_per_voucher_batch50_with_fee: feePerVoucher,
      gas_per_skipped_voucher: skippedPerVoucher,
      amortised_gas_per_inference: amortised,
      packed_bytes_per_voucher: PACKED_VOUCHER_BYTES,
      chain: 'hardhat 2 (EDR), cancun, solc 0.8.28 optimizer 10000 runs',
      quick: ctx.quick,
    };
  } finally {
    await chain.close();
  }
}

const round1 = (v: number) => Math.round(v * 10) / 10;
