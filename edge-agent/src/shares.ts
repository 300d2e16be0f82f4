/**
 * The fairness rules of the agent's bounded pools (model queues in scheduler.ts, the replay guard and kept replies in
 * requests.ts) all take from the sender holding the most. This finds it.
 */

/** The key whose value measures largest by `size` (the first met on a tie), with that size; undefined when empty. */
export function largestHolder<K, V>(held: ReadonlyMap<K, V>, size: (value: V) => number): { key: K; size: number } | undefined {
  let top: { key: K; size: number } | undefined;
  for (const [key, value] of held) {
    const n = size(value);
    if (!top || n > top.size) top = { key, size: n };
  }
  return top;
}
