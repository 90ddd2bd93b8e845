"""Shared plumbing for the four method scripts: backbone, EMA, distributed, training utilities, checkpoints.

Read a method script first (degla.py is a good start); come here when it calls `common.something`.
Everything in this file is used by at least two methods; method-specific math stays in the method files.

Sections
  1. Backbone: open_clip models, the tiny `shapes-tiny-vit` / `shapes-tiny-siglip` configs, per-token features.
  2. The shapes base models (`pretrained="shapes"`): tiny CLIP and SigLIP shipped in models/ (recipe: lab/).
  3. EMA teacher.
  4. Distributed: `launch`, `gather_features`, rank helpers, `run_cpu_processes` (tests).
  5. Training utilities: arguments, optimizer, schedule, precision, seeding, logging, the data stream.
  6. Checkpoints: atomic save, resume, export as an open_clip model folder (`local-dir:RUN_FOLDER`); transformers
     CLIP in and out (`load_hf_clip` for `hf-clip:FOLDER`, `export_hf_clip` for eval.py --export-hf).

The skeleton every method's `train(args)` follows (`eval` is imported as `evaluation`; see degla.py for the real
thing, and `main(argv)` is `common.launch(train, parse_args(argv))`):

    evaluation.check_benchmarks(args.eval, args.eval_root)       # bad input stops before anything is built
    run = common.Run(args, method="degla")                       # device, rank, out dir, logger, seeds
    model, train_tf, val_tf, tokenizer = common.create_backbone(args.model, args.pretrained, device=run.device)
    dataset = data.build_train_set(args, train_tf, tokenizer)    # shapes world or COCO, same sample dicts
    before = evaluation.evaluate(model, tokenizer, val_tf, args.eval, root=args.eval_root, device=run.device)
    total = run.total_steps(len(dataset))                        # --steps, or --epochs over the data
    ema = common.EMA(model, args.ema_decay)                      # DeGLA's teacher; the others pass no EMA
    optimizer = common.make_optimizer(model, args.lr, args.wd, args.betas, args.eps)
    scheduler = common.cosine_schedule(optimizer, args.warmup, total)
    start, extra = common.resume(run, model, optimizer, scheduler, ema)   # (0, {}) without --resume
    run.progress(total, initial=start)
    collate = common.split_collate(collate, args.accum_freq)      # --accum-freq K: K micro-batches per step
    for step, epoch, micro_batches in common.batch_stream(dataset, collate, args.batch_size * args.accum_freq,
                                                          args.seed, start, total, args.workers):
        optimizer.zero_grad(set_to_none=True)
        loss, parts = common.accumulated_backward(             # K = 1: one forward, one backward
            run, micro_batches,
            encode=lambda mb: forward(mb),                        # forward passes under run.autocast()
            loss_of=lambda features, j: method_loss(gathered(join_micro_batches(features, j))),  # loss in fp32
            loss_scalars=[model.logit_scale], step=step)          # why the scalars: there
        common.optimizer_step(run, optimizer)
        scheduler.step()
        common.clamp_logit_scale(model)                           # not GOAL, which never clamps
        ema.update(model)
        run.log(step, run.global_batch, **parts)
        if run.should_save(step + 1):                             # every --save-every steps (and epoch ends)
            common.save_checkpoint(run, step + 1, model, optimizer, scheduler, ema=ema, extra={...})
    common.save_checkpoint(run, total, model, optimizer, scheduler, ema=ema)
    run.close()
    after = evaluation.evaluate(model, tokenizer, val_tf, args.eval, root=args.eval_root, device=run.device)
    common.export_open_clip(model, os.path.join(run.out, "final.pt"), args.model, tokenizer)
    evaluation.write_results(run.out, before, after)
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import pickle
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from urllib.parse import urlparse

import huggingface_hub.constants
import numpy as np
import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.multiprocessing as mp
from open_clip.push_to_hf_hub import save_config_for_hf
from tqdm import tqdm

import data


class InputError(ValueError):
    """Bad input from the user (unknown model name, impossible flag combination, ...). `launch` turns it, and
    every exception marked `user_error = True` (data.DataError, eval.BenchmarkDataError), into one clear
    message and a non-zero exit instead of a traceback."""
    user_error = True


# =====================================================================================================
# 1. Backbone
# =====================================================================================================
TINY_MODEL = "shapes-tiny-vit"
SHAPES_SIGLIP_MODEL = "shapes-tiny-siglip"   # its SigLIP twin (below)
TINY_MODEL_CONFIG = {
    # A CLIP small enough to train from scratch on 2 CPU cores in minutes, big enough to see 1-4 shapes:
    # 64 px images cut into an 8x8 grid of 8 px patches, 3 transformer layers per tower, 32 text tokens.
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "head_width": 32, "mlp_ratio": 4.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
# Its SigLIP twin (C2LIP fine-tunes SigLIP): the same towers, plus SigLIP's learned logit bias, initialised as in
# the SigLIP paper (t' = log 10, b = -10; open_clip's SigLIP configs set init_logit_bias the same way). open_clip
# then builds it as its CLIP class with a `logit_bias`, which is what open_clip's SigLipLoss and c2lip.py read.
TINY_SIGLIP_CONFIG = {**TINY_MODEL_CONFIG, "init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}
TINY_MODELS = {TINY_MODEL: TINY_MODEL_CONFIG, SHAPES_SIGLIP_MODEL: TINY_SIGLIP_CONFIG}
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
# An exported run folder is an open_clip model folder (`export_open_clip`): these are the names `local-dir:` reads.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"


def register_tiny_model():
    """Make `shapes-tiny-vit` and `shapes-tiny-siglip` model names open_clip itself knows (create_model,
    list_models).

    open_clip has no public dict-registration API; `add_model_config(dir)` rescans a folder of JSON configs, so
    we keep the configs in `model_configs/` next to this file (written from TINY_MODELS if absent)."""
    if all(name in open_clip.list_models() for name in TINY_MODELS):
        return
    for name, config in TINY_MODELS.items():
        path = os.path.join(_CONFIG_DIR, name + ".json")
        if not os.path.exists(path):
            os.makedirs(_CONFIG_DIR, exist_ok=True)
            _atomic_write_text(path, json.dumps(config, indent=2))
    open_clip.add_model_config(_CONFIG_DIR)


def tokenizer_for(name, context_length=None):
    """open_clip's tokenizer for model `name`. The tiny SigLIP uses CLIP's BPE tokenizer, like its CLIP twin:
    open_clip picks its (downloaded) SigLIP tokenizer for every model name containing 'siglip', so we ask for
    the twin's tokenizer by name (`open_clip.get_tokenizer('shapes-tiny-vit')` in your own code).
    A transformers CLIP folder (`hf-clip:FOLDER`) uses CLIP's BPE, with its max_position_embeddings as context."""
    if name.startswith(HF_CLIP_PREFIX):
        text_config = _hf_config_json(hf_clip_folder(name)).get("text_config", {})
        context_length = context_length or text_config.get("max_position_embeddings", 77)
        return open_clip.SimpleTokenizer(context_length=context_length)
    return open_clip.get_tokenizer(TINY_MODEL if name == SHAPES_SIGLIP_MODEL else name, context_length=context_length)


def create_backbone(name=TINY_MODEL, pretrained="shapes", device="cpu", context_length=None, **model_kwargs):
    """Model, train transform, val transform and tokenizer, all through open_clip.

    name: an open_clip model name, or 'local-dir:FOLDER' (a finished run folder, see `export_open_clip`), which
    brings its own config and weights, so `pretrained` is then ignored, or 'hf-clip:FOLDER' (a transformers CLIP
    folder, see `load_hf_clip`; `pretrained` may then name a CLIPModel state dict file, such as GOAL's weights).
    pretrained: an open_clip tag ('openai', needs the internet), a path to weights, None (random init) or
    'shapes' (the base model shipped in models/ for `shapes-tiny-vit` or `shapes-tiny-siglip`; see
    `shapes_base_path`).
    """
    register_tiny_model()
    if name.startswith(HF_CLIP_PREFIX):   # a transformers CLIP folder, converted to open_clip (`load_hf_clip`)
        return _hf_clip_backbone(name, pretrained, device, context_length, model_kwargs)
    if name.startswith("local-dir:"):   # a model folder (e.g. a run folder) brings its own config and weights
        folder = name[len("local-dir:"):]
        if not os.path.isfile(os.path.join(folder, OPEN_CLIP_CONFIG)):
            raise InputError(f"--model {name}: no {OPEN_CLIP_CONFIG} in {folder} (a run folder has one once the "
                             f"run has finished and exported final.pt)")
        pretrained = None
    elif name.startswith("hf-hub:"):
        pretrained = None
    elif name not in open_clip.list_models():
        raise InputError(f"unknown model {name!r}: expected an open_clip model name such as {TINY_MODEL!r}, "
                         f"'ViT-B-32-quickgelu' or 'ViT-B-16' (see open_clip.list_models()), local-dir:RUN_FOLDER "
                         f"or hf-clip:TRANSFORMERS_CLIP_FOLDER")
    _check_exported_context(name, pretrained, model_kwargs.get("text_cfg"))
    if pretrained == "shapes":
        pretrained = shapes_base_path(name)
    elif pretrained in ("", "none", "None"):
        pretrained = None
    is_file = pretrained is not None and os.path.isfile(str(pretrained))
    if pretrained and not is_file and not name.startswith(("hf-hub:", "local-dir:")) \
            and not open_clip.pretrained.is_pretrained_cfg(name, pretrained):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        what = "a folder, not a weights file (a run's weights are its final.pt; a finished run folder loads as " \
            f"--model local-dir:{pretrained})" if os.path.isdir(str(pretrained)) else "no such file"
        raise InputError(f"--pretrained {pretrained}: {what}, and not a pretrained tag of {name!r} (its tags: "
                         f"{tags}; 'shapes' for the shipped tiny models, 'none' for a random init)")
    _check_activation(name, pretrained, is_file, model_kwargs)
    offline = pretrained and not is_file and not _hub_reachable()
    try:
        if offline:   # no network: read the Hugging Face cache only, instead of ~50 s of download retries
            was_offline, huggingface_hub.constants.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE, True
        model, train_tf, val_tf = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, **model_kwargs)
    except pickle.UnpicklingError as error:   # torch's weights-only loader refuses anything but plain weights
        raise InputError(_not_weights_message(str(pretrained), error)) from None
    except RuntimeError as error:
        reason = "huggingface.co is not reachable and the weights are not in the local cache" if offline \
            else str(error).splitlines()[0]
        if pretrained and not is_file:
            raise InputError(f"could not load pretrained weights {pretrained!r} for {name!r}: a tag is downloaded on "
                             f"first use, so it needs the internet once (or a filled open_clip / Hugging Face cache); "
                             f"or pass a weights file. ({reason})") from None
        raise
    finally:
        if offline:
            huggingface_hub.constants.HF_HUB_OFFLINE = was_offline
    tokenizer = tokenizer_for(name, context_length=context_length)
    return model, train_tf, val_tf, tokenizer


