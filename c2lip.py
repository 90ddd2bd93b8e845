"""C2LIP: concept-centric fine-tuning of CLIP/SigLIP, no hard negatives.

Paper: H. X. Pham, D. T. Hoffmann, R. Guerrero, B. Martinez, "No Hard Negatives Required: Concept Centric
Learning Leads to Compositionality without Degrading Zero-shot Capabilities of Contrastive Models",
CVPR 2026, arXiv 2603.25722. Official code: https://github.com/SamsungLabs/concept_centric_clip, not copied here
(the losses in src/open_clip/loss.py, class `C2LIP_Loss`; the per-token image embeddings in src/open_clip/model.py,
`att_pool_forward_wrapper`; the recipe in scripts/train_full_model_{wds,pkl}_data.sh).

The idea in five lines:
  1. Every caption is split into concepts: its noun phrases ("a small red circle"), found with spaCy.
  2. Each concept string is encoded on its own by the text tower: c_k = normalize(TextEncoder(concept_k)).
  3. L_npc: the global image embedding v_i must match the concepts of its own caption (several positives)
     and reject every other concept in the batch, with SigLIP's sigmoid loss.
  4. L_xac: a parameter-free cross-attention, with c_k as query over the image's patch embeddings, gives a
     concept-specific image vector v^_i(c_k) that must match c_k, with the same labels.
  5. Nothing is added at inference: the model is the plain CLIP/SigLIP it started from.

Total loss (t = logit scale, b = logit bias, l_ik = +1 if concept k comes from image i's caption, else -1), written
as the official loss.py (`C2LIP_Loss`) computes it; the paper's equation numbers are not given here:

    L = L_con + w_npc * L_npc + w_xac * L_xac,     w_npc = 1.0, w_xac = 0.01 (official scripts: --npc-loss-scale 1.
                                                   --xac-loss-scale 0.01)
    L_con = SigLIP loss  -(1/B) sum_ij log sigmoid(l_ij (t <v_i, y_j> + b))     for SigLIP models,
            CLIP InfoNCE (softmax over both directions)                          for CLIP models
    L_npc = -(1/N) sum_i sum_k log sigmoid(l_ik (t <v_i, c_k> + b))
    L_xac = -(1/N) sum_i sum_k log sigmoid(l_ik (t <v^_i(c_k), c_k> + b))
    v^_i(c_k) = normalize(sum_j a_ikj u_ij),  a_ikj = softmax_j(<c_k, u_ij> / tau),  tau = 1 (loss.py
                `func_attention(..., smooth=1.)`)

B images and N concepts are counted over the whole (gathered) batch; u_ij are the L2-normalized patch
embeddings of image i in the joint space:
  - CLIP towers: ln_post and the visual projection applied to every patch token (common.encode_image_tokens).
  - open_clip SigLIP towers (timm MAP head): the head's value path, output projection and residual MLP applied
    to every token, with the latent query/key attention skipped (MaskCLIP-style identity attention), as the
    official model.py does.

Scale and bias. SigLIP models use their own logit_scale and logit_bias for all three losses (paper). A CLIP
model has no bias, so it gets one new learnable bias b for the two sigmoid terms and shares its logit_scale
(the paper's single scale). This CLIP adaptation is inferred: the paper reports SigLIP only, and the official
params.py refuses the concept losses without --siglip. b starts "calibrated": at the value minimizing L_npc
on the first batch (where a learned SigLIP bias would settle). SigLIP's from-scratch init (b = -10, and with
`--concept-scale own` a separate t = 10) is one flag away (`--concept-bias-init -10`); on the shapes world it
leaves every concept logit far below 0, so only the positives get gradient (the loss just pulls images to
their concepts) and, at fine-tuning learning rates over a few hundred steps, b cannot move (measured at lr
1e-4: docs/results_c2lip.md). These scalars are training-only: saved in checkpoints, not part of the exported
open_clip weights.

Differences from the official code (the paper's intent is the default):
  - NPC uses the gathered image embeddings. The release uses the local ones with global concept indices,
    which indexes out of bounds on more than one GPU (no flag: it would only reproduce a crash).
  - XAC is one batched einsum over chunks of concepts (memory bounded by --xac-chunk); the release loops over
    concepts with one bmm each. Same numbers (tests/test_c2lip.py); `python -m lab.bench --only c2lip_xac`
    measures the speed ratio.
  - Concepts are spaCy noun chunks (data.extract_concepts); the paper's extractor is proprietary and the
    repo substitutes an LLM prompt. A caption without concepts falls back to the whole caption (as the repo).
  - Patch embeddings of CLIP towers (inferred, the paper covers SigLIP only): normalize(ln_post(x_j) @ proj) for
    every patch token x_j of the last block, i.e. CLIP's own pooling head applied per token, no new parameters.
    The closer analogue of the SigLIP trick, MaskCLIP-style identity attention in the last residual block, is not
    implemented; the paper trains SigLIP, where the MAP head's value path is the method as published (above).
  - Precision: bf16 autocast with fp32 master weights (project-wide). The release casts the whole model to
    bf16 weights (`--precision bf16` in its scripts; open_clip's src/open_clip/factory.py does the cast), and AdamW
    then updates bf16 weights directly: an lr 1e-5 step is below half a bf16 ulp of any weight above ~3e-3, so many
    updates round away (our inference; the paper does not discuss it).

Run:
    python c2lip.py                                          # shapes world, shipped SigLIP base, CPU ok
    python c2lip.py --w-npc 0 --w-xac 0                      # the baseline: plain SigLIP fine-tuning, same data
    python c2lip.py --model shapes-tiny-vit                  # the CLIP adaptation, on the shipped CLIP base
    python c2lip.py --data coco --data-root DIR --gpus 8     # paper settings (SigLIP ViT-B/16 webli)
    python c2lip.py --data coco --data-root DIR --gpus 8 --model ViT-B-32-quickgelu --pretrained openai
    torchrun --nproc_per_node 8 c2lip.py --data coco --data-root DIR          # same, launched by torchrun
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 c2lip.py --data coco --data-root DIR
    python c2lip.py --resume runs/c2lip-shapes-<time>                  # continue an interrupted run (its folder)
    python eval.py --model local-dir:runs/c2lip-... --bench sugarcrepe,zeroshot --root DIR   # the exported model
"""
import argparse
import math
import os
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import common
import data
import eval as evaluation

