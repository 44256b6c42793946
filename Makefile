# The README's two commands. Each creates (or reuses) the local virtual environment .venv and
# installs what it needs, so both work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.salnet-installed

.PHONY: demo test clean-venv

# torch/torchvision first, pinned exactly: these builds lie on the machine's disk; anything that
# pulled an unpinned torch would download gigabytes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest

# Until the trainer lands (issue 7) the demo resolves its config and checks a two-rank gloo group.
demo: $(STAMP)
	$(PY) -m salnet.config --config configs/demo.yaml
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --nproc_per_node 2 tests/dist_probe.py --config configs/demo.yaml

clean-venv:
	rm -rf $(VENV)
