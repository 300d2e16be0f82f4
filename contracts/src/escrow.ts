/**
 * A small typed client for the MeshEscrow contract (v2) over ethers v6: everything an agent, SDK, relayer
 * or the CLI needs to open and fund lanes, settle vouchers, take money back, claim deferred payouts and
 * read balances. Works against any EVM JSON-RPC endpoint given the escrow's address (the token is read
 * from the escrow). The contract's rules: docs/settlement.md, "The escrow contract".
 *
 * Transactions need a Signer as runner; reads work with a Provider. One client sends its transactions
 * one after another; wrap the signer in ethers.NonceManager to send from several clients at once (it picks
 * every nonce itself, so `replaces` cannot reuse one through it).
 *
 * A transaction is waited for `receiptTimeoutMs` (default 3 minutes), not forever: a node may drop or evict
 * it, and a caller waiting on it would wait for good. Past the timeout the call fails with
 * MESH_CHAIN_UNREACHABLE, details.reason 'receipt-timeout', details.nonce and details.hashes; the transaction
 * may still be mined. Passing those as `replaces` to the next `settle` sends it on the same nonce (with a
 * higher fee while the old one is still pending, at the going fee if it was dropped), so at most one of them
 * is ever mined, and waits for whichever is.
 */

import {
  type EscrowDomain,
  MAX_UINT96,
  MeshError,
  type MeshErrorCode,
  packVouchers,
  type SignedVoucher,
  type SkipReason,
  signOwnerConsent,
  signVoucher,
  skipReasonName,
  type Voucher,
} from '@edge-mesh/protocol';
import { ethers } from 'ethers';
import { ERC20_ABI, ESCROW_ABI } from './abi.ts';

/*
 * Errors are MeshErrors from the mesh's one registry (protocol/errors.ts, docs/errors.md):
 *   MESH_CHAIN_UNREACHABLE  the JSON-RPC endpoint could not be reached, timed out or answered badly;
 *   MESH_CHAIN_REVERTED     the chain refused the transaction or call; details.reason is the decoded revert
 *                           (e.g. `StillThawing(…)`) or the node's own reason, details.action the client method;
 *   MESH_BAD_REQUEST        an argument is malformed (address, amount, voucher, key); details.field names it;
 *   MESH_CONFIG             the address holds no MeshEscrow, or a transaction was asked of a read-only client.
 */

/** A lane (signer, agent) as `laneOf` reads it: everything an agent needs to decide credit. */
export interface Lane {
  /** Funds left on the lane (token units, micro-dollars). */
  remaining: bigint;
  /** What the agent has been paid on the lane: the highest voucher total settled so far. */
  settled: bigint;
  /** Relayer fees paid from the lane so far. */
  feeSettled: bigint;
  /** The key that funded the lane and alone may withdraw; the zero address while nobody has opened it. */
  owner: string;
  /** The amount of the pending withdrawal request (0 when none). */
  withdrawAmount: bigint;
  /** Unix seconds from which the pending withdrawal may run; 0 when none is pending. */
  thawEnd: bigint;
  /** Unix seconds at which the pending request lapses unless run; 0 when none is pending. */
  lapseAt: bigint;
}

/**
 * What a pending withdrawal may still take from the lane at chain time `nowS`: min(requested, remaining)
 * while the request has not lapsed, else 0. Money beyond it stays for the agents.
 */
export function withdrawalAtRisk(lane: Lane, nowS: bigint): bigint {
  if (lane.thawEnd === 0n || nowS >= lane.lapseAt) return 0n;
  // bigint: no Math.min.
  if (lane.withdrawAmount > lane.remaining) return lane.remaining;
  return lane.withdrawAmount;
}

export interface TxOutcome {
  hash: string;
  blockNumber: number;
  gasUsed: bigint;
}

/** A voucher that paid (`Settled`, or `SettledPartial` when the lane ran short). */
export interface SettledEvent {
  /** The voucher key recovered from the signature. */
  signer: string;
  agent: string;
  cumulative: bigint;
  /** Paid to the agent by this voucher. */
  paid: bigint;
  /** Paid to the transaction's sender (the relayer) by this voucher. */
  fee: bigint;
  receiptsRoot: string;
  /** The lane ran short: `unpaid` (the agent's part) is left for the same voucher after a top-up. */
  partial: boolean;
  unpaid: bigint;
}

