"""The examples' code paths end to end on a tiny random Llama with a character tokenizer (seconds, no download).

`examples/qlora_demo.py` and `examples/trainer_example.py` are run through their own `main`, with `--model`
pointing at a folder this file writes: a 2-layer LlamaForCausalLM from a config and a character-level fast
tokenizer built in memory. The 135M default model is exercised by running the demo itself (README numbers).
"""

from __future__ import annotations

import json
import re
import string
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
import transformers
from _helpers import tiny_llama

import lowrank

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import data  # noqa: E402
import qlora_demo  # noqa: E402


def _char_tokenizer():
    """A character-level PreTrainedTokenizerFast: one id per printable character, <s> prepended."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.printable) - set("\x0b\x0c\r")))}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = tokenizers.decoders.Fuse()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A folder in HF layout (config.json, model.safetensors, tokenizer.json) that load_model reads offline."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _char_tokenizer()
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------------------------- the data


def test_dataset_is_deterministic_and_held_out_triples_are_unseen():
    train, held_out = data.make_dataset(300, 50, seed=0)
    assert (train, held_out) == data.make_dataset(300, 50, seed=0)
    assert train != data.make_dataset(300, 50, seed=1)[0]
    assert len(train) == 300 and len(held_out) == 50

    def triple(r):
        return tuple(r["answer"].split("|")[:3])

    assert not {triple(r) for r in train} & {triple(r) for r in held_out}
    assert len({triple(r) for r in train + held_out}) == 350  # every example a distinct (name, city, item)


def test_every_answer_is_derived_from_its_sentence():
    plural = dict(data.ITEMS)
    for r in sum(data.make_dataset(200, 50, seed=3), []):
        instruction, sentence = r["prompt"].split("\n")
        assert instruction == data.INSTRUCTION
        name, city, item, qty = r["answer"].split("|")
        assert re.search(rf"\b{name}\b", sentence) and re.search(rf"\b{city}\b", sentence)
        assert re.search(rf"\b{plural[item]}\b", sentence)  # the sentence has the plural, the answer the singular
        words = {w: str(i) for i, w in enumerate(data.NUMBER_WORDS)}
        said = [words.get(w, w) for w in re.findall(r"[a-z]+|\d+", sentence) if w in words or w.isdigit()]
        assert said == [qty] and 2 <= int(qty) <= 19


def test_dataset_refuses_more_examples_than_triples():
    n = len(data.NAMES) * len(data.CITIES) * len(data.ITEMS)
    with pytest.raises(ValueError, match=f"between 0 and {n}"):
        data.make_dataset(n, 1)


def test_load_file_jsonl_aliases_text_and_split(tmp_path):
    f = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(8)] + [
        {"instruction": "Sum", "input": "2 3", "output": "5"},
        {"text": "free text"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    train, held_out = data.load_file(f, held_out_fraction=0.2, seed=0)
    assert len(train) == 8 and len(held_out) == 2
    everything = train + held_out
    assert {"prompt": "Sum\n2 3", "answer": "5"} in everything and {"text": "free text"} in everything
    assert (train, held_out) == data.load_file(f, held_out_fraction=0.2, seed=0)

    t = tmp_path / "notes.txt"
    t.write_text("first paragraph\nstill first\n\n\nsecond\n\nthird", encoding="utf-8")
    train, held_out = data.load_file(t, held_out_fraction=0.3)
    assert sorted(r["text"] for r in train + held_out) == ["first paragraph\nstill first", "second", "third"]
    assert len(held_out) == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"mine.jsonl:2: not valid JSON"),
        ('{"question": "q"}', r"mine.jsonl:2: needs 'prompt'"),
        ("[1, 2]", r"expected a JSON object"),
    ],
)
def test_load_file_names_the_bad_line(tmp_path, line, message):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "p", "answer": "a"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        data.load_file(f)


def test_load_file_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        data.load_file(tmp_path / "nope.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples found"):
        data.load_file(tmp_path / "empty.txt")


# ------------------------------------------------------------------------------------------ the demo's code


def test_encode_puts_the_loss_on_the_answer_and_eos_only(tiny_model_dir):
    _, tokenizer = qlora_demo.load_model(tiny_model_dir)
    record = {"prompt": "Extract it.\nAda ordered 3 mugs", "answer": "Ada|3"}
    [(ids, labels)] = qlora_demo.encode(tokenizer, record, max_len=128)
    prompt = qlora_demo.encode_prompt(tokenizer, record["prompt"])
    assert ids[: len(prompt)] == prompt and ids[0] == tokenizer.bos_token_id
    assert labels[: len(prompt)] == [qlora_demo.IGNORE] * len(prompt)
    assert tokenizer.decode(labels[len(prompt) : -1]) == "Ada|3" and labels[-1] == tokenizer.eos_token_id
    # Cut to max_len from the left of the prompt: the answer survives whole.
    [(short, short_labels)] = qlora_demo.encode(tokenizer, record, max_len=10)
    assert len(short) == 10 and short_labels[-6:] == labels[-6:] and short[-6:] == ids[-6:]
    # Text records: windows of max_len, loss everywhere.
    windows = qlora_demo.encode(tokenizer, {"text": "abcdefghij"}, max_len=4)  # <s> + 10 chars + </s> = 12
    assert [w[0] for w in windows] == [w[1] for w in windows] and [len(w[0]) for w in windows] == [4, 4, 4]


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_demo_runs_end_to_end_on_a_tiny_llama(tiny_model_dir, tmp_path, method):
    out = tmp_path / "run"
    record = qlora_demo.main(
        [
            "--model",
            str(tiny_model_dir),
            "--method",
            method,
            "--steps",
            "6",
            "--n-train",
            "16",
            "--n-held-out",
            "4",
            "--show",
            "2",
            "--lr",
            "1e-2",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    saved = json.loads((out / "run.json").read_text())
    assert saved["after"] == record["after"] and saved["method"] == method
    assert len(saved["losses"]) == 6 and all(0 < x < 20 for x in saved["losses"])
    assert 0.0 <= saved["before"]["exact_match"] <= 1.0 and saved["before"]["loss"] > 0
    assert saved["trainable_parameters"] == 2 * (8 * 64 + 64 * 8) + 2 * (8 * 64 + 32 * 8)  # q: 64->64, v: 64->32
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    # The adapter is switched off / removed / reloaded exactly: greedy answers reproduce bit for bit. That means
    # something only if the adapter changes an answer (else "base" and "tuned" are the same strings).
    assert any(e["adapter"] != e["base"] for e in saved["examples"]), saved["examples"]
    assert saved["eject_restores_base"] and saved["reload_restores_tuned"]
    assert [e["base"] for e in saved["examples"]] == saved["predictions_before"][:2]
    assert [e["adapter"] for e in saved["examples"]] == saved["predictions_after"][:2]
    assert (out / "loss.png").stat().st_size > 1000
    assert set(saved["times"]) >= {"load_s", "train_s", "eval_before_s", "eval_after_s", "total_s"}


def test_demo_training_lowers_the_held_out_loss(tiny_model_dir):
    model, tokenizer = qlora_demo.load_model(tiny_model_dir)
    lowrank.quantize(model)
    lowrank.inject(model, qlora_demo.TARGETS, r=8, alpha=32, dropout=0.0)
    train, held_out = qlora_demo.build_data(None, 64, 8, seed=0)
    before = qlora_demo.evaluate(model, tokenizer, held_out)["loss"]
    losses = qlora_demo.train(model, tokenizer, train, steps=30, lr=1e-2, progress=False)
    after = qlora_demo.evaluate(model, tokenizer, held_out)["loss"]
    # A random 2-layer model starts at ln(vocab) = 4.60 nats per character and its small random output head lets
    # q/v adapters move the logits only a little: measured 4.60 -> 4.37 (deterministic); 0.15 is the margin.
    assert after < before - 0.15, (before, after, losses[:3], losses[-3:])
    assert len(losses) == 30


def test_demo_with_a_users_jsonl_and_text_file(tiny_model_dir, tmp_path):
    jsonl = tmp_path / "mine.jsonl"
    data.write_jsonl([{"prompt": f"Double {i}", "answer": str(2 * i)} for i in range(12)], jsonl)
    record = qlora_demo.main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(jsonl),
            "--steps",
            "2",
            "--show",
            "1",
            "--method",
            "lora",
            "--out",
            str(tmp_path / "a"),
            "--no-progress",
        ]
    )
    assert record["n_train"] == 11 and record["n_held_out"] == 1 and record["after"]["exact_match"] is not None

    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Paragraph {i} about lamps and tides." for i in range(10)), encoding="utf-8")
    record = qlora_demo.main(
        [
            "--model",
            str(tiny_model_dir),
            "--data",
            str(text),
            "--steps",
            "2",
            "--method",
            "lora",
            "--out",
            str(tmp_path / "b"),
            "--no-progress",
        ]
    )
    assert record["after"]["exact_match"] is None and record["after"]["loss"] > 0 and record["examples"] == []


def test_load_model_explains_a_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json and 0 .gguf files"):
        qlora_demo.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="model not found"):
        qlora_demo.load_model(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------------- the Trainer example


@pytest.mark.parametrize(("method", "checkpointing"), [("lora", False), ("qlora", True)])
def test_trainer_example_trains_only_the_adapters_and_saves_them(tiny_model_dir, tmp_path, method, checkpointing):
    import trainer_example

    out = tmp_path / "trainer"
    reference, _ = qlora_demo.load_model(tiny_model_dir)
    if method == "qlora":
        lowrank.quantize(reference)
    result = trainer_example.main(
        [
            "--model",
            str(tiny_model_dir),
            "--method",
            method,
            "--steps",
            "4",
            "--block-size",
            "64",
            "--batch-size",
            "2",
            "--save-steps",
            "2",
            "--lr",
            "1e-2",
            "--prompt",
            "The lamp",
            "--out",
            str(out),
        ]
        + ["--gradient-checkpointing"] * checkpointing
    )
    model = result["model"]
    assert all(layer.gradient_checkpointing for layer in model.model.layers) == checkpointing
    assert result["optimized_parameters"] == sum(p.numel() for p in lowrank.adapter_parameters(model))
    assert all(torch.isfinite(torch.tensor(result["losses"])))
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in lowrank.lora_layers(model))  # the adapters moved
    for step in ("adapter", "adapter/checkpoint-2", "adapter/checkpoint-4"):
        assert (out / step / "adapter_model.safetensors").is_file(), step
    lowrank.eject(model)
    # Everything but the adapters is bit-identical to a fresh load: Trainer touched only the adapters.
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items(), strict=False):
        assert torch.equal(p, q), name
    assert not list(out.glob("checkpoint-*")), "Trainer must not write whole-model checkpoints"
