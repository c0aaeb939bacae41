"""Shared test set-up: quiet TensorFlow; the shared helpers importable.

The tests mirror the package (tests/mechanism/ for tan_keras/mechanism/...);
the modules they share (`_helpers`, the subprocess workers) stay here, at
the top, importable from every folder.
"""

import gc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import pytest  # noqa: E402


def _forget_what_the_process_remembers():
    """Forgets the weight values and data the package remembers per process.

    The package remembers which weight values private training left
    (`ledger.remember`) and which data it saw; tests build the same seeded
    models and would otherwise take each other's ledgers.
    """
    from tan_keras.keras_dp import ledger
    from tan_keras.mechanism import data_copies

    ledger._REMEMBERED.clear()
    ledger._LOADED.clear()
    data_copies.forget()


@pytest.fixture(autouse=True)
def _forget_remembered_weights():
    """Each test starts, and leaves, with no weight values remembered.

    Forgotten at the end too: pytest builds a module-scoped fixture before
    any function-scoped one, so a private model built by a module fixture
    took the ledger of whatever test the worker ran just before (a CI
    failure of raw_checkpoint_reads_test that depended on xdist's order).
    """
    _forget_what_the_process_remembers()
    # What earlier tests left alive (TensorFlow's and Keras's objects grow
    # to millions in a worker) is moved out of the collector's reach: each
    # full collection then scans this test's objects only, not the whole
    # worker's history (which made late tests several times slower). The
    # garbage of the last test is collected first, so nothing of it stays.
    gc.collect()
    gc.freeze()
    yield
    _forget_what_the_process_remembers()


