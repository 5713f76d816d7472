# Two commands on a fresh machine: `make demo` and `make test`. Both create (or reuse) .venv,
# install torch 2.13.0 (the CPU build from the local disk on these machines) and the pinned
# dependencies, build the native extension, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.extension-built
MONAI09 := $(VENV)/monai-0.9.0
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml

.PHONY: all demo lint test test-avx2 build bench bench-optimize bench-resources bench-session bench-adapters study bench-encoder bench-segment bench-memory bench-gpu cuda-check info clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and alone, pinned: on these machines `pip install torch==2.13.0` takes the CPU
# wheel from the local disk. The constraints file keeps later installs from replacing it.
# MONAI 0.9.0 comes along (order-only, so an existing venv gets it without reinstalling the rest).
$(DEPS): $(PY) requirements/dev.txt requirements/constraints.txt | $(MONAI09)/monai/__init__.py
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements/dev.txt
	touch $@

# MONAI 0.9.0 is the release the official SegVol code pins, so it is what optimize() meets in its
# users' models; it cannot share the venv with the current MONAI (requirements/dev.txt), so it is
# installed beside it, alone (--no-deps: torch, numpy and einops are the venv's), and
# tests/test_optimize_monai09.py and bench/optimize_official.py put it first on PYTHONPATH in a
# child process.
$(MONAI09)/monai/__init__.py: | $(PY)
	$(PIP) install --upgrade --no-deps --target $(MONAI09) monai==0.9.0

# --no-build-isolation: build against the torch above instead of downloading another one.
$(BUILT): $(DEPS) $(NATIVE_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

info: build
	$(PY) -m segevol_fast info

# ruff lint and format check (rules and width: [tool.ruff] in pyproject.toml; `ruff format .`
# fixes the layout). The import contract (layers, no circles, no private names across modules) is a
# test: tests/test_layers.py.
lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The suite runs twice: on this CPU's own code paths, then with the AVX2 paths forced in torch's
# kernels, MKL's GEMMs and oneDNN, as on AVX2-only laptops and cloud VMs, where sums round
# differently: a guarantee (bit identity, a tolerance) that holds on one instruction set only fails
# here. The second pass skips what cannot depend on the instruction set (docs, command-line
# plumbing, the study's pipeline check, CUDA compiles, the napari plugin's wiring); tests/test_isa.py
# checks the forcing took effect. The napari tests draw on a virtual X screen that pytest-xvfb starts
# (Xvfb and Mesa: .ci/run installs them).
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 SEGEVOL_FAST_EXPECT_ISA=avx2
ISA_FREE := tests/test_readme_examples.py tests/test_first_contact.py tests/test_info.py tests/test_cuda_sources.py \
            tests/test_bad_inputs.py tests/test_bad_inputs_cli.py tests/test_cli.py \
            tests/test_finetune_cli.py tests/test_finetune_methods.py tests/test_adaptation_study.py \
            tests/eval/test_robustness.py tests/eval/test_robustness_cli.py tests/test_robustness_study.py \
            tests/test_fast_agreement_bench.py tests/viewer/test_manifest.py tests/viewer/test_widget.py
AVX2_PASS := $(AVX2_ENV) SEGEVOL_FAST_REQUIRE_NATIVE=1 $(PY) -m pytest tests -p no:cacheprovider $(ISA_FREE:%=--ignore=%)
test: build lint
	SEGEVOL_FAST_REQUIRE_NATIVE=1 $(PY) -m pytest tests
	$(AVX2_PASS)

# Only the second pass above (AVX2 code paths forced).
test-avx2: build
	$(AVX2_PASS)

bench: build
	$(PY) -m pytest bench -o python_files='bench_*.py' --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

# Wall time / peak memory / windows for S, M, L scans, 1 and 15 organs, fast vs exact (hours on a CPU).
bench-resources: build
	$(PY) bench/resource_table.py

# The official encoder (one 32x256x256 window) as is and after optimize(), on MONAI 0.9.0 and the
# current MONAI, plus its decoder's attention layer on the op (10-15 minutes on 2 cores).
bench-optimize: build
	$(PY) bench/optimize_official.py

bench-session: build
	$(PY) bench/session_bench.py

bench-adapters: build
	$(PY) bench/adapter_bench.py

# The adaptation study on the shared CT/MRI (small config, 3 seeds, ~37 min on 2 cores); docs/benchmarks.md.
study: build
	$(PY) bench/adaptation_study.py

# The small trained model (small config, the shared CT, DICOM CT and MR; ~25 min on 2 cores), and
# with LOO=1 one model per left-out volume as well (3x longer); docs/benchmarks.md.
small-model: build
	$(PY) bench/small_model.py $(if $(LOO),--leave-one-out)

# Rotation and prompt-jitter robustness of the small model, and of TTA, LoRA and the rotation branch; docs/robustness.md.
robustness-study: build
	$(PY) bench/robustness_study.py

bench-encoder: build
	$(PY) bench/cpu_encoder.py

bench-segment: build
	$(PY) bench/segment_bench.py

# Fast mode's zoom-in approximations, each alone and as defaults, against exact mode: Dice,
# probabilities, windows and tokens encoded, time (full-size random weights, seeds 0-2, and the
# small trained model; ~30 min on 2 cores; INCLUDE_512=1 adds the 512x512x300 scan, hours).
bench-fast-agreement: build
	$(PY) bench/fast_agreement.py $(if $(INCLUDE_512),--include-512)

# The memory planner against measured peaks of whole segment() calls (fails outside 1.0-1.25x).
bench-memory: build
	$(PY) bench/calibrate_segment.py

# The main job: segment several organs in the shared real CT (or a generated phantom when
# ../shared/data is absent) with the official weights when found, else full-size random weights
# (loudly flagged: masks are then meaningless); prints time and peak memory, writes masks + preview.
# The installed command knows no data folder: SEGEVOL_DATA names the repository's shared one here.
SEGEVOL_DATA ?= $(CURDIR)/../shared/data
demo: build
	$(PY) -m segevol_fast info
	SEGEVOL_DATA=$(SEGEVOL_DATA) $(PY) -m segevol_fast demo --full --out segevol_out/demo

# On a CUDA machine (device python with CUDA torch), in one call: build, `gpu` tests, every op
# timed, session latency, the resource table; logs and JSON under $OUT (bench/gpu_session.sh).
bench-gpu:
	bash bench/gpu_session.sh

cuda-check:
	$(PY) -m pytest tests/test_cuda_sources.py -q

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks $(BUILT)
