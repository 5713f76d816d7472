"""Validation by the inference users run: `model.segment()` on whole held-out cases, Dice per organ
and per prompt type (text, box, point), the cheap resized check beside it, and the trainer's use of
both (tiny model, shared real CT)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig
from segevol_fast.errors import InvalidArgumentError
from segevol_fast.train import validation
from segevol_fast.train.cases import Case, cases_from_files, cases_from_m3d, original_arrays
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.metrics import dice
from segevol_fast.train.trainer import TrainConfig, Trainer
from tests.train.test_datasets import _write_m3d

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:model weights are random"),
    pytest.mark.filterwarnings("ignore:.*are not in the label map"),
    pytest.mark.filterwarnings("ignore:text prompt"),
]

ORGANS = {1: "spleen", 5: "liver", 2: "kidney_right"}


@pytest.fixture(scope="module")
def small_ct(data_dir, tmp_path_factory):
    """The shared CT at half resolution in-plane (fewer zoom-in windows), scored on spleen, liver
    and right kidney."""
    out = tmp_path_factory.mktemp("small_ct")
    image, label = (nib.load(data_dir / n) for n in ("ct_abdomen_sm.nii.gz", "ct_abdomen_sm_labels.nii.gz"))
    ids = np.asarray(label.dataobj)[::2, ::2, :]
    paths = []
    for name, vol in (("image", image), ("labels", label)):
        nib.save(vol.slicer[::2, ::2, :], out / f"{name}.nii.gz")
        paths.append(out / f"{name}.nii.gz")
    present = {i for i in ORGANS if (ids == i).any()}
    assert present == set(ORGANS)
    return cases_from_files([tuple(paths)], ORGANS, "ct", "small")


@pytest.fixture(scope="module")
def model(data_dir):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")


def _truth(case: Case, label_id: int) -> np.ndarray:
    return np.asarray(nib.load(case.label).dataobj) == label_id


def test_segment_validation_scores_what_segment_returns(model, small_ct):
    """Text and box Dice equal an independent segment() call per organ scored on the scan's grid."""
    (case,) = small_ct
    res = validation.segment_validation(model, small_ct, zoom_in=False)
    rows = res["per_label"]
    assert [r["label"] for r in rows] == ["spleen", "right kidney", "liver"]  # label-id order, SegVol names
    for r in rows:
        label_id = next(i for i, n in case.label_map.items() if n == r["label"])
        truth = _truth(case, label_id)
        text = model.segment(case.image, text=r["label"], modality="ct", zoom_in=False, progress=False)
        assert r["text"] == pytest.approx(dice(next(iter(text.masks.values())), truth))
        where = np.nonzero(truth)
        box = [int(w.min()) for w in where] + [int(w.max()) for w in where]
        boxed = model.segment(case.image, box=box, modality="ct", zoom_in=False, progress=False)
        assert r["box"] == pytest.approx(dice(next(iter(boxed.masks.values())), truth))
        assert 0.0 <= r["point"] <= 1.0
    assert res["mean"]["box"] == pytest.approx(np.mean([r["box"] for r in rows]))
    assert res["dice"] == pytest.approx(np.mean([r[k] for r in rows for k in ("text", "box", "point")]))
    assert set(res["per_organ"]) == {"spleen", "right kidney", "liver"}
    # the clicks are drawn from a fixed seed: the same scores every time
    assert (
        validation.segment_validation(model, small_ct, ("point",), zoom_in=False)["mean"]["point"]
        == (res["mean"]["point"])
    )


def test_segment_validation_runs_the_zoom_in(model, small_ct):
    (case,) = small_ct
    res = validation.segment_validation(model, small_ct, ("text",), zoom_in=True)
    spleen = res["per_label"][0]
    full = model.segment(case.image, text="spleen", modality="ct", progress=False)
    assert spleen["text"] == pytest.approx(dice(full.masks["spleen"], _truth(case, 1)))
    assert max(full.zoom_in_windows.values()) > 0  # the zoom-in really ran in the compared call


def test_clicks_lie_inside_the_organ_and_prefer_its_interior():
    mask = np.zeros((9, 9, 9), dtype=bool)
    mask[2:7, 2:7, 2:7] = True
    clicks = validation.organ_clicks(mask, 5, np.random.default_rng(0))
    assert clicks.shape == (5, 3) and len({tuple(c) for c in clicks}) == 5
    assert all(((c >= 3) & (c <= 5)).all() for c in clicks)  # interior: not on the cube's faces
    thin = np.zeros((5, 5, 5), dtype=bool)
    thin[2, 2, 1:4] = True  # no interior voxel: any voxel of the organ
    assert all(thin[tuple(c)] for c in validation.organ_clicks(thin, 2, np.random.default_rng(0)))


