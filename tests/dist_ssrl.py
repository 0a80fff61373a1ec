"""ssrl.py under torchrun, for tests/test_ssrl_dist.py (2 ranks on gloo):

    torchrun --nproc_per_node 2 tests/dist_ssrl.py run [--die-after-save STEP] -- SSRL FLAGS
        ssrl.main with a reward an untrained policy varies on (so GRPO's updates are not no-ops); with
        --die-after-save, every rank dies right after writing checkpoint STEP (a kill between two steps)
    torchrun --nproc_per_node 2 tests/dist_ssrl.py eval DATA OUT
        ssrl.evaluate on a bf16-sharded tiny model where every image of rank 1's share is gone: both ranks must
        return, and rank 0 writes the result to OUT
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import grpo  # noqa: E402
import ssrl  # noqa: E402


def length_reward(response, answer):
    score = min(len(response), 40) / 40
    return {"overall": score, "format": 0.0, "accuracy": score}


class Killed(Exception):
    pass


def run(argv):
    die_after = None
    if argv[0] == "--die-after-save":
        die_after, argv = int(argv[1]), argv[2:]
    grpo.task_reward = length_reward
    real_save = ssrl.save_checkpoint

    def save_then_die(args, dist, model, processor, step, *rest, **kwargs):
        path = real_save(args, dist, model, processor, step, *rest, **kwargs)
        if step == die_after:
            raise Killed(f"killed after checkpoint {step}")
        return path

    ssrl.save_checkpoint = save_then_die
    ssrl.main(argv[argv.index("--") + 1:] if "--" in argv else argv)


def evaluate(data, out):
    import torch.distributed as torch_dist
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


if __name__ == "__main__":
    if sys.argv[1] == "run":
        try:
            run(sys.argv[2:])
        except Killed as error:
            print(error, file=sys.stderr)
            sys.exit(3)
    else:
        evaluate(*sys.argv[2:])