export interface SkippedEvent {
  /** The zero address when the signature could not be recovered. */
  signer: string;
  agent: string;
  reasonCode: number;
  reason: SkipReason | 'UNKNOWN';
  cumulative: bigint;
}

/** A payout whose token transfer failed: it waits in `claimable(payee)`. */
export interface DeferredPayout {
  payee: string;
  amount: bigint;
}

export interface SettleOutcome extends TxOutcome {
  /** Total paid to agents by this transaction (deferred payouts included: they are owed to the agent now). */
  paid: bigint;
  /** Total relayer fees paid to the sender. */
  fees: bigint;
  settled: SettledEvent[];
  skipped: SkippedEvent[];
  deferred: DeferredPayout[];
}

/** A transaction from this client's account that was not mined within `receiptTimeoutMs` (see `settle`'s `replaces`). */
export interface Unmined {
  nonce: number;
  /** Every transaction sent with that nonce so far: any one of them may still be mined. */
  hashes: string[];
}

/** How long a transaction is waited for by default: ample for a healthy chain (seconds on L2s, ~12 s blocks on L1). */
export const DEFAULT_RECEIPT_TIMEOUT_MS = 180_000;

export interface AgentBatch {
  agent: string;
  entries: readonly SignedVoucher[];
}

export interface EscrowClientOptions {
  /** A Signer (for transactions) or a Provider (read only). */
  runner: ethers.Signer | ethers.Provider;
  escrow: string;
  /** Skips the escrow.token() lookup; must match it. */
  token?: string;
  /** How long a sent transaction is waited for before the call fails with reason 'receipt-timeout' (default 3 minutes). */
  receiptTimeoutMs?: number;
}

function isSigner(runner: ethers.Signer | ethers.Provider): runner is ethers.Signer {
  return typeof (runner as ethers.Signer).signTypedData === 'function';
}

function larger(a: bigint, b: bigint): bigint {
  if (a > b) return a;
  return b;
}

function badArgument(field: string, message: string): MeshError {
  return new MeshError('MESH_BAD_REQUEST', message, { details: { field } });
}

function hexArgument(value: string, what: string): string {
  if (!ethers.isHexString(value)) throw badArgument(what, `${what} is not 0x-hex`);
  return value;
}

function address(value: string, what: string): string {
  if (!ethers.isAddress(value)) throw badArgument(what, `${what} is not an EVM address: ${JSON.stringify(value)}`);
  return ethers.getAddress(value);
}

function amount(value: bigint, what: string): bigint {
  if (typeof value !== 'bigint' || value <= 0n || value > MAX_UINT96) throw badArgument(what, `${what} must be a positive uint96 bigint`);
  return value;
}

const escrowInterface = new ethers.Interface(ESCROW_ABI);
const erc20Interface = new ethers.Interface(ERC20_ABI);

/**
 * Turns an ethers error from `action` (a client method, a log scan) into a MeshError: MESH_CHAIN_REVERTED with the
 * decoded revert reason where there is one, MESH_CHAIN_UNREACHABLE, or MESH_BAD_REQUEST. A MeshError passes unchanged.
 */
export function toChainError(err: unknown, action: string): MeshError {
  if (err instanceof MeshError) return err;
  const e = err as {
    code?: string;
    revert?: { name: string; args: unknown[] } | null;
    data?: string;
    shortMessage?: string;
    message?: string;
  };
  if (
    e.code === 'CALL_EXCEPTION' ||
    e.code === 'INSUFFICIENT_FUNDS' ||
    e.code === 'NONCE_EXPIRED' ||
    e.code === 'REPLACEMENT_UNDERPRICED'
  ) {
    let reason = e.revert ? `${e.revert.name}(${e.revert.args.map(String).join(', ')})` : undefined;
    if (!reason && typeof e.data === 'string' && e.data.length >= 10) {
      const parsed = escrowInterface.parseError(e.data) ?? erc20Interface.parseError(e.data);
      if (parsed) reason = `${parsed.name}(${parsed.args.map(String).join(', ')})`;
    }
    const why = reason ?? e.shortMessage ?? e.message ?? String(err);
    return new MeshError('MESH_CHAIN_REVERTED', `${action}: ${why}`, {
      cause: err,
      details: { action, reason: why, ...(reason ? { revert: reason } : {}), ethersCode: e.code },
    });
  }
  if (
    e.code === 'NETWORK_ERROR' ||
    e.code === 'TIMEOUT' ||
    e.code === 'SERVER_ERROR' ||
    e.code === 'ECONNREFUSED' ||
    e.code === 'UNKNOWN_ERROR'
  ) {
    return chainError('MESH_CHAIN_UNREACHABLE', err, action);
  }
  if (e.code === 'INVALID_ARGUMENT' || err instanceof RangeError) return chainError('MESH_BAD_REQUEST', err, action);
  return chainError('MESH_CHAIN_UNREACHABLE', err, action);
}

