"""test_mark.py: the properties MARK relies on, each a test that fails when it breaks.

    python -m pytest -q

No test needs the internet, a GPU (CUDA tests skip without one) or any
downloaded data: every dataset a test uses is built by the test.
"""
from pathlib import Path
import ast
import baselines
import copy
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

import baselines
import data
import mark_min as mm
import market_data
from data import DataError, Sequences, Split, Task, load_tasks
from market_data import load_market, write_synthetic_market
from metrics import (average_accuracy, backward_transfer, forgetting, format_matrix, format_table,
                     forward_transfer, macro_f1, mean_std, summarize_runs)

SETTINGS = settings(max_examples=20, deadline=None)
# The models here are tiny: one thread is faster, and immune to a busy CPU.
torch.set_num_threads(1)


# ---------------------------------------------------------------------------
# Helpers: a tiny configuration and a tiny, easy stream built in memory
# ---------------------------------------------------------------------------

def tiny_cfg(**overrides):
    """Small layers so a whole 3-task run takes about a second; same code paths
    as the paper's. Enough epochs that every method really learns the tiny
    stream (see test_the_tiny_stream_is_learned_and_baseline1_forgets_it):
    a test that compares accuracy matrices must not compare constants."""
    base = dict(dataset="tiny", profile="paper", kb_channels=(8, 16, 32), fe_channels=(4, 4),
                latent=16, batch_size=16, epochs_fe=5, epochs_kb=20, epochs_masks=5,
                epochs_consolidate=5, meta_epochs=1, meta_k=2, meta_inner_steps=2)
    base.update(overrides)
    return mm.resolve_config(mm.Config(**base), overridden=set(base))


def tiny_tasks(T=3, k=3, n_train=48, shape=(1, 20, 20), seed=0):
    """T tasks of k classes; each class a fixed random prototype plus noise of
    the same size. Every task draws its own prototypes, so task t's modules
    know nothing of task u's classes (chance on them), and a KB retrained on
    task t forgets the features task u needed (Baseline 1 forgets)."""
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t in range(T):
        protos = torch.randn(k, *shape, generator=g)

        def split(n):
            y = torch.arange(n) % k
            return Split(protos[y] + torch.randn(n, *shape, generator=g), y)
        tasks.append(Task(t, list(range(t * k, t * k + k)), [f"c{t * k + i}" for i in range(k)],
                          split(n_train), split(12), split(48)))
    return tasks


def tiny_setup(T=3, **cfg_overrides):
    """Seeded tiny config, stream, model, data generator and a silent step timer."""
    torch.manual_seed(0)
    cfg, tasks = tiny_cfg(**cfg_overrides), tiny_tasks(T=T)
    model = mm.build_model(cfg, tasks[0].input_shape, [t.num_classes for t in tasks], CPU)
    return cfg, tasks, model, torch.Generator().manual_seed(0), mm.StepTimer(CPU, lambda *_: None)


def snapshot(module: nn.Module):
    """Every parameter and buffer, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} changed"


CPU = torch.device("cpu")


# ---------------------------------------------------------------------------
# The model: parameter counts and sizes
# ---------------------------------------------------------------------------

def test_parameter_counts_for_cifar100_equal_the_reference_table():
    model = mm.MARKNet((3, 32, 32), [5] * 20, mm.Config())
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model.kbs[0]) == 339_520
    assert count(model.extractors[0]) == 158_528
    assert count(model.mask_generators[0]) == 57_792
    assert count(model.heads[0]) == 645
    assert count(model) == 339_520 + 20 * (158_528 + 57_792 + 645)   # about 4.68M


def test_describe_prints_the_table_without_data(capsys):
    cfg, _, _ = mm.parse_config(["--dataset", "cifar100"])
    total = mm.describe(cfg)
    out = capsys.readouterr().out
    assert total == 339_520 + 20 * 216_965
    for number in ("339,520", "158,528", "57,792", "645", f"{total:,d}"):
        assert number in out



def test_describe_covers_the_lstm_family_with_four_label_heads(capsys):
    """MarketCL: the table is counted on the model a market run builds (LSTM
    KB 27 -> 64 -> 128 -> 256, heads of 4 labels x 4 classes), T from --num-tasks."""
    cfg, _, _ = mm.parse_config(["--dataset", "market", "--num-tasks", "3"])
    total = mm.describe(cfg)
    out = capsys.readouterr().out
    model = mm.MARKNet((375, len(market_data.MARKET_FEATURE_NAMES)), [4] * 3, cfg, labels=4)
    assert total == sum(p.numel() for p in model.parameters())
    assert "4 labels of 4 classes per task, 3 tasks" in out
    assert f"{256 * 16 + 16:,d}" in out                      # one head: 256 -> 4 x 4 logits

@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 20, 20), (3, 28, 28)])
def test_sizes_follow_the_input_shape(shape):
    model = mm.MARKNet(shape, [5, 4], mm.Config())
    x = torch.randn(2, *shape)
    assert model(x, 0).shape == (2, 5)
    assert model(x, 1).shape == (2, 4)


# ---------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------

@SETTINGS
@given(batch=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_all_ones_mask_gives_exactly_the_unmasked_kb(batch, seed):
    torch.manual_seed(seed)
    kb = mm.KnowledgeBase((3, 32, 32)).eval()
    x = torch.randn(batch, 3, 32, 32)
    ones = [torch.ones(batch, c) for c in (64, 128, 256)]
    assert torch.equal(kb(x, ones), kb(x, None))


@SETTINGS
@given(block=st.integers(0, 2), channel=st.integers(0, 15), seed=st.integers(0, 2**16))
def test_a_zeroed_mask_channel_cuts_that_channels_filter_out(block, channel, seed):
    torch.manual_seed(seed)
    kb = mm.KnowledgeBase((1, 20, 20), channels=(16, 16, 16)).eval()
    x = torch.randn(3, 1, 20, 20)
    masks = [torch.rand(3, 16) + 0.1 for _ in range(3)]
    masks[block][:, channel] = 0
    before = kb(x, masks)
    with torch.no_grad():                        # scramble that channel's filter and bias
        kb.convs[block].weight[channel].uniform_(0.5, 1.0)   # positive: the channel fires
        kb.convs[block].bias[channel] = 5.0
    assert torch.equal(kb(x, masks), before)
    masks[block][:, channel] = 1                 # control: with the channel open it matters
    assert not torch.equal(kb(x, masks), before)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_masks_have_one_value_per_image_and_channel_in_the_activation_range(activation):
    torch.manual_seed(0)
    model = mm.MARKNet((1, 20, 20), [5], mm.Config(mask_activation=activation)).eval()
    masks = model.masks(torch.randn(7, 1, 20, 20) * 3, 0)
    assert [tuple(m.shape) for m in masks] == [(7, 64), (7, 128), (7, 256)]
    # Large queries drive the pre-activations far to both sides of 0.
    q = F.relu(torch.randn(7, 128)) * 10
    values = torch.cat([m.flatten() for m in model.mask_generators(q, 0)])
    if activation == "relu":   # clipped at 0 and unbounded above: zeros and scales above 1
        assert (values >= 0).all() and (values == 0).any() and (values > 1).any()
    else:                      # strictly inside (0, 1)
        assert ((values > 0) & (values < 1)).all()
    assert not torch.equal(masks[0][0], masks[0][1]), "masks must depend on the input"


# ---------------------------------------------------------------------------
# Training steps: what each step trains, and task isolation
# ---------------------------------------------------------------------------

def test_training_task_t_leaves_every_earlier_task_module_bit_identical():
    cfg, tasks, model, gen, timer = tiny_setup(T=3)
    for t in range(3):
        earlier = {s: [snapshot(m) for m in (model.extractors[s], model.mask_generators[s],
                                              model.heads[s])] for s in range(t)}
        mm.train_task_mark(model, t, tasks[t], cfg, gen, timer)
        for s, snaps in earlier.items():
            for before, module in zip(snaps, (model.extractors[s], model.mask_generators[s],
                                              model.heads[s])):
                assert_identical(before, snapshot(module))   # includes BN running stats


def test_each_task_is_solved_by_its_own_modules_and_not_by_another_tasks():
    """The tiny stream is learned (chance is 1/3), and the task-specific modules
    matter: task u's test images scored with task t's F, M and C (t != u) are
    far less accurate. Without this, a matrix R filled with the wrong task's
    modules would look like any other."""
    model, tasks, R, _ = train_method("mark")
    own = [mm.evaluate(model, u, tasks[u].test) for u in range(3)]
    other = [mm.evaluate(model, t, tasks[u].test) for u in range(3) for t in range(3) if t != u]
    assert min(own) >= 0.8 and np.mean(other) < min(own) - 0.3, (own, other)
    assert backward_transfer(R) > -0.05, R


def test_frozen_feature_extractor_keeps_its_batchnorm_statistics():
    """The authors' code let F_t's BN statistics drift after step 1 (a bug)."""
    cfg, tasks, model, gen, timer = tiny_setup(T=1)
    q = mm.step1_feature_extractor(model, 0, tasks[0], cfg, gen)
    after_step1 = snapshot(model.extractors[0])
    mm.step3_masks_and_head(model, 0, tasks[0], cfg, gen, q)
    mm.step5_consolidate(model, 0, tasks[0], cfg, gen, q)
    assert_identical(after_step1, snapshot(model.extractors[0]))
    assert not any(p.requires_grad for p in model.extractors[0].parameters())


def test_step3_trains_only_the_mask_generator_and_head_of_task_t():
    cfg, tasks, model, gen, timer = tiny_setup(T=2)
    q = mm.step1_feature_extractor(model, 1, tasks[1], cfg, gen)
    before = snapshot(model)
    mm.step3_masks_and_head(model, 1, tasks[1], cfg, gen, q)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "step 3 must train something"
    assert all(k.startswith(("mask_generators.1.", "heads.1.")) for k in changed), changed


def test_with_the_kb_frozen_after_task_one_earlier_predictions_are_bit_identical():
    """The ablation (no step 4): BWT is exactly 0 because nothing task s uses moves."""
    cfg, tasks, model, gen, timer = tiny_setup(T=3)
    mm.train_task_mark(model, 0, tasks[0], cfg, gen, timer, meta=False)
    model.eval()
    with torch.inference_mode():
        first = model(tasks[0].test.x, 0).clone()
    for t in (1, 2):
        mm.train_task_mark(model, t, tasks[t], cfg, gen, timer, meta=False)
    with torch.inference_mode():
        assert torch.equal(model(tasks[0].test.x, 0), first)


# ---------------------------------------------------------------------------
# The meta-update (step 4)
# ---------------------------------------------------------------------------

def reference_meta_update(model, t, task, cfg, gen_state, rng_state, sign):
    """Step 4 computed the plain way, independently of mark_min: deep-copied
    KB, torch.optim.SGD, theta + sign * eps * sum_i w_i delta_i / K (no outer
    weight decay in these tests)."""
    gen = torch.Generator().manual_seed(0)
    gen.set_state(gen_state)
    torch.set_rng_state(rng_state)
    x, y = task.train.x, task.train.y
    batches = torch.randperm(len(y), generator=gen).split(cfg.batch_size)[:cfg.meta_k]
    heads = [nn.Linear(cfg.latent, task.num_classes) for _ in batches]
    kb = model.kb(t)
    theta = {k: v.detach().clone() for k, v in kb.named_parameters()}
    deltas, accs = [], []
    for idx, head in zip(batches, heads):
        copy_kb = copy.deepcopy(kb).train().requires_grad_(True)
        with torch.no_grad():
            masks = model.masks(x[idx], t)
        params = [*copy_kb.parameters(), *head.parameters()]
        opt = torch.optim.SGD(params, lr=cfg.meta_inner_lr, momentum=cfg.momentum,
                              weight_decay=cfg.meta_inner_weight_decay)
        for _ in range(cfg.meta_inner_steps):
            opt.zero_grad()
            F.cross_entropy(head(copy_kb(x[idx], masks)), y[idx]).backward()
            opt.step()
        copy_kb.train(cfg.meta_acc_dropout)        # the authors measure acc_i with dropout on
        with torch.no_grad():
            accs.append((head(copy_kb(x[idx], masks)).argmax(1) == y[idx]).float().mean())
        deltas.append({k: v.detach() - theta[k] for k, v in copy_kb.named_parameters()})
    w = torch.stack(accs) / torch.stack(accs).sum()
    K = len(deltas)
    return {k: theta[k] + sign * cfg.meta_outer_lr * sum(w[i] * deltas[i][k] for i in range(K)) / K
            for k in theta}, w


def prepared_model(cfg, task, seed=0):
    """A model through steps 1-3 on one task, ready for a meta-update."""
    torch.manual_seed(seed)
    model = mm.build_model(cfg, task.input_shape, [task.num_classes], CPU)
    gen = torch.Generator().manual_seed(seed)
    q = mm.step1_feature_extractor(model, 0, task, cfg, gen)
    mm.step2_pretrain_kb(model, 0, task, cfg, gen)
    mm.step3_masks_and_head(model, 0, task, cfg, gen, q)
    return model, gen, q


@pytest.mark.parametrize("meta_sign,sign,dropout,acc_dropout", [
    ("reptile", +1.0, 0.0, False), ("authors", -1.0, 0.0, False), ("reptile", +1.0, 0.5, False),
    ("authors", -1.0, 0.5, True)])
def test_meta_update_matches_a_direct_computation(meta_sign, sign, dropout, acc_dropout):
    """Step 4 against deep-copied KBs trained by torch.optim.SGD. With dropout
    on, both draw the same dropout masks in the same order (the inner loop
    runs with dropout, as in the authors' code; acc_i is measured without)."""
    cfg = tiny_cfg(dropout=dropout, meta_outer_lr=0.5, meta_outer_weight_decay=0.0, meta_k=3,
                   meta_inner_steps=5, meta_sign=meta_sign, channels_last=False,
                   meta_acc_dropout=acc_dropout)
    task = tiny_tasks(T=1, n_train=64)[0]
    model, gen, q = prepared_model(cfg, task)
    gen_state, rng_state = gen.get_state(), torch.get_rng_state()
    expected, w = reference_meta_update(model, 0, task, cfg, gen_state, rng_state, sign)
    before = snapshot(model.kb(0))
    gen.set_state(gen_state)
    torch.set_rng_state(rng_state)
    mm.step4_meta_update(model, 0, task, cfg, gen, q)
    moved = 0.0
    for k, v in model.kb(0).named_parameters():
        torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-5)
        moved = max(moved, (v - before[k]).abs().max().item())
    assert moved > 1e-4, "the test must see the KB move (10x the tolerance)"


