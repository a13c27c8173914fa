"""Low precision must not weaken the attacks: under fp16 autocast (which runs on the CPU too) no
example loses its input gradient, as a confident one would when the softmax gradient underflows."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust.attacks import ce_loss, nfgsm, pgd
from robust.attacks.pgd import input_gradient
from robust.nn.factory import build_model
from robust.nn.norms import use_route
from robust.train.awp import weight_perturbation

FP16_TINY = 2.0 ** -24  # fp16's smallest subnormal; |p - onehot| of a confident example lies below it


def _confident_model() -> nn.Module:
    """A tiny model that is sure of its answer: class 0's logit leads by about 30, so p_0 = 1 - 1e-13."""
    torch.manual_seed(0)
    model = build_model(norm="sabn", width=4, in_channels=1).eval()
    with torch.no_grad():
        model.fc.bias[0] += 30.0
    return model


def _zero_share(grad: torch.Tensor) -> float:
    return (grad.flatten(1).abs().amax(dim=1) == 0).float().mean().item()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    x = torch.rand(64, 1, 28, 28)
    model = _confident_model()
    with torch.no_grad(), use_route(model, "adv"):
        y = model(x).argmax(1)  # every example correctly (and very confidently) classified
    return model, x, y


def test_the_batch_has_examples_whose_fp16_softmax_gradient_underflows(batch):
    model, x, y = batch
    with torch.no_grad(), use_route(model, "adv"):
        p = F.softmax(model(x).double(), dim=1)
    smallest = (1 - p.gather(1, y[:, None])).squeeze(1)  # |p_y - 1|, the largest entry of p - onehot
    assert (smallest < FP16_TINY).float().mean() > 0.25  # the situation the fix is for


def test_fp16_autocast_input_gradients_are_zero_for_no_more_examples_than_fp32(batch):
    model, x, y = batch
    with use_route(model, "adv"):
        x32 = x.clone().requires_grad_(True)
        fp32 = _zero_share(input_gradient(model, ce_loss, x32, y))
        with torch.autocast("cpu", dtype=torch.float16):
            x16 = x.clone().requires_grad_(True)
            fp16 = _zero_share(input_gradient(model, ce_loss, x16, y))
            naive = _zero_share(torch.autograd.grad(ce_loss(model(x16), y), x16)[0])  # fp16 backward, unscaled
    assert fp32 == 0.0 and fp16 == fp32
    assert naive > 0.25  # without the fp32 gradient, these examples would never be perturbed


@pytest.mark.parametrize("attack", ["pgd", "fgsm", "nfgsm"])
def test_every_training_attack_moves_every_example_under_fp16_autocast(batch, attack):
    """No random start (nfgsm: no noise), so an example moves only if its gradient's sign is non-zero."""
    model, x, y = batch
    eps = 0.05
    with use_route(model, "adv"), torch.autocast("cpu", dtype=torch.float16):
        if attack == "nfgsm":
            x_adv = nfgsm(model, x, y, eps, noise=0.0)
        else:
            x_adv = pgd(model, x, y, eps, eps / 4 if attack == "pgd" else eps, 2 if attack == "pgd" else 1,
                        random_start=False)
    moved = (x_adv - x).flatten(1).abs().amax(dim=1) > 0
    assert moved.all(), f"{(~moved).sum().item()} of {len(moved)} examples were not perturbed"


def test_awp_with_a_power_of_two_loss_scale_gives_the_same_perturbation():
    torch.manual_seed(3)
    model = build_model(norm="bn", width=4, in_channels=1).train()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))

    def loss():
        return F.cross_entropy(model(x), y)

    plain = weight_perturbation(model, loss, 0.01).deltas
    scaled = weight_perturbation(model, loss, 0.01, loss_scale=2.0 ** 16).deltas
    for a, b in zip(plain, scaled):  # a power of two scales every fp32 gradient exactly; the norm divides it out
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
