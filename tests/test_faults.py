"""Fault injection for adapter folders: saves that crash at every step, and concurrent writers and readers.

A crash is a forked child that calls ``os._exit`` (no cleanup, no ``finally``: what SIGKILL or a power cut leaves
of the process, minus unsynced page cache) at the k-th file-system step of a save; a race is two forked writers
saving different adapters into one folder while this process loads it. Every outcome must load as exactly one
of the adapters saved (config and weights of the same save) or fail with the "different saves" error; never a
mix. POSIX only (fork); the suite's CI is Linux.
"""

import copy
import json
import os
import re
import signal
import struct
import time

import pytest
import torch
from _helpers import assert_unchanged, snapshot
from _io_models import TARGETS, Tiny, adapted, adapters_of
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank
from lowrank import _safetensors, files

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks the test process (POSIX)")

MIX = "come from different saves"
_VERSIONS: dict[int, dict] = {}


def _version(v: int) -> nn.Module:
    """Adapter ``v``: alpha = v (scale v / 4) and weights drawn from seed v, so any mix of two saves is visible."""
    torch.manual_seed(v)
    model = adapted(Tiny(), alpha=v)
    _VERSIONS.setdefault(v, adapters_of(model))
    return model


def _save(directory, version: int) -> None:
    lowrank.save_adapter(_version(version), directory)


def _load(directory) -> int:
    """The version loaded by ``lowrank.load_adapter``; fails the test on anything but one whole save."""
    got = adapters_of(lowrank.load_adapter(Tiny(), directory))
    v = round(next(iter(got.values()))[2] * 4)
    if v not in _VERSIONS:
        _version(v)
    want = _VERSIONS[v]
    assert got.keys() == want.keys()
    for name, (a, b, scale) in got.items():  # the config of save v and the weights of save v, nothing else
        assert torch.equal(a, want[name][0]) and torch.equal(b, want[name][1]) and scale == want[name][2], name
    return v


def _outcome(directory) -> int | str:
    try:
        return _load(directory)
    except ValueError as e:
        assert MIX in str(e)
        return "mix refused"


class _Steps:
    """Patches os.fsync / os.replace in the child: counts the steps, exits abruptly at step ``crash_at``, and
    sleeps ``delay`` seconds before each (slow disks widen the windows the races need)."""

    def __init__(self, crash_at=None, delay=0.0):
        self.count, self.crash_at, self.delay = 0, crash_at, delay
        self.real = {name: getattr(os, name) for name in ("fsync", "replace")}
        for name, real in self.real.items():
            setattr(os, name, self._wrap(real))

    def _wrap(self, real):
        def step(*args, **kwargs):
            self.count += 1
            if self.count == self.crash_at:
                os._exit(17)
            if self.delay:
                time.sleep(self.delay)
            return real(*args, **kwargs)

        return step


def _child(body) -> int:
    """Run ``body()`` in a forked child; return its exit code (17: it crashed where told)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_crash_at_every_step_loads_old_or_new_or_refuses(tmp_path):
    # The steps of one save: fsync(weights tmp), fsync(config tmp), replace(weights), replace(config),
    # fsync(folder). Before the first rename the folder holds the old adapter; after the second, the new one;
    # between them, new weights with the old config: refused, never loaded as new weights with the old alpha.
    (tmp_path / "README.md").write_text("kept")
    expected = {1: 1, 2: 1, 3: 1, 4: "mix refused", 5: 2}
    for step, want in expected.items():
        _save(tmp_path, 1)
        code = _child(lambda step=step: (_Steps(crash_at=step), _save(tmp_path, 2)))
        assert code == 17, f"the save did not reach step {step}"
        assert _outcome(tmp_path) == want, f"crash at step {step}"
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".lowrank-tmp")]
        assert bool(leftovers) == (step <= 4), leftovers  # the crash left the temporary files it had not renamed
        _save(tmp_path, 3)  # the next save repairs the folder and removes the leftovers
        assert _load(tmp_path) == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"]  # fmt: skip

    def count():
        steps = _Steps()
        _save(tmp_path, 2)
        os._exit(steps.count)

    assert _child(count) == len(expected)  # a whole save has exactly these steps: the list above is complete


def test_kill_at_random_moments(tmp_path):
    # SIGKILL (not a cooperative exit) at 12 moments spread over a slowed save loop.
    _save(tmp_path, 1)
    outcomes = set()
    for i in range(12):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                _Steps(delay=0.002)
                for v in range(2, 1000):
                    _save(tmp_path, v)
            finally:
                os._exit(0)
        time.sleep(0.003 * (i + 1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcomes.add(type(_outcome(tmp_path)))
    assert outcomes <= {int, str}


@pytest.mark.parametrize("locks", [True, False])
def test_two_writers_and_a_reader(tmp_path, monkeypatch, locks):
    # Two processes save adapters 100.. and 200.. into one folder, 15 times each, with slowed steps, while this
    # process loads it. With the folder lock every load is one whole save; without locks (a filesystem without
    # flock) a load may also be refused as a mix, but is never a mix.
    if not locks:
        monkeypatch.setattr(files, "fcntl", None)
    _save(tmp_path, 1)

    def writer(base):
        def body():
            _Steps(delay=0.001)
            for v in range(base, base + 15):
                _save(tmp_path, v)

        return body

    pids = []
    for base in (100, 200):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                writer(base)()
            finally:
                os._exit(0)
        pids.append(pid)
    seen, running = [], set(pids)
    while running:
        seen.append(_outcome(tmp_path))
        running = {p for p in running if os.waitpid(p, os.WNOHANG) == (0, 0)}
    versions = {v for v in seen if v != "mix refused"}
    assert versions <= {1, *range(100, 115), *range(200, 215)}
    assert len(versions) > 2  # the loads did overlap the saves
    if locks:
        assert "mix refused" not in seen
    final = _outcome(tmp_path)
    assert final in (114, 214) or (not locks and final == "mix refused")


# ---------------------------------------------------------------------------------------------- through the API
# The same guarantees through lowrank.save_adapter / load_adapter, and hostile files refused before the model or
# the folder changes.


def _tiny_adapter(version: int):
    torch.manual_seed(version)
    return adapted(Tiny(), alpha=version)


def _reads(monkeypatch) -> list:
    """Record every tensor the loader reads from a file (by key)."""
    names, real = [], _safetensors.SafetensorsReader.read

    def read(self, name):
        names.append(name)
        return real(self, name)

    monkeypatch.setattr(_safetensors.SafetensorsReader, "read", read)
    return names


def _rewrite(folder, tensors=None, config=None, metadata=None):
    """Replace the folder's files by hand (a PEFT-style file: no lowrank binding)."""
    if tensors is not None:
        save_file(tensors, folder / files.WEIGHTS_NAME, metadata=metadata or {"format": "pt"})
    if config is not None:
        (folder / files.CONFIG_NAME).write_text(config if isinstance(config, str) else json.dumps(config))


