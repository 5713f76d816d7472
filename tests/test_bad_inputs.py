"""Bad inputs through the API: each one stops with a typed segevol_fast error that says what to do.

Every case asserts the error class (a `segevol_fast.errors` class that also subclasses the builtin
a Python user expects), a key phrase of the message, and, where files are involved, that nothing
was written. Argument cases pass a volume path that does not exist: if a check ran after loading,
the error would be VolumeNotFoundError instead, so these tests also prove the checks come first.
The command-line half of the battery is tests/test_bad_inputs_cli.py.
"""

from __future__ import annotations

import gzip
import pathlib
import shutil
import warnings

import numpy as np
import pytest
import torch

from segevol_fast import SegVol, SegVolConfig, load_volume
from segevol_fast.errors import (
    ArgumentTypeError,
    CheckpointError,
    DamagedFileError,
    DicomSeriesError,
    InvalidArgumentError,
    MemorySpecError,
    PromptError,
    SegVolFastError,
    ShapeError,
    VolumeError,
    VolumeFileError,
    VolumeNotFoundError,
)
from segevol_fast.inference.prompts import build_prompts, unique_labels
from segevol_fast.io import list_series

CT = "ct_abdomen_sm.nii.gz"
MISSING = "/nonexistent/never-read.nii.gz"  # argument checks must fail before this is opened
BOX = [2, 2, 2, 10, 10, 10]


@pytest.fixture(scope="module")
def model(data_dir):
    m = SegVol(SegVolConfig.tiny(), tokenizer=data_dir / "clip_tokenizer")
    m.weights_source = "test"
    return m


@pytest.fixture
def scan():
    rng = np.random.default_rng(0)
    return (rng.random((40, 40, 20)) * 100).astype(np.float32)


# ---------------------------------------------------------------------- segment() arguments
ARGUMENT_CASES = [
    # (id, keyword arguments, error class, key phrase)
    ("mode-int", dict(mode=1), ArgumentTypeError, "mode must be one of"),
    ("mode-unknown", dict(mode="slow"), InvalidArgumentError, "mode must be one of"),
    ("coords-unknown", dict(coords="mm"), InvalidArgumentError, "coords must be one of"),
    ("modality-int", dict(modality=5), ArgumentTypeError, "modality must be"),
    ("modality-unknown", dict(modality="pet"), InvalidArgumentError, "modality must be"),
    ("zoom_in-str", dict(zoom_in="no"), ArgumentTypeError, "zoom_in must be True or False"),
    ("progress-int", dict(progress=2), ArgumentTypeError, "progress must be"),
    ("probabilities-int", dict(return_probabilities=1), ArgumentTypeError, "return_probabilities must be"),
    ("seed-float", dict(seed=1.5), ArgumentTypeError, "seed must be an int"),
    ("seed-bool", dict(seed=True), ArgumentTypeError, "seed must be an int"),
    ("seed-huge", dict(seed=2**70), InvalidArgumentError, "64 bits"),
    ("precision-unknown", dict(precision="fp64"), InvalidArgumentError, "precision must be one of"),
    ("precision-int", dict(precision=16), ArgumentTypeError, "precision must be one of"),
    ("max_memory-list", dict(max_memory=[1]), ArgumentTypeError, "max_memory must be"),
    ("max_memory-negative", dict(max_memory=-1), MemorySpecError, "positive"),
    ("max_memory-bananas", dict(max_memory="2 bananas"), MemorySpecError, "cannot read memory size"),
    ("device-gpu7", dict(device="gpu7"), InvalidArgumentError, "devices on this machine"),
    ("device-int", dict(device=5), ArgumentTypeError, "device must be"),
    ("device-meta", dict(device="meta"), InvalidArgumentError, "'cpu' or 'cuda"),
    ("series-int", dict(series=5), ArgumentTypeError, "SeriesInstanceUID"),
    ("adapter-int", dict(adapter=5), ArgumentTypeError, "adapter must be None or a name"),
    ("text-int", dict(text=5), ArgumentTypeError, "text must be a name or a list"),
    ("text-list-with-int", dict(text=["liver", 3]), ArgumentTypeError, "3 is of type int"),
    ("text-set", dict(text={"liver"}), ArgumentTypeError, "text must be a name or a list"),
    ("text-empty", dict(text=""), PromptError, "non-empty"),
    ("box-string", dict(box="1,2,3,4,5,6"), ArgumentTypeError, "box must be numbers"),
    ("box-dict", dict(box={"i0": 1}), ArgumentTypeError, "box must be numbers"),
    ("box-nan", dict(box=[0, 0, 0, np.nan, 4, 4]), PromptError, "non-finite value (nan)"),
    ("box-inf-tensor", dict(box=torch.tensor([0, 0, 0, float("inf"), 4, 4])), PromptError, "non-finite value (inf)"),
    ("box-five-numbers", dict(box=[1, 2, 3, 4, 5]), PromptError, "box must be (6,)"),
    ("box-ragged", dict(box=[[1, 2, 3, 4, 5, 6], [1, 2]]), PromptError, "regular array"),
    ("box-complex", dict(box=np.ones(6) * 1j), ArgumentTypeError, "real numbers"),
    ("box-of-None", dict(box=[None] * 6), ArgumentTypeError, "real numbers"),
    ("points-nan", dict(points=[[1, 2, np.nan]]), PromptError, "non-finite value (nan)"),
    ("points-string", dict(points="1 2 3"), ArgumentTypeError, "points must be numbers"),
    ("points-four-columns", dict(points=[[1, 2, 3, 4]]), PromptError, "points must be (P, 3)"),
    ("labels-half", dict(points=[[1, 2, 3]], point_labels=[0.5]), PromptError, "got 0.5"),
    ("labels-nan", dict(points=[[1, 2, 3]], point_labels=[np.nan]), PromptError, "non-finite"),
    (
        "labels-minus-one",
        dict(points=[[1, 2, 3], [2, 2, 2]], point_labels=torch.tensor([1.0, -1.0])),
        PromptError,
        "padding",
    ),
    ("labels-two", dict(points=[[1, 2, 3]], point_labels=[2]), PromptError, "1 (positive) or 0 (negative)"),
    ("labels-count", dict(points=[[1, 2, 3]], point_labels=[1, 1]), PromptError, "one label per point"),
    ("labels-string", dict(points=[[1, 2, 3]], point_labels="1"), ArgumentTypeError, "point_labels must be numbers"),
    ("labels-without-points", dict(point_labels=[1]), PromptError, "without points"),
    ("no-prompt", dict(box=None), PromptError, "at least one prompt"),
    ("boxes-vs-texts", dict(text=["a", "b", "c"], box=[[0] * 6, [1] * 6]), PromptError, "2 boxes for 3 text"),
]


