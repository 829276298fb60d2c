"""Continuous batching: the Engine API (add_request / step / abort / events)."""
import pytest
import torch

from tmfast.testing import naive_generate
from tmfast.testing import byte_tokenizer, tiny_model
from tmfast import GenerationConfig
from tmfast.engine import Engine, GenerationError, MaturationEngine, QueueFullError

GENS = [GenerationConfig(max_new_tokens=12, tail=K, guidance=s, alpha_max=0.7, seed=seed)
        for K, s, seed in ((4, 2.0, 1), (8, 1.0, 2), (1, 1.0, 3), (8, 2.0, 4), (2, 1.5, 5))]
PROMPTS = [[5, 6, 7, 8, 9], [1], [3, 4, 20, 21, 22, 23, 24], [40, 41], [9, 8, 7]]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def collect(events, into):
    for ev in events:
        into.setdefault(ev.request_id, []).append(ev)


def test_staggered_arrivals_give_the_same_output_as_alone(model):
    engine = Engine(model, max_batch=3, max_len=64, k_window=8)
    got = {}
    ids = [engine.add_request(PROMPTS[0], GENS[0])]
    collect(engine.step(), got)
    collect(engine.step(), got)
    ids.append(engine.add_request(PROMPTS[1], GENS[1]))
    for _ in range(3):
        collect(engine.step(), got)
    ids += [engine.add_request(p, g) for p, g in zip(PROMPTS[2:], GENS[2:])]  # the last two must queue
    assert engine.num_queued == 3 and engine.num_running == 2
    collect(engine.run(), got)
    assert not engine.has_work
    for rid, prompt, g in zip(ids, PROMPTS, GENS):
        tokens = [t for ev in got[rid] for t in ev.token_ids]
        assert got[rid][-1].finished and got[rid][-1].finish_reason == "length"
        assert tokens == naive_generate(model, prompt, g), rid


def test_abort_mid_flight_and_in_queue(model):
    engine = Engine(model, max_batch=2, max_len=64, k_window=8)
    a = engine.add_request(PROMPTS[0], GENS[0])
    b = engine.add_request(PROMPTS[1], GENS[1])
    c = engine.add_request(PROMPTS[2], GENS[2])  # queued
    got = {}
    for _ in range(3):
        collect(engine.step(), got)
    assert engine.abort(a) and engine.abort(c) and not engine.abort("nope")
    # b moved into a's slot: running sequences stay a prefix of the batch
    assert engine._batch.n_active == 1 and engine._running[0].seq.id == b
    collect(engine.run(), got)
    assert got[a][-1].finish_reason == "abort" and len([e for e in got[a] if e.token_ids]) == 3
    assert [e.finish_reason for e in got[c]] == ["abort"]
    assert [t for e in got[b] for t in e.token_ids] == naive_generate(model, PROMPTS[1], GENS[1])


def test_queue_limit_and_up_front_rejection(model):
    engine = Engine(model, max_batch=1, max_len=64, k_window=8, max_queue=2)
    for _ in range(3):  # one for the free slot, two waiting
        engine.add_request([1, 2], GENS[0])
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.add_request([1, 2], GENS[0])
    engine.step()  # admits one: the slot is taken, two still wait
    with pytest.raises(QueueFullError):
        engine.add_request([1, 2], GENS[0])
    zero = Engine(model, max_batch=2, max_len=64, k_window=8, max_queue=0)  # 0: no waiting, not no requests
    zero.add_request([1, 2], GENS[0])
    zero.add_request([1, 2], GENS[0])
    with pytest.raises(QueueFullError):
        zero.add_request([1, 2], GENS[0])
    with pytest.raises(GenerationError, match="at most") as e:
        engine.add_request([1, 2], GenerationConfig(max_new_tokens=100, tail=4))
    assert e.value.param == "max_new_tokens"
    with pytest.raises(GenerationError, match="tail window") as e:
        engine.add_request([1, 2], GenerationConfig(tail=9))
    assert e.value.param == "tail"
    with pytest.raises(GenerationError, match="shape"):
        engine.add_request(torch.zeros(3, 5))


