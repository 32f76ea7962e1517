"""python -m refimpl.generate: a prompt string in, the continuation out, from a checkpoint folder saved by
transformers here with a BPE tokenizer trained here (on the Zen of Python, which ships with Python: no
download). The printed text must equal decode(generate(...)) computed in this process."""

import codecs
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refimpl.dense import DenseForCausalLM
from refimpl.generate import generate_text, load_tokenizer, main, model_class
from refimpl.model import DeepSeekForCausalLM

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from test_dense import build_hf as build_dense  # noqa: E402  tiny random transformers models
from test_model_hf import CASES, _build_hf as build_deepseek  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97
PROMPT = "Beautiful is better than"


def zen_tokenizer():
    """A BPE tokenizer with VOCAB entries, trained on the Zen of Python (`this.s`, ROT13 in the stdlib)."""
    import this  # noqa: F401  (prints the Zen once, captured by pytest)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = codecs.decode(sys.modules["this"].s, "rot13")
    tokenizer.train_from_iterator(text.splitlines(), trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["[UNK]"]))
    return tokenizer


@pytest.fixture(scope="module", params=["llama", "deepseek-v3"])
def folder(request, tmp_path_factory):
    if request.param == "llama":
        hf = build_dense("llama", dict(num_key_value_heads=2, eos_token_id=None))
    else:
        kind, overrides = CASES["v3-groups-norm"]
        hf = build_deepseek(kind, {**overrides, "eos_token_id": None})
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    zen_tokenizer().save(str(path / "tokenizer.json"))
    return path


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "refimpl.generate", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_model_class_follows_the_config(folder):
    expected = DenseForCausalLM if folder.name.startswith("llama") else DeepSeekForCausalLM
    assert model_class(folder) is expected


def test_cli_prints_the_continuation(folder):
    # one subprocess per model (each starts Python and torch): greedy in float64 for Llama, sampled for DeepSeek-V3
    sampled = folder.name.startswith("deepseek")
    flags = ["--temperature", "0.8", "--top-k", "5", "--seed", "3"] if sampled else ["--dtype", "float64"]
    result = run_cli(folder, "--prompt", PROMPT, "--max-new-tokens", 8, *flags)
    assert result.returncode == 0, result.stderr
    model = model_class(folder).from_pretrained(folder, None if sampled else torch.float64)
    tokenizer = load_tokenizer(folder)
    options = dict(temperature=0.8, top_k=5, seed=3) if sampled else {}
    expected = generate_text(model, tokenizer, PROMPT, 8, **options)
    ids = torch.tensor([tokenizer.encode(PROMPT).ids])
    assert expected == tokenizer.decode(model.generate(ids, 8, **options)[0, ids.shape[1]:].tolist())
    assert result.stdout == expected + "\n" and expected.strip()


def _error(capsys, *argv) -> str:
    """Run main(argv) in this process; it must exit with an error: return what it printed to stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code not in (0, None)
    return capsys.readouterr().err


def test_cli_errors_are_clear(capsys, tmp_path):
    assert "FOLDER: expected a checkpoint folder" in _error(capsys, tmp_path / "nowhere", "--prompt", "x")
    (tmp_path / "config.json").write_text("{}")
    assert "(a file)" in _error(capsys, tmp_path / "config.json", "--prompt", "x")
    assert "no tokenizer.json in" in _error(capsys, tmp_path, "--prompt", "x")
    zen_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert "config: missing required fields" in _error(capsys, tmp_path, "--prompt", "x")
    assert "the following arguments are required: --prompt" in _error(capsys, tmp_path)


def test_empty_prompt_is_named(folder, capsys):
    err = _error(capsys, folder, "--prompt", "", "--max-new-tokens", 2)
    assert "prompt: expected text that encodes to at least one token, got ''" in err
