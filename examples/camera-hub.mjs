// A camera hub: frames in, the text in them out, through the router's KServe v2 HTTP API, where the `ocr` pipeline
// is a model like any other (an ensemble, in Triton's words; docs/pipelines.md). The request is what Triton's
// clients send: a JSON header, then the frame's raw bytes (the binary tensor data extension).
//
//   npm start                                            # the local mesh, in another terminal
//   node examples/camera-hub.mjs frame.ppm [more.ppm ...]  # binary PPM (P6) frames, 8-bit RGB
//
// Environment: MESH_ROUTER_URL (default http://127.0.0.1:8080), MESH_API_KEY (default: the contents of
// .mesh-data/keys/app-http.key, which `npm start` writes; none is sent when neither is there).
import { readFile } from 'node:fs/promises';

/** A binary PPM (P6, maxval 255) as { width, height, rgb }. */
function readPpm(bytes) {
  const header = [];
  let at = 0;
  while (header.length < 4) {
    while (/\s/.test(String.fromCharCode(bytes[at]))) at++;
    if (bytes[at] === 0x23) {
      while (bytes[at] !== 0x0a) at++;
      continue;
    }
    const start = at;
    while (!/\s/.test(String.fromCharCode(bytes[at]))) at++;
    header.push(bytes.subarray(start, at).toString('latin1'));
  }
  const [magic, width, height, maxval] = header;
  if (magic !== 'P6' || maxval !== '255') throw new Error('need a binary PPM (P6) with maxval 255');
  return { width: Number(width), height: Number(height), rgb: bytes.subarray(at + 1, at + 1 + Number(width) * Number(height) * 3) };
}

const routerUrl = process.env.MESH_ROUTER_URL ?? 'http://127.0.0.1:8080';
const apiKey =
  process.env.MESH_API_KEY ??
  (await readFile('.mesh-data/keys/app-http.key', 'utf8').then(
    (k) => k.trim(),
    () => undefined,
  ));
const frames = process.argv.slice(2);
if (frames.length === 0) {
  console.error('usage: node examples/camera-hub.mjs <frame.ppm> [...]');
  process.exit(2);
}
for (const file of frames) {
  const { width, height, rgb } = readPpm(await readFile(file));
  const header = Buffer.from(
    JSON.stringify({
      inputs: [{ name: 'image', shape: [height, width, 3], datatype: 'UINT8', parameters: { binary_data_size: rgb.length } }],
      outputs: [{ name: 'text', parameters: { binary_data: true } }, { name: 'confidence' }],
      parameters: { deadline_ms: 5_000 },
    }),
  );
  const res = await fetch(`${routerUrl}/v2/models/ocr/infer`, {
    method: 'POST',
    headers: {
      'content-type': 'application/octet-stream',
      'inference-header-content-length': String(header.length),
      ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}),
    },
    body: Buffer.concat([header, rgb]),
  });
  const body = Buffer.from(await res.arrayBuffer());
  if (!res.ok) {
    console.log(JSON.stringify({ frame: file, status: res.status, error: JSON.parse(body.toString('utf8')) }));
    continue;
  }
  const jsonLength = Number(res.headers.get('inference-header-content-length') ?? body.length);
  const reply = JSON.parse(body.subarray(0, jsonLength).toString('utf8'));
  const text = body.subarray(jsonLength).toString('utf8'); // the one binary output
  const confidence = reply.outputs.find((o) => o.name === 'confidence')?.data ?? [];
  console.log(
    JSON.stringify({ frame: file, text, confidence, stages: reply.parameters.stages, ms: Math.round(reply.parameters.total_ms) }),
  );
}