@pytest.mark.parametrize("kwargs,error,phrase", [c[1:] for c in ARGUMENT_CASES], ids=[c[0] for c in ARGUMENT_CASES])
def test_bad_argument_fails_before_loading(model, kwargs, error, phrase):
    call = dict(box=BOX, progress=False)
    call.update(kwargs)
    with pytest.raises(error, match=phrase_re(phrase)) as info:
        model.segment(MISSING, **call)
    assert isinstance(info.value, SegVolFastError)
    assert not isinstance(info.value, VolumeNotFoundError)  # the volume was never opened


def phrase_re(phrase: str) -> str:
    import re

    return re.escape(phrase)


def test_argument_errors_are_the_natural_builtins(model):
    with pytest.raises(TypeError):
        model.segment(MISSING, text=5)
    with pytest.raises(ValueError):
        model.segment(MISSING, box=BOX, mode="slow")
    with pytest.raises(FileNotFoundError, match="no such file"):
        model.segment(MISSING, box=BOX)


def test_model_must_be_a_segvol(scan):
    from segevol_fast import segment

    with pytest.raises(ArgumentTypeError, match="model must be a SegVol"):
        segment("not a model", scan, box=BOX)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_on_a_cpu_only_machine_names_the_devices(model):
    with pytest.raises(InvalidArgumentError, match="no CUDA device.*devices on this machine: 'cpu'"):
        model.segment(MISSING, box=BOX, device="cuda")
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    "volume,error,phrase",
    [
        (None, ArgumentTypeError, "volume must be a path"),
        ([[1.0]], ArgumentTypeError, "volume must be a path"),
        (b"/x.nii", ArgumentTypeError, "volume must be a path"),
        ("", InvalidArgumentError, "empty string"),
        (np.ones((5, 5), np.float32), ShapeError, "2-D"),
        (np.ones((0, 5, 5), np.float32), ShapeError, "empty"),
        (np.ones((1, 6, 0, 5), np.float32), ShapeError, "empty"),
        (np.ones((5, 0, 3), np.float32), ShapeError, r"axis 1 is empty \(shape \(5, 0, 3\)\)"),
        (np.full((5, 5, 5), np.nan, np.float32), VolumeError, "NaN"),
        (np.ones((4, 4, 4), complex), VolumeError, "real-valued"),
    ],
    ids=[
        "None",
        "list",
        "bytes",
        "empty-path",
        "2d",
        "empty-axis",
        "empty-axis-4d",
        "empty-middle-axis",
        "nan",
        "complex",
    ],
)
def test_bad_volume_objects(model, volume, error, phrase):
    with pytest.raises(error, match=phrase):
        model.segment(volume, box=[0, 0, 0, 0, 0, 0], progress=False)


