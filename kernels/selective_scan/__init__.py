"""Selective scan kernels (issue 4)."""
