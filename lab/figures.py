"""Mechanism figures: one picture per method's mechanism, on held-out shapes scenes.

    python -m lab.figures --kind failure --model shapes-tiny-vit --pretrained shapes --out docs/failure.png
    python -m lab.figures --kind negatives --after RUN_FOLDER        # DeGLA's or CE-CLIP's hard negatives
    python -m lab.figures --kind c2lip --after RUN_FOLDER            # C2LIP's concept -> patch attention
    python -m lab.figures --kind goal --after RUN_FOLDER             # GOAL's LISM matching and TSL region

This is experiment tooling: it imports the method scripts (to draw their own mechanisms with their own code) and the
helpers below them; nothing in the method scripts or the helpers imports it.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import c2lip
import cehn
import common
import data
import degla
import eval as evaluation
import goal

# One picture per mechanism, each of one held-out shapes scene (the suite's test split, never trained on), drawn with
# PIL alone (requirements.txt has no plotting library):
#   failure    one compositionality failure of one model (the README's first picture; the default kind)
#   negatives  DeGLA's or CE-CLIP's hard negatives of a caption, each scored before and after fine-tuning, and, from a
#              CE-CLIP run's log.jsonl, its per-type margins theta_k over training
#   c2lip      C2LIP's parameter-free cross-attention: for each concept of a caption, its attention over the patches
#   goal       GOAL's LISM matching (the crop each sentence picks, the kept pair) and the patches TSL pools
# The last three compare two models: --before (default: the shipped base) and --after (a finished run folder or a
# weights file). Without --after the after column is left empty and says so. Every picture carries its own legend
# and a caption saying what is shown.

FIGURE_KINDS = ("failure", "negatives", "c2lip", "goal")
INK, GREY, GREEN, RED = (0, 0, 0), (120, 120, 120), (0, 110, 0), (170, 0, 0)
SERIES_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                  (227, 119, 194))   # one per negative type / sentence, distinguishable on white and on the scenes
NO_AFTER = "after: not drawn (no --after given)"


def _font(size=14):
    """PIL's built-in font at `size` px (a scalable font since Pillow 10.1; older Pillow: its one bitmap size)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _fit(draw, text, font, width):
    """`text`, cut with '...' if it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _paragraph(draw, xy, text, font, width, fill=INK, line_height=18, max_lines=6):
    """Draw `text` wrapped at spaces to `width` pixels, at most `max_lines` lines (the canvas has a fixed size)."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [_fit(draw, " ".join(lines[max_lines - 1:]), font, width)]
    x, y = xy
    for line in lines:
        draw.text((x, y), line, fill=fill, font=font)
        y += line_height