@pytest.fixture
def saved(tmp_path):
    model = _tiny_adapter(2)
    lowrank.save_adapter(model, tmp_path)
    _rewrite(tmp_path, tensors=load_file(tmp_path / files.WEIGHTS_NAME))  # drop the binding: edits allowed
    return tmp_path


def test_huge_tensor_refused_from_the_header(saved, monkeypatch):
    # A correctly named 512 MiB lora_A (the data is a hole in a sparse file: no disk used). Refused on its shape
    # with no tensor read at all; the reference loader allocated the 512 MiB (and checked it) first.
    key = "base_model.model.blocks.0.up.lora_A.weight"
    small = {k: t for k, t in load_file(saved / files.WEIGHTS_NAME).items() if k != key}
    header, data, rows = {}, b"", (512 << 20) // 48
    for k, t in small.items():
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [len(data), len(data) + 4 * t.numel()]}
        data += t.numpy().tobytes()
    header[key] = {"dtype": "F32", "shape": [rows, 12], "data_offsets": [len(data), len(data) + rows * 48]}
    text = json.dumps(header).encode()
    with open(saved / files.WEIGHTS_NAME, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text + data)
        out.truncate(8 + len(text) + len(data) + rows * 48)
    reads = _reads(monkeypatch)
    base = Tiny()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=rf"blocks.0.up has lora_A \({rows}, 12\)"):
        lowrank.load_adapter(base, saved)
    assert reads == []
    assert_unchanged(base, snap)


def test_many_tiny_tensors_refused_by_count(saved):
    n = 100_000  # one-byte tensors: a 10 MB header
    entry = '"base_model.model.m{0}.lora_A.weight":{{"dtype":"U8","shape":[1],"data_offsets":[{0},{1}]}}'
    text = ("{" + ",".join(entry.format(i, i + 1) for i in range(n)) + "}").encode()
    (saved / files.WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * n)
    # strict loads bound the header by the model (2 tensors per module, 4 KiB each, plus 1 MiB for the config
    # copy): this 10 MB header is refused after reading its 8-byte length. strict=False: the fixed 64Ki limit.
    with pytest.raises(ValueError, match=r"a header of \d+ bytes in a \d+-byte file \(at most \d+\)"):
        lowrank.load_adapter(Tiny(), saved)


def test_only_used_tensors_are_read(saved, monkeypatch):
    reads = _reads(monkeypatch)
    lowrank.load_adapter(Tiny(), saved)
    assert len(reads) == 8 and len(set(reads)) == 8  # 4 layers x (A, B), each read once


