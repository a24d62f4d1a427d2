"""Kemari's guest network path: QEMU stream framing, the host tap, and the bridge between them."""
