"""refimpl.train: the loss falls, runs are reproducible, both balancing methods act as the papers say."""

import copy

import pytest
import torch
import torch.nn.functional as F

from refimpl import moe
from refimpl.data import ByteTokenizer, encode_corpus, make_domain_corpus, split, token_batches
from refimpl.model import DeepSeekForCausalLM
from refimpl.train import TrainLog, evaluate, tiny_config, train

CONFIG = tiny_config(num_hidden_layers=2)  # one dense layer, one MoE layer: the fastest model with both


@pytest.fixture(scope="module")
def streams():
    ids = encode_corpus(make_domain_corpus(300, seed=0), ByteTokenizer())
    return split(ids, 0.1)


def new_model(config=CONFIG, seed=0):
    torch.manual_seed(seed)
    return DeepSeekForCausalLM(config)


def batches(ids, n=None, seed=0, batch_size=8, seq_len=32):
    return token_batches(ids, batch_size, seq_len, seed=seed, num_batches=n)


def test_tiny_config_shapes():
    config = tiny_config()
    assert config.vocab_size == ByteTokenizer.vocab_size == 257
    assert config.is_mla and config.is_moe and config.first_k_dense_replace == 1
    assert config.intermediate_size == (config.num_experts_per_tok + config.n_shared_experts) * \
        config.moe_intermediate_size
    assert tiny_config(hidden_size=32, kv_lora_rank=8, q_lora_rank=16).hidden_size == 32
    with pytest.raises(ValueError, match="kv_lora_rank"):
        tiny_config(kv_lora_rank=128)  # validated again after the overrides


def test_loss_falls_and_the_log_is_complete(streams):
    train_ids, val_ids = streams
    log = train(new_model(), batches(train_ids), steps=24, lr=3e-3, eval_batches=list(batches(val_ids, 4, seed=1)),
                eval_every=12, progress=False)
    assert isinstance(log, TrainLog)
    assert log.step == list(range(1, 25)) and len(log.train_loss) == len(log.seconds) == 24
    assert log.eval_step == [0, 12, 24]
    assert log.eval_loss[0] == pytest.approx(torch.log(torch.tensor(257.0)).item(), abs=0.1)  # ~uniform at init
    assert log.eval_loss[-1] < 0.8 * log.eval_loss[0]
    assert log.aux_loss == [0.0] * 24  # tiny_config has aux_loss_alpha 0
    assert all(a <= b for a, b in zip(log.seconds, log.seconds[1:]))
    assert len(log.expert_load) == 24 and log.expert_load[0].shape == (1, CONFIG.n_routed_experts)


def test_same_seed_same_losses(streams):
    train_ids, _ = streams
    runs = [train(new_model(), batches(train_ids), steps=4, lr=3e-3, progress=False) for _ in range(2)]
    assert runs[0].train_loss == runs[1].train_loss
    other = train(new_model(), batches(train_ids, seed=1), steps=4, lr=3e-3, progress=False)
    assert other.train_loss != runs[0].train_loss


def test_evaluate_is_the_mean_cross_entropy_and_keeps_the_mode(streams):
    _, val_ids = streams
    model, eval_batches = new_model(), list(batches(val_ids, 3))
    model.train()
    with torch.no_grad():
        expected = sum(F.cross_entropy(model(x).reshape(-1, 257), y.reshape(-1)).item()
                       for x, y in eval_batches) / 3
    assert evaluate(model, eval_batches) == pytest.approx(expected, rel=1e-6)
    assert model.training
    with pytest.raises(ValueError, match="batches: expected at least one"):
        evaluate(model, [])


def test_bias_update_moves_each_bias_against_its_load(streams):
    train_ids, _ = streams
    model = new_model()
    gate = model.moe_layers()[0].gate
    before = gate.e_score_correction_bias.clone()
    log = train(model, batches(train_ids), steps=1, lr=1e-3, bias_update_gamma=0.01, progress=False)
    load = log.expert_load[0][0]  # the load of the step's forward pass, one MoE layer
    assert load.max() > load.min()  # not already balanced, so some biases must move
    # V3 section 2.1.2: overloaded experts (load above the mean) go down by gamma, underloaded ones go up
    expected = before + 0.01 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(gate.e_score_correction_bias, expected.to(before.dtype))


