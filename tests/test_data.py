"""refimpl.data: the tokenizer round-trips, every generated example is correct, batches are shifted windows."""

import ast
import contextlib
import io
import re

import pytest
import torch

from refimpl.data import (DOMAINS, EOS_ID, EOS_TEXT, ByteTokenizer, Example, encode_corpus, encode_domains,
                          make_domain_corpus, python_docs_text, split, token_batches)

TOK = ByteTokenizer()


# ---------------------------------------------------------------------------------------------- tokenizer
@pytest.mark.parametrize("text", ["", "hello", "37+58=95\n", "naïve café — ß", "日本語 🙂", "\x00\x7f\t"])
def test_round_trip_is_exact(text):
    ids = TOK.encode(text)
    assert ids == list(text.encode("utf-8"))  # one id per UTF-8 byte
    assert TOK.decode(ids) == text
    assert TOK.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_vocab_and_eos():
    assert TOK.vocab_size == 257 and TOK.eos_id == EOS_ID == 256
    assert TOK.decode([104, 105, EOS_ID, 104]) == f"hi{EOS_TEXT}h"


def test_cut_utf8_sequence_is_replaced_not_raised():
    ids = TOK.encode("é")  # two bytes
    assert TOK.decode(ids[:1]) == "\ufffd"


def test_bad_ids_raise():
    with pytest.raises(ValueError, match=r"ids: expected integers in \[0, 257\), got \[257, -1\]"):
        TOK.decode([65, 257, -1])
    with pytest.raises(ValueError, match="ids: expected integers"):
        TOK.decode([1.5])
    with pytest.raises(ValueError, match="ids: expected a 1-d tensor"):
        TOK.decode(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="text: expected a str, got bytes"):
        TOK.encode(b"abc")


# ---------------------------------------------------------------------------------------------- corpus
@pytest.fixture(scope="module")
def corpus():
    return make_domain_corpus(200, seed=0)


def by_domain(corpus, domain):
    return [e.text for e in corpus if e.domain == domain]


def test_corpus_is_deterministic_per_seed(corpus):
    assert make_domain_corpus(200, seed=0) == corpus
    other = make_domain_corpus(200, seed=1)
    assert other != corpus
    assert set(by_domain(other, "arithmetic")) != set(by_domain(corpus, "arithmetic"))


def test_corpus_has_every_domain_equally_and_mixed(corpus):
    assert DOMAINS == ("arithmetic", "brackets", "kv_lookup", "reverse", "python_code")
    assert all(isinstance(e, Example) for e in corpus)
    assert [sum(e.domain == d for e in corpus) for d in DOMAINS] == [200] * 5
    assert {e.domain for e in corpus[-100:]} == set(DOMAINS)  # shuffled: a tail slice holds every domain


def test_arithmetic_answers_are_correct(corpus):
    for text in by_domain(corpus, "arithmetic"):
        a, b, c = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", text).groups())
        assert a + b == c


def _matched_by_erasing_pairs(s):  # independent of refimpl.data's stack: erase "()", "[]", "{}" until stuck
    while any(p in s for p in ("()", "[]", "{}")):
        s = s.replace("()", "").replace("[]", "").replace("{}", "")
    return s == ""


def test_bracket_labels_are_correct(corpus):
    texts = by_domain(corpus, "brackets")
    labels = []
    for text in texts:
        s, label = re.fullmatch(r"([()\[\]{}]+):(yes|no)", text).groups()
        assert (label == "yes") == _matched_by_erasing_pairs(s), text
        labels.append(label)
    assert 0.3 < labels.count("yes") / len(labels) < 0.7  # both answers are common


def test_kv_lookup_answers_are_correct(corpus):
    for text in by_domain(corpus, "kv_lookup"):
        pairs, query, answer = re.fullmatch(r"((?:[a-z]=\d;)*[a-z]=\d)\?([a-z])>(\d)", text).groups()
        table = dict(p.split("=") for p in pairs.split(";"))
        assert len(table) == len(pairs.split(";"))  # keys are distinct
        assert table[query] == answer


def test_reverse_copies_are_correct(corpus):
    for text in by_domain(corpus, "reverse"):
        word, reversed_word = re.fullmatch(r"([a-z]+)\|([a-z]+)", text).groups()
        assert reversed_word == word[::-1]


