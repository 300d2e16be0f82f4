/**
 * A payer for the agent-side payment tests, spoken over a bare MQTT connection: it finds agents by
 * their retained signed statuses, signs a lane grant for each (docs/settlement.md, "Lanes and
 * grants"), sends paid requests, checks every receipt with the protocol's LaneVerifier and, when
 * `autoPay`, pays what it checked with a voucher that carries the checked seq. It can also misbehave on
 * purpose (no grant, vouchers that pay less, refusing receipts) so the tests can measure what the
 * agent loses. A test-side stand-in for the SDK's payer, whose grant support is written separately.
 */

import assert from 'node:assert/strict';
import type { TestContext } from 'node:test';
import type { AgentPaymentOptions } from '@edge-mesh/agent';
import { isStaleOffline, openMeshConnection } from '@edge-mesh/client';
import { EscrowClient } from '@edge-mesh/contracts';
import {
  type AgentStatus,
  agentBindingMessage,
  decodeMessage,
  decodeTensorMap,
  type ErrorReply,
  type EscrowDomain,
  encodeMessage,
  encodeTensorMap,
  fromHex,
  generateIdentity,
  hashTensorMap,
  type Identity,
  type InferReply,
  type InferRequest,
  type LaneGrant,
  LaneVerifier,
  MeshError,
  type MeshErrorCode,
  merkleRoot,
  newRequestId,
  PROTOCOL_VERSION,
  type Quote,
  type ReceiptBatch,
  requestIdHex,
  type SignedReceipt,
  signBytes,
  signLaneGrant,
  signVoucher,
  type Tensor,
  toHex,
  topics,
  type VoucherMessage,
  verifyQuote,
  verifyStatus,
  voucherTypedData,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { agentFor, namedClient, tempDir } from './helpers.ts';

type Reply = InferReply | ErrorReply;

interface PayerLane {
  agentId: string;
  quote: Quote;
  verifier: LaneVerifier;
  leaves: Uint8Array[];
  paid: number;
  refused: number;
  grant: LaneGrant | undefined;
  lastVoucher: VoucherMessage | undefined;
}

export interface TestPayerOptions {
  wallet: ethers.Wallet | ethers.HDNodeWallet;
  domain: EscrowDomain;
  /**
   * The mesh client id (an open broker lets it connect as it is; on an external engine it names an admitted
   * identity whose id the payer then uses, test/helpers.ts `namedClient`).
   */
  clientId: string;
  /** Pay every checked receipt at once with a voucher (default true). */
  autoPay?: boolean;
}

export interface InferOptions {
  agentId?: string;
  deadlineMs?: number;
  /** Leave the grant out of the request (default: it rides on every request). */
  noGrant?: boolean;
}

export class TestPayer {
  readonly payer: string;
  readonly clientId: string;
  private readonly payerLanes = new Map<string, PayerLane>();
  private readonly statuses = new Map<string, AgentStatus>();
  private readonly waiting = new Map<string, (m: Reply) => void>();
  private readonly batches: ReceiptBatch[] = [];
  /** Receipts that came after their answers (in a `receipts` message or an answer's `earlier`), by request id. */
  private readonly afterAnswers = new Map<string, SignedReceipt>();
  private readonly receiptWaiters = new Map<string, (r: SignedReceipt) => void>();
  private autoPay: boolean;

  private constructor(
    private readonly options: TestPayerOptions,
    private readonly connection: ReturnType<typeof openMeshConnection>,
    clientId: string,
    private readonly requestQos: 0 | 1,
  ) {
    this.payer = options.wallet.address.toLowerCase();
    this.clientId = clientId;
    this.autoPay = options.autoPay ?? true;
    connection.client.on('message', (topic, payload) => {
      if (topic.endsWith('/status')) {
        if (payload.length === 0) return;
        const status = decodeMessage(payload, ['status']);
        const known = this.statuses.get(status.agent);
        // As the SDK's fleet view does: an offline status (a late last will) ends only the session it names.
        if (verifyStatus(status) && !isStaleOffline(known, status)) this.statuses.set(status.agent, status);
        return;
      }
      const message = decodeMessage(payload, ['res', 'err', 'receipts']);
      if (message.kind === 'receipts') {
        this.batches.push(message);
        this.followed(message.receipts);
        return;
      }
      if (message.kind === 'res' && message.earlier) this.followed(message.earlier);
      this.waiting.get(requestIdHex(message.id))?.(message);
    });
  }

  static async open(t: TestContext, brokerUrl: string, options: TestPayerOptions): Promise<TestPayer> {
    const { requestQos, ...named } = await namedClient(brokerUrl, options.clientId);
    const { clientId } = named;
    const connection = openMeshConnection(brokerUrl, {
      ...named,
      onConnect: (c) =>
        c.subscribe([topics.clientRepliesFor(clientId), topics.allAgentStatus()], { qos: 1 }, () => {
          // On an external engine, ask the agents to announce again, as the SDK does: RabbitMQ 3.10 hands a wildcard
          // subscription no retained status.
          if (named.identity) c.publish(topics.discover(clientId), Buffer.alloc(0), { qos: 0 });
        }),
    });
    t.after(() => connection.close());
    // Listening before the subscription answers: retained statuses arrive right after it.
    const payer = new TestPayer(options, connection, clientId, requestQos);
    await connection.firstConnect;
    await new Promise((r) => setTimeout(r, 50));
    return payer;
  }

  get client() {
    return this.connection.client;
  }

  /** Closes the connection (another payer may then connect with the same client id). */
  close(): Promise<void> {
    return this.connection.close();
  }

  /**
   * A payer that lost its lane state: asks the agent for the lane's receipts from the start and checks
   * them all again; the lane then goes on from the last one. Returns how many receipts were checked.
   */
  async recover(agentId: string): Promise<number> {
    const lane = this.lane(agentId);
    let checked = 0;
    for (;;) {
      const batches = await this.resync(agentId, lane.verifier.state.seq, 500);
      for (const batch of batches) {
        for (const r of batch.receipts) {
          lane.leaves.push(lane.verifier.verify(r).leaf.slice());
          checked++;
        }
      }
      const last = batches.at(-1);
      if (!last || last.lane.seq <= lane.verifier.state.seq) {
        if (last) lane.paid = Math.max(lane.paid, last.lane.paid);
        return checked;
      }
    }
  }

  setAutoPay(on: boolean): void {
    this.autoPay = on;
  }

  /** Waits until `count` agents announce `model` with a quote for this payer's chain and escrow. */
  async waitForModel(model: string, timeoutMs = 10_000, count = 1): Promise<void> {
    const until = Date.now() + timeoutMs;
    while (this.agentsFor(model).length < count) {
      if (Date.now() > until) throw new Error(`no ${count} paid agents serving ${model}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  private agentsFor(model: string): string[] {
    return [...this.statuses.values()]
      .filter((s) => s.state === 'online' && s.quote && s.models?.some((m) => m.name === model))
      .map((s) => s.agent);
  }

  /** The lane with `agentId`, opened from its verified quote on first use. */
  lane(agentId: string): PayerLane {
    let lane = this.payerLanes.get(agentId);
    if (!lane) {
      const status = this.statuses.get(agentId);
      if (!status?.quote) throw new Error(`no quote from ${agentId} yet`);
      const quote = verifyQuote(status.quote, { agentId });
      lane = {
        agentId,
        quote,
        verifier: new LaneVerifier({ payer: this.payer, quote }),
        leaves: [],
        paid: 0,
        refused: 0,
        grant: undefined,
        lastVoucher: undefined,
      };
      this.payerLanes.set(agentId, lane);
    }
    return lane;
  }

  /** Signs a grant of this payer's lane with `agentId` to `client` (this client by default). */
  async grant(
    agentId: string,
    { client = this.clientId, issuedAt = Date.now() }: { client?: string; issuedAt?: number } = {},
  ): Promise<LaneGrant> {
    const payout = this.lane(agentId).quote.payout;
    const sig = await signLaneGrant(this.options.wallet, this.options.domain, { agent: payout, client, issuedAt });
    return { payer: this.payer, agent: payout, client, issuedAt, sig: fromHex(sig) };
  }

  /** Sends a request as it is and waits for its reply; receipts on it are checked (and paid, with autoPay). */
  async send(agentId: string, request: InferRequest, timeoutMs = 10_000): Promise<Reply> {
    const key = requestIdHex(request.id);
    const reply = await new Promise<Reply>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no reply for ${key}`)), timeoutMs);
      this.waiting.set(key, (m) => {
        clearTimeout(timer);
        this.waiting.delete(key);
        resolve(m);
      });
      this.client.publish(topics.agentRequest(agentId, this.clientId), encodeMessage(request), { qos: this.requestQos });
    });
    // A paid answer's receipt follows it (edge-agent/src/receipt-post.ts): waited for, and set on the reply returned.
    if (!reply.receipt && reply.kind === 'res' && request.pay) {
      const followed = await this.receiptAfter(key, 3_000);
      if (followed) reply.receipt = followed;
    }
    if (reply.receipt) await this.onReceipt(agentId, reply.receipt, request, reply.kind === 'res' ? reply.outputs : undefined);
    return reply;
  }

  private followed(receipts: readonly SignedReceipt[]): void {
    for (const r of receipts) {
      const key = requestIdHex(r.requestId);
      const waiter = this.receiptWaiters.get(key);
      if (waiter) waiter(r);
      else this.afterAnswers.set(key, r);
    }
  }

  /** The receipt for request `key` that came (or comes within `waitMs`) after its answer. */
  private receiptAfter(key: string, waitMs: number): Promise<SignedReceipt | undefined> {
    const here = this.afterAnswers.get(key);
    if (here) {
      this.afterAnswers.delete(key);
      return Promise.resolve(here);
    }
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.receiptWaiters.delete(key);
        resolve(undefined);
      }, waitMs);
      this.receiptWaiters.set(key, (r) => {
        clearTimeout(timer);
        this.receiptWaiters.delete(key);
        resolve(r);
      });
    });
  }

  /** A paid request for `model` (sample inputs given by the caller), with this payer's grant unless `noGrant`. */
  async request(model: string, inputs: Record<string, Tensor>, options: InferOptions = {}): Promise<Reply> {
    const agentId = options.agentId ?? this.agentsFor(model)[0];
    if (!agentId) throw new Error(`no agent for ${model}`);
    const lane = this.lane(agentId);
    lane.grant ??= await this.grant(agentId);
    const request: InferRequest = {
      v: PROTOCOL_VERSION,
      kind: 'req',
      id: newRequestId(),
      deadline: Date.now() + (options.deadlineMs ?? 5_000),
      model,
      inputs: encodeTensorMap(inputs),
      pay: { payer: this.payer, ...(options.noGrant ? {} : { grant: lane.grant }) },
    };
    return this.send(agentId, request, (options.deadlineMs ?? 5_000) + 5_000);
  }

  /** As the SDK's `infer`: the outputs, or the reply's coded error thrown. */
  async infer(model: string, inputs: Record<string, Tensor>, options: InferOptions = {}): Promise<Record<string, Tensor>> {
    const reply = await this.request(model, inputs, options);
    if (reply.kind === 'err') throw new MeshError(reply.code as MeshErrorCode, reply.message);
    return decodeTensorMap(reply.outputs);
  }

  private async onReceipt(agentId: string, receipt: SignedReceipt, request: InferRequest, outputs: InferReply['outputs'] | undefined) {
    const lane = this.lane(agentId);
    try {
      const accepted = lane.verifier.verify(receipt, {
        deadline: request.deadline,
        inputHash: hashTensorMap(request.inputs),
        ...(outputs ? { outputHash: hashTensorMap(outputs) } : {}),
      });
      lane.leaves.push(accepted.leaf.slice());
    } catch {
      lane.refused++;
      return;
    }
    if (this.autoPay && lane.verifier.state.cumulative > lane.paid) await this.payChecked(agentId);
  }

  /** Pays everything checked so far on the lane with `agentId` (a voucher naming the checked seq). */
  async payChecked(agentId: string): Promise<VoucherMessage> {
    const lane = this.lane(agentId);
    return this.voucher(agentId, { cumulative: lane.verifier.state.cumulative, seq: lane.verifier.state.seq });
  }

  /** Signs and sends a voucher on the lane with `agentId`; any amount and seq the test wants. */
  async voucher(
    agentId: string,
    { cumulative, seq, send = true, fee = 0 }: { cumulative: number; seq?: number; send?: boolean; fee?: number },
  ): Promise<VoucherMessage> {
    const lane = this.lane(agentId);
    const leaves = lane.leaves.length ? lane.leaves : [new Uint8Array(32)];
    const receiptsRoot = merkleRoot(leaves);
    const terms = {
      agent: lane.quote.payout,
      cumulative: BigInt(cumulative),
      receiptsRoot: toHex(receiptsRoot),
      feeCumulative: BigInt(fee),
    };
    // A fee above the escrow's cap cannot go through signVoucher (it refuses one): sign the typed data directly.
    const sig =
      BigInt(fee) * 10n > BigInt(cumulative)
        ? this.options.wallet.signingKey.sign(
            ethers.TypedDataEncoder.hash(voucherTypedData(this.options.domain).domain, voucherTypedData(this.options.domain).types, {
              ...terms,
              agent: ethers.getAddress(terms.agent),
            }),
          ).serialized
        : await signVoucher(this.options.wallet, this.options.domain, terms);
    const message: VoucherMessage = {
      v: PROTOCOL_VERSION,
      kind: 'voucher',
      payer: this.payer,
      agent: lane.quote.payout,
      cumulative,
      receiptsRoot,
      ...(fee !== 0 ? { feeCumulative: fee } : {}),
      sig: fromHex(sig),
      ...(seq !== undefined ? { seq } : {}),
    };
    if (send) {
      if (cumulative > lane.paid) {
        lane.paid = cumulative;
        lane.leaves = [];
      }
      lane.lastVoucher = message;
      this.client.publish(topics.agentVoucher(agentId, this.clientId), encodeMessage(message), { qos: 1 });
    }
    return message;
  }

  /** Publishes bytes as this client (for messages a test makes by hand). */
  publishRaw(topic: string, payload: Uint8Array): void {
    this.connection.client.publish(topic, Buffer.from(payload), { qos: 1 });
  }

  /** Asks `agentId` for the lane's receipts after `afterSeq`; resolves with the batches that came within `waitMs`. */
  async resync(agentId: string, afterSeq: number, waitMs = 1_000): Promise<ReceiptBatch[]> {
    const before = this.batches.length;
    this.client.publish(
      topics.agentVoucher(agentId, this.clientId),
      encodeMessage({ v: PROTOCOL_VERSION, kind: 'resync', payer: this.payer, afterSeq }),
      { qos: 1 },
    );
    await new Promise((r) => setTimeout(r, waitMs));
    return this.batches.slice(before).filter((b) => b.agent === agentId);
  }

  /** Lanes as the SDK's `lanes()` shows them. */
  lanes() {
    return this.lanesView();
  }

  lanesView() {
    return [...this.payerLanes.values()].map((l) => ({
      agentId: l.agentId,
      payer: this.payer,
      payout: l.quote.payout,
      receipts: l.verifier.state.seq,
      owedMicros: l.verifier.state.cumulative,
      paidMicros: l.paid,
      refused: l.refused,
    }));
  }
}

