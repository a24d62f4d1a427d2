"""Test-only helpers: the records soak, the fake NIC peer and the crashed-disk check."""
