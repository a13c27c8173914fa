"""Norms, architectures, datasets and objectives in the one registry shape: each registry's names are the public
tuples, each spec's facts are what the code uses, --help shows every summary, an unknown name is refused with the
valid ones and the nearest, and a new entry is one registration read by the ordinary paths."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import assert_refused

import robust
from robust.cli.main import cli
from robust.config import TrainConfig
from robust.data import CUSTOM_DATASETS, DATASET_INFO, DATASET_SPECS, DATASETS, ImageData, load_dataset
from robust.data.types import dataset_class_names
from robust.errors import ConfigError, DataError, ModelError
from robust.nn import ARCH_SPECS, NORM_SPECS, NORMS, available_archs, build_model, make_norm_layer
from robust.nn.norms import SandwichBatchNorm2d, check_norm
from robust.nn.resnet import PreActResNet, arch_spec
from robust.objectives import ALIASES, METHODS, OBJECTIVE_SPECS, OBJECTIVES, get_objective, methods_help


def squashed(text: str) -> str:
    """``text`` without any whitespace, so a summary click wrapped over lines (or at a hyphen) still matches."""
    return "".join(text.split())


def help_of(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    return squashed(result.output)


# ------------------------------------------------------------------ names are the public tuples


def test_each_registry_names_are_the_public_names():
    assert NORM_SPECS.names() == NORMS == robust.NORMS == ("bn", "auxbn", "sabn")
    assert list(ARCH_SPECS.names()) == available_archs() == robust.available_archs() == sorted(available_archs())
    assert DATASET_SPECS.names() == DATASETS == (*DATASET_INFO, *CUSTOM_DATASETS)
    assert CUSTOM_DATASETS == ("imagefolder", "tensors")
    assert tuple(DATASET_INFO) == ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")
    assert OBJECTIVE_SPECS.names() == tuple(OBJECTIVES) == tuple(robust.OBJECTIVES)
    assert OBJECTIVE_SPECS.all_names() == METHODS
    assert dict(ALIASES) == {alias: spec.name for spec in OBJECTIVE_SPECS for alias in spec.aliases} == {"hybrid": "pgd"}


# ------------------------------------------------------------------ the specs' facts are the ones used


def test_a_norm_spec_builds_the_layer_make_norm_layer_gives():
    for spec in NORM_SPECS:
        assert make_norm_layer(spec.name) is spec.build and spec.summary
    assert NORM_SPECS.get("sabn").build is SandwichBatchNorm2d
    assert isinstance(build_model("preact_resnet18", "sabn", width=2, in_channels=1).blocks[0].bn1, SandwichBatchNorm2d)


def test_an_arch_spec_gives_the_constructor_and_the_default_width():
    for spec in ARCH_SPECS:
        with torch.device("meta"):
            model = build_model(spec.name, "bn", in_channels=1)
        assert model.build_args["width"] == spec.width and model.fc.in_features in (spec.width * 4, spec.width * 8)
    assert [ARCH_SPECS.get(n).width for n in ("preact_resnet18", "wide_resnet34_10", "wide_resnet70_16")] == [64, 160, 256]
    family = arch_spec("wide_resnet22_2")  # any WRN-D-K: made from the name, not registered
    assert family.width == 32 and family.summary == "WRN-22-2" and "wide_resnet22_2" not in ARCH_SPECS
    assert arch_spec("wide_resnet34_10") is ARCH_SPECS.get("wide_resnet34_10") and arch_spec("resnet9000") is None


def test_a_dataset_spec_holds_the_facts_data_and_messages_read():
    fmnist = DATASET_SPECS.get("fashion-mnist")
    assert DATASET_INFO["fashion-mnist"] == fmnist.info and fmnist.info[0] == 10 == fmnist.num_classes
    assert (fmnist.channels, fmnist.mean, fmnist.std, fmnist.flip) == (1, (0.2860,), (0.3530,), True)
    data = ImageData("cifar10", *(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)) * 2)
    assert data.info == DATASET_SPECS.get("cifar10").info and data.info.classes[0] == "airplane"
    assert dataset_class_names("fashion-mnist")[-1] == "Ankle boot" and dataset_class_names("cifar100") is None
    assert dataset_class_names("imagefolder") is None and dataset_class_names("nowhere") is None
    assert all(spec.custom == (spec.name in CUSTOM_DATASETS) for spec in DATASET_SPECS)
    assert all(spec.expected_files and spec.summary for spec in DATASET_SPECS)


def test_a_missing_builtin_set_names_its_expected_files(tmp_path):
    for name in ("svhn", "cifar100"):  # no system folder holds them here
        with pytest.raises(DataError) as excinfo:
            load_dataset(name, tmp_path, download=False)
        assert str(excinfo.value).endswith(f"holding {DATASET_SPECS.get(name).expected_files}")
    assert DATASET_SPECS.get("fashion-mnist").hint and not DATASET_SPECS.get("svhn").hint


def test_a_custom_kind_without_data_dir_is_refused_with_its_spec_expected_files():
    for name in CUSTOM_DATASETS:
        with pytest.raises(ConfigError, match=f"--dataset {name} needs --data-dir "):
            TrainConfig(dataset=name).validate()
        with pytest.raises(ConfigError) as excinfo:
            TrainConfig(dataset=name).validate()
        assert str(excinfo.value).endswith(DATASET_SPECS.get(name).expected_files)


def test_an_objective_spec_is_its_class_and_the_class_facts():
    for spec in OBJECTIVE_SPECS:
        cls = OBJECTIVES[spec.name]
        assert spec.build is cls and spec.summary == cls.summary and spec.aliases == tuple(cls.aliases)
    assert get_objective("hybrid") is OBJECTIVE_SPECS.get("hybrid").build is OBJECTIVES["pgd"]


# ------------------------------------------------------------------ --help reads the summaries


def test_help_shows_every_summary():
    train = help_of("train")
    for spec in (*NORM_SPECS, *ARCH_SPECS, *DATASET_SPECS):
        assert squashed(f"{spec.name} ({spec.summary})") in train, spec.name
    assert squashed(methods_help()) in train
    compare, bench = help_of("compare"), help_of("bench")
    for spec in NORM_SPECS:
        assert squashed(f"{spec.name} ({spec.summary})") in compare and squashed(spec.summary) in bench
    assert all(squashed(spec.summary) in bench for spec in ARCH_SPECS)


# ------------------------------------------------------------------ unknown names: one line, the valid ones, the nearest


def test_unknown_names_are_refused_with_the_valid_ones_and_the_nearest():
    with pytest.raises(ConfigError, match=r"^unknown norm 'saban'; valid: bn, auxbn, sabn; did you mean sabn\?$"):
        check_norm("saban")
    with pytest.raises(ModelError, match=r"^unknown arch 'preact_resnet81'; valid: preact_resnet18, .*timm:NAME; "
                                         r"did you mean preact_resnet18\?$"):
        build_model("preact_resnet81")
    with pytest.raises(DataError, match=r"^unknown dataset 'cifar11'; valid: cifar10, .*tensors; did you mean cifar10\?$"):
        load_dataset("cifar11")
    with pytest.raises(ConfigError, match=r"^unknown method 'tradez'; valid: hybrid, pgd, .*; did you mean trades\?$"):
        get_objective("tradez")


def test_the_cli_refuses_an_unknown_arch_in_one_line_with_the_nearest(tmp_path):
    assert_refused(tmp_path, ["train", "--arch", "preact-resnet18", "--out", "run"], "unknown arch 'preact-resnet18'",
                   "did you mean preact_resnet18?")


# ------------------------------------------------------------------ a new entry is one registration


@pytest.fixture()
def tiny_arch():
    @ARCH_SPECS.register("tiny_preact", width=3, summary="one block per stage (a test-only architecture)")
    def tiny_preact(width, norm_layer, **kwargs):
        return PreActResNet([1, 1], [width, 2 * width], width, norm_layer, **kwargs)

    yield ARCH_SPECS.get("tiny_preact")
    ARCH_SPECS.remove("tiny_preact")


def test_a_registered_arch_builds_by_name_and_passes_the_config_checks(tiny_arch):
    model = build_model("tiny_preact", "auxbn", num_classes=3, in_channels=1)
    assert model.build_args["width"] == 3 and model.fc.in_features == 6
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    TrainConfig(arch="tiny_preact", dataset="fashion-mnist").validate()
    assert "tiny_preact" in available_archs()


@pytest.fixture()
def toy_set():
    @DATASET_SPECS.register("toy", summary="a test-only set", num_classes=3, channels=1, mean=(0.5,), std=(0.25,),
                            class_names=("a", "b", "c"), expected_files="toy.pt", hint=" (make one)")
    def read_toy(name, folder):
        path = folder / "toy.pt"
        return ImageData(name, *torch.load(path, weights_only=True)) if path.is_file() else None

    yield DATASET_SPECS.get("toy")
    DATASET_SPECS.remove("toy")


def test_a_registered_dataset_loads_by_name_with_its_spec_facts(tmp_path, toy_set):
    x, y = torch.randint(0, 256, (6, 1, 5, 5), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(DataError, match=r"^toy not found; looked in: .*; download disabled\. "
                                        r"Pass --data-dir FOLDER holding toy\.pt \(make one\)$"):
        load_dataset("toy", tmp_path, download=False)
    torch.save((x[:4], y[:4], x[4:], y[4:]), tmp_path / "toy.pt")
    data = load_dataset("toy", tmp_path, download=False)
    assert torch.equal(data.test_x, x[4:]) and data.num_classes == 3 and data.mean == (0.5,)
    assert data.info.classes == ("a", "b", "c") and DATASET_INFO["toy"] == toy_set.info and "toy" not in CUSTOM_DATASETS
