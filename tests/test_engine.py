"""serve.engine.Engine without a server: shutdown drains the queue at once and lets running
sequences finish."""
from __future__ import annotations

import pytest
import torch

from serve.engine import DoneEvent, Engine, EngineConfig, Finish, Request, SamplingSpec, ShuttingDown, TokenEvent
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
