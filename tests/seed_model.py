"""The user's TransformerLens model, verbatim from the seed (lines 5834-6121) except the device line
(pinned to CPU so tests are deterministic). Used as an independent reference by the tests."""

import torch
from torch import nn


class ICLTransformer(nn.Module):
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
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        super().__init__()
        self.device = device = "cpu"
        self.transformer = HookedTransformer(
            HookedTransformerConfig(
                n_layers=n_layers,
                n_ctx=2 * seq_length,
                d_model=d_model,
                d_head=d_head,
                n_heads=n_heads,
                d_mlp=d_mlp,
                act_fn=act_fn,
                d_vocab=input_dim + 1,
                use_split_qkv_input=True,
                use_attn_result=True,
                device=device,
            )
        )
        self.input_proj = nn.Linear(input_dim + 1, d_model)
        self.to(device)

    def output_proj(self, activations: torch.Tensor) -> torch.Tensor:
        return activations[:, ::2, -1]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, input_dim = x.shape
        xy_combined = torch.zeros(batch_size, 2 * seq_len, input_dim + 1, device=self.device)
        xy_combined[:, ::2, :input_dim] = x
        xy_combined[:, 1::2, -1] = y
        hidden = self.input_proj(xy_combined)
        transformer_out = self.transformer(hidden, start_at_layer=0, return_type="logits")
        return self.output_proj(transformer_out)
