/**
 * Hostile payloads sent to a real agent through a real broker: every one gets a coded error (or a
 * result, for numerically odd but well-formed tensors) and the agent keeps serving.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { sampleInputs } from '@edge-mesh/demo';
import { encodeMessage, encodeTensor, generateIdentity, type InferRequest, newRequestId, PROTOCOL_VERSION } from '@edge-mesh/protocol';
import { agentFor, brokerFor, meshFor, rawClient } from './helpers.ts';

function request(model: string, inputs: InferRequest['inputs']): InferRequest {
  return { v: PROTOCOL_VERSION, kind: 'req', id: newRequestId(), deadline: Date.now() + 10_000, model, inputs };
}

test('NaN and infinity storms, CBOR bombs and shape lies: coded errors or results, and the agent keeps serving', async (t) => {
  const broker = await brokerFor(t);
  const agent = await agentFor(t, { brokerUrl: broker.url });
  const raw = await rawClient(t, broker.url, generateIdentity('app'));
  const mesh = await meshFor(t, { brokerUrl: broker.url });
  await mesh.waitForModel('kws');
  const stillServes = async () => assert.equal((await mesh.infer('kws', sampleInputs('kws', 1))).agentId, agent.id);

  // NaN, +/-Infinity and denormal storms on every model: well-formed tensors, so the runtime runs them.
  for (const fill of [Number.NaN, Number.POSITIVE_INFINITY, Number.NEGATIVE_INFINITY, 1e-45, -3.4e38]) {
    for (const model of ['kws', 'vad', 'ocr-cls']) {
      const inputs = sampleInputs(model, 1);
      const wire: InferRequest['inputs'] = {};
      for (const [name, x] of Object.entries(inputs)) {
        if (x.data instanceof Float32Array) x.data.fill(fill);
        wire[name] = encodeTensor(x);
      }
      const m = request(model, wire);
      const reply = await raw.request(agent.id, m.id, m);
      assert.ok(
        reply.kind === 'res' || (reply.kind === 'err' && reply.code === 'MESH_INFERENCE_FAILED'),
        `${model} with ${fill}: ${JSON.stringify(reply.kind === 'err' ? reply.code : 'ok')}`,
      );
    }
    await stillServes();
  }

  // CBOR bombs: declared lengths far beyond the payload, deep nesting, and a map of a million keys declared in 9 bytes.
  const bombs = [
    Buffer.from('bb00000000ffffffff', 'hex'),
    Buffer.from('5bffffffffffffffff00', 'hex'),
    Buffer.alloc(500_000, 0x81),
    Buffer.concat([Buffer.from('a3', 'hex'), Buffer.alloc(100_000, 0x9f)]),
    Buffer.concat([Buffer.alloc(50_000, 0xd9), Buffer.from([0x00])]),
  ];
  for (const bomb of bombs) raw.client.publish(`mesh/v1/agent/${agent.id}/req/${raw.clientId}`, bomb, { qos: 1 });
  await stillServes();

  // A request that survives the schema but lies about its tensor: the id is readable, so it is answered.
  const kwsName = agent.models.find((m) => m.name === 'kws')!.inputs[0]!.name;
  const lie = request('kws', { [kwsName]: { dtype: 'float32', shape: [1, 25, 96], data: new Uint8Array(16) } });
  const reply = await raw.request(agent.id, lie.id, encodeMessage(lie));
  assert.equal(reply.kind === 'err' && reply.code, 'MESH_BAD_TENSOR');
  await stillServes();
  assert.ok((agent.counters.errors.MESH_BAD_REQUEST ?? 0) >= bombs.length, JSON.stringify(agent.counters.errors));
});
