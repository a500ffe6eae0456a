"""lm-evaluation-harness on the loaded model: standard benchmarks scored in-process, under a plan on the masked
model, into the same :class:`EvalResult` (and so the same sweep-table rows) as MoEScope's own tasks.

lm-eval (``pip install 'moescope[lm-eval]'``) is imported only here and only when a task is run. Its ``HFLM``
wraps the already loaded ``transformers`` model and tokenizer; masking (``core.masking.masked``) is the only thing
between lm-eval and the model. Tasks come from lm-eval's registry or from ``include`` folders of task YAMLs
(``sample_data/lm_eval`` ships some over local JSONL files); relative ``data_files`` in such a YAML are read
from the YAML's own folder. Results are cached by (weights digest, task, include folder, limit, shots, plan
digest). Task names carry the prefix :data:`PREFIX` wherever they sit beside MoEScope's own tasks.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import MoEScopeError
from ..masking import masked
from ..model import MoEModel
from ..plan import Plan
from .harness import ResultCache
from .result import EvalResult, plan_cost

PREFIX = "lm_eval:"  # "lm_eval:arc_easy" in a sweep's --tasks, and in a result row's eval_task
INSTALL_HINT = "lm-eval is not installed; install it with: pip install 'moescope[lm-eval]'"
METRIC_KIND = "lm_eval"


def is_lm_eval_task(name: str) -> bool:
    return name.startswith(PREFIX)


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise MoEScopeError(INSTALL_HINT) from None
    return HFLM, TaskManager


def _resolve_data_files(config: dict[str, Any], base: Path) -> dict[str, Any]:
    """``config`` with relative ``dataset_kwargs.data_files`` made absolute against ``base`` (the YAML's folder)."""
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        return config
    config = copy.deepcopy(config)

    def absolute(path: str) -> str:
        return path if "://" in path or Path(path).is_absolute() else str((base / path).resolve())

    if isinstance(files, str):
        resolved: Any = absolute(files)
    elif isinstance(files, list):
        resolved = [absolute(f) for f in files]
    else:
        resolved = {k: absolute(v) if isinstance(v, str) else [absolute(f) for f in v] for k, v in files.items()}
    config["dataset_kwargs"]["data_files"] = resolved
    return config


def _missing_data_message(name: str, dataset: str, exc: BaseException) -> str:
    first = (str(exc).splitlines() or [""])[0][:200]
    return (f"lm-eval task {name!r}: its dataset {dataset!r} could not be loaded ({type(exc).__name__}: {first}); "
            f"offline, put the data in local JSON/JSONL/Parquet files, point a task YAML at them "
            f"(dataset_path: json, dataset_kwargs.data_files; see sample_data/lm_eval/) and pass its folder "
            f"with --lm-eval-include DIR.")


class LmEvalRunner:
    """Runs lm-eval tasks on one loaded model (masked under a plan), caching results by digest."""

    def __init__(self, mm: MoEModel, include: Sequence[str | Path] = (), batch_size: int | str = "auto",
                 cache_size: int = 64) -> None:
        HFLM, TaskManager = require_lm_eval()
        if mm.tokenizer is None:
            raise MoEScopeError("lm-eval needs the model's tokenizer; load a model folder that has one.")
        self.mm = mm
        self.include = [Path(p).expanduser().resolve() for p in include]
        for folder in self.include:
            if not folder.is_dir():
                raise MoEScopeError(f"--lm-eval-include {folder} is not a folder of lm-eval task YAMLs.")
        self.batch_size = batch_size
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        self.tasks = TaskManager(include_path=[str(p) for p in self.include] or None)
        self.lm = HFLM(pretrained=mm.model, tokenizer=mm.tokenizer, batch_size=batch_size)
        self._results = ResultCache(cache_size)
        self._digest = mm.weights_digest()

    # ----- tasks --------------------------------------------------------------------------------------------
    def check_tasks(self, names: Sequence[str]) -> None:
        """Refuse unknown task names in one line, before anything runs."""
        names = [n[len(PREFIX):] if is_lm_eval_task(n) else n for n in names]
        unknown = [n for n in names if self.tasks._entry(n) is None]
        if unknown:
            where = f" or in {', '.join(map(str, self.include))}" if self.include else ""
            raise MoEScopeError(f"lm-eval has no task {', '.join(map(repr, unknown))} in its registry{where}; "
                                f"see `python -m lm_eval ls tasks`, or pass a folder of task YAMLs with "
                                f"--lm-eval-include DIR.")

    def _spec(self, name: str) -> str | dict[str, Any]:
        """The task as lm-eval should load it: its YAML config with local paths resolved when it is one of ours."""
        entry = self.tasks._entry(name)
        path = getattr(entry, "yaml_path", None)
        if path is not None and entry.cfg and any(Path(path).resolve().is_relative_to(p) for p in self.include):
            from lm_eval.tasks._yaml_loader import load_yaml

            config = load_yaml(Path(path), resolve_func=True)
            if "task" in config and "dataset_path" in config:
                return _resolve_data_files(config, Path(path).parent)
        return name

    def _dataset_of(self, name: str) -> str:
        entry = self.tasks._entry(name)
        cfg = getattr(entry, "cfg", None) or {}
        return str(cfg.get("dataset_path") or name)

    # ----- evaluation ---------------------------------------------------------------------------------------
    def evaluate(self, name: str, plan: Plan | None = None, limit: int | None = None,
                 num_fewshot: int | None = None) -> list[EvalResult]:
        """One :class:`EvalResult` per lm-eval task ``name`` expands to (a group gives several), each with
        every metric lm-eval reports and its stderr as ``METRIC_stderr``."""
        name = name[len(PREFIX):] if is_lm_eval_task(name) else name
        self.check_tasks([name])
        key = (self._digest, name, tuple(map(str, self.include)), limit, num_fewshot, plan.digest() if plan else None)
        cached = self._results.get(key)
        if cached is not None:
            return cached
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        with self.mm.lock, torch.inference_mode(), masked(self.mm, plan):
            try:
                output = simple_evaluate(model=self.lm, tasks=[self._spec(name)], task_manager=self.tasks,
                                         limit=limit, num_fewshot=num_fewshot, log_samples=False,
                                         batch_size=self.batch_size)
            except Exception as exc:  # noqa: BLE001 - datasets raises many types for data it cannot reach
                if _is_missing_data(exc):
                    raise MoEScopeError(_missing_data_message(name, self._dataset_of(name), exc)) from None
                raise
        seconds = time.perf_counter() - start
        results = _to_results(output, plan, seconds, plan_cost(self.mm, plan))
        for result in results:  # a result row names the weights it scored (task, metric, value, stderr, digests)
            result.weights_digest = self._digest
        self._results.put(key, results)
        return results


def _is_missing_data(exc: BaseException) -> bool:
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"DatasetNotFoundError", "FileNotFoundError", "ConnectionError", "OfflineModeIsEnabled",
                         "LocalEntryNotFoundError", "HFValidationError", "DataFilesNotFoundError",
                         "EmptyDatasetError"})


