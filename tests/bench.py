"""Performance ratios of this repository's fast paths against naive references (a script, not a test).

    python tests/bench.py                 # every row
    python tests/bench.py --only eval_sugarcrepe

Each row is one function registered with `@row("name")` returning `(ratio, detail)`; the script prints
`name | ratio | detail`. To add a row, write a function below and decorate it. Keep rows short (the
development machines have 2 shared CPU cores): a few seconds each.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = []   # (name, function) in registration order


def row(name):
    def register(fn):
        ROWS.append((name, fn))
        return fn
    return register


def tiny_model():
    """A random tiny open_clip CLIP (32 px images, 1+1 layers): fast, and scores have no ties in practice."""
    import open_clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, transform = open_clip.create_model_and_transforms(
            "ViT-B-32", pretrained=None, embed_dim=64,
            vision_cfg=dict(image_size=32, patch_size=16, width=64, layers=1),
            text_cfg=dict(context_length=32, width=64, heads=2, layers=1))
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=32)
    return model.eval(), transform, tokenizer


def write_sugarcrepe_fixture(root, n_items=5600, n_images=300, seed=0):
    """SugarCrepe-format fixture: 7 json files (dict keyed by string index) over `n_images` COCO-style jpgs."""
    import eval as ev
    rng = random.Random(seed)
    colors = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink"]
    nouns = ["dog", "cat", "car", "man", "woman", "table", "horse", "boat", "tree", "bird"]
    rels = ["next to", "on top of", "behind", "in front of", "near", "under"]
    img_dir = root / "coco/val2017"
    img_dir.mkdir(parents=True)
    for i in range(n_images):
        Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3))).save(img_dir / f"{i:012d}.jpg")
    (root / "sugarcrepe").mkdir()
    per_subset = n_items // len(ev.SUGARCREPE_SUBSETS) + 1
    for subset in ev.SUGARCREPE_SUBSETS:
        items = {}
        for j in range(per_subset):
            c1, c2 = rng.sample(colors, 2)
            n1, n2 = rng.sample(nouns, 2)
            r = rng.choice(rels)
            pos = f"a {c1} {n1} {r} a {c2} {n2}"
            neg = f"a {c2} {n1} {r} a {c1} {n2}" if rng.random() < 0.5 else f"a {c1} {n2} {r} a {c2} {n1}"
            items[str(2 * j + 1)] = {"filename": f"{rng.randrange(n_images):012d}.jpg", "caption": pos,
                                     "negative_caption": neg}
        (root / "sugarcrepe" / f"{subset}.json").write_text(json.dumps(items))
    return per_subset * len(ev.SUGARCREPE_SUBSETS)


def naive_sugarcrepe(model, transform, tokenizer, root):
    """The official evaluator's shape: per item, load and encode the image, encode both captions, compare."""
    import eval as ev
    correct, total = {}, {}
    with torch.inference_mode():
        for subset in ev.SUGARCREPE_SUBSETS:
            data = json.loads((root / "sugarcrepe" / f"{subset}.json").read_text())
            hits = 0
            for _, it in data.items():
                image = transform(Image.open(root / "coco/val2017" / it["filename"]).convert("RGB"))[None]
                image_emb = model.encode_image(image, normalize=True)
                pos_emb = model.encode_text(tokenizer([it["caption"]]), normalize=True)
                neg_emb = model.encode_text(tokenizer([it["negative_caption"]]), normalize=True)
                hits += int((image_emb @ pos_emb.T).item() > (image_emb @ neg_emb.T).item())
            correct[subset], total[subset] = hits, len(data)
    return {s: 100.0 * correct[s] / total[s] for s in correct}


@row("eval_sugarcrepe")
def bench_eval_sugarcrepe(args):
    """eval.evaluate(['sugarcrepe']) vs the per-example loop, same model and files; accuracies must agree."""
    import eval as ev
    model, transform, tokenizer = tiny_model()
    with tempfile.TemporaryDirectory() as tmp:
        root = __import__("pathlib").Path(tmp)
        n = write_sugarcrepe_fixture(root, args.items, args.images)
        t0 = time.perf_counter()
        fast = ev.evaluate(model, tokenizer, transform, ["sugarcrepe"], root=root, device="cpu", workers=2)
        t_fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = naive_sugarcrepe(model, transform, tokenizer, root)
        t_slow = time.perf_counter() - t0
    fast_acc = fast["sugarcrepe"]["metrics"]
    same = all(abs(fast_acc[s] - slow[s]) < 1e-9 for s in slow)
    if not same:
        raise SystemExit(f"eval_sugarcrepe: accuracies differ: harness {fast_acc} vs naive {slow}")
    detail = (f"{n} items / {args.images} images: harness {t_fast:.2f}s, naive loop {t_slow:.2f}s, "
              f"accuracies identical ({', '.join(f'{s} {v:.2f}' for s, v in fast_acc.items())})")
    return t_slow / t_fast, detail


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="run one row: " + ", ".join(n for n, _ in ROWS))
    p.add_argument("--items", type=int, default=5600, help="eval_sugarcrepe: number of items (>= 5000)")
    p.add_argument("--images", type=int, default=300, help="eval_sugarcrepe: number of shared images")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machines are shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [(n, f) for n, f in ROWS if args.only in (None, n)]
    if not rows:
        raise SystemExit(f"unknown row {args.only!r}; rows: {', '.join(n for n, _ in ROWS)}")
    print("name | ratio | detail")
    for name, fn in rows:
        ratio, detail = fn(args)
        print(f"{name} | {ratio:.1f}x | {detail}", flush=True)


if __name__ == "__main__":
    main()
