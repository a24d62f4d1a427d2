"""QEMU supervision: accelerator choice, binary choice, command line and the running machine."""
