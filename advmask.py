"""AdvMask: few-shot adversarial mask tuning of CLIP, in one file.

AdvMask keeps a pre-trained CLIP image encoder frozen and learns which of its attention weights to switch off.
A real-valued score sits on every masked weight; the forward pass uses θ ⊙ 1[score > threshold] and a
straight-through estimator carries the gradient to the scores. The mask is trained min-max: 2-step PGD makes
adversarial images, and the mask minimises their cross-entropy plus LAFA, a confidence-weighted alignment of
every block's adversarial features with the clean ones. The result is CLIP with a 1-bit-per-weight mask.

Paper: "Identifying Robust Neural Pathways: Few-Shot Adversarial Mask Tuning for Vision-Language Models",
ICLR 2026, https://openreview.net/forum?id=kzGkXpW4FT

    python advmask.py --dataset oxford_pets --shots 16 --device cuda

Below, in the order of the paper's method: config, CLIP as a classifier, binary masks with a straight-through
estimator, PGD, losses (CE + LAFA), K-shot data, training, evaluation, results, command line. Each section uses
only torch / open_clip / torchvision and the sections above it, so any one can be copied out alone.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import zlib
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.nn.utils import parametrize
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------------------------------
# Config: datasets, prompt templates and the defaults of every hyperparameter (paper values or our choices)

# CoOp's prompt template per dataset; torchvision supplies the class names.
TEMPLATES = {
    "oxford_pets": ["a photo of a {}, a type of pet."],
}

# paper: λ = 50; ε = α = 1/255 with 2 PGD steps in training and 100 at test (ε, α in /255 units on the CLI).
LAM = 50.0
TRAIN_EPS, TRAIN_ALPHA, TRAIN_STEPS = 1.0, 1.0, 2
TEST_EPS, TEST_ALPHA, TEST_STEPS = 1.0, 1.0, 100
# not in the paper: mask init 1e-2 and threshold 5e-3 are R-AMT's (public mask-tuning code for CLIP).
MASK_INIT, MASK_THRESHOLD = 1e-2, 5e-3
# not in the paper: Adam with a cosine schedule and batch 32 as in R-AMT, but lr 1e-4 over a fixed budget of about
# 500 optimisation steps at every shot count (R-AMT's lr 8e-5 over 1-shot's few steps never turns a weight off).
# A score with a steady gradient sign moves ~lr per step and crosses the 5e-3 gap after ~10% of training; a score
# with pure noise random-walks ~√500·lr ≈ 2e-3, below the gap, so noise alone rarely flips a weight.
LR, BATCH_SIZE, TRAIN_BUDGET_STEPS = 1e-4, 32, 500

# A CLIP small enough to train on a CPU in seconds: for --dry-run and the tests (random weights).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# A small CLIP for --benchmark on a CPU: 65 tokens × batch 32 gives each weight about as much matrix-product work as
# ViT-B/32 at batch 32 (50 tokens), so the cost of masking relative to the rest is comparable.
BENCH_CLIP = {**TINY_CLIP, "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32}}


# ----------------------------------------------------------------------------------------------------------------------
# CLIP as a classifier: pixels in [0, 1] -> logits over class prompts, with per-block features for LAFA

class ClipClassifier(nn.Module):
    """Zero-shot CLIP classifier whose input is an image in [0, 1]; normalisation happens inside.

    Text features are computed once here, with the frozen text tower, and kept as a buffer: the mask only touches the
    image tower, so they never change.
    """

    def __init__(self, clip_model, class_names, templates, tokenizer=None):
        super().__init__()
        self.clip = clip_model
        visual = clip_model.visual
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        tokenizer = tokenizer or partial(open_clip.tokenize, context_length=clip_model.context_length)
        device = next(clip_model.parameters()).device
        with torch.no_grad():
            prompts = [clip_model.encode_text(tokenizer([t.format(c) for t in templates]).to(device), normalize=True)
                       for c in class_names]  # C × (n_templates, E)
            # T̂_c = normalize(mean over templates of normalize(text(template(c))))
            text = F.normalize(torch.stack([p.mean(0) for p in prompts]), dim=-1)  # (C, E)
        self.register_buffer("text_features", text)

    def forward(self, images, return_features=False):
        x = (images - self.mean) / self.std
        if return_features:
            out = self.clip.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
            image = out["image_features"]
            # each block's output with its class token put back in front: L × (B, T, D)
            feats = [torch.cat(pair, dim=1) for pair in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
        else:
            image = self.clip.visual(x)
        # logits = exp(logit_scale) · f̂(x) · T̂ᵀ
        logits = self.clip.logit_scale.exp() * F.normalize(image, dim=-1) @ self.text_features.T  # (B, C)
        return (logits, feats) if return_features else logits


# ----------------------------------------------------------------------------------------------------------------------
# Binary masks with a straight-through estimator, on the weights of the visual transformer

# Parameter names inside each visual block. Names, not module types, so they also fit open_clip versions that
# replace nn.MultiheadAttention.
MASK_TARGETS = {"mhsa": ("attn.in_proj_weight", "attn.out_proj.weight"), "mlp": ("mlp.c_fc.weight", "mlp.c_proj.weight")}
MASK_TARGETS["all"] = MASK_TARGETS["mhsa"] + MASK_TARGETS["mlp"]
MASK_FILE_FORMAT = 1
MASK_MAGIC = b"ADVMASK\n"


class _BinarizeSTE(torch.autograd.Function):
    """M_bin = 1[M > threshold] forward; identity backward (straight-through: ∂L/∂M := ∂L/∂M_bin)."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScoreMask(nn.Module):
    """Parametrization θ -> θ ⊙ 1[M > threshold] with learnable real-valued scores M, one per weight."""

    def __init__(self, weight, init, threshold):
        super().__init__()
        self.scores = nn.Parameter(torch.full(weight.shape, float(init), device=weight.device))
        self.threshold = threshold

    def forward(self, theta):
        # θ' = θ ⊙ M_bin; on weights stay θ bit for bit, off weights are 0; ∂L/∂M = (∂L/∂θ') ⊙ θ
        return theta * _BinarizeSTE.apply(self.scores, self.threshold).to(theta.dtype)


