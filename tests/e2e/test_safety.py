"""What iteris promises, tried as a careless and as a hostile user would: nothing a user owns is destroyed or
overwritten outside ``--out``; nothing non-finite is written; every bad input is a one-line error (exit 2)
before long work; no code from a user's files runs unless the config says so.

Each case drives the command line (in process, or as a real process where signals or stdin matter) on a
project of its own: a tiny Llama, two PEFT adapters, two JSONL files and ``merge.yaml`` with relative paths.
Afterwards the project's bytes and modes are compared with a snapshot taken before, and the output and
any temporary are checked to be absent.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import iteris
from iteris import IterisError
from tests.helpers.fixtures import run_cli

YAML = """\
base_model: base
method: {method}
device: cpu
dtype: float32
progress: false
parameters: {parameters}
calibration:
  samples: 4
  max_length: 32
  batch_size: 4
adapters:
  - name: first
    path: adapters/a0
    data: data/d0.jsonl
  - name: second
    path: adapters/a1
    data: data/d1.jsonl
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory, tiny_family_dir, adapters_for, calibration_file):
    """A project directory that cases copy (never write into it)."""
    root = tmp_path_factory.mktemp("safety_template")
    shutil.copytree(tiny_family_dir("llama"), root / "base")
    for i, a in enumerate(adapters_for("llama", 2)):
        shutil.copytree(a, root / "adapters" / f"a{i}")
    (root / "data").mkdir()
    for i in range(2):
        shutil.copy(calibration_file("jsonl", n=6, seed=i), root / "data" / f"d{i}.jsonl")
    write_yaml(root)
    return root


