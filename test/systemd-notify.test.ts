/**
 * The agent under systemd (edge-agent/src/systemd.ts, docs/agent.md "Running an agent as a service"): READY=1 once it has
 * announced itself, WATCHDOG=1 every third of WATCHDOG_USEC from its event loop, STOPPING=1 when it drains. A
 * unix datagram listener (python3) stands in for systemd's NOTIFY_SOCKET; the messages go through the real
 * `systemd-notify`.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { test } from 'node:test';
import { systemdNotifier } from '@edge-mesh/agent/systemd';
import { generateIdentity } from '@edge-mesh/protocol';
import { brokerFor, kwsOnlyDir, quiet, spawnAgent, tempDir, waitFor } from './helpers.ts';

const has = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
const skipReal = !has('systemd-notify')
  ? 'systemd-notify not found (Debian package systemd; .ci/run installs it): cannot send sd_notify messages'
  : !has('python3')
    ? 'python3 not found (.ci/run installs it): no unix datagram listener to stand in for systemd'
    : false;

test('no NOTIFY_SOCKET: no notifier; WATCHDOG_PID naming another process: no pings', async () => {
  assert.equal(systemdNotifier({ env: {}, logger: quiet }), undefined);
  const sent: string[] = [];
  const n = systemdNotifier({
    env: { NOTIFY_SOCKET: '/x', WATCHDOG_USEC: '30000', WATCHDOG_PID: '1' },
    logger: quiet,
    pid: 2,
    send: (m, done) => {
      sent.push(m);
      done(null);
    },
  });
  assert.ok(n);
  await new Promise((r) => setTimeout(r, 50));
  n.ready();
  n.close();
  assert.deepEqual(sent, ['READY=1']);
});

test('the watchdog pings come from the event loop: a blocked loop sends none', async () => {
  const sent: number[] = [];
  const n = systemdNotifier({
    env: { NOTIFY_SOCKET: '/x', WATCHDOG_USEC: '150000' },
    logger: quiet,
    send: (_m, done) => {
      sent.push(performance.now());
      done(null);
    },
  })!;
  try {
    await new Promise((r) => setTimeout(r, 300));
    assert.ok(sent.length >= 4, `pings every 50 ms: ${sent.length} in 300 ms`);
    const blockedFrom = performance.now();
    while (performance.now() - blockedFrom < 400) {
      // The loop is stuck here, as a wedged agent's would be.
    }
    const blockedTo = performance.now();
    await new Promise((r) => setTimeout(r, 120));
    assert.ok(!sent.some((at) => at > blockedFrom && at < blockedTo), 'a ping was sent while the loop was blocked');
    assert.ok(
      sent.some((at) => at >= blockedTo),
      'pings resume once the loop runs',
    );
  } finally {
    n.close();
  }
});

interface Heard {
  atMs: number;
  message: string;
}

/** A unix datagram socket at `socket` that writes down every line of every datagram it receives. */
async function listen(t: Parameters<typeof tempDir>[0], dir: string) {
  const socket = path.join(dir, 'notify');
  const script = path.join(dir, 'listen.py');
  await writeFile(
    script,
    `import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("0 LISTENING", flush=True)
while True:
    # recvfrom takes no ancillary data: the fd of systemd-notify's BARRIER=1 is closed, which ends its wait.
    data, _ = s.recvfrom(65536)
    for line in data.decode().split("\\n"):
        if line:
            print(int(time.time() * 1000), line, flush=True)
`,
  );
  const child: ChildProcess = spawn('python3', [script, socket], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.after(() => child.kill('SIGKILL'));
  const heard: Heard[] = [];
  let buffer = '';
  child.stdout!.on('data', (chunk: Buffer) => {
    buffer += chunk.toString();
    let nl = buffer.indexOf('\n');
    while (nl >= 0) {
      const [at, message] = buffer.slice(0, nl).split(' ');
      heard.push({ atMs: Number(at), message: message! });
      buffer = buffer.slice(nl + 1);
      nl = buffer.indexOf('\n');
    }
  });
  await waitFor(() => heard.some((h) => h.message === 'LISTENING'), 10_000, 'the listener');
  return { socket, heard };
}

test('`edge-mesh agent` under NOTIFY_SOCKET: READY=1 after it announced, WATCHDOG=1 while it runs and not while stopped, STOPPING=1 on SIGTERM', {
  skip: skipReal,
  timeout: 120_000,
}, async (t) => {
  const dir = await tempDir(t, 'em-sd-');
  const { socket, heard } = await listen(t, dir);
  const broker = await brokerFor(t);
  const count = (message: string) => heard.filter((h) => h.message === message).length;

  const saved = { NOTIFY_SOCKET: process.env.NOTIFY_SOCKET, WATCHDOG_USEC: process.env.WATCHDOG_USEC };
  process.env.NOTIFY_SOCKET = socket;
  process.env.WATCHDOG_USEC = '900000'; // pings every 300 ms
  let agent: Awaited<ReturnType<typeof spawnAgent>>;
  try {
    agent = await spawnAgent(t, broker.url, generateIdentity('agent'), ['--models', await kwsOnlyDir(t)]);
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
  await waitFor(() => count('READY=1') === 1, 10_000, 'READY=1');
  const pingsAtReady = count('WATCHDOG=1');
  assert.ok(pingsAtReady >= 1, 'pings start before the agent is ready (the watchdog runs while models load)');
  await waitFor(() => count('WATCHDOG=1') >= pingsAtReady + 3, 5_000, 'three more pings');

  // A stopped process sends nothing: the pings are the agent's own, not a helper's that would outlive a wedged agent.
  agent.kill('SIGSTOP');
  await new Promise((r) => setTimeout(r, 500));
  const stoppedAt = Date.now();
  const beforeStop = count('WATCHDOG=1');
  await new Promise((r) => setTimeout(r, 1_200));
  assert.equal(count('WATCHDOG=1'), beforeStop, 'pings while the agent was stopped');
  agent.kill('SIGCONT');
  await waitFor(() => heard.some((h) => h.message === 'WATCHDOG=1' && h.atMs > stoppedAt + 1_200), 5_000, 'pings after SIGCONT');

  const exited = new Promise<number | null>((resolve) => agent.once('exit', (code) => resolve(code)));
  agent.kill('SIGTERM');
  assert.equal(await exited, 0);
  await waitFor(() => count('STOPPING=1') === 1, 5_000, 'STOPPING=1');
  assert.equal(count('READY=1'), 1);
});
