"""Hadamard rotation of the last dim, x @ H.T / sqrt(n) with H the Sylvester Hadamard matrix (what
fast_hadamard_transform.hadamard_transform(x, scale=n**-0.5) computes), in plain torch for any dtype
and device: DeepSeek-V3.2's DSA indexer rotates q and k with it, and megatron-core's rotate_activation
needs that CUDA extension and bf16. H/sqrt(n) is orthogonal, so rotating both q and k leaves q.k unchanged
(up to rounding): the HF port skips it.
"""
import torch


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """Fast Walsh-Hadamard transform (Sylvester order) of the last dim (a power of two), scaled by n^-1/2."""
    n = x.shape[-1]
    if n & (n - 1) or n == 0:
        raise ValueError(f"hadamard_rotate: last dim {n} is not a power of two")
    lead = x.shape[:-1]
    out = x.reshape(-1, n)
    h = 1
    while h < n:
        # butterflies of size 2h: (a, b) -> (a + b, a - b), H_2n = [[H_n, H_n], [H_n, -H_n]]
        pairs = out.view(-1, n // (2 * h), 2, h)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        out = torch.stack((a + b, a - b), dim=2).reshape(-1, n)
        h *= 2
    return (out * n ** -0.5).reshape(*lead, n)
