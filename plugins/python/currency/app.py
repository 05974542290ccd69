"""Currency conversion stage, in Python (componentize-py).

The same conversion as the Rust (plugins/rust/currency) and JavaScript
(plugins/js/currency) stages, rule for rule and message for message, so
the three compare like for like (host/tests/languages.rs checks their
outputs are identical; benches/languages.sh times them).

Converts each event's price from `source-currency` to `target-currency`
exactly: a rate is a decimal with at most 9 decimals, held as integer
billionths, so the new price is price_cents * target_rate / source_rate,
computed in integers and rounded once, half to even, to the cent. Rejects
an event whose converted price no longer fits NUMERIC(10,2).

Config:
  rates             units per 1 USD, e.g. "USD:1.0,EUR:0.92,GBP:0.79" (required)
  target-currency   e.g. EUR (required)
  source-currency   default USD

Build (what build.sh does):
  componentize-py -d ../../../wit -w plugin componentize app -o currency.wasm
"""

import re
from typing import List, Tuple

import wit_world
from wit_world import exports
from wit_world.imports.types import BatchResult, Event, Rejected
from componentize_py_types import Err

MAX_CENTS = 9_999_999_999
RATE_SCALE = 1_000_000_000
MAX_RATE = 1_000_000_000 * RATE_SCALE
KNOWN = "rates, source-currency, target-currency"
# The whitespace every language trims alike (not Unicode's wider set).
WS = " \t\r\n"
RATE = re.compile(r"[0-9]+(\.[0-9]{1,9})?")
NAME = re.compile(r"[A-Za-z]+")

# multiply by _num, divide by _den (both rates in billionths)
_num, _den = 1, 1


def currency_name(what: str, raw: str) -> str:
    name = raw.strip(WS)
    if not NAME.fullmatch(name):
        raise ValueError(f'{what} "{name}" is not made of letters A-Z')
    return name.upper()


def parse_rate(name: str, text: str) -> int:
    """'0.92' -> 920_000_000 billionths."""
    if not RATE.fullmatch(text):
        raise ValueError(f'rate for {name} is not a decimal number like 0.92 (at most 9 decimals): "{text}"')
    whole, _, frac = text.partition(".")
    rate = int(whole) * RATE_SCALE + int(frac.ljust(9, "0"))
    if rate == 0:
        raise ValueError(f"rate for {name} must be positive, not {text}")
    if rate > MAX_RATE:
        raise ValueError(f"rate for {name} must be at most 1000000000, not {text}")
    return rate


def parse_rates(text: str) -> dict:
    rates = {}
    for part in text.split(","):
        part = part.strip(WS)
        if not part:
            continue
        name, sep, value = part.partition(":")
        if not sep:
            raise ValueError(f'rate "{part}" is not CURRENCY:RATE')
        name = currency_name("currency", name)
        rates[name] = parse_rate(name, value.strip(WS))
    return rates


def conversion_from(config: List[Tuple[str, str]]) -> Tuple[str, str, int, int]:
    """(source, target, num, den): prices are multiplied by num / den."""
    settings = {}
    for key, value in config:
        if key not in ("rates", "source-currency", "target-currency"):
            raise ValueError(f'unknown config key "{key}" (known: {KNOWN})')
        settings[key] = value
    if "rates" not in settings or "target-currency" not in settings:
        raise ValueError("config needs rates and target-currency")
    rates = parse_rates(settings["rates"])
    source = currency_name("source-currency", settings.get("source-currency", "USD"))
    target = currency_name("target-currency", settings["target-currency"])
    for name in (source, target):
        if name not in rates:
            raise ValueError(f"no rate for currency {name} in rates")
    return source, target, rates[target], rates[source]


def round_half_even(n: int, d: int) -> int:
    """n / d rounded to the nearest integer, ties to even; d > 0."""
    q, r = divmod(n, d)
    if 2 * r > d or (2 * r == d and q % 2 == 1):
        return q + 1
    return q


def convert(cents: int, num: int, den: int) -> int:
    return round_half_even(cents * num, den)


class Stage(exports.Stage):
    def init(self, config: List[Tuple[str, str]]) -> None:
        global _num, _den
        try:
            source, target, _num, _den = conversion_from(config)
        except ValueError as e:
            raise Err(str(e))
        wit_world.log(2, f"currency: {source} -> {target}, multiplying prices by {_num}/{_den}")

    def process(self, batch: List[Event]) -> BatchResult:
        events = []
        rejected = []
        num, den = _num, _den
        for event in batch:
            converted = round_half_even(event.price_cents * num, den)
            if abs(converted) > MAX_CENTS:
                rejected.append(Rejected(event, f"converted price {converted} cents does not fit NUMERIC(10,2)"))
            else:
                event.price_cents = converted
                events.append(event)
        return BatchResult(events, rejected)

    def snapshot(self) -> bytes:
        return b""

    def restore(self, state: bytes) -> None:
        if state:
            raise Err("currency is stateless; refusing a non-empty snapshot")
