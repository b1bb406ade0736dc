"""Which task URLs the media fetcher may request, and where: the security rules of ``labelstudio.media``.

Everything here is decided before a connection is made, from the URL and the settings alone:

* ``parse_target`` validates an absolute http(s) URL strictly (no userinfo, backslashes, control characters, ``%``
  or whitespace in the authority) and rebuilds it from its parts, so the host checked is the host connected to;
* ``absolute_target`` turns a task URL (absolute, or a ``/...`` path under ``LABEL_STUDIO_URL``) into a ``Target``;
* ``is_allowed``/``check_allowed``: Label Studio's own host:port or a ``MEDIA_ALLOWED_HOSTS`` entry;
* ``label_studio_media_path``/``guard_label_studio``: on Label Studio's host:port only its media routes (issue 16);
* ``resolve_local_file``: a ``/data/local-files/?d=`` URL to a file under the local document root, never outside.

The rules are listed in ``labelstudio/media.py``'s docstring and tested in ``tests/labelstudio/test_media_security.py``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, unquote_to_bytes, urlparse

from urllib3.util import parse_url

__all__ = [
    "LOCAL_FILES_PREFIX",
    "MEDIA_PATHS_TEXT",
    "MediaError",
    "Target",
    "absolute_target",
    "check_allowed",
    "guard_label_studio",
    "is_allowed",
    "is_label_studio",
    "label_studio_media_path",
    "label_studio_target",
    "parse_target",
    "resolve_local_file",
]

LOCAL_FILES_PREFIX = "/data/local-files/"

_HOST_RE = re.compile(r"[a-z0-9_.-]+")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_DEFAULT_PORTS = {"http": 80, "https": 443}

# Label Studio 1.23.2's routes that serve task media, matched against the decoded path below LABEL_STUDIO_URL's:
# data_import/urls.py (data/upload/<path:filename>, storage-data/uploaded/?filepath=) and io_storages/urls.py
# (data/local-files/?d=, tasks|projects/<int>/resolve|presign/?fileuri=). Nothing else on Label Studio is fetched.
_MEDIA_PATHS = (
    re.compile(r"/data/upload/.+"),
    re.compile(r"/data/local-files/?"),
    re.compile(r"/storage-data/uploaded/"),
    re.compile(r"/(?:tasks|projects)/[0-9]+/(?:resolve|presign)/"),
)
MEDIA_PATHS_TEXT = (
    "/data/upload/<file>, /data/local-files/?d=<path>, /storage-data/uploaded/?filepath=, "
    "/tasks/<id>/resolve/, /projects/<id>/resolve/ (or /presign/)"
)
_PCT_RE = re.compile(r"%[0-9A-Fa-f]{2}")
_PATH_SAFE = "/-._~!$&'()*+,=:@"  # RFC 3986 pchar without ';' (refused) and '%' (re-encoded)


class MediaError(ValueError):
    """A task's image cannot be fetched (unknown URL form, not allowed, not found, refused, too large, too slow)."""


@dataclass(frozen=True)
class Target:
    """A validated http(s) destination; ``url`` is rebuilt from these parts and is what requests receives."""

    scheme: str
    host: str  # lower-case name or IP; IPv6 without brackets
    port: int
    path: str  # path + "?query", percent-encoded, starts with "/"

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.netloc}{self.path}"


