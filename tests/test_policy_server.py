"""The policy server over a real gRPC socket, checked against transformers."""
from __future__ import annotations

import math

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM

from rlhf.v1 import policy_pb2 as pb
from serve.client import PolicyClient
from tests.helpers import engine_greedy, metric, start_policy_server

PROMPTS = [[5, 17, 33], [100, 2, 7, 9, 250, 31, 77, 12, 401], [42], [3, 9, 27, 81, 243, 11], list(range(60, 95))]


def _hf(model_path):
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def test_concurrent_greedy_equals_transformers_generate(policy_server):
    target, _, model_path = policy_server
    hf = _hf(model_path)
    n_new = 24
    with PolicyClient(target) as c, ThreadPoolExecutor(len(PROMPTS)) as ex:
        futs = [ex.submit(c.generate, p, temperature=0.0, max_new_tokens=n_new) for p in PROMPTS]
        got = [f.result().completions[0] for f in futs]
    eos = hf.generation_config.eos_token_id
    for p, comp in zip(PROMPTS, got):
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=n_new,
                          pad_token_id=eos)[0, len(p):].tolist()
        assert list(comp.token_ids) == ref, f"prompt {p}"


def test_logprobs_equal_plain_forward(policy_server):
    target, _, model_path = policy_server
    hf = _hf(model_path)
    for temperature in (1.0, 0.7, 0.0):
        with PolicyClient(target) as c:
            r = c.generate(PROMPTS[1], temperature=temperature, max_new_tokens=20, seed=3, return_logprobs=True)
        comp = r.completions[0]
        ids = torch.tensor([PROMPTS[1] + list(comp.token_ids)])
        with torch.no_grad():
            logits = hf(ids).logits[0, len(PROMPTS[1]) - 1:-1]
        t = temperature if temperature > 0 else 1.0
        ref = torch.log_softmax(logits / t, -1).gather(1, torch.tensor(comp.token_ids)[:, None])[:, 0]
        assert len(comp.logprobs) == len(comp.token_ids) == 20
        torch.testing.assert_close(torch.tensor(list(comp.logprobs)), ref, atol=1e-4, rtol=0)


def test_stream_yields_the_unary_tokens(policy_server):
    target = policy_server[0]
    with PolicyClient(target) as c:
        for params in (dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, top_k=50, seed=11)):
            unary = c.generate("Human: What is two plus two?", max_new_tokens=30, return_logprobs=True, **params)
            chunks = list(c.stream("Human: What is two plus two?", max_new_tokens=30, return_logprobs=True, **params))
            toks = [t for ch in chunks for t in ch.token_ids]
            assert toks == list(unary.completions[0].token_ids)
            assert "".join(ch.text_delta for ch in chunks) == unary.completions[0].text
            assert chunks[-1].finish_reason == unary.completions[0].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert {ch.model_version for ch in chunks} == {unary.model_version}
            if "seed" in params:   # the last chunk says the sample's seed, as the unary completion does
                assert chunks[-1].seed == unary.completions[0].seed == params["seed"]
        # unseeded: the seed the last chunk names replays the sample
        chunks = list(c.stream("Human: What is two plus two?", max_new_tokens=12, temperature=1.0))
        replay = c.generate("Human: What is two plus two?", max_new_tokens=12, temperature=1.0, seed=chunks[-1].seed)
        assert [t for ch in chunks for t in ch.token_ids] == list(replay.completions[0].token_ids)