function chainError(code: MeshErrorCode, err: unknown, action: string): MeshError {
  const e = err as { code?: string; shortMessage?: string; message?: string };
  return new MeshError(code, `${action}: ${e.shortMessage ?? e.message ?? String(err)}`, {
    cause: err,
    details: { action, ...(typeof e.code === 'string' ? { ethersCode: e.code } : {}) },
  });
}

export class EscrowClient {
  readonly escrow: string;
  readonly token: string;
  readonly domain: EscrowDomain;
  readonly runner: ethers.Signer | ethers.Provider;
  private readonly escrowContract: ethers.Contract;
  private readonly tokenContract: ethers.Contract;

  private constructor(
    runner: ethers.Signer | ethers.Provider,
    escrow: string,
    token: string,
    chainId: bigint,
    private readonly receiptTimeoutMs: number,
  ) {
    this.runner = runner;
    this.escrow = escrow;
    this.token = token;
    this.domain = { chainId, escrow };
    this.escrowContract = new ethers.Contract(escrow, ESCROW_ABI, runner);
    this.tokenContract = new ethers.Contract(token, ERC20_ABI, runner);
  }

  /** Connects to a deployed escrow: checks there is code, reads the chain id and the token. */
  static async connect({ runner, escrow, token, receiptTimeoutMs }: EscrowClientOptions): Promise<EscrowClient> {
    const escrowAddress = address(escrow, 'escrow');
    const provider = isSigner(runner) ? runner.provider : runner;
    if (!provider) throw new MeshError('MESH_CONFIG', 'the signer is not connected to a provider', { details: { field: 'runner' } });
    let chainId: bigint;
    let code: string;
    try {
      [{ chainId }, code] = await Promise.all([provider.getNetwork(), provider.getCode(escrowAddress)]);
    } catch (err) {
      throw toChainError(err, 'connect');
    }
    if (code === '0x') {
      throw new MeshError('MESH_CONFIG', `no contract at ${escrowAddress} on chain ${chainId}: not a MeshEscrow`, {
        details: { escrow: escrowAddress, chainId: chainId.toString() },
      });
    }
    let tokenAddress: string;
    try {
      tokenAddress = ethers.getAddress((await new ethers.Contract(escrowAddress, ESCROW_ABI, provider).getFunction('token')()) as string);
    } catch (err) {
      throw new MeshError('MESH_CONFIG', `${escrowAddress} does not answer token(): not a MeshEscrow?`, {
        cause: err,
        details: { escrow: escrowAddress, chainId: chainId.toString() },
      });
    }
    if (token !== undefined && address(token, 'token') !== tokenAddress) {
      throw new MeshError('MESH_CONFIG', `escrow ${escrowAddress} holds token ${tokenAddress}, not ${token}`, {
        details: { escrow: escrowAddress, token: tokenAddress },
      });
    }
    return new EscrowClient(runner, escrowAddress, tokenAddress, chainId, receiptTimeoutMs ?? DEFAULT_RECEIPT_TIMEOUT_MS);
  }

  private signer(): ethers.Signer {
    if (!isSigner(this.runner)) {
      throw new MeshError('MESH_CONFIG', 'this escrow client is read-only (built with a provider): a transaction needs a signer', {
        details: { reason: 'no-signer' },
      });
    }
    return this.runner;
  }

  /** The signer's address (throws MESH_CONFIG when read-only). */
  async address(): Promise<string> {
    return ethers.getAddress(await this.signer().getAddress());
  }

