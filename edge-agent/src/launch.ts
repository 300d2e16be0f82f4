/**
 * How an agent process is best started on a small device (docs/agent.md, "Launch settings"): settings
 * that only take effect when the process starts, so whatever starts the agent applies them (`edge-mesh
 * up` for each agent part, the benchmark, a systemd unit). This module imports nothing, so a launcher
 * loads it without the agent.
 *
 * Every thread that allocates gets its own glibc allocator pool, and memory freed in a pool mostly stays
 * in it. An idle agent has V8's helper threads (four by default) and libuv's pool (four), and each one that
 * compiled code or loaded a model keeps a pool. Two of each, and two allocator pools in all, hold the
 * wake-word agent about 6 MB lower and the four-model agent about 8 MB lower. Inference does not run
 * on either pool: onnxruntime-node runs a session on the thread that calls it (the main thread for an
 * inline model, an inference worker otherwise), and libuv's pool serves file reads, model loading and
 * the payment store.
 */

/** Environment variables for the agent process; each only where the environment does not set it already. */
export const AGENT_LAUNCH_ENV: Readonly<Record<string, string>> = {
  /** glibc: at most two allocator pools for all threads (read by glibc when the process starts). */
  MALLOC_ARENA_MAX: '2',
  /** libuv: two threads for file reads, model loading and the store (read when the pool starts). */
  UV_THREADPOOL_SIZE: '2',
};

/** Node flags for the agent process, placed before the script; a flag already given for the same setting wins. */
export const AGENT_NODE_FLAGS: readonly string[] = [
  /** V8's helper threads (concurrent GC and compilation): two instead of four. */
  '--v8-pool-size=2',
];

const flagName = (flag: string): string => flag.replace(/=.*$/, '');

/**
 * The environment and node arguments to start an agent with, given the environment it would inherit:
 * what that environment (or its NODE_OPTIONS) already sets is left as it is.
 */
export function agentLaunch(inherited: Readonly<Record<string, string | undefined>>): {
  env: Record<string, string>;
  nodeArgs: string[];
} {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(AGENT_LAUNCH_ENV)) if (inherited[name] === undefined) env[name] = value;
  const given = inherited.NODE_OPTIONS ?? '';
  const nodeArgs = AGENT_NODE_FLAGS.filter((flag) => !given.includes(flagName(flag)));
  return { env, nodeArgs };
}
