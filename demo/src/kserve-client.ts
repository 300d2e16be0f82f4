/**
 * A thin HTTP client of the router's KServe v2 infer endpoint, as Triton's own HTTP client calls it. By default it
 * sends and asks for tensors in the binary tensor data extension, as tritonclient.http does (`InferInput.
 * set_data_from_numpy(binary_data=True)` and, with no outputs named, `binary_data_output: true`:
 * src/python/library/tritonclient/http/_infer_input.py and _client.py in triton-inference-server/client): a JSON
 * header, then the tensors' bytes. `json: true` sends and asks for JSON tensors instead. The sample app sends part
 * of its traffic this way so `edge-mesh up` exercises the router's forwarding path too.
 */
import { decodeTensor, isMeshErrorCode, MeshError, type Tensor, tensorFromJson, tensorToJson } from '@edge-mesh/protocol';
import { binaryHeaderLength, HEADER_LENGTH, KSERVE_TO_DTYPE, kserveDatatypeOf } from '@edge-mesh/router';

export interface KServeResult {
  agentId: string;
  outputs: Record<string, Tensor>;
}

/**
 * The `inputs` of a request, encoded once per inputs object and encoding: the sample app sends each sample many
 * times, and encoding an OCR image (300k floats, 6 MB of JSON) takes over 100 ms of its CPU.
 */
const encodedJson = new WeakMap<Record<string, Tensor>, string>();
const encodedBinary = new WeakMap<Record<string, Tensor>, { inputs: string; bytes: Buffer }>();

export function encodeKServeInputs(inputs: Record<string, Tensor>): string {
  let json = encodedJson.get(inputs);
  if (json === undefined) {
    json = JSON.stringify(
      Object.entries(inputs).map(([name, t]) => ({
        name,
        shape: [...t.shape],
        datatype: kserveDatatypeOf(t.dtype),
        data: tensorToJson(t).data,
      })),
    );
    encodedJson.set(inputs, json);
  }
  return json;
}

/** The inputs as the binary extension carries them: their JSON descriptions, and their bytes in the same order. */
export function encodeKServeBinaryInputs(inputs: Record<string, Tensor>): { inputs: string; bytes: Buffer } {
  let encoded = encodedBinary.get(inputs);
  if (encoded === undefined) {
    const sections = Object.values(inputs).map((t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength));
    encoded = {
      inputs: JSON.stringify(
        Object.entries(inputs).map(([name, t], i) => ({
          name,
          shape: [...t.shape],
          datatype: kserveDatatypeOf(t.dtype),
          parameters: { binary_data_size: sections[i]!.length },
        })),
      ),
      bytes: Buffer.concat(sections),
    };
    encodedBinary.set(inputs, encoded);
  }
  return encoded;
}

export interface KServeInferOptions {
  /** JSON tensors both ways instead of the binary extension. */
  json?: boolean;
}

/** A router's answer that is not what the protocol says (a header length past the body, sizes that do not add up). */
const badAnswer = (baseUrl: string, why: string) => new MeshError('MESH_BAD_REQUEST', `the answer from ${baseUrl} is malformed: ${why}`);

/** The JSON header of a binary-extension answer, and the bytes after it (the router's framing rule, kserve.ts). */
function splitAnswer(body: Buffer, headerLength: string): { text: string; rest: Buffer } {
  const length = binaryHeaderLength(headerLength, body.length);
  return { text: body.subarray(0, length).toString('utf8'), rest: body.subarray(length) };
}

