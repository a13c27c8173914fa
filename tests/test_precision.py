"""Precision: what ``auto`` resolves to on each CPU kind, and the bf16 path against fp32.

The suite runs with ``auto`` = fp32 (tests/conftest.py), so its verdicts do not depend on the CPU
kind; the bf16 tests below run only where bf16 is native (AMX/AVX512-BF16 CPUs, or CUDA). Their
tolerances are derived from bf16's rounding (``_bf16_error_bounds``), not measured on one machine,
so they hold whichever kernels (AMX, AVX512-BF16, AVX2) do the arithmetic; what is chaotic (PGD's
sign steps) is held fixed rather than given a tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from robust.config import TrainConfig
from robust.data.loader import to_float
from robust.errors import ConfigError
from robust.bench.training import BenchConfig, run_bench
from robust.nn.factory import build_model
from robust.nn.norms import split_routes, use_route
from robust.runtime import autocast, autocast_dtype, cpu_has_amx
from robust.train.step import StepSettings, make_adversarial, step_loss
from robust.train.trainer import Trainer

CPU = torch.device("cpu")


def test_auto_is_bf16_exactly_where_the_cpu_has_amx(monkeypatch):
    monkeypatch.setenv("ROBUST_CPU_BF16", "1")  # as on an Intel Xeon with AMX
    assert autocast_dtype("auto", CPU) == torch.bfloat16
    monkeypatch.setenv("ROBUST_CPU_BF16", "0")  # as on an AMD EPYC (AVX2) or a Xeon with AVX512-BF16 only
    assert autocast_dtype("auto", CPU) is None
    monkeypatch.delenv("ROBUST_CPU_BF16")  # this machine's own flags decide
    assert autocast_dtype("auto", CPU) == (torch.bfloat16 if cpu_has_amx() else None)
    for setting in ("1", "0"):  # explicit precisions never depend on the machine
        monkeypatch.setenv("ROBUST_CPU_BF16", setting)
        assert autocast_dtype("fp32", CPU) is None and autocast_dtype("bf16", CPU) == torch.bfloat16
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            autocast_dtype("fp16", CPU)


def test_the_run_says_its_precision_and_validation_size(tmp_path, fmnist_small):
    lines: list[str] = []
    config = TrainConfig(dataset="fashion-mnist", width=4, epochs=1, limit=200, steps=1, eps="0.1", val_split=0.1,
                         val_steps=1, precision="fp32", channels_last=False, quiet=True, out=str(tmp_path / "r"))
    Trainer(config, data=fmnist_small, log=lines.append).fit()
    assert "[180 training, 20 validation examples, 1x28x28]" in lines[0] and "precision fp32" in lines[0]


# ---- bf16 against fp32: tolerances from bf16's rounding ---------------------------------------------

U = 2.0 ** -8  # bf16's unit roundoff (8 significant bits, round to nearest even): |fl(v) - v| <= U * |v|
U32 = 2.0 ** -24  # fp32's


def _bf16_error_bounds(model, rows: int = 0, side: int = 28) -> tuple[float, float]:
    """Normwise relative error bounds of a PreAct ResNet under bf16 autocast against fp32:
    ``(eps_f, eps_g)`` for its logits and for its weight gradient. ``rows``: the examples each norm
    takes its batch statistics over (0: eval mode, none); ``side``: the input images' side.

    Error model (first order; every number below is counted from the model, none measured):

    - Rounding a tensor to bf16 moves it by at most ``U`` relative (exact for round to nearest).
    - A conv or linear layer multiplies two bf16 operands and sums in fp32: ``|fl(a)fl(b) - ab| <=
      (2U + U^2)|a||b|`` per dot product, then rounds its output to bf16: 3U per layer. Its activation
      operand is usually bf16 already (the previous op's rounded output), so this counts that
      rounding twice: slack, which also covers the bias's rounding. A norm layer, a residual add or
      the pooling rounds its bf16 output once: U each; ReLU is exact. (Autocast runs exactly these ops
      in bf16; the input normalization, the norms' statistics and the loss run in fp32.)
    - fp32 sums of K terms err by at most ``K * 2^-24`` (recursive summation, the worst order), added
      explicitly: each product (K <= 9 * 64 = 576: < 0.01U), each norm's batch statistics (K = rows x
      the positions it normalizes, up to 64 * 28 * 28: mean and variance, 1.5 K 2^-24) and its
      backward sums (mean of dy and of dy * x_hat, 2 K 2^-24), the weight gradient's sum over both
      halves of the fused batch (2 rows * side^2 terms).
    - Errors add linearly along the longest path (the coherent worst case) and pass the later layers
      at unit gain (a relative error neither grows nor shrinks through a layer; the norms hold every
      activation at unit scale). This is a model, not a theorem: a rigorous worst case multiplies 18
      layers' condition numbers and says nothing. The quadrature sum of independent errors,
      ``sqrt(n) U``, would be about 10x tighter, but it is an average, not a bound, and a weight
      gradient (a sum of ~1e5 terms with cancellation) can exceed it; hence linear growth.

    Forward, longest path: stem conv (3U), per block norm, conv, norm, conv, add (9U), the pooling
    (U), fc (3U): ``n_f = 7 + 9B`` roundings for B blocks. Backward retraces it: fc's input gradient
    (3U), the pooling (U), per block the sum of its two gradient branches, two convs' input gradients
    and two norms (9U), then the stem's weight gradient (3U): ``n_b = 7 + 9B``. A weight gradient
    carries the errors of both. PreAct-18 (B = 8): ``eps_f = 79U (+ fp32 sums)``, ``eps_g = 158U (+ fp32
    sums)``; at rows = 64, side = 28 that is 0.34 and 0.69; in eval mode eps_f = 0.31.
    """
    blocks = list(model.blocks)
    n_f = n_b = 3 + 1 + 3 + 9 * len(blocks)  # stem, pooling, fc (backward: fc, pooling, stem's weight gradient)
    k_product = max(9 * max(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    sums_f = sums_b = (2 + 2 * len(blocks)) * k_product  # the path's products, forward and backward
    sums_b += 2 * rows * side * side  # the stem's weight gradient: both halves, every position
    for block in blocks:
        inner = -(-side // block.stride)  # conv1's output side (stride 2 with padding 1: ceil)
        for positions in (side * side, inner * inner):  # bn1 normalizes the block's input, bn2 conv1's output
            sums_f += 1.5 * rows * positions
            sums_b += 2 * rows * positions
        side = inner
    return n_f * U + sums_f * U32, (n_f + n_b) * U + (sums_f + sums_b) * U32


def _settings(amp):
    return StepSettings.of("hybrid", eps=0.1, alpha=0.025, steps=3, clean_weight=0.5, attack_bn="train", fused=True,
                           amp=amp, device=CPU)


def _one_step(model, x, x_adv, y, amp):
    """The training step on fixed adversarial examples: loss, backward, SGD step (train_step less the attack)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    loss, adv_logits = step_loss(model, x, x_adv, y, _settings(amp))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), adv_logits.detach()


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in params])


