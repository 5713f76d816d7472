"""One progress display for a whole segmentation: load, preprocess, zoom-out, zoom-in, save.

A `Progress` is one tqdm line on stderr that moves through named stages; a stage with a known
number of steps (zoom-in windows) shows a bar, the others their name and elapsed time. It also
times every stage (`timings`, seconds, summed per key), with the display on or off, so the
command line can print timings that include loading the model and the scan and saving the masks.

Who creates it: `segment(progress=True)` makes one for the call and closes it; the CLI makes one
first (stages "load model", "load scan"), passes it as `segment(progress=display)`, adds "save" and
closes it. `run_fast` / `run_exact` report their windows into it through `steps()`; called
directly with progress=True they get a bar of their own, as before.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
import weakref
from typing import Iterator, Optional

_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}]"
_NO_BAR = "{desc} [{elapsed}]"
_OPEN: "weakref.WeakSet[Progress]" = weakref.WeakSet()  # displays with a line on screen, for closing_displays()


class Progress:
    """Stages of one call on one display line; `timings` holds the seconds of each stage key.

    enabled=False keeps the timings and draws nothing (the CLI's --quiet). `bool(progress)` is
    `enabled`, so code written for `progress: bool` keeps working when handed a Progress.
    """

    def __init__(self, enabled: bool = True, file=None, prefix: str = "segevol"):
        self.enabled, self.file, self.prefix = bool(enabled), file, prefix
        self.timings: dict[str, float] = {}
        self._bar = None
        self._key: Optional[str] = None
        self._t_stage = self._t_start = self._t_end = None
        self.closed = False
        self._showwarning = self._shown = None  # warnings.showwarning before / while this display routes it

    def __bool__(self) -> bool:
        return self.enabled

    @property
    def seconds(self) -> float:
        """Wall time from the start of the first stage to close() (or now); 0 before it."""
        if self._t_start is None:
            return 0.0
        return (self._t_end or time.perf_counter()) - self._t_start

    def stage(
        self, name: str, total: Optional[int] = None, unit: str = "step", key: Optional[str] = None
    ) -> "Progress":
        """End the current stage and start `name` (timed under `key`, default `name`).

        With `total`, the display shows a bar that `update()` advances.
        """
        self._end_stage()
        now = time.perf_counter()
        self._key, self._t_stage = key or name, now
        if self._t_start is None:
            self._t_start = now
        if self.enabled and not self.closed:
            bar = self._display(f"{self.prefix} {name}")
            bar.bar_format = _BAR if total else _NO_BAR
            bar.unit = unit
            bar.set_description_str(f"{self.prefix} {name}", refresh=False)
            bar.reset(total=total)  # redraws the line with the new stage
        return self

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def print(self, message: str, file=None) -> None:
        """Print a line (default stdout) above the display instead of into it."""
        if self._bar is None:
            print(message, file=file or sys.stdout)
        else:
            from tqdm import tqdm

            tqdm.write(message, file=file or sys.stdout)

    def close(self, status: str = "done") -> None:
        """End the last stage; leave one line "<status> in <total> s". Safe to call twice."""
        if self.closed:
            return
        self._end_stage()
        self.closed, self._t_end = True, time.perf_counter()
        if self._bar is not None:
            self._bar.bar_format = "{desc}"  # the total only: the last stage's clock would mislead here
            self._bar.set_description_str(f"{self.prefix} {status} in {self.seconds:.1f} s")
            self._bar.close()
            self._bar = None
        self._unroute_warnings()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close("done" if exc_type is None else "stopped")

    def _end_stage(self) -> None:
        if self._key is not None:
            self.timings[self._key] = self.timings.get(self._key, 0.0) + time.perf_counter() - self._t_stage
            self._key = None

    def _display(self, desc: str):
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=None, desc=desc, file=self.file or sys.stderr, bar_format=_NO_BAR, dynamic_ncols=True
            )
            _OPEN.add(self)
            self._route_warnings()
        return self._bar

    def _route_warnings(self) -> None:
        """While the line is on screen, print warnings above it (tqdm.write) instead of into it.

        Only when warnings are printed the default way: under `catch_warnings(record=True)`
        (pytest.warns, recwarn) or a custom `showwarning`, nothing is changed.
        """
        default_impl = getattr(getattr(warnings, "_showwarnmsg_impl", None), "__module__", None) == "warnings"
        if not default_impl or warnings.showwarning is not getattr(warnings, "_showwarning_orig", None):
            return
        self._showwarning = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            from tqdm import tqdm

            text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
            tqdm.write(text, file=file or sys.stderr)

        warnings.showwarning = show
        self._shown = show

    def _unroute_warnings(self) -> None:
        if self._showwarning is not None and warnings.showwarning is self._shown:
            warnings.showwarning = self._showwarning
        self._showwarning = None


class _StageSteps:
    """The steps of the current stage of a Progress, with the update/close interface of a tqdm bar."""

    def __init__(self, progress: Progress):
        self.progress = progress

    def update(self, n: int = 1) -> None:
        self.progress.update(n)

    def close(self) -> None:
        pass  # the stage ends when the next one starts or the display closes


def steps(progress, name: str, total: int, unit: str = "step", key: Optional[str] = None):
    """Something with update(n)/close() for `total` steps of work called `name`, or None:
    a stage of `progress` when it is a Progress; a bar of its own when progress is plain True
    (run_fast / run_exact called directly); None when progress is off."""
    if isinstance(progress, Progress):
        progress.stage(name, total=total, unit=unit, key=key)
        return _StageSteps(progress)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=name, unit=unit)
    return None


def stage(progress, name: str, key: Optional[str] = None) -> None:
    """Start stage `name` when `progress` is a Progress; nothing otherwise (a plain bool)."""
    if isinstance(progress, Progress):
        progress.stage(name, key=key)


@contextlib.contextmanager
def display_for(progress) -> Iterator[Progress]:
    """The Progress a call reports into: `progress` itself when it is one (its creator closes it),
    else a new one, shown when `progress` is true, closed when the block ends (errors included)."""
    if isinstance(progress, Progress):
        yield progress
        return
    with Progress(enabled=bool(progress)) as display:
        yield display


@contextlib.contextmanager
def closing_displays() -> Iterator[None]:
    """Close every display still on screen when the block ends, so that an error message printed
    after a failed run starts on a line of its own (the CLI wraps each command in this)."""
    try:
        yield
    finally:
        for display in list(_OPEN):
            display.close("stopped")  # a completed run closed its own display already
