"""AdvMask: few-shot adversarial mask tuning of CLIP, in one file.

AdvMask keeps a pre-trained CLIP image encoder frozen and learns which of its attention weights to switch off.
A real-valued score sits on every masked weight; the forward pass uses θ ⊙ 1[score > threshold] and a
straight-through estimator carries the gradient to the scores. The mask is trained min-max: 2-step PGD makes
adversarial images, and the mask minimises their cross-entropy plus LAFA, a confidence-weighted alignment of
every block's adversarial features with the clean ones. The result is CLIP with a 1-bit-per-weight mask.

Paper: "Identifying Robust Neural Pathways: Few-Shot Adversarial Mask Tuning for Vision-Language Models",
ICLR 2026, https://openreview.net/forum?id=kzGkXpW4FT

    python advmask.py --dataset oxford_pets --shots 16 --device cuda

The method comes first, whole, in the paper's order (constants, CLIP as a classifier, masks with a straight-through
estimator, PGD, losses, K-shot sampler, training, evaluation, and all of it in one call); the tooling follows.
"""

import collections
import contextlib
import math
import sys
import time
from functools import partial

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------------------------------
# Constants: the paper's values, then our choices. ε and α are in pixel units ([0, 1] images); the CLI takes /255.

# paper: λ = 50; l∞ PGD with ε = α = 1/255, 2 steps in training and 100 at test; masks on the attention (MHSA) weights
LAM = 50.0
TRAIN_EPS, TRAIN_ALPHA, TRAIN_STEPS = 1 / 255, 1 / 255, 2
TEST_EPS, TEST_ALPHA, TEST_STEPS = 1 / 255, 1 / 255, 100
# The weights a mask covers: "mhsa" (attention, the paper's); "mlp" and "all" are the paper's which-layers ablation.
MASK_TARGETS = ("mhsa", "mlp", "all")
# not in the paper (OpenAI's ViTs only): per family of open_clip image tower, its blocks and a block's attention and
# MLP weights, by name (it fits open_clip versions that replace nn.MultiheadAttention); a new family is one entry.
FAMILIES = {  # family: (blocks, attention weights, MLP weights)
    "open_clip ViT": ("transformer.resblocks", ("attn.in_proj_weight", "attn.out_proj.weight"),  # OpenAI's, CoCa's
                      ("mlp.c_fc.weight", "mlp.c_proj.weight")),
    "timm ViT": ("trunk.blocks", ("attn.qkv.weight", "attn.proj.weight"),  # SigLIP, SigLIP2, PE-Core
                 ("mlp.fc1.weight", "mlp.fc2.weight")),
    "timm EVA02": ("trunk.blocks", ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                                    "attn.proj.weight"), ("mlp.fc1_g.weight", "mlp.fc1_x.weight", "mlp.fc2.weight")),
}
# not in the paper: mask init 1e-2 and threshold 5e-3 are R-AMT's (public mask-tuning code for CLIP).
MASK_INIT, MASK_THRESHOLD = 1e-2, 5e-3
# not in the paper: Adam with a cosine schedule and batch 32 as in R-AMT, lr 1e-4 over a fixed budget of about 500
# optimisation steps at every shot count (the README's "How the training budget was chosen" gives the reason).
LR, BATCH_SIZE, TRAIN_BUDGET_STEPS = 1e-4, 32, 500
# not in the paper: tune_weights (adversarial fine-tuning of the masked weights) takes Adam at 1e-5, the step CLIP
# fine-tuning uses (FARE, WiSE-FT), for the same budget; a sweep on the tiny CLIP is in the README ("Mask or weights?")
WEIGHTS_LR = 1e-5
# not in the paper: training and evaluation in fp32 on every device (TF32 matmuls on CUDA). Under bf16, LAFA's signal
# at ε = 1/255 drowns in rounding, an error 8-13× the signal per block on ViT-B/32 (--benchmark precision; README,
# "Precision"); bf16 did not weaken PGD or AutoAttack on a small CLIP (README, "Evaluation"), unmeasured on ViT-B/32
TRAIN_PRECISION = EVAL_PRECISION = "fp32"


# ----------------------------------------------------------------------------------------------------------------------
# CLIP as a classifier: pixels in [0, 1] -> logits over class prompts, with per-block features for LAFA

class ClipClassifier(nn.Module):
    """Zero-shot CLIP classifier whose input is an image in [0, 1]; normalisation happens inside. Text features are
    computed once here, with the frozen text tower, and kept as a buffer: the mask only touches the image tower.
    tokenizer: the model's own, open_clip.get_tokenizer(name) (SigLIP's is not OpenAI's); default open_clip.tokenize."""

    def __init__(self, clip_model, class_names, templates, tokenizer=None):
        super().__init__()
        self.clip = clip_model
        mean = getattr(clip_model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(clip_model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        device = next(clip_model.parameters()).device  # every buffer on the CLIP's device; .to() moves them along
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1))
        tokenizer = tokenizer or partial(open_clip.tokenize, context_length=clip_model.context_length)
        with torch.no_grad():
            prompts = [clip_model.encode_text(tokenizer([t.format(c) for t in templates]).to(device), normalize=True)
                       for c in class_names]  # C × (n_templates, E)
            # T̂_c = normalize(mean over templates of normalize(text(template(c)))); one template's as is (CoOp, FAP)
            text = torch.stack([p[0] if len(p) == 1 else F.normalize(p.mean(0), dim=-1) for p in prompts])  # (C, E)
        self.register_buffer("text_features", text.float())

    def forward(self, images, return_features=False):
        x = (images - self.mean) / self.std
        if return_features:
            out = self.clip.visual.forward_intermediates(x, output_fmt="NLC", output_extra_tokens=True)
            image, blocks = out["image_features"], out["image_intermediates"]
            # not in the paper: LAFA aligns each block's output, every token (the paper says "each layer's features");
            # the class token goes back in front of the patch tokens (SigLIP has none: no prefix): L × (B, T, D)
            prefix = out.get("image_intermediates_prefix") or [z[:, :0] for z in blocks]
            feats = [torch.cat(pair, dim=1) for pair in zip(prefix, blocks)]
        else:
            image = self.clip.encode_image(x, normalize=False)  # CoCa's tower also returns its tokens; this does not
        # not in the paper: logits in fp32 (bf16's 0.125 grid at 20-35 would tie argmaxes), an fp16 network's in fp16
        dtype = torch.float16 if image.dtype == torch.float16 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            # logits = exp(logit_scale) · f̂(x) · T̂ᵀ: (B, C)
            logits = self.clip.logit_scale.exp() * F.normalize(image.to(dtype), dim=-1) @ self.text_features.to(dtype).T
            if getattr(self.clip, "logit_bias", None) is not None:  # SigLIP's, added as open_clip adds it: it moves
                logits = logits + self.clip.logit_bias  # every class alike, so softmax, CE and argmax ignore it
        return (logits, feats) if return_features else logits


# ----------------------------------------------------------------------------------------------------------------------
# Binary masks with a straight-through estimator, on the weights of the visual transformer

class _BinarizeSTE(torch.autograd.Function):
    """M_bin = 1[M > threshold] forward; identity backward (straight-through: ∂L/∂M := ∂L/∂M_bin)."""

    @staticmethod
    def forward(ctx, scores, threshold):
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScoreMask(nn.Module):
    """Parametrization θ -> θ ⊙ 1[M > threshold] with learnable real-valued scores M, one per weight; it keeps its
    target (MASK_TARGETS) and param_order, its module's parameter names before masking, which bake_masks restores."""

    def __init__(self, weight, init, threshold, target, param_order):
        super().__init__()
        self.scores = nn.Parameter(torch.full(weight.shape, float(init), device=weight.device))
        self.threshold, self.target, self.param_order = threshold, target, tuple(param_order)

    def forward(self, theta):
        # θ' = θ ⊙ M_bin; on weights stay θ bit for bit, off weights are 0; ∂L/∂M = (∂L/∂θ') ⊙ θ
        return theta * _BinarizeSTE.apply(self.scores, self.threshold).to(theta.dtype)


def visual_tower(model):
    """The open_clip image tower of a ClipClassifier or of a bare open_clip model."""
    return model.clip.visual if hasattr(model, "clip") else model.visual


# A masked weight: its name relative to the visual tower, its module, the parameter's name there, its ScoreMask
Masked = collections.namedtuple("Masked", "name module param mask")
Tower = collections.namedtuple("Tower", "family path blocks names")  # an image tower as tower_family finds it


def _masks(model):
    """A Masked record for every masked weight of the image tower, in order."""
    for module_name, module in visual_tower(model).named_modules():
        if parametrize.is_parametrized(module):
            for param, chain in module.parametrizations.items():
                yield Masked(f"{module_name}.{param}", module, param, chain[0])


def tower_family(model, target="mhsa"):
    """Tower(family, blocks' path, blocks, target's weight names) of the first FAMILIES entry whose blocks have them."""
    visual = visual_tower(model)
    for family, (path, attention, mlp) in FAMILIES.items():
        names = {"mhsa": attention, "mlp": mlp, "all": attention + mlp}[target]
        blocks = dict(visual.named_modules()).get(path)  # None where the tower has no such path
        if blocks and all(set(names) <= {n.replace("parametrizations.", "").removesuffix(".original")
                                         for n, _ in block.named_parameters()} for block in blocks):
            return Tower(family, path, blocks, names)
    raise ValueError(f"the {type(getattr(visual, 'trunk', visual)).__name__} image tower has no transformer blocks "
                     f"with the {target} weights of a family AdvMask knows ({', '.join(FAMILIES)}); use a model of "
                     f"one of them" + (", or --mask-target mhsa" if target != "mhsa" else ""))


def target_weights(model, target="mhsa"):
    """(name relative to the visual tower, weight) of every weight a target covers (MASK_TARGETS), block by block."""
    if target not in MASK_TARGETS:
        raise ValueError(f"unknown mask target {target!r}; use one of {', '.join(MASK_TARGETS)}")
    _, path, blocks, names = tower_family(model, target)
    return [(f"{path}.{i}.{name}", block.get_parameter(name)) for i, block in enumerate(blocks) for name in names]


def apply_masks(model, target="mhsa", init=MASK_INIT, threshold=MASK_THRESHOLD):
    """Freeze every pre-trained weight and put a trainable binary mask on the chosen weights of the image tower.

    Args:
        model: a ClipClassifier or a bare open_clip CLIP model.
        target: "mhsa" (every block's attention weights, the paper's choice), "mlp" or "all", as FAMILIES names them;
            biases, norms, embeddings, pooling heads, projections and the text tower are never masked.
        init, threshold: every score starts at init; a weight is on while its score is above threshold.
    Returns:
        The list of score tensors, the only parameters left with requires_grad=True.
    Example:
        >>> optimizer = torch.optim.Adam(apply_masks(classifier, "mhsa"), lr=1e-4)
    """
    if next(_masks(model), None):
        raise ValueError("this model already has masks; bake_masks it or start from a fresh model")
    weights = target_weights(model, target)
    model.requires_grad_(False)
    scores = []
    for name, weight in weights:
        module_name, _, param_name = name.rpartition(".")
        module = visual_tower(model).get_submodule(module_name)
        mask = ScoreMask(weight, init, threshold, target, param_order=module._parameters)
        parametrize.register_parametrization(module, param_name, mask)
        scores.append(mask.scores)
    return scores


@contextlib.contextmanager
def fixed_masks(model):
    """Inside this block each masked weight θ ⊙ M_bin is formed once, with no gradient path to the scores."""
    with parametrize.cached():
        with torch.no_grad():
            for m in _masks(model):
                getattr(m.module, m.param)  # fills the cache outside autograd
        yield


def mask_sparsity(model):
    """Fraction of masked weights that are off."""
    bits = [m.mask.scores > m.mask.threshold for m in _masks(model)]
    if not bits:
        raise ValueError("this model has no masks; call apply_masks first")
    return 1.0 - sum(b.sum().item() for b in bits) / sum(b.numel() for b in bits)


def bake_masks(model):
    """Replace every masked weight by θ ⊙ M_bin in place and remove the masks: a plain open_clip model remains, with
    its parameters in their original order."""
    for module in {id(m.module): m.module for m in _masks(model)}.values():
        baked = {name: getattr(module, name).detach() for name in module.parametrizations}  # θ ⊙ M_bin
        order = next(iter(module.parametrizations.values()))[0].param_order  # the first mask saw every parameter
        # not torch's remove_parametrizations: it deletes the property from the module's class, a class that
        # copy.deepcopy shares between a model and its copies, so baking a copy would break the original
        module.__class__ = module.__class__.__bases__[0]
        del module.parametrizations
        for name, weight in baked.items():
            module.register_parameter(name, nn.Parameter(weight, requires_grad=False))
        # named_parameters() in a fresh model's order, so that code zipping two models' parameters pairs them right
        module._parameters.update({name: module._parameters.pop(name) for name in order})  # popped, then in order
    return model


def tune_weights(model, target="mhsa"):
    """The comparator of apply_masks: freeze every pre-trained weight but the chosen ones of the image tower and
    return those, to be trained directly (adversarial fine-tuning of exactly the weights the mask would cover)."""
    weights = target_weights(model, target)
    model.requires_grad_(False)
    return [weight.requires_grad_(True) for _, weight in weights]


# ----------------------------------------------------------------------------------------------------------------------
# PGD: the l∞ attack of the inner maximisation (2 steps in training, 100 at test)

def pgd_attack(model, images, labels, eps=TEST_EPS, alpha=TEST_ALPHA, steps=TEST_STEPS, random_start=True,
               loss_fn=F.cross_entropy, generator=None):
    """l∞ projected gradient ascent on a loss (cross-entropy by default), in [0, 1] pixel space (Madry et al., 2018);
    torchattacks' PGD is the same algorithm: with random_start=False the two give identical images.

    Args:
        model: maps images in [0, 1] to logits; put in eval mode for the attack and restored after.
        images, labels: (B, 3, H, W) float in [0, 1], and their (B,) true classes.
        eps, alpha, steps: l∞ radius and step size in pixel units, and the number of steps (defaults: the paper's
            test attack, PGD-100 at ε = α = 1/255; training passes TRAIN_EPS, TRAIN_ALPHA, TRAIN_STEPS).
        random_start: start from a uniform point in the ε-ball (as FAP and torchattacks do), drawn from generator (a
            torch.Generator on the images' device; default torch's global one).
        loss_fn: the loss to maximise, (logits, labels) -> scalar, e.g. cw_loss (the CW margin).
    Returns:
        Adversarial images, detached, with ‖x_adv − x‖∞ ≤ eps and values in [0, 1].
    Example:
        >>> x_adv = pgd_attack(classifier, x, y, eps=1/255, alpha=1/255, steps=100)
    """
    was_training = model.training
    model.eval()
    try:
        x0 = images.detach()
        noise = torch.empty_like(x0).uniform_(-eps, eps, generator=generator) if random_start else 0
        x = (x0 + noise).clamp(0, 1)  # a new tensor, never x0 itself
        for _ in range(steps):
            x.requires_grad_(True)
            loss = loss_fn(model(x), labels)
            # only the input's gradient: nothing accumulates in any parameter's .grad; a model whose output does not
            # depend differentiably on its input (gradient masking) gets a zero gradient instead of an error
            (grad,) = torch.autograd.grad(loss, x, materialize_grads=True)
            # x ← clamp(x₀ + clamp(x + α·sign(∇ₓ L) − x₀, −ε, ε), 0, 1)
            x = x.detach() + alpha * grad.sign()
            x = (x0 + (x - x0).clamp(-eps, eps)).clamp(0, 1)
        return x.detach()
    finally:
        model.train(was_training)


# ----------------------------------------------------------------------------------------------------------------------
# Losses: L_mask = L_CE(x_adv, y) + λ · L_LAFA(x, x_adv, y)

def lafa_loss(clean_feats, adv_feats, clean_logits, labels, adaptive=True, stabiliser=1e-8):
    """Layer-wise adaptive feature alignment: pull each block's adversarial features onto the clean ones.

    Args:
        clean_feats, adv_feats: L × (B, T, D) block outputs on the clean images (targets: no gradient flows into
            them) and on the adversarial ones.
        clean_logits, labels: (B, C) logits on the clean images, for the confidence weights, and (B,) true classes.
        adaptive: weight each sample by its clean confidence (the paper's LAFA) or uniformly ("LAFA w/o adaptive").
        stabiliser: the paper's ε in the weights' denominator (value not in the paper), not PGD's ε.
    Returns:
        Scalar loss, ≥ 0, and 0 when the features match.
    Example:
        >>> loss = F.cross_entropy(adv_logits, y) + 50 * lafa_loss(clean_feats, adv_feats, clean_logits, y)
    """
    # not in the paper: ‖·‖² is taken as the mean over tokens and channels, not the sum, so that λ = 50 balances the
    # CE at the scale of CLIP's residual stream whatever the width and token count; and the clean features are
    # detached targets, so LAFA moves the adversarial pass towards the clean one and not the reverse.
    d = torch.stack([(c.detach().float() - a.float()).pow(2).mean(dim=(1, 2))
                     for c, a in zip(clean_feats, adv_feats)])  # (L, B)
    with torch.no_grad():
        # p_i = p(y_i | x_i) on the clean input
        p = clean_logits.float().softmax(dim=-1).gather(1, labels[:, None]).squeeze(1)  # (B,)
        # w_i = p_i / (E_B[p] + ε): confidently classified samples dominate, misclassified (noisy) ones count less
        w = p / (p.mean() + stabiliser) if adaptive else torch.ones_like(p)
    # L_LAFA = 1/(|L||B|) Σ_l Σ_i w_i · d_i^l
    return (d * w).mean()


def kl_loss(clean_logits, adv_logits):
    """KL(p_clean ‖ p_adv), batch mean: the "+ KL" row of the paper's loss ablation (TRADES' regulariser)."""
    return F.kl_div(adv_logits.float().log_softmax(-1), clean_logits.float().log_softmax(-1), log_target=True,
                    reduction="batchmean")


def js_loss(clean_logits, adv_logits):
    """Jensen-Shannon divergence between the clean and adversarial output distributions, batch mean ("+ JS")."""
    log_p, log_q = clean_logits.float().log_softmax(-1), adv_logits.float().log_softmax(-1)
    log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2)  # log((p + q) / 2)
    # JS(p, q) = ½ KL(p ‖ m) + ½ KL(q ‖ m)
    return 0.5 * sum(F.kl_div(log_m, log, log_target=True, reduction="batchmean") for log in (log_p, log_q))


# The rows of the paper's loss ablation; each adds λ · (its regulariser) to L_CE(x_adv, y). The paper does not give
# the ablation rows' weights; we use the one λ for all (50 by default).
LOSSES = ("ce", "ce+js", "ce+kl", "ce+lafa_plain", "ce+lafa")