export async function kserveInfer(
  baseUrl: string,
  model: string,
  inputs: Record<string, Tensor>,
  deadlineMs: number,
  /** `Authorization` header, e.g. `Bearer meshkey.…` or `Bearer mesh1.…`, for a router that requires one. */
  authorization?: string,
  options: KServeInferOptions = {},
): Promise<KServeResult> {
  const deadline = Math.max(1, Math.round(deadlineMs));
  const timeoutMs = deadlineMs + 1_000;
  // fetch's own failures carry DOM codes (a timeout is DOMException code 23): say what they mean in the mesh's codes.
  // The timeout covers reading the body too, so the body's failures are translated the same way.
  const fetchFailure = (err: unknown, what: string): MeshError =>
    (err as Error).name === 'TimeoutError' || (err as Error).name === 'AbortError'
      ? new MeshError('MESH_DEADLINE_EXCEEDED', `no HTTP ${what} for ${model} within ${timeoutMs} ms`, { cause: err })
      : new MeshError('MESH_NOT_CONNECTED', `${baseUrl}: ${(err as Error).message}`, { cause: err });
  let request: { headers: Record<string, string>; body: string | Buffer };
  if (options.json) {
    request = {
      headers: { 'content-type': 'application/json' },
      body: `{"inputs":${encodeKServeInputs(inputs)},"parameters":{"deadline_ms":${deadline}}}`,
    };
  } else {
    const encoded = encodeKServeBinaryInputs(inputs);
    const header = Buffer.from(`{"inputs":${encoded.inputs},"parameters":{"deadline_ms":${deadline},"binary_data_output":true}}`);
    request = {
      headers: { 'content-type': 'application/octet-stream', [HEADER_LENGTH]: String(header.length) },
      body: Buffer.concat([header, encoded.bytes]),
    };
  }
  let res: Response;
  try {
    res = await fetch(`${baseUrl}/v2/models/${encodeURIComponent(model)}/infer`, {
      method: 'POST',
      headers: { ...request.headers, ...(authorization ? { authorization } : {}) },
      body: request.body,
      signal: AbortSignal.timeout(timeoutMs),
    });
  } catch (err) {
    throw fetchFailure(err, 'answer');
  }
  let text: string;
  let rest: Buffer | undefined;
  try {
    const headerLength = res.headers.get(HEADER_LENGTH);
    if (headerLength === null) text = await res.text();
    else ({ text, rest } = splitAnswer(Buffer.from(await res.arrayBuffer()), headerLength));
  } catch (err) {
    if (err instanceof MeshError) throw err;
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
    outputs?: { name: string; shape: number[]; datatype: string; data?: unknown[]; parameters?: { binary_data_size?: unknown } }[];
  };
  if (!res.ok) {
    // The router's one error body (docs/errors.md): { error, code, details? }.
    const code = isMeshErrorCode(json.code) ? json.code : 'MESH_INTERNAL';
    throw new MeshError(code, json.error ?? `HTTP ${res.status}`, json.details ? { details: json.details } : {});
  }
  // No prototype: an output named __proto__ is an output like any other.
  const outputs: Record<string, Tensor> = Object.create(null);
  let offset = 0;
  if (json.outputs !== undefined && !Array.isArray(json.outputs)) throw badAnswer(baseUrl, 'outputs is not an array');
  for (const o of json.outputs ?? []) {
    if (o === null || typeof o !== 'object' || typeof o.name !== 'string')
      throw badAnswer(baseUrl, 'an output is not an object with a name');
    const dtype = KSERVE_TO_DTYPE[o.datatype as keyof typeof KSERVE_TO_DTYPE] ?? o.datatype;
    const size = o.parameters?.binary_data_size;
    if (size === undefined) {
      outputs[o.name] = tensorFromJson(o.name, dtype, o.shape, o.data);
      continue;
    }
    if (!rest || typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0 || offset + size > rest.length) {
      throw badAnswer(baseUrl, `output ${o.name} claims ${String(size)} bytes, ${rest ? rest.length - offset : 0} are left`);
    }
    outputs[o.name] = decodeTensor(o.name, { dtype: dtype as Tensor['dtype'], shape: o.shape, data: rest.subarray(offset, offset + size) });
    offset += size;
  }
  if (rest && offset !== rest.length) throw badAnswer(baseUrl, `${rest.length - offset} bytes after the last output`);
  return { agentId: json.parameters?.agent ?? 'unknown', outputs };
}
