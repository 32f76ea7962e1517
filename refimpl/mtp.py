"""Multi-token prediction (MTP), DeepSeek-V3 section 2.2, eq. 21-25.

Besides the next token, V3 trains D extra modules, each predicting one token further ahead. Module k (k = 1..D)
at position i combines the previous depth's representation h_i^{k-1} (h^0: the main model's last hidden state,
after its final norm) with the embedding of token t_{i+k}, and predicts t_{i+k+1}:

    h'_i^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h_i^{k-1})]      # eq. 21, M_k: [d, 2d] (`eh_proj`)
    h^k    = TRM_k(h'^k)                                            # eq. 22, one decoder block (MLA + MoE)
    P^k    = OutHead(RMSNorm(h^k))                                  # eq. 23, the main model's lm_head
    L_MTP  = (lambda / D) sum_k CE(P^k, t_{k+1 ...})                # eq. 24-25

The embedding and the output head are the main model's (shared, not copies). The order inside the brackets
follows the released checkpoint and the code that runs it (transformers' `MtpLayer`, vLLM's
`DeepSeekMultiTokenPredictorLayer`): [embedding; hidden], `enorm` then `hnorm`; the paper's eq. 21 writes the
hidden state first. With the other order the checkpoint's `eh_proj` would multiply the wrong halves.

Checkpoint layout (V3: `num_nextn_predict_layers = 1`, stored as `model.layers.61.*` after the 61 decoder layers):
module k lives under `model.layers.{L + k - 1}.` with `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`, the
block's `self_attn.*`, `mlp.*`, `input_layernorm`, `post_attention_layernorm`, and copies of the shared
`embed_tokens` and `shared_head.head` (read by nobody: the main model's are used). Here the modules are
`DeepSeekMTPForCausalLM.mtp[k - 1]`; `refimpl.checkpoint.load_pretrained` maps the names both ways.
As in transformers, the MTP block is a MoE block whenever the config has experts (V3's layer 61 is one), and a
depth k > 1 module takes the previous depth's output after its `shared_head.norm`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from refimpl.checks import check_int, check_token_ids
from refimpl.config import ModelConfig
from refimpl.mla import MLACache
from refimpl.model import DecoderLayer, DeepSeekForCausalLM, _init_weights
from refimpl.norm import RMSNorm

# V3 section 4.2: lambda = 0.3 for the first 10T of 14.8T training tokens, 0.1 for the rest
V3_LAMBDA_SCHEDULE = ((10 / 14.8, 0.3), (1.0, 0.1))


class SharedHeadNorm(nn.Module):
    """The norm before the shared output head (checkpoint name `shared_head.norm`); the head itself is the main
    model's `lm_head`, passed in, not stored here."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(DecoderLayer):
    """One MTP depth (V3 eq. 21-23): two RMSNorms, the projection M_k, one decoder block, the head's norm.

    The block is the inherited `DecoderLayer` (its parameters keep the checkpoint's names: `self_attn.*`,
    `mlp.*`, `input_layernorm`, `post_attention_layernorm`); its MLP is DeepSeekMoE when the config has routed
    experts (as V3's MTP layer), else the dense MLP.
    """

    def __init__(self, config: ModelConfig):
        super().__init__(config.replace(first_k_dense_replace=0, moe_layer_freq=1), 0)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # for Emb(t_{i+k})
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)  # for h_i^{k-1}
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)  # M_k
        self.shared_head = SharedHeadNorm(config)

    def forward(self, previous_hidden: torch.Tensor, next_embeds: torch.Tensor, start_pos: int = 0,
                cache: MLACache | None = None, mode: str = "naive") -> torch.Tensor:
        """previous_hidden h^{k-1} [batch, seq, hidden] at positions i, next_embeds Emb(t_{i+k}) [batch, seq,
        hidden] -> h^k after `shared_head.norm` [batch, seq, hidden]; the logits are `lm_head` of it.

        start_pos / cache: this module's own MLA cache over its positions i (for drafting, `refimpl.speculative`).
        """
        if previous_hidden.shape != next_embeds.shape:
            raise ValueError(f"next_embeds: expected the shape of previous_hidden {tuple(previous_hidden.shape)}, "
                             f"got {tuple(next_embeds.shape)}")
        # [embedding; hidden]: the checkpoint's order (the paper's eq. 21 writes the hidden state first)
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(previous_hidden)), dim=-1))
        x = super().forward(x, start_pos, cache, mode)  # TRM_k, [batch, seq, hidden]
        return self.shared_head.norm(x)


