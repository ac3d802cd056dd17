"""validate --batch's oracle on the CPU: the batched fp32 reference (tools/batch_reference.py) against the per-stream
reference_run, its batch invariance, and the report of run_batch_validation with a CPU stand-in for the kernel."""

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.backends.base import StepOutput
from qwen_tts_megakernel.backends.reference import ReferenceBackend
from qwen_tts_megakernel.config import CodePredictorConfig, ModelConfig, SpecialIds, TalkerConfig
from qwen_tts_megakernel.model import Talker
from qwen_tts_megakernel.sampling import SamplingParams
from qwen_tts_megakernel.tools.batch_reference import batched_reference_run
from qwen_tts_megakernel.tools.validate import (batch_prompts, format_table, random_weights, reference_run, rel_err,
                                                run_batch_validation, sample_streams)

FRAMES = 6
# fp32 rounding: a product of 1 row and one of R rows sum in different orders (measured <= 1.1e-6 here).
ROUNDING = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(talker_hidden: int) -> ModelConfig:
    """The real vocabularies and head layout (GQA 4:2), tiny widths; talker_hidden != 32 adds the mtp projection."""
    common = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  rope_theta=1000000.0, num_code_groups=16)
    cp = CodePredictorConfig.from_dict(dict(vocab_size=2048, hidden_size=32, intermediate_size=64, **common))
    talker = TalkerConfig.from_dict(dict(vocab_size=3072, hidden_size=talker_hidden, intermediate_size=96,
                                         text_vocab_size=8, text_hidden_size=16, **common))
    return ModelConfig(model_type="custom_voice", model_size="0b6", talker=talker, code_predictor=cp, codec=None,
                       ids=SpecialIds())


@pytest.fixture(scope="module", params=[32, 48], ids=["no-projection", "mtp-projection"])
def tiny(request):
    config = tiny_config(request.param)
    weights = random_weights(config, seed=0)
    talker = Talker.from_state_dict(config, {k: v.float() for k, v in weights.items()})
    return config, weights, talker


def _streams(config, n, seed=5, lo=3, hi=40):
    return batch_prompts(config, n, FRAMES, seed, lo=lo, hi=hi)


def test_batched_reference_equals_per_stream_reference(tiny):
    """Every stream's codes equal reference_run's on every frame; hidden and logits agree to fp32 rounding."""
    config, _, talker = tiny
    params = SamplingParams()
    streams = _streams(config, 5)
    got = batched_reference_run(talker, streams, params, FRAMES)
    for (prefill, text, pad, table), (codes, hid, log) in zip(streams, got):
        want_codes, want_hid, want_log = reference_run(talker, prefill, text, pad, params, table, FRAMES)
        assert np.array_equal(codes, want_codes)
        assert hid.shape == want_hid.shape and log.shape == want_log.shape
        assert max(rel_err(hid[k], want_hid[k]) for k in range(len(hid))) <= ROUNDING
        assert max(rel_err(log[k], want_log[k]) for k in range(len(log))) <= ROUNDING


def test_a_streams_values_do_not_depend_on_its_batch(tiny):
    """With the same product rows, a stream's codes, hidden and logits are the same bits alone, beside other
    streams, at another row and beside different neighbours."""
    config, _, talker = tiny
    params = SamplingParams()
    streams = _streams(config, 4)
    others = _streams(config, 3, seed=99)
    rows = 6
    alone = batched_reference_run(talker, [streams[2]], params, FRAMES, rows=rows)[0]
    for batch, at in (([streams[0], streams[1], streams[2], streams[3]], 2),
                      ([others[0], streams[2], others[1], others[2], streams[0], streams[1]], 1)):
        got = batched_reference_run(talker, batch, params, FRAMES, rows=rows)[at]
        assert np.array_equal(got[0], alone[0])
        assert torch.equal(got[1], alone[1]) and torch.equal(got[2], alone[2])


def test_streams_that_end_early(tiny):
    """With the EOS row of the codec head scaled up (x3 or x2: measured to end some streams of these seeds early and
    not others), some streams end early: each still equals reference_run (codes,
    frames), and the others are the same bits as when they run alone."""
    config, weights, _ = tiny
    eos = config.ids.codec_eos
    w = {k: v.float() for k, v in weights.items()}
    w["talker.codec_head.weight"] = w["talker.codec_head.weight"].clone()
    w["talker.codec_head.weight"][eos] *= 3.0 if config.talker.hidden_size == 32 else 2.0
    talker = Talker.from_state_dict(config, w)
    params, frames = SamplingParams(), 12
    streams = batch_prompts(config, 6, frames, 5, lo=3, hi=40)
    got = batched_reference_run(talker, streams, params, frames, rows=6)
    lengths = [len(c) for c, _, _ in got]
    assert min(lengths) < frames and max(lengths) == frames, lengths  # the premise: a mix
    for i, ((prefill, text, pad, table), (codes, hid, log)) in enumerate(zip(streams, got)):
        want_codes, want_hid, _ = reference_run(talker, prefill, text, pad, params, table, frames)
        assert np.array_equal(codes, want_codes)
        assert (codes[-1, 0] == eos) == (len(codes) < frames)
        alone = batched_reference_run(talker, [streams[i]], params, frames, rows=6)[0]
        assert np.array_equal(alone[0], codes) and torch.equal(alone[1], hid) and torch.equal(alone[2], log)


