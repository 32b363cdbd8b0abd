"""bench.py: how fast does mark_min train MARK, step by step, at the paper's hyperparameters?

    python bench.py                         # CPU, real CIFAR-100 task 0 if ./data has it, else random
    python bench.py --device cuda --json bench.json
    python bench.py --dataset random --epochs 3

Measures, on CIFAR-100's first task (2,125 training images, batch 128):
images per second of steps 1, 2, 3 and 5 (a few epochs each, after a
warm-up), the time of one meta-epoch of step 4 (K = 10 meta-tasks x 40 SGD
steps on one batch each), the arithmetic rate the KB steps achieve against a
large matrix product timed in the same run (how close the training loop is to
this machine's limit), and peak memory. The authors' code, measured on a
2-core CPU like this one (torch 2.14.1, their data loader), is printed beside.

The arithmetic per step is the paper's: same model, same batch size, same
number of epochs and inner steps; only how it is computed differs.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import experiment
import mark_min as mm
from data import DataError, Split, Task, load_tasks

# The authors' code measured on a 2-core CPU: images/s ranges and the middle.
AUTHORS = {"feature_extractor": (1190, 1280), "kb_pretrain": (720, 830),
           "masks_head": (580, 640), "consolidation": (605, 640)}
AUTHORS_META_EPOCH_S = (57, 69, 64)      # min, max, median seconds


def first_task(dataset, data_dir, device) -> Task:
    """CIFAR-100 task 0 (seed 0), or random data of the same shape and size."""
    if dataset == "cifar100":
        try:
            return load_tasks("cifar100", data_dir=data_dir, seed=0, num_tasks=1, device=device)[0]
        except DataError as err:
            print(f"(no CIFAR-100 here: {str(err).splitlines()[0]}; using random data)")
    g = torch.Generator().manual_seed(0)
    split = lambda n: Split(torch.randn(n, 3, 32, 32, generator=g).to(device),
                            torch.randint(0, 5, (n,), generator=g).to(device))
    return Task(0, list(range(5)), [f"random{i}" for i in range(5)], split(2125), split(375), split(500))


def timed(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def matmul_gflops(device, n=2048, repeats=10) -> float:
    """This machine's practical fp32 limit: a large matrix product."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    seconds, _ = timed(device, lambda: [a @ b for _ in range(repeats)])
    return 2 * n ** 3 * repeats / seconds / 1e9


