"""An evaluation's state file: per route and batch the clean predictions and each attack's verdicts.

Written atomically after each attack on each batch (``--state FILE``), so an interrupted evaluation
loses at most the attack it was running on one batch, and ``--resume`` runs only what is missing.
The file names what it was computed for (the model's weights, the images, eps, threat, the attack
list and every setting that shapes a verdict); a resume with anything else is refused, saying what
differs, since mixing two evaluations' verdicts would give figures of neither.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust.errors import ConfigError
from robust.outputs import check_output, write_output

STATE_VERSION = 1

# fingerprint keys -> how a refusal names them
_WHAT = {"model": "another model (its weights differ)", "images": "other images (their pixels or labels differ)",
         "n": "another number of images", "eps": "another eps", "threat": "another threat model",
         "attacks": "another attack list", "routes": "other routes", "seed": "another seed",
         "batch_size": "another batch size", "restarts": "another number of restarts", "queries": "another query budget",
         "attack_precision": "another attack precision", "split": "another rule of chunks",
         "eot": "another number of EOT forwards", "surrogate": "another surrogate (--transfer-from)"}


def digest_tensors(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and bytes of tensors: the same digest only for the same values."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings: Any) -> dict[str, Any]:
    """What a state file's verdicts were computed for: the model's weights and buffers, the images, the settings."""
    return {"model": digest_tensors(list(model.state_dict().items())), "images": digest_tensors([("x", x), ("y", y)]),
            "n": len(y), **settings}


def differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The fingerprint entries that differ, in words with both values where they are short."""
    out = []
    for key, value in wanted.items():
        if stored.get(key) != value:
            text = _WHAT.get(key, key)
            if key not in ("model", "images"):
                text += f" ({stored.get(key)!r} there, {value!r} now)"
            out.append(text)
    return out


class EvalState:
    """The verdicts an evaluation has so far, keyed by route, batch and attack (or "clean"), and each attack's seconds."""

    def __init__(self, print_: dict[str, Any], path: Path | None = None) -> None:
        self.fingerprint, self.path = print_, path
        self.routes: dict[str, dict[str, Any]] = {}

    def route(self, route: str) -> dict[str, Any]:
        return self.routes.setdefault(route, {"batches": {}, "seconds": {}})

    def add(self, route: str, batch: int, key: str, verdicts: list, seconds: float,
            stages: dict[str, float] | None = None, iterations: dict[str, int] | None = None) -> None:
        """Record one chunk's clean predictions (key "clean") or one attack's robust flags and seconds (an
        ensemble's also per stage, as "name/stage"; our PGD's also its iterations run and in full), and
        write the file."""
        r = self.route(route)
        r["batches"].setdefault(str(batch), {})[key] = verdicts
        for name, s in {key: seconds, **{f"{key}/{stage}": t for stage, t in (stages or {}).items()}}.items():
            r["seconds"][name] = r["seconds"].get(name, 0.0) + s
        if iterations:
            counts = r.setdefault("iterations", {}).setdefault(key, {})
            for name, n in iterations.items():
                counts[name] = counts.get(name, 0) + n
        self.save()

    def done(self, route: str, batch: int) -> dict[str, list]:
        """What is known of one batch: {"clean": predictions, <attack>: robust flags, ...}."""
        return self.routes.get(route, {}).get("batches", {}).get(str(batch), {})

    def seconds(self) -> dict[str, float]:
        """Seconds per attack (and the clean pass), summed over routes, batches and processes."""
        total: dict[str, float] = {}
        for r in self.routes.values():
            for key, s in r["seconds"].items():
                total[key] = total.get(key, 0.0) + s
        return total

    def iterations(self) -> dict[str, dict[str, int]]:
        """Per attack that counts them, its iterations run and in full, summed over routes, chunks and processes."""
        total: dict[str, dict[str, int]] = {}
        for r in self.routes.values():
            for key, counts in r.get("iterations", {}).items():
                for name, n in counts.items():
                    total.setdefault(key, {})[name] = total.setdefault(key, {}).get(name, 0) + n
        return total

    def save(self) -> None:
        if self.path is not None:
            text = json.dumps({"version": STATE_VERSION, "fingerprint": self.fingerprint, "routes": self.routes})
            write_output(self.path, text, overwrite=True)


def open_state(path: str | os.PathLike[str] | None, resume: bool, force: bool, print_: dict[str, Any]) -> EvalState:
    """The state to fill: a new one (``path`` checked writable now, before any attack runs), or with
    ``resume`` the one in ``path``, refused unless it was computed for exactly this evaluation."""
    if path is None:
        if resume:
            raise ConfigError("--resume needs --state FILE, the state file of the evaluation to finish")
        return EvalState(print_)
    target = Path(os.fspath(path))
    if not resume:
        # an existing state file is an unfinished evaluation's work: kept unless --force
        if target.exists() and not force:
            raise ConfigError(f"{target} already exists; pass --resume to finish that evaluation, --force to start "
                              "it again, or choose another --state")
        return EvalState(print_, check_output(target, "--state", force=True))
    if not target.is_file():
        raise ConfigError(f"--resume: the state file {target} does not exist; run without --resume to start, "
                          "with --state FILE to make one")
    stored = _read(target)
    differ = differences(stored.get("fingerprint") or {}, print_)
    if differ:
        raise ConfigError(f"{target} was written by another evaluation: {'; '.join(differ)}; resume with the same "
                          "model, images and settings, or give another --state")
    check_output(target, "--state", force=True)  # still writable: refused now, not after the next attack
    if not os.access(target, os.W_OK):
        raise ConfigError(f"the state file {target} is read-only; make it writable or copy it elsewhere")
    state = EvalState(print_, target)
    state.routes = stored.get("routes") or {}
    return state


def _read(path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is no readable state file ({exc}); give the --state file an evaluation wrote") from None
    if not isinstance(stored, dict) or stored.get("version") != STATE_VERSION or not isinstance(stored.get("routes"), dict):
        raise ConfigError(f"{path} is no state file of this version of robust eval; give the --state file it wrote")
    return stored
