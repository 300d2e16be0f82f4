/**
 * `edge-mesh deploy`, `rollout status`, `promote` and `rollback` (docs/cli.md) as child processes against a real
 * broker on port 0, a router with rollouts and API keys, and an agent on a generated model. The model comes from a
 * Triton model repository written here (config.pbtxt, numbered version folders, default_model_filename). Then bad
 * input, each with its code and exit status, and what a lying router or an untrusted key gets.
 */
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, writeFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { parseTextProto, readTritonConfig } from '@edge-mesh/agent';
import { generateIdentity, signDeployment, signedDeploymentToJson } from '@edge-mesh/protocol';
import { makeApiKey, type RouterHandle } from '@edge-mesh/router';
import { agentFor, brokerFor, keyFileFor, ROOT, routerFor, spawnAgent, tempDir, waitFor } from './helpers.ts';
import { SCALE_WIDTH, scaleModel } from './scale-model.ts';

const run = promisify(execFile);
const BIN = path.join(ROOT, 'cli/bin/edge-mesh.mjs');
const GROUP = 'edge-pis';
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

async function edgeMesh(args: string[], env: Record<string, string> = {}): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, [BIN, ...args], {
      timeout: 60_000,
      env: { ...process.env, MESH_API_KEY: '', ...env },
    });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

const CONFIG = (name: string, extra = '') => `# written by the test
name: "${name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [
  {
    name: "x"
    data_type: TYPE_FP32
    dims: [ 1, ${SCALE_WIDTH} ]
  }
]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 1, ${SCALE_WIDTH} ] } ]
${extra}
`;

/** A Triton repository: `<dir>/<model>/config.pbtxt` and `<dir>/<model>/<version>/<file>`. */
async function tritonRepo(
  dir: string,
  model: string,
  config: string | undefined,
  versions: Record<string, { file: string; bytes: Buffer } | null>,
) {
  await mkdir(path.join(dir, model), { recursive: true });
  if (config !== undefined) await writeFile(path.join(dir, model, 'config.pbtxt'), config);
  for (const [v, content] of Object.entries(versions)) {
    await mkdir(path.join(dir, model, v), { recursive: true });
    if (content) await writeFile(path.join(dir, model, v, content.file), content.bytes);
  }
  return dir;
}

function answers(router: RouterHandle, n: number): Promise<number[]> {
  const x = new Float32Array(SCALE_WIDTH).fill(1);
  return Promise.all(
    Array.from({ length: n }, async () => {
      const r = await router.infer('scale', { x: { dtype: 'float32', shape: [1, SCALE_WIDTH], data: x } }, { deadlineMs: 10_000 });
      return (r.outputs.y!.data as Float32Array)[0]!;
    }),
  );
}

test('config.pbtxt: the text format Triton writes, and what an ONNX deployment refuses', () => {
  const parsed = parseTextProto('a: 1 b { c: "q\\"x" d: [1, -2] } e: ENUM_V; b < c: \'y\' >');
  assert.deepEqual(parsed, { a: [1], b: [{ c: ['q"x'], d: [1, -2] }, { c: ['y'] }], e: ['ENUM_V'] });
  const config = readTritonConfig(CONFIG('scale', 'default_model_filename: "scale.onnx"\nmax_batch_size: 4'));
  assert.deepEqual(config, {
    name: 'scale',
    maxBatchSize: 4,
    defaultModelFilename: 'scale.onnx',
    inputs: [{ name: 'x', dtype: 'float32', dims: [1, SCALE_WIDTH] }],
    outputs: [{ name: 'y', dtype: 'float32', dims: [1, SCALE_WIDTH] }],
  });
  for (const [text, why] of [
    ['platform: "tensorrt_plan"', /not ONNX Runtime/],
    ['input { name: "x" data_type: TYPE_STRING dims: [1] }', /TYPE_STRING is not one/],
    ['default_model_filename: "../../etc/passwd"', /not a file name/],
    ['name: "a" input {', /expected a field name|unexpected end/],
    ['max_batch_size: -1', /max_batch_size/],
  ] as const)
    assert.throws(
      () => readTritonConfig(text),
      (e: Error & { code?: string }) => e.code === 'MESH_CONFIG' && why.test(e.message),
      text,
    );
});

