"""Typed mixer options: each option's kind, range and meaning, checked the same way for every mixer.

A mixer declares `options = {"window": Option(64, int, min=0, doc="..."), ...}`; `Mixer.check_options`
checks what a recipe gives against these specs, with one-line errors such as
"mixer.options.feature_dim: must be an int >= 1 or null (null: head_dim), got -3".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: the kinds an option may have, with the name messages use
KIND_NAMES: dict[type, str] = {int: "int", float: "float", bool: "bool", str: "string", list: "list"}
#: where a doc says what null means: "...; null: head_dim"
NULL_MARK = "null: "


@dataclass(frozen=True)
class Option:
    """One mixer option: its default, kind (int, float, bool, str or list), optional bounds and choices.

    min / max are inclusive bounds, above / below exclusive ones (int and float only). nullable: None is
    allowed, and `doc` then says what it means after "null: ". declared is False only for specs that
    `Mixer.__init_subclass__` inferred from a plain default (kind None there: any value).
    """

    default: Any
    kind: type | None = None
    min: float | None = None
    max: float | None = None
    above: float | None = None
    below: float | None = None
    choices: tuple | None = None
    nullable: bool = False
    doc: str = ""
    declared: bool = True

    def __post_init__(self):
        if self.kind is not None and self.kind not in KIND_NAMES:
            raise TypeError(f"Option kind must be one of int, float, bool, str, list; got {self.kind!r}")
        bounded = any(b is not None for b in (self.min, self.max, self.above, self.below))
        if bounded and self.kind not in (int, float):
            raise TypeError(f"Option bounds need kind int or float, got {self.kind!r}")
        if self.min is not None and self.above is not None or self.max is not None and self.below is not None:
            raise TypeError("Option takes at most one lower bound (min or above) and one upper (max, below)")
        if self.declared and (self.kind is None or not self.doc or "\n" in self.doc):
            raise TypeError(
                f"a declared Option needs a kind and a one-line doc, got {self.kind!r}, {self.doc!r}"
            )
        if self.declared and self.nullable and NULL_MARK not in self.doc:
            raise TypeError(
                f"a nullable Option's doc must say what null means ('{NULL_MARK}...'), got {self.doc!r}"
            )

    @property
    def null_meaning(self) -> str:
        """What None stands for, from the doc's "null: ..." part ("" when not said)."""
        return self.doc.split(NULL_MARK, 1)[1].strip() if NULL_MARK in self.doc else ""

    def _range(self) -> str:
        """ ">= 1", "< 3", "in (0, 1]" or "" (no bound)."""
        low = high = None  # each (interval end, comparison)
        if self.min is not None:
            low = (f"[{self.min}", f">= {self.min}")
        elif self.above is not None:
            low = (f"({self.above}", f"> {self.above}")
        if self.max is not None:
            high = (f"{self.max}]", f"<= {self.max}")
        elif self.below is not None:
            high = (f"{self.below})", f"< {self.below}")
        if low and high:
            return f"in {low[0]}, {high[0]}"
        return (low or high or ("", ""))[1]

    def describe(self) -> str:
        """The allowed values in words: "int >= 1 or null", "one of silu, relu", "float in (0, 1)"."""
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices)
        elif self.kind is None:
            text = "any value"
        else:
            text = " ".join(part for part in (KIND_NAMES[self.kind], self._range()) if part)
        return f"{text} or null" if self.nullable else text

    def _expected(self) -> str:
        text = self.describe()
        if self.choices is None and self.kind is not None:
            text = ("an " if text[0] in "aeiou" else "a ") + text
        meaning = self.null_meaning
        return f"{text} (null: {meaning})" if self.nullable and meaning else text

    def _refuse(self, key: str, value: Any) -> ValueError:
        return ValueError(f"{key}: must be {self._expected()}, got {value!r}")

    def _coerce(self, value: Any, key: str) -> Any:
        kind = self.kind
        if kind is None:
            return value
        if kind is float:
            return self._coerce_float(value, key)
        accepted = {bool: bool, int: int, str: str, list: (list, tuple)}[kind]
        if isinstance(value, accepted) and not (kind is int and isinstance(value, bool)):
            return list(value) if kind is list else value
        raise self._refuse(key, value)

    def _coerce_float(self, value: Any, key: str) -> float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string (see zoo.recipe)
            try:
                number = float(value.strip().replace("_", ""))
            except ValueError:
                raise self._refuse(key, value) from None
        if isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number):
            return float(number)
        raise self._refuse(key, value)

    def check(self, value: Any, key: str) -> Any:
        """`value` coerced to this option's kind (an int where a float is wanted), or a one-line ValueError
        naming `key`, what is allowed and what was given."""
        if value is None:
            if self.nullable or self.kind is None:
                return None
            raise self._refuse(key, value)
        coerced = self._coerce(value, key)
        if self.choices is not None and coerced not in self.choices:
            raise self._refuse(key, value)
        if self.kind in (int, float):
            out_of_range = (
                (self.min is not None and coerced < self.min)
                or (self.above is not None and coerced <= self.above)
                or (self.max is not None and coerced > self.max)
                or (self.below is not None and coerced >= self.below)
            )
            if out_of_range:
                raise self._refuse(key, value)
        return coerced


def infer_option(default: Any) -> Option:
    """An undeclared spec for a plain default: its kind from the default's type (any value for None or an
    unknown type), no range."""
    kind = next((k for k in (bool, int, float, str) if type(default) is k), None)
    if isinstance(default, (list, tuple)):
        kind = list
    return Option(default, kind, nullable=default is None, declared=False)
