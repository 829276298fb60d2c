"""The training loop: single process on CPU, or torchrun DDP (gloo on CPU, nccl on GPU).

    python -m train --config train/configs/ar_kjv.json [--key=value ...] [--resume]
    torchrun --nproc_per_node=2 -m train --config ... (same arguments)

out_dir is one tmfast checkpoint directory (the engine loads it as is), replaced at every
checkpoint by tmfast.checkpoint.save_checkpoint (a kill at any point leaves a complete one):
    config.json model.safetensors tokenizer.json      the model (tmfast.checkpoint)
    train_config.json                                  every training setting
    train_log.jsonl                                    one record per log step and per eval
    loss_curve.png
    optimizer.safetensors train_state.json             for --resume (keep_optimizer)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from tmfast.checkpoint import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, load_checkpoint, recover_checkpoint,
                               save_checkpoint)
from tmfast.config import ConfigError, ModelConfig
from tmfast.model import TMModel

from . import data as data_mod
from .config import TrainConfig, parse_args, resume_changes
from .objectives import Objective, mark_dynamic_tail, plan_step, summarise

# Tests set TMFAST_TRAIN_KILL_AT_STEP to SIGKILL the process right after that optimiser step.
_KILL_AT = int(os.environ.get("TMFAST_TRAIN_KILL_AT_STEP", "0")) or None

STATE_NAME, OPTIM_NAME = "train_state.json", "optimizer.safetensors"
LOG_NAME, CURVE_NAME, TRAIN_CONFIG_NAME = "train_log.jsonl", "loss_curve.png", "train_config.json"


# ------------------------------------------------------------------------------------
# distributed
# ------------------------------------------------------------------------------------
class Dist:
    def __init__(self, cfg: TrainConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device == "auto":
            dev = f"cuda:{self.local}" if torch.cuda.is_available() else "cpu"
        else:
            dev = cfg.device
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.on = self.world > 1
        if self.on:
            import torch.distributed as tdist
            tdist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.master = self.rank == 0

    def barrier(self):
        if self.on:
            import torch.distributed as tdist
            tdist.barrier()

    def all_sum(self, stats: dict) -> dict:
        if not self.on:
            return stats
        import torch.distributed as tdist
        keys = sorted(stats)
        v = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).reshape(()) for k in keys])
        v = v.to(self.device)
        tdist.all_reduce(v)
        return dict(zip(keys, v.cpu()))

    def close(self):
        if self.on:
            import torch.distributed as tdist
            tdist.barrier()  # every rank is done with collectives before any tears down
            tdist.destroy_process_group()


# ------------------------------------------------------------------------------------
# model construction
# ------------------------------------------------------------------------------------
def _is_tmfast_ckpt(path: str) -> bool:
    """A tmfast checkpoint dir (a Hugging Face model dir also has config.json, with model_type)."""
    cfg = Path(path, CONFIG_NAME)
    if not (cfg.is_file() and Path(path, "model.safetensors").is_file()):
        return False
    try:
        return "model_type" not in json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _initial_tokenizer(cfg: TrainConfig):
    """The tokenizer fixed by what we start from (None: the data pipeline makes one)."""
    if cfg.init_from == "scratch":
        return None
    if _is_tmfast_ckpt(cfg.init_from):
        tok = load_checkpoint(cfg.init_from)[1]
        if tok is None:
            raise ConfigError(f"init_from checkpoint {cfg.init_from} has no tokenizer.json")
        return tok
    return data_mod.gpt2_tokenizer(cfg.init_from)


def build_model(cfg: TrainConfig, vocab_size: int, eos_id: int | None) -> TMModel:
    """A fresh model for the objective: AR from scratch, or initialised from a checkpoint / GPT-2."""
    if cfg.init_from == "scratch":
        mc = ModelConfig(vocab_size=vocab_size, n_positions=cfg.n_positions or cfg.block_size,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                         k_max=cfg.k_max, table_normalised=False, table_trainable=True, eos_token_id=eos_id)
        torch.manual_seed(cfg.seed)
        return TMModel(mc)
    if _is_tmfast_ckpt(cfg.init_from):
        src, _ = load_checkpoint(cfg.init_from)
    else:
        from tmfast.checkpoint import from_hf_gpt2
        src, _ = from_hf_gpt2(cfg.init_from, k_max=cfg.k_max, normalise=False)
    sc = src.config
    if cfg.objective == "ar":
        mc = ModelConfig(**{**sc.to_dict(), "dropout": cfg.dropout})
        if sc.table_normalised:
            mc.table_trainable = cfg.table_trainable
    else:
        w = src.table.weight.detach().float()
        R = cfg.table_radius or float(w.norm(dim=-1).mean())
        mc = ModelConfig(**{**sc.to_dict(), "dropout": cfg.dropout, "k_max": cfg.k_max, "table_radius": R,
                            "table_normalised": True, "table_trainable": cfg.table_trainable, "film": cfg.film})
    if mc.n_positions < cfg.block_size:
        raise ConfigError(f"block_size {cfg.block_size} exceeds the model context {mc.n_positions}")
    torch.manual_seed(cfg.seed)
    model = TMModel(mc)
    ours = model.state_dict()
    with torch.no_grad():
        for name, t in src.state_dict().items():
            if name == "table.weight":
                model.table.load_rows(t)
            elif name in ours and ours[name].shape == t.shape:
                ours[name].copy_(t)
            elif name == "tail_film.embed.weight" and t.shape[1] == ours[name].shape[1]:
                n = min(len(t), len(ours[name]))  # different k_max: keep the rows both know
                ours[name][:n].copy_(t[:n])
            # another FiLM placement has another layout: that conditioning starts again at identity
    return model


def _is_maturation_ckpt(path: str) -> bool:
    if not _is_tmfast_ckpt(path):
        return False
    return bool(ModelConfig.load(Path(path, CONFIG_NAME)).table_normalised)


@torch.no_grad()
def match_head_norm(model: TMModel, data, cfg: TrainConfig) -> float:
    """Scale the identity vector head so predictions start at the table radius: the
    direction stays the AR head's, the MSE term does not start at (‖h‖/R)² ≫ 1."""
    from .objectives import crop_batch, step_generator
    ids = crop_batch(data, min(8, cfg.batch_size), cfg.block_size, step_generator(cfg.seed, 0, 99))
    dev = model.table.weight.device
    h = model.hidden(model.table(ids[:, :-1].to(dev)))
    scale = model.config.table_radius / float(h.norm(dim=-1).mean())
    model.vector_head.weight.mul_(scale)
    model.vector_head.bias.mul_(scale)
    return scale


