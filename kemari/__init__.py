"""Kemari: fault tolerance for unmodified QEMU virtual machines."""

__version__ = "0.1.0"