def _hf_clip_backbone(name, pretrained, device, context_length, model_kwargs):
    """`create_backbone` for 'hf-clip:FOLDER': the folder's weights converted to open_clip (`load_hf_clip`), or
    those of `pretrained` where it is a file (a CLIPModel state dict: GOAL's released weights); '', 'none' and
    'shapes' (the method scripts' default) mean the folder's own. Transforms as open_clip builds them, from the
    model's preprocessing config; CLIP's BPE tokenizer with the model's text context."""
    if model_kwargs:
        raise InputError(f"--model {name}: --model-kwargs do not apply to a transformers CLIP folder (its "
                         f"config.json sets the architecture)")
    weights = None if pretrained in (None, "", "none", "None", "shapes") else str(pretrained)
    if weights is not None and not os.path.isfile(weights):
        raise InputError(f"--pretrained {weights}: no such file (with --model {name}, --pretrained is optional: a "
                         f"transformers CLIPModel state dict file that replaces the folder's weights)")
    model = load_hf_clip(hf_clip_folder(name), weights).to(device)
    preprocess = open_clip.transform.PreprocessCfg(**model.visual.preprocess_cfg)
    train_tf = open_clip.transform.image_transform_v2(preprocess, is_train=True)
    val_tf = open_clip.transform.image_transform_v2(preprocess, is_train=False)
    return model, train_tf, val_tf, tokenizer_for(name, context_length=context_length or model.context_length)


def _hub_reachable(timeout=3.0):
    """Whether huggingface.co (where open_clip's pretrained tags live) answers a TCP connection within `timeout`
    seconds. HF_ENDPOINT, if set, is what is probed."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _check_exported_context(name, pretrained, text_cfg=None):
    """A run's final.pt loaded under a model name whose context is shorter than the trained one (GOAL's stretch)
    would have its positions interpolated back by open_clip without an error: refuse, and name the folder.
    text_cfg: a replacement text config given to open_clip (eval.py --model-kwargs), which sets the context."""
    if not pretrained or not os.path.isfile(str(pretrained)) or name.startswith(("hf-hub:", "local-dir:")):
        return
    folder = os.path.dirname(os.path.abspath(str(pretrained)))
    sidecar = os.path.join(folder, OPEN_CLIP_CONFIG)
    if not os.path.isfile(sidecar):
        return
    with open(sidecar) as f:
        trained = json.load(f)["model_cfg"]["text_cfg"].get("context_length")
    named = (text_cfg or open_clip.get_model_config(name)["text_cfg"]).get("context_length")
    if trained != named:
        raise InputError(f"--pretrained {pretrained} was trained with a text context of {trained} tokens, {name!r} "
                         f"has {named}: open_clip would cut the trained positions down. Load the run folder "
                         f"instead: --model local-dir:{folder}")


def _builds_quick_gelu(name, model_kwargs):
    """Whether open_clip builds model `name` with QuickGELU: its config's `quick_gelu`, unless the keyword
    arguments given to open_clip (force_quick_gelu, or a quick_gelu override) say otherwise."""
    if model_kwargs.get("force_quick_gelu"):
        return True
    config = open_clip.get_model_config(name) or {}
    return bool(model_kwargs.get("quick_gelu", config.get("quick_gelu", False)))


def _is_torchscript_archive(path):
    """A TorchScript archive (torch.jit.save) is a zip with a constants.pkl record: the test torch.load makes
    itself (torch.serialization._is_torchscript_zip). OpenAI's original checkpoints (ViT-B-32.pt, ...) are ones."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(record.split("/")[-1] == "constants.pkl" for record in archive.namelist())


def _recorded_activation(path):
    """What this project recorded about the activation the weights file `path` was trained with:
    (quick_gelu, trained model name or None, where it was read), or None when nothing was recorded.

    Read in this order, the first record found wins:
      1. the file itself: `export_open_clip` writes the model name into the meta of final.pt, so a copied
         final.pt still says what it is;
      2. open_clip_config.json next to it (an exported run folder): the very config `local-dir:` builds;
      3. config.json next to it (a run folder, also unfinished ones: its --model);
      4. NAME.json next to NAME.pt (the shipped base models in models/ and their sidecars).
    """
    def activation_of(model_name, where):
        config = open_clip.get_model_config(model_name) if isinstance(model_name, str) else None
        return None if config is None else (bool(config.get("quick_gelu", False)), model_name, where)

    if zipfile.is_zipfile(path):   # torch.save's format; other files (safetensors, ...) carry no meta
        try:   # mmap: only the small pickle is read, not the weights
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:   # not a weights file we can read: open_clip's loader reports it, with its own message
            saved = None
        meta = saved.get("meta") if isinstance(saved, dict) else None
        found = activation_of(meta.get("model"), f"its meta ({path})") if isinstance(meta, dict) else None
        if found:
            return found
    folder = os.path.dirname(os.path.abspath(path))
    exported = os.path.join(folder, OPEN_CLIP_CONFIG)
    if os.path.isfile(exported):
        with open(exported) as f:
            model_cfg = json.load(f).get("model_cfg", {})
        return bool(model_cfg.get("quick_gelu", False)), None, exported
    for sidecar, needs in ((os.path.join(folder, "config.json"), "method"), (os.path.splitext(path)[0] + ".json", None)):
        if os.path.isfile(sidecar):
            with open(sidecar) as f:
                record = json.load(f)
            if isinstance(record, dict) and (needs is None or needs in record):
                found = activation_of(record.get("model"), sidecar)
                if found:
                    return found
    return None


def _check_activation(name, pretrained, is_file, model_kwargs):
    """Refuse weights trained with one activation loaded into a config with the other (QuickGELU vs GELU).

    OpenAI's CLIP weights were trained with QuickGELU; open_clip's `ViT-B-32` config uses GELU and
    `ViT-B-32-quickgelu` QuickGELU. The weights have the same shapes either way, so they load without an error
    and every score comes out silently wrong: the most repeated complaint in the ARO and SugarCrepe issue
    trackers. Detected where it can be told reliably:
      - a pretrained tag: open_clip 3.3 records each tag's activation (pretrained.py, quick_gelu=True for
        'openai' and others) but create_model only warns on a mismatch (factory.py, "QuickGELU mismatch") and
        loads the weights anyway, so we stop;
      - a file this project wrote (`_recorded_activation`);
      - a TorchScript archive: open_clip treats one as OpenAI's original checkpoint and builds it with QuickGELU
        (openai.py, load_openai_model); its create_model cannot read one at all (torch's weights-only loader
        refuses TorchScript), so such a file stops here whatever the config.
    `local-dir:` and `hf-hub:` models bring their config with their weights: nothing to compare."""
    if not pretrained or name.startswith(("hf-hub:", "local-dir:")):
        return
    builds_quick = _builds_quick_gelu(name, model_kwargs)
    trained_name, folder_hint = None, ""
    if not is_file:
        trained_quick = bool(open_clip.pretrained.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
        trained = lambda act: f"--pretrained {pretrained} (an open_clip tag) was trained with {act}"
    elif _is_torchscript_archive(pretrained):
        if builds_quick:
            raise InputError(f"--pretrained {pretrained} is a TorchScript archive (OpenAI's original checkpoint "
                             f"format), which open_clip's create_model does not load. The same weights come with "
                             f"the tag: --model {name} --pretrained openai (or, in Python, "
                             f"open_clip.load_openai_model({str(pretrained)!r}))")
        trained_quick = True
        trained = lambda act: f"--pretrained {pretrained} is a TorchScript archive, OpenAI's original checkpoint " \
            f"format, whose weights were trained with {act}"
    else:
        recorded = _recorded_activation(str(pretrained))
        if recorded is None:
            return   # a file from elsewhere that records nothing: open_clip's config is all there is to go by
        trained_quick, trained_name, where = recorded
        as_name = f" as {trained_name!r}" if trained_name else ""
        trained = lambda act: f"--pretrained {pretrained} was trained{as_name} with {act} (recorded in {where})"
        if os.path.basename(where) == OPEN_CLIP_CONFIG:
            folder_hint = f", or load the run folder as it was trained: --model local-dir:{os.path.dirname(where)}"
    if trained_quick == builds_quick:
        return
    if trained_quick:   # the usual case: OpenAI-style weights into a GELU config
        fix = trained_name or (name + "-quickgelu" if name + "-quickgelu" in open_clip.list_models() else None)
        fix = f"--model {fix}" if fix else "a -quickgelu model config (or force_quick_gelu=True in open_clip)"
        raise InputError(trained("QuickGELU") + f", but --model {name} uses GELU: the weights would run "
                         f"with the wrong activation and every score would be off. Use the -quickgelu config: "
                         f"{fix}{folder_hint}")
    base = name[:-len("-quickgelu")] if name.endswith("-quickgelu") else None
    fix = trained_name or (base if base in open_clip.list_models() else None)
    fix = f"--model {fix}" if fix else "a model config without quick_gelu"
    raise InputError(trained("GELU") + f", but --model {name} uses QuickGELU (a -quickgelu config, made "
                     f"for OpenAI-style weights): the weights would run with the wrong activation. Use the GELU "
                     f"config: {fix}{folder_hint}")


def _not_weights_message(path, error):
    """Why a --pretrained file did not load, and what to do: a run's checkpoint.pt is a training checkpoint (weights,
    optimizer, RNG state; `torch.load` refuses its numpy/Python objects without weights_only=False), its final.pt
    is the open_clip weights file."""
    folder = os.path.dirname(os.path.abspath(path))
    method = None
    if os.path.exists(os.path.join(folder, "config.json")):
        with open(os.path.join(folder, "config.json")) as f:
            method = json.load(f).get("method")
    if method is None and os.path.basename(path) != "checkpoint.pt":
        return (f"--pretrained {path}: not a weights file open_clip can load (torch's weights-only loader refused "
                f"it: {str(error).splitlines()[-1][:200]})")
    final = os.path.join(folder, "final.pt")
    return (f"--pretrained {path} is a training checkpoint (model, optimizer and RNG state, read by --resume), not "
            f"open_clip weights. To evaluate the run use its exported weights: --pretrained {final}"
            + ("" if os.path.exists(final) else " (not written yet: the run has not finished)")
            + f". To continue training: python {method or '<method>'}.py --resume {folder}")


def encode_image_tokens(model, images):
    """Global image embedding and per-patch embeddings in the joint space (neither normalized).

    open_clip's VisionTransformer returns patch tokens after ln_post but before the projection (open_clip
    src/open_clip/transformer.py, `VisionTransformer.forward` and `_pool` with output_tokens), so we switch
    `output_tokens` on around our own call and project the tokens with `visual.proj`.
    Returns pooled (B, D) and patch_emb (B, P, D) with P = grid cells (no class token)."""
    visual = model.visual
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(images)
    finally:
        visual.output_tokens = previous
    if visual.proj is None:
        raise ValueError("encode_image_tokens needs a CLIP-style vision tower with a projection (visual.proj)")
    return pooled, tokens @ visual.proj


def encode_text_tokens(model, texts):
    """Global text embedding, per-token embeddings in the joint space, and a mask of real tokens.

    open_clip's `CLIP` ignores `output_tokens` for text, so we rerun its text path: token + position embedding,
    causal transformer, ln_final, then the projection on every position. The pooled vector is taken exactly as
    `encode_text` takes it (the EOT token), so pooled == model.encode_text(texts).
    texts may be cut to fewer columns than the context (`trim_padding`): under the causal mask the result is the
    same on the kept columns.
    Returns pooled (B, D), token_emb (B, L, D), pad_mask (B, L) bool: True where the token is real (SOT..EOT)."""
    if not hasattr(model, "token_embedding"):
        raise ValueError("encode_text_tokens supports open_clip `CLIP` models (text tower unpacked on the model)")
    cast_dtype = model.transformer.get_cast_dtype()
    length = texts.shape[1]   # may be shorter than the context (see `trim_padding`)
    x = model.token_embedding(texts).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length] if model.attn_mask is not None else None)
    x = model.ln_final(x)
    pooled = open_clip.transformer.text_global_pool(x, texts, model.text_pool_type,
                                                    eos_token_id=getattr(model, "text_eos_id", None))
    projection = model.text_projection
    project = projection if isinstance(projection, torch.nn.Linear) else (lambda t: t @ projection)
    eot_position = texts.argmax(dim=-1)
    positions = torch.arange(texts.shape[1], device=texts.device)
    pad_mask = positions[None, :] <= eot_position[:, None]
    return project(pooled), project(x), pad_mask


