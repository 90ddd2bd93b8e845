"""DeGLA: Decoupled Global-Local Alignment for compositional CLIP fine-tuning.

Paper: Hu et al., "Decoupled Global-Local Alignment for Improving Compositional Understanding", ACM MM 2025,
https://arxiv.org/abs/2504.16801 (spec with the code facts: ../shared/methods/degla.md).

The idea in five lines:
1. Fine-tune CLIP on captions plus K hard-negative captions per caption (swapped / replaced words, reordered
   phrases), with a NegCLIP-style global loss: the negatives join the image->text candidate set.
2. Hard-negative training makes CLIP forget its general knowledge, so a frozen-gradient EMA copy of the model
   (the teacher, initialised from the same weights) anchors every student embedding (self-distillation).
3. Image-Grounded Contrast (IGC): each image must prefer its caption over its *own* K negatives.
4. Text-Grounded Contrast (TGC): each student caption embedding must be closer to the teacher's embedding
   of the same caption than to the student embeddings of its own K negatives (pure text, no image).

Total loss (v = image, t = positive caption, n_{i,k} = k-th negative of caption i; * = EMA teacher;
s = learned CLIP logit scale; N = global batch; K = negatives per caption):

    L = L_global + lambda_d * L_distill + lambda_IGC * L_IGC + lambda_TGC * L_TGC,   (0.005, 0.1, 0.1)

    L_global  = 1/2 [ -1/N sum_i log softmax_{ {t_j} u {n_{j,k}} }(s v_i . t_i)        (image -> text, NegCLIP)
                      -1/N sum_i log softmax_{ {v_j} }(s t_i . v_i) ]                   (text -> image)
    L_distill = sum_i ||v_i - v*_i||^2 + sum_i ||t_i - t*_i||^2 + sum_{i,k} ||n_{i,k} - n*_{i,k}||^2
    L_IGC     = -1/N sum_i log  e^{s v_i.t_i} / (e^{s v_i.t_i} + sum_k e^{s v_i.n_{i,k}})
    L_TGC     = -1/N sum_i log  e^{t_i.t*_i/tau} / (e^{t_i.t*_i/tau} + sum_k e^{t_i.n_{i,k}/tau}),  tau = 0.1

Teacher update after every optimizer step: theta* <- alpha theta* + (1 - alpha) theta (alpha = 0.9996 on COCO).

Where the released code differs from the paper's intent (default = intent, flag = released behaviour):
- TGC negatives: the release builds the TGC mask by *tiling* (`repeat`) instead of interleaving, so caption i
  is contrasted with flattened negatives {i, N+i, 2N+i, 3N+i}, i.e. mostly *other* captions' negatives (the
  authors' own comment on that line asks whether it is correct). Default: caption i vs its own K negatives
  (the paper figure); `--tgc-mask tile_as_released` reproduces the release.
- Invalid negatives (a rule that did not apply to a caption: data.py marks them in `neg_valid`) are masked
  out of every loss. The released LLM negatives are all valid, so this changes nothing there.

Baselines from the same script: `--global-negatives 0 --distill-weight 0 --igc-weight 0 --tgc-weight 0` is
plain CLIP fine-tuning on the same images and captions (`--baseline plain` sets exactly that);
`--baseline negclip` keeps only the NegCLIP global loss.

Run:
    python degla.py                                   # shapes world, cached `shapes` base model, CPU, ~5 min
    python degla.py --baseline plain                  # plain CLIP fine-tuning, same data and budget
    python degla.py --data coco --data-root /data/coco --negatives DeGLA.json --gpus 8      # the paper's run
    torchrun --nproc_per_node 8 degla.py --data coco --data-root /data/coco                # same, via torchrun
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv-endpoint HOST:29500 degla.py --data coco --data-root ...
    python degla.py --resume runs/degla-...           # continue an interrupted run (teacher included)
    python eval.py --model ViT-B-32-quickgelu --pretrained runs/degla-.../final.pt --eval aro,sugarcrepe
"""
import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------
# Defaults. Real data: the paper's values (spec ../shared/methods/degla.md section 3, official script
# scripts/train_DeGLA.sh). Shapes: small values for a CPU run, see the comment on each.
# ---------------------------------------------------------------------------------------------------------
DEGLA_TYPES_RELEASED = ("reshuffle", "swap_nouns", "swap_adjs", "replace_adjs", "replace_nouns")

