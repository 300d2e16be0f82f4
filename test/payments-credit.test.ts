/**
 * The SDK keeps inside the agent's credit window (docs/sdk.md, "Paying"; docs/settlement.md, "The credit
 * rule"): a real broker on port 0, a real agent with real ONNX sessions that gives credit only against money
 * on a real local chain, and the SDK paying with a wallet. A burst larger than the window is held back by
 * the SDK and paid as it goes, never refused by the agent; a burst that fits is not held back at all.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import type { MeshError } from '@edge-mesh/protocol';
import { agentFor, brokerFor, meshFor, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, registeredAgent } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;

before(async () => {
  chain = await startLocalChain({ accounts: 6 });
  deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
});
after(() => chain?.close());

test('a burst of paid requests beyond the credit window is held back by the SDK, never refused, and all paid; one that fits is not held', async (t) => {
  const payerWallet = chain.wallet(1);
  // An agent key registered for its payout; the app's owner funds its lane.
  const { identity, payout, domain } = await registeredAgent(deployment, chain.wallet(2));
  await fundOwnLane(payerWallet, deployment.escrow, payout, 1_000_000n);

  const broker = await brokerFor(t);
  const KWS = 2;
  // A window of three kws requests: a burst of twelve cannot all be unpaid at once.
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    identity,
    payment: { payout, domain, dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100, creditMicros: 3 * KWS },
  });
  assert.equal(agent.models.find((m) => m.name === 'kws')!.priceMicros, KWS);
  const mesh = await meshFor(t, { brokerUrl: broker.url, payment: { signer: payerWallet, domain, dataDir: await tempDir(t) } });
  await mesh.waitForModel('kws');
  const credit = () => agent.payments!.counters.creditRefusals;

  // Three at once fit the window exactly: nothing is held back, nothing refused.
  const fit = await Promise.all([0, 1, 2].map((i) => mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 20_000 })));
  assert.equal(fit.length, 3);
  assert.equal(mesh.counters.creditHeld, 0, 'a burst that fits the window is not held back');
  assert.equal(credit(), 0);
  await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 3 * KWS, 10_000, 'the first three paid');

  // Twelve at once: the SDK holds back what does not fit, signs vouchers as receipts come, and sends the rest.
  const burst = await Promise.allSettled(
    Array.from({ length: 12 }, (_, i) => mesh.infer('kws', sampleInputs('kws', 10 + i), { deadlineMs: 30_000 })),
  );
  const failed = burst.filter((r) => r.status === 'rejected').map((r) => (r as PromiseRejectedResult).reason);
  assert.deepEqual(failed, [], 'every request of the burst was served');
  assert.equal(credit(), 0, 'the agent refused nothing for credit');
  assert.ok(mesh.counters.creditHeld > 0, 'requests were held back for credit');
  assert.equal(mesh.counters.creditFailed, 0);
  assert.equal(mesh.counters.retries, 0, 'no attempt was retried');

  // Everything served is paid, to the micro-dollar, and the agent holds that voucher.
  await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 15 * KWS, 10_000, 'the burst paid');
  const lane = mesh.lanes()[0]!;
  assert.equal(lane.owedMicros, 15 * KWS);
  assert.equal(lane.paidMicros, 15 * KWS);
  assert.equal(lane.refused, 0);
  assert.equal(agent.payments!.lanes()[0]!.owedMicros, 15 * KWS, 'the agent billed the fifteen requests it served');
});

test('two running clients with one voucher key: the later grant takes the lane, and the other client is told so and stops sending there', async (t) => {
  const payerWallet = chain.wallet(1);
  const { identity, payout, domain } = await registeredAgent(deployment, chain.wallet(3));
  await fundOwnLane(payerWallet, deployment.escrow, payout, 1_000_000n);
  const broker = await brokerFor(t);
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    identity,
    payment: { payout, domain, dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100 },
  });
  const first = await meshFor(t, { brokerUrl: broker.url, payment: { signer: payerWallet, domain, dataDir: await tempDir(t) } });
  await first.waitForModel('kws');
  await first.infer('kws', sampleInputs('kws', 0), { deadlineMs: 5_000 });
  // A second client signing with the same key opens its own lane with the agent: its grant is newer.
  const second = await meshFor(t, { brokerUrl: broker.url, payment: { signer: payerWallet, domain, dataDir: await tempDir(t) } });
  await second.waitForModel('kws');
  await second.infer('kws', sampleInputs('kws', 1), { deadlineMs: 5_000 });
  const refusedBefore = agent.payments!.counters.grants;
  const errors: { code: string; reason: unknown; message: string }[] = [];
  for (let i = 0; i < 4; i++) {
    await first.infer('kws', sampleInputs('kws', 2 + i), { deadlineMs: 5_000 }).then(
      () => errors.push({ code: 'ok', reason: undefined, message: '' }),
      (e: MeshError) => errors.push({ code: e.code, reason: e.details?.reason, message: e.message }),
    );
  }
  // The first refusal sends the grant again (an agent that lost its journal would take it back); refused with it,
  // the lane is the other client's: the app is told why, and its later requests do not go there at all.
  assert.deepEqual(
    errors.map((e) => [e.code, e.reason]),
    [
      ['MESH_FORBIDDEN', undefined],
      ['MESH_FORBIDDEN', 'lane-taken'],
      ['MESH_FORBIDDEN', 'lane-taken'],
      ['MESH_FORBIDDEN', 'lane-taken'],
    ],
  );
  assert.match(errors[1]!.message, /another running client signs with this voucher key/);
  assert.equal(agent.payments!.counters.grants, refusedBefore, 'the older grant sent again moved nothing');
  // The client that holds the lane goes on, and is paid for.
  for (let i = 0; i < 3; i++) await second.infer('kws', sampleInputs('kws', 10 + i), { deadlineMs: 5_000 });
  await waitFor(() => agent.payments!.lanes()[0]?.senderId === second.clientId, 1_000, 'the lane with the second client');
});
