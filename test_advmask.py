"""Tests of advmask.py, in the order of its sections: hypothesis properties, oracles, and CLI runs in subprocesses.

Everything runs on CPU with tiny open_clip models built from a config (random weights, no downloads).
"""
import ast
import collections
import contextlib
import copy
import csv
import errno
import functools
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import resource
import runpy
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from functools import partial
from pathlib import Path

import huggingface_hub.constants
import matplotlib.axes
import matplotlib.figure
import numpy as np
import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils import parametrize

import advmask as am

HERE = Path(__file__).resolve().parent
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: a worker per core, each one thread, its subprocesses too
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
MODEL_SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SIZE = am.TINY_CLIP["vision_cfg"]["image_size"]
PRE = am.preprocess_cfg(open_clip.CLIP(**am.TINY_CLIP))  # open_clip's default preprocessing at the tiny size


@functools.lru_cache(maxsize=None)
def _tiny_clip(seed):
    torch.manual_seed(seed)
    return open_clip.CLIP(**am.TINY_CLIP).eval()


def tiny_clip(seed=0):
    """A fresh copy of a tiny random CLIP (built once per seed)."""
    return copy.deepcopy(_tiny_clip(seed))


def tiny_classifier(n_classes=3, seed=0):
    return am.ClipClassifier(tiny_clip(seed), [f"thing {c}" for c in range(n_classes)], ["a photo of a {}.", "a {}."])


def images(batch, seed=0):
    return torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def randomize_scores(model, seed, threshold=am.MASK_THRESHOLD):
    """Scores spread around the threshold (some exactly on it), so that about half of the weights are off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, mask in am._masks(model):
            s = threshold + 1e-2 * torch.randn(mask.scores.shape, generator=g)
            s[torch.rand(s.shape, generator=g) < 0.05] = threshold
            mask.scores.copy_(s)


def masked_weights(model):
    """(θ original, θ' effective, scores, threshold) for every masked weight."""
    return [(module.parametrizations[name].original, getattr(module, name), mask.scores, mask.threshold)
            for _, module, name, mask in am._masks(model)]


# ---------------------------------------------------------------------------------------------------------------------
# CLIP as a classifier

def test_classifier_logits_equal_clip_computed_independently():
    """Logits are exp(logit_scale)·f̂(x)·T̂ᵀ with CLIP's own normalisation and the template-averaged text features."""
    clip, names, templates = tiny_clip(), ["cat", "dog", "axolotl"], ["a photo of a {}.", "art of a {}."]
    clf = am.ClipClassifier(clip, names, templates)
    x = images(5)
    with torch.no_grad():
        text = []
        for name in names:
            t = clip.encode_text(open_clip.tokenize([tpl.format(name) for tpl in templates]), normalize=True)
            text.append(F.normalize(t.mean(0), dim=0))
        norm = T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
        f = clip.encode_image(norm(x), normalize=True)
        expected = clip.logit_scale.exp() * f @ torch.stack(text).T
        got = clf(x)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_features_are_every_visual_block_output():
    """return_features gives one (B, T, D) tensor per visual block, equal to the block's output, and the same logits."""
    clf, x = tiny_classifier(), images(2)
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in clf.clip.visual.transformer.resblocks]
    with torch.no_grad():
        logits, feats = clf(x, return_features=True)
    for h in hooks:
        h.remove()
    tokens = (SIZE // am.TINY_CLIP["vision_cfg"]["patch_size"]) ** 2 + 1
    assert len(feats) == am.TINY_CLIP["vision_cfg"]["layers"]
    for got, block_out in zip(feats, seen):
        assert got.shape == (2, tokens, am.TINY_CLIP["vision_cfg"]["width"])
        assert torch.equal(got, block_out)
    with torch.no_grad():
        assert torch.equal(logits, clf(x))


def test_logits_are_fp32_under_bf16_autocast():
    """Under bf16 autocast the blocks run in bf16, but the logits come out fp32 (no 0.125-wide grid, no argmax ties)."""
    clf = tiny_classifier()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        logits, feats = clf(images(2), return_features=True)
    assert feats[0].dtype == torch.bfloat16 and logits.dtype == torch.float32


def test_text_tower_runs_only_at_construction():
    """Text features are computed once: a forward pass never calls the text tower."""
    clf = tiny_classifier()
    clf.clip.encode_text = None  # calling it would raise TypeError
    with torch.no_grad():
        assert clf(images(1)).shape == (1, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Binary masks with a straight-through estimator

@pytest.mark.parametrize("target", ["mhsa", "mlp", "all"])
@pytest.mark.parametrize("bare", [False, True])
def test_apply_masks_leaves_only_scores_trainable(target, bare):
    """Only the chosen visual weights get masks; every other parameter, text tower included, is frozen and unmasked."""
    model = tiny_clip() if bare else tiny_classifier()
    visual = am.visual_tower(model)
    names = {"mhsa": ["attn.in_proj_weight", "attn.out_proj.weight"], "mlp": ["mlp.c_fc.weight", "mlp.c_proj.weight"]}
    want = {f"transformer.resblocks.{i}.{p}" for i in range(len(visual.transformer.resblocks))
            for p in names.get(target, names["mhsa"] + names["mlp"])}
    n_want = sum(visual.get_parameter(n).numel() for n in want)
    scores = am.apply_masks(model, target)
    assert {name for name, *_ in am._masks(model)} == want
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(s) for s in scores}
    assert sum(s.numel() for s in scores) == n_want
    assert all(torch.all(s == am.MASK_INIT) for s in scores)
    text_tower = model.clip.transformer if not bare else model.transformer
    assert not any(parametrize.is_parametrized(m) for m in text_tower.modules())
    with pytest.raises(ValueError, match="already has masks"):
        am.apply_masks(model, target)
    with pytest.raises(ValueError, match="unknown mask target"):
        am.apply_masks(tiny_clip(), "heads")
    other = tiny_clip()
    assert all(torch.all(s == 0.25) for s in am.apply_masks(other, target, init=0.25, threshold=0.2))
    assert all(mask.threshold == 0.2 for *_, mask in am._masks(other))


@MODEL_SETTINGS
@given(seed=st.integers(0, 10_000), threshold=st.floats(-1, 1, allow_nan=False, width=32))
def test_effective_weight_is_theta_where_on_and_zero_where_off(seed, threshold):
    """M_bin = 1[M > threshold] ∈ {0, 1}; θ' equals θ bit for bit where on and 0 where off."""
    model = tiny_clip()
    am.apply_masks(model, "all", threshold=threshold)
    randomize_scores(model, seed, threshold)
    for theta, effective, scores, thr in masked_weights(model):
        on = scores > thr
        assert torch.equal(effective[on], theta[on])
        assert torch.all(effective[~on] == 0)
        m_bin = am._BinarizeSTE.apply(scores, thr)
        assert set(m_bin.unique().tolist()) <= {0.0, 1.0} and torch.equal(m_bin.bool(), on)


@MODEL_SETTINGS
@given(seed=st.integers(0, 10_000))
def test_ste_gradient_equals_effective_gradient_times_theta(seed):
    """∂L/∂M equals (∂L/∂θ') ⊙ θ, with ∂L/∂θ' taken independently on a plain model holding the weights θ'."""
    masked, x, y = tiny_classifier(), images(3, seed), torch.tensor([0, 2, 1])
    am.apply_masks(masked, "all")
    randomize_scores(masked, seed)
    plain = am.bake_masks(copy.deepcopy(masked))
    F.cross_entropy(masked(x), y).backward()
    names = [name for name, *_ in am._masks(masked)]
    weights = [am.visual_tower(plain).get_parameter(n) for n in names]
    for w in weights:
        w.requires_grad_(True)
    grads = torch.autograd.grad(F.cross_entropy(plain(x), y), weights)
    for (theta, _, scores, _), grad_effective in zip(masked_weights(masked), grads):
        assert grad_effective.abs().sum() > 0
        torch.testing.assert_close(scores.grad, grad_effective * theta, rtol=1e-5, atol=1e-12)


def test_all_on_mask_gives_the_unmasked_logits_exactly():
    """With every score above the threshold the masked model is bit for bit the unmasked one."""
    plain, masked, x = tiny_classifier(), tiny_classifier(), images(4)
    am.apply_masks(masked, "all")
    with torch.no_grad():
        assert torch.equal(masked(x), plain(x))


@MODEL_SETTINGS
@given(seed=st.integers(0, 10_000))
def test_bake_and_fixed_masks_give_the_masked_logits(seed):
    """bake_masks and fixed_masks reproduce the masked model's logits exactly; baking leaves no masks behind."""
    masked, x = tiny_classifier(), images(3, seed)
    am.apply_masks(masked, "mhsa")
    randomize_scores(masked, seed)
    with torch.no_grad():
        expected = masked(x)
    with am.fixed_masks(masked):
        assert not any(effective.requires_grad for _, effective, *_ in masked_weights(masked))
        assert torch.equal(masked(x), expected)
    baked = am.bake_masks(copy.deepcopy(masked))
    assert not any(parametrize.is_parametrized(m) for m in baked.modules())
    assert isinstance(baked.clip.visual.transformer.resblocks[0].attn.in_proj_weight, torch.nn.Parameter)
    with torch.no_grad():
        assert torch.equal(baked(x), expected)


@pytest.mark.parametrize("target", ["mhsa", "mlp", "all"])
def test_bake_keeps_the_parameter_order_of_a_fresh_model(target):
    """A baked model's named_parameters() come in a fresh open_clip model's order, so zipping two models pairs them."""
    model = tiny_clip()
    am.apply_masks(model, target)
    am.bake_masks(model)
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in tiny_clip().named_parameters()]


@MODEL_SETTINGS
@given(seed=st.integers(0, 10_000))
def test_mask_sparsity_is_the_fraction_of_weights_off(seed):
    """mask_sparsity counts the weights whose score is not above the threshold."""
    model = tiny_clip()
    am.apply_masks(model, "mhsa")
    randomize_scores(model, seed)
    off = sum((s <= t).sum().item() for _, _, s, t in masked_weights(model))
    total = sum(s.numel() for _, _, s, _ in masked_weights(model))
    assert am.mask_sparsity(model) == pytest.approx(off / total, abs=1e-12)


def placement(module):
    """The device types of every parameter and buffer of a module."""
    return {t.device.type for t in itertools.chain(module.parameters(), module.buffers())}


def test_every_model_the_method_and_the_cli_build_sits_on_the_device_of_its_clip():
    """Placement, with the meta device standing in for a GPU: the classifier (built on a meta CLIP, or moved there
    with .to), its masks, the baked model, the tuned weights, the baseline's copy and the benchmark's model hold
    every parameter and buffer on the CLIP's device; a CPU tensor among CUDA ones fails at the first forward."""
    with torch.device("meta"):
        clip = open_clip.CLIP(**am.TINY_CLIP)
    classifier = am.ClipClassifier(clip, ["cat", "dog"], ["a photo of a {}."])
    assert placement(classifier) == {"meta"}
    am.apply_masks(classifier, "all")
    assert placement(classifier) == {"meta"} and placement(copy.deepcopy(classifier)) == {"meta"}
    assert placement(am.bake_masks(classifier)) == {"meta"}
    assert placement(tiny_classifier().to("meta")) == {"meta"}
    weights = am.tune_weights(am.ClipClassifier(copy.deepcopy(clip), ["cat"], ["a {}."]))
    assert {w.device.type for w in weights} == {"meta"}
    for masked in (True, False):
        model, optimizer = am._bench_model(am.TINY_CLIP, torch.device("meta"), "mhsa", masked)
        assert placement(model) == {"meta"}


def fake_cuda(module, mode):
    """The module with every parameter and buffer replaced by a fake CUDA tensor of FakeTensorMode `mode`."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in table.items():
                if t is not None:
                    fake = mode.fake_tensor_converter.from_meta_and_device(mode, t.to("meta"), torch.device("cuda"))
                    table[name] = nn.Parameter(fake, t.requires_grad) if isinstance(t, nn.Parameter) else fake
    return module


def test_the_forward_paths_run_on_fake_cuda_tensors():
    """Under FakeTensorMode (CUDA's device rules, no GPU): the classifier's logits and block features, with masks,
    fixed masks, baked and converted to fp16 (fp16 logits then), and the evaluation's clean pass (uint8 batch moved
    over, scaled, classified) all run on CUDA tensors and give CUDA outputs. (Backward needs a CUDA runtime: the GPU
    group covers it.)"""
    mode = FakeTensorMode()
    clip = fake_cuda(open_clip.CLIP(**am.TINY_CLIP), mode)
    with mode:
        classifier = am.ClipClassifier(clip, ["cat", "dog", "axolotl"], ["a photo of a {}.", "art of a {}."])
        x = torch.rand(4, 3, SIZE, SIZE, device="cuda")
        for stage in ("plain", "masked", "fixed", "baked", "fp16"):
            if stage == "masked":
                am.apply_masks(classifier)
            if stage == "baked":
                am.bake_masks(classifier)
            if stage == "fp16":
                am.fp16_network(classifier.clip)
            with am.fixed_masks(classifier) if stage == "fixed" else contextlib.nullcontext():
                logits, feats = classifier(x, return_features=True)
                dtype = torch.float16 if stage == "fp16" else torch.float32
                assert logits.device.type == "cuda" and logits.shape == (4, 3) and logits.dtype == dtype
                assert len(feats) == am.TINY_CLIP["vision_cfg"]["layers"]
                assert {(f.device.type, f.dtype) for f in feats} == {("cuda", dtype)}
        images_u8 = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)  # evaluate's cached test images
        y = torch.tensor([0, 1, 2, 0])
        device = next(classifier.parameters()).device
        correct = (classifier(am.to_unit(images_u8.to(device))).argmax(1) == y.to(device)).cpu()
        assert correct.device.type == "cpu" and correct.shape == (4,)


# ---------------------------------------------------------------------------------------------------------------------
# PGD

def torchattacks_pgd(model, images, labels, eps, alpha, steps):
    """torchattacks.PGD.forward (v3.5.1, MIT licence) with random_start=False, transcribed as the oracle."""
    images = images.clone().detach()
    labels = labels.clone().detach()
    loss = torch.nn.CrossEntropyLoss()
    adv_images = images.clone().detach()
    for _ in range(steps):
        adv_images.requires_grad = True
        outputs = model(adv_images)
        cost = loss(outputs, labels)
        grad = torch.autograd.grad(cost, adv_images, retain_graph=False, create_graph=False)[0]
        adv_images = adv_images.detach() + alpha * grad.sign()
        delta = torch.clamp(adv_images - images, min=-eps, max=eps)
        adv_images = torch.clamp(images + delta, min=0, max=1).detach()
    return adv_images


@MODEL_SETTINGS
@given(batch=st.integers(1, 4), eps=st.floats(0, 16 / 255), alpha=st.floats(1e-3, 8 / 255),
       steps=st.integers(0, 4), random_start=st.booleans(), seed=st.integers(0, 10_000))
def test_pgd_stays_in_the_eps_ball_and_the_pixel_range(batch, eps, alpha, steps, random_start, seed):
    """x_adv lies within ε of x in l∞ (up to float rounding) and inside [0, 1], for any ε, α, steps and batch."""
    model, x = tiny_classifier(), images(batch, seed)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the box edges
    y = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(seed))
    x_adv = am.pgd_attack(model, x, y, eps, alpha, steps, random_start)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@MODEL_SETTINGS
@given(eps=st.sampled_from([1 / 255, 4 / 255, 8 / 255]), seed=st.integers(0, 10_000))
def test_pgd_starts_from_a_uniform_point_of_the_whole_ball(eps, seed):
    """With no steps, PGD returns its random start: x + U(−ε, ε) drawn from the generator given, clamped to [0, 1];
    the start fills the ball on both sides."""
    x = torch.full((4, 3, SIZE, SIZE), 0.5)
    start = am.pgd_attack(tiny_classifier(), x, torch.zeros(4, dtype=torch.long), eps, eps, steps=0,
                          generator=torch.Generator().manual_seed(seed))
    noise = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(start, (x + noise).clamp(0, 1))
    delta = start - x
    assert delta.min() < -0.9 * eps and delta.max() > 0.9 * eps and abs(delta.mean()) < 0.05 * eps


@pytest.mark.parametrize("training", [True, False])
def test_pgd_leaves_no_grad_and_restores_the_mode(training):
    """The attack runs in eval mode, restores the caller's mode, and leaves no .grad on any parameter."""
    model = tiny_classifier()
    am.apply_masks(model)
    model.train(training)
    modes = []
    model.clip.visual.register_forward_hook(lambda m, i, o: modes.append(m.training))
    am.pgd_attack(model, images(2), torch.tensor([0, 1]), steps=3)
    assert modes == [False] * 3
    assert model.training == training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("masked", [False, True])
def test_pgd_equals_torchattacks_without_random_start(masked):
    """With random_start=False pgd_attack gives exactly torchattacks' PGD images."""
    model, x, y = tiny_classifier(), images(4, seed=3), torch.tensor([0, 1, 2, 0])
    if masked:
        am.apply_masks(model)
        randomize_scores(model, 0)
    model.eval()
    for eps, alpha, steps in [(1 / 255, 1 / 255, 2), (4 / 255, 1 / 255, 10), (8 / 255, 2 / 255, 5)]:
        expected = torchattacks_pgd(model, x, y, eps, alpha, steps)
        assert torch.equal(am.pgd_attack(model, x, y, eps, alpha, steps, random_start=False), expected)
        assert not torch.equal(expected, x)


def test_pgd_on_baked_or_fixed_masks_equals_the_masked_path():
    """The attack finds the same images on the masked model, inside fixed_masks, and on the baked copy."""
    model, x, y = tiny_classifier(), images(4, seed=5), torch.tensor([2, 1, 0, 0])
    am.apply_masks(model)
    randomize_scores(model, 1)
    expected = am.pgd_attack(model, x, y, 4 / 255, 1 / 255, 5, random_start=False)
    with am.fixed_masks(model):
        assert torch.equal(am.pgd_attack(model, x, y, 4 / 255, 1 / 255, 5, random_start=False), expected)
    baked = am.bake_masks(copy.deepcopy(model))
    assert torch.equal(am.pgd_attack(baked, x, y, 4 / 255, 1 / 255, 5, random_start=False), expected)


# ---------------------------------------------------------------------------------------------------------------------
# Losses

feature_shapes = st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 4), st.integers(1, 6))  # L, B, T, D


def random_lafa_inputs(shape, seed, classes=4):
    n_layers, b, t, d = shape
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randn(b, t, d, generator=g) for _ in range(n_layers)]
    adv = [c + torch.randn(b, t, d, generator=g) for c in clean]
    logits = 3 * torch.randn(b, classes, generator=g)
    labels = torch.randint(0, classes, (b,), generator=g)
    return clean, adv, logits, labels


@settings(max_examples=50, deadline=None)
@given(shape=feature_shapes, seed=st.integers(0, 10_000), adaptive=st.booleans())
def test_lafa_equals_the_formula_computed_sample_by_sample(shape, seed, adaptive):
    """LAFA = 1/(|L||B|) Σ_l Σ_i w_i · mean_{t,d} (z_clean − z_adv)², w_i = p_i / (mean p + ε), computed in loops."""
    clean, adv, logits, labels = random_lafa_inputs(shape, seed)
    n_layers, b, t, d = shape
    p = [math.exp(logits[i, labels[i]].item()) / sum(math.exp(v) for v in logits[i].tolist()) for i in range(b)]
    w = [pi / (sum(p) / b + 1e-8) if adaptive else 1.0 for pi in p]
    total = 0.0
    for layer in range(n_layers):
        for i in range(b):
            sq = sum((clean[layer][i, k, j].item() - adv[layer][i, k, j].item()) ** 2
                     for k in range(t) for j in range(d))
            total += w[i] * sq / (t * d)
    expected = total / (n_layers * b)
    got = am.lafa_loss(clean, adv, logits, labels, adaptive=adaptive)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@settings(max_examples=50, deadline=None)
@given(shape=feature_shapes, seed=st.integers(0, 10_000), adaptive=st.booleans())
def test_lafa_is_nonnegative_and_zero_when_features_match(shape, seed, adaptive):
    """LAFA ≥ 0, and exactly 0 when adversarial features equal the clean ones."""
    clean, adv, logits, labels = random_lafa_inputs(shape, seed)
    assert am.lafa_loss(clean, adv, logits, labels, adaptive=adaptive) >= 0
    assert am.lafa_loss(clean, [c.clone() for c in clean], logits, labels, adaptive=adaptive) == 0


@settings(max_examples=50, deadline=None)
@given(shape=feature_shapes, seed=st.integers(0, 10_000), offset=st.sampled_from([0.25, 0.5, 1.0, 3.0]))
def test_lafa_adaptive_weights_average_one(shape, seed, offset):
    """When every sample is equally far from its clean features, adaptive LAFA equals plain LAFA: the weights mean 1."""
    _, _, logits, labels = random_lafa_inputs(shape, seed)
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randint(-64, 64, shape[1:], generator=g) / 8 for _ in range(shape[0])]  # exact in float32
    adv = [c + offset for c in clean]
    plain = am.lafa_loss(clean, adv, logits, labels, adaptive=False)
    assert plain.item() == offset ** 2
    # weights are p_i / (mean p + 1e-8): they average 1 to within 1e-8 / mean p, tiny for confidences ≥ 1e-3
    logits = logits / 3
    assert am.lafa_loss(clean, adv, logits, labels, adaptive=True).item() == pytest.approx(plain.item(), rel=1e-5)


def test_lafa_sends_no_gradient_into_clean_features_or_weights():
    """Clean features and the confidence weights are targets: gradient reaches the adversarial features only."""
    clean, adv, logits, labels = random_lafa_inputs((2, 3, 4, 5), 0)
    for t in clean + adv + [logits]:
        t.requires_grad_(True)
    am.lafa_loss(clean, adv, logits, labels).backward()
    assert all(c.grad is None for c in clean) and logits.grad is None
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in adv)


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_cw_loss_is_the_best_other_logit_minus_the_true_one(b, c, seed):
    """cw_loss = mean over the batch of max_{j≠y} z_j − z_y, checked against a loop over classes."""
    g = torch.Generator().manual_seed(seed)
    logits, labels = 5 * torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g)
    margins = [max(logits[i, j].item() for j in range(c) if j != labels[i]) - logits[i, labels[i]].item()
               for i in range(b)]
    assert am.cw_loss(logits, labels).item() == pytest.approx(sum(margins) / b, rel=1e-5, abs=1e-5)


@settings(max_examples=50, deadline=None)
@given(b=st.integers(1, 6), c=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_kl_and_js_equal_their_definitions(b, c, seed):
    """kl_loss = KL(p_clean ‖ p_adv) and js_loss = ½KL(p‖m) + ½KL(q‖m), summed by hand; JS is symmetric, 0 at p = q."""
    g = torch.Generator().manual_seed(seed)
    clean, adv = 3 * torch.randn(b, c, generator=g), 3 * torch.randn(b, c, generator=g)
    p, q = clean.softmax(-1).double(), adv.softmax(-1).double()

    def kl(a, b_):
        return (a * (a / b_).log()).sum(-1).mean().item()

    m = (p + q) / 2
    assert am.kl_loss(clean, adv).item() == pytest.approx(kl(p, q), rel=1e-4, abs=1e-6)
    assert am.js_loss(clean, adv).item() == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-4, abs=1e-6)
    assert am.js_loss(adv, clean).item() == pytest.approx(am.js_loss(clean, adv).item(), rel=1e-5, abs=1e-7)
    assert am.js_loss(clean, clean).item() == pytest.approx(0, abs=1e-6)


def test_mask_loss_rows_of_the_ablation():
    """Each --loss adds the right regulariser: none, JS, KL, plain LAFA, adaptive LAFA; unknown names are refused."""
    clean_feats, adv_feats, logits, labels = random_lafa_inputs((2, 3, 4, 5), 1)
    adv_logits = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    expected = {"ce": 0.0, "ce+js": am.js_loss(logits, adv_logits), "ce+kl": am.kl_loss(logits, adv_logits),
                "ce+lafa_plain": am.lafa_loss(clean_feats, adv_feats, logits, labels, adaptive=False),
                "ce+lafa": am.lafa_loss(clean_feats, adv_feats, logits, labels, adaptive=True)}
    assert set(expected) == set(am.LOSSES)
    for kind, reg in expected.items():
        ce, got = am.mask_loss(kind, clean_feats, adv_feats, logits, adv_logits, labels)
        assert ce == F.cross_entropy(adv_logits, labels) and got == reg
    with pytest.raises(ValueError, match="unknown loss"):
        am.mask_loss("ce+trades", clean_feats, adv_feats, logits, adv_logits, labels)


# ---------------------------------------------------------------------------------------------------------------------
# The K-shot sampler

@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(1, 20), min_size=1, max_size=8), data=st.data())
def test_k_shot_sampler_takes_exactly_k_per_class_deterministically(counts, data):
    """Exactly K distinct images of every class, the same indices for the same seed."""
    shots = data.draw(st.integers(1, min(counts)))
    seed = data.draw(st.integers(0, 2**31))
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    labels = [labels[i] for i in data.draw(st.permutations(range(len(labels))))]
    idx = am.sample_k_shot(labels, shots, seed)
    assert len(set(idx)) == len(idx) == shots * len(counts)
    assert all(sum(labels[i] == c for i in idx) == shots for c in range(len(counts)))
    assert idx == am.sample_k_shot(labels, shots, seed)


@settings(max_examples=100, deadline=None)
@given(values=st.sets(st.integers(0, 10**6), min_size=1, max_size=6), data=st.data())
def test_k_shot_sampler_takes_k_of_every_label_present_whatever_the_values(values, data):
    """Without class names: exactly K of each label present (gaps and large values too), no repeats, one draw per
    seed, and another seed draws otherwise."""
    counts = {v: data.draw(st.integers(2, 12)) for v in sorted(values)}
    labels = [v for v, n in counts.items() for _ in range(n)]
    labels = [labels[i] for i in data.draw(st.permutations(range(len(labels))))]
    shots = data.draw(st.integers(1, min(counts.values()) - 1))
    seed = data.draw(st.integers(0, 2**31))
    idx = am.sample_k_shot(labels, shots, seed)
    assert len(set(idx)) == len(idx) == shots * len(counts)
    assert all(sum(labels[i] == v for i in idx) == shots for v in counts)
    assert idx == am.sample_k_shot(labels, shots, seed)
    # some seed among the next few draws another set (each has at least two choices per class)
    assert any(am.sample_k_shot(labels, shots, seed + k) != idx for k in range(1, 20))


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 10), min_size=2, max_size=6), data=st.data())
def test_k_shot_sampler_names_a_class_that_is_too_small(counts, data):
    """Asking for more shots than a class has is a ValueError naming that class and its count."""
    small = data.draw(st.integers(0, len(counts) - 1))
    shots = counts[small] + 1
    counts = [max(n, shots) if c != small else n for c, n in enumerate(counts)]
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    names = [f"breed {c}" for c in range(len(counts))]
    with pytest.raises(ValueError, match=f"class 'breed {small}' has {counts[small]} training images"):
        am.sample_k_shot(labels, shots, 0, names)


# ---------------------------------------------------------------------------------------------------------------------
# Training

