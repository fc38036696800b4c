# Two commands: `make run` (install, get the data, run the default job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOB ?= jobs/fashion_mnist.yaml
DATA ?= data/fashion-mnist
# Offline machines copy the official files from a local mirror instead of downloading them.
FMNIST_MIRROR ?= $(firstword $(wildcard ../shared/data/fashion-mnist))
export FMNIST_MIRROR
PYTEST_ARGS ?=

.PHONY: install data run test browser lint clean-venv

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	@# UMAP's and the t-SNE's numba kernels into the disk cache now, not in each worker's
	@# first fit.
	$(BIN)/python -W ignore -c "from fmnist_dask.models.manifold import compile_umap_kernels; \
		compile_umap_kernels()"
	$(BIN)/python -W ignore -c "from fmnist_dask.models.tsne import compile_tsne_kernels; \
		compile_tsne_kernels()"
	touch $@

install: $(BIN)/.installed

$(DATA)/fashion-mnist_train.csv: | $(BIN)/.installed
	$(BIN)/fmnist-dask fetch --dest $(DATA) --csv

data: $(DATA)/fashion-mnist_train.csv

run: install data
	$(BIN)/fmnist-dask run $(JOB) $(RUN_ARGS)

# The report tests load pages in Debian's chromium: installed here (as root), not by a test.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium >/dev/null; } \
		|| echo "chromium is missing and was not installed (needs root and apt-get)"

# Two test processes, one per core: each takes whole groups of tests (a module, or the modules
# that read the session's shared job runs: tests/conftest.py), so no costly fixture runs twice.
test: install browser
	$(BIN)/ruff check fmnist_dask tests benchmarks
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
