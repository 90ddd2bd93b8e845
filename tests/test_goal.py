"""Tests for goal.py: losses against loop references, glue (position stretch, box -> patch mapping, region
and span pooling) on a tiny random open_clip model, 2-process equality, and a short learning run."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import goal  # noqa: E402

def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1).requires_grad_(True)


# ---------------------------------------------------------------- loop references
def _ref_contrastive(img, txt, log_scale):
    n = img.shape[0]
    scale = log_scale.exp()
    total_i2t = 0.0
    total_t2i = 0.0
    for i in range(n):
        row = torch.stack([scale * torch.dot(img[i], txt[j]) for j in range(n)])
        total_i2t = total_i2t - (row[i] - torch.logsumexp(row, 0))
        col = torch.stack([scale * torch.dot(txt[i], img[j]) for j in range(n)])
        total_t2i = total_t2i - (col[i] - torch.logsumexp(col, 0))
    return 0.5 * (total_i2t / n + total_t2i / n)


def _ref_tsl(region, crop, span, sent):
    n = region.shape[0]
    img = sum((1 - torch.dot(region[b], crop[b]) / (region[b].norm() * crop[b].norm())) ** 2 for b in range(n)) / n
    txt = sum((1 - torch.dot(span[b], sent[b]) / (span[b].norm() * sent[b].norm())) ** 2 for b in range(n)) / n
    return img + txt


def _close_with_grads(out, ref, inputs):
    assert torch.allclose(out, ref, atol=1e-10, rtol=1e-10), (out, ref)
    g_out = torch.autograd.grad(out, inputs, retain_graph=True)
    g_ref = torch.autograd.grad(ref, inputs, retain_graph=True)
    for a, b in zip(g_out, g_ref):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_contrastive_matches_loop():
    img, txt = _unit(6, 8, seed=1), _unit(6, 8, seed=2)
    log_scale = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    _close_with_grads(goal.contrastive_loss(img, txt, log_scale), _ref_contrastive(img, txt, log_scale),
                      (img, txt, log_scale))


def test_tsl_matches_loop():
    # raw vectors in, normalised before the loss; the reference computes cosines from norms itself
    raw = [torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(s)).requires_grad_(True)
           for s in range(4)]
    out, parts = goal.tsl_loss(*(F.normalize(x, dim=-1) for x in raw))
    _close_with_grads(out, _ref_tsl(*raw), raw)
    region, crop, span, sent = (F.normalize(x, dim=-1) for x in raw)
    assert set(parts) == {"tsl_img", "tsl_txt"}
    # identical pairs give zero loss
    same, _ = goal.tsl_loss(crop, crop, sent, sent)
    assert same.item() < 1e-20


def test_goal_loss_total_and_zero_weights():
    embs = [_unit(4, 8, seed=s) for s in range(6)]
    log_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    out, parts = goal.goal_loss(*embs, log_scale, local_weight=0.5, tsl_weight=1.0)
    img, txt, crop, sent, region, span = embs
    tsl_ref = (sum((1 - torch.dot(region[b], crop[b])) ** 2 for b in range(4)) / 4
               + sum((1 - torch.dot(span[b], sent[b])) ** 2 for b in range(4)) / 4)
    ref = (_ref_contrastive(img, txt, log_scale) + 0.5 * _ref_contrastive(crop, sent, log_scale) + tsl_ref)
    _close_with_grads(out, ref, (*embs, log_scale))
    assert set(parts) == {"global", "local", "tsl_img", "tsl_txt", "total"}
    plain, plain_parts = goal.goal_loss(*embs, log_scale, local_weight=0.0, tsl_weight=0.0)
    assert torch.equal(plain, goal.contrastive_loss(img, txt, log_scale))
    assert set(plain_parts) == {"global", "total"}


# ---------------------------------------------------------------- position stretch
def test_stretch_is_longclip_77_to_248():
    pos = torch.randn(77, 16, dtype=torch.float64)
    new = goal.stretch_positions(pos, 248, keep=20)
    assert new.shape == (248, 16)
    ref = torch.zeros(248, 16, dtype=torch.float64)
    ref[:20] = pos[:20]
    for i in range(56):
        for r in range(4):
            ref[20 + 4 * i + r] = (4 - r) / 4 * pos[20 + i] + r / 4 * pos[21 + i]
    for r in range(4):
        ref[244 + r] = pos[76] + r / 4 * (pos[76] - pos[75])
    assert torch.allclose(new, ref, atol=1e-12)


def _tiny_model():
    import open_clip
    torch.manual_seed(0)
    return open_clip.create_model(
        "ViT-B-32", embed_dim=64, vision_cfg=dict(image_size=64, patch_size=8, width=64, layers=1),
        text_cfg=dict(context_length=32, width=64, heads=2, layers=1)).eval()


def test_stretch_tiny_model_and_long_tokenizer():
    import open_clip
    model = _tiny_model()
    old_pos = model.positional_embedding.detach().clone()
    goal.stretch_text_positions(model, 104, keep=8)
    assert model.positional_embedding.shape == (104, 64) and model.positional_embedding.requires_grad
    assert torch.equal(model.positional_embedding[:8].detach(), old_pos[:8])
    assert torch.allclose(model.positional_embedding[8 + 4 * 5].detach(), old_pos[8 + 5])  # originals land every 4
    assert model.attn_mask.shape == (104, 104) and model.context_length == 104
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=104)
    long_text = ". ".join(["a small red circle is to the left of a large blue square"] * 5) + "."
    ids = tok([long_text, "a circle"])
    assert ids.shape == (2, 104) and (ids[0] != 0).sum() > 32  # longer than the old context, not truncated
    with torch.no_grad():
        pooled, tokens = goal.encode_text_with_tokens(model, ids)
        assert torch.allclose(pooled, model.encode_text(ids), atol=1e-5)
    assert tokens.shape == (2, 104, 64)


def test_image_tokens_one_pass_matches_encode_image():
    model = _tiny_model()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pooled, tokens = goal.encode_image_with_tokens(model, images)
        assert torch.allclose(pooled, model.encode_image(images), atol=1e-5)
    assert tokens.shape == (3, 1 + 64, 64)


# ---------------------------------------------------------------- box -> patch grid
def _ref_patch_mask(box, image_size, patch):
    grid = image_size // patch
    x1, y1, x2, y2 = box
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    for row in range(grid):
        for col in range(grid):
            # a patch is selected when the box overlaps it with positive area
            overlap_x = min(x2, (col + 1) * patch) - max(x1, col * patch)
            overlap_y = min(y2, (row + 1) * patch) - max(y1, row * patch)
            mask[row * grid + col] = overlap_x > 0 and overlap_y > 0
    return mask


def test_box_patch_mask_model_grid():
    boxes = [[0, 0, 64, 64], [8, 16, 24, 40], [9.5, 3, 10.5, 60], [0, 0, 1, 1], [56, 56, 64, 64], [30, 2, 47.9, 17]]
    mask = goal.box_patch_mask(torch.tensor(boxes), image_size=64, patch_size=8)
    assert mask.shape == (6, 64)
    for b, box in enumerate(boxes):
        assert torch.equal(mask[b], _ref_patch_mask(box, 64, 8)), box
    assert mask[0].all() and mask[1].sum() == 2 * 3
    # ViT-B/16 at 224: 14x14 grid
    big = goal.box_patch_mask(torch.tensor([[20.0, 40.0, 100.0, 60.0]]), image_size=224, patch_size=16)
    assert torch.equal(big[0], _ref_patch_mask([20, 40, 100, 60], 224, 16))


def test_box_patch_mask_released_runs_to_corner():
    # the release divides by the crop's own size: x2 * S / w >= S, so the region always reaches the last column/row
    rel = goal.box_patch_mask(torch.tensor([[689.0, 802.0, 973.0, 1500.0]]), image_size=224, patch_size=16,
                              released=True)
    assert rel[0].nonzero().flatten().tolist() == [13 * 14 + 13]  # this DCI box maps to patch (13, 13) under the release's rule
    # the tiny 64-px model (8 x 8 cells of 8 px): x1 = 8 * 64 / 16 = 32 -> column 4, x2 = 96 -> clamped -> column 7.
    # (16-px cells, the release's hard-coded size, would give columns 2..3: the middle of the grid, not the corner.)
    rel = goal.box_patch_mask(torch.tensor([[8.0, 8.0, 24.0, 24.0]]), image_size=64, patch_size=8, released=True)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:, 4:] = True
    assert torch.equal(rel[0].view(8, 8), expected)


def _ref_released_mask(box, image_size, patch):
    """The release's get_patch_tokens_from_bbox (goal_loss_finetuning.py), line by line, with `patch_size` the
    model's cell (image_size / grid) instead of its hard-coded 16; the boxes below keep the scaled coordinates
    away from cell borders, so the release's int(round(...)) does not matter."""
    grid = image_size // patch
    cell = image_size / grid
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1                       # bbox['width'] / bbox['height']: the crop's own size
    x1, x2 = min(max(x1 * image_size / w, 0), image_size - 1), min(max(x2 * image_size / w, 0), image_size)
    y1, y2 = min(max(y1 * image_size / h, 0), image_size - 1), min(max(y2 * image_size / h, 0), image_size)
    mask = torch.zeros(grid * grid, dtype=torch.bool)
    for i in range(int(y1 // cell), math.ceil(y2 / cell)):
        for j in range(int(x1 // cell), math.ceil(x2 / cell)):
            mask[i * grid + j] = True
    return mask


@pytest.mark.parametrize("image_size,patch", [(64, 8), (224, 16), (224, 14)])   # tiny shapes, ViT-B/16, ViT-L/14
def test_box_patch_mask_released_reaches_the_corner_on_every_grid(image_size, patch):
    """--released-box-mapping cuts the model's own cells, so every box's region runs to the bottom-right patch, as
    the release's does on its ViT-B/16 (arithmetic only: no model is built)."""
    grid = image_size // patch
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 2, 2, generator=g) * image_size
    boxes = torch.cat([corners.min(1).values, corners.max(1).values + 1], 1)   # [x1, y1, x2, y2], w, h >= 1
    mask = goal.box_patch_mask(boxes, image_size, patch, released=True)
    assert mask.shape == (200, grid * grid)
    assert mask[:, -1].all()                                   # the last patch (row G-1, column G-1), every box
    rows, cols = mask.view(200, grid, grid).any(2), mask.view(200, grid, grid).any(1)
    assert rows[:, -1].all() and cols[:, -1].all()
    # fixed boxes whose scaled starts sit inside a cell, at least 1.6 px from its borders (so that the release's
    # int(round(...)) cannot matter): exactly the release's patch set on this grid
    fixed = [[3, 7, 33, 20], [20, 2, 50, 14]] if image_size == 64 else \
        [[10, 20, 110, 61], [31, 6, 150, 45], [2, 2, 200, 203]]
    for box in fixed:
        got = goal.box_patch_mask(torch.tensor([box]), image_size, patch, released=True)[0]
        assert torch.equal(got, _ref_released_mask(box, image_size, patch)), (image_size, patch, box)


# ---------------------------------------------------------------- region / span pooling and TSL on the model
def test_region_and_span_embed_match_loops():
    model = _tiny_model().double()
    tokens = torch.randn(2, 65, 64, dtype=torch.float64)
    mask = goal.box_patch_mask(torch.tensor([[8.0, 16.0, 24.0, 40.0], [0.0, 0.0, 64.0, 8.0]]), 64, 8)
    out = goal.region_embed(model, tokens, mask)
    for b in range(2):
        sel = [tokens[b, 1 + k] for k in range(64) if mask[b, k]]
        ref = model.visual.ln_post(sum(sel) / len(sel)) @ model.visual.proj
        assert torch.allclose(out[b], ref, atol=1e-10)
    text_tokens = torch.randn(2, 32, 64, dtype=torch.float64)
    spans = torch.tensor([[1, 5], [7, 20]])
    out = goal.span_embed(model, text_tokens, spans)
    for b in range(2):
        s, e = spans[b].tolist()
        ref = model.ln_final(sum(text_tokens[b, p] for p in range(s, e)) / (e - s)) @ model.text_projection
        assert torch.allclose(out[b], ref, atol=1e-10)


def test_tsl_on_tiny_model_reaches_both_paths():
    model = _tiny_model()
    images, crops = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
    texts = torch.randint(1, 40000, (2, 32))
    texts[:, 0], texts[:, 20] = 49406, 49407
    sents = torch.randint(1, 40000, (2, 32))
    sents[:, 0], sents[:, 6] = 49406, 49407
    _, img_tokens = goal.encode_image_with_tokens(model, images)
    crop_emb, _ = goal.encode_image_with_tokens(model, crops)
    _, txt_tokens = goal.encode_text_with_tokens(model, texts)
    sent_emb, _ = goal.encode_text_with_tokens(model, sents)
    mask = goal.box_patch_mask(torch.tensor([[8.0, 8.0, 32.0, 32.0]] * 2), 64, 8)
    region = F.normalize(goal.region_embed(model, img_tokens, mask), dim=-1)
    span = F.normalize(goal.span_embed(model, txt_tokens, torch.tensor([[1, 6], [6, 12]])), dim=-1)
    loss, _ = goal.tsl_loss(region, F.normalize(crop_emb, dim=-1), span, F.normalize(sent_emb, dim=-1))
    loss.backward()
    for p in (model.visual.conv1.weight, model.visual.ln_post.weight, model.visual.proj,
              model.token_embedding.weight, model.ln_final.weight, model.text_projection):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------- 2 gloo processes == 1 process
def _features(seed, n=8, d=8):
    g = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(6)]


def _rank_fn(rank, world_size, seed):
    import common
    feats = _features(seed)
    n = feats[0].shape[0] // world_size
    local = [f[rank * n:(rank + 1) * n].clone().requires_grad_(True) for f in feats]
    gathered = [common.gather_features(x) for x in local]
    log_scale = torch.tensor(math.log(30.0), dtype=torch.float64)
    loss, _ = goal.goal_loss(*gathered, log_scale, local_weight=0.5, tsl_weight=1.0)
    grads = torch.autograd.grad(loss, local)
    return loss.item(), [g.detach().numpy() for g in grads]  # numpy: tensors would travel via shared memory


def test_two_processes_equal_one():
    import common
    feats = [f.requires_grad_(True) for f in _features(7)]
    log_scale = torch.tensor(math.log(30.0), dtype=torch.float64)
    loss, _ = goal.goal_loss(*feats, log_scale, local_weight=0.5, tsl_weight=1.0)
    full_grads = torch.autograd.grad(loss, feats)
    results = common.run_cpu_processes(_rank_fn, 2, 7)
    for rank, (rank_loss, rank_grads) in enumerate(results):
        assert abs(rank_loss - loss.item()) < 1e-10
        for g_rank, g_full in zip(rank_grads, full_grads):
            assert torch.allclose(torch.from_numpy(g_rank), g_full[rank * 4:(rank + 1) * 4], atol=1e-10)


# ---------------------------------------------------------------- LISM decision
def _ref_lism(scores):
    n_candidates, n_sentences = scores.shape
    best = None
    for j in range(n_sentences):
        column = [scores[i, j].item() for i in range(n_candidates)]
        i = column.index(max(column))
        if i == 0:          # the sentence prefers the full image: dropped
            continue
        if best is None or column[i] > best[2]:
            best = (i - 1, j, column[i])
    return best


def test_lism_best_pair_matches_loop():
    g = torch.Generator().manual_seed(3)
    for trial in range(200):
        scores = torch.randn(1 + int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g)),
                             generator=g)
        if trial % 7 == 0:
            scores[0] += 10     # every sentence prefers the full image
        ref = _ref_lism(scores)
        out = goal.lism_best_pair(scores)
        assert (out is None) == (ref is None)
        if ref is not None:
            assert out[:2] == ref[:2] and abs(out[2] - ref[2]) < 1e-6
    # several sentences may pick the same crop; the full image never becomes the pair
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.1, 0.3, 0.2]])
    assert goal.lism_best_pair(scores)[:2] == (0, 1)


