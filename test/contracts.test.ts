/**
 * MeshEscrow v2 on a real local chain (one Hardhat 2 node for the whole file), one test per rule or attack
 * (docs/settlement.md, "The escrow contract"): funding and settlement with exact balances; the voucher key
 * apart from the owner who alone withdraws; consent to open a lane; a stranger's top-up; partial payment and
 * the rest after a top-up; the relayer fee; fixed-amount withdrawals that lapse; a withdrawal racing a
 * settlement; thaw bounds; a blacklisted payee inside a batch; token decimals; a fee-on-transfer token;
 * replay, another chain or escrow, a redirected voucher, a malleable signature, reentrancy, permit funding.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ERC20_ABI, ESCROW_ABI, EscrowClient, recoverVoucherSigner, withdrawalAtRisk } from '@edge-mesh/contracts';
import {
  artifact,
  connectRpc,
  deployArtifact,
  deployMesh,
  type LocalChain,
  type MeshDeployment,
  startLocalChain,
} from '@edge-mesh/contracts/dev';
import {
  agentBindingMessage,
  type EscrowDomain,
  generateIdentity,
  MAX_UINT96,
  MeshError,
  ownerConsentDigest,
  PACKED_VOUCHER_BYTES,
  packVouchers,
  SECP256K1_N,
  type SignedVoucher,
  signBytes,
  signVoucher,
  skipReasonName,
  unpackVouchers,
  type Voucher,
  verifyBytes,
  voucherDigest,
  voucherTypedData,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { ROOT } from './helpers.ts';

const THAW = 3_600;
const WINDOW = 86_400;
const USDC = 1_000_000n; // 6 decimals

let chain: LocalChain;
let mesh: MeshDeployment;
let relayer: EscrowClient;
let nextAccount = 1;

interface Party {
  wallet: ethers.Wallet;
  client: EscrowClient;
}

/** An account of its own with a client on the escrow (the shared one unless named). */
async function newParty(escrow = mesh.escrow): Promise<Party> {
  const wallet = chain.wallet(nextAccount++);
  const client = await EscrowClient.connect({ runner: wallet, escrow });
  return { wallet, client };
}

const newAgent = () => ethers.Wallet.createRandom().address;
const root = (label: string) => ethers.id(label);

async function chainNow(): Promise<bigint> {
  const block = await chain.provider.getBlock('latest');
  return BigInt(block!.timestamp);
}

async function voucher(
  client: EscrowClient,
  agent: string,
  cumulative: bigint,
  { fee = 0n, domain }: { fee?: bigint; domain?: EscrowDomain } = {},
): Promise<SignedVoucher> {
  const v: Voucher = { agent, cumulative, feeCumulative: fee, receiptsRoot: root(`${agent}:${cumulative}:${fee}`) };
  if (!domain) return client.signVoucher(v);
  return { voucher: v, signature: await signVoucher(client.runner as ethers.Signer, domain, v) };
}

/** A payer whose one key both signs vouchers and owns the lane (the simplest set-up). */
async function fundedPayer(agent: string, amount: bigint, escrow = mesh.escrow): Promise<Party> {
  const p = await newParty(escrow);
  await p.client.mint(p.wallet.address, amount);
  await p.client.fund(p.wallet.address, agent, amount);
  return p;
}

/** An app's hot voucher key and the cold key that owns its lane, opened with the voucher key's consent. */
async function ownedLane(agent: string, amount: bigint): Promise<{ signer: Party; owner: Party }> {
  const signer = await newParty();
  const owner = await newParty();
  await owner.client.mint(owner.wallet.address, amount);
  const consent = await signer.client.signOwnerConsent(owner.wallet.address);
  await owner.client.fund(signer.wallet.address, agent, amount, { consent });
  return { signer, owner };
}

const reverted =
  (reason: RegExp, check: (e: MeshError) => boolean = () => true) =>
  (err: unknown) =>
    err instanceof MeshError && err.code === 'MESH_CHAIN_REVERTED' && reason.test(String(err.details?.reason)) && check(err);

const emptyLane = { remaining: 0n, settled: 0n, feeSettled: 0n, owner: ethers.ZeroAddress, withdrawAmount: 0n, thawEnd: 0n, lapseAt: 0n };

before(async () => {
  chain = await startLocalChain({ accounts: 60 });
  mesh = await deployMesh(chain.wallet(0), { thawSeconds: THAW, withdrawWindowSeconds: WINDOW });
  relayer = await EscrowClient.connect({ runner: chain.wallet(0), escrow: mesh.escrow });
});

after(async () => {
  await chain?.close();
});

