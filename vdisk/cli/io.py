"""CLI commands that expose an image to the rest of the system: mount, umount, serve nbd/iscsi.

Registered into `vdisk` by :func:`register` (see vdisk.cli). The work is done by the libraries
(:mod:`vdisk.mount`, :mod:`vdisk.serve.nbd`, :mod:`vdisk.serve.iscsi`), imported only when a
command runs, so a missing optional dependency (FUSE bindings) only affects the command that
needs it, with a one-line error.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from vdisk.errors import VDiskError


def _library(module: str, *names: str):
    """Import *names* from *module*, or raise a one-line VDiskError saying what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise VDiskError(f"this command is not available: cannot import {module} ({exc})") from None
    missing = [n for n in names if not hasattr(mod, n)]
    if missing:
        raise VDiskError(f"this command is not available: {module} has no {', '.join(missing)}")
    return [getattr(mod, n) for n in names]


# -- mount / umount -----------------------------------------------------------------------------
def cmd_mount(args) -> int:
    (mount_image,) = _library("vdisk.mount", "mount_image")
    from vdisk.shadow import has_shadows, shadow_views
    # An image with shadow copies also shows each one read-only as shadows/<id>/disk, p1, ...
    views = shadow_views if has_shadows(args.image) else None
    pid = mount_image(args.image, args.mountpoint, rw=args.rw, foreground=args.foreground,
                      allow_other=args.allow_other, parent_search=tuple(args.parent_search),
                      extra_views=views)
    if pid is not None:
        mode = "read-write" if args.rw else "read-only"
        print(f"mounted {args.image} on {args.mountpoint} ({mode}, process {pid}); "
              f"'vdisk umount {args.mountpoint}' detaches it", file=sys.stderr)
    return 0


def cmd_umount(args) -> int:
    (unmount,) = _library("vdisk.mount", "unmount")
    unmount(args.mountpoint)
    return 0


# -- serve --------------------------------------------------------------------------------------
def _open_all(args, paths, rw: bool):
    """Open the images ourselves when open options were given (forced format, parent search)."""
    from .common import open_image
    disks = []
    try:
        for p in paths:
            disks.append(open_image(args, p, "r+" if rw else "r"))
    except BaseException:
        for d in disks:
            d.close()
        raise
    return disks


def _needs_own_open(args) -> bool:
    return bool(args.format or args.parent_search or args.size_policy != "current")


def split_shadow_ref(ref: str):
    """'IMAGE@ID' -> (IMAGE, ID) when IMAGE exists and ID is one of its shadows; else (ref, None)."""
    if os.path.exists(ref) or "@" not in ref:
        return ref, None
    image, shadow_id = ref.rsplit("@", 1)
    if not os.path.isfile(image):
        return ref, None
    from vdisk.shadow import has_shadows
    if not has_shadows(image):
        raise VDiskError(f"{image}: has no shadow copies (asked for shadow {shadow_id!r})")
    return image, shadow_id


def _open_exports(args):
    """(exports, names, Disks to close): paths as they are, or Disks opened here when a shadow
    (IMAGE@ID) or open options are involved. A shadow's default name is 'file.vhd@ID'."""
    refs = [split_shadow_ref(r) for r in args.images]
    if not any(sid for _, sid in refs) and not _needs_own_open(args):
        return list(args.images), args.name, []
    from .common import open_image
    from vdisk.shadow import open_shadow_view
    opened = []
    try:
        for image, sid in refs:
            if sid is None:
                opened.append(open_image(args, image, "r+" if args.rw else "r"))
            else:                                  # a shadow is a read-only point in time
                opened.append(open_shadow_view(image, sid, parent_search=tuple(args.parent_search)))
    except BaseException:
        for d in opened:
            d.close()
        raise
    names = args.name
    if names is None:
        names = [os.path.basename(image) + (f"@{sid}" if sid else "") for image, sid in refs]
    return opened, names, opened


