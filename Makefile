# One-command set-up, tests and demo. Every target is idempotent and quick when nothing changed.
PY := .venv/bin/python
EXT_SOURCES := setup.py $(wildcard lib/cpool/csrc/*) $(wildcard lib/nms/*.pyx)

.PHONY: setup test demo clean

setup: .venv/.installed lib/.built

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

lib/.built: .venv/.installed $(EXT_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf build lib/.built lib/cpool/*.so lib/nms/*.so lib/nms/*.c
