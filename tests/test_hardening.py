"""Bad input, a full disk and a kill signal: each gives one clear line, a non-zero exit and no partial output."""

import errno
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file
from transformers import BertConfig

from foldgpt.cli.main import main
from tiny import save_tiny, tiny_model


def assert_clean_failure(code, err, folder, *phrases):
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.startswith("foldgpt:")]
    assert len(lines) == 1 and lines[0].startswith("foldgpt: error: ") and "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0]
    assert not any(path.name.startswith(".") and ".tmp-" in path.name for path in folder.iterdir()), "temporary output left behind"


def test_a_truncated_gguf_file(tmp_path, capsys):
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 12)
    code = main(["eval", str(tmp_path / "model.gguf"), "--ppl", "wikitext2", "--max-tokens", "64"])
    assert_clean_failure(code, capsys.readouterr().err, tmp_path, "cannot read the model config")


def test_weights_with_the_wrong_shapes(tmp_path, capsys):
    folder = save_tiny(tmp_path / "tiny")
    wrong = tiny_model("llama")
    state = {name: t.contiguous() for name, t in wrong.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:, :16].contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    code = main(["prune", str(folder), "--method", "last", "--remove", "1", "--out", str(tmp_path / "out")])
    assert_clean_failure(code, capsys.readouterr().err, tmp_path, "cannot load the model")
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_causal_lm(tmp_path, capsys):
    BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "bert")
    code = main(["analyze", str(tmp_path / "bert"), "--out", str(tmp_path / "out")])
    assert_clean_failure(code, capsys.readouterr().err, tmp_path, "'bert' is not supported")


@pytest.mark.parametrize(("content", "phrase"), [(None, "does not exist"), ("", "is empty"), ("short text", "too short for one window")])
def test_calibration_files_that_are_missing_empty_or_too_short(tmp_path, capsys, content, phrase):
    folder = save_tiny(tmp_path / "tiny")
    data = tmp_path / "calibration.txt"
    if content is not None:
        data.write_text(content)
    code = main(["prune", str(folder), "--method", "bi", "--remove", "1", "--calibration", str(data), "--seqlen", "64",
                 "--out", str(tmp_path / "out")])
    assert_clean_failure(code, capsys.readouterr().err, tmp_path, phrase)
    assert not (tmp_path / "out").exists()


def test_a_disk_that_fills_up_while_saving(tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedModel

    folder = save_tiny(tmp_path / "tiny")

    def full_disk(self, directory, *args, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    code = main(["prune", str(folder), "--method", "last", "--remove", "1", "--out", str(tmp_path / "out")])
    assert_clean_failure(code, capsys.readouterr().err, tmp_path, "no space left", "--out")
    assert not (tmp_path / "out").exists()


def test_sigterm_during_gate_training_leaves_no_output(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    data = tmp_path / "text.txt"
    data.write_text("A long enough calibration text for the tiny model. " * 200)
    command = [sys.executable, "-m", "foldgpt.cli", "prune", str(folder), "--method", "gates", "--remove", "2",
               "--gate-steps", "100000", "--calibration", str(data), "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "out")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in process.stderr:  # wait until the model is loaded and training has begun
        if line.startswith("loaded ") or time.time() > deadline:
            break
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())
