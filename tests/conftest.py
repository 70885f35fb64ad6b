from __future__ import annotations

import os
from pathlib import Path

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from protos.build import ensure_generated

ensure_generated()

from tests.helpers import start_policy_server  # noqa: E402


def _build(root: Path, arch: str) -> Path:
    from serve.make_policy import PolicySpec, build
    return build(PolicySpec(out=root / f"tiny-{arch}", arch=arch, size="tiny", vocab_size=512,
                            corpus=Path("builtin"), seed=0))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("models"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("models"), "llama")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def policy_server(request, tiny_gpt2, tiny_llama):
    """A real policy server process per architecture: (target, metrics_port, model_path)."""
    model = tiny_gpt2 if request.param == "gpt2" else tiny_llama
    proc, port, mport = start_policy_server(model, max_batch_size=8, max_queue=64, max_context=1024,
                                            max_new_tokens_limit=1000, default_max_new_tokens=16, threads=1)
    yield f"127.0.0.1:{port}", mport, model
    proc.stop()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT (random init) with MiniLM's WordPiece tokenizer: a fast RM backbone."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from serve import reward_model
    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(out)
    AutoTokenizer.from_pretrained(reward_model.default_backbone()).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_hh_policy(tmp_path_factory) -> Path:
    """A tiny GPT-2 whose 1024-token BPE is trained on the hh dialogues (real words to learn from)."""
    from serve.make_policy import PolicySpec, build
    return build(PolicySpec(out=tmp_path_factory.mktemp("models") / "tiny-hh", size="tiny", vocab_size=1024))


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_hh_policy, tiny_bert) -> Path:
    """A model store holding v0000 (tiny policy + tiny RM), as the trainer bootstraps it."""
    from common.model_store import ModelStore
    from train.loop import TrainerConfig, bootstrap_store
    root = tmp_path_factory.mktemp("store")
    bootstrap_store(TrainerConfig(init_policy=tiny_hh_policy, rm_backbone=str(tiny_bert)), ModelStore(root))
    return root


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """The bundled Kafka broker (KRaft, single node) on free loopback ports: its bootstrap string."""
    from feedback.broker import BrokerConfig, start, stop
    from feedback.topics import ensure_topics
    from tests.helpers import free_port

    cfg = BrokerConfig(data_dir=tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port())
    start(cfg)
    ensure_topics(cfg.bootstrap)
    yield cfg.bootstrap
    stop(cfg)


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory):
    """Three bundled Kafka nodes (KRaft, each broker and controller voter, 256 MB heap) on free loopback
    ports, with the project's topics: its BrokerConfig, so a test can kill and restart nodes. Per module:
    idle, the three nodes still take a quarter of a core (replica fetchers, the quorum's heartbeats), which
    every later test in a session would share the machine with."""
    from feedback.broker import BrokerConfig, start, stop
    from feedback.topics import ensure_topics

    cfg = BrokerConfig.on_free_ports(tmp_path_factory.mktemp("kafka-cluster"), brokers=3, heap="256m")
    start(cfg)
    try:
        ensure_topics(cfg.bootstrap)   # replication from the live brokers the cluster reports
        yield cfg
    finally:
        stop(cfg)


@pytest.fixture(scope="session")
def acked_event_ids():
    """Every feedback event id the service acknowledged in this session (the topics are shared)."""
    return set()
