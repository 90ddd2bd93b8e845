"""The recipe of the shipped shapes base models (models/shapes-tiny-{vit,siglip}-shapes-base.pt).

    python -m lab.base_models --arch clip      # shapes-tiny-vit, InfoNCE
    python -m lab.base_models --arch siglip    # shapes-tiny-siglip, sigmoid loss
    python -m lab.base_models --arch clip --out /tmp/base.pt --steps 200    # a quick variant, not shipped

They play the role of downloading OpenAI (CLIP) or WebLI (SigLIP) weights: tiny open_clip models trained from
scratch on the shapes world's captions *in natural word order*, shipped in the repository as fp16 files with a
sidecar JSON (how each was made, its sha256 and its shapes-suite metrics). Like web-trained CLIP they name
single objects well and bind attributes poorly, not because word order was destroyed but because a random
batch of 64 scenes almost never holds the swapped twin of a scene (data.py, "difficulty check"), so the
contrastive loss never needs binding. That is the situation NegCLIP's hard negatives fix on real data, and
docs/testbed.md checks that they do here too.

The recipe (`build_shapes_base`, one command: `python -m lab.base_models --arch clip`), variant v2g of
docs/testbed.md (v2c, its predecessor, and seven other variants are recorded there with their numbers):
  phase 1 (the first SHAPES_BASE_ONE_OBJECT_STEPS): one-object scenes only. Colour alone separates almost
          every pair of a batch of 1-4-object scenes, so on the usual mix CLIP learns the colours and hardly
          any shape (23% after 600 steps); on single objects the shape is what is left to tell captions apart.
  phase 2 (the rest): half one-object scenes, half the default world of 1-4 objects (retrieval, counting).
  Besides the contrastive loss, small linear heads (thrown away afterwards) give each tower what web-scale
  pre-training gives CLIP's towers and a random batch of 64 scenes does not:
  - attribute head (throughout), shared by both towers: shape, colour and size of each one-object scene from
    its image embedding and from its caption embedding. It puts the shapes in the same directions of the joint
    space on both sides; it never sees two objects, so it teaches nothing about which colour goes with which shape.
  - layout head (phase 2), image tower: colour and shape of the leftmost and the topmost object of each
    multi-object scene (`layout_labels`). Without it the image tower does not know which object is where (a
    linear probe for "the colour of the left object" reads 49%, with it 74%), and relation-order negatives have
    nothing on the image side to align with.
  - text-order head (phase 2), text tower: colour and shape of the first and the second object the caption names
    (`mention_labels`). Without it a caption and its swapped negative have cosine 0.99+ (the text tower reads a
    bag of words), and hard negatives have nothing on the text side to push on; with it 0.68-0.85.
  - pair heads (weight 0.1), one per tower: which colour-shape conjunctions a scene holds (yes / no for each of
    the 64). Alone they do not bind colour to shape inside a 2-object caption, but they give binding features to
    start from.
  None of them tells the model which *image* goes with which *order* of a caption, so the base stays
  bag-of-words on the suite (swap and ARO subsets 52-55%), and a NegCLIP run then learns the binding: that is the
  situation of OpenAI's CLIP on real data. Heads that told the text tower where objects are (`--text-layout-weight`)
  or batches of layout twins (`--twin-pairs`) made plain contrastive training learn relation order by itself
  (variants v2d, v2f, v2i): they are off.
"""
import argparse
import json
import os
import random
import sys
import time

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import eval as evaluation
from common import SHAPES_BASE_ARCHS, shipped_base_path