def test_without_bias_update_the_bias_stays(streams):
    train_ids, _ = streams
    model = new_model()
    before = model.moe_layers()[0].gate.e_score_correction_bias.clone()
    train(model, batches(train_ids), steps=2, lr=1e-3, progress=False)
    assert torch.equal(model.moe_layers()[0].gate.e_score_correction_bias, before)


@pytest.mark.parametrize("seq_aux", [False, True])
def test_aux_loss_is_computed_and_trained_on(streams, seq_aux):
    train_ids, _ = streams
    config = CONFIG.replace(seq_aux=seq_aux)
    model = new_model(config)
    plain, balanced = copy.deepcopy(model), copy.deepcopy(model)
    inputs, targets = next(batches(train_ids))
    with torch.no_grad():
        model(inputs)
    routing = model.moe_layers()[0].last_routing
    if seq_aux:
        expected = moe.sequence_balance_loss(routing.scores, routing.topk_idx, 8, 0.1, *inputs.shape)
    else:
        expected = moe.expert_balance_loss(routing.scores, routing.topk_idx, 8, 0.1)

    log = train(balanced, [(inputs, targets)], steps=1, lr=1e-2, aux_loss_alpha=0.1, progress=False)
    train(plain, [(inputs, targets)], steps=1, lr=1e-2, aux_loss_alpha=0.0, progress=False)
    assert log.aux_loss[0] == pytest.approx(expected.item(), rel=1e-5) and log.aux_loss[0] > 0
    # the balance loss reaches the router's weights through the gradient: they move differently with it
    assert not torch.equal(balanced.moe_layers()[0].gate.weight, plain.moe_layers()[0].gate.weight)


def test_bad_arguments_raise(streams):
    train_ids, _ = streams
    model = new_model()
    with pytest.raises(ValueError, match="steps: expected an int >= 1, got 0"):
        train(model, batches(train_ids), steps=0, lr=1e-3)
    with pytest.raises(ValueError, match="lr: expected a positive learning rate, got 0"):
        train(model, batches(train_ids), steps=1, lr=0)
    with pytest.raises(ValueError, match="lr: expected a positive learning rate, got -0.1"):
        train(model, batches(train_ids), steps=1, lr=-0.1)
    with pytest.raises(ValueError, match="eval_every: expected an int >= 1, got 0"):
        train(model, batches(train_ids), steps=1, lr=1e-3, eval_every=0)
    with pytest.raises(ValueError, match="aux_loss_alpha: expected >= 0 or None, got -1"):
        train(model, batches(train_ids), steps=1, lr=1e-3, aux_loss_alpha=-1)
    with pytest.raises(ValueError, match="bias_update_gamma: expected >= 0, got -0.5"):
        train(model, batches(train_ids), steps=1, lr=1e-3, bias_update_gamma=-0.5)
    # NaN is not >= 0: it must not pass silently as "balancing off"
    with pytest.raises(ValueError, match="aux_loss_alpha: expected >= 0 or None, got nan"):
        train(model, batches(train_ids), steps=1, lr=1e-3, aux_loss_alpha=float("nan"))
    with pytest.raises(ValueError, match="bias_update_gamma: expected >= 0, got nan"):
        train(model, batches(train_ids), steps=1, lr=1e-3, bias_update_gamma=float("nan"))
    with pytest.raises(ValueError, match="train_batches: ran out after 2 batches, expected steps=3"):
        train(model, list(batches(train_ids, 2)), steps=3, lr=1e-3, progress=False)


