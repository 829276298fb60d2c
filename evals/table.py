"""The quality table in Markdown: one row per method, COLUMNS in order; skipped rows as dashes."""
from __future__ import annotations

# (metrics key, header, format). The paper's measures first, then the contrastive-search ones
# (Su et al. 2022; "(CS)": pooled over the samples, on words, rep-n in percent; evals.metrics)
COLUMNS = [("dist1", "Dist-1 ↑", "{:.3f}"), ("dist2", "Dist-2 ↑", "{:.3f}"), ("rep2", "Rep-2 ↓", "{:.3f}"),
           ("rep3", "Rep-3 ↓", "{:.3f}"), ("loop_pct", "Loop % ↓", "{:.0f} %"), ("mean_len", "mean len", "{:.1f}"),
           ("judge_ppl", "judge PPL", "{:.1f}"), ("corpus_dist2", "corpus Dist-2 ↑", "{:.3f}"),
           ("rep2_cs", "rep-2 (CS) ↓", "{:.2f}"), ("rep3_cs", "rep-3 (CS) ↓", "{:.2f}"),
           ("rep4_cs", "rep-4 (CS) ↓", "{:.2f}"), ("diversity_cs", "diversity (CS) ↑", "{:.3f}")]


def header(n_prompts: int, source: str, prompt_tokens: int | None, max_new_tokens: int, seed: int,
           judge_name: str | None) -> str:
    """The line above the table: prompts (source; tokens each when windows of the val split), judge."""
    each = f", {prompt_tokens} tokens each" if prompt_tokens is not None else ""
    return (f"{n_prompts} prompts ({source}{each}), {max_new_tokens} new tokens each, seed {seed}; "
            f"judge: {judge_name or 'none'}")


def markdown_table(rows) -> str:
    """rows: objects with .name, .skipped and .metrics (evals.quality.MethodResult)."""
    lines = ["| method | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.name} | " + " | ".join("—" for _ in COLUMNS) + " |")
            continue
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.metrics.get(key)
            cells.append("n/a" if v is None else fmt.format(v))
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    notes = [f"- {r.name}: skipped ({r.skipped})" for r in rows if r.skipped]
    return "\n".join(lines + ([""] + notes if notes else []))