def trim_padding(texts):
    """Drop the columns after the longest text of the batch (pad id 0). For causal text towers (open_clip's CLIP)
    this changes no result, since no real token attends to a later position; a 6-token caption in a context of 32
    then costs a fifth of the text compute. Use with `encode_text_tokens`, not `model.encode_text` (which adds
    the full positional table)."""
    return texts[:, :max(1, int((texts != 0).sum(dim=1).max()))]


def freeze_logit_bias(model):
    """Freeze SigLIP's `logit_bias` for a method whose losses are softmax (InfoNCE) and never read it.

    Left trainable on a SigLIP backbone it gets no gradient, and DistributedDataParallel stops at the second step
    ("Expected to have finished reduction in the prior iteration"; open_clip issue 1076). Frozen, it keeps its
    value in the exported model and every other gradient is unchanged. A CLIP model has no bias: nothing to do."""
    bias = getattr(unwrap(model), "logit_bias", None)
    if bias is not None:
        bias.requires_grad_(False)


def clip_loss(image_emb, text_emb, logit_scale):
    """CLIP's symmetric InfoNCE: L = (CE(s I T^T, y) + CE(s T I^T, y)) / 2 with y_i = i (open_clip
    src/open_clip/loss.py, `ClipLoss` without local_loss: the full gathered N x N matrix).

    image_emb, text_emb: (N, D) L2-normalized, already gathered over ranks; logit_scale: scalar s (exp'ed)."""
    logits = logit_scale * image_emb @ text_emb.t()
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# =====================================================================================================
# 2. The shapes base models (`pretrained="shapes"`), shipped in models/
# =====================================================================================================
# They play the role of downloading OpenAI (CLIP) or WebLI (SigLIP) weights: tiny open_clip models trained from
# scratch on the shapes world's captions in natural word order, shipped in models/ as fp16 files with a sidecar JSON
# (how each was made, its sha256, its shapes-suite numbers). The recipe that made them is lab/base_models.py
# (`python -m lab.base_models --arch clip`); docs/testbed.md says why they bind poorly, as web-trained CLIP does.
SHAPES_BASE_ARCHS = {"clip": TINY_MODEL, "siglip": SHAPES_SIGLIP_MODEL}
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def cache_dir():
    """Where cached artefacts (C2LIP's concepts, GOAL's LISM matching) live: $COMPCLIP_CACHE, else
    ~/.cache/compositional-clip."""
    path = os.environ.get("COMPCLIP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "compositional-clip")
    os.makedirs(path, exist_ok=True)
    return path


def shipped_base_path(arch="clip"):
    """Where the shipped base model of `arch` ('clip' or 'siglip') lives: models/<model name>-shapes-base.pt."""
    return os.path.join(MODELS_DIR, f"{SHAPES_BASE_ARCHS[arch]}-shapes-base.pt")


def rebuild_command(arch):
    return f"python -m lab.base_models --arch {arch}"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shapes_base_path(name=TINY_MODEL):
    """Path of the shipped shapes base model for model `name`, after checking it against its sidecar's sha256.

    A missing file, a missing sidecar or a hash mismatch (a corrupt or replaced file, or a Git LFS pointer)
    is one InputError that names the file and the command that rebuilds it."""
    arch = {model: arch for arch, model in SHAPES_BASE_ARCHS.items()}.get(name)
    if arch is None:
        raise InputError(f"--pretrained shapes exists only for --model {' or '.join(SHAPES_BASE_ARCHS.values())}, "
                         f"not {name!r}")
    path = shipped_base_path(arch)
    sidecar = path[:-3] + ".json"
    if not os.path.exists(path) or not os.path.exists(sidecar):
        raise InputError(f"the shipped shapes base model {path} (or its sidecar {os.path.basename(sidecar)}) is "
                         f"missing; restore it with `git checkout -- models/` or rebuild it: {rebuild_command(arch)}")
    with open(sidecar) as f:
        expected = json.load(f).get("sha256")
    actual = _sha256(path)
    if actual != expected:
        raise InputError(f"{path} does not match its sidecar (sha256 {actual[:12]}... instead of "
                         f"{str(expected)[:12]}...): the file is corrupt or was replaced. Restore it with "
                         f"`git checkout -- models/` or rebuild it: {rebuild_command(arch)}")
    return path



# =====================================================================================================
# 3. EMA teacher
# =====================================================================================================
class EMA:
    """Exponential moving average of a model's weights: theta_t <- d * theta_t + (1 - d) * theta_s.

    The time constant is about 1 / (1 - d) steps (d=0.9996: 2,500 steps). `module` is the teacher: a frozen
    copy in eval mode. Buffers are copied, not averaged."""

    def __init__(self, model, decay):
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        student = unwrap(model)
        for teacher_p, student_p in zip(self.module.parameters(), student.parameters()):
            teacher_p.mul_(self.decay).add_(student_p.detach(), alpha=1 - self.decay)
        for teacher_b, student_b in zip(self.module.buffers(), student.buffers()):
            teacher_b.copy_(student_b)

    def state_dict(self):
        return {"decay": self.decay, "module": self.module.state_dict()}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        self.module.load_state_dict(state["module"])


def unwrap(model):
    """The bare model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# =====================================================================================================
# 4. Distributed
# =====================================================================================================
def world_info():
    """(rank, world_size) of this process; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    return world_info()[0] == 0


def gather_features(features):
    """All ranks' features concatenated in rank order; the local slice keeps its autograd graph.

    Every rank then computes the *same* global loss, but back-propagates only through its own slice, so its
    gradient w.r.t. its local features equals the single-process gradient for that slice. The parameter
    gradient of the single-process loss is the *sum* of the ranks' gradients; DDP averages, so the training
    loops back-propagate `loss * world_size` (`accumulated_backward`, which also corrects the scalars the loss uses
    directly). On one process this is the identity."""
    rank, world_size = world_info()
    if world_size == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = features
    return torch.cat(gathered, dim=0)


@contextlib.contextmanager
def main_process_first():
    """Run the block on rank 0 first and on the other ranks after it: for one-off preprocessing with a disk cache
    (spaCy over COCO's 414k captions takes about 15 minutes), rank 0 computes and writes the cache, the others
    only read it, instead of every rank doing the same work at once. Nothing happens on one process.

    The block is also where rank 0 first reads the user's files (a negatives file, a LISM file), so a bad input can
    stop it there. Rank 0 then tells the others, which wait for it here, and they leave quietly with the same exit
    code (2 for bad input) instead of dying later in a collective with "Connection reset by peer"."""
    rank, world_size = world_info()
    if world_size == 1:
        yield
        return
    if rank != 0:
        outcome = [None]
        dist.broadcast_object_list(outcome, src=0)   # waits for rank 0's block, like a barrier
        if outcome[0] is not None:
            raise SystemExit(outcome[0])              # rank 0 prints the reason
        yield
        return
    try:
        yield
    except BaseException as error:
        code = 2 if getattr(error, "user_error", False) else \
            error.code if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code else 1
        dist.broadcast_object_list([code], src=0)
        raise
    dist.broadcast_object_list([None], src=0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_worker(local_rank, fn, args, world_size, backend, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    _init_from_env(backend, args)
    try:
        _user_errors_as_exit(fn, args)
    finally:
        dist.destroy_process_group()


# Generous on purpose: a rank that really hangs is reported only this late, but a slow evaluation on rank 0
# (hours for the full real-data lists on one GPU) must not kill the run.
DIST_TIMEOUT_MINUTES = 240


def _init_from_env(backend, args):
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # The timeout of every collective. torch's default (30 min for NCCL) is shorter than rank 0's evaluation
    # before training (the paper lists with SUN397 and ImageNet zero-shot), while the other ranks wait in DDP's
    # first broadcast; see --dist-timeout.
    minutes = getattr(args, "dist_timeout", None) or DIST_TIMEOUT_MINUTES
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=minutes))


def _user_errors_as_exit(fn, args):
    """Run fn(args); an exception marked as the user's error becomes one line on stderr and exit code 2."""
    try:
        return fn(args)
    except Exception as error:
        if getattr(error, "user_error", False):
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        raise


def slurm_environment(environ):
    """torchrun's variables from SLURM's, for `srun python degla.py ...` (one task per GPU): RANK = SLURM_PROCID,
    WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID, as open_clip's trainer maps them. None when torchrun's
    variables are set already or SLURM runs a single task. MASTER_ADDR (and MASTER_PORT, default 29500) come from
    the job script, e.g. `export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)`."""
    if "RANK" in environ or "SLURM_PROCID" not in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1:
        return None
    if "MASTER_ADDR" not in environ:
        raise SystemExit("SLURM runs several tasks but MASTER_ADDR is not set: add `export MASTER_ADDR=$(scontrol "
                         "show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)` to the job script (or use torchrun)")
    return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ["SLURM_NTASKS"],
            "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"), "MASTER_PORT": environ.get("MASTER_PORT", "29500")}