def test_ignore_label_voxels_count_for_neither_side(model, small_ct, tmp_path):
    """nnU-Net's "ignore" id: its voxels are left out of both the prediction and the truth."""
    (case,) = small_ct
    ids = nib.load(case.label)
    arr = np.asarray(ids.dataobj).copy()
    liver = arr == 5
    arr[: arr.shape[0] // 2][~liver[: arr.shape[0] // 2]] = 99  # half the scan unannotated, liver kept
    nib.save(nib.Nifti1Image(arr, ids.affine), tmp_path / "ign.nii.gz")
    ignored = Case(case.image, tmp_path / "ign.nii.gz", {5: "liver"}, "ct", "small", "ign", ignore_ids=(99,))
    _, masks, annotated = original_arrays(ignored)
    assert list(masks) == [5] and annotated is not None and not annotated[arr == 99].any()
    (row,) = validation.segment_validation(model, [ignored], ("text",), zoom_in=False)["per_label"]
    pred = model.segment(case.image, text="liver", modality="ct", zoom_in=False, progress=False).masks["liver"]
    assert row["text"] == pytest.approx(dice(pred & annotated, liver))


def test_m3d_cases_are_validated_as_stored(model, tmp_path):
    ((x, stored),) = _write_m3d(tmp_path, n=1)
    cases = cases_from_m3d(tmp_path, "0007")
    image, masks, _ = original_arrays(cases[0])
    assert np.array_equal(image, x) and sorted(masks) == [1, 3]  # the channel of label 2 is empty
    assert np.array_equal(masks[3], stored[2])
    res = validation.segment_validation(model, cases, ("box",), zoom_in=False)
    assert [r["label"] for r in res["per_label"]] == ["liver", "gall bladder"]
    pred = model.segment(image, box=[3, 2, 1, 6, 5, 4], modality="ct", zoom_in=False, progress=False)
    assert res["per_label"][0]["box"] == pytest.approx(dice(next(iter(pred.masks.values())), masks[1]))


def test_ranks_share_the_cases_and_gather_the_rows(model, small_ct, monkeypatch):
    """Under DDP rank r validates cases r, r + W, ...; the gathered rows are the one-process ones."""
    cases = small_ct * 3
    alone = validation.segment_validation(model, cases, ("box",), zoom_in=False)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(validation.dist_utils, "rank", lambda r=rank: r)
        monkeypatch.setattr(validation.dist_utils, "world_size", lambda: 2)
        monkeypatch.setattr(validation.dist_utils, "all_gather_objects", lambda rows: [rows])
        shares.append(validation.segment_validation(model, cases, ("box",), zoom_in=False)["per_label"])
    assert sorted({r["index"] for r in shares[0]}) == [0, 2] and sorted({r["index"] for r in shares[1]}) == [1]
    assert validation.summarize(shares[0] + shares[1], ("box",)) == alone


def test_prompts_and_modes_are_checked(model, small_ct):
    with pytest.raises(InvalidArgumentError):
        validation.segment_validation(model, small_ct, ("jittered_box",))
    with pytest.raises(InvalidArgumentError):
        validation.segment_validation(model, small_ct, ("text",), points=0)
    with pytest.raises(InvalidArgumentError):
        TrainConfig(eval_mode="zoom")
    with pytest.raises(InvalidArgumentError):
        TrainConfig(eval_mode="segment", best_metric="dice_jittered_box")
    assert TrainConfig(eval_mode="segment", eval_prompts=["box"], best_metric="dice_box").eval_prompts == ("box",)


def test_trainer_validates_with_segment_and_logs_per_organ(model, small_ct, tmp_path):
    train = SegmentationDataset(small_ct, SegVolConfig.tiny().spatial_size, train=False, unknown_labels="ignore")
    cfg = TrainConfig(
        steps=1,
        batch_size=1,
        categories_per_image=1,
        mixes=("box",),
        eval_mode="segment",
        eval_zoom_in=False,
        out_dir=str(tmp_path),
    )
    tr = Trainer(model, cfg, train, eval_dataset=small_ct)
    tr.fit(progress=False)
    (row,) = tr.eval_history
    assert set(row) == {"step", "dice", "dice_text", "dice_box", "dice_point", "labels"} and row["labels"] == 3
    assert row["dice"] == pytest.approx((row["dice_text"] + row["dice_box"] + row["dice_point"]) / 3)
    logged = [json.loads(x) for x in (tmp_path / "eval_labels.jsonl").read_text().splitlines()]
    assert [r["label"] for r in logged] == ["spleen", "right kidney", "liver"]
    assert all(r["step"] == 1 and set(r) == {"step", "case", "label", "text", "box", "point"} for r in logged)
    assert json.loads((tmp_path / "eval_log.jsonl").read_text())["dice"] == pytest.approx(row["dice"])


def test_resized_validation_keeps_its_rows_and_adds_the_summary(model, small_ct):
    data = SegmentationDataset(small_ct, SegVolConfig.tiny().spatial_size, train=False, unknown_labels="ignore")
    res = validation.resized_validation(model, data, ("text", "box"))
    assert res["per_label"] and set(res["mean"]) == {"text", "box"}
    assert res["dice"] == pytest.approx((res["mean"]["text"] + res["mean"]["box"]) / 2)


def test_segment_validation_leaves_the_training_untouched(data_dir, small_ct):
    """A run validated with segment() every step trains bit for bit like one never validated: the
    validation draws nothing from the global RNG (LoRA dropout does), puts the model back in train
    mode, and the names it meets first enter the text cache as training would encode them."""
    from segevol_fast import adapters

    train = SegmentationDataset(small_ct, SegVolConfig.tiny().spatial_size, train=True, unknown_labels="ignore")
    rows = []
    for eval_every in (0, 1):
        with torch.random.fork_rng():
            torch.manual_seed(1)
            model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
            adapters.add_lora(model, "ct", adapters.LoraConfig(rank=2, alpha=4, dropout=0.2))
            for p in adapters.adapter_parameters(model):
                p.data.normal_(0, 0.05)
        cfg = TrainConfig(
            steps=4,
            batch_size=1,
            categories_per_image=1,  # names first met in validation: its text cache entries are used later
            mixes=("text", "box"),
            eval_every=eval_every,
            eval_mode="segment",
            eval_zoom_in=False,
            lr=1e-3,
        )
        tr = Trainer(model, cfg, train, eval_dataset=small_ct if eval_every else None)
        rows.append([{k: v for k, v in r.items() if k != "step_time"} for r in tr.fit(progress=False)])
        assert len(tr.eval_history) == (4 if eval_every else 0)
    assert rows[0] == rows[1]


def test_organs_in_chunks_score_as_in_one_call(model, small_ct, monkeypatch):
    """Many organs (TotalSegmentator: over 100) are segmented a few per call, so that only a few
    scan-sized masks are held at a time; the scores are those of one call with all of them."""
    whole = validation.segment_validation(model, small_ct, zoom_in=False)
    monkeypatch.setattr(validation, "ORGANS_PER_CALL", 2)
    assert validation.segment_validation(model, small_ct, zoom_in=False) == whole


def test_label_masks_are_made_when_asked(small_ct):
    _, masks, _ = original_arrays(small_ct[0])
    assert list(masks) == [1, 2, 5] and len(masks) == 3 and 3 not in masks
    assert masks[5].dtype == bool and masks[5].shape == nib.load(small_ct[0].label).shape
    assert masks[5] is not masks[5]  # a new array each time: none is kept
    with pytest.raises(KeyError):
        masks[4]


def test_a_mixture_is_routed_per_scan_as_in_training(data_dir, abdomen_cases):
    """A model holding one mixture of adapters is validated with segment(adapter="auto"): the MR
    scan goes through its expert, as its training steps did, not the adapter that happens to be set."""
    from segevol_fast import adapters

    with torch.random.fork_rng():
        torch.manual_seed(2)
        model = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
        cfg = adapters.MixtureConfig(
            experts=("mr",), routing="tag", tags={"ct": "identity", "mri": "mr"}, lora=adapters.LoraConfig(rank=2)
        )
        adapters.add_mixture(model, "moa", cfg)
        for p in adapters.adapter_parameters(model):
            p.data.normal_(0, 0.5)
    (mr,) = abdomen_cases["mri"]
    (row,) = validation.segment_validation(model, [mr], ("text",), zoom_in=False)["per_label"][:1]
    name, label_id = row["label"], next(i for i, n in mr.label_map.items() if n == row["label"])
    truth = np.asarray(nib.load(mr.label).dataobj) == label_id

    def scored(adapter):
        res = model.segment(mr.image, text=name, modality="mri", zoom_in=False, progress=False, adapter=adapter)
        return res.masks[name]

    routed, base = scored("auto"), scored("base")
    assert not np.array_equal(routed, base)  # the expert changes the masks: the comparison means something
    assert row["text"] == pytest.approx(dice(routed, truth))
