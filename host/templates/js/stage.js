// The {{name}} stage. It lower-cases eventType and rejects events with a
// negative price: replace the rules in `process` with yours.
// Build: `bash build.sh`; try it: `host plugin test ../../{{name}}.wasm --input sample.csv`.

import log from 'log';

export const stage = {
  init(config) {
    log(2, `{{name}}: started with ${config.length} settings`);
  },
  process(batch) {
    const events = [];
    const rejected = [];
    for (const event of batch) {
      if (event.priceCents < 0n) {
        rejected.push({ event, reason: 'negative price' });
        continue;
      }
      event.eventType = event.eventType.toLowerCase();
      events.push(event);
    }
    return { events, rejected };
  },
  snapshot() {
    return new Uint8Array();
  },
  restore(state) {},
};
