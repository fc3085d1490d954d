"""Several processes, one merge: two gloo ranks spawned here give the single-process merge, and a rank that
fails takes the whole run down with no output left."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import iteris


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, config: dict, out: str, fail_rank: int | None, caller_group: bool = False):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), ITERIS_DIST_TIMEOUT_MINUTES="2")
    import torch.distributed as dist

    if caller_group:  # the caller's own process group: the merge uses it and leaves it to the caller
        dist.init_process_group("gloo")

    import iteris
    from iteris.engine import engine

    if rank == fail_rank:  # this rank breaks in the middle of the first sweep
        def broken(self, *args, **kwargs):
            raise RuntimeError("rank failure planted by the test")

        engine.Engine.sweep = broken
    try:
        iteris.merge(config, out=out)
        # a group the merge started, it ends (nothing of it left for the interpreter's exit); the caller's stays
        assert dist.is_initialized() == caller_group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _config(base, adapters, data, **parameters):
    calibration = {"batch_size": 2, "overlap": parameters.pop("overlap", "auto"), "split": parameters.pop("split", "auto"),
                   "shard": parameters.pop("shard", "auto"), "offload_stats": parameters.pop("offload_stats", False)}
    return {
        "base_model": str(base), "method": parameters.pop("method", "iteris"), "parameters": parameters,
        "device": "cpu", "dtype": "float64", "progress": False, "calibration": calibration,
        "adapters": [{"name": f"a{i}", "path": str(a), "data": str(d)} for i, (a, d) in enumerate(zip(adapters, data))],
    }


def _adapter_weights(path):
    return load_file(str(path / "adapter_model.safetensors"))


# split "adapters": each rank captures one adapter whole (statistics sent to the solving rank); "samples": each
# rank a share of both adapters' samples (raw sums reduced)
@pytest.mark.parametrize("family,parameters", [
    ("llama", {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4, "split": "adapters"}),
    ("llama", {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4, "split": "samples"}),
    ("llama", {"iterations": 2, "alpha1": 0.0, "alpha2": 1e-4, "overlap": "on"}),  # solves on a worker thread
    ("llama", {"iterations": 1, "alpha1": 0.0, "alpha2": 1e-4, "schedule": "sequential", "split": "adapters"}),
    ("llama", {"iterations": 1, "alpha1": 0.0, "alpha2": 1e-4, "schedule": "sequential", "split": "samples"}),
    # walked whole: every layer's statistics at once
    ("t5", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4, "split": "adapters"}),
    ("t5", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4, "split": "samples"}),
    ("llama", {"method": "regmean", "split": "adapters", "caller_group": True}),
    ("llama", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4, "with_pretrain_matrix": True, "split": "adapters"}),
    # four processes, two adapters: each adapter on a group of two, a share of its samples each
    ("llama", {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4, "split": "adapters", "world": 4}),
    ("llama", {"iterations": 1, "alpha1": 1e-4, "alpha2": 1e-4, "with_pretrain_matrix": True, "split": "adapters",
               "world": 4, "overlap": "on"}),
    ("llama", {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4, "split": "adapters", "world": 4, "overlap": "on",
               "offload_stats": True}),
    # each block's weights sharded over the two processes (FSDP2), gathered per visit of the walk
    ("llama", {"iterations": 2, "alpha1": 1e-4, "alpha2": 1e-4, "split": "adapters", "shard": "blocks"}),
    ("llama", {"iterations": 1, "alpha1": 0.0, "alpha2": 1e-4, "schedule": "sequential", "split": "samples",
               "shard": "blocks", "overlap": "on"}),
])
def test_two_processes_give_the_single_process_merge(tmp_path, tiny_family_dir, adapters_for, calibration_file,
                                                     family, parameters):
    kind = "jsonl_t5" if family == "t5" else "jsonl"
    data = [calibration_file(kind, n=5, seed=s) for s in (0, 1)]
    world = parameters.get("world", 2)
    config = _config(tiny_family_dir(family), adapters_for(family), data,
                     **{k: v for k, v in parameters.items() if k not in ("world", "caller_group")})
    single = iteris.merge(json.loads(json.dumps(config)), out=tmp_path / "single")
    mp.spawn(_rank, args=(world, _free_port(), config, str(tmp_path / "spread"), None,
                          parameters.get("caller_group", False)), nprocs=world, join=True)
    a, b = _adapter_weights(tmp_path / "single"), _adapter_weights(tmp_path / "spread")
    assert set(a) == set(b)
    dense = parameters.get("with_pretrain_matrix", False)  # cut to LoRA factors by an SVD: only B A is unique
    for key in a:
        if not dense:
            torch.testing.assert_close(b[key], a[key], rtol=1e-9, atol=1e-12)
        elif "lora_A" in key:
            up = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(b[up] @ b[key], a[up] @ a[key], rtol=1e-9, atol=1e-12)
    report = json.loads((tmp_path / "spread" / "merge_report.json").read_text())
    ranks = report["distributed"]["ranks"]
    assert report["distributed"]["world_size"] == world and [r["rank"] for r in ranks] == list(range(world))
    if world == 4:
        assert report["distributed"]["adapter_ranks"] == {"a0": [0, 1], "a1": [2, 3]}
    if config["calibration"]["shard"] == "blocks":
        assert report["calibration"]["sharded_over_processes"] == 2
    split = config["calibration"]["split"]
    assert report["distributed"]["split"] == ("adapters" if split == "auto" else split)
    assert all(r["bytes_communicated"] > 0 for r in ranks)
    assert single.report["adapters"][0]["samples"] == report["adapters"][0]["samples"] == 5
    if "adaptive_weights" in single.report:  # every layer's, gathered from the rank that solved it
        assert set(report["adaptive_weights"]) == set(single.report["adaptive_weights"])
        for name, weights in single.report["adaptive_weights"].items():
            assert report["adaptive_weights"][name] == pytest.approx(weights, rel=1e-9)


def test_a_failing_rank_fails_the_run_and_leaves_no_output(tmp_path, tiny_family_dir, adapters_for, calibration_file):
    data = [calibration_file("jsonl", n=4, seed=s) for s in (0, 1)]
    config = _config(tiny_family_dir("llama"), adapters_for("llama"), data, iterations=1)
    # whichever process reports first: the one that broke, or the other saying a peer stopped
    with pytest.raises(mp.ProcessRaisedException, match="rank failure planted|another process of this merge stopped"):
        mp.spawn(_rank, args=(2, _free_port(), config, str(tmp_path / "out"), 1), nprocs=2, join=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_more_processes_than_samples_is_refused(tmp_path, tiny_family_dir, adapters_for, calibration_file):
    data = [calibration_file("jsonl", n=1, seed=s) for s in (0, 1)]
    config = _config(tiny_family_dir("llama"), adapters_for("llama"), data, iterations=1, split="samples")
    with pytest.raises(mp.ProcessRaisedException, match="every process needs at least one"):
        mp.spawn(_rank, args=(2, _free_port(), config, str(tmp_path / "out"), None), nprocs=2, join=True)


def test_torchrun_launches_the_cli(tmp_path, tiny_family_dir, adapters_for, calibration_file):
    """The documented launch: torchrun runs `iteris merge`; rank 0 alone prints and writes."""
    import os
    import subprocess
    import sys

    import yaml

    data = [calibration_file("jsonl", n=4, seed=s) for s in (0, 1)]
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_family_dir("llama"), adapters_for("llama"), data, iterations=1)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               "-m", "iteris", "merge", str(config), "--out", str(tmp_path / "out"), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("Written to") == 1 and "Ran as 2 processes (gloo)" in done.stdout
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["distributed"]["world_size"] == 2


def test_adapters_are_dealt_out_by_size_or_to_groups_and_split_falls_back_to_samples():
    from iteris.engine.ranks import Ranks
    from iteris.errors import IterisError

    two = Ranks(rank=0, world=2, device="cpu", backend="gloo")
    assert two.holders([10, 30, 20, 20], "adapters") == [(0,), (0,), (1,), (1,)]  # 30 + 10 | 20 + 20 tokens
    assert two.holders([10, 30, 20, 20], "auto") == [(0,), (0,), (1,), (1,)]
    four = Ranks(rank=0, world=4, device="cpu", backend="gloo")
    assert four.holders([10, 30], "auto") == [(0, 1), (2, 3)]  # fewer adapters: a group of ranks each
    assert two.holders([10, 30, 20], "auto") == [None] * 3  # 3 adapters, 2 ranks: each a share of every one
    assert two.holders([10, 30, 20, 20], "samples") == [None] * 4
    with pytest.raises(IterisError, match="set calibration.split: samples"):
        Ranks(rank=0, world=4, device="cpu", backend="gloo").holders([10, 30, 20], "adapters")


def _load_shard(rank: int, world: int, port: int, base: str, targets: list[str], result: dict):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    from iteris.families import sharded as sharding
    from iteris.engine.ranks import from_environment

    ranks = from_environment()
    try:
        model = sharding.load_sharded(base, "CAUSAL_LM", {}, torch.float64, targets, ranks)
        saved = load_file(f"{base}/model.safetensors")
        for name, param in model.named_parameters():
            if ".layers." in name:  # a block's weight: this process's rows only, the checkpoint's when gathered
                assert isinstance(param, DTensor), name
                rows = saved[name].shape[0]
                assert param.to_local().shape[0] == -(-rows // world) or rank == world - 1, name
                torch.testing.assert_close(param.full_tensor(), saved[name].double(), rtol=0, atol=0)
            else:  # embeddings, final norm, head: whole on every process
                assert not isinstance(param, DTensor), name
                torch.testing.assert_close(param, saved[name].double(), rtol=0, atol=0)
        if "lm_head.weight" not in saved:
            assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():  # a whole forward (as the probes run) gathers each block and frees it after
            model(torch.tensor([[1, 2, 3]]))
        assert all(isinstance(p, DTensor) for n, p in model.named_parameters() if ".layers." in n)
        result[rank] = True
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_load_keeps_each_process_its_rows_of_every_block(tmp_path, tiny_family_dir, adapters_for, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iteris.adapters import load_adapter

    base = tiny_family_dir("llama")
    if tied:  # the head shares the embeddings' tensor: the checkpoint has no lm_head of its own
        model = AutoModelForCausalLM.from_pretrained(base)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        model.save_pretrained(tmp_path / "tied")
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "tied")
        base = tmp_path / "tied"
    targets = sorted(load_adapter("a", adapters_for("llama")[0]).modules)
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_load_shard, args=(2, _free_port(), str(base), targets, result), nprocs=2, join=True)
        assert dict(result) == {0: True, 1: True}


def test_sharding_refuses_layers_it_cannot_split_by_rows(tmp_path, tiny_family_dir, adapters_for, calibration_file):
    data = [calibration_file("jsonl", n=4, seed=s) for s in (0, 1)]
    config = _config(tiny_family_dir("gpt2"), adapters_for("gpt2"), data, iterations=1, shard="blocks")
    with pytest.raises(mp.ProcessRaisedException, match="splits nn.Linear weights by rows"):
        mp.spawn(_rank, args=(2, _free_port(), config, str(tmp_path / "out"), None), nprocs=2, join=True)
    assert not (tmp_path / "out").exists()
