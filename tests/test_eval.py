"""Tests for eval.py: every loader and scorer on tiny fixtures written in the official formats.

The model is a fake whose scores we control: image i is a solid colour (i, 0, 0), and the fake
`encode_image` reads the red value back to look up image i's embedding; `encode_text` looks up the
text's embedding by the string. So every expected accuracy below is computed by hand.
"""
import json
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as ev  # noqa: E402

D = 4


def unit(score):
    """A text vector whose cosine with the default image vector e0 is exactly `score`."""
    return [score, math.sqrt(max(0.0, 1 - score * score)), 0.0, 0.0]


E0, E1, E2 = [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]


class FakeTokenizer:
    """Maps each distinct string to an integer id (a (N, 1) "token" tensor)."""

    def __init__(self):
        self.texts, self.ids = [], {}

    def __call__(self, texts):
        out = []
        for t in texts:
            if t not in self.ids:
                self.ids[t] = len(self.texts)
                self.texts.append(t)
            out.append(self.ids[t])
        return torch.tensor(out, dtype=torch.long)[:, None]


class FakeModel(nn.Module):
    """encode_image / encode_text like open_clip, with embeddings chosen by the test."""

    def __init__(self, tokenizer, image_vecs=None, text_vecs=None, default_image=E0, default_text=unit(0.5)):
        super().__init__()
        self.tokenizer = tokenizer
        self.image_vecs, self.text_vecs = image_vecs or {}, text_vecs or {}
        self.default_image, self.default_text = default_image, default_text
        self.images_encoded = 0

    def encode_image(self, images, normalize=False):
        self.images_encoded += len(images)
        ids = (images[:, 0, 0, 0] * 255).round().long().tolist()
        x = torch.tensor([self.image_vecs.get(i, self.default_image) for i in ids], dtype=torch.float32)
        return nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        vec = self.text_vecs if not callable(self.text_vecs) else None
        rows = []
        for i in tokens[:, 0].tolist():
            t = self.tokenizer.texts[i]
            rows.append(self.text_vecs(t) if vec is None else vec.get(t, self.default_text))
        x = torch.tensor(rows, dtype=torch.float32)
        return nn.functional.normalize(x, dim=-1) if normalize else x


def fake(image_vecs=None, text_vecs=None, **kw):
    tok = FakeTokenizer()
    return FakeModel(tok, image_vecs, text_vecs, **kw), tok


TF = T.Compose([T.Resize((8, 8), interpolation=T.InterpolationMode.NEAREST), T.ToTensor()])  # like a real val transform: fixed size


