"""Fail fast without network: can the host of a URL be resolved and reached within a few seconds?

Downloads through urllib / huggingface_hub wait on DNS and TCP time-outs (and retry), which
without network can take minutes before their error appears. `unreachable(url)` answers first.
"""
from __future__ import annotations

import concurrent.futures
import socket
import urllib.request
from urllib.parse import urlsplit


def unreachable(url: str, timeout: float = 3.0) -> str | None:
    """None when `url`'s host resolves and accepts a TCP connection within `timeout` seconds each;
    else why not, in a few words ("host ... does not resolve: ..."). With a proxy configured for the
    URL's scheme (HTTPS_PROXY ...), the proxy is what must be reachable."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and parts.hostname and not urllib.request.proxy_bypass(parts.hostname):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    if not host:
        return f"no host in {url!r}"
    pool = concurrent.futures.ThreadPoolExecutor(1)  # getaddrinfo has no time-out of its own
    try:
        infos = pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM).result(timeout)
    except concurrent.futures.TimeoutError:
        return f"host {host} does not resolve within {timeout:g} s"
    except OSError as e:
        return f"host {host} does not resolve: {e.strerror or e}"
    finally:
        pool.shutdown(wait=False)
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            s.connect(address)
    except OSError as e:
        return f"host {host} does not answer on port {port}: {e.strerror or e}"
    return None