def set_trainable(model: TMModel, cfg: TrainConfig) -> None:
    """AR never uses the conditioning / vector head: freeze them (DDP needs every
    trainable parameter to get a gradient). Maturation: table frozen unless asked."""
    for name, p in model.named_parameters():
        if name == "table.weight":
            p.requires_grad_(model.config.table_trainable if cfg.objective == "maturation" or
                             model.config.table_normalised else True)
        elif name.startswith(("maturity.", "tail_film.", "vector_head.")):
            p.requires_grad_(cfg.objective == "maturation")
        else:
            p.requires_grad_(True)


# ------------------------------------------------------------------------------------
# optimiser, schedule
# ------------------------------------------------------------------------------------
def make_optimizer(model: TMModel, cfg: TrainConfig, device) -> torch.optim.AdamW:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **kw)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """AdamW state → (flat tensors for safetensors, json scalars). No pickle."""
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        scalars["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars["state"][str(idx)][k] = v
    return tensors, scalars


def load_optimizer(opt: torch.optim.Optimizer, path: Path, scalars: dict) -> None:
    """optimizer.safetensors + the scalars of train_state.json → opt; a one-line CheckpointError."""
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError (truncated, corrupt), OSError
        raise CheckpointError(f"--resume: cannot read {path}: {_first_line(e)}") from None
    try:
        optimizer_from_files(opt, tensors, scalars)
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"--resume: {path} does not fit this model's optimiser: "
                              f"{_first_line(e)}") from None


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict, scalars: dict) -> None:
    state = {}
    for idx, extra in scalars["state"].items():
        st = dict(extra)
        for key, t in tensors.items():
            i, k = key.split(".", 1)
            if i == idx:
                st[k] = t
        state[int(idx)] = st
    opt.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


