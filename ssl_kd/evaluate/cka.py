"""Representation fidelity: linear centred kernel alignment (CKA) of two models' features.

Linear CKA (Kornblith et al., 2019, https://arxiv.org/abs/1905.00414) compares two
representations of the same images, whatever their widths: 1 when one is an orthogonal
transform and isotropic scaling of the other (plus a shift), near 0 for unrelated ones. It sits
beside the output fidelity (top-1 agreement, KL): a student may agree with its teacher's
predictions while computing them from differently organised features.
"""

from __future__ import annotations

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of (n, d1) ``x`` and (n, d2) ``y`` in [0, 1]; nan for n < 2 or a constant side."""
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(
            f"linear_cka needs two (n, d) matrices with the same n, got {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )
    if len(x) < 2:
        return float("nan")
    # float64: the norms sum n * d squared products, where float32 loses digits on large n.
    x = x.double() - x.double().mean(dim=0, keepdim=True)
    y = y.double() - y.double().mean(dim=0, keepdim=True)
    # The feature-space form ||yᵀx||² / (||xᵀx|| ||yᵀy||) equals the HSIC form on n x n Gram
    # matrices but costs d1 x d2 memory instead of n x n.
    denominator = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if denominator.item() == 0:
        return float("nan")
    return (torch.linalg.matrix_norm(y.T @ x) ** 2 / denominator).item()
