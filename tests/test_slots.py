"""DecodeBatch: static state, per-bucket views, spans that follow the sequences, one graph per
step kind, a loop that never syncs."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from tmfast import GenerationConfig
from tmfast.engine import Engine, row_buckets, span_buckets
from tmfast.engine import readback
from tmfast.testing import tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [1], [3, 4, 20, 21, 22, 23, 24, 25, 26], [40, 41], [7, 7, 2]]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def solo(model, prompt, g):
    e = Engine(model, max_batch=1, max_len=96, k_window=8)
    e.add_request(prompt, g)
    return [t for ev in e.run() for t in ev.token_ids]


def tokens(events, rid):
    return [t for e in events if e.request_id == rid for t in e.token_ids]


def test_buckets():
    assert row_buckets(1) == [1] and row_buckets(8) == [1, 2, 4, 8] and row_buckets(12) == [1, 2, 4, 8, 12]
    assert span_buckets(40) == [40] and span_buckets(158) == [64, 128, 158] and span_buckets(128) == [64, 128]


def test_every_step_input_keeps_its_address(model):
    """Across steps, admissions, releases and bucket changes, every tensor the step function is
    given is one of the batch's static tensors, at the address it had at the start."""
    eng = Engine(model, max_batch=4, max_len=96, k_window=8)
    batch = eng._batch
    static = {t.data_ptr() for t in batch.static_tensors()}
    ids = {id(t) for t in batch.static_tensors()}
    seen: dict = {}  # (rows, position in the call) → data_ptr
    real = batch.step_fn

    def spy(model_, *args, **kw):
        rows = args[2].shape[0]  # `last`, the first state tensor
        for i, t in enumerate(args):
            for j, x in enumerate(t if isinstance(t, list) else [t]):
                if isinstance(x, torch.Tensor):
                    assert x.data_ptr() in static, f"argument {i} is not a static tensor"
                    if i != 11:  # the span view (eager: any span) aside, the very same objects
                        assert id(x) in ids, f"argument {i} was made for this call"
                    assert seen.setdefault((rows, i, j), x.data_ptr()) == x.data_ptr(), f"argument {i} moved"
        return real(model_, *args, **kw)
    batch.step_fn = spy
    gs = [GenerationConfig(max_new_tokens=n, tail=4, alpha_max=a, seed=i) for i, (n, a) in
          enumerate([(6, 1.0), (12, 0.6), (3, 1.0), (9, 1.0), (5, 0.6)])]
    rids = [eng.add_request(p, g) for p, g in zip(PROMPTS[:2], gs[:2])]
    events = eng.step() + eng.step()
    rids += [eng.add_request(p, g) for p, g in zip(PROMPTS[2:], gs[2:])]  # admitted while others run
    events += list(eng.run())
    assert {r for (r, _, _) in seen} >= {2, 4}  # the row bucket changed on the way
    for rid, p, g in zip(rids, PROMPTS, gs):
        assert tokens(events, rid) == solo(model, p, g)


def test_compiled_spans_follow_the_longest_sequence(model):
    """A compiled batch attends over a span bucket just above the longest sequence, not the cache."""
    eng = Engine(model, max_batch=2, max_len=300, k_window=4, compile=True)
    spans = []
    real = eng._batch.step_fn

    def spy(model_, *args, **kw):
        spans.append(args[11].shape[0])
        return real(model_, *args, **kw)
    eng._batch.step_fn = spy
    eng.add_request(PROMPTS[0], GenerationConfig(max_new_tokens=70, tail=4, seed=1))
    list(eng.run())
    assert eng._batch.spans == [64, 128, 256, 303]
    assert spans[0] == 64 and max(spans) == 128  # 3 scratch + 5 prompt + 70 new < 128 ≪ 303


def test_a_compiled_engine_compiles_one_graph_per_step_kind(model):
    """Row and span sizes are dynamic: every bucket shares the graph of its kind (batch 1 apart)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eng = Engine(model, max_batch=4, max_len=200, k_window=4, compile=True)
    gs = [GenerationConfig(max_new_tokens=n, tail=4, seed=i) for i, n in enumerate((80, 40, 20, 60))]
    for p, g in zip(PROMPTS, gs):  # 4 → 3 → 2 → 1 running, spans 64 → 128
        eng.add_request(p, g)
    events = list(eng.run())
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2  # rows == 1, rows ≥ 2
    for i, (p, g) in enumerate(zip(PROMPTS, gs)):
        assert tokens(events, f"req-{i}") == solo(model, p, g)


SYNCING = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
           torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero,
           torch.Tensor.__len__, torch.Tensor.__iter__}


class NoHostReads(TorchFunctionMode):
    """Fails on any call that reads a tensor's values on the host, except the Readback's."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING and not readback.reading():
            self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("alpha_max", [1.0, 0.6])
@pytest.mark.parametrize("pipeline", [0, 1])
def test_the_steady_state_loop_reads_nothing_on_the_host_but_the_step_results(model, alpha_max, pipeline):
    """Steps of running sequences, with admissions and releases between them: the one host read
    of device values per step is the Readback's (on CUDA: one non-blocking copy)."""
    eng = Engine(model, max_batch=4, max_len=96, k_window=4, pipeline=pipeline)
    for i, p in enumerate(PROMPTS[:3]):
        eng.add_request(p, GenerationConfig(max_new_tokens=8 + 4 * i, tail=4, alpha_max=alpha_max, seed=i,
                                            history_noise=0.1))
    eng.step()  # the first admission happens before the mode is on
    mode = NoHostReads()
    with mode:
        for _ in range(6):
            eng.step()
        eng.add_request(PROMPTS[3], GenerationConfig(max_new_tokens=5, tail=4, alpha_max=alpha_max, seed=7))
        while eng.has_work:
            eng.step()
    assert mode.reads == [], f"host reads in the loop: {sorted(set(mode.reads))}"


def test_the_detector_sees_a_host_read():
    """The detector itself: a truth test of a tensor is a read."""
    mode = NoHostReads()
    with mode:
        bool(torch.ones(1) > 0)
    assert mode.reads


def test_warmup_compiles_every_step_variant_before_the_first_request(model):
    """Engine.warmup() (what `tmfast serve --compile` runs before it says ready) leaves nothing to
    compile for any request: both spans, every step kind (one graph each: the span is dynamic)."""
    torch._dynamo.reset()
    eng = Engine(model, max_batch=1, max_len=100, k_window=2, compile=True)
    seen = []
    n = eng.warmup(lambda done, total: seen.append((done, total)))
    assert eng._batch.spans == [64, 101] and n == 1 * 2 * 3 and seen[-1] == (n, n)
    gs = [GenerationConfig(max_new_tokens=80, tail=2, alpha_max=a, guidance=s, seed=i)
          for i, (a, s) in enumerate([(1.0, 1.0), (0.6, 2.0), (0.6, 1.0)])]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for g in gs:  # front-only, guided tail, plain tail; spans 64 then 101
            rid = eng.add_request(PROMPTS[0], g)
            assert tokens(list(eng.run()), rid) == solo(model, PROMPTS[0], g)