test('edge-mesh deploy from a Triton repository, rollout status, rollback, promote; bad input refused with its code', {
  timeout: 240_000,
}, async (t) => {
  const broker = await brokerFor(t);
  const operator = generateIdentity('operator');
  const stranger = generateIdentity('operator');
  const operators = new Map([[operator.id, operator.publicKey]]);
  const admin = makeApiKey('admin', ['read', 'operator']);
  const viewer = makeApiKey('viewer', ['read']);
  const router = await routerFor(t, broker.url, {
    http: { port: 0, auth: { trustedOperators: [], apiKeys: [admin.entry, viewer.entry] } },
    rollouts: { operators, dir: await tempDir(t), judgeEveryMs: 100 },
  });
  const url = router.http!.url;
  const v1 = scaleModel(1);
  const v2 = scaleModel(2);
  const v3 = scaleModel(3);
  const folder = await tempDir(t);
  await writeFile(path.join(folder, 'scale.onnx'), v1);
  await writeFile(
    path.join(folder, 'manifest.json'),
    JSON.stringify({ models: [{ name: 'scale', version: '1', file: 'scale.onnx', sha256: sha(v1), priceMicros: 0 }] }),
  );
  const agent = await agentFor(t, {
    brokerUrl: broker.url,
    modelsDir: folder,
    deploy: { operators, groups: [GROUP], stateDir: await tempDir(t), bundleBaseUrls: [url] },
  });
  await router.waitForModel('scale', 10_000);

  const dir = await tempDir(t);
  const keyFile = await keyFileFor(t, operator);
  const apiKeyFile = path.join(dir, 'admin.key');
  await writeFile(apiKeyFile, `${admin.key}\n`, { mode: 0o600 });
  const repo = await tritonRepo(path.join(dir, 'repo'), 'scale', CONFIG('scale'), {
    '1': { file: 'model.onnx', bytes: v1 },
    '2': { file: 'model.onnx', bytes: v2 },
    // Triton ignores a folder whose name is not a number or starts with 0; so does deploy when it picks the highest.
    '07': { file: 'model.onnx', bytes: v3 },
    latest: { file: 'model.onnx', bytes: v3 },
  });
  const common = ['--model', 'scale', '--group', GROUP, '--key', keyFile, '--router', url, '--api-key-file', apiKeyFile];
  const plan = ['--canary-share', '0.5', '--min-requests', '100000'];

  // Every command has --help.
  for (const cmd of [['deploy'], ['rollout', 'status'], ['rollback'], ['promote']]) {
    const help = await edgeMesh([...cmd, '--help']);
    assert.equal(help.code, 0);
    assert.match(help.stdout, /--router <url>/, cmd.join(' '));
  }

  // Bad command lines: 64.
  assert.equal((await edgeMesh(['deploy', repo, '--model', 'scale', '--key', keyFile, '--router', url])).code, 64, 'no --group');
  assert.equal((await edgeMesh(['deploy', repo, ...common, '--canary-share', '1.5'])).code, 64, 'a share of 1.5');
  assert.equal((await edgeMesh(['deploy', repo, ...common, '--max-p95-ratio', '0.5'])).code, 64, 'a ratio below 1');
  assert.equal((await edgeMesh(['deploy', repo, ...common, '--group', 'X!'])).code, 64, 'a bad group');
  const noVersion = await edgeMesh(['deploy', path.join(repo, 'scale', '2', 'model.onnx'), ...common]);
  assert.equal(noVersion.code, 64, 'an .onnx file needs --version');
  assert.match(noVersion.stderr, /--version is needed/);

  // Bad configuration: 78, MESH_CONFIG, and nothing reaches the router.
  const config78 = async (args: string[], why: RegExp) => {
    const r = await edgeMesh(args);
    assert.equal(r.code, 78, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /MESH_CONFIG/);
    assert.match(r.stderr, why);
  };
  const otherName = await tritonRepo(path.join(dir, 'other-name'), 'scale', CONFIG('kws'), { '1': { file: 'model.onnx', bytes: v2 } });
  await config78(['deploy', otherName, ...common], /names model kws, but its folder is scale/);
  await config78(['deploy', repo, ...common, '--version', 'latest'], /not numerically named/);
  await config78(['deploy', repo, ...common, '--version', '07'], /not numerically named/);
  await config78(['deploy', repo, ...common, '--version', '5'], /no version folder 5/);
  const noFile = await tritonRepo(path.join(dir, 'no-file'), 'scale', CONFIG('scale'), { '1': null });
  await config78(['deploy', noFile, ...common], /model\.onnx is missing/);
  const noVersions = await tritonRepo(path.join(dir, 'no-versions'), 'scale', CONFIG('scale'), { v1: { file: 'model.onnx', bytes: v2 } });
  await config78(['deploy', noVersions, ...common], /no numerically named version folder \(v1 are not version numbers\)/);
  const wrongInput = await tritonRepo(path.join(dir, 'wrong-input'), 'scale', CONFIG('scale').replace('name: "x"', 'name: "image"'), {
    '1': { file: 'model.onnx', bytes: v2 },
  });
  await config78(['deploy', wrongInput, ...common], /declares input image, but .* has x/);
  const wrongDims = await tritonRepo(
    path.join(dir, 'wrong-dims'),
    'scale',
    CONFIG('scale').replace(`dims: [ 1, ${SCALE_WIDTH} ]`, 'dims: [ 3, 224, 224 ]'),
    {
      '1': { file: 'model.onnx', bytes: v2 },
    },
  );
  await config78(['deploy', wrongDims, ...common], /gives input x dims \[3, 224, 224\]/);
  await config78(['deploy', path.join(dir, 'nowhere'), ...common], /does not exist/);
  await config78(['deploy', repo, ...common, '--key', await keyFileFor(t, generateIdentity('agent'))], /role agent/);
  assert.deepEqual(router.rollouts!.status(), [], 'no bad input reached the router');

  // Credentials: none is 401, a read-only key cannot upload or post a step (exit 1).
  const noKey = await edgeMesh(['deploy', repo, ...common.slice(0, -2)]);
  assert.equal(noKey.code, 1);
  assert.match(noKey.stderr, /MESH_UNAUTHORIZED.*--api-key-file/);
  const readOnly = await edgeMesh(['deploy', repo, ...common.slice(0, -2), ...plan], { MESH_API_KEY: viewer.key });
  assert.equal(readOnly.code, 1, readOnly.stderr);
  assert.match(readOnly.stderr, /MESH_FORBIDDEN|MESH_UNAUTHORIZED/);
  // A key the router and agents do not trust: the router refuses the step.
  const untrusted = await edgeMesh(['deploy', repo, ...common, ...plan, '--key', await keyFileFor(t, stranger)]);
  assert.equal(untrusted.code, 1);
  assert.match(untrusted.stderr, /MESH_UNAUTHORIZED.*not trusted/);
  assert.deepEqual(router.rollouts!.status(), []);

  // deploy: the highest numbered version folder (2), compared with what the agent serves (1).
  const deployed = await edgeMesh(['deploy', repo, ...common, ...plan, '--notes', 'first canary']);
  assert.equal(deployed.code, 0, deployed.stderr);
  const out = JSON.parse(deployed.stdout) as {
    version: string;
    layout: string;
    sha256: string;
    seq: number;
    previous: { version: string; sha256: string };
    plan: { minP95DeltaMs?: number };
  };
  assert.equal(out.version, '2');
  assert.ok(!('minP95DeltaMs' in out.plan), 'by default the field is left out, for agents that predate it');
  assert.equal(out.layout, 'triton');
  assert.equal(out.sha256, sha(v2));
  assert.deepEqual(out.previous, { version: '1', sha256: sha(v1) });
  await waitFor(() => router.rollouts!.status('scale')[0]?.canaryAgents === 1, 20_000, 'the agent to announce the canary');
  const during = await answers(router, 60);
  assert.ok(during.includes(1) && during.includes(2), `both versions answer during the canary: ${[...new Set(during)]}`);
  assert.ok(during.every((f) => f === 1 || f === 2));

  // A second deploy while the canary runs is refused.
  const twice = await edgeMesh(['deploy', repo, ...common, ...plan]);
  assert.equal(twice.code, 1);
  assert.match(twice.stderr, /MESH_BAD_REQUEST.*canary of scale 2 is running/);

  // rollout status: the table, the window, the audit; and the JSON.
  const status = await edgeMesh(['rollout', 'status', 'scale', '--router', url, '--api-key-file', apiKeyFile]);
  assert.equal(status.code, 0, status.stderr);
  assert.match(
    status.stdout,
    /^MODEL +GROUP +PHASE +VERSION +PREVIOUS +SEQ +SHARE +CANARY-AGENTS +PREVIOUS-WINDOW +CANARY-WINDOW +VERDICT\n/,
  );
  assert.match(
    status.stdout,
    new RegExp(`scale +${GROUP} +canary +2 +1 +${out.seq} +50\\.0% +1 +\\d+ req 0\\.0% err p95 [\\d.]+ms +\\d+ req`),
  );
  assert.match(
    status.stdout,
    new RegExp(`\\nAT +PHASE +VERSION +SEQ +BY +REASON\\n\\S+ +canary +2 +${out.seq} +${operator.id} +posted by an operator: first canary`),
  );
  const statusJson = JSON.parse(
    (await edgeMesh(['rollout', 'status', '--router', url, '--json'], { MESH_API_KEY: viewer.key })).stdout,
  ) as {
    rollouts: { model: string; phase: string; stats: { previous: { requests: number }; next: { requests: number } } }[];
  };
  assert.equal(statusJson.rollouts[0]!.phase, 'canary');
  assert.equal(statusJson.rollouts[0]!.stats.previous.requests + statusJson.rollouts[0]!.stats.next.requests, 60);
  const none = await edgeMesh(['rollout', 'status', 'kws', '--router', url], { MESH_API_KEY: viewer.key });
  assert.equal(none.code, 1);
  assert.match(none.stderr, /MESH_NOT_FOUND/);

  // rollback: signed by the operator, the agent drops 2 and every answer is 1 again.
  const rolledBack = await edgeMesh([
    'rollback',
    'scale',
    '--key',
    keyFile,
    '--router',
    url,
    '--api-key-file',
    apiKeyFile,
    '--reason',
    'too warm',
  ]);
  assert.equal(rolledBack.code, 0, rolledBack.stderr);
  assert.equal(router.rollouts!.status('scale')[0]!.phase, 'rolled-back');
  await waitFor(() => agent.status().canaries === undefined, 10_000, 'the agent to drop the canary');
  assert.deepEqual([...new Set(await answers(router, 20))], [1]);
  const last = router.rollouts!.auditLog('scale').at(-1)!;
  assert.deepEqual([last.phase, last.version, last.by], ['rolled-back', '2', operator.id]);
  assert.match(last.reason, /too warm/);
  // Nothing to roll back or promote now.
  for (const cmd of ['rollback', 'promote']) {
    const again = await edgeMesh([cmd, 'scale', '--key', keyFile, '--router', url, '--api-key-file', apiKeyFile]);
    assert.equal(again.code, 1, cmd);
    assert.match(again.stderr, /MESH_BAD_REQUEST.*no canary of scale is running: its last step is rolled-back 2/);
  }
  assert.equal((await edgeMesh(['rollback', 'kws', '--key', keyFile, '--router', url, '--api-key-file', apiKeyFile])).code, 1);

  // default_model_filename: version 3 stored as 3/scale.onnx; deployed, then promoted by the operator.
  const renamed = await tritonRepo(path.join(dir, 'renamed'), 'scale', CONFIG('scale', 'default_model_filename: "scale.onnx"'), {
    '3': { file: 'scale.onnx', bytes: v3 },
  });
  const third = await edgeMesh(['deploy', path.join(renamed, 'scale'), ...common, ...plan, '--min-p95-delta-ms', '5']);
  assert.equal(third.code, 0, third.stderr);
  const thirdOut = JSON.parse(third.stdout) as { version: string; previous: { version: string }; seq: number; plan: object };
  assert.deepEqual(thirdOut.plan, {
    canaryShare: 0.5,
    minRequests: 100000,
    maxErrorRateDelta: 0.01,
    maxP95LatencyRatio: 1.5,
    minP95DeltaMs: 5,
  });
  assert.equal(thirdOut.version, '3');
  assert.equal(thirdOut.previous.version, '1', 'after a rollback the previous version is the one still served');
  assert.ok(thirdOut.seq > out.seq);
  await waitFor(() => agent.status().canaries?.[0]?.version === '3', 20_000, 'the canary of 3');
  const promoted = await edgeMesh(['promote', 'scale', '--key', keyFile, '--router', url], { MESH_API_KEY: admin.key });
  assert.equal(promoted.code, 0, promoted.stderr);
  await waitFor(() => agent.status().models?.[0]?.version === '3' && !agent.status().canaries, 20_000, 'the agent to serve 3');
  assert.deepEqual([...new Set(await answers(router, 20))], [3]);
  // Deploying what is already served is refused.
  const same = await edgeMesh(['deploy', path.join(renamed, 'scale'), ...common, ...plan]);
  assert.equal(same.code, 1);
  assert.match(same.stderr, /is what the agents serve already/);
  assert.deepEqual(
    router.rollouts!.auditLog('scale').map((e) => [e.phase, e.version]),
    [
      ['canary', '2'],
      ['rolled-back', '2'],
      ['canary', '3'],
      ['promoted', '3'],
    ],
  );
});

