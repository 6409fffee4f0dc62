"""Training throughput and final loss: icl-lab against the user's own pipeline and a plain PyTorch model.

The reference is the user's code from the seed chat (seeds/000_e8ce135a7007c80a.txt, lines 5834-6121), copied
below verbatim except for wandb (removed) and the device (pinned to "cpu"): `LinearRegressionDataset`
(IterableDataset on the global RNG), `ICLTransformer` (TransformerLens HookedTransformer with use_split_qkv_input
and use_attn_result on, called with start_at_layer=0), `train_model` (AdamW, MSELoss, DataLoader, validation and
a state_dict deepcopy every 1000 steps) and `Run` (batch 32 hard-coded). icl-lab runs the same architecture
(preset `seed`, 101,449 trained parameters; the TransformerLens model also holds W_E and W_pos, which get no
gradient) on the same task setting: M = 2 unit-norm tasks, D = 8, K = 16, noise 0, AdamW lr 3e-3, wd 0.

Everything runs in ONE process with torch.set_num_threads(2) (`--threads 1,2` measures the step loops at each
count, interleaved, and runs train(), the final-loss runs and the profile at the first count):

1. Throughput, after warm-up, in interleaved rounds (common.interleaved_rounds: every configuration once per
   round, order rotated each round; the machine's 2 cores are shared with other jobs, so each ratio is also
   taken per round, side by side, and the median of those paired ratios is the headline):
   - seed / step loop: the body of the seed's `train_model` loop (next DataLoader batch, .to(device),
     zero_grad, forward, MSELoss, backward, AdamW step), without its every-1000-steps validation;
   - icl-lab / step loop: `sample_batch` + forward + squared-error loss + backward + AdamW (`make_optimizer`),
     exactly the step of `icl_lab.train.train`, without its checkpoints and evaluations;
   - plain PyTorch / step loop: `PlainModel` below, a hand-written nanoGPT-style model of the same shape
     (nn.Linear, nn.LayerNorm, F.scaled_dot_product_attention; icl-lab's weights load into it and it computes
     the same function), with fused torch.optim.AdamW, on the same `sample_batch` data;
   - icl-lab / train(): the whole `train(cfg, out, progress=False)` end to end (run directory, baselines on the
     fixed evaluation sets, the default 20 linear + 30 log checkpoints with an evaluation at each, parquet logs,
     resumable state), steps / wall time, 5,000 steps at batch 32 (the run a user types) and 1,000 at batch 256
     (the default schedule keeps its ~50 checkpoint evaluations whatever the length, so at 1,000 steps their
     share is larger: a conservative row);
   - a float32 2048×2048 matmul (best over all rounds = the machine's measured peak).
   Batches 32 and 256 for the step loops and train().
2. Final loss after `--steps` (5,000) steps at batch 32, `--seeds` seeds per pipeline. The seed pipeline is the
   user's `Run(num_tasks=2, seq_length=16, input_dim=8, seed=s, wandb_logging=False).train()` as written; its
   task pool comes from the global RNG (torch.manual_seed(s) in Run.__post_init__, after the model init).
   Choice: icl-lab trains on THAT SAME pool (the seed dataset's `.tasks`), with its own model init, training
   stream and optimizer (`build_model`, `make_generator(s, "train")`, `make_optimizer`, the loop of train()),
   so no normalisation is needed; both final models are then evaluated on one common fixed set of
   `--eval-size` (4,096) sequences drawn from that pool with a separate generator. The dMMSE loss on the same
   set (icl_lab.baselines.dmmse_predict, noise 0) is reported alongside as the Bayes floor. Equality test:
   Welch's two-sided t-test on the per-seed final losses (α = 0.05; "not significantly different" is what it
   can show, and with few seeds its power is low); the per-seed paired differences are reported too.
   The wall time of the seed's full `train_model` (incl. its validation) gives the seed's end-to-end row.
3. FLOPs (analytic, the same nominal count for both sides, so GFLOP/s is proportional to steps/s). Per sequence
   of T = 2K tokens, with d = d_model, H heads of size e, L layers, MLP width m:
       N_mm   = (D+1)·d                    input projection
              + L·(3·H·d·e + H·e·d)        Q, K, V and output projections
              + L·(2·d·m)                  MLP in and out
              + d·(D+1)                    unembedding (the seed computes all D+1 outputs at every token)
       F_fwd  = 2·N_mm·T + L·4·H·T²·e      matmuls, plus QKᵀ and A·V over the full T×T (as dense kernels do)
       F_step = 3·B·F_fwd                  backward ≈ 2× forward
   LayerNorm, softmax, biases, activations, data generation and AdamW (O(params)) are not counted. For the seed
   preset, D = 8, K = 16: N_mm = 99,456, F_fwd = 7.41 MFLOP per sequence, 711 MFLOP per step at batch 32.
   The peak is the best float32 2048×2048 matmul rate measured in the same run.

Results go to benchmarks/results/train_throughput.{json,md} (atomic writes). `--quick` is a smoke check only
(short chunks, 200 steps, 1 seed) and writes to a temporary folder unless `--out` is given.

    python benchmarks/train_throughput.py            # full run (~35 min on 2 idle cores; more under load)
    python benchmarks/train_throughput.py --quick    # ~2 min smoke check
"""

# ruff: noqa: E501, B007  (the seed code below is verbatim: one long docstring line, an unused loop variable)
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    interleaved_rounds,
    loadavg,
    machine_info,
    matmul_gflops,
    rate,
    set_threads,
    summarize,
    welch_test,
    write_atomic,
    write_json_atomic,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=FutureWarning)

# ================================================================================================================
# The user's pipeline: seed file lines 5834-6121, verbatim except wandb (removed, marked) and device ("cpu").
# ================================================================================================================
from copy import deepcopy  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from itertools import islice  # noqa: E402

import tqdm  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, TensorDataset  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402


