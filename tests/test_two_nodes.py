"""Two nodes without a shared disk, on one machine: `torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 1` on
gloo, each node in its own working directory with relative --out and --data, so that nothing is shared. The run
builds its data on each node, goes SFT -> GRPO to the end, and saves sharded checkpoints (the weights and
trainer_state.json on node 0, each node its own shards); `--resume` then stops on both ranks with one line naming
what node 1 cannot see, instead of waiting forever."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ssrl

HERE = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def two_nodes(tmp_path, flags):
    """Both nodes' torchrun processes, each in tmp_path/node<N>; returns their CompletedProcess-like results."""
    port, processes = free_port(), []
    for node in (0, 1):
        folder = tmp_path / f"node{node}"
        folder.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                   "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                   str(HERE / "dist_ssrl.py"), "run", "--", *flags]
        processes.append(subprocess.Popen(command, cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_train_to_the_end_and_refuse_to_resume_in_one_line(tmp_path):
    flags = ["--out", "run", "--data", "data", "--per-task", "8", "--eval-per-task", "1", "--tasks", "depth",
             "flip", "--sft-data-fraction", "0.5", "--sft-num-train-epochs", "1", "--sft-global-batch-size", "4",
             "--sft-micro-batch-size", "2",
             "--save-steps", "2", "--max-steps", "2", "--rollout-batch-size", "4", "--global-batch-size", "2",
             "--max-response-length", "8", "--eval-limit", "1"]
    for node, result in enumerate(two_nodes(tmp_path, flags)):
        assert result.returncode == 0, (node, result.stderr[-3000:])
    node0, node1 = tmp_path / "node0" / "run", tmp_path / "node1" / "run"
    for node in (tmp_path / "node0", tmp_path / "node1"):    # each node built the data it read
        assert (node / "data" / "train.jsonl").is_file()
    last = max(ssrl.checkpoints(node0), key=ssrl.checkpoint_step)
    assert ssrl.checkpoint_step(last) == 4 and (node0 / "eval-grpo.json").is_file()
    assert ssrl.checkpoints(node1) == []                        # node 1 holds shards only, never a checkpoint to resume
    assert sorted(p.name for p in (node1 / last.name / "trainer").iterdir()) == ["__1_0.distcp"]
    assert (node1 / "reference" / "__1_0.distcp").is_file() and not (node1 / "reference" / ".metadata").exists()

    results = two_nodes(tmp_path, flags + ["--resume"])
    for node, result in enumerate(results):
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"--resume run/{last.name}: rank 1 cannot see run/{last.name}/" in errors[0], \
            (node, result.stderr[-2000:])
        assert "disk every node shares" in errors[0]