def visual_tower(model):
    """The open_clip image tower of a ClipClassifier or of a bare open_clip model."""
    return model.clip.visual if hasattr(model, "clip") else model.visual


def _masks(model):
    """(name relative to the visual tower, module, parameter name, ScoreMask) for every masked weight, in order."""
    for module_name, module in visual_tower(model).named_modules():
        if parametrize.is_parametrized(module):
            for param_name, chain in module.parametrizations.items():
                yield f"{module_name}.{param_name}", module, param_name, chain[0]


def _arch(model):
    """A short description of the visual tower, stored in mask files to refuse a mask made for another model."""
    visual = visual_tower(model)
    return (f"{type(visual).__name__}(layers={len(visual.transformer.resblocks)}, width={visual.transformer.width}, "
            f"patch={tuple(visual.patch_size)}, image={tuple(visual.image_size)})")


def apply_masks(model, target="mhsa", init=MASK_INIT, threshold=MASK_THRESHOLD):
    """Freeze every pre-trained weight and put a trainable binary mask on the chosen weights of the image tower.

    Args:
        model: a ClipClassifier or a bare open_clip CLIP model.
        target: "mhsa" (attention in_proj and out_proj weights, the paper's choice), "mlp" (c_fc, c_proj) or "all".
            Biases, norms, embeddings, the projection and the text tower are never masked.
        init: initial score of every weight (not in the paper; R-AMT's 1e-2).
        threshold: a weight is on while its score is above this (not in the paper; R-AMT's 5e-3).
    Returns:
        The list of score tensors, the only parameters left with requires_grad=True.
    Example:
        >>> scores = apply_masks(classifier, "mhsa")
        >>> optimizer = torch.optim.Adam(scores, lr=1e-4)
    """
    if target not in MASK_TARGETS:
        raise ValueError(f"unknown mask target {target!r}; use one of {', '.join(MASK_TARGETS)}")
    if next(_masks(model), None):
        raise ValueError("this model already has masks; bake_masks it or start from a fresh model")
    model.requires_grad_(False)
    scores = []
    for block in visual_tower(model).transformer.resblocks:
        for name in MASK_TARGETS[target]:
            module_name, _, param_name = name.rpartition(".")
            module = block.get_submodule(module_name)
            mask = ScoreMask(getattr(module, param_name), init, threshold)
            parametrize.register_parametrization(module, param_name, mask)
            scores.append(mask.scores)
    return scores


@contextlib.contextmanager
def fixed_masks(model):
    """Inside this block each masked weight θ ⊙ M_bin is formed once, with no gradient path to the scores."""
    with parametrize.cached():
        with torch.no_grad():
            for _, module, param_name, _ in _masks(model):
                getattr(module, param_name)  # fills the cache outside autograd
        yield


def mask_sparsity(model):
    """Fraction of masked weights that are off."""
    bits = [mask.scores > mask.threshold for *_, mask in _masks(model)]
    if not bits:
        raise ValueError("this model has no masks; call apply_masks first")
    return 1.0 - sum(b.sum().item() for b in bits) / sum(b.numel() for b in bits)


def bake_masks(model):
    """Replace every masked weight by θ ⊙ M_bin in place and remove the masks: a plain open_clip model remains."""
    for module in {id(m): m for _, m, _, _ in _masks(model)}.values():
        with torch.no_grad():
            baked = {name: getattr(module, name) for name in module.parametrizations}
        # not torch's remove_parametrizations: it deletes the property from the module's class, a class that
        # copy.deepcopy shares between a model and its copies, so baking a copy would break the original
        module.__class__ = module.__class__.__bases__[0]
        del module.parametrizations
        for name, weight in baked.items():
            module.register_parameter(name, nn.Parameter(weight, requires_grad=False))
    return model


