/**
 * The agent's voucher signature worker (edge-agent/src/recover.ts): it must give exactly what the main thread's
 * recoverVoucherSigner gives, refuse what it refuses, and bound what a flood of vouchers can queue.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { recoverLaneGrantSigner, recoverVoucherSigner } from '@edge-mesh/contracts';
import { type MeshError, signLaneGrant, signVoucher, splitVoucherSignature, type Voucher, voucherDigest } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { MAX_PENDING, MAX_PENDING_PER_SENDER, SignerRecovery } from '../edge-agent/src/recover.ts';
import { quiet } from './helpers.ts';

const domain = { chainId: 31337n, escrow: '0x5FbDB2315678afecb367f032d93F642f64180aa3' };
const SECP256K1_N = BigInt('0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141');

function voucher(i: number): Voucher {
  return {
    agent: '0x70997970c51812dc3a010c7d01b50e0d17dc79c8',
    cumulative: BigInt(1_000 + i),
    receiptsRoot: ethers.keccak256(ethers.toUtf8Bytes(`root ${i}`)),
    feeCumulative: BigInt(i % 7),
  };
}

const codeOf = (p: Promise<unknown>) =>
  p.then(
    () => 'ok',
    (err: MeshError) => err.code,
  );

test('the worker recovers the signer recoverVoucherSigner recovers, for real and for mismatched signatures', async (t) => {
  const recovery = new SignerRecovery(quiet);
  t.after(() => recovery.close());
  const wallets = [ethers.Wallet.createRandom(), ethers.Wallet.createRandom()];
  for (let i = 0; i < 12; i++) {
    const v = voucher(i);
    const sig = await signVoucher(wallets[i % 2]!, domain, v);
    const got = await recovery.recoverVoucher(domain, v, sig, 'client-a');
    assert.equal(got, recoverVoucherSigner(domain, v, sig).toLowerCase());
    assert.equal(got, wallets[i % 2]!.address.toLowerCase(), 'the signer');
    // The same signature over another voucher recovers some other key, the same one on both threads.
    const other = { ...v, cumulative: v.cumulative + 1n };
    const wrong = await recovery.recoverVoucher(domain, other, sig, 'client-a');
    assert.equal(wrong, recoverVoucherSigner(domain, other, sig).toLowerCase());
    assert.notEqual(wrong, wallets[i % 2]!.address.toLowerCase());
  }
  assert.equal(recovery.waiting, 0, 'nothing left waiting');
});

test("with the lane's payer named, the worker answers as recoverVoucherSigner does, on its kept key and after", async (t) => {
  const recovery = new SignerRecovery(quiet);
  t.after(() => recovery.close());
  const payer = ethers.Wallet.createRandom();
  const address = payer.address.toLowerCase();
  for (let i = 0; i < 10; i++) {
    const v = voucher(i);
    const sig = await signVoucher(payer, domain, v);
    // The first recovers in full and keeps the key; the rest are checked against it.
    assert.equal(await recovery.recoverVoucher(domain, v, sig, 'client-a', payer.address), address);
    // The same signature over another voucher: not the payer's, and the key it does recover, as before.
    const other = { ...v, cumulative: v.cumulative + 1n };
    const wrong = await recovery.recoverVoucher(domain, other, sig, 'client-a', payer.address);
    assert.equal(wrong, recoverVoucherSigner(domain, other, sig).toLowerCase());
    assert.notEqual(wrong, address);
    // The payer's own r and s with the other recovery id: valid ECDSA for the payer's key over this digest, but
    // ecrecover (and so the escrow) reads the other point R and gets another key. Not the payer's voucher.
    const { r, s, v: id } = splitVoucherSignature(sig);
    const flipped = ethers.concat([r, s, new Uint8Array([id === 27 ? 28 : 27])]);
    const flippedSigner = recoverVoucherSigner(domain, v, flipped).toLowerCase();
    assert.notEqual(flippedSigner, address);
    assert.equal(await recovery.recoverVoucher(domain, v, flipped, 'client-a', payer.address), flippedSigner);
    // A voucher another key signed, sent on the payer's lane.
    const forger = ethers.Wallet.createRandom();
    const forged = await signVoucher(forger, domain, v);
    assert.equal(await recovery.recoverVoucher(domain, v, forged, 'client-a', payer.address), forger.address.toLowerCase());
  }
  assert.equal(recovery.checked, 40);
});

test('the worker keeps a payer key only once recovered as that payer, and at most MAX_KEYS of them', async () => {
  const worker = await import('../edge-agent/src/recover-worker.mjs');
  const split = (sig: string) => {
    const { r, s, v } = splitVoucherSignature(sig);
    return [r, s, v] as const;
  };
  const digestOf = (v: Voucher) => voucherDigest(domain, v);
  const before = worker.keptKeys();
  const payer = ethers.Wallet.createRandom();
  const forger = ethers.Wallet.createRandom();
  const v = voucher(3);
  // A forger's voucher naming the payer: recovered, and no key kept for either.
  assert.equal(
    worker.recoverAddress(digestOf(v), ...split(await signVoucher(forger, domain, v)), payer.address.toLowerCase()),
    forger.address.toLowerCase(),
  );
  assert.equal(worker.keptKeys(), before);
  assert.equal(
    worker.recoverAddress(digestOf(v), ...split(await signVoucher(payer, domain, v)), payer.address.toLowerCase()),
    payer.address.toLowerCase(),
  );
  assert.equal(worker.keptKeys(), before + 1);
  for (let i = 0; i < worker.MAX_KEYS + 5; i++) {
    const w = ethers.Wallet.createRandom();
    assert.equal(
      worker.recoverAddress(digestOf(v), ...split(await signVoucher(w, domain, v)), w.address.toLowerCase()),
      w.address.toLowerCase(),
    );
  }
  assert.equal(worker.keptKeys(), worker.MAX_KEYS);
});

test('lane grants: the worker recovers the signer recoverLaneGrantSigner recovers, counted apart from vouchers', async (t) => {
  const recovery = new SignerRecovery(quiet);
  t.after(() => recovery.close());
  const wallet = ethers.Wallet.createRandom();
  const grant = { agent: '0x70997970c51812dc3a010c7d01b50e0d17dc79c8', client: 'app-a', issuedAt: 1_700_000_000_000 };
  const sig = await signLaneGrant(wallet, domain, grant);
  assert.equal(await recovery.recoverGrant(domain, grant, sig, 'app-a'), wallet.address.toLowerCase());
  // Another client's name under the same signature recovers some other key, the same one on both threads.
  const other = { ...grant, client: 'app-b' };
  const wrong = await recovery.recoverGrant(domain, other, sig, 'app-b');
  assert.equal(wrong, recoverLaneGrantSigner(domain, other, sig));
  assert.notEqual(wrong, wallet.address.toLowerCase());
  assert.throws(() => recovery.recoverGrant(domain, grant, '0x1234', 'app-a'), { code: 'MESH_VOUCHER_INVALID' });
  assert.equal(recovery.grantsChecked, 2);
  assert.equal(recovery.checked, 0, 'no voucher counted');
});

test('a malformed or high-s signature is refused at once with MESH_VOUCHER_INVALID, as on the main thread', async (t) => {
  const recovery = new SignerRecovery(quiet);
  t.after(() => recovery.close());
  const v = voucher(1);
  const sig = await signVoucher(ethers.Wallet.createRandom(), domain, v);
  const { r, s, v: recoveryId } = splitVoucherSignature(sig);
  // The twin signature (n − s, the other recovery id) is valid ECDSA but high-s: the escrow refuses it.
  const highS = ethers.concat([r, ethers.toBeHex(SECP256K1_N - BigInt(s), 32), new Uint8Array([recoveryId === 27 ? 28 : 27])]);
  for (const bad of [highS, `${sig.slice(0, -2)}`, '0x1234']) {
    assert.throws(() => recoverVoucherSigner(domain, v, bad), { code: 'MESH_VOUCHER_INVALID' });
    assert.throws(() => recovery.recoverVoucher(domain, v, bad, 'client-a'), { code: 'MESH_VOUCHER_INVALID' });
  }
  assert.equal(recovery.waiting, 0, 'a refused signature queues nothing');
});

test('a flood of vouchers from one client fills only its share; other clients still get theirs checked', async (t) => {
  const recovery = new SignerRecovery(quiet);
  t.after(() => recovery.close());
  const wallet = ethers.Wallet.createRandom();
  const v = voucher(2);
  const sig = await signVoucher(wallet, domain, v);
  const flood = Array.from({ length: MAX_PENDING_PER_SENDER + 20 }, () => codeOf(recovery.recoverVoucher(domain, v, sig, 'flooder')));
  assert.equal(recovery.waiting, MAX_PENDING_PER_SENDER, "at most the client's share waits");
  const honest = recovery.recoverVoucher(domain, v, sig, 'honest');
  const codes = await Promise.all(flood);
  assert.equal(codes.filter((c) => c === 'MESH_BUSY').length, 20, 'the rest refused as busy');
  assert.equal(codes.filter((c) => c === 'ok').length, MAX_PENDING_PER_SENDER);
  assert.equal(await honest, wallet.address.toLowerCase(), "another client's voucher is checked");
  // Once its checks are done the client has its share again.
  assert.equal(await recovery.recoverVoucher(domain, v, sig, 'flooder'), wallet.address.toLowerCase());
});

test('a check asked for after close is refused, and starts no worker', async () => {
  const recovery = new SignerRecovery(quiet);
  await recovery.close();
  const v = voucher(5);
  const sig = await signVoucher(ethers.Wallet.createRandom(), domain, v);
  assert.equal(await codeOf(recovery.recoverVoucher(domain, v, sig, 'a')), 'MESH_SHUTTING_DOWN');
  assert.equal((recovery as unknown as { worker: unknown }).worker, undefined);
});

test('no more than MAX_PENDING checks wait across clients; closing refuses those still waiting', async (t) => {
  const recovery = new SignerRecovery(quiet);
  t.after(() => recovery.close());
  const v = voucher(3);
  const sig = await signVoucher(ethers.Wallet.createRandom(), domain, v);
  const clients = Math.ceil(MAX_PENDING / MAX_PENDING_PER_SENDER) + 2;
  const all: Promise<string>[] = [];
  for (let c = 0; c < clients; c++)
    for (let i = 0; i < MAX_PENDING_PER_SENDER; i++) all.push(codeOf(recovery.recoverVoucher(domain, v, sig, `client-${c}`)));
  assert.equal(recovery.waiting, MAX_PENDING);
  await recovery.close();
  const codes = await Promise.all(all);
  assert.equal(codes.filter((c) => c === 'MESH_BUSY').length, clients * MAX_PENDING_PER_SENDER - MAX_PENDING);
  // Those the worker had not answered when it stopped are refused as the agent stopping; none is left hanging.
  assert.equal(codes.filter((c) => c === 'ok' || c === 'MESH_SHUTTING_DOWN').length, MAX_PENDING);
  assert.ok(codes.includes('MESH_SHUTTING_DOWN'), 'some were still waiting at close');
});

test('a worker that dies refuses what waited on it, and later checks run on the main thread with the same answers', async (t) => {
  const recovery = new SignerRecovery(quiet);
  t.after(() => recovery.close());
  const wallet = ethers.Wallet.createRandom();
  const v = voucher(4);
  const sig = await signVoucher(wallet, domain, v);
  assert.equal(await recovery.recoverVoucher(domain, v, sig, 'a'), wallet.address.toLowerCase());
  const waiting = Array.from({ length: 8 }, () => codeOf(recovery.recoverVoucher(domain, v, sig, 'a')));
  // The worker thread ends (as if it crashed): what waited is refused, nothing hangs.
  await (recovery as unknown as { worker: { terminate(): Promise<number> } }).worker.terminate();
  const codes = await Promise.all(waiting);
  assert.ok(
    codes.every((c) => c === 'ok' || c === 'MESH_INTERNAL'),
    `answered or refused: ${codes.join(',')}`,
  );
  const internals = recovery as unknown as { failed: boolean; worker: unknown };
  assert.equal(internals.failed, true, 'the worker is given up');
  assert.equal(await recovery.recoverVoucher(domain, v, sig, 'a'), wallet.address.toLowerCase(), 'checked on the main thread now');
  assert.equal(internals.worker, undefined, 'no worker started again');
  assert.equal(recovery.waiting, 0);
});

test("a payer key the worker drops takes its key's table with it: the kept keys' memory stays bounded", async () => {
  // noble keeps each point's multiplication table in a module-wide Map until the point's window is set again: a key
  // dropped from the worker's LRU without that kept its table (tens of KB) for ever, one for every payer ever seen.
  const { secp256k1 } = await import('@noble/curves/secp256k1');
  const { setFlagsFromString } = await import('node:v8');
  const { runInNewContext } = await import('node:vm');
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const worker = await import('../edge-agent/src/recover-worker.mjs');
  const proto = secp256k1.ProjectivePoint.prototype as unknown as { _setWindowSize(w: number): void };
  const setWindow = proto._setWindowSize;
  const windowed: WeakRef<object>[] = [];
  proto._setWindowSize = function (this: object, w: number) {
    if (w > 1) windowed.push(new WeakRef(this));
    return setWindow.call(this, w);
  };
  const v = voucher(6);
  // Each payer sends two vouchers: the first keeps its key, the second is checked against it (and builds its table).
  const pay = async (w: ethers.HDNodeWallet, i: number) => {
    const vi = { ...v, cumulative: v.cumulative + BigInt(i) };
    const { r, s, v: id } = splitVoucherSignature(await signVoucher(w, domain, vi));
    return worker.recoverAddress(voucherDigest(domain, vi), r, s, id, w.address.toLowerCase());
  };
  try {
    const first = Array.from({ length: 8 }, () => ethers.Wallet.createRandom());
    for (const w of first) {
      assert.equal(await pay(w, 0), w.address.toLowerCase());
      assert.equal(await pay(w, 1), w.address.toLowerCase());
    }
    assert.equal(windowed.length, first.length, 'one kept key each');
    // As many other payers again as the worker keeps: the first eight are dropped.
    for (let i = 0; i < worker.MAX_KEYS; i++) {
      const w = ethers.Wallet.createRandom();
      assert.equal(await pay(w, 0), w.address.toLowerCase());
    }
  } finally {
    proto._setWindowSize = setWindow;
  }
  const dropped = windowed.slice(0, 8);
  for (let round = 0; round < 3; round++) {
    await new Promise((resolve) => setImmediate(resolve));
    gc();
  }
  const alive = dropped.filter((ref) => ref.deref() !== undefined).length;
  assert.equal(alive, 0, `${alive} of ${dropped.length} dropped payer keys still held (with their tables)`);
});
