"""The one registry shape: names -> frozen specs, registered by a decorator, refused with the valid names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from robust.attacks.named import Registry, Spec


@dataclass(frozen=True)
class ColourSpec(Spec):
    warm: bool = False


def colours() -> Registry[ColourSpec]:
    registry = Registry("colour", ColourSpec, error=LookupError)

    @registry.register("red", summary="the warm one", aliases=("crimson",), warm=True)
    class Red:
        pass

    registry.register("blue")(object)
    return registry


def test_a_decorated_entry_is_a_frozen_spec_found_by_name_and_alias():
    registry = colours()
    red = registry.get("crimson")
    assert (red.name, red.warm, red.build.__name__) == ("red", True, "Red")
    assert registry.names() == ("red", "blue")
    assert registry.all_names() == ("red", "crimson", "blue")
    assert "crimson" in registry and "green" not in registry and len(registry) == 2
    assert registry.help() == "red (the warm one), blue"
    with pytest.raises(dataclasses.FrozenInstanceError):
        red.warm = False  # type: ignore[misc]


def test_an_unknown_name_names_the_valid_ones_and_the_nearest():
    with pytest.raises(LookupError, match=r"unknown colour 'rde'; valid: red, crimson, blue; did you mean red\?"):
        colours().get("rde")


def test_a_taken_name_is_refused_and_remove_frees_it():
    registry = colours()
    with pytest.raises(ValueError, match="colour name 'crimson' is taken"):
        registry.register("crimson")(object)
    registry.remove("red")
    registry.register("crimson")(object)
    assert registry.names() == ("blue", "crimson")