@pytest.mark.parametrize(
    "kwargs,error,phrase",
    [
        (dict(spacing="abc"), ArgumentTypeError, "spacing must be numbers"),
        (dict(spacing=[1, 0, 1]), VolumeError, "positive, finite voxel sizes"),
        (dict(spacing=[1, 2]), ShapeError, "3 numbers"),
        (dict(affine="x"), ArgumentTypeError, "affine must be numbers"),
        (dict(affine=np.eye(3)), ShapeError, "4x4"),
        (dict(affine=np.zeros((4, 4))), VolumeError, "invertible"),
    ],
    ids=["spacing-str", "spacing-zero", "spacing-two", "affine-str", "affine-3x3", "affine-singular"],
)
def test_bad_geometry_for_arrays(scan, kwargs, error, phrase):
    with pytest.raises(error, match=phrase):
        load_volume(scan, **kwargs)


def test_text_without_tokenizer_fails_before_loading():
    bare = SegVol(SegVolConfig.tiny())
    with pytest.raises(InvalidArgumentError, match="need the CLIP tokenizer.*box and point prompts work"):
        bare.segment(MISSING, text="liver")


def test_model_without_weights_fails_clearly(scan):
    meta = SegVol(SegVolConfig.tiny()).to("meta")
    with pytest.raises(InvalidArgumentError, match="meta device"):
        meta.segment(scan, box=BOX, progress=False)


def test_numpy_array_of_names_is_accepted():
    prompts = build_prompts(text=np.array(["liver", "spleen"]), shape=(20, 30, 40), start=(0, 0, 0))
    assert [p.label for p in prompts] == ["liver", "spleen"]


def test_empty_and_2d_volume_objects_say_so():
    from segevol_fast.io import Volume

    with pytest.raises(ShapeError, match="empty") as info:
        Volume(np.zeros((3, 0, 4)), np.eye(4))
    assert "3-D" not in str(info.value).split(";")[0]  # not reported as "not 3-D"
    with pytest.raises(ShapeError, match="is 2-D"):
        load_volume(torch.zeros(8, 8))


# ---------------------------------------------------------------------- prompts
def test_world_box_outside_is_reported_in_millimetres():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = (-10, 5, 100)
    with pytest.raises(PromptError) as info:
        build_prompts(
            box=[0, 10, 100, 5000, 20, 110], coords="world", affine=affine, shape=(20, 30, 40), start=(0, 0, 0)
        )
    msg = str(info.value)
    assert "(5000, 20, 110) mm" in msg
    assert "x -10.0..28.0, y 5.0..63.0, z 100.0..217.0" in msg  # the volume's world extent
    assert "use coords='world'" not in msg  # the advice for voxel boxes would be wrong here


def test_voxel_box_outside_still_advises_world_coordinates():
    with pytest.raises(PromptError, match="use coords='world'"):
        build_prompts(box=[0, 0, 0, 500, 5, 5], shape=(20, 30, 40), start=(0, 0, 0))


def test_official_style_float_tensor_labels_are_accepted():
    (p,) = build_prompts(
        points=torch.tensor([[1.0, 2, 3], [5, 5, 5]]),
        point_labels=torch.tensor([1.0, 0.0]),
        shape=(20, 30, 40),
        start=(0, 0, 0),
    )
    assert p.point_labels.dtype == np.int64 and p.point_labels.tolist() == [1, 0]
    (q,) = build_prompts(box=torch.tensor(BOX, dtype=torch.float16), shape=(20, 30, 40), start=(0, 0, 0))
    (r,) = build_prompts(box=BOX, shape=(20, 30, 40), start=(0, 0, 0))
    np.testing.assert_array_equal(q.box, r.box)


