"""Test-only helpers: agents on loopback, the records soak, the fake NIC peer and the
crashed-disk check."""
