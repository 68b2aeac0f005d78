import os
from pathlib import Path

import pytest

from experiments import assets

# Tests compare float32 numbers; keep XLA from using bfloat16 passes anywhere.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The local GLUE root (``experiments.assets.glue_dir``); the data tests read RTE from it."""
    path = assets.glue_dir()
    if path is None:
        raise FileNotFoundError(f"no local GLUE copy: set ${assets.GLUE_DIR_ENV} to a GLUE-style root")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The packaged MiniLM (``experiments.assets.minilm_path``); tests that need it skip without it."""
    try:
        return assets.minilm_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


# Tests that took 6 s or more each in the default run on this 2-core machine (pytest's durations, summed over
# setup, call and teardown): left out of the default run, as if marked slow; CI runs them with the slow tests.
SLOW_HERE = frozenset(
    {
        "tests/test_cli.py::test_bad_input_is_one_line_with_exit_2",
        "tests/test_cli.py::test_generate",
        "tests/test_cli.py::test_merge_writes_a_model_that_reloads_exactly[tiny_gpt2]",
        "tests/test_cli.py::test_merge_writes_a_model_that_reloads_exactly[tiny_llama]",
        "tests/test_cli.py::test_peft_export_import_round_trip",
        "tests/test_cli.py::test_train_headerless_named_labels_then_merge",
        "tests/test_cli.py::test_train_resumes_and_refuses_other_arguments",
        "tests/test_core.py::test_linen_model_end_to_end",
        "tests/test_core.py::test_plain_function_end_to_end",
        "tests/test_experiments.py::test_bench_train_workload_without_dropout_ignores_the_key[gpt2-small]",
        "tests/test_experiments.py::test_bench_train_workload_without_dropout_ignores_the_key[minilm]",
        "tests/test_experiments.py::test_finetune_minilm_smoke",
        "tests/test_experiments.py::test_glue_budget_smoke",
        "tests/test_experiments.py::test_quickstart_smoke",
        "tests/test_experiments.py::test_subspace_deltas_read_lora_and_full_fine_tuning_files",
        "tests/test_factored.py::test_dropout_only_with_an_rng",
        "tests/test_factored.py::test_fused_attention_kernels_take_the_low_rank_path",
        "tests/test_factored.py::test_outputs_and_gradients_match_combine",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_bert_cls-qkvo-scanned]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_bert_cls-qkvo-unrolled]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_gpt2-all-linear-scanned]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_gpt2-all-linear-unrolled]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_llama-all-linear-scanned]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_llama-all-linear-unrolled]",
        "tests/test_models_layout.py::test_generation_with_unmerged_adapters_equals_the_merged_model[tiny_gpt2-scanned]",
        "tests/test_models_layout.py::test_generation_with_unmerged_adapters_equals_the_merged_model[tiny_llama-scanned]",
        "tests/test_models_layout.py::test_remat_policies_change_memory_not_numbers[tiny_bert_cls-False-nothing_saveable]",
        "tests/test_models_registry.py::test_fourth_family_loads_with_its_own_key_map",
        "tests/test_multiprocess.py::test_two_processes_match_one",
        "tests/test_properties.py::test_combine_merge_match_reference_and_unmerge_inverts",
        "tests/test_readme.py::test_readme_first_sample_runs",
        "tests/test_recipes.py::test_nnx_recipe_trains_the_scanned_kernels",
        "tests/test_serve.py::test_kv_cache_generation_with_an_adapter_per_row[gpt2]",
        "tests/test_serve.py::test_kv_cache_generation_with_an_adapter_per_row[llama-scanned]",
        "tests/test_slices.py::test_merge_equals_separate_adapters_per_slice_and_leaves_the_rest_exactly",
        "tests/test_train.py::test_causal_lm_on_the_bundled_decoders[tiny_gpt2]",
        "tests/test_train.py::test_classification_on_tiny_bert",
        "tests/test_train.py::test_fit_reduces_loss_and_logs[False]",
        "tests/test_train.py::test_fit_reduces_loss_and_logs[True]",
        "tests/test_train.py::test_killed_run_resumes_to_the_same_parameters",
    }
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in SLOW_HERE:
            item.add_marker(pytest.mark.slow)
