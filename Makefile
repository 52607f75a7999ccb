# One entry point. `make report` builds the website; `make test` runs every check.
# PROFILE=smoke (minutes) or PROFILE=full (every image, 224 px; the default for the report).
PROFILE ?= full
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ARG := $(if $(DATA),--data-dir $(DATA),)
# The dataset, set once for every notebook (see data/README.md): IMAGES=folder-per-class root,
# DATASET=preset (e.g. lbc), ABNORMAL=HSIL,LSIL,SCC, GROUP_PATTERN='regex'; BUILD=folder for the run.
RUN_ARGS := $(DATA_ARG) $(if $(IMAGES),--data-source "$(IMAGES)",) $(if $(DATASET),--dataset $(DATASET),) \
	$(if $(ABNORMAL),--abnormal-classes "$(ABNORMAL)",) $(if $(GROUP_PATTERN),--group-pattern '$(GROUP_PATTERN)',)
BUILD_ENV := $(if $(BUILD),CERVICAL_KIT_BUILD="$(abspath $(BUILD))",)
# Real cytology for `make test`: a small grouped subset of the LBC set beside the clone (skipped when absent).
LBC ?= ../shared/data/lbc/Resampled-pap-smear-images

.PHONY: help venv data report notebooks site check-report test unit nbval smoke real-data lab app bench bench-full clean-notebooks clean

help:
	@echo "make report [PROFILE=full|smoke] [DATA=folder]  run the notebooks headless, render _site/"
	@echo "     [IMAGES=folder DATASET=lbc ABNORMAL=A,B GROUP_PATTERN=regex BUILD=folder]  your own images"
	@echo "make test                                      unit tests + smoke notebooks + nbval + browser check"
	@echo "make data [DATA=folder]                        download UCI + SIPaKMeD (needs a network)"
	@echo "make lab                                       open the notebooks in JupyterLab"
	@echo "make app [PROFILE=full|smoke]                  local web app on 127.0.0.1:7860 (default: newest finished run)"
	@echo "make bench                                     benchmarks -> build/benchmarks/*.json + .png"

# The virtual environment is created on first use and refreshed when the pins change.
venv: $(STAMP)
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

data: venv
	$(PY) -m lib.scaffold.download all $(DATA_ARG)

notebooks: venv
	$(BUILD_ENV) $(PY) -m lib.report.pipeline --profile $(PROFILE) $(RUN_ARGS)

site: venv
	$(BUILD_ENV) $(PY) -m lib.report.site --profile $(PROFILE)

report: notebooks site

check-report: venv
	$(PY) -m lib.report.browser_check --site _site --screenshots build/screenshots

unit: venv
	$(PY) -m pytest -q --durations=15 tests

nbval: venv
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider build/smoke/notebooks/*.ipynb

# Everything CI checks, in the order a failure is cheapest to find.
test: unit
	$(MAKE) report PROFILE=smoke
	$(MAKE) nbval
	$(MAKE) check-report
	$(MAKE) real-data

# The same six notebooks, unchanged, on real cytology (smoke: a small grouped subset of LBC) into build/lbc/.
real-data: venv
	@if [ -d "$(LBC)" ]; then \
	  $(MAKE) notebooks PROFILE=smoke IMAGES="$(LBC)" DATASET=lbc BUILD=build/lbc; \
	else echo "SKIPPED real-data check: LBC images not found at $(LBC) (set LBC=folder; see data/README.md)"; fi

smoke:
	$(MAKE) report PROFILE=smoke

# Jupyter refuses to start as root without --allow-root (containers often run as root)
lab: venv
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,) notebooks/

# The Gradio app serves a finished run; PROFILE only when given (the file's default would hide the newest run).
app: venv
	$(PY) -m lib.serve.app $(if $(filter command line environment,$(origin PROFILE)),--profile $(PROFILE),)

# Speed and memory targets, measured against baselines in the same run (JSON + PNG in build/benchmarks/).
bench: venv
	$(PY) benchmarks/bench_image_branch.py features
	$(PY) benchmarks/bench_finetune_memory.py
	$(PY) benchmarks/bench_report.py --profile smoke $(DATA_ARG)

bench-full: venv
	$(PY) benchmarks/bench_image_branch.py notebooks --profile full
	$(PY) benchmarks/bench_report.py --profile full $(DATA_ARG)

clean-notebooks: venv
	$(PY) tools/nbclean.py notebooks/*.ipynb

clean:
	rm -rf build _site .cache