def test_reptile_moves_the_kb_towards_the_adapted_weights_and_the_authors_sign_away():
    """The adapted weights theta_i' come from the independent reference
    (deep copies trained by torch.optim.SGD). Reptile's step brings the KB
    closer to their accuracy-weighted mean; the authors' sign takes it further
    away. The outer weight decay is left on, as in the paper's settings."""
    cfg = tiny_cfg(dropout=0.0, meta_outer_lr=0.5, meta_k=3, meta_inner_steps=5, channels_last=False)
    task = tiny_tasks(T=1, n_train=64)[0]
    distance = {}
    for meta_sign in ("reptile", "authors"):
        sign_cfg = dataclasses.replace(cfg, meta_sign=meta_sign)
        model, gen, q = prepared_model(sign_cfg, task)
        gen_state, rng_state = gen.get_state(), torch.get_rng_state()
        # eps = K: the reference returns theta + sum_i w_i delta_i, the weighted mean of theta_i'
        target, _ = reference_meta_update(model, 0, task, dataclasses.replace(cfg, meta_outer_lr=3.0),
                                          gen_state, rng_state, +1.0)
        theta = snapshot(model.kb(0))
        gen.set_state(gen_state)
        torch.set_rng_state(rng_state)
        mm.step4_meta_update(model, 0, task, sign_cfg, gen, q)
        dist = lambda weights: sum(((weights[k] - target[k]) ** 2).sum() for k in target).sqrt().item()
        distance[meta_sign] = (dist(theta), dist(dict(model.kb(0).named_parameters())))
    before, after = distance["reptile"]
    assert after < 0.95 * before, distance
    before, after = distance["authors"]
    assert after > 1.05 * before, distance


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_meta_update_changes_only_the_kb_and_nothing_with_zero_step_size(eps):
    cfg = tiny_cfg(meta_outer_lr=eps)
    task = tiny_tasks(T=1)[0]
    model, gen, q = prepared_model(cfg, task)
    before = snapshot(model)
    mm.step4_meta_update(model, 0, task, cfg, gen, q)
    after = snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert all(k.startswith("kbs.0.") for k in changed), changed
    assert bool(changed) == (eps > 0)


@SETTINGS
@given(accs=st.lists(st.integers(0, 128).map(lambda correct: correct / 128), min_size=1, max_size=12))
def test_meta_weights_are_the_normalised_accuracies(accs):
    # acc_i is the fraction of one batch of 128 the adapted copy gets right
    w = mm.meta_weights(torch.tensor(accs))
    assert w.sum().item() == pytest.approx(1.0, abs=1e-5)
    if sum(accs) > 0:
        np.testing.assert_allclose(w.numpy(), np.array(accs) / sum(accs), rtol=1e-5, atol=1e-7)
    else:
        assert torch.allclose(w, torch.full_like(w, 1 / len(accs)))


def test_outer_step_weights_deltas_divides_by_k_and_decays():
    kb = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        kb.weight.copy_(torch.tensor([[1.0, 2.0]]))
    deltas = [{"weight": torch.tensor([[1.0, 0.0]])}, {"weight": torch.tensor([[0.0, 3.0]])}]
    mm.apply_meta_step(kb, deltas, torch.tensor([0.25, 0.75]), +1.0, eps=0.1, weight_decay=0.5)
    # g = (0.25*[1,0] + 0.75*[0,3]) / 2 = [0.125, 1.125]
    # theta = [1,2]*(1 - 0.1*0.5) + 0.1*g = [0.95+0.0125, 1.9+0.1125]
    torch.testing.assert_close(kb.weight.data, torch.tensor([[0.9625, 2.0125]]))


def test_written_out_sgd_equals_torch_optim_sgd():
    torch.manual_seed(0)
    p1 = torch.randn(5, requires_grad=True)
    p2 = p1.detach().clone()
    buf = torch.zeros(5)
    opt = torch.optim.SGD([p1], lr=0.1, momentum=0.9, weight_decay=0.1)
    for step in range(4):
        g = torch.randn(5)
        p1.grad = g.clone()
        opt.step()
        with torch.no_grad():
            (p2, buf) = (lambda p, b: (p["p"], b["p"]))(*mm.sgd_momentum({"p": p2}, {"p": g}, {"p": buf}, 0.1, 0.9, 0.1))
    torch.testing.assert_close(p1.detach(), p2)


def test_vmap_meta_tasks_give_the_loops_kb():
    """The K meta-tasks batched under vmap (the GPU path) give the loop's KB up
    to float rounding. Dropout on: both use the same noise."""
    cfg = tiny_cfg(dropout=0.5, meta_outer_lr=0.5, meta_k=3, meta_inner_steps=3, channels_last=False)
    task = tiny_tasks(T=1, n_train=64)[0]
    results = {}
    for impl in ("loop", "vmap"):
        model, gen, q = prepared_model(dataclasses.replace(cfg, meta_impl=impl), task)
        before = snapshot(model.kb(0))
        mm.step4_meta_update(model, 0, task, dataclasses.replace(cfg, meta_impl=impl), gen, q)
        results[impl] = snapshot(model.kb(0))
    assert kb_changed(before, results["loop"]), "the KB must move, or equality proves nothing"
    for k in results["loop"]:
        torch.testing.assert_close(results["vmap"][k], results["loop"][k], rtol=1e-4, atol=1e-5)


@SETTINGS
@given(seed=st.integers(0, 2**16), channels_last=st.booleans())
def test_pooling_before_relu_gives_bit_identical_outputs_and_gradients(seed, channels_last):
    """The KB and F_t compute relu(maxpool(h)) instead of the paper's
    maxpool(relu(h)): ReLU is monotonic, so both give the same maximum, and
    the gradient reaches the same input element (or none). Bit for bit."""
    torch.manual_seed(seed)
    h = torch.randn(4, 6, 9, 9) * 3
    h[:, :, :2] = -h[:, :, :2].abs()                    # whole windows at or below 0
    h[:, :, 2, :] = 0.0                                 # exact zeros and ties
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    out, grads = [], []
    for f in (lambda v: F.max_pool2d(F.relu(v), 2), lambda v: F.relu(F.max_pool2d(v, 2))):
        v = h.clone().requires_grad_(True)
        y = f(v)
        y.backward(torch.arange(y.numel(), dtype=y.dtype).view_as(y))
        out.append(y.detach())
        grads.append(v.grad)
    assert torch.equal(out[0], out[1]) and torch.equal(grads[0], grads[1])


