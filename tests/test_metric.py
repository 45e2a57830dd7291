"""KLDB and entropy against a float64 numpy reference, edge cases, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kldb import entropy, kldb_score


def numpy_kldb(logits: np.ndarray, classes: list[int]) -> np.ndarray:
    """Equation 1 written directly: sum_{i in C} 1/|C| log((1/|C|) / p_i), in float64 with a stable softmax."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    u = 1.0 / len(classes)
    return np.sum(u * (np.log(u) - log_p[:, classes]), axis=1)


def numpy_entropy(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    return -np.sum(np.where(p > 0, p * log_p, 0.0), axis=1)


@pytest.mark.parametrize("n", [2, 5, 10])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3, 1e4])
def test_against_numpy_for_every_subset_size(n, scale):
    rng = np.random.default_rng(n)
    logits = rng.normal(size=(16, n)) * scale
    for size in range(1, n + 1):
        classes = sorted(rng.choice(n, size=size, replace=False).tolist())
        got64 = kldb_score(torch.from_numpy(logits), classes).numpy()
        np.testing.assert_allclose(got64, numpy_kldb(logits, classes), rtol=1e-10, atol=1e-10)
        got32 = kldb_score(torch.from_numpy(logits).float(), classes).numpy()
        np.testing.assert_allclose(got32, numpy_kldb(logits, classes), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(entropy(torch.from_numpy(logits)).numpy(), numpy_entropy(logits), rtol=1e-9, atol=1e-12)


def test_underflowing_probability_stays_finite_and_differentiable():
    # p_1 = exp(-1000) underflows to 0 in float32 and float64; log_softmax keeps it finite
    logits = torch.tensor([[1000.0, 0.0, 0.0]], requires_grad=True)
    score = kldb_score(logits, [0, 1])
    assert torch.isfinite(score).all()
    np.testing.assert_allclose(score.detach().numpy(), numpy_kldb(logits.detach().numpy(), [0, 1]), rtol=1e-6)
    (grad,) = torch.autograd.grad(score.sum(), logits)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_zero_exactly_at_uniform_over_classes():
    logits = torch.tensor([[3.0, 3.0, 3.0, 3.0], [0.5, 0.5, 0.5, 0.5]])
    assert torch.equal(kldb_score(logits, [0, 1, 2, 3]), torch.zeros(2))
    # mass outside C keeps it above zero even when C is uniform among itself
    assert (kldb_score(torch.tensor([[2.0, 2.0, 1.0]]), [0, 1]) > 0).all()


def test_zero_probability_entropy():
    logits = torch.tensor([[0.0, float("-inf"), 0.0]])
    assert torch.allclose(entropy(logits), torch.log(torch.tensor([2.0])))


def test_nan_logits_give_nan_not_a_number_that_looks_valid():
    logits = torch.tensor([[float("nan"), 0.0, 1.0], [0.0, 1.0, 2.0]])
    assert torch.isnan(entropy(logits)[0]) and torch.isfinite(entropy(logits)[1])
    assert torch.isnan(kldb_score(logits, [0, 1])[0]) and torch.isfinite(kldb_score(logits, [0, 1])[1])


def test_half_precision_logits_are_scored_in_float32():
    logits = torch.randn(4, 6).half()
    assert kldb_score(logits, [1, 2]).dtype == torch.float32
    assert entropy(logits).dtype == torch.float32


def test_gradcheck():
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: kldb_score(x, [0, 3, 4]), (logits,))
    assert torch.autograd.gradcheck(entropy, (logits,))


def test_gradient_in_closed_form():
    # d KLDB / d logits = softmax(logits) - u_C, with u_C = 1/|C| on C and 0 elsewhere
    logits = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    classes = [1, 4]
    (grad,) = torch.autograd.grad(kldb_score(logits, classes).sum(), logits)
    expected = torch.softmax(logits.detach(), -1)
    expected[:, classes] -= 1.0 / len(classes)
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.mark.parametrize(
    ("classes", "error", "match"),
    [
        ([], ValueError, r"non-empty sequence of distinct ints in \[0, 4\) but got \[\]"),
        ([1, 1], ValueError, r"distinct ints in \[0, 4\) but got \[1, 1\]"),
        ([0, 4], ValueError, r"in \[0, 4\) but got \[0, 4\]"),
        ([-1], ValueError, r"in \[0, 4\) but got \[-1\]"),
        ([0.5, 1], TypeError, r"but got \[0.5, 1\]"),
        ("01", TypeError, r"but got '01'"),
        ([True, 2], TypeError, r"but got \[True, 2\]"),
        (3, TypeError, r"but got 3"),
    ],
)
def test_bad_classes(classes, error, match):
    with pytest.raises(error, match=match):
        kldb_score(torch.zeros(2, 4), classes)


def test_classes_as_tensor_and_numpy():
    logits = torch.randn(2, 5)
    expected = kldb_score(logits, [1, 3])
    assert torch.equal(kldb_score(logits, torch.tensor([1, 3])), expected)
    assert torch.equal(kldb_score(logits, np.array([1, 3])), expected)


@pytest.mark.parametrize("logits", [torch.zeros(4), torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long), [[0.0]]])
def test_bad_logits(logits):
    with pytest.raises(ValueError, match=r"Expected argument `logits` to be a floating-point tensor of shape \[B, n\]"):
        kldb_score(logits, [0])
    with pytest.raises(ValueError, match=r"Expected argument `logits`"):
        entropy(logits)


def test_gradient_survives_rounding_at_the_boundary():
    # float32 rounds KLDB of these logits to 0 (or below, then clamped); the gradient is still softmax - u_C
    logits = torch.tensor([[1e-5, -1e-5, 0.0]], requires_grad=True)
    score = kldb_score(logits, [0, 1])
    assert score.item() >= 0
    (grad,) = torch.autograd.grad(score.sum(), logits)
    expected = torch.softmax(logits.detach().double(), -1)
    expected[:, [0, 1]] -= 0.5
    torch.testing.assert_close(grad.double(), expected, rtol=1e-3, atol=1e-7)
    assert grad[0, 0] > grad[0, 1]  # the larger logit gets the larger (less negative) gradient
