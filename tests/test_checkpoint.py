import contextlib
import json
import warnings

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


# -- saves that survive kills ------------------------------------------------------------
from tmfast import checkpoint as ckpt  # noqa: E402

KILL_POINTS = ckpt.SAVE_POINTS + ckpt.RECOVER_POINTS
COMMITTED_FROM = ("new", "aside", "swapped")  # a save killed here has its copy complete (.ck.new or ck)


class Killed(BaseException):
    """A kill inside save_checkpoint: not an Exception, so no handler of the save runs."""


def kill_at(point, nth=1):
    hits = []

    def hook(p):
        if p == point:
            hits.append(p)
            if len(hits) == nth:
                raise Killed(p)
    return hook


def save_killed(monkeypatch, model, directory, point) -> bool:
    """Save, killed at `point` (None: not killed); True when the save's copy is committed."""
    monkeypatch.setattr(ckpt, "fault_hook", kill_at(point) if point else None)
    try:
        save_checkpoint(model, directory)
    except Killed:
        return point in COMMITTED_FROM
    finally:
        monkeypatch.setattr(ckpt, "fault_hook", None)
    return True  # not killed: the point was not reached (e.g. a recovery point with nothing to recover)


def version(model_or_dir, versions) -> int:
    m = model_or_dir
    if not isinstance(m, torch.nn.Module):
        m, _ = load_checkpoint(m)
    hits = [i for i, v in enumerate(versions) if torch.equal(m.vector_head.weight, v.vector_head.weight)]
    assert len(hits) == 1
    return hits[0]


def listing(path):
    return sorted(p.name for p in path.iterdir())


VERSIONS = [tiny_model(seed=s) for s in range(4)]


@pytest.fixture
def no_fsync(monkeypatch):
    """fsync guards against power loss, not kills: skip it where a test makes hundreds of saves."""
    monkeypatch.setattr(ckpt, "_fsync", lambda path: None)


@pytest.mark.parametrize("first", ckpt.SAVE_POINTS + ("legacy_aside",))
def test_two_kills_in_any_windows_leave_the_newest_complete_checkpoint(tmp_path, monkeypatch, no_fsync, first):
    """Save v0; a save of v1 killed at `first`; a save of v2 killed at every point of the save
    and of its recovery. The checkpoint must load (read-only, renaming nothing) at every stage,
    recovery must put the newest committed save in place and remove every leftover, and a
    third save must work. legacy_aside: the state the old code's kill left (ck renamed to
    .ck.old, nothing else) — where its next save removed the only complete copy."""
    v0, v1, v2, v3 = VERSIONS
    for second in KILL_POINTS + (None,):
        d = tmp_path / str(second) / "ck"
        save_checkpoint(v0, d)
        if first == "legacy_aside":
            d.rename(d.with_name(".ck.old"))
            ok1 = False
        else:
            ok1 = save_killed(monkeypatch, v1, d, first)
        committed = [0, 1] if ok1 else [0]
        before = listing(d.parent)
        with pytest.warns(UserWarning, match="missing") if not d.exists() else contextlib.nullcontext():
            assert version(d, VERSIONS) in committed
        assert listing(d.parent) == before  # loading renames nothing
        ok2 = save_killed(monkeypatch, v2, d, second)
        committed += [2] if ok2 else []
        with warnings.catch_warnings():  # ck may be missing (.ck.old + .ck.new): tested above
            warnings.simplefilter("ignore")
            assert version(d, VERSIONS) in committed, (first, second, listing(d.parent))
        ckpt.recover_checkpoint(d)
        assert listing(d.parent) == ["ck"], (first, second)
        assert version(d, VERSIONS) == committed[-1], (first, second)
        save_checkpoint(v3, d)
        assert version(d, VERSIONS) == 3 and listing(d.parent) == ["ck"]


def test_random_chains_of_killed_saves(tmp_path, monkeypatch, no_fsync):
    """Many saves in a row, each killed at a random point (or not), no recovery in between but
    the saves' own: a complete checkpoint always loads, and it is never older than the last
    committed save before the one in flight."""
    import random
    rng = random.Random(0)
    d = tmp_path / "ck"
    save_checkpoint(VERSIONS[0], d)
    last = 0
    for i in range(60):
        v, before = (i % 3) + 1, last
        if save_killed(monkeypatch, VERSIONS[v], d, rng.choice(KILL_POINTS + (None,) * 2)):
            last = v
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert version(d, VERSIONS) in (before, last)
    ckpt.recover_checkpoint(d)
    assert version(d, VERSIONS) == last and listing(tmp_path) == ["ck"]


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    d = tmp_path / "ck"
    save_checkpoint(VERSIONS[0], d)
    for name in (".ck.tmp.abc123", ".ck.staging", ".ck.k3j_9xq2", "..ck.staging.a1b2c3d4"):  # ours, older versions'
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    for name in (".ck.my-notes", "other", ".other.tmp.x"):  # not ours: kept
        (tmp_path / name).mkdir()
    save_checkpoint(VERSIONS[1], d)
    assert listing(tmp_path) == [".ck.my-notes", ".other.tmp.x", "ck", "other"]
    assert version(d, VERSIONS) == 1