# ----------------------------------------------------------------------------------------------------------
# Defaults. Real data: the paper's recipe (https://github.com/SamsungLabs/concept_centric_clip:
# scripts/train_full_model_{wds,pkl}_data.sh, src/main.py, src/training/params.py).
# Shapes: the project-wide shapes budget (common.SHAPES_DEFAULTS) so every method runs at the same cost, on the
# shipped SigLIP base (C2LIP_SHAPES).
# ----------------------------------------------------------------------------------------------------------
PAPER_DEFAULTS = dict(
    model="ViT-B-16-SigLIP",  # open_clip CustomTextCLIP, timm vit_base_patch16_siglip_224 + MAP head (paper)
    pretrained="webli",  # SigLIP WebLI weights (paper); needs the network on first use
    lr=1e-5,  # peak learning rate (official scripts)
    wd=0.1,  # AdamW weight decay, not on biases/norms/scale (open_clip_train default used by the scripts)
    warmup=50,  # linear warmup steps, then cosine (official scripts)
    epochs=5,  # CC3M epochs (official scripts); 8 GPUs x 96 = 768 global batch
    batch_size=96,  # per GPU (official scripts)
    eval="sugarcrepe,zeroshot,retrieval",  # the paper's benchmark families (SugarCrepe, ImageNet, COCO/Flickr)
    save_every=1000,
    seed=42,  # official scripts
)
C2LIP_DEFAULTS = dict(
    w_npc=1.0,  # weight of L_npc (official --npc-loss-scale)
    w_xac=0.01,  # weight of L_xac (official --xac-loss-scale)
    xac_temperature=1.0,  # tau of the concept->patch softmax (official smooth=1, no extra scaling)
    xac_chunk=64,  # concepts per einsum chunk: bounds XAC memory to chunk x B x max(P, D) (the release loops)
    concept_scale="shared",  # CLIP models: the model's logit_scale (one scale for all losses, as the paper) or 'own'
    concept_bias_init="calibrate",  # CLIP models: the L_npc-minimizing bias on the first batch, or a number
    #                                (-10 = SigLIP's from-scratch init; measured: negatives get no gradient)
    mask_duplicates=0,  # paper: a repeated phrase from another caption stays a negative
    concept_scale_init=math.log(10.0),  # 'own' scale: SigLIP's from-scratch init_logit_scale (open_clip_train --siglip)
    xac_recompute=False,  # same losses and gradients either way; on trades compute for autograd memory
)


C2LIP_SHAPES = dict(
    model=common.SHAPES_SIGLIP_MODEL,  # the shipped SigLIP base, as the paper fine-tunes SigLIP
    #                                    (--model shapes-tiny-vit: the CLIP adaptation on the shipped CLIP base)
    mask_duplicates=1,  # the shapes world repeats every phrase many times per batch: drop those false negatives
)


# ----------------------------------------------------------------------------------------------------------
# Losses: pure functions of gathered, L2-normalized features. No distributed calls inside.
# ----------------------------------------------------------------------------------------------------------
def concept_labels(concept_owner, num_images):
    """l_ik = +1 if concept k was extracted from image i's caption, else -1.

    concept_owner: (N,) long, index of each concept's image in the batch. Returns (B, N) float in {-1, +1}.
    """
    images = torch.arange(num_images, device=concept_owner.device)
    return (images[:, None] == concept_owner[None, :]).float() * 2.0 - 1.0


