"""The ICL transformer: a GPT-2-style pre-LN decoder over interleaved (x, y) tokens (presets: icl_lab.config).

Token layout (docs/papers.md §A1): 2K tokens of width D+1, x-token (x_k, 0) then y-token (0_D, y_k).
The prediction for y_k is read at the x_k position, so the causal mask hides y_k from it.

Parameter names mirror TransformerLens (`blocks.0.attn.W_Q` of shape (n_heads, d_model, d_head), ...), so
refined-LLC patterns and hook-based habits carry over, and `interp.to_hooked_transformer` is a rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icl_lab.attention import causal_attention
from icl_lab.config import PRESETS as PRESETS  # re-exported: the presets live with the config
from icl_lab.config import ModelConfig, TaskConfig
from icl_lab.seeding import make_generator

__all__ = ["MLP", "Attention", "Block", "Embed", "ICLTransformer", "LayerNorm", "Unembed", "build_model",
           "count_parameters", "init_parameters", "interleave", "linear"]


def interleave(x: Tensor, y: Tensor) -> Tensor:
    """Tokens (B, 2K, D+1) from x: (B, K, D), y: (B, K): x-token (x_k, 0), y-token (0, y_k)."""
    B, K, D = x.shape
    tokens = x.new_zeros(B, K, 2, D + 1)
    tokens[:, :, 0, :D] = x
    tokens[:, :, 1, D] = y
    return tokens.view(B, 2 * K, D + 1)


def linear(h: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """h @ W + b for h: (..., d_in), W: (d_in, d_out) (TransformerLens layout), b: (d_out,) -> (..., d_out), as one
    matrix product over the folded leading axes with the bias added inside it (addmm)."""
    flat = h.reshape(-1, h.shape[-1])
    out = flat @ W if b is None else torch.addmm(b, flat, W)
    return out.view(*h.shape[:-1], W.shape[-1])


_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


class LayerNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))
        self.b = nn.Parameter(torch.zeros(d))
        self.eps = eps

    def forward(self, h: Tensor) -> Tensor:
        return F.layer_norm(h, (h.shape[-1],), self.w, self.b, self.eps)


class Attention(nn.Module):
    """Causal multi-head attention with per-head weights (TransformerLens layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(H, d, e))
        self.W_K = nn.Parameter(torch.empty(H, d, e))
        self.W_V = nn.Parameter(torch.empty(H, d, e))
        if cfg.attn_bias:
            self.b_Q = nn.Parameter(torch.zeros(H, e))
            self.b_K = nn.Parameter(torch.zeros(H, e))
            self.b_V = nn.Parameter(torch.zeros(H, e))
        if cfg.attn_out:
            self.W_O = nn.Parameter(torch.empty(H, e, d))
            if cfg.attn_bias:
                self.b_O = nn.Parameter(torch.zeros(d))
        elif H * e != d:
            raise ValueError(f"attn_out=False needs n_heads*d_head == d_model, got {H}*{e} != {d}")
        self.cfg = cfg

    def forward(self, h: Tensor) -> Tensor:
        """h: (B, T, d_model) -> (B, T, d_model)."""
        return self.combine(self.heads(h))

    def heads(self, h: Tensor, rows: slice = slice(None)) -> Tensor:
        """Per-head outputs z: (B, H, T', d_head) at the T' positions `rows` for the normalised residual
        h: (B, T, d_model)."""
        B, T, d = h.shape
        H, e = self.cfg.n_heads, self.cfg.d_head
        # one packed projection, each head's [q | k | v] side by side: W (d, H, 3, e), b (H, 3, e)
        W = torch.stack([self.W_Q.transpose(0, 1), self.W_K.transpose(0, 1), self.W_V.transpose(0, 1)], dim=2)
        b = torch.stack([self.b_Q, self.b_K, self.b_V], dim=1).view(H * 3 * e) if self.cfg.attn_bias else None
        qkv = linear(h, W.view(d, H * 3 * e), b)  # (B, T, H*3e)
        return causal_attention(qkv.view(B, T, H, 3 * e), rows)

    def combine(self, z: Tensor) -> Tensor:
        """Attention output (B, T, d_model) from per-head outputs z: (B, H, T, d_head)."""
        B, H, T, e = z.shape
        z = z.transpose(1, 2).reshape(B, T, H * e)
        if not self.cfg.attn_out:
            return z
        return linear(z, self.W_O.reshape(H * e, self.cfg.d_model), self.b_O if self.cfg.attn_bias else None)

    def pattern(self, h: Tensor) -> Tensor:
        """Attention probabilities (B, H, T, T) for the normalised residual h: (B, T, d_model)."""
        q = torch.einsum("btd,hde->bhte", h, self.W_Q)
        k = torch.einsum("btd,hde->bhte", h, self.W_K)
        if self.cfg.attn_bias:
            q = q + self.b_Q[:, None, :]
            k = k + self.b_K[:, None, :]
        T = h.shape[1]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.cfg.d_head)
        mask = torch.ones(T, T, dtype=torch.bool, device=h.device).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(-1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.act = _ACTIVATIONS[cfg.activation]

    def forward(self, h: Tensor) -> Tensor:
        return linear(self.act(linear(h, self.W_in, self.b_in)), self.W_out, self.b_out)


class Block(nn.Module):
    """Pre-LN block: h += attn(LN1(h)); h += mlp(LN2(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln2 = LayerNorm(cfg.d_model, cfg.ln_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: Tensor, rows: slice = slice(None)) -> Tensor:
        """h: (B, T, d_model) -> the residual stream after the block at positions `rows`: (B, T', d_model).

        Every position is attended to; only `rows` go on past the attention (the last block computes just the x
        positions that the readout reads).
        """
        z = self.attn.heads(self.ln1(h), rows)  # (B, H, T', d_head)
        h = h[:, rows] + self.attn.combine(z)
        return h + self.mlp(self.ln2(h))


class Embed(nn.Module):
    def __init__(self, d_in: int, d_model: int, bias: bool):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_in, d_model))
        if bias:
            self.b_E = nn.Parameter(torch.zeros(d_model))


class Unembed(nn.Module):
    def __init__(self, d_model: int, d_out: int, bias: bool):
        super().__init__()
        self.W_U = nn.Parameter(torch.empty(d_model, d_out))
        if bias:
            self.b_U = nn.Parameter(torch.zeros(d_out))


class ICLTransformer(nn.Module):
    """forward(x: (B, K, D), y: (B, K)) -> predictions (B, K), read at the x positions."""

    def __init__(self, cfg: ModelConfig, D: int, K: int):
        super().__init__()
        self.cfg, self.D, self.K = cfg, D, K
        self.embed = Embed(D + 1, cfg.d_model, cfg.embed_bias)
        if cfg.pos_emb:
            self.pos_embed = nn.Parameter(torch.empty(2 * K, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.ln_eps)
        token = cfg.readout == "token"
        self.unembed = Unembed(cfg.d_model, D + 1 if token else 1, bias=token)

    def residual_in(self, x: Tensor, y: Tensor) -> Tensor:
        """Embedded tokens (B, 2K, d_model): the residual stream entering block 0."""
        h = linear(interleave(x, y), self.embed.W_E, self.embed.b_E if self.cfg.embed_bias else None)
        if self.cfg.pos_emb:
            if x.shape[-2] > self.K:
                raise ValueError(f"sequence has {x.shape[-2]} pairs, the positional embedding holds K={self.K}")
            h = h + self.pos_embed[: h.shape[-2]]
        return h

    def readout(self, h: Tensor) -> Tensor:
        """Predictions (B, K) from the final residual stream h: (B, 2K, d_model), read at x positions."""
        return self.predict(h[..., 0::2, :])

    def predict(self, h: Tensor) -> Tensor:
        """Predictions (B, K) from the final residual stream at the x positions only, h: (B, K, d_model)."""
        h = self.ln_final(h)
        if self.cfg.readout == "token":
            return linear(h, self.unembed.W_U[:, -1:], self.unembed.b_U[-1:]).squeeze(-1)
        return linear(h, self.unembed.W_U).squeeze(-1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.residual_in(x, y)
        *early, last = self.blocks
        for block in early:
            h = block(h)
        return self.predict(last(h, rows=slice(0, None, 2)))  # (B, K): only the x positions are read


def init_parameters(model: ICLTransformer, generator: torch.Generator) -> None:
    """Initialise every parameter in place from `generator` (never the global RNG).

    transformer_lens: every W_* ~ N(0, (0.8/sqrt(d_model))^2) as TransformerLens 3.x does, except the input
        projection, which the seed builds as an nn.Linear (PyTorch default init).
    gpt2: W ~ N(0, 0.02^2), residual output projections (W_O, W_out) ~ N(0, (0.02/sqrt(2L))^2) (nanoGPT).
    torch: PyTorch's nn.Linear default (uniform in ±1/sqrt(fan_in), weights and biases).
    LayerNorm weights are 1 and biases 0 in every scheme; other biases are 0 except under `torch`.
    """
    cfg = model.cfg
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith("ln") or ".ln" in name:
                p.fill_(1.0 if leaf == "w" else 0.0)
                continue
            fan_in = _fan_in(model, name, p)
            if cfg.init == "torch" or (cfg.init == "transformer_lens" and name.startswith("embed.")):
                bound = 1.0 / math.sqrt(fan_in)
                p.uniform_(-bound, bound, generator=generator)
            elif leaf.startswith("b"):
                p.zero_()
            elif cfg.init == "transformer_lens":
                p.normal_(0.0, 0.8 / math.sqrt(cfg.d_model), generator=generator)
            else:  # gpt2
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if leaf in {"W_O", "W_out"} else 0.02
                p.normal_(0.0, std, generator=generator)


def _fan_in(model: ICLTransformer, name: str, p: Tensor) -> int:
    """Fan-in of a weight, or of the weight a bias belongs to (for the `torch` init scheme)."""
    leaf = name.rsplit(".", 1)[-1]
    cfg = model.cfg
    if leaf in {"W_Q", "W_K", "W_V"}:
        return p.shape[1]
    if leaf == "W_O":
        return p.shape[0] * p.shape[1]
    if leaf == "pos_embed":
        return p.shape[0]
    if leaf.startswith("W"):
        return p.shape[0]
    bias_fan_in = {"b_E": model.D + 1, "b_in": cfg.d_model, "b_out": cfg.d_mlp, "b_U": cfg.d_model,
                   "b_Q": cfg.d_model, "b_K": cfg.d_model, "b_V": cfg.d_model, "b_O": cfg.n_heads * cfg.d_head}
    return bias_fan_in[leaf]


def build_model(task: TaskConfig, cfg: ModelConfig, seed: int, device: str | torch.device = "cpu"
                ) -> ICLTransformer:
    """A freshly initialised model; the init generator is seeded from the run seed and the label 'init'."""
    model = ICLTransformer(cfg, task.D, task.K)
    init_parameters(model, make_generator(seed, "init"))
    return model.to(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
