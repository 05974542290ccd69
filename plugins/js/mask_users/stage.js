// User-id bucketing stage, in JavaScript (componentize-js 0.23.0).
//
// Replaces `user_id` with a bucket for privacy:
//   bucket = ((user_id * 2654435761) mod 2^32) mod buckets + 1
// and drops events whose type is listed in `drop-event-types`. Counts the
// events it has processed as its state, to show snapshot/restore.
//
// Config: buckets (default 1000, 1..=1000000), drop-event-types (comma list).
// Build (what build.sh does):
//   npx componentize-js --wit ../../../wit -n plugin -d http fetch-event -o mask_users.wasm stage.js

import log from 'log';

let buckets = 1000n;
let dropTypes = new Set();
let processed = 0n;

export function bucket(userId, n) {
  return Number(((BigInt(userId) * 2654435761n) % 4294967296n) % BigInt(n)) + 1;
}

export const stage = {
  init(config) {
    for (const [key, value] of config) {
      if (key === 'buckets') {
        const n = Number(value);
        if (!Number.isInteger(n) || n < 1 || n > 1000000) {
          throw `buckets ${JSON.stringify(value)} must be a whole number from 1 to 1000000`;
        }
        buckets = BigInt(n);
      } else if (key === 'drop-event-types') {
        dropTypes = new Set(value.split(',').map((t) => t.trim()).filter((t) => t));
      } else {
        throw `unknown config key ${JSON.stringify(key)} (known: buckets, drop-event-types)`;
      }
    }
    log(2, `mask_users: ${buckets} buckets, dropping [${[...dropTypes].join(', ')}]`);
  },
  process(batch) {
    processed += BigInt(batch.length);
    const events = [];
    for (const e of batch) {
      if (dropTypes.has(e.eventType)) continue;
      e.userId = bucket(e.userId, buckets);
      events.push(e);
    }
    return { events, rejected: [] };
  },
  snapshot() {
    const bytes = new Uint8Array(9);
    bytes[0] = 1;
    new DataView(bytes.buffer).setBigUint64(1, processed, true);
    return bytes;
  },
  restore(state) {
    if (state.length === 0) return;
    if (state.length !== 9 || state[0] !== 1) {
      throw `mask_users snapshot format ${state[0]} is not supported (expected 1)`;
    }
    processed = new DataView(state.buffer, state.byteOffset).getBigUint64(1, true);
  },
};
