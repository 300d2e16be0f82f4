/**
 * Devices paid without gas, end to end on a real local chain: an agent whose payout account holds 0 ETH
 * (and that has no EVM key at all) serves paid requests from the SDK, whose vouchers carry a relayer fee,
 * hands its vouchers to a relay mounted on a router, and is paid on chain; the relay's account earns the
 * fees and the payer's lane pays exactly the work plus the fee. A relay that lies or is down is replaced.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer } from 'node:http';
import type { AddressInfo } from 'node:net';
import { after, before, describe, type TestContext, test } from 'node:test';
import type { SettlerOptions } from '@edge-mesh/agent';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { agentBindingMessage, generateIdentity, type Identity, MeshError, signBytes } from '@edge-mesh/protocol';
import { startRouter } from '@edge-mesh/router';
import { ethers } from 'ethers';
import { voucherFee } from '../sdk/src/payments.ts';
import { agentFor, brokerFor, meshFor, quiet, tempDir, waitFor } from './helpers.ts';

let chain: LocalChain;
let deployment: MeshDeployment;
let nextAccount = 1;
const KWS = 2;
const FUND = 1_000_000n;

const domain = () => ({ chainId: deployment.chainId, escrow: deployment.escrow });

/** A payout account registered to the agent's key in the escrow, then emptied: it holds 0 ETH from here on. */
async function gaslessPayout(identity: Identity): Promise<string> {
  const wallet = chain.wallet(nextAccount++);
  const client = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
  await client.registerAgent(identity.publicKey, signBytes(identity, agentBindingMessage(domain(), wallet.address.toLowerCase())));
  await chain.provider.send('hardhat_setBalance', [wallet.address, '0x0']);
  assert.equal(await chain.provider.getBalance(wallet.address), 0n);
  return wallet.address.toLowerCase();
}

async function fundedPayer(payout: string): Promise<ethers.Wallet> {
  const wallet = chain.wallet(nextAccount++);
  const client = await EscrowClient.connect({ runner: wallet, escrow: deployment.escrow });
  await client.mint(wallet.address, FUND);
  await client.fund(wallet.address, payout, FUND);
  return wallet;
}

async function relayRouter(t: TestContext, brokerUrl: string, auth?: { apiKeys: { id: string; sha256: string; scopes: ['relay'] }[] }) {
  const runner = chain.wallet(nextAccount++);
  const router = await startRouter({
    brokerUrl,
    identity: generateIdentity('router'),
    logger: quiet,
    http: {
      port: 0,
      processMetrics: false,
      relay: { runner, escrow: deployment.escrow, batchMs: 100 },
      ...(auth ? { auth: { trustedOperators: [], ...auth } } : {}),
    },
  });
  t.after(() => router.close());
  return { url: router.http!.url, relay: runner.address.toLowerCase() };
}

