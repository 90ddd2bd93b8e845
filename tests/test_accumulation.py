"""--accum-freq K: K micro-batches of b give the loss and the gradients of one batch of K x b, for every method.

Each test builds a real batch of the method (shapes world, its own collate: negatives, concepts, local pairs), a
tiny model in float64, and compares every parameter's gradient after the method's own `backward` (the function its
training loop calls) with K = 1 on the whole batch against K = 2 on its halves; on two gloo processes, the two
ranks' DDP-averaged gradients after K = 2 against one process on the whole batch (rank-major order). The
largest differences are printed (pytest -s) and recorded in docs/performance.md.
"""
import argparse
import contextlib
import math

import pytest
import torch

import c2lip
import cehn
import common
import data
import degla
import goal

MICRO = 4            # samples per micro-batch
TOLERANCE = 1e-10    # float64: the two computations differ only in summation order


def _run(world_size=1):
    """What `accumulated_backward` reads from a `common.Run`."""
    return argparse.Namespace(world_size=world_size, scaler=None, autocast=contextlib.nullcontext)


def _double(batch):
    """A collated batch as the training loop gets it (batch_stream removes "replaced"), in float64."""
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items() if k != "replaced"}


def _model(name):
    torch.manual_seed(0)
    model, _, val_tf, tokenizer = common.create_backbone(name, None)
    return model.double(), val_tf, tokenizer


def _setup(method, n_samples):
    """(model, trainable module, args, list of n_samples // MICRO micro-batches, backward(run, module, mbs))."""
    if method == "degla":
        model, val_tf, tokenizer = _model(common.TINY_MODEL)
        args = degla.parse_args(["--distill-weight", "0.02", "--ema-decay", "0.9"])
        samples = data.WithNegatives(data.ShapesDataset("train", size=n_samples, seed=1, transform=val_tf),
                                     args.neg_types.split(","))
        collate = lambda b: data.collate_negatives(b, tokenizer)  # noqa: E731
        ema = common.EMA(model, args.ema_decay)
        with torch.no_grad():   # a teacher that differs from the student, so that distillation has a gradient
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        step = lambda run, module, mbs: degla.backward(run, module, ema, mbs, args)  # noqa: E731
        module = model
    elif method == "cehn":
        model, val_tf, tokenizer = _model(common.TINY_MODEL)
        args = cehn.parse_args([])
        samples = data.WithNegatives(data.ShapesDataset("train", size=n_samples, seed=1, transform=val_tf),
                                     data.CEHN_TYPES)
        collate = lambda b: data.collate_negatives(b, tokenizer)  # noqa: E731
        theta = torch.tensor([1.0, 0.5, 2.0, 0.25][:len(cehn.NEG_TYPES)], dtype=torch.float64)
        step = lambda run, module, mbs: cehn.backward(run, module, mbs, theta, args, tokenizer)  # noqa: E731
        module = cehn.CeForward(model)
    elif method in ("c2lip-clip", "c2lip-siglip"):
        siglip = method == "c2lip-siglip"
        model, val_tf, tokenizer = _model(common.SHAPES_SIGLIP_MODEL if siglip else common.TINY_MODEL)
        args = c2lip.parse_args(["--concept-bias-init", "-2.0", "--mask-duplicates", "1"])
        samples = data.WithConcepts(data.ShapesDataset("train", size=n_samples, seed=1, transform=val_tf))
        collate = lambda b: c2lip.collate_with_words(b, tokenizer)  # noqa: E731
        concept_logits = None if siglip else \
            c2lip.ConceptLogits(args.concept_scale, args.concept_scale_init, args.concept_bias_init).double()
        module = c2lip.C2lipForward(model, concept_logits, with_concepts=True, with_patches=True)
        step = lambda run, module, mbs: c2lip.backward(run, module, mbs, args)  # noqa: E731
    elif method == "goal":
        model, val_tf, tokenizer = _model(common.TINY_MODEL)
        args = goal.parse_args(["--train-size", str(n_samples), "--pretrained", "none"])
        long_tokenizer = common.tokenizer_for(common.TINY_MODEL, context_length=args.context_length)
        # the world's own (sentence, box) pairs stand in for LISM's choice (which only picks among them)
        world = data.ShapesDataset("train", size=args.train_size, seed=args.seed, long=True)
        pairs = {f"shapes-train-{i}": {"pairs": [{"sentence": s, "box": list(b)} for s, b in sentences[:1]]}
                 for i, sentences in enumerate(world.long_sentences)}
        goal.stretch_text_positions(model, args.context_length, args.keep_positions)
        dataset, _ = goal._train_set(args, val_tf, long_tokenizer, pairs)
        assert len(dataset) >= n_samples
        samples = torch.utils.data.Subset(dataset, range(n_samples))
        collate = lambda b: data.collate_local(b, long_tokenizer)  # noqa: E731
        module = goal.GoalForward(model, False, with_local=True)
        step = lambda run, module, mbs: goal.backward(run, module, mbs, args)  # noqa: E731
    else:
        raise ValueError(method)
    whole = [samples[i] for i in range(n_samples)]
    micro_batches = [_double(collate(whole[i:i + MICRO])) for i in range(0, n_samples, MICRO)]
    return model, module, micro_batches, step


