"""Training datasets: case discovery (MSD, nnU-Net v2, M3D-Seg, plain files), the official
preprocessing of image and labels, augmentation, the modality-balanced sampler and the loader."""

from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segevol_fast.errors import InvalidArgumentError, ShapeError, VolumeNotFoundError
from segevol_fast.preprocess import preprocess_ref
from segevol_fast.train import augment
from segevol_fast.train.cases import (
    cases_from_decathlon,
    cases_from_files,
    cases_from_m3d,
    cases_from_nnunet,
    discover_cases,
    read_m3d_mask,
    segvol_name,
)
from segevol_fast.train.datasets import SegmentationDataset
from segevol_fast.train.loader import ModalityBalancedSampler, make_loader
from segevol_fast.vocabulary import NAMES

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (8, 16, 16)


# ------------------------------------------------------------------------------ helpers
def _phantom(shape=(20, 18, 10)):
    """An int16 'scan' (X, Y, Z) with two boxes of label ids 1 and 2, and a dark border so that the
    foreground crop is a strict sub-box."""
    rng = np.random.default_rng()
    img = rng.integers(-1000, -900, size=shape).astype(np.int16)
    lab = np.zeros(shape, dtype=np.uint8)
    img[2:-2, 2:-2, 1:-1] = rng.integers(0, 200, size=(shape[0] - 4, shape[1] - 4, shape[2] - 2))
    lab[4:9, 5:10, 2:6] = 1
    lab[11:15, 3:8, 4:8] = 2
    img[lab > 0] += 300
    return img, lab


def _save(path, arr):
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))


def _expected_crop_labels(img, lab, ids):
    """Independent expectation: the reference preprocessing's crop box applied to the label map,
    axes reversed, one mask per id."""
    ref = preprocess_ref(img)
    (z0, y0, x0), (z1, y1, x1) = ref.start, ref.end
    crop = lab[x0:x1, y0:y1, z0:z1].transpose(2, 1, 0)
    return ref, np.stack([crop == i for i in ids])


def _write_msd(root, n=2, channels=1):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training, arrays = [], []
    for k in range(n):
        img, lab = _phantom()
        data = img if channels == 1 else np.stack([img] + [img[::-1].copy()] * (channels - 1), -1)
        _save(root / "imagesTr" / f"case_{k}.nii.gz", data)
        _save(root / "labelsTr" / f"case_{k}.nii.gz", lab)
        training.append({"image": f"./imagesTr/case_{k}.nii.gz", "label": f"./labelsTr/case_{k}.nii.gz"})
        arrays.append((img, lab))
    desc = {
        "name": "Task99_Toy",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "Liver", "2": "kidney_left"},
        "numTraining": n,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return arrays


def _write_nnunet(root, n=2):
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    arrays = []
    for k in range(n):
        img, lab = _phantom()
        _save(root / "imagesTr" / f"toy_{k:03d}_0000.nii.gz", img)
        _save(root / "labelsTr" / f"toy_{k:03d}.nii.gz", lab)
        arrays.append((img, lab))
    desc = {
        "channel_names": {"0": "T2"},
        "labels": {"background": 0, "liver": 1, "kidney_right": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(desc))
    return arrays


def _save_csr(path, masks):
    """What scipy.sparse.save_npz writes for csr_matrix(masks.reshape(C, -1)), built by hand."""
    flat = masks.reshape(masks.shape[0], -1).astype(np.int32)
    rows, cols = np.nonzero(flat)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=flat.shape[0]))]).astype(np.int32)
    np.savez_compressed(
        path,
        indices=cols.astype(np.int32),
        indptr=indptr,
        format=b"csr",
        shape=np.array(flat.shape),
        data=flat[rows, cols],
    )


