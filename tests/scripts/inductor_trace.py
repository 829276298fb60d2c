"""Trace the engine's compiled step with the Triton kernels through inductor, without a GPU, and
report what its post-grad graph does with the kernels' inputs (run by tests/test_kernels_inductor.py
in a subprocess: it needs TRITON_INTERPRET unset and patches Triton's driver).

Nothing launches: the step is traced (dynamo → AOT autograd → inductor's post-grad passes) and
the graph is captured by a post-grad hook that then stops the compile. Inductor's mutation
analysis of a user Triton kernel lowers it to TTIR for the active driver's target; an AOT-only
driver answers sm_90 here, as a real one would on an H100. (Without a target the analysis
fails and inductor assumes every input is written: the table then shows up among the inputs a
kernel call clones — which is what the test rules out.)
"""
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402

real_available = torch.cuda.is_available
torch.cuda.is_available = lambda: True  # register the Triton ops (registration needs a place to run them)
import csrc_triton as ct  # noqa: E402
import csrc_triton._common as common  # noqa: E402
torch.cuda.is_available = real_available
common.INTERPRET = True  # resolve_impl: Triton for CPU tensors (the step is only traced, never run)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402


class AotDriver:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def is_active(self):
        return True


triton.runtime.driver.set_active(AotDriver())

import torch._inductor.config as icfg  # noqa: E402

graphs = []


class Traced(Exception):
    pass


def capture(graph):
    graphs.append(graph)
    raise Traced


icfg.post_grad_custom_post_pass = capture

from tmfast import GenerationConfig  # noqa: E402
from tmfast.engine import Engine  # noqa: E402
from tmfast.testing import tiny_model  # noqa: E402

kind = sys.argv[1]  # "tail" (update + commit) or "front" (commit alone)
model = tiny_model(vocab_size=300)
engine = Engine(model, max_batch=2, max_len=64, k_window=4, compile=True, compile_mode="default", impl="triton")
engine.add_request([1, 2, 3], GenerationConfig(max_new_tokens=4, tail=4, alpha_max=0.6 if kind == "tail" else 1.0,
                                               guidance=2.0, seed=0))
error = None
try:
    engine.step()
except Exception as e:  # the hook's Traced, wrapped by inductor; anything else is a failure
    if "Traced" not in f"{type(e).__name__}: {e}":
        error = f"{type(e).__name__}: {e}"[:500]
table = engine._batch.consts.commit_table
report = {"error": error, "graphs": len(graphs), "kernels": [], "table_copies": []}
if graphs:
    g = graphs[0]
    def is_table(n):  # a (V, d) tensor: the table, or a view or copy of it
        v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
        return isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(table.shape)
    table_nodes = [n for n in g.nodes if n.op == "placeholder" and is_table(n)]
    for n in g.nodes:
        if "triton_kernel_wrapper" in str(n.target):
            kw = n.kwargs["kwargs"]
            names = [k for k, v in kw.items() if is_table(v)]
            report["kernels"].append({"reads_table_as": names, "clones": list(n.kwargs.get("tensors_to_clone", []))})
            report["table_copies"] += [k for k in names if k in n.kwargs.get("tensors_to_clone", [])]
        elif any(a in table_nodes for a in n.args if isinstance(a, torch.fx.Node)) and \
                any(w in str(n.target) for w in ("clone", "copy", "contiguous", "_to_copy")):
            report["table_copies"].append(str(n.target))
    report["table_inputs"] = len(table_nodes)
print(json.dumps(report))
