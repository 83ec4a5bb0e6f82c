# The two commands of the README: `make bench` (the main job) and `make test`.
# Both set themselves up from a fresh clone (venv, torch, build) via scripts/bootstrap.sh.
VENV ?= .venv
VPY  := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: build test bench fuzz docs cuda-check port-check test-aarch64 cuda-build test-cuda-build gpu-check gpu-rev gpu-wheels clean

build:
	./scripts/bootstrap.sh

test: build docs cuda-check port-check
	$(VPY) -m pytest -q $(PYTEST_ARGS) tests

# The property-based tests with the long hypothesis profile (20x the examples of `make test`,
# random seeds; ~10 CPU-minutes); prints how many generated cases passed, by kind.
fuzz: build
	FASTREG_HYPOTHESIS_PROFILE=fuzz $(VPY) -m pytest -q $(PYTEST_ARGS) tests/test_fuzz_lce.py tests/test_fuzz_optim.py

# The documentation site (docs/, mkdocs.yml) into build/site: installs MkDocs, Material and
# mkdocstrings into the venv when missing; --strict fails on any broken link or anchor, a page left
# out of the nav or an API reference that does not resolve (not with --quiet: it hides the warnings
# from --strict too). Needs no build of the extension.
docs:
	@test -x $(VPY) || ./scripts/bootstrap.sh
	@$(VPY) -c 'import mkdocs, material, mkdocstrings_handlers.python' 2>/dev/null || \
	  $(VPY) -m pip install -q "mkdocs>=1.6,<2" "mkdocs-material>=9.5" "mkdocstrings[python]>=0.26"
	NO_MKDOCS_2_WARNING=1 $(VPY) -m mkdocs build --strict

bench: build
	$(VPY) -m fastreg.bench $(BENCH_ARGS)

# Compile every CUDA source with nvcc for sm_80 and sm_90 against the installed torch headers
# (no GPU needed). Skips with a message when nvcc is absent.
cuda-check: build
	$(VPY) scripts/cuda_check.py

# Compile every C++ source for Linux aarch64 (Debian's cross GCC, with OpenMP) and with clang for
# x86-64 and aarch64 (without OpenMP, as Apple clang), against the installed torch headers.
# Installs the compilers when missing (root + apt-get), else skips them with a message.
port-check: build
	./scripts/port_tools.sh
	$(VPY) scripts/port_check.py

# The CPU tests (a subset covering both ops, every dtype and option) on aarch64 under qemu-user:
# cross-built extension, Debian's arm64 python3.11 and torch's aarch64 wheel in .aarch64/ (~3 GB,
# git-ignored; downloaded once). Not part of `make test` (see README, "Platforms").
test-aarch64: build
	./scripts/port_tools.sh --qemu
	./scripts/test_aarch64.sh

# Build the whole extension with CUDA (sm_80 + sm_90, MAX_JOBS=2) against torch 2.14.1's CUDA build
# in .venv-cuda, in a copy of the tree (.cuda-build; both git-ignored), import it without a GPU and
# check that every fastreg op has a CUDA kernel. ~15-25 min the first time on 2 cores; not part of
# `make test`. See docs/gpu-check.md.
cuda-build:
	./scripts/cuda_build.sh

# The CPU test suite on that CUDA build (~25 min on 2 cores; TESTS=... for a subset); logs to
# benchmarks/results/cuda-build/.
TESTS ?= tests
test-cuda-build:
	./scripts/cuda_build.sh --tests $(TESTS)

# On the GPU box, in one command of at most 600 s: build with CUDA (this GPU's arch), the CUDA tests
# first, then the GPU benchmarks, each step time-boxed; logs, junit and results to $$OUT as they go.
# `scripts/gpu_check.sh --dry-run` (run by tests/test_gpu_check.py) walks the same steps on a CPU.
gpu-check:
	./scripts/gpu_check.sh

# Write .fastreg-git-rev (git-ignored) for a copy of the tree without .git: carry it to the GPU box.
gpu-rev:
	echo "$$(git rev-parse --short=12 HEAD)$$(git status --porcelain --untracked-files=no | grep -q . && echo -dirty)" > .fastreg-git-rev
	cat .fastreg-git-rev

# Download the GPU competitors' wheels (pure Python) into .wheels/ (git-ignored) so that a device
# run can carry them: run here, then `run` with carry [".wheels"] and `make gpu-check` there.
gpu-wheels:
	python3 -m pip download --no-deps -d .wheels liger-kernel

clean:
	rm -rf build fastreg/_C*.so *.egg-info
