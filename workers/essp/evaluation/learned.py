"""The torch side of the two learned fusions (:mod:`essp.evaluation.fusion` calls it when it fits or
predicts, so that listing and applying the fixed rules needs no torch): a multinomial logistic
regression on the streams' log probabilities, fitted by full-batch LBFGS, and an LSTM over the
streams' per-snippet features. Inputs and fitted parameters are numpy arrays and plain lists."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

# Standard deviations below this are treated as 1 when normalising (constant feature: centre only).
STD_FLOOR = 1e-6

# Logistic regression ("learned"): L2 penalty on the weights (not the bias), on standardised features.
LOGREG_L2 = 1e-2
LOGREG_MAX_ITER = 500

# LSTM ("sequence"): sized to train in a few seconds on one CPU core for ~100 videos x 25 snippets x 1024 dims.
SEQ_HIDDEN = 64
SEQ_STEPS = 200
SEQ_BATCH = 32
SEQ_LR = 3e-3
SEQ_WEIGHT_DECAY = 1e-4
SEQ_PREDICT_BATCH = 256


def mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of a 2-D array, std floored so constant columns are only centred."""
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    return mean, np.where(std < STD_FLOOR, 1.0, std)


class SequenceNet(nn.Module):
    """Linear projection of each snippet's features, an LSTM over time, a linear classifier on the last hidden state."""

    def __init__(self, d_in: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.lstm = nn.LSTM(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.proj(x))
        return self.head(h[-1])


def fit_logreg(x: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Multinomial logistic regression with an L2 penalty, fitted by full-batch LBFGS in float64 from zeros."""
    mean, std = mean_std(x)
    xs = torch.from_numpy((x - mean) / std)
    y = torch.from_numpy(labels)
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=LOGREG_MAX_ITER, tolerance_grad=1e-10,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(xs @ weight + bias, y) + 0.5 * LOGREG_L2 * (weight * weight).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"mean": mean.tolist(), "std": std.tolist(), "weight": weight.detach().numpy().tolist(),
            "bias": bias.detach().numpy().tolist()}


def predict_logreg(params: dict[str, Any], x: np.ndarray) -> np.ndarray:
    xs = torch.from_numpy((x - np.asarray(params["mean"])) / np.asarray(params["std"]))
    logits = (xs @ torch.tensor(params["weight"], dtype=torch.float64)
              + torch.tensor(params["bias"], dtype=torch.float64))
    return torch.softmax(logits, dim=1).numpy()


def fit_sequence(x: np.ndarray, labels: np.ndarray, num_classes: int, seed: int) -> tuple[SequenceNet, dict[str, Any]]:
    """Train the LSTM with Adam on mini-batches of training videos (x: (N, T, D)); the seed fixes init and
    batch order. Returns the net (in eval mode) and its normalisation parameters."""
    mean, std = mean_std(x.reshape(-1, x.shape[2]))
    xs = torch.from_numpy(((x - mean) / std).astype(np.float32))
    y = torch.from_numpy(labels)
    n = xs.shape[0]
    batch = min(SEQ_BATCH, n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SequenceNet(xs.shape[2], SEQ_HIDDEN, num_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=SEQ_LR, weight_decay=SEQ_WEIGHT_DECAY)
    net.train()
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(SEQ_STEPS):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(xs[idx]), y[idx])
        loss.backward()
        opt.step()
    net.eval()
    return net, {"mean": mean.tolist(), "std": std.tolist(), "hidden": SEQ_HIDDEN}


def predict_sequence(net: SequenceNet, params: dict[str, Any], x: np.ndarray) -> np.ndarray:
    xs = torch.from_numpy(((x - np.asarray(params["mean"])) / np.asarray(params["std"])).astype(np.float32))
    out = []
    with torch.no_grad():
        for start in range(0, xs.shape[0], SEQ_PREDICT_BATCH):
            out.append(torch.softmax(net(xs[start:start + SEQ_PREDICT_BATCH]), dim=1))
    return torch.cat(out).numpy().astype(np.float64)


def net_state(net: SequenceNet) -> dict[str, Any]:
    """The net's weights as plain lists (JSON)."""
    return {k: v.detach().cpu().tolist() for k, v in net.state_dict().items()}


def net_from_state(tensors: dict[str, Any], d_in: int, hidden: int, classes: int) -> SequenceNet:
    net = SequenceNet(d_in, hidden, classes)
    net.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in tensors.items()})
    return net.eval()
