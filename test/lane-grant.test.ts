/** Lane grants (docs/settlement.md, "Lanes"): the protocol's own EIP-712 hashing against ethers', signing with a wallet, recovery. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { recoverLaneGrantSigner } from '@edge-mesh/contracts';
import { laneGrantClientHash, laneGrantDigest, MeshError, signLaneGrant, voucherTypedData } from '@edge-mesh/protocol';
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
