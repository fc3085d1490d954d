"""A model spread over two GPUs (its blocks split between cuda:0 and cuda:1) merges to the same deltas as on one
GPU, bit for bit. benchmarks/spread_check.py measures the same at 1B and 8B shapes, with times and each GPU's peak
memory."""

import pytest
import torch

from iteris.adapters import load_adapter
from iteris.engine.forward import TokenSample
from iteris.merge import merge_loaded
from tests.helpers import fixtures as fx

pytestmark = [
    pytest.mark.gpu, pytest.mark.multi_gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs"),
]

# the tiny Llama (fixtures.py: two blocks): embeddings and the first block on cuda:0, the rest on cuda:1
SPLIT = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
         "model.layers.1": 1, "model.norm": 1, "lm_head": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_model_spread_over_two_gpus_merges_as_on_one(tiny_family_dir, adapters_for, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = str(tiny_family_dir("llama"))
    adapters = [load_adapter(f"t{i}", d) for i, d in enumerate(adapters_for("llama", 2))]
    tok = AutoTokenizer.from_pretrained(base)
    samples = [[TokenSample(input_ids=tok(t)["input_ids"]) for t in fx.sample_sentences(16, seed=s)] for s in range(2)]
    params = {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4}
    calibration = {"batch_size": 4, "stats_dtype": "float64"}

    single = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to("cuda:0").eval()
    one, _ = merge_loaded(single, adapters, samples, parameters=params, calibration=calibration)
    del single
    spread = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=SPLIT).eval()
    assert sorted({str(p.device) for p in spread.parameters()}) == ["cuda:0", "cuda:1"]
    many, report = merge_loaded(spread, adapters, samples, parameters=params, calibration=calibration)

    assert report["calibration"]["walk"] == "blocks"
    assert sorted(many) == sorted(one)
    for name in one:
        assert torch.equal(many[name].dense().cpu(), one[name].dense().cpu()), name
