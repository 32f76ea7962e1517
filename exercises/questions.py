"""The exercises' test cases: how to draw inputs, what refimpl answers, and what an answer may not call.

Registration, one place per exercise (see `EXERCISES` at the end): its questions (each a `Question` with its
hidden-case generator and reference), and the refimpl modules its sandbox may import. A new exercise
`NN_topic` adds its `Question`s to `QUESTIONS`, one `Exercise` entry, and its source notebook `src/NN_topic.ipynb`.

Each `Question` is one function a learner writes (its name is the function's name and otter's question name).
Visible cases are drawn from a fixed seed and are what `check(...)` runs in the notebook; hidden cases are drawn
at grade time from the instructor's seed, with other (often awkward) sizes, so that this public file does not
give away the exact cases. The expected answers are computed here, with `refimpl`, in the grader's process.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

from refimpl import accounting, attention, moe, rope
from refimpl.attention import decoder_mask
from refimpl.config import ModelConfig, RopeScaling, load_known
from refimpl.mla import MultiHeadLatentAttention

# Library routes to a question's job, as regular expressions over every identifier, attribute, imported name and
# string constant of a submission (exercises.static_check): attention in torch under any of its names ...
ATTENTION_ROUTES = (r"scaled_dot_product", r"multi_?head_?attention", r"flash_attention", r"efficient_attention",
                    r"_fused_sdp", r"^Transformer", r"sdp_kernel")
SOFTMAX_ROUTES = (r"softmax", r"softmin")  # ... and a kernel body's library softmax (tl.softmax)
ROPE_ROUTES = (r"apply_rotary", r"rotary_pos_emb")
# What every kernel exercise may not call instead of launching its own Triton kernel (the learner's check).
SOFTMAX_EQUIVALENTS = ("torch.softmax", "torch.nn.functional.softmax", "torch.Tensor.softmax",
                       "torch.special.softmax", "torch._softmax")
SDPA_EQUIVALENTS = ("refimpl.attention.scaled_dot_product_attention",
                    "torch.nn.functional.scaled_dot_product_attention")


@dataclass(frozen=True)
class Question:
    name: str  # the function the learner writes
    arg_names: tuple[str, ...]
    make_args: Callable[[torch.Generator, bool], tuple]  # (generator, hidden) -> arguments
    reference: Callable[..., object]  # arguments -> the expected result, with refimpl
    forbidden: tuple[str, ...]  # dotted names the answer must not call (the refimpl function, its equivalents)
    mutated_args: tuple[int, ...] = ()  # arguments the function must write in place: compared too
    canonical: Callable[[object], object] | None = None  # applied to answer and expected before comparing
    # (answer, expected) -> the two as the learner's check compares and reports them (default: canonical)
    align: Callable[[object, object], tuple] | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    triton: bool = False  # must launch a Triton kernel (graded through its contract: exercises.contracts)
    routes: tuple[str, ...] = ()  # library routes to this question's job (regexes, see ATTENTION_ROUTES)
    n_visible: int = 2
    n_hidden: int = 3
    call_timeout: float = 10.0  # seconds per call when graded
    # address space (MiB) one call may add, where the exercise teaches a way that needs less memory than the
    # naive one (MLA absorption, routed experts): the check and grading (visible and hidden cases) run each call
    # under this limit (exercises.budget); memory_rule says, for the message, what fits and what does not
    memory_budget_mb: int | None = None
    memory_rule: str = ""
    # common mistakes: (what the learner did, the reference computed with that mistake); an answer equal to one
    # of them is told which mistake it matches (exercises.feedback)
    mistakes: tuple[tuple[str, Callable[..., object]], ...] = ()
    # functions of earlier exercises an answer may call: the learner's check names one that fails its own check,
    # and grading judges this question with their references standing in for them (exercises.grade), so a
    # mistake there costs that question's points only
    depends_on: tuple[str, ...] = ()

    def cases(self, seed: int | None) -> list[tuple[str, tuple]]:
        """[(label, args)]: the visible cases when seed is None, else the hidden ones drawn from seed."""
        hidden = seed is not None
        count = self.n_hidden if hidden else self.n_visible
        base = zlib.crc32(self.name.encode()) + (0 if seed is None else 1_000_003 * (seed + 1))
        out = []
        for i in range(count):
            gen = torch.Generator().manual_seed(base + i)
            out.append((f"{'hidden' if hidden else 'visible'} {i + 1}", self.make_args(gen, hidden)))
        return out

    def expected(self, args: tuple):
        """(result, mutated arguments) that refimpl gives for args (args are not changed)."""
        args = clone(args)
        result = self.reference(*args)
        return result, tuple(args[i] for i in self.mutated_args)


def clone(value):
    """A deep copy of arguments, so an answer that writes its inputs in place cannot change the next call's."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(clone(v) for v in value)
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value)
    return value  # numbers, configs (frozen)


# ---------------------------------------------------------------------------------------------------- helpers
def _pick(gen: torch.Generator, *choices):
    return choices[int(torch.randint(len(choices), (1,), generator=gen))]


def _kind(gen: torch.Generator, kinds: tuple):
    """Stratified draws: consecutive case seeds cycle through `kinds`, so that every `len(kinds)` consecutive
    cases (visible or hidden, at any instructor seed) cover every kind once."""
    return kinds[gen.initial_seed() % len(kinds)]