/** Mints `amount` to `wallet` and funds its own lane to `payout` with it, on the escrow at `escrow`. */
export async function fundOwnLane(
  wallet: ethers.Wallet | ethers.HDNodeWallet,
  escrow: string,
  payout: string,
  amount: bigint,
): Promise<void> {
  const client = await EscrowClient.connect({ runner: wallet, escrow });
  await client.mint(wallet.address, amount);
  await client.fund(wallet.address, payout, amount);
}

/** The escrow's settle entry for a voucher an agent holds (`agent.payments.lanes()[i].voucher`), paying `payout`. */
export function settleEntry(
  payout: string,
  voucher: { cumulative: number | string; feeCumulative: number | string; receiptsRoot: string; sig: string },
) {
  return {
    voucher: {
      agent: payout,
      cumulative: BigInt(voucher.cumulative),
      feeCumulative: BigInt(voucher.feeCumulative),
      receiptsRoot: voucher.receiptsRoot,
    },
    signature: voucher.sig,
  };
}

/**
 * A fresh agent key registered in the escrow's payout registry for `payoutWallet`'s address, as an operator
 * registers an agent before payers will pay it (docs/settlement.md, "The payout registry").
 */
export async function registeredAgent(
  deployment: EscrowDomain,
  payoutWallet: ethers.Wallet | ethers.HDNodeWallet,
): Promise<{ identity: Identity; payout: string; domain: EscrowDomain }> {
  const domain = { chainId: deployment.chainId, escrow: deployment.escrow };
  const payout = payoutWallet.address.toLowerCase();
  const identity = generateIdentity('agent');
  const client = await EscrowClient.connect({ runner: payoutWallet, escrow: deployment.escrow });
  await client.registerAgent(identity.publicKey, signBytes(identity, agentBindingMessage(domain, payout)));
  return { identity, payout, domain };
}

