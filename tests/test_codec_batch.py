"""StreamingCodec: many streams in one push, each stream exact (its whole-utterance decode to 1e-5) and batch invariant
(bit for bit its solo streaming output on CPU), with streams joining and leaving and pushing different frame counts."""

import numpy as np
import pytest
import torch

from qwen_tts_megakernel.codec import CodecDecoder, CodecDecoderConfig, StreamingCodec
from qwen_tts_megakernel.synthetic.codec import random_speech_tokenizer_weights, tiny_speech_tokenizer_config

SPF = 1920
SMALL_WINDOW = 6  # an attention window that a stream crosses within a few frames

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def tiny_codec(window: int = 72, device: str = "cpu") -> CodecDecoder:
    config = tiny_speech_tokenizer_config()
    config["decoder_config"]["sliding_window"] = window
    weights = random_speech_tokenizer_weights(config, seed=0)
    return CodecDecoder.from_state_dict(CodecDecoderConfig.from_json_dict(config), weights, device=device)


def random_codes(frames: int, seed: int) -> np.ndarray:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed)).numpy()


def run_streams(codec: StreamingCodec, codes: list[np.ndarray], schedules: list[list[int]], starts: list[int]):
    """Simulate an engine: at tick t every stream that has started (t >= its start) and has frames left pushes its
    next chunk (its schedule's sizes in turn, the last one repeated), all in one push. A stream opens at its start
    and closes after its last chunk. Returns each stream's PCM and the number of pushes that mixed frame counts."""
    pcm = [[] for _ in codes]
    done, handles, chunks_sent = [0] * len(codes), [None] * len(codes), [0] * len(codes)
    mixed, tick = 0, 0
    while any(d < len(c) for d, c in zip(done, codes)):
        batch = []
        for i, c in enumerate(codes):
            if tick >= starts[i] and done[i] < len(c):
                if handles[i] is None:
                    handles[i] = codec.open()
                n = schedules[i][min(chunks_sent[i], len(schedules[i]) - 1)]
                batch.append((i, c[done[i] : done[i] + n]))
        if batch:
            out = codec.push([handles[i] for i, _ in batch], [chunk for _, chunk in batch])
            mixed += len({len(chunk) for _, chunk in batch}) > 1
            for (i, chunk), wav in zip(batch, out):
                assert wav.dtype == np.float32 and wav.shape == (len(chunk) * SPF,)
                pcm[i].append(wav)
                done[i] += len(chunk)
                chunks_sent[i] += 1
                if done[i] == len(codes[i]):
                    codec.close(handles[i])
        tick += 1
    return [np.concatenate(p) for p in pcm], mixed


@pytest.fixture(scope="module")
def small_window():
    return tiny_codec(SMALL_WINDOW)


@pytest.fixture(scope="module")
def real_window():
    return tiny_codec(72)


def check_batch(decoder, frames, schedules, starts, max_streams=8, use_graphs=False, bitwise=True):
    codes = [random_codes(n, seed=100 + i) for i, n in enumerate(frames)]
    batched, mixed = run_streams(StreamingCodec(decoder, max_streams, use_graphs=use_graphs), codes, schedules, starts)
    assert len(codes) == 1 or mixed > 0  # the schedule really mixes frame counts in one push
    for i, c in enumerate(codes):
        solo, _ = run_streams(StreamingCodec(decoder, 1, use_graphs=use_graphs), [c], [schedules[i]], [0])
        whole = decoder.decode(c).numpy()
        assert batched[i].shape == solo[0].shape == whole.shape
        assert np.abs(batched[i] - whole).max() <= 1e-5, i
        if bitwise:
            assert np.array_equal(batched[i], solo[0]), f"stream {i}: batched differs from solo"
        else:
            assert np.abs(batched[i] - solo[0]).max() <= 1e-5, i


# --- CPU fp32: exact and batch invariant --------------------------------------------------------------------------


def test_one_stream_past_the_window(small_window):
    check_batch(small_window, [11], [[1, 2, 4, 8]], [0])


def test_three_streams_past_the_real_window(real_window):
    """Different start times and schedules; two of the three run past the 72-frame attention window."""
    check_batch(real_window, [76, 74, 12], [[1, 2, 4, 8, 40], [1, 3, 16, 60], [2, 8]], [0, 1, 3])


