# make setup: idempotent install into .venv; make demo: compress the shipped ResNet-18; make test: the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: setup demo test fmnist clean

setup: $(VENV)/.installed fmnist

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,test]'
	touch $@

# Debian's dataset-fashion-mnist when we are root and it is missing; otherwise $SVDNAS_FMNIST is read.
fmnist:
	@if [ -d "$(FMNIST_DIR)" ] || [ -n "$$SVDNAS_FMNIST" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; \
	else echo "note: Fashion-MNIST not installed; set SVDNAS_FMNIST to the folder of its IDX files"; fi

demo: setup
	$(PY) -m svdnas eval zoo:resnet18 --data fmnist
	$(PY) -m svdnas compress zoo:resnet18 --data fmnist --reduction 0.6 --out $(DEMO_OUT) --overwrite

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis src/*.egg-info
