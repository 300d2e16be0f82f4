/**
 * `edge-mesh auth rabbitmq` (docs/cli.md; docs/operations.md, "Running on RabbitMQ"): the HTTP service RabbitMQ's
 * rabbitmq_auth_backend_http asks who may connect and what each identity may publish and subscribe. The decisions
 * are the embedded broker's (broker/src/rabbitmq.ts).
 */
import path from 'node:path';
import type { TrustedOperator } from '@edge-mesh/client';
import { MeshError } from '@edge-mesh/protocol';
import { type Command, Option } from 'commander';
import { cliLogger, LOG_LEVELS } from './log.ts';
import { collect, nonNegativeInt } from './options.ts';
import { report, stopSignal } from './supervised.ts';

const keyWarnings = { warn: (message: string) => process.stderr.write(`edge-mesh: warning: ${message}\n`) };

export function registerRabbitmqAuth(auth: Command): void {
  auth
    .command('rabbitmq')
    .description(
      "serve rabbitmq_auth_backend_http for a RabbitMQ 3.10+ cluster: CONNECT tokens of admitted ids, the per-role topic ACLs, and revocations that close the revoked id's connection on every node",
    )
    .option(
      '--operator <key>',
      'a trusted operator: its key file, public identity file or base64url public key (repeatable, at least one)',
      collect,
      [],
    )
    .option('--data <dir>', 'admission store folder (the format of `edge-mesh broker --data`)', path.join('.mesh-data', 'rabbitmq-auth'))
    .option(
      '--broker <urls>',
      "the cluster's MQTT URLs, comma-separated: where operators' admin records are read and revoked ids disconnected",
    )
    .option('--host <host>', 'address the HTTP service listens on', '127.0.0.1')
    .option('--port <port>', 'HTTP port (0: any free port)', nonNegativeInt, 8089)
    .option('--vhost <vhost>', "the vhost RabbitMQ's MQTT plugin uses (mqtt.vhost)", '/')
    .option('--print-conf', 'print the rabbitmq.conf lines and the enabled_plugins file for this service, and exit', false)
    .addOption(new Option('--log-level <level>', 'log level (logs go to stderr)').choices(LOG_LEVELS).default('info'))
    .action(
      async (opts: {
        operator: string[];
        data: string;
        broker?: string;
        host: string;
        port: number;
        vhost: string;
        printConf: boolean;
        logLevel: string;
      }) => {
        const { rabbitmqAuthConf, startRabbitmqAuth } = await import('@edge-mesh/broker');
        if (opts.printConf) {
          const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host;
          process.stdout.write(
            `# rabbitmq.conf\n${rabbitmqAuthConf(`http://${host}:${opts.port}`)}\n# enabled_plugins\n[rabbitmq_mqtt,rabbitmq_auth_backend_http].\n`,
          );
          return;
        }
        if (opts.operator.length === 0)
          throw new MeshError('MESH_CONFIG', 'give at least one --operator: the key whose admissions and revocations the service applies');
        const { brokerList, parseOperatorSpec } = await import('@edge-mesh/client');
        const trustedOperators: TrustedOperator[] = [];
        for (const spec of opts.operator) {
          const op = await parseOperatorSpec(spec, keyWarnings);
          if (!trustedOperators.some((o) => o.id === op.id)) trustedOperators.push(op);
        }
        const brokerUrls = opts.broker === undefined ? [] : brokerList(opts.broker).map((b) => b.url);
        const logger = cliLogger(opts.logLevel);
        if (brokerUrls.length === 0)
          logger.warn(
            'no --broker: admin records are not read and revoked clients stay connected until they reconnect; give the cluster MQTT URLs',
          );
        const service = await startRabbitmqAuth({
          trustedOperators,
          dataDir: path.resolve(opts.data),
          brokerUrls,
          host: opts.host,
          port: opts.port,
          vhost: opts.vhost,
          logger,
        });
        logger.info(
          { url: service.url, operators: trustedOperators.map((o) => o.id), brokers: brokerUrls },
          'RabbitMQ auth service listening',
        );
        process.stdout.write(`${service.url}\n`);
        await report('ready', { url: service.url });
        await stopSignal();
        logger.info('RabbitMQ auth service stopping');
        await service.close();
      },
    );
}
