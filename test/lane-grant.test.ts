/**
 * Lane grants (docs/settlement.md, "Lanes") and the escrow v2's owner consent and voucher: the protocol's own
 * EIP-712 hashing against ethers', signing with a wallet, recovery.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { recoverLaneGrantSigner } from '@edge-mesh/contracts';
import {
  laneGrantClientHash,
  laneGrantDigest,
  MeshError,
  ownerConsentDigest,
  signLaneGrant,
  signOwnerConsent,
  signVoucher,
  voucherDigest,
  voucherTypedData,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';

const domain = { chainId: 31337n, escrow: '0x5fbdb2315678afecb367f032d93f642f64180aa3' };
const terms = {
  agent: '0x70997970c51812dc3a010c7d01b50e0d17dc79c8',
  client: 'app-abcdefghijklmnopqrstuvwxyz',
  issuedAt: 1_765_000_000_000,
};

test('a lane grant hashes as EIP-712 says, signs with any wallet and recovers to the payer', async () => {
  const wallet = ethers.Wallet.createRandom();
  const td = voucherTypedData(domain);
  const types = {
    LaneGrant: [
      { name: 'agent', type: 'address' },
      { name: 'client', type: 'bytes32' },
      { name: 'issuedAt', type: 'uint64' },
    ],
  };
  const value = { agent: ethers.getAddress(terms.agent), client: laneGrantClientHash(terms.client), issuedAt: BigInt(terms.issuedAt) };
  assert.equal(laneGrantDigest(domain, terms), ethers.TypedDataEncoder.hash(td.domain, types, value));
  const sig = await signLaneGrant(wallet, domain, terms);
  assert.equal(recoverLaneGrantSigner(domain, terms, sig), wallet.address.toLowerCase());
  // Another client, agent or time recovers to somebody else: the grant covers exactly what it names.
  for (const other of [
    { ...terms, client: 'app-zzzzzzzzzzzzzzzzzzzzzzzzzz' },
    { ...terms, agent: `0x${'11'.repeat(20)}` },
    { ...terms, issuedAt: terms.issuedAt + 1 },
  ]) {
    assert.notEqual(recoverLaneGrantSigner(domain, other, sig), wallet.address.toLowerCase());
  }
  // Another escrow or chain too.
  assert.notEqual(recoverLaneGrantSigner({ ...domain, chainId: 1n }, terms, sig), wallet.address.toLowerCase());
  // The malleable twin is refused.
  const { r, s, v } = ethers.Signature.from(sig);
  const highS = ethers.concat([r, ethers.toBeHex(ethers.N - BigInt(s), 32), Uint8Array.of(v === 27 ? 28 : 27)]);
  assert.throws(
    () => recoverLaneGrantSigner(domain, terms, highS),
    (e: unknown) => e instanceof MeshError && e.code === 'MESH_VOUCHER_INVALID',
  );
});

test('an owner consent and a v2 voucher hash as EIP-712 says (domain version 2) and recover to the voucher key', async () => {
  const wallet = ethers.Wallet.createRandom();
  const td = voucherTypedData(domain);
  assert.equal(td.domain.version, '2');
  const owner = ethers.Wallet.createRandom().address;
  assert.equal(
    ownerConsentDigest(domain, owner),
    ethers.TypedDataEncoder.hash(td.domain, { LaneOwner: [{ name: 'owner', type: 'address' }] }, { owner }),
  );
  const consent = await signOwnerConsent(wallet, domain, owner);
  assert.equal(ethers.recoverAddress(ownerConsentDigest(domain, owner), consent), wallet.address);
  // It names its owner: for anyone else it recovers to another address.
  assert.notEqual(ethers.recoverAddress(ownerConsentDigest(domain, ethers.Wallet.createRandom().address), consent), wallet.address);

  const v = { agent: terms.agent, cumulative: 5_000n, feeCumulative: 7n, receiptsRoot: ethers.id('r') };
  const expected = ethers.TypedDataEncoder.hash(td.domain, td.types, { ...v, agent: ethers.getAddress(v.agent) });
  assert.equal(voucherDigest(domain, v), expected);
  // No fee is a fee of 0.
  assert.equal(voucherDigest(domain, { ...v, feeCumulative: undefined }), voucherDigest(domain, { ...v, feeCumulative: 0n }));
  assert.equal(ethers.recoverAddress(expected, await signVoucher(wallet, domain, v)), wallet.address);
  // Out of the lane slot's widths: refused before signing.
  await assert.rejects(
    signVoucher(wallet, domain, { ...v, cumulative: 1n << 96n }),
    (e: unknown) => e instanceof MeshError && e.code === 'MESH_VOUCHER_INVALID',
  );
  await assert.rejects(
    signVoucher(wallet, domain, { ...v, feeCumulative: 1n << 64n }),
    (e: unknown) => e instanceof MeshError && e.code === 'MESH_VOUCHER_INVALID',
  );
});

test("a wallet's voucher signed from its digest (signingKey) is the signature signTypedData makes, refusals included", async () => {
  const wallet = ethers.Wallet.createRandom();
  // The same key behind the typed-data path alone, as a remote signer would be.
  const remote = { getAddress: () => wallet.getAddress(), signTypedData: wallet.signTypedData.bind(wallet) };
  let digestSigned = 0;
  const counted = {
    getAddress: () => wallet.getAddress(),
    signTypedData: () => Promise.reject(new MeshError('MESH_INTERNAL', 'the digest path must be taken')),
    signingKey: {
      sign: (digest: string) => {
        digestSigned++;
        return wallet.signingKey.sign(digest);
      },
    },
  };
  for (let i = 0; i < 6; i++) {
    const v = { agent: terms.agent, cumulative: 10_000n + BigInt(i), feeCumulative: BigInt(i), receiptsRoot: ethers.id(`r${i}`) };
    const viaDigest = await signVoucher(wallet, domain, v);
    assert.equal(viaDigest, await signVoucher(remote, domain, v), 'RFC 6979: the same signature either way');
    assert.equal(await signVoucher(counted, domain, v), viaDigest);
    assert.equal(ethers.recoverAddress(voucherDigest(domain, v), viaDigest), wallet.address);
  }
  assert.equal(digestSigned, 6);
  await assert.rejects(
    signVoucher(counted, domain, { agent: terms.agent, cumulative: 1n << 96n, receiptsRoot: ethers.id('r') }),
    (e: unknown) => e instanceof MeshError && e.code === 'MESH_VOUCHER_INVALID',
  );
  assert.equal(digestSigned, 6, 'a voucher out of range is refused before the key signs');
});
