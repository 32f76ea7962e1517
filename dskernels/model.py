"""The switch that puts the kernels into a `refimpl` model, without `refimpl` knowing about them.

    from dskernels.model import use_kernels
    with use_kernels(model):                 # a refimpl.model.DeepSeekForCausalLM
        tokens = model.generate(prompt, 20)  # same tokens as without the switch

Inside the `with` block, three kinds of modules of the model get a kernel-backed `forward` (an attribute set on
each module instance, removed on exit; the refimpl classes are untouched):

  * every `refimpl.norm.RMSNorm`                 -> `dskernels.rowwise.rmsnorm`
  * every `refimpl.moe.DeepSeekMoE`'s experts    -> `dskernels.moe.moe_experts` (router and shared experts stay)
  * every `refimpl.mla.MultiHeadLatentAttention` on a decode step (one new token, a cache, the absorbed path,
    no padding)                                  -> `dskernels.mla_decode.mla_decode`; other calls (prefill,
    the naive path, padded batches) run refimpl's own forward.

Inference only: the kernels have no backward. The expert weights are stacked into [E, ...] tensors on entry
(a copy: changes to the weights inside the block are not seen).
"""

from __future__ import annotations

import contextlib

import torch

from dskernels import mla_decode as mla_kernels
from dskernels import moe as moe_kernels
from dskernels import rowwise
from refimpl.attention import position_ids
from refimpl.mla import MultiHeadLatentAttention
from refimpl.moe import DeepSeekMoE
from refimpl.norm import RMSNorm


def _rmsnorm_forward(norm: RMSNorm):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return rowwise.rmsnorm(x.contiguous(), norm.weight.detach(), norm.eps)
    return forward


def _moe_forward(layer: DeepSeekMoE):
    weights = moe_kernels.stack_expert_weights(layer.experts)  # w_gate, w_up [E, I, H], w_down [E, H, I]

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(batch * seq, hidden).contiguous()  # [tokens, hidden]
        routing = layer.gate(x)
        layer.last_routing = routing
        out = moe_kernels.moe_experts(x, routing.topk_idx, routing.topk_weight, *weights)  # [tokens, hidden]
        if layer.shared_experts is not None:
            out = out + layer.shared_experts(x)
        return out.view(batch, seq, hidden)
    return forward


def _mla_forward(attn: MultiHeadLatentAttention, step: str):
    refimpl_forward = attn.forward  # the class's forward, bound to this module

    def forward(hidden_states, start_pos=0, cache=None, mode="naive", attention_mask=None):
        batch, seq, _ = hidden_states.shape
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is None or mode != "absorbed" or seq != 1 or padded:
            return refimpl_forward(hidden_states, start_pos, cache, mode, attention_mask)
        # the steps of MultiHeadLatentAttention.forward for one new token, with the kernel for the attention
        positions = position_ids(None, start_pos, 1, hidden_states.device)  # [1]
        cos, sin = attn.rotary_emb(positions, dtype=hidden_states.dtype)
        q_nope, q_pe = attn._queries(hidden_states, cos, sin)  # [batch, heads, 1, qk_nope / qk_rope]
        c_kv, k_pe = attn._latents(hidden_states, cos, sin)  # [batch, 1, kv_lora_rank / qk_rope]
        cache.update(c_kv, k_pe, start_pos)
        w_uk, w_uv = attn._w_uk_uv()
        q_latent = torch.einsum("bhd,hdc->bhc", q_nope[:, :, 0], w_uk)  # W^UK_h^T q^C_h: [batch, heads, C]
        seq_lens = torch.full((batch,), start_pos + 1, dtype=torch.int32, device=hidden_states.device)
        out_latent = mla_kernels.mla_decode(q_latent.contiguous(), q_pe[:, :, 0].contiguous(), cache.c_kv,
                                            cache.k_pe, seq_lens, attn.softmax_scale, step=step)
        out = torch.einsum("bhc,hvc->bhv", out_latent, w_uv)  # W^UV_h: [batch, heads, v_head_dim]
        return attn.o_proj(out.reshape(batch, 1, attn.num_heads * attn.v_head_dim))
    return forward


@contextlib.contextmanager
def use_kernels(model: torch.nn.Module, mla_step: str = "v2"):
    """Within the block, `model`'s RMSNorms, MoE experts and MLA decode steps run on the Triton kernels.

    model: any module holding refimpl RMSNorm / DeepSeekMoE / MultiHeadLatentAttention submodules (e.g. a
    `refimpl.model.DeepSeekForCausalLM`). mla_step: "v1" or "v2" (`dskernels.mla_decode.mla_decode`).
    Raises TypeError for a model that is not a torch module, ValueError for a bad mla_step.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if mla_step not in ("v1", "v2"):
        raise ValueError(f"mla_step: expected 'v1' or 'v2', got {mla_step!r}")
    patched = []
    try:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.forward = _rmsnorm_forward(module)
            elif isinstance(module, DeepSeekMoE):
                module.forward = _moe_forward(module)
            elif isinstance(module, MultiHeadLatentAttention):
                module.forward = _mla_forward(module, mla_step)
            else:
                continue
            patched.append(module)
        yield model
    finally:
        for module in patched:
            del module.forward  # the class's forward again
