# One-command set-up, tests and demo. The set-up steps (.venv, lib/'s build, the data set) run again only when
# their output is missing or older than its inputs, and pick up where a stopped run left off; test, demo and
# gpu-check run in full each time (demo into a new folder).
PYTHON := python3
PY := .venv/bin/python
EXT_SOURCES := setup.py lib/cuda_toolkit.py $(wildcard lib/cpool/csrc/*) $(wildcard lib/nms/*.pyx)

.PHONY: setup test demo clean gpu-check

setup: .venv/.installed lib/.built

# requirements.txt pins releases (numpy, matplotlib, onnxruntime) that need Python 3.11: with an older one pip only
# says "no matching distribution found for numpy", and a .venv it made keeps its Python when venv runs again.
NEEDS_311 = -c 'import sys; sys.exit(sys.version_info < (3, 11) and "$(1) is Python %s; requirements.txt needs 3.11 \
	or newer; $(2)" % sys.version.split()[0])'

# The venv is made once, not on each change of requirements.txt: venv run on a .venv that another Python made
# (PYTHON=python3.12) rewrote its pyvenv.cfg for python3, or stopped where python3 is older than 3.11. venv writes
# bin/activate last (after pip), so one that was stopped or failed (no ensurepip) runs again.
.venv/bin/activate:
	@$(PYTHON) $(call NEEDS_311,$(PYTHON),make setup PYTHON=python3.12 (say) takes another)
	$(PYTHON) -m venv .venv

.venv/.installed: requirements.txt | .venv/bin/activate
	@$(PY) $(call NEEDS_311,$(PY),remove .venv (an older Python made it) and run make setup again)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# lib/.built stands for the two modules only while both are there: with one removed by hand, `make setup` (which
# the import error asks for) did nothing.
ifeq ($(and $(wildcard lib/cpool/_ext.*.so),$(wildcard lib/nms/_soft_nms.*.so)),)
.PHONY: lib/.built
endif

# --force: setuptools alone skips an extension whose build/ copy is newer than its .cpp and .pyx files, so a new torch
# (requirements.txt) or a changed setup.py would keep the old build.
lib/.built: .venv/.installed $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace --force
	touch $@

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf build lib/.built lib/cpool/*.so lib/nms/*.so lib/nms/*.c

# The first run: built-in data, tiny_hourglass trained on the CPU, then test.py with flip. Each run gets its own
# folder under ckpt/, so nothing from an earlier run is overwritten.
DEMO_RUN := shapes_demo_$(shell date +%Y%m%d_%H%M%S)
DEMO_DATA := --dataset coco --data_dir data/shapes --val_split val

demo: setup data/shapes/annotations/instances_val.json
	$(PY) train.py --log_name $(DEMO_RUN) $(DEMO_DATA) --train_split train --arch tiny_hourglass --img_size 127 \
		--batch_size 16 --lr 2e-3 --lr_step 30 --num_epochs 36 --val_interval 12 --num_workers 2 --device cpu
	$(PY) test.py --log_name $(DEMO_RUN) $(DEMO_DATA) --test_flip --device cpu

# --force: this runs only while the set lacks its val json (a killed run may have left train/ alone).
data/shapes/annotations/instances_val.json: | .venv/.installed
	$(PY) -m datasets.shapes --out data/shapes --force

# On a GPU machine: builds the CUDA kernel, runs the cuda tests (also under compute-sanitizer), the benchmarks and a
# short --amp training run with test.py --test_flip, and prints one summary table (tools/gpu_check.py). With a
# Python that already holds torch: `make gpu-check PY=python3` (options of the script: GPU_CHECK_ARGS="--budget 300
# --wheels DIR"; GPU_CHECK_ARGS=--dry-run prints the plan anywhere).
gpu-check:
	$(PY) tools/gpu_check.py $(GPU_CHECK_ARGS)
