# saferl_ros developer entry points. `make help` lists them.
#
# The virtual environment lives in .venv and is rebuilt only when a requirements file changes
# (a stamp file records their hash), so running `make test` again takes seconds to start.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
REQ_FILES := requirements/requirements.txt requirements/constraints.txt requirements/no-deps.txt setup.py
STAMP := $(VENV)/.saferl-stamp
PYTEST_ARGS ?=

export ROS_DOMAIN_ID ?= 42
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp
export DSRL_SUPPRESS_IMPORT_ERROR := 1
export MPLBACKEND := Agg

.PHONY: help venv check-env test demo data lint lock clean-venv

help:
	@echo "make venv       create .venv with every dependency at its pinned version"
	@echo "make test       create the environment if missing, then run the whole test suite"
	@echo "make demo       run the shipped FISOR bundle in the simulated ROS 2 loop for 3 episodes"
	@echo "make data       train missing behaviour agents, then collect the six datasets into datasets/"
	@echo "make lint       flake8 + pep257 with ament's settings"
	@echo "make check-env  check that the simulator and dataset environment ids register"
	@echo "make lock       re-resolve requirements/constraints.txt from requirements.txt"

venv: $(STAMP)

$(STAMP): $(REQ_FILES)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -r requirements/requirements.txt -c requirements/constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/no-deps.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(MAKE) --no-print-directory check-env
	touch $(STAMP)

check-env:
	$(BIN)/python tools/check_env.py

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/saferl-demo --episodes 3

data: venv
	$(BIN)/python -m offline_training.collection.train_all --collect

lint: venv
	$(BIN)/python -m pytest test/test_flake8.py test/test_pep257.py

lock:
	$(BIN)/python -m pip install --quiet -r requirements/requirements.txt
	{ head -n 2 requirements/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v -E '^(bullet-safety-gym|dsrl)==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } \
	  > requirements/constraints.txt.new && mv requirements/constraints.txt.new requirements/constraints.txt

clean-venv:
	rm -rf $(VENV)
