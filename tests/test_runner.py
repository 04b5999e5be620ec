"""ExperimentRunner on tiny models: outcome classes, losses, checks, fault models, and results
that do not depend on how many trials share a forward pass."""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch

from fxsdc import models
from fxsdc.bits import flip_value
from fxsdc.config import ExperimentConfig
from fxsdc.errors import UserError
from fxsdc.pipeline import instrument
from fxsdc.runner import (
    MASKED_REL_TOL,
    TIMING_KEYS,
    ExperimentResult,
    ExperimentRunner,
    classify_outcome,
    load_batches,
    load_model,
    output_difference,
    planned_ids,
    prepare,
    sample_losses,
)
from fxsdc.schema import OUTCOMES
from fxsdc.store import validate_record

CHECKS = ["bounds", "softmax", "abft"]


def tiny_config(**fields) -> ExperimentConfig:
    """A small, fast config: 2-layer random model, 4 x 16 tokens."""
    base = dict(model_name="gpt2", tiny=True, batch_size=4, seq_length=16, num_samples=4,
                num_runs=1, trials_per_pass=4, checks=CHECKS)
    return ExperimentConfig(**{**base, **fields})


@functools.lru_cache(maxsize=None)
def model_and_batches(model_name: str, num_samples: int = 4
                      ) -> tuple[models.LoadedModel, list]:
    cfg = tiny_config(model_name=model_name, num_samples=num_samples)
    model = load_model(cfg)
    return model, load_batches(cfg, model)


def comparable(result: ExperimentResult) -> dict:
    """A trial's row without what may differ between runs or configs of the same trial."""
    row = result.to_dict()
    extra = {k: v for k, v in json.loads(row.pop("extra")).items()
             if k not in TIMING_KEYS and k != "trials_in_pass"}
    for name in ("trial_id", "config_id", "exp_name", "elapsed_s"):
        row.pop(name)
    return {**row, "extra": extra}


def same_rows(a: list[ExperimentResult], b: list[ExperimentResult]) -> bool:
    """Equal rows, NaN equal to NaN (json writes both as NaN)."""
    key = lambda r: (r.batch_index, r.sample_index, -1 if r.run_index is None else r.run_index)
    return ([json.dumps(comparable(r), sort_keys=True) for r in sorted(a, key=key)]
            == [json.dumps(comparable(r), sort_keys=True) for r in sorted(b, key=key)])


# -- outcome classes on hand-made outputs ---------------------------------------------------
def test_outcome_classes_on_constructed_outputs() -> None:
    y = torch.tensor([[4.0, -2.0, 1.0], [0.5, 0.25, 0.0]], dtype=torch.float64)
    assert classify_outcome(y, y.clone()) == ("masked", 0.0)
    # Changes of 1e-3 of the largest |y| are the border: just below is masked, above an SDC.
    for factor, expected in ((0.999, "masked"), (1.001, "SDC")):
        changed = y.clone()
        changed[0, 1] += 4.0 * MASKED_REL_TOL * factor
        outcome, rel = classify_outcome(y, changed)
        assert outcome == expected and rel == pytest.approx(MASKED_REL_TOL * factor)
    big = y.clone()
    big[1, 2] = 0.01
    assert classify_outcome(y, big) == ("SDC", pytest.approx(0.01 / 4.0))
    for bad in (math.nan, math.inf, -math.inf):
        due = y.clone()
        due[1, 0] = bad
        outcome, rel = classify_outcome(y, due)
        assert outcome == "DUE" and rel == math.inf
    # A NaN the clean output already had is no new error.
    clean_nan = y.clone()
    clean_nan[0, 0] = math.nan
    assert classify_outcome(clean_nan, clean_nan.clone()) == ("masked", 0.0)
    # A zero output that changes is an infinitely large relative change.
    assert classify_outcome(torch.zeros(3), torch.tensor([0.0, 1e-30, 0.0])) == ("SDC", math.inf)


def test_output_difference_is_per_sample_over_every_output() -> None:
    clean = {"logits": torch.ones(3, 2, 4), "pooled": torch.full((3, 5), 10.0), "n": 3}
    injected = {"logits": clean["logits"].clone(), "pooled": clean["pooled"].clone(), "n": 3}
    injected["logits"][1, 0, 0] = 2.0  # sample 1: 1.0 against the largest |y| = 10
    injected["pooled"][2, 4] = math.nan  # sample 2: a new NaN
    rel, due = output_difference(clean, injected)
    assert rel.tolist() == [0.0, 0.1, math.inf] and due.tolist() == [False, False, True]


