"""bench/rm_sweep.py's comparison of recipes pair by pair, on hand-computed margins; train.rm_train's device option."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tests.helpers import REPO
from train.rm_train import RMTrainConfig, train

_spec = importlib.util.spec_from_file_location("rm_sweep", REPO / "bench" / "rm_sweep.py")
rm_sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rm_sweep)


def test_correctness_counts_ties_as_half_and_skips_unscored_pairs():
    assert rm_sweep.correctness([0.5, 0.0, -1.0, None]) == {0: 1.0, 1: 0.5, 2: 0.0}


def test_summary_pairs_recipes_on_the_pairs_both_scored(tmp_path):
    recipes = [("base", []), ("other", ["--lr", "1e-4"])]
    margins = {"base/0": [1.0, -1.0, 1.0, None], "other/0": [1.0, 1.0, -1.0, 2.0]}
    s = rm_sweep.summarize(recipes, [0], margins)
    assert s["base"]["accuracy"] == pytest.approx(2 / 3) and s["base"]["pairs_scored"] == 3
    assert s["other"]["accuracy"] == pytest.approx(3 / 4) and s["other"]["pairs_scored"] == 4
    # differences on pairs 0-2 (pair 3 has no base margin): 0, +1, -1 -> mean 0, sd 1, se 1/sqrt(3)
    assert s["other"]["vs_first"] == 0.0 and s["other"]["vs_first_pairs"] == 3
    assert s["other"]["vs_first_se"] == pytest.approx(1 / math.sqrt(3))
    assert s["other"]["first_on_same_pairs"] == pytest.approx(2 / 3)
    assert "vs_first" not in s["base"]
    # a second seed that repeats the first's margins adds no evidence: the pairs are the clusters,
    # so the standard error stays 1/sqrt(3) (counted as 6 independent items it would be sqrt(0.8/6))
    twice = rm_sweep.summarize(recipes, [0, 1], {**margins, "base/1": margins["base/0"], "other/1": margins["other/0"]})
    assert twice["other"]["vs_first_pairs"] == 6 and twice["other"]["vs_first"] == 0.0
    assert twice["other"]["vs_first_se"] == pytest.approx(1 / math.sqrt(3))
    f = tmp_path / "recipes.txt"
    f.write_text("# name, then flags\nbase\nother --lr 1e-4   # faster\n")
    assert rm_sweep.read_recipes(f) == recipes


def test_rm_train_device_is_checked(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="device"):
        RMTrainConfig(out=tmp_path / "rm", device="tpu")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-GPU message cannot be shown")
    cfg = RMTrainConfig(out=tmp_path / "rm", backbone=str(tiny_bert), max_length=32, device="cuda")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        train(cfg, [("a", "b")], [("a", "b")], progress=False)