def mask_loss(kind, clean_feats, adv_feats, clean_logits, adv_logits, labels):
    """(L_CE(x_adv, y), regulariser) for one of LOSSES; the training loss is L_CE + λ · regulariser."""
    ce = F.cross_entropy(adv_logits, labels)
    if kind == "ce":
        return ce, torch.zeros_like(ce)
    if kind == "ce+js":
        return ce, js_loss(clean_logits, adv_logits)
    if kind == "ce+kl":
        return ce, kl_loss(clean_logits, adv_logits)
    if kind in ("ce+lafa_plain", "ce+lafa"):
        return ce, lafa_loss(clean_feats, adv_feats, clean_logits, labels, adaptive=kind == "ce+lafa")
    raise ValueError(f"unknown loss {kind!r}; use one of {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------------------------------------------------
# The K-shot sampler, and the uint8 images training and evaluation take

def sample_k_shot(labels, shots, seed, class_names=None):
    """Exactly `shots` (K) images of every class, without repeats, depending on labels, shots and seed alone.

    Args:
        labels: int class labels, one per image of the training split; the classes are the values present (e.g.
            {0, 2, 5, 9}), or with class_names 0 .. len(class_names) − 1, each needing K images (a short one named).
    Returns:
        A sorted list of indices into labels, len = K × number of classes.
    Example:
        >>> idx = sample_k_shot(dataset_labels, shots=16, seed=1)
    """
    labels = torch.as_tensor(labels)
    classes = range(len(class_names)) if class_names is not None else labels.unique().tolist()
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c in classes:
        pool = (labels == c).nonzero().flatten()
        if len(pool) < shots:
            name = f"{class_names[c]!r}" if class_names is not None else str(c)
            raise ValueError(f"class {name} has {len(pool)} training images, fewer than the {shots} shots asked "
                             f"for; ask for at most {len(pool)}")
        chosen += pool[torch.randperm(len(pool), generator=generator)[:shots]].tolist()
    return sorted(chosen)


def to_unit(images):
    """uint8 images in 0..255 (cache_images's) -> floats in [0, 1]; floats, silently 255× too dark, are refused."""
    if images.dtype != torch.uint8:
        raise ValueError(f"train and evaluate take uint8 images in 0..255, not {images.dtype}; pass "
                         f"(images * 255).round().to(torch.uint8), or call pgd_attack or the model on floats")
    return images.float() / 255


# ----------------------------------------------------------------------------------------------------------------------
# Training: min over the mask of E[L_CE(x_adv) + λ · L_LAFA], with x_adv from PGD

def steps_per_epoch(n_images, batch_size):
    """Full batches per epoch (Adam would weight a batch of 5 like one of 32), at least one."""
    # not in the paper: Dassl's drop_last, which CoOp and FAP train with
    return max(1, n_images // batch_size)


def default_epochs(n_images, batch_size, budget_steps=TRAIN_BUDGET_STEPS):
    """Epochs giving about budget_steps optimisation steps (at least one epoch), whatever the shot count."""
    return max(1, math.ceil(budget_steps / steps_per_epoch(n_images, batch_size)))


def autocast(device, precision):
    """bf16 autocast, or none for "fp32", without its weight-cast cache (torch 2.7's loses gradients after no_grad)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16", cache_enabled=False)


def train_step(model, optimizer, x, y, lam=LAM, eps=TRAIN_EPS, alpha=TRAIN_ALPHA, steps=TRAIN_STEPS, loss="ce+lafa",
               generator=None):
    """One min-max step on images x in [0, 1], PGD's start drawn from generator; returns (L_CE, regulariser,
    adversarial logits), detached."""
    # inner max: x_adv = argmax_{‖x_adv − x‖∞ ≤ ε} L_CE(f(x_adv), y), with the mask held fixed (formed once, and
    # shared with the clean pass, which needs no gradient either)
    with fixed_masks(model):
        # not in the paper: PGD starts from a uniform point in the ε-ball, as FAP's and torchattacks' PGD do
        x_adv = pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=True, generator=generator)
        with torch.no_grad():
            clean_logits, clean_feats = model(x, return_features=True)
    adv_logits, adv_feats = model(x_adv, return_features=True)
    ce, reg = mask_loss(loss, clean_feats=clean_feats, adv_feats=adv_feats, clean_logits=clean_logits,
                        adv_logits=adv_logits, labels=y)
    # L_mask = L_CE(x_adv, y) + λ · L_LAFA(x, x_adv, y)
    objective = ce + lam * reg
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    # straight-through: M ← M − γ · Adam(∂L/∂M_bin) (with tune_weights: θ ← θ − γ · Adam(∂L/∂θ))
    optimizer.step()
    return ce.detach(), reg.detach(), adv_logits.detach()


def _log_row(model, step, total_steps, sums, seconds, loss):
    """The row of the steps since the last one, printed as one line (its regulariser named by loss); zeroes the sums."""
    seen, device = sums["seen"].item(), sums["seen"].device
    row = {"step": step, **{k: sums[k].item() / seen for k in ("ce", "reg")}, "adv_acc": sums["correct"].item() / seen,
           "off": mask_sparsity(model) if next(_masks(model), None) else None, "img_per_s": seen / seconds}
    memory = f" | mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    off = "" if row["off"] is None else f" | off {100 * row['off']:.2f}%"
    print(f"step {step}/{total_steps} | ce {row['ce']:.3f} | {loss.partition('+')[2] or 'reg'} {row['reg']:.4f} | "
          f"adv-acc {row['adv_acc']:.2f}{off} | {row['img_per_s']:.0f} img/s{memory}", flush=True)
    for value in sums.values():
        value.zero_()
    return row


def _check_finite(finite, step, saved_at):
    """Stop training if a loss so far was NaN or infinite; saved_at: the step of the checkpoint kept (0: none)."""
    if not finite:  # a read of the device's flag waits for the GPU: train reads it at log lines and saves only
        kept = f", keeping the checkpoint of step {saved_at}" if saved_at else ""
        raise FloatingPointError(f"the training loss became NaN or infinite by step {step}; training stops{kept}; "
                                 f"lower the learning rate or λ, or check the data; start again")


def train(model, params, images, labels, epochs, batch_size=BATCH_SIZE, lr=LR, lam=LAM, eps=TRAIN_EPS,
          alpha=TRAIN_ALPHA, steps=TRAIN_STEPS, loss="ce+lafa", seed=0, precision=TRAIN_PRECISION, log_every=20,
          checkpoint=None, checkpoint_every=50):
    """Adversarial mask tuning: only the scores change, every pre-trained weight stays bit for bit (given the weights
    tune_weights returned instead, the same loop fine-tunes them). The frozen network runs in eval mode (no dropout
    or drop-path), and no step waits for the GPU.

    Args:
        model, params: a ClipClassifier and the scores apply_masks put on it (or the weights tune_weights returned).
        images, labels: (N, 3, H, W) uint8 training images on the model's device, and their (N,) classes.
        epochs, batch_size, lr: Adam on params, a cosine schedule to 0 over epochs of steps_per_epoch full batches.
        lam, loss, eps, alpha, steps: λ, one of LOSSES ("ce+lafa" is the paper's), and the training PGD (pixel units).
        seed: seeds the only two generators training draws from, on the device: batch order and flips, PGD's starts.
        precision: "fp32" or "bf16" (autocast, one block per step).
        checkpoint: None, or (load, save), e.g. training_checkpoint(path): load(state) restores the saved state into
            state's objects and returns (epochs done, log), or None; save(state, epochs done, log) runs at the first
            epoch end after checkpoint_every steps and at the end. A killed run started again ends bit for bit alike.
    Returns:
        The logged rows (dicts), one every log_every steps and the last at the final step.
    Raises:
        FloatingPointError: the loss became NaN or infinite; the last checkpoint, saved before it, is kept.
    Example:
        >>> scores = apply_masks(classifier)
        >>> train(classifier, scores, x_u8, y, epochs=default_epochs(len(y), 32))
    """
    optimizer = torch.optim.Adam(params, lr=lr)
    per_epoch = steps_per_epoch(len(labels), batch_size)
    total_steps = epochs * per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    device = labels.device
    batch_rng = torch.Generator(device).manual_seed(seed)  # batch order and flips
    pgd_rng = torch.Generator(device).manual_seed(seed)  # PGD's random starts
    # the log row's running sums, on the device like the finiteness flag and every draw: only log lines and saves wait
    sums = {k: torch.zeros((), device=device) for k in ("ce", "reg", "correct", "seen")}
    finite = torch.ones((), dtype=torch.bool, device=device)
    state = {"params": params, "optimizer": optimizer, "scheduler": scheduler, "generators": (batch_rng, pgd_rng),
             "sums": sums}  # everything a resumed run needs to continue exactly, besides the epoch and the log
    load, save = checkpoint or (None, None)
    first_epoch, history = load and load(state) or (0, [])
    step = saved_at = first_epoch * per_epoch
    tic = time.perf_counter()
    model.eval()  # frozen: LAFA compares two passes of one network, not two draws of its dropout
    try:
        for epoch in range(first_epoch, epochs):
            batches = torch.randperm(len(labels), generator=batch_rng, device=device).split(batch_size)[:per_epoch]
            # not in the paper: random horizontal flips are the only augmentation; they run on the device, on the
            # cached tensor, so no image is decoded twice; the epoch's flips drawn at once, one per image
            flips = torch.rand(sum(map(len, batches)), generator=batch_rng, device=device) < 0.5
            for batch, flip in zip(batches, flips.split(batch_size)):
                step += 1
                x, y = to_unit(images[batch]), labels[batch]
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                with autocast(device, precision):
                    ce, reg, adv_logits = train_step(model, optimizer, x, y, lam=lam, eps=eps, alpha=alpha,
                                                     steps=steps, loss=loss, generator=pgd_rng)
                scheduler.step()
                finite &= torch.isfinite(ce + lam * reg)
                sums["ce"] += ce * len(y)
                sums["reg"] += reg * len(y)
                sums["correct"] += (adv_logits.argmax(1) == y).sum()
                sums["seen"] += len(y)
                if step % log_every == 0 or step == total_steps:
                    _check_finite(finite, step, saved_at)
                    history.append(_log_row(model, step=step, total_steps=total_steps, sums=sums,
                                            seconds=time.perf_counter() - tic, loss=loss))
                    tic = time.perf_counter()
            if save and (step - saved_at >= checkpoint_every or epoch + 1 == epochs):
                _check_finite(finite, step, saved_at)  # a NaN state is never saved
                save(state, epoch + 1, history)
                saved_at = step
                print(f"checkpoint | epoch {epoch + 1}/{epochs} | step {step}/{total_steps}", flush=True)
    except KeyboardInterrupt:  # one line for the user, not a traceback from inside a training step
        kept = f"; rerun the same command to resume from the checkpoint of step {saved_at}" if save and saved_at else ""
        raise KeyboardInterrupt(f"interrupted at step {step}/{total_steps}{kept}") from None
    return history


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation: clean accuracy, and accuracy under attack, with the sanity checks of the field

def evaluate(model, images, labels, attacks, batch_size=256, seed=0):
    """Clean accuracy once, and accuracy under every attack, over one pass through a test set. Like RobustBench, it
    warns when an attack beats clean accuracy or over 5 % of the images have an exactly zero input gradient: signs
    of a broken attack or of gradient masking.

    Args:
        model: maps images in [0, 1] to logits, left in eval mode (bake the masks first: as fast as plain CLIP).
        images, labels: (N, 3, H, W) uint8 test images and (N,) labels, moved to the model's device batch by batch.
        attacks: {name: attack(model, x, y, generator=g) -> x_adv}: pgd_attack itself (the paper's PGD-100), or
            any attack make_attack builds (PGD on CE or the CW margin, APGD-CE, APGD-T, AutoAttack).
        seed: every attack's own generator, on the model's device, starts from it: no number depends on the others.
    Returns:
        {"n", "clean_acc", "zero_grad_share" (images whose loss has an all-zero input gradient), "seconds",
        "correct": (N,) bool, "attacks": {name: {"adv_acc", "seconds", "correct": (N,) bool}}}, on the CPU.
    Example:
        >>> evaluate(bake_masks(classifier), x_u8, y, {"pgd": pgd_attack, "aa": make_attack("aa")})
    """
    device = next(model.parameters()).device
    model.eval()
    # not in the paper: a generator per attack, all seeded alike, so no number depends on which other cells ran
    generators = {name: torch.Generator(device).manual_seed(seed) for name in attacks}
    correct = {name: [] for name in ["clean", *attacks]}
    seconds = dict.fromkeys(correct, 0.0)
    zero_grad = 0
    for start in tqdm(range(0, len(labels), batch_size), desc=f"eval ({', '.join(attacks)})", leave=False):
        tic = time.perf_counter()
        x = to_unit(images[start:start + batch_size].to(device, non_blocking=True))
        y = labels[start:start + batch_size].to(device)
        # the clean pass keeps its graph for one input gradient: clean accuracy and the gradient check in one go
        x.requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, y), x, materialize_grads=True)
        correct["clean"].append((logits.argmax(1) == y).cpu())
        zero_grad += (grad.flatten(1).abs().amax(1) == 0).sum().item()
        x = x.detach()
        seconds["clean"] += time.perf_counter() - tic
        for name, attack in attacks.items():
            tic = time.perf_counter()
            x_adv = attack(model, x, y, generator=generators[name])
            with torch.no_grad():
                correct[name].append((model(x_adv).argmax(1) == y).cpu())
            seconds[name] += time.perf_counter() - tic
    correct = {name: torch.cat(c) for name, c in correct.items()}
    n = len(labels)
    accuracy = {name: c.sum().item() / n for name, c in correct.items()}
    if zero_grad > 0.05 * n:
        print(f"WARNING: the input gradient is exactly zero for {100 * zero_grad / n:.1f}% of the images: attacks "
              f"cannot move them, robust accuracy is overstated (saturated softmax, gradient masking)", file=sys.stderr)
    for name in attacks:
        if accuracy[name] > accuracy["clean"]:
            print(f"WARNING: accuracy under {name} {100 * accuracy[name]:.2f}% exceeds clean accuracy "
                  f"{100 * accuracy['clean']:.2f}% on these images: broken attack or gradient masking", file=sys.stderr)
    return {"n": n, "clean_acc": accuracy["clean"], "zero_grad_share": zero_grad / n, "seconds": seconds["clean"],
            "correct": correct["clean"], "attacks": {name: {"adv_acc": accuracy[name], "seconds": seconds[name],
                                                            "correct": correct[name]} for name in attacks}}


# ----------------------------------------------------------------------------------------------------------------------
# AdvMask in one call: CLIP and few-shot images in memory -> a robustly masked classifier

def adversarial_mask_tuning(clip, images, labels, class_names, templates=("a photo of a {}.",), target="mhsa",
                            tune="mask", epochs=None, tokenizer=None, **train_args):
    """AdvMask end to end, no files or CLI: CLIP as a classifier of class_names, masks on its image tower, min-max
    training. Returns the classifier, masks on (save_masks it; bake_masks it to evaluate at CLIP's cost), and the log.

    Args:
        clip: a pre-trained open_clip CLIP, changed in place (weights frozen, masks put on its image tower).
        images, labels: (N, 3, H, W) uint8 training images at the model's input size (e.g. K per class from
            sample_k_shot), and their (N,) indices into class_names; prompts are template.format(name), averaged.
        target, tune: the weights covered (MASK_TARGETS); "mask" (AdvMask), or "weights" (adversarial fine-tuning of
            the same weights, at WEIGHTS_LR unless train_args give lr).
        epochs: default_epochs(N, batch size) unless given; train_args: the rest of train's arguments.
    Example:
        >>> clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained="openai")  # OpenAI's network: QuickGELU
        >>> classifier, log = adversarial_mask_tuning(clip, x_u8, y, ["cat", "dog"])
        >>> evaluate(bake_masks(classifier), test_u8, test_y, {"pgd": pgd_attack})
    """
    if tune not in ("mask", "weights"):
        raise ValueError(f"unknown tune {tune!r}; use 'mask' (AdvMask) or 'weights' (adversarial fine-tuning)")
    classifier = ClipClassifier(clip, class_names, templates, tokenizer)
    params = (apply_masks if tune == "mask" else tune_weights)(classifier, target)
    epochs = epochs or default_epochs(len(labels), train_args.get("batch_size", BATCH_SIZE))
    train_args.setdefault("lr", LR if tune == "mask" else WEIGHTS_LR)
    return classifier, train(classifier, params, images, labels, epochs=epochs, **train_args)


# ======================================================================================================================
# Tooling: everything below serves the method above (attacks by name, files, data, results, figures, CLI)
# Its imports stand here rather than at the top, so that the text above this marker, imports included, is the method
# alone, and runs as it is (a test execs it): what a copier of the method takes.
import argparse
import copy
import csv
import dataclasses
import errno
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import safetensors.torch
import torchvision
import torchvision.transforms as T


# ----------------------------------------------------------------------------------------------------------------------
# Attack adapters: AutoAttack's APGD (torchattacks), every attack by name in the convention evaluate calls, and the
# per-image worst case over several

# The DLR loss divides by the gap to the 3rd-largest logit, the targeted one by the gap to the 4th
DLR_MIN_CLASSES = {"dlr": 3, "dlr-targeted": 4}


def apgd_attack(model, images, labels, eps=TEST_EPS, steps=TEST_STEPS, loss="ce", generator=None):
    """APGD (Croce & Hein, 2020), torchattacks' implementation: l∞, with a step size adapted to the loss's progress.

    loss "ce" is APGD-CE and "dlr" APGD-DLR, untargeted; "dlr-targeted" is APGD-T, the targeted DLR loss towards each
    of the top min(9, C − 1) other classes in turn, as AutoAttack runs it. torchattacks takes a seed, not a generator:
    the seed is drawn from generator (0 without one), and torch's global generators, which it seeds, are restored
    after it. An image the attack does not break comes back clean.
    Example:
        >>> x_adv = apgd_attack(classifier, x, y, eps=1/255, steps=100, loss="dlr-targeted")
    """
    import torchattacks  # here, as _pyplot imports matplotlib: it imports scipy (0.7 s), which only APGD needs
    seed = 0 if generator is None else int(torch.randint(2**31 - 1, (), generator=generator, device=generator.device))
    with torch.no_grad():
        n_classes = model(images[:1]).shape[1]
    if n_classes < DLR_MIN_CLASSES.get(loss, 0):
        raise ValueError(f"APGD's {loss} loss needs at least {DLR_MIN_CLASSES[loss]} classes, not {n_classes}; use "
                         f"APGD-CE or PGD")
    if loss == "dlr-targeted":  # torchattacks targets the top n_classes − 1 other classes; AutoAttack's default is 9
        attack = torchattacks.APGDT(model, eps=eps, steps=steps, seed=seed, n_classes=min(10, n_classes))
    else:
        attack = torchattacks.APGD(model, eps=eps, steps=steps, seed=seed, loss=loss)
    # torchattacks seeds torch's global generators: the CPU's and the current GPU's, restored after it
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if images.is_cuda else []):
        return attack(images, labels).detach()


def autoattack(model, images, labels, eps=TEST_EPS, steps=TEST_STEPS, second="dlr-targeted", generator=None):
    """AutoAttack as CLIP robustness work runs it: APGD-CE, then a second APGD from the clean images on those APGD-CE
    did not break, so the second stage can only remove images from the robust set. second "dlr-targeted" (APGD-T) is
    RobustVLM/FARE's; "dlr" (untargeted APGD-DLR) is TGA-ZSR's, which runs APGD-CE alone on 2-class sets (PCAM),
    where DLR is undefined. Each stage draws its seed from generator, so the first is exactly apgd_attack's APGD-CE.
    Example:
        >>> x_adv = autoattack(classifier, x, y, eps=1/255)
    """
    x_adv = apgd_attack(model, images, labels, eps=eps, steps=steps, loss="ce", generator=generator)
    with torch.no_grad():
        logits = model(x_adv)
    robust = logits.argmax(1) == labels  # (B,)
    if robust.any() and not (second == "dlr" and logits.shape[1] < DLR_MIN_CLASSES["dlr"]):
        x_adv[robust] = apgd_attack(model, images[robust], labels[robust], eps=eps, steps=steps, loss=second,
                                    generator=generator)
    return x_adv


def cw_loss(logits, labels):
    """CW margin loss, batch mean of max_{j≠y} z_j − z_y: positive once the image is misclassified."""
    z_y = logits.gather(1, labels[:, None]).squeeze(1)  # (B,)
    z_other = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf")).amax(dim=1)  # (B,)
    return (z_other - z_y).mean()


# Every attack by name: its function, the arguments that make it this attack, and the classes a class set needs for
# it (APGD's DLR losses; TGA-ZSR's AutoAttack falls back to APGD-CE alone instead)
Attack = collections.namedtuple("Attack", "fn kwargs min_classes")
ATTACKS = {name: Attack(*row) for name, row in {
    "pgd": (pgd_attack, {"loss_fn": F.cross_entropy}, 0), "cw": (pgd_attack, {"loss_fn": cw_loss}, 0),
    "apgd-ce": (apgd_attack, {"loss": "ce"}, 0), "apgd-dlr": (apgd_attack, {"loss": "dlr"}, DLR_MIN_CLASSES["dlr"]),
    "apgd-t": (apgd_attack, {"loss": "dlr-targeted"}, DLR_MIN_CLASSES["dlr-targeted"]),
    "aa": (autoattack, {"second": "dlr-targeted"}, DLR_MIN_CLASSES["dlr-targeted"]),
    "aa-tga-zsr": (autoattack, {"second": "dlr"}, 0),
}.items()}


def make_attack(name, eps=TEST_EPS, alpha=TEST_ALPHA, steps=TEST_STEPS):
    """An attack of ATTACKS as evaluate calls it, attack(model, x, y, generator=g) -> x_adv: "pgd" and "cw" are PGD on
    the cross-entropy and on the CW margin; "apgd-ce", "apgd-dlr", "apgd-t", "aa" (APGD-CE, then APGD-T) and
    "aa-tga-zsr" (APGD-CE, then APGD-DLR) are seeded from g.
    Example:
        >>> evaluate(model, x_u8, y, {name: make_attack(name, eps=4/255) for name in ("pgd", "aa")})
    """
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; use one of {', '.join(ATTACKS)}")
    attack = ATTACKS[name]
    step = {"alpha": alpha, "random_start": True} if attack.fn is pgd_attack else {}  # APGD adapts its own step
    return partial(attack.fn, eps=eps, steps=steps, **step, **attack.kwargs)


def worst_case_accuracy(correct):
    """Accuracy under the worst of several attacks, image by image: an image counts only if no attack broke it
    (RobustBench's convention; not the minimum of the attacks' accuracies). correct: list of (N,) bool tensors."""
    all_robust = torch.stack(correct).all(dim=0)  # (N,)
    return all_robust.sum().item() / len(all_robust)


# ----------------------------------------------------------------------------------------------------------------------
# Models: the network a name and its weights describe (activation, preprocessing), open_clip's model folders, and
# the fingerprint that binds mask and weight files to the weights they were trained on

# A CLIP small enough to train on a CPU in seconds: for --dry-run and the tests (random weights).
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# open_clip's model folders, which carry their config, preprocessing and weights: on the Hugging Face hub, or on disk
SCHEMAS = ("hf-hub:", "local-dir:")


def preprocess_cfg(clip):
    """The preprocessing a model's weights expect, open_clip's PreprocessCfg fields (size, mean, std, interpolation,
    resize_mode, ...): what its pretrained tag or model folder says, else open_clip's defaults (OpenAI's mean and std,
    bicubic resize of the shorter side, centre crop)."""
    cfg = {**dataclasses.asdict(open_clip.transform.PreprocessCfg()), **open_clip.get_model_preprocess_cfg(clip)}
    return json.loads(json.dumps(cfg))  # tuples as lists, as config.json records it


def activation(clip):
    """The class name of the image tower's MLP activation: QuickGELU for OpenAI's weights, GELU for most others (a
    timm tower's act: GELU, GELUTanh, SiLU)."""
    mlp = tower_family(clip).blocks[0].mlp
    return type(getattr(mlp, "gelu", None) or mlp.act).__name__


def weights_fingerprint(model, exclude=()):
    """sha256 of everything that decides a CLIP's output besides a mask or a weights file: every parameter and buffer
    of both towers as fp32 bytes (of a masked weight, its pre-trained value, not its scores), the activation and the
    normalisation; `exclude` leaves out weights (names relative to the image tower) that a weights file replaces."""
    clip = model.clip if hasattr(model, "clip") else model
    scores = {id(m.mask.scores) for m in _masks(clip)}
    cfg = preprocess_cfg(clip)
    digest = hashlib.sha256(json.dumps([activation(clip), cfg["mean"], cfg["std"]]).encode())
    # a masked weight sits at ...parametrizations.<name>.original; sorted names make the order the unmasked one's
    tensors = {name.replace(".parametrizations.", ".").removesuffix(".original"): t
               for name, t in clip.state_dict(keep_vars=True).items() if id(t) not in scores}
    skip = {f"visual.{name}" for name in exclude}
    for name in sorted(set(tensors) - skip):
        t = tensors[name].detach().float().cpu().contiguous()
        digest.update(f"{name} {tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def resolve_model(model):
    """The open_clip name of --model: a known name, an hf-hub: folder (fetched with its weights), or a config of one's
    own that open_clip builds and runs: a local-dir: folder, or a config JSON registered under its file's stem."""
    if model.startswith("hf-hub:"):
        return model
    if model.startswith("local-dir:"):
        path, name = Path(model[len("local-dir:"):]), model
        if not (path / "open_clip_config.json").is_file() or not any(
                f.suffix in (".safetensors", ".bin", ".pth") for f in path.glob("*")):
            raise ValueError(f"{path} is not an open_clip model folder (open_clip_config.json beside a weights file "
                             f"such as open_clip_model.safetensors); pass such a folder with local-dir:PATH")
    elif model.endswith(".json"):  # checked here: open_clip skips a config without these keys, and a file it cannot
        try:  # parse stays in its registry, failing every later registration in the process
            config = json.loads(Path(model).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"model config {model} is unreadable ({type(e).__name__}); pass an open_clip model name "
                             f"or a config JSON") from None
        if not (isinstance(config, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= config.keys()):
            raise ValueError(f"{model} is not an open_clip model config (no embed_dim, vision_cfg and text_cfg); pass "
                             f"one, or an open_clip model name")
        open_clip.add_model_config(model)
        name = Path(model).stem
    elif model in open_clip.list_models():
        return model
    else:
        raise ValueError(f"unknown model {model!r}; pass an open_clip model name such as ViT-B-32, an "
                         f"hf-hub:ORG/NAME or local-dir:PATH model folder, or a config JSON")
    logging.disable(logging.WARNING)  # open_clip's warning of a model built without weights
    try:  # built and run once on the meta device (no memory, no weights): what open_clip trips on is one line here
        with torch.device("meta"):
            clip = open_clip.create_model(name, device="meta", load_weights=False, pretrained_text=False)
            mean, std = (torch.tensor(preprocess_cfg(clip)[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
            clip.encode_image((torch.zeros(1, 3, *clip.visual.image_size) - mean) / std)  # as ClipClassifier does
            clip.encode_text(torch.zeros(1, clip.context_length, dtype=torch.long))
    except Exception as e:
        raise ValueError(f"{model} is not a config that open_clip builds and runs ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:120]}); fix its values (open_clip's model_configs/*.json "
                         f"show them)") from None
    finally:
        logging.disable(logging.NOTSET)
    return name


def load_clip(model, pretrained):
    """(open_clip model, tokenizer, identity) from a model name, config JSON or model folder, and a pretrained tag,
    file or "none" (None for a folder, which carries its weights); "tiny" is TINY_CLIP with random weights.

    The network built is the one the weights were trained as: a tag's own config decides QuickGELU (OpenAI's weights
    use it, while open_clip's plain ViT-B-32 config says GELU), and a tag or folder its preprocessing. A checkpoint
    file gets the model's config as named (ViT-B-32-quickgelu for OpenAI's weights) and open_clip's default
    preprocessing. identity records what was built: model, weights, activation, preprocessing, fingerprint."""
    if model == "tiny":
        if pretrained != "none":
            raise ValueError(f"--model tiny is a random model of this file's own; drop --pretrained {pretrained}")
        clip, tokenizer, identity = open_clip.CLIP(**TINY_CLIP), None, {"model": model, "pretrained": pretrained}
    else:
        clip, identity = _create_clip(resolve_model(model), pretrained)
        if model.endswith(".json"):  # known by its content, not by its file's stem (which names the registered config)
            text = Path(model).read_bytes()
            identity.update(model_config=json.loads(text), config_sha256=hashlib.sha256(text).hexdigest())
        try:  # SigLIP's tokenizers, and some others', are Hugging Face's: a package and a download of their own
            tokenizer = open_clip.get_tokenizer(identity["model"])
        except ImportError as e:
            raise ValueError(f"the tokenizer of {identity['model']} needs the {e.name} package, which only some model "
                             f"families need: pip install {e.name}") from None
        except OSError as e:
            raise ValueError(f"could not fetch the tokenizer of {identity['model']} ({str(e).splitlines()[0]}); run "
                             f"once where there is a network, so that Hugging Face's cache holds it") from None
        if getattr(tokenizer, "vocab_size", 0) > getattr(clip, "vocab_size", math.inf):  # a config's own (CoCa: none)
            raise ValueError(f"{model} embeds {clip.vocab_size} tokens, fewer than its tokenizer's "
                             f"{tokenizer.vocab_size}; give its text_cfg a vocab_size of at least that")
    identity.update(activation=activation(clip), preprocess=preprocess_cfg(clip),
                    weights_sha256=weights_fingerprint(clip), open_clip=open_clip.__version__)
    return clip, tokenizer, identity


def _create_clip(name, pretrained):
    """load_clip's open_clip model of a resolved name, with its identity so far; every failure is one sentence."""
    identity = {"model": name, "pretrained": pretrained}
    folder = name.startswith(SCHEMAS)
    tags = [] if folder else open_clip.list_pretrained_tags_by_model(name)
    if folder and pretrained is not None:
        raise ValueError(f"{name} carries its own weights; drop --pretrained {pretrained}")
    if pretrained == "none":
        print("WARNING: --pretrained none: the model has RANDOM weights, its accuracies mean nothing", file=sys.stderr)
    elif not folder and pretrained not in tags:
        if pretrained is None or not Path(pretrained).is_file():
            some = ", ".join(tags[:4]) + (", ..." if len(tags) > 4 else "") or "none"
            raise ValueError(f"--pretrained {pretrained} is neither an open_clip tag of {name} ({some}) nor an "
                             f"existing file; pass a tag, a checkpoint path, or none")
        identity["file_sha256"] = hashlib.sha256(Path(pretrained).read_bytes()).hexdigest()
    # a tag's own config says whether its weights were trained with QuickGELU (OpenAI's were); open_clip would only
    # warn and build the GELU network of the plain name
    quick_gelu = pretrained in tags and bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu"))
    logging.disable(logging.ERROR)  # open_clip and the hub log their failures too; ours below is the one line shown
    try:
        clip = open_clip.create_model(name, pretrained=None if pretrained == "none" else pretrained,
                                      force_quick_gelu=quick_gelu, require_pretrained=pretrained != "none")
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        # a failed download; a misfit, unreadable or missing checkpoint
        if name.startswith("hf-hub:"):
            raise ValueError(f"could not fetch {name} (no network?); download the folder where there is one "
                             f"(hf download {name[len('hf-hub:'):]} --local-dir DIR) and pass --model "
                             f"local-dir:DIR") from None
        if pretrained in tags:
            quick = f" and --model {name}-quickgelu, the network they were trained as" if quick_gelu else ""
            raise ValueError(f"could not fetch the {pretrained!r} weights of {name} (no network?); download them "
                             f"where there is one and pass the file with --pretrained PATH{quick}, or an open_clip "
                             f"model folder with --model local-dir:DIR") from None
        detail = ("not a torch checkpoint" if isinstance(e, (pickle.UnpicklingError, EOFError)) else
                  " ".join(str(e).split())[:160])
        if folder:
            raise ValueError(f"{name} does not load ({detail}); give it the open_clip_config.json and the weights "
                             f"file of one model") from None
        raise ValueError(f"checkpoint {pretrained} is not a state dict of {name} ({detail}); pass the --model it was "
                         f"saved from, or a checkpoint of this one") from None
    finally:
        logging.disable(logging.NOTSET)
    return clip, identity


def fp16_network(clip):
    """clip as FAP's code evaluates it (its configs' PREC "fp16", clip.build_model): conv, linear and attention weights
    and the projections in fp16 as OpenAI's convert_weights makes them (open_clip's convert_weights_to_lp), every
    LayerNorm computing in fp32 (LayerNormFp32, as in OpenAI's model and open_clip's precision="fp16" build), and the
    image cast to fp16 at the tower's first layer (OpenAI's image.type(self.dtype); forward_intermediates too), so
    gradients flow in fp16, unscaled. For open_clip's ViT (check_fp16 refuses the others). Returns clip, in place."""
    open_clip.model.convert_weights_to_lp(clip, torch.float16)
    for module in clip.modules():
        if isinstance(module, nn.LayerNorm):
            module.__class__ = open_clip.transformer.LayerNormFp32
    clip.visual.conv1.register_forward_pre_hook(lambda _, inputs: (inputs[0].half(),))
    return clip


def check_fp16(clip, what):
    """Refuse, in one line, fp16 evaluation (fp16_network) of a tower that is not open_clip's ViT."""
    if tower_family(clip).family != "open_clip ViT":
        raise ValueError(f"--eval-precision fp16 converts OpenAI's ViT as FAP's code does, and {what} is another "
                         f"family's tower; evaluate it in fp32 or bf16")


def describe(identity):
    """A model identity in a few words, for messages and file headers: "ViT-B-32 openai (QuickGELU)"."""
    weights = "" if identity["pretrained"] is None else f" {identity['pretrained']}"
    return f"{identity['model']}{weights} ({identity['activation']})"


# ----------------------------------------------------------------------------------------------------------------------
# Mask and weight files: 1 bit per masked weight (32 per tuned weight), with checked metadata

# Format 5 is safetensors: the tensors, and the header as one metadata entry, "advmask", a JSON object (one entry, as
# safetensors writes several in a random order: the same mask gives the same bytes) whose sha256 covers the header and
# the tensors alike: the provenance a transfer run files its cells by, and the shapes, threshold and heads that loading
# and analysis read, are checked as the bits are. Earlier formats are refused with a line naming them: 1-3, advmask's
# own container (magic, zlib JSON header, payload), and 4, safetensors with a checksum of the tensors alone.
FILE_FORMAT = 5
OLD_MAGIC = {b"ADVMASK\n": "mask", b"ADVTUNE\n": "weights"}
TUNED_FILES = {"mask": "masks.bin", "weights": "weights.bin"}  # a run folder's trained file, by kind (--tune)


def _arch(model):
    """A short description of the visual tower, stored in mask files to refuse a mask made for another model: its
    class (a timm tower's network's), blocks, width, patch and input size."""
    visual, blocks = visual_tower(model), tower_family(model).blocks
    trunk = getattr(visual, "trunk", None)  # a timm tower's network
    kind, width, patch = ((type(visual).__name__, visual.transformer.width, visual.patch_size) if trunk is None else
                          (f"timm {type(trunk).__name__}", trunk.embed_dim, trunk.patch_embed.patch_size))
    return f"{kind}(layers={len(blocks)}, width={width}, patch={tuple(patch)}, image={tuple(visual.image_size)})"


def _temporary(path):
    """A temporary name beside path for what is written, then renamed onto it: one per process, on any host."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _atomic_write(path, data):
    """Write data (bytes or text) to a temporary file beside path, then rename it onto path: no reader sees half a
    file, and a write that fails (a full disk) leaves the earlier file, or none, and no temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:  # named by the file it was for, not the temporary one (a failed write names none)
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _require_writable(folder):
    """Refuse, before any work and without creating anything, a folder that cannot be written: its nearest existing
    ancestor must be a folder that takes a file (not a read-only disk, not a file in the way)."""
    existing = next(f for f in (Path(folder).absolute(), *Path(folder).absolute().parents) if f.exists())
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {folder} ({e.strerror}); pass a folder you can write to") from None


def _content_sha256(meta, tensors):
    """sha256 of a file's header (its JSON, keys sorted) and its tensors' names, dtypes, shapes and bytes, in name
    order: the checksum a file carries of everything else it holds."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode() + t.contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_tuned_file(path, kind, header, tensors):
    """Write a mask or weights file (kind "mask" or "weights") atomically, as safetensors: the CPU tensors, and as
    metadata "advmask", the JSON of the kind, the format, the header's fields and the sha256 of all the rest."""
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    meta = json.loads(json.dumps({"kind": kind, "format": FILE_FORMAT, **header}))  # as read back: tuples as lists
    meta["sha256"] = _content_sha256(meta, tensors)
    _atomic_write(path, safetensors.torch.save(tensors, {"advmask": json.dumps(meta)}))


def read_tuned_file(path, kind):
    """(header, tensors) of a file write_tuned_file wrote, after checking its kind, format and checksum; every
    failure is one sentence naming the file."""
    path = Path(path)
    if not path.is_file():
        inside = path / TUNED_FILES[kind]  # a run folder given for its file
        raise ValueError(f"{kind} file {path} does not exist; pass " + (str(inside) if inside.is_file() else
                                                                        "the file that a training run wrote"))
    try:
        with safetensors.safe_open(path, "pt") as f:
            meta = json.loads((f.metadata() or {}).get("advmask", "{}"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, ValueError) as e:
        data = path.read_bytes()
        old = next((what for magic, what in OLD_MAGIC.items() if data.startswith(magic)), None)
        if old is None:
            raise ValueError(f"{path} is not a whole advmask {kind} file ({str(e).splitlines()[0]}): it is truncated, "
                             f"corrupted or another file; copy it again, or retrain with --overwrite") from None
        try:  # the format number sits in the old container's zlib-compressed JSON header
            n = json.loads(zlib.decompress(data[12:12 + int.from_bytes(data[8:12], "little")]))["format"]
        except (zlib.error, ValueError, KeyError, TypeError):  # a cut or altered old file: its format is unreadable too
            n = "1-3"
        meta = {"kind": old, "format": n}
    meta = meta if isinstance(meta, dict) else {}
    other, n = meta.get("kind"), meta.get("format")
    if other in TUNED_FILES and str(n) in ("1", "2", "3", "1-3", "4"):  # an earlier format's (a cut container's "1-3")
        what = "safetensors with a checksum of its tensors alone" if str(n) == "4" else "advmask's own container"
        raise ValueError(f"{path} is a {other} file of format {n} ({what}), which this version (format {FILE_FORMAT}) "
                         f"does not read; train it again (--overwrite), or use the advmask commit that wrote it")
    if n == FILE_FORMAT and other in TUNED_FILES and other != kind:  # the other kind: say which
        raise ValueError(f"{path} is an advmask {other} file, not a {kind} file; evaluate it with "
                         f"{'--masks' if other == 'mask' else '--weights'}, or pass a {TUNED_FILES[kind]}")
    if other != kind or n != FILE_FORMAT:
        raise ValueError(f"{path} is not an advmask {kind} file of format {FILE_FORMAT}; pass a file that "
                         f"save_{'masks' if kind == 'mask' else 'weights'} wrote")
    if _content_sha256({k: v for k, v in meta.items() if k != "sha256"}, tensors) != meta.get("sha256"):
        raise ValueError(f"{path} fails its checksum: its header or its {kind} tensors changed since it was written "
                         f"(corrupted, or edited); copy it again, or retrain with --overwrite")
    return {k: v for k, v in meta.items() if k not in ("kind", "format", "sha256")}, tensors


def write_mask_file(path, header, bits):
    """Write a mask file: header fields (arch, target, threshold, names, shapes, heads, base_weights, provenance) and
    the (n,) bool bits, True = on, packed 8 to a byte in np.packbits order as the uint8 tensor "bits"."""
    write_tuned_file(path, "mask", {**header, "n_weights": bits.numel()},
                     {"bits": torch.from_numpy(np.packbits(bits.numpy()))})  # ⌈n/8⌉ bytes


def read_mask_file(path):
    """(header, bits) of a mask file, (n,) bool with True = on, after checking that the file is whole and intact."""
    header, tensors = read_tuned_file(path, "mask")
    return header, torch.from_numpy(np.unpackbits(tensors["bits"].numpy(), count=header["n_weights"]).astype(bool))


def _check_fit(path, header, model, weights, source, exclude=()):
    """Refuse a file made for another architecture, for other weights than (name, shape) pairs `weights`, or trained
    on other pre-trained weights than the model's (source names them). exclude: as weights_fingerprint's."""
    if header["arch"] != _arch(model):
        raise ValueError(f"{path} was made for {header['arch']}, but this model is {_arch(model)}; load it onto the "
                         f"architecture it was trained with")
    if weights != list(zip(header["names"], header["shapes"])):
        raise ValueError(f"{path} holds {header['target']} weights, which are not the ones this model has masked or "
                         f"tuned; load it onto an unmasked model, or one masked or tuned on the {header['target']} "
                         f"weights")
    base = header["base_weights"]
    if base["fingerprint"] != (ours := weights_fingerprint(model, exclude)):
        raise ValueError(f"{path} was trained on other weights ({base['source']}, fingerprint "
                         f"{base['fingerprint'][:12]}) than this model's ({source or 'source unrecorded'}, "
                         f"fingerprint {ours[:12]}); load it onto the weights it was trained on")


def save_masks(model, path, source=None, provenance=None):
    """Store M_bin of a masked model only, 1 bit a weight (ViT-B/32's attention: 28.3 M weights, 3.5 MB), with what
    load_masks needs to refuse a model it does not fit (the fingerprint of the pre-trained weights under the mask, and
    source, their name, e.g. describe(identity)), what the per-head analysis needs (attention heads per block), and
    provenance if given, a dict of how it was trained (the CLI's: the code, the training settings, the model)."""
    entries = list(_masks(model))
    masks = [m.mask for m in entries]
    if not masks:
        raise ValueError("this model has no masks; call apply_masks and train before saving")
    write_mask_file(path, {
        "arch": _arch(model),
        "target": masks[0].target,
        "threshold": masks[0].threshold,
        "names": [m.name for m in entries],
        "shapes": [list(mask.scores.shape) for mask in masks],
        "heads": tower_family(model).blocks[0].attn.num_heads,
        "base_weights": {"fingerprint": weights_fingerprint(model), "source": source or "source unrecorded"},
        **({"provenance": provenance} if provenance else {}),
    }, torch.cat([(mask.scores > mask.threshold).flatten().cpu() for mask in masks]))


def load_masks(model, path, source=None):
    """Put the masks of a file save_masks wrote onto model (masking it first if it has none), after checking that they
    fit, its weights included (source names them in the error); returns model. Only the bits are stored: the loaded
    scores sit at threshold ± 1."""
    header, bits = read_mask_file(path)
    if next(_masks(model), None) is None and header["arch"] == _arch(model):  # a misfit model is refused unmasked
        apply_masks(model, header["target"], threshold=header["threshold"])
    entries = list(_masks(model))
    _check_fit(path, header, model, [(m.name, list(m.mask.scores.shape)) for m in entries], source=source)
    masks = [m.mask for m in entries]
    with torch.no_grad():
        for chunk, mask in zip(bits.split([mask.scores.numel() for mask in masks]), masks):
            on = chunk.view(mask.scores.shape).to(mask.scores.device)
            mask.threshold = header["threshold"]
            mask.scores.copy_(torch.where(on, mask.threshold + 1.0, mask.threshold - 1.0))
    return model


def save_weights(model, path, target="mhsa", source=None, provenance=None):
    """Store the tuned weights only (fp32, 32 bits a weight), with what load_weights needs to refuse a misfit model;
    the rest of CLIP is the pre-trained checkpoint, untouched, and its fingerprint binds the file to it (the tuned
    weights themselves are left out of it: the file replaces them). A safetensors file of one tensor per weight, by
    its name, as a mask file; provenance as save_masks'."""
    entries = target_weights(model, target)
    names = [name for name, _ in entries]
    write_tuned_file(path, "weights", {
        "arch": _arch(model), "target": target, "names": names, "shapes": [list(w.shape) for _, w in entries],
        "n_weights": sum(w.numel() for _, w in entries),
        "base_weights": {"fingerprint": weights_fingerprint(model, names), "source": source or "source unrecorded"},
        **({"provenance": provenance} if provenance else {})}, {name: w.float() for name, w in entries})


def load_weights(model, path, source=None):
    """Overwrite the model's weights with those of a file save_weights wrote, after checking that they fit, the rest
    of its weights included (source names them in the error)."""
    header, tensors = read_tuned_file(path, "weights")
    entries = target_weights(model, header["target"])
    _check_fit(path, header, model, [(name, list(w.shape)) for name, w in entries], source=source,
               exclude=header["names"])
    with torch.no_grad():
        for name, w in entries:
            w.copy_(tensors[name])
    return header


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints: a file for train's checkpoint hooks (checkpoint=None never touches them)

def training_checkpoint(path, trainer=None):
    """train's checkpoint argument for a file: (load, save) of the training state in path, written atomically. trainer,
    what trains (run's: its code, training settings and model, a JSON object), is saved with the state; a state saved
    by another trainer is not resumed."""
    trainer = json.loads(json.dumps(trainer or {}))  # as it is read back: tuples as lists
    return (partial(_load_training_state, Path(path), trainer=trainer),
            partial(_save_training_state, Path(path), trainer=trainer))


def _save_training_state(path, state, epoch, history, trainer):
    """Save train's state (the trained tensors, Adam, the schedule, the generators, the running sums of the log row in
    progress), the epochs done, the log so far and what trains."""
    # as JSON: torch.load's weights_only unpickler takes plain data alone (torch.__version__ is a TorchVersion)
    saved = {"trainer": json.dumps(trainer), "epoch": epoch,
             "params": [p.detach().cpu() for p in state["params"]],
             "optimizer": state["optimizer"].state_dict(), "scheduler": state["scheduler"].state_dict(),
             "generators": [g.get_state() for g in state["generators"]], "history": history,
             "sums": {k: v.cpu() for k, v in state["sums"].items()}}
    buffer = io.BytesIO()  # whole in memory first: a full disk is then an OSError, not torch's zip writer's error
    torch.save(saved, buffer)
    _atomic_write(path, buffer.getvalue())


def _read_training_state(path, trainer):
    """What _save_training_state wrote in path, after checking that it is intact and that the same trainer saved it."""
    try:  # torch.load checks no CRC of its zip archive: a flipped bit in a tensor would resume from a changed value
        with zipfile.ZipFile(path) as archive:
            if (damaged := archive.testzip()) is not None:
                raise zipfile.BadZipFile(f"{damaged} fails its CRC")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        theirs = json.loads(saved.get("trainer", "{}"))  # what saved it (none recorded before it was)
        if not isinstance(theirs, dict):
            raise TypeError(f"its trainer is a JSON {type(theirs).__name__}, not an object")
    except Exception as e:  # whatever the parser trips on, the file is not an intact checkpoint
        detail = " ".join(str(e).split())[:80]
        raise ValueError(f"checkpoint {path} is damaged or unreadable ({type(e).__name__}: {detail}); delete it to "
                         f"start the run over") from None
    # resumed by other code, settings or weights, the mask would be two trainings' passed off as this one's
    if theirs != trainer:
        differ = sorted(k for k in {*theirs, *trainer} if theirs.get(k) != trainer.get(k))
        saved_by = f"with another {', '.join(differ)} than this run's" if theirs else "by an older advmask.py"
        raise ValueError(f"checkpoint {path} was saved {saved_by}; delete it to start the run over, or resume it with "
                         f"what saved it")
    return saved


def _load_training_state(path, state, trainer):
    """Restore into train's state what _save_training_state wrote for the same trainer; returns (epochs done, log so
    far), or None without a checkpoint."""
    if not path.is_file():
        return None
    saved = _read_training_state(path, trainer)
    if [p.shape for p in saved["params"]] != [p.shape for p in state["params"]]:
        raise ValueError(f"checkpoint {path} holds tensors of other shapes; delete it or train into another folder")
    with torch.no_grad():
        for p, value in zip(state["params"], saved["params"]):
            p.copy_(value)
        for k, v in state["sums"].items():
            v.copy_(saved["sums"][k])
    state["optimizer"].load_state_dict(saved["optimizer"])
    state["scheduler"].load_state_dict(saved["scheduler"])
    for generator, value in zip(state["generators"], saved["generators"]):
        generator.set_state(value)
    print(f"resuming from {path}, saved after epoch {saved['epoch']}", flush=True)
    return saved["epoch"], saved["history"]


# ----------------------------------------------------------------------------------------------------------------------
# Datasets and splits: CoOp's 11, TGA-ZSR's targets, ImageNet's shifts, and the images decoded once

# The CoOp suite of 11 datasets; any tree imagefolder/{train,test}/<class>/ (your own data); TinyImageNet and the
# five other targets of TGA-ZSR's zero-shot table; ImageNet's four shifted test sets (evaluation only). Per dataset:
# its prompt template (CoOp's where CoOp has one; CLIP's prompt list for the others); its training and test splits
# (None: no official split, so stratified_split makes a fixed one; no training split: evaluation only); the folder
# under --data-root that holds its images, which CoOp's split_zhou_*.json paths are relative to.
Dataset = collections.namedtuple("Dataset", "template train test folder")
DATASETS = {name: Dataset(*row) for name, row in {
    #                   prompt template                          train splits       test    image folder
    "imagenet":        ("a photo of a {}.",                      ("train",),        "val",  "imagenet/train"),
    "caltech101":      ("a photo of a {}.",                      None,              None,   "caltech101/101_ObjectCategories"),
    "oxford_pets":     ("a photo of a {}, a type of pet.",       ("trainval",),     "test", "oxford-iiit-pet/images"),
    "stanford_cars":   ("a photo of a {}.",                      ("train",),        "test", "stanford_cars"),
    "flowers102":      ("a photo of a {}, a type of flower.",    ("train", "val"),  "test", "flowers-102/jpg"),
    "food101":         ("a photo of {}, a type of food.",        ("train",),        "test", "food-101/images"),
    "fgvc_aircraft":   ("a photo of a {}, a type of aircraft.",  ("trainval",),     "test", "fgvc-aircraft-2013b/data/images"),
    "sun397":          ("a photo of a {}.",                      None,              None,   "SUN397"),
    "dtd":             ("{} texture.",                           ("train", "val"),  "test", "dtd/dtd/images"),
    "eurosat":         ("a centered satellite photo of {}.",     None,              None,   "eurosat/2750"),
    "ucf101":          ("a photo of a person doing {}.",         None,              None,   "ucf101/UCF-101-midframes"),
    "imagefolder":     ("a photo of a {}.",                      ("train",),        "test", "imagefolder"),
    "tinyimagenet":    ("a photo of a {}.",                      ("train",),        "val",  "tiny-imagenet-200"),
    "cifar10":         ("a photo of a {}.",                      ("train",),        "test", "cifar-10-batches-py"),
    "cifar100":        ("a photo of a {}.",                      ("train",),        "test", "cifar-100-python"),
    "stl10":           ("a photo of a {}.",                      ("train",),        "test", "stl10_binary"),
    "caltech256":      ("a photo of a {}.",                      None,              None,   "caltech256/256_ObjectCategories"),
    "pcam":            ("this is a photo of {}.",                ("train",),        "test", "pcam"),
    "imagenet_v2":     ("a photo of a {}.",                      (),                "test", "imagenetv2/imagenetv2-matched-frequency-format-val"),
    "imagenet_sketch": ("a photo of a {}.",                      (),                "test", "imagenet-sketch/images"),
    "imagenet_a":      ("a photo of a {}.",                      (),                "test", "imagenet-adversarial/imagenet-a"),
    "imagenet_r":      ("a photo of a {}.",                      (),                "test", "imagenet-rendition/imagenet-r"),
}.items()}
# What each dataset expects under --data-root, for the error a missing one gets; the ones torchvision can download.
LAYOUTS = {
    "imagenet": "imagenet/ILSVRC2012_devkit_t12.tar.gz and imagenet/ILSVRC2012_img_{train,val}.tar (never downloaded)",
    "caltech101": "caltech101/101_ObjectCategories/<class>/image_<n>.jpg and caltech101/Annotations/",
    "oxford_pets": "oxford-iiit-pet/images/<Breed>_<n>.jpg and oxford-iiit-pet/annotations/{trainval,test}.txt",
    "stanford_cars": "stanford_cars/cars_{train,test}/ and stanford_cars/devkit/ (never downloaded)",
    "flowers102": "flowers-102/jpg/image_<n>.jpg, flowers-102/imagelabels.mat and flowers-102/setid.mat",
    "food101": "food-101/images/<class>/<n>.jpg and food-101/meta/{train,test}.json",
    "fgvc_aircraft": "fgvc-aircraft-2013b/data/images/<n>.jpg and fgvc-aircraft-2013b/data/images_variant_*.txt",
    "sun397": "SUN397/<letter>/<class>/*.jpg, SUN397/ClassName.txt (and for CoOp's test set SUN397/Testing_01.txt)",
    "dtd": "dtd/dtd/images/<class>/<name>.jpg and dtd/dtd/labels/{train,val,test}1.txt",
    "eurosat": "eurosat/2750/<Class>/<Class>_<n>.jpg",
    "ucf101": "ucf101/UCF-101-midframes/<Class_Name>/v_<Class>_gNN_cMM.jpg (CoOp's middle frames; never downloaded)",
    "tinyimagenet": "tiny-imagenet-200/{wnids.txt,words.txt}, tiny-imagenet-200/train/<wnid>/images/*.JPEG and "
                    "tiny-imagenet-200/val/{val_annotations.txt,images/*.JPEG} (the zip as unpacked)",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
    "cifar100": "cifar-100-python/{train,test,meta}",
    "stl10": "stl10_binary/{train,test}_{X,y}.bin and stl10_binary/class_names.txt",
    "caltech256": "caltech256/256_ObjectCategories/<NNN.class>/<NNN_nnnn>.jpg",
    "pcam": "pcam/camelyonpatch_level_2_split_{train,test}_{x,y}.h5",
    "imagenet_v2": "imagenetv2/imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg (never downloaded)",
    "imagenet_sketch": "imagenet-sketch/images/<wnid>/*.JPEG (never downloaded)",
    "imagenet_a": "imagenet-adversarial/imagenet-a/<wnid>/*.jpg (never downloaded)",
    "imagenet_r": "imagenet-rendition/imagenet-r/<wnid>/*.jpg (never downloaded)",
    "imagefolder": "imagefolder/train/<class>/*.jpg and imagefolder/test/<class>/*.jpg (your own images)",
}
DOWNLOADABLE = {"caltech101", "oxford_pets", "flowers102", "food101", "fgvc_aircraft", "sun397", "dtd", "eurosat",
                "cifar10", "cifar100", "stl10", "caltech256", "pcam"}
# --conventions tga-zsr: TGA-ZSR's data as its code at commit 663fe57 makes it (utils.py: load_val_datasets,
# get_text_prompts_val, refine_classname; replace/datasets/*.py), for its 16 test sets in its order (TGA-ZSR.py). Per
# dataset: the prompt template (its dataset class's own, from which it forms clip_prompts, where it has one; else
# utils.py's "This is a photo of a {}") and the characters its class names turn into spaces once lower-cased (its
# classes' own "_-", FGVC's "_" alone, refine_classname's "_-/"). PCAM's prompts are two fixed sentences.
TGA_ZSR_TEMPLATE = "This is a photo of a {}"
TgaZsr = collections.namedtuple("TgaZsr", "template spaced")
TGA_ZSR = {name: TgaZsr(*row) for name, row in {
    "tinyimagenet": (TGA_ZSR_TEMPLATE, "_-/"),
    "cifar10": (TGA_ZSR_TEMPLATE, "_-/"),
    "cifar100": (TGA_ZSR_TEMPLATE, "_-/"),
    "stl10": (TGA_ZSR_TEMPLATE, "_-/"),
    "food101": ("A photo of {}, a type of food.", "_-"),
    "oxford_pets": ("A photo of a {}, a type of pet.", "_-"),
    "flowers102": ("A photo of a {}, a type of flower.", "_-"),
    "dtd": ("A surface with a {} texture.", "_-"),
    "eurosat": ("A centered satellite photo of {}.", "_-"),
    "fgvc_aircraft": ("A photo of a {}, a type of aircraft.", "_"),
    "caltech101": (TGA_ZSR_TEMPLATE, "_-/"),
    "caltech256": ("A photo of a {}.", "_-"),
    "stanford_cars": ("A photo of a {}.", "_-"),
    "pcam": ("{}", ""),
    "imagenet": (TGA_ZSR_TEMPLATE, "_-/"),
    "sun397": (TGA_ZSR_TEMPLATE, "_-/"),
}.items()}
TGA_ZSR_TRAIN = ("tinyimagenet", "cifar10", "cifar100", "imagenet")  # what its load_train_dataset can train on
TGA_ZSR_SQUASHED = ("cifar10", "cifar100", "stl10")  # Resize((224, 224)); the others Resize(256) + CenterCrop(224)
# Its names where they are not torchvision's: EuroSAT's and PCAM's by label, Flowers102's spellings of three (sic)
TGA_ZSR_EUROSAT = ["annual crop land", "a forest", "brushland or shrubland", "a highway or a road",
                   "industrial buildings", "pasture land", "permanent crop land", "residential buildings", "a river",
                   "a sea or a lake"]
TGA_ZSR_PCAM = ["Tthis is a photo of healthy lymph node tissue.", "This is a photo of lymph node tumor tissue."]
TGA_ZSR_FLOWERS = {"colt's foot": "colts foot", "cyclamen": "cyclamen ", "hippeastrum": "hippeastrum "}
# --eval-datasets presets. coop: CoOp's suite less ImageNet (the transfer default); tga-zsr: TGA-ZSR's 16, in its
# order (the default under --conventions tga-zsr); imagenet-shifts: the domain-generalisation test sets.
EVAL_PRESETS = {
    "coop": ["caltech101", "oxford_pets", "stanford_cars", "flowers102", "food101", "fgvc_aircraft", "sun397", "dtd",
             "eurosat", "ucf101"],
    "tga-zsr": list(TGA_ZSR),
    "imagenet-shifts": ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"],
}
# CoOp's split file of each dataset (CoOp's DATASETS.md links them): --split-dir DIR reads DIR/split_zhou_<Name>.json.
# ImageNet and FGVC Aircraft have none; CoOp uses their official splits, as we do.
COOP_SPLIT_FILES = {"caltech101": "Caltech101", "oxford_pets": "OxfordPets", "stanford_cars": "StanfordCars",
                    "flowers102": "OxfordFlowers", "food101": "Food101", "sun397": "SUN397",
                    "dtd": "DescribableTextures", "eurosat": "EuroSAT", "ucf101": "UCF101"}
# --conventions fap: the datasets whose K-shot draw is FAP's here, those with a CoOp file and FGVC Aircraft (CoOp reads
# its official train list, in file order, as torchvision does); ImageNet's items come from a directory listing
FAP_DATASETS = (*COOP_SPLIT_FILES, "fgvc_aircraft")
# (classes, test images) of each dataset's default split below, for --synthetic: a run of the real size with random
# images. Caltech101's 2,472 is derived: 2,602 measured with Faces_easy, less its 130 test images; Caltech-256's is
# derived too: 30 % of each of its 256 classes, 29,780 images without clutter (our rounding, not measured);
# imagefolder's is an arbitrary choice, TinyImageNet's.
DATASET_SIZES = {"imagenet": (1000, 50_000), "caltech101": (100, 2_472), "oxford_pets": (37, 3_669),
                 "stanford_cars": (196, 8_041), "flowers102": (102, 6_149), "food101": (101, 25_250),
                 "fgvc_aircraft": (100, 3_333), "sun397": (397, 19_850), "dtd": (47, 1_880), "eurosat": (10, 8_100),
                 "ucf101": (101, 3_783), "tinyimagenet": (200, 10_000), "cifar10": (10, 10_000),
                 "cifar100": (100, 10_000), "stl10": (10, 8_000), "caltech256": (256, 8_934), "pcam": (2, 32_768),
                 "imagenet_v2": (1000, 10_000), "imagenet_sketch": (1000, 50_889), "imagenet_a": (200, 7_500),
                 "imagenet_r": (200, 30_000), "imagefolder": (200, 10_000)}
# Class names as CoOp writes them, where they differ from torchvision's (after "_" -> " ").
CLASS_RENAMES = {
    "AnnualCrop": "Annual Crop Land", "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road", "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings", "SeaLake": "Sea or Lake",
    "airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike",
}
# PCAM's labels 0/1 as CLIP's prompt list names them (torchvision's PCAM has no class names).
PCAM_CLASSES = ["lymph node", "lymph node containing metastatic tumor tissue"]
# Flowers102's names, CoOp's (from github.com/jimgoo/caffe-oxford102) by label: torchvision's (0.22 on) but for one.
FLOWERS102_CLASSES = [c.removesuffix("?") for c in torchvision.datasets.Flowers102.classes]  # "pink-yellow dahlia?"


# Two small Dataset classes, the only classes here that are not nn.Modules: torch's Subset cannot relabel (base/new
# classes are renumbered), and torchvision has no dataset over a list of files (a CoOp split JSON).
class ImageFiles(torch.utils.data.Dataset):
    """Images listed as (path, label) pairs, as a CoOp split JSON lists them; the labels are in .targets."""

    def __init__(self, items, transform):
        self.items, self.transform, self.targets = list(items), transform, [label for _, label in items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.transform(torchvision.datasets.folder.default_loader(self.items[i][0])), self.targets[i]


class Split(torch.utils.data.Dataset):
    """The images `indices` of a dataset, with the given labels (e.g. new classes renumbered from 0) in .targets."""

    def __init__(self, dataset, indices, labels):
        self.dataset, self.indices, self.targets = dataset, list(indices), list(labels)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]][0], self.targets[i]


def stratified_split(labels, test_fraction=0.3, seed=0):
    """Fixed per-class split for datasets without an official one: (train indices, test indices). not in the paper:
    30 % of every class for testing, as in CoOp's splits, drawn with seed 0 whatever the run's seed, so that every run
    and every seed of a dataset is tested on the same images."""
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in labels.unique():
        pool = (labels == c).nonzero().flatten()
        pool = pool[torch.randperm(len(pool), generator=generator)].tolist()
        n_test = round(test_fraction * len(pool))
        test_idx, train_idx = test_idx + pool[:n_test], train_idx + pool[n_test:]
    return sorted(train_idx), sorted(test_idx)


def balanced_subset(labels, limit):
    """Indices of at most `limit` images, as even over the classes as their counts allow, the same for any run. not in
    the paper: a fixed evaluation subset (--eval-limit), as RobustVLM/FARE evaluate 1,000 images a dataset. It takes
    one image of every class, then a second, and so on, the images of each class and the classes themselves in seed-0
    orders: every class is drawn before any gets a second image, the leftovers of a round fall on classes all over the
    label range, and a class with fewer images than its share leaves its place to the others."""
    labels = torch.as_tensor(labels)
    if limit >= len(labels):
        return list(range(len(labels)))
    generator = torch.Generator().manual_seed(0)
    classes = labels.unique()
    queues = [pool[torch.randperm(len(pool), generator=generator)].tolist()
              for pool in ((labels == c).nonzero().flatten() for c in classes)]
    queues = [queues[c] for c in torch.randperm(len(classes), generator=generator).tolist()]
    round_robin = [q[r] for r in range(max(map(len, queues))) for q in queues if r < len(q)]
    return sorted(round_robin[:limit])


def base_new_split(split, n_classes):
    """Base classes = the first ⌈n/2⌉ labels, new = the rest renumbered from 0: (base Split, new Split, n_base)."""
    n_base = math.ceil(n_classes / 2)
    base = [i for i, y in enumerate(split.targets) if y < n_base]
    new = [i for i, y in enumerate(split.targets) if y >= n_base]
    return (Split(split, base, [split.targets[i] for i in base]),
            Split(split, new, [split.targets[i] - n_base for i in new]), n_base)


def dassl_k_shot(labels, shots, seed):
    """The K-shot draw of CoOp's and FAP's code, Dassl's DatasetBase.generate_fewshot_dataset (KaiyangZhou/
    Dassl.pytorch at c61a1b5) after its set_random_seed(seed), as indices into labels in its order: the items grouped
    by label in order of first appearance, then per label random.sample(items, K), or, for a label with fewer than K,
    random.choices(items, k=K) (its repeat=True: images repeat). Python's random, seeded as Dassl seeds it."""
    rng, groups = random.Random(seed), {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)
    return [i for items in groups.values() for i in (rng.sample(items, shots) if len(items) >= shots else
                                                      rng.choices(items, k=shots))]


def _rgb(image):
    return image.convert("RGB")  # Caltech101 and others hold some greyscale images


def image_transform(preprocess):
    """PIL image -> the model's input as a uint8 (3, H, W) tensor: open_clip's own evaluation resize and crop for a
    preprocess_cfg (size, resize mode, interpolation, fill), without its ToTensor and Normalize (to_unit scales, the
    classifier normalises); a "resize" entry (tga_zsr_preprocess) resizes the shorter side to it before the crop."""
    if "resize" in preprocess:  # open_clip's cfgs have none: their crop is the whole shorter side
        ops = T.Compose([T.Resize(preprocess["resize"], T.InterpolationMode(preprocess["interpolation"])),
                         T.CenterCrop(preprocess["size"])])
    else:
        ops = open_clip.image_transform(preprocess["size"], is_train=False, resize_mode=preprocess["resize_mode"],
                                        interpolation=preprocess["interpolation"], fill_color=preprocess["fill_color"])
    # not open_clip's order: RGB first, before the resize, so that a palette image is resized as colours (PIL resizes
    # palette indices by nearest neighbour); identical for the RGB images of every dataset here
    return T.Compose([T.Lambda(_rgb), *[op for op in ops.transforms if not isinstance(op, (T.ToTensor, T.Normalize))],
                      T.PILToTensor()])


def _torchvision_dataset(name, root, split, transform, download):
    """One split (or, for split None, the whole) of a dataset through its torchvision class; download only for
    DOWNLOADABLE (torchvision's StanfordCars refuses download=True even with the data on disk: its URL is dead)."""
    tv, kw = torchvision.datasets, {"transform": transform, "download": download and name in DOWNLOADABLE}
    if name == "imagenet":
        return tv.ImageNet(Path(root) / "imagenet", split=split, transform=transform)  # never downloaded
    if name in ("ucf101", "imagefolder"):  # UCF101 as CoOp reads it: one middle frame per video, a class per folder
        return tv.ImageFolder(Path(root) / DATASETS[name].folder / (split or ""), transform=transform)
    if name in ("cifar10", "cifar100"):
        return {"cifar10": tv.CIFAR10, "cifar100": tv.CIFAR100}[name](root, train=split == "train", **kw)
    if name == "pcam" and importlib.util.find_spec("h5py") is None:  # torchvision imports it only for PCAM
        raise ValueError("pcam is stored as HDF5 files, which need the h5py package: pip install h5py")
    if split is None:
        return {"caltech101": tv.Caltech101, "caltech256": tv.Caltech256, "eurosat": tv.EuroSAT,
                "sun397": tv.SUN397}[name](root, **kw)
    return {"oxford_pets": tv.OxfordIIITPet, "stanford_cars": tv.StanfordCars, "flowers102": tv.Flowers102,
            "food101": tv.Food101, "fgvc_aircraft": tv.FGVCAircraft, "dtd": tv.DTD, "stl10": tv.STL10,
            "pcam": tv.PCAM}[name](root, split=split, **kw)


def _labels(ds):
    """The class of every image, read from torchvision's index of the dataset instead of decoding every image."""
    if isinstance(ds, torchvision.datasets.PCAM):  # its labels sit in an HDF5 file of their own
        with ds.h5py.File(ds._base_folder / ds._FILES[ds._split]["targets"][0]) as f:
            return f["y"][:, 0, 0, 0].tolist()
    for attr in ("_labels", "targets", "y", "labels"):  # private in some torchvision classes, public in others
        if hasattr(ds, attr):
            return [int(y) for y in getattr(ds, attr)]
    return [label for _, label in ds._samples]  # StanfordCars


def _class_names(name, ds):
    """Class names as CoOp writes them, in torchvision's label order."""
    if name == "flowers102":
        return FLOWERS102_CLASSES
    if name == "pcam":
        return PCAM_CLASSES
    if name == "imagenet":  # CLIP's curated names, CoOp's classnames.txt; WordNet's first synonyms repeat ("crane")
        return list(open_clip.IMAGENET_CLASSNAMES)
    raw = ds.categories if name in ("caltech101", "caltech256") else ds.classes
    if name == "caltech256":  # "001.ak47" -> "ak47", "252.car-side-101" -> "car side"
        raw = [re.sub(r"^\d+\.|-101$", "", c).replace("-", " ") for c in raw]
    if name == "oxford_pets":  # CoOp lower-cases the breeds: "american bulldog"
        raw = [c.lower() for c in raw]
    if name == "stanford_cars":  # "AM General Hummer SUV 2000" -> "2000 AM General Hummer SUV"
        raw = [" ".join(c.split()[-1:] + c.split()[:-1]) for c in raw]
    if name == "sun397":  # "bakery/shop" -> "shop bakery"
        raw = [" ".join(reversed(c.split("/"))) for c in raw]
    if name == "ucf101":  # "Apply_Eye_Makeup" (CoOp's folders) or "ApplyEyeMakeup" -> "Apply Eye Makeup"
        raw = [" ".join(re.findall(r"[A-Z][^A-Z]*", c.replace("_", ""))) or c for c in raw]
    return [CLASS_RENAMES.get(c, c.replace("_", " ")) for c in raw]


def tga_zsr_preprocess(name, size):
    """A dataset's resizing under --conventions tga-zsr, as image_transform takes it: TGA-ZSR's utils.py resizes CIFAR
    and STL-10 straight to 224 × 224 and the others to 256 on the shorter side, then crops the centre 224 × 224, with
    torchvision's default (bilinear) interpolation. not in TGA-ZSR: a model of another input size gets the same
    ratios (for 224, exactly TGA-ZSR's)."""
    cfg = {"size": size, "resize_mode": "squash", "interpolation": "bilinear", "fill_color": 0}
    return cfg if name in TGA_ZSR_SQUASHED else {**cfg, "resize_mode": "shortest", "resize": round(size * 256 / 224)}


def _tga_zsr_classes(name, ds, root, ours):
    """Class names as TGA-ZSR's code words them, in our (its) label order, each prompt being its template.format(name)
    (TGA_ZSR): from the torchvision dataset ds, TinyImageNet's first synonyms (ours), or ImageNet's names file."""
    if name == "pcam":  # whole sentences: its PCAM class's clip_prompts
        return list(TGA_ZSR_PCAM)
    raw = (ours if name == "tinyimagenet" else TGA_ZSR_EUROSAT if name == "eurosat" else
           [TGA_ZSR_FLOWERS.get(c, c) for c in ds.classes] if name == "flowers102" else
           _tga_zsr_imagenet_names(root, ds.wnids) if name == "imagenet" else
           ds.categories if name == "caltech101" else  # all 101: Faces and Faces_easy both (a mistake we follow)
           [c[4:].replace("-101", "") for c in ds.categories] if name == "caltech256" else  # "257.clutter" kept
           [f"Boeing {c}" if c[0] == "7" else c for c in ds.classes] if name == "fgvc_aircraft" else
           [c[:-5] for c in ds.classes] if name == "stanford_cars" else  # the year cut off
           ds.classes)
    spaces = str.maketrans(TGA_ZSR[name].spaced, " " * len(TGA_ZSR[name].spaced))
    names = [c.lower().translate(spaces) for c in raw]
    return [c.strip() for c in names] if name == "caltech256" else names


def _tga_zsr_imagenet_names(root, wnids):
    """ImageNet's names in TGA-ZSR's code: the third word of the line of each wnid in its imagenet_classes_names.txt
    ("wnid number name", as its load_imagenet_folder2name reads it), which only its repository has."""
    path = Path(root) / "imagenet" / "imagenet_classes_names.txt"
    try:
        names = {words[0]: words[2] for words in map(str.split, path.read_text().splitlines()) if words}
        return [names[w] for w in wnids]
    except (OSError, IndexError, KeyError) as e:
        raise ValueError(f"ImageNet under --conventions tga-zsr is named by TGA-ZSR's imagenet_classes_names.txt, "
                         f"which {path} is not ({type(e).__name__}: {e}); copy that file from "
                         f"github.com/zhyblue424/TGA-ZSR there") from None


def _tinyimagenet(root, transform, with_train=True):
    """TinyImageNet as its zip unpacks: train = train/<wnid>/images/ (500 a class), test = val/images/ (50 a class,
    labelled by val/val_annotations.txt); classes in the sorted order of wnids.txt, each named by the first synonym of
    its line in words.txt ("n01443537\tgoldfish, Carassius auratus" -> "goldfish"), as TGA-ZSR's class-name file.
    with_train=False reads the test images alone ("train" None)."""
    base = Path(root) / "tiny-imagenet-200"
    wnids = sorted((base / "wnids.txt").read_text().split())
    synonyms = dict(line.split("\t", 1) for line in (base / "words.txt").read_text().splitlines() if "\t" in line)
    missing = [w for w in wnids if w not in synonyms or with_train and not (base / "train" / w / "images").is_dir()]
    if missing:
        raise ValueError(f"{base}/wnids.txt lists {missing[0]}, which has no line in words.txt or no folder "
                         f"train/{missing[0]}/images/: unpack tiny-imagenet-200.zip there again")
    label = {w: i for i, w in enumerate(wnids)}
    train_files = [(path, label[w]) for w in wnids * with_train
                   for path in sorted((base / "train" / w / "images").iterdir())
                   if torchvision.datasets.folder.is_image_file(path.name)]
    test_files = []
    for line in (base / "val" / "val_annotations.txt").read_text().splitlines():  # file, wnid, bounding box
        file, wnid = line.split("\t")[:2]
        if wnid not in label or not (base / "val" / "images" / file).is_file():
            raise ValueError(f"{base}/val/val_annotations.txt names {file} of {wnid}, which is not in val/images/ or "
                             f"wnids.txt: unpack tiny-imagenet-200.zip there again")
        test_files.append((base / "val" / "images" / file, label[wnid]))
    classes = [synonyms[w].split(",")[0].strip().replace("_", " ") for w in wnids]
    return {"train": ImageFiles(train_files, transform) if with_train else None,
            "test": ImageFiles(test_files, transform)}, classes


def _imagenet_wnids(root):
    """ImageNet's 1000 wnids in label order (sorted), from whichever the user has: CoOp's imagenet/classnames.txt,
    the class folders of imagenet/train/, or those of imagenet-sketch/images/."""
    root = Path(root)
    coop = root / "imagenet" / "classnames.txt"  # "n01440764 tench" per line
    if coop.is_file():
        wnids = [line.split()[0] for line in coop.read_text().splitlines() if line.strip()]
    else:
        folders = [f for f in (root / "imagenet" / "train", root / "imagenet-sketch" / "images") if f.is_dir()]
        wnids = sorted(p.name for p in folders[0].iterdir() if p.is_dir()) if folders else []
    if len(wnids) != 1000:
        raise ValueError(f"ImageNet-A and -R are labelled by ImageNet's wnid order, which comes from "
                         f"{root}/imagenet/classnames.txt (CoOp's), {root}/imagenet/train/<wnid>/ or "
                         f"{root}/imagenet-sketch/images/<wnid>/; none of them lists 1000 wnids here: put one there")
    return wnids


def _imagenet_variant(name, root, transform):
    """A shifted ImageNet test set as (Split, class names): CLIP's ImageNet names, labels in ImageNet's order;
    ImageNet-A and -R hold 200 of its classes, renumbered 0..199 in that order."""
    ds = torchvision.datasets.ImageFolder(Path(root) / DATASETS[name].folder, transform=transform)
    # ImageNet-V2's class folders are ImageNet's label numbers, -A's and -R's its wnids
    position = ({str(i): i for i in range(1000)} if name == "imagenet_v2" else
                {w: i for i, w in enumerate(_imagenet_wnids(root))})
    unknown = [c for c in ds.classes if c not in position]
    if unknown:
        raise ValueError(f"{name} has a class folder {unknown[0]} that is not an ImageNet class; keep only the "
                         f"dataset's own folders in {Path(root) / DATASETS[name].folder}")
    index = [position[c] for c in ds.classes]
    kept = sorted(index)
    label = [kept.index(index[y]) for y in range(len(index))]  # ImageFolder's label -> ours
    return Split(ds, range(len(ds)), [label[y] for y in ds.targets]), [open_clip.IMAGENET_CLASSNAMES[i] for i in kept]


def _fixed_split(name, whole, every_image=False):
    """(train indices, test indices, labels, class names) of a dataset that torchvision does not split: as close to
    CoOp's as the official files allow, in CoOp's label order, and the same whatever order the files are listed in.
    every_image: every image is the test set, every class kept, as TGA-ZSR tests these datasets."""
    labels, classes = _labels(whole), _class_names(name, whole)
    order = list(range(len(labels)))  # the images that take part, in the order the split draws from
    if name == "sun397":
        files = [p.relative_to(whole._data_dir).as_posix() for p in whole._image_files]
        order.sort(key=files.__getitem__)  # torchvision lists the files with rglob, in no fixed order
    if every_image:
        return [], order, labels, classes
    part = None  # image -> "train" / "test" / None (unused), where official files fix the split
    # CoOp drops Caltech101's Faces_easy (the subjects of Faces again): 100 classes, later labels move up; we drop
    # Caltech-256's clutter class likewise (no object to name), leaving its 256 object classes
    if name in ("caltech101", "caltech256"):
        dropped = "Faces_easy" if name == "caltech101" else "257.clutter"
        if dropped not in whole.categories:  # load_dataset turns this into its one-line layout error
            raise FileNotFoundError(f"no class folder {dropped}")
        gone = whole.categories.index(dropped)
        del classes[gone]
        order = [i for i in order if labels[i] != gone]
        labels = [y - (y > gone) for y in labels]
    elif name == "ucf101":
        # CoOp numbers the classes as classInd.txt does: CamelCase names sorted case-insensitively (sorting the
        # folder names "Hammer_Throw", "Hammering" puts that pair, and "Jump_Rope"/"Jumping_Jack", the other way)
        rank = sorted(range(len(classes)), key=lambda c: whole.classes[c].replace("_", "").lower())
        new_label = {old: new for new, old in enumerate(rank)}
        labels, classes = [new_label[y] for y in labels], [classes[c] for c in rank]
        groups = []  # official split 1: groups 1-7 of v_<Class>_gNN_cMM are the test set, so no group is in both
        for path, _ in whole.samples:
            match = re.search(r"_g(\d+)_c\d+\.\w+$", path)
            if match is None:
                raise ValueError(f"{path} is not named v_<Class>_gNN_cMM.jpg as CoOp's UCF-101-midframes are")
            groups.append(int(match.group(1)))
        part = lambda i: "test" if groups[i] <= 7 else "train"
    elif name == "sun397" and (whole._data_dir / "Testing_01.txt").is_file():  # official partition 1, CoOp's
        listed = [{line.strip().lstrip("/") for line in (whole._data_dir / f).read_text().splitlines()}
                  for f in ("Training_01.txt", "Testing_01.txt")]
        part = lambda i: "train" if files[i] in listed[0] else "test" if files[i] in listed[1] else None
    if part is None:
        train_idx, test_idx = stratified_split([labels[i] for i in order])
        return [order[j] for j in train_idx], [order[j] for j in test_idx], labels, classes
    return [i for i in order if part(i) == "train"], [i for i in order if part(i) == "test"], labels, classes


def load_dataset(name, root, preprocess, download=True, split_json=None, with_train=True, conventions="coop"):
    """A dataset's splits and class names, {"train": Split, "test": Split, "classes": [str], "split"}; "train" is None
    for the evaluation-only sets (ImageNet-V2, -Sketch, -A, -R). Images come as preprocess (a preprocess_cfg, or
    tga_zsr_preprocess) says (image_transform), as uint8 (3, H, W) tensors. With split_json (CoOp's
    split_zhou_<Name>.json) its "train" and "test" lists and class names are used exactly, and "split" records the
    file and its sha256; otherwise "split" is {"source": "default"} (see README). with_train=False (a dataset only
    evaluated) reads the test split alone, so only it need be on disk (ImageNet: val/ and torchvision's meta.bin), and
    "train" is None. conventions="tga-zsr": TGA-ZSR's class sets, test sets and names (split "tga-zsr"); the
    datasets it tests on every image have no training split."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}")
    tga_zsr = conventions == "tga-zsr"
    if tga_zsr and (name not in TGA_ZSR or split_json is not None):
        raise ValueError(f"--conventions tga-zsr reads TGA-ZSR's 16 datasets as its code does, without CoOp's "
                         f"splits; pass {name} without a split file, under --conventions coop")
    transform = image_transform(preprocess)
    _, train_splits, test_split, image_dir = DATASETS[name]
    if conventions == "fap" and name == "fgvc_aircraft":  # CoOp's (FAP's) training split is train, not trainval
        train_splits = ("train",)
    if split_json is not None:
        try:  # {"train": [[relpath, label, classname], ...], "val": ..., "test": ...}
            raw = Path(split_json).read_bytes()
            spec = json.loads(raw)
            parts = {part: [(str(p), int(label), str(c)) for p, label, c in spec[part]] for part in ("train", "test")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{split_json} is not a readable CoOp split JSON ({type(e).__name__}: {e}); pass a "
                             f"split_zhou_<Name>.json") from None
        folder = Path(root) / image_dir
        entries = parts["train"] * with_train + parts["test"]
        missing = next((p for p, _, _ in entries if not (folder / p).is_file()), None)
        if missing is not None:
            raise ValueError(f"{split_json} lists {missing}, which is not under {folder}; put {name}'s images there")
        pairs = {(label, cname.replace("_", " ")) for _, label, cname in entries}
        names = dict(sorted(pairs))
        if len(names) < len(pairs) or sorted(names) != list(range(len(names))):  # as CoOp's files all are
            raise ValueError(f"{split_json} does not label its classes 0 to n − 1 with one name each; pass a CoOp "
                             f"split_zhou_<Name>.json, or a file made so")
        split = {"source": "coop", "file": Path(split_json).name, "sha256": hashlib.sha256(raw).hexdigest()}
        return {part: ImageFiles([(folder / p, label) for p, label, _ in items], transform)
                if with_train or part == "test" else None
                for part, items in parts.items()} | {"classes": [names[c] for c in range(len(names))], "split": split}
    created = [f for f in (Path(root), Path(root) / image_dir.split("/")[0]) if not f.exists()]  # by a download
    try:
        ds = None  # the torchvision dataset whose class list is the dataset's
        if name == "tinyimagenet":
            parts, classes = _tinyimagenet(root, transform, with_train)
        elif train_splits == ():  # an evaluation-only test set
            test, classes = _imagenet_variant(name, root, transform)
            parts = {"train": None, "test": test}
        elif train_splits is None:
            whole = ds = _torchvision_dataset(name, root, split=None, transform=transform, download=download)
            # TGA-ZSR tests these on every image (of its 16: Caltech101, Caltech-256, EuroSAT, SUN397)
            train_idx, test_idx, labels, classes = _fixed_split(name, whole, every_image=tga_zsr)
            parts = {"train": None if tga_zsr else Split(whole, train_idx, [labels[i] for i in train_idx]),
                     "test": Split(whole, test_idx, [labels[i] for i in test_idx])}
        else:
            test = ds = _torchvision_dataset(name, root, test_split, transform=transform, download=download)
            train_parts = [_torchvision_dataset(name, root, s, transform=transform, download=download)
                           for s in train_splits * with_train]
            joined = torch.utils.data.ConcatDataset(train_parts) if with_train else None
            classes = _class_names(name, test)  # a split's class list is the dataset's (each imagefolder's its own)
            odd = set().union(*(set(_class_names(name, d)) ^ set(classes) for d in train_parts))
            if odd:  # ImageFolder numbers each split's folders alone: a class in one split only shifts the labels
                raise ValueError(f"the splits of {name} have other classes ({', '.join(sorted(odd))} in one of them "
                                 f"only); give every split the same class folders")
            parts = {"train": Split(joined, range(len(joined)), sum((_labels(d) for d in train_parts), []))
                     if with_train else None, "test": Split(test, range(len(test)), _labels(test))}
    except (RuntimeError, OSError) as e:  # how torchvision, and file reads, report a missing or odd tree
        for made in created:  # a failed download, or torchvision's own mkdir, leaves empty or partial folders
            shutil.rmtree(made, ignore_errors=True)
        fetch = ", or drop --no-download to let torchvision fetch it" if name in DOWNLOADABLE and not download else ""
        raise ValueError(f"{name} could not be loaded from {root} ({str(e).splitlines()[0]}); it is read from "
                         f"{LAYOUTS[name]} under {root}: put it there{fetch}") from None
    if tga_zsr:
        return {**parts, "classes": _tga_zsr_classes(name, ds, root, classes), "split": {"source": "tga-zsr"}}
    return {**parts, "classes": classes, "split": {"source": "default"}}


def synthetic_dataset(n_classes, train_per_class, n_test, image_size, seed):
    """Random images in load_dataset's format, the data of --dry-run and --synthetic: train_per_class of every class,
    n_test balanced test images. torchvision's FakeData draws each image from its index when it is read, through the
    PIL -> tensor path of real files, so a test set of ImageNet's size takes no memory. The test images are drawn
    from an offset of their own, so they are the same whatever the training set's size (the shots)."""
    transform = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()])
    n_train = n_classes * train_per_class
    train_set, test_set = (torchvision.datasets.FakeData(n, (3, image_size, image_size), n_classes, transform,
                                                         random_offset=seed * 10_000_000 + offset)
                           for n, offset in ((n_train, 0), (n_test, 5_000_000)))
    train_labels = torch.arange(n_classes).repeat_interleave(train_per_class).tolist()
    test_labels = (torch.arange(n_test) % n_classes).tolist()
    return {"train": Split(train_set, range(n_train), train_labels),
            "test": Split(test_set, range(n_test), test_labels),
            "classes": [f"class {c}" for c in range(n_classes)], "split": {"source": "synthetic"}}


def cache_images(dataset, indices, device, num_workers=0):
    """Decode and resize the chosen images once: ((N, 3, H, W) uint8, (N,) int64), both on device, filled batch by
    batch into tensors made once (host memory holds the images about once, not a list of batches and their copy). A
    file that does not decode (a truncated download, say) raises ValueError naming it."""
    # one batch is decoded in this process: worker processes would only add their start-up (a dry run's sets)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=64,
                                         num_workers=num_workers if len(indices) > 64 else 0)
    labels, filled = torch.empty(len(indices), dtype=torch.int64, device=device), 0
    try:
        for x, y in loader:
            if filled == 0:  # the image size is known from the first batch
                images = torch.empty((len(indices), *x.shape[1:]), dtype=x.dtype, device=device)  # (N, 3, H, W)
            images[filled:filled + len(y)], labels[filled:filled + len(y)] = x, y
            filled += len(y)
    except OSError:  # PIL's, raised here or by a loader worker (torch re-raises its type): find the file
        for i in indices:
            try:
                dataset[i]
            except OSError as e:
                raise ValueError(f"{_image_file(dataset, i)} does not decode ({e}); restore that file from the "
                                 f"dataset's archive (or download the dataset again) and rerun: finished cells are "
                                 f"kept") from None
        raise
    return images, labels


def _image_file(dataset, i):
    """The file behind image i of a dataset, through Split, Subset and ConcatDataset, for an error message."""
    while isinstance(dataset, (Split, torch.utils.data.Subset, torch.utils.data.ConcatDataset)):
        if isinstance(dataset, torch.utils.data.ConcatDataset):
            k = next(k for k, end in enumerate(dataset.cumulative_sizes) if i < end)
            dataset, i = dataset.datasets[k], i - (dataset.cumulative_sizes[k - 1] if k else 0)
        else:
            dataset, i = dataset.dataset, dataset.indices[i]
    for attr in ("items", "samples", "_samples", "_images", "_image_files"):  # ours, ImageFolder, torchvision's
        if hasattr(dataset, attr):
            entry = getattr(dataset, attr)[i]
            return entry[0] if isinstance(entry, tuple) else entry
    return f"image {i} of {type(dataset).__name__}"


# ----------------------------------------------------------------------------------------------------------------------
# Results: atomic JSON files, the paper's H, and the tables over seeds that summarize writes

# The models a results entry can name (a --baseline folder names itself), as the tables name them, and the --tune
# that trains them: the mask, the weights tuned instead, the unmasked baseline. TUNED_MODEL: --tune -> its model.
MODELS = {"advmask": ("AdvMask", "mask"), "adv_ft": ("adversarial fine-tuning", "weights"), "clip": ("CLIP", None)}
TUNED_MODEL = {tune: model for model, (_, tune) in MODELS.items() if tune}


def write_json(path, obj):
    """Write obj as indented JSON, atomically."""
    _atomic_write(path, json.dumps(obj, indent=2) + "\n")


def read_json(path, keys=()):
    """A JSON object a run wrote, with `keys` (those its reader needs); one that does not parse (truncated, edited)
    or is another file is one line naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): it is truncated or corrupted; restore it from a copy, or "
                         f"delete it (a run without its config.json trains again, without its results.json it "
                         f"evaluates every cell again)") from None
    lacks = "is not a JSON object" if not isinstance(obj, dict) else next(
        (f"has no {k!r}" for k in keys if k not in obj), None)
    if lacks:
        raise ValueError(f"{path} {lacks}, so it is not a run's {Path(path).name} (another program's, or edited); "
                         f"move it out of the way and rerun the command that makes it")
    return obj


@contextlib.contextmanager
def _hand_edited(path, reader, remedy):
    """Inside this block, a value of a run's JSON file that a hand edit left parsing but gone or of another type than
    run writes (KeyError, TypeError, ...) ends in one sentence naming the file."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path} has a value that {reader} cannot read ({type(e).__name__}: {e}), as a hand edit "
                         f"leaves it; restore the file from a copy, or {remedy}") from None


def harmonic_mean(values):
    """n / Σ 1/v: the H of the paper's base-to-new table over (base clean, base adv, new clean, new adv)."""
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


def _mean(values):
    return sum(values) / len(values) if values else None


def _cell(values, n_seeds):
    """'mean ± std' in % over seeds, '(k/n)' when seeds are missing, '—' when none finished."""
    if not values:
        return "—"
    text = f"{100 * _mean(values):.1f}"
    if len(values) > 1:
        text += f" ± {100 * statistics.stdev(values):.1f}"
    return text + (f" ({len(values)}/{n_seeds})" if len(values) < n_seeds else "")


def write_report(out_dir, name, text, records):
    """Write out_dir/<name>.md and out_dir/<name>.csv (records: dicts with the same keys, the columns) atomically, and
    print the markdown."""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    _atomic_write(Path(out_dir) / f"{name}.md", text)
    _atomic_write(Path(out_dir) / f"{name}.csv", table.getvalue())
    print(text)


def _split_source(splits, *datasets):
    """The splits a results entry rests on, as one string: each dataset's default, synthetic, or CoOp file + sha256."""
    if splits is None:
        return "unrecorded"
    named = [(d, splits[d]) for d in dict.fromkeys(datasets) if d in splits]
    return ", ".join(f"{d}: " + (f"{s['file']} sha256 {s['sha256'][:12]}" if s["source"] == "coop" else s["source"])
                     for d, s in named)


# What each setting of a run decides: every flag of parse_args and what run adds to its settings, in one table (a test
# checks that none is missing). Roles:
#   train  decides the trained file: a checkpoint is resumed, and a mask or weights file reused, only when all agree;
#          the others only change the evaluation, where inputs are found or how the run is saved (what those name is
#          compared instead: the model by its identity, SAME_MODEL; the data by its split record; a --masks file by
#          its sha256). Device and precision train: bf16 and fp32 end in other masks, devices draw other starts.
#   cell   part of an evaluation cell's key, beside the model, class set, test set, attack and ε: a rerun with another
#          value evaluates new cells and keeps the old ones
#   basis  seeds of a summary cell must agree on it to be averaged
#   tuned  the same, for the tuned model's cells alone: a baseline's numbers do not rest on how the mask was trained
#   source labels, and files, the runs that evaluate a trained file, from its header's provenance (which records
#          every training setting)
# and, where a summary tables cells apart by it, the words its heading adds when it differs from the parser's default.
SETTINGS = {
    "dry_run": ("train basis", "dry run: random model and images"), "synthetic": ("train basis", "synthetic images"),
    "dataset": ("train source", None), "protocol": ("train", None), "shots": ("train source", None),
    "seed": ("train source", None), "train_split": ("train", None), "data_root": ("", None),
    "no_download": ("", None), "split_json": ("", None), "split_dir": ("", None), "workers": ("", None),
    "model": ("basis", "model {}"), "pretrained": ("basis", "weights {}"), "model_identity": ("", None),
    "tune": ("train", None), "mask_target": ("train tuned", None), "loss": ("train tuned source", None),
    "lam": ("train tuned source", None), "lr": ("train tuned source", None), "epochs": ("train tuned", None),
    "batch_size": ("train tuned", None), "train_eps": ("train tuned", None), "train_alpha": ("train tuned", None),
    "train_steps": ("train tuned", None), "precision": ("train tuned", None), "device": ("train", None),
    "deterministic": ("train", None), "checkpoint_every": ("", None), "benchmark": ("train", None),
    "masks": ("", None), "weights": ("", None), "tuned_file_sha256": ("train", None),
    "eval_datasets": ("", None), "eval_presets": ("", None), "attack": ("", None), "test_eps": ("", None),
    "test_steps": ("cell basis", "{} attack steps"), "test_alpha": ("cell basis", "α = {:g}/255"),
    "eval_limit": ("cell basis", "at most {} test images per dataset"),
    "eval_precision": ("cell basis", "{} evaluation"), "test_batch": ("cell", "test batch {}"),
    "eval_batch_size": ("", None), "conventions": ("train basis", "{} conventions"), "baseline": ("", None),
    "baseline_identity": ("", None), "out_dir": ("", None), "overwrite": ("", None), "code": ("", None),
}
CELL_SETTINGS = tuple(k for k, (roles, _) in SETTINGS.items() if "cell" in roles.split())
SAME_BASIS = tuple(k for k, (roles, _) in SETTINGS.items() if "basis" in roles.split())
TUNED_BASIS = tuple(k for k, (roles, _) in SETTINGS.items() if "tuned" in roles.split())
PROVENANCE = tuple(k for k, (roles, _) in SETTINGS.items() if "source" in roles.split())
EVAL_ONLY = {k for k, (roles, _) in SETTINGS.items() if "train" not in roles.split()}
# What identifies the model evaluated besides its name and tag or file (load_clip's identity): the network and the
# weights themselves. open_clip's version is recorded beside them, not compared.
SAME_MODEL = ("file_sha256", "config_sha256", "activation", "preprocess", "weights_sha256")


def _heading(finished, entry, defaults):
    """The words a table's heading adds for what a results entry rests on beyond the defaults ("" for the paper's
    setting): each SETTINGS heading whose value (the cell's own, else its run's) is not the parser's default, those of
    --dry-run for a dry run. defaults(dry_run) gives the parser's defaults."""
    s = finished.get("settings", {})
    default = {**defaults(True), "dry_run": False} if s.get("dry_run") else defaults(False)
    values = {k: entry.get(k, s.get(k)) if k in CELL_SETTINGS else s.get(k)  # a cell's own, else its run's
              for k, (_, heading) in SETTINGS.items() if heading}
    # by value alone: 0 attack steps (or α = 0) is a setting of its own, though 0 == False
    return "; ".join(SETTINGS[k][1].format(v) for k, v in values.items() if v is not None and v != default[k])


def _test_split(dataset, name):
    """The dataset whose split class set `name` takes its test images from: the training dataset's for base and new."""
    return dataset if name in ("base", "new") else name


def _superseded(finished, dataset, entry):
    """Whether a results entry was measured on a test set that a later run in its folder replaced (other test images
    or prompts, e.g. CoOp's file by --split-dir): results.json keeps such cells, and its splits and class sets record
    the latest run's."""
    own = entry.get("test_set")  # None: recorded before cells kept their test set
    split = finished.get("splits", {}).get(_test_split(dataset, entry["eval"]))
    latest = _test_set(split, None, finished.get("class_sets", {}).get(entry["eval"]))
    return own is not None and (own["split"], own["class_set_sha256"]) != (latest["split"], latest["class_set_sha256"])


def _basis(finished, dataset, entry):
    """(what, value) pairs that must agree across the seeds of a summary cell: the split source of the datasets the
    entry rests on, its class set as recorded (templates, class names, test-set size and resizing, by their sha256),
    the settings of SAME_BASIS (and TUNED_BASIS for the tuned model's cells), the identity of the model evaluated
    (SAME_MODEL; a --baseline folder's own), and for a worst-case entry the attacks it is the worst of."""
    settings = finished.get("settings", {})
    tuned = TUNED_BASIS if entry["model"] in TUNED_MODEL.values() else ()  # a baseline's cells rest on no training
    identity = settings.get("model_identity" if entry["model"] in MODELS else "baseline_identity") or {}
    if settings.get("pretrained") == "none" and entry["model"] in MODELS:  # random weights, drawn from the seed
        identity = {**identity, "weights_sha256": "random"}
    class_set = finished.get("class_sets", {}).get(entry["eval"])  # the prompts are template.format(class), in order
    own = entry.get("test_set") or _test_set(None, None, class_set)  # the cell's own, which a rerun may change
    splits = finished.get("splits")
    if splits is not None and own["split"]:
        splits = {**splits, _test_split(dataset, entry["eval"]): own["split"]}
    return (("splits", _split_source(splits, dataset, entry["eval"])),
            ("prompts and resizing", own["class_set_sha256"] or "unrecorded"),
            *((k, entry[k] if k in CELL_SETTINGS and k in entry else settings.get(k, "unrecorded"))
              for k in SAME_BASIS + tuned),
            *((f"model {k}", json.dumps(identity.get(k, "unrecorded"))) for k in SAME_MODEL),
            ("attacks", ",".join(entry["attacks"]) if "attacks" in entry else None))


# A cell of a summary: its table (protocol, attack, ε, basis: _heading's words), its row (method, dataset), its
# column (shots, the class set evaluated)
SummaryCell = collections.namedtuple("SummaryCell", "protocol attack eps basis method dataset shots eval")


def _summary_cells(finished, protocol, dataset, shots, defaults):
    """(SummaryCell, entry, _basis) of each entry of a run folder's results.json that summarize tables (those measured
    on the test sets of its latest run); a value gone or of another type than run writes raises what _hand_edited
    turns into one sentence (KeyError, TypeError, ...)."""
    lr = finished.get("settings", {}).get("lr")
    cells = []
    for e in finished["results"]:
        if _superseded(finished, dataset, e):
            continue
        if not (all(isinstance(e[k], str) for k in ("model", "eval", "attack")) and
                all(isinstance(e[k], (int, float)) for k in ("eps", "clean_acc", "adv_acc"))):
            raise TypeError("a cell's model, eval or attack is not a string, or its eps or an accuracy not a number")
        tuned = e["model"] in TUNED_MODEL.values()
        method = (MODELS[e["model"]][0] if e["model"] in MODELS else e["model"]) + (  # trained: at its lr
            f" (lr {lr:g})" if lr is not None and tuned else "")
        # a worst case is a metric of its own for each set of attacks (a rerun may add one to the set)
        attack = f"worst of {','.join(e['attacks'])}" if e["attack"] == "worst" else e["attack"]
        key = SummaryCell(protocol=protocol, attack=attack, eps=e["eps"], basis=_heading(finished, e, defaults),
                          method=method, dataset=dataset, shots=shots, eval=e["eval"])
        basis = _basis(finished, dataset, e)
        hash(basis)  # a dict key in summarize: a list where run writes a string or a number raises TypeError here
        cells.append((key, e, basis))
    return cells


def _seeds_by_cell(runs_dir, defaults):
    """summarize's reading of the run folders under runs_dir, with its refusals: {SummaryCell: {seed: its results
    entry}}, and {protocol: (datasets, shots, seeds)} of the run folders there are, finished or not."""
    acc = {}  # SummaryCell -> {seed: its results entry}
    source = {}  # (SummaryCell, seed) -> the run folder of its entry
    seen = {}  # protocol -> (datasets, shots, seeds) that have a run folder, finished or not
    bases = {}  # a SummaryCell less its shots -> {basis: a run folder that has it}
    tabled = set()  # the results.json files read
    for cell in sorted(runs_dir.glob("*/*/*shot/seed*")):
        # seed<S>, and seed<S>-weights for the --tune weights arm: its rows sit beside the mask's; numbers as run
        # writes them (a hand-named seed01 would be read as seed1, and one of the two runs dropped unsaid)
        match = re.fullmatch(r"([1-9]\d*)shot/seed(0|[1-9]\d*)(-weights)?", f"{cell.parent.name}/{cell.name}")
        if not (cell.is_dir() and match):
            continue
        protocol, dataset, shots, seed = cell.parts[-4], cell.parts[-3], int(match[1]), int(match[2])
        for group, value in zip(seen.setdefault(protocol, (set(), set(), set())), (dataset, shots, seed)):
            group.add(value)
        if (cell / "results.json").is_file():
            tabled.add(cell / "results.json")
            finished = read_json(cell / "results.json", ("results",))
            # a results.json copied or moved by hand (seed1 copied to seed2 would be averaged with itself)
            here = {"protocol": protocol, "dataset": dataset, "shots": shots, "seed": seed}
            if moved := [f"{k} {finished[k]}" for k, v in here.items() if finished.get(k, v) != v]:
                raise ValueError(f"{cell} holds the run of {', '.join(moved)} (its results.json says so), which this "
                                 f"folder would table as another; move it to its own folder, or delete it")
            with _hand_edited(cell / "results.json", "summarize", "delete it and rerun its command"):
                cells = _summary_cells(finished, protocol=protocol, dataset=dataset, shots=shots, defaults=defaults)
            if (gone := len(finished["results"]) - len(cells)) > 0:
                print(f"{cell}: leaving out {gone} cell{'s' * (gone != 1)} measured on test sets that its latest run "
                      f"replaced", file=sys.stderr)
            for key, e, basis in cells:
                # one trained run per cell and seed: two folders' (a mask's run in seed1-weights beside seed1's) are
                # refused; a baseline's cells, the same in both arms' folders, may repeat
                if e["model"] in TUNED_MODEL.values() and (first := source.setdefault((key, seed), cell)) != cell:
                    raise ValueError(f"{first} and {cell} both hold seed {seed} of {key.method} on {key.eval}; keep "
                                     f"one of the two runs in this runs folder")
                acc.setdefault(key, {})[seed] = e
                # seeds of one table cell must agree; a run's cells of other evaluation settings have tables apart
                bases.setdefault(key._replace(shots=None), {}).setdefault(basis, cell)
    for key, used in bases.items():
        if len(used) > 1:
            (a, cell_a), (b, cell_b) = list(used.items())[:2]
            what, value_a, value_b = next((k, va, vb) for (k, va), (_, vb) in zip(a, b) if va != vb)
            raise ValueError(f"{key.protocol}/{key.dataset} (evaluated on {key.eval}) mixes {what}, {value_a} in "
                             f"{cell_a} and {value_b} in {cell_b}, which cannot be averaged; summarize runs of one "
                             f"kind at a time (one runs folder each)")
    others = sorted(set(runs_dir.rglob("results.json")) - tabled)  # a consensus mask's runs, hand-named folders
    outside = f"{len(others)} results.json outside that layout (such as {others[0].parent})" if others else ""
    if not acc:
        raise ValueError(f"no results.json under {runs_dir}/<protocol>/<dataset>/<K>shot/seed<S>/" +
                         (f", only {outside}: read them there" if others else "; run some first"))
    if others:
        print(f"{runs_dir}: leaving out {outside}; read them there", file=sys.stderr)
    return acc, seen


def _summary_tables(runs_dir, acc, seen):
    """summary.md's text and summary.csv's records (a row per cell and metric) of _seeds_by_cell's cells acc, with a
    row for each dataset of seen that has no finished cell."""
    metrics = ("clean", "adv")  # each cell's two numbers: clean_acc and adv_acc
    order = {name: i for i, name in enumerate(DATASETS)}

    def in_paper_order(names):  # the paper's order of datasets, then the rest
        return sorted(names, key=lambda name: (order.get(name, len(order)), name))

    records = []  # summary.csv: a row per cell and metric
    for k, runs in acc.items():
        for metric in metrics:
            values = [e[f"{metric}_acc"] for e in runs.values()]
            records.append({"protocol": k.protocol, "model": next(iter(runs.values()))["model"], "attack": k.attack,
                            "eps": k.eps, "dataset": k.dataset, "shots": k.shots, "eval": k.eval, "metric": metric,
                            "mean": _mean(values), "std": statistics.stdev(values) if len(values) > 1 else "",
                            "seeds": len(values), "method": k.method, "basis": k.basis})
    md = [f"# AdvMask results ({runs_dir})", ""]
    # a table per protocol, attack, ε and basis (what its cells rest on beyond the defaults), a row per method there
    by_table = {}  # (protocol, attack, ε, basis) -> its cells
    for k in acc:
        by_table.setdefault((k.protocol, k.attack, k.eps, k.basis), []).append(k)
    for (protocol, attack, eps, basis), here in sorted(by_table.items()):
        datasets, all_shots, seeds = seen[protocol]
        # the datasets with cells on this basis, and those with none finished on any (their rows say "—")
        datasets = in_paper_order({k.dataset for k in here} | (datasets - {k.dataset for k in acc}))
        all_shots, seeds = sorted(all_shots), sorted(seeds)
        methods = sorted({k.method for k in here}, key=lambda m: (m != "CLIP", m))  # as the figure's legend

        def stat(method, dataset, shots, evaluated):  # per-seed values of one cell, a list per metric
            runs = acc.get(SummaryCell(protocol=protocol, attack=attack, eps=eps, basis=basis, method=method,
                                       dataset=dataset, shots=shots, eval=evaluated), {})
            return [[e[f"{metric}_acc"] for e in runs.values()] for metric in metrics]

        attack_name = (f"worst case per image over {attack.removeprefix('worst of ').upper()}"
                       if attack.startswith("worst of ") else attack.upper())
        title = (f"## {protocol} | {attack_name} ε = {eps:g}/255" + (f" | {basis}" if basis else "") +
                 f" | mean ± std over seeds {', '.join(map(str, seeds))} (%)")
        if protocol == "few_shot":
            columns = [f"{k}-shot {m}" for k in all_shots for m in metrics]
            tables = [(title, "dataset", columns, {method: {d: [v for k in all_shots for v in stat(method, d, k, d)]
                                                            for d in datasets} for method in methods})]
        elif protocol == "base2new":  # one table per shot count
            tables = [(f"{title}, {k} shot{'s' * (k != 1)}", "dataset", ["base clean", "base adv", "new clean",
                                                                         "new adv"],
                       {method: {d: [v for part in ("base", "new") for v in stat(method, d, k, part)]
                                 for d in datasets} for method in methods}) for k in all_shots]
        else:  # transfer: one table per source dataset and shot count, a row per evaluated dataset
            tables = []
            for d, k in itertools.product(datasets, all_shots):
                targets = in_paper_order({key.eval for key in here if (key.dataset, key.shots) == (d, k)})
                if targets:
                    tables.append((f"{title}, trained on {d}, {k} shot{'s' * (k != 1)}", "evaluated on",
                                   ["clean", "adv"], {method: {t: stat(method, d, k, t) for t in targets}
                                                      for method in methods}))
        for heading, first, columns, by_method in tables:
            with_h = protocol == "base2new"
            md += [heading, "", "| " + " | ".join(["method", first] + columns + (["H"] if with_h else [])) + " |",
                   "|" + "---|" * (len(columns) + 2 + with_h)]
            for method, rows in by_method.items():
                averages = [_mean([_mean(r[j]) for r in rows.values()]) if all(r[j] for r in rows.values()) else None
                            for j in range(len(columns))]
                for name, cells in list(rows.items()) + [("Average", None)]:
                    means = [_mean(c) for c in cells] if cells else averages
                    texts = [_cell(c, len(seeds)) for c in cells] if cells else [
                        "—" if m is None else f"{100 * m:.1f}" for m in averages]
                    if with_h:
                        texts.append("—" if None in means else f"{100 * harmonic_mean(means):.1f}")
                    md.append("| " + " | ".join([method, f"**{name}**" if cells is None else name] + texts) + " |")
            md.append("")
    return "\n".join(md), records


def summarize(runs_dir, defaults, out_dir=None):
    """Tables over seeds of runs_dir/<protocol>/<dataset>/<K>shot/seed<s>/results.json, in out_dir (default:
    runs_dir) as summary.md (returned) and summary.csv: a table per protocol, attack, ε and basis (_heading, from
    defaults(dry_run), the parser's defaults), a row per method and dataset, mean ± std in %, an "Average" row over
    datasets per method, and for base2new the paper's five columns with H, the harmonic mean of the four averaged
    accuracies. A cell with no finished seed is "—", never 0, and so is an average over a column with such a cell.
    Of a run folder's cells, those measured on test sets that a later run there replaced are left out, in one line,
    and so are the runs outside that layout (a consensus mask's).
    Seeds of a cell that differ in anything else their numbers rest on (_basis: split source, prompts and resizing,
    model, data, training and evaluation settings) are refused, and so are a folder whose results.json records another
    protocol, dataset, shots or seed than its path, and two folders with a trained model's run of one cell and seed."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():  # a typo: nothing to table
        raise ValueError(f"{runs_dir} {'is not a folder' if runs_dir.exists() else 'does not exist'}; pass a runs "
                         f"root, the folder that holds <protocol>/<dataset>/<K>shot/seed<S>/")
    _require_writable(out_dir or runs_dir)  # before the runs are read
    text, records = _summary_tables(runs_dir, *_seeds_by_cell(runs_dir, defaults))
    write_report(out_dir or runs_dir, "summary", text, records)
    return text


# ----------------------------------------------------------------------------------------------------------------------
# Analysis and figures: where a mask cuts, how far masks agree beyond chance, a consensus mask, the few-shot plot

def _pyplot():
    """matplotlib's pyplot on its file-only backend, imported here: only the figure tools need it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_png(fig, path, **savefig_args):
    """Write a figure to path as a PNG, atomically (_atomic_write), and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, **savefig_args)
    _pyplot().close(fig)
    _atomic_write(path, buffer.getvalue())


ATTENTION_PARTS = ("q", "k", "v", "out")
# The attention weights of every family (FAMILIES) by their name in a block: rows q, k and v in thirds (open_clip's
# in_proj, timm's qkv), one of them (EVA02's), or the output projection, whose columns are the heads' outputs. Any
# other masked weight is an MLP layer, named by its module: fc and proj (c_fc, c_proj), fc1, fc2, fc1_g, fc1_x.
ATTENTION_WEIGHTS = {"attn.in_proj_weight": "qkv", "attn.qkv.weight": "qkv", "attn.q_proj.weight": "q",
                     "attn.k_proj.weight": "k", "attn.v_proj.weight": "v", "attn.out_proj.weight": "out",
                     "attn.proj.weight": "out"}


def mask_breakdown(header, bits):
    """Weights off per block and part: (block, part, head) -> (number off, number of weights). Parts are q, k, v and
    out of attention and the MLP's layers (ATTENTION_WEIGHTS), in any family's tower; head None stands for the whole
    part, a head h for its rows of q, k, v and its columns of out."""
    cells = {}
    for name, shape, b in zip(header["names"], header["shapes"], bits.split([math.prod(s) for s in header["shapes"]])):
        _, block, param = re.fullmatch(r"(.+?)\.(\d+)\.(.+)", name).groups()  # "trunk.blocks", "0", "attn.qkv.weight"
        block, part, off = int(block), ATTENTION_WEIGHTS.get(param), ~b.view(shape)  # off: (rows, cols)
        if part == "qkv":
            parts = dict(zip("qkv", off.chunk(3, dim=0)))
        else:  # "out": the heads' columns as rows
            parts = {part or param.split(".")[-2].removeprefix("c_"): off.T if part == "out" else off}
        for part, m in parts.items():  # m: (rows, cols), the head's slice on dim 0
            cells[block, part, None] = (m.sum().item(), m.numel())
            if part in ATTENTION_PARTS:
                for h, rows in enumerate(m.chunk(header["heads"], dim=0)):
                    cells[block, part, h] = (rows.sum().item(), rows.numel())
    return cells


def jaccard(off_a, off_b):
    """(|A ∩ B| / |A ∪ B|, its chance level) of two off-sets, (n,) bool with True = off. Two independent masks with
    fractions p₁, p₂ off share p₁p₂ of the weights and cover p₁ + p₂ − p₁p₂, so chance is p₁p₂ / (p₁ + p₂ − p₁p₂)."""
    union = (off_a | off_b).sum().item()
    p1, p2 = off_a.float().mean().item(), off_b.float().mean().item()
    chance = p1 * p2 / (p1 + p2 - p1 * p2) if p1 + p2 > 0 else 0.0
    return ((off_a & off_b).sum().item() / union if union else 0.0), chance


def consensus_bits(bits, k):
    """The mask whose weight is off if and only if it is off in at least k of the masks; bits: (n,) bool, True = on."""
    return torch.stack([~b for b in bits]).sum(dim=0) < k  # on where fewer than k masks switch it off


def _mask_files(paths):
    """{sha256: path} of every mask file named, once: a masks.bin itself, or every masks.bin below a run folder or a
    runs root."""
    # content sha256 -> as named: a file named twice (a runs root and a run in it), or a copy of it (an export's, a
    # backup's), is one mask, not a pair; a run's file records how it was trained, so only one training gives its bytes
    files = {}
    for path in map(Path, paths):
        # shallowest first: a run's own file before a copy inside its folder (an export's)
        found = [path] if path.is_file() else sorted(path.rglob("masks.bin"), key=lambda f: (len(f.parts), f))
        if not found:
            raise ValueError(f"{path} {'holds no masks.bin' if path.exists() else 'does not exist'}; pass a mask "
                             f"file, a run folder or a runs root")
        for f in found:
            first = files.setdefault(hashlib.sha256(f.read_bytes()).hexdigest(), f)
            if first.resolve() != f.resolve():
                print(f"{f} has the bytes of {first}: one mask, counted once")
    return files


def _label(path):
    """dataset/protocol/<K>shot/seed<S> from the config.json beside a mask file, else the file's path."""
    config = path.parent / "config.json"
    if not config.is_file():
        return str(path)
    c = read_json(config, ("dataset", "protocol", "shots", "seed"))
    return f"{c['dataset']}/{c['protocol']}/{c['shots']}shot/seed{c['seed']}"


def _heatmap(path, panels, xticks, yticks, xlabel="", ylabel="", suptitle=None):
    """One PNG with a heatmap per (title, matrix) panel, one colour scale from the smallest value of all panels to the
    largest (NaN blank), so that the spread shows: a mask's share off per head spans a few points, which a scale from
    0 would paint one colour."""
    plt = _pyplot()
    values = [v for _, matrix in panels for row in matrix for v in row if math.isfinite(v)]
    vmin, vmax = min(values, default=0), max(values, default=1)
    longest_x, longest_y = (max(len(str(t)) for t in ticks) for ticks in (xticks, yticks))
    width = max(3.0, 1.5 + 0.35 * len(xticks) + 0.1 * longest_y)  # room for the labels, the colourbar and the title
    height = 2 + 0.35 * len(yticks) + 0.07 * longest_x
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) + 1, height), squeeze=False,
                             layout="constrained")
    for ax, (title, matrix) in zip(axes[0], panels):
        image = ax.imshow(matrix, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.set_xticks(range(len(xticks)), xticks, rotation=90 if longest_x > 3 else 0)
        ax.set_yticks(range(len(yticks)), yticks)
    fig.colorbar(image, ax=axes[0].tolist(), location="right", shrink=0.8)
    if suptitle:
        fig.suptitle(suptitle)
    _save_png(fig, path, bbox_inches="tight")


def analyze(paths, out_dir, consensus=None, save=None):
    """Where masks cut and how far they agree: DIR/analysis.md (printed), analysis.csv and heatmaps; with consensus K,
    also the mask of the weights off in at least K of them, saved as a mask file to `save`. Returns the markdown."""
    digests = _mask_files(paths)
    files = list(digests.values())
    labels = [_label(f) for f in files]
    labels = [str(f) if labels.count(label) > 1 else label for f, label in zip(files, labels)]  # two roots' cell
    masks = [(label, *read_mask_file(f)) for label, f in zip(labels, files)]  # (label, header, bits)
    if consensus is not None:
        if not 1 <= consensus <= len(masks):
            raise ValueError(f"--consensus {consensus} must lie between 1 and the number of masks, {len(masks)}")
        fit = {(h["arch"], h["target"], tuple(h["names"])) for _, h, _ in masks}
        if len(fit) > 1:
            raise ValueError(f"--consensus needs masks of one architecture and target, these have {len(fit)} "
                             f"({', '.join(sorted({a + ' ' + t for a, t, _ in fit}))}); pass masks of one kind")
        # the consensus records the heads and pre-trained weights its masks share: masks of two models are refused
        for key, what, show in (("heads", "attention heads per block", str),
                                ("base_weights", "pre-trained weights",
                                 lambda b: f"{b['source']} {b['fingerprint'][:12]}")):
            values = [json.loads(v) for v in sorted({json.dumps(h[key]) for _, h, _ in masks})]
            if len(values) > 1:
                raise ValueError(f"--consensus got masks that record {' and '.join(map(show, values))} {what}; pass "
                                 f"masks of one model")
        # a run's masks.bin replaced by the consensus would pass the consensus off as what that run trained
        run_mask = Path(save).name == "masks.bin" and (Path(save).parent / "config.json").is_file()
        if run_mask or Path(save).is_file() and hashlib.sha256(Path(save).read_bytes()).hexdigest() in digests:
            raise ValueError(f"--save {save} is the trained mask of a run, or one of the masks; save the consensus to "
                             f"a file of its own")
        if Path(save).is_dir():
            raise ValueError(f"--save {save} is a folder; pass the path of the mask file to write, e.g. {save}/c.bin")
    out_dir = Path(out_dir)
    for old in [*out_dir.glob("heads_*.png"), out_dir / "overlap.png"]:  # an earlier analysis's figures
        old.unlink(missing_ok=True)
    md, records = ["# Mask analysis", ""], []  # analysis.csv: view, mask, block, part, head, value

    def record(view, mask, block="", part="", head="", value=""):
        records.append({"view": view, "mask": mask, "block": block, "part": part, "head": head, "value": value})

    for i, (label, header, bits) in enumerate(masks):
        cells = mask_breakdown(header, bits)
        fraction = {cell: off / n for cell, (off, n) in cells.items()}  # (block, part, head) -> share off
        off = 1 - bits.float().mean().item()
        md += [f"## {label}", "", f"{100 * off:.2f} % of {len(bits):,} {header['target']} weights off.", ""]
        record("overall", label, value=off)
        parts = list(dict.fromkeys(part for _, part, head in cells if head is None))
        blocks = sorted({block for block, _, _ in cells})
        md += ["| block | " + " | ".join(parts) + " |", "|---" * (len(parts) + 1) + "|"]
        for b in blocks:
            fractions = [fraction[b, p, None] for p in parts]
            md.append(f"| {b} | " + " | ".join(f"{100 * f:.1f}" for f in fractions) + " |")
            for p, f in zip(parts, fractions):
                record("part", label, b, p, value=f)
        md.append("")
        if not any(part in ATTENTION_PARTS for part in parts):
            continue  # an MLP mask: no attention heads to show
        heads = range(header["heads"])
        head_cells = {(b, h): [cells[b, p, h] for p in ATTENTION_PARTS] for b in blocks for h in heads}
        per_head = {bh: sum(off for off, _ in c) / sum(n for _, n in c) for bh, c in head_cells.items()}
        for b, p, h in itertools.product(blocks, ATTENTION_PARTS, heads):
            record("head", label, block=b, part=p, head=h, value=fraction[b, p, h])
        top = sorted(per_head, key=per_head.get, reverse=True)[:5]
        md += ["Heads with the most weights off (q, k, v rows and out columns): " + ", ".join(
            f"block {b} head {h} {100 * per_head[b, h]:.1f} %" for b, h in top), ""]
        png = out_dir / f"heads_{i}.png"
        panels = [(f"{p}: % off", [[100 * fraction[b, p, h] for h in heads] for b in blocks]) for p in ATTENTION_PARTS]
        _heatmap(png, panels, list(heads), blocks, xlabel="head", ylabel="block", suptitle=label)
        md += [f"![per-head % off of {label}]({png.name})", ""]
    if len(masks) > 1:
        md += ["## Overlap of the off-sets", "", "| mask A | mask B | Jaccard | chance | Jaccard ÷ chance |",
               "|---|---|---|---|---|"]
        grid = [[float("nan")] * len(masks) for _ in masks]  # Jaccard ÷ chance; blank: no chance level, or itself
        for (i, (a, ha, bits_a)), (j, (b, hb, bits_b)) in itertools.combinations(enumerate(masks), 2):
            if ha["names"] != hb["names"] or ha["shapes"] != hb["shapes"]:
                continue  # other weights: no overlap to speak of (a blank cell in the figure)
            value, chance = jaccard(~bits_a, ~bits_b)
            ratio = value / chance if chance else None  # no chance level when a mask has nothing off
            grid[i][j] = grid[j][i] = float("nan") if ratio is None else ratio
            md.append(f"| {a} | {b} | {value:.4f} | {chance:.4f} | {'—' if ratio is None else f'{ratio:.2f}'} |")
            for view, v in (("jaccard", value), ("chance", chance), ("ratio", ratio)):
                record(view, f"{a} | {b}", value="" if v is None else v)
        labels = [label for label, *_ in masks]
        _heatmap(out_dir / "overlap.png", [("Jaccard ÷ chance of the off-sets (1: as independent masks)", grid)],
                 labels, labels)
        md += ["", "![Jaccard index ÷ its chance level between masks](overlap.png)", ""]
    if consensus is not None:
        bits = consensus_bits([b for *_, b in masks], consensus)
        # a consensus was not trained: its provenance is its inputs (each file's sha256 and provenance), and what
        # they all share of PROVENANCE, which labels its runs; masks of several datasets are labelled "dtd+eurosat"
        inputs = [{"file": label, "sha256": sha256, **h.get("provenance", {})}
                  for (label, h, _), sha256 in zip(masks, digests)]  # _mask_files hashed each file
        shared = {k: inputs[0][k] for k in PROVENANCE if all(k in i and i[k] == inputs[0][k] for i in inputs)}
        if all("dataset" in i for i in inputs):
            shared["dataset"] = "+".join(dict.fromkeys(i["dataset"] for i in inputs))
        header = {k: v for k, v in masks[0][1].items() if k not in ("n_weights", "provenance")}
        write_mask_file(save, {**header, "provenance": {**shared, "consensus": {"k": consensus, "masks": inputs}}},
                        bits)
        md += [f"Consensus of {len(masks)} masks (off in ≥ {consensus}): {100 * (1 - bits.float().mean()):.2f} % off, "
               f"saved to {save}; evaluate it with --protocol transfer --masks {save}.", ""]
    text = "\n".join(md)
    write_report(out_dir, "analysis", text, records)
    return text


def plot_few_shot(out_dir):
    """summary.png from the summary.csv in out_dir: accuracy against shots per dataset and for the Average, clean
    solid and robust dashed, a colour per method as the tables name it (a model at its learning rate), under the
    paper's attack (PGD at the smallest ε) and on one basis (the paper's setting where there is one) where it was run.
    Base-to-new and transfer keep their tables alone: one shot count gives one point per line, which a table shows
    better."""
    with open(Path(out_dir) / "summary.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["protocol"] == "few_shot" and r["eval"] == r["dataset"]]
    if not rows:
        return None
    attack, eps, basis = min({(r["attack"], float(r["eps"]), r["basis"]) for r in rows},
                             key=lambda a: (a[0] != "pgd", a[1], a[2] != "", a[2], a[0]))
    acc = {(r["method"], r["dataset"], int(r["shots"]), r["metric"]): float(r["mean"]) for r in rows
           if (r["attack"], float(r["eps"]), r["basis"]) == (attack, eps, basis)}
    datasets = list(dict.fromkeys(d for _, d, _, _ in acc))
    shots, methods = sorted({k for _, _, k, _ in acc}), sorted({m for m, *_ in acc}, key=lambda m: (m != "CLIP", m))
    for method, metric, k in itertools.product(methods, ("clean", "adv"), shots):  # the Average of complete columns
        values = [acc.get((method, d, k, metric)) for d in datasets]
        if None not in values:
            acc[method, "Average", k, metric] = sum(values) / len(values)
    plt = _pyplot()
    panels = datasets + ["Average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels) + 2, 3), squeeze=False, layout="constrained")
    for ax, dataset in zip(axes[0], panels):
        for colour, method in enumerate(methods):
            for metric, style in (("clean", "-"), ("adv", "--")):
                points = [(k, 100 * acc[key]) for k in shots if (key := (method, dataset, k, metric)) in acc]
                if points:
                    ax.plot(*zip(*points), style, color=f"C{colour}", marker="o", label=f"{method} {metric}")
        ax.set(title=dataset, xscale="log", xlabel="shots per class", ylabel=f"accuracy (%), {attack.upper()} "
                                                                                  f"ε = {eps:g}/255")
        ax.set_xticks(shots, shots)  # 1 2 4 8 16 on every panel, not the log axis's powers of ten
        ax.minorticks_off()
    if basis:
        fig.suptitle(basis)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=7)  # beside the panels, over no curve
    path = Path(out_dir) / "summary.png"
    _save_png(fig, path)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Benchmarks: what masking costs over plain adversarial training, what a baked mask costs at evaluation, and how
# faithful LAFA is in bf16

# A small CLIP for --benchmark on a CPU: 65 tokens × batch 32 gives each weight about as much matrix-product work as
# ViT-B/32 at batch 32 (50 tokens), so the cost of masking relative to the rest is comparable.
BENCH_CLIP = {**TINY_CLIP,
              "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32}}


def _bench_model(clip_config, device, target, masked, n_classes=10):
    """A ClipClassifier and an Adam over either mask scores or, unmasked, the same weights made trainable."""
    model = ClipClassifier(open_clip.CLIP(**clip_config).to(device), [f"class {c}" for c in range(n_classes)],
                           ["a photo of a {}."])
    params = apply_masks(model, target) if masked else tune_weights(model, target)
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
    sync = partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None
    for i in range(repeats + 1):
        for name, fn in list(fns.items())[:: 1 if i % 2 else -1]:
            sync()
            tic = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - tic)
    return {name: min(t[1:]) for name, t in times.items()}


def _bench_train_step(model, optimizer, x, y, device, precision):
    """One training step in an autocast block of its own, as train() runs it."""
    with autocast(device, precision):
        train_step(model, optimizer, x, y)


# Where a CPU's memory is read: Linux's /proc; elsewhere a CPU benchmark reports speeds alone
PROC_SELF = Path("/proc/self")


def _train_peak_memory(clip_config, batch_size, device, target, masked, precision):
    """Peak memory of two training steps in this (fresh) process: CUDA max allocated, or RSS growth on CPU."""
    device = torch.device(device)
    model, optimizer = _bench_model(clip_config, device, target, masked)
    x, y = _bench_batch(clip_config, batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:  # what this process holds before the steps
        rss_before = int((PROC_SELF / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for _ in range(2):
        _bench_train_step(model, optimizer, x, y, device=device, precision=precision)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # VmHWM, this process's own peak: ru_maxrss would carry over the peak of the process that spawned this one
    peak_kb = re.search(r"VmHWM:\s+(\d+) kB", (PROC_SELF / "status").read_text())[1]
    return int(peak_kb) * 1024 - rss_before


def benchmark(clip_config, batch_size, device, precision, target="mhsa", repeats=25, pgd_steps=3):
    """Masked vs unmasked training step and baked vs plain PGD evaluation, as ratios measured in one process, on random
    weights (speed and memory only). "Unmasked" trains the very weights the mask would cover, directly: the ratio is
    the price of masking over plain adversarial fine-tuning of the same weights."""
    x, y = _bench_batch(clip_config, batch_size, device)
    masked, masked_opt = _bench_model(clip_config, device, target, masked=True)
    plain, plain_opt = _bench_model(clip_config, device, target, masked=False)
    step = partial(_bench_train_step, x=x, y=y, device=device, precision=precision)
    train_s = _min_seconds({"masked": partial(step, masked, masked_opt), "plain": partial(step, plain, plain_opt)},
                           device, repeats)
    n_weights = sum(p.numel() for p in plain_opt.param_groups[0]["params"])
    with tempfile.TemporaryDirectory() as tmp:  # the file's size depends on the model only, not on the scores
        save_masks(masked, Path(tmp) / "masks.bin")
        bits_per_weight = (Path(tmp) / "masks.bin").stat().st_size * 8 / n_weights
    baked, frozen = bake_masks(masked), plain.requires_grad_(False)
    with autocast(device, precision):
        eval_s = _min_seconds({"baked": lambda: pgd_attack(baked, x, y, steps=pgd_steps),
                               "plain": lambda: pgd_attack(frozen, x, y, steps=pgd_steps)}, device, repeats)
    # each training variant's peak memory comes from a fresh process of its own, so the two peaks do not mix; on the
    # CPU the two run side by side (a peak, VmHWM, is per process), on a GPU one after the other (they share its memory)
    memory_mb = {"masked": None, "plain": None}  # a CPU without /proc: not measured
    if device.type == "cuda" or PROC_SELF.is_dir():
        with torch.multiprocessing.get_context("spawn").Pool(1 if device.type == "cuda" else 2,
                                                             maxtasksperchild=1) as pool:
            peaks = pool.starmap(_train_peak_memory, [(clip_config, batch_size, str(device), target, masked,
                                                       precision) for masked in (True, False)])
        memory_mb = {"masked": peaks[0] / 2**20, "plain": peaks[1] / 2**20}
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "precision": precision,
        "batch_size": batch_size, "masked_weights": n_weights, "pgd_steps": pgd_steps,
        "train_img_s_masked": batch_size / train_s["masked"], "train_img_s_plain": batch_size / train_s["plain"],
        "train_time_ratio": train_s["masked"] / train_s["plain"],
        "eval_img_s_baked": batch_size / eval_s["baked"], "eval_img_s_plain": batch_size / eval_s["plain"],
        "eval_time_ratio": eval_s["baked"] / eval_s["plain"],
        "train_peak_mem_masked_mb": memory_mb["masked"], "train_peak_mem_plain_mb": memory_mb["plain"],
        "train_mem_ratio": None if memory_mb["plain"] is None else memory_mb["masked"] / memory_mb["plain"],
        "mask_bits_per_weight": bits_per_weight,
    }


def set_tf32(enabled):
    """Let CUDA's fp32 matmuls and convolutions run in TF32, or not; returns whether matmuls could before. Through
    fp32_precision where torch has it (2.9 on): there the allow_tf32 flags warn, and are refused once it is set."""
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch 2.7, 2.8
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
        return before
    before = torch.backends.cuda.matmul.fp32_precision == "tf32"
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    return before


@contextlib.contextmanager
def _precision(model, device, mode):
    """Autocast for mode "bf16" or "fp32"; "bf16, fp32 residual stream" also casts the patch embedding's output to
    fp32, so that the residual additions (and LayerNorm, which autocast keeps fp32) stay fp32 while linears run bf16."""
    conv1 = visual_tower(model).conv1
    hook = conv1.register_forward_hook(lambda module, inputs, output: output.float()) if "stream" in mode else None
    try:
        with autocast(device, "bf16" if mode.startswith("bf16") else "fp32"):
            yield
    finally:
        if hook is not None:
            hook.remove()


def _lafa_under(model, scores, x, x_adv, y, device, mode):
    """What precision_check compares under one precision mode: Δz per block, LAFA, its gradient with respect to the
    scores, and the signs of the input gradient."""
    with _precision(model, device, mode):
        with torch.no_grad():
            clean_logits, clean_feats = model(x, return_features=True)
        adv_logits, adv_feats = model(x_adv, return_features=True)
        lafa = lafa_loss(clean_feats, adv_feats, clean_logits, y)
        grad = torch.cat([g.flatten() for g in torch.autograd.grad(lafa, scores)]).float()
        x_in = x_adv.clone().requires_grad_(True)
        (x_grad,) = torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)
    dz = [(c.float() - a.float()).detach() for c, a in zip(clean_feats, adv_feats)]  # L × (B, T, D)
    return dz, lafa.item(), grad, x_grad.sign()


def precision_check(clip_config, device, batch_size=4, eps=TRAIN_EPS, repeats=3, seed=0):
    """How faithful LAFA is under each training precision, against fp32 on the same images and weights. Δz = z_clean −
    z_adv per block, with x_adv = x + uniform noise in the ε-ball (LAFA's signal). Per precision: per block ‖Δz‖²
    relative to fp32's and error ÷ signal = ‖Δz − Δz_fp32‖² / ‖Δz_fp32‖²; LAFA's value relative to fp32's; its
    gradient with respect to the mask scores (cosine to fp32's, relative norm error); the share of the input
    gradient's signs (all PGD uses) equal to fp32's; and the time of a training step relative to fp32. On CUDA the
    reference is true fp32 (TF32 off) and "fp32" is TF32 matmuls."""
    torch.manual_seed(seed)
    model, optimizer = _bench_model(clip_config, device, "mhsa", masked=True)
    scores = optimizer.param_groups[0]["params"]
    x, y = _bench_batch(clip_config, batch_size, device)
    noise = torch.empty_like(x).uniform_(-eps, eps, generator=torch.Generator(device).manual_seed(seed))
    x_adv = (x + noise).clamp(0, 1)
    measure = partial(_lafa_under, model, scores, x=x, x_adv=x_adv, y=y, device=device)
    modes = ("bf16", "bf16, fp32 residual stream", "fp32")
    tf32 = set_tf32(False)
    ref_dz, ref_lafa, ref_grad, ref_signs = measure(mode="fp32")  # true fp32
    set_tf32(tf32)
    measured = {mode: measure(mode=mode) for mode in modes}  # before the timed steps, which move the scores

    def step(mode):
        with _precision(model, device, mode):
            train_step(model, optimizer, x, y)
    seconds = _min_seconds({mode: partial(step, mode) for mode in modes}, device, repeats)
    power = [r.pow(2).sum().item() for r in ref_dz]  # ‖Δz_fp32‖² per block: the signal
    return [{"precision": mode,
             "block_signal_ratio": [d.pow(2).sum().item() / s for d, s in zip(dz, power)],
             "block_error_to_signal": [(d - r).pow(2).sum().item() / s for d, r, s in zip(dz, ref_dz, power)],
             "lafa_ratio": lafa / ref_lafa,
             "grad_cosine": F.cosine_similarity(grad.double(), ref_grad.double(), dim=0).item(),
             "grad_norm_error": ((grad - ref_grad).double().norm() / ref_grad.double().norm()).item(),
             "pgd_sign_agreement": (signs == ref_signs).float().mean().item(),
             "step_time_ratio": seconds[mode] / seconds["fp32"]}
            for mode, (dz, lafa, grad, signs) in measured.items()]


# ----------------------------------------------------------------------------------------------------------------------
# Export: a finished run as an open_clip model folder (the hub's layout), which open_clip alone loads

# Licences of base weights we know; a model card says "unknown" for any other.
WEIGHTS_LICENSES = {"openai": "mit"}


def export(run_dir, out_dir, visual=False, overwrite=False, model=None, pretrained=None):
    """Write out_dir, an open_clip model folder of the finished run in run_dir: open_clip_config.json (the base
    model's config, its activation made explicit, and its preprocessing), open_clip_model.safetensors (the whole CLIP
    with the mask baked in, or the tuned weights put in), the run's masks.bin or weights.bin, README.md (a model card
    made from the run) and, with visual, visual.safetensors (the image tower alone). Written into a temporary folder
    and renamed, so out_dir is whole or absent. The base model is the run's --model and --pretrained, or model and
    pretrained, where its files are now (the tuned file refuses other weights). Returns the model card."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not run_dir.is_dir():  # a typo: nothing to finish
        raise ValueError(f"{run_dir} is not a folder; pass the folder of a finished run")
    if not (run_dir / "results.json").is_file():
        raise ValueError(f"{run_dir} holds no finished run (no results.json); finish it by rerunning its command, "
                         f"then export it")
    tuned = next((run_dir / f for f in TUNED_FILES.values() if (run_dir / f).is_file()), None)
    if tuned is None:
        raise ValueError(f"{run_dir} holds neither masks.bin nor weights.bin (a run that evaluated a --masks or "
                         f"--weights file); export the run that trained it")
    # --overwrite replaces an earlier export only (its config beside a mask or weights file), never other files: a
    # mistyped OUT_DIR (a runs root, a home folder) would otherwise be deleted
    earlier = (out_dir / "open_clip_config.json").is_file() and any((out_dir / f).is_file()
                                                                    for f in TUNED_FILES.values())
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not (overwrite and earlier):
        raise ValueError(f"{out_dir} exists and is not an empty folder" + (" or an earlier export; pass another one"
                         if overwrite else "; pass another one, or --overwrite to replace an earlier export"))
    finished = read_json(run_dir / "results.json", ("results", "settings", "train_log"))
    settings = finished["settings"]
    if not finished.get("complete"):
        raise ValueError(f"{run_dir} is not finished (its results.json says complete: false); rerun its command, "
                         f"which evaluates the cells it lacks, then export it")
    sha256 = hashlib.sha256(tuned.read_bytes()).hexdigest()
    if finished.get("tuned_file_sha256", sha256) != sha256:  # unrecorded by runs before it was: taken as the same
        raise ValueError(f"{tuned} is not the file that the cells of {run_dir / 'results.json'} measured (replaced "
                         f"since); rerun the run's command, which evaluates it, then export it")
    edited = partial(_hand_edited, run_dir / "results.json", "export", "delete it and rerun the run's command, "
                     "which evaluates every cell again; then export it")
    with edited():  # what export reads of the run's settings, of the types run writes
        model, pretrained = model or settings["model"], pretrained or settings["pretrained"]
        if not (isinstance(model, str) and isinstance(pretrained, (str, type(None)))
                and isinstance(settings.get("model_identity", {}), dict)):
            raise TypeError("its model, pretrained or model_identity setting is not of the type run writes")
        torch.manual_seed(settings["seed"])  # random base weights (--pretrained none) are drawn as main drew them
    for flag, path, file_key in (("--model", model, "config_sha256"), ("--pretrained", pretrained, "file_sha256")):
        if file_key in settings.get("model_identity", {}) and not Path(path).is_file():  # moved, or another cwd's
            raise ValueError(f"the run's {flag} file {path} is not there from here (a relative path is relative to "
                             f"where the run started); pass export {flag} PATH, where that file is now")
    try:  # the model its results.json records (hand-edited, it may name none), or export's --model and --pretrained
        clip, _, identity = load_clip(model, pretrained)
    except ValueError as e:
        raise ValueError(f"the base model of {run_dir} does not load here: {e}") from None
    if tuned.name == "masks.bin":  # either load refuses other base weights than the run's
        sparsity = mask_sparsity(load_masks(clip, tuned, describe(identity)))
        bake_masks(clip)
    else:
        load_weights(clip, tuned, describe(identity))
        sparsity = None
    model_cfg = copy.deepcopy(identity.get("model_config") or (TINY_CLIP if identity["model"] == "tiny" else
                                                               open_clip.get_model_config(identity["model"])))
    if identity["activation"] == "QuickGELU":  # a tag's network, whatever the name's own config says
        model_cfg["quick_gelu"] = True
    preprocess = {k: identity["preprocess"][k] for k in ("mean", "std", "interpolation", "resize_mode")}
    with edited():
        card = model_card(run_dir, finished, identity, sparsity=sparsity, file_name=tuned.name)
    tmp = _temporary(out_dir)
    try:
        tmp.mkdir(parents=True)
        # every file written alike, so all have one mode (safetensors' save_file would make its files 0600)
        files = {"open_clip_config.json": json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess},
                                                     indent=2) + "\n",
                 "open_clip_model.safetensors": safetensors.torch.save(
                     {k: v.detach().cpu().contiguous() for k, v in clip.state_dict().items()}),
                 tuned.name: tuned.read_bytes(), "README.md": card}
        if visual:
            files["visual.safetensors"] = safetensors.torch.save(
                {k: v.detach().cpu().contiguous() for k, v in clip.visual.state_dict().items()})
        for name, data in files.items():
            _atomic_write(tmp / name, data)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return card


def model_card(run_dir, finished, identity, sparsity, file_name):
    """README.md of an exported folder: the hub's front matter, the base model, the method's settings, every
    evaluation cell of the run, and how to load, apply and upload it."""
    s = finished["settings"]
    method = "AdvMask (a binary mask over the weights)" if file_name == "masks.bin" else "adversarial fine-tuning"
    base = {None: "its folder's", "none": "random"}.get(identity["pretrained"], identity["pretrained"])
    pre = identity["preprocess"]
    # a run on random images, or of random weights, says so where its numbers are
    fake = [what for what, flag in (("random images stood in for the data (--dry-run)", s["dry_run"]),
                                    ("random images of the data's size stood in for it (--synthetic)", s["synthetic"]),
                                    ("its base weights are random (--pretrained none)", base == "random")) if flag]
    warning = [f"**Not a usable model: {'; '.join(fake)}. Its numbers below measure the pipeline, not "
               f"robustness.**", ""] if fake else []
    rows = [("tuning", method), ("weights tuned or masked", s["mask_target"]),
            ("weights off", "—" if sparsity is None else f"{100 * sparsity:.2f} %"),
            ("trained on", f"{s['dataset']}" + (" (random images)" if s["dry_run"] or s["synthetic"] else "") +
             f", {s['shots']} shot{'s' * (s['shots'] != 1)} per class, seed {s['seed']} ({s['protocol']})"),
            ("loss", f"{s['loss']}, λ = {s['lam']:g}"),
            ("training attack", f"l∞ PGD, ε = {s['train_eps']:g}/255, α = {s['train_alpha']:g}/255, "
                                f"{s['train_steps']} steps"),
            ("budget", f"{finished['train_log'][-1]['step'] if finished['train_log'] else '—'} steps of batch "
                       f"{s['batch_size']}, Adam at lr {s['lr']:g} with a cosine schedule"),
            ("training precision", s["precision"])]
    cells = ["| model | evaluated on | attack | ε | steps | test images | precision | clean % | robust % |",
             "|---" * 9 + "|"]
    cells += [f"| {e['model']} | {e['eval']} | {e['attack']} | {e['eps']:g}/255 | "  # each cell's own attack steps
              f"{e['test_steps']} | {e['n']} | {e['eval_precision']} | {100 * e['clean_acc']:.2f} | "
              f"{100 * e['adv_acc']:.2f} |" for e in finished["results"]
              if not _superseded(finished, s["dataset"], e)]  # as summarize: the test sets of the latest run
    return "\n".join([
        "---", "tags:", "- clip", "- adversarial-robustness", "- advmask", "library_name: open_clip",
        "pipeline_tag: zero-shot-image-classification",
        f"license: {WEIGHTS_LICENSES.get(identity['pretrained'], 'unknown')}", "---",
        f"# {describe(identity)}, made robust by {method.split(' (')[0]}", "",
        f"CLIP {identity['model']} with {base} weights, tuned against l∞ adversarial images by {method}, as in "
        f"\"Identifying Robust Neural Pathways: Few-Shot Adversarial Mask Tuning for Vision-Language Models\" "
        f"(ICLR 2026), with advmask.py from the run `{run_dir}`.", "", *warning,
        "## Base model", "",
        f"- model: `{identity['model']}`; weights: `{identity['pretrained']}`"
        + (f" (sha256 {identity['file_sha256']})" if "file_sha256" in identity else ""),
        f"- activation: {identity['activation']}; open_clip {identity['open_clip']}",
        f"- preprocessing: size {pre['size']}, resize {pre['resize_mode']} ({pre['interpolation']}), mean "
        f"{pre['mean']}, std {pre['std']}",
        f"- fingerprint of the base weights: `{identity['weights_sha256']}`",
        f"- licence: that of the base weights ({WEIGHTS_LICENSES.get(identity['pretrained'], 'unknown')})", "",
        "## Method", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
        "## Evaluation (this run)", "", *cells, "",
        "## Load it", "", "```python", "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms(\"local-dir:THIS_FOLDER\")  # or hf-hub:ORG/NAME",
        "tokenizer = open_clip.get_tokenizer(\"local-dir:THIS_FOLDER\")", "```", "",
        f"## The {'mask' if file_name == 'masks.bin' else 'tuned weights'} alone", "",
        f"`{file_name}` holds only what the run changed"
        + (", 1 bit per masked weight," if file_name == "masks.bin" else ", the tuned weights in fp32,")
        + " bound to the base weights by their fingerprint. With advmask.py and the base model: "
        + (f"`advmask.bake_masks(advmask.load_masks(clip, \"{file_name}\"))`." if file_name == "masks.bin"
           else f"`advmask.load_weights(clip, \"{file_name}\")`."), "",
        "## Upload", "", "With huggingface_hub's command line (advmask.py itself makes no network calls):", "",
        "```bash", "hf upload ORG/NAME THIS_FOLDER .", "```", ""])


# ----------------------------------------------------------------------------------------------------------------------
# Command line

def _list(kind, choices=None, distinct=True):
    """argparse type of a comma-separated list of values of kind, at least one, each of choices if given, and with
    distinct, none twice: --test-eps 1,2,4, --attack pgd,aa."""
    def parse(text):
        values = [kind(item.strip()) for item in text.split(",") if item.strip()]
        unknown = [v for v in values if choices is not None and v not in choices]
        # by how a value prints: ε 1 and 1.0000001 would share a cell's label (_cell_label), and one of them its result
        shown = [f"{v:g}" if isinstance(v, float) else v for v in values]
        repeated = [v for v in shown if shown.count(v) > 1]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"{unknown[0] if unknown else 'nothing'} is not one of "
                                             f"{', '.join(choices)}" if choices else "give at least one value")
        if repeated and distinct:
            raise argparse.ArgumentTypeError(f"lists {repeated[0]} twice; give each value once")
        return values
    return parse


def _number(kind, low, strict=False, high=math.inf):
    """argparse type of a finite int or float of at least low (above it, if strict) and at most high: the sizes,
    counts, steps, rates and the seed (float("nan") and "inf" parse, and would only fail in training)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if value < low or strict and value == low:
            words = "a positive integer" if kind is int and low == 1 else "positive" if strict else f"{low} or more"
            raise argparse.ArgumentTypeError(f"must be {words}, not {text}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, not {text}")
        return value
    return parse


def _per255(text, eps=False):
    """argparse type of a budget in /255 units in [0, 255]: "4" or "4/255" is 4 (that is, 4/255 in pixels). An ε
    (eps) below 0.1 is refused as pixel units given by mistake: 0.0157 would be ε = 0.0157/255."""
    number = text[:-len("/255")] if text.endswith("/255") else text
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number in /255 units, e.g. 4 or 4/255") from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError(f"{text} is in /255 units and must lie in [0, 255]")
    if eps and 0 < value < 0.1:
        raise argparse.ArgumentTypeError(f"ε {value:g} is in /255 units, i.e. {value:g}/255 in pixels; for ε = 4/255 "
                                         f"pass 4 (or 4/255)")
    return value


def _device(text):
    """argparse type of --device: cpu, cuda or cuda:N, one this machine has (as torch.device spells it)."""
    try:
        device = torch.device(text)
    except RuntimeError:  # not a device string: "gpu", "cuda:x"
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r} is not cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text} was asked for but {torch.cuda.device_count()} CUDA devices are "
                                         f"visible; pass cpu or an existing GPU")
    return str(device)


