/**
 * Frame bodies: CBOR maps with small integer keys (docs/firmware-protocol.md lists them for firmware
 * authors). Key 20 in any reply from the bridge is the number of downlinks waiting for the device.
 */
import { type CborMap, type CborValue, cborMap, type Tagged } from './cbor.ts';

export const K = {
  hello: { fw: 1, maxFrame: 2, sleepPeriodS: 3, keepaliveS: 4 },
  welcome: { models: 1, timeMs: 2, maxFrame: 3, keepaliveS: 4 },
  inferReq: { model: 1, tensor: 2, scale: 3, shape: 5, deadlineMs: 6, want: 7 },
  inferResp: { label: 1, score: 2, latencyMs: 3, agent: 4, receiptRef: 5, output: 6, outputShape: 7 },
  telemetry: { readings: 1 },
  sleep: { durationS: 1 },
  downlink: { id: 1, payload: 2 },
  error: { code: 1, message: 2 },
  pending: 20,
} as const;

/** INFER_REQ key 7: what the device wants back. */
export const Want = { SUMMARY: 0, RAW: 1 } as const;

export interface InferRequestBody {
  modelId: number;
  tensor: Tagged;
  scale: number;
  shape: number[] | undefined;
  deadlineMs: number | undefined;
  want: number;
}

export function inferRequestBody(r: {
  modelId: number;
  tensor: Tagged;
  scale?: number;
  shape?: number[];
  deadlineMs?: number;
  want?: number;
}): CborMap {
  return cborMap([
    [K.inferReq.model, r.modelId],
    [K.inferReq.tensor, r.tensor],
    [K.inferReq.scale, r.scale === undefined ? undefined : Math.fround(r.scale)],
    [K.inferReq.shape, r.shape],
    [K.inferReq.deadlineMs, r.deadlineMs],
    [K.inferReq.want, r.want],
  ]);
}

const isUint = (v: CborValue | undefined, max = 0xffffffff): v is number =>
  typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= max;

/** Validates an INFER_REQ body; returns a reason string when it is malformed. */
export function readInferRequest(body: CborValue): InferRequestBody | string {
  if (!(body instanceof Map)) return 'the body is not a map';
  const modelId = body.get(K.inferReq.model);
  const tensor = body.get(K.inferReq.tensor);
  const scale = body.get(K.inferReq.scale) ?? 1;
  const shape = body.get(K.inferReq.shape);
  const deadlineMs = body.get(K.inferReq.deadlineMs);
  const want = body.get(K.inferReq.want) ?? Want.SUMMARY;
  if (!isUint(modelId, 0xffff)) return 'key 1 (model id) must be an unsigned integer';
  if (typeof tensor !== 'object' || tensor === null || tensor instanceof Uint8Array || Array.isArray(tensor) || tensor instanceof Map) {
    return 'key 2 (tensor) must be a typed array (RFC 8746 tag on a byte string)';
  }
  if (typeof scale !== 'number' || !Number.isFinite(scale)) return 'key 3 (scale) must be a finite number';
  if (shape !== undefined && !(Array.isArray(shape) && shape.length >= 1 && shape.length <= 8 && shape.every((d) => isUint(d, 1 << 24)))) {
    return 'key 5 (shape) must be an array of 1 to 8 unsigned integers';
  }
  if (deadlineMs !== undefined && !isUint(deadlineMs, 600_000)) return 'key 6 (deadline) must be 0 to 600000 ms';
  if (!isUint(want, 1)) return 'key 7 (want) must be 0 or 1';
  return { modelId, tensor, scale, shape: shape as number[] | undefined, deadlineMs, want };
}

export interface HelloBody {
  fw: string | undefined;
  maxFrame: number | undefined;
  sleepPeriodS: number;
  keepaliveS: number | undefined;
}

export function readHello(body: CborValue): HelloBody | string {
  if (!(body instanceof Map)) return 'the body is not a map';
  const fw = body.get(K.hello.fw);
  const maxFrame = body.get(K.hello.maxFrame);
  const sleepPeriodS = body.get(K.hello.sleepPeriodS) ?? 0;
  const keepaliveS = body.get(K.hello.keepaliveS);
  if (fw !== undefined && (typeof fw !== 'string' || fw.length > 64)) return 'key 1 (firmware) must be text of up to 64 characters';
  if (maxFrame !== undefined && !isUint(maxFrame, 0xffff)) return 'key 2 (max frame) must be an unsigned integer';
  if (!isUint(sleepPeriodS, 7 * 86_400)) return 'key 3 (sleep period) must be 0 to 604800 s';
  if (keepaliveS !== undefined && !isUint(keepaliveS, 86_400)) return 'key 4 (keepalive) must be 0 to 86400 s';
  return { fw, maxFrame, sleepPeriodS, keepaliveS };
}