def edit_yaml(root: Path, mutate) -> None:
    data = yaml.safe_load((root / "merge.yaml").read_text())
    mutate(data)
    (root / "merge.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def write_yaml(root: Path, method: str = "task_arithmetic", parameters: str = "{}", **changes) -> Path:
    data = yaml.safe_load(YAML.format(method=method, parameters=parameters))
    for key, value in changes.items():
        data[key] = value
    (root / "merge.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "merge.yaml"


@pytest.fixture
def project(template, tmp_path):
    """A fresh copy of the project, and a working directory beside it; the test may change the copy."""
    proj = tmp_path / "project"
    shutil.copytree(template, proj)
    work = tmp_path / "work"
    work.mkdir()
    return proj, work


def snapshot(root: Path) -> dict:
    """Every file's bytes and every entry's mode under ``root`` (symlinks as their targets' text)."""
    out = {}
    for path in sorted([root, *root.rglob("*")]):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = ("link", os.readlink(path))
        elif path.is_file():
            out[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
        else:
            out[rel] = ("dir", path.stat().st_mode)
    return out


run = run_cli


def refused(argv, cwd, *words, snapshot_of=None):
    """The command fails with one line on stderr naming ``words``; ``snapshot_of`` is left as it was."""
    before = snapshot(snapshot_of) if snapshot_of is not None else None
    code, stdout, stderr = run(argv, cwd)
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("iteris: error: "), stderr
    for word in words:
        assert word in lines[0], lines[0]
    if before is not None:
        assert snapshot(snapshot_of) == before
    return lines[0]


def no_temporaries(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name or ".probe-" in p.name]
    assert not left, left


# ------------------------------------------------------------------------------------------------
# 1. --force never writes over, into or around an input


@pytest.mark.parametrize("where,word", [
    ("base", "is the input"), ("adapters/a0", "is the input"), ("adapters", "holds the input"),
    (".", "holds the input"), ("base/merged", "inside the input"), ("data/d0.jsonl", "is the input"),
    ("merge.yaml", "is the input"),
])
def test_force_onto_an_input_is_refused(project, where, word):
    proj, work = project
    refused(["merge", proj / "merge.yaml", "--out", proj / where, "--force"], work, word, snapshot_of=proj)
    no_temporaries(proj)


def test_force_onto_a_symlink_to_an_input_is_refused(project):
    proj, work = project
    (work / "link").symlink_to(proj / "adapters" / "a1", target_is_directory=True)
    refused(["merge", proj / "merge.yaml", "--out", work / "link", "--force"], work, "is the input", snapshot_of=proj)
    assert (work / "link").is_symlink()


@pytest.mark.parametrize("out,word", [(".", "working directory"), ("", "empty"), ("  ", "empty"),
                                      ("/", "root"), ("~", "home")])
def test_force_onto_the_working_directory_home_or_root_is_refused(project, out, word):
    proj, work = project
    (work / "keep.txt").write_text("mine")
    target = str(Path.home()) if out == "~" else out
    refused(["merge", proj / "merge.yaml", "--out", target, "--force"], work, word, snapshot_of=work)


def test_force_onto_a_parent_of_the_working_directory_is_refused(project):
    proj, work = project
    inner = work / "deep" / "inside"
    inner.mkdir(parents=True)
    refused(["merge", proj / "merge.yaml", "--out", work, "--force"], inner, "working directory", snapshot_of=work)


def test_force_replaces_an_unrelated_directory(project):
    proj, work = project
    (work / "old").mkdir()
    (work / "old" / "stale.txt").write_text("x")
    before = snapshot(proj)
    code, _, stderr = run(["merge", proj / "merge.yaml", "--out", work / "old", "--force"], work)
    assert code == 0, stderr
    assert not (work / "old" / "stale.txt").exists() and (work / "old" / "adapter_model.safetensors").is_file()
    assert snapshot(proj) == before
    no_temporaries(work)


# ------------------------------------------------------------------------------------------------
# 7, 8. The output is checked writable before any model loads, and follows the umask


def _unwritable_dir(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    if os.access("/sys", os.F_OK) and not _can_create("/sys"):
        return Path("/sys")  # (root writes anywhere a permission allows; sysfs refuses new entries)
    pytest.skip("no directory here refuses this user's writes")


def _can_create(where: str) -> bool:
    try:
        os.rmdir(__import__("tempfile").mkdtemp(dir=where))
        return True
    except OSError:
        return False


def test_unwritable_output_is_refused_before_any_model_loads(project, monkeypatch):
    proj, work = project
    models = importlib.import_module("iteris.families.loading")
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    write_yaml(proj, method="iteris", parameters="{iterations: 1}")
    locked = _unwritable_dir(work)
    refused(["merge", proj / "merge.yaml", "--out", locked / "merged"], work, "cannot be written", snapshot_of=proj)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_output_follows_the_umask(project, mask):
    proj, work = project
    previous = os.umask(mask)
    try:
        (work / "existing").mkdir(mode=0o755)
        (work / "existing" / "old").write_text("x")
        code, _, stderr = run(["merge", proj / "merge.yaml", "--out", work / "existing", "--force"], work)
    finally:
        os.umask(previous)
    assert code == 0, stderr
    out = work / "existing"
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    for name in ("adapter_model.safetensors", "adapter_config.json", "merge_report.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


# ------------------------------------------------------------------------------------------------
# 9. SIGTERM and Ctrl-C: one line, the right exit code, nothing left behind; stale temporaries go

_SLOW_WRITE = """
import pathlib, sys, time
import iteris.output as output
real = output.write_adapter
def slow(directory, *args, **kwargs):
    real(directory, *args, **kwargs)
    pathlib.Path(sys.argv[1]).write_text("writing")
    time.sleep(60)
output.write_adapter = slow
import iteris.merge
sys.modules["iteris.merge"].write_adapter = slow
from iteris.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.mark.parametrize("merge_into_base", [False, True])
def test_sigterm_during_the_write_cleans_up_and_exits_143(project, merge_into_base):
    proj, work = project
    flag = work / "flag"
    out = work / "merged"
    args = ["merge", str(proj / "merge.yaml"), "--out", str(out)] + (["--merge-into-base"] if merge_into_base else [])
    before = snapshot(proj)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(flag), *args], cwd=work, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the merge never reached its write"
        time.sleep(0.1)
    assert any(".tmp-" in p.name for p in work.iterdir())  # caught mid-write
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "iteris: terminated (SIGTERM); nothing was written"
    assert "Traceback" not in stderr
    assert not out.exists()
    no_temporaries(work)
    assert snapshot(proj) == before


def test_stale_temporaries_of_a_killed_run_are_removed_and_live_ones_kept(project):
    proj, work = project
    from iteris.placement import _host

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    here = _host()
    stale = work / f".merged.tmp-{here}-{dead}-abc123"
    stale_old = work / f".merged.old-{here}-{dead}-def456"
    live = work / f".merged.tmp-{here}-{os.getppid()}-xyz789"  # (pytest's parent: a process that surely runs)
    elsewhere = work / f".merged.tmp-0badc0de-{dead}-abc123"  # another machine's, on a shared file system
    unknown = work / ".merged.tmp-k2j4h5g6"  # an older version's name: no process to ask
    for d in (stale, stale_old, live, elsewhere, unknown):
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"partial")
    code, _, stderr = run(["merge", proj / "merge.yaml", "--out", work / "merged"], work)
    assert code == 0, stderr
    assert not stale.exists() and not stale_old.exists()
    assert live.exists() and unknown.exists() and elsewhere.exists()
    assert f"removed {stale}" in stderr and f"left alone: {unknown}" in stderr and f"left alone: {elsewhere}" in stderr


def test_a_previous_output_moved_aside_by_a_killed_run_is_put_back(project):
    """Killed between moving the old output aside and moving the new one in: the next run restores it."""
    from iteris.placement import _host

    proj, work = project
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    aside = work / f".merged.old-{_host()}-{dead}-abc123" / "x"
    aside.mkdir(parents=True)
    (aside / "mine.txt").write_text("the previous output")
    code, _, stderr = run(["merge", proj / "merge.yaml", "--out", work / "merged"], work)
    assert code == 2 and "not empty" in stderr  # put back first, so it is not replaced without --force
    assert (work / "merged" / "mine.txt").read_text() == "the previous output"
    assert not aside.parent.exists()


def test_an_interrupted_swap_puts_the_previous_output_back(project, monkeypatch):
    import iteris.placement as placement

    proj, work = project
    out = work / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("previous")
    real = os.replace
    calls = []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new output moving in
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(placement.os, "replace", interrupted)
    code, _, stderr = run(["merge", proj / "merge.yaml", "--out", out, "--force"], work)
    assert code == 130
    assert (out / "mine.txt").read_text() == "previous"
    no_temporaries(work)


def test_links_inside_an_input_are_followed(project):
    """A hub-cache snapshot: the model directory holds links into a blobs directory elsewhere, which the
    output may not be, hold or lie in."""
    proj, work = project
    blobs = work / "cache" / "blobs"
    blobs.mkdir(parents=True)
    snapshot_dir = work / "cache" / "snapshots" / "abc"
    snapshot_dir.mkdir(parents=True)
    for f in (proj / "base").iterdir():
        shutil.move(str(f), blobs / f.name)
        (snapshot_dir / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    edit_yaml(proj, lambda d: d.update(base_model=str(snapshot_dir)))
    for target, word in ((blobs, "holds the input"), (work / "cache", "holds the input"),
                         (blobs / "model.safetensors", "is the input"), (snapshot_dir / "sub", "inside")):
        refused(["merge", proj / "merge.yaml", "--out", target, "--force"], work, word, snapshot_of=work / "cache")


def test_ctrl_c_while_starting_is_one_line(project, monkeypatch):
    """The package loads torch only inside ``main``, where an interrupt is answered with one line."""
    proc = subprocess.run([sys.executable, "-c", "import sys, iteris.cli; print('torch' in sys.modules)"],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr
    proj, work = project
    merge_module = importlib.import_module("iteris.merge")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(merge_module, "merge", interrupted)
    code, _, stderr = run(["merge", proj / "merge.yaml", "--out", work / "merged"], work)
    assert code == 130 and stderr.strip() == "iteris: interrupted; nothing was written"


# ------------------------------------------------------------------------------------------------
# 2, 10. Non-finite numbers are refused where they enter, named, and never written


def _edit_tensors(adapter_dir: Path, change) -> None:
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


@pytest.mark.parametrize("method", ["task_arithmetic", "iteris"])
@pytest.mark.parametrize("kind,value,word", [
    ("lora_A.weight", float("nan"), "non-finite"), ("lora_B.weight", float("inf"), "non-finite"),
    ("lora_B.weight", -float("inf"), "non-finite"), ("lora_A.weight", 1e30, "too large for float32"),
])
def test_non_finite_or_overflowing_factors_are_refused(project, method, kind, value, word):
    proj, work = project

    def poison(t):
        key = _first(t, kind)
        if value == 1e30:  # finite factors whose product overflows
            t[key] = t[key] * 1e30
            other = _first(t, "lora_B.weight")
            t[other] = t[other] * 1e30
        else:
            t[key][0, 0] = value

    _edit_tensors(proj / "adapters" / "a1", poison)
    write_yaml(proj, method=method, parameters="{iterations: 1}" if method == "iteris" else "{}")
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, word, "adapter 'second'",
            snapshot_of=proj)
    assert not (work / "merged").exists()


def test_integer_factors_are_refused(project):
    proj, work = project
    _edit_tensors(proj / "adapters" / "a0", lambda t: t.update({_first(t, "lora_A.weight"): torch.ones(4, 64, dtype=torch.int32)}))
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, "int32", "floating-point")


@pytest.mark.parametrize("weight,word", [(float("inf"), "finite number"), (float("nan"), "finite number"),
                                         (1e308, "too large"), (-float("inf"), "finite number")])
def test_non_finite_or_huge_weights_are_refused(project, weight, word):
    proj, work = project
    edit_yaml(proj, lambda d: d["adapters"][1].update(weight=weight))
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, word)


@pytest.mark.parametrize("method", ["iteris", "regmean"])
def test_negative_weights_are_refused_in_least_squares_merges(project, method):
    proj, work = project
    edit_yaml(proj, lambda d: (d["adapters"][1].update(weight=-0.5), d.update(method=method)))
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, "negative weight")
    # a data-free merge takes them (task negation)
    edit_yaml(proj, lambda d: d.update(method="task_arithmetic"))
    assert run(["merge", proj / "merge.yaml", "--out", work / "merged"], work)[0] == 0


def _edit_base(proj: Path, change) -> None:
    path = proj / "base" / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("merge_into_base", [False, True])
def test_non_finite_base_weights_are_refused(project, merge_into_base):
    proj, work = project
    _edit_base(proj, lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), float("nan")))
    write_yaml(proj, method="task_arithmetic" if merge_into_base else "iteris",
               parameters="{}" if merge_into_base else "{iterations: 1}")
    extra = ["--merge-into-base"] if merge_into_base else []
    refused(["merge", proj / "merge.yaml", "--out", work / "merged", *extra], work,
            "model.layers.0.self_attn.q_proj.weight", "non-finite", snapshot_of=proj)
    assert not (work / "merged").exists()
    no_temporaries(work)


def test_an_inf_embedding_row_is_named_before_the_merge(project):
    proj, work = project
    _edit_base(proj, lambda t: t["model.embed_tokens.weight"][5].fill_(float("inf")))
    write_yaml(proj, method="iteris", parameters="{iterations: 1}")
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, "model.embed_tokens.weight", "non-finite")


@pytest.mark.parametrize("generate,where", [(False, "model.layers.0"), (True, "writing a continuation")])
def test_a_sample_whose_activations_overflow_is_named(project, monkeypatch, generate, where):
    """Weights all finite, but one record's tokens give non-finite inputs (as float16 overflow does): the
    statistics are stopped at the first layer they reach, with the adapter, the layer and the record named;
    with continuations asked for, their writing stops at that record, named the same way."""
    proj, work = project
    write_yaml(proj, method="iteris", parameters="{iterations: 1}")
    edit_yaml(proj, lambda d: d["calibration"].update(samples=6, generate=generate, max_new_tokens=3))  # every record drawn
    records = [json.loads(line) for line in (proj / "data" / "d1.jsonl").read_text().splitlines()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(proj / "base"))
    others = {t for r in records[1:] for t in tok(r["text"])["input_ids"]} | set(
        t for line in (proj / "data" / "d0.jsonl").read_text().splitlines() for t in tok(json.loads(line)["text"])["input_ids"])
    unique = [t for t in tok(records[0]["text"])["input_ids"] if t not in others]
    if not unique:
        records[0]["text"] += " zzzq"
        (proj / "data" / "d1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        unique = [t for t in tok(records[0]["text"])["input_ids"] if t not in others]
    poison = unique[0]
    models = importlib.import_module("iteris.families.loading")
    real = models.load_base_model

    def load_with_overflow(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            ids = inputs[0]
            return output.masked_fill((ids == poison).unsqueeze(-1), float("inf"))

        model.get_input_embeddings().register_forward_hook(hook)
        return model

    monkeypatch.setattr(models, "load_base_model", load_with_overflow)
    message = refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, "adapter 'second'",
                      where, "not finite", "record 1 of", "d1.jsonl")
    assert "first" not in message.split("adapter")[1][:20]
    assert not (work / "merged").exists()


@pytest.mark.parametrize("change,word", [
    ({"lora_alpha": "NaN"}, "lora_alpha"), ({"lora_alpha": "Infinity"}, "lora_alpha"),
    ({"alpha_pattern": {"q_proj": "NaN"}}, "alpha_pattern"), ({"r": 0}, "r must be a positive integer"),
    ({"r": "abc"}, "r must be a positive integer"), ({"r": None}, "r must be a positive integer"),
    ({"lora_alpha": -8}, "lora_alpha"), ({"rank_pattern": [1]}, "rank_pattern"), ({"use_rslora": "yes"}, "use_rslora"),
])
def test_bad_adapter_configs_are_one_line(project, change, word):
    proj, work = project
    cfg_path = proj / "adapters" / "a0" / "adapter_config.json"
    text = json.dumps({**json.loads(cfg_path.read_text()), **{k: "__X__" for k in change}})
    for key, value in change.items():  # NaN and Infinity as JSON writers emit them, unquoted
        raw = value if value in ("NaN", "Infinity") else json.dumps(value)
        if isinstance(value, dict):
            raw = json.dumps(value).replace('"NaN"', "NaN")
        text = text.replace('"__X__"', raw, 1)
    cfg_path.write_text(text)
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, word, snapshot_of=proj)


@pytest.mark.parametrize("content,word", [("[1, 2]", "JSON object"), (b"\xff\xfe{\x00}\x00", "UTF-16"),
                                          (b'{"r": 4, "x": "\xe9"}', "not UTF-8")])
def test_adapter_configs_that_are_not_a_json_object_are_one_line(project, content, word):
    proj, work = project
    path = proj / "adapters" / "a0" / "adapter_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, word)


def test_an_empty_adapter_config_is_read_with_peft_defaults(project, tmp_path):
    """PEFT's LoraConfig defaults (r 8, lora_alpha 8) fill what a config leaves out, so the adapter is scaled as
    PEFT scales it: a rank-4 adapter without r is refused as PEFT would refuse it."""
    from iteris.adapters import load_adapter

    proj, _ = project
    path = proj / "adapters" / "a0" / "adapter_config.json"
    full = json.loads(path.read_text())
    path.write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    assert {m.scale for m in load_adapter("a", proj / "adapters" / "a0").modules.values()} == {8 / 4}
    assert full["lora_alpha"] == 8  # (the fixture's own alpha: the test means PEFT's default, not this one)
    path.write_text("{}")
    with pytest.raises(IterisError, match="rank 4 but adapter_config.json says 8"):
        load_adapter("a", proj / "adapters" / "a0")


def test_non_finite_saved_modules_are_refused(project):
    proj, work = project
    _edit_tensors(proj / "adapters" / "a0", lambda t: t.update(
        {"base_model.model.lm_head.modules_to_save.default.weight": torch.full((8, 64), float("nan"))}))
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, "lm_head", "non-finite")


def test_a_solve_that_is_not_finite_stops_the_merge(project, monkeypatch):
    proj, work = project
    write_yaml(proj, method="iteris", parameters="{iterations: 2}")
    solve = importlib.import_module("iteris.solve")
    method = importlib.import_module("iteris.methods.iteris")
    real = solve.iteris_solve_many

    def broken(*args, **kwargs):  # (a singular system that slipped through: its answer is NaN)
        return [(type(delta)(B=delta.B, A=delta.A * float("nan")), how) for delta, how in real(*args, **kwargs)]

    monkeypatch.setattr(method, "iteris_solve_many", broken)
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, "not finite", "nothing is written")
    assert not (work / "merged").exists()


# ------------------------------------------------------------------------------------------------
# 3. Adapter names are plain names, never paths


@pytest.mark.parametrize("name", ["../../x", "/tmp/escape", "a/b", "..", ".hidden", "", " padded", "a\\b", "x" * 101])
def test_adapter_names_that_are_not_plain_names_are_refused(project, name):
    proj, work = project
    edit_yaml(proj, lambda d: (d["adapters"][0].update(name=name), d.update(modules_to_save="per_adapter")))
    refused(["merge", proj / "merge.yaml", "--out", work / "merged"], work, "adapters[0].name", snapshot_of=proj.parent)
    assert not Path("/tmp/escape").exists()


# ------------------------------------------------------------------------------------------------
# 4, 5. No code from a user's files: remote code is never prompted for or run, pickles never executed

_EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("code from the model's files ran")
from transformers import PretrainedConfig
class EvilConfig(PretrainedConfig):
    model_type = "evil"
"""


def _remote_code_base(proj: Path, marker: Path, tokenizer_only: bool) -> None:
    base = proj / "base"
    (base / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    if tokenizer_only:
        cfg = json.loads((base / "tokenizer_config.json").read_text())
        cfg.update(auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]}, tokenizer_class="EvilTokenizer")
        (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        cfg = json.loads((base / "config.json").read_text())
        cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
        (base / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("tokenizer_only", [False, True])
@pytest.mark.parametrize("method", ["iteris", "task_arithmetic"])
def test_remote_code_is_never_prompted_for_nor_run(project, tokenizer_only, method):
    """A base whose config or tokenizer asks for its own code: no "[y/N]" prompt (a 'y' waits on stdin), no code
    run, one line that names trust_remote_code."""
    proj, work = project
    if tokenizer_only and method != "iteris":
        pytest.skip("a data-free merge reads no tokenizer")
    marker = work / "ran"
    _remote_code_base(proj, marker, tokenizer_only)
    write_yaml(proj, method=method, parameters="{iterations: 1}" if method == "iteris" else "{}")
    proc = subprocess.run([sys.executable, "-m", "iteris", "merge", str(proj / "merge.yaml"), "--out", str(work / "m")],
                          input="y\ny\n", capture_output=True, text=True, cwd=work, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert not marker.exists()
    assert "[y/N]" not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("iteris: error: ")
    if not tokenizer_only:
        assert "trust_remote_code: true" in proc.stderr
    assert not (work / "m").exists()


def test_trust_remote_code_must_be_a_boolean(project):
    proj, work = project
    edit_yaml(proj, lambda d: d.update(trust_remote_code="yes"))
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, "trust_remote_code", "true or false")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle ran"))


def _pickle_with_payload(path: Path, marker: Path, tensors: dict) -> None:
    torch.save({**tensors, "payload": _Payload(str(marker))}, str(path))


def test_a_pickled_adapter_with_a_payload_is_refused_before_the_model_loads(project, monkeypatch):
    proj, work = project
    marker = work / "ran"
    a0 = proj / "adapters" / "a0"
    tensors = load_file(str(a0 / "adapter_model.safetensors"))
    (a0 / "adapter_model.safetensors").unlink()
    _pickle_with_payload(a0 / "adapter_model.bin", marker, tensors)
    models = importlib.import_module("iteris.families.loading")
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    write_yaml(proj, method="iteris", parameters="{iterations: 1}")
    line = refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, "adapter_model.bin", "run code",
                   snapshot_of=proj)
    assert "weights_only=False" not in line
    assert not marker.exists()


def test_a_plain_pickled_adapter_still_loads(project):
    proj, work = project
    a0 = proj / "adapters" / "a0"
    tensors = load_file(str(a0 / "adapter_model.safetensors"))
    (a0 / "adapter_model.safetensors").unlink()
    torch.save(tensors, str(a0 / "adapter_model.bin"))
    assert run(["merge", proj / "merge.yaml", "--out", work / "m"], work)[0] == 0


def test_a_pickled_base_with_a_payload_is_refused_before_merging_into_it(project, monkeypatch):
    proj, work = project
    marker = work / "ran"
    base = proj / "base"
    tensors = load_file(str(base / "model.safetensors"))
    (base / "model.safetensors").unlink()
    _pickle_with_payload(base / "pytorch_model.bin", marker, tensors)
    run_module = importlib.import_module("iteris.run")
    monkeypatch.setattr(run_module, "run_method", lambda *a, **k: pytest.fail("the merge ran"))
    refused(["merge", proj / "merge.yaml", "--out", work / "m", "--merge-into-base"], work, "pytorch_model.bin",
            "run code", snapshot_of=proj)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# 6. Loose types and files: one typed reading, one line each


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d.update(merge_into_base="false"), ["merge_into_base", "true or false"]),
    (lambda d: d["calibration"].update(generate="false"), ["calibration.generate", "true or false"]),
    (lambda d: d.update(base_model=123), ["base_model", "a string"]),
    (lambda d: d["adapters"][1].update(name=7), ["adapters[1].name", "a string"]),
    (lambda d: d["calibration"].update(seed=[1, 2]), ["calibration.seed", "an integer"]),
    (lambda d: d.update(device="banana"), ["banana", "not a device"]),
    (lambda d: d.update(device="meta"), ["meta"]),
    (lambda d: d.update(device=0), ["device", "a string"]),
    (lambda d: d.update(device="cuda:0") if not torch.cuda.is_available() else d.update(device="cuda:99"), ["cuda"]),
    (lambda d: d["adapters"][1].update(name=""), ["adapters[1].name", "empty"]),
    (lambda d: d["adapters"][1].update(name="first"), ["unique"]),
    (lambda d: d.update(rank=2.5), ["rank", "an integer"]),
    (lambda d: d["calibration"].update(max_length=True), ["calibration.max_length", "an integer"]),
    (lambda d: d.update(adapters=[]), ["adapters"]),
    (lambda d: d.update(adapters={"a": 1}), ["adapters"]),
    (lambda d: d.update(calibration=[1]), ["calibration", "a mapping"]),
])
def test_loose_types_are_refused_in_one_line(project, mutate, words):
    proj, work = project
    edit_yaml(proj, mutate)
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, *words, snapshot_of=proj)
    assert not (work / "m").exists()


def test_a_quoted_false_is_not_read_as_true(project):
    """The case that wrote a full model when an adapter was asked for."""
    proj, work = project
    text = (proj / "merge.yaml").read_text() + "merge_into_base: 'false'\n"
    (proj / "merge.yaml").write_text(text)
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, "merge_into_base")
    assert not (work / "m").exists()


