"""Write merged LoRAs as PEFT adapter directories (or full models), atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch

from .adapters import PREFIX, LoraAdapter
from .deltas import LowRankDelta
from .errors import IterisError

log = logging.getLogger("iteris")


def check_output_dir(out: str | Path | None, force: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Where a merge may write, decided before any work starts: never an input, a directory holding one or
    inside one, the working directory, home or ``/`` (symlinks resolved), never a non-empty directory
    without ``force``, and only somewhere this process can create files."""
    if out is None or not str(out).strip():
        raise IterisError("the output directory is empty; name a new directory with --out")
    out = Path(out)
    target = out.resolve()
    here = Path.cwd().resolve()
    for special, what in ((Path(target.anchor), "the file system's root"), (Path.home().resolve(), "your home directory"),
                          (here, "the working directory")):
        if target == special or target in special.parents:
            raise IterisError(f"output '{out}' is {what}{'' if target == special else ' or holds it'}; "
                              "write to a new directory such as ./merged")
    for source in inputs:
        if source is None or not str(source).strip() or not Path(source).exists():
            continue  # (a hub id, or missing: reported where it is read)
        held = Path(source).resolve()
        if target == held or target in held.parents:
            raise IterisError(f"output '{out}' {'is' if target == held else 'holds'} the input '{source}'; "
                              "a merge never writes over what it reads: choose another --out")
        if held in target.parents:
            raise IterisError(f"output '{out}' lies inside the input '{source}'; choose an --out outside every input")
    if out.exists() and not out.is_dir():
        raise IterisError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise IterisError(f"output directory '{out}' is not empty; pass --force (force=True) to replace it")
    _probe_writable(out, target)
    return out


def _probe_writable(out: Path, target: Path) -> None:
    """Create and remove a directory where the output's temporary will go (its nearest existing parent)."""
    where = target.parent
    while not where.exists():
        where = where.parent
    if not where.is_dir():
        raise IterisError(f"output '{out}' cannot be created: '{where}' is a file")
    try:
        probe = tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=where)
        os.rmdir(probe)
    except OSError as exc:
        raise IterisError(f"output '{out}' cannot be written: {exc.strerror or exc} in '{where}'") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(root: Path) -> None:
    """Files and directories as readable as the umask allows (a temporary directory starts 0700, and some
    writers create 0600 files), as save_pretrained leaves them."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _stale_temporaries(out: Path) -> None:
    """Remove what an earlier run into the same output left when it was killed (its process is gone); a
    temporary whose process still runs (a concurrent merge) is left alone."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(?:(\d+)-)?")
    for entry in out.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None:
            continue
        if match.group(2) is None:  # (named by an older version, without its process)
            log.warning("left alone: %s, a temporary of an earlier run; remove it if no merge is writing there", entry)
        elif not _alive(int(match.group(2))):
            shutil.rmtree(entry, ignore_errors=True)
            log.warning("removed %s, left by an earlier run that was killed", entry)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(out: str | Path, force: bool, inputs: Iterable[str | Path | None] = ()):
    """Yield a temporary sibling directory; it replaces ``out`` only if the block succeeds."""
    out = check_output_dir(out, force, inputs).resolve()
    _stale_temporaries(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{tag}", dir=out.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{tag}", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def adapter_state_dict(deltas: dict[str, LowRankDelta], extras: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, delta in deltas.items():
        state[f"{PREFIX}{name}.lora_A.weight"] = delta.A.detach().float().cpu().contiguous()
        state[f"{PREFIX}{name}.lora_B.weight"] = delta.B.detach().float().cpu().contiguous()
    for key, value in extras.items():
        state[f"{PREFIX}{key}"] = value.detach().cpu().contiguous()
    return state


def adapter_config(
    deltas: dict[str, LowRankDelta], adapters: list[LoraAdapter], base_model: str, extras: dict[str, torch.Tensor]
):
    """A LoraConfig with scaling 1 on every layer: lora_alpha equals each layer's rank."""
    from peft import LoraConfig

    ranks = {name: d.rank for name, d in deltas.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: k for name, k in ranks.items() if k != r}
    first = adapters[0].config
    modules_to_save = sorted({key.rsplit(".", 1)[0] for key in extras}) or None
    return LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)),
        task_type=first.get("task_type"),
        base_model_name_or_path=base_model,
        modules_to_save=modules_to_save,
    )


def write_adapter(
    directory: Path,
    deltas: dict[str, LowRankDelta],
    adapters: list[LoraAdapter],
    base_model: str,
    extras: dict[str, torch.Tensor],
) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    adapter_config(deltas, adapters, base_model, extras).save_pretrained(str(directory))
    save_file(adapter_state_dict(deltas, extras), str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_merged_model(
    directory: Path, adapter_dir: Path, base_model: str, task_type: str | None, extras: dict, tokenizer_path: str,
    trust_remote_code: bool = False,
):
    """Fold the written adapter into the base weights with PEFT and save a plain transformers model."""
    from peft import PeftModel

    from .finite import check_parameters
    from .models import load_base_model, load_tokenizer

    base = load_base_model(base_model, task_type, extras, dtype="auto", device="cpu", trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    check_parameters(merged, "the merged model")
    merged.save_pretrained(str(directory))
    try:
        load_tokenizer(tokenizer_path, trust_remote_code).save_pretrained(str(directory))
    except IterisError:
        pass  # a model without a tokenizer directory still saves


def write_report(directory: Path, report: dict) -> None:
    (directory / "merge_report.json").write_text(json.dumps(report, indent=2, default=str, allow_nan=False) + "\n")
