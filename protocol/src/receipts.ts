/**
 * Usage receipts: the agent's Ed25519-signed evidence of each request it took on for a paying lane,
 * the agent's signed price list (quote), the price rule, Merkle roots over receipt leaves, and the
 * payer-side checks (`LaneVerifier`) that run before a voucher is signed.
 *
 * A lane is (payer EVM address, agent payout EVM address). On a lane, receipts form a hash chain:
 * `seq` rises by exactly one and `prevReceipt` is the leaf hash of the one before (zero for seq 1).
 *
 * Leaf hash = keccak256(abi.encode(v, chainId, escrow, payer, agentKey, seq, requestId, modelHash,
 * inputHash, outputHash, status, unitsUsed, price, cumulative, startedAt, finishedAt, prevReceipt))
 * with the Solidity types of RECEIPT_ABI_TYPES, so the same leaf works in on-chain Merkle proofs.
 * Every field is static, so the encoding is 17 big-endian 32-byte words: it is written straight into
 * one reused buffer (a test checks it against ethers' AbiCoder). The agent signs the 32-byte leaf.
 *
 * Price rule (micro-dollars), from the model's entry in the agent's signed quote:
 *   ok         base + unit × units
 *   partial    unit × units                 (a progress receipt of a long job)
 *   failed     0
 *   timeout    0
 *   cancelled  max(minCharge, unit × units)  (cancelled by the payer)
 *
 * Progress receipts: a long job may emit several receipts with the same requestId. Every one but the
 * last has status partial, and `unitsUsed` is the job's running total, strictly increasing. Each
 * receipt's `price` is the rule for its status and running total, minus what the earlier receipts of
 * that request already charged (never below 0), so a job that dies after progress has been paid for
 * exactly the progress acknowledged, and a failed or timed-out ending adds 0. A one-shot inference
 * has one receipt with unitsUsed 1 (0 when it never ran). A payer pays a partial receipt only when it
 * came with a progress message (schemas.ts, `progress`) that delivered the outputs of the units it
 * charges, below the units the request asked for (`ReceiptContext.rows`, `ReceiptExpectation.units`).
 */
import { createHash } from 'node:crypto';
import { decodeCbor, encodeCbor, requestIdHex } from './envelope.ts';
import { MeshError } from './errors.ts';
import { deriveId, type Identity, signBytes, verifyBytes } from './identity.ts';
import { keccak256Bytes } from './keccak.ts';
import type { SignedQuote, SignedReceipt } from './schemas.ts';
import { checkSignedQuote, checkSignedReceipt } from './validators.generated.ts';

export const RECEIPT_VERSION = 1;

export const RECEIPT_STATUS = { ok: 0, partial: 1, failed: 2, timeout: 3, cancelled: 4 } as const;
/**
 * The most bytes one signed receipt takes in a message (its fields are all bounded: fixed-size hashes, keys and
 * addresses, integers of at most 9 bytes in CBOR); what a sender budgets per receipt it adds to a message, so
 * that the message stays under the receiver's size cap (test/protocol.test.ts checks the largest receipt).
 */
export const MAX_SIGNED_RECEIPT_BYTES = 640;
export type ReceiptStatusName = keyof typeof RECEIPT_STATUS;
export type ReceiptStatus = (typeof RECEIPT_STATUS)[ReceiptStatusName];
const STATUS_NAMES = Object.keys(RECEIPT_STATUS) as ReceiptStatusName[];
export const receiptStatusName = (status: number): ReceiptStatusName | undefined => STATUS_NAMES[status];

/** Solidity types of the leaf encoding, in field order. */
export const RECEIPT_ABI_TYPES = [
  'uint8',
  'uint64',
  'address',
  'address',
  'bytes32',
  'uint64',
  'bytes16',
  'bytes32',
  'bytes32',
  'bytes32',
  'uint8',
  'uint32',
  'uint64',
  'uint128',
  'uint64',
  'uint64',
  'bytes32',
] as const;

export type { SignedReceipt } from './schemas.ts';
/** A receipt before the agent signs it. */
export type Receipt = Omit<SignedReceipt, 'sig'>;

export const ZERO_HASH: Uint8Array = new Uint8Array(32);

/** Whether a decoded value has the shape of a signed receipt (no signature or chain checks). */
export function isSignedReceipt(value: unknown): value is SignedReceipt {
  return checkSignedReceipt.Check(value);
}

// ---------------------------------------------------------------------------------------------
// Leaf encoding and hash

const ABI_BYTES = 17 * 32;
const abiBuffer = new Uint8Array(ABI_BYTES);

