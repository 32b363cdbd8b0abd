"""test_task_inference.py: evaluation without the task id (task_inference.py)."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import experiment
import mark_min as mm
import supsup as supsup_mod
import task_inference as ti
from data import Split, Task
from test_mark import CPU, run_tiny, tiny_cfg, tiny_setup, tiny_tasks

def separable_tasks(T=3, k=2):
    """Task t's images are a fixed random pattern of its own, plus or minus a
    class offset: trivially told apart, both task and class."""
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t in range(T):
        pattern = torch.randn(1, 20, 20, generator=g)

        def split(n):
            y = torch.arange(n) % k
            x = pattern + 0.5 * (y.float() * 2 - 1)[:, None, None, None] \
                + 0.1 * torch.randn(n, 1, 20, 20, generator=g)
            return Split(x, y)
        tasks.append(Task(t, [t * k, t * k + 1], ["a", "b"], split(64), split(8), split(40)))
    return tasks


def test_query_statistics_are_class_means_and_within_class_variance():
    query = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 10.0], [0.0, 12.0]])
    means, var = ti.class_statistics(query, torch.tensor([0, 0, 2, 2]), 3)
    assert torch.equal(means[0], torch.tensor([2.0, 0.0]))
    assert torch.equal(means[2], torch.tensor([0.0, 11.0]))
    assert torch.isinf(means[1]).all()                              # class 1 has no sample
    assert torch.allclose(var, torch.tensor([0.5, 0.5]))            # ((+-1)^2 + 0 + 0) / 4 per unit
    # a unit that never varies gets the floor, 1% of the mean variance, not 0
    _, var = ti.class_statistics(torch.tensor([[1.0, 5.0], [3.0, 5.0]]), torch.tensor([1, 1]), 2)
    assert torch.allclose(var, torch.tensor([1.0, 0.005]))


def test_statistics_of_a_run_are_those_of_each_tasks_training_queries():
    cfg, tasks, model, gen, timer = tiny_setup(T=2)
    for t in range(2):
        mm.train_task_mark(model, t, tasks[t], cfg, gen, timer)
    stats = ti.query_statistics(model, tasks)
    for t in range(2):
        means, var = ti.class_statistics(model.eval().extractors(tasks[t].train.x, t), tasks[t].train.y, 3)
        assert torch.allclose(stats.means[t], means) and torch.allclose(stats.var[t], var)


def test_query_distance_uses_the_nearest_class_not_the_overall_mean():
    """Task 0's classes sit at (+-3, 0); a batch of task 1 lies at (0, 0), in
    the empty middle between them. One Gaussian around task 0's overall mean
    (0, 0) would call that batch typical of task 0 (the failure we measured);
    the nearest-class-mean distance gives it to task 1."""
    model = mm.build_model(tiny_cfg(latent=2), (1, 20, 20), [2, 2], CPU)
    model.extractors[0], model.extractors[1] = nn.Identity(), nn.Identity()   # query = input
    g = torch.Generator().manual_seed(0)
    task0 = torch.cat([torch.tensor([[3.0, 0.0]]), torch.tensor([[-3.0, 0.0]])]).repeat(50, 1)
    task1 = torch.cat([torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 6.0]])]).repeat(50, 1)
    stats = [ti.class_statistics(q + 0.3 * torch.randn(q.shape, generator=g), torch.tensor([0, 1]).repeat(50), 2)
             for q in (task0, task1)]
    stats = ti.QueryStatistics(torch.stack([m for m, _ in stats]), torch.stack([v for _, v in stats]))
    middle = 0.3 * torch.randn(16, 2, generator=g)
    assert ti.query_distance(model, stats, middle, 1) < ti.query_distance(model, stats, middle, 0)
    near0 = torch.tensor([3.0, 0.0]) + 0.3 * torch.randn(16, 2, generator=g)
    assert ti.query_distance(model, stats, near0, 0) < ti.query_distance(model, stats, near0, 1)


@pytest.mark.parametrize("supsup", [False, True])
def test_task_inference_finds_the_task_on_a_trivially_separable_stream(supsup):
    torch.manual_seed(0)
    cfg = tiny_cfg(supsup_mod.SupSupConfig, latent=16, lr=0.05, batch_size=32, epochs_fe=8, epochs_kb=8, epochs_masks=8,
                   epochs_consolidate=2)
    tasks = separable_tasks()
    build = supsup_mod.build_model if supsup else mm.build_model
    model = build(cfg, tasks[0].input_shape, [2, 2, 2], CPU)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        mm.train_task_mark(model, t, tasks[t], cfg, gen, experiment.StepTimer(CPU, lambda *_: None))
    result = ti.evaluate_without_task_id(model, tasks, batch_size=20)["query"]
    assert result["task_inference_accuracy"] == 1.0
    given_acc = np.mean([experiment.evaluate(model, t, tasks[t].test) for t in range(3)])
    assert result["accuracy_inferred_task"] == pytest.approx(given_acc)


def test_models_without_feature_extractors_infer_the_task_by_entropy_only():
    """Baselines 1, 2 and 4 have no F_t: --infer-task reports the entropy score
    for them instead of failing at the end of a finished run."""
    tasks = tiny_tasks(T=2)
    model = mm.build_model(tiny_cfg(), tasks[0].input_shape, [3, 3], CPU, masks=False)
    result = ti.evaluate_without_task_id(model, tasks)
    assert set(result) == {"entropy", "batch_size"}
    assert 0 <= result["entropy"]["task_inference_accuracy"] <= 1


def test_infer_task_on_a_finished_run_evaluates_its_checkpoint_without_training(tmp_path, monkeypatch):
    first = run_tiny(tmp_path, monkeypatch)["runs"][0]
    assert "task_agnostic" not in first
    trained = []
    counting = lambda *args: trained.append(args) or mm.train_task_mark(*args)
    again = run_tiny(tmp_path, monkeypatch, train_task=counting, resume=True, after_run=ti.AFTER_RUN)["runs"][0]
    assert trained == []                                      # nothing trained again
    assert again["acc_matrix"] == first["acc_matrix"]
    assert set(again["task_agnostic"]) == {"entropy", "query", "batch_size", "accuracy_given_task"}
    assert "task_agnostic" in json.loads((tmp_path / "results.json").read_text())["runs"][0]



def test_a_one_hot_superposition_is_task_ts_own_forward():
    """SupSup's superposition with alpha = e_t runs exactly task t's supermasks."""
    cfg, tasks, model, gen, timer = tiny_setup(T=3, build=supsup_mod.build_model,
                                               config_class=supsup_mod.SupSupConfig, shared_fe=True)
    model.eval()
    x = tasks[0].test.x[:8]
    for t in range(3):
        alpha = torch.nn.functional.one_hot(torch.tensor(t), 3).float()
        q = model.extractors(x, t)
        masks = model.mask_generators.superposed(q, alpha)
        assert all(torch.equal(a, b) for a, b in zip(masks, model.mask_generators(q, t)))
        assert torch.equal(model.heads.superposed(model.kb(t)(x, masks), alpha), model(x, t))


def test_one_shot_inference_runs_only_where_masks_can_be_superposed():
    """SupSup's one-shot rule needs one shared F and supermasks; it is
    reported for MARK + SupSup with --shared-fe and for nothing else."""
    tasks = separable_tasks()
    for shared, build, expected in [(True, supsup_mod.build_model, True), (False, supsup_mod.build_model, False),
                                    (True, mm.build_model, False)]:
        cfg = tiny_cfg(supsup_mod.SupSupConfig, shared_fe=shared)
        model = build(cfg, tasks[0].input_shape, [2, 2, 2], CPU)
        assert ti.superposable(model) == expected
        assert ("one-shot" in ti.evaluate_without_task_id(model, tasks, batch_size=20)) == expected


def test_one_shot_inference_follows_the_entropys_descent():
    """MARK + SupSup with a shared F on the separable stream: the one-shot rule
    (the most negative gradient of the entropy w.r.t. alpha) finds the task
    of 4 of the 6 test batches (chance: 2); the most positive finds none."""
    tasks = separable_tasks()
    cfg = tiny_cfg(supsup_mod.SupSupConfig, shared_fe=True, latent=16, lr=0.05, batch_size=32, epochs_fe=8,
                   epochs_kb=8, epochs_masks=8, epochs_consolidate=4)
    torch.manual_seed(0)
    model = supsup_mod.build_model(cfg, tasks[0].input_shape, [2, 2, 2], CPU)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        mm.train_task_mark(model, t, tasks[t], cfg, gen, experiment.StepTimer(CPU, lambda *_: None))
    everything = ti.evaluate_without_task_id(model, tasks, batch_size=20)
    result = everything["one-shot"]
    assert result["task_inference_accuracy"] == pytest.approx(4 / 6)
    # each score's cost is measured: its own time per batch
    assert all(everything[name]["seconds_per_batch"] > 0 for name in ("entropy", "query", "one-shot"))
