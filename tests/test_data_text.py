"""Text tools of data.py: hard negatives, concepts, sentence spans, and their disk cache."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

import open_clip

# caption -> {type: expected negative (None = must be invalid)}
EXPECTED = {
    "A small red circle to the left of a large blue square.": {
        "reshuffle": "A large blue square to the left of a small red circle.",
        "swap_nouns": "A small red square to the left of a large blue circle.",
        "swap_adjs": "A small blue circle to the left of a large red square.",
        "relation": "A small red square to the left of a large blue circle.",
        "action": None,   # no verb: invalid, as in CE-CLIP's released data
        "spatial": "A small red circle to the right of a large blue square.",
    },
    "The car is red and the bus is blue.": {
        "swap_adjs": "The car is blue and the bus is red.",
        "action": None, "spatial": None,  # no verb, no spatial relation
    },
    "Two dogs are playing with a ball.": {
        "swap_nouns": "Two balls are playing with a dog.",  # number follows the slot
        "swap_adjs": None,  # no adjectives at all
    },
    "A man riding a horse.": {
        "relation": "A horse riding a man.",
        "swap_adjs": None, "replace_adjs": None, "attribute": None,
    },
    "Sunset.": {t: None for t in data.NEGATIVE_TYPES},  # nothing to change
    "A person.": {t: None for t in data.NEGATIVE_TYPES},  # one noun, not in the lists
}
CAPTIONS = list(EXPECTED)


@pytest.fixture(scope="module")
def negatives(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return data.make_negatives(CAPTIONS, data.NEGATIVE_TYPES, cache_dir=str(cache), progress=False)


def test_negative_types_and_shapes(negatives):
    negs, valid = negatives
    assert len(negs) == len(valid) == len(CAPTIONS)
    assert all(len(row) == len(data.NEGATIVE_TYPES) for row in negs + valid)
    assert data.DEGLA_TYPES == ("reshuffle", "swap_nouns", "swap_adjs", "replace_adjs", "replace_nouns")
    assert data.CEHN_TYPES == ("relation", "attribute", "object", "action")


def test_expected_negatives_and_invalid_types(negatives):
    negs, valid = negatives
    for i, caption in enumerate(CAPTIONS):
        for negative_type, expected in EXPECTED[caption].items():
            k = data.NEGATIVE_TYPES.index(negative_type)
            if expected is None:
                assert not valid[i][k], (caption, negative_type, negs[i][k])
                assert negs[i][k] == caption  # the placeholder is the original, flagged invalid
            else:
                assert valid[i][k] and negs[i][k] == expected, (caption, negative_type, negs[i][k])


def _changed_words(negative, caption):
    new, old = negative.lower().strip(".").split(), caption.lower().strip(".").split()
    assert len(new) == len(old)
    return [a for a, b in zip(new, old) if a != b and b not in ("a", "an")]


def test_valid_negatives_differ_and_replacements_use_word_lists(negatives):
    negs, valid = negatives
    for caption, row, flags in zip(CAPTIONS, negs, valid):
        for negative, ok in zip(row, flags):
            if ok:
                assert data._normalize(negative) != data._normalize(caption)
    i = CAPTIONS.index("A small red circle to the left of a large blue square.")
    for negative_type in ("replace_adjs", "attribute"):
        negative = negs[i][data.NEGATIVE_TYPES.index(negative_type)]
        changed = _changed_words(negative, CAPTIONS[i])
        assert len(changed) == 1 and changed[0] in data._ATTRIBUTE_INFO
    for negative_type in ("replace_nouns", "object"):
        negative = negs[i][data.NEGATIVE_TYPES.index(negative_type)]
        changed = _changed_words(negative, CAPTIONS[i])
        assert len(changed) == 1 and data._OBJECT_INFO[changed[0]][0] == "shape"


def test_closed_vocabulary_keeps_replacements_inside_the_shapes_world(tmp_path):
    """Shapes captions get replacement negatives that name only the world's colours, shapes and sizes (an
    open-world list would also offer "magenta" or "crescent", words the shapes images never show)."""
    world = data.ShapesDataset("train", size=200, seed=3)
    types = ("replace_adjs", "replace_nouns", "attribute", "object")
    negs, valid = data.make_negatives(world.captions, types, cache_dir=str(tmp_path), progress=False,
                                      vocabulary=world.vocabulary)
    caption_words = {w for caption in world.captions for w in caption.split()}
    plurals = {data._plural(s) for s in data.SHAPES}
    n_valid = 0
    for caption, row, flags in zip(world.captions, negs, valid):
        for negative, ok in zip(row, flags):
            if ok:
                n_valid += 1
                changed = _changed_words(negative, caption)
                assert len(changed) == 1 and changed[0] in world.vocabulary | plurals, (caption, negative)
                assert set(negative.split()) <= caption_words | plurals, (caption, negative)
    assert n_valid > 0.9 * len(types) * len(world.captions)
    # the open-world lists do leave the shapes world on the same captions (what the vocabulary is for)
    open_negs, _ = data.make_negatives(world.captions, types, cache_dir=str(tmp_path), progress=False)
    assert any(w not in caption_words for row in open_negs for n in row for w in n.split())


def test_articles_and_verb_forms(tmp_path):
    captions = ["An orange cat sitting on a wooden bench.", "A woman holding an umbrella."]
    negs, valid = data.make_negatives(captions, ("action", "replace_adjs"), cache_dir=str(tmp_path), progress=False)
    assert valid == [[True, True], [True, False]]
    sitting, holding = negs[0][0].split()[3], negs[1][0].split()[2]
    assert sitting.endswith("ing") and sitting != "sitting"  # same form, another intransitive verb
    assert holding.endswith("ing") and holding != "holding"
    first_word, attribute = negs[0][1].split()[:2]
    if attribute != "orange":  # "An orange" -> "A red": the article follows the new word
        assert first_word == data._article_for(attribute).capitalize()


def test_deterministic_and_cached(tmp_path, monkeypatch):
    first = data.make_negatives(CAPTIONS, data.DEGLA_TYPES, cache_dir=str(tmp_path), progress=False)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].startswith("negatives_")

    def no_parsing(*args, **kwargs):
        raise AssertionError("the cache should have been used")
    monkeypatch.setattr(data, "_parse", no_parsing)
    assert data.make_negatives(CAPTIONS, data.DEGLA_TYPES, cache_dir=str(tmp_path), progress=False) == first
    monkeypatch.undo()
    other = data.make_negatives(CAPTIONS, data.DEGLA_TYPES, cache_dir=str(tmp_path / "fresh"), progress=False)
    assert other == first


def test_unknown_type():
    with pytest.raises(ValueError, match="unknown negative types"):
        data.make_negatives(["a dog"], ("nonsense",), progress=False)


def test_concepts(tmp_path):
    captions = ["A woman wearing a red dress stands next to a fireplace at the university.",
                "Stock photo of a dog on the street.", "A small red circle to the left of a blue square.",
                "Sunset.", "It is there."]
    concepts = data.extract_concepts(captions, cache_dir=str(tmp_path), progress=False)
    assert concepts[0] == ["A woman", "a red dress", "a fireplace"]  # "the university": generic location
    assert concepts[1] == ["a dog"]  # "Stock photo", "the street" dropped
    assert concepts[2] == ["A small red circle", "a blue square"]  # "the left" is a relation, not a concept
    assert concepts[3] == ["Sunset"]
    assert concepts[4] == ["It is there."]  # nothing left: the caption itself
    assert all(len(c) >= 1 and all(len(x) > 1 for x in c) for c in concepts)
    assert os.listdir(tmp_path)


def _squash(text):
    return "".join(text.lower().split())


def test_sentence_spans_decode_back():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = ("A small red circle is on the left. It measures 3.5 cm, says Mr. Smith! Is it blue?\n"
            "A large square sits below it")
    tokens = tokenizer([text])[0]
    spans = data.sentence_spans(text, tokenizer)
    assert [s for s, _, _ in spans] == ["A small red circle is on the left.", "It measures 3.5 cm, says Mr. Smith!",
                                        "Is it blue?", "A large square sits below it"]
    assert spans[0][1] == 1  # right after SOT: no off-by-one
    for sentence, start, end in spans:
        assert _squash(tokenizer.decode(tokens[start:end].tolist())) == _squash(sentence)
    assert spans[-1][2] == int(tokens.argmax())  # the last sentence ends right before EOT


def test_sentence_spans_truncation():
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # context 77
    text = " ".join(f"This is sentence number {i} with some words." for i in range(12))
    tokens = tokenizer([text])[0]
    spans = data.sentence_spans(text, tokenizer)
    assert len(spans) == 9  # sentences 9..11 were truncated away and are dropped
    assert spans[-1][2] == 76 and tokens[76] == tokenizer.eot_token_id
    for sentence, start, end in spans[:-1]:
        assert _squash(tokenizer.decode(tokens[start:end].tolist())) == _squash(sentence)
    assert _squash(sentence).startswith(_squash(tokenizer.decode(tokens[spans[-1][1]:76].tolist())))