def _write_m3d(root, code="0007", n=2):
    folder = root / code
    arrays, train = [], []
    for k in range(n):
        case = folder / f"case_{k:05d}"
        case.mkdir(parents=True)
        x = np.random.default_rng().normal(size=(14, 12, 9)).astype(np.float32)
        x[0], x[:, -1] = -5.0, -5.0  # the minimum: min-max sends it to 0, outside the crop
        masks = np.zeros((3,) + x.shape, dtype=bool)
        masks[0, 3:7, 2:6, 1:5] = True
        masks[2, 8:12, 5:9, 3:8] = True  # channel 1 (label 2) stays empty
        np.save(case / "image.npy", x[None])
        _save_csr(case / f"mask_{masks.shape}.npz", masks)
        train.append(
            {"image": f"{code}/case_{k:05d}/image.npy", "label": f"{code}/case_{k:05d}/mask_{masks.shape}.npz"}
        )
        arrays.append((x, masks))
    desc = {
        "name": f"{code} Dataset",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "Right Kidney", "3": "gall bladder"},
        "train": train,
        "test": [],
    }
    (folder / f"{code}.json").write_text(json.dumps(desc))
    return arrays


@pytest.fixture(scope="module")
def shared_cases(data_dir):
    lm = json.loads((data_dir / "labels.json").read_text())
    ct = cases_from_files(
        [(data_dir / "ct_abdomen_sm.nii.gz", data_dir / "ct_abdomen_sm_labels.nii.gz")], lm["ct"], "ct", "totalseg-ct"
    )
    mr = cases_from_files(
        [(data_dir / "mr_abdomen_sm.nii.gz", data_dir / "mr_abdomen_sm_labels.nii.gz")], lm["mr"], "MR", "totalseg-mr"
    )
    return ct + mr


# ------------------------------------------------------------------------------ names
@pytest.mark.parametrize(
    "raw, want",
    [
        ("kidney_right", "right kidney"),
        ("inferior_vena_cava", "inferior vena cava"),
        ("Liver", "liver"),
        ("adrenal_gland_left", "left adrenal gland"),
        ("vertebrae_L3", "vertebrae l3"),
        ("rib_left_7", "rib left 7"),
        ("kidney left", "kidney left"),
        ("  Spleen ", "spleen"),
    ],
)
def test_segvol_name(raw, want):
    assert segvol_name(raw) == want


def test_shared_label_names_are_segvol_names(data_dir):
    lm = json.loads((data_dir / "labels.json").read_text())
    names = {segvol_name(v) for v in lm["ct"].values()} | {segvol_name(v) for v in lm["mr"].values()}
    known = {
        "liver",
        "spleen",
        "right kidney",
        "left kidney",
        "gallbladder",
        "stomach",
        "pancreas",
        "aorta",
        "inferior vena cava",
        "esophagus",
        "duodenum",
        "right adrenal gland",
        "left adrenal gland",
        "trachea",
    }
    assert known <= names and known <= NAMES


# ------------------------------------------------------------------------------ layouts
def test_msd_layout_discovered_and_loaded(tmp_path):
    arrays = _write_msd(tmp_path / "Task99_Toy")
    cases = discover_cases(tmp_path / "Task99_Toy")
    assert [c.case_id for c in cases] == ["case_0", "case_1"]
    assert cases[0].modality == "ct" and cases[0].dataset == "Task99_Toy"
    assert dict(cases[0].label_map) == {1: "liver", 2: "left kidney"}
    ds = SegmentationDataset(cases, SIZE, train=False)
    for k, (img, lab) in enumerate(arrays):
        prep = ds.prepared(k)
        ref, want = _expected_crop_labels(img, lab, [1, 2])
        assert prep.names == ["liver", "left kidney"]
        assert torch.equal(prep.labels, torch.from_numpy(want))
        torch.testing.assert_close(prep.image, ref.image[0], atol=1e-5, rtol=0)
        s = ds[k]
        assert s["image"].shape == (1,) + SIZE and s["labels"].shape == (2,) + SIZE


