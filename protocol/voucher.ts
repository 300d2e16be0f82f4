/**
 * Payment vouchers: the payer's EIP-712 promise of money for one (payer, agent) lane, exactly as
 * `contracts/MeshEscrow.sol` checks it on-chain.
 *
 *   Voucher(address agent,uint128 cumulative,bytes32 receiptsRoot,uint64 expiry)
 *   domain { name: "EdgeMesh", version: "1", chainId, verifyingContract: escrow }
 *
 * `agent` is the agent's payout address: the payee is fixed inside the signed voucher, so anyone may
 * relay it. The payer is never written in the voucher; the escrow recovers it from the signature.
 * `cumulative` is the running total owed on the lane (micro-dollars, the stablecoin's 6 decimals);
 * settling pays `cumulative - settled`, so an old voucher pays nothing twice.
 *
 * Packed form for `settle(agent, packed)`: each voucher is 121 bytes,
 *   cumulative (16) | expiry (8) | receiptsRoot (32) | r (32) | s (32) | v (1)
 * with v = 27 or 28. The escrow refuses a high-s signature (the malleable twin of a valid one).
 */
import { ethers } from 'ethers';

export const VOUCHER_DOMAIN_NAME = 'EdgeMesh';
export const VOUCHER_DOMAIN_VERSION = '1';
/** Bytes per voucher in the packed form taken by `settle`. */
export const PACKED_VOUCHER_BYTES = 121;
export const MAX_UINT128 = (1n << 128n) - 1n;
export const MAX_UINT64 = (1n << 64n) - 1n;
/** secp256k1 group order; a signature's s must be ≤ N/2 (EIP-2). */
export const SECP256K1_N = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n;

export interface EscrowDomain {
  chainId: bigint;
  /** The escrow's address: the EIP-712 verifyingContract. */
  escrow: string;
}

export interface Voucher {
  /** The agent's payout address. */
  agent: string;
  /** Running total owed on the lane, in the token's smallest unit (micro-dollars). */
  cumulative: bigint;
  /** 32-byte hex: Merkle root (or single hash) of the receipts this voucher pays for. */
  receiptsRoot: string;
  /** Unix seconds after which the escrow skips the voucher. */
  expiry: bigint;
}

export interface SignedVoucher {
  voucher: Voucher;
  /** 65-byte hex signature r | s | v, low-s. */
  signature: string;
}

/** Why the escrow skipped a voucher in a batch (the `reason` of `SettleSkipped`). */
export const SKIP_REASONS = {
  1: 'BAD_SIGNATURE',
  2: 'MALLEABLE_SIGNATURE',
  3: 'EXPIRED',
  4: 'STALE',
  5: 'OVERSPEND',
} as const;
export type SkipReasonCode = keyof typeof SKIP_REASONS;
export type SkipReason = (typeof SKIP_REASONS)[SkipReasonCode];

export function skipReasonName(code: number | bigint): SkipReason | 'UNKNOWN' {
  return SKIP_REASONS[Number(code) as SkipReasonCode] ?? 'UNKNOWN';
}

const VOUCHER_TYPES: Record<string, ethers.TypedDataField[]> = {
  Voucher: [
    { name: 'agent', type: 'address' },
    { name: 'cumulative', type: 'uint128' },
    { name: 'receiptsRoot', type: 'bytes32' },
    { name: 'expiry', type: 'uint64' },
  ],
};

export function voucherTypedData(domain: EscrowDomain): { domain: ethers.TypedDataDomain; types: Record<string, ethers.TypedDataField[]> } {
  return {
    domain: {
      name: VOUCHER_DOMAIN_NAME,
      version: VOUCHER_DOMAIN_VERSION,
      chainId: domain.chainId,
      verifyingContract: ethers.getAddress(domain.escrow),
    },
    types: { Voucher: VOUCHER_TYPES.Voucher!.map((f) => ({ ...f })) },
  };
}

/** Throws a RangeError unless the voucher's fields fit the on-chain types. */
export function checkVoucher(v: Voucher): void {
  if (!ethers.isAddress(v.agent) || BigInt(v.agent) === 0n) throw new RangeError(`voucher agent is not an address: ${String(v.agent)}`);
  if (typeof v.cumulative !== 'bigint' || v.cumulative < 0n || v.cumulative > MAX_UINT128) throw new RangeError('voucher cumulative must be a uint128 bigint');
  if (typeof v.expiry !== 'bigint' || v.expiry < 0n || v.expiry > MAX_UINT64) throw new RangeError('voucher expiry must be a uint64 bigint (unix seconds)');
  if (!ethers.isHexString(v.receiptsRoot, 32)) throw new RangeError('voucher receiptsRoot must be 32-byte hex');
}

