"""Compile every kernel, in every configuration its wrapper can pick, for a GPU target, on any machine.

    TRITON_INTERPRET=0 python -m dskernels.compile_check [--all] [--json PATH]   # sm_90 and sm_80

`triton.compile` runs Triton's whole GPU pipeline (to PTX, then ptxas from the triton wheel to a cubin) for a
`GPUTarget` without a GPU, so the rules the interpreter does not enforce are checked on a CPU: `tl.dot` of at
least 16, no Python helper inside a kernel, dtypes the architecture supports, and the shared memory each
configuration needs against the target's limit per block (`TARGETS`). The wrappers pick their pipeline stages
from a shared-memory estimate and the budget of the GPU they run on (`dskernels._checks.shared_memory_budget`):
`configs(target)` asks each wrapper's picker with that target's budget, so what is compiled here is what a
GPU of that kind would launch, and `tests/test_kernels_compile.py` checks that the compiled size is within the
limit and not above the wrapper's estimate. Every configuration is compiled as a launch on tensors as the
wrappers make them (`Config.aligned`): pointers 16-byte aligned and integer arguments multiples of 16, matmul's
unit strides specialized to 1 (Triton specializes a launch on all three), so the loads become asynchronous
copies and are pipelined over `num_stages`, with the buffers that costs; a launch on unaligned or odd-sized
tensors has fewer of these hints, so it is pipelined no more. It needs TRITON_INTERPRET=0: under the interpreter Triton's own
jit helpers (tl.cdiv, ...) are interpreter functions and cannot be compiled.

Which configurations (each for float32, float16 and bfloat16, the dtypes the wrappers accept; no wrapper takes
float8, so no float8 config exists):
  rowwise      softmax v1/v2 and RMSNorm at the smallest and largest block (1 and 65536) and the default 1024
               (the shared memory of a reduction depends on the warps, not the block: these cover them);
  matmul       v1/v2 at the default 64-blocks and the benchmark's 128 x 128; v3: every autotune config that
               fits the target (the others are pruned by the wrapper);
  flash attn   v1/v2/v3, the default 64 x 64 blocks, head sizes 64, 128 and 192 (-> a 256 block: DeepSeek's
               qk_nope + qk_rope), causal;
  flash attn v4  the forward in every autotune config that fits, its backward kernels; heads 128/128 and
               MLA's 192/128, causal;
  MLA decode   v1/v2/v3 and the merge, DeepSeek-V3's 512 + 64 latent (block_h 16, block_n from the wrapper's
               pick) and a small 64 + 16 one; v4 (FlashMLA's design) and its merge at block_h 64, 64-token
               pages;
  MoE          gate/up, down and down + combine (v3) at the default 64-blocks.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from dskernels import flash_attention as fa
from dskernels import flash_attention_v4 as fa4
from dskernels import matmul as mm
from dskernels import mla_decode as md
from dskernels import mla_decode_flash as mf
from dskernels import moe
from dskernels import rowwise
from dskernels._checks import interpreting

# shared memory per block (opt-in maximum), NVIDIA CUDA C++ Programming Guide, compute capabilities table
TARGETS = {"sm_90": (GPUTarget("cuda", 90, 32), 232448), "sm_80": (GPUTarget("cuda", 80, 32), 166912)}
# A row-major launch: Triton specializes every integer argument equal to 1 as a constant, so the loads
# along the unit stride become 16-byte vectors that can be pipelined (matmul's strides; a column-major
# operand specializes the other stride the same way)
ROW_MAJOR = dict(stride_ak=1, stride_bn=1, stride_cn=1)
TRITON_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Config:
    """One kernel launch configuration: what `triton.compile` needs, and the wrapper's estimate (bytes)."""
    name: str
    kernel: object  # a @triton.jit function (JITFunction or, under the interpreter, InterpretedFunction)
    signature: dict  # argument name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    estimate: int | None = None  # the wrapper's shared memory estimate, None where it keeps none
    aligned: bool = True  # compile as a launch on aligned tensors: 16-byte-aligned pointers, i32 multiple of 16


