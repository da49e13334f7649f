"""Training: what a recipe's loop keeps, decides and tells, around the models and the loss.

    checkpoint.py   step_N directories written atomically, with a consistency record; finding, pruning,
                    verifying and resuming them; their metadata; loading an adapter into a model
    state.py        the recipe state of an exact resume: optimizer, schedule, loss, early stopping, each rank's
                    data position and RNG streams
    position.py     where the loop is (step, epoch, step in epoch): each optimizer step's micro-batches, the data
                    position and RNG of a resumed run put back exactly where the run that saved had them
    lr_schedule.py  linear warmup, then cosine decay to min_lr (the ``lr_scheduler:`` builder)
    metrics.py      the progress bar, metrics.jsonl, TensorBoard, tokens per second
    loggers.py      W&B and MLflow (``metric_loggers``), fed from a background thread; their config checks
    plots.py        a run's curves from metrics.jsonl as PNGs (``mft plot``, and at the end of a run)
    runs.py         two runs' best checkpoints side by side, per task (``mft runs compare``)
    guards.py       early stopping; the non-finite guard that keeps NaN / inf out of the weights
    evaluate.py     validation loss per task, and the Evaluator that schedules and logs it
    summary.py      the lines a run prints when it ends
    output_lock.py  one run per output_dir: an exclusive lock, refused naming the holder
    resume_check.py what a resume refuses or applies (one table of config keys), and what a checkpoint records
    preemption.py   SIGTERM / SIGINT: finish the step, save together, exit with status 75
"""
