"""Validated configuration: one pydantic model per concern, composed into `RunConfig`.

Every model forbids unknown keys, so a typo in a config file or a flag is an error that names the key.
Leaf field names are unique across the sub-configs, so the CLI exposes each one as a flat flag
(`--M 2`, `--lr 3e-3`, `--n-layers 2`).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "PRESETS",
    "SECTIONS",
    "Activation",
    "Family",
    "InitScheme",
    "LLCConfig",
    "ModelConfig",
    "Readout",
    "RunConfig",
    "Sampler",
    "Schedule",
    "TaskConfig",
    "check_path_name",
    "TrainConfig",
    "build_run_config",
    "leaf_fields",
    "nest",
    "parse_m",
    "preset_fields",
    "read_config_file",
]

Family = Literal["gaussian", "unit_norm"]
Activation = Literal["relu", "gelu", "gelu_tanh"]
InitScheme = Literal["transformer_lens", "gpt2", "torch"]
Readout = Literal["token", "scalar"]
Schedule = Literal["constant", "triangle", "cosine", "constant_cooldown"]
Sampler = Literal["sgld", "rmsprop_sgld", "mala"]


def parse_m(v: Any) -> Any:
    """A task diversity from text or a number: an integer, or 'inf' / 'infinity' / 'none' / '∞' / float inf for
    M = ∞ (None); anything else is returned for the field's own validation."""
    if isinstance(v, str):
        text = v.strip().lower()
        if text in {"inf", "infinity", "none", "∞"}:
            return None
        try:
            return int(text)
        except ValueError as e:
            raise ValueError(f"M must be an integer >= 1 or 'inf', got {v!r}") from e
    if isinstance(v, float) and math.isinf(v):
        return None
    return v


# Presets: field values for ModelConfig. The D and K of the data come from TaskConfig.
PRESETS: dict[str, dict[str, Any]] = {
    # The user's TransformerLens model (seed lines 5834-6121): no positional embedding (start_at_layer=0 skips
    # W_E and W_pos), 4 heads of 32 on d_model 64, ReLU MLP 128, biases everywhere, LN + unembed to D+1 outputs
    # read at the last channel, TransformerLens' default init (N(0, 0.8/sqrt(d_model)) for all W_*).
    "seed": dict(n_layers=2, d_model=64, n_heads=4, d_head=32, d_mlp=128, activation="relu", pos_emb=False,
                 attn_bias=True, attn_out=True, embed_bias=True, readout="token", init="transformer_lens"),
    # Hoogland et al. / timaeus-research/icl L2H4: MLP 1x, ReLU, learned positions, QKV and W_O without bias.
    "hoogland": dict(n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=64, activation="relu", pos_emb=True,
                     attn_bias=False, attn_out=True, embed_bias=False, readout="token", init="torch"),
    # Raventós et al. base PT: GPT-2, 8 layers, d 128, 2 heads, tanh-GELU MLP 4x, learned positions.
    "raventos-base": dict(n_layers=8, d_model=128, n_heads=2, d_head=64, d_mlp=512, activation="gelu_tanh",
                          pos_emb=True, attn_bias=True, attn_out=True, embed_bias=False, readout="scalar",
                          init="gpt2"),
    # Raventós et al. small PT (4 layers, d 64, 2 heads): the CPU-sized GPT-2 preset.
    "raventos-small": dict(n_layers=4, d_model=64, n_heads=2, d_head=32, d_mlp=256, activation="gelu_tanh",
                           pos_emb=True, attn_bias=True, attn_out=True, embed_bias=False, readout="scalar",
                           init="gpt2"),
}


