"""The one RM training loop (train/rm_update.py) behind the online trainer and train.rm_train: its
decisions by hand, the batch loss sharded and whole, and the configs and flags of both callers."""
from __future__ import annotations

import math

import pytest
import torch

from common.config_cli import parse_config
from serve import reward_model
from train.rm_train import RMTrainConfig, relevance_cosines
from train.rm_update import (Group, RMUpdateConfig, batch_inputs, batch_order, group_loss, lr_factor, rm_steps,
                             train_rm)


def test_lr_factor_constant_and_warmup_decay_by_hand():
    assert [lr_factor(s, 40, "constant") for s in (0, 20, 39)] == [1.0, 1.0, 1.0]
    # 40 steps: warm-up over 40 // 20 = 2 steps, then (40 - s) / 39
    assert [lr_factor(s, 40, "warmup-decay") for s in (0, 1, 2, 39)] == [0.5, 1.0, 38 / 39, 1 / 39]
    assert lr_factor(0, 5, "warmup-decay") == 1.0   # fewer than 20 steps: a warm-up of one step


def test_steps_follow_epochs_and_the_cap():
    cfg = RMUpdateConfig(epochs=2.0, batch_groups=16, max_steps=200)
    assert rm_steps(100, cfg) == 13 and rm_steps(1, cfg) == 1 and rm_steps(10_000, cfg) == 200
    assert rm_steps(10_000, RMUpdateConfig(epochs=2.0, batch_groups=16, max_steps=0)) == 1250   # 0: no cap


def test_batch_order_covers_each_epoch_and_is_seeded():
    groups = [Group((f"t{i}", "x" * (i * 37 % 300))) for i in range(40)]
    cfg = RMUpdateConfig(epochs=2.0, batch_groups=8, max_steps=0)
    batches = batch_order(groups, rm_steps(40, cfg), cfg, seed=3)
    assert [len(b) for b in batches] == [8] * 10
    flat = [i for b in batches for i in b]
    assert sorted(flat[:40]) == sorted(flat[40:]) == list(range(40))   # each epoch a permutation
    assert batch_order(groups, 10, cfg, seed=3) == batches and batch_order(groups, 10, cfg, seed=4) != batches
    # grouped by length: the same groups in each window of 50 batches, batches narrower in length
    by_len = batch_order(groups, 10, RMUpdateConfig(epochs=2.0, batch_groups=8, max_steps=0, group_by_length=True), 3)
    assert sorted(i for b in by_len for i in b) == sorted(flat)
    def spread(bs):
        return sum(max(len(groups[i].texts[1]) for i in b) - min(len(groups[i].texts[1]) for i in b) for b in bs)
    assert spread(by_len) < spread(batches) / 2
    # a batch larger than the data still gets its steps
    assert [len(b) for b in batch_order(groups[:3], 2, cfg, seed=0)] == [8, 8]


def test_group_loss_is_the_mean_of_each_groups_loss_and_shards_add_up():
    groups = [Group(("a", "b")), Group(("a", "b", "c")), Group(("a", "b"), tie=True), Group(("a", "b", "c", "d")),
              Group(("a", "b"))]
    scores = torch.tensor([2.0, -1.0, 0.5, 0.3, 1.2, 0.1, -0.4, 3.0, -2.0, 1.0, 0.0, 0.7, -0.3])
    sizes = [len(g.texts) for g in groups]
    parts = torch.split(scores, sizes)
    alone = torch.stack([group_loss(s, [g]) for s, g in zip(parts, groups)])
    whole = group_loss(scores, groups)
    assert torch.allclose(whole, alone.mean())
    # hand-computed: the tie is the cross-entropy with target 1/2
    d = 0.1 - (-0.4)
    assert alone[2].item() == pytest.approx(-0.5 * (math.log(1 / (1 + math.exp(-d))) + math.log(1 / (1 + math.exp(d)))))
    # the loop's sharding: each rank's mean times its share of the batch sums to the whole batch's mean
    for world in (2, 3):
        cut = [len(groups) * r // world for r in range(world + 1)]
        total = sum(group_loss(torch.cat(parts[cut[r]:cut[r + 1]]), groups[cut[r]:cut[r + 1]])
                    * ((cut[r + 1] - cut[r]) / len(groups)) for r in range(world))
        assert torch.allclose(total, whole)


def test_cached_relevance_cosines_train_as_the_frozen_encoder_does(tiny_bert):
    """train.rm_train passes the cosines computed once; an RM without them runs its frozen encoder
    at each step: the same training either way."""
    texts = [f"\n\nHuman: tell me about {w}\n\nAssistant: {w} is {a}" for w in ("rivers", "apples", "stone", "tea")
             for a in ("nice", "a thing people like")]
    groups = [Group((texts[i], texts[i + 1])) for i in range(0, len(texts), 2)] + [Group(tuple(texts[:3]))]
    cfg = RMUpdateConfig(epochs=2, batch_groups=2, lr=1e-2, head_lr=1e-2, max_length=32)
    torch.manual_seed(0)
    rm, tok = reward_model.build(tiny_bert, 32, dropout=0.0, relevance=True)
    with torch.no_grad():
        rm.relevance_weight.fill_(0.3)
    # rewards enter the loss only as differences: these biases get gradients of 0 up to rounding,
    # which Adam's first step blows up to +-lr (as in the DDP test); the cosines differ by rounding
    rm.head.bias.requires_grad_(False)
    rm.backbone.encoder.layer[-1].output.LayerNorm.bias.requires_grad_(False)
    init = {k: v.clone() for k, v in rm.state_dict().items()}
    cos = relevance_cosines(rm, tok, texts)
    cosines = [cos[[texts.index(t) for t in g.texts]] for g in groups]
    cached = train_rm(rm, tok, groups, cfg, seed=1, progress=False, cosines=cosines)
    trained = {k: v.clone() for k, v in rm.state_dict().items()}
    rm.load_state_dict(init)
    live = train_rm(rm, tok, groups, cfg, seed=1, progress=False)
    assert cached["rm_steps"] == live["rm_steps"] == 5
    assert cached["losses"] == pytest.approx(live["losses"], abs=1e-5)
    for k, v in rm.state_dict().items():
        assert torch.allclose(v, trained[k], atol=1e-5), k
    assert rm.relevance_weight.item() != pytest.approx(0.3)   # and training moved w


def test_rm_train_config_extends_the_trainers_rm_config_and_flags_stay():
    from train.loop import TrainerConfig
    cfg = parse_config(TrainerConfig, ["--rm.lr", "5e-5", "--rm.max-steps", "16", "--rm.batch-groups", "8",
                                       "--rm.max-length", "64", "--rm.parallel", "fsdp"])
    rm = cfg.rm
    assert (rm.lr, rm.max_steps, rm.batch_groups, rm.max_length, rm.parallel) == (5e-5, 16, 8, 64, "fsdp")
    assert cfg.rm.lr_schedule == "constant" and not cfg.rm.group_by_length
    tr = parse_config(RMTrainConfig, ["--out", "x", "--batch-groups", "4", "--no-group-by-length"])
    assert isinstance(tr, RMUpdateConfig) and (tr.batch_groups, tr.group_by_length) == (4, False)
    # the offline recipe's defaults
    assert (tr.epochs, tr.lr, tr.lr_schedule, tr.max_steps) == (2.0, 5e-5, "warmup-decay", 0)
    with pytest.raises(ValueError, match="lr_schedule"):
        RMUpdateConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="holdout"):
        RMTrainConfig(out="x", holdout=1.0)