class LinearRegressionDataset(IterableDataset):
    """
    Dataset for in-context linear regression tasks.

    Noise is set to 0.
    Task magnitude is standardized to 1.
    Generates samples on the fly.
    """
    def __init__(
        self,
        num_tasks: int,
        seq_length: int,
        input_dim: int,
    ):
        """
        Initialize the LinearRegressionDataset.

        Args:
            num_tasks (int): Number of different tasks to generate.
            seq_length (int): Length of the input sequence (number of x, y pairs).
                              Note: this is half of the context length that the transformer will see.
            input_dim (int): Dimensionality of the input vectors x.
        """
        self.num_tasks = num_tasks
        self.seq_length = seq_length
        self.input_dim = input_dim

        # Generate random tasks
        self.tasks = torch.randn(num_tasks, input_dim)

        # Standardize tasks to have unit norm
        self.tasks = self.tasks / ((self.tasks ** 2).sum(dim=-1) ** 0.5).unsqueeze(-1)

    def __iter__(self):
        # This is called when an iterator is created from the dataset
        while True:
            # Generate input sequence
            x = torch.randn(self.seq_length, self.input_dim)

            # Randomly assign task
            task_index = torch.randint(0, self.num_tasks, (1,)).item()
            task = self.tasks[task_index]

            # Generate output
            y = torch.matmul(x, task)

            yield x, y, task


class ICLTransformer(nn.Module):
    """
    Transformer model for in-context learning of linear regression tasks.

    This is a wrapper around transformer_lens's HookedTransformer class.
    """

    def __init__(
        self,
        input_dim: int,
        seq_length: int = 16,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_head: int = 32,
        d_mlp: int = 128,
        act_fn: str = "relu",
    ):
        """
        Initialize the ICLTransformer.

        Args:
            input_dim (int): Dimensionality of the input vectors x.
            seq_length (int, optional): Length of the input sequence. Defaults to 16.
            d_model (int, optional): Dimensionality of the model's hidden states. Defaults to 64.
            n_layers (int, optional): Number of transformer layers. Defaults to 2.
            n_heads (int, optional): Number of attention heads. Defaults to 4.
            d_head (int, optional): Dimensionality of each attention head. Defaults to 32.
            d_mlp (int, optional): Dimensionality of the feedforward network. Defaults to 128.
            act_fn (str, optional): Activation function for the feedforward network. Defaults to "relu".
        """
        super().__init__()

        self.device = device = "cpu"  # [benchmark] seed: "cuda" if torch.cuda.is_available() else "cpu"

        self.transformer = HookedTransformer(
            HookedTransformerConfig(
              n_layers=n_layers,
              n_ctx = 2 * seq_length,
              d_model=d_model,
              d_head=d_head,
              n_heads=n_heads,
              d_mlp=d_mlp,
              act_fn=act_fn,
              d_vocab=input_dim + 1,  # Not using embeddings in typical way
              # d_vocab_out=1,
              use_split_qkv_input=True,
              use_attn_result=True,
              device=device
            )
        )

        # Input projection
        self.input_proj = nn.Linear(input_dim + 1, d_model)  # + 1 for y value

        self.to(device)

    def output_proj(self, activations: torch.Tensor) -> torch.Tensor:
        """
        Project the transformer's output to the final prediction.

        Args:
            activations (torch.Tensor): Activations from the transformer.

        Returns:
            torch.Tensor: Predicted y values.
        """
        return activations[:,::2, -1]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """
        Forward pass of the ICLTransformer.

        Args:
            x (torch.Tensor): Input sequence of x values.
            y (torch.Tensor): Input sequence of y values.

        Returns:
            torch.Tensor: Predicted y values.
        """
        batch_size, seq_len, input_dim = x.shape

        # Interleave x and y into single input
        xy_combined = torch.zeros(batch_size, 2 * seq_len, input_dim + 1, device=self.device)
        xy_combined[:, ::2, :input_dim] = x
        xy_combined[:, 1::2, -1] = y

        # Project to d_model dimension
        hidden = self.input_proj(xy_combined)

        # Pass through transformer
        transformer_out = self.transformer(
            hidden,
            start_at_layer=0,  # Bypass embedding
            return_type="logits"  # Do not return loss (since our logits aren't really "logits")
        )

        predictions = self.output_proj(transformer_out)

        return predictions


def train_model(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    num_steps: int = 5000,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.,
    device: str = "cpu",  # [benchmark] seed: "cuda" if torch.cuda.is_available() else "cpu"
    wandb_logging: bool = True,
) -> list[dict]:
    """
    Train the ICLTransformer model.

    Args:
        model (nn.Module): The ICLTransformer model to train.
        train_loader (DataLoader): DataLoader for the training data.
        val_loader (DataLoader): DataLoader for the validation data.
        num_steps (int, optional): Number of training steps. Defaults to 5000.
        learning_rate (float, optional): Learning rate for the optimizer. Defaults to 1e-3.
        lr_frac (float, optional): Fraction of training steps after which to apply learning rate decay. Defaults to 0.25.
        weight_decay (float, optional): Weight decay for the optimizer. Defaults to 0.01.
        device (str, optional): Device to train on ('cuda' or 'cpu'). Defaults to 'cuda' if available, else 'cpu'.
        wandb_logging (bool, optional): Whether to log to Weights & Biases. Defaults to True.

    Returns:
        list[dict]: List of model checkpoints.
    """

    # [benchmark] removed: if wandb_logging: wandb.init(project="icl-linear-regression")

    model = model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    criterion = nn.MSELoss()

    model.train()

    checkpoints = []

    pbar = tqdm.tqdm(enumerate(train_loader), total=num_steps)

    for step, (x, y, _) in pbar:
        if step >= num_steps:
            break

        x, y = x.to(device), y.to(device)

        optimizer.zero_grad()
        predictions = model(x, y)
        loss = criterion(predictions, y)

        loss.backward()
        optimizer.step()

        if step % 1000 == 0:
            # Validation
            model.eval()
            val_loss = 0.0
            with torch.no_grad():
                for x, y, task in val_loader:
                    x, y = x.to(device), y.to(device)
                    predictions = model(x, y)
                    val_loss += criterion(predictions, y).item()

            val_loss /= len(val_loader)

            # [benchmark] removed: if wandb_logging: wandb.log({"batch_loss": loss.item(), "val_loss": val_loss})

            checkpoints.append(deepcopy(model.state_dict()))
            pbar.set_description(f"Batch Loss: {loss.item():.4f} | Val Loss: {val_loss:.4f}")

            model.train()

    return checkpoints