def duplicate_concept_mask(concept_owner, concept_words, num_images, subsets=False):
    """(B, N) bool: False where concept k is a false negative for image i: it belongs to another image but
    repeats one of image i's own concepts (or, with subsets=True, says less than one of them).

    "a red circle" from caption 3 against image 5, whose caption says "the red circle", is a copy; against an
    image whose caption says "the small red circle" it is a subset: in both cases the phrase is true of image i.
    The paper keeps such pairs as negatives (rare in CC3M). In the shapes world a batch of 64 holds ~2.4
    positives per image and ~3.9 phrases from other captions that are true of it (scene-graph count,
    docs/results_c2lip.md); copies account for ~2.0 of them, subsets for ~1.3 more.
    concept_words: (N, W) long, each concept's content words as sorted ids padded with -1 (`concept_words`).
    """
    own = F.one_hot(concept_owner, num_images).t().to(torch.float32)      # (B, N): concept j belongs to image i
    if subsets:
        # covered[k, j]: every word of k is a word of j (padding counts as covered)
        found = (concept_words[:, None, :, None] == concept_words[None, :, None, :]).any(-1)   # (N, N, W)
        covered = (found | (concept_words[:, None, :] < 0)).all(-1)
    else:
        covered = (concept_words[:, None, :] == concept_words[None, :, :]).all(-1)             # same word set
    false_negative = (own @ covered.t().to(torch.float32)) > 0          # image i owns a j that covers k
    return ~false_negative | (concept_labels(concept_owner, num_images) > 0)


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias):
    """SigLIP's sigmoid loss on image-caption pairs (paper L_con for SigLIP models; computed on the gathered B x B
    matrix as the official loss.py `C2LIP_Loss`, the same formula as open_clip's src/open_clip/loss.py `SigLipLoss`).

    L_con = -(1/B) sum_i sum_j log sigmoid(l_ij (t <v_i, y_j> + b)),  l_ij = +1 if i == j else -1.
    image_emb: (B, D) L2-normalized v_i; text_emb: (B, D) L2-normalized y_j (row i is image i's caption);
    logit_scale: scalar tensor t (already exponentiated); logit_bias: scalar tensor b.
    """
    logits = logit_scale * image_emb @ text_emb.t() + logit_bias
    labels = 2.0 * torch.eye(len(image_emb), device=logits.device, dtype=logits.dtype) - 1.0
    loss = -F.logsigmoid(labels * logits).sum() / len(image_emb)
    return loss, {"con": loss.item()}


def npc_loss(image_emb, concept_emb, concept_owner, logit_scale, logit_bias, pair_mask=None):
    """Noun-phrase concept loss: multi-positive sigmoid loss, global image embedding vs every concept (the
    official loss.py `C2LIP_Loss`, on the gathered image embeddings: the release indexes its local ones).

    L_npc = -(1/N) sum_{i=1..B} sum_{k=1..N} log sigmoid(l_ik (t <v_i, c_k> + b)).
    image_emb: (B, D) L2-normalized v_i; concept_emb: (N, D) L2-normalized c_k; concept_owner: (N,) long in
    [0, B); logit_scale t and logit_bias b: scalar tensors. A phrase that occurs in two captions is a positive
    for its own image only (no deduplication, as in the paper). pair_mask: optional (B, N) bool, False drops the
    pair (i, k) from the sum (see `duplicate_concept_mask`); the normalizer stays N.
    """
    logits = logit_scale * image_emb @ concept_emb.t() + logit_bias
    labels = concept_labels(concept_owner, len(image_emb)).to(logits.dtype)
    terms = F.logsigmoid(labels * logits)
    if pair_mask is not None:
        terms = terms * pair_mask.to(terms.dtype)
    loss = -terms.sum() / len(concept_emb)
    return loss, {"npc": loss.item()}


def xac_attention(patch_emb, concept_emb, temperature=1.0):
    """The attention weights of XAC's parameter-free cross-attention: each concept is the query over each image's
    patches, with the patch embeddings themselves as keys (no projections, no parameters).

    a_ikj = softmax_j(<c_k, u_ij> / tau)
    patch_emb: (B, P, D) L2-normalized u_ij; concept_emb: (K, D) L2-normalized c_k; temperature: tau.
    Returns (K, B, P), each row summing to 1 over the P patches (`python -m lab.figures --kind c2lip` draws it).
    """
    sim = torch.einsum("kd,bpd->kbp", concept_emb, patch_emb)  # (K, B, P)
    return torch.softmax(sim / temperature, dim=-1)


