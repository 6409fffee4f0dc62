"""Interpretability tools: TransformerLens interop, attention patterns, head ablations, probes.

The icl-lab model uses TransformerLens parameter names and layouts, so moving weights between the two is a
rename: `embed.W_E` (D+1, d) is the transpose of the seed's `input_proj.weight`, and the blocks, `ln_final`
and `unembed` keep their names under `transformer.`. This module holds the TransformerLens 3.x line
(`HookedTransformer`, the user's code); `icl_lab.tl_bridge` holds the 4.x line (`TransformerBridge`) and
`to_transformer_lens`, which picks the line that is installed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icl_lab.config import ModelConfig
from icl_lab.evaluate import per_token_loss
from icl_lab.model import ICLTransformer, interleave
from icl_lab.store import load_strict

__all__ = [
    "HeadOverride",
    "HookedICL",
    "absent_parameters",
    "attention_patterns",
    "from_seed_model",
    "head_ablation_effects",
    "hooked_icl",
    "probe_residual",
    "run_with_cache",
    "to_hooked_transformer",
    "to_seed_state_dict",
]

_TL_ACT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}


def to_seed_state_dict(model: ICLTransformer) -> dict[str, Tensor]:
    """The state_dict of the user's TransformerLens `ICLTransformer` (seed lines 5834-6121) for `model`.

    Missing pieces of the icl-lab config (no attention biases, scalar read-out) become zeros (their names:
    `absent_parameters`); the TL model's unused W_E and W_pos are left out (load with strict=False, or use
    `to_hooked_transformer`).
    """
    cfg, d = model.cfg, model.cfg.d_model
    sd = {k: v for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {"input_proj.weight": sd.pop("embed.W_E").T.contiguous(),
                              "input_proj.bias": sd.pop("embed.b_E", torch.zeros(d))}
    sd.pop("pos_embed", None)
    for i in range(cfg.n_layers):
        p = f"blocks.{i}.attn."
        for name in ("b_Q", "b_K", "b_V"):
            sd.setdefault(p + name, torch.zeros(cfg.n_heads, cfg.d_head))
        sd.setdefault(p + "b_O", torch.zeros(d))
    sd.setdefault("unembed.b_U", torch.zeros(sd["unembed.W_U"].shape[1]))
    out.update({f"transformer.{k}": v for k, v in sd.items()})
    return out


def absent_parameters(model: ICLTransformer) -> list[str]:
    """The keys of `to_seed_state_dict(model)` that `model` does not have: the zero placeholders.

    The exports freeze them (requires_grad=False), so training or SGLD on an export moves exactly the
    parameters of the icl-lab model: the same function class, the same d and λ̂.
    """
    cfg = model.cfg
    names = [] if cfg.embed_bias else ["input_proj.bias"]
    if not cfg.attn_bias:
        names += [f"transformer.blocks.{i}.attn.{b}" for i in range(cfg.n_layers) for b in ("b_Q", "b_K", "b_V", "b_O")]
    if not hasattr(model.unembed, "b_U"):
        names.append("transformer.unembed.b_U")
    return names


class HookedICL(nn.Module):
    """The user's TransformerLens wrapper, with an optional learned position table added before block 0.

    forward(x: (B, K, D), y: (B, K)) -> (B, K); `.transformer` is a `HookedTransformer` (TransformerLens 3.x,
    `to_hooked_transformer`) or a `TransformerBridge` (4.x, `icl_lab.tl_bridge.to_transformer_bridge`), so
    `run_with_cache`-style hooks work as in the user's code on either line:
    `model.transformer.run_with_cache(hidden, start_at_layer=0)` with `hidden = model.embed(x, y)`.
    """

    def __init__(self, transformer: nn.Module, input_proj: nn.Linear, pos: Tensor | None):
        super().__init__()
        self.transformer, self.input_proj = transformer, input_proj
        self.pos = nn.Parameter(pos) if pos is not None else None

    def embed(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.input_proj(interleave(x, y))
        return h + self.pos[: h.shape[1]] if self.pos is not None else h

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.transformer(self.embed(x, y), start_at_layer=0, return_type="logits")
        return out[:, ::2, -1]


def hooked_icl(model: ICLTransformer, transformer: nn.Module, frozen: list[str]) -> HookedICL:
    """`HookedICL` around a loaded `transformer`, with the input projection and positions of `model`; the
    parameters named in `frozen` (names in the returned module) get requires_grad=False."""
    with torch.random.fork_rng(devices=[]):  # its init is overwritten: leave the caller's RNG as it was
        proj = nn.Linear(model.D + 1, model.cfg.d_model, device=model.embed.W_E.device)
    with torch.no_grad():
        proj.weight.copy_(model.embed.W_E.T)
        proj.bias.copy_(model.embed.b_E if model.cfg.embed_bias else torch.zeros_like(proj.bias))
    pos = model.pos_embed.detach().clone() if model.cfg.pos_emb else None
    hooked = HookedICL(transformer, proj, pos).to(model.embed.W_E.device).eval()
    for name in frozen:
        hooked.get_parameter(name).requires_grad_(False)
    return hooked


def to_hooked_transformer(model: ICLTransformer) -> HookedICL:
    """Export to a TransformerLens 3.x `HookedTransformer` (inside `HookedICL`) with equal outputs.

    Needs `pip install 'icl-lab[tl]'` (transformer-lens>=3.9,<4); on 4.x use `icl_lab.tl_bridge`.
    """
    try:  # deferred: transformer-lens is an optional, heavy dependency
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_hooked_transformer needs transformer-lens 3.x: pip install 'icl-lab[tl]' (on "
                          "transformer-lens 4.x use icl_lab.tl_bridge.to_transformer_bridge)") from e
    cfg = model.cfg
    if not cfg.attn_out:
        raise ValueError("TransformerLens always has W_O; models with attn_out=False cannot be exported")
    d_out = model.unembed.W_U.shape[1]
    tl_cfg = HookedTransformerConfig(
        n_layers=cfg.n_layers, n_ctx=2 * model.K, d_model=cfg.d_model, d_head=cfg.d_head, n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp, act_fn=_TL_ACT[cfg.activation], d_vocab=model.D + 1, d_vocab_out=d_out,
        eps=cfg.ln_eps, use_split_qkv_input=True, use_attn_result=True, device=str(model.unembed.W_U.device))
    transformer = HookedTransformer(tl_cfg)
    sd = to_seed_state_dict(model)
    missing, unexpected = transformer.load_state_dict({k[len("transformer."):]: v for k, v in sd.items()
                                                       if k.startswith("transformer.")}, strict=False)
    assert not unexpected, unexpected
    missing = [k for k in missing if not k.endswith((".mask", ".IGNORE"))]  # TL's attention buffers
    assert set(missing) <= {"embed.W_E", "pos_embed.W_pos"}, missing
    return hooked_icl(model, transformer, absent_parameters(model))


def from_seed_model(seed_model: nn.Module, D: int, K: int) -> ICLTransformer:
    """Load the user's own trained TransformerLens `ICLTransformer` into an icl-lab `seed` model (K pairs)."""
    sd = seed_model.state_dict()
    model = ICLTransformer(ModelConfig(), D, K)
    mine = {"embed.W_E": sd["input_proj.weight"].T.contiguous(), "embed.b_E": sd["input_proj.bias"]}
    for k, v in sd.items():
        skip = k.startswith(("transformer.embed.", "transformer.pos_embed.")) or k.endswith((".mask", ".IGNORE"))
        if k.startswith("transformer.") and not skip:
            mine[k[len("transformer."):]] = v
    load_strict(model, mine, "seed model state_dict")
    return model