VMAP_PEAK_MEMORY = """
import resource, sys, torch
import mark_min as mm
from data import Split, Task
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = mm.resolve_config(mm.Config(dataset="cifar100", meta_impl="vmap", meta_k=2, batch_size=32,
                                  meta_epochs=1, meta_inner_steps=int(sys.argv[1]), channels_last=False))
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 5, (64,))
task = Task(0, list(range(5)), list("abcde"), Split(x, y), None, None)
model = mm.build_model(cfg, (3, 32, 32), [5], torch.device("cpu"))
mm.step4_meta_update(model, 0, task, cfg, torch.Generator().manual_seed(0), mm.frozen_queries(model, 0, x))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_vmap_meta_update_memory_does_not_grow_with_the_inner_steps():
    """The batched path keeps no autograd graph across inner steps: its peak
    memory is the same for 2 and 12 steps (a graph spanning the steps grew it
    by ~80 MB per step here, and by tens of GB at the paper's settings on a GPU).
    Each count runs in a fresh process: peak memory only ever grows."""
    import subprocess, sys
    peak = {steps: int(subprocess.run([sys.executable, "-c", VMAP_PEAK_MEMORY, str(steps)],
                                      capture_output=True, text=True, check=True,
                                      cwd=Path(__file__).parent).stdout)
            for steps in (2, 12)}
    assert peak[12] - peak[2] < 100, f"peak MB by inner steps: {peak}"


def test_inner_steps_return_weights_without_autograd_history():
    """inner_step gets the meta-task's weights as tensors that may come from
    nn.Parameters; what it returns must be plain values, or the next step
    would extend one autograd graph through every step."""
    cfg, tasks, model, gen, timer = tiny_setup(T=1)
    x, y = tasks[0].train.x[:16], tasks[0].train.y[:16]
    kb = dict(model.kb(0).named_parameters())                   # nn.Parameters, requires_grad
    head = dict(model.new_head(3).named_parameters())
    bufs = [{k: torch.zeros_like(v) for k, v in d.items()} for d in (kb, head)]
    with torch.no_grad():
        out = mm.inner_step(model, 0, cfg, kb, head, *bufs, x, y, None, None)
    for tensors in out:
        assert all(v.grad_fn is None and not v.requires_grad for v in tensors.values())


def test_cached_queries_equal_recomputed_ones():
    """Steps 3-5 reuse F_t(x); the cache must equal a fresh forward pass."""
    torch.manual_seed(0)
    cfg, task = tiny_cfg(), tiny_tasks(T=1)[0]
    model = mm.build_model(cfg, task.input_shape, [3], CPU)
    mm.step1_feature_extractor(model, 0, task, cfg, torch.Generator().manual_seed(0))
    q = mm.frozen_queries(model, 0, task.train.x, chunk=7)
    with torch.no_grad():
        torch.testing.assert_close(q, model.extractors(task.train.x, 0))
        torch.testing.assert_close(model(task.train.x, 0, q), model(task.train.x, 0))


# ---------------------------------------------------------------------------
# Runs end to end: results.json, resume, divergence, flags
# ---------------------------------------------------------------------------

def run_tiny(tmp_path, monkeypatch, train_task=mm.train_task_mark, resume=False, runs=1, **cfg_over):
    tasks_by_seed = {s: tiny_tasks(T=3, seed=s) for s in range(3)}
    monkeypatch.setattr(mm, "load_tasks", lambda name, seed, **kw: tasks_by_seed[seed])
    cfg = tiny_cfg(out=str(tmp_path), resume=resume, runs=runs, **cfg_over)
    return mm.run_experiment(cfg, "mark", train_task, {}, log=lambda *_: None)


def test_infer_task_on_a_finished_run_evaluates_its_checkpoint_without_training(tmp_path, monkeypatch):
    first = run_tiny(tmp_path, monkeypatch)["runs"][0]
    assert "task_agnostic" not in first
    trained = []
    counting = lambda *args: trained.append(args) or mm.train_task_mark(*args)
    again = run_tiny(tmp_path, monkeypatch, train_task=counting, resume=True, infer_task=True)["runs"][0]
    assert trained == []                                      # nothing trained again
    assert again["acc_matrix"] == first["acc_matrix"]
    assert set(again["task_agnostic"]) == {"entropy", "query", "batch_size", "accuracy_given_task"}
    assert "task_agnostic" in json.loads((tmp_path / "results.json").read_text())["runs"][0]


def test_end_to_end_run_writes_a_valid_results_json(tmp_path, monkeypatch):
    results = run_tiny(tmp_path, monkeypatch, runs=2)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == results["summary"]
    assert saved["torch"] == torch.__version__ and saved["device"] == "cpu"
    assert saved["config"]["meta_sign"] == "reptile"
    assert [r["seed"] for r in saved["runs"]] == [0, 1]
    for run in saved["runs"]:
        R = run["acc_matrix"]
        assert len(R) == 3 and all(R[i][j] is None for i in range(3) for j in range(i + 1, 3))
        # R[i][j] is task j scored with task j's own modules: the tiny stream is
        # learned (chance is 1/3) and MARK keeps it; task j's test images
        # scored with another task's modules would be near chance.
        assert all(0.7 <= R[i][j] <= 1 for i in range(3) for j in range(i + 1)), R
        assert run["acc"] == pytest.approx(np.mean(R[2]))
        assert len(run["task_seconds"]) == 3 and "4 meta-update" in run["step_seconds"][1]
    accs = [r["acc"] for r in saved["runs"]]
    assert saved["summary"]["acc_mean"] == pytest.approx(np.mean(accs))
    assert saved["summary"]["acc_std"] == pytest.approx(np.std(accs))


def test_resume_after_an_interruption_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = run_tiny(tmp_path / "a", monkeypatch)

    def interrupted(model, t, *args, **kw):
        if t == 2:
            raise KeyboardInterrupt
        return mm.train_task_mark(model, t, *args, **kw)

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "b", monkeypatch, train_task=interrupted)
    partial = json.loads((tmp_path / "b" / "results.json").read_text())
    assert partial["runs"][0]["tasks_done"] == 2          # finished tasks were saved
    resumed = run_tiny(tmp_path / "b", monkeypatch, resume=True)
    R = straight["runs"][0]["acc_matrix"]
    assert min(R[2]) > 0.6 and len({v for row in R for v in row if v is not None}) > 2, \
        "the matrices compared must come from a stream that is learned, not constants"
    assert resumed["runs"][0]["acc_matrix"] == R
    assert resumed["summary"]["acc_mean"] == straight["summary"]["acc_mean"]


def test_a_non_finite_loss_stops_with_task_step_and_epoch_and_keeps_results(tmp_path, monkeypatch):
    def poisoned(model, t, task, *args, **kw):
        if t == 1:
            task.train.x[0, 0, 0, 0] = float("nan")
        return mm.train_task_mark(model, t, task, *args, **kw)

    with pytest.raises(mm.TrainingDiverged, match=r"task 1, step 1 .*epoch 1/5"):
        run_tiny(tmp_path, monkeypatch, train_task=poisoned)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["tasks_done"] == 1


@pytest.mark.parametrize("argv", [["--meta-k", "0"], ["--lr", "-1"], ["--mask-activation", "tanh"],
                                  ["--resume"], ["--dataset", "npz"], ["--dropout", "1.5"],
                                  ["--epochs-fe", "x"]])
def test_bad_flags_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        mm.parse_config(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_authors_code_restores_each_of_their_choices_and_explicit_flags_win():
    ours, _, _ = mm.parse_config([])
    choices = lambda c: (c.meta_sign, c.frozen_eval, c.mask_init, c.clip_every_step, c.meta_acc_dropout)
    assert choices(ours) == ("reptile", True, "ones", True, False)
    cfg, given, _ = mm.parse_config(["--dataset", "cifar100", "--authors-code"])
    assert choices(cfg) == ("authors", False, "default", False, True)
    assert "paper protocol" in mm.describe_schedule(cfg, given)
    assert "the authors' code's choices" in mm.describe_schedule(cfg, given)
    cfg, _, _ = mm.parse_config(["--authors-code", "--meta-sign", "reptile"])      # one deviation kept
    assert choices(cfg) == ("reptile", False, "default", False, True)
    cfg, _, _ = mm.parse_config(["--no-frozen-eval"])                               # one restored alone
    assert choices(cfg) == ("reptile", False, "ones", True, False)


@pytest.mark.parametrize("every", [True, False])
def test_gradients_are_clipped_in_step_1_and_elsewhere_only_with_clip_every_step(monkeypatch, every):
    cfg, tasks, model, gen, timer = tiny_setup(T=1, clip_every_step=every)
    calls = []
    original = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or original(*a, **k))
    q = mm.step1_feature_extractor(model, 0, tasks[0], cfg, gen)
    in_step1 = len(calls)
    mm.step2_pretrain_kb(model, 0, tasks[0], cfg, gen)
    mm.step3_masks_and_head(model, 0, tasks[0], cfg, gen, q)
    assert in_step1 > 0 and (len(calls) > in_step1) == every


def test_without_frozen_eval_the_feature_extractors_statistics_move_as_in_the_authors_code(monkeypatch):
    """--no-frozen-eval reproduces the authors' bug: F_t stays in train mode,
    runs on every batch (no cached queries), and only its batch-norm
    statistics change after step 1 (its weights stay frozen)."""
    cfg, tasks, model, gen, timer = tiny_setup(T=1, frozen_eval=False)
    seen = {}
    original = mm.step3_masks_and_head

    def step3(model, t, task, cfg, gen, query):
        seen["query"], seen["before"] = query, snapshot(model.extractors[t])
        original(model, t, task, cfg, gen, query)
        seen["after"] = snapshot(model.extractors[t])

    monkeypatch.setattr(mm, "step3_masks_and_head", step3)
    mm.train_task_mark(model, 0, tasks[0], cfg, gen, timer)
    changed = [k for k in seen["before"] if not torch.equal(seen["before"][k], seen["after"][k])]
    assert seen["query"] is None and changed
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed), changed


def test_profiles_are_labelled_and_explicit_flags_win():
    cfg, given, _ = mm.parse_config(["--dataset", "cifar100"])
    assert cfg.epochs_fe == 50 and cfg.meta_epochs == 10
    assert "paper protocol" in mm.describe_schedule(cfg, given)
    cfg, given, _ = mm.parse_config(["--dataset", "cifar100", "--profile", "short", "--meta-k", "3"])
    assert cfg.epochs_fe == 5 and cfg.meta_epochs == 1 and cfg.meta_k == 3
    assert "not the paper protocol" in mm.describe_schedule(cfg, given)
    cfg, given, _ = mm.parse_config(["--dataset", "cifar100", "--epoch-scale", "0.1"])
    assert cfg.epochs_kb == 5 and "not the paper protocol" in mm.describe_schedule(cfg, given)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@CUDA
@pytest.mark.parametrize("impl", ["loop", "vmap"])
def test_cuda_training_learns_and_its_weights_score_the_same_on_the_cpu(impl):
    torch.manual_seed(0)
    cfg, gpu = tiny_cfg(meta_impl=impl), torch.device("cuda")
    tasks = [t.to(gpu) for t in tiny_tasks(T=2)]
    model = mm.build_model(cfg, tasks[0].input_shape, [3, 3], gpu)
    gen = torch.Generator(device=gpu).manual_seed(0)
    for t in range(2):
        mm.train_task_mark(model, t, tasks[t], cfg, gen, mm.StepTimer(gpu, lambda *_: None))
    assert all(p.is_cuda for p in model.parameters())
    accs = [mm.evaluate(model, t, tasks[t].test) for t in range(2)]
    assert min(accs) >= 0.8, accs                                   # chance: 1/3
    on_cpu = mm.build_model(cfg, tasks[0].input_shape, [3, 3], CPU)
    on_cpu.load_state_dict(model.state_dict())
    cpu_tasks = tiny_tasks(T=2)
    assert [mm.evaluate(on_cpu, t, cpu_tasks[t].test) for t in range(2)] == pytest.approx(accs, abs=1 / 48)


@CUDA
def test_cuda_vmap_meta_update_memory_does_not_grow_with_the_inner_steps():
    gpu, peak = torch.device("cuda"), {}
    x, y = torch.randn(256, 3, 32, 32, device=gpu), torch.randint(0, 5, (256,), device=gpu)
    task = Task(0, list(range(5)), list("abcde"), Split(x, y), None, None)
    for steps in (2, 12):
        torch.manual_seed(0)
        cfg = mm.resolve_config(mm.Config(dataset="cifar100", meta_impl="vmap", meta_epochs=1,
                                          meta_k=4, batch_size=64, meta_inner_steps=steps))
        model = mm.build_model(cfg, (3, 32, 32), [5], gpu)
        q = mm.frozen_queries(model, 0, x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(gpu)
        mm.step4_meta_update(model, 0, task, cfg, torch.Generator(device=gpu).manual_seed(0), q)
        torch.cuda.synchronize()
        peak[steps] = torch.cuda.max_memory_allocated(gpu)
    assert peak[12] < 1.2 * peak[2], peak


@CUDA
def test_cuda_resume_with_deterministic_kernels_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    def run(out, train_task=mm.train_task_mark, resume=False):
        tasks = [t.to("cuda") for t in tiny_tasks(T=3)]
        monkeypatch.setattr(mm, "load_tasks", lambda name, seed, **kw: tasks)
        cfg = tiny_cfg(out=str(out), resume=resume, device="cuda", deterministic=True)
        return mm.run_experiment(cfg, "mark", train_task, {}, log=lambda *_: None)

    def interrupted(model, t, *args, **kw):
        if t == 2:
            raise KeyboardInterrupt
        return mm.train_task_mark(model, t, *args, **kw)

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupted)
    assert run(tmp_path / "b", resume=True)["runs"][0]["acc_matrix"] == straight["runs"][0]["acc_matrix"]


def test_deterministic_flag_turns_on_deterministic_kernels(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []
    check = lambda *args: seen.append(torch.are_deterministic_algorithms_enabled()) or mm.train_task_mark(*args)
    try:
        run_tiny(tmp_path, monkeypatch, train_task=check, deterministic=True)
        assert seen and all(seen) and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------------------
# SupSup extension: supermasks, isolation, bits, task inference
# ---------------------------------------------------------------------------

@SETTINGS
@given(density=st.floats(0.05, 1.0), rows=st.integers(1, 20), cols=st.integers(1, 20),
       seed=st.integers(0, 2**16))
@example(density=0.06, rows=15, cols=15, seed=0)     # 0.06 * 225 = 13.5: rounding must match binarize
def test_topk_supermasks_have_exactly_the_requested_density(density, rows, cols, seed):
    torch.manual_seed(seed)
    layer = mm.SupermaskLinear(cols, rows, num_tasks=2, how="topk", density=density)
    for t in range(2):
        assert layer.mask(t).sum().item() == round(density * (rows * cols))   # n = rows * cols weights, as binarize
        assert set(layer.mask(t).unique().tolist()) <= {0.0, 1.0}


def test_sign_supermasks_keep_exactly_the_non_negative_scores():
    layer = mm.SupermaskLinear(4, 3, num_tasks=1, how="sign")
    with torch.no_grad():
        layer.scores[0].copy_(torch.arange(12.0).view(3, 4) - 5)
    assert torch.equal(layer.mask(0), (torch.arange(12.0).view(3, 4) >= 5).float())


@pytest.mark.parametrize("how", ["topk", "sign"])
def test_straight_through_gradient_reaches_the_scores_and_weights_stay_fixed(how):
    torch.manual_seed(0)
    layer = mm.SupermaskLinear(6, 4, num_tasks=2, how=how)
    weight = layer.weight.clone()
    layer(torch.randn(5, 6), 1).pow(2).sum().backward()
    assert layer.scores[1].grad is not None and layer.scores[1].grad.abs().sum() > 0
    assert layer.scores[0].grad is None                 # another task: not even touched
    assert not layer.weight.requires_grad and torch.equal(layer.weight, weight)
    torch.testing.assert_close(layer.weight.abs(), torch.full((4, 6), (2 / 6) ** 0.5))


@pytest.mark.parametrize("how", ["topk", "sign"])
def test_supsup_training_task_t_leaves_every_other_tasks_scores_bit_identical(how):
    """With the optimizer the method uses (SGD, momentum, weight decay): no
    update, decay or momentum ever reaches another task's scores."""
    cfg, tasks, model, gen, timer = tiny_setup(T=3, supsup=True, supsup_binarize=how)
    layers = [m for m in model.modules() if isinstance(m, mm.SupermaskLinear)]
    weights = [layer.weight.clone() for layer in layers]
    for t in range(3):
        others = {(i, s): layer.scores[s].detach().clone() for i, layer in enumerate(layers)
                  for s in range(3) if s != t}
        mine = [layer.scores[t].detach().clone() for layer in layers]
        mm.train_task_mark(model, t, tasks[t], cfg, gen, timer)
        for (i, s), before in others.items():
            assert torch.equal(layers[i].scores[s], before), f"task {s}'s scores moved while {t} trained"
        assert any(not torch.equal(layer.scores[t], m) for layer, m in zip(layers, mine))
    for layer, w in zip(layers, weights):
        assert torch.equal(layer.weight, w)


def test_supermasks_stored_as_bits_reproduce_the_forward_pass_exactly():
    torch.manual_seed(0)
    layer = mm.SupermaskLinear(37, 11, num_tasks=3)       # 407 weights: not a multiple of 8
    x = torch.randn(4, 37)
    for t in range(3):
        packed = layer.pack_mask(t)
        assert packed.dtype == torch.uint8 and packed.numel() == (37 * 11 + 7) // 8
        assert torch.equal(layer(x, t, mask=layer.unpack_mask(packed)), layer(x, t))


@pytest.mark.parametrize("how", ["topk", "sign"])
def test_supsup_end_to_end_run_learns_every_task_and_keeps_it(tmp_path, monkeypatch, how):
    results = run_tiny(tmp_path, monkeypatch, supsup=True, supsup_binarize=how)
    run = results["runs"][0]
    R = np.array(run["acc_matrix"], dtype=float)
    assert run["tasks_done"] == 3 and np.diag(R).min() >= 0.6, R      # chance: 1/3
    assert run["bwt"] > -0.05, R      # earlier tasks' supermasks are never trained again


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
    model = mm.MARKNet((1, 20, 20), [3, 2], tiny_cfg(latent=2))
    query = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 10.0], [0.0, 12.0]])
    mm.record_query_statistics(model, 0, query, torch.tensor([0, 0, 2, 2]))
    assert torch.equal(model.query_means[0, 0], torch.tensor([2.0, 0.0]))
    assert torch.equal(model.query_means[0, 2], torch.tensor([0.0, 11.0]))
    assert torch.isinf(model.query_means[0, 1]).all()                # class 1 has no sample
    assert torch.allclose(model.query_var[0], torch.tensor([0.5, 0.5]))   # ((+-1)^2 + 0 + 0) / 4 per unit
    # a unit that never varies gets the floor, 1% of the mean variance, not 0
    mm.record_query_statistics(model, 1, torch.tensor([[1.0, 5.0], [3.0, 5.0]]), torch.tensor([1, 1]))
    assert torch.allclose(model.query_var[1], torch.tensor([1.0, 0.005]))