test('a lying router gets nothing signed: a status that disagrees with its audit log, a bundle stored under another hash', async (t) => {
  const operator = generateIdentity('operator');
  const keyFile = await keyFileFor(t, operator);
  const v2 = scaleModel(2);
  const v3 = scaleModel(3);
  // A real canary step of version 2 at seq 3, which the router then claims is version 9 at seq 5.
  const real = signDeployment(operator, {
    v: 1,
    kind: 'deployment',
    operator: operator.id,
    seq: 3,
    issuedAt: Date.now(),
    group: GROUP,
    model: 'scale',
    version: '2',
    sha256: sha(v2),
    size: v2.byteLength,
    priceMicros: 0,
    phase: 'canary',
    previous: { version: '1', sha256: sha(scaleModel(1)) },
    plan: { canaryShare: 0.5, minRequests: 10, maxErrorRateDelta: 0.01, maxP95LatencyRatio: 2 },
  });
  const posted: string[] = [];
  const liar = createServer((req, res) => {
    res.setHeader('content-type', 'application/json');
    if (req.method === 'POST' && req.url === '/v1/deployments') posted.push('step');
    if (req.url === '/v1/rollouts/scale')
      return res.end(
        JSON.stringify({
          rollout: { model: 'scale', group: GROUP, version: '9', seq: 5, phase: 'canary', plan: {}, canaryAgents: 1 },
          audit: [
            {
              at: 0,
              model: 'scale',
              version: '2',
              seq: 3,
              phase: 'canary',
              by: operator.id,
              reason: '',
              step: signedDeploymentToJson(real),
              prev: '',
            },
          ],
        }),
      );
    if (req.url === '/v1/rollouts/other') {
      res.statusCode = 404;
      return res.end(JSON.stringify({ code: 'MESH_NOT_FOUND', error: 'none' }));
    }
    if (req.url === '/v1/agents')
      return res.end(JSON.stringify({ agents: [{ up: true, models: [{ name: 'other', version: '1', sha256: sha(scaleModel(1)) }] }] }));
    if (req.method === 'PUT' && req.url === '/v1/bundles') {
      req.resume();
      return req.on('end', () => res.end(JSON.stringify({ sha256: sha(v3), size: v2.byteLength })));
    }
    res.statusCode = 404;
    res.end('{}');
  });
  await new Promise<void>((r) => liar.listen(0, '127.0.0.1', r));
  t.after(() => liar.close());
  const url = `http://127.0.0.1:${(liar.address() as { port: number }).port}`;
  const r = await edgeMesh(['rollback', 'scale', '--key', keyFile, '--router', url]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /MESH_INTERNAL.*disagree/);
  const file = path.join(await tempDir(t), 'other.onnx');
  await writeFile(file, v2);
  const d = await edgeMesh(['deploy', file, '--model', 'other', '--version', '2', '--group', GROUP, '--key', keyFile, '--router', url]);
  assert.equal(d.code, 1);
  assert.match(d.stderr, /MESH_MODEL_INTEGRITY.*stored the bundle as/);
  assert.deepEqual(posted, [], 'no step was posted to the lying router');
});

