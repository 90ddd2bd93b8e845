"""GOAL: Global-local Object Alignment Learning (Choi, Jang, Eom, CVPR 2025, arXiv 2503.17782).

Official code: https://github.com/PerceptualAI-Lab/GOAL (the trainer goal_loss_finetuning.py; LISM in
LISM/make_pseudo_local_pair_for_trainset.py and LISM/make_bbox.py; the position stretch in utils/func.py, a port of
Long-CLIP's, https://github.com/beichenzbc/Long-CLIP, model/longclip.py).

CLIP reads at most 77 tokens and matches a whole image to a whole caption. GOAL fine-tunes CLIP on long,
multi-sentence captions and teaches it which sentence describes which part of the image:
  1. Long text: Long-CLIP's "knowledge-preserved" position stretch (keep the first K positions, linearly
     interpolate the rest by a factor; 77 -> 248 for OpenAI CLIP).
  2. LISM (Local Image-Sentence Matching, offline, `python goal.py lism`): for each image, score every
     (candidate crop, sentence) pair with a frozen CLIP (the paper's ViT-L/14-336, `--scorer-model`; the
     starting model in the shapes world), where the candidates are [full image] + crops
     of segments covering 1%-80% of the image (SAM on real data; the generator's object boxes in the shapes
     world). Each sentence picks its argmax candidate, sentences that pick the full image are dropped, and
     the best-scoring (crop, sentence) pair is kept: one local pair per image, with its crop box.
  3. TSL (Token Similarity-based Learning): the full image's last-layer patch tokens inside the crop box,
     averaged, must embed like the crop itself; the long caption's tokens over the sentence's span,
     averaged, must embed like the sentence on its own.

Total loss (lambda_local = 0.5, lambda_TSL = 1, as in the paper and the official trainer; the TSL term is the
paper's Eq. (14), the paper's numbers of the other terms are not given here):

    L = L_global(I_g, T_g) + 0.5 * L_local(I_l, T_l)
        + mean_b (1 - cos(P_l^b, v_l^b))^2 + mean_b (1 - cos(S_l^b, t_l^b))^2

  L_global, L_local: symmetric InfoNCE with the (unclamped, trainable) CLIP logit scale.
  v_l = proj(ln_post(CLS(I_l))), t_l = proj(ln_final(EOT(T_l))): the crop's and the sentence's own embeddings.
  P_l = proj(ln_post(mean of I_g's pre-ln_post patch tokens inside the box)): pool, then LN, then projection.
  S_l = proj(ln_final(mean of T_g's pre-ln_final tokens over the sentence's token span)).
All embeddings L2-normalised; no stop-gradient anywhere. With --local-weight 0 --tsl-weight 0 the script
is plain CLIP fine-tuning on (image, long caption) with the same stretched text positions (the paper's
"global fine-tuning" baseline).

Where the release (goal_loss_finetuning.py) differs from the paper, the default follows the paper and a flag
reproduces the release:
  --released-box-mapping: the release (`get_patch_tokens_from_bbox`) divides the box by the *crop's* width/height
    instead of the image's, so every region runs to the bottom-right corner of the patch grid.
    Default: the box (pixels of the transformed image) is mapped onto the model's own patch grid.
    The release cuts 16-px cells (`patch_size=16`), its ViT-B/16's; we cut the model's own cells, so the flag
    runs to the corner on every grid (16-px cells would stop mid-grid on ViT-L/14 or the tiny 64-px model).
    Not exact: the release scales boxes in original-image pixels and rounds them; we scale, unrounded, boxes
    already mapped into the transformed image: the release's failure, not its exact patch sets.
  Sentence spans: the release's span finder starts one token late and takes the '.' after the sentence; we use
    the exact span (data.sentence_spans; no flag: an off-by-one).

Run:
  python goal.py                                   # shapes world, shipped base; CPU: LISM once (cached), then training
  python goal.py lism --data docci --data-root DIR --segments-file SAM.json --out lism.json   # offline LISM
  python goal.py --data docci --data-root DIR --lism lism.json      # the paper's recipe: 1 GPU, batch 16, bf16
  torchrun --nproc_per_node 8 goal.py --data dci --data-root DIR --lism lism.json --batch-size 2   # 8 GPUs, batch 16
  python goal.py --data dci --data-root DIR --lism DCI_segment_sim_bbox_del_org.json   # GOAL's released matching
  python goal.py --resume OUT_DIR                  # continue an interrupted run
  python goal.py --local-weight 0 --tsl-weight 0   # the plain fine-tuning baseline
The exported run folder (stretched text table) loads as `local-dir:OUT_DIR` in open_clip and eval.py;
`--pretrained OUT_DIR/final.pt` with a model name would shrink the trained positions, so it is refused.
Kept on purpose: one pass per tower gives pooled embeddings and pre-LN tokens (the release runs them twice);
padding columns after the batch's longest text are dropped (exact under the causal mask); weight decay skips
norms/biases/logit scale (the release decays all). Real-data AdamW betas/eps are the release's (torch defaults).
"""
import argparse
import json
import os
import sys

