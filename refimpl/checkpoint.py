"""Loading Hugging Face checkpoints (a folder with config.json and safetensors) into refimpl models.

One routine, `load_pretrained(model_cls, path, dtype, device)`, serves every model family: it needs only that
`model_cls(config)` builds the model from a `ModelConfig` with the checkpoint's parameter names. In order:

1. find the folder and read `config.json` (`ModelConfig.from_hf`; `torch_dtype` and `quantization_config` are
   read from the same file);
2. list the stored tensors from the safetensors headers (names, shapes, dtypes; no data read);
3. skip the multi-token-prediction layers the config declares (`num_nextn_predict_layers`, DeepSeek-V3), or,
   for a model class with MTP modules (`refimpl.mtp.DeepSeekMTPForCausalLM`), read them under its names;
   pair each float8 weight with its `weight_scale_inv`;
4. build the model on the `meta` device (shapes, no memory) in the requested dtype and compare names and
   shapes: every missing, unexpected or wrongly shaped tensor is listed in one ValueError;
5. allocate the model on its device (`to_empty`) and fill it one tensor at a time, so that peak memory is
   about the model's size (see `scripts/measure_load_memory.py`).

Nothing stored is dropped silently: a config that ties `lm_head` to the embedding while the checkpoint stores
two different matrices gets both, untied, with a warning.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from refimpl.config import ModelConfig
from refimpl.rope import RotaryEmbedding, rope_inv_freq

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"  # DeepSeek-V3's FP8 layout: `X.weight` (float8_e4m3fn) and `X.weight_scale_inv`
FP8_DTYPE = "F8_E4M3"  # the safetensors name of torch.float8_e4m3fn


def load_pretrained(model_cls, path: str | Path, dtype: torch.dtype | None = None,
                    device: str | torch.device | None = None) -> nn.Module:
    """Build `model_cls(config)` from a Hugging Face checkpoint and fill it with the stored weights.

    path: the checkpoint folder (config.json + model.safetensors, or model.safetensors.index.json + shards),
    or a file inside it. dtype: of the model's parameters, default the checkpoint's `torch_dtype` (`dtype` in
    transformers 5 files), else float32; modules that keep float32 on `.to(dtype)` (the MoE router) keep it.
    device: default "cpu". FP8 weights (float8_e4m3fn with a `weight_scale_inv` per block of
    `quantization_config.weight_block_size`, DeepSeek-V3's release) are dequantized into `dtype`.
    Returns the model in eval mode. Raises FileNotFoundError (no folder, config.json or weight files),
    ValueError (tensors that do not match the config, listed together; a bad dtype or device).
    """
    folder = checkpoint_folder(path)
    raw = json.loads((folder / CONFIG_FILE).read_text())
    config = ModelConfig.from_hf(raw, name=folder.name)
    dtype = _resolve_dtype(dtype, raw)
    device = _resolve_device(device)

    stored = _read_headers(folder)  # name -> (file, shape, safetensors dtype)
    mtp_prefix = getattr(model_cls, "mtp_prefix", None)
    if mtp_prefix is None:
        stored, keys = _drop_mtp_layers(stored, config), {}
    else:
        stored, keys = _rename_mtp_layers(stored, config, mtp_prefix, folder)  # keys: our name -> stored name
    scales = _pair_fp8_scales(stored)  # float8 weight name -> its scale's name

    with torch.device("meta"):
        model = model_cls(config)  # shapes only: no memory, no random init
    model.to(dtype)
    for module in model.modules():  # RoPE frequencies are a float64 plain tensor, not stored: compute them
        if isinstance(module, RotaryEmbedding):
            module.inv_freq = rope_inv_freq(module.dim, config.rope_theta, config.rope_scaling)
    _check_nothing_unstored(model)
    ties = _tied_groups(model)
    _check_tensors(model.state_dict(), stored, scales, ties, raw.get("quantization_config"))

    model.to_empty(device=device)
    for group in ties:  # to_empty gives every name a tensor of its own: share them again
        for name in group[1:]:
            _set_parameter(model, name, model.get_parameter(group[0]))
    block_size = (raw.get("quantization_config") or {}).get("weight_block_size")
    with torch.no_grad():
        for name, target in model.state_dict(keep_vars=True).items():
            if name not in stored:
                continue  # a tied name the checkpoint leaves out: filled through its twin
            tensor = _read_tensor(stored, name, keys)
            if name in scales:
                tensor = dequantize_fp8(tensor, _read_tensor(stored, scales[name], keys), block_size)
            twin = _filled_twin(name, ties, stored)
            if twin is None:
                target.copy_(tensor)  # casts to the parameter's dtype and device
            elif not torch.equal(tensor.to(target.dtype).to(target.device), target):
                _untie(model, name, twin, tensor.to(target.dtype).to(target.device), target)
    return model.eval()


def save_pretrained(model: nn.Module, folder: str | Path, dtype: torch.dtype | None = None,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint that `load_pretrained` reads back: `folder`/config.json
    (`model.config.to_dict()` plus `torch_dtype`) and `folder`/model.safetensors. -> the folder.

    dtype: of the stored floating tensors, default the model's; the routers' float32 tensors stay float32.
    MTP modules are stored under the checkpoint's names (`checkpoint_name`); a tied head is stored once.
    metadata: strings for the safetensors header (e.g. the recipe that trained the model).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    mtp_prefix = getattr(model, "mtp_prefix", None)
    tied_later = {name for group in _tied_groups(model) for name in group[1:]}
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name in tied_later:
            continue
        tensor = tensor.detach()
        if dtype is not None and tensor.is_floating_point() and not _is_router_tensor(name):
            tensor = tensor.to(dtype)
        tensors[checkpoint_name(name, config, mtp_prefix)] = tensor.contiguous().cpu()
    stored_dtype = dtype or next(model.parameters()).dtype
    raw = {**config.to_dict(), "torch_dtype": str(stored_dtype).removeprefix("torch.")}
    (folder / CONFIG_FILE).write_text(json.dumps(raw, indent=1) + "\n")
    save_file(tensors, folder / SINGLE_FILE, metadata=metadata)
    return folder


def _is_router_tensor(name: str) -> bool:
    """The MoE router's weight and bias, float32 in any model (`refimpl.moe.Router`)."""
    return name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint folder for `path`: the folder itself, or the folder of a file inside it.

    Raises FileNotFoundError when the path, its config.json or its weight files do not exist, ValueError for
    a file that is not part of a checkpoint (config.json, *.safetensors, model.safetensors.index.json).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {str(path)!r} does not exist; expected a folder holding "
                                f"{CONFIG_FILE} and {SINGLE_FILE} (or {INDEX_FILE} and its shards)")
    if path.is_file():
        if path.name != CONFIG_FILE and path.name != INDEX_FILE and path.suffix != ".safetensors":
            raise ValueError(f"checkpoint: expected a folder (or its {CONFIG_FILE}, {INDEX_FILE} or a "
                             f".safetensors file), got the file {str(path)!r}")
        path = path.parent
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: no {CONFIG_FILE} in the folder")
    if not (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r}: expected {SINGLE_FILE} or {INDEX_FILE} in the "
                                "folder, found neither")
    return path


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """DeepSeek-V3's block-wise FP8 weights back to float32: [rows, cols] float8_e4m3fn -> [rows, cols] float32.

    Block (i, j), rows i*bm ... (i+1)*bm - 1 and columns j*bn ... (j+1)*bn - 1 (the last ones partial), is
    multiplied by scale_inv[i, j]; scale_inv: [ceil(rows / bm), ceil(cols / bn)], block_size: (bm, bn) from
    `quantization_config.weight_block_size` ([128, 128] in V3). Source: `weight_dequant` in DeepSeek-V3's
    inference/kernel.py (y = x.float() * s, one s per block).
    """
    rows, cols = weight.shape
    bm, bn = block_size
    scale = scale_inv.float().repeat_interleave(bm, dim=0)[:rows].repeat_interleave(bn, dim=1)[:, :cols]
    return weight.float() * scale  # [rows, cols]