@pytest.mark.bf16
@pytest.mark.precision
def test_a_bf16_training_step_tracks_the_fp32_step(fmnist_small):
    """The step's loss, adv-route logits and weight update in bf16 stay within bf16's rounding of fp32.

    The adversarial examples are made once, in fp32, and both precisions step on them: PGD's sign
    steps flip wherever bf16 rounds an input gradient differently, so examples made in each precision
    differ by a chaotic amount no rounding bound covers (that is the attack's business, not the
    step's). What is compared is then bounded by ``_bf16_error_bounds`` (``eps_f``, ``eps_g``):

    - adv-route logits: ``||dZ||_F <= eps_f ||Z||_F`` over the batch (batch statistics couple the
      examples, so the bound is for the batch, not per example).
    - loss ``w CE(clean) + (1-w) CE(adv)``: CE's gradient is ``softmax - onehot``, of 2-norm at most
      ``sqrt(2)``, so ``|dCE_i| <= sqrt(2) ||dz_i||``; averaged over n examples (Cauchy-Schwarz)
      ``|d loss| <= sqrt(2) eps_f (w ||Z_clean||_F + (1-w) ||Z_adv||_F) / sqrt(n)``, with the fp32
      logits' norms.
    - weight update: SGD's first step is ``-lr * grad`` (the momentum buffer starts at the gradient),
      so ``||du|| <= eps ||u||`` with ``eps = eps_g`` plus the fp32 update arithmetic
      (``p - lr g`` and its difference with ``p``: at most ``2 * 2^-24 ||p||`` for each run).
      Hence the cosine with fp32's update is at least ``sqrt(1 - eps^2)`` and the norm ratio
      within ``1 +- eps``. The bound is for the whole update, whose relative error is the
      norm-weighted mean of its tensors' (``||du||^2 = sum_t eps_t^2 ||u_t||^2``): a small tensor
      whose gradient cancels heavily (the stem's 9 weights a filter, each a sum of ~1e5 terms) may
      come nearer to ``eps_g`` than the whole does.
    """
    x, y = to_float(fmnist_small.train_x[:64]), fmnist_small.train_y[:64]
    n, w = len(x), _settings(None).clean_weight
    for seed in range(3):
        torch.manual_seed(seed)
        start = build_model(norm="sabn", width=8, in_channels=1)
        eps_f, eps_g = _bf16_error_bounds(start, rows=n, side=x.shape[-1])
        torch.manual_seed(100)
        x_adv = make_adversarial(copy.deepcopy(start), x, y, _settings(None))  # once, in fp32, for both
        reference = copy.deepcopy(start).train()
        with torch.no_grad(), split_routes(reference, n):
            logits = reference(torch.cat([x, x_adv]))  # the step's fused fp32 forward: clean half, adv half
        clean_norm, adv_norm = logits[:n].norm().item(), logits[n:].norm().item()
        runs = {}
        for amp in (None, torch.bfloat16):
            model = copy.deepcopy(start)
            loss, adv_logits = _one_step(model, x, x_adv, y, amp)
            runs[amp] = (loss, adv_logits, _flat(model.parameters()) - _flat(start.parameters()))
        (loss32, z32, up32), (loss16, z16, up16) = runs[None], runs[torch.bfloat16]
        assert (z32.dtype, z16.dtype) == (torch.float32, torch.bfloat16)  # the bf16 run did run in bf16
        z16 = z16.float()
        assert (z16 - z32).norm().item() <= eps_f * z32.norm().item()
        assert abs(loss16 - loss32) <= 2 ** 0.5 * eps_f * (w * clean_norm + (1 - w) * adv_norm) / n ** 0.5
        eps = eps_g + 2 * 2 * 2.0 ** -24 * _flat(start.parameters()).norm().item() / up32.norm().item()
        assert eps < 1  # else the bound says nothing about the direction
        assert (up16 - up32).norm().item() <= eps * up32.norm().item()
        assert F.cosine_similarity(up32, up16, dim=0).item() >= (1 - eps ** 2) ** 0.5  # implied by the line above
        assert abs((up16.norm() / up32.norm()).item() - 1) <= eps  # implied too


