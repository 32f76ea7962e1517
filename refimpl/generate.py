"""Text in, text out: continue a prompt with a Hugging Face checkpoint folder.

    python -m refimpl.generate FOLDER --prompt "The KV cache" [--max-new-tokens 32] [--temperature 0.8]
                               [--top-k 50] [--seed 0] [--dtype bfloat16]

prints the continuation (the generated text, without the prompt). Greedy unless --temperature > 0.

FOLDER holds `config.json`, the weights (`model.safetensors` or an index and its shards) and `tokenizer.json`,
read with the `tokenizers` library. The model class comes from the config: `DeepSeekForCausalLM` for
Multi-head Latent Attention (`kv_lora_rank` set: DeepSeek-V2/V3), else `DenseForCausalLM` (Llama, Mistral).
Generation stops early at the config's `eos_token_id` when it is a single id.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from refimpl.config import ModelConfig
from refimpl.dense import DenseForCausalLM
from refimpl.model import DeepSeekForCausalLM

TOKENIZER_FILE = "tokenizer.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def model_class(folder: str | Path) -> type[nn.Module]:
    """DeepSeekForCausalLM if the folder's config.json describes MLA (kv_lora_rank set), else DenseForCausalLM."""
    return DeepSeekForCausalLM if ModelConfig.from_hf(folder).is_mla else DenseForCausalLM


def load_tokenizer(folder: str | Path):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`. Raises FileNotFoundError if there is none."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer: no {TOKENIZER_FILE} in {str(folder)!r}; expected the Hugging Face "
                                "tokenizer file next to config.json (tokenizer.model alone is not read)")
    return Tokenizer.from_file(str(path))


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                  top_k: int | None = None, seed: int | None = None, eos_token_id: int | None = None) -> str:
    """Encode `prompt`, generate (`refimpl.generation.generate` through `model.generate`), decode the new tokens.

    Raises ValueError if the prompt encodes to no token."""
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise ValueError(f"prompt: expected text that encodes to at least one token, got {prompt!r}")
    ids = torch.tensor([ids], device=model.lm_head.weight.device)  # [1, prompt_len]
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
                         eos_token_id=eos_token_id)  # [1, prompt_len + new]
    return tokenizer.decode(out[0, ids.shape[1]:].tolist())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m refimpl.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="checkpoint folder: config.json, safetensors weights, tokenizer.json")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sample")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="parameter dtype (default: the checkpoint's torch_dtype)")
    args = parser.parse_args(argv)

    folder = Path(args.folder)
    if not folder.is_dir():
        parser.error(f"FOLDER: expected a checkpoint folder, got {str(folder)!r} "
                     f"({'a file' if folder.exists() else 'no such path'})")
    try:
        tokenizer = load_tokenizer(folder)
        model = model_class(folder).from_pretrained(folder, DTYPES.get(args.dtype))
        eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
        text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                             args.seed, eos if isinstance(eos, int) else None)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(text)


if __name__ == "__main__":
    main()
