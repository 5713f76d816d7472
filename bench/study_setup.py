"""What the studies (adaptation_study.py, small_model.py, robustness_study.py) set up the same way:
the process (threads, the warnings they trigger on purpose), the training recipe they share, and
their line charts."""

from __future__ import annotations

import contextlib
import warnings

import torch

from segevol_fast.errors import VocabularyWarning
from segevol_fast.train.trainer import TrainConfig


def study_process(threads: int) -> None:
    """torch CPU threads (0: torch's default) and the warnings a study raises by design: the shared
    label files hold many more TotalSegmentator ids than a study trains (dropped on purpose), and
    several structures trained here (gray matter, spinal cord, autochthon...) are outside SegVol's
    published vocabulary (said in the docs)."""
    if threads > 0:
        torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*are not in the label map.*", category=UserWarning)
    warnings.filterwarnings("ignore", category=VocabularyWarning)


def study_train_config(steps: int, lr: float, seed: int, out_dir, **fields) -> TrainConfig:
    """AdamW at `lr` with 5% warmup and cosine decay, weight decay 1e-5, gradient clipping at 1,
    logs every 10 steps under out_dir; `fields` set or override any other TrainConfig field."""
    recipe = dict(weight_decay=1e-5, warmup_steps=max(1, steps // 20), grad_clip=1.0, log_every=10)
    return TrainConfig(steps=steps, lr=lr, seed=seed, out_dir=str(out_dir), **{**recipe, **fields})


@contextlib.contextmanager
def line_chart(path, xlabel: str, ylabel: str, size=(6, 4)):
    """Yield the axes of a one-panel chart of Dice (0 to 1), written to `path` as a PNG on exit."""
    import matplotlib

    matplotlib.use("Agg")  # a file, no window: works without a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
