"""CE-CLIP: contrast intra-modal and rank cross-modal hard negatives.

Paper: Le Zhang, Rabiul Awal, Aishwarya Agrawal, "Contrasting Intra-Modal and Ranking Cross-Modal Hard Negatives
to Enhance Visio-Linguistic Compositional Understanding", CVPR 2024, https://arxiv.org/abs/2306.08832
Official code: https://github.com/lezhang7/Enhance-FineGrained, a fork of open_clip (the losses in
src/open_clip/loss.py, class `Clip_DALoss`; the training loop in src/training/train.py; the final recipe in
scripts/run_multiple_nodes.sh; the hard negatives in data/dataset.py).

The idea in five lines:
  * every caption T_i gets K = 4 rule-made hard negatives U_i^k, one per type k in the fixed order
    (relation = noun swap, attribute, object, action), each with a validity flag m_i^k (a caption without a verb
    has no valid action negative, as in the released data);
  * ITC(hn): image->text InfoNCE over all G captions plus all G*K negatives of the (gathered) batch; text->image plain;
  * CMR: each image must rank its caption above each of its own valid negatives by a per-type margin theta_k,
    and theta_k follows the previous batch's mean positive-negative logit gap, clipped to [0, 10] (a curriculum);
  * IMC: the caption is contrasted against its hard-negative texts in the text space (positive = image-caption logit).

Total loss (S(a, b) = s <a, b>, s = exp(logit_scale), all features L2-normalised). The terms follow the official
loss.py with this file's defaults (invalid negatives masked everywhere, IMC over a caption's own negatives: see
below). IMC is the paper's Eq. (3) (inferred: https://github.com/lezhang7/Enhance-FineGrained/issues/15 discusses
Eq. (3) as the IMC loss); the paper's numbers of the other equations are not given here:

    L = L_itc(hn) + lambda_cmr * L_cmr + lambda_imc * L_imc,        lambda_cmr = 0.2, lambda_imc = 0.3

    L_itc(hn) = 1/2 [ -1/G sum_i log e^{S(v_i,t_i)} / (sum_j e^{S(v_i,t_j)} + sum_{j,k} m_j^k e^{S(v_i,u_j^k)})
                      -1/G sum_i log e^{S(t_i,v_i)} /  sum_j e^{S(t_i,v_j)} ]
    L_cmr     = 1/(G K) sum_{i,k} m_i^k max(0, theta_k + S(v_i,u_i^k) - S(v_i,t_i))
    L_imc     = -1/G sum_i log e^{S(v_i,t_i)} / (e^{S(v_i,t_i)} + sum_k m_i^k e^{S(t_i,u_i^k)})
    theta_k  <- clip( mean_i S(v_i,t_i) - mean_{i: m_i^k=1} S(v_i,u_i^k), 0, 10 )   (after each step, no grad)

Where the official code (loss.py `Clip_DALoss`, train.py) differs from the paper's intent, the intent is the default
and a flag reproduces the release:
  * IMC: the released HEAD form (since Enhance-FineGrained commit 47cef4e) is CE(s T U^T, target 0), which pulls every
    caption toward the first hard negative of the batch (https://github.com/lezhang7/Enhance-FineGrained/issues/15).
    Default: the form of its commit 7f4433a ("fix bugs") above, restricted to the caption's own valid negatives
    (`--imc-variant own`); `--imc-variant all` uses every negative of the batch (the 7f4433a form exactly);
    `--imc-variant release` is the HEAD form.
  * Invalid negatives: the release masks them only in CMR; ITC and IMC use the placeholder "###" as a negative.
    Default: masked everywhere (`--mask-invalid all`); `--mask-invalid cmr` reproduces the release, including
    feeding the text "###" for invalid slots.
  * theta is re-created (= 0) at the start of every epoch in the release; the paper's Fig. 5(b) shows it rising
    smoothly over ~5k steps (many epochs), so by default it persists (and is saved in checkpoints);
    `--theta-reset-per-epoch` reproduces the release.

Run:
    python cehn.py                                   # shapes world, shipped `shapes` base model, CPU ok
    python cehn.py --w-cmr 0 --w-imc 0 --itc-hn 0    # the baseline: plain CLIP fine-tuning on the same data
    python cehn.py --w-cmr 0 --w-imc 0               # its paper's Table 4 baseline "itc(hn)": the hard-negative ITC alone
    python cehn.py --data coco --data-root DIR --gpus 8 --eval aro,sugarcrepe,valse
    torchrun --nnodes 2 --nproc-per-node 8 ... cehn.py --data coco --data-root DIR
    python cehn.py --resume OUT_DIR                  # continue the last checkpoint (model, optimiser, theta, ...)
"""
import os

