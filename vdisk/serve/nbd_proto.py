"""Deprecated alias (kept for one release): the NBD protocol now lives in three modules.

* :mod:`vdisk.serve.nbd_wire`: constants, header structs, encoding and decoding;
* :mod:`vdisk.serve.nbd_conn`: the sans-IO connection state machine and its events;
* :mod:`vdisk.serve.nbd_backend`: executing requests against a block device.

Every public name of those modules is importable from here as before.
"""
from __future__ import annotations

from .nbd_backend import (STATUS_WINDOW, allocation_flags, block_status_descriptors,  # noqa: F401
                          errno_for, extent_runs, handle_request)
from .nbd_conn import (MUST_SEND, NEED_DATA, TLS_MODES, Closed, ExportChosen,  # noqa: F401
                       Request, ServerConnection, StartTLS)
from .nbd_wire import *  # noqa: F401,F403
from .nbd_wire import (HDR_CHUNK as _HDR_CHUNK, HDR_OPT as _HDR_OPT,  # noqa: F401
                       HDR_OPT_REPLY as _HDR_OPT_REPLY, HDR_REQUEST as _HDR_REQUEST,
                       HDR_SIMPLE as _HDR_SIMPLE)
