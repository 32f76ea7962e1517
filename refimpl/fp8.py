"""FP8 training with fine-grained scaling, as DeepSeek-V3 does it (V3 report section 3.3 and appendix B).

A GEMM's inputs are stored as E4M3 (4 exponent bits, 3 mantissa bits, largest value 448) with a float32 scale
for each small group of elements, the group's max-abs / 448 ("online": computed from the tensor itself, not
from a history of past steps, V3 section 3.3.2):

    activations  one scale per 1x128 tile: per token, per 128 channels      scale [M, K / 128]
    weights      one scale per 128x128 block                                 scale [N / 128, K / 128]

so an outlier channel spoils only its own tile, not the whole tensor (`quantize_blocks` does any tiling:
tensor-wise, row-wise, 1x128, 128x128, 128x1). The product Y = X W^T is summed over K one 128-wide block at a
time; each block's partial sum is multiplied by its two scales and added to a float32 accumulator
(`block_scaled_matmul`): V3's "promotion" to CUDA cores every 128 elements, which also fixes the H800 tensor
cores' limited accumulation precision (about 14 bits; `limited_accumulation_matmul` emulates it).

On a CPU: torch has the float8 dtypes (a cast to float8_e4m3fn rounds to nearest even; we clamp to +-448
first rather than rely on how a cast treats larger values), and `torch._scaled_mm` runs there too, but only
with tensor-wise or row-wise scales, not V3's block-wise ones. So here the GEMM is emulated: the float8
values are cast to float32 (exactly) and multiplied block by block in float32, scales applied per K block.
The products of two E4M3 numbers are exact in float32, so this differs from the tensor-core GEMM only in the
order of float32 additions. `dskernels.fp8_gemm` is the same product in Triton.

Training (`FP8Linear`, appendix B): the three GEMMs of a linear layer all take FP8 inputs:

    Fprop  Y  = X  W^T    X: 1x128 tiles (along K = in_features),  W: 128x128 blocks
    Dgrad  dX = dY W      dY: 1x128 tiles (along out_features),    W: the same 128x128 blocks
    Wgrad  dW = dY^T X    dY and X: 128x1 tiles (along the tokens, the K of this GEMM)

Master weights and gradients stay float32; embedding, output head, MoE gate, norms and the attention core
(softmax(QK^T)V) are not converted (V3 section 3.3.1). `convert_to_fp8` swaps the linear layers of a
`refimpl.model.DeepSeekForCausalLM`'s decoder layers for `FP8Linear`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from refimpl.checkpoint import dequantize_fp8
from refimpl.checks import check_int, check_tensor
from refimpl.config import ModelConfig
from refimpl.data import ByteTokenizer, encode_corpus, make_domain_corpus, split, token_batches
from refimpl.model import DeepSeekForCausalLM
from refimpl.train import TrainLog, tiny_config, train

BLOCK = 128  # V3's tile width along K, and its weight block (V3 section 3.3.2)
MMA_K = 32  # K of one FP8 WGMMA instruction on Hopper: the limited accumulator adds 32 products at a time
FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16)  # GEMM input formats `quantize_blocks` makes


# ---------------------------------------------------------------------------------------------------- quantize
def quantize_blocks(x: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float8_e4m3fn
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fine-grained quantization: one float32 scale per `block` of a 2-d tensor. -> (x_q, scale).

    x: [R, C] floating, finite. block: (br, bc), each >= 1: (1, 128) activation tiles, (128, 128) weight
    blocks, (128, 1) the tiles of the weight-gradient GEMM, (1, C) row-wise, (R, C) tensor-wise. The last
    blocks may be partial. dtype: float8_e4m3fn (V3's only format), float8_e5m2, or bfloat16 (scale 1, no
    scaling). Returns x_q [R, C] `dtype` and scale [ceil(R / br), ceil(C / bc)] float32 with
    x ~ x_q * scale (block by block), scale = the block's max-abs / the format's largest value (448 for E4M3),
    so each block's largest value lands on the format's largest. An all-zero block gets scale 1.
    Raises TypeError (not a floating tensor, unknown dtype), ValueError (not 2-d, block not a pair of
    ints >= 1, a NaN or inf in x: named with the count and the first index; the check costs one host sync,
    which FP8Linear's training GEMMs do not pay, see `FP8Linear`).
    Source: V3 section 3.3.2; DeepGEMM's per_token_cast_to_fp8 / per_block_cast_to_fp8.
    """
    check_tensor("x", x, ndim=2, dtype_floating=True)
    return _quantize_checked("quantize_blocks", "x", x, block, dtype)


