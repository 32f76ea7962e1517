"""Small corpora that need no download, a byte-level tokenizer, and random training windows.

Two sources of text, both made on the spot:

* a generated multi-domain corpus (`make_domain_corpus`). Its five domains are distinct on purpose, so that a
  trained DeepSeekMoE router has something to specialize on (DeepSeekMoE, Dai et al. 2024, section 2: "expert
  specialization"), and the lessons can plot the expert load per domain (`encode_domains`):

      arithmetic   37+58=95
      brackets     ([]{}):yes          (:yes or :no, whether the brackets match)
      kv_lookup    a=3;b=7;c=1?b>7     (the value stored under the queried key)
      reverse      hello|olleh
      python_code  def f(x):\\n    return x * 3 + 2\\nprint(f(4))  # 14

* English prose that ships with Python (`python_docs_text`): the help topics of `pydoc_data.topics`, ~465 KB.

The tokenizer works on UTF-8 bytes (ids 0..255), as GPT-2's and DeepSeek's byte-level BPE do before merging;
we skip the merges, so every string round-trips exactly and the vocabulary stays tiny. One special token,
`EOS_ID = 256` ("end of text", like GPT-2's <|endoftext|>), separates examples, so the vocabulary has 257 ids.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from refimpl.checks import check_int, check_tensor

EOS_ID = 256  # the one special token: closes each example in an encoded corpus
EOS_TEXT = "<eos>"  # how `decode` writes it


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus `EOS_ID` (256). No BOS and no PAD: training reads random windows
    of a token stream, so nothing needs padding, and EOS already marks where each example starts."""

    vocab_size = 257
    eos_id = EOS_ID

    def encode(self, text: str) -> list[int]:
        """A string -> its UTF-8 bytes. Never produces EOS (the corpus functions add it)."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        """Token ids (a list or a 1-d tensor) -> text. Bytes that are not valid UTF-8 (a sequence cut in half)
        become U+FFFD; EOS is written as `EOS_TEXT`."""
        if isinstance(ids, torch.Tensor):
            check_tensor("ids", ids, ndim=1)
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids: expected integers in [0, {self.vocab_size}), got {bad[:10]}")
        pieces, run = [], []  # runs of bytes between EOS tokens
        for i in ids + [EOS_ID]:
            if i == EOS_ID:
                pieces.append(bytes(run).decode("utf-8", errors="replace"))
                run = []
            else:
                run.append(i)
        return EOS_TEXT.join(pieces)


# ---------------------------------------------------------------------------------------------- domain corpus
@dataclass(frozen=True)
class Example:
    domain: str
    text: str


BRACKET_PAIRS = ("()", "[]", "{}")
FUNCTION_NAMES = ("f", "g", "step", "scale", "score", "area")


def arithmetic(rng: random.Random) -> str:
    """Two-digit addition with its answer: 37+58=95."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}={a + b}"


def _balanced(rng: random.Random, n_pairs: int) -> str:
    """A random well-matched string of `n_pairs` bracket pairs: a pair around some of them, then the rest."""
    if n_pairs == 0:
        return ""
    inside = rng.randint(0, n_pairs - 1)
    opening, closing = rng.choice(BRACKET_PAIRS)
    return opening + _balanced(rng, inside) + closing + _balanced(rng, n_pairs - 1 - inside)


def _is_balanced(s: str) -> bool:
    closing_to_opening = {closing: opening for opening, closing in BRACKET_PAIRS}
    stack = []
    for c in s:
        if c in closing_to_opening:
            if not stack or stack.pop() != closing_to_opening[c]:
                return False
        else:
            stack.append(c)
    return not stack


def brackets(rng: random.Random) -> str:
    """A bracket string and whether it is well matched: ([]{}):yes, (]:no. Half are built matched, half are
    random (and then almost always unmatched); the label is checked either way."""
    n_pairs = rng.randint(1, 6)
    if rng.random() < 0.5:
        s = _balanced(rng, n_pairs)
    else:
        s = "".join(rng.choice("()[]{}") for _ in range(2 * n_pairs))
    return f"{s}:{'yes' if _is_balanced(s) else 'no'}"