def _randn(gen: torch.Generator, *shape, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def _randomize(module: torch.nn.Module, gen: torch.Generator, scale: float = 0.3) -> torch.nn.Module:
    """Draw every parameter from gen (norm weights around 1), so that a wrong wiring shows."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else scale * noise)
    return module


# ---------------------------------------------------------------------------------------------------- attention
def _qkv(gen, hidden):
    b, h, d = (_pick(gen, 1, 2, 3), _pick(gen, 1, 3, 4), _pick(gen, 4, 6, 10)) if hidden else (2, 2, 8)
    s = _pick(gen, 1, 5, 9) if hidden else 4
    t = s + (_pick(gen, 0, 3) if hidden else 3)  # visible too: queries after a cached prefix
    return b, h, s, t, d


def _sdpa_args(gen, hidden):
    b, h, s, t, d = _qkv(gen, hidden)
    return _randn(gen, b, h, s, d), _randn(gen, b, h, t, d), _randn(gen, b, h, t, d)


def _sdpa_ref(q, k, v):
    return attention.scaled_dot_product_attention(q, k, v, is_causal=True)


def _cache_args(gen, hidden):
    b, h, s, _, d = _qkv(gen, hidden)
    max_len = s + _pick(gen, 3, 6, 11)
    start = int(torch.randint(max_len - s + 1, (1,), generator=gen))
    cache_k, cache_v = _randn(gen, b, h, max_len, d), _randn(gen, b, h, max_len, d)  # old contents
    return cache_k, cache_v, _randn(gen, b, h, s, d), _randn(gen, b, h, s, d), start


def _cache_ref(cache_k, cache_v, k_new, v_new, start_pos):
    b, h, max_len, d = cache_k.shape
    cache = attention.KVCache(b, h, max_len, d)
    cache.k, cache.v = cache_k, cache_v  # the cache writes into these very tensors
    return cache.update(k_new, v_new, start_pos)


def _decode_args(gen, hidden):
    b, h, _, _, d = _qkv(gen, hidden)
    max_len = _pick(gen, 4, 7, 12) if hidden else 6
    pos = int(torch.randint(max_len, (1,), generator=gen))
    return (_randn(gen, b, h, 1, d), _randn(gen, b, h, 1, d), _randn(gen, b, h, 1, d),
            _randn(gen, b, h, max_len, d), _randn(gen, b, h, max_len, d), pos)


def _decode_ref(q, k_new, v_new, cache_k, cache_v, pos):
    k, v = _cache_ref(cache_k, cache_v, k_new, v_new, pos)
    return attention.scaled_dot_product_attention(q, k, v, is_causal=True)


# ---------------------------------------------------------------------------------------------------- RoPE
def _rope_args(gen, hidden):
    b, h, s = (_pick(gen, 1, 2), _pick(gen, 1, 3), _pick(gen, 1, 5, 7)) if hidden else (1, 2, 4)
    d = _pick(gen, 2, 6, 10) if hidden else 8
    start = _pick(gen, 0, 17, 1000) if hidden else 0
    base = _pick(gen, 10000.0, 500.0) if hidden else 10000.0
    positions = torch.arange(start, start + s)
    cos, sin = rope.RotaryEmbedding(d, base)(positions)
    return _randn(gen, b, h, s, d), cos, sin


def _rope_ref(x, cos, sin):
    return rope.apply_rope(x, cos, sin, interleaved=True)


def _yarn(gen, hidden, kind) -> RopeScaling:
    """DeepSeek-V3's rope_scaling (factor 40 over 4096 positions), V2's (mscale 0.707), a short original context
    (the ramp clamped at pair 0), or no temperature on the softmax (mscale_all_dim 0)."""
    factor = _pick(gen, 4.0, 16.0, 40.0) if hidden else 40.0
    if kind == "v2":
        return RopeScaling("yarn", factor, 4096 if not hidden else _pick(gen, 2048, 4096), 32.0, 1.0, 0.707, 0.707)
    if kind == "short":
        return RopeScaling("yarn", factor, _pick(gen, 8, 16) if hidden else 16, 32.0, 1.0, 1.0, 1.0)
    if kind == "no temperature":
        return RopeScaling("yarn", factor, _pick(gen, 1024, 4096), _pick(gen, 32.0, 16.0), 1.0, 1.0, 0.0)
    return RopeScaling("yarn", factor, _pick(gen, 4096, 8192) if hidden else 4096, 32.0, 1.0, 1.0, 1.0)


def _yarn_freq_args(gen, hidden):
    kind = _kind(gen, ("v3", "short", "v2") if hidden else ("v3", "short"))
    dim = _pick(gen, 16, 32, 128) if hidden else 64
    return dim, _pick(gen, 10000.0, 50000.0) if hidden else 10000.0, _yarn(gen, hidden, kind)


def _yarn_freq_ref(dim, base, scaling):
    return rope.rope_inv_freq(dim, base, scaling)


def _yarn_scale_args(gen, hidden):
    kind = _kind(gen, ("v3", "no temperature", "v2") if hidden else ("v3", "v2"))
    return _pick(gen, 96, 128, 64) if hidden else 192, _yarn(gen, hidden, kind)


def _yarn_scale_ref(qk_head_dim, scaling):
    return rope.softmax_scale(qk_head_dim, scaling)


YARN_FORBIDDEN = tuple(f"refimpl.rope.{f}" for f in (
    "rope_inv_freq", "softmax_scale", "yarn_get_mscale", "_yarn_correction_dim", "rope_attention_factor"))


# ---------------------------------------------------------------------------------------------------- MLA
def _mla_module(gen, hidden) -> MultiHeadLatentAttention:
    if hidden:
        config = ModelConfig(vocab_size=32, hidden_size=_pick(gen, 16, 24), num_hidden_layers=1,
                             num_attention_heads=_pick(gen, 1, 2, 3), intermediate_size=32,
                             q_lora_rank=_pick(gen, None, 12), kv_lora_rank=_pick(gen, 5, 8, 12),
                             qk_nope_head_dim=_pick(gen, 3, 4, 8), qk_rope_head_dim=_pick(gen, 2, 4, 6),
                             v_head_dim=_pick(gen, 3, 5, 8), rope_interleave=True)
    else:
        config = ModelConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, q_lora_rank=12, kv_lora_rank=8, qk_nope_head_dim=4,
                             qk_rope_head_dim=4, v_head_dim=4, rope_interleave=True)
    return _randomize(MultiHeadLatentAttention(config), gen).eval()


def _mla_latents_args(gen, hidden):
    attn = _mla_module(gen, hidden)
    b, s = (_pick(gen, 1, 2), _pick(gen, 1, 3, 6)) if hidden else (2, 3)
    start = _kind(gen, (5, 0, 17) if hidden else (0, 3))  # positions after a cached prefix, or from 0
    return attn, _randn(gen, b, s, attn.hidden_size), start


@torch.no_grad()
def _mla_latents_ref(attn, hidden_states, start_pos):
    seq = hidden_states.shape[1]
    cos, sin = attn.rotary_emb(torch.arange(start_pos, start_pos + seq))
    return attn._latents(hidden_states, cos, sin)


def _mla_decompress_args(gen, hidden):
    attn = _mla_module(gen, hidden)
    b, t = (_pick(gen, 1, 2), _pick(gen, 1, 4, 7)) if hidden else (2, 3)
    return attn, _randn(gen, b, t, attn.kv_lora_rank)


@torch.no_grad()
def _mla_decompress_ref(attn, c_kv):
    batch, kv_len, _ = c_kv.shape
    kv = attn.kv_b_proj(c_kv).view(batch, kv_len, attn.num_heads, -1).transpose(1, 2)
    k_nope, v = kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
    return k_nope, v


# A long cache of a wide model (128 heads of 256 + 256 dims over a rank-128 latent): decompressing it, the naive
# way, needs kv_len * 128 * 512 * 4 bytes (1 GiB visible, 4 GiB hidden: over the sandbox's 3 GiB), while the
# absorbed path needs a few MiB above the cache itself. MLA_BUDGET_MB is the limit per call.
MLA_LONG = ModelConfig(vocab_size=32, hidden_size=128, num_hidden_layers=1, num_attention_heads=128,
                       intermediate_size=32, q_lora_rank=None, kv_lora_rank=128, qk_nope_head_dim=256,
                       qk_rope_head_dim=32, v_head_dim=256, rope_interleave=True)
MLA_BUDGET_MB = 512
MLA_RULE = ("the absorbed way (W^UK folded into the query, W^UV applied after the weighted sum of latents) fits "
            "in that, while decompressing the cache into per-head keys and values does not")


def _mla_absorbed_args(gen, hidden):
    if _kind(gen, ("long", "small", "long") if hidden else ("small", "long")) == "long":
        attn = _randomize(MultiHeadLatentAttention(MLA_LONG), gen).eval().requires_grad_(False)  # no graph kept
        b, s, t = 1, 1, (16384 if hidden else 4096)  # one decode step over a long cache
    else:
        attn = _mla_module(gen, hidden)
        b, s = (_pick(gen, 1, 2), _pick(gen, 1, 3)) if hidden else (2, 2)
        t = s + (_pick(gen, 0, 4) if hidden else 2)
    h = attn.num_heads
    return (attn, _randn(gen, b, h, s, attn.qk_nope_head_dim), _randn(gen, b, h, s, attn.qk_rope_head_dim),
            _randn(gen, b, t, attn.kv_lora_rank), _randn(gen, b, t, attn.qk_rope_head_dim))


@torch.no_grad()
def _mla_absorbed_ref(attn, q_nope, q_pe, c_kv, k_pe):
    mask = decoder_mask(None, q_nope.shape[2], c_kv.shape[1])  # causal, the queries are the last positions
    return attn._attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)  # equal to _attend_naive (tests/test_mla.py)


MLA_FORBIDDEN = tuple(f"refimpl.mla.MultiHeadLatentAttention.{m}"
                      for m in ("forward", "_latents", "_attend_naive", "_attend_absorbed")) + SDPA_EQUIVALENTS


# ---------------------------------------------------------------------------------------------------- MoE
def _moe_config(gen, hidden, **changes) -> ModelConfig:
    n_group = _pick(gen, 1, 2, 4) if hidden else 2
    experts = n_group * (_pick(gen, 3, 4) if hidden else 4)
    fields = dict(vocab_size=32, hidden_size=_pick(gen, 8, 12) if hidden else 8, num_hidden_layers=1,
                  num_attention_heads=2, intermediate_size=16, n_routed_experts=experts,
                  num_experts_per_tok=_pick(gen, 1, 2, 3) if hidden else 2, moe_intermediate_size=6,
                  n_shared_experts=_pick(gen, 0, 1, 2) if hidden else 1, norm_topk_prob=True,
                  routed_scaling_factor=_pick(gen, 1.0, 2.5) if hidden else 1.0)
    fields.update(changes)
    return ModelConfig(**fields)


def _route_args(gen, hidden):
    norm, scale = _kind(gen, ((True, 2.5), (False, 2.5), (True, 1.0)) if hidden else ((True, 2.5), (False, 2.5)))
    config = _moe_config(gen, hidden, norm_topk_prob=norm, routed_scaling_factor=scale)
    gate = _randomize(moe.Router(config), gen, scale=1.0)
    return gate, _randn(gen, _pick(gen, 1, 5, 9) if hidden else 6, config.hidden_size)


def _group_route_args(gen, hidden):
    n_group = _pick(gen, 2, 4) if hidden else 4
    config = _moe_config(gen, hidden, n_routed_experts=n_group * (_pick(gen, 2, 3) if hidden else 2),
                         num_experts_per_tok=2, n_group=n_group, topk_group=_pick(gen, 1, 2) if hidden else 2,
                         scoring_func="sigmoid", topk_method="noaux_tc",
                         routed_scaling_factor=_kind(gen, (2.5, 1.0, 2.5)) if hidden else 2.5)
    gate = _randomize(moe.Router(config), gen, scale=1.0)
    gate.e_score_correction_bias.copy_(_randn(gen, config.n_routed_experts, scale=0.3))
    return gate, _randn(gen, _pick(gen, 1, 5, 9) if hidden else 6, config.hidden_size)


@torch.no_grad()
def _route_ref(gate, x):
    routing = gate(x)
    return routing.topk_idx, routing.topk_weight


def _by_expert(result):
    """Order each token's (expert, weight) pairs by expert id: the order top-k returns them in is free."""
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(r, torch.Tensor)
                                                                          for r in result)):
        return result
    idx, weight = result
    if idx.shape != weight.shape or idx.dim() != 2 or idx.dtype != torch.int64:
        return result
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), weight.gather(1, order)


def _in_answer_order(answer, expected) -> tuple:
    """(answer, expected) for the learner's message: where each token's experts are the expected ones, the
    expected weights in the answer's order (a wrong weight is reported where the learner put it); otherwise
    both ordered by expert id."""
    a, e = _by_expert(answer), _by_expert(expected)
    if a is answer or not torch.equal(a[0], e[0]):
        return a, e
    slot = answer[0].argsort(dim=-1).argsort(dim=-1)  # where each of the answer's experts sits once sorted
    return answer, (e[0].gather(1, slot), e[1].gather(1, slot))


# Many experts, each wide: running every routed expert on every token needs a [tokens, moe_intermediate_size]
# activation per expert (4096 x 8192 float32: 128 MiB, one fresh allocation), twice the 64 MiB budget of a call,
# while running each on its own tokens needs [64, 8192] per expert (2 MiB; measured: at most 32 MiB in all in a
# fresh process with 16 threads, 16 MiB with one thread as in the sandbox). The routing is exactly balanced (64
# rows per expert): expert centroids spread on a circle, each token between two neighbours, at every seed.
MOE_MANY = dict(hidden_size=4, n_routed_experts=128, num_experts_per_tok=2, moe_intermediate_size=8192,
                n_shared_experts=0, n_group=1, topk_group=1)
MOE_BUDGET_MB = 64
MOE_RULE = ("running each routed expert on its own tokens fits in that, while running every expert on every token "
            "(then masking or weighting the unchosen ones by 0) does not")


