/**
 * Reloading the models folder while serving (docs/agent.md, "Reloading the models folder"): a real broker, agent and
 * router. A model added to the folder is announced and served; a bad manifest, a file failing its sha256 and a file
 * onnxruntime cannot load are refused with their codes while the agent keeps serving; a changed model is swapped
 * with no request lost; a removed one finishes the requests it had, then leaves the status and answers
 * MESH_UNKNOWN_MODEL. `edge-mesh agent` does the same on SIGHUP.
 */
import assert from 'node:assert/strict';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { sha256File } from '@edge-mesh/agent';
import { sampleInputs } from '@edge-mesh/demo';
import { encodeTensorMap, generateIdentity, type InferRequest, newRequestId, PROTOCOL_VERSION } from '@edge-mesh/protocol';
import { planReload } from '../edge-agent/src/reload.ts';
import { agentFor, brokerFor, modelsDir, rawClient, routerFor, spawnAgent, tempDir, waitFor } from './helpers.ts';

interface Entry {
  name: string;
  file: string;
  sha256: string;
  [k: string]: unknown;
}

async function fullManifest(): Promise<Entry[]> {
  return (JSON.parse(await readFile(path.join(await modelsDir(), 'manifest.json'), 'utf8')) as { models: Entry[] }).models;
}

/** A models folder holding copies of the named models' files and a manifest listing `listed` of them. */
async function folderWith(t: Parameters<typeof tempDir>[0], files: string[]) {
  const all = await fullManifest();
  const dir = await tempDir(t, 'edge-mesh-reload-');
  for (const name of files) {
    const e = all.find((m) => m.name === name)!;
    await copyFile(path.join(await modelsDir(), e.file), path.join(dir, e.file));
  }
  const write = async (entries: Entry[] | string) =>
    writeFile(path.join(dir, 'manifest.json'), typeof entries === 'string' ? entries : JSON.stringify({ models: entries }));
  const entry = (name: string) => ({ ...all.find((m) => m.name === name)! });
  return { dir, write, entry };
}

const request = (model: string, i = 0): InferRequest => ({
  v: PROTOCOL_VERSION,
  kind: 'req',
  id: newRequestId(),
  deadline: Date.now() + 10_000,
  model,
  inputs: encodeTensorMap(sampleInputs(model as 'kws', i)),
});

/** Sends one request for `model` straight to the agent and waits for its reply. */
function ask(raw: Awaited<ReturnType<typeof rawClient>>, agentId: string, model: string, i = 0) {
  const m = request(model, i);
  return raw.request(agentId, m.id, m, 20_000);
}

test('planReload: added, changed (file or sha256), removed and unchanged', () => {
  const e = (name: string, sha: string, file = `${name}.onnx`) => ({ name, file, sha256: sha.repeat(64), version: '1', priceMicros: 0 });
  const served = new Map([
    ['a', e('a', '1')],
    ['b', e('b', '2')],
    ['c', e('c', '3')],
    ['d', e('d', '4')],
  ]);
  const plan = planReload(served, [e('a', '1'), e('b', '9'), e('c', '3', 'c2.onnx'), e('n', '5')]);
  assert.deepEqual(plan.added, ['n']);
  assert.deepEqual(plan.changed, ['b', 'c']);
  assert.deepEqual(plan.removed, ['d']);
  assert.deepEqual(
    plan.load.map((x) => x.name),
    ['b', 'c', 'n'],
  );
});