def draw(path, i, size=8):
    """Image number i: a solid (i, 0, 0) square, saved losslessly (PNG bytes, whatever the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (i, 0, 0)).save(path, format="PNG")


def run(model, tok, bench, root, **kw):
    return ev.evaluate(model, tok, TF, bench, root=root, device="cpu", batch_size=4, workers=0, **kw)


# ---------- generic scorers ----------

def test_binary_and_multiple_choice_rules():
    img = torch.tensor([E0, E0, E0])
    pos = torch.tensor([unit(0.9), unit(0.5), unit(0.1)])
    neg = torch.tensor([unit(0.1), unit(0.5), unit(0.9)])
    assert ev.binary_choice_correct(img, pos, neg).tolist() == [True, False, False]  # tie is wrong
    assert ev.binary_choice_accuracy(img, pos, neg) == pytest.approx(100 / 3)
    # ARO VG-R: options [false, true], answer 1; a tie picks index 0 -> wrong
    opts = torch.stack([neg, pos], dim=1)
    assert ev.multiple_choice_correct(img, opts, 1).tolist() == [True, False, False]
    # ARO order: 5 options, answer 0; a tie with the original picks index 0 -> correct
    five = torch.tensor([[unit(0.5), unit(0.5), unit(0.2), unit(0.1), unit(0.0)],
                         [unit(0.5), unit(0.6), unit(0.2), unit(0.1), unit(0.0)]])
    assert ev.multiple_choice_correct(torch.tensor([E0, E0]), five, 0).tolist() == [True, False]
    assert ev.multiple_choice_accuracy(torch.tensor([E0, E0]), five, 0) == 50.0


def test_retrieval_recall_clip_convention():
    images = torch.eye(4)[:3]                      # 3 images: e0, e1, e2
    owner = [0, 0, 1, 1, 2]                        # captions 0,1 -> image 0; 2,3 -> image 1; 4 -> image 2
    texts = torch.nn.functional.normalize(torch.tensor([
        [0.1, 1.0, 0.0, 0.0],    # cap0 (image 0): img1 > img0 > img2
        [1.0, 0.0, 0.0, 0.0],    # cap1 (image 0): img0 first
        [1.0, 0.2, 0.0, 0.0],    # cap2 (image 1): img0 > img1
        [0.0, 0.05, 1.0, 0.0],   # cap3 (image 1): img2 > img1
        [0.3, 0.1, 0.05, 1.0],   # cap4 (image 2): img0 > img1 > img2
    ]), dim=-1)
    r = ev.retrieval_recall(images, texts, owner, ks=(1, 2, 3))
    # image->text: img0 top caption is cap1 (own); img1 ranks cap0 then cap2 (own); img2 ranks cap3 then cap4 (own)
    assert r["i2t_R@1"] == pytest.approx(100 / 3) and r["i2t_R@2"] == 100.0
    # text->image: only cap1 at rank 1; cap0, cap2, cap3 at rank 2; cap4 at rank 3
    assert (r["t2i_R@1"], r["t2i_R@2"], r["t2i_R@3"]) == pytest.approx((20.0, 80.0, 100.0))
    assert r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))
    # image 0 missing: its queries and captions are wrong, and it is no longer a candidate, so cap2 now
    # finds image 1 first (hit) while cap4 finds image 1 before image 2 (miss)
    r2 = ev.retrieval_recall(images, texts, owner, ks=(1,), image_found=torch.tensor([False, True, True]))
    assert r2["i2t_R@1"] == 0.0
    assert r2["t2i_R@1"] == pytest.approx(20.0)


def test_retrieval_missing_image_excluded_as_candidate():
    images = torch.eye(2)
    texts = torch.tensor([[1.0, 0.0], [0.8, 0.6]])  # both closest to image 0
    r = ev.retrieval_recall(images, texts, [0, 1], ks=(1,), image_found=torch.tensor([False, True]))
    # caption 1 (image 1): image 0 is missing and removed from the candidates -> hit; caption 0 -> wrong
    assert r["t2i_R@1"] == 50.0
    assert r["i2t_R@1"] == 50.0  # image 1's top caption is caption 1; image 0 missing -> wrong


def test_zero_shot_accuracy_in_memory_pil():
    texts = {"a cat.": E0, "a dog.": E1}
    model, tok = fake(image_vecs={0: E0, 1: E1, 2: E0}, text_vecs=texts)
    images = [Image.new("RGB", (8, 8), (i, 0, 0)) for i in range(3)]
    out = ev.zero_shot_accuracy(model, tok, images, [0, 1, 1], ["cat", "dog"], ["a {}."], transform=TF, device="cpu")
    assert out["acc1"] == pytest.approx(200 / 3)
    assert out["acc5"] == 100.0
    assert out["mean_per_class"] == pytest.approx(75.0)


def test_encode_images_once_each_and_missing(tmp_path):
    for i in range(3):
        draw(tmp_path / f"{i}.jpg", i)
    model, _ = fake(image_vecs={0: E0, 1: E1, 2: E2})
    paths = [tmp_path / "0.jpg", tmp_path / "1.jpg", tmp_path / "nope.jpg", tmp_path / "2.jpg"]
    emb, found = ev.encode_images(model, paths, TF, "cpu", batch_size=2, workers=0)
    assert found.tolist() == [True, True, False, True]
    assert torch.allclose(emb[[0, 1, 3]], torch.eye(4)[:3])
    assert model.images_encoded == 3
    # tensors and a DataLoader of tensors
    x = torch.stack([TF(Image.new("RGB", (8, 8), (i, 0, 0))) for i in range(3)])
    assert torch.allclose(ev.encode_images(model, x, batch_size=2)[0], torch.eye(4)[:3])
    loader = torch.utils.data.DataLoader(x, batch_size=2)
    assert torch.allclose(ev.encode_images(model, loader)[0], torch.eye(4)[:3])


def test_encode_texts_dedup():
    model, tok = fake(text_vecs={"a": E1, "b": E2})
    emb = ev.encode_texts(model, tok, ["a", "b", "a"], device="cpu", batch_size=1)
    assert torch.allclose(emb, torch.tensor([E1, E2, E1]))
    assert len(tok.texts) == 2


def test_encode_texts_trims_causal_padding_to_the_same_embeddings():
    """On open_clip's causal CLIP text tower the harness drops the padding after each batch's longest text (batches
    sorted by length): the embeddings equal model.encode_text on the full context. A bidirectional tower (the same
    model without its causal mask) sees every column, so it is encoded in full."""
    import common
    torch.manual_seed(0)
    model, _, _, tok = common.create_backbone(common.TINY_MODEL, "")
    model.eval()
    texts = ["a red circle", "x", "a big blue square left of a small green triangle above a tiny red star"] * 2 + \
        [f"{i} " + "very " * (i % 9) + "small shapes" for i in range(40)]
    ends = ev._text_end(model, tok(texts))
    assert ends is not None and int(ends.min()) == 2 and int(ends.max()) < tok(texts).shape[1] - 1   # "x": SOT x EOT
    with torch.no_grad():
        full = nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
    assert torch.allclose(ev.encode_texts(model, tok, texts, device="cpu", batch_size=8), full, atol=1e-6)
    model.attn_mask = None   # now every token attends to the padding too: no trimming
    assert ev._text_end(model, tok(texts)) is None
    with torch.no_grad():
        full = nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
    assert torch.allclose(ev.encode_texts(model, tok, texts, device="cpu", batch_size=8), full, atol=1e-6)


# ---------- SugarCrepe ----------

def write_sugarcrepe(root, n_images=4, missing=()):
    """Subset s gets items with pos score 0.9 or 0.1 vs neg 0.5; returns expected accuracies."""
    texts, expected, counts = {}, {}, {}
    for si, subset in enumerate(ev.SUGARCREPE_SUBSETS):
        items, hits = {}, 0
        n = 2 + si % 3
        for j in range(n):
            good = (j + si) % 2 == 0
            pos, neg = f"{subset} pos {j}", f"{subset} neg {j}"
            texts[pos], texts[neg] = unit(0.9 if good else 0.1), unit(0.5)
            img = (j + si) % n_images
            items[str(10 * j + 3)] = {"filename": f"{img:012d}.jpg", "caption": pos, "negative_caption": neg}
            hits += good and img not in missing
        (root / "sugarcrepe").mkdir(parents=True, exist_ok=True)
        (root / "sugarcrepe" / f"{subset}.json").write_text(json.dumps(items))
        expected[subset], counts[subset] = 100.0 * hits / n, n
    for i in range(n_images):
        if i not in missing:
            draw(root / "coco/val2017" / f"{i:012d}.jpg", i)
    (root / "coco/val2017").mkdir(parents=True, exist_ok=True)
    return texts, expected, sum(counts.values())


def test_sugarcrepe(tmp_path):
    texts, expected, n = write_sugarcrepe(tmp_path)
    model, tok = fake(text_vecs=texts)
    r = run(model, tok, ["sugarcrepe"], tmp_path)["sugarcrepe"]
    assert r["metrics"] == pytest.approx(expected)
    assert r["n"] == n and r["missing"] == 0
    assert r["summary"]["SWAP"] == pytest.approx((expected["swap_obj"] + expected["swap_att"]) / 2)
    assert r["summary"]["REPLACE"] == pytest.approx(
        (expected["replace_obj"] + expected["replace_att"] + expected["replace_rel"]) / 3)
    assert model.images_encoded == 4  # each unique image once for the whole benchmark


def test_sugarcrepe_missing_image_counted_wrong(tmp_path):
    texts, expected, n = write_sugarcrepe(tmp_path, missing=(0,))
    model, tok = fake(text_vecs=texts)
    with pytest.warns(UserWarning, match="1 image"):
        r = run(model, tok, "sugarcrepe", tmp_path)["sugarcrepe"]
    assert r["missing"] == 1 and r["n"] == n
    assert r["missing_paths"][0].endswith("000000000000.jpg")
    assert r["metrics"] == pytest.approx(expected)


# ---------- ARO ----------

def aro_item(path, rel_or_attrs, true, false, box=(0, 0, 4, 4)):
    it = {"image_path": path, "bbox_x": box[0], "bbox_y": box[1], "bbox_w": box[2], "bbox_h": box[3],
          "true_caption": true, "false_caption": false}
    if isinstance(rel_or_attrs, str):
        it["relation_name"] = rel_or_attrs
    else:
        it["attributes"] = list(rel_or_attrs)
    return it


def test_vg_relation_and_attribution(tmp_path):
    for i in range(2):
        draw(tmp_path / f"aro/images/{i}.jpg", i)
    texts = {}
    rel = []
    # relation "on": 3 items, 2 correct; relation "under": 1 item, a tie (-> wrong)
    for j, (t, f) in enumerate([(0.9, 0.1), (0.8, 0.2), (0.1, 0.9)]):
        texts[f"t on {j}"], texts[f"f on {j}"] = unit(t), unit(f)
        rel.append(aro_item(f"{j % 2}.jpg", "on", f"t on {j}", f"f on {j}"))
    texts["t under"], texts["f under"] = unit(0.5), unit(0.5)
    rel.append(aro_item("1.jpg", "under", "t under", "f under", box=(2, 2, 3, 3)))
    att = []
    for j in range(25):   # pair red_blue: 25 items, 20 correct -> kept
        ok = j < 20
        texts[f"ta {j}"], texts[f"fa {j}"] = unit(0.9 if ok else 0.1), unit(0.5)
        att.append(aro_item("0.jpg", ["red", "blue"], f"ta {j}", f"fa {j}", box=(0, 0, 2 + j % 5, 3)))
    for j in range(3):    # pair big_small: 3 items, all wrong -> dropped by the >= 25 filter
        texts[f"tb {j}"], texts[f"fb {j}"] = unit(0.1), unit(0.5)
        att.append(aro_item("1.jpg", ["big", "small"], f"tb {j}", f"fb {j}"))
    (tmp_path / "aro/visual_genome_relation.json").write_text(json.dumps(rel))
    (tmp_path / "aro/visual_genome_attribution.json").write_text(json.dumps(att))
    model, tok = fake(text_vecs=texts)
    out = run(model, tok, ["vg_relation", "vg_attribution"], tmp_path)
    vgr, vga = out["vg_relation"], out["vg_attribution"]
    assert vgr["metrics"]["macro"] == pytest.approx((200 / 3 + 0) / 2)
    assert vgr["metrics"]["micro"] == pytest.approx(50.0)
    assert vga["metrics"]["macro"] == pytest.approx(80.0)
    assert vga["metrics"]["micro"] == pytest.approx(100 * 20 / 28)
    assert vga["summary"] == {"VG-Attribution": pytest.approx(80.0)}


def test_vg_relation_symmetric_filter(tmp_path):
    """The headline drops the ARO notebook's `symmetric` relations; macro_all keeps every relation."""
    import random as pyrandom
    draw(tmp_path / "aro/images/0.jpg", 0)
    rng = pyrandom.Random(3)
    # 4 kept relations and 4 from the notebook's list, 1-6 items each, random scores (ties included)
    relations = ["on", "under", "holding", "wearing", "next to", "by", "near", "sitting on top of"]
    symmetric = {"next to", "by", "near"}            # "sitting on top of" is not in the notebook's list
    texts, items = {}, []
    for r in relations:
        for j in range(rng.randint(1, 6)):
            t, f = rng.choice([0.2, 0.5, 0.8]), rng.choice([0.2, 0.5, 0.8])
            texts[f"t {r} {j}"], texts[f"f {r} {j}"] = unit(t), unit(f)
            items.append(aro_item("0.jpg", r, f"t {r} {j}", f"f {r} {j}"))
    (tmp_path / "aro/visual_genome_relation.json").write_text(json.dumps(items))
    model, tok = fake(text_vecs=texts)
    r = run(model, tok, ["vg_relation"], tmp_path)["vg_relation"]
    # the official rule, item by item: argmax over [false, true] (np.argmax picks 0 on a tie), per relation
    hits, counts = {}, {}
    for it in items:
        scores = [texts[it["false_caption"]][0], texts[it["true_caption"]][0]]
        ok = scores.index(max(scores)) == 1
        hits[it["relation_name"]] = hits.get(it["relation_name"], 0) + ok
        counts[it["relation_name"]] = counts.get(it["relation_name"], 0) + 1
    per_rel = {k: 100.0 * hits[k] / counts[k] for k in counts}
    kept = [v for k, v in per_rel.items() if k not in symmetric]
    assert r["summary"]["VG-Relation"] == pytest.approx(sum(kept) / len(kept))
    assert r["metrics"]["macro_all"] == pytest.approx(sum(per_rel.values()) / len(per_rel))
    assert r["metrics"]["relations_kept"] == 5
    assert r["summary"]["VG-Relation"] != pytest.approx(r["metrics"]["macro_all"])   # the filter matters here
    assert {"next to", "by", "near"} <= set(ev.VGR_EXCLUDED_RELATIONS) and len(ev.VGR_EXCLUDED_RELATIONS) == 157


