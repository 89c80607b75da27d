"""Adapter folders that change as a whole: what ``save_adapter`` writes and ``load_adapter`` reads.

An adapter folder holds ``adapter_model.safetensors`` and ``adapter_config.json`` (PEFT reads both by these names)
next to whatever else the user keeps there (README, tokenizer): the folder is never replaced, only these two files.
Each file is written to a hidden temporary sibling, fsync'ed, and renamed over its name (``os.replace``: atomic on
POSIX and Windows); the pair is bound together because the weights file carries a copy of the config text in its
safetensors metadata (``lowrank.adapter_config``). So:

* after a crash at any moment, each file is complete (old or new): a load gives the old adapter, the new one, or,
  when the crash fell between the two renames (a few microseconds), a clear error saying the files come from two
  different saves; never new weights with the old alpha;
* two processes saving into one folder take an exclusive ``flock`` on the folder, and readers a shared one, so a
  save is not interleaved with another save or with a load (POSIX; where locks are unavailable, the binding still
  turns any mix into the same clear error);
* temporary files are ``.<name>.<pid>.<random>.lowrank-tmp``: loads read only the two fixed names, and the next
  save into the folder deletes leftovers (under the exclusive lock, no live lowrank writer owns them);
* every argument is checked (config serialisable, tensors writable) before the folder is created or touched.

Folders written by PEFT, or by lowrank before the binding, carry no copy of the config and are read as they are.
Fields that only describe the adapter (``_DESCRIPTIVE``) may differ between the two copies (a user may edit them).
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import _safetensors, _strict_json

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CONFIG_KEY = "lowrank.adapter_config"  # safetensors metadata: the config text saved with these weights
_TMP_SUFFIX = ".lowrank-tmp"
# Fields that do not change the loaded model (PEFT and lowrank ignore them when building it): a hand edit of one of
# these in adapter_config.json does not make the pair inconsistent.
_DESCRIPTIVE = {"base_model_name_or_path", "revision", "peft_version", "inference_mode", "auto_mapping", "task_type"}

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks; the binding alone detects a mix
    fcntl = None


def config_text(config: dict) -> str:
    """The config as the JSON text both copies hold; raises ValueError naming an unserialisable field."""
    for key, value in config.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"adapter config field {key!r} = {value!r} cannot be written as JSON: {e}") from None
    return json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"


def _named(e: OSError, what: str, path: os.PathLike | str) -> OSError:
    """The same kind of OSError (errno kept: PermissionError stays PermissionError), naming the path."""
    if e.errno is None:  # raised without an errno (e.g. OSError("disk full")): keep its message
        return OSError(f"cannot {what} {path}: {e}")
    return OSError(e.errno, f"cannot {what} {path}: {e.strerror or e}", str(path))


@contextlib.contextmanager
def _locked(directory: Path, exclusive: bool) -> Iterator[bool]:
    """Hold ``flock`` on the folder itself (no lock file left behind); yields whether a lock is held."""
    if fcntl is None or not hasattr(os, "O_DIRECTORY"):
        yield False
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            held = True
        except OSError:  # e.g. some network filesystems: go on unlocked, the binding still detects mixes
            held = False
        yield held
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _fsync_dir(directory: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # make the renames durable (POSIX; Windows cannot open directories)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")


def _remove_leftovers(directory: Path) -> None:
    for p in directory.glob(f".*{_TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            p.unlink()


def _write_tmp(dest: Path, write: Callable, tmps: list) -> Path:
    tmp = _tmp_name(dest)
    tmps.append(tmp)
    with open(tmp, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _commit(directory: Path, writes: list[tuple[Path, Callable]], what: str) -> None:
    """Write each (dest, write(f)) to a temporary file, then rename them all into place, in order, under the lock."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _named(e, f"create the folder for the {what} at", directory) from None
    tmps: list[Path] = []
    dest = directory
    try:
        with _locked(directory, exclusive=True) as held:
            if held:
                _remove_leftovers(directory)
            done = []
            for dest, write in writes:
                done.append((_write_tmp(dest, write, tmps), dest))
            for tmp, dest in done:  # every file is complete on disk before the first rename
                os.replace(tmp, dest)
                tmps.remove(tmp)
            _fsync_dir(directory)
    except OSError as e:
        raise _named(e, f"write the {what} to", dest) from None
    finally:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()


def _check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"tensor {name!r} must be a contiguous CPU tensor to be written")
        if t.dtype not in _safetensors.DTYPES.values():
            raise ValueError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")