def test_bias_update_needs_a_router_with_bias(streams):
    train_ids, _ = streams
    softmax_router = new_model(CONFIG.replace(scoring_func="softmax", topk_method="greedy"))
    with pytest.raises(ValueError, match="bias_update_gamma: expected routers with an e_score_correction_bias"):
        train(softmax_router, batches(train_ids), steps=1, lr=1e-3, bias_update_gamma=0.01)
    dense = new_model(CONFIG.replace(first_k_dense_replace=2))
    with pytest.raises(ValueError, match="bias_update_gamma: expected a model with MoE layers"):
        train(dense, batches(train_ids), steps=1, lr=1e-3, bias_update_gamma=0.01)


def test_command_line_run_prints_its_figures(capsys):
    from refimpl.train import main

    main(["--steps", "2"])
    captured = capsys.readouterr()
    assert "eval loss: 5.5" in captured.out and "at step 2" in captured.out and "wall time" in captured.out
    assert "training: 100%" in captured.err and "loss=" in captured.err  # the progress bar, with the loss


class _TinyDense(torch.nn.Module):
    """A dense language model (no DeepSeekMoE layer): embedding, one SwiGLU FFN, output head."""

    def __init__(self):
        super().__init__()
        self.config = CONFIG.replace(n_routed_experts=None, kv_lora_rank=None)
        self.embed = torch.nn.Embedding(257, 32)
        self.ffn = moe.MLP(32, 64)
        self.head = torch.nn.Linear(32, 257)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return self.head(x + self.ffn(x))


def test_a_dense_model_trains(streams):
    train_ids, val_ids = streams
    torch.manual_seed(0)
    model = _TinyDense()
    log = train(model, batches(train_ids), steps=6, lr=3e-3, eval_batches=list(batches(val_ids, 2, seed=1)),
                eval_every=6, aux_loss_alpha=0.1, progress=False)
    assert log.eval_loss[-1] < log.eval_loss[0] and log.expert_load == [] and log.aux_loss == [0.0] * 6


def test_a_bfloat16_model_updates_its_bias_in_float32(streams):
    """A bias step of 1e-3 on a bias near 0.5 is lost in bfloat16 (step 1/256 there); the router keeps the
    bias float32 in a bfloat16 model, so after one step every bias is 0.5 +- 0.001 exactly (float32)."""
    train_ids, _ = streams
    model = new_model().to(torch.bfloat16)
    gate = model.moe_layers()[0].gate
    with torch.no_grad():
        gate.e_score_correction_bias.fill_(0.5)
    log = train(model, batches(train_ids), steps=1, lr=1e-3, bias_update_gamma=1e-3, progress=False)
    load = log.expert_load[0][0]
    assert gate.e_score_correction_bias.dtype == torch.float32 and load.max() > load.min()
    expected = torch.full((8,), 0.5) + 1e-3 * torch.sign(load.mean() - load)
    torch.testing.assert_close(gate.e_score_correction_bias, expected, rtol=0, atol=1e-7)
    assert {round(b, 4) for b in gate.e_score_correction_bias.tolist()} <= {0.499, 0.5, 0.501}


def test_the_dense_baseline_trains(streams):
    from refimpl.dense import DenseForCausalLM

    train_ids, _ = streams
    torch.manual_seed(0)
    config = tiny_config(num_hidden_layers=2, n_routed_experts=None, kv_lora_rank=None, num_key_value_heads=2)
    log = train(DenseForCausalLM(config), batches(train_ids), steps=3, lr=3e-3, progress=False)
    assert len(log.train_loss) == 3 and log.train_loss[-1] < log.train_loss[0] and log.expert_load == []


def test_command_line_bad_arguments_are_usage_errors(capsys):
    """A bad --steps or --gamma ends like any argparse error (exit status 2, one line), not with a traceback."""
    from refimpl.train import main

    for argv, message in ((["--steps", "0"], "steps: expected an int >= 1, got 0"),
                          (["--steps", "1", "--gamma", "nan"], "bias_update_gamma: expected >= 0, got nan")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
