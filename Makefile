# The README's two commands. Each creates (or reuses) the local virtual environment .venv and
# installs what it needs, so both work on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.salnet-installed

.PHONY: demo test test-fast lint slurm-up slurm-down clean-venv

# torch/torchvision first, pinned exactly: these builds lie on the machine's disk; anything that
# pulled an unpinned torch would download gigabytes.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# The linter, the formatter (ruff) and the layering contracts (import-linter), all configured in
# pyproject.toml: `make test` runs them first, so CI keeps the tree clean and the layers true.
# `ruff format . && ruff check --fix .` mends most ruff findings.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The suite runs on two pytest-xdist workers, each taking whole modules (so a module's fixtures are
# made once), the longest modules first (tests/conftest.py orders them): both workers finish together.
PYTEST := $(PY) -m pytest -n 2 --dist loadscope --no-loadscope-reorder

# The Slurm tests (tests/test_slurm.py, test_sweep.py, test_multinode.py) run on a real 4-node cluster
# (the most any test uses) on this machine, from Debian's
# Slurm packages (.ci/run installs them; up.sh needs root). `make test` brings it up first and stops
# it at the end if it started it; where Slurm is not installed those tests skip and say why.
test: lint
	@started=0; \
	if [ "$$(id -u)" = 0 ] && command -v slurmctld >/dev/null 2>&1; then \
	    out=$$(slurm/local/up.sh --nodes 4) || { echo "$$out"; exit 1; }; echo "$$out"; \
	    case "$$out" in *"started slurmctld"*) started=1;; esac; \
	else \
	    echo "make test: Slurm is not installed here (or not root): the Slurm tests will skip (.ci/run installs it)"; \
	fi; \
	$(PYTEST); status=$$?; \
	if [ $$started = 1 ]; then slurm/local/down.sh; fi; \
	exit $$status

# The quick tier for development: every test not marked slow (no training runs, torchrun groups or
# Slurm jobs, so no cluster either). CI runs `make test`, all of it.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The local test cluster (root): `make slurm-up [NODES=N]`, then sinfo/sbatch/squeue/scancel work anywhere.
slurm-up:
	slurm/local/up.sh $(if $(NODES),--nodes $(NODES))

slurm-down:
	slurm/local/down.sh

# The demo: synthesize the built-in data once (the manifest is written last, so its presence
# means a complete set), then train on CPU with two ranks, print the final metrics, and write the
# run's page (its last line says where: runs/demo/report/index.html).
DEMO_DATA := shards/demo/val/manifest.json

$(DEMO_DATA): | $(STAMP)
	$(PY) -m salnet.shards synth shards/demo --train 2000 --val 200 --size 128 --seed 0 --workers 2 --overwrite

demo: $(STAMP) $(DEMO_DATA)
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m salnet.train --config configs/demo.yaml
	$(PY) -m salnet.report runs/demo --no-plots --html

clean-venv:
	rm -rf $(VENV)