import torch
import torch.nn.functional as F

import common
import data
import eval as evaluation  # `eval` would shadow the builtin

# ----------------------------------------------------------------------------------------------------------------
# Defaults. Real data: the final release script and its parameters (https://github.com/lezhang7/Enhance-FineGrained:
# scripts/run_multiple_nodes.sh, src/training/params.py, src/main.py).
# Shapes: the shared shapes budget (common.SHAPES_DEFAULTS) plus the method's own values.
# ----------------------------------------------------------------------------------------------------------------
NEG_TYPES = ("relation", "attribute", "object", "action")  # fixed order of the K = 4 types (== data.CEHN_TYPES)

METHOD_DEFAULTS = dict(
    w_cmr=0.2,              # lambda_cmr: release script (class default is also 0.2)
    w_imc=0.3,              # lambda_imc: release script (class default 0.2)
    itc_hn=1,               # 1: hard negatives are extra image->text ITC columns ("--hardnegative"); 0: plain ITC
    threshold_type="mean",  # CMR theta update: mean | max | fixed (release default and the one used: mean)
    fixed_threshold=2.0,    # theta for --threshold-type fixed (params.py default 2.0; scripts used 5 or 10)
    upper_bound=10.0,       # theta clipped to [0, upper_bound] (params.py default, paper Fig. 5: 10 beats 5 and 15)
    theta_init=0.0,         # theta before the first update (release: 0)
    theta_reset_per_epoch=0,  # 1 reproduces the release (theta re-created at every epoch)
    imc_variant="own",      # own | all | release (see module docstring)
    mask_invalid="all",     # all | cmr (release: invalid negatives masked only in CMR)
    neg_types=",".join(NEG_TYPES),  # the paper's four; a caption without a verb has no valid action negative
)

REAL_DEFAULTS = dict(
    model="ViT-B-32-quickgelu", pretrained="openai",  # open_clip ViT-B-32 with OpenAI weights (QuickGELU)
    # data: --data coco = COCO 2014 train captions, every caption a sample (data/dataset.py); AdamW betas
    # (0.9, 0.98) and eps 1e-6 are common.make_optimizer's defaults (run_multiple_nodes.sh).
    lr=5e-6, wd=0.1,         # run_multiple_nodes.sh; no decay on biases, norms, logit scale (open_clip default)
    warmup=50,               # steps, then cosine (open_clip cosine_lr)
    batch_size=378,          # per GPU, x 4 A100 = 1512 global (run_multiple_nodes.sh); use --gpus 8 --batch-size 189
    epochs=10,               # run_multiple_nodes.sh (the README's evaluation loads epoch_5: try --epochs 5 too)
    workers=8,               # per process; the release used 0
    seed=42,                 # official seed (data loading and init)
    save_every=1000,
    eval="aro,sugarcrepe,valse",  # the paper's benchmarks (Tables 1 and 3)
    # precision: the release used fp16 amp; the project's CUDA default is bf16 autocast (--precision auto)
)

# Shapes: the shared budget (common.SHAPES_DEFAULTS: batch 64, lr 3e-4, ...) so that every method runs at the same
# cost; the method's own values are the paper's (METHOD_DEFAULTS): theta in logit units works unchanged because the
# tiny model's logit scale is also clamped to [1, 100].
DEFAULTS = {"shapes": {**common.SHAPES_DEFAULTS, **METHOD_DEFAULTS},
            "real": {**REAL_DEFAULTS, **METHOD_DEFAULTS}}


