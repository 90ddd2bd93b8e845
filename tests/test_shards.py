"""`--data wds`: webdataset shards, written here with webdataset's own TarWriter, read by index
(data.WebDatasetShards): captions from .txt or .json, C2LIP's `nounphrases` and hard negatives from .json, an
unreadable image replaced like an unreadable file, and DeGLA trained on the shards by 1 and by 2 processes."""
import io
import json
import os
import subprocess
import sys

import pytest
import webdataset
from PIL import Image

import data
import degla

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star")


def _jpeg(color, size=32):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shards(folder, n_shards=2, per_shard=12, bad=None):
    """Shards in the layout img2dataset and C2LIP's packing script write: <key>.jpg plus <key>.txt (even samples) or
    <key>.json with caption and nounphrases (odd samples; every third also carries a neg_caption). `bad`: the
    (shard, sample) whose image bytes are not an image."""
    os.makedirs(folder, exist_ok=True)
    for shard in range(n_shards):
        with webdataset.TarWriter(os.path.join(folder, f"{shard:05d}.tar")) as sink:
            for i in range(per_shard):
                n = shard * per_shard + i
                color, shape = COLORS[n % 4], SHAPES[(n // 4) % 4]
                caption = f"a {color} {shape} on a dark background"
                sample = {"__key__": f"{n:08d}", "jpg": b"not an image" if (shard, i) == bad else _jpeg(color)}
                if n % 2 == 0:
                    sample["txt"] = caption
                else:
                    meta = {"caption": caption, "nounphrases": [f"a {color} {shape}", "a dark background"]}
                    if n % 3 == 0:
                        meta["neg_caption"] = f"a {COLORS[(n + 1) % 4]} {shape} on a dark background"
                    sample["json"] = json.dumps(meta)
                sink.write(sample)
    return os.path.join(folder, "{00000..%05d}.tar" % (n_shards - 1))


def test_shards_read_by_index(tmp_path):
    pattern = write_shards(tmp_path / "shards")
    dataset = data.WebDatasetShards(pattern, cache_dir=str(tmp_path / "cache"), progress=False)
    assert len(dataset) == 24
    assert dataset.captions[4] == "a red square on a dark background"             # from <key>.txt
    assert dataset.captions[5] == "a green square on a dark background"           # from <key>.json
    assert dataset.image_ids[:2] == ["00000000", "00000001"]
    sample = dataset[3]
    assert tuple(sample["image"].shape) == (3, 32, 32) and sample["caption"] == dataset.captions[3]
    assert dataset.nounphrases[0] is None and dataset.nounphrases[1] == ["a green circle", "a dark background"]
    assert dataset.given_negatives[3] == ["a red circle on a dark background"]
    # the index is cached: a second open reads no tar headers
    again = data.WebDatasetShards(str(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"), progress=False)
    assert again.captions == dataset.captions and again.locations == dataset.locations


def test_the_data_wrappers_use_the_shards_own_concepts_and_negatives(tmp_path):
    dataset = data.WebDatasetShards(write_shards(tmp_path / "shards"), cache_dir=str(tmp_path / "cache"),
                                    progress=False)
    concepts = data.WithConcepts(dataset, cache_dir=str(tmp_path / "cache"), progress=False)
    assert concepts.concepts[1] == ["a green circle", "a dark background"]   # from the .json, not from spaCy
    assert concepts.concepts[0] and all(p in dataset.captions[0] for p in concepts.concepts[0])   # spaCy's
    negatives = data.WithNegatives(dataset, ["swap_adjs", "replace_adjs"], cache_dir=str(tmp_path / "cache"),
                                   progress=False)
    assert negatives.negatives[3][0] == "a red circle on a dark background" and negatives.valid[3] == [True, False]
    assert negatives.negatives[0] != [dataset.captions[0]] * 2   # no negative in the data: the rule-based ones


def test_an_unreadable_image_in_a_shard_is_replaced(tmp_path):
    dataset = data.WebDatasetShards(write_shards(tmp_path / "shards", bad=(1, 2)), cache_dir=str(tmp_path / "cache"),
                                    progress=False)
    with pytest.warns(UserWarning, match="unreadable image .*00001.tar::00000014"):
        assert dataset[14] is None
    replaced = data.ReplaceUnreadable(dataset)[14]
    assert replaced is not None and replaced["index"] != 14


def test_a_missing_shard_is_one_clear_error(tmp_path):
    write_shards(tmp_path / "shards", n_shards=2)
    with pytest.raises(data.DataError, match="1 of 3 shards missing"):
        data.WebDatasetShards(str(tmp_path / "shards" / "{00000..00002}.tar"), progress=False)


def _first_losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.parametrize("procs", [1, 2])
def test_degla_trains_on_shards(tmp_path, procs, capsys, monkeypatch):
    pattern = write_shards(tmp_path / "shards", n_shards=2, per_shard=16, bad=(0, 5))
    out = tmp_path / "run"
    flags = ["--data", "wds", "--data-root", pattern, "--model", "shapes-tiny-vit", "--pretrained", "none",
             "--cpu-procs", str(procs), "--steps", "3", "--batch-size", str(8 // procs), "--warmup", "1", "--eval", "",
             "--save-every", "0", "--log-every", "1", "--workers", "0", "--no-progress", "--out", str(out)]
    if procs == 1:   # in this process: the warning is pytest's to catch, the per-epoch report goes to stderr
        monkeypatch.setenv("COMPCLIP_CACHE", str(tmp_path / "cache"))
        with pytest.warns(UserWarning, match="unreadable image .*00000.tar::00000005"):
            degla.main(flags)
        stderr = capsys.readouterr().err
    else:            # a real `python degla.py --cpu-procs 2` process
        env = dict(os.environ, COMPCLIP_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
        done = subprocess.run([sys.executable, os.path.join(REPO, "degla.py"), *flags], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "unreadable image" in done.stderr
        stderr = done.stderr
    losses = _first_losses(out)
    print(f"wds, {procs} process(es): losses of the first steps {losses}")
    assert len(losses) == 3 and all(loss == loss for loss in losses)
    assert "replaced by the next readable sample" in stderr