/** Writes an unsigned integer (a safe JS integer) right-aligned into the 32-byte word at `word`. */
function putUint(buf: Uint8Array, word: number, value: number): void {
  const end = word * 32 + 32;
  let lo = value % 0x100000000;
  let hi = Math.floor(value / 0x100000000);
  for (let i = 0; i < 4; i++) {
    buf[end - 1 - i] = lo & 0xff;
    lo >>>= 8;
  }
  for (let i = 4; i < 8; i++) {
    buf[end - 1 - i] = hi & 0xff;
    hi >>>= 8;
  }
}

const HEX_VALUE = new Int8Array(128).fill(-1);
for (let i = 0; i < 16; i++) {
  HEX_VALUE['0123456789abcdef'.charCodeAt(i)] = i;
  HEX_VALUE['0123456789ABCDEF'.charCodeAt(i)] = i;
}

/** Writes a 0x-prefixed 20-byte address right-aligned into a word. */
function putAddress(buf: Uint8Array, word: number, address: string): void {
  if (address.length !== 42) throw new MeshError('MESH_RECEIPT_INVALID', `not an address: ${address}`);
  const base = word * 32 + 12;
  for (let i = 0; i < 20; i++) {
    const h = HEX_VALUE[address.charCodeAt(2 + 2 * i)]!;
    const l = HEX_VALUE[address.charCodeAt(3 + 2 * i)]!;
    if (h < 0 || l < 0) throw new MeshError('MESH_RECEIPT_INVALID', `not an address: ${address}`);
    buf[base + i] = (h << 4) | l;
  }
}

function putBytes(buf: Uint8Array, word: number, bytes: Uint8Array, size: number): void {
  if (bytes.byteLength !== size) throw new MeshError('MESH_RECEIPT_INVALID', `a bytes${size} field has ${bytes.byteLength} bytes`);
  buf.set(bytes, word * 32);
}

/**
 * abi.encode of the receipt fields (544 bytes). Returns a view of a buffer that the next call
 * overwrites: copy it to keep it.
 */
export function encodeReceiptAbi(r: Receipt): Uint8Array {
  const b = abiBuffer;
  b.fill(0);
  putUint(b, 0, r.v);
  putUint(b, 1, r.chainId);
  putAddress(b, 2, r.escrow);
  putAddress(b, 3, r.payer);
  putBytes(b, 4, r.agentKey, 32);
  putUint(b, 5, r.seq);
  putBytes(b, 6, r.requestId, 16);
  putBytes(b, 7, r.modelHash, 32);
  putBytes(b, 8, r.inputHash, 32);
  putBytes(b, 9, r.outputHash, 32);
  putUint(b, 10, r.status);
  putUint(b, 11, r.unitsUsed);
  putUint(b, 12, r.price);
  putUint(b, 13, r.cumulative);
  putUint(b, 14, r.startedAt);
  putUint(b, 15, r.finishedAt);
  putBytes(b, 16, r.prevReceipt, 32);
  return b;
}

/** The receipt's leaf hash: keccak256(abi.encode(...)). */
export function receiptLeaf(r: Receipt): Uint8Array {
  return keccak256Bytes(encodeReceiptAbi(r));
}

export const toHex = (bytes: Uint8Array): string => `0x${Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('hex')}`;
export const fromHex = (hex: string): Uint8Array => new Uint8Array(Buffer.from(hex.startsWith('0x') ? hex.slice(2) : hex, 'hex'));

/** Signs a receipt with the agent's key; `agentKey` must be that key. Returns the receipt with `sig` and its leaf. */
export function signReceipt(
  identity: Pick<Identity, 'privateKey' | 'publicKey'>,
  receipt: Receipt,
): { receipt: SignedReceipt; leaf: Uint8Array } {
  if (!Buffer.from(receipt.agentKey).equals(Buffer.from(identity.publicKey))) {
    throw new MeshError('MESH_CONFIG', 'a receipt is signed by the key it names as agentKey');
  }
  const leaf = receiptLeaf(receipt);
  return { receipt: { ...receipt, sig: signBytes(identity, leaf) }, leaf };
}

/** The receipt's leaf when its signature by `agentKey` holds, else undefined. */
export function verifyReceiptSignature(receipt: SignedReceipt): Uint8Array | undefined {
  let leaf: Uint8Array;
  try {
    leaf = receiptLeaf(receipt);
  } catch {
    return undefined;
  }
  return verifyBytes(receipt.agentKey, leaf, receipt.sig) ? leaf : undefined;
}