describe('MeshEscrow v2', () => {
  test('protocol/voucher.ts computes the same EIP-712 digests as the contract, and abi.ts is the compiled ABI', async () => {
    const escrow = new ethers.Contract(mesh.escrow, ESCROW_ABI, chain.provider);
    const v: Voucher = { agent: newAgent(), cumulative: 123_456n, feeCumulative: 789n, receiptsRoot: root('x') };
    assert.equal(
      await escrow.getFunction('voucherDigest')(v.agent, v.cumulative, v.feeCumulative, v.receiptsRoot),
      voucherDigest(relayer.domain, v),
    );
    // The widest amounts the lane slot holds.
    const wide: Voucher = { ...v, cumulative: MAX_UINT96, feeCumulative: (1n << 64n) - 1n };
    assert.equal(
      await escrow.getFunction('voucherDigest')(wide.agent, wide.cumulative, wide.feeCumulative, wide.receiptsRoot),
      voucherDigest(relayer.domain, wide),
    );
    const owner = newAgent();
    assert.equal(await escrow.getFunction('ownerConsentDigest')(owner), ownerConsentDigest(relayer.domain, owner));
    const [, name, version] = (await escrow.getFunction('eip712Domain')()) as [string, string, string];
    assert.deepEqual([name, version], ['EdgeMesh', '2']);

    // Pack and unpack are inverse, at 117 bytes a voucher.
    const p = await newParty();
    const signed = [await voucher(p.client, v.agent, 50n, { fee: 1n }), await voucher(p.client, v.agent, MAX_UINT96, { fee: 2n })];
    const packed = packVouchers(signed);
    assert.equal(ethers.dataLength(packed), 2 * PACKED_VOUCHER_BYTES);
    assert.deepEqual(unpackVouchers(v.agent, packed), signed);

    // Every function, event and error the contract declares is in the hand-written ABI, and nothing else of the contract's kind.
    const compiled = new ethers.Interface(artifact('MeshEscrow').abi as ethers.InterfaceAbi);
    const ours = new ethers.Interface(ESCROW_ABI);
    const sigs = (i: ethers.Interface) => {
      const out: string[] = [];
      i.forEachFunction((f) => out.push(f.format('full')));
      i.forEachEvent((e) => out.push(e.format('full')));
      i.forEachError((e) => out.push(e.format('full')));
      return out;
    };
    const mine = new Set(sigs(ours));
    for (const s of sigs(compiled)) assert.ok(mine.has(s), `abi.ts lacks ${s}`);
    assert.deepEqual(
      ours.deploy.inputs.map((i) => i.type),
      compiled.deploy.inputs.map((i) => i.type),
    );
  });

  test('fund and settle: balances are exact, one token transfer per agent for a batch of signers', async () => {
    const agent = newAgent();
    const a = await fundedPayer(agent, 5n * USDC);
    const b = await fundedPayer(agent, 2n * USDC);
    assert.deepEqual(await relayer.laneOf(a.wallet.address, agent), { ...emptyLane, remaining: 5n * USDC, owner: a.wallet.address });

    // Several vouchers per lane: only the highest matters; earlier ones are covered by it.
    await voucher(a.client, agent, 100n);
    const va = await voucher(a.client, agent, 400_123n);
    const vb = await voucher(b.client, agent, 77_000n);
    const out = await relayer.settle(agent, [va, vb]);
    assert.equal(out.paid, 477_123n);
    assert.equal(out.fees, 0n);
    assert.deepEqual(out.skipped, []);
    assert.deepEqual(out.deferred, []);
    assert.deepEqual(
      out.settled.map((s) => [s.signer, s.paid, s.cumulative, s.receiptsRoot, s.partial]),
      [
        [a.wallet.address, 400_123n, 400_123n, va.voucher.receiptsRoot, false],
        [b.wallet.address, 77_000n, 77_000n, vb.voucher.receiptsRoot, false],
      ],
    );
    const receipt = await chain.provider.getTransactionReceipt(out.hash);
    const erc20 = new ethers.Interface(ERC20_ABI);
    const transfers = receipt!.logs.filter((l) => l.address === mesh.token).map((l) => erc20.parseLog(l)!);
    assert.equal(transfers.length, 1, 'one transfer for the whole batch, none for a zero fee');
    assert.equal(transfers[0]!.args[1], agent);

    assert.equal(await relayer.tokenBalance(agent), 477_123n);
    assert.deepEqual(await relayer.laneOf(a.wallet.address, agent), {
      ...emptyLane,
      remaining: 5n * USDC - 400_123n,
      settled: 400_123n,
      owner: a.wallet.address,
    });

    // A later voucher pays only the increase.
    const out2 = await relayer.settle(agent, [await voucher(a.client, agent, 1_000_000n)]);
    assert.equal(out2.paid, 1_000_000n - 400_123n);
    assert.equal(await relayer.tokenBalance(agent), 1_000_000n + 77_000n);
    // Everything funded is either paid out or still in the escrow.
    const lanes = [await relayer.laneOf(a.wallet.address, agent), await relayer.laneOf(b.wallet.address, agent)];
    assert.equal(lanes[0]!.remaining + lanes[1]!.remaining + (await relayer.tokenBalance(agent)), 7n * USDC);
  });

  test('settleMany pays several agents in one transaction', async () => {
    const agent1 = newAgent();
    const agent2 = newAgent();
    const p = await newParty();
    await p.client.mint(p.wallet.address, 3n * USDC);
    await p.client.fund(p.wallet.address, agent1, USDC);
    await p.client.fund(p.wallet.address, agent2, 2n * USDC);
    const out = await relayer.settleMany([
      { agent: agent1, entries: [await voucher(p.client, agent1, 10n)] },
      { agent: agent2, entries: [await voucher(p.client, agent2, 20n)] },
    ]);
    assert.equal(out.paid, 30n);
    assert.equal(await relayer.tokenBalance(agent1), 10n);
    assert.equal(await relayer.tokenBalance(agent2), 20n);
  });

  test('the voucher key alone cannot withdraw or hand the lane on; the owner can', async () => {
    const agent = newAgent();
    const { signer, owner } = await ownedLane(agent, 10_000n);
    const lane = await relayer.laneOf(signer.wallet.address, agent);
    assert.equal(lane.owner, owner.wallet.address);
    assert.equal(lane.remaining, 10_000n);

    // The hot key signs vouchers that pay...
    assert.equal((await relayer.settle(agent, [await voucher(signer.client, agent, 1_000n)])).paid, 1_000n);
    // ...but cannot take the money, nor move the lane to itself.
    const notOwner = reverted(/^NotLaneOwner\(/, (e) => String(e.details?.reason).includes(owner.wallet.address));
    await assert.rejects(signer.client.requestWithdraw(signer.wallet.address, agent, 9_000n), notOwner);
    await assert.rejects(signer.client.transferLaneOwnership(signer.wallet.address, agent, signer.wallet.address), notOwner);
    await assert.rejects(signer.client.cancelWithdraw(signer.wallet.address, agent), notOwner);
    // Nor fund it as if it were its own (it would own nothing).
    await signer.client.mint(signer.wallet.address, 5n);
    await assert.rejects(signer.client.fund(signer.wallet.address, agent, 5n), notOwner);

    // The owner takes its money back after the thaw; the money goes to the owner, not the voucher key.
    const { thawEnd } = await owner.client.requestWithdraw(signer.wallet.address, agent, MAX_UINT96);
    await assert.rejects(signer.client.withdraw(signer.wallet.address, agent), notOwner);
    await chain.increaseTime(Number(thawEnd - (await chainNow())));
    await assert.rejects(signer.client.withdraw(signer.wallet.address, agent), notOwner);
    const out = await owner.client.withdraw(signer.wallet.address, agent);
    assert.equal(out.amount, 9_000n);
    assert.equal(await relayer.tokenBalance(owner.wallet.address), 9_000n);
    assert.equal(await relayer.tokenBalance(signer.wallet.address), 5n);
  });

  test('opening a lane needs the voucher key: a stranger cannot open it first and make the real funder pay into its lane', async () => {
    const agent = newAgent();
    const signer = await newParty();
    const owner = await newParty();
    const stranger = await newParty();
    await stranger.client.mint(stranger.wallet.address, 1_000n);
    await owner.client.mint(owner.wallet.address, 5_000n);

    // Without consent, or with a consent the signer gave someone else, a stranger cannot open the lane.
    await assert.rejects(stranger.client.fund(signer.wallet.address, agent, 1n), reverted(/^BadOwnerConsent\(/));
    const forOwner = await signer.client.signOwnerConsent(owner.wallet.address);
    await assert.rejects(stranger.client.fund(signer.wallet.address, agent, 1n, { consent: forOwner }), reverted(/^BadOwnerConsent\(/));
    // A consent the stranger signed itself is not the signer's.
    const selfMade = await stranger.client.signOwnerConsent(stranger.wallet.address);
    await assert.rejects(stranger.client.fund(signer.wallet.address, agent, 1n, { consent: selfMade }), reverted(/^BadOwnerConsent\(/));
    // Nor can anyone give to a lane nobody has opened (the gift would make no one its owner).
    await assert.rejects(stranger.client.topUp(signer.wallet.address, agent, 1n), reverted(/^LaneNotOpen\(/));
    assert.deepEqual(await relayer.laneOf(signer.wallet.address, agent), emptyLane);

    // With the signer's consent the owner opens it; one consent serves every agent.
    await owner.client.fund(signer.wallet.address, agent, 2_000n, { consent: forOwner });
    const agent2 = newAgent();
    await owner.client.fund(signer.wallet.address, agent2, 3_000n, { consent: forOwner });
    assert.equal((await relayer.laneOf(signer.wallet.address, agent)).owner, owner.wallet.address);
    assert.equal((await relayer.laneOf(signer.wallet.address, agent2)).owner, owner.wallet.address);
    // The consent used on chain is public, but it names its owner: the stranger still cannot use it.
    await assert.rejects(
      stranger.client.fund(signer.wallet.address, newAgent(), 1n, { consent: forOwner }),
      reverted(/^BadOwnerConsent\(/),
    );
    // And the funding a stranger sends to an owned lane as its own is refused, not swallowed.
    await assert.rejects(stranger.client.fund(signer.wallet.address, agent, 1n, { consent: selfMade }), reverted(/^NotLaneOwner\(/));
  });

  test("a stranger's top-up gives no rights and does not cancel the owner's withdrawal", async () => {
    const agent = newAgent();
    const { signer, owner } = await ownedLane(agent, 4_000n);
    const stranger = await newParty();
    await stranger.client.mint(stranger.wallet.address, 1_000n);
    const { thawEnd, lapseAt } = await owner.client.requestWithdraw(signer.wallet.address, agent, 4_000n);

    await stranger.client.topUp(signer.wallet.address, agent, 1_000n);
    const lane = await relayer.laneOf(signer.wallet.address, agent);
    assert.deepEqual(lane, { ...emptyLane, remaining: 5_000n, owner: owner.wallet.address, withdrawAmount: 4_000n, thawEnd, lapseAt });

    const notOwner = reverted(/^NotLaneOwner\(/);
    await assert.rejects(stranger.client.requestWithdraw(signer.wallet.address, agent, 1_000n), notOwner);
    await assert.rejects(stranger.client.cancelWithdraw(signer.wallet.address, agent), notOwner);
    await assert.rejects(stranger.client.transferLaneOwnership(signer.wallet.address, agent, stranger.wallet.address), notOwner);
    await chain.increaseTime(THAW);
    await assert.rejects(stranger.client.withdraw(signer.wallet.address, agent), notOwner);
    // The owner's request stood through the top-up: it takes what it asked for, the gift stays for the agent.
    assert.equal((await owner.client.withdraw(signer.wallet.address, agent)).amount, 4_000n);
    assert.equal((await relayer.laneOf(signer.wallet.address, agent)).remaining, 1_000n);
    assert.equal(await relayer.tokenBalance(stranger.wallet.address), 0n);
  });

  test('an owner hands the lane on: the new owner withdraws, the old one cannot', async () => {
    const agent = newAgent();
    const { signer, owner } = await ownedLane(agent, 3_000n);
    const next = await newParty();
    await owner.client.requestWithdraw(signer.wallet.address, agent, 1_000n);
    await owner.client.transferLaneOwnership(signer.wallet.address, agent, next.wallet.address);
    assert.equal((await relayer.laneOf(signer.wallet.address, agent)).owner, next.wallet.address);
    await chain.increaseTime(THAW);
    await assert.rejects(owner.client.withdraw(signer.wallet.address, agent), reverted(/^NotLaneOwner\(/));
    // The pending request went with the lane.
    assert.equal((await next.client.withdraw(signer.wallet.address, agent)).amount, 1_000n);
    assert.equal(await relayer.tokenBalance(next.wallet.address), 1_000n);
    await assert.rejects(
      next.client.transferLaneOwnership(signer.wallet.address, agent, ethers.ZeroAddress),
      (e: unknown) => e instanceof MeshError,
    );
  });

  test('overspend pays what the lane holds; the same voucher claims the rest after a top-up', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 1_000n);
    const v = await voucher(p.client, agent, 1_500n);
    const out = await relayer.settle(agent, [v]);
    assert.equal(out.paid, 1_000n);
    assert.deepEqual(
      out.settled.map((s) => [s.partial, s.paid, s.unpaid, s.cumulative]),
      [[true, 1_000n, 500n, 1_500n]],
    );
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { ...emptyLane, settled: 1_000n, owner: p.wallet.address });

    // While the lane is empty, the voucher is skipped as UNFUNDED (no write, no payment).
    const empty = await relayer.settle(agent, [v]);
    assert.deepEqual(
      empty.skipped.map((s) => [s.reason, s.signer]),
      [['UNFUNDED', p.wallet.address]],
    );
    // Another lane of the same signer cannot be drained to cover it.
    const other = newAgent();
    await p.client.mint(p.wallet.address, 5_000n);
    await p.client.fund(p.wallet.address, other, 5_000n);
    assert.equal((await relayer.laneOf(p.wallet.address, other)).remaining, 5_000n);

    // A top-up smaller than the rest: partial again. Then the rest: full, and nothing more.
    await p.client.mint(p.wallet.address, 600n);
    await p.client.fund(p.wallet.address, agent, 200n);
    assert.equal((await relayer.settle(agent, [v])).settled[0]!.unpaid, 300n);
    await p.client.fund(p.wallet.address, agent, 400n);
    const rest = await relayer.settle(agent, [v]);
    assert.deepEqual(
      rest.settled.map((s) => [s.partial, s.paid]),
      [[false, 300n]],
    );
    assert.equal(await relayer.tokenBalance(agent), 1_500n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), {
      ...emptyLane,
      remaining: 100n,
      settled: 1_500n,
      owner: p.wallet.address,
    });
    assert.deepEqual(
      (await relayer.settle(agent, [v])).skipped.map((s) => s.reason),
      ['STALE'],
    );
  });

  test('the relayer fee goes to the sender once, never twice, after the agent, never beyond the lane nor a tenth of the new pay', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 1_000n);
    const relayerA = await newParty();
    const relayerB = await newParty();

    const v1 = await voucher(p.client, agent, 600n, { fee: 30n });
    const out = await relayerA.client.settle(agent, [v1]);
    assert.deepEqual([out.paid, out.fees], [600n, 30n]);
    assert.equal(await relayer.tokenBalance(relayerA.wallet.address), 30n);
    // The same voucher again, from another relayer: no fee, no pay.
    const again = await relayerB.client.settle(agent, [v1, v1]);
    assert.deepEqual([again.paid, again.fees, again.skipped.length], [0n, 0n, 2]);
    assert.equal(await relayer.tokenBalance(relayerB.wallet.address), 0n);

    // A later voucher: the fee is cumulative too, so only its increase is paid, to whoever sends it.
    const v2 = await voucher(p.client, agent, 900n, { fee: 50n });
    const out2 = await relayerB.client.settle(agent, [v2]);
    assert.deepEqual([out2.paid, out2.fees], [300n, 20n]);
    assert.equal(await relayer.tokenBalance(relayerB.wallet.address), 20n);

    // The lane holds 50 and the voucher adds 70: the agent gets all 50, nothing is left for a fee, and the
    // agent's other 20 waits for a top-up.
    const v3 = await voucher(p.client, agent, 970n, { fee: 90n });
    const out3 = await relayerA.client.settle(agent, [v3]);
    assert.deepEqual(
      out3.settled.map((s) => [s.partial, s.paid, s.fee, s.unpaid]),
      [[true, 50n, 0n, 20n]],
    );
    let lane = await relayer.laneOf(p.wallet.address, agent);
    assert.deepEqual([lane.remaining, lane.settled, lane.feeSettled], [0n, 950n, 50n]);
    // After a top-up the same voucher pays the agent the rest, and a fee of at most a tenth of that (2 of
    // the 40 the voucher still names).
    await p.client.mint(p.wallet.address, 100n);
    await p.client.fund(p.wallet.address, agent, 100n);
    const out4 = await relayerB.client.settle(agent, [v3]);
    assert.deepEqual(
      out4.settled.map((s) => [s.partial, s.paid, s.fee]),
      [[false, 20n, 2n]],
    );
    lane = await relayer.laneOf(p.wallet.address, agent);
    assert.deepEqual([lane.remaining, lane.settled, lane.feeSettled], [78n, 970n, 52n]);
    // Fully paid, the voucher is stale: the fee it still names (38 more) is never paid by it.
    const out5 = await relayerA.client.settle(agent, [v3]);
    assert.deepEqual([out5.paid, out5.fees, out5.skipped.map((s) => s.reason)], [0n, 0n, ['STALE']]);
    // Agent plus relayers received exactly what left the lane.
    const received =
      (await relayer.tokenBalance(agent)) +
      (await relayer.tokenBalance(relayerA.wallet.address)) +
      (await relayer.tokenBalance(relayerB.wallet.address));
    assert.equal(received + (await relayer.laneOf(p.wallet.address, agent)).remaining, 1_100n);
    assert.equal(await relayer.tokenBalance(agent), 970n);
  });

  test('attack: a stolen voucher key cannot drain its lane to itself as relayer fees (a fee over a tenth is skipped)', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 10_000n);
    const thief = await newParty();
    // The protocol refuses to sign such a voucher; a thief holding the key signs the typed data itself.
    assert.throws(
      () => voucherDigest(relayer.domain, { agent, cumulative: 0n, feeCumulative: 10_000n, receiptsRoot: root('x') }),
      MeshError,
    );
    const signRaw = async (cumulative: bigint, feeCumulative: bigint) => {
      const td = voucherTypedData(relayer.domain);
      const receiptsRoot = root(`raw:${cumulative}:${feeCumulative}`);
      const sig = ethers.Signature.from(
        await p.wallet.signTypedData(td.domain, td.types, { agent, cumulative, feeCumulative, receiptsRoot }),
      );
      return ethers.solidityPacked(
        ['uint96', 'uint64', 'bytes32', 'bytes32', 'bytes32', 'uint8'],
        [cumulative, feeCumulative, receiptsRoot, sig.r, sig.s, sig.v],
      );
    };
    const escrow = new ethers.Contract(mesh.escrow, ESCROW_ABI, thief.wallet);
    const iface = new ethers.Interface(ESCROW_ABI);
    for (const [cumulative, fee] of [
      [0n, 10_000n],
      [1_000n, 101n],
    ] as const) {
      const tx = (await escrow.getFunction('settle')(agent, await signRaw(cumulative, fee))) as ethers.ContractTransactionResponse;
      const events = (await tx.wait())!.logs.map((l) => iface.parseLog(l)!);
      assert.deepEqual(
        events.map((e) => [e.name, e.args[0], skipReasonName(e.args[2] as bigint)]),
        [['SettleSkipped', p.wallet.address, 'FEE_TOO_HIGH']],
      );
    }
    assert.equal(await relayer.tokenBalance(thief.wallet.address), 0n);
    // Exactly a tenth is allowed: to take 100 in fees, the thief must pay the lane's agent 1,000.
    await (await escrow.getFunction('settle')(agent, await signRaw(1_000n, 100n))).wait();
    assert.equal(await relayer.tokenBalance(thief.wallet.address), 100n);
    assert.equal(await relayer.tokenBalance(agent), 1_000n);
  });

  test('attack: a signer cannot take back as relayer fees a tenth of what its lane paid before', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 10_000n);
    // Honest vouchers without fees pay the agent 1,000.
    await relayer.settle(agent, [await voucher(p.client, agent, 1_000n)]);
    assert.equal(await relayer.tokenBalance(agent), 1_000n);
    // The signer, relaying for itself, signs the same total with a fee of a tenth: the voucher adds nothing
    // for the agent, so it pays no fee. Else the lane would lose 100 the agent counted on for its next work.
    const drain = await p.client.settle(agent, [await voucher(p.client, agent, 1_000n, { fee: 100n })]);
    assert.deepEqual([drain.paid, drain.fees, drain.skipped.map((s) => s.reason)], [0n, 0n, ['STALE']]);
    // With 10 more for the agent, the fee is 1, not the 100 the voucher names.
    const next = await p.client.settle(agent, [await voucher(p.client, agent, 1_010n, { fee: 101n })]);
    assert.deepEqual([next.paid, next.fees], [10n, 1n]);
    assert.equal(await relayer.tokenBalance(p.wallet.address), 1n);
    assert.equal((await relayer.laneOf(p.wallet.address, agent)).remaining, 10_000n - 1_010n - 1n);
  });

  test('a withdrawal is of a fixed amount: the rest stays on the lane, and more than the lane holds pays what is left', async () => {
    const agent = newAgent();
    const { signer, owner } = await ownedLane(agent, 10_000n);
    await owner.client.requestWithdraw(signer.wallet.address, agent, 3_000n);
    await chain.increaseTime(THAW);
    assert.equal((await owner.client.withdraw(signer.wallet.address, agent)).amount, 3_000n);
    assert.deepEqual(await relayer.laneOf(signer.wallet.address, agent), { ...emptyLane, remaining: 7_000n, owner: owner.wallet.address });
    // One request, one withdrawal.
    await assert.rejects(owner.client.withdraw(signer.wallet.address, agent), reverted(/^NoWithdrawPending\(/));

    await owner.client.requestWithdraw(signer.wallet.address, agent, 50_000n);
    await chain.increaseTime(THAW);
    assert.equal((await owner.client.withdraw(signer.wallet.address, agent)).amount, 7_000n);
    assert.equal(await relayer.tokenBalance(owner.wallet.address), 10_000n);
    assert.equal((await relayer.laneOf(signer.wallet.address, agent)).remaining, 0n);
  });

  test('a thawed withdrawal lapses after its window and must be requested again', async () => {
    const agent = newAgent();
    const { signer, owner } = await ownedLane(agent, 2_000n);
    const req = await owner.client.requestWithdraw(signer.wallet.address, agent, 2_000n);
    assert.equal(req.lapseAt, req.thawEnd + BigInt(WINDOW));
    const lane = await relayer.laneOf(signer.wallet.address, agent);
    assert.deepEqual([lane.withdrawAmount, lane.thawEnd, lane.lapseAt], [2_000n, req.thawEnd, req.lapseAt]);
    assert.equal(withdrawalAtRisk(lane, await chainNow()), 2_000n);

    await chain.increaseTime(THAW + WINDOW);
    assert.equal(withdrawalAtRisk(await relayer.laneOf(signer.wallet.address, agent), await chainNow()), 0n);
    await assert.rejects(
      owner.client.withdraw(signer.wallet.address, agent),
      reverted(/^WithdrawLapsed\(/, (e) => String(e.details?.reason) === `WithdrawLapsed(${req.lapseAt})`),
    );
    assert.equal((await relayer.laneOf(signer.wallet.address, agent)).remaining, 2_000n);

    // Asked again, it thaws again from now.
    const again = await owner.client.requestWithdraw(signer.wallet.address, agent, 2_000n);
    assert.equal(again.thawEnd, (await chainNow()) + BigInt(THAW));
    await assert.rejects(owner.client.withdraw(signer.wallet.address, agent), reverted(/^StillThawing\(/));
    await chain.increaseTime(THAW + WINDOW - 120);
    assert.equal((await owner.client.withdraw(signer.wallet.address, agent)).amount, 2_000n);
  });

  test('attack: a withdrawal racing a settlement: the agent settles during the thaw, and the withdrawal takes only what is left', async () => {
    const agent = newAgent();
    const { signer, owner } = await ownedLane(agent, 10_000n);
    const early = await voucher(signer.client, agent, 3_000n);
    const late = await voucher(signer.client, agent, 9_000n);

    const { thawEnd } = await owner.client.requestWithdraw(signer.wallet.address, agent, 10_000n);
    assert.equal(thawEnd, (await chainNow()) + BigInt(THAW));
    await assert.rejects(
      owner.client.withdraw(signer.wallet.address, agent),
      (err: unknown) =>
        err instanceof MeshError &&
        err.code === 'MESH_CHAIN_REVERTED' &&
        /^StillThawing\(/.test(String(err.details?.reason)) &&
        err.details?.action === 'withdraw' &&
        err.cause !== undefined,
    );
    // The agent sees WithdrawRequested and settles within the thaw: settlements still pay.
    assert.equal((await relayer.settle(agent, [early])).paid, 3_000n);

    await chain.increaseTime(THAW);
    // The agent's last voucher and the owner's withdrawal land in the same thawed period: whichever comes first
    // takes its share; the withdrawal never takes what was settled.
    assert.equal((await owner.client.withdraw(signer.wallet.address, agent)).amount, 7_000n);
    assert.equal(await relayer.tokenBalance(owner.wallet.address), 7_000n);
    const afterOut = await relayer.settle(agent, [late]);
    assert.equal(afterOut.paid, 0n);
    assert.deepEqual(
      afterOut.skipped.map((s) => s.reason),
      ['UNFUNDED'],
    );
    assert.equal(await relayer.tokenBalance(agent), 3_000n);
    assert.deepEqual(await relayer.laneOf(signer.wallet.address, agent), { ...emptyLane, settled: 3_000n, owner: owner.wallet.address });
  });

  test('funding does not cancel a pending withdrawal; cancelWithdraw does; a new request replaces the old', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 2_000n);
    const first = await p.client.requestWithdraw(p.wallet.address, agent, 500n);
    await p.client.mint(p.wallet.address, 1_000n);
    await p.client.fund(p.wallet.address, agent, 1_000n);
    let lane = await relayer.laneOf(p.wallet.address, agent);
    assert.deepEqual([lane.remaining, lane.withdrawAmount, lane.thawEnd], [3_000n, 500n, first.thawEnd]);

    await chain.increaseTime(10);
    const second = await p.client.requestWithdraw(p.wallet.address, agent, 800n);
    assert.ok(second.thawEnd > first.thawEnd, 'the new request restarts the thaw');
    lane = await relayer.laneOf(p.wallet.address, agent);
    assert.deepEqual([lane.withdrawAmount, lane.thawEnd], [800n, second.thawEnd]);

    await p.client.cancelWithdraw(p.wallet.address, agent);
    lane = await relayer.laneOf(p.wallet.address, agent);
    assert.deepEqual([lane.withdrawAmount, lane.thawEnd, lane.lapseAt], [0n, 0n, 0n]);
    await chain.increaseTime(THAW);
    await assert.rejects(p.client.withdraw(p.wallet.address, agent), reverted(/^NoWithdrawPending\(/));
    await assert.rejects(p.client.cancelWithdraw(p.wallet.address, agent), reverted(/^NoWithdrawPending\(/));
  });

  test('thaw and window bounds: 1 s to 365 days and 1 h to 30 days, refused outside, no overflow at the top', async () => {
    const deployer = chain.wallet(0);
    const refused = (thawSeconds: number | bigint, withdrawWindowSeconds: number | bigint, reason: RegExp) =>
      assert.rejects(deployMesh(deployer, { thawSeconds, withdrawWindowSeconds, token: mesh.token }), reverted(reason));
    await refused(0, WINDOW, /^BadThaw\(0\)$/);
    await refused(365 * 86_400 + 1, WINDOW, /^BadThaw\(31536001\)$/);
    await refused((1n << 64n) - 1n, WINDOW, /^BadThaw\(/);
    await refused(THAW, 3_599, /^BadWithdrawWindow\(3599\)$/);
    await refused(THAW, 30 * 86_400 + 1, /^BadWithdrawWindow\(/);

    // At the top of both bounds a request's times are exact and the withdrawal works.
    const top = await deployMesh(deployer, { thawSeconds: 365 * 86_400, withdrawWindowSeconds: 30 * 86_400, token: mesh.token });
    const p = await newParty(top.escrow);
    const agent = newAgent();
    await p.client.mint(p.wallet.address, 100n);
    await p.client.fund(p.wallet.address, agent, 100n);
    const req = await p.client.requestWithdraw(p.wallet.address, agent, 100n);
    assert.equal(req.thawEnd, (await chainNow()) + 365n * 86_400n);
    assert.equal(req.lapseAt, req.thawEnd + 30n * 86_400n);
    await chain.increaseTime(365 * 86_400);
    assert.equal((await p.client.withdraw(p.wallet.address, agent)).amount, 100n);

    // And at the bottom, one second.
    const bottom = await deployMesh(deployer, { thawSeconds: 1, withdrawWindowSeconds: 3_600, token: mesh.token });
    const reader = await EscrowClient.connect({ runner: chain.provider, escrow: bottom.escrow });
    assert.deepEqual([await reader.thawSeconds(), await reader.withdrawWindowSeconds()], [1n, 3_600n]);
  });

  test('a blacklisted payee does not revert the batch: its pay waits in claimable, and it claims once unblocked', async () => {
    const deployer = chain.wallet(0);
    const tokenAddr = await deployArtifact(deployer, 'QuirkyToken', [6]);
    const quirky = new ethers.Contract(
      tokenAddr,
      [...ERC20_ABI, 'function setBlocked(address)', 'function setFalseFor(address)', 'function setGuzzleFor(address)'],
      deployer,
    );
    const dep = await deployMesh(deployer, { thawSeconds: THAW, token: tokenAddr });
    const relay = await EscrowClient.connect({ runner: deployer, escrow: dep.escrow });
    const blockedAgent = newAgent();
    const falseAgent = newAgent();
    const goodAgent = newAgent();
    const p = await newParty(dep.escrow);
    await p.client.mint(p.wallet.address, 3_000n);
    for (const a of [blockedAgent, falseAgent, goodAgent]) await p.client.fund(p.wallet.address, a, 1_000n);
    await (await quirky.getFunction('setBlocked')(blockedAgent)).wait();
    await (await quirky.getFunction('setFalseFor')(falseAgent)).wait();

    const out = await relay.settleMany([
      { agent: blockedAgent, entries: [await voucher(p.client, blockedAgent, 100n)] },
      { agent: falseAgent, entries: [await voucher(p.client, falseAgent, 200n)] },
      { agent: goodAgent, entries: [await voucher(p.client, goodAgent, 300n)] },
    ]);
    assert.equal(out.paid, 600n, 'every voucher is settled on its lane');
    assert.deepEqual(
      out.deferred.map((d) => [d.payee, d.amount]),
      [
        [blockedAgent, 100n],
        [falseAgent, 200n],
      ],
    );
    assert.equal(await relay.tokenBalance(goodAgent), 300n);
    assert.deepEqual([await relay.tokenBalance(blockedAgent), await relay.tokenBalance(falseAgent)], [0n, 0n]);
    assert.deepEqual([await relay.claimable(blockedAgent), await relay.claimable(falseAgent)], [100n, 200n]);
    // The escrow still holds what it owes: lanes plus claimable.
    assert.equal(await relay.tokenBalance(dep.escrow), 900n + 800n + 700n + 300n);

    // settle() alone behaves the same, and the amounts add up.
    assert.equal((await relay.settle(blockedAgent, [await voucher(p.client, blockedAgent, 150n)])).deferred[0]!.amount, 50n);
    assert.equal(await relay.claimable(blockedAgent), 150n);

    // Claiming while still blocked fails and changes nothing; once unblocked anyone can push it to the payee.
    await assert.rejects(relay.claim(blockedAgent), reverted(/Blocked|SafeERC20FailedOperation|reverted/));
    assert.equal(await relay.claimable(blockedAgent), 150n);
    await (await quirky.getFunction('setBlocked')(ethers.ZeroAddress)).wait();
    await (await quirky.getFunction('setFalseFor')(ethers.ZeroAddress)).wait();
    assert.equal((await relay.claim(blockedAgent)).amount, 150n);
    assert.equal((await relay.claim(falseAgent)).amount, 200n);
    assert.deepEqual([await relay.tokenBalance(blockedAgent), await relay.tokenBalance(falseAgent)], [150n, 200n]);
    await assert.rejects(relay.claim(blockedAgent), reverted(/^NothingToClaim\(/));

    // A relayer cannot push an agent's pay into claimable by starving the transfer: a payout that runs out of
    // gas reverts the whole transaction (here a token that burns all the gas it gets).
    await (await quirky.getFunction('setGuzzleFor')(goodAgent)).wait();
    const before = await relay.laneOf(p.wallet.address, goodAgent);
    await assert.rejects(relay.settle(goodAgent, [await voucher(p.client, goodAgent, 400n)]), reverted(/^OutOfGasInPayout\(/));
    const escrow = new ethers.Contract(dep.escrow, ESCROW_ABI, deployer);
    const packed = packVouchers([await voucher(p.client, goodAgent, 400n)]);
    await assert.rejects(
      escrow.getFunction('settle').staticCall(goodAgent, packed, { gasLimit: 2_000_000 }),
      (e: unknown) => (e as { revert?: { name: string } }).revert?.name === 'OutOfGasInPayout',
    );
    assert.deepEqual(await relay.laneOf(p.wallet.address, goodAgent), before);
    assert.equal(await relay.claimable(goodAgent), 0n);
  });

  test('a relayer whose fee transfer fails does not fail the settlement either', async () => {
    const deployer = chain.wallet(0);
    const tokenAddr = await deployArtifact(deployer, 'QuirkyToken', [6]);
    const quirky = new ethers.Contract(tokenAddr, [...ERC20_ABI, 'function setBlocked(address)'], deployer);
    const dep = await deployMesh(deployer, { thawSeconds: THAW, token: tokenAddr });
    const agent = newAgent();
    const p = await newParty(dep.escrow);
    await p.client.mint(p.wallet.address, 1_000n);
    await p.client.fund(p.wallet.address, agent, 1_000n);
    const r = await newParty(dep.escrow);
    await (await quirky.getFunction('setBlocked')(r.wallet.address)).wait();
    const out = await r.client.settle(agent, [await voucher(p.client, agent, 100n, { fee: 7n })]);
    assert.deepEqual([out.paid, out.fees], [100n, 7n]);
    assert.deepEqual(out.deferred, [{ payee: r.wallet.address, amount: 7n }]);
    assert.equal(await r.client.tokenBalance(agent), 100n);
    assert.equal(await r.client.claimable(r.wallet.address), 7n);
  });

  test('a token whose decimals are not 6 is refused, and so is an address that is not a token', async () => {
    const deployer = chain.wallet(0);
    const eighteen = await deployArtifact(deployer, 'QuirkyToken', [18]);
    await assert.rejects(deployMesh(deployer, { thawSeconds: THAW, token: eighteen }), reverted(/^BadTokenDecimals\(18\)$/));
    const two = await deployArtifact(deployer, 'QuirkyToken', [2]);
    await assert.rejects(deployMesh(deployer, { thawSeconds: THAW, token: two }), reverted(/^BadTokenDecimals\(2\)$/));
    // An account without code, and a contract without decimals() (the escrow itself).
    await assert.rejects(deployMesh(deployer, { thawSeconds: THAW, token: newAgent() }), reverted(/^NotAToken\(/));
    await assert.rejects(deployMesh(deployer, { thawSeconds: THAW, token: mesh.escrow }), reverted(/^NotAToken\(/));
  });

  test('a fee-on-transfer token: the lane is credited what arrived, so the escrow never owes more than it holds', async () => {
    const deployer = chain.wallet(0);
    const tokenAddr = await deployArtifact(deployer, 'QuirkyToken', [6]);
    const quirky = new ethers.Contract(tokenAddr, [...ERC20_ABI, 'function setFeeBps(uint16)'], deployer);
    await (await quirky.getFunction('setFeeBps')(100)).wait(); // 1 %
    const dep = await deployMesh(deployer, { thawSeconds: THAW, token: tokenAddr });
    const agent = newAgent();
    const p = await newParty(dep.escrow);
    await p.client.mint(p.wallet.address, 20_000n);
    const funded = await p.client.fund(p.wallet.address, agent, 10_000n);
    const receipt = await chain.provider.getTransactionReceipt(funded.hash);
    const ev = receipt!.logs.map((l) => new ethers.Interface(ESCROW_ABI).parseLog(l)).find((e) => e?.name === 'LaneFunded')!;
    assert.deepEqual([ev.args[3], ev.args[4]], [9_900n, 9_900n]);
    assert.equal((await p.client.laneOf(p.wallet.address, agent)).remaining, 9_900n);
    assert.equal(await p.client.tokenBalance(dep.escrow), 9_900n);

    // A voucher for everything the payer sent settles only what the escrow holds for the lane.
    const out = await p.client.settle(agent, [await voucher(p.client, agent, 10_000n)]);
    assert.deepEqual(
      out.settled.map((s) => [s.partial, s.paid]),
      [[true, 9_900n]],
    );
    assert.equal(await p.client.tokenBalance(dep.escrow), 0n);
    await p.client.topUp(p.wallet.address, agent, 5_000n);
    assert.equal((await p.client.laneOf(p.wallet.address, agent)).remaining, 4_950n);
  });

  test('attack: replaying a voucher (or an older one) pays nothing', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, USDC);
    const v1 = await voucher(p.client, agent, 300n);
    const v2 = await voucher(p.client, agent, 500n);
    assert.equal((await relayer.settle(agent, [v2])).paid, 500n);
    const again = await relayer.settle(agent, [v2, v1, v2]);
    assert.equal(again.paid, 0n);
    assert.deepEqual(
      again.skipped.map((s) => [s.signer, s.reason, s.cumulative]),
      [
        [p.wallet.address, 'STALE', 500n],
        [p.wallet.address, 'STALE', 300n],
        [p.wallet.address, 'STALE', 500n],
      ],
    );
    assert.equal(await relayer.tokenBalance(agent), 500n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), {
      ...emptyLane,
      remaining: USDC - 500n,
      settled: 500n,
      owner: p.wallet.address,
    });
  });

  test('attack: a voucher signed for another chain id or another escrow pays nothing here', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, USDC);
    const otherChain = await voucher(p.client, agent, 1_000n, { domain: { chainId: 1n, escrow: mesh.escrow } });
    const other = await deployMesh(chain.wallet(0), { thawSeconds: THAW, token: mesh.token });
    const otherEscrow = await voucher(p.client, agent, 1_000n, { domain: { chainId: chain.chainId, escrow: other.escrow } });

    const out = await relayer.settle(agent, [otherChain, otherEscrow]);
    assert.equal(out.paid, 0n);
    assert.equal(out.skipped.length, 2);
    for (const s of out.skipped) {
      // The signature recovers to some other address, whose lane to this agent is empty.
      assert.notEqual(s.signer, p.wallet.address);
      assert.equal(s.reason, 'UNFUNDED');
    }
    assert.equal(await relayer.tokenBalance(agent), 0n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { ...emptyLane, remaining: USDC, owner: p.wallet.address });

    // The same voucher is good on the escrow it was signed for (once the signer's lane there is funded).
    const there = await EscrowClient.connect({ runner: p.wallet, escrow: other.escrow });
    await there.mint(p.wallet.address, 5_000n);
    await there.fund(p.wallet.address, agent, 5_000n);
    assert.equal((await there.settle(agent, [otherEscrow])).paid, 1_000n);
  });

  test('attack: a voucher redirected to another agent pays nobody', async () => {
    const agent = newAgent();
    const thief = newAgent();
    const p = await fundedPayer(agent, USDC);
    // The signer also funds a lane to the thief, so a wrongly recovered lane would have money.
    await p.client.mint(p.wallet.address, USDC);
    await p.client.fund(p.wallet.address, thief, USDC);
    const v = await voucher(p.client, agent, 250_000n);
    const escrow = new ethers.Contract(mesh.escrow, ESCROW_ABI, chain.wallet(0));
    const tx = (await escrow.getFunction('settle')(thief, packVouchers([v]))) as ethers.ContractTransactionResponse;
    const receipt = await tx.wait();
    const iface = new ethers.Interface(ESCROW_ABI);
    const events = receipt!.logs.map((l) => iface.parseLog(l)).filter((e) => e !== null);
    assert.deepEqual(
      events.map((e) => e.name),
      ['SettleSkipped'],
    );
    assert.notEqual(events[0]!.args[0], p.wallet.address);
    assert.equal(await relayer.tokenBalance(thief), 0n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, thief), { ...emptyLane, remaining: USDC, owner: p.wallet.address });
    // The rightful agent can still settle it.
    assert.equal((await relayer.settle(agent, [v])).paid, 250_000n);
  });

  test('attack: a high-s (malleable) signature is refused; the low-s original pays', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, USDC);
    const v = await voucher(p.client, agent, 4_242n);
    const sig = ethers.Signature.from(v.signature);
    const highS = SECP256K1_N - BigInt(sig.s);
    assert.ok(highS > SECP256K1_N / 2n);
    const twin = ethers.concat([sig.r, ethers.toBeHex(highS, 32), new Uint8Array([sig.v === 27 ? 28 : 27])]);
    // The twin is the same point on the curve: a permissive verifier would accept it.
    assert.throws(() => recoverVoucherSigner(relayer.domain, v.voucher, twin), /high-s/);

    const out = await relayer.settle(agent, [{ voucher: v.voucher, signature: twin }]);
    assert.equal(out.paid, 0n);
    assert.deepEqual(
      out.skipped.map((s) => [s.reason, s.signer]),
      [['MALLEABLE_SIGNATURE', ethers.ZeroAddress]],
    );
    assert.equal((await relayer.settle(agent, [v])).paid, 4_242n);
  });

  test('a bad voucher in a batch is skipped with an event while the others pay', async () => {
    const agent = newAgent();
    const good1 = await fundedPayer(agent, USDC);
    const good2 = await fundedPayer(agent, USDC);
    const g1 = await voucher(good1.client, agent, 11n);
    const g2 = await voucher(good2.client, agent, 22n);
    const forged = ethers.concat([ethers.ZeroHash, ethers.dataSlice(g1.signature, 32, 64), '0x1b']); // r = 0: no signer
    const out = await relayer.settle(agent, [g1, { voucher: { ...g1.voucher, cumulative: 999n }, signature: forged }, g2, g1]);
    assert.equal(out.paid, 33n);
    assert.deepEqual(
      out.settled.map((s) => [s.signer, s.paid]),
      [
        [good1.wallet.address, 11n],
        [good2.wallet.address, 22n],
      ],
    );
    assert.deepEqual(
      out.skipped.map((s) => [s.reason, s.cumulative]),
      [
        ['BAD_SIGNATURE', 999n],
        ['STALE', 11n],
      ],
    );
    assert.equal(await relayer.tokenBalance(agent), 33n);
    // A packing that is not a whole number of vouchers fails the call, not silently part of it.
    const escrow = new ethers.Contract(mesh.escrow, ESCROW_ABI, chain.wallet(0));
    await assert.rejects(
      escrow.getFunction('settle').staticCall(agent, ethers.concat([packVouchers([g1]), '0x00'])),
      (e: unknown) => (e as { revert?: { name: string } }).revert?.name === 'BadPacking',
    );
  });

  test('attack: reentrancy through a hostile token is refused and pays exactly once', async () => {
    const deployer = chain.wallet(0);
    const tokenAddr = await deployArtifact(deployer, 'HostileToken');
    const hostile = await deployMesh(deployer, { thawSeconds: THAW, token: tokenAddr });
    const hostileAbi = [
      ...ERC20_ABI,
      'function arm(address target, bytes attack)',
      'function disarm()',
      'function attempts() view returns (uint256)',
      'function lastReentryOk() view returns (bool)',
      'function lastReentryResult() view returns (bytes)',
    ];
    const token = new ethers.Contract(tokenAddr, hostileAbi, deployer);
    const escrowIface = new ethers.Interface(ESCROW_ABI);
    const reentrancySelector = escrowIface.getError('ReentrancyGuardReentrantCall')!.selector;

    const agent = newAgent();
    const p = await newParty(hostile.escrow);
    await p.client.mint(p.wallet.address, 10_000n);
    await p.client.fund(p.wallet.address, agent, 10_000n);
    const v = await voucher(p.client, agent, 4_000n, { fee: 10n });
    const packed = packVouchers([v]);
    const client = await EscrowClient.connect({ runner: deployer, escrow: hostile.escrow });

    // 1. During the payout transfer the token calls settle() again with the same vouchers.
    await (await token.getFunction('arm')(hostile.escrow, escrowIface.encodeFunctionData('settle', [agent, packed]))).wait();
    const out = await client.settle(agent, [v]);
    assert.deepEqual([out.paid, out.fees], [4_000n, 10n]);
    assert.deepEqual(out.deferred, []);
    assert.equal(await token.getFunction('attempts')(), 2n, 'once on the payout, once on the fee');
    assert.equal(await token.getFunction('lastReentryOk')(), false);
    assert.equal(await token.getFunction('lastReentryResult')(), reentrancySelector);
    assert.equal(await client.tokenBalance(agent), 4_000n);
    assert.deepEqual(await client.laneOf(p.wallet.address, agent), {
      ...emptyLane,
      remaining: 5_990n,
      settled: 4_000n,
      feeSettled: 10n,
      owner: p.wallet.address,
    });

    // 2. During the funding transfer the token tries to pull a withdrawal, then a claim.
    await p.client.mint(p.wallet.address, 2_000n);
    for (const [i, attack] of [
      escrowIface.encodeFunctionData('withdraw', [p.wallet.address, agent]),
      escrowIface.encodeFunctionData('claim', [agent]),
    ].entries()) {
      await (await token.getFunction('arm')(hostile.escrow, attack)).wait();
      await p.client.fund(p.wallet.address, agent, 1_000n);
      assert.equal(await token.getFunction('attempts')(), BigInt(3 + i));
      assert.equal(await token.getFunction('lastReentryOk')(), false);
      assert.equal(await token.getFunction('lastReentryResult')(), reentrancySelector);
    }
    assert.equal(await client.tokenBalance(hostile.escrow), 7_990n);
    assert.equal((await client.laneOf(p.wallet.address, agent)).remaining, 7_990n);
  });

  test('permit funding: one transaction, no approve, and a front-run permit does not block it', async () => {
    const agent = newAgent();
    const p = await newParty();
    await p.client.mint(p.wallet.address, 3n * USDC);
    const token = new ethers.Contract(mesh.token, ERC20_ABI, chain.provider);
    await p.client.fundWithPermit(p.wallet.address, agent, USDC);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { ...emptyLane, remaining: USDC, owner: p.wallet.address });
    assert.equal(await token.getFunction('allowance')(p.wallet.address, mesh.escrow), 0n);
    assert.equal(await token.getFunction('nonces')(p.wallet.address), 1n);

    // Someone sees the permit in the mempool and submits it first: funding still goes through.
    const deadline = (await chainNow()) + 3_600n;
    const sig = ethers.Signature.from(
      await p.wallet.signTypedData(
        { name: 'Mock USD Coin', version: '1', chainId: chain.chainId, verifyingContract: mesh.token },
        {
          Permit: [
            { name: 'owner', type: 'address' },
            { name: 'spender', type: 'address' },
            { name: 'value', type: 'uint256' },
            { name: 'nonce', type: 'uint256' },
            { name: 'deadline', type: 'uint256' },
          ],
        },
        { owner: p.wallet.address, spender: mesh.escrow, value: USDC, nonce: 1n, deadline },
      ),
    );
    await (
      await (token.connect(chain.wallet(0)) as ethers.Contract).getFunction('permit')(
        p.wallet.address,
        mesh.escrow,
        USDC,
        deadline,
        sig.v,
        sig.r,
        sig.s,
      )
    ).wait();
    const escrow = new ethers.Contract(mesh.escrow, ESCROW_ABI, p.wallet);
    await (await escrow.getFunction('fundLaneWithPermit')(p.wallet.address, agent, USDC, '0x', deadline, sig.v, sig.r, sig.s)).wait();
    assert.equal((await relayer.laneOf(p.wallet.address, agent)).remaining, 2n * USDC);

    // Without a permit or an allowance the transfer fails with a coded error.
    await assert.rejects(
      escrow
        .getFunction('fundLaneWithPermit')(p.wallet.address, agent, USDC, '0x', deadline, sig.v, sig.r, sig.s)
        .then((t: ethers.ContractTransactionResponse) => t.wait()),
      /ERC20InsufficientAllowance|reverted/,
    );

    // A cold owner opens an app's lane by permit with the app key's consent.
    const app = await newParty();
    const cold = await newParty();
    await cold.client.mint(cold.wallet.address, USDC);
    await cold.client.fundWithPermit(app.wallet.address, agent, USDC, { consent: await app.client.signOwnerConsent(cold.wallet.address) });
    assert.equal((await relayer.laneOf(app.wallet.address, agent)).owner, cold.wallet.address);
  });

  test('registerAgent stores the device key and emits the binding, which clients verify off-chain', async () => {
    const payout = chain.wallet(nextAccount++);
    const client = await EscrowClient.connect({ runner: payout, escrow: mesh.escrow });
    const device = generateIdentity('agent');
    const message = agentBindingMessage(client.domain, payout.address);
    const bindingSig = signBytes(device, message);
    const out = await client.registerAgent(device.publicKey, bindingSig);
    assert.equal(await client.agentKeyOf(payout.address), ethers.hexlify(device.publicKey));
    const receipt = await chain.provider.getTransactionReceipt(out.hash);
    const ev = new ethers.Interface(ESCROW_ABI).parseLog(receipt!.logs[0]!)!;
    assert.equal(ev.name, 'AgentRegistered');
    assert.equal(ev.args[0], payout.address);
    assert.ok(
      verifyBytes(
        ethers.getBytes(ev.args[1] as string),
        agentBindingMessage(client.domain, ev.args[0] as string),
        ethers.getBytes(ev.args[2] as string),
      ),
    );
    // A binding copied to another payout address does not verify.
    assert.equal(verifyBytes(device.publicKey, agentBindingMessage(client.domain, chain.accounts[0]!), bindingSig), false);
    await assert.rejects(client.registerAgent(new Uint8Array(32), bindingSig), /BadAgentKey/);
  });

  test('the client reports coded MeshErrors from the one registry', async () => {
    const coded =
      (code: string, check: (e: MeshError) => boolean = () => true) =>
      (e: unknown) =>
        e instanceof MeshError && e.code === code && check(e);
    const nowhere = ethers.Wallet.createRandom().address;
    await assert.rejects(
      EscrowClient.connect({ runner: chain.provider, escrow: nowhere }),
      coded('MESH_CONFIG', (e) => /not a MeshEscrow/.test(e.message) && e.details?.escrow === nowhere),
    );
    const reader = await EscrowClient.connect({ runner: chain.provider, escrow: mesh.escrow });
    await assert.rejects(
      reader.fund(nowhere, newAgent(), 1n),
      coded('MESH_CONFIG', (e) => e.details?.reason === 'no-signer'),
    );
    const p = await newParty();
    await assert.rejects(
      p.client.fund(p.wallet.address, newAgent(), 5n),
      coded('MESH_CHAIN_REVERTED', (e) => /holds 0/.test(e.message) && e.details?.reason === 'insufficient-balance' && !e.retryable),
    );
    await assert.rejects(
      p.client.fund(p.wallet.address, '0x1234', 5n),
      coded('MESH_BAD_REQUEST', (e) => e.details?.field === 'agent'),
    );
    await assert.rejects(
      p.client.fund('nope', newAgent(), 5n),
      coded('MESH_BAD_REQUEST', (e) => e.details?.field === 'signer'),
    );
    await assert.rejects(
      p.client.fund(p.wallet.address, newAgent(), 0n),
      coded('MESH_BAD_REQUEST', (e) => e.details?.field === 'amount'),
    );
    await assert.rejects(
      p.client.fund(p.wallet.address, newAgent(), MAX_UINT96 + 1n),
      coded('MESH_BAD_REQUEST', (e) => e.details?.field === 'amount'),
    );
    await assert.rejects(
      p.client.fund(p.wallet.address, newAgent(), 5n, { consent: 'zz' }),
      coded('MESH_BAD_REQUEST', (e) => e.details?.field === 'consent'),
    );
    // Nothing listens on port 9: unreachable, which another endpoint or a later try may not be.
    const dead = connectRpc('http://127.0.0.1:9', chain.chainId);
    try {
      await assert.rejects(
        EscrowClient.connect({ runner: dead, escrow: mesh.escrow }),
        coded(
          'MESH_CHAIN_UNREACHABLE',
          (e) => e.retryable && e.httpStatus === 503 && e.details?.action === 'connect' && e.cause !== undefined,
        ),
      );
    } finally {
      dead.destroy();
    }
  });

  test('the local chain dies with its parent, even after SIGKILL', async () => {
    const script = `import { startLocalChain } from ${JSON.stringify(path.join(ROOT, 'contracts', 'dist', 'chain.js'))};
const c = await startLocalChain({ accounts: 1 });
process.stdout.write(c.pid + '\\n');
setInterval(() => {}, 1000);`;
    const parent = spawn(process.execPath, ['--input-type=module', '-e', script], { cwd: ROOT, stdio: ['ignore', 'pipe', 'inherit'] });
    const pid = await new Promise<number>((resolve, reject) => {
      let out = '';
      parent.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (out.includes('\n')) resolve(Number(out.trim()));
      });
      parent.once('exit', (code) => reject(new Error(`parent exited early (${code})`)));
    });
    assert.ok(alive(pid), 'the chain runs');
    parent.kill('SIGKILL');
    const deadline = Date.now() + 10_000;
    while (alive(pid) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.equal(alive(pid), false, 'the hardhat node outlived its parent');
  });
});

/** True while the process runs (a zombie waiting for its reaper counts as gone). */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}