def synthetic_training_set(n_classes, shots, seed=0):
    g = torch.Generator().manual_seed(seed)
    images_u8 = torch.randint(0, 256, (n_classes * shots, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    return images_u8, torch.arange(n_classes).repeat_interleave(shots)


def test_training_changes_only_the_scores():
    """After several training steps every pre-trained parameter and buffer is bitwise unchanged; scores moved."""
    model = tiny_classifier(n_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".scores")}
    scores = am.apply_masks(model)
    x, y = synthetic_training_set(4, 4)
    am.train(model, scores, x, y, epochs=3, batch_size=8, lr=1e-2, log_every=100)
    after = {k.replace("parametrizations.", "").replace(".original", ""): v for k, v in model.state_dict().items()
             if not k.endswith(".scores")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not torch.all(s == am.MASK_INIT) for s in scores)
    assert all(p.grad is None or p.requires_grad for p in model.parameters())


def test_tune_weights_trains_only_the_targeted_weights_and_their_file_round_trips(tmp_path):
    """--tune weights through the same train(): the targeted attention weights change, every other parameter (text
    tower included) stays bit for bit, no mask is put on the model; the weights file holds exactly the tuned tensors,
    loads onto a fresh model, and refuses a truncated file and another architecture."""
    model = tiny_classifier(4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    weights = am.tune_weights(model, "mhsa")
    x, y = synthetic_training_set(4, 2)
    am.train(model, weights, x, y, epochs=3, batch_size=4, lr=1e-3)
    tuned = {f"clip.visual.{name}" for name, _ in am.target_weights(model, "mhsa")}
    assert len(tuned) == 4 and next(am._masks(model), None) is None
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != (name in tuned), name
    am.save_weights(model, tmp_path / "weights.bin", "mhsa")
    fresh = tiny_classifier(4)
    am.load_weights(fresh, tmp_path / "weights.bin")
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
    assert (tmp_path / "weights.bin").stat().st_size == pytest.approx(4 * sum(w.numel() for w in weights), rel=0.02)
    data = (tmp_path / "weights.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    with pytest.raises(ValueError, match="truncated"):
        am.load_weights(tiny_classifier(4), tmp_path / "cut.bin")
    other = open_clip.CLIP(**{**am.TINY_CLIP, "vision_cfg": {**am.TINY_CLIP["vision_cfg"], "width": 32}})
    with pytest.raises(ValueError, match=r"was made for VisionTransformer\(layers=2, width=64"):
        am.load_weights(other, tmp_path / "weights.bin")
    masked = tiny_clip()
    am.apply_masks(masked)
    am.save_masks(masked, tmp_path / "masks.bin")
    with pytest.raises(ValueError, match="is an advmask mask file, not a weights file; evaluate it with --masks"):
        am.load_weights(tiny_classifier(4), tmp_path / "masks.bin")
    with pytest.raises(ValueError, match="is an advmask weights file, not a mask file; evaluate it with --weights"):
        am.load_masks(tiny_classifier(4), tmp_path / "weights.bin")


@pytest.mark.parametrize("shots", [1, 16])
def test_default_budget_turns_weights_off_at_every_shot_count(shots):
    """With the default lr and epochs the mask leaves all-ones (else it is zero-shot CLIP), at 1 and at 16 shots (on
    16-pixel images, a third of the tokens: the budget is under test, not the image size)."""
    torch.manual_seed(0)
    config = {**am.TINY_CLIP, "vision_cfg": {**am.TINY_CLIP["vision_cfg"], "image_size": 16}}
    model = am.ClipClassifier(open_clip.CLIP(**config), [f"thing {c}" for c in range(4)], ["a photo of a {}."])
    scores = am.apply_masks(model)
    x = torch.randint(0, 256, (4 * shots, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4).repeat_interleave(shots)
    epochs = am.default_epochs(len(y), am.BATCH_SIZE)
    assert epochs * am.steps_per_epoch(len(y), am.BATCH_SIZE) >= am.TRAIN_BUDGET_STEPS
    history = am.train(model, scores, x, y, epochs, log_every=10**6)
    assert history[-1]["off"] > 0
    assert am.mask_sparsity(model) == history[-1]["off"]


@pytest.mark.parametrize("n, batch_size, per_epoch, size", [(37, 8, 4, 8), (16, 8, 2, 8), (5, 8, 1, 5)])
def test_training_batches_are_full_as_in_dassl(n, batch_size, per_epoch, size):
    """Every training batch is full (the incomplete last one is dropped) unless the set is smaller than one batch."""
    model = tiny_classifier(n_classes=1)
    scores = am.apply_masks(model)
    sizes = []
    model.register_forward_hook(lambda m, i, o: sizes.append(len(i[0])))
    am.train(model, scores, *synthetic_training_set(1, n), epochs=3, batch_size=batch_size, steps=1, log_every=100)
    assert sizes == [size] * 3 * per_epoch * 3  # 3 epochs; 3 passes a step with 1 PGD step: attack, clean, adversarial


@MODEL_SETTINGS
@given(lam=st.sampled_from([0.0, 1.0, 50.0]), steps=st.integers(0, 3), loss=st.sampled_from(am.LOSSES),
       seed=st.integers(0, 10_000))
def test_a_training_step_descends_the_objective_computed_by_hand(lam, steps, loss, seed):
    """train_step moves the scores by the gradient of L_CE(f(x̃), y) + λ · regulariser, computed here from the
    pieces: x̃ = PGD with the given steps from the generator's start, the regulariser on the clean pass's features and
    logits (as targets) and the adversarial pass's."""
    model = tiny_classifier(3)
    scores = am.apply_masks(model)
    randomize_scores(model, seed)
    by_hand = copy.deepcopy(model)
    x, y = images(4, seed), torch.tensor([0, 1, 2, 1])
    am.train_step(model, torch.optim.SGD(scores, lr=0.0), x, y, lam, 2 / 255, 1 / 255, steps, loss,
                  torch.Generator().manual_seed(seed))
    x_adv = am.pgd_attack(by_hand, x, y, 2 / 255, 1 / 255, steps, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        clean_logits, clean_feats = by_hand(x, return_features=True)
    adv_logits, adv_feats = by_hand(x_adv, return_features=True)
    regulariser = {"ce": lambda: 0.0, "ce+js": lambda: am.js_loss(clean_logits, adv_logits),
                   "ce+kl": lambda: am.kl_loss(clean_logits, adv_logits),
                   "ce+lafa_plain": lambda: am.lafa_loss(clean_feats, adv_feats, clean_logits, y, adaptive=False),
                   "ce+lafa": lambda: am.lafa_loss(clean_feats, adv_feats, clean_logits, y)}[loss]()
    hand_scores = [mask.scores for *_, mask in am._masks(by_hand)]
    grads = torch.autograd.grad(F.cross_entropy(adv_logits, y) + lam * regulariser, hand_scores)
    for score, grad in zip(scores, grads):  # the gradient the step took, left in .grad
        torch.testing.assert_close(score.grad, grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item())


def record_training(monkeypatch, n_classes, shots, epochs, batch_size, lr=1e-3):
    """Train a tiny masked classifier with train_step replaced by a recorder: (images seen per step, learning rate
    per step, the uint8 training images)."""
    seen, rates = [], []

    def recorder(model, optimizer, x, y, *args, **kwargs):
        seen.append(x.clone())
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # nothing to step (no gradients), but the schedule expects a step before it
        return torch.zeros(()), torch.zeros(()), torch.zeros(len(y), n_classes)

    monkeypatch.setattr(am, "train_step", recorder)
    model = tiny_classifier(n_classes)
    x_u8, y = synthetic_training_set(n_classes, shots)
    am.train(model, am.apply_masks(model), x_u8, y, epochs, batch_size=batch_size, lr=lr, log_every=10**6)
    return seen, rates, x_u8


def test_training_flips_half_the_images_horizontally_and_shuffles_every_epoch(monkeypatch):
    """Each image a step sees is its training image or that image's horizontal mirror, about half of them mirrored;
    every epoch draws its own batch order."""
    seen, _, x_u8 = record_training(monkeypatch, n_classes=4, shots=8, epochs=10, batch_size=8)
    originals, mirrors = am.to_unit(x_u8), am.to_unit(x_u8).flip(-1)
    flipped, orders = 0, []
    for x in seen:
        for image in x:
            plain = (originals == image).flatten(1).all(1).nonzero().flatten().tolist()
            mirrored = (mirrors == image).flatten(1).all(1).nonzero().flatten().tolist()
            assert len(plain + mirrored) == 1, "neither a training image nor its horizontal mirror"
            flipped += bool(mirrored)
            orders.append((plain + mirrored)[0])
    assert 0.35 < flipped / len(orders) < 0.65  # 320 fair coins: 0.5 ± 0.15 is 5 standard deviations
    epochs = [orders[i:i + 32] for i in range(0, len(orders), 32)]
    assert all(sorted(e) == list(range(32)) for e in epochs) and len({tuple(e) for e in epochs}) == len(epochs)


def test_the_learning_rate_follows_a_cosine_from_lr_to_zero_over_all_steps(monkeypatch):
    """Step t of T trains at lr · (1 + cos(π t / T)) / 2: the schedule spans every step of every epoch."""
    _, rates, _ = record_training(monkeypatch, n_classes=2, shots=8, epochs=3, batch_size=4, lr=1e-3)
    total = 3 * 4
    assert rates == pytest.approx([1e-3 * (1 + math.cos(math.pi * t / total)) / 2 for t in range(total)], rel=1e-9)


@pytest.mark.parametrize("loss, word, tune", [("ce+lafa", "lafa", "mask"), ("ce+kl", "kl", "mask"),
                                              ("ce", "reg", "mask"), ("ce+lafa", "lafa", "weights")])
def test_each_logged_row_is_one_greppable_line_naming_its_regulariser(loss, word, tune, capsys):
    """Every logged row is printed as one line, "step s/S | ce … | <regulariser> … | adv-acc … | off …% | … img/s",
    the regulariser named by the loss (lafa, kl; "reg" for none), the share off only for a mask, its numbers the
    row's."""
    model = tiny_classifier()
    x, y = synthetic_training_set(3, 2)
    params = (am.apply_masks if tune == "mask" else am.tune_weights)(model)
    log = am.train(model, params, x, y, epochs=2, batch_size=3, lr=0.05, loss=loss, log_every=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    off = r" \| off ([\d.]+)%" if tune == "mask" else "()"
    pattern = rf"step (\d+)/4 \| ce ([\d.]+) \| {word} ([\d.]+) \| adv-acc ([\d.]+){off} \| \d+ img/s"
    assert len(lines) == len(log) == 4
    for line, row in zip(lines, log):
        step, ce, reg, adv_acc, share_off = re.fullmatch(pattern, line).groups()
        assert int(step) == row["step"] and float(adv_acc) == pytest.approx(row["adv_acc"], abs=0.005)
        assert float(ce) == pytest.approx(row["ce"], abs=5e-4) and float(reg) == pytest.approx(row["reg"], abs=5e-5)
        if tune == "mask":
            assert float(share_off) == pytest.approx(100 * row["off"], abs=0.005)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), batch_size=st.integers(1, 64), budget=st.integers(1, 2000))
def test_default_epochs_is_the_fewest_that_reach_the_budget(n, batch_size, budget):
    """default_epochs gives the fewest epochs (at least one) whose full batches reach the step budget."""
    epochs, per_epoch = am.default_epochs(n, batch_size, budget), am.steps_per_epoch(n, batch_size)
    assert epochs * per_epoch >= budget and (epochs == 1 or (epochs - 1) * per_epoch < budget)


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    """When the loss turns NaN in epoch 3, training stops with FloatingPointError; the checkpoint of epoch 2 stays."""
    model = tiny_classifier(n_classes=4)
    scores = am.apply_masks(model)
    calls = []

    def poison(module, inputs, out):  # 4 forward passes a step (2 PGD, clean, adversarial): NaN logits from step 3 on
        calls.append(1)
        if len(calls) <= 8:
            return out
        return (out[0] * float("nan"), out[1]) if isinstance(out, tuple) else out * float("nan")

    model.register_forward_hook(poison)
    x, y = synthetic_training_set(4, 2)
    with pytest.raises(FloatingPointError, match="NaN or infinite by step 3.*checkpoint of step 2"):
        am.train(model, scores, x, y, epochs=5, batch_size=8, checkpoint=am.training_checkpoint(tmp_path / "ckpt.pt"),
                 checkpoint_every=1)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(s).all() for s in state["params"])


def test_a_damaged_or_foreign_checkpoint_is_refused_in_one_sentence_never_resumed(tmp_path, capsys):
    """A checkpoint with one bit flipped in any tensor's bytes (which torch.load reads without complaint: it checks no
    CRC), one cut short, one of other tensors' shapes, one saved by another trainer (other code, another advmask.py or
    torch, or other settings: the mask would be two trainings') or by one that recorded none (an earlier layout), or
    whose trainer is not a JSON object (a hand-made file) is refused with a sentence that says to delete it; the intact
    one resumes under the trainer that saved it."""
    x, y = synthetic_training_set(4, 2)
    path = tmp_path / "ckpt.pt"
    ours = {"code": {"advmask_sha256": "ab" * 32, "torch": torch.__version__}, "lr": 0.1}

    def train(target, epochs, trainer=ours):
        model = tiny_classifier(n_classes=4)
        am.train(model, am.apply_masks(model, target), x, y, epochs=epochs, batch_size=8,
                 checkpoint=am.training_checkpoint(path, trainer))

    train("mlp", 1)
    other_shapes = path.read_bytes()
    path.unlink()
    train("mhsa", 1, {**ours, "code": {**ours["code"], "advmask_sha256": "cd" * 32}})
    other_code = path.read_bytes()
    path.unlink()
    train("mhsa", 1, {**ours, "lr": 0.2})
    other_lr = path.read_bytes()
    path.unlink()
    train("mhsa", 1)
    data = path.read_bytes()
    earlier = torch.load(path, weights_only=True)
    forged = []  # intact archives whose trainer is not a JSON object: a hand-made file's, not run's
    for trainer in (5, "[1]", "{"):
        buffer = io.BytesIO()
        torch.save({**earlier, "trainer": trainer}, buffer)
        forged.append((buffer.getvalue(), r"is damaged or unreadable \((TypeError|JSONDecodeError)"))
    earlier["code"] = earlier.pop("trainer")  # as the layout that recorded the code alone names it
    buffer = io.BytesIO()
    torch.save(earlier, buffer)
    with zipfile.ZipFile(path) as archive:
        tensors = [info for info in archive.infolist() if "/data/" in info.filename]
    damaged = []
    for info in tensors:  # a tensor's bytes follow its local header: 30 bytes, its name, its (alignment) extra field
        at = info.header_offset
        name_length, extra_length = (int.from_bytes(data[i:i + 2], "little") for i in (at + 26, at + 28))
        start = at + 30 + name_length + extra_length
        flipped = bytearray(data)
        flipped[start + info.file_size // 2] ^= 1
        damaged.append((bytes(flipped), rf"BadZipFile: {info.filename} fails its CRC"))
    assert len(damaged) > 10  # the scores, Adam's moments, the generators' states, the log row's sums
    for blob, message in [*((blob, rf"is damaged or unreadable \({detail}") for blob, detail in damaged),
                          (data[:-10], r"is damaged or unreadable \(BadZipFile"), *forged,
                          (other_shapes, "holds tensors of other shapes"),
                          (other_code, "was saved with another code than this run's"),
                          (other_lr, "was saved with another lr than this run's"),
                          (buffer.getvalue(), "was saved by an older advmask.py")]:
        path.write_bytes(blob)
        with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(path))} {message}.*; delete it"):
            train("mhsa", 2)
    path.write_bytes(data)
    capsys.readouterr()
    train("mhsa", 2)
    assert f"resuming from {path}, saved after epoch 1" in capsys.readouterr().out


def test_training_reads_the_finiteness_flag_only_at_log_lines_and_saves(tmp_path, monkeypatch):
    """The host reads the device's finiteness flag (a wait for the GPU) at each log line and before each save, never at
    an epoch end that has neither: 2 steps an epoch, a log line every 3 steps, a checkpoint after 4."""
    checked = []
    check = am._check_finite
    monkeypatch.setattr(am, "_check_finite", lambda finite, step, saved_at: checked.append(step) or check(
        finite, step, saved_at))
    model = tiny_classifier(n_classes=4)
    am.train(model, am.apply_masks(model), *synthetic_training_set(4, 2), epochs=5, batch_size=4, log_every=3,
             checkpoint=am.training_checkpoint(tmp_path / "ckpt.pt"), checkpoint_every=4)
    assert checked == [3, 4, 6, 8, 9, 10, 10]  # logs at 3, 6, 9, 10 (the last); saves at the ends of epochs 2, 4, 5


def test_training_runs_the_frozen_network_in_eval_mode(tmp_path, monkeypatch):
    """Inside train every pass runs in eval mode: on a tiny timm ViT with drop-path, two passes over a step's images
    give LAFA(x, x) = 0 at every step, where in train mode the drop-path draws make them differ."""
    clip, tokenizer, _ = tiny_family_model("ViT-B-16-SigLIP", tmp_path, monkeypatch, drop_path_rate=0.5)
    classifier = am.ClipClassifier(clip, ["cat", "dog"], ["a photo of a {}."], tokenizer)
    x_u8, y = synthetic_training_set(2, 4)
    real_step, lafa = am.train_step, []

    def step(model, optimizer, x, y, *args, **kwargs):
        with torch.no_grad():
            (logits, clean), (_, again) = (model(x, return_features=True) for _ in range(2))
        lafa.append(am.lafa_loss(clean, again, logits, y).item())
        return real_step(model, optimizer, x, y, *args, **kwargs)

    monkeypatch.setattr(am, "train_step", step)
    am.train(classifier, am.apply_masks(classifier), x_u8, y, epochs=2, batch_size=4, log_every=10**6)
    assert lafa == [0.0] * 4
    torch.manual_seed(0)
    with torch.no_grad():  # the same check in train mode, which train used to set
        (logits, clean), (_, again) = (classifier.train()(am.to_unit(x_u8), return_features=True) for _ in range(2))
    assert am.lafa_loss(clean, again, logits, y) > 1e-6


def test_bf16_training_sees_fp32_text_features_and_each_steps_own_weights(tmp_path, monkeypatch):
    """Under --precision bf16 the training classifier's text features are the fp32 ones of a classifier built outside
    autocast (the evaluation's), and every step's forward sees the weights the previous step left (--tune weights):
    autocast's cache of trainable weights' casts is off, so no cast outlives its pass (in torch 2.7, the casts of this
    test's no-grad pass would reach the step's loss without a path to the weights, and its backward fail)."""
    monkeypatch.chdir(tmp_path)
    real_step, checks = am.train_step, []

    def step(model, optimizer, x, y, *args, **kwargs):
        with torch.no_grad():
            with torch.autocast("cpu", enabled=False):
                reference = am.ClipClassifier(model.clip, [f"class {c}" for c in range(4)],
                                              [am.DATASETS["oxford_pets"].template])
            fresh = copy.deepcopy(model)  # new leaf tensors, cast afresh
            checks.append((torch.equal(model.text_features, reference.text_features),
                           torch.equal(model(x), fresh(x)), torch.is_autocast_cache_enabled()))
        return real_step(model, optimizer, x, y, *args, **kwargs)

    monkeypatch.setattr(am, "train_step", step)
    am.main(["--dry-run", "--tune", "weights", "--precision", "bf16", "--epochs", "2", "--out-dir", "bf16"])
    assert checks == [(True, True, False)] * 4


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation

def test_evaluate_counts_like_a_direct_computation():
    """With ε = 0 the robust accuracy equals the clean one, and both equal a direct count of correct argmaxes."""
    model = tiny_classifier(n_classes=3)
    x_u8, y = synthetic_training_set(3, 5, seed=4)
    with torch.no_grad():
        correct = model(x_u8.float() / 255).argmax(1) == y
    attacks = {"none": partial(am.pgd_attack, eps=0.0, steps=3),
               "pgd": partial(am.pgd_attack, eps=16 / 255, alpha=4 / 255, steps=5)}
    result = am.evaluate(model, x_u8, y, attacks, batch_size=4)
    assert result["n"] == 15 and result["zero_grad_share"] == 0.0
    assert torch.equal(result["correct"], correct) and result["clean_acc"] == correct.sum().item() / 15
    assert torch.equal(result["attacks"]["none"]["correct"], correct)
    assert result["attacks"]["pgd"]["adv_acc"] <= result["clean_acc"]


def test_an_evaluation_cell_does_not_depend_on_the_cells_beside_it():
    """An attack's per-image results are the same alone, after other attacks (or the same attack at another ε), in
    another order, and in a second call: each attack draws its random starts from a generator of its own."""
    model = am.bake_masks(tiny_classifier(n_classes=3).requires_grad_(False))
    x_u8, y = synthetic_training_set(3, 6, seed=2)
    pgd = am.make_attack("pgd", 8 / 255, 2 / 255, 2)
    alone = am.evaluate(model, x_u8, y, {"pgd": pgd}, batch_size=8)["attacks"]["pgd"]["correct"]
    crowded = {"cw": am.make_attack("cw", 8 / 255, 2 / 255, 2), "pgd-4": am.make_attack("pgd", 4 / 255, 1 / 255, 2),
               "pgd": pgd}
    for attacks in (crowded, dict(reversed(crowded.items()))):
        assert torch.equal(am.evaluate(model, x_u8, y, attacks, batch_size=8)["attacks"]["pgd"]["correct"], alone)
    other_seed = am.evaluate(model, x_u8, y, {"pgd": pgd}, batch_size=8, seed=1)["attacks"]["pgd"]["correct"]
    assert torch.equal(am.evaluate(model, x_u8, y, {"pgd": pgd}, batch_size=8)["attacks"]["pgd"]["correct"], alone)
    assert other_seed.shape == alone.shape  # (another seed may or may not flip an image; it must run)


@given(seed=st.integers(0, 10_000), n_attacks=st.integers(1, 4))
@settings(max_examples=20, deadline=None)
def test_every_attack_draws_from_a_generator_of_its_own_seeded_with_the_seed(seed, n_attacks):
    """Each attack's generator, in every batch, continues the stream of a generator seeded with `seed` alone,
    however many attacks draw beside it."""
    draws = {}

    def attack(name, model, x, y, generator):
        draws.setdefault(name, []).append(torch.rand(3, generator=generator))
        return x

    am.evaluate(tiny_classifier(), *synthetic_training_set(3, 2), {f"a{i}": partial(attack, f"a{i}")
                                                                   for i in range(n_attacks)}, batch_size=4, seed=seed)
    expected = torch.rand(2 * 3, generator=torch.Generator().manual_seed(seed)).view(2, 3)  # 2 batches of 4, 2
    for name in draws:
        assert torch.equal(torch.stack(draws[name]), expected)


@settings(max_examples=100, deadline=None)
@given(patterns=st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=1, max_size=5))
def test_worst_case_is_the_per_image_and_over_attacks(patterns):
    """The worst case counts the images no attack broke (an AND per image), so it is never above any attack's."""
    correct = [torch.tensor(p) for p in patterns]
    robust = [all(p[i] for p in patterns) for i in range(7)]
    assert am.worst_case_accuracy(correct) == sum(robust) / 7
    assert all(am.worst_case_accuracy(correct) <= c.float().mean().item() for c in correct)


class OffGridOracle(torch.nn.Module):
    """Right only on images off the 1/255 grid, i.e. only after an attack has moved them; flat in its input."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        off = ((x * 255 - (x * 255).round()).abs().flatten(1).amax(1) > 1e-3).float()  # (B,)
        return torch.stack([1 - off, off], dim=1) + self.bias


class PartlyFlat(torch.nn.Module):
    """Logits ±(mean of the red channel), except on images whose first pixel is 0, where they are 0: an exactly zero
    input gradient; the other images' gradient is zero on the green and blue channels alone."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))  # evaluate finds the device through a parameter

    def forward(self, x):
        keep = (x[:, 0, 0, 0] != 0).float()  # (B,)
        m = self.scale * x[:, 0].mean(dim=(1, 2)) * keep
        return torch.stack([m, -m], dim=1)


@pytest.mark.parametrize("flat, warned", [(2, True), (1, False)])
def test_evaluate_counts_the_zero_gradient_share_and_warns_above_5_percent(flat, warned, capsys):
    """zero_grad_share is the share of images whose loss has an all-zero input gradient; over 5 % of them warns:
    2 of 20 (10 %) does, 1 of 40 (2.5 %) does not."""
    n = 20 if warned else 40
    x_u8 = torch.full((n, 3, SIZE, SIZE), 128, dtype=torch.uint8)
    x_u8[:flat, :, 0, 0] = 0
    result = am.evaluate(PartlyFlat(), x_u8, torch.zeros(n, dtype=torch.long), {}, batch_size=8)
    assert result["zero_grad_share"] == flat / n
    assert ("input gradient is exactly zero" in capsys.readouterr().err) == warned


def test_evaluate_warns_about_a_broken_attack(capsys):
    """Robust accuracy above clean accuracy, and all-zero input gradients, are reported on stderr."""
    x_u8, _ = synthetic_training_set(2, 4)
    result = am.evaluate(OffGridOracle(), x_u8, torch.ones(8, dtype=torch.long),
                         {"pgd": partial(am.pgd_attack, eps=1 / 255, alpha=1 / 255, steps=2)}, batch_size=4)
    assert (result["clean_acc"], result["attacks"]["pgd"]["adv_acc"], result["zero_grad_share"]) == (0.0, 1.0, 1.0)
    err = capsys.readouterr().err
    assert "accuracy under pgd 100.00% exceeds clean accuracy 0.00%" in err
    assert "input gradient is exactly zero for 100.0% of the images" in err


@pytest.mark.parametrize("moved, warned", [(1, True), (0, False)])
def test_evaluate_warns_when_an_attack_beats_clean_accuracy_by_a_single_image(moved, warned, capsys):
    """An attack whose accuracy exceeds clean accuracy by one image of 40 is reported; one that equals it is not."""
    def nudge(model, x, y, generator):  # the first `moved` images off the 1/255 grid, where OffGridOracle is right
        x = x.clone()
        x[:moved] += 0.4 / 255
        return x
    x_u8 = torch.full((40, 3, SIZE, SIZE), 128, dtype=torch.uint8)
    result = am.evaluate(OffGridOracle(), x_u8, torch.ones(40, dtype=torch.long), {"nudge": nudge}, batch_size=40)
    assert (result["clean_acc"], result["attacks"]["nudge"]["adv_acc"]) == (0.0, moved / 40)
    assert ("exceeds clean accuracy" in capsys.readouterr().err) == warned


# ---------------------------------------------------------------------------------------------------------------------
# AdvMask in one call

def test_adversarial_mask_tuning_in_a_few_lines_without_files():
    """The glue function tunes a mask from CLIP, uint8 images and class names alone, equal to the pieces it joins
    (ClipClassifier, apply_masks, train) called by hand with the same arguments."""
    x, y = synthetic_training_set(3, 4)
    classifier, log = am.adversarial_mask_tuning(tiny_clip(), x, y, ["cat", "dog", "fox"], epochs=6, batch_size=4,
                                                 lr=1e-2, log_every=3)
    assert 0 < am.mask_sparsity(classifier) < 1 and log[-1]["step"] == 18
    by_hand = am.ClipClassifier(tiny_clip(), ["cat", "dog", "fox"], ["a photo of a {}."])
    am.train(by_hand, am.apply_masks(by_hand), x, y, 6, batch_size=4, lr=1e-2, log_every=3)
    for (_, _, s, _), (_, _, s2, _) in zip(masked_weights(classifier), masked_weights(by_hand)):
        assert torch.equal(s, s2)


def test_adversarial_mask_tuning_refuses_an_unknown_tune_and_gives_weights_their_learning_rate(monkeypatch):
    """tune is "mask" or "weights", anything else a sentence; each trains at its own default learning rate (LR,
    WEIGHTS_LR) unless given one."""
    x, y = synthetic_training_set(2, 2)
    with pytest.raises(ValueError, match="unknown tune 'scores'; use 'mask' .* or 'weights'"):
        am.adversarial_mask_tuning(tiny_clip(), x, y, ["cat", "dog"], tune="scores")
    monkeypatch.setattr(am, "train", lambda *args, **kwargs: kwargs["lr"])
    lr = {tune: am.adversarial_mask_tuning(tiny_clip(), x, y, ["cat", "dog"], tune=tune)[1]
          for tune in ("mask", "weights")}
    assert lr == {"mask": am.LR, "weights": am.WEIGHTS_LR}
    assert am.adversarial_mask_tuning(tiny_clip(), x, y, ["cat", "dog"], tune="weights", lr=3e-3)[1] == 3e-3


def test_the_methods_lines_alone_run_the_readme_example(capsys):
    """advmask.py's text above the tooling marker, which imports only the standard library, torch, open_clip and
    tqdm, runs as it is in a fresh namespace: mask tuning (and weights tuning), baking and the README's evaluate with
    PGD-100, with both sanity warnings forced; its mask equals the module's."""
    text = (HERE / "advmask.py").read_text()
    method = text[:text.index("\n# =====")]
    imports = [node for node in ast.parse(method).body if isinstance(node, (ast.Import, ast.ImportFrom))]
    imported = {(a.name if isinstance(node, ast.Import) else node.module).split(".")[0]
                for node in imports for a in node.names}
    assert imported == {"collections", "contextlib", "math", "sys", "time", "functools", "open_clip", "torch", "tqdm"}
    alone = {"__name__": "advmask_method"}
    exec(compile(method, "advmask_method", "exec"), alone)
    x, y = synthetic_training_set(3, 4)
    names, train_args = ["cat", "dog", "fox"], {"epochs": 3, "batch_size": 4, "lr": 1e-2}
    classifier, log = alone["adversarial_mask_tuning"](tiny_clip(), x, y, names, **train_args)
    reference, _ = am.adversarial_mask_tuning(tiny_clip(), x, y, names, **train_args)
    for (_, _, s, _), (_, _, s2, _) in zip(masked_weights(classifier), masked_weights(reference)):
        assert torch.equal(s, s2)
    result = alone["evaluate"](alone["bake_masks"](classifier), x, y, {"pgd": alone["pgd_attack"]})
    assert result["n"] == 12 and result["attacks"]["pgd"]["adv_acc"] <= result["clean_acc"]
    alone["default_epochs"].__defaults__ = (6,)  # the default budget's path (math.ceil), 6 steps instead of 500
    _, log = alone["adversarial_mask_tuning"](tiny_clip(), x, y, names, tune="weights", log_every=1)
    assert log[-1]["step"] == 6
    capsys.readouterr()
    alone["evaluate"](OffGridOracle(), x, torch.ones(12, dtype=torch.long),
                      {"pgd": partial(alone["pgd_attack"], steps=2)}, batch_size=4)
    err = capsys.readouterr().err
    assert "exceeds clean accuracy" in err and "input gradient is exactly zero" in err


def test_no_parameter_or_local_shadows_a_name_of_the_module():
    """No parameter or assigned name inside a function (its lambdas and comprehensions too) is named as a top-level
    definition, constant or import of advmask.py: a reader who meets `train` or `signal` in a body meets the
    module's."""
    tree = ast.parse((HERE / "advmask.py").read_text())
    top = {alias.asname or alias.name.split(".")[0] for node in tree.body if isinstance(node, (ast.Import,
                                                                                              ast.ImportFrom))
           for alias in node.names}
    top |= {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    top |= {n.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
            for n in ast.walk(target) if isinstance(n, ast.Name)}  # LAM; TRAIN_EPS, TRAIN_ALPHA, TRAIN_STEPS
    shadowed = sorted({(f.name, n.arg if isinstance(n, ast.arg) else n.id)
                       for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
                       if isinstance(n, ast.arg) and n.arg in top or
                       isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and n.id in top})
    assert len(top) > 150 and shadowed == []


def test_calls_of_more_than_four_arguments_name_them():
    """No call in advmask.py passes more than four arguments by position (partial's included): a reader sees which
    value is which."""
    tree = ast.parse((HERE / "advmask.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert len(calls) > 1000 and [ast.unparse(c)[:60] for c in calls if len(c.args) > 4] == []


# ---------------------------------------------------------------------------------------------------------------------
# Attack adapters

def test_evaluate_runs_every_attack_make_attack_builds_and_refuses_float_images():
    """evaluate plus make_attack, without the CLI: every attack runs in the one calling convention, none beats clean
    accuracy, PGD and CW start at a uniform point of the ε-ball; evaluate and train refuse float images (they take
    uint8 and scale them), naming the dtype."""
    model = tiny_classifier(5)
    x = (images(6) * 255).round().to(torch.uint8)
    y = torch.arange(6) % 5
    attacks = {name: am.make_attack(name, 8 / 255, 2 / 255, 2) for name in am.ATTACKS}
    result = am.evaluate(model, x, y, attacks, seed=0)
    assert set(result["attacks"]) == set(am.ATTACKS)
    assert all(r["adv_acc"] <= result["clean_acc"] for r in result["attacks"].values())
    for name in ("pgd", "cw"):  # from a uniform start in the ε-ball, drawn from the generator, as FAP's PGD starts
        x_unit, g = am.to_unit(x), torch.Generator().manual_seed(0)
        start = am.make_attack(name, 8 / 255, 2 / 255, steps=0)(model, x_unit, y, generator=g)
        noise = torch.empty_like(x_unit).uniform_(-8 / 255, 8 / 255, generator=torch.Generator().manual_seed(0))
        assert torch.equal(start, (x_unit + noise).clamp(0, 1))
    with pytest.raises(ValueError, match="uint8 images in 0..255.* not torch.float32"):
        am.evaluate(model, am.to_unit(x), y, attacks)
    scores = am.apply_masks(model)
    with pytest.raises(ValueError, match="uint8 images in 0..255.* not torch.float64"):
        am.train(model, scores, x.double() / 255, y, epochs=1)


@pytest.mark.parametrize("name", ["apgd-ce", "apgd-dlr", "apgd-t", "aa", "aa-tga-zsr"])
@pytest.mark.parametrize("training", [True, False])
def test_apgd_attacks_stay_in_the_ball_and_leave_no_trace(name, training):
    """APGD-CE, APGD-DLR, APGD-T and both AutoAttacks' images lie within ε in l∞ and in [0, 1]; no .grad, mode,
    scores and torch's global generator unchanged (torchattacks seeds it)."""
    model = tiny_classifier(n_classes=5)
    am.apply_masks(model)
    randomize_scores(model, 3)
    model.train(training)
    scores = [s.clone() for s in (mask.scores for *_, mask in am._masks(model))]
    x, y = images(6, seed=1), torch.tensor([0, 1, 2, 3, 4, 0])
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # pixels on the box edges
    eps, rng = 4 / 255, torch.random.get_rng_state()
    x_adv = am.make_attack(name, eps, eps, 3)(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training == training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, mask.scores) for a, (*_, mask) in zip(scores, am._masks(model)))


def test_autoattack_is_never_above_its_apgd_ce_stage(monkeypatch):
    """On the same images and seed, AutoAttack's accuracy is at most APGD-CE's: its second stage, APGD-T, attacks from
    the clean images exactly those that APGD-CE left correctly classified, so it only removes images."""
    model = am.bake_masks(tiny_classifier(n_classes=6).requires_grad_(False))
    x_u8, y = synthetic_training_set(6, 4, seed=9)
    # at ε = 2/255 APGD-CE leaves correct some images that clean CLIP gets right, which the second stage attacks
    attacks = {name: am.make_attack(name, 2 / 255, 2 / 255, 5) for name in ("apgd-ce", "aa")}
    result = am.evaluate(model, x_u8, y, attacks, batch_size=8)["attacks"]
    assert not (result["aa"]["correct"] & ~result["apgd-ce"]["correct"]).any()
    assert result["aa"]["adv_acc"] <= result["apgd-ce"]["adv_acc"] < 1
    batches, apgd = [], am.apgd_attack  # per batch, each stage's (loss, images, labels, adversarial images)

    def recorded(model, images, labels, loss, **kwargs):
        x_adv = apgd(model, images, labels, loss=loss, **kwargs)
        if loss == "ce":  # a batch's first stage
            batches.append([])
        batches[-1].append((loss, images, labels, x_adv.clone()))
        return x_adv
    monkeypatch.setattr(am, "apgd_attack", recorded)
    am.evaluate(model, x_u8, y, {"aa": attacks["aa"]}, batch_size=8)
    assert len(batches) == 3 and any(len(stages) == 2 for stages in batches)  # the second stage ran
    for (_, x, labels, x_adv), *second in batches:
        with torch.no_grad():
            left = model(x_adv).argmax(1) == labels  # (B,): what APGD-CE did not break
        assert [(loss, torch.equal(x_left, x[left]), torch.equal(y_left, labels[left]))
                for loss, x_left, y_left, _ in second] == ([("dlr-targeted", True, True)] if left.any() else [])


def test_apgd_t_targets_the_top_9_other_classes_as_autoattack_does(monkeypatch):
    """APGD-T attacks towards each of the top min(9, C − 1) other classes in turn (AutoAttack's n_target_classes = 9),
    however many classes the model has."""
    import torchattacks
    targets = []

    class Recorded(torchattacks.APGDT):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            targets.append(self.n_target_classes)
    monkeypatch.setattr(torchattacks, "APGDT", Recorded)
    for n_classes in (12, 5):
        am.apgd_attack(tiny_classifier(n_classes=n_classes), images(2), torch.tensor([0, 1]), steps=1,
                       loss="dlr-targeted")
    assert targets == [9, 4]


def test_apgd_t_refuses_fewer_than_four_classes_and_apgd_dlr_fewer_than_three():
    """The targeted DLR loss needs the 4th-largest logit, the untargeted one the 3rd: fewer classes are a ValueError
    that says what to use."""
    with pytest.raises(ValueError, match="dlr-targeted loss needs at least 4 classes, not 3; use APGD-CE or PGD"):
        am.apgd_attack(tiny_classifier(n_classes=3), images(2), torch.tensor([0, 1]), loss="dlr-targeted")
    with pytest.raises(ValueError, match="dlr loss needs at least 3 classes, not 2; use APGD-CE or PGD"):
        am.apgd_attack(tiny_classifier(n_classes=2), images(2), torch.tensor([0, 1]), loss="dlr")


def test_tga_zsrs_autoattack_adds_apgd_dlr_and_on_two_classes_is_apgd_ce_alone():
    """aa-tga-zsr (APGD-CE, then untargeted APGD-DLR on what survived) keeps no image its APGD-CE stage broke, and on
    a 2-class set (PCAM), where DLR is undefined, it is exactly APGD-CE, as TGA-ZSR runs it there, also where APGD-CE
    leaves images correctly classified."""
    for n_classes in (6, 2):
        model = am.bake_masks(tiny_classifier(n_classes=n_classes).requires_grad_(False))
        x_u8, y = synthetic_training_set(n_classes, 4, seed=9)
        names = ("apgd-ce", "aa-tga-zsr") + (("apgd-dlr",) if n_classes > 2 else ())
        result = am.evaluate(model, x_u8, y, {name: am.make_attack(name, 8 / 255, 8 / 255, 5) for name in names},
                             batch_size=8)["attacks"]
        assert not (result["aa-tga-zsr"]["correct"] & ~result["apgd-ce"]["correct"]).any()
        if n_classes == 2:
            assert torch.equal(result["aa-tga-zsr"]["correct"], result["apgd-ce"]["correct"])
    # a 2-class set whose images APGD-CE leaves correct still gets no DLR stage (PartlyFlat's margin: 2 × red mean)
    x, y = am.to_unit(synthetic_training_set(2, 4)[0]), torch.zeros(8, dtype=torch.long)
    ce = am.apgd_attack(PartlyFlat(), x, y, 2 / 255, steps=2, generator=torch.Generator().manual_seed(0))
    assert (PartlyFlat()(ce).argmax(1) == y).all()
    assert torch.equal(am.autoattack(PartlyFlat(), x, y, 2 / 255, steps=2, second="dlr",
                                     generator=torch.Generator().manual_seed(0)), ce)


# ---------------------------------------------------------------------------------------------------------------------
# Models

def activations(clip):
    """The class names of every GELU-like module of both towers."""
    return {type(m).__name__ for m in clip.modules() if isinstance(m, (torch.nn.GELU, open_clip.transformer.QuickGELU))}


def test_a_tag_builds_the_network_its_weights_were_trained_as_and_a_file_the_one_named(tmp_path, monkeypatch):
    """Offline, with open_clip's download replaced by a local file: ViT-B-32 with the openai tag gets QuickGELU in
    both towers, as the tag's config says (open_clip's ViT-B-32 config says GELU), and the tag's preprocessing; the
    same file as --pretrained keeps the named config's GELU and records the file's sha256. Both names' configs are
    the tiny CLIP's here (the tag's own config, which decides, is open_clip's): the same logic at a fraction of the
    time."""
    for name, quick_gelu in (("ViT-B-32", False), ("ViT-B-32-quickgelu", True)):
        monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, name, {**am.TINY_CLIP, "quick_gelu": quick_gelu})
    torch.manual_seed(0)
    source = open_clip.create_model("ViT-B-32-quickgelu")  # random weights
    path = tmp_path / "ViT-B-32.pt"
    torch.save({k: v.half() for k, v in source.state_dict().items()}, path)  # half the bytes of fp32
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: str(path))
    tagged, _, identity = am.load_clip("ViT-B-32", "openai")
    assert activations(tagged) == {"QuickGELU"} and identity["activation"] == "QuickGELU"
    assert torch.equal(tagged.visual.conv1.weight, source.visual.conv1.weight.half().float())
    tag_cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert [identity["preprocess"][k] for k in ("mean", "std", "interpolation", "resize_mode")] == [
        list(tag_cfg["mean"]), list(tag_cfg["std"]), tag_cfg["interpolation"], tag_cfg["resize_mode"]]
    assert "file_sha256" not in identity and identity["weights_sha256"] == am.weights_fingerprint(tagged)
    filed, _, file_identity = am.load_clip("ViT-B-32", str(path))
    assert activations(filed) == {"GELU"} and file_identity["activation"] == "GELU"
    assert file_identity["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # the same tensors in two networks: their fingerprints differ, as their outputs do
    assert file_identity["weights_sha256"] != identity["weights_sha256"]


def model_folder(path, clip, quick_gelu=False, **preprocess):
    """An open_clip model folder (hub layout) of a TINY_CLIP model: open_clip_config.json and safetensors weights."""
    path.mkdir(parents=True)
    config = {"model_cfg": {**am.TINY_CLIP, "quick_gelu": quick_gelu}, "preprocess_cfg": preprocess}
    (path / "open_clip_config.json").write_text(json.dumps(config))
    safetensors.torch.save_file(clip.state_dict(), path / "open_clip_model.safetensors")
    return f"local-dir:{path}"


def jpeg_image(seed, size=(30, 40)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def test_a_model_folder_brings_its_preprocessing_to_the_classifier_the_images_and_the_record(tiny_files, tmp_path,
                                                                                          monkeypatch):
    """A local-dir: folder with its own mean, std, resize mode and interpolation (its weights as safetensors or as a
    torch file): the classifier's logits equal the same weights normalised by hand with that mean and std, images are
    resized as open_clip's transform for that config does (checked against torchvision by hand), and a run records it
    all, also for a folder as --baseline."""
    pre = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear", "resize_mode": "squash"}
    name = model_folder(tmp_path / "folder", tiny_clip(7), **pre)
    clip, tokenizer, identity = am.load_clip(name, None)
    assert {k: identity["preprocess"][k] for k in pre} == pre
    pickled = tmp_path / "pickled"  # the weights as a torch file, as older hub folders have them
    shutil.copytree(tmp_path / "folder", pickled)
    weights = pickled / "open_clip_model.safetensors"
    torch.save(safetensors.torch.load_file(weights), pickled / "open_clip_pytorch_model.bin")
    weights.unlink()
    assert am.load_clip(f"local-dir:{pickled}", None)[2]["weights_sha256"] == identity["weights_sha256"]
    names, templates, x = ["cat", "dog"], ["a photo of a {}."], images(3)
    by_hand = tiny_clip(7)
    with torch.no_grad():
        text = F.normalize(by_hand.encode_text(open_clip.tokenize([templates[0].format(n) for n in names])), dim=-1)
        image = F.normalize(by_hand.encode_image(T.Normalize(pre["mean"], pre["std"])(x)), dim=-1)
        torch.testing.assert_close(am.ClipClassifier(clip, names, templates, tokenizer)(x),
                                   by_hand.logit_scale.exp() * image @ text.T, rtol=1e-5, atol=1e-5)
    picture = jpeg_image(0)
    squash = T.Resize((SIZE, SIZE), interpolation=T.InterpolationMode.BILINEAR)
    assert torch.equal(am.image_transform(identity["preprocess"])(picture), T.PILToTensor()(squash(picture)))
    shortest = T.Compose([T.Resize(SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(SIZE)])
    assert torch.equal(am.image_transform(PRE)(picture), T.PILToTensor()(shortest(picture)))  # open_clip's default
    baseline = model_folder(tmp_path / "robust", tiny_clip(3), **{**pre, "mean": [0.1, 0.2, 0.3]})
    monkeypatch.chdir(tmp_path)
    data_args = tiny_cli_args(tiny_files)[4:]  # without its --model and --pretrained
    am.main(["--model", name, *data_args, "--baseline", baseline, "--epochs", "1", "--shots", "1", "--out-dir", "out"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["model_identity"] == identity
    assert results["settings"]["baseline_identity"]["preprocess"]["mean"] == [0.1, 0.2, 0.3]
    assert {e["model"] for e in results["results"]} == {"advmask", baseline}
    header, _ = am.read_mask_file(tmp_path / "out" / "masks.bin")
    assert header["base_weights"] == {"fingerprint": identity["weights_sha256"], "source": am.describe(identity)}
    # other weights in the baseline's folder (a hub model updated, say): its cells are evaluated anew, the mask's kept
    safetensors.torch.save_file(tiny_clip(4).state_dict(), tmp_path / "robust" / "open_clip_model.safetensors")
    am.main(["--model", name, *data_args, "--baseline", baseline, "--epochs", "1", "--shots", "1", "--out-dir", "out"])
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    theirs = again["settings"]["baseline_identity"]["weights_sha256"]
    assert theirs != results["settings"]["baseline_identity"]["weights_sha256"]
    assert [(e["model"], e.get("weights_sha256")) for e in again["results"]] == [("advmask", None), (baseline, theirs)]
    assert again["results"][0] == results["results"][[e["model"] for e in results["results"]].index("advmask")]


@MODEL_SETTINGS
@given(seed=st.integers(0, 10_000), data=st.data())
def test_the_fingerprint_changes_with_any_tensor_and_not_with_a_mask(seed, data):
    """One element of any parameter or buffer of either tower, the activation or the normalisation changes the
    fingerprint; a mask on the weights (whatever its scores) does not, and an excluded weight is not read."""
    clip = tiny_clip(7)
    reference = am.weights_fingerprint(clip)
    names = sorted(clip.state_dict())
    name = data.draw(st.sampled_from(names))
    changed = tiny_clip(7)
    with torch.no_grad():
        tensor = changed.state_dict(keep_vars=True)[name]
        tensor.view(-1)[data.draw(st.integers(0, tensor.numel() - 1))] += 1
    assert am.weights_fingerprint(changed) != reference
    if name.startswith("visual."):  # exclude names a weight of the image tower
        excluded = [name[len("visual."):]]
        assert am.weights_fingerprint(changed, excluded) == am.weights_fingerprint(clip, excluded)
    masked = tiny_clip(7)
    am.apply_masks(masked, data.draw(st.sampled_from(list(am.MASK_TARGETS))))
    randomize_scores(masked, seed)
    assert am.weights_fingerprint(masked) == reference
    quick = open_clip.CLIP(**am.TINY_CLIP, quick_gelu=True)
    quick.load_state_dict(clip.state_dict())
    assert am.weights_fingerprint(quick) != reference
    clip.visual.image_mean = (0.5, 0.5, 0.5)
    assert am.weights_fingerprint(clip) != reference


def test_fp16_network_is_open_clips_fp16_build_and_openais_conversion(tmp_path):
    """fp16_network gives every parameter the dtype open_clip's precision="fp16" build gives it (conv, linear,
    attention weights and projections fp16; LayerNorms, embeddings and the logit scale fp32), its LayerNorms
    LayerNormFp32, and with the same weights the same image features as that build fed fp16 images."""
    path = tmp_path / "tiny-fp16.json"
    path.write_text(json.dumps(am.TINY_CLIP))
    open_clip.add_model_config(path)
    theirs = open_clip.create_model("tiny-fp16", precision="fp16", device="cpu").eval()
    ours = am.fp16_network(tiny_clip())
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in theirs.named_parameters()}
    assert {torch.float16, torch.float32} == {p.dtype for p in ours.parameters()}
    norms = [type(m).__name__ for m in ours.modules() if isinstance(m, nn.LayerNorm)]
    assert norms == [type(m).__name__ for m in theirs.modules() if isinstance(m, nn.LayerNorm)]
    assert set(norms) == {"LayerNormFp32"}
    theirs.load_state_dict(ours.state_dict())
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(x), theirs.encode_image(x.half()), rtol=0, atol=0)


def test_an_fp16_network_gives_the_logits_of_faps_code_bit_for_bit():
    """Through fp16_network the logits are FAP's (CoOp's zero-shot CLIP in fp16): image and text features normalised
    once in fp16, logit_scale.exp() · f̂ @ T̂ᵀ in fp16, for a single template (40 classes: renormalising the text
    features would move some of them by an fp16 step)."""
    clip, names = am.fp16_network(tiny_clip()), [f"class {c}" for c in range(40)]
    x = images(6)
    with torch.no_grad():
        text = clip.encode_text(open_clip.tokenize([f"a photo of a {name}." for name in names]))
        text = text / text.norm(dim=-1, keepdim=True)
        image = clip.encode_image(T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)(x).half())
        image = image / image.norm(dim=-1, keepdim=True)
        faps = clip.logit_scale.exp() * image @ text.t()
        ours = am.ClipClassifier(clip, names, ["a photo of a {}."])(x)
    assert faps.dtype == ours.dtype == torch.float16 and torch.equal(ours, faps)


def test_an_input_gradient_too_small_for_fp16_gives_sign_zero_there_and_not_in_fp32():
    """Through the fp16 network an input gradient below fp16's smallest step underflows to 0, so PGD leaves those
    pixels where they were, while the fp32 network moves every pixel: the gradient is taken in fp16, unscaled."""
    clip = tiny_clip()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1e-5))  # a tiny loss scale: the input gradient falls below 2^-24
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    fp32 = am.ClipClassifier(clip, ["cat", "dog", "axolotl"], ["a photo of a {}."])
    fp16 = am.ClipClassifier(am.fp16_network(copy.deepcopy(clip)), ["cat", "dog", "axolotl"], ["a photo of a {}."])
    x_in = x.clone().requires_grad_(True)
    (grad32,) = torch.autograd.grad(F.cross_entropy(fp32(x_in), y), x_in)
    assert 0 < grad32.abs().max() < 2**-24 and (grad32 != 0).all()
    moved = {name: am.pgd_attack(model, x, y, steps=1, random_start=False) != x
             for name, model in (("fp32", fp32), ("fp16", fp16))}
    assert moved["fp32"][x < 254 / 255].all() and not moved["fp16"].any()


# The families of image tower AdvMask masks, each as a named open_clip config shrunk to a tiny random model (timm
# towers through timm.create_model's own size arguments): the blocks' path, the attention and MLP weights of a block
# and the prefix tokens per block, written out from each tower's source.
FAMILY_MODELS = {
    "ViT-B-16": ("transformer.resblocks", ["attn.in_proj_weight", "attn.out_proj.weight"],
                 ["mlp.c_fc.weight", "mlp.c_proj.weight"], 1),
    "coca_ViT-B-32": ("transformer.resblocks", ["attn.in_proj_weight", "attn.out_proj.weight"],
                      ["mlp.c_fc.weight", "mlp.c_proj.weight"], 1),
    "ViT-B-16-SigLIP": ("trunk.blocks", ["attn.qkv.weight", "attn.proj.weight"], ["mlp.fc1.weight", "mlp.fc2.weight"],
                        0),
    "ViT-B-16-SigLIP2": ("trunk.blocks", ["attn.qkv.weight", "attn.proj.weight"],
                         ["mlp.fc1.weight", "mlp.fc2.weight"], 0),
    "EVA02-B-16": ("trunk.blocks", ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                                    "attn.proj.weight"], ["mlp.fc1_g.weight", "mlp.fc1_x.weight", "mlp.fc2.weight"], 1),
    "PE-Core-B-16": ("trunk.blocks", ["attn.qkv.weight", "attn.proj.weight"], ["mlp.fc1.weight", "mlp.fc2.weight"],
                     1),
}
TIMM_SIZES = {"convnext_tiny": {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64)}}  # else a ViT's
CREATE_TIMM_MODEL = open_clip.timm_model.timm.create_model


