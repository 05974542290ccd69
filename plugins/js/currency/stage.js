// Currency conversion stage, in JavaScript (componentize-js 0.23.0).
//
// The same conversion as the Rust (plugins/rust/currency) and Python
// (plugins/python/currency) stages, rule for rule and message for message,
// so the three compare like for like (host/tests/languages.rs checks their
// outputs are identical; benches/languages.sh times them).
//
// Converts each event's price from `source-currency` to `target-currency`
// exactly: a rate is a decimal with at most 9 decimals, held as integer
// billionths (BigInt), so the new price is
//   price_cents * target_rate / source_rate
// computed in integers and rounded once, half to even, to the cent. Rejects
// an event whose converted price no longer fits NUMERIC(10,2).
//
// Config:
//   rates             units per 1 USD, e.g. "USD:1.0,EUR:0.92,GBP:0.79" (required)
//   target-currency   e.g. EUR (required)
//   source-currency   default USD
//
// Build (what build.sh does):
//   npx componentize-js --wit ../../../wit -n plugin -d http fetch-event -o currency_js.wasm stage.js

import log from 'log';

const MAX_CENTS = 9999999999n;
const RATE_SCALE = 1000000000n;
const MAX_RATE = 1000000000n * RATE_SCALE;
const KNOWN = 'rates, source-currency, target-currency';
// The whitespace every language trims alike (not Unicode's wider set,
// which String.prototype.trim would use).
const trim = (s) => s.replace(/^[ \t\r\n]+|[ \t\r\n]+$/g, '');
const RATE = /^[0-9]+(\.[0-9]{1,9})?$/;
const NAME = /^[A-Za-z]+$/;

// Multiply by num, divide by den (both rates in billionths).
let num = 1n;
let den = 1n;

function currencyName(what, raw) {
  const name = trim(raw);
  if (!NAME.test(name)) throw `${what} "${name}" is not made of letters A-Z`;
  return name.toUpperCase();
}

// '0.92' -> 920000000n billionths.
export function parseRate(name, text) {
  if (!RATE.test(text)) {
    throw `rate for ${name} is not a decimal number like 0.92 (at most 9 decimals): "${text}"`;
  }
  const [whole, frac = ''] = text.split('.');
  const rate = BigInt(whole) * RATE_SCALE + BigInt(frac.padEnd(9, '0'));
  if (rate === 0n) throw `rate for ${name} must be positive, not ${text}`;
  if (rate > MAX_RATE) throw `rate for ${name} must be at most 1000000000, not ${text}`;
  return rate;
}

export function parseRates(text) {
  const rates = new Map();
  for (const raw of text.split(',')) {
    const part = trim(raw);
    if (!part) continue;
    const colon = part.indexOf(':');
    if (colon < 0) throw `rate "${part}" is not CURRENCY:RATE`;
    const name = currencyName('currency', part.slice(0, colon));
    rates.set(name, parseRate(name, trim(part.slice(colon + 1))));
  }
  return rates;
}

// [source, target, num, den]: prices are multiplied by num / den.
export function conversionFrom(config) {
  const settings = new Map();
  for (const [key, value] of config) {
    if (key !== 'rates' && key !== 'source-currency' && key !== 'target-currency') {
      throw `unknown config key "${key}" (known: ${KNOWN})`;
    }
    settings.set(key, value);
  }
  if (!settings.has('rates') || !settings.has('target-currency')) {
    throw 'config needs rates and target-currency';
  }
  const rates = parseRates(settings.get('rates'));
  const source = currencyName('source-currency', settings.get('source-currency') ?? 'USD');
  const target = currencyName('target-currency', settings.get('target-currency'));
  for (const name of [source, target]) {
    if (!rates.has(name)) throw `no rate for currency ${name} in rates`;
  }
  return [source, target, rates.get(target), rates.get(source)];
}

// n / d rounded to the nearest integer, ties to even; d > 0. BigInt `/`
// truncates toward zero, so first make it a floor division.
export function roundHalfEven(n, d) {
  let q = n / d;
  let r = n % d;
  if (r < 0n) {
    q -= 1n;
    r += d;
  }
  if (2n * r > d || (2n * r === d && q % 2n !== 0n)) return q + 1n;
  return q;
}

export const stage = {
  init(config) {
    const [source, target, n, d] = conversionFrom(config);
    num = n;
    den = d;
    log(2, `currency: ${source} -> ${target}, multiplying prices by ${num}/${den}`);
  },
  process(batch) {
    const events = [];
    const rejected = [];
    for (const event of batch) {
      const converted = roundHalfEven(event.priceCents * num, den);
      if (converted > MAX_CENTS || converted < -MAX_CENTS) {
        rejected.push({ event, reason: `converted price ${converted} cents does not fit NUMERIC(10,2)` });
      } else {
        event.priceCents = converted;
        events.push(event);
      }
    }
    return { events, rejected };
  },
  snapshot() {
    return new Uint8Array();
  },
  restore(state) {
    if (state.length !== 0) throw 'currency is stateless; refusing a non-empty snapshot';
  },
};