def test_training_sets_every_dropout_to_the_configured_rate(tiny_bert):
    rm, tok = reward_model.build(str(tiny_bert), 32)   # the backbone's own dropout, 0.1
    drops = [m for m in rm.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.1 for m in drops)
    train_rm(rm, tok, [Group(("a good answer", "a bad one"))], RMUpdateConfig(max_steps=1, dropout=0.0), progress=False)
    assert all(m.p == 0.0 for m in drops)          # no dropout, as TRL's RewardTrainer and train.rm_train
    rm, tok = reward_model.build(str(tiny_bert), 32)
    train_rm(rm, tok, [Group(("a good answer", "a bad one"))], RMUpdateConfig(max_steps=1), progress=False)
    assert all(m.p == 0.1 for m in rm.modules() if isinstance(m, torch.nn.Dropout))   # the trainer's default: as built


def test_more_ranks_than_groups_per_batch_is_refused_on_every_rank(tiny_bert, monkeypatch):
    from train import dist
    monkeypatch.setattr(dist, "world_size", lambda: 2)   # as under torchrun with 2 ranks
    rm, tok = reward_model.build(str(tiny_bert), 32)
    with pytest.raises(ValueError, match="batch_groups=1 gives some of the 2 ranks no group"):
        train_rm(rm, tok, [Group(("a good answer", "a bad one"))], RMUpdateConfig(batch_groups=1), progress=False)


def test_texts_tokenised_once_give_the_inputs_encode_gives_per_batch(tiny_bert):
    rm, tok = reward_model.build(tiny_bert, 24)
    groups = [Group((f"\n\nHuman: tell me about {'rivers ' * i}\n\nAssistant: {'yes ' * (3 * i)}",
                     "\n\nHuman: hi\n\nAssistant: no")) for i in range(1, 7)]
    groups.append(Group(("\n\nHuman: a\n\nAssistant: 1", "\n\nHuman: a\n\nAssistant: 2", "\n\nHuman: a\n\nAssistant: 3")))
    batches = [[6, 0], [5, 2, 1], [3]]
    inputs = batch_inputs(tok, groups, batches, rm.rcfg)
    for b in batches:
        want = reward_model.encode(tok, [t for i in b for t in groups[i].texts], rm.rcfg)
        got = inputs(b)
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
    assert inputs([5])["input_ids"].shape[1] == 24   # truncated at max_length, as encode does


def test_heldout_pairs_are_clustered_by_prompt_as_the_split_sees_it(monkeypatch):
    """"Hello  world" and "hello world" are one prompt to the held-out split (rules.prompt_key), so their
    pairs are one cluster for the gate's standard error, not two independent ones."""
    import train.rm_update as rm_update
    monkeypatch.setattr(rm_update, "score_texts", lambda rm, tok, texts, batch: torch.arange(len(texts), 0, -1.0))
    groups = [Group(("a", "b"), prompt="Hello  world"), Group(("c", "d", "e"), prompt="hello world"),
              Group(("f", "g"), prompt="Other"), Group(("h", "i"), tie=True, prompt="Tied")]
    right, clusters = rm_update.heldout_correctness(None, None, groups)
    assert right.tolist() == [1.0] * 5   # scores fall along each group, best first: every pair right
    assert clusters == ["hello world"] * 4 + ["other"]
