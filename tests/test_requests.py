"""Sequence: text decoded incrementally (each commit decodes what is new), stop strings, deltas."""
import random

import pytest
from tokenizers import Tokenizer

from tmfast import GenerationConfig
from tmfast.checkpoint import DEFAULT_CHECKPOINT
from tmfast.engine import Sequence
from tmfast.testing import byte_tokenizer


@pytest.fixture(scope="module", params=["shipped", "bytes"])
def tok(request):
    return Tokenizer.from_file(str(DEFAULT_CHECKPOINT / "tokenizer.json")) if request.param == "shipped" \
        else byte_tokenizer()


def run(tok, ids, stop=()):
    seq = Sequence("r", [1], 1, GenerationConfig(max_new_tokens=len(ids), stop=stop, stop_at_eos=False), tok, None, True)
    pieces = []
    for t in ids:
        seq.commit(t)
        pieces.append(seq.text_delta())
        if seq.finished:
            break
    return seq, pieces


@pytest.mark.parametrize("seed", range(6))
def test_streamed_pieces_make_the_full_decode(tok, seed):
    """Valid text and random ids alike (random bytes are mostly invalid UTF-8): the pieces streamed
    step by step concatenate to one full decode of the ids, and no piece ends in half a character."""
    rng = random.Random(seed)
    V = tok.get_vocab_size()
    ids = tok.encode("And God said, Let there be light: and there was light. — café ☃ ").ids * 2 if seed % 2 \
        else [rng.randrange(1, V) for _ in range(80)]
    seq, pieces = run(tok, ids)
    assert seq.finish_reason == "length"
    assert seq._decoder is not None  # incremental: tokenizers' DecodeStream, not a decode of the whole text
    assert "".join(pieces) == tok.decode(ids) == seq.final_text()


@pytest.mark.parametrize("seed", range(4))
def test_a_stop_string_cuts_where_a_full_decode_would(tok, seed):
    rng = random.Random(seed)
    text = "In the beginning God created the heaven and the earth. And the earth was without form. " * 2
    ids = tok.encode(text).ids
    stop = text[rng.randrange(20, 60):][:rng.randrange(2, 7)]
    seq, pieces = run(tok, ids, stop=(stop,))
    # the reference: decode every prefix, stop at the first that contains the stop string
    for k in range(1, len(ids) + 1):
        full = tok.decode(ids[:k])
        if stop in full:
            break
    assert seq.finish_reason == "stop" and seq.text == full[:full.find(stop)] and len(seq.token_ids) == k
    assert "".join(pieces) == seq.final_text() == seq.text