test('the whole flow from the command line: edge-mesh router --rollouts-dir, edge-mesh agent --deploy-group --memory-budget-mb, deploy, rollout status, promote', {
  timeout: 240_000,
}, async (t) => {
  const broker = await brokerFor(t);
  const operator = generateIdentity('operator');
  const dir = await tempDir(t);
  const keyFile = await keyFileFor(t, operator);
  // The agent and the router trust the operator's public half only.
  const pubFile = path.join(dir, 'operator.pub');
  await writeFile(
    pubFile,
    JSON.stringify({ role: 'operator', id: operator.id, publicKey: Buffer.from(operator.publicKey).toString('base64url') }),
  );
  const admin = makeApiKey('admin', ['read', 'operator']);
  const apiKeys = path.join(dir, 'api-keys.json');
  await writeFile(apiKeys, JSON.stringify([admin.entry]));

  // Bad combinations of the new flags: 78 before anything starts.
  const alone = await edgeMesh(['agent', '--models', dir, '--broker', broker.url, '--memory-budget-mb', '64']);
  assert.equal(alone.code, 78);
  assert.match(alone.stderr, /--memory-budget-mb needs --deploy-group/);
  const noOperator = await edgeMesh(['agent', '--models', dir, '--broker', broker.url, '--deploy-group', GROUP]);
  assert.equal(noOperator.code, 78);
  assert.match(noOperator.stderr, /--deploy-group needs --deploy-operator/);
  const routerAlone = await edgeMesh(['router', '--broker', broker.url, '--rollouts-dir', dir]);
  assert.equal(routerAlone.code, 78);
  assert.match(routerAlone.stderr, /--rollout-operator/);

  const router = spawn(
    process.execPath,
    [
      BIN,
      'router',
      '--broker',
      broker.url,
      '--http-port',
      '0',
      '--http-api-keys',
      apiKeys,
      '--rollouts-dir',
      path.join(dir, 'rollouts'),
      '--rollout-operator',
      pubFile,
      '--log-level',
      'warn',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  t.after(() => {
    if (router.exitCode === null) router.kill('SIGKILL');
  });
  let routerErr = '';
  router.stderr!.on('data', (c: Buffer) => (routerErr += c.toString()));
  const url = await new Promise<string>((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`router did not start:\n${routerErr}`)), 30_000);
    router.stdout!.on('data', (c: Buffer) => {
      out += c.toString();
      const m = / serving (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    router.on('exit', (code) => reject(new Error(`router exited (${code}):\n${routerErr}`)));
  });

  const v1 = scaleModel(1);
  const folder = path.join(dir, 'models');
  await mkdir(folder);
  await writeFile(path.join(folder, 'scale.onnx'), v1);
  await writeFile(
    path.join(folder, 'manifest.json'),
    JSON.stringify({ models: [{ name: 'scale', version: '1', file: 'scale.onnx', sha256: sha(v1), priceMicros: 3 }] }),
  );
  const agentKey = generateIdentity('agent');
  const agent = await spawnAgent(t, broker.url, agentKey, [
    '--models',
    folder,
    '--data',
    path.join(dir, 'agent'),
    '--deploy-group',
    GROUP,
    '--deploy-operator',
    pubFile,
    '--bundle-url',
    url,
    '--memory-budget-mb',
    '64',
  ]);

  const env = { MESH_API_KEY: admin.key, MESH_ROUTER_URL: url };
  const repo = await tritonRepo(path.join(dir, 'repo'), 'scale', CONFIG('scale'), { '2': { file: 'model.onnx', bytes: scaleModel(2) } });
  // The router learns the agent's model from its status; deploy compares with what the agents serve.
  let deployed = await edgeMesh(['deploy', repo, '--model', 'scale', '--group', GROUP, '--key', keyFile, '--min-requests', '1000'], env);
  for (let i = 0; i < 50 && deployed.code !== 0 && /no live agent serves/.test(deployed.stderr); i++) {
    await new Promise((r) => setTimeout(r, 200));
    deployed = await edgeMesh(['deploy', repo, '--model', 'scale', '--group', GROUP, '--key', keyFile, '--min-requests', '1000'], env);
  }
  assert.equal(deployed.code, 0, deployed.stderr);
  const step = JSON.parse(deployed.stdout) as { previous: { version: string }; priceMicros: number };
  assert.equal(step.previous.version, '1');
  assert.equal(step.priceMicros, 3, "the replaced version's price, as the agent announces it");
  let status = '';
  for (let i = 0; i < 100; i++) {
    status = (await edgeMesh(['rollout', 'status', 'scale'], env)).stdout;
    if (/scale +edge-pis +canary +2 +1 +\d+ +10\.0% +1 /.test(status)) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  assert.match(status, /scale +edge-pis +canary +2 +1 +\d+ +10\.0% +1 /, 'the agent announces the canary');
  assert.match(agent.stderrText(), /deployment step applied: canary/);
  const promoted = await edgeMesh(['promote', 'scale', '--key', keyFile], env);
  assert.equal(promoted.code, 0, promoted.stderr);
  await waitFor(() => /deployment step applied: promoted/.test(agent.stderrText()), 20_000, 'the agent to promote');
  const after = JSON.parse((await edgeMesh(['rollout', 'status', '--json'], env)).stdout) as {
    rollouts: { phase: string; version: string }[];
  };
  assert.deepEqual(
    after.rollouts.map((r) => [r.phase, r.version]),
    [['promoted', '2']],
  );
});