@pytest.mark.parametrize("content,words", [
    (b"base_model: base\nmethod: t\xe9st\n", ["not UTF-8", "line 2"]),
    ("base_model: base\n".encode("utf-16"), ["UTF-16"]),
    (b"base_model: base\nmethod: iteris\nmethod: regmean\nadapters: []\n", ["method", "twice", "line 3"]),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
     b"d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
     b"f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n"
     b"h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\ni: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]\n"
     b"base_model: [*i, *i, *i, *i, *i, *i, *i, *i, *i]\n", ["expands to more than"]),
    (b"- just\n- a list\n", ["mapping"]),
    (b"base_model: [unclosed\n", ["not valid YAML"]),
    (b"", ["mapping"]),
])
def test_bad_yaml_files_are_one_line_within_seconds(project, content, words):
    proj, work = project
    (proj / "merge.yaml").write_bytes(content)
    start = time.perf_counter()
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, *words)
    assert time.perf_counter() - start < 5


def test_yaml_exponents_without_a_dot_are_numbers(project):
    """YAML 1.1 would read alpha1: 1e-7 as a string; every person reads a number."""
    from iteris.config import load_config

    proj, _ = project
    write_yaml(proj, method="iteris", parameters="{alpha1: 1e-7, alpha2: 2E-5}")
    cfg = load_config(proj / "merge.yaml")
    assert cfg.parameters == {"alpha1": 1e-7, "alpha2": 2e-5}