# ----------------------------------------------------------------------------------------------------------------
# Losses: pure functions of (already gathered, L2-normalised) features.
# ----------------------------------------------------------------------------------------------------------------
def itc_hard_negative_loss(image_emb, text_emb, neg_text_emb, neg_valid, logit_scale, mask_invalid=True):
    """ITC with hard negatives, NegCLIP-style with K negatives per caption (the official loss.py
    `Clip_DALoss.forward`, flag `--hardnegative`; the release does not mask invalid negatives here).

    L_i2t = -1/G sum_i log e^{S(v_i,t_i)} / (sum_j e^{S(v_i,t_j)} + sum_{j,k} m_j^k e^{S(v_i,u_j^k)})
    L_t2i = -1/G sum_i log e^{S(t_i,v_i)} / sum_j e^{S(t_i,v_j)}          (hard negatives are never queries)
    L_itc = (L_i2t + L_t2i) / 2

    image_emb: (G, D) L2-normalised; text_emb: (G, D) L2-normalised captions; neg_text_emb: (G, K, D) L2-normalised
    hard negatives (or None: plain CLIP loss); neg_valid: (G, K) bool; logit_scale: scalar s = exp(logit_scale)
    (already exponentiated); mask_invalid: drop invalid negatives from the image->text denominator (release: False).
    Returns (loss, {"itc_i2t", "itc_t2i"}).
    """
    num = image_emb.shape[0]
    target = torch.arange(num, device=image_emb.device)
    logits_t2i = logit_scale * text_emb @ image_emb.t()
    logits_i2t = logits_t2i.t()
    if neg_text_emb is not None:
        neg_flat = neg_text_emb.reshape(-1, neg_text_emb.shape[-1])  # (G*K, D), sample-major
        neg_logits = logit_scale * image_emb @ neg_flat.t()  # (G, G*K)
        if mask_invalid:
            neg_logits = neg_logits.masked_fill(~neg_valid.reshape(1, -1), float("-inf"))
        logits_i2t = torch.cat([logits_i2t, neg_logits], dim=1)
    loss_i2t = F.cross_entropy(logits_i2t, target)
    loss_t2i = F.cross_entropy(logits_t2i, target)
    loss = (loss_i2t + loss_t2i) / 2
    return loss, {"itc_i2t": loss_i2t.item(), "itc_t2i": loss_t2i.item()}


def cmr_loss(image_emb, text_emb, neg_text_emb, neg_valid, logit_scale, theta_per_type):
    """Cross-modal rank loss with per-type thresholds (the official loss.py `get_cmr_loss`, flag `--cmr-loss`).

    p_i = S(v_i, t_i), n_i^k = S(v_i, u_i^k) (the image's own negatives only),
    L_cmr = 1/(G K) sum_{i,k} m_i^k max(0, theta_k + n_i^k - p_i)
    (a plain mean over all G*K slots, invalid ones counting as 0, as in the release.)

    image_emb, text_emb: (G, D) L2-normalised; neg_text_emb: (G, K, D) L2-normalised; neg_valid: (G, K) bool;
    logit_scale: scalar s (exponentiated); theta_per_type: (K,) margins in logit units (no gradient).
    Returns (loss, parts); parts has the loss, the fraction of active hinges and, per type, the mean gap p - n.
    """
    pos_logit = logit_scale * (image_emb * text_emb).sum(-1)  # (G,)
    neg_logit = logit_scale * torch.einsum("gd,gkd->gk", image_emb, neg_text_emb)  # (G, K)
    valid = neg_valid.to(pos_logit.dtype)
    hinge = torch.relu(theta_per_type.to(pos_logit.dtype)[None, :] + neg_logit - pos_logit[:, None]) * valid
    loss = hinge.mean()
    parts = {"cmr": loss.item(), "cmr_active": ((hinge > 0).float().sum() / valid.sum().clamp(min=1)).item()}
    return loss, parts


