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


# Tests that took 4.5 s or more each in the default run on this 2-core machine (pytest's durations, summed over
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
        "tests/test_core.py::test_combined_tree_with_mask_trains_only_adapters",
        "tests/test_core.py::test_linen_model_end_to_end",
        "tests/test_core.py::test_nnx_model_end_to_end",
        "tests/test_core.py::test_plain_function_end_to_end",
        "tests/test_experiments.py::test_bench_train_decoder_workload_with_a_chunked_loss_is_the_same_loss",
        "tests/test_experiments.py::test_bench_train_workload_without_dropout_ignores_the_key[gpt2-small]",
        "tests/test_experiments.py::test_bench_train_workload_without_dropout_ignores_the_key[minilm]",
        "tests/test_experiments.py::test_finetune_minilm_smoke",
        "tests/test_experiments.py::test_glue_budget_smoke",
        "tests/test_experiments.py::test_houlsby_adapters_change_the_output",
        "tests/test_experiments.py::test_peak_rss_of_a_worker_is_its_own_not_its_parents",
        "tests/test_experiments.py::test_quickstart_smoke",
        "tests/test_experiments.py::test_subspace_deltas_read_lora_and_full_fine_tuning_files",
        "tests/test_factored.py::test_dropout_only_with_an_rng",
        "tests/test_factored.py::test_fused_attention_kernels_take_the_low_rank_path",
        "tests/test_factored.py::test_outputs_and_gradients_match_combine",
        "tests/test_factored.py::test_training_step_never_forms_a_kernel_shaped_value",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_bert_cls-qkvo-scanned]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_bert_cls-qkvo-unrolled]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_gpt2-all-linear-scanned]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_gpt2-all-linear-unrolled]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_llama-all-linear-scanned]",
        "tests/test_factored_models.py::test_factored_matches_combine[tiny_llama-all-linear-unrolled]",
        "tests/test_models_fused.py::test_factored_equals_combine_forward_and_gradients",
        "tests/test_models_fused.py::test_fused_model_loads_c_attn_whole_and_computes_the_same",
        "tests/test_models_fused.py::test_training_leaves_the_k_slice_exactly_at_the_base[True]",
        "tests/test_models_layout.py::test_bfloat16_stays_close_to_float32",
        "tests/test_models_layout.py::test_generation_with_unmerged_adapters_equals_the_merged_model[tiny_gpt2-scanned]",
        "tests/test_models_layout.py::test_generation_with_unmerged_adapters_equals_the_merged_model[tiny_gpt2-unrolled]",
        "tests/test_models_layout.py::test_generation_with_unmerged_adapters_equals_the_merged_model[tiny_llama-scanned]",
        "tests/test_models_layout.py::test_generation_with_unmerged_adapters_equals_the_merged_model[tiny_llama-unrolled]",
        "tests/test_models_layout.py::test_lora_through_a_scanned_decoder_matches_merge",
        "tests/test_models_layout.py::test_remat_policies_change_memory_not_numbers[tiny_bert_cls-False-nothing_saveable]",
        "tests/test_models_layout.py::test_sampling_uses_the_explicit_key",
        "tests/test_models_registry.py::test_fourth_family_loads_with_its_own_key_map",
        "tests/test_models_registry.py::test_fourth_family_presets_init_combine_merge",
        "tests/test_multiprocess.py::test_two_processes_match_one",
        "tests/test_peft_variants.py::test_dora_adapter_gives_peft_logits_and_merged_weights[tiny_bert_cls-folder0-6]",
        "tests/test_peft_variants.py::test_dora_adapter_gives_peft_logits_and_merged_weights[tiny_llama-folder1-6]",
        "tests/test_peft_variants.py::test_dora_adapter_loads_into_the_scanned_layout",
        "tests/test_peft_variants.py::test_pissa_residual_and_factors_match_peft",
        "tests/test_pissa.py::test_pissa_to_lora_merges_the_same_onto_the_original_base",
        "tests/test_prng.py::test_train_step_draws_the_same_dropout_masks",
        "tests/test_properties.py::test_combine_merge_match_reference_and_unmerge_inverts",
        "tests/test_quant.py::test_quantized_model_runs_close_to_the_full_precision_one",
        "tests/test_readme.py::test_readme_first_sample_runs",
        "tests/test_recipes.py::test_nnx_recipe_keeps_the_base_bit_for_bit",
        "tests/test_recipes.py::test_nnx_recipe_trains_the_scanned_kernels",
        "tests/test_serve.py::test_each_row_equals_its_own_merged_model[bert-cls-scanned]",
        "tests/test_serve.py::test_each_row_equals_its_own_merged_model[gpt2]",
        "tests/test_serve.py::test_each_row_equals_its_own_merged_model[llama-scanned]",
        "tests/test_serve.py::test_inputs_without_one_row_per_id_are_refused",
        "tests/test_serve.py::test_kv_cache_generation_with_an_adapter_per_row[gpt2]",
        "tests/test_serve.py::test_kv_cache_generation_with_an_adapter_per_row[llama-scanned]",
        "tests/test_serve.py::test_serving_needs_only_the_core",
        "tests/test_serve.py::test_swaps_within_capacity_do_not_retrace",
        "tests/test_slices.py::test_equals_separate_lora_on_split_projections",
        "tests/test_slices.py::test_merge_equals_separate_adapters_per_slice_and_leaves_the_rest_exactly",
        "tests/test_train.py::test_causal_lm_on_the_bundled_decoders[tiny_gpt2]",
        "tests/test_train.py::test_causal_lm_on_the_bundled_decoders[tiny_llama]",
        "tests/test_train.py::test_chunked_causal_lm_equals_the_whole_logits[tiny_gpt2]",
        "tests/test_train.py::test_chunked_causal_lm_equals_the_whole_logits[tiny_llama]",
        "tests/test_train.py::test_classification_on_tiny_bert",
        "tests/test_train.py::test_fit_reduces_loss_and_logs[False]",
        "tests/test_train.py::test_fit_reduces_loss_and_logs[True]",
        "tests/test_train.py::test_fit_starts_from_given_adapters_with_a_given_optimizer",
        "tests/test_train.py::test_fit_trains_on_a_quantized_base_as_on_its_dequantized_copy",
        "tests/test_train.py::test_killed_run_resumes_to_the_same_parameters",
        "tests/test_train.py::test_methods_on_one_footing",
        "tests/test_trust_runs.py::test_refused_resume_prints_one_error_and_no_orbax_noise[base]",
        "tests/test_trust_runs.py::test_refused_resume_prints_one_error_and_no_orbax_noise[damaged]",
        "tests/test_variants.py::test_dora_factored_equals_combine_in_value_and_gradient",
        "tests/test_variants.py::test_dora_on_a_bundled_model_through_the_preset",
    }
)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in SLOW_HERE:
            item.add_marker(pytest.mark.slow)
