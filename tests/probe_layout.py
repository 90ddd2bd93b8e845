"""What a base model's image tower knows about where things are (a diagnostic script, not a test).

    python tests/probe_layout.py                       # the shipped CLIP base
    python tests/probe_layout.py runs/<run>/final.pt   # any shapes-tiny-vit weights

Linear probes (logistic regression) on frozen, normalized image embeddings of 2-object validation scenes with two
different colours and two different shapes (80% to fit, 20% to score). A tower that knows which colours and
shapes are present but not where they are scores 50% on "the colour of the left object": it can only guess which
of the two present colours it is. The same for the shape, and for the colour-shape binding probe. The shipped
base reads about 49 / 43 / 60; see docs/base_model_notes.md (variants v2d, v2e) for what changes it.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import data  # noqa: E402


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


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    weights = sys.argv[1] if len(sys.argv) > 1 else "shapes"
    model, _, transform, _ = common.create_backbone(common.TINY_MODEL, weights)
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


if __name__ == "__main__":
    main()