def tiny_family_config(name, folder, monkeypatch, **timm_kwargs):
    """A config JSON of open_clip's model `name`, shrunk: 2 blocks of width 64, 2 heads, 8-pixel patches, the tiny
    input size (a timm tower's through timm.create_model, patched), a 1-layer text tower with open_clip's own
    tokenizer (a file name without "siglip", which would choose SigLIP's)."""
    cfg = open_clip.get_model_config(name)
    vision = {**cfg["vision_cfg"], "image_size": SIZE}
    if "timm_model_name" in vision:
        sizes = TIMM_SIZES.get(vision["timm_model_name"],
                               {"depth": 2, "embed_dim": 64, "num_heads": 2, "img_size": SIZE, "patch_size": 8})
        monkeypatch.setattr(open_clip.timm_model.timm, "create_model",
                            lambda model, **kw: CREATE_TIMM_MODEL(model, **kw, **sizes, **timm_kwargs))
    else:
        vision.update(layers=2, width=64, patch_size=8, head_width=32)
    text = {k: v for k, v in cfg["text_cfg"].items() if k not in ("hf_tokenizer_name", "tokenizer_kwargs")}
    text.update(width=32, heads=2, layers=1, vocab_size=49408)
    tiny = {**cfg, "embed_dim": 64, "vision_cfg": vision, "text_cfg": text}
    if "multimodal_cfg" in cfg:
        tiny["multimodal_cfg"] = {**cfg["multimodal_cfg"], "width": 32, "heads": 2, "layers": 1}
    path = Path(folder) / f"tiny-{name.lower().replace('siglip', 'sl')}.json"
    path.write_text(json.dumps(tiny))
    return path


def tiny_family_model(name, folder, monkeypatch, **timm_kwargs):
    """(clip in eval mode, tokenizer, identity) of tiny_family_config's model, built through load_clip."""
    path = tiny_family_config(name, folder, monkeypatch, **timm_kwargs)
    torch.manual_seed(0)
    clip, tokenizer, identity = am.load_clip(str(path), "none")
    return clip.eval(), tokenizer, identity


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_family_masks_its_blocks_alone_and_trains_and_saves_as_the_vit_does(name, tmp_path, monkeypatch):
    """For each family (a tiny random tower of it): masks go on exactly its blocks' attention and MLP weights; an
    all-on mask gives the unmasked logits, which are open_clip's own (SigLIP's logit_bias included); the
    straight-through gradient reaches every score; LAFA gets one (B, tokens, width) feature per block, with the class
    token where the family has one; a mask file round-trips and analyze splits it into q, k, v, out and the MLP's
    layers, per head too."""
    path, attention, mlp, prefix = FAMILY_MODELS[name]
    clip, tokenizer, identity = tiny_family_model(name, tmp_path, monkeypatch)
    fresh = copy.deepcopy(clip)
    names, x, y = ["cat", "dog", "axolotl"], images(2), torch.tensor([0, 2])
    clf = am.ClipClassifier(clip, names, ["a photo of a {}."], tokenizer)
    with torch.no_grad():
        plain = clf(x)
        theirs = clip.get_logits((x - clf.mean) / clf.std, tokenizer([f"a photo of a {n}." for n in names]).to(
            x.device))[0] if hasattr(clip, "get_logits") else plain
    torch.testing.assert_close(plain, theirs)
    assert (getattr(clip, "logit_bias", None) is not None) == ("SigLIP" in name)
    scores = am.apply_masks(clf, "all")
    assert [n for n, *_ in am._masks(clf)] == [f"{path}.{i}.{w}" for i in range(2) for w in attention + mlp]
    with torch.no_grad():
        torch.testing.assert_close(clf(x), plain)  # torch's attention may take another kernel for masked weights
    logits, feats = clf(x, return_features=True)
    torch.testing.assert_close(logits, plain)
    assert [tuple(f.shape) for f in feats] == [(2, (SIZE // 8) ** 2 + prefix, 64)] * 2
    (F.cross_entropy(logits, y) + am.lafa_loss([f.detach() for f in feats], feats, logits.detach(), y)).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    randomize_scores(clf, seed=1)
    am.save_masks(clf, tmp_path / "masks.bin", am.describe(identity))
    header, bits = am.read_mask_file(tmp_path / "masks.bin")
    loaded = am.load_masks(am.ClipClassifier(fresh, names, ["a photo of a {}."], tokenizer), tmp_path / "masks.bin")
    assert torch.equal(torch.cat([(m.scores > m.threshold).flatten() for *_, m in am._masks(loaded)]), bits)
    with torch.no_grad():
        assert torch.equal(loaded(x), clf(x))
    cells = am.mask_breakdown(header, bits)
    mlp_parts = {"ViT-B-16": ["fc", "proj"], "coca_ViT-B-32": ["fc", "proj"], "EVA02-B-16": ["fc1_g", "fc1_x", "fc2"]}
    assert [p for b, p, h in cells if b == 1 and h is None] == ["q", "k", "v", "out",
                                                                *mlp_parts.get(name, ["fc1", "fc2"])]
    assert header["heads"] == 2 and sum(cells[1, "q", h][1] for h in (0, 1)) == cells[1, "q", None][1] == 64 * 64
    assert sum(n for (_, _, h), (_, n) in cells.items() if h is None) == len(bits)


def test_a_tower_without_known_blocks_is_refused_and_a_target_a_family_lacks_too(tmp_path, monkeypatch, capsys):
    """A ConvNeXt tower (no transformer blocks) ends the CLI in one line naming the families that work, before
    anything is written; a timm ViT whose MLP is a SwiGLU (EVA02's) takes masks on its attention and on its MLP, but
    refuses --mask-target all, which no one family's names cover there; a missing tokenizer package is one line."""
    config = tiny_family_config("convnext_tiny", tmp_path, monkeypatch)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_:
        am.main(["--model", str(config), "--pretrained", "none"])
    warning, err = capsys.readouterr().err.split("\n", 1)  # --pretrained none's random weights, said first
    assert warning.startswith("WARNING: --pretrained none")
    assert_one_line_exit_2_no_files(exit_.value.code, err, cwd, "the ConvNeXt image tower has no transformer blocks "
                                    "with the mhsa weights of a family AdvMask knows (open_clip ViT, timm ViT, timm "
                                    "EVA02); use a model of one of them\n")
    import timm.layers
    clip = tiny_family_model("ViT-B-16-SigLIP", tmp_path, monkeypatch, mlp_layer=timm.layers.SwiGLU)[0]
    assert len(am.apply_masks(copy.deepcopy(clip), "mhsa")) == 4  # timm ViT's attention
    assert len(am.apply_masks(copy.deepcopy(clip), "mlp")) == 6  # EVA02's SwiGLU MLP
    with pytest.raises(ValueError, match=r"VisionTransformer .*no transformer blocks with the all weights.*"
                                         r"open_clip ViT, timm ViT, timm EVA02.*--mask-target mhsa"):
        am.apply_masks(clip, "all")

    def hf_tokenizer(name):  # open_clip's HFTokenizer (SigLIP's) where transformers is not installed
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
    monkeypatch.setattr(open_clip, "get_tokenizer", hf_tokenizer)
    with pytest.raises(ValueError, match=r"tiny-vit-b-16-sl .*transformers package.*pip install transformers"):
        am.load_clip(str(tmp_path / "tiny-vit-b-16-sl.json"), "none")


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "EVA02-B-16"])
def test_a_timm_family_runs_through_the_cli_and_analyze(name, tmp_path, monkeypatch, capsys):
    """A tiny SigLIP and a tiny EVA02 tower run the CLI end to end (training, mask file, baseline, evaluation), and
    analyze breaks their mask down per part and head; fp16 evaluation, FAP's conversion of OpenAI's ViT, is refused
    in one line before anything is trained or written."""
    config = tiny_family_config(name, tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(config), "--pretrained", "none", "--synthetic", "--dataset", "dtd", "--shots", "1",
            "--epochs", "1", "--test-steps", "1", "--eval-limit", "8", "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:  # after the line that its weights are random
        am.main([*args, "--eval-precision", "fp16", "--out-dir", "fp16"])
    assert exit_.value.code == 2 and not (tmp_path / "fp16").exists()
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith("advmask: error: --eval-precision fp16 converts OpenAI's ViT") and config.stem in line
    am.main([*args, "--out-dir", "out", "--baseline"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["complete"] and {r["model"] for r in results["results"]} == {"clip", "advmask"}
    header = am.read_mask_file(tmp_path / "out" / "masks.bin")[0]
    path, attention, _, _ = FAMILY_MODELS[name]
    assert header["names"] == [f"{path}.{i}.{w}" for i in range(2) for w in attention]
    assert header["arch"].startswith("timm ") and header["heads"] == 2
    md = am.analyze([tmp_path / "out"], tmp_path / "analysis")
    assert "| block | q | k | v | out |" in md and (tmp_path / "analysis" / "heads_0.png").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Mask and weight files

@MODEL_SETTINGS
@given(seed=st.integers(0, 10_000), target=st.sampled_from(["mhsa", "mlp", "all"]))
def test_mask_file_round_trip_is_bit_exact_and_one_bit_per_weight(tmp_path_factory, seed, target):
    """save/load reproduces every bit, onto a bare or an unmasked model, in a file of about n/8 bytes; the loaded
    scores sit at threshold ± 1, a margin from which training can go on."""
    path = tmp_path_factory.mktemp("m") / "masks.bin"
    model = tiny_classifier()
    am.apply_masks(model, target)
    randomize_scores(model, seed)
    am.save_masks(model, path)
    n = sum(s.numel() for _, _, s, _ in masked_weights(model))
    assert n / 8 <= path.stat().st_size <= n / 8 + 4096
    fresh = tiny_clip()  # bare open_clip model, no masks yet
    am.load_masks(fresh, path)
    for (_, ours, s, t), (_, theirs, s2, t2) in zip(masked_weights(model), masked_weights(fresh)):
        assert torch.equal(s > t, s2 > t2) and torch.equal(ours, theirs)
        assert torch.equal(s2, torch.where(s > t, t2 + 1.0, t2 - 1.0))


def test_vit_b32_mhsa_mask_file_is_about_3_5_mb(tmp_path):
    """A ViT-B/32 attention mask (28.3 M weights) packs into 3.54 MB, not 113 MB of float scores."""
    model = open_clip.create_model("ViT-B-32")  # random weights: only the shapes matter
    scores = am.apply_masks(model, "mhsa")
    am.save_masks(model, tmp_path / "b32.bin")
    n = sum(s.numel() for s in scores)
    assert n == 12 * (3 * 768 * 768 + 768 * 768)
    assert n / 8 <= (tmp_path / "b32.bin").stat().st_size <= n / 8 * 1.01


def test_mask_file_refuses_models_it_does_not_fit(tmp_path):
    """Loading onto another architecture or target, or from a truncated or altered file, fails with a clear error."""
    model = tiny_clip()
    am.apply_masks(model, "mhsa")
    path = tmp_path / "masks.bin"
    am.save_masks(model, path)
    other = open_clip.CLIP(**{**am.TINY_CLIP, "vision_cfg": {**am.TINY_CLIP["vision_cfg"], "width": 32}})
    with pytest.raises(ValueError, match=r"was made for VisionTransformer\(layers=2, width=64"):
        am.load_masks(other, path)
    mlp_masked = tiny_clip()
    am.apply_masks(mlp_masked, "mlp")
    with pytest.raises(ValueError, match="holds mhsa weights, which are not the ones this model has masked"):
        am.load_masks(mlp_masked, path)
    data = path.read_bytes()
    safetensors.torch.save_file({"bits": torch.zeros(3, dtype=torch.uint8)}, tmp_path / "plain.bin")
    for name, broken, message in [("cut.bin", data[:-1], "truncated"),
                                  ("headless.bin", data[:20], "truncated"),
                                  ("flipped.bin", data[:-1] + bytes([data[-1] ^ 1]), "fails its checksum"),
                                  ("other.bin", b"PK\x03\x04" + data[4:], "not a whole advmask mask file"),
                                  ("plain.bin", (tmp_path / "plain.bin").read_bytes(), "not an advmask mask file")]:
        (tmp_path / name).write_bytes(broken)
        with pytest.raises(ValueError, match=message):
            am.load_masks(tiny_clip(), tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        am.load_masks(tiny_clip(), tmp_path / "missing.pt")


def test_a_mask_or_weights_file_is_refused_on_other_weights(tmp_path, capsys):
    """A mask trained on one tiny model's weights is refused on a second of the same architecture, naming both
    sources; a weights file only where a weight it does not replace differs, or the activation."""
    masked = masked_tiny_clip(7)
    randomize_scores(masked, 1)
    am.save_masks(masked, tmp_path / "masks.bin", "tiny seed 7")
    with pytest.raises(ValueError, match=r"masks.bin was trained on other weights \(tiny seed 7, fingerprint \w{12}\) "
                                         r"than this model's \(tiny seed 3, fingerprint \w{12}\); load it onto"):
        am.load_masks(tiny_clip(3), tmp_path / "masks.bin", "tiny seed 3")
    am.load_masks(tiny_clip(7), tmp_path / "masks.bin")
    tuned = tiny_clip(7)
    for _, w in am.target_weights(tuned):
        w.data.normal_()
    am.save_weights(tuned, tmp_path / "weights.bin")
    am.load_weights(tiny_clip(7), tmp_path / "weights.bin")
    other_attention = tiny_clip(7)
    with torch.no_grad():
        for _, w in am.target_weights(other_attention):
            w.mul_(2)  # the weights the file replaces
    am.load_weights(other_attention, tmp_path / "weights.bin")
    pairs = zip(am.target_weights(other_attention), am.target_weights(tuned))
    assert all(torch.equal(a, b) for (_, a), (_, b) in pairs)
    other_norm, quick = tiny_clip(7), open_clip.CLIP(**am.TINY_CLIP, quick_gelu=True)
    quick.load_state_dict(other_norm.state_dict())
    with torch.no_grad():
        other_norm.visual.ln_post.weight.add_(1)
    for model in (other_norm, quick):
        with pytest.raises(ValueError, match="weights.bin was trained on other weights"):
            am.load_weights(model, tmp_path / "weights.bin")
    assert capsys.readouterr().err == ""


def json_places(value, where=()):
    """The path (keys and indices) of every value inside a JSON value."""
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        yield (*where, key)
        yield from json_places(child, (*where, key))


def test_a_header_edited_or_corrupted_fails_the_checksum_as_a_tensor_does(tmp_path):
    """Any value of a mask or weights file's header changed, of another type or deleted (the provenance a transfer
    run files its cells by, the shapes, threshold and heads that loading and analysis read, the checksum itself; by
    hand, or by a flipped byte that still parses) fails the file's checksum in one line, as a changed tensor does, and
    as one renamed or reshaped with its bytes kept."""
    files = {"mask": tmp_path / "masks.bin", "weights": tmp_path / "weights.bin"}
    model = masked_tiny_clip(7)
    am.save_masks(model, files["mask"], "tiny seed 7", provenance={"dataset": "dtd", "shots": 16, "lr": 1e-4})
    am.save_weights(tiny_clip(7), files["weights"], "mhsa", "tiny seed 7", provenance={"dataset": "dtd", "shots": 4})
    headers = {}
    for kind, path in files.items():
        with safetensors.safe_open(path, "pt") as f:
            headers[kind] = json.loads(f.metadata()["advmask"]), {name: f.get_tensor(name) for name in f.keys()}
        am.read_tuned_file(path, kind)  # whole as written

    @settings(max_examples=60, deadline=None)
    @given(st.sampled_from([(kind, *where) for kind, (meta, _) in headers.items() for where in json_places(meta)
                            if where[0] not in ("kind", "format")]),  # those two have refusals of their own
           st.one_of(st.just("delete"), st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                     st.text(max_size=4), st.just([]), st.just({})))
    @example(("mask", "provenance", "shots"), 18)  # a number a transfer run would label its cells with
    @example(("mask", "threshold"), 0.006)
    def check(where, value):
        kind, *where = where
        meta, tensors = copy.deepcopy(headers[kind])
        parent = functools.reduce(lambda v, key: v[key], where[:-1], meta)
        old = parent[where[-1]]
        if value == "delete":
            del parent[where[-1]]
        elif value == old and type(value) is type(old):
            return  # not a change
        else:
            parent[where[-1]] = value
        (tmp_path / "edited.bin").write_bytes(safetensors.torch.save(tensors, {"advmask": json.dumps(meta)}))
        with pytest.raises(ValueError, match=f"edited.bin fails its checksum: its header or its {kind} tensors"):
            am.read_tuned_file(tmp_path / "edited.bin", kind)

    check()
    for kind, (meta, tensors) in headers.items():  # a tensor's bytes kept under another name, or another shape
        name = sorted(tensors)[0]
        for edited in ({("renamed" if k == name else k): v for k, v in tensors.items()},
                       {**tensors, name: tensors[name].reshape(1, -1)}):
            (tmp_path / "edited.bin").write_bytes(safetensors.torch.save(edited, {"advmask": json.dumps(meta)}))
            with pytest.raises(ValueError, match=f"edited.bin fails its checksum: its header or its {kind} tensor"):
                am.read_tuned_file(tmp_path / "edited.bin", kind)


def test_a_mask_file_reads_with_safetensors_alone_and_an_earlier_format_is_refused(tmp_path):
    """A mask file is a safetensors file: safe_open alone gives its header (JSON metadata) and its packed bits,
    which unpack to the mask's; a weights file holds each tuned weight under its name. A file of an earlier format
    (advmask's own container, 1-3; 4, whose checksum left out the header) is refused in one line naming its format."""
    model = masked_tiny_clip(7)
    randomize_scores(model, 2)
    am.save_masks(model, tmp_path / "masks.bin")
    with safetensors.safe_open(tmp_path / "masks.bin", "np") as f:  # the README's recipe, without advmask
        header = json.loads(f.metadata()["advmask"])
        bits = np.unpackbits(f.get_tensor("bits"), count=header["n_weights"]).astype(bool)  # True = on
    assert header["kind"] == "mask" and header["target"] == "mhsa" and header["heads"] == 2
    assert np.array_equal(bits, torch.cat([(s > t).flatten() for _, _, s, t in masked_weights(model)]).numpy())
    tuned = tiny_clip(7)
    am.save_weights(tuned, tmp_path / "weights.bin")
    tensors = safetensors.torch.load_file(tmp_path / "weights.bin")
    assert all(torch.equal(tensors[name], w) for name, w in am.target_weights(tuned))
    for magic, kind, load in ((b"ADVMASK\n", "mask", am.load_masks), (b"ADVTUNE\n", "weights", am.load_weights)):
        blob = zlib.compress(json.dumps({"format": 3, "arch": "VisionTransformer(...)"}).encode())
        (tmp_path / "old.bin").write_bytes(magic + len(blob).to_bytes(4, "little") + blob + b"\x00" * 16)
        with pytest.raises(ValueError, match=rf"old.bin is a {kind} file of format 3 \(advmask's own container\), "
                                             rf"which this version \(format 5\) does not read"):
            load(tiny_clip(7), tmp_path / "old.bin")
        (tmp_path / "old.bin").write_bytes(magic + (40).to_bytes(4, "little") + b"not zlib")  # a cut old file
        with pytest.raises(ValueError, match=rf"old.bin is a {kind} file of format 1-3 \(advmask's own container"):
            load(tiny_clip(7), tmp_path / "old.bin")
        # format 4 as it was written: this layout, with the sha256 of the tensors alone
        with safetensors.safe_open(tmp_path / am.TUNED_FILES[kind], "pt") as f:
            meta, tensors = json.loads(f.metadata()["advmask"]), {name: f.get_tensor(name) for name in f.keys()}
        digest = hashlib.sha256()
        for name in sorted(tensors):
            t = tensors[name]
            digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode() + t.contiguous().numpy().tobytes())
        meta.update(format=4, sha256=digest.hexdigest())
        (tmp_path / "old.bin").write_bytes(safetensors.torch.save(tensors, {"advmask": json.dumps(meta)}))
        with pytest.raises(ValueError, match=rf"old.bin is a {kind} file of format 4 \(safetensors with a checksum of "
                                             rf"its tensors alone\), which this version \(format 5\) does not read"):
            load(tiny_clip(7), tmp_path / "old.bin")


# ---------------------------------------------------------------------------------------------------------------------
# Datasets and splits

def dassl_generate_fewshot_dataset(data_source, num_shots, repeat=True):
    """Dassl's DatasetBase.generate_fewshot_dataset with its split_dataset_by_label, one data source, written out from
    KaiyangZhou/Dassl.pytorch at c61a1b5 (dassl/data/datasets/base_dataset.py); items are (index, label) pairs."""
    tracker = collections.defaultdict(list)
    for item in data_source:
        tracker[item[1]].append(item)
    dataset = []
    for label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            if repeat:
                sampled_items = random.choices(items, k=num_shots)
            else:
                sampled_items = items
        dataset.extend(sampled_items)
    return dataset


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.integers(0, 6), min_size=1, max_size=80), shots=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_the_fap_draw_is_dassls_on_interleaved_labels(labels, shots, seed):
    """dassl_k_shot picks the images Dassl's code picks after its set_random_seed(seed), in its order, for labels in
    any interleaved order (groups in order of first appearance, repeats for a class short of K)."""
    random.seed(seed)  # Dassl's set_random_seed: random.seed, np.random.seed, torch.manual_seed
    expected = [i for i, _ in dassl_generate_fewshot_dataset(list(enumerate(labels)), shots)]
    assert am.dassl_k_shot(labels, shots, seed) == expected


@settings(max_examples=100, deadline=None)
@given(labels=st.lists(st.integers(0, 9), min_size=1, max_size=60))
def test_base_new_split_is_disjoint_covering_and_renumbered(labels):
    """Base = the first ⌈n/2⌉ classes, new = the rest renumbered from 0; together they hold every image once."""
    n = max(labels) + 1
    split = am.Split(list(zip(range(len(labels)), labels)), range(len(labels)), labels)
    base, new, n_base = am.base_new_split(split, n)
    assert n_base == math.ceil(n / 2)
    assert sorted(base.indices + new.indices) == list(range(len(labels)))
    assert all(labels[i] < n_base and y == labels[i] for i, y in zip(base.indices, base.targets))
    assert all(labels[i] >= n_base and y == labels[i] - n_base for i, y in zip(new.indices, new.targets))
    assert all(new[k][1] == new.targets[k] for k in range(len(new)))


@settings(max_examples=50, deadline=None)
@given(counts=st.lists(st.integers(1, 30), min_size=1, max_size=6), seed=st.integers(0, 100))
def test_stratified_split_keeps_30_percent_of_every_class_for_testing(counts, seed):
    """The split is a partition, 30 % (rounded) of each class is test, and it is the same every time."""
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    train, test = am.stratified_split(labels, seed=seed)
    assert sorted(train + test) == list(range(len(labels)))
    assert all(sum(labels[i] == c for i in test) == round(0.3 * n) for c, n in enumerate(counts))
    assert (train, test) == am.stratified_split(labels, seed=seed)


@settings(max_examples=100, deadline=None)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=6), data=st.data())
def test_eval_limit_subset_is_fixed_and_as_balanced_as_the_counts_allow(counts, data):
    """At most `limit` distinct images; a class has fewer than another's count − 1 only when all its images are in;
    the subset is the same whatever torch's global generator holds (no run seed can reach it)."""
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    labels = [labels[i] for i in data.draw(st.permutations(range(len(labels))))]
    limit = data.draw(st.integers(1, len(labels) + 3))
    torch.manual_seed(data.draw(st.integers(0, 100)))
    chosen = am.balanced_subset(labels, limit)
    torch.manual_seed(12345)
    assert am.balanced_subset(labels, limit) == chosen
    assert len(chosen) == min(limit, len(labels)) == len(set(chosen))
    taken = [sum(labels[i] == c for i in chosen) for c in range(len(counts))]
    for a, b in itertools.permutations(range(len(counts)), 2):
        assert taken[a] >= taken[b] - 1 or taken[a] == counts[a]


@pytest.mark.parametrize("limit", [1, 37, 100, 150])
def test_an_eval_limit_below_the_class_count_draws_classes_from_all_over_the_label_range(limit):
    """With fewer images than classes (TinyImageNet's 200 at --eval-limit 100), every class gets at most one image and
    the classes drawn are the first `limit` of one seed-0 order of all classes, not labels 0 … limit − 1; the same
    for every run."""
    labels = [c for c in range(200) for _ in range(50)]
    chosen = am.balanced_subset(labels, limit)
    drawn = [labels[i] for i in chosen]
    assert len(drawn) == len(set(drawn)) == limit
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):  # the per-class image orders are drawn first
        torch.randperm(50, generator=generator)
    assert set(drawn) == set(torch.randperm(200, generator=generator)[:limit].tolist())
    assert limit < 50 or max(drawn) >= limit  # not the lowest labels


def jpeg(path, seed, size=(30, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def fabricate_dtd(root, classes=("banded", "zigzagged", "waffled"), per_split=2):
    """DTD as torchvision reads it: dtd/dtd/images/<class>/<class>_<n>.jpg and dtd/dtd/labels/{train,val,test}1.txt."""
    base = Path(root) / "dtd" / "dtd"
    (base / "labels").mkdir(parents=True)
    for s, split in enumerate(("train", "val", "test")):
        lines = []
        for c in classes:
            for n in range(per_split):
                name = f"{c}_{s}{n:03d}.jpg"
                jpeg(base / "images" / c / name, hash(name) % 1000)
                lines.append(f"{c}/{name}")
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def fabricate_eurosat(root, classes=("AnnualCrop", "SeaLake", "River"), per_class=10):
    """EuroSAT as torchvision reads it: eurosat/2750/<Class>/<Class>_<n>.jpg (no official split)."""
    for c in classes:
        for n in range(per_class):
            jpeg(Path(root) / "eurosat" / "2750" / c / f"{c}_{n}.jpg", n, size=(64, 64))


def fabricate_imagefolder(root, classes=("red_fox", "tabby cat"), per_class=(3, 2)):
    """Any image tree, as --dataset imagefolder reads it: <root>/train/<class>/*.jpg and <root>/test/<class>/*.jpg."""
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            for i in range(n):
                jpeg(Path(root) / split / c / f"{i}.jpg", i)


def test_dtd_eurosat_and_imagefolder_load_through_torchvision(tmp_path):
    """Fabricated trees in the real layouts load with their official or fixed splits and CoOp's class names."""
    fabricate_dtd(tmp_path)
    dtd = am.load_dataset("dtd", tmp_path, PRE, download=False)
    assert dtd["classes"] == ["banded", "waffled", "zigzagged"]
    assert len(dtd["train"]) == 3 * 4 and len(dtd["test"]) == 3 * 2  # train + val, test
    image, label = dtd["train"][0]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE) and label == dtd["train"].targets[0]
    # the file behind each training image (which an error that it does not decode names) is train1.txt's, then
    # val1.txt's, in the class folder of its label
    files = [am._image_file(dtd["train"], i) for i in range(len(dtd["train"]))]
    listed = [(tmp_path / "dtd" / "dtd" / "labels" / f"{s}1.txt").read_text().split() for s in ("train", "val")]
    assert [f"{Path(f).parent.name}/{Path(f).name}" for f in files] == listed[0] + listed[1]
    assert [Path(f).parent.name for f in files] == [dtd["classes"][y] for y in dtd["train"].targets]
    fabricate_eurosat(tmp_path)
    euro = am.load_dataset("eurosat", tmp_path, PRE, download=False)
    assert euro["classes"] == ["Annual Crop Land", "River", "Sea or Lake"]
    assert len(euro["test"]) == 3 * 3 and len(euro["train"]) == 3 * 7
    assert set(euro["train"].indices).isdisjoint(euro["test"].indices)
    fabricate_imagefolder(tmp_path / "imagefolder")
    folder = am.load_dataset("imagefolder", tmp_path, PRE, download=False)
    assert folder["classes"] == ["red fox", "tabby cat"] and folder["test"].targets == [0, 0, 1, 1]
    jpeg(tmp_path / "imagefolder" / "train" / "axolotl" / "0.jpg", 0)  # a class the test split lacks: label 0 there
    with pytest.raises(ValueError, match=r"splits of imagefolder have other classes \(axolotl in one of them only\)"):
        am.load_dataset("imagefolder", tmp_path, PRE, download=False)
    with pytest.raises(ValueError, match="could not be loaded from .*put it there"):
        am.load_dataset("food101", tmp_path, PRE, download=False)


def test_a_failed_download_leaves_nothing_and_says_what_fits(tmp_path, monkeypatch):
    """A download that fails half-way removes the folders it made (the data root included, when it made it), and the
    message suggests --no-download only to whom passed it, and only for a dataset torchvision can fetch."""
    def failing_download(root, split, transform, download):
        (Path(root) / "oxford-iiit-pet" / "images").mkdir(parents=True)
        raise RuntimeError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torchvision.datasets, "OxfordIIITPet", failing_download)
    with pytest.raises(ValueError, match=r"could not be loaded from .*: put it there$"):
        am.load_dataset("oxford_pets", tmp_path / "data", PRE, download=True)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="put it there, or drop --no-download to let torchvision fetch it$"):
        am.load_dataset("dtd", tmp_path / "data", PRE, download=False)
    with pytest.raises(ValueError, match="put it there$"):
        am.load_dataset("ucf101", tmp_path / "data", PRE, download=False)
    for name in ("oxford_pets", "food101", "stl10"):  # torchvision makes some folders even with download=False
        with pytest.raises(ValueError, match="drop --no-download"):
            am.load_dataset(name, tmp_path / "data", PRE, download=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "data"] and list((tmp_path / "data").iterdir()) == []


def test_a_dataset_only_evaluated_needs_only_its_test_split(tmp_path):
    """ImageNet from val/ and torchvision's meta.bin alone (no 140 GB training archive), and TinyImageNet without its
    train/ folder, load for evaluation (with_train=False, as a transfer run loads its targets); training still needs
    them."""
    wnids = ["n01440764", "n01443537"]
    base = tmp_path / "imagenet"
    for w in wnids:
        for n in range(2):
            jpeg(base / "val" / w / f"ILSVRC2012_val_{w}_{n}.JPEG", n)
    torch.save(({w: (w,) for w in wnids}, [w for w in wnids for _ in range(2)]), base / "meta.bin")
    with pytest.raises(ValueError, match="imagenet could not be loaded"):
        am.load_dataset("imagenet", tmp_path, PRE, download=False)
    data = am.load_dataset("imagenet", tmp_path, PRE, download=False, with_train=False)
    assert data["train"] is None and data["test"].targets == [0, 0, 1, 1]
    assert data["classes"][:2] == ["tench", "goldfish"]
    fabricate_tinyimagenet(tmp_path)
    shutil.rmtree(tmp_path / "tiny-imagenet-200" / "train")
    with pytest.raises(ValueError, match="no folder train/"):
        am.load_dataset("tinyimagenet", tmp_path, PRE, download=False)
    tiny = am.load_dataset("tinyimagenet", tmp_path, PRE, download=False, with_train=False)
    assert tiny["train"] is None and len(tiny["test"]) > 0


def test_imagenet_names_are_clips_curated_list_with_no_colliding_prompts():
    """ImageNet's names are open_clip's IMAGENET_CLASSNAMES (CoOp's), and no two classes share a prompt after
    tokenising unless that list itself repeats the name (WordNet's first synonyms gave three colliding pairs)."""
    names = am._class_names("imagenet", None)
    assert names == list(open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES) and len(names) == 1000
    template = am.DATASETS["imagenet"].template
    prompts = [tuple(t.tolist()) for t in open_clip.tokenize([template.format(n) for n in names])]
    same_prompt = {p for p in prompts if prompts.count(p) > 1}
    same_name = {prompts[i] for i, n in enumerate(names) if names.count(n) > 1}
    assert same_prompt == same_name and len(same_name) == 2  # CLIP's list repeats "missile" and "sunglasses"


def fabricate_caltech101(root, classes=("BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "accordion",
                                        "airplanes"), per_class=4):
    """Caltech101 as torchvision reads it: caltech101/101_ObjectCategories/<class>/image_<nnnn>.jpg."""
    for c in classes:
        for n in range(1, per_class + 1):
            jpeg(Path(root) / "caltech101" / "101_ObjectCategories" / c / f"image_{n:04d}.jpg", n)


def test_a_caltech_tree_without_the_class_it_drops_gets_the_layout_error(tmp_path):
    """A Caltech101 tree without Faces_easy (the class dropped, as CoOp does) is the usual one-line layout error, not
    a bare ValueError of list.index."""
    fabricate_caltech101(tmp_path, classes=("BACKGROUND_Google", "Faces", "Leopards"))
    with pytest.raises(ValueError, match=r"caltech101 .*no class folder Faces_easy.*caltech101/101_ObjectCategories"):
        am.load_dataset("caltech101", tmp_path, PRE, download=False)


def fabricate_stanford_cars(root, names=("AM General Hummer SUV 2000", "Acura RL Sedan 2012")):
    """Stanford Cars as torchvision reads it: devkit/cars_meta.mat, the two annotation .mat files, the image folders."""
    import scipy.io
    base = Path(root) / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)[None]})
    for split, annos in (("train", base / "devkit" / "cars_train_annos.mat"),
                         ("test", base / "cars_test_annos_withlabels.mat")):
        rows = []
        for label in range(len(names)):
            fname = f"{split}_{label:05d}.jpg"
            jpeg(base / f"cars_{split}" / fname, label)
            rows.append((fname, label + 1))
        scipy.io.savemat(annos, {"annotations": np.array(rows, dtype=[("fname", object), ("class", object)])[None]})

UCF_FOLDERS = ["Apply_Eye_Makeup", "Hammer_Throw", "Hammering", "Jump_Rope", "Jumping_Jack"]  # sorted as ImageFolder


def fabricate_ucf101(root, groups=range(1, 10), folders=UCF_FOLDERS):
    """CoOp's UCF-101-midframes: <Class_Name>/v_<ClassName>_gNN_cMM.jpg, one middle frame per clip, 2 clips a group."""
    for folder in folders:
        for g in groups:
            for clip in (1, 2):
                name = f"v_{folder.replace('_', '')}_g{g:02d}_c{clip:02d}.jpg"
                jpeg(Path(root) / "ucf101" / "UCF-101-midframes" / folder / name, g * 10 + clip)