def test_area_filter_keeps_1_to_80_percent_of_the_image():
    boxes = [[0, 0, 10, 10], [0, 0, 9, 9], [0, 0, 80, 100], [0, 0, 89, 90], [0, 0, 100, 100]]   # image 100 x 100
    assert goal.keep_by_area(boxes, (100, 100)) == [0, 2]   # 1%, 0.81%, 80%, 80.1%, 100% of the image
    assert goal.keep_by_area(boxes, (100, 100), areas=[50, 100, 100, 8000, 9000]) == [1, 2, 3]   # mask areas


def test_segments_file_carries_mask_areas(tmp_path):
    import json
    import data
    path = tmp_path / "sam.json"
    path.write_text(json.dumps({"a.jpg": {"boxes": [[0, 0, 10, 10], [0, 0, 5, 5]], "areas": [60, 20]}}))
    assert data.load_segments(str(path))["a.jpg"]["areas"] == [60.0, 20.0]
    path.write_text(json.dumps({"a.jpg": {"boxes": [[0, 0, 10, 10]], "areas": [60, 20]}}))
    with pytest.raises(data.DataError, match="one number per box"):
        data.load_segments(str(path))


def test_lism_encodes_a_fixed_number_of_candidates_per_forward(monkeypatch):
    """Batching the candidates across images (3 per forward) gives the matching of one big forward."""
    import common
    import data
    model, _, val_tf, tokenizer = common.create_backbone(common.TINY_MODEL, None)
    world = data.ShapesDataset("train", size=6, image_size=model.visual.image_size[0], seed=0, transform=val_tf,
                               long=True)
    sizes, encode_image = [], model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda images: sizes.append(len(images)) or encode_image(images))
    one_forward = goal.run_lism(model, tokenizer, world, tokenizer, "cpu", crops_per_forward=10_000)
    assert len(sizes) == 1
    sizes.clear()
    batched = goal.run_lism(model, tokenizer, world, tokenizer, "cpu", crops_per_forward=3)
    assert max(sizes) == 3 and sum(sizes) == sum(1 + len(entry["boxes"]) for entry in batched.values())
    assert batched.keys() == one_forward.keys() and len(batched) > 0
    for key, entry in one_forward.items():
        assert entry["boxes"] == batched[key]["boxes"]
        assert [p["sentence"] for p in entry["pairs"]] == [p["sentence"] for p in batched[key]["pairs"]]
        for p, q in zip(entry["pairs"], batched[key]["pairs"]):
            assert p["score"] == pytest.approx(q["score"], abs=1e-3)


