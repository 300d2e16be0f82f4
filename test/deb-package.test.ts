/**
 * The agent's Debian package as a device gets it (docs/operations.md, "Installing an agent from the Debian
 * package"): packaging/deb/build-agent.sh builds the amd64 package, `dpkg --root` installs it into a
 * temporary root with its maintainer scripts (as root; otherwise `dpkg-deb -x` unpacks it), and the unit's
 * ExecStart command line, its paths moved into that root, starts the agent with the package's
 * configuration file (paths moved the same way, the broker this test starts) and the key postinst made.
 * An app gets an inference from it through the SDK; an upgrade keeps the key, the data and an edited
 * configuration. The package must hold no other platform's binaries.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, execFile, spawn, spawnSync } from 'node:child_process';
import { copyFile, mkdir, open, readdir, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { admit, encodeKeyFile, generateIdentity, parseKeyFile } from '@edge-mesh/protocol';
import { brokerFor, kwsOnlyDir, meshFor, ROOT, tempDir } from './helpers.ts';

const run = promisify(execFile);
const has = (command: string) => spawnSync('sh', ['-c', `command -v ${command}`]).status === 0;
const skip = !has('dpkg-deb')
  ? 'dpkg-deb not found (Debian package dpkg): cannot build the agent package'
  : process.arch !== 'x64' || process.platform !== 'linux'
    ? `the amd64 package runs only on linux x64, not ${process.platform} ${process.arch}`
    : false;

const NATIVE = /\.(node|so|dylib|dll|exe)$|\.so\.\d/;

async function files(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) out.push(...(await files(full)));
    else out.push(full);
  }
  return out;
}

/** The ELF machine of a file (62 x86-64, 183 aarch64), or undefined when it is not an ELF file. */
async function elfMachine(file: string): Promise<number | undefined> {
  const handle = await open(file, 'r');
  try {
    const { buffer, bytesRead } = await handle.read(Buffer.alloc(20), 0, 20, 0);
    if (bytesRead < 20 || buffer.readUInt32BE(0) !== 0x7f454c46) return undefined;
    return buffer.readUInt16LE(18);
  } finally {
    await handle.close();
  }
}

/** The [Service] settings of a unit file, each key with its values in order. */
function serviceSettings(unit: string): Map<string, string[]> {
  const settings = new Map<string, string[]>();
  let section = '';
  for (const raw of unit.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    if (line.startsWith('[')) {
      section = line;
      continue;
    }
    if (section !== '[Service]') continue;
    const eq = line.indexOf('=');
    const key = line.slice(0, eq);
    settings.set(key, [...(settings.get(key) ?? []), line.slice(eq + 1)]);
  }
  return settings;
}

