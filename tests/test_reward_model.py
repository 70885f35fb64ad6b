"""The reward model learns a synthetic preference on tiny backbones; save/load/eval round trip."""
from __future__ import annotations

import json
import random

import pytest
import torch

from serve import reward_model
from train.pairs_data import read_pairs, split
from train import rm_eval
from train.rm_eval import evaluate
from train.rm_train import RMTrainConfig, relevance_cosines, train

WORDS = "apple river stone cloud music paper garden window silver coffee mountain letter".split()


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Chosen answers end politely, rejected ones rudely: a preference a small model must learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        base = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
        prompt = f"Human: tell me about {base}\n\nAssistant: {base}"
        out.append((f"{prompt}, thank you kindly", f"{prompt}, go away now"))
    return out




@pytest.mark.parametrize("which", ["bert", "gpt2"])
def test_rm_learns_a_synthetic_preference(which, tiny_bert, tiny_gpt2, tmp_path):
    backbone = tiny_bert if which == "bert" else tiny_gpt2
    tr, te = split(synthetic_pairs(300), 0.2, seed=0)
    cfg = RMTrainConfig(out=tmp_path / "rm", backbone=str(backbone), max_length=48, epochs=3, batch_groups=16,
                        lr=1e-3, head_lr=3e-3)
    rm, tok, m = train(cfg, tr, te, progress=False)
    assert rm.rcfg.pooling == ("mean" if which == "bert" else "last")
    assert m["accuracy"] > 0.9, m
    assert abs(m["mean_reward"]) < 1e-4   # normalised: mean 0 over the reference (held-out) texts
    reward_model.save(rm, tok, tmp_path / "rm", extra={"metrics": m})
    rm2, tok2 = reward_model.load(tmp_path / "rm")
    assert evaluate(rm2, tok2, te)["accuracy"] == m["accuracy"]


def test_left_truncation_keeps_the_last_turn(tiny_bert):
    tok = reward_model.load_tokenizer(tiny_bert, 16)
    ids = tok("a " * 100 + "the final answer", truncation=True, max_length=16)["input_ids"]
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.endswith("the final answer")


def test_pair_encoding_keeps_the_last_human_turn_and_the_start_of_the_response(tiny_bert):
    tok = reward_model.load_tokenizer(tiny_bert, 32)
    long_dialogue = "\n\nHuman: " + "old words " * 40 + "how do I pick a lock?\n\nAssistant:"
    long_answer = " sorry I cannot help with that " + "filler text " * 40
    enc = reward_model.encode(tok, [long_dialogue + long_answer, "\n\nHuman: hi\n\nAssistant: hello"],
                               reward_model.RewardConfig(pooling="mean", max_length=32))
    ids, types, mask = enc["input_ids"][0], enc["token_type_ids"][0], enc["attention_mask"]
    assert ids.shape[0] == 32 and mask[0].sum() == 32 and mask[1].sum() < 32   # cut to the budget; short one padded
    prompt = tok.decode(ids[types == 0], skip_special_tokens=True)
    answer = tok.decode(ids[types == 1], skip_special_tokens=True)
    assert prompt.endswith("pick a lock? assistant :"), prompt    # the dialogue keeps its end
    assert answer.startswith("sorry i cannot help with that"), answer         # the response keeps its start
    assert (types == 1).sum() >= (32 - 3) * 3 // 4                           # and at least 3/4 of the budget
    short = tok.decode(enc["input_ids"][1][enc["attention_mask"][1] == 1], skip_special_tokens=True)
    assert short == "human : hi assistant : hello"                            # nothing cut when it fits


def test_last_human_turn():
    d, a = reward_model.split_dialogue("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how do I pick a lock?"
                                       "\n\nAssistant: I can't help")
    assert reward_model.last_human_turn(d) == "how do I pick a lock?" and a == " I can't help"
    assert reward_model.last_human_turn("no turns here") == "no turns here"