SHAPES_BASE_STEPS = 2000            # steps of 64 (47 minutes for the CLIP base on one shared core; run once, shipped)
SHAPES_BASE_ONE_OBJECT_STEPS = 400  # phase 1
SHAPES_BASE_BATCH = 64
SHAPES_BASE_LR = 1e-3
SHAPES_BASE_WARMUP = 100
SHAPES_BASE_AUX_WEIGHT = 1.0        # weight of the attribute head's cross-entropy (one-object scenes only)
SHAPES_BASE_TWIN_PAIRS = 0          # phase 2: pairs of 2-object scenes per batch whose relation changes axis
SHAPES_BASE_LAYOUT_WEIGHT = 1.0     # phase 2: weight of the image-only layout head
SHAPES_BASE_TEXT_ORDER_WEIGHT = 1.0 # phase 2: weight of the text-only head naming the first two named objects
SHAPES_BASE_PAIR_WEIGHT = 0.1       # weight of the two colour-shape pair heads (one per tower)
SHAPES_BASE_SEED = 1234             # its own random stream of scenes, disjoint from the test split


class _LayoutTwins(torch.utils.data.Dataset):
    """Index 2p: a random 2-object scene; index 2p + 1: its layout twin (same objects, relation on the other axis).
    Both captioned with their relation (never as a bare list, which would give the pair one caption)."""

    def __init__(self, size, seed, transform):
        self.data, self.transform, self.pairs = data, transform, []
        for p in range((size + 1) // 2):
            rng = random.Random(f"shapes-twins:{seed}:{p}")
            twin = None
            while twin is None:
                scene = data.sample_scene(rng, n_objects=2)
                twin = data.relayout_twin(scene, rng)
            self.pairs.append([(s, data.render_description(data.scene_description(s, rng))) for s in (scene, twin)])
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        scene, caption = self.pairs[index // 2][index % 2]
        labels = (-1, -1, -1) + probe_labels(scene, caption)   # no attribute labels: two objects
        return self.transform(self.data.render_scene(scene, 64)), caption, torch.tensor(labels)


def mention_labels(caption):
    """(colour, shape) class indices of the first and of the second object a caption names, in the order it names
    them: the text order head's targets. Every object phrase of a shapes caption holds one colour word and one
    shape word, so the k-th colour word and the k-th shape word belong to the k-th object. -1 (ignored) when the
    caption names one object."""
    pairs = caption_pairs(caption)
    if len(pairs) < 2:
        return (-1, -1, -1, -1)
    (colour_1, shape_1), (colour_2, shape_2) = pairs[:2]
    return (data.COLORS.index(colour_1), data.SHAPES.index(shape_1), data.COLORS.index(colour_2),
            data.SHAPES.index(shape_2))


def caption_layout_labels(caption):
    """What a relation caption says of the layout, in the image layout head's frame: (colour, shape) of the left
    and of the top object of the two it relates ("a red circle below a blue square": top = blue square; left
    unknown, -1). All -1 for list captions and single objects."""
    named = mention_labels(caption)
    first, second = named[:2], named[2:]
    unknown = (-1, -1)
    for relation in data.RELATIONS:
        if f" {relation} " in caption and first[0] >= 0:
            if relation == "to the left of":
                return first + unknown
            if relation == "to the right of":
                return second + unknown
            return unknown + (first if relation == "above" else second)
    return unknown + unknown


def pair_labels(pairs):
    """Up to 4 colour-shape pair classes (colour x len(SHAPES) + shape), padded with -1: the targets of a pair
    head (which colour-shape conjunctions are present)."""
    classes = sorted({data.COLORS.index(c) * len(data.SHAPES) + data.SHAPES.index(s) for c, s in pairs})[:4]
    return tuple(classes) + (-1,) * (4 - len(classes))


def caption_pairs(caption):
    """The (colour, shape) of every object phrase of a shapes caption (see `mention_labels`)."""
    words = caption.replace(".", " ").split()
    return list(zip([w for w in words if w in data.COLORS], [w for w in words if w in data.SHAPES]))


def probe_labels(scene, caption):
    """Targets of the build's optional heads after the 3 attribute labels, 20 in all: `layout_labels` (image),
    `mention_labels` and `caption_layout_labels` (text), the scene's colour-shape pairs (image) and the
    caption's (text)."""
    return (layout_labels(scene) + mention_labels(caption) + caption_layout_labels(caption)
            + pair_labels([(o.color, o.shape) for o in scene]) + pair_labels(caption_pairs(caption)))


def layout_labels(scene):
    """(colour, shape) class indices of the leftmost and of the topmost object: the layout head's targets.
    -1 (ignored by the cross-entropy) for one-object scenes, where there is no layout to name."""
    if len(scene) < 2:
        return (-1, -1, -1, -1)
    left, top = min(scene, key=lambda o: o.cx), min(scene, key=lambda o: o.cy)
    return (data.COLORS.index(left.color), data.SHAPES.index(left.shape),
            data.COLORS.index(top.color), data.SHAPES.index(top.shape))


class _SceneWithAttributes(torch.utils.data.Dataset):
    """A shapes data set whose samples also carry the object's (shape, colour, size) class indices and the
    scene's `layout_labels`, 7 in all.

    Multi-object scenes get -1 for the three attributes (ignored by the cross-entropy): the attribute head only
    ever names the one object of a single-object scene, so it teaches what a shape looks like, never which
    colour goes with it."""

    def __init__(self, shapes_dataset):
        self.dataset, self.data = shapes_dataset, data

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        scene = self.dataset.scenes[index]
        if len(scene) == 1:
            obj = scene[0]
            labels = (self.data.SHAPES.index(obj.shape), self.data.COLORS.index(obj.color),
                      self.data.SIZES.index(obj.size))
        else:
            labels = (-1, -1, -1)
        return sample["image"], sample["caption"], torch.tensor(labels + probe_labels(scene, sample["caption"]))


def _phase2_counts(batch_size, twin_pairs):
    """(one-object scenes, 1-4-object scenes, twin scenes) in a phase-2 batch."""
    singles, twins = batch_size // 2, 2 * twin_pairs
    return singles, batch_size - singles - twins, twins


def _base_batch_indices(step, batch_size, one_object_steps, twin_pairs=0):
    """Which samples step `step` trains on, as [(data set, index), ...]: a pure function of the step, so that a
    resumed build sees exactly the batches of an uninterrupted one. The data sets are random streams already
    (scene i is drawn from its own seeded generator), so consecutive indices need no shuffling.
    Phase 1: one-object scenes; phase 2: half one-object scenes, then 1-4-object scenes, then `twin_pairs`
    layout-twin pairs (each pair on consecutive indices)."""
    if step < one_object_steps:
        return [("one", step * batch_size + j) for j in range(batch_size)]
    k = step - one_object_steps
    n_one, n_world, n_twin = _phase2_counts(batch_size, twin_pairs)
    return ([("one", one_object_steps * batch_size + k * n_one + j) for j in range(n_one)]
            + [("world", k * n_world + j) for j in range(n_world)]
            + [("twins", k * n_twin + j) for j in range(n_twin)])


def build_shapes_base(path, arch="clip", steps=SHAPES_BASE_STEPS, one_object_steps=SHAPES_BASE_ONE_OBJECT_STEPS,
                      batch_size=SHAPES_BASE_BATCH, lr=SHAPES_BASE_LR, warmup=SHAPES_BASE_WARMUP,
                      aux_weight=SHAPES_BASE_AUX_WEIGHT, twin_pairs=SHAPES_BASE_TWIN_PAIRS,
                      layout_weight=SHAPES_BASE_LAYOUT_WEIGHT, text_order_weight=SHAPES_BASE_TEXT_ORDER_WEIGHT,
                      text_layout_weight=0.0, pair_weight=SHAPES_BASE_PAIR_WEIGHT,
                      seed=SHAPES_BASE_SEED, checkpoint_every=100, eval_every=0, progress=True, command=None):
    """Train a tiny CLIP (arch 'clip') or SigLIP (arch 'siglip') from scratch on the shapes world and save it
    at `path` (fp16, atomically) with a sidecar `path[:-3] + '.json'`. Returns the sidecar dict.

    One AdamW run, one cosine schedule over all `steps`; batches from `_base_batch_indices` (two phases, see the
    section comment). Loss: the model's own contrastive loss (CLIP's InfoNCE, or open_clip's SigLipLoss with the
    learned scale and bias) + aux_weight x cross-entropy of the shared attribute head on the image and on the
    caption embedding of the one-object scenes + layout_weight x cross-entropy of the layout head on the image
    embedding of the multi-object scenes (phase 2) + text_order_weight x cross-entropy of the text-order head on
    the caption embedding (phase 2) + pair_weight x the pair heads' binary cross-entropy, summed over the 64
    colour-shape pairs, on both embeddings. Captions are in natural word order (data.scene_caption).
    Resumable: every `checkpoint_every` steps the full state goes to `path + '.partial'`; calling again with
    the same arguments continues from it and ends with the same weights."""
    common.register_tiny_model()
    name = SHAPES_BASE_ARCHS[arch]
    common.seed_everything(seed)
    model, _, val_tf = open_clip.create_model_and_transforms(name)
    tokenizer = common.tokenizer_for(name)
    siglip_loss = open_clip.loss.SigLipLoss() if arch == "siglip" else None
    class_counts = (len(data.SHAPES), len(data.COLORS), len(data.SIZES))
    attribute_head = torch.nn.Linear(model.visual.output_dim, sum(class_counts))
    layout_counts = (len(data.COLORS), len(data.SHAPES), len(data.COLORS), len(data.SHAPES))
    layout_head = torch.nn.Linear(model.visual.output_dim, sum(layout_counts))
    text_order_head = torch.nn.Linear(model.visual.output_dim, sum(layout_counts))   # first / second named
    text_layout_head = torch.nn.Linear(model.visual.output_dim, sum(layout_counts))  # left / top, as said
    n_pairs = len(data.COLORS) * len(data.SHAPES)
    pair_heads = torch.nn.ModuleList([torch.nn.Linear(model.visual.output_dim, n_pairs) for _ in range(2)])
    phase2_steps = max(0, steps - one_object_steps)
    per_batch = _phase2_counts(batch_size, twin_pairs)
    n_one = one_object_steps * batch_size + phase2_steps * per_batch[0]
    sources = {"one": _SceneWithAttributes(data.ShapesDataset("train", size=n_one, image_size=64, seed=seed,
                                                              transform=val_tf, n_objects=1)),
               "world": _SceneWithAttributes(data.ShapesDataset("train", size=max(1, phase2_steps * per_batch[1]),
                                                                image_size=64, seed=seed + 1, transform=val_tf)),
               "twins": _LayoutTwins(max(2, phase2_steps * per_batch[2]), seed + 2, val_tf)}
    aux_heads = [attribute_head, layout_head, text_order_head, text_layout_head, pair_heads]   # thrown away after
    optimizer = common.make_optimizer(torch.nn.ModuleList([model, *aux_heads]), lr=lr, wd=0.1,
                               betas=(0.9, 0.98), eps=1e-6)
    scheduler = common.cosine_schedule(optimizer, warmup=warmup, total=steps)
    partial = path + ".partial"
    # the recipe's commit, taken before training
    start, seconds, history, commit = 0, 0.0, [], common.git_commit(("common.py", "data.py", "lab/base_models.py"))
    if os.path.exists(partial):
        state = torch.load(partial, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        attribute_head.load_state_dict(state["head"])
        layout_head.load_state_dict(state["layout_head"])
        if "text_order_head" in state:
            text_order_head.load_state_dict(state["text_order_head"])
            text_layout_head.load_state_dict(state["text_layout_head"])
            pair_heads.load_state_dict(state["pair_heads"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        common.set_rng_state(state["rng"])
        start, seconds, history = state["step"], state["seconds"], state["history"]
        commit = state.get("commit", commit)
        print(f"[build-base] resuming {arch} from step {start} ({partial})", file=sys.stderr)
    model.train()
    bar = tqdm(total=steps, initial=start, desc=f"building the shapes {arch} base", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    tick = time.time()
    for step in range(start, steps):
        samples = [sources[source][index]
                   for source, index in _base_batch_indices(step, batch_size, one_object_steps, twin_pairs)]
        images = torch.stack([s[0] for s in samples])
        texts = common.trim_padding(tokenizer([s[1] for s in samples]))   # 5-20 of 32 columns are used
        labels = torch.stack([s[2] for s in samples])
        attribute_labels, layout_targets, mention_targets = labels[:, :3], labels[:, 3:7], labels[:, 7:11]
        caption_layout_targets = labels[:, 11:15]
        pair_targets = labels[:, 15:19], labels[:, 19:23]   # image's, caption's
        image_features = model.encode_image(images)
        text_features = common.encode_text_tokens(model, texts)[0]
        image_emb, text_emb = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        if siglip_loss is not None:
            loss = siglip_loss(image_emb, text_emb, model.logit_scale.exp(), model.logit_bias)
        else:
            loss = common.clip_loss(image_emb, text_emb, model.logit_scale.exp())
        contrastive = float(loss.detach())
        if aux_weight and (attribute_labels[:, 0] >= 0).any():
            for features in (image_features, text_features):   # one head, shared: both towers in one space
                heads = attribute_head(features).split(class_counts, dim=-1)
                aux = sum(F.cross_entropy(h, y, ignore_index=-1) for h, y in zip(heads, attribute_labels.unbind(1)))
                loss = loss + aux_weight * aux
        layout = None
        if layout_weight and (layout_targets[:, 0] >= 0).any():   # the image tower only: where each object is
            heads = layout_head(image_features).split(layout_counts, dim=-1)
            layout = sum(F.cross_entropy(h, y, ignore_index=-1) for h, y in zip(heads, layout_targets.unbind(1)))
            loss = loss + layout_weight * layout
        if text_order_weight and (mention_targets[:, 0] >= 0).any():   # the text tower only: who is named first
            heads = text_order_head(text_features).split(layout_counts, dim=-1)
            mention = sum(F.cross_entropy(h, y, ignore_index=-1) for h, y in zip(heads, mention_targets.unbind(1)))
            loss = loss + text_order_weight * mention
        if text_layout_weight and (caption_layout_targets >= 0).any():   # the text tower only: what is left / on top
            heads = text_layout_head(text_features).split(layout_counts, dim=-1)
            said = sum(F.cross_entropy(h, y, ignore_index=-1) for h, y in zip(heads, caption_layout_targets.unbind(1))
                       if (y >= 0).any())
            loss = loss + text_layout_weight * said
        if pair_weight:   # each tower its own head: which colour-shape conjunctions are there
            for head, features, targets in zip(pair_heads, (image_features, text_features), pair_targets):
                # -1 (padding) lands in an extra column that is cut off
                multi_hot = torch.zeros(len(targets), n_pairs + 1).scatter_(1, targets % (n_pairs + 1), 1.0)
                pairs = F.binary_cross_entropy_with_logits(head(features), multi_hot[:, :n_pairs], reduction="sum")
                loss = loss + pair_weight * pairs / len(targets)   # summed over the 64 yes/no questions
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        common.clamp_logit_scale(model)
        bar.update(1)
        bar.set_postfix(phase=1 if step < one_object_steps else 2, loss=f"{loss.item():.3f}")
        done = step + 1
        if eval_every and done % eval_every == 0 and done < steps:
            seconds += time.time() - tick
            metrics = _quick_base_metrics(model, tokenizer, val_tf)
            history.append({"step": done, "contrastive_loss": round(contrastive, 4),
                            "layout_loss": None if layout is None else round(float(layout.detach()), 4), **metrics})
            tqdm.write(f"[build-base] {arch} step {done}: {json.dumps(history[-1])}", file=sys.stderr)
            model.train()
            tick = time.time()
        if checkpoint_every and done % checkpoint_every == 0 and done < steps:
            seconds += time.time() - tick
            common._atomic_torch_save({"model": model.state_dict(), "head": attribute_head.state_dict(),
                                "layout_head": layout_head.state_dict(),
                                "text_order_head": text_order_head.state_dict(),
                                "text_layout_head": text_layout_head.state_dict(),
                                "pair_heads": pair_heads.state_dict(),
                                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                "rng": common.rng_state(), "step": done, "seconds": seconds, "history": history,
                                "commit": commit}, partial)
            tick = time.time()
    seconds += time.time() - tick
    bar.close()
    model.eval()
    suite = evaluation.shapes_suite(model, tokenizer, val_tf)
    half = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    common._atomic_torch_save(half, path)   # a bare state dict: open_clip.create_model(name, pretrained=path) loads it
    os.chmod(path, 0o644)            # mkstemp makes files private; this one is meant to be shipped
    sidecar = {
        "model": name, "arch": arch, "file": os.path.basename(path), "sha256": common._sha256(path),
        "bytes": os.path.getsize(path), "dtype": "float16 (loaded as float32)",
        "command": command or common.rebuild_command(arch), "recipe_commit": commit,
        "seed": seed, "steps": steps, "one_object_steps": one_object_steps, "batch_size": batch_size, "lr": lr,
        "warmup": warmup, "weight_decay": 0.1, "aux_weight": aux_weight, "twin_pairs": twin_pairs,
        "layout_weight": layout_weight, "text_order_weight": text_order_weight,
        "text_layout_weight": text_layout_weight, "pair_weight": pair_weight,
        "train_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "open_clip": open_clip.__version__,
        "captions": "natural word order (data.scene_caption); phase 1 one-object scenes; phase 2 half one-object, "
                    f"{twin_pairs} layout-twin pairs per batch, the rest 1-4-object scenes",
        "aux_head": "shared linear head (shape, colour, size) on image and caption embeddings, one-object scenes",
        "layout_head": "linear head on the image embedding only: colour and shape of the leftmost and the topmost "
                       "object of multi-object scenes (phase 2)" if layout_weight else "none",
        "text_order_head": "linear head on the caption embedding only: colour and shape of the first and the second "
                           "object the caption names (phase 2)" if text_order_weight else "none",
        "text_layout_head": "linear head on the caption embedding only: colour and shape of the left and the top "
                            "object a relation caption says (phase 2)" if text_layout_weight else "none",
        "pair_heads": "one linear head per tower, sigmoid yes / no for each of the 64 colour-shape pairs of the "
                      "scene" if pair_weight else "none",
        "loss": "SigLIP sigmoid (open_clip.SigLipLoss, learned scale and bias)" if siglip_loss is not None
                else "CLIP InfoNCE (learned scale)",
        "shapes_suite": {k: round(v, 2) for k, v in {**suite["metrics"], **suite["summary"]}.items()},
        "history": history,
    }
    common._atomic_write_text(path[:-3] + ".json", json.dumps(sidecar, indent=2) + "\n")
    os.chmod(path[:-3] + ".json", 0o644)
    if os.path.exists(partial):
        os.remove(partial)
    return sidecar


def _quick_base_metrics(model, tokenizer, transform):
    """Zero-shot colour+shape on 200 held-out single objects and swap_att, during a build (a few seconds)."""
    model.eval()
    with torch.no_grad():
        result = evaluation.shapes_suite(model, tokenizer, transform, n_scenes=300, n_singles=200)
    m = result["metrics"]
    return {k: round(m[k], 1) for k in ("zeroshot_color_shape", "swap_att", "swap_obj", "aro_relation",
                                         "aro_attribute", "retrieval_i2t_r1", "retrieval_t2i_r1")}



def main(argv=None):
    """`python -m lab.base_models --arch clip` (or `--arch siglip`): the recipe of the shipped base models."""
    build = argparse.ArgumentParser(prog="python -m lab.base_models", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                    description="Train a shapes base model from scratch (the shipped files' recipe).")
    parser = build
    build.add_argument("--arch", choices=sorted(SHAPES_BASE_ARCHS), default="clip",
                       help="clip: shapes-tiny-vit (InfoNCE); siglip: shapes-tiny-siglip (sigmoid loss)")
    build.add_argument("--out", default=None, help="output .pt (default: the shipped file in models/, replaced)")
    build.add_argument("--steps", type=int, default=SHAPES_BASE_STEPS, help="optimizer steps in all")
    build.add_argument("--one-object-steps", type=int, default=SHAPES_BASE_ONE_OBJECT_STEPS,
                       help="phase 1: steps on one-object scenes only")
    build.add_argument("--batch-size", type=int, default=SHAPES_BASE_BATCH)
    build.add_argument("--lr", type=float, default=SHAPES_BASE_LR)
    build.add_argument("--warmup", type=int, default=SHAPES_BASE_WARMUP)
    build.add_argument("--aux-weight", type=float, default=SHAPES_BASE_AUX_WEIGHT,
                       help="weight of the shared attribute head (0: plain contrastive training)")
    build.add_argument("--twin-pairs", type=int, default=SHAPES_BASE_TWIN_PAIRS,
                       help="phase 2: layout-twin pairs per batch (same two objects, relation on the other axis)")
    build.add_argument("--layout-weight", type=float, default=SHAPES_BASE_LAYOUT_WEIGHT,
                       help="phase 2: weight of the image-only layout head (0: off)")
    build.add_argument("--text-order-weight", type=float, default=SHAPES_BASE_TEXT_ORDER_WEIGHT,
                       help="weight of a text-only head naming colour and shape of the first two objects a caption "
                       "names, in order (0: off)")
    build.add_argument("--text-layout-weight", type=float, default=0.0,
                       help="weight of a text-only head naming colour and shape of the left and the top object of a "
                       "relation caption, as the caption says them (0: off)")
    build.add_argument("--pair-weight", type=float, default=SHAPES_BASE_PAIR_WEIGHT,
                       help="weight of two heads, one per tower, naming the colour-shape pairs present (0: off)")
    build.add_argument("--seed", type=int, default=SHAPES_BASE_SEED)
    build.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    build.add_argument("--eval-every", type=int, default=0, help="print quick suite numbers every N steps (0: off)")
    build.add_argument("--checkpoint-every", type=int, default=100, help="resumable state every N steps")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or shipped_base_path(args.arch)
    if not out.endswith(".pt"):
        parser.error(f"--out must end in .pt (the sidecar is written next to it as .json), got {out!r}")
    command = "python -m lab.base_models " + " ".join(sys.argv[1:] if argv is None else argv)
    sidecar = build_shapes_base(out, arch=args.arch, steps=args.steps, one_object_steps=args.one_object_steps,
                                batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                                aux_weight=args.aux_weight, twin_pairs=args.twin_pairs,
                                layout_weight=args.layout_weight, text_order_weight=args.text_order_weight,
                                text_layout_weight=args.text_layout_weight, pair_weight=args.pair_weight,
                                seed=args.seed,
                                checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, command=command)
    suite = sidecar["shapes_suite"]
    print(f"{out}: {sidecar['bytes'] / 1e6:.1f} MB, {sidecar['train_seconds']:.0f} s of training; zero-shot "
          f"colour+shape {suite['zeroshot_color_shape']}, retrieval R@1 {suite['retrieval R@1']}, swap_att "
          f"{suite['swap_att']}, swap_obj {suite['swap_obj']}, aro_relation {suite['aro_relation']}, aro_attribute "
          f"{suite['aro_attribute']}")


if __name__ == "__main__":
    main()
