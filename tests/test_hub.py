"""MODEL as a Hub ID and the named data sets' Hub copies, read from a Hugging Face cache built here in the real
layout (``hub/models--org--name/snapshots/<commit>/...`` with ``refs/main``, the same for data set repositories),
offline (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1``), through the real huggingface_hub and datasets. Each
command runs in a fresh process started in an empty folder, because both libraries read their environment once, when
first imported, and so that no ``../shared/data`` is near."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tiny import random_ids, save_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DATA_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
CUSTOM_CONFIG = '''from transformers import PretrainedConfig


class CustomConfig(PretrainedConfig):
    model_type = "custom_tiny"
'''


def add_to_cache(hub: Path, repo_type: str, repo_id: str, commit: str, files: dict[str, Path | bytes],
                 ref: str = "main") -> Path:
    """Put ``files`` into ``hub`` as huggingface_hub lays a download out: blobs named by content hash, the snapshot
    folder of ``commit`` holding relative symlinks to them, and ``refs/<ref>`` holding the commit."""
    repo = hub / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return repo / "snapshots" / commit


def parquet_bytes(rows: list[str], column: str, tmp: Path) -> bytes:
    path = tmp / "rows.parquet"
    pq.write_table(pa.table({column: rows}), path)
    return path.read_bytes()


def wiki_rows(split: str, count: int) -> list[str]:
    """WikiText-style rows: headings, paragraphs with a trailing newline, and empty rows between them."""
    rows = []
    for i in range(count):
        rows += ["", f" = {split.title()} article {i} = \n", "", f" The {split} text number {i} says that foxes jump "
                 f"over {i % 7} lazy dogs , and that is all . \n"]
    return rows


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    """HF_HOME with the tiny Llama as org/tiny (and, needing remote code, org/custom) and a WikiText-style
    Salesforce/wikitext; also the tiny Llama as a plain folder."""
    root = tmp_path_factory.mktemp("hub")
    folder = save_tiny(root / "tiny-folder", family="llama")
    hub = root / "hf" / "hub"
    add_to_cache(hub, "model", "org/tiny", COMMIT, {p.name: p for p in folder.iterdir() if p.is_file()})
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_tiny", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    add_to_cache(hub, "model", "org/custom", COMMIT, {"config.json": json.dumps(config).encode(),
                                                     "configuration_custom.py": CUSTOM_CONFIG.encode(),
                                                     "model.safetensors": folder / "model.safetensors"})
    files = {f"wikitext-2-raw-v1/{split}-00000-of-00001.parquet": parquet_bytes(wiki_rows(split, 60), "text", root)
             for split in ("validation", "test")}
    add_to_cache(hub, "dataset", "Salesforce/wikitext", DATA_COMMIT, {"README.md": b"# wikitext (test copy)\n", **files})
    return root


def run_foldgpt(home: Path, cwd: Path, *argv, module: str = "foldgpt.cli") -> subprocess.CompletedProcess:
    """``foldgpt ARGV`` (or ``python -c``) in a fresh process, offline, with ``home/hf`` as HF_HOME, from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FOLDGPT_DATA", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT),
               FOLDGPT_CACHE=str(home / "foldgpt-cache"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", argv[0]] if module == "-c" else [sys.executable, "-m", module, *map(str, argv)]
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("foldgpt:")]
    assert len(lines) == 1 and lines[0].startswith("foldgpt: error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def logits(folder: Path) -> torch.Tensor:
    from foldgpt.formats.loading import load_model

    with torch.no_grad():
        return load_model(str(folder)).model(random_ids()).logits


def test_a_hub_id_prunes_like_the_same_model_given_as_a_folder(hub_home, tmp_path):
    work = tmp_path / "work"
    common = ["--method", "bi", "--remove", 1, "--calibration", "wikitext2", "--nsamples", 4, "--seqlen", 32]
    from_hub = run_foldgpt(hub_home, work, "prune", "org/tiny", *common, "--out", tmp_path / "from-hub")
    assert from_hub.returncode == 0, from_hub.stderr
    from_folder = run_foldgpt(hub_home, work, "prune", hub_home / "tiny-folder", *common, "--out", tmp_path / "from-folder")
    assert from_folder.returncode == 0, from_folder.stderr
    hub_meta = json.loads((tmp_path / "from-hub" / "foldgpt.json").read_text())
    folder_meta = json.loads((tmp_path / "from-folder" / "foldgpt.json").read_text())
    assert hub_meta["removed"] == folder_meta["removed"] and hub_meta["scores"] == folder_meta["scores"]
    assert torch.equal(logits(tmp_path / "from-hub"), logits(tmp_path / "from-folder"))

    identity = {"id": "org/tiny", "revision": "main", "commit": COMMIT}
    assert hub_meta["source_hub"] == identity and folder_meta["source_hub"] is None
    assert hub_meta["source_model"].endswith(f"models--org--tiny/snapshots/{COMMIT}")
    manifest = json.loads((tmp_path / "from-hub" / "manifest.json").read_text())
    assert manifest["input_model"]["hub"] == identity and "sha256" in manifest["input_model"]
    assert "hub" not in json.loads((tmp_path / "from-folder" / "manifest.json").read_text())["input_model"]
    assert not (work / ".." / "shared").exists() and list(work.iterdir()) == []  # nothing written where it ran


def test_a_revision_after_the_id_picks_the_cached_commit(hub_home, tmp_path):
    script = ("import foldgpt; from foldgpt.formats.loading import load_model\n"
              f"print(load_model('org/tiny@{COMMIT}').hub)\n")
    result = run_foldgpt(hub_home, tmp_path, script, module="-c")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str({"id": "org/tiny", "revision": "main", "commit": COMMIT})
    missing = run_foldgpt(hub_home, tmp_path, "eval", "org/tiny@v9", "--ppl", "wikitext2")
    line = one_error_line(missing)
    assert "org/tiny@v9" in line and "HF_HUB_OFFLINE" in line


def test_an_id_that_is_not_cached_is_one_line_and_writes_nothing(hub_home, tmp_path):
    out = tmp_path / "never"
    result = run_foldgpt(hub_home, tmp_path / "work", "prune", "org/not-cached", "--method", "bi", "--remove", 1,
                         "--calibration", "wikitext2", "--out", out)
    line = one_error_line(result)
    assert "'org/not-cached'" in line and "not in the Hugging Face cache" in line and "HF_HUB_OFFLINE" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [tmp_path / "work"]


def test_remote_code_is_refused_unless_trusted_and_the_family_check_still_applies(hub_home, tmp_path):
    refused = run_foldgpt(hub_home, tmp_path, "eval", "org/custom", "--ppl", "wikitext2")
    line = one_error_line(refused)
    assert "modeling_custom.CustomForCausalLM" in line and "--trust-remote-code" in line
    script = ("from foldgpt.errors import FoldGPTError; from foldgpt.formats.loading import load_model\n"
              "try:\n    load_model('org/custom', trust_remote_code=True)\nexcept FoldGPTError as error:\n    print(error)\n")
    trusted = run_foldgpt(hub_home, tmp_path, script, module="-c")
    assert trusted.returncode == 0, trusted.stderr
    assert "architecture 'custom_tiny' is not supported" in trusted.stdout  # its code ran (the config class), then refused


def test_named_sets_read_their_hub_copy_when_no_data_folder_is_there(hub_home, tmp_path):
    script = ("from foldgpt.data.text import load_text\n"
              "import json; print(json.dumps([load_text('wikitext2', 'evaluation'), load_text('wikitext2', 'calibration')]))\n")
    result = run_foldgpt(hub_home, tmp_path, script, module="-c")
    assert result.returncode == 0, result.stderr
    evaluation, calibration = json.loads(result.stdout)
    assert evaluation == "\n\n".join(wiki_rows("test", 60))  # the papers' protocol: rows joined with a blank line
    assert calibration == "\n\n".join(wiki_rows("validation", 60))
    ptb = run_foldgpt(hub_home, tmp_path, "eval", hub_home / "tiny-folder", "--ppl", "ptb")
    line = one_error_line(ptb)
    assert "data set 'ptb' (evaluation)" in line and "ptb-text-only/ptb_text_only" in line and "--data-dir" in line


def test_a_data_folder_given_explicitly_is_never_replaced_by_the_hub(hub_home, tmp_path):
    result = run_foldgpt(hub_home, tmp_path, "--data-dir", tmp_path / "nowhere", "eval", "org/tiny", "--ppl", "wikitext2")
    line = one_error_line(result)
    assert str(tmp_path / "nowhere" / "wikitext-2-raw" / "test_joined.txt") in line and "--data-dir" in line


def test_a_local_folder_named_like_a_hub_id_wins(hub_home, tmp_path):
    shutil.copytree(hub_home / "tiny-folder", tmp_path / "org" / "tiny")
    script = "from foldgpt.formats.loading import load_model\nm = load_model('org/tiny'); print(m.source, m.hub)\n"
    result = run_foldgpt(hub_home, tmp_path, script, module="-c")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "org/tiny None"
