/**
 * The voucher relay (router/src/relay.ts) on a real local chain: it settles vouchers that pay an agent
 * something new and pay it a fee, and never spends gas on anything else. Every sender is assumed to lie:
 * each lie is a test that the relay's account sent no transaction for it.
 */
import assert from 'node:assert/strict';
import { after, before, describe, type TestContext, test } from 'node:test';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { generateIdentity, signVoucher } from '@edge-mesh/protocol';
import { type RelayServer, type RelayVerdict, startRelayServer, startRouter, VOUCHER_JSON_BYTES } from '@edge-mesh/router';
import { ethers } from 'ethers';
import { brokerFor, quiet } from './helpers.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextWallet = 1;

import { fundOwnLane, pendingFrom } from './payer.ts';

const ROOT = `0x${'ab'.repeat(32)}`;

const domain = () => ({ chainId: deployment.chainId, escrow: deployment.escrow });

/** A payer wallet whose own lane to `payout` holds `fund`. */
async function fundedPayer(payout: string, fund: bigint): Promise<ethers.Wallet> {
  const wallet = chain.wallet(nextWallet++);
  if (fund > 0n) await fundOwnLane(wallet, deployment.escrow, payout, fund);
  return wallet;
}

async function voucher(
  signer: ethers.Wallet | ethers.HDNodeWallet,
  payout: string,
  cumulative: number,
  fee: number,
  payer = signer.address,
): Promise<Record<string, unknown>> {
  const v = { agent: payout, cumulative: BigInt(cumulative), feeCumulative: BigInt(fee), receiptsRoot: ROOT };
  const sig =
    fee * 10 > cumulative
      ? // Above the escrow's cap: signVoucher refuses to sign it, a liar signs the typed data itself.
        signer.signingKey.sign(
          ethers.TypedDataEncoder.hash(
            { name: 'EdgeMesh', version: '2', chainId: deployment.chainId, verifyingContract: deployment.escrow },
            {
              Voucher: [
                { name: 'agent', type: 'address' },
                { name: 'cumulative', type: 'uint96' },
                { name: 'feeCumulative', type: 'uint64' },
                { name: 'receiptsRoot', type: 'bytes32' },
              ],
            },
            { ...v, agent: ethers.getAddress(payout) },
          ),
        ).serialized
      : await signVoucher(signer, domain(), v);
  return { payer: payer.toLowerCase(), agent: payout, cumulative: String(cumulative), feeCumulative: String(fee), receiptsRoot: ROOT, sig };
}

async function relayFor(
  t: TestContext,
  options: { minFeeMicros?: number; batchMs?: number; vouchersPerSecond?: number; voucherBurst?: number; receiptTimeoutMs?: number } = {},
) {
  const runner = chain.wallet(nextWallet++);
  const server = await startRelayServer({ runner, escrow: deployment.escrow, batchMs: 60_000, ...options });
  t.after(() => server.close());
  return { server, runner };
}

async function post(
  server: RelayServer | string,
  vouchers: unknown,
): Promise<{ status: number; body: { accepted: number; relay: string; results: RelayVerdict[] } }> {
  const url = typeof server === 'string' ? server : server.url;
  const res = await fetch(`${url}/v1/relay/vouchers`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ vouchers }),
  });
  return { status: res.status, body: (await res.json()) as { accepted: number; relay: string; results: RelayVerdict[] } };
}

const reasons = (results: RelayVerdict[]) => results.map((r) => (r.accepted ? 'accepted' : r.reason));

/** The relay account's nonce and ETH: unchanged means it spent no gas. */
async function gasState(address: string) {
  return { nonce: await chain.provider.getTransactionCount(address), wei: await chain.provider.getBalance(address) };
}

