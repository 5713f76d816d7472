"""What a call is about: the modality of each image and the task (structure name) of each prompt.

Some adapters need more than tensors: context priors pick a prior token per modality and per
task, tag routing picks an expert per modality. The model's signatures stay official, so callers
(the trainer, `segment()`) say it for the duration of a block:

    with adapters.prompt_context(modalities=["mri"], tasks=["liver", "spleen"]):
        emb = model.encode_image(x)                    # 1 image: its modality is "mri"
        logits = model.decode(emb, text_embedding=t)   # 2 prompts: their tasks

`modalities` has one entry per image row of the encoder's batch (or one for all); `tasks` one per
prompt row of the decoder's batch (or one for all). Like routes it lives in a ContextVar.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from ..errors import AdapterError
from ..io.volume import normalize_modality


@dataclass(frozen=True)
class PromptContext:
    modalities: Optional[tuple[str, ...]] = None
    tasks: Optional[tuple[str, ...]] = None

    def modality_rows(self, batch: int) -> tuple[str, ...]:
        """One modality per image row (a single entry broadcasts); AdapterError if unknown."""
        return _rows(self.modalities, batch, "modalities", "image")

    def task_rows(self, batch: int) -> tuple[str, ...]:
        """One task per prompt row (a single entry broadcasts); AdapterError if unknown."""
        return _rows(self.tasks, batch, "tasks", "prompt")

    def key(self) -> tuple:
        return self.modalities, self.tasks


def _rows(values, batch: int, what: str, row: str) -> tuple[str, ...]:
    if values is None:
        raise AdapterError(
            f"this adapter needs the {what} of the call: wrap it in "
            f"adapters.prompt_context({what}=[...]) (one per {row} row)"
        )
    if len(values) == 1:
        return tuple(values) * batch
    if len(values) != batch:
        raise AdapterError(f"prompt_context gives {len(values)} {what} for a batch of {batch} {row} rows")
    return tuple(values)


_CONTEXT: contextvars.ContextVar[Optional[PromptContext]] = contextvars.ContextVar("segevol_fast_context", default=None)


def current_context() -> Optional[PromptContext]:
    return _CONTEXT.get()


@contextlib.contextmanager
def prompt_context(
    modalities: Optional[Sequence[str]] = None, tasks: Optional[Sequence[str]] = None
) -> Iterator[PromptContext]:
    """Declare the modality per image row and the task per prompt row for the calls inside; what
    is not given is inherited from an enclosing prompt_context (segment() declares the scan's
    modality for the call, its decoder steps the tasks of each decode batch). A task may be None:
    a prompt without text."""
    outer = _CONTEXT.get()
    mods = (
        None
        if modalities is None
        else tuple(normalize_modality(m) for m in ([modalities] if isinstance(modalities, str) else modalities))
    )
    tks = None if tasks is None else tuple([tasks] if isinstance(tasks, str) else tasks)
    if outer is not None:
        mods = outer.modalities if mods is None else mods
        tks = outer.tasks if tks is None else tks
    token = _CONTEXT.set(PromptContext(mods, tks))
    try:
        yield _CONTEXT.get()
    finally:
        _CONTEXT.reset(token)