# ------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------
def write_checkpoint(out_dir: Path, model, tokenizer, cfg: TrainConfig, log: list[dict], state: dict,
                     opt=None) -> None:
    """One save_checkpoint: a kill at any point of it leaves a complete checkpoint (tmfast.checkpoint)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    extra = {TRAIN_CONFIG_NAME: cfg.to_json(), LOG_NAME: "".join(json.dumps(r) + "\n" for r in log),
             CURVE_NAME: lambda p: plot_curve(log, p, title=f"{cfg.objective} — {out_dir.name}")}
    if opt is not None:
        tensors, scalars = optimizer_to_files(opt)
        extra[OPTIM_NAME] = lambda p: save_file(tensors, str(p))
        state = {**state, "optimizer": scalars}
    extra[STATE_NAME] = json.dumps(state, indent=1) + "\n"
    save_checkpoint(model, out_dir, tokenizer, extra_files=extra)


RESUME_FILES = (CONFIG_NAME, WEIGHTS_NAME, TRAIN_CONFIG_NAME, LOG_NAME, STATE_NAME, OPTIM_NAME)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0].strip()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--resume: cannot read {path}: {_first_line(e)}") from None


def find_resume(out_dir: Path, cfg: TrainConfig, allow_changes: bool, dist: Dist, say) -> dict | None:
    """What --resume continues from. None: out_dir is new (does not exist or is empty), the run
    starts at step 0. A checkpoint that is not resumable, or settings that would change the run
    (see train.config.RESUME_NOTICE_ONLY), raise (exit 2) instead of a silent restart."""
    if dist.master:  # finish or undo a save a kill interrupted, remove killed saves' temp dirs
        for line in recover_checkpoint(out_dir):
            say(f"--resume: {line}")
    dist.barrier()
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        say(f"--resume: no checkpoint in {out_dir} yet (a new run); starting at step 0")
        return None
    if not out_dir.is_dir():
        raise ConfigError(f"--resume: out_dir {out_dir} is not a directory")
    missing = [n for n in RESUME_FILES if not (out_dir / n).is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in out_dir.iterdir())[:8])
        why = " (saved with keep_optimizer=false)" if missing == [OPTIM_NAME] else ""
        raise ConfigError(f"--resume: {out_dir} holds no resumable checkpoint: missing {', '.join(missing)}{why}; "
                          f"found {found}. Refusing to start over it at step 0: drop --resume to overwrite it, "
                          f"or choose another out_dir")
    state = _read_json(out_dir / STATE_NAME)
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
            and isinstance(state.get("optimizer"), dict)):
        raise CheckpointError(f"--resume: {out_dir / STATE_NAME} has no valid step / optimizer state")
    saved = _read_json(out_dir / TRAIN_CONFIG_NAME)
    if not isinstance(saved, dict):
        raise CheckpointError(f"--resume: {out_dir / TRAIN_CONFIG_NAME} is not a JSON object")
    world, dev = state.get("world_size", 1), state.get("device", dist.device.type)
    if (world, dev) != (dist.world, dist.device.type):  # DDP is exact across world sizes; devices round apart
        say(f"--resume: the checkpoint was written by {world} process(es) on {dev}; this run: {dist.world} on "
            f"{dist.device.type}" + (" (equal up to rounding, not bit for bit)" if dev != dist.device.type else ""))
    changed, refused = resume_changes(saved, cfg)
    if changed:
        say(f"--resume: settings differ from the checkpoint's ({TRAIN_CONFIG_NAME}, step {state['step']}):")
        for k, (a, b) in changed.items():
            say(f"  {k}: {a} → {b}" + ("  (changes the run)" if k in refused else ""))
    if refused and not allow_changes:
        raise ConfigError(f"--resume: {', '.join(refused)} changed: the continued run would not be the "
                          f"checkpoint's run (data, model, objective, optimiser, schedule or seed); "
                          f"pass --resume_changes=allow to continue with the new values anyway")
    return {"state": state, "changed": changed}


def plot_curve(log: list[dict], path: Path, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr = [(r["step"], r["loss"]) for r in log if r.get("kind") == "train"]
    ev = [(r["step"], r["val_loss"]) for r in log if r.get("kind") == "eval"]
    evt = [(r["step"], r["train_loss"]) for r in log if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.6, label="train (step)")
    if evt:
        ax.plot(*zip(*evt), "o-", ms=3, label="train (eval)")
    if ev:
        ax.plot(*zip(*ev), "s-", ms=3, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if tr or ev:
        lo = min(v for _, v in tr + ev)
        if lo > 0:
            ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(objective, cfg: TrainConfig, shards, dist: Dist, amp, d: int, vocab: int) -> dict:
    """Mean loss on a fixed set of batches (same every eval) of train and val."""
    objective.eval()
    out = {}
    b = cfg.batch_size // dist.world
    for split, arr in (("train", shards.train), ("val", shards.val)):
        tot: dict = {}
        plans = plan_step(cfg, arr, 0, d, vocab, cfg.eval_iters, cfg.batch_size, seed_stream=1 + (split == "val"))
        for mb in plans:
            mine = mb.slice(dist.rank * b, (dist.rank + 1) * b)
            with amp:
                _, st = objective.module(mine) if hasattr(objective, "module") else objective(mine)
            for k, v in st.items():
                tot[k] = tot.get(k, 0.0) + v.double().cpu()
        tot = dist.all_sum(tot)
        for k, v in summarise(tot).items():
            out[f"{split}_{k}"] = v
    objective.train()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, resume, allow_changes = parse_args(argv)
        return train(cfg, resume, argv, allow_changes=allow_changes)
    except (ConfigError, CheckpointError) as e:  # ConfigError includes DataError
        print(f"error: {e}", file=sys.stderr)
        return 2


def train(cfg: TrainConfig, resume: bool = False, argv: list[str] | None = None,
          allow_changes: bool = False) -> int:
    """allow_changes: --resume may change settings that change the run (--resume_changes=allow)."""
    t_start = time.time()
    dist = Dist(cfg)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.batch_size % dist.world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {dist.world} ranks")
    out_dir = Path(cfg.out_dir)
    say = print if dist.master else (lambda *a, **k: None)
    say(f"tmfast train: {cfg.objective}, {dist.world} process(es) on {dist.device}")
    say("config:\n" + "\n".join(f"  {k} = {json.dumps(v)}" for k, v in cfg.to_dict().items()))
    found = find_resume(out_dir, cfg, allow_changes, dist, say) if resume else None

    # -- data and tokenizer -------------------------------------------------------------
    init_tok = _initial_tokenizer(cfg)
    spec = cfg.tokenizer if init_tok is None else data_mod.tokenizer_spec(init_tok)
    if dist.master:
        data_dir = data_mod.prepare(cfg, init_tok, spec)
    dist.barrier()
    data_dir = data_mod.data_dir_for(cfg, spec)
    shards = data_mod.TokenShards(data_dir)
    tokenizer = init_tok or shards.tokenizer()
    vocab, eos = tokenizer.get_vocab_size(), tokenizer.token_to_id(data_mod.EOS)
    say(f"data: {data_dir} — {len(shards.train):,} train / {len(shards.val):,} val tokens, vocab {vocab}")

    # -- model, optimiser, state ------------------------------------------------------
    log: list[dict] = []
    step, elapsed_before = 0, 0.0
    src = out_dir if found is not None else None
    if src is not None:
        model, _ = load_checkpoint(src)
        model.train()
    else:
        model = build_model(cfg, vocab, eos)
    if model.config.vocab_size < vocab:
        raise ConfigError(f"tokenizer has {vocab} tokens but the model only {model.config.vocab_size}")
    set_trainable(model, cfg)
    model.to(dist.device)
    if src is None and cfg.objective == "maturation" and cfg.head_init == "match_norm" \
            and not _is_maturation_ckpt(cfg.init_from):
        scale = match_head_norm(model, shards.train, cfg)
        say(f"vector head: identity × {scale:.4f} (R / mean ‖h‖ on a training batch)")
    opt = make_optimizer(model, cfg, dist.device)
    if src is not None:
        state = found["state"]
        load_optimizer(opt, src / OPTIM_NAME, state["optimizer"])
        step, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
        try:
            log = [json.loads(line) for line in (src / LOG_NAME).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"--resume: cannot read {src / LOG_NAME}: {_first_line(e)}") from None
        if found["changed"]:
            log.append({"kind": "resume", "step": step,
                        "changed": {k: [a, b] for k, (a, b) in found["changed"].items()}})
        say(f"resumed from {src} at step {step}")
    say(f"model: {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params(trainable_only=True) / 1e6:.2f}M trainable), {json.dumps(model.config.to_dict())}")

    objective = Objective(model, cfg)
    fwd = objective
    if cfg.compile:
        fwd = torch.compile(objective)
    if dist.on:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(fwd, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and dist.device.type == "cuda")
    amp = torch.autocast(dist.device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    d = model.config.n_embd
    b = cfg.batch_size // dist.world
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    R = model.config.table_radius
    renorm = cfg.objective == "maturation" and model.config.table_trainable and model.config.table_normalised

    def checkpoint(final: bool = False):
        if dist.master:
            st = {"step": step, "elapsed_s": elapsed_before + time.time() - t_start, "final": final,
                  "argv": list(argv or []), "world_size": dist.world, "device": dist.device.type,
                  "seed": cfg.seed}
            write_checkpoint(out_dir, model, tokenizer, cfg, log, st, opt if cfg.keep_optimizer else None)
        dist.barrier()

    bar = None
    if cfg.progress and dist.master:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty()
                   else 30.0, desc=cfg.objective)
    t_last = time.time()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        torch.manual_seed(cfg.seed * 31 + step * 1009 + dist.rank)  # dropout RNG: a function of the step
        plans = plan_step(cfg, shards.train, step, d, vocab, cfg.grad_accum, cfg.batch_size)
        norm = sum(float(p.weight.sum()) for p in plans) / dist.world  # DDP averages: scale back
        tot: dict = {}
        for i, mb in enumerate(plans):
            mine = mb.slice(dist.rank * b, (dist.rank + 1) * b)
            if cfg.compile:
                mark_dynamic_tail(mine)
            sync = dist.on and i < len(plans) - 1
            with (fwd.no_sync() if sync else contextlib.nullcontext()), amp:
                loss, st = fwd(mine)
            (loss / norm).backward()
            for k, v in st.items():
                tot[k] = tot.get(k, 0.0) + v.double().cpu()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if renorm:
            with torch.no_grad():
                from tmfast.table import normalise_rows
                model.table.weight.copy_(normalise_rows(model.table.weight, R))
        step += 1
        if _KILL_AT == step:  # test hook: die like a killed job, mid-way between checkpoints
            os.kill(os.getpid(), signal.SIGKILL)
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            s = summarise(dist.all_sum(tot))
            now = time.time()
            tps = tokens_per_step * cfg.log_interval / max(now - t_last, 1e-9) if step % cfg.log_interval == 0 \
                else float("nan")
            t_last = now
            rec = {"kind": "train", "step": step, "lr": lr, "tokens_per_s": round(tps, 1), **s}
            log.append(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{s['loss']:.4f}", tok_s=f"{tps:,.0f}")
        if bar is not None:
            bar.update(1)
        last = step == cfg.max_steps
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or last:
            ev = evaluate(fwd, cfg, shards, dist, amp, d, vocab)
            rec = {"kind": "eval", "step": step, "tokens": step * tokens_per_step,
                   "elapsed_s": round(elapsed_before + time.time() - t_start, 1), "lr": lr,
                   "train_loss": ev["train_loss"], **ev}
            log.append(rec)
            msg = f"step {step}: train {ev['train_loss']:.4f} val {ev['val_loss']:.4f}"
            if "val_front_acc" in ev:
                msg += f" (val mse {ev['val_mse']:.4f} nce {ev['val_nce']:.4f} front-acc {ev['val_front_acc']:.3f})"
            if bar is not None:
                bar.write(msg)
            else:
                say(msg)
        if last or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0):
            checkpoint(final=last)
    if bar is not None:
        bar.close()
    wall = elapsed_before + time.time() - t_start
    evs = [r for r in log if r.get("kind") == "eval"]
    if evs:
        say(f"done: {step} steps, train {evs[-1]['train_loss']:.4f}, val {evs[-1]['val_loss']:.4f}, "
            f"wall {wall:.0f}s; checkpoint {out_dir}")
    # the DDP reducer goes before its process group: left to die with this frame, after
    # destroy_process_group, it hung a rank at exit (seen twice in the 2-rank test, torch 2.13, gloo)
    del fwd
    dist.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
