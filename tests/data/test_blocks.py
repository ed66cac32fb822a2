"""Segments and evaluation windows: every token scored once, context never longer than C."""

import numpy as np
import pytest

from trime.data.batching import make_batch
from trime.data.blocks import eval_windows, input_tokens, num_segments, segment_bounds, segment_windows
from trime.errors import ConfigError

from reference import window


def stream(n=103, line=7, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.integers(4, 50, size=n).astype(np.int32)
    t[line - 1 :: line] = 2  # eos ends every line
    return t


def test_inputs_are_targets_shifted_across_boundaries():
    t = stream()
    assert input_tokens(t, 0, 5).tolist() == [2] + t[:4].tolist()
    assert input_tokens(t, 10, 15).tolist() == t[9:14].tolist()


def test_segments_cover_the_stream_once():
    t = stream()
    L = 16
    b = segment_bounds(len(t), L)
    assert len(b) == num_segments(len(t), L) == 7
    assert b[0].tolist() == [0, 16] and b[-1].tolist() == [96, 103]
    b = make_batch(t, segment_windows([6, 2], len(t), L), pad=1, eos=2, width=L)
    (inp, inp2), (tgt, tgt2) = b.inputs.numpy(), b.targets.numpy()
    assert b.inputs.shape == (2, L) and b.n_ctx == [0, 0] and b.n_score == [7, 16]
    assert tgt[:7].tolist() == t[96:].tolist() and (tgt[7:] == 1).all() and (inp[7:] == 1).all()
    assert inp2[0] == t[31] and inp2[1:].tolist() == tgt2[:-1].tolist()
    for row, s in zip(range(2), (6, 2)):  # equal to the slicing oracle
        ref_inp, ref_tgt = window(t, s * L, min((s + 1) * L, len(t)), 0)
        assert b.inputs[row, : len(ref_inp)].tolist() == ref_inp.tolist()
        assert b.targets[row, : len(ref_tgt)].tolist() == ref_tgt.tolist()


@pytest.mark.parametrize("mode", ["none", "complete"])
@pytest.mark.parametrize("L,C", [(16, 0), (16, 12), (16, 15), (8, 4)])
def test_every_token_scored_exactly_once(mode, L, C):
    t = stream(n=211, line=5)
    t[100:130] = 7  # one line longer than L (only matters for 'complete')
    w = eval_windows(t, L, C, mode)
    scored = np.zeros(len(t), int)
    for s, e, c in w:
        scored[s:e] += 1
        assert 0 <= c <= C and c <= s
        assert c + (e - s) <= L
        assert e - s <= (L - C if mode == "none" else L)
        inp, tgt = window(t, s, e, c)
        b = make_batch(t, np.array([[s, e, c]]), pad=1, eos=2)
        assert b.inputs[0].tolist() == inp.tolist() and b.targets[0, c:].tolist() == tgt[c:].tolist()
        assert b.targets[0, :c].tolist() == t[s - c : s].tolist()  # the context keeps its targets (memory labels)
        assert len(inp) == len(tgt) == c + e - s
        assert (tgt[:c] == 1).all() and tgt[c:].tolist() == t[s:e].tolist()
        assert inp.tolist() == input_tokens(t, s - c, e).tolist()
    assert (scored == 1).all()


def test_complete_mode_keeps_whole_lines():
    t = stream(n=60, line=6)
    for s, e, _ in eval_windows(t, 20, 8, "complete"):
        assert s == 0 or t[s - 1] == 2
        assert e == len(t) or t[e - 1] == 2


def test_context_is_full_after_warm_up():
    w = eval_windows(stream(n=200), 32, 24, "none")
    assert w[0].tolist() == [0, 8, 0]
    assert all(c == 24 for _, _, c in w[3:])


def test_bad_context_window():
    with pytest.raises(ConfigError):
        eval_windows(stream(), 16, 16)
