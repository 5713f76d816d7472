"""The README's segmentation examples run as written, so the README cannot drift from the code.

The "Quick start", "Segmenting a scan" and "Adapting SegVol" sections are read from README.md: each ```python block is
executed with `SegVol.from_pretrained` returning a tiny random model (the official weights are not
available here), and each `segevol-fast ...` command line goes through the command line with
`--random-weights --config tiny` (demo: without --full), `--no-zoom-in` (the tiny model's zoom-in
takes hundreds of windows) and `--device cpu -q` added. Only the data prefix `../shared/data/` is
rewritten, to the `data_dir` fixture; everything runs in a temporary working folder.

Each example runs in a fresh Python process, as a user runs it: `max_memory="2GB"` bounds the
whole process, and the test process has grown far past a fresh one's memory by the time these
tests run.
"""

from __future__ import annotations

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("Quick start", "Segmenting a scan", "Adapting SegVol: `segevol_fast.adapters`")
DATA_PREFIX = "../shared/data/"


def _section(text: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def _blocks(lang: str) -> list[str]:
    text = README.read_text()
    return [b for title in SECTIONS for b in re.findall(rf"^```{lang}\n(.*?)^```", _section(text, title),
                                                         flags=re.M | re.S)]


def _cli_lines() -> list[str]:
    return [line.strip() for block in _blocks("bash") for line in block.splitlines()
            if line.strip().startswith(("segevol-fast ", "torchrun "))]


def test_the_sections_hold_examples():
    # the extraction itself: an empty match would make the tests below pass vacuously
    assert len(_blocks("python")) >= 1
    lines = _cli_lines()
    assert len(lines) >= 4 and any(" segment " in f" {x} " for x in lines) and any("demo" in x for x in lines)
    assert all(DATA_PREFIX in x for x in lines if "segment" in shlex.split(x, comments=True)[1:6]), \
        "segment examples use the shared data"
    assert any(x.startswith("torchrun ") for x in lines), "the README shows a torchrun cohort"


@pytest.fixture
def workdir(tmp_path, monkeypatch, data_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGEVOL_DATA", str(data_dir))
    for var in ("SEGEVOL_WEIGHTS", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no weights: the random model is what runs
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2-core CI boxes
    return tmp_path


# the python examples' driver: from_pretrained gives the tiny random model, then the example runs
_DRIVER = """
import sys, torch
from segevol_fast.model import SegVol, SegVolConfig

def tiny_from_pretrained(cls, path, *args, **kwargs):
    print("from_pretrained", path)
    torch.manual_seed(0)
    model = cls(SegVolConfig.tiny(), tokenizer=sys.argv[2])
    model.weights_source = "test"
    return model

SegVol.from_pretrained = classmethod(tiny_from_pretrained)
namespace = {}
exec(compile(open(sys.argv[1]).read(), "README.md python block", "exec"), namespace)
res = namespace["res"]
assert set(res.volumes_ml()) == set(res.masks) and res.masks, res
print("masks", sorted(res.masks))
"""


def _run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example_runs(index, workdir, data_dir):
    code = _blocks("python")[index]
    assert DATA_PREFIX in code, "the example should read the shared data"
    (workdir / "example.py").write_text(code.replace(DATA_PREFIX, f"{data_dir}/"))
    (workdir / "driver.py").write_text(_DRIVER)
    proc = _run(["driver.py", "example.py", str(data_dir / "clip_tokenizer")], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "from_pretrained" in proc.stdout, "the example loads a model with from_pretrained"
    written = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*") if p.is_file())
    if "adapters." in code:  # the adapters example writes an adapter file, not a result folder
        assert any(p.endswith(".safetensors") for p in written), written
    else:
        assert any(p.endswith("summary.json") for p in written) and any(p.endswith(".png") for p in written), written


def _launcher(line: str) -> tuple[list[str], str]:
    """(python arguments up to `-m segevol_fast`, the segevol-fast command line). A torchrun line
    runs through `torch.distributed.run` (what the torchrun script is) with --standalone, so
    parallel test runs never compete for its default port."""
    if not line.startswith("torchrun "):
        return ["-m", "segevol_fast"], line
    words = shlex.split(line, comments=True)
    at = words.index("-m")
    assert words[at + 1] == "segevol_fast", line
    return ["-m", "torch.distributed.run", "--standalone", *words[1:at], "-m", "segevol_fast"], \
        shlex.join(["segevol-fast", *words[at + 2:]])


def _cli_args(line: str, data_dir: pathlib.Path) -> list[str]:
    args = shlex.split(line.replace(DATA_PREFIX, f"{data_dir}/"), comments=True)[1:]
    if args[0] == "segment":
        args += ["--random-weights", "--config", "tiny", "--no-zoom-in", "--device", "cpu", "-q"]
    elif args[0] == "finetune":  # a few steps of the tiny random model instead of the weights named
        i = args.index("--weights")
        args[i:i + 2] = ["--random-weights", "--config", "tiny"]
        args[args.index("--steps") + 1] = "2"
        args += ["--device", "cpu", "-q"]
    elif args[0] == "demo":
        args = [a for a in args if a != "--full"] + ["--random-weights", "--no-zoom-in", "--device", "cpu", "-q"]
    return args


@pytest.mark.parametrize("line", _cli_lines(), ids=lambda line: " ".join(line.split("#")[0].split()[:3]))
def test_cli_example_runs(line, workdir, data_dir):
    launcher, line = _launcher(line)
    args = _cli_args(line, data_dir)
    proc = _run([*launcher, *args], workdir)
    assert proc.returncode == 0, f"{line!r} -> exit {proc.returncode}\n{proc.stderr[-2000:]}"
    if args[0] == "segment" and "*" in args[1]:  # a cohort: one folder per scan and the summary
        out = workdir / args[args.index("--out") + 1]
        assert (out / "cohort_summary.csv").is_file() and (out / "ct_abdomen_sm" / "summary.json").is_file()
        rows = (out / "cohort_summary.csv").read_text().splitlines()[1:]
        assert len(rows) == len(sorted(data_dir.glob(args[1].rpartition("/")[2]))), rows  # every scan once
    elif args[0] in ("segment", "demo"):
        assert "wrote " in proc.stdout
        out = re.search(r"^wrote (.+)$", proc.stdout, flags=re.M).group(1)
        assert (workdir / out / "summary.json").is_file() or pathlib.Path(out).joinpath("summary.json").is_file()
    if args[0] == "finetune":
        out = workdir / args[args.index("--out") + 1]
        assert (out / "adapter_default.safetensors").is_file() and (out / "train_log.csv").is_file(), sorted(out.iterdir())
