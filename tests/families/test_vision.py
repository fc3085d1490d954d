"""Models that read images: BLIP captioning, a LLaVA-style image-text-to-text model and a ViT classifier,
tiny and random, with calibration images listed in JSONL and read by each model's own processor."""

import json

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

import iteris
from iteris.errors import IterisError
from tests.helpers import fixtures as fx
from tests.helpers.reference import dense_iteris

F64 = torch.float64
BATCH = 2
TEXTS = ["a red square", "two cats on a sofa", "a photo of the sea", "an old house", "a dog", "green leaves"]


def _blip(root):
    tok = fx.make_tokenizer(root / "tokenizer", "bert")
    processor = T.BlipProcessor(image_processor=T.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    config = T.BlipConfig(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=tok.cls_token_id,
                         pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id),
    )
    return T.BlipForConditionalGeneration(config), processor


def _llava(root):
    tok = fx.make_tokenizer(root / "tokenizer", "llama")
    tok.add_tokens(["<image>"], special_tokens=True)
    image_processor = T.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=8,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = T.LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=16, patch_size=8, projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return T.LlavaForConditionalGeneration(config), processor


def _vit(root):
    processor = T.ViTImageProcessor(size={"height": 16, "width": 16})
    config = T.ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         image_size=16, patch_size=8, num_labels=3)
    return T.ViTForImageClassification(config), processor


MODELS = {  # builder, LoRA targets (vision encoder and text side alike), whether samples carry text
    "blip": (_blip, ["qkv", "query", "value", "projection"], True),
    "llava": (_llava, ["q_proj", "v_proj", "linear_1", "down_proj"], True),
    "vit": (_vit, ["q_proj", "v_proj", "fc2"], False),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i in range(len(TEXTS)):
        rng = np.random.RandomState(i)
        size = (20 + 4 * i, 24 + 2 * i)
        Image.fromarray((rng.rand(*size, 3) * 255).astype("uint8")).save(root / f"img{i}.png")
    return root


def _base(tmp_path, family):
    build, _, _ = MODELS[family]
    torch.manual_seed(0)
    model, processor = build(tmp_path)
    path = tmp_path / family
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _auto(family):
    return T.AutoModelForImageClassification if family == "vit" else T.AutoModelForImageTextToText


def _adapter(base_dir, family, out, seed):
    """A PEFT LoRA with random nonzero A and B; returns its directory and {layer: dW} in the base model's names."""
    from peft import LoraConfig, get_peft_model

    model = _auto(family).from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=MODELS[family][1]))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
                deltas[name] = module.scaling["default"] * B.to(F64) @ A.to(F64)  # PEFT's own product is float32
    peft_model.save_pretrained(out)
    return out, deltas


NO_TEXT = {2, 5}  # image-only records beside image + text ones


def _text(family, i):
    """What the model reads with image i, as the merge gives it to the processor."""
    text = "" if i in NO_TEXT else TEXTS[i]
    return (f"<image>\n{text}" if text else "<image>") if family == "llava" else text


def _data(path, family, indices):
    with_text = MODELS[family][2]
    rows = [{"image": f"img{i}.png", **({"text": TEXTS[i]} if with_text and i not in NO_TEXT else {})} for i in indices]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("family", sorted(MODELS))
