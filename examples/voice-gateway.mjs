// A voice gateway: raw 16 kHz audio in, wake-word detections out, through the mesh's `wakeword` pipeline
// (docs/pipelines.md). Each 2 s window, every 0.5 s, is one pipeline run: its three models may each run on a
// different agent, within one deadline.
//
//   npm start                                            # the local mesh, in another terminal
//   node examples/voice-gateway.mjs clip.wav             # 16 kHz mono 16-bit WAV
//   arecord -f S16_LE -r 16000 -c 1 -d 5 | node examples/voice-gateway.mjs -
//
// Environment: MESH_BROKER (default mqtt://127.0.0.1:1883), MESH_APP_KEY (default .mesh-data/keys/app.key; without
// the file an ephemeral key is used, which only an open broker accepts). Prints one JSON line per window.
import { readFile } from 'node:fs/promises';
import { connect, parseKeyFile } from '@edge-mesh/sdk';

const RATE = 16_000;
const WINDOW = 2 * RATE;
const HOP = RATE / 2;

/** 16-bit PCM samples of a WAV file (16 kHz mono only), or of raw s16le bytes. */
function samplesOf(bytes) {
  let pcm = bytes;
  if (bytes.subarray(0, 4).toString('latin1') === 'RIFF') {
    const channels = bytes.readUInt16LE(22);
    const rate = bytes.readUInt32LE(24);
    const bits = bytes.readUInt16LE(34);
    if (channels !== 1 || rate !== RATE || bits !== 16)
      throw new Error(`need 16 kHz mono 16-bit audio, got ${rate} Hz, ${channels} ch, ${bits} bit`);
    let at = 12;
    while (bytes.subarray(at, at + 4).toString('latin1') !== 'data') at += 8 + bytes.readUInt32LE(at + 4);
    pcm = bytes.subarray(at + 8, at + 8 + bytes.readUInt32LE(at + 4));
  }
  const samples = new Int16Array(pcm.length >> 1);
  for (let i = 0; i < samples.length; i++) samples[i] = pcm.readInt16LE(i * 2);
  return samples;
}

async function readInput(name) {
  if (name !== '-') return readFile(name);
  const chunks = [];
  for await (const chunk of process.stdin) chunks.push(chunk);
  return Buffer.concat(chunks);
}

const input = process.argv[2];
if (!input) {
  console.error('usage: node examples/voice-gateway.mjs <clip.wav | ->');
  process.exit(2);
}
const keyFile = process.env.MESH_APP_KEY ?? '.mesh-data/keys/app.key';
const identity = await readFile(keyFile, 'utf8').then(parseKeyFile, () => undefined);
const mesh = await connect({ brokerUrl: process.env.MESH_BROKER ?? 'mqtt://127.0.0.1:1883', ...(identity ? { identity } : {}) });
try {
  const samples = samplesOf(await readInput(input));
  for (let end = WINDOW; end <= samples.length; end += HOP) {
    const audio = { dtype: 'int16', shape: [1, WINDOW], data: samples.slice(end - WINDOW, end) };
    const { outputs, stages, totalMs } = await mesh.pipeline('wakeword', { audio }, { deadlineMs: 2_000 });
    console.log(
      JSON.stringify({
        at_s: end / RATE,
        score: Number(outputs.score.data[0].toFixed(4)),
        detected: outputs.detected.data[0] === 1,
        ms: Math.round(totalMs),
        stages: stages.map((s) => `${s.stage}@${s.agentId}`),
      }),
    );
  }
} finally {
  await mesh.close();
}