def test_msd_multichannel_uses_channel_0(tmp_path):
    arrays = _write_msd(tmp_path / "T", n=1, channels=2)
    prep = SegmentationDataset(cases_from_decathlon(tmp_path / "T"), SIZE).prepared(0)
    ref, _ = _expected_crop_labels(*arrays[0], [1])
    torch.testing.assert_close(prep.image, ref.image[0], atol=1e-5, rtol=0)


def test_nnunet_layout_discovered_and_loaded(tmp_path):
    arrays = _write_nnunet(tmp_path / "Dataset001_Toy")
    cases = discover_cases(tmp_path / "Dataset001_Toy")
    assert [c.case_id for c in cases] == ["toy_000", "toy_001"]
    assert cases[1].image.name == "toy_001_0000.nii.gz" and cases[1].modality == "mri"
    ds = SegmentationDataset(cases, SIZE)
    prep = ds.prepared(1)
    _, want = _expected_crop_labels(*arrays[1], [1, 2])
    assert prep.names == ["liver", "right kidney"]
    assert torch.equal(prep.labels, torch.from_numpy(want))


def test_nnunet_ignore_label_is_not_a_category(tmp_path):
    root = tmp_path / "D"
    _img, lab = _write_nnunet(root, n=1)[0]
    lab = lab.copy()
    lab[0:3] = 3
    _save(root / "labelsTr" / "toy_000.nii.gz", lab)
    desc = json.loads((root / "dataset.json").read_text())
    desc["labels"]["ignore"] = 3
    (root / "dataset.json").write_text(json.dumps(desc))
    cases = cases_from_nnunet(root)
    assert cases[0].ignore_ids == (3,) and 3 not in cases[0].label_map
    assert SegmentationDataset(cases, SIZE)[0]["names"] == ["liver", "right kidney"]


def test_m3d_card_naming_ct_gt_folders(tmp_path):
    """The dataset card's variant: <code>/ct/<case>.npy and <code>/gt/<case>.(C, X, Y, Z).npz."""
    (tmp_path / "0000" / "ct").mkdir(parents=True)
    (tmp_path / "0000" / "gt").mkdir()
    x = np.random.default_rng().normal(size=(6, 5, 4)).astype(np.float32)
    masks = np.random.default_rng().random((2, 6, 5, 4)) > 0.7
    np.save(tmp_path / "0000" / "ct" / "case_7.npy", x[None])
    _save_csr(tmp_path / "0000" / "gt" / f"case_7.{masks.shape}.npz", masks)
    desc = {
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "train": [{"image": "0000/ct/case_7.npy", "label": f"0000/gt/case_7.{masks.shape}.npz"}],
    }
    (tmp_path / "0000" / "0000.json").write_text(json.dumps(desc))
    cases = cases_from_m3d(tmp_path, "0000")
    assert cases[0].case_id == "case_7" and cases[0].modality == "ct"
    assert np.array_equal(read_m3d_mask(cases[0].label), masks)


def test_m3d_layout_loaded_labels_equal_source(tmp_path):
    arrays = _write_m3d(tmp_path)
    cases = cases_from_m3d(tmp_path, "0007")
    assert discover_cases(tmp_path / "0007")[1].image == cases[1].image
    assert cases[0].kind == "m3d" and cases[0].modality == "ct" and cases[0].case_id == "case_00000"
    ds = SegmentationDataset(cases, SIZE, train=False)
    for k, (x, masks) in enumerate(arrays):
        assert np.array_equal(read_m3d_mask(cases[k].label), masks)
        prep = ds.prepared(k)
        # independent expectation: min-max, crop to voxels above the minimum, axes reversed
        nz = np.nonzero(x > x.min())
        box = tuple(slice(a.min(), a.max() + 1) for a in nz)
        want_img = ((x - x.min()) / (x.max() - x.min()))[box].transpose(2, 1, 0)
        torch.testing.assert_close(prep.image[0], torch.from_numpy(np.ascontiguousarray(want_img)), atol=1e-6, rtol=0)
        want = masks[(slice(None),) + box].transpose(0, 3, 2, 1)[[0, 2]]  # the empty channel is dropped
        assert prep.names == ["liver", "gall bladder"] and prep.ids == [1, 3]
        assert torch.equal(prep.labels, torch.from_numpy(np.ascontiguousarray(want)))
        assert ds[k]["labels"].shape == (2,) + SIZE


