"""GOAL: Global-local Object Alignment Learning (Choi, Jang, Eom, CVPR 2025, arXiv 2503.17782).

CLIP reads at most 77 tokens and matches a whole image to a whole caption. GOAL fine-tunes CLIP on long,
multi-sentence captions and teaches it which sentence describes which part of the image:
  1. Long text: Long-CLIP's "knowledge-preserved" position stretch (keep the first K positions, linearly
     interpolate the rest by a factor; 77 -> 248 for OpenAI CLIP).
  2. LISM (Local Image-Sentence Matching, offline, `python goal.py lism`): for each image, score every
     (candidate crop, sentence) pair with the starting model, where the candidates are [full image] + crops
     of segments (SAM on real data; the generator's object boxes in the shapes world). Each sentence picks
     its argmax candidate, sentences that pick the full image are dropped, and the best-scoring
     (crop, sentence) pair is kept: one local pair per image, with its crop box.
  3. TSL (Token Similarity-based Learning): the full image's last-layer patch tokens inside the crop box,
     averaged, must embed like the crop itself; the long caption's tokens over the sentence's span,
     averaged, must embed like the sentence on its own.

Total loss (lambda_local = 0.5, lambda_TSL = 1, as in the paper and the official trainer):

    L = L_global(I_g, T_g) + 0.5 * L_local(I_l, T_l)
        + mean_b (1 - cos(P_l^b, v_l^b))^2 + mean_b (1 - cos(S_l^b, t_l^b))^2

  L_global, L_local: symmetric InfoNCE with the (unclamped, trainable) CLIP logit scale.
  v_l = proj(ln_post(CLS(I_l))), t_l = proj(ln_final(EOT(T_l))): the crop's and the sentence's own embeddings.
  P_l = proj(ln_post(mean of I_g's pre-ln_post patch tokens inside the box)): pool, then LN, then projection.
  S_l = proj(ln_final(mean of T_g's pre-ln_final tokens over the sentence's token span)).
All embeddings L2-normalised; no stop-gradient anywhere. With --local-weight 0 --tsl-weight 0 the script
is plain CLIP fine-tuning on (image, long caption) with the same stretched text positions (the paper's
"global fine-tuning" baseline).

Where the release differs from the paper (see ../shared/methods/goal.md section 6), the default follows the
paper and a flag reproduces the release:
  --released-box-mapping: the release divides the box by the *crop's* width/height instead of the image's
    (so every region runs to the bottom-right corner) and uses 16-px cells whatever the model's patch size.
    Default: the box (pixels of the transformed image) is mapped onto the model's own patch grid.
  Sentence spans: the release's span finder starts one token late and includes the '.' after the sentence;
    we use the exact span from data.sentence_spans (no flag: the release's version is an off-by-one).

Run:
  python goal.py                                   # shapes world, cached `shapes` base model, CPU, ~4 min
  python goal.py lism --data docci --data-root DIR --segments SEG.json --out lism.json   # offline LISM
  python goal.py --data docci --data-root DIR --lism lism.json --gpus 8                   # the paper's recipe
  torchrun --nproc_per_node 8 goal.py --data dci --data-root DIR --lism lism.json         # same, under torchrun
  python goal.py --resume OUT_DIR                  # continue an interrupted run
  python goal.py --local-weight 0 --tsl-weight 0   # the plain fine-tuning baseline
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------
# Defaults. Real data: the official trainer `goal_loss_finetuning.py` (goal.md sections 3-4).
# Shapes: the shared small budget (common.SHAPES_DEFAULTS) plus the stretch scaled to the tiny model.
# ----------------------------------------------------------------------------------------------------------
PAPER_DEFAULTS = dict(
    model="ViT-B-16",            # paper backbones: ViT-B/16 and ViT-L/14 at 224 px, OpenAI weights
    pretrained="openai",
    lr=5e-6,                     # AdamW, official trainer
    wd=0.05,                     # applied to every parameter in the release
    warmup=0,                    # per-iteration cosine to 0, no warmup
    batch_size=16,               # per GPU, world size 1 in the release
    epochs=10,
    precision="bf16",            # Lightning Fabric bf16-mixed
    seed=1337,                   # official seed (+ rank)
    context_length=248,          # Long-CLIP stretch 77 -> 248 = 20 + 4 * (77 - 20)
    keep_positions=20,           # Long-CLIP keeps the first 20 positions as they are
    local_weight=0.5,            # lambda_local (paper notes, FAST-GOAL, official trainer)
    tsl_weight=1.0,              # lambda_TSL
)
# Tiny model: context 32. We keep Long-CLIP's ratios: K = round(20/77 * 32) = 8 kept positions and the same
# factor 4, so the new length is 8 + 4 * (32 - 8) = 104 (Long-CLIP: 20 + 4 * (77 - 20) = 248). Shapes long
# captions (one sentence per object and per relation) run past 32 tokens, so the stretch matters here.
SHAPES_GOAL_DEFAULTS = dict(context_length=104, keep_positions=8, local_weight=0.5, tsl_weight=1.0)


# ----------------------------------------------------------------------------------------------------------
# Losses: pure functions of (already gathered) tensors.
# ----------------------------------------------------------------------------------------------------------
def contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (CLIP), paper's L_global / L_local.

    L = 1/2 [ CE(s * I T^T, diag) + CE(s * T I^T, diag) ],  s = exp(logit_scale) (never clamped in GOAL).
    image_emb: (N, D) L2-normalised; text_emb: (N, D) L2-normalised, row i is image i's positive;
    logit_scale: scalar tensor, the *log* of the temperature's inverse.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def tsl_loss(region_emb, crop_emb, span_emb, sentence_emb):
    """Token Similarity-based Learning, paper Eq. (14), diagonal-only as in the release.

    L_TSL = mean_b (1 - cos(P_l^b, v_l^b))^2 + mean_b (1 - cos(S_l^b, t_l^b))^2
    region_emb (P_l): (N, D) region-pooled patch tokens of the full image, after ln_post + proj, L2-normalised.
    crop_emb (v_l): (N, D) the crop's own image embedding, L2-normalised.
    span_emb (S_l): (N, D) span-pooled tokens of the long caption, after ln_final + proj, L2-normalised.
    sentence_emb (t_l): (N, D) the sentence's own text embedding, L2-normalised.
    No temperature, no negatives, no stop-gradient on either side.
    """
    tsl_img = (1 - (region_emb * crop_emb).sum(-1)).pow(2).mean()
    tsl_txt = (1 - (span_emb * sentence_emb).sum(-1)).pow(2).mean()
    return tsl_img + tsl_txt, {"tsl_img": tsl_img.item(), "tsl_txt": tsl_txt.item()}


def goal_loss(image_emb, text_emb, crop_emb, sentence_emb, region_emb, span_emb, logit_scale,
              local_weight=0.5, tsl_weight=1.0):
    """GOAL's total loss: L_global + local_weight * L_local + tsl_weight * L_TSL.

    image_emb, text_emb: (N, D) global image / long-caption embeddings (I_g, T_g), L2-normalised.
    crop_emb, sentence_emb: (N, D) local pair embeddings (v_l, t_l) of the LISM crop and its sentence.
    region_emb, span_emb: (N, D) P_l and S_l (see tsl_loss). logit_scale: scalar (log scale), shared.
    Returns (loss, parts) with parts = {global, local, tsl_img, tsl_txt, total} as floats.
    A zero weight skips its term entirely (so weights 0 is exactly plain CLIP fine-tuning).
    """
    loss_global = contrastive_loss(image_emb, text_emb, logit_scale)
    parts = {"global": loss_global.item()}
    loss = loss_global
    if local_weight:
        loss_local = contrastive_loss(crop_emb, sentence_emb, logit_scale)
        loss = loss + local_weight * loss_local
        parts["local"] = loss_local.item()
    if tsl_weight:
        loss_tsl, tsl_parts = tsl_loss(region_emb, crop_emb, span_emb, sentence_emb)
        loss = loss + tsl_weight * loss_tsl
        parts.update(tsl_parts)
    parts["total"] = loss.item()
    return loss, parts


# ----------------------------------------------------------------------------------------------------------
# Model glue: position stretch, one-pass token extraction, box -> patch mapping, region and span pooling.
# ----------------------------------------------------------------------------------------------------------
def _text_tower(model):
    """The module holding token_embedding/positional_embedding/transformer/ln_final/text_projection:
    the model itself for open_clip `CLIP` (unpacked text tower), `model.text` for `CustomTextCLIP`."""
    tower = getattr(model, "text", None)
    tower = tower if tower is not None and hasattr(tower, "positional_embedding") else model
    if getattr(tower, "cls_emb", None) is not None:
        raise ValueError("goal.py: text towers with a CLS embedding (CoCa) are not supported")
    return tower


def stretch_positions(pos, new_length, keep):
    """Long-CLIP's knowledge-preserved stretch of a (L, W) positional table to (new_length, W).

    Rows p < keep are copied. Row p >= keep reads the old table at s = keep + (p - keep) / f, with
    f = (new_length - keep) / (L - keep), linearly interpolated between rows floor(s) and floor(s)+1, and
    linearly extrapolated from the last two rows past the end. With L=77, keep=20, new_length=248 (f=4) this is
    exactly Long-CLIP: E'[20+4i+r] = (4-r)/4 E[20+i] + r/4 E[21+i], E'[244+r] = E[76] + r/4 (E[76] - E[75]).
    """
    old_length = pos.shape[0]
    if not (0 < keep < old_length - 1 and new_length >= old_length):
        raise ValueError(f"stretch: need 0 < keep ({keep}) < {old_length - 1} and new length >= {old_length}")
    factor = (new_length - keep) / (old_length - keep)
    p = torch.arange(keep, new_length, dtype=torch.float64)
    src = keep + (p - keep) / factor
    lo = src.floor().long().clamp(max=old_length - 2)
    w = (src - lo).to(pos.dtype).unsqueeze(1)
    stretched = (1 - w) * pos[lo] + w * pos[lo + 1]
    return torch.cat([pos[:keep], stretched], 0)


def stretch_text_positions(model, new_length, keep):
    """Give an open_clip CLIP (or CustomTextCLIP) text tower a context of `new_length` tokens, in place.

    Replaces the positional table by its stretch (one trainable parameter, as in GOAL; Long-CLIP instead
    freezes the first `keep` rows), rebuilds the causal mask and sets context_length. Pair it with
    `open_clip.get_tokenizer(name, context_length=new_length)`.
    """
    tower = _text_tower(model)
    old = tower.positional_embedding.data
    if old.shape[0] == new_length:
        return model
    tower.positional_embedding = torch.nn.Parameter(stretch_positions(old, new_length, keep))
    if getattr(tower, "attn_mask", None) is not None:
        mask = torch.full((new_length, new_length), float("-inf"), device=old.device).triu_(1)
        tower.attn_mask = mask.to(tower.attn_mask.dtype)  # the attribute is a registered (non-persistent) buffer
    tower.context_length = new_length
    if hasattr(tower, "num_pos"):
        tower.num_pos = new_length
    model.context_length = new_length
    return model


def encode_image_with_tokens(model, images):
    """One pass of the image tower: (pooled_emb (B, D) unnormalised, pre_ln_tokens (B, 1+N, W)).

    pre_ln_tokens are the last transformer layer's outputs before ln_post (index 0 is CLS), which TSL pools.
    Same maths as model.encode_image (the release runs the tower twice to get both; one pass suffices).
    """
    visual = model.visual
    if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "_embeds"):
        raise ValueError("goal.py needs an open_clip VisionTransformer without attentional pooling")
    tokens = visual.transformer(visual._embeds(images))
    pooled, _ = visual._pool(tokens)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, tokens


def _project_text(tower, x):
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def encode_text_with_tokens(model, texts):
    """One pass of the text tower: (pooled_emb (B, D) unnormalised, pre_ln_tokens (B, L, W)).

    pre_ln_tokens are the last layer's outputs before ln_final, which TSL pools over a sentence span.
    Pooled = EOT token (argmax id, or the tower's pool type) after ln_final and the projection, like encode_text.
    """
    from open_clip.transformer import text_global_pool
    tower = _text_tower(model)
    x = tower.token_embedding(texts) + tower.positional_embedding[: texts.shape[1]].to(tower.token_embedding.weight.dtype)
    mask = getattr(tower, "attn_mask", None)
    tokens = tower.transformer(x, attn_mask=mask[: texts.shape[1], : texts.shape[1]] if mask is not None else None)
    pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    pooled = text_global_pool(tower.ln_final(tokens), texts, pool_type, eos_token_id=eos_id)
    return _project_text(tower, pooled), tokens


def box_patch_mask(boxes, image_size, patch_size, released=False):
    """Which patches of the model's grid each box covers: (B, G*G) bool, row-major like the ViT's tokens.

    boxes: (B, 4) float [x1, y1, x2, y2] in pixels of the transformed (model-input) image.
    Paper intent (default): G = image_size // patch_size; columns floor(x1/p) .. ceil(x2/p)-1, rows likewise,
    clamped to the grid, at least one patch per box.
    released=True reproduces the official `get_patch_tokens_from_bbox`: coordinates scaled by
    image_size / (box width or height) (the crop's size, stored in the same field as the image size), clamped
    to [0, image_size-1], and cut into 16-px cells whatever the model's patch size (then clamped to the grid).
    """
    grid = image_size // patch_size
    boxes = boxes.to(torch.float64)
    x1, y1, x2, y2 = boxes.unbind(-1)
    cell = float(patch_size)
    if released:
        w = (x2 - x1).clamp(min=1)
        h = (y2 - y1).clamp(min=1)
        x1 = (x1 * image_size / w).clamp(0, image_size - 1)
        x2 = (x2 * image_size / w).clamp(0, image_size - 1)
        y1 = (y1 * image_size / h).clamp(0, image_size - 1)
        y2 = (y2 * image_size / h).clamp(0, image_size - 1)
        cell = 16.0
    c0 = (x1 / cell).floor().long().clamp(0, grid - 1)
    r0 = (y1 / cell).floor().long().clamp(0, grid - 1)
    c1 = torch.maximum((x2 / cell).ceil().long() - 1, c0).clamp(max=grid - 1)
    r1 = torch.maximum((y2 / cell).ceil().long() - 1, r0).clamp(max=grid - 1)
    idx = torch.arange(grid, device=boxes.device)
    cols = (idx[None] >= c0[:, None]) & (idx[None] <= c1[:, None])   # (B, G)
    rows = (idx[None] >= r0[:, None]) & (idx[None] <= r1[:, None])   # (B, G)
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)


def region_embed(model, pre_ln_tokens, patch_mask):
    """P_l before normalisation: ln_post(mean of patch tokens inside the box) @ proj.

    pre_ln_tokens: (B, 1+N, W) from encode_image_with_tokens; patch_mask: (B, N) bool from box_patch_mask.
    Pool first, then LayerNorm, then projection (the release's order), reusing CLIP's own ln_post and proj.
    """
    visual = model.visual
    weights = patch_mask.to(pre_ln_tokens.dtype)
    pooled = (weights.unsqueeze(-1) * pre_ln_tokens[:, 1:]).sum(1) / weights.sum(1, keepdim=True)
    pooled = visual.ln_post(pooled)
    return pooled @ visual.proj if visual.proj is not None else pooled


def span_embed(model, pre_ln_tokens, spans):
    """S_l before normalisation: ln_final(mean of caption tokens over [start, end)) @ text_projection.

    pre_ln_tokens: (B, L, W) from encode_text_with_tokens; spans: (B, 2) long, token positions [start, end)
    of the sentence inside the tokenized long caption (data.sentence_spans).
    """
    tower = _text_tower(model)
    pos = torch.arange(pre_ln_tokens.shape[1], device=pre_ln_tokens.device)
    weights = ((pos[None] >= spans[:, :1]) & (pos[None] < spans[:, 1:])).to(pre_ln_tokens.dtype)
    pooled = (weights.unsqueeze(-1) * pre_ln_tokens).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    return _project_text(tower, tower.ln_final(pooled))
