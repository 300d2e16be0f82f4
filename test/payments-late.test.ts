/**
 * Answers that reach the app after their deadline (docs/settlement.md, "Late answers"): the agent finished in time
 * by its signed clock, but the app's own process was busy when the reply came, so the SDK refuses the receipt as
 * `late`. A window of such refusals closes the lane at the agent. With `payLateToReopen` (the default) the SDK then
 * pays those late answers, which it did receive, and the lane serves again; with it off, the lane stays closed.
 * Real broker, agent with real ONNX sessions, local chain, SDK.
 */
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import type { AgentHandle } from '@edge-mesh/agent';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { MeshError } from '@edge-mesh/protocol';
import type { Mesh } from '@edge-mesh/sdk';
import { agentFor, brokerFor, meshFor, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane, registeredAgent } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;

before(async () => {
  chain = await startLocalChain({ accounts: 5 });
  deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
});
after(() => chain?.close());

/** Blocks this thread (the app's event loop) for `ms`: a reply that comes meanwhile is read only afterwards. */
const block = (ms: number) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

/**
 * A request the agent answers in time (its reply leaves about 100 ms after the run, of a 1.5 s deadline) that this
 * process reads 1.65 s after sending. The block starts once the agent has run the request, while its reply waits:
 * a fixed 50 ms after sending was too short on a loaded machine, where the agent was still admitting the request (a
 * first read of the lane from the chain) when the block began, and then refused it as past its deadline, with no
 * receipt to count.
 */
async function lateAnswer(mesh: Mesh, agent: AgentHandle, i: number): Promise<void> {
  const served = agent.counters.served;
  const sentAt = performance.now();
  const pending = mesh.infer('kws', sampleInputs('kws', i), { deadlineMs: 1_500 }).catch((err: unknown) => err);
  await waitFor(() => agent.counters.served > served, 10_000, 'the agent running the request');
  block(Math.max(0, sentAt + 1_650 - performance.now()));
  await pending;
}

test('a window of late answers closes a lane at the agent; the SDK pays them to reopen it, or with payLateToReopen off leaves it closed', async (t) => {
  const { identity, payout, domain } = await registeredAgent(deployment, chain.wallet(2));
  for (const i of [1, 3]) await fundOwnLane(chain.wallet(i), deployment.escrow, payout, 1_000_000n);

  const broker = await brokerFor(t);
  const KWS = 2;
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    identity,
    faults: { extraExecMs: 100 },
    payment: { payout, domain, dataDir: await tempDir(t), provider: chain.provider, fundsPollMs: 100, creditMicros: 3 * KWS },
  });
  const laneOf = (payer: string) => agent.payments!.lanes().find((l) => l.payer === payer.toLowerCase());

  for (const [wallet, payLateToReopen] of [
    [chain.wallet(1), true],
    [chain.wallet(3), false],
  ] as const) {
    const mesh = await meshFor(t, {
      brokerUrl: broker.url,
      payment: { signer: wallet, domain, dataDir: await tempDir(t), payLateToReopen },
    });
    await mesh.waitForModel('kws');
    // Three answers read after their deadlines: the SDK refuses their receipts as late, and the agent counts a
    // whole window (3 × 2 µUSD) refused.
    for (let i = 0; i < 3; i++) await lateAnswer(mesh, agent, i);
    await waitFor(() => mesh.lanes()[0]?.refused === 3, 10_000, 'three late receipts');
    assert.equal(mesh.lanes()[0]!.owedMicros, 0, 'nothing owed for answers that came late');

    const next = await mesh.infer('kws', sampleInputs('kws', 9), { deadlineMs: 5_000 }).catch((err: unknown) => err);
    if (payLateToReopen) {
      assert.ok(!(next instanceof Error), `the lane serves again: ${String(next)}`);
      assert.equal(mesh.lanes()[0]!.lateRepaid, 3, 'the three late answers paid');
      // The agent is paid the three late answers and the new one, and counts nothing refused.
      await waitFor(() => laneOf(wallet.address)?.paidMicros === 4 * KWS, 10_000, 'the voucher paying the late answers');
      assert.equal(laneOf(wallet.address)!.refusedMicros, 0);
    } else {
      assert.ok(next instanceof MeshError, 'the closed lane is not used');
      assert.equal(laneOf(wallet.address)!.paidMicros, 0, 'nothing paid');
    }
  }
});
