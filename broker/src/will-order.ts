/**
 * A client's last will goes out after everything the client published before it died.
 *
 * aedes handles a client's packets as it parses them, each PUBLISH through asynchronous steps (retained store, then
 * delivery), and publishes the will from `close()`, which a reset connection runs at once. A process killed while
 * its socket still held unread bytes resets the connection, so a status it published just before dying could be
 * stored and delivered after its will. Measured on the embedded broker: of 20 clients that published a retained
 * status and then reset, 8 ended with that status, not their will, as the retained message, so every router that
 * connected afterwards saw a dead agent online (test/broker-will-order.test.ts).
 *
 * So the hooks count each client's publishes from authorization until aedes reports them published, hold the will
 * until that count is zero (at most `maxWaitMs`, in case a publish failed and was never reported), and refuse what the
 * client's connection still delivers once the will has been released.
 */

interface ClientState {
  pending: number;
  willReleased: boolean;
  waiters: (() => void)[];
}

export class WillOrder {
  private readonly clients = new WeakMap<object, ClientState>();

  constructor(private readonly maxWaitMs = 1_000) {}

  private stateOf(client: object): ClientState {
    let state = this.clients.get(client);
    if (!state) {
      state = { pending: 0, willReleased: false, waiters: [] };
      this.clients.set(client, state);
    }
    return state;
  }

  /** A publish of `client` passed authorization and goes on to aedes. */
  accepted(client: object): void {
    this.stateOf(client).pending++;
  }

  /** aedes reports a publish of `client` stored and delivered. */
  published(client: object): void {
    const state = this.clients.get(client);
    if (!state || state.pending === 0) return;
    state.pending--;
    if (state.pending === 0) this.release(state);
  }

  /** Whether `client`'s will has gone out: whatever its connection still delivers is older news than the will. */
  willReleased(client: object): boolean {
    return this.clients.get(client)?.willReleased ?? false;
  }

  /** Runs `go` (which lets the will out) once the publishes `client` had in flight are through. */
  beforeWill(client: object, go: () => void): void {
    const state = this.stateOf(client);
    let timer: NodeJS.Timeout | undefined;
    const once = () => {
      if (state.willReleased) return;
      state.willReleased = true;
      clearTimeout(timer);
      go();
    };
    if (state.pending === 0) {
      state.willReleased = true;
      go();
      return;
    }
    timer = setTimeout(once, this.maxWaitMs);
    timer.unref();
    state.waiters.push(once);
  }

  private release(state: ClientState): void {
    const waiters = state.waiters;
    state.waiters = [];
    for (const go of waiters) go();
  }
}
