"""serve.loader.model_from_checkpoint (the hot swap's load, issue 20) against the transformers route
it replaces, from_hf(AutoModelForCausalLM.from_pretrained(path)): the same parameters and buffers,
bit for bit and dtype for dtype, for every model family, in fp32 and bf16, from one file, from
shards, and from a folder whose weights are not safetensors."""
from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from serve.loader import model_from_checkpoint
from serve.model import from_hf
from tests.test_model_families import FAMILIES, _build


def _reference(path, dtype: torch.dtype):
    return from_hf(AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True))


def _assert_same(ours, ref) -> None:
    for what in ("state_dict", "named_buffers"):
        a, b = dict(getattr(ours, what)()), dict(getattr(ref, what)())
        assert a.keys() == b.keys(), what
        for k in a:
            assert a[k].device.type == "cpu" and a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
    assert not ours.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["gpt2", *FAMILIES])
def test_same_model_as_transformers_route(family, dtype, tiny_gpt2, tmp_path_factory):
    path = tiny_gpt2 if family == "gpt2" else _build(family, tmp_path_factory.mktemp("ckpt"))
    _assert_same(model_from_checkpoint(path, dtype), _reference(path, dtype))


def test_sharded_checkpoint_reads_every_shard(tmp_path):
    src = _build("qwen2", tmp_path)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    _assert_same(model_from_checkpoint(sharded, torch.float32), _reference(src, torch.float32))


def test_folder_without_safetensors_goes_through_transformers(tmp_path):
    src = _build("llama3", tmp_path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(src / "config.json", legacy)
    torch.save(AutoModelForCausalLM.from_pretrained(src).state_dict(), legacy / "pytorch_model.bin")
    _assert_same(model_from_checkpoint(legacy, torch.float32), _reference(src, torch.float32))


def test_checkpoint_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    path = _build("mistral", tmp_path)
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing.*up_proj"):
        model_from_checkpoint(path, torch.float32)


def test_own_memory_copies_only_file_views_and_keeps_tied_names_one_tensor():
    from serve.loader import own_memory
    in_file, converted = torch.arange(6.0), torch.ones(3)
    sd = {"embed.weight": in_file, "lm_head.weight": in_file, "blocks.0.ln1.weight": converted}
    out = own_memory(sd, {in_file.untyped_storage().data_ptr()})
    assert out["embed.weight"] is out["lm_head.weight"]
    assert out["embed.weight"].untyped_storage().data_ptr() != in_file.untyped_storage().data_ptr()
    assert torch.equal(out["embed.weight"], in_file)
    assert out["blocks.0.ln1.weight"] is converted


def test_random_initialisers_are_off_only_inside_no_random_init():
    from serve.loader import RANDOM_INITS, no_random_init
    before = {name: getattr(torch.nn.init, name) for name in RANDOM_INITS}
    t = torch.zeros(4, 4)
    with pytest.raises(RuntimeError), no_random_init():
        assert torch.nn.init.normal_(t) is t and torch.nn.init.kaiming_uniform_(t) is t
        assert torch.equal(t, torch.zeros(4, 4))          # untouched
        raise RuntimeError("a failed build restores them too")
    assert {name: getattr(torch.nn.init, name) for name in RANDOM_INITS} == before
    assert torch.nn.init.normal_(t).abs().sum() > 0      # random again