def test_seven_streams_join_and_leave(small_window):
    """B = 7, a window of 6 frames: streams start at different ticks, push 1, 2, 4, 8 ... or odd sizes, end at
    different ticks; slots are reused by streams that join after others left (max_streams 5 < 7 streams)."""
    frames = [10, 8, 12, 9, 11, 8, 10]
    schedules = [[1, 2, 4, 8], [3], [1, 2, 4, 8], [5, 1], [2], [1, 2, 4, 8], [7, 2]]
    starts = [0, 0, 1, 2, 4, 6, 7]
    check_batch(small_window, frames, schedules, starts, max_streams=5)


def test_fixed_step_shapes_off_cuda_equal_the_whole_decode(small_window):
    """use_graphs=True on the CPU: the graphs' bucket padding (scratch rows) and 8/4/2/1 steps, run eagerly. Exact
    to float rounding (bucket shapes differ from solo shapes, so not bit for bit on CPU)."""
    check_batch(small_window, [10, 8, 13, 9], [[1, 2, 4, 8], [3], [13], [5, 1]], [0, 0, 1, 2],
                max_streams=4, use_graphs=True, bitwise=False)


def test_prime_codes_continue_the_utterance(small_window):
    """A stream primed with P reference frames gives the tail of the decode of reference + its own codes."""
    codec = StreamingCodec(small_window, max_streams=2)
    reference, own = random_codes(7, seed=1), random_codes(9, seed=2)
    stream = codec.open(prime_codes=reference)
    assert stream.frames == 0
    pcm = np.concatenate(codec.push([stream], [own[:4]]) + codec.push([stream], [own[4:]]))
    whole = small_window.decode(np.concatenate([reference, own])).numpy()
    assert np.abs(pcm - whole[7 * SPF :]).max() <= 1e-5
    assert stream.frames == 9


def test_a_reopened_slot_starts_a_new_utterance(small_window):
    codec = StreamingCodec(small_window, max_streams=1)
    codes = random_codes(5, seed=3)
    first = codec.open()
    a = np.concatenate(codec.push([first], [codes[:2]]) + codec.push([first], [codes[2:]]))
    codec.close(first)
    codec.close(first)  # idempotent
    second = codec.open()
    assert second.slot == first.slot
    b = codec.push([second], [codes])[0]
    assert np.abs(a - b).max() <= 1e-5 and np.abs(a - small_window.decode(codes).numpy()).max() <= 1e-5


def test_zero_frames_and_order_of_results(small_window):
    codec = StreamingCodec(small_window, max_streams=3)
    a, b, c = codec.open(), codec.open(), codec.open()
    codes = random_codes(3, seed=4)
    out = codec.push([a, b, c], [codes[:0], codes[:1], codes])
    assert [len(x) for x in out] == [0, SPF, 3 * SPF]
    assert np.abs(out[1] - out[2][:SPF]).max() <= 1e-5  # the same first frame from two fresh streams
    assert (a.frames, b.frames, c.frames) == (0, 1, 3)


def test_bad_calls_name_what_is_wrong(small_window):
    codec = StreamingCodec(small_window, max_streams=1)
    other = StreamingCodec(small_window, max_streams=1)
    stream = codec.open()
    frame = random_codes(1, seed=5)
    with pytest.raises(RuntimeError, match="all 1 codec streams are open"):
        codec.open()
    with pytest.raises(ValueError, match="2 streams and 1 code arrays"):
        codec.push([stream, stream], [frame])
    with pytest.raises(ValueError, match=r"streams\[1\] appears twice"):
        codec.push([stream, stream], [frame, frame])
    with pytest.raises(ValueError, match=r"codes\[0\] must be \[T, 16\]"):
        codec.push([stream], [frame[:, :15]])
    with pytest.raises(ValueError, match=r"codes\[0\] must be in \[0, 2048\)"):
        codec.push([stream], [frame + 2048])
    with pytest.raises(ValueError, match=r"codes\[0\] must be an integer"):
        codec.push([stream], [frame.astype(np.float32)])
    with pytest.raises(ValueError, match="prime_codes must be"):
        other.open(prime_codes=np.zeros((2, 3), dtype=np.int64))
    assert other.open_streams == 0  # a rejected open takes no slot
    with pytest.raises(ValueError, match=r"streams\[0\] is not a stream of this codec"):
        other.push([stream], [frame])
    codec.close(stream)
    with pytest.raises(ValueError, match=r"streams\[0\] is closed"):
        codec.push([stream], [frame])
    with pytest.raises(ValueError, match="precision"):
        StreamingCodec(small_window, precision="fp16")
    with pytest.raises(ValueError, match="max_streams"):
        StreamingCodec(small_window, max_streams=0)
    with pytest.raises(ValueError, match="batch_sizes"):
        codec.warm_up(batch_sizes=(2,))