def test_padding_trim_is_exact():
    model = _tiny_model()
    goal.stretch_text_positions(model, 104, keep=8)
    texts = torch.zeros(3, 104, dtype=torch.long)
    for b, length in enumerate((5, 40, 12)):
        texts[b, 0], texts[b, 1:length - 1], texts[b, length - 1] = 49406, 320 + b, 49407
    forward = goal.GoalForward(model, with_local=False)
    assert forward._trim(texts).shape == (3, 40)
    with torch.no_grad():
        full, full_tokens = goal.encode_text_with_tokens(model, texts)
        trimmed, trimmed_tokens = goal.encode_text_with_tokens(model, forward._trim(texts))
    assert torch.allclose(full, trimmed, atol=1e-5)
    assert torch.allclose(full_tokens[:, :40], trimmed_tokens, atol=1e-5)


# ---------------------------------------------------------------- learning: long-caption retrieval improves
def _long_r1(model, tokenizer, transform, n_scenes):
    """Long-caption retrieval R@1 (mean of both directions, %) on held-out shapes test scenes."""
    import data
    world = data.ShapesDataset("test", size=n_scenes, seed=0, transform=transform, long=True)
    model.eval()
    with torch.no_grad():
        image_emb = F.normalize(model.encode_image(torch.stack([world[i]["image"] for i in range(n_scenes)])), dim=-1)
        text_emb = F.normalize(model.encode_text(tokenizer(world.captions)), dim=-1)
    similarity = image_emb @ text_emb.t()
    target = torch.arange(n_scenes)
    i2t = (similarity.argmax(1) == target).float().mean()
    t2i = (similarity.argmax(0) == target).float().mean()
    return 50.0 * (i2t + t2i).item()


