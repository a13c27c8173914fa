"""Messages a newcomer meets first: the nearest valid name for a misspelt one, and the files a --data-dir
folder needs."""

from __future__ import annotations


import pytest
from helpers import assert_refused

from robust.data.load import load_dataset
from robust.errors import DataError, did_you_mean
from robust.nn.norms import check_norm
from robust.objectives import get_objective


def test_a_misspelt_attack_gets_the_nearest_valid_name(tmp_path):
    assert_refused(tmp_path, ["eval", "run", "--attack", "pgd20,autoatack"], "unknown attack 'autoatack'",
                   "did you mean autoattack?")
    assert_refused(tmp_path, ["eval", "run", "--attack", "apgdce"], "did you mean apgd-ce?")


def test_misspelt_norms_methods_and_datasets_get_the_nearest_name():
    with pytest.raises(ValueError, match=r"did you mean sabn\?"):
        check_norm("sbn")
    with pytest.raises(ValueError, match=r"did you mean trades\?"):
        get_objective("trade")
    with pytest.raises(DataError, match=r"did you mean fashion-mnist\?"):
        load_dataset("fashion_mnist")
    assert did_you_mean("zzzz", ["bn", "sabn"]) == ""  # nothing near: no guess


def test_a_missing_cifar10_names_the_files_its_folder_needs(tmp_path):
    with pytest.raises(DataError) as caught:
        load_dataset("cifar10", str(tmp_path), download=False)
    message = str(caught.value)
    assert "cifar-10-batches-py/" in message and "data_batch_1" in message and "test_batch" in message
    assert f"looked in: {tmp_path}; download disabled" in message
