"""What a base model's image tower knows about where things are (a diagnostic script, not a test).

    python -m lab.probe_layout                       # the shipped CLIP base
    python -m lab.probe_layout runs/<run>/final.pt   # any shapes-tiny-vit weights

Linear probes (logistic regression) on frozen, normalized image embeddings of 2-object validation scenes with two
different colours and two different shapes (80% to fit, 20% to score). A tower that knows which colours and
shapes are present but not where they are scores 50% on "the colour of the left object": it can only guess which
of the two present colours it is. The same for the shape, and for the two colour-shape binding probes. Then the
text side: how close the text tower puts a suite caption and its order- or binding-swapped negative. The shipped
base reads about 49 / 43 / 60 / 71 and cosines of 0.99+; see docs/testbed.md (variants v2d-v2h).
"""
import argparse

import torch

import common
import data
import eval as evaluation


def fit_probe(features, labels, classes, train, steps=500):
    """Accuracy (%) on the held-out part of a linear softmax probe fitted with Adam on the `train` part."""
    weight = torch.zeros(features.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    x, y = features[:train], labels[:train]
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight * 10 + bias, y) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predicted = (features[train:] @ weight * 10 + bias).argmax(-1)
    return 100.0 * (predicted == labels[train:]).float().mean().item()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.probe_layout", description=__doc__.splitlines()[0])
    p.add_argument("weights", nargs="?", default="shapes", help="shapes-tiny-vit weights: 'shapes' (the shipped base) "
                   "or a run's final.pt")
    weights = p.parse_args(argv).weights
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _, transform, tokenizer = common.create_backbone(common.TINY_MODEL, weights)
    model.eval()
    world = data.ShapesDataset("val", size=6000, seed=7)
    picked = [i for i, s in enumerate(world.scenes)
              if len(s) == 2 and s[0].color != s[1].color and s[0].shape != s[1].shape]
    with torch.no_grad():
        images = torch.stack([transform(world.image(i)) for i in picked])
        features = torch.cat([model.encode_image(images[k:k + 256]) for k in range(0, len(images), 256)])
    features = torch.nn.functional.normalize(features, dim=-1)
    colour, shape = {c: k for k, c in enumerate(data.COLORS)}, {s: k for k, s in enumerate(data.SHAPES)}
    left = [min(world.scenes[i], key=lambda o: o.cx) for i in picked]
    first_shape = [min(world.scenes[i], key=lambda o: o.shape) for i in picked]
    probes = {
        "colour of the left object": ([colour[o.color] for o in left], len(colour)),
        "shape of the left object": ([shape[o.shape] for o in left], len(shape)),
        "colour of the object whose shape comes first alphabetically (binding)":
            ([colour[o.color] for o in first_shape], len(colour)),
    }
    train = int(0.8 * len(picked))
    print(f"{weights}: {len(picked)} two-object scenes; chance for a tower that ignores place and binding: 50%")
    for name, (labels, classes) in probes.items():
        print(f"  {name}: {fit_probe(features, torch.tensor(labels), classes, train):.1f}%")
    scenes = [world.scenes[i] for i in picked]
    print(f"  colour-shape pairs (binding; the true pairs outscore the swapped ones): "
          f"{pair_probe(features, scenes, train):.1f}%")
    print("text tower, mean cosine of a suite caption and its negative (1.000: the negative is invisible):")
    for subset, cosine in caption_negative_cosines(model, tokenizer).items():
        print(f"  {subset}: {cosine:.4f}")


def pair_probe(features, scenes, train, steps=800):
    """Binding probe: a linear multi-label head over the 64 (colour, shape) pairs, fitted with binary
    cross-entropy on the `train` part. On each held-out scene (a, b) it is right when the two true pairs
    (a.colour, a.shape) + (b.colour, b.shape) outscore the two swapped ones (a.colour, b.shape) + (b.colour,
    a.shape): 50% for a tower that knows the colours and shapes present but not which goes with which."""
    n_shapes = len(data.SHAPES)

    def pair(colour, shape):
        return data.COLORS.index(colour) * n_shapes + data.SHAPES.index(shape)

    targets = torch.zeros(len(scenes), len(data.COLORS) * n_shapes)
    true_and_swapped = []
    for row, (a, b) in enumerate(scenes):
        targets[row, pair(a.color, a.shape)] = targets[row, pair(b.color, b.shape)] = 1
        true_and_swapped.append((pair(a.color, a.shape), pair(b.color, b.shape),
                                 pair(a.color, b.shape), pair(b.color, a.shape)))
    weight = torch.zeros(features.shape[1], targets.shape[1], requires_grad=True)
    bias = torch.zeros(targets.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        logits = features[:train] @ weight * 10 + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[:train]) + 1e-4 * weight.pow(2).sum()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        scores = features @ weight * 10 + bias
    right = [float(scores[r, t1] + scores[r, t2] > scores[r, s1] + scores[r, s2])
             for r, (t1, t2, s1, s2) in enumerate(true_and_swapped)][train:]
    return 100.0 * sum(right) / len(right)


def caption_negative_cosines(model, tokenizer, n_scenes=400):
    """Mean cosine between the text embeddings of each shapes-suite item's caption and its negative."""
    _, items = evaluation.shapes_suite_items(n_scenes=n_scenes)
    cosines = {}
    for subset in ("aro_relation", "aro_attribute", "swap_att", "swap_obj"):
        with torch.no_grad():
            positive = torch.nn.functional.normalize(model.encode_text(tokenizer([p for _, p, _ in items[subset]])), dim=-1)
            negative = torch.nn.functional.normalize(model.encode_text(tokenizer([n for _, _, n in items[subset]])), dim=-1)
        cosines[subset] = (positive * negative).sum(-1).mean().item()
    return cosines


if __name__ == "__main__":
    main()
