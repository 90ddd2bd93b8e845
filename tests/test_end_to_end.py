"""The proof, end to end: the four methods on real-data files, in two processes under torchrun, killed and
resumed, and exported as an open_clip model that loads with one line.

The data are small fake data sets written in the official formats that data.py reads (docs/real_data.md):
- COCO 2014 (annotations/captions_train2014.json + train2014/COCO_train2014_<id>.jpg, 5 captions per image)
  and Karpathy's dataset_coco.json, with one truncated JPEG among the images of the first batch;
- DOCCI (docci_descriptions.jsonlines + images/) with a SAM-style candidate-boxes file (boxes and mask areas);
- DCI (densely_captioned_images/ with annotations/, photos/, splits.json) whose masks carry the release's
  `bounds` form {"topLeft": {"x", "y"}, "bottomRight": {"x", "y"}}.
GOAL's LISM pairs are made the documented way, `python goal.py lism ...` (in this process, through goal.main),
from the candidate boxes (DOCCI) and from the masks' bounds (DCI). The photos are shapes-world scenes, so the
tiny base models have something to recognise (LISM keeps crops that show what a sentence says).

Every run uses the real-data defaults of its method (paper learning rate, optimizer, schedule, seed, loss
weights, and data-loader workers: 8 for DeGLA and CE-CLIP, the machine's default for C2LIP and GOAL; only the
torchrun runs load their data in-process) with the shipped tiny models instead of the paper's (`--model
shapes-tiny-vit`; C2LIP `shapes-tiny-siglip`, the SigLIP its paper fine-tunes; GOAL with the tiny model's
stretch 32 -> 104 positions), `--eval ''` and 3 steps. Augmentation stays on (open_clip's random resized crop;
GOAL uses none). For each method the tests prove:
1. two processes under `torchrun --nproc_per_node 2` (gloo) log at the first step the loss terms of one
   process on the doubled batch (same global batch: the sampler gives the two ranks the even and the odd
   positions of the one-process batch, and each sample's augmentation is seeded by (seed, epoch, index));
2. a run killed with SIGKILL after its first checkpoint and resumed with `--resume RUN_DIR` ends with exactly
   the weights (torch.equal) of the run that was never interrupted;
3. the exported run folder loads in a fresh interpreter, without this repository on its path, with the line
   of README.md ("Using a trained model"), and gives the image and text features of the trained weights.

Cost (CI must stay under 8 minutes on 2 cores): starting an interpreter that imports torch and open_clip costs
seconds, training 3 tiny steps a fraction of that, so the design counts interpreter starts. Everything runs
once, in the module fixture `runs`, and the tests only read the results:
- one torchrun launch (agent + 2 workers) runs the four methods one after the other (`_torchrun_worker`);
- one helper interpreter forks the four runs that get killed (`_killed_runs`), so they share its imports;
- the uninterrupted and the resumed runs run in this process, through each script's main(argv) (one process:
  `common.launch` calls `train` directly, as `python degla.py` does);
- one fresh interpreter reloads the four exported folders.
The subprocesses work while this process trains. Every process computes with one thread: bit-identical
weights need the same reduction order in the killed, the resumed and the uninterrupted run, and the thread
count can change it; the forked children also need it (GNU OpenMP does not survive a fork once its threads run).
"""
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import traceback
import warnings

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # also when torchrun runs this file as a script
import c2lip  # noqa: E402
import cehn  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import degla  # noqa: E402
import goal  # noqa: E402

METHODS = {"degla": degla, "cehn": cehn, "c2lip": c2lip, "goal": goal}
STEPS = 3                      # the killed run dies after its first checkpoint (step 1, or 2), the resumed one ends it
BATCH = {"coco": 4, "long": 2}  # per process of two; one process gets both halves (the same global batch)
PHOTO_SIZE = (96, 72)          # width, height: the val transform resizes to 85x64 and center-crops 64x64
SCENE_SIZE = 72                # the scene is drawn 72x72, in the middle of the photo
TIMEOUT = 900                  # seconds any subprocess may take before the fixture gives up (a hang fails the test)