import torch
from open_clip.transformer import text_global_pool
import torch.nn.functional as F

import common
import data
import eval as evaluation

# ----------------------------------------------------------------------------------------------------------
# Defaults. Real data: the official trainer (https://github.com/PerceptualAI-Lab/GOAL, goal_loss_finetuning.py).
# Shapes: the shared small budget (common.SHAPES_DEFAULTS) plus the stretch scaled to the tiny model.
# ----------------------------------------------------------------------------------------------------------
PAPER_DEFAULTS = dict(
    model="ViT-B-16-quickgelu",  # paper: ViT-B/16 (and ViT-L/14) at 224 px, OpenAI weights: QuickGELU
    pretrained="openai",
    lr=5e-6,                     # AdamW, official trainer
    wd=0.05,                     # applied to every parameter in the release
    betas=(0.9, 0.999), eps=1e-8,  # the release builds torch.optim.AdamW with torch's defaults
    warmup=0,                    # per-iteration cosine to 0, no warmup
    batch_size=16,               # per GPU, world size 1 in the release
    epochs=10,
    precision="bf16",            # Lightning Fabric bf16-mixed (on CUDA; CPU runs use fp32: common.apply_defaults)
    seed=1337,                   # official seed (+ rank)
    context_length=248,          # Long-CLIP stretch 77 -> 248 = 20 + 4 * (77 - 20)
    keep_positions=20,           # Long-CLIP keeps the first 20 positions as they are
    local_weight=0.5,            # lambda_local (paper notes, FAST-GOAL, official trainer)
    tsl_weight=1.0,              # lambda_TSL
    scorer_model="ViT-L-14-336-quickgelu",  # LISM's scorer (LISM/make_pseudo_local_pair_for_trainset.py)
    scorer_pretrained="openai",
    released_box_mapping=False,  # the paper's box -> patch mapping (--released-box-mapping: the release's)
)
# Tiny model: context 32. Long-CLIP's ratios: K = round(20/77 * 32) = 8 kept positions, factor 4, so 8 + 4 * (32 - 8)
# = 104 (Long-CLIP: 20 + 4 * (77 - 20) = 248); shapes long captions run past 32 tokens. The shapes world keeps the
# project-wide AdamW betas/eps like the other methods, so the four shapes results differ by their losses only.
SHAPES_GOAL_DEFAULTS = dict(context_length=104, keep_positions=8, local_weight=0.5, tsl_weight=1.0,
                            train_size=4000,   # LISM scores each scene once (~10 ms on a CPU); lab.compare: 20,000
                            betas=(0.9, 0.98), eps=1e-6,
                            scorer_model="same", scorer_pretrained="same",   # no larger shapes model exists
                            released_box_mapping=False)