def launch(fn, args):
    """Run `fn(args)` in the right number of processes.

    - under torchrun (RANK/WORLD_SIZE in the environment; single or multi node), or under SLURM's srun with one
      task per GPU (`slurm_environment`): join its process group;
    - `--gpus N` with N > 1: spawn N processes on this node (NCCL);
    - `--cpu-procs N` with N > 1: spawn N CPU processes (gloo), what the tests use;
    - otherwise one process."""
    gpus = getattr(args, "gpus", 0) or 0
    if gpus and gpus > torch.cuda.device_count():
        raise SystemExit(f"--gpus {gpus} asks for {gpus} GPUs but this machine has {torch.cuda.device_count()}; "
                         f"use --gpus {torch.cuda.device_count()} (0 = CPU)")
    os.environ.update(slurm_environment(os.environ) or {})
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        _init_from_env("nccl" if torch.cuda.is_available() else "gloo", args)
        try:
            return _user_errors_as_exit(fn, args)
        finally:
            dist.destroy_process_group()
    cpu_procs = getattr(args, "cpu_procs", 1) or 1
    if gpus > 1 or cpu_procs > 1:
        n, backend = (gpus, "nccl") if gpus > 1 else (cpu_procs, "gloo")
        try:
            mp.spawn(_spawned_worker, args=(fn, args, n, backend, _free_port()), nprocs=n, join=True)
        except mp.ProcessExitedException as error:
            if error.exit_code == 2:   # bad input: the processes printed their one message, no traceback here
                raise SystemExit(2) from None
            raise
        return None
    return _user_errors_as_exit(fn, args)


def _collecting_worker(rank, fn, world_size, port, queue, fn_args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # plain pickle (not torch's shared-memory reductions): the result must outlive this process
        queue.put((rank, pickle.dumps(fn(rank, world_size, *fn_args))))
    finally:
        dist.destroy_process_group()


def run_cpu_processes(fn, world_size, *fn_args):
    """Run fn(rank, world_size, *fn_args) in `world_size` gloo CPU processes; return their results by rank.

    For tests that prove a distributed loss equals the single-process loss. `fn` must be importable (a
    module-level function) because the processes are spawned."""
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = mp.start_processes(_collecting_worker, args=(fn, world_size, _free_port(), queue, fn_args),
                                   nprocs=world_size, join=False, start_method="spawn")
    # Read the results while the processes run: a result larger than the pipe's buffer (a model's gradients) blocks
    # its sender until it is read, so waiting for the processes to exit first would wait forever.
    results = {}
    while len(results) < world_size:
        if not queue.empty():
            rank, blob = queue.get()
            results[rank] = pickle.loads(blob)
        elif processes.join(timeout=0.05) and queue.empty():   # all exited (join raises if one failed)
            raise RuntimeError(f"the processes exited with {world_size - len(results)} result(s) missing")
    while not processes.join():
        pass
    return [results[r] for r in range(world_size)]


# =====================================================================================================
# 5. Training utilities
# =====================================================================================================
MULTI_GPU_EPILOG = """\
several GPUs (DDP; --batch-size is per process: keep the paper's global batch = batch x processes):
  %(prog)s --gpus N ...                      N processes on this node
  torchrun --nproc_per_node N %(prog)s ...   the same under torchrun (one or more nodes; leave --gpus at 0)"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """argparse's '(default: X)' for flags with a fixed default; none for on/off switches and for flags left at
    None, whose help ends with the values the method's tables give them (`document_defaults`). The epilog keeps
    its line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def base_parser(description):
    """The flags every method has. Defaults that depend on the data (paper values for real data, small values
    for the shapes world) are left as None here and filled by `apply_defaults(args, DEFAULTS)`; call
    `document_defaults(parser, DEFAULTS)` so that --help shows them."""
    p = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, epilog=MULTI_GPU_EPILOG)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help="shapes (built-in synthetic world; the default) | coco | docci | dci | "
                   "json | csv | wds (webdataset shards)")
    g.add_argument("--data-root", default=None, help="root folder of the real data set (see docs/real_data.md)")
    g.add_argument("--karpathy-file", default=None, help="COCO: Karpathy dataset_coco.json; its val/test images are "
                   "excluded from training")
    g.add_argument("--train-size", type=int, default=None, help="shapes world: number of training scenes")
    g.add_argument("--shapes-holdout", default=None, help="shapes world: colours and shapes (comma-separated) that no "
                   "training scene shows; zero-shot on them then measures forgetting (python -m lab.forgetting)")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="open_clip model name (OpenAI weights: a -quickgelu config)")
    g.add_argument("--pretrained", default=None, help="open_clip tag, weights path, 'shapes' or 'none'")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=None, help="per process and micro-batch")
    g.add_argument("--accum-freq", type=int, default=None,
                   help="K micro-batches per optimizer step: the loss and gradients of one batch of --batch-size x K "
                   "per process, holding one micro-batch's activations (features cached, as open_clip's "
                   "--accum-freq); global batch = --batch-size x K x processes")
    g.add_argument("--epochs", type=float, default=None, help="epochs over the data (ignored if --steps is set)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps in total")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (after the warm-up; cosine "
                   "decay to 0 at the last step)")
    g.add_argument("--wd", type=float, default=None, help="AdamW weight decay, on weights with 2+ dims only (not on "
                   "biases, norms, logit scale)")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps before the cosine decay")
    g.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto = bf16 autocast on CUDA, fp32 on CPU. A method's own real-data value (GOAL: bf16, as its "
                   "release) applies on CUDA only; on CPU the default stays fp32")
    g = p.add_argument_group("system")
    g.add_argument("--gpus", type=int, default=None, help="GPUs on this node (0 = CPU or torchrun); DDP when > 1")
    g.add_argument("--dist-timeout", type=float, default=None,
                   help="minutes a rank waits in a collective before the run aborts (DDP, torchrun): the other ranks "
                        "wait this long while rank 0 evaluates the starting model")
    g.add_argument("--cpu-procs", type=int, default=None, help=argparse.SUPPRESS)   # gloo processes, for tests
    g.add_argument("--out", default=None, help="run folder (default runs/<method>-<data>-<time>)")
    g.add_argument("--resume", default=None, help="run folder (or checkpoint) to continue from; flags you do not give "
                   "are read from its config.json")
    g.add_argument("--seed", type=int, default=None, help="random seed (each rank adds its rank)")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    g.add_argument("--log-every", type=int, default=None, help="write a log line every N steps")
    g.add_argument("--keep-epochs", action="store_true", default=None,
                   help="also keep the weights at the end of every epoch, as <out>/epoch-<k>.pt (final.pt's format), "
                   "beside the atomic checkpoint.pt")
    g.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute the towers' activations in the backward pass (open_clip's set_grad_checkpointing): "
                   "less GPU memory for the papers' batches, the same gradients, about a third more compute")
    g.add_argument("--report-to", default=None, choices=["none", "tensorboard"],
                   help="also write every logged value to TensorBoard, in <out>/tensorboard (needs `pip install "
                   "tensorboard`; view with `tensorboard --logdir runs`)")
    g.add_argument("--eval", default=None, help="comma-separated benchmarks run on rank 0 before and after training: "
                   "shapes (the built-in suite, no files), aro, sugarcrepe, valse, vlchecklist, zeroshot, retrieval, "
                   "longtext or their members (python eval.py --help). Real data defaults to the paper's list and "
                   "needs --eval-root; --eval '' skips evaluation")
    g.add_argument("--eval-root", default=None, help="root folder of the benchmark files (layout: eval.py docstring)")
    g.add_argument("--no-progress", action="store_true", default=None, help="no tqdm bar (logs still written)")
    return p


# Used where a method's table has no value: every method has a seed and a precision, and the system flags of
# `base_parser`. Every flag's argparse default is None (switches included), so that `apply_defaults` can tell a
# flag given on the command line from one left out, and a resumed run keeps its own value of the latter.
FALLBACK_DEFAULTS = {"seed": 0, "precision": "auto", "accum_freq": 1, "gpus": 0, "dist_timeout": DIST_TIMEOUT_MINUTES, "cpu_procs": 1,
                     "log_every": 10, "no_progress": False, "report_to": "none",
                     "grad_checkpointing": False, "keep_epochs": False}

# Not read back from a resumed run's config.json: --resume itself, and --out, which defaults to the folder being
# resumed (`Run`), not to the path the run had when it started (the folder may have been moved or copied).
# --gpus is read back although it describes the machine: the number of processes is part of the run (the global
# batch is --batch-size x processes, the data are sharded and the RNG states saved per rank), so a resume in
# fewer processes would silently train something else; on a machine with fewer GPUs `launch` stops with one
# message, and `--gpus N` given again wins as every flag does.
NOT_RESUMED = ("resume", "out")


def _shown(value):
    if value is None:
        return "set at run time"
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def document_defaults(parser, defaults):
    """End the help of every flag left at None with the value `apply_defaults` gives it: 'X on the shapes world,
    Y on real data' from the method's two tables (one value when they agree), so that --help never says 'None'.
    Flags that no table fills (--out, --resume, ...) keep their help as it is."""
    for action in parser._actions:
        if action.default is not None or not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if action.nargs == 0:   # an on/off switch: off unless given, nothing to show
            continue
        values = {}
        for where, table in (("the shapes world", defaults["shapes"]), ("real data", defaults["real"])):
            table = dict(FALLBACK_DEFAULTS, **table)
            if action.dest in table:
                values[where] = _shown(table[action.dest])
        if len(values) == 2 and len(set(values.values())) == 1:
            text = values["real data"]
        else:
            text = ", ".join(f"{value} on {where}" for where, value in values.items())
        if text:
            action.help = (action.help or "") + f" (default: {text})"
    return parser