def test_same_seed_same_sample_whatever_the_batch(policy_server):
    target = policy_server[0]
    params = dict(temperature=1.0, top_p=0.95, max_new_tokens=40, seed=1234)
    with PolicyClient(target) as c:
        alone = c.generate(PROMPTS[3], **params).completions[0].token_ids
        with ThreadPoolExecutor(6) as ex:
            others = [ex.submit(c.generate, p, temperature=1.0, max_new_tokens=60, seed=i) for i, p in enumerate(PROMPTS)]
            crowded = ex.submit(c.generate, PROMPTS[3], **params)
            [f.result() for f in others]
        assert list(crowded.result().completions[0].token_ids) == list(alone)
        two = c.generate(PROMPTS[3], n=2, **params)
        assert list(two.completions[0].token_ids) == list(alone)   # sample i uses seed + i
        assert two.completions[0].seed + 1 == two.completions[1].seed
        assert list(two.completions[1].token_ids) != list(alone)


def test_prefill_counter_grows_by_the_prompt_once_per_request(policy_server):
    """An n-sample request prefills its prompt once: rlhf_policy_prefill_tokens_total grows by the
    prompt's length whatever n (read after the response: the prefill step was counted before the next step)."""
    target, mport = policy_server[:2]
    prompt = [7, 300, 41, 19, 88, 2, 150, 61, 9, 410, 33]
    with PolicyClient(target) as c:
        for n in (1, 2, 3):
            before = metric(mport, "rlhf_policy_prefill_tokens_total")
            r = c.generate(prompt, n=n, temperature=1.0, seed=n, max_new_tokens=4, ignore_eos=True)
            assert [len(x.token_ids) for x in r.completions] == [4] * n
            assert metric(mport, "rlhf_policy_prefill_tokens_total") - before == len(prompt), n


def test_a_server_with_prefix_reuse_prefills_only_what_a_conversation_adds(tiny_llama):
    """--prefix-reuse-min-tokens: the second turn of a conversation (its first turn's prompt and
    answer, then more) prefills only the new tokens, and answers as a full prefill does (greedy)."""
    proc, port, mport = start_policy_server(tiny_llama, max_batch_size=4, threads=1, prefix_reuse_min_tokens=4)
    try:
        with PolicyClient(f"127.0.0.1:{port}") as c:
            first = [7, 300, 41, 19, 88, 2, 150, 61, 9, 410, 33]
            a = c.generate(first, temperature=0.0, max_new_tokens=6, ignore_eos=True).completions[0]
            second = first + list(a.token_ids) + [12, 13, 14]
            before = metric(mport, "rlhf_policy_prefill_tokens_total")
            b = c.generate(second, temperature=0.0, max_new_tokens=6, ignore_eos=True).completions[0]
            # the first turn's prompt and 5 of its 6 answer tokens were in the cache (the last sampled
            # token was never fed back): 3 new tokens + that one are prefilled
            assert metric(mport, "rlhf_policy_prefill_tokens_total") - before == 4
        from serve.loader import load_policy
        full, _ = engine_greedy(load_policy(tiny_llama).model, [second], None, 6)[0]
        assert list(b.token_ids) == full
    finally:
        proc.stop()


def test_response_fields_and_stop_sequences(policy_server):
    target = policy_server[0]
    with PolicyClient(target) as c:
        info = c.info()
        r = c.generate("Human: hi", temperature=0.0, max_new_tokens=12, n=3)
        assert r.model_version == info.model_version == "v0"
        assert len({x.response_id for x in r.completions}) == 3
        assert r.usage.prompt_tokens == len(r.prompt_token_ids) > 0
        assert r.usage.completion_tokens == sum(len(x.token_ids) for x in r.completions)
        text = r.completions[0].text
        assert len(text) >= 4, text
        stop = text[2:4]
        s = c.generate("Human: hi", temperature=0.0, max_new_tokens=12, stop=[stop])
        assert s.completions[0].finish_reason == pb.FINISH_REASON_STOP
        assert s.completions[0].text == text[:text.find(stop)]
        assert stop not in s.completions[0].text