# =====================================================================================================
# Fake data sets in the official formats
# =====================================================================================================
def _photo(path, scene):
    """A shapes-world scene as a 96x72 JPEG 'photo'; returns the scene's left offset in it (pixels)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    left = (PHOTO_SIZE[0] - SCENE_SIZE) // 2
    photo = Image.new("RGB", PHOTO_SIZE, data._BACKGROUND)
    photo.paste(data.render_scene(scene, SCENE_SIZE), (left, 0))
    photo.save(path, quality=90)
    return left


def _boxes(scene, left):
    """Each object's box [x0, y0, x1, y1] in pixels of the photo (integers, as a mask's bounds)."""
    return [[round(x0 + left), round(y0), round(x1 + left), round(y1)]
            for x0, y0, x1, y1 in (o.box(SCENE_SIZE) for o in scene)]


COCO_IMAGE_IDS = (9, 25, 30, 34, 36, 49, 61, 64)   # COCO image ids (the 12 digits of the file names)


def write_coco(root, karpathy_file):
    """annotations/captions_train2014.json (official format: info, licenses, images, annotations) and
    train2014/COCO_train2014_<12-digit id>.jpg, five captions per image, annotations in no particular order; and
    Karpathy's dataset_coco.json (its train/restval images in train2014, val/test in val2014, so that training
    on 2014 excludes nothing, as on the real files). The image of the first sample of the first batch (seed 42,
    the real-data seed of the COCO methods) is then truncated: the loaders must replace it (data.ReplaceUnreadable).
    Returns the truncated file's path."""
    rng = random.Random("end-to-end coco")
    images, annotations, karpathy = [], [], []
    for n, image_id in enumerate(COCO_IMAGE_IDS):
        scene = data.sample_scene(rng, n_objects=rng.choice([2, 3]))
        name = f"COCO_train2014_{image_id:012d}.jpg"
        _photo(os.path.join(root, "train2014", name), scene)
        images.append({"license": 3, "file_name": name, "coco_url": f"http://images.cocodataset.org/train2014/{name}",
                       "height": PHOTO_SIZE[1], "width": PHOTO_SIZE[0], "date_captured": "2013-11-14 16:28:13",
                       "flickr_url": "http://farm3.staticflickr.com/0/0.jpg", "id": image_id})
        captions = [data.scene_caption(scene, rng) for _ in range(5)]
        annotations += [{"image_id": image_id, "caption": c[0].upper() + c[1:] + "."} for c in captions]
        karpathy.append({"filepath": "train2014", "filename": name, "imgid": n, "cocoid": image_id,
                         "split": "train" if n % 2 else "restval", "sentids": list(range(5 * n, 5 * n + 5)),
                         "sentences": [{"tokens": c.split(), "raw": c, "imgid": n, "sentid": 5 * n + k}
                                       for k, c in enumerate(captions)]})
    rng.shuffle(annotations)
    for number, annotation in enumerate(annotations):
        annotation["id"] = 48 + 7 * number
    for n, (image_id, split) in enumerate([(42, "val"), (73, "test")], start=len(karpathy)):
        karpathy.append({"filepath": "val2014", "filename": f"COCO_val2014_{image_id:012d}.jpg", "imgid": n,
                         "cocoid": image_id, "split": split, "sentids": [], "sentences": []})
    os.makedirs(os.path.join(root, "annotations"))
    with open(os.path.join(root, "annotations", "captions_train2014.json"), "w") as f:
        json.dump({"info": {"description": "COCO 2014 Dataset (end-to-end test)", "year": 2014}, "licenses": [],
                   "images": images, "annotations": annotations}, f)
    os.makedirs(os.path.dirname(karpathy_file), exist_ok=True)
    with open(karpathy_file, "w") as f:
        json.dump({"images": karpathy, "dataset": "coco"}, f)
    first = common.EpochSampler(len(annotations), 2 * BATCH["coco"], 42, 0, 0, 1).indices[0]
    broken = os.path.join(root, "train2014", f"COCO_train2014_{annotations[first]['image_id']:012d}.jpg")
    with open(broken, "rb") as f:
        jpeg = f.read()
    with open(broken, "wb") as f:   # a download cut short: PIL opens it (96x72) and fails to decode it
        f.write(jpeg[:len(jpeg) // 2])
    return broken


def write_docci(root, boxes_file):
    """docci_descriptions.jsonlines (one {"example_id", "split", "image_file", "description"} per line) and
    images/<image_file>: 8 train, 2 test, 1 qual_dev. The candidate boxes file is what GOAL's SAM step gives
    (docs/real_data.md §2.6): per image its boxes and each box's mask area, the whole-image mask included (GOAL's
    1%-80% filter drops it)."""
    rng = random.Random("end-to-end docci")
    lines, candidates = [], {}
    for split, count in (("train", 8), ("test", 2), ("qual_dev", 1)):
        for k in range(count):
            scene = data.sample_scene(rng, n_objects=rng.choice([2, 3]))
            text, _ = data.long_caption(scene, SCENE_SIZE, rng)
            image_file = f"{split}_{k:05d}.jpg"
            boxes = _boxes(scene, _photo(os.path.join(root, "images", image_file), scene)) \
                + [[0, 0, PHOTO_SIZE[0], PHOTO_SIZE[1]]]
            areas = [0.7 * (x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes[:-1]] + [PHOTO_SIZE[0] * PHOTO_SIZE[1]]
            candidates[f"images/{image_file}"] = {"boxes": boxes, "areas": areas, "pairs": []}
            lines.append({"example_id": f"{split}_{k:05d}", "split": split, "image_file": image_file,
                          "description": text})
    with open(os.path.join(root, "docci_descriptions.jsonlines"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    with open(boxes_file, "w") as f:
        json.dump(candidates, f)


def write_dci(root):
    """densely_captioned_images/: annotations/sa_<n>.json ({"image", "short_caption", "extra_caption",
    "mask_data": {"<idx>": {"idx", "bounds": {"topLeft": {"x", "y"}, "bottomRight": {"x", "y"}}, "label",
    "caption", "parent"}}}), photos/sa_<n>.jpg and splits.json (8 train, 1 valid, 1 test)."""
    rng = random.Random("end-to-end dci")
    names = []
    os.makedirs(os.path.join(root, "annotations"))
    for n in range(10):
        scene = data.sample_scene(rng, n_objects=rng.choice([2, 3]))
        _, sentences = data.long_caption(scene, SCENE_SIZE, rng)
        image = f"sa_{223400 + n}.jpg"
        boxes = _boxes(scene, _photo(os.path.join(root, "photos", image), scene))
        masks = {str(i): {"idx": i, "bounds": {"topLeft": {"x": x0, "y": y0}, "bottomRight": {"x": x1, "y": y1}},
                          "label": f"{o.color} {o.shape}", "caption": f"a {o.phrase()}", "parent": -1}
                 for i, (o, (x0, y0, x1, y1)) in enumerate(zip(scene, boxes))}
        record = {"image": image, "short_caption": sentences[0][0],
                  "extra_caption": " ".join(s for s, _ in sentences[1:]), "mask_data": masks}
        names.append(f"sa_{223400 + n}.json")
        with open(os.path.join(root, "annotations", names[-1]), "w") as f:
            json.dump(record, f)
    with open(os.path.join(root, "splits.json"), "w") as f:
        json.dump({"train": names[:8], "valid": names[8:9], "test": names[9:]}, f)


# =====================================================================================================
# The entries of the subprocesses (this file run as a script)
# =====================================================================================================
def _torchrun_worker(runs):
    """What each of the two torchrun workers runs: the four methods' main(argv), one after the other, as
    `torchrun --nproc_per_node 2 degla.py ...` would run one of them (rank, world size and master address come
    from torchrun's environment). One thing is changed between runs: a process group made after another in the
    same processes would find, in torchrun's store, the keys of the first one, and gloo may then connect to the
    address of a rank that is gone. So each run gets a fresh store on its own port, hosted by rank 0 (env://
    without torchrun's agent store)."""
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    for method, argv, port in runs:
        os.environ["MASTER_PORT"] = str(port)
        METHODS[method].main(argv)


def _killed_runs(runs):
    """The helper interpreter: start each run in a forked child (the imports are done once, here), wait for its
    first checkpoint, then SIGKILL the child's process group: the run and its data-loader workers die at once,
    as in a crash. Prints {method: how the child ended} as JSON."""
    ended = {}
    for method, argv, run_dir in runs:
        child = os.fork()
        if child == 0:   # the run
            os.setpgid(0, 0)
            try:
                METHODS[method].main(argv)
                code = 0
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        with contextlib.suppress(OSError):   # also here, so that the group exists whichever process runs first
            os.setpgid(child, child)
        checkpoint = os.path.join(run_dir, "checkpoint.pt")
        status = None
        while status is None and not os.path.exists(checkpoint):
            done, code = os.waitpid(child, os.WNOHANG)
            status = code if done else None
            time.sleep(0.005)
        if status is None:
            os.killpg(child, signal.SIGKILL)
            status = os.waitpid(child, 0)[1]
        ended[method] = "SIGKILL" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL \
            else f"ended by itself with status {status}"
    print(json.dumps(ended), flush=True)


# The line of README.md ("Using a trained model"), for each folder; nothing of this repository is importable.
FRESH_INTERPRETER = """
import json, sys, open_clip, torch
folders, inputs, outputs = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
images, captions = torch.load(inputs)
features = {}
for method, folder in folders.items():
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
    tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
    model.eval()
    with torch.no_grad():
        features[method] = {"image": model.encode_image(images), "text": model.encode_text(tokenizer(captions)),
                            "context": tokenizer.context_length, "weights": model.state_dict()}
torch.save(features, outputs)
"""


# =====================================================================================================
# The runs (module fixture)
# =====================================================================================================
def _logged(run_dir, step=0):
    """The log.jsonl record of `step`."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return next(record for record in map(json.loads, f) if record["step"] == step)


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "final.pt"), map_location="cpu")["state_dict"]


def _differing(weights, others):
    """Names of the tensors that are not bit-identical in two state dicts (or missing from one of them)."""
    return sorted(set(weights) ^ set(others)) + [name for name, value in weights.items()
                                                  if name in others and not torch.equal(value, others[name])]


def _start(command, log_path, **kwargs):
    """A subprocess in its own session (so that a failure can kill it with all its children), output to a file."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)


def _wait(process, what):
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise AssertionError(f"{what} did not finish in {TIMEOUT} s (a hang?)") from None


def _in_process(argv_by_method, out):
    """Each method's main(argv) in this process; its printed output goes to `out`."""
    with contextlib.redirect_stderr(out), contextlib.redirect_stdout(out):
        for method, argv in argv_by_method:
            METHODS[method].main(argv)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("end_to_end")
    # subprocesses: one thread (module docstring), the text caches in this folder, the repository not on the path
    # (torchrun's workers and the helper run this file, which puts it there itself; the fresh interpreter must not)
    env = dict(os.environ, OMP_NUM_THREADS="1", CLIP_TEXT_CACHE=str(tmp / "cache" / "text"),
               COMPCLIP_CACHE=str(tmp / "cache" / "compclip"))
    env.pop("PYTHONPATH", None)
    threads, processes = torch.get_num_threads(), []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIP_TEXT_CACHE", env["CLIP_TEXT_CACHE"])
        patch.setenv("COMPCLIP_CACHE", env["COMPCLIP_CACHE"])
        torch.set_num_threads(1)
        try:
            yield _all_runs(tmp, env, processes)
        finally:
            torch.set_num_threads(threads)
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            for weights in [*tmp.rglob("*.pt"), *tmp.rglob("*.bin")]:   # 2-3 GB of checkpoints; logs stay
                weights.unlink()


def _all_runs(tmp, env, processes):
    # 1. the data sets, GOAL's LISM pairs (docs/real_data.md §2.6: `goal.py lism`, from SAM's candidate boxes for
    #    DOCCI, from the masks' bounds for DCI) and the text caches (hard negatives, concepts: built once here, as
    #    docs/real_data.md §2 does before a run on two nodes, so that no subprocess loads spaCy)
    bench = tmp / "bench"
    coco, karpathy = bench / "coco", bench / "karpathy" / "dataset_coco.json"
    docci, dci = bench / "docci", bench / "dci" / "densely_captioned_images"
    broken = write_coco(str(coco), str(karpathy))
    write_docci(str(docci), str(docci / "sam_boxes.json"))
    write_dci(str(dci))
    tiny = ["--model", common.TINY_MODEL, "--pretrained", "shapes"]
    goal_tiny = tiny + ["--context-length", "104", "--keep-positions", "8"]   # the tiny model's Long-CLIP stretch
    lism_tiny = goal_tiny + ["--scorer-model", "same", "--scorer-pretrained", "same"]   # not the paper's ViT-L
    printed = io.StringIO()
    _in_process([("goal", ["lism", "--data", "docci", "--data-root", str(docci), "--segments-file",
                           str(docci / "sam_boxes.json"), "--out", str(docci / "lism.json"), *lism_tiny]),
                 ("goal", ["lism", "--data", "dci", "--data-root", str(dci), "--out", str(bench / "dci" / "lism.json"),
                           *lism_tiny])], printed)
    coco_set = data.CocoCaptions(str(coco), karpathy_file=str(karpathy), check_files=False)
    data.WithNegatives(coco_set, degla.PAPER_DEFAULTS["neg_types"].split(","), progress=False)
    data.WithNegatives(coco_set, data.CEHN_TYPES, progress=False)
    data.WithConcepts(coco_set, cache_dir=os.path.join(common.cache_dir(), "concepts"), progress=False)

    # the commands: the real-data defaults of each method, the tiny models, 3 steps. GOAL's two processes train
    # on DCI, its killed and resumed run on DOCCI, so that both long-caption loaders train.
    coco_flags = ["--data", "coco", "--data-root", str(coco), "--karpathy-file", str(karpathy)]
    resumed_data = {"degla": coco_flags, "cehn": coco_flags, "c2lip": coco_flags,
                    "goal": ["--data", "docci", "--data-root", str(docci), "--lism", str(docci / "lism.json")]}
    compared_data = dict(resumed_data, goal=["--data", "dci", "--data-root", str(dci), "--lism",
                                             str(bench / "dci" / "lism.json")])
    model_flags = {"degla": tiny, "cehn": tiny, "goal": goal_tiny,
                   "c2lip": ["--model", common.SHAPES_SIGLIP_MODEL, "--pretrained", "shapes"]}

    def command(method, data_flags, processes, out, *extra):
        per_process = 2 * BATCH["long" if method == "goal" else "coco"] // processes   # the same global batch
        return [*data_flags, *model_flags[method], "--batch-size", str(per_process), "--steps", str(STEPS),
                "--eval", "", "--no-progress", "--log-every", "1", "--out", str(out), *extra]

    two = {m: tmp / "two-processes" / m for m in METHODS}        # torchrun
    straight = {m: tmp / "uninterrupted" / m for m in METHODS}   # 1 process, never interrupted
    one = dict(straight, goal=tmp / "one-process-dci" / "goal")  # 1 process, compared with `two`
    killed = {m: tmp / "killed-then-resumed" / m for m in METHODS}

    # 2. started now, working while this process trains: torchrun (the four methods in turn, each on its own
    #    port: `_torchrun_worker`) and the helper that forks and kills the four runs
    ports = set()
    while len(ports) < len(METHODS):
        ports.add(common._free_port())
    # (--workers 0: the two ranks would fork 16 data-loader processes for three steps; what a sample looks like does
    # not depend on who loads it, so the one-process runs they are compared with keep the real default)
    torchrun_runs = [(m, command(m, compared_data[m], 2, two[m], "--workers", "0"), port)
                     for m, port in zip(METHODS, ports)]
    torchrun = _start([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                       "--nproc_per_node", "2", os.path.abspath(__file__), "torchrun-worker",
                       json.dumps(torchrun_runs)], tmp / "torchrun.log", env=env, cwd=tmp)
    processes.append(torchrun)
    killed_runs = [(m, command(m, resumed_data[m], 1, killed[m], "--save-every", "1"), str(killed[m]))
                   for m in METHODS]
    helper = _start([sys.executable, os.path.abspath(__file__), "killed-runs", json.dumps(killed_runs)],
                    tmp / "killed.log", env=env, cwd=tmp)
    processes.append(helper)

    # 3. here: the uninterrupted runs (the same commands as the killed ones, without their checkpoint every step,
    #    which reads the training state and changes none of it) and GOAL's one-process run on DCI
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _in_process([(m, command(m, resumed_data[m], 1, straight[m])) for m in METHODS]
                    + [("goal", command("goal", compared_data["goal"], 1, one["goal"]))], printed)

    # 4. a fresh interpreter reloads the exported folders, while the killed runs are resumed here
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    captions = [" ".join(["A small red circle is to the left of a large blue square."] * 5),   # > 32 tokens
                "a blue star"]
    torch.save((images, captions), tmp / "inputs.pt")
    fresh = _start([sys.executable, "-c", FRESH_INTERPRETER, json.dumps({m: str(straight[m]) for m in METHODS}),
                    str(tmp / "inputs.pt"), str(tmp / "features.pt")], tmp / "fresh.log", env=env, cwd=tmp)
    processes.append(fresh)
    _wait(helper, "the helper of the killed runs")
    ended = json.loads((tmp / "killed.log").read_text().strip().splitlines()[-1])
    saved_steps = {m: torch.load(killed[m] / "checkpoint.pt", map_location="cpu", weights_only=False)["step"]
                   for m in METHODS}
    resumed_output = {}
    for m in METHODS:
        resumed_output[m] = io.StringIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the same warnings as the first time (e.g. 8 workers on 2 cores)
            _in_process([(m, ["--resume", str(killed[m])])], resumed_output[m])

    # 5. everything finished
    _wait(fresh, "the fresh interpreter")
    _wait(torchrun, "torchrun")
    return {"tmp": tmp, "broken": broken, "two": two, "one": one, "straight": straight, "killed": killed,
            "ended": ended, "saved_steps": saved_steps,
            "resumed_output": {m: text.getvalue() for m, text in resumed_output.items()},
            "printed": printed.getvalue(), "warnings": [str(w.message) for w in warned],
            "torchrun_code": torchrun.returncode, "torchrun_log": (tmp / "torchrun.log").read_text(),
            "killed_log": (tmp / "killed.log").read_text(),
            "fresh_code": fresh.returncode, "fresh_log": (tmp / "fresh.log").read_text(),
            "inputs": (images, captions), "model_flags": model_flags}


# =====================================================================================================
# The tests
# =====================================================================================================
def test_the_unreadable_coco_image_is_replaced_and_reported_in_one_and_in_two_processes(runs):
    """The truncated JPEG is named in a warning and counted at the end of the epoch, and the runs go on with full
    batches (they would stop at the all-gather otherwise; the other tests check what they computed)."""
    assert any(f"unreadable image {runs['broken']}" in message for message in runs["warnings"]), runs["warnings"]
    assert "[data] epoch 0:" in runs["printed"] and "unreadable image(s) replaced" in runs["printed"]
    assert f"unreadable image {runs['broken']}" in runs["torchrun_log"], runs["torchrun_log"][-3000:]
    assert "unreadable image(s) replaced by the next readable sample" in runs["torchrun_log"]


def test_the_two_ranks_first_batches_are_the_one_process_batch_in_another_order():
    """The premise of the loss comparison: the ranks' shards of the first batch are the one-process batch (rank 0
    the even positions, rank 1 the odd ones), gathered in another order; replacing an unreadable sample and
    seeding augmentations are functions of the sample index, so they agree as well."""
    for seed, size, per_process in ((42, 40, BATCH["coco"]), (1337, 8, BATCH["long"])):   # the real-data seeds
        one = common.EpochSampler(size, 2 * per_process, seed, 0, 0, 1).indices[:2 * per_process]
        ranks = [common.EpochSampler(size, per_process, seed, 0, rank, 2).indices[:per_process] for rank in (0, 1)]
        assert sorted(ranks[0] + ranks[1]) == sorted(one) and ranks[0] + ranks[1] != one


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_under_torchrun_log_the_first_step_losses_of_one_process(runs, method):
    """Every loss term logged at step 0 by two torchrun processes equals the one logged by one process on the
    doubled batch. The two are the same float32 maths in another order (matrix products over half and whole
    batches, the gathered rows in rank order): they agree to float32 rounding, so the tolerance is torch's own default
    for float32 results (torch.testing.assert_close: rtol 1.3e-6, atol 1e-5). The log's 9 significant digits
    pin each float32 value to its last bit."""
    assert runs["torchrun_code"] == 0, runs["torchrun_log"][-5000:]
    two, one = _logged(runs["two"][method]), _logged(runs["one"][method])
    two.pop("samples_per_s", None), one.pop("samples_per_s", None)
    assert set(two) == set(one)
    print(f"\n{method}: first-step loss, 2 processes {two['loss']!r}, 1 process {one['loss']!r}, "
          f"difference {two['loss'] - one['loss']:.3g}")
    for key in sorted(one):
        torch.testing.assert_close(torch.tensor(two[key], dtype=torch.float64),
                                   torch.tensor(one[key], dtype=torch.float64),
                                   rtol=1.3e-6, atol=1e-5, msg=lambda text: f"{method} {key}: {text}")
    assert one["lr"] > 0   # the real-data learning rates (1e-6 .. 1e-5, in warm-up) are logged, not rounded to 0


@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_after_a_checkpoint_then_resume_gives_the_weights_of_an_uninterrupted_run(runs, method):
    """The resumed run continues where its checkpoint left off (COCO: inside the first epoch, of 5 steps; GOAL's
    8 DOCCI pairs, 2 steps per epoch: across an epoch boundary), with the run's own flags from its config.json,
    its data-loader workers (8 for DeGLA and CE-CLIP) and its RNG state, optimizer, schedule and method state
    (DeGLA's teacher, CE-CLIP's thresholds), and ends with the weights of the uninterrupted run to the last bit.
    Both runs trained (their weights left the base model's)."""
    assert runs["ended"][method] == "SIGKILL", runs["killed_log"][-5000:]
    saved = runs["saved_steps"][method]
    assert 1 <= saved < STEPS, saved
    assert f"resumed {method} from step {saved}" in runs["resumed_output"][method]
    straight, resumed = _weights(runs["straight"][method]), _weights(runs["killed"][method])
    assert _differing(straight, resumed) == [], method
    base = common.create_backbone(runs["model_flags"][method][1], "shapes")[0].state_dict()
    assert not torch.equal(straight["visual.proj"], base["visual.proj"])


@pytest.mark.parametrize("method", list(METHODS))
def test_exported_folder_loads_in_a_fresh_interpreter_with_the_trained_features(runs, method):
    """The folder of the uninterrupted run, loaded with README's line by an interpreter that has never imported
    this repository (no `shapes-tiny-*` names registered), holds the trained weights to the last bit and
    computes the trained model's image and text features, GOAL's with its 104 text positions (the long caption
    has more than 32 tokens). The features check the architecture the folder's config builds (context length,
    SigLIP's bias, the activation); float32 tolerance: another process, the same maths."""
    assert runs["fresh_code"] == 0, runs["fresh_log"][-3000:]
    reloaded = torch.load(runs["tmp"] / "features.pt")[method]
    trained = _weights(runs["straight"][method])
    assert _differing(trained, reloaded["weights"]) == [], method
    name = runs["model_flags"][method][1]
    context = 104 if method == "goal" else 32
    model, _, _, _ = common.create_backbone(name, None)
    if method == "goal":
        goal.stretch_text_positions(model, context, 8)
    model.load_state_dict(trained)
    model.eval()
    images, captions = runs["inputs"]
    tokenizer = common.tokenizer_for(name, context_length=context)
    with torch.no_grad():
        torch.testing.assert_close(reloaded["image"], model.encode_image(images))
        torch.testing.assert_close(reloaded["text"], model.encode_text(tokenizer(captions)))
    assert reloaded["context"] == context


if __name__ == "__main__":
    entry, argument = sys.argv[1], json.loads(sys.argv[2])
    {"torchrun-worker": _torchrun_worker, "killed-runs": _killed_runs}[entry](argument)
