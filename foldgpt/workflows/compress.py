"""The whole FoldGPT pipeline, top to bottom, resumable stage by stage.

    dense evaluation -> analysis -> gated removal -> grouped sharing -> healing -> evaluation -> plain folder
    -> summary + report (-> GGUF file)

The settings are one ``CompressConfig`` (``foldgpt.workflows.config``): a section per concern (``gates``, ``heal``,
...), read from a YAML ``--config`` file, keyword arguments or the command line by the same dataclasses. Each stage
writes ``DIR/<stage>/`` atomically and then ``DIR/<stage>/stage.json``, which records a hash of the sections the stage
depends on (``settings_for``) and of the stage before it. A rerun skips every stage whose hash still matches, so a
crashed or interrupted run continues where it stopped, and a changed setting redoes only the stages it affects.
Healing additionally checkpoints inside its stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from foldgpt.analysis.redundancy import write_analysis
from foldgpt.core.outputs import METADATA_FILE, atomic_output_dir, read_metadata, write_json_atomic
from foldgpt.core.settings import from_mapping, nest, to_mapping
from foldgpt.errors import FoldGPTError
from foldgpt.eval.config import EvalConfig
from foldgpt.eval.efficiency import measure_efficiency
from foldgpt.eval.lm_tasks import evaluate_tasks
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.compact import save_compact
from foldgpt.formats.gguf_export import check_model_family, check_tokenizer_file, export_gguf
from foldgpt.formats.loading import LoadedModel, load_config, load_model, resolve_model_path
from foldgpt.formats.plain import export_plain
from foldgpt.healing.loop import heal
from foldgpt.surgery.budget import blocks_to_remove_with_sharing
from foldgpt.workflows.analyze import analyze
from foldgpt.workflows.config import CompressConfig
from foldgpt.workflows.fold import fold_model
from foldgpt.workflows.fold_plan import fold_auto
from foldgpt.workflows.prune import prune
from foldgpt.workflows.report import write_report

__all__ = ["CompressConfig", "compress", "compress_config", "config_from_file", "run_pipeline", "settings_for"]

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
STAGE_FILE = "stage.json"
GGUF_FILE = "model.gguf"
NOT_SETTINGS = ("out", "overwrite", "config")

STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "dense": ("loading", "eval"),
    "analysis": ("loading", "calibration"),
    "pruned": ("loading", "calibration", "selection", "target", "replacement", "gates", "probe", "sharing"),
    "folded": ("sharing", "ties"),
    "healed": ("heal",),
    "final": ("eval",),
    "plain": (),
    "gguf": ("deploy",),
}
"""The sections each stage depends on (``settings_for`` narrows "pruned"'s); no other setting invalidates it."""
STAGES = tuple(STAGE_SECTIONS)


def compress(model: str, out: str | Path, config: str | Path | None = None, overwrite: bool = False, **options: Any) -> dict:
    """Run (or resume) the whole pipeline on ``model`` into ``out``; return the summary.

    Settings: keywords by their command-line names (``group_size=2``, ``heal_steps=200``, ``remove=8``) or by section
    (``heal={"steps": 200}``, ``gates=GateConfig(steps=40)``), over a YAML ``config``, over the defaults.
    ``overwrite`` starts from scratch instead of resuming.
    """
    base = config_from_file(config) if config else CompressConfig()
    return run_pipeline(compress_config({**options, "model": model}, "compress()", base), out, overwrite)


def compress_config(options: Mapping[str, Any], origin: str, base: CompressConfig | None = None) -> CompressConfig:
    """``base`` (default: the defaults) with ``options`` applied: sections or flat names, checked with one-line errors
    that start with ``origin``."""
    options = {str(key).replace("-", "_"): value for key, value in options.items()}
    for key in NOT_SETTINGS:
        if key in options:
            raise FoldGPTError(f"{origin}: '{key}' is not a setting; give it on the command line (--{key})")
    return from_mapping(CompressConfig, nest(CompressConfig, options, origin=origin), origin=origin, base=base)


def config_from_file(path: str | Path) -> CompressConfig:
    """The settings of a YAML file (a previous run's ``config.yaml``, or any subset, nested or flat) over the defaults."""
    path = Path(path)
    if not path.is_file():
        raise FoldGPTError(f"config file '{path}' does not exist; give the path of a YAML file (e.g. a previous run's config.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise FoldGPTError(f"config file '{path}' is not valid YAML: {str(error).splitlines()[0]}") from error
    if not isinstance(data, dict):
        raise FoldGPTError(f"config file '{path}' must be a mapping of settings (key: value), not a {type(data).__name__}")
    return compress_config(data, f"config '{path}'")


@dataclass
class StageResult:
    """Where a stage's output lives, its chained hash, and whether this run computed it or found it done."""

    name: str
    folder: Path
    key: str
    skipped: bool


def settings_for(stage: str, config: CompressConfig) -> dict[str, Any]:
    """The sections of ``config`` that ``stage`` depends on, as plain data (hashed into its key).

    ``--fold auto``'s choice ("folded") depends on the heal when it probes with it. The removal ("pruned") depends on
    the sharing only through ``--target-params`` (and then not on the parent), on
    the gates only when they choose, and on the probe only as far as it runs: all of it when probes heal (with the
    heal's data, window length and seed they heal with), the screen's size and pool when it screens alone, else nothing.
    """
    sections = {name: to_mapping(getattr(config, name), excluded(name)) for name in STAGE_SECTIONS[stage]}
    if "sharing" in sections and config.sharing.fold == "off":  # runs from before --fold keep their keys
        sections["sharing"] = {key: value for key, value in sections["sharing"].items() if key != "fold"}
        sections.pop("ties", None)
    elif "ties" in sections and (fold_probe := config.fold_probe()) is not None:  # it heals as the heal will
        sections["fold_probe"] = asdict(fold_probe)
    if stage != "pruned":
        return sections
    if config.replacement.replace == "none":  # plain removal: runs from before the setting keep their key
        del sections["replacement"]
    if config.target.target_params is None:
        del sections["sharing"]
    else:
        sections["sharing"] = {key: sections["sharing"][key] for key in ("group_size", "groups")}
    if config.selection.method != "gates":
        del sections["gates"], sections["probe"]
        return sections
    if config.gates.readout == "final":  # the readout from before the setting: those runs keep their key
        sections["gates"] = {key: value for key, value in sections["gates"].items() if key != "readout"}
    if (probe := config.probe_config()) is not None and config.probes_heal:
        sections["probe"] = asdict(probe)
    elif config.screens_only:
        sections["probe"] = {"screen_only": True, "screen": config.probe.screen, "pool": config.probe.pool}
    else:
        del sections["probe"]
    return sections


def excluded(section: str) -> tuple[str, ...]:
    """The settings a section of ``CompressConfig`` leaves out (``loading`` has no ``device_map``)."""
    return CompressConfig.__dataclass_fields__[section].metadata["section"].exclude


def stage_key(stage: str, config: CompressConfig, upstream: str) -> str:
    payload = json.dumps({"stage": stage, "settings": settings_for(stage, config), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_stage(out: Path, stage: str, config: CompressConfig, upstream: str, build: Callable[[Path], dict]) -> StageResult:
    """Run ``build(folder)`` unless ``out/stage`` already holds a result for the same settings and inputs.

    ``build`` must create ``folder`` atomically (every foldgpt writer does) and returns facts for ``stage.json``.
    ``stage.json`` is written last, so a stage interrupted before it is simply redone.
    """
    folder = out / stage
    key = stage_key(stage, config, upstream)
    marker = folder / STAGE_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        print(f"[{stage}] done in an earlier run with the same settings: skipped", flush=True)
        return StageResult(stage, folder, key, skipped=True)
    print(f"[{stage}] running", flush=True)
    start = time.perf_counter()
    facts = build(folder)
    write_json_atomic(marker, {"stage": stage, "key": key, "upstream": upstream, "settings": settings_for(stage, config),
                               "seconds": time.perf_counter() - start, **facts})
    return StageResult(stage, folder, key, skipped=False)


def run_pipeline(config: CompressConfig, out: str | Path, overwrite: bool = False) -> dict:
    """Run (or resume) every stage with ``config``; return the summary."""
    out = Path(out)
    _check_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(to_mapping(config), sort_keys=False))
    if config.deploy.gguf:  # refused now, not after hours of pruning and healing
        source = resolve_model_path(config.loading.model, config.loading.trust_remote_code)
        check_model_family(load_config(source, config.loading.trust_remote_code))
        if source.is_dir():
            check_tokenizer_file(source)
    teacher: list[LoadedModel] = []

    def dense_model() -> LoadedModel:
        if not teacher:
            teacher.append(load_model(config.loading.model, dtype=config.loading.dtype, device=config.loading.device,
                      trust_remote_code=config.loading.trust_remote_code))
        return teacher[0]

    dense = run_stage(out, "dense", config, "", lambda folder: _evaluate_into(folder, dense_model(), config.eval))
    analysis = run_stage(out, "analysis", config, "", lambda folder: _analyze_into(folder, dense_model(), config))
    pruned = run_stage(out, "pruned", config, "", lambda folder: _prune_into(folder, config))
    folded = run_stage(out, "folded", config, pruned.key, lambda folder: _fold_into(folder, pruned.folder, config, dense_model))
    last = folded
    if config.heals:
        checkpoint = out / f".healed-{folded.key[:12]}.checkpoint"
        last = run_stage(out, "healed", config, folded.key,
                         lambda folder: _heal_into(folder, folded.folder, dense_model(), config, checkpoint))
    final = run_stage(out, "final", config, last.key,
                      lambda folder: _evaluate_into(folder, _load(last.folder, config), config.eval))
    plain = run_stage(out, "plain", config, last.key, lambda folder: _plain_into(folder, last.folder, config))
    summary = _summary(out, config, dense, analysis, pruned, folded, last, final)
    summary["plain_model"] = str(plain.folder)
    summary["stages"]["plain"] = {"skipped": plain.skipped,
                                  "seconds": json.loads((plain.folder / STAGE_FILE).read_text())["seconds"]}
    if config.deploy.gguf:
        exported = run_stage(out, "gguf", config, last.key, lambda folder: _gguf_into(folder, last.folder, config))
        summary["gguf"] = str(exported.folder / GGUF_FILE)
        summary["stages"]["gguf"] = {"skipped": exported.skipped,
                                     "seconds": json.loads((exported.folder / STAGE_FILE).read_text())["seconds"]}
    write_json_atomic(out / SUMMARY_FILE, summary)
    _write_report(out)
    print(format_summary(summary))
    return summary


def _check_output(out: Path, overwrite: bool) -> None:
    """Resume a folder written by compress; refuse any other existing folder unless ``overwrite`` (then start afresh)."""
    if out.exists() and overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    elif out.exists() and not (out.is_dir() and ((out / CONFIG_FILE).is_file() or not any(out.iterdir()))):
        raise FoldGPTError(f"output '{out}' exists and was not written by foldgpt compress; choose another --out or pass --overwrite")


def _load(folder: Path, config: CompressConfig) -> LoadedModel:
    return load_model(str(folder), dtype=config.loading.dtype, device=config.loading.device,
                      trust_remote_code=config.loading.trust_remote_code)


def evaluate_model(loaded: LoadedModel, config: EvalConfig) -> dict:
    """Perplexity on each ``ppl`` set (and, when asked, zero-shot tasks and efficiency figures) of one model."""
    results: dict[str, Any] = {"model": loaded.source, "perplexity": {}}
    for name in config.perplexity_sets:
        result = perplexity(loaded.model, loaded.tokenizer, name, config.seqlen, config.max_tokens, config.batch_size)
        results["perplexity"][name] = result.to_dict()
    if config.tasks:
        tasks = evaluate_tasks(loaded.model, loaded.tokenizer, config.tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                               batch_size=config.batch_size, include_path=config.include_path)
        results["tasks"] = tasks.to_dict()
    if config.efficiency:
        report = measure_efficiency(loaded.model, loaded.source, prefill_tokens=config.prefill_tokens,
                                    decode_tokens=config.decode_tokens)
        results["efficiency"] = report.to_dict()
    return results


def _evaluate_into(folder: Path, loaded: LoadedModel, config: EvalConfig) -> dict:
    results = evaluate_model(loaded, config)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        write_json_atomic(tmp / "eval.json", results)
    return {}


def _analyze_into(folder: Path, loaded: LoadedModel, config: CompressConfig) -> dict:
    stats = analyze(loaded, config.calibration)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        write_analysis(stats, tmp)
    return {}


def _prune_into(folder: Path, config: CompressConfig) -> dict:
    loaded = load_model(config.loading.model, dtype=config.loading.dtype, device=config.loading.device,
                      trust_remote_code=config.loading.trust_remote_code)
    target, sharing = config.target, config.sharing
    targets = {name: getattr(target, name) for name in target.given()}
    if target.target_params is not None and (sharing.group_size or 1) > 1 and not sharing.groups:
        # the target is on the final model: blocks removed *and* the rest shared in groups
        targets = {"remove": blocks_to_remove_with_sharing(loaded.model, target.target_params, sharing.group_size or 1)}
    # prune writes the folder (atomically, manifest included) as 'foldgpt prune' does: the model it returns may no longer
    # be savable as the plain folder (removed sub-layers become weightless ZeroBranch-es after saving)
    result = prune(loaded, config.selection.method or "", calibration=config.calibration, gate_config=config.gates,
                   out=folder, overwrite=True, probe=config.probe_config(), replacement=config.replacement, **targets)
    return {"removed": result.metadata["removed"]}


def _fold_into(folder: Path, pruned: Path, config: CompressConfig, dense_model: Callable[[], LoadedModel]) -> dict:
    sharing = config.sharing
    if sharing.fold == "auto":
        removed = read_metadata(pruned)["removed"]
        fresh = load_model(config.loading.model, dtype=config.loading.dtype, device=config.loading.device,
                           trust_remote_code=config.loading.trust_remote_code)
        chosen = fold_auto(_load(pruned, config), dense_model(), fresh, removed, config.ties, out=folder, overwrite=True,
                           probe=config.fold_probe())
        return {"parameters": chosen.report.to_dict(), "fold_choice": chosen.metadata["fold_choice"]}
    result = fold_model(_load(pruned, config), group_size=None if sharing.groups else sharing.group_size,
                        groups=sharing.groups, parent=sharing.parent)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        save_compact(result.loaded.model, result.loaded.tokenizer, tmp, result.metadata)
    return {"parameters": result.report.to_dict()}


def _heal_into(folder: Path, folded: Path, teacher: LoadedModel, config: CompressConfig, checkpoint: Path) -> dict:
    result = heal(_load(folded, config), teacher, config.heal, out=folder, overwrite=True,
                  checkpoint_dir=checkpoint, resume=(checkpoint / "checkpoint.pt").is_file())
    return {"steps": result.metadata.get("steps_done"), "tokens": result.metadata.get("tokens_seen")}


def _plain_into(folder: Path, final: Path, config: CompressConfig) -> dict:
    """The final model (folded, healed) as a vanilla HF folder: what vLLM and ``from_pretrained`` load."""
    export_plain(_load(final, config), folder, overwrite=True)
    return {}


def _gguf_into(folder: Path, final: Path, config: CompressConfig) -> dict:
    with atomic_output_dir(folder, overwrite=True) as tmp:
        export_gguf(_load(final, config), tmp / GGUF_FILE, config.deploy.gguf or "f16")
    return {"type": config.deploy.gguf, "bytes": (folder / GGUF_FILE).stat().st_size}


def _summary(out: Path, config: CompressConfig, dense: StageResult, analysis: StageResult, pruned: StageResult, folded: StageResult,
             last: StageResult, final: StageResult) -> dict:
    def read(stage: StageResult, name: str) -> dict:
        return json.loads((stage.folder / name).read_text())

    fold_meta = read(folded, METADATA_FILE)
    prune_meta = read(pruned, METADATA_FILE)
    compressed = read(final, "eval.json")
    # what the user deploys: the shared base plus, after healing, the LoRA adapters (counted by the final evaluation)
    unique = compressed.get("efficiency", {}).get("parameters_unique", fold_meta["parameters"]["unique"])
    return {
        "model": config.loading.model,
        "output": str(out),
        "removed_blocks": prune_meta["removed"],
        "method": prune_meta["method"],
        "num_blocks": [prune_meta["num_blocks_before"], prune_meta["num_blocks_after"]],
        "groups": fold_meta["groups"],
        "parameters": {"dense": prune_meta["parameters_before"], "pruned": prune_meta["parameters_after"],
                       "unique": unique, "shared_base": fold_meta["parameters"]["unique"],
                       "materialised": fold_meta["parameters"]["materialised"]},
        "dense": read(dense, "eval.json"),
        "compressed": compressed,
        "final_model": str(last.folder),
        "stages": {s.name: {"skipped": s.skipped, "seconds": read(s, STAGE_FILE)["seconds"]}
                   for s in (dense, analysis, pruned, folded, last, final)},
    }


def _write_report(out: Path) -> None:
    write_report([out], out / "report")


def format_summary(summary: dict) -> str:
    """The on-screen table of the main job: dense against compressed."""
    dense, compressed = summary["dense"], summary["compressed"]
    metrics = [(f"{name} ppl", "perplexity", name) for name in dense.get("perplexity", {})]
    metrics += [(f"{task} acc", "tasks", task) for task in dense.get("tasks", {}).get("metrics", {})]
    widths = [max(10, len(label) + 2) for label, _, _ in metrics]  # every column wider than its label
    header = f"{'model':<12}{'params':>14}" + "".join(f"{label:>{width}}" for (label, _, _), width in zip(metrics, widths))
    rows = [header, "-" * len(header)]
    for label, results, params in (("dense", dense, summary["parameters"]["dense"]),
                                   ("compressed", compressed, summary["parameters"]["unique"])):
        cells = "".join(f"{_headline(results, kind, name):>{width}}" for (_, kind, name), width in zip(metrics, widths))
        rows.append(f"{label:<12}{params:>14,}{cells}")
    shared = [group for group in summary["groups"] if len(group) > 1]
    rows.append(f"removed blocks {summary['removed_blocks']} ({summary['method']}); "
                + (f"shared groups {shared}" if shared else "no sharing (groups of 1)"))
    rows.append("stages: " + ", ".join(f"{name} {_stage_time(stage)}" for name, stage in summary["stages"].items()))
    return "\n".join(rows)


def _stage_time(stage: dict) -> str:
    return "skipped" if stage["skipped"] else f"{stage['seconds']:.0f}s"


def _headline(results: dict, kind: str, name: str) -> str:
    section = results.get(kind, {})
    value = (section.get("metrics", {}) if kind == "tasks" else section).get(name)
    if value is None:
        return "-"
    if kind == "perplexity":
        return f"{value['perplexity']:.2f}"
    return f"{value['acc']:.4f}" if value.get("acc") is not None else "-"