# ------------------------------------------------------------------------------ shared real cases
def test_shared_samples_shapes_and_names(shared_cases):
    ds = SegmentationDataset(shared_cases, SIZE, seed=3, intensity_prob=0.0)
    for i in range(4):
        s = ds[i]
        c = shared_cases[i % 2]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (1,) + SIZE
        assert s["labels"].dtype == torch.float32 and s["labels"].shape[1:] == SIZE
        assert s["labels"].shape[0] == len(s["names"]) > 5
        assert set(torch.unique(s["labels"]).tolist()) <= {0.0, 1.0}
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert s["modality"] == c.modality and s["dataset"] == c.dataset and s["case"] == c.case_id
        assert {"liver", "spleen", "right kidney", "left kidney"} <= set(s["names"])
        assert all(n == n.lower() and "_" not in n for n in s["names"])
    assert [ds[i]["modality"] for i in range(2)] == ["ct", "mri"]


def test_positive_crop_contains_foreground(shared_cases):
    ds = SegmentationDataset(shared_cases, SIZE, crop_mode="crop", pos_fraction=1.0, seed=11)
    for i in range(6):
        assert ds[i]["labels"].sum() > 0


def test_eval_deterministic_and_same_index_identical(shared_cases):
    ev = SegmentationDataset(shared_cases[:1], SIZE, train=False)
    a, b = ev[0], ev[0]
    ev.set_epoch(5)
    c = ev[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["image"], c["image"])
    assert torch.equal(a["labels"], c["labels"])
    tr1 = SegmentationDataset(shared_cases, SIZE, seed=7, rotation_deg=20.0)
    tr2 = SegmentationDataset(shared_cases, SIZE, seed=7, rotation_deg=20.0, cache=False)
    tr1.set_epoch(2)
    tr2.set_epoch(2)
    for i in (0, 3):
        x, y = tr1[i], tr2[i]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["labels"], y["labels"])
    assert torch.equal(tr1[(2, 3)]["image"], tr1[3]["image"])  # (epoch, i) form = set_epoch form


def test_different_epoch_different_crop(shared_cases):
    ds = SegmentationDataset(shared_cases, SIZE, crop_mode="crop", seed=1)
    first = [ds[i]["image"] for i in range(4)]
    ds.set_epoch(1)
    second = [ds[i]["image"] for i in range(4)]
    assert sum(not torch.equal(a, b) for a, b in zip(first, second)) >= 3