def update_thresholds(pos_logit, neg_logit, neg_valid, theta_per_type, mode="mean", fixed_value=2.0,
                      upper_bound=10.0):
    """The adaptive CMR margins for the next step; no gradient (the official loss.py and train.py:
    `--threshold-type mean`, the clip to [0, `--upper-bound 10`] in the training loop; paper Fig. 5(b) plots them).

    mean:  theta_k = mean_i p_i - mean_{i: m_i^k = 1} n_i^k            (mean positive-negative logit gap)
    max:   theta_k = max_{i: m_i^k = 1} (p_i - n_i^k) / 5
    fixed: theta_k = fixed_value
    then theta_k is clipped to [0, upper_bound]. A type with no valid negative in the batch keeps its old value
    (the release would divide 0 by 0 there).

    pos_logit: (G,) S(v_i, t_i); neg_logit: (G, K) S(v_i, u_i^k); neg_valid: (G, K) bool; theta_per_type: (K,) current.
    Returns the new (K,) theta.
    """
    pos_logit, neg_logit = pos_logit.detach().float(), neg_logit.detach().float()
    old = theta_per_type.detach().float()
    valid = neg_valid.bool()
    has_valid = valid.any(0)
    if mode == "mean":
        neg_mean = (neg_logit * valid).sum(0) / valid.sum(0).clamp(min=1)
        new = pos_logit.mean() - neg_mean
    elif mode == "max":
        gap = (pos_logit[:, None] - neg_logit).masked_fill(~valid, float("-inf"))
        new = gap.max(0).values / 5
    elif mode == "fixed":
        return torch.full_like(old, fixed_value).clamp(0, upper_bound)
    else:
        raise ValueError(f"unknown threshold type {mode!r}: expected mean, max or fixed")
    new = torch.where(has_valid, new, old)
    return new.clamp(0, upper_bound)


def imc_loss(image_emb, text_emb, neg_text_emb, neg_valid, logit_scale, variant="own", mask_invalid=True):
    """Intra-modal contrast of a caption against hard-negative captions: the paper's Eq. (3) (inferred:
    https://github.com/lezhang7/Enhance-FineGrained/issues/15 discusses Eq. (3) as this loss and finds the code does
    not match it).

    own (default; the 7f4433a form restricted to the caption's own negatives):
        L = -1/G sum_i log e^{S(v_i,t_i)} / (e^{S(v_i,t_i)} + sum_k m_i^k e^{S(t_i,u_i^k)})
    all (the 7f4433a form, every negative of the batch):
        L = -1/G sum_i log e^{S(v_i,t_i)} / (e^{S(v_i,t_i)} + sum_{j,k} m_j^k e^{S(t_i,u_j^k)})
    release (the official HEAD since commit 47cef4e, a bug kept for reproduction: the "target" is column 0 = the
    first negative of sample 0; the mask is never used):
        L = -1/G sum_i log e^{S(t_i,u_1^1)} / sum_{j,k} e^{S(t_i,u_j^k)}

    image_emb, text_emb: (G, D) L2-normalised; neg_text_emb: (G, K, D) L2-normalised; neg_valid: (G, K) bool;
    logit_scale: scalar s (the CLIP scale, no separate temperature); mask_invalid: drop invalid negatives
    (own/all; release behaviour: False). Returns (loss, {"imc"}).
    """
    num, k_types, dim = neg_text_emb.shape
    pos_logit = logit_scale * (image_emb * text_emb).sum(-1, keepdim=True)  # (G, 1)
    if variant == "own":
        neg_logit = logit_scale * torch.einsum("gd,gkd->gk", text_emb, neg_text_emb)  # (G, K)
        if mask_invalid:
            neg_logit = neg_logit.masked_fill(~neg_valid, float("-inf"))
    elif variant in ("all", "release"):
        neg_logit = logit_scale * text_emb @ neg_text_emb.reshape(-1, dim).t()  # (G, G*K)
        if variant == "release":
            target = torch.zeros(num, dtype=torch.long, device=text_emb.device)
            loss = F.cross_entropy(neg_logit, target)
            return loss, {"imc": loss.item()}
        if mask_invalid:
            neg_logit = neg_logit.masked_fill(~neg_valid.reshape(1, -1), float("-inf"))
    else:
        raise ValueError(f"unknown IMC variant {variant!r}: expected own, all or release")
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    target = torch.zeros(num, dtype=torch.long, device=text_emb.device)
    loss = F.cross_entropy(logits, target)
    return loss, {"imc": loss.item()}