def _moe_many(gen, hidden) -> tuple:
    config = _moe_config(gen, hidden, **MOE_MANY)
    layer = _randomize(moe.DeepSeekMoE(config), gen).eval().requires_grad_(False)  # no autograd graph kept
    experts, tokens = config.n_routed_experts, 4096
    slot = torch.randperm(experts, generator=gen)  # expert e sits at angle 2 pi slot[e] / experts
    angle = 2 * torch.pi * slot.double() / experts
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[:, 0], layer.gate.weight[:, 1] = 3000 * angle.cos(), 3000 * angle.sin()
    # token t a quarter step past slot t % experts: its top-2 are that slot's expert and the next one
    position = 2 * torch.pi * ((torch.randperm(tokens, generator=gen) % experts).double() + 0.25) / experts
    x = torch.stack((position.cos(), position.sin()), -1).float()
    x = torch.cat((x, _randn(gen, tokens, config.hidden_size - 2)), -1)  # the gate does not read the rest
    b = _pick(gen, 1, 2) if hidden else 1
    return layer, x.view(b, tokens // b, config.hidden_size)


def _moe_args(gen, hidden):
    kind = _kind(gen, ("dormant", "softmax", "many experts") if hidden else ("softmax", "dormant", "many experts"))
    if kind == "many experts":
        return _moe_many(gen, hidden)
    shared = _pick(gen, 1, 2) if hidden else 1  # shared experts here; none in the many-experts case
    if kind == "softmax":  # V2's router
        config = _moe_config(gen, hidden, n_shared_experts=shared)
        layer = _randomize(moe.DeepSeekMoE(config), gen).eval()
    else:  # V3's router, and one expert no token is routed to, whose output overflows to inf: an answer that
        # runs every expert on every token (and weighs the unchosen ones by 0) gets NaN (0 * inf)
        config = _moe_config(gen, hidden, n_group=1, topk_group=1, scoring_func="sigmoid",
                             topk_method="noaux_tc", n_shared_experts=shared)
        layer = _randomize(moe.DeepSeekMoE(config), gen).eval()
        dormant = int(torch.randint(config.n_routed_experts, (1,), generator=gen))
        with torch.no_grad():
            layer.gate.e_score_correction_bias.copy_(_randn(gen, config.n_routed_experts, scale=0.1))
            layer.gate.e_score_correction_bias[dormant] = -1e4  # never chosen
            for p in layer.experts[dormant].parameters():
                p.mul_(1e15)  # its output overflows float32 on any token
    b, s = (_pick(gen, 1, 2), _pick(gen, 1, 4)) if hidden else (2, 3)
    return layer, _randn(gen, b, s, config.hidden_size)


@torch.no_grad()
def _moe_ref(layer, hidden_states):
    return layer(hidden_states)


def _bias_args(gen, hidden):
    experts = _pick(gen, 3, 8, 10) if hidden else 8
    mean = int(torch.randint(1, 6, (1,), generator=gen))
    pairs = torch.randint(1, mean + 1, ((experts - 1) // 2,), generator=gen)  # loads mean +- d
    at_mean = torch.zeros(experts - 2 * len(pairs), dtype=torch.int64)  # at least one expert exactly at the mean
    load = (mean + torch.cat((pairs, -pairs, at_mean)))[torch.randperm(experts, generator=gen)].float()
    gamma = _pick(gen, 0.001, 0.01, 0.1) if hidden else 0.01
    return _randn(gen, experts, scale=0.1), load, gamma


def _bias_ref(bias, load, gamma):
    return moe.update_bias(bias, load, gamma)


# ---------------------------------------------------------------------------------------------------- accounting
ACCOUNTING_VISIBLE = {  # each branch of the statement: MLA with q_lora and noaux_tc (V3), GQA (Llama), tied
    "dense": "Llama-3-8B",
    "mla": "DeepSeek-V3",
    "mla tied": ModelConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=512, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
                            qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
                            num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1,
                            tie_word_embeddings=True),
    "dense tied": ModelConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=True,
                              attention_bias=True),
}


def _config_args(gen, hidden):
    kind = _kind(gen, ("mla", "dense tied", "mla tied", "dense"))
    if not hidden:
        config = ACCOUNTING_VISIBLE[kind]
        return (load_known(config) if isinstance(config, str) else config,)
    tied = kind.endswith("tied")
    if kind.startswith("dense"):  # GQA, MQA or MHA
        heads = _pick(gen, 8, 12, 32)
        return (ModelConfig(vocab_size=_pick(gen, 1000, 32000), hidden_size=heads * 64,
                            num_hidden_layers=_pick(gen, 2, 7, 30), num_attention_heads=heads,
                            num_key_value_heads=_pick(gen, 1, 4, heads), intermediate_size=_pick(gen, 1000, 3000),
                            tie_word_embeddings=tied, attention_bias=tied),)
    n_group = _pick(gen, 1, 4)
    return (ModelConfig(vocab_size=_pick(gen, 1000, 50000), hidden_size=_pick(gen, 512, 1024),
                        num_hidden_layers=_pick(gen, 3, 9), num_attention_heads=_pick(gen, 4, 16),
                        intermediate_size=_pick(gen, 1000, 4000), q_lora_rank=None if tied else 192,
                        kv_lora_rank=_pick(gen, 64, 128), qk_nope_head_dim=_pick(gen, 32, 64),
                        qk_rope_head_dim=_pick(gen, 16, 32), v_head_dim=_pick(gen, 32, 64),
                        n_routed_experts=n_group * _pick(gen, 4, 8), n_shared_experts=_pick(gen, 0, 1, 2),
                        num_experts_per_tok=_pick(gen, 2, 4), moe_intermediate_size=_pick(gen, 128, 256),
                        n_group=n_group, topk_group=1, first_k_dense_replace=_pick(gen, 0, 1, 2),
                        topk_method="greedy" if tied else "noaux_tc", scoring_func="sigmoid",
                        tie_word_embeddings=tied),)


def _kv_bytes_args(gen, hidden):
    return _config_args(gen, hidden) + (_pick(gen, 1, 2, 4) if hidden else 2,)


def _kv_bytes_ref(config, bytes_per_element):
    return accounting.kv_cache_bytes_per_token(config, bytes_per_element)


def _activated_ref(config):
    return accounting.param_counts(config).activated


ACCOUNTING_FORBIDDEN = tuple(f"refimpl.accounting.{f}" for f in (
    "param_counts", "attention_params", "ffn_params", "decoder_layer_params", "kv_cache_elements_per_token",
    "kv_cache_bytes_per_token", "kv_cache_bytes", "summary", "flops_per_token"))


# ---------------------------------------------------------------------------------------------------- kernels
def _softmax_args(gen, hidden):
    """Widths that are not powers of two (a row stride of BLOCK, or a missing column mask, reads the wrong
    values), large logits (exp overflows without the max subtracted) and all-negative ones (a masked lane
    loaded as 0.0 becomes the max and adds to the sum)."""
    kind = _kind(gen, ("large", "negative", "power of two") if hidden else ("large", "negative"))
    rows = _pick(gen, 2, 3, 7) if hidden else 3
    if kind == "large":
        return (_randn(gen, rows, _pick(gen, 5, 33, 100) if hidden else 20, scale=100.0),)
    if kind == "negative":
        return (_randn(gen, rows, _pick(gen, 3, 7, 47) if hidden else 7) - 4.0,)
    return (_randn(gen, rows, _pick(gen, 1, 16, 64), scale=100.0),)


def _softmax_ref(x):
    return torch.softmax(x.double(), dim=-1).to(x.dtype)  # float64 then rounded: the most exact answer


def _decode_block_args(gen, hidden):
    # kv_len not a multiple of BLOCK_T = 8 (the last block needs its mask), shorter than one block, or a multiple
    kind = _kind(gen, ("tail", "short", "multiple") if hidden else ("tail", "short"))
    t = {"tail": _pick(gen, 9, 13, 30) if hidden else 13, "short": _pick(gen, 1, 3, 7) if hidden else 5,
         "multiple": _pick(gen, 8, 16, 24)}[kind]
    b, h = (_pick(gen, 1, 2), _pick(gen, 1, 3)) if hidden else (1, 2)
    r, dr = (_pick(gen, 8, 16), _pick(gen, 4, 8)) if hidden else (16, 8)
    scale = (24 ** -0.5)
    return (_randn(gen, b, h, r), _randn(gen, b, h, dr), _randn(gen, b, t, r), _randn(gen, b, t, dr), scale)


def _decode_block_ref(q_latent, q_pe, c_kv, k_pe, scale):
    h = q_latent.shape[1]
    q = torch.cat((q_latent, q_pe), dim=-1)[:, :, None, :]  # [b, h, 1, r + dr]
    k = torch.cat((c_kv, k_pe), dim=-1)[:, None].expand(-1, h, -1, -1)  # one latent key for every head
    v = c_kv[:, None].expand(-1, h, -1, -1)  # the values are the latents themselves
    return attention.scaled_dot_product_attention(q, k, v, scale=scale)[:, :, 0]  # [b, h, r]


# ---------------------------------------------------------------------------------------------------- 07: GQA, split-KV
# Exercise 07 (lessons 04 and 16): grouped-query attention over a cache, and merging split-KV partial results.
def _gqa_args(gen, hidden):
    kind = _kind(gen, ("gqa", "mqa", "gqa wide") if hidden else ("gqa", "gqa wide"))
    kv_heads = {"gqa": 2, "mqa": 1, "gqa wide": 3}[kind]
    group = _pick(gen, 2, 3) if hidden else 2  # query heads per key/value head
    b, s, d = (_pick(gen, 1, 2), _pick(gen, 1, 3, 5), _pick(gen, 4, 8)) if hidden else (2, 3, 8)
    t = s + (_pick(gen, 0, 2, 6) if hidden else 4)  # queries after a cached prefix
    return (_randn(gen, b, kv_heads * group, s, d), _randn(gen, b, kv_heads, t, d),
            _randn(gen, b, kv_heads, t, d))


def _gqa_ref(q, k, v):
    group = q.shape[1] // k.shape[1]
    return attention.scaled_dot_product_attention(q, attention.repeat_kv(k, group), attention.repeat_kv(v, group),
                                                  is_causal=True)


def _split_args(gen, hidden):
    """Partial results of one query per head over the splits of a cache: outs [splits, b, h, d] (each split's
    softmax-weighted values) and lses [splits, b, h] (log-sum-exp of its scaled scores; -inf for an empty split).
    Kinds: large scores (exp(lse) overflows float32), an empty split, ordinary."""
    kind = _kind(gen, ("large", "empty", "plain") if hidden else ("plain", "large"))
    b, h, d = (_pick(gen, 1, 2), _pick(gen, 1, 3), _pick(gen, 4, 8)) if hidden else (2, 2, 8)
    sizes = [int(n) for n in torch.randint(1, 6, (_pick(gen, 2, 3, 4) if hidden else 3,), generator=gen)]
    if kind == "empty":
        sizes[int(torch.randint(len(sizes), (1,), generator=gen))] = 0
    q = _randn(gen, b, h, d, scale=100.0 if kind == "large" else 1.0).double()
    k, v = _randn(gen, b, h, sum(sizes), d).double(), _randn(gen, b, h, sum(sizes), d).double()
    scores = torch.einsum("bhd,bhtd->bht", q, k) * d ** -0.5
    outs, lses = [], []
    for score, value in zip(scores.split(sizes, dim=-1), v.split(sizes, dim=-2)):
        lses.append(score.logsumexp(dim=-1))  # -inf when empty
        outs.append(torch.einsum("bht,bhtd->bhd", score.softmax(dim=-1), value) if score.shape[-1]
                    else torch.zeros(b, h, d, dtype=torch.float64))
    return torch.stack(outs).float(), torch.stack(lses).float()


def _split_ref(outs, lses):
    """The attention output over the whole cache, from the splits (FlashDecoding): weights exp(lse_i - max)."""
    outs, lses = outs.double(), lses.double()
    weights = (lses - lses.max(dim=0).values).exp()  # [splits, b, h]; 0 for an empty split
    return ((weights[..., None] * outs).sum(0) / weights.sum(0)[..., None]).float()


SPLITKV_QUESTIONS = [
    Question("gqa_attention", ("q", "k", "v"), _gqa_args, _gqa_ref, SDPA_EQUIVALENTS, routes=ATTENTION_ROUTES),
    Question("merge_splits", ("outs", "lses"), _split_args, _split_ref, (), atol=1e-5, rtol=1e-4),
]


# ---------------------------------------------------------------------------------------------------- 10: balance, dispatch
# Exercise 10 (lessons 10, 17, 18): V2's and V3's balance losses, aligning tokens to experts for a grouped GEMM,
# and the bytes an expert-parallel dispatch sends.
def _routing(gen, tokens, experts, k, sigmoid):
    logits = _randn(gen, tokens, experts, scale=2.0)
    scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    return scores, scores.topk(k, dim=-1).indices  # [tokens, E], [tokens, k] int64


def _expert_loss_args(gen, hidden):
    kind = _kind(gen, ("top-k", "top-1", "few tokens") if hidden else ("top-k", "few tokens"))
    experts = _pick(gen, 4, 6, 8) if hidden else 6
    tokens = {"top-k": _pick(gen, 7, 12), "top-1": _pick(gen, 5, 9), "few tokens": _pick(gen, 2, 3)}[kind] \
        if hidden else {"top-k": 10, "few tokens": 3}[kind]
    k = 1 if kind == "top-1" else _pick(gen, 2, 3) if hidden else 2
    scores, topk_idx = _routing(gen, tokens, experts, k, sigmoid=False)
    return scores, topk_idx, experts, _pick(gen, 0.1, 0.03) if hidden else 0.1


def _expert_loss_ref(scores, topk_idx, n_routed_experts, alpha):
    return float(moe.expert_balance_loss(scores.double(), topk_idx, n_routed_experts, alpha))


def _sequence_loss_args(gen, hidden):
    kind = _kind(gen, ("batch", "one sequence", "batch top-1") if hidden else ("batch", "batch top-1"))
    batch = 1 if kind == "one sequence" else _pick(gen, 2, 3) if hidden else 2
    seq, experts = (_pick(gen, 3, 5), _pick(gen, 4, 8)) if hidden else (4, 6)
    k = 1 if kind == "batch top-1" else 2
    scores, topk_idx = _routing(gen, batch * seq, experts, k, sigmoid=True)  # V3's sigmoid affinities
    return scores, topk_idx, experts, _pick(gen, 0.1, 0.03) if hidden else 0.1, batch, seq


def _sequence_loss_ref(scores, topk_idx, n_routed_experts, alpha, batch_size, seq_len):
    return float(moe.sequence_balance_loss(scores.double(), topk_idx, n_routed_experts, alpha, batch_size, seq_len))


def _align_args(gen, hidden):
    kind = _kind(gen, ("idle expert", "full blocks", "plain") if hidden else ("idle expert", "plain"))
    experts, k = (_pick(gen, 4, 6), _pick(gen, 1, 2)) if hidden else (5, 2)
    block_m = _pick(gen, 2, 4) if hidden else 4
    tokens = _pick(gen, 5, 9) if hidden else 6
    topk_idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
    if kind == "idle expert":  # one expert no pair goes to: it gets no block
        idle = int(torch.randint(experts, (1,), generator=gen))
        topk_idx = torch.stack([torch.randperm(experts - 1, generator=gen)[:k] for _ in range(tokens)])
        topk_idx = topk_idx + (topk_idx >= idle).long()  # ids skip `idle`
    elif kind == "full blocks":  # every expert's run exactly a multiple of block_m: no padding
        k, tokens = 1, experts * block_m
        topk_idx = torch.arange(experts).repeat_interleave(block_m)[torch.randperm(tokens, generator=gen)][:, None]
    return topk_idx, experts, block_m


def _align_ref(topk_idx, n_experts, block_m):
    from dskernels.moe import align_to_experts

    return align_to_experts(topk_idx, n_experts, block_m)


def _dispatch_args(gen, hidden):
    kind = _kind(gen, ("same rank twice", "uneven", "plain") if hidden else ("same rank twice", "uneven"))
    world = _pick(gen, 2, 4) if hidden else 4
    experts_per_rank = _pick(gen, 2, 3) if hidden else 2
    tokens_per_rank = [int(n) for n in torch.randint(1, 5, (world,), generator=gen)] if kind == "uneven" \
        else [3] * world
    k = 2 if kind != "plain" else _pick(gen, 1, 3)
    experts = world * experts_per_rank
    topk_idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(sum(tokens_per_rank))])
    if kind == "same rank twice":  # a token's two experts on one rank: its row is sent there once
        rank = topk_idx[:, 0] // experts_per_rank
        topk_idx[:, 1] = rank * experts_per_rank + (topk_idx[:, 0] + 1) % experts_per_rank
    return topk_idx, tokens_per_rank, experts_per_rank, _pick(gen, 7168 * 2, 4096) if hidden else 7168