def _save(canvas, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


@dataclasses.dataclass
class FigureModel:
    """One column of a before/after figure: the model, its transform and tokenizer, and what the picture calls it."""
    model: object
    transform: object
    tokenizer: object
    label: str
    run_dir: str = None   # the run folder it came from (config.json, log.jsonl), or None


def _run_config(run_dir):
    """A run folder's config.json as a dict ({} without one)."""
    path = Path(run_dir) / "config.json" if run_dir else None
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def load_figure_model(spec, model_name="shapes-tiny-vit", role="after", device=None):
    """A --before / --after value as a FigureModel.

    spec: a finished run folder (loaded as `local-dir:FOLDER`: its own config and weights, GOAL's stretched text
    context included), or a pretrained tag or weights file of `model_name` ('shapes' = the shipped base). A run's
    final.pt loads as its run folder: the same weights (the folder's open_clip weights are a link to it) with the
    run's own config, which a model name would not have for GOAL's stretched context."""
    spec = str(spec)
    exported = os.path.join(os.path.dirname(os.path.abspath(spec)), common.OPEN_CLIP_CONFIG)
    if os.path.isfile(spec) and os.path.basename(spec) == "final.pt" and os.path.isfile(exported):
        spec = os.path.dirname(os.path.abspath(spec))
    if os.path.isdir(spec):
        model, transform, tokenizer = evaluation.create_backbone(f"local-dir:{spec}", None, evaluation.pick_device(device))
        run_dir = spec
    else:
        model, transform, tokenizer = evaluation.create_backbone(model_name, spec, evaluation.pick_device(device))
        folder = os.path.dirname(os.path.abspath(spec))
        run_dir = folder if os.path.isfile(spec) and os.path.isfile(os.path.join(folder, "config.json")) else None
    model.eval()
    config = _run_config(run_dir)
    if config:
        method = config.get("method", "?") + (f" --baseline {config['baseline']}" if config.get("baseline") else "")
        label = f"{role}: {method} run {Path(run_dir).name} ({config.get('steps', '?')} steps)"
    else:
        label = f"{role}: {model_name} / {spec}" + (" (the shipped base)" if spec == "shapes" else "")
    return FigureModel(model, transform, tokenizer, label, run_dir)


def _cosines(column, image, texts, device=None):
    """Cosine of one PIL image with each of `texts` under a FigureModel: a list of floats."""
    image_emb, _ = evaluation.encode_images(column.model, [image], column.transform, device, workers=0)
    text_emb = evaluation.encode_texts(column.model, column.tokenizer, texts, device)
    return (text_emb @ image_emb[0]).tolist()


def _empty_column(draw, box, font):
    """The after column of a figure drawn without --after: a grey frame that says so."""
    draw.rectangle(box, outline=GREY, width=1)
    draw.text((box[0] + 10, (box[1] + box[3]) // 2 - 8), NO_AFTER, fill=GREY, font=font)


def _nice_step(span, ticks=5):
    """A round tick step (1, 2 or 5 times a power of ten) that gives about `ticks` ticks over `span`."""
    raw = max(span, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(f * power for f in (1, 2, 5, 10) if raw <= f * power)


def _line_chart(draw, box, series, x_label, y_label, font):
    """A line chart inside box = (x0, y0, x1, y1): axes starting at 0, round ticks, one polyline per
    (label, xs, ys, colour) of `series`, and a legend right of the box giving each series' last value."""
    x0, y0, x1, y1 = box
    x_max = max(max(xs) for _, xs, _, _ in series) or 1
    y_max = max(max(ys) for _, _, ys, _ in series)
    y_step = _nice_step(y_max if y_max > 0 else 1.0)
    y_top = y_step * max(1, math.ceil(y_max / y_step - 1e-9))
    x_step = _nice_step(x_max)

    def point(x, y):
        return x0 + (x1 - x0) * x / x_max, y1 - (y1 - y0) * y / y_top

    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=INK, width=1)
    for k in range(int(round(y_top / y_step)) + 1):
        _, y = point(0, k * y_step)
        draw.line([(x0 - 4, y), (x0, y)], fill=INK)
        draw.line([(x0 + 1, y), (x1, y)], fill=(230, 230, 230))
        label = f"{k * y_step:g}"
        draw.text((x0 - 8 - draw.textlength(label, font=font), y - 7), label, fill=INK, font=font)
    for k in range(int(x_max // x_step) + 1):
        x, _ = point(k * x_step, 0)
        draw.line([(x, y1), (x, y1 + 4)], fill=INK)
        label = f"{k * x_step:g}"
        draw.text((x - draw.textlength(label, font=font) / 2, y1 + 6), label, fill=INK, font=font)
    draw.text(((x0 + x1 - draw.textlength(x_label, font=font)) / 2, y1 + 24), x_label, fill=INK, font=font)
    draw.text((x0, y0 - 20), y_label, fill=INK, font=font)
    for i, (label, xs, ys, colour) in enumerate(series):
        points = [point(x, y) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        else:
            draw.ellipse([points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3], fill=colour)
        ly = y0 + 10 + 22 * i
        draw.line([(x1 + 20, ly + 8), (x1 + 44, ly + 8)], fill=colour, width=3)
        draw.text((x1 + 52, ly), f"{label}: {ys[-1]:.2f} at step {xs[-1]}", fill=INK, font=font)


# --- failure: one compositionality failure --------------------------------------------------------------------

def failure_figure(model, tokenizer, transform, path, device=None, subset="swap_att", n_scenes=evaluation.SHAPES_SUITE_SCENES):
    """Draw one held-out shapes scene with its caption, the swapped negative and the model's scores for both.

    The item shown is the first one of `subset` (in the suite's fixed order) on which the model prefers the
    negative, i.e. a real failure, and the caption of the figure says how often the model is right on the
    whole subset, so the picture is not mistaken for the typical case. n_scenes: the suite's first n test scenes
    only (the tests' shortcut; the items of the first n scenes are the first items of the whole suite)."""
    world, items = evaluation.shapes_suite_items(n_scenes=n_scenes)
    image_size = evaluation._transform_size(transform)
    subset_items = items[subset]
    images = [data.render_scene(world.scenes[i], image_size) for i, _, _ in subset_items]
    image_emb, _ = evaluation.encode_images(model, images, transform, device, workers=0)
    pos_emb = evaluation.encode_texts(model, tokenizer, [p for _, p, _ in subset_items], device)
    neg_emb = evaluation.encode_texts(model, tokenizer, [n for _, _, n in subset_items], device)
    pos_score, neg_score = (image_emb * pos_emb).sum(-1), (image_emb * neg_emb).sum(-1)
    accuracy = evaluation.percent(pos_score > neg_score)
    wrong = (pos_score <= neg_score).nonzero().flatten().tolist()
    k = wrong[0] if wrong else 0
    index, positive, negative = subset_items[k]
    big = data.render_scene(world.scenes[index], 256)
    canvas = Image.new("RGB", (900, 300), (255, 255, 255))
    canvas.paste(big, (22, 22))
    draw = ImageDraw.Draw(canvas)
    lines = [(f"caption (true):   {positive}", (0, 110, 0)), (f"cosine = {pos_score[k]:.3f}", (0, 110, 0)), ("", None),
             (f"{subset} negative: {negative}", (170, 0, 0)), (f"cosine = {neg_score[k]:.3f}", (170, 0, 0)), ("", None),
             (f"the model prefers the {'negative (wrong)' if neg_score[k] >= pos_score[k] else 'caption (right)'}", (0, 0, 0)),
             (f"on all {len(subset_items)} {subset} items it is right {accuracy:.1f}% of the time (chance 50%)", (0, 0, 0))]
    y = 40
    for text, color in lines:
        if text:
            draw.text((300, y), text, fill=color)
        y += 22
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return {"index": index, "positive": positive, "negative": negative, "pos_score": float(pos_score[k]),
            "neg_score": float(neg_score[k]), "subset_accuracy": accuracy}


# --- negatives: DeGLA's and CE-CLIP's hard negatives, before and after ----------------------------------------

NEGATIVES_SEARCH = 60            # held-out relation captions searched for the default scene
NEGATIVES_SIZE = (1250, 470)     # without the thresholds panel; the panel adds NEGATIVES_PANEL pixels of height
NEGATIVES_PANEL = 280
NEGATIVES_ROW, NEGATIVES_ROWS = 40, 6   # a row holds two lines of text; room for the caption and DeGLA's 5 types
METHOD_TITLES = {"degla": "DeGLA", "cehn": "CE-CLIP"}


def figure_negative_types(method, run_dir=None):
    """The negative types a method trains with: the run's --neg-types if its config.json has them, else the
    method's default (degla.PAPER_DEFAULTS, data.CEHN_TYPES)."""
    if method in ("cehn", "degla"):
        default = ",".join(data.CEHN_TYPES) if method == "cehn" else degla.PAPER_DEFAULTS["neg_types"]
        types = _run_config(run_dir).get("neg_types") or default
        return [t.strip() for t in types.split(",") if t.strip()]
    raise ValueError(f"negatives figure: method must be degla or cehn, got {method!r}")


def read_thresholds(log_path):
    """CE-CLIP's margin per negative type over training, from a cehn run's log.jsonl (cehn.py logs theta_<type> at
    every step): [(type, [step, ...], [theta, ...]), ...] in cehn.NEG_TYPES order; [] if the log has none.
    A resumed run may log a step twice: the last value counts."""
    by_type = {name: {} for name in cehn.NEG_TYPES}
    for line in Path(log_path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            for name in cehn.NEG_TYPES:
                if f"theta_{name}" in record:
                    by_type[name][record["step"]] = record[f"theta_{name}"]
    return [(name, sorted(values), [values[s] for s in sorted(values)]) for name, values in by_type.items() if values]


def negatives_figure(before, after, path, method="degla", log_path=None, scene=None, device=None):
    """DeGLA's or CE-CLIP's hard negatives of one held-out caption, with the cosine each model gives the caption and
    each negative, before and after fine-tuning; for CE-CLIP also its per-type margins theta_k over training.

    What it shows: both methods train on rule-made negatives of each caption (data.make_negatives with the
    method's types, inside the shapes world's vocabulary). A slot whose rule does not apply to the caption is
    invalid, masked out of every loss, and listed without scores. The base model reads captions almost as bags
    of words, so it scores some negative about as high as the caption; fine-tuning should put the caption first.
    CE-CLIP's rank loss asks each image to prefer its caption by a margin theta_k per type that follows the previous
    batch's mean positive-negative logit gap (cehn.update_thresholds): the lower panel draws that curriculum from
    the run's log.jsonl, when `log_path` is given or the after run folder has one with theta_<type> entries.

    before, after: FigureModel (after may be None: before column only). scene: index of the held-out test scene;
    default: of the first NEGATIVES_SEARCH relation captions, the first that has a valid negative of every type,
    no two of them alike, and on which the before model scores a negative at or above the caption (else the first
    with such negatives). Only relation captions are searched: in a plain list ("a red circle and a blue square")
    DeGLA's reshuffle gives a caption that is still true. The picture is NEGATIVES_SIZE, plus NEGATIVES_PANEL pixels of
    height with the thresholds.
    Returns a dict of what is drawn ("rows": the scored caption and valid negatives)."""
    types = figure_negative_types(method, after.run_dir if after is not None else None)
    if log_path is None and after is not None and after.run_dir and (Path(after.run_dir) / "log.jsonl").exists():
        found = Path(after.run_dir) / "log.jsonl"
        thresholds = read_thresholds(found)
        log_path = found if thresholds else None
    elif log_path is not None:
        thresholds = read_thresholds(log_path)
        if not thresholds:
            raise evaluation.BenchmarkDataError(f"--log {log_path}: no theta_<type> entries (cehn.py writes them at every step; "
                                     f"is this the log.jsonl of a cehn.py run?)")
    else:
        thresholds = []
    world = data.ShapesDataset("test", size=evaluation.SHAPES_SUITE_SCENES, seed=evaluation.SHAPES_SUITE_SEED)
    if scene is None:   # relation captions: reshuffling the objects of a plain list gives a caption still true
        indices = [i for i, c in enumerate(world.captions) if any(r in c for r in data.RELATIONS)][:NEGATIVES_SEARCH]
    else:
        indices = [scene]
    captions = [world.captions[i] for i in indices]
    negatives, valid = data.make_negatives(captions, types, progress=False, vocabulary=data.ShapesDataset.vocabulary)
    image_size = evaluation._transform_size(before.transform)
    pick, rule = 0, "chosen with --scene"
    # every type valid that is valid on some searched caption (CE-CLIP's action never is: the captions have no
    # verb), and no two negatives alike (two red objects make a colour swap and a noun swap the same text)
    possible = [j for j in range(len(types)) if any(flags[j] for flags in valid)]
    complete = [k for k in range(len(indices)) if all(valid[k][j] for j in possible)
                and len({negatives[k][j] for j in possible}) == len(possible)]
    if scene is None and complete:
        images = [data.render_scene(world.scenes[indices[k]], image_size) for k in complete]
        image_emb, _ = evaluation.encode_images(before.model, images, before.transform, device, workers=0)
        pos_emb = evaluation.encode_texts(before.model, before.tokenizer, [captions[k] for k in complete], device)
        neg_emb = evaluation.encode_texts(before.model, before.tokenizer,
                                          [negatives[k][j] for k in complete for j in possible], device)
        pos_score = (image_emb * pos_emb).sum(-1)
        neg_score = evaluation.choice_scores(image_emb, neg_emb.view(len(complete), len(possible), -1))
        fooled = (neg_score.max(dim=1).values >= pos_score).nonzero().flatten().tolist()
        pick = complete[fooled[0] if fooled else 0]
        rule = (f"the first of the first {len(indices)} held-out relation captions with {len(possible)} different valid "
                f"negatives on which the before model scores a negative at or above the caption" if fooled else
                f"the first of the first {len(indices)} held-out relation captions with {len(possible)} different valid "
                f"negatives (the before model ranks the caption first on all of them)")
    index, caption = indices[pick], captions[pick]
    texts = [caption] + [n for n, ok in zip(negatives[pick], valid[pick]) if ok]
    labels = ["caption (true)"] + [t for t, ok in zip(types, valid[pick]) if ok]
    invalid = [t for t, ok in zip(types, valid[pick]) if not ok]
    image = data.render_scene(world.scenes[index], image_size)
    scores = {"before": _cosines(before, image, texts, device),
              "after": _cosines(after, image, texts, device) if after is not None else None}

    width, height = NEGATIVES_SIZE[0], NEGATIVES_SIZE[1] + (NEGATIVES_PANEL if thresholds else 0)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(data.render_scene(world.scenes[index], 256), (20, 60))
    draw = ImageDraw.Draw(canvas)
    title, font, small = _font(18), _font(14), _font(12)
    name = METHOD_TITLES[method]
    draw.text((20, 12), f"{name}'s hard negatives of one held-out caption: cosine(image, text) before and after "
                        f"fine-tuning", fill=INK, font=title)
    draw.text((20, 36), f"{before.label}      {after.label if after is not None else NO_AFTER}", fill=GREY, font=small)
    draw.text((20, 322), f"held-out test scene {index}", fill=GREY, font=small)
    columns = {"type": 300, "text": 430, "before": 1060, "after": 1160}
    draw.text((columns["type"], 62), "type", fill=GREY, font=font)
    draw.text((columns["text"], 62), f"text (the {len(types)} negative types {name} trains with: {', '.join(types)})",
              fill=GREY, font=font)
    draw.text((columns["before"], 62), "before", fill=GREY, font=font)
    draw.text((columns["after"], 62), "after" if after is not None else "after: -", fill=GREY, font=font)
    rows = []
    for r, (label, text) in enumerate(zip(labels, texts)):
        y = 90 + NEGATIVES_ROW * r
        colour = GREEN if r == 0 else INK
        draw.text((columns["type"], y), label, fill=colour, font=font)
        _paragraph(draw, (columns["text"], y), text, font, columns["before"] - columns["text"] - 15, colour,
                   max_lines=2)
        row = {"type": label, "text": text}
        for when in ("before", "after"):
            if scores[when] is None:
                continue
            value = scores[when][r]
            beats = r > 0 and value >= scores[when][0]   # the model would pick this negative over the caption
            draw.text((columns[when], y), f"{value:.4f}", fill=GREEN if r == 0 else (RED if beats else INK), font=font)
            row[when] = value
        rows.append(row)
    for r, negative_type in enumerate(invalid, start=len(texts)):
        draw.text((columns["type"], 90 + NEGATIVES_ROW * r), negative_type, fill=GREY, font=font)
        draw.text((columns["text"], 90 + NEGATIVES_ROW * r), "(the rule does not apply to this caption: masked out of "
                  "the losses)", fill=GREY, font=font)
    y = 90 + NEGATIVES_ROW * NEGATIVES_ROWS + 6
    ranks = []
    for when in ("before", "after"):
        if scores[when] is not None:
            rank = 1 + sum(v > scores[when][0] for v in scores[when][1:])
            ranks.append(f"{when}: the caption ranks {rank} of {len(texts)}")
    draw.text((columns["type"], y), ";   ".join(ranks), fill=INK, font=font)
    draw.text((columns["type"], y + 24), "green: the true caption;  red: a negative scored at or above the caption "
                                         "(the model would pick it)", fill=GREY, font=small)
    _paragraph(draw, (20, 388), f"Scene {index} of the shapes suite's test split (never trained on; {rule}). "
               f"Each row is one of {name}'s rule-made hard negatives of the caption (data.make_negatives), and the "
               f"numbers are the cosine of the image with each text under the two models. "
               + ("" if after is not None else "Before column only: no --after model was given."),
               font, width - 40, max_lines=4)
    if thresholds:
        top = NEGATIVES_SIZE[1] + 30
        draw.text((20, top - 10), f"CE-CLIP's per-type margins theta_k over training (cross-modal rank loss), from "
                                  f"{log_path}", fill=INK, font=font)
        series = [(t, xs, ys, SERIES_COLOURS[i]) for i, (t, xs, ys) in enumerate(thresholds)]
        _line_chart(draw, (90, top + 40, 760, top + NEGATIVES_PANEL - 80), series, "training step",
                    "theta_k (logit units)", small)
        _paragraph(draw, (830, top + 140), "theta_k = mean positive logit - mean logit of the type-k negatives of the "
                   "previous batch, clipped to [0, upper bound] (10 by default; cehn.update_thresholds): a margin that "
                   "grows as the model separates each type, and stays at 0 for a type it cannot separate yet.", small,
                   width - 850, line_height=16, max_lines=5)
    _save(canvas, path)
    return {"method": method, "types": types, "index": index, "caption": caption, "rows": rows, "invalid": invalid,
            "thresholds": [t for t, _, _ in thresholds], "log": str(log_path) if log_path else None,
            "size": canvas.size}


# --- c2lip: concept -> patch attention ------------------------------------------------------------------------

C2LIP_CELL = 200                       # side of each drawn image
C2LIP_ROW = C2LIP_CELL + 40            # one row per concept
C2LIP_TOP, C2LIP_BOTTOM = 130, 100     # title, labels and colour bar; caption text
C2LIP_WIDTH = 1120


def _heat_colour(value):
    """value in [0, 1] -> RGB on a black-red-yellow-white ramp."""
    return (int(255 * min(1.0, 3 * value)), int(255 * min(1.0, max(0.0, 3 * value - 1))),
            int(255 * max(0.0, 3 * value - 2)))


def _heat_map(scene_image, weights, grid):
    """The scene with one patch weight per cell as a colour over it: (grid * grid,) weights, scaled from their own
    min (black) to their own max (white), each patch a flat block (the model sees no finer detail)."""
    low, high = min(weights), max(weights)
    spread = (high - low) or 1.0
    heat = Image.new("RGB", (grid, grid))
    heat.putdata([_heat_colour((w - low) / spread) for w in weights])
    heat = heat.resize(scene_image.size, Image.NEAREST)
    return Image.blend(scene_image, heat, 0.6)


def _concept_box(scene, concept, image_size):
    """The box of the scene object a concept names ("a small red circle" -> the red circle), or None."""
    for obj in scene:
        if f"{obj.color} {obj.shape}" in concept.lower():
            return obj.box(image_size)
    return None


def _concept_attention(column, image, concepts, temperature, device=None):
    """C2LIP's quantities for one image and its concepts under a FigureModel, from c2lip.py's own functions:
    attention (K, P) = c2lip.xac_attention over the patch embeddings of c2lip.encode_image_with_patches (CLIP towers:
    common.encode_image_tokens; SigLIP towers: the MAP head's value path), xac (K,) = c2lip.xac_similarity (the
    cosine of the concept-pooled image vector with its concept, L_xac's score) and global (K,) = cosine of the
    pooled image embedding with each concept (L_npc's score)."""
    device = evaluation.pick_device(device)
    pixels = column.transform(image)[None].to(device)
    with evaluation.inference_context(device):
        image_emb, patch_emb = c2lip.encode_image_with_patches(column.model, pixels)
        concept_emb = F.normalize(column.model.encode_text(column.tokenizer(concepts).to(device)), dim=-1)
        patch_emb, concept_emb, image_emb = patch_emb.float(), concept_emb.float(), image_emb.float()
        attention = c2lip.xac_attention(patch_emb, concept_emb, temperature)[:, 0]
        xac = c2lip.xac_similarity(patch_emb, concept_emb, temperature)[0]
        global_cos = (image_emb @ concept_emb.t())[0]
    return {"attention": attention.cpu().tolist(), "xac": xac.cpu().tolist(), "global": global_cos.cpu().tolist()}


def c2lip_figure(before, after, path, scene=None, device=None):
    """C2LIP's parameter-free cross-attention on one held-out scene: for each concept (noun phrase) of its caption,
    the attention of that concept over the image's patches, drawn as a heat map over the scene, before and after.

    What it shows: C2LIP encodes each concept ("a small red circle", data.extract_concepts) on its own and, with
    the concept as the query and the patch embeddings as keys and values (no parameters), pools a concept-specific
    image vector that L_xac asks to match the concept (c2lip.xac_attention / xac_similarity). The attention
    weights say which patches that vector is made of: if the model binds colour and shape, "a small red circle"
    should light up the red circle (outlined in white) and not the other red object or the other circle. Each map
    is scaled to its own min..max (the numbers under it); at tau = 1 with cosines in [-1, 1] the weights stay
    within a factor e^2 of each other, so the scale matters.

    before, after: FigureModel (after may be None). scene: index of the held-out test scene; default: the first
    with three objects. The picture is C2LIP_WIDTH wide and C2LIP_TOP + C2LIP_ROW per concept + C2LIP_BOTTOM high.
    Returns a dict of what is drawn (per model: attention maps, XAC and global cosines)."""
    world = data.ShapesDataset("test", size=evaluation.SHAPES_SUITE_SCENES, seed=evaluation.SHAPES_SUITE_SEED)
    index = scene if scene is not None else next(i for i, s in enumerate(world.scenes) if len(s) == 3)
    caption = world.captions[index]
    concepts = data.extract_concepts([caption], progress=False)[0]
    temperature = float(_run_config(after.run_dir if after else None).get("xac_temperature")
                        or c2lip.C2LIP_DEFAULTS["xac_temperature"])
    image_size = evaluation._transform_size(before.transform)
    image = data.render_scene(world.scenes[index], image_size)
    maps = {"before": _concept_attention(before, image, concepts, temperature, device),
            "after": _concept_attention(after, image, concepts, temperature, device) if after is not None else None}
    grid = int(round(len(maps["before"]["attention"][0]) ** 0.5))

    width, height = C2LIP_WIDTH, C2LIP_TOP + C2LIP_ROW * len(concepts) + C2LIP_BOTTOM
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title, font, small = _font(18), _font(14), _font(12)
    draw.text((20, 12), "C2LIP: where each concept of the caption looks (parameter-free concept -> patch attention)",
              fill=INK, font=title)
    draw.text((20, 40), f"caption: {caption}", fill=GREEN, font=font)
    draw.text((20, 62), f"{before.label}      {after.label if after is not None else NO_AFTER}", fill=GREY, font=small)
    x_scene, x_before, x_after, x_text = 20, 40 + C2LIP_CELL, 60 + 2 * C2LIP_CELL, 80 + 3 * C2LIP_CELL
    draw.text((x_scene, 100), "scene (the named object outlined)", fill=GREY, font=small)
    draw.text((x_before, 100), "before: attention of the concept", fill=GREY, font=small)
    draw.text((x_after, 100), "after: attention of the concept", fill=GREY, font=small)
    for i in range(200):   # colour bar of the heat maps
        draw.line([(x_text + i, 82), (x_text + i, 96)], fill=_heat_colour(i / 199))
    draw.text((x_text, 100), "low  ->  high attention weight (each map: its own min..max)", fill=GREY, font=small)
    big = data.render_scene(world.scenes[index], C2LIP_CELL)
    scale = C2LIP_CELL / image_size
    for k, concept in enumerate(concepts):
        y = C2LIP_TOP + C2LIP_ROW * k
        box = _concept_box(world.scenes[index], concept, image_size)
        outline = None if box is None else [v * scale for v in box]
        canvas.paste(big, (x_scene, y))
        drawn = [x_scene]
        for when, x in (("before", x_before), ("after", x_after)):
            if maps[when] is None:
                _empty_column(draw, (x, y, x + C2LIP_CELL, y + C2LIP_CELL), small)
            else:
                canvas.paste(_heat_map(big, maps[when]["attention"][k], grid), (x, y))
                drawn.append(x)
        for x in drawn if outline is not None else []:
            draw.rectangle([x + outline[0], y + outline[1], x + outline[2], y + outline[3]], outline=(255, 255, 255),
                           width=2)
        draw.text((x_text, y + 10), f"concept {k + 1}: \"{concept}\"", fill=INK, font=font)
        line = y + 40
        for when in ("before", "after"):
            if maps[when] is None:
                draw.text((x_text, line), NO_AFTER, fill=GREY, font=small)
                continue
            weights = maps[when]["attention"][k]
            draw.text((x_text, line), f"{when}: XAC cosine {maps[when]['xac'][k]:.3f}, global cosine "
                                      f"{maps[when]['global'][k]:.3f}", fill=INK, font=small)
            uniform = f"uniform: 1/{len(weights)} = {1 / len(weights):.4f}"
            draw.text((x_text, line + 18), f"    weights {min(weights):.4f} .. {max(weights):.4f} ({uniform})",
                      fill=GREY, font=small)
            line += 44
    _paragraph(draw, (20, height - C2LIP_BOTTOM + 15),
               f"Held-out test scene {index} (shapes suite's test split, never trained on). Each heat map is "
               f"softmax_j(<c_k, u_j> / tau), tau = {temperature:g}, over the {grid * grid} patch embeddings u_j "
               f"(c2lip.xac_attention; {grid}x{grid} patches), for the concept c_k of its row; 'XAC cosine' is the "
               f"cosine of the attention-pooled image vector with the concept (L_xac's score), 'global cosine' that "
               f"of the whole image (L_npc's score). "
               + ("" if after is not None else "Before column only: no --after model was given."),
               font, width - 40, max_lines=4)
    _save(canvas, path)
    return {"index": index, "caption": caption, "concepts": concepts, "temperature": temperature, "grid": grid,
            "before": maps["before"], "after": maps["after"], "size": canvas.size}


# --- goal: LISM matching and the TSL region -------------------------------------------------------------------

GOAL_SIZE = (1180, 660)
GOAL_CELL = 256
GOAL_MAX_SENTENCES = 7     # 4 objects: 4 object sentences + 3 relation sentences (data.long_caption)


def _lism_for_scene(column, index, long_tokenizer, device=None):
    """GOAL's LISM decision on one held-out long-caption scene under a FigureModel, with goal.py's own pieces:
    candidates = [full image] + goal._lism_crops (object boxes passing goal.keep_by_area), sentences from
    data.sentence_spans under the training context, scores = 100 x cosine as goal.run_lism computes them, the kept
    pair from goal.lism_best_pair, and the patches TSL pools for its box (goal.box_patch_mask)."""
    device = evaluation.pick_device(device)
    image_size = evaluation._transform_size(column.transform)
    world = data.ShapesDataset("test", size=evaluation.SHAPES_SUITE_SCENES, image_size=image_size, seed=evaluation.SHAPES_SUITE_SEED,
                               transform=column.transform, long=True)
    sample = world[index]
    sentences = [s for s, _, _ in data.sentence_spans(sample["caption"], long_tokenizer)]
    boxes, crops = goal._lism_crops(world, index, sample)
    with evaluation.inference_context(device):
        image_emb = F.normalize(column.model.encode_image(torch.stack([sample["image"]] + crops).to(device)), dim=-1)
        text_emb = F.normalize(column.model.encode_text(column.tokenizer(sentences).to(device)), dim=-1)
        scores = (100.0 * image_emb @ text_emb.t()).float().cpu()     # (1 + crops, sentences)
    best = goal.lism_best_pair(scores)
    patch = column.model.visual.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    mask = None
    if best is not None:
        mask = goal.box_patch_mask(torch.tensor([boxes[best[0]]]), image_size, patch)[0].tolist()
    return {"scene": world.scenes[index], "truth": world.long_sentences[index], "sentences": sentences,
            "boxes": boxes, "scores": scores.tolist(), "choice": scores.max(dim=0).indices.tolist(), "kept": best,
            "patch_mask": mask, "grid": image_size // patch, "image_size": image_size}


def goal_figure(before, after, path, scene=None, device=None):
    """GOAL's local image-sentence matching (LISM) on one held-out long-caption scene, and the region TSL trains.

    What it shows: each sentence of the long caption (data.long_caption: one per object, one per relation of
    consecutive objects) is scored against the full image and every candidate crop (the object boxes, standing in
    for SAM segments); it picks its best candidate (its coloured box; a sentence that picks the full image is
    dropped), and LISM keeps the single best-scoring (crop, sentence) pair (thick box). TSL then asks the full
    image's patch tokens inside that box (yellow cells, goal.box_patch_mask on the model's patch grid), averaged,
    to embed like the crop. GOAL makes the matching once with the starting model; the after column shows what the
    fine-tuned model would pick. The table says, for each object sentence, whether it picked its own object.

    before, after: FigureModel (after may be None). scene: index of the held-out test scene; default: the first
    with three objects. The picture is GOAL_SIZE. Returns a dict of what is drawn (per model: scores, each
    sentence's choice, the kept pair and the TSL patch mask)."""
    world = data.ShapesDataset("test", size=evaluation.SHAPES_SUITE_SCENES, seed=evaluation.SHAPES_SUITE_SEED)
    index = scene if scene is not None else next(i for i, s in enumerate(world.scenes) if len(s) == 3)
    config = _run_config(after.run_dir if after else None)   # a goal run says its model and stretched context
    model_name = config.get("model") or common.TINY_MODEL
    context = int(config.get("context_length") or goal.SHAPES_GOAL_DEFAULTS["context_length"])
    long_tokenizer = common.tokenizer_for(model_name, context_length=context)
    lism = {"before": _lism_for_scene(before, index, long_tokenizer, device),
            "after": _lism_for_scene(after, index, long_tokenizer, device) if after is not None else None}
    first = lism["before"]
    sentences, scene_objects, image_size = first["sentences"], first["scene"], first["image_size"]
    truth = dict(first["truth"])

    def object_of(box):   # the scene object whose box a candidate crop is
        return next((o for o in scene_objects if o.box(image_size) == box), None)

    canvas = Image.new("RGB", GOAL_SIZE, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title, font, small, tiny = _font(18), _font(14), _font(12), _font(11)
    draw.text((20, 12), "GOAL: which crop each sentence of a long caption picks (LISM), and the patches TSL pools",
              fill=INK, font=title)
    draw.text((20, 36), f"{before.label}      {after.label if after is not None else NO_AFTER}", fill=GREY, font=small)
    scale = GOAL_CELL / image_size
    big = data.render_scene(scene_objects, GOAL_CELL).convert("RGBA")
    for when, x in (("before", 20), ("after", 40 + GOAL_CELL)):
        y = 80
        draw.text((x, 60), when, fill=GREY, font=font)
        result = lism[when]
        if result is None:
            _empty_column(draw, (x, y, x + GOAL_CELL, y + GOAL_CELL), small)
            continue
        layer = Image.new("RGBA", big.size, (0, 0, 0, 0))
        shade = ImageDraw.Draw(layer)
        cell = GOAL_CELL / result["grid"]
        if result["patch_mask"] is not None:
            for p, inside in enumerate(result["patch_mask"]):
                if inside:
                    r, c = divmod(p, result["grid"])
                    shade.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1],
                                    fill=(255, 230, 0, 90), outline=(255, 230, 0, 200))
        canvas.paste(Image.alpha_composite(big, layer).convert("RGB"), (x, y))
        kept_sentence = result["kept"][1] if result["kept"] is not None else None
        # sentences that pick the same crop: the kept one outermost, the others inset 6 px each, tags side by side
        order = sorted((j for j, c in enumerate(result["choice"]) if c > 0), key=lambda j: (j != kept_sentence, j))
        slot = defaultdict(int)
        for j in order:
            candidate = result["choice"][j]
            box = [v * scale for v in result["boxes"][candidate - 1]]
            k = slot[candidate]
            slot[candidate] += 1
            inset, colour = 6 * k, SERIES_COLOURS[j % len(SERIES_COLOURS)]
            draw.rectangle([x + box[0] + inset, y + box[1] + inset, x + box[2] - inset, y + box[3] - inset],
                           outline=colour, width=5 if j == kept_sentence else 2)
            tag = (x + box[0] + 2 + 17 * k, y + box[1] + 2)
            draw.rectangle([tag[0], tag[1], tag[0] + 14, tag[1] + 14], fill=colour)
            draw.text((tag[0] + 4, tag[1] + 1), str(j + 1), fill=(255, 255, 255), font=tiny)
    x_legend = 60 + 2 * GOAL_CELL
    _paragraph(draw, (x_legend, 84), "Thin box: the crop a sentence picks (number and colour = the sentence's). "
               "Thick box: the pair LISM keeps (the best-scoring crop-sentence pair). Yellow cells: the patches whose "
               "tokens TSL averages for that box. A sentence whose best candidate is the full image is dropped (no "
               "box).", font, GOAL_SIZE[0] - x_legend - 20, max_lines=8, line_height=20)
    top = 80 + GOAL_CELL + 24
    draw.text((20, top), "#  sentence of the long caption", fill=GREY, font=font)
    draw.text((620, top), "before: picks (100 x cosine)", fill=GREY, font=font)
    draw.text((900, top), "after: picks" if after is not None else "after: -", fill=GREY, font=font)
    rows = []
    for j, sentence in enumerate(sentences[:GOAL_MAX_SENTENCES]):
        y = top + 26 + 26 * j
        colour = SERIES_COLOURS[j % len(SERIES_COLOURS)]
        draw.rectangle([20, y + 2, 32, y + 14], fill=colour)
        draw.text((40, y), _fit(draw, f"{j + 1}. {sentence}", font, 570), fill=INK, font=font)
        own = object_of(truth.get(sentence))   # None for a relation sentence (its box spans two objects)
        row = {"sentence": sentence}
        for when, x in (("before", 620), ("after", 900)):
            result = lism[when]
            if result is None:
                continue
            candidate = result["choice"][j]
            score = result["scores"][candidate][j]
            if candidate == 0:
                text, fill = f"full image ({score:.1f}): dropped", GREY
            else:
                obj = object_of(result["boxes"][candidate - 1])
                text = f"the {obj.color} {obj.shape} ({score:.1f})" if obj else f"crop {candidate} ({score:.1f})"
                fill = INK if own is None else (GREEN if obj == own else RED)
            if result["kept"] is not None and result["kept"][1] == j:
                text += "  KEPT"
            draw.text((x, y), _fit(draw, text, font, 270), fill=fill, font=font)
            row[when] = candidate
        rows.append(row)
    y = top + 26 + 26 * GOAL_MAX_SENTENCES + 8
    _paragraph(draw, (20, y), f"Held-out test scene {index} (shapes suite's test split, never trained on), its long "
               f"caption cut into sentences (data.sentence_spans, {context}-token context). Candidates: the full image "
               f"and the {len(first['boxes'])} object crops; scores as goal.run_lism computes them, the kept pair from "
               f"goal.lism_best_pair, the TSL cells from goal.box_patch_mask on the {first['grid']}x{first['grid']} "
               f"patch grid. Green: an object sentence picked its own object; red: another one. "
               + ("" if after is not None else "Before column only: no --after model was given."),
               font, GOAL_SIZE[0] - 40, max_lines=4)
    _save(canvas, path)
    summary = {when: None if r is None else {"choice": r["choice"], "kept": r["kept"], "patch_mask": r["patch_mask"],
                                              "scores": r["scores"], "boxes": r["boxes"]} for when, r in lism.items()}
    return {"index": index, "sentences": sentences, "rows": rows, "grid": first["grid"], **summary,
            "size": canvas.size}


# --- the command ----------------------------------------------------------------------------------------------

def figure_main(argv):
    p = argparse.ArgumentParser(
        prog="python -m lab.figures", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="One picture per mechanism, each of one held-out shapes scene (PIL only).\n"
                    "  --kind failure    one compositionality failure of --model/--pretrained: a scene, its\n"
                    "                    caption, the swapped negative and both scores (default; docs/failure.png)\n"
                    "  --kind negatives  DeGLA's or CE-CLIP's hard negatives of a caption, scored before and\n"
                    "                    after; with a cehn run's log.jsonl also CE-CLIP's per-type thresholds\n"
                    "                    over training\n"
                    "  --kind c2lip      C2LIP: each concept's parameter-free attention over the patches, as\n"
                    "                    heat maps\n"
                    "  --kind goal       GOAL: the crop each sentence of a long caption picks (LISM), the kept\n"
                    "                    pair and the patches TSL pools for it\n"
                    "The last three draw --before (default: the shipped base) and --after (a finished run)\n"
                    "side by side; without --after only the before column is drawn.",
        epilog="examples:\n"
               "  python -m lab.figures\n"
               "  python -m lab.figures --kind negatives --method cehn --after runs/cehn-shapes-...\n"
               "  python -m lab.figures --kind c2lip --after runs/c2lip-shapes-...\n"
               "  python -m lab.figures --kind goal --after runs/goal-shapes-...")
    p.add_argument("--kind", default="failure", choices=FIGURE_KINDS, help="which picture (default: failure)")
    p.add_argument("--model", default="shapes-tiny-vit", help="open_clip model name of --pretrained / --before / "
                   "--after when they are tags or weights files (a run folder brings its own)")
    p.add_argument("--pretrained", default="shapes", help="failure: the model's weights (tag or file)")
    p.add_argument("--subset", default="swap_att", help="failure: the shapes-suite subset to take the item from")
    p.add_argument("--before", default="shapes", help="negatives/c2lip/goal: the model before fine-tuning: a tag, "
                   "a weights file or a finished run folder (default: shapes, the shipped base)")
    p.add_argument("--after", default=None, help="negatives/c2lip/goal: the fine-tuned model: a finished run folder "
                   "(its exported model, config.json and log.jsonl) or a weights file (a run's final.pt)")
    p.add_argument("--method", default=None, choices=sorted(METHOD_TITLES),
                   help="negatives: whose negative types to show (default: the --after run's method if it is degla "
                        "or cehn, else cehn with --log, else degla)")
    p.add_argument("--log", default=None, help="negatives: a cehn run's log.jsonl, for CE-CLIP's thresholds over "
                   "training (default: the --after run folder's log.jsonl, if it logs them)")
    p.add_argument("--scene", type=int, default=None, help="negatives/c2lip/goal: index of the held-out test scene "
                   "(default: each kind's rule, written in the picture)")
    p.add_argument("--out", default=None, help="output PNG (default: docs/failure.png, docs/figure_<kind>.png)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    args = p.parse_args(argv)
    out = args.out or ("docs/failure.png" if args.kind == "failure" else f"docs/figure_{args.kind}.png")
    if args.scene is not None and not 0 <= args.scene < evaluation.SHAPES_SUITE_SCENES:
        p.error(f"--scene {args.scene}: the shapes suite's test split has scenes 0..{evaluation.SHAPES_SUITE_SCENES - 1}")
    try:
        if args.kind == "failure":
            model, transform, tokenizer = evaluation.create_backbone(args.model, args.pretrained, evaluation.pick_device(args.device))
            info = failure_figure(model, tokenizer, transform, out, device=args.device, subset=args.subset)
        else:
            before = load_figure_model(args.before, args.model, "before", args.device)
            after = load_figure_model(args.after, args.model, "after", args.device) if args.after else None
            if args.kind == "negatives":
                method = args.method or _run_config(after.run_dir if after else None).get("method")
                if method not in METHOD_TITLES:
                    method = "cehn" if args.log else "degla"
                info = negatives_figure(before, after, out, method, args.log, args.scene, args.device)
            elif args.kind == "c2lip":
                info = c2lip_figure(before, after, out, args.scene, args.device)
            else:
                info = goal_figure(before, after, out, args.scene, args.device)
    except Exception as error:   # bad input (common.InputError, BenchmarkDataError): one message, exit code 2
        if not getattr(error, "user_error", False):
            raise
        print(f"lab.figures: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    shown = info if args.kind == "failure" else {k: v for k, v in info.items() if k in (
        "method", "index", "caption", "rows", "invalid", "log", "concepts", "sentences", "size")}
    print(f"wrote {out}: {json.dumps(shown)}")
    return info




if __name__ == "__main__":
    figure_main(sys.argv[1:])
