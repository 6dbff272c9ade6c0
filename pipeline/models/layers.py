"""Small building blocks shared by the model families.

- `l2norm`: row normalisation with the references' epsilon convention (added to the norm);
  `l2norm_valid`: the same on the valid rows of a padded sequence, zero rows at padding.
- `length_mask`: (B, L) validity mask from lengths.
- `MLP`: Linear layers with BatchNorm1d + ReLU between them (VSE∞'s "basic" region MLP).
- `apply_to_valid`: run a row-wise module on the valid rows of a padded (B, L, F) tensor
  only, so BatchNorm statistics never see padding (active `ghost_bn` sample segments are
  translated into row segments).
- `sinusoidal_encoding`: the Transformer sin/cos position table.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.ghost_bn import SegmentBatchNorm1d, bn_segments, current_segments, row_segments


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """x / (||x|| + eps) along `dim`."""
    return x / (x.pow(2).sum(dim=dim, keepdim=True).sqrt() + eps)


def l2norm_valid(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """l2norm of the rows of x (B, L, D) where mask (B, L) is True, zero rows elsewhere.
    Padding rows are never normalised: the norm of a zero row has an infinite derivative
    (0 * inf = NaN gradients, although no score reads that row)."""
    m = mask.unsqueeze(-1)
    return torch.where(m, l2norm(torch.where(m, x, torch.ones_like(x)), eps=eps), torch.zeros_like(x))


def length_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B, max_len) bool, True at positions < lengths[b]."""
    if max_len is None:
        max_len = int(lengths.max())
    pos = torch.arange(max_len, device=lengths.device)
    return pos.unsqueeze(0) < lengths.to(torch.long).unsqueeze(1)


def xavier_linear_(layer: nn.Linear) -> nn.Linear:
    """Xavier-uniform weight, zero bias (what VSE++/VSE∞ do for their image FC)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class MLP(nn.Module):
    """`num_layers` Linear layers in_dim -> hidden_dim -> ... -> out_dim on (N, in_dim) rows.

    Every layer but the last is followed by BatchNorm1d and ReLU.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least one layer, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.bns = nn.ModuleList(SegmentBatchNorm1d(d) for d in dims[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(self.bns[i](x))
        return x


def apply_to_valid(module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Apply a row-wise `module` ((N, F) -> (N, E)) to the rows of x (B, L, F) where mask
    (B, L) is True (None: every row); the other rows of the (B, L, E) result are zero."""
    b, l, f = x.shape
    if mask is None or bool(mask.all()):  # no padding: skip the gather/scatter
        seg = current_segments()
        with bn_segments([n * l for n in seg] if seg is not None else None):
            return module(x.reshape(b * l, f)).view(b, l, -1)
    segments = row_segments(mask) if current_segments() is not None else None
    idx = mask.reshape(b * l).nonzero(as_tuple=True)[0]
    with bn_segments(segments):
        rows = module(x.reshape(b * l, f).index_select(0, idx))
    out = rows.new_zeros(b * l, rows.size(-1)).index_copy(0, idx, rows)
    return out.view(b, l, rows.size(-1))


def sinusoidal_encoding(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(length, dim) table: even columns sin(p / 10000^(2i/dim)), odd columns cos(...)."""
    if dim % 2:
        raise ValueError(f"sinusoidal encoding needs an even dimension, got {dim}")
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32)
                     * (-math.log(10000.0) / dim))
    table = torch.empty(length, dim, device=device, dtype=torch.float32)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.to(dtype)