def _parser(prog, description, formatter_class=argparse.HelpFormatter):
    """An ArgumentParser whose every usage error ends in one line and exit status 2, without the usage block."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter_class)
    p.error = lambda message: p.exit(2, f"advmask: error: {message}\n")
    return p


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once: not for flags whose help states its own default, nor None or False ones (a default of 0
    is shown, though 0 == False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


# --dry-run: the tiny random CLIP, a rate and length at which its mask turns weights off within seconds, and PGD-3
DRY_RUN = {"model": "tiny", "pretrained": "none", "test_steps": 3, "epochs": 20, "lr": 1e-3}


def parse_args(argv):
    p = _parser(None, "AdvMask: few-shot adversarial mask tuning of CLIP. 'advmask.py [flags]' runs one protocol; "
                      "'advmask.py summarize RUNS_DIR' tables finished runs; 'advmask.py analyze PATH...' shows where "
                      "masks cut; 'advmask.py export RUN_DIR OUT_DIR' writes a run as an open_clip model folder (each "
                      "has --help).", _HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", default="oxford_pets", choices=[d for d in DATASETS if DATASETS[d].train != ()],
                      help="training (source) dataset")
    data.add_argument("--data-root", default="data", help="where the datasets live (or get downloaded)")
    data.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing dataset")
    data.add_argument("--split-json", help="CoOp split_zhou_<Name>.json: use exactly its train/test split")
    data.add_argument("--split-dir", help="folder of CoOp's split_zhou_<Name>.json files, for every dataset with "
                                          "one there (the others keep their default split)")
    data.add_argument("--synthetic", action="store_true",
                      help="random images at each dataset's real size (classes, K-shot set, test split): times the "
                           "real job without the data")
    data.add_argument("--conventions", default="coop", choices=["coop", "fap", "tga-zsr"],
                      help="coop: CoOp's templates, names, class sets and splits, the model's resizing; fap: FAP's "
                           "code (CoOp's split files, Dassl's K-shot draw, fp16 evaluation in test batches of 200); "
                           "tga-zsr: TGA-ZSR's code (prompts, names, class sets, test sets, resizing); see README")
    data.add_argument("--shots", type=_number(int, 1), default=16, help="training images per class (K)")
    # seed<S> folders, whose S summarize reads as digits; torch's generators take at most 2⁶⁴ − 1
    data.add_argument("--seed", type=_number(int, 0, high=2**64 - 1), default=1,
                      help="fixes the K-shot sample, batch order, flips and attacks")
    data.add_argument("--workers", type=_number(int, 0), default=min(8, os.cpu_count() or 1),
                      help="data-loading processes")
    protocol = p.add_argument_group("protocol")
    protocol.add_argument("--protocol", default="few_shot", choices=["few_shot", "base2new", "transfer"],
                          help="few_shot: K shots of every class; base2new: train on the first half of the classes, "
                               "test on both halves; transfer: test zero-shot on --eval-datasets")
    protocol.add_argument("--eval-datasets", type=_list(str, [*EVAL_PRESETS, *DATASETS], distinct=False),
                          help="transfer: comma-separated datasets or presets (" + "; ".join(
                              f"{k} = {' '.join(v)}" for k, v in EVAL_PRESETS.items()) + ") (default: coop)")
    protocol.add_argument("--masks", help="transfer: evaluate this mask file instead of training one")
    protocol.add_argument("--weights", help="transfer: evaluate this weights file (of a --tune weights run)")
    protocol.add_argument("--baseline", nargs="?", const="clip", metavar="MODEL",
                          help="also evaluate, on the same images and attacks, unmasked CLIP (no value) or a model "
                               "folder, hf-hub:ORG/NAME or local-dir:PATH (e.g. FARE's hf-hub:chs20/fare2-clip)")
    model = p.add_argument_group("model")
    model.add_argument("--model", help="open_clip model name, model folder (hf-hub:ORG/NAME, local-dir:PATH) or config "
                                       "JSON, or tiny (the tests' small random CLIP) (default: ViT-B-32, or "
                                       "ViT-B-32-quickgelu for OpenAI's weights as a file; --benchmark: its own)")
    model.add_argument("--pretrained", help="open_clip tag, checkpoint path, or none (random) (default: openai; none "
                                            "for tiny; a model folder's own)")
    model.add_argument("--device", type=_device, help="cuda, cuda:N or cpu (default: cuda if available)")
    model.add_argument("--deterministic", action="store_true",
                       help="CUDA: deterministic kernels, bit-identical reruns at some speed cost (CPU runs are so "
                            "without it)")
    training = p.add_argument_group("training")
    training.add_argument("--tune", choices=list(TUNED_MODEL),
                          help="mask: AdvMask; weights: adversarial fine-tuning of the same weights with the same "
                               "data, loss and budget, the reviewers' comparison (default: mask; weights with "
                               "--weights)")
    training.add_argument("--mask-target", default="mhsa", choices=list(MASK_TARGETS),
                          help="the weights masked (or tuned): attention (the paper's), MLP, or both")
    training.add_argument("--loss", default="ce+lafa", choices=LOSSES, help="ce+lafa is AdvMask, the rest its ablation")
    training.add_argument("--lam", type=_number(float, 0), default=LAM, help="λ, weight of the regulariser (LAFA)")
    training.add_argument("--epochs", type=_number(int, 1),
                          help=f"default: enough for about {TRAIN_BUDGET_STEPS} optimisation steps, at least 1")
    training.add_argument("--batch-size", type=_number(int, 1), default=BATCH_SIZE, help="images per Adam step")
    training.add_argument("--lr", type=_number(float, 0, strict=True),
                          help=f"Adam's learning rate (default: {LR:g} for mask scores, {WEIGHTS_LR:g} for weights)")
    training.add_argument("--train-eps", type=partial(_per255, eps=True), default=TRAIN_EPS * 255,
                          help="training PGD's ε, in /255 units")
    training.add_argument("--train-alpha", type=_per255, default=TRAIN_ALPHA * 255, help="its step, in /255 units")
    training.add_argument("--train-steps", type=_number(int, 0), default=TRAIN_STEPS, help="training PGD's steps")
    training.add_argument("--precision", default=TRAIN_PRECISION, choices=["bf16", "fp32"],
                          help="fp32 (TF32 matmuls on CUDA) or bf16 autocast; scores, optimiser and accuracies stay "
                               "fp32; README says why bf16 is not the default")
    training.add_argument("--checkpoint-every", type=_number(int, 1), default=50,
                          help="save the training state at the first epoch end after this many steps")
    test = p.add_argument_group("evaluation")
    test.add_argument("--attack", type=_list(str, ATTACKS), default="pgd",
                      help="comma-separated: pgd (CE loss), cw (CW margin), apgd-ce, apgd-dlr, apgd-t, aa (APGD-CE, "
                           "then APGD-T, as RobustVLM/FARE), aa-tga-zsr (APGD-CE, then APGD-DLR, as TGA-ZSR); with "
                           "several, also the per-image worst case")
    test.add_argument("--test-eps", type=_list(partial(_per255, eps=True)), default=f"{TEST_EPS * 255:g}",
                      help="comma-separated, in /255 units: 1,4 or 1/255,4/255")
    test.add_argument("--test-alpha", type=_per255, default=TEST_ALPHA * 255, help="the attacks' step, in /255 units")
    test.add_argument("--test-steps", type=_number(int, 0), default=TEST_STEPS, help="iterations of every test attack")
    test.add_argument("--eval-limit", type=_number(int, 1),
                      help="evaluate a fixed class-balanced subset of at most this many test images per dataset "
                           "(default: the whole test split)")
    test.add_argument("--eval-batch-size", type=_number(int, 1),
                      help="test images per attacked batch (default: 256; FAP's 200 under --conventions fap)")
    test.add_argument("--eval-precision", choices=["bf16", "fp16", "fp32"],
                      help=f"fp32, bf16 autocast, or fp16 as FAP's code converts OpenAI's network (default: "
                           f"{EVAL_PRECISION}; fp16 under --conventions fap)")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", help="default: runs/<protocol>/<dataset>/<shots>shot/seed<seed>[-weights], "
                                       "runs/transfer/consensus/<k>of<n>-<sha256> for a consensus mask; runs_dry/... "
                                       "and runs_synthetic/... for --dry-run and --synthetic")
    out.add_argument("--overwrite", action="store_true",
                     help="start the run in --out-dir over (its trained file, checkpoint and results go first)")
    out.add_argument("--dry-run", action="store_true",
                     help=f"the tiny random CLIP on synthetic images, {DRY_RUN['epochs']} epochs at lr "
                          f"{DRY_RUN['lr']:g}, PGD-{DRY_RUN['test_steps']}: the whole pipeline in seconds")
    out.add_argument("--benchmark", nargs="?", const="speed", choices=["speed", "precision"],
                     help="speed: a JSON line of masked vs unmasked training speed and memory, baked vs plain PGD "
                          "speed, mask bits per weight; precision: a JSON line per training precision of LAFA's "
                          "error against fp32 (4 images; default model ViT-B-32); random weights")
    args = p.parse_args(argv)
    if args.dry_run:  # the tiny model and settings under which its mask turns weights off in seconds
        overridden = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("model", "pretrained", "test_steps")
                      if getattr(args, k) not in (None, p.get_default(k), DRY_RUN[k])]
        if overridden:
            print(f"--dry-run runs the tiny random CLIP and PGD-{DRY_RUN['test_steps']}; it ignores "
                  f"{', '.join(overridden)}", file=sys.stderr)
        args.model, args.pretrained, args.test_steps = DRY_RUN["model"], DRY_RUN["pretrained"], DRY_RUN["test_steps"]
        args.epochs, args.lr = args.epochs or DRY_RUN["epochs"], args.lr or DRY_RUN["lr"]
    if args.model is None and not args.benchmark:  # --benchmark's default is a config of its own
        args.model = "ViT-B-32"
    if args.pretrained is None and not (args.model or "").startswith(SCHEMAS):
        args.pretrained = "none" if args.model == "tiny" else "openai"
    if args.baseline not in (None, "clip") and not args.baseline.startswith(SCHEMAS):
        p.error(f"--baseline {args.baseline}: give no value (unmasked CLIP) or an open_clip model folder, "
                f"hf-hub:ORG/NAME or local-dir:PATH")
    if args.weights and (args.masks or args.tune == "mask"):
        p.error("--weights evaluates a --tune weights run; pass it without --masks and --tune mask")
    args.tune = args.tune or ("weights" if args.weights else "mask")
    # the attacks in ATTACKS' order: a worst case is over a set, so --attack cw,pgd reuses the cell of pgd,cw
    args.attack = [a for a in ATTACKS if a in args.attack]
    if args.masks and args.tune == "weights":
        p.error("--masks evaluates a mask; with --tune weights, pass the weights file with --weights")
    if args.lr is None:
        args.lr = LR if args.tune == "mask" else WEIGHTS_LR
    unused_eval_datasets = args.eval_datasets is not None and args.protocol != "transfer"
    tga_zsr, fap = args.conventions == "tga-zsr", args.conventions == "fap"
    # by default the preset named as the conventions: CoOp's suite, or TGA-ZSR's 16
    args.eval_datasets = ["tga-zsr" if tga_zsr else "coop"] if args.eval_datasets is None else args.eval_datasets
    # FAP's code tests in fp16 (its configs' PREC) on batches of 200; the batch decides what underflows in fp16, so an
    # fp16 cell records it (test_batch); in fp32 and bf16 it moves numbers as other hardware does (README: FAP's tables)
    args.eval_precision = args.eval_precision or ("fp16" if fap else EVAL_PRECISION)
    args.eval_batch_size = args.eval_batch_size or (200 if fap else 256)
    args.test_batch = args.eval_batch_size if args.eval_precision == "fp16" else None
    args.eval_presets = {name: EVAL_PRESETS[name] for name in args.eval_datasets if name in EVAL_PRESETS}
    args.eval_datasets = list(dict.fromkeys(d for name in args.eval_datasets for d in EVAL_PRESETS.get(name, [name])))
    if args.split_json and args.split_dir:
        p.error("pass --split-json (one dataset's file) or --split-dir (a folder for every dataset), not both")
    if args.split_json and not Path(args.split_json).is_file():  # checked here, as --split-dir, even by a dry run
        p.error(f"--split-json {args.split_json} is not a file; pass CoOp's split_zhou_<Name>.json of --dataset")
    if args.split_dir and not Path(args.split_dir).is_dir():
        p.error(f"--split-dir {args.split_dir} is not a folder; pass the folder that holds CoOp's "
                f"split_zhou_<Name>.json files")
    if fap and (args.protocol == "transfer" or args.dataset not in FAP_DATASETS or not args.split_dir):
        p.error(f"--conventions fap runs FAP's few_shot and base2new protocols on CoOp's split files, from which "
                f"Dassl's K-shot draw and the test sets come: pass --split-dir (the folder of CoOp's "
                f"split_zhou_<Name>.json files) and one of {', '.join(FAP_DATASETS)} as --dataset")
    if tga_zsr:  # TGA-ZSR's data only, as its code reads it
        others = [d for d in args.eval_datasets * (args.protocol == "transfer") if d not in TGA_ZSR]
        if others:
            p.error(f"--conventions tga-zsr covers TGA-ZSR's 16 test sets, not {others[0]}; evaluate it in a run "
                    f"under --conventions coop")
        if args.dataset not in TGA_ZSR_TRAIN and not (args.masks or args.weights):
            p.error(f"--conventions tga-zsr trains where TGA-ZSR's code can ({', '.join(TGA_ZSR_TRAIN)}); pass one "
                    f"of them as --dataset, or --conventions coop")
        if args.split_json:
            p.error("--split-json gives CoOp's split, which --conventions tga-zsr does not use; drop it")
        if args.split_dir:  # a sweep may pass it to every cell: said, not refused
            print("--split-dir: --conventions tga-zsr uses TGA-ZSR's test sets, not CoOp's splits; it is ignored",
                  file=sys.stderr)
            args.split_dir = None
    if (args.masks or args.weights) and args.protocol != "transfer":
        p.error(f"--{'masks' if args.masks else 'weights'} goes with --protocol transfer; the other protocols train "
                f"their {args.tune}")
    if unused_eval_datasets:  # a warning, not an error: a sweep may pass one flag set to every protocol
        print(f"warning: --eval-datasets goes with --protocol transfer; {args.protocol} evaluates on "
              f"{args.dataset}'s own test set", file=sys.stderr)
    return args


def parser_defaults(dry_run):
    """The settings of a run given no flag (with dry_run, --dry-run alone), which summarize's headings leave unsaid."""
    return vars(parse_args(["--dry-run"] if dry_run else []))


