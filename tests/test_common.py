"""Tests of common.py: distributed gather, resume, atomic checkpoints, export, the shipped base models."""
import argparse
import datetime
import json
import os

import open_clip
import pytest
import torch

import common
import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- distributed: 2 gloo processes with batch b == one process with batch 2b ---------------------------------
def _gathered_clip_loss(rank, world_size, image_emb, text_emb, scale):
    """Each rank takes its slice, gathers, computes the global loss, and returns its local gradients."""
    b = len(image_emb) // world_size
    local_image = image_emb[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    local_text = text_emb[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    all_image, all_text = common.gather_features(local_image), common.gather_features(local_text)
    loss = common.clip_loss(all_image, all_text, scale)
    loss.backward()
    return loss.item(), local_image.grad, local_text.grad


def test_gathered_clip_loss_equals_single_process():
    torch.manual_seed(0)
    image_emb = torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1)
    text_emb = torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1)
    results = common.run_cpu_processes(_gathered_clip_loss, 2, image_emb, text_emb, 14.3)
    single_image, single_text = image_emb.clone().requires_grad_(True), text_emb.clone().requires_grad_(True)
    single_loss = common.clip_loss(single_image, single_text, 14.3)
    single_loss.backward()
    for rank, (loss, grad_image, grad_text) in enumerate(results):
        assert loss == pytest.approx(single_loss.item(), abs=1e-12)
        torch.testing.assert_close(grad_image, single_image.grad[rank * 4:(rank + 1) * 4])
        torch.testing.assert_close(grad_text, single_text.grad[rank * 4:(rank + 1) * 4])


def test_accumulated_backward_gives_the_scalars_the_single_process_gradient():
    """Two DDP ranks simulated in one process: each rank's loss is the global CLIP loss on gathered features
    (its own half differentiable, the other half detached), DDP averages the ranks' gradients. After
    accumulated_backward the tower weights and the logit scale both hold the gradient of one process on the
    whole batch; without the division the logit scale's would be twice it."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(6, 4).double()
    logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    params = [encoder.weight, encoder.bias, logit_scale]
    images, texts = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)

    def gradients(world_size, rank=0):
        def encode(batch):
            return {"image": torch.nn.functional.normalize(encoder(batch["images"]), dim=-1),
                    "text": torch.nn.functional.normalize(encoder(batch["texts"]), dim=-1)}

        def loss_of(features, current):
            f = common.join_micro_batches(features, current)
            own = (torch.arange(8) // (8 // world_size) == rank)[:, None]   # this rank's rows of the gathered batch
            image_emb = torch.where(own, f["image"], f["image"].detach())
            text_emb = torch.where(own, f["text"], f["text"].detach())
            loss = common.clip_loss(image_emb, text_emb, logit_scale.exp())
            return loss, {"clip": loss.item()}

        for p in params:
            p.grad = None
        run = argparse.Namespace(world_size=world_size, scaler=None)
        common.accumulated_backward(run, [{"images": images, "texts": texts}], encode, loss_of,
                                    loss_scalars=[logit_scale])
        return [p.grad.clone() for p in params]

    single = gradients(1)
    ranks = [gradients(2, rank) for rank in range(2)]
    ddp = [(a + b) / 2 for a, b in zip(*ranks)]   # DDP's all-reduce average
    for name, got, want in zip(["weight", "bias", "logit_scale"], ddp, single):
        torch.testing.assert_close(got, want, msg=name)


def test_process_group_timeout_outlasts_rank_0s_evaluation(monkeypatch):
    """Under torchrun the process group gets --dist-timeout (default 4 hours), not torch's 30 minutes."""
    calls = []
    monkeypatch.setattr(common.dist, "init_process_group", lambda **kwargs: calls.append(kwargs["timeout"]))
    monkeypatch.setattr(common.dist, "destroy_process_group", lambda: None)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    parser = common.base_parser("test")
    for flags, minutes in (([], common.DIST_TIMEOUT_MINUTES), (["--dist-timeout", "600"], 600)):
        assert common.launch(lambda args: "ran", parser.parse_args(flags)) == "ran"
        assert calls.pop() == datetime.timedelta(minutes=minutes)
    assert common.DIST_TIMEOUT_MINUTES >= 240