@pytest.mark.parametrize("name,content,words", [
    ("d1.jsonl", "caf\xe9 au lait\n".encode("latin-1"), ["not UTF-8"]),
    ("d1.jsonl", '{"text": "x"}\n'.encode("utf-16"), ["UTF-16"]),
    ("d1.jsonl", b'{"text": "a"}\n{"text": ["a", "list"]}\n', ["record 2", "list", "not text"]),
    ("d1.jsonl", b'{"text": "a"}\n{"text": {"a": 1}}\n', ["record 2", "dict"]),
    ("d1.jsonl", b'{"text": "a"}\n{"text": 42}\n', ["record 2", "int"]),
    ("d1.jsonl", b'{"text": "a"}\n{"other": "b"}\n', ["record 2", "no field 'text'"]),
    ("d1.jsonl", b'{"text": NaN}\n', ["NaN"]),
    ("d1.jsonl", b'{"text": "a"}\n{"text": \n', ["line 2", "not valid JSON"]),
    ("d1.parquet", b"PAR1 this is not parquet PAR1", ["not a readable Parquet file"]),
    ("d1.csv", b"text\n\"unclosed\n", ["CSV"]),
])
def test_bad_data_files_are_one_line_before_the_model_loads(project, monkeypatch, name, content, words):
    proj, work = project
    (proj / "data" / name).write_bytes(content)
    edit_yaml(proj, lambda d: (d["adapters"][1].update(data=f"data/{name}"), d.update(method="iteris")))
    models = importlib.import_module("iteris.families.loading")
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, *words, snapshot_of=proj)


