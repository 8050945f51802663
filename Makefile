# `make demo` and `make test` do all set-up on a fresh machine: a virtual environment (.venv, unless one is
# active), the package with its test and oracle extras, then the job. Re-installs only when setup.py changes.
ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
BIN := $(VENV)/bin
STAMP := $(VENV)/.mthl-ds-installed
PYTEST_ARGS ?=

.PHONY: install demo test clean gpu-wheels gpu-check

$(BIN)/python:
	python3 -m venv $(VENV)

$(STAMP): setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,oracle]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mthl-ds demo --out runs/demo

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf runs .pytest_cache

# Wheels for the lent GPU machine (Python 3.12, torch 2.11+cu130, no network), which lacks these of the
# project's requirements; everything else it needs is installed there (/work/.library/device/KINDS.md).
# `make gpu-wheels` fetches them here into $(GPU_WHEELS_DIR) (git-ignored; a few MiB, to carry there);
# `make gpu-check` installs them there with $(GPU_WHEELS_INSTALL). One version of each, compatible for cp312:
#   deepspeed: built here from its sdist, pure python, no op compiled (ops JIT-compile on the GPU machine);
#     DS_ACCELERATOR=cuda records accelerator 'cuda' rather than this machine's 'cpu' (shown by ds_report).
#   hjson, pydantic (+ pydantic-core, which it pins, annotated-types, typing-inspection): deepspeed's.
#     pydantic 2.13.5 and typing-inspection 0.4.2 need typing-extensions>=4.14.1, not >=4.16 as newer ones
#     do: typing-extensions is the GPU machine's own, so the lower the floor the safer.
#   webdataset (+ braceexpand), segmentation-models-pytorch, pycocotools, xxhash: the project's (setup.py).
#   timm 1.0.31, our pin: the machine's 1.0.29 Swin refuses inputs other than its build size (PatchEmbed's
#     strict size check) and mixes a float32 mask into half-precision attention (seen in the first gpu-check).
# Wheels already there are kept, stale ones (no longer pinned) removed, then all are checked with a
# dry-run install for CPython 3.12 on x86_64 Linux, as the GPU machine will install them. The build sees
# the venv's torch (--no-build-isolation), so it needs setuptools there (a Python 3.12+ venv has none).
GPU_WHEELS_DIR := .gpu_wheels
GPU_WHEELS_PINS := timm==1.0.31 webdataset==1.0.2 braceexpand==0.1.7 segmentation-models-pytorch==0.6.0 \
	pycocotools==2.0.11 hjson==3.1.0 pydantic==2.13.5 pydantic-core==2.46.5 annotated-types==0.7.0 \
	typing-inspection==0.4.2 xxhash==4.1.0
GPU_WHEELS_SDIST := deepspeed==0.19.8
GPU_WHEELS_TAGS := --python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	--platform manylinux1_x86_64
GPU_WHEELS_INSTALL := python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
	--target /tmp/site $(GPU_WHEELS_DIR)/*.whl && export PYTHONPATH=/tmp/site

gpu-wheels: $(STAMP)
	@set -e; d=$(GPU_WHEELS_DIR); mkdir -p $$d; \
	whl() { find $$d -maxdepth 1 -type f -iname "$$(echo $${1%%==*} | tr .- __)-$${1##*==}-*.whl"; }; \
	keep=; for p in $(GPU_WHEELS_PINS) $(GPU_WHEELS_SDIST); do keep="$$keep $$(whl $$p)"; done; \
	for f in $$d/* $$d/.[!.]*; do [ -e "$$f" ] || continue; \
	  case " $$keep " in *" $$f "*) ;; *) echo "gpu-wheels: removing $$f (not pinned)"; rm -rf "$$f";; esac; done; \
	get=; for p in $(GPU_WHEELS_PINS); do [ -n "$$(whl $$p)" ] || get="$$get $$p"; done; \
	if [ -n "$$get" ]; then echo "gpu-wheels: downloading$$get"; \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: $(GPU_WHEELS_TAGS) -d $$d $$get; fi; \
	if [ -z "$$(whl $(GPU_WHEELS_SDIST))" ]; then echo "gpu-wheels: building $(GPU_WHEELS_SDIST)"; \
	  $(BIN)/python -c 'import setuptools' 2>/dev/null || $(BIN)/python -m pip install -q setuptools; \
	  DS_ACCELERATOR=cuda DS_BUILD_OPS=0 $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation \
	    --no-binary deepspeed --no-cache-dir -w $$d $(GPU_WHEELS_SDIST); fi; \
	for p in $(GPU_WHEELS_PINS) $(GPU_WHEELS_SDIST); do [ "$$(whl $$p | wc -l)" -eq 1 ] || \
	  { echo "gpu-wheels: no single wheel for $$p in $$d" >&2; exit 1; }; done; \
	$(BIN)/python -m pip install -q --dry-run --no-index --no-deps --only-binary=:all: $(GPU_WHEELS_TAGS) \
	  --target /tmp/gpu-wheels-check $$d/*.whl; \
	ls -l $$d; du -sh $$d

# On a lent GPU machine (one GPU, no network, its own python3 with torch): install the wheels `make gpu-wheels`
# fetched, the project without its dependencies, then every GPU check (mthl_ds/studies/gpu_check.py), which writes
# gpu_report.json / .md to $$OUT when set. It must not depend on gpu-wheels or the venv: there is no network there.
gpu-check:
	$(GPU_WHEELS_INSTALL):$(CURDIR) && \
	(python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . || \
	 echo "gpu-check: editable install failed; the project runs from PYTHONPATH") && \
	python3 -m mthl_ds.studies.gpu_check