// ---------------------------------------------------------------------------------------------
// Input and output hashes

/**
 * sha256 over a wire tensor map in name order: for each tensor its name, dtype and shape (as text,
 * NUL-terminated), the data length as 8 bytes big-endian, then the data. Payer and agent compute it
 * from the same wire bytes, so it names exactly what was sent or returned.
 */
export function hashTensorMap(tensors: Record<string, { dtype: string; shape: number[]; data: Uint8Array }>): Uint8Array {
  const h = createHash('sha256');
  const length = Buffer.alloc(8);
  for (const name of Object.keys(tensors).sort()) {
    const t = tensors[name]!;
    h.update(`${name}\0${t.dtype}\0${t.shape.join(',')}\0`);
    length.writeBigUInt64BE(BigInt(t.data.byteLength));
    h.update(length);
    h.update(t.data);
  }
  return new Uint8Array(h.digest());
}

// ---------------------------------------------------------------------------------------------
// Quote: the agent's signed price list

export interface ModelPrice {
  /** The model name, for people; the price applies to the model file with this hash. */
  name: string;
  /** sha256 of the model file, 0x hex (the manifest's sha256). */
  modelHash: string;
  baseMicros: number;
  unitMicros: number;
  minChargeMicros: number;
  /** Most units one request may use (default 1: a model priced per inference); a payer refuses receipts above it. */
  maxUnits?: number;
}

/** The most one request of this model can cost by the quote: the ok price at its most units. */
export function maxRequestMicros(price: Pick<ModelPrice, 'baseMicros' | 'unitMicros' | 'minChargeMicros' | 'maxUnits'>): number {
  const units = price.maxUnits ?? 1;
  return Math.max(price.baseMicros + price.unitMicros * units, price.minChargeMicros, price.unitMicros * units);
}

export interface Quote {
  v: 1;
  kind: 'quote';
  /** The agent's mesh id; it derives from agentKey. */
  agent: string;
  agentKey: Uint8Array;
  /** The agent's payout EVM address (lower-case 0x hex): the lane's second half. */
  payout: string;
  chainId: number;
  escrow: string;
  issuedAt: number;
  /** Epoch ms after which the quote no longer holds. */
  validUntil: number;
  models: ModelPrice[];
  /** The unpaid amount the agent lets a lane owe (its credit window), so payers can pace vouchers. */
  creditMicros?: number;
}

const QUOTE_DOMAIN = Buffer.from('edge-mesh/quote/v1\0');

export function signQuote(identity: Identity, quote: Omit<Quote, 'v' | 'kind' | 'agent' | 'agentKey'>): SignedQuote {
  const full: Quote = { v: 1, kind: 'quote', agent: identity.id, agentKey: new Uint8Array(identity.publicKey), ...quote };
  const bytes = encodeCbor(full);
  return { quote: new Uint8Array(bytes), sig: signBytes(identity, Buffer.concat([QUOTE_DOMAIN, bytes])) };
}

const ADDRESS = /^0x[0-9a-f]{40}$/;
const HASH_HEX = /^0x[0-9a-f]{64}$/;
const isMicros = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

/**
 * Checks a signed quote and returns it: the signature by its agentKey, the agent id deriving from that
 * key (and equal to `agentId` when given), well-formed prices, and `validUntil` not passed.
 * Throws MESH_RECEIPT_INVALID.
 */
export function verifyQuote(signed: unknown, { agentId, nowMs = Date.now() }: { agentId?: string; nowMs?: number } = {}): Quote {
  const bad = (why: string) => new MeshError('MESH_RECEIPT_INVALID', `quote refused: ${why}`, { details: { reason: 'quote' } });
  if (!checkSignedQuote.Check(signed)) throw bad('not a signed quote');
  let q: Quote;
  try {
    q = decodeCbor(signed.quote) as Quote;
  } catch (cause) {
    throw bad(`not CBOR (${(cause as Error).message})`);
  }
  if (typeof q !== 'object' || q === null || q.v !== 1 || q.kind !== 'quote') throw bad('not a quote');
  if (!(q.agentKey instanceof Uint8Array) || q.agentKey.byteLength !== 32) throw bad('no agent key');
  if (deriveId('agent', q.agentKey) !== q.agent || (agentId !== undefined && q.agent !== agentId))
    throw bad(`agent ${q.agent} does not match its key or ${agentId}`);
  if (!verifyBytes(q.agentKey, Buffer.concat([QUOTE_DOMAIN, signed.quote]), signed.sig)) throw bad('bad signature');
  if (typeof q.payout !== 'string' || !ADDRESS.test(q.payout) || typeof q.escrow !== 'string' || !ADDRESS.test(q.escrow))
    throw bad('payout or escrow is not a lower-case address');
  if (!Number.isSafeInteger(q.chainId) || !Number.isFinite(q.validUntil) || !Array.isArray(q.models)) throw bad('malformed');
  if (q.validUntil <= nowMs) throw bad('expired');
  if (q.creditMicros !== undefined && !isMicros(q.creditMicros)) throw bad('malformed credit window');
  for (const m of q.models) {
    if (
      typeof m?.modelHash !== 'string' ||
      !HASH_HEX.test(m.modelHash) ||
      !isMicros(m.baseMicros) ||
      !isMicros(m.unitMicros) ||
      !isMicros(m.minChargeMicros) ||
      (m.maxUnits !== undefined && !(Number.isSafeInteger(m.maxUnits) && m.maxUnits >= 1))
    ) {
      throw bad(`malformed price for ${String(m?.name)}`);
    }
  }
  return q;
}

