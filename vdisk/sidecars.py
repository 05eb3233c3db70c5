"""The names of what vdisk keeps beside an image, in one place: the open pipeline checks for them
without loading the packages that manage them."""

#: ``IMAGE.snapshots/``: the snapshot tree and its frozen images (vdisk/snapshot.py)
SNAPSHOTS = ".snapshots"
#: ``IMAGE.vdisk-shadows/``: the shadow copies' diff area (vdisk/shadow)
SHADOWS = ".vdisk-shadows"
#: ``IMAGE.vdisk-journal``: an in-place operation's undo/redo journal (vdisk/journal.py)
JOURNAL = ".vdisk-journal"