def cehn_loss(image_emb, text_emb, neg_text_emb, neg_valid, logit_scale, theta_per_type, w_cmr=0.2, w_imc=0.3,
              itc_hn=True, imc_variant="own", mask_invalid="all", type_names=NEG_TYPES):
    """The total CE-CLIP loss L = L_itc(hn) + w_cmr L_cmr + w_imc L_imc on a gathered batch.

    Arguments as in the three terms (all (G, ...) global tensors); mask_invalid: "all" (default) or "cmr" (release);
    type_names: the K slots' names (for the logged gap_<name>).
    With itc_hn=False, w_cmr=0 and w_imc=0 this is the plain CLIP loss (neg_text_emb may then be None).
    Returns (loss, parts, (pos_logit (G,), neg_logit (G, K) or None)); the logits feed update_thresholds.
    """
    if mask_invalid not in ("all", "cmr"):
        raise ValueError(f"unknown mask_invalid {mask_invalid!r}: expected all or cmr")
    mask_everywhere = mask_invalid == "all"
    loss, parts = itc_hard_negative_loss(image_emb, text_emb, neg_text_emb if itc_hn else None, neg_valid,
                                         logit_scale, mask_invalid=mask_everywhere)
    parts["itc"] = loss.item()
    if w_cmr:
        cmr, cmr_parts = cmr_loss(image_emb, text_emb, neg_text_emb, neg_valid, logit_scale, theta_per_type)
        loss = loss + w_cmr * cmr
        parts.update(cmr_parts)
    if w_imc:
        imc, imc_parts = imc_loss(image_emb, text_emb, neg_text_emb, neg_valid, logit_scale, imc_variant,
                                  mask_invalid=mask_everywhere)
        loss = loss + w_imc * imc
        parts.update(imc_parts)
    parts["loss"] = loss.item()
    logits = None
    if neg_text_emb is not None:
        with torch.no_grad():
            pos_logit = logit_scale * (image_emb * text_emb).sum(-1)
            neg_logit = logit_scale * torch.einsum("gd,gkd->gk", image_emb, neg_text_emb)
            logits = (pos_logit, neg_logit)
            for k, name in enumerate(type_names[:neg_logit.shape[1]]):
                valid_k = neg_valid[:, k]
                if valid_k.any():
                    parts[f"gap_{name}"] = (pos_logit[valid_k] - neg_logit[valid_k, k]).mean().item()
    return loss, parts, logits


