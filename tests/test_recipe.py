"""The paper's recipe (train/recipes/paper.md) runs as written, at toy size, so it cannot rot.

The commands are read from the recipe itself and run in a scratch directory (the recipe's
relative paths — runs/, data/, bench/results/ — land there): stage 0 (tokenise, one process),
stage 1 (maturation training under torchrun: 2 CPU processes, gloo, bf16 autocast), stage 2
(GPT-2 converted to the AR baseline; the optional AR fine-tune), stage 3 (the quality table).
What the toy run changes is listed here and nowhere else — hub names → local stand-ins
(a random 2-layer GPT-2 saved with `transformers`, a JSONL corpus with FineWeb's columns),
sizes → toy — and every other key of both configs runs as written.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.config import TrainConfig
from train.trainer import main as train_main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "train" / "recipes" / "paper.md"
PAPER = "train/configs/paper_gpt2_medium_fineweb.json"
PAPER_AR = "train/configs/paper_ar_gpt2_medium_fineweb.json"

# -- everything the toy run changes -------------------------------------------------------
# training keys overridden on every training command (values filled in by the fixture)
TRAIN_OVERRIDDEN = {"init_from", "dataset", "dataset_config", "block_size", "max_steps", "eval_iters"}
TOY = {"block_size": 64, "max_steps": 2, "eval_iters": 1, "dataset_config": None}
HUB_NAMES = ("gpt2-medium", "hf:gpt2-large")  # command-line tokens replaced by local stand-ins
EVAL_TOY = {"--num-prompts": ["2"], "--prompt-tokens": ["8"], "--max-new-tokens": ["8"], "--best-of": ["2"],
            "--traces": ["1"], "--trace-tail": ["4"]}
# TrainConfig fields that a run initialised from GPT-2 ignores (the model's shape and the BPE
# size come from the checkpoint): the only ones the paper config may leave to their defaults
SCRATCH_ONLY = {"n_layer", "n_head", "n_embd", "n_positions", "bpe_vocab_size"}
# the maturation objective's settings: the AR baseline config has no use for them
MATURATION_ONLY = {"k_max", "table_radius", "table_trainable", "mse_weight", "nce_weight", "nce_scale",
                   "nce_negatives", "alpha_max", "alpha_min", "corruption", "noise_scale", "tail_position",
                   "uncond_prob", "film", "self_cond_prob", "unroll_tail_noise", "tail_weighting", "prefix_loss",
                   "head_init"}


def load_json(rel: str) -> dict:
    return {k: v for k, v in json.loads((ROOT / rel).read_text()).items() if not k.startswith("_")}


def recipe_commands() -> list[list[str]]:
    """Every command in the recipe's ```bash blocks, split like a shell would."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", RECIPE.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(shlex.split(line))
    return out


def the_command(what: str, pred) -> list[str]:
    found = [c for c in recipe_commands() if pred(c)]
    assert len(found) == 1, f"train/recipes/paper.md should hold exactly one {what} command, found {found}"
    return found[0]


def config_of(argv: list[str]) -> str:
    i = argv.index("--config")
    return argv[i + 1]


def train_args(argv: list[str], overrides: dict) -> list[str]:
    """`python -m train[.data]` / `torchrun ... -m train` arguments: the config made absolute (the run
    happens in a scratch dir), then the toy overrides of keys the command does not set itself."""
    args = argv[argv.index("-m") + 2:]  # after `-m train` / `-m train.data`
    i = args.index("--config")
    args[i + 1] = str(ROOT / args[i + 1])
    given = {a[2:].split("=", 1)[0] for a in args if a.startswith("--") and "=" in a}
    return args + [f"--{k}={'null' if v is None else v}" for k, v in overrides.items() if k not in given]


def set_option(argv: list[str], opt: str, values: list[str]) -> list[str]:
    """argv with opt's values replaced (or opt appended)."""
    if opt in argv:
        i = argv.index(opt)
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        argv = argv[:i] + argv[j:]
    return argv + [opt, *values]