describe('voucher relay', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 40 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('a good voucher is settled in one batch per agent: the agent is paid, the relay earns the fee, the lane pays work + fee', async (t) => {
    const { server, runner } = await relayFor(t);
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const a = await fundedPayer(payout, 1_000_000n);
    const b = await fundedPayer(payout, 1_000_000n);
    const res = await post(server, [await voucher(a, payout, 10_000, 100), await voucher(b, payout, 5_000, 50)]);
    assert.equal(res.status, 200);
    assert.deepEqual(reasons(res.body.results), ['accepted', 'accepted']);
    assert.deepEqual(
      res.body.results.map((r) => [r.paidMicros, r.feeMicros]),
      [
        [10_000, 100],
        [5_000, 50],
      ],
    );
    const before = await gasState(runner.address);
    await server.relay.flush();
    assert.equal((await gasState(runner.address)).nonce, before.nonce + 1, 'one transaction for both lanes of the agent');
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    assert.equal(await escrow.tokenBalance(payout), 15_000n);
    assert.equal(await escrow.tokenBalance(runner.address), 150n, 'the relay earned the fees');
    assert.equal((await escrow.laneOf(a.address, payout)).remaining, 1_000_000n - 10_100n, 'the lane paid work + fee');
    assert.equal(server.relay.counters.feesMicros, 150);
    // The same voucher again is stale: refused, no gas.
    const again = await post(server, [await voucher(a, payout, 10_000, 100)]);
    assert.deepEqual(reasons(again.body.results), ['stale']);
    await server.relay.flush();
    assert.equal((await gasState(runner.address)).nonce, before.nonce + 1);
  });

  test('every lie is refused before it costs gas: made-up, stale, unfunded, fee 0, fee above the cap, fee too low, malformed', async (t) => {
    const { server, runner } = await relayFor(t, { minFeeMicros: 5 });
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const payer = await fundedPayer(payout, 1_000_000n);
    const stranger = ethers.Wallet.createRandom();
    const unfunded = await fundedPayer(payout, 0n);
    // Settled already by someone else: a voucher at or below it is stale.
    const direct = await EscrowClient.connect({ runner: chain.wallet(0), escrow: deployment.escrow });
    const settledOne = await voucher(payer, payout, 1_000, 10);
    await direct.settle(payout, [
      {
        voucher: { agent: payout, cumulative: 1_000n, feeCumulative: 10n, receiptsRoot: ROOT },
        signature: settledOne.sig as string,
      },
    ]);
    const before = await gasState(runner.address);
    const lies = [
      await voucher(stranger, payout, 50_000, 500, payer.address), // a stranger's signature, naming a funded payer
      await voucher(stranger, payout, 50_000, 500), // the stranger's own lane: empty
      settledOne, // stale
      await voucher(payer, payout, 900, 9), // older than what is settled
      await voucher(unfunded, payout, 5_000, 50), // a lane nobody funded
      await voucher(payer, payout, 2_000, 0), // no fee
      await voucher(payer, payout, 2_000, 201), // fee above a tenth
      await voucher(payer, payout, 2_000, 13), // fee increase 3: under the relay's minimum of 5
      { ...(await voucher(payer, payout, 2_000, 20)), sig: `0x${'11'.repeat(65)}` }, // no signature at all
      { ...(await voucher(payer, payout, 2_000, 20)), cumulative: '3000' }, // amount changed after signing
    ];
    const res = await post(server, lies);
    assert.equal(res.status, 200);
    assert.deepEqual(reasons(res.body.results), [
      'not-signer',
      'unfunded',
      'stale',
      'stale',
      'unfunded',
      'no-fee',
      'fee-above-cap',
      'fee-too-low',
      'malformed',
      'not-signer',
    ]);
    assert.equal(res.body.accepted, 0);
    await server.relay.flush();
    assert.deepEqual(await gasState(runner.address), before, 'no transaction, no gas');
    assert.equal(server.relay.counters.txs, 0);
    // Not a list of vouchers at all: 400.
    const bad = await fetch(`${server.url}/v1/relay/vouchers`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ vouchers: 'all of them' }),
    });
    assert.equal(bad.status, 400);
    assert.equal(((await bad.json()) as { code: string }).code, 'MESH_BAD_REQUEST');
    // A body larger than a full list of vouchers could be is refused on its length (MESH_TOO_LARGE), not parsed.
    const huge = await fetch(`${server.url}/v1/relay/vouchers`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ vouchers: [{ pad: 'x'.repeat(200_000) }] }),
    });
    const hugeBody = (await huge.json()) as { code: string; details?: { limitBytes?: number } };
    assert.equal(huge.status, 413);
    assert.equal(hugeBody.code, 'MESH_TOO_LARGE');
    assert.equal(hugeBody.details?.limitBytes, 101 * VOUCHER_JSON_BYTES);
    assert.equal((await fetch(`${server.url}/v1/relay`)).status, 200, 'the relay keeps serving');
  });

  test('vouchers past one caller budget are refused MESH_RATE_LIMITED before any is checked; the relay keeps serving', async (t) => {
    const { server } = await relayFor(t, { vouchersPerSecond: 1, voucherBurst: 10 });
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const stranger = ethers.Wallet.createRandom();
    // Made-up vouchers (the signer is not the payer they name): each costs a signer recovery to refuse.
    const junk = await Promise.all(Array.from({ length: 6 }, (_, i) => voucher(stranger, payout, 1_000 + i, 10)));
    const named = junk.map((v) => ({ ...v, payer: ethers.Wallet.createRandom().address.toLowerCase() }));
    const first = await post(server, named);
    assert.equal(first.status, 200);
    assert.deepEqual(new Set(reasons(first.body.results)), new Set(['not-signer']));
    const second = await post(server, named);
    assert.equal(second.status, 429);
    assert.equal((second.body as unknown as { code: string }).code, 'MESH_RATE_LIMITED');
    // The relay still answers its status.
    assert.equal((await fetch(`${server.url}/v1/relay`)).status, 200);
  });

  test('a voucher settled by someone else between acceptance and the batch is dropped: no gas', async (t) => {
    const { server, runner } = await relayFor(t);
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const payer = await fundedPayer(payout, 1_000_000n);
    const v = await voucher(payer, payout, 4_000, 40);
    assert.deepEqual(reasons((await post(server, [v])).body.results), ['accepted']);
    // The payer front-runs the relay: it settles the same voucher itself and takes the fee.
    const own = await EscrowClient.connect({ runner: payer, escrow: deployment.escrow });
    await own.settle(payout, [
      { voucher: { agent: payout, cumulative: 4_000n, feeCumulative: 40n, receiptsRoot: ROOT }, signature: v.sig as string },
    ]);
    const before = await gasState(runner.address);
    await server.relay.flush();
    assert.deepEqual(await gasState(runner.address), before);
    assert.equal(server.relay.counters.dropped, 1);
  });

  test('a settlement the node drops, or leaves pending, is sent again on its nonce after receiptTimeoutMs: the agent is paid once', {
    timeout: 60_000,
  }, async (t) => {
    const { server, runner } = await relayFor(t, { receiptTimeoutMs: 1_000 });
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const payer = await fundedPayer(payout, 1_000_000n);
    assert.deepEqual(reasons((await post(server, [await voucher(payer, payout, 4_000, 40)])).body.results), ['accepted']);
    const nonce = await chain.provider.getTransactionCount(runner.address, 'latest');
    await chain.provider.send('evm_setAutomine', [false]);
    t.after(() => chain.provider.send('evm_setAutomine', [true]));
    // 1. Dropped: the wait ends at the timeout, and the voucher is queued again.
    const first = server.relay.flush();
    const dropped = await pendingFrom(chain.provider, runner.address);
    await chain.provider.send('hardhat_dropTransaction', [dropped.hash]);
    await first;
    assert.equal(server.relay.counters.failures, 1);
    assert.equal(server.relay.pendingCount(), 1, 'the voucher waits again');
    // 2. Sent again on the freed nonce (at the same fee, the same signed transaction), and left pending: after
    // the timeout it is queued again...
    const second = server.relay.flush();
    const pending = await pendingFrom(chain.provider, runner.address);
    assert.equal(pending.nonce, nonce);
    await second;
    assert.equal(server.relay.counters.failures, 2);
    // 3. ...and replaced on the same nonce at a higher fee; the replacement is mined.
    const third = server.relay.flush();
    const replacement = await pendingFrom(chain.provider, runner.address, [pending.hash]);
    assert.equal(replacement.nonce, nonce);
    assert.ok(replacement.maxFeePerGas! > pending.maxFeePerGas!, 'a higher fee');
    assert.equal(await chain.provider.getTransaction(pending.hash), null, 'the pending one is out of the pool');
    await chain.provider.send('evm_mine', []);
    await third;
    assert.equal(server.relay.counters.txs, 1);
    assert.equal(server.relay.pendingCount(), 0);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    assert.equal(await escrow.tokenBalance(payout), 4_000n, 'the agent is paid, once');
    assert.equal(await escrow.tokenBalance(runner.address), 40n);
    assert.equal(await chain.provider.getTransactionCount(runner.address, 'latest'), nonce + 1, 'one transaction mined');
  });

  test('a router started with a relay key serves POST /v1/relay/vouchers', async (t) => {
    const broker = await brokerFor(t);
    const runner = chain.wallet(nextWallet++);
    const router = await startRouter({
      brokerUrl: broker.url,
      identity: generateIdentity('router'),
      logger: quiet,
      http: { port: 0, processMetrics: false, relay: { runner, escrow: deployment.escrow, batchMs: 100 } },
    });
    t.after(() => router.close());
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    const payer = await fundedPayer(payout, 1_000_000n);
    const res = await post(router.http!.url, [await voucher(payer, payout, 2_000, 20)]);
    assert.deepEqual(reasons(res.body.results), ['accepted']);
    assert.equal(res.body.relay, runner.address.toLowerCase());
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    const deadline = Date.now() + 10_000;
    while ((await escrow.tokenBalance(payout)) !== 2_000n && Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    assert.equal(await escrow.tokenBalance(payout), 2_000n);
    assert.equal(await escrow.tokenBalance(runner.address), 20n);
    const info = (await (await fetch(`${router.http!.url}/v1/relay`)).json()) as { counters: { txs: number; feesMicros: number } };
    assert.deepEqual([info.counters.txs, info.counters.feesMicros], [1, 20]);
  });
});