/** The next transaction from `from` in the local chain's pool that is not one of `seen`. */
export async function pendingFrom(
  provider: ethers.JsonRpcProvider,
  from: string,
  seen: string[] = [],
  timeoutMs = 10_000,
): Promise<ethers.TransactionResponse> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const block = (await provider.send('eth_getBlockByNumber', ['pending', true])) as {
      transactions: { hash: string; from: string }[];
    };
    const tx = block.transactions.find((x) => x.from.toLowerCase() === from.toLowerCase() && !seen.includes(x.hash));
    if (tx) return (await provider.getTransaction(tx.hash))!;
    if (Date.now() > deadline) assert.fail(`no new pending transaction from ${from} within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** What a test may set on a paid agent beyond its chain: payment options, and its key, data folder and payout. */
export type PaidAgentExtra = Partial<AgentPaymentOptions> & { identity?: Identity; dataDir?: string; payout?: string };

/** An in-process agent that takes payment on `chain` (polling the escrow every 100 ms), with a random payout unless given. */
export async function paidAgentFor(
  t: TestContext,
  brokerUrl: string,
  chain: { provider: ethers.Provider; domain: EscrowDomain },
  extra: PaidAgentExtra = {},
) {
  const payout = extra.payout ?? ethers.Wallet.createRandom().address.toLowerCase();
  const { identity, ...payment } = extra;
  const agent = await agentFor(t, {
    brokerUrl,
    ...(identity ? { identity } : {}),
    payment: {
      payout,
      domain: chain.domain,
      dataDir: extra.dataDir ?? (await tempDir(t)),
      provider: chain.provider,
      fundsPollMs: 100,
      ...payment,
    },
  });
  return { agent, payout };
}
