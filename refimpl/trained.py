"""Small trained models the lessons share, each built by a recipe, saved in Hugging Face format and committed.

    python -m refimpl.trained list
    python -m refimpl.trained build tiny-deepseek [--steps N] [--out FOLDER]

A recipe fixes everything a training run depends on: model config and class, seed, data, batch, learning rate,
steps, balancing, MTP loss weight. `build` trains it and writes FOLDER (default `refimpl/trained_models/NAME/`):
`config.json` + `model.safetensors` (bfloat16, the routers float32; loadable by `from_pretrained` of the
recipe's class) and `train_log.json` (the recipe, per-step losses, held-out losses per data domain and on prose,
wall time, the memory a training step keeps for its backward pass). `load(NAME)` gives the committed model;
`read_log(NAME)` its log. To add a recipe (FP8 training, an indexer), call `register(Recipe(...))` next to
the others below.

Data: lesson 11's generated domain corpus (`refimpl.data.make_domain_corpus(2000, seed=0)`, 90% for training).
Prose (`refimpl.data.python_docs_text`) is never trained on: its loss shows what the model does out of domain.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from refimpl.checkpoint import save_pretrained
from refimpl.checks import check_int
from refimpl.config import ModelConfig
from refimpl.data import (ByteTokenizer, encode_corpus, encode_domains, make_domain_corpus, python_docs_text,
                          split, token_batches)
from refimpl.model import DeepSeekForCausalLM
from refimpl.mtp import V3_LAMBDA_SCHEDULE, DeepSeekMTPForCausalLM, lambda_schedule
from refimpl.train import (LESSON_BATCH_SIZE, LESSON_LR, LESSON_SEQ_LEN, LESSON_STEPS, evaluate, tiny_config,
                           train)

MODELS_DIR = Path(__file__).parent / "trained_models"
LOG_FILE = "train_log.json"
EXAMPLES_PER_DOMAIN = 2000  # lesson 11's corpus
VAL_FRACTION = 0.1
EVAL_BATCHES = 8  # held-out batches (each LESSON_BATCH_SIZE x LESSON_SEQ_LEN) per domain, for prose, overall


@dataclass(frozen=True)
class Recipe:
    """How one shared model is trained. config: a function returning the ModelConfig; model_cls: the class
    that builds (and later loads) it; mtp_schedule: ((fraction of steps, lambda), ...) for the MTP loss
    (`refimpl.mtp.lambda_schedule`), None for no MTP loss."""

    name: str
    description: str
    config: Callable[[], ModelConfig]
    model_cls: type = DeepSeekForCausalLM
    steps: int = LESSON_STEPS
    seed: int = 0
    lr: float = LESSON_LR
    batch_size: int = LESSON_BATCH_SIZE
    seq_len: int = LESSON_SEQ_LEN
    bias_update_gamma: float = 1e-3  # V3's auxiliary-loss-free balancing, as lesson 11 trains
    mtp_schedule: tuple | None = None
    save_dtype: torch.dtype = torch.bfloat16
    extra: dict = field(default_factory=dict)  # anything else a later recipe records


RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
    """Add a recipe to `RECIPES` (names are unique)."""
    if recipe.name in RECIPES:
        raise ValueError(f"recipe: a recipe named {recipe.name!r} is already registered")
    RECIPES[recipe.name] = recipe
    return recipe


register(Recipe(
    name="tiny-deepseek",
    description="lesson 11's tiny DeepSeek (MLA, 1 dense + 2 DeepSeekMoE layers, ~0.2M parameters) on the "
                "domain corpus, with V3's bias balancing",
    config=tiny_config,
))
register(Recipe(
    name="tiny-deepseek-mtp",
    description="tiny-deepseek with one MTP module (D = 1) trained with V3's lambda 0.3 then 0.1 "
                "(section 4.2, scaled to the steps); same seed, data and steps",
    config=lambda: tiny_config(num_nextn_predict_layers=1),
    model_cls=DeepSeekMTPForCausalLM,
    mtp_schedule=V3_LAMBDA_SCHEDULE,
))


def recipe(name: str) -> Recipe:
    """The registered recipe `name`; ValueError naming the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"recipe: expected one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name]


# ---------------------------------------------------------------------------------------------- data
def corpus() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(train ids, held-out ids, held-out ids per domain and "prose"): lesson 11's corpus split 90/10; the
    per-domain streams hold the examples that lie wholly in the held-out part; "prose" is Python's help text."""
    tokenizer = ByteTokenizer()
    examples = make_domain_corpus(EXAMPLES_PER_DOMAIN, seed=0)
    ids = encode_corpus(examples, tokenizer)
    train_ids, val_ids = split(ids, VAL_FRACTION)
    offset, held_out = 0, []  # offset: where each example starts in the token stream
    for example in examples:
        if offset >= len(train_ids):
            held_out.append(example)
        offset += len(tokenizer.encode(example.text)) + 1  # the example and its EOS
    streams = encode_domains(held_out, tokenizer)
    streams["prose"] = torch.tensor(tokenizer.encode(python_docs_text()), dtype=torch.long)
    return train_ids, val_ids, streams


def eval_batches(ids: torch.Tensor, r: Recipe, num_batches: int = EVAL_BATCHES) -> list:
    """The fixed held-out batches of a stream (seed 1, as lesson 11's)."""
    return list(token_batches(ids, r.batch_size, r.seq_len, seed=1, num_batches=num_batches))


