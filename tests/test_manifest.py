"""Every output folder carries a manifest; ``foldgpt verify`` catches changed, truncated or missing files."""

import json

from foldgpt.cli.main import main
from tiny import save_tiny


def test_a_pruned_folder_has_a_manifest_that_verify_accepts_and_that_catches_damage(tmp_path, capsys):
    source = save_tiny(tmp_path / "tiny")
    out = tmp_path / "pruned"
    assert main(["prune", str(source), "--method", "last", "--remove", "1", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["method"] == "last" and manifest["input_model"]["path"] == str(source)
    assert len(manifest["input_model"]["sha256"]) == 64
    assert {"model.safetensors", "config.json", "foldgpt.json"} <= set(manifest["files"])
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0
    assert "match the manifest" in capsys.readouterr().out

    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    (out / "tokenizer.json").unlink()
    assert main(["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("foldgpt: error:") == 1 and "model.safetensors changed" in err and "tokenizer.json missing" in err


def test_the_input_identity_changes_with_the_input_weights(tmp_path):
    from foldgpt.core.manifest import model_identity

    first = model_identity(str(save_tiny(tmp_path / "a", seed=0)))
    assert model_identity(str(tmp_path / "a")) == first
    (tmp_path / "a" / "model.safetensors").write_bytes(b"x")  # different size: a different weight index
    assert model_identity(str(tmp_path / "a"))["sha256"] != first["sha256"]


def test_verify_refuses_a_folder_without_manifest(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