LONG_SCENES = 500   # held-out scenes for long-caption retrieval (one long caption each)


@pytest.fixture(scope="module")
def long_r1_after_short_runs(shapes_base, tmp_path_factory):
    """Long-caption R@1 of the shipped base stretched to GOAL's context (104 tokens, no training), and after 60 steps
    of 32 on 1,920 scenes of plain long-caption fine-tuning (`--local-weight 0 --tsl-weight 0`, GOAL's paper
    baseline) and of GOAL, same seed, data and context."""
    import common
    import open_clip
    context = goal.SHAPES_GOAL_DEFAULTS["context_length"]
    long_tokenizer = open_clip.get_tokenizer(common.TINY_MODEL, context_length=context)
    base, _, val_tf, _ = common.create_backbone(common.TINY_MODEL, shapes_base)
    goal.stretch_text_positions(base, context, keep=goal.SHAPES_GOAL_DEFAULTS["keep_positions"])
    scores = {"base": _long_r1(base, long_tokenizer, val_tf, LONG_SCENES)}
    for setting, flags in (("plain-long", ["--local-weight", "0", "--tsl-weight", "0"]), ("goal", [])):
        out = tmp_path_factory.mktemp(setting)
        torch.manual_seed(0)
        goal.train(goal.parse_args([
            "--pretrained", shapes_base, *flags, "--steps", "60", "--batch-size", "32", "--train-size", "1920",
            "--warmup", "5", "--eval", "", "--out", str(out), "--seed", "0", "--no-progress", "--save-every", "0"]))
        tuned, _, _, tokenizer = common.create_backbone("local-dir:" + str(out), None)
        assert tokenizer.context_length == context
        scores[setting] = _long_r1(tuned, tokenizer, val_tf, LONG_SCENES)
    print({k: round(v, 2) for k, v in scores.items()})
    return scores


