"""The run folder read through one object: Run gives the settings, the metrics, the checkpoint robust eval
picks, the evaluation; a folder of no run is refused in one line; read_checkpoint and load_model take a run
folder, a file or a checkpoint dict, and checkpoints of older formats still load."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_refused, invoke_in, tiny_config

from robust import Run, load_checkpoint, load_model, read_checkpoint
from robust.checkpoint import build_checkpoint, save_checkpoint
from robust.cli.common import newest_run
from robust.errors import CheckpointError, ConfigError
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.outputs import RunFiles as RunFilesFromOutputs
from robust.outputs import protected_file
from robust.run import RunFiles, checkpoint_path
from robust.train.trainer import Trainer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny two-epoch run that keeps epoch 1, evaluated into its own folder (eval.json, per_example.jsonl)."""
    root = tmp_path_factory.mktemp("run")
    Trainer(tiny_config(root / "r", epochs=2, keep_epochs="1")).fit()
    result = invoke_in(root, ["eval", "r", "--attack", "fgsm", "--limit", "16", "--json", "r/", "--per-example", "r/",
                              "--quiet"])
    assert result.exit_code == 0, result.output
    return root / "r"


def test_run_reads_config_metrics_checkpoints_and_evaluation(run_dir):
    run = Run(run_dir)
    assert run.path == run_dir
    assert run.config == json.loads((run_dir / "config.json").read_text())
    assert run.config["epochs"] == 2 and run.config["width"] == 4 and run.config["seed"] == 0
    assert [m["epoch"] for m in run.metrics] == [1, 2]
    best = read_checkpoint(run_dir / "best.pt")
    assert run.checkpoint() == run_dir / "best.pt" == checkpoint_path(run_dir)  # what robust eval RUN scores
    assert run.checkpoint("last") == run_dir / "last.pt" and run.checkpoint("best") == run_dir / "best.pt"
    assert run.checkpoint("epoch:1") == run.checkpoint(1) == run_dir / "epoch1.pt"
    assert read_checkpoint(run.checkpoint("last"))["epoch"] == 1  # 0-based: the second epoch
    assert best["epoch"] in (0, 1)
    evaluation = run.evaluation
    assert evaluation == json.loads((run_dir / "eval.json").read_text())
    assert evaluation["n"] == 16 and set(evaluation["routes"]) == {"clean", "adv"}
    rows = run.per_example
    assert len(rows) == 2 * 16 and {r["route"] for r in rows} == {"clean", "adv"}
    for route, figures in evaluation["routes"].items():  # the per-example verdicts add up to the table
        survived = sum(r["broken_by"] is None for r in rows if r["route"] == route)
        assert 100 * survived / 16 == pytest.approx(figures["worst_case"], abs=1e-9)


def test_run_refuses_a_missing_epoch_and_a_bad_choice(run_dir):
    run = Run(run_dir)
    with pytest.raises(CheckpointError, match="has no epoch2.pt; keep epochs with --keep-epochs"):
        run.checkpoint("epoch:2")
    for choice in ("epoch:0", "newest", "epoch:x", 0, True):
        with pytest.raises(ConfigError, match="must be best, last or epoch:N"):
            run.checkpoint(choice)