def test_image_models_merge_as_the_float64_reference(tmp_path, images, family):
    base_dir = _base(tmp_path, family)
    adapters = [_adapter(base_dir, family, tmp_path / f"a{i}", seed=10 + i) for i in range(2)]
    # the data files sit beside the images: their paths are relative to the file
    data = [_data(images / f"{family}_{i}.jsonl", family, idx) for i, idx in enumerate(([0, 1, 2], [3, 4, 5]))]
    params = {"iterations": 1, "alpha1": 1e-3, "alpha2": 1e-3}
    result = iteris.merge({
        "base_model": str(base_dir), "method": "iteris", "parameters": params, "device": "cpu", "dtype": "float64",
        "progress": False, "calibration": {"batch_size": BATCH},
        "adapters": [{"name": f"a{i}", "path": str(a[0]), "data": str(d)} for i, (a, d) in enumerate(zip(adapters, data))],
    }, out=tmp_path / "out")
    assert result.report["calibration"]["model_kind"] == "images"

    processor = T.AutoProcessor.from_pretrained(base_dir)
    base = _auto(family).from_pretrained(base_dir, dtype=F64).eval()

    def one(i):
        with Image.open(images / f"img{i}.png") as img:
            image = img.convert("RGB")
        if not MODELS[family][2]:
            return processor(images=[image], return_tensors="pt")
        return processor(images=[image], text=[_text(family, i)], return_tensors="pt")

    task_inputs = [[one(i) for i in idx] for idx in ([0, 1, 2], [3, 4, 5])]
    names = sorted(set(adapters[0][1]) | set(adapters[1][1]))
    reference = dense_iteris(base, [a[1] for a in adapters], task_inputs, names, 1, 1e-3, 1e-3,
                             run=lambda model, inputs: model(**inputs))
    num = sum(float((result.deltas[n].dense().to(F64) - reference[n]).pow(2).sum()) for n in names)
    den = sum(float(reference[n].pow(2).sum()) for n in names)
    assert (num / den) ** 0.5 < 1e-8
    # the merged adapter is a PEFT adapter of the same model class
    from peft import PeftModel

    merged = PeftModel.from_pretrained(_auto(family).from_pretrained(base_dir, dtype=F64), str(tmp_path / "out"))
    name = names[0]
    torch.testing.assert_close(merged.base_model.model.get_submodule(name).get_delta_weight("default").to(F64),
                               result.deltas[name].dense().to(F64))


def test_image_data_errors(tmp_path, images):
    base_dir = _base(tmp_path, "vit")
    adapter, _ = _adapter(base_dir, "vit", tmp_path / "a", seed=1)
    no_images = tmp_path / "texts.jsonl"
    no_images.write_text(json.dumps({"text": "no image here"}))
    config = {"base_model": str(base_dir), "device": "cpu", "progress": False,
              "adapters": [{"name": "a", "path": str(adapter), "data": str(no_images)}]}
    with pytest.raises(IterisError, match="no 'image' field"):
        iteris.merge(config)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"image": "nowhere.png"}))
    config["adapters"][0]["data"] = str(missing)
    with pytest.raises(IterisError, match="cannot read image"):
        iteris.merge(config)
    config["adapters"][0]["data"] = str(_data(images / "vit_err.jsonl", "vit", [0]))
    with pytest.raises(IterisError, match="generate"):
        iteris.merge(config, calibration={"generate": True})


def test_data_free_methods_check_image_models_without_loading_weights(tmp_path):
    base_dir = _base(tmp_path, "llava")
    adapters = [_adapter(base_dir, "llava", tmp_path / f"a{i}", seed=i) for i in range(2)]
    result = iteris.merge({"base_model": str(base_dir), "method": "task_arithmetic", "device": "cpu", "progress": False,
                           "adapters": [{"name": f"a{i}", "path": str(a[0])} for i, a in enumerate(adapters)]})
    for name, d in result.deltas.items():
        want = sum(a[1].get(name, 0) for a in adapters)
        torch.testing.assert_close(d.dense().to(F64), want, rtol=1e-5, atol=1e-7)


def test_image_batches_stack_only_alike_images_and_pad_per_token_extras():
    from iteris.families.vision import ImageSample, image_batches, make_image_batch

    def sample(pixels, n_ids):
        return ImageSample(pixel_values=torch.zeros(1, *pixels), input_ids=list(range(1, n_ids + 1)),
                           extra={"token_type_ids": torch.ones(1, n_ids, dtype=torch.long)})

    a, b, c, d = sample((3, 16, 16), 3), sample((3, 16, 16), 5), sample((5, 3, 16, 16), 4), sample((3, 16, 16), 2)
    groups = image_batches([a, b, c, d], batch_size=4)
    assert [len(g) for g in groups] == [2, 1, 1]  # a tiled image of another patch count starts a new batch
    batch = make_image_batch(groups[0], pad=0, device="cpu")
    assert batch.inputs["token_type_ids"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.masks[5].tolist() == [[True, True, True, False, False], [True] * 5]
    with pytest.raises(ValueError):
        make_image_batch([a, c], pad=0, device="cpu")
