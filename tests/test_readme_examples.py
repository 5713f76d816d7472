"""Every code block of README.md and docs/*.md runs as written, so the documentation cannot drift
from the code.

Each fenced block is one of:
  * ```python: executed in a fresh Python process (as a user runs it: `max_memory="2GB"` bounds the
    whole process, and this test process has grown far past a fresh one's memory), with
    `SegVol.from_pretrained` returning a tiny random model (the official weights are not available
    here);
  * ```bash: every line is a `segevol-fast ...` or `torchrun ... -m segevol_fast ...` command, run
    through the command line with `--random-weights --config tiny` (demo: without --full),
    `--no-zoom-in` (the tiny model's zoom-in takes hundreds of windows) and `--device cpu -q` added;
  * marked `<!-- not-run: reason -->` on the last non-blank line before its fence (installing
    packages, hours of benchmarks, a citation entry, a picture): never run, and the reason must be
    given.
Any other block fails `test_every_block_runs_or_says_why`. Only the data prefix `../shared/data/`
is rewritten, to the `data_dir` fixture; everything runs in a temporary working folder.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA_PREFIX = "../shared/data/"
FENCE = re.compile(r"^```([\w-]*)[ \t]*\n(.*?)^```[ \t]*$", flags=re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->")
SHELL = ("bash", "sh", "shell", "console")
COMMANDS = ("segevol-fast ", "torchrun ")


@dataclasses.dataclass(frozen=True)
class Block:
    where: str  # "docs/usage.md:98", the line of the opening fence
    lang: str
    code: str
    not_run: str | None  # the marker's reason, or None when the block must run


def _blocks() -> list[Block]:
    found = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip().rsplit("\n", 1)[-1].strip()
            marker = NOT_RUN.fullmatch(before)
            where = f"{doc.relative_to(ROOT).as_posix()}:{text.count(chr(10), 0, m.start()) + 1}"
            found.append(Block(where, m.group(1).lower(), m.group(2), marker.group(1) if marker else None))
    return found


BLOCKS = _blocks()
PYTHON = [b for b in BLOCKS if b.not_run is None and b.lang == "python"]
SHELL_BLOCKS = [b for b in BLOCKS if b.not_run is None and b.lang in SHELL]


def _command_lines(block: Block) -> list[str]:
    return [line.strip() for line in block.code.splitlines() if line.strip() and not line.strip().startswith("#")]


CLI_LINES = [(b.where, line) for b in SHELL_BLOCKS for line in _command_lines(b)]


def test_every_block_runs_or_says_why():
    problems = []
    for b in BLOCKS:
        if b.not_run is not None:
            if not b.not_run:
                problems.append(f"{b.where}: the not-run marker gives no reason")
        elif b.lang in SHELL:
            problems += [
                f"{b.where}: {line!r} is not a segevol-fast or torchrun command"
                for line in _command_lines(b)
                if not line.startswith(COMMANDS)
            ]
        elif b.lang != "python":
            problems.append(f"{b.where}: a ```{b.lang or '(no language)'} block runs only as python or bash")
    assert not problems, (
        "mark blocks that must not run with <!-- not-run: reason --> on the line "
        "before the fence:\n" + "\n".join(problems)
    )


def test_the_documents_hold_examples():
    # the extraction itself: an empty match would make the tests below pass vacuously
    assert {p.name for p in DOCUMENTS} >= {"README.md", "usage.md", "adapters.md", "ops.md"}
    assert len(PYTHON) >= 5 and any(b.where.startswith("README.md") for b in PYTHON)
    lines = [line for _, line in CLI_LINES]
    assert any(" segment " in f" {x} " for x in lines) and any(" demo" in x for x in lines)
    assert any(" finetune " in x for x in lines), "the docs show a finetune command"
    assert any(x.startswith("torchrun ") for x in lines), "the docs show a torchrun cohort"
    assert all(DATA_PREFIX in x for x in lines if "segment" in shlex.split(x, comments=True)[1:6]), (
        "segment examples use the shared data"
    )


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
from segevol_fast import SegVol, SegVolConfig

def tiny_from_pretrained(cls, path, *args, **kwargs):
    print("from_pretrained", path)
    torch.manual_seed(0)
    model = cls(SegVolConfig.tiny(), tokenizer=sys.argv[2])
    model.weights_source = "test"
    return model

SegVol.from_pretrained = classmethod(tiny_from_pretrained)
namespace = {}
exec(compile(open(sys.argv[1]).read(), sys.argv[3], "exec"), namespace)
res = namespace.get("res")
if res is not None:
    assert set(res.volumes_ml()) == set(res.masks) and res.masks, res
    print("masks", sorted(res.masks))
"""


