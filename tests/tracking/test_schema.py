"""The trial param encoding: what a trial logs reads back as exactly its sampled hyperparameters, typed."""

import pytest

from qstudy.tracking.schema import decode_param, encode_param, searched_params, trial_params


def test_the_searched_params_are_the_sampled_ones_whatever_their_names():
    hyper = {"adapter.rank": 8, "adapter.insertion_layers": [1, 3], "adapter.gating": "tanh", "lr": 1e-3,
             "frozen_tower": True}
    logged = trial_params("lora", hyper, over_budget=True, workers=2, deepspeed=True, zero_stage=2)
    # MLflow keeps every param as text.
    assert searched_params({key: encode_param(value) for key, value in logged.items()}) == dict(sorted(hyper.items()))


def test_a_hyperparameter_named_like_a_run_param_is_refused():
    with pytest.raises(ValueError, match=r"\['workers'\]"):
        trial_params("lora", {"workers": 3}, over_budget=False, workers=1, deepspeed=False, zero_stage=0)


@pytest.mark.parametrize(
    ("text", "value"),
    [("8", 8), ("0.001", 0.001), ("1e-05", 1e-05), ("True", True), ("False", False), ("None", None),
     ("[2, 3]", [2, 3]), ("last:2", "last:2"), ("tanh", "tanh")],
)
def test_a_param_decodes_to_its_typed_value_and_encodes_back(text, value):
    assert decode_param(text) == value and type(decode_param(text)) is type(value)
    assert encode_param(value) == text


def test_the_caption_metrics_are_the_scorers_names():
    from qstudy.metrics.coco import METRIC_NAMES
    from qstudy.tracking.schema import CAPTION_METRICS, TEST_METRICS, TEST_PREFIX, VAL_PREFIX

    # val_<name> per epoch and test_<name> from `qstudy evaluate` both come from the scorer's names.
    assert CAPTION_METRICS == METRIC_NAMES
    assert TEST_METRICS == tuple(TEST_PREFIX + name for name in METRIC_NAMES) and TEST_PREFIX != VAL_PREFIX