def test_pre_caption_and_word_tokenize():
    assert ev.pre_caption('A "Dog" (big)  runs; fast!') == "a dog big runs fast"
    assert ev.pre_caption(" ".join(str(i) for i in range(40))).split() == [str(i) for i in range(30)]
    # nltk.word_tokenize's output on these (Treebank rules: clitics, quotes, the final period, numbers)
    assert ev.word_tokenize("A man's dog isn't sitting on the bench, it's \"running\" (fast)!") == [
        "A", "man", "'s", "dog", "is", "n't", "sitting", "on", "the", "bench", ",", "it", "'s", "``", "running",
        "''", "(", "fast", ")", "!"]
    assert ev.word_tokenize("3,000 people at 1:30; u.s. flag.") == [
        "3,000", "people", "at", "1:30", ";", "u.s.", "flag", "."]
    assert ev.word_tokenize("Two dogs. A cat sleeps.") == ["Two", "dogs", ".", "A", "cat", "sleeps", "."]
    assert ev.word_tokenize("Mr. Smith cannot swim.") == ["Mr.", "Smith", "can", "not", "swim", "."]


def _official_order_perturbations(caption, tokens, seed):
    """ARO's TextShuffler, as the official code runs it after seed_all(seed): numpy's and Python's global
    generators, np.random.permutation of numpy token arrays, random.shuffle of trigram lists. `tokens` is what
    nltk.word_tokenize gives for the caption (written out by hand in the test). seed None: go on from the
    generators' current state (the next caption of the same run)."""
    import random as pyrandom
    import numpy as np
    if seed is not None:
        pyrandom.seed(seed)
        np.random.seed(seed)
    doc = ev._nlp()(caption)
    text = np.array([t.text for t in doc])
    nouns = [i for i, t in enumerate(doc) if t.tag_ in ["NN", "NNS", "NNP", "NNPS"]]
    adjs = [i for i, t in enumerate(doc) if t.tag_ in ["JJ", "JJR", "JJS"]]
    text[nouns] = np.random.permutation(text[nouns])
    text[adjs] = np.random.permutation(text[adjs])
    out = [" ".join(text)]
    text = np.array([t.text for t in doc])
    other = np.ones(len(text), dtype=bool)
    other[nouns + adjs] = False
    text[other] = np.random.permutation(text[other])
    out.append(" ".join(text))
    trigrams = [list(tokens[i:i + 3]) for i in range(0, len(tokens), 3)]
    for t in trigrams:
        pyrandom.shuffle(t)
    out.append(" ".join(" ".join(t) for t in trigrams))
    trigrams = [list(tokens[i:i + 3]) for i in range(0, len(tokens), 3)]
    pyrandom.shuffle(trigrams)
    out.append(" ".join(" ".join(t) for t in trigrams))
    return out