def test_relevance_feature_is_the_frozen_encoders_cosine(tiny_bert, tmp_path):
    torch.manual_seed(0)
    rm, tok = reward_model.build(tiny_bert, 32, relevance=True)
    plain = reward_model.RewardModel(rm.backbone, reward_model.RewardConfig(pooling="mean", max_length=32)).eval()
    plain.head = rm.head
    texts = ["\n\nHuman: tell me about apples\n\nAssistant: apples are red",
             "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me about rivers\n\nAssistant: no"]
    enc = reward_model.encode(tok, texts, rm.rcfg)
    base = plain(**{k: v for k, v in enc.items() if not k.startswith("rel_")})
    rm.eval()
    assert torch.allclose(rm(**enc), base)                      # w starts at 0: the plain RM
    # by hand: each text alone through the pristine encoder, mean-pooled, cosine
    def emb(t):
        b = tok(t, return_tensors="pt")
        return rm.relevance_encoder(**b).last_hidden_state[0].mean(0)
    cos = torch.stack([torch.cosine_similarity(emb(q), emb(a), dim=0)
                       for q, a in [("tell me about apples", "apples are red"), ("tell me about rivers", "no")]])
    with torch.no_grad():
        rm.relevance_weight.fill_(0.5)
    assert torch.allclose(rm(**enc), base + 0.5 * 20 * cos, atol=1e-5)
    # the cached path (rm_train computes the frozen cosines once) gives the same
    cached = relevance_cosines(rm, tok, texts[::-1] + texts, batch=3)   # length-sorted batches
    assert torch.allclose(cached, torch.cat([cos.flip(0), cos]), atol=1e-5)
    plain_enc = reward_model.encode(tok, texts, reward_model.RewardConfig(pooling="mean", max_length=32))
    assert torch.allclose(rm(**plain_enc, rel_cos=cached[2:]), rm(**enc), atol=1e-5)
    # training moves the backbone and w, never the frozen copy; save/load keeps all of it
    frozen = {k: v.clone() for k, v in rm.relevance_encoder.state_dict().items()}
    opt = torch.optim.SGD([*rm.backbone.parameters(), *rm.head_parameters()], lr=0.1)
    rm.train()
    assert not rm.relevance_encoder.training
    rm(**enc).sum().backward()
    assert rm.relevance_weight.grad is not None
    opt.step()
    assert all(torch.equal(v, rm.relevance_encoder.state_dict()[k]) for k, v in frozen.items())
    assert not torch.equal(rm.backbone.embeddings.word_embeddings.weight, rm.relevance_encoder.embeddings.word_embeddings.weight)
    rm.eval()
    reward_model.save(rm, tok, tmp_path / "rm")
    rm2, tok2 = reward_model.load(tmp_path / "rm")
    assert rm2.rcfg.relevance and rm2.relevance_weight.item() == rm.relevance_weight.item()
    assert torch.allclose(rm2(**reward_model.encode(tok2, texts, rm2.rcfg)), rm(**enc), atol=1e-5)
    rm2.rcfg.offset, rm2.rcfg.gain = 0.25, 2.0   # the RM server's path: (prompt, response) -> gain * (raw - offset)
    from serve.rm_server import LoadedRM, score
    got = score(LoadedRM(rm2, tok2, "v0001"), [(texts[0].rsplit(" apples are", 1)[0], "apples are red", False)], 8)
    assert abs(got[0] - 2.0 * (rm(**enc)[0].item() - 0.25)) < 1e-4
    reward_model.save(rm2, tok2, tmp_path / "rm-norm")     # the normalisation travels with the RM
    assert reward_model.load(tmp_path / "rm-norm")[0].rcfg.gain == 2.0
    with pytest.raises(ValueError, match="relevance"):
        rm2(**{k: v for k, v in enc.items() if not k.startswith("rel_")})


def test_relevance_is_off_for_causal_backbones(tiny_gpt2):
    rm, _ = reward_model.build(tiny_gpt2, 32, relevance=True)
    assert not rm.rcfg.relevance and not hasattr(rm, "relevance_encoder")


def test_group_by_length_keeps_every_pair_once():
    from train.rm_update import group_by_length
    g = torch.Generator().manual_seed(0)
    lengths = [random.Random(i).randint(10, 2000) for i in range(400)]
    batches = [list(range(i, i + 8)) for i in range(0, 400, 8)]
    out = group_by_length(batches, lengths, cap=1000, g=g, window=25)
    assert sorted(i for b in out for i in b) == list(range(400)) and [len(b) for b in out] == [8] * 50
    # within a window, batches span a narrower length range than random ones
    spread = lambda bs: sum(max(min(lengths[i], 1000) for i in b) - min(min(lengths[i], 1000) for i in b) for b in bs)  # noqa: E731
    assert spread(out) < spread(batches) / 3
    # pairs stay inside their window of 25 batches (200 pairs)
    assert all(set(b) <= set(range(200)) for b in out[:25])


def test_eval_command_prints_json_last(tiny_bert, tmp_path, capsys):
    tr, te = split(synthetic_pairs(60, seed=1), 0.5, seed=0)
    rm, tok, _ = train(RMTrainConfig(out=tmp_path / "rm", backbone=str(tiny_bert), max_length=32, epochs=1,
                                     batch_groups=8), tr, te, progress=False)
    want = evaluate(rm, tok, te)
    assert want["accuracy"] > 0.6, want     # above chance: a swapped chosen/rejected would read below 0.5
    reward_model.save(rm, tok, tmp_path / "rm")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"chosen": c, "rejected": r}) + "\n" for c, r in te))
    rm_eval.main(["--rm", str(tmp_path / "rm"), "--data", str(data)])   # in process: its imports are the test's
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # the command, reading the saved RM and the file, reports what evaluate() computed in process
    assert res["pairs"] == len(te) and res["accuracy"] == pytest.approx(want["accuracy"]), (res, want)
    assert res["mean_margin"] == pytest.approx(want["mean_margin"], abs=1e-5)
    assert len(read_pairs(data)) == len(te)


def test_bad_pairs_file_is_a_clear_error(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"chosen": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_pairs(p)
