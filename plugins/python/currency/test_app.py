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
        f = app.factor_from([("rates", "USD:1,EUR:0.5"), ("target-currency", "EUR")])
        self.assertEqual(f, Decimal("0.5"))
        self.assertEqual(app.convert(3, f), 2)  # 1.5 -> 2
        self.assertEqual(app.convert(5, f), 2)  # 2.5 -> 2
        self.assertEqual(app.convert(1999, Decimal("0.92")), 1839)

    def test_config_errors(self):
        with self.assertRaisesRegex(ValueError, "colour"):
            app.factor_from([("colour", "red")])
        with self.assertRaisesRegex(ValueError, "no rate for currency JPY"):
            app.factor_from([("rates", "USD:1"), ("target-currency", "JPY")])
        with self.assertRaisesRegex(ValueError, "positive"):
            app.factor_from([("rates", "USD:1,EUR:-1"), ("target-currency", "EUR")])


if __name__ == "__main__":
    unittest.main()