test('reload: a model added is announced and served; bad manifests and files are refused with codes while serving', {
  timeout: 120_000,
}, async (t) => {
  const broker = await brokerFor(t);
  const folder = await folderWith(t, ['kws', 'ocr-cls']);
  await folder.write([folder.entry('kws')]);
  const agent = await agentFor(t, { brokerUrl: broker.url, modelsDir: folder.dir });
  const router = await routerFor(t, broker.url);
  await router.waitForModel('kws', 10_000);
  const raw = await rawClient(t, broker.url, 'app-reload');
  assert.deepEqual(
    agent.models.map((m) => m.name),
    ['kws'],
  );

  // Unknown before the reload.
  const before = await ask(raw, agent.id, 'ocr-cls');
  assert.equal(before.kind === 'err' && before.code, 'MESH_UNKNOWN_MODEL');

  // Added.
  await folder.write([folder.entry('kws'), folder.entry('ocr-cls')]);
  const added = await agent.reloadModels();
  assert.equal(added.ok, true);
  assert.deepEqual(added.added, ['ocr-cls']);
  assert.deepEqual(added.models, ['kws', 'ocr-cls']);
  assert.deepEqual(
    agent.status().models?.map((m) => m.name),
    ['kws', 'ocr-cls'],
  );
  await router.waitForModel('ocr-cls', 10_000);
  const served = await router.infer('ocr-cls', sampleInputs('ocr-cls', 1), { deadlineMs: 10_000 });
  assert.equal(served.agentId, agent.id);

  // A manifest that is not JSON, then one that fails its schema: refused as MESH_CONFIG; both models still served.
  for (const bad of ['{ not json', JSON.stringify({ models: [{ name: 'kws' }] })]) {
    await folder.write(bad);
    const refused = await agent.reloadModels();
    assert.equal(refused.ok, false);
    assert.equal(refused.code, 'MESH_CONFIG');
    assert.deepEqual(refused.models, ['kws', 'ocr-cls']);
    for (const m of ['kws', 'ocr-cls'] as const) {
      const r = await ask(raw, agent.id, m);
      assert.equal(r.kind, 'res', `${m} after a bad manifest: ${JSON.stringify(r)}`);
    }
  }

  // A changed kws whose file fails its sha256, and a new vad whose file is missing: both refused with
  // MESH_MODEL_INTEGRITY; the running kws keeps running, ocr-cls is untouched.
  const kwsBefore = agent.status().models!.find((m) => m.name === 'kws')!;
  await folder.write([{ ...folder.entry('kws'), sha256: 'f'.repeat(64) }, folder.entry('ocr-cls'), folder.entry('vad')]);
  const integrity = await agent.reloadModels();
  assert.equal(integrity.ok, true);
  assert.deepEqual(integrity.refused.map((r) => [r.model, r.code]).sort(), [
    ['kws', 'MESH_MODEL_INTEGRITY'],
    ['vad', 'MESH_MODEL_INTEGRITY'],
  ]);
  assert.deepEqual(integrity.models, ['kws', 'ocr-cls']);
  assert.deepEqual(
    agent.status().models!.find((m) => m.name === 'kws'),
    kwsBefore,
  );
  const stillKws = await ask(raw, agent.id, 'kws');
  assert.equal(stillKws.kind, 'res');

  // A file that matches its sha256 but is no ONNX model: the load fails, its code is reported, nothing changes.
  const junk = path.join(folder.dir, 'junk.onnx');
  await writeFile(junk, 'not an onnx model');
  await folder.write([
    folder.entry('kws'),
    folder.entry('ocr-cls'),
    { ...folder.entry('vad'), file: 'junk.onnx', sha256: await sha256File(junk) },
  ]);
  const unloadable = await agent.reloadModels();
  assert.deepEqual(
    unloadable.refused.map((r) => r.model),
    ['vad'],
  );
  assert.match(unloadable.refused[0]!.code, /^MESH_/);
  assert.deepEqual(unloadable.models, ['kws', 'ocr-cls']);
  assert.equal((await ask(raw, agent.id, 'kws')).kind, 'res');
});