def _alignment_hints(fn: JITFunction, signature: dict) -> dict:
    """The hints Triton's launcher gives a kernel whose pointers are 16-byte aligned and whose integer
    arguments are multiples of 16 (`tt.divisibility` 16, as `triton.backends.compiler.BaseBackend.parse_attr`):
    only with them can loads become 16-byte asynchronous copies, and so be pipelined over `num_stages`."""
    return {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
            for name, kind in signature.items() if kind.startswith("*") or kind == "i32"}


def _signature(kernel, dtype: torch.dtype, constexprs: dict, types: dict) -> dict:
    """Every argument of `kernel`: constexpr, types[name], a pointer to dtype (names ending in _ptr) or i32."""
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.endswith("_ptr"):
            signature[name] = "*" + TRITON_TYPE[dtype]
        else:
            signature[name] = "i32"
    return signature


def make_config(name, kernel, dtype, constexprs, types=None, **options) -> Config:
    """A `Config` of `kernel` for `dtype`: arguments named in `constexprs` are constexpr, those in `types`
    have that Triton type, names ending in _ptr point to dtype, the rest are i32; `options`: num_warps,
    num_stages, estimate, aligned."""
    return Config(f"{name} {TRITON_TYPE[dtype]}", kernel, _signature(kernel, dtype, constexprs, types or {}),
                  constexprs, **options)


def _rowwise(dtype, budget, arch) -> list[Config]:
    out = []
    for block in (1, 1024, rowwise.MAX_BLOCK):
        warps = rowwise.num_warps(block)
        for name, kernel in (("softmax v1", rowwise.softmax_v1_kernel), ("softmax v2", rowwise.softmax_v2_kernel)):
            out.append(make_config(f"{name} BLOCK={block}", kernel, dtype, {"BLOCK": block}, num_warps=warps))
        out.append(make_config(f"rmsnorm BLOCK={block}", rowwise.rmsnorm_kernel, dtype, {"BLOCK": block},
                           {"eps": "fp32"}, num_warps=warps))
    return out


def _matmul(dtype, budget, arch) -> list[Config]:
    out = []
    ieee = dtype == torch.float32
    for bm, bn, bk in ((64, 64, 64), (128, 128, 64)):
        stages = mm.pick_num_stages(bm, bn, bk, dtype, budget, arch)
        estimate = mm.shared_memory_estimate(bm, bn, bk, dtype.itemsize, stages, arch)
        const = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, **ROW_MAJOR)
        out.append(make_config(f"matmul v1 {bm}x{bn}x{bk}", mm.matmul_v1_kernel, dtype, const, num_stages=stages,
                           estimate=estimate))
        out.append(make_config(f"matmul v2 {bm}x{bn}x{bk}", mm.matmul_v2_kernel, dtype, {**const, "GROUP_M": 8},
                           num_stages=stages, estimate=estimate))
    for c in mm.fitting_configs(mm._autotune_configs(), dtype.itemsize, budget, arch):
        k = c.kwargs
        estimate = mm.shared_memory_estimate(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], dtype.itemsize,
                                             c.num_stages, arch)
        out.append(make_config(f"matmul v3 {k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} s{c.num_stages}",
                           mm.matmul_v2_kernel, dtype, {**k, "IEEE": ieee, **ROW_MAJOR}, num_warps=c.num_warps,
                           num_stages=c.num_stages, estimate=estimate))
    return out


