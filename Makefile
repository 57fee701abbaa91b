# Two commands are all the set-up there is: `make demo` and `make test`.
# Each creates or reuses .venv; the install step reruns only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench-decode clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first: the pinned pair installs from this machine's disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

# The whole system on this machine (genius demo): Fashion-MNIST shards -> `genius index build` on
# a local Ray cluster -> `genius serve local` -> queries through the gRPC client -> recall table
# -> servers stopped; writes to demo_out/ and reuses it on a second run. Its corpus is the Debian
# package dataset-fashion-mnist: installed here when we are root, otherwise the command to run
# is printed.
demo: $(STAMP)
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "make demo needs Fashion-MNIST: run 'sudo apt-get install dataset-fashion-mnist' (or: $(VENV)/bin/genius demo --corpus captions)"; exit 1; fi
	$(VENV)/bin/genius demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench-decode: $(STAMP)
	$(PY) bench/decode.py

clean-venv:
	rm -rf $(VENV)
