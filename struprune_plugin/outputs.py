"""Where results may be written, checked before any work, and written so nothing is half-done.

A pruning run takes minutes to hours, so a bad output path must fail before the model is even
loaded, not after the evaluation. And `--overwrite` is dangerous: replacing a folder deletes what
was in it. It may therefore replace only a folder that struprune itself wrote (its manifest lists
every file in it, so nothing foreign is lost) and never one that holds, or lies inside, the model
being read. Temporary folders carry the writer's process id, so a later run can tell the debris of
a killed run from the work of a live one and remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import OutputBusyError, OutputExistsError, OutputPathError

try:  # POSIX: advisory locks that the kernel releases when the holder dies, however it dies
    import fcntl
except ImportError:  # pragma: no cover (Windows): runs are then not protected from each other
    fcntl = None

#: Written last into every folder `save_pruned` produces: the files it wrote, nothing else.
MANIFEST = "struprune_manifest.json"
#: Files that folders written before the manifest existed may hold (model, tokenizer, report).
_LEGACY_FILES = re.compile(
    r"(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|vocab\.json"
    r"|merges\.txt|chat_template\.(jinja|json)|modeling_struprune\.py|struprune_report\.(json|md)"
    r"|layer_widths\.png)"
)
_TEMP = re.compile(r"\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)-[0-9a-f]+")


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_parent_writable(path: Path, what: str) -> None:
    """The folder that will receive `path` (or its nearest existing ancestor) takes a new file.

    Probed by creating one, since permission bits alone lie (root, ACLs, read-only mounts)."""
    for ancestor in [path.parent, *path.parent.parents]:
        if ancestor.exists() and not ancestor.is_dir():
            raise OutputPathError(
                f"{what} {path} cannot be created: {ancestor} is a file, not a folder. Fix: choose a "
                "path whose parent folders are folders"
            )
    base = _nearest_existing(path.parent)
    try:
        fd, probe = tempfile.mkstemp(prefix=".struprune-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputPathError(
            f"{what} {path} cannot be written: {base} does not accept new files ({err.strerror}). "
            "Fix: choose a writable location"
        ) from err


def struprune_files(folder: Path) -> set[str] | None:
    """The files `folder` may hold as a struprune output, or None if struprune did not write it."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            return {*json.loads(manifest.read_text())["files"], MANIFEST}
        except (ValueError, KeyError, TypeError, OSError):
            return None
    config = folder / "config.json"
    try:
        legacy = config.is_file() and "struprune_layout" in json.loads(config.read_text())
    except (ValueError, OSError):
        legacy = False
    if legacy:
        return {p.name for p in folder.iterdir() if p.is_file() and _LEGACY_FILES.fullmatch(p.name)}
    return None


def foreign_content(folder: Path) -> list[str]:
    """Entries of `folder` that struprune did not write; every entry if it wrote none of them."""
    entries = sorted(p.name for p in folder.iterdir())
    ours = struprune_files(folder)
    if ours is None:
        return entries
    return [name for name in entries if name not in ours or not (folder / name).is_file()]


def check_output_folder(
    output: str | os.PathLike, sources: Iterable[str | os.PathLike | None] = (), overwrite: bool = False
) -> Path:
    """Refuse an output folder that would lose data or cannot be written; call before any work.

    `sources` are the folders being read (the model): the output may neither be, contain nor lie
    inside one. An existing output is replaced only with `overwrite` and only when it holds nothing
    but a previous struprune output."""
    output = Path(output)
    target = _resolved(output)
    _check_apart_from_sources(output, target, sources, "output folder")
    if _within(Path.cwd().resolve(), target):
        raise OutputPathError(
            f"output folder {output} is the current folder or one above it; replacing it would delete "
            "your work. Fix: choose a new folder, e.g. runs/my-pruned"
        )
    if output.exists() or output.is_symlink():
        if not output.is_dir() or output.is_symlink():
            raise OutputPathError(
                f"output {output} exists and is not a folder. Fix: choose a new folder name"
            )
        if not overwrite:
            raise OutputExistsError(
                f"{output} already exists. Fix: choose another --output folder or pass --overwrite"
            )
        foreign = foreign_content(target)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise OutputExistsError(
                f"--overwrite replaces only a folder written by struprune, and {output} holds other "
                f"content ({shown}). Nothing was deleted. Fix: choose a new --output folder, or move "
                "those files away yourself"
            )
    _check_parent_writable(target, "output folder")
    return output


def _check_apart_from_sources(
    output: Path, target: Path, sources: Iterable[str | os.PathLike | None], what: str
) -> None:
    """No output may be, contain or lie inside a folder (or file) being read."""
    for source in sources:
        if not source or not Path(source).exists():  # "" (a model built in memory) is no folder
            continue
        src = _resolved(source)
        if _within(target, src) or _within(src, target):
            relation = "is" if target == src else "lies inside" if _within(target, src) else "contains"
            raise OutputPathError(
                f"{what} {output} {relation} the input model folder {source}; writing there could "
                "destroy the checkpoint being read. Fix: choose an output path outside it"
            )


