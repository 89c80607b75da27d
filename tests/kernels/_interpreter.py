"""How the kernel tests run: compiled on CUDA in-process, and in Triton's CPU interpreter in a subprocess.

Why a subprocess: ``@triton.jit`` picks interpreter or compiler when it decorates (at import), and triton's
own modules read TRITON_INTERPRET lazily for the whole life of the process (unsetting it after the import breaks
later launches). Setting it in this pytest process would therefore leak into every test module that runs
afterwards (and fails if anything imported triton first). So each kernel test module, in the normal pytest
process, owns one test that re-runs the module with ``TRITON_INTERPRET=1`` in a fresh interpreter; in that
child (``INTERPRETER_CHILD``) the device-parametrized tests take the ``"cpu"`` device and nothing else.

Under pytest's default "prepend" import mode this folder is on sys.path, so test modules import this file as
``_interpreter`` (conftest.py here turns ``load_kernels`` into the ``kernels`` fixture).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD_FLAG = "LOWRANK_KERNEL_TEST_CHILD"
INTERPRETER_CHILD = os.environ.get(_CHILD_FLAG) == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def devices() -> list:
    """Device parameters: ``"cpu"`` in the interpreter child; ``"cuda"`` (marked ``gpu``) in the normal process."""
    if INTERPRETER_CHILD:
        return ["cpu"]
    return [pytest.param("cuda", marks=pytest.mark.gpu)]


def run_module_in_interpreter(module_file: str, timeout_s: float = 240.0, tests: tuple[str, ...] = ()) -> str:
    """Run one test module (only its test functions named in ``tests``, every parametrization, when given) under
    TRITON_INTERPRET=1 in a fresh pytest; raise with its output if anything fails, skips or is deselected."""
    env = {**os.environ, "TRITON_INTERPRET": "1", _CHILD_FLAG: "1", "CUDA_VISIBLE_DEVICES": ""}
    # The `pytest` command next to this interpreter, as the project runs tests: `python -m pytest` from the repo
    # root would put the root's kernels/ folder on sys.path, shadowing Hugging Face's top-level `kernels` package.
    script = Path(sys.executable).with_name("pytest")
    runner = [str(script)] if script.exists() else [sys.executable, "-m", "pytest"]
    targets = [f"{module_file}::{name}" for name in tests] or [module_file]
    cmd = [*runner, *targets, "-q", "-p", "no:cacheprovider", "-W", "ignore::UserWarning"]
    cwd = Path(module_file).resolve().parent  # not the repo root, for the same reason (matters for the fallback)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"interpreter run of {Path(module_file).name} failed (rc {done.returncode}):\n{out[-8000:]}")
    summary = [line for line in out.splitlines() if " passed" in line]
    if not summary or "skipped" in summary[-1] or "deselected" in summary[-1]:
        pytest.fail(f"interpreter run of {Path(module_file).name} ran no tests or skipped some:\n{out[-4000:]}")
    return summary[-1]


def load_kernels():
    """The kernel modules, imported lazily (the normal CPU pytest process never imports triton); in the
    interpreter child, checks that they really were built for the interpreter."""
    from lowrank.kernels import nf4_dequant, nf4_matmul

    if INTERPRETER_CHILD and not nf4_dequant.interpreting():
        pytest.fail("TRITON_INTERPRET=1 is set but the kernels were built for the compiler (triton imported first)")

    class Kernels:
        dequant, matmul = nf4_dequant, nf4_matmul

    return Kernels