def test_rotation_zero_leaves_labels_exact(shared_cases):
    """Train samples without rotation, flips or intensity equal an independently resized one-hot."""
    ds = SegmentationDataset(
        shared_cases[1:],
        SIZE,
        crop_mode="resize",
        rotation_deg=0.0,
        flip_prob=0.0,
        intensity_prob=0.0,
        seed=int(torch.randint(1000, ())),
    )
    s = ds[int(torch.randint(100, ()))]
    c = shared_cases[1]
    img = nib.load(str(c.image)).get_fdata().astype(np.float32)
    lab = np.asarray(nib.load(str(c.label)).dataobj)
    ids = sorted(set(np.unique(lab).tolist()) - {0})
    _ref, masks = _expected_crop_labels(img, lab, ids)
    keep = [k for k in range(len(ids)) if masks[k].any()]
    t = torch.from_numpy(masks[keep]).float()[None]
    pads = []
    for n, sz in zip(reversed(t.shape[2:]), reversed(SIZE)):
        e = max(sz - n, 0)
        pads += [e // 2, e - e // 2]
    want = F.interpolate(F.pad(t, pads), size=SIZE, mode="area")[0] >= 0.5
    assert s["names"] == [segvol_name(c.label_map[ids[k]]) for k in keep]
    assert torch.equal(s["labels"].bool(), want)


def test_rotate_90_known_pattern():
    d, h, w = 2, 6, 6
    image = torch.zeros(1, d, h, w)
    labels = torch.zeros(1, d, h, w, dtype=torch.bool)
    image[0, :, 1, 4] = 1.0
    labels[0, 1, 0, 5] = True
    img, lab = augment.rotate_hw(image, labels, 90.0)
    # +90 maps (h, w) -> (W - 1 - w, h): (1, 4) -> (1, 1) and (0, 5) -> (0, 0)
    want_img = torch.zeros_like(image)
    want_img[0, :, 1, 1] = 1.0
    want_lab = torch.zeros_like(labels)
    want_lab[0, 1, 0, 0] = True
    torch.testing.assert_close(img, want_img, atol=1e-5, rtol=0)
    assert torch.equal(lab, want_lab)
    img0, lab0 = augment.rotate_hw(image, labels, 0.0)
    assert torch.equal(img0, image) and torch.equal(lab0, labels)


def test_rotate_non_square_180_is_double_flip():
    image = torch.rand(1, 3, 6, 10)
    labels = torch.rand(2, 3, 6, 10) > 0.5
    img, lab = augment.rotate_hw(image, labels, 180.0)
    torch.testing.assert_close(img, image.flip(-1).flip(-2), atol=1e-5, rtol=0)
    assert torch.equal(lab, labels.flip(-1).flip(-2))


@pytest.mark.slow
def test_shared_dicom_case(data_dir):
    lm = json.loads((data_dir / "labels.json").read_text())
    cases = cases_from_files(
        [(data_dir / "ct_abdomen_dicom", data_dir / "ct_abdomen_dicom_labels.nii.gz")], lm["ct"], "ct", "dicom"
    )
    s = SegmentationDataset(cases, SIZE, train=False)[0]
    assert s["image"].shape == (1,) + SIZE and s["labels"].shape[0] == len(s["names"]) > 0


# ------------------------------------------------------------------------------ sampler
def test_sampler_modality_balance():
    mods = ["ct"] * 9 + ["mri"] * 3
    n = 4000
    order = ModalityBalancedSampler(mods, n, seed=int(torch.randint(10**6, ()))).global_order()
    cases = [i % len(mods) for i in order]
    frac_mri = sum(mods[c] == "mri" for c in cases) / n
    assert abs(frac_mri - 0.5) < 5 * math.sqrt(0.25 / n)  # 5 sigma
    mri_counts = np.bincount([c for c in cases if mods[c] == "mri"], minlength=12)[9:]
    assert mri_counts.min() > 0.25 * (n / 2) * 0.8  # each MR case ~ 1/3 of the MR half
    assert len(set(order)) == n  # every draw its own sample index


def test_sampler_ranks_union_equals_one_process():
    mods = ["ct", "mri", "ct", "ct", "mri"]
    seed = int(torch.randint(10**6, ()))
    one = ModalityBalancedSampler(mods, 12, seed=seed)
    ranks = [ModalityBalancedSampler(mods, 12, seed=seed, rank=r, world_size=2) for r in range(2)]
    for s in [one] + ranks:
        s.set_epoch(3)
    seqs = [list(r) for r in ranks]
    assert len(seqs[0]) == len(seqs[1]) == len(ranks[0]) == 6
    interleaved = [x for pair in zip(*seqs) for x in pair]
    assert interleaved == list(one)


def test_sampler_set_epoch_reproducible():
    mods = ["ct"] * 4 + ["mri"] * 4
    a, b = ModalityBalancedSampler(mods, 32, seed=5), ModalityBalancedSampler(mods, 32, seed=5)
    e0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) and list(a) != e0
    a.set_epoch(0)
    assert list(a) == e0