def test_null_values_are_skipped_not_turned_into_text(project):
    from iteris.config import CalibrationConfig
    from iteris.data import select_samples

    samples = select_samples([{"text": None}, {"text": "real"}, {"text": ""}], CalibrationConfig(), "x")
    assert [s.text for s in samples] == ["real"]


def test_max_length_beyond_the_positions_is_cut_with_a_warning(project):
    proj, work = project
    edit_yaml(proj, lambda d: (d["calibration"].update(max_length=100000), d.update(method="regmean")))
    long_line = json.dumps({"text": " ".join(["word"] * 20000)})
    (proj / "data" / "d1.jsonl").write_text(long_line + "\n")
    code, _, stderr = run(["merge", proj / "merge.yaml", "--out", work / "m"], work)
    assert code == 0, stderr
    assert "max_length 100000 is beyond the base model's 128 positions" in stderr
    report = json.loads((work / "m" / "merge_report.json").read_text())
    assert report["adapters"][1]["tokens"] <= 128


def test_paths_not_beside_the_yaml_are_not_taken_from_the_working_directory(project):
    """A relative path is relative to the config; another model of that name in the working directory is
    never picked up instead."""
    proj, work = project
    shutil.copytree(proj / "base", work / "other_base")
    edit_yaml(proj, lambda d: d.update(base_model="other_base"))
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, "other_base", "not beside the config")


