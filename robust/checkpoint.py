"""The one place that writes and reads checkpoints.

A checkpoint is a dict of tensors and plain Python values, written atomically (temporary file,
fsync, os.replace: a kill at any moment leaves the previous file intact) and read with
``torch.load(weights_only=True)``, which never runs code from the file. It carries the model's
build arguments, so a model is rebuilt from the file alone.

Two verbs load: :func:`read_checkpoint` gives the dict (of a file, an export or a run folder) and
:func:`load_model` the model (from a path or from that dict). :func:`save_checkpoint` writes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from robust.errors import CheckpointError, ConfigError, unreadable_file
from robust.nn.factory import build_model, unwrap
from robust.nn.mixed import MixedClassifier, MixSettings, is_mixture_args
from robust.nn.norms import ROUTES, export_route, routes_for
from robust.outputs import atomic_output, write_output
from robust.run import checkpoint_path

FORMAT = "robust-checkpoint"


VERSION = 1


def build_checkpoint(model: nn.Module, **fields: Any) -> dict[str, Any]:
    """The checkpoint dict: model weights and build arguments plus any extra ``fields``."""
    model = unwrap(model)
    build_args = getattr(model, "build_args", None)
    if build_args is None:
        raise CheckpointError("the model has no build_args; build it with robust.build_model")
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "model_args": dict(build_args), "model": state, **fields}


SAFETENSORS = ".safetensors"


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path, overwrite: bool = True) -> Path:
    """Write ``checkpoint`` to ``path`` atomically; no partial file is ever visible at ``path``.

    ``overwrite=False`` never replaces a file that exists when the write completes. A path ending in
    ``.safetensors`` gets the safetensors format (no pickle): the weights as tensors, every other
    field as JSON in the header's metadata (key ``robust``).
    """
    path = Path(path)
    if path.suffix == SAFETENSORS:
        weights = {k: v.contiguous() for k, v in checkpoint["model"].items()}
        fields = {k: v for k, v in checkpoint.items() if k != "model"}
        data = safetensors.torch.save(weights, metadata={"robust": json.dumps(fields)})
        write_output(path, data, overwrite=overwrite)
        return path
    with atomic_output(path, overwrite=overwrite) as fh:
        torch.save(checkpoint, fh)
    return path


def state_dict_bytes(obj: dict[str, Any]) -> bytes:
    """``obj`` (tensors and plain values) as ``torch.save`` writes it: the file other tools' ``torch.load`` reads."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load_safetensors(path: Path) -> dict[str, Any]:
    """A checkpoint from a .safetensors file: tensors and the JSON fields of its metadata; nothing is unpickled."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            weights = {k: fh.get_tensor(k) for k in fh.keys()}
        fields = json.loads(meta["robust"])
    except (OSError, KeyError, ValueError, safetensors.SafetensorError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file of robust ({type(exc).__name__}); "
                              "write one with `robust export RUN -o model.safetensors`, or for another model's "
                              "weights pass --arch and --dataset") from None
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path} has no robust metadata; write it with `robust export`")
    return {**fields, "model": weights}


# What torch.load(weights_only=True) raises for a file it cannot or will not read (code refused, not a torch
# file, truncated, unreadable).
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, AttributeError,
               IndexError, KeyError, TypeError, UnicodeDecodeError, MemoryError, OverflowError)
NOT_A_CHECKPOINT_FIX = ("pass a checkpoint written by robust train or robust export, or a run folder; for another "
                        "model's weights add --arch")


def check_path_argument(path: Any, what: str = "checkpoint") -> Path:
    """``path`` as a Path; ConfigError for anything that is no path (a number, None, a model object)."""
    if isinstance(path, nn.Module):
        raise ConfigError(f"the {what} must be a path, got a model ({type(path).__name__}); pass the file or run folder "
                          "it was loaded from, or use the model itself")
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise ConfigError(f"the {what} must be a path (a file or run folder), got {path!r}")
    return Path(path)


CHECKPOINT_KINDS = ("train", "export", "mix")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict of a checkpoint, an export or a run folder (its best.pt, else last.pt), read safely and checked.

    A ``.pt`` file is read with ``weights_only=True`` (no code from the file runs), a ``.safetensors``
    file without pickle; either must be robust's format and hold a model (its build arguments and
    weights). Anything else is a one-line CheckpointError naming the file and the fix.
    """
    path = checkpoint_path(check_path_argument(path))
    checkpoint = _read_file(path, map_location)
    kind = checkpoint.get("kind", "train")
    if kind not in CHECKPOINT_KINDS:
        raise CheckpointError(f"{path} is a {kind!r} checkpoint, not a model; pass a training checkpoint, run folder or export")
    missing = [k for k in ("model_args", "model") if not isinstance(checkpoint.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is not a model checkpoint of robust")
    return checkpoint


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """:func:`read_checkpoint` under the name ``from robust import load_checkpoint`` has always given."""
    return read_checkpoint(path, map_location)


def _read_file(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """A checkpoint file's dict in robust's format; CheckpointError with the reason otherwise."""
    if path.suffix == SAFETENSORS:
        checkpoint = _load_safetensors(path)
        if checkpoint.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a robust checkpoint; write one with `robust export`")
        return checkpoint
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except LOAD_ERRORS as exc:
        raise CheckpointError(unreadable_file(path, exc, "a checkpoint", NOT_A_CHECKPOINT_FIX)) from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a robust checkpoint (write one with `robust train` or `robust export`); "
                              "for another model's weights pass --arch and --dataset")
    return checkpoint


def load_model(source: str | Path | dict[str, Any], route: str | None = None, weights: str | None = None) -> nn.Module:
    """The model of a checkpoint, an export or a run folder (its best.pt), on the CPU, in eval mode.

    ``source`` is a path or a dict :func:`read_checkpoint` returned (read once, when the caller needs
    its other fields too). With ``route`` ('clean' or 'adv') a dual-route model comes back as the
    plain single-route model of that route (``robust.export_route``). A run trained with ``--ema``
    gives its averaged weights unless ``weights="live"`` (:func:`weights_of` says which were used).
    """
    checkpoint = source if isinstance(source, dict) else read_checkpoint(source)
    model = _build_model(_with_weights(checkpoint, weights)).eval()
    if route is None:
        return model
    if isinstance(model, MixedClassifier):
        routes_for(model, route)  # a mixture is one classifier: its one route, or a one-line refusal
        return model
    if route not in ROUTES:
        raise ConfigError(f"unknown route {route!r}; valid: {', '.join(ROUTES)}")
    routes_for(model, route)  # the rule eval applies: a route the model has (bn and exports have one)
    if checkpoint["model_args"].get("exported_route") is not None:
        return model
    return export_route(model, route).eval()


WEIGHTS = ("ema", "live")


def weights_of(checkpoint: dict[str, Any], weights: str | None = None) -> str | None:
    """Which weights ``load_model(checkpoint, weights=weights)`` scores: ``ema`` (the averaged ones) or
    ``live``; an export says what it was written from; None where nothing records it."""
    if checkpoint.get("kind") == "export":
        return checkpoint.get("weights") if checkpoint.get("weights") in WEIGHTS else None
    return "ema" if weights != "live" and isinstance(checkpoint.get("ema"), dict) else "live"


def _with_weights(checkpoint: dict[str, Any], weights: str | None = None) -> dict[str, Any]:
    """The checkpoint with the chosen weights as its model: ``ema`` (the averaged weights, the default
    when the run kept an average) or ``live`` (the weights the optimizer trained)."""
    if weights not in (None, *WEIGHTS):
        raise ConfigError(f"unknown weights {weights!r}; valid: {', '.join(WEIGHTS)}")
    average = checkpoint.get("ema")
    if weights == "ema" and not isinstance(average, dict):
        raise ConfigError("this checkpoint has no averaged weights (its run trained without --ema); drop --weights ema "
                          "or pass --weights live")
    if weights == "live" or not isinstance(average, dict):
        return checkpoint
    return {**checkpoint, "model": average["model"]}


def _build_model(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the model a checkpoint describes (in train mode, as built) and load its ``model`` weights."""
    args = dict(checkpoint["model_args"])
    if is_mixture_args(args):
        return _build_mixture(checkpoint)
    args.pop("exported_route", None)
    if "final_norm" not in args and ":" not in str(args.get("arch")):  # written before the option existed: every model then had it
        args["final_norm"] = any(k.startswith("final_norm.") for k in checkpoint.get("model", {}))
    try:
        model = build_model(**args)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint describes a model we cannot build: {exc}") from None
    what = weight_mismatch(model, checkpoint["model"])
    if what:
        raise CheckpointError(f"checkpoint weights do not fit its architecture, {args.get('arch')} ({what})")
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not fit its architecture ({first})") from None
    model.build_args = dict(checkpoint["model_args"])
    recorded = (checkpoint.get("data") or {}).get("input_size") if isinstance(checkpoint.get("data"), dict) else None
    if isinstance(recorded, (list, tuple)) and len(recorded) == 3:
        model.input_shape = tuple(int(v) for v in recorded)  # (C, H, W) it was trained on: robust.evaluate checks it
    return model


def _build_mixture(checkpoint: dict[str, Any]) -> nn.Module:
    """A :class:`MixedClassifier` from its checkpoint: each part rebuilt from its own build arguments and weights."""
    args, state = checkpoint["model_args"], checkpoint["model"]
    parts = {}
    for part in ("robust", "accurate"):
        if args.get(part) is None:
            parts[part] = None
            continue
        prefix = f"{part}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        parts[part] = _build_model({"model_args": args[part], "model": weights, "data": checkpoint.get("data")})
    try:
        settings = MixSettings(**args["mixture"])
    except TypeError as exc:
        raise CheckpointError(f"checkpoint describes a mixture we cannot build: {exc}") from None
    model = MixedClassifier(parts["robust"], parts["accurate"], settings)
    unread = [k for k in state if not k.startswith(("robust.", "accurate."))]
    if unread:
        raise CheckpointError(f"checkpoint weights do not fit its mixture ({len(unread)} unexpected, e.g. {unread[0]})")
    recorded = (checkpoint.get("data") or {}).get("input_size") if isinstance(checkpoint.get("data"), dict) else None
    if isinstance(recorded, (list, tuple)) and len(recorded) == 3:
        model.input_shape = tuple(int(v) for v in recorded)
    return model


# ---------------------------------------------------------------- models from outside robust


def weight_mismatch(model: nn.Module, state: dict[str, Any]) -> str | None:
    """How ``state`` fails to fit ``model`` (the first missing, unexpected or mis-shaped weight), None when it fits."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    shapes = [k for k in mine if k in state and isinstance(state[k], torch.Tensor)
              and tuple(mine[k].shape) != tuple(state[k].shape)]
    if missing:
        return f"{len(missing)} weight(s) missing, e.g. {missing[0]}"
    if unexpected:
        return f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}"
    if shapes:
        return f"{shapes[0]} is {tuple(state[shapes[0]].shape)} in the file but {tuple(mine[shapes[0]].shape)} in the model"
    return None
