"""The bounded file primitives (lowrank/_strict_json.py, _safetensors.py, _patterns.py, files.py) and the
all-or-nothing ``lowrank.quantize``: hostile input refused with a message naming the file, with the work bounded.

Bounds are measured, not timed: ``SafetensorsReader.bytes_read`` counts every byte read from a file, and
``tracemalloc`` the Python allocations, so no assertion depends on the machine's load.
"""

import json
import random
import re
import struct
import tracemalloc

import pytest
import torch
from _helpers import assert_unchanged, snapshot
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank
from lowrank import _safetensors, _strict_json, files
from lowrank._patterns import PatternError, key_matches, pattern_value, target_matches

# ---------------------------------------------------------------------------------------------- strict JSON


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"r": 8, "r": 16}', "duplicate key 'r'"),
        ('{"a": {"x": 1, "x": 2}}', "duplicate key 'x'"),
        ("[" * 100_000 + "]" * 100_000, "nests deeper than Python's recursion limit"),
        ('{"a": ' + "[" * 20 + "]" * 20 + "}", "nests 21 levels deep, more than the 16"),
        ('{"r": ' + "9" * 5000 + "}", "integer with 5000 digits"),
        ('{"lora_alpha": NaN}', "NaN is not valid JSON"),
        ('{"lora_alpha": -Infinity}', "-Infinity is not valid JSON"),
        ('{"lora_alpha": 1e999}', "beyond the float64 range"),
        ('{"r": 8,', "is not valid JSON"),
        (b'{"r": "\xff"}', "is not valid UTF-8"),
    ],
)
def test_strict_json_refuses(text, match):
    with pytest.raises(ValueError, match=rf"^cfg\.json.*{re.escape(match)}"):
        _strict_json.loads(text, "cfg.json")


def test_strict_json_accepts_peft_configs():
    # What PEFT itself writes: nesting 3, floats, nulls, unicode; the result equals json.loads (the reference).
    text = json.dumps({"r": 8, "lora_alpha": 16.5, "rank_pattern": {"q": 4}, "loftq_config": {"bits": {"x": [1]}},
                       "target_modules": ["é", "[x]"], "revision": None})  # fmt: skip
    assert _strict_json.loads(text, "cfg.json") == json.loads(text)


def test_strict_json_file_reads_bounded_bytes(tmp_path):
    f = tmp_path / "adapter_config.json"
    f.write_bytes(b" " * (2 * _strict_json.MAX_BYTES))
    tracemalloc.start()
    with pytest.raises(ValueError, match=f"{re.escape(str(f))} is {_strict_json.MAX_BYTES + 1} bytes, more than"):
        _strict_json.load_file(f)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1.5 * _strict_json.MAX_BYTES  # read max + 1 bytes, not the 2 MiB file


# ---------------------------------------------------------------------------------------------- safetensors


def _raw(path, header: dict | bytes, data: bytes = b"") -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_reader_matches_reference_both_ways(tmp_path):
    # Our writer read by safetensors' reference loader, and a reference-written file read by ours: same tensors.
    tensors = {"b": torch.randn(3, 5).half(), "a": torch.randn(7, dtype=torch.float64), "s": torch.tensor(3.0)}
    tensors |= {"c": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0, 3), "i": torch.arange(5, dtype=torch.int8)}
    with open(tmp_path / "ours.safetensors", "wb") as f:
        _safetensors.write(f, tensors, {"format": "pt", "k": "v"})
    back = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(back[k], t) and back[k].dtype == t.dtype for k, t in tensors.items())
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    with _safetensors.SafetensorsReader(tmp_path / "ref.safetensors") as r:
        assert r.metadata == {"format": "pt"} and set(r.entries) == set(tensors)
        assert all(torch.equal(r.read(k), t) and r.read(k).dtype == t.dtype for k, t in tensors.items())


def F32(shape, begin):
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * shape[0] * shape[1]]}