def _to_results(output: dict[str, Any], plan: Plan | None, seconds: float,
                cost: dict[str, float]) -> list[EvalResult]:
    """lm-eval's ``results`` (``{"acc,none": 0.6, "acc_stderr,none": 0.11, ...}`` per task) as EvalResults."""
    results = []
    samples = output.get("n-samples", {})
    for task, values in output["results"].items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue  # alias, or "N/A" stderr
            label = metric if filt == "none" else f"{metric}_{filt}"
            if metric.endswith("_stderr"):
                base = metric[: -len("_stderr")]
                label = f"{base}_stderr" if filt == "none" else f"{base}_{filt}_stderr"
            metrics[label] = float(value)
        n = samples.get(task, {}).get("effective", 0)
        results.append(EvalResult(task=PREFIX + task, split=str(output.get("configs", {}).get(task, {})
                                                                .get("test_split") or "test"),
                                  metric_kind=METRIC_KIND, n_examples=int(n), metrics=metrics, cost=dict(cost),
                                  plan_digest=plan.digest() if plan else None, seconds=seconds))
    return results


def run_lm_eval(mm: MoEModel, tasks: Sequence[str], plan: Plan | None = None, include: Sequence[str | Path] = (),
                limit: int | None = None, num_fewshot: int | None = None, batch_size: int | str = "auto",
                progress: Callable[[str, int, int], None] | None = None,
                runner: LmEvalRunner | None = None) -> list[EvalResult]:
    """Score ``tasks`` (lm-eval names, with or without :data:`PREFIX`) on ``mm`` (masked under ``plan``);
    pass a ``runner`` to reuse its wrapped model and cached results (the dashboard keeps one per model)."""
    runner = runner or LmEvalRunner(mm, include=include, batch_size=batch_size)
    names = [t[len(PREFIX):] if is_lm_eval_task(t) else t for t in tasks]
    runner.check_tasks(names)
    results: list[EvalResult] = []
    for done, name in enumerate(names):
        if progress:
            progress(name, done, len(names))
        results.extend(runner.evaluate(name, plan=plan, limit=limit, num_fewshot=num_fewshot))
    if progress:
        progress("done", len(names), len(names))
    return results