def parse_target(url: str, what: str = "URL") -> Target:
    """Validate an absolute http(s) URL strictly and split it into the parts the connection will use.

    Refuses what parsers disagree about (userinfo, backslashes, control characters, ``%`` or whitespace in the
    authority) instead of guessing; non-ASCII or spaces in the path/query are percent-encoded (Label Studio's
    local-files URLs carry file names verbatim).
    """
    if _CONTROL_RE.search(url):
        raise MediaError(f"{what} {url!r} contains control characters")
    if "\\" in url:
        raise MediaError(f"{what} {url!r} contains a backslash (ambiguous between URL parsers; refused)")
    m = _SCHEME_RE.match(url)
    if not m:
        raise MediaError(f"{what} {url!r} is not an absolute http(s) URL")
    scheme = m.group(1).lower()
    if scheme not in _DEFAULT_PORTS:
        raise MediaError(f"{what} {url!r}: {scheme}: URLs are not fetched (only http and https)")
    rest = url[m.end() :]
    if not rest.startswith("//"):
        raise MediaError(f"{what} {url!r} has no //host part")
    rest = rest[2:]
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        raise MediaError(f"{what} {url!r} contains user credentials (user@host); refused")
    if "%" in authority or any(ch.isspace() for ch in authority) or not authority.isascii():
        raise MediaError(f"{what} {url!r} has an invalid host part (encoded, non-ASCII or blank characters)")
    host, port_text = _split_authority(authority, url, what)
    if port_text is None or port_text == "":
        port = _DEFAULT_PORTS[scheme]
    elif port_text.isdigit() and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise MediaError(f"{what} {url!r} has an invalid port")
    tail = tail.split("#", 1)[0]  # the fragment is never sent
    path = quote(tail, safe="/?&=:;@!$'()*+,~%-._") if tail else "/"
    if not path.startswith("/"):
        path = "/" + path
    target = Target(scheme, host, port, path)
    # Defence in depth: the parser requests/urllib3 will use must see exactly the destination we validated.
    parsed = parse_url(target.url)
    seen = (parsed.scheme, (parsed.host or "").strip("[]").lower(), parsed.port)
    if parsed.auth or seen != (scheme, host, port):
        raise MediaError(f"{what} {url!r} is ambiguous between URL parsers; refused")
    return target