# ------------------------------------------------------------------------------------------------
# 10. iteris eval and the Python API go through the same checks


def _eval_yaml(proj: Path, **changes) -> Path:
    data = {"base_model": "base", "tasks": [{"name": "t0", "data": "data/d0.jsonl", "adapter": "adapters/a0", "limit": 2}],
            "models": [], "device": "cpu", "progress": False, **changes}
    (proj / "eval.yaml").write_text(yaml.safe_dump(data))
    return proj / "eval.yaml"


@pytest.mark.parametrize("changes,words", [
    ({"tasks": None}, ["tasks"]), ({"tasks": []}, ["tasks is empty"]), ({"batch_size": 0}, ["batch_size"]),
    ({"tasks": [{"name": "t0", "data": "data/d0.jsonl", "limit": -1}]}, ["limit"]),
    ({"tasks": [{"name": "t0", "data": "data/d0.jsonl", "metric": "bleu"}]}, ["metric", "one of"]),
    ({"device": "banana"}, ["banana"]), ({"include_base": "no"}, ["include_base", "true or false"]),
])
def test_bad_eval_configs_are_one_line(project, changes, words):
    proj, work = project
    refused(["eval", _eval_yaml(proj, **changes)], work, *words)


def test_malformed_eval_yaml_is_one_line(project):
    proj, work = project
    (proj / "eval.yaml").write_text("base_model: [\n")
    refused(["eval", proj / "eval.yaml"], work, "not valid YAML")