def kv_lookup(rng: random.Random) -> str:
    """A few key=value pairs, a query key, and its value: a=3;b=7;c=1?b>7."""
    keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(3, 6))
    values = [rng.randint(0, 9) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = ";".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"{pairs}?{keys[query]}>{values[query]}"


def reverse(rng: random.Random) -> str:
    """A random lowercase word and its reversal: hello|olleh."""
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
    return f"{word}|{word[::-1]}"


def python_code(rng: random.Random) -> str:
    """A tiny function, a call, and what it prints, in one of three shapes (expression, branch, loop):

        def f(x):
            return x * 3 + 2
        print(f(4))  # 14
    """
    name, var = rng.choice(FUNCTION_NAMES), rng.choice("xyn")
    a, b, x = rng.randint(1, 9), rng.randint(0, 9), rng.randint(0, 9)
    shape = rng.choice(("expression", "branch", "loop"))
    if shape == "expression":
        body, result = f"    return {var} * {a} + {b}\n", x * a + b
    elif shape == "branch":
        body = f"    if {var} > {b}:\n        return {var} - {b}\n    return {b} - {var}\n"
        result = abs(x - b)
    else:
        body = f"    total = 0\n    for i in range({var}):\n        total += i * {a}\n    return total\n"
        result = a * x * (x - 1) // 2
    return f"def {name}({var}):\n{body}print({name}({x}))  # {result}"


GENERATORS = {
    "arithmetic": arithmetic,
    "brackets": brackets,
    "kv_lookup": kv_lookup,
    "reverse": reverse,
    "python_code": python_code,
}
DOMAINS = tuple(GENERATORS)


def make_domain_corpus(n_examples_per_domain: int, seed: int = 0) -> list[Example]:
    """`n_examples_per_domain` examples of each domain in `DOMAINS`, shuffled together (so that any contiguous
    slice, such as the validation part of `split`, holds every domain). The same seed gives the same corpus."""
    check_int("n_examples_per_domain", n_examples_per_domain, 1)
    examples = []
    for domain, generate in GENERATORS.items():
        rng = random.Random(f"{seed}:{domain}")  # one stream per domain: adding a domain leaves the others alone
        examples += [Example(domain, generate(rng)) for _ in range(n_examples_per_domain)]
    random.Random(seed).shuffle(examples)
    return examples


def encode_corpus(examples: Iterable[Example], tokenizer: ByteTokenizer) -> torch.Tensor:
    """Examples -> one token stream [n_tokens] (int64): each example's bytes followed by EOS."""
    ids = []
    for example in examples:
        ids += tokenizer.encode(example.text) + [tokenizer.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def encode_domains(examples: Iterable[Example], tokenizer: ByteTokenizer) -> dict[str, torch.Tensor]:
    """One token stream per domain (in `DOMAINS` order, domains present only), for measuring per-domain loss
    or expert load: feed windows of `streams["arithmetic"]` and every token in them is arithmetic."""
    examples = list(examples)
    return {domain: encode_corpus([e for e in examples if e.domain == domain], tokenizer)
            for domain in DOMAINS if any(e.domain == domain for e in examples)}


# ---------------------------------------------------------------------------------------------- English text
def python_docs_text() -> str:
    """The help topics that ship with Python (`pydoc_data.topics`), joined in sorted key order: ~465 KB of
    English about the language. The exact text depends on the Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


# ---------------------------------------------------------------------------------------------- batches
def split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A token stream -> (train, validation): the last `val_fraction` of it is held out, in one piece, so no
    training window overlaps a validation window."""
    check_tensor("ids", ids, ndim=1)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    n_val = int(len(ids) * val_fraction)
    if n_val == 0 or n_val == len(ids):
        raise ValueError(f"ids: {len(ids)} tokens are too few to hold out val_fraction={val_fraction}")
    return ids[:-n_val], ids[-n_val:]


def token_batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0,
                  num_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Random windows of a token stream, for next-token prediction.

    Yields (inputs [batch_size, seq_len], targets [batch_size, seq_len]) with targets = inputs shifted by one
    token: targets[b, t] = ids[start_b + t + 1]. Forever when `num_batches` is None (for training), else
    `num_batches` of them (e.g. `list(token_batches(val, ..., num_batches=8))`, a fixed evaluation set).
    """
    check_tensor("ids", ids, ndim=1)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ids: expected an integer tensor (int64 or int32), got dtype {ids.dtype}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        check_int(name, value, 1)
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches: expected an int >= 1 or None, got {num_batches!r}")
    if len(ids) < seq_len + 1:
        raise ValueError(f"ids: expected at least seq_len + 1 = {seq_len + 1} tokens, got {len(ids)}")
    return _windows(ids.long(), batch_size, seq_len, torch.Generator().manual_seed(seed), num_batches)


def _windows(ids, batch_size, seq_len, generator, num_batches):
    offsets = torch.arange(seq_len + 1)  # [seq + 1]
    produced = 0
    while num_batches is None or produced < num_batches:
        starts = torch.randint(0, len(ids) - seq_len, (batch_size, 1), generator=generator)  # [batch, 1]
        window = ids[starts + offsets]  # [batch, seq + 1]
        yield window[:, :-1], window[:, 1:]
        produced += 1
