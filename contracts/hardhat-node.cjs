// Child-process entry for contracts/chain.ts: runs `hardhat node` and exits as soon as the parent goes
// away (its stdin pipe closes), even when the parent was killed with SIGKILL.
process.stdin.on('data', () => {});
process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
const [port, hostname] = process.argv.slice(2);
process.env.HARDHAT_DISABLE_TELEMETRY_PROMPT = 'true';
process.argv = [
  process.argv[0],
  'hardhat',
  'node',
  '--hostname',
  hostname || '127.0.0.1',
  '--port',
  port,
  '--config',
  require('node:path').join(__dirname, 'hardhat.config.cjs'),
];
require('hardhat/internal/cli/cli');
