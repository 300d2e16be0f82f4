#!/usr/bin/env node
// The edge-mesh command: runs the compiled CLI (no TypeScript loader in any running process).
let main;
try {
  ({ main } = await import('../dist/main.js'));
} catch (err) {
  if (err?.code === 'ERR_MODULE_NOT_FOUND' && String(err.message).includes('dist/main.js')) {
    process.stderr.write('edge-mesh: the CLI is not built yet; run `npm run build` (npm install does it) in the project folder\n');
    process.exit(70);
  }
  throw err;
}
process.exitCode = await main(process.argv);
