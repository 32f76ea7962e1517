"""Plain PyTorch wrong answers, each as a learner might write it: (question, what is wrong, function)."""

import torch


def mla_absorbed_naive(attn, q_nope, q_pe, c_kv, k_pe):
    """Right values, the naive way: every cached latent decompressed to per-head keys and values."""
    batch, kv_len, _ = c_kv.shape
    kv = attn.kv_b_proj(c_kv).view(batch, kv_len, attn.num_heads, -1).transpose(1, 2)  # [b, h, t, nope + v]
    k_nope, v = kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
    scores = q_nope @ k_nope.transpose(-2, -1) + q_pe @ k_pe[:, None].transpose(-2, -1)
    seq = q_nope.shape[2]
    allowed = torch.ones(seq, kv_len, dtype=torch.bool).tril(diagonal=kv_len - seq)
    probs = (scores * attn.softmax_scale).masked_fill(~allowed, float("-inf")).softmax(-1)
    return probs @ v


def moe_forward_dense_loop(moe, hidden_states):
    """Every expert on every token, each output weighted by its (mostly zero) gate weight."""
    x = hidden_states.flatten(0, 1)
    routing = moe.gate(x)
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        weight = (routing.topk_weight * (routing.topk_idx == e)).sum(-1, keepdim=True)  # [tokens, 1]
        out = out + expert(x) * weight
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out.view(hidden_states.shape)


def moe_forward_dense_where(moe, hidden_states):
    """Every expert on every token, the unchosen outputs dropped with torch.where (no NaN from 0 * inf)."""
    x = hidden_states.flatten(0, 1)
    routing = moe.gate(x)
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        chosen = routing.topk_idx == e  # [tokens, k]
        weight = (routing.topk_weight * chosen).sum(-1, keepdim=True)  # [tokens, 1]
        out = out + torch.where(chosen.any(-1, keepdim=True), expert(x) * weight, 0.0)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out.view(hidden_states.shape)


def moe_forward_no_shared(moe, hidden_states):
    x = hidden_states.flatten(0, 1)
    routing = moe.gate(x)
    out = torch.zeros_like(x)
    for e, expert in enumerate(moe.experts):
        token, slot = (routing.topk_idx == e).nonzero(as_tuple=True)
        out = out.index_add(0, token, expert(x[token]) * routing.topk_weight[token, slot, None])
    return out.view(hidden_states.shape)


def update_bias_not_in_place(bias, load, gamma):
    return bias + gamma * torch.sign(load.mean() - load)


def update_bias_inverted(bias, load, gamma):
    bias -= gamma * torch.sign(load.mean() - load)
    return bias


def mla_latents_no_norm(attn, hidden_states, start_pos):
    c_kv, k_pe = attn.kv_a_proj_with_mqa(hidden_states).split([attn.kv_lora_rank, attn.qk_rope_head_dim], -1)
    cos, sin = attn.rotary_emb(torch.arange(start_pos, start_pos + hidden_states.shape[1]))
    even, odd = k_pe[..., 0::2], k_pe[..., 1::2]
    return c_kv, torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


def mla_decompress_no_transpose(attn, c_kv):
    batch, kv_len, _ = c_kv.shape
    kv = attn.kv_b_proj(c_kv).view(batch, attn.num_heads, kv_len, -1)  # heads and positions mixed up
    return tuple(kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1))


def kv_bytes_one_layer(config, bytes_per_element):
    if config.kv_lora_rank is not None:
        return (config.kv_lora_rank + config.qk_rope_head_dim) * bytes_per_element
    return 2 * config.num_key_value_heads * config.head_dim * bytes_per_element


def route_topk_softmax_after_topk(gate, x):
    logits = x @ gate.weight.T
    top, idx = logits.topk(gate.top_k, dim=-1)
    return idx, top.softmax(-1) * gate.routed_scaling_factor  # softmax over the chosen only


def route_group_limited_no_groups(gate, x):
    scores = (x @ gate.weight.T).sigmoid()
    idx = (scores + gate.e_score_correction_bias).topk(gate.top_k, dim=-1).indices
    weight = scores.gather(1, idx)
    return idx, weight / weight.sum(-1, keepdim=True) * gate.routed_scaling_factor


MUTANTS = [
    ("mla_absorbed", "the naive way (decompressed cache)", mla_absorbed_naive),
    ("moe_forward", "every expert on every token", moe_forward_dense_loop),
    ("moe_forward", "every expert on every token, masked with torch.where", moe_forward_dense_where),
    ("moe_forward", "no shared experts", moe_forward_no_shared),
    ("update_bias", "a new tensor, not in place", update_bias_not_in_place),
    ("update_bias", "signs swapped", update_bias_inverted),
    ("mla_latents", "no kv_a_layernorm", mla_latents_no_norm),
    ("mla_decompress", "no transpose", mla_decompress_no_transpose),
    ("kv_bytes_per_token", "one layer only", kv_bytes_one_layer),
    ("route_topk", "softmax over the top-k logits only", route_topk_softmax_after_topk),
    ("route_group_limited", "no group limit", route_group_limited_no_groups),
]
