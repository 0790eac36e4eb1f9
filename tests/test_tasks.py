"""Zero-shot tasks through lm-evaluation-harness: the shipped definitions, the local data, the CLI, and (real model)
equality with a direct ``lm_eval.simple_evaluate`` run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import foldgpt
from cli_helpers import assert_one_line_error, run_cli
from foldgpt.data.text import data_dir
from foldgpt.eval.lm_tasks import SHIPPED_TASKS, TEMPLATES, arc_record, task_dir, task_manager, task_sources
from tiny import save_tiny

DATA = data_dir()
needs_data = pytest.mark.skipif(not (DATA / "piqa" / "valid.jsonl").is_file(), reason="shared data folder not found")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-llama", family="llama")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    return task_dir(data_dir=DATA)


@needs_data
def test_every_shipped_task_runs_through_the_cli_with_perplexity(capsys, tiny_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "eval.json"
    code, stdout, err = run_cli(capsys, "eval", tiny_folder, "--tasks", ",".join(SHIPPED_TASKS), "--limit", 4,
                                "--ppl", text, "--seqlen", 64, "--batch-size", 2, "--out", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert list(result["perplexity"]) == [str(text)]
    metrics = result["tasks"]["metrics"]
    assert list(metrics) == list(SHIPPED_TASKS)
    for task, values in metrics.items():
        expected = {"acc", "acc_norm"} if task in ("piqa", "arc_easy", "arc_challenge") else {"acc"}
        assert {k for k in values if not k.endswith("_stderr")} == expected, task
        assert all(0.0 <= values[k] <= 1.0 for k in expected)
        assert result["tasks"]["samples"][task] == 4
        assert f"{task:<16}acc" in stdout
    assert result["tasks"]["settings"]["limit"] == 4 and result["tasks"]["settings"]["num_fewshot"] == 0


@needs_data
def test_the_definitions_keep_the_harness_prompts_and_metrics_byte_for_byte(rendered):
    from lm_eval.tasks._yaml_loader import load_yaml  # noqa: PLC0415

    harness = Path(__import__("lm_eval").__file__).parent / "tasks"
    originals = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                 "boolq": "super_glue/boolq/default.yaml", "winogrande": "winogrande/default.yaml"}
    for task, relative in originals.items():
        ours = load_yaml(rendered / f"{task}.yaml", resolve_func=False)
        theirs = load_yaml(harness / relative, resolve_func=False)
        for key in ("task", "output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list",
                    "should_decontaminate", "doc_to_decontamination_query", "metadata"):
            if task == "winogrande" and key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
                assert str(ours[key]).endswith(f"/lm_eval.tasks.winogrande.preprocess_winogrande.{key}"), key
                assert str(theirs[key]).endswith(f"/preprocess_winogrande.{key}"), key  # the same function
            else:
                assert ours.get(key) == theirs.get(key), (task, key)
        assert ours["dataset_path"] == "json"
        assert all(Path(f).is_file() for f in ours["dataset_kwargs"]["data_files"].values())


@needs_data
def test_local_files_become_harness_documents(rendered):
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    labels = (DATA / "piqa" / "valid-labels.lst").read_text().split()
    loaded = TaskManager(include_path=rendered, include_defaults=False).load(list(SHIPPED_TASKS))["tasks"]
    piqa = loaded["piqa"].eval_docs
    first = json.loads((DATA / "piqa" / "valid.jsonl").read_text().splitlines()[0])
    assert len(piqa) == len(labels) == 1838
    assert piqa[0]["goal"] == first["goal"] and piqa[0]["label"] == int(labels[0])
    assert loaded["piqa"].doc_to_target(piqa[1]) == int(labels[1])
    assert len(loaded["arc_easy"].eval_docs) == 2376 and len(loaded["arc_challenge"].eval_docs) == 1172  # the Test files
    boolq = loaded["boolq"]
    raw = json.loads((DATA / "boolq" / "val.jsonl").read_text().splitlines()[0])
    assert boolq.doc_to_choice(boolq.eval_docs[0])[boolq.doc_to_target(boolq.eval_docs[0])] == {"true": "yes", "false": "no"}[raw["label"]]
    wino = loaded["winogrande"]
    doc = wino.eval_docs[0]  # "Sarah was a much better surgeon than Maria so _ always got the easier cases.", answer "2"
    assert wino.doc_to_text(doc) == int(doc["answer"]) - 1
    assert wino.doc_to_choice(doc) == [doc["sentence"][: doc["sentence"].index("_")] + o for o in (doc["option1"], doc["option2"])]


def test_arc_answer_keys_map_to_the_right_choice_letters_and_digits(tmp_path, monkeypatch):
    import datasets  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    records = [
        {"id": "a", "question": {"stem": "Letters?", "choices": [{"text": t, "label": k} for t, k in zip("wxyz", "ABCD")]}, "answerKey": "C"},
        {"id": "b", "question": {"stem": "Digits?", "choices": [{"text": t, "label": k} for t, k in zip("wxyz", "1234")]}, "answerKey": "2"},
        {"id": "c", "question": {"stem": "Three?", "choices": [{"text": t, "label": k} for t, k in zip("xyz", "ABC")]}, "answerKey": "A"},
    ]
    assert arc_record(records[1]) == {"id": "b", "question": "Digits?", "choices": {"text": list("wxyz"), "label": list("1234")}, "answerKey": "2"}
    (tmp_path / "data" / "arc").mkdir(parents=True)
    for name in ("Test", "Dev"):
        (tmp_path / "data" / "arc" / f"ARC-Easy-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    folder = task_dir(["arc_easy"], data_dir=tmp_path / "data", out=tmp_path / "tasks")
    task = TaskManager(include_path=folder, include_defaults=False).load(["arc_easy"])["tasks"]["arc_easy"]
    docs = task.eval_docs
    assert [task.doc_to_target(d) for d in docs] == [2, 1, 0]
    assert task.doc_to_text(docs[1]) == "Question: Digits?\nAnswer:" and task.doc_to_choice(docs[2]) == list("xyz")


def test_a_task_of_ones_own_runs_from_a_yaml_file_or_an_include_path(capsys, tiny_folder, tmp_path):
    docs = [{"ctx": "A cat", "endings": [" sat.", " flew."], "label": 0}, {"ctx": "Fish", "endings": [" swim.", " bark."], "label": 0}]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "mine" / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    validation: {tmp_path / 'mine' / 'docs.jsonl'}\n"
        "output_type: multiple_choice\nvalidation_split: validation\ndoc_to_text: '{{ctx}}'\ndoc_to_target: label\n"
        "doc_to_choice: '{{endings}}'\nmetric_list:\n  - metric: acc\n")
    for argv in (["--tasks", tmp_path / "mine" / "my_task.yaml"], ["--tasks", "my_task", "--include-path", tmp_path / "mine"]):
        out = tmp_path / "mine.json"
        code, _, err = run_cli(capsys, "eval", tiny_folder, *argv, "--out", out)
        assert code == 0, err
        result = json.loads(out.read_text())
        assert result["tasks"]["samples"] == {"my_task": 2} and 0.0 <= result["tasks"]["metrics"]["my_task"]["acc"] <= 1.0
        assert result["perplexity"] == {}  # --tasks alone: no perplexity


def test_an_unknown_task_name_is_a_one_line_error(capsys, tiny_folder):
    code, _, err = run_cli(capsys, "eval", tiny_folder, "--tasks", "piqa,no_such_task_xyz")
    assert_one_line_error(code, err, "unknown task no_such_task_xyz", "piqa, arc_easy")


def test_a_missing_data_folder_is_a_one_line_error_naming_the_path(capsys, tiny_folder, tmp_path):
    code, _, err = run_cli(capsys, "--data-dir", tmp_path / "nowhere", "eval", tiny_folder, "--tasks", "boolq")
    assert_one_line_error(code, err, str(tmp_path / "nowhere"), "--data-dir")
    (tmp_path / "partial" / "piqa").mkdir(parents=True)
    (tmp_path / "partial" / "piqa" / "valid.jsonl").write_text("")
    code, _, err = run_cli(capsys, "--data-dir", tmp_path / "partial", "eval", tiny_folder, "--tasks", "piqa")
    assert_one_line_error(code, err, str(tmp_path / "partial" / "piqa" / "valid-labels.lst"), "--data-dir")


def test_the_task_definitions_are_package_data():
    assert sorted(p.name for p in TEMPLATES.glob("*.yaml")) == sorted(f"{name}.yaml" for name in SHIPPED_TASKS)
    assert Path(__import__("foldgpt.eval.lm_tasks").eval.lm_tasks.__file__).parent / "tasks" == TEMPLATES


def test_without_local_files_the_shipped_names_are_the_harness_stock_tasks(tmp_path, monkeypatch):
    monkeypatch.delenv("FOLDGPT_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # no ../shared/data here
    assert task_sources(["piqa", "winogrande", "my_task"]) == {"piqa": "lm-eval", "winogrande": "lm-eval"}
    assert task_sources(["piqa"], data_dir=tmp_path) == {"piqa": "local"}  # a folder given explicitly must hold them
    if DATA.is_dir():
        assert task_sources(["piqa"], data_dir=DATA) == {"piqa": "local"}
    manager = task_manager(["piqa", "arc_challenge"])
    import lm_eval  # noqa: PLC0415

    stock = Path(lm_eval.__file__).parent / "tasks"
    assert {"piqa", "arc_easy", "arc_challenge"} <= set(manager.all_tasks)
    assert Path(manager.task_index["piqa"].yaml_path) == stock / "piqa" / "piqa.yaml"


def test_without_local_files_or_hub_data_a_task_is_one_line(tiny_folder, tmp_path):
    # a fresh process: datasets and huggingface_hub read HF_HOME and the offline switches once, when imported
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FOLDGPT_DATA"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-m", "foldgpt.cli", "eval", str(tiny_folder), "--tasks", "piqa", "--limit", "2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(result.returncode, result.stderr, "task piqa: no local file", "piqa/valid.jsonl", "stock piqa",
                          "--data-dir")


@pytest.mark.real_model
@needs_data
def test_foldgpt_eval_equals_a_direct_lm_eval_run_on_smollm2(capsys, tmp_path):
    import lm_eval  # noqa: PLC0415
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    out = tmp_path / "tasks.json"
    code, _, err = run_cli(capsys, "eval", "smollm2-135m", "--tasks", "piqa,arc_easy", "--limit", 20, "--out", out)
    assert code == 0, err
    ours = json.loads(out.read_text())["tasks"]["metrics"]

    loaded = foldgpt.load_model("smollm2-135m")
    direct = lm_eval.simple_evaluate(model=HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=1),
                                     tasks=["piqa", "arc_easy"], num_fewshot=0, limit=20, batch_size=1,
                                     task_manager=TaskManager(include_path=task_dir(data_dir=DATA), include_defaults=False))
    for task in ("piqa", "arc_easy"):
        for metric in ("acc", "acc_norm"):
            assert ours[task][metric] == direct["results"][task][f"{metric},none"], (task, metric)
            assert ours[task][f"{metric}_stderr"] == direct["results"][task][f"{metric}_stderr,none"]
    assert ours["arc_easy"]["acc"] > 0.5 and ours["piqa"]["acc"] > 0.5  # well above chance (0.25 / 0.5) for SmolLM2


@needs_data
def test_a_peft_wrapped_model_is_scored_like_a_plain_one():
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415

    from foldgpt.eval.lm_tasks import evaluate_tasks  # noqa: PLC0415
    from tiny import tiny_model, tiny_tokenizer  # noqa: PLC0415

    plain = evaluate_tasks(tiny_model("llama"), tiny_tokenizer(), ["winogrande"], limit=3)
    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    # a fresh LoRA adapter adds zero (B = 0), so the scores are the plain model's
    assert evaluate_tasks(wrapped, tiny_tokenizer(), ["winogrande"], limit=3).metrics == plain.metrics
