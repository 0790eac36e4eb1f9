"""The whole FoldGPT pipeline, top to bottom, resumable stage by stage.

    dense evaluation -> analysis -> gated removal -> grouped sharing -> healing -> evaluation -> summary + report

Every setting is one key of a flat dictionary whose names are the ``foldgpt compress`` CLI options (``--gate-steps``
is ``gate_steps``); a YAML ``--config`` sets the same keys. Each stage writes ``DIR/<stage>/`` atomically and then
``DIR/<stage>/stage.json``, which records a hash of the settings the stage depends on and of the stage before it. A
rerun skips every stage whose hash still matches, so a crashed or interrupted run continues where it stopped, and a
changed setting redoes only the stages it affects. Healing additionally checkpoints inside its stage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from foldgpt.analysis.redundancy import write_analysis
from foldgpt.core.outputs import METADATA_FILE, atomic_output_dir, write_json_atomic
from foldgpt.data.config import CalibrationConfig
from foldgpt.errors import FoldGPTError
from foldgpt.eval.efficiency import measure_efficiency
from foldgpt.eval.lm_tasks import evaluate_tasks
from foldgpt.eval.perplexity import perplexity
from foldgpt.formats.compact import save_compact
from foldgpt.formats.loading import LoadedModel, load_model
from foldgpt.healing.config import HealConfig
from foldgpt.healing.loop import heal
from foldgpt.selection.config import GateConfig, ProbeConfig
from foldgpt.surgery.budget import blocks_to_remove_with_sharing
from foldgpt.workflows.analyze import analyze
from foldgpt.workflows.fold import fold_model
from foldgpt.workflows.prune import prune
from foldgpt.workflows.report import write_report

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
STAGE_FILE = "stage.json"

# which settings each stage depends on (by key or key prefix); anything else does not invalidate it
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "dense": ("model", "dtype", "device", "ppl", "eval_seqlen", "max_tokens", "batch_size", "tasks", "limit", "num_fewshot",
              "include_path", "efficiency", "prefill_tokens", "decode_tokens"),
    "analysis": ("model", "dtype", "device", "calibration", "nsamples", "seqlen", "seed"),
    "pruned": ("model", "dtype", "device", "calibration", "nsamples", "seqlen", "seed", "method", "remove", "remove_ratio",
               "target_params", "target_flops", "gate_", "gradient_checkpointing", "group_size", "groups"),
    "folded": ("group_size", "groups", "parent"),
    "healed": ("heal_",),
    "final": ("ppl", "eval_seqlen", "max_tokens", "batch_size", "tasks", "limit", "num_fewshot", "include_path", "efficiency",
              "prefill_tokens", "decode_tokens"),
}
STAGES = tuple(STAGE_SETTINGS)
# settings added after runs were first written: left out of a stage's key while at these defaults, so that a run
# finished before they existed (with what is their default now) is not redone after an upgrade
# (the values of the release that added them, not today's defaults: a run made before with probes off must not match
# one with today's probes on)
LATER_SETTINGS: dict[str, Any] = {"gate_lora_rank": GateConfig.lora_rank, "gate_lora_lr": GateConfig.lora_lr,
                                  "gate_probe_sets": 0, "gate_probe_screen": 24, "gate_probe_steps": 8, "gate_probe_pool": 3,
                                  "gate_probe_tokens": 8192}


@dataclass
class StageResult:
    """Where a stage's output lives, its chained hash, and whether this run computed it or found it done."""

    name: str
    folder: Path
    key: str
    skipped: bool


def probe_sets(settings: dict[str, Any]) -> int:
    """How many healing probes the removal runs: none unless the gates choose and the pipeline heals after (the
    probes pick the set that heals best; with ``heal_steps`` 0 see ``screens_only``)."""
    if settings.get("method") != "gates" or settings.get("heal_steps") == 0:
        return 0
    return settings.get("gate_probe_sets", 0)


def screens_only(settings: dict[str, Any]) -> bool:
    """Whether the removal screens the gates' near-ties and heals none, as ``prune`` does by default: when the pipeline
    does not heal (``heal_steps`` 0) its output is judged before healing (``--gate-probe-screen 0``: the gates' own
    pick). A pipeline that heals with ``--gate-probe-sets 0`` keeps the gates' own pick, as it always did."""
    return settings.get("method") == "gates" and settings.get("heal_steps") == 0 and settings.get("gate_probe_screen", 0) > 0


