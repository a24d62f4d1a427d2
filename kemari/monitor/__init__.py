"""Kemari's own monitor: a line-oriented JSON control channel, in the spirit of QEMU's HMP."""
