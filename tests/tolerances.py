"""Tolerances for comparing two float32 computations of the same network that differ only in how
the inputs are batched or chunked.

Such paths are not bitwise equal: a matrix product over [B * n, K] rows may be split into other
blocks, or summed with other vector widths, when B changes (the BLAS picks its kernel by shape, by
CPU and by thread count), so each length-K dot product is added up in another order. Measured on
SAM's mask decoder: one prompt alone and the same prompt in a batch of two first differ at the
self-attention's q_proj (a Linear over [B * 7, 256]), by ~1e-6 at values of magnitude ~2, and
leave its output tokens ~1.4e-6 apart at magnitude ~4.

A plain module (not a fixture), as tests/tiny_fit.py is.
"""

from __future__ import annotations

import math

import torch

F32_EPS = torch.finfo(torch.float32).eps  # 2**-23: one float32 step, relative to the value
F16_EPS = torch.finfo(torch.float16).eps  # 2**-10: one float16 step, relative to the value
F16_SUBNORMAL_STEP = 2.0**-24  # the float16 step below 2**-14, where the relative step no longer holds


def reordering_atol(expected: torch.Tensor, reduction_length: int) -> float:
    """How far two summation orders may leave a float32 result: 2 * eps32 * sqrt(K) * max|x|.

    The rounding error of a K-term sum is a random walk of K steps of at most half an ulp of the
    running sum, so about sqrt(K) ulps of the values' size; each of the two paths has its own,
    so they differ by up to twice that. The network's LayerNorms keep the activations at the size
    of its outputs, so ``max|expected|`` stands for that size. ``K`` is the longest reduction on
    the path (e.g. the width of an MLP's hidden layer). For SAM's decoder (K = 2048, outputs up
    to ~4) this is 4e-5, about 30 times what the batch sizes above give and far below what a
    wrong prompt, order or mask would change (order 1).
    """
    return 2 * F32_EPS * math.sqrt(reduction_length) * float(expected.abs().max())


def assert_close_across_batching(
    actual: torch.Tensor, expected: torch.Tensor, reduction_length: int, float16_rounded: bool = False
) -> None:
    """``actual`` and ``expected``: one computation, batched in two ways; see :func:`reordering_atol`.

    ``float16_rounded``: both were rounded to float16 after the float32 path (as the feature cache
    stores SAM tokens). A float32 value within ``reordering_atol`` of a float16 rounding boundary
    then rounds to the other side: the stored values are one float16 step apart, which is at most
    eps16 * |x| for normal numbers and 2**-24 below 2**-14 (e.g. 6.1e-5 at a value of 0.084).
    """
    atol = reordering_atol(expected, reduction_length)
    if float16_rounded:
        torch.testing.assert_close(actual, expected, rtol=F16_EPS, atol=atol + F16_SUBNORMAL_STEP)
    else:
        torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def probability_rtol(reduction_length: int, logit_scale: float = 100.0) -> float:
    """Relative tolerance of class probabilities softmax(scale * cos(e, t)) when the embeddings
    ``e`` come from two batchings: 8 * scale * eps32 * sqrt(K).

    Two summation orders move ``e`` by a relative 2 * eps32 * sqrt(K) (:func:`reordering_atol`),
    the unit vector e/|e| by at most twice that, each cosine as much, and each logit ``scale``
    times as much; a softmax turns logit changes of at most d into a relative change of each
    probability of at most 2d. CLIP's scale is 100, so K = 256 gives 1.5e-3: a wrong box, image
    or class changes the probabilities by tens of percent.
    """
    return 8 * logit_scale * F32_EPS * math.sqrt(reduction_length)


def assert_masks_agree(actual: torch.Tensor, expected: torch.Tensor, share: float = 1e-4) -> None:
    """Masks thresholded from logits of two batchings: a pixel whose logit lies within the
    float32 reordering error (~1e-5) of the threshold may flip. With logits spread over a range of
    order 1 that is ~1e-5 of the pixels; ``share`` allows ten times that, and fails on any real
    difference of a mask (a wrong box or prompt changes whole regions)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == torch.bool
    assert (actual != expected).sum() <= share * expected.numel(), int((actual != expected).sum())
