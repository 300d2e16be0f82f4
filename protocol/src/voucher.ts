/**
 * Payment vouchers: the EIP-712 promise of money on one (signer, agent) lane, exactly as the escrow
 * contract (`contracts/sol/MeshEscrow.sol`, v2) checks it on-chain (docs/settlement.md, "The escrow contract").
 *
 *   Voucher(address agent,uint96 cumulative,uint64 feeCumulative,bytes32 receiptsRoot)
 *   domain { name: "EdgeMesh", version: "2", chainId, verifyingContract: escrow }
 *
 * `agent` is the agent's payout address: the payee is fixed inside the signed voucher, so anyone may
 * relay it. The signer (the app's voucher key, the lane's "payer" in messages) is never written in the
 * voucher; the escrow recovers it from the signature. The lane's money belongs to its owner, another key.
 * `cumulative` is the running total owed to the agent on the lane, `feeCumulative` the running total of
 * relayer fees (micro-dollars, the stablecoin's 6 decimals). Vouchers do not expire: settling pays
 * `cumulative - settled` as far as the lane holds, then the fee increase to whoever sends the transaction,
 * so an old voucher pays nothing twice and a short lane leaves the rest claimable by the same voucher.
 *
 * Packed form for `settle(agent, packed)`: each voucher is 117 bytes,
 *   cumulative (12) | feeCumulative (8) | receiptsRoot (32) | r (32) | s (32) | v (1)
 * with v = 27 or 28. The escrow refuses a high-s signature (the malleable twin of a valid one).
 */
import { MeshError } from './errors.ts';
import { keccak256Bytes } from './keccak.ts';

export const VOUCHER_DOMAIN_NAME = 'EdgeMesh';
export const VOUCHER_DOMAIN_VERSION = '2';
/** Bytes per voucher in the packed form taken by `settle`. */
export const PACKED_VOUCHER_BYTES = 117;
/** The widest amount a lane holds or a voucher names (micro-dollars). */
export const MAX_UINT96 = (1n << 96n) - 1n;
/** The widest relayer fee total a voucher names (micro-dollars). */
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
  /** Running total owed to the agent on the lane, in the token's smallest unit (micro-dollars); at most 2^96 - 1. */
  cumulative: bigint;
  /**
   * Running total of the fees the signer pays whoever settles its vouchers (micro-dollars, at most 2^64 - 1).
   * Absent means 0.
   */
  feeCumulative?: bigint;
  /** 32-byte hex: Merkle root (or single hash) of the receipts this voucher pays for. */
  receiptsRoot: string;
}

export interface SignedVoucher {
  voucher: Voucher;
  /** 65-byte hex signature r | s | v, low-s. */
  signature: string;
}

/** Why the escrow skipped a voucher in a batch (the `reason` of `SettleSkipped`). */
export const SKIP_REASONS = {
  /** No signer can be recovered. */
  1: 'BAD_SIGNATURE',
  /** A high-s signature: the malleable twin of a valid one. */
  2: 'MALLEABLE_SIGNATURE',
  /** Neither total is above what the lane has settled: a replay or an older voucher. */
  3: 'STALE',
  /** The voucher is owed something but the lane holds nothing (also: a voucher for another chain or escrow). */
  4: 'UNFUNDED',
  /** `feeCumulative` is more than a tenth of `cumulative` (FEE_CAP_DIVISOR). */
  5: 'FEE_TOO_HIGH',
} as const;

/** A voucher's fee total may be at most cumulative / FEE_CAP_DIVISOR; the escrow skips one above it. */
export const FEE_CAP_DIVISOR = 10n;
export type SkipReasonCode = keyof typeof SKIP_REASONS;
export type SkipReason = (typeof SKIP_REASONS)[SkipReasonCode];

export function skipReasonName(code: number | bigint): SkipReason | 'UNKNOWN' {
  return SKIP_REASONS[Number(code) as SkipReasonCode] ?? 'UNKNOWN';
}

/** One field of an EIP-712 struct type, as wallets and ethers' `signTypedData` take it. */
export interface TypedDataField {
  name: string;
  type: string;
}

