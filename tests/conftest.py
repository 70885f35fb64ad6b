from __future__ import annotations

from pathlib import Path

import pytest

from protos.build import ensure_generated

ensure_generated()

from tests.helpers import start_policy_server  # noqa: E402


def _build(root: Path, arch: str) -> Path:
    from serve.make_policy import PolicySpec, build
    return build(PolicySpec(out=root / f"tiny-{arch}", arch=arch, size="tiny", vocab_size=512,
                            corpus=Path("/nonexistent"), seed=0))


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