@pytest.mark.bf16
@pytest.mark.parametrize("norm", ["bn", "auxbn", "sabn"])
@pytest.mark.precision
def test_bf16_logits_stay_within_bf16_rounding_of_fp32(norm):
    """Every example's bf16 logits are within ``eps_f`` (``_bf16_error_bounds``) of fp32's, normwise:
    ``||z16_i - z32_i|| <= eps_f ||z32_i||`` (eval mode: no batch statistics, so the bound holds per
    example). No argmax check: a logit error of ``eps_f ||z_i||`` pins the argmax only where the
    fp32 top-two margin exceeds ``sqrt(2) eps_f ||z_i||`` (0.44 ||z_i||), which an untrained
    model's margins do not; a fraction of agreeing argmaxes would be a measured figure."""
    torch.manual_seed(0)
    model = build_model(norm=norm, width=8, in_channels=1).eval()
    eps_f, _ = _bf16_error_bounds(model)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with use_route(model, "adv"), torch.no_grad():
        exact = model(x)
        with autocast(CPU, torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    low = low.float()
    error, scale = (low - exact).norm(dim=1), exact.norm(dim=1)
    assert torch.all(error <= eps_f * scale), (error / scale).max().item()


@pytest.mark.bf16
@pytest.mark.precision
def test_bench_in_bf16_divides_by_the_bf16_peak():
    r = run_bench(BenchConfig(width=8, batch_size=8, steps=1, iters=1, repeats=1, images=32, memory=False,
                              precision="bf16"))
    proj, book = r["variants"]["project"], r["variants"]["textbook"]
    assert set(r["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert (proj["precision"], book["precision"]) == ("bf16", "fp32")
    assert proj["peak_fraction"] == pytest.approx(proj["achieved_gflops"] / r["matmul_peak_gflops"]["bf16"])
    assert book["peak_fraction"] == pytest.approx(book["achieved_gflops"] / r["matmul_peak_gflops"]["fp32"])
