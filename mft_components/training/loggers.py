"""Metric loggers beyond metrics.jsonl and TensorBoard: Weights & Biases and MLflow, fed from a background thread.

``metric_loggers`` in a recipe config lists them, by name or as ``_component_`` nodes (torchtune's shape)::

    metric_loggers: [tensorboard, wandb, mlflow]
    metric_loggers:
      - _component_: mft_components.training.loggers.WandBLogger
        project: my-project
      - _component_: mft_components.training.loggers.MLflowLogger
        tracking_uri: http://127.0.0.1:5000

Every value the run writes to metrics.jsonl reaches them under one flat key per series: ``train/loss``,
``train/loss/TASK``, ``val/loss/TASK``, ``val/perplexity/TASK``, ``code_eval/pass@1/TASK``, ``train/lr``, ...
(:func:`flatten_metrics`), the resolved config as the run's parameters, and at the end the run's summary (and,
with ``log_artifact: true``, the best checkpoint's weights). A resumed run continues the same W&B / MLflow run:
their run ids are kept in the recipe state (:meth:`ExternalLoggers.run_ids`).

The training loop only puts values on a queue: starting the runs (an MLflow store's first use takes seconds),
logging and finishing happen on one background thread, so a slow or unreachable service never slows a step. A
logger that raises is switched off with a warning and the run goes on; metrics.jsonl stays the record.
What would make a logger fail at its start (unknown name, library not installed, tracking server unreachable) is a
config error before the model loads (:func:`metric_logger_problems`, run by ``mft validate`` and the recipes).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import netrc
import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

__all__ = ["LOGGER_NAMES", "ExternalLoggers", "MLflowLogger", "WandBLogger", "build_metric_loggers",
           "flatten_metrics", "metric_logger_problems"]

# metric.jsonl's record kinds -> the first part of the keys of their series
KIND_PREFIX = {"train": "train", "eval": "val", "code_eval": "code_eval"}


def flatten_metrics(kind: str, metrics: dict[str, Any]) -> dict[str, float]:
    """One metrics.jsonl record -> ``{prefix/key[/task]: number}``.

    Per-task dicts (``task_loss: {pandas: ...}``) become ``val/loss/pandas``: their ``task_`` prefix is dropped so
    that the training (``loss/pandas``), validation and code-evaluation series of a task line up. Values that are
    not finite numbers (None, a missing best step) are left out.
    """
    prefix = KIND_PREFIX.get(kind, kind)
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            name = key[len("task_"):] if key.startswith("task_") else key
            for task, v in value.items():
                if _is_number(v):
                    flat[f"{prefix}/{name}/{task}"] = float(v)
        elif _is_number(value):
            flat[f"{prefix}/{key}"] = float(value)
    return flat


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten_config(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"optimizer.lr": "0.0002", ...}`` (MLflow's parameters are flat strings)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = str(value)
    return flat


class WandBLogger:
    """Weights & Biases: one run per training run, in ``output_dir/wandb``.

    Args:
        project: the W&B project.
        entity: the team or user (null: the account's default).
        name: the run's display name (null: output_dir's name).
        mode: ``online``, ``offline`` or ``disabled`` (null: ``WANDB_MODE``, else online when an API key is
            configured (``WANDB_API_KEY`` or ``wandb login``), else offline, said at the start; ``wandb sync``
            uploads an offline run later).
        tags: the run's tags.
        log_artifact: at the end, the best checkpoint's weights (adapter or model, with its model card) as a
            ``model`` artifact.
    """

    kind = "wandb"
    library = "wandb"

    def __init__(self, project: str = "mft", entity: str | None = None, name: str | None = None,
                 mode: str | None = None, tags: list[str] | None = None, log_artifact: bool = False):
        if mode not in (None, "online", "offline", "disabled"):
            raise ValueError(f"'mode' is {mode!r}: expected online, offline, disabled or null")
        self.project, self.entity, self.name, self.mode = project, entity, name, mode
        self.tags, self.log_artifact = list(tags or []), log_artifact
        self._run = None

    def problems(self) -> list[tuple[str, str]]:
        return []

    def start(self, output_dir: Path, config: dict, run_id: str | None) -> str:
        import wandb

        mode = self.mode or os.environ.get("WANDB_MODE")
        if mode is None:
            mode = "online" if _wandb_api_key_configured() else "offline"
            if mode == "offline":
                print(f"note: metric_loggers: wandb has no API key (WANDB_API_KEY or `wandb login`): logging offline "
                      f"to {output_dir / 'wandb'}; `wandb sync` uploads it", file=sys.stderr, flush=True)
        self._run = wandb.init(project=self.project, entity=self.entity, name=self.name or output_dir.name,
                               mode=mode, tags=self.tags, dir=str(output_dir), config=config, id=run_id,
                               resume="allow" if run_id else None, settings=wandb.Settings(console="off"))
        return self._run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        self._run.summary.update(values)

    def artifact(self, path: Path) -> None:
        import wandb

        artifact = wandb.Artifact(f"{self._run.id}-{path.name}", type="model")
        for file in _artifact_files(path):
            artifact.add_file(str(file), name=file.name)
        self._run.log_artifact(artifact)

    def finish(self, ok: bool) -> None:
        if self._run is not None:
            self._run.finish(exit_code=0 if ok else 1)


def _wandb_api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class MLflowLogger:
    """MLflow: one run per training run, in an experiment, through ``MlflowClient``.

    Args:
        tracking_uri: where runs go: a tracking server (``http://host:5000``) or a store URI (null: a local
            SQLite store, ``output_dir/mlflow.db``; see it with ``mlflow ui --backend-store-uri sqlite:///...``).
        experiment_name: the experiment (created when missing).
        run_name: the run's name (null: output_dir's name).
        log_artifact: at the end, the best checkpoint's weights (with its model card) as the run's artifacts.

    MLflow allows letters, digits and ``_-. :/`` in metric names: ``pass@1`` is logged as ``pass_at_1``.
    """

    kind = "mlflow"
    library = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment_name: str = "mft", run_name: str | None = None,
                 log_artifact: bool = False):
        self.tracking_uri, self.experiment_name, self.run_name = tracking_uri, experiment_name, run_name
        self.log_artifact = log_artifact
        self._client = self._run_id = None

    def problems(self) -> list[tuple[str, str]]:
        """A tracking server that does not answer (checked now: the run would only warn)."""
        uri = self.tracking_uri
        if not (isinstance(uri, str) and uri.startswith(("http://", "https://"))):
            return []
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except urllib.error.HTTPError:
            return []  # it answered
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            return [("tracking_uri", f"is {uri!r}: no MLflow tracking server answers there ({reason}); start one "
                                     f"(`mlflow server`), fix the address, or leave it out for a local store")]
        return []

    def start(self, output_dir: Path, config: dict, run_id: str | None) -> str:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        local = self.tracking_uri is None
        uri = f"sqlite:///{(output_dir / 'mlflow.db').resolve()}" if local else self.tracking_uri
        self._client = client = MlflowClient(uri)
        params = flatten_config(config)
        if run_id is not None:  # resume: the same run; parameters are immutable, so only the new ones are added
            try:
                logged = client.get_run(run_id).data.params
            except Exception:  # noqa: BLE001 - MlflowException: not in this store (tracking_uri changed)
                print(f"note: metric_loggers: mlflow run {run_id} of the checkpoint is not in {uri}: a new run "
                      "starts there", file=sys.stderr, flush=True)
                run_id = None
            else:
                client.update_run(run_id, status="RUNNING")
                params = {k: v for k, v in params.items() if k not in logged}
        if run_id is None:
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                artifacts = {"artifact_location": (output_dir / "mlartifacts").resolve().as_uri()} if local else {}
                experiment_id = client.create_experiment(self.experiment_name, **artifacts)
            run_id = client.create_run(experiment_id, run_name=self.run_name or output_dir.name).info.run_id
        self._run_id = run_id
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 parameters
            client.log_batch(run_id, params=items[i:i + 100])
        return run_id

    def log(self, values: dict[str, float], step: int) -> None:
        self.log_many([(values, step)])

    def log_many(self, records: list[tuple[dict[str, float], int]]) -> None:
        """Several steps' values in one ``log_batch`` (MLflow takes up to 1000 metrics in one)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for values, step in records for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self._client.log_batch(self._run_id, metrics=metrics[i:i + 1000])

    def summary(self, values: dict[str, Any]) -> None:
        numbers = {f"summary/{k}": v for k, v in values.items() if _is_number(v)}
        self.log(numbers, int(values.get("steps", 0)))
        for key, value in values.items():
            if not _is_number(value):
                self._client.set_tag(self._run_id, f"summary.{key}", str(value))

    def artifact(self, path: Path) -> None:
        for file in _artifact_files(path):
            self._client.log_artifact(self._run_id, str(file), artifact_path=path.name)

    def finish(self, ok: bool) -> None:
        if self._client is not None and self._run_id is not None:
            self._client.set_terminated(self._run_id, status="FINISHED" if ok else "KILLED")


