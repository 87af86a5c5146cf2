# Two commands do everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
# One OpenBLAS thread: on a shared CPU its threads make LAPACK (eigh) far slower.
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: install data test demo bench clean docs build

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

test: install data
	$(PY) -m pytest -q -n 2 --durations=25 tests

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
	rm -rf $(VENV) results docs/_build dist
