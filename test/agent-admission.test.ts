/**
 * The agent's admission of paid requests (edge-agent/src/payments.ts, `admit` and `admitNow`) against a payer that
 * moves its lane between clients while a request is being admitted: the lane's grant is checked with the credit
 * rule, after the lane's funds are read, not only before.
 */
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { deployMesh, type LocalChain, type MeshDeployment, startLocalChain } from '@edge-mesh/contracts/dev';
import { fromHex, generateIdentity, MeshError, signLaneGrant } from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import pino from 'pino';
import { openPaidSide } from '../edge-agent/src/paid.ts';
import { AgentPayments } from '../edge-agent/src/payments.ts';
import { quiet, tempDir, waitFor } from './helpers.ts';
import { fundOwnLane } from './payer.ts';

describe('paid admission', () => {
  let chain: LocalChain;
  let deployment: MeshDeployment;
  before(async () => {
    chain = await startLocalChain({ accounts: 4 });
    deployment = await deployMesh(chain.wallet(0), { thawSeconds: 3_600 });
  });
  after(() => chain?.close());

  /** A new agent key and the lane of chain account `payerIndex` to payout account 1, funded; grants signed on demand. */
  async function fundedLane(payerIndex: number) {
    const identity = generateIdentity('agent');
    const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
    const payout = chain.accounts[1]!.toLowerCase();
    const payerWallet = chain.wallet(payerIndex);
    const payer = payerWallet.address.toLowerCase();
    await fundOwnLane(payerWallet, deployment.escrow, payout, 1_000_000n);
    const models = [{ name: 'kws', sha256: 'ab'.repeat(32), priceMicros: 1 }];
    const grantFor = async (client: string, issuedAt: number) => {
      const terms = { agent: payout, client, issuedAt };
      return { ...terms, payer, sig: fromHex(await signLaneGrant(payerWallet, domain, terms)) };
    };
    return { identity, domain, payout, payer, models, grantFor };
  }

  test("a grant that moves the lane to another client while a request of the first waits for the lane's funds: that request is refused", async (t) => {
    const { identity, domain, payout, payer, models, grantFor } = await fundedLane(2);
    const dataDir = await tempDir(t);
    const inputHash = new Uint8Array(32);

    // A first run opens the lane for app-a; the restarted agent knows the grant but has not read the lane's funds.
    const first = await AgentPayments.open(identity, { payout, domain, dataDir, provider: chain.provider }, models, quiet);
    first.release(await first.admit(payer, 'app-a', 'kws', inputHash, await grantFor('app-a', Date.now() - 1_000)));
    await first.close();

    // The restarted agent's chain reads wait at a gate the test opens.
    const provider = new ethers.JsonRpcProvider(chain.rpcUrl, undefined, { staticNetwork: true, batchMaxCount: 1 });
    t.after(() => provider.destroy());
    let gate: Promise<void> | undefined;
    let open = () => {};
    const send = provider.send.bind(provider);
    provider.send = async (method: string, params: unknown[] | Record<string, unknown>) => {
      if (method === 'eth_call' && gate) await gate;
      return send(method, params);
    };
    const payments = await AgentPayments.open(identity, { payout, domain, dataDir, provider }, models, quiet);
    t.after(() => payments.close());
    assert.equal(payments.lanesSummary().find((l) => l.payer === payer)?.senderId, 'app-a');
    gate = new Promise((resolve) => {
      open = resolve;
    });
    assert.equal(payments.admitNow(payer, 'app-a', 'kws', inputHash), undefined, 'no funds read yet: not admitted at once');
    const a = payments.admit(payer, 'app-a', 'kws', inputHash);
    const b = payments.admit(payer, 'app-b', 'kws', inputHash, await grantFor('app-b', Date.now()));
    await waitFor(() => payments.lanesSummary().find((l) => l.payer === payer)?.senderId === 'app-b', 5_000, 'the lane moved to app-b');
    gate = undefined;
    open();
    // app-a's request had passed the grant check before the read; the lane is app-b's when it would be reserved.
    await assert.rejects(a, (err: unknown) => err instanceof MeshError && err.code === 'MESH_FORBIDDEN');
    const job = await b;
    assert.equal(job.payer, payer);
    assert.equal(payments.admitNow(payer, 'app-a', 'kws', inputHash), undefined, 'app-a is not admitted at once either');
    const now = payments.admitNow(payer, 'app-b', 'kws', inputHash);
    assert.ok(now, 'app-b is, its lane open and read');
  });

  test('a voucher that rides on a request the full window refuses is checked, and its refusal counted, once', async (t) => {
    const { identity, domain, payout, payer, models, grantFor } = await fundedLane(3);
    const payments = await AgentPayments.open(
      identity,
      { payout, domain, dataDir: await tempDir(t), provider: chain.provider, creditRequests: 2 },
      models,
      quiet,
    );
    t.after(() => payments.close());
    const grant = await grantFor('app-a', Date.now());
    const inputHash = new Uint8Array(32);
    // The window holds two requests: both taken, the lane's funds read.
    await payments.admit(payer, 'app-a', 'kws', inputHash, grant);
    assert.ok(payments.admitNow(payer, 'app-a', 'kws', inputHash), 'the second is admitted at once');
    // A voucher whose relayer fee is above the escrow's cap is refused before its signature is checked.
    const voucher = {
      v: 1,
      kind: 'voucher',
      payer,
      agent: payout,
      cumulative: 2,
      receiptsRoot: new Uint8Array(32),
      feeCumulative: 1,
      sig: new Uint8Array(65),
      seq: 0,
    } as const;
    // The request carries the lane's grant again, as the SDK's first requests after a restart do.
    assert.equal(payments.admitNow(payer, 'app-a', 'kws', inputHash, grant, 1, voucher), undefined, 'the window is full');
    await assert.rejects(
      payments.admit(payer, 'app-a', 'kws', inputHash, grant, 1, voucher),
      (err: unknown) => err instanceof MeshError && err.code === 'MESH_CREDIT_EXCEEDED',
    );
    assert.equal(payments.counters.vouchersRefused, 1);
  });
  test('an agent that takes payment with nobody to settle its vouchers says so when it starts', async (t) => {
    const { identity, domain, payout, models } = await fundedLane(3);
    const lines: { msg?: string; level?: number }[] = [];
    const logger = pino({ level: 'info' }, { write: (line: string) => lines.push(JSON.parse(line)) });
    const entries = models.map((m) => ({ ...m, version: '1', file: 'kws.onnx' }));
    const bare = await openPaidSide(identity, { payout, domain, dataDir: await tempDir(t), provider: chain.provider }, entries, logger);
    t.after(() => bare.payments.close());
    assert.equal(bare.settler, undefined);
    assert.ok(lines.some((l) => l.level === 40 && /taking payment with no settlement/.test(l.msg ?? '')));
  });
});
