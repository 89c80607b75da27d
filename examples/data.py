"""The demo's data: a generated order-extraction task, and a loader for your own file.

    python examples/data.py --out examples/data/orders.jsonl    # write the default data set as JSONL

The task: read a one-sentence customer order written in one of several styles and answer in a fixed format,
`name|city|item|quantity` (the item singular, the quantity in digits, even when the sentence spells it out).
SmolLM2-135M-Instruct (NF4) mostly copies the sentence back (0 of 50 held-out answers exact); a rank-8 adapter
on q_proj/v_proj gets 50 of 50 after 150 steps at batch 4 (measured; 49 of 50 after 40), so exact match on
held-out orders shows what fine-tuning did. Held-out orders never share their (name, city, item) triple with a
training order, so the metric rewards the rule, not memory.

A user's file (`--data` in qlora_demo.py) is either JSONL, one object per line with `prompt` and `answer`
(aliases: instruction/input/output/response/completion) or just `text`, or a plain text file (split into
paragraphs, trained as ordinary language modelling).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = "Extract the order as name|city|item|quantity."

NAMES = (
    "Alice Bruno Chen Dana Emeka Farah Goran Hana Ivan Julia Kenji Lena Marco Nadia Omar Priya Quentin Rosa "
    "Sven Tamar Ugo Vera Wanda Xavier Yusuf Zoe Anouk Bilal Carmen Dmitri Elif Felix Greta Hugo Ines Jonas"
).split()
CITIES = (
    "Lyon Oslo Porto Quito Riga Seoul Tunis Utrecht Valencia Warsaw Zagreb Austin Bergen Cairo Dublin Ghent "
    "Hanoi Izmir Kyoto Lima Malmo Nantes Perth Quebec Salta Tartu Vilnius Windhoek York Aarhus"
).split()
# (singular, plural): a few irregular plurals so "singular item" is a rule to learn, not a suffix to strip.
ITEMS = (
    ("mug", "mugs"),
    ("lamp", "lamps"),
    ("chair", "chairs"),
    ("kettle", "kettles"),
    ("notebook", "notebooks"),
    ("backpack", "backpacks"),
    ("umbrella", "umbrellas"),
    ("blanket", "blankets"),
    ("candle", "candles"),
    ("teapot", "teapots"),
    ("box", "boxes"),
    ("brush", "brushes"),
    ("knife", "knives"),
    ("shelf", "shelves"),
    ("glass", "glasses"),
    ("battery", "batteries"),
    ("clock", "clocks"),
    ("pillow", "pillows"),
)
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
TEMPLATES = (
    "{name} ordered {qty} {items} and wants them delivered to {city}.",
    "Please ship {qty} {items} to {name} in {city}.",
    "From {city}, {name} asked for {qty} {items}.",
    "New order: {qty} {items} for {name} ({city}).",
    "{name} in {city} would like {qty} {items}, thanks!",
    "Send {name} {qty} {items}; the address is in {city}.",
)


def format_prompt(sentence: str) -> str:
    """The user message for one order: the instruction, then the sentence on its own line."""
    return f"{INSTRUCTION}\n{sentence}"


def make_order(rng: random.Random, name: str, city: str, item: tuple[str, str]) -> dict:
    """One example {"prompt", "answer"} for a given (name, city, item), quantity and style drawn from `rng`."""
    qty = rng.randint(2, 19)
    # Spelled-out quantities (two..twelve) a third of the time: the answer always uses digits.
    qty_text = NUMBER_WORDS[qty] if qty <= 12 and rng.random() < 1 / 3 else str(qty)
    sentence = rng.choice(TEMPLATES).format(name=name, city=city, items=item[1], qty=qty_text)
    return {"prompt": format_prompt(sentence), "answer": f"{name}|{city}|{item[0]}|{qty}"}


def make_dataset(n_train: int = 1200, n_held_out: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The order-extraction data set, deterministic in `seed`.

    The (name, city, item) triples are shuffled once and cut in two, so no held-out triple appears in training.

    Args:
        n_train: number of training examples.
        n_held_out: number of held-out examples.
        seed: the only source of randomness.

    Returns:
        (train, held_out): lists of {"prompt": str, "answer": str}.

    Raises:
        ValueError: when more examples are asked for than distinct triples exist.
    """
    triples = [(n, c, i) for n in NAMES for c in CITIES for i in ITEMS]
    if n_train < 0 or n_held_out < 0 or n_train + n_held_out > len(triples):
        raise ValueError(f"n_train + n_held_out must be between 0 and {len(triples)}, got {n_train} + {n_held_out}")
    rng = random.Random(seed)
    rng.shuffle(triples)
    examples = [make_order(rng, *t) for t in triples[: n_train + n_held_out]]
    return examples[:n_train], examples[n_train:]


def _record(obj: dict, where: str) -> dict:
    """One JSONL object -> {"prompt", "answer"} or {"text"}; aliases follow common instruction-data layouts."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt", obj.get("instruction"))
    if prompt is not None and obj.get("input"):
        prompt = f"{prompt}\n{obj['input']}"
    elif prompt is None:
        prompt = obj.get("input")
    answer = obj.get("answer", obj.get("output", obj.get("response", obj.get("completion"))))
    if prompt is not None and answer is not None:
        return {"prompt": str(prompt), "answer": str(answer)}
    if isinstance(obj.get("text"), str) and obj["text"].strip():
        return {"text": obj["text"]}
    raise ValueError(f"{where}: needs 'prompt' and 'answer' (or 'instruction'/'output'), or 'text'; got {sorted(obj)}")


def load_file(path: str | Path, held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Read a user's data file and split it deterministically.

    Args:
        path: a `.jsonl` file (one object per line: prompt/answer pairs or {"text": ...}) or any other text file
            (split at blank lines into paragraphs, each a {"text": ...} record).
        held_out_fraction: share of records kept for evaluation (at least one when there are two or more).
        seed: seeds the shuffle before the split.

    Returns:
        (train, held_out): lists of records.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a malformed line, an empty file, or a fraction outside [0, 1).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                records.append(_record(obj, f"{path}:{lineno}"))
    else:
        records = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    if not records:
        raise ValueError(f"{path}: no examples found")
    random.Random(seed).shuffle(records)
    n_held = round(len(records) * held_out_fraction)
    if held_out_fraction > 0 and len(records) >= 2:
        n_held = min(max(n_held, 1), len(records) - 1)
    return records[n_held:], records[:n_held]


def write_jsonl(records: list[dict], path: str | Path) -> None:
    """Write records one JSON object per line (UTF-8, keys in insertion order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="examples/data/orders.jsonl", help="where to write the JSONL (train + held-out)")
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--n-held-out", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    train, held_out = make_dataset(args.n_train, args.n_held_out, args.seed)
    write_jsonl(train + held_out, args.out)
    print(f"wrote {len(train)} + {len(held_out)} examples to {args.out}")


if __name__ == "__main__":
    main()