def _r1_difference_error(n_scenes=LONG_SCENES):
    """One standard error, in points, of the difference of two mean-of-both-directions R@1 values at p = 0.5."""
    return 100 * math.sqrt(2) * math.sqrt(2 * 0.25 / n_scenes) / 2


def test_goal_raises_long_retrieval_over_the_stretched_base(long_r1_after_short_runs):
    """GOAL's long-caption R@1 rises above the base at the same stretched context by more than one standard error
    of the difference (2.2 points on 500 scenes). Measured: base 61.3, GOAL 68.4."""
    r1 = long_r1_after_short_runs
    assert r1["goal"] > r1["base"] + _r1_difference_error(), r1


def test_goal_against_plain_long_caption_training(long_r1_after_short_runs):
    """The paper's baseline, plain fine-tuning on the same long captions at the same context, learns too, and on
    this testbed it stays ahead of GOAL: measured base 61.3, plain 76.1, GOAL 68.4, the gap of the comparison's
    budget (-7.8 +- 0.1 over 3 seeds of 1000 steps; docs/results_goal.md explains where it comes from). A change
    that closes the gap fails the second assertion: it is a new result, to be recorded there."""
    r1 = long_r1_after_short_runs
    assert r1["plain-long"] > r1["base"] + _r1_difference_error(), r1
    assert r1["goal"] < r1["plain-long"], r1