def write_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``tensors`` and ``config`` as one adapter into ``directory`` (created if needed; other files kept).

    Args:
        directory: the adapter folder.
        tensors: {key: contiguous CPU tensor}, PEFT's key names.
        config: the adapter_config.json fields (JSON-serialisable).

    Returns:
        The folder.

    Raises:
        ValueError: an unserialisable config field or an unwritable tensor (nothing on disk has changed).
        OSError: the folder or a file cannot be written (the message names the path; the folder keeps its old
            adapter, the temporary files are removed).
    """
    directory = Path(directory)
    text = config_text(config)
    _check_tensors(tensors)
    metadata = {"format": "pt", CONFIG_KEY: text}
    writes = [
        (directory / WEIGHTS_NAME, lambda f: _safetensors.write(f, tensors, metadata)),
        (directory / CONFIG_NAME, lambda f: f.write(text.encode("utf-8"))),
    ]
    _commit(directory, writes, "adapter")
    return directory


def write_tensors_file(dest: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one safetensors file (a merged model) atomically: complete old or complete new after any crash."""
    dest = Path(dest)
    _check_tensors(tensors)
    _commit(dest.parent, [(dest, lambda f: _safetensors.write(f, tensors, {"format": "pt"}))], "model file")
    return dest


def read_tensor(reader: _safetensors.SafetensorsReader, key: str, dtype: torch.dtype, label: str | None = None):
    """Read tensor ``key`` and cast it to ``dtype``; refuse a non-floating tensor or one not finite after the cast.

    Finiteness is checked on the cast result: 70000.0 is finite in float32 but inf in float16 (max 65504), and a
    float64 1e39 is inf in float32. ``label`` names the tensor in errors (default: ``key``).
    """
    entry, label = reader.entries[key], label or key
    if not entry.dtype.is_floating_point:
        raise ValueError(f"{reader.path}: {label} has dtype {entry.dtype}; LoRA weights must be floating point")
    stored = reader.read(key)
    t = stored.to(dtype)
    if not bool(torch.isfinite(t).all()):
        if bool(torch.isfinite(stored).all()):
            bad = int((~torch.isfinite(t)).sum())
            wide, narrow = str(entry.dtype).removeprefix("torch."), str(dtype).removeprefix("torch.")
            raise ValueError(f"{reader.path}: {label} holds {bad} value(s) beyond the {narrow} range (finite in the "
                             f"file's {wide}, inf once cast to the adapter's {narrow})")  # fmt: skip
        bad = int((~torch.isfinite(stored)).sum())
        raise ValueError(f"{reader.path}: {label} holds NaN or inf ({bad} value(s))")
    return t


def check_folder(path: str | os.PathLike) -> Path:
    """The adapter folder ``path``, or FileNotFoundError / NotADirectoryError saying what it is instead."""
    directory = Path(path)
    if directory.is_file():
        hint = f" (pass its directory, {directory.parent})" if directory.name in (WEIGHTS_NAME, CONFIG_NAME) else ""
        raise NotADirectoryError(f"{directory} is a file, not an adapter directory{hint}")
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    return directory


@contextlib.contextmanager
def open_adapter(
    path: str | os.PathLike, validate: Callable[[object], None] | None = None, **limits
) -> Iterator[tuple[dict, _safetensors.SafetensorsReader]]:
    """Read an adapter folder as one consistent pair: yields (config dict, open weights reader).

    Only the headers are read: the caller checks names and shapes, then ``reader.read(name)`` the tensors it
    uses. ``validate(config)`` runs before the two copies of the config are compared, so a bad field is reported
    as itself rather than as a mismatch. ``limits`` go to ``SafetensorsReader`` (``max_header_bytes``,
    ``max_tensors``).

    Raises:
        FileNotFoundError / NotADirectoryError: no such folder, a file instead, or a missing file (named).
        ValueError: a malformed or hostile file, or config and weights from two different saves.
    """
    directory = check_folder(path)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    with _locked(directory, exclusive=False):  # both files from one save: a concurrent save waits for us
        for f in (config_file, weights_file):  # a FIFO or device would block or never end: regular files only
            if f.exists() and not f.is_file():
                raise ValueError(f"{f} is not a regular file")
        if not config_file.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in adapter folder {directory}")
        if not weights_file.is_file():
            hint = ""
            if (directory / "adapter_model.bin").exists():
                hint = " (found adapter_model.bin: pickled adapters are not loaded, convert them to safetensors)"
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}{hint}")
        config = _strict_json.load_file(config_file)
        reader = _safetensors.SafetensorsReader(weights_file, **limits)  # the open file pins these weights
    with reader:
        if validate is not None:
            validate(config)
        bound = reader.metadata.get(CONFIG_KEY)
        if bound is not None and isinstance(config, dict):
            saved = _strict_json.loads(bound, f"{weights_file} (metadata {CONFIG_KEY})")
            differ = sorted(
                k for k in set(config) | set(saved) if k not in _DESCRIPTIVE and config.get(k) != saved.get(k)
            )
            if differ:
                raise ValueError(
                    f"{config_file} does not match the config saved with {weights_file} (fields {differ[:8]}): the "
                    "two files come from different saves (a save interrupted between its two renames, or edited by "
                    "hand). Save the adapter again"
                )
        yield config, reader
