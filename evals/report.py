"""What a measurement ran on (machine_info, for every bench/ and evals/ result) and the
quality table's files: OUT.md (header + table) and OUT.json (settings, metrics, every sample)."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_quality(base: str | Path, header: str, table: str, settings: dict, rows, prompts, tokenizer,
                  wall_s: float) -> tuple[Path, Path]:
    """base.md and base.json; rows: evals.quality.MethodResult, prompts: evals.prompts.Prompt."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    doc = {"settings": settings, "header": header, "table": table,
           "methods": [{"name": r.name, "kind": r.kind, "settings": r.settings, "skipped": r.skipped,
                        "metrics": r.metrics,
                        "samples": [{"prompt": p.text, "prompt_ids": p.ids, "token_ids": s,
                                     "text": tokenizer.decode(s)} for p, s in zip(prompts, r.samples)]}
                       for r in rows],
           "run_info": {"argv": sys.argv, "machine": machine_info(), "wall_s": round(wall_s, 1),
                        "method_s": {r.name: round(r.seconds, 1) for r in rows}}}
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    js.write_text(json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n")
    md.write_text(header + "\n\n" + table + "\n")
    return md, js
