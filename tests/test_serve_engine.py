"""The continuous-batching engine (gpt2fast.serve.engine) and its per-slot sampling (gpt2fast.serve.slots).

A tiny model with a 97-token vocab keeps every step in milliseconds.  The CUDA-graph path is covered here only
through its plumbing (a stand-in capture on CPU); graph replay on a GPU is unverified.
"""

from __future__ import annotations

import threading

import pytest
import torch
from test_cuda_graph import CFG, fake_capture, tiny_gpt2  # a varied tiny model; CUDA-graph capture's stand-in

from gpt2fast import GPT2, cuda_graph
from gpt2fast.sampling import TokenHistory, apply_top_k
from gpt2fast.serve import Engine, EngineThread, QueueFull, RequestError, SamplingParams, slots
from gpt2fast.serve.engine import buckets_for

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def model() -> GPT2:
    """Weights N(0, 0.2) (test_cuda_graph's tiny model): greedy continuations vary instead of repeating a token."""
    return tiny_gpt2()


def prompts(*lengths: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def offline(model: GPT2, prompt: list[int], n: int, **kw) -> list[int]:
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, **kw)[0, len(prompt) :].tolist()


# ---- greedy identity, under a mixed batch --------------------------------------------------------------------
def test_greedy_matches_offline_generate_under_a_mixed_batch(model):
    """Greedy requests among sampled, penalised, top-k/top-p and stop-id requests, prompts from 1 token to past
    the prefill chunk (chunked over several steps), more requests than slots (queueing, slot reuse)."""
    ps = prompts(1, 7, 40, 3, 23, 61, 12, 2, 33)
    mixed = [
        GREEDY,
        SamplingParams(max_tokens=9, temperature=0.9, top_k=20, seed=3),
        GREEDY,
        SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.4),
        GREEDY,
        SamplingParams(max_tokens=5, temperature=1.2, top_p=0.8, seed=4),
        SamplingParams(max_tokens=10, temperature=0.7, stop_token_ids=(5, 6)),
        GREEDY,
        GREEDY,
    ]
    engine = Engine(model, max_batch=4, prefill_chunk=16)
    reqs = engine.generate(ps, mixed)
    for p, params, r in zip(ps, mixed, reqs):
        assert r.finish_reason in ("length", "stop")
        if params is GREEDY:
            assert r.output == offline(model, p, 10), f"prompt of {len(p)} tokens"
            assert r.finish_reason == "length"
        if params.repetition_penalty != 1.0:
            assert r.output == offline(model, p, 12, repetition_penalty=1.4)
    assert engine.num_running == 0 and engine.num_waiting == 0
    assert len(set(map(tuple, (r.output for r in reqs)))) > 3  # the model does not repeat one continuation


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_k=30, top_p=0.95, repetition_penalty=1.1, seed=11)
    p = prompts(9)[0]
    alone = Engine(model, max_batch=2).generate([p], params)[0].output
    crowd = Engine(model, max_batch=8).generate(
        [*prompts(5, 30, 2), p], [SamplingParams(max_tokens=7, temperature=0.5)] * 3 + [params]
    )
    assert crowd[-1].output == alone
    other = Engine(model, max_batch=2).generate([p], SamplingParams(**{**params.__dict__, "seed": 12}))[0].output
    assert other != alone


def test_stop_ids_end_a_request_with_the_stop_token_last(model):
    p = prompts(6)[0]
    ref = offline(model, p, 20)
    stop = ref[4]
    (r,) = Engine(model, max_batch=2).generate(
        [p], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop,))
    )
    first = ref.index(stop)
    assert r.finish_reason == "stop" and r.output == ref[: first + 1]


def test_max_tokens_one_and_a_full_context(model):
    p = prompts(CFG.n_positions - 3)[0]
    engine = Engine(model, max_batch=2, prefill_chunk=32)
    one, full = engine.generate([p[:5], p], [SamplingParams(max_tokens=1, temperature=0), SamplingParams(
        max_tokens=3, temperature=0)])  # fmt: skip
    assert one.output == offline(model, p[:5], 1) and one.finish_reason == "length"
    assert full.output == offline(model, p, 3)


