"""The fine-tuning progress bar: one tqdm line of steps with the loss, learning rate and the last
validation Dice in its postfix.

Shown only where someone watches it: on rank 0, when asked (`enabled`), and when its stream is a
terminal or tqdm.auto drew a notebook widget. Logs redirected to a file, CI runs and the other
ranks get nothing, so they are not filled with carriage-return redraws.
"""

from __future__ import annotations

import math
import sys

from .. import distributed as dist_utils


def watched(stream) -> bool:
    """True when `stream` is a terminal, or when running in a notebook (tqdm.auto's widget)."""
    from tqdm.auto import tqdm as auto_tqdm

    if any(c.__module__ == "tqdm.notebook" for c in auto_tqdm.__mro__):  # tqdm.auto chose the widget
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class TrainProgress:
    """Steps done of `total`, from `initial` (a resumed run starts part way)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, file=None):
        from tqdm.auto import tqdm

        file = sys.stderr if file is None else file
        self.enabled = bool(enabled) and dist_utils.is_main() and watched(file)
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc="finetune",
            unit="step",
            file=file,
            disable=not self.enabled,
            dynamic_ncols=True,
        )
        self._postfix: dict[str, str] = {}

    def step(self, row: dict) -> None:
        """One optimizer step done; `row` is the trainer's metric row."""
        self.bar.update(1)
        self._postfix.update(loss=_short(row["loss"], "{:.4f}"), lr=_short(row["lr"], "{:.2e}"))
        self._show()

    def validating(self) -> None:
        self.bar.set_description_str("finetune (validating)")

    def validated(self, dice: float) -> None:
        self.bar.set_description_str("finetune")
        self._postfix["val_dice"] = _short(dice, "{:.4f}")
        self._show()

    def _show(self) -> None:
        self.bar.set_postfix(self._postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()


def _short(value: float, fmt: str) -> str:
    return fmt.format(value) if math.isfinite(value) else str(value)