/** The whole-request price by the rule, before subtracting what earlier (progress) receipts charged. */
export function ruleMicros(
  price: Pick<ModelPrice, 'baseMicros' | 'unitMicros' | 'minChargeMicros'>,
  status: number,
  units: number,
): number {
  switch (status) {
    case RECEIPT_STATUS.ok:
      return price.baseMicros + price.unitMicros * units;
    case RECEIPT_STATUS.partial:
      return price.unitMicros * units;
    case RECEIPT_STATUS.cancelled:
      return Math.max(price.minChargeMicros, price.unitMicros * units);
    default:
      return 0;
  }
}

/** The price of one receipt: the rule minus what the request's earlier receipts charged (failed and timeout: 0). */
export function receiptPriceMicros(
  price: Pick<ModelPrice, 'baseMicros' | 'unitMicros' | 'minChargeMicros'>,
  status: number,
  units: number,
  chargedBeforeMicros = 0,
): number {
  if (status === RECEIPT_STATUS.failed || status === RECEIPT_STATUS.timeout) return 0;
  return Math.max(0, ruleMicros(price, status, units) - chargedBeforeMicros);
}

// ---------------------------------------------------------------------------------------------
// Merkle root over leaves (OpenZeppelin MerkleProof compatible: pairs hashed in sorted order)

const pairBuffer = new Uint8Array(64);

export function hashPair(a: Uint8Array, b: Uint8Array): Uint8Array {
  const aFirst = Buffer.compare(a, b) <= 0;
  pairBuffer.set(aFirst ? a : b, 0);
  pairBuffer.set(aFirst ? b : a, 32);
  return keccak256Bytes(pairBuffer);
}

/** Levels of the tree, leaves first; an odd node at the end of a level moves up unchanged. */
function levels(leaves: readonly Uint8Array[]): Uint8Array[][] {
  const out: Uint8Array[][] = [leaves.slice()];
  while (out[out.length - 1]!.length > 1) {
    const level = out[out.length - 1]!;
    const next: Uint8Array[] = [];
    for (let i = 0; i < level.length; i += 2) next.push(i + 1 < level.length ? hashPair(level[i]!, level[i + 1]!) : level[i]!);
    out.push(next);
  }
  return out;
}

/** Root of the leaves in order; one leaf is its own root; no leaves give the zero hash. */
export function merkleRoot(leaves: readonly Uint8Array[]): Uint8Array {
  if (leaves.length === 0) return ZERO_HASH;
  const all = levels(leaves);
  return all[all.length - 1]![0]!;
}

/** The sibling path for `MerkleProof.verify(proof, root, leaf)` on chain. */
export function merkleProof(leaves: readonly Uint8Array[], index: number): Uint8Array[] {
  const proof: Uint8Array[] = [];
  let i = index;
  for (const level of levels(leaves).slice(0, -1)) {
    const sibling = i ^ 1;
    if (sibling < level.length) proof.push(level[sibling]!);
    i >>= 1;
  }
  return proof;
}

export function verifyMerkleProof(proof: readonly Uint8Array[], root: Uint8Array, leaf: Uint8Array): boolean {
  let node = leaf;
  for (const sibling of proof) node = hashPair(node, sibling);
  return Buffer.from(node).equals(Buffer.from(root));
}

// ---------------------------------------------------------------------------------------------
// Payer-side lane checks