def _atomic_write(path, write):
    """Call write(tmp) on a temporary file beside path, then rename it onto path: no reader sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_masks(model, path):
    """Store M_bin only, packed 1 bit per masked weight, with what load_masks needs to refuse a model it does not fit.

    The file is MASK_MAGIC, the header length (4 bytes, little-endian), a zlib-compressed JSON header (format, arch,
    target, threshold, names, shapes, n_weights, sha256 of the bits) and the bits, packed 8 to a byte in
    np.packbits order; numpy alone can read it.
    Args:
        model: a masked ClipClassifier or open_clip model.
        path: file to write (atomically); a ViT-B/32 "mhsa" mask is 28.3 M weights, about 3.5 MB.
    Example:
        >>> save_masks(classifier, "runs/masks.bin"); load_masks(fresh_classifier, "runs/masks.bin")
    """
    entries = list(_masks(model))
    if not entries:
        raise ValueError("this model has no masks; call apply_masks and train before saving")
    bits = torch.cat([(mask.scores > mask.threshold).flatten().cpu() for *_, mask in entries])  # (n,)
    packed = np.packbits(bits.numpy()).tobytes()  # ⌈n/8⌉ bytes
    names = [name for name, *_ in entries]
    suffixes = {name.split(".", 3)[3] for name in names}  # "transformer.resblocks.0.attn.in_proj_weight" -> "attn..."
    header = zlib.compress(json.dumps({
        "format": MASK_FILE_FORMAT,
        "arch": _arch(model),
        "target": next(t for t, params in MASK_TARGETS.items() if set(params) == suffixes),
        "threshold": entries[0][3].threshold,
        "names": names,
        "shapes": [list(mask.scores.shape) for *_, mask in entries],
        "n_weights": bits.numel(),
        "sha256": hashlib.sha256(packed).hexdigest(),
    }).encode())
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(MASK_MAGIC + len(header).to_bytes(4, "little") + header
                                                          + packed))


def load_masks(model, path):
    """Put the masks of a file written by save_masks onto model (masking it first if it has no masks yet).

    Every piece of metadata is checked; a file that does not fit raises ValueError saying what differs.
    Loaded scores sit at threshold ± 1: only the bits are stored, so the old scores cannot be recovered.
    Example:
        >>> load_masks(classifier, "runs/masks.bin"); bake_masks(classifier)
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mask file {path} does not exist; pass the masks.bin that a training run wrote")
    data = path.read_bytes()
    if not data.startswith(MASK_MAGIC):
        raise ValueError(f"{path} is not an advmask mask file; pass a file that save_masks wrote")
    start = len(MASK_MAGIC) + 4 + int.from_bytes(data[len(MASK_MAGIC):len(MASK_MAGIC) + 4], "little")
    try:
        header = json.loads(zlib.decompress(data[len(MASK_MAGIC) + 4:start]))
    except (zlib.error, ValueError):  # a cut or altered header fails to decompress or to parse
        raise ValueError(f"{path} has an unreadable header: it is truncated or corrupted; copy it again or re-run "
                         f"the training that wrote it") from None
    if header.get("format") != MASK_FILE_FORMAT:
        raise ValueError(f"{path} has mask format {header.get('format')}, this code reads {MASK_FILE_FORMAT}; use the "
                         f"advmask version that wrote it")
    packed = data[start:]
    n = header["n_weights"]
    if len(packed) != math.ceil(n / 8):
        raise ValueError(f"{path} holds {len(packed)} bytes of bits for {n} weights: it is truncated; copy it again "
                         f"or re-run the training that wrote it")
    if hashlib.sha256(packed).hexdigest() != header["sha256"]:
        raise ValueError(f"{path} fails its checksum: the bits are corrupted; copy it again or re-run the training")
    if header["arch"] != _arch(model):
        raise ValueError(f"{path} was made for {header['arch']}, but this model is {_arch(model)}; "
                         f"load it onto the architecture it was trained with")
    if next(_masks(model), None) is None:
        apply_masks(model, header["target"], threshold=header["threshold"])
    entries = list(_masks(model))
    ours = [(name, list(mask.scores.shape)) for name, *_, mask in entries]
    if ours != list(zip(header["names"], header["shapes"])):
        raise ValueError(f"{path} masks the {header['target']} weights, which are not the ones this model masks; "
                         f"load it onto an unmasked model or one masked with --mask-target {header['target']}")
    bits = torch.from_numpy(np.unpackbits(np.frombuffer(packed, np.uint8), count=n).astype(bool))  # (n,)
    with torch.no_grad():
        for chunk, (*_, mask) in zip(bits.split([m.scores.numel() for *_, m in entries]), entries):
            on = chunk.view(mask.scores.shape).to(mask.scores.device)
            mask.threshold = header["threshold"]
            mask.scores.copy_(torch.where(on, mask.threshold + 1.0, mask.threshold - 1.0))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# PGD: the l∞ attack of the inner maximisation (2 steps in training, 100 at test)