@dataclass
class Run:
    # Data
    num_tasks: int
    seq_length: int
    input_dim: int

    # Training
    num_steps: int = 5000
    learning_rate: float = 3e-3
    seed: int = 0
    wandb_logging: bool = True
    weight_decay: float = 0.0

    # Objects
    model: nn.Module = None
    train_loader: DataLoader = None
    val_loader: DataLoader = None
    checkpoints: list[dict] = field(default_factory=list)

    def __post_init__(self):
      torch.manual_seed(self.seed)

      self.model = ICLTransformer(input_dim=self.input_dim, seq_length=self.seq_length)
      dataset = LinearRegressionDataset(num_tasks=self.num_tasks, seq_length=self.seq_length, input_dim=self.input_dim)
      self.train_loader = DataLoader(dataset, batch_size=32)

      valset = [row for row in islice(iter(dataset), 0, 2048)]

      # Separate x, y, and task into lists
      x_val = [row[0] for row in valset]
      y_val = [row[1] for row in valset]
      task_val = [row[2] for row in valset]

      # Convert lists to tensors
      x_val = torch.stack(x_val)
      y_val = torch.stack(y_val)
      task_val = torch.stack(task_val)

      # Create TensorDataset and DataLoader for validation
      val_dataset = TensorDataset(x_val, y_val, task_val)
      self.val_loader = DataLoader(val_dataset, batch_size=32)

    def train(self):
        self.checkpoints = train_model(
            self.model,
            self.train_loader,
            self.val_loader,
            self.num_steps,
            self.learning_rate,
            wandb_logging=self.wandb_logging
        )
        return self.model

# ================================================================================================================
# End of the user's pipeline.
# ================================================================================================================

from icl_lab.baselines import dmmse_predict  # noqa: E402
from icl_lab.config import ModelConfig, RunConfig, TaskConfig, build_run_config  # noqa: E402
from icl_lab.model import build_model, count_parameters  # noqa: E402
from icl_lab.tasks import make_generator, sample_batch, task_pool  # noqa: E402
from icl_lab.train import make_optimizer, train  # noqa: E402

M, D, K, LR = 2, 8, 16, 3e-3
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_config(batch: int, steps: int, seed: int = 0) -> RunConfig:
    return build_run_config(overrides=dict(M=M, D=D, K=K, batch_size=batch, steps=steps, family="unit_norm",
                                           noise_var=0.0, lr=LR, seed=seed))


# ------------------------------------------------------------------------------------------------ FLOPs
def flops_per_step(cfg: ModelConfig, D: int, K: int, batch: int) -> dict[str, float]:
    """Nominal model FLOPs of one training step (formula in the module docstring)."""
    d, H, e, L, m, T = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers, cfg.d_mlp, 2 * K
    n_mm = (D + 1) * d + L * (3 * H * d * e + H * e * d) + L * 2 * d * m + d * (D + 1)
    fwd = 2 * n_mm * T + L * 4 * H * T * T * e
    return {"matmul_params_per_token": n_mm, "forward_flops_per_sequence": fwd, "step_flops": 3 * batch * fwd}


# ------------------------------------------------------------------------------------------------ step loops
class SeedSteps:
    """The seed's training step (the body of `train_model`'s loop) on its own DataLoader, batch B."""

    def __init__(self, batch: int, seed: int = 0, device: str = "cpu"):
        torch.manual_seed(seed)
        self.model = ICLTransformer(input_dim=D, seq_length=K).to(device)
        dataset = LinearRegressionDataset(num_tasks=M, seq_length=K, input_dim=D)
        self.batches = iter(DataLoader(dataset, batch_size=batch))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)
        self.criterion = nn.MSELoss()
        self.device = device
        self.model.train()

    def __call__(self, n: int) -> None:
        model, optimizer, criterion, device = self.model, self.optimizer, self.criterion, self.device
        for _ in range(n):
            x, y, _ = next(self.batches)
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            predictions = model(x, y)
            loss = criterion(predictions, y)
            loss.backward()
            optimizer.step()


class IclSteps:
    """icl-lab's training step as in `icl_lab.train.train`: sample_batch, forward, loss, backward, AdamW."""

    def __init__(self, batch: int, seed: int = 0, pool: torch.Tensor | None = None):
        cfg = run_config(batch, steps=5000, seed=seed)
        self.task, self.batch = cfg.task, batch
        self.model = build_model(cfg.task, cfg.model, cfg.seed)
        self.opt = make_optimizer(self.model, cfg.train)
        self.gen = make_generator(cfg.seed, "train")
        self.pool = task_pool(cfg.task.family, M, D, cfg.seed) if pool is None else pool
        self.model.train()

    def __call__(self, n: int) -> None:
        model, opt = self.model, self.opt
        for _ in range(n):
            batch = sample_batch(self.task, self.pool, self.batch, self.gen)
            loss = (model(batch.x, batch.y) - batch.y).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def phases(self, n: int) -> dict[str, float]:
        """Mean ms per step spent in each phase (data, forward + loss, backward, optimizer) over n steps."""
        model, opt = self.model, self.opt
        acc = dict(data=0.0, forward=0.0, backward=0.0, optimizer=0.0)
        for _ in range(n):
            t0 = time.perf_counter()
            batch = sample_batch(self.task, self.pool, self.batch, self.gen)
            t1 = time.perf_counter()
            loss = (model(batch.x, batch.y) - batch.y).square().mean()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.perf_counter()
            opt.step()
            t4 = time.perf_counter()
            for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4)):
                acc[k] += b - a
        return {k: 1e3 * v / n for k, v in acc.items()}


