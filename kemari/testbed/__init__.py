"""Test and demo scaffolding that is real networking: namespaces, bridges and a userspace NIC."""
