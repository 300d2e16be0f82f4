/** Receipts, quotes, the price rule, Merkle roots and the payer's LaneVerifier (no sockets). */
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  encodeReceiptAbi,
  generateIdentity,
  hashPair,
  keccak256Bytes,
  LaneVerifier,
  MeshError,
  merkleProof,
  merkleRoot,
  newRequestId,
  RECEIPT_ABI_TYPES,
  RECEIPT_STATUS,
  type Receipt,
  receiptLeaf,
  receiptPriceMicros,
  type SignedReceipt,
  signBytes,
  signQuote,
  signReceipt,
  toHex,
  verifyMerkleProof,
  verifyQuote,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import { AbiCoder, keccak256 } from 'ethers';

const agent = generateIdentity('agent');
const payer = `0x${'a1'.repeat(20)}`;
const escrow = `0x${'e5'.repeat(20)}`;
const payout = `0x${'b0'.repeat(20)}`;
const modelHash = new Uint8Array(32).fill(9);
const price = { name: 'kws', modelHash: toHex(modelHash), baseMicros: 2, unitMicros: 5, minChargeMicros: 3, maxUnits: 10 };
const quote = verifyQuote(
  signQuote(agent, { payout, chainId: 31337, escrow, issuedAt: Date.now(), validUntil: Date.now() + 60_000, models: [price] }),
);

/** An honest agent's lane: the next receipt for a status and running units (progress receipts share a request id). */
function lane(identity = agent) {
  let seq = 0;
  let cumulative = 0;
  let prev = ZERO_HASH;
  const charged = new Map<string, number>();
  return (status: number, units: number, requestId = newRequestId(), overrides: Partial<Receipt> = {}): SignedReceipt => {
    const key = toHex(requestId);
    const before = charged.get(key) ?? 0;
    const p = receiptPriceMicros(price, status, units, before);
    charged.set(key, before + p);
    const r: Receipt = {
      v: 1,
      chainId: 31337,
      escrow,
      payer,
      agentKey: identity.publicKey,
      seq: seq + 1,
      requestId,
      modelHash,
      inputHash: new Uint8Array(32).fill(1),
      outputHash: new Uint8Array(32).fill(2),
      status,
      unitsUsed: units,
      price: p,
      cumulative: cumulative + p,
      startedAt: 1_000,
      finishedAt: 1_005,
      prevReceipt: prev,
      ...overrides,
    };
    const { receipt, leaf } = signReceipt(identity, r);
    seq = r.seq;
    cumulative = r.cumulative;
    prev = leaf;
    return receipt;
  };
}

const reasonOf = (fn: () => unknown) => {
  try {
    fn();
  } catch (err) {
    assert.ok(err instanceof MeshError);
    assert.equal(err.code, 'MESH_RECEIPT_INVALID');
    return err.details?.reason;
  }
  assert.fail('expected MESH_RECEIPT_INVALID');
};

