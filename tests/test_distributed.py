"""Data-parallel healing (two CPU processes, gloo, launched by torchrun) trains to the weights of one process with the
same global batch, also when interrupted and resumed; the window split over ranks; the 8-GPU FSDP config; ``--device-map``
reaches accelerate on heal and prune --method gates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from foldgpt.cli.main import main
from foldgpt.errors import FoldGPTError
from foldgpt.formats import placement as distributed
from foldgpt.formats.loading import LoadedModel
from foldgpt.healing.config import HealConfig
from foldgpt.healing.data import WindowSchedule
from foldgpt.healing.loop import heal
from tiny import save_tiny, tiny_model, tiny_tokenizer

HEAL = ["--data", "heal.txt", "--steps", "3", "--seqlen", "16", "--micro-batch", "2", "--eval-windows", "1",
        "--tail-layers", "2", "--lm-weight", "0.5", "--lr", "0.01", "--checkpoint-every", "2"]
WEIGHT_FILES = ("adapter/adapter_model.safetensors", "model.compact.safetensors")  # LoRA, and the trained norms


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    """A working folder with heal.txt, a tiny dense teacher and a pruned-then-folded student (shared weights)."""
    root = tmp_path_factory.mktemp("dp")
    (root / "heal.txt").write_text("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 40)
    save_tiny(root / "teacher", "qwen3")
    assert main(["prune", str(root / "teacher"), "--method", "last", "--remove", "1", "--calibration", str(root / "heal.txt"),
                 "--seqlen", "16", "--nsamples", "2", "--out", str(root / "pruned")]) == 0
    assert main(["fold", str(root / "pruned"), "--group-size", "2", "--out", str(root / "folded")]) == 0
    return root


def weights(folder):
    return {f"{name}:{key}": value for name in WEIGHT_FILES for key, value in load_file(str(folder / name)).items()}


def test_two_gloo_processes_train_to_the_weights_of_one_process_with_the_same_global_batch(folded, monkeypatch):
    # 2 processes x micro-batch 2 x grad-accum 2 = 8 windows per step, as 1 process x micro-batch 2 x grad-accum 4;
    # one launch heals through the CLI (two/) and through the API stopped after step 1 and resumed (resumed/)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    worker = Path(__file__).with_name("distributed_worker.py")
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), "1", "--",
         "heal", "folded", "--teacher", "teacher", *HEAL, "--grad-accum", "2"],
        cwd=folded, env=env, capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stdout + launched.stderr
    assert launched.stdout.count("healed 3 steps") == 1  # only rank 0 reports (and writes)
    monkeypatch.chdir(folded)
    assert main(["heal", "folded", "--teacher", "teacher", *HEAL, "--grad-accum", "4", "--out", "one"]) == 0
    assert main(["heal", "folded", "--teacher", "teacher", *HEAL, "--grad-accum", "2", "--out", "half"]) == 0

    two, resumed, one, half = (weights(folded / name) for name in ("two", "resumed", "one", "half"))
    assert two.keys() == one.keys() == resumed.keys() and any("lora_B" in name for name in two)
    # the all-reduce adds in another order than local accumulation: equal up to float rounding, not bitwise
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(resumed[name], two[name], rtol=0, atol=0, msg=name)  # resuming is exact
    # the comparison is not vacuous: half the global batch (one process's share) trains to other weights
    assert max((half[name] - value).abs().max().item() for name, value in one.items()) > 1e-3
    meta_two, meta_one = (json.loads((folded / name / "foldgpt.json").read_text()) for name in ("two", "one"))
    assert meta_two["config"]["world_size"] == 2 and meta_one["config"]["world_size"] == 1
    assert meta_two["tokens_seen"] == meta_one["tokens_seen"] == 3 * 8 * 16
    assert [r["loss"] for r in meta_two["history"]] == pytest.approx([r["loss"] for r in meta_one["history"]], rel=1e-5)
    assert not (folded / "two.checkpoint").exists()  # rank 0 wrote the step-2 checkpoint and removed it at the end
    assert not (folded / "resumed.checkpoint").exists()


def test_the_8_gpu_fsdp_config_launches_fsdp2_with_8_processes():
    """What accelerate launch makes of docs/accelerate/fsdp_8gpu.yaml (the environment of each process); not run."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser  # noqa: PLC0415
    from accelerate.utils.launch import prepare_multi_gpu_env  # noqa: PLC0415

    config = Path(__file__).parents[1] / "docs" / "accelerate" / "fsdp_8gpu.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "foldgpt.cli", "heal", "student"])
    args = _validate_launch_command(args)[0]
    assert args.use_fsdp and args.num_processes == 8 and not args.cpu
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_each_rank_takes_its_share_of_the_step_windows_of_one_process_with_the_same_global_batch():
    schedule = WindowSchedule(37, seed=3)
    parallel = HealConfig(micro_batch=2, grad_accum=2, world_size=3)
    single = HealConfig(micro_batch=2, grad_accum=6)
    assert parallel.windows_per_step == single.windows_per_step == 12
    for step in (1, 2, 7):
        ranks = [schedule.indices(step, micro, parallel, rank) for rank in range(3) for micro in range(2)]
        assert ranks == [schedule.indices(step, micro, single) for micro in range(6)]
    assert HealConfig(tokens=1000, seqlen=10, micro_batch=2, world_size=5).total_steps == 10


def test_world_size_above_one_without_a_launcher_is_refused(tmp_path):
    (tmp_path / "t.txt").write_text("abc " * 200)
    model = tiny_model("llama")
    student = LoadedModel(model, tiny_tokenizer(), "s")
    teacher = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "t")
    with pytest.raises(FoldGPTError, match="accelerate launch"):
        heal(student, teacher, HealConfig(data=str(tmp_path / "t.txt"), seqlen=16, steps=1, world_size=2))


@pytest.mark.parametrize("command", ["heal", "prune"])
def test_device_map_option_loads_through_accelerate(folded, monkeypatch, command):
    """Only the CPU map runs here (no GPU on the test machine); 'auto' over several GPUs was not run."""
    placed = []
    original = distributed.dispatch

    def recording(model, device_map):
        placed.append(device_map)
        return original(model, device_map)

    monkeypatch.setattr(distributed, "dispatch", recording)
    monkeypatch.chdir(folded)
    if command == "heal":
        argv = ["heal", "folded", "--teacher", "teacher", *HEAL, "--steps", "1", "--device-map", "cpu", "--out", "mapped"]
    else:
        argv = ["prune", "teacher", "--method", "gates", "--gate-steps", "2", "--remove", "1", "--calibration", "heal.txt",
                "--seqlen", "16", "--nsamples", "2", "--device-map", "cpu", "--out", "gated"]
    assert main(argv) == 0
    assert placed == (["cpu", "cpu"] if command == "heal" else ["cpu"])  # student and teacher / the gated model


def test_device_map_rejects_an_unknown_map():
    with pytest.raises(FoldGPTError, match="--device-map 'nowhere'"):
        distributed.dispatch(tiny_model("llama"), "nowhere")


def test_other_commands_refuse_to_run_under_a_launcher(monkeypatch, capsys, folded):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["verify", str(folded / "pruned")]) == 2
    assert "only 'foldgpt heal' and 'foldgpt prune --method gates' train data-parallel" in capsys.readouterr().err