# ------------------------------------------------------------------------------------------------ internals
HeadOverride = dict[tuple[int, int], str]  # (layer, head) -> "zero" | "mean"


@torch.no_grad()
def run_with_cache(model: ICLTransformer, x: Tensor, y: Tensor, ablate: HeadOverride | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward pass that also returns internals; optionally ablates attention heads.

    Returns predictions (B, K) and a cache with 'resid.{l}' (B, 2K, d_model) entering block l (l = n_layers is
    the final residual), 'pattern.{l}' (B, H, 2K, 2K) attention probabilities and 'z.{l}' (B, H, 2K, d_head).
    Ablation replaces a head's output z by zeros ("zero") or by its mean over the batch at each position
    ("mean") before W_O.
    """
    ablate = ablate or {}
    cache: dict[str, Tensor] = {}
    h = model.residual_in(x, y)
    for layer, block in enumerate(model.blocks):
        cache[f"resid.{layer}"] = h
        normed = block.ln1(h)
        z = block.attn.heads(normed)
        cache[f"pattern.{layer}"] = block.attn.pattern(normed)
        cache[f"z.{layer}"] = z
        for (al, head), mode in ablate.items():
            if al != layer:
                continue
            if mode == "zero":
                z[:, head] = 0.0
            elif mode == "mean":
                z[:, head] = z[:, head].mean(0, keepdim=True)
            else:
                raise ValueError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
        h = h + block.attn.combine(z)
        h = h + block.mlp(block.ln2(h))
    cache[f"resid.{len(model.blocks)}"] = h
    return model.readout(h), cache


def attention_patterns(model: ICLTransformer, x: Tensor, y: Tensor) -> Tensor:
    """Attention probabilities (n_layers, B, n_heads, 2K, 2K); row t attends over tokens ≤ t."""
    _, cache = run_with_cache(model, x, y)
    return torch.stack([cache[f"pattern.{l}"] for l in range(len(model.blocks))])


def head_ablation_effects(model: ICLTransformer, x: Tensor, y: Tensor, mode: str = "zero") -> dict[str, Tensor]:
    """Per-token loss (K,) with each head ablated in turn, keyed 'L{l}H{h}', plus 'none' for the intact model."""
    out = {"none": per_token_loss(run_with_cache(model, x, y)[0], y)}
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            pred, _ = run_with_cache(model, x, y, ablate={(layer, head): mode})
            out[f"L{layer}H{head}"] = per_token_loss(pred, y)
    return out


# ------------------------------------------------------------------------------------------------ probes
def _ridge_fit(features: Tensor, targets: Tensor, lam: float) -> Tensor:
    """Closed-form ridge with intercept: features (N, F), targets (N, T) -> weights (F+1, T)."""
    X = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1).double()
    reg = lam * torch.eye(X.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0.0
    return torch.linalg.solve(X.T @ X + reg, X.T @ targets.double())


def _ridge_apply(features: Tensor, weights: Tensor) -> Tensor:
    X = torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1).double()
    return X @ weights


def probe_residual(model: ICLTransformer, x: Tensor, y: Tensor, targets: Tensor, layer: int | None = None,
                   classify: bool = False, lam: float = 1e-3) -> Tensor:
    """Linear probes from the residual stream at each x position, one per position k, fit on the first half
    of the batch and scored on the second half.

    targets: (B,) integer task ids (classify=True: accuracy of a one-vs-rest least-squares classifier) or
    (B, T) vectors such as the task w (R² of a ridge regression). layer: residual entering that block
    (default: the final residual). Returns a score per position (K,).
    """
    _, cache = run_with_cache(model, x, y)
    layer = len(model.blocks) if layer is None else layer
    resid = cache[f"resid.{layer}"][:, 0::2]  # (B, K, d) at the x positions
    B, K, _ = resid.shape
    half = B // 2
    if classify:
        n_classes = int(targets.max()) + 1
        target_mat = torch.nn.functional.one_hot(targets.long(), n_classes).double()
    else:
        target_mat = targets.double().reshape(B, -1)
    scores = torch.empty(K, dtype=torch.float64)
    for k in range(K):
        W = _ridge_fit(resid[:half, k], target_mat[:half], lam)
        pred = _ridge_apply(resid[half:, k], W)
        truth = target_mat[half:]
        if classify:
            scores[k] = (pred.argmax(1) == truth.argmax(1)).double().mean()
        else:
            ss_res = (pred - truth).square().sum()
            ss_tot = (truth - truth.mean(0)).square().sum()
            scores[k] = 1.0 - ss_res / ss_tot
    return scores
