"""The one registry shape of the project: name -> frozen spec, registered by a decorator.

Attacks, objectives, norms, datasets and architectures each keep one :class:`Registry`. An entry's
spec is a frozen dataclass (a subclass of :class:`Spec`) and the one source of that entry's facts:
its name, aliases, the summary ``--help`` shows, its options and defaults, and ``build`` (the class
or function that makes it). Choices, help texts, docs tables and config checks read the specs.

Adding an entry is one decorated definition::

    NORMS = Registry("norm", NormSpec)

    @NORMS.register("sabn", summary="sandwich BN: per-route BN then a shared affine")
    class SandwichBatchNorm2d(RoutedNorm): ...

    NORMS.get("sabn").build        # the class
    NORMS.names()                  # ("bn", "auxbn", "sabn"), in registration order

The class lives in ``attacks/`` because that package depends on nothing else of robust, and every
registry of robust uses this same class.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar


@dataclass(frozen=True)
class Spec:
    """The facts every registry entry has; a registry's own spec type adds its fields (all with defaults)."""

    name: str
    build: Any = None  # what makes the entry: a class or a function
    summary: str = ""  # one line for --help and docs tables
    aliases: tuple[str, ...] = ()  # other names that select the same entry


S = TypeVar("S", bound=Spec)


def nearest(name: object, valid: list[str]) -> str:
    """``; did you mean X?`` for the valid name nearest to ``name``, or "" when none is near."""
    near = difflib.get_close_matches(str(name).strip().lower(), valid, n=1, cutoff=0.6)
    return f"; did you mean {near[0]}?" if near else ""


class Registry(Generic[S]):
    """Names -> frozen specs of one kind (``kind`` names it in errors: "unknown norm 'x'; valid: ...").

    ``error`` is the exception an unknown name raises (ValueError by default; robust's registries
    pass their ConfigError or DataError so a bad name is refused like any other bad setting).
    """

    def __init__(self, kind: str, spec_type: type[S] = Spec, error: type[Exception] = ValueError) -> None:
        self.kind, self.spec_type, self.error = kind, spec_type, error
        self._specs: dict[str, S] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, **facts: Any) -> Callable[[Any], Any]:
        """Decorator: record ``name`` -> ``spec_type(name, build=<the decorated object>, **facts)``."""

        def decorate(obj: Any) -> Any:
            self.add(self.spec_type(name=name, build=obj, **facts))
            return obj

        return decorate

    def add(self, spec: S) -> S:
        """Record a ready-made spec; ValueError when its name or an alias is taken."""
        if not isinstance(spec, self.spec_type):
            raise TypeError(f"a {self.kind} registry holds {self.spec_type.__name__}, got {type(spec).__name__}")
        for name in (spec.name, *spec.aliases):
            if name in self._specs or name in self._aliases:
                raise ValueError(f"{self.kind} name {name!r} is taken")
        self._specs[spec.name] = spec
        self._aliases.update({alias: spec.name for alias in spec.aliases})
        return spec

    def remove(self, name: str) -> None:
        """Forget an entry and its aliases (for tests that register one of their own)."""
        spec = self._specs.pop(name)
        for alias in spec.aliases:
            self._aliases.pop(alias, None)

    def get(self, name: str) -> S:
        """The spec called ``name`` or aliased so; ``error`` naming the valid ones (and the nearest) otherwise."""
        key = self.canonical(name)
        if key is None:
            valid = self.all_names()
            raise self.error(f"unknown {self.kind} {name!r}; valid: {', '.join(valid)}{nearest(name, list(valid))}")
        return self._specs[key]

    def canonical(self, name: object) -> str | None:
        """The entry's own name for ``name`` (an alias resolves), or None when nothing is registered so."""
        key = str(name)
        key = self._aliases.get(key, key)
        return key if key in self._specs else None

    def __contains__(self, name: object) -> bool:
        return self.canonical(name) is not None

    def __iter__(self) -> Iterator[S]:
        return iter(list(self._specs.values()))

    def __len__(self) -> int:
        return len(self._specs)

    def names(self) -> tuple[str, ...]:
        """Every entry's own name, in registration order."""
        return tuple(self._specs)

    def all_names(self) -> tuple[str, ...]:
        """Every name that selects an entry: each entry followed by its aliases."""
        return tuple(n for spec in self._specs.values() for n in (spec.name, *spec.aliases))

    def help(self) -> str:
        """``name (summary), name, ...`` for --help, in registration order."""
        return ", ".join(f"{s.name} ({s.summary})" if s.summary else s.name for s in self._specs.values())