/** What a payer remembers of a lane; plain JSON, so it can be stored as is. */
export interface LaneState {
  seq: number;
  /** The agent's running total, as its receipts state it (checked for consistency, not owed as such). */
  cumulative: number;
  /** What the payer owes: the prices of the receipts it accepted as payable (see LaneVerifier.link). */
  payable?: number;
  /** Leaf hash of the last accepted receipt, 0x hex. */
  lastLeaf: string;
  /** Requests with progress receipts and no final one yet: request id hex → [units, charged micros]. */
  open: Record<string, [number, number]>;
  /** Request ids (hex) of recent final receipts, oldest first (between 1 and 2 × rememberRequests of them). */
  closed: string[];
  /** Receipts linked with their signature not yet checked (LaneVerifier `deferSignatures`), oldest first. */
  unchecked?: UncheckedReceipt[];
}

/**
 * A receipt linked before its signature was checked: [seq, leaf hex, signature hex, `payable` before it,
 * 1 when it was payable]. Enough to check the signature later (it signs the leaf) and to take back what it
 * added to `payable`, after a restart too.
 */
export type UncheckedReceipt = [number, string, string, number, 0 | 1];

/** What `LaneVerifier.checkSignatures` found. */
export type SignatureCheck =
  | { ok: true; checked: number }
  | {
      ok: false;
      /** The first receipt that no valid signature covers: it and every receipt after it are not paid. */
      seq: number;
      /** Of those, how many had been payable (their leaves are to be dropped from the next voucher). */
      unpaid: number;
      /** Ed25519 verifications it took to find them. */
      checked: number;
    };

export const newLaneState = (): LaneState => ({ seq: 0, cumulative: 0, payable: 0, lastLeaf: toHex(ZERO_HASH), open: {}, closed: [] });

export interface LaneVerifierOptions {
  payer: string;
  /** The agent's verified quote (verifyQuote): its key, payout, domain and prices. */
  quote: Quote;
  /** Refuse any single receipt priced above this. */
  maxPriceMicros?: number;
  state?: LaneState;
  /** Final request ids remembered against duplicates (the hash chain already refuses replayed receipts). */
  rememberRequests?: number;
  /**
   * `link` checks every field and link of a receipt but not its signature, which waits for
   * `checkSignatures` (due before any voucher is signed over the lane's `payable`). Default false.
   */
  deferSignatures?: boolean;
}

/** What the payer knows of the request a receipt is for, when it still knows it. */
export interface ReceiptExpectation {
  /** Epoch ms: a receipt priced above 0 must finish by then (else it should have said timeout). */
  deadline?: number;
  inputHash?: Uint8Array;
  /** Hash of the outputs the payer received (an ok receipt must name them; a partial one, its progress message's). */
  outputHash?: Uint8Array;
  /**
   * Units the request asked for, for a model priced in units (quote `maxUnits` above 1): the leading
   * dimension of its inputs. No receipt may use more, and a partial one must use fewer (at all of them the
   * job is done and its receipt final). Ignored for a one-shot model, whose limit is its one unit.
   */
  units?: number;
}

export interface AcceptedReceipt {
  leaf: Uint8Array;
  price: number;
  cumulative: number;
}

/**
 * What a payer knows of the request behind a receipt when it links it into its lane (LaneVerifier.link):
 * on top of the expectations, whether it asked this agent at all, how the receipt came and when.
 */
export interface ReceiptContext extends ReceiptExpectation {
  /** The payer sent this request to this agent (false: it never did, or no longer remembers it). */
  asked: boolean;
  /**
   * The message the receipt came with: the final reply, a progress message of a job that runs in units, or
   * undefined for a receipt from a resync batch (no reply seen).
   */
  reply?: 'res' | 'err' | 'progress';
  /**
   * Units whose outputs the payer has received in progress messages so far (this receipt's message
   * included). A partial or cancelled receipt may charge no more units than that: the payer pays for the
   * unit outputs it was given, not for units the agent says it did. Undefined: not checked.
   */
  rows?: number;
  /** When that reply arrived, epoch ms on the payer's clock. */
  arrivedAt?: number;
  /** The payer cancelled this attempt. */
  cancelled?: boolean;
  /**
   * The payer refused the outputs the reply carried: not the form the request's use of them needs (a pipeline
   * stage's declared outputs, docs/pipelines.md). An ok receipt for them is not paid (reason 'outputs').
   */
  refusedOutputs?: boolean;
}

/** A receipt linked into the lane: payable, or linked for the chain's sake and not paid, with why. */
export interface LinkedReceipt extends AcceptedReceipt {
  payable: boolean;
  /** Why it is not paid (details.reason-style: 'unsolicited', 'late', 'no-reply', 'status', 'units', 'undelivered', 'price', …). */
  reason?: string;
}