def test_query_distance_uses_the_nearest_class_not_the_overall_mean():
    """Task 0's classes sit at (+-3, 0); a batch of task 1 lies at (0, 0), in
    the empty middle between them. One Gaussian around task 0's overall mean
    (0, 0) would call that batch typical of task 0 (the failure we measured);
    the nearest-class-mean distance gives it to task 1."""
    model = mm.MARKNet((1, 20, 20), [2, 2], tiny_cfg(latent=2))
    model.extractors[0], model.extractors[1] = nn.Identity(), nn.Identity()   # query = input
    g = torch.Generator().manual_seed(0)
    task0 = torch.cat([torch.tensor([[3.0, 0.0]]), torch.tensor([[-3.0, 0.0]])]).repeat(50, 1)
    task1 = torch.cat([torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 6.0]])]).repeat(50, 1)
    for t, q in enumerate((task0, task1)):
        mm.record_query_statistics(model, t, q + 0.3 * torch.randn(q.shape, generator=g),
                                   torch.tensor([0, 1]).repeat(50))
    middle = 0.3 * torch.randn(16, 2, generator=g)
    assert mm.query_distance(model, middle, 1) < mm.query_distance(model, middle, 0)
    near0 = torch.tensor([3.0, 0.0]) + 0.3 * torch.randn(16, 2, generator=g)
    assert mm.query_distance(model, near0, 0) < mm.query_distance(model, near0, 1)


@pytest.mark.parametrize("supsup", [False, True])
def test_task_inference_finds_the_task_on_a_trivially_separable_stream(supsup):
    torch.manual_seed(0)
    cfg = tiny_cfg(supsup=supsup, latent=16, lr=0.05, batch_size=32, epochs_fe=8, epochs_kb=8, epochs_masks=8,
                   epochs_consolidate=2)
    tasks = separable_tasks()
    model = mm.build_model(cfg, tasks[0].input_shape, [2, 2, 2], CPU)
    gen = torch.Generator().manual_seed(0)
    for t in range(3):
        mm.train_task_mark(model, t, tasks[t], cfg, gen, mm.StepTimer(CPU, lambda *_: None))
    result = mm.evaluate_without_task_id(model, tasks, batch_size=20)["query"]
    assert result["task_inference_accuracy"] == 1.0
    given_acc = np.mean([mm.evaluate(model, t, tasks[t].test) for t in range(3)])
    assert result["accuracy_inferred_task"] == pytest.approx(given_acc)


def test_models_without_feature_extractors_infer_the_task_by_entropy_only():
    """Baselines 1, 2 and 4 have no F_t: --infer-task reports the entropy score
    for them instead of failing at the end of a finished run."""
    tasks = tiny_tasks(T=2)
    model = mm.build_model(tiny_cfg(), tasks[0].input_shape, [3, 3], CPU, masks=False)
    result = mm.evaluate_without_task_id(model, tasks)
    assert set(result) == {"entropy", "batch_size"}
    assert 0 <= result["entropy"]["task_inference_accuracy"] <= 1


def test_storage_table_counts_masks_as_bits():
    cfg = mm.Config()
    rows = {T: mm.storage(cfg, (3, 32, 32), 5, T) for T in (1, 2)}
    per_task = {m: rows[2][m][1] - rows[1][m][1] for m in rows[1]}
    assert per_task["mark"] == 4 * (158_528 + 57_792 + 645)
    assert per_task["b4"] == 4 * (339_520 + 645)
    # SupSup: F_t in float32 plus one bit per weight of the shared M and C (no biases)
    assert per_task["supsup"] == 4 * 158_528 + (128 * 64 + 128 * 128 + 128 * 256) // 8 + (128 * 5) // 8


def test_masks_start_near_all_ones_so_the_kb_signal_passes():
    """mask_init='ones' (our deviation): at the start of step 3 the masked KB's
    output still varies with the input; with PyTorch's default init the three
    small masks shrink the signal by orders of magnitude (the stuck-at-chance
    failure we measured on CIFAR-100)."""
    torch.manual_seed(0)
    kb = mm.KnowledgeBase((3, 32, 32)).eval()
    x = torch.randn(64, 3, 32, 32)
    q = F.relu(torch.randn(64, 128))
    unmasked = kb(x).std(0).mean()
    spread, level = {}, {}
    for init in ("ones", "default"):
        masks = mm.MaskGenerator(128, (64, 128, 256), "relu", init)(q)
        spread[init] = kb(x, masks).std(0).mean() / unmasked
        level[init] = [m.mean().item() for m in masks]
    assert all(0.8 < v < 1.2 for v in level["ones"])
    assert all(v < 0.3 for v in level["default"])
    assert spread["ones"] > 10 * spread["default"]


# ---------------------------------------------------------------------------
# Properties of the continual-learning metrics in metrics.py.
#
#
# Hand-computed cases carry their arithmetic in a comment; hypothesis checks
# the properties that should hold for every accuracy matrix.
# ---------------------------------------------------------------------------

FAST = settings(max_examples=40, deadline=None)

# Anything a run loop might leave above the diagonal: NaN, inf, huge numbers.
garbage = st.one_of(st.just(float("nan")), st.just(float("inf")),
                    st.floats(allow_nan=True, allow_infinity=True))
fraction = st.floats(0.0, 1.0)


@st.composite
def accuracy_matrices(draw, min_tasks=1, max_tasks=6, column=None):
    """(R, clean): R has garbage above the diagonal, clean has zeros there.

    column(draw, length) -> list of fractions fills each column j downwards
    from the diagonal (rows j..T-1); default: independent fractions.
    """
    T = draw(st.integers(min_tasks, max_tasks))
    R = [[draw(garbage) for _ in range(T)] for _ in range(T)]
    clean = [[0.0] * T for _ in range(T)]
    for j in range(T):
        values = (column(draw, T - j) if column
                  else draw(st.lists(fraction, min_size=T - j, max_size=T - j)))
        for i, v in zip(range(j, T), values):
            R[i][j] = clean[i][j] = v
    return R, clean


def falling_column(draw, length):
    """A column that never rises: R[j][j] >= R[j+1][j] >= ... >= R[T-1][j]."""
    return sorted(draw(st.lists(fraction, min_size=length, max_size=length)),
                  reverse=True)


# ---------------------------------------------------------------------------
# Hand-computed matrices (T = 3)
# ---------------------------------------------------------------------------

# Accuracy on task 0 rises after task 1 (0.90 -> 0.95) and then falls; R[0][1]
# and R[1][2] are the accuracies on tasks 1 and 2 just before training them.
R3 = [[0.90, 0.30, np.nan],
      [0.95, 0.70, 0.25],
      [0.60, 0.50, 0.40]]
B3 = [np.nan, 0.20, 0.20]     # accuracy at initialisation; b[0] is unused


def test_accuracy_of_hand_matrix_is_mean_of_last_row():
    # (0.60 + 0.50 + 0.40) / 3 = 0.50
    assert average_accuracy(R3) == pytest.approx(0.50)


def test_backward_transfer_of_hand_matrix():
    # j=0: 0.60 - 0.90 = -0.30;  j=1: 0.50 - 0.70 = -0.20;  sum -0.50, / (T-1)=2
    assert backward_transfer(R3) == pytest.approx(-0.25)


def test_gem_code_divides_bwt_and_fwt_by_T_not_T_minus_1():
    # The same sums as above, over T = 3 instead of T-1 = 2 (GEM's code takes
    # the mean of a length-T vector whose last entry is 0):
    # BWT: -0.50 / 3 = -0.1667 (paper: -0.25);  FWT: 0.15 / 3 = 0.05 (paper: 0.075)
    assert backward_transfer(R3, divide_by="T") == pytest.approx(-0.5 / 3)
    assert forward_transfer(R3, B3, divide_by="T") == pytest.approx(0.05)
    assert backward_transfer(R3, divide_by="T-1") == pytest.approx(-0.25)


def test_forward_transfer_of_hand_matrix():
    # i=1: R[0][1] - b1 = 0.30 - 0.20 = 0.10;  i=2: R[1][2] - b2 = 0.25 - 0.20 = 0.05
    # (0.10 + 0.05) / 2 = 0.075
    assert forward_transfer(R3, B3) == pytest.approx(0.075)


def test_forgetting_of_hand_matrix_uses_the_best_earlier_accuracy():
    # j=0: max(R[0][0], R[1][0]) - R[2][0] = max(0.90, 0.95) - 0.60 = 0.35
    # j=1: max(R[1][1])          - R[2][1] = 0.70 - 0.50            = 0.20
    # (0.35 + 0.20) / 2 = 0.275, more than -BWT = 0.25 because task 0 first rose
    assert forgetting(R3) == pytest.approx(0.275)


def test_forward_transfer_needs_the_superdiagonal():
    R = [[0.9, np.nan], [0.8, 0.7]]     # task 1 never evaluated before training
    with pytest.raises(ValueError, match="superdiagonal"):
        forward_transfer(R, [0.0, 0.1])


def test_forward_transfer_checks_the_length_of_b():
    with pytest.raises(ValueError, match="length T = 3"):
        forward_transfer(R3, [0.2, 0.2])


# ---------------------------------------------------------------------------
# Properties over all matrices
# ---------------------------------------------------------------------------

@FAST
@given(accuracy_matrices())
def test_accuracy_is_mean_of_last_row_whatever_lies_above_diagonal(pair):
    R, _ = pair
    last = R[-1]
    assert average_accuracy(R) == pytest.approx(sum(last) / len(last), abs=1e-12)


@FAST
@given(accuracy_matrices())
def test_entries_above_diagonal_never_matter(pair):
    R, clean = pair
    for metric in (average_accuracy, backward_transfer, forgetting):
        assert metric(R) == metric(clean)


@FAST
@given(accuracy_matrices(min_tasks=2), st.data())
def test_forward_transfer_reads_only_the_first_superdiagonal_above(pair, data):
    R, clean = pair
    T = len(R)
    b = data.draw(st.lists(fraction, min_size=T, max_size=T))
    for i in range(1, T):       # fill R[i-1][i] identically in both matrices
        R[i - 1][i] = clean[i - 1][i] = data.draw(fraction)
    assert forward_transfer(R, b) == forward_transfer(clean, b)


@FAST
@given(st.integers(1, 6), st.data())
def test_bwt_and_forgetting_are_zero_when_every_column_is_constant(T, data):
    # Each task keeps the accuracy it had right after being learned.
    values = data.draw(st.lists(fraction, min_size=T, max_size=T))
    R = [[values[j] if j <= i else np.nan for j in range(T)] for i in range(T)]
    assert backward_transfer(R) == 0.0
    assert forgetting(R) == 0.0


