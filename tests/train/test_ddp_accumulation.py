"""Two gloo processes under torchrun: accumulation with DDP's no_sync gives the gradients of one
process on the whole batch, and segment validation shared over the ranks gives its Dice."""

from __future__ import annotations

import json

import pytest

from tests.launch import run_python

# one process vs two differ in float summation order only (measured ~1e-7 relative)
RTOL = 1e-5

SCRIPT = """
import json, sys, warnings
import torch
from segevol_fast import SegVol, SegVolConfig, adapters, distributed
from segevol_fast.train.cases import cases_from_files
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.trainer import TrainConfig, Trainer

warnings.filterwarnings("ignore")
data, out, accumulate = sys.argv[1], sys.argv[2], int(sys.argv[3])
env = distributed.init_from_env(device="cpu")
torch.set_num_threads(1)
torch.manual_seed(0)
model = SegVol(SegVolConfig.tiny(), tokenizer=data + "/clip_tokenizer")
adapters.add_lora(model, "ct", adapters.LoraConfig(rank=2, alpha=4))
for p in adapters.adapter_parameters(model):
    p.data.normal_(0, 0.05)
organs = {1: "spleen", 2: "kidney_right", 5: "liver", 6: "stomach"}
ct = cases_from_files([(data + "/ct_abdomen_sm.nii.gz", data + "/ct_abdomen_sm_labels.nii.gz")], organs, "ct", "ct")
mr = cases_from_files([(data + "/mr_abdomen_sm.nii.gz", data + "/mr_abdomen_sm_labels.nii.gz")], {1: "liver"}, "mri", "mr")
train = SegmentationDataset(ct + mr + ct + mr, SegVolConfig.tiny().spatial_size, seed=3, unknown_labels="ignore")
cfg = TrainConfig(
    steps=2, batch_size=4, accumulate=accumulate, categories_per_image=2, mixes=("text", "box"), lr=1e-3,
    eval_every=2, eval_mode="segment", eval_zoom_in=False, eval_prompts=("box", "point"),
)
tr = Trainer(model, cfg, train, eval_dataset=ct + mr + ct)
rows = tr.fit(progress=False)
if env.rank == 0:
    with open(out, "w") as f:
        json.dump({"rows": rows, "eval": tr.eval_history}, f)
distributed.shutdown()
"""


def _run(tmp_path, data_dir, nproc: int, accumulate: int) -> dict:
    script, out = tmp_path / "run.py", tmp_path / f"out_{nproc}_{accumulate}.json"
    script.write_text(SCRIPT)
    proc = run_python([str(script)], [str(data_dir), str(out), str(accumulate)], nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_processes_accumulating_match_one_process_on_the_whole_batch(data_dir, tmp_path):
    one = _run(tmp_path, data_dir, 1, 1)
    two = _run(tmp_path, data_dir, 2, 2)  # each rank: 2 images as 2 micro-batches of 1
    assert [r["step"] for r in one["rows"]] == [r["step"] for r in two["rows"]] == [1, 2]
    for a, b in zip(one["rows"], two["rows"]):
        assert a["categories"] == b["categories"] and a["lr"] == b["lr"]
        # no all-reduce after the last micro-batch, or one per micro-batch with a wrong scale, shows here
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=RTOL), (a["step"], key)
    (ev1,), (ev2,) = one["eval"], two["eval"]  # 3 cases: rank 0 segments 2, rank 1 one
    assert ev2["labels"] == ev1["labels"] == 9
    for key in ("dice", "dice_box", "dice_point"):
        assert ev2[key] == pytest.approx(ev1[key], rel=RTOL, abs=1e-6), key
