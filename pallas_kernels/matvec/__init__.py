"""Decode-sized matrix-vector products that read each weight once: `gathered_matvec`."""

from pallas_kernels.matvec.api import gathered_matvec

__all__ = ["gathered_matvec"]
