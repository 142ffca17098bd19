"""CUDA-graph decode (gpt2fast.cuda_graph).

CPU tests cover the guards and the graph-cache bookkeeping (keys, adopting a decode state).  The
``gpu`` tests compare graph decoding with the eager step token for token; they have only ever been
skipped here (no GPU in the session that wrote them): UNVERIFIED until run on a CUDA machine.
"""

from __future__ import annotations

import pytest
import torch

from gpt2fast import GPT2, GPT2Config, cuda_graph
from gpt2fast.generation import DecodeState, generate, make_step
from gpt2fast.sampling import SamplingConfig, TokenHistory

CFG = GPT2Config(vocab_size=97, n_positions=128, n_embd=128, n_layer=2, n_head=2)


def tiny_gpt2(device: str = "cpu", dtype: torch.dtype = torch.float32) -> GPT2:
    """A deterministic tiny GPT-2 whose weights (N(0, 0.2)) give varied greedy continuations."""
    torch.manual_seed(0)
    model = GPT2(CFG).eval().requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" not in f".{name}":
                p.normal_(0.0, 0.2)
    return model.to(device=device, dtype=dtype)


def decode_state(device="cpu", batch=2, cap=16, cfg=None, eos=(5,), generator=None) -> DecodeState:
    """A fresh decode state for ``batch`` prompts of 3 tokens."""
    prompts = torch.arange(1, 3 * batch + 1, device=device).view(batch, 3)
    history = TokenHistory.from_prompts(prompts, torch.full((batch,), 3, device=device), cap)
    eos_ids = torch.tensor(eos, device=device) if eos else None
    return DecodeState(cfg or SamplingConfig(), history, eos_ids, 0, generator)


# ---- CPU: guards and bookkeeping ------------------------------------------------------------------------


def test_make_graph_step_refuses_cpu_models():
    model = tiny_gpt2()
    model.setup_cache(2, 16)
    with pytest.raises(ValueError, match="needs a CUDA model"):
        cuda_graph.make_graph_step(model, decode_state(), lambda t: t)


def test_make_graph_step_refuses_other_models():
    with pytest.raises(TypeError, match=r"gpt2fast\.GPT2"):
        cuda_graph.make_graph_step(torch.nn.Linear(2, 2), decode_state(), lambda t: t)


def test_make_step_on_cpu_is_eager():
    """The generate seam never reaches CUDA graphs on CPU."""
    model = tiny_gpt2()
    model.setup_cache(2, 16)
    step = make_step(model, decode_state())
    assert not isinstance(step, cuda_graph.GraphStep)
    assert cuda_graph.graph_cache(model) == {}


def test_graph_key_changes_with_everything_a_graph_depends_on():
    model = tiny_gpt2()
    model.setup_cache(2, 16)
    key = cuda_graph.graph_key(model, decode_state())
    assert cuda_graph.graph_key(model, decode_state()) == key  # a fresh state of the same layout
    gen = torch.Generator()
    variants = [
        decode_state(cfg=SamplingConfig(do_sample=True, top_k=5)),
        decode_state(eos=(5, 6)),
        decode_state(eos=()),
        decode_state(cap=17),
        decode_state(generator=gen),
    ]
    keys = [cuda_graph.graph_key(model, s) for s in variants]
    assert len({key, *keys}) == len(keys) + 1
    model.setup_cache(2, 17)  # new cache storage and max_len
    assert cuda_graph.graph_key(model, decode_state()) != key
    model.setup_cache(2, 16)
    model.half()  # new weight tensors
    assert cuda_graph.graph_key(model, decode_state()) != key


def test_adopt_state_copies_values_and_repoints():
    owner, state = decode_state(), decode_state()
    state.history.tokens[:, 3] = 42
    state.history.lengths += 1
    state.done[1] = True
    state.steps += 7
    expected = {k: v.clone() for k, v in cuda_graph.state_tensors(state).items()}
    cuda_graph.adopt_state(state, owner)
    assert state.history is owner.history and state.done is owner.done and state.steps is owner.steps
    for name, value in cuda_graph.state_tensors(state).items():
        assert value.data_ptr() == cuda_graph.state_tensors(owner)[name].data_ptr()
        assert torch.equal(value, expected[name]), name