# -- losses ---------------------------------------------------------------------------------
def test_causal_lm_loss_matches_hugging_face_per_sample() -> None:
    model, batches = model_and_batches("gpt2")
    batch = batches[0]
    with torch.no_grad():
        out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        ours = sample_losses("causal-lm", {"logits": out.logits}, batch["input_ids"],
                             batch["attention_mask"])
        for s in range(2):
            hf = model.model(input_ids=batch["input_ids"][s:s + 1],
                             labels=batch["input_ids"][s:s + 1]).loss
            assert float(ours[s]) == pytest.approx(float(hf), rel=1e-5)


def test_masked_lm_loss_predicts_each_input_token_and_encoder_has_none() -> None:
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0  # padding is left out
    loss = sample_losses("masked-lm", {"logits": logits}, ids, mask)
    expected = [torch.nn.functional.cross_entropy(logits[b, :n], ids[b, :n]) for b, n in
                ((0, 5), (1, 3))]
    assert loss.tolist() == pytest.approx([float(e) for e in expected], rel=1e-6)
    assert sample_losses("encoder", {"last_hidden_state": logits}, ids, mask) is None


# -- end to end -----------------------------------------------------------------------------
def check_results(cfg: ExperimentConfig, results: list[ExperimentResult]) -> None:
    """Invariants of every run: one row per planned trial, valid records, clean rows clean."""
    sizes = [min(cfg.batch_size, cfg.num_samples - b) for b in range(0, cfg.num_samples,
                                                                       cfg.batch_size)]
    planned = [t for b, n in enumerate(sizes) for t in planned_ids(cfg, b, n)]
    assert sorted(r.trial_id for r in results) == sorted(planned)
    for r in results:
        validate_record(r.to_record())
        assert set(r.detected_by) == set(cfg.active_checks)
        assert r.outcome in OUTCOMES
    clean = [r for r in results if r.kind == "clean"]
    assert len(clean) == cfg.num_samples
    assert all(r.detected == 0 and r.outcome == "masked" for r in clean)  # no false alarm
    assert all(math.isfinite(r.clean_loss) for r in clean if r.clean_loss is not None)


def test_gpt2_end_to_end_with_every_check() -> None:
    cfg = tiny_config(injection_location="weights", num_samples=6, num_runs=2)
    model, batches = model_and_batches("gpt2", 6)
    results = ExperimentRunner(cfg).run_all(model, batches)
    check_results(cfg, results)  # 6 samples in batches of 4 and 2
    injected = [r for r in results if r.kind == "injected"]
    assert len(injected) == 12
    for r in injected:
        assert r.layer in (0, 1) and r.location == "weights" and r.bits == (30,)
        assert r.index[0] == r.sample_index  # one fault per batch element
        assert r.value_after == flip_value(r.value_before, [30], torch.float32)
        # Bit 30 of a softmax weight in [0, 1] makes it >= 2: the weights no longer sum to 1.
        assert r.detected_by["softmax"] == 1 and r.detected == 1
        assert r.clean_loss is not None and r.injected_loss is not None
    record = injected[0].to_record()
    assert record.model == "gpt2 (tiny)" and record.fault_model == "bitflip"
    assert json.loads(record.index) == list(injected[0].index)


def test_distilbert_end_to_end_q_faults_caught_by_projection_abft() -> None:
    cfg = tiny_config(model_name="distilbert-base-uncased", injection_location="q")
    model, batches = model_and_batches("distilbert-base-uncased")
    results = ExperimentRunner(cfg).run_all(model, batches)
    check_results(cfg, results)
    injected = [r for r in results if r.kind == "injected"]
    assert injected and all(r.clean_loss is not None for r in injected)  # masked-lm loss
    # q is consistent downstream of its projection: only the projection's ABFT can see it, and
    # an exponent flip to ~1e37 is far outside its rounding tolerance.
    assert all(r.detected_by["abft"] == 1 for r in injected)


def test_fixed_index_lands_in_every_sample() -> None:
    cfg = tiny_config(injection_idx=(0, 1, 2, 3), injection_layers=[1], checks=[])
    model, batches = model_and_batches("gpt2")
    injected = [r for r in ExperimentRunner(cfg).run_all(model, batches) if r.kind == "injected"]
    assert [r.index for r in injected] == [(s, 1, 2, 3) for s in range(4)]
    assert {r.layer for r in injected} == {1} and all(r.detected_by == {} for r in injected)