def _first_pass_worker(rank, world_size, folder, fail):
    """Rank 0 writes a cache file inside main_process_first (or stops on bad input); each rank reports what it saw."""
    cache = os.path.join(folder, "cache.txt")
    try:
        with common.main_process_first():
            if rank == 0:
                if fail:
                    raise common.InputError("--lism missing.json: no such file")
                with open(cache, "w") as f:
                    f.write("built by rank 0")
            return ("read", open(cache).read())
    except SystemExit as error:     # the other ranks: told by rank 0, they leave with its exit code
        return ("exit", error.code)
    except common.InputError as error:
        return ("raised", str(error))


def test_main_process_first_orders_rank_0_before_the_others(tmp_path):
    """The spaCy caches (negatives, concepts) are built by rank 0 while the others wait, then read by them."""
    results = common.run_cpu_processes(_first_pass_worker, 2, str(tmp_path), False)
    assert results == [("read", "built by rank 0"), ("read", "built by rank 0")]
    with common.main_process_first():   # one process: just the block
        pass


def test_bad_input_on_rank_0_ends_the_others_with_its_exit_code(tmp_path):
    """Rank 0 stops on bad input inside the block (its error reaches the launcher, which prints it once); the other
    rank, waiting for it, leaves with exit code 2 instead of dying later in a collective."""
    results = common.run_cpu_processes(_first_pass_worker, 2, str(tmp_path), True)
    assert results == [("raised", "--lism missing.json: no such file"), ("exit", 2)]


# --- token helpers ---------------------------------------------------------------------------------------------
def test_token_features_match_open_clip_pooling():
    model, _, _, tokenizer = common.create_backbone(common.TINY_MODEL, None)
    model.eval()
    texts = tokenizer(["a red circle", "a small blue square to the left of a large green star"])
    pooled, tokens, pad_mask = common.encode_text_tokens(model, texts)
    torch.testing.assert_close(pooled, model.encode_text(texts))
    assert tokens.shape == (2, 32, 128) and pad_mask.sum(1).tolist() == [5, 14]   # SOT + words + EOT
    eot = texts.argmax(-1)
    torch.testing.assert_close(tokens[torch.arange(2), eot], pooled)
    images = torch.randn(2, 3, 64, 64)
    pooled_image, patches = common.encode_image_tokens(model, images)
    torch.testing.assert_close(pooled_image, model.encode_image(images))
    assert patches.shape == (2, 64, 128)
    assert model.visual.output_tokens is False     # the switch is restored


def test_trimmed_text_padding_gives_the_same_features():
    """Dropping the all-padding columns (what the base build does) changes nothing under the causal mask."""
    model, _, _, tokenizer = common.create_backbone(common.TINY_MODEL, None)
    model.eval()
    texts = tokenizer(["red circle small", "a small blue square to the left of a large green star"])
    trimmed = common.trim_padding(texts)
    assert trimmed.shape == (2, 14)
    pooled, tokens, pad_mask = common.encode_text_tokens(model, trimmed)
    torch.testing.assert_close(pooled, model.encode_text(texts))
    full_tokens = common.encode_text_tokens(model, texts)[1]
    torch.testing.assert_close(tokens, full_tokens[:, :14])


def test_tiny_model_is_an_open_clip_name():
    common.register_tiny_model()
    assert common.TINY_MODEL in open_clip.list_models()
    assert open_clip.get_tokenizer(common.TINY_MODEL).context_length == 32
    with pytest.raises(ValueError, match="unknown model"):
        common.create_backbone("ViT-Nonexistent-1", None)


# --- training utilities -----------------------------------------------------------------------------------------
def test_optimizer_groups_and_schedule():
    model, _, _, _ = common.create_backbone(common.TINY_MODEL, None)
    optimizer = common.make_optimizer(model, lr=1.0, wd=0.1)
    no_decay, decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.1
    assert any(p is model.logit_scale for p in no_decay["params"])
    assert all(p.ndim >= 2 for p in decay["params"])
    scheduler = common.cosine_schedule(optimizer, warmup=2, total=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0]) and lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.2


def test_gpus_beyond_machine_is_a_clear_error():
    args = argparse.Namespace(gpus=torch.cuda.device_count() + 8)
    with pytest.raises(SystemExit, match="GPUs but this machine has"):
        common.launch(lambda a: None, args)