# The slowest end-to-end runs (about a minute each on 2 cores), left out of
# the default run to keep the suite within CI's 20 minutes on 2 cores; every
# property they check is also checked by a faster test (in brackets). Run
# them with TAN_KERAS_SLOW_TESTS=1.
SLOW_TESTS = {
    # [the power checks of the same look-up at a later batch, of the Poisson stop at a
    # batch, of the budget stop with Poisson sampling]
    "tests/keras_dp/warm_start_recall_test.py::test_a_warm_start_mid_fit_counts_the_source_updates[on_train_batch_begin-0-True]",
    "tests/keras_dp/warm_start_recall_test.py::test_a_poisson_warm_start_after_the_pipeline_drew_ahead_stops_the_fit[on_epoch_begin-1-4-True]",
    "tests/keras_dp/warm_start_recall_test.py::test_the_budget_stop_sees_the_merged_count[shuffled-True]",
    # [the power checks of the private and plain-copy routes]
    "tests/keras_dp/export_ledger_test.py::test_every_export_route_carries_the_ledger[wrapped-True]",
    "tests/keras_dp/export_ledger_test.py::test_every_export_route_carries_the_ledger[archive-True]",
    # [array_inputs_test's count of noise draws per padded logical step; the noise std tests]
    "tests/keras_dp/dp_model_test.py::test_noise_is_added_once_per_logical_step_with_accumulation",
    # [the same equality without XLA; ghost_test's XLA-and-chunks case]
    "tests/mechanism/chunking_test.py::test_dp_model_with_chunks_matches_one_pass[True]",
    # [the vectorized route's audit; the injected faults]
    "tests/keras_dp/audit_test.py::test_audit_lower_bound_stays_below_the_claimed_epsilon[ghost]",
    # [the power check of the same look-up at on_epoch_begin]
    "tests/keras_dp/review_round6_ledger_test.py::test_weights_set_when_training_starts_bring_their_ledger[on_train_begin-True]",
    # [the other non-finite inputs and routes]
    "tests/keras_dp/nonfinite_test.py::test_nonfinite_input_is_zeroed_counted_and_the_step_taken[-inf-3-2-True-layerwise]",
    # [the other kinds at 3 x 4 views; small_cnn at 5 x 1]
    "tests/mechanism/ghost_test.py::test_ghost_norms_bound_the_formed_ones_and_clip_alike[3-4-small_cnn]",
    # [the same equality with 2 replicas]
    "tests/keras_dp/distributed_test.py::test_adam_equals_the_run_without_a_strategy[1]",
    # [the same equality with 2 micro-batches]
    "tests/keras_dp/dp_model_test.py::test_gradient_accumulation_gives_the_same_update[4]",
    # [the power checks of the augmenter function and the Lambda layer: the same walk]
    "tests/keras_dp/review_round3_test.py::test_adapted_state_reached_through_a_function_is_refused[loss-True]",
    # [test_two_workers_equal_the_single_device_run_without_noise]
    "tests/keras_dp/multiworker_test.py::test_two_workers_train_imagenet_format_data_like_one_device",
    # [the device check's functions, tests/mechanism, tests/keras_dp/audit_test]
    "tests/benchmark_test.py::test_device_check_runs_in_smoke_mode_and_its_checks_pass",
    # [the other injected faults; clipping in clipping_test, ghost_test]
    "tests/keras_dp/audit_test.py::test_power_check_audit_catches_injected_fault[clipping_off]",
    # [tests/analysis/scaling_test.py]
    "tests/experiments_test.py::test_ranking_quick",
    "tests/experiments_test.py::test_batch_scaling_quick",
    # [the other search_test and tuning_split_test cases]
    "tests/training/search_test.py::test_search_on_digits_end_to_end_then_cli_skips_finished_runs",
    "tests/training/tuning_split_test.py::test_search_on_a_tuning_split_then_final_run_on_the_private_set",
    # [checkpointing_test, the other train_resume_test cases]
    "tests/training/train_resume_test.py::test_killed_run_resumes_to_the_uninterrupted_result",
    # [train_test's runs of the program; flags_test's parsing of every flagfile]
    "tests/training/flags_test.py::test_flagfile_trains_two_steps[cifar10_wrn16_4.cfg-extra0]",
    # [test_weight_penalty_gradient_is_applied_once]
    "tests/keras_dp/distributed_test.py::test_power_check_penalty_added_on_every_replica_is_caught",
    # [readme_test's Keras-project example; the text models of string_inputs_test]
    "tests/readme_test.py::test_text_example_runs_and_learns_word_order_privately",
    # [the other attacks of the same power check]
    "tests/keras_dp/step_identity_test.py::test_power_check_without_the_identity_check_the_attack_trains[regroup]",
    # [multiworker_test's two workers equal to one device; the same_seed power check]
    "tests/keras_dp/distributed_test.py::test_weights_equal_the_single_device_run_without_noise[2]",
    "tests/keras_dp/distributed_test.py::test_power_check_broken_replica_noise_fails_the_std_test[2-full_noise]",
    # [dp_model_test's noise std on the default (ghost) route; the vectorized
    # route's audit statistics: the noise is drawn after the clipped sum, the same on every route]
    "tests/keras_dp/audit_test.py::test_measured_noise_std_is_sigma_c_over_b[ghost]",
    "tests/keras_dp/audit_test.py::test_consecutive_steps_draw_independent_noise[ghost]",
    # [every XLA fit of the suite trains through the sealed pipeline: dp_model_test's
    # jit_compile tests, the XLA routes of labels_test and id_inputs_test]
    "tests/keras_dp/review_round3_test.py::test_training_through_the_sealed_pipeline_is_unchanged_with_xla",
    # [the same without XLA; non-finite rows under XLA in nonfinite_test's nan-3-2-True case]
    "tests/keras_dp/nonfinite_test.py::test_nonfinite_padding_is_neither_used_nor_counted[True]",
    # [the same power check without XLA; the XLA drop of invalid ids on the layerwise route]
    "tests/keras_dp/id_inputs_test.py::test_power_check_without_the_check_the_step_fails[True]",
    # [the other injected faults; the other routes' audit]
    "tests/keras_dp/audit_test.py::test_power_check_audit_catches_injected_fault[noise_x1e-3]",
    "tests/keras_dp/audit_test.py::test_audit_lower_bound_stays_below_the_claimed_epsilon[layerwise]",
    # [the other cancelling examples]
    "tests/mechanism/ghost_test.py::test_a_cancelling_example_moves_the_dp_update_by_at_most_lr_c_over_b[two_cancelling_views]",
    # [the same properties at another setting or on another route]
    "tests/keras_dp/dp_model_test.py::test_gradient_accumulation_gives_the_same_update[2]",
    "tests/keras_dp/step_identity_test.py::test_nothing_is_released_from_the_violation_on[True]",
    "tests/mechanism/ghost_test.py::test_a_cancelling_example_moves_the_dp_update_by_at_most_lr_c_over_b[dense_then_pooling]",
    "tests/keras_dp/audit_test.py::test_power_check_audit_catches_injected_fault[noise_reused_every_step]",
    "tests/keras_dp/id_inputs_test.py::test_invalid_ids_of_an_input_are_dropped_and_counted[chunked-True]",
    "tests/keras_dp/nonfinite_test.py::test_finite_input_with_nonfinite_gradient_is_zeroed[auto-True]",
    # [benchmark_test's dp_step benchmark; imagenet_input_test]
    "tests/benchmark_test.py::test_embedding_ghost_benchmark_prints_ratios_against_the_vectorized_step",
    "tests/benchmark_test.py::test_imagenet_input_benchmark_prints_views_per_core",
    # [the garbled index and foreign checkpoint refusals]
    "tests/training/train_resume_test.py::test_corrupted_checkpoint_is_refused",
    # [the same equality with 2 views, and on the ghost route with 1 and 2]
    "tests/keras_dp/string_inputs_test.py::test_a_step_on_texts_equals_the_step_on_their_token_ids[vectorized-1]",
    # [layerwise_test's test_dp_model_updates_agree_between_clipping_modes]
    "tests/mechanism/ghost_test.py::test_dp_model_ghost_agrees_with_vectorized",
    # [test_two_workers_equal_the_single_device_run_without_noise; train_test's runs]
    "tests/keras_dp/multiworker_test.py::test_training_program_runs_on_two_workers",
    # [first_day_test's frozen and fine-tuned BatchNormalization; its line count;
    # examples/measure.py's full run] (MobileNetV2's per-example step takes a minute to build)
    "tests/examples/examples_test.py::test_the_private_port_runs_at_epsilon_8[transfer_learning-kwargs3]",
    # [the same drop on every route without XLA, and on layerwise with XLA]
    "tests/keras_dp/labels_test.py::test_an_out_of_range_label_is_dropped_and_counted[ghost-True]",
    "tests/keras_dp/labels_test.py::test_an_out_of_range_label_is_dropped_and_counted[vectorized-True]",
    "tests/keras_dp/id_inputs_test.py::test_invalid_ids_of_an_input_are_dropped_and_counted[ghost-True]",
    "tests/keras_dp/id_inputs_test.py::test_invalid_ids_of_an_input_are_dropped_and_counted[vectorized-True]",
    # [each kind of earlier layer on another route; XLA in the test above]
    "tests/keras_dp/id_inputs_test.py::test_invalid_ids_computed_by_earlier_layers_are_dropped[lambda-ghost-True]",
    "tests/keras_dp/id_inputs_test.py::test_invalid_ids_computed_by_earlier_layers_are_dropped[ops-vectorized-True]",
    # [the other non-finite inputs, routes and XLA on vectorized]
    "tests/keras_dp/nonfinite_test.py::test_nonfinite_input_is_zeroed_counted_and_the_step_taken[-inf-1-1-True-ghost]",
    # [the same refusal at 128/8 with XLA and at 64/16 without]
    "tests/keras_dp/fit_inputs_test.py::test_a_poisson_pipeline_for_another_sampling_rate_is_refused[64-16-True]",
    # [the power check of the clone_model copy: the same look-up]
    "tests/keras_dp/ledger_binding_test.py::test_weights_copied_as_arrays_bring_their_ledger[plain_model-True]",
    "tests/keras_dp/ledger_binding_test.py::test_weights_copied_as_arrays_bring_their_ledger[set_after_make_private-True]",
    # [the power check of the same weights: the same look-up]
    "tests/keras_dp/unchecked_sampling_ledger_test.py::test_the_copy_keeps_the_unchecked_updates[_copy_by_set_weights-True]",
    "tests/keras_dp/unchecked_sampling_ledger_test.py::test_the_copy_keeps_the_unchecked_updates[_copy_by_weights_file-True]",
    # [the power check of the TensorFlow checkpoint: the same look-up]
    "tests/keras_dp/review_round6_ledger_test.py::test_values_loaded_from_a_file_then_copied_as_arrays_are_recognised[weights-True]",
    "tests/keras_dp/review_round6_ledger_test.py::test_values_loaded_from_a_file_then_copied_as_arrays_are_recognised[keras-True]",
    "tests/keras_dp/review_round6_ledger_test.py::test_values_loaded_from_a_file_then_copied_as_arrays_are_recognised[dp_checkpoint-True]",
    # [chunks of 1, 4 and 7 on every route]
    "tests/mechanism/chunking_test.py::test_chunks_equal_the_whole_micro_batch[3-ghost]",
    "tests/mechanism/chunking_test.py::test_chunks_equal_the_whole_micro_batch[3-vectorized]",
    # [the ghost and vectorized routes' audits; layerwise_test's equality with formed gradients]
    "tests/keras_dp/audit_test.py::test_canary_is_clipped_to_exactly_c_along_the_known_direction[layerwise]",
    "tests/keras_dp/audit_test.py::test_measured_noise_std_is_sigma_c_over_b[layerwise]",
    "tests/keras_dp/audit_test.py::test_consecutive_steps_draw_independent_noise[layerwise]",
    # [the same model with oneDNN on, where the vectorized map would abort]
    "tests/keras_dp/model_structure_test.py::test_attention_trains_where_onednn_would_abort_the_vectorized_map[0-False]",
    # [benchmark_test's dp_step benchmark: the same script helpers]
    "tests/benchmark_test.py::test_per_example_ops_benchmark_prints_ratios_against_each_baseline",
    # [the embedding case of the same test; chunking_test's XLA equality]
    "tests/mechanism/ghost_test.py::test_under_xla_and_in_chunks[small_cnn]",
    # [the lambda and ops cases of the same refusal]
    "tests/keras_dp/model_checks_test.py::test_batched_pass_mixing_examples_breaks_sensitivity_and_is_refused[custom]",
    # [the augmult case of the same real process; train_program_test's augment refusal]
    "tests/training/train_test.py::test_real_process_exits_2_with_one_line[flags1-`augment`]",
    # [the other non-finite inputs, views and routes]
    "tests/keras_dp/nonfinite_test.py::test_nonfinite_input_is_zeroed_counted_and_the_step_taken[nan-3-2-True-vectorized]",
    # [the weights_h5 power check: the same hook on the editor's one read path]
    "tests/keras_dp/review6_file_readers_test.py::test_arrays_read_with_the_file_editor_keep_the_ledger[keras-True]",
    "tests/keras_dp/review6_file_readers_test.py::test_arrays_read_with_the_file_editor_keep_the_ledger[plain_copy-True]",
    # [the weights_file power check: the same look-up]
    "tests/keras_dp/review_round3_test.py::test_a_feature_extractor_saved_as_a_plain_model_brings_the_ledger[keras_file-True]",
    "tests/keras_dp/review_round3_test.py::test_a_feature_extractor_saved_as_a_plain_model_brings_the_ledger[tf_checkpoint-True]",
    # [2 views on the vectorized route; the ghost route with 1 view]
    "tests/keras_dp/string_inputs_test.py::test_a_step_on_texts_equals_the_step_on_their_token_ids[ghost-2]",
    # [chunks of 4 and 7 on the ghost route; chunks of 1 on the other routes]
    "tests/mechanism/chunking_test.py::test_chunks_equal_the_whole_micro_batch[1-ghost]",
    # [review6_error_messages_test: TensorFlow's own log forms withheld, and
    # every error of a private step end to end]
    "tests/keras_dp/review_round24_test.py::test_tensorflow_s_own_log_of_a_failing_kernel_withholds_the_labels",
    # [test_tied_kernels_are_found_and_never_ghosted; the JAX suite's tied tables]
    "tests/keras_dp/model_checks_test.py::test_tied_weights_ghost_and_auto_equal_vectorized_and_layerwise_is_refused",
    # [the padded case: the same exact resume over more micro-batches a step]
    "tests/keras_dp/checkpointing_test.py::test_resume_continues_exactly_where_it_stopped[19]",
}