def fabricate_sun397(root, classes=("/a/abbey", "/b/bakery/shop", "/c/coast"), per_class=10):
    """SUN397 as torchvision reads it: SUN397/ClassName.txt and SUN397/<letter>/<class>/sun_<id>.jpg."""
    base = Path(root) / "SUN397"
    for c in classes:
        for n in range(per_class):
            jpeg(base / c.lstrip("/") / f"sun_{c.strip('/').replace('/', '')}{n:03d}.jpg", n)
    base.joinpath("ClassName.txt").write_text("\n".join(classes) + "\n")


def test_class_names_and_labels_are_coops(tmp_path):
    """Fabricated trees come out with CoOp's names in CoOp's label order: Caltech101 without Faces_easy (its images
    gone, later labels moved up), Stanford Cars year first (and read with downloads allowed, though torchvision can
    no longer download it), UCF101 single-spaced in classInd order (from CoOp's folders or UCF's own CamelCase ones),
    pets lower-case."""
    fabricate_caltech101(tmp_path)
    caltech = am.load_dataset("caltech101", tmp_path, PRE, download=False)
    assert caltech["classes"] == ["face", "leopard", "accordion", "airplane"]
    coop_label = {"Faces": 0, "Leopards": 1, "accordion": 2, "airplanes": 3}
    for part in ("train", "test"):
        split = caltech[part]
        folders = [split.dataset.categories[split.dataset.y[i]] for i in split.indices]
        assert "Faces_easy" not in folders and split.targets == [coop_label[f] for f in folders]
    assert len(caltech["train"]) + len(caltech["test"]) == 4 * 4
    fabricate_stanford_cars(tmp_path)
    cars = am.load_dataset("stanford_cars", tmp_path, PRE)  # downloads allowed, as the CLI's default: none is tried
    assert cars["classes"] == ["2000 AM General Hummer SUV", "2012 Acura RL Sedan"]
    fabricate_ucf101(tmp_path)
    ucf = am.load_dataset("ucf101", tmp_path, PRE, download=False)
    assert ucf["classes"] == ["Apply Eye Makeup", "Hammering", "Hammer Throw", "Jumping Jack", "Jump Rope"]
    shutil.rmtree(tmp_path / "ucf101")
    fabricate_ucf101(tmp_path, folders=[f.replace("_", "") for f in UCF_FOLDERS])  # UCF's own names: ApplyEyeMakeup
    assert am.load_dataset("ucf101", tmp_path, PRE, download=False)["classes"] == ucf["classes"]
    fabricate_oxford_pets(tmp_path)
    pets = am.load_dataset("oxford_pets", tmp_path, PRE, download=False)
    assert pets["classes"] == ["abyssinian", "american bulldog", "bengal", "yorkshire terrier"]
    assert {d["split"]["source"] for d in (caltech, cars, ucf, pets)} == {"default"}


def test_ucf101_tests_on_groups_1_to_7_of_official_split_1(tmp_path):
    """The UCF101 test set is exactly the clips of groups 1-7 (no group on both sides), labelled in CoOp's order."""
    fabricate_ucf101(tmp_path)
    ucf = am.load_dataset("ucf101", tmp_path, PRE, download=False)
    for part, groups in (("test", set(range(1, 8))), ("train", {8, 9})):
        split = ucf[part]
        paths = [Path(split.dataset.samples[i][0]) for i in split.indices]
        assert {int(p.name.split("_g")[1][:2]) for p in paths} == groups and len(paths) == 5 * 2 * len(groups)
        names = [" ".join(p.parent.name.split("_")) for p in paths]
        assert [ucf["classes"][y] for y in split.targets] == names


def test_sun397_split_does_not_depend_on_the_listing_order(tmp_path, monkeypatch):
    """Shuffling the order the filesystem lists SUN397's files in gives the same split; with the official
    Training_01/Testing_01 partition present, the split is exactly that partition."""
    fabricate_sun397(tmp_path)

    def test_files(data):
        return [data["test"].dataset._image_files[i].name for i in data["test"].indices]

    expected = test_files(am.load_dataset("sun397", tmp_path, PRE, download=False))
    listed = Path.rglob
    for seed in range(3):
        monkeypatch.setattr(Path, "rglob", lambda self, pattern, seed=seed: sorted(
            listed(self, pattern), key=lambda p: hash((seed, p.name))))
        assert test_files(am.load_dataset("sun397", tmp_path, PRE, download=False)) == expected
    base = tmp_path / "SUN397"
    (base / "Training_01.txt").write_text("/a/abbey/sun_aabbey000.jpg\n/c/coast/sun_ccoast001.jpg\n")
    (base / "Testing_01.txt").write_text("/b/bakery/shop/sun_bbakeryshop002.jpg\n/a/abbey/sun_aabbey003.jpg\n")
    sun = am.load_dataset("sun397", tmp_path, PRE, download=False)
    assert sorted(test_files(sun)) == ["sun_aabbey003.jpg", "sun_bbakeryshop002.jpg"]
    assert sorted(sun["train"].dataset._image_files[i].name for i in sun["train"].indices) == [
        "sun_aabbey000.jpg", "sun_ccoast001.jpg"]
    assert sun["classes"] == ["abbey", "shop bakery", "coast"] and sorted(sun["test"].targets) == [0, 1]


def test_coop_split_json_is_used_exactly(tmp_path):
    """--split-json: exactly its train and test lists, paths under the dataset's image folder, its class names; not
    under TGA-ZSR's conventions, which split as its code does."""
    fabricate_oxford_pets(tmp_path)
    spec = {"train": [["Abyssinian_1.jpg", 0, "abyssinian"], ["american_bulldog_2.jpg", 1, "american_bulldog"]],
            "val": [], "test": [["american_bulldog_100.jpg", 1, "american_bulldog"]]}
    (tmp_path / "split_zhou_OxfordPets.json").write_text(json.dumps(spec))
    data = am.load_dataset("oxford_pets", tmp_path, PRE, split_json=tmp_path / "split_zhou_OxfordPets.json")
    assert data["classes"] == ["abyssinian", "american bulldog"]
    assert data["train"].targets == [0, 1] and data["test"].targets == [1] and len(data["test"]) == 1
    pets = am.load_dataset("oxford_pets", tmp_path, PRE, download=False)["test"]  # same file through torchvision
    k = [p.name for p in pets.dataset._images].index("american_bulldog_100.jpg")
    assert torch.equal(data["test"][0][0], pets[k][0])
    for entry in (["missing_7.jpg", 0, "abyssinian"], [7, 0, "abyssinian"]):  # a file not there, a path not a string
        (tmp_path / "bad.json").write_text(json.dumps({**spec, "test": spec["test"] + [entry]}))
        with pytest.raises(ValueError, match=f"lists {entry[0]}, which is not under"):
            am.load_dataset("oxford_pets", tmp_path, PRE, split_json=tmp_path / "bad.json")
    for label, name in ((3, "beagle"), (1, "bulldog")):  # a label gap (no 2); one label, two names
        spec["test"] = [["american_bulldog_100.jpg", label, name]]
        (tmp_path / "bad.json").write_text(json.dumps(spec))
        with pytest.raises(ValueError, match="does not label its classes 0 to n − 1 with one name each"):
            am.load_dataset("oxford_pets", tmp_path, PRE, split_json=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="--conventions tga-zsr reads TGA-ZSR's 16 datasets as its code does, without"):
        am.load_dataset("oxford_pets", tmp_path, PRE, split_json=tmp_path / "split_zhou_OxfordPets.json",
                        conventions="tga-zsr")


TINY_WNIDS = {"n01443537": "goldfish, Carassius auratus",
              "n01629819": "European fire salamander, Salamandra salamandra",
              "n02124075": "Egyptian cat", "n04562935": "water_tower"}


def fabricate_tinyimagenet(root, wnids=TINY_WNIDS, train_per_class=3, val=(("n02124075", 2), ("n01443537", 1),
                                                                           ("n04562935", 2), ("n01629819", 1))):
    """TinyImageNet as its zip unpacks: wnids.txt (unsorted), words.txt (more lines than classes, several synonyms a
    line), train/<wnid>/images/<wnid>_<n>.JPEG with a boxes file beside, val/images/val_<n>.JPEG annotated in
    val/val_annotations.txt (file, wnid, box). Returns the (file, wnid) pairs of val."""
    base = Path(root) / "tiny-imagenet-200"
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(reversed(list(wnids))) + "\n")
    (base / "words.txt").write_text("n00001740\tentity\n" + "".join(f"{w}\t{n}\n" for w, n in wnids.items()))
    for w in wnids:
        for n in range(train_per_class):
            jpeg(base / "train" / w / "images" / f"{w}_{n}.JPEG", n, size=(64, 64))
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    files = [(f"val_{i}.JPEG", w) for i, (w, count) in enumerate((w, c) for w, c in val for _ in range(c))]
    for file, _ in files:
        jpeg(base / "val" / "images" / file, len(file), size=(64, 64))
    (base / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in files))
    return files


def test_fap_trains_fgvc_aircraft_on_the_train_list_that_coops_code_reads(tmp_path):
    """FGVC Aircraft has no CoOp split file: under --conventions fap its training images are the official train list
    alone (CoOp's fgvc_aircraft.py reads images_variant_train.txt), under coop train + val (trainval)."""
    fabricate_tga_zsr_rest(tmp_path)
    for conventions, files in (("fap", ["0000000.jpg", "0000001.jpg"]), ("coop", [f"{i:07d}.jpg" for i in range(4)])):
        train = am.load_dataset("fgvc_aircraft", tmp_path, PRE, download=False, conventions=conventions)["train"]
        assert [Path(am._image_file(train, i)).name for i in range(len(train))] == files


def test_tinyimagenet_reads_the_official_tree_with_readable_names(tmp_path):
    """TinyImageNet's classes are its wnids sorted, named by each one's first synonym (no wnid reaches a prompt);
    train is train/<wnid>/images; the test set is exactly the val images with the labels val_annotations.txt gives."""
    val = fabricate_tinyimagenet(tmp_path)
    data = am.load_dataset("tinyimagenet", tmp_path, PRE, download=False)
    assert data["classes"] == ["goldfish", "European fire salamander", "Egyptian cat", "water tower"]
    assert not any(re.search(r"n\d{8}", name) for name in data["classes"])
    order = sorted(TINY_WNIDS)
    test = data["test"]
    assert [(p.name, order[y]) for p, y in test.items] == val and test.targets == [order.index(w) for _, w in val]
    assert sorted((p.parent.parent.name, y) for p, y in data["train"].items) == sorted(
        (w, order.index(w)) for w in order for _ in range(3))
    image, label = test[0]
    assert image.shape == (3, SIZE, SIZE) and label == order.index(val[0][1])


