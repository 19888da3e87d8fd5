# memguard: `make help` lists the targets.
VENV ?= .venv
PY := $(VENV)/bin/python
MG := $(VENV)/bin/memguard
RANDOM_MODEL := models/random-tiny-sd
export HF_HUB_OFFLINE ?= 1

.PHONY: help install test test-cpus test-numerics smoke bench bench-shards bench-fetch bench-similarity tables fetch table1 table2 table3 table4 table5 reproduce tiny-table tiny-report tiny-model tiny-ft-model tiny2-table docs docs-serve clean

help:  ## list the targets
	@grep -E '^[a-z0-9 -]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

install: $(MG) $(RANDOM_MODEL)  ## create .venv, install memguard (CPU torch 2.13.0 pinned; tests, docs), build the random demo model

$(MG): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	@touch $(MG)

$(RANDOM_MODEL): | $(MG)
	$(MG) random-model $(RANDOM_MODEL)

# the suite runs on every core (pytest-xdist), one test file per worker at a time (--dist loadfile): a file's tests
# run in order on one worker, so its module fixtures are built once. (--dist loadgroup would place xdist_group
# marks, but pytest-xdist 3.8 does not group under pytest 9, whose node ids it can no longer suffix.) Files go out
# in tests/conftest.py's order, the longest first (--no-loadscope-reorder: not by their number of tests).
# PYTEST_WORKERS=1: serial; PYTEST_ARGS: more pytest options (--durations=20: the slowest tests)
PYTEST_WORKERS ?= auto
PYTEST_ARGS ?=
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(MG) $(RANDOM_MODEL)  ## run the test suite (on every core)
	$(PYTEST) $(PYTEST_ARGS)

# torch's CPU kernels are chosen by the vector unit (ATEN_CPU_CAPABILITY); results differ in the last bits. Only the
# units this CPU has: avx2, and avx512 where it has avx512 f, vl, bw and dq (the four torch asks for, pytorch
# aten/src/ATen/cpu/Utils.cpp is_cpu_support_avx512); forcing a missing unit dies of an illegal instruction.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
CAPABILITIES := default $(if $(filter avx2,$(CPU_FLAGS)),avx2) \
	$(if $(and $(filter avx512f,$(CPU_FLAGS)),$(filter avx512vl,$(CPU_FLAGS)),$(filter avx512bw,$(CPU_FLAGS)),$(filter avx512dq,$(CPU_FLAGS))),avx512)
# the test files whose numbers come from the networks (sampling, families, baselines, metrics, detection, and the
# newer mitigations checked against references written from their authors' code)
NUMERIC_TESTS := tests/test_sampling.py tests/test_families.py tests/test_baselines.py tests/test_guidance.py \
	tests/test_similarity.py tests/test_metrics.py tests/test_fid_streaming.py tests/test_detection.py \
	tests/test_han.py tests/test_sail.py tests/test_prss.py tests/test_guard.py tests/test_authors_dtype.py \
	tests/test_nemo_reference.py

test-cpus: $(MG) $(RANDOM_MODEL)  ## the test suite under each CPU capability this CPU has (default, avx2, avx512) in turn
	@for cap in $(CAPABILITIES); do echo "== ATEN_CPU_CAPABILITY=$$cap"; \
		ATEN_CPU_CAPABILITY=$$cap $(PYTEST) || exit 1; done

test-numerics: $(MG) $(RANDOM_MODEL)  ## the numerics-heavy test files under ATEN_CPU_CAPABILITY=default (CI's second pass)
	ATEN_CPU_CAPABILITY=default $(PYTEST) $(NUMERIC_TESTS)

smoke: $(MG) $(RANDOM_MODEL)  ## every guidance schedule on the random demo model, 4 steps (debug settings)
	$(MG) run -m experiment=schedules debug=default scenario=random_tiny

tables: $(MG)  ## collect outputs/runs into outputs/tables (paper Tables 1-5 and the tiny table)
	$(MG) tables

# `memguard fetch` is the one step that uses the network (the hub client too: HF_HUB_OFFLINE=0 for it alone); it
# fetches only what `memguard check` would report missing, so a second `make tableN` fetches nothing.
FETCH := HF_HUB_OFFLINE=0 $(MG) fetch
# the scenarios whose checkpoints were never published (Tables 2 and 5): fetch SD 2.1 and the data, then `memguard
# finetune` makes the checkpoint (once: skipped where its folder exists; an interrupted fine-tune resumes from its
# checkpoint). Table 1 runs on the fine-tune its authors published (fetched); Table 3 on Wen et al.'s (assembled).
FINETUNE_STEPS_2 ?= 40000
FINETUNE_STEPS_5 ?= 100000
FINETUNED_2 = imagenette/model-step-$(FINETUNE_STEPS_2)
FINETUNED_5 = laion100k/model-step-$(FINETUNE_STEPS_5)
OUTPUT_DIR ?= outputs
MODEL_ARG = $(if $(FINETUNED_$*),model.path=$(OUTPUT_DIR)/finetune/$(FINETUNED_$*))
# overrides for every memguard command of a table: ARGS for all five, ARGS_1 ... ARGS_5 for one (a mirror's
# sources.<input>.url, paths.*, a smoke test's sampler.steps=2 images_per_prompt=1)
ARGS ?=
# the rows to run, where not all of a table's (its experiment's sweep): ROWS=none,stp for every table, ROWS_1 ...
# ROWS_5 for one (a smoke test; the tables then hold those rows only)
# the tables `make fetch` and `make reproduce` cover: all five, or TABLES="3 4" for some
TABLES ?= 1 2 3 4 5
ROWS_ARG = $(if $(or $(ROWS_$*),$(ROWS)),mitigation=$(or $(ROWS_$*),$(ROWS)))

