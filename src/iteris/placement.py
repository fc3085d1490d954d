"""Where an output may go, and how it lands there: never on, in or around what the run reads, atomically,
as readable as the umask allows, with what killed runs left behind cleaned up (or named)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path

from .errors import IterisError

log = logging.getLogger("iteris")

# how deep inside an input directory the links are followed (a hub cache snapshot links its files into
# ../../blobs; a pipeline's components are one level down)
_LINK_DEPTH = 3


def _identity(path: Path) -> tuple[int, int] | None:
    """The file itself (device, inode), whatever path names it: a link, a bind mount, another case."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _with_ancestors(path: Path) -> dict[tuple[int, int], Path]:
    """The identities of ``path`` (where it exists) and of every directory above it."""
    out = {}
    for p in (path, *path.parents):
        key = _identity(p)
        if key is not None:
            out.setdefault(key, p)
    return out


def _held(inputs: Iterable[str | Path | None]) -> list[tuple[str, Path]]:
    """Each input that exists here, and what the links inside an input directory point to."""
    held = []
    for source in inputs:
        if source is None or not str(source).strip() or not Path(source).exists():
            continue  # (a hub id, or missing: reported where it is read)
        path = Path(source)
        held.append((str(source), path.resolve()))
        if path.is_dir():
            top = len(path.parts)
            for root, dirs, files in os.walk(path):
                if len(Path(root).parts) - top >= _LINK_DEPTH:
                    dirs[:] = []
                for name in dirs + files:
                    entry = Path(root) / name
                    if entry.is_symlink():
                        held.append((str(source), entry.resolve()))
    return held


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # (no HOME and no password entry: a bare container)
        return None


def hub_cache() -> str | None:
    """Where the Hugging Face hub keeps downloads: an input whenever a model is named by its hub id."""
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except Exception:  # noqa: BLE001  (an old or missing huggingface_hub: nothing more to protect)
        return None


def check_output_dir(out: str | Path | None, force: bool, inputs: Iterable[str | Path | None] = (),
                     repair: bool = True) -> Path:
    """Where a run may write, decided before any work starts: never an input, a directory holding one or
    inside one (links, bind mounts and case-insensitive names seen through by comparing the files
    themselves), never the working directory, home or ``/`` or a directory holding them, never a non-empty
    directory without ``force``, and only where this process can create and replace directories."""
    if out is None or not str(out).strip():
        raise IterisError("the output directory is empty; name a new directory with --out")
    out = Path(out)
    target = out.resolve()
    own = _identity(target)
    inside = _with_ancestors(target)  # the output and every directory it would sit in
    places = [(Path(target.anchor), "the file system's root"), (_home(), "your home directory"),
              (Path.cwd().resolve(), "the working directory")]
    for special, what in places:
        if special is not None and own is not None and own in _with_ancestors(special):
            same = own == _identity(special)
            raise IterisError(f"output '{out}' is {what}{'' if same else ' or holds it'}; "
                              "write to a new directory such as ./merged")
    for source, held in _held(inputs):
        above = _with_ancestors(held)
        if own is not None and own in above:
            same = own == _identity(held)
            raise IterisError(f"output '{out}' {'is' if same else 'holds'} the input '{source}'"
                              f"{'' if held == Path(source).resolve() else f' (through its link to {held})'}; "
                              "a run never writes over what it reads: choose another --out")
        key = _identity(held)
        if key is not None and key in inside:
            raise IterisError(f"output '{out}' lies inside the input '{source}'; choose an --out outside every input")
    if repair:  # (a previous output a killed run had moved aside is back before it is judged; a dry run only looks)
        _stale_temporaries(target)
    if out.exists() and not out.is_dir():
        raise IterisError(f"output '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise IterisError(f"output directory '{out}' is not empty; pass --force (force=True) to replace it")
    _probe_writable(out, target)
    return out


def _probe_writable(out: Path, target: Path) -> None:
    """Create and remove a directory where the output's temporary will go (its nearest existing parent);
    an existing output must also be movable (writable itself, not a mount point)."""
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
    if target.is_dir():
        if os.path.ismount(target):
            raise IterisError(f"output '{out}' is a mount point, which cannot be replaced; write to a directory in it")
        if not os.access(target, os.W_OK):
            raise IterisError(f"output '{out}' cannot be replaced: it is not writable")


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


def _host() -> str:
    """This machine, briefly: temporaries on a shared file system are judged only by the machine that made them."""
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _stale_temporaries(out: Path) -> None:
    """Clean up after an earlier run into the same output that was killed (its process gone): its temporary
    is removed, and a previous output it had moved aside is put back. Temporaries of a process that still
    runs (a concurrent merge), of another machine, or of an older version are left alone and named."""
    if not out.parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(?:([0-9a-f]{{8}})-(\d+)-)?")
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None:
            continue
        kind, host, pid = match.groups()
        if host is None or host != _host():
            log.warning("left alone: %s, a temporary of another run (%s); remove it if no merge is writing there",
                        entry, "an older version" if host is None else "another machine")
        elif not _alive(int(pid)):
            if kind == "old" and (entry / "x").exists() and not out.exists():
                os.replace(entry / "x", out)
                log.warning("put back %s, which an earlier run had moved aside when it was killed", out)
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
    """Yield a temporary sibling directory; it replaces ``out`` only if the block succeeds. If the swap itself
    is interrupted, the previous ``out`` is put back."""
    out = check_output_dir(out, force, inputs).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{_host()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{tag}", dir=out.parent))
    try:
        yield tmp
        _follow_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{tag}", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "x", out)
                os.rmdir(old)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise IterisError(f"cannot write the output '{out}': {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