class PlainBlock(nn.Module):
    """Pre-LN block written the usual way: one qkv nn.Linear, F.scaled_dot_product_attention, ReLU MLP."""

    def __init__(self, d: int, H: int, e: int, m: int):
        super().__init__()
        self.H, self.e = H, e
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * H * e), nn.Linear(H * e, d)
        self.fc, self.out = nn.Linear(d, m), nn.Linear(m, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, _ = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, T, 3, self.H, self.e).permute(2, 0, 3, 1, 4)  # (B, H, T, e) each
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(z.transpose(1, 2).reshape(B, T, -1))
        return h + self.out(F.relu(self.fc(self.ln2(h))))


class PlainModel(nn.Module):
    """The seed architecture as one would write it in plain PyTorch: forward(x: (B, K, D), y: (B, K)) -> (B, K)."""

    def __init__(self, D: int, d: int = 64, H: int = 4, e: int = 32, m: int = 128, L: int = 2):
        super().__init__()
        self.embed = nn.Linear(D + 1, d)
        self.blocks = nn.ModuleList(PlainBlock(d, H, e, m) for _ in range(L))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, D + 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, K, D = x.shape
        tokens = x.new_zeros(B, 2 * K, D + 1)
        tokens[:, 0::2, :D] = x
        tokens[:, 1::2, D] = y
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h[:, 0::2]))[..., -1]

    @torch.no_grad()
    def load_icl(self, icl: nn.Module) -> PlainModel:
        """Copy an icl-lab seed-preset model's weights (TransformerLens layout) into this one; returns self."""
        self.embed.weight.copy_(icl.embed.W_E.T)
        self.embed.bias.copy_(icl.embed.b_E)
        for mine, block in zip(self.blocks, icl.blocks, strict=True):
            a = block.attn
            mine.ln1.weight.copy_(block.ln1.w)
            mine.ln1.bias.copy_(block.ln1.b)
            mine.ln2.weight.copy_(block.ln2.w)
            mine.ln2.bias.copy_(block.ln2.b)
            mine.qkv.weight.copy_(torch.stack([a.W_Q, a.W_K, a.W_V]).transpose(-1, -2).reshape(-1, a.W_Q.shape[1]))
            mine.qkv.bias.copy_(torch.stack([a.b_Q, a.b_K, a.b_V]).reshape(-1))
            mine.proj.weight.copy_(a.W_O.reshape(-1, a.W_O.shape[-1]).T)
            mine.proj.bias.copy_(a.b_O)
            mine.fc.weight.copy_(block.mlp.W_in.T)
            mine.fc.bias.copy_(block.mlp.b_in)
            mine.out.weight.copy_(block.mlp.W_out.T)
            mine.out.bias.copy_(block.mlp.b_out)
        self.ln_f.weight.copy_(icl.ln_final.w)
        self.ln_f.bias.copy_(icl.ln_final.b)
        self.head.weight.copy_(icl.unembed.W_U.T)
        self.head.bias.copy_(icl.unembed.b_U)
        return self


class PlainSteps(IclSteps):
    """The plain model's training step on icl-lab's data stream: sample_batch, forward, loss, backward, fused AdamW.
    It starts from icl-lab's initial weights."""

    def __init__(self, batch: int, seed: int = 0):
        super().__init__(batch, seed)
        self.model = PlainModel(D).load_icl(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0, fused=True)


def plain_model_check() -> float:
    """Largest |plain − icl-lab| prediction on one batch with the same weights (the two compute one function)."""
    cfg = run_config(32, 5000)
    icl = build_model(cfg.task, cfg.model, cfg.seed)
    batch = sample_batch(cfg.task, None, 32, make_generator(1, "plain-check"))
    with torch.no_grad():
        return (PlainModel(D).load_icl(icl)(batch.x, batch.y) - icl(batch.x, batch.y)).abs().max().item()


def e2e_steps(args: argparse.Namespace, batch: int) -> int:
    """Steps of each train() run: --e2e-steps if given, else 5000 at batch 32 and 1000 at batch 256."""
    return args.e2e_steps if args.e2e_steps is not None else (5000 if batch <= 32 else 1000)


def train_e2e(batch: int, steps: int) -> float:
    """Steps/s of icl-lab's full `train()` (default checkpoint/evaluation schedule), wall time end to end."""
    cfg = run_config(batch, steps)
    with tempfile.TemporaryDirectory(prefix="icl-bench-") as tmp:
        t0 = time.perf_counter()
        train(cfg, Path(tmp) / "run", progress=False)
        return steps / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ phases