def test_eval_refuses_to_overwrite_results_without_force(project):
    proj, work = project
    out = work / "results"
    out.mkdir()
    (out / "results.json").write_text("{}")
    refused(["eval", _eval_yaml(proj), "--out", out], work, "not empty", "--force")
    assert (out / "results.json").read_text() == "{}"
    refused(["eval", _eval_yaml(proj), "--out", proj / "adapters", "--force"], work, "holds the input")
    code, _, stderr = run(["eval", _eval_yaml(proj), "--out", out, "--force"], work)
    assert code == 0, stderr
    assert json.loads((out / "results.json").read_text())["rows"]


def test_eval_of_a_nan_adapter_is_an_error_not_a_zero(project):
    proj, work = project
    shutil.copytree(proj / "adapters" / "a0", proj / "broken")
    _edit_tensors(proj / "broken", lambda t: t[_first(t, "lora_B.weight")].fill_(float("nan")))
    refused(["eval", _eval_yaml(proj, models=[{"name": "broken", "path": "broken"}])], work, "broken", "non-finite")


def test_the_python_api_checks_what_the_cli_checks(project):
    proj, _ = project
    from iteris.config import load_config

    cfg = load_config(proj / "merge.yaml")
    for bad, word in (({"device": "banana"}, "banana"), ({"merge_into_base": "false"}, "true or false"),
                      ({"rank": 0}, "rank"), ({"calibration": {"seed": [1]}}, "calibration.seed")):
        with pytest.raises(IterisError, match=word):
            iteris.merge(cfg, **bad)
    cfg.adapters[0].weight = float("nan")  # a dataclass takes anything: merge checks it again
    with pytest.raises(IterisError, match="adapters\\[0\\].weight"):
        iteris.merge(cfg)
    with pytest.raises(IterisError, match="not a plain name"):
        iteris.merge({**yaml.safe_load((proj / "merge.yaml").read_text()), "adapters": [{"name": "../x", "path": "p"}]})


def test_merge_loaded_checks_weights_and_lists(project, load_tiny):
    from iteris.adapters import load_adapter
    from iteris.merge import merge_loaded
    from iteris.engine.forward import TokenSample

    proj, _ = project
    model, _ = load_tiny("llama")
    adapters = [load_adapter(n, proj / "adapters" / n) for n in ("a0", "a1")]
    samples = [[TokenSample(input_ids=[1, 5, 6, 7])], [TokenSample(input_ids=[1, 8, 9])]]
    for kwargs, word in (({"weights": [1.0, float("nan")]}, "finite number"), ({"weights": [1.0]}, "one weight per adapter"),
                         ({"weights": [1.0, -1.0]}, "negative"), ({"calibration": {"walk": "x"}}, "calibration.walk"),
                         ({"parameters": {"iterations": "2"}}, "iterations")):
        with pytest.raises(IterisError, match=word):
            merge_loaded(model, adapters, samples, **kwargs)
    with pytest.raises(IterisError, match="sample lists for 2 adapters"):
        merge_loaded(model, adapters, samples[:1])


def test_lopsided_factors_are_blamed_on_the_adapter_not_the_data(project):
    """A with entries near float32's largest and B tiny: their product is moderate, but x A^T overflows; the
    base model alone is fine on the same record, so the adapter is named, not the data."""
    proj, work = project

    def lopsided(t):
        for key in t:
            t[key] = t[key] * (2.5e38 if "lora_A" in key else 4e-39)

    _edit_tensors(proj / "adapters" / "a1", lopsided)
    write_yaml(proj, method="iteris", parameters="{iterations: 1}")
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, "every sample's inputs there are finite",
            "adapter 'second''s update", "check its lora_A and lora_B")


