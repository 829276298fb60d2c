"""One request can never change another's output or stop the engine (issue 11's engine side):
ranges validated at the edge, non-finite state scrubbed before a slot is reused, a request that
cannot start or a step that fails ends only what it must, and the engine keeps serving."""
import pytest
import torch

from tmfast import ConfigError, GenerationConfig
from tmfast.engine import Engine, GenerationError, MaturationEngine
from tmfast.testing import byte_tokenizer, naive_generate, tiny_model

VALID = [GenerationConfig(max_new_tokens=10, tail=K, guidance=s, alpha_max=a, seed=seed, tail_noise=0.3)
         for K, s, a, seed in ((4, 2.0, 0.7, 1), (1, 1.0, 1.0, 2), (6, 1.0, 1.0, 3), (3, 1.5, 0.6, 4))]
PROMPTS = [[5, 6, 7, 8, 9], [1, 2], [30, 31, 32], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def solo(model, i):
    return naive_generate(model, PROMPTS[i], VALID[i])


def tokens_of(events, rid):
    return [t for e in events if e.request_id == rid for t in e.token_ids]


@pytest.mark.parametrize("field, value", [
    ("seed", 18446744073709551616), ("seed", -1), ("seed", True), ("guidance", 1e30), ("guidance", "2"),
    ("tail_noise", 1e25), ("history_noise", 1e39), ("embryo_scale", 1e30), ("tail", True),
    ("max_new_tokens", 4.0), ("alpha_max", float("nan")), ("stop", [3]), ("stop", ["x"] * 17)])
def test_values_outside_the_documented_ranges_are_one_line_errors_naming_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        GenerationConfig(**{field: value})
    assert e.value.param == field and "\n" not in str(e.value)


def test_the_range_ends_are_served_and_change_no_one_else(model):
    """The largest accepted magnitudes and seed run beside valid requests; the valid ones give
    their solo answers, and the engine serves a second round the same way."""
    extreme = GenerationConfig(max_new_tokens=10, tail=4, guidance=1e3, alpha_max=0.5, tail_noise=1e3,
                               history_noise=1e3, embryo_scale=1e3, seed=2 ** 63 - 1)
    engine = Engine(model, max_batch=4, max_len=64, k_window=8)
    for _ in range(2):
        ids = [engine.add_request(PROMPTS[i], VALID[i]) for i in range(3)]
        bad = engine.add_request([7, 7, 7], extreme)
        events = list(engine.run())
        assert events[-1].finished and [e for e in events if e.request_id == bad][-1].finished
        for i, rid in enumerate(ids):
            assert tokens_of(events, rid) == solo(model, i)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_poisoned_sequence_leaves_nothing_behind_for_later_occupants(model, compiled):
    """NaN injected into a running sequence — its last committed vector (what it commits next) and
    a cache slot of its row that later occupants attend to before they write it (what non-finite
    tail K/V leave behind): it alone ends in error; its slot, and the slot a neighbour moves into,
    are clean for every later request."""
    if compiled:
        torch._dynamo.reset()
    engine = Engine(model, max_batch=2, max_len=64, k_window=8, compile=compiled)
    other = engine.add_request(PROMPTS[2], VALID[2])
    victim = engine.add_request([1, 2, 3, 4], GenerationConfig(max_new_tokens=10, tail=4, alpha_max=0.7, seed=9))
    events = engine.step()
    engine._batch.state.last[1] = float("nan")  # fault injection: slot 1 holds the victim
    for t in engine._batch.cache.k + engine._batch.cache.v:
        t[1, :, 12] = float("nan")
    events += list(engine.run())
    assert [e for e in events if e.request_id == victim][-1].finish_reason == "error"
    assert tokens_of(events, other) == solo(model, 2)
    for order in ((0, 3), (3, 0)):  # the victim's slot reused by each
        ids = [engine.add_request(PROMPTS[i], VALID[i]) for i in order]
        events = list(engine.run())
        assert [tokens_of(events, r) for r in ids] == [solo(model, i) for i in order]


def test_a_request_that_cannot_start_fails_alone(model, monkeypatch):
    """The batched prefill of an admission fails: each request is then started alone, and only the
    one that cannot start ends (with an error event); the others give their solo answers."""
    engine = Engine(model, max_batch=4, max_len=64, k_window=8)
    ids = [engine.add_request(PROMPTS[i], VALID[i]) for i in range(3)]
    engine._queue[1].vectors = torch.zeros(3, 7)  # fault injection: wrong width, the prefill fails
    events = list(engine.run())
    err = [e for e in events if e.request_id == ids[1]]
    assert len(err) == 1 and err[0].finish_reason == "error" and "could not start" in err[0].error
    assert tokens_of(events, ids[0]) == solo(model, 0) and tokens_of(events, ids[2]) == solo(model, 2)
    rid = engine.add_request(PROMPTS[1], VALID[1])
    assert tokens_of(list(engine.run()), rid) == solo(model, 1)


def test_after_a_failed_step_the_engine_serves_on(model):
    engine = Engine(model, max_batch=2, max_len=64, k_window=8)
    a = engine.add_request(PROMPTS[0], VALID[0])
    engine.step()
    assert engine.num_running == 1
    real, calls = engine._batch.step_fn, []

    def broken(*args, **kw):  # fault injection: one step raises
        calls.append(1)
        raise RuntimeError("device lost")
    engine._batch.step_fn = broken
    with pytest.raises(RuntimeError):
        engine.step()
    engine._batch.step_fn = real
    ended = engine.fail_running("engine step failed: device lost")
    assert [(e.request_id, e.finish_reason) for e in ended] == [(a, "error")] and not engine.has_work
    ids = [engine.add_request(PROMPTS[i], VALID[i]) for i in (1, 2)]
    events = list(engine.run())
    assert [tokens_of(events, r) for r in ids] == [solo(model, 1), solo(model, 2)]


def test_prompts_are_checked_before_they_are_embedded_or_tokenised(model):
    tok = byte_tokenizer()

    class Spy:  # a tokenizer that records what it is asked to encode
        def __init__(self):
            self.encoded = []

        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text):
            self.encoded.append(len(text))
            return tok.encode(text)
    spy = Spy()
    engine = Engine(model, spy, max_batch=2, max_len=64, k_window=8)
    with pytest.raises(GenerationError, match="does not fit") as e:
        engine.add_request("x" * 10_000_000)
    assert e.value.param == "prompt" and spy.encoded == []  # never tokenised
    with pytest.raises(GenerationError, match="valid Unicode"):
        engine.add_request("\ud800 abc")
    with pytest.raises(GenerationError, match="does not fit"):
        engine.add_request(list(range(model.config.n_positions + 1)))
    for bad in (torch.zeros(3, 32, dtype=torch.int64), torch.zeros(3, 32, dtype=torch.complex64),
                torch.full((2, 32), 1e39, dtype=torch.float64), [1.5, 2.0], [True, 1], b"ab", 7):
        with pytest.raises(GenerationError) as e:
            engine.add_request(bad)
        assert e.value.param == "prompt" and "\n" not in str(e.value)
    assert not engine.has_work