def test_order_perturbations_match_official_semantics_on_fixed_seeds():
    import random as pyrandom
    import numpy as np
    caption = "A small red car, parked next to a large white house near the old tree."
    tokens = ["A", "small", "red", "car", ",", "parked", "next", "to", "a", "large", "white", "house", "near",
              "the", "old", "tree", "."]
    assert ev.word_tokenize(caption) == tokens
    for seed in (0, 1, 2, 42):
        ours = ev.order_perturbations(caption, ev._nlp()(caption), np.random.RandomState(seed), pyrandom.Random(seed))
        assert ours == _official_order_perturbations(caption, tokens, seed)
    # generators carry over from caption to caption, as in the official loop over one data set
    captions = ["Two dogs play with a yellow ball.", "A man riding a brown horse on the beach."]
    toks = [["Two", "dogs", "play", "with", "a", "yellow", "ball", "."],
            ["A", "man", "riding", "a", "brown", "horse", "on", "the", "beach", "."]]
    np_rng, py_rng = np.random.RandomState(1), pyrandom.Random(1)
    ours = [ev.order_perturbations(c, ev._nlp()(c), np_rng, py_rng) for c in captions]
    reference = [_official_order_perturbations(captions[0], toks[0], 1),
                 _official_order_perturbations(captions[1], toks[1], None)]
    assert ours == reference


def test_coco_and_flickr_order(tmp_path):
    caps = ["A man riding a red horse on the beach.", "two small dogs play with a yellow ball in the park"]
    texts = {ev.pre_caption(caps[0]): unit(1.0), ev.pre_caption(caps[1]): unit(0.0)}
    draw(tmp_path / "coco/val2014/COCO_val2014_000000000001.jpg", 1)
    draw(tmp_path / "flickr30k/flickr30k-images/7.jpg", 7)
    (tmp_path / "aro").mkdir(parents=True, exist_ok=True)
    # COCO's file where the official code keeps it (the COCO root), Flickr's in the older aro/ folder
    (tmp_path / "coco/coco_karpathy_test.json").write_text(json.dumps(
        [{"image": "val2014/COCO_val2014_000000000001.jpg", "caption": caps}]))
    (tmp_path / "aro/flickr30k_test.json").write_text(json.dumps(
        [{"image": "flickr30k-images/7.jpg", "caption": caps[:1]}]))
    model, tok = fake(text_vecs=texts)   # perturbations get the default 0.5
    out = run(model, tok, ["aro"], tmp_path)["aro"]
    assert out["metrics"]["coco_order/precision@1"] == 50.0
    assert out["metrics"]["flickr30k_order/precision@1"] == 100.0
    assert out["n"] == 3
    assert "skipped" in out   # VG files absent -> the group says so


# ---------- VALSE ----------

def test_valse_mturk_filter(tmp_path):
    texts, expected = {}, {}
    sources = {"existence": "visual7w", "plurals": "coco2017", "foil-it": "FOIL dataset", "actant-swap": "SWiG"}
    for pi, piece in enumerate(ev.VALSE_PIECES):
        dataset = sources.get(piece, "VisDial_v1.0")
        folder = ev.VALSE_IMAGE_DIRS[dataset]
        draw(tmp_path / f"valse/images/{folder}/img{pi}.jpg", pi)
        items = {}
        for j in range(3):   # j=0 correct, j=1 wrong, j=2 correct but mturk-invalid (dropped)
            cap, foil = f"{piece} cap {j}", f"{piece} foil {j}"
            texts[cap], texts[foil] = unit(0.9 if j != 1 else 0.1), unit(0.5)
            items[f"{piece}_{j}"] = {"dataset": dataset, "image_file": f"img{pi}.jpg", "caption": cap, "foil": foil,
                                     "classes": None, "classes_foil": None, "linguistic_phenomena": piece,
                                     "original_split": "test", "mturk": {"caption": 1 if j == 2 else 2 + j % 2,
                                                                         "foil": 0, "other": 0}}
        (tmp_path / "valse/data").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"valse/data/{piece}.json").write_text(json.dumps(items))
    model, tok = fake(text_vecs=texts)
    r = run(model, tok, ["valse"], tmp_path)["valse"]
    assert r["n"] == 22
    assert all(v == 50.0 for v in r["metrics"].values()) and len(r["metrics"]) == 11
    assert r["summary"]["average"] == 50.0


class TruncatingTokenizer(FakeTokenizer):
    """Like a real tokenizer with a context length: only the first `words` words of a text count."""

    def __init__(self, words=4):
        super().__init__()
        self.words = words

    def __call__(self, texts):
        return super().__call__([" ".join(t.split()[:self.words]) for t in texts])