def _dispatch_ref(topk_idx, tokens_per_rank, experts_per_rank, row_bytes):
    from refimpl.expert_parallel import traffic_formula

    return traffic_formula(topk_idx, tokens_per_rank, experts_per_rank, row_bytes)[0]


BALANCE_QUESTIONS = [
    Question("expert_balance_loss", ("scores", "topk_idx", "n_routed_experts", "alpha"), _expert_loss_args,
             _expert_loss_ref, ("refimpl.moe.expert_balance_loss", "refimpl.moe.sequence_balance_loss"),
             atol=1e-7, rtol=1e-5),
    Question("sequence_balance_loss", ("scores", "topk_idx", "n_routed_experts", "alpha", "batch_size", "seq_len"),
             _sequence_loss_args, _sequence_loss_ref,
             ("refimpl.moe.expert_balance_loss", "refimpl.moe.sequence_balance_loss"), atol=1e-7, rtol=1e-5),
    Question("align_to_experts", ("topk_idx", "n_experts", "block_m"), _align_args, _align_ref, ()),
    Question("dispatch_bytes", ("topk_idx", "tokens_per_rank", "experts_per_rank", "row_bytes"), _dispatch_args,
             _dispatch_ref, ("refimpl.expert_parallel.traffic_formula",)),
]


# ---------------------------------------------------------------------------------------------------- mistakes
# The references computed with a common mistake (Question.mistakes): an answer equal to one is told which mistake
# it made. Each takes the question's arguments; tests/test_exercise_mutants.py checks that each fails the visible
# check and loses hidden points.
def _top_left(q, k, v):
    s, t = q.shape[-2], k.shape[-2]
    mask = torch.ones(s, t, dtype=torch.bool).tril()[None, None]  # the first query sees the first key only
    return attention.scaled_dot_product_attention(q, k, v, mask=mask)


def _sdpa_no_scale(q, k, v):
    return attention.scaled_dot_product_attention(q, k, v, scale=1.0, is_causal=True)


def _decode_whole_cache(q, k_new, v_new, cache_k, cache_v, pos):
    k, v = cache_k.clone(), cache_v.clone()
    k[:, :, pos:pos + 1], v[:, :, pos:pos + 1] = k_new, v_new
    cache_k.copy_(k), cache_v.copy_(v)
    return attention.scaled_dot_product_attention(q, k, v)  # attends past pos too: stale or empty slots


def _rope_half_split(x, cos, sin):
    return rope.apply_rope(x, cos, sin, interleaved=False)


@torch.no_grad()
def _latents_from_zero(attn, hidden_states, start_pos):
    return _mla_latents_ref(attn, hidden_states, 0)


@torch.no_grad()
def _latents_half_split(attn, hidden_states, start_pos):
    attn = copy.copy(attn)
    attn.rope_interleave = False
    return _mla_latents_ref(attn, hidden_states, start_pos)


