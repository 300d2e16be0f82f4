/**
 * `npm run bench -- <name> [--quick] [--key value ...]`: runs one benchmark and prints its result as ONE
 * JSON object on the last stdout line (the contract and each benchmark's fields: docs/benchmarks.md).
 *
 * Progress goes to stderr. Every run is bounded by a wall-clock timeout (--quick: 42 s, full: 15 min, unless the bench sets its own;
 * `--timeout-s S` overrides), uses loopback only, and stops every child process it started (by PID:
 * SIGTERM, then SIGKILL) on success, on error and on timeout. On failure the last line is still one
 * JSON object, `{ "bench", "error" }`, and the exit code is 1. The machine is shared, so each result
 * also says how busy it was before the run (machine_busy_cores_before) and the load average. A copy of
 * each result is written to bench/results/ (git-ignored).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { type BenchContext, type BenchResult, machineBusyMs, ROOT, stopAll } from './lib.ts';

const BENCHES: Record<string, { file: string; about: string; timeoutS?: { quick: number; full: number } }> = {
  overhead: {
    file: './overhead.ts',
    about: 'kws latency: raw onnxruntime vs mesh (broker + agent + SDK processes) vs a no-op echo agent',
    // A local chain for the paid phases, five mesh phases (paid agent, unpaid agent, agent on its worker, echo, and the
    // paid agent and echo paired) on a busy 2-core machine.
    timeoutS: { quick: 100, full: 900 },
  },
  throughput: {
    file: './throughput.ts',
    // Two rounds of every configuration and the paired phase with --quick (docs/benchmarks.md), on a busy 2-core machine.
    timeoutS: { quick: 100, full: 900 },
    about:
      'kws requests/s at fixed concurrency against the agent (workers 1 and 2; and kws on the pool) and the echo agent, then both in turns',
  },
  'request-path': {
    file: './request-path.ts',
    about:
      "the agent's own CPU per kws request in process, without MQTT: its request path with the model, with an instant executor, and the echo agent's codec work",
  },
  agent: {
    file: './agent.ts',
    about: 'agent process start to retained status at a subscriber (ready_ms) and idle RSS',
    timeoutS: { quick: 90, full: 900 },
  },
  'router-sim': {
    file: './router-sim.ts',
    about: 'discrete-event router simulator: fleet mixes x loads x scenarios x policies x seeds, ratios with bootstrap CIs',
    timeoutS: { quick: 300, full: 3_600 },
  },
  'router-pick': {
    file: './router-pick.ts',
    about: 'selectAgent wall-clock cost on 100, 1,000 and 10,000 agents (pick_p50_us, pick_p99_us)',
  },
  bridge: {
    file: './bridge.ts',
    about: 'firmware bridge: authenticated frames/s over UDP and the latency it adds to kws (frames_per_s, added_p50_ms)',
  },
  settlement: {
    file: './settlement.ts',
    about: 'MeshEscrow gas on a local chain: one voucher, per voucher in batches (50 lanes to one agent), per receipt',
  },
  receipts: {
    file: './receipts.ts',
    about: 'receipts signed (keccak leaf + Ed25519) and verified by a LaneVerifier per second on one core',
  },
  contention: {
    file: './contention.ts',
    // Two agents with every model start first (10-20 s), then three phases and their recovery windows.
    timeoutS: { quick: 120, full: 900 },
    about:
      'broker, router and two agents as processes at a steady rate (sample app mix, every tenth request over HTTP) with 0, 1 and 2 cores held busy by another process; errors by kind, recovery time',
  },
  leases: {
    file: './leases.ts',
    // Per phase and repeat a fresh router per path, 1.5 s of warm-up and the window (quick: 2 phases' worth of
    // 4 s windows; full: 15 s windows, three paths, three repeats).
    timeoutS: { quick: 180, full: 1_500 },
    about:
      'the lease path against forwarding: broker, router, three kws agents (one slow, lying or failing) and an SDK load generator as processes, at a steady rate',
  },
  brokers: {
    file: './brokers.ts',
    // A 3-node NATS cluster and a 3-node RabbitMQ cluster start inside the run (17-40 s for RabbitMQ on a busy 2-core machine).
    timeoutS: { quick: 150, full: 900 },
    about:
      "QoS 1 request/reply through each MQTT engine with the mesh's auth: embedded aedes, mosquitto, a 3-node NATS cluster, a 3-node RabbitMQ cluster",
  },
  pipeline: {
    file: './pipeline.ts',
    // Broker and two agents with three models each start first (10-30 s), then paired wake-word and OCR runs.
    timeoutS: { quick: 150, full: 900 },
    about: 'wake-word and OCR pipelines through the mesh (stages on two agents) vs the same stages in one process',
  },
  economics: {
    file: './economics.ts',
    // A real chain, two dozen thousand paid requests and their settlement: a quick run takes about a minute
    // on an idle machine, and twice that on a busy one; a full run 7 to 20 minutes.
    timeoutS: { quick: 180, full: 2_400 },
    about:
      'honest and dishonest agents and payers over simulated hours on the real payment code and a local chain: losses, gas per receipt',
  },
};

const USAGE = `usage: npm run bench -- <name> [--quick] [--timeout-s S] [bench options]

benchmarks:
${Object.entries(BENCHES)
  .map(([name, b]) => `  ${name.padEnd(11)} ${b.about}`)
  .join('\n')}

options:
  --quick        short run (under 45 s; economics about 60 s)
  --timeout-s S  wall-clock cap for the whole run (default 42 quick, 900 full; overhead 100 quick; agent 90 quick; brokers 150 quick; router-sim 300 and 3600; economics 180 and 2400)
  overhead:   --n N                      timed requests (default 10000, quick 2000)
  throughput: --concurrency C --loadgens L --duration-ms D --warmup-ms W --workers 1,2 --rounds R
  request-path: --n N --rounds R         requests per round (30000, quick 10000), rounds (5, quick 3)
  agent:      --reps R --idle-ms MS --settle-ms MS --workers W --inline-max-ms MS
  router-sim: --seeds N --nodes N --duration-s S --warmup-s S --routers W --mixes a,b --loads 0.7,0.8,0.9
              --policies a,b --scenarios a,b --workers K
  router-pick: --picks N                  timed picks per fleet size (default 300000, quick 50000)
  bridge:     --n N --duration-ms D      sequential requests each way (default 4000, quick 600); frame-loop length
  settlement: --max-batch N              largest batch measured (default 100, quick 50)
  receipts:   --n N                      receipts signed and verified (default 100000, quick 20000)
  contention: --rate R --phase-ms D --recovery-window-ms D --busy 0,1,2   requests/s (40), busy phase (quick 6000,
                                         full 30000), stream after it (quick 4000, full 10000);
              --no-admission             the baseline: agents --no-admission, router --no-adaptive-concurrency
  brokers:    --n N --warmup W --concurrency C --duration-ms D   sequential round trips (20000, quick 2000), then C
                                         outstanding (16) for D ms (10000, quick 2000) per engine;
              --with-delayed-ack         also mosquitto without set_tcp_nodelay (100 round trips)
              --with-nats-qos1           also NATS with QoS 1 subscriptions (a JetStream consumer each)
              --devices N                measure each cluster again with N idle device connections across its nodes
              --engines a,b              only these of aedes, mosquitto, rabbitmq, nats
  leases:     --rate R --window-ms D --warmup-ms W --repeats N --slow-ms S --phases a,b --paths a,b --deadline-ms D
                                         requests/s (100), measured window per run (quick 4000, full 15000), warm-up
                                         (quick 1500, full 3000), repeats (quick 2, full 3), the odd agent's extra ms (100);
                                         phases of honest, liar, failing; paths of leased, forwarded, mixed (quick: the first two)
  pipeline:   --n N --ocr-n N            timed wake-word pairs (400, quick 100) and OCR pairs (40, quick 10)
  economics:  --rounds R --agents A --payers P --loss L --seed K   rounds of 15 simulated minutes (48, quick 8),
                                         honest agents (3, quick 2) and payers (40), per-message loss (0.005)

The last stdout line is one JSON object: the benchmark's fields, then machine_busy_cores_before,
loadavg_1m and elapsed_s. On failure it is { bench, quick, error } and the exit code is 1.
Each benchmark's fields are described in docs/benchmarks.md.`;

function parseArgs(argv: string[]): { name: string | undefined; quick: boolean; help: boolean; args: Record<string, string | true> } {
  const args: Record<string, string | true> = {};
  let name: string | undefined;
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--help' || a === '-h') help = true;
    else if (a.startsWith('--')) {
      const key = a.slice(2);
      const next = argv[i + 1];
      if (next !== undefined && !next.startsWith('--')) {
        args[key] = next;
        i++;
      } else args[key] = true;
    } else if (name === undefined) name = a;
  }
  return { name, quick: args.quick === true, help, args };
}

async function main(): Promise<number> {
  const { name, quick, help, args } = parseArgs(process.argv.slice(2));
  if (help || name === undefined || name === 'help') {
    process.stdout.write(`${USAGE}\n`);
    return help || name === 'help' ? 0 : 2;
  }
  const bench = BENCHES[name];
  if (!bench) {
    process.stderr.write(`unknown benchmark ${JSON.stringify(name)}\n\n`);
    process.stdout.write(`${USAGE}\n`);
    return 2;
  }
  const timeoutS =
    typeof args['timeout-s'] === 'string'
      ? Number(args['timeout-s'])
      : quick
        ? (bench.timeoutS?.quick ?? 42)
        : (bench.timeoutS?.full ?? 900);
  const log = (line: string) => process.stderr.write(`${line}\n`);
  const ctx: BenchContext = { quick, log, args };
  const started = performance.now();
  const loadavgStart = os.loadavg()[0]!;
  // The machine is shared: note how busy it was before anything of ours started.
  const busy0 = machineBusyMs();
  await new Promise((r) => setTimeout(r, 500));
  const busyBefore = round2((machineBusyMs() - busy0) / 500);
  if (busyBefore > 0.3) log(`warning: the machine was already ${busyBefore} cores busy before the run; figures will be skewed`);

  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`wall-clock timeout of ${timeoutS} s reached`)), timeoutS * 1000);
  });
  const onSignal = (signal: NodeJS.Signals) => {
    void stopAll(500).finally(() => {
      process.stdout.write(`${JSON.stringify({ bench: name, error: `interrupted by ${signal}` })}\n`);
      process.exit(130);
    });
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);

  try {
    const mod = (await import(bench.file)) as { run: (ctx: BenchContext) => Promise<BenchResult> };
    const result = await Promise.race([mod.run(ctx), timeout]);
    clearTimeout(timer);
    await stopAll();
    const line = JSON.stringify({
      ...result,
      // Other work on the machine (the box is shared) shows up here and in cpu.others.
      machine_busy_cores_before: busyBefore,
      loadavg_1m: { start: round2(loadavgStart), end: round2(os.loadavg()[0]!) },
      elapsed_s: Math.round((performance.now() - started) / 100) / 10,
    });
    try {
      const dir = path.join(ROOT, 'bench', 'results');
      mkdirSync(dir, { recursive: true });
      writeFileSync(path.join(dir, `${name}${quick ? '-quick' : ''}-${new Date().toISOString().replace(/[:.]/g, '-')}.json`), `${line}\n`);
    } catch {
      /* a read-only checkout still gets the result on stdout */
    }
    process.stdout.write(`${line}\n`);
    return 0;
  } catch (err) {
    clearTimeout(timer);
    log(`${name} failed: ${(err as Error).stack ?? String(err)}`);
    await stopAll(1_000);
    process.stdout.write(`${JSON.stringify({ bench: name, quick, error: (err as Error).message ?? String(err) })}\n`);
    return 1;
  }
}

const round2 = (v: number) => Math.round(v * 100) / 100;

const code = await main();
// Children are gone; leftover handles (onnxruntime threads, sockets) must not keep the run alive.
process.exit(code);
