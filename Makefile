# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# One OpenBLAS thread: on a shared CPU its threads make LAPACK (eigh) far slower.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: install data test test-latest demo bench clean docs build

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test,examples]"
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST (the real 60k + 10k release) from Debian's dataset-fashion-mnist.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: $(FMNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	    || echo "WARNING: apt-get could not install dataset-fashion-mnist; see README (Data) for alternatives."; \
	else \
	  echo "WARNING: Fashion-MNIST not found and apt is not usable here. Either run as root on Debian/Ubuntu:"; \
	  echo "  apt-get install dataset-fashion-mnist"; \
	  echo "or put the four idx .gz files in a directory and set EVA_OPTAX_FMNIST_DIR=that/dir,"; \
	  echo "or set EVA_OPTAX_DOWNLOAD=1 where a network exists (files are checksum-verified)."; \
	fi
	@# The King James Bible (examples/transformer_lm.py): Debian's bible-kjv (its reader) and bible-kjv-text.
	@if [ -f /usr/lib/bible.data ] && command -v bible >/dev/null 2>&1; then \
	  echo "King James Bible: /usr/lib/bible.data (bible-kjv)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "Installing the King James Bible (Debian packages bible-kjv, bible-kjv-text)..."; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv bible-kjv-text >/dev/null) \
	    || echo "WARNING: apt-get could not install bible-kjv; transformer_lm.py needs it or --text FILE."; \
	else \
	  echo "WARNING: the King James Bible is not installed and apt is not usable here. As root on Debian/Ubuntu:"; \
	  echo "  apt-get install bible-kjv"; \
	  echo "or give examples/transformer_lm.py a text file of your own with --text FILE."; \
	fi

PYTEST_ARGS := -q -n 2 --durations=25 tests

test: install data
	$(PY) -m pytest $(PYTEST_ARGS)

# The same suite on the newest releases: Python 3.13 and the newest jax, jaxlib, flax, optax and
# chex in $(VENV_LATEST) (pip --upgrade on every run, so it follows new releases). The
# interpreter: $(PYTHON313) if set, else `python3.13` on PATH when it runs (a pyenv shim for a
# version that is not selected is on PATH but fails), else the newest pyenv
# $(PYENV_ROOT)/versions/3.13.*/bin/python (PYENV_ROOT defaults to ~/.pyenv).
VENV_LATEST ?= .venv-latest
PYENV_ROOT ?= $(HOME)/.pyenv
PYTHON313 ?= $(shell if python3.13 -c "" >/dev/null 2>&1; then command -v python3.13; \
  else ls -d $(PYENV_ROOT)/versions/3.13.*/bin/python 2>/dev/null | sort -V | tail -n 1; fi)

test-latest: data
	@test -n "$(PYTHON313)" || { echo "Python 3.13 not found: put python3.13 on PATH," \
	  "install it with pyenv (pyenv install 3.13), or set PYTHON313=/path/to/python3.13"; exit 1; }
	@test -x $(VENV_LATEST)/bin/python || $(PYTHON313) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/pip install -q --upgrade pip
	$(VENV_LATEST)/bin/pip install -q -e ".[test,examples]"
	$(VENV_LATEST)/bin/pip install -q --upgrade jax jaxlib flax optax chex
	@$(VENV_LATEST)/bin/python -c "import sys, jax, jaxlib, flax, optax, chex; \
	  print('Python', sys.version.split()[0], '| jax', jax.__version__, '| jaxlib', \
	  jaxlib.__version__, '| flax', flax.__version__, '| optax', optax.__version__, \
	  '| chex', chex.__version__)"
	$(VENV_LATEST)/bin/python -m pytest $(PYTEST_ARGS)

demo: install data
	$(PY) examples/demo.py

bench: install
	$(PY) benchmarks/step_time.py

# The docs extra (Sphinx, myst-parser) on top of `install`.
$(VENV)/.docs-installed: pyproject.toml $(VENV)/.installed
	$(VENV)/bin/pip install -q -e ".[docs]"
	touch $@

# API reference into docs/_build/html. -W: a warning (also a public name missing from the
# reference) fails the build; -E: read everything again, so the API page follows __all__.
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -E -b html -q docs docs/_build/html
	@echo "Docs: docs/_build/html/index.html"

# sdist and wheel into dist/ (tests/test_packaging.py builds them offline and installs the wheel).
build: install
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) $(VENV_LATEST) results docs/_build dist