def test_valse_subset_piece_folders_and_ties(tmp_path):
    """Only 3 piece files: they run, the 8 others are named; coreference-standard's images are read from the
    COCO train2014 folder; pairs identical within the context length are counted as ties (and wrong)."""
    import random as pyrandom
    rng = pyrandom.Random(1)
    pieces = {"existence": ("visual7w", "visual7w"), "coreference-standard": ("VisDial_v1.0", "coco2014train"),
              "foil-it": ("FOIL dataset", "coco2014")}
    tok = TruncatingTokenizer(words=4)
    vectors, expected, ties = {}, {}, 0
    for pi, (piece, (dataset, folder)) in enumerate(pieces.items()):
        draw(tmp_path / f"valse/images/{folder}/COCO_{pi}.jpg", pi)
        items, hits, n = {}, 0, 0
        for j in range(6):
            tie = j == 5
            cap = f"{piece} caption number {j} on the left"
            foil = f"{piece} caption number {j} on the right" if tie else f"{piece} foil {j}"
            c, f = rng.choice([0.2, 0.5, 0.8]), rng.choice([0.2, 0.5, 0.8])
            vectors[" ".join(cap.split()[:4])], vectors[" ".join(foil.split()[:4])] = unit(c), unit(f)
            valid = j != 0
            items[f"{piece}_{j}"] = {"dataset": dataset, "image_file": f"COCO_{pi}.jpg", "caption": cap, "foil": foil,
                                     "mturk": {"caption": 3 if valid else 1, "foil": 0, "other": 0}}
            if valid:     # the official rule on what the model sees (the truncated texts)
                n += 1
                hits += (c > f) and not tie
                ties += tie
        (tmp_path / "valse/data").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"valse/data/{piece}.json").write_text(json.dumps(items))
        expected[piece] = 100.0 * hits / n
    model = FakeModel(tok, text_vecs=vectors)
    with pytest.warns(UserWarning, match="8 piece file"):
        r = run(model, tok, ["valse"], tmp_path)["valse"]
    assert r["metrics"] == pytest.approx(expected)
    assert r["summary"]["average"] == pytest.approx(sum(expected.values()) / 3)
    assert r["missing"] == 0 and r["n"] == 15
    assert r["ties"] == ties == 3 and r["ties_per_piece"] == {p: 1 for p in pieces}
    assert len(r["skipped"]) == 8 and "plurals" in r["skipped"]


# ---------- VL-CheckList ----------

def test_vlchecklist_cap_missing_images_and_corpus_grouping(tmp_path):
    """The official ITC rule: drop samples whose image is missing, keep the first MAX_NUM / 2 = 1000 per file,
    accuracy per file; corpus.json grouping: item = mean over sources of the mean over files."""
    import random as pyrandom
    rng = pyrandom.Random(0)
    images = tmp_path / "vl-checklist/images"
    for folder in ("vg/VG_100K", "swig", "hake"):
        for i in range(3):
            draw(images / folder / f"{i}.jpg", i)
    texts = {}
    # (data file, image folder, number of samples); one file > 1000 samples with every tenth image absent
    layout = {
        "Attribute_color_vg": ("Attribute/vg/color.json", "vg", 1300),
        "Attribute_color_vaw": ("Attribute/vaw/color.json", "vg", 7),
        "Attribute_material_vg": ("Attribute/vg/material.json", "vg", 5),
        "Object_Size_large_vg_obj": ("Object/Size/vg_size/vg_obj_large.json", "vg", 6),
        "Object_Size_large_vg_subj": ("Object/Size/vg_size/vg_subj_large.json", "vg", 4),
        "Object_Size_large_swig_agent": ("Object/Size/swig_size/swig_agent/swig_agent_large.json", "swig", 5),
        "Object_Size_large_hake": ("Object/Size/hake_size/hake_obj_large.json", "hake", 3),
        "Object_Location_mid_vg_obj": ("Object/Location/vg_location/vg_obj_mid.json", "vg", 4),
        "Relation_action_swig": ("Relation/swig_action.json", "swig", 6),
        "Relation_spatial_vg": ("Relation/vg/spatial.json", "vg", 5),
    }
    rows_of = {}
    for name, (rel, folder, n) in layout.items():
        rows = []
        for j in range(n):
            p, q = f"{name} P{j}", f"{name} N{j}"
            texts[p], texts[q] = unit(rng.choice([0.2, 0.5, 0.8])), unit(rng.choice([0.2, 0.5, 0.8]))
            image = f"{j % 3}.jpg" if not (name == "Attribute_color_vg" and j % 10 == 9) else "absent.jpg"
            rows.append([("VG_100K/" if folder == "vg" else "") + image, {"POS": [p], "NEG": [q]}])
        path = tmp_path / "vl-checklist/data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows))
        rows_of[name] = (rows, folder)
    model, tok = fake(text_vecs=texts)
    with pytest.warns(UserWarning, match="dropped"):
        r = run(model, tok, ["vlchecklist"], tmp_path)["vlchecklist"]
    # the official loop
    acc = {}
    for name, (rows, folder) in rows_of.items():
        kept = [(pq["POS"][0], pq["NEG"][0]) for image, pq in rows if (images / folder / image).exists()][:1000]
        acc[name] = 100.0 * sum(texts[p][0] > texts[q][0] for p, q in kept) / len(kept)
    corpus = {"large": {"vg": ["Object_Size_large_vg_obj", "Object_Size_large_vg_subj"],
                        "swig": ["Object_Size_large_swig_agent"], "hake": ["Object_Size_large_hake"]},
              "mid": {"vg": ["Object_Location_mid_vg_obj"]},
              "color": {"vg": ["Attribute_color_vg"], "vaw": ["Attribute_color_vaw"]},
              "material": {"vg": ["Attribute_material_vg"]},
              "action_r": {"swig": ["Relation_action_swig"]}, "spatial": {"vg": ["Relation_spatial_vg"]}}
    item = {k: sum(sum(acc[f] for f in fs) / len(fs) for fs in src.values()) / len(src) for k, src in corpus.items()}
    for k, v in item.items():
        assert r["metrics"][k] == pytest.approx(v)
    assert r["summary"]["Object"] == pytest.approx((item["large"] + item["mid"]) / 2)
    assert r["summary"]["Attribute"] == pytest.approx((item["color"] + item["material"]) / 2)
    assert r["summary"]["Relation"] == pytest.approx((item["action_r"] + item["spatial"]) / 2)
    assert r["metrics"]["file/Attribute_color_vg"] == pytest.approx(acc["Attribute_color_vg"])
    assert r["missing"] == 1 and r["metrics"]["dropped_samples"] == 130
    assert r["n"] == 1000 + sum(n for name, (_, _, n) in layout.items() if name != "Attribute_color_vg")
    assert "absent" in r["notes"]


def test_vlchecklist_bad_file(tmp_path):
    (tmp_path / "vl-checklist/images").mkdir(parents=True)
    (tmp_path / "vl-checklist/data/Attribute/vg").mkdir(parents=True)
    (tmp_path / "vl-checklist/data/Attribute/vg/color.json").write_text(json.dumps([{"image": "x.jpg"}]))
    model, tok = fake()
    with pytest.raises(ev.BenchmarkDataError, match=r"expected a list of \[image_path"):
        run(model, tok, ["vlchecklist"], tmp_path)


# ---------- zero-shot ----------