describe('receipts', () => {
  test('the leaf is keccak256(abi.encode(...)) as ethers encodes it, and keccak matches ethers on every length', () => {
    const r = lane()(RECEIPT_STATUS.ok, 1);
    const values = [
      r.v,
      r.chainId,
      r.escrow,
      r.payer,
      r.agentKey,
      r.seq,
      r.requestId,
      r.modelHash,
      r.inputHash,
      r.outputHash,
      r.status,
      r.unitsUsed,
      r.price,
      r.cumulative,
      r.startedAt,
      r.finishedAt,
      r.prevReceipt,
    ];
    const encoded = AbiCoder.defaultAbiCoder().encode([...RECEIPT_ABI_TYPES], values);
    assert.equal(toHex(encodeReceiptAbi(r)), encoded);
    assert.equal(toHex(receiptLeaf(r)), keccak256(encoded));
    for (let n = 0; n < 600; n += 7) {
      const data = new Uint8Array(n).map((_, i) => (i * 31 + n) & 255);
      assert.equal(toHex(keccak256Bytes(data)), keccak256(data));
    }
  });

  test('price rule: ok base + unit x units, partial pro rata, failed and timeout 0, cancelled max(minCharge, unit x units)', () => {
    assert.equal(receiptPriceMicros(price, RECEIPT_STATUS.ok, 1), 7);
    assert.equal(receiptPriceMicros(price, RECEIPT_STATUS.partial, 4), 20);
    assert.equal(receiptPriceMicros(price, RECEIPT_STATUS.failed, 4), 0);
    assert.equal(receiptPriceMicros(price, RECEIPT_STATUS.timeout, 9), 0);
    assert.equal(receiptPriceMicros(price, RECEIPT_STATUS.cancelled, 0), 3);
    assert.equal(receiptPriceMicros(price, RECEIPT_STATUS.cancelled, 2), 10);
    // Progress already charged is subtracted from the final receipt.
    assert.equal(receiptPriceMicros(price, RECEIPT_STATUS.ok, 4, 20), 2);
  });

  test('an honest lane verifies: ok, failed and timed-out (0), cancelled, and a long job paid pro rata by progress receipts', () => {
    const next = lane();
    const v = new LaneVerifier({ payer, quote });
    assert.equal(v.verify(next(RECEIPT_STATUS.ok, 1)).price, 7);
    assert.equal(v.verify(next(RECEIPT_STATUS.failed, 0)).price, 0);
    assert.equal(v.verify(next(RECEIPT_STATUS.timeout, 0)).price, 0);
    assert.equal(v.verify(next(RECEIPT_STATUS.cancelled, 0)).price, 3);
    const job = newRequestId();
    assert.equal(v.verify(next(RECEIPT_STATUS.partial, 2, job)).price, 10);
    assert.equal(v.verify(next(RECEIPT_STATUS.partial, 5, job)).price, 15);
    // The job then dies: the payer has paid for the 5 units it acknowledged, the failure adds 0.
    assert.equal(v.verify(next(RECEIPT_STATUS.failed, 5, job)).price, 0);
    assert.equal(v.state.cumulative, 7 + 3 + 25);
    assert.equal(v.state.seq, 7);
  });

  test('a forged receipt (other key, edited field, wrong lane) is refused', () => {
    const v = new LaneVerifier({ payer, quote });
    assert.equal(
      reasonOf(() => v.verify(lane(generateIdentity('agent'))(RECEIPT_STATUS.ok, 1))),
      'lane',
    );
    const good = lane()(RECEIPT_STATUS.ok, 1);
    assert.equal(
      reasonOf(() => v.verify({ ...good, outputHash: new Uint8Array(32).fill(3) })),
      'signature',
    );
    const forgedSig = new Uint8Array(good.sig);
    forgedSig[5]! ^= 1;
    assert.equal(
      reasonOf(() => v.verify({ ...good, sig: forgedSig })),
      'signature',
    );
    assert.equal(
      reasonOf(() => v.verify({ ...good, payer: `0x${'cc'.repeat(20)}` })),
      'lane',
    );
    assert.equal(
      reasonOf(() => v.verify({ ...good, chainId: 1 })),
      'domain',
    );
    assert.equal(v.state.seq, 0, 'refusals leave the lane unchanged');
    assert.equal(v.verify(good).price, 7);
  });

  test('a replayed receipt, a skipped seq, a broken chain and a duplicate request id are refused', () => {
    const next = lane();
    const v = new LaneVerifier({ payer, quote });
    const first = next(RECEIPT_STATUS.ok, 1);
    v.verify(first);
    assert.equal(
      reasonOf(() => v.verify(first)),
      'replayed',
    );
    const skipped = lane();
    skipped(RECEIPT_STATUS.ok, 1);
    skipped(RECEIPT_STATUS.ok, 1);
    assert.equal(
      reasonOf(() => v.verify(skipped(RECEIPT_STATUS.ok, 1))),
      'seq',
    );
    const otherChain = lane();
    otherChain(RECEIPT_STATUS.failed, 0);
    assert.equal(
      reasonOf(() => v.verify(otherChain(RECEIPT_STATUS.ok, 1))),
      'chain',
    );
    // The same request billed again under the next seq.
    const dup = next(RECEIPT_STATUS.ok, 1, first.requestId);
    assert.equal(
      reasonOf(() => v.verify(dup)),
      'duplicate',
    );
  });

  test('price rule violations and a wrong cumulative sum are refused; the payer cap holds', () => {
    const v = new LaneVerifier({ payer, quote, maxPriceMicros: 7 });
    // A failed job priced above 0, by an agent that signs what it likes.
    assert.equal(
      reasonOf(() => v.verify(lane()(RECEIPT_STATUS.failed, 1, undefined, { price: 7, cumulative: 7 }))),
      'price',
    );
    assert.equal(
      reasonOf(() => v.verify(lane()(RECEIPT_STATUS.timeout, 0, undefined, { price: 1, cumulative: 1 }))),
      'price',
    );
    assert.equal(
      reasonOf(() => v.verify(lane()(RECEIPT_STATUS.ok, 1, undefined, { price: 8, cumulative: 8 }))),
      'price',
    );
    assert.equal(
      reasonOf(() => v.verify(lane()(RECEIPT_STATUS.ok, 1, undefined, { cumulative: 70 }))),
      'cumulative',
    );
    assert.equal(
      reasonOf(() => v.verify(lane()(RECEIPT_STATUS.ok, 2))),
      'price-cap',
    );
    // Progress units must rise.
    const next = lane();
    const job = newRequestId();
    v.verify(next(RECEIPT_STATUS.partial, 1, job));
    assert.equal(
      reasonOf(() => v.verify(next(RECEIPT_STATUS.partial, 1, job))),
      'progress',
    );
    // Charged for work finished after the payer's deadline.
    const late = lane()(RECEIPT_STATUS.ok, 1, undefined, { finishedAt: 5_000 });
    assert.equal(
      reasonOf(() => new LaneVerifier({ payer, quote }).verify(late, { deadline: 4_000 })),
      'deadline',
    );
  });

  test('link: a payer links every receipt of an honest chain but pays only what it asked for, in time, as the reply bears out', () => {
    const v = new LaneVerifier({ payer, quote });
    const next = lane();
    const asked = { asked: true, reply: 'res' as const, deadline: 10_000, arrivedAt: 9_000 };
    const paid = (r: SignedReceipt, c: Parameters<LaneVerifier['link']>[1]) => {
      const out = v.link(r, c);
      return out.payable ? 'paid' : out.reason;
    };
    assert.equal(paid(next(RECEIPT_STATUS.ok, 1), asked), 'paid');
    // A request this payer never sent to this agent: linked, not paid.
    assert.equal(paid(next(RECEIPT_STATUS.ok, 1), { ...asked, asked: false }), 'unsolicited');
    // The answer came after the deadline by the payer's own clock, whatever time the receipt states.
    assert.equal(paid(next(RECEIPT_STATUS.ok, 1), { ...asked, arrivedAt: 10_001 }), 'late');
    // An ok receipt on an error reply; a cancel the payer never sent.
    assert.equal(paid(next(RECEIPT_STATUS.ok, 1), { ...asked, reply: 'err' }), 'status');
    assert.equal(paid(next(RECEIPT_STATUS.cancelled, 1), { ...asked, reply: 'err' }), 'status');
    assert.equal(paid(next(RECEIPT_STATUS.cancelled, 1), { ...asked, reply: 'err', cancelled: true, rows: 1 }), 'paid');
    // A priced receipt that came without any reply (a resync of work whose answer never arrived).
    assert.equal(paid(next(RECEIPT_STATUS.ok, 1), { asked: true }), 'no-reply');
    // More units than the quote allows.
    assert.equal(paid(next(RECEIPT_STATUS.ok, 11), asked), 'units');
    // Failed work costs 0 and needs nothing more.
    assert.equal(paid(next(RECEIPT_STATUS.failed, 0), { asked: true, reply: 'err' }), 'paid');
    // The chain went on through all of them; the payer owes only the three it accepted.
    assert.equal(v.state.seq, 9);
    assert.equal(v.state.payable, 7 + Math.max(3, 5) + 0);
    assert.ok(v.state.cumulative > (v.state.payable ?? 0), 'the agent billed more than the payer owes');
    // What breaks the chain still throws and changes nothing.
    assert.equal(
      reasonOf(() => v.link(lane()(RECEIPT_STATUS.ok, 1), asked)),
      'replayed',
    );
    assert.equal(v.state.seq, 9);
  });

  test('link: progress receipts are paid for unit outputs delivered, below the units asked, once each; a cancel for units delivered', () => {
    const v = new LaneVerifier({ payer, quote });
    const next = lane();
    const progress = { asked: true, reply: 'progress' as const, deadline: 10_000, arrivedAt: 9_000, units: 6 };
    const paid = (r: SignedReceipt, c: Parameters<LaneVerifier['link']>[1]) => {
      const out = v.link(r, c);
      return out.payable ? `paid ${out.price}` : out.reason;
    };
    const job = newRequestId();
    assert.equal(paid(next(RECEIPT_STATUS.partial, 2, job), { ...progress, rows: 2 }), 'paid 10');
    // Units the agent says it did but whose outputs never came: not paid (and the agent's rule still counts them charged).
    assert.equal(paid(next(RECEIPT_STATUS.partial, 4, job), { ...progress, rows: 3 }), 'undelivered');
    // A partial that came on a final reply or through a resync (no progress message seen).
    assert.equal(paid(next(RECEIPT_STATUS.partial, 5, job), { ...progress, reply: 'res', rows: 5 }), 'status');
    // A partial at every unit asked is no progress: the job is done and its receipt must be final.
    assert.equal(paid(next(RECEIPT_STATUS.partial, 6, job), { ...progress, rows: 6 }), 'units');
    // The final ok receipt charges the base and what the partials did not: 2 + 5 × 6 − 30 charged before.
    assert.equal(paid(next(RECEIPT_STATUS.ok, 6, job), { ...progress, reply: 'res' }), 'paid 2');
    // A partial after the final one: the request is closed.
    assert.equal(paid(next(RECEIPT_STATUS.partial, 7, job), { ...progress, rows: 7, units: 10 }), 'duplicate');
    // More units than the request asked for, final or partial.
    assert.equal(paid(next(RECEIPT_STATUS.ok, 7), { ...progress, reply: 'res' }), 'units');
    // A one-shot model (maxUnits 1) has no progress: a partial at its one unit is refused whatever it delivered.
    const oneShot = new LaneVerifier({ payer, quote: { ...quote, models: [{ ...price, maxUnits: 1 }] } });
    assert.equal(oneShot.link(lane()(RECEIPT_STATUS.partial, 1), { ...progress, rows: 1 }).reason, 'units');
    // A cancel is paid for the units whose outputs came, and no more.
    const cancelled = { asked: true, reply: 'err' as const, cancelled: true, deadline: 10_000, arrivedAt: 9_000, units: 6 };
    const job2 = newRequestId();
    assert.equal(paid(next(RECEIPT_STATUS.partial, 3, job2), { ...progress, rows: 3 }), 'paid 15');
    assert.equal(paid(next(RECEIPT_STATUS.cancelled, 4, job2), { ...cancelled, rows: 3 }), 'undelivered');
    const job3 = newRequestId();
    assert.equal(paid(next(RECEIPT_STATUS.partial, 3, job3), { ...progress, rows: 3 }), 'paid 15');
    // max(minCharge 3, 5 × 3) − 15 charged: the cancel adds 0 to the progress already paid.
    assert.equal(paid(next(RECEIPT_STATUS.cancelled, 3, job3), { ...cancelled, rows: 3 }), 'paid 0');
    // What the payer owes: 10 + 2 for the first job (units 3–6 were not delivered as progress, so the agent
    // lost them), 15 for the second (its cancel claimed an undelivered unit), 15 for the third.
    assert.equal(v.state.payable, 10 + 2 + 15 + 15);
  });

  test('verifyChain: one signature covers a batch through the hash chain; a forged link or last signature refuses it all', () => {
    const next = lane();
    const batch = [next(RECEIPT_STATUS.ok, 1), next(RECEIPT_STATUS.failed, 0), next(RECEIPT_STATUS.ok, 1)];
    const v = new LaneVerifier({ payer, quote });
    // An edited middle receipt breaks the link its successor signed.
    const edited = [batch[0]!, { ...batch[1]!, price: 7, cumulative: 14 }, batch[2]!];
    assert.equal(
      reasonOf(() => v.verifyChain(edited)),
      'price',
    );
    const badLast = [batch[0]!, batch[1]!, { ...batch[2]!, sig: new Uint8Array(64) }];
    assert.equal(
      reasonOf(() => v.verifyChain(badLast)),
      'signature',
    );
    assert.equal(v.state.seq, 0, 'a refused batch leaves the lane as it was');
    assert.deepEqual(
      v.verifyChain(batch).map((a) => a.price),
      [7, 0, 7],
    );
    assert.equal(v.state.cumulative, 14);
    assert.equal(
      reasonOf(() => v.verify(batch[2]!)),
      'replayed',
    );
  });

  describe('deferred signatures (the SDK links receipts and checks signatures before each voucher)', () => {
    const asked = { asked: true, reply: 'res' as const };
    const forger = generateIdentity('agent');
    /** Receipts that continue a lane from `prev` in the agent's name, signed by someone else (a relay, a router, the network). */
    const forgeTail = (honest: SignedReceipt[], prev: Uint8Array): SignedReceipt[] =>
      honest.map((r) => {
        const forged: Receipt = { ...r, prevReceipt: prev, outputHash: new Uint8Array(32).fill(0xee) };
        prev = receiptLeaf(forged).slice();
        return { ...forged, sig: signBytes(forger, prev) };
      });

    test('one Ed25519 verification covers every receipt linked since the last check', () => {
      const next = lane();
      const v = new LaneVerifier({ payer, quote, deferSignatures: true });
      for (let i = 0; i < 100; i++) assert.ok(v.link(next(RECEIPT_STATUS.ok, 1), asked).payable);
      assert.equal(v.unchecked, 100);
      assert.equal(v.signedSeq, 0, 'nothing is covered by a checked signature yet');
      assert.deepEqual(v.checkSignatures(), { ok: true, checked: 1 });
      assert.equal(v.signedSeq, 100);
      assert.equal(v.state.payable, 700);
      assert.deepEqual(v.checkSignatures(), { ok: true, checked: 0 });
    });

    test('a forged tail hidden in a batch behind honest receipts is caught before paying and taken out of what is owed', () => {
      const next = lane();
      const v = new LaneVerifier({ payer, quote, deferSignatures: true });
      const honest = Array.from({ length: 7 }, () => next(RECEIPT_STATUS.ok, 1));
      for (const r of honest.slice(0, 4)) v.link(r, asked);
      // Receipts 5-7 link (every field, seq and hash link is right) but the agent never signed them.
      for (const r of forgeTail(honest.slice(4), receiptLeaf(honest[3]!).slice())) assert.ok(v.link(r, asked).payable);
      assert.equal(v.state.payable, 49);
      const check = v.checkSignatures();
      assert.deepEqual(check, { ok: false, seq: 5, unpaid: 3, checked: 4 });
      assert.equal(v.state.payable, 28, 'only the four receipts the agent signed are owed');
      assert.equal(v.signedSeq, 4);
      assert.equal(
        reasonOf(() => v.link(next(RECEIPT_STATUS.ok, 1), asked)),
        'signature',
        'the lane links nothing after a receipt the agent did not sign',
      );
    });

    test('a whole batch with no valid signature is owed nothing beyond the last check', () => {
      const next = lane();
      const v = new LaneVerifier({ payer, quote, deferSignatures: true });
      const first = next(RECEIPT_STATUS.ok, 1);
      v.link(first, asked);
      assert.equal(v.checkSignatures().ok, true);
      const forged = forgeTail(
        Array.from({ length: 3 }, () => next(RECEIPT_STATUS.ok, 1)),
        receiptLeaf(first).slice(),
      );
      for (const r of forged) v.link(r, asked);
      assert.deepEqual(v.checkSignatures(), { ok: false, seq: 2, unpaid: 3, checked: 3 });
      assert.equal(v.state.payable, 7);
    });

    test('a forged receipt followed by an honest one breaks the hash link at once', () => {
      const next = lane();
      const v = new LaneVerifier({ payer, quote, deferSignatures: true });
      const honest = [next(RECEIPT_STATUS.ok, 1), next(RECEIPT_STATUS.ok, 1), next(RECEIPT_STATUS.ok, 1)];
      v.link(honest[0]!, asked);
      v.link(forgeTail([honest[1]!], receiptLeaf(honest[0]!).slice())[0]!, asked);
      assert.equal(
        reasonOf(() => v.link(honest[2]!, asked)),
        'chain',
      );
    });

    test("a receipt with a broken signature under the agent's later signed receipt is the agent's word, through the hash chain", () => {
      const next = lane();
      const v = new LaneVerifier({ payer, quote, deferSignatures: true });
      const batch = [next(RECEIPT_STATUS.ok, 1), next(RECEIPT_STATUS.ok, 1), next(RECEIPT_STATUS.ok, 1)];
      // Receipt 3 is signed by the agent and its leaf hashes receipt 2's exact fields: the agent is bound to them.
      v.link(batch[0]!, asked);
      v.link({ ...batch[1]!, sig: new Uint8Array(64) }, asked);
      v.link(batch[2]!, asked);
      assert.deepEqual(v.checkSignatures(), { ok: true, checked: 1 });
      assert.equal(v.state.payable, 21);
    });

    test('unchecked receipts survive a store and restore (plain JSON) and are still checked', () => {
      const next = lane();
      const v = new LaneVerifier({ payer, quote, deferSignatures: true });
      const honest = [next(RECEIPT_STATUS.ok, 1), next(RECEIPT_STATUS.ok, 1), next(RECEIPT_STATUS.ok, 1)];
      v.link(honest[0]!, asked);
      for (const r of forgeTail(honest.slice(1), receiptLeaf(honest[0]!).slice())) v.link(r, asked);
      const restored = new LaneVerifier({ payer, quote, deferSignatures: true, state: JSON.parse(JSON.stringify(v.state)) });
      assert.equal(restored.unchecked, 3);
      assert.deepEqual(restored.checkSignatures(), { ok: false, seq: 2, unpaid: 2, checked: 3 });
      assert.equal(restored.state.payable, 7);
    });
  });

  test('quotes: signature, id binding and expiry are checked', () => {
    const signed = signQuote(agent, { payout, chainId: 31337, escrow, issuedAt: 0, validUntil: Date.now() + 1000, models: [price] });
    assert.equal(verifyQuote(signed, { agentId: agent.id }).payout, payout);
    assert.throws(() => verifyQuote(signed, { agentId: generateIdentity('agent').id }), /does not match/);
    const tampered = { ...signed, quote: new Uint8Array(signed.quote) };
    tampered.quote[tampered.quote.length - 2]! ^= 1;
    assert.throws(() => verifyQuote(tampered), MeshError);
    assert.throws(() => verifyQuote(signed, { nowMs: Date.now() + 2000 }), /expired/);
  });

  test('Merkle root: sorted pairs (OpenZeppelin), one leaf is its own root, proofs verify for every leaf', () => {
    const leaves = Array.from({ length: 7 }, (_, i) => keccak256Bytes(new Uint8Array([i])));
    assert.deepEqual(merkleRoot(leaves.slice(0, 1)), leaves[0]);
    const a = leaves[0]!;
    const b = leaves[1]!;
    const sorted = Buffer.compare(a, b) <= 0 ? [a, b] : [b, a];
    assert.equal(toHex(hashPair(a, b)), keccak256(Buffer.concat(sorted)));
    const root = merkleRoot(leaves);
    for (let i = 0; i < leaves.length; i++) assert.ok(verifyMerkleProof(merkleProof(leaves, i), root, leaves[i]!));
    assert.ok(!verifyMerkleProof(merkleProof(leaves, 0), root, leaves[1]!));
  });
});
