"""Seconds per sandboxed program, per isolation mode, against a bare interpreter start in the same run.

    python bench/sandbox_overhead.py                 # 20 programs per mode, 1 worker
    python bench/sandbox_overhead.py --programs 40 --workers 2

Each mode runs the same trivial program (``x = 1``, the script harness) ``--programs`` times: what a verdict costs
beyond the answer's own work (the supervisor, the harness driver, the namespaces and mounts, the uid lease). The
baseline is ``python -c pass`` started as often by ``subprocess.run``. Printed: seconds per program and the ratio
to the baseline, with the load average (the machine may be shared).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from mft_components.code_eval.sandbox import ISOLATIONS, Limits, Sandbox, SandboxError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    start = time.perf_counter()
    for _ in range(args.programs):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    base = (time.perf_counter() - start) / args.programs
    print(f"load average {os.getloadavg()[0]:.1f}; baseline `python -c pass`: {base * 1000:.0f} ms")
    for mode in [m for m in ISOLATIONS if m != "auto"]:
        try:
            sandbox = Sandbox(workers=args.workers, limits=Limits(timeout_s=30), isolation=mode)
        except SandboxError as e:
            print(f"{mode:<11} cannot start here: {str(e)[:150]}")
            continue
        start = time.perf_counter()
        results = sandbox.run_many(["x = 1"] * args.programs)
        per = (time.perf_counter() - start) / args.programs * args.workers
        sandbox.close()
        assert all(r.passed for r in results), [r.reason for r in results if not r.passed][:3]
        print(f"{mode:<11} {per * 1000:6.0f} ms per program ({per / base:.1f}x the baseline)")


if __name__ == "__main__":
    main()