def _quantize_checked(function: str, name: str, x: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_blocks` of a 2-d floating x after checking dtype, block and that x is finite (that error
    names `function`, the public function called, and `name`, its argument)."""
    if dtype not in FORMATS:
        raise TypeError(f"dtype: expected one of {FORMATS}, got {dtype}")
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise ValueError(f"block: expected a pair (rows, columns) such as (1, 128), got {block!r}")
    check_int("block[0]", block[0], 1)
    check_int("block[1]", block[1], 1)
    _check_finite(function, name, x)
    q, scale = _quantize_blocked(x, block, dtype)
    return q.flatten(2, 3).flatten(0, 1)[: x.shape[0], : x.shape[1]], scale


def _quantize_blocked(x: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
    """x [R, C] -> (q [R'/br, br, C'/bc, bc] `dtype`, scale [R'/br, C'/bc]), R', C' padded to the blocks.

    Unchecked (the training GEMMs' path): a NaN or inf in a block makes its scale NaN or inf and every value
    of the block NaN once dequantized (x / inf = 0, then 0 * inf = NaN).
    """
    br, bc = block
    padded = _pad(_pad(x.float(), 0, br), 1, bc)  # [R', C']: zeros change no max-abs
    blocks = padded.view(padded.shape[0] // br, br, padded.shape[1] // bc, bc)  # [R'/br, br, C'/bc, bc]
    if dtype == torch.bfloat16:
        return blocks.to(dtype), blocks.new_ones(blocks.shape[0], blocks.shape[2])
    fmax = torch.finfo(dtype).max
    amax = blocks.abs().amax(dim=(1, 3))  # [R'/br, C'/bc]
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / fmax)  # NaN amax: NaN scale
    return (blocks / scale[:, None, :, None]).clamp(-fmax, fmax).to(dtype), scale


def dequantize_blocks(x_q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x_q [R, C] with one scale per `block` (br, bc), scale [ceil(R / br), ceil(C / bc)] -> [R, C] float32.

    Raises TypeError (scale not float32), ValueError (scale of another shape).
    """
    check_tensor("x_q", x_q, ndim=2)
    _check_scale_dtype("scale", scale)
    (rows, cols), (br, bc) = x_q.shape, block
    want = (-(-rows // br), -(-cols // bc))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale: expected shape {want} (one per {br}x{bc} block of x_q {tuple(x_q.shape)}), "
                         f"got {tuple(scale.shape)}")
    return dequantize_fp8(x_q, scale, block)


def quantize_activation(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn):
    """V3's activation quantization, one scale per 1x128 tile: x [M, K] -> (x_q [M, K], scale [M, K / 128]).

    K must be a multiple of 128 (ValueError naming K), as in DeepGEMM. x must be finite: a NaN or inf gets a
    ValueError naming quantize_activation, the count and the first index (one host sync), as in
    `quantize_blocks`. Source: V3 section 3.3.2, figure 7a.
    """
    check_tensor("x", x, ndim=2, dtype_floating=True)
    _check_k("x", x.shape[1])
    return _quantize_checked("quantize_activation", "x", x, (1, BLOCK), dtype)


def quantize_weight(w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn):
    """V3's weight quantization, one scale per 128x128 block: w [N, K] -> (w_q, scale [ceil(N / 128), K / 128]).

    K must be a multiple of 128 (ValueError naming K); N may end in a partial block. w must be finite: a NaN
    or inf gets a ValueError naming quantize_weight, the count and the first index (one host sync).
    """
    check_tensor("w", w, ndim=2, dtype_floating=True)
    _check_k("w", w.shape[1])
    return _quantize_checked("quantize_weight", "w", w, (BLOCK, BLOCK), dtype)


# ---------------------------------------------------------------------------------------------------- GEMM
def block_scaled_matmul(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor
                        ) -> torch.Tensor:
    """C = A B^T from block-quantized operands, scales applied per 128-wide K block in float32.

    a_q [M, K], b_q [N, K]: float8_e4m3fn or float8_e5m2 (or bfloat16), K a multiple of 128.
    a_scale: [M, K / 128] (1x128 tiles) or [ceil(M / 128), K / 128] (128x128 blocks); b_scale likewise with N.
    -> C [M, N] float32:  C = sum_kb (A_kb B_kb^T) * a_scale[:, kb] * b_scale[:, kb]  (rows of the scales
    repeated over their blocks), each partial product A_kb B_kb^T exact in float32 (emulation, see the module
    docstring). Raises TypeError (dtypes), ValueError (K, scale shapes), each naming the argument.
    Source: V3 section 3.3.2 (increasing accumulation precision), DeepGEMM's fp8_gemm_nt.
    """
    _check_operand("a_q", a_q)
    _check_operand("b_q", b_q)
    if b_q.shape[1] != a_q.shape[1]:
        raise ValueError(f"b_q: expected K = {a_q.shape[1]} columns (those of a_q), got shape {tuple(b_q.shape)}")
    (M, K), N = a_q.shape, b_q.shape[0]
    _check_k("a_q", K)
    kb = K // BLOCK
    sa = _row_scales("a_scale", a_scale, M, kb)  # [M, K / 128]
    sb = _row_scales("b_scale", b_scale, N, kb)  # [N, K / 128]
    a = a_q.float().view(M, kb, BLOCK).transpose(0, 1)  # [K / 128, M, 128]
    b = b_q.float().view(N, kb, BLOCK).transpose(0, 1)  # [K / 128, N, 128]
    partial = torch.bmm(a, b.transpose(1, 2))  # [K / 128, M, N]: one exact float32 sum per K block
    return (partial * sa.t()[:, :, None] * sb.t()[:, None, :]).sum(0)  # [M, N]


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """Y = X W^T the V3 way: x [M, K] in 1x128 tiles, w [N, K] in 128x128 blocks, -> [M, N] float32.

    x and w must be finite (ValueError from `quantize_activation` / `quantize_weight`)."""
    return block_scaled_matmul(*quantize_activation(x, dtype), *quantize_weight(w, dtype))


# ------------------------------------------------------------------------------------- accumulation precision
def cut_mantissa(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 x with its mantissa cut (rounded toward zero) to `bits` explicit bits (0..23) -> float32."""
    check_tensor("x", x)
    if x.dtype != torch.float32:
        raise TypeError(f"x: expected dtype torch.float32, got {x.dtype}")
    check_int("bits", bits, 0)
    if bits > 23:
        raise ValueError(f"bits: expected at most 23 (float32's mantissa), got {bits}")
    mask = -(1 << (23 - bits))  # ones above the kept bits, in two's complement
    return (x.view(torch.int32) & mask).view(torch.float32)


def limited_accumulation_matmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 13,
                                promote_every: int | None = BLOCK) -> torch.Tensor:
    """C = A B^T with the FP8 tensor cores' limited accumulator emulated: a [M, K], b [N, K] -> [M, N] float32.

    The tensor core adds MMA_K = 32 products at a time into an accumulator that keeps about 14 significant
    bits (V3 section 3.3.2: "limited to retaining around 14 bits"): here float32 cut to `mantissa_bits`
    explicit mantissa bits (13, plus the implicit leading bit: 14) after each K = 32 step. promote_every:
    None sums all of K in that accumulator; 128 (V3's N_C) copies the partial sum into a full float32
    accumulator every 128 elements and restarts it, so each limited sum is only 4 steps long. a, b: float32
    (dequantized values); K a multiple of promote_every (and of 32). Raises TypeError / ValueError.
    """
    for name, t in (("a", a), ("b", b)):
        check_tensor(name, t, ndim=2)
        if t.dtype != torch.float32:
            raise TypeError(f"{name}: expected dtype torch.float32, got {t.dtype}")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"b: expected K = {a.shape[1]} columns (those of a), got shape {tuple(b.shape)}")
    K = a.shape[1]
    group = K if promote_every is None else promote_every
    check_int("promote_every", group, MMA_K)
    if group % MMA_K or K % group:
        raise ValueError(f"promote_every: expected a multiple of {MMA_K} that divides K = {K}, got {group}")
    total = a.new_zeros(a.shape[0], b.shape[0])  # the full float32 accumulator ("CUDA cores")
    for g0 in range(0, K, group):
        limited = torch.zeros_like(total)  # the tensor core's accumulator
        for k0 in range(g0, g0 + group, MMA_K):
            step = a[:, k0:k0 + MMA_K] @ b[:, k0:k0 + MMA_K].t()  # [M, N]
            limited = cut_mantissa(limited + step, mantissa_bits)
        total = total + limited
    return total


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius norms, in float64): the error measure of the FP8 figures.

    got, want: tensors of the same shape (any dtype). Raises ValueError naming both shapes when they differ
    (no broadcasting: a [M, 1] against a [M, N] would compare the wrong numbers silently).
    """
    check_tensor("got", got)
    check_tensor("want", want)
    if got.shape != want.shape:
        raise ValueError(f"relative_error: expected got and want of the same shape, got got "
                         f"{tuple(got.shape)} and want {tuple(want.shape)}")
    want = want.detach().double()
    return float((got.detach().double() - want).norm() / want.norm())


# ---------------------------------------------------------------------------------------------------- training
class Recipe:
    """GEMM input formats of an FP8 linear layer: `forward` for X and W, `backward` for dY.

    V3: E4M3 everywhere (section 3.3.1). `Recipe(torch.bfloat16, torch.bfloat16)` is the bf16 baseline (inputs
    rounded to bfloat16, no scales); a 2-bit-mantissa `backward` (float8_e5m2) shows the backward is quantized.
    """

    def __init__(self, forward: torch.dtype = torch.float8_e4m3fn, backward: torch.dtype = torch.float8_e4m3fn):
        for name, dtype in (("forward", forward), ("backward", backward)):
            if dtype not in FORMATS:
                raise TypeError(f"{name}: expected one of {FORMATS}, got {dtype}")
        self.forward, self.backward = forward, backward

    def __repr__(self) -> str:
        return f"Recipe(forward={self.forward}, backward={self.backward})"


V3_RECIPE = Recipe()
BF16_RECIPE = Recipe(torch.bfloat16, torch.bfloat16)


def _fake_quantize(x: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """x quantized by `block` and dequantized: [R, C] -> [R, C] float32 (what the GEMM sees).

    Unchecked, like `_quantize_blocked`: a block holding a NaN or inf comes out all NaN."""
    q, scale = _quantize_blocked(x, block, dtype)
    return (q.float() * scale[:, None, :, None]).flatten(2, 3).flatten(0, 1)[: x.shape[0], : x.shape[1]]


class _FP8LinearFunction(torch.autograd.Function):
    """y = x w^T with the three GEMMs of appendix B in FP8 (see the module docstring). x [M, K], w [N, K].

    Each GEMM multiplies dequantized operands in one float32 matmul: the same sum as `block_scaled_matmul`
    (scales per K block) up to the order of float32 additions (a test checks it), and much faster on a CPU.
    A K that is not a multiple of 128 (N in Dgrad, the tokens in Wgrad) ends in a partial tile of its own.
    """

    @staticmethod
    def forward(ctx, x, weight, recipe: Recipe):
        ctx.save_for_backward(x, weight)  # V3 caches x in FP8; float32 here (memory is not the point on a CPU)
        ctx.recipe = recipe
        x_deq = _fake_quantize(x, (1, BLOCK), recipe.forward)  # 1x128 tiles
        return x_deq @ _fake_quantize(weight, (BLOCK, BLOCK), recipe.forward).t()  # [M, N] float32

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        fwd, bwd = ctx.recipe.forward, ctx.recipe.backward
        grad_y = grad_y.float()  # [M, N]
        # Dgrad dX = dY W, K = N: dY in 1x128 tiles along N, W in its 128x128 blocks
        grad_x = _fake_quantize(grad_y, (1, BLOCK), bwd) @ _fake_quantize(weight, (BLOCK, BLOCK), fwd)
        # Wgrad dW = dY^T X, K = the M tokens: dY and X in 128x1 tiles (128 tokens, one channel)
        grad_w = _fake_quantize(grad_y, (BLOCK, 1), bwd).t() @ _fake_quantize(x, (BLOCK, 1), fwd)
        return grad_x, grad_w, None  # [M, K], [N, K] float32


class FP8Linear(nn.Module):
    """A bias-free linear layer y = x W^T whose GEMMs (forward, dX, dW) take FP8 inputs (V3 appendix B).

    weight: [out_features, in_features] float32 master weight (its gradient float32 too). in_features must be
    a multiple of 128 (the K of the forward GEMM); out_features and the number of tokens may be anything
    (where they are a backward GEMM's K, the last tile is partial: as zero-padding to 128, which changes no
    sum). x: [..., in_features] float32 -> [..., out_features] float32. recipe: the formats (`Recipe`),
    default V3's E4M3.
    Raises ValueError (in_features), TypeError (x not float32). NaN and inf are not refused here (a check
    would cost a host sync in every GEMM of every training step): after quantization, one in x, the weight
    or dY turns its whole tile or block NaN (x: its 1x128 tile; the weight: its 128x128 block; dY: its
    tiles). So a NaN or inf in x[t] makes y[t] NaN, and one in weight[n] makes y[:, n'] NaN for all 128
    output features n' of its block (a float32 layer: y[:, n] alone). The loss turns NaN either way.
    """

    def __init__(self, in_features: int, out_features: int, recipe: Recipe = V3_RECIPE):
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        _check_k("in_features", in_features)
        self.in_features, self.out_features, self.recipe = in_features, out_features, recipe
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)  # nn.Linear's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x)
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"x: expected last dimension {self.in_features}, got shape {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"x: expected dtype torch.float32 (FP8Linear keeps float32 master weights), "
                            f"got {x.dtype}")
        y = _FP8LinearFunction.apply(x.reshape(-1, self.in_features), self.weight, self.recipe)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.recipe}"


def convert_to_fp8(model: nn.Module, recipe: Recipe = V3_RECIPE) -> list[str]:
    """Swap every nn.Linear inside `model.model.layers` for an `FP8Linear` with the same weight; in place.

    model: a `refimpl.model.DeepSeekForCausalLM` in float32 (or anything with `.model.layers`). What V3 keeps
    in higher precision stays as it is: the embedding and the output head (outside the layers), the MoE gate
    (`refimpl.moe.Router`, not an nn.Linear), the RMSNorms and the attention core (not linear layers).
    Returns the names of the swapped modules. Raises ValueError naming the first linear layer whose
    in_features is not a multiple of 128, or one with a bias, before changing anything; TypeError for a
    model that is not float32.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError("model: expected a DeepSeekForCausalLM (a .model.layers attribute), got "
                         f"{type(model).__name__}")
    linears = [(name, m) for name, m in layers.named_modules() if type(m) is nn.Linear]
    for name, module in linears:
        if module.weight.dtype != torch.float32:
            raise TypeError(f"model.layers.{name}: expected float32 master weights, got {module.weight.dtype}")
        if module.bias is not None:
            raise ValueError(f"model.layers.{name}: expected a linear layer without bias, got one with a bias")
        if module.in_features % BLOCK:
            raise ValueError(f"model.layers.{name}: expected in_features (the GEMM's K) a multiple of {BLOCK}, "
                             f"got {module.in_features}")
    for name, module in linears:
        fp8 = FP8Linear(module.in_features, module.out_features, recipe)
        fp8.weight = module.weight  # the same master weight (the same Parameter object)
        parent, _, child = name.rpartition(".")
        setattr(layers.get_submodule(parent) if parent else layers, child, fp8)
    return [f"model.layers.{name}" for name, _ in linears]


# ---------------------------------------------------------------------------------------------------- experiment
EXPERIMENT_LOG = Path(__file__).resolve().parent.parent / "lessons" / "logs" / "fp8_vs_bf16.json"
EXPERIMENT = {"seed": 0, "steps": 300, "batch_size": 8, "seq_len": 64, "lr": 3e-3, "bias_update_gamma": 1e-3,
              "eval_every": 50, "eval_batches": 8, "examples_per_domain": 2000}


def fp8_config() -> ModelConfig:
    """The small DeepSeek of the FP8 experiment: lesson 11's design grown so that every K is a multiple of 128.

    hidden 256, q/kv latent ranks 128, 2 heads with v_head_dim 64 (o_proj's K = 128), a dense first layer
    (intermediate 256), then DeepSeekMoE with 1 shared + 4 routed experts of width 128, top-2. ~1.1M parameters.
    """
    return tiny_config(hidden_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=256, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=64, n_routed_experts=4, moe_intermediate_size=128,
                       name="fp8-small")


def training_run(recipe: Recipe | None, steps: int = EXPERIMENT["steps"], progress: bool = False
                 ) -> tuple[DeepSeekForCausalLM, TrainLog]:
    """`fp8_config()` trained with every decoder-layer GEMM in `recipe` (None: plain float32, no rounding);
    the same seed, data and initial weights for every recipe. -> (model, refimpl.train.TrainLog).

    The data: the lessons' generated domain corpus (`refimpl.data`); AdamW, clipping, V3's bias balancing as
    `refimpl.train.train` does them.
    """
    e = EXPERIMENT
    corpus = make_domain_corpus(e["examples_per_domain"], seed=e["seed"])
    train_ids, val_ids = split(encode_corpus(corpus, ByteTokenizer()), 0.1)
    torch.manual_seed(e["seed"])
    model = DeepSeekForCausalLM(fp8_config())
    if recipe is not None:
        convert_to_fp8(model, recipe)
    eval_batches = list(token_batches(val_ids, e["batch_size"], e["seq_len"], seed=e["seed"] + 1,
                                      num_batches=e["eval_batches"]))
    log = train(model, token_batches(train_ids, e["batch_size"], e["seq_len"], seed=e["seed"]), steps=steps,
                lr=e["lr"], eval_batches=eval_batches, eval_every=e["eval_every"],
                bias_update_gamma=e["bias_update_gamma"], seed=e["seed"], progress=progress,
                log_expert_load=False)
    return model, log


# the runs of the experiment: V3's recipe, its forward alone in FP8, the bf16 baseline, and no rounding at all
EXPERIMENT_RUNS = {"fp8": V3_RECIPE, "fp8_forward_only": Recipe(torch.float8_e4m3fn, torch.bfloat16),
                   "bf16": BF16_RECIPE, "fp32": None}


def run_experiment(steps: int = EXPERIMENT["steps"], progress: bool = False) -> dict:
    """Every run of `EXPERIMENT_RUNS` by `training_run` at equal steps -> the log as a dict (losses, seconds)."""
    runs = {}
    for name, recipe in EXPERIMENT_RUNS.items():
        model, log = training_run(recipe, steps, progress)
        runs[name] = {"recipe": repr(recipe), "train_loss": log.train_loss, "eval_step": log.eval_step,
                      "eval_loss": log.eval_loss, "seconds": log.seconds}
    return {"experiment": "refimpl.fp8.run_experiment", "config": fp8_config().name,
            "parameters": sum(p.numel() for p in model.parameters()), **EXPERIMENT,
            "steps": steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "runs": runs}


def main(argv: list[str] | None = None) -> None:
    """`python -m refimpl.fp8 train [--steps N] [--out FILE] [--threads N]`: FP8 vs bf16 (and float32)
    training, as JSON."""
    parser = argparse.ArgumentParser(prog="python -m refimpl.fp8", description=main.__doc__)
    parser.add_argument("command", choices=["train"],
                        help="train: the runs of EXPERIMENT_RUNS (fp8, fp8_forward_only, bf16, fp32) from the "
                             "same seed, data and initial weights, and write their losses")
    parser.add_argument("--steps", type=int, default=EXPERIMENT["steps"],
                        help="optimizer steps of each run (batches of %d sequences of %d tokens); default "
                             "%%(default)s, as in the committed log (another number needs --out, so as not "
                             "to overwrite it)"
                             % (EXPERIMENT["batch_size"], EXPERIMENT["seq_len"]))
    parser.add_argument("--out", type=Path, default=EXPERIMENT_LOG,
                        help="the JSON log to write; default lessons/logs/fp8_vs_bf16.json, the committed "
                             "log that lesson 20 asserts on")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; default %(default)s (many times faster than 2 on a busy 2-core "
                             "machine)")
    args = parser.parse_args(argv)
    try:
        check_int("steps", args.steps, 1)
        check_int("threads", args.threads, 1)
        if args.out.is_dir():
            raise ValueError(f"out: expected a JSON file name, got the folder {args.out}")
        if args.out == EXPERIMENT_LOG and args.steps != EXPERIMENT["steps"]:
            raise ValueError(f"out: --steps {args.steps} differs from the experiment's {EXPERIMENT['steps']} and "
                             f"would overwrite the committed log the lessons assert on; give --out FILE")
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    log = run_experiment(args.steps, progress=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(log, indent=1) + "\n")
    fp8_loss, bf16_loss = (log["runs"][r]["eval_loss"][-1] for r in ("fp8", "bf16"))
    print(f"eval loss after {args.steps} steps: fp8 {fp8_loss:.4f}, bf16 {bf16_loss:.4f}, "
          f"relative difference {(fp8_loss - bf16_loss) / bf16_loss:+.2%}")
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


# ---------------------------------------------------------------------------------------------------- checks
def _pad(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """x zero-padded at the end of `dim` to a multiple of `multiple` (unchanged if it is one)."""
    extra = -x.shape[dim] % multiple
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def _check_finite(function: str, name: str, x: torch.Tensor) -> None:
    """ValueError naming `function`, the tensor, how many of its values are NaN or inf and the first one.

    One reduction and one host sync when x is finite (the common case); the count and index only on failure.
    """
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero()  # [count, ndim]
    first = tuple(bad[0].tolist())
    raise ValueError(f"{function}: expected {name} with finite values only, got {len(bad)} NaN or inf of "
                     f"{x.numel()}, the first {name}{list(first)} = {x[first].item()} (a NaN or inf makes "
                     f"its block's scale non-finite and the whole block NaN)")


def _check_k(name: str, k: int) -> None:
    if k % BLOCK or k == 0:
        raise ValueError(f"{name}: expected K (the reduction dimension) a positive multiple of {BLOCK}, "
                         f"V3's tile width, got K={k}")


def _check_operand(name: str, x) -> None:
    check_tensor(name, x, ndim=2)
    if x.dtype not in FORMATS:
        raise TypeError(f"{name}: expected a quantized operand of dtype {' or '.join(map(str, FORMATS))}, "
                        f"got {x.dtype}")


def _check_scale_dtype(name: str, scale) -> None:
    check_tensor(name, scale, ndim=2)
    if scale.dtype != torch.float32:
        raise TypeError(f"{name}: expected dtype torch.float32, got {scale.dtype}")


def _row_scales(name: str, scale, rows: int, kb: int) -> torch.Tensor:
    """A 1x128 ([rows, kb]) or 128x128 ([ceil(rows / 128), kb]) scale tensor as one scale row per row."""
    _check_scale_dtype(name, scale)
    tiles, blocks = (rows, kb), (-(-rows // BLOCK), kb)
    if tuple(scale.shape) == tiles:
        return scale
    if tuple(scale.shape) == blocks:
        return scale.repeat_interleave(BLOCK, 0)[:rows]
    raise ValueError(f"{name}: expected shape {tiles} (1x128 tiles) or {blocks} (128x128 blocks), "
                     f"got {tuple(scale.shape)}")


if __name__ == "__main__":
    main()