def fabricate_cifar10(root, labels=(3, 0, 9, 3)):
    """CIFAR-10's python pickles: data_batch_1..5, test_batch ({"data": (N, 3072) uint8, "labels"}), batches.meta."""
    import pickle
    base = Path(root) / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": list(labels)}
        (base / name).write_bytes(pickle.dumps(batch))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (base / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def fabricate_stl10(root, labels=(1, 10, 4)):
    """STL-10's binaries: {train,test}_X.bin (N × 3 × 96 × 96 uint8), {train,test}_y.bin (labels 1..10), class_names."""
    base = Path(root) / "stl10_binary"
    base.mkdir(parents=True)
    for split in ("train", "test"):
        np.random.default_rng(1).integers(0, 256, len(labels) * 3 * 96 * 96, dtype=np.uint8).tofile(
            base / f"{split}_X.bin")
        np.array(labels, dtype=np.uint8).tofile(base / f"{split}_y.bin")
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (base / "class_names.txt").write_text("\n".join(names) + "\n")


def test_cifar_stl10_caltech256_and_pcam_have_readable_names_and_official_tests(tmp_path, monkeypatch):
    """CIFAR-10 and STL-10 (checksums patched out) read their official test files with torchvision's names;
    Caltech-256 drops its clutter class, names without numbers or -101, split 70/30 per class; PCAM without h5py
    says to install it."""
    for module, cls in (("cifar", "CIFAR10"), ("stl10", "STL10")):
        monkeypatch.setattr(getattr(torchvision.datasets, cls), "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    fabricate_cifar10(tmp_path)
    cifar = am.load_dataset("cifar10", tmp_path, PRE, download=False)
    assert cifar["classes"][:4] == ["airplane", "automobile", "bird", "cat"] and cifar["test"].targets == [3, 0, 9, 3]
    assert len(cifar["train"]) == 5 * 4 and cifar["test"][0][0].shape == (3, SIZE, SIZE)
    fabricate_stl10(tmp_path)
    stl = am.load_dataset("stl10", tmp_path, PRE, download=False)
    assert stl["classes"][:3] == ["airplane", "bird", "car"] and stl["test"].targets == [0, 9, 3]
    folders = ["001.ak47", "002.american-flag", "251.airplanes-101", "252.car-side-101", "257.clutter"]
    for folder in folders:
        for n in range(1, 11):
            jpeg(tmp_path / "caltech256" / "256_ObjectCategories" / folder / f"{folder[:3]}_{n:04d}.jpg", n)
    caltech = am.load_dataset("caltech256", tmp_path, PRE, download=False)
    assert caltech["classes"] == ["ak47", "american flag", "airplane", "car side"]
    for part, per_class in (("train", 7), ("test", 3)):
        split = caltech[part]
        assert sorted(split.targets) == [c for c in range(4) for _ in range(per_class)]
        assert all(split.dataset.categories[split.dataset.y[i]] == folders[y]
                   for i, y in zip(split.indices, split.targets))
    monkeypatch.setattr(am.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pcam .*h5py.*pip install h5py"):
        am.load_dataset("pcam", tmp_path, PRE, download=False)
    assert am._class_names("pcam", None) == ["lymph node", "lymph node containing metastatic tumor tissue"]


def fabricate_tga_zsr_rest(root):
    """Trees of the TGA-ZSR targets no other test makes, as torchvision reads them, a few real classes each:
    CIFAR-100's pickles, Food-101's meta/test.json, Flowers102's .mat files, FGVC Aircraft's variant lists, and an
    ImageNet val/ with torchvision's meta.bin and TGA-ZSR's imagenet_classes_names.txt."""
    import pickle
    import scipy.io
    base = Path(root) / "cifar-100-python"
    base.mkdir(parents=True)
    for name in ("train", "test"):
        batch = {"data": np.zeros((2, 3072), dtype=np.uint8), "fine_labels": [1, 0]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / "meta").write_bytes(pickle.dumps({"fine_label_names": ["apple", "aquarium_fish", "maple_tree"]}))
    meta = {"apple_pie": ["apple_pie/1"], "baby_back_ribs": ["baby_back_ribs/2"], "hot_and_sour_soup": []}
    for folder in meta["apple_pie"] + meta["baby_back_ribs"]:
        jpeg(Path(root) / "food-101" / "images" / f"{folder}.jpg", 1)
    (Path(root) / "food-101" / "meta" / "test.json").parent.mkdir(parents=True)
    (Path(root) / "food-101" / "meta" / "test.json").write_text(json.dumps(meta))
    flowers = Path(root) / "flowers-102"
    for i in (1, 2, 3):
        jpeg(flowers / "jpg" / f"image_{i:05d}.jpg", i)
    scipy.io.savemat(flowers / "imagelabels.mat", {"labels": np.array([12, 60, 88])})
    scipy.io.savemat(flowers / "setid.mat", {"trnid": np.array([1, 2]), "valid": np.array([1, 2]),
                                             "tstid": np.array([1, 2, 3])})
    data = Path(root) / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "F-16A/B", "Cessna 172"]
    for i in range(len(variants)):
        jpeg(data / "images" / f"{i:07d}.jpg", i)
    (data / "variants.txt").write_text("\n".join(variants) + "\n")
    for split, images in (("test", range(4)), ("train", (0, 1)), ("val", (2, 3)), ("trainval", range(4))):
        (data / f"images_variant_{split}.txt").write_text("".join(f"{i:07d} {variants[i]}\n" for i in images))
    wnids = ["n01440764", "n01443537", "n01484850"]
    for w in wnids:
        jpeg(Path(root) / "imagenet" / "val" / w / f"ILSVRC2012_val_{w}.JPEG", 1)
    torch.save(({w: (w,) for w in wnids}, wnids), Path(root) / "imagenet" / "meta.bin")
    (Path(root) / "imagenet" / "imagenet_classes_names.txt").write_text(
        "n01440764 1 tench\nn01443537 2 goldfish\nn01484850 3 great_white_shark\n")


# The prompts TGA-ZSR's code (commit 663fe57: utils.py get_text_prompts_val, replace/datasets/*.py) forms for the
# classes of the fabricated trees, written out by hand from that code: label -> prompt, a few labels per dataset.
TGA_ZSR_PROMPTS = {
    "tinyimagenet": {0: "This is a photo of a goldfish", 1: "This is a photo of a european fire salamander",
                     3: "This is a photo of a water tower"},
    "cifar10": {0: "This is a photo of a airplane", 3: "This is a photo of a cat"},
    "cifar100": {1: "This is a photo of a aquarium fish", 2: "This is a photo of a maple tree"},
    "stl10": {0: "This is a photo of a airplane", 2: "This is a photo of a car"},
    "food101": {0: "A photo of apple pie, a type of food.", 2: "A photo of hot and sour soup, a type of food."},
    "oxford_pets": {1: "A photo of a american bulldog, a type of pet.", 3: "A photo of a yorkshire terrier, a type "
                                                                          "of pet."},
    "flowers102": {1: "A photo of a hard leaved pocket orchid, a type of flower.",
                   11: "A photo of a colts foot, a type of flower.",
                   59: "A photo of a pink yellow dahlia?, a type of flower.",
                   87: "A photo of a cyclamen , a type of flower."},
    "dtd": {0: "A surface with a banded texture.", 2: "A surface with a zigzagged texture."},
    "eurosat": {0: "A centered satellite photo of annual crop land.", 1: "A centered satellite photo of a forest.",
                9: "A centered satellite photo of a sea or a lake."},
    "fgvc_aircraft": {0: "A photo of a boeing 707-320, a type of aircraft.",
                      2: "A photo of a f-16a/b, a type of aircraft.",
                      3: "A photo of a cessna 172, a type of aircraft."},
    "caltech101": {0: "This is a photo of a faces", 1: "This is a photo of a faces easy",
                   4: "This is a photo of a airplanes"},
    "caltech256": {1: "A photo of a american flag.", 3: "A photo of a car side.", 4: "A photo of a clutter."},
    "stanford_cars": {0: "A photo of a am general hummer suv.", 2: "A photo of a ram c/v cargo van minivan."},
    "pcam": {0: "Tthis is a photo of healthy lymph node tissue.", 1: "This is a photo of lymph node tumor tissue."},
    "imagenet": {0: "This is a photo of a tench", 2: "This is a photo of a great white shark"},
    "sun397": {1: "This is a photo of a apartment building outdoor", 2: "This is a photo of a bakery shop"},
}
EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
CALTECH256_FOLDERS = ["001.ak47", "002.american-flag", "251.airplanes-101", "252.car-side-101", "257.clutter"]


def test_tga_zsr_conventions_give_tga_zszs_prompts_class_sets_and_test_sets(tmp_path, monkeypatch):
    """Under --conventions tga-zsr every one of TGA-ZSR's 16 datasets, read from a fabricated tree, gives the prompts
    TGA-ZSR's code forms, label for label; Caltech101 keeps Faces_easy, Caltech-256 its clutter, and those two,
    EuroSAT and SUN397 are tested on every image, with no training split."""
    for cls in ("CIFAR10", "STL10", "Flowers102"):  # checksums of the real files
        monkeypatch.setattr(getattr(torchvision.datasets, cls), "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    fabricate_tinyimagenet(tmp_path)
    fabricate_cifar10(tmp_path)
    fabricate_stl10(tmp_path)
    fabricate_oxford_pets(tmp_path)
    fabricate_dtd(tmp_path)
    fabricate_eurosat(tmp_path, EUROSAT_FOLDERS, per_class=2)
    fabricate_caltech101(tmp_path)
    for folder in CALTECH256_FOLDERS:
        for n in range(1, 3):
            jpeg(tmp_path / "caltech256" / "256_ObjectCategories" / folder / f"{folder[:3]}_{n:04d}.jpg", n)
    fabricate_stanford_cars(tmp_path, ("AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                                       "Ram C/V Cargo Van Minivan 2012"))
    fabricate_sun397(tmp_path, ("/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"), per_class=2)
    fabricate_tga_zsr_rest(tmp_path)
    every_image = {"caltech101": 5 * 4, "caltech256": 5 * 2, "eurosat": 10 * 2, "sun397": 3 * 2}
    assert list(TGA_ZSR_PROMPTS) == am.EVAL_PRESETS["tga-zsr"]
    for name, expected in TGA_ZSR_PROMPTS.items():
        if name == "pcam":  # its HDF5 files need h5py, which is not a dependency; its prompts need no file
            classes = am._tga_zsr_classes("pcam", None, tmp_path, None)
        else:
            data = am.load_dataset(name, tmp_path, am.tga_zsr_preprocess(name, SIZE), download=False,
                                   with_train=name == "tinyimagenet", conventions="tga-zsr")
            classes = data["classes"]
            assert data["split"] == {"source": "tga-zsr"}
            if name in every_image:
                assert data["train"] is None and len(data["test"]) == every_image[name]
                assert sorted(data["test"].indices) == list(range(every_image[name]))
        prompts = [am._template(name, "tga-zsr").format(c) for c in classes]
        assert {label: prompts[label] for label in expected} == expected, name
    assert len(am.load_dataset("caltech101", tmp_path, PRE, download=False, conventions="tga-zsr")["classes"]) == 5
    assert am.load_dataset("eurosat", tmp_path, PRE, download=False, conventions="tga-zsr")["test"].targets == [
        c for c in range(10) for _ in range(2)]
    (tmp_path / "imagenet" / "imagenet_classes_names.txt").write_text("n01440764 1 tench\n")
    with pytest.raises(ValueError, match=r"imagenet_classes_names\.txt.*KeyError: 'n01443537'.*"
                                         r"github.com/zhyblue424/TGA-ZSR"):
        am.load_dataset("imagenet", tmp_path, PRE, download=False, with_train=False, conventions="tga-zsr")


def test_tga_zsr_keeps_all_101_and_257_caltech_classes(tmp_path):
    """Caltech101 under TGA-ZSR's conventions has all 101 classes of the real tree (BACKGROUND_Google dropped, both
    face classes kept), Caltech-256 all 257 (clutter kept), each tested on every image."""
    others = [f"c{i:03d}" for i in range(97)]
    fabricate_caltech101(tmp_path, ["BACKGROUND_Google", "Faces", "Faces_easy", "Leopards", "Motorbikes", *others], 1)
    for i in range(1, 258):
        folder = tmp_path / "caltech256" / "256_ObjectCategories" / f"{i:03d}.class{i}"
        folder.mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(folder / f"{i:03d}_0001.jpg")
    for name, n_classes in (("caltech101", 101), ("caltech256", 257)):
        data = am.load_dataset(name, tmp_path, PRE, download=False, with_train=False, conventions="tga-zsr")
        assert len(data["classes"]) == n_classes and sorted(data["test"].targets) == list(range(n_classes))


def test_tga_zsr_resizing_is_its_torchvision_transforms():
    """tga_zsr_preprocess through image_transform gives, pixel for pixel, the images TGA-ZSR's utils.py makes:
    Resize((224, 224)) for CIFAR and STL-10, Resize(256) + CenterCrop(224) for the others (bilinear, torchvision's
    default), from a non-square picture; a model of another input size resizes by the same ratio, to the nearest
    pixel."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    theirs = {"cifar10": T.Compose([T.Resize((224, 224)), T.PILToTensor()]),
              "dtd": T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])}
    for name, transform in theirs.items():
        ours = am.image_transform(am.tga_zsr_preprocess(name, 224))(image)
        assert ours.shape == (3, 224, 224) and torch.equal(ours, transform(image)), name
    assert not torch.equal(am.image_transform(am.tga_zsr_preprocess("dtd", 224))(image),
                           am.image_transform({**PRE, "size": 224})(image))  # not the model's own resizing
    for size in range(16, 513):  # a model of another input size: TGA-ZSR's ratio 256/224, to the nearest pixel
        assert abs(am.tga_zsr_preprocess("dtd", size)["resize"] * 224 - size * 256) <= 112


def fabricate_imagenet_shift(root, folder, classes, per_class=2):
    for c in classes:
        for n in range(per_class):
            jpeg(Path(root) / folder / str(c) / f"{n}.jpg", n)


def test_imagenet_shifts_use_clips_names_in_imagenets_label_order(tmp_path):
    """ImageNet-R (and -A, -Sketch) are labelled by the rank of each wnid among ImageNet's 1000, whose order comes
    from CoOp's classnames.txt or the ImageNet train folders; ImageNet-V2's folders are ImageNet's label numbers
    (sorted as numbers, not strings)."""
    wnids = [f"n{7 * i + 1000:08d}" for i in range(1000)]  # sorted, as ImageNet's label order is
    present = [wnids[999], wnids[1], wnids[207]]
    fabricate_imagenet_shift(tmp_path, "imagenet-rendition/imagenet-r", present)
    with pytest.raises(ValueError, match="none of them lists 1000 wnids here"):
        am.load_dataset("imagenet_r", tmp_path, PRE, download=False)
    names = open_clip.IMAGENET_CLASSNAMES
    for source in ("classnames", "train"):
        if source == "classnames":
            (tmp_path / "imagenet").mkdir()
            (tmp_path / "imagenet" / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
        else:
            (tmp_path / "imagenet" / "classnames.txt").unlink()
            for w in wnids:
                (tmp_path / "imagenet" / "train" / w).mkdir(parents=True)
        r = am.load_dataset("imagenet_r", tmp_path, PRE, download=False)
        assert r["train"] is None and r["classes"] == [names[1], names[207], names[999]]
        folders = [Path(r["test"].dataset.samples[i][0]).parent.name for i in r["test"].indices]
        assert [r["classes"][y] for y in r["test"].targets] == [names[wnids.index(f)] for f in folders]
    fabricate_imagenet_shift(tmp_path, "imagenetv2/imagenetv2-matched-frequency-format-val", [2, 10, 1])
    v2 = am.load_dataset("imagenet_v2", tmp_path, PRE, download=False)
    folders = [int(Path(v2["test"].dataset.samples[i][0]).parent.name) for i in v2["test"].indices]
    assert v2["classes"] == [names[1], names[2], names[10]]
    assert [v2["classes"][y] for y in v2["test"].targets] == [names[f] for f in folders]
    for odd in ("1000", "n01440764"):  # past ImageNet's labels; a wnid where label numbers belong
        fabricate_imagenet_shift(tmp_path, "imagenetv2/imagenetv2-matched-frequency-format-val", [odd])
        with pytest.raises(ValueError, match=f"has a class folder {odd} that is not an ImageNet class"):
            am.load_dataset("imagenet_v2", tmp_path, PRE, download=False)
        shutil.rmtree(tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / odd)


@settings(max_examples=10, deadline=None)
@given(shots=st.lists(st.integers(1, 5), min_size=2, max_size=2, unique=True), seed=st.integers(0, 21))
def test_synthetic_data_has_one_test_set_whatever_the_shots(shots, seed):
    """synthetic_dataset's test images and labels are the same for any number of training images per class, and none
    of them is a training image."""
    data = [am.synthetic_dataset(3, k, 6, 8, seed) for k in shots]
    tests = [am.cache_images(d["test"], range(6), "cpu") for d in data]
    assert all(torch.equal(a, b) for a, b in zip(*tests))
    train_images, _ = am.cache_images(data[1]["train"], range(3 * shots[1]), "cpu")
    assert not any(torch.equal(x, t) for x in tests[0][0] for t in train_images)


CACHE_MEMORY = """
import json, os, re, sys, torch
sys.path.insert(0, sys.argv[1])
import advmask as am

class Images(torch.utils.data.Dataset):  # each image made anew when read, as a decoded file would be
    def __len__(self):
        return 8000

    def __getitem__(self, i):
        return torch.full((3, 224, 224), i % 251, dtype=torch.uint8), i % 7

am.cache_images(Images(), range(0, 200, 2), "cpu")  # first: lazy imports and a first batch, which do not scale
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
images, labels = am.cache_images(Images(), range(0, 8000, 4), "cpu")  # 301 MB
# the peak of this process alone (VmHWM), not ru_maxrss, which a process started by a larger one carries over
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024 - rss
print(json.dumps({"ratio": peak / images.numel(), "shape": list(images.shape), "dtypes": [str(images.dtype),
                  str(labels.dtype)], "right": all(bool(images[i].eq(4 * i % 251).all()) and labels[i] == 4 * i % 7
                                                   for i in range(2000))}))
"""


def test_cache_images_holds_the_decoded_images_about_once():
    """cache_images fills tensors made once: in a fresh process its peak host memory stays under 1.3× the decoded
    images (a list of batches joined by torch.cat peaks at about 2×), with each image and label at its index."""
    proc = subprocess.run([sys.executable, "-c", CACHE_MEMORY, str(HERE)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["ratio"] < 1.3 and got["right"] and got["shape"] == [2000, 3, 224, 224]
    assert got["dtypes"] == ["torch.uint8", "torch.int64"]



def test_an_image_that_does_not_decode_in_a_loader_worker_is_named_in_one_line(tmp_path):
    """A truncated file among more images than one batch, decoded by two loader workers (which re-raise PIL's error as
    its own type), ends in a ValueError naming that file."""
    files = [tmp_path / f"{i}.jpg" for i in range(65)]
    for i, path in enumerate(files):
        jpeg(path, i, size=(8, 8))
    files[40].write_bytes(files[40].read_bytes()[:100])
    images = am.ImageFiles([(path, 0) for path in files], T.PILToTensor())
    with pytest.raises(ValueError, match=rf"^{re.escape(str(files[40]))} does not decode \("):
        am.cache_images(images, range(65), "cpu", num_workers=2)


# ---------------------------------------------------------------------------------------------------------------------
# Results

@pytest.mark.parametrize("row", [  # the paper's base-to-new table: base clean, base adv, new clean, new adv, H
    (66.9, 3.4, 71.5, 3.8, 6.9), (31.7, 14.4, 30.4, 13.4, 19.2), (59.0, 32.4, 46.9, 21.6, 34.6),
    (60.4, 30.7, 46.2, 20.3, 33.3), (70.5, 38.0, 49.6, 21.9, 37.6), (69.5, 43.6, 50.2, 26.1, 41.9)])
def test_harmonic_mean_reproduces_the_papers_h(row):
    """H of the four accuracies gives the paper's H for every method, within the rounding of the printed inputs."""
    # H rises in every input, so the accuracies behind the printed ones (±0.05) bound it from both sides
    low, high = am.harmonic_mean([v - 0.05 for v in row[:4]]), am.harmonic_mean([v + 0.05 for v in row[:4]])
    assert low - 0.05 <= row[4] <= high + 0.05
    assert high - low < 0.25  # tight enough that an arithmetic mean or a 2-term H could not pass


@given(st.lists(st.just(0.0) | st.integers(0, 50_000).map(lambda k: k / 50_000), min_size=4, max_size=4))
def test_harmonic_mean_is_the_statistics_modules_and_zero_with_an_accuracy_of_zero(accuracies):
    """H equals statistics.harmonic_mean for any four accuracies (shares of up to 50,000 test images), and is 0, not a
    division by zero, where an attack breaks every image."""
    assert am.harmonic_mean(accuracies) == pytest.approx(statistics.harmonic_mean(accuracies), rel=1e-12, abs=0)


def write_results(runs, protocol, dataset, shots, seed, entries, **fields):
    """A run folder's results.json: a PGD cell per (evaluated set, clean, adv) entry, and fields beside the results
    (settings, splits, class_sets); returns its path."""
    cell = Path(runs) / protocol / dataset / f"{shots}shot" / f"seed{seed}"
    cell.mkdir(parents=True)
    rows = [{"model": "advmask", "attack": "pgd", "eps": 1.0, "eval": e, "clean_acc": c, "adv_acc": a, "n": 10}
            for e, c, a in entries]
    (cell / "results.json").write_text(json.dumps({"results": rows, **fields}))
    return cell / "results.json"


def table(markdown, heading, method="AdvMask"):
    """The data rows of one method in the markdown table under the first heading containing `heading`, as lists of
    cells after the method's."""
    lines = next(part for part in markdown.split("## ") if heading in part).splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:] if line.startswith("|")]
    return [r[1:] for r in rows if r[0].split(" (lr ")[0] == method]


def test_summary_means_stds_averages_and_missing_cells(tmp_path, capsys):
    """Mean ± std over seeds, an Average row over datasets, "—" for a cell without finished seeds, and H; folders
    whose numbers run would not write (seed01, 016shot) are left out in one line, not read as seed 1 or 16 shots; a
    runs root without runs, one that does not exist, and a file are each refused in one line that says which."""
    write_results(tmp_path, "few_shot", "oxford_pets", 16, 1, [("oxford_pets", 0.60, 0.40)])
    write_results(tmp_path, "few_shot", "oxford_pets", 16, 2, [("oxford_pets", 0.70, 0.50)])
    write_results(tmp_path, "few_shot", "dtd", 16, 1, [("dtd", 0.30, 0.10)])
    (tmp_path / "few_shot" / "dtd" / "16shot" / "seed2").mkdir()  # a failed run: folder, no results.json
    (tmp_path / "few_shot" / "dtd" / "16shot" / "seed7.log").write_text("not a run folder")
    write_results(tmp_path, "few_shot", "dtd", 1, 1, [("dtd", 0.20, 0.05)])  # oxford_pets 1-shot: never run
    for shots, seed in ((16, "01"), ("016", 1)):  # hand-named folders, which are not two more runs of seed 1
        write_results(tmp_path, "few_shot", "dtd", shots, seed, [("dtd", 0.90, 0.90)])
    md = am.summarize(tmp_path, am.parser_defaults)
    assert "leaving out 2 results.json outside that layout" in capsys.readouterr().err
    rows = {r[0]: r[1:] for r in table(md, "few_shot")}
    assert rows["oxford_pets"] == ["—", "—", "65.0 ± 7.1", "45.0 ± 7.1"]
    assert rows["dtd"] == ["20.0 (1/2)", "5.0 (1/2)", "30.0 (1/2)", "10.0 (1/2)"]
    assert rows["**Average**"] == ["—", "—", "47.5", "27.5"]
    with open(tmp_path / "summary.csv", newline="") as f:
        key = ("protocol", "model", "attack", "eps", "dataset", "shots", "eval", "metric")
        cells = {tuple(r[k] for k in key): r for r in csv.DictReader(f)}
    row = cells[("few_shot", "advmask", "pgd", "1.0", "oxford_pets", "16", "oxford_pets", "clean")]
    assert float(row["mean"]) == pytest.approx(0.65)
    assert float(row["std"]) == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert (row["method"], row["basis"], row["seeds"]) == ("AdvMask", "", "2")
    assert ("few_shot", "advmask", "pgd", "1.0", "oxford_pets", "1", "oxford_pets", "clean") not in cells
    write_results(tmp_path, "base2new", "eurosat", 16, 1, [("base", 0.695, 0.436), ("new", 0.502, 0.261)])
    rows = {r[0]: r[1:] for r in table(am.summarize(tmp_path, am.parser_defaults), "base2new")}
    assert rows["eurosat"] == ["69.5", "43.6", "50.2", "26.1", "41.9"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results.json"):
        am.summarize(tmp_path / "empty", am.parser_defaults)
    for path, what in ((tmp_path / "nowhere", "does not exist"), (tmp_path / "summary.md", "is not a folder")):
        assert f"{path} {what}; pass a runs root" in refused(capsys, ["summarize", str(path)])  # a typo, said so


def test_summary_lists_its_methods_in_one_order_whatever_the_hash_seed(tmp_path):
    """A table's rows come CLIP first, then the other methods by name (the figure's order), not in the order of a set
    of strings, which changes with each process's hash seed: eight methods, whose set order matches no fixed one but
    once in thousands of processes."""
    write_results(tmp_path, "few_shot", "dtd", 16, 1, [("dtd", 0.5, 0.2)])
    results = tmp_path / "few_shot" / "dtd" / "16shot" / "seed1" / "results.json"
    row = json.loads(results.read_text())["results"][0]
    baselines = [f"hf-hub:org/{name}" for name in ("zebra", "apple", "mango", "kiwi", "fig")]
    models = ["advmask", "clip", "adv_ft", *baselines]
    results.write_text(json.dumps({"results": [{**row, "model": m} for m in models]}))
    md = am.summarize(tmp_path, am.parser_defaults)
    methods = [line.split(" | ")[0].removeprefix("| ") for line in md.splitlines() if " | dtd | " in line]
    assert methods == ["CLIP", *sorted(["AdvMask", "adversarial fine-tuning", *baselines])]


@pytest.mark.parametrize("protocol, trained_on", [("few_shot", "dtd"), ("transfer", "imagenet")])
def test_summarize_refuses_to_average_runs_of_different_splits(protocol, trained_on, tmp_path):
    """Two seeds of one cell whose evaluated dataset is split by default in one and by CoOp's file in the other are
    refused with one line: the training dataset's own, or a transfer target's."""
    for seed, split in ((1, {"source": "default"}),
                        (2, {"source": "coop", "file": "split_zhou_DescribableTextures.json", "sha256": "ab" * 32})):
        write_results(tmp_path, protocol, trained_on, 16, seed, [("dtd", 0.5, 0.2)],
                      splits={trained_on: {"source": "default"}, "dtd": split})
    with pytest.raises(ValueError, match=rf"{protocol}/{trained_on} .*mixes splits.*dtd: default in .*seed1.*"
                                         r"split_zhou_DescribableTextures.json sha256 abababababab in .*seed2"):
        am.summarize(tmp_path, am.parser_defaults)
    assert not (tmp_path / "summary.md").exists()


def test_summarize_refuses_a_run_folder_that_holds_another_folders_run(tmp_path):
    """A run's folder copied or renamed by hand to that of another seed, shot count, dataset or protocol is refused in
    one line naming what its results.json records, not tabled as that folder's run (seed 1 copied to seed 2 would be
    averaged with itself); two folders holding runs of one cell and seed (a mask's run in seed1-weights beside
    seed1's, which would replace it) are refused in one line naming both."""
    write_results(tmp_path, "few_shot", "dtd", 16, 1, [("dtd", 0.5, 0.2)])
    seed1 = tmp_path / "few_shot" / "dtd" / "16shot" / "seed1"
    recorded = {"protocol": "few_shot", "dataset": "dtd", "shots": 16, "seed": 1}  # as run writes them
    (seed1 / "results.json").write_text(json.dumps({**json.loads((seed1 / "results.json").read_text()), **recorded}))
    am.summarize(tmp_path, am.parser_defaults)  # in its own folder
    for folder, says in (("few_shot/dtd/16shot/seed2", "holds the run of seed 1 (its results.json says so)"),
                         ("few_shot/dtd/4shot/seed1", "holds the run of shots 16"),
                         ("few_shot/eurosat/16shot/seed1", "holds the run of dataset dtd"),
                         ("transfer/dtd/16shot/seed1", "holds the run of protocol few_shot")):
        shutil.copytree(seed1, tmp_path / folder)
        with pytest.raises(ValueError) as refusal:
            am.summarize(tmp_path, am.parser_defaults)
        assert f"{tmp_path / folder} {says}" in str(refusal.value)
        shutil.rmtree(tmp_path / folder)
    shutil.copytree(seed1, tmp_path / "few_shot/dtd/16shot/seed1-weights")  # a second run of seed 1's cells
    with pytest.raises(ValueError) as refusal:
        am.summarize(tmp_path, am.parser_defaults)
    assert f"{seed1} and {seed1}-weights both hold seed 1 of AdvMask on dtd; keep one" in str(refusal.value)


@pytest.mark.parametrize("what, first, second, words", [
    ("eval_limit", 1000, None, "at most 1000 test images per dataset"), ("dry_run", True, False, "dry run"),
    ("model", "ViT-B-16", "ViT-B-32", "model ViT-B-16"), ("test_steps", 10, 100, "10 attack steps"),
    ("test_steps", 0, 100, "0 attack steps"), ("test_alpha", 0.0, 1.0, "α = 0/255")])  # 0 is not False
def test_summarize_tables_seeds_of_other_settings_apart_and_refuses_what_no_heading_names(tmp_path, what, first,
                                                                                         second, words):
    """Two seeds of one cell that differ in an evaluation limit, in being a dry run, in the model or in the attack's
    steps or step size (0 included) go to two tables, the heading of one naming the setting, one seed each, never
    averaged; seeds that differ in a setting no heading names (λ) are refused with one line naming it."""
    for seed, value in ((1, first), (2, second)):
        path = write_results(tmp_path, "few_shot", "dtd", 16, seed, [("dtd", 0.5 + seed / 10, 0.2)],
                             settings={what: value})
    summary = am.summarize(tmp_path, am.parser_defaults)
    assert table(summary, words)[0] == ["dtd", "60.0 (1/2)", "20.0 (1/2)"]
    assert len([line for line in summary.splitlines() if line.startswith("## few_shot")]) == 2
    path.write_text(json.dumps({**json.loads(path.read_text()), "settings": {what: first, "lam": 10}}))
    with pytest.raises(ValueError, match=r"few_shot/dtd .*mixes lam.*unrecorded in .*seed1.* 10 in .*seed2"):
        am.summarize(tmp_path, am.parser_defaults)


def test_summarize_tables_a_mask_and_fine_tuned_weights_in_one_root_each_at_its_learning_rate(tmp_path, monkeypatch):
    """AdvMask runs at lr 1e-4 and adversarial fine-tuning runs at 1e-5 under one root are two methods side by side
    in one table, each at its learning rate, not a cell that mixes learning rates; summary.png draws both, and its
    Average only at shot counts every dataset has. The CLIP baseline both arms evaluated (seed1 and seed1-weights) is
    one row: its numbers rest on no learning rate."""
    for seed, (model, lr) in enumerate([("advmask", 1e-4), ("advmask", 1e-4), ("adv_ft", 1e-5), ("adv_ft", 1e-5)]):
        write_results(tmp_path, "few_shot", "dtd", 16, seed + 1, [("dtd", 0.5, 0.2)])
        path = tmp_path / "few_shot" / "dtd" / "16shot" / f"seed{seed + 1}" / "results.json"
        finished = json.loads(path.read_text())
        finished["results"][0]["model"] = model
        path.write_text(json.dumps({**finished, "settings": {"lr": lr}}))
    md = am.summarize(tmp_path, am.parser_defaults)
    assert md.count("## few_shot | PGD ε = 1/255") == 1  # one table, a row per method at its learning rate
    assert "| AdvMask (lr 0.0001) | dtd | 50.0 ± 0.0 (2/4) |" in md
    assert "| adversarial fine-tuning (lr 1e-05) | dtd | 50.0 ± 0.0 (2/4) |" in md
    labels, plot = [], matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda ax, *args, **kwargs: labels.append(kwargs.get("label")) or plot(ax, *args, **kwargs))
    am.plot_few_shot(tmp_path)  # summary.png: both methods' curves
    assert {"AdvMask (lr 0.0001) clean", "AdvMask (lr 0.0001) adv", "adversarial fine-tuning (lr 1e-05) clean",
            "adversarial fine-tuning (lr 1e-05) adv"} <= set(labels)
    for arm, model, lr in (("", "advmask", 1e-4), ("-weights", "adv_ft", 1e-5)):
        cell = tmp_path / "few_shot" / "eurosat" / "16shot" / f"seed1{arm}"
        cell.mkdir(parents=True)
        rows = [{"model": m, "attack": "pgd", "eps": 1.0, "eval": "eurosat", "clean_acc": c, "adv_acc": 0.1, "n": 10}
                for m, c in ((model, 0.6), ("clip", 0.4))]
        (cell / "results.json").write_text(json.dumps({"results": rows, "settings": {"lr": lr}}))
    clip_rows = {r[0]: r[1:] for r in table(am.summarize(tmp_path, am.parser_defaults), "few_shot", method="CLIP")}
    assert clip_rows["eurosat"] == ["40.0 (1/4)", "10.0 (1/4)"]
    # 4 shots of dtd alone: no 4-shot Average
    write_results(tmp_path, "few_shot", "dtd", 4, 1, [("dtd", 0.5, 0.2)], settings={"lr": 1e-4})
    am.summarize(tmp_path, am.parser_defaults)
    lines = []

    def recorded(ax, *args, **kwargs):  # each line's panel, label and shot counts
        lines.append((ax, kwargs.get("label"), args[0]))
        return plot(ax, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recorded)
    am.plot_few_shot(tmp_path)
    drawn = {(ax.get_title(), label): shots for ax, label, shots in lines}
    assert drawn["dtd", "AdvMask (lr 0.0001) clean"] == (4, 16)
    assert drawn["Average", "AdvMask (lr 0.0001) clean"] == (16,)  # the Average of complete columns alone


def test_summarize_gives_each_evaluation_basis_a_table_of_its_own_named_in_its_heading(tmp_path):
    """Two datasets evaluated with different attack steps (and one at an eval limit) make tables of their own, each
    heading naming what differs from the defaults, and no Average mixes them."""
    for dataset, steps, limit, acc in (("dtd", 100, None, (0.6, 0.3)), ("eurosat", 10, None, (0.4, 0.1)),
                                       ("oxford_pets", 10, 1000, (0.2, 0.05))):
        write_results(tmp_path, "few_shot", dataset, 16, 1, [(dataset, *acc)])
        path = tmp_path / "few_shot" / dataset / "16shot" / "seed1" / "results.json"
        finished = json.loads(path.read_text())
        path.write_text(json.dumps({**finished, "settings": {"test_steps": steps, "eval_limit": limit}}))
    md = am.summarize(tmp_path, am.parser_defaults)
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == ["## few_shot | PGD ε = 1/255 | mean ± std over seeds 1 (%)",
                        "## few_shot | PGD ε = 1/255 | 10 attack steps | mean ± std over seeds 1 (%)",
                        "## few_shot | PGD ε = 1/255 | 10 attack steps; at most 1000 test images per dataset | mean ± "
                        "std over seeds 1 (%)"]
    tables = [{r[0]: r[1:] for r in table(md, heading[3:])} for heading in headings]
    assert [set(t) for t in tables] == [{"dtd", "**Average**"}, {"eurosat", "**Average**"},
                                        {"oxford_pets", "**Average**"}]
    assert [t["**Average**"] for t in tables] == [["60.0", "30.0"], ["40.0", "10.0"], ["20.0", "5.0"]]


def test_results_record_each_class_sets_prompts_and_summarize_refuses_seeds_whose_prompts_differ(tmp_path,
                                                                                               monkeypatch):
    """results.json records, per evaluated class set, its templates and class names in label order (the prompts are
    template.format(name)), its test-set size and its resizing; two seeds of a cell whose prompts, or only their
    resizing, differ are refused, naming them."""
    monkeypatch.chdir(tmp_path)
    am.main(dry_run_args("out", 1))
    recorded = json.loads((tmp_path / "out" / "results.json").read_text())["class_sets"]
    assert recorded == {"oxford_pets": {"templates": [am.DATASETS["oxford_pets"].template],
                                        "classes": [f"class {c}" for c in range(4)], "n_test": 64,
                                        "preprocess": "synthetic"}}
    dtd = {"templates": ["a photo of a {}."], "classes": ["banded", "zigzagged"], "n_test": 2, "preprocess": PRE}
    for runs, differ in ((tmp_path / "a", {"preprocess": am.tga_zsr_preprocess("dtd", SIZE)}),
                         (tmp_path / "b", {"templates": ["This is a photo of a {}"]})):
        for seed, class_set in ((1, dtd), (2, {**dtd, **differ})):
            write_results(runs, "few_shot", "dtd", 16, seed, [("dtd", 0.5, 0.2)], class_sets={"dtd": class_set})
        with pytest.raises(ValueError, match=r"mixes prompts and resizing, \w{12} in .*seed1 and \w{12} in .*seed2"):
            am.summarize(runs, am.parser_defaults)


def test_summarize_refuses_seeds_of_different_model_identities(tmp_path):
    """Two seeds whose recorded model identities differ in the activation are refused, naming it; the same identity
    averages as usual."""
    identity = am.load_clip("tiny", "none")[2] | {"weights_sha256": "ab" * 32}
    for seed, activation in ((1, "GELU"), (2, "QuickGELU")):
        settings = {"pretrained": "openai", "model_identity": {**identity, "activation": activation}}
        path = write_results(tmp_path, "few_shot", "dtd", 16, seed, [("dtd", 0.5, 0.2)], settings=settings)
    with pytest.raises(ValueError, match=r'mixes model activation, "GELU" in .*seed1 and "QuickGELU" in .*seed2'):
        am.summarize(tmp_path, am.parser_defaults)
    settings["model_identity"]["activation"] = "GELU"
    path.write_text(json.dumps({**json.loads(path.read_text()), "settings": settings}))
    assert table(am.summarize(tmp_path, am.parser_defaults), "few_shot")[0] == ["dtd", "50.0 ± 0.0", "20.0 ± 0.0"]


def test_a_hand_edited_run_file_is_tabled_exported_and_rerun_or_refused_in_one_line(tmp_path, capsys):
    """A dry run's results.json or config.json with one value edited by hand (deleted, or made null, a string, a
    number, a list or an object; the worst cases, or they and the CW cells, deleted too, or not) still parses:
    summarize then tables the run or refuses it in a sentence naming its folder (main's one line and exit status 2);
    export exports it, and a rerun of the run's command reuses it (making the worst cases again from the other cells'
    per-image outcomes and the CW cells evaluated again), or each ends in one line naming it, before it writes
    anything; never another exception, and a rerun never keeps a cell whose size or outcome is not its images'."""
    dry_run = ["--dry-run", "--epochs", "1", "--baseline", "--attack", "pgd,cw", "--seed"]
    for seed in ("1", "2"):  # two seeds, so that the edited run's basis is compared with another's
        run_here(capsys, *dry_run, seed, cwd=tmp_path)
    folder = Path("runs_dry") / "few_shot" / "oxford_pets" / "16shot"
    originals = {name: json.loads((tmp_path / folder / "seed1" / name).read_text())
                 for name in ("results.json", "config.json")}

    @settings(max_examples=40, deadline=None)
    @given(st.sampled_from([(name, *where) for name, value in originals.items() for where in json_places(value)]),
           st.sampled_from(["delete", None, "x", 3, [], {}]), st.sampled_from([(), ("worst",), ("worst", "cw")]))
    # edits a draw rarely makes: of what a worst case made again reads of the cells it is made from (outcome, size,
    # its line's values), of a setting a summary's basis holds, of the model export loads, of the model's identity
    @example(("results.json", "results", 0, "correct"), "x", ("worst",))
    @example(("results.json", "results", 0, "correct"), "00", ("worst",))  # 8 of the 64 images' outcomes
    @example(("results.json", "results", 0, "correct"), "00" * 9, ("worst",))  # 72 outcomes for 64 images
    @example(("results.json", "results", 1, "n"), 3, ("worst",))
    @example(("results.json", "results", 0, "n"), 60, ("worst", "cw"))  # 60 outcomes fill as many bytes as 64
    @example(("results.json", "results", 0, "clean_acc"), None, ("worst",))
    @example(("results.json", "settings", "lam"), [], ())
    @example(("results.json", "settings", "model"), 3, ())
    @example(("results.json", "settings", "model"), "x", ())  # a string, but no model's name
    @example(("config.json", "model_identity"), "x", ())
    def check(where, value, deleted):
        files = copy.deepcopy(originals)
        parent = functools.reduce(lambda v, key: v[key], where[:-1], files)
        if value == "delete":
            del parent[where[-1]]
        else:
            parent[where[-1]] = value
        cells = files["results.json"].get("results")
        if isinstance(cells, list):  # a rerun makes the worst cases again from the per-image outcomes
            cells[:] = [r for r in cells if not isinstance(r, dict) or r.get("attack") not in deleted]
        written = {name: json.dumps(value) for name, value in files.items()}
        for name, text in written.items():
            (tmp_path / folder / "seed1" / name).write_text(text)
        try:  # main turns a ValueError into its one line and exit status 2; anything else is a traceback
            am.summarize(tmp_path / "runs_dry", am.parser_defaults, tmp_path / "summary")
        except ValueError as refusal:
            assert str(tmp_path / folder / "seed") in str(refusal)
        shutil.rmtree(tmp_path / "export", ignore_errors=True)
        export = run_here(capsys, "export", str(folder / "seed1"), "export", cwd=tmp_path)
        exported = (tmp_path / "export").exists()
        rerun = run_here(capsys, *dry_run, "1", cwd=tmp_path)
        rewrote = any((tmp_path / folder / "seed1" / name).read_text() != text for name, text in written.items())
        for proc, wrote in ((export, exported), (rerun, rewrote)):
            assert proc.returncode in (0, 2), proc.stderr
            if proc.returncode == 2:  # refused in one line naming the run, before it writes anything
                assert proc.stderr.count("\n") == 1 and str(folder / "seed1") in proc.stderr and not wrote
        if rerun.returncode == 0:  # what a worst case is made from: each cell's outcome of each of its images
            n = originals["results.json"]["results"][0]["n"]
            for r in json.loads((tmp_path / folder / "seed1" / "results.json").read_text())["results"]:
                assert r["n"] == n and (r["attack"] == "worst" or len(bytes.fromhex(r["correct"])) == -(-n // 8))

    check()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40))
def test_a_cells_per_image_outcome_reads_back_in_image_order(correct):
    """The per-image outcome a results.json entry keeps (packed into hex) reads back image by image as evaluate gave
    it, for any number of images: what a worst case made later, and any per-image analysis, rest on."""
    correct = torch.tensor(correct)
    attack = {"adv_acc": correct.float().mean().item(), "seconds": 0.0, "correct": correct}
    result = {"n": len(correct), "clean_acc": 1.0, "zero_grad_share": 0.0,
              "attacks": {am._cell_label("pgd", 1): attack}}
    [row] = am._result_rows({"model": "advmask", "eval": "dtd", "test_steps": 3}, result, [("pgd", 1)])
    assert torch.equal(am._outcome(row), correct)


# ---------------------------------------------------------------------------------------------------------------------
# Analysis and figures

def masked_tiny_clip(seed=7, target="mhsa"):
    model = tiny_clip(seed)
    am.apply_masks(model, target)
    return model


def set_off(model, where):
    """Scores below the threshold exactly where where(name, shape) is True, above it elsewhere."""
    with torch.no_grad():
        for name, _, _, mask in am._masks(model):
            mask.scores.copy_(torch.where(where(name, mask.scores.shape), -1.0, 1.0))


@pytest.mark.parametrize("block, head", [(0, 0), (0, 1), (1, 1)])
def test_a_heads_q_rows_off_is_100_percent_in_its_cell_and_0_elsewhere(tmp_path, block, head):
    """Switching off exactly head h's q rows of block b reads 100 % in (b, q, h) and 0 % in every other cell, and
    analyze names that head first among those with the most weights off (a quarter of its rows and columns)."""
    width, head_width = am.TINY_CLIP["vision_cfg"]["width"], am.TINY_CLIP["vision_cfg"]["head_width"]
    model = masked_tiny_clip()

    def where(name, shape):
        off = torch.zeros(shape, dtype=torch.bool)
        if name == f"transformer.resblocks.{block}.attn.in_proj_weight":
            off[head * head_width:(head + 1) * head_width] = True  # q rows come first
        return off

    set_off(model, where)
    am.save_masks(model, tmp_path / "m.bin")
    cells = am.mask_breakdown(*am.read_mask_file(tmp_path / "m.bin"))
    assert {k for k, (off, _) in cells.items() if off} == {(block, "q", head), (block, "q", None)}
    assert cells[block, "q", head] == (head_width * width,) * 2
    assert cells[block, "q", None] == (head_width * width, width * width)
    assert {part for _, part, _ in cells} == {"q", "k", "v", "out"} and {h for *_, h in cells} == {None, 0, 1}
    md = am.analyze([tmp_path / "m.bin"], tmp_path / "out")
    assert f"Heads with the most weights off (q, k, v rows and out columns): block {block} head {head} 25.0 %, " in md


@MODEL_SETTINGS
@given(seed=st.integers(0, 10_000), target=st.sampled_from(["mhsa", "all"]))
def test_cell_fractions_weighted_by_size_add_back_to_the_total(tmp_path_factory, seed, target):
    """On random masks the parts' off counts add up to the total off, and the heads' to their part's."""
    model = masked_tiny_clip(target=target)
    randomize_scores(model, seed)
    path = tmp_path_factory.mktemp("m") / "m.bin"
    am.save_masks(model, path)
    header, bits = am.read_mask_file(path)
    cells = am.mask_breakdown(header, bits)
    wholes = {k: v for k, v in cells.items() if k[2] is None}
    assert sum(off for off, _ in wholes.values()) == (~bits).sum().item()
    assert sum(n for _, n in wholes.values()) == len(bits)
    assert {p for _, p, _ in wholes} == ({"q", "k", "v", "out"} | ({"fc", "proj"} if target == "all" else set()))
    for (b, p, _), (off, n) in wholes.items():
        heads = [cells[k] for k in cells if k[:2] == (b, p) and k[2] is not None]
        if heads:
            assert (sum(h[0] for h in heads), sum(h[1] for h in heads)) == (off, n)
    assert am.mask_sparsity(am.load_masks(tiny_clip(7), path)) == pytest.approx((~bits).sum().item() / len(bits))


@settings(max_examples=100, deadline=None)
@given(a=st.lists(st.booleans(), min_size=1, max_size=40), data=st.data())
def test_jaccard_and_its_chance_level_equal_a_direct_set_computation(a, data):
    """Jaccard = |A ∩ B| / |A ∪ B| over the off indices, chance = p₁p₂ / (p₁ + p₂ − p₁p₂), computed with sets."""
    b = data.draw(st.lists(st.booleans(), min_size=len(a), max_size=len(a)))
    off_a, off_b = {i for i, v in enumerate(a) if v}, {i for i, v in enumerate(b) if v}
    value, chance = am.jaccard(torch.tensor(a), torch.tensor(b))
    assert value == pytest.approx(len(off_a & off_b) / len(off_a | off_b) if off_a | off_b else 0.0)
    p1, p2 = len(off_a) / len(a), len(off_b) / len(b)
    assert chance == pytest.approx(p1 * p2 / (p1 + p2 - p1 * p2) if off_a or off_b else 0.0)


@settings(max_examples=100, deadline=None)
@given(masks=st.lists(st.lists(st.booleans(), min_size=12, max_size=12), min_size=1, max_size=5), data=st.data())
def test_consensus_is_off_where_at_least_k_masks_are_off(masks, data):
    """K = 1 gives the union of the off-sets, K = n their intersection, any K the count ≥ K per weight."""
    bits = [~torch.tensor(m) for m in masks]  # True = on; m is the off-set
    k = data.draw(st.integers(1, len(masks)))
    off = ~am.consensus_bits(bits, k)
    assert off.tolist() == [sum(m[i] for m in masks) >= k for i in range(12)]
    assert (~am.consensus_bits(bits, 1)).tolist() == [any(m[i] for m in masks) for i in range(12)]
    assert (~am.consensus_bits(bits, len(masks))).tolist() == [all(m[i] for m in masks) for i in range(12)]


@pytest.mark.parametrize("target", ["mlp", "all"])
def test_analyze_reports_mlp_blocks_and_heads_only_for_attention(tmp_path, target):
    """An MLP-only mask gets its per-block fc/proj table and no per-head view (and no crash); an "all" mask gets both,
    the per-head view over the attention parts alone."""
    model = masked_tiny_clip(target=target)
    randomize_scores(model, 3)
    am.save_masks(model, tmp_path / "masks.bin")
    md = am.analyze([tmp_path / "masks.bin"], tmp_path / "out")
    header = "| block | fc | proj |" if target == "mlp" else "| block | q | k | v | out | fc | proj |"
    assert header in md and len([line for line in md.splitlines() if re.match(r"\| \d \|", line)]) == 2  # 2 blocks
    assert ("Heads with the most weights off" in md) == (target == "all")
    assert (tmp_path / "out" / "heads_0.png").exists() == (target == "all")


def test_a_consensus_keeps_the_head_count_and_the_weights_its_inputs_share(tmp_path):
    """The consensus header records the number of heads and the base weights of its inputs; inputs that disagree on
    either are refused with one line."""
    model = masked_tiny_clip()
    for seed, name in ((5, "new.bin"), (6, "other.bin")):
        randomize_scores(model, seed)
        am.save_masks(model, tmp_path / name, "tiny seed 7")
    am.analyze([tmp_path / "other.bin", tmp_path / "new.bin"], tmp_path / "out", consensus=2, save=tmp_path / "c.bin")
    consensus = am.read_mask_file(tmp_path / "c.bin")[0]
    assert consensus["heads"] == 2 and consensus["base_weights"] == am.read_mask_file(tmp_path / "new.bin")[0][
        "base_weights"]
    am.save_masks(masked_tiny_clip(3), tmp_path / "seed3.bin", "tiny seed 3")
    with pytest.raises(ValueError, match=r"record tiny seed [37] \w{12} and tiny seed [37] \w{12} pre-trained weights"):
        am.analyze([tmp_path / "seed3.bin", tmp_path / "new.bin"], tmp_path / "out3", consensus=1,
                   save=tmp_path / "e.bin")
    header, bits = am.read_mask_file(tmp_path / "new.bin")
    four = {k: v for k, v in header.items() if k != "n_weights"} | {"heads": 4}
    am.write_mask_file(tmp_path / "four.bin", four, bits)
    with pytest.raises(ValueError, match="record 2 and 4 attention heads per block"):
        am.analyze([tmp_path / "four.bin", tmp_path / "new.bin"], tmp_path / "out2", consensus=1,
                   save=tmp_path / "d.bin")
    assert not (tmp_path / "d.bin").exists()


def png_shape(path):
    """(channels, height, width) of a PNG, decoded in full by PIL."""
    with Image.open(path) as image:
        image.load()
        return len(image.getbands()), image.height, image.width


def test_analyze_reports_overlaps_and_saves_a_consensus_that_transfer_evaluates(tiny_files, tmp_path, capsys):
    """analyze over a runs root labels masks from their config.json, writes md, csv and decodable PNGs, compares
    every pair with chance, counts a mask named twice (the root and a run in it) or copied (an export's) once, saying
    so for a copy, and --consensus writes a mask file that the CLI's transfer protocol evaluates."""
    runs = tmp_path / "runs"
    for seed, shots in ((1, 4), (2, 4), (1, 16)):
        model = masked_tiny_clip()
        randomize_scores(model, seed * shots)
        cell = runs / "few_shot" / "dtd" / f"{shots}shot" / f"seed{seed}"
        am.save_masks(model, cell / "masks.bin")
        (cell / "config.json").write_text(json.dumps({"dataset": "dtd", "protocol": "few_shot", "shots": shots,
                                                      "seed": seed}))
    out, copy = tmp_path / "analysis", cell / "exported" / "masks.bin"  # an export's copy, inside its run
    copy.parent.mkdir()
    shutil.copyfile(cell / "masks.bin", copy)
    am.main(["analyze", str(runs), str(runs / "few_shot" / "dtd" / "16shot"), "--out", str(out), "--consensus", "2",
             "--save", str(tmp_path / "cons.bin")])
    md, printed = (out / "analysis.md").read_text(), capsys.readouterr().out
    assert md in printed and "## dtd/few_shot/16shot/seed1" in md
    assert f"{copy} has the bytes of {cell / 'masks.bin'}: one mask, counted once" in printed
    assert sum(line.startswith("| dtd/few_shot/") for line in md.splitlines()) == 3  # three pairs
    assert sorted(p.name for p in out.iterdir()) == ["analysis.csv", "analysis.md", "heads_0.png", "heads_1.png",
                                                     "heads_2.png", "overlap.png"]
    for png in out.glob("*.png"):
        channels, height, width = png_shape(png)
        assert channels in (3, 4) and height > 50 and width > 50
    bits = [am.read_mask_file(f)[1] for f in sorted(runs.rglob("seed*/masks.bin"))]  # the three runs' own
    header, cons = am.read_mask_file(tmp_path / "cons.bin")
    assert torch.equal(cons, am.consensus_bits(bits, 2)) and header["heads"] == 2
    with open(out / "analysis.csv", newline="") as f:
        jaccards = [float(r["value"]) for r in csv.DictReader(f) if r["view"] == "jaccard"]
    assert jaccards == pytest.approx([am.jaccard(~a, ~b)[0] for a, b in itertools.combinations(bits, 2)])
    proc = run_here(capsys, "--protocol", "transfer", "--masks", str(tmp_path / "cons.bin"), "--eval-datasets", "dtd",
                    "--data-root", str(tiny_files / "data"), "--no-download", "--model",
                    str(tiny_files / "tiny-test-clip.json"), "--pretrained", str(tiny_files / "tiny.pt"),
                    "--device", "cpu", "--workers", "0", "--test-steps", "1", "--out-dir", "t", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "t" / "results.json").read_text())
    assert result["sparsity"] == pytest.approx(1 - cons.float().mean().item())
    kept = (tmp_path / "cons.bin").read_bytes()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")  # a run folder that has no mask yet
    for save, fact in ((tmp_path / "cons.bin", "is the trained mask of a run, or one of the masks"),  # an input
                       (copy, "is the trained mask of a run, or one of the masks"),  # an input's copy
                       (tmp_path / "other" / "masks.bin", "is the trained mask of a run, or one of the masks"),
                       (tmp_path / "other", "is a folder; pass the path of the mask file to write")):
        err = refused(capsys, ["analyze", str(runs), str(tmp_path / "cons.bin"), "--out", str(out), "--consensus",
                               "2", "--save", str(save)])
        assert f"--save {save} {fact}" in err
    assert (tmp_path / "cons.bin").read_bytes() == kept and not (tmp_path / "other" / "masks.bin").exists()
    assert copy.read_bytes() == (cell / "masks.bin").read_bytes()


def test_summary_png_plots_the_few_shot_table(tmp_path):
    """summarize's CLI command also writes summary.png, a decodable image, from the few-shot rows; with --out, all
    of it goes to that folder and nothing to the runs folder."""
    write_results(tmp_path, "few_shot", "dtd", 1, 1, [("dtd", 0.4, 0.1)])
    write_results(tmp_path, "few_shot", "dtd", 16, 1, [("dtd", 0.6, 0.3)])
    am.main(["summarize", str(tmp_path)])
    channels, height, width = png_shape(tmp_path / "summary.png")
    assert channels in (3, 4) and height > 100 and width > 100
    for name in ("summary.md", "summary.csv", "summary.png"):
        (tmp_path / name).unlink()
    am.main(["summarize", str(tmp_path), "--out", str(tmp_path.parent / f"{tmp_path.name}-summary")])
    out = tmp_path.parent / f"{tmp_path.name}-summary"
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv", "summary.md", "summary.png"]
    assert not list(tmp_path.glob("summary.*"))


def test_summary_png_draws_a_line_per_learning_rate_with_shot_ticks_on_every_panel(tmp_path, monkeypatch):
    """AdvMask at two learning rates gives two lines (as the table gives two rows), each panel's x axis reads
    1 2 4 8 16, and the legend stands beside the panels, on none of them."""
    for seed, lr in ((1, 1e-4), (2, 1e-3)):
        for shots in (1, 2, 4, 8, 16):
            for dataset in ("dtd", "eurosat"):
                write_results(tmp_path, "few_shot", dataset, shots, seed, [(dataset, 0.3 + shots / 100, 0.1)],
                              settings={"lr": lr})
    saved, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or savefig(fig, *a,
                                                                                                              **k))
    am.main(["summarize", str(tmp_path)])
    [fig] = saved
    assert len(fig.axes) == 3 and not any(ax.get_legend() for ax in fig.axes) and len(fig.legends) == 1
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16"]
        assert {line.get_label() for line in ax.get_lines()} == {
            f"AdvMask (lr {lr}) {metric}" for lr in ("0.0001", "0.001") for metric in ("clean", "adv")}


def test_summary_png_shows_the_papers_attack_pgd_at_the_smallest_eps(tmp_path, monkeypatch):
    """Of cells under CW and PGD at ε = 1/255 and 4/255, summary.png draws PGD at ε = 1/255, the paper's, its axis
    saying so."""
    for shots in (1, 16):
        cell = tmp_path / "few_shot" / "dtd" / f"{shots}shot" / "seed1"
        cell.mkdir(parents=True)
        rows = [{"model": "advmask", "attack": attack, "eps": eps, "eval": "dtd", "clean_acc": 0.5, "adv_acc": adv,
                 "n": 10} for attack, eps, adv in (("cw", 1.0, 0.1), ("pgd", 4.0, 0.05), ("pgd", 1.0, 0.3))]
        (cell / "results.json").write_text(json.dumps({"results": rows}))
    saved, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig) or savefig(fig, *a,
                                                                                                              **k))
    am.main(["summarize", str(tmp_path)])
    [fig] = saved
    for ax in fig.axes:
        assert ax.get_ylabel() == "accuracy (%), PGD ε = 1/255"
        [adv] = [line for line in ax.get_lines() if line.get_label() == "AdvMask adv"]
        assert list(adv.get_ydata()) == pytest.approx([30.0, 30.0])  # 1 and 16 shots


def test_heatmaps_span_their_values_and_the_overlap_shows_jaccard_over_its_chance_level(tmp_path, monkeypatch):
    """A mask's per-head heatmaps share one colour scale from their smallest value to their largest (not from 0, which
    would paint a few points' spread one colour), and overlap.png shows each pair's Jaccard index ÷ its chance."""
    files = []
    for seed in (1, 2):
        model = masked_tiny_clip()
        randomize_scores(model, seed)  # about half the weights off, each head a little differently
        files.append(tmp_path / f"m{seed}.bin")
        am.save_masks(model, files[-1])
    shown, imshow = [], matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda ax, m, **k: shown.append((np.asarray(m, dtype=float), k)) or imshow(ax, m, **k))
    am.analyze(files, tmp_path / "out")
    heads = shown[:4]  # the first mask's q, k, v, out panels
    values = np.concatenate([m.ravel() for m, _ in heads])
    assert values.min() > 0 and all(k["vmin"] == values.min() and k["vmax"] == values.max() for _, k in heads)
    (overlap, k), bits = shown[-1], [~am.read_mask_file(f)[1] for f in files]
    value, chance = am.jaccard(*bits)
    assert overlap[0, 1] == overlap[1, 0] == pytest.approx(value / chance) and np.isnan(overlap[0, 0])
    assert k["vmin"] == k["vmax"] == pytest.approx(value / chance)


