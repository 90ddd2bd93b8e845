"""CE-CLIP: contrast intra-modal and rank cross-modal hard negatives.

Paper: Le Zhang, Rabiul Awal, Aishwarya Agrawal, "Contrasting Intra-Modal and Ranking Cross-Modal Hard Negatives
to Enhance Visio-Linguistic Compositional Understanding", CVPR 2024, https://arxiv.org/abs/2306.08832
(official code: github.com/lezhang7/Enhance-FineGrained). Spec: ../shared/methods/cehn.md.

The idea in five lines:
  * every caption T_i gets K = 4 rule-made hard negatives U_i^k, one per type k in the fixed order
    (relation = noun swap, attribute, object, action), each with a validity flag m_i^k;
  * ITC(hn): image->text InfoNCE over all G captions plus all G*K negatives of the (gathered) batch; text->image plain;
  * CMR: each image must rank its caption above each of its own valid negatives by a per-type margin theta_k,
    and theta_k follows the previous batch's mean positive-negative logit gap, clipped to [0, 10] (a curriculum);
  * IMC: the caption is contrasted against its hard-negative texts in the text space (positive = image-caption logit).

Total loss (S(a, b) = s <a, b>, s = exp(logit_scale), all features L2-normalised):

    L = L_itc(hn) + lambda_cmr * L_cmr + lambda_imc * L_imc,        lambda_cmr = 0.2, lambda_imc = 0.3

    L_itc(hn) = 1/2 [ -1/G sum_i log e^{S(v_i,t_i)} / (sum_j e^{S(v_i,t_j)} + sum_{j,k} m_j^k e^{S(v_i,u_j^k)})
                      -1/G sum_i log e^{S(t_i,v_i)} /  sum_j e^{S(t_i,v_j)} ]
    L_cmr     = 1/(G K) sum_{i,k} m_i^k max(0, theta_k + S(v_i,u_i^k) - S(v_i,t_i))
    L_imc     = -1/G sum_i log e^{S(v_i,t_i)} / (e^{S(v_i,t_i)} + sum_k m_i^k e^{S(t_i,u_i^k)})
    theta_k  <- clip( mean_i S(v_i,t_i) - mean_{i: m_i^k=1} S(v_i,u_i^k), 0, 10 )   (after each step, no grad)

Where the official code differs from the paper's intent (spec section 1.3 and section 5), the intent is the default
and a flag reproduces the release:
  * IMC: the released HEAD form is CE(s T U^T, target 0), which pulls every caption toward the first hard negative of
    the batch (issue #15). Default: the 7f4433a form above restricted to the caption's own valid negatives
    (`--imc-variant own`); `--imc-variant all` uses every negative of the batch (the 7f4433a form exactly);
    `--imc-variant release` is the HEAD form.
  * Invalid negatives: the release masks them only in CMR; ITC and IMC use the placeholder "###" as a negative.
    Default: masked everywhere (`--mask-invalid all`); `--mask-invalid cmr` reproduces the release, including
    feeding the text "###" for invalid slots.
  * theta is re-created (= 0) at the start of every epoch in the release; the paper's Fig. 5(b) shows it rising
    smoothly over ~5k steps (many epochs), so by default it persists (and is saved in checkpoints);
    `--theta-reset-per-epoch` reproduces the release.

Run:
    python cehn.py                                   # shapes world, cached `shapes` base model, CPU ok, <10 min
    python cehn.py --w-cmr 0 --w-imc 0 --itc-hn 0    # the baseline: plain CLIP fine-tuning on the same data
    python cehn.py --data coco --data-root DIR --gpus 8 --eval aro,sugarcrepe,valse
    torchrun --nnodes 2 --nproc-per-node 8 ... cehn.py --data coco --data-root DIR
    python cehn.py --resume OUT_DIR                  # continue the last checkpoint (model, optimiser, theta, ...)
"""
import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Defaults. Real data: the final release script (scripts/run_multiple_nodes.sh) and params.py, spec section 3.
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
)

REAL_DEFAULTS = dict(
    model="ViT-B-32-quickgelu", pretrained="openai",  # open_clip ViT-B-32 with OpenAI weights (QuickGELU)
    data="coco",             # COCO 2014 train captions, every caption is a sample (spec section 2)
    lr=5e-6, wd=0.1, beta1=0.9, beta2=0.98, eps=1e-6,  # AdamW, run_multiple_nodes.sh
    warmup=50,               # steps, then cosine (open_clip cosine_lr)
    batch_size=378,          # per GPU, x 4 A100 = 1512 global (run_multiple_nodes.sh)
    epochs=10,               # run_multiple_nodes.sh
    precision="amp_bf16",    # release used fp16 amp; bf16 autocast is the project's CUDA precision
)


# ----------------------------------------------------------------------------------------------------------------
# Losses: pure functions of (already gathered, L2-normalised) features.
# ----------------------------------------------------------------------------------------------------------------
def itc_hard_negative_loss(image_emb, text_emb, neg_text_emb, neg_valid, logit_scale, mask_invalid=True):
    """ITC with hard negatives (spec 1.1), NegCLIP-style with K negatives per caption.

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
    """Cross-modal rank loss with per-type thresholds (spec 1.2).

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
    """The adaptive CMR margins for the next step (spec 1.2, "Threshold update"); no gradient.

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
    """Intra-modal contrast of a caption against hard-negative captions (spec 1.3).

    own (default; the 7f4433a form restricted to the caption's own negatives):
        L = -1/G sum_i log e^{S(v_i,t_i)} / (e^{S(v_i,t_i)} + sum_k m_i^k e^{S(t_i,u_i^k)})
    all (the 7f4433a form, every negative of the batch):
        L = -1/G sum_i log e^{S(v_i,t_i)} / (e^{S(v_i,t_i)} + sum_{j,k} m_j^k e^{S(t_i,u_j^k)})
    release (HEAD 47cef4e, a bug kept for reproduction: the "target" is column 0 = the first negative of sample 0;
    the mask is never used):
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
              itc_hn=True, imc_variant="own", mask_invalid="all"):
    """The total CE-CLIP loss L = L_itc(hn) + w_cmr L_cmr + w_imc L_imc on a gathered batch.

    Arguments as in the three terms (all (G, ...) global tensors); mask_invalid: "all" (default) or "cmr" (release).
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
            for k, name in enumerate(NEG_TYPES[:neg_logit.shape[1]]):
                valid_k = neg_valid[:, k]
                if valid_k.any():
                    parts[f"gap_{name}"] = (pos_logit[valid_k] - neg_logit[valid_k, k]).mean().item()
    return loss, parts, logits
