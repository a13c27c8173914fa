"""`robust export --robustbench NAME -o DIR`: RobustBench's own load_model reads the weights into the
architecture and gives the export's logits; model_info takes its accuracies from the evaluation; bad names
and folders refused with nothing written."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest
import torch
from helpers import assert_refused, invoke_in, tiny_config

import robust
from robust.checkpoint import load_model
from robust.export.robustbench import eps_beside, model_info
from robust.train.trainer import Trainer

NAME = "Tiny2026Sandwich"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rb")
    Trainer(tiny_config(root / "run")).fit()
    result = invoke_in(root, ["eval", "run", "--attack", "pgd2", "--limit", "32", "--json", "run/", "--quiet"])
    assert result.exit_code == 0, result.output
    return root


def robustbench_utils():
    """robustbench.utils; its loaders module imports pkg_resources (setuptools) only to find ImageNet files,
    which this test does not use, so an empty stand-in is enough where setuptools is absent."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        sys.modules.setdefault("pkg_resources", types.ModuleType("pkg_resources"))
    return pytest.importorskip("robustbench.utils")


def test_robustbench_load_model_reads_the_export(run, tmp_path):
    result = invoke_in(run, ["export", "run", "--robustbench", NAME, "-o", "zoo"])
    assert result.exit_code == 0, result.output
    assert "deterministic forward" in result.output and "input gradients non-zero" in result.output
    weights = run / "zoo" / "models" / "fashion-mnist" / "Linf" / f"{NAME}.pt"
    info = json.loads((run / "zoo" / "model_info" / "fashion-mnist" / "Linf" / f"{NAME}.json").read_text())
    evaluation = json.loads((run / "run" / "eval.json").read_text())
    assert info["clean_acc"] == f"{evaluation['routes']['adv']['clean']:.2f}"
    assert info["autoattack_acc"] is None and "No AutoAttack" in info["footnote"]
    assert info["eps"] == "25.5/255" and info["number_forward_passes"] == 1 and info["name"] == NAME

    utils = robustbench_utils()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    exported = load_model(run / "run", route="adv")
    args = {k: v for k, v in exported.build_args.items() if k != "exported_route"}
    zoo = utils.all_models[BenchmarkDataset.cifar_10][ThreatModel.Linf]
    zoo[NAME] = {"model": lambda: robust.build_model(**args), "gdrive_id": "none: the file is already there"}
    try:
        # RobustBench's zoo has no Fashion-MNIST; its loader reads <model_dir>/<dataset>/<threat>/NAME.pt
        target = tmp_path / "models" / "cifar10" / "Linf"
        target.mkdir(parents=True)
        shutil.copy(weights, target / f"{NAME}.pt")
        theirs = utils.load_model(NAME, model_dir=tmp_path / "models", dataset="cifar10", threat_model="Linf")
    finally:
        del zoo[NAME]
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(x), exported(x))  # the same weights, the same fp32 ops


def test_model_info_takes_the_evaluations_autoattack():
    evaluation = {"n": 1000, "eps": 8 / 255, "threat": "linf", "attacks": {"pgd20": {}, "autoattack": {}},
                  "routes": {"adv": {"clean": 81.234, "pgd20": 52.1, "autoattack": 48.456, "worst_case": 48.4}}}
    info = model_info("A2026B", {"arch": "preact_resnet18", "width": 64}, "cifar10", 8 / 255, "linf", evaluation,
                      "adv", "eval.json", "sabn")
    assert (info["clean_acc"], info["autoattack_acc"], info["reported"]) == ("81.23", "48.46", "48.46")
    assert info["eps"] == "8/255" and "adv route of a sabn model" in info["architecture"]
    other_eps = {**evaluation, "eps": 4 / 255}
    with pytest.raises(robust.errors.ConfigError, match="eps"):
        model_info("A2026B", {"arch": "x"}, "cifar10", 8 / 255, "linf", other_eps, "adv", "eval.json")


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", "..", ""])
def test_names_with_path_separators_refused(run, name):
    assert_refused(run, ["export", "run", "--robustbench", name, "-o", "zoo-bad"])
    assert not (run / "zoo-bad").exists()


def test_output_that_is_a_file_refused(run):
    (run / "afile").write_text("keep")
    assert_refused(run, ["export", "run", "--robustbench", NAME, "-o", "afile"], "afile", "folder")
    assert (run / "afile").read_text() == "keep"


def test_the_eps_of_an_entry_is_read_from_its_model_info(run):
    result = invoke_in(run, ["export", "run", "--robustbench", "EpsBeside", "-o", "zoo-eps"])
    assert result.exit_code == 0, result.output
    weights = run / "zoo-eps" / "models" / "fashion-mnist" / "Linf" / "EpsBeside.pt"
    eps, threat, info = eps_beside(weights)
    assert (eps, threat) == (pytest.approx(0.1), "linf")  # written as 25.5/255
    assert info == run / "zoo-eps" / "model_info" / "fashion-mnist" / "Linf" / "EpsBeside.json"
    assert eps_beside(run / "run" / "best.pt") is None  # no zoo layout around it
    info.write_text("{not json")
    assert eps_beside(weights) is None
