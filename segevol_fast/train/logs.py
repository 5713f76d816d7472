"""Where a run's metrics go (rank 0 only, under the run's out_dir):

    train_log.csv / .jsonl       one row per logged step (loss, its parts, lr, grad_norm, ...)
    eval_log.csv / .jsonl        one row per validation: step, dice (over organs and prompt types),
                                 dice_<prompt> for each prompt type, labels (organ-case pairs scored)
    eval_labels.csv / .jsonl     one row per validation, case and organ: step, case, label, a Dice
                                 per prompt type
    tensorboard/                 with tensorboard logging on: the same numbers as scalars,
                                 train/<column>, val/dice, val/dice_<prompt> and
                                 val/<prompt>/<organ> (the organ's mean over cases)

CSV and JSONL are appended to (a resumed run continues them); TensorBoard adds an event file per
run to tensorboard/ and shows them as one curve.
"""

from __future__ import annotations

import math
import pathlib
import re

from ..errors import MissingDependencyError, OutputError
from .metrics import MetricLog

TENSORBOARD_INSTALL = "pip install tensorboard  (or: pip install 'segevol_fast[tensorboard]')"
_NOT_SCALARS = ("step", "epoch")


def tensorboard_writer_class():
    """torch's SummaryWriter; MissingDependencyError with the install line when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise MissingDependencyError(
            f"TensorBoard logging needs the tensorboard package: {TENSORBOARD_INSTALL}"
        ) from exc
    return SummaryWriter


def tag(name: str) -> str:
    """A TensorBoard tag from a column or organ name: "loss[box+text]" -> "loss/box_text",
    "right kidney" -> "right_kidney" (tags allow letters, digits and _ . / - only)."""
    return re.sub(r"[^\w./-]", "_", name.replace("[", "/").replace("]", ""))


class RunLogs:
    """The metric files of one `fit` call; `validating` adds the eval logs, `tensorboard` the event
    files. Close it (or use it as a context manager) to flush everything."""

    def __init__(self, out_dir, validating: bool, tensorboard: bool):
        out = pathlib.Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create the output folder {out}: {exc}") from exc
        self._train = MetricLog(out / "train_log.csv", out / "train_log.jsonl")
        self._eval = self._labels = self._tb = None
        if validating:
            self._eval = MetricLog(out / "eval_log.csv", out / "eval_log.jsonl")
            self._labels = MetricLog(out / "eval_labels.csv", out / "eval_labels.jsonl")
        if tensorboard:
            self._tb = tensorboard_writer_class()(log_dir=str(out / "tensorboard"))

    def train(self, row: dict) -> None:
        self._train.log(row)
        if self._tb is not None:
            for key, value in row.items():
                if key not in _NOT_SCALARS and isinstance(value, (int, float)):
                    self._tb.add_scalar(tag(f"train/{key}"), value, row["step"])

    def validation(self, row: dict, result: dict, prompts) -> None:
        """`row`: the eval_log row; `result`: the validation's summary (`validation.summarize`)."""
        if self._eval is None:
            return
        self._eval.log(row)
        step = row["step"]
        for r in result["per_label"]:
            self._labels.log({"step": step, "case": r["case"], "label": r["label"], **{k: r[k] for k in prompts}})
        if self._tb is not None:
            for key, value in row.items():
                if key.startswith("dice"):
                    self._tb.add_scalar(tag(f"val/{key}"), value, step)
            for organ, scores in result["per_organ"].items():
                for kind, value in scores.items():
                    if math.isfinite(value):
                        self._tb.add_scalar(tag(f"val/{kind}/{organ}"), value, step)
            self._tb.flush()

    def close(self) -> None:
        for log in (self._train, self._eval, self._labels):
            if log is not None:
                log.close()
        if self._tb is not None:
            self._tb.close()
        self._tb = None

    def __enter__(self) -> RunLogs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
