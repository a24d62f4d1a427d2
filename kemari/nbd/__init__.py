"""Kemari's NBD server: guest disks are served from Kemari's own process."""
