/**
 * MeshEscrow on a real local chain (one Hardhat 2 node for the whole file): funding, settlement with
 * exact balances, and one test per attack: replay, another chain or escrow, a redirected voucher,
 * overspend, a withdraw racing a settlement, a high-s signature, reentrancy through a hostile token,
 * a bad voucher inside a batch, permit funding.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { ERC20_ABI, ESCROW_ABI, EscrowClient, recoverVoucherSigner } from '@edge-mesh/contracts';
import { connectRpc, deployArtifact, deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import {
  agentBindingMessage,
  type EscrowDomain,
  generateIdentity,
  MeshError,
  packVouchers,
  SECP256K1_N,
  type SignedVoucher,
  signBytes,
  signVoucher,
  type Voucher,
  verifyBytes,
  voucherDigest,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { ROOT } from './helpers.ts';

const THAW = 3_600;
const USDC = 1_000_000n; // 6 decimals

let chain: LocalChain;
let mesh: MeshDeployment;
let relayer: EscrowClient;
let nextAccount = 1;

/** A payer with its own funded account and a client on the shared escrow. */
async function newPayer(escrow = mesh.escrow): Promise<{ wallet: ethers.Wallet; client: EscrowClient }> {
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
  { expiresIn = 3_600n, domain }: { expiresIn?: bigint; domain?: EscrowDomain } = {},
): Promise<SignedVoucher> {
  const v: Voucher = { agent, cumulative, receiptsRoot: root(`${agent}:${cumulative}`), expiry: (await chainNow()) + expiresIn };
  if (!domain) return client.signVoucher(v);
  return { voucher: v, signature: await signVoucher(client.runner as ethers.Signer, domain, v) };
}

async function fundedPayer(agent: string, amount: bigint, escrow = mesh.escrow) {
  const p = await newPayer(escrow);
  await p.client.mint(p.wallet.address, amount);
  await p.client.fund(agent, amount);
  return p;
}

before(async () => {
  chain = await startLocalChain({ accounts: 30 });
  mesh = await deployMesh(chain.wallet(0), { thawSeconds: THAW });
  relayer = await EscrowClient.connect({ runner: chain.wallet(0), escrow: mesh.escrow });
});

after(async () => {
  await chain?.close();
});

