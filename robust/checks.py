"""Typed value checks: one place that says whether a value fits a field's type and range.

Config fields, compare's settings and every objective's declared options are checked here, so a
value is refused with the same words whether it came from a flag, a TOML file or Python.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

from robust.errors import ConfigError, non_ascii_digits

MAX_SEED = 2 ** 63 - 1
MAX_DURATION_S = 7 * 24 * 3600  # a week: a longer budget is a typo or belongs in several resumed runs
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"{value!r} ({_TYPE_WORDS.get(type(value), type(value).__name__)})"


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true/false", list: "a list", dict: "a table"}


def _looks_like(text: str, kind: type) -> bool:
    try:
        kind(text.strip())
        return True
    except ValueError:
        return False


def check_value(name: str, annotation: Any, meta: Mapping[str, Any], value: Any) -> Any:
    """``value`` checked against a field's annotation (``int``, ``float``, ``str``, ``bool``, ``X | None``) and
    metadata; returns it (a path-like as str) or raises ConfigError naming the field (as ``label`` in the metadata
    says, else the name with dashes), the value and the fix.

    Integers must be integers (not 1.5, not "3"), numbers finite, booleans true/false, strings
    non-empty; types it does not know are passed through unchecked.
    """
    label = meta.get("label") or name.replace("_", "-")
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {p.strip() for p in text.split("|")}
    base = next(iter(parts - {"None"}), None) if len(parts - {"None"}) == 1 else None
    if value is None:
        if "None" in parts or base is None:
            return None
        raise ConfigError(f"{label} needs a value; give one or leave it out for the default")
    kind = meta.get("kind")
    if kind == "duration":
        parse_duration(value, label)
        return str(value).strip()
    if kind == "path" and isinstance(value, os.PathLike):
        value = os.fspath(value)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{label} must be true or false, got {_describe(value)}; write true or false without quotes")
    if base == "int" and not (number and isinstance(value, int)):
        fix = "write it without quotes" if isinstance(value, str) and _looks_like(value, int) else "write a whole number"
        raise ConfigError(f"{label} must be a whole number, got {_describe(value)}; {fix}")
    if base == "float" and not number:
        fix = "write it without quotes" if isinstance(value, str) and _looks_like(value, float) else "write a number"
        raise ConfigError(f"{label} must be a number, got {_describe(value)}; {fix}")
    if base == "str":
        if kind == "fraction" and number:
            pass
        elif not isinstance(value, str):
            what = "a path (text)" if kind == "path" else "text"
            raise ConfigError(f"{label} must be {what}, got {_describe(value)}; quote it")
        elif not value.strip():
            raise ConfigError(f"{label} is empty; give a value or leave it out for the default")
        elif kind != "path" and not value.replace(",", "").strip():
            raise ConfigError(f"{label} {value!r} is empty (only commas); give a value or leave it out for the default")
        elif kind != "path" and non_ascii_digits(value):
            odd = non_ascii_digits(value)
            raise ConfigError(f"{label} {value!r} has digits that are not ASCII ({', '.join(map(repr, odd))}); "
                              "write numbers with the digits 0-9")
    if number and not math.isfinite(value):
        raise ConfigError(f"{label} must be a finite number, got {value}; give a real value")
    if number and base in ("int", "float"):
        _check_range(label, value, meta)
    choices = meta.get("choices")
    choices = choices() if callable(choices) else choices
    if choices and value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")
    return value


def parse_duration(text: Any, name: str = "time-budget") -> float:
    """Seconds of a duration written with units: ``90s``, ``10m``, ``2h``, ``1h30m``, ``1.5h``. A bare number is
    refused (seconds or minutes?), so are zero, negative values and more than a week; ConfigError naming ``name``."""
    example = "write it with a unit, e.g. 90s, 10m, 2h or 1h30m"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(f"{name} must be a duration such as 10m, got {_describe(text)}; {example}")
    words = str(text).strip().lower()
    if non_ascii_digits(words):
        raise ConfigError(f"{name} {text!r} has digits that are not ASCII; write numbers with the digits 0-9")
    if words.startswith("-"):
        raise ConfigError(f"{name} {text!r} is negative; give a positive duration, e.g. 10m")
    if isinstance(text, (int, float)) or _looks_like(words, float):
        raise ConfigError(f"{name} {text!r} has no unit (seconds? minutes?); {example}")
    match = _DURATION.fullmatch(words)
    if not words or match is None:
        raise ConfigError(f"{name} {text!r} is not a duration; {example}")
    hours, minutes, seconds = (float(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ConfigError(f"{name} {text!r} is no time at all; give a positive duration, e.g. 10m")
    if total > MAX_DURATION_S:
        raise ConfigError(f"{name} {text!r} is more than a week; give at most 168h (train longer in resumed runs)")
    return total


def format_duration(seconds: float) -> str:
    """``seconds`` as the budgets are written: 9m31s, 1h02m, 45s."""
    whole = int(round(seconds))
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def _check_range(label: str, value: float, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("min"), meta.get("max")
    above, below = meta.get("above"), meta.get("below")
    high = high() if callable(high) else high
    note = f" ({meta['max_note']})" if meta.get("max_note") and high is not None and value > high else ""
    ok = ((low is None or value >= low) and (high is None or value <= high)
          and (above is None or value > above) and (below is None or value < below))
    if ok:
        return
    lo = f"[{low}" if low is not None else f"({above}" if above is not None else None
    hi = f"{high}]" if high is not None else f"{below})" if below is not None else None
    if lo and hi:
        bound = f"in {lo}, {hi}"
    elif lo:
        bound = f">= {low}" if low is not None else f"> {above}"
    else:
        bound = f"<= {high}" if high is not None else f"< {below}"
    raise ConfigError(f"{label} must be {bound}{note}, got {value}")


def check_fields(cls: type, values: Mapping[str, Any], partial: bool = False) -> dict[str, Any]:
    """Check ``values`` against the fields of dataclass ``cls``; return the checked values.

    Unknown names are refused; with ``partial`` only the names given are checked (a TOML file,
    the flags given), otherwise every field of ``cls`` must be in ``values``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s): {', '.join(map(str, unknown))}; see `robust train --help`")
    names = [n for n in fields if n in values] if partial else list(fields)
    return {n: check_value(n, fields[n].type, fields[n].metadata, values[n]) for n in names}


def split_list(name: str, text: str | None) -> list[str]:
    """The items of a comma-separated list (``"pgd5,pgd10"``), stripped; ``[]`` for None.

    One rule for every comma list a flag, a TOML value or Python gives: an empty item (``pgd5,,pgd10``,
    a trailing comma, only commas) is refused, naming ``name`` and the text, never skipped.
    """
    if text is None:
        return []
    items = [part.strip() for part in str(text).split(",")]
    if any(not item for item in items):
        if not any(items):
            raise ConfigError(f"{name} is empty ({text!r}); give at least one item, or leave it out for the default")
        raise ConfigError(f"{name} {text!r} has an empty item; write the items separated by single commas, e.g. a,b")
    return items