def check_output_file(
    path: str | os.PathLike,
    what: str = "output file",
    sources: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    ours: Callable[[Path], bool] | None = None,
) -> Path:
    """The one check for every file a command writes, made before any work.

    The file may not lie inside a folder being read (`sources`: an export must not land on the
    weights it reads), may not be a folder, and its parent must take a new file. An existing file
    is replaced only with `overwrite` and, when `ours` is given, only if `ours(path)` says it is a
    file of the kind this command writes (a GGUF file, a results JSON), never someone's weights."""
    path = Path(path)
    target = _resolved(path)
    _check_apart_from_sources(path, target, sources, what)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder. Fix: name a file, e.g. {path / 'result.json'}")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                f"{what} {path} already exists. Fix: choose another path or pass --overwrite"
            )
        if not path.is_file():
            raise OutputPathError(f"{what} {path} exists and is not a regular file. Fix: choose another path")
        if ours is not None and not ours(path):
            raise OutputExistsError(
                f"--overwrite replaces only a file this command wrote, and {path} is not one. Nothing was "
                "replaced. Fix: choose another path, or move that file away yourself"
            )
    _check_parent_writable(target, what)
    return path


def place_file(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `path`. Without `overwrite` a file that appeared at `path` during
    the run (another process's) is never replaced: a hard link cannot be made over an existing name."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(
            f"{path} appeared while this run was writing it (another process wrote it); it was left as "
            "it is. Fix: run again with another output path"
        ) from None
    except OSError:  # a filesystem without hard links: check, then rename (a small window remains)
        if path.exists():
            raise OutputExistsError(
                f"{path} appeared while this run was writing it; it was left as it is. Fix: run again "
                "with another output path"
            ) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


_HELD_LOCKS: dict[Path, int] = {}


def lock_path(output: str | os.PathLike) -> Path:
    target = _resolved(output)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Claim `output` for this process for the block; refuse at once if a live run holds it.

    Checking that an output is free at the start and renaming into place at the end leaves the
    whole run in between: two runs started at once with the same new output would both pass the
    check and the second would replace the first's work. The claim is an advisory lock on a
    sibling file (`.NAME.lock`), taken before any work and released at the end; the kernel drops
    it when the holder dies, so a killed run never blocks the next one. Nested claims of the same
    output by one process (the CLI, then the writer it calls) are one claim. `wait=True`
    queues behind the holder instead (the shared model cache: the second process then finds the
    folder built)."""
    target = _resolved(output)
    if fcntl is None or target in _HELD_LOCKS:
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputBusyError(
                f"another struprune run (process {holder}) is writing {output} right now. Fix: wait for "
                "it to finish, or choose another output path"
            ) from None
        try:  # a holder that finished unlinks the file: the lock must be on the file at the path
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCKS[target] = fd
    try:
        yield
    finally:
        del _HELD_LOCKS[target]
        lock.unlink(missing_ok=True)
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write via a sibling temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_folder_atomically(
    output: str | os.PathLike,
    build: Callable[[Path], None],
    sources: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
) -> Path:
    """Let `build` fill a hidden sibling folder, add the manifest, and rename it into place.

    A crash or SIGTERM leaves either the old folder or the new one (the sibling is removed, or by
    the next run if the process was killed outright). `overwrite` replaces only a folder struprune
    wrote, and no folder being read (`sources`) is ever a valid output (`check_output_folder`)."""
    output = check_output_folder(output, sources, overwrite)
    with output_lock(output), terminate_as_exception():
        output = check_output_folder(output, sources, overwrite)  # again, now that it is ours
        remove_stale_temps(output)
        tmp = temp_sibling(output)
        try:
            tmp.mkdir()
            build(tmp)
            files = sorted(p.name for p in tmp.iterdir())
            write_text_atomic(
                tmp / MANIFEST, json.dumps({"written_by": "struprune", "files": files}, indent=1)
            )
            _place_folder(tmp, output, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return output


def _place_folder(tmp: Path, output: Path, overwrite: bool) -> None:
    """Rename the finished `tmp` to `output`, replacing only a folder struprune wrote, and only with
    `overwrite`. `os.rename` never replaces a folder that holds anything, so a folder another
    program filled while this run worked survives, and this run's result is kept beside it under a
    visible name (the output's lock keeps other struprune runs out)."""
    old = None
    if overwrite and output.is_dir() and not output.is_symlink() and not foreign_content(output):
        old = temp_sibling(output, "old")
        os.rename(output, old)
    try:
        os.rename(tmp, output)
    except OSError as err:
        if old is not None and not output.exists():
            os.rename(old, output)
            old = None
        kept = output.parent / f"{output.name}.unplaced-{os.getpid()}"
        os.rename(tmp, kept)
        raise OutputExistsError(
            f"{output} appeared while this run was writing it (not written by struprune); it was left "
            f"as it is and the result was saved to {kept} instead. Fix: move {kept} where you want it"
        ) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def add_to_manifest(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Record files added to a finished struprune folder (a report written after the weights)."""
    path = Path(folder) / MANIFEST
    data = json.loads(path.read_text())
    data["files"] = sorted({*data["files"], *(n for n in names if (Path(folder) / n).is_file())})
    write_text_atomic(path, json.dumps(data, indent=1))


def temp_sibling(output: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `output` that names this process, so stale ones can be recognised."""
    return output.parent / f".{output.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(output: Path) -> list[Path]:
    """Delete temporary siblings of `output` left by runs that were killed (their process is gone)."""
    removed = []
    if not output.parent.is_dir():
        return removed
    for entry in output.parent.iterdir():
        match = _TEMP.fullmatch(entry.name)
        if match and match["name"] == output.name and not _alive(int(match["pid"])):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


class Terminated(SystemExit):
    """SIGTERM arrived during a write: unwinds like Ctrl-C so temporary files are removed."""


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into an exception for the duration of a write, so `finally` blocks run.

    By default SIGTERM kills the process on the spot and leaves half-written temporary folders.
    Only the main thread can take signals, and a handler the application installed is respected."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        yield
        return

    def handler(signum, _frame):
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