def _mlflow_key(key: str) -> str:
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


def _artifact_files(path: Path) -> list[Path]:
    """A checkpoint's weights and model card, not its recipe state (optimizer moments: as large as the weights
    again, and of no use outside a resume)."""
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("recipe_state"))


LOGGER_NAMES = {"tensorboard": None, "wandb": WandBLogger, "mlflow": MLflowLogger}


# ---------------------------------------------------------------------------------------------------- config


def _entry_logger(entry: Any):
    """A ``metric_loggers`` entry -> (the logger or None for tensorboard, its name); ValueError naming the fault."""
    from mft_components.config.core import COMPONENT_KEY, import_object

    if isinstance(entry, str):
        if entry not in LOGGER_NAMES:
            raise ValueError(f"is {entry!r}: expected one of {', '.join(LOGGER_NAMES)}, or a mapping with "
                             f"'{COMPONENT_KEY}'")
        cls = LOGGER_NAMES[entry]
        return (cls() if cls else None), entry
    if not isinstance(entry, dict) or COMPONENT_KEY not in entry:
        raise ValueError(f"is {entry!r}: expected a logger name ({', '.join(LOGGER_NAMES)}) or a mapping with "
                         f"'{COMPONENT_KEY}'")
    cls = import_object(entry[COMPONENT_KEY])
    args = {k: v for k, v in entry.items() if k != COMPONENT_KEY}
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as e:
        raise ValueError(f"{entry[COMPONENT_KEY]}: {e}; its arguments: "
                         f"{', '.join(inspect.signature(cls).parameters)}") from None
    return cls(**args), getattr(cls, "kind", cls.__name__)


