"""Tests for degla.py: losses vs naive loop references, 2-process equality, a short learning run."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import degla  # noqa: E402

N, K, D = 6, 3, 8


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).requires_grad_(True)


def _inputs(seed=0, with_invalid=True):
    v, t, n = _unit(N, D, seed=seed), _unit(N, D, seed=seed + 1), _unit(N, K, D, seed=seed + 2)
    tv, tt, tn = _unit(N, D, seed=seed + 3), _unit(N, D, seed=seed + 4), _unit(N, K, D, seed=seed + 5)
    s = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    valid = torch.ones(N, K, dtype=torch.bool)
    if with_invalid:
        valid[0, 1] = valid[3, 0] = valid[3, 2] = False
    return v, t, n, tv, tt, tn, s, valid


def _dot(a, b):
    return sum(a[d] * b[d] for d in range(len(a)))


def _assert_same(loss, ref, inputs):
    assert torch.allclose(loss, ref, rtol=1e-10, atol=1e-12), (loss.item(), ref.item())
    grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, inputs, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            assert torch.allclose(g, r, rtol=1e-9, atol=1e-12)


# ----- naive references: explicit loops over samples, straight from the paper's equations ----------
def ref_global(v, t, n, s, valid):
    i2t, t2i = 0.0, 0.0
    for i in range(N):
        denom = sum(torch.exp(s * _dot(v[i], t[j])) for j in range(N))
        for j in range(N):
            for k in range(K):
                if valid[j, k]:
                    denom = denom + torch.exp(s * _dot(v[i], n[j, k]))
        i2t = i2t - torch.log(torch.exp(s * _dot(v[i], t[i])) / denom)
        denom = sum(torch.exp(s * _dot(t[i], v[j])) for j in range(N))
        t2i = t2i - torch.log(torch.exp(s * _dot(t[i], v[i])) / denom)
    return (i2t / N + t2i / N) / 2


def ref_plain_clip(v, t, s):
    total = 0.0
    for i in range(N):
        row = torch.stack([s * _dot(v[i], t[j]) for j in range(N)])
        col = torch.stack([s * _dot(t[i], v[j]) for j in range(N)])
        total = total - (row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return total / (2 * N)


def ref_distill(v, t, n, tv, tt, tn, valid):
    total = 0.0
    for i in range(N):
        total = total + sum((v[i, d] - tv[i, d].detach()) ** 2 for d in range(D))
        total = total + sum((t[i, d] - tt[i, d].detach()) ** 2 for d in range(D))
        for k in range(K):
            if valid[i, k]:
                total = total + sum((n[i, k, d] - tn[i, k, d].detach()) ** 2 for d in range(D))
    return total


def ref_igc(v, t, n, s, valid):
    total = 0.0
    for i in range(N):
        pos = torch.exp(s * _dot(v[i], t[i]))
        denom = pos + sum(torch.exp(s * _dot(v[i], n[i, k])) for k in range(K) if valid[i, k])
        total = total - torch.log(pos / denom)
    return total / N


def ref_tgc(t, tt, n, valid, scale, released):
    total = 0.0
    for i in range(N):
        pos = torch.exp(scale * _dot(t[i], tt[i].detach()))
        denom = pos
        for k in range(K):
            if released:  # flat column k*N + i of the sample-major layout: sample c // K, slot c % K
                c = k * N + i
                j, kk = c // K, c % K
            else:
                j, kk = i, k
            if valid[j, kk]:
                denom = denom + torch.exp(scale * _dot(t[i], n[j, kk]))
        total = total - torch.log(pos / denom)
    return total / N


# ----- value and gradient of every loss against its reference ----------------------------------------
@pytest.mark.parametrize("with_invalid", [False, True])
def test_global_loss(with_invalid):
    v, t, n, _, _, _, s, valid = _inputs(1, with_invalid)
    loss, parts = degla.global_contrastive_loss(v, t, n, s, valid)
    _assert_same(loss, ref_global(v, t, n, s, valid), (v, t, n, s))
    assert set(parts) == {"global_i2t", "global_t2i"}


def test_global_loss_without_negatives_is_plain_clip():
    v, t, _, _, _, _, s, _ = _inputs(2)
    loss, _ = degla.global_contrastive_loss(v, t, None, s)
    _assert_same(loss, ref_plain_clip(v, t, s), (v, t, s))


@pytest.mark.parametrize("with_invalid", [False, True])
def test_distill_loss(with_invalid):
    v, t, n, tv, tt, tn, _, valid = _inputs(3, with_invalid)
    loss, _ = degla.distill_loss(v, t, n, tv, tt, tn, valid)
    _assert_same(loss, ref_distill(v, t, n, tv, tt, tn, valid), (v, t, n, tv, tt, tn))


@pytest.mark.parametrize("with_invalid", [False, True])
def test_igc_loss(with_invalid):
    v, t, n, _, _, _, s, valid = _inputs(4, with_invalid)
    loss, _ = degla.igc_loss(v, t, n, s, valid)
    _assert_same(loss, ref_igc(v, t, n, s, valid), (v, t, n, s))


@pytest.mark.parametrize("mask", ["own", "tile_as_released"])
@pytest.mark.parametrize("with_invalid", [False, True])
def test_tgc_loss(mask, with_invalid):
    _, t, n, _, tt, _, _, valid = _inputs(5, with_invalid)
    loss, _ = degla.tgc_loss(t, tt, n, 10.0, valid, mask)
    _assert_same(loss, ref_tgc(t, tt, n, valid, 10.0, mask != "own"), (t, tt, n))


def test_released_tgc_mask_uses_mostly_other_samples_negatives():
    cols = degla.released_tgc_columns(8, 4)
    owners = cols // 4
    assert owners[0].tolist() == [0, 2, 4, 6]                      # row 0: one of its own, three foreign
    assert (owners == torch.arange(8)[:, None]).sum() < 8 * 4 / 2


def test_total_loss_weights():
    v, t, n, tv, tt, tn, s, valid = _inputs(6)
    kw = dict(teacher_image_emb=tv, teacher_pos_text_emb=tt, teacher_neg_text_emb=tn, neg_valid=valid)
    loss, parts = degla.degla_loss(v, t, n, s, **kw)
    expected = (ref_global(v, t, n, s, valid) + 0.005 * ref_distill(v, t, n, tv, tt, tn, valid)
                + 0.1 * ref_igc(v, t, n, s, valid) + 0.1 * ref_tgc(t, tt, n, valid, 10.0, False))
    _assert_same(loss, expected, (v, t, n, s))
    assert math.isclose(parts["total"], float(loss.detach()))
    plain, parts = degla.degla_loss(v, t, n, s, neg_valid=valid, global_negatives=False, distill_weight=0,
                                    igc_weight=0, tgc_weight=0)
    _assert_same(plain, ref_plain_clip(v, t, s), (v, t, s))
    assert set(parts) == {"global_i2t", "global_t2i", "global", "total"}


# ----- 2 gloo processes with gathered features == 1 process on the whole batch -------------------------
def _rank_loss(rank, world_size, full, kwargs):
    import common
    per = N // world_size
    local = [x[rank * per:(rank + 1) * per].detach().clone().requires_grad_(True) for x in full[:3]]
    teacher = [x[rank * per:(rank + 1) * per].detach().clone() for x in full[3:6]]
    valid = full[7][rank * per:(rank + 1) * per]
    gathered = [common.gather_features(x) for x in local]
    with torch.no_grad():
        gathered_teacher = [common.gather_features(x) for x in teacher]
    gathered_valid = common.gather_features(valid.long()).bool()
    loss, parts = degla.degla_loss(*gathered, full[6].detach(), *gathered_teacher, neg_valid=gathered_valid,
                                   **kwargs)
    grads = torch.autograd.grad(loss, local)
    return float(loss), [g.detach() for g in grads], parts


@pytest.mark.parametrize("tgc_mask", ["own", "tile_as_released"])
def test_two_processes_equal_one(tgc_mask):
    import common
    full = _inputs(7)
    kwargs = dict(tgc_mask=tgc_mask)
    results = common.run_cpu_processes(_rank_loss, 2, [x.detach() for x in full], kwargs)
    v, t, n, tv, tt, tn, s, valid = full
    loss, parts = degla.degla_loss(v, t, n, s.detach(), tv, tt, tn, neg_valid=valid, **kwargs)
    grads = torch.autograd.grad(loss, (v, t, n))
    per = N // 2
    for rank, (rank_loss, rank_grads, rank_parts) in enumerate(results):
        assert math.isclose(rank_loss, float(loss.detach()), rel_tol=1e-10)
        assert rank_parts.keys() == parts.keys()
        for g, full_g in zip(rank_grads, grads):
            assert torch.allclose(g, full_g[rank * per:(rank + 1) * per], rtol=1e-9, atol=1e-12)


# ----- learning: short seeded runs on the shapes world, each method against its paper's baseline ----------------
# From the shipped CLIP base, 60 steps of 32 on 1,920 scenes of plain fine-tuning (`--baseline plain`), of NegCLIP
# (`--baseline negclip`) and of DeGLA, same seed and data, scored on the first 500 held-out scenes of the suite.
# The demo-length run (200 steps of 64) is tests/test_demo.py.
SHORT_RUN = ["--steps", "60", "--batch-size", "32", "--warmup", "5", "--train-size", "1920", "--eval", "",
             "--save-every", "0", "--no-progress", "--seed", "0"]
NEGCLIP_TEST_SUBSETS = ("aro_relation", "aro_attribute", "swap_obj", "swap_att")
NEGCLIP_TEST_MARGIN = 2.0   # points; the "looser threshold" of the one-seed CI version, set before measuring
SCORED_SCENES = 500


def _subset_scores(model, tokenizer, transform, subsets, n_scenes=SCORED_SCENES):
    """{subset: accuracy} of shapes-suite subsets on the first `n_scenes` held-out scenes."""
    import data
    import eval as ev
    world, items = ev.shapes_suite_items(n_scenes=n_scenes)
    model.eval()
    image_emb, _ = ev.encode_images(model, [data.render_scene(s, 64) for s in world.scenes], transform, "cpu",
                                    workers=0)
    scores = {}
    for name in subsets:
        rows = torch.tensor([i for i, _, _ in items[name]])
        pos = ev.encode_texts(model, tokenizer, [p for _, p, _ in items[name]], "cpu")
        neg = ev.encode_texts(model, tokenizer, [n for _, _, n in items[name]], "cpu")
        scores[name] = ev.binary_choice_accuracy(image_emb[rows], pos, neg)
    return scores


def _difference_error(subsets, n_scenes=SCORED_SCENES):
    """One standard error, in points, of the difference of two runs' equally weighted subset means at chance
    (binomial, p = 0.5, independent runs): sqrt(2) x the standard error of one mean."""
    import eval as ev
    _, items = ev.shapes_suite_items(n_scenes=n_scenes)
    one_mean = sum(0.25 / len(items[name]) for name in subsets) ** 0.5 / len(subsets)
    return 100 * math.sqrt(2) * one_mean


@pytest.fixture(scope="module")
def short_run_scores(shapes_base, tmp_path_factory):
    """{setting: {subset: accuracy}} for plain fine-tuning, NegCLIP and DeGLA after the same short run."""
    import common
    scores = {}
    for setting, flags in (("plain", ["--baseline", "plain"]), ("negclip", ["--baseline", "negclip"]),
                           ("degla", [])):
        out = tmp_path_factory.mktemp(setting)
        degla.train(degla.parse_args(["--pretrained", shapes_base, *flags, *SHORT_RUN, "--out", str(out)]))
        tuned, _, val_tf, tokenizer = common.create_backbone(common.TINY_MODEL, str(out / "final.pt"))
        scores[setting] = _subset_scores(tuned, tokenizer, val_tf, NEGCLIP_TEST_SUBSETS + degla.TARGET_SUBSETS)
    print({b: {k: round(v, 2) for k, v in s.items()} for b, s in scores.items()})
    return scores


def test_degla_beats_plain_fine_tuning_on_its_target(short_run_scores):
    """DeGLA's target (mean of the replace and swap subsets) rises above plain fine-tuning on the same data, its
    paper's baseline, by more than one standard error of the difference at chance (1.6 points on 500 scenes).

    Measured: plain 68.51, DeGLA 71.20 (+2.69); the base scores 72.82 on these scenes, since 60 steps first cost it
    some accuracy. At the comparison's budget, 3 seeds: +4.8 +- 1.2 (docs/results.md)."""
    target = {s: sum(scores[k] for k in degla.TARGET_SUBSETS) / len(degla.TARGET_SUBSETS)
              for s, scores in short_run_scores.items()}
    margin = _difference_error(degla.TARGET_SUBSETS)
    assert target["degla"] > target["plain"] + margin, (target, margin)