def apply_defaults(args, defaults):
    """Fill every argument left at None: first from the run being resumed (its config.json, so that
    `--resume RUN_DIR` alone continues with the same settings; flags given now win), then from
    `defaults['shapes']` or `defaults['real']` (by --data), then from FALLBACK_DEFAULTS. Every flag of the method
    scripts defaults to None for this (switches too: None = not given), except those in NOT_RESUMED.

    A table's `precision` is its CUDA precision: without CUDA it becomes 'auto' (fp32), since bf16/fp16 autocast
    needs a GPU here (`Run`) and the CPU run of real data (tests, a laptop) should not stop on it."""
    if args.resume:
        folder = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
        config_path = os.path.join(folder, "config.json")
        if os.path.exists(config_path):
            with open(config_path) as f:
                saved = json.load(f)
            for key, value in saved.items():
                if key in vars(args) and getattr(args, key) is None and key not in NOT_RESUMED:
                    setattr(args, key, value)
    args.data = args.data or "shapes"
    table = dict(FALLBACK_DEFAULTS, **defaults["shapes" if args.data == "shapes" else "real"])
    if not torch.cuda.is_available():
        table["precision"] = "auto"
    for key, value in table.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def make_optimizer(model, lr, wd, betas=(0.9, 0.98), eps=1e-6):
    """AdamW with two groups, as open_clip_train: no weight decay on biases, norms, gains and the logit
    scale/bias (every parameter with fewer than 2 dims or such a name), weight decay `wd` on the rest."""
    decay, no_decay = [], []
    for name, p in unwrap(model).named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))
        (no_decay if exclude else decay).append(p)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def cosine_schedule(optimizer, warmup, total):
    """Linear warm-up to the base lr over `warmup` steps, then cosine decay to 0 at `total` (a LambdaLR, so its
    position is saved in checkpoints). Step it once per optimizer step."""
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def split_collate(collate_fn, accum_freq):
    """A collate for `batch_stream` that turns --batch-size x K samples into a list of K collated micro-batches
    (K = --accum-freq; K = 1 gives a list of one batch). Each micro-batch is collated on its own, so whatever a
    method's collate builds per batch (negatives, concepts, local pairs) is built per micro-batch."""
    def collate(samples):
        size = len(samples) // accum_freq
        return [collate_fn(samples[i * size:(i + 1) * size]) for i in range(accum_freq)]
    return collate


def accumulated_backward(run, micro_batches, encode, loss_of, loss_scalars=(), module=None, constants=None, step=None):
    """Gradients of the loss of the whole batch (K micro-batches), holding the activations of one micro-batch at a
    time: open_clip's `--accum-freq` (https://github.com/mlfoundations/open_clip, src/open_clip_train/train.py).

    encode(micro_batch) -> dict of the micro-batch's features under gradient: tensors whose rows are its samples,
        and 0-dim tensors for the scalars the loss reads directly (logit scale, biases).
    constants(micro_batch) -> dict of features that never carry a gradient (DeGLA's EMA teacher); optional.
    loss_of(features, current) -> (loss, parts, ...) on the whole batch: `features` is the list of the K
        micro-batches' dicts, in order; `current` is the index whose entry carries the gradient in this pass
        (`join_micro_batches` concatenates the rows and takes the scalars from that entry).

    With K = 1 this is one forward and one backward. With K > 1:
      1. every micro-batch is encoded without gradient and its features are cached;
      2. for j = 1..K in turn, micro-batch j is encoded again with gradient, the loss of the whole batch is computed
         with j's fresh features in place of their cached copy, and back-propagated. A tower weight gets in pass j
         exactly the part of the whole batch's gradient that flows through micro-batch j's features, so the K
         passes add up to the whole batch's gradient (tests/test_accumulation.py checks it in float64).
    The scalars the loss reads directly get the whole gradient in every pass (and on every rank: see
    `gather_features`), so their gradient is divided by K x world size at the end. Each pass back-propagates
    loss x world size, because DDP averages over ranks. If `module` (the one `encode` runs) is DDP-wrapped, passes
    1..K-1 skip its all-reduce (`no_sync`): the gradients add up locally and are reduced once, in the last pass.
    Returns what loss_of returned in the last pass (every pass computes the same loss value)."""
    k = len(micro_batches)
    ddp = module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else None
    with torch.no_grad():
        fixed = [constants(mb) if constants is not None else {} for mb in micro_batches]
        cached = [{**fixed[j], **encode(mb)} for j, mb in enumerate(micro_batches)] if k > 1 else None
    for j, micro_batch in enumerate(micro_batches):
        last = j == k - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            features = [{**fixed[j], **encode(micro_batch)}] if k == 1 else \
                cached[:j] + [{**fixed[j], **encode(micro_batch)}] + cached[j + 1:]
            result = loss_of(features, j)
            loss = result[0]
            if j == 0:   # every pass's loss has the same value: check it once, before any gradient exists
                check_finite(loss, result[1], step)
            scaled = loss * run.world_size
            if run.scaler is not None:   # fp16: scale the loss against underflow; step() unscales and skips inf/nan
                scaled = run.scaler.scale(scaled)
            scaled.backward()
    for param in loss_scalars:
        if param is not None and param.grad is not None:
            param.grad.div_(run.world_size * k)   # linear, so it commutes with the GradScaler's later unscale
    return result


def upcast(tensor):
    """A feature in at least fp32 for the loss math: autocast's bf16/fp16 outputs are cast up, fp32 and float64
    (the exactness tests) stay as they are; None stays None."""
    if tensor is not None and tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


def join_micro_batches(features, current):
    """One dict for the whole batch from the K micro-batches' feature dicts: tensors with rows are concatenated
    in micro-batch order (None stays None), 0-dim tensors (the scalars) are taken from entry `current`, the one
    with gradient in this pass of `accumulated_backward`."""
    joined = {}
    for key, value in features[current].items():
        if value is None or value.dim() == 0:
            joined[key] = value
        else:
            joined[key] = torch.cat([f[key] for f in features]) if len(features) > 1 else value
    return joined


def optimizer_step(run, optimizer):
    """Step the optimizer after `accumulated_backward` (through the GradScaler under fp16)."""
    if run.scaler is not None:
        run.scaler.step(optimizer)
        run.scaler.update()
    else:
        optimizer.step()


@torch.no_grad()
def clamp_logit_scale(model, max_scale=100.0):
    """Keep the learned temperature in [1, 100] (log scale in [0, ln 100]), as CLIP and open_clip_train do."""
    unwrap(model).logit_scale.clamp_(0, math.log(max_scale))


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_finite(loss, parts, step):
    """Stop the run with a message naming the step and every loss term when the loss is NaN or infinite.
    Nothing is saved after this point, so the last checkpoint on disk is the last good one."""
    if not torch.isfinite(loss).all():
        terms = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in parts.items())
        raise FloatingPointError(f"non-finite loss at step {step}: loss={loss.item()} ({terms}); "
                                 f"stopping; the last checkpoint on disk is intact")