# ----------------------------------------------------------------------------------------------------------
# Losses: pure functions of (already gathered) tensors.
# ----------------------------------------------------------------------------------------------------------
def contrastive_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (CLIP), paper's L_global / L_local, as goal_loss_finetuning.py computes them.

    L = 1/2 [ CE(s * I T^T, diag) + CE(s * T I^T, diag) ],  s = exp(logit_scale) (never clamped in GOAL).
    image_emb: (N, D) L2-normalised; text_emb: (N, D) L2-normalised, row i is image i's positive;
    logit_scale: scalar tensor, the *log* of the temperature's inverse.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def tsl_loss(region_emb, crop_emb, span_emb, sentence_emb):
    """Token Similarity-based Learning, paper Eq. (14), diagonal-only as in the release (goal_loss_finetuning.py
    takes torch.diag of the similarity matrix before the MSE, so off-diagonal pairs are not pushed to 0).

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
    loss = contrastive_loss(image_emb, text_emb, logit_scale)
    parts = {"global": loss.item()}
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
    """Long-CLIP's knowledge-preserved stretch of a (L, W) positional table to (new_length, W) (Long-CLIP's
    model/longclip.py; GOAL's utils/func.py `longclip_pos_embeddings`).

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
    to [0, image_size-1] (x1, y1) and [0, image_size] (x2, y2), then cut into the model's own cells of
    image_size / G px. Since x2 * image_size / w >= image_size, every region reaches the last column and row:
    the release's behaviour, on any grid. (The release hard-codes 16-px cells, which equal the model's cells
    on its ViT-B/16 at 224 px; on other grids they would end the region mid-grid: see the module docstring.)
    """
    grid = image_size // patch_size
    boxes = boxes.to(torch.float64)
    x1, y1, x2, y2 = boxes.unbind(-1)
    cell = float(patch_size)
    if released:
        w = (x2 - x1).clamp(min=1)
        h = (y2 - y1).clamp(min=1)
        x1 = (x1 * image_size / w).clamp(0, image_size - 1)
        x2 = (x2 * image_size / w).clamp(0, image_size)
        y1 = (y1 * image_size / h).clamp(0, image_size - 1)
        y2 = (y2 * image_size / h).clamp(0, image_size)
        cell = image_size / grid   # the model's own cells (16 px for ViT-B/16 at 224, as in the release)
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


# ----------------------------------------------------------------------------------------------------------
# LISM: offline local image-sentence matching.
# ----------------------------------------------------------------------------------------------------------
def lism_best_pair(scores):
    """GOAL's LISM decision for one image, from scores (1 + C, S): candidate 0 = full image, 1..C = crops.

    Each sentence j picks argmax_i scores[i, j] (no one-to-one constraint); sentences that pick the full image
    are dropped ("del_org"); of the rest, the single best-scoring (crop, sentence) pair is kept ("only_max_pair").
    The argmax is LISM/make_pseudo_local_pair_for_trainset.py's; the last two steps are inferred from the
    training files' names and goal_loss_finetuning.py's loader (the official repository does not include that script).
    Returns (crop_index in 0..C-1, sentence_index, score) or None when every sentence prefers the full image.
    """
    best_score, best_candidate = scores.max(dim=0)          # (S,), (S,)
    keep = best_candidate > 0
    if not keep.any():
        return None
    masked = torch.where(keep, best_score, torch.full_like(best_score, float("-inf")))
    sentence = int(masked.argmax())
    return int(best_candidate[sentence]) - 1, sentence, float(best_score[sentence])


def _crop_tensor(image, box):
    """Cut a box ([x0, y0, x1, y1], pixels) out of a (3, H, W) image tensor, resized back to (H, W)."""
    height, width = image.shape[-2:]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(width, max(x0 + 1, int(round(box[2])))), min(height, max(y0 + 1, int(round(box[3]))))
    return F.interpolate(image[None, :, y0:y1, x0:x1], size=(height, width), mode="bilinear", align_corners=False)[0]


def keep_by_area(boxes, image_size, areas=None, min_ratio=0.01, max_ratio=0.8):
    """GOAL's segment filter: keep a candidate whose area is 1%-80% of the image area
    (LISM/make_pseudo_local_pair_for_trainset.py: min_area_ratio=0.01, max_area_ratio=0.8).

    boxes: [[x0, y0, x1, y1], ...] in the pixels of image_size = (width, height). areas: the masks' pixel
    counts if the segments file has them ("areas"), which is what the release filters on; without them the
    box's area stands in (never smaller than its mask's). Returns the indices of the kept boxes."""
    image_area = float(image_size[0] * image_size[1])
    if areas is None:
        areas = [max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1]) for box in boxes]
    return [i for i, area in enumerate(areas) if min_ratio <= area / image_area <= max_ratio]


def _lism_crops(dataset, index, sample):
    """Candidate boxes that pass `keep_by_area` and their crops (transformed like the image). Real loaders:
    boxes in original pixels, cut from the original image (as GOAL crops the original RGB image). Shapes world:
    boxes in the rendered image's pixels (= the transformed image's), cut from the tensor and resized back."""
    image = sample["image"]
    if hasattr(dataset, "load_image") and hasattr(dataset, "_segment_entry"):
        original = dataset.load_image(index)
        entry = dataset._segment_entry(index)
        boxes, crops = [], []
        for i in keep_by_area(entry["boxes"], original.size, entry.get("areas")):
            box = entry["boxes"][i]
            x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
            x1 = min(original.size[0], max(x0 + 1, int(round(box[2]))))
            y1 = min(original.size[1], max(y0 + 1, int(round(box[3]))))
            crop = dataset.transform(original.crop((x0, y0, x1, y1)))
            if crop.shape[-2:] != image.shape[-2:]:
                crop = F.interpolate(crop[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
            boxes.append([float(v) for v in box])
            crops.append(crop)
        return boxes, crops
    boxes = [[float(v) for v in box] for box in sample["segments"]]
    boxes = [boxes[i] for i in keep_by_area(boxes, (image.shape[-1], image.shape[-2]))]
    return boxes, [_crop_tensor(image, box) for box in boxes]


@torch.no_grad()
def run_lism(model, tokenizer, dataset, long_tokenizer, device, crops_per_forward=128, log_every=2000):
    """Score every (candidate, sentence) pair with `model` (the scorer) and keep one local pair per image.

    dataset: a long-caption set (shapes world with long=True, or a real loader with a segments file) whose
    samples carry "image" (transformed tensor) and "segments". Sentences are those of data.sentence_spans under
    the *training* context (not truncated away), encoded as separate texts with `tokenizer` (the starting
    model's own). Scores are 100 * cosine, as in the release. Candidates (each image, then its crops) are
    encoded `crops_per_forward` at a time across images: SAM gives dozens to 100+ crops per image, so one
    forward per image or per group of images would have no memory bound. The decision is per image
    (`lism_best_pair`), made as soon as all its candidates are encoded.
    Returns {image_id: {"boxes": [...], "pairs": [{"sentence", "box", "score"}]}}: data.SEGMENTS_FORMAT.
    """
    model.eval()
    matched = {}
    waiting = []                 # (image_id, boxes, sentence texts, sentence embeddings), in candidate order
    pending, encoded = [], []    # candidate tensors not yet encoded; embeddings of the waiting images' candidates

    def encode(count):
        batch, pending[:] = pending[:count], pending[count:]
        encoded.append(F.normalize(model.encode_image(torch.stack(batch).to(device)), dim=-1))
        image_emb, used = torch.cat(encoded), 0
        while waiting and used + 1 + len(waiting[0][1]) <= len(image_emb):
            image_id, boxes, sentences, text_emb = waiting.pop(0)
            scores = 100.0 * image_emb[used:used + 1 + len(boxes)] @ text_emb.t()
            used += 1 + len(boxes)
            best = lism_best_pair(scores)
            entry = {"boxes": boxes, "pairs": []}
            if best is not None:
                crop, sentence, score = best
                entry["pairs"].append({"sentence": sentences[sentence], "box": boxes[crop], "score": round(score, 4)})
            matched[str(image_id)] = entry
        encoded[:] = [image_emb[used:]]

    for index in range(len(dataset)):
        sample = dataset[index]
        if sample is not None and sample.get("segments"):   # no candidate crops: no local pair
            sentences = [s for s, _, _ in data.sentence_spans(sample["caption"], long_tokenizer)]
            boxes, crops = _lism_crops(dataset, index, sample) if sentences else ([], [])
            if boxes:
                text_emb = F.normalize(model.encode_text(tokenizer(sentences).to(device)), dim=-1)
                waiting.append((sample["image_id"], boxes, sentences, text_emb))
                pending.extend([sample["image"]] + crops)
                while len(pending) >= crops_per_forward:
                    encode(crops_per_forward)
        if log_every and (index + 1) % log_every == 0:
            print(f"[lism] {index + 1}/{len(dataset)} images", file=sys.stderr)
    if pending:
        encode(len(pending))
    return matched


# ----------------------------------------------------------------------------------------------------------
# One training forward (a module, so DDP sees the whole computation).
# ----------------------------------------------------------------------------------------------------------
class GoalForward(torch.nn.Module):
    """Embeddings GOAL's loss needs, from one pass per tower over [global; local] inputs (2B, as the release).

    Returns L2-normalised (B, D) tensors: image, text, crop, sentence, region (P_l), span (S_l). With both
    extra weights at 0 only the global pair is encoded (plain fine-tuning costs a plain step)."""

    def __init__(self, model, released_box_mapping=False, with_local=True):
        super().__init__()
        self.model, self.released_box_mapping, self.with_local = model, released_box_mapping, with_local
        self.image_size = int(model.visual.image_size[0] if isinstance(model.visual.image_size, (tuple, list))
                              else model.visual.image_size)
        patch = model.visual.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    def _trim(self, texts):
        """Drop the all-padding columns at the end (pad id 0). Exact under a causal mask: no real token attends
        to a later position. 248 (or 104) slots for 15-token sentences would cost ~7x the text compute."""
        if getattr(_text_tower(self.model), "attn_mask", None) is None:
            return texts
        return common.trim_padding(texts)

    def forward(self, images, texts, crops=None, sentences=None, boxes=None, spans=None):
        n = images.shape[0]
        if not self.with_local:
            image_emb, _ = encode_image_with_tokens(self.model, images)
            text_emb, _ = encode_text_with_tokens(self.model, self._trim(texts))
            return {"image": F.normalize(image_emb, dim=-1), "text": F.normalize(text_emb, dim=-1)}
        image_emb, image_tokens = encode_image_with_tokens(self.model, torch.cat([images, crops]))
        text_emb, text_tokens = encode_text_with_tokens(self.model, self._trim(texts))
        sentence_emb, _ = encode_text_with_tokens(self.model, self._trim(sentences))
        mask = box_patch_mask(boxes, self.image_size, self.patch_size, self.released_box_mapping)
        region = region_embed(self.model, image_tokens[:n], mask.to(image_tokens.device))
        span = span_embed(self.model, text_tokens, spans)
        out = {"image": image_emb[:n], "crop": image_emb[n:], "text": text_emb, "sentence": sentence_emb,
               "region": region, "span": span}
        return {k: F.normalize(v, dim=-1) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
def micro_batch_features(run, forward, batch):
    """One micro-batch's features under the run's autocast (`common.accumulated_backward`): rows of global images
    and captions and, with the local losses on, of the local pairs (one per image) and their pooled tokens."""
    local = [batch[k] for k in ("crops", "sentences", "boxes", "sentence_span")] if "crops" in batch else []
    with run.autocast():
        return forward(batch["images"], batch["texts"], *local)


def batch_loss(features, current, logit_scale, args):
    """GOAL's loss on the whole global batch (micro-batches joined, then gathered over ranks, in fp32).
    logit_scale: the model's (log) parameter, read directly; GOAL never clamps it."""
    f = common.join_micro_batches(features, current)
    f = {k: common.gather_features(common.upcast(v)) for k, v in f.items()}
    return goal_loss(f["image"], f["text"], f.get("crop"), f.get("sentence"), f.get("region"), f.get("span"),
                     logit_scale, args.local_weight, args.tsl_weight)


def backward(run, forward, micro_batches, args, step=None):
    """One optimizer step's gradients over --accum-freq micro-batches (GoalForward, maybe DDP): (loss, parts)."""
    logit_scale = common.unwrap(forward).model.logit_scale
    return common.accumulated_backward(
        run, micro_batches, encode=lambda batch: micro_batch_features(run, forward, batch),
        loss_of=lambda features, current: batch_loss(features, current, logit_scale, args),
        loss_scalars=[logit_scale], module=forward, step=step)


def _defaults():
    shapes = dict(getattr(common, "SHAPES_DEFAULTS", {}))
    shapes.update(SHAPES_GOAL_DEFAULTS)
    shapes.setdefault("eval", "shapes")
    real = dict(PAPER_DEFAULTS, eval="docci,dci,urban1k", save_every=1000)
    return {"shapes": shapes, "real": real}


def _lism_pairs(args, model, tokenizer, val_tf, long_tokenizer, device):
    """The LISM matching for this run: read from --lism (our `goal.py lism` output or GOAL's released matching,
    `data.load_segments`), else (shapes world) computed now and cached."""
    if args.lism:
        return data.load_segments(args.lism, need_pairs=True)
    weights = common.shapes_base_path(args.model) if args.pretrained == "shapes" else str(args.pretrained)
    world = data.ShapesDataset("train", size=args.train_size, image_size=model.visual.image_size[0],
                               seed=args.seed, transform=val_tf, long=True)   # scenes and captions only: no pixels yet
    path = None
    if os.path.isfile(weights):   # cache only a matching made by fixed weights (not a random init), keyed by content:
        # the scorer's weights and what it scores (every caption and candidate box), so that a change to the world's
        # generator or to the context length can never hand back a stale matching
        scored = [common._sha256(weights), world.captions, [world.candidate_boxes(i) for i in range(len(world))],
                  args.context_length]
        path = data._cache_path(common.cache_dir(), f"goal-lism-shapes-seed{args.seed}-n{args.train_size}", scored)
        if os.path.exists(path):
            return data.load_segments(path)
    matched = run_lism(model, tokenizer, world, long_tokenizer, device)
    if path and common.is_main():
        common._atomic_write_text(path, json.dumps(matched))
    if common.is_main():
        os.makedirs(args.out, exist_ok=True)   # the first file of the run folder (Run.progress makes it later)
        common._atomic_write_text(os.path.join(args.out, "lism.json"), json.dumps(matched))
    return matched


def _train_set(args, val_tf, long_tokenizer, pairs):
    """Long-caption training set with one LISM pair per image; images without a pair are dropped (GOAL)."""
    args.long, args.local_pairs = True, args.data != "shapes"
    args.segments_file = args.lism
    dataset = data.build_train_set(args, val_tf, long_tokenizer)   # no augmentation in GOAL: boxes stay exact
    if args.data == "shapes":
        for i in range(len(dataset)):
            entry = pairs.get(f"shapes-train-{i}", {"pairs": []})["pairs"]
            dataset.long_sentences[i] = [(p["sentence"], p["box"]) for p in entry]
        kept = [i for i in range(len(dataset)) if dataset.long_sentences[i]]
        dataset = data.LocalPairs(dataset, long_tokenizer, seed=args.seed)
    else:
        kept = [i for i in range(len(dataset)) if dataset.dataset.local_candidates(i)]
    if args.lism and not kept:   # the keys do not match the data set (another data set, or another root)
        raise common.InputError(f"--lism {args.lism}: none of its entries names an image of the training set (its "
                                f"keys: {', '.join(list(pairs)[:3])}, ...); a key is the image's path relative to "
                                f"--data-root, its file name or its id")
    return torch.utils.data.Subset(dataset, kept), len(kept) / max(1, len(dataset))


def train(args):
    # bad input stops here, before a model, a data set or a run folder exists (Run checks --resume)
    evaluation.check_benchmarks(args.eval, args.eval_root)
    if args.data != "shapes" and not args.lism:
        raise common.InputError(f"--data {args.data} needs --lism FILE: GOAL's released matching "
                                f"(datasets/{'DCI' if args.data == 'dci' else 'docci'}_segment_sim_bbox_del_org.json "
                                f"in https://github.com/PerceptualAI-Lab/GOAL), or run `python goal.py lism --data "
                                f"{args.data} --data-root DIR --segments-file SAM_BOXES.json --out FILE` first")
    run = common.Run(args, method="goal")
    device = run.device
    model, _, val_tf, tokenizer = common.create_backbone(args.model, args.pretrained, device=device)
    model.set_grad_checkpointing(args.grad_checkpointing)   # open_clip's switch: less memory, same gradients
    long_tokenizer = common.tokenizer_for(args.model, context_length=args.context_length)
    with_local = bool(args.local_weight or args.tsl_weight)

    with common.main_process_first():   # shapes world: rank 0 computes and caches the matching, the others read it
        pairs = _lism_pairs(args, model, tokenizer, val_tf, long_tokenizer, device)
    dataset, kept_fraction = _train_set(args, val_tf, long_tokenizer, pairs)
    run.print(f"LISM: {len(dataset)} training images keep a local pair ({100 * kept_fraction:.1f}%)")
    before = evaluation.evaluate(model, tokenizer, val_tf, args.eval, root=args.eval_root, device=device) \
        if run.is_main and args.eval else None   # the starting model with its own context length

    stretch_text_positions(model, args.context_length, args.keep_positions)
    model.train()
    common.freeze_logit_bias(model)   # a SigLIP backbone's bias: no GOAL loss reads it
    forward = GoalForward(model, args.released_box_mapping, with_local)
    if run.world_size > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)
    total = run.total_steps(len(dataset))
    optimizer = common.make_optimizer(model, args.lr, args.wd, args.betas, args.eps)
    scheduler = common.cosine_schedule(optimizer, args.warmup, total)
    start, _ = common.resume(run, model, optimizer, scheduler)
    collate = (lambda b: data.collate_local(b, long_tokenizer)) if with_local else \
        (lambda b: data.collate_plain(b, long_tokenizer))
    run.print(f"goal: {total} steps, global batch {run.global_batch} ({args.batch_size} x {args.accum_freq} "
              f"micro-batches x {run.world_size} processes), context {args.context_length}, "
              f"weights local={args.local_weight} tsl={args.tsl_weight}")
    run.progress(total, initial=start)
    collate = common.split_collate(collate, args.accum_freq)   # K micro-batches of --batch-size per step
    for step, _, micro_batches in common.batch_stream(dataset, collate, args.batch_size * args.accum_freq,
                                                      args.seed, start, total, args.workers):
        micro_batches = [{k: v.to(device) for k, v in mb.items()} for mb in micro_batches]
        optimizer.zero_grad(set_to_none=True)
        _, parts = backward(run, forward, micro_batches, args, step)   # DDP, --accum-freq: common.accumulated_backward
        common.optimizer_step(run, optimizer)
        scheduler.step()                     # GOAL never clamps the logit scale
        if run.bar is not None:
            run.bar.update(1)
        if step % args.log_every == 0 or step == total - 1:
            run.log(step, run.global_batch, loss=parts["total"], **parts,
                    lr=scheduler.get_last_lr()[0], logit_scale=model.logit_scale.exp().item())
        if run.should_save(step + 1):
            common.save_checkpoint(run, step + 1, model, optimizer, scheduler)
    common.save_checkpoint(run, total, model, optimizer, scheduler)
    run.close()
    if not run.is_main:
        return None
    model.eval()
    after = evaluation.evaluate(model, long_tokenizer, val_tf, args.eval, root=args.eval_root, device=device) \
        if args.eval else None
    common.export_open_clip(model, os.path.join(run.out, "final.pt"), args.model, long_tokenizer,
                            meta={"context_length": args.context_length, "keep_positions": args.keep_positions})
    extra = {"lism_kept_fraction": kept_fraction, "context_before": tokenizer.context_length,
             "context_after": args.context_length}
    if before is not None:
        evaluation.write_results(run.out, before, after, extra=extra)
        print(evaluation.format_table(before, after))
    return {"before": before, "after": after, "out": run.out}