def cmd_serve_nbd(args) -> int:
    (serve_nbd,) = _library("vdisk.serve.nbd", "serve_nbd")
    TlsConfig, check_nbd_exposure = _library("vdisk.serve.nbd_tls", "TlsConfig", "check_exposure")
    if args.name is not None and len(args.name) != len(args.images):
        raise VDiskError(f"{len(args.name)} --name for {len(args.images)} image(s): give one --name per image")
    tls = TlsConfig.from_options(args.tls_creds, args.tls, args.tls_verify_peer)
    check_nbd_exposure(args.bind, tls, args.insecure)     # before any image is opened

    def ready(server) -> None:
        uris = getattr(server, "uris", None) or []
        mode = "read-write" if args.rw else "read-only"
        for uri in uris:
            print(f"serving {uri} ({mode})", file=sys.stderr, flush=True)
        print("Ctrl-C stops", file=sys.stderr, flush=True)

    exports, names, opened = _open_exports(args)
    try:
        serve_nbd(exports, host=args.bind, port=args.port, names=names, rw=args.rw,
                  shared=args.shared, ready=ready, tls=tls, insecure=args.insecure)
    finally:
        for d in opened:
            d.close()
    return 0


def cmd_serve_iscsi(args) -> int:
    serve_iscsi, check_exposure = _library("vdisk.serve.iscsi", "serve_iscsi", "check_exposure")
    (policy_from_files,) = _library("vdisk.serve.iscsi_auth", "policy_from_files")
    auth = policy_from_files(args.chap_user, args.chap_secret_file, args.mutual_chap_user,
                             args.mutual_chap_secret_file, args.allow_initiator)
    check_exposure(args.bind, auth, args.insecure)
    options = dict(host=args.bind, port=args.port, iqn=args.iqn, rw=args.rw, auth=auth,
                   insecure=args.insecure)
    if _needs_own_open(args):
        (disk,) = _open_all(args, [args.image], args.rw)
        try:
            serve_iscsi(disk, **options)
        finally:
            disk.close()
    else:
        serve_iscsi(args.image, **options)
    return 0


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def register(subparsers) -> None:
    """Add mount, umount and serve to the `vdisk` command line."""
    from .common import add_open_options

    p = subparsers.add_parser("mount", help="mount an image and its partitions as files (FUSE)")
    p.add_argument("image")
    p.add_argument("mountpoint")
    p.add_argument("--rw", action="store_true", help="read-write (default read-only)")
    p.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    p.add_argument("--parent-search", metavar="DIR", action="append", default=[],
                   help="also look for parent images in DIR (repeatable)")
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser("umount", help="unmount a vdisk mount and wait until the image is closed")
    p.add_argument("mountpoint")
    p.set_defaults(func=cmd_umount)

    serve = subparsers.add_parser("serve", help="export images over the network (nbd, iscsi)")
    kinds = serve.add_subparsers(dest="protocol", metavar="PROTOCOL", parser_class=type(serve))
    kinds.required = True

    p = kinds.add_parser("nbd", help="NBD server (read-only unless --rw)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=10809)
    p.add_argument("--name", action="append", help="export name (one per image; default: file name)")
    p.add_argument("--rw", action="store_true", help="writable exports")
    p.add_argument("--shared", type=int, default=8, metavar="N", help="clients at once (0: no limit)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="serve over TLS with DIR/server-cert.pem, server-key.pem (and ca-cert.pem)")
    p.add_argument("--tls", choices=("off", "on", "require"),
                   help="require (default with --tls-creds): nothing but STARTTLS in the clear; "
                        "on: TLS offered, not required; off: no TLS")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="clients must present a certificate signed by DIR/ca-cert.pem")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without --tls=require (every host there can connect)")
    add_open_options(p)
    p.set_defaults(func=cmd_serve_nbd)

    p = kinds.add_parser("iscsi", help="iSCSI target with the image as LUN 0 (read-only unless --rw)")
    p.add_argument("image")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=3260)
    p.add_argument("--iqn", help="target name (default iqn.2026-01.org.vdisk:<image name>)")
    p.add_argument("--rw", action="store_true", help="writable LUN")
    p.add_argument("--chap-user", metavar="USER", help="initiators must log in with CHAP as USER")
    p.add_argument("--chap-secret-file", metavar="FILE",
                   help="file holding USER's CHAP secret: 12-255 bytes, no trailing newline")
    p.add_argument("--mutual-chap-user", metavar="USER",
                   help="name the target answers mutual CHAP with (needs --chap-user)")
    p.add_argument("--mutual-chap-secret-file", metavar="FILE",
                   help="file holding the target's own CHAP secret (must differ from the initiator's)")
    p.add_argument("--allow-initiator", metavar="IQN", action="append", default=[],
                   help="only this initiator name may log in (repeatable; default: any)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without CHAP (every host there can log in)")
    add_open_options(p)
    p.set_defaults(func=cmd_serve_iscsi)