  /**
   * Sends one transaction and waits at most `receiptTimeoutMs` for it (or for any of `replaces.hashes`, which
   * share its nonce) to be mined. `call` gets the overrides that put it on the replaced nonce; `estimate`, the
   * transaction's gas as the node estimates it, is needed to replace one that is still pending.
   */
  private async send(
    action: string,
    call: (overrides: ethers.Overrides) => Promise<ethers.ContractTransactionResponse>,
    {
      onSent,
      replaces,
      estimate,
    }: { onSent?: (hash: string, nonce: number) => void | Promise<void>; replaces?: Unmined; estimate?: () => Promise<bigint> } = {},
  ): Promise<ethers.TransactionReceipt> {
    const signer = this.signer();
    let tx: ethers.ContractTransactionResponse;
    let hashes: string[];
    try {
      const replacing = replaces ? await this.replacement(signer, replaces) : { overrides: {}, hashes: [] };
      if (replacing.pendingGas !== undefined && estimate) {
        // The node estimates against its pending state, where the transaction replaced has run and what it
        // settles looks settled (a cheap skip): the replacement may have to pay it all, so it gets that gas too.
        replacing.overrides.gasLimit = (await estimate()) + replacing.pendingGas;
      }
      tx = await call(replacing.overrides);
      hashes = [...replacing.hashes, tx.hash];
      if (onSent) await onSent(tx.hash, tx.nonce);
    } catch (err) {
      throw toChainError(err, action);
    }
    const receipt = await this.mined(signer.provider!, hashes, Date.now() + this.receiptTimeoutMs);
    if (!receipt) {
      throw new MeshError(
        'MESH_CHAIN_UNREACHABLE',
        `${action}: transaction ${tx.hash} (nonce ${tx.nonce}) was not mined within ${this.receiptTimeoutMs} ms; it may still be: pass details.nonce and details.hashes as \`replaces\` to send the next one in its place`,
        { details: { action, reason: 'receipt-timeout', tx: tx.hash, nonce: tx.nonce, hashes } },
      );
    }
    if (receipt.status !== 1) {
      throw new MeshError('MESH_CHAIN_REVERTED', `${action}: transaction ${receipt.hash} reverted`, {
        details: { action, reason: 'transaction execution reverted', ethersCode: 'CALL_EXCEPTION', tx: receipt.hash },
      });
    }
    return receipt;
  }

  /**
   * The overrides that send the next transaction on the nonce of `replaces`: with fees above the pending one's
   * (nodes take a replacement only for at least 10 % more), or as a fresh send when no node knows it any more
   * (dropped). Once the nonce is used (one of them, or another transaction, was mined) nothing is replaced.
   */
  private async replacement(
    signer: ethers.Signer,
    replaces: Unmined,
  ): Promise<{ overrides: ethers.Overrides; hashes: string[]; pendingGas?: bigint }> {
    const provider = signer.provider!;
    if ((await provider.getTransactionCount(await signer.getAddress(), 'latest')) > replaces.nonce) return { overrides: {}, hashes: [] };
    let pending: ethers.TransactionResponse | null = null;
    for (const hash of [...replaces.hashes].reverse()) {
      pending = await provider.getTransaction(hash);
      if (pending) break;
    }
    if (!pending) return { overrides: { nonce: replaces.nonce }, hashes: replaces.hashes };
    const fee = await provider.getFeeData();
    // The going price, or 1/8 above the pending one's, whichever is more (bigint: no Math.max).
    const more = (old: bigint | null, now: bigint | null) => larger(((old ?? 0n) * 9n) / 8n + 1n, now ?? 0n);
    const market = fee.maxFeePerGas ?? fee.gasPrice;
    let overrides: ethers.Overrides;
    let price: bigint;
    if (pending.maxFeePerGas !== null) {
      const maxPriorityFeePerGas = more(pending.maxPriorityFeePerGas, fee.maxPriorityFeePerGas);
      price = larger(more(pending.maxFeePerGas, fee.maxFeePerGas), maxPriorityFeePerGas);
      overrides = { nonce: replaces.nonce, maxPriorityFeePerGas, maxFeePerGas: price };
    } else {
      price = more(pending.gasPrice, fee.gasPrice);
      overrides = { nonce: replaces.nonce, gasPrice: price };
    }
    // A transaction priced well above the market and still not mined is not stuck on its price: bidding on
    // would only multiply the fee at every timeout. Wait for it instead.
    if (market !== null && price > market * 4n) {
      throw new MeshError('MESH_CHAIN_UNREACHABLE', `transaction ${pending.hash} is pending at over 4x the going fee: not replaced`, {
        details: { reason: 'still-pending', tx: pending.hash, nonce: replaces.nonce },
      });
    }
    return { overrides, hashes: replaces.hashes, pendingGas: pending.gasLimit };
  }