def test_python_code_runs_and_prints_its_comment(corpus):
    texts = by_domain(corpus, "python_code")
    for text in texts:
        ast.parse(text)
        expected = re.search(r"  # (-?\d+)$", text).group(1)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(text, {})
        assert out.getvalue() == expected + "\n", text
    assert {"return", "if", "for"} <= {word for text in texts for word in text.split()}  # all three shapes


def test_bad_corpus_size_raises():
    with pytest.raises(ValueError, match="n_examples_per_domain: expected an int >= 1, got 0"):
        make_domain_corpus(0)


def test_encode_corpus_ends_each_example_with_eos():
    examples = [Example("reverse", "ab|ba"), Example("arithmetic", "1+1=2")]
    ids = encode_corpus(examples, TOK)
    assert ids.dtype == torch.long
    assert ids.tolist() == list(b"ab|ba") + [EOS_ID] + list(b"1+1=2") + [EOS_ID]


def test_encode_domains_keeps_domains_apart(corpus):
    streams = encode_domains(corpus, TOK)
    assert list(streams) == list(DOMAINS)
    for domain, ids in streams.items():
        texts = TOK.decode(ids).split(EOS_TEXT)[:-1]
        assert texts == by_domain(corpus, domain)


# ---------------------------------------------------------------------------------------------- English text
def test_python_docs_text_is_large_plain_and_deterministic():
    text = python_docs_text()
    assert len(text.encode("utf-8")) > 400_000
    assert all(c.isprintable() or c == "\n" for c in text)  # no control characters, no binary
    assert sum(c.isascii() for c in text) / len(text) > 0.99
    assert "assert" in text and "lambda" in text
    assert python_docs_text() == text


# ---------------------------------------------------------------------------------------------- batches
def test_batches_are_windows_shifted_by_one():
    ids = torch.randperm(1000, generator=torch.Generator().manual_seed(0))  # distinct values: a value finds its place
    batches = list(token_batches(ids, batch_size=4, seq_len=16, seed=3, num_batches=5))
    assert len(batches) == 5
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (4, 16)
        assert inputs.dtype == targets.dtype == torch.long
        for row, target_row in zip(inputs, targets):  # each row is ids[start : start + 17], split in two
            start = int((ids == row[0]).nonzero())
            assert torch.equal(ids[start:start + 16], row)
            assert torch.equal(ids[start + 1:start + 17], target_row)


def test_batches_are_seeded_and_cover_the_stream():
    ids = torch.arange(200)
    a = list(token_batches(ids, 8, 10, seed=0, num_batches=3))
    b = list(token_batches(ids, 8, 10, seed=0, num_batches=3))
    c = list(token_batches(ids, 8, 10, seed=1, num_batches=3))
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    starts = torch.cat([x[:, 0] for x, _ in token_batches(ids, 64, 10, seed=0, num_batches=50)])
    assert starts.min() == 0 and starts.max() == 200 - 11  # first and last possible window both occur


def test_training_batches_never_stop():
    it = token_batches(torch.arange(50), 2, 8)
    assert len([next(it) for _ in range(1000)]) == 1000


def test_split_holds_out_the_tail():
    ids = torch.arange(100)
    train, val = split(ids, 0.2)
    assert torch.equal(train, torch.arange(80)) and torch.equal(val, torch.arange(80, 100))


def test_bad_batch_arguments_raise():
    ids = torch.arange(20)
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1, got 0"):
        token_batches(ids, 0, 4)
    with pytest.raises(ValueError, match="seq_len: expected an int >= 1, got -1"):
        token_batches(ids, 2, -1)
    with pytest.raises(ValueError, match="num_batches: expected an int >= 1 or None, got 0"):
        token_batches(ids, 2, 4, num_batches=0)
    with pytest.raises(ValueError, match="ids: expected at least seq_len \\+ 1 = 21 tokens, got 20"):
        token_batches(ids, 2, 20)
    with pytest.raises(ValueError, match="ids: expected a 1-d tensor"):
        token_batches(ids[None], 2, 4)
    with pytest.raises(TypeError, match="ids: expected an integer tensor"):
        token_batches(ids.float(), 2, 4)
    with pytest.raises(ValueError, match="val_fraction: expected a number in \\(0, 1\\), got 1.5"):
        split(ids, 1.5)
    with pytest.raises(ValueError, match="ids: 5 tokens are too few"):
        split(torch.arange(5), 0.1)
