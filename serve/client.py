"""A small Python client for the policy server.

    from serve.client import PolicyClient
    with PolicyClient("127.0.0.1:50051") as c:      # or "127.0.0.1:50051,127.0.0.1:50052": replicas, round robin
        r = c.generate("Human: hi\\n\\nAssistant:", max_new_tokens=32, temperature=0.7, seed=1)
        r = c.generate([{"role": "user", "content": "hi"}])   # through the model's chat template
        print(r.model_version, r.prompt_text, r.completions[0].text)

    python -m serve.client --target 127.0.0.1:50051 --prompt "Human: hi"   (see --help)
    python -m serve.client --target 127.0.0.1:50051,127.0.0.1:50052 --prompt "Human: hi"
    python -m serve.client --message "system:Be brief." "user:What is RLHF?"
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from common.config_cli import parse_config
from common.replicas import replica_channel
from protos.build import ensure_generated

ensure_generated()
from rlhf.v1 import policy_pb2 as pb  # noqa: E402
from rlhf.v1 import policy_pb2_grpc as pb_grpc  # noqa: E402


Prompt = str | list[int] | list[dict[str, str]]
"""Raw text, token ids, or a conversation: [{"role": "user", "content": "..."}, ...]."""


def make_request(prompt: Prompt, **params) -> pb.GenerateRequest:
    stop = params.pop("stop", ())
    p = pb.SamplingParams(stop=list(stop), **params)
    if isinstance(prompt, str):
        return pb.GenerateRequest(text=prompt, params=p)
    if prompt and isinstance(prompt[0], dict):
        return pb.GenerateRequest(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt],
                                  params=p)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(prompt)), params=p)


def parse_message(arg: str) -> dict[str, str]:
    """One --message: "role:content" -> {"role": role, "content": content}; the content may hold colons."""
    role, sep, content = arg.partition(":")
    if not sep:
        raise ValueError(f"--message {arg!r}: expected role:content, e.g. user:hello")
    return {"role": role.strip(), "content": content}


class PolicyClient:
    def __init__(self, target: str, timeout: float | None = 60.0, metadata: tuple = (), tls_ca: str = ""):
        """target: one policy server, or replicas "h:p,h:p" balanced round robin (common/replicas.py);
        metadata: e.g. common.auth.bearer(token); tls_ca: verify the servers' TLS against this CA."""
        self.channel = replica_channel(target, tls_ca)
        self.stub = pb_grpc.PolicyServiceStub(self.channel)
        self.timeout, self.metadata = timeout, metadata

    def generate(self, prompt: Prompt, **params) -> pb.GenerateResponse:
        return self.stub.Generate(make_request(prompt, **params), timeout=self.timeout, metadata=self.metadata)

    def stream(self, prompt: Prompt, **params):
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
    """Send one prompt or conversation to a policy server and print the completions."""

    prompt: str = ""
    """Prompt text, sent as it is (or give --message)."""
    message: tuple[str, ...] = ()
    """A conversation instead of --prompt, rendered by the model's chat template: role:content ..., roles
    system, user, assistant (e.g. --message "user:What is RLHF?")."""
    target: str = "127.0.0.1:50051"
    """host:port of the policy server, or of its replicas comma-separated (calls go round robin)."""
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

    def __post_init__(self) -> None:
        if bool(self.prompt) == bool(self.message):
            raise ValueError("give either --prompt or --message")
        if not self.target.strip():
            raise ValueError("--target: give host:port (or several, comma-separated)")
        for m in self.message:
            parse_message(m)


def main(argv: list[str] | None = None) -> None:
    a = parse_config(ClientArgs, argv, prog="python -m serve.client")
    try:
        ask(a)
    except grpc.RpcError as e:   # the server's answer (or the channel's): one line, exit 1
        raise SystemExit(f"python -m serve.client: {e.code().name}: {e.details()}") from e


def ask(a: ClientArgs) -> None:
    """One Generate (or GenerateStream) call, its completions printed."""
    params = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, n=a.n,
                  seed=a.seed, return_logprobs=True)
    prompt = [parse_message(m) for m in a.message] if a.message else a.prompt
    with PolicyClient(a.target) as c:
        if a.stream:
            for ch in c.stream(prompt, **params):
                print(ch.text_delta, end="", flush=True)
            print()
            return
        r = c.generate(prompt, **params)
        if a.message:
            print(f"[prompt as served] {r.prompt_text!r}")
        for comp in r.completions:
            print(f"[{r.model_version} {comp.response_id[:8]} {pb.FinishReason.Name(comp.finish_reason)}] "
                  f"{comp.text!r} (mean logprob {sum(comp.logprobs) / max(1, len(comp.logprobs)):.3f})")


if __name__ == "__main__":
    main()