def measure_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds over every (configuration, thread count); train() runs at the primary count only."""
    batches, threads, primary = (32, 256), args.threads, args.threads[0]
    seed_loops = {b: SeedSteps(b) for b in batches}
    icl_loops = {b: IclSteps(b) for b in batches}
    plain_loops = {b: PlainSteps(b) for b in batches}
    chunk: dict[str, int] = {}
    for t in threads:  # warm-up, then size each chunk to last about --chunk-seconds at the warm rate
        set_threads(t)
        log(f"warm-up, {t} thread(s)")
        for b in batches:
            seed_loops[b](3)
            icl_loops[b](20)
            plain_loops[b](20)
            chunk[f"seed/b{b}/t{t}"] = max(3, round(rate(seed_loops[b], 3 if b > 32 else 10) * args.chunk_seconds))
            chunk[f"icl/b{b}/t{t}"] = max(10, round(rate(icl_loops[b], 50) * args.chunk_seconds))
            chunk[f"plain/b{b}/t{t}"] = chunk[f"icl/b{b}/t{t}"]  # the same number of steps as icl-lab's chunk
        matmul_gflops(args.matmul_n, 1)
    set_threads(primary)
    train_e2e(32, 20)  # warms train()'s own code paths (evaluation, baselines, store)
    log(f"chunk sizes (steps): {chunk}")

    def at(t: int, fn):
        def f():
            set_threads(t)
            try:
                return fn()
            finally:
                set_threads(primary)
        return f

    done = {b: 0 for b in batches}

    def e2e(b: int):
        def f() -> float | None:
            if done[b] >= args.e2e_rounds:
                return None
            done[b] += 1
            return train_e2e(b, e2e_steps(args, b))
        return f

    tasks: dict[str, Any] = {}
    for b in batches:
        for t in threads:
            tasks[f"seed/b{b}/t{t}"] = at(t, lambda b=b, t=t: rate(seed_loops[b], chunk[f"seed/b{b}/t{t}"]))
            tasks[f"icl/b{b}/t{t}"] = at(t, lambda b=b, t=t: rate(icl_loops[b], chunk[f"icl/b{b}/t{t}"]))
            tasks[f"plain/b{b}/t{t}"] = at(t, lambda b=b, t=t: rate(plain_loops[b], chunk[f"plain/b{b}/t{t}"]))
        tasks[f"icl-train/b{b}/t{primary}"] = e2e(b)
    for t in threads:
        tasks[f"matmul/t{t}"] = at(t, lambda: max(matmul_gflops(args.matmul_n, 3)))
    loads: list[list[float] | None] = []

    def on_round(r: int, values: dict[str, float]) -> None:
        loads.append(loadavg())
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items())
            + f"  (load {loads[-1]})")

    log(f"throughput: {args.rounds} interleaved rounds")
    t0 = time.perf_counter()
    values = interleaved_rounds(tasks, args.rounds, on_round)
    return {"chunk_steps": chunk, "rounds": values, "loadavg_per_round": loads,
            "wall_s": time.perf_counter() - t0, "plain_model_max_abs_diff": plain_model_check()}


@torch.no_grad()
def eval_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 512) -> float:
    was = model.training
    model.eval()
    pred = torch.cat([model(x[i:i + chunk], y[i:i + chunk]) for i in range(0, len(x), chunk)])
    model.train(was)
    return (pred - y).square().mean().item()


def final_loss_seed(s: int, steps: int, eval_size: int) -> dict[str, Any]:
    """One seed of the final-loss comparison, in its own process with one torch thread (see measure_final_loss)."""
    torch.set_num_threads(1)
    task_cfg = TaskConfig(family="unit_norm", D=D, K=K, M=M, noise_var=0.0)
    log(f"final loss, seed {s}: seed pipeline Run(...).train(), {steps} steps at batch 32")
    t0 = time.perf_counter()
    run = Run(num_tasks=M, seq_length=K, input_dim=D, num_steps=steps, seed=s, wandb_logging=False)
    t1 = time.perf_counter()
    seed_model = run.train()
    t2 = time.perf_counter()
    pool = run.train_loader.dataset.tasks.clone()

    log(f"final loss, seed {s}: icl-lab step loop on the same pool, {steps} steps at batch 32")
    icl = IclSteps(32, seed=s, pool=pool)
    t3 = time.perf_counter()
    icl(steps)
    t4 = time.perf_counter()

    ev = sample_batch(task_cfg, pool, eval_size, torch.Generator().manual_seed(10_000 + s))
    row = {
        "seed": s,
        "pool": pool.tolist(),
        "seed_loss": eval_loss(seed_model, ev.x, ev.y),
        "icl_loss": eval_loss(icl.model, ev.x, ev.y),
        "dmmse_loss": (dmmse_predict(ev.x, ev.y, pool, 0.0) - ev.y).square().mean().item(),
        "seed_setup_s": t1 - t0,
        "seed_train_model_s": t2 - t1,
        "seed_train_model_steps_per_s": steps / (t2 - t1),
        "icl_loop_s": t4 - t3,
        "icl_loop_steps_per_s": steps / (t4 - t3),
    }
    log(f"  seed {s}: seed-pipeline loss {row['seed_loss']:.4g}, icl-lab loss {row['icl_loss']:.4g}, "
        f"dMMSE {row['dmmse_loss']:.4g}; seed train_model {row['seed_train_model_s']:.0f} s, "
        f"icl-lab loop {row['icl_loop_s']:.1f} s")
    return row


def measure_final_loss(args: argparse.Namespace) -> dict[str, Any]:
    """Seeds run in `--loss-workers` spawned processes of one torch thread each (the seed's Run reseeds the
    global RNG, so each seed needs its own process anyway); the timings in these rows are one-thread timings
    with the other core busy with another seed."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=args.loss_workers, mp_context=mp.get_context("spawn")) as ex:
        per_seed = list(ex.map(final_loss_seed, range(args.seeds), [args.steps] * args.seeds,
                               [args.eval_size] * args.seeds))
    seed_l = [r["seed_loss"] for r in per_seed]
    icl_l = [r["icl_loss"] for r in per_seed]
    test = welch_test(icl_l, seed_l)
    equal = None if test["p"] is None else bool(test["p"] > 0.05)
    return {
        "steps": args.steps, "batch": 32, "eval_size": args.eval_size, "per_seed": per_seed,
        "seed_pipeline": summarize(seed_l), "icl_lab": summarize(icl_l),
        "dmmse": summarize([r["dmmse_loss"] for r in per_seed]),
        "paired_difference_icl_minus_seed": summarize([a - b for a, b in zip(icl_l, seed_l, strict=True)]),
        "welch": test, "alpha": 0.05, "not_significantly_different": equal,
    }


