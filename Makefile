# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# Fashion-MNIST's four idx files; `make demo FMNIST=/your/dir` to use another copy.
FMNIST ?= /usr/share/datasets/fashion-mnist
RUN ?= runs/demo
CONFIG ?= configs/fashion_mnist.yaml
SSL_KD := $(VENV)/bin/ssl-kd
# The tested version of every package: each install below takes its pins (`make lock` refreshes).
LOCK := constraints.txt
LOCK_VENV ?= .venv-lock
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz \
                t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

.PHONY: demo oracle same-arch features ablations test test-cluster test-fast lint lock fashion-mnist clean

# A changed lock or pyproject.toml reinstalls: pip moves every package to its pinned version.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c $(LOCK) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed $(LOCK)
	$(VENV)/bin/pip install -c $(LOCK) -e '.[dev]'
	touch $@

# Resolve pyproject.toml's ranges afresh, in a new venv with every extra, and pin what was
# installed (the project itself excluded). A constraint only pins a package that something
# requires, so a dependency added since is installed unpinned until this runs again.
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -e .
	extras=$$($(LOCK_VENV)/bin/python -c "from importlib.metadata import metadata; \
	  print(','.join(metadata('ssl_kd').get_all('Provides-Extra') or []))"); \
	  $(LOCK_VENV)/bin/pip install -e ".[$$extras]"
	{ echo "# Tested versions, pinned by make lock (Python $$($(LOCK_VENV)/bin/python -c \
	  'import platform; print(platform.python_version(), platform.system(), platform.machine())'))."; \
	  echo "# Every install here takes them: pip install -c constraints.txt -e '.[dev]'"; \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

# Installs the Debian package when the default directory is missing and we are root.
fashion-mnist:
	@missing=0; for f in $(FMNIST_FILES); do [ -f "$(FMNIST)/$$f" ] || missing=1; done; \
	if [ $$missing = 1 ] && [ "$(FMNIST)" = /usr/share/datasets/fashion-mnist ] \
	   && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	fi; \
	for f in $(FMNIST_FILES); do \
	  if [ ! -f "$(FMNIST)/$$f" ]; then \
	    echo "error: Fashion-MNIST not found in $(FMNIST): install the Debian package" \
	         "dataset-fashion-mnist (as root: apt-get install dataset-fashion-mnist) or run" \
	         "make demo FMNIST=DIR with DIR holding $(FMNIST_FILES)" >&2; \
	    exit 1; \
	  fi; \
	done

# The whole pipeline (data, teacher, labels, selection, shards, student, baseline, results);
# a rerun skips every stage whose outputs are up to date.
demo: $(VENV)/.installed fashion-mnist
	$(SSL_KD) run --config $(CONFIG) --source $(FMNIST) --out $(RUN)

# The oracle row of the demo: the same student on the true labels of the selected images, in
# the demo's run directory, so only the oracle's stages run (about 2 minutes on 2 cores).
oracle: $(VENV)/.installed fashion-mnist
	$(SSL_KD) run --config $(CONFIG) --source $(FMNIST) --out $(RUN) --set oracle_seeds=1

# The second shipped config: teacher and student of the same architecture.
same-arch: $(VENV)/.installed fashion-mnist
	$(SSL_KD) run --config configs/fashion_mnist_same_arch.yaml --source $(FMNIST) \
	  --out runs/same_arch

# Feature distillation: the demo's students, and the same students also matching the teacher's
# stored embeddings at four weights (about 55 minutes on 2 cores).
features: $(VENV)/.installed fashion-mnist
	$(SSL_KD) run --config $(CONFIG) --source $(FMNIST) --out runs/features \
	  --set 'feature_weights=[0.25, 1, 4, 16]' --set oracle_seeds=0

# K, P and loss ablations (about an hour on 2 cores).
ablations: $(VENV)/.installed fashion-mnist
	$(VENV)/bin/python bench/ablations.py --config $(CONFIG) --out runs/ablations --reuse $(RUN) \
	  --report runs/ablations/ablations.json

test: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest

# The multi-node fault tests alone (also part of make test), with a line per test.
test-cluster: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest -m cluster -rA

test-fast: $(VENV)/.installed-dev
	$(VENV)/bin/python -m pytest -m "not slow"

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(RUN) runs/same_arch runs/ablations
