"""Execution-based evaluation of generated code: pass@1 / pass@k per task, in training and with ``mft eval``.

    suites.py     eval sets: JSONL problems, humaneval, dataframebench; how an answer becomes a program
    options.py    CodeEvalOptions, the ``eval.code`` section, and its checks (CodeEvalError)
    sandbox.py    programs run in a fresh directory with limits (bubblewrap where it works)
    pass_at_k.py  the unbiased pass@k estimator
    evaluate.py   generate (inference/decoding.py), run, score; CodeEvaluator for the recipes; ``mft eval``
"""
