"""Fault injection for adapter folders: saves that crash at every step, and concurrent writers and readers.

A crash is a forked child that calls ``os._exit`` (no cleanup, no ``finally``: what SIGKILL or a power cut leaves
of the process, minus unsynced page cache) at the k-th file-system step of a save; a race is two forked writers
saving different adapters into one folder while this process loads it. Every outcome must load as exactly one
of the adapters saved (config and weights of the same save) or fail with the "different saves" error; never a
mix. POSIX only (fork); the suite's CI is Linux.
"""

import os
import signal
import time

import pytest
import torch

from lowrank import files

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks the test process (POSIX)")

KEY = "base_model.model.layer.lora_A.weight"
MIX = "come from different saves"


def _save(directory, version: int) -> None:
    """Save adapter ``version``: its alpha and every weight equal ``version``, so a mix is visible."""
    tensors = {KEY: torch.full((4, 8), float(version)), KEY.replace("lora_A", "lora_B"): torch.full((8, 4), 1.0)}
    files.write_adapter(directory, tensors, {"peft_type": "LORA", "r": 4, "lora_alpha": version})


def _load(directory) -> int:
    """The version loaded; fails the test on a mix of two saves."""
    with files.open_adapter(directory) as (config, reader):
        a = reader.read(KEY)
    assert torch.equal(a, torch.full_like(a, config["lora_alpha"])), f"config of {config['lora_alpha']}, other weights"
    return config["lora_alpha"]


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
    assert _child(lambda: (_Steps(crash_at=99), _save(tmp_path, 2))) == 0  # 5 steps: the list above is complete


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
