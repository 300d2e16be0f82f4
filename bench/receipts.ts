/**
 * receipts: receipts signed and verified per second on one core (this process, one thread).
 *
 * sign: an agent builds the next receipt of a lane (seq, prevReceipt, price by the rule, cumulative),
 * hashes it (keccak256 of abi.encode) and signs the leaf with Ed25519 (node:crypto).
 * verify: a payer's LaneVerifier checks each of those receipts in order: fields, signature, seq, hash
 * chain, price rule and cumulative sum, the duplicate-request check included.
 * verify_chain100: the same checks in batches of 100 with one signature verification per batch
 * (LaneVerifier.verifyChain: the hash chain makes the last signature cover the batch).
 * Also reported: the leaf hash alone (keccak_per_s) and a Merkle root over 100 leaves.
 */
import {
  generateIdentity,
  LaneVerifier,
  merkleRoot,
  newRequestId,
  RECEIPT_STATUS,
  receiptLeaf,
  receiptPriceMicros,
  type SignedReceipt,
  signQuote,
  signReceipt,
  toHex,
  verifyQuote,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import type { BenchContext, BenchResult } from './lib.ts';

export async function run(ctx: BenchContext): Promise<BenchResult> {
  const n = Number(ctx.args.n ?? (ctx.quick ? 20_000 : 100_000));
  const agent = generateIdentity('agent');
  const payer = `0x${'11'.repeat(20)}`;
  const escrow = `0x${'22'.repeat(20)}`;
  const modelHash = new Uint8Array(32).fill(7);
  const price = { name: 'kws', modelHash: toHex(modelHash), baseMicros: 0, unitMicros: 5, minChargeMicros: 0 };
  const quote = verifyQuote(
    signQuote(agent, {
      payout: `0x${'33'.repeat(20)}`,
      chainId: 31337,
      escrow,
      issuedAt: Date.now(),
      validUntil: Date.now() + 3_600_000,
      models: [price],
    }),
  );
  const inputHash = new Uint8Array(32).fill(1);
  const outputHash = new Uint8Array(32).fill(2);
  const ids = Array.from({ length: n }, () => newRequestId());

  const signAll = (): SignedReceipt[] => {
    const out: SignedReceipt[] = new Array(n);
    let prev = ZERO_HASH;
    let cumulative = 0;
    for (let i = 0; i < n; i++) {
      // One request in 20 fails: priced 0 by the rule, still on the chain.
      const status = i % 20 === 19 ? RECEIPT_STATUS.failed : RECEIPT_STATUS.ok;
      const units = status === RECEIPT_STATUS.ok ? 1 : 0;
      const p = receiptPriceMicros(price, status, units);
      cumulative += p;
      const now = Date.now();
      const signed = signReceipt(agent, {
        v: 1,
        chainId: 31337,
        escrow,
        payer,
        agentKey: agent.publicKey,
        seq: i + 1,
        requestId: ids[i]!,
        modelHash,
        inputHash,
        outputHash,
        status,
        unitsUsed: units,
        price: p,
        cumulative,
        startedAt: now,
        finishedAt: now,
        prevReceipt: prev,
      });
      prev = signed.leaf;
      out[i] = signed.receipt;
    }
    return out;
  };

  ctx.log(`warm-up, then ${n} receipts signed and verified`);
  const warm = signAll().slice(0, 2_000);
  const warmVerifier = new LaneVerifier({ payer, quote });
  for (const r of warm) warmVerifier.verify(r);

  let t = performance.now();
  const receipts = signAll();
  const signS = (performance.now() - t) / 1000;

  const verifier = new LaneVerifier({ payer, quote });
  t = performance.now();
  for (const r of receipts) verifier.verify(r);
  const verifyS = (performance.now() - t) / 1000;

  // The same lane checked in batches of 100 consecutive receipts: one Ed25519 verification per batch.
  const chained = new LaneVerifier({ payer, quote });
  t = performance.now();
  for (let i = 0; i < n; i += 100) chained.verifyChain(receipts.slice(i, i + 100));
  const chainS = (performance.now() - t) / 1000;

  t = performance.now();
  for (const r of receipts) receiptLeaf(r);
  const hashS = (performance.now() - t) / 1000;

  const leaves = receipts.slice(0, 100).map((r) => receiptLeaf(r).slice());
  t = performance.now();
  const roots = 2_000;
  for (let i = 0; i < roots; i++) merkleRoot(leaves);
  const rootUs = ((performance.now() - t) * 1000) / roots;

  const result = {
    sign_per_s: Math.round(n / signS),
    verify_per_s: Math.round(n / verifyS),
    verify_chain100_per_s: Math.round(n / chainS),
    keccak_per_s: Math.round(n / hashS),
    merkle_root_100_us: Math.round(rootUs * 10) / 10,
    n,
    lane_cumulative_micros: verifier.state.cumulative,
  };
  ctx.log(JSON.stringify(result));
  return result;
}
