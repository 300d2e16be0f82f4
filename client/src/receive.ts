/**
 * How a mesh client reads what agents publish: the same rules for every receiver (SDK, router).
 * Pure: the caller supplies the topic's agent id and logs or counts the outcome.
 */

import type { AgentStatus, ErrorReply, InferReply, LaneInfo, ProgressMessage, ReceiptBatch, SignedReceipt } from '@edge-mesh/protocol';
import { DEFAULT_MAX_MESSAGE_BYTES, decodeMessage, isMeshErrorCode, MeshError, requestIdHex, verifyStatus } from '@edge-mesh/protocol';

export type StatusReading =
  | { ok: true; status: AgentStatus }
  | { ok: false; reason: 'malformed' | 'foreign' | 'unverified'; message: string };

/**
 * A status from `topics.agentStatus(agentId)`: it must decode, name that agent and, when
 * `requireSigned`, carry a valid signature by the key the id derives from. Offline statuses are
 * checked too: a forged "offline" would otherwise evict a genuine agent.
 */
export function readAgentStatus(
  agentId: string,
  payload: Uint8Array,
  { maxBytes = DEFAULT_MAX_MESSAGE_BYTES, requireSigned = true } = {},
): StatusReading {
  let status: AgentStatus;
  try {
    status = decodeMessage(payload, ['status'], maxBytes);
  } catch (err) {
    return { ok: false, reason: 'malformed', message: (err as Error).message };
  }
  if (status.agent !== agentId)
    return { ok: false, reason: 'foreign', message: `status names ${status.agent}, published on ${agentId}'s topic` };
  if (requireSigned && !verifyStatus(status)) {
    return {
      ok: false,
      reason: 'unverified',
      message: status.sig === undefined ? 'unsigned status' : 'status not signed by the key its agent id derives from',
    };
  }
  return { ok: true, status };
}

export interface ReplyReading {
  /** Hex request id, the key of the sender's pending map. */
  key: string;
  reply: InferReply | undefined;
  error: MeshError | undefined;
  /** The agent's receipt, when the request paid on a lane (checked by the payer, not here). */
  receipt: SignedReceipt | undefined;
  /** Where the paid lane stands at the agent, when it says. */
  lane: LaneInfo | undefined;
  /** Receipts the agent sent again after a resync (then key is '' and there is no reply). */
  batch: ReceiptBatch | undefined;
  /** Progress of a job that runs in units (no reply yet: the request is still running). */
  progress?: ProgressMessage;
}

/**
 * A reply from `topics.clientReply(me, agentId)`: a result, or the agent's coded error as a
 * MeshError. Undefined when it does not decode or names another agent than the topic: a reply
 * counts only from the agent named by both.
 */
export function readReply(agentId: string, payload: Uint8Array, maxBytes = DEFAULT_MAX_MESSAGE_BYTES): ReplyReading | undefined {
  let decoded: InferReply | ErrorReply | ReceiptBatch | ProgressMessage;
  try {
    decoded = decodeMessage(payload, ['res', 'err', 'receipts', 'progress'], maxBytes);
  } catch {
    return undefined;
  }
  if (decoded.agent !== agentId) return undefined;
  if (decoded.kind === 'receipts')
    return { key: '', reply: undefined, error: undefined, receipt: undefined, lane: decoded.lane, batch: decoded };
  const key = requestIdHex(decoded.id);
  if (decoded.kind === 'progress')
    return { key, reply: undefined, error: undefined, receipt: decoded.receipt, lane: decoded.lane, batch: undefined, progress: decoded };
  if (decoded.kind === 'res')
    return { key, reply: decoded, error: undefined, receipt: decoded.receipt, lane: decoded.lane, batch: undefined };
  const code = isMeshErrorCode(decoded.code) ? decoded.code : 'MESH_INTERNAL';
  // The agent's queue, when the error reply carries it, travels with the error to whoever learns from it.
  const queue = decoded.rif === undefined ? {} : { rif: decoded.rif, ...(decoded.workMs !== undefined ? { workMs: decoded.workMs } : {}) };
  return {
    key,
    reply: undefined,
    error: new MeshError(code, decoded.message, { details: { agentId, ...queue } }),
    receipt: decoded.receipt,
    lane: decoded.lane,
    batch: undefined,
  };
}