@torch.no_grad()
def _latents_not_normalized(attn, hidden_states, start_pos):
    attn = copy.copy(attn)
    attn._modules = {**attn._modules, "kv_a_layernorm": torch.nn.Identity()}  # the copy's own: attn keeps its norm
    return _mla_latents_ref(attn, hidden_states, start_pos)


@torch.no_grad()
def _absorbed_no_scale(attn, q_nope, q_pe, c_kv, k_pe):
    attn = copy.copy(attn)
    attn.softmax_scale = 1.0
    return _mla_absorbed_ref(attn, q_nope, q_pe, c_kv, k_pe)


@torch.no_grad()
def _absorbed_top_left(attn, q_nope, q_pe, c_kv, k_pe):
    mask = torch.ones(q_nope.shape[2], c_kv.shape[1], dtype=torch.bool).tril()[None, None]
    return attn._attend_absorbed(q_nope, q_pe, c_kv, k_pe, mask)


@torch.no_grad()
def _route_unscaled(gate, x):
    idx, weight = _route_ref(gate, x)
    return idx, weight / gate.routed_scaling_factor


@torch.no_grad()
def _route_always_normalized(gate, x):
    idx, weight = _route_unscaled(gate, x)
    return idx, weight / weight.sum(-1, keepdim=True) * gate.routed_scaling_factor


@torch.no_grad()
def _route_biased_weights(gate, x):
    idx, _ = _route_ref(gate, x)
    choice = (x @ gate.weight.T).sigmoid() + gate.e_score_correction_bias
    weight = choice.gather(1, idx)
    return idx, weight / weight.sum(-1, keepdim=True) * gate.routed_scaling_factor


@torch.no_grad()
def _moe_dense(layer, hidden_states):
    x = hidden_states.flatten(0, 1)  # [tokens, hidden]
    routing = layer.gate(x)
    weights = torch.zeros(x.shape[0], len(layer.experts)).scatter(1, routing.topk_idx, routing.topk_weight)
    out = sum(weights[:, e, None] * expert(x) for e, expert in enumerate(layer.experts))
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x)
    return out.view(hidden_states.shape)


def _bias_moves_mean(bias, load, gamma):
    bias += gamma * torch.where(load < load.mean(), 1.0, -1.0)
    return bias


def _bias_reversed(bias, load, gamma):
    bias += gamma * torch.sign(load - load.mean())  # raises the overloaded: they get chosen more still
    return bias


def _kv_bytes_no_rope_key(config, bytes_per_element):
    rope_key = config.qk_rope_head_dim if config.kv_lora_rank is not None else 0
    return _kv_bytes_ref(config, bytes_per_element) - rope_key * config.num_hidden_layers * bytes_per_element


def _kv_bytes_dense(config, bytes_per_element):
    head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim if config.kv_lora_rank else config.head_dim
    per_layer = 2 * config.num_key_value_heads * head_dim  # a key and a value per head
    return per_layer * config.num_hidden_layers * bytes_per_element


def _moe_layers(config) -> int:
    return sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))


def _activated_no_router_bias(config):
    bias = config.n_routed_experts * _moe_layers(config) if config.topk_method == "noaux_tc" else 0
    return _activated_ref(config) - bias


def _activated_head_twice(config):
    tied = config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0
    return _activated_ref(config) + tied


def _activated_no_q_norm(config):
    norm = config.q_lora_rank if config.kv_lora_rank is not None and config.q_lora_rank else 0
    return _activated_ref(config) - norm * config.num_hidden_layers


def _softmax_no_max(x):
    e = x.exp()
    return e / e.sum(-1, keepdim=True)


def _softmax_zero_lanes(x):
    cols = x.shape[1]
    padded = torch.nn.functional.pad(x, (0, (1 << max(cols - 1, 0).bit_length()) - cols))  # lanes of 0.0
    e = (padded - padded.max(-1, keepdim=True).values).exp()
    return (e / e.sum(-1, keepdim=True))[:, :cols]


def _decode_block_no_tail_mask(q_latent, q_pe, c_kv, k_pe, scale):
    pad = -c_kv.shape[1] % 8  # the loop's last block of BLOCK_T = 8, its missing rows scored as 0
    c_kv, k_pe = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (c_kv, k_pe))
    return _decode_block_ref(q_latent, q_pe, c_kv, k_pe, scale)


def _decode_block_no_scale(q_latent, q_pe, c_kv, k_pe, scale):
    return _decode_block_ref(q_latent, q_pe, c_kv, k_pe, 1.0)


def _gqa_tiled(q, k, v):
    group = q.shape[1] // k.shape[1]
    return attention.scaled_dot_product_attention(q, k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1),
                                                  is_causal=True)


def _gqa_top_left(q, k, v):
    group = q.shape[1] // k.shape[1]
    return _top_left(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))


def _expert_loss_unnormalized_f(scores, topk_idx, n_routed_experts, alpha):
    f = torch.bincount(topk_idx.flatten(), minlength=n_routed_experts).double() / topk_idx.shape[0]
    return float(alpha * (f * scores.double().mean(0)).sum())  # f_i without N' / K'


def _sequence_loss_unnormalized(scores, topk_idx, n_routed_experts, alpha, batch_size, seq_len):
    per_sequence = zip(scores.double().view(batch_size, seq_len, -1), topk_idx.view(batch_size, seq_len, -1))
    return float(sum(moe.expert_balance_loss(s, i, n_routed_experts, alpha) for s, i in per_sequence)) / batch_size


def _sequence_loss_whole_batch(scores, topk_idx, n_routed_experts, alpha, batch_size, seq_len):
    normalized = scores.double() / scores.double().sum(-1, keepdim=True)
    return float(moe.expert_balance_loss(normalized, topk_idx, n_routed_experts, alpha))


def _align_pad_zero(topk_idx, n_experts, block_m):
    sorted_pairs, block_expert = _align_ref(topk_idx, n_experts, block_m)
    return torch.where(sorted_pairs == topk_idx.numel(), 0, sorted_pairs).int(), block_expert


