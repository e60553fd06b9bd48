"""Multi-process runs: the same RLAG and SFT recipes trained in 1 process and in 2 CPU
processes (``accelerate launch`` with ``accelerate/cpu-2proc.yaml``, a gloo group) give the
same per-step losses and weights, the run directory is written once, and ``kembed eval``
spreads the questions over the ranks and puts the samples back in order; FSDP2-sharded
weights (torch's ``fully_shard`` on CPU) are gathered for saving."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import write_upstream_dir
from kembed import distributed
from kembed.cli import app

ROOT = Path(__file__).resolve().parent.parent

#: Per-step losses. fp32 on CPU: the two runs differ only in summation order (a batch of 2 in
#: one process; two per-example losses and an all-reduce of their gradients in two), ~1e-7
#: relative per step (measured: at most ~1e-6 over 4 steps), while a wrong batch split or data
#: order changes the losses in the first to third decimal.
TOLERANCE = 1e-4
#: Weights after training, as the mean absolute difference over all of them. Not the maximum:
#: Adam divides each update by sqrt(v) + 1e-8, so the rare coordinate whose gradient is at
#: rounding level moves by a rounding-dependent amount up to ~lr (measured: one of 2048 weights
#: of one matrix off by 2.5e-4). Measured mean: ~3e-8 (RLAG), ~6e-9 (SFT); training moves the
#: weights by ~2e-2 on average, so a wrong batch split would be far above this bound.
WEIGHT_TOLERANCE = 1e-6

COMMON = ["limit=4", "validation=3", "eval.limit=3", "precision=fp32", "device=cpu", "train.batch_size=2",
          "train.learning_rate=1e-2", "train.warmup_ratio=0"]
COMMANDS = {
    # fixed_beta: every example has the chosen and rejected terms, so a step runs three forward
    # passes through the DDP-wrapped model before its backward pass
    "rlag": ["rlag.chunks=2", "rlag.epochs=2", "rlag.grad_norm_every=1", "rlag.fixed_beta=true"],
    # SFT's loss is a token mean over the batch; 2 processes average two per-rank token means,
    # which equals it only when the examples have equally many answer tokens (same answer)
    "sft": ["sft.epochs=2"],
}


@pytest.fixture
def same_answer_data(tmp_path, monkeypatch):
    """The upstream-layout data directory whose train records all have the gold answer
    ``Paris``, so that every SFT example has the same number of loss tokens."""
    path = write_upstream_dir(tmp_path / "data", n_train=7, n_dev=3, n_test=5)
    train = path / "CurrentEvents" / "CurrentEvents_train.json"
    rows = json.loads(train.read_text())
    for row in rows:
        row.update(options={"A": "Paris", "B": "Rome", "C": "Berlin"}, answer="Paris", answer_idx="A")
    train.write_text(json.dumps(rows))
    monkeypatch.setenv("KEMBED_DATA_DIR", str(path))
    return path


def cli_commands(model_dir, out: Path, eval_model) -> list[list[str]]:
    commands = [["train", method, "--output", str(out / method), f"model={model_dir}", *COMMON, *extra]
                for method, extra in COMMANDS.items()]
    commands.append(["eval", "--domain", "current-events", "--model", str(eval_model), "--output", str(out / "eval"),
                     "--precision", "fp32", "--device", "cpu", "--mode", "oracle-context"])
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[tuple[str, int, float]]:
    return [(e["label"], e["step"], e["loss"]) for e in events(run) if e["event"] == "train" and "loss" in e]


def test_single_process_helpers_are_no_ops():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    distributed.barrier()
    assert distributed.shard("abcde") == list("abcde")
    assert distributed.gather([1, 2, 3], 3) == [1, 2, 3]
    assert distributed.per_rank({"a": 1}) == [{"a": 1}]
    assert distributed.from_main("x") == "x"
    assert distributed.device("cuda") == "cuda" and distributed.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="shares of 4"):
        distributed.gather([1, 2, 3], 4)


def test_shutdown_destroys_the_process_group():
    """A joined group (here one gloo rank) is gone after shutdown; alone it is a no-op."""
    import torch.distributed as dist

    distributed.shutdown()  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        distributed.shutdown()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("argv, code, torn_down", [(["--help"], 0, True), (["no-such-command"], 2, False)])
def test_cli_tears_down_after_a_command_that_succeeded(monkeypatch, argv, code, torn_down):
    """``kembed`` (``cli.run``) leaves the group after success; after a failure the other ranks
    may be inside a collective, so it does not wait for them."""
    from kembed import cli

    calls = []
    monkeypatch.setattr(distributed, "shutdown", lambda: calls.append(1))
    monkeypatch.setattr(sys, "argv", ["kembed", *argv])
    if code:
        with pytest.raises(SystemExit) as end:
            cli.run()
        assert end.value.code == code
    else:
        cli.run()
    assert calls == ([1] if torn_down else [])


def test_gather_restores_the_order_of_an_interleaved_split(monkeypatch):
    items = list("abcdefg")
    parts = [items[r::3] for r in range(3)]  # what 3 ranks' shards hold
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "per_rank", lambda obj: parts)
    assert distributed.gather(parts[0], len(items)) == items


def test_batch_size_must_split_over_the_processes(monkeypatch):
    from kembed.errors import ConfigError
    from kembed.trainer import per_device_batch_size

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert per_device_batch_size(4) == 2
    with pytest.raises(ConfigError, match="multiple of the 2 processes"):
        per_device_batch_size(3)


def test_two_cpu_processes_train_like_one(same_answer_data, tiny_model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for command in cli_commands(tiny_model_dir, one, one / "rlag"):
        result = CliRunner().invoke(app, command, catch_exceptions=False)
        assert result.exit_code == 0, result.output

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    config = ROOT / "accelerate" / "cpu-2proc.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--main_process_port", str(free_port()), str(ROOT / "tests" / "launch_cli.py")]
    commands = cli_commands(tiny_model_dir, two, one / "rlag")  # eval: the same model as the 1-process eval
    args = [arg for command in commands for arg in [*command, "---"]][:-1]
    proc = subprocess.run(launch + args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    for method in COMMANDS:
        a, b = one / method, two / method
        # (a) a 2-process group trained it
        assert [e["processes"] for e in events(a) if e["event"] == "start"] == [1]
        assert [e["processes"] for e in events(b) if e["event"] == "start"] == [2]
        # (b) the same global batches: the same loss at every step, and the same weights
        la, lb = losses(a), losses(b)
        assert [x[:2] for x in la] == [x[:2] for x in lb] and len(la) == 4
        assert max(abs(x[2] - y[2]) for x, y in zip(la, lb)) < TOLERANCE, (la, lb)
        wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
        assert float(torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa]).mean()) < WEIGHT_TOLERANCE
        # (c) written once: as many metrics lines of each kind, no duplicates
        kinds = lambda run: sorted((e["event"], e.get("label"), e.get("step"), e.get("iteration"), "loss" in e)
                                   for e in events(run))
        assert kinds(a) == kinds(b) and len(set(kinds(b))) == len(kinds(b))
        assert json.loads((b / "state.json").read_text()) == json.loads((a / "state.json").read_text())
        assert not (b / "checkpoints").exists() and not list(b.glob(".model-*"))
        # dev accuracy: 3 questions over 2 ranks, gathered back into the same summary
        acc = lambda run: [e["dev_accuracy"] for e in events(run) if e["event"] == "iteration_end"]
        assert acc(b) == acc(a) and acc(b)

    # RLAG pairs: sampled half per rank, gathered in chunk order, one line per record
    for name in ("iter-001.jsonl", "iter-002.jsonl"):
        pa, pb = [[json.loads(line) for line in (run / "rlag" / "pairs" / name).read_text().splitlines()]
                  for run in (one, two)]
        picks = lambda pairs: [(p["id"], p["chosen_index"], p["rejected_index"]) for p in pairs]
        assert len(pb) == 2 and picks(pb) == picks(pa)
    sampling = lambda run: [e for e in events(run / "rlag") if e["event"] == "sampling"]
    assert [{k: v for k, v in e.items() if k != "time"} for e in sampling(two)] == \
           [{k: v for k, v in e.items() if k != "time"} for e in sampling(one)]

    # kembed eval: 5 questions over 2 ranks, samples back in order, results written once
    sa, sb = [[json.loads(line) for line in (run / "eval" / "samples.jsonl").read_text().splitlines()]
              for run in (one, two)]
    assert [s["id"] for s in sb] == [s["id"] for s in sa] and len(sb) == 5
    for x, y in zip(sa, sb):
        assert x["predicted"] == y["predicted"]
        assert x["scores"]["token_mean"] == pytest.approx(y["scores"]["token_mean"], abs=1e-4)
    assert json.loads((two / "eval" / "results.json").read_text())["n"] == 5


FSDP2_WORKER = """
import sys, torch
from torch.distributed.fsdp import fully_shard
from kembed import distributed
from kembed.models import Placement, load_model, load_tokenizer
from kembed.runs import Run

model_dir, out = sys.argv[1], sys.argv[2]
model = load_model(model_dir, Placement("cpu", "fp32"))
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert distributed.is_sharded(model) and not distributed.splits_work(model)
run = Run.create(out, {"method": "sft"})
run.save_model(model, load_tokenizer(model_dir))
with torch.no_grad():  # the sharded model still runs, all ranks in step
    model(input_ids=torch.tensor([[5, 6, 7]]))
distributed.shutdown()  # as kembed.cli does: no gloo teardown abort at exit
"""


def test_fsdp2_sharded_weights_are_gathered_for_saving(tiny_model_dir, tmp_path):
    """FSDP2 itself cannot run through accelerate here (it needs GPUs), but torch's
    ``fully_shard`` runs on CPU with gloo: a model sharded over 2 ranks is recognised as
    sharded, and ``Run.save_model`` on both ranks saves its full weights once."""
    worker = tmp_path / "worker.py"
    worker.write_text(FSDP2_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), str(worker), str(tiny_model_dir), str(tmp_path / "run")]
    proc = subprocess.run(torchrun, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    original = load_file(tiny_model_dir / "model.safetensors")  # tied lm_head: saved once, as the embedding
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in original)
