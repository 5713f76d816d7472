"""`SegVol`: the network (`model.network.SegVolNetwork`) plus whole-scan segmentation.

    model = SegVol.from_pretrained("path/to/weights")      # a SegVol: from_pretrained builds `cls`
    res = model.segment("ct.nii.gz", text="liver")          # inference.segment.segment
    sess = model.session("ct.nii.gz")                       # inference.session.Session

The network below knows nothing of inference; this class is where the two meet, one layer above both.
"""

from __future__ import annotations

from .inference.segment import segment
from .inference.session import Session
from .model.network import SegVolNetwork


class SegVol(SegVolNetwork):
    """SegVol: the network's three calls (`encode_image`, `encode_text`, `decode`), checkpoints
    (`from_pretrained`, `save_pretrained`), and `segment()` / `session()` on whole scans."""

    def session(self, volume, **kwargs) -> Session:
        """An interactive session on one scan (`segevol_fast.inference.session.Session`): the scan
        is encoded once, then `sess.segment(...)` / `sess.refine(...)` answer from the cache."""
        return Session(self, volume, **kwargs)

    def segment(self, volume, text=None, box=None, points=None, point_labels=None, **kwargs):
        """Segment a whole scan with zoom-out-zoom-in: see `segevol_fast.inference.segment.segment`
        for every argument. Returns a SegmentationResult with masks on the input's own grid."""
        return segment(self, volume, text, box, points, point_labels, **kwargs)
