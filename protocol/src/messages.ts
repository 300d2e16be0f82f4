/**
 * Every wire message, defined once as a schema (schemas.ts). Types are derived from the schemas and the
 * generated checkers (validators.generated.ts, compiled ahead of time from the same schemas) are the only
 * validation path: MQTT handlers, the SDK and HTTP routes all validate with the same objects. Checking
 * loads no TypeBox; only describing a refused message does (validate.ts).
 */

import type {
  AgentLoad,
  AgentStatus,
  Cancel,
  ErrorReply,
  InferReply,
  InferRequest,
  Lease,
  ProgressMessage,
  ReceiptBatch,
  Resync,
  RouteRequest,
  VoucherMessage,
} from './schemas.ts';
import type { Validator } from './validate.ts';
import {
  checkAgentLoad,
  checkAgentStatus,
  checkCancel,
  checkErrorReply,
  checkInferReply,
  checkInferRequest,
  checkLease,
  checkProgressMessage,
  checkReceiptBatch,
  checkResync,
  checkRouteRequest,
  checkVoucherMessage,
} from './validators.generated.ts';

export { PROTOCOL_VERSION } from './constants.ts';
export type {
  AdminAck,
  AgentLoad,
  AgentStatus,
  Cancel,
  ErrorReply,
  Hardware,
  InferReply,
  InferRequest,
  LaneGrant,
  LaneInfo,
  Lease,
  LeaseAgent,
  ModelInfo,
  ModelLoad,
  PaymentField,
  ProgressMessage,
  ReceiptBatch,
  Resync,
  RouteRequest,
  SignedQuote,
  TensorInfo,
  VoucherMessage,
} from './schemas.ts';

export type Message =
  | InferRequest
  | InferReply
  | ErrorReply
  | Cancel
  | AgentStatus
  | AgentLoad
  | RouteRequest
  | Lease
  | VoucherMessage
  | Resync
  | ReceiptBatch
  | ProgressMessage;
export type MessageKind = Message['kind'];

/** The checker of each message kind. */
export const checkers: { readonly [K in MessageKind]: Validator<Extract<Message, { kind: K }>> } = {
  req: checkInferRequest,
  res: checkInferReply,
  err: checkErrorReply,
  cancel: checkCancel,
  status: checkAgentStatus,
  load: checkAgentLoad,
  route: checkRouteRequest,
  lease: checkLease,
  voucher: checkVoucherMessage,
  resync: checkResync,
  receipts: checkReceiptBatch,
  progress: checkProgressMessage,
};
