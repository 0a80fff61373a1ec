"""Pretext-task throughput: samples/s per task on 640x480 inputs, one process, decode and encode included.

    OMP_NUM_THREADS=1 python -m bench.tasks                      # per-task table, then a --workers scaling line
    OMP_NUM_THREADS=1 python -m bench.tasks --seconds 2 --workers 1 2

Inputs are rendered scenes saved in the plain RGB-D layout (NAME.jpg + NAME.npy), so each timed sample reads a
JPEG (and a .npy), builds the sample, and encodes every output image as the builder does (JPEG q95).
"""
import argparse
import io
import os
import random
import tempfile
import time

import numpy as np

import tasks


def make_inputs(folder, count, width, height):
    start = time.process_time()
    for index in range(count):
        image, depth = tasks.render_scene(random.Random(index), width, height)
        image.save(os.path.join(folder, f"scene{index:03d}.jpg"), quality=95)
        np.save(os.path.join(folder, f"scene{index:03d}.npy"), depth)
    return count / (time.process_time() - start)


def one_sample(task, image_path, depth_path, rng):
    image = tasks.load_rgb(image_path)
    entry = tasks.TASKS[task]
    sample = entry.sample(*((image, tasks.load_depth(depth_path), None, rng) if entry.depth else (image, rng)))
    for output in sample.images:
        output.save(io.BytesIO(), "JPEG", quality=95)


def time_task(task, folder, count, seconds):
    """(samples per wall second, samples per CPU second of this process, ms per attempt, share skipped)."""
    done = skipped = 0
    start, cpu_start = time.time(), time.process_time()
    while time.time() - start < seconds:
        index = (done + skipped) % count
        try:
            one_sample(task, os.path.join(folder, f"scene{index:03d}.jpg"),
                       os.path.join(folder, f"scene{index:03d}.npy"), random.Random(done + skipped))
            done += 1
        except tasks.Skip:
            skipped += 1
    wall, cpu = time.time() - start, time.process_time() - cpu_start
    return done / wall, done / cpu, 1000 * cpu / max(done + skipped, 1), skipped / max(done + skipped, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per task")
    parser.add_argument("--scenes", type=int, default=16, help="distinct 640x480 input scenes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts for the scaling line")
    parser.add_argument("--build-per-task", type=int, default=100, help="samples per task in each scaling build")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rendered = make_inputs(folder, args.scenes, 640, 480)
        start = time.process_time()
        for index in range(20):
            tasks.render_scene(random.Random(index), 112, 84)
        print(f"render_scene per CPU-s: 640x480 {rendered:.1f} scenes, 112x84 {20 / (time.process_time() - start):.1f}"
              f" scenes; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'task':10s} {'samples/s':>10s} {'per CPU-s':>10s} {'CPU ms':>7s} {'skipped':>8s}"
              "   (640x480 inputs, 1 process; per CPU-s: per busy core, less load-sensitive than wall)")
        for task in tasks.TASKS:
            rate, per_cpu, milliseconds, skipped = time_task(task, folder, args.scenes, args.seconds)
            print(f"{task:10s} {rate:10.1f} {per_cpu:10.1f} {milliseconds:7.1f} {skipped:8.0%}")
        line = []
        for workers in args.workers:
            with tempfile.TemporaryDirectory() as out:
                summary = tasks.build_dataset(out, rgbd=folder, per_task=args.build_per_task, eval_per_task=0,
                                              workers=workers, max_side=640, progress=False)
            line.append(f"{workers} worker{'s' if workers > 1 else ''}: {summary['samples_per_s']:.1f} samples/s")
        print(f"build_dataset, all tasks, {args.build_per_task}/task, 640x480 .jpg+.npy inputs: " + ", ".join(line))


if __name__ == "__main__":
    main()