def preset_fields(name: str) -> dict[str, Any]:
    """The ModelConfig fields of a preset; unknown names raise naming the allowed ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class TaskConfig(_Strict):
    """In-context linear regression data (docs/papers.md §A1-A2)."""

    family: Family = Field("unit_norm", description="task prior: 'gaussian' (w ~ N(0, I_D)) or 'unit_norm'")
    D: int = Field(8, ge=1, description="input / task dimension")
    K: int = Field(16, ge=1, description="number of (x, y) pairs per sequence")
    M: int | None = Field(2, description="task diversity: pool size >= 1, or None / 'inf' for a fresh task each")
    noise_var: float = Field(0.0, ge=0.0, description="label noise variance sigma^2 (0 = noiseless)")

    @field_validator("M", mode="before")
    @classmethod
    def _parse_m(cls, v: Any) -> Any:
        return parse_m(v)

    @field_validator("M")
    @classmethod
    def _check_m(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"M must be an integer >= 1 or 'inf' (fresh task per sequence), got {v}")
        return v


class ModelConfig(_Strict):
    """Architecture of the ICL transformer (model.py). Start from a preset, override any field."""

    preset: str = Field("seed", description="preset the fields were filled from (see config.PRESETS)")
    n_layers: int = Field(2, ge=1)
    d_model: int = Field(64, ge=1)
    n_heads: int = Field(4, ge=1)
    d_head: int = Field(32, ge=1)
    d_mlp: int = Field(128, ge=1)
    activation: Activation = "relu"
    pos_emb: bool = Field(False, description="learned positional embedding (the seed model has none)")
    attn_bias: bool = Field(True, description="biases on Q, K, V and the attention output")
    attn_out: bool = Field(True, description="include the attention output projection W_O")
    embed_bias: bool = Field(True, description="bias on the input projection")
    readout: Readout = Field("token", description="'token': LN + Linear(d, D+1) read at the y channel; "
                             "'scalar': LN + Linear(d, 1) without bias")
    init: InitScheme = "transformer_lens"
    ln_eps: float = Field(1e-5, gt=0)


class TrainConfig(_Strict):
    """Optimisation, evaluation and checkpointing (train.py)."""

    steps: int = Field(5000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Schedule = "constant"
    warmup_frac: float = Field(0.5, ge=0, le=1, description="triangle / cosine warm-up fraction")
    cooldown_frac: float = Field(0.2, gt=0, le=1, description="constant_cooldown: the final fraction of the steps "
                                 "over which the learning rate falls linearly to 0")
    grad_clip: float | None = Field(None, gt=0, description="max global grad norm, None = off")
    n_checkpoints_linear: int | None = Field(None, ge=0, description="linearly spaced checkpoints incl. 0 and "
                                             "the final step; None: min(20, steps + 1)")
    n_checkpoints_log: int | None = Field(None, ge=0, description="log-spaced checkpoints in [1, steps]; "
                                          "None: min(30, steps)")
    eval_every: int | None = Field(None, ge=1, description="extra evaluations every N steps (None: checkpoints only)")
    eval_size: int = Field(1024, ge=1, description="sequences in each fixed evaluation set")
    device: str = "cpu"

    @property
    def checkpoint_counts(self) -> tuple[int, int]:
        """(linear, log) checkpoint counts with the defaults resolved."""
        lin = self.n_checkpoints_linear if self.n_checkpoints_linear is not None else min(20, self.steps + 1)
        log = self.n_checkpoints_log if self.n_checkpoints_log is not None else min(30, self.steps)
        return lin, log

    @model_validator(mode="after")
    def _check_checkpoints(self) -> TrainConfig:
        if self.n_checkpoints_linear is not None and self.n_checkpoints_linear > self.steps + 1:
            raise ValueError(f"n_checkpoints_linear={self.n_checkpoints_linear} is more than the steps+1="
                             f"{self.steps + 1} distinct steps available (allowed: 0..{self.steps + 1})")
        if self.n_checkpoints_log is not None and self.n_checkpoints_log > self.steps:
            raise ValueError(f"n_checkpoints_log={self.n_checkpoints_log} is more than steps={self.steps} "
                             f"(allowed: 0..{self.steps})")
        return self


class LLCConfig(_Strict):
    """SGLD hyper-parameters of the LLC estimator (llc.py; Hoogland et al. Eq. 5-6, Carroll et al. Eq. 9).

    The defaults are those validated on models with a known learning coefficient (icl_lab.ground_truth; the
    measurements and the reasons are in docs/llc.md, "Defaults and their validation"); `llc.calibrate` checks
    them, or chooses others, at the checkpoint at hand:
    - nbeta None: nβ = n / log n, i.e. β* = 1 / log n (Watanabe's WBIC temperature; Hoogland et al. §2.2).
    - localization None: γ = 0.01·nβ (llc.DEFAULT_LOCALIZATION_RATIO). Localisation suppresses a direction of
      curvature h by the factor nβh / (nβh + γ), so λ̂ counts the singular, flat directions that define the LLC
      only when γ/nβ is small.
    - step_size 1e-4: the largest ε at which the ground-truth networks read right at that γ/nβ; larger ε bias λ̂
      upwards, which no diagnostic of a singular model catches (λ̂ stays far below d/2).
    - num_burnin None: min_burnin(ε, γ) ≈ 3/(εγ), the relaxation time of the flat directions (llc.min_burnin).
    - 4 chains × 500 draws, minibatch 256.
    - vectorize None (auto): vmap on accelerators and on CPU for models with <= 20k sampled parameters, where
      per-step Python overhead dominates; the sequential path (chains on threads) on CPU above that.
    """

    step_size: float = Field(1e-4, gt=0, allow_inf_nan=False, description="SGLD step size epsilon")
    nbeta: float | None = Field(None, gt=0, allow_inf_nan=False,
                                description="n * beta; None -> n / log n (beta* = 1 / log n)")
    localization: float | None = Field(None, gt=0, allow_inf_nan=False,
                                       description="localisation strength gamma; None -> 0.01 * nbeta")
    num_chains: int = Field(4, ge=1)
    num_draws: int = Field(500, ge=1, description="draws kept after burn-in")
    num_burnin: int | None = Field(None, ge=0, description="draws discarded before the kept ones; None -> "
                                   "min_burnin(step_size, localization) = 3 / (epsilon gamma)")
    batch_size: int | None = Field(256, ge=1, description="SGLD minibatch size; None -> full data")
    vectorize: bool | None = Field(None, description="run chains together with torch.func.vmap; None (auto): "
                                   "on accelerators, and on CPU for models with <= 20k sampled parameters")
    sampler: Sampler = Field("sgld", description="sgld (Welling & Teh), rmsprop_sgld (diagonal preconditioner "
                             "adapted during burn-in, then frozen) or mala (exact: Metropolis-adjusted, full data)")
    rmsprop_alpha: float = Field(0.99, gt=0, lt=1, description="rmsprop_sgld: decay of the squared-gradient average")
    tilted: bool = Field(False, description="also sample the tilted loss ℓ_n(w) − ∇ℓ_n(w*)ᵀ(w − w*) and record its "
                         "λ̂ next to the plain one (exact for a quadratic off its minimum; twice the cost)")

    @model_validator(mode="after")
    def _mala_uses_full_data(self) -> LLCConfig:
        if self.sampler == "mala" and self.batch_size is not None:
            raise ValueError(f"sampler 'mala' needs batch_size None (the full data; its accept step is exact only "
                             f"for ℓ_n), got batch_size={self.batch_size}; allowed samplers: sgld, rmsprop_sgld, mala")
        return self


# Characters that some filesystem in common use rejects in a file name (Windows' set; POSIX rejects "/" and NUL).
_FORBIDDEN_NAME_CHARS = frozenset('/\\:*?"<>|')


def check_path_name(value: str, field: str) -> str:
    """`value`, when it is safe as ONE file or directory name; else ValueError naming `field`.

    Names in configs become paths (a run's directory, a sweep's runs). A separator or ".." would put files
    outside the directory the user gave, so only a plain name is allowed.
    """
    why = None
    if not isinstance(value, str) or not value.strip():
        why = "is empty"
    elif value in (".", "..") or value.startswith("."):
        why = "starts with '.' (a hidden or parent directory)"
    elif any(c in _FORBIDDEN_NAME_CHARS or ord(c) < 32 for c in value):
        why = "holds a path separator or a character a filesystem rejects"
    elif len(value.encode()) > 255:
        why = "is longer than 255 bytes"
    if why:
        raise ValueError(f"{field} {value!r} {why}; allowed: one file name, not starting with '.', without "
                         f"control characters or any of {''.join(sorted(_FORBIDDEN_NAME_CHARS))}")
    return value


class RunConfig(_Strict):
    """Everything that determines a training run. The same config gives bit-identical results on CPU."""

    name: str | None = None
    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @field_validator("name")
    @classmethod
    def _name_is_one_path_component(cls, v: str | None) -> str | None:
        return None if v is None else check_path_name(v, "name")

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


SECTIONS: dict[str, type[BaseModel]] = {"task": TaskConfig, "model": ModelConfig, "train": TrainConfig}


def leaf_fields() -> dict[str, str]:
    """Map each flat leaf field name to its section, e.g. {'M': 'task', 'lr': 'train', 'seed': ''}."""
    out = {"name": "", "seed": ""}
    for section, cls in SECTIONS.items():
        for key in cls.model_fields:
            assert key not in out, f"leaf field {key!r} is not unique"
            out[key] = section
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn flat overrides {'M': 2, 'lr': 1e-3} into the nested RunConfig layout; unknown keys raise."""
    leaves = leaf_fields()
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        if key in SECTIONS and isinstance(value, dict):
            nested.setdefault(key, {}).update(value)
            continue
        if key not in leaves:
            raise ValueError(f"unknown config key {key!r}; allowed keys: {', '.join(sorted(leaves))}")
        section = leaves[key]
        if section:
            nested.setdefault(section, {})[key] = value
        else:
            nested[key] = value
    return nested


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file (nested sections or flat keys)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        return tomllib.loads(text)
    if path.suffix == ".json":
        return json.loads(text)
    raise ValueError(f"config file must end in .toml or .json, got {path.name!r}")


def build_run_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
                     ) -> RunConfig:
    """Resolve a RunConfig: preset defaults, then the config file, then explicit overrides (flags).

    The model preset is applied first so that individual model fields can override it.
    """
    merged = nest(file_values or {})
    for section, values in nest(overrides or {}).items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update(values)
        else:
            merged[section] = values
    model = merged.get("model", {})
    preset = model.get("preset", ModelConfig.model_fields["preset"].default)
    merged["model"] = {**preset_fields(preset), **model, "preset": preset}
    return RunConfig.model_validate(merged)