/** The EIP-712 domain as wallets take it. */
export interface TypedDataDomain {
  name: string;
  version: string;
  chainId: bigint;
  verifyingContract: string;
}

/**
 * Anything that signs EIP-712 typed data and says its address: an ethers v6 `Wallet` or JSON-RPC
 * signer fits as it is, and so does a hardware wallet bridge. The SDK needs no EVM library of its own.
 */
export interface TypedDataSigner {
  getAddress(): Promise<string>;
  signTypedData(domain: TypedDataDomain, types: Record<string, TypedDataField[]>, value: Record<string, unknown>): Promise<string>;
  /**
   * A key held in process (an ethers Wallet's): `signVoucher` signs the voucher's EIP-712 digest with it
   * directly. Same signature as `signTypedData` (RFC 6979 is deterministic; a test compares them), without
   * rebuilding the typed-data encoder per voucher: about half the time of a voucher's signature.
   */
  signingKey?: { sign(digest: string): { serialized: string } };
}

const VOUCHER_FIELDS: readonly TypedDataField[] = [
  { name: 'agent', type: 'address' },
  { name: 'cumulative', type: 'uint96' },
  { name: 'feeCumulative', type: 'uint64' },
  { name: 'receiptsRoot', type: 'bytes32' },
];

export function voucherTypedData(domain: EscrowDomain): { domain: TypedDataDomain; types: Record<string, TypedDataField[]> } {
  return {
    domain: {
      name: VOUCHER_DOMAIN_NAME,
      version: VOUCHER_DOMAIN_VERSION,
      chainId: domain.chainId,
      verifyingContract: checksumAddress(domain.escrow),
    },
    types: { Voucher: VOUCHER_FIELDS.map((f) => ({ ...f })) },
  };
}

// ---- hex, addresses and ABI words (EIP-55, Solidity ABI encoding), with the protocol's own keccak ----

const HEX = /^0x[0-9a-fA-F]*$/;
const utf8 = new TextEncoder();

function hexBytes(hex: string, what: string, length?: number): Uint8Array {
  if (typeof hex !== 'string' || !HEX.test(hex) || hex.length % 2 !== 0)
    throw new MeshError('MESH_VOUCHER_INVALID', `${what} is not 0x-prefixed hex`);
  const bytes = Uint8Array.from(Buffer.from(hex.slice(2), 'hex'));
  if (length !== undefined && bytes.length !== length)
    throw new MeshError('MESH_VOUCHER_INVALID', `${what} must be ${length} bytes, got ${bytes.length}`);
  return bytes;
}

const hexOf = (bytes: Uint8Array): string => `0x${Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex')}`;

