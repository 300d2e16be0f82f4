/** Seeded randomness for decisions that take their random numbers as an argument (tests, simulator, samples). */

export type Rng = () => number;

/** mulberry32: a tiny, fast 32-bit PRNG, uniform in [0, 1); the same seed gives the same stream. */
export function mulberry32(seed: number): Rng {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
