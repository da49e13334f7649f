"""CoBa: convergence balancing of task weights (arXiv 2410.06741), ``loss.mode: coba``."""

from __future__ import annotations

import math

__all__ = ["CoBa"]


def _ls_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of y over x using the finite points; 0 with fewer than two."""
    pts = [(a, b) for a, b in zip(x, y) if math.isfinite(b)]
    if len(pts) < 2:
        return 0.0
    mx = sum(a for a, _ in pts) / len(pts)
    my = sum(b for _, b in pts) / len(pts)
    sxx = sum((a - mx) ** 2 for a, _ in pts)
    if sxx == 0:
        return 0.0
    return sum((a - mx) * (b - my) for a, b in pts) / sxx


def _softmax(v: list[float]) -> list[float]:
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def _safe_div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


class CoBa:
    """Convergence Balancer: task weights from the slopes of normalised validation losses.

    At each update t (every ``coba_update_interval`` steps), with K tasks::

        y_k(t)      = L^val_k(t) / L^val_k(0)               validation loss normalised by its value before training
        a_k(t)      = least-squares slope of y_k over the last H updates (H = history_length)
        a_max(t)    = slope of max_k y_k over the same window
        RCS(t)      = softmax_k( K * a_k(t) / sum_j |a_j(t)| )                  slow / diverging tasks up
        ACS_k(t)    = softmax_k( -n * a_k(t) / sum_{s in last n} |a_k(s)| )     n = slopes kept (<= H):
                                                                                a task whose own slope
                                                                                flattens or turns up goes down
        DF(t)       = min(1, m * softmax_s( -tau * m * a_max(s) / sum_s |a_max(s)| )[t])
                      over all m slopes of a_max since warmup: ~1 while the worst task still converges as
                      fast as before (RCS decides), -> 0 when it flattens or diverges (ACS decides)
        w(t)        = softmax_k( K * (DF * RCS + (1 - DF) * ACS) )
        floor       if min_k w_k < 1/(10K):  w <- (1 - K * 1/(10K)) * w + 1/(10K) = 0.9 * w + 0.1 / K
                    (a mix with the uniform distribution: every weight >= 1/(10K), the sum stays 1)

    Weights are uniform until ``step >= warmup_steps``; slopes are only fitted from then on. A ratio whose
    denominator is 0 (all slopes 0) counts as 0. Missing validation losses (NaN) are skipped by the fits.
    This follows the paper and MFTCoder's ``CoBaStatus``; differences: DF is capped at 1 as in the paper
    (MFTCoder does not cap), and ACS uses the last n slopes (MFTCoder indexes its slope list by step).
    """

    def __init__(self, warmup_steps: int = 100, history_length: int = 200, tau: float = 5):
        self.warmup_steps = int(warmup_steps)
        self.history_length = int(history_length)
        self.tau = float(tau)
        self.num_tasks = 0
        self.weights: list[float] = []
        self.initial: list[float] = []
        self.steps: list[int] = []
        self.history: list[list[float]] = []  # [update][task] normalised validation loss
        self.task_slopes: list[list[float]] = []  # [update][task]
        self.max_slopes: list[float] = []
        self.last: dict[str, float] = {}

    def setup(self, num_tasks: int) -> None:
        self.num_tasks = num_tasks
        self.weights = [1.0 / num_tasks] * num_tasks
        self.initial = [math.nan] * num_tasks
        self.steps, self.history, self.task_slopes, self.max_slopes = [], [], [], []

    @property
    def floor(self) -> float:
        return 1.0 / (10 * self.num_tasks)

    def set_reference(self, losses: list[float]) -> None:
        """Normalise each task's curve by ``losses`` (finite, positive ones), before any update."""
        self.initial = [loss if math.isfinite(loss) and loss > 0 else math.nan for loss in losses]

    def update(self, step: int, losses: list[float]) -> list[float]:
        """Record validation losses at ``step`` and recompute the weights (see the class docstring)."""
        k = self.num_tasks
        # Normalise by each task's reference: its loss on the whole validation split before training
        # (set_reference), else its first finite sampled validation loss.
        for i, loss in enumerate(losses):
            if not math.isfinite(self.initial[i]) and math.isfinite(loss) and loss > 0:
                self.initial[i] = loss
        y = [loss / self.initial[i] if math.isfinite(self.initial[i]) else math.nan for i, loss in enumerate(losses)]
        self.steps.append(int(step))
        self.history.append(y)
        del self.steps[: -self.history_length], self.history[: -self.history_length]
        if step < self.warmup_steps:
            return self.weights

        xs = [float(s) for s in self.steps]
        slopes = [_ls_slope(xs, [row[i] for row in self.history]) for i in range(k)]
        worst = [max((v for v in row if math.isfinite(v)), default=math.nan) for row in self.history]
        self.task_slopes.append(slopes)
        del self.task_slopes[: -self.history_length]
        self.max_slopes.append(_ls_slope(xs, worst))

        abs_sum = sum(abs(a) for a in slopes)
        rcs = _softmax([k * _safe_div(a, abs_sum) for a in slopes])
        n = len(self.task_slopes)
        own = [sum(abs(row[i]) for row in self.task_slopes) for i in range(k)]
        acs = _softmax([-n * _safe_div(slopes[i], own[i]) for i in range(k)])
        m = len(self.max_slopes)
        max_abs = sum(abs(a) for a in self.max_slopes)
        df = min(1.0, m * _softmax([-self.tau * m * _safe_div(a, max_abs) for a in self.max_slopes])[-1])
        raw = _softmax([k * (df * r + (1 - df) * a) for r, a in zip(rcs, acs)])
        w = raw
        if min(raw) < self.floor:
            w = [(1 - k * self.floor) * x + self.floor for x in raw]
        self.weights = w
        # The terms of the last update, for logging and tests.
        self.last = {"df": df, "rcs": rcs, "acs": acs, "raw": raw, "slopes": slopes, "max_slope": self.max_slopes[-1]}
        return w

    def state_dict(self) -> dict:
        return {
            "weights": list(self.weights),
            "initial": list(self.initial),
            "steps": list(self.steps),
            "history": [list(r) for r in self.history],
            "task_slopes": [list(r) for r in self.task_slopes],
            "max_slopes": list(self.max_slopes),
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["weights"]) != self.num_tasks:
            raise ValueError(
                f"CoBa.load_state_dict: checkpoint has {len(state['weights'])} tasks, setup() was given {self.num_tasks}"
            )
        self.weights = [float(x) for x in state["weights"]]
        self.initial = [float(x) for x in state["initial"]]
        self.steps = [int(x) for x in state["steps"]]
        self.history = [[float(v) for v in r] for r in state["history"]]
        self.task_slopes = [[float(v) for v in r] for r in state["task_slopes"]]
        self.max_slopes = [float(x) for x in state["max_slopes"]]