class DeepSeekMTPForCausalLM(DeepSeekForCausalLM):
    """A DeepSeek model with `config.num_nextn_predict_layers` MTP modules (`self.mtp`).

    `forward` gives the main model's logits, as `DeepSeekForCausalLM` does (so `generate`, `train` and
    `evaluate` work unchanged); `forward_mtp` adds each depth's logits for training; `hidden_and_logits` and
    `mtp_step` are the pieces speculative decoding calls. `from_pretrained` loads the MTP tensors
    (`model.layers.{L}..{L+D-1}.*`) into `self.mtp`; a checkpoint without them is refused by name.
    The main model's weights are initialized exactly as `DeepSeekForCausalLM(config)` under the same seed.
    Raises ValueError when `num_nextn_predict_layers` is 0.
    """

    mtp_prefix = "mtp"  # read by refimpl.checkpoint: these modules hold the checkpoint's MTP layers

    def __init__(self, config: ModelConfig):
        if config.num_nextn_predict_layers < 1:
            raise ValueError("num_nextn_predict_layers: expected >= 1 MTP modules for DeepSeekMTPForCausalLM, "
                             f"got {config.num_nextn_predict_layers}")
        super().__init__(config)
        self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.num_nextn_predict_layers))
        self.mtp.apply(_init_weights)

    def hidden_and_logits(self, input_ids: torch.Tensor, start_pos: int = 0,
                          caches: list[MLACache] | None = None, mode: str = "naive"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [batch, seq] -> (h^0 [batch, seq, hidden] after the final norm, logits [batch, seq, vocab])."""
        check_token_ids("input_ids", input_ids, self.config.vocab_size)
        hidden = self.model(input_ids, start_pos, caches, mode)  # [batch, seq, hidden]
        return hidden, self.lm_head(hidden)

    def mtp_step(self, depth: int, previous_hidden: torch.Tensor, next_ids: torch.Tensor, start_pos: int = 0,
                 cache: MLACache | None = None, mode: str = "naive") -> tuple[torch.Tensor, torch.Tensor]:
        """Module `depth` (1..D) on h^{depth-1} [batch, seq, hidden] and the ids t_{i+depth} [batch, seq] ->
        (h^depth [batch, seq, hidden], logits [batch, seq, vocab] for t_{i+depth+1})."""
        check_int("depth", depth, 1)
        if depth > len(self.mtp):
            raise ValueError(f"depth: expected 1..{len(self.mtp)} (num_nextn_predict_layers), got {depth}")
        check_token_ids("next_ids", next_ids, self.config.vocab_size)
        embeds = self.model.embed_tokens(next_ids)  # the shared embedding
        hidden = self.mtp[depth - 1](previous_hidden, embeds, start_pos, cache, mode)
        return hidden, self.lm_head(hidden)  # the shared output head

    def forward_mtp(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids [batch, T] (T > D) -> (main logits [batch, T, vocab], [logits of depth k: [batch, T - k,
        vocab] for k = 1..D]); depth k at position i predicts t_{i+k+1} (`mtp_loss` pairs them with targets)."""
        depth_count = len(self.mtp)
        if input_ids.ndim != 2 or input_ids.shape[1] <= depth_count:
            raise ValueError(f"input_ids: expected [batch, seq] with seq > num_nextn_predict_layers "
                             f"({depth_count}), got shape {tuple(input_ids.shape)}")
        hidden, logits = self.hidden_and_logits(input_ids)
        mtp_logits = []
        for depth in range(1, depth_count + 1):
            # h^{k-1} at positions 0 .. T-k-1 with Emb(t_{i+k}) -> predicts t_{i+k+1}
            hidden, depth_logits = self.mtp_step(depth, hidden[:, :-1], input_ids[:, depth:])  # [batch, T - k, .]
            mtp_logits.append(depth_logits)
        return logits, mtp_logits

    def new_mtp_caches(self, batch_size: int, max_len: int) -> list[MLACache]:
        """One MLA cache per MTP module, for drafting."""
        return [module.self_attn.new_cache(batch_size, max_len) for module in self.mtp]


def mtp_loss(mtp_logits: list[torch.Tensor], targets: torch.Tensor, mtp_lambda: float) -> torch.Tensor:
    """L_MTP = (lambda / D) sum_k CE_k (V3 eq. 24-25), a float32 scalar.

    mtp_logits: D tensors, depth k: [batch, T - k, vocab] (`DeepSeekMTPForCausalLM.forward_mtp`).
    targets: [batch, T], the next-token targets of the main model (targets[:, i] = t_{i+1}); depth k at
    position i predicts t_{i+k+1} = targets[:, i + k], so its targets are targets[:, k:].
    """
    if not mtp_logits:
        raise ValueError("mtp_logits: expected the logits of at least one MTP depth, got none")
    if not mtp_lambda >= 0:  # written so that NaN fails too
        raise ValueError(f"mtp_lambda: expected >= 0, got {mtp_lambda!r}")
    total = torch.zeros((), device=targets.device)
    for depth, logits in enumerate(mtp_logits, start=1):
        want = (targets.shape[0], targets.shape[1] - depth)
        if tuple(logits.shape[:2]) != want:
            raise ValueError(f"mtp_logits[{depth - 1}]: expected [batch, T - {depth}, vocab] = {want} + (vocab,) "
                             f"for targets {tuple(targets.shape)}, got {tuple(logits.shape)}")
        total = total + F.cross_entropy(logits.flatten(0, 1).float(), targets[:, depth:].flatten())
    return mtp_lambda / len(mtp_logits) * total


def lambda_schedule(steps: int, schedule=V3_LAMBDA_SCHEDULE) -> Callable[[int], float]:
    """step (1..steps) -> lambda: `schedule` is ((fraction of training, lambda), ...) in increasing fractions,
    each lambda holding up to its fraction; default V3's 0.3 then 0.1 (section 4.2), scaled to `steps`."""
    check_int("steps", steps, 1)

    def mtp_lambda(step: int) -> float:
        for fraction, value in schedule:
            if step <= fraction * steps:
                return value
        return schedule[-1][1]

    return mtp_lambda