def test_lism_scores_with_its_own_frozen_scorer(tmp_path, capsys):
    """`goal.py lism` scores with --scorer-model / --scorer-pretrained (real data: the paper's CLIP ViT-L/14-336;
    the shapes world: 'same', the starting model), through the scorer's own transform and tokenizer."""
    real = goal.parse_args(["lism", "--data", "docci", "--data-root", str(tmp_path)])
    assert (real.scorer_model, real.scorer_pretrained) == ("ViT-L-14-336-quickgelu", "openai")
    assert goal.parse_args(["lism"]).scorer_model == "same"
    out = tmp_path / "lism.json"
    goal.main(["lism", "--train-size", "6", "--scorer-model", "shapes-tiny-siglip", "--out", str(out)])
    assert "LISM scorer: shapes-tiny-siglip (shapes)" in capsys.readouterr().err
    import json
    matched = json.loads(out.read_text())
    assert len(matched) == 6 and all(set(entry) == {"boxes", "pairs"} for entry in matched.values())


def test_lism_cache_is_keyed_by_the_candidate_boxes(tmp_path, monkeypatch):
    """The shapes world's matching is cached, and read back only for the same scorer, captions and candidate boxes:
    a run with other boxes (`python -m lab.diag_goal_scale_preserving_boxes`) must not get the tight boxes' matching."""
    import common
    import data
    monkeypatch.setenv("COMPCLIP_CACHE", str(tmp_path / "cache"))
    args = goal.parse_args(["--train-size", "4", "--out", str(tmp_path / "run")])
    model, _, val_tf, tokenizer = common.create_backbone(args.model, args.pretrained)
    calls = []
    run_lism = goal.run_lism
    monkeypatch.setattr(goal, "run_lism", lambda *a, **k: calls.append(1) or run_lism(*a, **k))

    def matching():
        return goal._lism_pairs(args, model, tokenizer, val_tf, tokenizer, "cpu")

    first = matching()
    assert len(calls) == 1 and len(os.listdir(tmp_path / "cache")) == 1
    assert matching() == first and len(calls) == 1   # same world, same scorer: read from the cache
    monkeypatch.setattr(data.ShapesDataset, "candidate_boxes", lambda self, i: [[0.0, 0.0, 32.0, 32.0]])
    other = matching()
    assert len(calls) == 2 and len(os.listdir(tmp_path / "cache")) == 2
    assert all(entry["boxes"] == [[0.0, 0.0, 32.0, 32.0]] for entry in other.values())
    assert all(entry["boxes"] != [[0.0, 0.0, 32.0, 32.0]] for entry in first.values())