def test_the_only_complete_copy_is_never_removed(tmp_path):
    """ck missing, .ck.old complete (an old kill), temp dirs beside it: recovery restores
    .ck.old as ck before it removes anything."""
    d = tmp_path / "ck"
    save_checkpoint(VERSIONS[2], d)
    d.rename(tmp_path / ".ck.old")
    (tmp_path / ".ck.tmp.x").mkdir()
    assert ckpt.recover_checkpoint(d) == ["restored the previous checkpoint (.ck.old → ck)", "removed .ck.tmp.x"]
    assert listing(tmp_path) == ["ck"] and version(d, VERSIONS) == 2


def test_with_no_checkpoint_only_the_temp_dirs_go(tmp_path):
    """No ck, no .ck.old/.ck.new: .ck.tmp.* (never complete) is removed; an older version's
    staging dir (its complete copy, in the worst case) is kept until a checkpoint is in place."""
    d = tmp_path / "ck"
    (tmp_path / ".ck.tmp.x").mkdir()
    (tmp_path / ".ck.staging").mkdir()
    assert ckpt.recover_checkpoint(d) == ["removed .ck.tmp.x"]
    assert listing(tmp_path) == [".ck.staging"]
    save_checkpoint(VERSIONS[0], d)
    assert listing(tmp_path) == ["ck"]


def test_saving_over_a_file_is_an_error(tmp_path):
    (tmp_path / "ck").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        save_checkpoint(VERSIONS[0], tmp_path / "ck")


# -- unreadable checkpoints: one-line CheckpointErrors naming the file ----------------------------
def _break_weights_truncated(d):
    b = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(b[: len(b) // 2])


def _break_weights_garbage(d):
    (d / "model.safetensors").write_bytes(b"\x00garbage" * 10)


def _break_weights_empty(d):
    (d / "model.safetensors").write_bytes(b"")


def _break_tokenizer(d):
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": ')


def _break_config_dir(d):
    (d / "config.json").unlink()
    (d / "config.json").mkdir()


def _config(**change):
    def f(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(change)
        for k, v in change.items():
            if v is _DROP:
                del cfg[k]
        (d / "config.json").write_text(json.dumps(cfg))
    return f


_DROP = object()


def _config_text(text):
    return lambda d: (d / "config.json").write_text(text)


@pytest.mark.parametrize("breaker, msg", [
    (_break_weights_truncated, r"cannot read .*ck/model\.safetensors: .*incomplete metadata"),
    (_break_weights_garbage, r"cannot read .*ck/model\.safetensors: .*header"),
    (_break_weights_empty, r"cannot read .*ck/model\.safetensors"),
    (_break_tokenizer, r"cannot read .*ck/tokenizer\.json"),
    (_break_config_dir, r"cannot read .*ck/config\.json: .*directory"),
    (_config_text("{not json"), r"cannot read .*ck/config\.json: Expecting"),
    (_config_text("[1, 2]"), r"bad .*ck/config\.json: expected a JSON object"),
    (_config(n_embd=_DROP), r"bad .*ck/config\.json: missing n_embd"),
    (_config(n_embd="32"), r"bad .*ck/config\.json: n_embd must be int, got \"32\""),
    (_config(n_layer=2.0), r"n_layer must be int, got 2\.0"),
    (_config(layer_norm_epsilon="x"), r"layer_norm_epsilon must be float"),
    (_config(layer_norm_epsilon=0), r"layer_norm_epsilon must be > 0"),
    (_config(dropout=1.5), r"dropout must be in \[0, 1\)"),
    (_config(table_normalised="yes"), r"table_normalised must be bool"),
    (_config(eos_token_id=97), r"eos_token_id 97 is outside the vocabulary"),
    (_config(film=None), r"film must be str"),
    (_config(n_head=3), r"bad config\.json in .*: n_embd \(32\) must be divisible by n_head \(3\)"),
])
def test_unreadable_checkpoint_files_are_one_line_errors(tmp_path, breaker, msg):
    save_checkpoint(tiny_model(), tmp_path / "ck", tokenizer=byte_tokenizer())
    breaker(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=msg) as e:
        load_checkpoint(tmp_path / "ck")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("device, dtype, msg", [
    ("bogus", None, r"bad device 'bogus'"),
    ("cuda:99", None, r"device 'cuda:99'"),
    ("cpu", "int8", r"bad dtype 'int8'"),
    ("cpu", "nonsense", r"bad dtype 'nonsense'"),
])
def test_bad_device_or_dtype_is_a_one_line_error(tmp_path, device, dtype, msg):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    with pytest.raises(CheckpointError, match=msg) as e:
        load_checkpoint(tmp_path / "ck", device=device, dtype=dtype)
    assert "\n" not in str(e.value)


def test_cuda_without_cuda_is_a_one_line_error(tmp_path, monkeypatch):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CheckpointError, match="'cuda': CUDA is not available"):
        load_checkpoint(tmp_path / "ck", device="cuda")


def test_dtype_by_name(tmp_path):
    save_checkpoint(tiny_model(), tmp_path / "ck")
    model, _ = load_checkpoint(tmp_path / "ck", dtype="bfloat16")
    assert model.table.weight.dtype == torch.bfloat16