class LmEvalStopped(MoEScopeError):
    """Raised inside lm-eval's model call when a Stop was asked for; the task's partial work is dropped."""


class LmEvalJob:
    """lm-eval tasks for a plan and for the full model, in a background thread, with progress counted per model
    call (one batch of requests) and a Stop that takes effect at the next batch. Results land in the runner's
    cache, so a second job with the same digests finishes without calling lm-eval."""

    def __init__(self, runner: LmEvalRunner, tasks: Sequence[str], plan: Plan | None, limit: int | None) -> None:
        self.runner, self.tasks, self.plan, self.limit = runner, list(tasks), plan, limit
        self.stop_event = threading.Event()
        self.batches, self.stage, self.error = 0, "starting", None
        self.pruned: list[EvalResult] = []
        self.full: list[EvalResult] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "LmEvalJob":
        self.thread.start()
        return self

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.stop_event.set()

    def _counted(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.stop_event.is_set():
                raise LmEvalStopped("Stopped: lm-eval was interrupted between batches; finished tasks are kept.")
            self.batches += 1
            return call(*args, **kwargs)
        return wrapper

    def _run(self) -> None:
        lm = self.runner.lm
        originals = {n: getattr(lm, n) for n in ("_model_call", "_model_generate")}
        for name, call in originals.items():
            setattr(lm, name, self._counted(call))
        try:
            for name in self.tasks:
                for plan, into in ((self.plan, self.pruned), (None, self.full)):
                    if self.stop_event.is_set():
                        raise LmEvalStopped("Stopped between tasks; finished tasks are kept.")
                    self.stage = f"{name} ({'full model' if plan is None else 'plan'})"
                    into.extend(self.runner.evaluate(name, plan=plan, limit=self.limit))
            self.stage = "done"
        except Exception as exc:  # noqa: BLE001 - shown on the page as one line
            self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.stage = "stopped" if isinstance(exc, LmEvalStopped) else "failed"
        finally:
            for name in originals:
                vars(lm).pop(name, None)  # back to the class's methods


def comparison_rows(pruned: Sequence[EvalResult], full: Sequence[EvalResult]) -> list[dict[str, Any]]:
    """One row per task and metric: the plan's value ± stderr beside the full model's, and the change."""
    full_by_task = {r.task: r for r in full}
    rows = []
    for result in pruned:
        reference = full_by_task.get(result.task)
        for metric, value in result.metrics.items():
            if metric.endswith("_stderr"):
                continue
            base = reference.metrics.get(metric) if reference else None
            rows.append({"task": result.task, "metric": metric, "pruned": value,
                         "stderr": result.metrics.get(f"{metric}_stderr"), "full": base,
                         "delta": None if base is None else value - base})
    return rows