def _dispatch_per_expert(topk_idx, tokens_per_rank, experts_per_rank, row_bytes):
    world = len(tokens_per_rank)
    source = torch.repeat_interleave(torch.arange(world), torch.tensor(tokens_per_rank))[:, None]
    away = (topk_idx // experts_per_rank != source).sum(-1)  # one row per expert, not per rank
    return torch.zeros(world, dtype=torch.long).index_add_(0, source[:, 0], away).mul(row_bytes).tolist()


def _dispatch_counting_self(topk_idx, tokens_per_rank, experts_per_rank, row_bytes):
    from refimpl.expert_parallel import ranks_reached

    world = len(tokens_per_rank)
    reached = ranks_reached(topk_idx, experts_per_rank, world).long().sum(-1)  # its own rank included
    source = torch.repeat_interleave(torch.arange(world), torch.tensor(tokens_per_rank))
    return torch.zeros(world, dtype=torch.long).index_add_(0, source, reached).mul(row_bytes).tolist()


def _yarn_ramp_reversed(dim, base, scaling):
    plain = rope.rope_inv_freq(dim, base)
    yarn = rope.rope_inv_freq(dim, base, scaling)
    return plain / scaling.factor + plain - yarn  # the fast pairs interpolated, the slow ones kept


def _yarn_all_interpolated(dim, base, scaling):
    return rope.rope_inv_freq(dim, base) / scaling.factor


def _yarn_scale_not_squared(qk_head_dim, scaling):
    return qk_head_dim ** -0.5 * rope.yarn_get_mscale(scaling.factor, scaling.mscale_all_dim)


def _yarn_scale_plain(qk_head_dim, scaling):
    return qk_head_dim ** -0.5


def _merge_mean(outs, lses):
    return outs.mean(dim=0)


def _merge_no_max(outs, lses):
    weights = lses.exp()  # overflows to inf for large scores: inf / inf
    return (weights[..., None] * outs).sum(0) / weights.sum(0)[..., None]


TOP_LEFT = "used a top-left causal mask: the queries are the last positions (bottom-right, after the prefix)"
NO_SCALE = "left out the softmax scale 1/sqrt(d) on the scores"
MISTAKES = {
    "causal_sdpa": ((TOP_LEFT, _top_left), (NO_SCALE, _sdpa_no_scale)),
    "decode_step": (("attended to the whole cache: positions after pos are stale or empty", _decode_whole_cache),),
    "rope_interleaved": (("rotated the two halves (Llama's layout), not DeepSeek's interleaved pairs",
                          _rope_half_split),),
    "yarn_inv_freq": (("ramped the wrong way: the fast pairs (short wavelengths) keep their frequency",
                       _yarn_ramp_reversed),
                      ("divided every frequency by factor (no ramp)", _yarn_all_interpolated)),
    "yarn_softmax_scale": (("did not square mscale: 1/sqrt(d) * mscale^2", _yarn_scale_not_squared),
                           ("left out YaRN's temperature mscale(factor, mscale_all_dim)^2", _yarn_scale_plain)),
    "mla_latents": (("ignored start_pos: the positions start after the cached prefix", _latents_from_zero),
                    ("rotated the two halves of k_pe, not interleaved pairs", _latents_half_split),
                    ("left out kv_a_layernorm: c_kv is normalized before it is cached", _latents_not_normalized)),
    "mla_absorbed": (("left out attn.softmax_scale on the scores", _absorbed_no_scale),
                     (TOP_LEFT, _absorbed_top_left)),
    "route_topk": (("left out routed_scaling_factor", _route_unscaled),
                   ("normalized the weights although norm_topk_prob is False", _route_always_normalized)),
    "route_group_limited": (("left out routed_scaling_factor", _route_unscaled),
                            ("took the weights from the biased scores: the bias only chooses the experts",
                             _route_biased_weights)),
    "moe_forward": (("ran every expert on every token: run each routed expert on its own tokens only",
                     _moe_dense),),
    "update_bias": (("moved the bias of an expert exactly at the mean load: it stays", _bias_moves_mean),
                    ("moved the biases the wrong way round: an overloaded expert's goes down by gamma",
                     _bias_reversed)),
    "kv_bytes_per_token": (("left out MLA's shared RoPE key (qk_rope_head_dim per layer)", _kv_bytes_no_rope_key),
                           ("used the MHA/GQA formula for an MLA model: MLA caches the latent", _kv_bytes_dense)),
    "activated_params": (("left out the noaux_tc router bias (n_routed_experts per MoE layer)",
                          _activated_no_router_bias),
                         ("counted the output head although it is tied to the embedding", _activated_head_twice),
                         ("left out q_a_layernorm (q_lora_rank weights per layer)", _activated_no_q_norm)),
    "softmax_rows": (("did not subtract the row max: exp overflows on large logits", _softmax_no_max),
                     ("loaded the masked lanes as 0.0: load them as -inf", _softmax_zero_lanes)),
    "mla_decode_block": (("did not mask the positions past kv_len in the last block", _decode_block_no_tail_mask),
                         ("left out the scale on the scores", _decode_block_no_scale)),
    "gqa_attention": (("repeated the key/value heads tiled (.repeat): query head i uses key/value head "
                       "i // group (repeat_interleave)", _gqa_tiled), (TOP_LEFT, _gqa_top_left)),
    "expert_balance_loss": (("left out N'/(K'T) in f_i (f_i is 1 for every expert under an even load)",
                             _expert_loss_unnormalized_f),),
    "sequence_balance_loss": (("did not normalize the sigmoid scores (s'_{i,t} = s_{i,t} / sum_j s_{j,t})",
                               _sequence_loss_unnormalized),
                              ("computed one loss over the whole batch, not per sequence", _sequence_loss_whole_batch)),
    "align_to_experts": (("padded with 0 (a real pair) instead of the sentinel T*k", _align_pad_zero),),
    "dispatch_bytes": (("sent a row per chosen expert: a token's row goes to each rank once", _dispatch_per_expert),
                       ("counted the rows a rank keeps for its own experts", _dispatch_counting_self)),
    "merge_splits": (("averaged the splits: weigh each by exp(lse_i - lse)", _merge_mean),
                     ("took exp(lse) without subtracting the max lse: it overflows", _merge_no_max)),
}


# ---------------------------------------------------------------------------------------------------- registry
# ---------------------------------------------------------------------------------------------------- parallelism
# Exercise 09 (lessons 21, 22): a pipeline schedule's bubble, and DeepSeek Sparse Attention's indexer. Hidden
# cases are stratified: consecutive case seeds cycle through every kind of case (`_kind`), so all three hidden
# cases together cover every branch at every instructor seed.
def _as_lists(order) -> list:
    """refimpl.pipeline's order {rank: [(Op, ...), ...]} -> [[[(kind, stage, microbatch), ...], ...], ...]."""
    return [[[(op.kind, op.stage, op.microbatch) for op in action] for action in order[r]]
            for r in sorted(order)]


def _bubble_args(gen, hidden):
    from refimpl import pipeline

    if not hidden:
        pp, m = (3, 5) if gen.initial_seed() % 2 else (2, 4)
        order = pipeline.pipeline_order("1F1B", pp, m) if pp == 3 else pipeline.zb1p_order(pp, m)
        return _as_lists(order), {"F": 1.0, "B": 2.0, "W": 1.0, "F&B": 2.5}
    kind = _kind(gen, ("zb1p", "dualpipev", "gpipe"))
    pp, m = _pick(gen, 2, 3, 4), _pick(gen, 4, 6, 8)
    F, W = 0.5 + float(torch.rand((), generator=gen)), 0.2 + 0.3 * float(torch.rand((), generator=gen))
    B = W + 0.5 + float(torch.rand((), generator=gen))
    durations = {"F": round(F, 3), "B": round(B, 3), "W": round(W, 3), "F&B": round(max(F, B) + 0.3, 3)}
    if kind == "zb1p":
        return _as_lists(pipeline.zb1p_order(pp, m)), durations
    if kind == "dualpipev":
        return _as_lists(pipeline.pipeline_order("DualPipeV", pp, 2 * pp + m)), durations
    return _as_lists(pipeline.pipeline_order("GPipe", pp, m)), durations


def _bubble_ref(order, durations):
    from refimpl import pipeline

    ops = {r: [tuple(pipeline.Op(*op) for op in action) for action in acts] for r, acts in enumerate(order)}
    return [float(b) for b in pipeline.bubble(pipeline.simulate(ops, durations)).values()]


def _index_args(gen, hidden):
    seq, heads, d = (_pick(gen, 1, 3, 5), _pick(gen, 2, 4), _pick(gen, 4, 8)) if hidden else (3, 2, 4)
    # queries after a cached prefix (bottom-right causal mask), visible and in two of three hidden cases
    prefix = 3 if not hidden else _pick(gen, 2, 6) if _kind(gen, ("prefix", "none", "prefix")) == "prefix" else 0
    kv_len = prefix + seq
    w = _randn(gen, seq, heads)  # weights of both signs: a ReLU applied after the weights fails
    return _randn(gen, seq, heads, d), _randn(gen, kv_len, d), w


def _index_ref(q, k, w):
    seq, kv_len = q.shape[0], k.shape[0]
    scores = torch.einsum("sh,sht->st", w, torch.relu(torch.einsum("shd,td->sht", q, k)))
    return scores.masked_fill(~decoder_mask(None, seq, kv_len)[0, 0], float("-inf"))


def _topk_args(gen, hidden):
    seq, kv_len = (_pick(gen, 2, 4), _pick(gen, 5, 9)) if hidden else (3, 6)
    scores = _randn(gen, seq, kv_len)
    kind = _kind(gen, ("ties", "clamp", "masked")) if hidden else "ties"
    if kind == "ties":  # ReLU makes exact zeros, hence ties: the earlier token wins
        scores = scores.clamp(min=0.0)
    scores = scores.masked_fill(~decoder_mask(None, seq, kv_len)[0, 0], float("-inf"))
    topk = kv_len + 3 if kind == "clamp" else _pick(gen, 2, 3) if hidden else 3
    return scores, topk


def _topk_ref(scores, topk):
    from refimpl.dsa import select_topk

    return select_topk(scores[None], topk)[0]


PARALLELISM_QUESTIONS = [
    Question("simulate_bubble", ("order", "durations"), _bubble_args, _bubble_ref,
             ("refimpl.pipeline.simulate", "refimpl.pipeline.bubble")),
    Question("index_scores", ("q", "k", "w"), _index_args, _index_ref, ("refimpl.dsa.LightningIndexer.scores",)),
    Question("select_topk", ("scores", "topk"), _topk_args, _topk_ref, ("refimpl.dsa.select_topk",)),
]


QUESTIONS = {q.name: q for q in [
    Question("causal_sdpa", ("q", "k", "v"), _sdpa_args, _sdpa_ref, SDPA_EQUIVALENTS, routes=ATTENTION_ROUTES),
    Question("kv_cache_update", ("cache_k", "cache_v", "k_new", "v_new", "start_pos"), _cache_args, _cache_ref,
             ("refimpl.attention.KVCache.update",), mutated_args=(0, 1)),
    Question("decode_step", ("q", "k_new", "v_new", "cache_k", "cache_v", "pos"), _decode_args, _decode_ref,
             ("refimpl.attention.KVCache.update",) + SDPA_EQUIVALENTS, mutated_args=(3, 4),
             routes=ATTENTION_ROUTES, depends_on=("kv_cache_update", "causal_sdpa")),
    Question("rope_interleaved", ("x", "cos", "sin"), _rope_args, _rope_ref, ("refimpl.rope.apply_rope",),
             routes=ROPE_ROUTES),
    Question("yarn_inv_freq", ("dim", "base", "scaling"), _yarn_freq_args, _yarn_freq_ref, YARN_FORBIDDEN,
             atol=1e-12, rtol=1e-9),
    Question("yarn_softmax_scale", ("qk_head_dim", "scaling"), _yarn_scale_args, _yarn_scale_ref, YARN_FORBIDDEN,
             atol=1e-12, rtol=1e-9),
    Question("mla_latents", ("attn", "hidden_states", "start_pos"), _mla_latents_args, _mla_latents_ref,
             MLA_FORBIDDEN, routes=ROPE_ROUTES),
    Question("mla_decompress", ("attn", "c_kv"), _mla_decompress_args, _mla_decompress_ref, MLA_FORBIDDEN,
             routes=ATTENTION_ROUTES),
    Question("mla_absorbed", ("attn", "q_nope", "q_pe", "c_kv", "k_pe"), _mla_absorbed_args, _mla_absorbed_ref,
             MLA_FORBIDDEN, atol=1e-4, rtol=1e-3, routes=ATTENTION_ROUTES, memory_budget_mb=MLA_BUDGET_MB,
             memory_rule=MLA_RULE, call_timeout=60.0),  # the rule is memory; a 70 MB module travels per call
    Question("route_topk", ("gate", "x"), _route_args, _route_ref,
             ("refimpl.moe.Router.forward", "refimpl.moe.Router._limit_to_groups"), canonical=_by_expert,
             align=_in_answer_order),
    Question("route_group_limited", ("gate", "x"), _group_route_args, _route_ref,
             ("refimpl.moe.Router.forward", "refimpl.moe.Router._limit_to_groups"), canonical=_by_expert,
             align=_in_answer_order),
    Question("moe_forward", ("moe", "hidden_states"), _moe_args, _moe_ref,
             tuple(f"refimpl.moe.{f}" for f in ("DeepSeekMoE.forward", "dispatch", "run_experts", "combine")),
             depends_on=("route_topk", "route_group_limited"), n_visible=3, memory_budget_mb=MOE_BUDGET_MB,
             memory_rule=MOE_RULE, call_timeout=60.0),
    Question("update_bias", ("bias", "load", "gamma"), _bias_args, _bias_ref, ("refimpl.moe.update_bias",),
             mutated_args=(0,), atol=1e-7, rtol=1e-6),
    Question("kv_bytes_per_token", ("config", "bytes_per_element"), _kv_bytes_args, _kv_bytes_ref,
             ACCOUNTING_FORBIDDEN, n_visible=4, n_hidden=4),
    Question("activated_params", ("config",), _config_args, _activated_ref, ACCOUNTING_FORBIDDEN, n_visible=4,
             n_hidden=4),
    Question("softmax_rows", ("x",), _softmax_args, _softmax_ref, SOFTMAX_EQUIVALENTS, triton=True,
             atol=1e-6, rtol=1e-5, call_timeout=60.0, routes=SOFTMAX_ROUTES),
    Question("mla_decode_block", ("q_latent", "q_pe", "c_kv", "k_pe", "scale"), _decode_block_args,
             _decode_block_ref, SOFTMAX_EQUIVALENTS + SDPA_EQUIVALENTS, triton=True, atol=1e-5, rtol=1e-4,
             call_timeout=60.0, routes=SOFTMAX_ROUTES + ATTENTION_ROUTES),
] + PARALLELISM_QUESTIONS + SPLITKV_QUESTIONS + BALANCE_QUESTIONS}
QUESTIONS.update({name: dataclasses.replace(QUESTIONS[name], mistakes=m) for name, m in MISTAKES.items()})


# ---------------------------------------------------------------------------------------------------- fp8 (08_fp8)
# A self-contained block: the questions of exercises/src/08_fp8.ipynb (lesson 20), added to QUESTIONS.
FP8_FORBIDDEN = tuple(f"refimpl.fp8.{f}" for f in (
    "quantize_blocks", "quantize_activation", "quantize_weight", "dequantize_blocks", "block_scaled_matmul",
    "fp8_matmul", "_quantize_checked", "_quantize_blocked", "_fake_quantize")) + (
    "refimpl.checkpoint.dequantize_fp8",)


def _fp8_activations(gen, m, k):
    x = _randn(gen, m, k) * _pick(gen, 1.0, 1e-3, 50.0)
    x[:, int(torch.randint(k, (1,), generator=gen))] *= 100.0  # an outlier channel
    x[0, :128] = 0.0  # a tile of zeros: scale 1
    return x


def _quantize_1x128_args(gen, hidden):
    m, k = (_pick(gen, 1, 3, 17), _pick(gen, 128, 384, 512)) if hidden else (4, 256)
    return (_fp8_activations(gen, m, k),)


def _quantize_1x128_ref(x):
    from refimpl import fp8

    return fp8.quantize_activation(x)


def _block_scaled_args(gen, hidden):
    from refimpl import fp8

    m, n, k = (_pick(gen, 1, 5, 33), _pick(gen, 64, 128, 200), _pick(gen, 128, 384)) if hidden else (4, 130, 256)
    a_q, a_scale = fp8.quantize_activation(_fp8_activations(gen, m, k))
    b_q, b_scale = fp8.quantize_weight(_randn(gen, n, k) * torch.logspace(-2, 1, k))
    return a_q, a_scale, b_q, b_scale


def _block_scaled_ref(a_q, a_scale, b_q, b_scale):
    from refimpl import fp8

    return fp8.block_scaled_matmul(a_q, a_scale, b_q, b_scale)


QUESTIONS.update({q.name: q for q in [
    Question("quantize_1x128", ("x",), _quantize_1x128_args, _quantize_1x128_ref, FP8_FORBIDDEN),
    Question("block_scaled_matmul", ("a_q", "a_scale", "b_q", "b_scale"), _block_scaled_args, _block_scaled_ref,
             FP8_FORBIDDEN, atol=1e-3, rtol=1e-4),
]})


@dataclass(frozen=True)
class Exercise:
    """One exercise notebook's registration: the questions it may declare, and what its sandbox may import.

    `may_import`: the refimpl modules that the graded submission's sandbox gets (with the refimpl modules they
    import), as a scaffold without the definitions its questions' `forbidden` lists name (exercises.sandbox);
    every other refimpl module, `dskernels` and `exercises` (but `exercises.feedback`) are absent there, and
    a submission importing them loses every point (exercises.static_check).
    """

    questions: tuple[str, ...]
    may_import: tuple[str, ...] = ()


EXERCISES = {
    "01_attention": Exercise(("causal_sdpa", "kv_cache_update", "decode_step")),
    "02_rope": Exercise(("rope_interleaved",), ("refimpl.rope",)),
    "03_mla": Exercise(("mla_latents", "mla_decompress", "mla_absorbed"), ("refimpl.config", "refimpl.mla")),
    "04_moe": Exercise(("route_topk", "route_group_limited", "moe_forward", "update_bias"), ("refimpl.moe",)),
    "05_accounting": Exercise(("kv_bytes_per_token", "activated_params"), ("refimpl.config",)),
    "06_kernels": Exercise(("softmax_rows", "mla_decode_block")),
    "07_mtp": Exercise(("mtp_combine", "mtp_loss", "verify_drafts"), ("refimpl.mtp",)),
    "08_fp8": Exercise(("quantize_1x128", "block_scaled_matmul")),
    "09_parallelism": Exercise(("simulate_bubble", "index_scores", "select_topk")),
    "10_balance_dispatch": Exercise(("expert_balance_loss", "sequence_balance_loss", "align_to_experts",
                                     "dispatch_bytes")),
    "11_yarn": Exercise(("yarn_inv_freq", "yarn_softmax_scale"), ("refimpl.config",)),
    "12_gqa_splitkv": Exercise(("gqa_attention", "merge_splits")),
}


# ---------------------------------------------------------------------------------------------------- MTP (07_mtp)
# A self-contained block: the questions of exercises/src/07_mtp.ipynb, added to QUESTIONS below.
def _mtp_module_args(gen, hidden):
    from refimpl.mtp import MTPModule
    from refimpl.train import tiny_config

    hidden_size = _pick(gen, 16, 24, 64) if hidden else 32
    config = tiny_config(hidden_size=hidden_size, q_lora_rank=16, kv_lora_rank=8)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
        module = MTPModule(config)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3)  # norms near 1, other weights random
    b, s = (_pick(gen, 1, 3), _pick(gen, 1, 5, 17)) if hidden else (2, 6)
    return module, _randn(gen, b, s, hidden_size), _randn(gen, b, s, hidden_size, scale=0.1)


