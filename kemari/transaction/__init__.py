"""Kemari's ft-transaction protocol between the active and standby hosts.

Three layers kept apart: :mod:`.wire` (frame format, pure), :mod:`.transport` (byte
streams: TCP today), :mod:`.session` (sequence numbers, handshake, transaction rules).
docs/protocol.md describes the protocol and the invariant each step keeps.
"""