  /** The receipt of whichever of `hashes` is mined first, or null at `deadline`. A read that fails is retried until then. */
  private async mined(provider: ethers.Provider, hashes: readonly string[], deadline: number): Promise<ethers.TransactionReceipt | null> {
    const pollMs = Math.min(1_000, (provider as { pollingInterval?: number }).pollingInterval ?? 1_000);
    for (;;) {
      for (const hash of hashes) {
        const receipt = await provider.getTransactionReceipt(hash).catch(() => null);
        if (receipt) return receipt;
      }
      const left = deadline - Date.now();
      if (left <= 0) return null;
      await new Promise((r) => setTimeout(r, Math.min(pollMs, left)));
    }
  }

  private static outcome(receipt: ethers.TransactionReceipt): TxOutcome {
    return { hash: receipt.hash, blockNumber: receipt.blockNumber, gasUsed: receipt.gasUsed };
  }

  // ------------------------------------------------------------------ reads

  async laneOf(signer: string, agent: string): Promise<Lane> {
    try {
      const [remaining, settled, feeSettled, owner, withdrawAmount, thawEnd, lapseAt] = (await this.escrowContract.getFunction('laneOf')(
        address(signer, 'signer'),
        address(agent, 'agent'),
      )) as [bigint, bigint, bigint, string, bigint, bigint, bigint];
      return { remaining, settled, feeSettled, owner, withdrawAmount, thawEnd, lapseAt };
    } catch (err) {
      throw toChainError(err, 'laneOf');
    }
  }

  /** Payouts to `payee` whose transfer failed and that `claim(payee)` would pay. */
  async claimable(payee: string): Promise<bigint> {
    try {
      return (await this.escrowContract.getFunction('claimable')(address(payee, 'payee'))) as bigint;
    } catch (err) {
      throw toChainError(err, 'claimable');
    }
  }

  async tokenBalance(owner: string): Promise<bigint> {
    try {
      return (await this.tokenContract.getFunction('balanceOf')(address(owner, 'owner'))) as bigint;
    } catch (err) {
      throw toChainError(err, 'tokenBalance');
    }
  }

  async agentKeyOf(payout: string): Promise<string> {
    try {
      return (await this.escrowContract.getFunction('agentKeyOf')(address(payout, 'payout'))) as string;
    } catch (err) {
      throw toChainError(err, 'agentKeyOf');
    }
  }

  async thawSeconds(): Promise<bigint> {
    try {
      return (await this.escrowContract.getFunction('thawSeconds')()) as bigint;
    } catch (err) {
      throw toChainError(err, 'thawSeconds');
    }
  }

  async withdrawWindowSeconds(): Promise<bigint> {
    try {
      return (await this.escrowContract.getFunction('withdrawWindowSeconds')()) as bigint;
    } catch (err) {
      throw toChainError(err, 'withdrawWindowSeconds');
    }
  }

  // ---------------------------------------------------------------- funding

  /** Mints test tokens (MockUSDC only: a real stablecoin refuses). */
  async mint(to: string, value: bigint): Promise<TxOutcome> {
    const r = await this.send('mint', () => this.tokenContract.getFunction('mint')(address(to, 'to'), amount(value, 'amount')));
    return EscrowClient.outcome(r);
  }

