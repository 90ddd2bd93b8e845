"""How many rule-made hard negatives of the shapes world are true of their scene (a diagnostic script, not a test).

    python -m lab.probe_false_negatives            # 2,000 training captions, DeGLA's and CE-CLIP's types
    python -m lab.probe_false_negatives 5000 reshuffle,swap_nouns

Each negative `data.make_negatives` writes for a training caption is read back into a `data.Description` (the
shapes world's grammar: objects "a/an/the [size] colour shape", an optional relation between the first two) and
checked against the caption's scene with `data.describes`, the ground truth the benchmark suite filters its own
negatives with. A negative that describes its scene is a false negative: training pushes the image away from a
true caption. Negatives outside the grammar ("a red red triangle", swapped words that are not a colour and a
shape) are counted as unparsed; they are false of every scene.

Measured on 2,000 training captions (seed 0; docs/results_degla.md): reshuffle 40.5% (every list caption, and
121 of 1,071 relation captions), swap_nouns 4.6%, swap_adjs 1.4%, CE-CLIP's relation 4.3%, the replacements and
CE-CLIP's action flip 0%.
"""
import argparse
import collections
import re

import data

OBJECT = r"(?:a|an|the) (?:(small|large) )?(\w+) (\w+)"
RELATION = "|".join(data.RELATIONS)


def parse_description(text):
    """The data.Description a shapes caption says, or None when the text is outside the world's grammar."""
    text = text.strip().rstrip(".").lower()
    for prefix in ("there is ", "a photo of "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    match = re.fullmatch(rf"{OBJECT}(?: is)? ({RELATION}) {OBJECT}((?: and {OBJECT})*)", text)
    if match:
        objects, relation, rest = [match.group(1, 2, 3), match.group(5, 6, 7)], match.group(4), match.group(8)
    else:
        match = re.fullmatch(rf"{OBJECT}((?: and {OBJECT})*)", text)
        if not match:
            return None
        objects, relation, rest = [match.group(1, 2, 3)], None, match.group(4)
    objects += re.findall(rf" and {OBJECT}", rest)
    if any(colour not in data.COLORS or shape not in data.SHAPES for _, colour, shape in objects):
        return None
    return data.Description(tuple((size or None, colour, shape) for size, colour, shape in objects), relation)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m lab.probe_false_negatives", description=__doc__.splitlines()[0])
    p.add_argument("size", nargs="?", type=int, default=2000, help="training captions to check")
    p.add_argument("types", nargs="?", default=",".join(list(data.DEGLA_TYPES[:4]) + list(data.CEHN_TYPES)),
                   help="comma-separated negative types")
    args = p.parse_args(argv)
    size, types = args.size, args.types.split(",")
    dataset = data.ShapesDataset("train", size=size, seed=0)
    negatives, valid = data.make_negatives(dataset.captions, types, cache_dir=None, progress=False,
                                           vocabulary=dataset.vocabulary)
    counts = collections.defaultdict(collections.Counter)
    for i, caption in enumerate(dataset.captions):
        kind = "relation" if parse_description(caption).relation else "list"
        for k, negative_type in enumerate(types):
            if not valid[i][k]:
                continue
            description = parse_description(negatives[i][k])
            if description is None:
                counts[negative_type]["unparsed"] += 1
                continue
            is_true = data.describes(dataset.scenes[i], description)
            counts[negative_type]["valid"] += 1
            counts[negative_type]["false"] += is_true
            counts[negative_type][f"valid {kind}"] += 1
            counts[negative_type][f"false {kind}"] += is_true
    print(f"{size} training captions (seed 0): false negatives per type, among the negatives inside the grammar")
    for negative_type in types:
        c = counts[negative_type]
        print(f"  {negative_type:13s} {c['false']:5d} of {c['valid']:5d} ({100 * c['false'] / max(c['valid'], 1):4.1f}%)"
              f"   relation captions {c['false relation']}/{c['valid relation']}, list or one-object captions "
              f"{c['false list']}/{c['valid list']}; unparsed {c['unparsed']}")


if __name__ == "__main__":
    main()
