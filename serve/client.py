"""A small Python client for the policy server.

    from serve.client import PolicyClient
    with PolicyClient("127.0.0.1:50051") as c:
        r = c.generate("Human: hi\\n\\nAssistant:", max_new_tokens=32, temperature=0.7, seed=1)
        print(r.model_version, r.completions[0].text)

    python -m serve.client --target 127.0.0.1:50051 --prompt "Human: hi"   (see --help)
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from protos.build import ensure_generated

ensure_generated()
from rlhf.v1 import policy_pb2 as pb  # noqa: E402
from rlhf.v1 import policy_pb2_grpc as pb_grpc  # noqa: E402


def make_request(prompt: str | list[int], **params) -> pb.GenerateRequest:
    stop = params.pop("stop", ())
    p = pb.SamplingParams(stop=list(stop), **params)
    if isinstance(prompt, str):
        return pb.GenerateRequest(text=prompt, params=p)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(prompt)), params=p)


class PolicyClient:
    def __init__(self, target: str, timeout: float | None = 60.0, metadata: tuple = ()):
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.PolicyServiceStub(self.channel)
        self.timeout, self.metadata = timeout, metadata

    def generate(self, prompt: str | list[int], **params) -> pb.GenerateResponse:
        return self.stub.Generate(make_request(prompt, **params), timeout=self.timeout, metadata=self.metadata)

    def stream(self, prompt: str | list[int], **params):
        return self.stub.GenerateStream(make_request(prompt, **params), timeout=self.timeout, metadata=self.metadata)

    def info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self.metadata)

    def wait_ready(self, timeout: float = 60.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ClientArgs:
    """Send one prompt to a policy server and print the completions."""

    prompt: str
    """Prompt text."""
    target: str = "127.0.0.1:50051"
    """host:port of the policy server."""
    max_new_tokens: int = 32
    """New tokens at most."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = 0
    """0 disables top-k."""
    n: int = 1
    """Samples."""
    seed: int = 0
    """Seed of sample 0 (sample i uses seed + i)."""
    stream: bool = False
    """Print tokens as they arrive."""


def main(argv: list[str] | None = None) -> None:
    from common.config_cli import parse_config
    a = parse_config(ClientArgs, argv, prog="python -m serve.client")
    params = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, n=a.n,
                  seed=a.seed, return_logprobs=True)
    with PolicyClient(a.target) as c:
        if a.stream:
            for ch in c.stream(a.prompt, **params):
                print(ch.text_delta, end="", flush=True)
            print()
            return
        r = c.generate(a.prompt, **params)
        for comp in r.completions:
            print(f"[{r.model_version} {comp.response_id[:8]} {pb.FinishReason.Name(comp.finish_reason)}] "
                  f"{comp.text!r} (mean logprob {sum(comp.logprobs) / max(1, len(comp.logprobs)):.3f})")


if __name__ == "__main__":
    main()
