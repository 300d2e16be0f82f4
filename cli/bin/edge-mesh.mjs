#!/usr/bin/env node
// The edge-mesh command: runs the compiled CLI (no TypeScript loader in any running process).
let main;
try {
  // The agent's V8 settings (cli/src/lean.ts) must come before the CLI's modules load.
  if (process.argv[2] === 'agent') (await import('../dist/lean.js')).leanAgentStart();
  ({ main } = await import('../dist/main.js'));
} catch (err) {
  if (err?.code === 'ERR_MODULE_NOT_FOUND' && /dist\/(main|lean)\.js/.test(String(err.message))) {
    process.stderr.write('edge-mesh: the CLI is not built yet; run `npm run build` (npm install does it) in the project folder\n');
    process.exit(70);
  }
  throw err;
}
process.exitCode = await main(process.argv);