@pytest.mark.parametrize(
    "header, data, match",
    [
        (b"[]", b"", "does not start with '{'"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "y": F32([1, 1], 4)}, b"\0" * 12, "overlaps"),
        ({"x": F32([1, 1], 0), "y": F32([1, 1], 8)}, b"\0" * 12, "leaves a gap at byte 4"),
        ({"x": F32([4, 4], 0)}, b"\0" * 60, "outside the 60-byte buffer"),
        ({"x": F32([1, 1], 0)}, b"\0" * 8, "the tensors cover 4 of the 8 data bytes"),
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "needs 12 bytes"),
        ({"x": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype 'F33'"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "has shape [-1]"),
        ({"x": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4, "at most 8 sizes"),
        ({"x" * 2000: F32([1, 1], 0)}, b"\0" * 4, "a tensor name of 2000 characters"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "z": 1}}, b"\0" * 4, "exactly dtype"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__ must map strings to strings"),
        (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {}}', b"\0" * 4, "duplicate key 'x'"),
    ],
)
def test_reader_refuses_bad_headers(tmp_path, header, data, match):
    f = tmp_path / "adapter_model.safetensors"
    _raw(f, header, data)
    with pytest.raises(ValueError, match=re.escape(match)):
        _safetensors.SafetensorsReader(f).close()


def test_reader_refuses_oversized_header_without_reading_it(tmp_path):
    # A length field claiming 2^40 bytes, or more than the file holds: refused after reading the 8 length bytes.
    f = tmp_path / "w.safetensors"
    f.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="a header of 1099511627776 bytes in a 10-byte file"):
        _safetensors.SafetensorsReader(f)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter than the 8-byte header length"):
        _safetensors.SafetensorsReader(f)


def test_reader_bounds_tensor_count(tmp_path):
    # 2,000 one-element tensors against a limit the caller derives from its model (load_adapter: 2 per module).
    # (The 100,000-tensor header of the issue is refused from its length alone: test_faults.)
    n = 2000
    header = {f"t{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    f = tmp_path / "many.safetensors"
    _raw(f, header, b"\0" * n)
    with pytest.raises(ValueError, match=f"{n} tensors, more than the 64 accepted"):
        _safetensors.SafetensorsReader(f, max_tensors=64)


def test_reader_reads_only_the_tensors_used(tmp_path):
    # A correctly named 64 MiB tensor next to a small one: opening reads the header only, reading the small one
    # reads its 48 bytes. (The reference loader reads, and allocates, all 64 MiB.)
    big = 16 << 20
    f = tmp_path / "w.safetensors"
    _raw(f, {"big": {"dtype": "F32", "shape": [big], "data_offsets": [0, 4 * big]}, "small": F32([3, 4], 4 * big)},
         b"\0" * (4 * big) + torch.arange(12.0).numpy().tobytes())  # fmt: skip
    with _safetensors.SafetensorsReader(f) as r:
        header_bytes = r.bytes_read
        assert header_bytes < 300 and r.entries["big"].shape == (big,)
        assert torch.equal(r.read("small"), torch.arange(12.0).reshape(3, 4))
        assert r.bytes_read == header_bytes + 48


# ---------------------------------------------------------------------------------------------- patterns

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.up_proj", "q_proj", "a.b", "x.q_proj.y",
         "layers.1.k_proj", "aaa.aab", "h.0.attn.c_attn", "blocks.1.down"]  # fmt: skip


def _random_regex(rng: random.Random, depth=0) -> str:
    atoms = ["a", "q", "_", ".", r"\.", "[a-z]", "[^x]", r"\d", r"\w", "proj", "layers", "0", "1"]
    if depth > 2 or rng.random() < 0.4:
        return rng.choice(atoms)
    kind = rng.randrange(5)

    def sub():
        return _random_regex(rng, depth + 1)

    if kind == 0:
        return sub() + sub()
    if kind == 1:
        return f"({sub()}|{sub()})"
    if kind == 2:
        return f"(?:{sub()}){rng.choice(['*', '+', '?', '{1,2}', '*?'])}"
    if kind == 3:
        return "^" + sub() if rng.random() < 0.5 else sub() + "$"
    return sub() + ".*" + sub()


def test_patterns_agree_with_re():
    # The reference is Python's re on the same pattern PEFT builds; 600 random regexes over module-name atoms,
    # plus the plain names and suffixes lowrank writes (matched without regex).
    rng = random.Random(0)
    patterns = [_random_regex(rng) for _ in range(600)] + NAMES + ["self_attn.q_proj", "layers.1", "1.k_proj", "c_attn"]
    for p in patterns:
        for n in NAMES:
            assert key_matches(p, n) == bool(re.match(rf"(.*\.)?({p})$", n)), (p, n)
            assert target_matches(p, n) == bool(re.fullmatch(p, n)), (p, n)
    assert target_matches(["q_proj", "mlp.up_proj"], "model.layers.10.mlp.up_proj")
    assert not target_matches(["proj"], "model.layers.0.self_attn.q_proj")  # a list entry is a whole '.'-part
    assert pattern_value({"up_proj": 4, r"layers\.10\..*": 2}, "model.layers.10.mlp.up_proj", 8) == 4  # first wins