def xac_similarity(patch_emb, concept_emb, temperature=1.0, chunk_size=64, recompute=False):
    """Parameter-free cross-modal attention pooling, scored against the query concept (the official loss.py
    `func_attention(..., raw_feature_norm="no_norm", smooth=1.)`, vectorised).

    s_ikj = <c_k, u_ij>;  a_ikj = softmax_j(s_ikj / tau);  p_ik = sum_j a_ikj u_ij;  v^_i(c_k) = p_ik / |p_ik|
    returns cos_ik = <v^_i(c_k), c_k> as a (B, N) tensor.
    patch_emb: (B, P, D) L2-normalized u_ij; concept_emb: (N, D) L2-normalized c_k; temperature: tau.
    Concepts are processed chunk_size at a time with two einsums (no loop over single concepts), so the
    intermediate tensors are at most chunk_size x B x max(P, D). With recompute=True each chunk runs under
    activation checkpointing, which also bounds what autograd keeps for the backward pass (at the cost of a
    second forward of this cheap function).
    """

    def score_chunk(patches, concepts):
        attn = xac_attention(patches, concepts, temperature)  # (K, B, P)
        pooled = F.normalize(torch.einsum("kbp,bpd->kbd", attn, patches), dim=-1)  # (K, B, D)
        return torch.einsum("kbd,kd->bk", pooled, concepts)  # (B, K)

    columns = []
    for start in range(0, len(concept_emb), chunk_size):
        chunk = concept_emb[start:start + chunk_size]
        if recompute and torch.is_grad_enabled():
            columns.append(torch.utils.checkpoint.checkpoint(score_chunk, patch_emb, chunk, use_reentrant=False))
        else:
            columns.append(score_chunk(patch_emb, chunk))
    return torch.cat(columns, dim=1)


def xac_loss(patch_emb, concept_emb, concept_owner, logit_scale, logit_bias, temperature=1.0, chunk_size=64,
             recompute=False, pair_mask=None):
    """Cross-attention concept loss: the concept-pooled image vector against its query concept (the official
    loss.py `C2LIP_Loss`).

    L_xac = -(1/N) sum_{i=1..B} sum_{k=1..N} log sigmoid(l_ik (t <v^_i(c_k), c_k> + b))   (v^ from xac_similarity).
    patch_emb: (B, P, D) L2-normalized; concept_emb: (N, D) L2-normalized; concept_owner: (N,) long in [0, B);
    logit_scale t, logit_bias b: scalar tensors. Negatives: image i' != owner pooled by concept k.
    pair_mask: optional (B, N) bool as in `npc_loss`.
    """
    logits = logit_scale * xac_similarity(patch_emb, concept_emb, temperature, chunk_size, recompute) + logit_bias
    labels = concept_labels(concept_owner, len(patch_emb)).to(logits.dtype)
    terms = F.logsigmoid(labels * logits)
    if pair_mask is not None:
        terms = terms * pair_mask.to(terms.dtype)
    loss = -terms.sum() / len(concept_emb)
    return loss, {"xac": loss.item()}


def c2lip_loss(image_emb, text_emb, patch_emb, concept_emb, concept_owner, logit_scale, logit_bias,
               concept_scale, concept_bias, w_npc=1.0, w_xac=0.01, temperature=1.0, chunk_size=64,
               recompute=False, pair_mask=None):
    """Total C2LIP loss L = L_con + w_npc L_npc + w_xac L_xac (shapes as in the functions above).

    logit_bias is None for CLIP models: L_con is then CLIP's InfoNCE with scale logit_scale; otherwise it is
    the SigLIP loss with (logit_scale, logit_bias). The concept losses use (concept_scale, concept_bias), which
    for SigLIP models are the same two scalars. A zero weight skips its term (w_npc = w_xac = 0 is plain
    fine-tuning).
    """
    if logit_bias is None:
        loss = common.clip_loss(image_emb, text_emb, logit_scale)
        parts = {"con": loss.item()}
    else:
        loss, parts = siglip_loss(image_emb, text_emb, logit_scale, logit_bias)
    if w_npc:
        npc, npc_parts = npc_loss(image_emb, concept_emb, concept_owner, concept_scale, concept_bias, pair_mask)
        loss = loss + w_npc * npc
        parts.update(npc_parts)
    if w_xac:
        xac, xac_parts = xac_loss(patch_emb, concept_emb, concept_owner, concept_scale, concept_bias,
                                  temperature, chunk_size, recompute, pair_mask)
        loss = loss + w_xac * xac
        parts.update(xac_parts)
    parts["loss"] = loss.item()
    return loss, parts