def test_a_closed_batch_engine_keeps_working_after_a_failed_generation(model):
    eng = MaturationEngine(model, byte_tokenizer())
    with pytest.raises(ConfigError, match="seed"):
        eng.generate(["a b"], GenerationConfig(seed=18446744073709551616))
    first = eng.generate([PROMPTS[0], PROMPTS[2]], [VALID[0], VALID[2]])
    assert [r.token_ids for r in first] == [solo(model, 0), solo(model, 2)]
    assert all(r.finish_reason == "length" for r in first)


def test_ending_the_running_requests_never_raises_and_leaves_a_clean_batch(model):
    """If freeing a slot fails after a failed step, every slot is reset and scrubbed; later
    requests give their solo answers."""
    engine = Engine(model, max_batch=2, max_len=64, k_window=8)
    ids = [engine.add_request(PROMPTS[i], VALID[i]) for i in (0, 1)]
    engine.step()
    real = engine._batch.release

    def broken(*a, **kw):  # fault injection: the slot cannot be freed
        raise RuntimeError("device lost")
    engine._batch.release = broken
    ended = engine.fail_running("engine step failed")
    engine._batch.release = real
    assert sorted(e.request_id for e in ended) == sorted(ids) and all(e.finish_reason == "error" for e in ended)
    assert not engine.has_work and engine._batch.n_active == 0
    later = [engine.add_request(PROMPTS[i], VALID[i]) for i in (2, 3)]
    events = list(engine.run())
    assert [tokens_of(events, r) for r in later] == [solo(model, 2), solo(model, 3)]
