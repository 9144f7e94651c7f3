# compress-run: `make demo` installs everything and runs the default job; `make test` installs and runs
# the fast tests. Both work on a fresh machine (Debian, Python 3.11, root for apt-get).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST := $(VENV)/bin/pytest
FMNIST := /usr/share/datasets/fashion-mnist
# the bounded set of slow tests that CI runs after the fast suite (each a few minutes on 2 cores)
CI_SLOW_TESTS := tests/pipeline/test_resume.py \
                 tests/pipeline/test_ddp.py::test_two_gloo_ranks_catch_a_method_that_prunes_from_rank_local_data \
                 'tests/pipeline/test_ddp.py::test_ddp_cpu_run_keeps_the_compression_state_identical_across_ranks[gap]' \
                 'tests/pipeline/test_ddp.py::test_ddp_cpu_run_keeps_the_compression_state_identical_across_ranks[chex]' \
                 'tests/pipeline/test_ddp.py::test_ddp_cpu_run_keeps_the_compression_state_identical_across_ranks[elrt]' \
                 tests/pipeline/test_accuracy.py::test_digits_magnitude_90_percent \
                 tests/pipeline/test_accuracy.py::test_digits_rigl_90_percent_from_scratch \
                 tests/pipeline/test_accuracy.py::test_digits_gap_90_percent_from_scratch \
                 tests/pipeline/test_accuracy.py::test_digits_mest_90_percent_from_scratch \
                 tests/pipeline/test_accuracy.py::test_digits_chex_half_the_macs_from_scratch \
                 tests/pipeline/test_accuracy.py::test_digits_lowrank_at_half_the_macs \
                 tests/pipeline/test_tables.py::test_gap_imagenet_table_at_smoke_scale \
                 tests/pipeline/test_tables.py::test_chex_imagenet_table_at_smoke_scale \
                 tests/pipeline/test_tables.py::test_rows_are_reused_and_a_killed_table_completes_only_missing_rows \
                 tests/pipeline/test_pgap_jobs.py tests/test_wheel.py \
                 tests/hardware/test_calibrate.py::test_tiny_calibration_writes_a_valid_profile \
                 tests/core/test_projections.py::test_gather_scatter_on_every_layer_of_every_zoo_model \
                 tests/methods/test_multilevel.py::test_pipeline_reports_every_level_and_picks_one \
                 tests/methods/test_dynamic_patterns.py \
                 tests/pipeline/test_sweeps.py::test_methods_by_sparsity_sweep_writes_six_rows \
                 tests/pipeline/test_tables.py::test_level_rows_read_one_multilevel_run \
                 tests/pipeline/test_tables.py::test_a_table_is_rebuilt_from_its_records_alone_and_runs_only_what_has_none \
                 tests/pipeline/test_tables.py::test_seeded_rows_run_once_per_seed_and_leave_records \
                 tests/pipeline/test_tables.py::test_rows_share_a_train_stage_through_train_from \
                 tests/pipeline/test_tables.py::test_rows_run_in_parallel_and_a_rerun_reuses_the_finished_ones \
                 tests/pipeline/test_fault_matrix.py tests/pipeline/test_faults.py \
                 tests/pipeline/test_sweeps.py::test_fifty_job_parallel_sweep_completes_and_leaves_no_process \
                 tests/models/test_any_model.py \
                 tests/pipeline/test_sweeps.py::test_a_failing_job_is_recorded_and_the_sweep_goes_on \
                 tests/hardware/test_calibrate.py::test_sparse_only_refit_rewrites_sparse_formats_and_keeps_the_rest \
                 tests/pipeline/test_pipeline.py::test_wandb_logger_offline_no_network \
                 tests/methods/test_lpvit.py::test_pipeline_prunes_the_small_vit_to_its_mac_target \
                 tests/methods/test_ptq.py::test_quantize_stage_runs_after_any_method_and_resumes \
                 tests/methods/test_qat.py::test_quantize_stage_trains_keeps_masks_and_prices_int4 \
                 tests/pipeline/test_tables.py::test_quantized_rows_take_over_their_base_rows_trained_network
# every method key flipped in a real run (a dead knob fails it): the slow set's other half, on both cores
CI_KNOB_TESTS := tests/methods/test_config_keys.py

.PHONY: install data demo test test-slow test-ci-slow calibrate bench-sparse bench-latency bench-compaction results lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[dev]"
	touch $@

data:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }

demo: install data
	$(VENV)/bin/compress-run

test: install data
	$(PYTEST) -m "not slow" -n 2 -q --durations=15

test-ci-slow: install data
	$(PYTEST) -m slow -q -n 2 --durations=15 $(CI_SLOW_TESTS) $(CI_KNOB_TESTS)

test-slow: install data
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

# RESULTS.md from the committed small-scale tables in docs/tables (publish one with
# `$(PY) scripts/make_results.py --publish <table dir>`).
results: install
	$(PY) scripts/make_results.py

lint: install
	$(VENV)/bin/ruff check src tests hydra_plugins $(wildcard scripts)
	$(VENV)/bin/lint-imports

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