def pgd_attack(model, images, labels, eps=1 / 255, alpha=1 / 255, steps=2, random_start=True):
    """l∞ projected gradient ascent on the cross-entropy, in [0, 1] pixel space (Madry et al., 2018).

    Same algorithm as torchattacks' PGD: with random_start=False the two give identical images.
    Args:
        model: maps images in [0, 1] to logits; put in eval mode for the attack and restored after.
        images: (B, 3, H, W) float in [0, 1].
        labels: (B,) true classes.
        eps: radius of the l∞ ball, in pixel units (1/255 in the paper).
        alpha: step size, in pixel units.
        steps: number of gradient steps.
        random_start: start from a uniform point in the ε-ball (FAP and torchattacks do).
    Returns:
        Adversarial images, detached, with ‖x_adv − x‖∞ ≤ eps and values in [0, 1].
    Example:
        >>> x_adv = pgd_attack(classifier, x, y, eps=1/255, alpha=1/255, steps=100)
    """
    was_training = model.training
    model.eval()
    try:
        x0 = images.detach()
        x = x0.clone()
        if random_start:
            x = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x.requires_grad_(True)
            loss = F.cross_entropy(model(x), labels)
            # only the input's gradient: nothing accumulates in any parameter's .grad
            (grad,) = torch.autograd.grad(loss, x)
            # x ← clamp(x₀ + clamp(x + α·sign(∇ₓ L) − x₀, −ε, ε), 0, 1)
            x = x.detach() + alpha * grad.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(0, 1)
        return x.detach()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------------
# Losses: L_mask = L_CE(x_adv, y) + λ · L_LAFA(x, x_adv, y)

def lafa_loss(clean_feats, adv_feats, clean_logits, labels, adaptive=True, eps=1e-8):
    """Layer-wise adaptive feature alignment: pull each block's adversarial features onto the clean ones.

    Args:
        clean_feats: L × (B, T, D) block outputs on the clean images; targets, no gradient flows into them.
        adv_feats: L × (B, T, D) block outputs on the adversarial images.
        clean_logits: (B, C) logits on the clean images, for the confidence weights.
        labels: (B,) true classes.
        adaptive: weight each sample by its clean confidence (the paper's LAFA) or uniformly ("LAFA w/o adaptive").
        eps: keeps the weights finite when every clean confidence is ~0 (not in the paper).
    Returns:
        Scalar loss, ≥ 0, and 0 when the features match.
    Example:
        >>> loss = F.cross_entropy(adv_logits, y) + 50 * lafa_loss(clean_feats, adv_feats, clean_logits, y)
    """
    # not in the paper: ‖·‖² is taken as the mean over tokens and channels, not the sum, so that λ = 50 balances the
    # CE at the scale of CLIP's residual stream whatever the width and token count.
    d = torch.stack([(c.detach().float() - a.float()).pow(2).mean(dim=(1, 2))
                     for c, a in zip(clean_feats, adv_feats)])  # (L, B)
    with torch.no_grad():
        # p_i = p(y_i | x_i) on the clean input
        p = clean_logits.float().softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)  # (B,)
        # w_i = p_i / (E_B[p] + ε): confidently classified samples dominate, misclassified (noisy) ones count less
        w = p / (p.mean() + eps) if adaptive else torch.ones_like(p)
    # L_LAFA = 1/(|L||B|) Σ_l Σ_i w_i · d_i^l
    return (d * w).mean()


# ----------------------------------------------------------------------------------------------------------------------
# K-shot data: datasets on disk, the K-shot sampler, and the training set decoded once into a uint8 tensor

def sample_k_shot(labels, shots, seed, class_names=None):
    """Indices of exactly `shots` images of every class, without repeats, the same for the same arguments.

    Args:
        labels: sequence of int class labels, one per image of the training split.
        shots: images per class (K).
        seed: the sample depends on nothing else.
        class_names: optional, to name a class in the error and to require every one of them to be present.
    Returns:
        A sorted list of indices into labels, len = shots × number of classes.
    Example:
        >>> idx = sample_k_shot(dataset_labels, shots=16, seed=1)
    """
    labels = torch.as_tensor(labels)
    n_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(n_classes):
        pool = (labels == c).nonzero().flatten()
        if len(pool) < shots:
            name = f"{class_names[c]!r}" if class_names is not None else str(c)
            raise ValueError(f"class {name} has {len(pool)} training images, fewer than --shots {shots}; "
                             f"lower --shots to at most {len(pool)}")
        chosen += pool[torch.randperm(len(pool), generator=generator)[:shots]].tolist()
    return sorted(chosen)


def to_unit(images):
    """uint8 images in 0..255 -> float in [0, 1], the model's input space."""
    return images.float() / 255


def load_dataset(name, root, train, image_size, download=True):
    """One split of a dataset as (torchvision dataset of (uint8 (3, H, W), label), labels, class names)."""
    transform = T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC),
                           T.CenterCrop(image_size), T.PILToTensor()])
    if name != "oxford_pets":
        raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(TEMPLATES)}")
    try:
        ds = torchvision.datasets.OxfordIIITPet(root, split="trainval" if train else "test", transform=transform,
                                                download=download)
    except (RuntimeError, OSError) as e:  # torchvision raises these for a missing tree or a failed download
        raise ValueError(f"Oxford-IIIT Pet is not under {Path(root) / 'oxford-iiit-pet'} ({e}); torchvision expects "
                         f"images/<name>.jpg and annotations/trainval.txt, test.txt there: place them or allow "
                         f"the download") from None
    # torchvision keeps the labels in a private list; reading it avoids decoding every image to learn its class
    return ds, list(ds._labels), list(ds.classes)


