"""Text-to-image pipelines: LoRA formats, calibration from the pipeline's own sampling, output that diffusers
loads, and the denoiser's merge against an independent float64 computation."""

import copy
import json

import pytest
import torch
import yaml
from safetensors import safe_open

import iteris
from iteris.families.diffusion import _prompt_batches, record_calls, recorded_steps
from iteris.families.diffusion_lora import read_lora
from iteris.errors import IterisError
from tests.helpers import pipeline_fixtures as pf
from tests.helpers import reference

pytest.importorskip("diffusers")
F64 = torch.float64


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return pf.build_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    cube = root / "cube.jsonl"
    cube.write_text("\n".join(json.dumps({"prompt": t}) for t in ["a red cube", "a green cube on grass", "the cube"]))
    dog = root / "dog.txt"
    dog.write_text("a dog\na blue dog\na dog running\n")
    return cube, dog


def _pipeline(path, dtype=torch.float32):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _expected(layers, scale=2.0):
    """{component: {module: scale * B @ A}} straight from the PEFT state dicts."""
    out = {}
    for component, state in layers.items():
        out[component] = {}
        for key, A in state.items():
            if ".lora_A." in key:
                module = key.split(".lora_A.")[0]
                B = state[key.replace(".lora_A.", ".lora_B.")]
                out[component][module] = scale * B.double().flatten(1) @ A.double().flatten(1)  # (1x1 convolutions: 4-D)
    return out


def test_diffusers_and_kohya_files_read_with_the_scales_diffusers_applies(tmp_path, pipe_dir):
    layers = pf.lora_layers(pipe_dir, seed=1)
    expected = _expected(layers)
    diffusers_dir = pf.save_diffusers_lora(layers, tmp_path / "diffusers")
    kohya_file = pf.save_kohya_lora(layers, tmp_path / "kohya")
    pipe = _pipeline(pipe_dir)
    for source in (diffusers_dir, kohya_file):
        read = read_lora(pipe, "a", source)
        assert set(read) == {"unet", "text_encoder"}
        for component, adapter in read.items():
            assert set(adapter.modules) == set(expected[component])
            for name, lora in adapter.modules.items():
                torch.testing.assert_close(lora.delta(), expected[component][name], rtol=1e-6, atol=1e-7)
    # the pipeline is left as it was: plain layers, no adapter bookkeeping
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(m, LoraLayer) for c in ("unet", "text_encoder") for m in getattr(pipe, c).modules())
    # and diffusers' own loading (what load_lora_weights does for the denoiser) applies the same update
    fresh = _pipeline(pipe_dir)
    state, alphas = fresh.lora_state_dict(str(kohya_file.parent), weight_name=kohya_file.name)
    fresh.unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="k")
    for name, delta in expected["unet"].items():
        torch.testing.assert_close(fresh.unet.get_submodule(name).get_delta_weight("k").double().flatten(1), delta,
                                   rtol=1e-6, atol=1e-7)


def test_recorded_steps_and_prompt_batches(tmp_path, prompts):
    assert recorded_steps(20, 4) == [0, 6, 13, 19]
    assert recorded_steps(3, 5) == [0, 1, 2]
    assert recorded_steps(10, [9, 0, 0]) == [0, 9]
    with pytest.raises(IterisError, match="0..9"):
        recorded_steps(10, [10])
    cube, dog = prompts
    cfg = iteris.load_config({"base_model": "x", "adapters": [
        {"name": "cube", "path": "a", "data": str(cube), "trigger": "sks"}, {"name": "dog", "path": "b", "data": str(dog)},
    ], "calibration": {"batch_size": 2}})
    cube_batches, dog_batches = _prompt_batches(cfg)
    assert [len(b) for b in cube_batches] == [2, 1] and [len(b) for b in dog_batches] == [2, 1]
    assert all(p.startswith("sks ") for b in cube_batches for p in b)
    assert sorted(p for b in dog_batches for p in b) == ["a blue dog", "a dog", "a dog running"]