def test_state_tensors_lists_history_and_flags():
    names = set(cuda_graph.state_tensors(decode_state()))
    assert {"history.tokens", "history.lengths", "done", "steps", "pad", "eos_ids"} <= names


def _ragged_batch(device):
    ids = torch.randint(1, CFG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(3)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: prompt lengths 9, 5, 8
    mask[2, :1] = 0
    return ids * mask, mask


def _only_entry(model) -> cuda_graph.GraphStep:
    entries = [e for e in cuda_graph.graph_cache(model).values() if isinstance(e, cuda_graph.GraphStep)]
    assert len(entries) == 1, "expected exactly one captured decode graph"
    return entries[0]


def test_capture_uses_a_stream_on_the_models_device(monkeypatch):
    """torch.cuda.graph's default capture stream is process-wide, made on whatever device was current at
    its first use: a model on another GPU must be captured on a stream of its own device, with that
    device current, or the capture records nothing of its work."""
    events = []
    current = ["cuda:0"]

    class FakeStream:
        def __init__(self, device=None):
            self.device = str(torch.device(device)) if device is not None else current[0]

    class FakeDevice:
        def __init__(self, device):
            self.device = str(torch.device(device))

        def __enter__(self):
            self.saved, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.saved

    class FakeGraphCtx:
        def __init__(self, graph, pool=None, stream=None):
            self.stream = stream if stream is not None else FakeStream()  # like torch's default capture stream

        def __enter__(self):
            events.append(("capture on", self.stream.device, "current", current[0]))

        def __exit__(self, *exc):
            pass

    class FakeCUDAGraph:
        def register_generator_state(self, generator):
            events.append(("register", current[0]))

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "graph", FakeGraphCtx)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(cuda_graph, "_CAPTURE_STREAMS", {})
    out = torch.ones(2)
    graph, got = cuda_graph._capture(lambda: out, torch.Generator(), torch.device("cuda", 1))
    assert got is out and isinstance(graph, FakeCUDAGraph)
    assert events == [("register", "cuda:1"), ("capture on", "cuda:1", "current", "cuda:1")]
    assert current[0] == "cuda:0"  # the caller's device is restored
    cuda_graph._capture(lambda: out, None, torch.device("cuda", 0))
    assert events[-1] == ("capture on", "cuda:0", "current", "cuda:0")
    streams = cuda_graph._CAPTURE_STREAMS
    assert list(streams) == [torch.device("cuda", 1), torch.device("cuda", 0)]
    cuda_graph._capture(lambda: out, None, torch.device("cuda", 1))
    assert len(streams) == 2  # one capture stream per device, reused


def test_warm_up_runs_on_the_devices_capture_stream(monkeypatch):
    """Warm-up and capture share one stream per device (no new stream, hence no new cuBLAS workspace, per
    capture), ordered after and before the caller's stream."""
    log = []

    class FakeStream:
        def __init__(self, device=None):
            self.device = device

        def wait_stream(self, other):
            log.append(("wait", self, other))

    main = FakeStream("main")

    class FakeStreamCtx:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append(("enter", self.stream))

        def __exit__(self, *exc):
            log.append(("exit", self.stream))

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", FakeStreamCtx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(cuda_graph, "_CAPTURE_STREAMS", {})
    device = torch.device("cuda", 1)
    for _ in range(2):
        with cuda_graph._side_stream(device):
            log.append("body")
    side = cuda_graph._capture_stream(device)
    assert side.device == device and len(cuda_graph._CAPTURE_STREAMS) == 1
    once = [("wait", side, main), ("enter", side), "body", ("exit", side), ("wait", main, side)]
    assert log == once + once


# ---- CPU: the graph-step plumbing, with a stand-in for CUDA graph capture -------------------------------


