"""The threat model's numbers: eps and step sizes parsed exactly (fractions, never eval), per threat (linf, l2, l1)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

from robust.attacks.pgd import THREATS as BALLS
from robust.errors import ConfigError, check_ascii_number


def parse_fraction(text: str | float | int, name: str = "value") -> float:
    """Parse ``"8/255"``, ``"0.031"`` or a number exactly (fractions, never eval)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    check_ascii_number(str(text), name)
    exponent = re.search(r"[eE]\s*[+-]?\s*(\d+)", str(text))
    if exponent and len(exponent.group(1)) > 3:  # Fraction would compute 10**exponent exactly: refuse, do not hang
        raise ConfigError(f"{name} {text!r} is out of range; write it like 8/255 or 0.031")
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{name} {text!r} is not a number; write it like 8/255 or 0.031") from None
    except OverflowError:
        raise ConfigError(f"{name} {text!r} is too large for a number; write it like 8/255 or 0.031") from None


def parse_eps(text: str | float | int, name: str = "eps", allow_zero: bool = False) -> float:
    """Parse an eps in pixel units; it must lie in (0, 1] (or [0, 1] with ``allow_zero``)."""
    eps = parse_fraction(text, name)
    low_ok = eps >= 0 if allow_zero else eps > 0
    if not (low_ok and eps <= 1):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{name} {text!r} is outside {bound}; pixels are in [0, 1], e.g. 8/255")
    return eps


THREATS = tuple(BALLS)  # the attacks' table of threat models is the one source of their names


def resolve_eps(eps: float | str, threat: str) -> float:
    """eps in pixel units: [0, 1] for Linf; any finite value >= 0 for L2 and L1 (their balls grow with the image).

    An L1 radius is a sum over every input value (the official CIFAR-10 radius is 12), so one written as a
    fraction of 255 (12/255, a per-pixel Linf habit) is refused rather than read as a ball too small to matter.
    """
    if threat not in THREATS:
        raise ConfigError(f"unknown threat {threat!r}; valid: {', '.join(THREATS)}")
    if threat == "linf":
        return parse_eps(eps, allow_zero=True)
    if threat == "l1" and isinstance(eps, str) and re.search(r"/\s*255\s*$", eps):
        raise ConfigError(f"eps {eps!r} is a fraction of 255, but an L1 radius is a sum over all pixels, not a "
                          f"per-pixel step: write e.g. 12, not 12/255")
    value = parse_fraction(eps, "eps")
    if not (value >= 0 and math.isfinite(value)):
        raise ConfigError(f"eps {eps!r} must be a finite number >= 0 for the {threat.upper()} threat model")
    return value


def check_radius(eps: float, threat: str, values: int) -> None:
    """Refuse an L2 or L1 radius no perturbation of an input of ``values`` numbers in [0, 1] can reach
    (above sqrt(values) in L2, above values in L1): a radius in the wrong units."""
    largest = {"linf": 1.0, "l2": math.sqrt(values), "l1": float(values)}[threat]
    if eps > largest:
        raise ConfigError(f"eps {eps:g} is larger than any {threat} perturbation of these inputs "
                          f"({values} values in [0, 1]: at most {largest:g}); give the radius in pixel units")


def parse_eps_list(text: str, threat: str = "linf") -> list[float]:
    """``"0,2/255,4/255"`` -> sorted eps values (each parsed like --eps). An empty item is refused, as in every
    comma list (robust.checks.split_list, which this layer cannot import)."""
    parts = [part.strip() for part in text.split(",")]
    if not any(parts):
        raise ConfigError(f"eps list {text!r} is empty; write it like 0,2/255,4/255,8/255")
    if not all(parts):
        raise ConfigError(f"eps list {text!r} has an empty item; write the values separated by single commas, e.g. 0,2/255,4/255")
    return sorted({resolve_eps(part, threat) for part in parts})