@FAST
@given(accuracy_matrices(min_tasks=2, column=falling_column))
def test_when_accuracies_only_fall_forgetting_equals_minus_bwt(pair):
    R, _ = pair
    # The best accuracy of a task that only falls is the one right after
    # learning it, so both metrics measure the same drop R[j][j] - R[T-1][j].
    assert backward_transfer(R) <= 0.0
    assert forgetting(R) == pytest.approx(-backward_transfer(R), abs=1e-12)


@FAST
@given(accuracy_matrices(min_tasks=2, column=falling_column), st.data())
def test_a_strict_fall_makes_bwt_negative_and_forgetting_positive(pair, data):
    R, _ = pair
    T = len(R)
    j = data.draw(st.integers(0, T - 2))
    # Make task j's fall strict while its column still never rises:
    # R[j][j] >= ... >= R[T-2][j] >= 0.5 >= old R[T-1][j] / 2, and not all equal.
    for i in range(j, T - 1):
        R[i][j] = max(R[i][j], 0.5)
    R[T - 1][j] = R[T - 1][j] / 2
    assert backward_transfer(R) < 0.0
    assert forgetting(R) > 0.0


@FAST
@given(accuracy_matrices())
def test_forgetting_is_never_below_minus_bwt(pair):
    R, _ = pair
    # max over rows j..T-2 of R[.][j] >= R[j][j], task by task.
    assert forgetting(R) >= -backward_transfer(R) - 1e-12


# ---------------------------------------------------------------------------
# A single task
# ---------------------------------------------------------------------------

def test_single_task_has_no_transfer_and_no_forgetting():
    R = [[0.8]]
    assert average_accuracy(R) == pytest.approx(0.8)
    assert backward_transfer(R) == 0.0
    assert backward_transfer(R, divide_by="T") == 0.0
    assert forward_transfer(R, [0.1]) == 0.0
    assert forgetting(R) == 0.0


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("R, message", [
    ([[0.9, 0.1]], "square"),
    ([[[0.9]]], "square"),
    ([], "square"),
    (np.zeros((0, 0)), "empty"),
    ([[0.9], [0.8, 0.7]], "T x T"),
    ([[np.nan, 0.0], [0.8, 0.7]], "non-finite"),
    ([[0.9, 0.0], [np.inf, 0.7]], "non-finite"),
    ([[90.0, 0.0], [80.0, 70.0]], "outside \\[0, 1\\]"),
    ([[0.9, 0.0], [-0.1, 0.7]], "outside \\[0, 1\\]"),
])
def test_bad_matrices_are_rejected_with_a_reason(R, message):
    for metric in (average_accuracy, backward_transfer, forgetting, format_matrix):
        with pytest.raises(ValueError, match=message):
            metric(R)


def test_unknown_divisor_is_rejected():
    with pytest.raises(ValueError, match="divide_by"):
        backward_transfer(R3, divide_by="n")


# ---------------------------------------------------------------------------
# Macro F1
# ---------------------------------------------------------------------------

labels = st.integers(2, 6).flatmap(lambda C: st.tuples(
    st.just(C), st.lists(st.integers(0, C - 1), min_size=1, max_size=30)))


@FAST
@given(labels)
def test_f1_is_exactly_one_when_predictions_equal_labels(case):
    C, y = case
    assert macro_f1(y, list(y), C) == 1.0


@FAST
@given(labels, st.data())
def test_f1_is_below_one_when_any_prediction_is_wrong(case, data):
    C, y = case
    y_pred = data.draw(st.lists(st.integers(0, C - 1),
                                min_size=len(y), max_size=len(y)))
    if y_pred == y:
        return
    assert macro_f1(y, y_pred, C) < 1.0


@FAST
@given(labels, st.data())
def test_f1_is_the_mean_harmonic_mean_of_precision_and_recall(case, data):
    # Independent reference: precision and recall per class, F1 their harmonic
    # mean (0 if either is 0 or undefined), classes never seen left out.
    C, y = case
    y_pred = data.draw(st.lists(st.integers(0, C - 1),
                                min_size=len(y), max_size=len(y)))
    scores = []
    for c in range(C):
        tp = sum(t == c and p == c for t, p in zip(y, y_pred))
        n_true, n_pred = y.count(c), y_pred.count(c)
        if n_true == 0 and n_pred == 0:
            continue
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        scores.append(2 * precision * recall / (precision + recall)
                      if precision + recall else 0.0)
    assert macro_f1(y, y_pred, C) == pytest.approx(sum(scores) / len(scores))


def test_f1_hand_computed_two_classes():
    # class 0: TP=1 FP=0 FN=1 -> 2/(2+0+1) = 2/3
    # class 1: TP=2 FP=1 FN=0 -> 4/(4+1+0) = 4/5
    # mean (2/3 + 4/5) / 2 = 11/15
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx(11 / 15)


def test_f1_leaves_out_a_class_nobody_saw_or_predicted():
    # class 0: TP=2 FP=1 FN=0 -> 4/5;  class 1: TP=0 FN=1 -> 0;  class 2: absent
    # mean over the two seen classes (4/5 + 0) / 2 = 0.4
    # (counting class 2 as 1 would give 0.6, as 0 would give 0.267)
    assert macro_f1([0, 0, 1], [0, 0, 0], 3) == pytest.approx(0.4)


def test_f1_of_a_class_only_predicted_is_zero():
    # class 0: TP=1 FP=0 FN=1 -> 2/3;  class 1: TP=0 FP=1 FN=0 -> 0;  mean 1/3
    assert macro_f1([0, 0], [0, 1], 2) == pytest.approx(1 / 3)


@pytest.mark.parametrize("y_true, y_pred, message", [
    ([0, 1], [0], "length"),
    ([], [], "at least one"),
    ([0, 2], [0, 1], "outside"),
    ([0.0, 1.0], [0, 1], "integer"),
])
def test_f1_rejects_bad_labels(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        macro_f1(y_true, y_pred, 2)


# ---------------------------------------------------------------------------
# Runs and tables
# ---------------------------------------------------------------------------

def test_mean_std_uses_population_std():
    # mean 0.6; deviations +-0.1 -> population std sqrt(0.02/2) = 0.1,
    # whereas the sample std would be sqrt(0.02/1) = 0.1414
    mean, std = mean_std([0.5, 0.7])
    assert mean == pytest.approx(0.6)
    assert std == pytest.approx(0.1)


def test_mean_std_rejects_no_runs():
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_summarize_runs_feeds_format_table_in_percent():
    runs = [{"acc": 0.80, "bwt": -0.004}, {"acc": 0.81, "bwt": -0.002}]
    row = summarize_runs(runs, "MARK")
    # acc: mean 0.805, std 0.005 -> "80.50 (0.50)"; bwt: mean -0.003 -> "-0.30"
    assert row["runs"] == 2
    table = format_table([row])
    assert table.splitlines() == ["| Method | Acc (std) % | BWT % |",
                                  "|---|---|---|",
                                  "| MARK | 80.50 (0.50) | -0.30 |"]


def test_format_table_prints_extra_columns_and_blanks_missing_ones():
    rows = [{"method": "MARK", "acc_mean": 0.8036, "acc_std": 0.00313,
             "bwt_mean": -0.0027, "Paper": "78.31 (0.3)"},
            {"method": "Baseline 1", "acc_mean": 0.3061, "acc_std": 0.00904,
             "bwt_mean": -0.3476}]
    lines = format_table(rows, extra_columns=["Paper"]).splitlines()
    assert lines[0] == "| Method | Acc (std) % | BWT % | Paper |"
    assert lines[2] == "| MARK | 80.36 (0.31) | -0.27 | 78.31 (0.3) |"
    assert lines[3] == "| Baseline 1 | 30.61 (0.90) | -34.76 |  |"


def test_format_table_names_a_missing_key():
    with pytest.raises(ValueError, match="acc_std"):
        format_table([{"method": "MARK", "acc_mean": 0.8, "bwt_mean": 0.0}])


def test_format_matrix_shows_lower_triangle_in_percent():
    lines = format_matrix(R3).splitlines()
    assert lines[0].split("|")[1].split() == ["task", "0", "task", "1", "task", "2"]
    assert lines[1].split("|")[1].split() == ["90.00"]     # 30.00 above is hidden
    assert lines[2].split("|")[1].split() == ["95.00", "70.00"]
    assert lines[3].split("|")[1].split() == ["60.00", "50.00", "40.00"]


# ---------------------------------------------------------------------------
# Tests of data.py: the task streams every method trains on.
#
# Fast and offline. CIFAR-100 tests build tiny archives in the official format
# in tmp_path (all 100 classes, 20 training and 4 test images per class); they
# never read ./data or a downloaded file. Each tiny image encodes where it came
# from in its pixels (red = class id, green = index within its class, blue =
# 0 for the training file, 1 for the test file), so a test can check that every
# image carries the label of its class after splitting and normalising.
# ---------------------------------------------------------------------------

TINY_TRAIN_PER_CLASS = 20     # -> 17 train + 3 validation per class (15%)
TINY_TEST_PER_CLASS = 4
UNREACHABLE = "http://127.0.0.1:9/cifar-100-python.tar.gz"   # port 9: discard


# --- tiny CIFAR-100 in the official format ---------------------------------

def _cifar_batch(per_class: int, file_code: int, label: bytes) -> dict:
    labels = np.repeat(np.arange(100), per_class)
    within = np.tile(np.arange(per_class), 100)
    order = np.random.RandomState(file_code).permutation(len(labels))  # mixed, like the real files
    labels, within = labels[order], within[order]
    pixels = np.zeros((len(labels), 3, 1024), dtype=np.uint8)   # channel-major rows
    pixels[:, 0] = labels[:, None]
    pixels[:, 1] = within[:, None]
    pixels[:, 2] = file_code
    return {b"batch_label": label,
            b"filenames": [b"img_%05d.png" % i for i in range(len(labels))],
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"data": pixels.reshape(len(labels), 3072)}


def _cifar_files() -> dict[str, bytes]:
    meta = {b"fine_label_names": [b"class%03d" % c for c in range(100)],
            b"coarse_label_names": [b"super%02d" % c for c in range(20)]}
    objects = {"train": _cifar_batch(TINY_TRAIN_PER_CLASS, 0, b"training batch 1 of 1"),
               "test": _cifar_batch(TINY_TEST_PER_CLASS, 1, b"testing batch 1 of 1"),
               "meta": meta}
    return {name: pickle.dumps(obj, protocol=4) for name, obj in objects.items()}


def _write_folder(data_dir, files=None):
    folder = data_dir / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, content in (files or _cifar_files()).items():
        (folder / name).write_bytes(content)


def _write_archive(data_dir, extra=()) -> str:
    """Write cifar-100-python.tar.gz (plus `extra` TarInfo members); its md5."""
    data_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in _cifar_files().items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size))
    archive = data_dir / "cifar-100-python.tar.gz"
    archive.write_bytes(gzip.compress(buffer.getvalue(), compresslevel=1))
    return hashlib.md5(archive.read_bytes()).hexdigest()


def _decode(split: Split):
    """(class id, index within class, file code) of every image, from its pixels."""
    mean = torch.tensor(data.CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CIFAR100_STD).view(1, 3, 1, 1)
    raw = (split.x * std + mean).round().to(torch.int64)      # (N, 3, 32, 32)
    assert (raw == raw[:, :, :1, :1]).all()                   # planes stay constant
    return raw[:, 0, 0, 0], raw[:, 1, 0, 0], raw[:, 2, 0, 0]


@pytest.fixture
def offline(monkeypatch):
    """No test may download: point the URL at a port that refuses."""
    monkeypatch.setattr(data, "CIFAR100_URL", UNREACHABLE)


# --- CIFAR-100 ----------------------------------------------------------------