/** Reasons `link` throws for: the receipt cannot be linked into the lane at all. */
export const LINK_FAILURES: ReadonlySet<string> = new Set([
  'malformed',
  'version',
  'domain',
  'lane',
  'replayed',
  'seq',
  'chain',
  'signature',
  'cumulative',
]);

/**
 * Checks each receipt of one lane before the payer pays for it: fields against the lane and the quote,
 * the Ed25519 signature, seq = last + 1, the hash chain, duplicate request ids, the price rule, the
 * payer's price cap and cumulative = previous + price. A refused receipt leaves the state unchanged
 * and throws MESH_RECEIPT_INVALID with `details.reason`.
 */
export class LaneVerifier {
  readonly payer: string;
  readonly quote: Quote;
  private readonly maxPriceMicros: number;
  private readonly rememberRequests: number;
  private readonly prices = new Map<string, ModelPrice>();
  private readonly closed: Set<string>;
  private readonly deferSignatures: boolean;
  /** Seq of the first receipt a failed `checkSignatures` found unsigned: the lane links nothing after it. */
  private unsignedAt: number | undefined;
  state: LaneState;

  constructor({
    payer,
    quote,
    maxPriceMicros = Number.MAX_SAFE_INTEGER,
    state = newLaneState(),
    rememberRequests = 65_536,
    deferSignatures = false,
  }: LaneVerifierOptions) {
    this.payer = payer.toLowerCase();
    this.quote = quote;
    this.maxPriceMicros = maxPriceMicros;
    this.rememberRequests = rememberRequests;
    this.deferSignatures = deferSignatures;
    this.state = state;
    this.closed = new Set(state.closed);
    for (const m of quote.models) this.prices.set(m.modelHash, m);
  }

  verify(r: SignedReceipt, expect: ReceiptExpectation = {}): AcceptedReceipt {
    return this.check(r, expect, true);
  }

  /**
   * Checks consecutive receipts with one Ed25519 verification: every field, link and price as
   * `verify` does, but only the last receipt's signature. Each leaf hashes its prevReceipt, so a valid
   * signature on the last leaf commits the agent to every receipt before it in the batch; the others'
   * own signatures are not checked (keep them for disputes, or `verify` them one by one). All or
   * nothing: on any refusal the lane state is as before the batch.
   */
  verifyChain(receipts: readonly SignedReceipt[], expects: readonly (ReceiptExpectation | undefined)[] = []): AcceptedReceipt[] {
    const saved: LaneState = { ...this.state, open: { ...this.state.open }, closed: [...this.state.closed] };
    const out: AcceptedReceipt[] = [];
    try {
      for (const [i, r] of receipts.entries()) out.push(this.check(r, expects[i] ?? {}, i === receipts.length - 1));
    } catch (err) {
      const added = this.state.closed.slice(saved.closed.length);
      this.state = saved;
      for (const key of added) this.closed.delete(key);
      throw err;
    }
    return out;
  }

  /**
   * Links a receipt into the lane, as a payer that must never be wedged does: a receipt that breaks the
   * lane (bad signature, wrong lane, a seq that skips or repeats, a broken hash chain, the agent's own
   * running total not adding up) throws MESH_RECEIPT_INVALID, as `verify` does, and leaves the state
   * unchanged. Any other fault (a request the payer never sent, a reply past the deadline by the payer's
   * clock, a status the reply does not bear out, units or a price above the quote) links the receipt
   * but leaves it unpaid: the lane goes on, and `state.payable` adds only what the payer owes.
   */
  link(r: SignedReceipt, context: ReceiptContext): LinkedReceipt {
    if (this.unsignedAt !== undefined) this.fail(r, 'signature', `receipt ${this.unsignedAt} of this lane was not signed by the agent`);
    const leaf = this.linkChecks(r, !this.deferSignatures);
    const reason = this.payChecks(r, context) ?? this.contextChecks(r, context);
    const payable = reason === undefined;
    const payableBefore = this.state.payable ?? 0;
    const accepted = this.commit(r, leaf, payable);
    if (this.deferSignatures) {
      this.state.unchecked ??= [];
      this.state.unchecked.push([r.seq, this.state.lastLeaf, toHex(r.sig), payableBefore, payable ? 1 : 0]);
    }
    return { ...accepted, payable, ...(reason ? { reason } : {}) };
  }