  /**
   * Funds the lane (signer, agent) as its owner, approving the escrow first if the allowance is short. On a
   * lane nobody owns yet this client's account becomes the owner: it must be the signer itself, or pass the
   * signer's `consent` (`signOwnerConsent(owner)` signed by the voucher key). On a lane someone else owns
   * the chain refuses (`NotLaneOwner`); `topUp` gives to such a lane instead.
   */
  async fund(
    signer: string,
    agent: string,
    value: bigint,
    { approveMax = false, consent = '0x' }: { approveMax?: boolean; consent?: string } = {},
  ): Promise<TxOutcome> {
    const signerAddress = address(signer, 'signer');
    const agentAddress = address(agent, 'agent');
    amount(value, 'amount');
    const consentHex = hexArgument(consent, 'consent');
    await this.approveFor('fund', value, approveMax);
    return EscrowClient.outcome(
      await this.send('fundLane', () => this.escrowContract.getFunction('fundLane')(signerAddress, agentAddress, value, consentHex)),
    );
  }

  /** Adds money to a lane someone has opened; gives this account no rights over it. */
  async topUp(signer: string, agent: string, value: bigint, { approveMax = false }: { approveMax?: boolean } = {}): Promise<TxOutcome> {
    const signerAddress = address(signer, 'signer');
    const agentAddress = address(agent, 'agent');
    amount(value, 'amount');
    await this.approveFor('topUp', value, approveMax);
    return EscrowClient.outcome(
      await this.send('topUpLane', () => this.escrowContract.getFunction('topUpLane')(signerAddress, agentAddress, value)),
    );
  }

  /** Checks the balance (for a clear error) and approves the escrow when the allowance is short. */
  private async approveFor(action: string, value: bigint, approveMax: boolean): Promise<void> {
    const owner = await this.address();
    const [balance, allowance] = await Promise.all([
      this.tokenBalance(owner),
      (this.tokenContract.getFunction('allowance')(owner, this.escrow) as Promise<bigint>).catch((err: unknown) => {
        throw toChainError(err, 'allowance');
      }),
    ]);
    if (balance < value) {
      // Checked here rather than left to the token's revert, whose reason names no amounts.
      throw new MeshError('MESH_CHAIN_REVERTED', `${action}: ${owner} holds ${balance} token units, needs ${value}`, {
        details: { action, reason: 'insufficient-balance', balance: balance.toString(), needed: value.toString() },
      });
    }
    if (allowance < value) {
      await this.send('approve', () => this.tokenContract.getFunction('approve')(this.escrow, approveMax ? ethers.MaxUint256 : value));
    }
  }

  /** `fund` in one transaction with an EIP-2612 permit signed by this client's account (no approve). */
  async fundWithPermit(
    signer: string,
    agent: string,
    value: bigint,
    { deadline, permitVersion = '1', consent = '0x' }: { deadline?: bigint; permitVersion?: string; consent?: string } = {},
  ): Promise<TxOutcome> {
    const signerAddress = address(signer, 'signer');
    const agentAddress = address(agent, 'agent');
    amount(value, 'amount');
    const consentHex = hexArgument(consent, 'consent');
    const wallet = this.signer();
    const owner = await this.address();
    let name: string;
    let nonce: bigint;
    try {
      [name, nonce] = (await Promise.all([this.tokenContract.getFunction('name')(), this.tokenContract.getFunction('nonces')(owner)])) as [
        string,
        bigint,
      ];
    } catch (err) {
      throw toChainError(err, 'permit: token name/nonces');
    }
    // The chain's clock, not ours: a test chain may run ahead of the wall clock.
    const until = deadline ?? BigInt(((await wallet.provider?.getBlock('latest'))?.timestamp ?? Math.floor(Date.now() / 1000)) + 3_600);
    const sig = ethers.Signature.from(
      await wallet.signTypedData(
        { name, version: permitVersion, chainId: this.domain.chainId, verifyingContract: this.token },
        {
          Permit: [
            { name: 'owner', type: 'address' },
            { name: 'spender', type: 'address' },
            { name: 'value', type: 'uint256' },
            { name: 'nonce', type: 'uint256' },
            { name: 'deadline', type: 'uint256' },
          ],
        },
        { owner, spender: this.escrow, value, nonce, deadline: until },
      ),
    );
    const r = await this.send('fundLaneWithPermit', () =>
      this.escrowContract.getFunction('fundLaneWithPermit')(signerAddress, agentAddress, value, consentHex, until, sig.v, sig.r, sig.s),
    );
    return EscrowClient.outcome(r);
  }

