"""task_inference.py: MARK without the task id, evaluated after a run (beyond the report).

    python task_inference.py --runs 3 --out runs/glyphs_infer          # MARK, then the evaluation
    python task_inference.py --supsup --out runs/glyphs_infer_supsup   # MARK + SupSup
    python task_inference.py --out runs/glyphs --resume                # a finished run's checkpoint

MARK, like the paper, is told which task a test image comes from. Here it is
not: each test batch (all from one task u) is assigned the task t that scores
best among all learned tasks, then classified with task t's model; a wrong
task means a wrong label space, so every image of that batch is an error.
Two scores, both reported (results.json, "task_agnostic"):

  entropy  run every task's full model (F_t, M_t, KB, C_t) and take the most
           confident one (lowest mean normalised entropy). T full forward
           passes per batch. ReLU networks are confidently wrong far from
           their training data, so this can fail even on easy streams.
  query    how far F_t(x) lies from the nearest class mean of task t's
           training queries, in units of their within-class std (Lee et al.,
           2018, with a diagonal covariance; see query_distance). T
           feature-extractor passes + 1 full pass per batch.

  one-shot SupSup's own rule (Wortsman et al. 2020, Section 3.3), for MARK +
           SupSup with one shared F (--supsup --shared-fe), where a task's
           only own parts are supermasks: superpose every task's masks with
           weights alpha = 1/T, take one gradient of the output entropy
           with respect to alpha, and pick the task whose alpha lowers it
           most. One forward and one backward pass per batch. It needs the
           shared F: with a feature extractor per task, the queries, and
           hence the masks, cannot be superposed.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import experiment
import mark_min as mm
import supsup
from experiment import param


@dataclass
class InferenceConfig(supsup.SupSupConfig):
    supsup: bool = param(False, "run MARK + SupSup (supsup.py) instead of MARK")


@dataclass
class QueryStatistics:
    """Per task t: the class means of its training queries F_t(x), (T, k, D)
    (inf for a class with no sample: never the nearest), and their
    within-class variance per query unit, (T, D)."""
    means: torch.Tensor
    var: torch.Tensor


def class_statistics(query, y, k):
    """The class means of queries (N, D) with classes y (N,) of k, (k, D) (inf
    for a class with no sample: never the nearest), and their within-class
    variance per unit, (D,), floored at 1% of its mean so that a unit that is
    dead on the training data cannot dominate a distance."""
    counts = torch.bincount(y, minlength=k).to(query.dtype)                     # (k,)
    sums = torch.zeros(k, query.shape[1], device=query.device).index_add_(0, y, query)
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None],
                        torch.full_like(sums, math.inf))
    var = (query - means[y]).pow(2).mean(0)
    return means, var.clamp_min(0.01 * float(var.mean()) + 1e-12)


@torch.no_grad()
def query_statistics(model: mm.MARKNet, tasks) -> QueryStatistics:
    """class_statistics of each task's training queries F_t(x): (k + 1) x D
    numbers per task. F_t is frozen from step 1 on, so these are the queries
    steps 3-5 trained on. With several labels (MarketCL) the first label's
    classes."""
    k = max(task.num_classes for task in tasks)
    stats = [class_statistics(mm.frozen_queries(model, t, task.train.x),
                              task.train.y if task.train.y.dim() == 1 else task.train.y[:, 0], k)
             for t, task in enumerate(tasks)]
    return QueryStatistics(torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats]))


def normalised_entropy(logits):
    """Mean entropy of the softmax over a batch, divided by log k (in [0, 1])."""
    logp = F.log_softmax(logits, 1)
    return -(logp.exp() * logp).sum(1).mean() / math.log(logits.shape[1])


def query_distance(model: mm.MARKNet, stats: QueryStatistics, xb, t):
    """How unlike task t's training queries F_t(xb) are: for each image, the
    squared distance to the NEAREST class mean of task t's training queries,
    per unit in units of the within-class variance; the mean over the batch.

    Why class means and not one mean: F_t is trained to separate task t's
    classes, so its queries form one cluster per class. A single Gaussian
    around the overall mean calls the empty middle between the clusters the
    most typical place, and an unfamiliar image, which excites no class's
    features, lands exactly there: that score picked a wrong task for every
    test batch of CIFAR-100 and glyphs (measured).
    """
    q = model.extractors(xb, t)                                                # (B, D)
    d2 = ((q[:, None, :] - stats.means[t]) ** 2 / stats.var[t]).mean(2)         # (B, k)
    return d2.min(1).values.mean()


def one_shot_task(model: mm.MARKNet, xb) -> int:
    """SupSup's one-shot task inference on a batch: the task t whose weight
    alpha_t in the superposition of all supermasks (alpha = 1/T each) has
    the most negative gradient of the mean normalised entropy."""
    T = len(model.mask_generators.layers[0].scores)
    with torch.inference_mode(False), torch.enable_grad():
        alpha = torch.full((T,), 1.0 / T, device=xb.device, requires_grad=True)
        q = model.extractors(xb, 0)                           # the shared F: the same for every task
        z = model.kb(0)(xb, model.mask_generators.superposed(q, alpha))
        entropy = normalised_entropy(model.heads.superposed(z, alpha))
        (gradient,) = torch.autograd.grad(entropy, alpha)
    return int(gradient.argmin())


def superposable(model) -> bool:
    """One shared F and supermasks for M and C: SupSup's one-shot rule applies."""
    return (model.use_masks and getattr(model.extractors, "shared", False)
            and hasattr(model.mask_generators, "superposed") and hasattr(model.heads, "superposed"))