  /** The newest seq whose receipt (and so every one before it) a checked signature covers. */
  get signedSeq(): number {
    if (this.unsignedAt !== undefined) return this.unsignedAt - 1;
    const first = this.state.unchecked?.[0];
    return first ? first[0] - 1 : this.state.seq;
  }

  /** Receipts linked whose signature `checkSignatures` has not checked yet. */
  get unchecked(): number {
    return this.state.unchecked?.length ?? 0;
  }

  /**
   * Checks the signatures of the receipts linked since the last check with one Ed25519 verification, the
   * newest receipt's: each leaf hashes its prevReceipt, so the agent's signature on the newest leaf commits
   * it to every receipt linked before it (the argument `verifyChain` rests on). When that signature fails,
   * the receipts are checked one by one from the newest back to the newest one the agent did sign; the
   * receipts after it are not the agent's word, so what they added to `payable` is taken back and the lane
   * links nothing more (`link` throws `signature`). Call it before signing a voucher over `payable`.
   */
  checkSignatures(): SignatureCheck {
    const pending = this.state.unchecked;
    if (!pending || pending.length === 0) return { ok: true, checked: 0 };
    const key = this.quote.agentKey;
    const signed = (u: UncheckedReceipt) => verifyBytes(key, fromHex(u[1]), fromHex(u[2]));
    let checked = 1;
    if (signed(pending[pending.length - 1]!)) {
      this.state.unchecked = [];
      return { ok: true, checked };
    }
    let first = pending.length - 1;
    while (first > 0) {
      checked++;
      if (signed(pending[first - 1]!)) break;
      first--;
    }
    const refused = pending.slice(first);
    this.state.payable = refused[0]![3];
    this.state.unchecked = [];
    this.unsignedAt = refused[0]![0];
    return { ok: false, seq: this.unsignedAt, unpaid: refused.filter((u) => u[4] === 1).length, checked };
  }

  private fail(r: SignedReceipt, reason: string, message: string): never {
    throw new MeshError('MESH_RECEIPT_INVALID', `receipt ${r.seq} refused: ${message}`, { details: { reason, seq: r.seq } });
  }

  private check(r: SignedReceipt, expect: ReceiptExpectation, checkSignature: boolean): AcceptedReceipt {
    const leaf = this.linkChecks(r, checkSignature);
    const reason = this.payChecks(r, expect);
    if (reason !== undefined) this.fail(r, reason, PAY_REASONS[reason] ?? reason);
    return this.commit(r, leaf, true);
  }

  /** Everything that keeps the lane one chain: fields, the signature (unless batched), seq, the hash link, the agent's running total. */
  private linkChecks(r: SignedReceipt, checkSignature: boolean): Uint8Array {
    if (!isSignedReceipt(r)) this.fail(r, 'malformed', 'not a receipt');
    const q = this.quote;
    if (r.v !== RECEIPT_VERSION) this.fail(r, 'version', `version ${r.v}`);
    if (r.chainId !== q.chainId || r.escrow !== q.escrow)
      this.fail(r, 'domain', `chain ${r.chainId} escrow ${r.escrow} is not the quote's`);
    if (r.payer !== this.payer) this.fail(r, 'lane', `payer ${r.payer} is not ${this.payer}`);
    if (!Buffer.from(r.agentKey).equals(Buffer.from(q.agentKey))) this.fail(r, 'lane', 'signed for another agent key');
    const s = this.state;
    if (r.seq <= s.seq) this.fail(r, 'replayed', `seq ${r.seq} was already accepted (last ${s.seq})`);
    if (r.seq !== s.seq + 1) this.fail(r, 'seq', `seq ${r.seq} skips (expected ${s.seq + 1})`);
    if (toHex(r.prevReceipt) !== s.lastLeaf) this.fail(r, 'chain', 'prevReceipt is not the last receipt');
    let leaf: Uint8Array | undefined;
    if (checkSignature) leaf = verifyReceiptSignature(r);
    else {
      try {
        leaf = receiptLeaf(r).slice();
      } catch {
        leaf = undefined;
      }
    }
    if (!leaf) this.fail(r, 'signature', 'bad Ed25519 signature');
    if (r.cumulative !== s.cumulative + r.price)
      this.fail(r, 'cumulative', `cumulative ${r.cumulative} is not ${s.cumulative} + ${r.price}`);
    return leaf!;
  }

  /** Whether a final receipt for request `requestKey` (requestIdHex) is linked and still remembered. */
  hasFinal(requestKey: string): boolean {
    return this.closed.has(requestKey);
  }

