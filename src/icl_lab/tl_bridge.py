"""TransformerLens 4.x interop: an icl-lab model as a `TransformerBridge`, and the line-agnostic export.

TransformerLens 4.0 removed `HookedTransformer`; every 4.x model is a `TransformerBridge` around a source module.
For a model built from a config, 4.x ships its TL-native source (`TransformerBridge.boot_native`): `NativeModel`,
a pre-LN decoder with LayerNorm, learned positions, split Q/K/V/O projections with biases and a two-layer MLP,
bridged by `NativeArchitectureAdapter` with the per-head hooks (`hook_q`, `hook_pattern`, `hook_z`, ...). That is
icl-lab's architecture. `build_pretrain_bridge` does not fit: its protocol requires RoPE, RMSNorm and gated MLPs,
and its opaque attention has no per-head hooks.

The export feeds the same TransformerLens-format weights as the 3.x export (`interp.to_seed_state_dict`) through
TransformerLens' own converter of `HookedTransformer` state dicts (`convert_tl_checkpoint`). The x/y tokens enter
through the same `HookedICL` wrapper on both lines: the linear input projection and the learned positions sit
outside the transformer, which runs `transformer(hidden, start_at_layer=0)` as in the user's code, so its token
and position tables are unused (their gradient is None; `estimate_llc` leaves them out).
"""

from __future__ import annotations

from importlib import metadata
from typing import TYPE_CHECKING

import torch
from torch import nn

from icl_lab.interp import HookedICL, absent_parameters, hooked_icl, to_hooked_transformer, to_seed_state_dict
from icl_lab.model import ICLTransformer

if TYPE_CHECKING:
    from transformer_lens.config import TransformerBridgeConfig

__all__ = ["bridge_config", "tl_major_version", "to_transformer_bridge", "to_transformer_lens"]

_TL_ACT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
_PREFIX = "transformer."


def tl_major_version() -> int | None:
    """The major version of the installed transformer-lens (3 or 4), or None; reads metadata, imports nothing."""
    try:
        return int(metadata.version("transformer-lens").split(".")[0])
    except metadata.PackageNotFoundError:
        return None


def bridge_config(model: ICLTransformer) -> TransformerBridgeConfig:
    """The TL-native `TransformerBridgeConfig` of `model`'s transformer (blocks, final LN, unembed)."""
    from transformer_lens.config import TransformerBridgeConfig  # deferred: optional, heavy dependency

    cfg = model.cfg
    return TransformerBridgeConfig(
        d_model=cfg.d_model, d_head=cfg.d_head, n_layers=cfg.n_layers, n_ctx=2 * model.K, n_heads=cfg.n_heads,
        d_mlp=cfg.d_mlp, act_fn=_TL_ACT[cfg.activation], d_vocab=model.D + 1,
        d_vocab_out=model.unembed.W_U.shape[1], eps=cfg.ln_eps, normalization_type="LN",
        positional_embedding_type="standard", architecture="TransformerLensNative")


def _native_model(tl_cfg: TransformerBridgeConfig) -> nn.Module:
    """A TL-native `NativeModel` for `tl_cfg` whose unembed has a bias, as the user's model and icl-lab's `token`
    read-out do (NativeModel's has none). Its random init is overwritten; a forked RNG keeps the caller's intact."""
    from transformer_lens.model_bridge.sources.native import NativeModel  # deferred: optional, heavy dependency

    with torch.random.fork_rng(devices=[]):
        native = NativeModel(tl_cfg)
        native.head = nn.Linear(tl_cfg.d_model, tl_cfg.d_vocab_out, bias=True)
    return native


def to_transformer_bridge(model: ICLTransformer) -> HookedICL:
    """Export to a TransformerLens 4.x `TransformerBridge` (inside `HookedICL`) with equal outputs.

    Parameters the icl-lab model lacks (`interp.absent_parameters`) are zeros with requires_grad=False.
    Needs `pip install 'icl-lab[tl4]'` (transformer-lens>=4,<5).
    """
    try:  # deferred: transformer-lens is an optional, heavy dependency
        from transformer_lens.model_bridge.sources import build_bridge_from_module
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_transformer_bridge needs transformer-lens 4.x: pip install 'icl-lab[tl4]' (on "
                          "transformer-lens 3.x use icl_lab.interp.to_hooked_transformer)") from e
    if not model.cfg.attn_out:
        raise ValueError("TransformerLens always has W_O; models with attn_out=False cannot be exported")
    tl_cfg = bridge_config(model)
    native = _native_model(tl_cfg).to(model.unembed.W_U.device)
    bridge = build_bridge_from_module(native, "TransformerLensNative", tl_config=tl_cfg)
    tl_sd = {k[len(_PREFIX):]: v for k, v in to_seed_state_dict(model).items() if k.startswith(_PREFIX)}
    _load(bridge, convert_tl_checkpoint(tl_sd, bridge.cfg))
    absent = absent_parameters(model)
    outside = [n for n in absent if not n.startswith(_PREFIX)]  # the input projection's bias
    inside = [n[len(_PREFIX):] for n in absent if n.startswith(_PREFIX)]
    renamed = convert_tl_checkpoint({k: tl_sd[k] for k in inside}, bridge.cfg)  # TL names -> bridge names
    return hooked_icl(model, bridge, outside + [_PREFIX + k for k in renamed])


def _load(bridge: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load the converted weights and check that every tensor landed; only the token and position tables (unused
    behind `start_at_layer=0`) keep their initial values."""
    bridge.load_state_dict(weights, strict=False)
    loaded = bridge.state_dict()
    left = set(loaded) - set(weights)
    assert left <= {"embed.weight", "pos_embed.weight"}, sorted(left)
    for k, v in weights.items():
        assert torch.equal(loaded[k], v.to(loaded[k].device)), k


def to_transformer_lens(model: ICLTransformer) -> HookedICL:
    """Export to whichever TransformerLens line is installed: `to_hooked_transformer` on 3.x,
    `to_transformer_bridge` on 4.x. Both return a `HookedICL` with the same forward and hooking habits."""
    major = tl_major_version()
    if major == 3:
        return to_hooked_transformer(model)
    if major == 4:
        return to_transformer_bridge(model)
    found = "is not installed" if major is None else f"{major}.x is not supported"
    raise ImportError(f"transformer-lens {found}: pip install 'icl-lab[tl]' (3.9) or 'icl-lab[tl4]' (4.x)")
