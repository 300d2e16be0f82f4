/**
 * Every wire message and signed record, defined once as a TypeBox schema: the single source of the
 * protocol's shapes and of its static types.
 *
 * Nothing on the running path imports this file (only the generator, tests and `import type`): the
 * build compiles these schemas ahead of time with `TypeCompiler.Code` into validators.generated.ts
 * (scripts/generate-validators.ts), which holds a standalone check function and a plain copy of each
 * exported schema, so an agent or an app never loads TypeBox itself (docs/protocol.md, "Validation").
 * After changing a schema here, run `npm run generate` (the build does) and commit the generated file.
 */
import { type Static, Type } from '@sinclair/typebox';
import { PROTOCOL_VERSION, ROLES } from './constants.ts';
import { MAX_RANK } from './tensor.ts';

const Id = Type.String({ pattern: '^[a-z0-9][a-z0-9-]{2,63}$' });
const ModelName = Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' });
const Ms = Type.Number({ minimum: 0 });
const Count = Type.Integer({ minimum: 0 });
/**
 * What an agent reports about its own load is a claim (docs/routing.md, "What a reply may claim"): a
 * count of at most 2^20 requests and a duration of at most a day, so no finite-looking figure can
 * overflow a receiver's arithmetic. Receivers bound them further by what they measure.
 */
const ClaimedCount = Type.Integer({ minimum: 0, maximum: 1_048_576 });
const ClaimedMs = Type.Number({ minimum: 0, maximum: 86_400_000 });
/** 128-bit request id, chosen at random by the sender. */
export const RequestIdSchema = Type.Uint8Array({ minByteLength: 16, maxByteLength: 16 });

export const WireTensorSchema = Type.Object(
  {
    dtype: Type.String({ maxLength: 16 }),
    shape: Type.Array(Type.Integer({ minimum: 0 }), { maxItems: MAX_RANK }),
    data: Type.Uint8Array(),
  },
  { additionalProperties: false },
);

const TensorMap = Type.Record(Type.String({ maxLength: 128 }), WireTensorSchema, { maxProperties: 64 });

// ---------------------------------------------------------------------------------------------
// Payment (see receipts.ts): amounts are micro-dollars as safe integers, EVM addresses are
// lower-case 0x hex, hashes are raw bytes.

export const AddressSchema = Type.String({ pattern: '^0x[0-9a-f]{40}$' });
const Bytes32 = Type.Uint8Array({ minByteLength: 32, maxByteLength: 32 });
const Micros = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER });
const Uint = Type.Integer({ minimum: 0, maximum: Number.MAX_SAFE_INTEGER });

/** An agent's Ed25519-signed usage receipt; its leaf hash is keccak256(abi.encode(fields)) (receipts.ts). */
export const SignedReceiptSchema = Type.Object(
  {
    v: Type.Literal(1),
    chainId: Uint,
    escrow: AddressSchema,
    payer: AddressSchema,
    agentKey: Bytes32,
    seq: Type.Integer({ minimum: 1, maximum: Number.MAX_SAFE_INTEGER }),
    requestId: RequestIdSchema,
    modelHash: Bytes32,
    inputHash: Bytes32,
    outputHash: Bytes32,
    /** 0 ok, 1 partial (progress), 2 failed, 3 timeout, 4 cancelled by the payer. */
    status: Type.Integer({ minimum: 0, maximum: 4 }),
    unitsUsed: Type.Integer({ minimum: 0, maximum: 0xffffffff }),
    price: Micros,
    cumulative: Micros,
    startedAt: Uint,
    finishedAt: Uint,
    prevReceipt: Bytes32,
    sig: Type.Uint8Array({ minByteLength: 64, maxByteLength: 64 }),
  },
  { additionalProperties: false },
);
export type SignedReceipt = Static<typeof SignedReceiptSchema>;