@contextlib.contextmanager
def timed(counts: dict):
    """Add the wall time of the with-block to counts["seconds"]."""
    started = time.perf_counter()
    yield
    counts["seconds"] += time.perf_counter() - started


@torch.inference_mode()
def evaluate_without_task_id(model: mm.MARKNet, tasks, batch_size=128) -> dict:
    """Both scores over every test batch of every task: the fraction of batches
    whose task is found, and the accuracy when the inferred task's model
    classifies (a batch given to the wrong task counts as all wrong)."""
    model.eval()
    T = len(tasks)
    names = ("entropy", "query") if model.use_masks else ("entropy",)   # baselines have no F_t
    names += ("one-shot",) if superposable(model) else ()
    stats = query_statistics(model, tasks) if model.use_masks else None
    tally = {name: {"hits": 0, "correct": 0, "seconds": 0.0} for name in names}
    batches = seen = 0
    for u, task in enumerate(tasks):
        for xb, yb in zip(task.test.x.split(batch_size), task.test.y.split(batch_size)):
            with timed(tally["entropy"]):
                logits = [model(xb, t) for t in range(T)]
                guesses = {"entropy": int(torch.stack([normalised_entropy(lg) for lg in logits]).argmin())}
            if model.use_masks:
                with timed(tally["query"]):
                    guesses["query"] = int(torch.stack([query_distance(model, stats, xb, t)
                                                        for t in range(T)]).argmin())
            if "one-shot" in names:
                with timed(tally["one-shot"]):
                    guesses["one-shot"] = one_shot_task(model, xb)
            for name, guess in guesses.items():
                if guess == u:
                    tally[name]["hits"] += 1
                    tally[name]["correct"] += int((logits[u].argmax(1) == yb).sum())
            batches, seen = batches + 1, seen + len(yb)
    return {name: {"task_inference_accuracy": c["hits"] / batches,
                   "accuracy_inferred_task": c["correct"] / seen,
                   "forward_passes_per_batch": {"entropy": f"{T} full", "query": f"{T} F_t + 1 full",
                                                "one-shot": "1 full + 1 backward (superposed)"}[name],
                   # the score's own work per batch (the query score's class
                   # statistics, computed once before, not included)
                   "seconds_per_batch": c["seconds"] / batches}
            for name, c in tally.items()} | {"batch_size": batch_size}


def after_run(model, tasks, record, log) -> dict:
    """experiment.run_seed's after_run: evaluate the finished model without the
    task id, log both scores, return what results.json keeps."""
    agnostic = evaluate_without_task_id(model, tasks)
    for name in [n for n in ("entropy", "query", "one-shot") if n in agnostic]:
        log(f"[{record['method']} seed {record['seed']}] without the task id ({name}): task inferred for "
            f"{100 * agnostic[name]['task_inference_accuracy']:.1f}% of test batches, accuracy "
            f"{100 * agnostic[name]['accuracy_inferred_task']:.2f}% (task given: {100 * record['acc']:.2f}%); "
            f"{1000 * agnostic[name]['seconds_per_batch']:.1f} ms per batch of {agnostic['batch_size']}")
    return agnostic | {"accuracy_given_task": record["acc"]}


AFTER_RUN = ("task_agnostic", after_run)


def main(argv=None):
    cfg, given, args = mm.parse(argv, InferenceConfig, __doc__.split("\n\n")[0])
    method, build = ("supsup", supsup.build_model) if cfg.supsup else ("mark", mm.build_model)
    if args.describe:
        return experiment.report_errors(lambda: mm.describe(cfg, build=build), cfg)
    return experiment.report_errors(
        lambda: mm.run(cfg, given, method, build=build, after_run=AFTER_RUN), cfg)


if __name__ == "__main__":
    sys.exit(main())