def pytest_configure(config):
    # `-n 2` hands out tests one by one ("load"); the tests of one file
    # share runs cached in the worker process (distributed_test's subprocess
    # runs, audit_test's statistics, module-level models), which "loadfile"
    # makes once instead of once per worker.
    if getattr(config.option, "dist", "no") == "load":
        config.option.dist = "loadfile"
    # Files are handed out in collection order (see FIRST_FILES), not by
    # their number of tests.
    config.option.loadscopereorder = False


# The files that take longest (40 s to 2.5 min of one core each), longest
# first: handed out first, so the two workers end together instead of one
# finishing a long file alone at the end (about 40 s of the suite's time).
FIRST_FILES = (
    "tests/keras_dp/distributed_test.py",
    "tests/keras_dp/ledger_binding_test.py",
    "tests/keras_dp/review_round6_ledger_test.py",
    "tests/mechanism/ghost_test.py",
    "tests/keras_dp/id_inputs_test.py",
    "tests/keras_dp/review_round3_test.py",
    "tests/keras_dp/warm_start_recall_test.py",
    "tests/keras_dp/checkpointing_test.py",
    "tests/keras_dp/multiworker_test.py",
    "tests/keras_dp/nonfinite_test.py",
    "tests/keras_dp/model_checks_test.py",
    "tests/keras_dp/dp_model_test.py",
    "tests/examples/examples_test.py",
    "tests/keras_dp/audit_test.py",
    "tests/mechanism/chunking_test.py",
    "tests/jax_backend_test.py",
    "tests/keras_dp/step_identity_test.py",
    "tests/keras_dp/sampling_stream_test.py",
    "tests/keras3_test.py",
    "tests/keras_dp/review_round3b_ledger_test.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
    if os.environ.get("TAN_KERAS_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow end-to-end run: set TAN_KERAS_SLOW_TESTS=1")
    for item in items:
        if item.nodeid in SLOW_TESTS:
            item.add_marker(skip)