/** A payer-signed EIP-712 voucher as it travels to the agent (voucher.ts signs it; @edge-mesh/contracts recovers the signer). */
export const VoucherMessageSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('voucher'),
  /** The voucher key's address: the signer half of the escrow lane (signer, agent). */
  payer: AddressSchema,
  /** The agent's payout address the voucher pays. */
  agent: AddressSchema,
  cumulative: Micros,
  /** Running total of relayer fees the voucher pays whoever settles it; absent means 0. Vouchers do not expire. */
  feeCumulative: Type.Optional(Micros),
  receiptsRoot: Bytes32,
  sig: Type.Uint8Array({ minByteLength: 64, maxByteLength: 65 }),
  /**
   * The highest receipt seq of the lane the payer had checked when it signed (not signed: a hint). What
   * the agent billed up to that seq and the voucher does not pay is what the payer refused.
   */
  seq: Type.Optional(Uint),
});
export type VoucherMessage = Static<typeof VoucherMessageSchema>;

/**
 * The payer's permission for one mesh client to spend on its lane with one agent (docs/settlement.md,
 * "Lanes"): EIP-712 `LaneGrant(address agent,bytes32 client,uint64 issuedAt)` signed by the payer's
 * voucher key, with `client` the keccak256 of the client's mesh id. A later grant replaces an earlier one,
 * so a payer moves its lane to another client by signing a new grant; nobody can open a lane in a
 * payer's name without the payer's key.
 */
export const LaneGrantSchema = Type.Object({
  payer: AddressSchema,
  /** The agent's payout address. */
  agent: AddressSchema,
  /** The mesh id of the client allowed to spend. */
  client: Id,
  /** Epoch ms; the newest grant wins. */
  issuedAt: Uint,
  sig: Type.Uint8Array({ minByteLength: 65, maxByteLength: 65 }),
});
export type LaneGrant = Static<typeof LaneGrantSchema>;

/** What a paying request names: the payer's lane, its grant for this client, and optionally the latest voucher (piggyback). */
export const PaymentFieldSchema = Type.Object({
  payer: AddressSchema,
  /** Needed once per lane and client (and again after the agent restarts without its journal). */
  grant: Type.Optional(LaneGrantSchema),
  voucher: Type.Optional(VoucherMessageSchema),
});
export type PaymentField = Static<typeof PaymentFieldSchema>;

/** An agent's price list (quote): its CBOR bytes and the agent's Ed25519 signature over them (receipts.ts). */
export const SignedQuoteSchema = Type.Object({
  quote: Type.Uint8Array({ maxByteLength: 16_384 }),
  sig: Type.Uint8Array({ minByteLength: 64, maxByteLength: 64 }),
});
export type SignedQuote = Static<typeof SignedQuoteSchema>;

export const InferRequestSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('req'),
  id: RequestIdSchema,
  /** Absolute deadline, Unix epoch milliseconds. */
  deadline: Type.Number(),
  model: ModelName,
  inputs: TensorMap,
  /** Present when the sender pays: the agent then signs a receipt on the payer's lane. */
  pay: Type.Optional(PaymentFieldSchema),
  /** A version of the model during a rollout (docs/deployment.md); absent: the version the agent serves by default. */
  version: Type.Optional(Type.String({ maxLength: 64 })),
});
export type InferRequest = Static<typeof InferRequestSchema>;

/** Where a paid lane stands at the agent, sent with every paid reply so the payer can catch up. */
export const LaneInfoSchema = Type.Object({
  /** The last receipt seq the agent issued on the lane. */
  seq: Uint,
  /** The cumulative amount of the best voucher the agent holds for the lane. */
  paid: Micros,
});
export type LaneInfo = Static<typeof LaneInfoSchema>;

