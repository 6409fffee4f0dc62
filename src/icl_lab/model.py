"""The ICL transformer: a GPT-2-style pre-LN decoder over interleaved (x, y) tokens (presets: icl_lab.config).

Token layout (papers.md §A1, DESIGN.md): 2K tokens of width D+1, x-token (x_k, 0) then y-token (0_D, y_k).
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

__all__ = ["MLP", "Attention", "Block", "Embed", "ICLTransformer", "LayerNorm", "Unembed", "build_model",
           "count_parameters", "init_parameters", "interleave", "linear"]


def interleave(x: Tensor, y: Tensor) -> Tensor:
    """Tokens (B, 2K, D+1) from x: (B, K, D), y: (B, K): x-token (x_k, 0), y-token (0, y_k)."""
    B, K, D = x.shape
    zeros_x = x.new_zeros(B, K, 1)
    zeros_y = x.new_zeros(B, K, D)
    x_tok = torch.cat([x, zeros_x], dim=-1)
    y_tok = torch.cat([zeros_y, y.unsqueeze(-1)], dim=-1)
    return torch.stack([x_tok, y_tok], dim=2).reshape(B, 2 * K, D + 1)


def linear(h: Tensor, W: Tensor, b: Tensor | None = None) -> Tensor:
    """h @ W (+ b) for h: (..., d_in), W: (d_in, d_out), b: (d_out,), as ONE matrix product over all leading axes
    -> (..., d_out), with the bias added inside it (addmm; its backward is one column sum).

    Under torch.func transforms it goes through `_Linear`, whose vmap rule keeps the bias inside the product: with
    stacked weights (ensembles, vectorised LLC chains) one baddbmm per layer, with shared weights one addmm over
    the folded rows. functorch's own rule for addmm is a bmm plus a separate broadcast add (and `h @ W` on
    (B, T, d_in) would be a broadcast matmul that copies W once per sequence).
    """
    flat = h.reshape(-1, h.shape[-1])
    if torch._C._functorch.peek_interpreter_stack() is not None:  # inside vmap / grad: the vmappable form
        out = _Linear.apply(flat, W, b)
    else:
        out = flat @ W if b is None else torch.addmm(b, flat, W)
    return out.view(*h.shape[:-1], W.shape[-1])


class _Linear(torch.autograd.Function):
    """flat @ W (+ b) for flat: (R, d_in), W: (d_in, d_out), b: (d_out,) or None, with a vmap rule (see `linear`)."""

    @staticmethod
    def forward(flat: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
        return flat @ W if b is None else torch.addmm(b, flat, W)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
        flat, W, b = inputs
        ctx.save_for_backward(flat, W)
        ctx.has_bias = b is not None

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        flat, W = ctx.saved_tensors
        need_flat, need_W, need_b = ctx.needs_input_grad
        return (grad @ W.T if need_flat else None, flat.T @ grad if need_W else None,
                grad.sum(0) if ctx.has_bias and need_b else None)

    @staticmethod
    def vmap(info, in_dims, flat, W, b):  # noqa: ANN001, ANN205
        n = info.batch_size
        flat_dim, W_dim, b_dim = in_dims
        if W_dim is None and b_dim is None:  # shared weights, batched rows: fold the mapped axis into the rows
            x = flat.movedim(flat_dim, 0)
            return _Linear.apply(x.reshape(-1, x.shape[-1]), W, b).view(n, x.shape[1], -1), 0

        def lead(t: Tensor, d: int | None) -> Tensor:
            return t.expand(n, *t.shape) if d is None else t.movedim(d, 0)

        x, W = lead(flat, flat_dim), lead(W, W_dim)
        return (torch.bmm(x, W) if b is None else torch.baddbmm(lead(b, b_dim).unsqueeze(1), x, W)), 0


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

    def heads(self, h: Tensor) -> Tensor:
        """Per-head outputs z: (B, H, T, d_head) for the normalised residual h: (B, T, d_model)."""
        B, T, d = h.shape
        H, e = self.cfg.n_heads, self.cfg.d_head
        W = torch.cat([self.W_Q, self.W_K, self.W_V], dim=-1)  # (H, d, 3e)
        b = torch.cat([self.b_Q, self.b_K, self.b_V], dim=-1).reshape(H * 3 * e) if self.cfg.attn_bias else None
        qkv = linear(h, W.permute(1, 0, 2).reshape(d, H * 3 * e), b)  # (B, T, H*3e)
        return causal_attention(qkv.view(B, T, H, 3 * e))

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

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.ln1(h))
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
        h = self.ln_final(h[..., 0::2, :])
        if self.cfg.readout == "token":
            return linear(h, self.unembed.W_U[:, -1:], self.unembed.b_U[-1:]).squeeze(-1)
        return linear(h, self.unembed.W_U).squeeze(-1)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.residual_in(x, y)
        for block in self.blocks:
            h = block(h)
        return self.readout(h)


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
    from icl_lab.tasks import make_generator

    model = ICLTransformer(cfg, task.D, task.K)
    init_parameters(model, make_generator(seed, "init"))
    return model.to(device)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