def test_zeroshot_imagenet_folder(tmp_path):
    val = tmp_path / "zeroshot/imagenet/val"
    for c in range(1000):
        (val / f"n{c:08d}").mkdir(parents=True)
    # class 0 (tench): images 0 and 1; class 1 (goldfish): image 2
    draw(val / "n00000000/a.JPEG", 0)
    draw(val / "n00000000/b.JPEG", 1)
    draw(val / "n00000001/c.JPEG", 2)

    def text_vec(t):
        return E0 if "tench" in t else E1 if "goldfish" in t else E2
    model, tok = fake(image_vecs={0: E0, 1: E1, 2: E1}, text_vecs=text_vec)
    r = run(model, tok, ["zeroshot"], tmp_path)["zeroshot"]
    assert r["metrics"]["imagenet/acc1"] == pytest.approx(200 / 3)
    assert r["metrics"]["imagenet/mean_per_class"] == pytest.approx(75.0)
    assert r["summary"]["imagenet"] == pytest.approx(200 / 3)
    assert r["n"] == 3


def test_zero_shot_classifier_equals_open_clip_builder():
    import open_clip
    gen = torch.Generator().manual_seed(0)
    table = {}

    def text_vec(t):   # a fixed random vector per prompt
        if t not in table:
            table[t] = torch.randn(D, generator=gen).tolist()
        return table[t]
    model, tok = fake(text_vecs=text_vec)
    names = [f"class {i}" for i in range(23)]
    templates = [lambda c: f"a {c}.", lambda c: f"the {c}!", lambda c: f"art of {c}"]
    ours = ev.zero_shot_classifier(model, tok, names, templates, device="cpu", batch_size=7)
    with torch.no_grad():
        ref = open_clip.build_zero_shot_classifier(model, tok, names, templates, num_classes_per_batch=10,
                                                   device="cpu", use_tqdm=False)
    assert ours.shape == (D, 23) and torch.allclose(ours, ref.float(), atol=1e-6)
    mixed = ev.zero_shot_classifier(model, tok, names, ["a {}.", templates[1], "art of {}"], device="cpu")
    assert torch.allclose(mixed, ours)


def test_zeroshot_caltech101_clip_benchmark_names_and_templates(tmp_path):
    """102 classes (BACKGROUND_Google kept) named as CLIP_benchmark names them, its 34 templates."""
    root = tmp_path / "zeroshot/caltech101/101_ObjectCategories"
    for folder, _ in ev.CALTECH101_CLASSES:
        (root / folder).mkdir(parents=True)
    # image i of folder f: Faces (label 1) x2, Faces_easy (label 2) x1, car_side (label 20) x1
    images = [("Faces", 1), ("Faces", 2), ("Faces_easy", 3), ("car_side", 4)]
    for k, (folder, i) in enumerate(images):
        n = sum(1 for f, _ in images[:k] if f == folder) + 1
        draw(root / folder / f"image_{n:04d}.jpg", i)
    prompts = []

    def text_vec(t):
        prompts.append(t)
        return E0 if "off-center face" in t else E1 if "centered face" in t else E2 if "side of a car" in t else [
            0, 0, 0, 1.0]
    model, tok = fake(image_vecs={1: E0, 2: E1, 3: E1, 4: E0}, text_vecs=text_vec)
    r = run(model, tok, ["zeroshot"], tmp_path)["zeroshot"]
    assert len(set(prompts)) == 102 * 34 and "a photo of a off-center face." in prompts
    assert not any("Faces" in p or "car_side" in p for p in prompts)
    # by hand: image 1 -> off-center face (label 1, right), image 2 -> centered face (wrong), image 3 ->
    # centered face (label 2, right), image 4 -> off-center face (label 20, wrong); per class 50, 100, 0
    assert r["metrics"]["caltech101/acc1"] == pytest.approx(50.0)
    assert r["summary"]["caltech101"] == pytest.approx(50.0)      # mean per class: (50 + 100 + 0) / 3
    assert r["n"] == 4
    (root / "BACKGROUND_Google").rmdir()
    with pytest.raises(ev.BenchmarkDataError, match="102 folders.*BACKGROUND_Google"):
        run(model, tok, ["zeroshot"], tmp_path)


def test_zeroshot_needs_scipy_says_so_before_the_run(tmp_path, monkeypatch):
    (tmp_path / "zeroshot/flowers-102").mkdir(parents=True)
    monkeypatch.setattr(ev, "_has_module", lambda name: name != "scipy")
    model, tok = fake()
    with pytest.raises(ev.BenchmarkDataError, match="flowers102 need scipy.*pip install scipy"):
        run(model, tok, ["zeroshot"], tmp_path)


# ---------- retrieval ----------

def test_karpathy_and_urban1k(tmp_path):
    images = []
    for i in range(3):
        draw(tmp_path / f"coco/val2014/COCO_val2014_{i}.jpg", i)
        images.append({"filepath": "val2014", "filename": f"COCO_val2014_{i}.jpg", "imgid": i, "cocoid": i,
                       "split": "test", "sentids": [2 * i, 2 * i + 1],
                       "sentences": [{"raw": f"img{i} cap{k}", "tokens": [], "imgid": i, "sentid": 2 * i + k}
                                     for k in range(2)]})
    images.append(dict(images[0], split="train", filename="COCO_val2014_99.jpg"))   # not test: ignored
    (tmp_path / "karpathy").mkdir()
    (tmp_path / "karpathy/dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    basis = [E0, E1, E2]
    texts = {f"img{i} cap{k}": basis[i] for i in range(3) for k in range(2)}
    texts["img2 cap1"] = E0   # one caption of image 2 points at image 0
    model, tok = fake(image_vecs={i: basis[i] for i in range(3)}, text_vecs=texts)
    r = run(model, tok, ["coco_retrieval"], tmp_path)["coco_retrieval"]
    assert r["n"] == 6
    assert r["metrics"]["i2t_R@1"] == 100.0          # every image has a caption at cosine 1
    assert r["metrics"]["t2i_R@1"] == pytest.approx(500 / 6)
    # Urban1k: 1:1, paired by file stem (not listdir order)
    for k in (1, 2, 10):
        draw(tmp_path / f"Urban1k/image/{k}.jpg", k)
        (tmp_path / "Urban1k/caption").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"Urban1k/caption/{k}.txt").write_text(f"long caption {k}\nsecond line")
    ub = {1: E0, 2: E1, 10: E2}
    model, tok = fake(image_vecs=ub, text_vecs={f"long caption {k}": v for k, v in ub.items()})
    out = run(model, tok, ["longtext"], tmp_path)["longtext"]
    assert out["metrics"]["urban1k/i2t_R@1"] == 100.0 and out["metrics"]["urban1k/t2i_R@1"] == 100.0
    assert len(out["skipped"]) == 3