def _run(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.where)
def test_python_example_runs(block, workdir, data_dir):
    code = block.code
    (workdir / "example.py").write_text(code.replace(DATA_PREFIX, f"{data_dir}/"))
    (workdir / "driver.py").write_text(_DRIVER)
    proc = _run(["driver.py", "example.py", str(data_dir / "clip_tokenizer"), block.where], workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "from_pretrained(" in code:
        assert "from_pretrained" in proc.stdout, "the example loads its model with from_pretrained"
    written = sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*") if p.is_file())
    if "res.save(" in code:
        assert any(p.endswith("summary.json") for p in written), written
    if ".preview(" in code:
        assert any(p.endswith(".png") for p in written), written
    if "save_adapter(" in code:
        assert any(p.endswith(".safetensors") for p in written), written


def _launcher(line: str) -> tuple[list[str], str]:
    """(python arguments up to `-m segevol_fast`, the segevol-fast command line). A torchrun line
    runs through `torch.distributed.run` (what the torchrun script is) with --standalone, so
    parallel test runs never compete for its default port."""
    if not line.startswith("torchrun "):
        return ["-m", "segevol_fast"], line
    words = shlex.split(line, comments=True)
    at = words.index("-m")
    assert words[at + 1] == "segevol_fast", line
    return ["-m", "torch.distributed.run", "--standalone", *words[1:at], "-m", "segevol_fast"], shlex.join(
        ["segevol-fast", *words[at + 2 :]]
    )


def _cli_args(line: str, data_dir: pathlib.Path) -> list[str]:
    args = shlex.split(line.replace(DATA_PREFIX, f"{data_dir}/"), comments=True)[1:]
    if args[0] == "segment":
        args += ["--random-weights", "--config", "tiny", "--no-zoom-in", "--device", "cpu", "-q"]
    elif args[0] == "finetune":  # a few steps of the tiny random model instead of the weights named
        i = args.index("--weights")
        args[i : i + 2] = ["--random-weights", "--config", "tiny"]
        args[args.index("--steps") + 1] = "2"
        args += ["--device", "cpu", "-q"]
    elif args[0] == "demo":
        args = [a for a in args if a != "--full"] + ["--random-weights", "--no-zoom-in", "--device", "cpu", "-q"]
    return args


@pytest.mark.parametrize(
    "where,line", CLI_LINES, ids=[f"{w} {' '.join(line.split('#')[0].split()[:3])}" for w, line in CLI_LINES]
)
def test_cli_example_runs(where, line, workdir, data_dir):
    launcher, line = _launcher(line)
    args = _cli_args(line, data_dir)
    proc = _run([*launcher, *args], workdir)
    assert proc.returncode == 0, f"{where}: {line!r} -> exit {proc.returncode}\n{proc.stderr[-2000:]}"
    if args[0] == "segment" and "*" in args[1]:  # a cohort: one folder per scan and the summary
        out = workdir / args[args.index("--out") + 1]
        assert (out / "cohort_summary.csv").is_file() and (out / "ct_abdomen_sm" / "summary.json").is_file()
        rows = (out / "cohort_summary.csv").read_text().splitlines()[1:]
        assert len(rows) == len(sorted(data_dir.glob(args[1].rpartition("/")[2]))), rows  # every scan once
    elif args[0] in ("segment", "demo"):
        assert "wrote " in proc.stdout
        out = workdir / re.search(r"^wrote (.+)$", proc.stdout, flags=re.M).group(1)  # absolute stays absolute
        if out.name.endswith((".nii.gz", ".nii")):  # a label map and its legend
            assert out.is_file() and out.with_name(out.name.split(".nii")[0] + ".json").is_file(), out
        else:
            assert (out / "summary.json").is_file(), out
    if args[0] == "finetune":
        out = workdir / args[args.index("--out") + 1]
        assert (out / "adapter_default.safetensors").is_file() and (out / "train_log.csv").is_file(), sorted(
            out.iterdir()
        )


def _anchor(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_documents_resolve():
    problems = []
    for doc in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://", "#")):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve()
            if not file.is_file():
                problems.append(f"{doc.name}: {target} (no such file)")
            elif anchor and anchor not in {_anchor(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), flags=re.M)}:
                problems.append(f"{doc.name}: {target} (no such heading)")
    assert not problems, problems


def test_section_pointers_in_the_package_resolve():
    # docstrings cite the official pipeline as "docs/official-pipeline.md §5.1"; §11.n is item n of §11
    pipeline = (ROOT / "docs" / "official-pipeline.md").read_text()
    sections = set(re.findall(r"^#+ §(\d+(?:\.\d+)?) ", pipeline, flags=re.M))
    quirks = re.search(r"^## §11 .*?(?=^## )", pipeline, flags=re.M | re.S).group(0)
    sections |= {f"11.{n}" for n in re.findall(r"^(\d+)\. ", quirks, flags=re.M)}
    problems = []
    for py in sorted((ROOT / "segevol_fast").rglob("*.py")):
        text = py.read_text()
        for cited in re.findall(r"§\s*([\d.]+(?:\s*[–-]\s*[\d.]+)?)", text):
            numbers = [n.strip(".") for n in re.split(r"\s*[–-]\s*", cited)]
            problems += [f"{py.relative_to(ROOT)}: §{n}" for n in numbers if n not in sections]
        problems += [
            f"{py.relative_to(ROOT)}: {d}" for d in re.findall(r"docs/[\w.-]+\.md", text) if not (ROOT / d).is_file()
        ]
        if "§" in text and "docs/official-pipeline.md" not in text:
            problems.append(f"{py.relative_to(ROOT)}: § without naming docs/official-pipeline.md")
        problems += [
            f"{py.relative_to(ROOT)}: {m!r} (notes outside the repository)"
            for m in re.findall(r"shared/reference\S*|reference notes|reference §", text)
        ]
    assert not problems, problems