def test_negclip_beats_plain_on_swap(short_run_scores):
    """NegCLIP's swapped-noun and swapped-adjective negatives lift the SWAP mean (swap_obj, swap_att) over plain
    fine-tuning by more than NEGCLIP_TEST_MARGIN points. Measured on the shipped base: plain 50.58, NegCLIP 54.37;
    the comparison's three-seed table is in docs/testbed.md."""
    swap = {b: (s["swap_obj"] + s["swap_att"]) / 2 for b, s in short_run_scores.items()}
    assert swap["negclip"] > swap["plain"] + NEGCLIP_TEST_MARGIN, swap


def test_negclip_beats_plain_on_aro(short_run_scores):
    """The same two runs: NegCLIP's reshuffled (noun phrases exchanged) and swapped-adjective negatives lift the
    ARO mean (aro_relation, aro_attribute) over plain fine-tuning by more than NEGCLIP_TEST_MARGIN points.

    Measured on the shipped base: plain 49.74, NegCLIP 53.01 (+3.3). Both are below the base here (56.65 on these
    500 scenes): 60 steps first cost the base some ARO, and NegCLIP loses less; the gains over the base come at the
    comparison's budget (1000 steps of 64, docs/testbed.md). On bases whose text tower gave a caption and its
    order-swapped negative a cosine of 0.99+ this check failed (docs/testbed.md)."""
    aro = {b: (s["aro_relation"] + s["aro_attribute"]) / 2 for b, s in short_run_scores.items()}
    assert aro["negclip"] > aro["plain"] + NEGCLIP_TEST_MARGIN, aro
