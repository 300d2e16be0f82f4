/**
 * Paid inference end to end on a real local chain: fund a lane, serve requests through the mesh with
 * receipts and vouchers, settle the agent's best voucher, and find exactly the ok work paid on chain.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { EscrowClient } from '@edge-mesh/contracts';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { sampleInputs } from '@edge-mesh/demo';
import { RECEIPT_STATUS } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { agentFor, brokerFor, expireBehindDetection, LARGE_DETECTION_BYTES, meshFor, tempDir, waitFor } from './helpers.ts';
import { settleEntry } from './payer.ts';

let chain: LocalChain;
let deployment: MeshDeployment;

describe('settlement of paid inference on a local chain', () => {
  before(async () => {
    chain = await startLocalChain({ accounts: 4 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  test('fund, serve, settle: the agent is paid the sum of its ok receipts exactly; timed-out work costs 0', async (t) => {
    const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
    const payerWallet = chain.wallet(1);
    const payer = await EscrowClient.connect({ runner: payerWallet, escrow: deployment.escrow });
    // The agent's payout address never needs gas: a relayer settles for it.
    const payout = ethers.Wallet.createRandom().address.toLowerCase();
    await payer.mint(payerWallet.address, 1_000_000n);
    await payer.fund(payerWallet.address, payout, 1_000_000n);

    const broker = await brokerFor(t, { maxPacketBytes: LARGE_DETECTION_BYTES });
    // Every model on the one worker, one job at a time: the wake-word request below waits behind the
    // detection (inline, it would not).
    const agent = await agentFor(t, {
      brokerUrl: broker.url,
      pipelineDepth: 1,
      inlineMaxMs: 0,
      maxMessageBytes: LARGE_DETECTION_BYTES,
      // The request behind the detection must be queued and time out there, not be refused at admission.
      admission: false,
      payment: { payout, domain, dataDir: await tempDir(t), provider: chain.provider },
    });
    // The app pays through the SDK: a lane grant for its client, every receipt linked, what it owes paid with
    // vouchers. This test is about settling; the payout registry has its own (test/payments-payer.test.ts).
    const mesh = await meshFor(t, {
      brokerUrl: broker.url,
      maxMessageBytes: LARGE_DETECTION_BYTES,
      payment: { signer: payerWallet, domain, dataDir: await tempDir(t), checkPayouts: false },
    });
    await mesh.waitForModel('kws');

    for (let i = 0; i < 20; i++)
      await mesh.infer(i % 4 === 3 ? 'vad' : 'kws', sampleInputs(i % 4 === 3 ? 'vad' : 'kws', i), { deadlineMs: 5_000 });
    // A request behind a large detection times out in the queue and is billed 0.
    await expireBehindDetection(mesh, agent);

    const journal = await agent.payments!.receipts(payerWallet.address);
    const okTotal = journal.filter((r) => r.status === RECEIPT_STATUS.ok).reduce((sum, r) => sum + r.price, 0);
    assert.equal(journal.length, 22);
    assert.ok(
      journal.some((r) => r.status === RECEIPT_STATUS.timeout && r.price === 0),
      'the timed-out request has a receipt priced 0',
    );
    assert.equal(journal.at(-1)!.cumulative, okTotal);
    await waitFor(() => agent.payments!.lanes()[0]?.paidMicros === okTotal, 5_000, 'the last voucher');
    assert.equal(mesh.lanes()[0]!.paidMicros, okTotal);
    assert.equal(mesh.lanes()[0]!.owedMicros, okTotal);

    const best = agent.payments!.lanes()[0]!.voucher!;
    const relayer = await EscrowClient.connect({ runner: chain.wallet(2), escrow: deployment.escrow });
    const outcome = await relayer.settle(payout, [settleEntry(payout, best)]);
    assert.deepEqual(outcome.skipped, []);
    assert.equal(outcome.paid, BigInt(okTotal));
    assert.equal(await relayer.tokenBalance(payout), BigInt(okTotal));
    const lane = await relayer.laneOf(payerWallet.address, payout);
    assert.equal(lane.settled, BigInt(okTotal));
    assert.equal(lane.remaining, 1_000_000n - BigInt(okTotal));
    // Settling the same voucher again pays nothing.
    const again = await relayer.settle(payout, [settleEntry(payout, best)]);
    assert.equal(again.paid, 0n);
    assert.equal(await relayer.tokenBalance(payout), BigInt(okTotal));
  });
});
