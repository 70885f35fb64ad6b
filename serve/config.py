"""Configurations of the serve commands: the policy server (python -m serve), the RM server
(serve.rm_server) and serve.make_policy. The command lines are generated from them (common/config_cli.py);
they are kept free of torch and transformers, so that `--help` and a bad flag are answered before those
are imported (3-7 s on 2 EPYC cores otherwise)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.auth_options import AuthOptions
from common.data import HH_PAIRS
from common.net import check_ports

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ServerConfig(AuthOptions):
    """Serve a causal LM over gRPC with continuous batching (rlhf.v1.PolicyService)."""

    model: Path = REPO / "models" / "policy-v0"
    """Local Hugging Face checkpoint folder of a family serve.model.SUPPORTED names (GPT-2, Llama, Mistral,
    Qwen2, Qwen3, GPT-NeoX), tokenizer included."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 50051
    """gRPC port (0 picks a free one; the chosen port is printed)."""
    metrics_port: int = 9101
    """Prometheus /metrics HTTP port (0 disables)."""
    max_batch_size: int = 32
    """Sequences decoded together at most (KV-cache slots)."""
    max_queue: int = 64
    """Requests waiting for a slot at most; more get RESOURCE_EXHAUSTED."""
    max_context: int = 512
    """Prompt plus generated tokens per sequence at most (capped by the model's positions)."""
    max_new_tokens_limit: int = 256
    """Largest max_new_tokens a request may ask for."""
    default_max_new_tokens: int = 64
    """max_new_tokens when a request leaves it unset."""
    max_prefill_tokens: int = 4096
    """Prompt tokens prefilled in one engine step at most."""
    prefix_reuse_min_tokens: int = 0
    """Prefix reuse (0: off): a finished response's KV stays in its freed slot, and a new prompt that
    starts with at least this many of those tokens (the same conversation going on) copies them
    instead of prefilling them. Off by default: outputs then equal a full prefill's to rounding
    (~1e-6 in logprobs), not bit for bit (serve/engine.py)."""
    max_stop_sequences: int = 8
    """Stop sequences per request at most."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    dtype: str = "float32"
    """Weights and KV cache dtype: float32 or bfloat16."""
    device: str = "cpu"
    """Where the weights and KV cache live: cpu, cuda or cuda:N (CUDA tensors go to the Triton kernels)."""
    cpu_pack: str = "all"
    """On CPU fp32, prepack these Linear weights for oneDNN: all, lm_head or none (none: torch's F.linear, MKL)."""
    quantize: str = "none"
    """none, or int8: every Linear (lm_head included) as torch.ao's dynamic int8 Linear, per-channel int8
    weights and per-call int8 activations (serve/quantize.py); CPU and float32 only. Logprobs move by
    ~0.015 nats on average on the default policy (bench/dtype_parity.py --compare int8)."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    kafka_bootstrap: str = ""
    """Kafka bootstrap servers to log every served generation to the interactions topic ("" disables)."""
    store: str = ""
    """Model store to serve from (overrides --model): its newest verified version is served, and with --kafka-bootstrap the server follows the model-updates topic and hot-swaps new versions."""
    served_score_fraction: float = 0.0
    """Fraction of served responses scored off the request path for served reward (needs --rm-target) and served KL to the reference policy (0 disables)."""
    reference: str = ""
    """Reference (initial) policy for served KL ("": the model store's v0000/policy when --store is set)."""
    rm_target: str = ""
    """host:port of the RM server, or of its replicas comma-separated (round robin), for served reward ("" disables)."""
    rm_token_file: str = ""
    """File holding the token served scoring presents to an RM server that checks tokens (a client-role token of its --auth-tokens file; "" sends none)."""
    rm_tls_ca: str = ""
    """CA certificate (PEM) to verify an RM server that serves TLS (its --tls-cert) against ("": plaintext to the RM server)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.served_score_fraction <= 1:
            raise ValueError("served_score_fraction must be in [0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.cpu_pack not in ("lm_head", "all", "none"):
            raise ValueError(f"cpu_pack must be lm_head, all or none, got {self.cpu_pack!r}")
        if self.quantize not in ("none", "int8"):
            raise ValueError(f"quantize must be none or int8, got {self.quantize!r}")
        if self.quantize == "int8" and (self.device != "cpu" or self.dtype != "float32"):
            raise ValueError(f"quantize int8 runs on CPU in float32 only, got device {self.device!r}, "
                             f"dtype {self.dtype!r}")
        check_ports(port=self.port, metrics_port=self.metrics_port)
        for k in ("max_batch_size", "max_queue", "max_context", "max_new_tokens_limit", "default_max_new_tokens",
                  "max_prefill_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")
        if self.max_stop_sequences < 0 or self.threads < 0 or self.max_message_bytes < 1024:
            raise ValueError("max_stop_sequences and threads must be >= 0, max_message_bytes >= 1024")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must be <= max_new_tokens_limit")
        if self.rm_tls_ca and not Path(self.rm_tls_ca).is_file():
            raise ValueError(f"rm_tls_ca: no such file {self.rm_tls_ca!r}")


@dataclass(frozen=True)
class RMServerConfig(AuthOptions):
    """Serve the reward model of the model store over gRPC."""

    store: str = "models/store"
    """Model store: the newest verified version's rm/ folder is served."""
    host: str = "127.0.0.1"
    """Address to bind."""
    port: int = 50052
    """gRPC port (0: any free port)."""
    metrics_port: int = 9103
    """Prometheus /metrics port (0 disables)."""
    kafka_bootstrap: str = ""
    """Kafka bootstrap servers: follow the model-updates topic and hot-swap ("" disables)."""
    max_items: int = 64
    """Pairs per Score call at most."""
    max_text_chars: int = 20000
    """Characters per prompt or response at most."""
    batch: int = 32
    """Texts per forward pass."""
    threads: int = 0
    """torch intra-op threads (0: torch's default)."""
    dtype: str = "float32"
    """Weights dtype: float32 or bfloat16 (AVX-512 BF16 through oneDNN on CPU, or CUDA); scores are returned as fp32."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_items < 1 or self.batch < 1 or self.max_text_chars < 1:
            raise ValueError("max_items, batch and max_text_chars must be >= 1")
        check_ports(port=self.port, metrics_port=self.metrics_port)
        if self.threads < 0:
            raise ValueError("threads must be >= 0 (0: torch's default)")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")


# (n_layer, d_model, n_head, n_positions); vocab from the tokenizer unless model_vocab_size is set
SIZES = {
    "tiny": (2, 64, 4, 1024),
    "small": (4, 256, 4, 512),
    "gpt2-small": (12, 768, 12, 1024),
}


@dataclass(frozen=True)
class PolicySpec:
    """Build a local policy checkpoint (tokenizer + randomly initialised causal LM)."""

    out: Path
    """Folder to write the checkpoint into (created; an existing one must be empty)."""
    arch: str = "gpt2"
    """Model family: gpt2 or llama."""
    size: str = "small"
    """Preset: tiny, small or gpt2-small."""
    vocab_size: int = 4096
    """Tokenizer vocabulary size (byte-level BPE)."""
    model_vocab_size: int = 0
    """Embedding rows if larger than the tokenizer's (0: the tokenizer's size)."""
    corpus: Path = HH_PAIRS
    """JSONL (hh-rlhf style, fields chosen/rejected) or plain text to train the tokenizer on ("builtin": a six-line built-in text, for tests)."""
    seed: int = 0
    """Seed of the random initialisation."""
    version: str = "v0"
    """Model version written to manifest.json."""

    def __post_init__(self) -> None:
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"arch must be gpt2 or llama, got {self.arch!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be >= 300 (256 bytes + merges + specials)")