def test_cifar100_from_the_archive_is_20_tasks_of_5_with_every_image_labelled_by_its_class(
        tmp_path, monkeypatch, offline):
    monkeypatch.setattr(data, "CIFAR100_MD5", _write_archive(tmp_path))
    tasks = load_tasks("cifar100", data_dir=tmp_path, seed=0)

    assert sorted(p.name for p in (tmp_path / "cifar-100-python").iterdir()) == ["meta", "test", "train"]
    assert not (tmp_path / "cifar-100-python.partial").exists()
    assert len(tasks) == 20
    assert sorted(c for task in tasks for c in task.class_ids) == list(range(100))
    order = np.random.RandomState(0).permutation(100)          # the documented class order
    for t, task in enumerate(tasks):
        assert task.index == t
        assert task.class_ids == order[5 * t:5 * t + 5].tolist()
        assert task.class_names == ["class%03d" % c for c in task.class_ids]
        # 15% of each class's 20 training images is validation: 5 x (17, 3); test 5 x 4
        assert (len(task.train), len(task.val), len(task.test)) == (85, 15, 20)
        for split, file_code in ((task.train, 0), (task.val, 0), (task.test, 1)):
            assert split.x.dtype == torch.float32 and split.x.shape[1:] == (3, 32, 32)
            assert split.y.dtype == torch.int64
            assert torch.bincount(split.y, minlength=5).tolist() == [len(split) // 5] * 5
            cls, _, code = _decode(split)
            assert (cls == torch.tensor(task.class_ids)[split.y]).all()
            assert (code == file_code).all()
        # train and validation share no image and together hold all of it
        tr_cls, tr_idx, _ = _decode(task.train)
        va_cls, va_idx, _ = _decode(task.val)
        keys = torch.cat([tr_cls * 100 + tr_idx, va_cls * 100 + va_idx])
        assert sorted(keys.tolist()) == sorted(c * 100 + i for c in task.class_ids for i in range(20))


def test_cifar100_reads_an_unpacked_folder_without_checking_md5_and_gets_the_same_stream(
        tmp_path, offline):
    _write_folder(tmp_path / "unpacked")           # no archive, official md5 unmatched
    from_folder = load_tasks("cifar100", data_dir=tmp_path / "unpacked", seed=3)
    assert len(from_folder) == 20
    all_ids = [c for task in from_folder for c in task.class_ids]
    assert sorted(all_ids) == list(range(100))     # every class in exactly one task


def test_same_seed_gives_the_same_stream_and_another_seed_another_class_order(tmp_path, offline):
    _write_folder(tmp_path)
    a, b = load_tasks("cifar100", data_dir=tmp_path, seed=0), load_tasks("cifar100", data_dir=tmp_path, seed=0)
    c = load_tasks("cifar100", data_dir=tmp_path, seed=1)
    for ta, tb in zip(a, b):
        assert ta.class_ids == tb.class_ids
        for split in ("train", "val", "test"):
            assert torch.equal(getattr(ta, split).x, getattr(tb, split).x)
            assert torch.equal(getattr(ta, split).y, getattr(tb, split).y)
    assert [t.class_ids for t in a] != [t.class_ids for t in c]
    assert sorted(i for t in c for i in t.class_ids) == list(range(100))


def test_num_tasks_keeps_the_first_tasks_of_the_full_stream(tmp_path, offline):
    _write_folder(tmp_path)
    full = load_tasks("cifar100", data_dir=tmp_path, seed=5)
    first = load_tasks("cifar100", data_dir=tmp_path, seed=5, num_tasks=3)
    assert len(first) == 3
    for short, long in zip(first, full):
        assert short.class_ids == long.class_ids
        assert torch.equal(short.train.x, long.train.x) and torch.equal(short.val.y, long.val.y)


def test_an_archive_with_the_wrong_md5_is_refused_and_nothing_is_unpacked(tmp_path, offline):
    _write_archive(tmp_path)                         # its md5 is not the official one
    with pytest.raises(DataError, match="md5") as err:
        load_tasks("cifar100", data_dir=tmp_path)
    assert data.CIFAR100_MD5 in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-100-python.tar.gz"]


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("make_member", [
    lambda root: _member("../evil"),
    lambda root: _member("cifar-100-python/../../evil"),
    lambda root: _member(str(root / "evil")),                      # absolute path
    lambda root: _member("cifar-100-python/evil", tarfile.SYMTYPE, str(root / "evil")),
    lambda root: _member("cifar-100-python/evil", tarfile.LNKTYPE, "cifar-100-python/train"),
    lambda root: _member("README"),                                 # outside the folder
], ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "outside-folder"])
def test_an_archive_member_that_would_land_outside_the_folder_is_refused(
        tmp_path, monkeypatch, offline, make_member):
    data_dir = tmp_path / "a" / "b"
    monkeypatch.setattr(data, "CIFAR100_MD5", _write_archive(data_dir, [make_member(tmp_path)]))
    with pytest.raises(DataError, match="refusing to unpack"):
        load_tasks("cifar100", data_dir=data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == ["cifar-100-python.tar.gz"]
    assert not list(tmp_path.rglob("evil")) and not (data_dir / "README").exists()


def test_a_pickle_that_calls_a_function_is_refused_before_the_call(tmp_path, offline):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):          # what a tampered file would carry
            return (os.mkdir, (str(marker),))

    files = _cifar_files()
    files["train"] = pickle.dumps({b"data": Exploit()}, protocol=4)
    _write_folder(tmp_path / "d", files)
    with pytest.raises(DataError, match="refusing to load .*tampered"):
        load_tasks("cifar100", data_dir=tmp_path / "d")
    assert not marker.exists()


def test_offline_the_error_names_the_address_the_file_the_folder_and_the_md5(tmp_path, offline):
    with pytest.raises(DataError) as err:
        load_tasks("cifar100", data_dir=tmp_path)
    message = str(err.value)
    for needed in (UNREACHABLE, "cifar-100-python.tar.gz", str(tmp_path.resolve()),
                   "eb9058c3a382ffc7106e4002c42a8d85"):
        assert needed in message
    assert list(tmp_path.iterdir()) == []            # no half-downloaded file left