function message(v: Voucher): Record<string, unknown> {
  checkVoucher(v);
  return { agent: ethers.getAddress(v.agent), cumulative: v.cumulative, receiptsRoot: v.receiptsRoot, expiry: v.expiry };
}

/** The EIP-712 digest the payer signs and the escrow recovers from. */
export function voucherDigest(domain: EscrowDomain, v: Voucher): string {
  const td = voucherTypedData(domain);
  return ethers.TypedDataEncoder.hash(td.domain, td.types, message(v));
}

/** Signs with any ethers signer (Wallet, JSON-RPC account); returns 65-byte hex r | s | v, low-s. */
export async function signVoucher(signer: ethers.Signer, domain: EscrowDomain, v: Voucher): Promise<string> {
  const td = voucherTypedData(domain);
  const raw = await signer.signTypedData(td.domain, td.types, message(v));
  // ethers normalises to low-s and v ∈ {27, 28}; a remote signer might not, so normalise again.
  return ethers.Signature.from(raw).serialized;
}

/** The payer's address, or throws if the signature is malformed or high-s. */
export function recoverVoucherSigner(domain: EscrowDomain, v: Voucher, sig: string): string {
  const { r, s, v: recovery } = splitSignature(sig);
  if (BigInt(s) > SECP256K1_N / 2n) throw new RangeError('high-s (malleable) voucher signature');
  return ethers.recoverAddress(voucherDigest(domain, v), { r, s, v: recovery });
}

function splitSignature(sig: string): { r: string; s: string; v: number } {
  if (!ethers.isHexString(sig, 65)) throw new RangeError('voucher signature must be 65-byte hex');
  const bytes = ethers.getBytes(sig);
  let v = bytes[64]!;
  if (v < 27) v += 27;
  if (v !== 27 && v !== 28) throw new RangeError(`voucher signature has a bad v (${bytes[64]})`);
  return { r: ethers.hexlify(bytes.subarray(0, 32)), s: ethers.hexlify(bytes.subarray(32, 64)), v };
}

/** Packs signed vouchers, all for the same agent, into the bytes `settle(agent, packed)` takes. */
export function packVouchers(entries: readonly SignedVoucher[]): string {
  if (entries.length === 0) return '0x';
  const agent = ethers.getAddress(entries[0]!.voucher.agent);
  const out = new Uint8Array(entries.length * PACKED_VOUCHER_BYTES);
  entries.forEach(({ voucher, signature }, i) => {
    checkVoucher(voucher);
    if (ethers.getAddress(voucher.agent) !== agent) throw new RangeError(`packVouchers: entry ${i} is for ${voucher.agent}, not ${agent}`);
    const { r, s, v } = splitSignature(signature);
    const off = i * PACKED_VOUCHER_BYTES;
    out.set(ethers.getBytes(ethers.toBeHex(voucher.cumulative, 16)), off);
    out.set(ethers.getBytes(ethers.toBeHex(voucher.expiry, 8)), off + 16);
    out.set(ethers.getBytes(voucher.receiptsRoot), off + 24);
    out.set(ethers.getBytes(r), off + 56);
    out.set(ethers.getBytes(s), off + 88);
    out[off + 120] = v;
  });
  return ethers.hexlify(out);
}

/** The inverse of packVouchers (for relayers, logs and tests). */
export function unpackVouchers(agent: string, packed: string): SignedVoucher[] {
  const bytes = ethers.getBytes(packed);
  if (bytes.length % PACKED_VOUCHER_BYTES !== 0) throw new RangeError(`packed vouchers must be a multiple of ${PACKED_VOUCHER_BYTES} bytes`);
  const out: SignedVoucher[] = [];
  for (let off = 0; off < bytes.length; off += PACKED_VOUCHER_BYTES) {
    out.push({
      voucher: {
        agent: ethers.getAddress(agent),
        cumulative: ethers.toBigInt(bytes.subarray(off, off + 16)),
        expiry: ethers.toBigInt(bytes.subarray(off + 16, off + 24)),
        receiptsRoot: ethers.hexlify(bytes.subarray(off + 24, off + 56)),
      },
      signature: ethers.hexlify(bytes.subarray(off + 56, off + 121)),
    });
  }
  return out;
}

/** The lane id the escrow keys storage by: keccak256(abi.encode(payer, agent)). */
export function laneId(payer: string, agent: string): string {
  return ethers.keccak256(ethers.AbiCoder.defaultAbiCoder().encode(['address', 'address'], [payer, agent]));
}

