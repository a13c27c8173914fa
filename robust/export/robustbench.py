"""RobustBench's format: a model zoo entry's weights file and its ``model_info`` JSON.

RobustBench's ``load_model(NAME, model_dir, dataset, threat_model)`` builds the zoo entry's model,
reads ``model_dir/<dataset>/<threat>/NAME.pt`` with ``torch.load``, takes its ``state_dict`` (after
removing ``module.`` and ``model.`` from the keys) and loads it strictly. The model maps images in
[0, 1] to logits, its normalization inside, and its forward must be deterministic with non-zero input
gradients (RobustBench's rules for an entry). The leaderboard reads
``model_info/<dataset>/<threat>/NAME.json``. :func:`write_robustbench` writes both under one folder
after checking those rules on the exported model, and reads the weights file back the way
RobustBench does.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robust.checkpoint import load_model, state_dict_bytes
from robust.errors import ConfigError
from robust.eval.sanity import SanityCheck, determinism_checks
from robust.outputs import write_json, write_output

THREAT_FOLDERS = {"linf": "Linf", "l2": "L2"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_MANGLED = ("module.", "model.")  # RobustBench cuts len(substr) characters off every key holding one of these


def check_name(name: str) -> str:
    """A zoo name: letters, digits, '_', '-', '.', no path separator and no leading dot (it names files)."""
    if "/" in name or "\\" in name or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"--robustbench {name!r} is no model name (letters, digits, _ - . only, no path separator); "
                          "RobustBench's convention is <Author><Year><FirstWordOfTitle>, e.g. Smith2026Sandwich")
    return name


def entry_paths(folder: Path, name: str, dataset: str, threat: str) -> tuple[Path, Path]:
    """(weights file, model_info file) of a zoo entry under ``folder``."""
    threat_dir = THREAT_FOLDERS[threat]
    return (folder / "models" / dataset / threat_dir / f"{name}.pt",
            folder / "model_info" / dataset / threat_dir / f"{name}.json")


def robustbench_rules(model: nn.Module, input_size: tuple[int, int, int]) -> list[SanityCheck]:
    """Deterministic eval forward and non-zero input gradients, on 16 uniform inputs in [0, 1]."""
    x = torch.rand(16, *input_size, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % int(model.build_args.get("num_classes", 10))
    return determinism_checks(model, (x, y), device="cpu", examples=16)


def reloads_as_robustbench(data: bytes, args: dict[str, Any], reference: nn.Module, input_size) -> float:
    """Read the file's bytes as RobustBench does (``torch.load``, its ``state_dict``) and load them strictly
    into a fresh model of ``args``; the largest logit difference to ``reference`` on a random batch."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["state_dict"]
    fresh = load_model({"model_args": args, "model": state})
    x = torch.rand(4, *input_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (fresh(x) - reference.eval()(x)).abs().max().item()


def model_info(name: str, args: dict[str, Any], dataset: str, eps: float, threat: str,
               evaluation: dict[str, Any] | None, route: str, eval_source: str | None,
               trained_norm: str = "bn", additional_data: bool = False) -> dict[str, Any]:
    """The leaderboard's fields; the accuracies from ``evaluation`` (a `robust eval --json` file) when it
    scored the exported route at the same eps, AutoAttack's only when it ran. ``additional_data``: the run
    trained on images beyond the dataset's training set (``--extra-data``, e.g. pseudo-labelled ones)."""
    width = f", width {args['width']}" if args.get("width") else ""
    info: dict[str, Any] = {"link": "", "name": name, "authors": "", "additional_data": bool(additional_data),
                            "number_forward_passes": 1, "dataset": dataset, "venue": "",
                            "architecture": f"{args['arch']}{width}, BatchNorm" +
                                            ("" if trained_norm == "bn" else f" (the {route} route of a {trained_norm} model)"),
                            "eps": f"{eps * 255:.4g}/255" if threat == "linf" else f"{eps:.4g}",
                            "clean_acc": None, "reported": None, "autoattack_acc": None, "footnote": ""}
    accuracies = (evaluation or {}).get("routes", {}).get(route)
    if accuracies is None:
        info["footnote"] = ("No evaluation found: run `robust eval RUN --attack autoattack --json RUN/` and export again."
                            if evaluation is None else f"The evaluation {eval_source} has no {route} route.")
        return info
    if abs(float(evaluation.get("eps", -1)) - eps) > 1e-9 or evaluation.get("threat", "linf") != threat:
        raise ConfigError(f"the evaluation {eval_source} is at {evaluation.get('threat')} eps {evaluation.get('eps')}, "
                          f"not the export's {threat} eps {eps:.6g}; evaluate at the training eps or drop it")
    info["clean_acc"] = f"{accuracies['clean']:.2f}"
    if "autoattack" in accuracies:
        info["autoattack_acc"] = info["reported"] = f"{accuracies['autoattack']:.2f}"
        info["footnote"] = f"AutoAttack (standard) by robust eval on {evaluation.get('n')} test images."
    else:
        info["footnote"] = (f"No AutoAttack in {eval_source}; its attacks: {', '.join(evaluation.get('attacks') or [])}. "
                            "Run `robust eval RUN --attack autoattack --json RUN/` and export again.")
    return info


def used_additional_data(run: dict[str, Any]) -> bool:
    """True when the run behind a checkpoint trained on images beyond its dataset's training set (--extra-data)."""
    config = run.get("config") if isinstance(run.get("config"), dict) else {}
    return bool(config.get("extra_data"))


@dataclass(frozen=True)
class ZooEntry:
    """A zoo entry's place: its name and the leaderboard it goes on (dataset, threat model, eps)."""

    name: str
    dataset: str
    threat: str
    eps: float


@dataclass(frozen=True)
class Scores:
    """The evaluation whose accuracies go into model_info (a `robust eval --json` file's dict, or None) and the
    file it came from (named in model_info's footnote)."""

    evaluation: dict[str, Any] | None = None
    source: str | None = None


def write_robustbench(folder: Path, entry: ZooEntry, exported: nn.Module, route: str, input_size,
                      scores: Scores = Scores(), run: dict[str, Any] | None = None,
                      overwrite: bool = False) -> dict[str, Any]:
    """Check RobustBench's rules on ``exported`` (the ``route`` of a run), write its weights and model_info under
    ``folder``, read the weights back as RobustBench does. ``run``: the training checkpoint, whose norm and
    data model_info states. Returns the paths, the checks and the model_info."""
    name, dataset, threat, eps = check_name(entry.name), entry.dataset, entry.threat, entry.eps
    if threat not in THREAT_FOLDERS:
        raise ConfigError(f"RobustBench has no {threat} leaderboard; it has {', '.join(THREAT_FOLDERS)}")
    state = {k: v.detach().cpu().contiguous() for k, v in exported.state_dict().items()}
    mangled = [k for k in state if any(s in k for s in _MANGLED)]
    if mangled:
        raise ConfigError(f"the weight {mangled[0]!r} holds 'model.' or 'module.', which RobustBench's loader cuts "
                          "out of every key; this architecture cannot be a zoo entry as is")
    args = {k: v for k, v in exported.build_args.items() if k != "exported_route"}
    checks = robustbench_rules(exported, tuple(input_size))
    failed = [c for c in checks if not c.passed]
    if failed:
        raise ConfigError(f"the model breaks RobustBench's rules ({failed[0].name}: {failed[0].detail}); not written")
    run = run or {}
    info = model_info(name, args, dataset, eps, threat, scores.evaluation, route, scores.source,
                      (run.get("model_args") or {}).get("norm", "bn"), used_additional_data(run))
    weights, info_file = entry_paths(folder, name, dataset, threat)
    for path in (weights, info_file):
        if path.exists() and not overwrite:
            raise ConfigError(f"{path} exists; pass --force to replace it, or choose another name")
    data = state_dict_bytes({"state_dict": state})
    gap = reloads_as_robustbench(data, args, exported, tuple(input_size))
    if gap > 1e-4:
        raise ConfigError(f"the weights read back as RobustBench reads them differ from the model by {gap:.3g} in the logits; not written")
    write_output(weights, data, overwrite=overwrite)
    write_json(info_file, info, overwrite=overwrite)
    return {"weights": weights, "model_info": info_file, "checks": checks, "info": info, "args": args, "gap": gap}


def eps_beside(weights: Path) -> tuple[float, str, Path] | None:
    """(eps, threat, model_info file) of a zoo entry's weights file ``models/<dataset>/<Linf|L2>/NAME.pt``, read
    from its ``model_info/<dataset>/<Linf|L2>/NAME.json`` beside it; None where there is none or it is unreadable."""
    weights = Path(weights)
    threats = {folder: threat for threat, folder in THREAT_FOLDERS.items()}
    if len(weights.parts) < 4 or weights.parent.name not in threats or weights.parents[2].name != "models":
        return None
    info_file = weights.parents[3] / "model_info" / weights.parent.parent.name / weights.parent.name / f"{weights.stem}.json"
    try:
        text = str(json.loads(info_file.read_text())["eps"])
        top, _, bottom = text.partition("/")
        eps = float(top) / float(bottom or 1)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return (eps, threats[weights.parent.name], info_file) if math.isfinite(eps) and eps >= 0 else None
