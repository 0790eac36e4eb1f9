"""Zero-shot (and few-shot) tasks through lm-evaluation-harness (``lm_eval``, used as a library).

foldgpt ships task definitions for the five tasks the depth-pruning papers report, named as the harness names them,
that read local files; without those files the harness's own (stock) task of the same name is used, which reads the
Hub data set through ``datasets`` and its cache:

============== ======================================== =============== ========================= ==================
task           local files (under the data folder)       scored split    metrics                   stock task reads
============== ======================================== =============== ========================= ==================
piqa           piqa/valid.jsonl + piqa/valid-labels.lst  validation      acc, acc_norm             baber/piqa
arc_easy       arc/ARC-Easy-{Test,Dev}.jsonl             test            acc, acc_norm             allenai/ai2_arc
arc_challenge  arc/ARC-Challenge-{Test,Dev}.jsonl        test            acc, acc_norm             allenai/ai2_arc
boolq          boolq/val.jsonl                           validation      acc                       aps/super_glue
winogrande     winogrande/dev.jsonl                      validation      acc                       allenai/winogrande
============== ======================================== =============== ========================= ==================

The data folder is ``--data-dir`` / ``$FOLDGPT_DATA``, else ``../shared/data`` beside the working directory (see
``foldgpt.data.text``). A folder given explicitly must hold the files (a missing one is a one-line error naming it);
the default one is used when it does, the stock task otherwise.

Each shipped definition (``foldgpt/eval/tasks/*.yaml``, package data) is the harness's own YAML for the task (lm-eval
0.4.13: the same ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` strings, byte for byte, the same metrics, the
harness's own WinoGrande functions) with only the data source changed to ``dataset_path: json`` and local
``data_files``, so local and stock scores agree on the same documents. The local files are first converted to the
layout of the Hugging Face data sets the harness reads (PIQA's labels joined in, ARC's ``question.stem`` /
``question.choices`` turned into ``question`` / ``choices.text`` / ``choices.label``, BoolQ's ``"true"``/``"false"``
into 1/0); the converted files and the rendered YAMLs go to a cache folder (``task_dir``), which is an ordinary
harness ``include_path``: ``lm_eval --include_path DIR --tasks piqa`` scores the same thing.

Any other name goes to the harness's own registry (its data comes through ``datasets`` and its cache, offline when
``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` is set), and a user can point a task at their own files with a task YAML
of their own: give its path in ``tasks`` (``my_hellaswag.yaml``) or its folder as ``include_path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from foldgpt.data.text import data_dir as default_data_dir
from foldgpt.data.text import data_dir_given
from foldgpt.errors import FoldGPTError
from foldgpt.formats.loading import cache_dir

TEMPLATES = Path(__file__).parent / "tasks"
PLACEHOLDER = "@DATA@"
LM_EVAL_VERSION = "0.4.13"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _piqa(data: Path) -> dict[str, list[dict]]:
    docs = _read_jsonl(data / "piqa" / "valid.jsonl")
    labels = [line.strip() for line in (data / "piqa" / "valid-labels.lst").read_text().splitlines() if line.strip()]
    if len(labels) != len(docs):
        raise FoldGPTError(f"{data / 'piqa'}: valid.jsonl has {len(docs)} records but valid-labels.lst {len(labels)} labels; "
                           "they must match line by line")
    return {"validation": [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(label)}
                           for d, label in zip(docs, labels)]}


def arc_record(record: dict) -> dict:
    """An official ARC jsonl record in the Hugging Face ``allenai/ai2_arc`` layout (labels and key unchanged)."""
    choices = record["question"]["choices"]
    return {"id": record["id"], "question": record["question"]["stem"],
            "choices": {"text": [c["text"] for c in choices], "label": [c["label"] for c in choices]},
            "answerKey": record["answerKey"]}


def _arc(subset: str) -> Callable[[Path], dict[str, list[dict]]]:
    def convert(data: Path) -> dict[str, list[dict]]:
        return {split: [arc_record(r) for r in _read_jsonl(data / "arc" / f"ARC-{subset}-{name}.jsonl")]
                for split, name in (("validation", "Dev"), ("test", "Test"))}
    return convert


def _boolq(data: Path) -> dict[str, list[dict]]:
    labels = {"false": 0, "true": 1}
    docs = []
    for record in _read_jsonl(data / "boolq" / "val.jsonl"):
        label = str(record["label"]).lower()
        if label not in labels:
            raise FoldGPTError(f"{data / 'boolq' / 'val.jsonl'}: label {record['label']!r} is not 'true' or 'false'")
        docs.append({"question": record["question"], "passage": record["passage"], "idx": record.get("idx"), "label": labels[label]})
    return {"validation": docs}


def _winogrande(data: Path) -> dict[str, list[dict]]:
    return {"validation": _read_jsonl(data / "winogrande" / "dev.jsonl")}


@dataclass(frozen=True)
class ShippedTask:
    """A task foldgpt ships: its source files (relative to the data folder), their conversion, and the harness folder
    (under ``lm_eval/tasks``) that holds its stock definition."""

    files: tuple[str, ...]
    convert: Callable[[Path], dict[str, list[dict]]]
    harness_folder: str


SHIPPED_TASKS: dict[str, ShippedTask] = {
    "piqa": ShippedTask(("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa, "piqa"),
    "arc_easy": ShippedTask(("arc/ARC-Easy-Test.jsonl", "arc/ARC-Easy-Dev.jsonl"), _arc("Easy"), "arc"),
    "arc_challenge": ShippedTask(("arc/ARC-Challenge-Test.jsonl", "arc/ARC-Challenge-Dev.jsonl"), _arc("Challenge"), "arc"),
    "boolq": ShippedTask(("boolq/val.jsonl",), _boolq, "super_glue/boolq"),
    "winogrande": ShippedTask(("winogrande/dev.jsonl",), _winogrande, "winogrande"),
}
DEFAULT_TASKS = tuple(SHIPPED_TASKS)
LOCAL, STOCK = "local", "lm-eval"


def _resolve_data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir).expanduser().resolve() if data_dir is not None else default_data_dir().resolve()


def _missing_files(name: str, data: Path) -> list[Path]:
    return [data / relative for relative in SHIPPED_TASKS[name].files if not (data / relative).is_file()]


def task_sources(tasks: Sequence[str], data_dir: str | Path | None = None) -> dict[str, str]:
    """Where each shipped task in ``tasks`` comes from: ``local`` (the shipped definition on the data folder's files)
    or ``lm-eval`` (the harness's stock task, its data from the Hub). With a data folder given (``data_dir``, or
    ``--data-dir`` / ``$FOLDGPT_DATA``) every shipped task is local, and ``task_dir`` reports missing files."""
    explicit = data_dir is not None or data_dir_given()
    data = _resolve_data_dir(data_dir)
    return {name: LOCAL if explicit or not _missing_files(name, data) else STOCK for name in tasks if name in SHIPPED_TASKS}


def _write_if_changed(path: Path, text: str) -> None:
    """Keep the file (and its mtime, so the ``datasets`` cache stays valid) when the content is the same."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def task_dir(tasks: Sequence[str] = DEFAULT_TASKS, data_dir: str | Path | None = None, out: str | Path | None = None) -> Path:
    """Render the shipped definitions of ``tasks`` against the local data: a harness ``include_path`` folder.

    ``data_dir`` defaults to ``foldgpt.data.data_dir()`` (``$FOLDGPT_DATA``, else ``../shared/data``); ``out`` to a
    folder per data folder in foldgpt's cache (``$FOLDGPT_CACHE/lm_tasks/``). Files are rewritten only when their
    content changes. Raises a one-line ``FoldGPTError`` naming the path when a data file is missing.
    """
    unknown = [name for name in tasks if name not in SHIPPED_TASKS]
    if unknown:
        raise FoldGPTError(f"no shipped definition for {', '.join(unknown)}; shipped: {', '.join(SHIPPED_TASKS)}")
    data = _resolve_data_dir(data_dir)
    if not data.is_dir():
        raise FoldGPTError(f"data folder {data} does not exist; give the folder that holds piqa/, arc/, boolq/ and winogrande/ "
                           "with --data-dir (or $FOLDGPT_DATA)")
    for name in tasks:
        for path in _missing_files(name, data):
            raise FoldGPTError(f"task {name} needs {path}, which is missing; point --data-dir (or $FOLDGPT_DATA) "
                               "at the folder that holds it")
    if out is None:
        out = cache_dir() / "lm_tasks" / hashlib.sha1(str(data).encode()).hexdigest()[:12]
    out = Path(out)
    for name in tasks:
        for split, docs in SHIPPED_TASKS[name].convert(data).items():
            _write_if_changed(out / "data" / f"{name}.{split}.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
        template = (TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8")
        _write_if_changed(out / f"{name}.yaml", template.replace(PLACEHOLDER, str((out / "data").resolve())))
    if "arc_challenge" in tasks and "arc_easy" not in tasks:  # arc_challenge.yaml includes arc_easy.yaml
        template = (TEMPLATES / "arc_easy.yaml").read_text(encoding="utf-8")
        _write_if_changed(out / "arc_easy.yaml", template.replace(PLACEHOLDER, str((out / "data").resolve())))
    return out


@dataclass
class TaskResults:
    """What lm-eval reported for each task: its metrics (``acc``, ``acc_norm``, ... and their ``_stderr``)."""

    metrics: dict[str, dict[str, float | None]]
    samples: dict[str, int]
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    def rows(self) -> list[tuple[str, str, float | None, float | None]]:
        """(task, metric, value, stderr) for every metric, tasks in the order given."""
        rows = []
        for task, metrics in self.metrics.items():
            for metric, value in metrics.items():
                if not metric.endswith("_stderr"):
                    rows.append((task, metric, value, metrics.get(f"{metric}_stderr")))
        return rows

    def to_dict(self) -> dict:
        return asdict(self)


def _quiet_harness() -> None:
    """The harness logs every task it indexes; keep its errors only."""
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _harness_tasks_folder() -> Path:
    """lm-eval's own task folder, found without importing lm_eval (its import takes seconds)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FoldGPTError("foldgpt eval --tasks needs lm-evaluation-harness: pip install lm-eval==" + LM_EVAL_VERSION)
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def _names_found_nowhere(names: Sequence[str], folders: Sequence[Path]) -> list[str]:
    """The names that occur in no task YAML under ``folders`` (a fast text scan, before the harness's slow index)."""
    pending = set(names)
    for folder in folders:
        for path in folder.rglob("*.yaml"):
            text = path.read_text(encoding="utf-8", errors="replace")
            pending = {name for name in pending if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)}
            if not pending:
                return []
    return sorted(pending)


def _unknown(names: Sequence[str]) -> FoldGPTError:
    return FoldGPTError(f"unknown task {', '.join(names)}; shipped: {', '.join(SHIPPED_TASKS)}; or any lm-eval task name "
                        "(lm-eval ls tasks) whose data is in the Hugging Face cache, a task YAML file, or --include-path DIR")


def task_manager(tasks: Sequence[str], data_dir: str | Path | None = None,
                 include_path: str | Path | Sequence[str | Path] | None = None):
    """The harness ``TaskManager`` for ``tasks``: the rendered shipped definitions (or, without their local files, the
    harness's stock definitions of those tasks), the user's include paths (which override tasks of the same name), and
    the harness's whole registry only when a task needs it (indexing it takes about 20 s). Bad names, missing files
    and folders fail here, with one line, before any model is loaded."""
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, Path)) else list(include_path)
    for path in extra:
        if not Path(path).is_dir():
            raise FoldGPTError(f"include path {path} is not a folder; give a folder of lm-eval task YAMLs")
    for name in tasks:
        if name.endswith((".yaml", ".yml")) and not Path(name).is_file():
            raise FoldGPTError(f"task file {name} does not exist; give an lm-eval task YAML")
    sources = task_sources(tasks, data_dir)
    local_names = [name for name, source in sources.items() if source == LOCAL]
    stock = list(dict.fromkeys(_harness_tasks_folder() / SHIPPED_TASKS[name].harness_folder
                               for name, source in sources.items() if source == STOCK))
    own = ([task_dir(local_names, data_dir)] if local_names else []) + [Path(p) for p in extra]
    others = [name for name in tasks if name not in SHIPPED_TASKS and not name.endswith((".yaml", ".yml"))]
    unknown = _names_found_nowhere(others, [_harness_tasks_folder(), *own])
    if unknown:
        raise _unknown(unknown)
    _quiet_harness()
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    includes = [*stock, *own]  # later folders override earlier ones: the user's own last
    local = TaskManager(include_path=includes or None, include_defaults=False)
    if all(name in local.all_tasks for name in others):
        return local
    full = TaskManager(include_path=own or None, include_defaults=True)  # the defaults hold the stock folders
    unknown = [name for name in others if name not in full.all_tasks]
    if unknown:
        raise _unknown(unknown)
    return full


def _check_loadable(manager, tasks: Sequence[str], data_dir: str | Path | None = None) -> None:
    """Load every task that reads Hub data once, so that data missing (offline and not cached, gated, ...) fails with
    one line before any scoring."""
    sources = task_sources(tasks, data_dir)
    for name in tasks:
        if sources.get(name) == LOCAL:
            continue
        try:
            manager.load([name])
        except Exception as error:  # datasets raises many types offline
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            if name in SHIPPED_TASKS:
                missing = _missing_files(name, _resolve_data_dir(data_dir))[0]
                raise FoldGPTError(f"task {name}: no local file {missing}, and lm-eval's stock {name} cannot load its Hub "
                                   f"data ({type(error).__name__}: {first}); give --data-dir DIR (or $FOLDGPT_DATA) with "
                                   "the shared data, or reach the Hub once (the data then stays in the datasets cache)") from error
            raise FoldGPTError(f"task {name} cannot load its data ({type(error).__name__}: {first}); reach the Hub once "
                               "(or put the data in the Hugging Face cache), or point the task at local files with a task YAML "
                               "(dataset_path: json, dataset_kwargs.data_files) given as --tasks FILE.yaml or --include-path DIR") from error


def harness_model(model, tokenizer, batch_size: int = 1):
    """An lm-eval ``HFLM`` around an already loaded model (a plain HF model or a peft ``PeftModel``)."""
    _quiet_harness()
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def evaluate_tasks(
    model,
    tokenizer,
    tasks: Sequence[str] = DEFAULT_TASKS,
    *,
    limit: int | None = None,
    num_fewshot: int | None = 0,
    batch_size: int = 1,
    data_dir: str | Path | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    manager=None,
) -> TaskResults:
    """Score ``model`` on ``tasks`` with ``lm_eval.simple_evaluate``; acc / acc_norm as the harness reports them.

    ``limit``: the first N documents of each task (quick runs). ``num_fewshot``: 0 by default; None keeps each task's
    own setting. ``batch_size``: requests per forward pass. ``manager``: a ``task_manager(...)`` made beforehand.
    """
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise FoldGPTError("give at least one task, e.g. --tasks piqa,arc_easy")
    manager = manager or task_manager(tasks, data_dir, include_path)
    _check_loadable(manager, tasks, data_dir)
    import datasets  # noqa: PLC0415
    import lm_eval  # noqa: PLC0415
    import lm_eval.evaluator  # noqa: PLC0415

    datasets.disable_progress_bars()
    start = time.perf_counter()
    git_hash = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = lambda: None  # it runs `git describe` in the cwd and prints git's errors
    try:
        output = lm_eval.simple_evaluate(model=harness_model(model, tokenizer, batch_size), tasks=tasks, num_fewshot=num_fewshot,
                                         limit=limit, task_manager=manager, log_samples=False, batch_size=batch_size)
    finally:
        lm_eval.evaluator.get_git_commit_hash = git_hash
    seconds = time.perf_counter() - start
    metrics, samples = {}, {}
    for task, values in output["results"].items():
        metrics[task] = {key.split(",")[0]: float(value) if value != "N/A" else None
                         for key, value in values.items() if "," in key and isinstance(value, (int, float, str)) and key != "alias"}
        samples[task] = int(output.get("n-samples", {}).get(task, {}).get("effective", 0))
    settings = {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
                "data_dir": str(_resolve_data_dir(data_dir)), "sources": task_sources(tasks, data_dir), "lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else LM_EVAL_VERSION}
    return TaskResults(metrics=metrics, samples=samples, settings=settings, seconds=seconds)


def format_table(results: TaskResults) -> str:
    """The results as a text table: task, metric, value, stderr."""
    lines = [f"{'task':<16}{'metric':<10}{'value':>8}{'stderr':>9}", "-" * 43]
    for task, metric, value, stderr in results.rows():
        shown = "" if stderr is None else f"{stderr:.4f}"
        number = "n/a" if value is None else f"{value:.4f}"
        lines.append(f"{task:<16}{metric:<10}{number:>8}{shown:>9}")
    samples = ", ".join(f"{task} {n}" for task, n in results.samples.items())
    lines.append(f"documents: {samples}; {results.settings.get('num_fewshot')}-shot; {results.seconds:.0f}s")
    return "\n".join(lines)