  /** The owner hands the lane (its money and any pending withdrawal request) to `newOwner`. */
  async transferLaneOwnership(signer: string, agent: string, newOwner: string): Promise<TxOutcome> {
    const args = [address(signer, 'signer'), address(agent, 'agent'), address(newOwner, 'newOwner')] as const;
    return EscrowClient.outcome(
      await this.send('transferLaneOwnership', () => this.escrowContract.getFunction('transferLaneOwnership')(...args)),
    );
  }

  // ------------------------------------------------------------- vouchers

  /** Signs a voucher for this escrow's domain with the client's account as the voucher key. */
  async signVoucher(voucher: Voucher): Promise<SignedVoucher> {
    return { voucher, signature: await signVoucher(this.signer(), this.domain, voucher) };
  }

  /** With the client's account as the voucher key: lets `owner` open (and so own) this key's lanes. */
  async signOwnerConsent(owner: string): Promise<string> {
    return signOwnerConsent(this.signer(), this.domain, address(owner, 'owner'));
  }

  /** What a mined settle transaction paid and skipped, read from its events. */
  outcomeOf(receipt: ethers.TransactionReceipt): SettleOutcome {
    return this.settleOutcome(receipt);
  }

  private settleOutcome(receipt: ethers.TransactionReceipt): SettleOutcome {
    const settled: SettledEvent[] = [];
    const skipped: SkippedEvent[] = [];
    const deferred: DeferredPayout[] = [];
    for (const log of receipt.logs) {
      if (log.address.toLowerCase() !== this.escrow.toLowerCase()) continue;
      const parsed = escrowInterface.parseLog(log);
      if (parsed?.name === 'Settled') {
        const [signer, agent, cumulative, paid, fee, receiptsRoot] = parsed.args as unknown as [
          string,
          string,
          bigint,
          bigint,
          bigint,
          string,
        ];
        settled.push({ signer, agent, cumulative, paid, fee, receiptsRoot, partial: false, unpaid: 0n });
      } else if (parsed?.name === 'SettledPartial') {
        const [signer, agent, cumulative, paid, fee, unpaid, receiptsRoot] = parsed.args as unknown as [
          string,
          string,
          bigint,
          bigint,
          bigint,
          bigint,
          string,
        ];
        settled.push({ signer, agent, cumulative, paid, fee, receiptsRoot, partial: true, unpaid });
      } else if (parsed?.name === 'SettleSkipped') {
        const [signer, agent, reasonCode, cumulative] = parsed.args as unknown as [string, string, bigint, bigint];
        skipped.push({ signer, agent, reasonCode: Number(reasonCode), reason: skipReasonName(reasonCode), cumulative });
      } else if (parsed?.name === 'PayoutDeferred') {
        const [payee, amount] = parsed.args as unknown as [string, bigint];
        deferred.push({ payee, amount });
      }
    }
    return {
      ...EscrowClient.outcome(receipt),
      paid: settled.reduce((a, s) => a + s.paid, 0n),
      fees: settled.reduce((a, s) => a + s.fee, 0n),
      settled,
      skipped,
      deferred,
    };
  }

  /**
   * Settles signed vouchers (any payers) for one agent; skipped vouchers are reported, not thrown.
   * `onSent` runs with the transaction hash and nonce once it is sent, before it is mined (a relayer records it).
   * `replaces`: an earlier transaction of this account that timed out (the error's details.nonce and
   * details.hashes): this one takes its nonce while it is unused, and the outcome is then that of whichever
   * of them is mined (the escrow skips a voucher already settled, so nothing is paid twice).
   */
  async settle(
    agent: string,
    entries: readonly SignedVoucher[],
    { onSent, replaces }: { onSent?: (hash: string, nonce: number) => void | Promise<void>; replaces?: Unmined } = {},
  ): Promise<SettleOutcome> {
    const agentAddress = address(agent, 'agent');
    let packed: string;
    try {
      packed = packVouchers(entries);
    } catch (err) {
      throw toChainError(err, 'settle');
    }
    const settle = this.escrowContract.getFunction('settle');
    return this.settleOutcome(
      await this.send('settle', (overrides) => settle(agentAddress, packed, overrides), {
        ...(onSent ? { onSent } : {}),
        ...(replaces ? { replaces, estimate: () => settle.estimateGas(agentAddress, packed) } : {}),
      }),
    );
  }