def test_analyze_tells_apart_two_roots_and_leaves_no_old_figure(tmp_path):
    """Masks of the same cell under two runs roots get labels of their own; a figure of an earlier analysis that
    this one does not make is gone."""
    for i, root in enumerate(("a", "b")):  # two masks (the same bytes would be one mask)
        cell = tmp_path / root / "few_shot" / "dtd" / "1shot" / "seed1"
        cell.mkdir(parents=True)
        model = masked_tiny_clip()
        randomize_scores(model, i)
        am.save_masks(model, cell / "masks.bin")
        (cell / "config.json").write_text(json.dumps({"dataset": "dtd", "protocol": "few_shot", "shots": 1, "seed": 1}))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "heads_7.png").write_bytes(b"old")
    md = am.analyze([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    assert f"## {tmp_path / 'a' / 'few_shot' / 'dtd' / '1shot' / 'seed1' / 'masks.bin'}" in md
    assert f"## {tmp_path / 'b' / 'few_shot' / 'dtd' / '1shot' / 'seed1' / 'masks.bin'}" in md
    assert not (tmp_path / "out" / "heads_7.png").exists() and (tmp_path / "out" / "heads_1.png").is_file()


def test_analyze_compares_only_masks_of_the_same_weights(tmp_path, monkeypatch):
    """Of three masks, two of one tiny CLIP and one of a wider CLIP (the same weight names, other shapes), only the
    first two are compared: one overlap row; the wider mask's pairs have none, and a blank cell in the figure."""
    wide = open_clip.CLIP(**{**am.TINY_CLIP, "vision_cfg": {**am.TINY_CLIP["vision_cfg"], "width": 96}})
    am.apply_masks(wide)
    for seed, (name, model) in enumerate((("a.bin", masked_tiny_clip()), ("b.bin", masked_tiny_clip()),
                                          ("wide.bin", wide))):
        randomize_scores(model, seed)
        am.save_masks(model, tmp_path / name)
    figures = {}
    monkeypatch.setattr(am, "_heatmap", lambda path, panels, *args, **kwargs: figures.update({path.name: panels}))
    md = am.analyze([tmp_path / f for f in ("a.bin", "wide.bin", "b.bin")], tmp_path / "out")
    rows = [line for line in md.splitlines() if line.startswith(f"| {tmp_path}")]
    assert len(rows) == 1 and "a.bin" in rows[0] and "b.bin" in rows[0] and "wide" not in rows[0]
    [(_, grid)] = figures["overlap.png"]  # masks in the order given: a, wide, b
    assert math.isfinite(grid[0][2]) and all(math.isnan(grid[i][j]) for i, j in ((0, 1), (1, 2), (1, 0), (2, 1)))


def analyze_bad_inputs(root):
    other = open_clip.CLIP(**{**am.TINY_CLIP, "vision_cfg": {**am.TINY_CLIP["vision_cfg"], "width": 32}})
    am.apply_masks(other)
    am.save_masks(other, root / "other" / "masks.bin")
    am.save_masks(masked_tiny_clip(), root / "a" / "masks.bin")
    am.save_masks(masked_tiny_clip(target="mlp"), root / "mlp" / "masks.bin")
    (root / "empty").mkdir()
    (root / "blocker").write_text("a file where --save wants a folder")
    a, save = str(root / "a" / "masks.bin"), ["--save", "c.bin"]
    return [
        ([str(root / "empty")], "holds no masks.bin; pass a mask file, a run folder or a runs root"),
        ([str(root / "nowhere")], "nowhere does not exist; pass a mask file, a run folder or a runs root"),
        ([a, str(root / "other"), "--consensus", "1", *save], "--consensus needs masks of one architecture and target"),
        ([a, str(root / "mlp"), "--consensus", "1", *save], "--consensus needs masks of one architecture and target"),
        ([a, "--consensus", "0", *save], "--consensus 0 must lie between 1 and the number of masks, 1"),
        ([a, str(root / "mlp"), "--consensus", "3", *save], "3 must lie between 1 and the number of masks, 2"),
        ([a, *save], "--consensus K and --save PATH go together"),
        ([a, "--consensus", "1", "--save", str(root / "blocker" / "c.bin")], "blocker (Not a directory); pass a"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_every_bad_analyze_input_ends_in_one_line_exit_2_and_no_files(case, tmp_path_factory, monkeypatch, capsys):
    """A path without masks or not there, a consensus over misfit masks, K outside 1..n, --save without --consensus,
    a --save path that cannot be written (before any figure): one line, exit status 2, nothing written."""
    args, message = analyze_bad_inputs(tmp_path_factory.mktemp("masks"))[case]
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    with pytest.raises(SystemExit) as exit_:
        am.main(["analyze", *args, "--out", "out"])
    assert_one_line_exit_2_no_files(exit_.value.code, capsys.readouterr().err, cwd, message)


# ---------------------------------------------------------------------------------------------------------------------
# Benchmark

def test_tf32_is_set_through_the_flags_this_torch_has_and_restored():
    """set_tf32 turns TF32 on and off for CUDA's fp32 matmuls and convolutions alike, without a warning (torch 2.9
    warns at its old allow_tf32 flags), through fp32_precision where torch has it, and returns the matmuls' state
    before, which restores it."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    new = hasattr(matmul, "fp32_precision")
    state = (lambda: (matmul.fp32_precision == "tf32", conv.conv.fp32_precision == "tf32") if new else
             (matmul.allow_tf32, conv.allow_tf32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = am.set_tf32(True)
        try:
            assert state() == (True, True) and am.set_tf32(False) is True and state() == (False, False)
            assert am.set_tf32(True) is False and state() == (True, True)
        finally:
            am.set_tf32(before)


def test_the_training_precision_keeps_lafa_faithful_where_bf16_does_not():
    """On a small CLIP, bf16 autocast (the former CUDA default) drowns LAFA's clean − adversarial signal in rounding
    (error ÷ signal > 0.1 in every block, so this test fails on that default), while the training precision the CLI
    uses meets error ÷ signal ≤ 0.1 in every block, LAFA within 1 % and a score-gradient cosine ≥ 0.99; TF32 is left
    as it was."""
    tf32 = am.set_tf32(True)  # as main sets it: precision_check turns it off for its true-fp32 reference alone
    try:
        rows = {r["precision"]: r for r in am.precision_check(am.TINY_CLIP, torch.device("cpu"), repeats=1)}
    finally:
        left_on = am.set_tf32(tf32)  # restored whatever happens; checked after, so no error of precision_check hides
    assert left_on is True
    assert min(rows["bf16"]["block_error_to_signal"]) > 0.1
    assert am.parse_args([]).precision == am.TRAIN_PRECISION
    chosen = rows[am.TRAIN_PRECISION]
    assert max(chosen["block_error_to_signal"]) <= 0.1 and len(chosen["block_error_to_signal"]) == 2
    assert abs(chosen["lafa_ratio"] - 1) <= 0.01 and chosen["grad_cosine"] >= 0.99
    assert rows["bf16"]["pgd_sign_agreement"] > 0.9 and chosen["step_time_ratio"] == 1


def test_the_fp32_residual_stream_mode_keeps_every_blocks_output_in_fp32():
    """precision_check's "bf16, fp32 residual stream" keeps the residual stream (every block's output) in fp32, where
    bf16 autocast alone makes it bf16; its hook on the patch embedding is gone after the block."""
    model, x = tiny_classifier(), images(2)
    for mode, dtype in (("bf16", torch.bfloat16), ("bf16, fp32 residual stream", torch.float32)):
        with am._precision(model, torch.device("cpu"), mode):
            _, feats = model(x, return_features=True)
        assert {f.dtype for f in feats} == {dtype}, mode
    assert {f.dtype for f in model(x, return_features=True)[1]} == {torch.float32}
    assert not am.visual_tower(model).conv1._forward_hooks


@pytest.mark.parametrize("proc", [True, False])
def test_benchmark_reports_every_figure_and_one_bit_per_weight(proc, tmp_path, monkeypatch):
    """benchmark() gives positive speeds and memories (no memories on a CPU without Linux's /proc, where it reads
    them, but the speeds all the same), and a mask file of one bit per weight plus ≤ 1.5 KB."""
    if not proc:
        monkeypatch.setattr(am, "PROC_SELF", tmp_path / "no-proc")
    result = am.benchmark(am.TINY_CLIP, 8, torch.device("cpu"), "fp32", repeats=1, pgd_steps=2)
    assert result["masked_weights"] == 2 * (3 * 64 * 64 + 64 * 64)
    memory = ("train_peak_mem_masked_mb", "train_peak_mem_plain_mb", "train_mem_ratio")
    for key in ("train_img_s_masked", "train_img_s_plain", "eval_img_s_baked", "eval_img_s_plain", *memory * proc):
        assert result[key] > 0, key
    assert proc or [result[key] for key in memory] == [None] * 3
    # every ratio is the mask's cost over plain CLIP's: > 1 where masking is slower or larger
    assert result["train_time_ratio"] == pytest.approx(result["train_img_s_plain"] / result["train_img_s_masked"])
    assert result["eval_time_ratio"] == pytest.approx(result["eval_img_s_plain"] / result["eval_img_s_baked"])
    assert not proc or result["train_mem_ratio"] == pytest.approx(result["train_peak_mem_masked_mb"] /
                                                                  result["train_peak_mem_plain_mb"])
    overhead_bytes = (result["mask_bits_per_weight"] - 1) * result["masked_weights"] / 8
    # safetensors' header and ours, uncompressed JSON: about 1 KB whatever the size (ViT-B/32: 1.0006 bits a weight)
    assert 0 <= overhead_bytes <= 1536


# ---------------------------------------------------------------------------------------------------------------------
# Export

# A fresh process that never imports advmask: open_clip alone loads the folder and computes zero-shot logits.
OPEN_CLIP_ALONE = """
import sys, torch, open_clip, torch.nn.functional as F
for folder, inputs, out in zip(*[iter(sys.argv[1:])] * 3):  # (folder, inputs, logits) triples
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    x, prompts = torch.load(inputs)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.visual.image_mean, model.visual.image_std))
    with torch.no_grad():
        image = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        torch.save(model.logit_scale.exp() * image @ text.T, out)
assert "advmask" not in sys.modules
"""


def test_an_exported_run_loads_in_open_clip_alone_with_the_tuned_models_logits(tiny_files, tmp_path, monkeypatch,
                                                                                capsys):
    """For each arm, export writes an open_clip model folder whose logits, in a fresh process with open_clip alone,
    equal the run's tuned model's on the run's classes (the mask on a base folder with QuickGELU and its own mean, std,
    resize mode and interpolation, the weights on a config and checkpoint file); the folder is a --model here too, with
    the base model's preprocessing, holds the run's file and the image tower alone, and its card names the base model,
    the sparsity and every evaluation cell. Exported from another folder, a run's config and checkpoint given by
    relative paths are each one line naming its flag, and export --model and --pretrained find them."""
    expected, alone = {}, []  # alone: (folder, inputs, logits) of each arm, for one fresh process
    for tune in ("mask", "weights"):
        work = tmp_path / tune
        work.mkdir()
        monkeypatch.chdir(work)
        if tune == "mask":
            base = [model_folder(work / "base", tiny_clip(7), quick_gelu=True, mean=[0.5, 0.4, 0.3], std=[0.2] * 3,
                                 interpolation="bilinear", resize_mode="squash"), None]
        else:  # relative paths, as typed in the run's folder
            base = ["tiny-test-clip.json", "tiny.pt"]
            for f in base:
                shutil.copy(tiny_files / f, work / f)
        am.main(["--model", base[0], *(["--pretrained", base[1]] if base[1] else []), *tiny_cli_args(tiny_files)[4:],
                 "--tune", tune, "--epochs", "2", "--lr", "0.05", "--shots", "2", "--attack", "pgd,cw", "--out-dir",
                 "run"])
        am.main(["export", "run", "exported"])
        assert not (work / "exported" / "visual.safetensors").exists()  # the image tower alone only with --visual
        am.main(["export", "run", "exported", "--visual", "--overwrite"])  # replaces the earlier export
        tuned_file = "masks.bin" if tune == "mask" else "weights.bin"
        assert sorted(p.name for p in (work / "exported").iterdir()) == sorted(
            ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "visual.safetensors", tuned_file])
        clip, tokenizer, identity = am.load_clip(*base)
        if tune == "mask":
            am.bake_masks(am.load_masks(clip, work / "run" / "masks.bin"))
            assert 0 < am.mask_sparsity(am.load_masks(am.load_clip(*base)[0], work / "run" / "masks.bin")) < 1
        else:
            am.load_weights(clip, work / "run" / "weights.bin")
        names = [n.replace("_", " ").lower() for n in PET_CLASSES]
        prompts = [am.DATASETS["oxford_pets"].template.format(n) for n in names]
        x = images(3)
        torch.save((x, prompts), work / "inputs.pt")
        with torch.no_grad():  # the logits open_clip alone must give, in one process for both arms (below)
            expected[tune] = am.ClipClassifier(clip, names, [am.DATASETS["oxford_pets"].template], tokenizer)(x)
        alone += [str(work / f) for f in ("exported", "inputs.pt", "logits.pt")]
        _, _, here_identity = am.load_clip(f"local-dir:{work / 'exported'}", None)
        assert here_identity["weights_sha256"] == am.weights_fingerprint(clip)
        assert here_identity["preprocess"] == identity["preprocess"]  # the base model's resizing and normalisation
        folder = f"local-dir:{work / 'exported'}"  # as the model to mask and as the baseline of a transfer run
        am.main(["--model", folder, *tiny_cli_args(tiny_files)[4:], "--protocol", "transfer", "--eval-datasets",
                 "dtd", "--baseline", folder, "--epochs", "1", "--shots", "1", "--out-dir", "again"])
        again = json.loads((work / "again" / "results.json").read_text())
        assert {(e["model"], e["eval"]) for e in again["results"]} == {("advmask", "dtd"), (folder, "dtd")}
        tower = safetensors.torch.load_file(work / "exported" / "visual.safetensors")
        assert tower.keys() == clip.visual.state_dict().keys()
        assert all(torch.equal(tower[k], v) for k, v in clip.visual.state_dict().items())
        assert len({p.stat().st_mode for p in (work / "exported").iterdir()}) == 1  # safetensors' 0600 too
        card = (work / "exported" / "README.md").read_text()
        assert "Not a usable model" not in card and "2 shots per class" in card
        results = json.loads((work / "run" / "results.json").read_text())
        assert "library_name: open_clip" in card and "pipeline_tag: zero-shot-image-classification" in card
        assert "license: unknown" in card and f"`{identity['model']}`" in card and identity["weights_sha256"] in card
        off = "—" if tune == "weights" else f"{100 * results['sparsity']:.2f} %"
        assert f"| weights off | {off} |" in card
        for e in results["results"]:
            assert f"| {e['model']} | {e['eval']} | {e['attack']} | {e['eps']:g}/255 | 1 | {e['n']} | fp32 | " \
                   f"{100 * e['clean_acc']:.2f} | {100 * e['adv_acc']:.2f} |" in card
    monkeypatch.chdir(tmp_path)
    assert "the run's --model file tiny-test-clip.json is not there" in refused(capsys, ["export", "weights/run", "x"])
    moved = ["--model", "weights/tiny-test-clip.json"]
    assert "pass export --pretrained PATH" in refused(capsys, ["export", "weights/run", "x", *moved])
    assert not (tmp_path / "x").exists()
    am.main(["export", "weights/run", "x", *moved, "--pretrained", "weights/tiny.pt"])
    assert (tmp_path / "x" / "open_clip_model.safetensors").read_bytes() == (
        tmp_path / "weights" / "exported" / "open_clip_model.safetensors").read_bytes()
    proc = subprocess.run([sys.executable, "-c", OPEN_CLIP_ALONE, *alone], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    for tune in ("mask", "weights"):
        torch.testing.assert_close(torch.load(tmp_path / tune / "logits.pt"), expected[tune], rtol=1e-5, atol=1e-5)


def test_a_tags_network_is_exported_as_it_was_tuned(tiny_files, tmp_path, monkeypatch):
    """A run of OpenAI's tag (its weights trained with QuickGELU, where its name's config says GELU; download replaced
    by a local file as in the tag test above) exports a folder from which open_clip alone builds QuickGELU, its card
    under the weights' licence (MIT)."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-B-32", {**am.TINY_CLIP, "quick_gelu": False})
    weights = tmp_path / "ViT-B-32.pt"
    torch.save(open_clip.CLIP(**am.TINY_CLIP, quick_gelu=True).state_dict(), weights)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, cache_dir=None: str(weights))
    monkeypatch.chdir(tmp_path)
    am.main(["--model", "ViT-B-32", "--pretrained", "openai", *tiny_cli_args(tiny_files)[4:], "--epochs", "1",
             "--shots", "1", "--out-dir", "run"])
    am.main(["export", "run", "exported"])
    assert activations(open_clip.create_model("local-dir:exported")) == {"QuickGELU"}
    assert "\nlicense: mit\n" in (tmp_path / "exported" / "README.md").read_text()  # OpenAI's weights' licence


def test_the_card_of_a_synthetic_run_says_its_data_and_weights_are_random_and_each_cells_attack_steps(tmp_path,
                                                                                                     monkeypatch):
    """A --synthetic run's model card says, above its numbers, that its images and base weights were random, words
    one shot as "1 shot", and gives each evaluation cell its own attack steps (a rerun at --test-steps 3 adds cells)."""
    monkeypatch.chdir(tmp_path)
    args = ["--model", "tiny", "--synthetic", "--dataset", "dtd", "--epochs", "1", "--shots", "1", "--eval-limit", "8",
            "--device", "cpu", "--workers", "0", "--out-dir", "run"]
    am.main([*args, "--test-steps", "2"])
    am.main([*args, "--test-steps", "3"])
    am.main(["export", "run", "exported"])
    card = (tmp_path / "exported" / "README.md").read_text()
    warning = card.index("**Not a usable model: random images of the data's size stood in for it (--synthetic); its "
                         "base weights are random (--pretrained none).")
    assert warning < card.index("## Evaluation") and "1 shot per class" in card and "none weights" not in card
    steps = [line.split(" | ")[4] for line in card.splitlines() if line.startswith("| advmask |")]
    assert sorted(steps) == ["2", "3"]


@pytest.mark.parametrize("case", ["missing", "unfinished", "incomplete", "replaced", "no file", "not empty",
                                  "not an export"])
def test_every_bad_export_ends_in_one_line_exit_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    """A RUN_DIR that is not there, an unfinished run (no results yet, or cells still missing), a run whose mask file
    is not the one its cells measured, a run without its mask or weights file, an OUT_DIR that is not empty (without
    --overwrite), and one that holds other files than an earlier export (with --overwrite, which replaces only that)
    are one line and exit 2, and nothing is written or deleted."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    if case not in ("missing", "unfinished"):
        (run / "results.json").write_text(json.dumps({"results": [], "settings": {}, "train_log": [],
                                                      "complete": case == "replaced", "tuned_file_sha256": "ab" * 32}))
    if case in ("not empty", "not an export", "incomplete", "replaced"):
        am.save_masks(masked_tiny_clip(), run / "masks.bin")
    if case in ("not empty", "not an export"):
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "other.txt").write_text("keep me")
        (tmp_path / "out" / "open_clip_config.json").write_text("{}")  # a model folder, but not an export
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    key = {"missing": "nowhere is not a folder; pass the folder of a finished run", "unfinished": "no results.json",
           "incomplete": "complete: false", "no file": "neither masks.bin nor weights",
           "replaced": "run/masks.bin is not the file that the cells of run/results.json measured",
           "not empty": "not an empty folder; pass another one, or --overwrite to replace an earlier export",
           "not an export": "not an empty folder or an earlier export; pass another one"}  # each message's key fact
    run_dir = "nowhere" if case == "missing" else "run"
    assert key[case] in refused(capsys, ["export", run_dir, "out", *["--overwrite"] * (case == "not an export")])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------------
# Command line (subprocesses of the real CLI)

PET_CLASSES = ["Abyssinian", "american_bulldog", "Bengal", "yorkshire_terrier"]  # cats capitalised, dogs not


def fabricate_oxford_pets(root, train_per_class=3, test_per_class=2):
    """A tiny Oxford-IIIT Pet tree as torchvision reads it: images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt."""
    base = Path(root) / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for split, per_class, first in (("trainval", train_per_class, 1), ("test", test_per_class, 100)):
        lines = []
        for label, breed in enumerate(PET_CLASSES, start=1):
            for n in range(first, first + per_class):
                pixels = rng.integers(0, 256, (30 + n % 7, 40, 3), dtype=np.uint8)  # odd sizes: resize and crop
                Image.fromarray(pixels).save(base / "images" / f"{breed}_{n}.jpg")
                lines.append(f"{breed}_{n} {label} {1 if breed[0].isupper() else 2} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def run_cli(*args, cwd):
    """The CLI in a process of its own, with the hub offline."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(HERE / "advmask.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def run_here(capsys, *args, cwd):
    """The CLI's main() in this process, in cwd, as run_cli runs it in another (a process costs seconds of imports):
    its exit status, stdout and stderr."""
    capsys.readouterr()
    here = os.getcwd()
    os.chdir(cwd)  # not contextlib.chdir, which needs Python 3.11; torch and advmask.py run on 3.10
    try:
        am.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        os.chdir(here)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def refused(capsys, args, status=2):
    """main(args) ends in exit status `status` and one line on stderr, which it returns."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        am.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == status and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A model-config JSON, a checkpoint of that model, and a fabricated Oxford-IIIT Pet tree."""
    root = tmp_path_factory.mktemp("files")
    config = root / "tiny-test-clip.json"
    config.write_text(json.dumps(am.TINY_CLIP))
    torch.save(tiny_clip(7).state_dict(), root / "tiny.pt")
    fabricate_oxford_pets(root / "data")
    fabricate_dtd(root / "data")
    fabricate_eurosat(root / "data")
    return root


def test_cli_trains_and_evaluates_on_a_fabricated_oxford_pets_tree(tiny_files, tmp_path):
    """The real CLI, with a config JSON, a local checkpoint and torchvision's loader, writes sane results and masks;
    with PGD and AutoAttack it adds their per-image worst case (its time: theirs), which summarize shows as a table of
    its own."""
    out = tmp_path / "runs" / "few_shot" / "oxford_pets" / "2shot" / "seed1"
    proc = run_cli("--dataset", "oxford_pets", "--data-root", str(tiny_files / "data"), "--no-download",
                   "--model", str(tiny_files / "tiny-test-clip.json"), "--pretrained", str(tiny_files / "tiny.pt"),
                   "--shots", "2", "--epochs", "3", "--batch-size", "4", "--test-steps", "2", "--device", "cpu",
                   "--workers", "0", "--attack", "pgd,aa", "--out-dir", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step 6/6 | ce" in proc.stdout and "advmask | oxford_pets | pgd-2 eps 1/255 | clean" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "masks.bin", "results.json"]
    results = json.loads((out / "results.json").read_text())
    entries = {e["attack"]: e for e in results["results"]}
    assert list(entries) == ["pgd", "aa", "worst"] and entries["worst"]["attacks"] == ["pgd", "aa"]
    entry = entries["pgd"]
    assert entry["n"] == 2 * len(PET_CLASSES) and entry["eval"] == "oxford_pets" and entry["model"] == "advmask"
    assert 0 <= entry["adv_acc"] <= entry["clean_acc"] <= 1
    assert entry["code"] == {"advmask_sha256": hashlib.sha256((HERE / "advmask.py").read_bytes()).hexdigest(),
                             "torch": torch.__version__}  # the code that measured the cell, and trained the mask
    assert am.read_mask_file(out / "masks.bin")[0]["provenance"]["code"] == entry["code"]
    assert entries["worst"]["adv_acc"] <= min(entries["pgd"]["adv_acc"], entries["aa"]["adv_acc"])
    assert entries["worst"]["seconds"] == entries["pgd"]["seconds"] + entries["aa"]["seconds"]  # its attacks' time
    assert 0 <= results["sparsity"] < 1 and results["settings"]["shots"] == 2 and len(results["train_log"]) == 1
    assert set(results["phases"]) == {"load", "cache", "train", "decode oxford_pets", "eval advmask oxford_pets"}
    assert results["splits"] == {"oxford_pets": {"source": "default"}}
    worst = table(am.summarize(tmp_path / "runs", am.parser_defaults), "worst case per image")
    assert worst[0] == ["oxford_pets", f"{100 * entry['clean_acc']:.1f}", f"{100 * entries['worst']['adv_acc']:.1f}"]
    model = tiny_clip(7)
    am.load_masks(model, out / "masks.bin")
    assert am.mask_sparsity(model) == pytest.approx(results["sparsity"], abs=1e-12)


def test_cli_base2new_and_transfer_protocols(tiny_files, tmp_path, capsys):
    """base2new evaluates base and new classes (with the CLIP baseline, two attacks, two ε); transfer reuses its mask
    zero-shot on other datasets, one entry each."""
    common = ["--data-root", str(tiny_files / "data"), "--no-download",
              "--model", str(tiny_files / "tiny-test-clip.json"), "--pretrained", str(tiny_files / "tiny.pt"),
              "--device", "cpu", "--workers", "0", "--test-steps", "2"]
    proc = run_here(capsys, "--protocol", "base2new", "--shots", "2", "--epochs", "1", "--baseline", "--attack",
                    "pgd,cw", "--test-eps", "1,4", "--out-dir", "b2n", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((tmp_path / "b2n" / "results.json").read_text())["results"]
    assert {(e["model"], e["eval"], e["attack"], e["eps"]) for e in entries} == {
        (m, part, a, eps) for m in ("clip", "advmask") for part in ("base", "new") for a in ("pgd", "cw", "worst")
        for eps in (1, 4)}
    assert all(e["n"] == 2 * len(PET_CLASSES) // 2 for e in entries)  # 2 test images × 2 classes per half
    proc = run_here(capsys, "--protocol", "transfer", "--masks", str(tmp_path / "b2n" / "masks.bin"), "--eval-datasets",
                    "dtd,eurosat", "--out-dir", "transfer", *common, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    entries = json.loads((tmp_path / "transfer" / "results.json").read_text())["results"]
    assert [(e["eval"], e["n"]) for e in entries] == [("dtd", 6), ("eurosat", 9)]


def test_a_masks_file_on_random_weights_is_evaluated_on_those_of_its_own_seed(tmp_path, monkeypatch, capsys):
    """Random base weights (--pretrained none) are drawn from the seed: a transfer run of a --masks file draws them
    from the seed its provenance records, so seed 3's dry-run mask is evaluated (on the weights it was trained on,
    which load_masks checks) without --seed 3, and filed and labelled as seed 3."""
    monkeypatch.chdir(tmp_path)
    am.main([*dry_run_args("trained", 1), "--seed", "3"])
    am.main(["--dry-run", "--protocol", "transfer", "--masks", "trained/masks.bin", "--eval-datasets", "dtd"])
    assert "done | off" in capsys.readouterr().out
    assert json.loads((tmp_path / "runs_dry/transfer/oxford_pets/16shot/seed3/results.json").read_text())["seed"] == 3


def test_tga_zsr_conventions_prompt_the_training_datasets_own_classes_with_tga_zsrs_template(tmp_path, monkeypatch):
    """Under --conventions tga-zsr the training dataset's own class sets (base and new) are prompted with TGA-ZSR's
    template for it, as its transfer targets are, not with CoOp's."""
    monkeypatch.chdir(tmp_path)
    am.main([*dry_run_args("t", 1), "--conventions", "tga-zsr", "--dataset", "cifar10", "--protocol", "base2new"])
    class_sets = json.loads((tmp_path / "t" / "results.json").read_text())["class_sets"]
    assert {name: c["templates"] for name, c in class_sets.items()} == {"base": [am.TGA_ZSR_TEMPLATE],
                                                                        "new": [am.TGA_ZSR_TEMPLATE]}


def test_cli_split_dir_picks_each_datasets_coop_file_and_falls_back(tiny_files, tmp_path, capsys):
    """--split-dir uses split_zhou_OxfordPets.json for the source and split_zhou_DescribableTextures.json for DTD, a
    target whose test set that changes, in one line; EuroSAT, with no file there, keeps its default split and says so
    in one line; results.json records each. --split-json is the source's file alone: a target keeps its default; a
    rerun into its folder without it (other training images) is refused, the mask kept."""
    splits = tmp_path / "coop_splits"
    splits.mkdir()
    pets = {"train": [[f"{b}_{n}.jpg", c, b.lower()] for c, b in enumerate(PET_CLASSES) for n in (1, 2)],
            "val": [], "test": [[f"{b}_100.jpg", c, b.lower()] for c, b in enumerate(PET_CLASSES)]}
    (splits / "split_zhou_OxfordPets.json").write_text(json.dumps(pets))
    dtd = {"train": [], "val": [], "test": [["banded/banded_2000.jpg", 0, "banded"],
                                            ["zigzagged/zigzagged_2001.jpg", 1, "zigzagged"]]}
    (splits / "split_zhou_DescribableTextures.json").write_text(json.dumps(dtd))
    transfer = [*tiny_cli_args(tiny_files), "--protocol", "transfer", "--shots", "2", "--epochs", "1"]
    proc = run_here(capsys, *transfer, "--eval-datasets", "dtd,eurosat", "--split-dir", str(splits), "--out-dir", "out",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if "split_zhou_" in line]  # one line each: what, and which file
    assert len(said) == 2 and re.match(r"dtd: tested on the test list of CoOp's split_zhou_DescribableTextures\.json",
                                       said[0])
    assert re.match(r"eurosat: no CoOp split file split_zhou_EuroSAT\.json .*default split", said[1])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    digest = {f: hashlib.sha256((splits / f).read_bytes()).hexdigest() for f in os.listdir(splits)}
    assert results["splits"] == {
        "oxford_pets": {"source": "coop", "file": "split_zhou_OxfordPets.json",
                        "sha256": digest["split_zhou_OxfordPets.json"]},
        "dtd": {"source": "coop", "file": "split_zhou_DescribableTextures.json",
                "sha256": digest["split_zhou_DescribableTextures.json"]},
        "eurosat": {"source": "default"}}
    assert [(e["eval"], e["n"]) for e in results["results"]] == [("dtd", 2), ("eurosat", 9)]
    proc = run_here(capsys, *transfer, "--eval-datasets", "eurosat", "--split-json",
                    str(splits / "split_zhou_OxfordPets.json"), "--out-dir", "one", cwd=tmp_path)  # the source's file
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "one" / "results.json").read_text())["splits"]["eurosat"] == {"source": "default"}
    mask = (tmp_path / "one" / "masks.bin").read_bytes()  # trained on the file's images: the default's are others
    proc = run_here(capsys, *transfer, "--eval-datasets", "eurosat", "--out-dir", "one", cwd=tmp_path)
    assert proc.returncode == 2 and "one holds a finished run with other training settings (train_split)" in proc.stderr
    assert (tmp_path / "one" / "masks.bin").read_bytes() == mask


def test_the_baseline_is_evaluated_with_no_parameter_requiring_grad(tmp_path, monkeypatch):
    """--baseline evaluates an unmasked CLIP in which no parameter requires grad (attacks keep no activations for
    parameter gradients), beside the masked model, on the same decoded images."""
    seen = []
    evaluate = am.evaluate

    def spy(model, images, labels, *args, **kwargs):
        seen.append((am.visual_tower(model).transformer.resblocks[0].attn.in_proj_weight is not None,
                     any(p.requires_grad for p in model.parameters()), images.data_ptr()))
        return evaluate(model, images, labels, *args, **kwargs)

    monkeypatch.setattr(am, "evaluate", spy)
    monkeypatch.chdir(tmp_path)
    am.main(["--dry-run", "--baseline", "--device", "cpu", "--out-dir", "out"])  # --dry-run: no files, no downloads
    assert [grad for _, grad, _ in seen] == [False, False] and seen[0][2] == seen[1][2]
    entries = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [e["model"] for e in entries] == ["clip", "advmask"] and entries[0]["n"] == 4 * 16


def test_a_seed_fixes_the_mask_whatever_the_evaluation_flags(tmp_path, monkeypatch):
    """Runs with one seed and training settings write byte-identical masks even when their evaluation flags differ
    (--baseline, --test-eps 1 vs 1,2, another attack beside PGD), and the evaluation cell they share reads the same;
    another seed gives another mask but, under --eval-limit, the same class-balanced test images. Training and each
    cell draw from generators of their own. (The runs share this process, as they would share torch's global
    generator if anything still drew from it.)"""
    common = ["--dry-run", "--epochs", "4", "--lr", "0.01", "--device", "cpu", "--eval-limit", "10"]
    runs = {"a": ["--seed", "3", "--test-eps", "1"],
            "b": ["--seed", "3", "--baseline", "--test-eps", "1,2", "--attack", "cw,pgd"],
            "c": ["--seed", "4", "--test-eps", "1"]}
    monkeypatch.chdir(tmp_path)
    decoded = []  # (test set, indices) of the last cache_images call of each run: its test images
    cache = am.cache_images
    monkeypatch.setattr(am, "cache_images", lambda ds, idx, *a: decoded.append((ds, list(idx))) or cache(ds, idx, *a))
    for name, flags in runs.items():
        am.main([*common, *flags, "--out-dir", name])
        test_set, chosen = decoded[-1]
        assert chosen == am.balanced_subset(test_set.targets, 10)  # whose own properties are tested above
        assert sorted(collections.Counter(test_set.targets[i] for i in chosen).values()) == [2, 2, 3, 3]
    assert decoded[-1][1] == decoded[1][1] and len(decoded[1][1]) == 10  # --eval-limit: the same images, seed 3 or 4
    masks = {d: (tmp_path / d / "masks.bin").read_bytes() for d in runs}
    assert masks["a"] == masks["b"] != masks["c"]
    cells = {}
    for d in "ab":
        results = json.loads((tmp_path / d / "results.json").read_text())
        cells[d] = [(e["clean_acc"], e["adv_acc"]) for e in results["results"]
                    if (e["model"], e["attack"], e["eps"]) == ("advmask", "pgd", 1.0)]
        assert results["sparsity"] > 0
    assert len(cells["a"]) == 1 and cells["a"] == cells["b"]


def tiny_cli_args(files):
    return ["--model", str(files / "tiny-test-clip.json"), "--pretrained", str(files / "tiny.pt"), "--no-download",
            "--data-root", str(files / "data"), "--device", "cpu", "--workers", "0", "--test-steps", "1"]


def test_fap_conventions_train_on_dassls_draw_and_evaluate_fp16_in_batches_of_200(tiny_files, tmp_path, monkeypatch):
    """--conventions fap: base2new trains on exactly the images Dassl's draw picks from the CoOp file's train list
    (every class drawn, the base ones kept), evaluates in fp16 in test batches of 200, records both in each cell,
    and summarize tables those cells under that heading; a rerun with another test batch evaluates anew, the
    --baseline's CLIP in fp16 too."""
    monkeypatch.chdir(tmp_path)
    splits = tmp_path / "splits"
    splits.mkdir()
    train = [[f"{b}_{n}.jpg", c, b.lower()] for n in (1, 2, 3) for c, b in enumerate(PET_CLASSES)]  # interleaved
    test = [[f"{b}_{n}.jpg", c, b.lower()] for c, b in enumerate(PET_CLASSES) for n in (100, 101)]
    (splits / "split_zhou_OxfordPets.json").write_text(json.dumps({"train": train, "val": [], "test": test}))
    cached, cache = [], am.cache_images
    monkeypatch.setattr(am, "cache_images", lambda ds, idx, *a: cached.append(list(idx)) or cache(ds, idx, *a))
    args = [*tiny_cli_args(tiny_files), "--conventions", "fap", "--split-dir", str(splits), "--protocol", "base2new",
            "--shots", "2", "--seed", "3", "--epochs", "1", "--out-dir", "runs/base2new/oxford_pets/2shot/seed3"]
    am.main(args)
    random.seed(3)
    drawn = dassl_generate_fewshot_dataset([(i, label) for i, (_, label, _) in enumerate(train)], 2)
    assert cached[0] == [i for i, label in drawn if label < 2] and len(cached[0]) == 4
    results = json.loads((tmp_path / "runs/base2new/oxford_pets/2shot/seed3/results.json").read_text())
    assert {(e["eval"], e["eval_precision"], e["test_batch"]) for e in results["results"]} == {
        ("base", "fp16", 200), ("new", "fp16", 200)}
    evaluated, evaluate = [], am.evaluate  # the dtype of each model evaluated: the baseline's converted too
    monkeypatch.setattr(am, "evaluate", lambda m, *a, **k: evaluated.append(m.clip.visual.conv1.weight.dtype) or
                        evaluate(m, *a, **k))
    am.main([*args, "--eval-batch-size", "2", "--baseline"])
    assert evaluated == [torch.float16] * 4  # CLIP and AdvMask on the base and the new classes
    results = json.loads((tmp_path / "runs/base2new/oxford_pets/2shot/seed3/results.json").read_text())
    assert sorted(e["test_batch"] for e in results["results"] if e["model"] == "advmask") == [2, 2, 200, 200]
    summary = am.summarize(tmp_path / "runs", am.parser_defaults)
    assert "fp16 evaluation; test batch 200;" in summary and "fp16 evaluation; test batch 2;" in summary


def test_tune_weights_runs_saves_its_weights_and_transfer_evaluates_them(tiny_files, tmp_path, monkeypatch):
    """A --tune weights run trains with its own learning-rate default, writes weights.bin (no masks.bin) and results
    under the name adv_ft; --protocol transfer --weights evaluates the file; summarize calls the model "adversarial
    fine-tuning" and shows the learning rate."""
    monkeypatch.chdir(tmp_path)
    am.main([*tiny_cli_args(tiny_files), "--tune", "weights", "--epochs", "2", "--shots", "2",
             "--out-dir", "runs/few_shot/oxford_pets/2shot/seed1"])
    run = tmp_path / "runs" / "few_shot" / "oxford_pets" / "2shot" / "seed1"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "results.json", "weights.bin"]
    results = json.loads((run / "results.json").read_text())
    assert {e["model"] for e in results["results"]} == {"adv_ft"} and results["settings"]["lr"] == am.WEIGHTS_LR
    tuned = am.ClipClassifier(tiny_clip(7), ["a"], ["{}"])  # tiny.pt's weights
    am.load_weights(tuned, run / "weights.bin")
    am.main([*tiny_cli_args(tiny_files), "--protocol", "transfer", "--weights", str(run / "weights.bin"),
             "--eval-datasets", "dtd", "--out-dir", "t"])
    transfer = json.loads((tmp_path / "t" / "results.json").read_text())
    assert [(e["model"], e["eval"]) for e in transfer["results"]] == [("adv_ft", "dtd")]
    assert "| adversarial fine-tuning (lr 1e-05) | oxford_pets |" in am.summarize(tmp_path / "runs", am.parser_defaults)


def test_a_corrupt_image_ends_in_one_line_and_the_rerun_evaluates_without_training(tiny_files, tmp_path, monkeypatch,
                                                                                    capsys):
    """A truncated test image: one line naming the file and how to restore it, exit 2 after training, with the mask
    kept; once the file is whole again the same command evaluates without a training step."""
    data = tmp_path / "data"
    fabricate_oxford_pets(data)
    image = data / "oxford-iiit-pet" / "images" / "Bengal_100.jpg"
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) // 3])
    monkeypatch.chdir(tmp_path)
    args = [*tiny_cli_args(tiny_files), "--data-root", str(data), "--shots", "2", "--epochs", "2", "--out-dir", "out"]
    err = refused(capsys, args)
    assert f"advmask: error: {image} does not decode" in err
    assert "restore that file from the dataset's archive" in err and "delete" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "masks.bin", "results.json"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is False
    mask = (tmp_path / "out" / "masks.bin").read_bytes()
    image.write_bytes(whole)
    am.main(args)
    out = capsys.readouterr().out
    assert "reusing out/masks.bin, trained by an earlier run" in out and "step " not in out
    assert json.loads((tmp_path / "out" / "results.json").read_text())["complete"] is True
    assert (tmp_path / "out" / "masks.bin").read_bytes() == mask


def test_a_failure_keeps_every_finished_cell_and_the_rerun_evaluates_only_the_rest(tiny_files, tmp_path, monkeypatch,
                                                                                   capsys):
    """A transfer run over three datasets whose third has an unreadable test image: after the error results.json
    holds the first two cells, marked incomplete; once the image is restored the same command trains nothing,
    keeps those two cells as they were and evaluates the third alone."""
    data = tmp_path / "data"
    fabricate_oxford_pets(data)
    fabricate_dtd(data)
    fabricate_eurosat(data)
    image = data / "oxford-iiit-pet" / "images" / "Bengal_100.jpg"
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) // 3])
    monkeypatch.chdir(tmp_path)
    args = [*tiny_cli_args(tiny_files), "--data-root", str(data), "--protocol", "transfer", "--eval-datasets",
            "dtd,eurosat,oxford_pets", "--shots", "2", "--epochs", "2", "--out-dir", "out"]
    with pytest.raises(SystemExit):
        am.main(args)
    first = json.loads((tmp_path / "out" / "results.json").read_text())
    assert first["complete"] is False and [e["eval"] for e in first["results"]] == ["dtd", "eurosat"]
    capsys.readouterr()
    image.write_bytes(whole)
    am.main(args)
    out = capsys.readouterr().out
    assert "step " not in out and "reusing 2 finished cells" in out
    assert "| dtd |" not in out and "| eurosat |" not in out and "advmask | oxford_pets |" in out
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["complete"] is True and again["results"][:2] == first["results"]
    assert [e["eval"] for e in again["results"]] == ["dtd", "eurosat", "oxford_pets"]


def test_a_finished_run_evaluated_again_with_another_attack_keeps_its_mask_and_cells(tmp_path, monkeypatch, capsys):
    """The same command with --attack pgd,cw after a PGD run, on another device of the same kind (cpu:0 after cpu, as
    cuda:1 after cuda): masks.bin byte for byte, the PGD cell as it was, the CW cell and the per-image worst case over
    both added, no training step, and a checkpoint left beside the saved mask (a kill between the two) gone; with
    --attack cw,pgd then, every cell is reused (the worst case is over a set), no test image decoded and no evaluation
    phase timed; with a third attack, a worst case over the three is added, and summarize tables each set apart."""
    monkeypatch.chdir(tmp_path)
    run = "runs/few_shot/oxford_pets/16shot/seed1"
    am.main([*dry_run_args(run, 2), "--device", "cpu"])
    mask = (tmp_path / run / "masks.bin").read_bytes()
    before = json.loads((tmp_path / run / "results.json").read_text())
    capsys.readouterr()
    (tmp_path / run / "checkpoint.pt").write_bytes(b"left by a kill after the mask was saved")
    am.main([*dry_run_args(run, 2), "--attack", "pgd,cw", "--device", "cpu:0"])
    assert "step " not in capsys.readouterr().out and (tmp_path / run / "masks.bin").read_bytes() == mask
    assert not (tmp_path / run / "checkpoint.pt").exists()  # the saved mask supersedes it
    after = json.loads((tmp_path / run / "results.json").read_text())
    assert after["results"][0] == before["results"][0] and [e["attack"] for e in after["results"]] == [
        "pgd", "cw", "worst"]
    pgd, cw, worst = after["results"]
    assert {e["test_set"]["indices_sha256"] for e in after["results"]} == {  # the test images evaluated, recorded
        hashlib.sha256(json.dumps(list(range(pgd["n"]))).encode()).hexdigest()}
    both = [np.unpackbits(np.frombuffer(bytes.fromhex(e["correct"]), np.uint8), count=e["n"]) for e in (pgd, cw)]
    assert worst["adv_acc"] == (both[0] & both[1]).mean() and worst["attacks"] == ["pgd", "cw"]
    am.main([*dry_run_args(run, 2), "--attack", "cw,pgd", "--device", "cpu"])
    assert "reusing 3 finished cells" in capsys.readouterr().out
    reused = json.loads((tmp_path / run / "results.json").read_text())
    assert reused["results"] == after["results"] and not any(p.startswith(("decode", "eval")) for p in reused["phases"])
    am.main([*dry_run_args(run, 2), "--attack", "pgd,cw,apgd-ce", "--device", "cpu"])
    summary = am.summarize(tmp_path / "runs", am.parser_defaults)
    for attacks in ("PGD,CW", "PGD,CW,APGD-CE"):
        assert table(summary, f"worst case per image over {attacks} ε")[0][0] == "oxford_pets"