# --- resume: interrupted + resumed == uninterrupted -------------------------------------------------------------
class _Interrupt(Exception):
    pass


def _tiny_training(out, steps=6, resume=None, interrupt_after=None, save_every=2):
    """A minimal CLIP fine-tuning loop built from common's pieces (what every method's train() does)."""
    parser = common.base_parser("test")
    args = parser.parse_args(["--out", str(out), "--steps", str(steps), "--seed", "3", "--no-progress"]
                             + (["--resume", str(resume)] if resume else []))
    common.apply_defaults(args, {"shapes": {"batch_size": 8, "save_every": save_every}, "real": {}})
    run = common.Run(args, method="test")
    model, _, val_tf, tokenizer = common.create_backbone(common.TINY_MODEL, None)
    torch.manual_seed(0)   # same initial weights for every call
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.ndim >= 2 else None
    dataset = data.ShapesDataset("train", size=40, seed=0, transform=val_tf)
    optimizer = common.make_optimizer(model, lr=1e-3, wd=0.1)
    scheduler = common.cosine_schedule(optimizer, warmup=2, total=steps)
    ema = common.EMA(model, decay=0.9)
    start, extra = common.resume(run, model, optimizer, scheduler, ema)
    collate = lambda b: {"images": torch.stack([s["image"] for s in b]), "texts": tokenizer([s["caption"] for s in b])}
    for step, epoch, batch in common.batch_stream(dataset, collate, 8, args.seed, start, steps, workers=0):
        image_emb = model.encode_image(batch["images"], normalize=True)
        text_emb = model.encode_text(batch["texts"], normalize=True)
        loss = common.clip_loss(image_emb, text_emb, model.logit_scale.exp())
        common.check_finite(loss, {"clip": loss.item()}, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        common.clamp_logit_scale(model)
        ema.update(model)
        if (step + 1) % args.save_every == 0:
            common.save_checkpoint(run, step + 1, model, optimizer, scheduler, ema, extra={"seen": step + 1})
        if interrupt_after is not None and step + 1 == interrupt_after:
            raise _Interrupt
    common.save_checkpoint(run, steps, model, optimizer, scheduler, ema, extra={"seen": steps})   # as train() does
    run.close()
    return model, ema


def test_resume_matches_uninterrupted_run(tmp_path):
    reference, reference_ema = _tiny_training(tmp_path / "a")
    with pytest.raises(_Interrupt):
        _tiny_training(tmp_path / "b", interrupt_after=5)      # last checkpoint at step 4: one step is redone
    resumed, resumed_ema = _tiny_training(tmp_path / "b", resume=tmp_path / "b")
    for (name, p), q in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(reference_ema.module.parameters(), resumed_ema.module.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("save_every, steps_written", [(2, [2, 4, 6]), (4, [4, 6])])
def test_final_checkpoint_is_written_once(tmp_path, monkeypatch, save_every, steps_written):
    """The final save after a periodic save at the last step does not write the same checkpoint again."""
    written, save = [], common._atomic_torch_save
    monkeypatch.setattr(common, "_atomic_torch_save", lambda state, path: (written.append(state["step"]),
                                                                          save(state, path)))
    _tiny_training(tmp_path / "a", save_every=save_every)
    assert written == steps_written


def test_resume_refuses_another_methods_folder(tmp_path):
    _tiny_training(tmp_path / "a", steps=2)
    with pytest.raises(SystemExit, match="written by 'test', not 'degla'"):
        common.load_checkpoint(str(tmp_path / "a"), "degla")


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    common._atomic_torch_save({"step": 1, "weights": torch.ones(3)}, str(path))

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt   # the process is interrupted in the middle of the write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        common._atomic_torch_save({"step": 2, "weights": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    state = torch.load(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]     # no temporary file left behind


def test_non_finite_loss_names_step_and_terms():
    with pytest.raises(FloatingPointError, match=r"step 7.*clip=nan"):
        common.check_finite(torch.tensor(float("nan")), {"clip": float("nan"), "extra": 0.5}, 7)


# --- export -----------------------------------------------------------------------------------------------------
def test_exported_weights_load_with_plain_open_clip(tmp_path):
    model, _, _, tokenizer = common.create_backbone(common.TINY_MODEL, None)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    path = str(tmp_path / "final.pt")
    common.export_open_clip(model, path, meta={"method": "test"})
    loaded = open_clip.create_model(common.TINY_MODEL, pretrained=path)
    model.eval(), loaded.eval()
    images, texts = torch.randn(2, 3, 64, 64), tokenizer(["a red circle", "a blue star"])
    torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images))
    torch.testing.assert_close(loaded.encode_text(texts), model.encode_text(texts))
    assert loaded.logit_scale.item() == pytest.approx(3.0)