def test_too_many_streams_for_the_rows_is_an_error(tiny):
    config, _, talker = tiny
    with pytest.raises(ValueError, match="do not fit"):
        batched_reference_run(talker, _streams(config, 3), SamplingParams(), 2, rows=2)


class CpuKernel:
    """A CPU stand-in for MegakernelBackend in run_batch_validation: the reference backend (one stream after
    another), with validate's extras: teacher forcing, a state perturbation (perturb is added to every cached key)
    and the last step's hidden / logits per row."""

    class Handle:
        def __init__(self, stream, forced, limit):
            self.stream, self.forced, self.limit, self.frame = stream, forced, limit, 0

    def __init__(self, talker, max_streams, max_seq_len):
        self.ref = ReferenceBackend(talker, max_streams=max_streams, max_seq_len=max_seq_len)
        self.config, self.num_blocks, self.max_seq_len, self.opened = talker.config, 1, max_seq_len, []

    def open(self, specs, forced=None):
        for spec in specs:  # the kernel's own check (MegakernelBackend._check_spec)
            assert len(spec.prefill) - 1 + spec.max_frames <= self.max_seq_len, "max_seq_len too small"
        self.opened += [len(s.prefill) for s in specs]
        forced = forced or [None] * len(specs)
        return [self.Handle(h, f, s.max_frames) for h, f, s in zip(self.ref.open(specs), forced, specs)]

    @torch.inference_mode()
    def step(self, handles, perturb=0.0):
        codes = []
        for h in handles:
            if perturb:
                h.stream.cache.k.add_(perturb)
            codes.append(self.ref.frame(h.stream))
            if h.forced is not None:
                f = h.forced[h.frame]
                h.stream.past_g0[-1:] = [int(f[0])]
                h.stream.last_codes = f.tolist()
            h.frame += 1
        self.last = handles
        return StepOutput(codes=np.array(codes))

    def last_hidden(self, row):
        return self.last[row].stream.last_hidden

    def last_logits(self, row):
        return self.last[row].stream.last_logits

    def close(self, h):
        self.ref.close(h.stream)

    def memory_per_stream(self):
        return 0


def test_batch_validation_report(tiny):
    """run_batch_validation end to end with the CPU stand-in: the kernel is built for max_pos + frames positions,
    prompts span 20..max_pos rows, and the report holds the reference check, max_pos and every stage's time."""
    config, weights, _ = tiny
    made = {}

    def make_backend(config, weights, device, max_streams, max_seq_len):
        talker = Talker.from_state_dict(config, {k: v.float() for k, v in weights.items()})
        made["kernel"] = CpuKernel(talker, max_streams, max_seq_len)
        return made["kernel"]

    lines = []
    r = run_batch_validation(config, weights, [1, 2, 5], frames=4, device="cpu", max_pos=60, oracle_rows=8,
                             log=lines.append, make_backend=make_backend)
    assert r["max_pos"] == 60 and r["max_seq_len"] == 65 and made["kernel"].max_seq_len == 65
    assert r["prompt_rows"][0] == 20 and r["prompt_rows"][-1] == 60 and max(made["kernel"].opened) == 60
    assert r["frames"] == 4 and r["streams"] == 5
    assert set(r["stage_seconds"]) == {"setup", "reference", "reference check", "teacher-forced", "solo runs",
                                       "batches", "A/B"}
    assert all(v >= 0 for v in r["stage_seconds"].values())
    check = r["reference_check"]
    assert check["streams"] == [0, 1, 3, 4] and check["product_rows"] == 8
    assert check["hidden_rel_err_max"] <= ROUNDING and check["codes_agreement"] == 1.0
    # The stand-in is the reference itself: everything agrees, and the report says so.
    assert r["hidden_rel_err_max"] <= ROUNDING and r["teacher_forced_g0_agreement"] == 1.0
    assert r["batch_invariant"] and r["ab_perturbation_changes_codes"] and r["pass"]
    assert any("reference ..." in line for line in lines) and any("solo runs:" in line for line in lines)
    assert "batched reference = per-stream reference" in format_table(r)


def test_sample_streams_cover_both_ends():
    assert sample_streams(64) == [0, 21, 42, 63]
    assert sample_streams(3) == [0, 1, 2]
    assert sample_streams(1) == [0]
