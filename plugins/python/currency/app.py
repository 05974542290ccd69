"""Currency conversion stage, in Python (componentize-py).

Converts each event's price from `source-currency` (default USD) to
`target-currency`, with rates from config, exactly (Decimal arithmetic,
rounded half to even to the cent). Rejects an event whose converted price
no longer fits NUMERIC(10,2).

Config:
  target-currency   e.g. EUR (required)
  rates             units per 1 USD, e.g. "USD:1.0,EUR:0.92,GBP:0.79" (required)
  source-currency   default USD

Build (what build.sh does):
  componentize-py -d ../../../wit -w plugin componentize app -o currency.wasm
"""

from decimal import Decimal, InvalidOperation, ROUND_HALF_EVEN
from typing import List, Tuple

import wit_world
from wit_world import exports
from wit_world.imports.types import BatchResult, Event, Rejected
from componentize_py_types import Err

MAX_CENTS = 9_999_999_999
KNOWN = {"target-currency", "rates", "source-currency"}

_factor = Decimal(1)


def parse_rates(text: str) -> dict:
    rates = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition(":")
        if not sep:
            raise ValueError(f"rate {part.strip()!r} is not CURRENCY:RATE")
        try:
            rate = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"rate for {name.strip()} is not a number: {value.strip()!r}")
        if not rate.is_finite() or rate <= 0:
            raise ValueError(f"rate for {name.strip()} must be positive, not {value.strip()}")
        rates[name.strip().upper()] = rate
    return rates


def factor_from(config: List[Tuple[str, str]]) -> Decimal:
    settings = dict(config)
    unknown = set(settings) - KNOWN
    if unknown:
        raise ValueError(f"unknown config key {sorted(unknown)[0]!r} (known: {', '.join(sorted(KNOWN))})")
    if "rates" not in settings or "target-currency" not in settings:
        raise ValueError("config needs `rates` and `target-currency`")
    rates = parse_rates(settings["rates"])
    source = settings.get("source-currency", "USD").strip().upper()
    target = settings["target-currency"].strip().upper()
    for name in (source, target):
        if name not in rates:
            raise ValueError(f"no rate for currency {name} in `rates`")
    return rates[target] / rates[source]


def convert(cents: int, factor: Decimal) -> int:
    return int((Decimal(cents) * factor).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


class Stage(exports.Stage):
    def init(self, config: List[Tuple[str, str]]) -> None:
        global _factor
        try:
            _factor = factor_from(config)
        except ValueError as e:
            raise Err(str(e))
        wit_world.log(2, f"currency: multiplying prices by {_factor}")

    def process(self, batch: List[Event]) -> BatchResult:
        events = []
        rejected = []
        for event in batch:
            converted = convert(event.price_cents, _factor)
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