def _split_authority(authority: str, url: str, what: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise MediaError(f"{what} {url!r} has an unterminated IPv6 address")
        literal, after = authority[1:close], authority[close + 1 :]
        try:
            host = str(ipaddress.IPv6Address(literal))
        except ValueError:
            raise MediaError(f"{what} {url!r} has an invalid IPv6 address") from None
        if after and not after.startswith(":"):
            raise MediaError(f"{what} {url!r} has an invalid host part")
        return host, after[1:] if after else None
    host, sep, port = authority.partition(":")
    host = host.lower()
    if not host or not _HOST_RE.fullmatch(host) or ":" in port:
        raise MediaError(f"{what} {url!r} has an invalid host part")
    return host, port if sep else None


def label_studio_target(settings: Any) -> Target | None:
    base = str(getattr(settings, "label_studio_url", "") or "").strip()
    if not base:
        return None
    return parse_target(base, "LABEL_STUDIO_URL")


def absolute_target(url: str, settings: Any) -> Target:
    """The validated destination of a task URL: absolute http(s), or a ``/...`` path under LABEL_STUDIO_URL."""
    m = _SCHEME_RE.match(url)
    scheme = m.group(1).lower() if m else ""
    if scheme in _DEFAULT_PORTS:
        return parse_target(url)
    if scheme in ("s3", "gs", "gcs", "azure-blob"):
        raise MediaError(
            f"cannot fetch {url!r}: {scheme}:// URLs are resolved by Label Studio's cloud storage; import "
            "the tasks with presigned/http URLs or through a local storage"
        )
    if len(scheme) > 1:  # one letter is a Windows drive: reported below as not a URL
        raise MediaError(f"cannot fetch {url!r}: {scheme}: URLs are not fetched (only http and https)")
    if not url.startswith("/"):
        raise MediaError(f"cannot fetch {url!r}: expected /data/local-files/?d=..., /data/upload/... or http(s)://")
    base = label_studio_target(settings)
    if base is None:
        raise MediaError(f"cannot fetch {url!r}: LABEL_STUDIO_URL is not set")
    # Plain concatenation (not urljoin): "/http://x" stays a path on Label Studio, it never becomes another host.
    prefix = base.path.split("?", 1)[0].rstrip("/")
    return parse_target(f"{base.scheme}://{base.netloc}{prefix}/{url.lstrip('/')}")


def is_allowed(target: Target, settings: Any) -> bool:
    """Label Studio's own host:port, or a MEDIA_ALLOWED_HOSTS entry (``host`` = any port, ``host:port``, ``*``)."""
    ls = label_studio_target(settings)
    if ls is not None and (ls.host, ls.port) == (target.host, target.port):
        return True
    for entry in str(getattr(settings, "media_allowed_hosts", "") or "").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if entry.startswith("["):
            literal, _, port = entry[1:].partition("]")
            port = port.lstrip(":")
            try:
                host = str(ipaddress.IPv6Address(literal))
            except ValueError:
                continue
        else:
            host, _, port = entry.partition(":")
        if host == target.host and (not port or (port.isdigit() and int(port) == target.port)):
            return True
    return False


def check_allowed(target: Target, shown: str, settings: Any, *, redirect: bool = False) -> None:
    if is_allowed(target, settings):
        return
    where = "redirected to a host" if redirect else f"host {target.netloc}"
    raise MediaError(
        f"cannot fetch {shown}: {where} is not Label Studio's and not in MEDIA_ALLOWED_HOSTS "
        "(comma-separated host or host:port entries, '*' for any host)"
    )


def is_label_studio(target: Target, settings: Any) -> bool:
    """Same host:port as LABEL_STUDIO_URL (any scheme): where the token may go, so where the path rule applies."""
    ls = label_studio_target(settings)
    return ls is not None and (ls.host, ls.port) == (target.host, target.port)


def label_studio_media_path(target: Target, settings: Any) -> Target:
    """``target`` with its path in canonical form when it is one of Label Studio's media routes; MediaError saying
    why otherwise (the message names the decoded path, never the token).

    The path is percent-decoded once (as Django does before routing), then refused when decoding leaves another
    escape (double encoding), or when it holds ``;`` parameters, ``.``/``..`` or empty (``//``) segments, backslashes
    or control characters: proxies and servers disagree about those, so they could route a path we checked as media
    somewhere else. The result is re-encoded from the decoded form, so what was checked is what is requested.
    """
    raw, sep, query = target.path.partition("?")
    try:
        path = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise MediaError("its path is not valid UTF-8 once percent-decoded") from None
    if _PCT_RE.search(path):
        raise MediaError(f"its path {path[:200]!r} is percent-encoded twice")
    if _CONTROL_RE.search(path) or "\\" in path:
        raise MediaError("its path holds control characters or a backslash once percent-decoded")
    if ";" in path:
        raise MediaError(f"its path {path[:200]!r} holds ';' parameters")
    segments = path.split("/")[1:]
    if any(seg in (".", "..") for seg in segments) or any(seg == "" for seg in segments[:-1]):
        raise MediaError(f"its path {path[:200]!r} holds '.', '..' or empty segments")
    ls = label_studio_target(settings)
    prefix = ls.path.split("?", 1)[0].rstrip("/") if ls is not None else ""
    relative = path[len(prefix) :] if prefix and path.startswith(prefix + "/") else path
    if not any(rule.fullmatch(relative) for rule in _MEDIA_PATHS):
        raise MediaError(f"{path[:200]!r} is not one of Label Studio's media paths ({MEDIA_PATHS_TEXT})")
    canonical = quote(path, safe=_PATH_SAFE) + (f"?{query}" if sep else "")
    return Target(target.scheme, target.host, target.port, canonical)


def guard_label_studio(target: Target, shown: str, settings: Any) -> Target:
    """The first hop: a Label Studio URL is reduced to its canonical media path or refused before connecting."""
    if not is_label_studio(target, settings):
        return target
    try:
        return label_studio_media_path(target, settings)
    except MediaError as exc:
        raise MediaError(
            f"cannot fetch {shown} from Label Studio: {exc}; refused before connecting, so the backend's token "
            "never reaches Label Studio's API"
        ) from None


def resolve_local_file(url: str, settings: Any) -> Path | None:
    """The file behind a /data/local-files/?d= URL under the local document root, when it exists there.

    Paths that escape the document root (``..``, symlinks outside it) are refused: the ``d`` parameter comes from
    task data, which anyone with import rights controls.
    """
    root_setting = getattr(settings, "local_files_root", "") or ""
    try:
        parsed = urlparse(url)
    except ValueError:  # e.g. an unterminated "[IPv6" host: not a URL any parser agrees on
        raise MediaError(f"{url!r} is not a valid URL") from None
    if not root_setting or LOCAL_FILES_PREFIX.rstrip("/") not in parsed.path:
        return None
    rel = (parse_qs(parsed.query).get("d") or [""])[0]
    if not rel:
        raise MediaError(f"local-files URL {url!r} has no ?d=<path> parameter")
    root = Path(root_setting).expanduser().resolve()
    path = (root / unquote(rel).lstrip("/")).resolve()
    if path != root and root not in path.parents:
        raise MediaError(f"local-files path {rel!r} points outside the document root {root}")
    return path if path.is_file() else None
