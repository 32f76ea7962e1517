"""Peak memory of `DeepSeekForCausalLM.from_pretrained`, as a multiple of the checkpoint's size.

Writes a float32 checkpoint of a few hundred MB (a small DeepSeek-V3-style config, scaled up; random weights),
then loads it in float32 and in bfloat16, each in a fresh Python process, and reports the peak resident memory
(`resource.getrusage(...).ru_maxrss`) minus the baseline after `import torch, refimpl`. The loader measured is
whichever `refimpl` the PYTHONPATH points at, so one script compares two versions:

    PYTHONPATH=/path/to/old/checkout python scripts/measure_load_memory.py
    PYTHONPATH=$PWD python scripts/measure_load_memory.py

An ideal loader needs the model's own size (checkpoint size x 1.0 in float32, x 0.5 in bfloat16) plus one
tensor in flight. `refimpl.checkpoint` adds a fixed ~150 MiB once: the first random-init call on a meta tensor
imports torch's Python decompositions. It weighs at this size, not on real checkpoints (`--layers 12`: 1 GiB).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
              num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
              v_head_dim=64, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
              moe_intermediate_size=384, first_k_dense_replace=1, max_position_embeddings=1024,
              model_type="deepseek_v3", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
              tie_word_embeddings=False, torch_dtype="float32")

LOAD = """
import resource, sys, torch, refimpl
from refimpl.model import DeepSeekForCausalLM
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = DeepSeekForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print((peak - base) * 1024, size)  # ru_maxrss is in KiB on Linux
"""


WRITE = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from refimpl.config import ModelConfig
from refimpl.model import DeepSeekForCausalLM
folder, config = Path(sys.argv[1]), json.loads(sys.argv[2])
torch.manual_seed(0)
model = DeepSeekForCausalLM(ModelConfig.from_hf(config))
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
(folder / "config.json").write_text(json.dumps(config))
"""


def run(code: str, *args: str) -> list[str]:
    """Run `code` in a fresh Python; its stdout split in words. This process imports neither torch nor refimpl:
    Linux carries a parent's peak RSS into the ru_maxrss of a child it forks, which would hide the child's.
    It runs in the temporary folder: `python -c` puts the current folder first on sys.path, and PYTHONPATH
    alone should say which refimpl is measured."""
    done = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True,
                          env=dict(os.environ), cwd=tempfile.gettempdir())
    return done.stdout.split()


def write_checkpoint(folder: Path, config: dict) -> int:
    """A random float32 checkpoint of `config` in `folder`; returns the size of model.safetensors in bytes."""
    run(WRITE, str(folder), json.dumps(config))
    return (folder / "model.safetensors").stat().st_size


def measure(folder: Path, dtype: str) -> tuple[int, int]:
    """(peak bytes over the baseline, model bytes) of one load in a fresh process."""
    peak, model = run(LOAD, str(folder), dtype)[-2:]
    return int(peak), int(model)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"],
                        help="decoder layers (4: a 369 MiB checkpoint; each MoE layer adds about 80 MiB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        size = write_checkpoint(folder, {**CONFIG, "num_hidden_layers": args.layers})
        print("refimpl:", run("import refimpl; print(refimpl.__file__)")[0])
        print(f"checkpoint: {size / 2**20:.0f} MiB (float32)")
        for dtype in ("float32", "bfloat16"):
            peak, model = measure(folder, dtype)
            print(f"load in {dtype:8s}: peak {peak / 2**20:6.0f} MiB = {peak / size:.2f} x checkpoint "
                  f"(the model itself: {model / size:.2f} x)")


if __name__ == "__main__":
    main()
