"""How often a training attack's input gradient is exactly zero, per method and precision.

An example whose input gradient is all zeros is never moved by a sign step: the attack silently
trains on the clean image. Low precision can cause it (fp16's range cannot hold the softmax gradient
of a confident example; see :func:`robust.attacks.pgd.input_gradient`). This measures, for each
method's training attack at its own starting point (pgd, fast: uniform in the eps ball; trades,
mart: ``x + 0.001 N(0, 1)``; nfgsm: ``U[-2 eps, 2 eps]``) and on the adv route in eval mode, the
share of examples with a zero gradient in fp32 and under bf16 (and on CUDA fp16) autocast.

    python -m robust.bench.attack_gradients RUN_DIR [--limit 1000] [--json FILE]
"""

from __future__ import annotations

from typing import Any

import click
import torch
import torch.nn as nn

from robust.attacks import ce_loss, gaussian_start, kl_loss_from
from robust.attacks.pgd import LinfBall, input_gradient
from robust.bench.commands import AsciiInt, checkpoint_file, refusing_bad_input
from robust.checkpoint import load_model, read_checkpoint
from robust.data.loader import to_float
from robust.errors import ConfigError
from robust.eval.evaluation import load_test_split
from robust.nn.norms import bn_mode, use_route
from robust.outputs import check_output_file, write_json

STARTS = ("pgd", "trades", "mart", "fast", "nfgsm")


def attack_start(method: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Where ``method``'s training attack takes its first gradient."""
    if method in ("trades", "mart"):
        return (x + gaussian_start(x)).clamp(0, 1)
    if method == "nfgsm":
        return (x + torch.empty_like(x).uniform_(-2 * eps, 2 * eps)).clamp(0, 1)
    return (x + LinfBall.random_start(x, eps)).clamp(0, 1)


def zero_gradient_share(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, eps: float,
                        dtype: torch.dtype | None, seed: int = 0) -> float:
    """The share (%) of examples whose input gradient at ``method``'s start is exactly zero."""
    torch.manual_seed(seed)
    start = attack_start(method, x, eps).requires_grad_(True)
    device = x.device.type
    context = torch.autocast(device, dtype=dtype) if dtype is not None else torch.autocast(device, enabled=False)
    with use_route(model, "adv"), bn_mode(model, False), context:
        if method == "trades":
            with torch.no_grad():
                clean = model(x)
            grad = input_gradient(model, kl_loss_from(clean), start, y)
        else:
            grad = input_gradient(model, ce_loss, start, y)
    return 100.0 * (grad.flatten(1).abs().amax(dim=1) == 0).float().mean().item()


def measure(run: str, state: dict[str, Any], limit: int = 1000, batch_size: int = 250) -> dict[str, Any]:
    """Every method's zero-gradient share on the first ``limit`` test images of the checkpoint ``state`` (read
    from ``run``), per precision."""
    model = load_model(state)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    x, y = load_test_split(state, None, limit)
    x, y = x[:limit], y[:limit]
    eps = float(state["eps"])
    dtypes = {"fp32": None, "bf16": torch.bfloat16, **({"fp16": torch.float16} if device.type == "cuda" else {})}
    shares: dict[str, dict[str, float]] = {}
    for method in STARTS:
        shares[method] = {}
        for name, dtype in dtypes.items():
            total = 0.0
            for i in range(0, len(y), batch_size):
                xb, yb = to_float(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
                total += zero_gradient_share(model, xb, yb, method, eps, dtype, seed=i) * len(yb)
            shares[method][name] = total / len(y)
    return {"run": str(run), "images": len(y), "eps": eps, "device": str(device), "zero_gradient_percent": shares}


@click.command(help=__doc__.split("\n\n")[0] + "\n\nRUN: a run folder or checkpoint.",
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run")
@click.option("--limit", type=AsciiInt(min=1), default=1000, show_default=True, help="test images to measure on")
@click.option("--json", "json_path", default=None,
              help="also write the figures to this file (a folder ending in / gets attack_gradients.json); checked "
                   "before any work, an existing file kept unless --force, a run's own files never")
@click.option("--force", is_flag=True, help="overwrite an existing --json file")
@refusing_bad_input
def command(run: str, limit: int, json_path: str | None, force: bool) -> None:
    source = checkpoint_file(run)
    json_file = (check_output_file(json_path, "--json", force, "attack_gradients.json", inputs=(source,))
                 if json_path is not None else None)
    state = read_checkpoint(source)
    missing = [k for k in ("dataset", "eps") if k not in state]
    if missing:
        raise ConfigError(f"{run} records no {' or '.join(missing)}; measure a run of robust train (its folder)")
    result = measure(str(source), state, limit)
    precisions = list(next(iter(result["zero_gradient_percent"].values())))
    click.echo(f"{result['run']}: {result['images']} test images, eps {result['eps']:g}, {result['device']}; "
               "share of examples with an all-zero input gradient (%)")
    click.echo(f"{'method':<8}" + "".join(f"{p:>8}" for p in precisions))
    for method, row in result["zero_gradient_percent"].items():
        click.echo(f"{method:<8}" + "".join(f"{row[p]:>8.2f}" for p in precisions))
    if json_file is not None:
        write_json(json_file, result, overwrite=force)
        click.echo(f"wrote {json_file}")


def main(argv: list[str] | None = None) -> None:
    """``python -m robust.bench.attack_gradients ARGS``: exits 2 with one line on bad input, as `robust` does."""
    command.main(args=argv, prog_name="python -m robust.bench.attack_gradients")


if __name__ == "__main__":
    main()
