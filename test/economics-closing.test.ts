/**
 * The economics simulation's payer (bench/economics-fleet.ts) while its lanes close: it takes the payment side of
 * replies as the SDK does, and its ledger values an answer that comes then. A receipt that comes before such an answer
 * must be what the closing lanes pay too: they hold it for its answer (PayerLanes.replyDue holds while closing), or
 * the ledger would count value the lanes never pay (the economics test's honest_lanes_paid_other_than_owed).
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  type AgentStatus,
  decodeMessage,
  encodeMessage,
  generateIdentity,
  hashTensorMap,
  PROTOCOL_VERSION,
  RECEIPT_STATUS,
  signQuote,
  signReceipt,
  signStatus,
  toHex,
  ZERO_HASH,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { Ledger, type Network, type SimAgent, SimPayer } from '../bench/economics-fleet.ts';
import { tempDir, waitFor } from './helpers.ts';

const KWS_HASH = `0x${'ab'.repeat(32)}`;
const OUTPUTS = { out: { dtype: 'float32', shape: [1, 1], data: new Uint8Array(4) } };

test('a receipt that overtakes an answer coming while the lanes close is valued by the ledger only if the lanes pay it', async (t) => {
  const domain = { chainId: 31337n, escrow: `0x${'12'.repeat(20)}` };
  const identity = generateIdentity('agent');
  const payout = `0x${'34'.repeat(20)}`;
  const quote = signQuote(identity, {
    payout,
    chainId: Number(domain.chainId),
    escrow: domain.escrow,
    issuedAt: Date.now(),
    validUntil: Date.now() + 3_600_000,
    models: [{ name: 'kws', modelHash: KWS_HASH, baseMicros: 0, unitMicros: 2, minChargeMicros: 0 }],
  });
  const status: AgentStatus = signStatus(identity, {
    v: PROTOCOL_VERSION,
    kind: 'status',
    agent: identity.id,
    state: 'online',
    ts: Date.now(),
    session: 'review',
    models: [
      {
        name: 'kws',
        version: '1',
        sha256: KWS_HASH.slice(2),
        priceMicros: 2,
        latencyMs: 0.01,
        inputs: [{ name: 'x', dtype: 'float32', shape: [1, 4] }],
        outputs: [{ name: 'out', dtype: 'float32', shape: [1, 1] }],
      },
    ],
    workers: 1,
    quote,
  });
  // The escrow's registry says the payout is this agent's.
  const provider = { call: async () => toHex(identity.publicKey) } as unknown as ethers.Provider;
  const requests: Buffer[] = [];
  const agent = {
    id: identity.id,
    up: true,
    behaviour: 'honest',
    setup: { priceMicros: 2 },
    deliverRequest: (_sender: string, payload: Buffer) => requests.push(payload),
    deliverVoucher: () => {},
  } as unknown as SimAgent;
  // A network that hands requests over at once and loses nothing else on the way (vouchers, resyncs go nowhere).
  const net = { send: (kind: string, _to: unknown, deliver: () => void) => kind === 'request' && deliver() } as unknown as Network;
  const ledger = new Ledger();
  const payer = new SimPayer(
    {
      behaviour: 'honest',
      wallet: ethers.Wallet.createRandom() as unknown as ethers.Wallet,
      domain,
      provider,
      dataDir: await tempDir(t),
      deadlineMs: 5_000,
      voucherDelayMs: 0,
    },
    0,
    net,
    ledger,
    new Map([[identity.id, agent]]),
  );
  payer.escrow = {} as SimPayer['escrow'];
  payer.follow([() => status]);
  await payer.open();
  await waitFor(() => payer.lanes.lanesView().length === 1, 5_000, 'the lane open');

  void payer.request(agent, { next: () => 0.5 } as never);
  void payer.request(agent, { next: () => 0.25 } as never);
  await waitFor(() => requests.length === 2, 1_000, 'both requests at the agent');
  const [reqA, reqB] = requests.map((r) => decodeMessage(r, ['req']));
  const receiptFor = (req: NonNullable<typeof reqA>, seq: number, prev: Uint8Array) =>
    signReceipt(identity, {
      v: 1,
      chainId: Number(domain.chainId),
      escrow: domain.escrow,
      payer: payer.address,
      agentKey: identity.publicKey,
      seq,
      requestId: req.id,
      modelHash: Buffer.from(KWS_HASH.slice(2), 'hex'),
      inputHash: hashTensorMap(req.inputs),
      outputHash: hashTensorMap(OUTPUTS),
      status: RECEIPT_STATUS.ok,
      unitsUsed: 1,
      price: 2,
      cumulative: 2 * seq,
      startedAt: Date.now() - 1,
      finishedAt: Date.now(),
      prevReceipt: prev,
    });
  const a = receiptFor(reqA!, 1, ZERO_HASH);
  const b = receiptFor(reqB!, 2, a.leaf);
  const answer = (req: NonNullable<typeof reqA>, seq: number) =>
    payer.deliverReply(
      identity.id,
      Buffer.from(
        encodeMessage({
          v: PROTOCOL_VERSION,
          kind: 'res',
          id: req.id,
          agent: identity.id,
          model: 'kws',
          outputs: OUTPUTS,
          queueMs: 0,
          execMs: 0.01,
          lane: { seq, paid: 0 },
        }),
      ),
    );
  const receipts = (r: typeof a) =>
    payer.deliverReply(
      identity.id,
      Buffer.from(
        encodeMessage({
          v: PROTOCOL_VERSION,
          kind: 'receipts',
          agent: identity.id,
          payer: payer.address,
          receipts: [r.receipt],
          lane: { seq: 2, paid: 0 },
        }),
      ),
    );
  // A is answered before the restart; its receipt follows (so the closing lanes wait for it).
  answer(reqA!, 0);
  await new Promise((r) => setImmediate(r));
  // The app restarts with B in flight; while its lanes close, B's receipt comes before B's answer, then A's receipt.
  const closing = payer.lanes;
  const restarted = payer.restart(50);
  await new Promise((r) => setTimeout(r, 100));
  receipts(b);
  answer(reqB!, 1);
  receipts(a);
  await restarted;
  const owed = closing.lanesView()[0]!;
  const value = ledger.value.get(`${payer.address}|${identity.id}`)?.micros ?? 0;
  await payer.close();
  assert.equal(
    value,
    owed.owedMicros,
    `the ledger values ${value}; the closing lanes owe ${owed.owedMicros} (refused ${owed.refused}: ${owed.lastRefusal})`,
  );
});
