/**
 * A thin HTTP client of the router's KServe v2 infer endpoint, as an existing Triton/KServe client
 * would call it: JSON tensors in, JSON tensors out. The sample app sends part of its traffic this way
 * so `edge-mesh up` exercises the router's forwarding path too.
 */
import { isMeshErrorCode, MeshError, type Tensor, tensorFromJson, tensorToJson } from '@edge-mesh/protocol';
import { KSERVE_TO_DTYPE, kserveDatatypeOf } from '@edge-mesh/router';

export interface KServeResult {
  agentId: string;
  outputs: Record<string, Tensor>;
}

/**
 * The JSON `inputs` of a request body, encoded once per inputs object: the sample app sends each sample
 * many times, and encoding an OCR image (300k floats, 6 MB of JSON) takes over 100 ms of its CPU.
 */
const encodedInputs = new WeakMap<Record<string, Tensor>, string>();

export function encodeKServeInputs(inputs: Record<string, Tensor>): string {
  let json = encodedInputs.get(inputs);
  if (json === undefined) {
    json = JSON.stringify(
      Object.entries(inputs).map(([name, t]) => ({
        name,
        shape: [...t.shape],
        datatype: kserveDatatypeOf(t.dtype),
        data: tensorToJson(t).data,
      })),
    );
    encodedInputs.set(inputs, json);
  }
  return json;
}

export async function kserveInfer(
  baseUrl: string,
  model: string,
  inputs: Record<string, Tensor>,
  deadlineMs: number,
  /** `Authorization` header, e.g. `Bearer meshkey.…` or `Bearer mesh1.…`, for a router that requires one. */
  authorization?: string,
): Promise<KServeResult> {
  const parameters = JSON.stringify({ deadline_ms: Math.max(1, Math.round(deadlineMs)) });
  const timeoutMs = deadlineMs + 1_000;
  // fetch's own failures carry DOM codes (a timeout is DOMException code 23): say what they mean in the mesh's codes.
  // The timeout covers reading the body too, so the body's failures are translated the same way.
  const fetchFailure = (err: unknown, what: string): MeshError =>
    (err as Error).name === 'TimeoutError' || (err as Error).name === 'AbortError'
      ? new MeshError('MESH_DEADLINE_EXCEEDED', `no HTTP ${what} for ${model} within ${timeoutMs} ms`, { cause: err })
      : new MeshError('MESH_NOT_CONNECTED', `${baseUrl}: ${(err as Error).message}`, { cause: err });
  let res: Response;
  try {
    res = await fetch(`${baseUrl}/v2/models/${encodeURIComponent(model)}/infer`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', ...(authorization ? { authorization } : {}) },
      body: `{"inputs":${encodeKServeInputs(inputs)},"parameters":${parameters}}`,
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    throw fetchFailure(err, 'answer');
  }
  let text: string;
  try {
    text = await res.text();
  } catch (err) {
    throw fetchFailure(err, 'body');
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    parsed = err;
  }
  if (parsed === null || typeof parsed !== 'object' || parsed instanceof Error) {
    const why = parsed instanceof Error ? parsed.message : `a JSON ${parsed === null ? 'null' : typeof parsed}`;
    throw new MeshError('MESH_BAD_REQUEST', `HTTP ${res.status} from ${baseUrl} is not a JSON object: ${why}`, {
      ...(parsed instanceof Error ? { cause: parsed } : {}),
      details: { status: res.status },
    });
  }
  const json = parsed as {
    code?: string;
    error?: string;
    details?: Record<string, unknown>;
    parameters?: { agent?: string };
    outputs?: { name: string; shape: number[]; datatype: string; data: unknown[] }[];
  };
  if (!res.ok) {
    // The router's one error body (docs/errors.md): { error, code, details? }.
    const code = isMeshErrorCode(json.code) ? json.code : 'MESH_INTERNAL';
    throw new MeshError(code, json.error ?? `HTTP ${res.status}`, json.details ? { details: json.details } : {});
  }
  const outputs: Record<string, Tensor> = {};
  for (const o of json.outputs ?? [])
    outputs[o.name] = tensorFromJson(o.name, KSERVE_TO_DTYPE[o.datatype as keyof typeof KSERVE_TO_DTYPE] ?? o.datatype, o.shape, o.data);
  return { agentId: json.parameters?.agent ?? 'unknown', outputs };
}