def test_streamed_text_deltas_concatenate_to_the_final_text():
    tok = byte_tokenizer()
    model = tiny_model(vocab_size=tok.get_vocab_size())
    base = MaturationEngine(model, tok).generate(["Hello"], GenerationConfig(max_new_tokens=40, tail=4, seed=2))[0]
    stop = base.text[20:23]
    engine = Engine(model, tok, max_batch=2, max_len=64, k_window=4)
    r1 = engine.add_request("Hello", GenerationConfig(max_new_tokens=40, tail=4, seed=2))
    r2 = engine.add_request("Hello", GenerationConfig(max_new_tokens=40, tail=4, seed=2, stop=(stop,)))
    got = {}
    collect(engine.run(), got)
    assert "".join(e.text for e in got[r1]) == base.text
    assert "".join(e.text for e in got[r2]) == base.text[:base.text.find(stop)]
    assert got[r2][-1].finish_reason == "stop"
    assert all(stop not in e.text for e in got[r2])


def test_vector_prompts_and_vector_outputs(model):
    engine = Engine(model, max_batch=2, max_len=64, k_window=8)
    rows = model.table.weight[PROMPTS[0]].clone()
    a = engine.add_request(PROMPTS[0], GENS[0])
    b = engine.add_request(rows, GENS[0], return_vectors=True)
    got = {}
    collect(engine.run(), got)
    ta = [t for e in got[a] for t in e.token_ids]
    tb = [t for e in got[b] for t in e.token_ids]
    assert ta == tb
    vecs = torch.cat([e.vectors for e in got[b] if e.vectors is not None])
    assert torch.equal(vecs, model.table.weight[tb])
    # off-table prompt vectors are committed history as given
    c = engine.add_request(rows + 0.3 * torch.randn_like(rows), GENS[0])
    out = [t for e in engine.run() if e.request_id == c for t in e.token_ids]
    assert len(out) == GENS[0].max_new_tokens
    with pytest.raises(GenerationError, match="finite"):
        engine.add_request(torch.full((2, 32), float("nan")))


def test_one_failing_request_does_not_end_the_others(model):
    engine = Engine(model, max_batch=3, max_len=64, k_window=8)
    ids = [engine.add_request(p, g) for p, g in zip(PROMPTS[:3], GENS[:3])]
    victim = engine._queue[1].seq  # fault injection

    def broken(tok):
        raise RuntimeError("decoder exploded")
    victim.commit = broken
    got = {}
    collect(engine.run(), got)
    assert got[ids[1]][-1].finish_reason == "error" and "exploded" in got[ids[1]][-1].error
    for i in (0, 2):
        assert [t for e in got[ids[i]] for t in e.token_ids] == naive_generate(model, PROMPTS[i], GENS[i])


def test_async_iteration(model):
    import asyncio
    engine = Engine(model, max_batch=2, max_len=64, k_window=8)
    rid = engine.add_request(PROMPTS[3], GENS[3])

    async def drain():
        return [ev async for ev in engine.arun()]
    events = asyncio.run(drain())
    assert [t for e in events for t in e.token_ids] == naive_generate(model, PROMPTS[3], GENS[3])
    assert events[-1].request_id == rid and events[-1].finished


def test_text_delta_holds_back_what_a_stop_string_may_complete():
    from tmfast.engine import Sequence

    class CharTokenizer:  # one character per token id
        def decode(self, ids):
            return "".join(chr(i) for i in ids)
    seq = Sequence("r", [1], 1, GenerationConfig(max_new_tokens=20, stop=("bd", "az")), CharTokenizer(), None, True)
    streamed = []
    for ch in "xab":
        seq.commit(ord(ch))
        streamed.append(seq.text_delta())
    # "a" is held while it may become "az"; once "b" follows, only "b" (maybe "bd") is held
    assert streamed == ["x", "", "a"]
    seq.commit(ord("e"))
    assert seq.text_delta() == "be" and not seq.finished
    seq.commit(ord("b"))
    seq.commit(ord("d"))
    assert seq.finished and seq.finish_reason == "stop" and seq.text_delta() == ""
    assert seq.final_text() == "xabe"