# ---------------------------------------------------------------------------------------------- building
def build(name: str, steps: int | None = None, out: str | Path | None = None, progress: bool = True) -> Path:
    """Train recipe `name` (for `steps`, default the recipe's) and write the folder; -> the folder.

    Raises ValueError for an unknown recipe, steps < 1, or `out` naming an existing file (checked before
    training)."""
    r = recipe(name)
    steps = r.steps if steps is None else steps
    check_int("steps", steps, 1)
    folder = Path(out) if out is not None else MODELS_DIR / name
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"out: expected a folder (new or existing), got the file {folder}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier step times on a shared machine; at this size a second thread gains little
    try:
        return _build(r, steps, folder, progress)
    finally:
        torch.set_num_threads(threads)


def _build(r: Recipe, steps: int, folder: Path, progress: bool) -> Path:
    train_ids, val_ids, streams = corpus()
    torch.manual_seed(r.seed)
    model = r.model_cls(r.config())
    activation_bytes = saved_for_backward_bytes(model, next(token_batches(train_ids, r.batch_size, r.seq_len)),
                                                r.mtp_schedule is not None)
    start = time.perf_counter()
    log = train(model, token_batches(train_ids, r.batch_size, r.seq_len, seed=r.seed), steps=steps, lr=r.lr,
                eval_batches=eval_batches(val_ids, r), eval_every=50, bias_update_gamma=r.bias_update_gamma,
                seed=r.seed, progress=progress, log_expert_load=False,
                mtp_lambda=None if r.mtp_schedule is None else lambda_schedule(steps, r.mtp_schedule))
    seconds = time.perf_counter() - start
    held_out = {domain: evaluate(model, eval_batches(ids, r)) for domain, ids in streams.items()}
    step_times = [b - a for a, b in zip([0.0] + log.seconds, log.seconds)]
    record = {
        "recipe": {**{k: v for k, v in asdict(r).items() if k not in ("config", "model_cls", "save_dtype")},
                   "model_cls": r.model_cls.__name__, "save_dtype": str(r.save_dtype), "steps": steps},
        "data": f"refimpl.data.make_domain_corpus({EXAMPLES_PER_DOMAIN}, seed=0), ByteTokenizer, "
                f"last {VAL_FRACTION:.0%} of the tokens held out; prose: refimpl.data.python_docs_text "
                f"(Python {platform.python_version()}), never trained on",
        "parameters": sum(t.numel() for t in model.state_dict().values()),
        "saved_for_backward_bytes": activation_bytes,
        "step": log.step, "train_loss": _rounded(log.train_loss), "mtp_loss": _rounded(log.mtp_loss),
        "eval_step": log.eval_step, "eval_loss": _rounded(log.eval_loss),
        "final_loss": log.eval_loss[-1],
        "held_out_loss": held_out,
        "seconds": seconds,
        "median_seconds_per_step": statistics.median(step_times),
        "seconds_per_step": _rounded(step_times),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    save_pretrained(model, folder, dtype=r.save_dtype, metadata={"recipe": r.name})
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in record.items()]  # a list per line
    (folder / LOG_FILE).write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return folder


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 5) for v in values]


def saved_for_backward_bytes(model: torch.nn.Module, batch, with_mtp: bool) -> int:
    """Bytes of the tensors autograd keeps from one training forward pass for the backward pass (activation
    memory, each storage counted once), for the batch (inputs, targets); the model is left unchanged."""
    inputs, _ = batch
    storages = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_mtp(inputs) if with_mtp else model(inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


# ---------------------------------------------------------------------------------------------- reading
def folder_of(name: str) -> Path:
    """The committed folder of recipe `name`; FileNotFoundError if it was never built."""
    recipe(name)
    folder = MODELS_DIR / name
    if not (folder / LOG_FILE).is_file():
        raise FileNotFoundError(f"trained model {name!r}: no {LOG_FILE} in refimpl/trained_models/{name}; "
                                f"build it with `python -m refimpl.trained build {name}`")
    return folder


def load(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The committed model of recipe `name`, in eval mode, in `dtype` (the file holds bfloat16)."""
    return recipe(name).model_cls.from_pretrained(folder_of(name), dtype=dtype)


def read_log(name: str) -> dict:
    """The committed train_log.json of recipe `name`."""
    return json.loads((folder_of(name) / LOG_FILE).read_text())


def main(argv: list[str] | None = None) -> None:
    """`python -m refimpl.trained list | build NAME [--steps N] [--out FOLDER]`."""
    parser = argparse.ArgumentParser(prog="python -m refimpl.trained", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the registered recipes")
    build_parser = commands.add_parser("build", help="train a recipe and write its folder")
    build_parser.add_argument("name")
    build_parser.add_argument("--steps", type=int, default=None)
    build_parser.add_argument("--out", default=None, help="folder (default refimpl/trained_models/NAME)")
    args = parser.parse_args(argv)
    if args.command == "list":
        for r in RECIPES.values():
            print(f"{r.name}: {r.description}")
        return
    try:
        recipe(args.name)
        if args.steps is not None:
            check_int("steps", args.steps, 1)
        if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"out: expected a folder (new or existing), got the file {args.out}")
        if args.out is None and args.steps not in (None, recipe(args.name).steps):
            raise ValueError(f"out: --steps {args.steps} differs from the recipe's {recipe(args.name).steps} and "
                             f"would overwrite the committed model the lessons assert on; give --out FOLDER")
    except ValueError as error:
        parser.error(str(error))
    folder = build(args.name, args.steps, args.out)
    log = json.loads((folder / LOG_FILE).read_text())
    print(f"{args.name}: {log['recipe']['steps']} steps in {log['seconds']:.0f} s, held-out loss "
          f"{log['eval_loss'][0]:.3f} -> {log['final_loss']:.3f}; wrote {folder}")


if __name__ == "__main__":
    main()