# ----------------------------------------------------------------------------------------------------------------
# Model glue
# ----------------------------------------------------------------------------------------------------------------
class CeForward(torch.nn.Module):
    """One forward of the CLIP towers: images, captions and the K negatives per caption in one text pass.

    Returns L2-normalised image_emb (B, D), text_emb (B, D), neg_text_emb (B, K, D) or None, and s = exp(logit_scale)
    (returned from inside forward so DDP sees every parameter it differentiates)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, texts, neg_texts=None):
        image_emb = self.model.encode_image(images, normalize=True)
        if neg_texts is None:
            return image_emb, self.model.encode_text(texts, normalize=True), None, self.model.logit_scale.exp()
        batch, k_types, length = neg_texts.shape
        all_text = self.model.encode_text(torch.cat([texts, neg_texts.reshape(-1, length)]), normalize=True)
        text_emb, neg_text_emb = all_text[:batch], all_text[batch:].reshape(batch, k_types, -1)
        return image_emb, text_emb, neg_text_emb, self.model.logit_scale.exp()


def micro_batch_features(run, forward, batch, args, tokenizer):
    """One micro-batch's features (under the run's autocast), for `common.accumulated_backward`."""
    neg_texts, neg_valid = batch.get("neg_texts"), batch.get("neg_valid")
    if neg_texts is not None and args.mask_invalid == "cmr":
        neg_texts = release_placeholders(neg_texts, neg_valid, tokenizer)
    with run.autocast():   # the forward under autocast; the loss math in fp32 (as degla.py)
        image_emb, text_emb, neg_text_emb, logit_scale = forward(batch["images"], batch["texts"], neg_texts)
    return {"image": image_emb, "text": text_emb, "neg_text": neg_text_emb, "neg_valid": neg_valid,
            "logit_scale": logit_scale}


def batch_loss(features, current, theta, args):
    """CE-CLIP's loss on the whole global batch (micro-batches joined, then gathered over ranks, in fp32).
    Returns (loss, parts, logits for update_thresholds, the gathered neg_valid)."""
    f = common.join_micro_batches(features, current)
    image_emb = common.gather_features(common.upcast(f["image"]))
    text_emb = common.gather_features(common.upcast(f["text"]))
    neg_text_emb, neg_valid = f["neg_text"], f["neg_valid"]
    if neg_text_emb is not None:
        neg_text_emb = common.gather_features(common.upcast(neg_text_emb))
        neg_valid = common.gather_features(neg_valid.to(torch.uint8)).bool()
    loss, parts, logits = cehn_loss(image_emb, text_emb, neg_text_emb, neg_valid, common.upcast(f["logit_scale"]),
                                    theta, w_cmr=args.w_cmr, w_imc=args.w_imc, itc_hn=bool(args.itc_hn),
                                    imc_variant=args.imc_variant, mask_invalid=args.mask_invalid,
                                    type_names=neg_types(args))
    return loss, parts, logits, neg_valid


def backward(run, forward, micro_batches, theta, args, tokenizer, step=None):
    """The gradients of one optimizer step over --accum-freq micro-batches (`common.accumulated_backward`), with the
    thresholds theta fixed for the whole step. `forward`: CeForward, maybe DDP-wrapped.
    Returns (loss, parts, logits, neg_valid) of the whole batch."""
    return common.accumulated_backward(
        run, micro_batches, encode=lambda batch: micro_batch_features(run, forward, batch, args, tokenizer),
        loss_of=lambda features, current: batch_loss(features, current, theta, args),
        loss_scalars=[common.unwrap(forward).model.logit_scale], module=forward, step=step)


def release_placeholders(neg_texts, neg_valid, tokenizer):
    """--mask-invalid cmr: invalid slots become the text "###", as in the release (data.py puts the original
    caption there, which as an unmasked negative would contradict the positive)."""
    placeholder = tokenizer(["###"])[0].to(neg_texts.device)
    neg_texts = neg_texts.clone()
    neg_texts[~neg_valid] = placeholder
    return neg_texts


def neg_types(args):
    """The --neg-types list; one clear error for a name data.NEGATIVE_TYPES does not know."""
    types = [t.strip() for t in args.neg_types.split(",") if t.strip()]
    unknown = [t for t in types if t not in data.NEGATIVE_TYPES]
    if unknown or not types:
        raise SystemExit(f"--neg-types: unknown {unknown or 'empty list'}; known types: "
                         f"{', '.join(data.NEGATIVE_TYPES)} (CE-CLIP's are {', '.join(NEG_TYPES)})")
    return types


def uses_negatives(args):
    return bool(args.itc_hn or args.w_cmr or args.w_imc)


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train(args):
    # bad input stops here, before a model, a data set or a run folder exists (Run checks --resume)
    evaluation.check_benchmarks(args.eval, args.eval_root)
    types = neg_types(args)
    run = common.Run(args, method="cehn")
    device = run.device
    model, train_tf, val_tf, tokenizer = common.create_backbone(args.model, args.pretrained, device=device)
    model.set_grad_checkpointing(args.grad_checkpointing)   # open_clip's switch: less memory, same gradients
    train_set = data.build_train_set(args, train_tf, tokenizer)
    with_negatives = uses_negatives(args)
    if with_negatives:
        with common.main_process_first():   # rank 0 runs spaCy and writes the cache, the other ranks read it
            train_set = data.WithNegatives(train_set, types, progress=run.is_main)
        collate = lambda b: data.collate_negatives(b, tokenizer)  # noqa: E731
    else:
        collate = lambda b: data.collate_plain(b, tokenizer)  # noqa: E731

    before = evaluation.evaluate(model, tokenizer, val_tf, args.eval, root=args.eval_root, device=device) \
        if run.is_main and args.eval else None
    model.train()
    common.freeze_logit_bias(model)   # a SigLIP backbone's bias: no CE-CLIP loss reads it
    forward = CeForward(model)
    if run.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    total = run.total_steps(len(train_set))
    optimizer = common.make_optimizer(model, args.lr, args.wd)
    scheduler = common.cosine_schedule(optimizer, args.warmup, total)
    start, extra = common.resume(run, model, optimizer, scheduler)
    theta = torch.full((len(types),), float(args.theta_init), device=device)
    if "theta" in extra:
        theta = extra["theta"].to(device)
    last_epoch = extra.get("epoch")
    run.print(f"cehn: {total} steps, global batch {run.global_batch} ({args.batch_size} x {args.accum_freq} "
              f"micro-batches x {run.world_size} processes), itc_hn={args.itc_hn} "
              f"w_cmr={args.w_cmr} w_imc={args.w_imc} theta={args.threshold_type} imc={args.imc_variant} "
              f"mask_invalid={args.mask_invalid}")
    run.progress(total, initial=start)
    epoch = last_epoch
    collate = common.split_collate(collate, args.accum_freq)   # K micro-batches of --batch-size per step
    for step, epoch, micro_batches in common.batch_stream(train_set, collate, args.batch_size * args.accum_freq,
                                                          args.seed, start, total, args.workers):
        if args.theta_reset_per_epoch and last_epoch is not None and epoch != last_epoch:
            theta.fill_(float(args.theta_init))  # the release re-creates theta at every epoch
        last_epoch = epoch
        micro_batches = [{k: v.to(device) for k, v in mb.items()} for mb in micro_batches]
        optimizer.zero_grad(set_to_none=True)
        # loss x world size for the gathered features (DDP averages), the logit scale's gradient divided back
        _, parts, logits, neg_valid = backward(run, forward, micro_batches, theta, args, tokenizer, step)
        common.optimizer_step(run, optimizer)
        scheduler.step()
        common.clamp_logit_scale(model)
        # theta for the next step, from this (global, so identical on every rank) batch: the one-step lag
        if logits is not None:
            theta = update_thresholds(*logits, neg_valid, theta, args.threshold_type, args.fixed_threshold,
                                      args.upper_bound)
        if run.bar is not None:
            run.bar.update(1)
        thetas = {f"theta_{name}": value for name, value in zip(types, theta.tolist())}
        run.log(step, run.global_batch, **parts, **thetas, lr=scheduler.get_last_lr()[0],
                logit_scale=model.logit_scale.exp().item())  # every step: theta is the curriculum
        if run.should_save(step + 1):
            common.save_checkpoint(run, step + 1, model, optimizer, scheduler,
                                   extra={"theta": theta.cpu(), "epoch": epoch})
    common.save_checkpoint(run, total, model, optimizer, scheduler, extra={"theta": theta.cpu(), "epoch": epoch})
    run.close()
    if not run.is_main:
        return None
    model.eval()
    after = evaluation.evaluate(model, tokenizer, val_tf, args.eval, root=args.eval_root, device=device) \
        if args.eval else None
    common.export_open_clip(model, os.path.join(run.out, "final.pt"), args.model, tokenizer, meta={"method": "cehn"})
    if before is not None:
        evaluation.write_results(run.out, before, after, extra={"theta": theta.tolist()})
        print(evaluation.format_table(before, after))
    return {"before": before, "after": after, "out": run.out, "theta": theta.tolist()}


def parse_args(argv=None):
    p = common.base_parser("CE-CLIP: hard-negative ITC + cross-modal rank (CMR) + intra-modal contrast (IMC)")
    g = p.add_argument_group("CE-CLIP")
    g.add_argument("--itc-hn", type=int, default=None, help="1: the K negatives of every caption are extra "
                   "image->text ITC columns; 0: plain ITC")
    g.add_argument("--w-cmr", type=float, default=None, help="lambda_cmr (cross-modal rank loss)")
    g.add_argument("--w-imc", type=float, default=None, help="lambda_imc (intra-modal contrast)")
    g.add_argument("--threshold-type", default=None, choices=["mean", "max", "fixed"], help="CMR theta update")
    g.add_argument("--fixed-threshold", type=float, default=None, help="theta for --threshold-type fixed")
    g.add_argument("--upper-bound", type=float, default=None, help="theta is clipped to [0, upper bound] (logits)")
    g.add_argument("--theta-init", type=float, default=None, help="theta before the first update")
    g.add_argument("--theta-reset-per-epoch", type=int, default=None, help="1: reset theta every epoch (release)")
    g.add_argument("--imc-variant", default=None, choices=["own", "all", "release"],
                   help="own: caption's own valid negatives (default); all: every negative of the batch "
                        "(7f4433a); release: the HEAD form (target = first negative of the batch, a bug)")
    g.add_argument("--neg-types", default=None, help="comma-separated hard-negative types, one slot each (K = their "
                   f"number), from {', '.join(data.NEGATIVE_TYPES)}; 'spatial' (flip left/right, above/below) is "
                   "in neither paper, for ablations")
    g.add_argument("--mask-invalid", default=None, choices=["all", "cmr"],
                   help="all: invalid negatives masked in every term; cmr: only in CMR, as released")
    common.document_defaults(p, DEFAULTS)
    args = p.parse_args(argv)
    return common.apply_defaults(args, DEFAULTS)


def main(argv=None):
    return common.launch(train, parse_args(argv))


if __name__ == "__main__":
    main()
