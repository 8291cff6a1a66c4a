"""The HF engine's tunables: each defined once, with its default, bounds and description.

The user's ``serving`` config section reuses these fields, so the descriptions are written for a
user reading the config reference. Importing this module stays cheap (pydantic only; torch is
imported only to check a ``dtype``): the config imports it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from genloop.serving.engine import EngineOptions


class HFEngineOptions(EngineOptions):
    """How the HF engine runs its model and batches requests."""

    device: str = Field("cpu", description="Torch device of the hf engine: cpu, cuda or cuda:N.")
    max_batch_size: int = Field(
        32, ge=1, description="Most sequences one engine decodes together; more requests wait in its queue."
    )
    max_wait_ms: float = Field(
        5, ge=0, description="When the engine is idle, how long (ms) the first request waits for companions, "
        "so that a burst shares one prefill."
    )
    dtype: str | None = Field(
        None, description="Weights dtype of the hf engine, a torch dtype name (float32, bfloat16, float16); "
        "None keeps the dtype the model was saved in."
    )
    int8: bool = Field(
        False, description="int8 dynamic quantisation of every linear layer of the hf engine (GPT-2's Conv1D "
        "layers converted first); CPU only."
    )
    max_queue_size: int = Field(
        1024, ge=1, description="Requests waiting in an engine beyond this are refused with 429 (overloaded)."
    )
    stream_events_per_step: int = Field(
        8, ge=1, description="Most streamed chunks the hf engine hands out per decoding step; with more streams, "
        "each chunk carries several tokens (a host-overhead cap; ≥ max_batch_size streams every token).",
    )
    max_prefill_tokens: int = Field(
        1024, ge=1, description="Most padded prompt positions in one prefill forward of the hf engine; a burst "
        "of newcomers is prefilled shortest first in groups under this (less padding, earlier first tokens; "
        "a longer prompt runs alone).",
    )

    @model_validator(mode="after")
    def _int8_on_cpu(self) -> HFEngineOptions:
        if self.int8 and not self.device.startswith("cpu"):
            raise ValueError("int8 dynamic quantisation runs on CPU only")
        return self

    @model_validator(mode="after")
    def _dtype_is_a_torch_dtype(self) -> HFEngineOptions:
        if self.dtype is not None:
            import torch

            if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
                raise ValueError(f"dtype {self.dtype!r} is not a torch dtype")
        return self
