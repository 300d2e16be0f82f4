/**
 * The `economics` benchmark (bench/economics.ts, docs/benchmarks.md) on a tiny fleet: two honest agents and
 * three honest payers among every dishonest agent and payer, a lossy network, an agent and a payer that
 * restart, six rounds on a real local chain. It checks the payment protocol's promises (an honest payer pays
 * nothing it did not get, an honest party loses at most one credit window to a dishonest one, honest agents
 * are paid for what honest payers got) and that every dishonest behaviour was actually tried. What is
 * asserted are counts and sums, never how long anything took.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type EconomicsConfig, quickConfig, runEconomics } from '../bench/economics.ts';

test('economics on a tiny fleet: honest payers overpay nothing, no honest party loses more than one window, every cheat is tried', async () => {
  const config: EconomicsConfig = {
    ...quickConfig(7),
    honestAgents: 2,
    honestPayers: 3,
    dishonestAgentUsers: 3,
    rounds: 6,
    settleEveryRounds: 2,
    perRound: { honest: 8, dishonestAgent: 2, heavy: 20 },
    loss: 0.02,
    creditRequests: 4,
    settleReceipts: 12,
    thawSeconds: 1_800,
  };
  const { result, exercised } = await runEconomics(config, () => {});
  const summary = JSON.stringify({ ...result, behaviours: undefined });
  assert.equal(result.honest_payers_overpaid_micros, 0, summary);
  assert.ok((result.max_honest_loss_windows as number) <= 1, `${JSON.stringify(result.loss_windows_by_behaviour)}`);
  // Every request an honest payer got an answer for from an honest agent is paid: none is refused as
  // 'no-reply' or 'unsolicited' (the network here may deliver a resync's receipts before a reply, and
  // payers restart with receipts held behind lost ones; docs/settlement.md, "Resync and lane info").
  assert.deepEqual(result.honest_lanes_paid_other_than_owed, [], summary);
  assert.ok((result.honest_agents_paid_of_owed as number) >= 0.999, summary);
  assert.ok((result.honest_agents_owed_micros as number) > 0, 'honest work was done and paid');
  // The gas goal assumes relayers settling about 50 lanes of 100 receipts each per transaction: a fleet this
  // small cannot show it, so only its presence is checked here.
  assert.equal(typeof result.gas_per_receipt, 'number');
  const missing = Object.entries(exercised).filter(([, n]) => !(n > 0));
  assert.deepEqual(missing, [], `behaviours never exercised: ${JSON.stringify(exercised)}`);
});
