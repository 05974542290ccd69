"""The {{name}} stage. It lower-cases event_type and rejects events with a
negative price: replace the rules in `process` with yours.
Build: `bash build.sh`; try it: `host plugin test ../../{{name}}.wasm --input sample.csv`."""

from typing import List, Tuple

import wit_world
from wit_world import exports
from wit_world.imports.types import BatchResult, Event, Rejected


class Stage(exports.Stage):
    def init(self, config: List[Tuple[str, str]]) -> None:
        wit_world.log(2, f"{{name}}: started with {len(config)} settings")

    def process(self, batch: List[Event]) -> BatchResult:
        events, rejected = [], []
        for event in batch:
            if event.price_cents < 0:
                rejected.append(Rejected(event, "negative price"))
                continue
            event.event_type = event.event_type.lower()
            events.append(event)
        return BatchResult(events, rejected)

    def snapshot(self) -> bytes:
        return b""

    def restore(self, state: bytes) -> None:
        pass