def metric_logger_problems(entries: Any) -> list[str]:
    """What is wrong with a ``metric_loggers`` value, as messages naming the key (empty: nothing)."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        return [f"'metric_loggers' is {entries!r}: expected a list of logger names ({', '.join(LOGGER_NAMES)}) "
                f"or '_component_' mappings"]
    problems = []
    for i, entry in enumerate(entries):
        key = f"metric_loggers[{i}]"
        try:
            logger, name = _entry_logger(entry)
        except Exception as e:  # noqa: BLE001 - an import error, a bad argument: said with the key
            problems.append(f"'{key}' {e}" if str(e).startswith("is ") else f"'{key}': {e}")
            continue
        library = getattr(logger, "library", None)
        if library and importlib.util.find_spec(library) is None:
            problems.append(f"'{key}' ({name}): the {library} package is not installed; pip install 'mft[{library}]'")
            continue
        problems += [f"'{key}.{arg}' {message}" for arg, message in getattr(logger, "problems", list)()]
    return problems


def build_metric_loggers(entries: list | None) -> tuple[list, bool]:
    """(the W&B / MLflow / user loggers of ``metric_loggers``, whether ``tensorboard`` was listed)."""
    loggers, tensorboard = [], False
    for entry in entries or []:
        logger, name = _entry_logger(entry)
        if logger is None:
            tensorboard = True
        else:
            logger.key = name if name not in {getattr(x, "key", None) for x in loggers} else f"{name}#{len(loggers)}"
            loggers.append(logger)
    return loggers, tensorboard


# --------------------------------------------------------------------------------------------------- thread


class ExternalLoggers:
    """Runs the loggers on one background thread: :meth:`log` only puts the record on a queue; the thread sends
    what came in the last ``flush_interval_s`` together (a logger with ``log_many`` gets them in one call).

    Args:
        loggers: from :func:`build_metric_loggers`.
        output_dir: the run's output directory (W&B's files and the local MLflow store go there).
        config: the resolved config, the run's parameters.
        run_ids: logger key -> run id saved in the recipe state of the checkpoint this run resumes (empty: new
            runs).
    """

    flush_interval_s = 1.0

    def __init__(self, loggers: list, output_dir: Path, config: dict, run_ids: dict[str, str] | None = None):
        self._loggers = list(loggers)
        self._ids: dict[str, str] = {}
        self._started = threading.Event()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, args=(Path(output_dir), config, dict(run_ids or {})),
                                        name="mft-metric-loggers", daemon=True)
        self._thread.start()

    def log(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        self._queue.put(("log", kind, step, metrics))

    def summary(self, values: dict[str, Any], artifact_dir: Path | None = None) -> None:
        self._queue.put(("summary", values, artifact_dir))

    def run_ids(self, timeout: float = 120.0) -> dict[str, str]:
        """Logger key -> its run id, for the recipe state (waits for the runs to have started)."""
        self._started.wait(timeout)
        return dict(self._ids)

    def close(self, ok: bool = True, timeout: float = 300.0) -> None:
        """Log what is queued, finish the runs, and end the thread."""
        self._queue.put(("finish", ok))
        self._thread.join(timeout)
        if self._thread.is_alive():
            print(f"warning: metric_loggers: still busy after {timeout:.0f}s at the end of the run; left behind",
                  file=sys.stderr, flush=True)

    def _work(self, output_dir: Path, config: dict, run_ids: dict[str, str]) -> None:
        for logger in list(self._loggers):
            if self._call(logger, "start", "at its start", output_dir, config, run_ids.get(logger.key)):
                self._ids[logger.key] = self._last
        self._started.set()
        last = 0.0
        while True:
            items = [self._queue.get()]
            # Records that come more often than every flush_interval_s go out together: one MLflow transaction
            # for all of them, and fewer turns of this thread holding the GIL while the training thread waits.
            if items[0][0] == "log" and (wait := last + self.flush_interval_s - time.monotonic()) > 0:
                time.sleep(wait)
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            last = time.monotonic()
            try:
                going_on = self._handle(items)
            finally:
                for _ in items:
                    self._queue.task_done()  # queue.join() waits until what was queued is logged
            if not going_on:
                return

    def _handle(self, items: list[tuple]) -> bool:
        """Do the queued things in order; False after the finish."""
        records: list[tuple[dict[str, float], int]] = []
        for item in items:
            if item[0] == "log":
                _, kind, step, metrics = item
                records.append((flatten_metrics(kind, metrics), step))
                continue
            self._log(records)
            records = []
            if item[0] == "summary":
                _, values, artifact_dir = item
                for logger in list(self._loggers):
                    self._call(logger, "summary", "logging the summary", values)
                    if artifact_dir is not None and getattr(logger, "log_artifact", False):
                        self._call(logger, "artifact", f"uploading {artifact_dir}", artifact_dir)
            else:
                for logger in list(self._loggers):
                    self._call(logger, "finish", "at its end", item[1])
                return False
        self._log(records)
        return True

    def _log(self, records: list[tuple[dict[str, float], int]]) -> None:
        for logger in list(self._loggers) if records else ():
            if hasattr(logger, "log_many"):
                self._call(logger, "log_many", f"at steps {records[0][1]}-{records[-1][1]}", records)
                continue
            for values, step in records:
                if not self._call(logger, "log", f"at step {step}", values, step):
                    break

    def _call(self, logger, method: str, when: str, *args) -> bool:
        try:
            self._last = getattr(logger, method)(*args)
            return True
        except Exception as e:  # noqa: BLE001 - any failure of a logger: the run goes on without it
            self._loggers.remove(logger)
            print(f"warning: metric_loggers: {logger.key} failed {when} ({type(e).__name__}: {e}); it is off for the "
                  f"rest of the run (metrics.jsonl keeps every value)", file=sys.stderr, flush=True)
            if method not in ("start", "finish"):  # a started run is closed, marked failed
                try:
                    logger.finish(False)
                except Exception:  # noqa: BLE001 - already reported
                    pass
            return False