def test_repeated_names_are_numbered_never_merged():
    assert unique_labels(["liver", "Liver", " liver ", "spleen", "liver (2)"]) == [
        "liver",
        "Liver (2)",
        "liver (3)",
        "spleen",
        "liver (2) (2)",
    ]
    prompts = build_prompts(
        text=["kidney", "kidney"], box=[BOX, [3, 3, 3, 12, 12, 12]], shape=(20, 30, 40), start=(0, 0, 0)
    )
    assert [p.label for p in prompts] == ["kidney", "kidney (2)"]
    assert [p.text for p in prompts] == ["kidney", "kidney"]  # the model still reads the user's name
    assert not np.array_equal(prompts[0].box, prompts[1].box)


def test_repeated_names_give_two_masks(model, scan, one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = model.segment(
            scan, text=["liver", "liver"], box=[BOX, [3, 3, 3, 12, 12, 12]], zoom_in=False, progress=False
        )
    assert list(res.masks) == ["liver", "liver (2)"]


# ---------------------------------------------------------------------- damaged files
def _cut(src: pathlib.Path, dst: pathlib.Path, keep: int) -> pathlib.Path:
    dst.write_bytes(src.read_bytes()[:keep])
    return dst


def _damaged_files(data_dir: pathlib.Path, tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    src = data_dir / CT
    raw = gzip.decompress(src.read_bytes())
    corrupt = bytearray(src.read_bytes())
    corrupt[len(corrupt) // 3 : len(corrupt) // 3 + 64] = b"\x00" * 64
    files = {
        "gz-truncated": _cut(src, tmp / "truncated.nii.gz", len(src.read_bytes()) // 4),
        "gz-header-only": _cut(src, tmp / "short.nii.gz", 200),
        "gz-corrupt": tmp / "corrupt.nii.gz",
        "gz-garbage": tmp / "garbage.nii.gz",
        "nii-truncated": tmp / "truncated.nii",
        "nii-short": tmp / "short.nii",
        "empty": tmp / "empty.nii.gz",
    }
    files["gz-corrupt"].write_bytes(bytes(corrupt))
    files["gz-garbage"].write_bytes(np.random.default_rng(1).bytes(5000))
    files["nii-truncated"].write_bytes(raw[: len(raw) // 2])
    files["nii-short"].write_bytes(raw[:100])
    files["empty"].write_bytes(b"")
    return files


@pytest.mark.parametrize(
    "kind", ["gz-truncated", "gz-header-only", "gz-corrupt", "gz-garbage", "nii-truncated", "nii-short", "empty"]
)
def test_damaged_nifti_names_the_file(data_dir, tmp_path, kind, model):
    path = _damaged_files(data_dir, tmp_path)[kind]
    before = sorted(tmp_path.iterdir())
    with pytest.raises(DamagedFileError) as info:
        load_volume(path)
    assert str(path) in str(info.value) and "damaged" in str(info.value)
    assert isinstance(info.value, VolumeFileError) and isinstance(info.value, ValueError)
    with pytest.raises(DamagedFileError):  # the same through segment()
        model.segment(path, box=BOX, progress=False)
    assert sorted(tmp_path.iterdir()) == before  # nothing written next to it


def test_intact_copy_still_loads(data_dir, tmp_path):
    good = tmp_path / CT
    shutil.copyfile(data_dir / CT, good)
    assert load_volume(good).shape == load_volume(data_dir / CT).shape


# ---------------------------------------------------------------------- DICOM
def test_two_series_error_says_how_to_pick_and_list(two_series):
    with pytest.raises(DicomSeriesError) as info:
        load_volume(two_series)
    msg = str(info.value)
    assert "holds 2 series" in msg and "list_series" in msg and "--series" in msg and "series=UID" in msg
    assert "1.2.826.0.1.3680043.8.498.1  (10 slices, CT, 'even')" in msg


def test_list_series_and_series_everywhere(two_series, model, one_thread):
    infos = list_series(two_series)
    assert [(i.uid, i.slices, i.modality, i.description) for i in infos] == [
        ("1.2.826.0.1.3680043.8.498.1", 10, "CT", "even"),
        ("1.2.826.0.1.3680043.8.498.2", 10, "CT", "odd"),
    ]
    vol = load_volume(two_series, series=infos[1].uid)
    assert vol.shape == (512, 512, 10)
    with pytest.raises(DicomSeriesError, match="is not in"):
        load_volume(two_series, series="9.9")
    with pytest.raises(InvalidArgumentError, match="only with a path"):
        load_volume(np.zeros((4, 4, 4)), series=infos[0].uid)
    with pytest.raises(DicomSeriesError, match="is not in"):  # segment() passes series= through
        model.segment(two_series, box=BOX, series="9.9", progress=False)


def test_series_without_uid_is_picked_by_name_or_empty_string(model):
    for series in ("no-series-uid", ""):  # argument checks accept both; then the path is looked for
        with pytest.raises(VolumeNotFoundError):
            model.segment(MISSING, box=BOX, series=series, progress=False)


def test_a_folder_of_nifti_files_given_to_segment_points_to_cohorts(data_dir, model, tmp_path):
    shutil.copy(data_dir / CT, tmp_path / "scan.nii.gz")
    for run in (lambda: model.segment(tmp_path, box=BOX, progress=False), lambda: model.session(tmp_path)):
        with pytest.raises(
            VolumeFileError,
            match="holds 1 NIfTI file, not one DICOM series.*take one scan.*segevol-fast segment.*segment_cohort",
        ):
            run()


def test_damaged_dicom_slices(data_dir, tmp_path):
    folder = tmp_path / "dicom"
    shutil.copytree(data_dir / "ct_abdomen_dicom", folder, copy_function=shutil.copyfile)
    victim = sorted(folder.iterdir())[5]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 50000])  # pixel data cut short
    with pytest.raises(DamagedFileError, match="damaged") as info:
        load_volume(folder)
    assert victim.name in str(info.value)
    victim.write_bytes(data[:1000])  # cut inside the header: must not be skipped silently
    with pytest.raises(DamagedFileError, match="damaged DICOM"):
        load_volume(folder)


# ---------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(d / "tiny")
    torch.save(model.state_dict(), d / "zip.pth")
    torch.save(model.state_dict(), d / "legacy.pth", _use_new_zipfile_serialization=False)
    return d


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path


NOT_CHECKPOINTS = {  # id -> (make(ckpt_dir, data_dir) -> path, key phrase)
    "nii.gz": (lambda d, data: shutil.copyfile(data / CT, d / "scan.nii.gz"), "is a NIfTI image"),
    "nii": (lambda d, data: _write(d / "scan.nii", gzip.decompress((data / CT).read_bytes())), "is a NIfTI image"),
    "dicom": (
        lambda d, data: shutil.copyfile(sorted((data / "ct_abdomen_dicom").iterdir())[0], d / "slice.dcm"),
        "is a DICOM file",
    ),
    "json": (lambda d, data: shutil.copyfile(d / "tiny" / "config.json", d / "config.json"), "JSON"),
    "empty": (lambda d, data: _write(d / "empty.pth", b""), "empty file"),
    "zip-cut": (lambda d, data: _cut(d / "zip.pth", d / "cut.pth", 3000), "damaged"),
    "legacy-cut": (lambda d, data: _cut(d / "legacy.pth", d / "cut_legacy.pth", 3000), "damaged"),
    "safetensors-cut": (lambda d, data: _cut(d / "tiny" / "model.safetensors", d / "cut.safetensors", 3000), "damaged"),
}


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_non_checkpoints_and_damaged_checkpoints(tiny_checkpoints, data_dir, kind):
    make, phrase = NOT_CHECKPOINTS[kind]
    path = pathlib.Path(make(tiny_checkpoints, data_dir))
    with pytest.raises(CheckpointError, match=phrase) as info:
        SegVol.from_pretrained(path, config=SegVolConfig.tiny())
    msg = str(info.value)
    assert str(path) in msg
    assert "invalid load key" not in msg and "pickle" not in msg.lower()


def test_intact_checkpoints_still_load(tiny_checkpoints):
    for p in ("tiny", "zip.pth", "legacy.pth"):
        assert SegVol.from_pretrained(tiny_checkpoints / p, config=SegVolConfig.tiny()).weights_source


def test_every_error_class_is_also_a_builtin():
    import inspect

    from segevol_fast import errors

    classes = [
        c
        for c in vars(errors).values()
        if inspect.isclass(c) and issubclass(c, errors.SegVolFastError) and c is not errors.SegVolFastError
    ]
    assert len(classes) > 15
    for cls in classes:
        builtins = [b for b in cls.__mro__[1:] if b.__module__ == "builtins" and b not in (Exception, BaseException)]
        assert builtins, f"{cls.__name__} subclasses no builtin besides Exception"
    assert issubclass(errors.VolumeNotFoundError, FileNotFoundError)
    assert issubclass(errors.UnreadableFileError, PermissionError)
    assert issubclass(errors.DamagedFileError, errors.VolumeFileError)
