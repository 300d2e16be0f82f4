/** The agent's launch settings (edge-agent/src/launch.ts): what an environment already sets wins. */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { AGENT_LAUNCH_ENV, AGENT_NODE_FLAGS, agentLaunch } from '@edge-mesh/agent/launch';

test('agentLaunch adds the settings an environment lacks and keeps the ones it sets', () => {
  const bare = agentLaunch({});
  assert.deepEqual(bare.env, { ...AGENT_LAUNCH_ENV });
  assert.deepEqual(bare.nodeArgs, [...AGENT_NODE_FLAGS]);
  assert.ok(bare.nodeArgs.includes('--v8-pool-size=2'));

  const own = agentLaunch({ MALLOC_ARENA_MAX: '1', NODE_OPTIONS: '--max-old-space-size=64 --v8-pool-size=4' });
  assert.equal(own.env.MALLOC_ARENA_MAX, undefined, 'the environment chose its own allocator pools');
  assert.equal(own.env.UV_THREADPOOL_SIZE, '2');
  assert.deepEqual(own.nodeArgs, [], 'NODE_OPTIONS already sizes the V8 pool');
});