def test_bf16_copy_leaves_the_reference_decoder_alone(small_window):
    codec = StreamingCodec(small_window, max_streams=1, precision="bf16")
    assert codec.model is not small_window
    assert codec.model.blocks[0].res_units[1].conv1.weight.dtype == torch.bfloat16
    assert codec.model.head_conv.weight.dtype == codec.model.blocks[0].act.alpha.dtype == torch.float32
    assert small_window.head_conv.weight.dtype == torch.float32
    codes = random_codes(4, seed=6)
    pcm = codec.push([codec.open()], [codes])[0]
    whole = small_window.decode(codes).numpy()
    assert np.isfinite(pcm).all() and 0 < np.abs(pcm - whole).max() < 0.05


# --- GPU ----------------------------------------------------------------------------------------------------------


def snr_db(reference: np.ndarray, x: np.ndarray) -> float:
    reference, x = reference.astype(np.float64), x.astype(np.float64)
    return float(10 * np.log10(np.sum(reference**2) / np.sum((reference - x) ** 2)))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_gpu_streams_in_one_bucket_are_bit_identical_whoever_shares_it(no_tf32, precision):
    """Graphs: a stream's PCM is the same bits whoever shares its bucket. Every stream here pushes the same frame
    counts at the same ticks, so each push is one group: 5 streams, then 8 other ones, both in bucket 8."""
    decoder = tiny_codec(72, "cuda")
    target = random_codes(80, seed=7)
    runs = []
    for others in (4, 7):
        codes = [target] + [random_codes(80, seed=20 + 10 * others + k) for k in range(others)]
        pcm, _ = run_streams(StreamingCodec(decoder, 8, precision), codes, [[1, 2, 4, 8]] * (others + 1),
                             [0] * (others + 1))
        runs.append(pcm[0])
    assert np.array_equal(runs[0], runs[1])


@pytest.mark.gpu
@needs_cuda
def test_gpu_batched_streams_equal_their_solo_and_whole_decodes(no_tf32):
    """B = 1, 3, 7 with graphs at fp32: each stream equals its whole decode; against its solo run (bucket 1) it is
    compared bit for bit and reported (buckets of other shapes may choose other kernels), bounded by 1e-5."""
    decoder = tiny_codec(72, "cuda")
    for frames, schedules, starts in (
        ([80], [[1, 2, 4, 8]], [0]),
        ([80, 76, 90], [[1, 2, 4, 8], [3, 8], [1, 8]], [0, 2, 5]),
        ([80, 76, 90, 75, 84, 78, 81], [[1, 2, 4, 8], [3, 8], [1, 8], [2, 4], [8], [5, 1], [1, 2, 4, 8]],
         [0, 2, 5, 1, 0, 3, 4]),
    ):
        codes = [random_codes(n, seed=200 + i) for i, n in enumerate(frames)]
        batched, _ = run_streams(StreamingCodec(decoder, 8), codes, schedules, starts)
        for i, c in enumerate(codes):
            solo, _ = run_streams(StreamingCodec(decoder, 1), [c], [schedules[i]], [0])
            whole = decoder.decode(c).cpu().numpy()
            assert np.abs(batched[i] - whole).max() <= 1e-4
            diff = np.abs(batched[i] - solo[0]).max()
            print(f"B={len(codes)} stream {i}: max |batched - solo| = {diff:.3g}, bit-identical {diff == 0}")
            assert diff <= 1e-5


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_gpu_reduced_precision_snr_against_fp32_on_every_stream(precision):
    """The released codec's shapes (random weights): tf32 / bf16 against the fp32 decode, >= 45 dB on every stream."""
    from qwen_tts_megakernel.tools.codec_timing import real_codec

    decoder = real_codec(torch.device("cuda"))
    codes = [random_codes(40, seed=300 + i) for i in range(4)]
    schedules = [[1, 2, 4, 8]] * 4
    reference, _ = run_streams(StreamingCodec(decoder, 4, "fp32"), codes, schedules, [0, 1, 2, 3])
    reduced, _ = run_streams(StreamingCodec(decoder, 4, precision), codes, schedules, [0, 1, 2, 3])
    snrs = [snr_db(r, x) for r, x in zip(reference, reduced)]
    print(f"{precision} SNR per stream (dB):", [round(s, 1) for s in snrs])
    assert min(snrs) >= 45.0
