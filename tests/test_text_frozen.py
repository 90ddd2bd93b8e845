"""Frozen output of the text tools: hard negatives (both type sets) and concepts, byte for byte.

The rules of `data.make_negatives` and `data.extract_concepts` are deterministic, so any speed-up of the
parsing or of the rules must reproduce their earlier output exactly. `text_tools_frozen.json` holds a few
hundred captions (shapes-world captions, with the shapes vocabulary as `WithNegatives` passes it, and
COCO-style sentences with verbs, relations, plurals, counts and adjectives, built by `coco_like_captions`)
together with what the code produced for them when the fixture was written. The test compares with `==`, no
tolerance.

Regenerate the fixture only when the rules change on purpose (and bump `data.NEGATIVES_VERSION`):

    python tests/test_text_frozen.py --write
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "text_tools_frozen.json")

# Hand-written captions for the corners the templates do not reach: capitals, punctuation, pronouns,
# "there is", possessives, numbers, hyphens, verbs without objects, captions with nothing to change.
HAND_WRITTEN = [
    "A man riding a horse on a dirt road.",
    "Two dogs are playing with a red frisbee in the park.",
    "There is a small cat sleeping on top of a wooden table.",
    "A woman holding an umbrella while walking down a busy street.",
    "The kitchen has white cabinets and a stainless steel refrigerator.",
    "An elderly man sits on a bench next to a young boy.",
    "A plate of food with broccoli, carrots and a piece of bread.",
    "Close up view of a pizza with lots of cheese.",
    "It is a sunny day at the beach.",
    "I think this is a picture of a giraffe.",
    "A giraffe standing next to a tall tree in a field.",
    "Three people skiing down a snowy hill.",
    "A black and white photo of a bus parked on the side of the road.",
    "A large brown bear walking through the forest.",
    "A little girl eating a piece of chocolate cake.",
    "Several boats floating in the water near a bridge.",
    "A man in a blue shirt throws a ball to his dog.",
    "The cat is on the left and the dog is on the right.",
    "A red car parked behind a yellow truck.",
    "A bowl of soup next to a glass of water on a table.",
    "Sunset.",
    "A person.",
    "A photo.",
    "Two zebras grazing in a grassy field under a blue sky.",
    "A young man is surfing a big wave.",
    "A woman's hand holding a cell phone.",
    "A clock tower above an old stone building.",
    "The empty bathroom has a clean white sink and a dirty mirror.",
    "A group of men playing frisbee on the grass.",
    "A cow and a horse standing inside a wooden fence.",
    "A boy kicked the ball over the fence.",
    "A dog chased a cat under the bed.",
    "Someone is cutting a cake with a knife.",
    "A kitten sleeping inside an open suitcase.",
    "A tall giraffe and a short zebra are standing below a tree.",
    "Bikes lined up outside a brick building.",
    "A close-up of a hot dog with mustard.",
    "A man and a woman pose for a picture in front of a lake.",
    "Four small birds sitting on a metal wire.",
    "a plastic bottle lying on the floor of an office",
    "  A cat   on a mat.  ",
    "A BLUE CAR NEXT TO A RED BUS.",
    "A man who is holding a kite stands on the beach.",
    "The couch is brown, the chair is green and the table is round.",
    "An old woman feeds pigeons in the park.",
    "Children watching a train at the station.",
    "A skateboarder jumps over a set of stairs.",
    "A vase full of flowers sitting on a window sill.",
    "A horse pulling a cart down the street.",
    "A double-decker bus driving past a tall building.",
]

# Template parts for COCO-style captions.
_ADJECTIVES = ["red", "blue", "green", "yellow", "black", "white", "brown", "small", "large", "big", "little",
               "tall", "old", "young", "wooden", "metal", "plastic", "empty", "wet", "striped", "round", "dirty"]
_SUBJECTS = ["man", "woman", "boy", "girl", "dog", "cat", "horse", "cow", "elephant", "giraffe", "bear", "bird",
             "person", "child", "player", "guy", "lady", "puppy", "sheep", "zebra"]
_OBJECTS = ["ball", "frisbee", "kite", "umbrella", "bag", "pizza", "sandwich", "cake", "bottle", "cup", "phone",
            "laptop", "skateboard", "surfboard", "book", "banana", "apple", "hat", "bike", "car", "plate", "knife"]
_PLACES = ["table", "bench", "bed", "couch", "chair", "street", "field", "beach", "kitchen", "park", "road",
           "fence", "wall", "window", "building", "tree", "river", "lake", "grass", "desk"]
_TRANSITIVE = [("holding", "holds", "held"), ("carrying", "carries", "carried"), ("eating", "eats", "ate"),
               ("riding", "rides", "rode"), ("throwing", "throws", "threw"), ("watching", "watches", "watched"),
               ("kicking", "kicks", "kicked"), ("feeding", "feeds", "fed"), ("pulling", "pulls", "pulled"),
               ("reading", "reads", "read"), ("chasing", "chases", "chased"), ("flying", "flies", "flew")]
_INTRANSITIVE = [("sitting", "sits", "sat"), ("standing", "stands", "stood"), ("lying", "lies", "lay"),
                 ("walking", "walks", "walked"), ("running", "runs", "ran"), ("jumping", "jumps", "jumped"),
                 ("sleeping", "sleeps", "slept"), ("waiting", "waits", "waited"), ("smiling", "smiles", "smiled")]
_RELATIONS = ["on", "next to", "behind", "in front of", "under", "above", "near", "beside", "on top of",
              "to the left of", "to the right of", "inside", "below", "at", "by", "in"]
_COUNTS = ["two", "three", "four", "several", "many", "some"]


def _noun_phrase(rng, nouns, plural_ok=True):
    noun = rng.choice(nouns)
    adjectives = rng.sample(_ADJECTIVES, rng.choice([0, 0, 1, 1, 2]))
    if plural_ok and rng.random() < 0.25:
        count = rng.choice(_COUNTS)
        plural = data._OBJECT_SURFACE.get(data._OBJECT_INFO.get(noun, ("", -1, False))[:2] + (True,))
        word = plural[data._OBJECT_SURFACE[data._OBJECT_INFO[noun]].index(noun)] if plural else data._plural(noun)
        return " ".join([count] + adjectives + [word]), True
    phrase = " ".join(adjectives + [noun])
    article = rng.choice(["the", data._article_for(phrase)]) if rng.random() < 0.3 else data._article_for(phrase)
    return f"{article} {phrase}", False


def coco_like_captions(n, seed=0):
    """`n` COCO-style captions from templates: subject (adjectives, plurals, counts), a verb in -ing, present or
    past form with or without an object, spatial relations and places; some capitalized, some with a period."""
    rng = random.Random(seed)
    captions = []
    for _ in range(n):
        subject, plural = _noun_phrase(rng, _SUBJECTS)
        place, _ = _noun_phrase(rng, _PLACES, plural_ok=False)
        relation = rng.choice(_RELATIONS)
        form = rng.randrange(3)
        if rng.random() < 0.6:
            verb = rng.choice(_TRANSITIVE)
            thing, _ = _noun_phrase(rng, _OBJECTS)
            predicate = f"{verb[form]} {thing}"
        else:
            predicate = rng.choice(_INTRANSITIVE)[form]
        if form == 1 and plural:
            predicate = predicate.split(" ", 1)
            predicate[0] = {"carries": "carry", "flies": "fly", "lies": "lie", "watches": "watch"}.get(
                predicate[0], predicate[0][:-1])
            predicate = " ".join(predicate)
        template = rng.randrange(4)
        if template == 0:
            text = f"{subject} {predicate} {relation} {place}"
        elif template == 1:
            text = f"{subject} {'are' if plural else 'is'} {predicate.split(' ', 1)[0] if form == 0 else 'there'} " \
                   f"{relation} {place}"
        elif template == 2:
            text = f"there {'are' if plural else 'is'} {subject} {relation} {place}"
        else:
            other, _ = _noun_phrase(rng, _OBJECTS)
            text = f"{subject} {relation} {place} and {other} {rng.choice(_RELATIONS)} it"
        if rng.random() < 0.6:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.5:
            text += "."
        captions.append(text)
    return captions


def frozen_inputs():
    """The captions of the fixture: (shapes captions, open-world captions). Duplicates are kept on purpose."""
    shapes = data.ShapesDataset("train", size=160, seed=7).captions
    coco = HAND_WRITTEN + coco_like_captions(260, seed=18)
    return shapes, coco + coco[:10]


def _compact(negatives, valid):
    """Negatives as stored: the text where the slot is valid, None where it is not (then it is the caption)."""
    return [[n if ok else None for n, ok in zip(row, flags)] for row, flags in zip(negatives, valid)]


def compute(cache_dir, shapes=None, coco=None):
    """Everything the fixture freezes, computed by the current code (on the given captions, else on new ones)."""
    if shapes is None:
        shapes, coco = frozen_inputs()
    out = {"shapes_captions": shapes, "coco_captions": coco}
    for group, captions, vocabulary in (("shapes", shapes, data.ShapesDataset.vocabulary), ("coco", coco, None)):
        for name, types in (("degla", data.DEGLA_TYPES), ("cehn", data.CEHN_TYPES)):
            negatives, valid = data.make_negatives(captions, types, cache_dir=cache_dir, progress=False,
                                                   vocabulary=vocabulary)
            out[f"{group}_{name}"] = _compact(negatives, valid)
        out[f"{group}_concepts"] = data.extract_concepts(captions, cache_dir=cache_dir, progress=False)
    return out


def test_text_tools_reproduce_the_frozen_output(tmp_path):
    with open(FIXTURE, encoding="utf-8") as file:
        expected = json.load(file)
    # the stored captions are the input: the shapes world's captions may change, the text tools' output may not
    got = compute(str(tmp_path), expected["shapes_captions"], expected["coco_captions"])
    for key in expected:
        assert got[key] == expected[key], key


if __name__ == "__main__":
    import tempfile
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    stored = {}
    if os.path.exists(FIXTURE):   # keep the stored captions: the rules' output changes, the input does not
        with open(FIXTURE, encoding="utf-8") as file:
            stored = json.load(file)
    with tempfile.TemporaryDirectory() as tmp:
        frozen = compute(tmp, stored.get("shapes_captions"), stored.get("coco_captions"))
    with open(FIXTURE, "w", encoding="utf-8") as file:
        json.dump(frozen, file, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {FIXTURE} ({os.path.getsize(FIXTURE) // 1024} KB)")
