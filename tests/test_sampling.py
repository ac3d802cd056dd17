"""The official sampling rules, one test each, plus reproducibility and a distribution test."""

import math

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.sampling import (
    RandomStream,
    SamplingParams,
    TalkerRules,
    apply_repetition_penalty,
    draw,
    philox4x32,
    philox_uniforms,
    sample_code_predictor,
    sample_talker,
    talker_logits,
    warp,
)

RULES = TalkerRules(vocab_size=3072, eos_id=2150)
GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False)


def test_philox_matches_random123_known_answers():
    cases = [
        ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for counter, key, expected in cases:
        assert philox4x32(np.array([counter]), key)[0].tolist() == expected


def test_uniforms_are_reproducible_distinct_and_in_range():
    a, b = philox_uniforms(42, 7), philox_uniforms(42, 7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, philox_uniforms(42, 8))
    assert not np.array_equal(a, philox_uniforms(43, 7))
    many = np.concatenate([philox_uniforms(1, f) for f in range(500)])
    assert many.min() >= 0.0 and many.max() < 1.0
    assert abs(many.mean() - 0.5) < 0.02
    table = np.random.default_rng(0).random((3, 16))
    np.testing.assert_array_equal(RandomStream(0, table).frame(2), table[2])


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_token():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]


def test_suppressed_range_never_wins_but_eos_can():
    logits = torch.zeros(3072)
    logits[2500] = 100.0  # suppressed control id
    logits[2150] = 50.0  # EOS
    logits[7] = 10.0
    assert sample_talker(logits, torch.tensor([]), step=5, params=GREEDY, rules=RULES, u=0.5) == 2150
    constrained = talker_logits(logits, torch.tensor([]), 5, GREEDY, RULES)
    assert torch.isinf(constrained[2048:2150]).all() and torch.isinf(constrained[2151:]).all()


@pytest.mark.parametrize("step,expect_eos_allowed", [(0, False), (1, False), (2, True)])
def test_no_eos_before_two_tokens(step, expect_eos_allowed):
    logits = torch.zeros(3072)
    logits[2150] = 100.0
    logits[3] = 1.0
    got = sample_talker(logits, torch.tensor([]), step=step, params=GREEDY, rules=RULES, u=0.5)
    assert (got == 2150) == expect_eos_allowed


def test_penalty_changes_the_greedy_winner():
    logits = torch.zeros(3072)
    logits[10], logits[11] = 1.0, 0.99
    assert sample_talker(logits, torch.tensor([]), 3, GREEDY, RULES, 0.5) == 10
    assert sample_talker(logits, torch.tensor([10]), 3, GREEDY, RULES, 0.5) == 11


def test_greedy_argmax_takes_the_first_of_equal_maxima():
    logits = torch.zeros(2048)
    logits[[5, 9, 700]] = 3.0
    assert sample_code_predictor(logits, GREEDY, u=0.99) == 5


def test_top_k_keeps_ties_at_the_kth_value_like_hf():
    scores = torch.tensor([5.0, 4.0, 3.0, 3.0, 1.0])
    out = warp(scores, temperature=1.0, top_k=3, top_p=1.0)
    assert torch.isfinite(out).tolist() == [True, True, True, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = warp(probs.log(), temperature=1.0, top_k=0, top_p=0.8)
    assert torch.isfinite(out).tolist() == [True, True, False, False]
    out = warp(probs.log(), temperature=1.0, top_k=0, top_p=0.81)
    assert torch.isfinite(out).tolist() == [True, True, True, False]


def test_draw_walks_the_cdf_in_descending_score_order():
    scores = torch.tensor([0.0, math.log(3.0), float("-inf")])  # probabilities 1/4, 3/4, 0
    assert draw(scores, 0.0) == 1
    assert draw(scores, 0.74) == 1
    assert draw(scores, 0.76) == 0
    assert draw(scores, 0.999999) == 0


def test_sampling_with_the_same_uniforms_is_reproducible_and_differs_across_seeds():
    logits = torch.randn(3072, generator=torch.Generator().manual_seed(0))
    params = SamplingParams()
    a = [sample_talker(logits, torch.tensor([]), 3, params, RULES, u) for u in philox_uniforms(1, 0)]
    b = [sample_talker(logits, torch.tensor([]), 3, params, RULES, u) for u in philox_uniforms(1, 0)]
    c = [sample_talker(logits, torch.tensor([]), 3, params, RULES, u) for u in philox_uniforms(2, 0)]
    assert a == b and a != c


def test_top_k_and_temperature_draw_the_right_distribution():
    """Chi-square test: 20,000 draws over a 10-token vocabulary with top-k 4 and temperature 0.7."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.9, 0.5, 0.1, -0.3, -1.0, -2.0, -3.0])
    temperature, top_k = 0.7, 4
    expected = torch.softmax(logits[:4] / temperature, 0).double().numpy()
    n = 20000
    uniforms = np.concatenate([philox_uniforms(123, f) for f in range(n // 16)])
    counts = np.zeros(10)
    for u in uniforms:
        counts[sample_code_predictor(logits, SamplingParams(subtalker_temperature=temperature,
                                                            subtalker_top_k=top_k), u)] += 1
    assert counts[4:].sum() == 0, "tokens outside the top-k were drawn"
    chi2 = float((((counts[:4] - n * expected) ** 2) / (n * expected)).sum())
    assert chi2 < 16.27, f"chi-square {chi2:.2f} exceeds the 0.999 quantile for 3 degrees of freedom"


def test_invalid_params_are_rejected():
    for bad in (dict(temperature=0), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
