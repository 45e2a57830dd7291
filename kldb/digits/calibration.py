"""Temperature scaling (Guo et al., 2017) and the expected calibration error, for the digits classifier."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al., 2017, Eq. 3).

    .. math:: \\mathrm{ECE} = \\sum_b \\frac{|B_b|}{n} \\left| \\mathrm{acc}(B_b) - \\mathrm{conf}(B_b) \\right|

    Args:
        logits: ``[N, n]`` classifier logits.
        labels: ``[N]`` true class indices.
        num_bins: number of equal-width bins over (0, 1].

    Example:
        >>> round(expected_calibration_error(torch.tensor([[4.0, 0.0], [0.0, 4.0]]), torch.tensor([0, 1])), 8)
        0.01798621
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"Expected `logits` of shape [N, n] and `labels` of shape [N] but got {list(logits.shape)} "
            f"and {list(labels.shape)}."
        )
    probabilities = logits.double().softmax(dim=-1)
    confidence, prediction = probabilities.max(dim=-1)
    correct = (prediction == labels).double()
    edges = torch.linspace(0.0, 1.0, num_bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for lower, upper in itertools.pairwise(edges):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            ece += in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of ``softmax(logits / T)`` (Guo et al., 2017)."""
    log_temperature = torch.zeros((), dtype=torch.float64, requires_grad=True)
    logits = logits.detach().double()
    optimizer = torch.optim.LBFGS([log_temperature], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_temperature.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_temperature.detach().exp())