# --- the shipped base models and their recipe --------------------------------------------------------------
@pytest.mark.parametrize("name", [common.TINY_MODEL, common.SHAPES_SIGLIP_MODEL])
def test_shipped_base_loads_fp32_and_matches_its_sidecar(name):
    path = common.shapes_base_path(name)
    with open(path[:-3] + ".json") as f:
        sidecar = json.load(f)
    assert sidecar["sha256"] == common._sha256(path) and sidecar["model"] == name
    assert os.path.getsize(path) <= 16_000_000                       # the shipped files stay small: at most 16 MB each
    assert {"command", "seed", "steps", "train_seconds", "recipe_commit", "shapes_suite"} <= set(sidecar)
    model, _, _, tokenizer = common.create_backbone(name, "shapes")
    assert all(p.dtype == torch.float32 for p in model.parameters())  # stored fp16, loaded fp32
    assert (getattr(model, "logit_bias", None) is not None) == (name == common.SHAPES_SIGLIP_MODEL)
    assert tokenizer(["a red circle"]).shape == (1, 32)               # CLIP's BPE tokenizer, offline


def test_corrupt_shipped_base_names_the_file_and_the_rebuild_command(tmp_path, monkeypatch):
    for suffix in (".pt", ".json"):
        source = common.shipped_base_path("clip")[:-3] + suffix
        with open(source, "rb") as f, open(tmp_path / os.path.basename(source), "wb") as g:
            g.write(f.read())
    monkeypatch.setattr(common, "MODELS_DIR", str(tmp_path))
    assert common.shapes_base_path() == common.shipped_base_path("clip")
    with open(common.shipped_base_path("clip"), "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(common.InputError, match=r"shapes-tiny-vit-shapes-base\.pt does not match.*"
                                                r"python -m lab\.base_models --arch clip"):
        common.create_backbone(common.TINY_MODEL, "shapes")
    os.remove(common.shipped_base_path("clip"))
    with pytest.raises(common.InputError, match="missing"):
        common.shapes_base_path()
    with pytest.raises(common.InputError, match="exists only for"):
        common.shapes_base_path("ViT-B-32")


def test_slurm_tasks_map_to_torchrun_variables():
    """`srun` with one task per GPU: SLURM's rank variables become torchrun's; torchrun's own win; one task is not
    distributed; several tasks without MASTER_ADDR stop with the line to add to the job script."""
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "MASTER_ADDR": "node01"}
    assert common.slurm_environment(slurm) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_PORT": "29500"}
    assert common.slurm_environment({**slurm, "RANK": "0"}) is None
    assert common.slurm_environment({**slurm, "SLURM_NTASKS": "1"}) is None
    assert common.slurm_environment({}) is None
    with pytest.raises(SystemExit, match="MASTER_ADDR"):
        common.slurm_environment({k: v for k, v in slurm.items() if k != "MASTER_ADDR"})


def test_config_records_the_code_and_library_versions(tmp_path):
    """A run's config.json says which commit and which torch / open_clip / spaCy made it."""
    args = common.base_parser("test").parse_args(["--out", str(tmp_path / "run"), "--no-progress"])
    common.apply_defaults(args, {"shapes": {}, "real": {}})
    run = common.Run(args, method="test")
    run.progress(total=1)
    run.close()
    code = json.loads((tmp_path / "run" / "config.json").read_text())["code"]
    assert code["torch"] == torch.__version__.split("+")[0] and code["open_clip_torch"] == open_clip.__version__
    assert code["spacy"] and code["commit"]


def _run_with_tensorboard(out):
    args = common.base_parser("test").parse_args(["--out", str(out), "--no-progress", "--report-to", "tensorboard"])
    common.apply_defaults(args, {"shapes": {}, "real": {}})
    return common.Run(args, method="test")


