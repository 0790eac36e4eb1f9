"""Data-parallel gate training (two CPU processes, gloo, launched by torchrun): the gates, the budget control and the
removed blocks (and sub-layers) of one process with the same global batch; only rank 0 writes and reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foldgpt.cli.main import main
from tiny import DEPTH, identity_block_model, tiny_tokenizer

# blocks 2 and 4 add nothing, so their gates (and, with sub-layer gates, both of their branches') close and go
GATES = ["--method", "gates", "--calibration", "calib.txt", "--seqlen", "16", "--nsamples", "8", "--gate-steps", "12",
         "--gate-lr", "0.1", "--gate-lambda", "0.2", "--gate-micro-batch", "1", "--gate-restarts", "1"]
BLOCK = ["prune", "model", *GATES, "--remove", "2", "--gate-probe-screen", "0"]  # the gates alone (no screen: a random model)
SUBLAYER = ["prune", "model", *GATES, "--granularity", "sublayer", "--remove", "4"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp_gates")
    (root / "calib.txt").write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 40)
    identity_block_model([2, 4]).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    return root


def details(folder: Path) -> dict:
    return json.loads((folder / "foldgpt.json").read_text())


def test_two_gloo_processes_train_the_gates_of_one_process_with_the_same_global_batch(folder, monkeypatch):
    # 2 processes x micro-batch 1 x grad-accum 2 = 4 windows per step, as 1 process x micro-batch 1 x grad-accum 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = Path(__file__).with_name("distributed_gates_worker.py")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
         *BLOCK, "--gate-grad-accum", "2", "--out", "two", "--next", *SUBLAYER, "--gate-grad-accum", "2", "--out", "two_sub"],
        cwd=folder, env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert launched.stdout.count("gates: removed blocks") == 2  # only rank 0 reports (and writes), once per run
    monkeypatch.chdir(folder)
    assert main([*BLOCK, "--gate-grad-accum", "4", "--out", "one"]) == 0
    assert main([*SUBLAYER, "--gate-grad-accum", "4", "--out", "one_sub"]) == 0
    assert main([*BLOCK, "--gate-grad-accum", "2", "--out", "half"]) == 0

    for two, one, gates in (("two", "one", DEPTH), ("two_sub", "one_sub", 2 * DEPTH)):
        meta_two, meta_one = details(folder / two), details(folder / one)
        d_two, d_one = meta_two["details"], meta_one["details"]
        assert d_two["world_size"] == 2 and d_one["world_size"] == 1
        assert len(d_two["final_gates"]) == gates
        # the all-reduce adds in another order than local accumulation: equal up to float rounding, not bitwise
        torch.testing.assert_close(torch.tensor(d_two["gate_history"]), torch.tensor(d_one["gate_history"]), rtol=0, atol=1e-5)
        assert d_two["lambda_history"] == pytest.approx(d_one["lambda_history"], rel=1e-12)  # the same budget decisions
        assert d_two["distill_loss_history"] == pytest.approx(d_one["distill_loss_history"], rel=1e-5)  # averaged over ranks
        assert meta_two["removed"] == meta_one["removed"]
        assert meta_two.get("removed_sublayers") == meta_one.get("removed_sublayers")
    assert details(folder / "two")["removed"] == [2, 4]  # the identity blocks' gates closed
    assert max(details(folder / "two")["details"]["final_gates"][i] for i in (2, 4)) < 0.2
    assert json.loads((folder / "two" / "config.json").read_text())["num_hidden_layers"] == DEPTH - 2
    # the comparison is not vacuous: half the global batch (one process's share) trains other gates
    half, one = (torch.tensor(details(folder / name)["details"]["final_gates"]) for name in ("half", "one"))
    assert (half - one).abs().max().item() > 1e-3


def test_prune_with_another_method_still_refuses_a_launcher(folder, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(folder)
    assert main(["prune", "model", "--method", "bi", "--remove", "1", "--calibration", "calib.txt", "--out", "bi"]) == 2
    assert "'foldgpt prune' runs in one process" in capsys.readouterr().err
    assert not (folder / "bi").exists()


def test_prune_api_writes_on_rank_zero_only(folder, tmp_path, monkeypatch):
    from foldgpt import prune  # noqa: PLC0415
    from foldgpt.data.config import CalibrationConfig  # noqa: PLC0415
    from foldgpt.formats.loading import load_model  # noqa: PLC0415

    calibration = CalibrationConfig(data=str(folder / "calib.txt"), nsamples=2, seqlen=16)
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it in the second process
    result = prune(load_model(str(folder / "model")), "bi", remove=1, calibration=calibration, out=tmp_path / "rank1")
    assert len(result.selection.removed) == 1 and not (tmp_path / "rank1").exists()
    monkeypatch.setenv("RANK", "0")
    prune(load_model(str(folder / "model")), "bi", remove=1, calibration=calibration, out=tmp_path / "rank0")
    assert (tmp_path / "rank0" / "config.json").is_file()