def test_a_mask_file_run_is_labelled_by_the_file_and_never_takes_its_trainers_folder(tiny_files, tmp_path, monkeypatch,
                                                                                     capsys):
    """--masks FILE takes its source dataset, shots, seed and learning rate from the file's header, which names its
    default folder and labels its results; into the folder of the run that trained the file (a transfer run's own
    default) it is refused, --overwrite or not (which would delete the file it evaluates), leaving the folder as it
    was."""
    monkeypatch.chdir(tmp_path)
    am.main([*tiny_cli_args(tiny_files), "--shots", "2", "--seed", "4", "--lr", "3e-3", "--epochs", "1",
             "--out-dir", "trained"])
    finished = {p.name: p.read_bytes() for p in (tmp_path / "trained").iterdir()}
    capsys.readouterr()
    for overwrite in ([], ["--overwrite"]):
        err = refused(capsys, [*tiny_cli_args(tiny_files), "--protocol", "transfer", "--masks", "trained/masks.bin",
                               "--eval-datasets", "dtd", "--out-dir", "trained", *overwrite])
        assert "trained/masks.bin is the trained file of trained, which this run would take over" in err
        assert {p.name: p.read_bytes() for p in (tmp_path / "trained").iterdir()} == finished
    am.main([*tiny_cli_args(tiny_files), "--protocol", "transfer", "--masks", "trained/masks.bin",
             "--eval-datasets", "dtd"])  # --shots 16, --seed 1 and --lr by default: the file says otherwise
    assert "trained/masks.bin was trained on oxford_pets, 2 shots, seed 4, lr 0.003" in capsys.readouterr().out
    results = json.loads((tmp_path / "runs/transfer/oxford_pets/2shot/seed4/results.json").read_text())
    assert (results["shots"], results["seed"], results["settings"]["lr"]) == (2, 4, 3e-3)
    assert "trained on oxford_pets, 2 shots" in am.summarize(tmp_path / "runs", am.parser_defaults)


def test_a_fixed_seed_cpu_run_is_deterministic_and_trains_as_it_always_has(tmp_path, monkeypatch):
    """The reference run: a fixed-seed CPU dry run writes the same masks.bin twice in one process, and its log and
    accuracies stay within a hair of the values recorded before the refactors that were not meant to change training.
    The tolerances hold across CPU kernels (ATen's default, AVX2 and AVX-512 builds differ by at most 0.01 % of the
    mask, 1 % of the regulariser and one test image), while dropping λ, one PGD step, LAFA's clean targets or the
    schedule moves a value well past them. Byte identity across commits is a check run on one machine (README)."""
    monkeypatch.chdir(tmp_path)
    for out in ("ref", "again"):
        am.main(["--dry-run", "--device", "cpu", "--lr", "1e-3", "--epochs", "20", "--out-dir", out])
    assert (tmp_path / "ref" / "masks.bin").read_bytes() == (tmp_path / "again" / "masks.bin").read_bytes()
    results = json.loads((tmp_path / "ref" / "results.json").read_text())
    expected = [{"step": 20, "ce": 1.40115, "reg": 0.000805, "adv_acc": 0.2578, "off": 0.28445},
                {"step": 40, "ce": 1.28467, "reg": 0.001092, "adv_acc": 0.4422, "off": 0.29465}]
    assert len(results["train_log"]) == len(expected)
    for row, want in zip(results["train_log"], expected):
        assert row["step"] == want["step"]
        assert row["ce"] == pytest.approx(want["ce"], rel=0.005)
        assert row["reg"] == pytest.approx(want["reg"], rel=0.05)
        assert abs(row["adv_acc"] - want["adv_acc"]) < 0.02 and abs(row["off"] - want["off"]) < 0.002
    [entry] = results["results"]  # 64 test images, 1/64 each (recorded anew when drawn apart from training)
    assert abs(entry["clean_acc"] - 0.25) < 1.5 / 64 and abs(entry["adv_acc"] - 0.046875) < 1.5 / 64


def test_every_setting_a_run_records_has_a_role_in_the_settings_table(tiny_files, tmp_path, monkeypatch):
    """Every setting of a run's config.json (each parser flag, whatever run adds) is in SETTINGS, so a new flag cannot
    silently stay out of the training check, a cell's key or a summary's basis; and the lists the code compares are
    the table's roles."""
    monkeypatch.chdir(tmp_path)
    am.main(["--dry-run", "--epochs", "1", "--baseline", "--out-dir", "a"])
    am.main(["--dry-run", "--protocol", "transfer", "--masks", "a/masks.bin", "--eval-datasets", "dtd",
             "--out-dir", "b"])
    recorded = set(json.loads((tmp_path / "a" / "config.json").read_text()))
    recorded |= set(json.loads((tmp_path / "b" / "config.json").read_text()))
    parsed = set(vars(am.parse_args(["--baseline", "local-dir:x"]))) | set(vars(am.parse_args(["--dry-run"])))
    assert parsed <= recorded and recorded - {"baseline_identity"} <= set(am.SETTINGS)
    assert "baseline_identity" in am.SETTINGS  # recorded by a --baseline model folder's run
    roles = {k: roles.split() for k, (roles, _) in am.SETTINGS.items()}
    assert all(set(r) <= {"train", "cell", "basis", "tuned", "source"} for r in roles.values())
    assert set(am.CELL_SETTINGS) == {k for k, r in roles.items() if "cell" in r} <= am.EVAL_ONLY
    assert am.EVAL_ONLY == {k for k, r in roles.items() if "train" not in r} and set(am.PROVENANCE) <= set(roles)
    assert all(k in roles and "train" not in roles[k] for k in ("attack", "test_eps", "model", "masks", "out_dir"))