def _default_workers():
    return 0 if os.cpu_count() is None or os.cpu_count() <= 2 else min(8, os.cpu_count() // 2)


def git_commit(paths=()):
    """The repository's git commit, with "+uncommitted changes to ..." when tracked files differ from it (only
    `paths`, relative to the repository, if given); "unknown (not a git checkout)" elsewhere."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=here,
                                 capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (f" +uncommitted changes to {', '.join(paths) or 'the working tree'}" if changed else "")


def code_version():
    """What made a run, for its config.json: the repository's git commit (`git_commit`) and the versions of Python
    and of the libraries that shape the numbers."""
    commit = git_commit()
    versions = {}
    for package in ("torch", "torchvision", "open_clip_torch", "spacy", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"commit": commit, "python": platform.python_version(), **versions}


class Run:
    """One training run: device, rank, precision, output folder, JSON-lines log and progress bar.

    Only rank 0 creates folders, writes logs and shows the bar; seeds are offset by rank so that the
    processes draw different random numbers where that matters (the data order is sharded explicitly).
    The run folder is created by `progress`, right before the first step, so that a start that fails (bad
    input, a missing file, a data set that does not load) leaves no folder behind."""

    def __init__(self, args, method):
        if args.resume:   # checked before the model, the data set and the negatives are built
            _check_resume(args.resume, method)
        self.args, self.method = args, method
        self.rank, self.world_size = world_info()
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        else:
            self.device = torch.device("cpu")
        precision = args.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision in ("bf16", "fp16") and self.device.type != "cuda":
            raise SystemExit(f"--precision {precision} needs a GPU; use fp32 on CPU")
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        seed_everything(args.seed + self.rank)
        if args.resume and not args.out:
            args.out = args.resume if os.path.isdir(args.resume) else os.path.dirname(args.resume)
        if not args.out:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            args.out = os.path.join("runs", f"{method}-{args.data}-{stamp}")
        self.out = args.out
        self.is_main = self.rank == 0
        if getattr(args, "accum_freq", 1) < 1:
            raise InputError(f"--accum-freq {args.accum_freq}: expected a whole number of micro-batches, 1 or more")
        self.config = {"method": method, "world_size": self.world_size, "precision": precision, **vars(args),
                       "code": code_version()}
        if getattr(args, "report_to", "none") == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
            raise InputError("--report-to tensorboard needs the tensorboard package, an optional dependency: "
                             "pip install tensorboard")
        self._log = None   # opened by `progress`
        self._tensorboard = None
        self.bar = None
        self._last_time, self._last_step = time.time(), None
        self.started = time.time()
        self.train_seconds, self.train_samples = 0.0, 0

    @property
    def global_batch(self):
        """Samples per optimizer step over all processes (--batch-size x --accum-freq x processes): what the
        contrastive losses see as one batch."""
        return self.args.batch_size * getattr(self.args, "accum_freq", 1) * self.world_size

    def total_steps(self, dataset_size):
        """Total optimizer steps: --steps if given, else --epochs over the data. Remembers the steps of one epoch
        (the global batch is --batch-size x --accum-freq x processes, as in `batch_stream`) for `should_save`."""
        self.steps_per_epoch = max(1, dataset_size // self.global_batch)
        if self.args.steps:
            return int(self.args.steps)
        return max(1, int(self.args.epochs * self.steps_per_epoch))

    def epoch_ends(self, step):
        """Whether optimizer step `step` (counted from 1) completes an epoch of the data."""
        return step % self.steps_per_epoch == 0

    def should_save(self, step):
        """Whether to write a checkpoint after optimizer step `step` (counted from 1): every --save-every steps, and
        at the end of each epoch with --keep-epochs (`save_checkpoint` then keeps that epoch's weights too)."""
        periodic = bool(self.args.save_every) and step % self.args.save_every == 0
        return periodic or (bool(getattr(self.args, "keep_epochs", False)) and self.epoch_ends(step))

    def autocast(self):
        """The one autocast context of the run: bf16/fp16 on CUDA, nothing (fp32) on CPU."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def progress(self, total, initial=0):
        """Create the run folder (config.json, log.jsonl) and the progress bar; call it once, before the first step."""
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            _atomic_write_text(os.path.join(self.out, "config.json"), json.dumps(self.config, indent=2, default=str))
            self._log = open(os.path.join(self.out, "log.jsonl"), "a")
            if getattr(self.args, "report_to", "none") == "tensorboard":   # optional dependency: imported when asked for
                from torch.utils.tensorboard import SummaryWriter
                self._tensorboard = SummaryWriter(os.path.join(self.out, "tensorboard"))
        self.bar = tqdm(total=total, initial=initial, desc=self.method, dynamic_ncols=True, file=sys.stderr,
                        disable=not self.is_main or getattr(self.args, "no_progress", False))
        return self.bar

    def log(self, step, samples_per_step, **values):
        """Write one JSON line (every loss term, lr, logit scale, ...) and update the progress bar.

        Floats are written with 9 significant digits, which pin a float32 value (a loss term) to its last bit and
        keep the small learning rates of real data (DeGLA warms up from 2e-8 to 1e-6; 6 decimals wrote 0.0)."""
        now = time.time()
        if self.device.type == "cuda":   # the high-water mark of this process's GPU memory so far
            values["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
        if self._last_step is not None and step > self._last_step:
            values["samples_per_s"] = samples_per_step * (step - self._last_step) / max(1e-9, now - self._last_time)
            self.train_seconds += now - self._last_time
            self.train_samples += samples_per_step * (step - self._last_step)
        self._last_time, self._last_step = now, step
        if self._log is not None:
            record = {"step": step,
                      **{k: (float(f"{v:.9g}") if isinstance(v, float) else v) for k, v in values.items()}}
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()
            if self._tensorboard is not None:   # the same values, one scalar series each
                for name, value in record.items():
                    if name != "step" and isinstance(value, (int, float)):
                        self._tensorboard.add_scalar(f"{self.method}/{name}", value, step)
            if self.bar is not None:
                shown = {k: f"{v:.3f}" for k, v in values.items() if k in ("loss", "samples_per_s")}
                self.bar.set_postfix(shown)

    def timing(self):
        """Wall time of the run so far and training throughput (samples/s over all processes), for results.json.
        Training time accumulates between `log` calls, so evaluation before and after is not counted in it."""
        return {"wall_seconds": round(time.time() - self.started, 1),
                "train_seconds": round(self.train_seconds, 1),
                "samples_per_s": round(self.train_samples / self.train_seconds, 1) if self.train_seconds else None}

    def print(self, *text):
        if self.is_main:
            (tqdm.write if self.bar is not None else print)(" ".join(str(t) for t in text))

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self._log is not None:
            self._log.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


class EpochSampler(torch.utils.data.Sampler):
    """Indices of one epoch: a permutation seeded by (seed, epoch), sharded by rank, starting at `skip`.

    Being a pure function of (seed, epoch, rank), it lets a resumed run see exactly the batches the
    interrupted run would have seen next."""

    def __init__(self, size, batch_size, seed, epoch, rank, world_size, skip_batches=0):
        self.per_rank = size // world_size // batch_size * batch_size
        permutation = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        shard = permutation[rank::world_size][:self.per_rank]
        self.indices = shard[skip_batches * batch_size:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class SeededSamples(torch.utils.data.Dataset):
    """Sample i of epoch e with its random augmentation drawn from a seed of (seed, e, i) alone.

    Without it the augmentation of a sample depends on which data-loader worker loads it and on how many samples
    that worker loaded before (or, with no workers, on the training process's RNG stream), so a run resumed in
    the middle of an epoch would see other crops than the uninterrupted run. The process's RNG states (torch CPU,
    Python, NumPy) are put back after each sample, so the training loop's random numbers are not touched.
    Only the CPU generator is seeded (augmentations run on the CPU): `torch.manual_seed` would also reseed every
    CUDA device, which fork_rng(devices=[]) does not put back, and costs a captured stack trace per sample (per
    accelerator backend) before CUDA is initialized."""

    def __init__(self, dataset, seed, epoch):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 100_000_007 + index) % 2 ** 63
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed)
                random.seed(sample_seed)
                np.random.seed(sample_seed % 2 ** 32)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def batch_stream(dataset, collate_fn, batch_size, seed, start_step, total_steps, workers=None):
    """Yield (step, epoch, batch) from `start_step` to `total_steps`, epoch after epoch, deterministically.

    Every batch has `batch_size` samples, also when an image cannot be read: `data.ReplaceUnreadable` hands out
    the next readable sample instead (dropping it would leave this rank with fewer samples than the others, and
    the all-gather of features needs equal sizes). The collates count the stand-ins in batch["replaced"]
    (removed here); each rank that had any reports its count at the end of every epoch. Each sample's random
    augmentation is seeded by (seed, epoch, index) (`SeededSamples`): the same with any `workers` and after a resume."""
    rank, world_size = world_info()
    steps_per_epoch = len(dataset) // world_size // batch_size
    if steps_per_epoch == 0:
        raise InputError(f"the data set has {len(dataset)} samples, fewer than one batch of {batch_size} per process")
    workers = _default_workers() if workers is None else workers
    readable = data.ReplaceUnreadable(dataset)
    step, replaced_in_run = start_step, 0
    while step < total_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        sampler = EpochSampler(len(dataset), batch_size, seed, epoch, rank, world_size, skip)
        # The loader's own generator: its worker base seed is then not drawn from the process RNG, which a resume
        # restores at a point where the uninterrupted run had already drawn it (at the start of the epoch).
        loader = torch.utils.data.DataLoader(SeededSamples(readable, seed, epoch), batch_size=batch_size,
                                             sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                                             drop_last=True, pin_memory=False,
                                             generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        replaced = 0
        for batch in loader:
            for part in batch if isinstance(batch, list) else [batch]:   # a list: `split_collate`'s micro-batches
                replaced += int(part.pop("replaced", 0))
            yield step, epoch, batch
            step += 1
            if step >= total_steps:
                break
        if replaced:
            replaced_in_run += replaced
            where = f"rank {rank}, " if world_size > 1 else ""
            print(f"[data] {where}epoch {epoch}: {replaced} unreadable image(s) replaced by the next readable "
                  f"sample ({replaced_in_run} in this run; the warnings name the files)", file=sys.stderr)


# =====================================================================================================
# 6. Checkpoints
# =====================================================================================================
def _atomic_write_text(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _atomic_torch_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: a crash at any
    moment leaves either the old file or the new one, never a half-written one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state():
    """This process's RNG states (Python, NumPy, torch CPU, every CUDA device)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states():
    """Every rank's `rng_state()`, in rank order (a list of one without DDP). Every rank must call it: each rank
    draws its own random numbers (its seed is offset by its rank), so a checkpoint keeps all of them."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [rng_state()]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def rank_rng_state(saved, rank):
    """Rank `rank`'s state from a checkpoint's "rng" entry: the list of `gather_rng_states`, or (checkpoints
    written before it) rank 0's state alone. None if the checkpoint holds none for this rank (it was written by
    fewer processes)."""
    states = [saved] if isinstance(saved, dict) else saved
    return states[rank] if rank < len(states) else None


def save_checkpoint(run, step, model, optimizer, scheduler, ema=None, extra=None):
    """Write `<out>/checkpoint.pt` atomically: everything needed to continue exactly. Call it on every rank:
    the ranks' RNG states are gathered to it, then rank 0 alone writes.

    extra: method state (e.g. CE-CLIP's adaptive thresholds) as a dict of tensors/numbers.
    A second call for the step just saved (the final save after a periodic one at the last step) writes nothing:
    nothing has changed in between. Every rank takes the same branch, so the gather below stays collective."""
    if getattr(run, "saved_step", None) == step:
        return
    run.saved_step = step
    rng_states = gather_rng_states()
    if not run.is_main:
        return
    state = {
        "method": run.method, "step": step, "args": vars(run.args),
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": run.scaler.state_dict() if run.scaler else None, "ema": ema.state_dict() if ema else None,
        "extra": extra or {}, "rng": rng_states,
    }
    _atomic_torch_save(state, os.path.join(run.out, "checkpoint.pt"))
    if getattr(run.args, "keep_epochs", False) and run.epoch_ends(step):
        # the weights at this epoch's end, in final.pt's format (open_clip loads them with --pretrained FILE, e.g.
        # CE-CLIP's release evaluates epoch 5 of 10); the full training state stays in checkpoint.pt alone
        epoch = step // run.steps_per_epoch
        _atomic_torch_save({"state_dict": state["model"], "meta": {"method": run.method, "epoch": epoch, "step": step}},
                           os.path.join(run.out, f"epoch-{epoch}.pt"))


def _checkpoint_file(path):
    """The checkpoint --resume names: the file itself, or checkpoint.pt inside a run folder."""
    return os.path.join(path, "checkpoint.pt") if os.path.isdir(path) else path


def _check_resume(path, method):
    """--resume names a checkpoint (or a run folder holding one) of this method: checked at the start, without
    reading the checkpoint (which can be gigabytes)."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isfile(_checkpoint_file(path)):
        raise InputError(f"--resume {path}: no checkpoint there (expected a run folder containing checkpoint.pt, "
                         f"written every --save-every steps)")
    config_path = os.path.join(folder, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            written_by = json.load(f).get("method")
        if written_by not in (None, method):
            raise InputError(f"--resume {path}: that run was written by {written_by!r}, not {method!r} "
                             f"(python {written_by}.py --resume {path})")


def load_checkpoint(path, method, device="cpu"):
    """Read a checkpoint written by `save_checkpoint` (a file or a run folder), checking it belongs to `method`."""
    path = _checkpoint_file(path)
    if not os.path.exists(path):
        raise SystemExit(f"--resume {path}: no checkpoint there (expected a run folder containing checkpoint.pt)")
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("method") != method:
        raise SystemExit(f"--resume {path}: that checkpoint was written by {state.get('method')!r}, not {method!r}")
    return state


def resume(run, model, optimizer, scheduler, ema=None):
    """Restore a run from `args.resume`; returns (start_step, extra method state). (0, {}) without --resume.

    Each rank gets back its own RNG state. The resumed run ends with the weights of an uninterrupted one when it
    runs in the same number of processes (same --gpus or torchrun command; --gpus comes back from config.json)
    on the same kind of device and torch build: the data order is a function of (seed, epoch, rank) and each
    sample's augmentation of (seed, epoch, index) (`SeededSamples`), so --workers may differ. Not exact: CUDA
    kernels that are not deterministic (cuDNN autotuning, atomics), which differ between any two runs."""
    if not run.args.resume:
        return 0, {}
    state = load_checkpoint(run.args.resume, run.method, device=run.device)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if run.scaler and state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    if ema is not None and state["ema"]:
        ema.load_state_dict(state["ema"])
    saved_ranks = 1 if isinstance(state["rng"], dict) else len(state["rng"])
    own_state = rank_rng_state(state["rng"], run.rank)
    if own_state is not None and saved_ranks == run.world_size:
        set_rng_state(own_state)
    else:   # this rank keeps the fresh seed + rank of `Run`
        run.print(f"warning: the checkpoint holds the RNG states of {saved_ranks} process(es), this run has "
                  f"{run.world_size}: random numbers (and, with another world size, the data order) differ from "
                  f"an uninterrupted run")
    run.print(f"resumed {run.method} from step {state['step']} ({run.args.resume})")
    return state["step"], state["extra"]


def export_open_clip(model, path, model_name=None, tokenizer=None, meta=None):
    """Save the final weights as `path` (a run's final.pt) and, given `model_name`, make its folder a model that
    loads in a fresh interpreter, exactly as trained (the stretched context of GOAL included), with one line:

        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:RUN_FOLDER")
        tokenizer = open_clip.get_tokenizer("local-dir:RUN_FOLDER")

    open_clip's `local-dir:` reads the model config from open_clip_config.json (written by open_clip's own
    `save_config_for_hf`, with the model's context length, which `open_clip.create_model(name, pretrained=path)`
    would silently interpolate back to the named config's) and the weights from open_clip_pytorch_model.bin, a
    hard link to `path` (the same file on disk; a copy where links are impossible). HF tokenizers (SigLIP's)
    are saved there as well, since `local-dir:` reads them from the folder."""
    model = unwrap(model)
    if model_name is not None:   # the file says what it is, wherever it is copied (`_recorded_activation` reads it)
        meta = {**(meta or {}), "model": model_name}
    _atomic_torch_save({"state_dict": model.state_dict(), "meta": meta or {}}, path)
    if model_name is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if model_name.startswith(HF_CLIP_PREFIX):   # trained from a transformers CLIP folder: its converted config
        hf_folder = hf_clip_folder(model_name)
        config = _open_clip_config(_transformers().CLIPConfig.from_pretrained(hf_folder), hf_folder)
    else:
        config = open_clip.get_model_config(model_name)
    config["text_cfg"]["context_length"] = model.context_length   # GOAL's stretch changed it
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    save_config_for_hf(model, pathlib.Path(tmp), config)
    os.replace(tmp, os.path.join(folder, OPEN_CLIP_CONFIG))
    link = os.path.join(folder, ".tmp-" + OPEN_CLIP_WEIGHTS)
    if os.path.exists(link):
        os.remove(link)
    try:
        os.link(path, link)
    except OSError:
        shutil.copyfile(path, link)
    os.replace(link, os.path.join(folder, OPEN_CLIP_WEIGHTS))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)


# ----- Hugging Face `transformers` CLIP, in and out -----
# transformers' CLIPModel is the same network as open_clip's standard CLIP (a ViT pooled at its class token, a
# causal text transformer pooled at the end-of-text token, two linear projections), under other parameter names:
# q, k and v are three Linear layers where open_clip packs them into one `in_proj`, and the projections are Linear
# weights (open_clip's matrices transposed). GOAL's released weights are CLIPModel state dicts with 248 text
# positions; `export_hf_clip` hands a run to a transformers user. transformers is optional: only these need it.
HF_CLIP_PREFIX = "hf-clip:"   # --model hf-clip:FOLDER, a transformers CLIP folder (see `load_hf_clip`)
CLIP_EOT_ID = 49407   # CLIP's <|endoftext|>, its highest id: transformers' "first EOT" pooling = open_clip's argmax
CLIP_VOCAB_SIZE = 49408   # CLIP's BPE, the tokenizer open_clip uses for these models

# Where each open_clip parameter lives in a CLIPModel: (open_clip name or prefix, transformers name or prefix).
_HF_TOWER_NAMES = [
    ("visual.conv1.", "vision_model.embeddings.patch_embedding."),
    ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("visual.ln_pre.", "vision_model.pre_layrnorm."),   # sic, transformers' spelling
    ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
    ("visual.ln_post.", "vision_model.post_layernorm."),
    ("visual.proj", "visual_projection.weight"),   # transposed
    ("token_embedding.", "text_model.embeddings.token_embedding."),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    ("transformer.resblocks.", "text_model.encoder.layers."),
    ("ln_final.", "text_model.final_layer_norm."),
    ("text_projection", "text_projection.weight"),   # transposed
    ("logit_scale", "logit_scale"),
]
_HF_BLOCK_NAMES = [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                   ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj.")]
_TRANSPOSED = ("visual.proj", "text_projection")


def hf_clip_folder(name):
    """The folder of model name 'hf-clip:FOLDER' (~ expanded: the shell leaves it alone after 'hf-clip:')."""
    return os.path.expanduser(name[len(HF_CLIP_PREFIX):])


def _transformers():
    """The transformers module, or one InputError saying how to get it (it is an optional dependency)."""
    try:
        import transformers
    except ImportError:
        raise InputError("a Hugging Face transformers CLIP (--model hf-clip:FOLDER, --export-hf) needs the "
                         "transformers package, an optional dependency: pip install transformers") from None
    return transformers


def _hf_names(key):
    """The CLIPModel name(s) of open_clip parameter `key`: one name, or three (q, k, v) for a block's packed
    attention input projection. None where CLIPModel has no such parameter (layer scale, attentional pooling...)."""
    for ours, theirs in _HF_TOWER_NAMES:
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            rest = key[len(ours):]
            break
    else:
        return None
    if not ours.endswith("resblocks."):
        return [theirs + rest]
    layer, _, name = rest.partition(".")
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rsplit("_", 1)[1]
        return [f"{theirs}{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]
    for ours_in_block, theirs_in_block in _HF_BLOCK_NAMES:
        if name.startswith(ours_in_block):
            return [f"{theirs}{layer}.{theirs_in_block}{name[len(ours_in_block):]}"]
    return None


def _check_standard_clip(model):
    """Refuse, with one InputError, an open_clip model that CLIPModel cannot express; return the activation
    name ('quick_gelu' or 'gelu') and LayerNorm eps of each tower, {'vision': (act, eps), 'text': (act, eps)}."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer   # open_clip's own tower classes

    def refuse(what):
        raise InputError(f"--export-hf: this model has {what}, which transformers' CLIPModel cannot express. Only "
                         f"open_clip's standard CLIP converts: a ViT image tower pooled at its class token and the "
                         f"built-in text transformer pooled at the end-of-text token")
    if getattr(model, "logit_bias", None) is not None:
        refuse("a logit bias (a SigLIP model: transformers has SiglipModel for those, a different architecture)")
    if type(model) is not open_clip.model.CLIP:
        refuse(f"the class {type(model).__name__} (CustomTextCLIP: a Hugging Face text tower; CoCa: a decoder)")
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        refuse(f"a {type(visual).__name__} image tower")
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        refuse(f"an image tower pooled another way (pool_type {visual.pool_type!r}, attentional pooling or the "
               f"final LayerNorm after pooling)")
    if isinstance(visual.ln_pre, torch.nn.Identity) or visual.proj is None:
        refuse("an image tower without its LayerNorm before the transformer or without its projection")
    if model.text_pool_type != "argmax" or model.attn_mask is None \
            or not isinstance(model.text_projection, torch.nn.Parameter):
        refuse(f"a text tower pooled another way (pool_type {model.text_pool_type!r}), without the causal mask or "
               f"with a projection bias")
    towers = {}
    for tower, module, norms in (("vision", visual.transformer, [visual]),
                                 ("text", model.transformer, [model.transformer, model.ln_final])):
        acts = set()
        for block in module.resblocks:
            if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv") \
                    or not isinstance(block.ls_1, torch.nn.Identity) or not isinstance(block.ls_2, torch.nn.Identity):
                refuse(f"{tower} blocks of another kind (layer scale, qk-norm, scaled cosine attention...)")
            act = block.mlp.gelu
            if isinstance(act, open_clip.transformer.QuickGELU):
                acts.add("quick_gelu")
            elif isinstance(act, torch.nn.GELU) and act.approximate == "none":
                acts.add("gelu")
            else:
                refuse(f"the activation {act} in its {tower} tower")
        eps = {m.eps for part in norms for m in part.modules() if isinstance(m, torch.nn.LayerNorm)}
        if len(acts) != 1 or len(eps) != 1:
            refuse(f"mixed activations or LayerNorm eps in its {tower} tower")
        towers[tower] = (acts.pop(), eps.pop())
    return towers


def _hf_clip_config(model):
    """The transformers CLIPConfig arguments that describe open_clip model `model` (checked by
    `_check_standard_clip`)."""
    towers = _check_standard_clip(model)
    visual = model.visual
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        raise InputError(f"--export-hf: image size {visual.image_size} / patch size {visual.patch_size} are not "
                         f"square, which transformers' CLIPModel cannot express")
    embed_dim = visual.proj.shape[1]

    def tower_config(transformer, tower):
        block = transformer.resblocks[0]
        act, eps = towers[tower]
        return {"hidden_size": transformer.width, "intermediate_size": block.mlp.c_fc.out_features,
                "num_hidden_layers": len(transformer.resblocks), "num_attention_heads": block.attn.num_heads,
                "hidden_act": act, "layer_norm_eps": eps, "projection_dim": embed_dim}
    vision = {**tower_config(visual.transformer, "vision"), "image_size": visual.image_size[0],
              "patch_size": visual.patch_size[0], "num_channels": 3}
    text = {**tower_config(model.transformer, "text"), "vocab_size": model.vocab_size,
            # the stretched context of GOAL (248) is just more positions
            "max_position_embeddings": model.context_length,
            # pool at the first <|endoftext|>, as open_clip's argmax does (2 would be transformers' legacy argmax)
            "bos_token_id": CLIP_EOT_ID - 1, "eos_token_id": CLIP_EOT_ID}
    return {"vision_config": vision, "text_config": text, "projection_dim": embed_dim,
            "logit_scale_init_value": float(model.logit_scale.detach().reshape(-1)[0])}


def _write_clip_processor(transformers, model, folder):
    """Tokenizer and image processor files, so that `transformers.CLIPProcessor.from_pretrained(folder)` works
    offline. The tokenizer's vocab.json and merges.txt come from the CLIP BPE file open_clip ships (the one OpenAI's
    CLIP and transformers' openai/clip-* tokenizers use): only the two special tokens are named differently."""
    bpe = open_clip.SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): i for token, i in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=model.context_length)
    # open_clip's val transform: resize the shorter side (bicubic), centre crop, normalize
    pp = {**dataclasses.asdict(open_clip.transform.PreprocessCfg()), **getattr(model.visual, "preprocess_cfg", {})}
    size = model.visual.image_size[0]
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}.get(pp["interpolation"], 3)   # PIL's numbering
    squash = pp["resize_mode"] == "squash"   # open_clip's other mode: resize to the square, no crop
    image_processor = transformers.CLIPImageProcessor(
        size={"height": size, "width": size} if squash else {"shortest_edge": size}, do_center_crop=not squash,
        crop_size={"height": size, "width": size}, resample=resample, image_mean=list(pp["mean"]),
        image_std=list(pp["std"]))
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    image_processor.save_pretrained(folder)   # preprocessor_config.json too, the file older transformers read


def export_hf_clip(model, folder):
    """Write open_clip CLIP `model` as a transformers CLIP folder (config.json, model.safetensors, tokenizer and
    image processor files) that a transformers user loads with no open_clip installed:

        model = transformers.CLIPModel.from_pretrained(FOLDER)
        processor = transformers.CLIPProcessor.from_pretrained(FOLDER)

    Same embeddings as open_clip's (tests/test_hf_export.py): the config says quick_gelu or gelu as the towers
    use, the model's text context (GOAL's 248) as max_position_embeddings, and eos_token_id 49407, which makes
    transformers pool the text at the first end-of-text token as open_clip's argmax does. A model CLIPModel
    cannot express (SigLIP, CustomTextCLIP, attentional pooling, ...) is one InputError. `load_hf_clip` reads
    the folder back."""
    transformers = _transformers()
    model = unwrap(model)
    config = transformers.CLIPConfig(**_hf_clip_config(model))
    state = {}
    for key, value in model.state_dict().items():
        names = _hf_names(key)
        if names is None:   # a parameter the checks above did not foresee: stop rather than drop it
            raise InputError(f"--export-hf: open_clip parameter {key!r} has no place in transformers' CLIPModel")
        value = value.detach().float().cpu()
        value = value.t() if key in _TRANSPOSED else value.reshape(()) if key == "logit_scale" else value
        parts = value.chunk(3) if len(names) == 3 else [value]   # q, k, v are the thirds of in_proj
        for name, part in zip(names, parts):
            state[name] = part.contiguous()
    hf_model = transformers.CLIPModel(config)
    # position_ids are buffers (saved by older transformers versions), not weights: keep the model's own
    state.update({k: v for k, v in hf_model.state_dict().items() if k.endswith("position_ids")})
    hf_model.load_state_dict(state, strict=True)
    os.makedirs(folder, exist_ok=True)
    hf_model.save_pretrained(folder)
    _write_clip_processor(transformers, model, folder)
    return folder


def _hf_config_json(folder):
    """config.json of transformers CLIP folder `folder` (read as JSON, before transformers), or one InputError."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise InputError(f"--model {HF_CLIP_PREFIX}{folder}: no config.json in {folder} (expected a transformers "
                         f"CLIP folder as CLIPModel.save_pretrained writes it, e.g. a download of "
                         f"openai/clip-vit-base-patch16)")
    with open(path) as f:
        config = json.load(f)
    if config.get("model_type") != "clip":
        raise InputError(f"--model {HF_CLIP_PREFIX}{folder}: config.json has model_type "
                         f"{config.get('model_type')!r}; only transformers' CLIP (model_type 'clip') converts to "
                         f"open_clip here (a SigLIP has another architecture: load it with open_clip's hf-hub:)")
    return config


def _open_clip_config(config, folder):
    """open_clip model config (the dict create_model builds CLIP from) equivalent to transformers CLIPConfig
    `config`, or one InputError naming what open_clip's CLIP cannot express."""
    vision, text = config.vision_config, config.text_config
    where = f"--model {HF_CLIP_PREFIX}{folder}"
    if vision.hidden_act != text.hidden_act or text.hidden_act not in ("quick_gelu", "gelu"):
        raise InputError(f"{where}: hidden_act {vision.hidden_act!r} (vision) / {text.hidden_act!r} (text); open_clip "
                         f"builds both towers with one activation, quick_gelu or gelu")
    if text.vocab_size != CLIP_VOCAB_SIZE or text.eos_token_id not in (2, CLIP_EOT_ID):
        raise InputError(f"{where}: vocab_size {text.vocab_size}, eos_token_id {text.eos_token_id}; expected CLIP's "
                         f"BPE ({CLIP_VOCAB_SIZE} tokens, end-of-text {CLIP_EOT_ID}, or 2 for transformers' legacy "
                         f"argmax pooling), the tokenizer open_clip uses")

    def tower(cfg):
        # int(width * mlp_ratio) must give the intermediate size back (e.g. 8192 / 1664 for ViT-bigG)
        ratio = cfg.intermediate_size / cfg.hidden_size
        if int(cfg.hidden_size * ratio) != cfg.intermediate_size:
            ratio = (cfg.intermediate_size + 0.5) / cfg.hidden_size
        out = {"width": cfg.hidden_size, "layers": cfg.num_hidden_layers, "mlp_ratio": ratio}
        if cfg.layer_norm_eps != 1e-5:   # open_clip's LayerNorm default
            out["norm_kwargs"] = {"eps": cfg.layer_norm_eps}
        return out
    return {"embed_dim": config.projection_dim, "quick_gelu": text.hidden_act == "quick_gelu",
            "vision_cfg": {**tower(vision), "image_size": vision.image_size, "patch_size": vision.patch_size,
                           "head_width": vision.hidden_size // vision.num_attention_heads},
            "text_cfg": {**tower(text), "heads": text.num_attention_heads, "vocab_size": text.vocab_size,
                         "context_length": text.max_position_embeddings}}


def load_hf_clip(folder, weights=None):
    """open_clip CLIP model with the weights of transformers CLIP folder `folder` (config.json and the weights,
    as CLIPModel.save_pretrained writes them; `export_hf_clip` writes such folders), on the CPU in float32.

    weights: optionally a file holding a CLIPModel state dict (torch.save), used instead of the folder's weights:
    GOAL's released weights are such files, for openai/clip-vit-base-patch16 or -large-patch14 stretched to 248
    text positions; the file's position count wins over the folder's config.
    The model config is built from the transformers config, the model created by open_clip, and the renamed
    weights loaded strictly (every parameter on both sides used once). Its preprocessing (`visual.preprocess_cfg`,
    what `image_transform_v2` builds the transforms from): the config's image size, and OpenAI's mean and std
    unless the folder's preprocessor_config.json gives others."""
    _hf_config_json(folder)
    transformers = _transformers()
    config = transformers.CLIPConfig.from_pretrained(folder)
    if weights is not None:
        try:
            hf_state = torch.load(weights, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as error:
            raise InputError(f"--pretrained {weights}: not a weights file torch can load ({error})") from None
        hf_state = hf_state.get("state_dict", hf_state)
        hf_state = {k.removeprefix("module."): v for k, v in hf_state.items()}   # saved from a DDP wrapper
        positions = hf_state.get("text_model.embeddings.position_embedding.weight")
        if positions is None:
            raise InputError(f"--pretrained {weights}: not a transformers CLIPModel state dict (no "
                             f"text_model.embeddings.position_embedding.weight)")
        config.text_config.max_position_embeddings = positions.shape[0]
    else:
        hf_state = transformers.CLIPModel.from_pretrained(folder).state_dict()
    model = open_clip.model.CLIP(**_open_clip_config(config, folder))
    state, used = {}, set()
    for key, like in model.state_dict().items():
        names = _hf_names(key)
        missing = [name for name in names if name not in hf_state]
        if missing:
            raise InputError(f"--model {HF_CLIP_PREFIX}{folder}: the weights lack {missing[0]} (expected a complete "
                             f"transformers CLIPModel)")
        value = torch.cat([hf_state[n] for n in names]) if len(names) == 3 else hf_state[names[0]]   # q, k, v: in_proj
        value = value.t() if key in _TRANSPOSED else value
        state[key] = value.reshape(like.shape).to(like.dtype)
        used.update(names)
    unused = [k for k in hf_state if k not in used and not k.endswith("position_ids")]
    if unused:
        raise InputError(f"--model {HF_CLIP_PREFIX}{folder}: the weights hold {unused[0]} (and {len(unused) - 1} "
                         f"more) that open_clip's CLIP has no place for")
    model.load_state_dict(state, strict=True)
    preprocess = dataclasses.asdict(open_clip.transform.PreprocessCfg())
    preprocess["size"] = config.vision_config.image_size
    # the image processor's config: its own file, or (transformers 5) inside the processor's
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if os.path.isfile(os.path.join(folder, name)):
            with open(os.path.join(folder, name)) as f:
                processor = json.load(f)
            processor = processor.get(section, {}) if section else processor
            preprocess["mean"] = tuple(processor.get("image_mean", preprocess["mean"]))
            preprocess["std"] = tuple(processor.get("image_std", preprocess["std"]))
            break
    open_clip.model.set_model_preprocess_cfg(model, preprocess)
    return model


# The shared budget of every method on the shapes world, so that `python <method>.py` runs compare at equal
# cost. `python -m lab.compare` and `python -m lab.budget` train on these values except for the step count and
# the training-set size (lab/compare.py: COMPARE_STEPS, COMPARE_TRAIN_SIZE).
SHAPES_DEFAULTS = {
    # The demo budget: `python degla.py` (and the other three) trains and evaluates in a few minutes on a 2-core
    # laptop (docs/performance.md). The comparisons in docs/results.md train 1000 steps on the same 20,000 scenes
    # (`python -m lab.compare`): the budget at which NegCLIP's hard negatives beat plain fine-tuning on ARO by more
    # than 5 points on the shipped base (docs/testbed.md).
    "model": TINY_MODEL, "pretrained": "shapes",
    "steps": 200,          # optimizer steps
    "batch_size": 64,      # per process
    "lr": 3e-4,            # the base model was trained at 1e-3; 1e-4 barely moved the hard-negative losses in
                           # 80-400 steps, so fine-tuning runs at 0.3x the pre-training lr
    "wd": 0.1,
    "warmup": 20,
    "train_size": 20000,   # scenes in the training split (200 steps of 64 see 12,800 of them; on 4,000 scenes
                           # seen 3 times each the demo moved DeGLA's and C2LIP's targets less: docs/performance.md)
    "workers": 0,          # rendering a 64 px scene takes ~1 ms: worker processes cost more than they save
    "epochs": 1,
    "save_every": 100,
    "eval": "shapes",
}
