"""The evaluation classifier of the sampling benchmark: a small CNN trained from scratch.

Trained only on the selected pool images, so its accuracy on the device's held-out images
measures how useful the selection is for that device, not what an encoder already knows.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def small_cnn(classes: int) -> nn.Module:
    def block(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(3, 16), block(16, 32), block(32, 64), nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 16, classes)
    )


def _prep(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 255.0
    return (x - 0.5) / 0.25


def train_and_eval(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: int,
    epochs: int = 15,
    batch: int = 64,
    seed: int = 0,
) -> float:
    """Train on (train_x, train_y) uint8 NHWC; return top-1 accuracy on the test set."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = small_cnn(classes)
    x, y = _prep(train_x), torch.from_numpy(train_y).long()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * ((len(x) + batch - 1) // batch))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            xb = _shift(x[idx], gen)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(t).argmax(1) for t in _prep(test_x).split(512)]).numpy()
    return float(np.mean(pred == test_y))


def _shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
    h, w = x.shape[2:]
    return F.pad(x, (pad,) * 4, mode="replicate")[:, :, dy : dy + h, dx : dx + w]