# ---- scheduling --------------------------------------------------------------------------------------------
def test_chunked_prefill_keeps_running_requests_decoding(model):
    engine = Engine(model, max_batch=2, prefill_chunk=8)
    short = engine.add_request(prompts(3)[0], SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    assert len(short.output) == 2  # first token from the prefill, second from the same step's decode
    long = engine.add_request(prompts(64)[0], SamplingParams(max_tokens=4, temperature=0))
    for i in range(8):  # 64 prompt tokens at 8 per step: eight steps of prefill
        before = len(short.output)
        engine.step()
        assert len(short.output) == before + 1, f"step {i}: the running request stalled"
        assert (len(long.output) > 0) == (i == 7)
    assert long.output[:1] == offline(model, long.prompt, 1)


def test_slots_pack_at_the_front_and_buckets():
    assert buckets_for(1) == (1,)
    assert buckets_for(16) == (1, 2, 4, 8, 16)
    assert buckets_for(12) == (1, 2, 4, 8, 12)


def test_queue_full_and_bad_requests(model):
    engine = Engine(model, max_batch=1, max_queue=2)
    engine.add_requests([(prompts(3)[0], GREEDY, None)] * 2)
    with pytest.raises(QueueFull, match="queue is full"):
        engine.add_request(prompts(3)[0], GREEDY)
    assert engine.num_waiting == 2  # all or nothing
    bad = [
        ([], GREEDY, "prompt", "non-empty"),
        ([1, 97], GREEDY, "prompt", r"\[0, 97\)"),
        (prompts(125)[0], SamplingParams(max_tokens=4), "max_tokens", "exceeds the context of 128"),
        ([1], SamplingParams(max_tokens=0), "max_tokens", ">= 1"),
        ([1], SamplingParams(temperature=-1.0), "temperature", ">= 0"),
        ([1], SamplingParams(top_p=0.0), "top_p", r"\(0, 1\]"),
        ([1], SamplingParams(top_k=-2), "top_k", ">= 0"),
        ([1], SamplingParams(repetition_penalty=0.0), "repetition_penalty", "> 0"),
        ([1], SamplingParams(temperature=float("nan")), "temperature", "finite"),
        ([1], SamplingParams(stop_token_ids=(200,)), "stop_token_ids", r"\[0, 97\)"),
        ([1], SamplingParams(stop_token_ids=tuple(range(9))), "stop_token_ids", "at most 8"),
        ([1], SamplingParams(seed=2**64), "seed", "64 bits"),
    ]
    for prompt, params, param, match in bad:
        with pytest.raises(RequestError, match=match) as info:
            engine.check_request(prompt, params)
        assert info.value.param == param


def test_cancel_waiting_and_running_frees_slots(model):
    engine = Engine(model, max_batch=1)
    events = []
    running = engine.add_request(prompts(4)[0], SamplingParams(max_tokens=50, temperature=0),
                                 lambda r, e: events.append((r.id, e)))  # fmt: skip
    waiting = engine.add_request(prompts(4)[0], GREEDY)
    engine.step()
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel(running)
    engine.cancel(waiting)
    engine.step()
    assert running.finish_reason == waiting.finish_reason == "cancelled"
    assert engine.num_running == 0 and engine.num_waiting == 0 and not engine.has_work()
    assert events[-1][1].finish_reason == "cancelled" and sum(len(e.tokens) for _, e in events) == 3
    again = engine.generate([prompts(4)[0]], GREEDY)[0]  # the freed slot serves the next request correctly
    assert again.output == offline(model, again.prompt, 10)


def test_engine_thread_serves_concurrent_submitters_and_drains(model):
    thread = EngineThread(Engine(model, max_batch=3)).start()
    got: dict[str, list[int]] = {}
    lock = threading.Lock()

    def collect(r, e):
        with lock:
            got.setdefault(r.id, []).extend(e.tokens)

    reqs = []
    with thread.paused():  # everything queues, nothing runs
        for p in prompts(3, 9, 1, 14, 5):
            reqs += thread.submit([(p, GREEDY, collect)])
        assert thread.engine.num_waiting == 5
    assert thread.shutdown(timeout=60)
    assert not thread.alive
    for r in reqs:
        assert r.done.is_set() and got[r.id] == r.output == offline(model, r.prompt, 10)
    with pytest.raises(QueueFull, match="shutting down"):
        thread.submit([(prompts(3)[0], GREEDY, collect)])


# ---- per-slot sampling -----------------------------------------------------------------------------------------
def test_sampling_draws_from_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    n = 4000
    keys = slots.row_keys(torch.arange(n), torch.zeros(n, dtype=torch.long))  # n seeds, first token each
    draws = slots.sample_rows(logits.expand(n, 5), keys)
    freq = torch.bincount(draws, minlength=5).double() / n
    p = torch.softmax(logits[0].double(), 0)
    assert freq[4] == 0
    assert torch.all((freq - p).abs() <= 4 * (p * (1 - p) / n).sqrt() + 1e-9), (freq, p)
    later = slots.sample_rows(logits.expand(n, 5), slots.row_keys(torch.arange(n), torch.ones(n, dtype=torch.long)))
    assert (later != draws).float().mean() > 0.3  # the next token of a seed draws afresh


def test_mix32_is_exact_32_bit_arithmetic():
    x = torch.tensor([0, 1, 0xFFFFFFFF, 123456789])

    def ref(v: int) -> int:
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    assert slots.mix32(x).tolist() == [ref(v) for v in x.tolist()]


def test_per_row_top_k_matches_transformers_warper_per_row():
    logits = torch.randn(3, 50)
    logits[1, 10] = logits[1, 11]  # a tie
    out = slots.apply_top_k_rows(logits, torch.tensor([5, 0, 1]))
    assert torch.equal(out[0], apply_top_k(logits[:1], 5)[0])
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[2], apply_top_k(logits[2:], 1)[0])