# ----------------------------------------------------------------------------------------------------------
# Model glue: concept embeddings, patch embeddings (CLIP and SigLIP towers), the concept logit scalars.
# ----------------------------------------------------------------------------------------------------------
class ConceptLogits(nn.Module):
    """The sigmoid scale t and bias b of L_npc / L_xac for a CLIP model (SigLIP models use their own).

    mode 'shared': t is the CLIP model's logit_scale and one new learnable bias b is added (the paper uses one
    scale for all three losses). mode 'own': also a new learnable log-scale (init ln 10, SigLIP's from-scratch
    value). bias_init: a number, or 'calibrate': before the first step `calibrate_` sets b to the value that
    minimizes L_npc on the first (gathered) training batch, every other weight fixed (20 Newton steps from b = 0
    on a convex function of one variable; pairs dropped by pair_mask do not count). That is where a learned SigLIP bias
    would settle, not the midpoint of the positive and negative logits: with about B negatives per positive
    it lies well below the midpoint (b = -12.4 on the first batch of the shipped CLIP base in the comparison run,
    lab/results/compare/c2lip-clip-seed0/stdout.txt).
    Why: SigLIP's b = -10 with t = 10 (or a tiny CLIP's t ~ 15) puts every concept logit far below 0, so
    negatives get almost no gradient and at fine-tuning learning rates (measured at 1e-4) the bias cannot move
    in a short fine-tuning run.
    """

    def __init__(self, mode="shared", scale_init=math.log(10.0), bias_init="calibrate"):
        super().__init__()
        self.mode = mode
        calibrate = bias_init == "calibrate"
        self.logit_bias = nn.Parameter(torch.tensor(0.0 if calibrate else float(bias_init)))
        self.logit_scale = nn.Parameter(torch.tensor(float(scale_init))) if mode == "own" else None
        self.register_buffer("needs_calibration", torch.tensor(calibrate))  # saved, so --resume does not redo it

    def forward(self, model_logit_scale):
        scale = model_logit_scale if self.logit_scale is None else self.logit_scale.exp()
        return scale, self.logit_bias

    @torch.no_grad()
    def calibrate_(self, scale, image_emb, concept_emb, concept_owner, pair_mask=None, newton_steps=20):
        """Set b to the minimizer of L_npc over one (gathered) batch, the other weights fixed (1-D, convex).

        This is the value a learned SigLIP bias settles at: with about B negatives per positive it is well below
        the midpoint of the positive and negative logits."""
        base = scale * image_emb @ concept_emb.t()
        labels = concept_labels(concept_owner, len(image_emb)).to(base.dtype)
        weight = torch.ones_like(base) if pair_mask is None else pair_mask.to(base.dtype)
        bias = torch.zeros((), dtype=base.dtype, device=base.device)
        for _ in range(newton_steps):  # d/db -log sigmoid(l (s + b)) = -l sigmoid(-l (s + b))
            z = labels * (base + bias)
            grad = -(weight * labels * torch.sigmoid(-z)).sum()
            hess = (weight * torch.sigmoid(z) * torch.sigmoid(-z)).sum().clamp_min(1e-12)
            bias = bias - grad / hess
        self.logit_bias.fill_(float(bias))
        self.needs_calibration.fill_(False)

    @torch.no_grad()
    def clamp_(self):
        if self.logit_scale is not None:  # same [0, ln 100] clamp as the model's scale (official train.py)
            self.logit_scale.clamp_(0, math.log(100))


