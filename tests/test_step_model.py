"""The step-time model that real-time admission asks (engine/step_model.py), on a fake clock: it discards a
bucket's first sample, ignores outliers, ages measurements, stays monotone and never locks a batch size out."""

from __future__ import annotations

import pytest

from qwen_tts_megakernel.engine.step_model import FITS, HOLD, PROBE, StepModel

BUDGET = 0.064  # 0.8 x 80 ms


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def model_with(clock, samples: dict[int, list[float]], gap_s: float = 0.01, **kwargs) -> StepModel:
    model = StepModel(clock=clock, **kwargs)
    for batch, times in samples.items():
        for seconds in times:
            model.record(batch, seconds)
            clock.advance(gap_s)
    return model


def test_the_first_sample_at_a_batch_size_is_discarded():
    clock = FakeClock()
    model = model_with(clock, {1: [0.02] * 4, 2: [0.113, 0.03, 0.03, 0.03]})  # a slow first step at batch 2
    assert model.predict(2) == pytest.approx(0.03)
    assert model.verdict(2, BUDGET) == FITS


def test_a_sample_far_above_the_median_does_not_move_the_estimate():
    clock = FakeClock()
    model = model_with(clock, {1: [0.02, 0.02, 0.02, 0.02, 0.5, 0.02, 0.3, 0.02]})
    assert model.predict(1) == pytest.approx(0.02)


def test_a_batch_size_measured_too_slow_holds_then_ages_into_a_probe():
    clock = FakeClock()
    model = model_with(clock, {1: [0.02] * 4, 2: [0.1] * 4})
    assert model.verdict(2, BUDGET) == HOLD
    clock.advance(model.max_age_s + 0.1)  # batch 2 not re-measured since: its refusal is stale
    model.record(1, 0.02)  # batch 1 still runs and stays fresh
    assert model.verdict(2, BUDGET) == PROBE


def test_a_batch_size_without_a_firm_estimate_is_probed_once_per_interval():
    clock = FakeClock()
    model = model_with(clock, {1: [0.04] * 4})
    assert model.verdict(2, BUDGET) == PROBE  # nothing known at 2; 1 fits, twice its time would not
    model.record(2, 0.2)  # the probe's first step (its prefill landed in it): discarded
    assert model.verdict(2, BUDGET) == HOLD  # being measured
    clock.advance(model.probe_interval_s + 0.01)
    assert model.verdict(2, BUDGET) == PROBE  # the probed stream left before it was measured: probe again


def test_prediction_is_monotone_and_interpolated_between_measured_sizes():
    clock = FakeClock()
    model = model_with(clock, {1: [0.01] * 4, 2: [0.009] * 4, 8: [0.04] * 4})  # batch 2 measured faster than 1
    assert model.predict(2) == pytest.approx(0.01)  # never below a smaller batch
    assert model.predict(4) == pytest.approx(0.01 + (0.04 - 0.01) * (4 - 2) / (8 - 2))  # interpolated
    values = [model.predict(b) for b in range(1, 9)]
    assert values == sorted(values)


def test_a_batch_above_one_too_slow_holds_and_below_one_that_fits_fits():
    clock = FakeClock()
    model = model_with(clock, {4: [0.1] * 4})
    assert model.verdict(8, BUDGET) == HOLD
    model = model_with(FakeClock(), {8: [0.03] * 4})
    assert model.verdict(3, BUDGET) == FITS


def test_above_the_largest_measured_batch_a_linear_growth_that_fits_admits_and_else_probes():
    clock = FakeClock()
    model = model_with(clock, {4: [0.02] * 4})
    assert model.verdict(12, BUDGET) == FITS  # 0.02 x 12 / 4 = 60 ms
    assert model.verdict(16, BUDGET) == PROBE  # 80 ms if linear: only a measurement can tell


def test_a_stale_measurement_admits_but_never_refuses():
    clock = FakeClock()
    model = model_with(clock, {1: [0.01] * 4, 4: [0.03] * 4, 8: [0.09] * 4})
    clock.advance(model.max_age_s + 1)
    assert model.verdict(4, BUDGET) == FITS  # its old estimate fits
    assert model.verdict(8, BUDGET) == PROBE  # its old estimate is too slow: measure again


def test_nothing_measured_is_a_probe_and_the_table_says_how():
    clock = FakeClock()
    model = StepModel(clock=clock)
    assert model.predict(1) is None and model.verdict(1, BUDGET) == PROBE
    model = model_with(clock, {1: [0.02] * 4})
    assert model.table()[1] == {"predicted_ms": 20.0, "how": "measured", "samples": 3, "age_s": 0.0}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_samples"):
        StepModel(window=2, min_samples=3)