# ---------------------------------------------------------------- GOAL's released matching as --lism
# Four DCI images (the layout data.DciDataset reads) and, for each, the sentence-to-segment records of GOAL's
# released datasets/DCI_segment_sim_bbox_del_org.json: the release's placeholder folders, captions that are pieces
# of extra_caption.split('.') (no final period), boxes in original-image pixels with the crop's width/height.
_RELEASED_IMAGES = {   # name: (size, extra_caption, [(sentence, box, score)])
    "sa_101.jpg": ((96, 64), "A red square sits on the left. A blue ring floats on the right. The sky is dark.",
                   [("A red square sits on the left", (4, 10, 40, 50), 27.5),
                    ("A blue ring floats on the right", (60, 8, 92, 40), 31.25)]),
    "sa_102.jpg": ((64, 96), "A green star is at the top. The ground is grey.",
                   [("A green star is at the top", (10, 2, 54, 40), 29.0)]),
    "sa_103.jpg": ((80, 80), "Two cats sleep. One cat is white. The other cat is black.",
                   [("One cat is white", (0, 20, 40, 80), 22.0), ("The other cat is black", (40, 20, 80, 80), 26.5)]),
    "sa_104.jpg": ((64, 64), "A lone tree stands in a field. Clouds drift above it.",
                   [("Clouds drift above it", (0, 0, 64, 30), 24.0)]),
}


def _released_fixture(tmp_path):
    """DCI root with the four images, and GOAL's released matching (grouped form) for them."""
    import json
    from PIL import Image
    root = tmp_path / "densely_captioned_images"
    (root / "annotations").mkdir(parents=True)
    (root / "photos").mkdir()
    records = []
    for i, (name, (size, extra, segments)) in enumerate(_RELEASED_IMAGES.items()):
        Image.new("RGB", size, (40 * i, 90, 200 - 40 * i)).save(root / "photos" / name)
        stem = name[:-4]
        (root / "annotations" / f"{stem}.json").write_text(json.dumps(
            {"image": name, "short_caption": "A photo.", "extra_caption": extra}))
        # the grouped training files are not public: their original_filename may name the image itself or LISM's
        # copy of it inside "<image>_results/"; the fixture has both
        original = f"{name}_results/original_image.jpg" if i == 0 else name
        records.append({
            "original_filename": f"chage/path/to/your/directory/{original}",
            "original_caption": extra,
            "segment": [{"filename": f"chage/path/to/your/directory/{name}_results/{stem}_max_{k + 3}.png",
                         "caption": sentence, "similarity_score": score,
                         "bbox_coordinates": {"x1": box[0], "y1": box[1], "x2": box[2], "y2": box[3],
                                              "width": box[2] - box[0], "height": box[3] - box[1]}}
                        for k, (sentence, box, score) in enumerate(segments)]})
    (root / "splits.json").write_text(json.dumps({"train": [f"{n[:-4]}.json" for n in _RELEASED_IMAGES],
                                                  "valid": [], "test": []}))
    matching = tmp_path / "DCI_segment_sim_bbox_del_org.json"
    matching.write_text(json.dumps(records, indent=4))
    return root, matching, records