export const InferReplySchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('res'),
  id: RequestIdSchema,
  agent: Id,
  model: ModelName,
  outputs: TensorMap,
  /** Time the request waited in the agent's queue. */
  queueMs: Ms,
  /** Time the runtime spent computing. */
  execMs: Ms,
  /** Requests the agent held (queued and running, every model) when it replied, this one not counted. */
  rif: Type.Optional(ClaimedCount),
  /** The same queue as work: Σ over models of (queued + running) × that model's service time, ms. */
  workMs: Type.Optional(ClaimedMs),
  /** Time this request waited for its model to be loaded (a cold start it caused or joined), ms. */
  loadMs: Type.Optional(ClaimedMs),
  receipt: Type.Optional(SignedReceiptSchema),
  lane: Type.Optional(LaneInfoSchema),
  /**
   * Receipts of this agent's earlier answers to this client on the same lane, in seq order: a paid answer leaves
   * before its receipt is signed, and the receipt rides on the next answer, or comes in a `receipts` message
   * (docs/settlement.md, "Receipts follow their answers").
   */
  earlier: Type.Optional(Type.Array(SignedReceiptSchema, { maxItems: 256 })),
  /** The model version that ran (docs/deployment.md); a claim the router checks against what it asked for. */
  version: Type.Optional(Type.String({ maxLength: 64 })),
});
export type InferReply = Static<typeof InferReplySchema>;

export const ErrorReplySchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('err'),
  id: RequestIdSchema,
  agent: Id,
  code: Type.String({ pattern: '^MESH_[A-Z_]+$', maxLength: 64 }),
  message: Type.String({ maxLength: 2048 }),
  /** The agent's queue when it replied, as in `res`. */
  rif: Type.Optional(ClaimedCount),
  workMs: Type.Optional(ClaimedMs),
  /** The receipt of a request the agent took on and could not finish (it costs what its status says: failed and timeout 0). */
  receipt: Type.Optional(SignedReceiptSchema),
  lane: Type.Optional(LaneInfoSchema),
});
export type ErrorReply = Static<typeof ErrorReplySchema>;

/**
 * Progress of a job that runs in units (a model whose manifest sets `units`, docs/agent.md): the outputs of
 * the units done since the last progress message, along the leading dimension, and on a paid request the
 * `partial` receipt for them (docs/settlement.md, "Progress receipts"). The final `res` still carries every
 * unit's outputs.
 */
export const ProgressMessageSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('progress'),
  id: RequestIdSchema,
  agent: Id,
  /** Units of the job done so far (the outputs here are the last ones of them). */
  units: Uint,
  outputs: TensorMap,
  receipt: Type.Optional(SignedReceiptSchema),
  lane: Type.Optional(LaneInfoSchema),
});
export type ProgressMessage = Static<typeof ProgressMessageSchema>;

export const CancelSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('cancel'),
  id: RequestIdSchema,
});
export type Cancel = Static<typeof CancelSchema>;

export const TensorInfoSchema = Type.Object({
  name: Type.String({ maxLength: 128 }),
  dtype: Type.String({ maxLength: 16 }),
  /** Fixed dims as numbers; symbolic or free dims as their name or "". */
  shape: Type.Array(Type.Union([Type.Integer(), Type.String({ maxLength: 64 })]), { maxItems: MAX_RANK }),
});
export type TensorInfo = Static<typeof TensorInfoSchema>;

export const ModelInfoSchema = Type.Object({
  name: ModelName,
  version: Type.String({ maxLength: 64 }),
  sha256: Type.String({ pattern: '^[0-9a-f]{64}$' }),
  /** Price of one successful inference in micro-dollars (1e-6 USD). */
  priceMicros: Count,
  /** Median latency measured by warm-up runs at load time. */
  latencyMs: Ms,
  inputs: Type.Array(TensorInfoSchema, { maxItems: 64 }),
  outputs: Type.Array(TensorInfoSchema, { maxItems: 64 }),
  notes: Type.Optional(Type.String({ maxLength: 1024 })),
});
export type ModelInfo = Static<typeof ModelInfoSchema>;

export const HardwareSchema = Type.Object({
  platform: Type.String({ maxLength: 32 }),
  arch: Type.String({ maxLength: 32 }),
  cpus: Count,
  cpuModel: Type.String({ maxLength: 128 }),
  memoryMb: Count,
});
export type Hardware = Static<typeof HardwareSchema>;

