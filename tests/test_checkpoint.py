import json

import pytest
import torch

from tmfast.testing import byte_tokenizer, tiny_model
from tmfast import CheckpointError, GenerationConfig, MaturationEngine, load_checkpoint, save_checkpoint


def test_round_trip_preserves_weights_tokenizer_and_generation(tmp_path):
    tok = byte_tokenizer()
    model = tiny_model(vocab_size=tok.get_vocab_size())
    save_checkpoint(model, tmp_path / "ck", tokenizer=tok)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors",
                                                                   "tokenizer.json"]
    loaded, loaded_tok = load_checkpoint(tmp_path / "ck")
    assert loaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert loaded_tok.encode("In the beginning").ids == tok.encode("In the beginning").ids
    g = GenerationConfig(max_new_tokens=10, tail=4, guidance=2.0, seed=7)
    a = MaturationEngine(model, tok).generate(["In the beginning"], g)[0]
    b = MaturationEngine(loaded, loaded_tok).generate(["In the beginning"], g)[0]
    assert a.token_ids == b.token_ids and a.text == b.text


def test_overwrite_is_atomic_and_leaves_no_temp_dirs(tmp_path):
    save_checkpoint(tiny_model(seed=0), tmp_path / "ck")
    m2 = tiny_model(seed=1)
    save_checkpoint(m2, tmp_path / "ck")
    loaded, _ = load_checkpoint(tmp_path / "ck")
    assert torch.equal(loaded.vector_head.weight, m2.vector_head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_missing_and_broken_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_checkpoint(tmp_path / "empty")
    save_checkpoint(tiny_model(), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["n_embd"] = 64
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "ck")
    cfg["n_embd"], cfg["bogus"] = 32, 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bogus"):
        load_checkpoint(tmp_path / "ck")