def synthetic_dataset(n_classes, per_class, image_size, seed):
    """Random uint8 images with balanced labels, the data of --dry-run, in load_dataset's return format."""
    labels = torch.arange(n_classes).repeat_interleave(per_class)  # (N,)
    images = torch.randint(0, 256, (len(labels), 3, image_size, image_size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))  # (N, 3, H, W)
    return torch.utils.data.TensorDataset(images, labels), labels.tolist(), [f"class {c}" for c in range(n_classes)]


def cache_images(dataset, indices, device, num_workers=0):
    """Decode and resize the chosen images once: ((N, 3, H, W) uint8, (N,) int64), both on device."""
    subset = torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=64, num_workers=num_workers)
    images, labels = zip(*loader)
    return torch.cat(images).to(device), torch.cat(labels).to(device)


# ----------------------------------------------------------------------------------------------------------------------
# Training: min over the mask of E[L_CE(x_adv) + λ · L_LAFA], with x_adv from PGD

def default_epochs(n_images, batch_size, budget_steps=TRAIN_BUDGET_STEPS):
    """Epochs giving about budget_steps optimisation steps (at least one epoch), whatever the shot count."""
    return max(1, math.ceil(budget_steps / math.ceil(n_images / batch_size)))


def train_step(model, optimizer, x, y, lam=LAM, eps=1 / 255, alpha=1 / 255, steps=2, adaptive=True):
    """One min-max step on images x in [0, 1]; returns (L_CE, L_LAFA, adversarial logits), detached."""
    # inner max: x_adv = argmax_{‖x_adv − x‖∞ ≤ ε} L_CE(f(x_adv), y), with the mask held fixed (formed once)
    with fixed_masks(model):
        x_adv = pgd_attack(model, x, y, eps, alpha, steps)
    with torch.no_grad():
        clean_logits, clean_feats = model(x, return_features=True)
    adv_logits, adv_feats = model(x_adv, return_features=True)
    ce = F.cross_entropy(adv_logits, y)
    lafa = lafa_loss(clean_feats, adv_feats, clean_logits, y, adaptive=adaptive)
    # L_mask = L_CE(x_adv, y) + λ · L_LAFA(x, x_adv, y)
    loss = ce + lam * lafa
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    # straight-through: M ← M − γ · Adam(∂L/∂M_bin)
    optimizer.step()
    return ce.detach(), lafa.detach(), adv_logits.detach()