class FakeGraph:
    """Stands in for a captured CUDA graph: ``replay`` re-runs the step into the same output buffer."""

    def __init__(self, fn, out):
        self.fn, self.out, self.replays = fn, out, 0

    def replay(self):
        self.out.copy_(self.fn())
        self.replays += 1


def fake_capture(fn, generator, device):
    """Like ``cuda_graph._capture`` but runs ``fn`` once for its output buffer, leaving the RNG as it was
    (a real capture runs nothing; GraphStep restores the tensors it touched)."""
    rng = torch.get_rng_state()
    out = fn()
    torch.set_rng_state(rng)
    return FakeGraph(fn, out), out


@pytest.fixture
def fake_cuda(monkeypatch):
    """Route ``generate`` on CPU through ``make_graph_step`` with fake capture; returns the capture list."""
    from gpt2fast import generation

    captured = []

    def capture(fn, generator, device):
        captured.append(fake_capture(fn, generator, device)[0])
        return captured[-1], captured[-1].out

    def make_step(model, state, use_cuda_graph=None):
        eager = lambda t: state.select(model.decode_step(t))
        return eager if use_cuda_graph is False else cuda_graph.make_graph_step(model, state, eager)

    monkeypatch.setattr(cuda_graph, "_require_cuda", lambda device: None)
    monkeypatch.setattr(cuda_graph, "_capture", capture)
    monkeypatch.setattr(generation, "make_step", make_step)
    return captured


def test_graph_step_plumbing_greedy_ragged_and_reuse(fake_cuda):
    """Greedy with a repetition penalty (the history matters) and an EOS some rows hit (flags and the
    step counter matter): graph steps match eager, and a second call reuses the graph's buffers."""
    model = tiny_gpt2()
    ids, mask = _ragged_batch("cpu")
    kw = dict(max_new_tokens=12, repetition_penalty=1.5, eos_token_id=34)
    eager = generate(model, ids, mask, use_cuda_graph=False, **kw)
    assert (eager == 34).any() and not (eager == 34).any(1).all(), "test wants some rows, not all, to stop"
    assert fake_cuda == []
    first = generate(model, ids, mask, **kw)
    assert torch.equal(first, eager)
    entry = _only_entry(model)
    assert len(fake_cuda) == 1 and entry.graph is fake_cuda[0]
    replays = entry.replays
    assert replays == fake_cuda[0].replays == kw["max_new_tokens"] - 1
    second = generate(model, ids, mask, **kw)  # reuses the graph: the new state is re-pointed at its buffers
    assert torch.equal(second, eager)
    assert len(fake_cuda) == 1 and _only_entry(model) is entry and entry.replays == 2 * replays


def test_graph_step_plumbing_sampling_default_generator(fake_cuda):
    model = tiny_gpt2()
    ids, mask = _ragged_batch("cpu")
    kw = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(5)
    eager = generate(model, ids, mask, use_cuda_graph=False, **kw)
    torch.manual_seed(5)
    assert torch.equal(generate(model, ids, mask, **kw), eager)  # warm-up and capture left the RNG alone
    assert len(fake_cuda) == 1


def test_capture_failure_falls_back_to_eager(fake_cuda, monkeypatch):
    def broken(fn, generator, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "_capture", broken)
    model = tiny_gpt2()
    ids, mask = _ragged_batch("cpu")
    eager = generate(model, ids, mask, max_new_tokens=8, use_cuda_graph=False)
    with pytest.warns(UserWarning, match="capture of the decode step failed"):
        got = generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(got, eager)  # the failed warm-up/capture left no trace in the cache or state
    assert list(cuda_graph.graph_cache(model).values()) == [cuda_graph._FAILED]
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8), eager)  # eager from then on, no retry