@pytest.mark.parametrize("pattern", [r"(.*)*!", r"(a|aa)*c", r"(x+x+)+y", r"(.*a){20}", r"(\w|_)*\d!"])
def test_catastrophic_patterns_are_linear(pattern):
    # Each of these backtracks exponentially in re on the names below (the first: ~2^n steps). The automaton's
    # work is bounded by its cached states: at most MAX_DFA_STATES, asserted through the cache size.
    for name in ["a" * 900, "x" * 900, "_" * 450 + "1" * 450]:
        assert key_matches(pattern, name) == (pattern == r"(.*a){20}" and name[0] == "a")
        assert target_matches(pattern, name) == (pattern == r"(.*a){20}" and name[0] == "a")
    from lowrank._patterns import _matcher

    m = _matcher(rf"(.*\.)?({pattern})$")
    assert len(m._steps) + len(m._closures) < 200


@pytest.mark.parametrize(
    "pattern, match",
    # fmt: off
    [
        (r"(a)\1", "groupref"),
        (r"(?=q)proj", "assert"),
        (r"\bq", "AT_BOUNDARY"),
        ("a{5000}", "repeat of 5000"),
        ("(a{100}){100}", "more than 4000 states"),
        ("(?i:q)", "scoped flags"),
        ("a" * 1001, "of 1001 characters"),
        ("(", "not a valid regular expression"),
    ],  # fmt: skip
)
def test_unsupported_patterns_refused(pattern, match):
    with pytest.raises(PatternError, match=re.escape(match)):
        key_matches(pattern, "model.q_proj")


# ---------------------------------------------------------------------------------------------- folders


def test_folder_round_trip_and_peft_names(tmp_path):
    tensors = {"base_model.model.x.lora_A.weight": torch.randn(2, 3)}
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    (tmp_path / "README.md").write_text("mine")
    files.write_adapter(tmp_path, tensors, config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]  # fmt: skip
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == config  # what PEFT reads
    assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["base_model.model.x.lora_A.weight"],
                       tensors["base_model.model.x.lora_A.weight"])  # fmt: skip
    with files.open_adapter(tmp_path) as (cfg, reader):
        assert cfg == config and torch.equal(reader.read("base_model.model.x.lora_A.weight"), *tensors.values())


def test_folder_mix_is_refused_but_descriptive_edits_are_not(tmp_path):
    files.write_adapter(tmp_path, {"t": torch.ones(1)}, {"r": 2, "lora_alpha": 4, "base_model_name_or_path": "a"})
    cfg = tmp_path / "adapter_config.json"
    cfg.write_text(json.dumps({"r": 2, "lora_alpha": 4, "base_model_name_or_path": "b"}))
    with files.open_adapter(tmp_path) as (config, _):
        assert config["base_model_name_or_path"] == "b"
    cfg.write_text(json.dumps({"r": 2, "lora_alpha": 8}))  # the old save's alpha next to the new weights
    with pytest.raises(ValueError, match=r"does not match the config saved with .* \(fields \['lora_alpha'\]\)"):
        files.open_adapter(tmp_path).__enter__()
    save_file({"t": torch.ones(1)}, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})  # PEFT's
    with files.open_adapter(tmp_path) as (config, _):
        assert config == {"r": 2, "lora_alpha": 8}


def test_bad_arguments_change_nothing_on_disk(tmp_path):
    target = tmp_path / "new" / "adapter"
    with pytest.raises(ValueError, match="config field 'lora_alpha' = .* cannot be written as JSON"):
        files.write_adapter(target, {"t": torch.ones(1)}, {"lora_alpha": object()})
    with pytest.raises(ValueError, match="config field 'x' = nan cannot be written"):
        files.write_adapter(target, {"t": torch.ones(1)}, {"x": float("nan")})
    with pytest.raises(ValueError, match="tensor 't' must be a contiguous CPU tensor"):
        files.write_adapter(target, {"t": torch.ones(2, 2).T}, {})
    assert not (tmp_path / "new").exists()