def _write_config(tmp_path, pipe_dir, adapters, calibration=None, **extra):
    config = {
        "base_model": str(pipe_dir), "adapters": adapters, "device": "cpu", "progress": False,
        "calibration": {"steps": 4, "timesteps": 2, "seeds": [0, 1], "batch_size": 2, "guidance_scale": 5.0,
                        **(calibration or {})},
        **extra,
    }
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _loaded_and_merged(pipe_dir, out, component, deltas):
    """The component as diffusers loads it from the merged LoRA file, and as the merge computed it in memory."""
    loaded = getattr(_pipeline(pipe_dir), component)
    loaded.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix=component,
                             adapter_name="merged")
    merged = getattr(_pipeline(pipe_dir), component)
    _add_to_weights(merged, deltas)
    return loaded, merged


def _add_to_weights(module, deltas):
    """The merged denoiser in memory: W0 + B A written into its weights (1x1 convolutions: 4-D)."""
    with torch.no_grad():
        for name, d in deltas.items():
            w = module.get_submodule(name).weight
            w += (d.B @ d.A).to(w.dtype).reshape(w.shape)


def _unet_output(unet, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dtype = unet.dtype
    latents = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    context = torch.randn(2, 12, 12, generator=gen).to(dtype)
    with torch.no_grad():
        return unet(latents, torch.tensor(500), encoder_hidden_states=context).sample


def test_merged_lora_loads_in_diffusers_and_reproduces_the_merged_denoiser(tmp_path, pipe_dir, prompts):
    cube, dog = prompts
    first = pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=1), tmp_path / "cube")
    second = pf.save_kohya_lora(pf.lora_layers(pipe_dir, seed=2, targets={"unet": pf.UNET_TARGETS}), tmp_path / "dog")
    config = _write_config(tmp_path, pipe_dir, [
        {"name": "cube", "path": str(first), "data": str(cube), "trigger": "sks"},
        {"name": "dog", "path": str(second), "data": str(dog)},
    ], parameters={"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4})
    result = iteris.merge(config, out=tmp_path / "out")
    assert set(result.deltas) == {"text_encoder", "unet"}
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["pipeline"] == "StableDiffusionPipeline" and report["output"]["exact"]
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "out" / "README.md")  # the pipeline's LoRA has its model card too
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert "| cube |" in card.text and "| dog |" in card.text
    # 3 prompts in batches of 2, 2 seeds, 2 recorded steps: 8 denoiser calls per adapter (CFG pairs inside)
    assert report["components"]["unet"]["calibration"]["calls"] == [8, 8]
    assert report["components"]["text_encoder"]["calibration"]["calls"] == [8, 8]  # prompt + negative prompt
    ranks = {name: d.rank for name, d in result.deltas["unet"].items()}
    assert set(ranks.values()) == {4}  # exact: the sum of the two adapters' ranks

    # the denoiser that diffusers loads from the file computes what the merged denoiser in memory computes
    loaded, merged = _loaded_and_merged(pipe_dir, tmp_path / "out", "unet", result.deltas["unet"])
    torch.testing.assert_close(_unet_output(loaded), _unet_output(merged), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_unet_output(loaded), _unet_output(_pipeline(pipe_dir).unet), atol=1e-3)
    # the text encoder's part is written as diffusers writes it, with the scale folded in (alpha = r)
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = set(f.keys())
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
        for name, d in result.deltas["text_encoder"].items():
            A, B = f.get_tensor(f"text_encoder.{name}.lora_A.weight"), f.get_tensor(f"text_encoder.{name}.lora_B.weight")
            torch.testing.assert_close(B @ A, (d.B @ d.A).float())
    assert all(k.startswith(("unet.", "text_encoder.")) for k in keys)
    assert metadata["text_encoder.lora_alpha"] == metadata["text_encoder.r"] == 2
    assert metadata["unet.lora_alpha"] == metadata["unet.r"] == 4


class _Recorder:
    """A component's calls during pipeline runs; for the denoiser only those at the given steps (independent
    of iteris' recorder)."""

    def __init__(self, module, steps=None):
        self.calls, self.steps, self.count = [], steps, 0
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        if self.steps is None or self.count in self.steps:
            self.calls.append((args, dict(kwargs)))
        self.count += 1


def _run_call(model, call):
    args, kwargs = call
    return model(*args, **kwargs)


def test_pipeline_merge_equals_a_float64_reference(tmp_path, prompts):
    """Text encoder and denoiser both carry LoRAs: the text encoder's merge, and the denoiser's, whose merged
    model receives the merged text encoder's conditioning, against dense float64 solves on kept features."""
    pipe_dir = pf.build_pipeline(tmp_path / "pipe64", dtype=F64)
    layers = [pf.lora_layers(pipe_dir, seed=s, targets={"unet": pf.UNET_TARGETS, "text_encoder": ("q_proj", "v_proj", "fc1")}) for s in (3, 4)]
    paths = [pf.save_diffusers_lora(l, tmp_path / f"lora{i}") for i, l in enumerate(layers)]
    alpha = 1e-3
    config = _write_config(tmp_path, pipe_dir, [
        {"name": "cube", "path": str(paths[0]), "data": str(prompts[0])},
        {"name": "dog", "path": str(paths[1]), "data": str(prompts[1])},
    ], parameters={"iterations": 1, "alpha1": alpha, "alpha2": alpha}, dtype="float64",
        calibration={"steps": 3, "timesteps": 2, "seeds": [0]})
    ours = iteris.merge(config).deltas

    # the reference: weights written into copies, every feature kept, dense solves
    batches = _prompt_batches(iteris.load_config(config))  # the same prompts in the same batches
    expected = [_expected(l) for l in layers]
    base = _pipeline(pipe_dir, F64)
    run_kwargs = dict(num_inference_steps=3, guidance_scale=5.0, output_type="latent")
    text_calls, unet_calls = [], []
    for i, dW in enumerate(expected):
        pipe = copy.deepcopy(base)
        with torch.no_grad():
            for component, deltas in dW.items():
                for n, d in deltas.items():
                    w = getattr(pipe, component).get_submodule(n).weight
                    w += d.reshape(w.shape)
        text, unet = _Recorder(pipe.text_encoder), _Recorder(pipe.unet, steps=(0, 2))
        for prompts_batch in batches[i]:
            unet.count = 0
            pipe(prompt=prompts_batch, generator=torch.Generator("cpu").manual_seed(0), **run_kwargs)
        text.handle.remove()
        unet.handle.remove()
        text_calls.append(text.calls)
        unet_calls.append(unet.calls)

    text_names = sorted(expected[0]["text_encoder"])
    text_ref = reference.dense_iteris(base.text_encoder, [e["text_encoder"] for e in expected], text_calls, text_names,
                                      1, alpha, alpha, run=_run_call)
    # what the denoiser of the merged pipeline receives: the merged text encoder's conditioning
    merged_pipe = copy.deepcopy(base)
    with torch.no_grad():
        for n, d in text_ref.items():
            merged_pipe.text_encoder.get_submodule(n).weight += d
    conditioning = []
    for task_batches in batches:
        cond = []
        for prompts_batch in task_batches:
            recorder = _Recorder(merged_pipe.unet, steps=(0,))
            merged_pipe(prompt=prompts_batch, generator=torch.Generator("cpu").manual_seed(0), **run_kwargs)
            recorder.handle.remove()
            cond.append(recorder.calls[0][1]["encoder_hidden_states"])
        conditioning.append(cond)
    merged_calls = [[(args, {**kwargs, "encoder_hidden_states": conditioning[i][k // 2]})
                     for k, (args, kwargs) in enumerate(calls)] for i, calls in enumerate(unet_calls)]  # 2 steps a batch
    unet_names = sorted(expected[0]["unet"])
    unet_ref = reference.dense_iteris(base.unet, [e["unet"] for e in expected], unet_calls, unet_names, 1, alpha, alpha,
                                      run=_run_call, merged_inputs=merged_calls)
    for component, ref in (("text_encoder", text_ref), ("unet", unet_ref)):
        num = sum(float((ours[component][n].B.double() @ ours[component][n].A.double() - ref[n]).pow(2).sum()) for n in ref)
        den = sum(float(ref[n].pow(2).sum()) for n in ref)
        assert (num / den) ** 0.5 < 1e-8, component
    # the coupling matters: with the adapters' own conditioning the denoiser's answer differs
    unaware = reference.dense_iteris(base.unet, [e["unet"] for e in expected], unet_calls, unet_names, 1, alpha, alpha,
                                     run=_run_call)
    gap = sum(float((unaware[n] - unet_ref[n]).pow(2).sum()) for n in unet_names) / sum(
        float(unet_ref[n].pow(2).sum()) for n in unet_names)
    assert gap ** 0.5 > 1e-6


def test_data_free_baselines_merge_a_pipeline(tmp_path, pipe_dir):
    layers = [pf.lora_layers(pipe_dir, seed=s) for s in (5, 6)]
    paths = [pf.save_diffusers_lora(layers[0], tmp_path / "a"), pf.save_kohya_lora(layers[1], tmp_path / "b")]
    config = _write_config(tmp_path, pipe_dir, [
        {"name": "a", "path": str(paths[0]), "weight": 0.7}, {"name": "b", "path": str(paths[1]), "weight": 0.3},
    ], method="task_arithmetic")
    result = iteris.merge(config, out=tmp_path / "out")
    expected = [_expected(l) for l in layers]
    for component in ("unet", "text_encoder"):
        for name, d in result.deltas[component].items():
            want = 0.7 * expected[0][component][name] + 0.3 * expected[1][component][name]
            torch.testing.assert_close(d.B.double() @ d.A.double(), want, rtol=1e-5, atol=1e-7)
    # what diffusers computes with both LoRAs loaded and set_adapters(weights): the same denoiser
    from diffusers import StableDiffusionPipeline

    # (denoiser-only LoRAs, so that the pipeline's own load_lora_weights runs end to end here)
    unet_only = [pf.save_diffusers_lora({"unet": layers[i]["unet"]}, tmp_path / f"unet{i}") for i in range(2)]
    only = iteris.merge(_write_config(tmp_path, pipe_dir, [
        {"name": "a", "path": str(unet_only[0]), "weight": 0.7}, {"name": "b", "path": str(unet_only[1]), "weight": 0.3},
    ], method="linear"), out=tmp_path / "unet_out")
    assert set(only.deltas) == {"unet"}
    both = _pipeline(pipe_dir)
    for i in range(2):
        state, _, metadata = StableDiffusionPipeline.lora_state_dict(str(unet_only[i]), return_lora_metadata=True)
        both.unet.load_lora_adapter(state, metadata=metadata, prefix="unet", adapter_name=f"l{i}")
    both.unet.set_adapters(["l0", "l1"], weights=[0.7, 0.3])
    loaded = _pipeline(pipe_dir)
    loaded.load_lora_weights(str(tmp_path / "unet_out"))
    torch.testing.assert_close(_unet_output(loaded.unet), _unet_output(both.unet), rtol=1e-4, atol=1e-5)
    # compressed on request, with the error reported
    small = iteris.merge(config, rank=1)
    assert {d.rank for d in small.deltas["unet"].values()} == {1}
    assert not small.report["output"]["exact"]
    ties = iteris.merge(config, method="ties", out=tmp_path / "ties")
    assert ties.report["output"]["file"] == "pytorch_lora_weights.safetensors"
    assert (tmp_path / "ties" / "pytorch_lora_weights.safetensors").is_file()


def test_pipeline_errors_come_before_any_work(tmp_path, pipe_dir, prompts):
    lora = pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=1), tmp_path / "l")
    config = _write_config(tmp_path, pipe_dir, [{"name": "a", "path": str(lora)}, {"name": "b", "path": str(lora)}])
    with pytest.raises(IterisError, match="calibration prompts"):
        iteris.merge(config)
    with pytest.raises(IterisError, match="fuse_lora"):
        iteris.merge(config, method="task_arithmetic", merge_into_base=True)
    with pytest.raises(IterisError, match="no LoRA weights"):
        iteris.merge(_write_config(tmp_path, pipe_dir, [{"name": "a", "path": str(tmp_path)}]), method="task_arithmetic")
    # a LoRA whose layers this pipeline does not have
    from safetensors.torch import save_file

    (tmp_path / "other").mkdir()
    save_file({"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 8),
               "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(8, 2)},
              str(tmp_path / "other" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(IterisError, match="another kind of pipeline"):
        iteris.merge(_write_config(tmp_path, pipe_dir, [{"name": "a", "path": str(tmp_path / "other")}]),
                     method="task_arithmetic")
    with pytest.raises(IterisError, match="timesteps"):
        iteris.merge(config, calibration={"timesteps": [0, "x"]})
    assert not (tmp_path / "out").exists()


def test_flux_transformer_denoiser(tmp_path, prompts):
    """A transformer denoiser called with keyword arguments only (latents, ids, pooled and sequence
    conditioning): calibration, merge and a LoRA file that diffusers loads into it."""
    from diffusers import FluxPipeline

    pipe_dir = pf.build_flux_pipeline(tmp_path / "flux")
    targets = {"transformer": ("to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "add_k_proj"), "text_encoder": ("q_proj", "v_proj")}
    first = pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=1, targets=targets), tmp_path / "a", pipeline_class=FluxPipeline)
    second = pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=2, targets={"transformer": targets["transformer"]}),
                                    tmp_path / "b", pipeline_class=FluxPipeline)
    config = _write_config(tmp_path, pipe_dir, [
        {"name": "a", "path": str(first), "data": str(prompts[0])}, {"name": "b", "path": str(second), "data": str(prompts[1])},
    ], parameters={"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4},
        calibration={"guidance_scale": 3.5, "height": 16, "width": 16, "steps": 3})
    result = iteris.merge(config, out=tmp_path / "out")
    assert result.report["pipeline"] == "FluxPipeline"
    assert set(result.deltas) == {"text_encoder", "transformer"}
    assert result.report["components"]["transformer"]["calibration"]["calls"] == [8, 8]  # 2 batches x 2 seeds x 2 steps
    loaded, merged = _loaded_and_merged(pipe_dir, tmp_path / "out", "transformer", result.deltas["transformer"])
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 4, generator=gen), timestep=torch.tensor([0.5]),
                  pooled_projections=torch.randn(1, 32, generator=gen), encoder_hidden_states=torch.randn(1, 16, 32, generator=gen),
                  txt_ids=torch.zeros(16, 3), img_ids=torch.zeros(64, 3), return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], merged(**inputs)[0], rtol=1e-4, atol=1e-5)


def test_sdxl_two_text_encoders_and_added_conditioning(tmp_path, prompts):
    """SDXL: LoRAs on both text encoders and the UNet; the merged UNet's added conditioning (pooled text
    embeddings) and its cross-attention inputs come from the merged text encoders."""
    from diffusers import StableDiffusionXLPipeline

    pipe_dir = pf.build_sdxl_pipeline(tmp_path / "sdxl")
    targets = {"unet": pf.UNET_TARGETS, "text_encoder": ("q_proj", "v_proj"), "text_encoder_2": ("q_proj", "fc1")}
    paths = [pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=s, targets=targets), tmp_path / f"l{s}",
                                    pipeline_class=StableDiffusionXLPipeline) for s in (1, 2)]
    config = _write_config(tmp_path, pipe_dir, [
        {"name": "a", "path": str(paths[0]), "data": str(prompts[0])}, {"name": "b", "path": str(paths[1]), "data": str(prompts[1])},
    ], parameters={"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4}, calibration={"height": 16, "width": 16, "steps": 3})
    result = iteris.merge(config, out=tmp_path / "out")
    assert set(result.deltas) == {"text_encoder", "text_encoder_2", "unet"}
    with safe_open(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), "pt") as f:
        prefixes = {k.split(".")[0] for k in f.keys()}
    assert prefixes == {"text_encoder", "text_encoder_2", "unet"}
    # every component read back from the file gives the merged factors
    pipe = _pipeline(pipe_dir)
    back = read_lora(pipe, "merged", tmp_path / "out")
    for component, adapter in back.items():
        for name, lora in adapter.modules.items():
            d = result.deltas[component][name]
            torch.testing.assert_close(lora.delta(), (d.B.double() @ d.A.double()), rtol=1e-5, atol=1e-7)


def test_recorded_steps_follow_the_pipeline_loop_not_the_denoiser_calls(pipe_dir):
    """A second-order scheduler runs two denoiser calls for most steps: the recorded ones are still spread
    over the whole loop (the pipeline's own step count), first and last included."""
    from diffusers import HeunDiscreteScheduler

    pipe = _pipeline(pipe_dir)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    cal = iteris.load_config({"base_model": "x", "adapters": [{"name": "a", "path": "a"}],
                              "calibration": {"steps": 3, "timesteps": 2, "guidance_scale": 5.0}}).calibration
    calls = record_calls(pipe, ["unet"], [["a red cube"]], cal)["unet"]
    loop = pipe.scheduler.timesteps
    assert len(loop) == 5  # 3 steps, the inner ones twice
    assert [float(c.args[1]) for _, _, c in calls] == [float(loop[0]), float(loop[-1])]


def test_awkward_adapter_names_and_lora_bias(tmp_path, pipe_dir, prompts):
    lora = pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=1), tmp_path / "style.v1")
    config = _write_config(tmp_path, pipe_dir, [{"path": str(lora)}, {"name": "my.other.lora", "path": str(lora)}],
                           method="task_arithmetic")
    assert [a["name"] for a in iteris.merge(config).report["adapters"]] == ["style.v1", "my.other.lora"]
    # a LoRA that trains biases cannot be expressed by the merge: refused, not dropped
    from safetensors.torch import load_file, save_file

    state = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    key = next(k for k in state if k.endswith("lora_B.weight"))
    state[key.replace("lora_B.weight", "lora_B.bias")] = torch.zeros(state[key].shape[0])
    (tmp_path / "biased").mkdir()
    save_file(state, str(tmp_path / "biased" / "pytorch_lora_weights.safetensors"))
    with pytest.raises(IterisError, match="lora_bias"):
        iteris.merge(_write_config(tmp_path, pipe_dir, [{"name": "b", "path": str(tmp_path / "biased")}]),
                     method="task_arithmetic")