def _mtp_combine_ref(module, previous_hidden, next_embeds):
    with torch.no_grad():
        return module.combine(previous_hidden, next_embeds)


def _mtp_loss_args(gen, hidden):
    depths = _pick(gen, 1, 2, 3) if hidden else 2
    b, t, v = (_pick(gen, 1, 4), _pick(gen, 4, 9), _pick(gen, 5, 257)) if hidden else (2, 8, 11)
    logits = tuple(_randn(gen, b, t - k, v, scale=3.0) for k in range(1, depths + 1))
    targets = torch.randint(v, (b, t), generator=gen)
    return logits, targets, _pick(gen, 0.3, 0.1, 1.0) if hidden else 0.3


def _mtp_loss_ref(mtp_logits, targets, mtp_lambda):
    from refimpl.mtp import mtp_loss

    return mtp_loss(list(mtp_logits), targets, mtp_lambda)


def _verify_args(gen, hidden):
    n = _pick(gen, 0, 1, 2, 4) if hidden else 3
    greedy = torch.randint(3, (n + 1,), generator=gen)
    drafts = torch.where(torch.rand(n, generator=gen) < 0.7, greedy[:n], torch.randint(3, (n,), generator=gen))
    return drafts, greedy


def _verify_ref(drafts, greedy):
    from refimpl.speculative import verify_drafts

    return verify_drafts(drafts, greedy)


MTP_QUESTIONS = [
    Question("mtp_combine", ("module", "previous_hidden", "next_embeds"), _mtp_module_args, _mtp_combine_ref,
             ("refimpl.mtp.MTPModule.combine", "refimpl.mtp.MTPModule.forward")),
    Question("mtp_loss", ("mtp_logits", "targets", "mtp_lambda"), _mtp_loss_args, _mtp_loss_ref,
             ("refimpl.mtp.mtp_loss",)),
    Question("verify_drafts", ("drafts", "greedy"), _verify_args, _verify_ref,
             ("refimpl.speculative.verify_drafts",), n_visible=3),
]
QUESTIONS.update({q.name: q for q in MTP_QUESTIONS})


# ---------------------------------------------------------------------------------------------------- 13: flash kernel
# A self-contained block: the questions of exercises/src/13_flash_kernel.ipynb (lesson 15), added to QUESTIONS,
# MISTAKES and EXERCISES. Hidden cases are stratified (`_kind`): every seed's cases cover every kind below.
def _online_step_args(gen, hidden):
    """One KV block folded into a running state (m [rows], l [rows], acc [rows, d]) by its scaled scores
    [rows, n] (-inf where masked) and values [n, d]. Kinds: the first block (m = -inf, l = 0, acc = 0); a running
    state from earlier blocks with large scores (exp overflows float32 without the max), the new block's max above
    the running max in some rows and below in others; rows whose whole block is masked (-inf), m finite."""
    kind = _kind(gen, ("first", "running", "masked") if hidden else ("running", "masked"))
    rows, n, d = (_pick(gen, 1, 3, 7), _pick(gen, 1, 5, 16), _pick(gen, 4, 8, 16)) if hidden else (4, 6, 8)
    scale = 30.0 if kind == "running" else 1.0
    scores, v = _randn(gen, rows, n, scale=scale), _randn(gen, n, d)
    if kind == "first":
        scores[torch.rand(rows, n, generator=gen) < 0.3] = float("-inf")
        scores[:, 0] = _randn(gen, rows)  # every row sees a key of this block
        return (torch.full((rows,), float("-inf")), torch.zeros(rows), torch.zeros(rows, d), scores, v)
    earlier = _randn(gen, rows, _pick(gen, 2, 9) if hidden else 5, scale=scale).double()  # earlier blocks' scores
    m = earlier.max(-1).values
    l = (earlier - m[:, None]).exp().sum(-1)
    acc = (earlier - m[:, None]).exp() @ _randn(gen, earlier.shape[1], d).double()
    if kind == "masked":
        scores[::2] = float("-inf")  # rows 0, 2, ...: the block lies past their causal diagonal
    return m.float(), l.float(), acc.float(), scores, v