  /** Whether the payer owes the receipt's price by the quote and what it knows of the request; the reason when it does not. */
  private payChecks(r: SignedReceipt, expect: ReceiptExpectation): string | undefined {
    const s = this.state;
    const reqKey = requestIdHex(r.requestId);
    if (this.closed.has(reqKey)) return 'duplicate';
    const price = this.prices.get(toHex(r.modelHash));
    if (!price) return 'price';
    const [unitsBefore, chargedBefore] = s.open[reqKey] ?? [0, 0];
    if (r.status === RECEIPT_STATUS.partial && r.unitsUsed <= unitsBefore) return 'progress';
    if (r.status === RECEIPT_STATUS.ok && r.unitsUsed < unitsBefore) return 'progress';
    const most = price.maxUnits ?? 1;
    const asked = most > 1 && expect.units !== undefined ? Math.min(most, expect.units) : most;
    if (r.unitsUsed > asked) return 'units';
    // A progress receipt at the job's last unit (or for a one-shot model, at its only one) is no progress:
    // it would charge the unit before the job's result is out.
    if (r.status === RECEIPT_STATUS.partial && r.unitsUsed >= asked) return 'units';
    if (r.price !== receiptPriceMicros(price, r.status, r.unitsUsed, chargedBefore)) return 'price';
    if (r.price > this.maxPriceMicros) return 'price-cap';
    if (r.finishedAt < r.startedAt) return 'time';
    if (r.price > 0 && expect.deadline !== undefined && r.finishedAt > expect.deadline) return 'deadline';
    if (expect.inputHash && !Buffer.from(expect.inputHash).equals(Buffer.from(r.inputHash))) return 'input';
    if (
      expect.outputHash &&
      (r.status === RECEIPT_STATUS.ok || r.status === RECEIPT_STATUS.partial) &&
      !Buffer.from(expect.outputHash).equals(Buffer.from(r.outputHash))
    )
      return 'output';
    return undefined;
  }

  /** What only the payer's own view of the request can tell: did it ask, did the answer come in time, does the reply bear the status out. */
  private contextChecks(r: SignedReceipt, c: ReceiptContext): string | undefined {
    if (!c.asked) return 'unsolicited';
    if (r.price === 0) return undefined;
    if (c.reply === undefined) return 'no-reply';
    if (c.refusedOutputs && r.status === RECEIPT_STATUS.ok) return 'outputs';
    if (c.deadline !== undefined && c.arrivedAt !== undefined && c.arrivedAt > c.deadline) return 'late';
    if (r.status === RECEIPT_STATUS.ok && c.reply !== 'res') return 'status';
    if (r.status === RECEIPT_STATUS.cancelled && !c.cancelled) return 'status';
    if (r.status === RECEIPT_STATUS.partial && c.reply !== 'progress') return 'status';
    if ((r.status === RECEIPT_STATUS.partial || r.status === RECEIPT_STATUS.cancelled) && c.rows !== undefined && r.unitsUsed > c.rows)
      return 'undelivered';
    return undefined;
  }

  private commit(r: SignedReceipt, leaf: Uint8Array, payable: boolean): AcceptedReceipt {
    const s = this.state;
    const reqKey = requestIdHex(r.requestId);
    const [, chargedBefore] = s.open[reqKey] ?? [0, 0];
    s.seq = r.seq;
    s.cumulative = r.cumulative;
    if (payable) s.payable = (s.payable ?? 0) + r.price;
    s.lastLeaf = toHex(leaf);
    if (r.status === RECEIPT_STATUS.partial) s.open[reqKey] = [r.unitsUsed, chargedBefore + r.price];
    else {
      delete s.open[reqKey];
      if (!this.closed.has(reqKey)) {
        this.closed.add(reqKey);
        s.closed.push(reqKey);
      }
      // Forget the older half at once: shifting one id at a time would copy the whole list per receipt.
      if (s.closed.length > 2 * this.rememberRequests) {
        for (const old of s.closed.splice(0, s.closed.length - this.rememberRequests)) this.closed.delete(old);
      }
    }
    return { leaf, price: r.price, cumulative: r.cumulative };
  }
}

/** Messages for the reasons `verify` refuses a receipt for, besides breaking the lane. */
const PAY_REASONS: Record<string, string> = {
  duplicate: 'the request already has a final receipt',
  price: 'the price does not follow the quote',
  progress: 'progress units do not rise',
  units: 'more units than the quote allows',
  'price-cap': "the price is above the payer's cap",
  time: 'finished before it started',
  deadline: 'charged for work finished after the deadline',
  input: 'names other inputs than were sent',
  output: 'names other outputs than were received',
};