# -- stand-ins for the hub ------------------------------------------------------------------
WORDS = ("the of and to in is was that it for on with as by at from this be which or an are his her their "
         "they we you not but had have one all there were when what so more about up out if can no would into "
         "time has two than first other some very after most over new years only river city light market "
         "water stone winter garden letter music number paper").split()


def make_corpus(path: Path, n_docs: int = 60, words: int = 300) -> list[str]:
    """A JSONL file shaped like FineWeb's rows (text plus other columns)."""
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "." for _ in range(n_docs)]
    with path.open("w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d, "id": f"<urn:uuid:{i}>", "dump": "CC-MAIN-2024-10",
                                "url": f"https://example.com/{i}", "language": "en"}) + "\n")
    return docs


def make_gpt2(path: Path, tok, seed: int) -> None:
    """A random GPT-2 + its tokenizer, saved as `save_pretrained` saves a hub model."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    torch.manual_seed(seed)
    eos = tok.token_to_id("<|endoftext|>")
    GPT2LMHeadModel(GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               bos_token_id=eos, eos_token_id=eos)).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


def byte_bpe(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def subprocess_env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    e["CUDA_VISIBLE_DEVICES"] = ""  # the 2 ranks run on the CPU (gloo) even where one GPU is visible
    return e


# -- the run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Run every stage of the recipe in a scratch directory; what each produced."""
    work = tmp_path_factory.mktemp("recipe")
    docs = make_corpus(work / "corpus.jsonl")
    tok = byte_bpe(docs, 384)  # > nce_negatives (256): the sampled-negatives path, as with GPT-2's 50257
    hub = {"gpt2-medium": work / "hub" / "gpt2-medium", "hf:gpt2-large": work / "hub" / "gpt2-large"}
    make_gpt2(hub["gpt2-medium"], tok, seed=0)
    make_gpt2(hub["hf:gpt2-large"], tok, seed=1)
    standin = {"gpt2-medium": str(hub["gpt2-medium"]), "hf:gpt2-large": f"hf:{hub['hf:gpt2-large']}"}
    assert set(standin) == set(HUB_NAMES)
    overrides = {**TOY, "init_from": standin["gpt2-medium"], "dataset": str(work / "corpus.jsonl")}
    assert set(overrides) == TRAIN_OVERRIDDEN
    old_cwd = Path.cwd()
    os.chdir(work)
    try:
        out = {"work": work, "hub": hub, "overrides": overrides, "seconds": {}}
        t0 = time.perf_counter()

        def lap(stage):
            nonlocal t0
            out["seconds"][stage] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()

        # stage 0: the shards, one process
        from train.data import main as data_main
        prep = the_command("stage-0 data", lambda c: c[:3] == ["python", "-m", "train.data"])
        assert config_of(prep) == PAPER
        assert data_main(train_args(prep, overrides)) == 0
        out["data_dirs"] = sorted(p.name for p in (work / "data").iterdir())
        out["meta_mtime"] = [p.stat().st_mtime_ns for p in (work / "data").glob("*/meta.json")]
        lap("stage 0")

        # stage 1: maturation under torchrun, 2 processes on the CPU
        tr = the_command("stage-1 torchrun", lambda c: c[0] == "torchrun" and config_of(c) == PAPER)
        launcher = tr[1:tr.index("-m")]
        nproc = [i for i, a in enumerate(launcher) if a.split("=")[0] in ("--nproc_per_node", "--nproc-per-node")]
        assert len(nproc) == 1, launcher
        i = nproc[0]
        if "=" in launcher[i]:
            launcher[i] = launcher[i].split("=")[0] + "=2"
        else:
            launcher[i + 1] = "2"
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "train", *train_args(tr, overrides)]
        p = subprocess.run(cmd, cwd=work, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
        out["torchrun_stdout"] = p.stdout
        lap("stage 1 (torchrun, 2 processes)")

        # stage 2: GPT-2 as the AR baseline (python -c CODE HUB_NAME OUT_DIR), run in this process
        conv = the_command("stage-2 conversion", lambda c: c[:2] == ["python", "-c"])
        argv = [standin.get(a, a) for a in conv[3:]]
        out["conv_args"] = conv[3:]
        saved_argv = sys.argv
        sys.argv = ["-c", *argv]
        try:
            exec(compile(conv[2], "<recipe: python -c>", "exec"), {"__name__": "__main__"})
        finally:
            sys.argv = saved_argv
        out["ar_dir"] = work / argv[1]
        # stage 2, optional: the AR fine-tune on the same shards (one process here; torchrun is stage 1's)
        ft = the_command("stage-2 AR fine-tune", lambda c: c[0] == "torchrun" and config_of(c) == PAPER_AR)
        assert ft[1:ft.index("-m")] == tr[1:tr.index("-m")]  # launched like stage 1
        assert train_main(train_args(ft, overrides)) == 0
        lap("stage 2")

        # stage 3: the quality table
        from evals.cli import main as eval_main
        ev = the_command("stage-3 evaluation", lambda c: c[:3] == ["python", "-m", "evals"])
        args = [standin.get(a, a) for a in ev[3:]]
        assert standin["hf:gpt2-large"] in args  # the judge is a separate, bigger model: not the AR baseline
        for opt, vals in EVAL_TOY.items():
            args = set_option(args, opt, vals)
        out["eval_args"] = args
        assert eval_main(args) == 0
        out["quality"] = Path(args[args.index("--out") + 1])
        lap("stage 3")
        print("recipe stages, seconds:", out["seconds"])
        return out
    finally:
        os.chdir(old_cwd)


# -- the configs --------------------------------------------------------------------------
def test_paper_config_pins_every_setting():
    """No setting of the paper's run is left to a default that could change under it."""
    paper = load_json(PAPER)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(paper) <= fields
    assert fields - set(paper) == SCRATCH_ONLY, "a new TrainConfig key: decide its paper value in " + PAPER
    assert TRAIN_OVERRIDDEN <= set(paper)
    # the paper's setting (METHOD.md): GPT-2 Medium, FineWeb-10BT, 600K steps, batch 32, K = 16, bf16
    assert (paper["objective"], paper["init_from"], paper["dataset"], paper["dataset_config"]) == \
        ("maturation", "gpt2-medium", "HuggingFaceFW/fineweb", "sample-10BT")
    assert (paper["max_steps"], paper["batch_size"], paper["grad_accum"], paper["k_max"]) == (600000, 32, 1, 16)
    assert paper["batch_size"] % 8 == 0 and paper["dtype"] == "bfloat16"
    assert (paper["nce_scale"], paper["nce_negatives"], paper["table_trainable"]) == (20.0, 256, False)


def test_recipe_names_the_hub_models_the_test_replaces():
    tokens = {a for c in recipe_commands() for a in c}
    assert set(HUB_NAMES) <= tokens


def test_ar_baseline_config_matches_the_maturation_run():
    """The optional AR fine-tune sees the same data, steps, schedule and seed."""
    paper, ar = load_json(PAPER), load_json(PAPER_AR)
    assert ar["objective"] == "ar" and ar["out_dir"] != paper["out_dir"]
    assert set(paper) - set(ar) == MATURATION_ONLY
    assert set(ar) <= set(paper)
    for k in set(ar) - {"objective", "out_dir"}:
        assert ar[k] == paper[k], k


# -- the run ------------------------------------------------------------------------------
def test_every_stage_reuses_stage0s_shards(recipe):
    data = recipe["work"] / "data"
    assert len(recipe["data_dirs"]) == 1  # stage 0 made one shard dir ...
    assert sorted(p.name for p in data.iterdir()) == recipe["data_dirs"]  # ... which stages 1 and 2 reused
    assert [p.stat().st_mtime_ns for p in data.glob("*/meta.json")] == recipe["meta_mtime"]
    assert f"data: data/{recipe['data_dirs'][0]}" in recipe["torchrun_stdout"]


def test_stage1_ran_the_paper_config_under_torchrun(recipe):
    from tmfast.checkpoint import load_checkpoint
    paper = load_json(PAPER)
    run = recipe["work"] / paper["out_dir"]
    assert "tmfast train: maturation, 2 process(es) on cpu" in recipe["torchrun_stdout"]
    state = json.loads((run / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == TOY["max_steps"] and state["final"]
    saved = json.loads((run / "train_config.json").read_text())
    for k, v in paper.items():  # every key as written, except the toy overrides
        want = recipe["overrides"][k] if k in TRAIN_OVERRIDDEN else v
        assert saved[k] == want, k
    assert saved["dtype"] == "bfloat16"  # bf16 autocast, here on the CPU
    model, tok = load_checkpoint(run)
    c = model.config
    assert c.table_normalised and not c.table_trainable and c.k_max == paper["k_max"] and c.film == paper["film"]
    hub = recipe["hub"]["gpt2-medium"]
    assert c.n_positions == 128 and c.n_layer == 2  # the shape is the init model's
    assert tok.to_str() == load_checkpoint(recipe["ar_dir"])[1].to_str()  # GPT-2's tokenizer, as the baseline's
    from transformers import GPT2LMHeadModel
    wte = GPT2LMHeadModel.from_pretrained(hub).transformer.wte.weight.detach()
    R = float(wte.norm(dim=-1).mean())  # table_radius null → the source table's mean row norm
    assert c.table_radius == pytest.approx(R, rel=1e-5)
    torch.testing.assert_close(model.table.weight, wte / wte.norm(dim=-1, keepdim=True) * R, atol=1e-6, rtol=0)
    evals_ = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in evals_ if r["kind"] == "eval"][-1]
    assert all(torch.isfinite(torch.tensor(last[k])) for k in ("train_loss", "val_loss", "val_mse", "val_nce"))


def test_stage2_ar_baseline_is_gpt2_itself(recipe):
    """The converted checkpoint's AR head computes GPT-2's own logits."""
    from transformers import GPT2LMHeadModel

    from tmfast.checkpoint import load_checkpoint
    assert "gpt2-medium" in recipe["conv_args"]
    model, tok = load_checkpoint(recipe["ar_dir"])
    hf = GPT2LMHeadModel.from_pretrained(recipe["hub"]["gpt2-medium"]).eval()
    ids = torch.tensor([tok.encode("The river city light market, after the winter.").ids])
    with torch.no_grad():
        ours = model.table.logits(model.hidden(model.table(ids)))
        torch.testing.assert_close(ours, hf(ids).logits, atol=1e-4, rtol=1e-4)
    ft = json.loads((recipe["work"] / load_json(PAPER_AR)["out_dir"] / "train_config.json").read_text())
    assert ft["objective"] == "ar" and ft["init_from"] == str(recipe["hub"]["gpt2-medium"])


def test_stage3_makes_the_papers_table(recipe):
    paper = load_json(PAPER)
    q = recipe["work"] / recipe["quality"] / "quality"  # --out is a directory
    doc = json.loads(q.with_suffix(".json").read_text())
    assert f"judge: hf:{recipe['hub']['hf:gpt2-large']}" in doc["header"]
    rows = {m["name"]: m for m in doc["methods"]}
    for name in ("reference (validation text)", "AR greedy", "AR greedy + rep. penalty 1.2",
                 f"maturation K={paper['k_max']} s=2 α_max=1", f"maturation K={paper['k_max']} s=1 α_max=0.5"):
        assert name in rows, (name, list(rows))
    for m in doc["methods"]:
        assert m["skipped"] is None, (m["name"], m["skipped"])
        assert len(m["samples"]) == 2 and all(len(s["token_ids"]) == 8 for s in m["samples"])
        met = m["metrics"]
        for k in ("dist1", "dist2", "rep2", "rep3", "loop_pct"):  # the paper's columns
            assert met[k] is not None, (m["name"], k)
        assert met["judge_ppl"] > 1, m["name"]  # the quality column
    table = q.with_suffix(".md").read_text()
    for col in ("Dist-1", "Dist-2", "Rep-2", "Rep-3", "Loop %", "judge PPL"):
        assert col in table
    assert (q.parent / "traces").is_dir()