function bigintBytes(value: bigint, width: number): Uint8Array {
  const out = new Uint8Array(width);
  let v = value;
  for (let i = width - 1; i >= 0; i--) {
    out[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  return out;
}

const bytesBigint = (bytes: Uint8Array): bigint => (bytes.length === 0 ? 0n : BigInt(hexOf(bytes)));

/** True for a 20-byte hex address whose letters are all one case or carry a valid EIP-55 checksum. */
export function isAddress(value: unknown): value is string {
  if (typeof value !== 'string' || !/^0x[0-9a-fA-F]{40}$/.test(value)) return false;
  const body = value.slice(2);
  if (body === body.toLowerCase() || body === body.toUpperCase()) return true;
  return checksumOf(body.toLowerCase()) === value;
}

function checksumOf(lowerBody: string): string {
  const hash = keccak256Bytes(utf8.encode(lowerBody));
  let out = '0x';
  for (let i = 0; i < 40; i++) {
    const nibble = (hash[i >> 1]! >> (i % 2 === 0 ? 4 : 0)) & 0xf;
    out += nibble >= 8 ? lowerBody[i]!.toUpperCase() : lowerBody[i]!;
  }
  return out;
}

/** The EIP-55 checksummed form of an address; throws MESH_VOUCHER_INVALID for anything else or a wrong checksum. */
export function checksumAddress(address: string): string {
  if (!isAddress(address)) throw new MeshError('MESH_VOUCHER_INVALID', `not an address (or a wrong EIP-55 checksum): ${String(address)}`);
  return checksumOf(address.slice(2).toLowerCase());
}

const addressWord = (address: string): Uint8Array => {
  const word = new Uint8Array(32);
  word.set(hexBytes(checksumAddress(address), 'address', 20), 12);
  return word;
};

const concat = (...parts: Uint8Array[]): Uint8Array => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
};

const keccakText = (text: string): Uint8Array => keccak256Bytes(utf8.encode(text));

const DOMAIN_TYPEHASH = keccakText('EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)');
const VOUCHER_TYPEHASH = keccakText(`Voucher(${VOUCHER_FIELDS.map((f) => `${f.type} ${f.name}`).join(',')})`);

/** Throws MESH_VOUCHER_INVALID unless the voucher's fields fit the on-chain types. */
export function checkVoucher(v: Voucher): void {
  if (!isAddress(v.agent) || BigInt(v.agent) === 0n)
    throw new MeshError('MESH_VOUCHER_INVALID', `voucher agent is not an address: ${String(v.agent)}`);
  if (typeof v.cumulative !== 'bigint' || v.cumulative < 0n || v.cumulative > MAX_UINT96)
    throw new MeshError('MESH_VOUCHER_INVALID', 'voucher cumulative must be a uint96 bigint (micro-dollars)');
  const fee = v.feeCumulative ?? 0n;
  if (typeof fee !== 'bigint' || fee < 0n || fee > MAX_UINT64)
    throw new MeshError('MESH_VOUCHER_INVALID', 'voucher feeCumulative must be a uint64 bigint (micro-dollars)');
  if (fee * FEE_CAP_DIVISOR > v.cumulative)
    throw new MeshError('MESH_VOUCHER_INVALID', `voucher feeCumulative may be at most cumulative / ${FEE_CAP_DIVISOR}`);
  hexBytes(v.receiptsRoot, 'voucher receiptsRoot', 32);
}

function message(v: Voucher): Record<string, unknown> {
  checkVoucher(v);
  return {
    agent: checksumAddress(v.agent),
    cumulative: v.cumulative,
    feeCumulative: v.feeCumulative ?? 0n,
    receiptsRoot: v.receiptsRoot,
  };
}

/** The EIP-712 domain separator of an escrow. */
export function voucherDomainSeparator(domain: EscrowDomain): Uint8Array {
  return keccak256Bytes(
    concat(
      DOMAIN_TYPEHASH,
      keccakText(VOUCHER_DOMAIN_NAME),
      keccakText(VOUCHER_DOMAIN_VERSION),
      bigintBytes(domain.chainId, 32),
      addressWord(domain.escrow),
    ),
  );
}

/** The EIP-712 digest the voucher key signs and the escrow recovers from (0x-hex). */
export function voucherDigest(domain: EscrowDomain, v: Voucher): string {
  checkVoucher(v);
  const structHash = keccak256Bytes(
    concat(
      VOUCHER_TYPEHASH,
      addressWord(v.agent),
      bigintBytes(v.cumulative, 32),
      bigintBytes(v.feeCumulative ?? 0n, 32),
      hexBytes(v.receiptsRoot, 'receiptsRoot', 32),
    ),
  );
  return hexOf(keccak256Bytes(concat(Uint8Array.of(0x19, 0x01), voucherDomainSeparator(domain), structHash)));
}

/** Signs with any EIP-712 signer (an ethers Wallet, a JSON-RPC account); returns 65-byte hex r | s | v, low-s, v ∈ {27, 28}. */
export async function signVoucher(signer: TypedDataSigner, domain: EscrowDomain, v: Voucher): Promise<string> {
  if (typeof signer.signingKey?.sign === 'function') return lowS(signer.signingKey.sign(voucherDigest(domain, v)).serialized);
  const td = voucherTypedData(domain);
  return lowS(await signer.signTypedData(td.domain, td.types, message(v)));
}

/** A remote signer may answer high-s or v ∈ {0, 1}: normalise to the one form the escrow takes (low-s, v ∈ {27, 28}). */
function lowS(raw: string): string {
  const { r, s, v } = splitVoucherSignature(raw, { allowHighS: true });
  const sn = BigInt(s);
  if (sn <= SECP256K1_N / 2n) return hexOf(concat(hexBytes(r, 'r', 32), hexBytes(s, 's', 32), Uint8Array.of(v)));
  return hexOf(concat(hexBytes(r, 'r', 32), bigintBytes(SECP256K1_N - sn, 32), Uint8Array.of(v === 27 ? 28 : 27)));
}

/**
 * A 65-byte signature as (r, s, v) with v ∈ {27, 28}. Throws MESH_VOUCHER_INVALID when malformed,
 * and for a high-s signature (the malleable twin the escrow refuses) unless `allowHighS`.
 */
export function splitVoucherSignature(sig: string, { allowHighS = false } = {}): { r: string; s: string; v: 27 | 28 } {
  const bytes = hexBytes(sig, 'voucher signature', 65);
  let v = bytes[64]!;
  if (v < 27) v += 27;
  if (v !== 27 && v !== 28) throw new MeshError('MESH_VOUCHER_INVALID', `voucher signature has a bad v (${bytes[64]})`);
  const s = bytes.subarray(32, 64);
  if (!allowHighS && bytesBigint(s) > SECP256K1_N / 2n) throw new MeshError('MESH_VOUCHER_INVALID', 'high-s (malleable) voucher signature');
  return { r: hexOf(bytes.subarray(0, 32)), s: hexOf(s), v };
}

/** Packs signed vouchers, all for the same agent, into the bytes `settle(agent, packed)` takes. */
export function packVouchers(entries: readonly SignedVoucher[]): string {
  if (entries.length === 0) return '0x';
  const agent = checksumAddress(entries[0]!.voucher.agent);
  const out = new Uint8Array(entries.length * PACKED_VOUCHER_BYTES);
  entries.forEach(({ voucher, signature }, i) => {
    checkVoucher(voucher);
    if (checksumAddress(voucher.agent) !== agent)
      throw new MeshError('MESH_VOUCHER_INVALID', `packVouchers: entry ${i} is for ${voucher.agent}, not ${agent}`);
    const { r, s, v } = splitVoucherSignature(signature, { allowHighS: true });
    const off = i * PACKED_VOUCHER_BYTES;
    out.set(bigintBytes(voucher.cumulative, 12), off);
    out.set(bigintBytes(voucher.feeCumulative ?? 0n, 8), off + 12);
    out.set(hexBytes(voucher.receiptsRoot, 'receiptsRoot', 32), off + 20);
    out.set(hexBytes(r, 'r', 32), off + 52);
    out.set(hexBytes(s, 's', 32), off + 84);
    out[off + 116] = v;
  });
  return hexOf(out);
}

/** The inverse of packVouchers (for relayers, logs and tests). */
export function unpackVouchers(agent: string, packed: string): SignedVoucher[] {
  const bytes = hexBytes(packed, 'packed vouchers');
  if (bytes.length % PACKED_VOUCHER_BYTES !== 0)
    throw new MeshError('MESH_VOUCHER_INVALID', `packed vouchers must be a multiple of ${PACKED_VOUCHER_BYTES} bytes`);
  const out: SignedVoucher[] = [];
  for (let off = 0; off < bytes.length; off += PACKED_VOUCHER_BYTES) {
    out.push({
      voucher: {
        agent: checksumAddress(agent),
        cumulative: bytesBigint(bytes.subarray(off, off + 12)),
        feeCumulative: bytesBigint(bytes.subarray(off + 12, off + 20)),
        receiptsRoot: hexOf(bytes.subarray(off + 20, off + 52)),
      },
      signature: hexOf(bytes.subarray(off + 52, off + PACKED_VOUCHER_BYTES)),
    });
  }
  return out;
}

/** The lane id the escrow keys storage by: keccak256(abi.encode(signer, agent)), the signer being the voucher key. */
export function laneId(signer: string, agent: string): string {
  return hexOf(keccak256Bytes(concat(addressWord(signer), addressWord(agent))));
}

// ---- owner consent: the voucher key lets a funding key open and own its lanes ----

const LANE_OWNER_TYPEHASH = keccakText('LaneOwner(address owner)');

/**
 * The EIP-712 digest of `LaneOwner(address owner)` (same domain as the vouchers). A signer's signature of it
 * lets `owner` open any of the signer's lanes that nobody owns yet, and so own it: fund it, withdraw from it,
 * hand it on. It is needed because a lane's first funder becomes its owner, and without the signer's consent
 * a stranger could open the lane first (docs/settlement.md, "Who owns a lane").
 */
export function ownerConsentDigest(domain: EscrowDomain, owner: string): string {
  const structHash = keccak256Bytes(concat(LANE_OWNER_TYPEHASH, addressWord(owner)));
  return hexOf(keccak256Bytes(concat(Uint8Array.of(0x19, 0x01), voucherDomainSeparator(domain), structHash)));
}

/** Signs an owner consent with the voucher key; returns 65-byte hex r | s | v, low-s. */
export async function signOwnerConsent(signer: TypedDataSigner, domain: EscrowDomain, owner: string): Promise<string> {
  const td = voucherTypedData(domain);
  return lowS(
    await signer.signTypedData(td.domain, { LaneOwner: [{ name: 'owner', type: 'address' }] }, { owner: checksumAddress(owner) }),
  );
}

/**
 * The 32 bytes an agent's Ed25519 device key signs to bind itself to a payout address:
 * keccak256(abi.encodePacked("MESH_BIND", chainId, escrow, payout)). The escrow stores and emits the
 * signature with `registerAgent`; clients verify it off-chain.
 */
export function agentBindingMessage(domain: EscrowDomain, payout: string): Uint8Array {
  return keccak256Bytes(
    concat(
      utf8.encode('MESH_BIND'),
      bigintBytes(domain.chainId, 32),
      hexBytes(checksumAddress(domain.escrow), 'escrow', 20),
      hexBytes(checksumAddress(payout), 'payout', 20),
    ),
  );
}

// ---- lane grants: the payer lets one mesh client spend on its lane with one agent ----

const LANE_GRANT_FIELDS: readonly TypedDataField[] = [
  { name: 'agent', type: 'address' },
  { name: 'client', type: 'bytes32' },
  { name: 'issuedAt', type: 'uint64' },
];
const LANE_GRANT_TYPEHASH = keccakText(`LaneGrant(${LANE_GRANT_FIELDS.map((f) => `${f.type} ${f.name}`).join(',')})`);

/** What a payer grants: its lane with `agent` (a payout address) may be spent on by the mesh client `client`. */
export interface LaneGrantTerms {
  agent: string;
  /** A mesh id (`app-…`, `router-…`, `bridge-…`). */
  client: string;
  /** Epoch ms; the newest grant wins. */
  issuedAt: number;
}

/** keccak256 of the client's mesh id: the `client` field of the signed grant. */
export function laneGrantClientHash(client: string): string {
  return hexOf(keccakText(client));
}

function laneGrantMessage(g: LaneGrantTerms): Record<string, unknown> {
  if (!Number.isSafeInteger(g.issuedAt) || g.issuedAt < 0)
    throw new MeshError('MESH_VOUCHER_INVALID', 'lane grant issuedAt must be epoch ms');
  return { agent: checksumAddress(g.agent), client: laneGrantClientHash(g.client), issuedAt: BigInt(g.issuedAt) };
}

/** The EIP-712 digest of a lane grant (same domain as the vouchers). */
export function laneGrantDigest(domain: EscrowDomain, g: LaneGrantTerms): string {
  laneGrantMessage(g);
  const structHash = keccak256Bytes(
    concat(LANE_GRANT_TYPEHASH, addressWord(g.agent), keccakText(g.client), bigintBytes(BigInt(g.issuedAt), 32)),
  );
  return hexOf(keccak256Bytes(concat(Uint8Array.of(0x19, 0x01), voucherDomainSeparator(domain), structHash)));
}

/** Signs a lane grant with the payer's voucher key; returns 65-byte hex r | s | v, low-s. */
export async function signLaneGrant(signer: TypedDataSigner, domain: EscrowDomain, g: LaneGrantTerms): Promise<string> {
  const td = voucherTypedData(domain);
  return lowS(await signer.signTypedData(td.domain, { LaneGrant: LANE_GRANT_FIELDS.map((f) => ({ ...f })) }, laneGrantMessage(g)));
}