def lism_main(args):
    """`python goal.py lism ...`: the offline LISM step; writes the matching as a segments file with pairs."""
    if args.data in ("docci", "json", "csv") and not args.segments_file:
        raise common.InputError(f"goal.py lism --data {args.data} needs --segments-file FILE: the candidate boxes "
                                f"(SAM or a detector) per image, format:\n{data.SEGMENTS_FORMAT}")
    if args.segments_file and not os.path.isfile(args.segments_file):   # before the scorer's (big) weights load
        raise common.InputError(f"--segments-file {args.segments_file}: no such file; expected the candidate "
                                f"boxes per image, format:\n{data.SEGMENTS_FORMAT}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The scorer is a frozen model of its own (the paper: CLIP ViT-L/14-336), with its own transform and tokenizer;
    # "same" scores with the model that will be trained. Which sentences exist is decided by the *training*
    # tokenizer and context (a sentence cut off by the trained context cannot be a local pair).
    scorer_name = args.model if args.scorer_model == "same" else args.scorer_model
    scorer_weights = args.pretrained if args.scorer_pretrained == "same" else args.scorer_pretrained
    common.seed_everything(args.seed)   # a random-init scorer (--pretrained none) then matches the same way each run
    model, _, val_tf, tokenizer = common.create_backbone(scorer_name, scorer_weights, device=device)
    long_tokenizer = common.tokenizer_for(args.model, context_length=args.context_length)
    print(f"LISM scorer: {scorer_name} ({scorer_weights})", file=sys.stderr)
    if args.data == "shapes":
        dataset = data.ShapesDataset("train", size=args.train_size, image_size=model.visual.image_size[0],
                                     seed=args.seed, transform=val_tf, long=True)
    else:
        args.long, args.local_pairs = True, False
        dataset = data.build_train_set(args, val_tf, long_tokenizer)
    matched = run_lism(model, tokenizer, dataset, long_tokenizer, device)
    out = args.out or "lism.json"
    common._atomic_write_text(out, json.dumps(matched))
    n_pairs = sum(1 for entry in matched.values() if entry["pairs"])
    print(f"LISM: {n_pairs} of {len(dataset)} images keep a (crop, sentence) pair -> {out}")


def parse_args(argv=None):
    p = common.base_parser("GOAL: global-local object alignment for long captions.\n`goal.py lism ...` runs the "
                           "offline LISM matching (same flags, plus --segments-file and --out); `goal.py ...` trains.")
    p.usage = "%(prog)s [lism] [options]"
    g = p.add_argument_group("GOAL")
    g.add_argument("--local-weight", type=float, default=None, help="lambda_local on L_local(crop, sentence)")
    g.add_argument("--tsl-weight", type=float, default=None, help="lambda_TSL on the token-similarity loss")
    g.add_argument("--context-length", type=int, default=None, help="text context after the Long-CLIP stretch")
    g.add_argument("--keep-positions", type=int, default=None, help="positions copied unchanged by the stretch")
    g.add_argument("--released-box-mapping", action=argparse.BooleanOptionalAction, default=None,
                   help="map boxes to patches as the release does (regions run to the bottom-right corner; the "
                        "model's own cells; approximate: module docstring); --no-... turns it off on a resume")
    g.add_argument("--lism", default=None, help="LISM output (segments file with pairs) or GOAL's released matching "
                   "(datasets/*_segment_sim_bbox_del_org.json, read as is); shapes: computed if absent")
    g.add_argument("--segments-file", default=None, help="lism: candidate boxes (SAM/detector) per image")
    g.add_argument("--scorer-model", default=None,
                   help="lism: the frozen model that scores (crop, sentence) pairs; 'same' = --model")
    g.add_argument("--scorer-pretrained", default=None, help="lism: the scorer's weights; 'same' = --pretrained")
    g.add_argument("--split", default=None, help="split of the long-caption set (default train)")
    argv = sys.argv[1:] if argv is None else list(argv)
    is_lism = bool(argv) and argv[0] == "lism"
    common.document_defaults(p, _defaults())
    args = p.parse_args(argv[1:] if is_lism else argv)
    common.apply_defaults(args, _defaults())
    args.lism_only = is_lism
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.lism_only:   # one process; bad input ends in one message and exit code 2, as in training
        return common._user_errors_as_exit(lism_main, args)
    return common.launch(train, args)


if __name__ == "__main__":
    main()