# ---------------------------------------------------------------------------- reading
def _read_headers(folder: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (file, shape, safetensors dtype such as "BF16" or "F8_E4M3") for every stored tensor."""
    if (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        shards = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {str(folder)!r}: shards named in {INDEX_FILE} are missing: "
                                    f"{missing}")
        files = [folder / s for s in shards]
    stored, twice = {}, []
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in stored:
                    twice.append(name)
                piece = f.get_slice(name)
                stored[name] = (file, tuple(piece.get_shape()), piece.get_dtype())
    if twice:
        raise ValueError(f"checkpoint {str(folder)!r}: tensors stored in two shards: {sorted(twice)}")
    return stored


def _read_tensor(stored: dict, name: str, keys: dict | None = None) -> torch.Tensor:
    """The tensor stored as `name` (or as keys[name], when the model calls it differently)."""
    # A fresh safe_open per tensor: the file is memory-mapped, and the pages a read touches stay resident
    # until the map is closed; closing it after each tensor keeps them from adding a checkpoint's size to the
    # peak memory. Opening costs well under a millisecond.
    with safe_open(stored[name][0], framework="pt") as f:
        return f.get_tensor((keys or {}).get(name, name))


def _resolve_dtype(dtype, raw: dict) -> torch.dtype:
    if dtype is None:
        name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        dtype = getattr(torch, str(name), None)
        source = f"config.json torch_dtype {name!r}"
    else:
        source = "dtype"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"{source}: expected a floating dtype of 16 bits or more (torch.float32, torch.bfloat16, "
                         f"torch.float16, torch.float64), got {dtype!r}")
    return dtype


def _resolve_device(device) -> torch.device:
    try:
        device = torch.device("cpu" if device is None else device)
        torch.empty(0, device=device)  # torch without CUDA raises AssertionError, a missing GPU RuntimeError
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"device: {device!r} is not available here ({e})") from None
    return device


# ---------------------------------------------------------------------------- matching names
def _drop_mtp_layers(stored: dict, config: ModelConfig) -> dict:
    """Skip the multi-token-prediction layers: model.layers.{L} ... model.layers.{L + n - 1}, L the number of
    decoder layers and n the config's `num_nextn_predict_layers` (DeepSeek-V3 section 2.2; 1 in V3)."""
    prefixes = tuple(mtp_layer_prefixes(config))
    mtp = {name for name in stored if name.startswith(prefixes)} if prefixes else set()
    if mtp:
        warnings.warn(
            f"skipping {len(mtp)} tensors of the multi-token-prediction layers "
            f"({', '.join(p + '*' for p in prefixes)}): DeepSeek-V3 uses them for training and speculative "
            "decoding, not for next-token logits (refimpl.mtp.DeepSeekMTPForCausalLM loads them)",
            stacklevel=4,  # the caller of from_pretrained
        )
    return {name: info for name, info in stored.items() if name not in mtp}


# stored in V3's MTP layer as copies of the main model's embedding and head; the MTP modules use the main ones
MTP_SHARED_TENSORS = ("embed_tokens.weight", "shared_head.head.weight")


def mtp_layer_prefixes(config: ModelConfig) -> list[str]:
    """Checkpoint prefixes of the MTP modules, depth 1..n: model.layers.{L}. ... model.layers.{L + n - 1}."""
    first = config.num_hidden_layers
    return [f"model.layers.{i}." for i in range(first, first + config.num_nextn_predict_layers)]


def _rename_mtp_layers(stored: dict, config: ModelConfig, mtp_prefix: str, folder: Path) -> tuple[dict, dict]:
    """Stored MTP tensors under the model's names: model.layers.{L + k}.X -> {mtp_prefix}.{k}.X, the shared
    copies (`MTP_SHARED_TENSORS`) left out. -> (stored under the new names, new name -> stored name).
    Raises ValueError when the config declares no MTP layer or the checkpoint stores none of one."""
    prefixes = mtp_layer_prefixes(config)
    if not prefixes:
        raise ValueError(f"config.json of {str(folder)!r}: num_nextn_predict_layers is 0; a model with MTP "
                         "modules needs a checkpoint that declares and stores them")
    renamed, keys = {}, {}
    for name, info in stored.items():
        depth = next((k for k, p in enumerate(prefixes) if name.startswith(p)), None)
        if depth is None:
            renamed[name] = info
            continue
        rest = name[len(prefixes[depth]):]
        if rest in MTP_SHARED_TENSORS:
            continue
        renamed[f"{mtp_prefix}.{depth}.{rest}"] = info
        keys[f"{mtp_prefix}.{depth}.{rest}"] = name
    empty = [p + "*" for k, p in enumerate(prefixes) if not any(n.startswith(f"{mtp_prefix}.{k}.") for n in keys)]
    if empty:
        raise ValueError(f"checkpoint {str(folder)!r}: num_nextn_predict_layers={len(prefixes)} declares MTP "
                         f"layers, but no tensor is stored under {empty}")
    return renamed, keys


def checkpoint_name(name: str, config: ModelConfig, mtp_prefix: str | None = None) -> str:
    """A model's parameter name -> its checkpoint name (the inverse of the renaming above): {mtp_prefix}.{k}.X
    -> model.layers.{L + k}.X; any other name is kept."""
    if mtp_prefix and name.startswith(mtp_prefix + "."):
        depth, rest = name[len(mtp_prefix) + 1:].split(".", 1)
        return f"model.layers.{config.num_hidden_layers + int(depth)}.{rest}"
    return name


def _pair_fp8_scales(stored: dict) -> dict[str, str]:
    """float8 weight name -> the name of its `weight_scale_inv`, for each stored float8 weight that has one."""
    return {name: name + SCALE_SUFFIX for name, (_, _, kind) in stored.items()
            if kind == FP8_DTYPE and name + SCALE_SUFFIX in stored}


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (lm_head.weight and model.embed_tokens.weight under tie_word_embeddings)."""
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return [group for group in names.values() if len(group) > 1]


def _filled_twin(name: str, ties: list[list[str]], stored: dict) -> str | None:
    """The stored name tied to `name` that is filled before it, or None."""
    for group in ties:
        if name in group:
            earlier = [n for n in group[:group.index(name)] if n in stored]
            return earlier[0] if earlier else None
    return None


def _check_nothing_unstored(model: nn.Module) -> None:
    """Refuse models holding tensors that neither the checkpoint nor `load_pretrained` can fill."""
    stored_names = model.state_dict()
    unfilled = [name for name, _ in model.named_buffers() if name not in stored_names]  # non-persistent
    for prefix, module in model.named_modules():
        unfilled += [f"{prefix}.{n}" for n, v in vars(module).items() if isinstance(v, torch.Tensor) and v.is_meta]
    if unfilled:
        raise NotImplementedError(f"load_pretrained: these tensors are neither stored in checkpoints nor "
                                  f"recomputed after loading: {unfilled}")


def _check_tensors(expected: dict, stored: dict, scales: dict, ties: list, quantization: dict | None) -> None:
    """One ValueError listing every missing, unexpected and wrongly shaped tensor (and FP8 problems)."""
    weights = {name: info[1] for name, info in stored.items() if name not in set(scales.values())}
    tied_in = {n for group in ties if set(group) & set(weights) for n in group}  # filled through a twin
    missing = sorted(set(expected) - set(weights) - tied_in)
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(f"{n}: expected {tuple(expected[n].shape)}, got {shape}" for n, shape in weights.items()
                   if n in expected and tuple(expected[n].shape) != shape)
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if extra:
        hint = (f" (a *.weight{SCALE_SUFFIX} scales a float8_e4m3fn weight of the same name)"
                if any(n.endswith(SCALE_SUFFIX) for n in extra) else "")
        problems.append(f"unexpected tensors {extra}{hint}")
    if wrong:
        problems.append(f"wrongly shaped tensors {wrong}")
    problems += _fp8_problems(stored, scales, quantization)
    if problems:
        raise ValueError("checkpoint does not match the config: " + "; ".join(problems))


def _fp8_problems(stored: dict, scales: dict, quantization: dict | None) -> list[str]:
    unscaled = sorted(n for n, (_, _, kind) in stored.items() if kind.startswith("F8") and n not in scales)
    problems = [f"float8 tensors without a {SCALE_SUFFIX} scale or not float8_e4m3fn: {unscaled}"] if unscaled else []
    if not scales:
        return problems
    block_size = (quantization or {}).get("weight_block_size")
    if not (isinstance(block_size, list) and len(block_size) == 2):
        return problems + [f"config.json: float8 weights need quantization_config.weight_block_size "
                           f"[rows, cols], got {block_size!r}"]
    wrong = []
    for weight, scale in scales.items():
        shape = stored[weight][1]
        want = tuple(math.ceil(size / block) for size, block in zip(shape, block_size))
        if len(shape) != 2 or stored[scale][1] != want:
            wrong.append(f"{scale}: expected {want} for a weight of shape {shape}, got {stored[scale][1]}")
    return problems + ([f"wrongly shaped FP8 scales {sorted(wrong)}"] if wrong else [])


# ---------------------------------------------------------------------------- ties
def _untie(model: nn.Module, name: str, twin: str, tensor: torch.Tensor, tied: torch.Tensor) -> None:
    """Give `name` its own parameter holding `tensor`, with a warning: the checkpoint says they differ."""
    gap = (tensor.float() - tied.float()).abs().max().item()
    warnings.warn(
        f"config.json ties {name} to {twin} (tie_word_embeddings), but the checkpoint stores two different "
        f"tensors (largest difference {gap:.3g}): both are kept, untied, so that no stored weight is dropped",
        stacklevel=4,  # the caller of from_pretrained
    )
    _set_parameter(model, name, nn.Parameter(tensor, requires_grad=tied.requires_grad))
    if getattr(model, "config", None) is not None:
        model.config = model.config.replace(tie_word_embeddings=False)


def _set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, param)
