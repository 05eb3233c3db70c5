"""Sizes every layer of vdisk counts in."""

#: the 512-byte sector: the unit of VHD/VDI tables and bitmaps, partition tables and ATA/SCSI
#: addressing unless a device says otherwise (BlockDevice.logical_sector_size)
SECTOR = 512
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
