"""Common corruptions: the 15 functions, their cache, the official files' layout, the evaluation and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import robust
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.data import corruptions as C
from robust.errors import ConfigError, DataError
from robust.eval.corruptions import GENERATED, evaluate_corruptions, mean_accuracy

from helpers import assert_refused, invoke_in

# Parameters of the original that do not raise the mean change at every step (see docs/evaluation.md):
# glass blur's larger sigma smooths its own shuffle (severities 1-3 share one shuffle pass), frost's image
# weight falls as its frost weight rises and the two partly cancel, and elastic's severity 1 has the largest
# affine jitter (0.08 of the image) of all five, its later severities trading it for local displacement;
# snow's severity 3 zooms its flakes 1.75x (fewer, larger) where severity 2 has more small ones.
NOT_MONOTONE = {"glass_blur", "frost", "elastic_transform", "snow"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def gray28(fmnist):
    return fmnist.test_x[:36].float() / 255


@pytest.fixture(scope="module")
def rgb32(gray28):
    """Fashion-MNIST at 32 px in three channels, tinted per image: a colour image of CIFAR's size."""
    g = torch.Generator().manual_seed(0)
    up = torch.nn.functional.interpolate(gray28, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return (up * (0.4 + 0.6 * torch.rand(len(up), 3, 1, 1, generator=g))).clamp(0, 1)


@pytest.mark.parametrize("name", C.CORRUPTIONS)
@pytest.mark.parametrize("images", ["gray28", "rgb32"])
def test_shape_dtype_range_kept_and_severity_grows(name, images, request):
    x = request.getfixturevalue(images)
    changes = []
    for severity in C.SEVERITIES:
        out = C.corrupt(x, name, severity, seed=3)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        changes.append((out - x).abs().mean().item())
    assert min(changes) > 0, changes  # every severity changes the images, 1 px-thin blurs at 28 px too
    if name == "elastic_transform":
        assert changes[0] > changes[-1]  # the original's parameters: the largest affine jitter is severity 1
    elif name in NOT_MONOTONE:
        assert changes[-1] > changes[0], changes
    else:
        assert all(a < b for a, b in zip(changes, changes[1:])), changes


def test_float64_and_half_batches_keep_their_dtype(gray28):
    for dtype in (torch.float64, torch.float16):
        out = C.corrupt(gray28[:4].to(dtype), "fog", 3)
        assert out.dtype == dtype and out.shape == (4, 1, 28, 28)


@pytest.mark.parametrize("name", ["gaussian_noise", "glass_blur", "snow", "frost", "elastic_transform"])
def test_deterministic_for_a_seed_and_independent_of_the_batch_split(gray28, name):
    x = gray28[:10]
    whole = C.corrupt(x, name, 4, seed=7)
    assert torch.equal(whole, C.corrupt(x, name, 4, seed=7))
    split = torch.cat([C.corrupt(x[:3], name, 4, seed=7, start=0), C.corrupt(x[3:], name, 4, seed=7, start=3)])
    assert torch.equal(whole, split)
    assert not torch.equal(whole, C.corrupt(x, name, 4, seed=8))


def test_deterministic_corruptions_need_no_seed(gray28):
    for name in ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression"):
        assert torch.equal(C.corrupt(gray28[:4], name, 2, seed=0), C.corrupt(gray28[:4], name, 2, seed=1))


def test_brightness_and_contrast_follow_their_definitions(rgb32):
    x = rgb32[:4]
    out = C.corrupt(x, "contrast", 5)  # (x - channel mean) * 0.15 + channel mean, nothing clipped here
    mean = x.mean((2, 3), keepdim=True)
    torch.testing.assert_close(out, (x - mean) * 0.15 + mean, atol=1e-6, rtol=0)
    value = C.corrupt(x, "brightness", 1).amax(1)  # HSV value + 0.05, clipped
    torch.testing.assert_close(value, (x.amax(1) + 0.05).clamp(max=1), atol=1e-5, rtol=0)


def test_names_and_severities_are_checked():
    assert C.check_corruption_names("all") == list(C.CORRUPTIONS)
    assert C.check_corruption_names("fog,Gaussian-Noise") == ["gaussian_noise", "fog"]  # the standard order
    with pytest.raises(ConfigError, match="did you mean gaussian_noise"):
        C.check_corruption_names("gausian_noise")
    with pytest.raises(ConfigError, match="empty"):
        C.check_corruption_names("fog,,snow")
    assert C.check_severities("5,1,1") == [1, 5]
    for bad in ("0", "6", "1,x", "1,,2", "-1"):
        with pytest.raises(ConfigError):
            C.check_severities(bad)


def test_generated_copies_are_cached_and_keyed_by_the_images(gray28):
    x = (gray28[:6] * 255).round().to(torch.uint8)
    first, cached = C.generated(x, "shot_noise", 2, seed=1)
    assert not cached and first.dtype == torch.uint8 and first.shape == x.shape
    again, cached = C.generated(x, "shot_noise", 2, seed=1)
    assert cached and torch.equal(first, again)
    assert len(list(C.cache_root().glob("*.pt"))) == 1
    other = x.clone()
    other[0, 0, 0, 0] ^= 1
    assert not C.generated(other, "shot_noise", 2, seed=1)[1]  # other images: another entry
    assert not C.generated(x, "shot_noise", 2, seed=2)[1]
    assert len(list(C.cache_root().glob("*.pt"))) == 3
    assert not list(C.cache_root().glob(".*.tmp"))  # written atomically, no leftovers


def write_cifar_c(folder, names=("fog", "snow"), block=4, classes=10, label=None):
    """A CIFAR-10-C layout in miniature: each name's .npy holds five blocks of ``block`` 32 x 32 x 3 uint8
    images whose pixels all equal 50 * severity (so a block's origin is visible), and labels.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.concatenate([np.full((block, 32, 32, 3), 50 * s, np.uint8) for s in range(1, 6)])
    for name in names:
        np.save(folder / f"{name}.npy", images)
    labels = np.tile(np.arange(block) % classes if label is None else np.full(block, label), 5).astype(np.uint8)
    np.save(folder / "labels.npy", labels)
    return labels


def test_official_cifar_files_are_read_by_severity_block(tmp_path):
    labels = write_cifar_c(tmp_path / "c10c", block=4)
    assert C.official_layout(tmp_path / "c10c", ["fog"]) == "cifar"
    for severity in C.SEVERITIES:
        x, y = C.read_cifar_c(tmp_path / "c10c", "fog", severity)
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.uint8
        assert (x == 50 * severity).all()
        assert y.tolist() == labels[(severity - 1) * 4:severity * 4].tolist()
    x, y = C.read_cifar_c(tmp_path / "c10c", "snow", 3, limit=2)
    assert len(x) == 2 and (x == 150).all() and y.tolist() == [0, 1]
    with pytest.raises(DataError, match="neither contrast.npy"):
        C.official_layout(tmp_path / "c10c", ["contrast"])
    (tmp_path / "c10c" / "labels.npy").unlink()
    with pytest.raises(DataError, match="labels.npy"):
        C.official_layout(tmp_path / "c10c", ["fog"])


def test_official_imagenet_folders_are_resized_and_cropped(tmp_path):
    from PIL import Image

    for cls, value in (("n01", 40), ("n02", 200)):
        folder = tmp_path / "inc" / "fog" / "2" / cls
        folder.mkdir(parents=True)
        for k in range(3):
            Image.fromarray(np.full((40, 60, 3), value, np.uint8)).save(folder / f"{k}.png")
    assert C.official_layout(tmp_path / "inc", ["fog"]) == "imagenet"
    x, y = C.read_imagenet_c(tmp_path / "inc", "fog", 2, size=16, limit=4)
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]  # spread over both classes
    assert x[y == 0].eq(40).all() and x[y == 1].eq(200).all()


class Constant(torch.nn.Module):
    """Predicts class 1 for images brighter than 0.5 on average, else 0; one route."""

    build_args = {"num_classes": 10, "in_channels": 3}

    def forward(self, x):
        bright = (x.mean((1, 2, 3)) > 0.5).long()
        return torch.nn.functional.one_hot(bright, 10).float()


def test_the_mean_is_over_exactly_what_was_asked(tmp_path):
    write_cifar_c(tmp_path / "c10c", block=4, label=1)  # every label 1; pixels 50 * severity
    x, y = torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.ones(4, dtype=torch.long)
    # severities 1, 2 (pixels 50, 100: dark, predicted 0) score 0%; 3, 4, 5 (150 and up: bright, 1) 100%
    result = evaluate_corruptions(Constant(), x, y, "fog", [1, 2, 4], source_dir=str(tmp_path / "c10c"))
    assert result["corruptions"] == {"fog": {"1": {"adv": 0.0}, "2": {"adv": 0.0}, "4": {"adv": 100.0}}}
    assert result["corruption_mean"] == {"adv": pytest.approx(100 / 3)}
    every = evaluate_corruptions(Constant(), x, y, "fog,snow", "1,2,3,4,5",
                                 source_dir=str(tmp_path / "c10c"))
    assert every["corruption_mean"] == {"adv": pytest.approx(60.0)}  # 6 of 10 cells at 100%
    table = {"fog": {"1": {"a": 10.0}, "3": {"a": 40.0}}, "snow": {"1": {"a": 100.0}}}
    assert mean_accuracy(table, "a") == pytest.approx(50.0)  # cells, not rows: (10 + 40 + 100) / 3
    assert result["corruption_source"].startswith("official files")
    assert result["corruption_n"] == 4 and result["corruption_severities"] == [1, 2, 4]


def test_generated_evaluation_says_so_and_reuses_the_cache(fmnist):
    model = robust.build_model(norm="sabn", num_classes=10, in_channels=1, width=4).eval()
    x, y = fmnist.test_x[:16], fmnist.test_y[:16]
    first = evaluate_corruptions(model, x, y, "contrast,fog", "1,5", per_example=True)
    assert first["corruption_source"] == GENERATED and first["corruption_cached"] == 0
    assert set(first["corruption_mean"]) == {"clean", "adv"}
    for route in ("clean", "adv"):
        cells = [first["corruptions"][n][s][route] for n in ("contrast", "fog") for s in ("1", "5")]
        assert first["corruption_mean"][route] == pytest.approx(sum(cells) / 4)
        predictions = first["corruption_per_example"][route]["fog"]["5"]
        assert 100.0 * sum(p == t for p, t in zip(predictions, y.tolist())) / 16 == first["corruptions"]["fog"]["5"][route]
    second = evaluate_corruptions(model, x, y, "contrast,fog", "1,5")
    assert second["corruption_cached"] == 4 and second["corruptions"] == first["corruptions"]


@pytest.fixture(scope="module")
def checkpoint(fmnist, tmp_path_factory):
    torch.manual_seed(0)
    model = robust.build_model(norm="sabn", num_classes=10, in_channels=1, width=4, mean=fmnist.mean, std=fmnist.std)
    path = tmp_path_factory.mktemp("corr") / "tiny.pt"
    save_checkpoint(build_checkpoint(model.eval(), dataset="fashion-mnist", eps=0.1, method="fast"), path)
    return path


def test_cli_corruptions_alone_write_the_table_json_and_examples(checkpoint, tmp_path):
    result = invoke_in(tmp_path, ["eval", checkpoint, "--corruptions", "brightness,pixelate", "--severities", "2,5",
                                  "--limit", "20", "--json", "e.json", "--per-example", "ex.jsonl", "--quiet"])
    assert result.exit_code == 0, result.output
    assert GENERATED in result.output and "pixelate" in result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert list(report["attacks"]) == []  # no attack unless asked: the clean pass and the corruptions
    assert set(report["corruptions"]) == {"brightness", "pixelate"}
    assert set(report["corruptions"]["pixelate"]) == {"2", "5"}
    assert set(report["corruption_mean"]) == {"clean", "adv"}
    lines = [json.loads(l) for l in (tmp_path / "ex.jsonl").read_text().splitlines()]
    assert sum("corruption" in l for l in lines) == 2 * 2 * 2 * 20  # routes x corruptions x severities x images


def test_cli_corruptions_compose_with_an_attack(checkpoint, tmp_path):
    result = invoke_in(tmp_path, ["eval", checkpoint, "--attack", "fgsm", "--corruptions", "contrast",
                                  "--severities", "1", "--limit", "8", "--json", "e.json", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "e.json").read_text())
    assert "fgsm" in report["routes"]["adv"] and report["corruptions"]["contrast"]["1"]["adv"] >= 0


@pytest.mark.parametrize("args, expected", [
    (["--corruptions", "gausian_noise"], "did you mean gaussian_noise"),
    (["--corruptions", "fog", "--severities", "0,6"], "1..5"),
    (["--corruptions", "fog", "--severities", "1,,2"], "empty severity"),
    (["--corruptions", "fog,,snow"], "empty corruption"),
    (["--severities", "2"], "need --corruptions"),
    (["--corruptions", "fog", "--corruptions-dir", "nowhere"], "not a folder"),
])
def test_cli_refuses_bad_corruption_flags(checkpoint, tmp_path, args, expected):
    assert_refused(tmp_path, ["eval", checkpoint, "--json", "e.json", *args], expected)


def test_report_section_draws_the_heat_map_per_route_and_the_mean():
    from robust.report import corruptions_section

    assert corruptions_section("run0", {"routes": {}}) == ""
    evaluation = {"corruptions": {"fog": {"1": {"clean": 90.0, "adv": 70.0}, "5": {"clean": 40.0, "adv": 50.0}},
                                  "snow": {"1": {"clean": 80.0, "adv": 60.0}, "5": {"clean": 20.0, "adv": 30.0}}},
                  "corruption_mean": {"clean": 57.5, "adv": 52.5}, "corruption_severities": [1, 5],
                  "corruption_source": GENERATED, "corruption_n": 100}
    html = corruptions_section("run0", evaluation)
    assert 'id="run0-corruptions"' in html and "data:image/png;base64," in html
    assert "clean 57.50, adv 52.50" in html and GENERATED in html
    assert html.count("<tr>") == 1 + 4  # header and one row per corruption and severity


def test_official_files_of_another_shape_are_refused(tmp_path):
    write_cifar_c(tmp_path / "c10c", block=4)  # 3 x 32 x 32
    x, y = torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)
    model = robust.build_model(norm="bn", num_classes=10, in_channels=1, width=4).eval()
    with pytest.raises(DataError, match="are 3x32x32 .* test images are 1x28x28"):
        evaluate_corruptions(model, x, y, "fog", [1], source_dir=str(tmp_path / "c10c"))
