"""vdisk.mount: a virtual disk image and its partitions as files, through FUSE.

    from vdisk.mount import mount_image, unmount, read_partitions

:func:`mount_image` / :func:`unmount` are what ``vdisk mount`` / ``vdisk umount`` call;
:func:`read_partitions` parses MBR and GPT tables and needs no FUSE. See docs/mount.md.
"""
from .api import check_fuse, check_mountpoint, mount_image, unmount
from .partitions import Partition, PartitionTableError, read_partitions

__all__ = ["mount_image", "unmount", "check_fuse", "check_mountpoint", "read_partitions", "Partition",
           "PartitionTableError"]