  /** Relayer mode: several agents in one transaction. */
  async settleMany(batches: readonly AgentBatch[]): Promise<SettleOutcome> {
    let agents: string[];
    let packed: string[];
    try {
      agents = batches.map((b) => address(b.agent, 'agent'));
      packed = batches.map((b) => packVouchers(b.entries));
    } catch (err) {
      throw toChainError(err, 'settleMany');
    }
    return this.settleOutcome(await this.send('settleMany', () => this.escrowContract.getFunction('settleMany')(agents, packed)));
  }

  /** Pays `payee` what failed to reach it earlier (anyone may send this; the money goes to the payee). */
  async claim(payee: string): Promise<TxOutcome & { amount: bigint }> {
    const r = await this.send('claim', () => this.escrowContract.getFunction('claim')(address(payee, 'payee')));
    const ev = r.logs.map((l) => escrowInterface.parseLog(l)).find((p) => p?.name === 'Claimed');
    return { ...EscrowClient.outcome(r), amount: (ev?.args[1] as bigint | undefined) ?? 0n };
  }

  // ------------------------------------------------------------ owner exit

  /**
   * As the lane's owner: starts the thaw for taking `value` back (MAX_UINT96: whatever is left then). It may
   * run from `thawEnd` until `lapseAt`; a new request replaces a pending one and restarts the thaw.
   */
  async requestWithdraw(signer: string, agent: string, value: bigint): Promise<TxOutcome & { thawEnd: bigint; lapseAt: bigint }> {
    const args = [address(signer, 'signer'), address(agent, 'agent'), amount(value, 'amount')] as const;
    const r = await this.send('requestWithdraw', () => this.escrowContract.getFunction('requestWithdraw')(...args));
    const ev = r.logs.map((l) => escrowInterface.parseLog(l)).find((p) => p?.name === 'WithdrawRequested');
    return {
      ...EscrowClient.outcome(r),
      thawEnd: (ev?.args[3] as bigint | undefined) ?? 0n,
      lapseAt: (ev?.args[4] as bigint | undefined) ?? 0n,
    };
  }

  async cancelWithdraw(signer: string, agent: string): Promise<TxOutcome> {
    const args = [address(signer, 'signer'), address(agent, 'agent')] as const;
    return EscrowClient.outcome(await this.send('cancelWithdraw', () => this.escrowContract.getFunction('cancelWithdraw')(...args)));
  }

  /** As the lane's owner, between the thaw's end and the lapse: takes min(requested, remaining). */
  async withdraw(signer: string, agent: string): Promise<TxOutcome & { amount: bigint }> {
    const args = [address(signer, 'signer'), address(agent, 'agent')] as const;
    const r = await this.send('withdraw', () => this.escrowContract.getFunction('withdraw')(...args));
    const ev = r.logs.map((l) => escrowInterface.parseLog(l)).find((p) => p?.name === 'Withdrawn');
    return { ...EscrowClient.outcome(r), amount: (ev?.args[3] as bigint | undefined) ?? 0n };
  }

  // --------------------------------------------------------------- registry

  /** Binds the signer (payout address) to an Ed25519 device key; see agentBindingMessage() in voucher.ts. */
  async registerAgent(edPubKey: string | Uint8Array, bindingSig: string | Uint8Array): Promise<TxOutcome> {
    const key = ethers.hexlify(edPubKey);
    const sig = ethers.hexlify(bindingSig);
    if (ethers.dataLength(key) !== 32) throw badArgument('edPubKey', 'registerAgent: the Ed25519 public key must be 32 bytes');
    if (ethers.dataLength(sig) !== 64) throw badArgument('bindingSig', 'registerAgent: the binding signature must be 64 bytes');
    return EscrowClient.outcome(await this.send('registerAgent', () => this.escrowContract.getFunction('registerAgent')(key, sig)));
  }
}

/** Shorthand for EscrowClient.connect. */
export function connectEscrow(options: EscrowClientOptions): Promise<EscrowClient> {
  return EscrowClient.connect(options);
}
