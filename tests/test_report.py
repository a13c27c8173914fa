"""`robust report`: the page of a tiny run holds every section, every figure embedded, nothing external;
eval's per-class figures add up to its table; bad input refused in one line."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import pytest
import torch
from helpers import assert_refused, invoke_in, tiny_config

from robust.checkpoint import load_model, read_checkpoint
from robust.eval.evaluation import load_test_split, per_class_accuracy
from robust.eval.sanity import determinism_checks
from robust.curves import run_folders
from robust.report import (ReportRun, class_names, comparison, comparison_html, eval_command, figure_label, headline,
                               learning_curves_figure, read_runs, report_html, run_styles, timing_table)
from robust.stats import UNINFORMATIVE, uninformative
from robust.runtime import describe_machine
from robust.train.trainer import Trainer

PNG = b"\x89PNG\r\n\x1a\n"


class PageParser(HTMLParser):
    """The page's <img> sources, section ids, and every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.images, self.sections, self.urls = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "section":
            self.sections.append(attrs.get("id"))
        for name in ("src", "href", "action", "data"):
            if name in attrs:
                self.urls.append(attrs[name])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of a tiny run; the first with an eval.json (two attacks, a sweep, the cheap sanity checks)."""
    root = tmp_path_factory.mktemp("report")
    for seed in (0, 1):
        Trainer(tiny_config(root / f"s{seed}", epochs=2, seed=seed)).fit()
    result = invoke_in(root, ["eval", "s0", "--attack", "pgd2,fgsm", "--limit", "48", "--eps-sweep", "0,0.1",
                              "--json", "s0/", "--per-example", "s0/", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((root / "s0" / "eval.json").read_text())
    state = read_checkpoint(root / "s0")
    checks = determinism_checks(load_model(root / "s0"), load_test_split(state, None, 16))
    report["checks"] = [c._asdict() for c in checks]
    (root / "s0" / "eval.json").write_text(json.dumps(report))
    return root


def test_per_class_adds_up_to_the_table(runs):
    report = json.loads((runs / "s0" / "eval.json").read_text())
    for route, rows in report["per_class"].items():
        assert sum(r["n"] for r in rows) == report["n"] == 48
        for key in ("clean", "worst_case"):
            total = sum(r["n"] * r[key] for r in rows if r["n"]) / report["n"]
            assert total == pytest.approx(report["routes"][route][key], abs=1e-9)


def test_broken_by_counts_add_up_to_the_table(runs):
    report = json.loads((runs / "s0" / "eval.json").read_text())
    counts = read_runs([runs / "s0"])[0].broken_by
    for route, acc in report["routes"].items():
        assert sum(counts[route].values()) == report["n"]
        assert counts[route].get("survived", 0) == round(acc["worst_case"] * report["n"] / 100)
        assert counts[route].get("clean", 0) == round((100 - acc["clean"]) * report["n"] / 100)


def test_page_has_every_section_and_embedded_figures(runs):
    result = invoke_in(runs, ["report", "s0", "s1", "-o", "page.html", "--images", "4"])
    assert result.exit_code == 0, result.output
    page = (runs / "page.html").read_text()
    parser = PageParser()
    parser.feed(page)
    for section in ("curves", "run0-config", "run0-final", "run0-sweep", "run0-classes", "run0-sanity",
                    "run0-images", "run0-timing", "run0-broken-by", "run1-images", "run1-timing", "comparison"):
        assert section in parser.sections, section
    # learning curves, sweep, per class, two image grids
    assert len(parser.images) == 5
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert all(u.startswith("data:") for u in parser.urls)
    assert not re.search(r"(https?:)?//[a-z]", re.sub(r'src="data:[^"]*"', "", page))  # no URL anywhere
    assert "FAILED" not in page and "deterministic forward" in page
    assert "fgsm" in page and "pgd2" in page


def test_comparison_of_seeds_is_mean_sd_and_t_interval(runs):
    read = read_runs([runs / "s0", runs / "s1"])
    result = comparison(read)  # s0 has an evaluation, s1 not: both compare by their validation figures
    assert result["common"] == ["adv val clean", "adv val robust", "clean val clean", "clean val robust"]
    assert result["settings"] == ["all runs"] and result["paired"] == []
    metric = "adv val robust"
    values = [r.metrics[-1]["val_adv_robust"] for r in read]
    row = next(s for s in result["spread"] if s["metric"] == metric)
    mean = sum(values) / 2
    sd = abs(values[0] - values[1]) / 2 ** 0.5
    assert row["mean"] == pytest.approx(mean) and row["sd"] == pytest.approx(sd)
    assert row["half_width"] == pytest.approx(12.706 * sd / 2 ** 0.5)


def test_no_metrics_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path, ["report", "empty", "-o", "r.html"], "metrics.jsonl")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert_refused(tmp_path, ["report", "empty", "-o", "r.html"], "no finished epoch")
    assert_refused(tmp_path, ["report", "missing", "-o", "r.html"], "not a folder")


def test_bad_eval_json_refused(runs, tmp_path):
    broken = tmp_path / "run"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text((runs / "s1" / "metrics.jsonl").read_text())
    (broken / "eval.json").write_text("{not json")
    assert_refused(tmp_path, ["report", "run", "-o", "r.html", "--images", "0"], "eval.json", "--json")


def test_the_timing_table_names_the_machine_and_precision_the_run_trained_with(runs):
    (run,) = read_runs([str(runs / "s1")])
    table = timing_table(run)
    assert "trained on" in table and describe_machine("cpu") in table.replace("&#x27;", "'")
    assert "precision (as trained)" in table and "fp32" in table


def test_a_compare_runs_cached_evaluation_is_read_as_its_table(runs, tmp_path):
    folder = tmp_path / "seed0"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text((runs / "s0" / "metrics.jsonl").read_text())
    table = json.loads((runs / "s0" / "eval.json").read_text())
    (folder / "eval.json").write_text(json.dumps({"key": {"attacks": ["pgd2"]}, "result": table}))  # compare's cache
    (run,) = read_runs([str(folder)])
    assert run.evaluation["routes"] == table["routes"]


def test_paired_differences_between_settings_match_by_seed(tmp_path):
    """Two norms x two seeds: each bn run is paired with the sabn run of its seed; the interval is the t one."""
    def run(norm, seed, robust_acc):
        metrics = [{"epoch": 1, "val_adv_clean": 50.0, "val_adv_robust": robust_acc}]
        return ReportRun(tmp_path / f"{norm}{seed}", f"{norm}{seed}", {"norm": norm, "seed": seed, "out": f"runs/{norm}{seed}"},
                         metrics, None, None)

    runs = [run("sabn", 0, 40.0), run("sabn", 1, 44.0), run("bn", 1, 41.0), run("bn", 0, 38.0)]
    result = comparison(runs)
    assert result["settings"] == ["norm=sabn", "norm=bn"]
    paired = next(p for p in result["paired"] if p["metric"] == "adv val robust")
    diffs = [38.0 - 40.0, 41.0 - 44.0]  # seed 0, seed 1
    mean, sd = sum(diffs) / 2, abs(diffs[0] - diffs[1]) / 2 ** 0.5
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(mean)
    assert (paired["low"], paired["high"]) == pytest.approx((mean - 12.706 * sd / 2 ** 0.5, mean + 12.706 * sd / 2 ** 0.5))
    clean = next(p for p in result["paired"] if p["metric"] == "adv val clean")
    assert clean["mean"] == 0.0


def test_per_class_accuracy_by_hand():
    examples = {"prediction": [0, 1, 1, 0], "robust": [True, False, False, False]}
    rows = per_class_accuracy(examples, torch.tensor([0, 0, 1, 2]), 4)
    assert rows == [{"class": 0, "n": 2, "clean": 50.0, "worst_case": 50.0},
                    {"class": 1, "n": 1, "clean": 100.0, "worst_case": 0.0},
                    {"class": 2, "n": 1, "clean": 0.0, "worst_case": 0.0},
                    {"class": 3, "n": 0, "clean": None, "worst_case": None}]


def test_page_opens_with_the_headline_then_the_comparison(runs):
    result = invoke_in(runs, ["report", "s0", "s1", "-o", "order.html", "--images", "0"])
    assert result.exit_code == 0, result.output
    page = (runs / "order.html").read_text()
    ev = json.loads((runs / "s0" / "eval.json").read_text())
    assert ev["weights"] == "live"  # trained without --ema: the optimizer's weights were scored
    positions = [page.index(marker) for marker in ('id="headline"', 'id="comparison"', 'id="curves"', 'id="run0"')]
    assert positions == sorted(positions)
    # both runs evaluated? s1 has no eval.json, so the headline compares the last validation figures
    values = [read_runs([runs / s])[0].metrics[-1]["val_adv_robust"] for s in ("s0", "s1")]
    assert f"all runs {sum(values) / 2:.1f}% (n=2)" in page


def test_one_run_headline_names_the_figure_the_images_and_the_weights(runs):
    run = read_runs([runs / "s0"])[0]
    acc = run.evaluation["routes"]["adv"]
    assert headline([run]) == (f"s0: {acc['worst_case']:.1f}% robust (pgd2, fgsm, worst case), {acc['clean']:.1f}% natural "
                               "accuracy on the adv route, 48 test images, the live weights")


def test_a_compare_folder_stands_for_the_runs_inside_it(runs):
    assert run_folders([runs]) == [runs / "s0", runs / "s1"]
    result = invoke_in(runs, ["report", ".", "-o", "folder.html", "--images", "0"])
    assert result.exit_code == 0, result.output
    assert "2 run(s)" in result.output
    result = invoke_in(runs, ["plot", ".", "-o", "folder.png"])
    assert result.exit_code == 0, result.output
    assert (runs / "folder.png").read_bytes()[:8] == PNG


def test_hints_repeat_the_recorded_evaluation(runs):
    run = read_runs([runs / "s0"])[0]
    assert eval_command(run, sanity=True) == f"robust eval {runs / 's0'} --attack pgd2,fgsm --limit 48 --sanity --json {runs / 's0'}/"
    run.evaluation = {k: v for k, v in run.evaluation.items() if k != "checks"}
    page = report_html([run])
    assert "--limit 48" in page and "--force replaces eval.json" in page


def test_class_names_of_fashion_mnist_label_the_per_class_figures(runs):
    page = report_html(read_runs([runs / "s0"]))
    assert "T-shirt/top" in page and "Ankle boot" in page
    assert class_names(None, 10, "fashion-mnist")[:2] == ["T-shirt/top", "Trouser"]
    assert class_names(None, 3, "unknown") == ["0", "1", "2"]


def test_two_seed_intervals_are_flagged_not_printed(runs):
    html = comparison_html(read_runs([runs / "s0", runs / "s1"]))
    assert html.count(UNINFORMATIVE) == 4  # four validation figures of one setting of two seeds
    assert " .. " not in html
    assert not uninformative({"n": 2, "low": 0.5, "high": 3.0})  # excludes 0: it still says something
    assert uninformative({"n": 2, "low": -117.35, "high": 111.35})
    assert not uninformative({"n": 3, "low": -1.0, "high": 1.0})


def test_curves_use_integer_epochs_a_colour_per_setting_and_lr_from_zero(runs):
    read = read_runs([runs / "s0", runs / "s1"])
    assert run_styles(read) == [("C0", "o"), ("C0", "s")]  # seeds of one setting: one colour, two markers
    fig = learning_curves_figure(read)
    axes = fig.axes
    assert list(axes[0].get_xticks()) == [1, 2]
    assert axes[3].get_ylim()[0] == 0
    assert "PGD-1" in axes[2].get_title()
    assert len(fig.legends) == 1 and all(ax.get_legend() is None for ax in axes)


def test_compared_figures_are_named_in_the_pages_words():
    assert figure_label("adv val clean") == "adv route, val natural"
    assert figure_label("clean clean") == "clean route, natural"
    assert figure_label("adv worst_case") == "adv route, worst case"
    assert figure_label("adv pgd20") == "adv route, pgd20"