/** A relay that says it took every voucher and settles nothing. */
async function lyingRelay(t: TestContext): Promise<{ url: string; posts: () => number }> {
  let posts = 0;
  const server = createServer((req, res) => {
    let body = '';
    req.on('data', (c) => {
      body += c;
    });
    req.on('end', () => {
      posts++;
      const { vouchers } = JSON.parse(body) as { vouchers: unknown[] };
      res.setHeader('content-type', 'application/json');
      res.end(JSON.stringify({ results: vouchers.map(() => ({ accepted: true })) }));
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, posts: () => posts };
}

async function gaslessAgent(
  t: TestContext,
  brokerUrl: string,
  relays: string[],
  relayWaitMs = 30_000,
  relayCredential?: string,
  settle: Partial<SettlerOptions> = {},
) {
  const identity = generateIdentity('agent');
  const payout = await gaslessPayout(identity);
  const agent = await agentFor(t, {
    brokerUrl,
    identity,
    payment: {
      payout,
      domain: domain(),
      dataDir: await tempDir(t),
      provider: chain.provider,
      fundsPollMs: 100,
      // No runner: the agent has no EVM key; relays settle for it. Lanes are handed on settleNow here.
      settle: {
        relays,
        relayWaitMs,
        checkEveryMs: 100,
        thresholdMicros: 1_000_000_000,
        maxIntervalMs: 3_600_000,
        ...(relayCredential ? { relayCredential } : {}),
        ...settle,
      },
    },
  });
  return { agent, payout };
}

/** A payer funding the lane to `payout`, and an SDK client paying with it (a relayer fee of `relayerFee`), kws seen. */
async function payingMesh(t: TestContext, brokerUrl: string, payout: string, relayerFee: number) {
  const payer = await fundedPayer(payout);
  // The SDK checks the payout against the escrow's registry (the signer's provider).
  const mesh = await meshFor(t, { brokerUrl, payment: { signer: payer, domain: domain(), dataDir: await tempDir(t), relayerFee } });
  await mesh.waitForModel('kws');
  return { payer, mesh };
}

async function serve(mesh: Awaited<ReturnType<typeof meshFor>>, n: number, from = 0) {
  for (let i = 0; i < n; i++) await mesh.infer('kws', sampleInputs('kws', from + i), { deadlineMs: 5_000 });
}

describe('agents paid through a relay, with no gas', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 20 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('an agent with 0 ETH is paid on chain through a relay; the relay earns the fees; the lane pays work + fee exactly', async (t) => {
    const broker = await brokerFor(t);
    const relay = await relayRouter(t, broker.url);
    const { agent, payout } = await gaslessAgent(t, broker.url, [relay.url]);
    // A tenth as fee.
    const { payer, mesh } = await payingMesh(t, broker.url, payout, 0.1);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });

    await serve(mesh, 10);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 10 * KWS, 5_000, 'the voucher for 10');
    assert.equal(agent.payments!.lanes()[0]!.voucher!.feeCumulative, 2, 'the voucher carries a tenth as fee');
    await agent.payments!.settler!.settleNow();
    const settledTo = async (micros: bigint) => {
      const deadline = Date.now() + 10_000;
      while ((await escrow.laneOf(payer.address, payout)).settled !== micros && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 100));
      assert.equal((await escrow.laneOf(payer.address, payout)).settled, micros);
    };
    await settledTo(BigInt(10 * KWS));

    await serve(mesh, 20, 10);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 30 * KWS, 5_000, 'the voucher for 30');
    await agent.payments!.settler!.settleNow();
    await settledTo(BigInt(30 * KWS));

    const lane = await escrow.laneOf(payer.address, payout);
    const view = mesh.lanes()[0]!;
    assert.deepEqual([view.owedMicros, view.paidMicros, view.feeMicros, view.spentMicros], [60, 60, 6, 66]);
    assert.equal(await escrow.tokenBalance(payout), 60n, 'the agent is paid every request');
    assert.equal(lane.feeSettled, 6n);
    assert.equal(await escrow.tokenBalance(relay.relay), 6n, "the relay's account earned the fees");
    assert.equal(FUND - lane.remaining, 66n, "the payer's lane paid exactly work + fee");
    assert.equal(await chain.provider.getBalance(payout), 0n, 'the payout still holds 0 ETH');
    const counters = agent.payments!.settler!.counters;
    assert.equal(counters.txs, 0, 'the agent sent no transaction');
    assert.equal(counters.relayHandoffs, 2);
    await waitFor(() => agent.payments!.settler!.counters.relayedMicros === 60, 5_000, 'the settlements seen in events');
  });

  test('a relay that is down or says yes and settles nothing is replaced by the next one', async (t) => {
    const broker = await brokerFor(t);
    const good = await relayRouter(t, broker.url);
    const liar = await lyingRelay(t);
    const down = 'http://127.0.0.1:9'; // nothing listens on the discard port
    const { agent, payout } = await gaslessAgent(t, broker.url, [down, liar.url, good.url], 1_000);
    const { payer, mesh } = await payingMesh(t, broker.url, payout, 0.05);
    await serve(mesh, 20);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 20 * KWS, 5_000, 'the voucher');
    const settler = agent.payments!.settler!;
    await settler.settleNow(); // to the relay that is down: a failure
    await settler.settleNow(); // to the liar: taken, never settled
    assert.equal(liar.posts(), 1);
    await new Promise((r) => setTimeout(r, 1_100));
    await settler.settleNow(); // the liar's time is up: to the good relay
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    const deadline = Date.now() + 10_000;
    while ((await escrow.laneOf(payer.address, payout)).settled !== BigInt(20 * KWS) && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 100));
    assert.equal(await escrow.tokenBalance(payout), BigInt(20 * KWS));
    assert.equal(await escrow.tokenBalance(good.relay), 2n, 'the fee went to the relay that settled');
    assert.ok(settler.counters.relayFailures >= 1, 'the relay that is down was counted');
    assert.ok(settler.counters.relayMisses >= 1, 'the liar was counted');
    assert.equal(settler.counters.txs, 0);
  });

  test('on a busy lane, whose voucher rises at every check, a relay that says yes and settles nothing is passed over after relayWaitMs', {
    timeout: 60_000,
  }, async (t) => {
    const broker = await brokerFor(t);
    const liar = await lyingRelay(t);
    const good = await relayRouter(t, broker.url);
    // Due at every check (100 ms): the lane owes more than the threshold as soon as anything is served.
    const { agent, payout } = await gaslessAgent(t, broker.url, [liar.url, good.url], 500, undefined, { thresholdMicros: 1 });
    const { payer, mesh } = await payingMesh(t, broker.url, payout, 0.1);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    let busy = true;
    const serving = (async () => {
      for (let i = 0; busy; i++) await mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 5_000 });
    })();
    t.after(async () => {
      busy = false;
      await serving;
    });
    await waitFor(() => liar.posts() >= 1, 5_000, 'the liar takes the lane');
    const handedAt = Date.now();
    let settled = 0n;
    while (settled === 0n && Date.now() - handedAt < 4 * 500 + 3_000) {
      await new Promise((r) => setTimeout(r, 100));
      settled = (await escrow.laneOf(payer.address, payout)).settled;
    }
    busy = false;
    await serving;
    const settler = agent.payments!.settler!;
    assert.ok(settled > 0n, `the good relay settled the lane (liar posts ${liar.posts()}, misses ${settler.counters.relayMisses})`);
    assert.ok((await escrow.tokenBalance(good.relay)) > 0n, 'the fee went to the relay that settled');
    assert.ok(settler.counters.relayMisses >= 1, 'the liar was counted');
    assert.ok(liar.posts() <= 10, `the liar was handed the lane ${liar.posts()} times in about 500 ms of checks every 100 ms`);
  });

  test('a relay on a router with HTTP auth on takes vouchers from an agent with a relay-scoped key, and from nobody else', async (t) => {
    const broker = await brokerFor(t);
    const secret = 'relay-secret-0123456789';
    const relay = await relayRouter(t, broker.url, {
      apiKeys: [{ id: 'agents', sha256: createHash('sha256').update(secret).digest('hex'), scopes: ['relay'] }],
    });
    const keyed = await gaslessAgent(t, broker.url, [relay.url], 30_000, `meshkey.agents.${secret}`);
    const bare = await gaslessAgent(t, broker.url, [relay.url]);
    const escrow = await EscrowClient.connect({ runner: chain.provider, escrow: deployment.escrow });
    for (const { agent, payout } of [keyed, bare]) {
      const { mesh } = await payingMesh(t, broker.url, payout, 0.1);
      for (let i = 0; i < 5; i++) await mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 5_000, agentId: agent.id });
      await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 5 * KWS, 5_000, 'the voucher');
      await agent.payments!.settler!.settleNow();
    }
    await waitFor(() => keyed.agent.payments!.settler!.counters.relayedMicros === 5 * KWS, 10_000, 'the keyed agent settled');
    assert.equal(await escrow.tokenBalance(keyed.payout), BigInt(5 * KWS));
    assert.equal(keyed.agent.payments!.settler!.counters.relayFailures, 0);
    // Without a credential the relay refuses (401): counted as a failure, nothing settled.
    assert.ok(bare.agent.payments!.settler!.counters.relayFailures >= 1);
    assert.equal(await escrow.tokenBalance(bare.payout), 0n);
  });

  test("the SDK's relayer fee rises with the voucher, never falls, never breaks the escrow's cap; a share above 0.1 is MESH_CONFIG", async (t) => {
    for (const ppm of [0n, 1n, 10_000n, 33_333n, 100_000n]) {
      let previous = 0;
      for (let c = 0; c <= 5_000; c += 7) {
        const fee = voucherFee(c, ppm, previous);
        assert.ok(fee >= previous, 'monotone');
        assert.ok(BigInt(fee) * 10n <= BigInt(c), 'within the cap');
        assert.equal(fee, Math.max(previous, Number((BigInt(c) * ppm) / 1_000_000n)));
        previous = fee;
      }
    }
    // A fee carried over from a larger share (a restart with a smaller one) is kept, and still capped.
    assert.equal(voucherFee(1_000, 10_000n, 90), 90);
    assert.equal(voucherFee(1_000, 10_000n, 100), 100);
    const broker = await brokerFor(t);
    await assert.rejects(
      meshFor(t, {
        brokerUrl: broker.url,
        payment: { signer: chain.wallet(0), domain: domain(), checkPayouts: false, relayerFee: 0.2 },
      }),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG' && /relayerFee/.test(err.message),
    );
  });

  test('settling needs a runner or a relay', async (t) => {
    const broker = await brokerFor(t);
    await assert.rejects(
      agentFor(t, {
        brokerUrl: broker.url,
        payment: {
          payout: ethers.Wallet.createRandom().address,
          domain: domain(),
          dataDir: await tempDir(t),
          provider: chain.provider,
          settle: { relays: [] },
        },
      }),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_CONFIG',
    );
  });
});