# ------------------------------------------------------------------------------ loader
def test_loader_workers_match_single_process(tmp_path):
    _write_msd(tmp_path / "ct", n=2)
    _write_nnunet(tmp_path / "mr", n=2)
    cases = discover_cases(tmp_path / "ct") + discover_cases(tmp_path / "mr")

    def run(workers):
        ds = SegmentationDataset(cases, SIZE, seed=9, rotation_deg=10.0)
        ds.preload()
        loader = make_loader(ds, 2, sampler=ModalityBalancedSampler(ds, 6, seed=4), workers=workers, seed=1)
        out = []
        for epoch in (0, 1):  # epoch 1 must reach the persistent workers too
            loader.set_epoch(epoch)
            out.append(list(loader))
        return out

    single, multi = run(0), run(2)
    assert len(single[0]) == 3
    for e in (0, 1):
        for b0, b1 in zip(single[e], multi[e]):
            assert b0["image"].shape == (2, 1) + SIZE and isinstance(b0["labels"], list)
            assert torch.equal(b0["image"], b1["image"]) and b0["case"] == b1["case"] and b0["names"] == b1["names"]
            assert all(torch.equal(x, y) for x, y in zip(b0["labels"], b1["labels"]))
    assert not all(torch.equal(a["image"], b["image"]) for a, b in zip(single[0], single[1]))


# ------------------------------------------------------------------------------ bad inputs
def test_missing_dataset_json_and_folders(tmp_path):
    with pytest.raises(VolumeNotFoundError):
        discover_cases(tmp_path)
    with pytest.raises(VolumeNotFoundError, match="dataset.json"):
        cases_from_decathlon(tmp_path)
    (tmp_path / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "CT"}, "labels": {"a": 1}, "file_ending": ".nii.gz"})
    )
    with pytest.raises(VolumeNotFoundError, match="imagesTr"):
        cases_from_nnunet(tmp_path)


def test_missing_label_file(tmp_path):
    _write_msd(tmp_path / "T", n=1)
    (tmp_path / "T" / "labelsTr" / "case_0.nii.gz").unlink()
    ds = SegmentationDataset(cases_from_decathlon(tmp_path / "T"), SIZE)
    with pytest.raises(VolumeNotFoundError, match="case_0"):
        ds[0]