def parse_summarize_args(argv):
    p = _parser("advmask.py summarize", "Tables over seeds (summary.md, summary.csv) and the few-shot figure "
                                        "(summary.png) of the finished runs under RUNS_DIR.")
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="a runs root: RUNS_DIR/<protocol>/<dataset>/<K>shot/seed<S>/")
    p.add_argument("--out", default=None, help="folder for the summary files, e.g. for a read-only RUNS_DIR "
                                               "(default: RUNS_DIR)")
    return p.parse_args(argv)


def parse_export_args(argv):
    p = _parser("advmask.py export", "A finished run as an open_clip model folder (open_clip_config.json, "
                                     "open_clip_model.safetensors, the mask or weights file and a model card), "
                                     "loadable with open_clip alone as local-dir:OUT_DIR.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (results.json beside masks.bin or "
                                                      "weights.bin)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the model folder to write (absent or empty)")
    p.add_argument("--visual", action="store_true",
                   help="also write visual.safetensors, the image tower alone, for tools that swap CLIP's vision "
                        "encoder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    for flag in ("--model", "--pretrained"):  # checked by the tuned file: it refuses weights other than the run's
        p.add_argument(flag, default=None, metavar="PATH", help=f"the run's {flag} file where it is now, if it moved "
                                                                f"(default: the path the run recorded)")
    return p.parse_args(argv)


def parse_analyze_args(argv):
    p = _parser("advmask.py analyze", "Where masks cut (per block, q/k/v/out and head), how far they overlap beyond "
                                      "chance, and a consensus mask.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="a masks.bin, a run folder or a runs root")
    p.add_argument("--out", default="analysis", help="folder for analysis.md, analysis.csv and the figures")
    p.add_argument("--consensus", type=int, default=None, metavar="K",
                   help="also make the mask of the weights off in at least K of the masks (needs --save)")
    p.add_argument("--save", default=None, metavar="PATH", help="mask file for the consensus mask")
    args = p.parse_args(argv)
    if (args.consensus is None) != (args.save is None):
        p.error("--consensus K and --save PATH go together: the consensus mask needs a file, and a file a consensus")
    return args


def _check_out_dir(out_dir, checkpoint, settings, overwrite):
    """True when out_dir holds a run of the same training settings, whose checkpoint is resumed, trained file reused
    and finished cells kept; False when it holds none, or with overwrite (whatever its settings: a corrupt mask file
    is retrained so), which run then removes before it writes anything. Other settings without overwrite are
    refused."""
    if overwrite or not (out_dir / "config.json").is_file():
        return False
    saved = read_json(out_dir / "config.json")
    differ = sorted(k for k, v in settings.items() if k not in EVAL_ONLY and saved.get(k) != v)
    theirs = saved.get("model_identity") if isinstance(saved.get("model_identity"), dict) else {}  # {}: edited away
    differ += [f"model {k}" for k in SAME_MODEL if theirs.get(k) != settings["model_identity"].get(k)]
    if not differ:
        return True
    if checkpoint.is_file():
        raise ValueError(f"{out_dir} holds a checkpoint of a run with other training settings ({', '.join(differ)}), "
                         f"which would give another mask; rerun with the settings in {out_dir / 'config.json'} to "
                         f"resume it, or pass another --out-dir")
    elif any((out_dir / f).is_file() for f in ("results.json", *TUNED_FILES.values())):
        raise ValueError(f"{out_dir} holds a finished run with other training settings ({', '.join(differ)}); rerun "
                         f"with the settings in {out_dir / 'config.json'} to evaluate more cells there, pass another "
                         f"--out-dir (this one keeps its training), or --overwrite to replace it")
    return False


def _cell_label(attack, eps):
    """An evaluation cell as results and warnings name it: "pgd ε 1/255"."""
    return f"{attack} ε {eps:g}/255"


def _template(dataset, conventions):
    """The prompt template of a dataset under --conventions: CoOp's (or CLIP's) or TGA-ZSR's."""
    return TGA_ZSR[dataset].template if conventions == "tga-zsr" else DATASETS[dataset].template


def _cell_key(row):
    """The cell a results.json entry fills: model, class set, its test set (_test_set), attack (a worst case's attacks
    too), ε, CELL_SETTINGS."""
    return (row["model"], row["eval"], json.dumps(row.get("test_set"), sort_keys=True), row["attack"],
            tuple(row.get("attacks", ())), row["eps"], *(row.get(k) for k in CELL_SETTINGS))


def _test_set(split, indices_sha256, class_set):
    """What a cell's images and prompts are: its dataset's split record, the sha256 of the indices evaluated, and the
    sha256 of its class set's record (templates, class names, test-set size, resizing)."""
    return {"split": split, "indices_sha256": indices_sha256,
            "class_set_sha256": hashlib.sha256(json.dumps(class_set).encode()).hexdigest()[:12] if class_set else None}


def _row_line(r):
    """A results.json entry as the line a run prints for it."""
    return (f"{r['model']} | {r['eval']} | {r['attack']}-{r['test_steps']} eps {r['eps']:g}/255 | clean "
            f"{100 * r['clean_acc']:.2f}% | adv {100 * r['adv_acc']:.2f}% | n {r['n']} | {r['seconds']:.1f} s")


def _result_rows(cell, result, todo):
    """results.json entries of one evaluate() call over the (attack, ε) pairs todo; cell holds the model, the class
    set and CELL_SETTINGS; each entry keeps its per-image outcome (np.packbits, hex) for worst cases made later."""
    rows = []
    for attack, eps in todo:
        r = result["attacks"][_cell_label(attack, eps)]
        rows.append({**cell, "attack": attack, "eps": eps, "n": result["n"], "clean_acc": result["clean_acc"],
                     "adv_acc": r["adv_acc"], "zero_grad_share": result["zero_grad_share"], "seconds": r["seconds"],
                     "correct": np.packbits(r["correct"].numpy()).tobytes().hex()})
        print(_row_line(rows[-1]))
    return rows


def _outcome(row):
    """The per-image outcome of a results.json entry, (n,) bool, True where the image stayed correctly classified."""
    packed = np.frombuffer(bytes.fromhex(row["correct"]), np.uint8)
    if len(packed) != math.ceil(row["n"] / 8):  # np.unpackbits would pad a short one, with zeros or worse
        raise ValueError(f"its per-image outcome holds {8 * len(packed)} bits for its {row['n']} images")
    return torch.from_numpy(np.unpackbits(packed, count=row["n"]).astype(bool))


def _evaluated(args, test_set):
    """(indices, their sha256) of the images of a class set's test split that its cells are evaluated on."""
    chosen = balanced_subset(test_set.targets, args.eval_limit) if args.eval_limit else range(len(test_set))
    return chosen, hashlib.sha256(json.dumps(list(chosen)).encode()).hexdigest()


def _check_reusable(path, previous, args, sets):
    """Refuse in one line an earlier run's results.json that a hand edit left parsing, but with a value a rerun reads
    (a cell's key, what a worst case made from a cell reads, the splits and class sets) gone or of another type, or
    a cell on the images this run evaluates (sets: the class sets) that records another number of them."""
    if not previous:  # nothing reused: no images to count (a fresh run's start-up need not draw its test subsets)
        return
    sizes = {(name, sha256): len(chosen) for name, (test_set, *_) in sets.items()
             for chosen, sha256 in [_evaluated(args, test_set)]}
    with _hand_edited(path, "a rerun", "delete it to evaluate every cell again"):
        for row in previous.get("results", []):
            hash(_cell_key(row))  # every value of a cell's key, as run writes it, is hashable
            _row_line(row)  # and what a worst case made from it prints is of the type run writes
            if row["attack"] != "worst":
                _outcome(row)
            # a worst case made now stacks the per-image outcomes of these cells and of cells evaluated now
            images = (row["eval"], (row.get("test_set") or {}).get("indices_sha256"))  # None: before cells kept it
            if images in sizes and row["n"] != sizes[images]:
                raise ValueError(f"a cell of {row['eval']} records {row['n']} test images where there are "
                                 f"{sizes[images]}")
        if not all(isinstance(previous.get(k, {}), dict) for k in ("splits", "class_sets")):
            raise TypeError("its splits or class_sets is not an object")


def _worst_row(rows, attacks):
    """The per-image worst case over the entries rows of one cell at one ε, one per attack of attacks."""
    worst = {**{k: v for k, v in rows[0].items() if k != "correct"}, "attack": "worst", "attacks": attacks,
             "adv_acc": worst_case_accuracy([_outcome(r) for r in rows]), "seconds": sum(r["seconds"] for r in rows)}
    print(_row_line(worst))
    return worst


@contextlib.contextmanager
def _out_of_memory(flag, value):
    """Running out of (GPU) memory inside this block ends in one line naming the flag to lower and the memory asked
    for; what was written before (the trained file, finished cells, a checkpoint) stays for the rerun."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        asked = re.search(r"(?i)tried to allocate ([\d.]+ ?\w+)", str(e))
        raise ValueError(f"out of memory{f' asking for {asked[1]}' if asked else ''}; lower {flag} (now {value}) and "
                         f"rerun the same command: what is finished is kept") from None


# A run folder's lock is refreshed (its time set) every LOCK_BEAT seconds by the process holding it. Whether a pid
# lives can be asked only on its own host; a lock unrefreshed for LOCK_STALE seconds is taken to be a process gone
# (with its node: a pre-empted job requeued elsewhere resumes; or after a reboot, its pid now another process's).
LOCK_BEAT, LOCK_STALE = 60, 600


@contextlib.contextmanager
def _folder_lock(out_dir):
    """One process per run folder: out_dir/.lock holds the host and pid of the process using it, from before it reads
    or writes anything there; another is refused in one line naming it, and the lock of a process that is gone (of
    this host, or stale) is taken over with one line. A folder made for the lock alone goes with it."""
    out_dir = Path(out_dir)
    lock, made = out_dir / ".lock", [f for f in (out_dir, *out_dir.parents) if not f.exists()]  # deepest first
    out_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    while True:
        try:
            with open(lock, "x") as f:
                f.write(f"{host} {os.getpid()}")
            break
        except FileExistsError:
            try:
                holder, _, pid = lock.read_text().strip().rpartition(" ")  # "": the other is still writing it
                # a live holder refreshes it (pids get reused), and writes its pid at once: a lock left empty for a
                # beat is a process killed between making it and writing it
                gone = time.time() - lock.stat().st_mtime > (LOCK_STALE if pid else LOCK_BEAT)
            except FileNotFoundError:  # its holder has just ended: try again
                continue
            here = holder == host and pid.isdigit()  # another host's pid means nothing here
            where = "" if here or not holder else f" on {holder}"
            try:
                if here and not gone:
                    os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
            except (ProcessLookupError, OverflowError):  # no such process; a pid past any (a hand edit) neither
                gone = True
            except PermissionError:
                pass  # it exists, another user's
            if gone:
                print(f"{lock}: process {pid or '(never written)'}{where}, which held it, is gone; taking the folder "
                      f"over")
                lock.unlink(missing_ok=True)
                continue
            raise ValueError(f"{out_dir} is in use by process {pid or '(starting)'}{where} ({lock}); wait until it "
                             f"ends, or pass another --out-dir" + ("" if here else f"; if it is gone, delete {lock}")
                             ) from None
        except OSError:  # the pid not written (a full disk): no empty lock may stay to refuse the next run
            lock.unlink(missing_ok=True)
            raise
    stop = threading.Event()

    def refresh():  # the lock's time, which tells other hosts that its process lives
        while not stop.wait(LOCK_BEAT):
            with contextlib.suppress(OSError):  # a file system's hiccup: the next beat tries again
                os.utime(lock)
    threading.Thread(target=refresh, daemon=True).start()
    try:
        yield
    finally:
        stop.set()
        lock.unlink(missing_ok=True)
        for folder in made:
            if any(folder.iterdir()):
                break
            folder.rmdir()


def _load_data(name, args, identity, size, with_train=True):
    """(dataset, its resizing) as the run's flags say: load_dataset with the split file --split-json or --split-dir
    gives it, or random images for --synthetic and --dry-run (resizing "synthetic"); with_train=False reads the test
    split alone (a dataset only evaluated)."""
    if args.synthetic or args.dry_run:  # every dataset name gets synthetic data of its own
        # a dry run tests on 64 images whatever its shots, so that summarize tables its shot counts side by side
        n_classes, n_test = DATASET_SIZES[name] if args.synthetic else (4, 64)
        return synthetic_dataset(n_classes, args.shots if args.synthetic else max(args.shots, 4), n_test, size,
                                 seed=list(DATASETS).index(name)), "synthetic"
    resizing = tga_zsr_preprocess(name, size) if args.conventions == "tga-zsr" else identity["preprocess"]
    split_json = args.split_json if name == args.dataset else None
    if args.split_dir:
        coop = COOP_SPLIT_FILES.get(name)
        split_json = Path(args.split_dir) / f"split_zhou_{coop}.json" if coop else None
        if split_json is None or not split_json.is_file():
            missing = f"no CoOp split file {split_json.name} in {args.split_dir}" if coop else "CoOp has none"
            if coop and args.conventions == "fap":
                raise ValueError(f"{name}: {missing}, from which --conventions fap draws; put it there")
            print(f"{name}: {missing}; using its default split (README, 'Datasets and splits')")
            split_json = None
        elif name != args.dataset:  # an evaluated target: its test set changes with the file, so say so
            print(f"{name}: tested on the test list of CoOp's {split_json.name}, not on its default test split")
    return load_dataset(name, args.data_root, resizing, download=not args.no_download, split_json=split_json,
                        with_train=with_train, conventions=args.conventions), resizing


def _class_sets(args, train_on, data):
    """(training split, its class names, its templates, the class sets evaluated: name -> (test split, class names,
    templates)) of the protocol; data(name, with_train) loads a dataset. A class set without test images, or too
    small for an attack, is refused here, before anything is written."""
    template = train_on and [_template(args.dataset, args.conventions)]  # a consensus's "dtd+eurosat" has none
    if args.protocol == "base2new":
        base_train, _, n_base = base_new_split(train_on["train"], len(train_on["classes"]))
        base_test, new_test, _ = base_new_split(train_on["test"], len(train_on["classes"]))
        train_set, train_names = base_train, train_on["classes"][:n_base]
        sets = {"base": (base_test, train_names, template), "new": (new_test, train_on["classes"][n_base:], template)}
    elif args.protocol == "transfer":
        train_set, train_names = (None, None) if train_on is None else (train_on["train"], train_on["classes"])
        sets = {name: (d["test"], d["classes"], [_template(name, args.conventions)]) for name in args.eval_datasets
                for d in [data(name, with_train=False)]}
    else:
        train_set, train_names = train_on["train"], train_on["classes"]
        sets = {args.dataset: (train_on["test"], train_names, template)}
    for name, (test_set, names, _) in sets.items():
        if len(test_set) == 0:  # a split file's empty test list, a class set of no class
            raise ValueError(f"class set {name!r} has no test images; give its split a test list")
        for attack in args.attack:
            if len(names) < (needs := ATTACKS[attack].min_classes):
                raise ValueError(f"class set {name!r} has {len(names)} classes, fewer than the {needs} that {attack}'s "
                                 f"DLR loss needs; use apgd-ce, pgd, cw or aa-tga-zsr for it instead")
    return train_set, train_names, template, sets


def _load_baseline(args, clip, tokenizer, identity, device):
    """(model, tokenizer, identity) of --baseline, evaluated beside the tuned model on the same decoded images: a
    frozen copy of unmasked CLIP (identity None: the run's), or a model folder with its own tokenizer, refused when
    it takes other images; (None, None, None) without --baseline."""
    if args.baseline == "clip":  # frozen: attacks keep no activations for parameter gradients
        return copy.deepcopy(clip).requires_grad_(False), tokenizer, None
    if not args.baseline:
        return None, None, None
    baseline, baseline_tokenizer, theirs = load_clip(args.baseline, None)
    baseline = baseline.to(device).requires_grad_(False)
    if args.eval_precision == "fp16":
        check_fp16(baseline, args.baseline)
    differ = [f"{k} {theirs['preprocess'][k]}" for k in ("size", "resize_mode", "interpolation")
              if theirs["preprocess"][k] != identity["preprocess"][k]]
    if differ:  # the test images are decoded once, for the tuned model
        raise ValueError(f"--baseline {args.baseline} takes other images than the masked model "
                         f"({', '.join(differ)}); pass a baseline of the same input size and resizing")
    return baseline, baseline_tokenizer, theirs


def _k_shot(args, train_on, train_set, train_names):
    """(split, indices) of the K-shot training images: Dassl's draw over every class under --conventions fap (base2new
    keeps the base classes after it, as CoOp's subsample_classes does), else sample_k_shot."""
    if args.conventions == "fap":
        split = train_on["train"]
        return split, [i for i in dassl_k_shot(split.targets, args.shots, args.seed)
                       if split.targets[i] < len(train_names)]
    try:
        return train_set, sample_k_shot(train_set.targets, args.shots, args.seed, train_names)
    except ValueError as e:
        raise ValueError(f"{e} with --shots") from None


def _adopt_provenance(args):
    """The provenance of the --masks or --weights file a run evaluates ({} without one), its settings of PROVENANCE made
    the run's: the run is labelled, and its folder named, by what trained the file, and its seed draws random base
    weights (--pretrained none) as the file's run drew them. The file's sha256 becomes args.tuned_file_sha256."""
    if not (args.masks or args.weights):
        return {}
    path = args.masks or args.weights
    provenance = read_tuned_file(path, "mask" if args.masks else "weights")[0].get("provenance", {})
    vars(args).update({k: v for k, v in provenance.items() if k in PROVENANCE})
    args.tuned_file_sha256 = hashlib.sha256(Path(path).read_bytes()).hexdigest()  # a path can name another file later
    return provenance


def run(args, device, provenance):
    """One run of a protocol in its folder, which it holds alone (_folder_lock): load CLIP and data, tune (or load)
    the mask, save it, evaluate clean and under attack. provenance: _adopt_provenance's."""
    path = args.masks or args.weights
    # dry and synthetic runs default to folders of their own, so that no real cell is ever taken for done
    root = "runs_dry" if args.dry_run else "runs_synthetic" if args.synthetic else "runs"
    if "consensus" in provenance:  # filed by what it is: k of n masks, and its content
        k, n = provenance["consensus"]["k"], len(provenance["consensus"]["masks"])
        folder = f"{root}/transfer/consensus/{k}of{n}-{args.tuned_file_sha256[:12]}"
        print(f"{path} is the consensus of {n} masks (weights off in at least {k} of them); filed under {folder}")
    else:
        # the --tune weights arm has a folder of its own beside the mask's, so both arms share a runs root
        folder = (f"{root}/{args.protocol}/{args.dataset}/{args.shots}shot/seed{args.seed}" +
                  ("-weights" if args.tune == "weights" else ""))
        if provenance:
            print(f"{path} was trained on {args.dataset}, {args.shots} shot{'s' * (args.shots != 1)}, seed "
                  f"{args.seed}, lr {args.lr:g}, loss {args.loss} (λ {args.lam:g}); the results are labelled so")
    out_dir = Path(args.out_dir or folder)
    if (args.masks or args.weights) and Path(path).resolve().parent == out_dir.resolve():  # a transfer run's own file
        raise ValueError(f"{path} is the trained file of {out_dir}, which this run would take over (and --overwrite "
                         f"delete); pass another --out-dir, or rerun that run's own command, which adds the cells of "
                         f"new --eval-datasets or --attack and keeps its file")
    _require_writable(out_dir)
    with _folder_lock(out_dir):
        return _run_in(out_dir, args, device)


# What a run loads before it trains or evaluates (_load_run)
Loaded = collections.namedtuple("Loaded", "clip tokenizer identity settings splits resizing train_on train_set "
                                          "train_names template sets baseline baseline_tokenizer baseline_sha256")


def _load_run(args, device):
    """A Loaded record: CLIP and its identity, the datasets (each one's split and resizing recorded), the class sets
    of the protocol, the --baseline model, and the settings that config.json records."""
    clip, tokenizer, identity = load_clip(args.model, args.pretrained)
    clip = clip.to(device)
    if args.eval_precision == "fp16":
        check_fp16(clip, describe(identity))
    splits, resizing = {}, {}  # dataset -> its split record; -> how its images were resized ("synthetic": random)

    def data(name, with_train=True):  # one of the run's datasets, its split and resizing recorded
        d, resizing[name] = _load_data(name, args, identity, size=clip.visual.image_size[0], with_train=with_train)
        splits[name] = d["split"]
        return d

    # what is trained on (None for a --masks or --weights file), and the class sets evaluated
    train_on = None if args.masks or args.weights else data(args.dataset)
    train_set, train_names, template, sets = _class_sets(args, train_on, data)
    baseline, baseline_tokenizer, baseline_identity = _load_baseline(args, clip, tokenizer, identity, device=device)
    # the kind of device decides the random draws, not a GPU's index (cuda:1 of a machine draws as its cuda:0)
    settings = {**vars(args), "device": device.type, "model_identity": identity,
                # the code that runs: each cell keeps it, as cells of several reruns share a results.json
                "code": {"advmask_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
                         "torch": torch.__version__},
                "train_split": splits.get(args.dataset),  # the training data as it decides the mask, not its folder
                **({"baseline_identity": baseline_identity} if baseline_identity else {})}
    return Loaded(clip=clip, tokenizer=tokenizer, identity=identity, settings=settings, splits=splits,
                  resizing=resizing, train_on=train_on, train_set=train_set, train_names=train_names, template=template,
                  sets=sets, baseline=baseline, baseline_tokenizer=baseline_tokenizer,
                  baseline_sha256=(baseline_identity or {}).get("weights_sha256"))  # a folder baseline's weights


def _trainer(loaded):
    """What trains a run's file, as its checkpoint and the file's provenance record it: the code, the training settings
    (all but EVAL_ONLY) and the model's identity (SAME_MODEL), as JSON reads them back."""
    settings = loaded.settings
    return json.loads(json.dumps({"code": settings["code"], **{k: v for k, v in settings.items() if k not in EVAL_ONLY},
                                  "model_identity": {k: loaded.identity.get(k) for k in SAME_MODEL}}))


def _load_tuned_file(out_dir, args, loaded, trainer):
    """Put on loaded.clip the file a run evaluates without training it: the --masks or --weights file, or the one a
    run of the same training settings saved in out_dir. A file that does not fit, or a run folder's file whose
    header records another trainer (_trainer) than this run's, trainer (one copied in by hand), is refused before
    anything is written."""
    clip, source = loaded.clip, describe(loaded.identity)
    if args.masks or args.weights:
        target = (next(_masks(load_masks(clip, args.masks, source))).mask.target if args.masks else
                  load_weights(clip, args.weights, source)["target"])
        if target != args.mask_target:
            raise ValueError(f"{args.masks or args.weights} covers the {target} weights; pass --mask-target {target} "
                             f"with it")
        return Path(args.masks or args.weights)
    trained = out_dir / TUNED_FILES[args.tune]
    recorded = read_tuned_file(trained, args.tune)[0].get("provenance", {})
    # reused under new code (cells record theirs), but not under settings other than its own, whatever config.json says
    differ = sorted(k for k in trainer if k != "code" and recorded.get(k) != trainer[k])
    if differ:  # its cells would be filed under this folder's settings
        raise ValueError(f"{trained} was trained with another {', '.join(differ)} than the run of {out_dir} "
                         f"({out_dir / 'config.json'}); put that run's own file back, or pass --overwrite to train "
                         f"again")
    (load_masks if args.tune == "mask" else load_weights)(clip, trained, source)
    print(f"reusing {trained}, trained by an earlier run with the same settings")
    return trained


def _train_or_reuse(out_dir, args, device, loaded, lap):
    """Put the tuned file on loaded.clip: the --masks or --weights file, the one a run of the same training settings
    saved in out_dir, or one trained now (from its checkpoint, if any) and saved there. Returns (the results.json
    beside that file, or {}; the training log; the file's sha256)."""
    checkpoint, results_path = out_dir / "checkpoint.pt", out_dir / "results.json"
    trained, trainer = out_dir / TUNED_FILES[args.tune], _trainer(loaded)
    same_run = _check_out_dir(out_dir, checkpoint, loaded.settings, args.overwrite)
    train_now = not (args.masks or args.weights or same_run and trained.is_file())
    # finished cells stay only beside the file they measured: a mask trained now (its file gone) starts them over,
    # and so does a file replaced since its cells were measured
    previous = read_json(results_path, ("results",)) if same_run and not train_now and results_path.is_file() else {}
    _check_reusable(results_path, previous, args, loaded.sets)
    if train_now:
        # only the trainer that saved a checkpoint resumes it, checked here (before anything is written) against the
        # checkpoint itself, as its config.json may be gone or edited
        if checkpoint.is_file() and not args.overwrite:
            _read_training_state(checkpoint, trainer)
        train_set, indices = _k_shot(args, loaded.train_on, loaded.train_set, loaded.train_names)
        images, labels = cache_images(train_set, indices, device, args.workers)
        lap("cache")
        epochs = args.epochs or default_epochs(len(labels), args.batch_size)
        print(f"{args.protocol} on {args.dataset}: {len(labels)} training images ({args.shots} per class, "
              f"{len(loaded.train_names)} classes), {epochs} epoch{'s' * (epochs != 1)} on {device} ({args.precision})")
    else:
        tuned_file = _load_tuned_file(out_dir, args, loaded, trainer)
        sha256 = hashlib.sha256(tuned_file.read_bytes()).hexdigest()
        if previous and previous.get("tuned_file_sha256") != sha256:
            print(f"{tuned_file} is not the file that the cells of {results_path} measured; evaluating them again")
            previous = {}
    # before anything new: an interrupted overwrite, or retraining, leaves no old result behind; a file reused
    # supersedes a checkpoint left beside it (by a kill between the file's save and the checkpoint's deletion)
    for old in (checkpoint, results_path, *(out_dir / f for f in TUNED_FILES.values())) if args.overwrite else (
            [results_path] if train_now else [checkpoint]):
        old.unlink(missing_ok=True)
    write_json(out_dir / "config.json", loaded.settings)
    if not train_now:
        return previous, previous.get("train_log", []), sha256
    with _out_of_memory("--batch-size", args.batch_size):  # the checkpoint stays for the rerun
        _, history = adversarial_mask_tuning(
            loaded.clip, images, labels, loaded.train_names, templates=loaded.template, target=args.mask_target,
            tune=args.tune, epochs=epochs, tokenizer=loaded.tokenizer, batch_size=args.batch_size, lr=args.lr,
            lam=args.lam, eps=args.train_eps / 255, alpha=args.train_alpha / 255, steps=args.train_steps,
            loss=args.loss, seed=args.seed, precision=args.precision,
            checkpoint=training_checkpoint(checkpoint, trainer), checkpoint_every=args.checkpoint_every)
    source = describe(loaded.identity)
    if args.tune == "mask":  # the file's provenance: what trained it
        save_masks(loaded.clip, trained, source, provenance=trainer)
    else:
        save_weights(loaded.clip, trained, target=args.mask_target, source=source, provenance=trainer)
    checkpoint.unlink()  # its result is in the trained file now
    return {}, history, hashlib.sha256(trained.read_bytes()).hexdigest()


def _ready_to_evaluate(args, loaded):
    """Bake the mask (or freeze the tuned weights) of loaded.clip, and convert it and the baseline to fp16 for
    --eval-precision fp16. Returns (the share of weights off, or None; the outcome in words)."""
    clip = loaded.clip
    if args.tune == "mask":
        sparsity = mask_sparsity(clip)
        outcome = f"off {100 * sparsity:.2f}% of masked weights"
        bake_masks(clip)  # evaluation on plain weights costs what plain CLIP costs
    else:
        n_tuned = sum(w.numel() for _, w in target_weights(clip, args.mask_target))
        sparsity, outcome = None, f"tuned {n_tuned:,} weights"
        clip.requires_grad_(False)  # attacks need the input's gradient only
    if args.eval_precision == "fp16":  # trained in the training precision: baked, then converted
        for model in (clip, loaded.baseline) if args.baseline else (clip,):
            fp16_network(model)
    return sparsity, outcome


def _evaluate_missing(args, device, loaded, splits, class_sets, results, save, lap):
    """Evaluate, class set by class set, the tuned model (and the baseline) in every cell of the flags that results
    lacks, appending its entries (and the per-image worst case over several attacks) and saving after each model."""
    done = {_cell_key(row) for row in results}
    for name, (test_set, names, templates) in loaded.sets.items():
        models = ({args.baseline: ClipClassifier(loaded.baseline, names, templates, loaded.baseline_tokenizer)}
                  if args.baseline else {})
        models[TUNED_MODEL[args.tune]] = ClipClassifier(loaded.clip, names, templates, loaded.tokenizer)
        chosen, indices_sha256 = _evaluated(args, test_set)
        test_set_id = _test_set(splits[_test_split(args.dataset, name)], indices_sha256, class_sets[name])
        cells = {m: {"model": m, "eval": name, "test_set": test_set_id, "code": loaded.settings["code"],
                     **{k: getattr(args, k) for k in CELL_SETTINGS},
                     **({"weights_sha256": loaded.baseline_sha256} if m == args.baseline and loaded.baseline_sha256
                        else {})} for m in models}
        todo = {m: [(a, eps) for a, eps in itertools.product(args.attack, args.test_eps)
                    if _cell_key({**cells[m], "attack": a, "eps": eps}) not in done] for m in models}
        if any(todo.values()):
            test_images, test_labels = cache_images(test_set, chosen, "cpu", args.workers)  # decoded once
            lap(f"decode {name}")
        for model_name, model in models.items():
            had = len(results)
            if todo[model_name]:
                attacks = {_cell_label(a, eps): make_attack(a, eps / 255, args.test_alpha / 255, args.test_steps)
                           for a, eps in todo[model_name]}
                with autocast(device, args.eval_precision), _out_of_memory("--eval-batch-size", args.eval_batch_size):
                    result = evaluate(model, test_images, test_labels, attacks, batch_size=args.eval_batch_size,
                                      seed=args.seed)
                results += _result_rows(cells[model_name], result, todo[model_name])
            for eps in args.test_eps if len(args.attack) > 1 else []:
                worst = {**cells[model_name], "attack": "worst", "attacks": args.attack, "eps": eps}
                if _cell_key(worst) not in done:
                    rows = {_cell_key(r): r for r in results}
                    results.append(_worst_row([rows[_cell_key({**cells[model_name], "attack": a, "eps": eps})]
                                               for a in args.attack], args.attack))
            if len(results) > had:  # a phase is recorded only where something was evaluated
                save(complete=False)
                lap(f"eval {model_name} {name}")


def _run_in(out_dir, args, device):
    """run's steps, in out_dir: load, train the tuned file or reuse it, make it ready to evaluate, evaluate the cells
    results.json lacks."""
    start = tic = time.perf_counter()
    phases = {}  # seconds per phase, printed and stored in results.json

    def lap(phase):
        nonlocal tic
        phases[phase] = phases.get(phase, 0.0) + time.perf_counter() - tic
        tic = time.perf_counter()

    loaded = _load_run(args, device)
    lap("load")
    previous, history, tuned_sha256 = _train_or_reuse(out_dir, args, device, loaded, lap=lap)
    sparsity, outcome = _ready_to_evaluate(args, loaded)
    lap("train")
    # the cells of earlier runs into this folder, each with its own evaluation settings and test set; a folder
    # baseline's go with the weights they measured (another model under its name is evaluated anew)
    results = [r for r in previous.get("results", [])
               if r["model"] != args.baseline or r.get("weights_sha256") == loaded.baseline_sha256]
    if len(results) < len(previous.get("results", [])):
        print(f"--baseline {args.baseline} has other weights than its cells in {out_dir / 'results.json'} measured; "
              f"evaluating them again")
    splits = previous.get("splits", {}) | loaded.splits
    class_sets = previous.get("class_sets", {}) | {  # a rerun only adds
        name: {"templates": templates, "classes": names, "n_test": len(test_set),
               "preprocess": loaded.resizing[_test_split(args.dataset, name)]}
        for name, (test_set, names, templates) in loaded.sets.items()}
    if results:
        print(f"reusing {len(results)} finished cell{'s' * (len(results) != 1)} of {out_dir / 'results.json'}")

    def save(complete):  # at once, atomically, after every evaluation: a failure keeps every finished cell
        write_json(out_dir / "results.json", {
            "protocol": args.protocol, "dataset": args.dataset, "shots": args.shots, "seed": args.seed,
            "sparsity": sparsity, "tuned_file_sha256": tuned_sha256, "splits": splits,
            "seconds": time.perf_counter() - start, "phases": phases, "complete": complete, "results": results,
            "train_log": history, "settings": loaded.settings, "class_sets": class_sets})

    save(complete=False)
    _evaluate_missing(args, device, loaded, splits=splits, class_sets=class_sets, results=results, save=save, lap=lap)
    seconds = time.perf_counter() - start
    print("time | " + " | ".join(f"{phase} {s:.1f} s" for phase, s in phases.items()) + f" | total {seconds:.1f} s")
    print(f"done | {outcome} | {seconds:.0f} s | {out_dir}")
    save(complete=True)
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["summarize"]:
            args = parse_summarize_args(argv[1:])
            summarize(args.runs_dir, parser_defaults, args.out)
            plot_few_shot(args.out or args.runs_dir)
            return
        if argv[:1] == ["export"]:
            args = parse_export_args(argv[1:])
            _require_writable(args.out_dir)
            export(args.run_dir, args.out_dir, visual=args.visual, overwrite=args.overwrite, model=args.model,
                   pretrained=args.pretrained)
            print(f"exported {args.run_dir} to {args.out_dir}; load it with "
                  f"open_clip.create_model_and_transforms(\"local-dir:{args.out_dir}\")")
            return
        if argv[:1] == ["analyze"]:
            args = parse_analyze_args(argv[1:])
            for folder in [args.out] + ([Path(args.save).parent] if args.save else []):  # before any figure
                _require_writable(folder)
            analyze(args.paths, args.out, args.consensus, args.save)
            return
        args = parse_args(argv)
        provenance = _adopt_provenance(args)  # before the seed is set: a --masks or --weights file's own seed
        # device and seed are decided here, once, and passed down (precision by the flags, TRAIN_/EVAL_PRECISION)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))  # --device: _device
        if device.type == "cuda" and device.index is not None:  # --device's GPU as the current one: the GPU that
            torch.cuda.set_device(device)  # torchattacks seeds, and that calls naming no device use
        set_tf32(True)  # fp32 matmuls and convolutions may use TF32
        if args.deterministic:  # cuBLAS needs this workspace setting to be deterministic; cuDNN autotuning is off
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(args.seed)
        if args.benchmark:  # random weights, of --model or of the benchmark's default
            model = args.model or {"speed": "BENCH_CLIP", "precision": "ViT-B-32"}[args.benchmark]
            config = {"BENCH_CLIP": BENCH_CLIP, "tiny": TINY_CLIP}.get(model) or open_clip.get_model_config(
                resolve_model(model))
            if not config or "timm_model_name" in config["vision_cfg"] or config.get("custom_text"):
                raise ValueError(f"--benchmark builds open_clip's own CLIP ViT from a config name or JSON, which "
                                 f"{model} is not; benchmark such a model, e.g. ViT-B-16")
            rows = (precision_check(config, device) if args.benchmark == "precision" else
                    [benchmark(config, args.batch_size, device, precision=args.precision, target=args.mask_target)])
            for row in rows:
                print(json.dumps({"model": model, **row}))
        else:
            run(args, device, provenance)
    except ValueError as e:  # library functions raise ValueError with a sentence that says what to do
        print(f"advmask: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:  # the loss diverged: not a usage error, but one line all the same
        print(f"advmask: stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # e.g. `summarize RUNS | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:  # a full disk, a file over a size limit, a read-only place: one line, what is written stays
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        print(f"advmask: error: could not write {e.filename or 'the output'} ({e.strerror}); free space there, or "
              f"pass a folder you can write to, and rerun: files already finished are kept", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: the shell's status for SIGINT, and one line
        print(f"advmask: {str(e) or 'interrupted'}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    # SIGTERM (a cluster's pre-emption or time limit) ends the run as Ctrl-C does: one line, its folder's lock released
    # (a job requeued on another node resumes at once, not after LOCK_STALE), the last checkpoint kept
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        main()
    finally:  # past main, in the interpreter's exit (torch's hooks), SIGTERM just ends it, with no traceback
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
