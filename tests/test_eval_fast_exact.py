"""AutoAttack-sized evaluations made fast without changing a verdict: bf16 attack iterations judged in
fp32, several processes, a resumable state file. Tiny models, a few dozen real images."""

from __future__ import annotations

import pytest
import torch

import robust
from robust.attacks.pgd import pgd
from robust.attacks.registry import build_attack
from robust.data.loader import to_float
from robust.eval.accuracy import attack_dtype, correct_under_attack
from robust.eval.evaluation import evaluate
from robust.train.step import StepSettings, train_step

EPS = 0.1
WIDTH = 4


@pytest.fixture(scope="module")
def model(fmnist):
    """A width-4 SaBN model trained briefly with FGSM-RS on real images: well above chance, not robust to all."""
    torch.manual_seed(0)
    net = robust.build_model(norm="sabn", num_classes=10, in_channels=1, width=WIDTH, mean=fmnist.mean, std=fmnist.std)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    settings = StepSettings.of("fast", EPS, clean_weight=0.5, attack_bn="eval")
    for _ in range(60):
        idx = torch.randint(0, 2000, (32,))
        train_step(net, opt, None, to_float(fmnist.train_x[idx]), fmnist.train_y[idx], settings)
    return robust.export_route(net, "adv").eval()


@pytest.fixture(scope="module")
def images(fmnist):
    return fmnist.test_x[:48], fmnist.test_y[:48]


class TieAtBf16(torch.nn.Module):
    """Two logits, ``s`` and ``1.001 s`` with ``s`` the pixel sum: in fp32 class 1 wins, in bf16 the
    weight 1.001 rounds to 1 (8 bits of mantissa), the logits tie and argmax says class 0."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0] * 4, [1.001] * 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@pytest.mark.precision
def test_a_bf16_verdict_never_counts_only_the_fp32_forward_does():
    model = TieAtBf16()
    x, y = torch.full((3, 1, 2, 2), 0.5), torch.ones(3, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (model(x).argmax(1) == 0).all()  # bf16 would call every example broken by doing nothing
    seen = []

    def identity(xa, ya):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return xa.clone()

    clean, robust = correct_under_attack(model, x, y, identity, dtype=torch.bfloat16)
    assert seen == [True]  # the attack ran under bf16 autocast
    assert clean.all() and robust.all()  # fp32 verdicts: right clean, right on the returned inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast changes no verdict either
        assert correct_under_attack(model, x, y, identity)[1].all()


def test_attack_precision_names_and_the_auto_rule():
    cpu = torch.device("cpu")
    assert attack_dtype("fp32", cpu) is None and attack_dtype("bf16", cpu) == torch.bfloat16
    assert attack_dtype("auto", cpu) is None  # the suite sets ROBUST_CPU_BF16=0: auto is fp32 on this CPU
    with pytest.raises(robust.errors.ConfigError, match="fp32"):
        attack_dtype("fp16", cpu)


@pytest.mark.bf16
@pytest.mark.precision
def test_bf16_pgd_iterations_and_every_broken_example_misclassified_in_fp32(model, images):
    x, y = to_float(images[0]), images[1]
    returned, forward_dtypes = [], set()
    hook = model.register_forward_hook(lambda m, i, out: forward_dtypes.add(out.dtype))

    def attack(xa, ya):
        returned.append(pgd(model, xa, ya, EPS, EPS / 4, 5))
        return returned[-1]

    try:
        torch.manual_seed(0)
        clean, robust = correct_under_attack(model, x, y, attack, dtype=torch.bfloat16)
    finally:
        hook.remove()
    assert forward_dtypes == {torch.bfloat16, torch.float32}  # iterations in bf16, verdicts in fp32
    with torch.no_grad():
        fp32_right = model(returned[0]).argmax(1) == y[clean]
    assert torch.equal(robust[clean], fp32_right)  # broken means misclassified in fp32, and only that
    assert 0 < int(robust.sum()) < int(clean.sum())  # a comparison with something to compare
    result = evaluate(model, (x, y), attacks=["pgd5"], eps=EPS, attack_precision="bf16")
    assert result["attack_precision"] == "bf16"


def test_fp32_attacks_give_the_hand_computed_verdicts_exactly(model, images):
    """fp32 mode is the plain computation: each attack with its seed on the clean-correct examples, fp32 forwards."""
    x, y = images
    names = ["fgsm", "pgd3", "apgd-ce"]
    result = evaluate(model, (x, y), attacks=names, eps=EPS, batch_size=len(y), attack_precision="fp32",
                      per_example=True)
    assert result["attack_precision"] == "fp32"
    xf = to_float(x)
    with torch.no_grad():
        clean = model(xf).argmax(1) == y
    torch.manual_seed(0)
    worst = clean.clone()
    for name in names:
        attack = build_attack(name, model, EPS, seed=0)
        x_adv = attack(xf[clean], y[clean])
        with torch.no_grad():
            robust = clean.clone()
            robust[clean] = model(x_adv).argmax(1) == y[clean]
        assert result["routes"]["adv"][name] == 100.0 * robust.sum().item() / len(y)
        worst &= robust
    assert result["per_example"]["adv"]["robust"] == worst.tolist()