# ---- GPU: graph replay against the eager step (UNVERIFIED here) ------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_greedy_matches_eager_ragged(dtype):
    model = tiny_gpt2("cuda", dtype)
    ids, mask = _ragged_batch("cuda")
    n = 48
    eager = generate(model, ids, mask, max_new_tokens=n, use_cuda_graph=False)
    assert cuda_graph.graph_cache(model) == {}
    graphed = generate(model, ids, mask, max_new_tokens=n, use_cuda_graph=True)
    assert torch.equal(graphed, eager)
    entry = _only_entry(model)
    assert entry.graph is not None and entry.replays == n - 1  # every decode step replayed the graph


@pytest.mark.gpu
def test_graph_seeded_sampling_matches_eager():
    model = tiny_gpt2("cuda")
    ids, mask = _ragged_batch("cuda")
    kw = dict(max_new_tokens=32, do_sample=True, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2)

    def run(use_graph):
        gen = torch.Generator(device="cuda").manual_seed(1234)
        return generate(model, ids, mask, generator=gen, use_cuda_graph=use_graph, **kw)

    assert torch.equal(run(True), run(False))
    # the default CUDA generator, seeded globally
    torch.manual_seed(99)
    eager = generate(model, ids, mask, use_cuda_graph=False, **kw)
    torch.manual_seed(99)
    assert torch.equal(generate(model, ids, mask, use_cuda_graph=True, **kw), eager)


@pytest.mark.gpu
def test_graph_is_reused_across_calls_and_rekeyed_on_shape():
    model = tiny_gpt2("cuda")
    ids, mask = _ragged_batch("cuda")
    eager = generate(model, ids, mask, max_new_tokens=20, eos_token_id=7, use_cuda_graph=False)
    first = generate(model, ids, mask, max_new_tokens=20, eos_token_id=7, use_cuda_graph=True)
    entry = _only_entry(model)
    replays = entry.replays
    second = generate(model, ids, mask, max_new_tokens=20, eos_token_id=7, use_cuda_graph=True)
    assert _only_entry(model) is entry and entry.replays > replays  # replayed, not recaptured
    assert torch.equal(first, eager) and torch.equal(second, eager)
    # another batch size gets its own graph, and the results still match the eager path
    eager1 = generate(model, ids[:1], mask[:1], max_new_tokens=20, use_cuda_graph=False)
    assert torch.equal(generate(model, ids[:1], mask[:1], max_new_tokens=20, use_cuda_graph=True), eager1)
    assert len(cuda_graph.graph_cache(model)) == 2


@pytest.mark.gpu
def test_graph_decode_fills_the_cache_exactly():
    """max_new_tokens up to n_positions: the last replay writes the cache's last slot."""
    model = tiny_gpt2("cuda")
    ids = torch.randint(1, CFG.vocab_size, (2, 5), device="cuda")
    n = CFG.n_positions - ids.shape[1]
    eager = generate(model, ids, max_new_tokens=n, use_cuda_graph=False)
    assert torch.equal(generate(model, ids, max_new_tokens=n, use_cuda_graph=True), eager)


def test_nearby_lengths_share_one_cache_and_one_graph(fake_cuda):
    """The cache length is rounded up (generation.CACHE_ROUND), so a call with a longer prompt and more new
    tokens reuses the first call's cache and captured graph, and both still match eager decoding."""
    from gpt2fast import generation

    model = tiny_gpt2()
    ids, mask = _ragged_batch("cpu")
    first = generate(model, ids, mask, max_new_tokens=6)
    k_ptr = model.cache.k.data_ptr()
    longer = torch.cat([ids, ids[:, :2]], dim=1)
    second = generate(model, longer, torch.ones_like(longer), max_new_tokens=9)
    assert model.cache.k.data_ptr() == k_ptr and model.cache.max_len == min(CFG.n_positions, generation.CACHE_ROUND)
    assert len(fake_cuda) == 1 and _only_entry(model).replays == 5 + 8
    assert torch.equal(first, generate(model, ids, mask, max_new_tokens=6, use_cuda_graph=False))
    assert torch.equal(second, generate(model, longer, torch.ones_like(longer), max_new_tokens=9, use_cuda_graph=False))