def test_sd3_transformer_and_two_clip_encoders(tmp_path, prompts):
    """SD3: LoRAs on the MMDiT denoiser (image and context streams) and on both CLIP encoders; the merged
    transformer loaded by diffusers computes what the merged one in memory does."""
    from diffusers import StableDiffusion3Pipeline

    pipe_dir = pf.build_sd3_pipeline(tmp_path / "sd3")
    targets = {"transformer": ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_q_proj"),
               "text_encoder": ("q_proj", "v_proj"), "text_encoder_2": ("q_proj", "fc1")}
    paths = [pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=s, targets=targets), tmp_path / f"l{s}",
                                    pipeline_class=StableDiffusion3Pipeline) for s in (1, 2)]
    config = _write_config(tmp_path, pipe_dir, [
        {"name": "a", "path": str(paths[0]), "data": str(prompts[0])}, {"name": "b", "path": str(paths[1]), "data": str(prompts[1])},
    ], parameters={"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4},
        calibration={"guidance_scale": 3.5, "height": 16, "width": 16, "steps": 3})
    result = iteris.merge(config, out=tmp_path / "out")
    assert set(result.deltas) == {"transformer", "text_encoder", "text_encoder_2"}
    loaded, merged = _loaded_and_merged(pipe_dir, tmp_path / "out", "transformer", result.deltas["transformer"])
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=gen), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 28, 32, generator=gen), pooled_projections=torch.randn(1, 64, generator=gen),
                  return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[0], merged(**inputs)[0], rtol=1e-4, atol=1e-5)


def test_a_dry_run_checks_a_pipeline_merge_and_writes_nothing(tmp_path, pipe_dir, prompts):
    from iteris.plan import plan_merge

    cube, dog = prompts
    first = pf.save_diffusers_lora(pf.lora_layers(pipe_dir, seed=1), tmp_path / "cube")
    second = pf.save_kohya_lora(pf.lora_layers(pipe_dir, seed=2, targets={"unet": pf.UNET_TARGETS}), tmp_path / "dog")
    config = _write_config(tmp_path, pipe_dir, [
        {"name": "cube", "path": str(first), "data": str(cube)}, {"name": "dog", "path": str(second), "data": str(dog)},
    ])
    plan = plan_merge(config, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [a["name"] for a in plan.adapters] == ["cube", "dog"]
    assert all(a["prompts"] == 3 and a["file"].endswith(".safetensors") for a in plan.adapters)
    assert any("pipeline" in note for note in plan.notes) and "cube: weight 1" in plan.describe()
    cfg = yaml.safe_load(config.read_text())
    cfg["adapters"][1]["path"] = str(tmp_path / "nowhere")
    with pytest.raises(iteris.IterisError, match="no LoRA weights"):  # a missing file is found without the pipeline
        plan_merge(cfg)
