"""serve.engine.Engine without a server: shutdown drains the queue at once and lets running
sequences finish; the n samples of a request share one prefill."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from serve.engine import (DoneEvent, Engine, EngineConfig, ErrorEvent, Finish, Request, SamplingSpec, Sequence,
                          ShuttingDown, TokenEvent)
from serve.loader import load_policy


def test_drain_refuses_waiting_requests_at_once_and_running_ones_finish(tiny_gpt2):
    pol = load_policy(tiny_gpt2, dtype=torch.float32)
    engine = Engine(pol.model, EngineConfig(max_batch_size=1, max_queue=8, max_context=256), pol.eos_id,
                    pol.decode, pol.version).start()
    spec = SamplingSpec(temperature=0.0, max_new_tokens=120, ignore_eos=True)
    try:
        running = engine.submit(Request(prompt=[5, 17, 33], spec=spec))
        assert isinstance(running.events.get(timeout=60), TokenEvent)   # it holds the only slot
        waiting = [engine.submit(Request(prompt=[7, i], spec=spec)) for i in range(3)]
        assert engine.drain() == 3
        for r in waiting:                                            # refused now, not after the grace
            assert r.events.get(timeout=1) == DoneEvent(0, Finish.SHUTDOWN)
            assert r.seqs[0].out == []
        with pytest.raises(ShuttingDown):
            engine.submit(Request(prompt=[1, 2], spec=spec))
        ev = running.events.get(timeout=60)
        while isinstance(ev, TokenEvent):
            ev = running.events.get(timeout=60)
        assert ev == DoneEvent(0, Finish.LENGTH) and len(running.seqs[0].out) == 120
    finally:
        engine.stop()


def _engine(model_dir, on_step=None, **cfg):
    pol = load_policy(model_dir, dtype=torch.float32)
    cfg = {"max_batch_size": 8, "max_queue": 16, "max_context": 256, **cfg}
    return pol, Engine(pol.model, EngineConfig(**cfg), pol.eos_id, pol.decode, pol.version, on_step=on_step)


def _wait_done(reqs: list[Request]) -> None:
    """Blocks until every sequence of every request has its DoneEvent; each must end by length."""
    for r in reqs:
        done = 0
        while done < r.spec.n:
            ev = r.events.get(timeout=60)
            if not isinstance(ev, TokenEvent):
                assert ev == DoneEvent(ev.seq_index, Finish.LENGTH), ev
                done += 1


def _prompt_tokens_per_forward(model) -> list[int]:
    """Records, for each forward of `model`, how many of its tokens were prompt tokens (sequences
    starting at position 0), read from the step layout the model was given."""
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append(sum(n for n, st in zip(args[1].seq_lens, args[1].start_pos) if st == 0)))
    return seen


def test_a_request_prefills_its_prompt_once_whatever_n(tiny_gpt2):
    stats: list[dict] = []
    pol, engine = _engine(tiny_gpt2, on_step=stats.append)
    seen = _prompt_tokens_per_forward(pol.model)
    prompts = {1: [5, 17, 33, 8], 2: [100, 2, 7, 9, 250, 31, 77], 3: [42, 43, 44, 45, 46]}
    reqs = [engine.submit(Request(prompt=p, spec=SamplingSpec(n=n, max_new_tokens=3 + n, seed=n)))
            for n, p in prompts.items()]
    engine.start()
    try:
        _wait_done(reqs)
    finally:
        engine.stop()
    want = sum(map(len, prompts.values()))
    assert sum(seen) == want                              # what the model ran
    assert sum(s["prefill_tokens"] for s in stats) == want  # what the engine reports to the metrics
    for r in reqs:
        assert [len(s.out) for s in r.seqs] == [r.spec.max_new_tokens] * r.spec.n


def test_each_sample_of_n_draws_as_its_seed_would_alone(tiny_gpt2):
    """Samples 1..n-1 reuse sample 0's prompt KV and first logits: each must still produce what a
    request of n=1 with its seed (seed + i) produces, and greedy samples must equal each other."""
    pol, engine = _engine(tiny_gpt2)
    prompt = [100, 2, 7, 9, 250, 31, 77, 12, 401]
    spec = SamplingSpec(temperature=1.0, top_p=0.95, max_new_tokens=40, seed=1234, ignore_eos=True, n=3)
    engine.start()
    try:
        three = engine.submit(Request(prompt=prompt, spec=spec))
        greedy = engine.submit(Request(prompt=prompt, spec=replace(spec, temperature=0.0, n=2)))
        _wait_done([three, greedy])
        alone = [engine.submit(Request(prompt=prompt, spec=replace(spec, n=1, seed=spec.seed + i))) for i in range(3)]
        _wait_done(alone)
    finally:
        engine.stop()
    assert len({tuple(s.out) for s in three.seqs}) == 3
    for s, a in zip(three.seqs, alone):
        assert s.out == a.seqs[0].out
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(a.seqs[0].logprobs), atol=1e-5, rtol=0)
    assert greedy.seqs[0].out == greedy.seqs[1].out and greedy.seqs[0].logprobs == greedy.seqs[1].logprobs


def test_an_n_sample_request_takes_one_prompt_of_prefill_budget(tiny_gpt2):
    """Two n=2 requests of 6-token prompts under a 12-token prefill budget are prefilled in the
    same step (n prefills each would have been 24 tokens: two steps)."""
    pol, engine = _engine(tiny_gpt2, max_prefill_tokens=12)
    seen = _prompt_tokens_per_forward(pol.model)
    reqs = [engine.submit(Request(prompt=[3 + i, 9, 27, 81, 243, 11], spec=SamplingSpec(n=2, max_new_tokens=4)))
            for i in range(2)]
    engine.start()
    try:
        _wait_done(reqs)
    finally:
        engine.stop()
    assert seen[0] == 12 and sum(seen[1:]) == 0, seen


def test_a_failed_prefill_fails_the_admitted_requests_and_serving_goes_on(tiny_gpt2):
    """The sequences admitted into a step whose forward raises get an ErrorEvent each (they must not
    wait forever), and the next request is served."""
    pol, engine = _engine(tiny_gpt2)
    calls = []

    def fail_first(m, args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    pol.model.register_forward_pre_hook(fail_first)
    engine.start()
    try:
        bad = engine.submit(Request(prompt=[5, 17, 33], spec=SamplingSpec(n=2, max_new_tokens=4)))
        evs = [bad.events.get(timeout=60) for _ in range(2)]
        assert sorted(ev.seq_index for ev in evs) == [0, 1]
        assert all(isinstance(ev, ErrorEvent) and "boom" in ev.message for ev in evs), evs
        good = engine.submit(Request(prompt=[5, 17, 33], spec=SamplingSpec(n=2, max_new_tokens=4)))
        _wait_done([good])
    finally:
        engine.stop()


def _layouts(model) -> list[list[tuple[int, int]]]:
    """Records, for each forward of `model`, its (start_pos, new tokens) per sequence."""
    seen: list[list[tuple[int, int]]] = []
    model.register_forward_pre_hook(lambda m, args: seen.append(list(zip(args[1].start_pos, args[1].seq_lens))))
    return seen


def _greedy(model_dir, prompts: list[list[int]], n_new: list[int]) -> list[Sequence]:
    """Sample 0 of each prompt, greedy, on a fresh engine without prefix reuse (the reference)."""
    _, engine = _engine(model_dir)
    engine.start()
    try:
        reqs = [engine.submit(Request(prompt=p, spec=SamplingSpec(temperature=0.0, max_new_tokens=k, ignore_eos=True)))
                for p, k in zip(prompts, n_new)]
        _wait_done(reqs)
    finally:
        engine.stop()
    return [r.seqs[0] for r in reqs]


def test_a_continuing_conversation_reuses_its_kept_prefix(tiny_llama):
    """Two conversations A and C end (A first, so its KV is swapped out of the slot C moves into), then
    both go on (B = A + its answer + a new turn, D likewise): only the new tokens (and A's / C's last
    answer token, never fed) are prefilled, at positions after the kept prefix, and the answers equal
    those of a full prefill."""
    stats: list[dict] = []
    pol, engine = _engine(tiny_llama, on_step=stats.append, prefix_reuse_min_tokens=4)
    seen = _layouts(pol.model)
    greedy = lambda k: SamplingSpec(temperature=0.0, max_new_tokens=k, ignore_eos=True)  # noqa: E731
    a = engine.submit(Request(prompt=[5, 17, 33, 8, 91, 4, 60, 2, 19, 7], spec=greedy(3)))
    c = engine.submit(Request(prompt=[40, 3, 12, 77, 5, 6, 150, 9], spec=greedy(12)))
    engine.start()
    try:
        _wait_done([a, c])
        b_prompt = a.prompt + a.seqs[0].out + [11, 12, 13, 14, 15]
        d_prompt = c.prompt + c.seqs[0].out + [21, 22]
        n_before = len(seen)
        b = engine.submit(Request(prompt=b_prompt, spec=greedy(8)))
        d = engine.submit(Request(prompt=d_prompt, spec=greedy(8)))
        _wait_done([b, d])
    finally:
        engine.stop()
    kept_b, kept_d = len(a.prompt) + 2, len(c.prompt) + 11
    prefill = [(st, n) for step in seen[n_before:] for st, n in step if n > 1]
    assert sorted(prefill) == sorted([(kept_b, len(b_prompt) - kept_b), (kept_d, len(d_prompt) - kept_d)])
    assert sum(s["prefill_tokens"] for s in stats) == len(a.prompt) + len(c.prompt) + len(b_prompt) + len(d_prompt) \
        - kept_b - kept_d
    for got, ref in zip((b.seqs[0], d.seqs[0]), _greedy(tiny_llama, [b_prompt, d_prompt], [8, 8])):
        assert got.out == ref.out
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)


def test_kept_prefixes_do_not_survive_a_weight_swap(tiny_gpt2):
    stats: list[dict] = []
    _, engine = _engine(tiny_gpt2, on_step=stats.append, prefix_reuse_min_tokens=4)
    new = load_policy(tiny_gpt2, dtype=torch.float32)
    with torch.no_grad():
        new.model.embed.weight.mul_(1.5)
    spec = SamplingSpec(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    engine.start()
    try:
        a = engine.submit(Request(prompt=[5, 17, 33, 8, 91, 4, 60, 2], spec=spec))
        _wait_done([a])
        assert engine.swap(new.model, "v1", new.eos_id, new.decode, timeout=60)
        del stats[:]
        b = engine.submit(Request(prompt=a.prompt + a.seqs[0].out + [9, 9], spec=spec))
        _wait_done([b])
    finally:
        engine.stop()
    assert b.model_version == "v1"
    assert sum(s["prefill_tokens"] for s in stats) == len(b.prompt)   # nothing of v0's KV reused


def test_a_hold_drains_the_batch_and_queues_new_requests_until_the_swap(tiny_gpt2):
    """VersionManager holds the engine while it verifies and loads a version: the running batch goes on
    to its end, new requests wait (not refused), and they start on the new version once it is swapped
    in; a refused version releases them onto the old one."""
    _, engine = _engine(tiny_gpt2)
    new = load_policy(tiny_gpt2, dtype=torch.float32)
    spec = SamplingSpec(temperature=0.0, max_new_tokens=40, ignore_eos=True)
    engine.start()
    try:
        running = engine.submit(Request(prompt=[5, 17, 33], spec=spec))
        assert isinstance(running.events.get(timeout=60), TokenEvent)
        engine.hold()
        queued = engine.submit(Request(prompt=[7, 8], spec=spec))
        _wait_done([running])                                    # the batch finishes during the hold
        time.sleep(0.3)
        assert queued.events.empty() and queued.seqs[0].out == []   # ... and nothing new was admitted
        assert engine.swap(new.model, "v1", new.eos_id, new.decode, timeout=60)
        _wait_done([queued])
        assert running.model_version != "v1" and queued.model_version == "v1"
        engine.hold()                                            # a refused version: release, old weights
        later = engine.submit(Request(prompt=[9], spec=spec))
        time.sleep(0.3)
        assert later.seqs[0].out == []
        engine.release()
        _wait_done([later])
        assert later.model_version == "v1"
    finally:
        engine.stop()


def test_cancelled_waiting_requests_do_not_fill_the_queue_also_while_held(tiny_gpt2):
    """A client gone while its request waits behind another (or behind a swap's hold) frees its place
    in the queue at once: the next live request is taken, not refused as QueueFull."""
    pol, engine = _engine(tiny_gpt2, max_batch_size=1, max_queue=3)
    engine.start()
    spec = SamplingSpec(temperature=0.0, max_new_tokens=200, ignore_eos=True)
    try:
        running = engine.submit(Request(prompt=[5, 17, 33], spec=spec))
        assert isinstance(running.events.get(timeout=60), TokenEvent)   # it holds the only slot
        live = engine.submit(Request(prompt=[7, 1], spec=spec))          # waits at the head
        gone = [engine.submit(Request(prompt=[7, i], spec=spec)) for i in (2, 3)]
        for r in gone:
            r.cancel()
        later = engine.submit(Request(prompt=[7, 4], spec=spec))         # was: QueueFull (3 waiting)
        for r in gone:
            assert r.events.get(timeout=5) == DoneEvent(0, Finish.CANCELLED)
        engine.hold()
        for r in (live, later):
            r.cancel()
        more = [engine.submit(Request(prompt=[8, i], spec=spec)) for i in range(3)]   # all three fit
        assert len(more) == 3
        engine.release()
        running.cancel()
        for r in more:
            r.cancel()
    finally:
        engine.stop()


def test_a_swap_that_fails_keeps_the_old_version_whole_and_raises(tiny_gpt2, monkeypatch):
    import serve.engine as engine_mod
    pol = load_policy(tiny_gpt2, dtype=torch.float32)
    bf16 = load_policy(tiny_gpt2, dtype=torch.bfloat16)   # another dtype: the swap needs a new cache
    engine = Engine(pol.model, EngineConfig(max_batch_size=2, max_queue=4, max_context=64), pol.eos_id,
                    pol.decode, pol.version).start()

    def no_memory(*a, **k):
        raise RuntimeError("out of memory")
    try:
        monkeypatch.setattr(engine_mod, "KVCache", no_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.swap(bf16.model, "v-new", bf16.eos_id, bf16.decode, timeout=30)
        assert engine.model_version == pol.version and engine.dtype == torch.float32 and engine.model is pol.model
        r = engine.submit(Request(prompt=[5, 17], spec=SamplingSpec(temperature=0.0, max_new_tokens=3, ignore_eos=True)))
        _wait_done([r])   # still serving, not held
        assert r.model_version == pol.version
    finally:
        engine.stop()
