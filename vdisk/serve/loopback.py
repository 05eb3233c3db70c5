"""Whether a listening address stays on this host: the test both exports (NBD, iSCSI) make
before they agree to serve without TLS or CHAP."""
from __future__ import annotations

import ipaddress
import socket


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (wildcards are not)."""
    try:
        infos = socket.getaddrinfo(host or None, None, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False
    addresses = {info[4][0].split("%")[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