export const AgentStatusSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('status'),
  agent: Id,
  state: Type.Union([Type.Literal('online'), Type.Literal('draining'), Type.Literal('offline')]),
  ts: Type.Number(),
  /** Random per process start, so a restarted agent is told apart from a stale retained status. */
  session: Type.Optional(Type.String({ maxLength: 64 })),
  version: Type.Optional(Type.String({ maxLength: 64 })),
  models: Type.Optional(Type.Array(ModelInfoSchema, { maxItems: 256 })),
  hardware: Type.Optional(HardwareSchema),
  providers: Type.Optional(Type.Array(Type.String({ maxLength: 32 }), { maxItems: 8 })),
  workers: Type.Optional(Count),
  queueLimit: Type.Optional(Count),
  /** The agent's raw Ed25519 public key; its id derives from it. */
  publicKey: Type.Optional(Type.Uint8Array({ minByteLength: 32, maxByteLength: 32 })),
  /** The agent's signed price list, when it takes payment. */
  quote: Type.Optional(SignedQuoteSchema),
  /**
   * Versions loaded, warmed and served beside `models` during a rollout (docs/deployment.md): a request naming
   * one of them as its `version` runs on it.
   */
  canaries: Type.Optional(
    Type.Array(
      Type.Object({
        name: ModelName,
        version: Type.String({ maxLength: 64 }),
        sha256: Type.String({ pattern: '^[0-9a-f]{64}$' }),
        latencyMs: Ms,
      }),
      {
        maxItems: 64,
      },
    ),
  ),
  /** Ed25519 signature over the status without this field (see identity.ts). */
  sig: Type.Optional(Type.Uint8Array({ minByteLength: 64, maxByteLength: 64 })),
});
export type AgentStatus = Static<typeof AgentStatusSchema>;

export const ModelLoadSchema = Type.Object({
  queued: Count,
  inFlight: Count,
  /** Recent service (execution) time, an EWMA over finished runs. */
  serviceMs: Ms,
  served: Count,
  failed: Count,
  /** Absent or 'warm': loaded. 'loading': being loaded, ready in about `etaMs`. 'cold': served, loaded on first use. */
  state: Type.Optional(Type.Union([Type.Literal('warm'), Type.Literal('loading'), Type.Literal('cold')])),
  etaMs: Type.Optional(ClaimedMs),
});
export type ModelLoad = Static<typeof ModelLoadSchema>;

export const AgentLoadSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('load'),
  agent: Id,
  ts: Type.Number(),
  seq: Count,
  queued: Count,
  inFlight: Count,
  workers: Count,
  models: Type.Record(Type.String({ maxLength: 64 }), ModelLoadSchema, { maxProperties: 256 }),
});
export type AgentLoad = Static<typeof AgentLoadSchema>;

/**
 * A client asks a router where to send requests for `model` (topics.routerRoute). The router answers
 * with a lease on topics.clientLease: a few ranked agents the client may use until the lease expires,
 * so most requests skip the router entirely and go straight to an agent.
 */
export const RouteRequestSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('route'),
  id: RequestIdSchema,
  model: ModelName,
  /** Time budget of the requests the lease is for, ms (agents that cannot make it are left out). */
  budgetMs: Type.Optional(Ms),
  /** Typical request size in bytes, for the transfer estimate. */
  bytes: Type.Optional(Count),
  /** Agents the client wants left out (e.g. ones that just failed it). */
  exclude: Type.Optional(Type.Array(Id, { maxItems: 16 })),
});
export type RouteRequest = Static<typeof RouteRequestSchema>;

export const LeaseAgentSchema = Type.Object({
  agent: Id,
  /** The router's predicted completion time there, ms. */
  predictedMs: Ms,
  /** Its expected service time per request, ms: what one more request of the client adds there. */
  serviceMs: Ms,
  /** Per-try timeout the router would use for it, ms. */
  timeoutMs: Ms,
  /** When a still-running attempt there is worth hedging, ms after sending. */
  hedgeAfterMs: Ms,
});
export type LeaseAgent = Static<typeof LeaseAgentSchema>;

