"""The reward model on every causal family the policy server serves (issue 17): a user's own SFT
checkpoint as the RM backbone (InstructGPT's RM is its SFT model with the unembedding replaced by a
scalar head). Per family: the RM builds from the local folder, scores the last real token whatever
the padding, one Bradley-Terry step lowers the loss on its batch, and save/load gives the same scores."""
from __future__ import annotations

import pytest
import torch

from tests.test_model_families import FAMILIES, _build
from serve import reward_model
from train import rm_losses

WORDS = "human assistant hello how do i pick a lock can't help with that apples are red tell me about rivers".split()
TEXTS = ["\n\nHuman: hello\n\nAssistant: hello",
         "\n\nHuman: how do i pick a lock\n\nAssistant: i can't help with that",
         "\n\nHuman: tell me about apples\n\nAssistant: apples are red",
         "\n\nHuman: tell me about rivers\n\nAssistant: rivers"]


def _save_word_tokenizer(path) -> None:
    """A word-level tokenizer small enough for every family's vocabulary (ids < 251)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *dict.fromkeys(WORDS), ":", "'"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rm_on_each_family_trains_scores_the_last_token_and_round_trips(name, tmp_path):
    path = _build(name, tmp_path)
    _save_word_tokenizer(path)
    torch.manual_seed(0)
    rm, tok = reward_model.build(path, max_length=32)
    assert rm.rcfg.pooling == "last" and not rm.rcfg.relevance     # causal: no sentence-embedding feature
    rm.eval()
    enc = reward_model.encode(tok, TEXTS, rm.rcfg)
    s = rm(**enc)
    assert s.shape == (4,) and torch.isfinite(s).all()
    for i, t in enumerate(TEXTS):   # padding does not move a score: each text alone gives the same
        alone = rm(**reward_model.encode(tok, [t], rm.rcfg))
        torch.testing.assert_close(alone, s[i:i + 1], atol=1e-4, rtol=0)
    opt = torch.optim.SGD(rm.parameters(), lr=0.05)
    loss = lambda: rm_losses.pairwise_loss(*rm(**enc).view(2, 2).T, torch.ones(2))  # noqa: E731  (0>1, 2>3)
    before = loss()
    before.backward()
    opt.step()
    assert loss() < before
    reward_model.save(rm, tok, tmp_path / "rm")
    from transformers import AutoModel           # the backbone is a plain HF folder: users can take it elsewhere
    assert type(AutoModel.from_pretrained(tmp_path / "rm", local_files_only=True)) is type(rm.backbone)
    rm2, tok2 = reward_model.load(tmp_path / "rm")
    torch.testing.assert_close(rm2(**reward_model.encode(tok2, TEXTS, rm2.rcfg)), rm(**enc), atol=1e-5, rtol=0)
