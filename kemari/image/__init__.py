"""The guest image: kernel + initramfs built from Debian packages, and data disks."""

from kemari.image.builder import GuestImage, build_image, default_image
from kemari.image.disk import create_data_disk

__all__ = ["GuestImage", "build_image", "create_data_disk", "default_image"]
