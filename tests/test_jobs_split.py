"""--jobs N shares even a small evaluation: the images are attacked in chunks fixed by the image
count and the batch size alone, so N processes give one process's verdicts, example for example."""

from __future__ import annotations

import pytest

from robust.eval.evaluation import evaluate
from robust.eval.jobs import SPLIT_RULE, chunk_bounds, split
from robust.eval.state import differences


@pytest.fixture(scope="module")
def model(fgsm_model):
    """conftest's briefly FGSM-trained width-4 model (adv route)."""
    return fgsm_model


@pytest.mark.parametrize("n,batch,count", [(100, 256, 12), (1000, 256, 16), (10_000, 256, 40), (48, 8, 6),
                                           (7, 256, 1), (129, 256, 16), (1, 1, 1)])
def test_chunks_follow_the_image_count_and_batch_size_evenly(n, batch, count):
    bounds = chunk_bounds(n, batch)
    sizes = [hi - lo for lo, hi in bounds]
    assert len(bounds) == count and sum(sizes) == n and max(sizes) <= batch and max(sizes) - min(sizes) <= 1
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and bounds[0][0] == 0


def test_the_chunks_of_100_images_share_evenly_across_processes():
    bounds = chunk_bounds(100, 256)  # 12 chunks of 8 or 9 images
    for jobs in (2, 3, 4, 6):
        shares = split(list(range(len(bounds))), jobs)
        images = [sum(bounds[u][1] - bounds[u][0] for u in share) for share in shares]
        assert {len(share) for share in shares} == {12 // jobs}  # as many chunks each
        assert max(images) - min(images) <= 12 // jobs, images  # chunks differ by one image at most


def test_two_jobs_on_100_images_with_the_default_batch_give_one_processs_verdicts(model, fmnist):
    data = (fmnist.test_x[:100], fmnist.test_y[:100])
    kwargs = {"attacks": ["pgd5", "apgd-ce"], "eps": 0.1, "per_example": True, "attack_precision": "fp32", "threads": 1}
    one = evaluate(model, data, **kwargs)
    two = evaluate(model, data, jobs=2, **kwargs)
    assert (one["jobs"], two["jobs"]) == (1, 2)  # two processes, each with 6 of the 12 chunks
    assert one["split"] == two["split"] == {"rule": SPLIT_RULE, "chunks": 12}
    assert two["per_example"] == one["per_example"] and two["routes"] == one["routes"]
    assert 0 < one["routes"]["adv"]["worst_case"] < one["routes"]["adv"]["clean"]  # something to compare


def test_a_state_file_of_another_split_rule_is_refused_naming_it():
    wanted = {"n": 100, "split": SPLIT_RULE}
    assert differences({"n": 100}, wanted) == [f"another rule of chunks (None there, {SPLIT_RULE!r} now)"]