def _gradients(module):
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _one_batch(module, micro_batches, step):
    """Gradients and loss of K = 1 on the concatenation of the micro-batches (each collated on its own, so
    per-micro-batch fields (concept owners) are joined by the same rule as the training loop's)."""
    whole = _concatenate(micro_batches)
    module.zero_grad(set_to_none=True)
    result = step(_run(), module, [whole])
    return float(result[0].detach()), _gradients(module)


def _concatenate(micro_batches):
    """One batch from micro-batches: rows concatenated, C2LIP's concept owners shifted, text columns padded."""
    out = {}
    for key in micro_batches[0]:
        values = [mb[key] for mb in micro_batches]
        if key == "concept_owner":
            starts = [0]
            for mb in micro_batches[:-1]:
                starts.append(starts[-1] + len(mb["images"]))
            values = [v + s for v, s in zip(values, starts)]
        elif values[0].dim() >= 2 and values[0].dtype == torch.long:   # tokens: pad to the longest (pad id 0)
            width = max(v.shape[-1] for v in values)
            values = [torch.nn.functional.pad(v, (0, width - v.shape[-1])) for v in values]
        out[key] = torch.cat(values)
    return out


METHODS = ["degla", "cehn", "c2lip-clip", "c2lip-siglip", "goal"]


def _max_difference(got, want):
    assert got.keys() == want.keys()
    return max(float((got[k] - want[k]).abs().max()) for k in want)


@pytest.mark.parametrize("method", METHODS)
def test_two_micro_batches_equal_one_batch(method):
    model, module, micro_batches, step = _setup(method, 2 * MICRO)
    loss_one, grads_one = _one_batch(module, micro_batches, step)
    module.zero_grad(set_to_none=True)
    result = step(_run(), module, micro_batches)
    loss_two, grads_two = float(result[0].detach()), _gradients(module)
    difference = _max_difference(grads_two, grads_one)
    print(f"{method}: 1 process, K=2 vs one batch: loss |diff| {abs(loss_two - loss_one):.2e}, "
          f"max |grad diff| {difference:.2e} over {len(grads_one)} tensors")
    assert math.isclose(loss_two, loss_one, rel_tol=TOLERANCE)
    assert difference < TOLERANCE * max(1.0, max(float(g.abs().max()) for g in grads_one.values()))


def _rank_gradients(rank, world_size, methods):
    """On each rank, for every method: its two micro-batches (rank-major: rank r holds micro-batches 2r and 2r + 1)
    through the DDP-wrapped module; returns {method: (loss, DDP-averaged gradients)}. One pair of processes serves
    every method (starting processes costs more than the four methods' steps)."""
    torch.set_num_threads(1)
    results = {}
    for method in methods:
        model, module, micro_batches, step = _setup(method, 2 * world_size * MICRO)
        ddp = torch.nn.parallel.DistributedDataParallel(module)
        result = step(_run(world_size), ddp, micro_batches[2 * rank:2 * rank + 2])
        results[method] = (float(result[0].detach()), _gradients(module))
    return results


DDP_METHODS = ["degla", "cehn", "c2lip-clip", "goal"]


def test_two_processes_with_two_micro_batches_equal_one_batch():
    by_rank = common.run_cpu_processes(_rank_gradients, 2, DDP_METHODS)
    for method in DDP_METHODS:
        model, module, micro_batches, step = _setup(method, 4 * MICRO)
        loss_one, grads_one = _one_batch(module, micro_batches, step)
        for rank, results in enumerate(by_rank):
            loss, grads = results[method]
            difference = _max_difference(grads, grads_one)
            print(f"{method}: rank {rank} of 2, K=2 vs one batch on one process: loss |diff| "
                  f"{abs(loss - loss_one):.2e}, max |grad diff| {difference:.2e}")
            assert math.isclose(loss, loss_one, rel_tol=TOLERANCE), method
            assert difference < TOLERANCE * max(1.0, max(float(g.abs().max()) for g in grads_one.values())), method


def test_a_run_with_micro_batches_trains_the_same_model(tmp_path):
    """End to end: `degla.py --batch-size 4 --accum-freq 2` reads the same samples per step as `--batch-size 8`
    and ends with the same student and teacher (float32, AdamW, 3 steps)."""
    common_flags = ["--steps", "3", "--warmup", "1", "--train-size", "64", "--eval", "", "--save-every", "0",
                    "--no-progress", "--seed", "0", "--workers", "0"]
    degla.main(common_flags + ["--batch-size", "8", "--out", str(tmp_path / "one")])
    degla.main(common_flags + ["--batch-size", "4", "--accum-freq", "2", "--out", str(tmp_path / "two")])
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    for part, state_one, state_two in [("student", one["model"], two["model"]),
                                       ("teacher", one["ema"]["module"], two["ema"]["module"])]:
        for name, value in state_one.items():
            if not value.is_floating_point():
                continue
            got = state_two[name]
            if name.endswith("attn.in_proj_bias"):
                # Drop the key bias ([q; k; v], middle third): the attention softmax is invariant to it, so its true
                # gradient is 0 and float32 rounding noise is all it gets, which AdamW turns into steps of +-lr.
                width = value.shape[0] // 3
                value, got = torch.cat([value[:width], value[2 * width:]]), torch.cat([got[:width], got[2 * width:]])
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{part} {name}: {m}")
    base = common.create_backbone(common.TINY_MODEL, "shapes")[0].state_dict()
    assert not torch.allclose(one["model"]["text_projection"], base["text_projection"]), "the run did not train"
