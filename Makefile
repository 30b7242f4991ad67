# saferl_ros developer entry points. `make help` lists them.
#
# The virtual environment lives in .venv and is rebuilt only when a requirements file or the
# saferl_interfaces package changes (a stamp file newer than them), so running `make test` again
# takes seconds to start. Building the messages needs cmake (>= 3.19), a C/C++ compiler and make.

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
REQ_FILES := requirements/requirements.txt requirements/constraints.txt requirements/no-deps.txt \
	requirements/interfaces.txt setup.py
# The saferl_interfaces messages, built with rosidl into the venv (tools/build_interfaces.sh).
INTERFACE_FILES := tools/build_interfaces.sh $(wildcard saferl_interfaces/package.xml \
	saferl_interfaces/CMakeLists.txt saferl_interfaces/msg/*.msg saferl_interfaces/cmake/*.cmake)
STAMP := $(VENV)/.saferl-stamp
PYTEST_ARGS ?=

export ROS_DOMAIN_ID ?= 42
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp
export DSRL_SUPPRESS_IMPORT_ERROR := 1
export MPLBACKEND := Agg

.PHONY: help venv check-env test demo loop data lint lock clean-venv

help:
	@echo "make venv       create .venv with every dependency at its pinned version and build the messages"
	@echo "make test       create the environment if missing, then run the whole test suite"
	@echo "make demo       run a shipped FISOR bundle in the simulated ROS 2 loop for 3 episodes (TASK=BallCircle;"
	@echo "                BUNDLE=models/drcorl-carcircle another bundle and its task, MONITOR_BUNDLE=models/fisor-carcircle its monitor)"
	@echo "make loop       deploy, record, merge, retrain, evaluate, export: config/loop_ballcircle.yaml (resumable; LOOP_ARGS='--set iterations=1')"
	@echo "make data       train missing behaviour agents, then collect the six datasets into datasets/"
	@echo "make lint       flake8 + pep257 with ament's settings"
	@echo "make check-env  check that the simulator and dataset environment ids register"
	@echo "make lock       re-resolve requirements/constraints.txt from requirements.txt"

venv: $(STAMP)

$(STAMP): $(REQ_FILES) $(INTERFACE_FILES)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=/path/to/python3.11'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==25.3
	$(BIN)/python -m pip install --quiet -r requirements/requirements.txt -c requirements/constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/no-deps.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	SKIP_PIP=1 tools/build_interfaces.sh $(VENV)
	$(MAKE) --no-print-directory check-env
	touch $(STAMP)

check-env:
	$(BIN)/python tools/check_env.py

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# make demo [TASK=CarRun] | [BUNDLE=models/drcorl-carcircle [MONITOR_BUNDLE=models/fisor-carcircle]]
# (with BUNDLE the task is the bundle's own)
TASK ?=
BUNDLE ?=
MONITOR_BUNDLE ?=
demo: venv
	$(BIN)/saferl-demo --episodes 3 $(if $(TASK),--task '$(TASK)') \
		$(if $(BUNDLE),--bundle '$(BUNDLE)') $(if $(MONITOR_BUNDLE),--monitor-bundle '$(MONITOR_BUNDLE)')

# The whole loop (docs/loop.md): rerunning it continues where it stopped. A small try:
# make loop LOOP_ARGS='--set iterations=1 --set deploy_episodes=2 --set train_steps=200'
LOOP_CONFIG ?= config/loop_ballcircle.yaml
LOOP_ARGS ?=
loop: venv
	$(BIN)/saferl-loop $(LOOP_CONFIG) --collect-missing $(LOOP_ARGS)

data: venv
	$(BIN)/python -m offline_training.collection.train_all --collect

lint: venv
	$(BIN)/python -m pytest test/test_flake8.py test/test_pep257.py

lock:
	$(BIN)/python -m pip install --quiet -r requirements/requirements.txt
	{ head -n 2 requirements/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable \
	  | grep -v -E '^(bullet-safety-gym|dsrl|saferl_interfaces)==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } \
	  > requirements/constraints.txt.new && mv requirements/constraints.txt.new requirements/constraints.txt

clean-venv:
	rm -rf $(VENV)
