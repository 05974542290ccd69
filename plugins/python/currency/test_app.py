"""Unit tests of the conversion rules, in plain CPython:
python3 -m unittest test_app (from this folder, with the bindings not needed)."""
import sys
import types
import unittest
from decimal import Decimal

# app.py imports the generated bindings; stand them in for plain CPython.
for name in ["wit_world", "wit_world.exports", "wit_world.imports", "wit_world.imports.types", "componentize_py_types"]:
    sys.modules.setdefault(name, types.ModuleType(name))
sys.modules["wit_world.exports"].Stage = object
sys.modules["wit_world"].exports = sys.modules["wit_world.exports"]
for cls in ["BatchResult", "Event", "Rejected"]:
    setattr(sys.modules["wit_world.imports.types"], cls, object)
sys.modules["componentize_py_types"].Err = Exception

import app  # noqa: E402


class Conversion(unittest.TestCase):
    def test_exact_half_even(self):
        _, _, num, den = app.conversion_from([("rates", "USD:1,EUR:0.5"), ("target-currency", "EUR")])
        self.assertEqual(app.convert(3, num, den), 2)  # 1.5 -> 2
        self.assertEqual(app.convert(5, num, den), 2)  # 2.5 -> 2
        self.assertEqual(app.convert(-3, num, den), -2)
        _, _, num, den = app.conversion_from([("rates", "USD:1.0,EUR:0.92"), ("target-currency", "eur")])
        self.assertEqual(app.convert(1999, num, den), 1839)
        # EUR -> GBP is 0.79 / 0.92, not a terminating decimal: one rounding.
        _, _, num, den = app.conversion_from(
            [("rates", " USD:1 , EUR:0.92,GBP:0.79,"), ("source-currency", "EUR"), ("target-currency", "GBP")]
        )
        self.assertEqual(app.convert(10_000, num, den), 8587)

    def test_config_errors(self):
        cases = [
            ([("colour", "red")], 'unknown config key "colour" (known: rates, source-currency, target-currency)'),
            ([("rates", "USD:1")], "config needs rates and target-currency"),
            ([("rates", "USD:1"), ("target-currency", "JPY")], "no rate for currency JPY in rates"),
            ([("rates", "USD:1,EUR:0"), ("target-currency", "EUR")], "rate for EUR must be positive, not 0"),
            (
                [("rates", "USD:1,EUR:-1"), ("target-currency", "EUR")],
                'rate for EUR is not a decimal number like 0.92 (at most 9 decimals): "-1"',
            ),
            (
                [("rates", "USD:1,EUR:1000000000.5"), ("target-currency", "EUR")],
                "rate for EUR must be at most 1000000000, not 1000000000.5",
            ),
            ([("rates", "USD 1"), ("target-currency", "EUR")], 'rate "USD 1" is not CURRENCY:RATE'),
            ([("rates", "US$:1"), ("target-currency", "EUR")], 'currency "US$" is not made of letters A-Z'),
        ]
        for config, message in cases:
            with self.assertRaises(ValueError) as caught:
                app.conversion_from(config)
            self.assertEqual(str(caught.exception), message)


if __name__ == "__main__":
    unittest.main()