def settings_for(stage: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``settings`` that ``stage`` depends on."""
    prefixes = STAGE_SETTINGS[stage]
    if stage == "pruned" and settings.get("target_params") is None:  # grouping matters to removal only via --target-params
        prefixes = tuple(p for p in prefixes if p not in ("group_size", "groups"))
    if stage == "pruned" and settings.get("method") != "gates":  # only gate training reads these (e.g. bi skips them)
        prefixes = tuple(p for p in prefixes if p not in ("gate_", "gradient_checkpointing"))
    if stage == "pruned" and probe_sets(settings) == 0:  # no probes heal: only the screen's settings can matter
        screen = {"gate_screen_only": True, "gate_probe_screen": settings["gate_probe_screen"],
                  "gate_probe_pool": settings.get("gate_probe_pool")} if screens_only(settings) else {}
        settings = {**{k: v for k, v in settings.items() if not k.startswith("gate_probe_")}, "gate_probe_sets": 0, **screen}
    return {k: v for k, v in sorted(settings.items())
            if any(k == p or (p.endswith("_") and k.startswith(p)) for p in prefixes)
            and not (k in LATER_SETTINGS and v == LATER_SETTINGS[k])}


def stage_key(stage: str, settings: dict[str, Any], upstream: str) -> str:
    payload = json.dumps({"stage": stage, "settings": settings_for(stage, settings), "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def run_stage(out: Path, stage: str, settings: dict[str, Any], upstream: str, build: Callable[[Path], dict]) -> StageResult:
    """Run ``build(folder)`` unless ``out/stage`` already holds a result for the same settings and inputs.

    ``build`` must create ``folder`` atomically (every foldgpt writer does) and returns facts for ``stage.json``.
    ``stage.json`` is written last, so a stage interrupted before it is simply redone.
    """
    folder = out / stage
    key = stage_key(stage, settings, upstream)
    marker = folder / STAGE_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        print(f"[{stage}] done in an earlier run with the same settings: skipped", flush=True)
        return StageResult(stage, folder, key, skipped=True)
    print(f"[{stage}] running", flush=True)
    start = time.perf_counter()
    facts = build(folder)
    write_json_atomic(marker, {"stage": stage, "key": key, "upstream": upstream, "settings": settings_for(stage, settings),
                               "seconds": time.perf_counter() - start, **facts})
    return StageResult(stage, folder, key, skipped=False)




def run_pipeline(settings: dict[str, Any], out: str | Path, overwrite: bool = False) -> dict:
    """Run (or resume) every stage with resolved flat ``settings``; return the summary."""
    out = Path(out)
    _check_output(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(settings, sort_keys=True))
    teacher: list[LoadedModel] = []

    def dense_model() -> LoadedModel:
        if not teacher:
            teacher.append(load_model(settings["model"], dtype=settings["dtype"], device=settings["device"]))
        return teacher[0]

    dense = run_stage(out, "dense", settings, "", lambda folder: _evaluate_into(folder, dense_model(), settings))
    analysis = run_stage(out, "analysis", settings, "", lambda folder: _analyze_into(folder, dense_model(), settings))
    pruned = run_stage(out, "pruned", settings, "", lambda folder: _prune_into(folder, settings))
    folded = run_stage(out, "folded", settings, pruned.key, lambda folder: _fold_into(folder, pruned.folder, settings))
    last = folded
    if settings["heal_steps"] > 0:
        last = run_stage(out, "healed", settings, folded.key,
                         lambda folder: _heal_into(folder, folded.folder, dense_model(), settings, out / f".healed-{folded.key[:12]}.checkpoint"))
    final = run_stage(out, "final", settings, last.key, lambda folder: _evaluate_into(folder, _load(last.folder, settings), settings))
    summary = _summary(out, settings, dense, analysis, pruned, folded, last, final)
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


def _load(folder: Path, settings: dict[str, Any]) -> LoadedModel:
    return load_model(str(folder), dtype=settings["dtype"], device=settings["device"])


def evaluate_model(loaded: LoadedModel, settings: dict[str, Any]) -> dict:
    """Perplexity on each ``ppl`` set (and, when asked, zero-shot tasks and efficiency figures) of one model."""

    results: dict[str, Any] = {"model": loaded.source, "perplexity": {}}
    for name in settings["ppl"] or []:
        result = perplexity(loaded.model, loaded.tokenizer, name, settings["eval_seqlen"], settings["max_tokens"], settings["batch_size"])
        results["perplexity"][name] = result.to_dict()
    if settings.get("tasks"):

        tasks = evaluate_tasks(loaded.model, loaded.tokenizer, settings["tasks"], limit=settings["limit"],
                               num_fewshot=settings["num_fewshot"], batch_size=settings["batch_size"],
                               include_path=settings["include_path"])
        results["tasks"] = tasks.to_dict()
    if settings.get("efficiency"):

        report = measure_efficiency(loaded.model, loaded.source, prefill_tokens=settings["prefill_tokens"],
                                    decode_tokens=settings["decode_tokens"])
        results["efficiency"] = report.to_dict()
    return results


def _evaluate_into(folder: Path, loaded: LoadedModel, settings: dict[str, Any]) -> dict:
    results = evaluate_model(loaded, settings)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        write_json_atomic(tmp / "eval.json", results)
    return {}


def _analyze_into(folder: Path, loaded: LoadedModel, settings: dict[str, Any]) -> dict:
    stats = analyze(loaded, _calibration(settings))
    with atomic_output_dir(folder, overwrite=True) as tmp:
        write_analysis(stats, tmp)
    return {}


def _prune_into(folder: Path, settings: dict[str, Any]) -> dict:

    loaded = load_model(settings["model"], dtype=settings["dtype"], device=settings["device"])
    targets = {name: settings[name] for name in ("remove", "remove_ratio", "target_params", "target_flops") if settings[name] is not None}
    if "target_params" in targets and settings["group_size"] > 1 and not settings["groups"]:
        # the target is on the final model: blocks removed *and* the rest shared in groups

        targets = {"remove": blocks_to_remove_with_sharing(loaded.model, targets["target_params"], settings["group_size"])}
    # prune writes the folder (atomically, manifest included) as 'foldgpt prune' does: the model it returns may no longer
    # be savable as the plain folder (removed sub-layers become weightless ZeroBranch-es after saving)
    probe = None
    if probe_sets(settings):
        probe = ProbeConfig.from_settings(settings)
    elif screens_only(settings):  # nothing heals: the screen's windows are ProbeConfig's, not the heal's
        probe = ProbeConfig.from_settings({**settings, "gate_probe_sets": 0, "heal_seqlen": None})
    result = prune(loaded, settings["method"], calibration=_calibration(settings), gate_config=_gate_config(settings),
                   out=folder, overwrite=True, probe=probe, **targets)
    return {"removed": result.metadata["removed"]}


def _fold_into(folder: Path, pruned: Path, settings: dict[str, Any]) -> dict:

    result = fold_model(_load(pruned, settings), group_size=settings["group_size"] if not settings["groups"] else None,
                        groups=settings["groups"], parent=settings["parent"])
    with atomic_output_dir(folder, overwrite=True) as tmp:
        save_compact(result.loaded.model, result.loaded.tokenizer, tmp, result.metadata)
    return {"parameters": result.report.to_dict()}


def _heal_into(folder: Path, folded: Path, teacher: LoadedModel, settings: dict[str, Any], checkpoint: Path) -> dict:

    result = heal(_load(folded, settings), teacher, heal_config(settings), out=folder, overwrite=True,
                  checkpoint_dir=checkpoint, resume=(checkpoint / "checkpoint.pt").is_file())
    return {"steps": result.metadata.get("steps_done"), "tokens": result.metadata.get("tokens_seen")}


def _calibration(settings: dict[str, Any]):

    return CalibrationConfig(data=settings["calibration"], nsamples=settings["nsamples"], seqlen=settings["seqlen"], seed=settings["seed"])


def _gate_config(settings: dict[str, Any]) -> GateConfig:
    return GateConfig.from_settings(settings)


def heal_config(settings: dict[str, Any]):
    """The ``HealConfig`` of the ``heal_*`` settings (``heal_steps`` is its ``steps``, and so on)."""

    fields = {key.removeprefix("heal_"): value for key, value in settings.items() if key.startswith("heal_")}
    if fields["target_modules"] is not None:
        fields["target_modules"] = tuple(fields["target_modules"])
    return HealConfig(**fields)


def _summary(out: Path, settings: dict, dense: StageResult, analysis: StageResult, pruned: StageResult, folded: StageResult,
             last: StageResult, final: StageResult) -> dict:
    def read(stage: StageResult, name: str) -> dict:
        return json.loads((stage.folder / name).read_text())

    fold_meta = read(folded, METADATA_FILE)
    prune_meta = read(pruned, METADATA_FILE)
    compressed = read(final, "eval.json")
    # what the user deploys: the shared base plus, after healing, the LoRA adapters (counted by the final evaluation)
    unique = compressed.get("efficiency", {}).get("parameters_unique", fold_meta["parameters"]["unique"])
    return {
        "model": settings["model"],
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