describe('MeshEscrow', () => {
  test('protocol/voucher.ts computes the same EIP-712 digest as the contract', async () => {
    const v: Voucher = { agent: newAgent(), cumulative: 123_456n, receiptsRoot: root('x'), expiry: 1_900_000_000n };
    const onChain = (await new ethers.Contract(mesh.escrow, ESCROW_ABI, chain.provider).getFunction('voucherDigest')(
      v.agent,
      v.cumulative,
      v.receiptsRoot,
      v.expiry,
    )) as string;
    assert.equal(onChain, voucherDigest(relayer.domain, v));
  });

  test('fund and settle: balances are exact, one token transfer per agent for a batch of payers', async () => {
    const agent = newAgent();
    const a = await fundedPayer(agent, 5n * USDC);
    const b = await fundedPayer(agent, 2n * USDC);
    assert.deepEqual(await relayer.laneOf(a.wallet.address, agent), { remaining: 5n * USDC, settled: 0n, thawEnd: 0n });

    // Several vouchers per lane: only the highest matters; earlier ones are covered by it.
    await voucher(a.client, agent, 100n);
    const va = await voucher(a.client, agent, 400_123n);
    const vb = await voucher(b.client, agent, 77_000n);
    const out = await relayer.settle(agent, [va, vb]);
    assert.equal(out.paid, 477_123n);
    assert.deepEqual(out.skipped, []);
    assert.deepEqual(
      out.settled.map((s) => [s.payer, s.delta, s.cumulative, s.receiptsRoot]),
      [
        [a.wallet.address, 400_123n, 400_123n, va.voucher.receiptsRoot],
        [b.wallet.address, 77_000n, 77_000n, vb.voucher.receiptsRoot],
      ],
    );
    const receipt = await chain.provider.getTransactionReceipt(out.hash);
    const erc20 = new ethers.Interface(ERC20_ABI);
    const transfers = receipt!.logs.filter((l) => l.address === mesh.token).map((l) => erc20.parseLog(l)!);
    assert.equal(transfers.length, 1, 'one transfer for the whole batch');
    assert.equal(transfers[0]!.args[1], agent);

    assert.equal(await relayer.tokenBalance(agent), 477_123n);
    assert.deepEqual(await relayer.laneOf(a.wallet.address, agent), { remaining: 5n * USDC - 400_123n, settled: 400_123n, thawEnd: 0n });

    // A later voucher pays only the increase.
    const va2 = await voucher(a.client, agent, 1_000_000n);
    const out2 = await relayer.settle(agent, [va2]);
    assert.equal(out2.paid, 1_000_000n - 400_123n);
    assert.equal(await relayer.tokenBalance(agent), 1_000_000n + 77_000n);
    // Everything funded is either paid out or still in the escrow.
    const lanes = [await relayer.laneOf(a.wallet.address, agent), await relayer.laneOf(b.wallet.address, agent)];
    assert.equal(lanes[0]!.remaining + lanes[1]!.remaining + (await relayer.tokenBalance(agent)), 7n * USDC);
  });

  test('settleMany pays several agents in one transaction', async () => {
    const agent1 = newAgent();
    const agent2 = newAgent();
    const p = await newPayer();
    await p.client.mint(p.wallet.address, 3n * USDC);
    await p.client.fund(agent1, USDC);
    await p.client.fund(agent2, 2n * USDC);
    const out = await relayer.settleMany([
      { agent: agent1, entries: [await voucher(p.client, agent1, 10n)] },
      { agent: agent2, entries: [await voucher(p.client, agent2, 20n)] },
    ]);
    assert.equal(out.paid, 30n);
    assert.equal(await relayer.tokenBalance(agent1), 10n);
    assert.equal(await relayer.tokenBalance(agent2), 20n);
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
      again.skipped.map((s) => [s.payer, s.reason, s.cumulative]),
      [
        [p.wallet.address, 'STALE', 500n],
        [p.wallet.address, 'STALE', 300n],
        [p.wallet.address, 'STALE', 500n],
      ],
    );
    assert.equal(await relayer.tokenBalance(agent), 500n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { remaining: USDC - 500n, settled: 500n, thawEnd: 0n });
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
      assert.notEqual(s.payer, p.wallet.address);
      assert.equal(s.reason, 'OVERSPEND');
    }
    assert.equal(await relayer.tokenBalance(agent), 0n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { remaining: USDC, settled: 0n, thawEnd: 0n });

    // The same voucher is good on the escrow it was signed for (once the payer funds a lane there).
    const there = await EscrowClient.connect({ runner: p.wallet, escrow: other.escrow });
    await there.mint(p.wallet.address, 5_000n);
    await there.fund(agent, 5_000n);
    assert.equal((await there.settle(agent, [otherEscrow])).paid, 1_000n);
  });

  test('attack: a voucher redirected to another agent pays nobody', async () => {
    const agent = newAgent();
    const thief = newAgent();
    const p = await fundedPayer(agent, USDC);
    // The payer also funds a lane to the thief, so a wrongly recovered lane would have money.
    await p.client.mint(p.wallet.address, USDC);
    await p.client.fund(thief, USDC);
    const v = await voucher(p.client, agent, 250_000n);
    const packed = packVouchers([v]);
    const escrow = new ethers.Contract(mesh.escrow, ESCROW_ABI, chain.wallet(0));
    const tx = (await escrow.getFunction('settle')(thief, packed)) as ethers.ContractTransactionResponse;
    const receipt = await tx.wait();
    const iface = new ethers.Interface(ESCROW_ABI);
    const events = receipt!.logs.map((l) => iface.parseLog(l)).filter((e) => e !== null);
    assert.deepEqual(
      events.map((e) => e.name),
      ['SettleSkipped'],
    );
    assert.notEqual(events[0]!.args[0], p.wallet.address);
    assert.equal(await relayer.tokenBalance(thief), 0n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, thief), { remaining: USDC, settled: 0n, thawEnd: 0n });
    // The rightful agent can still settle it.
    assert.equal((await relayer.settle(agent, [v])).paid, 250_000n);
  });

  test('attack: overspending a lane is skipped, and pays once the lane is topped up', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 1_000n);
    const v = await voucher(p.client, agent, 1_500n);
    const out = await relayer.settle(agent, [v]);
    assert.equal(out.paid, 0n);
    assert.deepEqual(
      out.skipped.map((s) => s.reason),
      ['OVERSPEND'],
    );
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { remaining: 1_000n, settled: 0n, thawEnd: 0n });

    // Another lane of the same payer cannot be drained to cover it.
    const other = newAgent();
    await p.client.mint(p.wallet.address, 10_000n);
    await p.client.fund(other, 5_000n);
    assert.equal((await relayer.settle(agent, [v])).paid, 0n);
    assert.equal((await relayer.laneOf(p.wallet.address, other)).remaining, 5_000n);

    await p.client.fund(agent, 500n);
    assert.equal((await relayer.settle(agent, [v])).paid, 1_500n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { remaining: 0n, settled: 1_500n, thawEnd: 0n });
  });

  test('attack: a withdrawal racing a settlement: the agent settles during the thaw, nothing after the withdrawal', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 10_000n);
    const early = await voucher(p.client, agent, 3_000n, { expiresIn: 10n * 86_400n });
    const late = await voucher(p.client, agent, 6_000n, { expiresIn: 10n * 86_400n });

    const { thawEnd } = await p.client.requestWithdraw(agent);
    assert.equal(thawEnd, (await chainNow()) + BigInt(THAW));
    await assert.rejects(
      p.client.withdraw(agent),
      (err: unknown) =>
        err instanceof MeshError &&
        err.code === 'MESH_CHAIN_REVERTED' &&
        /StillThawing/.test(err.message) &&
        /^StillThawing\(/.test(String(err.details?.reason)) &&
        err.details?.action === 'withdraw' &&
        err.cause !== undefined,
    );
    await assert.rejects(p.client.requestWithdraw(agent), /WithdrawAlreadyPending/);

    // The agent sees WithdrawRequested and settles within the thaw.
    assert.equal((await relayer.settle(agent, [early])).paid, 3_000n);

    await chain.increaseTime(THAW);
    const out = await p.client.withdraw(agent);
    assert.equal(out.amount, 7_000n);
    assert.equal(await relayer.tokenBalance(p.wallet.address), 7_000n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { remaining: 0n, settled: 3_000n, thawEnd: 0n });

    // After the withdrawal, a voucher the payer signed earlier finds nothing left.
    const after = await relayer.settle(agent, [late]);
    assert.equal(after.paid, 0n);
    assert.deepEqual(
      after.skipped.map((s) => s.reason),
      ['OVERSPEND'],
    );
    assert.equal(await relayer.tokenBalance(agent), 3_000n);
    await assert.rejects(p.client.withdraw(agent), /NoWithdrawPending/);
  });

  test('new funding cancels a pending withdrawal; cancelWithdraw does too', async () => {
    const agent = newAgent();
    const p = await fundedPayer(agent, 2_000n);
    await p.client.requestWithdraw(agent);
    await p.client.mint(p.wallet.address, 1_000n);
    await p.client.fund(agent, 1_000n);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { remaining: 3_000n, settled: 0n, thawEnd: 0n });
    await chain.increaseTime(THAW);
    await assert.rejects(p.client.withdraw(agent), /NoWithdrawPending/);
    await p.client.requestWithdraw(agent);
    await p.client.cancelWithdraw(agent);
    assert.equal((await relayer.laneOf(p.wallet.address, agent)).thawEnd, 0n);
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
      out.skipped.map((s) => [s.reason, s.payer]),
      [['MALLEABLE_SIGNATURE', ethers.ZeroAddress]],
    );
    assert.equal((await relayer.settle(agent, [v])).paid, 4_242n);
  });

  test('a bad voucher in a batch is skipped with an event while the others pay', async () => {
    const agent = newAgent();
    const good1 = await fundedPayer(agent, USDC);
    const good2 = await fundedPayer(agent, USDC);
    const expired = await fundedPayer(agent, USDC);
    const g1 = await voucher(good1.client, agent, 11n);
    const g2 = await voucher(good2.client, agent, 22n);
    const old = await voucher(expired.client, agent, 33n, { expiresIn: 60n });
    const forged = ethers.concat([ethers.ZeroHash, ethers.dataSlice(g1.signature, 32, 64), '0x1b']); // r = 0: no signer
    await chain.increaseTime(120);
    const out = await relayer.settle(agent, [g1, { voucher: { ...g1.voucher, cumulative: 999n }, signature: forged }, old, g2, g1]);
    assert.equal(out.paid, 33n);
    assert.deepEqual(
      out.settled.map((s) => [s.payer, s.delta]),
      [
        [good1.wallet.address, 11n],
        [good2.wallet.address, 22n],
      ],
    );
    assert.deepEqual(
      out.skipped.map((s) => [s.reason, s.cumulative]),
      [
        ['BAD_SIGNATURE', 999n],
        ['EXPIRED', 33n],
        ['STALE', 11n],
      ],
    );
    assert.equal(out.skipped[1]!.payer, expired.wallet.address);
    assert.equal(await relayer.tokenBalance(agent), 33n);
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
    const p = await newPayer(hostile.escrow);
    await p.client.mint(p.wallet.address, 10_000n);
    await p.client.fund(agent, 10_000n);
    const v = await voucher(p.client, agent, 4_000n);
    const packed = packVouchers([v]);
    const client = await EscrowClient.connect({ runner: deployer, escrow: hostile.escrow });

    // 1. During the payout transfer the token calls settle() again with the same vouchers.
    await (await token.getFunction('arm')(hostile.escrow, escrowIface.encodeFunctionData('settle', [agent, packed]))).wait();
    const out = await client.settle(agent, [v]);
    assert.equal(out.paid, 4_000n);
    assert.equal(await token.getFunction('attempts')(), 1n);
    assert.equal(await token.getFunction('lastReentryOk')(), false);
    assert.equal(await token.getFunction('lastReentryResult')(), reentrancySelector);
    assert.equal(await client.tokenBalance(agent), 4_000n);
    assert.deepEqual(await client.laneOf(p.wallet.address, agent), { remaining: 6_000n, settled: 4_000n, thawEnd: 0n });

    // 2. During a payer's funding transfer the token tries to pull a withdrawal.
    await p.client.mint(p.wallet.address, 1_000n);
    await (await token.getFunction('arm')(hostile.escrow, escrowIface.encodeFunctionData('withdraw', [agent]))).wait();
    await p.client.fund(agent, 1_000n);
    assert.equal(await token.getFunction('attempts')(), 2n);
    assert.equal(await token.getFunction('lastReentryOk')(), false);
    assert.equal(await token.getFunction('lastReentryResult')(), reentrancySelector);
    assert.equal(await client.tokenBalance(hostile.escrow), 7_000n);
    assert.deepEqual(await client.laneOf(p.wallet.address, agent), { remaining: 7_000n, settled: 4_000n, thawEnd: 0n });
  });

  test('permit funding: one transaction, no approve, and a front-run permit does not block it', async () => {
    const agent = newAgent();
    const p = await newPayer();
    await p.client.mint(p.wallet.address, 3n * USDC);
    const token = new ethers.Contract(mesh.token, ERC20_ABI, chain.provider);
    await p.client.fundWithPermit(agent, USDC);
    assert.deepEqual(await relayer.laneOf(p.wallet.address, agent), { remaining: USDC, settled: 0n, thawEnd: 0n });
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
    await (await escrow.getFunction('fundLaneWithPermit')(agent, USDC, deadline, sig.v, sig.r, sig.s)).wait();
    assert.equal((await relayer.laneOf(p.wallet.address, agent)).remaining, 2n * USDC);
    assert.equal((await relayer.tokenBalance(mesh.escrow)) >= 2n * USDC, true);

    // Without a permit or an allowance the transfer fails with a coded error.
    await assert.rejects(
      escrow
        .getFunction('fundLaneWithPermit')(agent, USDC, deadline, sig.v, sig.r, sig.s)
        .then((t: ethers.ContractTransactionResponse) => t.wait()),
      /ERC20InsufficientAllowance|reverted/,
    );
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
      reader.fund(newAgent(), 1n),
      coded('MESH_CONFIG', (e) => e.details?.reason === 'no-signer'),
    );
    const p = await newPayer();
    await assert.rejects(
      p.client.fund(newAgent(), 5n),
      coded('MESH_CHAIN_REVERTED', (e) => /holds 0/.test(e.message) && e.details?.reason === 'insufficient-balance' && !e.retryable),
    );
    await assert.rejects(
      p.client.fund('0x1234', 5n),
      coded('MESH_BAD_REQUEST', (e) => e.details?.field === 'agent'),
    );
    await assert.rejects(
      p.client.fund(newAgent(), 0n),
      coded('MESH_BAD_REQUEST', (e) => e.details?.field === 'amount'),
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