def test_report_to_tensorboard_mirrors_every_logged_value(tmp_path):
    """--report-to tensorboard: each value of log.jsonl is also a TensorBoard scalar series, step for step."""
    pytest.importorskip("tensorboard")   # an optional dependency, not in requirements.txt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = _run_with_tensorboard(tmp_path / "run")
    run.progress(total=2)
    run.log(0, 8, loss=1.5, lr=1e-3)
    run.log(1, 8, loss=1.25, lr=2e-3)
    run.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for name in ("loss", "lr", "samples_per_s"):
        series = {e.step: e.value for e in events.Scalars(f"test/{name}")}
        assert series == pytest.approx({r["step"]: r[name] for r in logged if name in r}), name


def test_report_to_tensorboard_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
    real_find_spec = common.importlib.util.find_spec
    monkeypatch.setattr(common.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    with pytest.raises(common.InputError, match="pip install tensorboard"):
        _run_with_tensorboard(tmp_path / "run")
    assert not (tmp_path / "run").exists()   # stopped before the run folder was made


def test_grad_checkpointing_gives_the_same_gradients():
    """--grad-checkpointing is open_clip's own switch (`set_grad_checkpointing`): the towers recompute their
    activations in the backward pass, and every gradient is that of the ordinary backward pass."""
    common.register_tiny_model()
    torch.manual_seed(0)
    model = open_clip.create_model(common.TINY_MODEL).double()
    images, texts = torch.randn(4, 3, 64, 64, dtype=torch.float64), torch.randint(1, 400, (4, 32))
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad(set_to_none=True)
        image_emb, text_emb, scale = model(images, texts)[:3]
        common.clip_loss(image_emb, text_emb, scale).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["degla", "cehn", "c2lip", "goal"])
def test_grad_checkpointing_flag_reaches_the_model(method, tmp_path, monkeypatch):
    """Each script turns open_clip's switch on with --grad-checkpointing; it is off by default."""
    import importlib
    module = importlib.import_module(method)
    seen = []
    monkeypatch.setattr(module, "common", common)
    real = common.create_backbone

    def recording(*args, **kwargs):
        model, *rest = real(*args, **kwargs)
        original = model.set_grad_checkpointing
        model.set_grad_checkpointing = lambda enable=True: (seen.append(enable), original(enable))
        return (model, *rest)

    monkeypatch.setattr(common, "create_backbone", recording)
    module.train(module.parse_args(["--steps", "1", "--batch-size", "2", "--train-size", "4", "--eval", "",
                                    "--grad-checkpointing", "--no-progress", "--save-every", "0", "--out",
                                    str(tmp_path / "run")]))
    assert seen == [True]
    assert module.parse_args([]).grad_checkpointing is False   # off unless asked for


def test_keep_epochs_keeps_each_epochs_weights_beside_the_latest_checkpoint(tmp_path):
    """--keep-epochs: 8 steps over 16 scenes in batches of 4, i.e. 2 epochs of 4 steps, leave epoch-1.pt and epoch-2.pt in final.pt's format
    (open_clip loads them with pretrained=FILE); the last epoch's weights are final.pt's; checkpoint.pt stays the one
    resumable state."""
    import degla
    out = tmp_path / "run"
    degla.train(degla.parse_args(["--steps", "8", "--train-size", "16", "--batch-size", "4", "--keep-epochs",
                                  "--baseline", "plain", "--eval", "", "--save-every", "0", "--no-progress",
                                  "--out", str(out)]))
    assert sorted(p.name for p in out.glob("epoch-*.pt")) == ["epoch-1.pt", "epoch-2.pt"]
    first = torch.load(out / "epoch-1.pt", weights_only=True)
    last = torch.load(out / "epoch-2.pt", weights_only=True)
    final = torch.load(out / "final.pt", weights_only=True)["state_dict"]
    assert first["meta"]["step"] == 4 and last["meta"]["step"] == 8
    assert all(torch.equal(last["state_dict"][k], final[k]) for k in final)
    assert not all(torch.equal(first["state_dict"][k], final[k]) for k in final)   # training went on after epoch 1
    model = open_clip.create_model(common.TINY_MODEL, pretrained=str(out / "epoch-1.pt"))
    assert torch.equal(model.state_dict()["logit_scale"], first["state_dict"]["logit_scale"])
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 8
