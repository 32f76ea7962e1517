"""Text in, text out: continue a prompt with a Hugging Face checkpoint folder.

    python -m refimpl.generate FOLDER --prompt "The KV cache" [--max-new-tokens 32] [--temperature 0.8]
                               [--top-k 50] [--seed 0] [--dtype bfloat16]

prints the continuation (the generated text, without the prompt) as it is generated, then, on stderr, the
number of tokens and the speed in tokens per second. Greedy unless --temperature > 0.

FOLDER holds `config.json`, the weights (`model.safetensors` or an index and its shards) and `tokenizer.json`,
read with the `tokenizers` library. The model class comes from the config: `DeepSeekForCausalLM` for
Multi-head Latent Attention (`kv_lora_rank` set: DeepSeek-V2/V3), else `DenseForCausalLM` (Llama, Mistral).
Generation stops at any of the `eos_token_id`s of `generation_config.json` if the folder has one, else of
`config.json` (one id or a list).

A file that cannot be read (a truncated safetensors file, a corrupt tokenizer.json, a config.json that is not
JSON or not a model config) and a bad argument end the program with exit code 1 and one line naming it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from refimpl.config import ModelConfig
from refimpl.dense import DenseForCausalLM
from refimpl.model import DeepSeekForCausalLM

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
EXAMPLE = """example:
  python -m refimpl.generate ./DeepSeek-V2-Lite --prompt "The KV cache" --max-new-tokens 32
  python -m refimpl.generate ./Llama-3-8B --prompt "Once upon a time" --temperature 0.8 --top-k 50 --seed 0"""


def read_json(path: Path) -> dict:
    """The JSON object in `path`. Raises ValueError naming the file if it is not valid JSON or not an object."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a {type(value).__name__}")
    return value


def model_class(folder: str | Path) -> type[nn.Module]:
    """DeepSeekForCausalLM if the folder's config.json describes MLA (kv_lora_rank set), else DenseForCausalLM.

    Raises ValueError naming config.json if it is not JSON or not a valid model config."""
    path = Path(folder) / CONFIG_FILE
    try:
        if path.is_file():
            read_json(path)  # ModelConfig.from_hf's own JSON errors do not name the file
        config = ModelConfig.from_hf(folder)
    except (ValueError, TypeError) as error:
        message = str(error)
        raise ValueError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    return DeepSeekForCausalLM if config.is_mla else DenseForCausalLM


def load_model(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """`model_class(folder).from_pretrained(folder, dtype)`; a safetensors file that cannot be read (truncated by
    an interrupted download, not safetensors at all) raises ValueError naming the file."""
    cls = model_class(folder)
    try:
        return cls.from_pretrained(folder, dtype)
    except SafetensorError as error:
        raise ValueError(_bad_weights_file(Path(folder), error)) from None


def _bad_weights_file(folder: Path, error: Exception) -> str:
    """The first .safetensors file of `folder` whose header cannot be read, and why."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as file_error:
            return (f"{path}: not a complete safetensors file ({file_error}); "
                    "an interrupted download? Download it again")
    return f"{folder}: a safetensors file cannot be read ({error})"


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`. Raises FileNotFoundError if there is none,
    ValueError naming the file if it cannot be parsed."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no {TOKENIZER_FILE} in {str(folder)!r}; expected the Hugging Face "
                                "tokenizer file next to config.json (tokenizer.model alone is not read)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises a bare Exception for every parse error
        raise ValueError(f"{path}: not a valid tokenizer file ({error})") from None


def eos_from_folder(folder: str | Path) -> int | list[int] | None:
    """`eos_token_id` of generation_config.json if the folder has one and it sets it, else of config.json."""
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        path = Path(folder) / name
        if path.is_file():
            eos = read_json(path).get("eos_token_id")
            if eos is not None:
                return eos
    return None


class TextStream:
    """Writes generated text as it comes (the `on_token` of `refimpl.generation.generate`), as transformers'
    TextStreamer does: after each token it decodes all new tokens so far and writes what was not written yet,
    up to the last whitespace (a later token can still change the end of a word or complete a multi-byte
    character); `end()` writes the rest. Keeps the time of each token for `speed()`. Batch size 1."""

    def __init__(self, tokenizer, write: Callable[[str], object]):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.times: list[float] = []
        self.written = 0  # characters of the decoded text written so far
        self.start = time.perf_counter()

    def __call__(self, tokens: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        self._write_up_to(max(text.rfind(" "), text.rfind("\n")) + 1, text)

    def end(self) -> str:
        """Write what is left; return the whole generated text."""
        text = self.tokenizer.decode(self.ids)
        self._write_up_to(len(text), text)
        return text

    def speed(self) -> str:
        """'N tokens in T s: R tokens/s (first token after F s)', from the call that started the stream."""
        if not self.times:
            return "0 tokens generated"
        total = self.times[-1] - self.start
        return (f"{len(self.times)} tokens in {total:.2f} s: {len(self.times) / total:.1f} tokens/s "
                f"(first token after {self.times[0] - self.start:.2f} s)")

    def _write_up_to(self, end: int, text: str) -> None:
        if end > self.written:
            self.write(text[self.written:end])
            self.written = end


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                  top_k: int | None = None, seed: int | None = None, eos_token_id: int | list[int] | None = None,
                  stream: TextStream | None = None) -> str:
    """Encode `prompt`, generate (`refimpl.generation.generate` through `model.generate`), decode the new tokens.

    stream: a `TextStream` that writes the text as it is generated. Raises ValueError if the prompt encodes to
    no token, and what `model.generate` raises for bad arguments."""
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ValueError(f"prompt: expected text that encodes to at least one token, got {prompt!r}")
    ids = torch.tensor([ids], device=model.lm_head.weight.device)  # [1, prompt_len]
    if stream is not None:
        stream.start = time.perf_counter()
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                         eos_token_id=eos_token_id, on_token=stream)  # [1, prompt_len + new]
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m refimpl.generate", description=__doc__.split("\n\n")[0],
                                     epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="checkpoint folder: config.json, safetensors weights, tokenizer.json")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy; a finite number > 0: sample")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling, 0 ... 2**64 - 1")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype (default: the checkpoint's torch_dtype)")
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    if not folder.is_dir():
        parser.error(f"FOLDER: expected a checkpoint folder, got {str(folder)!r} "
                     f"({'a file' if folder.exists() else 'no such path'})")
    try:
        tokenizer = load_tokenizer(folder)
        model = load_model(folder, DTYPES.get(args.dtype))
        stream = TextStream(tokenizer, lambda text: print(text, end="", flush=True))
        generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                      args.seed, eos_from_folder(folder), stream)
    except (FileNotFoundError, ValueError, TypeError) as error:
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    stream.end()
    print()
    print(stream.speed(), file=sys.stderr)


if __name__ == "__main__":
    main()