/**
 * The 32 bytes an agent's Ed25519 device key signs to bind itself to a payout address:
 * keccak256(abi.encodePacked("MESH_BIND", chainId, escrow, payout)). The escrow stores and emits the
 * signature with `registerAgent`; clients verify it off-chain.
 */
export function agentBindingMessage(domain: EscrowDomain, payout: string): Uint8Array {
  return ethers.getBytes(
    ethers.solidityPackedKeccak256(['string', 'uint256', 'address', 'address'], ['MESH_BIND', domain.chainId, ethers.getAddress(domain.escrow), ethers.getAddress(payout)]),
  );
}

/** MeshEscrow's external functions and events (ethers human-readable ABI). */
export const ESCROW_ABI: string[] = [
  'constructor(address token, uint64 thawSeconds)',
  'function token() view returns (address)',
  'function thawSeconds() view returns (uint64)',
  'function laneId(address payer, address agent) pure returns (bytes32)',
  'function laneOf(address payer, address agent) view returns (uint128 remaining, uint128 settled, uint64 thawEnd)',
  'function agentKeyOf(address payout) view returns (bytes32)',
  'function domainSeparator() view returns (bytes32)',
  'function voucherDigest(address agent, uint128 cumulative, bytes32 receiptsRoot, uint64 expiry) view returns (bytes32)',
  'function eip712Domain() view returns (bytes1 fields, string name, string version, uint256 chainId, address verifyingContract, bytes32 salt, uint256[] extensions)',
  'function fundLane(address agent, uint128 amount)',
  'function fundLaneWithPermit(address agent, uint128 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)',
  'function requestWithdraw(address agent)',
  'function cancelWithdraw(address agent)',
  'function withdraw(address agent) returns (uint128 amount)',
  'function settle(address agent, bytes packed) returns (uint256 paid)',
  'function settleMany(address[] agents, bytes[] packed) returns (uint256 paid)',
  'function registerAgent(bytes32 edPubKey, bytes bindingSig)',
  'event LaneFunded(address indexed payer, address indexed agent, uint128 amount, uint128 remaining)',
  'event WithdrawRequested(address indexed payer, address indexed agent, uint128 remaining, uint64 thawEnd)',
  'event WithdrawCancelled(address indexed payer, address indexed agent)',
  'event Withdrawn(address indexed payer, address indexed agent, uint128 amount)',
  'event Settled(address indexed payer, address indexed agent, uint128 cumulative, uint128 delta, bytes32 receiptsRoot)',
  'event SettleSkipped(address indexed payer, address indexed agent, uint8 reason, uint128 cumulative)',
  'event AgentRegistered(address indexed payout, bytes32 indexed edPubKey, bytes bindingSig)',
  'error ZeroAddress()',
  'error ZeroAmount()',
  'error BadPacking(uint256 length)',
  'error LengthMismatch()',
  'error NoWithdrawPending()',
  'error WithdrawAlreadyPending(uint64 thawEnd)',
  'error StillThawing(uint64 thawEnd)',
  'error BadAgentKey()',
  'error ReentrancyGuardReentrantCall()',
  'error SafeERC20FailedOperation(address token)',
  'error ERC20InsufficientBalance(address sender, uint256 balance, uint256 needed)',
  'error ERC20InsufficientAllowance(address spender, uint256 allowance, uint256 needed)',
];

/** The ERC-20 (+ EIP-2612 permit, + the mock's open mint) calls the mesh uses. */
export const ERC20_ABI: string[] = [
  'function name() view returns (string)',
  'function symbol() view returns (string)',
  'function decimals() view returns (uint8)',
  'function totalSupply() view returns (uint256)',
  'function balanceOf(address owner) view returns (uint256)',
  'function allowance(address owner, address spender) view returns (uint256)',
  'function approve(address spender, uint256 amount) returns (bool)',
  'function transfer(address to, uint256 amount) returns (bool)',
  'function transferFrom(address from, address to, uint256 amount) returns (bool)',
  'function nonces(address owner) view returns (uint256)',
  'function DOMAIN_SEPARATOR() view returns (bytes32)',
  'function permit(address owner, address spender, uint256 value, uint256 deadline, uint8 v, bytes32 r, bytes32 s)',
  'function mint(address to, uint256 amount)',
  'event Transfer(address indexed from, address indexed to, uint256 value)',
  'event Approval(address indexed owner, address indexed spender, uint256 value)',
  'error ERC20InsufficientBalance(address sender, uint256 balance, uint256 needed)',
  'error ERC20InsufficientAllowance(address spender, uint256 allowance, uint256 needed)',
  'error ERC2612ExpiredSignature(uint256 deadline)',
  'error ERC2612InvalidSigner(address signer, address owner)',
];
