/**
 * The no-op echo agent: the floor the mesh's own overhead is measured against (overhead, throughput).
 *
 *   node --import tsx bench/echo-agent.ts --broker mqtt://127.0.0.1:PORT --key AGENT_KEYFILE [--model kws]
 *
 * It speaks the real agent protocol so the SDK talks to it unchanged: the same connection recipe
 * (`openMeshConnection`: MQTT 3.1.1, TCP_NODELAY), a retained `status` (state online, one model with the
 * kws input/output signature, latencyMs 0.001, workers 1) with an offline will, a subscription to
 * `mesh/v1/agent/{id}/req/+` at QoS 1, and for every request a `res` on `mesh/v1/client/{sender}/res/{id}`
 * at QoS 1 with a 4-byte float32 [1,1] output, queueMs 0, execMs 0 and the queue every agent reply carries
 * (rif 0 and workMs 0: it holds no other request when it answers), so the SDK reads and books the same
 * fields from it as from an agent (sdk/src/policy.ts, noteClaim). Each request is decoded and
 * schema-checked with `decodeMessage` (it needs the id, and any agent must validate); nothing else runs:
 * no tensor copy, no worker hop, no inference. Prints {"event":"ready"} on stdout once its status is
 * published; stops on SIGTERM/SIGINT after publishing an offline status.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { openMeshConnection } from '@edge-mesh/client';
import {
  type AgentStatus,
  decodeMessage,
  encodeMessage,
  type InferRequest,
  isValidId,
  PROTOCOL_VERSION,
  parseKeyFile,
  signStatus,
  topics,
} from '@edge-mesh/protocol';

const { values } = parseArgs({
  options: {
    broker: { type: 'string' },
    key: { type: 'string' },
    model: { type: 'string', default: 'kws' },
  },
});
const brokerUrl = values.broker!;
const model = values.model!;
if (!brokerUrl || !values.key) {
  process.stderr.write('usage: echo-agent.ts --broker URL --key AGENT_KEYFILE [--model kws]\n');
  process.exit(2);
}
const identity = parseKeyFile(readFileSync(values.key, 'utf8'), values.key);
const agentId = identity.id;

const session = Math.random().toString(16).slice(2, 18);
const status: AgentStatus = {
  v: PROTOCOL_VERSION,
  kind: 'status',
  agent: agentId,
  state: 'online',
  ts: Date.now(),
  session,
  version: 'echo',
  models: [
    {
      name: model,
      version: '1',
      sha256: '0'.repeat(64),
      priceMicros: 0,
      latencyMs: 0.001,
      inputs: [{ name: 'onnx::Flatten_0', dtype: 'float32', shape: [1, 25, 96] }],
      outputs: [{ name: '39', dtype: 'float32', shape: [1, 1] }],
      notes: 'bench echo agent: no inference',
    },
  ],
  providers: ['none'],
  workers: 1,
  queueLimit: 1_000_000,
};
const offline = encodeMessage(
  signStatus(identity, { v: PROTOCOL_VERSION, kind: 'status', agent: agentId, state: 'offline', ts: Date.now(), session }),
);
const statusTopic = topics.agentStatus(agentId);
const requestPrefix = topics.agentRequest(agentId, '');
const output = { '39': { dtype: 'float32', shape: [1, 1], data: new Uint8Array(4) } };

let served = 0;
let bad = 0;
let announced = false;
const connection = openMeshConnection(brokerUrl, {
  identity,
  will: { topic: statusTopic, payload: offline, qos: 1, retain: true },
  onConnect: (c) => {
    c.subscribe(topics.agentRequestsFor(agentId), { qos: 1 }, () => {
      c.publish(statusTopic, encodeMessage(signStatus(identity, { ...status, ts: Date.now() })), { qos: 1, retain: true }, (err) => {
        if (err || announced) return;
        announced = true;
        process.stdout.write(`${JSON.stringify({ event: 'ready', agent: agentId })}\n`);
      });
    });
  },
});
const client = connection.client;
client.on('message', (topic, payload) => {
  if (!topic.startsWith(requestPrefix)) return;
  const senderId = topic.slice(requestPrefix.length);
  if (!isValidId(senderId)) return;
  let req: InferRequest;
  try {
    req = decodeMessage(payload, ['req']);
  } catch {
    bad++;
    return;
  }
  served++;
  client.publish(
    topics.clientReply(senderId, agentId),
    encodeMessage({
      v: PROTOCOL_VERSION,
      kind: 'res',
      id: req.id,
      agent: agentId,
      model: req.model,
      outputs: output,
      queueMs: 0,
      execMs: 0,
      rif: 0,
      workMs: 0,
    }),
    { qos: 1 },
  );
});

let stopping = false;
const stop = () => {
  if (stopping) process.exit(0);
  stopping = true;
  process.stderr.write(`${JSON.stringify({ event: 'stopping', served, bad })}\n`);
  const done = () => void connection.close().finally(() => process.exit(0));
  if (client.connected) client.publish(statusTopic, offline, { qos: 1, retain: true }, done);
  else done();
  setTimeout(() => process.exit(0), 1_000).unref();
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