def test_unknown_label_id_error_or_ignore(tmp_path):
    img, lab = _phantom()
    _save(tmp_path / "i.nii.gz", img)
    _save(tmp_path / "l.nii.gz", lab)
    cases = cases_from_files([(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")], {"1": "liver"}, "ct", "x")
    with pytest.raises(InvalidArgumentError, match=r"\[2\]"):
        SegmentationDataset(cases, SIZE)[0]
    with pytest.warns(UserWarning, match="dropped"):
        s = SegmentationDataset(cases, SIZE, unknown_labels="ignore")[0]
    assert s["names"] == ["liver"]


def test_shape_mismatch_names_both_files(tmp_path):
    img, lab = _phantom()
    _save(tmp_path / "img.nii.gz", img)
    _save(tmp_path / "lab.nii.gz", lab[:-1])
    cases = cases_from_files([(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz")], {1: "liver", 2: "spleen"}, "ct", "x")
    with pytest.raises(ShapeError, match=r"img\.nii\.gz.*lab\.nii\.gz"):
        SegmentationDataset(cases, SIZE)[0]


def test_bad_arguments(tmp_path):
    img, lab = _phantom()
    _save(tmp_path / "i.nii.gz", img)
    _save(tmp_path / "l.nii.gz", lab)
    cases = cases_from_files([(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")], {1: "liver", 2: "spleen"}, "ct", "x")
    for kwargs in ({"crop_mode": "zoom"}, {"rotation_deg": -1}, {"pos_fraction": 2.0}, {"unknown_labels": "maybe"}):
        with pytest.raises(InvalidArgumentError):
            SegmentationDataset(cases, SIZE, **kwargs)
    with pytest.raises(InvalidArgumentError):
        SegmentationDataset(cases, (8, 16))
    with pytest.raises(InvalidArgumentError):
        SegmentationDataset([], SIZE)
    with pytest.raises(InvalidArgumentError):
        cases_from_files([], {1: "liver"}, None, "x")
    with pytest.raises(InvalidArgumentError):
        ModalityBalancedSampler(["ct", "mri"], 5, world_size=2)
    with pytest.raises(InvalidArgumentError):
        ModalityBalancedSampler(["ct"], 4, rank=2, world_size=2)
    with pytest.raises(InvalidArgumentError):
        make_loader(SegmentationDataset(cases, SIZE), 0)
    with pytest.raises(InvalidArgumentError):
        read_m3d_mask(tmp_path / "mask.npz")


def test_crop_centre_positive_and_negative():
    image = torch.rand(1, 12, 40, 40) + 0.01
    labels = torch.zeros(2, 12, 40, 40, dtype=torch.bool)
    labels[1, 2:4, 30:32, 5:7] = True
    g = torch.Generator().manual_seed(int(torch.randint(10**6, ())))
    for _ in range(20):
        d, h, w = augment.crop_center(image, labels, g, pos_fraction=1.0)
        assert labels[1, d, h, w]
        d, h, w = augment.crop_center(image, labels, g, pos_fraction=0.0)
        assert not labels[:, d, h, w].any()
    image[:, :, :, 20:] = 0  # background centres need intensity > 0 (MONAI image_threshold=0)
    for _ in range(20):
        d, h, w = augment.crop_center(image, labels, g, pos_fraction=0.0)
        assert w < 20


def test_small_foreground_positive_crops(tmp_path):
    img = np.random.default_rng().integers(0, 100, size=(48, 48, 16)).astype(np.int16)
    lab = np.zeros(img.shape, np.uint8)
    lab[5:7, 40:42, 2:4] = 1
    _save(tmp_path / "i.nii.gz", img)
    _save(tmp_path / "l.nii.gz", lab)
    cases = cases_from_files([(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")], {1: "liver"}, "ct", "x")
    pos = SegmentationDataset(cases, (4, 8, 8), crop_mode="crop", pos_fraction=1.0, flip_prob=0.0)
    neg = SegmentationDataset(cases, (4, 8, 8), crop_mode="crop", pos_fraction=0.0, flip_prob=0.0)
    assert all(pos[i]["labels"].sum() > 0 for i in range(10))
    assert sum(neg[i]["labels"].sum() > 0 for i in range(10)) < 5


def test_resize_labels_half_voxel_counts():
    labels = torch.tensor([[[[True, False]]]])  # (1, 1, 1, 2) -> (1, 1, 1, 1): exactly half
    assert augment.resize_labels(labels, (1, 1, 1)).item() is True
    assert augment.resize_labels(torch.tensor([[[[True, False, False]]]]), (1, 1, 1)).item() is False


@pytest.mark.parametrize("crop_mode", ["crop", "resize"])
def test_augmented_labels_stay_on_their_structure(tmp_path, crop_mode):
    """The image is bright exactly where the label is: every flip / crop must move both alike."""
    img = np.random.default_rng().integers(0, 100, size=(32, 24, 16)).astype(np.int16)
    lab = np.zeros(img.shape, np.uint8)
    lab[4:12, 14:22, 3:7] = 1  # off-centre: a flip of only one of the two would be seen
    img[lab > 0] = 1000
    _save(tmp_path / "i.nii.gz", img)
    _save(tmp_path / "l.nii.gz", lab)
    cases = cases_from_files([(tmp_path / "i.nii.gz", tmp_path / "l.nii.gz")], {1: "liver"}, "ct", "x")
    size = (8, 16, 16) if crop_mode == "crop" else (16, 24, 32)  # resize: whole voxels, no blending
    ds = SegmentationDataset(
        cases,
        size,
        crop_mode=crop_mode,
        flip_prob=0.5,
        intensity_prob=0.0,
        pos_fraction=1.0,
        seed=int(torch.randint(1000, ())),
    )
    for i in range(8):
        s = ds[i]
        assert torch.equal(s["image"][0] > 0.5, s["labels"][0] > 0)
