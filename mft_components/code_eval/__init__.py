"""Execution-based evaluation of generated code: pass@1 / pass@k per task, in training and with ``mft eval``.

    suites.py     eval sets: JSONL problems, humaneval, dataframebench; how an answer becomes a program
    options.py    CodeEvalOptions, the ``eval.code`` section, and its checks (CodeEvalError)
    sandbox.py    programs run in a fresh directory with limits, as their own uid, in namespaces or bubblewrap
    supervisor.py the process that starts, times, kills and reaps each program (run as a script)
    harness_driver.py  runs the answer, then its tests; only it can report "passed" (run as a script)
    isolation.py  the uid pool, what programs may see, bubblewrap's arguments
    cgroups.py    per-run pids cgroups
    suite_check.py  ``mft eval --check-suite``: do a suite's canonical solutions pass here?
    pass_at_k.py  the unbiased pass@k estimator
    evaluate.py   generate (inference/decoding.py), run, score; CodeEvaluator for the recipes; ``mft eval``
"""