def test_unwritable_folder_raises_oserror_naming_it(tmp_path, monkeypatch):
    files.write_adapter(tmp_path, {"t": torch.ones(1)}, {"r": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def denied(path, mode="r", *a, **k):  # what a read-only folder answers (chmod does not stop root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "open", denied, raising=False)
    with pytest.raises(PermissionError, match=rf"cannot write the adapter to {re.escape(str(tmp_path))}"):
        files.write_adapter(tmp_path, {"t": torch.zeros(1)}, {"r": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError, match="cannot create the folder for the adapter at .*f/sub"):
        files.write_adapter(tmp_path / "f" / "sub", {"t": torch.ones(1)}, {})


def test_file_instead_of_folder(tmp_path):
    files.write_adapter(tmp_path, {"t": torch.ones(1)}, {})
    with pytest.raises(
        NotADirectoryError, match=r"adapter_model.safetensors is a file, not an adapter directory \(pass"
    ):
        files.check_folder(tmp_path / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="adapter directory .*nope does not exist"):
        files.check_folder(tmp_path / "nope")


def test_leftover_temporary_files_are_removed_and_never_read(tmp_path):
    files.write_adapter(tmp_path, {"t": torch.ones(1)}, {"r": 1})
    junk = tmp_path / ".adapter_model.safetensors.999.deadbeef.lowrank-tmp"
    junk.write_bytes(b"garbage")  # what a crashed save leaves
    with files.open_adapter(tmp_path) as (cfg, r):
        assert cfg == {"r": 1} and torch.equal(r.read("t"), torch.ones(1))
    files.write_adapter(tmp_path, {"t": torch.zeros(1)}, {"r": 2})
    assert not junk.exists()


# ---------------------------------------------------------------------------------------------- quantize


class Stack(nn.Sequential):
    def __init__(self):
        super().__init__(*[nn.Linear(64, 64, dtype=torch.float64) for _ in range(6)])


@pytest.mark.parametrize("bad", [torch.finfo(torch.float32).max * 4, float("inf")])
def test_quantize_validates_every_layer_first(bad):
    model = Stack()
    with torch.no_grad():
        model[4].weight[3, 5] = bad  # finite in float64 (first case), beyond float32: overflows in the quantizer
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"^4\.weight holds 1 (value\(s\) beyond the float32 range|NaN/inf)"):
        lowrank.quantize(model, targets=[str(i) for i in range(6)])
    assert_unchanged(model, snap)
    assert all(type(m) is nn.Linear for m in model)


def test_quantize_rolls_back_on_a_late_failure(monkeypatch):
    model = Stack()
    snap = snapshot(model)
    real, calls = lowrank.NF4Linear.from_linear, []

    def failing(linear, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated out of memory on the third layer")
        return real(linear, *a, **k)

    monkeypatch.setattr(lowrank.NF4Linear, "from_linear", failing)
    with pytest.raises(MemoryError, match="third layer"):
        lowrank.quantize(model, targets=[str(i) for i in range(6)])
    assert_unchanged(model, snap)
    assert all(type(m) is nn.Linear for m in model)


@pytest.mark.parametrize(
    "stored, dtype, match",
    [
        (
            torch.tensor([1.0, 70000.0]),
            torch.float16,
            r"holds 1 value\(s\) beyond the float16 range \(finite in the "
            "file's float32",
        ),
        (
            torch.tensor([1e39, -1e39, 1.0], dtype=torch.float64),
            torch.float32,
            r"holds 2 value\(s\) beyond the float32",
        ),
        (torch.tensor([1.0, float("nan")]), torch.float32, r"holds NaN or inf \(1 value\(s\)\)"),
        (torch.tensor([1, 2]), torch.float32, "has dtype torch.int64; LoRA weights must be floating point"),
    ],
)
def test_finiteness_is_checked_after_the_cast(tmp_path, stored, dtype, match):
    files.write_adapter(tmp_path, {"w": stored}, {})
    with files.open_adapter(tmp_path) as (_, reader), pytest.raises(ValueError, match=f"adapter_model.*: w {match}"):
        files.read_tensor(reader, "w", dtype)
    if stored.is_floating_point() and stored.isfinite().all():  # finite values, read in their own dtype: accepted
        with files.open_adapter(tmp_path) as (_, reader):
            assert torch.equal(files.read_tensor(reader, "w", stored.dtype), stored)