def test_select_masks_rows_that_are_not_live():
    table = slots.SlotTable(3, 8, 2, torch.device("cpu"))
    table.active[:] = torch.tensor([True, True, False])
    table.done[1] = True
    table.last[:] = torch.tensor([7, 8, 9])
    table.column("max_tokens")[:] = 5
    logits = torch.zeros(3, 11)
    logits[:, 3] = 1.0
    table.floats[:, 0] = 0.0  # greedy
    out = slots.select(logits, table)
    assert out.tolist() == [[3, 8, 9], [0, 1, 0], [1, 0, 0]]
    assert table.history.lengths.tolist() == [1, 0, 0] and table.column("generated").tolist() == [1, 0, 0]
    assert isinstance(table.history, TokenHistory)


# ---- the CUDA-graph plumbing, with a stand-in capture on CPU -----------------------------------------------------
def test_graph_steps_per_bucket_give_the_eager_tokens(model, monkeypatch):
    captured = []

    def capture(fn, generator, device):
        graph, out = fake_capture(fn, generator, device)
        captured.append(graph)
        return graph, out

    monkeypatch.setattr(cuda_graph, "_capture", capture)
    ps = prompts(3, 17, 8, 30, 2)
    mixed = [GREEDY, SamplingParams(max_tokens=8, temperature=0.8, top_k=10, top_p=0.9, seed=1), GREEDY,
             SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3), GREEDY]  # fmt: skip
    eager = [r.output for r in Engine(model, max_batch=4, prefill_chunk=16).generate(ps, mixed)]
    engine = Engine(model, max_batch=4, prefill_chunk=16)
    engine.use_cuda_graph = True
    assert [r.output for r in engine.generate(ps, mixed)] == eager
    assert set(engine._graph_steps) <= set(engine.buckets) and len(captured) == len(engine._graph_steps) >= 2
    assert all(g.replays > 0 for g in captured)


# ---- GPU: captured decode steps against eager ones and offline generate (UNVERIFIED: never run here) ---------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_graph_engine_matches_eager_and_offline(dtype):
    model = tiny_gpt2("cuda", dtype)
    ps = prompts(3, 17, 8, 30, 2, 45)
    mixed = [GREEDY, SamplingParams(max_tokens=8, temperature=0.8, top_k=10, top_p=0.9, seed=1), GREEDY,
             SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3), GREEDY, GREEDY]  # fmt: skip
    eager = Engine(model, max_batch=4, prefill_chunk=16, use_cuda_graph=False).generate(ps, mixed)
    graphed_engine = Engine(model, max_batch=4, prefill_chunk=16)
    assert graphed_engine.use_cuda_graph
    graphed = graphed_engine.generate(ps, mixed)
    assert [r.output for r in graphed] == [r.output for r in eager]
    assert graphed_engine._graph_steps and all(s.graph is not None for s in graphed_engine._graph_steps.values())
    if dtype == torch.float32:
        for p, params, r in zip(ps, mixed, graphed):
            if params is GREEDY:
                assert r.output == offline(model, p, 10)
