"""The generation engine, one job per module (the data flow, bottom up):

  noise.py       counter-based randomness: embryos and noises as a function of (seed, position,
                 slot, purpose), computed inside the step on its device
  step.py        decode_step_tensors / step_window / step_draws: pure functions over tensors,
                 what torch.compile sees (SlotTensors: the batch's device state; StepConstants)
  readback.py    Readback: a step's results device → host in one non-blocking copy
  slots.py       DecodeBatch: max_batch slots over one static KV cache it owns, static buffers
                 and per-bucket views; SlotInfo, the per-slot registry (moving a sequence moves
                 all of its state); launch / collect a step
  requests.py    prompt parsing and fit checks, Sequence (ids, text, stopping, text deltas)
  continuous.py  Engine: continuous batching (add_request / step / abort / request / warmup),
                 RequestEvent; reads results one step behind on CUDA
  closed.py      MaturationEngine: closed batches (generate / stream), StepEvent, GenerationResult
"""
from .closed import GenerationResult, MaturationEngine, StepEvent
from .continuous import STEP_KINDS, Engine, EngineBusyError, RequestEvent, RequestView, check_impl, default_compile_mode
from .requests import (GenerationError, QueueFullError, Sequence, check_fits, max_prompt_chars, prompt_ids,
                       prompt_input, prompt_vectors)
from .slots import DecodeBatch, SlotInfo, StepOutput, row_buckets, span_buckets
from .step import SlotTensors, StepConstants, decode_step_tensors, step_draws, step_window

__all__ = [
    "DecodeBatch", "Engine", "EngineBusyError", "GenerationError", "GenerationResult", "MaturationEngine", "QueueFullError",
    "RequestEvent", "RequestView", "STEP_KINDS", "Sequence", "SlotInfo", "SlotTensors", "StepConstants",
    "StepEvent", "StepOutput", "check_fits", "check_impl", "decode_step_tensors", "default_compile_mode",
    "max_prompt_chars", "prompt_ids", "prompt_input", "prompt_vectors", "row_buckets", "span_buckets",
    "step_draws", "step_window",
]