def train(model, scores, images, labels, epochs, batch_size=BATCH_SIZE, lr=LR, lam=LAM, eps=1 / 255, alpha=1 / 255,
          steps=2, adaptive=True, seed=0, log_every=20):
    """Adversarial mask tuning: only the scores change; every pre-trained weight stays bit for bit as it was.

    Args:
        model: a ClipClassifier with masks (apply_masks).
        scores: the score tensors apply_masks returned.
        images: (N, 3, H, W) uint8 training images, already on the model's device.
        labels: (N,) their classes.
        epochs: passes over the images; default_epochs gives the budget we use.
        batch_size, lr: Adam on the scores with a cosine schedule to 0.
        lam: λ, the weight of LAFA (50 in the paper; 0 gives CE-only adversarial mask tuning).
        eps, alpha, steps: the training PGD, in pixel units.
        adaptive: LAFA with confidence weights (the paper) or without.
        seed: order of batches and flips.
        log_every: print a line every this many steps.
    Returns:
        List of the logged rows (dicts), the last one at the final step.
    Example:
        >>> scores = apply_masks(classifier)
        >>> train(classifier, scores, x_u8, y, epochs=default_epochs(len(y), 32))
    """
    optimizer = torch.optim.Adam(scores, lr=lr)
    total = epochs * math.ceil(len(labels) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    generator = torch.Generator().manual_seed(seed)
    # running sums of CE·B, LAFA·B, correct, images; kept on the device so that a step never waits for the GPU
    sums = torch.zeros(4, device=labels.device)
    history, step, tic = [], 0, time.perf_counter()
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).to(labels.device).split(batch_size):
            step += 1
            x, y = to_unit(images[batch]), labels[batch]
            # not in the paper: random horizontal flips are the only augmentation; they run on the device, on the
            # cached tensor, so no image is decoded twice
            flip = (torch.rand(len(y), generator=generator) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            ce, lafa, adv_logits = train_step(model, optimizer, x, y, lam, eps, alpha, steps, adaptive)
            scheduler.step()
            sums += torch.stack([ce * len(y), lafa * len(y), (adv_logits.argmax(1) == y).sum(), sums.new_tensor(len(y))])
            if step % log_every == 0 or step == total:
                ce_sum, lafa_sum, correct, seen = sums.tolist()
                row = {"step": step, "ce": ce_sum / seen, "lafa": lafa_sum / seen, "adv_acc": correct / seen,
                       "off": mask_sparsity(model), "img_per_s": seen / (time.perf_counter() - tic)}
                memory = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if labels.is_cuda else ""
                print(f"step {step}/{total} | ce {row['ce']:.3f} | lafa {row['lafa']:.4f} | adv-acc {row['adv_acc']:.2f} "
                      f"| off {100 * row['off']:.2f}% | {row['img_per_s']:.0f} img/s{memory}", flush=True)
                history.append(row)
                sums.zero_()
                tic = time.perf_counter()
    return history


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: clean accuracy and accuracy under PGD (100 steps in the paper)

def evaluate(model, loader, eps=1 / 255, alpha=1 / 255, steps=100):
    """Clean and robust accuracy of model over a loader of (uint8 images, labels).

    Args:
        model: maps images in [0, 1] to logits (bake the masks first: it is then exactly as fast as plain CLIP).
        loader: yields ((B, 3, H, W) uint8, (B,) labels).
        eps, alpha, steps: the test PGD, in pixel units, with a random start.
    Returns:
        {"clean_acc": fraction correct on clean images, "adv_acc": fraction correct under PGD, "n": images}.
    Example:
        >>> evaluate(bake_masks(classifier), test_loader, eps=1/255, alpha=1/255, steps=100)
    """
    device = next(model.parameters()).device
    clean = adv = n = 0
    for images, labels in tqdm(loader, desc=f"eval PGD-{steps}", leave=False):
        x, y = to_unit(images.to(device, non_blocking=True)), labels.to(device)
        with torch.no_grad():
            clean += (model(x).argmax(1) == y).sum().item()
        x_adv = pgd_attack(model, x, y, eps, alpha, steps, random_start=True)
        with torch.no_grad():
            adv += (model(x_adv).argmax(1) == y).sum().item()
        n += len(y)
    return {"clean_acc": clean / n, "adv_acc": adv / n, "n": n}


# ----------------------------------------------------------------------------------------------------------------------
# Results: what a run leaves in --out-dir (config.json, masks.bin, results.json), each written atomically

def write_json(path, obj):
    """Write obj as indented JSON, atomically."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"))


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark: what masking adds to plain adversarial training, and what a baked mask costs at evaluation

def _bench_model(clip_config, device, target, masked, n_classes=10):
    """A ClipClassifier and an Adam over either mask scores or, unmasked, the same weights made trainable."""
    model = ClipClassifier(open_clip.CLIP(**clip_config).to(device), [f"class {c}" for c in range(n_classes)],
                           ["a photo of a {}."])
    if masked:
        params = apply_masks(model, target)
    else:
        model.requires_grad_(False)
        blocks = visual_tower(model).transformer.resblocks
        params = [block.get_parameter(name).requires_grad_(True) for block in blocks for name in MASK_TARGETS[target]]
    return model, torch.optim.Adam(params, lr=LR)


def _bench_batch(clip_config, batch_size, device, n_classes=10):
    size = clip_config["vision_cfg"]["image_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, size, size, generator=g).to(device)
    return x, torch.randint(0, n_classes, (batch_size,), generator=g).to(device)


def _min_seconds(fns, device, repeats):
    """Fastest time of each fn over interleaved rounds after a warm-up round. Rounds alternate the order, so drifts in
    machine speed and order effects hit all alike; the minimum, as timeit advises, is the least noisy estimate of
    what the computation itself costs."""
    times = {name: [] for name in fns}
    for i in range(repeats + 1):
        for name, fn in list(fns.items())[:: 1 if i % 2 else -1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            tic = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - tic)
    return {name: min(t[1:]) for name, t in times.items()}


def _train_peak_memory(clip_config, batch_size, device, target, masked, precision):
    """Peak memory of two training steps in this (fresh) process: CUDA max allocated, or RSS growth on CPU."""
    device = torch.device(device)
    model, optimizer = _bench_model(clip_config, device, target, masked)
    x, y = _bench_batch(clip_config, batch_size, device)
    rss_before = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
        for _ in range(2):
            train_step(model, optimizer, x, y)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource  # Unix only, like /proc above; the benchmark is for Linux machines
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before


def benchmark(clip_config, batch_size, device, precision, target="mhsa", repeats=9, pgd_steps=10):
    """Masked vs unmasked training step and baked vs plain PGD evaluation, as ratios measured in one process.

    "Unmasked" trains the very weights the mask would cover, directly: the ratio is the price of masking over plain
    adversarial fine-tuning of the same weights. Random weights: only speed and memory are measured.
    """
    amp = partial(torch.autocast, device.type, torch.bfloat16, enabled=precision == "bf16")
    x, y = _bench_batch(clip_config, batch_size, device)
    masked, masked_opt = _bench_model(clip_config, device, target, masked=True)
    plain, plain_opt = _bench_model(clip_config, device, target, masked=False)
    with amp():
        train_s = _min_seconds({"masked": lambda: train_step(masked, masked_opt, x, y),
                                   "plain": lambda: train_step(plain, plain_opt, x, y)}, device, repeats)
        baked, frozen = bake_masks(masked), plain.requires_grad_(False)
        eval_s = _min_seconds({"baked": lambda: pgd_attack(baked, x, y, steps=pgd_steps),
                                  "plain": lambda: pgd_attack(frozen, x, y, steps=pgd_steps)}, device, repeats)
    # each training variant's peak memory comes from a fresh process, so the two peaks do not mix
    with torch.multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        memory = {name: pool.apply(_train_peak_memory, (clip_config, batch_size, str(device), target, name == "masked",
                                                        precision)) for name in ("masked", "plain")}
    n_weights = sum(p.numel() for p in plain_opt.param_groups[0]["params"])
    with tempfile.TemporaryDirectory() as tmp:
        scored, _ = _bench_model(clip_config, "cpu", target, masked=True)
        save_masks(scored, Path(tmp) / "masks.bin")
        bits_per_weight = (Path(tmp) / "masks.bin").stat().st_size * 8 / n_weights
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "precision": precision,
        "batch_size": batch_size, "masked_weights": n_weights, "pgd_steps": pgd_steps,
        "train_img_s_masked": batch_size / train_s["masked"], "train_img_s_plain": batch_size / train_s["plain"],
        "train_time_ratio": train_s["masked"] / train_s["plain"],
        "eval_img_s_baked": batch_size / eval_s["baked"], "eval_img_s_plain": batch_size / eval_s["plain"],
        "eval_time_ratio": eval_s["baked"] / eval_s["plain"],
        "train_peak_mem_masked_mb": memory["masked"] / 2**20, "train_peak_mem_plain_mb": memory["plain"] / 2**20,
        "train_mem_ratio": memory["masked"] / memory["plain"], "mask_bits_per_weight": bits_per_weight,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def load_clip(model, pretrained):
    """An open_clip model and its tokenizer from a model name or config JSON, and a pretrained tag, file or "none"."""
    if model.endswith(".json"):
        if not Path(model).is_file():
            raise ValueError(f"model config {model} does not exist; pass an open_clip model name or a config JSON")
        open_clip.add_model_config(model)
        model = Path(model).stem
    if model not in open_clip.list_models():
        raise ValueError(f"unknown model {model!r}; pass an open_clip model name such as ViT-B-32 or a config JSON")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained == "none":
        print("WARNING: --pretrained none: the model has RANDOM weights, its accuracies mean nothing", file=sys.stderr)
    elif pretrained not in tags and not Path(pretrained).is_file():
        raise ValueError(f"--pretrained {pretrained} is neither an open_clip tag of {model} ({', '.join(tags) or 'none'}) "
                         f"nor an existing file; pass a tag, a checkpoint path, or none")
    try:
        clip = open_clip.create_model(model, pretrained=None if pretrained == "none" else pretrained)
    except RuntimeError as e:  # open_clip raises RuntimeError both for a failed download and a misfit checkpoint
        if pretrained in tags:
            raise ValueError(f"could not fetch the {pretrained!r} weights of {model} (no network?); download them "
                             f"where there is one and pass the file with --pretrained PATH") from None
        raise ValueError(f"checkpoint {pretrained} does not fit {model} ({str(e).splitlines()[0][:200]}); pass the "
                         f"--model it was saved from") from None
    return clip, open_clip.get_tokenizer(model)


def parse_args(argv):
    p = argparse.ArgumentParser(description="AdvMask: few-shot adversarial mask tuning of CLIP.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # every usage error ends in one line and exit status 2, without argparse's usage block
    p.error = lambda message: p.exit(2, f"advmask: error: {message}\n")
    p.add_argument("--dataset", default="oxford_pets", choices=sorted(TEMPLATES))
    p.add_argument("--data-root", default="data", help="where the torchvision datasets live (or get downloaded)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing dataset")
    p.add_argument("--shots", type=int, default=16, help="training images per class (K)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                   help="autocast precision of forward and backward passes; scores, optimiser and accuracies stay "
                        "fp32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--model", default=None,
                   help="open_clip model name, or path to an open_clip config JSON (default: ViT-B-32; with "
                        "--benchmark, a small built-in config)")
    p.add_argument("--pretrained", default="openai", help="open_clip tag, local checkpoint path, or none (random)")
    p.add_argument("--mask-target", default="mhsa", choices=list(MASK_TARGETS))
    p.add_argument("--lam", type=float, default=LAM, help="λ, weight of LAFA")
    p.add_argument("--no-adaptive", action="store_true", help="LAFA without confidence weights (ablation)")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default: enough for about {TRAIN_BUDGET_STEPS} optimisation steps, at least 1")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--train-eps", type=float, default=TRAIN_EPS, help="in /255 units")
    p.add_argument("--train-alpha", type=float, default=TRAIN_ALPHA, help="in /255 units")
    p.add_argument("--train-steps", type=int, default=TRAIN_STEPS)
    p.add_argument("--test-eps", type=float, default=TEST_EPS, help="in /255 units")
    p.add_argument("--test-alpha", type=float, default=TEST_ALPHA, help="in /255 units")
    p.add_argument("--test-steps", type=int, default=TEST_STEPS)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data-loading processes")
    p.add_argument("--out-dir", default=None, help="default: runs/few_shot/<dataset>/<shots>shot/seed<seed>")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny random CLIP, synthetic images, 2 epochs, PGD-3 eval: the whole pipeline in seconds")
    p.add_argument("--benchmark", action="store_true",
                   help="print one JSON line: masked vs unmasked training speed and memory, baked vs plain PGD speed, "
                        "mask-file bits per weight (random weights)")
    args = p.parse_args(argv)
    for flag in ("shots", "batch_size", "eval_batch_size", "epochs"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be a positive integer")
    for flag in ("train_eps", "train_alpha", "test_eps", "test_alpha"):
        if not 0 <= getattr(args, flag) <= 255:
            p.error(f"--{flag.replace('_', '-')} is in /255 units and must lie in [0, 255]")
    for flag in ("train_steps", "test_steps", "workers"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be 0 or more")
    if args.lam < 0 or args.lr <= 0:
        p.error("--lam must be 0 or more and --lr positive")
    return args


def run(args):
    """One AdvMask run: load CLIP and data, tune the mask on K shots, save it, evaluate clean and under PGD."""
    start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is visible; pass --device cpu")
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    amp = partial(torch.autocast, device.type, torch.bfloat16, enabled=precision == "bf16")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 matmuls may use TF32
    torch.manual_seed(args.seed)
    if args.benchmark:
        if args.model is None:
            config = BENCH_CLIP
        elif args.model.endswith(".json"):
            config = json.loads(Path(args.model).read_text())
        else:
            config = open_clip.get_model_config(args.model)
        if config is None:
            raise ValueError(f"unknown model {args.model!r}; pass an open_clip model name or a config JSON")
        print(json.dumps({"model": args.model or "BENCH_CLIP", **benchmark(config, args.batch_size, device, precision,
                                                                            args.mask_target)}))
        return None
    out_dir = Path(args.out_dir or f"runs/few_shot/{args.dataset}/{args.shots}shot/seed{args.seed}")

    if args.dry_run:
        clip, tokenizer = open_clip.CLIP(**TINY_CLIP), None
        size = TINY_CLIP["vision_cfg"]["image_size"]
        train_set, train_labels, class_names = synthetic_dataset(4, max(args.shots, 4), size, args.seed)
        test_set = synthetic_dataset(4, 4, size, args.seed + 1)[0]
        args.epochs, args.test_steps = args.epochs or 2, 3
    else:
        clip, tokenizer = load_clip(args.model or "ViT-B-32", args.pretrained)
        size = clip.visual.image_size[0]
        train_set, train_labels, class_names = load_dataset(args.dataset, args.data_root, True, size,
                                                            not args.no_download)
        test_set = load_dataset(args.dataset, args.data_root, False, size, not args.no_download)[0]
    indices = sample_k_shot(train_labels, args.shots, args.seed, class_names)
    classifier = ClipClassifier(clip.to(device), class_names, TEMPLATES[args.dataset], tokenizer)
    scores = apply_masks(classifier, args.mask_target)
    images, labels = cache_images(train_set, indices, device, args.workers)
    epochs = args.epochs or default_epochs(len(labels), args.batch_size)
    print(f"{args.dataset}: {len(labels)} training images ({args.shots} per class, {len(class_names)} classes), "
          f"{len(test_set)} test images; {sum(s.numel() for s in scores):,} masked weights; {epochs} epochs on {device}")
    write_json(out_dir / "config.json", {**vars(args), "device": str(device), "precision": precision, "epochs": epochs})

    with amp():
        history = train(classifier, scores, images, labels, epochs, batch_size=args.batch_size, lr=args.lr,
                        lam=args.lam, eps=args.train_eps / 255, alpha=args.train_alpha / 255, steps=args.train_steps,
                        adaptive=not args.no_adaptive, seed=args.seed)
    train_seconds = time.perf_counter() - start
    save_masks(classifier, out_dir / "masks.bin")
    sparsity = mask_sparsity(classifier)
    bake_masks(classifier)  # evaluation on plain weights costs what plain CLIP costs
    loader = torch.utils.data.DataLoader(test_set, batch_size=args.eval_batch_size, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    with amp():
        result = evaluate(classifier, loader, args.test_eps / 255, args.test_alpha / 255, args.test_steps)
    seconds = time.perf_counter() - start
    print(f"result | clean {100 * result['clean_acc']:.2f}% | adv {100 * result['adv_acc']:.2f}% "
          f"(PGD-{args.test_steps}, eps {args.test_eps:g}/255) | n {result['n']} | off {100 * sparsity:.2f}% "
          f"| {seconds:.0f} s")
    write_json(out_dir / "results.json", {**result, "sparsity": sparsity, "train_seconds": train_seconds,
                                          "seconds": seconds, "train_log": history, "settings": vars(args)})
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # library functions raise ValueError with a sentence that says what to do
        print(f"advmask: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