def _flash_attention(dtype, budget, arch) -> list[Config]:
    out = []
    for d in (64, 128, 192):
        block_d = max(16, triton.next_power_of_2(d))
        try:
            stages = fa.pick_num_stages(64, 64, block_d, block_d, dtype, budget, arch)
        except ValueError:  # refused by the wrapper (float32, head 192 on sm_80): not a config it launches
            continue
        const = dict(D=d, DV=d, CAUSAL=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, BLOCK_DV=block_d,
                     IEEE=dtype == torch.float32)
        for step, kernel in fa.KERNELS.items():
            out.append(make_config(f"flash attention {step} d={d}", kernel, dtype, const, {"scale": "fp32"},
                               num_stages=stages,
                               estimate=fa.shared_memory_estimate(64, 64, block_d, block_d, dtype.itemsize, stages,
                                                                 arch)))
    return out


def _flash_attention_v4(dtype, budget, arch) -> list[Config]:
    """v4's forward in every autotune config that fits, and its backward kernels, at heads 128/128 and MLA's
    192/128 (causal)."""
    out = []
    size, ieee = dtype.itemsize, dtype == torch.float32
    types = {"scale": "fp32", "qk_scale": "fp32", "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
    for d, dv in ((128, 128), (192, 128)):
        bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
        base = dict(D=d, DV=dv, CAUSAL=True, BLOCK_D=bd, BLOCK_DV=bdv, IEEE=ieee)
        for bm, bn, warps, stages in fa4.fitting_forward_configs(bd, bdv, size, budget, arch):
            out.append(make_config(f"flash attention v4 fwd d={d}/{dv} {bm}x{bn} w{warps} s{stages}",
                               fa4.flash_attention_v4_fwd_kernel, dtype, {**base, "BLOCK_M": bm, "BLOCK_N": bn},
                               types, num_warps=warps, num_stages=stages,
                               estimate=fa4.forward_shared_memory(bm, bn, bd, bdv, size, stages, arch)))
        try:
            stages = fa4.pick_backward_stages(bd, bdv, dtype, budget, arch)
        except ValueError:  # refused by the wrapper: not a config it launches
            continue
        meta = {**base, "BLOCK_M": fa4.BWD_BLOCK_M, "BLOCK_N": fa4.BWD_BLOCK_N}
        estimate = fa4.backward_shared_memory(fa4.BWD_BLOCK_M, fa4.BWD_BLOCK_N, bd, bdv, size, stages, arch)
        for name, kernel in (("dk/dv", fa4.flash_attention_v4_bwd_dkdv_kernel),
                             ("dq", fa4.flash_attention_v4_bwd_dq_kernel)):
            out.append(make_config(f"flash attention v4 bwd {name} d={d}/{dv}", kernel, dtype, meta, types,
                               num_warps=fa4.BWD_WARPS, num_stages=stages, estimate=estimate))
        out.append(make_config(f"flash attention v4 bwd preprocess dv={dv}",
                           fa4.flash_attention_v4_bwd_preprocess_kernel, dtype,
                           dict(DV=dv, BLOCK_M=64, BLOCK_DV=bdv), types))
    return out


def _mla_decode(dtype, budget, arch) -> list[Config]:
    out = []
    types = {"scale": "fp32", "seq_lens_ptr": "*i32", "block_table_ptr": "*i32", "part_out_ptr": "*fp32",
             "part_lse_ptr": "*fp32"}
    for C, R in ((64, 16), (512, 64)):
        block_h = 16
        block_n = md.pick_block_n(C, R, block_h, dtype, budget, arch)
        stages = md.pick_num_stages(C, R, block_h, block_n, dtype, budget, arch)
        estimate = md.shared_memory_estimate(C, R, block_h, block_n, dtype.itemsize, stages, arch)
        meta = dict(C=C, R=R, BLOCK_H=block_h, BLOCK_C=md.next_pow2_16(C), BLOCK_R=md.next_pow2_16(R),
                    IEEE=dtype == torch.float32)
        label = f"{C}+{R} block_n={block_n}"
        out.append(make_config(f"MLA decode v1 {label}", md.mla_decode_v1_kernel, dtype, {**meta, "BLOCK_N": block_n},
                           types, num_stages=stages, estimate=estimate))
        out.append(make_config(f"MLA decode v2 {label}", md.mla_decode_v2_kernel, dtype,
                           {**meta, "BLOCK_N": block_n, "NUM_SPLITS": 4}, types, num_stages=stages, estimate=estimate))
        out.append(make_config(f"MLA decode v3 {label}", md.mla_decode_v3_kernel, dtype,
                           {**meta, "PAGE_SIZE": block_n, "NUM_SPLITS": 4}, types, num_stages=stages,
                           estimate=estimate))
        out.append(make_config(f"MLA merge {C}", md.merge_splits_kernel, dtype,
                           dict(C=C, NUM_SPLITS=4, BLOCK_S=4, BLOCK_C=md.next_pow2_16(C)), types))
        out += _mla_decode_flash(C, R, dtype, budget, arch, types)
    return out


def _mla_decode_flash(C, R, dtype, budget, arch, types) -> list[Config]:
    """Step v4 (`dskernels.mla_decode_flash`): 128 heads over 64-token pages, the blocks its plan picks."""
    block_h, block_n, stages = mf.pick_blocks(C, R, 128, 64, dtype, budget, arch=arch)  # 128 heads, as V3
    meta = dict(C=C, R=R, BLOCK_H=block_h, BLOCK_N=block_n, PAGE_SIZE=64, BLOCK_C=md.next_pow2_16(C),
                BLOCK_R=md.next_pow2_16(R), IEEE=dtype == torch.float32)
    types = {**types, **{name: "*i32" for name in ("part_start_ptr", "piece_seq_ptr", "piece_begin_ptr",
                                                    "piece_end_ptr", "seq_piece_start_ptr")}}
    return [make_config(f"MLA decode v4 {C}+{R} block_h={block_h} block_n={block_n}", mf.mla_decode_v4_kernel,
                    dtype, meta, types, num_stages=stages,
                    estimate=md.shared_memory_estimate(C, R, block_h, block_n, dtype.itemsize, stages, arch)),
            make_config(f"MLA merge pieces {C}", mf.merge_pieces_kernel, dtype,
                    dict(C=C, BLOCK_H=block_h, BLOCK_C=md.next_pow2_16(C)), types)]


def _moe(dtype, budget, arch) -> list[Config]:
    stages = moe.pick_num_stages(64, 64, 64, dtype, budget, arch)
    const = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, IEEE=dtype == torch.float32)
    types = {"sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32", "topk_weight_ptr": "*fp32"}
    return [make_config("MoE gate/up 64x64x64", moe.gate_up_kernel, dtype, {**const, "TOP_K": 6}, types,
                    num_stages=stages, estimate=moe.shared_memory_estimate(64, 64, 64, dtype.itemsize, stages, 2,
                                                                           arch)),
            make_config("MoE down 64x64x64", moe.down_kernel, dtype, const, types, num_stages=stages,
                    estimate=moe.shared_memory_estimate(64, 64, 64, dtype.itemsize, stages, 1, arch)),
            make_config("MoE down + combine 64x64x64", moe.down_combine_kernel, dtype, {**const, "TOP_K": 6},
                    {**types, "out_ptr": "*fp32"}, num_stages=stages,
                    estimate=moe.shared_memory_estimate(64, 64, 64, dtype.itemsize, stages, 1, arch))]