def test_a_download_cut_off_halfway_leaves_no_file_that_looks_like_the_archive(tmp_path, monkeypatch):
    class CutOff(io.BytesIO):          # one chunk arrives, then the line drops
        headers = {"Content-Length": str(3 << 20)}

        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError("connection reset")
            return super().read(size)

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: CutOff(b"x" * (1 << 20)))
    with pytest.raises(DataError, match="connection reset"):
        load_tasks("cifar100", data_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_command_line_prints_a_data_error_without_traceback_and_exits_1(tmp_path, offline, capsys):
    assert data.main(["--dataset", "cifar100", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and UNREACHABLE in err and "Traceback" not in err


def test_the_command_line_summarises_every_task(tmp_path, offline, capsys):
    _write_folder(tmp_path)
    assert data.main(["--dataset", "cifar100", "--data-dir", str(tmp_path), "--num-tasks", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 tasks" in out and out.count("train    85  val   15  test   20") == 4


# --- glyphs -------------------------------------------------------------------

def _glyph_images_by_class(tasks):
    """{class id: (its training + validation images in a canonical order, its test images)}"""
    images = {}
    for t in tasks:
        for i, c in enumerate(t.class_ids):
            seen = torch.cat([t.train.x[t.train.y == i], t.val.x[t.val.y == i]]).flatten(1)
            images[c] = (seen[seen.sum(1).argsort()], t.test.x[t.test.y == i])
    return images


def test_glyphs_are_balanced_normalised_and_the_same_images_for_every_seed():
    a, b = load_tasks("glyphs", seed=0), load_tasks("glyphs", seed=1)
    assert len(a) == 15
    for tasks in (a, b):
        assert sorted(c for t in tasks for c in t.class_ids) == list(range(75))
    for t in a:
        assert t.input_shape == (1, 20, 20) and t.train.x.dtype == torch.float32
        assert t.class_names == [f"glyph{c:02d}" for c in t.class_ids]
        for split, per_class in ((t.train, 238), (t.val, 42), (t.test, 80)):
            assert torch.bincount(split.y).tolist() == [per_class] * 5
    x = torch.cat([t.train.x for t in a] + [t.val.x for t in a])   # all training images
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    # Generated twice, every class has exactly the same images: the data is
    # deterministic, and the seed changes only the class order and validation rows.
    assert [t.class_ids for t in a] != [t.class_ids for t in b]
    first, second = _glyph_images_by_class(a), _glyph_images_by_class(b)
    for c in range(75):
        assert torch.equal(first[c][0], second[c][0]) and torch.equal(first[c][1], second[c][1])


# --- npz ------------------------------------------------------------------------

def _npz_arrays(classes=6, per_class=10, test_per_class=3):
    rng = np.random.RandomState(0)
    y_train = np.repeat(np.arange(classes), per_class)
    y_test = np.repeat(np.arange(classes), test_per_class)
    return dict(x_train=rng.randint(0, 256, (len(y_train), 8, 8, 3)).astype(np.uint8),
                y_train=y_train,
                x_test=rng.randint(0, 256, (len(y_test), 8, 8, 3)).astype(np.uint8),
                y_test=y_test,
                class_names=np.array([f"thing{c}" for c in range(classes)]))


def test_npz_channels_last_and_first_give_the_same_normalised_tasks(tmp_path):
    arrays = _npz_arrays()
    np.savez(tmp_path / "last.npz", **arrays)
    first = dict(arrays, x_train=arrays["x_train"].transpose(0, 3, 1, 2),
                 x_test=arrays["x_test"].transpose(0, 3, 1, 2))
    np.savez(tmp_path / "first.npz", **first)
    a = load_tasks("npz", path=tmp_path / "last.npz", classes_per_task=2, seed=4)
    b = load_tasks("npz", path=tmp_path / "first.npz", classes_per_task=2, seed=4)
    assert len(a) == 3 and a[0].input_shape == (3, 8, 8)
    for ta, tb in zip(a, b):
        assert ta.class_names == [f"thing{c}" for c in ta.class_ids]
        assert torch.equal(ta.train.x, tb.train.x) and torch.equal(ta.test.x, tb.test.x)
        assert set(ta.train.y.tolist()) == {0, 1}
    # normalised per channel with the statistics of the training images
    x = torch.cat([t.train.x for t in a] + [t.val.x for t in a])          # all training images
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_npz_grayscale_n_h_w_becomes_one_channel(tmp_path):
    arrays = _npz_arrays()
    gray = dict(arrays, x_train=arrays["x_train"][..., 0].astype(np.float32),
                x_test=arrays["x_test"][..., 0].astype(np.float32))
    np.savez(tmp_path / "gray.npz", **gray)
    tasks = load_tasks("npz", path=tmp_path / "gray.npz", classes_per_task=3)
    assert len(tasks) == 2 and tasks[0].input_shape == (1, 8, 8)


NPZ_ERRORS = {
    # name: (change to the arrays, classes_per_task, words the message must contain)
    "missing key": (lambda a: a.pop("y_test"), 2, "lacks y_test"),
    "five channels": (lambda a: a.update(x_train=np.zeros((60, 8, 8, 5), np.uint8)), 2, "shape (60, 8, 8, 5)"),
    "int images": (lambda a: a.update(x_train=a["x_train"].astype(np.int32)), 2, "dtype int32"),
    "lengths": (lambda a: a.update(y_train=a["y_train"][:-1]), 2, "59 labels but x_train has 60"),
    "negative": (lambda a: a["y_train"].__setitem__(0, -1), 2, "negative labels"),
    "fractional": (lambda a: a.update(y_train=a["y_train"] + 0.5), 2, "non-integer"),
    "2-d labels": (lambda a: a.update(y_test=a["y_test"][:, None]), 2, "must be 1-d"),
    "indivisible": (lambda a: None, 4, "6 classes do not divide into tasks of 4"),
    "unseen test class": (lambda a: a["y_test"].__setitem__(0, 9), 2, "never occur in y_train"),
    "object names": (lambda a: a.update(class_names=np.array(["a", 1], dtype=object)), 2, "dtype=str"),
    "sizes differ": (lambda a: a.update(x_test=np.zeros((18, 9, 9, 3), np.uint8)), 2, "same size"),
}


@pytest.mark.parametrize("case", list(NPZ_ERRORS))
def test_npz_problems_are_named_in_the_error(tmp_path, case):
    change, classes_per_task, words = NPZ_ERRORS[case]
    arrays = _npz_arrays()
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_tasks("npz", path=tmp_path / "bad.npz", classes_per_task=classes_per_task)


def test_npz_without_a_path_looks_in_the_data_dir_and_says_where(tmp_path):
    with pytest.raises(DataError, match="tasks.npz"):
        load_tasks("npz", data_dir=tmp_path)
    np.savez(tmp_path / "tasks.npz", **_npz_arrays())
    assert len(load_tasks("npz", data_dir=tmp_path)) == 3


def test_an_unknown_dataset_is_a_data_error():
    with pytest.raises(DataError, match="cifar100, glyphs, npz"):
        load_tasks("mnist")
    with pytest.raises(DataError, match="market_data.load_market"):     # a stream of days, not tasks
        load_tasks("market")
    with pytest.raises(DataError, match="imagedata.load_imagedata"):    # a module of its own
        load_tasks("imagedata")


def test_data_py_imports_neither_imagedata_nor_market_data():
    """Imports run one way (the two modules import data.py), so deleting
    either module leaves cifar100, glyphs and npz working."""
    tree = ast.parse(Path(data.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not imported & {"imagedata", "market_data"}
    text = Path(data.__file__).read_text()
    assert "import_module" not in text and "__import__" not in text    # nor lazily, by name


def test_only_an_explicit_opt_in_allows_a_short_last_task():
    arrays = _npz_arrays(classes=7)
    x_train, x_test = arrays["x_train"].transpose(0, 3, 1, 2), arrays["x_test"].transpose(0, 3, 1, 2)
    args = (x_train, arrays["y_train"], x_test, arrays["y_test"], [f"c{i}" for i in range(7)],
            [0.0] * 3, [1.0] * 3)
    options = dict(seed=0, num_tasks=None, classes_per_task=3, val_fraction=0.15)
    with pytest.raises(DataError, match="7 classes do not divide into tasks of 3"):
        data.make_tasks("npz", *args, **options)
    tasks = data.make_tasks("imagedata", *args, **options, allow_short_last_task=True)
    assert [t.num_classes for t in tasks] == [3, 3, 1]
    assert sorted(c for t in tasks for c in t.class_ids) == list(range(7))


# --- Split.batches ----------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), batch_size=st.integers(1, 64), seed=st.integers(0, 2**31))
def test_batches_cover_every_row_once_per_epoch_reproducibly(n, batch_size, seed):
    split = Split(torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1), torch.arange(n))
    epoch = list(split.batches(batch_size, torch.Generator().manual_seed(seed)))
    again = list(split.batches(batch_size, torch.Generator().manual_seed(seed)))
    rows = torch.cat([b.y for b in epoch]) if epoch else torch.zeros(0, dtype=torch.int64)
    assert sorted(rows.tolist()) == list(range(n))                      # each row exactly once
    assert all(len(b) == batch_size for b in epoch[:-1]) and all(0 < len(b) <= batch_size for b in epoch)
    assert all(torch.equal(b.x.view(-1).long(), b.y) for b in epoch)    # x stays with its y
    assert [b.y.tolist() for b in epoch] == [b.y.tolist() for b in again]
    in_order = torch.cat([b.y for b in split.batches(batch_size, shuffle=False)]) if n else rows
    assert in_order.tolist() == list(range(n))


# --- Sequences ----------------------------------------------------------------------

def _numbered_sequences(lengths: list[int], max_length: int) -> Sequences:
    """Row i holds i + 1 in its first lengths[i] steps (3 features), zeros after."""
    n = len(lengths)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    valid = torch.arange(max_length)[None, :] < lengths[:, None]                  # (N, L)
    x = torch.arange(1, n + 1, dtype=torch.float32)[:, None, None] * valid[..., None]
    return Sequences(x.expand(n, max_length, 3).contiguous(), lengths)          # (N, L, 3)


def _rows_are_intact(seqs: Sequences) -> list[int]:
    """The row ids of seqs, checking that every row's length still fits its x."""
    ids = []
    for x, length in zip(seqs.x, seqs.lengths.tolist()):          # x (L, 3)
        ids.append(int(x[0, 0]) - 1)
        assert (x[:length] == x[0, 0]).all() and (x[length:] == 0).all()
    return ids


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 9), min_size=0, max_size=40),
       chunk=st.integers(1, 16), seed=st.integers(0, 2**31))
def test_sequences_indexing_and_split_keep_each_rows_x_and_length_together(lengths, chunk, seed):
    seqs = _numbered_sequences(lengths, 9)
    n = len(lengths)
    index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n // 2 + 1]
    picked = seqs[index]
    assert isinstance(picked, Sequences) and len(picked) == len(index)
    assert _rows_are_intact(picked) == index.tolist()
    assert picked.lengths.tolist() == [lengths[i] for i in index.tolist()]
    assert _rows_are_intact(seqs[1:4]) == list(range(n))[1:4]
    pieces = seqs.split(chunk)
    assert [len(p) for p in pieces] == [len(t) for t in torch.arange(n).split(chunk)]
    assert [i for p in pieces for i in _rows_are_intact(p)] == list(range(n))   # all rows, in order
    assert seqs.shape == (n, 9, 3) and seqs.to("cpu").device.type == "cpu" and not seqs.is_cuda


def test_batches_of_a_sequence_split_keep_x_lengths_and_labels_together():
    seqs = _numbered_sequences([3, 1, 4, 1, 5, 9, 2, 6], 9)
    split = Split(seqs, torch.arange(8))
    for batch in split.batches(3, torch.Generator().manual_seed(0)):
        assert _rows_are_intact(batch.x) == batch.y.tolist()
        assert batch.x.lengths.tolist() == [[3, 1, 4, 1, 5, 9, 2, 6][i] for i in batch.y.tolist()]


# ---------------------------------------------------------------------------
# baselines.py: each method's defining property, on a tiny stream
# ---------------------------------------------------------------------------

def train_method(method, T=3, **cfg_over):
    """Train `method` on a tiny stream; return the model, the tasks and R."""
    torch.manual_seed(0)
    _, train_task, model_kwargs = baselines.METHODS[method]
    cfg, tasks = tiny_cfg(**cfg_over), tiny_tasks(T=T)
    model = mm.build_model(cfg, tasks[0].input_shape, [3] * T, CPU, **model_kwargs)
    gen = torch.Generator().manual_seed(0)
    R = np.full((T, T), np.nan)
    kb_states = []
    for t in range(T):
        train_task(model, t, tasks[t], cfg, gen, mm.StepTimer(CPU, lambda *_: None))
        kb_states.append(snapshot(model.kbs[0]))
        for u in range(t + 1):
            R[t, u] = mm.evaluate(model, u, tasks[u].test)
    return model, tasks, R, kb_states


def kb_changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_baseline1_retrains_the_kb_on_every_task_has_no_masks_and_forgets(monkeypatch):
    calls = []
    monkeypatch.setattr(mm.MaskGenerator, "forward", lambda *a: calls.append(1))
    model, _, R, kbs = train_method("b1")
    assert not calls and not model.use_masks and not hasattr(model, "mask_generators")
    assert all(kb_changed(kbs[t - 1], kbs[t]) for t in (1, 2))
    assert np.diag(R).min() >= 0.8 and backward_transfer(R) < -0.15, R   # learns, then forgets


def train_counting_meta_updates(monkeypatch, method, **cfg_over):
    """train_method, plus the tasks step 4 ran on and a fresh model of the same init."""
    meta_calls = []
    original = mm.step4_meta_update
    monkeypatch.setattr(mm, "step4_meta_update",
                        lambda *a, **k: (meta_calls.append(a[1]), original(*a, **k)))
    torch.manual_seed(0)
    fresh = mm.build_model(tiny_cfg(**cfg_over), (1, 20, 20), [3, 3, 3], CPU, masks=False)
    return meta_calls, fresh, *train_method(method, **cfg_over)


@pytest.mark.parametrize("method", ["b2", "b2-report"])
def test_baseline2_runs_the_meta_update_and_trains_every_head(monkeypatch, method):
    """b2 trains the KB ordinarily on every task; b2-report (the report's code)
    on the first only, after which the KB moves only by meta-updates (none at
    all with a zero outer step). Both train every task's head."""
    meta_calls, fresh, model, _, R, kbs = train_counting_meta_updates(monkeypatch, method,
                                                                      meta_outer_lr=0.0)
    assert meta_calls == [0, 1, 2]
    for t in range(3):                    # same init (same seed), so a trained head differs
        assert not torch.equal(model.heads[t].weight, fresh.heads[t].weight)
    assert kb_changed(kbs[0], kbs[2]) == (method == "b2")
    if method == "b2-report":
        assert np.diag(R).min() >= 0.5 and backward_transfer(R) == 0.0, R     # chance: 1/3
        _, _, _, kbs = train_method(method, meta_outer_lr=0.5)
        assert kb_changed(kbs[0], kbs[2])


def test_baseline3_trains_masks_and_the_kb_on_every_task():
    model, _, _, kbs = train_method("b3")
    assert model.use_masks
    assert all(kb_changed(kbs[t - 1], kbs[t]) for t in (1, 2))
    torch.manual_seed(0)
    fresh = mm.build_model(tiny_cfg(), (1, 20, 20), [3, 3, 3], CPU)
    for t in range(3):
        assert not torch.equal(model.mask_generators[t].layers[0].weight,
                               fresh.mask_generators[t].layers[0].weight)


def test_baseline4_has_t_times_the_parameters_and_bwt_exactly_zero():
    model, _, R, _ = train_method("b4")
    one = mm.build_model(tiny_cfg(), (1, 20, 20), [3], CPU, masks=False)
    assert mm.count_parameters(model) == 3 * mm.count_parameters(one)
    # Each task learns (chance 1/3), and nothing a task uses is trained afterwards;
    # a shared KB would be overwritten by the later tasks (see Baseline 1).
    assert np.diag(R).min() >= 0.8 and backward_transfer(R) == 0.0, R


def test_the_frozen_kb_ablation_has_bwt_exactly_zero():
    _, _, R, kbs = train_method("ablation")
    assert np.diag(R).min() >= 0.8 and backward_transfer(R) == 0.0, R
    assert not kb_changed(kbs[0], kbs[2])


def test_mark_moves_the_kb_after_the_first_task_only_by_the_meta_update():
    _, _, _, kbs = train_method("mark", meta_outer_lr=0.0)   # eps = 0: no meta movement
    assert not kb_changed(kbs[0], kbs[2])
    _, _, _, kbs = train_method("mark", meta_outer_lr=0.5)
    assert kb_changed(kbs[0], kbs[2])


def test_table_builder_computes_mean_and_std_from_hand_made_results(tmp_path):
    def run(seed, acc, bwt):
        return {"seed": seed, "acc": acc, "bwt": bwt, "tasks_done": 2, "parameters": 1234,
                "acc_matrix": [[0.9, None], [0.8, 0.7]], "task_seconds": [30.0, 30.0],
                "identity": {"dataset": "cifar100"}}
    for method, runs in {"mark": [run(0, 0.80, -0.01), run(1, 0.90, 0.01)],
                         "b1": [run(0, 0.50, -0.30)]}.items():
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps(
            {"schedule": "profile 'short'", "runs": runs}))
    rows = {r["method"]: r for r in baselines.build_table(tmp_path, "cifar100", log=lambda *_: None)}
    mark = rows["MARK"]
    assert mark["acc_mean"] == pytest.approx(0.85) and mark["acc_std"] == pytest.approx(0.05)
    assert mark["bwt_mean"] == pytest.approx(0.0) and mark["runs"] == "2"
    assert mark["wall time / run"] == "1.0 min" and mark["parameters"] == "1,234"
    assert "78.31" in mark["reference Acc (std) %"] and "80.36" in mark["reference Acc (std) %"]
    text = (tmp_path / "table.md").read_text()
    assert "| MARK | 85.00 (5.00) | 0.00 | 1,234 | 1.0 min | 2 |" in text
    assert "| Baseline 1 (sequential KB, no masks) | 50.00 (0.00) | -30.00 |" in text
    saved = {r["method"]: r for r in json.loads((tmp_path / "table.json").read_text())["rows"]}
    assert saved["MARK"]["acc_mean"] == pytest.approx(0.85)


def test_the_table_shows_each_task_of_mark_beside_the_ablation(tmp_path):
    def run(R):
        T = len(R)
        return {"seed": 0, "acc": float(np.mean(R[-1])), "bwt": 0.0, "tasks_done": T, "parameters": 1,
                "identity": {"dataset": "cifar100"}, "task_seconds": [1.0] * T,
                "acc_matrix": [[R[i][j] if j <= i else None for j in range(T)] for i in range(T)]}
    for method, R in {"mark": [[0.9, 0], [0.92, 0.8]], "ablation": [[0.9, 0], [0.9, 0.85]]}.items():
        (tmp_path / method).mkdir()
        (tmp_path / method / "results.json").write_text(json.dumps({"schedule": "s", "runs": [run(R)]}))
    baselines.build_table(tmp_path, log=lambda *_: None)
    text = (tmp_path / "table.md").read_text()
    assert "| 1 | 90.00 | 92.00 | 90.00 | 90.00 | +2.00 |" in text
    assert "| 2 | 80.00 | 80.00 | 85.00 | 85.00 | -5.00 |" in text


def test_while_a_step_trains_every_frozen_module_is_in_eval_mode(monkeypatch):
    """Frozen modules must not update BN statistics or apply dropout: during
    step 3 only M_t and C_t are in training mode (the KB, trained in train
    mode by step 2 just before, must be back in eval mode)."""
    torch.manual_seed(0)
    cfg, task = tiny_cfg(), tiny_tasks(T=1)[0]
    model = mm.build_model(cfg, task.input_shape, [3], CPU)
    gen = torch.Generator().manual_seed(0)
    q = mm.step1_feature_extractor(model, 0, task, cfg, gen)
    mm.step2_pretrain_kb(model, 0, task, cfg, gen)
    seen = []
    original_fit = mm.fit

    def spying_fit(model_, cfg_, gen_, n, loss_of_batch, **kw):
        def spy(i):
            seen.append({name for name, m in model_.named_modules() if m.training})
            return loss_of_batch(i)
        return original_fit(model_, cfg_, gen_, n, spy, **kw)

    monkeypatch.setattr(mm, "fit", spying_fit)
    mm.step3_masks_and_head(model, 0, task, cfg, gen, q)
    trained = {n for n in seen[0] if n}
    assert trained and all(n.startswith(("mask_generators.0", "heads.0")) for n in trained), trained


# ---------------------------------------------------------------------------
# Properties of MARK's sequence family and the MarketCL protocol (mark_min.py).
#
#
# No real data is read: every stream is written by write_synthetic_market into
# a temporary folder, and every model is tiny.
# ---------------------------------------------------------------------------

torch.set_num_threads(1)
MARKET_SETTINGS = settings(max_examples=15, deadline=None)


def market_cfg(**overrides):
    """Tiny LSTMs (8 units) and one epoch per step: seconds per run, same code paths."""
    base = dict(dataset="market-synthetic", profile="paper", seq_query=8, seq_channels=(8, 8, 8),
                epochs_fe=1, epochs_kb=1, epochs_masks=1, epochs_consolidate=1, meta_epochs=1,
                meta_k=1, meta_inner_steps=1)
    base.update(overrides)
    return mm.resolve_config(mm.Config(**base), overridden=set(base))


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """3 symbols x 3 days with samples (the first written day is history only)."""
    folder = tmp_path_factory.mktemp("market")
    write_synthetic_market(folder, seed=0, num_symbols=3, num_days=4)
    return load_market(folder, seed=0)


def snapshot_symbol(model, s):
    """Every parameter and buffer of symbol s's F_s, M_s and C_s, cloned."""
    modules = [model.extractors[s], model.mask_generators[s], model.heads[s]]
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def identical(a, b) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# The LSTMs read each sequence's true last step, never padding
# ---------------------------------------------------------------------------

@MARKET_SETTINGS
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_a_padded_batch_gives_each_sequence_the_output_of_running_it_alone(lengths, seed):
    torch.manual_seed(seed)
    kb, fe = mm.SequenceKnowledgeBase(3, (4, 5, 6)).eval(), mm.SequenceFeatureExtractor(3, 4).eval()
    L = max(lengths) + 3                                    # padding even after the longest
    x = torch.randn(len(lengths), L, 3)
    lengths = torch.tensor(lengths)
    x[torch.arange(L)[None, :] >= lengths[:, None]] = 0     # zero padding, as the loader writes it
    masks = [torch.rand(len(lengths), c) for c in (4, 5, 6)]
    batch = Sequences(x, lengths)
    with torch.no_grad():
        kb_batch, fe_batch = kb(batch, masks), fe(batch)
        for i, n in enumerate(lengths.tolist()):
            alone = Sequences(x[i:i + 1, :n], lengths[i:i + 1])          # unpadded
            torch.testing.assert_close(kb_batch[i], kb(alone, [m[i:i + 1] for m in masks])[0])
            torch.testing.assert_close(fe_batch[i], fe(alone)[0])


# ---------------------------------------------------------------------------
# Task isolation for the LSTM model
# ---------------------------------------------------------------------------

def test_training_a_symbol_leaves_every_other_symbols_modules_bit_identical(stream):
    cfg = market_cfg()
    S = len(stream.symbols)
    model = mm.build_model(cfg, stream.splits[0][0].x.shape[1:], [4] * S, mm.torch.device("cpu"),
                           labels=4)
    gen = torch.Generator().manual_seed(0)
    timer = mm.StepTimer(torch.device("cpu"), lambda _: None)
    index = 0
    for d in range(2):                   # day 2 retrains every symbol with its own modules
        for s in range(S):
            others = {u: snapshot_symbol(model, u) for u in range(S) if u != s}
            own, weights = snapshot_symbol(model, s), model.class_weights.clone()
            model.set_class_weights(s, stream.splits[d][s].y)
            mm.train_task_mark(model, s, mm.market_task(index, s, stream.splits[d][s]), cfg, gen, timer)
            index += 1
            for u, before in others.items():
                assert identical(before, snapshot_symbol(model, u)), f"day {d}: symbol {u} changed"
                assert torch.equal(weights[u], model.class_weights[u])
            assert not identical(own, snapshot_symbol(model, s)), "the trained symbol did not learn"


def test_only_the_first_symbol_day_pre_trains_the_kb(stream):
    """With the meta-update off (the ablation), the KB is trained on the first
    symbol-day and then never again, not even when symbol 0 comes back."""
    cfg = market_cfg()
    model = mm.build_model(cfg, stream.splits[0][0].x.shape[1:], [4] * 3, torch.device("cpu"),
                           labels=4)
    gen, timer = torch.Generator().manual_seed(0), mm.StepTimer(torch.device("cpu"), lambda _: None)
    kb_at_init = {k: v.clone() for k, v in model.kbs[0].state_dict().items()}
    index = 0
    for d in range(2):
        for s in range(3):
            mm.train_task_mark(model, s, mm.market_task(index, s, stream.splits[d][s]), cfg, gen, timer,
                               meta=False)
            if index == 0:
                assert not identical([kb_at_init], [model.kbs[0].state_dict()]), "step 2 did not run"
                kb_after_first = {k: v.clone() for k, v in model.kbs[0].state_dict().items()}
            assert identical([kb_after_first], [model.kbs[0].state_dict()]), f"day {d}, symbol {s}"
            index += 1


# ---------------------------------------------------------------------------
# The class-weighted loss of the four heads
# ---------------------------------------------------------------------------

def test_class_weighted_loss_equals_a_hand_computation():
    """2 label heads of 3 classes, 4 samples. Head 0 holds class 0 three times and
    class 1 once (class 2 absent); head 1 holds classes 0, 1, 2, 2."""
    model = mm.MARKNet((5, 2), [3], market_cfg(seq_channels=(2, 2, 2), seq_query=2), labels=2)
    y = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 2]])
    model.set_class_weights(0, y)
    # w_c = n / (k n_c) with n = 4, k = 3; an absent class gets 1.
    expected_weights = [[4 / 9, 4 / 3, 1.0], [4 / 3, 4 / 3, 2 / 3]]
    torch.testing.assert_close(model.class_weights[0], torch.tensor(expected_weights))
    out = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))     # (B, labels * k)
    logp = F.log_softmax(out.view(4, 2, 3).double(), dim=2).numpy()         # (B, labels, k)
    per_head = []
    for j in range(2):
        w = np.array([expected_weights[j][c] for c in y[:, j]])           # weight of each target
        nll = -np.array([logp[i, j, c] for i, c in enumerate(y[:, j])])
        per_head.append((w * nll).sum() / w.sum())                        # PyTorch's weighted mean
    assert model.loss(out, y, 0).item() == pytest.approx(np.mean(per_head), rel=1e-5)