def test_a_tiny_positive_temperature_is_greedy(policy_server):
    """logits / 1e-40 overflows float32: the answer must be the greedy one, with finite logprobs."""
    with PolicyClient(policy_server[0]) as c:
        greedy = c.generate("Human: hi", temperature=0.0, max_new_tokens=8, return_logprobs=True).completions[0]
        for t in (1e-40, 1e-30, 1e-6):
            tiny = c.generate("Human: hi", temperature=t, max_new_tokens=8, return_logprobs=True, seed=5).completions[0]
            assert list(tiny.token_ids) == list(greedy.token_ids), t
            assert all(math.isfinite(x) for x in tiny.logprobs) and list(tiny.logprobs) == list(greedy.logprobs)


BAD = [
    (dict(prompt=""), "prompt"),
    (dict(prompt=list(range(1, 1030))), "prompt"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=5000), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=3.4e38), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(n=0), "params.n"),
    (dict(prompt=[1, 2, 10**6]), "token_ids"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f for _, f in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(policy_server, kwargs, field):
    target = policy_server[0]
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "Human: hi")
    with PolicyClient(target) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.generate(prompt, **kwargs)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(c.stream(prompt, **kwargs))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert c.generate("Human: still serving?", max_new_tokens=3).completions[0].token_ids  # keeps serving


def test_health_and_reflection(policy_server):
    target = policy_server[0]
    ch = grpc.insecure_channel(target)
    h = health_pb2_grpc.HealthStub(ch)
    for svc in ("", "rlhf.v1.PolicyService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == health_pb2.HealthCheckResponse.SERVING
    r = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"rlhf.v1.PolicyService", "grpc.health.v1.Health"} <= names
    ch.close()


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_cancel_and_deadline_free_slots_at_once(policy_server):
    target, mport = policy_server[:2]
    slots = 8   # the fixture's max_batch_size
    cancelled = 'rpc="GenerateStream",status="CANCELLED"'   # the series exists after the first cancellation
    with PolicyClient(target, timeout=None) as c:
        before = metric(mport, "rlhf_policy_requests_total", cancelled, default=0.0)
        # cancellation: long streams fill every slot; cancel them after their first tokens
        streams = [c.stream([1, 2, 3], max_new_tokens=1000, temperature=1.0, seed=i, ignore_eos=True)
                   for i in range(slots)]
        for s in streams:
            next(s)
        assert metric(mport, "rlhf_policy_kv_slots_in_use") >= 1
        for s in streams:
            s.cancel()
        assert _wait(lambda: metric(mport, "rlhf_policy_kv_slots_in_use") == 0, 2.0)
        assert _wait(lambda: metric(mport, "rlhf_policy_requests_total", cancelled, default=0.0) - before == slots, 2.0)
        # deadline: the call fails with DEADLINE_EXCEEDED and the slot is freed
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            c.stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]),
                                               params=pb.SamplingParams(max_new_tokens=1000, ignore_eos=True)),
                            timeout=0.3)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0
        assert _wait(lambda: metric(mport, "rlhf_policy_kv_slots_in_use") == 0, 2.0)
        assert c.generate([1, 2], max_new_tokens=5).completions[0].token_ids


def test_queue_full_is_resource_exhausted(tiny_gpt2):
    proc, port, mport = start_policy_server(tiny_gpt2, max_batch_size=1, max_queue=2, max_context=1024,
                                            max_new_tokens_limit=1000, threads=1)
    try:
        codes: list = []
        lock = threading.Lock()

        def call(i):
            with PolicyClient(f"127.0.0.1:{port}", timeout=60) as c:
                try:
                    c.generate([1, 2, 3], max_new_tokens=120, seed=i, ignore_eos=True)   # ~1.5 s on 2 EPYC cores: all 8 arrive meanwhile
                    code = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    code = e.code()
                with lock:
                    codes.append(code)

        with ThreadPoolExecutor(8) as ex:
            list(ex.map(call, range(8)))
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes.count(grpc.StatusCode.OK) >= 3  # one running + two queued at least
        assert metric(mport, "rlhf_policy_requests_total", 'rpc="Generate",status="RESOURCE_EXHAUSTED"') == \
            codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    finally:
        proc.stop()