def profile_steps(args: argparse.Namespace) -> dict[str, Any]:
    """torch.profiler tables (self CPU time) of the icl-lab and seed steps at batch 32, plus a phase split."""
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for name, loop, n in (("icl", IclSteps(32), args.profile_steps), ("seed", SeedSteps(32), args.profile_steps // 5)):
        loop(5)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loop(n)
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in rows)
        out[name] = {
            "steps": n,
            "self_cpu_ms_per_step_total": total / 1e3 / n,
            "top_ops": [{"op": e.key, "calls_per_step": e.count / n, "self_cpu_ms_per_step": e.self_cpu_time_total
                         / 1e3 / n, "share": e.self_cpu_time_total / total} for e in rows[:15]],
        }
    icl = IclSteps(32)
    icl(20)
    out["icl_phases_ms_per_step"] = icl.phases(args.profile_steps)
    return out


# ------------------------------------------------------------------------------------------------ report
LABELS = {
    "seed": ("seed pipeline", "step loop: DataLoader batch + fwd + bwd + AdamW"),
    "icl": ("icl-lab", "step loop: sample_batch + fwd + bwd + AdamW"),
    "plain": ("plain PyTorch", "step loop: sample_batch + fwd + bwd + fused AdamW"),
    "icl-train": ("icl-lab", "`train()` end to end (checkpoints + evals)"),
    "seed-train": ("seed pipeline", "`train_model` end to end (val every 1000)"),
}


PARAMS: dict[str, int] = {}  # filled once in main(): building the seed model draws from the global RNG


def build_results(args: argparse.Namespace, machine: dict[str, Any], thr: dict[str, Any] | None,
                  loss: dict[str, Any] | None, prof: dict[str, Any] | None, wall: float, complete: bool
                  ) -> dict[str, Any]:
    """The JSON document. Throughput keys are 'KIND/bBATCH/tTHREADS' (KIND: seed, icl, icl-train, seed-train)."""
    cfg = run_config(32, 5000)
    primary = args.threads[0]
    res: dict[str, Any] = {
        "benchmark": "train_throughput", "complete": complete, "quick": args.quick, "machine": machine,
        "command": "python benchmarks/train_throughput.py " + " ".join(args.argv),
        "settings": {"M": M, "D": D, "K": K, "lr": LR, "family": "unit_norm", "noise_var": 0.0,
                     "threads": args.threads, "primary_threads": primary, "rounds": args.rounds,
                     "chunk_seconds": args.chunk_seconds,
                     "e2e_steps": {f"b{b}": e2e_steps(args, b) for b in (32, 256)},
                     "e2e_rounds": args.e2e_rounds, "loss_steps": args.steps, "seeds": args.seeds,
                     "eval_size": args.eval_size, "matmul_n": args.matmul_n},
        "params_trained": {**PARAMS,
                           "note": "the seed's total includes W_E and W_pos, which start_at_layer=0 never uses "
                                   "(grad None); its trained count equals icl-lab's"},
        "flops_formula": "F_step = 3*B*(2*N_mm*T + L*4*H*T^2*e), T = 2K; N_mm = (D+1)d + L(4Hde + 2dm) + d(D+1)",
        "flops_per_step": {f"b{b}": flops_per_step(cfg.model, D, K, b) for b in (32, 256)},
        "wall_time_s": wall,
    }
    rows: dict[str, Any] = {}
    peaks: dict[int, float] = {}
    if thr is not None:
        peaks = {t: max(thr["rounds"][f"matmul/t{t}"]) for t in args.threads}
        res["matmul_peak"] = {f"t{t}": {"n": args.matmul_n, "dtype": "float32", "gflops_best": peaks[t],
                                        "per_round_best": thr["rounds"][f"matmul/t{t}"]} for t in args.threads}
        res["throughput_meta"] = {k: thr[k] for k in ("chunk_steps", "loadavg_per_round", "wall_s")}
        res["plain_model_max_abs_diff"] = thr["plain_model_max_abs_diff"]
        for key, vals in thr["rounds"].items():
            if key.startswith("matmul") or not vals:
                continue
            rows[key] = {"steps_per_s": summarize(vals)}
        ratios = {}
        for b in (32, 256):
            for t in args.threads:
                sv = thr["rounds"][f"seed/b{b}/t{t}"]
                for kind in ("plain", "icl", "icl-train"):
                    iv = thr["rounds"].get(f"{kind}/b{b}/t{t}")
                    if not iv:
                        continue
                    paired = [i / s for i, s in zip(iv, sv, strict=False)]  # train() ran in the first rounds
                    ratios[f"{kind}/b{b}/t{t} vs seed/b{b}/t{t}"] = {
                        "paired_median": summarize(paired)["median"], "paired_min": min(paired),
                        "paired_max": max(paired), "paired_values": paired,
                        "ratio_of_medians": summarize(iv)["median"] / summarize(sv)["median"],
                        "ratio_of_best": max(iv) / max(sv)}
                iv, pv = thr["rounds"][f"icl/b{b}/t{t}"], thr["rounds"][f"plain/b{b}/t{t}"]
                paired = [i / p for i, p in zip(iv, pv, strict=True)]
                ratios[f"icl/b{b}/t{t} vs plain/b{b}/t{t}"] = {
                    "paired_median": summarize(paired)["median"], "paired_min": min(paired), "paired_max": max(paired),
                    "paired_values": paired, "ratio_of_medians": summarize(iv)["median"] / summarize(pv)["median"],
                    "ratio_of_best": max(iv) / max(pv)}
        res["ratios"] = ratios
        res["target_plain"] = []
        for b in (32, 256):
            for t in args.threads:
                r = ratios[f"icl/b{b}/t{t} vs plain/b{b}/t{t}"]
                res["target_plain"].append({"what": "icl-lab step loop >= plain PyTorch step loop", "batch": b,
                                            "threads": t, "ratio_paired_median": r["paired_median"],
                                            "ratio_of_best": r["ratio_of_best"], "met": r["paired_median"] >= 1})
        res["target"] = []
        for t in args.threads:
            r = ratios[f"icl/b32/t{t} vs seed/b32/t{t}"]
            res["target"].append({"what": "icl-lab step loop >= 10x the seed step loop at batch 32", "threads": t,
                                  "ratio_paired_median": r["paired_median"], "ratio_of_best": r["ratio_of_best"],
                                  "met": r["paired_median"] >= 10})
    if loss is not None:
        res["final_loss"] = loss
        rows[f"seed-train/b32/t{primary}"] = {
            "steps_per_s": summarize([r["seed_train_model_steps_per_s"] for r in loss["per_seed"]]),
            "measured_in": "final-loss phase (not interleaved; 1 thread per seed, seeds in parallel processes)", "steps": loss["steps"]}
    for key, row in rows.items():
        kind, b, t = key.split("/")
        b, t = int(b[1:]), int(t[1:])
        row.update(pipeline=LABELS[kind][0], what=LABELS[kind][1], batch=b, threads=t)
        if t in peaks:
            g = row["steps_per_s"]["median"] * flops_per_step(cfg.model, D, K, b)["step_flops"] / 1e9
            row.update(gflops=g, pct_of_peak=100 * g / peaks[t])
    order = {"seed": 0, "plain": 1, "icl": 2, "icl-train": 3, "seed-train": 4}
    res["throughput"] = dict(sorted(rows.items(), key=lambda kv: (kv[1]["threads"] != primary, kv[1]["threads"],
                                                                 kv[1]["batch"], order[kv[0].split("/")[0]])))
    if prof is not None:
        res["profile"] = prof
    return res


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    loads = res.get("throughput_meta", {}).get("loadavg_per_round", [])
    out = [f"# Training throughput: icl-lab vs the seed pipeline and plain PyTorch"
           f"{' (QUICK smoke run)' if res['quick'] else ''}",
           "", f"{m['cpu_model']}, {m['cores_available']} cores, torch {m['torch']}, "
           f"transformer-lens {m['packages'].get('transformer-lens')}, {m['date_utc']}. Threads measured: "
           f"{s['threads']} (train() runs and the final-loss runs use {s['primary_threads']}). "
           f"Full run wall time {res['wall_time_s'] / 60:.1f} min."
           + ("" if res["complete"] else " **INCOMPLETE: a phase failed or is still to run.**"), "",
           f"The 2 cores are shared with other jobs: 1-minute load average {m['loadavg_at_start']} at the start, "
           f"{m.get('loadavg_at_end')} at the end, per round {[x[0] for x in loads if x]}.", "",
           "Setting: seed architecture (2 layers, d_model 64, 4×32 heads, MLP 128, "
           f"{res['params_trained']['icl_lab']:,} trained parameters), M = 2 unit-norm tasks, D = 8, K = 16, "
           "noise 0, AdamW lr 3e-3. Produced by `" + res["command"].strip() + "` (method in its docstring).", ""]
    if "matmul_peak" in res:
        e2 = s["e2e_steps"]
        pk = ", ".join(f"{v['gflops_best']:.1f} GFLOP/s at {k[1:]} thread(s)" for k, v in res["matmul_peak"].items())
        out += [f"## Steps/s (median over {s['rounds']} interleaved rounds; train() rows: {s['e2e_rounds']} runs "
                f"of {e2['b32']} steps at batch 32, {e2['b256']} at batch 256)", "",
                f"Measured peak (float32 {s['matmul_n']}² matmul, best of all rounds): {pk}. GFLOP/s counts nominal "
                f"model FLOPs (`{res['flops_formula']}`; {res['flops_per_step']['b32']['step_flops'] / 1e6:.0f} "
                "MFLOP per step at batch 32); % of peak is against the peak at the same thread count.", "",
                "| pipeline | what is timed | batch | threads | steps/s median [min–max] | × seed, paired median "
                "[min–max] | × plain PyTorch, paired median [min–max] | GFLOP/s | % of peak |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, r in res["throughput"].items():
            st = r["steps_per_s"]
            ratio = res["ratios"].get(f"{key} vs seed/b{r['batch']}/t{r['threads']}")
            rtxt = f"**{ratio['paired_median']:.1f}×** [{ratio['paired_min']:.1f}–{ratio['paired_max']:.1f}]" \
                if ratio else ("1×" if key.startswith("seed/") else "—")
            vp = res["ratios"].get(f"{key} vs plain/b{r['batch']}/t{r['threads']}")
            ptxt = f"**{vp['paired_median']:.3f}×** [{vp['paired_min']:.3f}–{vp['paired_max']:.3f}]" if vp else \
                ("1×" if key.startswith("plain/") else "—")
            out.append(f"| {r['pipeline']} | {r['what']} | {r['batch']} | {r['threads']} | {st['median']:.2f} "
                       f"[{st['min']:.2f}–{st['max']:.2f}] | {rtxt} | {ptxt} | {r.get('gflops', float('nan')):.2f} "
                       f"| {r.get('pct_of_peak', float('nan')):.1f} |")
        out.append("")
        out.append(f"The plain PyTorch model holds icl-lab's weights and computes the same function (largest "
                   f"prediction difference {res.get('plain_model_max_abs_diff', float('nan')):.1e} on a batch of 32); "
                   "icl-lab's last block computes only the x positions that the readout reads, the plain model "
                   "every position, as it is usually written.")
        out.append("")
        for t in res.get("target_plain", []):
            out.append(f"- Target (icl-lab step loop ≥ plain PyTorch's), batch {t['batch']}, {t['threads']} "
                       f"thread(s): **{'met' if t['met'] else 'NOT met'}**: {t['ratio_paired_median']:.3f}× paired "
                       f"median, {t['ratio_of_best']:.3f}× best round against best round.")
        for t in res["target"]:
            out.append(f"- Target (icl-lab step loop ≥ 10× the seed's at batch 32), {t['threads']} thread(s): "
                       f"**{'met' if t['met'] else 'NOT met'}**: {t['ratio_paired_median']:.1f}× paired median, "
                       f"{t['ratio_of_best']:.1f}× best round against best round.")
        out += ["- The seed's `train_model` row was timed during the final-loss runs (not interleaved).", ""]
    if "final_loss" in res:
        fl = res["final_loss"]
        w = fl["welch"]
        out += [f"## Final loss after {fl['steps']:,} steps at batch 32", "",
                *([f"Measured on {fl['reused_from']} with the code of that day and kept here (`--reuse-loss`); "
                   "changes to the training step since then (see git log) are not reflected in this section.", ""]
                  if "reused_from" in fl else []),
                "Both pipelines train on the same 2-task pool per seed (the seed dataset's global-RNG pool); "
                f"both final models are evaluated on one fixed set of {fl['eval_size']:,} sequences from that pool.",
                "", "| seed | seed pipeline | icl-lab | dMMSE (Bayes floor) | seed train_model s | icl-lab loop s |",
                "|---:|---:|---:|---:|---:|---:|"]
        for r in fl["per_seed"]:
            out.append(f"| {r['seed']} | {r['seed_loss']:.3e} | {r['icl_loss']:.3e} | {r['dmmse_loss']:.3e} | "
                       f"{r['seed_train_model_s']:.0f} | {r['icl_loop_s']:.1f} |")
        sp, ic = fl["seed_pipeline"], fl["icl_lab"]
        p = "n/a" if w["p"] is None else f"{w['p']:.3g}"
        verdict = {True: "not significantly different", False: "significantly different",
                   None: "not testable"}[fl["not_significantly_different"]]
        out += ["", f"Mean ± std over {sp['n']} seeds: seed pipeline {sp['mean']:.3e} ± {sp['std']:.2e}; "
                f"icl-lab {ic['mean']:.3e} ± {ic['std']:.2e}.", "",
                f"Welch two-sided t-test (α = {fl['alpha']}): t = "
                f"{'n/a' if w['t'] is None else format(w['t'], '.3g')}, dof = "
                f"{'n/a' if w['dof'] is None else format(w['dof'], '.3g')}, p = {p} → **{verdict}** "
                "(absence of evidence only; power is low with few seeds).", ""]
    if "profile" in res:
        pr = res["profile"]
        ph = pr["icl_phases_ms_per_step"]
        out += [f"## Where the icl-lab step spends its time (batch 32, {s['primary_threads']} thread(s))", "",
                "Phase split (no profiler): " + ", ".join(f"{k} {v:.2f} ms" for k, v in ph.items())
                + f" (total {sum(ph.values()):.2f} ms/step).", "",
                f"torch.profiler, self CPU time per step (profiler overhead included; total "
                f"{pr['icl']['self_cpu_ms_per_step_total']:.2f} ms/step icl-lab vs "
                f"{pr['seed']['self_cpu_ms_per_step_total']:.2f} ms/step seed):", "",
                "| op (icl-lab) | calls/step | self ms/step | share |", "|---|---:|---:|---:|"]
        for o in pr["icl"]["top_ops"][:12]:
            out.append(f"| `{o['op']}` | {o['calls_per_step']:.0f} | {o['self_cpu_ms_per_step']:.3f} | "
                       f"{100 * o['share']:.1f}% |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke check: short chunks, 200 steps, 1 seed")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per pipeline for the final loss (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="training steps for the final loss (default 5000)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved throughput rounds (default 6)")
    ap.add_argument("--chunk-seconds", type=float, default=None, help="target seconds per timed chunk (default 6)")
    ap.add_argument("--e2e-steps", type=int, default=None, help="steps of each train() end-to-end run "
                    "(default 5000 at batch 32, 1000 at batch 256)")
    ap.add_argument("--e2e-rounds", type=int, default=None, help="rounds that include a train() run (default 2)")
    ap.add_argument("--eval-size", type=int, default=4096, help="sequences in the common evaluation set")
    ap.add_argument("--loss-workers", type=int, default=2, help="processes for the final-loss seeds (default 2)")
    ap.add_argument("--threads", type=lambda v: [int(t) for t in v.split(",")], default=[THREADS],
                    help="torch intra-op thread counts for the step loops, comma-separated (default 2); the "
                    "first also runs train(), the final-loss runs and the profile")
    ap.add_argument("--matmul-n", type=int, default=2048)
    ap.add_argument("--profile-steps", type=int, default=100)
    ap.add_argument("--skip", action="append", default=[], choices=["throughput", "loss", "profile"])
    ap.add_argument("--reuse-loss", action="store_true", help="with --skip loss: keep the final-loss section of the "
                    "results file already in --out (its date is recorded), e.g. after a change that cannot move it")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                    "--quick: a temporary folder)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.reuse_loss and "loss" not in args.skip:
        ap.error("--reuse-loss keeps an earlier final-loss section, so it needs --skip loss")
    q = args.quick
    defaults = dict(seeds=1 if q else 2, steps=200 if q else 5000, rounds=2 if q else 6,
                    chunk_seconds=1.0 if q else 6.0, e2e_rounds=1 if q else 2)
    if q and args.e2e_steps is None:
        args.e2e_steps = 200
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if q:
        args.profile_steps = min(args.profile_steps, 20)
    out = args.out or (Path(tempfile.gettempdir()) / "icl-lab-bench-quick" if q else RESULTS)

    set_threads(args.threads[0])
    machine = machine_info()
    cfg = run_config(32, 5000)
    PARAMS.update(icl_lab=count_parameters(build_model(cfg.task, cfg.model, 0)),
                  seed_pipeline=sum(p.numel() for p in ICLTransformer(D, K).parameters()))
    t_start = time.perf_counter()
    thr = loss = prof = None
    if args.reuse_loss:  # read before this run's first save overwrites the file; every save then keeps it
        old = json.loads((out / "train_throughput.json").read_text())
        loss = {**old["final_loss"], "reused_from": old["machine"]["date_utc"]}

    def save(complete: bool) -> None:
        res = build_results(args, machine, thr, loss, prof, time.perf_counter() - t_start, complete)
        write_json_atomic(out / "train_throughput.json", res)
        write_atomic(out / "train_throughput.md", markdown(res))

    if "throughput" not in args.skip:
        thr = measure_throughput(args)
        save(False)
    if "loss" not in args.skip:
        loss = measure_final_loss(args)
        save(False)
    if "profile" not in args.skip:
        log("profiling")
        prof = profile_steps(args)
    machine["loadavg_at_end"] = loadavg()
    save(True)
    log(f"wrote {out / 'train_throughput.json'} and .md in {(time.perf_counter() - t_start) / 60:.1f} min")
    print(markdown(build_results(args, machine, thr, loss, prof, time.perf_counter() - t_start, True)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
