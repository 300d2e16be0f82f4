// Worker threads do not inherit a tsx loader registered through its API (only one passed with
// --import), so each inference worker registers it before loading the TypeScript worker.
import { register } from 'tsx/esm/api';

register();
await import('./worker.ts');
