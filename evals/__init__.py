"""evals: how good is what a checkpoint generates — the layer above training and the runtime.

    tmfast-eval … / python -m evals …     the quality table (evals.cli; options: --help)
    python -m evals.traces …              maturation traces and their figures
    python -m evals.samples …             side-by-side generations on a few prompts
    python -m evals.sweep …               train short variants, then score what they generate

Modules, one job each:
  metrics   the n-gram rules (Dist-n, Rep-n, Loop %, corpus Dist-n, the contrastive-search
            rep-n / diversity) and perplexity: pure Python on token lists
  prompts   Prompt, prompt files, windows of a checkpoint's validation split
  judges    scoring continuations: a tmfast AR checkpoint or a Hugging Face causal LM
  quality   the methods (AR baselines, maturation settings) run and scored on the same prompts
  table     the Markdown quality table
  traces    per-step, per-slot traces of the liquid tail and their PNGs
  report    machine_info and the quality table's OUT.md / OUT.json
  samples   side-by-side generations with a small table (train's quick look)
  sweep     train/ablations.md: short training variants, scored
  cli       `tmfast-eval`

Arrows point down only: evals imports tmfast (the runtime) and train (the validation split,
the sweep's training runs); neither imports evals.
"""
from tmfast.config import ConfigError


class EvalError(ConfigError):
    """A bad evaluation request (missing checkpoint, prompts that do not fit, ...)."""


__all__ = ["EvalError"]
