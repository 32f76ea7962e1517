"""python -m refimpl.generate: a prompt string in, the continuation out, from a checkpoint folder saved by
transformers here with a BPE tokenizer trained here (on the Zen of Python, which ships with Python: no
download). The printed text must equal decode(generate(...)) computed in this process."""

import codecs
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refimpl.dense import DenseForCausalLM
from refimpl.generate import TextStream, eos_from_folder, generate_text, load_tokenizer, main, model_class
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
    assert re.fullmatch(r"8 tokens in [0-9.]+ s: [0-9.]+ tokens/s \(first token after [0-9.]+ s\)\n", result.stderr)


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


# ---------------------------------------------------------------------------- careless files and arguments
def _one_line_error(capsys, *argv) -> str:
    err = _error(capsys, *argv)
    assert err.startswith("python -m refimpl.generate: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def copy(folder, tmp_path):
    """A copy of the checkpoint folder, to damage."""
    return Path(shutil.copytree(folder, tmp_path / "checkpoint"))


def test_a_truncated_safetensors_file_is_named(copy, capsys):
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    err = _one_line_error(capsys, copy, "--prompt", PROMPT)
    assert f"{weights}: not a complete safetensors file" in err and "Download it again" in err


def test_a_corrupt_tokenizer_file_is_named(copy, capsys):
    tokenizer = copy / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text()[:200])
    assert f"{tokenizer}: not a valid tokenizer file (EOF while parsing" in _one_line_error(
        capsys, copy, "--prompt", PROMPT)


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_malformed_json_is_named(copy, capsys, name):
    (copy / name).write_text('{"vocab_size": 97,, }')
    assert f"{copy / name}: not valid JSON (Expecting property name" in _one_line_error(
        capsys, copy, "--prompt", PROMPT, "--max-new-tokens", 1)
    (copy / name).write_text("[1, 2]")
    assert f"{copy / name}: expected a JSON object, got a list" in _one_line_error(capsys, copy, "--prompt", PROMPT)


def test_a_config_that_is_not_a_model_config_is_named(copy, capsys):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    assert f"{copy / 'config.json'}: " in _one_line_error(capsys, copy, "--prompt", PROMPT)


@pytest.mark.parametrize("flags, message", [
    (["--seed", str(2 ** 64)], "seed: expected an int in 0..2**64 - 1 (a 64-bit seed), got 18446744073709551616"),
    (["--temperature", "inf"], "temperature: expected 0 (greedy) or a finite number > 0, got inf"),
    (["--temperature", "-1"], "temperature: expected a non-negative number, got -1.0"),
    (["--top-k", "0"], "top_k: expected an int >= 1, got 0"),
    (["--max-new-tokens", "-3"], "max_new_tokens: expected an int >= 0, got -3"),
])
def test_bad_arguments_are_one_line(folder, capsys, flags, message):
    assert message in _one_line_error(capsys, folder, "--prompt", PROMPT, "--temperature", "0.5", *flags)


def test_eos_ids_come_from_the_generation_config_first(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "eos_token_id": 3}))
    assert eos_from_folder(copy) == 3
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    assert eos_from_folder(copy) == [3, 7]


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "example:\n  python -m refimpl.generate ./DeepSeek-V2-Lite --prompt" in capsys.readouterr().out


def test_text_streams_as_tokens_come(folder):
    model, tokenizer = model_class(folder).from_pretrained(folder), load_tokenizer(folder)
    writes = []
    stream = TextStream(tokenizer, lambda text: writes.append((text, len(stream.ids))))
    text = generate_text(model, tokenizer, "Beautiful", 12, stream=stream)
    tokens_seen = [n for _, n in writes]
    assert stream.end() == text and "".join(w for w, _ in writes) == text
    assert len(writes) >= 2 and tokens_seen[0] < 12  # written during generation, not all at the end
    assert re.fullmatch(r"12 tokens in [0-9.]+ s: [0-9.]+ tokens/s \(first token after [0-9.]+ s\)",
                        stream.speed())