test('reload: a changed model is swapped with no request lost; a removed one finishes its requests, then leaves', {
  timeout: 120_000,
}, async (t) => {
  const broker = await brokerFor(t);
  const folder = await folderWith(t, ['kws', 'ocr-cls']);
  await folder.write([folder.entry('kws'), folder.entry('ocr-cls')]);
  const agent = await agentFor(t, { brokerUrl: broker.url, modelsDir: folder.dir });
  const raw = await rawClient(t, broker.url, 'app-swap');
  const lanesAtStart = agent.loadReport().workers;

  // Changed: kws now comes from another file (same bytes), a new version. Requests keep flowing across the swap.
  const kws = folder.entry('kws');
  await copyFile(path.join(folder.dir, kws.file), path.join(folder.dir, 'kws-v2.onnx'));
  await folder.write([{ ...kws, file: 'kws-v2.onnx', version: '2' }, folder.entry('ocr-cls')]);
  const during = Array.from({ length: 40 }, (_, i) => {
    const m = request('kws', i);
    return new Promise((r) => setTimeout(r, i * 5)).then(() => raw.request(agent.id, m.id, m, 20_000));
  });
  const changed = await agent.reloadModels();
  assert.deepEqual(changed.changed, ['kws']);
  const answers = await Promise.all(during);
  assert.deepEqual(
    answers.filter((a) => a.kind !== 'res'),
    [],
    'a request failed across the swap',
  );
  assert.equal(agent.status().models!.find((m) => m.name === 'kws')!.version, '2');
  // The old kws executors close once idle: the agent's lanes come back to what they were.
  await waitFor(() => agent.loadReport().workers === lanesAtStart, 10_000, 'the replaced executors to close');

  // Removed: ocr-cls requests sent just before the reload are answered; after it, ocr-cls is unknown and gone
  // from the status.
  await folder.write([{ ...kws, file: 'kws-v2.onnx', version: '2' }]);
  const inFlight = Array.from({ length: 6 }, (_, i) => {
    const m = request('ocr-cls', i);
    return raw.request(agent.id, m.id, m, 20_000);
  });
  await new Promise((r) => setTimeout(r, 20));
  const removed = await agent.reloadModels();
  assert.deepEqual(removed.removed, ['ocr-cls']);
  assert.deepEqual(removed.models, ['kws']);
  for (const a of await Promise.all(inFlight)) assert.equal(a.kind, 'res', JSON.stringify(a));
  assert.deepEqual(
    agent.status().models!.map((m) => m.name),
    ['kws'],
  );
  const after = await ask(raw, agent.id, 'ocr-cls');
  assert.equal(after.kind === 'err' && after.code, 'MESH_UNKNOWN_MODEL');
  assert.equal((await ask(raw, agent.id, 'kws')).kind, 'res');
});

test('`edge-mesh agent` reloads its models folder on SIGHUP', { timeout: 120_000 }, async (t) => {
  const broker = await brokerFor(t);
  const folder = await folderWith(t, ['kws', 'ocr-cls']);
  await folder.write([folder.entry('kws')]);
  const identity = generateIdentity('agent');
  const child = await spawnAgent(t, broker.url, identity, ['--models', folder.dir]);
  const router = await routerFor(t, broker.url);
  await router.waitForModel('kws', 10_000);

  await folder.write([folder.entry('kws'), folder.entry('ocr-cls')]);
  child.kill('SIGHUP');
  await router.waitForModel('ocr-cls', 30_000);
  const r = await router.infer('ocr-cls', sampleInputs('ocr-cls', 2), { deadlineMs: 10_000 });
  assert.equal(r.agentId, identity.id);
  assert.match(child.stderrText(), /"added":\["ocr-cls"\].*"msg":"models reloaded"/);

  // A broken manifest: logged with its code, the process keeps serving both.
  await folder.write('{ broken');
  child.kill('SIGHUP');
  await waitFor(() => child.stderrText().includes('models reload refused'), 10_000, 'the refusal in the log');
  assert.match(child.stderrText(), /"code":"MESH_CONFIG".*"msg":"models reload refused; serving the models it had"/);
  assert.equal(child.exitCode, null);
  const again = await router.infer('ocr-cls', sampleInputs('ocr-cls', 3), { deadlineMs: 10_000 });
  assert.equal(again.agentId, identity.id);
});
