"""The generation engine, one job per module (the data flow, bottom up):

  step.py        decode_step / step_window / prefill: pure functions over tensors, what
                 torch.compile sees (SlotTensors: the batch's device state; StepDraws)
  noise.py       EmbryoStream: seeded per-sequence embryos, history and tail noise
  slots.py       DecodeBatch: max_batch slots over one static KV cache it owns; SlotInfo,
                 the per-slot registry (moving a sequence moves all of its state)
  requests.py    prompt parsing and fit checks, Sequence (ids, text, stopping, text deltas)
  continuous.py  Engine: continuous batching (add_request / step / abort / request), RequestEvent
  closed.py      MaturationEngine: closed batches (generate / stream), StepEvent, GenerationResult
"""
from .closed import GenerationResult, MaturationEngine, StepEvent
from .continuous import Engine, RequestEvent, RequestView, check_impl
from .noise import EmbryoStream
from .requests import GenerationError, QueueFullError, Sequence, check_fits, max_prompt_chars, prompt_ids, prompt_vectors
from .slots import DecodeBatch, SlotInfo, StepOutput
from .step import SlotTensors, StepDraws, decode_step, decode_step_tensors, prefill, step_tensors, step_window

__all__ = [
    "DecodeBatch", "EmbryoStream", "Engine", "GenerationError", "GenerationResult", "MaturationEngine",
    "QueueFullError", "RequestEvent", "RequestView", "Sequence", "SlotInfo", "SlotTensors", "StepDraws",
    "StepEvent", "StepOutput", "check_fits", "check_impl", "decode_step", "decode_step_tensors", "max_prompt_chars",
    "prefill", "prompt_ids", "prompt_vectors", "step_tensors", "step_window",
]