def test_a_class_absent_from_the_labels_never_enters_the_loss():
    model = mm.MARKNet((5, 2), [3], market_cfg(seq_channels=(2, 2, 2), seq_query=2), labels=2)
    y = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 2]])                    # head 0 lacks class 2
    model.set_class_weights(0, y)
    out = torch.randn(4, 6)
    loss = model.loss(out, y, 0)
    model.class_weights[0, 0, 2] = 1000.0                                  # any weight for it
    assert model.loss(out, y, 0).item() == pytest.approx(loss.item(), rel=1e-6)


# ---------------------------------------------------------------------------
# The day-by-day protocol, end to end through the command lines
# ---------------------------------------------------------------------------

TINY_FLAGS = ["--dataset", "market-synthetic", "--num-tasks", "3", "--num-days", "3",
              "--profile", "paper", "--seq-query", "8", "--seq-channels", "8", "8", "8",
              "--epochs-fe", "1", "--epochs-kb", "1", "--epochs-masks", "1",
              "--epochs-consolidate", "1", "--meta-k", "1", "--meta-inner-steps", "1",
              "--meta-epochs", "1"]


def check_market_results(saved, method):
    assert saved["method"] == method and saved["summary"]["runs"] == 1
    run = saved["runs"][0]
    assert run["days_done"] == run["training_days"] == 2          # 3 days: train 2, test each on the next
    for key in ("acc_per_label", "bwt_per_label", "macro_f1_per_label"):
        assert len(run[key]) == 4
    assert run["acc"] == pytest.approx(np.mean(run["acc_per_label"]))
    assert saved["summary"]["acc_mean"] == pytest.approx(run["acc"])
    assert np.allclose(np.sum(run["class_balance"], axis=1), 1.0)
    for day in run["days"]:
        assert day["tested"] == run["symbols"] and len(day["acc_matrices"]) == 4
        for R in day["acc_matrices"]:                               # lower triangle filled
            assert all(len(row) == 3 for row in R)
            assert all((R[i][j] is None) == (j > i) for i in range(3) for j in range(3))
        assert day["seconds"] > 0
    return run


def test_market_synthetic_run_writes_per_label_results_and_baseline4_does_not_forget(tmp_path):
    # 10 KB epochs: enough that a KB shared by the symbols (Baseline 1, the
    # control) changes earlier symbols' predictions, so BWT == 0 is not vacuous.
    # MARK too: a table compares methods on one schedule.
    assert mm.main(TINY_FLAGS + ["--epochs-kb", "10", "--data-dir", str(tmp_path),
                                 "--out", str(tmp_path / "mark")]) == 0
    mark = check_market_results(json.loads((tmp_path / "mark" / "results.json").read_text()), "mark")
    assert (tmp_path / "market-synthetic-seed0" / "SYN00.csv").exists()    # through the real loader

    runs = {}
    for method in ("b4", "b1"):
        assert baselines.main(TINY_FLAGS + ["--epochs-kb", "10", "--method", method, "--data-dir",
                                            str(tmp_path), "--out", str(tmp_path / method)]) == 0
        runs[method] = check_market_results(
            json.loads((tmp_path / method / "results.json").read_text()), method)
    b4 = runs["b4"]
    assert b4["bwt_per_label"] == [0.0] * 4 and b4["bwt"] == 0.0       # exactly: one network per symbol
    assert any(bwt != 0.0 for bwt in runs["b1"]["bwt_per_label"])       # a shared KB does not keep them
    assert b4["parameters"] > mark["parameters"]
    baselines.build_table(tmp_path, "market-synthetic", log=lambda _: None)    # the report's Table 3
    table = (tmp_path / "table.md").read_text()
    assert "| MARK |" in table and "| Baseline 4 (independent network per task) |" in table
    assert "class balance" in table


def test_a_skipped_symbol_day_is_not_trained_and_has_no_row_or_column(stream, monkeypatch):
    days = [list(row) for row in stream.splits]
    days[0][1] = None                       # symbol 1 has no samples on day 0
    days[2][2] = None                       # symbol 2 has none on the last day: untestable on day 1
    holey = mm.dataclasses.replace(stream, splits=days)
    trained = []

    def spy(model, t, task, *args):
        trained.append(t)
        return mm.train_task_mark(model, t, task, *args)

    run = mm.run_market_seed(market_cfg(), "mark", 0, holey, spy, {}, torch.device("cpu"),
                             lambda _: None)
    assert trained == [0, 2, 0, 1, 2]
    S = stream.symbols
    assert run["days"][0]["tested"] == [S[0], S[2]] and run["days"][1]["tested"] == [S[0], S[1]]
    assert all(np.array(R).shape == (2, 2) for day in run["days"] for R in day["acc_matrices"])


def test_mark_with_supsup_runs_on_market_data(tmp_path):
    assert mm.main(TINY_FLAGS + ["--num-tasks", "2", "--supsup", "--data-dir", str(tmp_path),
                                 "--out", str(tmp_path / "sup")]) == 0
    run = json.loads((tmp_path / "sup" / "results.json").read_text())["runs"][0]
    assert len(run["acc_per_label"]) == 4 and run["days_done"] == 2


@pytest.mark.parametrize("argv", [["--source", "x"], ["--dataset", "glyphs", "--num-days", "3"],
                                  ["--dataset", "market-synthetic", "--num-days", "1"]])
def test_market_flags_are_checked(argv, capsys):
    with pytest.raises(SystemExit):
        mm.parse_config(argv)
    assert "error" in capsys.readouterr().err


def test_market_without_source_stops_with_a_message(capsys):
    assert mm.main(["--dataset", "market"]) == 1
    assert "--dataset market needs --source" in capsys.readouterr().err


def test_topk_straight_through_raises_the_score_magnitude_of_a_weight_the_loss_wants_on():
    """The top-k mask depends on |score|, so the straight-through gradient must
    carry sign(score): a negative score that the loss wants in the mask must
    become more negative. (Passing the mask's gradient unchanged, our first
    version, pushed it towards 0 and MARK + SupSup stayed near chance.)"""
    layer = mm.SupermaskLinear(2, 1, num_tasks=1, how="topk", density=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.scores[0].copy_(torch.tensor([[-0.5, 0.1]]))
    (-layer(torch.ones(1, 2), 0).sum()).backward()      # the loss wants every weight on
    grad = layer.scores[0].grad[0]
    assert grad[0] > 0 and grad[1] < 0                   # SGD: -0.5 goes down, 0.1 goes up