def test_released_matching_is_read_as_local_pairs(tmp_path):
    """The release's grouped file and its flat one-pair variant become our segments entries, keyed by the image's
    file name; a DCI data set finds each image's pairs and picks the highest similarity_score, as the release does."""
    import json
    import data
    root, matching, records = _released_fixture(tmp_path)
    segments = data.load_segments(str(matching), need_pairs=True)
    assert sorted(segments) == sorted(_RELEASED_IMAGES)
    entry = segments["sa_101.jpg"]
    assert entry["pairs"] == [{"sentence": "A red square sits on the left", "box": [4.0, 10.0, 40.0, 50.0], "score": 27.5},
                              {"sentence": "A blue ring floats on the right", "box": [60.0, 8.0, 92.0, 40.0],
                               "score": 31.25}]
    assert entry["boxes"] == [[4.0, 10.0, 40.0, 50.0], [60.0, 8.0, 92.0, 40.0]]
    # the flat variant (datasets/DCI_segment_only_sim_max_del_org.json): one record per image, the image named by
    # the crop's "<image>_results" folder
    flat = [dict(max(r["segment"], key=lambda s: s["similarity_score"])) for r in records]
    (tmp_path / "flat.json").write_text(json.dumps(flat))
    flat_segments = data.load_segments(str(tmp_path / "flat.json"), need_pairs=True)
    assert sorted(flat_segments) == sorted(_RELEASED_IMAGES)
    assert flat_segments["sa_101.jpg"]["pairs"] == [entry["pairs"][1]]
    # through the DCI loader and LocalPairs: the best pair of each image, its sentence found in the long caption
    import open_clip
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    dataset = data.LocalPairs(data.DciDataset(str(root), _val_transform(64), segments_file=str(matching)), tokenizer)
    local = dataset[0]["local"]
    assert local["sentence"] == "A blue ring floats on the right" and local["box"] != [0.0, 0.0, 64.0, 64.0]


def _val_transform(size):
    from torchvision import transforms
    return transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor()])


def test_training_on_the_released_matching(tmp_path, monkeypatch):
    """`goal.py --data dci --data-root ROOT --lism DCI_segment_sim_bbox_del_org.json` trains (2 steps, tiny model) on
    the release's pairs: every local pair of every batch is one of the file's (sentence, box), never the fallback."""
    import data
    root, matching, _ = _released_fixture(tmp_path)
    used = []
    build = data.LocalPairs._build_from_original

    def spy(self, dataset, index, image, sample):
        local = build(self, dataset, index, image, sample)
        used.append((sample["image_id"], local["sentence"], local["box"]))
        return local
    monkeypatch.setattr(data.LocalPairs, "_build_from_original", spy)
    out = tmp_path / "run"
    result = goal.main(["--data", "dci", "--data-root", str(root), "--lism", str(matching),
                        "--model", "shapes-tiny-vit", "--pretrained", "none", "--batch-size", "2", "--steps", "2",
                        "--workers", "0", "--eval", "", "--out", str(out), "--no-progress", "--save-every", "0"])
    assert (out / "final.pt").exists(), result
    best = {name[:-4]: max(segments, key=lambda s: s[2])[0] for name, (_, _, segments) in _RELEASED_IMAGES.items()}
    assert len(used) >= 4   # 2 steps x batch 2
    for image_id, sentence, box in used:
        assert sentence == best[image_id], (image_id, sentence)
        assert box != [0.0, 0.0, 64.0, 64.0]   # a region, not the full-image fallback


def test_a_lism_file_in_neither_format_says_so(tmp_path, capsys):
    import json
    import data
    root, _, _ = _released_fixture(tmp_path)
    bad = tmp_path / "DCI_test.json"   # the release's test list is not a matching
    bad.write_text(json.dumps([{"filename": "../DCI/photos/sa_101.jpg", "caption": "A red square."}]))
    with pytest.raises(data.DataError, match="neither format") as error:
        data.load_segments(str(bad), need_pairs=True)
    assert "original_filename" in str(error.value) and '"pairs"' in str(error.value)
    with pytest.raises(SystemExit) as exit_info:
        goal.main(["--data", "dci", "--data-root", str(root), "--lism", str(bad), "--model", "shapes-tiny-vit",
                   "--pretrained", "none", "--eval", "", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "neither format" in err and "Traceback" not in err, err[-2000:]