def _recall_by_loop(image_vecs, captions, ks=(1, 5)):
    """The CLIP-paper rule, query by query: captions = [(text vector, image index)]."""
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    n = len(image_vecs)
    out = {}
    for k in ks:
        i2t = 0
        for i, v in enumerate(image_vecs):
            order = sorted(range(len(captions)), key=lambda c: -dot(v, captions[c][0]))[:k]
            i2t += any(captions[c][1] == i for c in order)
        t2i = sum(i in sorted(range(n), key=lambda j: -dot(image_vecs[j], t))[:k] for t, i in captions)
        out[f"i2t_R@{k}"], out[f"t2i_R@{k}"] = 100.0 * i2t / n, 100.0 * t2i / len(captions)
    return out


def test_retrieval_and_sugarcrepe_alternative_layouts(tmp_path):
    """CLIP_benchmark's coco_test_karpathy.json / flickr30k_test_karpathy.txt, BLIP's coco_karpathy_test.json and
    SugarCrepe's repository layout give the numbers of the official rule on the same data."""
    basis = [E0, E1, E2, [0, 0, 0, 1.0]]
    caps = {0: ["a dog, running", "dog on grass"], 1: ["a cat", "cat.jpg, sleeping"], 2: ["a car", "red car"],
            3: ["a tree"]}
    texts = {c: basis[i] for i, cs in caps.items() for c in cs}
    texts["dog on grass"], texts["red car"] = E1, [0.6, 0, 0.4, 0]     # two captions point elsewhere
    expected = _recall_by_loop(basis, [(texts[c], i) for i, cs in caps.items() for c in cs])
    layouts = {
        "clip_benchmark_coco": lambda root: (root / "coco/coco_test_karpathy.json").write_text(json.dumps({
            "images": [{"id": 10 + i, "file_name": f"COCO_val2014_{i}.jpg"} for i in reversed(range(4))],
            "annotations": [{"id": k, "image_id": 10 + i, "caption": c} for k, (i, c) in
                            enumerate((i, c) for i, cs in caps.items() for c in cs)]})),
        "blip_coco": lambda root: (root / "coco/coco_karpathy_test.json").write_text(json.dumps(
            [{"image": f"val2014/COCO_val2014_{i}.jpg", "caption": cs} for i, cs in caps.items()])),
    }
    for name, write in layouts.items():
        root = tmp_path / name
        for i in range(4):
            draw(root / f"coco/val2014/COCO_val2014_{i}.jpg", i)
        write(root)
        model, tok = fake(image_vecs=dict(enumerate(basis)), text_vecs=texts)
        r = run(model, tok, ["coco_retrieval"], root)["coco_retrieval"]
        assert {k: r["metrics"][k] for k in expected} == pytest.approx(expected), name
        assert r["n"] == 7
    root = tmp_path / "clip_benchmark_flickr"
    for i in range(4):
        draw(root / f"flickr30k/flickr30k-images/{i}.jpg", i)
    rows = ["image,caption"] + [f"{i}.jpg,{c}" for i, cs in caps.items() for c in cs]
    (root / "flickr30k/flickr30k-images/flickr30k_test_karpathy.txt").write_text("\n".join(rows) + "\n")
    model, tok = fake(image_vecs=dict(enumerate(basis)), text_vecs=texts)
    r = run(model, tok, ["flickr30k_retrieval"], root)["flickr30k_retrieval"]
    assert {k: r["metrics"][k] for k in expected} == pytest.approx(expected)
    # SugarCrepe straight from a clone of its repository (sugar-crepe/data/*.json) and an image root val2017/
    root = tmp_path / "sugarcrepe_repo"
    texts_sc, expected_sc, _ = write_sugarcrepe(root)
    (root / "sugar-crepe").mkdir()
    (root / "sugarcrepe").rename(root / "sugar-crepe/data")
    (root / "coco/val2017").rename(root / "val2017")
    model, tok = fake(text_vecs=texts_sc)
    assert run(model, tok, ["sugarcrepe"], root)["sugarcrepe"]["metrics"] == pytest.approx(expected_sc)


def test_goal_released_test_lists(tmp_path):
    """docci_goal / dci_goal read GOAL's datasets/docci_test.json and datasets/DCI_test.json as released: a list of
    {"filename", "caption"} whose folders are placeholders; the file names are found in --root's image folders."""
    basis = [E0, E1, E2, [0, 0, 0, 1.0]]
    captions = ["A tall metal daisy sculpture. Daytime.", "Four horse toy figures on a bathtub.",
                "Two army men toys in a yoga pose.", "A path light at night."]
    layouts = {   # benchmark: (list file, image folder, the release's placeholder prefix, image names)
        "docci_goal": ("docci/docci_test.json", "docci/images", "chage/path/to/your/directory/dataset/images/",
                       ["qual_test_00000.jpg", "qual_test_00001.jpg", "test_00000.jpg", "test_00001.jpg"]),
        "dci_goal": ("dci/DCI_test.json", "dci/densely_captioned_images/photos",
                     "../DCI/dataset/densely_captioned_images/dataset/scripts/densely_captioned_images/photos/",
                     ["sa_1543972.jpg", "sa_1543977.jpg", "sa_1543978.jpg", "sa_1543980.jpg"]),
    }
    texts = {c: basis[i] for i, c in enumerate(captions)}
    texts[captions[3]] = [0.6, 0, 0, 0.4]    # caption 3 is closer to image 0 than to its own image
    expected = _recall_by_loop(basis, [(texts[c], i) for i, c in enumerate(captions)], ks=(1, 5, 25, 50))
    for name, (list_file, image_dir, prefix, names) in layouts.items():
        for i, image in enumerate(names):
            draw(tmp_path / image_dir / image, i)
        (tmp_path / list_file).write_text(json.dumps(
            [{"filename": prefix + image, "caption": caption} for image, caption in zip(names, captions)], indent=4))
        model, tok = fake(image_vecs=dict(enumerate(basis)), text_vecs=texts)
        r = run(model, tok, [name], tmp_path)[name]
        assert r["n"] == 4 and r["missing"] == 0
        assert {k: r["metrics"][k] for k in expected} == pytest.approx(expected), name
        assert r["metrics"]["t2i_R@1"] == 75.0 and r["metrics"]["i2t_R@1"] == 100.0
    # the errors name the expected file, its source and its format
    empty = tmp_path / "empty"
    empty.mkdir()
    model, tok = fake()
    with pytest.raises(ev.BenchmarkDataError, match=r"docci/docci_test.json.*PerceptualAI-Lab/GOAL"):
        run(model, tok, ["docci_goal"], empty)
    (tmp_path / "dci/DCI_test.json").write_text(json.dumps({"sa_1543972.jpg": "a caption"}))
    with pytest.raises(ev.BenchmarkDataError, match=r"not a GOAL test list(.|\n)*\"filename\""):
        run(model, tok, ["dci_goal"], tmp_path)
    (tmp_path / "dci/DCI_test.json").write_text(json.dumps([{"filename": "x/elsewhere.jpg", "caption": "a"}]))
    with pytest.raises(ev.BenchmarkDataError, match="none of the 1 images"):
        run(model, tok, ["dci_goal"], tmp_path)