DEFAULTS = {
    "coco": dict(
        model="ViT-B-32-quickgelu",  # OpenAI ViT-B/32 uses QuickGELU (spec 4, sugar-crepe issue #7)
        pretrained="openai",         # student and teacher both start from it (main.py --teacher ViT-B-32)
        lr=1e-6,                     # train_DeGLA.sh
        betas=(0.9, 0.98), eps=1e-6, wd=0.1,  # train_DeGLA.sh / params.py
        warmup=50,                   # linear warm-up steps, then cosine to 0 (scheduler.py)
        epochs=5,                    # train_DeGLA.sh
        batch_size=32,               # per GPU, x 8 GPUs = 256 global
        ema_decay=0.9996,            # --ema_alpha 0.9996: time constant 1/(1-a) = 2500 of ~8k steps
        distill_weight=0.005,        # --distill_weight 0.005 (squared L2, sum reduction)
        igc_weight=0.1,              # loss.py CLIPloss_DeGLA
        tgc_weight=0.1,              # loss.py CLIPloss_DeGLA
        tgc_scale=10.0,              # hard-coded logit_scale = 10 in get_text_local_loss (tau = 0.1)
        num_negatives=4,             # DeGLA_dataset stacks enhanced[0..3]
        neg_types="swap_nouns,swap_adjs,replace_adjs,replace_nouns",  # which 4 of 5: unknown in the
                                     # release (spec 2.3); the four word-level types are our choice
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Losses: pure functions of (already gathered) L2-normalised features. No distributed calls in here.
# Layout of negatives everywhere: neg_text_emb[i, k] = k-th negative caption of sample i (N, K, D); flattened
# sample-major (row i*K + k) where a flat list is needed, as in the release.
# ---------------------------------------------------------------------------------------------------------
def _mask_invalid(logits, valid):
    """Set logits of invalid candidates to -inf (they then get zero probability and zero gradient)."""
    if valid is None:
        return logits
    return logits.masked_fill(~valid, float("-inf"))


def global_contrastive_loss(image_emb, pos_text_emb, neg_text_emb, logit_scale, neg_valid=None):
    """NegCLIP global loss L_global (spec 1.2).

        L_i2t = -1/N sum_i log [ e^{s v_i.t_i} / (sum_j e^{s v_i.t_j} + sum_{j,k} e^{s v_i.n_{j,k}}) ]
        L_t2i = -1/N sum_i log [ e^{s t_i.v_i} / sum_j e^{s t_i.v_j} ]
        L_global = (L_i2t + L_t2i) / 2

    Every image sees all positives and *all* hard negatives of the batch; negatives never act as queries.
    image_emb: (N, D) L2-normalised; pos_text_emb: (N, D) L2-normalised; neg_text_emb: (N, K, D)
    L2-normalised, or None (K = 0: plain CLIP InfoNCE); logit_scale: scalar tensor s = exp(learned log-scale);
    neg_valid: (N, K) bool or None (all valid).
    Returns (loss, {"global_i2t": float, "global_t2i": float}).
    """
    n = image_emb.shape[0]
    labels = torch.arange(n, device=image_emb.device)
    candidates = pos_text_emb
    candidate_valid = None
    if neg_text_emb is not None and neg_text_emb.shape[1] > 0:
        candidates = torch.cat([pos_text_emb, neg_text_emb.reshape(-1, neg_text_emb.shape[-1])])
        if neg_valid is not None:
            pos_valid = torch.ones(n, dtype=torch.bool, device=image_emb.device)
            candidate_valid = torch.cat([pos_valid, neg_valid.reshape(-1)])[None, :]
    logits_i2t = _mask_invalid(logit_scale * image_emb @ candidates.T, candidate_valid)  # (N, N + N*K)
    logits_t2i = logit_scale * pos_text_emb @ image_emb.T                                   # (N, N)
    loss_i2t = F.cross_entropy(logits_i2t, labels)
    loss_t2i = F.cross_entropy(logits_t2i, labels)
    loss = (loss_i2t + loss_t2i) / 2
    return loss, {"global_i2t": float(loss_i2t.detach()), "global_t2i": float(loss_t2i.detach())}


def distill_loss(image_emb, pos_text_emb, neg_text_emb, teacher_image_emb, teacher_pos_text_emb,
                 teacher_neg_text_emb, neg_valid=None):
    """Self-distillation to the EMA teacher L_distill (spec 1.3): squared L2, *summed* over batch and dims.

        L_distill = sum_i ||v_i - v*_i||^2 + sum_i ||t_i - t*_i||^2 + sum_{i,k} ||n_{i,k} - n*_{i,k}||^2

    Teacher embeddings are constants (detached here as well). On unit vectors ||a - b||^2 = 2 - 2 cos(a, b).
    image_emb, teacher_image_emb: (N, D); pos_text_emb, teacher_pos_text_emb: (N, D);
    neg_text_emb, teacher_neg_text_emb: (N, K, D) or None; all L2-normalised. neg_valid: (N, K) bool or None.
    Returns (loss, {"distill_image": float, "distill_text": float, "distill_neg": float}).
    """
    image_part = ((image_emb - teacher_image_emb.detach()) ** 2).sum()
    text_part = ((pos_text_emb - teacher_pos_text_emb.detach()) ** 2).sum()
    neg_part = image_part.new_zeros(())
    if neg_text_emb is not None and neg_text_emb.shape[1] > 0:
        per_negative = ((neg_text_emb - teacher_neg_text_emb.detach()) ** 2).sum(-1)  # (N, K)
        if neg_valid is not None:
            per_negative = per_negative * neg_valid.to(per_negative.dtype)
        neg_part = per_negative.sum()
    loss = image_part + text_part + neg_part
    return loss, {"distill_image": float(image_part.detach()), "distill_text": float(text_part.detach()),
                  "distill_neg": float(neg_part.detach())}


def igc_loss(image_emb, pos_text_emb, neg_text_emb, logit_scale, neg_valid=None):
    """Image-Grounded Contrast L_IGC (spec 1.4): per image a (1 + K)-way softmax over its own captions.

        L_IGC = -1/N sum_i log [ e^{s v_i.t_i} / (e^{s v_i.t_i} + sum_k e^{s v_i.n_{i,k}}) ]

    image_emb: (N, D); pos_text_emb: (N, D); neg_text_emb: (N, K, D); all L2-normalised, all student
    (gradients flow into both towers). logit_scale: scalar tensor s (the learned CLIP scale).
    neg_valid: (N, K) bool or None.  Returns (loss, {"igc": float}).
    """
    pos_sim = (image_emb * pos_text_emb).sum(-1, keepdim=True)                 # (N, 1)
    neg_sim = torch.einsum("nd,nkd->nk", image_emb, neg_text_emb)              # (N, K)
    logits = logit_scale * torch.cat([pos_sim, neg_sim], dim=1)                # (N, 1 + K)
    valid = None if neg_valid is None else torch.cat([torch.ones_like(neg_valid[:, :1]), neg_valid], 1)
    logits = _mask_invalid(logits, valid)
    loss = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    return loss, {"igc": float(loss.detach())}


def released_tgc_columns(n, k, device=None):
    """Flat (sample-major) negative indices the released TGC mask keeps for each caption: (N, K) long.

    The release builds the (N, N*K) negative mask as eye(N).repeat(1, K): row i keeps flat columns
    {i, N + i, 2N + i, ...}, which are negatives of samples floor((jN + i) / K) - mostly other samples'.
    """
    return torch.arange(k, device=device)[None, :] * n + torch.arange(n, device=device)[:, None]


def tgc_loss(pos_text_emb, teacher_pos_text_emb, neg_text_emb, scale=10.0, neg_valid=None, mask="own"):
    """Text-Grounded Contrast L_TGC (spec 1.5): anchor t_i, positive t*_i (teacher), negatives n_{i,k}.

        L_TGC = -1/N sum_i log [ e^{t_i.t*_i / tau} / (e^{t_i.t*_i / tau} + sum_k e^{t_i.n_{i,k} / tau}) ]

    with a fixed scale 1/tau = 10 (not the learned CLIP scale). Other captions' teacher embeddings are not
    candidates. The teacher embedding is a constant; anchor and negatives are student embeddings.
    pos_text_emb, teacher_pos_text_emb: (N, D); neg_text_emb: (N, K, D); all L2-normalised.
    neg_valid: (N, K) bool or None. mask: "own" = caption i's own K negatives (paper intent, default);
    "tile_as_released" = flat negatives {i, N+i, 2N+i, ...} (`released_tgc_columns`), as the official code.
    Returns (loss, {"tgc": float}).
    """
    n, k, dim = neg_text_emb.shape
    pos_sim = (pos_text_emb * teacher_pos_text_emb.detach()).sum(-1, keepdim=True)   # (N, 1)
    if mask == "own":
        negatives, valid = neg_text_emb, neg_valid
    elif mask == "tile_as_released":
        columns = released_tgc_columns(n, k, neg_text_emb.device)
        negatives = neg_text_emb.reshape(n * k, dim)[columns]                           # (N, K, D)
        valid = None if neg_valid is None else neg_valid.reshape(-1)[columns]
    else:
        raise ValueError(f"tgc mask must be 'own' or 'tile_as_released', got {mask!r}")
    neg_sim = torch.einsum("nd,nkd->nk", pos_text_emb, negatives)                      # (N, K)
    logits = scale * torch.cat([pos_sim, neg_sim], dim=1)
    if valid is not None:
        logits = _mask_invalid(logits, torch.cat([torch.ones_like(valid[:, :1]), valid], 1))
    loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=logits.device))
    return loss, {"tgc": float(loss.detach())}