test('the amd64 agent package installs into a root, holds only amd64 binaries, and its unit command serves a request', {
  skip,
  timeout: 240_000,
}, async (t) => {
  const dir = await tempDir(t, 'edge-mesh-deb-');
  const started = Date.now();
  const { stdout: built } = await run(path.join(ROOT, 'packaging/deb/build-agent.sh'), [path.join(dir, 'out')], {
    env: { ...process.env, ARCH: 'amd64' },
    timeout: 200_000,
  });
  const deb = built.trim().split('\n').at(-1)!;
  assert.equal(
    path.basename(deb),
    `edge-mesh-agent_${JSON.parse(await readFile(path.join(ROOT, 'package.json'), 'utf8')).version}_amd64.deb`,
  );
  const { size } = await stat(deb);
  t.diagnostic(`built in ${((Date.now() - started) / 1000).toFixed(1)} s: ${(size / 1e6).toFixed(1)} MB`);

  // The control fields and the maintainer scripts.
  const { stdout: fields } = await run('dpkg-deb', ['-f', deb, 'Package', 'Architecture', 'Depends', 'Installed-Size']);
  assert.match(fields, /^Package: edge-mesh-agent$/m);
  assert.match(fields, /^Architecture: amd64$/m);
  assert.match(fields, /^Depends: .*nodejs \(>= 20\.10\)/m);
  const installedKb = Number(/^Installed-Size: (\d+)$/m.exec(fields)?.[1]);
  t.diagnostic(`installed size ${(installedKb / 1024).toFixed(1)} MiB`);
  const control = path.join(dir, 'control');
  await run('dpkg-deb', ['-e', deb, control]);
  assert.equal((await readFile(path.join(control, 'conffiles'), 'utf8')).trim(), '/etc/edge-mesh/agent.json');
  for (const script of ['postinst', 'prerm', 'postrm']) await run('sh', ['-n', path.join(control, script)]);

  // Installed by dpkg into a temporary root, maintainer scripts included (they work under $DPKG_ROOT and
  // touch no service or user of this machine). Installing needs root; otherwise the files are unpacked.
  const root = path.join(dir, 'root');
  const dpkgInstall = process.getuid?.() === 0 && has('dpkg');
  const install = () =>
    run('dpkg', [`--root=${root}`, '--force-depends', '--force-script-chrootless', '--force-confold', '-i', deb], {
      env: { ...process.env, PATH: `${path.dirname(process.execPath)}:${process.env.PATH}` },
    });
  if (dpkgInstall) {
    for (const sub of ['updates', 'info']) await mkdir(path.join(root, 'var/lib/dpkg', sub), { recursive: true });
    await writeFile(path.join(root, 'var/lib/dpkg/status'), '');
    await install();
    const { stdout: status } = await run('dpkg', [`--root=${root}`, '-s', 'edge-mesh-agent']);
    assert.match(status, /^Status: install ok installed$/m);
  } else {
    t.diagnostic('not root: the package is unpacked with dpkg-deb -x and its maintainer scripts do not run');
    await run('dpkg-deb', ['-x', deb, root]);
  }
  const all = await files(root);
  const native = all.filter((f) => NATIVE.test(path.basename(f)));
  // Binaries by name, and whatever lies in a per-platform binary folder (onnxruntime-node's bin, prebuilds).
  const binaries = all.filter((f) => NATIVE.test(path.basename(f)) || /\/onnxruntime-node\/bin\/|\/prebuilds\//.test(f));
  const foreign = binaries.filter((f) => /\/(darwin|win32)\/|\/linux\/arm64\/|\/prebuilds\/(?!linux-x64\/)/.test(f));
  assert.deepEqual(foreign, [], 'no darwin, win32 or linux/arm64 binaries');
  for (const file of native) assert.equal(await elfMachine(file), 62, `${path.relative(root, file)} is an x86-64 ELF file`);
  const ort = 'usr/lib/edge-mesh/node_modules/onnxruntime-node/bin/napi-v6/linux/x64';
  for (const file of ['onnxruntime_binding.node', 'libonnxruntime.so.1']) assert.ok(native.includes(path.join(root, ort, file)), file);
  // The agent role only: the other roles and their tooling are not installed.
  for (const name of ['@edge-mesh/demo', '@edge-mesh/router', '@edge-mesh/broker', 'hardhat', 'solc']) {
    assert.ok(!all.some((f) => f.includes(`/node_modules/${name}/`)), `${name} is not in the agent package`);
  }

  // The unit: hardened, with the launch settings, starting the wrapper with the conffile.
  const unitFile = path.join(root, 'lib/systemd/system/edge-mesh-agent.service');
  const unit = await readFile(unitFile, 'utf8');
  const service = serviceSettings(unit);
  const one = (key: string) => service.get(key)?.at(-1);
  assert.equal(one('ExecStart'), '/usr/bin/edge-mesh-agent --config /etc/edge-mesh/agent.json');
  for (const [key, value] of Object.entries({
    User: 'edge-mesh',
    StateDirectory: 'edge-mesh',
    Restart: 'on-failure',
    Type: 'notify',
    NotifyAccess: 'all',
    WatchdogSec: '30',
    ExecReload: '/bin/kill -HUP $MAINPID',
    NoNewPrivileges: 'yes',
    ProtectSystem: 'strict',
    ProtectHome: 'yes',
    PrivateTmp: 'yes',
    ReadWritePaths: '/var/lib/edge-mesh',
    Environment: 'MALLOC_ARENA_MAX=2 UV_THREADPOOL_SIZE=2',
  })) {
    assert.equal(one(key), value, key);
  }
  if (has('systemd-analyze')) {
    // verify checks that ExecStart is an executable file, so the copy names the unpacked one.
    const copy = path.join(dir, 'unit', 'edge-mesh-agent.service');
    await mkdir(path.dirname(copy));
    await writeFile(copy, unit.replace('ExecStart=/usr/bin/', `ExecStart=${root}/usr/bin/`));
    const verify = spawnSync('systemd-analyze', ['verify', copy], { encoding: 'utf8' });
    assert.equal(verify.status, 0, verify.stderr);
    assert.equal(verify.stderr, '', 'systemd-analyze verify has nothing to say about the unit');
  } else {
    t.diagnostic('systemd-analyze not found: the unit was not verified');
  }

  // The installed CLI: its version, and the shipped configuration file passes its own check.
  const cliEnv = { ...process.env, PATH: `${path.dirname(process.execPath)}:${process.env.PATH}` };
  const { stdout: version } = await run(path.join(root, 'usr/bin/edge-mesh'), ['--version'], { env: cliEnv });
  assert.equal(version.trim(), JSON.parse(await readFile(path.join(ROOT, 'package.json'), 'utf8')).version);
  const { stdout: checked } = await run(
    path.join(root, 'usr/bin/edge-mesh'),
    ['config', 'check', 'agent', path.join(root, 'etc/edge-mesh/agent.json')],
    {
      env: cliEnv,
    },
  );
  assert.match(checked, /: ok, 4 settings for agent/);

  // A mesh: an authenticated broker, the device's key admitted by the operator, an app key.
  const operator = generateIdentity('operator');
  const broker = await brokerFor(t, {
    auth: { trustedOperators: [{ id: operator.id, publicKey: operator.publicKey }], dataDir: await tempDir(t) },
  });
  // The device's key: the one postinst made, or (unpacked only) one written as an owner would.
  const state = '/var/lib/edge-mesh';
  const keyFile = path.join(root, state, 'agent.key');
  let agentKey = generateIdentity('agent');
  if (dpkgInstall) {
    const passwd = await readFile(path.join(root, 'etc/passwd'), 'utf8');
    const user = /^edge-mesh:x:(\d+):(\d+):[^:]*:\/var\/lib\/edge-mesh:\/usr\/sbin\/nologin$/m.exec(passwd);
    assert.ok(user, `postinst made the edge-mesh system user in the root:\n${passwd}`);
    assert.ok(Number(user[1]) < 1000, 'a system uid');
    const [stateInfo, keyInfo] = await Promise.all([stat(path.join(root, state)), stat(keyFile)]);
    assert.equal(stateInfo.mode & 0o777, 0o750);
    assert.equal(keyInfo.mode & 0o777, 0o600);
    for (const info of [stateInfo, keyInfo]) assert.deepEqual([info.uid, info.gid], [Number(user[1]), Number(user[2])]);
    agentKey = parseKeyFile(await readFile(keyFile, 'utf8'));
    assert.equal(agentKey.role, 'agent');
  } else {
    await mkdir(path.dirname(keyFile), { recursive: true });
    await writeFile(keyFile, encodeKeyFile(agentKey), { mode: 0o600 });
  }
  const keyText = await readFile(keyFile, 'utf8');
  const appKey = generateIdentity('app');
  for (const who of [agentKey, appKey]) await broker.admit(admit(operator, who));

  // The package's configuration file with its paths moved into the root and this test's broker.
  const shipped = JSON.parse(await readFile(path.join(root, 'etc/edge-mesh/agent.json'), 'utf8')) as Record<string, unknown>;
  const config = Object.fromEntries(
    Object.entries(shipped).map(([key, value]) => [key, typeof value === 'string' && value.startsWith(state) ? root + value : value]),
  );
  assert.equal(typeof config.models, 'string');
  assert.equal(typeof config.key, 'string');
  config.broker = broker.url;
  const models = await kwsOnlyDir(t);
  await mkdir(config.models as string, { recursive: true });
  for (const file of await readdir(models)) await copyFile(path.join(models, file), path.join(config.models as string, file));
  assert.equal(config.key, keyFile);
  const configFile = path.join(dir, 'agent.json');
  await writeFile(configFile, JSON.stringify(config));

  // The unit's command line and environment, as systemd would run them (node from this test's PATH).
  const [command, ...args] = one('ExecStart')!
    .split(/\s+/)
    .map((word) => (word === '/etc/edge-mesh/agent.json' ? configFile : word.startsWith('/') ? root + word : word));
  const unitEnv = Object.fromEntries((one('Environment') ?? '').split(/\s+/).map((pair) => pair.split('=') as [string, string]));
  const env: Record<string, string | undefined> = {
    ...process.env,
    ...unitEnv,
    PATH: `${path.dirname(process.execPath)}:${process.env.PATH}`,
  };
  delete env.NODE_OPTIONS;
  const child: ChildProcess = spawn(command!, args, { cwd: root + state, env, stdio: ['ignore', 'ignore', 'pipe'] });
  t.after(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  });
  let stderr = '';
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the packaged agent did not announce:\n${stderr}`)), 60_000);
    child.stderr!.on('data', (chunk: Buffer) => {
      stderr += chunk.toString();
      if (stderr.includes('"msg":"announced"')) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.on('exit', (code) => reject(new Error(`the packaged agent exited early (${code}):\n${stderr}`)));
  });

  // The wrapper exec'd node from the package with the launch settings.
  const cmdline = (await readFile(`/proc/${child.pid}/cmdline`, 'utf8')).split('\0');
  assert.ok(cmdline.includes('--v8-pool-size=2'), cmdline.join(' '));
  assert.ok(cmdline.includes(path.join(root, 'usr/lib/edge-mesh/node_modules/@edge-mesh/cli/bin/edge-mesh.mjs')), cmdline.join(' '));
  const environ = (await readFile(`/proc/${child.pid}/environ`, 'utf8')).split('\0');
  assert.ok(environ.includes('MALLOC_ARENA_MAX=2') && environ.includes('UV_THREADPOOL_SIZE=2'));

  const mesh = await meshFor(t, { brokerUrl: broker.url, identity: appKey });
  await mesh.waitForModel('kws', 20_000);
  const input = mesh.models().find((m) => m.name === 'kws')!.inputs[0]!.name;
  const data = new Float32Array(25 * 96).map((_, i) => Math.sin(i / 7));
  const result = await mesh.infer('kws', { [input]: { dtype: 'float32', shape: [1, 25, 96], data } }, { deadlineMs: 10_000 });
  assert.equal(result.agentId, agentKey.id, 'the packaged agent answered');
  const outputs = Object.values(result.outputs);
  assert.ok(outputs.length > 0);
  for (const output of outputs) {
    assert.ok(output.data.length > 0);
    for (const v of output.data as Float32Array) assert.ok(Number.isFinite(v));
  }

  await new Promise((resolve) => setTimeout(resolve, 2_000));
  const rss = /^VmRSS:\s+(\d+) kB$/m.exec(await readFile(`/proc/${child.pid}/status`, 'utf8'))?.[1];
  t.diagnostic(`packaged agent (kws only) RSS 2 s after one request: ${(Number(rss) / 1024).toFixed(1)} MiB`);

  // SIGTERM (the unit's KillSignal) drains it; it exits 0, so Restart=on-failure leaves it stopped.
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  child.kill('SIGTERM');
  assert.equal(await exited, 0, stderr);

  if (dpkgInstall) {
    // An upgrade (the same package again: prerm upgrade, unpack, postinst configure) keeps the key, the
    // receipts folder's contents and an edited configuration file.
    const receipt = path.join(root, state, 'data', 'kept-on-upgrade');
    await mkdir(path.dirname(receipt), { recursive: true });
    await writeFile(receipt, 'receipts');
    const conffile = path.join(root, 'etc/edge-mesh/agent.json');
    const edited = `${JSON.stringify({ ...shipped, broker: 'mqtt://broker.example:1883' })}\n`;
    await writeFile(conffile, edited);
    await install();
    assert.equal(await readFile(keyFile, 'utf8'), keyText, 'the key is kept');
    assert.equal(await readFile(receipt, 'utf8'), 'receipts');
    assert.equal(await readFile(conffile, 'utf8'), edited, 'the edited conffile is kept');
  }
});

test('the arm64 agent package (Raspberry Pi 4/5, Jetson) holds only aarch64 binaries: its onnxruntime and its store', {
  skip: has('dpkg-deb') ? false : 'dpkg-deb not found (Debian package dpkg): cannot build the agent package',
  timeout: 240_000,
}, async (t) => {
  // Built and inspected here; running it needs an arm64 machine (docs/agent.md says what was run where).
  const dir = await tempDir(t, 'edge-mesh-deb-arm64-');
  const { stdout: built } = await run(path.join(ROOT, 'packaging/deb/build-agent.sh'), [path.join(dir, 'out')], {
    env: { ...process.env, ARCH: 'arm64' },
    timeout: 200_000,
  });
  const deb = built.trim().split('\n').at(-1)!;
  const { stdout: fields } = await run('dpkg-deb', ['-f', deb, 'Architecture']);
  assert.equal(fields.trim(), 'arm64');
  const root = path.join(dir, 'root');
  await run('dpkg-deb', ['-x', deb, root]);
  const all = await files(root);
  const binaries = all.filter((f) => NATIVE.test(path.basename(f)) || /\/onnxruntime-node\/bin\/|\/prebuilds\//.test(f));
  const foreign = binaries.filter((f) => /\/(darwin|win32)\/|\/linux\/x64\/|\/prebuilds\/(?!linux-arm64\/)/.test(f));
  assert.deepEqual(foreign, [], 'no darwin, win32 or linux/x64 binaries');
  const native = all.filter((f) => NATIVE.test(path.basename(f)));
  assert.ok(native.length >= 3, `onnxruntime's binding and library, and the store's: ${native.map((f) => path.basename(f))}`);
  for (const file of native) assert.equal(await elfMachine(file), 183, `${path.relative(root, file)} is an aarch64 ELF file`);
  const ort = 'usr/lib/edge-mesh/node_modules/onnxruntime-node/bin/napi-v6/linux/arm64';
  for (const file of ['onnxruntime_binding.node', 'libonnxruntime.so.1']) assert.ok(native.includes(path.join(root, ort, file)), file);
  assert.ok(
    native.some((f) => /classic-level\/prebuilds\/linux-arm64\//.test(f)),
    "the receipt store's arm64 binary",
  );
});