# ---------- errors, tables, CLI ----------

def test_errors(tmp_path):
    model, tok = fake()
    with pytest.raises(ValueError, match="known: shapes.*sugarcrepe"):
        run(model, tok, ["nope"], tmp_path)
    with pytest.raises(ev.BenchmarkDataError, match=r"sugarcrepe/add_obj.json.*RAIVNLab/sugar-crepe"):
        run(model, tok, ["sugarcrepe"], tmp_path)
    with pytest.raises(ev.BenchmarkDataError, match="needs a data root"):
        run(model, tok, ["valse"], None)
    with pytest.raises(ev.BenchmarkDataError, match="no member could run"):
        run(model, tok, ["aro"], tmp_path)
    with pytest.raises(ev.BenchmarkDataError, match="cifar-10-batches-py"):
        run(model, tok, ["zeroshot"], tmp_path)
    assert "shapes" in ev.known_benchmarks()


def test_format_table_and_write_results(tmp_path):
    before = {"sugarcrepe": {"metrics": {"swap_obj": 50.0}, "summary": {"SWAP": 50.0}, "n": 10, "missing": 1}}
    after = {"sugarcrepe": {"metrics": {"swap_obj": 62.5}, "summary": {"SWAP": 62.5}, "n": 10, "missing": 1}}
    table = ev.format_table(before, after)
    assert "| sugarcrepe | **SWAP** | 50.00 | 62.50 | +12.50 |" in table
    assert "| sugarcrepe | swap_obj |" not in table or "swap_obj | 50.00 | 62.50" in table
    assert "10 (1)" in table
    assert "after" not in ev.format_table(before)
    ev.write_results(tmp_path / "out", before, after, extra={"seed": 0})
    data = json.loads((tmp_path / "out/results.json").read_text())
    assert data["after"]["sugarcrepe"]["summary"]["SWAP"] == 62.5 and data["extra"] == {"seed": 0}
    assert "+12.50" in (tmp_path / "out/results.md").read_text()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_cli_end_to_end_tiny_model(tmp_path, capsys):
    write_sugarcrepe(tmp_path)
    kwargs = dict(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1),
                  text_cfg=dict(context_length=32, width=64, heads=2, layers=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = ev.main(["--model", "ViT-B-32", "--pretrained", "none", "--bench", "sugarcrepe", "--root",
                           str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu", "--batch-size", "8",
                           "--workers", "0", "--model-kwargs", json.dumps(kwargs)])
    printed = capsys.readouterr().out
    assert "| sugarcrepe | **REPLACE** |" in printed
    saved = json.loads((tmp_path / "run/results.json").read_text())
    assert saved["before"]["sugarcrepe"]["n"] == results["sugarcrepe"]["n"] > 0
    assert set(saved["before"]["sugarcrepe"]["metrics"]) == set(ev.SUGARCREPE_SUBSETS)
    with pytest.raises(SystemExit, match="unknown benchmark"):
        ev.main(["--model", "ViT-B-32", "--bench", "bogus"])


def test_scoring_is_fp32_by_default_and_bf16_is_a_real_switch(tmp_path):
    """The official evaluators score in fp32, so every benchmark does by default, on every device; --precision
    bf16 (autocast, here on the CPU) is an opt-in that really changes the computation: the scores move (whether
    an answer flips depends on how close its two scores are; docs/performance.md counts them)."""
    import inspect
    import common
    model, _, transform, tok = common.create_backbone(common.TINY_MODEL, "shapes")
    write_sugarcrepe(tmp_path)
    seen = []   # (autocast on?, dtype of the image embedding) at every image forward pass
    model.visual.register_forward_hook(lambda m, i, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    # the default, as the method scripts call it (no precision argument): fp32, no autocast
    assert inspect.signature(ev.evaluate).parameters["precision"].default == "fp32"
    assert ev.parse_args(["--model", "m"]).precision == "fp32"
    with torch.autocast("cpu", dtype=torch.bfloat16):   # even inside a caller's autocast block
        fp32 = ev.evaluate(model, tok, transform, ["sugarcrepe"], root=tmp_path, device="cpu", workers=0)
    assert seen and set(seen) == {(False, torch.float32)}
    seen.clear()
    bf16 = ev.evaluate(model, tok, transform, ["sugarcrepe"], root=tmp_path, device="cpu", workers=0,
                       precision="bf16")
    assert seen and set(seen) == {(True, torch.bfloat16)}
    assert fp32["sugarcrepe"]["n"] == bf16["sugarcrepe"]["n"]
    # the scores themselves change: bf16 keeps 8 bits of mantissa, enough to move a cosine in its 3rd decimal
    texts = [f"a {c} square left of a blue circle" for c in ("red", "green", "yellow", "purple")]
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    s32 = ev.encode_images(model, image)[0] @ ev.encode_texts(model, tok, texts, "cpu").T
    s16 = ev.encode_images(model, image, precision="bf16")[0] @ ev.encode_texts(model, tok, texts, "cpu",
                                                                               precision="bf16").T
    assert 1e-4 < (s32 - s16).abs().max() < 0.05
    # anything else is one clear error; the CLI offers exactly the two
    with pytest.raises(common.InputError, match="expected one of fp32, bf16"):
        ev.evaluate(model, tok, transform, ["sugarcrepe"], root=tmp_path, device="cpu", precision="fp16")
    assert ev.parse_args(["--model", "m", "--precision", "bf16"]).precision == "bf16"
    # a model whose weights were cast to bf16 (lab/gpu_check.py does it) still scores under the fp32 default
    ev.evaluate(model.to(torch.bfloat16), tok, transform, ["sugarcrepe"], root=tmp_path, device="cpu", workers=0)