def degla_loss(image_emb, pos_text_emb, neg_text_emb, logit_scale, teacher_image_emb=None,
               teacher_pos_text_emb=None, teacher_neg_text_emb=None, neg_valid=None, global_negatives=True,
               distill_weight=0.005, igc_weight=0.1, tgc_weight=0.1, tgc_scale=10.0, tgc_mask="own"):
    """Total DeGLA loss: L = L_global + lambda_d L_distill + lambda_IGC L_IGC + lambda_TGC L_TGC.

    Arguments as in the four loss functions above (student features, then teacher features; teacher
    features may be None when distill_weight == tgc_weight == 0; neg_text_emb may be None when no negatives
    are used at all). A term whose weight is 0 is not computed. global_negatives=False drops the hard
    negatives from L_global (with all weights 0 this is plain CLIP fine-tuning).
    Returns (loss, dict of float parts, including "total").
    """
    loss, parts = global_contrastive_loss(image_emb, pos_text_emb, neg_text_emb if global_negatives else None,
                                          logit_scale, neg_valid)
    parts["global"] = float(loss.detach())
    if distill_weight:
        term, more = distill_loss(image_emb, pos_text_emb, neg_text_emb, teacher_image_emb,
                                  teacher_pos_text_emb, teacher_neg_text_emb, neg_valid)
        loss = loss + distill_weight * term
        parts.update(more, distill=float(term.detach()))
    if igc_weight:
        term, more = igc_loss(image_emb, pos_text_emb, neg_text_emb, logit_scale, neg_valid)
        loss = loss + igc_weight * term
        parts.update(more)
    if tgc_weight:
        term, more = tgc_loss(pos_text_emb, teacher_pos_text_emb, neg_text_emb, tgc_scale, neg_valid, tgc_mask)
        loss = loss + tgc_weight * term
        parts.update(more)
    parts["total"] = float(loss.detach())
    return loss, parts