fetch: $(MG)  ## fetch every input of all five tables (what is missing only; HF_HUB_OFFLINE=0 for this step)
	@status=0; for n in $(TABLES); do $(MAKE) --no-print-directory fetch-table$$n || status=2; done; exit $$status

fetch-table%: $(MG)
	$(FETCH) experiment=table$* $(ARGS) $(ARGS_$*)

table1 table2 table3 table4 table5: table%: grid-table%  ## one paper table: fetch its inputs, (fine-tune,) run its grid (GPU), evaluate, tabulate
	$(MG) tables --output-dir $(OUTPUT_DIR)

grid-table%: $(MG)
	$(FETCH) experiment=table$* $(MODEL_ARG) $(ARGS) $(ARGS_$*)
	$(if $(FINETUNED_$*),test -d $(OUTPUT_DIR)/finetune/$(FINETUNED_$*) || $(MG) finetune experiment=table$* finetune.settings.steps=$(FINETUNE_STEPS_$*) $(ARGS) $(ARGS_$*))
	$(MG) run -m experiment=table$* $(MODEL_ARG) $(ROWS_ARG) $(ARGS) $(ARGS_$*)

reproduce: $(addprefix grid-table,$(TABLES))  ## all five paper tables (tabulated once, after the last grid)
	$(MG) tables --output-dir $(OUTPUT_DIR)

tiny-table: $(MG)  ## every schedule and baseline on the embedded tiny model (CPU), tabulated
	$(MG) run -m experiment=tiny_grid
	$(MG) tables

TAUS := 900,800,700,600,500,400,300,200,100
tiny-report: tiny-table  ## the tiny grid, transition sweep, docs/tiny figures and docs/tiny.md's report
	$(MG) run -m scenario=tiny mitigation=stp mitigation.schedule.tau=$(TAUS) images_per_prompt=16
	$(MG) tables
	$(PY) scripts/docs/tiny_report.py

tiny-model: $(MG)  ## retrain the tiny model from nothing into outputs/train/tiny (about 20 min on 2 cores)
	$(MG) train scenario=tiny

tiny-ft-model: $(MG)  ## the two-stage tiny model: pre-train (train=pretrain), then fine-tune (train=finetune) into outputs/train/
	$(MG) train scenario=tiny_ft train=pretrain
	$(MG) train scenario=tiny_ft train=finetune

tiny2-table: $(MG)  ## the shipped tiny2 under CFG, STP, DTP, OG+DTP, auto (its shipped calibration) and the newer methods, tabulated
	$(MG) run -m experiment=tiny2_grid
	$(MG) run scenario=tiny2 mitigation=auto
	$(MG) run scenario=tiny2 mitigation=auto mitigation.schedule.inner.opposite=0 run_name=tiny2/auto_dtp
	$(MG) tables

# scripts/: bench/ (benchmarks, side by side in one run), docs/ (the mkdocs hook, the tiny report and figures),
# probes/ (measurement protocols of the tiny models; run by hand with their arguments: scripts/README.md)
bench: $(MG)  ## sampling throughput: schedules vs standard CFG, memguard vs StableDiffusionPipeline
	$(PY) scripts/bench/sampling.py

bench-shards: $(MG)  ## memguard run as one process vs two shards (accelerate), the tiny scenario
	$(PY) scripts/bench/shards.py

bench-fetch: $(MG)  ## memguard fetch on a 200-image URL list (local server, 50 ms a request) vs one URL at a time
	$(PY) scripts/bench/fetch.py

bench-similarity: $(MG)  ## copy similarity and FID of 10k generations against 10k references from caches
	$(PY) scripts/bench/similarity.py

# the documentation site (mkdocs.yml; docs/*.md, the configuration reference generated from conf/ at each build)
docs: $(MG)  ## build the documentation site into site/ (strict: a broken link fails); open site/index.html
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: $(MG)  ## serve the documentation on http://127.0.0.1:8000, rebuilt as docs/ or conf/ change
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

clean:  ## remove the virtual environment, the random demo model and the built site (keeps outputs/)
	rm -rf $(VENV) $(RANDOM_MODEL) site
