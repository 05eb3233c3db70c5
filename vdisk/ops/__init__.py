"""Whole-image operations: check, compact, commit, convert, resize, relink, compare, measure, info.

They work on a :class:`vdisk.Disk` and ask its layers' format drivers for anything that depends on
the format; none of them knows a format by name.
"""
