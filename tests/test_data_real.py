"""Real loaders of data.py on tiny fixtures written in each official format, plus the clear errors."""
import functools
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

import open_clip
from torchvision import transforms  # noqa: E402

VAL_TRANSFORM = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.ToTensor()])


def _image(path, size=(48, 32), color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _coco(root, ids=(9, 25)):
    images = []
    for image_id in ids:
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _image(os.path.join(root, "train2014", name))
        images.append({"id": image_id, "file_name": name, "height": 32, "width": 48})
    annotations = [{"id": 100 + i, "image_id": image_id, "caption": f"A red car next to a blue bus number {i}."}
                   for i, image_id in enumerate(list(ids) * 2)]
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    with open(os.path.join(root, "annotations", "captions_train2014.json"), "w") as file:
        json.dump({"info": {}, "licenses": [], "images": images, "annotations": annotations}, file)
    return annotations


def test_coco_one_sample_per_caption_and_karpathy(tmp_path):
    annotations = _coco(tmp_path)
    dataset = data.CocoCaptions(str(tmp_path), VAL_TRANSFORM)
    assert len(dataset) == 4 and dataset.captions[0] == annotations[0]["caption"]
    sample = dataset[1]
    assert sample["image"].shape == (3, 32, 32) and sample["index"] == 1 and sample["image_id"] == 25
    with open(tmp_path / "dataset_coco.json", "w") as file:
        json.dump({"dataset": "coco", "images": [{"cocoid": 25, "split": "test"}, {"cocoid": 9, "split": "train"}]}, file)
    filtered = data.CocoCaptions(str(tmp_path), VAL_TRANSFORM, karpathy_file="dataset_coco.json")
    assert set(filtered.image_ids) == {9} and filtered.all_image_ids == {9, 25}


def test_coco_errors(tmp_path):
    with pytest.raises(data.DataError, match="captions_train2014.json"):
        data.CocoCaptions(str(tmp_path / "nowhere"))
    (tmp_path / "annotations").mkdir()
    with pytest.raises(data.DataError, match="Expected layout"):
        data.CocoCaptions(str(tmp_path))
    (tmp_path / "annotations" / "captions_train2014.json").write_text('{"not": "coco"}')
    with pytest.raises(data.DataError, match="not a COCO captions file"):
        data.CocoCaptions(str(tmp_path))
    _coco(tmp_path)
    os.remove(tmp_path / "train2014" / "COCO_train2014_000000000025.jpg")
    with pytest.raises(data.DataError, match="missing"):
        data.CocoCaptions(str(tmp_path))


def test_degla_negatives_file(tmp_path):
    annotations = _coco(tmp_path)
    records = [{"image_id": 9, "original": annotations[0]["caption"], "enhanced": ["neg a", "neg b", "neg c"]}]
    (tmp_path / "DeGLA.json").write_text(json.dumps(records))
    dataset = data.WithNegatives(data.CocoCaptions(str(tmp_path), VAL_TRANSFORM), data.DEGLA_TYPES[:4],
                                 negatives_file=str(tmp_path / "DeGLA.json"))
    assert dataset[0]["negatives"][:3] == ["neg a", "neg b", "neg c"]
    assert dataset[0]["neg_valid"] == [True, True, True, False]
    assert dataset[1]["neg_valid"] == [False] * 4  # no record for this caption
    assert data.degla_image_path(str(tmp_path), 9) == str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    (tmp_path / "absent.json").write_text(json.dumps(records + [dict(records[0], image_id=77)]))
    with pytest.raises(data.DataError, match="not in the COCO train2014 annotations"):
        data.WithNegatives(data.CocoCaptions(str(tmp_path)), data.DEGLA_TYPES, negatives_file=str(tmp_path / "absent.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"image_id": 9}))
    with pytest.raises(data.DataError, match="not a DeGLA negatives file"):
        data.WithNegatives(data.CocoCaptions(str(tmp_path)), data.DEGLA_TYPES, negatives_file=str(tmp_path / "bad.json"))


def test_generated_negatives_and_collate(tmp_path):
    _coco(tmp_path)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    dataset = data.WithNegatives(data.CocoCaptions(str(tmp_path), VAL_TRANSFORM), data.CEHN_TYPES,
                                 cache_dir=str(tmp_path / "cache"), progress=False)
    batch = functools.partial(data.collate_negatives, tokenizer=tokenizer)([dataset[0], dataset[1]])
    assert batch["images"].shape == (2, 3, 32, 32) and batch["texts"].shape == (2, 77)
    assert batch["neg_texts"].shape == (2, 4, 77) and batch["neg_valid"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1] and int(batch["replaced"]) == 0
    concepts = data.WithConcepts(data.CocoCaptions(str(tmp_path), VAL_TRANSFORM), cache_dir=str(tmp_path / "cache"),
                                 progress=False)
    batch = data.collate_concepts([concepts[0], concepts[1]], tokenizer=tokenizer)
    assert batch["concepts"].shape[0] == batch["concept_owner"].shape[0] >= 2
    assert batch["concept_owner"].tolist() == sorted(batch["concept_owner"].tolist())
    plain = data.collate_plain([dataset[0]], tokenizer=tokenizer)
    assert set(plain) == {"images", "texts", "index", "replaced"}


def test_unreadable_image_is_replaced_by_the_next_readable_sample(tmp_path):
    """A bad file must not change a batch's size (under DDP the ranks' batches are all-gathered)."""
    _coco(tmp_path)   # samples 0..3 are images 9, 25, 9, 25
    (tmp_path / "train2014" / "COCO_train2014_000000000025.jpg").write_bytes(b"not a jpeg")
    dataset = data.CocoCaptions(str(tmp_path), VAL_TRANSFORM)
    with pytest.warns(UserWarning, match="unreadable image .*025.jpg"):
        assert dataset[1] is None
    readable = data.ReplaceUnreadable(dataset)
    samples = [readable[i] for i in range(4)]
    assert [s["index"] for s in samples] == [0, 2, 2, 0]   # the next readable one, wrapping around at the end
    assert [s["caption"] for s in samples] == [dataset.captions[i] for i in (0, 2, 2, 0)]
    batch = data.collate_plain(samples, open_clip.get_tokenizer("ViT-B-32"))
    assert batch["images"].shape == (4, 3, 32, 32) and int(batch["replaced"]) == 2
    with pytest.raises(ValueError, match="ReplaceUnreadable"):
        data.collate_plain([dataset[1]], open_clip.get_tokenizer("ViT-B-32"))
    (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(b"not a jpeg either")
    with pytest.raises(data.DataError, match="all have unreadable images"):
        readable[0]


class _OneBadImage(torch.utils.data.Dataset):
    """8 samples; image i is filled with i, and sample 2's image is unreadable (None, as the real loaders)."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return None if index == 2 else {"image": torch.full((3, 2, 2), float(index)), "caption": "", "index": index}


def test_batch_stream_keeps_the_batch_size_and_reports_replacements(capsys):
    """What the all-gather under DDP needs: every step's batch has the full size (one process here: a 2-process
    gloo run costs ~15 s of spawning on the CI machine; the size is the whole condition of the gather)."""
    import common
    collate = functools.partial(data.collate_plain, tokenizer=lambda texts: torch.zeros(len(texts), 4, dtype=torch.long))
    batches = [batch for _, _, batch in common.batch_stream(_OneBadImage(), collate, 2, 0, 0, 4, workers=0)]
    assert [len(batch["index"]) for batch in batches] == [2, 2, 2, 2] and all("replaced" not in b for b in batches)
    seen = sorted(i for batch in batches for i in batch["index"].tolist())
    assert seen == [0, 1, 3, 3, 4, 5, 6, 7]   # sample 2 became sample 3
    assert "epoch 0: 1 unreadable image(s) replaced by the next readable sample" in capsys.readouterr().err


def _docci(root):
    lines = [{"example_id": "train_0", "split": "train", "image_file": "train_0.jpg",
              "description": "A red car is parked on the left. A blue bus drives on the right."},
             {"example_id": "test_0", "split": "test", "image_file": "test_0.jpg", "description": "A dog."}]
    for line in lines:
        _image(os.path.join(root, "images", line["image_file"]), size=(64, 32))
    (root / "docci_descriptions.jsonlines").write_text("\n".join(json.dumps(l) for l in lines) + "\n")


def test_docci_segments_and_local_pairs(tmp_path):
    _docci(tmp_path)
    segments = {"images/train_0.jpg": {"boxes": [[0, 0, 16, 32], [40, 0, 64, 16]],
                                       "pairs": [{"sentence": "A blue bus drives on the right", "box": [40, 0, 64, 16],
                                                  "score": 30.0}]}}
    (tmp_path / "segments.json").write_text(json.dumps(segments))
    args = SimpleNamespace(data="docci", data_root=str(tmp_path), segments_file=str(tmp_path / "segments.json"),
                           local_pairs=True, seed=0)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    dataset = data.build_train_set(args, VAL_TRANSFORM, tokenizer)
    assert len(dataset) == 1 and dataset.captions[0].startswith("A red car")
    sample = dataset[0]
    # 64x32 -> resize shortest side to 32 (no change) -> center crop 32: x offset 16
    assert sample["segments"] == [[24.0, 0.0, 32.0, 16.0]]  # the first box was cropped away
    local = sample["local"]
    assert local["box"] == [24.0, 0.0, 32.0, 16.0] and local["crop"].shape == (3, 32, 32)
    tokens = tokenizer([sample["caption"]])[0]
    start, end = local["sentence_span"]
    assert "".join(tokenizer.decode(tokens[start:end].tolist()).split()) == "abluebusdrivesontheright."
    batch = data.collate_local([sample, sample], tokenizer=tokenizer)
    assert batch["crops"].shape == (2, 3, 32, 32) and batch["sentences"].shape == (2, 77)
    assert batch["boxes"].shape == (2, 4) and batch["sentence_span"].tolist() == [[start, end]] * 2


def test_box_mapping_open_clip_val_transform():
    _, _, val = open_clip.create_model_and_transforms("ViT-B-32")
    # 448x224: the shortest side is already 224; the center crop cuts 112 px on each side
    boxes = data.map_boxes([[112, 0, 336, 224], [0, 0, 50, 50], [100, 10, 200, 110]], (448, 224), val, (224, 224))
    assert boxes == [[0.0, 0.0, 224.0, 224.0], [0.0, 10.0, 88.0, 110.0]]  # the second box is cropped away
    # 1000x500: scale 224/500 = 0.448 -> 448x224, then the same 112 px crop
    scaled = data.map_boxes([[300, 0, 400, 100]], (1000, 500), val, (224, 224))
    assert scaled == [[pytest.approx(22.4), 0.0, pytest.approx(67.2), pytest.approx(44.8)]]


def test_docci_errors(tmp_path):
    with pytest.raises(data.DataError, match="docci_descriptions.jsonlines"):
        data.DocciDataset(str(tmp_path / "nowhere"))
    tmp_path.joinpath("docci_descriptions.jsonlines").write_text("{broken\n")
    with pytest.raises(data.DataError, match="not a DOCCI record"):
        data.DocciDataset(str(tmp_path))


def test_dci(tmp_path):
    root = tmp_path / "densely_captioned_images"
    (root / "annotations").mkdir(parents=True)
    _image(str(root / "photos" / "sa_1.jpg"), size=(40, 40))
    record = {"image": "sa_1.jpg", "short_caption": "A cat on a sofa.", "extra_caption": "The cat is gray.",
              "mask_data": {"0": {"bounds": [[4, 4], [20, 20]], "label": "cat"}}}
    (root / "annotations" / "sa_1.json").write_text(json.dumps(record))
    (root / "splits.json").write_text(json.dumps({"train": ["sa_1.json"], "test": []}))
    dataset = data.DciDataset(str(root), VAL_TRANSFORM)
    sample = dataset[0]
    assert sample["caption"] == "A cat on a sofa. The cat is gray."
    assert sample["segments"] == [[pytest.approx(3.2), pytest.approx(3.2), 16.0, 16.0]]  # 40 px -> 32 px
    with pytest.raises(data.DataError, match="annotations"):
        data.DciDataset(str(tmp_path / "nowhere"))


def test_dci_official_bounds_form(tmp_path):
    """The release stores bounds as {"topLeft": {"x", "y"}, "bottomRight": {"x", "y"}} (the form its loader reads)."""
    root = tmp_path / "densely_captioned_images"
    (root / "annotations").mkdir(parents=True)
    _image(str(root / "photos" / "sa_2.jpg"), size=(40, 40))
    masks = {"0": {"idx": 0, "bounds": {"topLeft": {"x": 4, "y": 8}, "bottomRight": {"x": 20, "y": 40}}, "label": "cat"},
             "1": {"idx": 1, "bounds": [[0, 0], [40, 20]], "label": "sofa"}}
    record = {"image": "sa_2.jpg", "short_caption": "A cat on a sofa.", "extra_caption": "", "mask_data": masks}
    (root / "annotations" / "sa_2.json").write_text(json.dumps(record))
    sample = data.DciDataset(str(root), VAL_TRANSFORM)[0]
    assert sample["segments"] == [[pytest.approx(3.2), pytest.approx(6.4), 16.0, 32.0], [0.0, 0.0, 32.0, 16.0]]
    record["mask_data"]["0"]["bounds"] = {"topLeft": [4, 8]}
    (root / "annotations" / "sa_2.json").write_text(json.dumps(record))
    with pytest.raises(data.DataError, match="topLeft"):
        data.DciDataset(str(root), VAL_TRANSFORM)


def test_json_and_csv(tmp_path):
    _image(str(tmp_path / "img" / "a.png"))
    _image(str(tmp_path / "img" / "b.png"), color=(0, 0, 255))
    (tmp_path / "captions.json").write_text(json.dumps([{"image": "img/a.png", "caption": "a red image"},
                                                        {"image": "img/b.png", "caption": "a blue image"}]))
    dataset = data.build_train_set(SimpleNamespace(data="json", data_root=str(tmp_path)), VAL_TRANSFORM, None)
    assert dataset.captions == ["a red image", "a blue image"] and dataset[1]["image"][2].mean() > 0.9
    (tmp_path / "captions.csv").write_text("image,caption\nimg/a.png,\"a red image, square\"\n")
    csv_set = data.build_train_set(SimpleNamespace(data="csv", data_root=str(tmp_path / "captions.csv")), None, None)
    assert csv_set.captions == ["a red image, square"] and csv_set[0]["image"].shape == (3, 32, 48)
    (tmp_path / "t.tsv").write_text("filepath\ttitle\nimg/b.png\tblue\n")
    assert data.CsvCaptions(str(tmp_path / "t.tsv")).captions == ["blue"]
    (tmp_path / "bad.json").write_text(json.dumps({"image": "img/a.png"}))
    with pytest.raises(data.DataError, match="image, caption"):
        data.JsonCaptions(str(tmp_path / "bad.json"))
    (tmp_path / "missing.json").write_text(json.dumps([{"image": "img/zzz.png", "caption": "x"}]))
    with pytest.raises(data.DataError, match="missing"):
        data.JsonCaptions(str(tmp_path / "missing.json"))
    (tmp_path / "bad.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(data.DataError, match="image/caption columns"):
        data.CsvCaptions(str(tmp_path / "bad.csv"))


def test_empty_captions_are_skipped_counted_and_reported_by_every_loader(tmp_path):
    annotations = _coco(tmp_path)
    annotations.append({"id": 200, "image_id": 9, "caption": "  "})
    coco_file = tmp_path / "annotations" / "captions_train2014.json"
    coco_file.write_text(json.dumps(dict(json.loads(coco_file.read_text()), annotations=annotations)))
    with pytest.warns(UserWarning, match="CocoCaptions: skipped 1 of 5 samples with an empty caption"):
        coco = data.CocoCaptions(str(tmp_path), VAL_TRANSFORM)
    assert len(coco) == 4 and coco.empty_captions == 1 and all(coco.captions)
    _image(str(tmp_path / "img" / "a.png"))
    (tmp_path / "captions.json").write_text(json.dumps([{"image": "img/a.png", "caption": ""},
                                                        {"image": "img/a.png", "caption": "a red image"}]))
    with pytest.warns(UserWarning, match="skipped 1 of 2 .*img/a.png"):
        assert data.JsonCaptions(str(tmp_path / "captions.json")).captions == ["a red image"]
    (tmp_path / "empty.csv").write_text("image,caption\nimg/a.png,\n")
    with pytest.warns(UserWarning), pytest.raises(data.DataError, match="no samples .*1 with an empty caption"):
        data.CsvCaptions(str(tmp_path / "empty.csv"))


def test_build_train_set_errors(tmp_path):
    with pytest.raises(data.DataError, match="unknown --data"):
        data.build_train_set(SimpleNamespace(data="imagenet", data_root=str(tmp_path)), None, None)
    with pytest.raises(data.DataError, match="needs --data-root"):
        data.build_train_set(SimpleNamespace(data="coco", data_root=None), None, None)
    with pytest.raises(data.DataError, match="captions.json"):
        data.build_train_set(SimpleNamespace(data="json", data_root=str(tmp_path)), None, None)


def test_negclip_tsv_negatives_are_read(tmp_path):
    """NegCLIP's train_neg_clip.tsv (tab-separated, columns title, filepath, neg_caption, ...): `neg_caption` becomes
    the caption's hard negative (a JSON list of several also works); a row without one gets the rule-based ones."""
    from PIL import Image
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / name)
    rows = ["\ttitle\tfilepath\timage_id\tneg_caption\tneg_image",
            "0\ta red car next to a tree\ta.png\t1\ta tree next to a red car\t[2, 3]",
            "1\ta small dog on a sofa\tb.png\t2\t[\"a small sofa on a dog\", \"a large dog on a sofa\"]\t[1]",
            "2\ta black cat on a white chair\tc.png\t3\t\t[1]"]
    (tmp_path / "train_neg_clip.tsv").write_text("\n".join(rows) + "\n")
    dataset = data.CsvCaptions(str(tmp_path / "train_neg_clip.tsv"))
    assert dataset.captions[0] == "a red car next to a tree"
    assert dataset.given_negatives == [["a tree next to a red car"], ["a small sofa on a dog", "a large dog on a sofa"],
                                       []]
    wrapped = data.WithNegatives(dataset, ["swap_nouns", "swap_adjs"], cache_dir=str(tmp_path / "cache"),
                                 progress=False)
    assert wrapped.negatives[0] == ["a tree next to a red car", "a red car next to a tree"]
    assert wrapped.valid[0] == [True, False]
    assert wrapped.negatives[1] == ["a small sofa on a dog", "a large dog on a sofa"] and wrapped.valid[1] == [True, True]
    assert wrapped.valid[2] != [False, False]   # no negative in the file: the rule-based generator's