def is_siglip_tower(model):
    """True for open_clip towers whose timm trunk pools with a MAP head (AttentionPoolLatent)."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    return getattr(trunk, "attn_pool", None) is not None and hasattr(trunk.attn_pool, "kv")


def encode_image_siglip_tokens(model, images):
    """Pooled embedding and per-token embeddings of an open_clip timm tower with a MAP head (SigLIP).

    Normal output: o = proj(MHA(latent, W_k x, W_v x)); v = o + MLP(LN(o)). Per-token (the official
    src/open_clip/model.py, `att_pool_forward_wrapper`):
    u_j = proj(W_v x_j + b_v); u_j <- u_j + MLP(LN(u_j)), i.e. the same head with the latent query-key
    attention replaced by identity. x_j are the trunk tokens after its final norm (the MAP head's input).
    Returns (pooled (B, D), tokens (B, P, D)), joint space, not normalized.
    """
    visual = model.visual
    trunk = visual.trunk
    tokens = trunk.forward_features(images)
    pooled = visual.head(trunk.forward_head(tokens))
    head = trunk.attn_pool
    if not trunk.pool_include_prefix:
        tokens = tokens[:, trunk.num_prefix_tokens:]
    if head.pos_embed is not None:
        tokens = tokens + head.pos_embed.unsqueeze(0).to(tokens.dtype)
    width = head.kv.out_features // 2
    values = head.kv(tokens)[..., width:]  # the per-head values, concatenated in head order
    per_token = head.proj(values)
    per_token = per_token + head.mlp(head.norm(per_token))
    per_token = visual.head(trunk.head(trunk.fc_norm(per_token)))  # identities for SigLIP, kept for generality
    return pooled, per_token


def encode_image_with_patches(model, images):
    """(pooled (B, D), patches (B, P, D)), both L2-normalized, for CLIP or SigLIP towers."""
    if is_siglip_tower(model):
        pooled, patches = encode_image_siglip_tokens(model, images)
    else:
        pooled, patches = common.encode_image_tokens(model, images)
    return F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1)


CONCEPT_WORDS = 8   # content words kept per concept for the false-negative mask (longer phrases: the first 8)


def concept_words(text, width=CONCEPT_WORDS):
    """Content words of a phrase as a fixed-width row of ids: sorted crc32 of each lower-case word, articles
    and punctuation dropped, padded with -1. Equal rows = the same phrase up to case, articles, punctuation
    and word order; a row whose ids all occur in another row says less than that phrase."""
    words = {w.strip(".,;:!?\"'") for w in text.lower().split()} - {"", "a", "an", "the"}
    ids = sorted(zlib.crc32(w.encode()) for w in words)[:width]
    return ids + [-1] * (width - len(ids))


def collate_with_words(batch, tokenizer):
    """data.collate_concepts plus "concept_words": (C, CONCEPT_WORDS) long, `concept_words` of each concept."""
    out = data.collate_concepts(batch, tokenizer)
    out["concept_words"] = torch.tensor([concept_words(c) for sample in batch for c in sample["concepts"]],
                                        dtype=torch.long)
    return out


def gather_concepts(concept_emb, concept_owner, local_batch_size, concept_words=None):
    """All ranks' concepts in rank order; the local slice keeps its gradient; owners index the gathered batch.

    concept_emb: (N_local, D); concept_owner: (N_local,) long in [0, local_batch_size); concept_words: optional
    (N_local, W) long, gathered alongside. Counts differ per rank, so the concepts are padded to the largest
    count, gathered with common.gather_features and un-padded. Returns (emb, owner, words).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_initialized() \
            or torch.distributed.get_world_size() == 1:
        return concept_emb, concept_owner, concept_words
    world = torch.distributed.get_world_size()
    device = concept_emb.device
    sizes = torch.tensor([len(concept_emb), local_batch_size], device=device, dtype=torch.long)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    torch.distributed.all_gather(all_sizes, sizes)
    counts = [int(s[0]) for s in all_sizes]
    image_offsets = torch.tensor([0] + [int(s[1]) for s in all_sizes], device=device).cumsum(0)
    longest = max(counts)
    pad = longest - len(concept_emb)

    def gather_long(values):
        padded = torch.cat([values, values.new_zeros((pad,) + values.shape[1:])])
        parts = [torch.zeros_like(padded) for _ in range(world)]
        torch.distributed.all_gather(parts, padded)
        return [part[:counts[r]] for r, part in enumerate(parts)]

    padded_emb = torch.cat([concept_emb, concept_emb.new_zeros(pad, concept_emb.shape[1])])
    all_emb = common.gather_features(padded_emb)  # (world * longest, D), local slice differentiable
    emb = torch.cat([all_emb[r * longest:r * longest + counts[r]] for r in range(world)])
    owner = torch.cat([part + image_offsets[r] for r, part in enumerate(gather_long(concept_owner))])
    words = torch.cat(gather_long(concept_words)) if concept_words is not None else None
    return emb, owner, words


class C2lipForward(nn.Module):
    """One training forward (a module, so DDP sees every parameter, including the concept scale/bias).

    Returns L2-normalized image (B, D), caption (B, D), patch (B, P, D) and concept (C, D) embeddings. The
    captions and the concepts go through the text tower in one call (same result, one pass on the CPU).
    With both concept weights at 0 only images and captions are encoded: a plain fine-tuning step."""

    def __init__(self, model, concept_logits=None, with_concepts=True, with_patches=True):
        super().__init__()
        self.model, self.concept_logits = model, concept_logits
        self.with_concepts, self.with_patches = with_concepts, with_patches

    def forward(self, images, texts, concepts=None):
        if self.with_patches:
            image_emb, patch_emb = encode_image_with_patches(self.model, images)
        else:
            image_emb, patch_emb = F.normalize(self.model.encode_image(images), dim=-1), None
        if self.with_concepts:
            text_emb = F.normalize(self.model.encode_text(torch.cat([texts, concepts])), dim=-1)
            text_emb, concept_emb = text_emb[:len(texts)], text_emb[len(texts):]
        else:
            text_emb, concept_emb = F.normalize(self.model.encode_text(texts), dim=-1), None
        return {"image": image_emb, "text": text_emb, "patch": patch_emb, "concept": concept_emb,
                "scales": self.scales()}

    def scales(self):
        """(t, b) of the main loss and (t, b) of the concept losses; b is None for a CLIP main loss."""
        scale, bias = self.model.logit_scale.exp(), getattr(self.model, "logit_bias", None)
        if self.concept_logits is None:
            return scale, bias, scale, bias
        return (scale, bias) + tuple(self.concept_logits(scale))


def micro_batch_features(run, forward, batch):
    """One micro-batch's features (under the run's autocast), for `common.accumulated_backward`: rows of images,
    captions and concepts (with their owner, an index into this micro-batch's images) and the four scalars."""
    with run.autocast():   # the forward under autocast; calibration and loss math in fp32
        out = forward(batch["images"], batch["texts"], batch.get("concepts"))
    scale, bias, concept_scale, concept_bias = out["scales"]
    return {"image": out["image"], "text": out["text"], "patch": out["patch"], "concept": out["concept"],
            "concept_owner": batch.get("concept_owner"), "concept_words": batch.get("concept_words"),
            "logit_scale": scale, "logit_bias": bias, "concept_scale": concept_scale, "concept_bias": concept_bias}


def batch_loss(features, current, args, concept_logits=None, run=None):
    """C2LIP's loss on the whole global batch: micro-batches joined (concept owners shifted to index the joined
    images), gathered over ranks, in fp32. Calibrates the concept bias on the first batch when asked to.
    Returns (loss, parts, number of concepts in the global batch)."""
    start = 0
    shifted = []
    for f in features:   # owner i of micro-batch j is image start_j + i of the joined batch
        owner = f["concept_owner"]
        shifted.append({**f, "concept_owner": None if owner is None else owner + start})
        start += len(f["image"])
    f = common.join_micro_batches(shifted, current)
    image_emb = common.gather_features(common.upcast(f["image"]))
    text_emb = common.gather_features(common.upcast(f["text"]))
    patch_emb = common.gather_features(common.upcast(f["patch"])) if f["patch"] is not None else None
    concept_emb = concept_owner = pair_mask = None
    if f["concept"] is not None:
        concept_emb, concept_owner, words = gather_concepts(common.upcast(f["concept"]), f["concept_owner"],
                                                            len(f["image"]), f["concept_words"])
        if args.mask_duplicates:
            pair_mask = duplicate_concept_mask(concept_owner, words, len(image_emb), subsets=args.mask_duplicates == 2)
    scale, bias, concept_scale, concept_bias = (common.upcast(f[k]) for k in
                                                ("logit_scale", "logit_bias", "concept_scale", "concept_bias"))
    if concept_logits is not None and bool(concept_logits.needs_calibration):
        concept_logits.calibrate_(concept_scale.detach(), image_emb.detach(), concept_emb.detach(), concept_owner,
                                  pair_mask)   # in place: concept_bias is that parameter
        if run is not None:
            run.print(f"concept bias calibrated on the first batch: b = {concept_logits.logit_bias.item():.3f}")
    loss, parts = c2lip_loss(image_emb, text_emb, patch_emb, concept_emb, concept_owner, scale, bias, concept_scale,
                             concept_bias, args.w_npc, args.w_xac, args.xac_temperature, args.xac_chunk,
                             recompute=args.xac_recompute, pair_mask=pair_mask)
    return loss, parts, 0 if concept_emb is None else len(concept_emb)


def backward(run, forward, micro_batches, args, step=None):
    """The gradients of one optimizer step over --accum-freq micro-batches (`common.accumulated_backward`).
    `forward`: C2lipForward, maybe DDP-wrapped. Returns (loss, parts, concepts) of the whole batch."""
    module = common.unwrap(forward)
    # the scalars the loss reads directly (scale, SigLIP bias, concept scale and bias): common.accumulated_backward
    scalars = [module.model.logit_scale, getattr(module.model, "logit_bias", None)]
    if module.concept_logits is not None:
        scalars += list(module.concept_logits.parameters())
    return common.accumulated_backward(
        run, micro_batches, encode=lambda batch: micro_batch_features(run, forward, batch),
        loss_of=lambda features, current: batch_loss(features, current, args, module.concept_logits, run),
        loss_scalars=scalars, module=forward, step=step)


def target_metric(metrics):
    """The shapes-world target of C2LIP: mean of swap-att, replace-att and ADD (= mean of add-obj, add-att)."""
    add = (metrics["add_obj"] + metrics["add_att"]) / 2
    return (metrics["swap_att"] + metrics["replace_att"] + add) / 3


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def _defaults():
    shapes = dict(common.SHAPES_DEFAULTS, **C2LIP_DEFAULTS)
    shapes.update(C2LIP_SHAPES)
    real = dict(C2LIP_DEFAULTS, **PAPER_DEFAULTS)
    return {"shapes": shapes, "real": real}


def train(args):
    # bad input stops here, before a model, a data set or a run folder exists (Run checks --resume)
    evaluation.check_benchmarks(args.eval, args.eval_root)
    run = common.Run(args, method="c2lip")
    device = run.device
    model, train_tf, val_tf, tokenizer = common.create_backbone(args.model, args.pretrained, device=device)
    model.set_grad_checkpointing(args.grad_checkpointing)   # open_clip's switch: less memory, same gradients
    dataset = data.build_train_set(args, train_tf, tokenizer)
    with_concepts = bool(args.w_npc or args.w_xac)
    if with_concepts:
        with common.main_process_first():   # rank 0 runs spaCy and writes the cache, the other ranks read it
            dataset = data.WithConcepts(dataset, cache_dir=os.path.join(common.cache_dir(), "concepts"),
                                        progress=run.is_main and not args.no_progress)
    before = evaluation.evaluate(model, tokenizer, val_tf, args.eval, root=args.eval_root, device=device) \
        if run.is_main and args.eval else None

    siglip = getattr(model, "logit_bias", None) is not None
    concept_logits = None
    if with_concepts and not siglip:
        concept_logits = ConceptLogits(args.concept_scale, args.concept_scale_init, args.concept_bias_init).to(device)
    model.train()
    forward = C2lipForward(model, concept_logits, with_concepts, with_patches=bool(args.w_xac))
    total = run.total_steps(len(dataset))
    optimizer = common.make_optimizer(forward, args.lr, args.wd)
    scheduler = common.cosine_schedule(optimizer, args.warmup, total)
    start, _ = common.resume(run, forward, optimizer, scheduler)  # the concept scale/bias live in `forward`
    ddp = forward
    if run.world_size > 1:
        ddp = nn.parallel.DistributedDataParallel(forward, device_ids=[device.index] if device.type == "cuda" else None)
    if with_concepts:
        collate = lambda batch: collate_with_words(batch, tokenizer)  # noqa: E731
    else:
        collate = lambda batch: data.collate_plain(batch, tokenizer)  # noqa: E731
    run.print(f"c2lip: {total} steps, global batch {run.global_batch} ({args.batch_size} x {args.accum_freq} "
              f"micro-batches x {run.world_size} processes), main loss "
              f"{'SigLIP sigmoid' if siglip else 'CLIP softmax'}, w_npc={args.w_npc} w_xac={args.w_xac} "
              f"tau={args.xac_temperature} concept scale={'model' if concept_logits is None else args.concept_scale}")
    run.progress(total, initial=start)
    collate = common.split_collate(collate, args.accum_freq)   # K micro-batches of --batch-size per step
    for step, _, micro_batches in common.batch_stream(dataset, collate, args.batch_size * args.accum_freq,
                                                      args.seed, start, total, args.workers):
        micro_batches = [{k: v.to(device) for k, v in mb.items()} for mb in micro_batches]
        optimizer.zero_grad(set_to_none=True)
        # loss x world size for the gathered features (DDP averages); the scalars the loss uses directly (scale,
        # SigLIP bias, concept scale and bias) get their gradient divided back by it (common.accumulated_backward)
        _, parts, n_concepts = backward(run, ddp, micro_batches, args, step)
        common.optimizer_step(run, optimizer)
        scheduler.step()
        common.clamp_logit_scale(model)  # official train.py clamps to [0, ln 100] after every step
        if concept_logits is not None:
            concept_logits.clamp_()
        if run.bar is not None:
            run.bar.update(1)
        if step % args.log_every == 0 or step == total - 1:
            extra = {}
            if with_concepts:
                concept_scale, concept_bias = forward.scales()[2:]
                extra = {"concepts": n_concepts, "concept_scale": float(concept_scale.detach()),
                         "concept_bias": float(concept_bias.detach())}
            run.log(step, run.global_batch, **parts, lr=scheduler.get_last_lr()[0],
                    logit_scale=float(model.logit_scale.exp().detach()), **extra)
        if run.should_save(step + 1):
            common.save_checkpoint(run, step + 1, forward, optimizer, scheduler)
    common.save_checkpoint(run, total, forward, optimizer, scheduler)
    run.close()
    if not run.is_main:
        return None
    model.eval()
    after = evaluation.evaluate(model, tokenizer, val_tf, args.eval, root=args.eval_root, device=device) \
        if args.eval else None
    common.export_open_clip(model, os.path.join(run.out, "final.pt"), args.model, tokenizer, meta={"method": "c2lip"})
    if before is not None:
        extra = {}
        if "shapes" in before:
            extra = {"target_before": target_metric(before["shapes"]["metrics"]),
                     "target_after": target_metric(after["shapes"]["metrics"])}
            run.print(f"target (swap-att, replace-att, add): {extra['target_before']:.2f} -> "
                      f"{extra['target_after']:.2f}")
        evaluation.write_results(run.out, before, after, extra=extra)
        print(evaluation.format_table(before, after))
    return {"before": before, "after": after, "out": run.out}


def parse_args(argv=None):
    p = common.base_parser("C2LIP: concept-centric fine-tuning (noun-phrase NPC + cross-attention XAC losses)")
    g = p.add_argument_group("C2LIP")
    g.add_argument("--w-npc", type=float, default=None, help="weight of L_npc (0 turns it off)")
    g.add_argument("--w-xac", type=float, default=None, help="weight of L_xac (0 turns it off)")
    g.add_argument("--xac-temperature", type=float, default=None, help="tau of the concept->patch softmax")
    g.add_argument("--xac-chunk", type=int, default=None, help="concepts per XAC einsum chunk (memory bound)")
    g.add_argument("--xac-recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute each XAC chunk in backward (bounds autograd memory at large batch); "
                        "--no-xac-recompute turns it off in a resumed run that had it on")
    g.add_argument("--mask-duplicates", type=int, choices=[0, 1, 2], default=None,
                   help="drop false-negative (image, concept) pairs: 1 = the concept repeats one of the image's "
                        "own, 2 = also when its words are a subset of one of them; paper: 0")
    g.add_argument("--concept-scale", choices=["own", "shared"], default=None,
                   help="CLIP models: own sigmoid scale+bias (SigLIP init) or the CLIP logit_scale + a new bias")
    g.add_argument("--concept-scale-init", type=float, default=None, help="log of the initial own sigmoid scale")
    g.add_argument("--concept-bias-init", default=None, help="CLIP models: initial sigmoid bias, or 'calibrate'")
    common.document_defaults(p, _defaults())
    args = p.parse_args(argv)
    return common.apply_defaults(args, _defaults())


def main(argv=None):
    return common.launch(train, parse_args(argv))


if __name__ == "__main__":
    main()
