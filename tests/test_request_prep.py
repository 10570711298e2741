"""The request preparation's pure parts, without sockets (tests/test_hostile_input.py compares the
whole step with Envoy; these pin the building blocks it relies on)."""

from __future__ import annotations

import pytest

from pyproxy.http import path_norm
from pyproxy.http.original_ip import last_xff
from pyproxy.http.request_prep import _normalize_host
from pyproxy.netaddr import parse_ip


@pytest.mark.parametrize("xff,skip,want", [
    ("1.2.3.4", 0, ("1.2.3.4", True)),
    ("1.2.3.4, 5.6.7.8", 0, ("5.6.7.8", False)),
    ("1.2.3.4, 5.6.7.8", 1, ("1.2.3.4", True)),   # (Envoy: "single" is judged after the skip)
    ("1.2.3.4", 1, (None, False)),
    ("1.2.3.4,", 0, (None, False)),
    ("junk", 0, (None, False)),
    ("1.2.3.4 , 2001:db8::1", 0, ("2001:db8::1", False)),
    ("01.2.3.4", 0, (None, False)),      # inet_pton rules: no leading zeros
    ("1.2.3.4:80", 0, (None, False)),    # an address, not an address:port
])
def test_last_xff(xff, skip, want):
    assert last_xff(xff, skip) == want


def test_parse_ip_canonical_form():
    assert parse_ip("2001:0db8:0000::0001") == "2001:db8::1"
    assert parse_ip("") is None and parse_ip("[::1]") is None


@pytest.mark.parametrize("path,want", [
    ("/a/./b/../c", "/a/c"),
    ("/x/%2e%2E/admin", "/admin"),
    ("/%61dmin", "/admin"),
    ("/x\\..\\admin", "/admin"),
    ("/a b", "/a%20b"),
    ("/a%2Fb", "/a%2Fb"),           # an escaped slash stays escaped: path_with_escaped_slashes_action decides
    ("/..", "/"),
    ("/a/.b/..c", "/a/.b/..c"),
    ("/a%00", None),                 # NUL: invalid
])
def test_canonical_paths(path, want):
    assert path_norm.canonicalize(path) == want


@pytest.mark.parametrize("action,path,want", [
    (path_norm.UNESCAPE_AND_FORWARD, "/x%2F..%2Fadmin?q=%2F", (path_norm.CONTINUE, "/admin?q=%2F")),
    (path_norm.REJECT_REQUEST, "/x%2fy", (path_norm.REJECT, None)),
    (path_norm.UNESCAPE_AND_REDIRECT, "/x%5Cy", (path_norm.REDIRECT, "/x/y")),
    (path_norm.KEEP_UNCHANGED, "/x%2F..%2Fadmin", (path_norm.CONTINUE, "/x%2F..%2Fadmin")),
])
def test_escaped_slashes(action, path, want):
    assert path_norm.normalize(path, action, True, True) == want


def test_merge_slashes_keeps_the_ends():
    assert path_norm.merge_slashes("//a///b//") == "/a/b/"


@pytest.mark.parametrize("host,dot,anyp,match,want", [
    ("example.com.", True, False, None, "example.com"),
    ("example.com.:80", True, False, 80, "example.com"),
    ("example.com:81", False, False, 80, "example.com:81"),
    ("example.com:81", False, True, None, "example.com"),
    ("[::1]:80", False, True, None, "[::1]"),
    ("[::1]", False, True, None, "[::1]"),
    ("example.com:abc", False, True, None, "example.com:abc"),
])
def test_host_normalisation(host, dot, anyp, match, want):
    assert _normalize_host(host, dot, anyp, match) == want
