"""Property-based tests (hypothesis) of the metric and of the pipeline's input checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kldb import kldb_score

# no subnormals: a library in the same process may have set flush-to-zero, which hypothesis refuses to run under
finite = st.floats(min_value=-50, max_value=50, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@st.composite
def logits_and_classes(draw):
    n = draw(st.integers(min_value=1, max_value=12))
    b = draw(st.integers(min_value=1, max_value=4))
    logits = draw(arrays(np.float64, (b, n), elements=finite))
    classes = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    return torch.from_numpy(logits), classes


@given(logits_and_classes())
def test_kldb_is_non_negative(data):
    logits, classes = data
    assert (kldb_score(logits, classes) >= 0).all()


@given(logits_and_classes(), finite)
def test_kldb_is_unchanged_by_a_constant_shift(data, shift):
    logits, classes = data
    torch.testing.assert_close(kldb_score(logits + shift, classes), kldb_score(logits, classes), rtol=1e-9, atol=1e-9)


@given(logits_and_classes(), st.randoms(use_true_random=False))
def test_kldb_is_unchanged_by_a_consistent_permutation(data, rnd):
    logits, classes = data
    n = logits.shape[1]
    perm = list(range(n))
    rnd.shuffle(perm)  # new position j holds old class perm[j]
    inverse = {old: new for new, old in enumerate(perm)}
    permuted = logits[:, perm]
    torch.testing.assert_close(
        kldb_score(permuted, [inverse[c] for c in classes]), kldb_score(logits, classes), rtol=1e-9, atol=1e-9
    )


@given(st.integers(1, 10), st.integers(0, 5), finite, st.floats(min_value=5, max_value=60, allow_subnormal=False))
def test_kldb_is_zero_exactly_at_the_uniform_distribution_over_c(size, others, level, gap):
    # the classes of C share one logit; the others sit so far below that their mass is exactly 0 in float64
    logits = torch.full((1, size + others), level - 800.0, dtype=torch.float64)
    logits[0, :size] = level
    assert kldb_score(logits, list(range(size))).item() == 0.0
    # and away from it, positive
    if size > 1:
        logits[0, 0] += gap / 10
        assert kldb_score(logits, list(range(size))).item() > 0


@given(logits_and_classes())
def test_kldb_upper_bound_for_one_class(data):
    # |C| = 1: KLDB = -log p_c, the cross-entropy
    logits, classes = data
    expected = -torch.log_softmax(logits, -1)[:, classes[0]]
    torch.testing.assert_close(kldb_score(logits, classes[:1]), expected.clamp_min(0), rtol=1e-9, atol=1e-9)


# --- the pipeline's checks: any combination either passes or raises ValueError / TypeError with a message -------------

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 50),
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
    st.text(max_size=4),
    st.lists(st.integers(-2, 6), max_size=4),
    st.lists(st.text(max_size=6), max_size=3),
)


@pytest.fixture(scope="module")
def check_pipe():
    from kldb.testing import tiny_pipeline

    return tiny_pipeline()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    alpha=values,
    interval=values,
    gradient=st.one_of(st.sampled_from(["unet", "detached", "both"]), values),
    steps=values,
    classes=values,
    height=st.one_of(st.none(), st.integers(-8, 80)),
)
def test_check_kldb_inputs_never_crashes(check_pipe, alpha, interval, gradient, steps, classes, height):
    from pipeline_kldb_boundary import as_image_classifier, resolve_classes

    try:
        check_pipe.check_kldb_inputs(alpha, interval, gradient, steps, True, classes, height=height, width=height)
        if classes is not None:
            adapter = as_image_classifier(check_pipe.classifier, check_pipe.classifier_processor)
            resolve_classes(classes, adapter.labels, 4)
    except (ValueError, TypeError) as error:
        assert str(error)  # a message, naming what is wrong
    else:
        assert isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha >= 0