def test_baseline_reference_uses_clean_bounds_and_fills_the_faulted_row() -> None:
    cfg = tiny_config(reference="baseline", checks=["bounds", "softmax"],
                      injection_location="weights")
    model, batches = model_and_batches("gpt2")
    runner = ExperimentRunner(cfg)
    assert runner.host_checks == ["bounds"] and runner.online_checks == ["softmax"]
    results = runner.run_all(model, batches)
    check_results(cfg, results)
    for r in results:
        if r.kind == "clean":
            assert r.epsilon is None
            continue
        assert all(v is not None for v in (r.epsilon, r.lower, r.upper, r.margin))
        if math.isfinite(r.margin) and r.margin > 1e-6:  # far outside the clean bounds
            assert r.detected_by["bounds"] == 1


@pytest.mark.parametrize("fields", [
    dict(),  # random element, bit flip, online checks
    dict(fault_model="multibit", bits=[23, 30], injection_location="k", checks=["softmax"]),
    dict(fault_model="probabilistic", ber=0.01, injection_location="scores", checks=["bounds"]),
    dict(reference="baseline", injection_location="scores", injection_bit=29, checks=["bounds"]),
], ids=["bitflip", "multibit", "probabilistic", "baseline"])
def test_many_trials_per_pass_equal_one_trial_per_pass(fields: dict) -> None:
    model, batches = model_and_batches("gpt2")
    many = tiny_config(trials_per_pass=4, **fields)
    one = dataclasses.replace(many, trials_per_pass=1)
    harness = prepare(model, [many, one])  # as a sweep would: one graph for both
    results_many = ExperimentRunner(many).run_all(harness, batches)
    results_one = ExperimentRunner(one).run_all(harness, batches)
    assert {r.trials_in_pass for r in results_one if r.kind == "injected"} == {1}
    assert {r.trials_in_pass for r in results_many if r.kind == "injected"} == {4}
    assert same_rows(results_many, results_one)


def test_a_shared_harness_with_more_sites_gives_the_same_trials() -> None:
    """A sweep instruments once for the union of its configs; extra injection sites and checks
    must not change any trial."""
    model, batches = model_and_batches("gpt2")
    cfg = tiny_config(checks=["softmax"], injection_location="v")
    other = tiny_config(checks=["bounds", "abft"], injection_location="scores")
    shared = prepare(model, [cfg, other])
    assert len(shared.inst.sites) == 4 and shared.checks == sorted(CHECKS)
    assert same_rows(ExperimentRunner(cfg).run_all(shared, batches),
                     ExperimentRunner(cfg).run_all(model, batches))


def test_runs_on_a_model_instrumented_by_the_user() -> None:
    model, batches = model_and_batches("distilbert-base-uncased")
    inst = instrument(model.model, locations=["out"], checks=["abft"], slots=4)
    cfg = tiny_config(model_name="distilbert-base-uncased", injection_location="out",
                      checks=["abft"])
    results = ExperimentRunner(cfg).run_all(inst, batches)
    check_results(cfg, results)
    assert all(r.clean_loss is not None for r in results)  # masked-lm, from the traced class
    with pytest.raises(UserError, match="has no 'softmax' check"):
        ExperimentRunner(dataclasses.replace(cfg, checks=["softmax"])).run_all(inst, batches)


def test_q_at_o_checks_run_with_keys_copied_into_values() -> None:
    cfg = tiny_config(checks=["comb", "softmax"], injection_location="weights")
    model, batches = model_and_batches("gpt2")
    results = ExperimentRunner(cfg).run_all("gpt2", batches)
    clean = [r for r in results if r.kind == "clean"]
    injected = [r for r in results if r.kind == "injected"]
    assert clean and all(r.detected == 0 for r in clean)
    assert all(set(r.detected_by) == {"comb", "softmax"} for r in results)
    assert any(r.detected_by["comb"] for r in injected)


def test_run_single_runs_one_batch() -> None:
    cfg = tiny_config(num_runs=2, checks=["softmax"])
    model, batches = model_and_batches("gpt2")
    results = ExperimentRunner(cfg).run_single(model, batches[0], batch_index=3)
    assert sorted(r.trial_id for r in results) == sorted(planned_ids(cfg, 3, 4))


@pytest.mark.parametrize("fields,message", [
    (dict(injection_layers=[2]), "no instrumented site at layer 2"),
    (dict(injection_idx=(0, 0, 16, 0)), "outside the scores tensor"),
])
def test_config_errors_are_user_errors_before_any_pass(fields: dict, message: str) -> None:
    model, batches = model_and_batches("gpt2")
    with pytest.raises(UserError, match=message):
        ExperimentRunner(tiny_config(**fields)).run_all(model, batches)
