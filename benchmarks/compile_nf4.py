"""Compile the NF4 kernels for a GPU on any machine (no GPU needed) and report their resources.

    python benchmarks/compile_nf4.py                  # sm_90 (H100/H200), every autotune config
    python benchmarks/compile_nf4.py --arch 80 --lookup load

For each kernel and tile config: registers per thread, spill bytes, stack frame and shared memory (from ptxas -v,
the ptxas that ships with Triton) and a count of the SASS instructions that matter (from its nvdisasm): global
loads (LDG), shared loads (LDS), shuffles (SHFL), tensor-core ops (HMMA / HGMMA), conversions (F2F / F2FP).
A config over the shared-memory limit (227 KB per block on sm_90) or with spills is a bad candidate before any
timing: prune it from the autotune list. Compiling costs no GPU time, so it comes before any session on a lent GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowrank.kernels import nf4_dequant, nf4_matmul

_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_SASS = ("LDG", "LDS", "STS", "SHFL", "HMMA", "HGMMA", "F2F", "F2FP", "FMUL", "FFMA", "SEL", "LDL", "STL")


def _ptxas_report(ptx: str, arch: int) -> dict:
    ptxas = _BIN / "ptxas-blackwell" if (_BIN / "ptxas-blackwell").exists() else _BIN / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src, cubin = Path(d) / "k.ptx", Path(d) / "k.cubin"
        src.write_text(ptx)
        sm = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        cmd = [str(ptxas), f"-arch={sm}", "-v", str(src), "-o", str(cubin)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        text = out.stdout + out.stderr
        report = {
            "regs": int(m.group(1)) if (m := re.search(r"Used (\d+) registers", text)) else None,
            "spill_st": int(m.group(1)) if (m := re.search(r"(\d+) bytes spill stores", text)) else None,
            "stack": int(m.group(1)) if (m := re.search(r"(\d+) bytes stack frame", text)) else None,
        }
        if out.returncode != 0:
            report["error"] = text.strip().splitlines()[-1]
            return report
        sass = subprocess.run([str(_BIN / "nvdisasm"), str(cubin)], capture_output=True, text=True, check=False).stdout
        sass_op = r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9.]+)"
        ops = Counter(m.group(1).split(".")[0] for m in re.finditer(sass_op,
                                                                     sass, re.MULTILINE))  # fmt: skip
        report.update({op: ops.get(op, 0) for op in _SASS})
    return report


def compile_one(fn, signature: dict, constexprs: dict, arch: int, warps: int, stages: int) -> dict:
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    opts = {"num_warps": warps, "num_stages": stages, **nf4_dequant.LAUNCH_OPTIONS}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    except Exception as e:  # noqa: BLE001 - a config that does not compile is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}
    return {"shared": compiled.metadata.shared, **_ptxas_report(compiled.asm["ptx"], arch)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--lookup", default=nf4_dequant.lookup(), choices=["gather", "load"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    opts = p.parse_args()
    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[opts.dtype]
    weights = {"packed_ptr": "*u8", "absmax_ptr": "*u8", "absmax2_ptr": "*fp32", "dmap_ptr": "*fp32",
               "offset_ptr": "*fp32", "code_ptr": "*fp32"}  # fmt: skip
    rows = []
    common = {"BLOCK_SIZE": 64, "DOUBLE_QUANT": True, "LOOKUP": opts.lookup, "INTERPRET": False}
    for nbytes in (1024, 2048, 4096):
        sig = {**weights, "out_ptr": f"*{opts.dtype}", "n": "i32"}
        r = compile_one(nf4_dequant._dequant_kernel, sig, dict(common, BYTES=nbytes), opts.arch,
                        nf4_dequant._DEQUANT_WARPS, 3)  # fmt: skip
        rows.append({"kernel": "dequant", "tiles": f"BYTES={nbytes}", **r})
    mm_common = dict(common, PRECISION="ieee" if opts.dtype == "fp32" else "tf32", W_DTYPE=tl_dtype, GROUPED=True)
    # The forward kernel's LoRA arguments: off (constexpr None: the plain kernel), or on with r = 16 (BLOCK_R 16).
    lora_off = {"a_ptr": None, "xa_ptr": None, "R": None, "stride_am": None, "HAS_LORA": False, "BLOCK_R": 16}
    lora_sig = {"a_ptr": f"*{opts.dtype}", "xa_ptr": "*fp32", "R": "i32", "stride_am": "i32"}
    for name, fn, red, configs, partial, lora in [
        ("fwd_small", nf4_matmul._forward_kernel, "SPLIT_K", nf4_matmul._SMALL_CONFIGS, True, False),
        ("fwd_small_lora16", nf4_matmul._forward_kernel, "SPLIT_K", nf4_matmul._SMALL_CONFIGS, True, True),
        ("grad_small", nf4_matmul._grad_x_kernel, "SPLIT_N", nf4_matmul._grad_x_small.configs, True, False),
        ("fwd_large", nf4_matmul._forward_kernel, "SPLIT_K", nf4_matmul._LARGE_CONFIGS, False, False),
        ("grad_large", nf4_matmul._grad_x_kernel, "SPLIT_N", nf4_matmul._LARGE_CONFIGS, False, False),
    ]:
        forward = fn is nf4_matmul._forward_kernel
        first, out, stride = ("x_ptr", "y_ptr", "stride_xm") if forward else ("g_ptr", "out_ptr", "stride_gm")
        sig = {first: f"*{opts.dtype}", **weights, out: "*fp32" if partial else f"*{opts.dtype}", "M": "i32",
               "N": "i32", "K": "i32", stride: "i32", red: "i32"}  # fmt: skip
        extra = {}
        if forward:
            extra = {"HAS_LORA": True, "BLOCK_R": 16} if lora else lora_off
            sig = {**sig, **lora_sig} if lora else sig
        for c in configs:
            consts = dict(mm_common, PARTIAL=partial, **c.kwargs, **extra)
            r = compile_one(fn, sig, consts, opts.arch, c.num_warps, c.num_stages)
            tiles = (
                "x".join(str(c.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                + f" w{c.num_warps} s{c.num_stages}"
            )
            rows.append({"kernel": name, "tiles": tiles, **r})
            print(rows[-1], file=sys.stderr, flush=True)
    cols = ["kernel", "tiles", "regs", "spill_st", "stack", "shared", *_SASS, "error"]
    print(f"# sm_{opts.arch}, {opts.dtype}, lookup={opts.lookup}, triton {triton.__version__}")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main()
