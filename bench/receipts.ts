/**
 * receipts: receipts signed and verified per second on one core (this process, one thread).
 *
 * sign: an agent builds the next receipt of a lane (seq, prevReceipt, price by the rule, cumulative),
 * hashes it (keccak256 of abi.encode) and signs the leaf with Ed25519 (node:crypto).
 * verify: as the SDK pays (sdk/src/payments.ts): each receipt linked into the lane with what the payer
 * knows of its request (LaneVerifier.link with deferSignatures: fields, seq, hash chain, price rule,
 * cumulative sum, duplicates, the request's context), its leaf kept for the voucher, and before each
 * voucher (one per 100 receipts here) one signature check covering the receipts since the last
 * (checkSignatures: the hash chain makes the newest signature cover them).
 * verify_each: the same lane checks with each receipt's own signature verified (LaneVerifier.verify).
 * verify_chain100: verifyChain over batches of 100, one signature verification per batch.
 * Also reported: the leaf hash alone (keccak_per_s), a Merkle root over 100 leaves, and what the SDK spends to
 * remember each paid request it sends (PayerLanes.noteRequest, a 16-byte input hashed in the next turn) with its
 * store of sent requests full (MAX_SENT, as an app sending over 20,000 ÷ (its deadline + 60 s) paid requests a second holds it):
 * sdk_note_request_full_us.
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
import { Wallet } from 'ethers';
import pino from 'pino';
import { MAX_SENT, PayerLanes } from '../sdk/src/payments.ts';
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
  const warmLinker = new LaneVerifier({ payer, quote, deferSignatures: true });
  for (const r of warm) warmLinker.link(r, { asked: true, reply: 'res' });
  warmLinker.checkSignatures();

  let t = performance.now();
  const receipts = signAll();
  const signS = (performance.now() - t) / 1000;

  // As the SDK does it: link with the request's context, keep the payable leaf, check signatures per voucher.
  const verifier = new LaneVerifier({ payer, quote, deferSignatures: true });
  const context = { asked: true, reply: 'res' as const, deadline: Date.now() + 3_600_000, arrivedAt: Date.now() };
  let pendingLeaves: Uint8Array[] = [];
  let vouchers = 0;
  t = performance.now();
  for (let i = 0; i < n; i++) {
    const linked = verifier.link(receipts[i]!, context);
    if (linked.payable) pendingLeaves.push(linked.leaf.slice());
    if (i % 100 === 99 || i === n - 1) {
      if (!verifier.checkSignatures().ok) throw new Error('an honest lane failed its signature check');
      vouchers += pendingLeaves.length > 0 ? 1 : 0;
      pendingLeaves = [];
    }
  }
  const verifyS = (performance.now() - t) / 1000;

  const each = new LaneVerifier({ payer, quote });
  t = performance.now();
  for (const r of receipts) each.verify(r);
  const eachS = (performance.now() - t) / 1000;

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

  const lanes = await PayerLanes.open(
    { signer: Wallet.createRandom(), domain: { chainId: 31337n, escrow }, checkPayouts: false },
    'app-bench',
    () => {},
    pino({ level: 'silent' }),
  );
  const tiny = { x: { dtype: 'float32', shape: [1, 4], data: new Uint8Array(16) } };
  const turn = () => new Promise<void>((resolve) => setImmediate(resolve));
  for (let i = 0; i < MAX_SENT; i++) lanes.noteRequest(`fill-${i}`, Date.now() + 5_000, tiny);
  await turn();
  t = performance.now();
  for (let i = 0; i < n; i++) lanes.noteRequest(`req-${i}`, Date.now() + 5_000, tiny);
  await turn();
  const noteUs = ((performance.now() - t) * 1000) / n;
  await lanes.close();

  const result = {
    sign_per_s: Math.round(n / signS),
    verify_per_s: Math.round(n / verifyS),
    verify_each_per_s: Math.round(n / eachS),
    verify_chain100_per_s: Math.round(n / chainS),
    keccak_per_s: Math.round(n / hashS),
    merkle_root_100_us: Math.round(rootUs * 10) / 10,
    sdk_note_request_full_us: Math.round(noteUs * 100) / 100,
    n,
    vouchers,
    lane_cumulative_micros: verifier.state.cumulative,
    lane_payable_micros: verifier.state.payable ?? 0,
  };
  ctx.log(JSON.stringify(result));
  return result;
}