FAMILIES = {"rowwise": _rowwise, "matmul": _matmul, "flash_attention": _flash_attention,
            "flash_attention_v4": _flash_attention_v4, "mla_decode": _mla_decode,
            "moe": _moe}


def configs(target: str, family: str, dtype: torch.dtype) -> list[Config]:
    """The configurations `family`'s wrappers pick for `dtype` on a GPU of `target` ("sm_90", "sm_80")."""
    gpu, budget = TARGETS[target]
    return FAMILIES[family](dtype, budget, gpu.arch)


def compile_kernel(config: Config, target: str):
    """Compile `config` for `target` with triton.compile (no GPU needed) -> Triton's compiled kernel
    (`.metadata.shared`: bytes of shared memory; `.asm["ttgir"]`, `.asm["ptx"]`: the code at each level)."""
    fn = config.kernel if isinstance(config.kernel, JITFunction) else JITFunction(config.kernel.fn)
    attrs = _alignment_hints(fn, config.signature) if config.aligned else None
    source = ASTSource(fn=fn, signature=config.signature, constexprs=config.constexprs, attrs=attrs)
    return triton.compile(source, target=TARGETS[target][0],
                          options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def compile_config(config: Config, target: str) -> int:
    """Compile `config` for `target` -> the shared memory it uses (bytes)."""
    return int(compile_kernel(config, target).metadata.shared)


def problems(row: dict) -> list[str]:
    """What is wrong with one compiled configuration (a row of `run`): its shared memory above the target's
    limit, or above the wrapper's estimate (which the wrapper picks its stages and configs by, so a GPU
    would be asked for more than the wrapper budgeted). Empty when it is fine."""
    found = []
    if row["shared"] > row["limit"]:
        found.append(f"{row['target']} {row['name']}: {row['shared']} B of shared memory, above the "
                     f"target's limit of {row['limit']} B per block")
    if row["estimate"] is not None and row["shared"] > row["estimate"]:
        found.append(f"{row['target']} {row['name']}: {row['shared']} B of shared memory, above the "
                     f"wrapper's estimate of {row['estimate']} B")
    return found


def ci_selection(target: str, family: str, dtype: torch.dtype) -> list[Config]:
    """The configurations CI compiles (one takes seconds, float32's exact-product dots up to minutes on a busy
    CPU): in float16 and bfloat16, each kernel once, in its configuration with the largest shared memory
    estimate (the closest to the limit); in float32, the family's configuration with the largest estimate
    (the one that binds). `--all` (DSKERNELS_COMPILE_ALL=1 for the test) compiles every configuration."""
    candidates = configs(target, family, dtype)
    if dtype == torch.float32:
        return [max(candidates, key=lambda config: config.estimate or 0)]
    largest = {}
    for config in candidates:
        kernel = config.kernel.fn
        if kernel not in largest or (config.estimate or 0) >= (largest[kernel].estimate or 0):
            largest[kernel] = config
    return list(largest.values())


def run(selection: str = "ci", targets: list[str] | None = None) -> list[dict]:
    """Compile the `selection` ("ci" or "all") for the targets (default all), every family and dtype -> one
    row per config."""
    rows = []
    for target in targets or TARGETS:
        limit = TARGETS[target][1]
        for family in FAMILIES:
            for dtype in DTYPES:
                chosen = ci_selection(target, family, dtype) if selection == "ci" else configs(target, family, dtype)
                for config in chosen:
                    start = time.perf_counter()
                    shared = compile_config(config, target)
                    rows.append(dict(target=target, family=family, dtype=str(dtype), name=config.name,
                                     num_warps=config.num_warps, num_stages=config.num_stages, shared=shared,
                                     estimate=config.estimate, limit=limit, aligned=config.aligned,
                                     seconds=round(time.perf_counter() - start, 1)))
                    print(f"{target} {config.name:45s} stages {config.num_stages} warps {config.num_warps:2d} "
                          f"shared {shared:7d} B (estimate {config.estimate}, limit {limit}) "
                          f"{rows[-1]['seconds']} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all", action="store_true", help="every configuration, not CI's selection")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--target", choices=list(TARGETS), action="append", help="only this target (repeatable)")
    args = parser.parse_args(argv)
    if interpreting():
        parser.error("run with TRITON_INTERPRET=0: compiling needs Triton's jit functions, not the interpreter's")
    rows = run("all" if args.all else "ci", args.target)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    found = [message for row in rows for message in problems(row)]
    if found:
        raise SystemExit("\n".join(found))
    return rows


if __name__ == "__main__":
    main()