export const LeaseSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('lease'),
  /** The route request's id. */
  id: RequestIdSchema,
  router: Id,
  model: ModelName,
  /** Best first; empty with `code` when the router has no agent for the model. */
  agents: Type.Array(LeaseAgentSchema, { maxItems: 16 }),
  /** How long the lease may be used, ms from receipt. */
  ttlMs: Ms,
  code: Type.Optional(Type.String({ pattern: '^MESH_[A-Z_]+$', maxLength: 64 })),
  message: Type.Optional(Type.String({ maxLength: 1024 })),
});
export type Lease = Static<typeof LeaseSchema>;

/**
 * A payer asks an agent for the receipts of its lane after `afterSeq` (on the voucher topic): after a
 * lost reply, a restart, or a gap in the seq, so a lane never stays stuck on a missing receipt.
 */
export const ResyncSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('resync'),
  payer: AddressSchema,
  afterSeq: Uint,
});
export type Resync = Static<typeof ResyncSchema>;

/** The agent's answer to a resync (on the client's reply topic): receipts in seq order from its journal. */
export const ReceiptBatchSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('receipts'),
  agent: Id,
  payer: AddressSchema,
  receipts: Type.Array(SignedReceiptSchema, { maxItems: 256 }),
  /** Where the lane stands; when `lane.seq` is past the last receipt sent, ask again from there. */
  lane: LaneInfoSchema,
});
export type ReceiptBatch = Static<typeof ReceiptBatchSchema>;

/**
 * The broker's answer to a SignedRecord an operator published on `topics.adminRecords(operatorId)`, sent on
 * `topics.adminAcks(operatorId)`. `id` is the record's subject id ('' when the record could not be read at all);
 * a refusal carries a MeshError code and message.
 */
export const AdminAckSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('ack'),
  id: Type.String({ maxLength: 64 }),
  ok: Type.Boolean(),
  code: Type.Optional(Type.String({ pattern: '^MESH_[A-Z_]+$', maxLength: 64 })),
  message: Type.Optional(Type.String({ maxLength: 1024 })),
});
export type AdminAck = Static<typeof AdminAckSchema>;

// ---------------------------------------------------------------------------------------------
// Identity (identity.ts): key files, and the admission and revocation records an operator signs

export const KeyFileSchema = Type.Object({
  v: Type.Literal(1),
  kind: Type.Literal('edge-mesh-key'),
  role: Type.Union(ROLES.map((r) => Type.Literal(r))),
  id: Type.String(),
  publicKey: Type.String(),
  seed: Type.String(),
});
export type KeyFile = Static<typeof KeyFileSchema>;

export const AdmissionSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('admission'),
  id: Type.String({ maxLength: 64 }),
  role: Type.Union(ROLES.map((r) => Type.Literal(r))),
  publicKey: Type.Uint8Array({ minByteLength: 32, maxByteLength: 32 }),
  issuedAt: Type.Number(),
  /** Epoch ms after which the admission no longer holds. */
  expires: Type.Number(),
  operator: Type.String({ maxLength: 64 }),
});
export type Admission = Static<typeof AdmissionSchema>;

export const RevocationSchema = Type.Object({
  v: Type.Literal(PROTOCOL_VERSION),
  kind: Type.Literal('revocation'),
  id: Type.String({ maxLength: 64 }),
  revokedAt: Type.Number(),
  operator: Type.String({ maxLength: 64 }),
});
export type Revocation = Static<typeof RevocationSchema>;

/** A record with the operator's signature over its CBOR encoding. */
export const SignedRecordSchema = Type.Object({
  record: Type.Uint8Array({ maxByteLength: 4096 }),
  sig: Type.Uint8Array({ minByteLength: 64, maxByteLength: 64 }),
});
export type SignedRecord = Static<typeof SignedRecordSchema>;