def kb_flops_per_image(model, task, cfg) -> float:
    """Floating-point operations of one step-2 training step (forward and
    backward through KB + head), per image, counted by torch's flop counter."""
    x, y = task.train.x[:cfg.batch_size], task.train.y[:cfg.batch_size]
    head = model.heads[0]
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(head(model.kb(0)(x)), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(y)


@contextlib.contextmanager
def relu_before_pooling():
    """The KB's blocks as the paper writes them, maxpool(relu(conv)), while the
    block runs: mark_min pools first (the same numbers, ReLU on a quarter of
    the values); this is the way it computed them before, to measure the gain."""
    original = mm.KnowledgeBase.__dict__["conv_relu_pool"]           # the staticmethod itself
    mm.KnowledgeBase.conv_relu_pool = staticmethod(lambda conv, h: F.max_pool2d(F.relu(conv(h)), 2))
    try:
        yield
    finally:
        mm.KnowledgeBase.conv_relu_pool = original


# The meta-update as it was computed, and each change since, side by side:
# name -> (ReLU before pooling, keep freed memory); the loop over meta-tasks in
# each. Same numbers in each (tests check it); only the time differs.
META_VARIANTS = {
    "before": (True, False),         # the paper's order, glibc's default malloc
    "pool-first": (False, False),    # + max-pool before ReLU
    "malloc": (False, True),         # + freed memory kept for reuse (mark_min's default now)
}


def time_meta_variant(args) -> float:
    """One meta-epoch (K = 10 meta-tasks x 40 steps, batch 128) of the variant
    args.meta_variant, after a short warm-up. Runs in its own process (see
    compare_meta_variants)."""
    relu_first, keep = META_VARIANTS[args.meta_variant]
    if keep:
        experiment.keep_freed_memory()
    device = experiment.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = first_task(args.dataset, args.data_dir, device)
    cfg = mm.resolve_config(mm.Config(dataset="cifar100", meta_epochs=1, meta_impl="loop",
                                      meta_k=args.meta_k))
    task.train.x = task.train.x.contiguous(memory_format=torch.channels_last)
    model = mm.build_model(cfg, task.input_shape, [task.num_classes], device)
    gen = torch.Generator(device=device).manual_seed(0)
    query = mm.frozen_queries(model, 0, task.train.x)
    with relu_before_pooling() if relu_first else contextlib.nullcontext():
        mm.step4_meta_update(model, 0, task, dataclasses.replace(cfg, meta_k=2, meta_inner_steps=5),
                             gen, query)
        seconds, _ = timed(device, lambda: mm.step4_meta_update(model, 0, task, cfg, gen, query))
    return seconds


def compare_meta_variants(args, rounds) -> dict:
    """Every META_VARIANTS entry, one meta-epoch each, interleaved round by
    round so that a busy machine slows all alike; the median over rounds.
    Each measurement runs in a fresh process: once changed, glibc's malloc
    settings cannot go back to their adaptive defaults in the same process."""
    command = [sys.executable, __file__, "--device", args.device, "--dataset", args.dataset]
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    command += ["--threads", str(args.threads)] if args.threads else []
    seconds = {name: [] for name in META_VARIANTS}
    for _ in range(rounds):
        for name in META_VARIANTS:
            done = subprocess.run(command + ["--meta-variant", name], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"error: the {name} variant failed:\n{done.stderr}")
            seconds[name].append(float(done.stdout.split()[-1]))
            print(f"  meta-epoch, {name:<12s} {seconds[name][-1]:6.1f} s", flush=True)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    return {"rounds": rounds, "seconds": seconds, "median_s": median,
            "speedup_vs_before": {name: median["before"] / m for name, m in median.items()}}


def compare_streams(args, rounds) -> dict:
    """The K = 10 meta-tasks of one meta-epoch are independent: on 2 cores,
    do two one-thread streams (two processes, 5 meta-tasks each, side by
    side) beat one two-thread stream (one process, all 10)? Each process
    times its own meta-epoch after its warm-up (malloc variant, mark_min's
    default); the two-stream time is the slower of the pair, whose timed
    parts overlap because both start together and do the same setup.
    Interleaved round by round; medians."""
    command = [sys.executable, __file__, "--device", args.device, "--dataset", args.dataset,
               "--meta-variant", "malloc"] + (["--data-dir", args.data_dir] if args.data_dir else [])
    run = lambda *extra: subprocess.Popen(command + list(extra), stdout=subprocess.PIPE, text=True)
    seconds = lambda process: float(process.communicate()[0].split()[-1])
    one, two = [], []
    for _ in range(rounds):
        one.append(seconds(run("--threads", "2")))
        pair = [run("--threads", "1", "--meta-k", "5") for _ in range(2)]
        two.append(max(seconds(p) for p in pair))
        print(f"  meta-epoch, 1 process x 2 threads {one[-1]:6.1f} s; 2 processes x 1 thread "
              f"{two[-1]:6.1f} s", flush=True)
    return {"rounds": rounds, "one_process_two_threads_s": one, "two_processes_one_thread_s": two,
            "speedup_of_two_streams": statistics.median(one) / statistics.median(two)}


def measure_what_the_caches_save(model, task, cfg, gen, epochs, meta_epoch_s) -> dict:
    """What two of the optimisations save, measured in the same run.

    F_t's cached output (steps 3 and 5): step 3 again, with F_t run on every
    batch as the authors' code does (query=None is mark_min's own
    recompute path, the one the guard tests compare against).

    Masks computed once per meta-task (step 4): the authors' code runs F_t and
    M_t on each of the 40 inner steps. We time that computation on one batch
    of 128 and add the K x (inner steps - 1) repetitions it would cost to the
    measured meta-epoch; this row is computed from a measured cost, not a
    separate meta-epoch run.
    """
    device, n = task.train.x.device, len(task.train.y)
    run = lambda c: mm.step3_masks_and_head(model, 0, task, c, gen, None)
    run(dataclasses.replace(cfg, epochs_masks=1))                       # warm-up
    seconds, _ = timed(device, lambda: run(dataclasses.replace(cfg, epochs_masks=epochs)))
    x = task.train.x[:cfg.batch_size]
    with torch.no_grad():
        model.masks(x, 0)                                                   # warm-up
        once, _ = timed(device, lambda: [model.masks(x, 0) for _ in range(20)])
    repeats = cfg.meta_k * (cfg.meta_inner_steps - 1)
    out = {"masks_head_recomputing_ft": {"images_per_s": epochs * n / seconds},
           "mask_batch_s": once / 20,
           "meta_epoch_recomputing_masks_s": meta_epoch_s + repeats * once / 20}
    print(f"  {'step 3, F_t every batch':<18s} {epochs * n / seconds:8.0f} images/s  (cached F_t: see masks_head)")
    print(f"  {'meta-epoch, masks every step':<18s} {out['meta_epoch_recomputing_masks_s']:8.1f} s  "
          f"(measured meta-epoch + {repeats} x {1000 * once / 20:.1f} ms per mask computation)", flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", type=experiment.device_flag, help="cpu | cuda | auto")
    parser.add_argument("--dataset", default="cifar100", choices=["cifar100", "random"],
                        help="CIFAR-100 task 0 (default; random data of its shape if absent) or random")
    parser.add_argument("--data-dir", default=None, help="folder of the datasets (default $MARK_DATA_DIR or ./data)")
    parser.add_argument("--epochs", type=experiment.positive(int), default=2, help="measured epochs per step")
    parser.add_argument("--threads", type=experiment.positive(int), default=None,
                        help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--no-channels-last", action="store_true", help="measure the NCHW layout")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--meta-rounds", type=int, default=3,
                        help="rounds of the side-by-side meta-epoch comparison (0: skip it)")
    parser.add_argument("--stream-rounds", type=int, default=2,
                        help="rounds of one 2-thread process against two 1-thread processes (0: skip)")
    parser.add_argument("--meta-k", type=experiment.positive(int), default=10,
                        help="meta-tasks of the meta-epoch --meta-variant times (default: the paper's 10)")
    parser.add_argument("--meta-variant", choices=list(META_VARIANTS),
                        help="time one meta-epoch of this variant, print the seconds and exit "
                             "(compare_meta_variants runs each in its own process)")
    args = parser.parse_args(argv)
    if args.meta_variant:
        print(time_meta_variant(args))
        return 0
    device = experiment.resolve_device(args.device)
    experiment.keep_freed_memory()                                  # as every mark_min run does
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    task = first_task(args.dataset, args.data_dir, device)
    # The paper's hyperparameters; only the number of epochs per measurement is ours.
    cfg = mm.resolve_config(mm.Config(dataset="cifar100", profile="paper",
                                      channels_last=not args.no_channels_last))
    if cfg.channels_last:
        task.train.x = task.train.x.contiguous(memory_format=torch.channels_last)
    model = mm.build_model(cfg, task.input_shape, [task.num_classes], device)
    gen = torch.Generator(device=device).manual_seed(0)
    n = len(task.train.y)
    short = lambda **kw: dataclasses.replace(cfg, **kw)

    steps = {
        "feature_extractor": lambda c: mm.step1_feature_extractor(model, 0, task, c, gen),
        "kb_pretrain": lambda c: mm.step2_pretrain_kb(model, 0, task, c, gen),
        "masks_head": lambda c: mm.step3_masks_and_head(model, 0, task, c, gen, query),
        "consolidation": lambda c: mm.step5_consolidate(model, 0, task, c, gen, query),
    }
    epoch_field = {"feature_extractor": "epochs_fe", "kb_pretrain": "epochs_kb",
                   "masks_head": "epochs_masks", "consolidation": "epochs_consolidate"}
    results = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "dataset": args.dataset, "train_images": n, "epochs_measured": args.epochs,
               "channels_last": cfg.channels_last, "steps": {}}
    query = None
    for name, run in steps.items():
        field = epoch_field[name]
        run(short(**{field: 1}))                               # warm-up epoch
        if name == "feature_extractor":
            query = mm.step1_feature_extractor(model, 0, task, short(epochs_fe=1), gen)
        seconds, out = timed(device, lambda: run(short(**{field: args.epochs})))
        if name == "feature_extractor":
            query = out
        results["steps"][name] = {"images_per_s": args.epochs * n / seconds}
        print(f"  {name:<18s} {args.epochs * n / seconds:8.0f} images/s", flush=True)

    mm.step4_meta_update(model, 0, task, short(meta_epochs=1, meta_k=1, meta_inner_steps=5), gen, query)
    seconds, _ = timed(device, lambda: mm.step4_meta_update(model, 0, task, short(meta_epochs=1), gen, query))
    results["meta_epoch_s"] = seconds
    passes = cfg.meta_k * cfg.meta_inner_steps * cfg.batch_size
    results["meta_image_passes_per_s"] = passes / seconds
    print(f"  {'meta-epoch':<18s} {seconds:8.1f} s ({passes / seconds:.0f} image-passes/s)", flush=True)
    results["without"] = measure_what_the_caches_save(model, task, cfg, gen, args.epochs, seconds)
    if args.meta_rounds:
        results["meta_variants"] = compare_meta_variants(args, args.meta_rounds)
    if args.stream_rounds:
        results["streams"] = compare_streams(args, args.stream_rounds)

    flops = kb_flops_per_image(model, task, cfg)
    results["kb_flops_per_image"] = flops
    results["kb_gflops"] = flops * results["steps"]["kb_pretrain"]["images_per_s"] / 1e9
    results["matmul_gflops"] = matmul_gflops(device)
    results["peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    # One task at the paper's hyperparameters, and the 20-task protocol, from these rates.
    e = cfg.epochs_fe, cfg.epochs_kb, cfg.epochs_masks, cfg.epochs_consolidate
    r = [results["steps"][k]["images_per_s"] for k in epoch_field]
    per_task = (e[0] * n / r[0] + e[2] * n / r[2] + e[3] * n / r[3] + cfg.meta_epochs * seconds)
    results["projected_task_s"] = per_task
    results["projected_protocol_h"] = (20 * per_task + e[1] * n / r[1]) / 3600
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def print_table(r):
    print(f"\nmark-min on {r['device']} ({r['threads']} threads, torch {r['torch']}, {r['dataset']} "
          f"task 0, {r['train_images']} images, batch 128, {r['epochs_measured']} epochs per step)")
    print("| step | authors' code | mark-min | speed-up vs middle |")
    print("|---|---|---|---|")
    names = {"feature_extractor": "1 feature extractor", "kb_pretrain": "2 KB pre-training",
             "masks_head": "3 masks + head", "consolidation": "5 consolidation"}
    for key, label in names.items():
        lo, hi = AUTHORS[key]
        ours = r["steps"][key]["images_per_s"]
        print(f"| {label} | {lo:,}-{hi:,} images/s | {ours:,.0f} images/s | {ours / ((lo + hi) / 2):.2f}x |")
    lo, hi, mid = AUTHORS_META_EPOCH_S
    print(f"| 4 one meta-epoch | {lo}-{hi} s (median {mid}) | {r['meta_epoch_s']:.1f} s | "
          f"{mid / r['meta_epoch_s']:.2f}x |")
    print(f"| one task, paper hyperparameters | ~1,080 s | {r['projected_task_s']:.0f} s (projected) | "
          f"{1080 / r['projected_task_s']:.2f}x |")
    print(f"| full 20-task protocol, one seed | ~6.1-6.5 h | {r['projected_protocol_h']:.2f} h (projected) | |")
    print(f"\nKB training step: {r['kb_flops_per_image'] / 1e6:.0f} MFLOP per image -> "
          f"{r['kb_gflops']:.1f} GFLOP/s achieved; a 2048x2048 matmul reaches {r['matmul_gflops']:.1f} "
          f"GFLOP/s ({100 * r['kb_gflops'] / r['matmul_gflops']:.0f}% of it). Peak memory "
          f"{r['peak_memory_mb']:.0f} MB.")
    if "meta_variants" in r:
        v = r["meta_variants"]
        print(f"One meta-epoch, side by side ({v['rounds']} interleaved rounds, medians): "
              + ", ".join(f"{name} {s:.1f} s ({v['speedup_vs_before'][name]:.2f}x)"
                          for name, s in v["median_s"].items()))
    if "streams" in r:
        v = r["streams"]
        print(f"One meta-epoch on 2 cores ({v['rounds']} rounds, medians): one process with 2 threads "
              f"{statistics.median(v['one_process_two_threads_s']):.1f} s, two processes with 1 thread and "
              f"5 meta-tasks each {statistics.median(v['two_processes_one_thread_s']):.1f} s "
              f"({v['speedup_of_two_streams']:.2f}x)")
    w = r["without"]
    print(f"What the caches save: step 3 runs at {w['masks_head_recomputing_ft']['images_per_s']:,.0f} "
          f"images/s with F_t on every batch vs {r['steps']['masks_head']['images_per_s']:,.0f} with F_t "
          f"cached; a meta-epoch that recomputed the masks on every inner step would take "
          f"{w['meta_epoch_recomputing_masks_s']:.1f} s vs {r['meta_epoch_s']:.1f} s.")


if __name__ == "__main__":
    sys.exit(main())