def _online_step_ref(m, l, acc, scores, v, rescale_l: bool = True, rescale_acc: bool = True):
    """(m_new, l_new, acc_new), float32 (computed in float64): the online softmax of FlashAttention (Dao et al.
    2022, algorithm 1; FlashAttention-2's unnormalized acc): m_new = max(m, rowmax(S)), alpha = exp(m - m_new),
    P = exp(S - m_new), l_new = alpha l + rowsum(P), acc_new = alpha acc + P v."""
    m, l, acc, scores, v = (t.double() for t in (m, l, acc, scores, v))
    m_new = torch.maximum(m, scores.max(-1).values)
    alpha = (m - m_new).exp()  # [rows]; 0 in the first block (m = -inf)
    p = (scores - m_new[:, None]).exp()  # [rows, n]
    l_new = (alpha if rescale_l else 1.0) * l + p.sum(-1)
    acc_new = (alpha[:, None] if rescale_acc else 1.0) * acc + p @ v
    return m_new.float(), l_new.float(), acc_new.float()


def _online_step_no_acc_rescale(m, l, acc, scores, v):
    return _online_step_ref(m, l, acc, scores, v, rescale_acc=False)


def _online_step_no_l_rescale(m, l, acc, scores, v):
    return _online_step_ref(m, l, acc, scores, v, rescale_l=False)


FLASH_KINDS = (("causal", torch.float32, 16, 1.0), ("full", torch.float16, 64, 1.0),
               ("full", torch.float32, 32, 30.0), ("causal", torch.float16, 64, 1.0), ("long", torch.float32, 32, 1.0))


def _flash_args(gen, hidden):
    """q [b, h, seq_q, d], k and v [b, h, seq_k, d], is_causal. Kinds (FLASH_KINDS: mask, dtype, head_dim, scale of
    q): causal after a cached prefix (bottom-right), non-causal with a partial last key block, large scores
    (exp overflows float32 without the running max), causal at block-multiple sizes or none at all, and a few
    queries after a long cache (many key blocks). Sizes are mostly not multiples of the 16-wide tiles."""
    mask, dtype, d, q_scale = _kind(gen, FLASH_KINDS if hidden else FLASH_KINDS[:3])
    b, h = (_pick(gen, 1, 2), _pick(gen, 1, 3)) if hidden else (1, 2)
    if mask == "causal" and dtype == torch.float32:  # after a cached prefix, partial blocks
        seq_q = _pick(gen, 13, 20, 37) if hidden else 20
        seq_k = seq_q + (_pick(gen, 7, 19, 40) if hidden else 11)
    elif mask == "causal":
        seq_q = _pick(gen, 16, 19, 32)
        seq_k = seq_q + _pick(gen, 0, 16, 25)
    elif mask == "long":
        seq_q, seq_k = _pick(gen, 1, 2, 5), _pick(gen, 250, 333, 401)
    else:
        seq_q, seq_k = (_pick(gen, 9, 24, 33), _pick(gen, 21, 45, 70)) if hidden else (18, 37)
    q = _randn(gen, b, h, seq_q, d, scale=q_scale).to(dtype)
    k, v = (_randn(gen, b, h, seq_k, d).to(dtype) for _ in range(2))
    return q, k, v, mask != "full"


def _flash_ref(q, k, v, is_causal, scale: float | None = None, top_left: bool = False):
    """(o like q, lse [b, h, seq_q] float32, natural log), computed in float64: softmax(q k^T scale) v and
    log(sum_j exp(score_j)) over the keys each query sees (causal: bottom-right, refimpl.attention)."""
    qd, kd, vd = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    mask = None
    if is_causal:
        mask = torch.ones(seq_q, seq_k, dtype=torch.bool).tril(0 if top_left else seq_k - seq_q)[None, None]
    o = attention.scaled_dot_product_attention(qd, kd, vd, mask=mask, scale=scale)
    scores = (qd @ kd.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return o.to(q.dtype), scores.logsumexp(-1).float()


def _flash_no_scale(q, k, v, is_causal):
    return _flash_ref(q, k, v, is_causal, scale=1.0)


def _flash_top_left(q, k, v, is_causal):
    return _flash_ref(q, k, v, is_causal, top_left=True)


def _flash_no_tail_mask(q, k, v, is_causal):
    """The keys past seq_k in the last BLOCK_N block loaded as 0: scores 0, values 0 (causal masks them anyway)."""
    from exercises.contracts import FLASH_BLOCK_N

    if is_causal:  # the padded keys lie past every query's position
        return _flash_ref(q, k, v, True)
    pad = -k.shape[-2] % FLASH_BLOCK_N
    return _flash_ref(q, *(torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (k, v)), False)


def _flash_lse_without_max(q, k, v, is_causal):
    o, lse = _flash_ref(q, k, v, is_causal)
    scores = (q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if is_causal:
        mask = torch.ones(*scores.shape[-2:], dtype=torch.bool).tril(k.shape[-2] - q.shape[-2])
        scores = scores.masked_fill(~mask, float("-inf"))
    return o, (lse.double() - scores.max(-1).values).float()  # log(l) alone: m left out


def _flash_lse_base_2(q, k, v, is_causal):
    o, lse = _flash_ref(q, k, v, is_causal)
    return o, lse / math.log(2)  # log2 of the sum: exp2 with the scale folded into log2(e), never converted back


def _flash_blocks(q, k, v, is_causal, rescale_acc: bool = True, rescale_l: bool = True, running_max: bool = True):
    """The kernel's loop in PyTorch, in float32 over key blocks of the harness's FLASH_BLOCK_N, for the mistakes
    whose answer depends on the blocks (an answer whose blocks differ is not told which mistake it made)."""
    from exercises.contracts import FLASH_BLOCK_N

    seq_q, seq_k = q.shape[-2], k.shape[-2]
    q, k, v = (t.float() for t in (q, k, v))
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool)
    visible = visible.tril(seq_k - seq_q) if is_causal else visible
    m = torch.full(q.shape[:-1], float("-inf"))  # [b, h, seq_q]
    l, acc = torch.zeros(q.shape[:-1]), torch.zeros_like(q)
    for start in range(0, seq_k, FLASH_BLOCK_N):
        block = slice(start, start + FLASH_BLOCK_N)
        scores = (q @ k[..., block, :].transpose(-2, -1)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~visible[:, block], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1)) if running_max else torch.zeros_like(m)
        alpha = (m - m_new).exp()
        p = (scores - m_new[..., None]).exp()
        l = (alpha if rescale_l else 1.0) * l + p.sum(-1)
        acc = (alpha[..., None] if rescale_acc else 1.0) * acc + p @ v[..., block, :]
        m = m_new
    return acc / l[..., None], m + l.log()  # o in float32: the callers cast it to the inputs' dtype


def _flash_no_acc_rescale(q, k, v, is_causal):
    o, lse = _flash_blocks(q, k, v, is_causal, rescale_acc=False)
    return o.to(q.dtype), lse


def _flash_no_l_rescale(q, k, v, is_causal):
    o, lse = _flash_blocks(q, k, v, is_causal, rescale_l=False)
    return o.to(q.dtype), lse


def _flash_no_running_max(q, k, v, is_causal):
    o, lse = _flash_blocks(q, k, v, is_causal, running_max=False)
    return o.to(q.dtype), lse


FLASH_QUESTIONS = [
    # no library does this step (a softmax normalizes; this keeps exp(S - m_new) unnormalized): nothing forbidden
    Question("online_softmax_step", ("m", "l", "acc", "scores", "v"), _online_step_args, _online_step_ref, (),
             atol=1e-5, rtol=1e-4),
    Question("flash_attention_fwd", ("q", "k", "v", "is_causal"), _flash_args, _flash_ref,
             SOFTMAX_EQUIVALENTS + SDPA_EQUIVALENTS, triton=True, atol=2e-3, rtol=2e-3, call_timeout=60.0,
             routes=SOFTMAX_ROUTES + ATTENTION_ROUTES, n_visible=3, n_hidden=5),
]
MISTAKES.update({
    "online_softmax_step": (("did not rescale acc by alpha = exp(m - m_new)", _online_step_no_acc_rescale),
                            ("did not rescale l by alpha = exp(m - m_new)", _online_step_no_l_rescale)),
    "flash_attention_fwd": ((NO_SCALE, _flash_no_scale), (TOP_LEFT, _flash_top_left),
                            ("did not mask the keys past seq_k in the last block", _flash_no_tail_mask),
                            ("stored log(l) as the log-sum-exp: it is m + log(l)", _flash_lse_without_max),
                            ("did not rescale acc by alpha = exp(m - m_new) when the max grew", _flash_no_acc_rescale),
                            ("did not rescale l by alpha = exp(m - m_new) when the max grew", _flash_no_l_rescale),
                            ("kept no running max: exp of the raw scores overflows float32", _flash_no_running_max),
                            ("stored the log-sum-exp in base 2 (exp2): lse is a natural log", _flash_lse_base_2)),
})
QUESTIONS.update({q.name: dataclasses.replace(q, mistakes=MISTAKES[q.name]) for q in FLASH_QUESTIONS})
EXERCISES["13_flash_kernel"] = Exercise(("online_softmax_step", "flash_attention_fwd"))