def test_a_run_without_best_pt_gives_last_pt_and_no_evaluation(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "metrics.jsonl", "last.pt"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    run = Run(copy)
    assert run.checkpoint() == copy / "last.pt" and run.evaluation is None and run.per_example is None
    with pytest.raises(CheckpointError, match="has no best.pt"):
        run.checkpoint("best")


def test_a_folder_of_no_run_is_refused_in_one_line(tmp_path, run_dir):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    (tmp_path / "file.txt").write_text("x")
    cases = [(tmp_path / "notes", "is not a run folder: it holds no best.pt, last.pt, config.json or metrics.jsonl"),
             (tmp_path / "missing", "does not exist"), (tmp_path / "file.txt", "is a file, not a folder"),
             (5, "must be a path"), ("", "must be a path")]
    for path, words in cases:
        with pytest.raises(ConfigError, match=words) as caught:
            Run(path)
        assert "\n" not in str(caught.value)
    assert_refused(tmp_path, ["eval", "notes"], "holds no best.pt or last.pt")


def test_unreadable_run_files_are_one_line_errors(run_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "last.pt").write_bytes((run_dir / "last.pt").read_bytes())
    run = Run(broken)
    with pytest.raises(ConfigError, match="has no config.json"):
        run.config
    with pytest.raises(ConfigError, match="has no metrics.jsonl"):
        run.metrics
    (broken / "config.json").write_text("{not json")
    (broken / "metrics.jsonl").write_text('{"epoch": 2}\n{"epoch": 1, "x": 1}\n{"epo')  # a line cut by a kill
    (broken / "eval.json").write_text('{"n": 3}')
    (broken / "per_example.jsonl").write_text('[1, 2]\n')
    with pytest.raises(ConfigError, match="config.json is not readable JSON"):
        run.config
    assert run.metrics == [{"epoch": 1, "x": 1}, {"epoch": 2}]
    with pytest.raises(ConfigError, match="has no per-route table"):
        run.evaluation
    with pytest.raises(ConfigError, match="is not a `robust eval --per-example` file"):
        run.per_example


def test_the_writer_and_the_readers_use_the_same_names(run_dir):
    assert RunFilesFromOutputs is RunFiles  # one set of names, importable where it always was
    written = {p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert written == {RunFiles.CONFIG, RunFiles.METRICS, RunFiles.BEST, RunFiles.LAST, RunFiles.epoch(1),
                       RunFiles.EVALUATION, RunFiles.PER_EXAMPLE}
    for name in (RunFiles.CONFIG, RunFiles.METRICS, RunFiles.BEST, RunFiles.LAST, RunFiles.epoch(1)):
        assert protected_file(run_dir / name) == f"the {name} of the run folder {run_dir}"
    for name in (RunFiles.EVALUATION, RunFiles.PER_EXAMPLE):  # results written from the run, replaceable by --force
        assert protected_file(run_dir / name) is None


def test_newest_run_is_the_one_whose_checkpoint_was_written_last(run_dir, tmp_path):
    runs = tmp_path / "runs"
    for name, stamp in (("a", 2_000_000_000), ("b", 1_000_000_000)):
        (runs / name).mkdir(parents=True)
        (runs / name / "last.pt").write_bytes((run_dir / "last.pt").read_bytes())
        os.utime(runs / name / "last.pt", (stamp, stamp))
    (runs / "c").mkdir()
    (runs / "c" / "config.json").write_text("{}")  # a run without a checkpoint is never scored
    assert newest_run(runs) == str(runs / "a")


def test_the_two_loading_verbs_take_a_run_folder_a_file_or_the_dict(run_dir):
    state = read_checkpoint(run_dir)
    assert state["epoch"] == read_checkpoint(run_dir / "best.pt")["epoch"] == load_checkpoint(run_dir)["epoch"]
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    from_folder, from_dict = load_model(run_dir), load_model(state)
    adv = load_model(run_dir, route="adv")
    assert not from_folder.training and not adv.training
    with torch.no_grad(), use_route(from_folder, "adv"), use_route(from_dict, "adv"):
        assert torch.equal(from_folder(x), from_dict(x))
        assert torch.allclose(adv(x), from_folder(x), atol=1e-5)  # the exported route computes the same logits


def test_a_checkpoint_of_an_older_format_still_loads(tmp_path):
    """Version 1 files written before ``kind``, ``data`` and the final_norm option: a training checkpoint."""
    model = build_model("preact_resnet18", norm="sabn", num_classes=10, in_channels=1, width=4, final_norm=True).eval()
    old = build_checkpoint(model, dataset="fashion-mnist", eps=0.1, epoch=0)
    del old["model_args"]["final_norm"]
    assert "kind" not in old and "data" not in old and old["version"] == 1
    (tmp_path / "old").mkdir()
    save_checkpoint(old, tmp_path / "old" / "best.pt")
    assert Run(tmp_path / "old").checkpoint() == tmp_path / "old" / "best.pt"
    rebuilt = load_model(tmp_path / "old")
    assert rebuilt.final_norm is not None
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
