"""Hugging Face transformers CLIP in and out (common.export_hf_clip, common.load_hf_clip).

Out: a finished run folder, written by `python eval.py --model local-dir:RUN --export-hf OUT`, loads with
`transformers.CLIPModel.from_pretrained(OUT)` and gives the embeddings open_clip gives, with OpenAI's QuickGELU and
with GELU, at GOAL's stretched text context of 248 positions; `CLIPTokenizer.from_pretrained(OUT)` tokenizes as
open_clip does. In: a transformers CLIPModel with 248 text positions (what GOAL releases) evaluates through
`--model hf-clip:FOLDER`, from its folder or from a bare state dict file, with the same embeddings. A SigLIP is
refused with one clear message both ways.

All on tiny random models whose every parameter is perturbed (fresh biases are zero and LayerNorms the identity,
which would hide a swapped name), in float32, where the two implementations agree to rounding.
"""
import json
import os

import open_clip
import pytest
import torch
import transformers

import common
import eval as evaluation
import goal

QUICK = common.TINY_MODEL + "-quickgelu"   # the tiny CLIP with OpenAI's activation, registered by `quick_tiny`
TOLERANCE = 1e-5
CAPTIONS = ["A red circle left of a blue square.", "two green triangles, and nothing else!",
            "a long caption " + "with a small yellow star above a large purple cross " * 12]


@pytest.fixture(scope="module")
def quick_tiny(tmp_path_factory):
    """Register shapes-tiny-vit-quickgelu (TINY_MODEL_CONFIG plus quick_gelu) with open_clip for these tests."""
    path = tmp_path_factory.mktemp("configs") / f"{QUICK}.json"
    path.write_text(json.dumps({**common.TINY_MODEL_CONFIG, "quick_gelu": True}))
    common.register_tiny_model()
    open_clip.add_model_config(path)
    return QUICK


def _perturb(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _hf_embeddings(hf_model, images, tokens):
    """transformers' image and text embeddings (get_*_features returns a tensor before transformers 5, an output
    whose pooler_output is the embedding since)."""
    with torch.no_grad():
        image = hf_model.get_image_features(pixel_values=images)
        text = hf_model.get_text_features(input_ids=tokens)
    return [x if torch.is_tensor(x) else x.pooler_output for x in (image, text)]


def _max_differences(model, hf_model, image_size, tokenizer, label):
    images = torch.randn(3, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    tokens = tokenizer(CAPTIONS)
    with torch.no_grad():
        ours = [model.encode_image(images), model.encode_text(tokens)]
    theirs = _hf_embeddings(hf_model, images, tokens)
    image_diff, text_diff = [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
    print(f"{label}: max |open_clip - transformers| image {image_diff:.2e}, text {text_diff:.2e}")
    return image_diff, text_diff


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_a_run_exported_with_export_hf_gives_open_clips_embeddings_in_transformers(activation, quick_tiny, tmp_path):
    name = QUICK if activation == "quick_gelu" else common.TINY_MODEL
    model, _, _, _ = common.create_backbone(name, None)
    goal.stretch_text_positions(model, 248, 20)   # GOAL's stretched context: just more positions
    _perturb(model)
    tokenizer = open_clip.get_tokenizer(common.TINY_MODEL, context_length=248)
    run = tmp_path / "run"
    os.makedirs(run)
    common.export_open_clip(model, str(run / "final.pt"), name, tokenizer, meta={"method": "test"})

    out = tmp_path / "hf"
    assert evaluation.main(["--model", f"local-dir:{run}", "--export-hf", str(out), "--device", "cpu"]) is None
    hf_model = transformers.CLIPModel.from_pretrained(str(out)).eval()
    assert hf_model.config.text_config.hidden_act == activation
    assert hf_model.config.vision_config.hidden_act == activation
    assert hf_model.config.text_config.max_position_embeddings == 248
    image_diff, text_diff = _max_differences(model, hf_model, 64, tokenizer, f"export ({activation})")
    assert image_diff < TOLERANCE and text_diff < TOLERANCE

    # the tokenizer files, derived from open_clip's own BPE file: the same ids up to the end-of-text token
    # (transformers pads with <|endoftext|>, open_clip with 0; the causal mask makes padding irrelevant)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(out))
    assert hf_tokenizer.model_max_length == 248
    hf_ids = hf_tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=248, return_tensors="pt")
    ids = tokenizer(CAPTIONS)
    eot = ids.argmax(dim=-1)
    for row in range(len(CAPTIONS)):
        assert torch.equal(hf_ids.input_ids[row, :eot[row] + 1], ids[row, :eot[row] + 1])
    assert transformers.CLIPProcessor.from_pretrained(str(out)).image_processor.crop_size["height"] == 64


def test_a_transformers_clip_with_248_positions_evaluates_through_hf_clip(tmp_path):
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 248, "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"},
        projection_dim=48)
    torch.manual_seed(0)
    hf_model = _perturb(transformers.CLIPModel(config))
    folder = tmp_path / "goal-like"
    hf_model.save_pretrained(str(folder))

    # through the project's entry point, as `python eval.py --model hf-clip:FOLDER` loads it
    model, transform, tokenizer = evaluation.create_backbone(f"hf-clip:{folder}", "", "cpu")
    assert model.context_length == 248 and tokenizer.context_length == 248
    assert evaluation._transform_size(transform) == 32
    image_diff, text_diff = _max_differences(model.eval(), hf_model, 32, tokenizer, "hf-clip: folder")
    assert image_diff < TOLERANCE and text_diff < TOLERANCE

    # GOAL's released files are bare state dicts for openai/clip-vit-*: the folder gives the config (77 positions
    # there), --pretrained the weights, whose 248 positions win
    config.text_config.max_position_embeddings = 77
    base = tmp_path / "openai-like"
    config.save_pretrained(str(base))
    weights = tmp_path / "goal_weights.pth"
    torch.save(hf_model.state_dict(), str(weights))
    model, _, tokenizer = evaluation.create_backbone(f"hf-clip:{base}", str(weights), "cpu")
    assert tokenizer.context_length == 248
    image_diff, text_diff = _max_differences(model.eval(), hf_model, 32, tokenizer, "hf-clip: + state dict")
    assert image_diff < TOLERANCE and text_diff < TOLERANCE

    # fine-tuned from it, a run exports as an open_clip folder as usual (its config converted from the transformers one)
    run = tmp_path / "run"
    os.makedirs(run)
    common.export_open_clip(model, str(run / "final.pt"), f"hf-clip:{folder}", tokenizer)
    again, _, _ = evaluation.create_backbone(f"local-dir:{run}", "", "cpu")
    image_diff, text_diff = _max_differences(again.eval(), hf_model, 32, tokenizer, "hf-clip: -> local-dir:")
    assert image_diff < TOLERANCE and text_diff < TOLERANCE


def test_a_siglip_is_refused_with_one_clear_message_both_ways(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        evaluation.main(["--model", common.SHAPES_SIGLIP_MODEL, "--pretrained", "none", "--export-hf",
                         str(tmp_path / "out"), "--device", "cpu"])
    assert stop.value.code == 2
    message = capsys.readouterr().err
    assert "logit bias (a SigLIP model" in message and "transformers' CLIPModel cannot express" in message, message
    assert not (tmp_path / "out").exists()

    folder = tmp_path / "siglip"
    os.makedirs(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "siglip", "architectures": ["SiglipModel"]}))
    with pytest.raises(common.InputError, match="model_type 'siglip'; only transformers' CLIP"):
        common.create_backbone(f"hf-clip:{folder}", None)
