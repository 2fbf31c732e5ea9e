"""Toy models and problems for tests and presets, and assertion helpers.

Everything here is small enough for a CPU test suite and needs no download: synthetic data, or
scikit-learn's bundled ``load_digits`` (8×8 grey images, 10 classes, 1,797 samples).

Example:
    >>> x, y = digits()
    >>> tuple(x.shape), tuple(y.shape), int(y.max())
    ((1797, 1, 8, 8), (1797,), 9)
    >>> BNCNN()(x[:4]).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BNCNN", "MLPBN", "digits", "synthetic_classification"]


def digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (N, 1, 8, 8) images scaled to [0, 1] and int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=dtype).unsqueeze(1) / 16.0
    y = torch.as_tensor(d.target, dtype=torch.long)
    return x, y


def synthetic_classification(n: int = 128, d: int = 20, classes: int = 5, *, seed: int = 0,
                             dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs with labels from a random linear teacher."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(d, classes, generator=gen, dtype=torch.float64)
    return x.to(dtype), (x @ w).argmax(1)


class BNCNN(nn.Sequential):
    """A small BatchNorm CNN for 8×8 digits: three conv → BN → ReLU blocks, a pool and a linear head."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 32), in_channels: int = 1, classes: int = 10) -> None:
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
        super().__init__(*layers)


class MLPBN(nn.Module):
    """physics.md §5's MLP-BN: Linear(20,32) → BN → ReLU → Linear(32,16) → ReLU → Linear(16,5)."""

    def __init__(self, d: int = 20, hidden: tuple[int, int] = (32, 16), classes: int = 5, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden[0])
        self.bn1 = nn.BatchNorm1d(hidden[0], eps=eps)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.fc1(x)))
        return self.fc3(torch.relu(self.fc2(h)))