def test_fp16_adapter_refuses_values_that_overflow_it(saved):
    tensors = load_file(saved / files.WEIGHTS_NAME)
    tensors["base_model.model.blocks.1.down.lora_B.weight"][0, 0] = 70000.0  # finite in the float32 file
    _rewrite(saved, tensors=tensors)
    model = copy.deepcopy(Tiny())
    lowrank.inject(model, TARGETS, r=4, alpha=2, adapter_dtype=torch.float16)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"blocks.1.down.lora_B holds 1 value\(s\) beyond the float16 range"):
        lowrank.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_same_tensor_under_two_names_refused(saved):
    tensors = load_file(saved / files.WEIGHTS_NAME)
    tensors["base_model.model.blocks.0.up.lora_A.default.weight"] = (
        tensors["base_model.model.blocks.0.up.lora_A.weight"] + 1
    )
    _rewrite(saved, tensors=tensors)
    base = Tiny()
    snap = snapshot(base)
    with pytest.raises(
        ValueError, match=r"blocks.0.up.lora_A is stored twice: .*lora_A.default.weight.* and .*lora_A.weight"
    ):
        lowrank.load_adapter(base, saved)
    assert_unchanged(base, snap)


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 2, "lora_alpha": 200}', "duplicate key 'lora_alpha'"),
        ('{"peft_type": "LORA", "x": ' + "[" * 50_000 + "]" * 50_000 + "}", "nests deeper than"),
        ('{"peft_type": "LORA", "r": ' + "4" * 5000 + "}", "integer with 5000 digits"),
        ('{"peft_type": "LORA", "r": 4, "lora_alpha": 2, "rank_pattern": {"(a)\\\\1": 4}}', "groupref"),
    ],
)
def test_hostile_configs_refused_naming_the_file(saved, text, match):
    _rewrite(saved, config=text)
    base = Tiny()
    snap = snapshot(base)
    with pytest.raises(ValueError, match=rf"adapter_config.json.*{re.escape(match)}"):
        lowrank.load_adapter(base, saved)
    assert_unchanged(base, snap)


def test_catastrophic_pattern_key_does_not_hang(saved):
    # "(.*)*!" backtracks exponentially in re on every layer name; it matches none, so r and alpha stay the
    # config's. The answer comes from the bounded matcher (test_files bounds its states).
    config = json.loads((saved / files.CONFIG_NAME).read_text())
    config["rank_pattern"] = {"(.*)*!" + "x" * 30: 99}
    _rewrite(saved, config=config)
    model = lowrank.load_adapter(Tiny(), saved)
    assert {layer.r for _, layer in lowrank.lora_layers(model)} == {4}


def test_a_file_is_not_a_folder(saved):
    with pytest.raises(
        NotADirectoryError, match=r"adapter_model.safetensors is a file, not an adapter directory \(pass its directory"
    ):
        lowrank.load_adapter(Tiny(), saved / files.WEIGHTS_NAME)


def test_read_only_folder_raises_oserror_naming_it(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def denied(path, *a, **k):  # a read-only folder's answer (chmod does not stop root, who runs CI containers)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "open", denied, raising=False)
    with pytest.raises(PermissionError, match=rf"cannot write the adapter to {re.escape(str(saved))}"):
        lowrank.save_adapter(_tiny_adapter(3), saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_bad_argument_fails_before_the_folder_changes(saved):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(ValueError, match="'base_model_name_or_path' = .* cannot be written as JSON"):
        lowrank.save_adapter(_tiny_adapter(3), saved, base_model_name_or_path=object())
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_merge_is_all_or_nothing():
    model = adapted(Tiny())
    layers = [layer for _, layer in lowrank.lora_layers(model)]
    layers[2].base.weight = nn.Parameter(torch.empty(20, 12, device="meta"), requires_grad=False)  # 3rd of 4
    weights = [layer.base.weight for layer in layers]
    state = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}  # (snapshot: no meta)
    with pytest.raises(ValueError, match="blocks.1.up has weights on the meta device: load them before merging"):
        lowrank.merge(model)
    assert not any(layer.merged for layer in layers)
    assert all(layer.base.weight is w for layer, w in zip(layers, weights, strict=True))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_merge_rolls_back_on_a_late_failure(monkeypatch):
    # A failure the checks cannot foresee (out of memory on the third layer): the first two are unmerged again.
    model = adapted(Tiny())
    layers = [layer for _, layer in lowrank.lora_layers(model)]
    snap = snapshot(model)
    real = type(layers[0]).merge

    def merge(self):
        if self is layers[2]:
            raise torch.OutOfMemoryError("simulated")
        real(self)

    monkeypatch.setattr(type(layers[0]), "merge", merge)
    with pytest.raises(torch.OutOfMemoryError):
        lowrank.merge(model)
    assert_unchanged(model, snap)
    assert not any(layer.merged for layer in layers)


def test_fifo_in_place_of_a_file_is_refused_not_waited_on(saved):
    # open() on a FIFO blocks until a writer comes: a load must refuse it instead.
    (saved / files.CONFIG_NAME).unlink()
    os.mkfifo(saved / files.CONFIG_NAME)
    with pytest.raises(ValueError, match="adapter_config.json is not a regular file"):
        lowrank.load_adapter(Tiny(), saved)
