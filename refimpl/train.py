"""A short training loop for CPU-sized experiments, and the tiny DeepSeek-style model the lessons train.

The loop is the usual one: next-token cross-entropy, AdamW, gradient clipping at norm 1.0 (DeepSeek-V2
section 3.1.2 and V3 section 4.2 clip at 1.0 too), a fixed seed, and a held-out loss every `eval_every` steps.
What is DeepSeek-specific is how it keeps the routed experts evenly loaded; both ways are here:

* a balance loss added to the cross-entropy (`aux_loss_alpha`), from `refimpl.moe`:
  `expert_balance_loss`, DeepSeek-V2 section 2.2.3, L_ExpBal = alpha * sum_i f_i P_i over the whole batch; or,
  when the config has `seq_aux=True` (V2's and V3's config.json do), `sequence_balance_loss`, the same per
  sequence and averaged over the batch, as the papers define T (V2 eq. 24, V3 eq. 17-20).
  DeepSeek's released MoEGate chooses between the two with the same `seq_aux` flag;
* V3's auxiliary-loss-free balancing (`bias_update_gamma`, V3 section 2.1.2): after each step every router's
  `e_score_correction_bias` moves by gamma: up for experts that got fewer tokens than average, down for those
  that got more. The bias changes which experts are chosen, never the weights they are mixed with. The
  bias is float32 in any model (`refimpl.moe.Router`), so steps of gamma = 1e-3 survive a bfloat16 model.

Any model that maps input_ids [batch, seq] to logits [batch, seq, vocab] and has a `config` trains here: a
dense one (`refimpl.dense.DenseForCausalLM`) too, without balancing, since it has no `DeepSeekMoE` layer.

`TrainLog` keeps each step's losses, the expert load of every MoE layer, and the wall time, for the plots.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from refimpl import moe
from refimpl.checks import check_int
from refimpl.config import ModelConfig
from refimpl.data import ByteTokenizer, encode_corpus, make_domain_corpus, split, token_batches
from refimpl.model import DeepSeekForCausalLM

# The recipe the lessons use with `tiny_config` on the domain corpus (about a minute on 2 CPU cores).
LESSON_STEPS = 300
LESSON_BATCH_SIZE = 16
LESSON_SEQ_LEN = 64
LESSON_LR = 3e-3


def tiny_config(**overrides) -> ModelConfig:
    """A DeepSeek-V3-shaped model small enough to train on a laptop CPU in minutes (~0.2M parameters).

    MLA (kv_lora_rank 16, decoupled RoPE key of 8) in every layer; the first layer dense, the others
    DeepSeekMoE with 1 shared + 8 routed experts, top-2, V3's sigmoid router with the bias used for
    auxiliary-loss-free balancing. `overrides` replace any field, e.g. `tiny_config(num_hidden_layers=2)`.
    """
    config = ModelConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        # as in DeepSeek-V2, the dense FFN is as wide as the experts a MoE layer activates: (2 + 1) * 32
        intermediate_size=96,
        max_position_embeddings=512,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        norm_topk_prob=True,
        first_k_dense_replace=1,
        name="tiny",
    )
    return config.replace(**overrides)


@dataclass
class TrainLog:
    step: list[int] = field(default_factory=list)  # 1, 2, ..., steps
    train_loss: list[float] = field(default_factory=list)  # cross-entropy of each step's batch
    aux_loss: list[float] = field(default_factory=list)  # the balance loss added to it (0.0 when off)
    eval_step: list[int] = field(default_factory=list)  # steps after which the model was evaluated; 0 = before
    eval_loss: list[float] = field(default_factory=list)
    # per step: [n_moe_layers, n_routed_experts], (token, expert) pairs each expert got (`moe.expert_load`)
    expert_load: list[torch.Tensor] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # wall time since the start, after each step


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits [batch, seq, vocab], targets [batch, seq] -> mean cross-entropy (a scalar)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches) -> float:
    """Mean next-token loss over `batches` (a list of (inputs, targets)); the model's train/eval mode is kept."""
    batches = list(batches)
    if not batches:
        raise ValueError("batches: expected at least one (inputs, targets) pair, got none")
    was_training = model.training
    model.eval()
    losses = [next_token_loss(model(inputs), targets).item() for inputs, targets in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def train(model: torch.nn.Module, train_batches, *, steps: int, lr: float, eval_batches=None, eval_every: int = 50,
          aux_loss_alpha: float | None = None, bias_update_gamma: float = 0.0, seed: int = 0,
          progress: bool = True, log_expert_load: bool = True) -> TrainLog:
    """Train `model` for `steps` steps on (inputs, targets) pairs drawn from `train_batches` (an iterator such as
    `refimpl.data.token_batches(...)`).

    eval_batches: a list of (inputs, targets), evaluated before training, every `eval_every` steps and at the end.
    aux_loss_alpha: weight of the balance loss; None takes the config's `aux_loss_alpha`; 0 turns it off.
    bias_update_gamma: V3's bias update speed; 0 turns it off; > 0 needs routers with `e_score_correction_bias`.
    progress: show a progress bar with the latest loss (tqdm; in a notebook, a widget).
    The model needs no MoE layer: a dense model trains the same way, with no balancing and no expert load.
    """
    check_int("steps", steps, 1)
    check_int("eval_every", eval_every, 1)
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    if aux_loss_alpha is None:
        aux_loss_alpha = model.config.aux_loss_alpha
    if not aux_loss_alpha >= 0:  # written so that NaN fails too
        raise ValueError(f"aux_loss_alpha: expected >= 0 or None, got {aux_loss_alpha!r}")
    _check_gamma(bias_update_gamma)
    moe_layers = moe_layers_of(model)
    if bias_update_gamma > 0:
        _check_has_bias(moe_layers)
    if eval_batches is not None:
        eval_batches = list(eval_batches)

    torch.manual_seed(seed)  # for anything random inside the step (dropout, if a model had it)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)  # V3 section 4.2
    log = TrainLog()
    if eval_batches is not None:
        log.eval_step.append(0)
        log.eval_loss.append(evaluate(model, eval_batches))
    model.train()
    batches = iter(train_batches)
    start = time.perf_counter()
    bar = tqdm(range(1, steps + 1), desc="training", disable=not progress)
    for step in bar:
        try:
            inputs, targets = next(batches)  # [batch, seq] each
        except StopIteration:
            raise ValueError(f"train_batches: ran out after {step - 1} batches, expected steps={steps}") from None
        loss = next_token_loss(model(inputs), targets)
        aux = torch.zeros(())
        if aux_loss_alpha > 0:
            aux = _balance_loss(model.config, moe_layers, aux_loss_alpha, *inputs.shape)
        optimizer.zero_grad()
        (loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        loads = [moe.expert_load(layer.last_routing.topk_idx, layer.n_routed_experts) for layer in moe_layers]
        if bias_update_gamma > 0:
            for layer, load in zip(moe_layers, loads):
                moe.update_bias(layer.gate.e_score_correction_bias, load, bias_update_gamma)  # float32 bias

        log.step.append(step)
        log.train_loss.append(loss.item())
        log.aux_loss.append(aux.item())
        if log_expert_load and loads:
            log.expert_load.append(torch.stack(loads))  # [n_moe_layers, n_routed_experts]
        log.seconds.append(time.perf_counter() - start)
        if eval_batches is not None and (step % eval_every == 0 or step == steps):
            log.eval_step.append(step)
            log.eval_loss.append(evaluate(model, eval_batches))
        postfix = {"loss": f"{log.train_loss[-1]:.3f}"}
        if log.eval_loss:
            postfix["eval"] = f"{log.eval_loss[-1]:.3f}"
        bar.set_postfix(postfix, refresh=False)
    return log


def moe_layers_of(model: torch.nn.Module) -> list[moe.DeepSeekMoE]:
    """The model's `DeepSeekMoE` layers, in order; [] for a dense model."""
    return [module for module in model.modules() if isinstance(module, moe.DeepSeekMoE)]


def _balance_loss(config: ModelConfig, moe_layers, alpha: float, batch_size: int, seq_len: int) -> torch.Tensor:
    """The balance loss of this step's forward pass, summed over the MoE layers."""
    total = torch.zeros(())
    for layer in moe_layers:
        routing = layer.last_routing  # scores [batch * seq, n_routed_experts], topk_idx [batch * seq, k]
        if config.seq_aux:
            total = total + moe.sequence_balance_loss(routing.scores, routing.topk_idx, config.n_routed_experts,
                                                      alpha, batch_size, seq_len)
        else:
            total = total + moe.expert_balance_loss(routing.scores, routing.topk_idx, config.n_routed_experts, alpha)
    return total


def _check_gamma(bias_update_gamma: float) -> None:
    if not bias_update_gamma >= 0:  # written so that NaN fails too
        raise ValueError(f"bias_update_gamma: expected >= 0, got {bias_update_gamma!r}")


def _check_has_bias(moe_layers) -> None:
    if not moe_layers:
        raise ValueError("bias_update_gamma: expected a model with MoE layers to balance, got none")
    if any(getattr(layer.gate, "e_score_correction_bias", None) is None for layer in moe_layers):
        raise ValueError("bias_update_gamma: expected routers with an e_score_correction_bias (topk_method="
                         "'noaux_tc'), got routers without one; use aux_loss_alpha, or set bias_update_gamma=0")


def lesson_run(steps: int = LESSON_STEPS, bias_update_gamma: float = 0.0, progress: bool = True,
               examples_per_domain: int = 2000):
    """The lessons' recipe: `tiny_config` trained on the generated multi-domain corpus. -> (model, TrainLog)."""
    train_ids, val_ids = split(encode_corpus(make_domain_corpus(examples_per_domain, seed=0), ByteTokenizer()), 0.1)
    torch.manual_seed(0)
    model = DeepSeekForCausalLM(tiny_config())
    eval_batches = list(token_batches(val_ids, LESSON_BATCH_SIZE, LESSON_SEQ_LEN, seed=1, num_batches=8))
    log = train(model, token_batches(train_ids, LESSON_BATCH_SIZE, LESSON_SEQ_LEN, seed=0), steps=steps,
                lr=LESSON_LR, eval_batches=eval_batches, eval_every=50, bias_update_gamma=bias_update_gamma,
                progress=progress)
    return model, log


def main(argv: list[str] | None = None) -> None:
    """`python -m refimpl.train [--steps N] [--gamma G]`: run the lessons' recipe and print its figures."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--steps", type=int, default=LESSON_STEPS)
    parser.add_argument("--gamma", type=float, default=0.0, help="bias update speed (0: no balancing)")
    args = parser.parse_args(argv)
    try:  # before the corpus is built: a bad argument is a usage error, not a traceback
        check_int("steps", args.steps, 1)
        _check_gamma(args.gamma)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    print(f"training tiny_config on the generated domain corpus for {args.steps} steps")
    _, log = lesson_run(args.steps, args.gamma, progress=True)
    load = torch.stack(log.expert_load[-20:])  # [steps, n_moe_layers, n_routed_experts]
    print(f"eval loss: {log.eval_loss[0]:.3f} at step 0 -> {log.eval_loss[-1]:.3f} at step {log.eval_step[-1]}")
    print(f"wall time: {time.perf_counter() - start:.1f} s on {torch.get_num_threads()} threads")
    print("busiest expert / mean load, last 20 steps, per MoE layer:",
          [round(x, 2) for x in (load.amax(-1) / load.mean(-1)).mean(0).tolist()])


if __name__ == "__main__":
    main()
