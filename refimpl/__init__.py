"""refimpl: a readable PyTorch reference of DeepSeek's Multi-head Latent Attention and DeepSeekMoE.

One module per idea: `config`, `norm`, `rope`, `attention`, `mla`, `moe`, `model`, `accounting`, `data`, `train`.
"""

__version__ = "0.1.0"
