"""ssrl.py under torchrun, for tests/test_ssrl_dist.py (2 ranks on gloo) and tests/test_two_nodes.py:

    torchrun --nproc_per_node 2 tests/dist_ssrl.py run [--die-after-save STEP] [--dump-after-save STEP FILE]
                                                      [--dump-loaded FILE] -- SSRL FLAGS
        ssrl.main with a reward an untrained policy varies on (so GRPO's updates are not no-ops); with
        --die-after-save, every rank dies right after writing checkpoint STEP (a kill between two steps); with
        --dump-after-save, rank 0 writes the full fp32 weights and AdamW state right after checkpoint STEP to FILE,
        and with --dump-loaded, right after a resumed run loaded its trainer state (also in one process)
    torchrun --nproc_per_node 2 tests/dist_ssrl.py eval DATA OUT
        ssrl.evaluate on a bf16-sharded tiny model where every image of rank 1's share is gone: both ranks must
        return, and rank 0 writes the result to OUT
    torchrun --nproc_per_node 2 tests/dist_ssrl.py load OUT -- SSRL FLAGS
        ssrl.load_sharded_model; every rank's peak resident memory while loading, and whether the weights equal
        those of a one-process load with the same flags, go to OUT (JSON, rank 0)
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as torch_dist  # noqa: E402

import grpo  # noqa: E402
import ssrl  # noqa: E402


def length_reward(response, answer):
    score = min(len(response), 40) / 40
    return {"overall": score, "format": 0.0, "accuracy": score}


class Killed(Exception):
    pass


def dump_state(model, optimizer, path):
    """The full (unsharded) fp32 weights and optimizer state, keyed by parameter name, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(model, options=options),
             "optimizer": get_optimizer_state_dict(model, optimizer, options=options)["state"]}
    if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
        torch.save(state, path)


def run(argv):
    options, argv = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    die_after = dump_after = dump_loaded = None
    while options:
        if options[0] == "--die-after-save":
            die_after, options = int(options[1]), options[2:]
        elif options[0] == "--dump-after-save":
            dump_after, options = (int(options[1]), options[2]), options[3:]
        elif options[0] == "--dump-loaded":
            dump_loaded, options = options[1], options[2:]
        else:
            raise SystemExit(f"unknown option {options[0]}")
    grpo.task_reward = length_reward
    real_save, real_load = ssrl.save_checkpoint, ssrl.load_trainer_state

    def save(args, dist, model, processor, step, stage, optimizer=None, *rest, **kwargs):
        path = real_save(args, dist, model, processor, step, stage, optimizer, *rest, **kwargs)
        if dump_after and step == dump_after[0]:
            dump_state(model, optimizer, dump_after[1])
        if step == die_after:
            raise Killed(f"killed after checkpoint {step}")
        return path

    def load(path, dist, model, optimizer=None, *rest, **kwargs):
        state = real_load(path, dist, model, optimizer, *rest, **kwargs)
        if dump_loaded:
            dump_state(model, optimizer, dump_loaded)
        return state

    ssrl.save_checkpoint, ssrl.load_trainer_state = save, load
    ssrl.main(argv)


def evaluate(data, out):
    from tests.helpers import tiny_dataset, tiny_model
    import tasks
    dist = ssrl.compute_init("bf16")
    if dist.rank == 0:
        tiny_dataset(data, per_task=2, eval_per_task=4, seed=11)
    torch_dist.barrier()
    held_out = tasks.load_records(data, "eval")
    torch_dist.barrier()
    if dist.rank == 1:        # rank 1's share (records 1, 3, 5, ...) loses its images after the start-up filter
        for record in held_out[1::2]:
            for image in record["images"]:
                Path(image).unlink(missing_ok=True)
    torch_dist.barrier()
    model, processor = tiny_model("qwen2_5_vl")
    model = ssrl.shard(model, dist.dtype)
    args = ssrl.parse_args(["--eval-batch-size", "3", "--max-response-length", "6"])
    results = ssrl.evaluate(args, dist, model, processor, held_out)
    if dist.rank == 0:
        Path(out).write_text(json.dumps(results))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


def memory_kb(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def load(out, argv):
    """Peak RSS above the start of ssrl.load_sharded_model (/proc's VmHWM, reset first), then the loaded weights
    gathered to rank 0 against rank 0's full model, which ssrl.load_model built as a one-process run does."""
    dist = ssrl.compute_init("fp32")
    args = ssrl.parse_args(argv)
    sources, real_broadcast = [], ssrl.broadcast_weights

    def broadcast(source, model, dist):
        sources.append(source)
        return real_broadcast(source, model, dist)

    ssrl.broadcast_weights = broadcast
    with open("/proc/self/clear_refs", "w") as handle:      # Linux: 5 resets VmHWM to the current RSS
        handle.write("5")
    before = memory_kb("VmRSS")
    model, _, _ = ssrl.load_sharded_model(args, dist)
    peaks = ssrl.gather_objects([(memory_kb("VmHWM") - before) * 1024], dist)
    weights = ssrl.consolidated_weights(model, torch.float32, dist)
    buffers = ssrl.gather_objects([{name: buffer.clone() for name, buffer in model.named_buffers()}], dist)
    del model
    if dist.rank == 0:
        one = sources[0]
        expected = one.state_dict()
        equal = (expected.keys() == weights.keys() and all(torch.equal(expected[k], weights[k]) for k in weights)
                 and all(torch.equal(b, rank[name]) for name, b in one.named_buffers() for rank in buffers))
        full_bytes = sum(p.numel() * p.element_size() for p in one.parameters())
        Path(out).write_text(json.dumps({"peak_bytes": peaks, "full_bytes": full_bytes, "equal": equal}))
    torch_dist.barrier()
    torch_dist.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "run":
        try:
            run(sys.argv[2:])
        except Killed as error:
            print(error, file=sys.stderr)
            sys.exit(3)
        except ssrl.UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
    elif sys.argv[1] == "load":
        load(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])
    else:
        evaluate(*sys.argv[2:])
