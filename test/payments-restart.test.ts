/**
 * Restarts mid-run leave no lane wedged (docs/settlement.md, "Resync and lane info"): the SDK paying a
 * real agent on a real chain, the app restarted with a paid request in flight, the agent restarted on
 * its folder; the lane goes on and what settles is what the app owes.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { type AgentHandle, startAgent } from '@edge-mesh/agent';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { generateIdentity } from '@edge-mesh/protocol';
import { connect, type Mesh } from '@edge-mesh/sdk';
import { brokerFor, modelsDir, quiet, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, registeredAgent, settleEntry } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;

before(async () => {
  chain = await startLocalChain({ accounts: 5 });
  deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
});
after(() => chain?.close());

test('an app restarted with a paid request in flight, and an agent restarted on its folder, leave the lane paying', async (t) => {
  const payerWallet = chain.wallet(1);
  // An agent key registered for its payout; the app's owner funds its lane.
  const { identity: agentIdentity, payout, domain } = await registeredAgent(deployment, chain.wallet(2));
  const appIdentity = generateIdentity('app');
  await fundOwnLane(payerWallet, deployment.escrow, payout, 1_000_000n);

  const broker = await brokerFor(t);
  const agentDir = await tempDir(t);
  const appDir = await tempDir(t);
  const models = await modelsDir();
  const startPaidAgent = () =>
    startAgent({
      brokerUrl: broker.url,
      modelsDir: models,
      identity: agentIdentity,
      workers: 1,
      logger: quiet,
      payment: { payout, domain, dataDir: agentDir, provider: chain.provider, fundsPollMs: 100 },
    });
  const openApp = () =>
    connect({ brokerUrl: broker.url, identity: appIdentity, logger: quiet, payment: { signer: payerWallet, domain, dataDir: appDir } });
  let agent: AgentHandle = await startPaidAgent();
  t.after(() => agent.close());
  let mesh: Mesh = await openApp();
  t.after(() => mesh.close());
  await mesh.waitForModel('kws');
  const serve = async (n: number, seed: number) => {
    for (let i = 0; i < n; i++) await mesh.infer('kws', sampleInputs('kws', seed + i), { deadlineMs: 5_000 });
  };
  const price = agent.models.find((m) => m.name === 'kws')!.priceMicros;

  await serve(5, 0);
  await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === 5 * price, 5_000, 'paid for the first five');

  // The app goes away with a paid request in flight: its reply (and receipt) reach no one.
  const inFlight = mesh.infer('ocr-det', sampleInputs('ocr-det', 1), { deadlineMs: 10_000 }).catch(() => undefined);
  await waitFor(() => agent.loadReport().inFlight === 1, 5_000, 'the request running');
  await mesh.close();
  await inFlight;
  mesh = await openApp();
  await mesh.waitForModel('kws');
  await serve(5, 10);
  // The missed receipt comes in the resync's batch, which may land after the last of the five replies.
  await waitFor(() => mesh.lanes()[0]!.receipts >= 11, 5_000, `the restarted app linked the missed receipt too`);
  await waitFor(
    () => agent.payments!.lanes()[0]?.paidMicros === mesh.lanes()[0]!.owedMicros && mesh.lanes()[0]!.owedMicros >= 10 * price,
    5_000,
    'paid after the app restart',
  );

  // The agent restarts on its folder: the lane goes on from the next seq.
  await agent.close();
  agent = await startPaidAgent();
  await mesh.waitForModel('kws');
  await serve(5, 20);
  const lane = mesh.lanes()[0]!;
  assert.equal(lane.broken, undefined);
  await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === mesh.lanes()[0]!.owedMicros, 5_000, 'paid after the agent restart');
  const owed = mesh.lanes()[0]!.owedMicros;
  assert.ok(owed >= 15 * price, `the app owes every request it got an answer for (${owed})`);
  // The one request whose answer never reached the app is the only work it did not pay for.
  const billed = agent.payments!.lanes()[0]!.owedMicros;
  assert.ok(billed - owed <= agent.models.find((m) => m.name === 'ocr-det')!.priceMicros, `billed ${billed}, owed ${owed}`);

  // What the agent holds settles on chain to the micro-dollar.
  const best = agent.payments!.lanes()[0]!.voucher!;
  const relayer = await EscrowClient.connect({ runner: chain.wallet(3), escrow: deployment.escrow });
  await relayer.settle(payout, [settleEntry(payout, best)]);
  assert.equal(await relayer.tokenBalance(payout), BigInt(owed));
});