def test_eval_dataset_presets_expand_through_the_parser():
    """--eval-datasets: tga-zsr is TGA-ZSR's 16 (its TGA-ZSR.py list, in our names), coop the CoOp suite less
    ImageNet (the default), imagenet-shifts the four shifted sets; names and presets mix, repeats dropped, and the
    expansion is recorded."""
    tga_zsr = {"tinyImageNet": "tinyimagenet", "cifar10": "cifar10", "cifar100": "cifar100", "STL10": "stl10",
               "Food101": "food101", "oxfordpet": "oxford_pets", "flowers102": "flowers102", "dtd": "dtd",
               "EuroSAT": "eurosat", "fgvc_aircraft": "fgvc_aircraft", "Caltech101": "caltech101",
               "Caltech256": "caltech256", "StanfordCars": "stanford_cars", "PCAM": "pcam", "ImageNet": "imagenet",
               "SUN397": "sun397"}
    args = am.parse_args(["--eval-datasets", "tga-zsr"])
    assert args.eval_datasets == list(tga_zsr.values()) and args.eval_presets == {"tga-zsr": list(tga_zsr.values())}
    coop = ["caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft", "sun397", "dtd",
            "eurosat", "ucf101"]
    assert am.parse_args([]).eval_datasets == am.parse_args(["--eval-datasets", "coop"]).eval_datasets == coop
    assert am.parse_args(["--eval-datasets", "dtd,imagenet-shifts,dtd"]).eval_datasets == [
        "dtd", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    tga = am.parse_args(["--conventions", "tga-zsr", "--dataset", "tinyimagenet", "--split-dir", str(HERE)])
    assert tga.eval_datasets == list(tga_zsr.values()) and tga.split_dir is None  # TGA-ZSR's own, CoOp's ignored


def test_synthetic_runs_at_the_real_size_of_the_dataset(tiny_files, tmp_path, capsys):
    """--synthetic gives DTD's 47 classes, a K-shot training set and all 1,880 test images (decoded by two loader
    workers, the one run here that starts them: a set of one batch is decoded in the process), every phase timed, in
    runs_synthetic/ by default."""
    proc = run_here(capsys, "--synthetic", "--dataset", "dtd", "--model", str(tiny_files / "tiny-test-clip.json"),
                    "--pretrained", "none", "--shots", "1", "--epochs", "1", "--test-steps", "1", "--device", "cpu",
                    "--workers", "2", "--eval-batch-size", "512", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "47 training images (1 per class, 47 classes)" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["runs_synthetic"]  # a folder of its own, as a dry run's
    results = json.loads((tmp_path / "runs_synthetic/few_shot/dtd/1shot/seed1/results.json").read_text())
    assert am.DATASET_SIZES["dtd"] == (47, 1880) and results["results"][0]["n"] == 1880
    assert set(results["phases"]) == {"load", "cache", "train", "decode dtd", "eval advmask dtd"}
    assert all(s > 0 for s in results["phases"].values()) and results["splits"] == {"dtd": {"source": "synthetic"}}
    assert any(line.startswith("time | load ") for line in proc.stdout.splitlines())


def test_run_all_dry_sweep_summarises_and_its_cells_get_every_flag(tmp_path):
    """run_all.sh --dry-run on one dataset, one shot count and one seed runs with the interpreter PYTHON names (the
    `python` on PATH is a decoy that fails), from the caller's folder (a relative RUNS is the caller's), passes the
    arguments after -- (here --split-dir) to every cell and writes the summary. Its own logic then, with an
    interpreter that records its calls: every cell is called again (a done run decides what it lacks), each with the
    flags after -- and then its own, its log appended to, the --tune weights arm in seed<S>-weights folders; a failing
    cell makes it exit 1, listed, and a summary summarize refuses leaves none; with --gpus, the job of each GPU runs
    every n-th cell with that GPU alone visible and on it (--device cuda: never the CPU fallback of a GPU it cannot
    see), and with no flags after -- a cell gets its own flags and that one alone."""
    decoy = tmp_path / "bin" / "python"
    decoy.parent.mkdir()
    decoy.write_text("#!/bin/sh\necho 'the python on PATH ran instead of $PYTHON' >&2\nexit 3\n")
    decoy.chmod(0o755)
    env = {**os.environ, "RUNS": "runs", "PYTHON": sys.executable,
           "PATH": f"{decoy.parent}{os.pathsep}{os.environ['PATH']}"}
    (tmp_path / "coop").mkdir()

    def sweep(datasets="dtd", *extra, seeds="1 2"):  # --datasets, --shots, --seeds before --dry-run: they still apply
        return subprocess.run(["bash", str(HERE / "run_all.sh"), "--datasets", datasets, "--shots", "1", "--seeds",
                               seeds, "--dry-run", "--", "--split-dir", str(tmp_path / "coop"), "--epochs", "2",
                               *extra], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    proc = sweep(seeds="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = tmp_path / "runs"
    done = sorted(runs.glob("few_shot/*/*shot/seed*/results.json"))
    assert len(done) == 1 and proc.stdout.count("run  ") == 1
    configs = [json.loads((p.parent / "config.json").read_text()) for p in done]
    assert all(c["split_dir"] == str(tmp_path / "coop") for c in configs)
    rows = {r[0]: r[1:] for r in table((runs / "summary.md").read_text(), "few_shot")}
    assert set(rows) == {"dtd", "**Average**"} and all("—" not in c for c in rows["dtd"])
    assert (runs / "summary.png").is_file()
    recorder = tmp_path / "bin" / "recorder"  # fails the cells of "broken" and summarize, records the others
    recorder.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path / "calls.txt"}\n'
                        f'case "$*" in *"--dataset broken"*|*summarize*) exit 2;; esac\n')
    recorder.chmod(0o755)
    env["PYTHON"] = str(recorder)
    log = (runs / "few_shot" / "dtd" / "1shot" / "seed1" / "log.txt").read_text()
    for arm, extra in (("", ["--attack", "pgd,cw"]), ("-weights", ["--tune", "weights"])):
        proc = sweep("broken dtd", *extra)
        assert proc.returncode == 1 and proc.stdout.count("FAILED ") == 2, proc.stdout + proc.stderr
        assert "2 cell(s) failed:" in proc.stderr and f"runs/few_shot/broken/1shot/seed2{arm}\n" in proc.stderr
        calls = (tmp_path / "calls.txt").read_text().splitlines()[-5:]
        assert calls[-1] == f"{HERE / 'advmask.py'} summarize runs"
        for call, cell in zip(calls, [f"{d}/1shot/seed{seed}" for d in ("broken", "dtd") for seed in (1, 2)]):
            flags = ["--dry-run", "--device", "cpu", "--split-dir", str(tmp_path / "coop"), "--epochs", "2", *extra]
            assert " ".join(flags) in call and call.endswith(f"--out-dir runs/few_shot/{cell}{arm}"), call
        assert not (runs / "summary.md").exists()  # refused: no stale table is left to be taken for this sweep's
    assert (runs / "few_shot" / "dtd" / "1shot" / "seed1" / "log.txt").read_text().startswith(log)  # appended to
    assert (runs / "few_shot" / "dtd" / "1shot" / "seed1-weights" / "log.txt").is_file()
    recorder.write_text(f'#!/bin/sh\necho "GPU=$CUDA_VISIBLE_DEVICES $*" >> {tmp_path / "gpus.txt"}\n')
    proc = subprocess.run(["bash", str(HERE / "run_all.sh"), "--datasets", "dtd eurosat", "--shots", "1", "--seeds",
                           "1 2", "--gpus", "3 5"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    cells = [line for line in (tmp_path / "gpus.txt").read_text().splitlines() if "--out-dir" in line]
    # GPU i of the list takes cells i, i + n, ... (seed 1 on GPU 3, 2 on GPU 5); no flags after --: the cell's, on cuda
    assert proc.returncode == 0 and sorted(cells) == [
        f"GPU={gpu} {HERE / 'advmask.py'} --device cuda --protocol few_shot --dataset {d} --shots 1 --seed {seed} "
        f"--out-dir runs/few_shot/{d}/1shot/seed{seed}" for gpu, seed in ((3, 1), (5, 2)) for d in ("dtd", "eurosat")]


def test_sweeps_sharing_a_runs_folder_report_only_their_own_failed_cells(tmp_path):
    """Two run_all.sh sweeps into one RUNS at once (a Slurm array runs one a cell): the one whose cell fails while the
    other's runs exits 1 naming it, and the other exits 0, naming none; no failure record is left behind."""
    recorder = tmp_path / "python"  # fails the cell of "broken"; holds the cell of "slow" until the file "go" exists
    recorder.write_text(f'#!/bin/sh\ncase "$*" in *"--dataset broken"*) exit 2;; *"--dataset slow"*) '
                        f'touch {tmp_path / "started"}; while [ ! -e {tmp_path / "go"} ]; do sleep 0.05; done;; esac\n')
    recorder.chmod(0o755)
    env = {**os.environ, "RUNS": str(tmp_path / "runs"), "PYTHON": str(recorder)}
    sweep = ["bash", str(HERE / "run_all.sh"), "--shots", "1", "--seeds", "1", "--dry-run", "--datasets"]
    slow = subprocess.Popen([*sweep, "slow"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "started").exists():
        assert slow.poll() is None, slow.communicate()
        time.sleep(0.05)
    broken = subprocess.run([*sweep, "broken"], env=env, capture_output=True, text=True, timeout=60)
    (tmp_path / "go").touch()
    out, err = slow.communicate(timeout=60)
    assert broken.returncode == 1 and broken.stderr.endswith(f"failed:\n{tmp_path}/runs/few_shot/broken/1shot/seed1\n")
    assert slow.returncode == 0 and err == "", out + err
    assert not list((tmp_path / "runs").glob(".failed_cells*"))


def test_run_all_usage_errors_are_one_line_and_exit_2(tmp_path, tmp_path_factory):
    """run_all.sh with an unknown option, with an option's value missing, with a flag it sets per cell after --
    (which would give every cell one seed, say), with a value listed twice (whose cells would run twice, at once
    under --gpus), with a cell that advmask.py's parser refuses (a dataset's name mistyped), with a --gpus id that is
    not one of the job's GPUs (outside a Slurm job's list), with an interpreter that lacks advmask.py's packages, or
    with a runs folder it cannot write, ends in one line that says what to do and exit status 2, before any run and
    with nothing written."""
    bare = tmp_path_factory.mktemp("bin") / "python"  # this Python without its site-packages: no torch, no open_clip
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    # (arguments, message[, CUDA_VISIBLE_DEVICES, else none visible])
    cases = [(["--bogus"], "unknown option --bogus"), (["--dry-run", "--shots"], "--shots needs a value"),
             (["--dry-run", "--", "--seed=7"], "--seed after -- would give every cell the same value; use run_all.sh's "
                                               "own option"),
             (["--dry-run", "--seeds", "1 2 1"], "--seeds lists 1 twice; give each value once"),
             (["--datasets", "dtd eurosat dtd"], "--datasets lists dtd twice; give each value once"),
             (["--dry-run", "--datasets", "dtd oxford_pest", "--", "--epochs", "2"],
              "the cell few_shot oxford_pest 1-shot seed 1: argument --dataset: invalid choice"),
             (["--dry-run", "--python", str(bare)], f"{sys.executable} has no open_clip, which"),
             (["--dry-run", "--runs", "/dev/null/runs", "--python", "true"],  # `true`: any cell passes
              "cannot write to /dev/null/runs; pass --runs a folder you can write to"),
             # a job's GPUs 2 and 3 (a space in the list, as a hand-set one may have): GPU 0 is another job's (where
             # none is visible, every id is refused so)
             (["--datasets", "dtd", "--shots", "1", "--seeds", "1", "--gpus", "3 0"],
              "--gpus lists 0, which is not a GPU of this job (CUDA_VISIBLE_DEVICES=2, 3)", "2, 3")]
    for args, message, *visible in cases:
        proc = subprocess.run(["bash", str(HERE / "run_all.sh"), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "PYTHON": sys.executable,
                                               "CUDA_VISIBLE_DEVICES": "".join(visible)})
        assert (proc.returncode, proc.stdout, proc.stderr.count("\n")) == (2, "", 1), proc.stdout + proc.stderr
        assert proc.stderr.startswith(f"run_all.sh: {message}") and proc.stderr.endswith("; see run_all.sh --help\n")
    assert list(tmp_path.iterdir()) == []


def bad_input_cases(files):
    """(arguments, message) for every user error the CLI must turn into one line and exit status 2."""
    tiny = tiny_cli_args(files)
    transfer = [*tiny, "--protocol", "transfer", "--eval-datasets", "dtd"]
    return [  # each with the key fact of its message: the flag or file it names, and what to do
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["--shots", "0"], "--shots: must be a positive integer"),
        ([*tiny, "--shots", "5"], "ask for at most 3 with --shots"),
        (["--train-eps", "-1"], "--train-eps: -1 is in /255 units and must lie in"),
        (["--test-alpha", "256"], "--test-alpha: 256 is in /255 units and must lie in"),
        (["--test-eps", "1,300"], "--test-eps: 300 is in /255 units and must lie in"),
        (["--test-steps", "-1"], "--test-steps: must be 0 or more"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--seed", "-1"], "--seed: must be 0 or more, not -1"),
        (["--seed", str(2**64)], f"--seed: must be at most {2**64 - 1}, not {2**64}"),
        (["--lam", "-1"], "--lam: must be 0 or more"),
        (["--lr", "0"], "--lr: must be positive, not 0"),
        (["--lr", "inf"], "--lr: must be a finite number, not inf"),
        (["--lam", "nan"], "--lam: must be a finite number, not nan"),
        (["--mask-target", "heads"], "argument --mask-target: invalid choice: 'heads'"),
        (["--loss", "ce+trades"], "argument --loss: invalid choice: 'ce+trades'"),
        (["--attack", "fgsm"], "--attack: fgsm is not one of pgd, cw, apgd-ce, apgd-dlr, apgd-t, aa"),
        ([*tiny, "--protocol", "base2new", "--attack", "pgd,aa"], "'base' has 2 classes, fewer than the 4 that aa's"),
        ([*tiny, "--protocol", "base2new", "--attack", "apgd-dlr"], "'base' has 2 classes, fewer than the 3 that"),
        (["--split-dir", str(files / "nowhere")], f"--split-dir {files / 'nowhere'} is not a folder"),
        (["--dry-run", "--split-json", str(files / "nowhere.json")], f"--split-json {files / 'nowhere.json'} is not a"),
        (["--eval-precision", "fp64"], "argument --eval-precision: invalid choice: 'fp64'"),
        (["--conventions", "fap"], "pass --split-dir (the folder"),
        (["--conventions", "fap", "--split-dir", str(files), "--dataset", "imagenet"], "--split-dir (the folder"),
        (["--conventions", "fap", "--split-dir", str(files), "--protocol", "transfer"], "--split-dir (the folder"),
        ([*tiny, "--conventions", "fap", "--split-dir", str(files)], "no CoOp split file split_zhou_OxfordPets.json"),
        (["--split-dir", str(files), "--split-json", str(files / "tiny.pt")], "(a folder for every dataset), not both"),
        (["--device", "cuda:99", "--dry-run"], "--device: cuda:99 was asked for but"),
        (["--device", f"cuda:{torch.cuda.device_count()}"], "CUDA devices are visible"),  # one past the last GPU
        (["--device", "mps"], "argument --device: 'mps' is not cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "argument --device: 'cuda:x' is not cpu, cuda or cuda:N"),
        ([*tiny, "--data-root", str(files / "nowhere")], "it is read from oxford-iiit-pet/images/<Breed>_<n>.jpg"),
        ([*tiny, "--dataset", "tinyimagenet", "--data-root", str(files / "nowhere")], "tinyimagenet could not be"),
        ([*tiny, "--dataset", "tinyimagenet", "--data-root", str(files / "tiny-broken")],
         "val_annotations.txt names val_0.JPEG of n02124075, which is not in val/images/"),
        (["--eval-datasets", "dtd,tga_zsr"], "--eval-datasets: tga_zsr is not one of coop, tga-zsr"),
        (["--eval-limit", "0"], "--eval-limit: must be a positive integer"),
        (["--conventions", "clip"], "argument --conventions: invalid choice: 'clip'"),
        (["--conventions", "tga-zsr"], "--conventions tga-zsr trains where TGA-ZSR's code can (tinyimagenet, "),
        (["--conventions", "tga-zsr", "--protocol", "transfer", "--dataset", "cifar10", "--eval-datasets", "ucf101"],
         "not ucf101; evaluate it in a run under --conventions coop"),
        (["--conventions", "tga-zsr", "--dataset", "cifar10", "--split-json", str(files / "tiny.pt")],
         "--split-json gives CoOp's split"),
        (["--tune", "scores"], "argument --tune: invalid choice: 'scores'"),
        (["--benchmark", "memory"], "argument --benchmark: invalid choice: 'memory'"),
        (["--benchmark", "--model", "ViT-B-16-SigLIP"], "CLIP ViT from a config name or JSON, which ViT-B-16-SigLIP"),
        ([*transfer[:-1], "imagenet_r"], "none of them lists 1000 wnids here"),
        (["--pretrained", str(files / "missing.pt")], "is neither an open_clip tag of ViT-B-32"),
        (["--model", str(files / "missing.json")], "missing.json is unreadable (FileNotFoundError)"),
        (["--model", str(files / "garbage.json")], "garbage.json is unreadable (JSONDecodeError)"),
        (["--model", str(files / "unbuildable.json")],
         "unbuildable.json is not a config that open_clip builds and runs (ZeroDivisionError"),
        (["--model", str(files / "unrunnable.json")],
         "unrunnable.json is not a config that open_clip builds and runs (RuntimeError: "),  # torch's words vary
        (["--model", str(files / "textless.json")],
         "textless.json is not a config that open_clip builds and runs (IndexError: "),
        (["--model", str(files / "few-tokens.json"), "--pretrained", str(files / "few-tokens.pt")],
         "few-tokens.json embeds 1000 tokens, fewer than its tokenizer's 49408; give its text_cfg a vocab_size"),
        (["--model", f"local-dir:{files / 'two-means'}"],
         "two-means is not a config that open_clip builds and runs (RuntimeError: shape '[1, 3, 1, 1]'"),
        (["--model", str(files / "other.json")], "other.json is not an open_clip model config"),
        ([*tiny, "--pretrained", str(files / "other.pt")], "is not a state dict of tiny-test-clip (Error(s) in"),
        ([*tiny, "--pretrained", str(files / "garbage.pt")], "is not a state dict of tiny-test-clip (not a torch"),
        ([*tiny, "--split-json", str(files / "garbage.pt")], "is not a readable CoOp split JSON"),
        ([*tiny, "--split-json", str(files / "no-test.json")], "class set 'oxford_pets' has no test images"),
        ([*transfer, "--masks", str(files / "masks-cut.bin")], "truncated"),
        ([*transfer, "--masks", str(files / "run")], f"mask file {files / 'run'} does not exist; pass {files}/run/m"),
        ([*transfer, "--masks", str(files / "masks-flipped.bin")], "fails its checksum"),
        ([*transfer, "--masks", str(files / "masks-other-arch.bin")], "made for VisionTransformer(layers=2, width=32"),
        ([*transfer, "--masks", str(files / "masks-mlp.bin")], "covers the mlp weights; pass --mask-target mlp"),
        ([*transfer, "--weights", str(files / "weights-mlp.bin")], "covers the mlp weights; pass --mask-target mlp"),
        (["--masks", str(files / "masks-mlp.bin")], "--masks goes with --protocol transfer"),
        (["--weights", str(files / "weights.bin")], "--weights goes with --protocol transfer"),
        ([*transfer, "--weights", str(files / "weights-cut.bin")], "truncated"),
        ([*transfer, "--weights", str(files / "weights-other-arch.bin")], "made for VisionTransformer(layers=2, "),
        ([*transfer, "--weights", str(files / "masks.bin")], "is an advmask mask file, not a weights file; evaluate "
                                                              "it with --masks"),
        ([*transfer, "--weights", str(files / "weights.bin"), "--tune", "mask"], "--weights evaluates a --tune"),
        ([*transfer, "--masks", str(files / "masks.bin"), "--tune", "weights"], "with --tune weights, pass the"),
        (["--attack", "pgd,cw,pgd"], "--attack: lists pgd twice; give each value once"),
        (["--test-eps", "4/256"], "--test-eps: '4/256' is not a number in /255 units, e.g. 4 or 4/255"),
        (["--model", "tiny", "--pretrained", "openai"], "--model tiny is a random model of this file's own"),
        (["--test-eps", "1,2,1"], "--test-eps: lists 1 twice; give each value once"),
        (["--test-eps", "1,1.0000001"], "--test-eps: lists 1 twice; give each value once"),  # one label, "1/255"
        (["--test-eps", "0.0157"], "ε 0.0157 is in /255 units"),
        (["--model", f"local-dir:{files / 'nowhere'}"], f"{files / 'nowhere'} is not an open_clip model folder"),
        (["--model", f"local-dir:{files / 'squash'}", "--pretrained", "openai"], "drop --pretrained openai"),
        (["--baseline", "ViT-B-16"], "--baseline ViT-B-16: give no value (unmasked CLIP) or an open_clip model"),
        (["--model", f"local-dir:{files / 'misfit'}"], f"local-dir:{files / 'misfit'} does not load (Error(s) in"),
        ([*tiny, "--baseline", f"local-dir:{files / 'squash'}"], "takes other images than the masked model (resize"),
        ([*transfer, "--masks", str(files / "masks-other-weights.bin")], "masks-other-weights.bin was trained on "
                                                                          "other weights (source unrecorded"),
        (["--model", "hf-hub:timm/ViT-B-16-SigLIP"], "(hf download timm/ViT-B-16-SigLIP --local-dir DIR) and pass "
                                                     "--model local-dir:DIR"),  # the hub offline, as in every case
    ]


@pytest.fixture(scope="module")
def bad_files(tiny_files):
    """Broken and misfit files next to the good ones: checkpoints and mask files."""
    torch.save(open_clip.CLIP(**{**am.TINY_CLIP, "embed_dim": 16}).state_dict(), tiny_files / "other.pt")
    (tiny_files / "garbage.pt").write_bytes(b"not a checkpoint")
    (tiny_files / "garbage.json").write_text("{not json")
    (tiny_files / "other.json").write_text(json.dumps({"embed_dim": 32}))  # JSON, but not a model's config
    for name, tower, change in (("unbuildable", "vision_cfg", {"patch_size": 0}),
                                ("unrunnable", "vision_cfg", {"image_size": 7}),  # smaller than a patch, 8
                                ("textless", "text_cfg", {"layers": -1}),  # built, with no text block to run
                                ("few-tokens", "text_cfg", {"vocab_size": 1000})):  # below its tokenizer's 49408
        config = {**am.TINY_CLIP, tower: {**am.TINY_CLIP[tower], **change}}
        (tiny_files / f"{name}.json").write_text(json.dumps(config))
    torch.save(open_clip.CLIP(**config).state_dict(), tiny_files / "few-tokens.pt")  # its weights: they load
    (tiny_files / "no-test.json").write_text(json.dumps({"train": [["Abyssinian_1.jpg", 0, "abyssinian"]], "val": [],
                                                         "test": []}))  # a split file without a test list
    model = tiny_clip(7)
    am.apply_masks(model)
    am.save_masks(model, tiny_files / "masks.bin")
    am.save_masks(model, tiny_files / "run" / "masks.bin")  # a run folder, for --masks given the folder
    data = (tiny_files / "masks.bin").read_bytes()
    (tiny_files / "masks-cut.bin").write_bytes(data[:-3])
    (tiny_files / "masks-flipped.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 4]))
    other_config = {**am.TINY_CLIP, "vision_cfg": {**am.TINY_CLIP["vision_cfg"], "width": 32}}
    other = open_clip.CLIP(**other_config)
    am.apply_masks(other)
    am.save_masks(other, tiny_files / "masks-other-arch.bin")
    mlp = tiny_clip(7)
    am.apply_masks(mlp, "mlp")
    am.save_masks(mlp, tiny_files / "masks-mlp.bin")
    am.save_masks(masked_tiny_clip(3), tiny_files / "masks-other-weights.bin")
    model_folder(tiny_files / "squash", tiny_clip(7), resize_mode="squash")
    model_folder(tiny_files / "two-means", tiny_clip(7), mean=[0.5, 0.5])  # a folder's preprocessing, edited
    model_folder(tiny_files / "misfit", open_clip.CLIP(**{**am.TINY_CLIP, "embed_dim": 16}))  # other weights' shapes
    for name, config, target in (("weights.bin", am.TINY_CLIP, "mhsa"), ("weights-mlp.bin", am.TINY_CLIP, "mlp"),
                                 ("weights-other-arch.bin", other_config, "mhsa")):
        tuned = tiny_clip(7) if config is am.TINY_CLIP else open_clip.CLIP(**config)  # tiny.pt's weights
        am.tune_weights(tuned, target)
        am.save_weights(tuned, tiny_files / name, target)
    (tiny_files / "weights-cut.bin").write_bytes((tiny_files / "weights.bin").read_bytes()[:-8])
    fabricate_tinyimagenet(tiny_files / "tiny-broken", train_per_class=1)
    (tiny_files / "tiny-broken" / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG").unlink()
    fabricate_imagenet_shift(tiny_files / "data", "imagenet-rendition/imagenet-r", ["n01443537"], per_class=1)
    return tiny_files


def assert_one_line_exit_2_no_files(code, stderr, cwd, message):
    assert code == 2, stderr
    assert stderr.startswith("advmask: error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("case", range(len(bad_input_cases(Path()))))
def test_every_bad_input_ends_in_one_line_exit_2_and_no_files(bad_files, case, tmp_path, monkeypatch, capsys):
    """Each user error gives one stderr line saying what to do, exit status 2, and writes nothing. The CLI's main()
    runs in this process (a subprocess per case would spend minutes importing torch), with the hub offline as
    HF_HUB_OFFLINE=1 makes it (the hub reads the variable once, at import); test_a_bad_input_of_the_real_cli_process
    sets the variable itself, in a real process."""
    args, message = bad_input_cases(bad_files)[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_:
        am.main([*args, "--out-dir", "out"])
    assert_one_line_exit_2_no_files(exit_.value.code, capsys.readouterr().err, tmp_path, message)


@pytest.mark.parametrize("command", [["--dry-run", "--out-dir", "a-file/run"],
                                     ["analyze", "m.bin", "--out", "a-file/x"],
                                     ["summarize", ".", "--out", "a-file/x"]])
def test_an_unwritable_output_folder_is_one_line_before_any_work(command, tmp_path, monkeypatch, capsys):
    """--out-dir, analyze --out and summarize's folder that cannot be written (here a file is in the way; as root, a
    read-only mode would not stop a write) end in one line, exit 2, before any training, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("in the way")
    model = masked_tiny_clip()
    am.save_masks(model, tmp_path / "m.bin")
    assert "(Not a directory); pass a folder you can write" in refused(capsys, command)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "m.bin"]


def test_device_cuda_n_is_made_the_current_gpu_before_the_run(monkeypatch):
    """--device cuda:N makes GPU N CUDA's current device before the run starts, so that torchattacks, which seeds the
    current GPU's generator, and calls that name no device act on N (CUDA's device count and set_device stubbed, as
    this machine has no GPU)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", str(device))))
    monkeypatch.setattr(am, "run", lambda args, device, provenance: calls.append(("run", str(device))))
    am.main(["--dry-run", "--device", "cuda:1"])
    assert calls == [("set_device", "cuda:1"), ("run", "cuda:1")]


def test_a_bad_input_of_the_real_cli_process(tmp_path):
    """As a separate process too, with HF_HUB_OFFLINE=1 (the README's way to fail fast offline), a tag whose weights
    cannot be fetched: one line naming the offline way, exit status 2, nothing written, and no line that open_clip or
    the hub log (pytest's capture would hide those in this process)."""
    proc = run_cli("--model", "ViT-B-32", "--out-dir", "out", cwd=tmp_path)
    assert_one_line_exit_2_no_files(proc.returncode, proc.stderr, tmp_path, "pass the file with --pretrained PATH "
                                    "and --model ViT-B-32-quickgelu")


def dry_run_args(out, epochs):
    return ["--dry-run", "--epochs", str(epochs), "--lr", "0.01", "--out-dir", out]


def test_out_of_memory_names_the_flag_to_lower_and_keeps_what_is_finished(tmp_path, monkeypatch, capsys):
    """Running out of memory is one line naming the memory asked for and the flag to lower (--batch-size in training,
    --eval-batch-size in evaluation), exit 2; the trained mask and the cells finished before stay, and the rerun
    trains nothing and evaluates only the missing cell."""
    monkeypatch.chdir(tmp_path)
    args, evaluate, calls = ["--dry-run", "--epochs", "2", "--baseline", "--out-dir", "oom"], am.evaluate, []

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of "
                                     "23.54 GiB of which 1.02 GiB is free.")

    def second_evaluation_fails(*args, **kwargs):
        calls.append(args)
        return out_of_memory() if len(calls) == 2 else evaluate(*args, **kwargs)

    for patched, fn, flag in (("train_step", out_of_memory, "--batch-size (now 32)"),
                              ("evaluate", second_evaluation_fails, "--eval-batch-size (now 256)")):
        with monkeypatch.context() as m:
            m.setattr(am, patched, fn)
            err = refused(capsys, args)
        assert "asking for 2.50 GiB" in err and flag in err, err
        assert (tmp_path / "oom" / "masks.bin").exists() == (patched == "evaluate")
    masks = (tmp_path / "oom" / "masks.bin").read_bytes()
    kept = json.loads((tmp_path / "oom" / "results.json").read_text())
    assert [e["model"] for e in kept["results"]] == ["clip"] and not kept["complete"]
    am.main(args)
    out = capsys.readouterr().out
    assert "reusing oom/masks.bin" in out and "reusing 1 finished cell" in out
    done = json.loads((tmp_path / "oom" / "results.json").read_text())
    assert [e["model"] for e in done["results"]] == ["clip", "advmask"] and done["complete"]
    assert done["results"][0] == kept["results"][0] and (tmp_path / "oom" / "masks.bin").read_bytes() == masks


def test_a_rerun_on_another_test_set_evaluates_anew_and_keeps_every_other_cells_records(tiny_files, tmp_path,
                                                                                         monkeypatch, capsys):
    """A cell is keyed by its test set (split record, the sha256 of the indices, its class set): rerun with
    --split-dir and another attack, a transfer run evaluates PGD again on CoOp's EuroSAT images and builds the worst
    case from cells of those images alone, and summarize (and an export's card) tables those cells, leaving the
    replaced one out (in one line); a rerun on one dataset keeps the records (class sets, splits, index hashes) of
    the others; a rerun at another --eval-limit keeps the index hash of each earlier cell."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "transfer" / "oxford_pets" / "2shot" / "seed1"  # trained on oxford_pets, as filed
    args = [*tiny_cli_args(tiny_files), "--protocol", "transfer", "--eval-datasets", "dtd,eurosat", "--shots", "2",
            "--epochs", "1", "--out-dir", str(run)]
    am.main(args)
    first = json.loads((run / "results.json").read_text())
    splits = tmp_path / "splits"
    splits.mkdir()
    test = [[f"{c}/{c}_{n}.jpg", label, c] for label, c in enumerate(("AnnualCrop", "SeaLake", "River"))
            for n in (0, 1)]
    (splits / "split_zhou_EuroSAT.json").write_text(json.dumps({"train": [], "val": [], "test": test}))
    am.main([*args, "--attack", "pgd,cw", "--split-dir", str(splits)])
    second = json.loads((run / "results.json").read_text())
    rows = second["results"]
    eurosat = [r for r in rows if r["eval"] == "eurosat"]
    sources = {(r["attack"], r["test_set"]["split"]["source"], r["n"]) for r in eurosat}
    assert sources == {("pgd", "default", 9), ("pgd", "coop", 6), ("cw", "coop", 6), ("worst", "coop", 6)}
    coop_pgd = next(r for r in eurosat if r["attack"] == "pgd" and r["test_set"]["split"]["source"] == "coop")
    capsys.readouterr()
    rows = {r[0]: r[1:] for r in table(am.summarize(tmp_path / "runs", am.parser_defaults), "transfer | PGD")}
    assert rows["eurosat"] == [f"{100 * coop_pgd[k]:.1f}" for k in ("clean_acc", "adv_acc")]
    assert f"{run}: leaving out 1 cell measured on test sets that its latest run replaced" in capsys.readouterr().err
    dtd = [r for r in second["results"] if r["eval"] == "dtd"]  # no CoOp file for DTD there: its PGD cell is reused
    assert [(r["attack"], r["test_set"]["split"]["source"]) for r in dtd].count(("pgd", "default")) == 1
    am.main([*args, "--eval-datasets", "dtd", "--eval-limit", "2"])  # the last --eval-datasets counts
    after = json.loads((run / "results.json").read_text())
    assert after["class_sets"]["eurosat"] == second["class_sets"]["eurosat"] and "eurosat" in after["splits"]
    limited = [r for r in after["results"] if r["eval"] == "dtd" and r["eval_limit"] == 2]
    whole = [r for r in after["results"] if r["eval"] == "dtd" and r["eval_limit"] is None]
    assert len(limited) == 1 and limited[0]["n"] == 2 and whole[0]["test_set"] == first["results"][0][
        "test_set"] != limited[0]["test_set"]
    card = am.export(run, tmp_path / "exported")  # its cells as summarize takes them: CoOp's EuroSAT, not the default
    rows = [line.split(" | ") for line in card.splitlines() if line.startswith("| advmask | eurosat | pgd |")]
    assert [row[5] for row in rows] == ["6"]  # test images


def test_a_truncated_or_foreign_json_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A truncated results.json or config.json, or one that is not a run's (a JSON list, an object without the
    entries its reader needs), is one line naming the file, exit 2, for a rerun, summarize, export and analyze
    alike; deleting the results file, as the line says, evaluates every cell again."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "few_shot" / "oxford_pets" / "16shot" / "seed1"
    args = ["--dry-run", "--epochs", "1", "--out-dir", str(run)]
    am.main(args)
    for name, argv in (("results.json", args), ("results.json", ["summarize", "runs", "--out", "s"]),
                       ("results.json", ["export", str(run), "exported"]), ("config.json", args),
                       ("config.json", ["analyze", str(run), "--out", "a"])):
        whole = (run / name).read_text()
        for broken, says in ((whole[:len(whole) // 2], "is not valid JSON"), ("[]", "is not a JSON object"),
                             ('{"complete": true}', "has no '")):
            if says == "has no '" and argv == args:
                continue  # a rerun needs no entry: a config.json of other settings is refused as such, tested apart
            (run / name).write_text(broken)
            capsys.readouterr()
            assert f"seed1/{name} {says}" in refused(capsys, argv)
        (run / name).write_text(whole)
    (run / "results.json").unlink()
    am.main(args)
    assert "reusing" in capsys.readouterr().out and json.loads((run / "results.json").read_text())["complete"]


def test_a_masks_file_is_known_by_its_content_and_a_config_file_model_by_its_config(tiny_files, tmp_path,
                                                                                    monkeypatch, capsys):
    """A --masks run's folder is bound to the file's content: the same file by another path reuses its cells, another
    mask written to the same path is refused in one line naming tuned_file_sha256. A model given as a config JSON is
    recorded by that config and its sha256, and export writes that config, not open_clip's config of the stem's
    name: a tiny.json of other sizes exports a folder open_clip loads."""
    monkeypatch.chdir(tmp_path)
    am.main([*tiny_cli_args(tiny_files), "--shots", "2", "--epochs", "1", "--out-dir", "trained"])
    shutil.copy(tmp_path / "trained" / "masks.bin", tmp_path / "cons.bin")
    evaluate = [*tiny_cli_args(tiny_files), "--protocol", "transfer", "--eval-datasets", "dtd", "--out-dir", "e"]
    am.main([*evaluate, "--masks", "cons.bin"])
    for path in ("./cons.bin", str(tmp_path / "cons.bin")):
        capsys.readouterr()
        am.main([*evaluate, "--masks", path])
        assert "reusing 1 finished cell" in capsys.readouterr().out
    header = am.read_mask_file(tmp_path / "cons.bin")[0]
    other = am.load_masks(tiny_clip(7), tmp_path / "cons.bin")
    randomize_scores(other, 3)
    am.save_masks(other, tmp_path / "cons.bin", header["base_weights"]["source"], header["provenance"])
    assert "other training settings (tuned_file_sha256)" in refused(capsys, [*evaluate, "--masks", "cons.bin"])
    config = {**am.TINY_CLIP, "embed_dim": 24,
              "vision_cfg": {"image_size": SIZE, "layers": 3, "width": 48, "patch_size": 8, "head_width": 24}}
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    torch.save(open_clip.CLIP(**config).state_dict(), tmp_path / "tiny.pt")
    own = ["--model", str(tmp_path / "tiny.json"), "--pretrained", str(tmp_path / "tiny.pt")]
    am.main([*tiny_cli_args(tiny_files), *own, "--shots", "2", "--epochs", "1", "--out-dir", "own"])
    identity = json.loads((tmp_path / "own" / "config.json").read_text())["model_identity"]
    assert identity["model_config"] == config
    assert identity["config_sha256"] == hashlib.sha256((tmp_path / "tiny.json").read_bytes()).hexdigest()
    am.main(["export", "own", "exported"])
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'exported'}")
    assert exported.visual.transformer.width == 48 and len(exported.visual.transformer.resblocks) == 3


def test_an_interrupted_overwrite_trains_again_and_never_passes_off_the_old_mask(tmp_path, monkeypatch, capsys):
    """--overwrite with other settings removes the old mask, results and checkpoint before it writes anything, so a
    rerun after Ctrl-C during its training trains the new settings (its mask differs, its log runs to the end)
    instead of reusing the old mask under the new settings."""
    monkeypatch.chdir(tmp_path)
    base = ["--dry-run", "--lr", "0.01", "--out-dir", "r"]
    am.main([*base, "--epochs", "2"])
    old = (tmp_path / "r" / "masks.bin").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(am, "train_step", interrupted)
        refused(capsys, [*base, "--epochs", "6", "--overwrite"], status=130)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["config.json"]
    capsys.readouterr()
    am.main([*base, "--epochs", "6"])
    assert "reusing" not in capsys.readouterr().out and (tmp_path / "r" / "masks.bin").read_bytes() != old
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["complete"] and results["train_log"][-1]["step"] == 12 and results["settings"]["epochs"] == 6


def test_a_checkpoint_is_resumed_by_its_own_settings_alone_whatever_its_config_json_says(tmp_path, monkeypatch,
                                                                                          capsys):
    """A run folder's checkpoint records what trained it: with its config.json edited to a run of other settings, or
    deleted (as the line for a corrupt one advises), that run (which would go on under the checkpoint's Adam state
    and schedule) is refused in one line naming the setting, with nothing written; a run of its own settings resumes
    it."""
    monkeypatch.chdir(tmp_path)
    base, step, calls = ["--dry-run", "--epochs", "6", "--checkpoint-every", "1", "--out-dir", "r"], am.train_step, \
        itertools.count()

    def interrupted(*args, **kwargs):  # Ctrl-C in epoch 2 (2 steps an epoch): the checkpoint of epoch 1 stays
        if next(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(am, "train_step", interrupted)
        refused(capsys, base, status=130)
    config = tmp_path / "r" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lr": 0.02}))  # edited to the next run's lr
    for _ in ("edited", "deleted"):
        before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
        err = refused(capsys, [*base, "--lr", "0.02"])
        assert "checkpoint r/checkpoint.pt was saved with another lr than this run's; delete it" in err
        assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
        config.unlink(missing_ok=True)
    am.main(base)
    assert "resuming from r/checkpoint.pt, saved after epoch 1" in capsys.readouterr().out
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_a_corrupt_lost_or_replaced_mask_never_keeps_the_old_masks_cells(tmp_path, monkeypatch, capsys):
    """A corrupt masks.bin under the same settings is one line naming it and --overwrite, which then trains again and
    keeps none of the old mask's cells; a masks.bin deleted by hand is trained again the same way, its old cells
    gone with it. One replaced by hand by a mask of the same record (as a retrain by other code gives) is evaluated
    anew, its sha256 recorded and the old log dropped; one of another budget (--epochs) or seed is refused, naming it,
    whatever config.json says (edited to the new budget, a mask of the old one is refused all the same)."""
    monkeypatch.chdir(tmp_path)
    base = ["--dry-run", "--epochs", "1", "--lr", "0.01", "--out-dir", "r"]
    am.main([*base, "--attack", "pgd,cw"])
    mask = tmp_path / "r" / "masks.bin"
    mask.write_bytes(mask.read_bytes()[:-20])
    capsys.readouterr()
    err = refused(capsys, [*base, "--attack", "pgd,cw"])
    assert "r/masks.bin" in err and "--overwrite" in err, err
    am.main([*base, "--attack", "pgd", "--overwrite"])
    assert "few_shot on oxford_pets" in capsys.readouterr().out  # trained, not reused
    attacks = [r["attack"] for r in json.loads((tmp_path / "r" / "results.json").read_text())["results"]]
    assert attacks == ["pgd"] and am.read_mask_file(mask)  # the mask is whole again
    mask.unlink()
    am.main([*base, "--attack", "cw"])
    assert "few_shot on oxford_pets" in capsys.readouterr().out and mask.is_file()
    assert [r["attack"] for r in json.loads((tmp_path / "r" / "results.json").read_text())["results"]] == ["cw"]
    header, bits = am.read_mask_file(mask)  # the same record, other bits: as a retrain by other code gives
    am.write_mask_file(mask, header, ~bits)
    other = mask.read_bytes()
    capsys.readouterr()
    am.main([*base, "--attack", "cw"])
    out = capsys.readouterr().out
    assert "r/masks.bin is not the file that the cells" in out and "reusing 1 finished cell" not in out, out
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["tuned_file_sha256"] == hashlib.sha256(other).hexdigest() and results["train_log"] == []
    assert [r["attack"] for r in results["results"]] == ["cw"]
    before, config = (tmp_path / "r" / "results.json").read_bytes(), tmp_path / "r" / "config.json"
    settings = config.read_text()
    config.write_text(json.dumps({**json.loads(settings), "epochs": 2}))  # edited to the next run's budget
    assert "r/masks.bin was trained with another epochs" in refused(capsys, [*base, "--attack", "cw", "--epochs", "2"])
    config.write_text(settings)
    for flags, what in ((["--epochs", "2"], "epochs"), (["--seed", "2"], "seed")):  # another run's mask copied in
        am.main([*base[:-1], what, *flags, "--attack", "cw"])
        mask.write_bytes((tmp_path / what / "masks.bin").read_bytes())
        err = refused(capsys, [*base, "--attack", "cw"])
        assert re.search(rf"r/masks.bin was trained with another [\w, ]*\b{what}\b.* --overwrite", err), err
        assert (tmp_path / "r" / "results.json").read_bytes() == before


def limited_cli(limit, *args, cwd):
    """The CLI in a process that cannot write a file past `limit` bytes (RLIMIT_FSIZE: writes fail with EFBIG, as on
    a full disk they fail with ENOSPC)."""
    return subprocess.run([sys.executable, str(HERE / "advmask.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


def test_a_write_that_fails_is_one_line_and_leaves_finished_files_whole(tmp_path, monkeypatch, capsys):
    """A file that cannot be written (as on a full disk) ends a fresh run (a real process under RLIMIT_FSIZE), a rerun
    and analyze (here, with writes cut off as that limit cuts them: too large, no space, over quota, a read-only or
    forbidden place) in one line naming it, exit status 2, with the files written before intact, no temporary file
    and no lock left behind."""
    run = ["--dry-run", "--workers", "0", "--device", "cpu", "--out-dir"]
    fresh = limited_cli(64_000, *run, "fresh", cwd=tmp_path)  # the training checkpoint is the first big file
    assert fresh.returncode == 2 and fresh.stderr.count("\n") == 1, fresh.stderr
    assert "could not write fresh/checkpoint.pt (File too large)" in fresh.stderr
    assert sorted(p.name for p in (tmp_path / "fresh").iterdir()) == ["config.json"]
    monkeypatch.chdir(tmp_path)
    am.main([*run, "done"])
    results = (tmp_path / "done" / "results.json").read_bytes()
    write_bytes = Path.write_bytes

    def limited(limit, *args, error=errno.EFBIG):  # main with every file cut at limit bytes and its write failing
        def cut(path, data):
            write_bytes(path, data[:limit])
            if len(data) > limit:
                raise OSError(error, os.strerror(error))
        with monkeypatch.context() as m:
            m.setattr(Path, "write_bytes", cut)
            return refused(capsys, list(args))

    for error in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        err = limited(len(results) + 100, *run, "done", "--attack", "pgd,cw", error=error)
        assert f"could not write done/results.json ({os.strerror(error)})" in err
    assert json.loads((tmp_path / "done" / "results.json").read_text())["results"] == json.loads(results)["results"]
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == ["config.json", "masks.bin", "results.json"]
    assert "could not write an/heads_0.png" in limited(8_000, "analyze", "done", "--out", "an")  # a heatmap: > 8 kB
    assert list((tmp_path / "an").iterdir()) == []


def test_a_consensus_mask_records_its_inputs_and_its_runs_are_filed_by_them(tmp_path, monkeypatch, capsys):
    """A consensus mask's provenance is its inputs (each file's sha256 and provenance) and what they share (their
    datasets joined); a transfer run of it is labelled so and filed under transfer/consensus/<k>of<n>-<its sha256>,
    which summarize's tables leave out in one line naming it."""
    monkeypatch.chdir(tmp_path)
    runs = [f"runs_dry/few_shot/{dataset}/16shot/seed1" for dataset in ("dtd", "eurosat", "oxford_pets")]
    for run, epochs in zip(runs, (1, 2, 3)):  # one seed: the same random base weights
        am.main(["--dry-run", "--epochs", str(epochs), "--dataset", run.split("/")[2]])
    am.main(["analyze", *runs, "--out", "an", "--consensus", "2", "--save", "cons.bin"])
    provenance = am.read_mask_file("cons.bin")[0]["provenance"]
    inputs = provenance["consensus"]["masks"]
    assert provenance["consensus"]["k"] == 2 and [i["dataset"] for i in inputs] == ["dtd", "eurosat", "oxford_pets"]
    assert [i["sha256"] for i in inputs] == [hashlib.sha256((tmp_path / run / "masks.bin").read_bytes()).hexdigest()
                                             for run in runs]
    assert provenance["dataset"] == "dtd+eurosat+oxford_pets" and provenance["seed"] == 1 and provenance["shots"] == 16
    am.main(["--dry-run", "--protocol", "transfer", "--masks", "cons.bin", "--eval-datasets", "eurosat"])
    sha = hashlib.sha256((tmp_path / "cons.bin").read_bytes()).hexdigest()
    results = json.loads((tmp_path / "runs_dry" / "transfer" / "consensus" / f"2of3-{sha[:12]}" / "results.json")
                         .read_text())
    assert results["dataset"] == "dtd+eurosat+oxford_pets" and results["settings"]["tuned_file_sha256"] == sha
    outside = f"1 results.json outside that layout (such as runs_dry/transfer/consensus/2of3-{sha[:12]})"
    capsys.readouterr()
    am.main(["summarize", "runs_dry"])  # the two training runs' tables
    assert capsys.readouterr().err == f"runs_dry: leaving out {outside}; read them there\n"
    assert f"seed<S>/, only {outside}: read them there" in refused(capsys, ["summarize", "runs_dry/transfer"])


def test_dry_runs_land_in_a_folder_of_their_own_and_show_the_mask_working(tmp_path, monkeypatch, capsys):
    """A --dry-run without --out-dir writes under runs_dry/, never runs/ (its --tune weights arm in seed<S>-weights),
    records the model and settings it used and turns weights off; the flags it overrides are named in one line; dry
    runs of two shot counts are tested on the same images and summarized side by side, under a heading that names
    the dry run alone; analyze of two masks prints no nan, even where a mask has nothing off (no chance level: no
    ratio)."""
    monkeypatch.chdir(tmp_path)
    am.main(["--dry-run", "--model", "ViT-L-14", "--test-steps", "20"])
    assert "--dry-run runs the tiny random CLIP and PGD-3; it ignores --model ViT-L-14, --test-steps 20" in (
        capsys.readouterr().err)
    cell = tmp_path / "runs_dry" / "few_shot" / "oxford_pets" / "16shot" / "seed1"
    assert not (tmp_path / "runs").exists() and (cell / "results.json").is_file()
    config = json.loads((cell / "config.json").read_text())
    assert (config["model"], config["pretrained"], config["test_steps"]) == ("tiny", "none", 3)
    assert json.loads((cell / "results.json").read_text())["sparsity"] > 0.05
    am.main(["--dry-run", "--tune", "weights", "--epochs", "1"])  # beside the mask's run, not in its folder
    assert (cell.parent / "seed1-weights" / "weights.bin").is_file() and not (cell / "weights.bin").exists()
    am.main(["--dry-run", "--shots", "1"])
    md = am.summarize(tmp_path / "runs_dry", am.parser_defaults)
    row, _ = table(md, "few_shot")  # the dataset, its Average
    assert row[0] == "oxford_pets" and len(row) == 5 and "—" not in row  # 1-shot and 16-shot, clean and adv
    # the heading says what a dry run is, and nothing of the settings --dry-run sets (model, weights, PGD-3, lr)
    assert "## few_shot | PGD ε = 1/255 | dry run: random model and images | mean" in md
    none_off = tiny_clip()
    am.apply_masks(none_off)
    am.save_masks(none_off, tmp_path / "none_off.bin")
    md = am.analyze([cell / "masks.bin", tmp_path / "none_off.bin"], tmp_path / "a")
    assert "nan" not in md + (tmp_path / "a" / "analysis.csv").read_text() and "| — |" in md


def test_a_finished_run_is_not_overwritten_by_other_training_settings(tmp_path, monkeypatch, capsys):
    """Rerunning into a finished run's folder with another learning rate, or other pre-trained weights (even with its
    mask file gone), is refused in one line naming the setting and the file that holds the run's own (the mask and
    the results stay); evaluation flags alone re-evaluate (not the test batch of an fp32 evaluation); --overwrite
    trains again."""
    monkeypatch.chdir(tmp_path)
    am.main([*dry_run_args("out", 2), "--seed", "5"])
    mask = (tmp_path / "out" / "masks.bin").read_bytes()
    err = refused(capsys, [*dry_run_args("out", 2), "--seed", "5", "--lr", "0.5"])
    assert "out holds a finished run with other training settings (lr)" in err
    assert "rerun with the settings in out/config.json to evaluate more cells there" in err
    assert (tmp_path / "out" / "masks.bin").read_bytes() == mask
    am.main([*dry_run_args("out", 2), "--seed", "5", "--test-eps", "2"])  # evaluation only: allowed
    assert (tmp_path / "out" / "masks.bin").read_bytes() == mask
    capsys.readouterr()
    am.main([*dry_run_args("out", 2), "--seed", "5", "--test-eps", "1,2", "--eval-batch-size", "3"])
    out = capsys.readouterr().out  # in fp32 the test batch is no cell's setting: both cells reused, none evaluated
    assert "reusing 2 finished cells" in out and "advmask |" not in out
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    config["model_identity"]["weights_sha256"] = "0" * 64  # the run's, as if trained on other pre-trained weights
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    (tmp_path / "out" / "masks.bin").unlink()  # no file's provenance left to compare: config.json alone tells
    results = (tmp_path / "out" / "results.json").read_bytes()
    assert "other training settings (model weights_sha256)" in refused(capsys, [*dry_run_args("out", 2), "--seed", "5"])
    assert (tmp_path / "out" / "results.json").read_bytes() == results
    am.main([*dry_run_args("out", 2), "--seed", "5", "--lr", "0.5", "--overwrite"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["lr"] == 0.5
    assert (tmp_path / "out" / "masks.bin").read_bytes() != mask


def test_help_shows_each_default_once_and_budgets_take_either_spelling(capsys):
    """Every flag has help and at most one default, printed plainly (no None, no Python lists; 0 shown); the
    description names the four commands; summarize --help prints usage and exits 0; --test-eps 4/255 is --test-eps 4;
    --eval-datasets without --protocol transfer says in one line that it is not used."""
    with pytest.raises(SystemExit) as exit_:
        am.main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0 and all(c in " ".join(text.split()) for c in ("summarize RUNS_DIR", "analyze PATH",
                                                                              "export RUN_DIR OUT_DIR"))
    options = re.split(r"\n  (?=-)", text.split("options:")[1])[1:]
    assert len(options) > 40  # every flag, -h included
    for option in options:
        assert option.count("(default") <= 1 and "None)" not in option and "['" not in option, option
        assert len(" ".join(option.split()).split(" ", 2)) > 2 or option.startswith("-h"), option  # has a help text
    counted = am._parser("count", "", am._HelpFormatter)  # a default of 0 is a value to show, though 0 == False
    counted.add_argument("--steps", type=int, default=0, help="attack steps")
    assert "attack steps (default: 0)" in " ".join(counted.format_help().split())
    with pytest.raises(SystemExit) as exit_:
        am.main(["summarize", "--help"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("usage: advmask.py summarize")
    assert am.parse_args(["--test-eps", "4/255,1"]).test_eps == am.parse_args(["--test-eps", "4,1"]).test_eps == [4, 1]
    capsys.readouterr()
    assert am.parse_args(["--eval-datasets", "dtd"]).eval_datasets == ["dtd"]
    assert capsys.readouterr().err == ("warning: --eval-datasets goes with --protocol transfer; few_shot evaluates on "
                                       "oxford_pets's own test set\n")
    am.parse_args(["--eval-datasets", "dtd", "--protocol", "transfer"])
    assert capsys.readouterr().err == ""


def test_an_interrupt_outside_training_and_a_closed_pipe_end_in_a_line_or_silence(tmp_path, monkeypatch, capsys):
    """Ctrl-C before or after training prints "advmask: interrupted" and exits 130; a reader that leaves the pipe
    (summarize RUNS | head) ends the process with status 1 and no traceback; SIGTERM does what Ctrl-C does while
    main runs, and once main has returned it ends the process as SIGTERM does, with no traceback."""
    def interrupted(args, device, provenance):
        raise KeyboardInterrupt
    monkeypatch.setattr(am, "run", interrupted)
    assert refused(capsys, ["--dry-run"], status=130) == "advmask: interrupted\n"
    write_results(tmp_path / "runs", "few_shot", "dtd", 16, 1, [("dtd", 0.5, 0.2)])
    proc = subprocess.Popen([sys.executable, str(HERE / "advmask.py"), "summarize", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the process has imported torch, let alone printed
    assert proc.wait(timeout=300) == 1 and proc.stderr.read() == ""
    # the script's own lines: SIGTERM as Ctrl-C while main runs, then as SIGTERM in the interpreter's exit (torch's
    # hooks), where a KeyboardInterrupt could only print a traceback
    handlers = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.append((signum, handler)))
    monkeypatch.setattr(sys, "argv", ["advmask.py", "summarize", str(tmp_path / "runs")])
    runpy.run_path(str(HERE / "advmask.py"), run_name="__main__")
    assert handlers == [(signal.SIGTERM, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)]
    assert "| dtd |" in capsys.readouterr().out


def test_another_hosts_lock_is_refused_while_fresh_and_taken_over_once_stale(tmp_path, monkeypatch, capsys):
    """A lock written on another host (a shared file system) cannot be checked here, even when no process of its pid
    lives here: while fresh (a beat late included), a run is refused in one line naming that host and saying to delete
    the lock if its process is gone; unrefreshed for LOCK_STALE seconds (a job gone with its node), it is taken over
    with one line, as a pre-empted job requeued on another node needs, and so is a stale lock of this host whose pid
    another process has now, or a fresh one whose pid no process can have; an empty lock (its maker killed before
    writing its pid) is refused while fresh and taken over once LOCK_BEAT old; a lock whose holder ends while it is read
    is tried again. A holder refreshes its lock every LOCK_BEAT seconds."""
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / "run" / ".lock"
    lock.parent.mkdir()
    lock.write_text(f"elsewhere {2**22 + 1}")  # above Linux's largest pid: none lives here
    err = refused(capsys, dry_run_args("run", 1))
    assert f"in use by process {2**22 + 1} on elsewhere" in err
    assert f"if it is gone, delete {Path('run', '.lock')}" in err
    beat_ago = time.time() - am.LOCK_BEAT - 5  # a refresh late by seconds (a busy file server): still held
    os.utime(lock, (beat_ago, beat_ago))
    assert f"in use by process {2**22 + 1} on elsewhere" in refused(capsys, dry_run_args("run", 1))
    stale = time.time() - am.LOCK_STALE - 60
    os.utime(lock, (stale, stale))
    am.main(dry_run_args("run", 1))
    assert f"process {2**22 + 1} on elsewhere, which held it, is gone" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "masks.bin", "results.json"]
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # this host, a live pid: not an advmask run's, as stale
    os.utime(lock, (stale, stale))
    am.main(dry_run_args("run", 1))
    assert f"process {os.getppid()}, which held it, is gone" in capsys.readouterr().out
    lock.write_text(f"{socket.gethostname()} {2**64}")  # this host, fresh, a pid past any: a hand edit, no process
    am.main(dry_run_args("run", 1))
    assert f"process {2**64}, which held it, is gone" in capsys.readouterr().out
    lock.write_text("")  # made, and its maker killed before it wrote its pid: refused while it may still be writing
    assert "in use by process (starting)" in refused(capsys, dry_run_args("run", 1))
    os.utime(lock, (beat_ago, beat_ago))  # a beat later, long before LOCK_STALE
    am.main(dry_run_args("run", 1))
    assert "process (never written), which held it, is gone" in capsys.readouterr().out
    read_text = Path.read_text

    def ended(path, *args, **kwargs):  # the holder ends between this run's try for the lock and its read of it
        if path.name == ".lock":
            path.unlink()
            raise FileNotFoundError(path)
        return read_text(path, *args, **kwargs)
    lock.write_text("elsewhere 1")
    with monkeypatch.context() as m:
        m.setattr(Path, "read_text", ended)
        am.main(dry_run_args("run", 1))  # tries again, and takes the free folder
    assert not lock.exists()
    monkeypatch.setattr(am, "LOCK_BEAT", 0.01)
    with am._folder_lock(tmp_path / "held"):
        os.utime(tmp_path / "held" / ".lock", (stale, stale))
        time.sleep(0.5)
        assert time.time() - (tmp_path / "held" / ".lock").stat().st_mtime < 60  # refreshed by its holder


def test_a_run_killed_mid_training_resumes_to_the_same_mask_bit_for_bit(tmp_path, monkeypatch, capsys):
    """While a real process trains in a folder, a run on it in this process is refused in one line naming its pid.
    SIGKILL after the checkpoint of epoch 10 of 30 (checkpoints every 5 epochs: 20 epochs still to go
    when the kill comes, so that a loaded machine cannot let the run finish first): the next run takes its lock over
    with one line; the checkpoint is refused by runs with other training settings (λ, precision), and the same
    command again (with another data root) ends with the masks, accuracies and training log of a run never
    interrupted, the mask having moved, and leaves no checkpoint; so does a real process stopped by SIGTERM (a
    cluster's pre-emption; Ctrl-C takes the same path) after that checkpoint, which says in one line, exit status 130,
    the step it stopped at and the checkpoint to resume from, and releases its folder's lock."""
    am.main(dry_run_args(str(tmp_path / "whole"), 30))  # uninterrupted, in this process
    every = ["--checkpoint-every", "10"]
    cmd = [sys.executable, str(HERE / "advmask.py"), *dry_run_args("killed", 30), *every]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed, busy_refused = tmp_path / "killed", False
    for line in proc.stdout:
        if line.startswith("checkpoint | epoch 5/30"):  # training, the folder held
            busy_refused = f"{killed} is in use by process {proc.pid}" in refused(capsys, dry_run_args(str(killed), 30))
        if line.startswith("checkpoint | epoch 10/30"):
            proc.kill()  # SIGKILL, somewhere in epoch 11
            break
    proc.wait(timeout=60)
    assert proc.returncode == -9 and busy_refused
    assert (killed / "checkpoint.pt").is_file() and not (killed / "results.json").exists()
    assert (killed / ".lock").read_text() == f"{socket.gethostname()} {proc.pid}"  # left by the killed run
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the first run after the kill takes the lock over, then refuses the checkpoint
        am.main([*dry_run_args(str(killed), 30), "--lam", "10"])
    out, err = capsys.readouterr()
    assert f"process {proc.pid}, which held it, is gone; taking the folder over" in out
    assert "holds a checkpoint of a run with other training settings (lam)" in err
    err = refused(capsys, [*dry_run_args(str(killed), 30), "--precision", "bf16"])  # in this process: a refusal
    assert "holds a checkpoint of a run with other training settings (precision)" in err
    stopped = subprocess.Popen([sys.executable, str(HERE / "advmask.py"), *dry_run_args("int", 30), *every],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in stopped.stdout:
        if line.startswith("checkpoint | epoch 10/30"):
            stopped.terminate()  # SIGTERM, somewhere in epoch 11 (or a little later)
            break
    out, err = stopped.communicate(timeout=60)
    saved = [int(m[1]) for m in re.finditer(r"checkpoint \| epoch \d+/30 \| step (\d+)/60", line + out)][-1]
    stop = int(re.search(r"^advmask: interrupted at step (\d+)/60; ", err)[1])
    assert stopped.returncode == 130 and err.count("\n") == 1 and saved <= stop < 60, err
    assert err.endswith(f"rerun the same command to resume from the checkpoint of step {saved}\n")
    assert not (tmp_path / "int" / ".lock").exists() and (tmp_path / "int" / "checkpoint.pt").is_file()
    capsys.readouterr()
    am.main(dry_run_args(str(tmp_path / "int"), 30))  # the same command, in this process
    assert "taking the folder over" not in capsys.readouterr().out
    assert (tmp_path / "int" / "masks.bin").read_bytes() == (tmp_path / "whole" / "masks.bin").read_bytes()
    # where the inputs are found does not decide the mask: the same command with another data root resumes
    am.main([*dry_run_args(str(killed), 30), *every, "--data-root", "elsewhere", "--no-download", "--workers", "0"])
    assert f"resuming from {killed / 'checkpoint.pt'}, saved after epoch 10" in capsys.readouterr().out
    assert (killed / "masks.bin").read_bytes() == (tmp_path / "whole" / "masks.bin").read_bytes()
    whole, again = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "killed"))
    assert [e["adv_acc"] for e in whole["results"]] == [e["adv_acc"] for e in again["results"]]
    assert [e["clean_acc"] for e in whole["results"]] == [e["clean_acc"] for e in again["results"]]
    assert 0 < whole["sparsity"] == again["sparsity"]

    def untimed(log):
        return [{k: v for k, v in row.items() if k != "img_per_s"} for row in log]
    assert len(whole["train_log"]) == 3 and untimed(whole["train_log"]) == untimed(again["train_log"])
    assert not (killed / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# On a GPU: the CUDA paths end to end, at tiny size (`pytest -q -k gpu` where torch.cuda.is_available(); skipped,
# with that reason, elsewhere: CI has no GPU)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is "
                                                              "False); run `pytest -q -k gpu` on a machine with one")


@gpu
def test_gpu_the_method_tunes_bakes_and_evaluates_on_cuda():
    """adversarial_mask_tuning, bake_masks and evaluate with PGD run on CUDA: the classifier and its masks sit on the
    GPU, the baked model gives the masked logits, and evaluate takes its uint8 images from the CPU or the GPU alike;
    APGD on the GPU leaves its global generator as it found it (torchattacks seeds it)."""
    x_u8, y = (t.cuda() for t in synthetic_training_set(3, 4))
    classifier, log = am.adversarial_mask_tuning(tiny_clip().cuda(), x_u8, y, ["cat", "dog", "axolotl"], epochs=3,
                                                 batch_size=4, lr=1e-2, log_every=1)
    assert placement(classifier) == {"cuda"} and len(log) == 9 and 0 < log[-1]["off"] < 1
    with torch.no_grad():  # in evaluate's batches of 5: another batch size may run other kernels and flip a near tie
        masked = torch.cat([classifier(am.to_unit(x)) for x in x_u8.split(5)])
        am.bake_masks(classifier)
        torch.testing.assert_close(torch.cat([classifier(am.to_unit(x)) for x in x_u8.split(5)]), masked)
    attacks = {"pgd": partial(am.pgd_attack, steps=3)}
    # attention's math kernel: the memory-efficient one's backward adds atomically, so two PGD runs could differ
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        on_gpu, on_cpu = [am.evaluate(classifier, images, labels, attacks, batch_size=5)
                          for images, labels in ((x_u8, y), (x_u8.cpu(), y.cpu()))]
    assert on_gpu["n"] == 12 and torch.equal(on_gpu["correct"], (masked.argmax(1) == y).cpu())
    assert torch.equal(on_gpu["attacks"]["pgd"]["correct"], on_cpu["attacks"]["pgd"]["correct"])
    rng = torch.cuda.get_rng_state()
    am.apgd_attack(classifier, am.to_unit(x_u8[:5]), y[:5], steps=2, generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(torch.cuda.get_rng_state(), rng)


@gpu
@pytest.mark.parametrize("flags", [["--baseline"], ["--protocol", "base2new", "--baseline"],
                                   ["--precision", "bf16", "--eval-precision", "bf16"], ["--attack", "apgd-ce,aa"],
                                   ["--tune", "weights"], ["--eval-precision", "fp16", "--baseline"]])
def test_gpu_cli_dry_runs_finish_on_cuda(flags, tmp_path, monkeypatch):
    """The CLI's dry run on --device cuda, few-shot and base-to-new with the baseline, in bf16, under APGD-CE and
    AutoAttack, for the weights arm, and evaluated in fp16 as FAP's code does: every cell is evaluated and the run is
    complete."""
    monkeypatch.chdir(tmp_path)
    am.main(["--dry-run", "--device", "cuda", "--epochs", "2", *flags, "--out-dir", "gpu"])
    results = json.loads((tmp_path / "gpu" / "results.json").read_text())
    assert results["complete"] and results["settings"]["device"] == "cuda" and results["results"]
    assert all(0 <= e["adv_acc"] <= e["clean_acc"] + 1e-9 <= 1 + 1e-9 for e in results["results"])


@gpu
def test_gpu_deterministic_runs_repeat_bit_for_bit(tmp_path):
    """Two --deterministic dry runs on CUDA, each in a fresh process, write the same masks.bin and accuracies."""
    for out in ("a", "b"):
        proc = run_cli("--dry-run", "--device", "cuda", "--deterministic", "--epochs", "3", "--out-dir", out,
                       cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a" / "masks.bin").read_bytes() == (tmp_path / "b" / "masks.bin").read_bytes()
    a, b = (json.loads((tmp_path / out / "results.json").read_text())["results"] for out in ("a", "b"))
    assert [(e["clean_acc"], e["adv_acc"]) for e in a] == [(e["clean_acc"], e["adv_acc"]) for e in b]


@gpu
def test_gpu_files_of_a_cuda_run_load_on_either_device_and_export(tmp_path, monkeypatch):
    """The mask and weights files of CUDA dry runs load onto a CUDA and a CPU copy of the base model alike (the same
    bits, the same weights; saved again from either, the same bytes), and export writes the CUDA run's mask baked."""
    monkeypatch.chdir(tmp_path)
    for tune in ("mask", "weights"):
        am.main(["--dry-run", "--device", "cuda", "--epochs", "2", "--tune", tune, "--out-dir", tune])
    torch.manual_seed(1)  # the dry run's random CLIP, drawn from its --seed as main draws it
    base = am.load_clip("tiny", "none")[0]
    on = {d: am.load_masks(copy.deepcopy(base).to(d), "mask/masks.bin") for d in ("cuda", "cpu")}
    bits = {d: [(m.scores > m.threshold).cpu() for *_, m in am._masks(model)] for d, model in on.items()}
    assert all(map(torch.equal, bits["cuda"], bits["cpu"]))
    assert torch.equal(torch.cat([b.flatten() for b in bits["cpu"]]), am.read_mask_file("mask/masks.bin")[1])
    for d, model in on.items():
        am.save_masks(model, f"again-{d}.bin")
    assert Path("again-cuda.bin").read_bytes() == Path("again-cpu.bin").read_bytes()
    tuned = {d: copy.deepcopy(base).to(d) for d in ("cuda", "cpu")}
    for d, model in tuned.items():
        am.load_weights(model, "weights/weights.bin")
        am.save_weights(model, f"again-{d}.weights")
    assert all(torch.equal(a.cpu(), b) for (_, a), (_, b) in zip(*(am.target_weights(m) for m in tuned.values())))
    assert Path("again-cuda.weights").read_bytes() == Path("again-cpu.weights").read_bytes()
    am.export("mask", "exported")
    exported = safetensors.torch.load_file("exported/open_clip_model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in am.bake_masks(on["cpu"]).state_dict().items())


@gpu
def test_gpu_training_never_waits_for_the_gpu_between_log_lines(monkeypatch):
    """The steps between two log lines make no host synchronisation: they run under
    torch.cuda.set_sync_debug_mode("error"), which raises at any, with only the log lines (the finiteness check and
    the row) let through."""
    def unguarded(fn):
        def call(*args, **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        return call

    for name in ("_check_finite", "_log_row"):
        monkeypatch.setattr(am, name, unguarded(getattr(am, name)))
    classifier = tiny_classifier().cuda()
    x_u8, y = (t.cuda() for t in synthetic_training_set(3, 8))
    scores = am.apply_masks(classifier)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        log = am.train(classifier, scores, x_u8, y, epochs=3, batch_size=4, log_every=6)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [row["step"] for row in log] == [6, 12, 18]