def test_eval_never_writes_over_its_own_config(project):
    proj, work = project
    cfg_dir = work / "cfg"
    cfg_dir.mkdir()
    yaml_path = _eval_yaml(proj)
    moved = cfg_dir / "eval.yaml"
    data = yaml.safe_load(yaml_path.read_text())
    data["base_model"] = str(proj / "base")
    data["tasks"][0].update(data=str(proj / "data" / "d0.jsonl"), adapter=str(proj / "adapters" / "a0"))
    moved.write_text(yaml.safe_dump(data))
    refused(["eval", moved, "--out", cfg_dir, "--force"], work, "holds the input", snapshot_of=cfg_dir)


@pytest.mark.parametrize("record,words", [
    ({"prompt": "a", "choices": ["x", "y"], "answer": "first"}, ["record 1", "'answer' must be an index"]),
    ({"prompt": "a", "choices": ["x", "y"], "answer": 2}, ["not an index of its 2 choices"]),
    ({"prompt": "a", "choices": [], "answer": 0}, ["'choices' must be a non-empty list"]),
    ({"text": "a", "label": True}, ["'label' must be an index"]),
])
def test_eval_records_are_checked_before_any_model_loads(project, monkeypatch, record, words):
    proj, work = project
    (proj / "data" / "task.jsonl").write_text(json.dumps(record) + "\n")
    models = importlib.import_module("iteris.families.loading")
    monkeypatch.setattr(models, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded"))
    metric = "accuracy" if "label" in record else "mc_accuracy"
    path = _eval_yaml(proj, tasks=[{"name": "t", "data": "data/task.jsonl", "metric": metric}])
    refused(["eval", path], work, *words)


def test_perplexity_of_texts_too_short_to_score_is_one_line(project):
    proj, work = project
    (proj / "data" / "short.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    refused(["eval", _eval_yaml(proj, tasks=[{"name": "t", "data": "data/short.jsonl", "metric": "perplexity"}]),
             "--quiet"], work, "at least two tokens")


def test_generation_from_non_finite_logits_is_refused(load_tiny):
    """Greedy decoding would quietly turn NaN logits into a token (and exact match into a score of 0)."""
    from iteris.finite import NonFiniteOutputs
    from iteris.engine.forward import TokenSample
    from iteris.families.text import greedy_continuations
    from iteris.scoring import class_predictions

    model, tok = load_tiny("llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteOutputs):
        greedy_continuations(model, [TokenSample(input_ids=[1, 5, 6])], tok, 3, 1, "cpu")
    with pytest.raises(NonFiniteOutputs):
        class_predictions(model, [[1, 5, 6]], tok.pad_token_id, 1, "cpu")


def test_a_non_text_target_column_is_ignored_by_decoder_models(project):
    """A label column named 'target' is read only by encoder-decoders (as the decoder's text)."""
    proj, work = project
    lines = [json.loads(line) for line in (proj / "data" / "d1.jsonl").read_text().splitlines()]
    (proj / "data" / "d1.jsonl").write_text("".join(json.dumps({**r, "target": 3}) + "\n" for r in lines))
    write_yaml(proj, method="regmean")
    code, _, stderr = run(["merge", proj / "merge.yaml", "--out", work / "m"], work)
    assert code == 0, stderr


def test_yaml_merge_keys_and_words_that_yaml_1_1_called_booleans(project):
    """A merge key's values may be overridden (as YAML says); on/off/yes/no are words (YAML 1.2)."""
    from iteris.config import load_config

    proj, _ = project
    (proj / "merge.yaml").write_text(textwrap.dedent("""\
        base_model: base
        method: regmean
        calibration: {overlap: off, samples: 4}
        adapters:
          - &first {name: first, path: adapters/a0, data: data/d0.jsonl, weight: 1.0}
          - <<: *first
            name: second
            path: adapters/a1
        """))
    cfg = load_config(proj / "merge.yaml")
    assert cfg.calibration.overlap == "off"
    assert [(a.name, Path(a.path).name, a.weight) for a in cfg.adapters] == [("first", "a0", 1.0), ("second", "a1", 1.0)]
    edit_yaml(proj, lambda d: d["calibration"].update(offload_states="yes"))
    with pytest.raises(IterisError, match="true or false"):
        load_config(proj / "merge.yaml")


@pytest.mark.parametrize("change,word", [({"task_type": ["CAUSAL_LM"]}, "task_type must be text"),
                                         ({"fan_in_fan_out": "no"}, "fan_in_fan_out must be true or false"),
                                         ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path")])
def test_adapter_config_fields_are_typed(project, change, word):
    proj, work = project
    path = proj / "adapters" / "a0" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, word)


@pytest.mark.parametrize("names,word", [(["merge_report.json", "b"], "name of a file the output holds"),
                                        (["Alpha", "alpha"], "unique (ignoring case)")])
def test_adapter_names_that_would_collide_in_the_output_are_refused(project, names, word):
    proj, work = project
    edit_yaml(proj, lambda d: [a.update(name=n) for a, n in zip(d["adapters"], names)])
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, word)


def test_a_pickle_beside_a_safetensors_file_is_checked_too(project):
    proj, work = project
    marker = work / "ran"
    _pickle_with_payload(proj / "base" / "pytorch_model.bin", marker, {"x": torch.zeros(1)})
    write_yaml(proj, method="iteris", parameters="{iterations: 1}")
    refused(["merge", proj / "merge.yaml", "--out", work / "m"], work, "pytorch_model.bin", "run code")
    assert not marker.exists()
