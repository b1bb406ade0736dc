"""Property-based fuzzing of every route through Flask's test client (issue 9): arbitrary JSON values, random bytes,
route-shaped bodies with wrong values, random headers and query strings. Whatever arrives, the answer is never a
5xx and always a JSON object; the app keeps serving afterwards.

A model is published and images come from the local-files root, so /predict bodies that pass validation go through
fetching, decoding and inference; /webhook talks to a real Redis (a 503 "Redis down" would be a legitimate 5xx).
"""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_helpers import DENSE_XML, SPARSE_XML, task

ROUTES = [
    ("POST", "/predict"),
    ("POST", "/setup"),
    ("POST", "/webhook"),
    ("GET", "/versions"),
    ("POST", "/versions"),
    ("GET", "/health"),
    ("GET", "/"),
    ("GET", "/metrics"),
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["7", "7.1700000000", "-1", "0", "2147483648", "1e3", "", " ", "../x", "7.1.2"])
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=25,
)  # fmt: skip
image_urls = st.sampled_from(
    ["/data/local-files/?d=t0.png", "/data/local-files/?d=corrupt.png", "/data/local-files/?d=../../etc/passwd",
     "/data/local-files/?d=huge.png", "/data/local-files/?d=", "s3://b/k", "/data/upload/1/x.png", "relative.png"]
) | st.text(max_size=40)  # fmt: skip
tasks = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.integers(min_value=-5, max_value=2**33) | json_values,
            "data": st.fixed_dictionaries({}, optional={"image": image_urls, "text": json_values}) | json_values,
        },
    )
    | json_values
)
projects = st.sampled_from(["7.1700000000", 7, "8.1", "7"]) | json_values


def _often(valid: st.SearchStrategy) -> st.SearchStrategy:
    """``valid`` three times in four, any JSON value otherwise: bodies get past validation often enough to fuzz
    what lies behind it (strategies, label configs, images, Redis)."""
    return st.one_of(valid, valid, valid, json_values)


def _route_body(route: str) -> st.SearchStrategy:
    if route == "/predict":
        return st.fixed_dictionaries(
            {
                "project": _often(st.sampled_from(["7.1700000000", 7, "8.1"])),
                "tasks": _often(st.lists(tasks, max_size=6)),
            },
            optional={
                "label_config": _often(st.sampled_from([DENSE_XML, SPARSE_XML, "<View/>", "<View"])),
                "params": json_values,
            },
        )
    if route == "/setup":
        extra = st.fixed_dictionaries(
            {},
            optional={
                "strategy": _often(st.sampled_from(["entropy", "margin", "bald", "coreset", "nope"])),
                "aggregation": _often(st.sampled_from(["sum", "mean", "max"])),
                "strategy_params": _often(
                    st.dictionaries(st.sampled_from(["aggregation", "x"]), json_values, max_size=2)
                ),
            },
        )
        return st.fixed_dictionaries(
            {"project": _often(st.sampled_from(["7.1700000000", 7, "9.1"]))},
            optional={
                "schema": _often(st.sampled_from([DENSE_XML, SPARSE_XML, "<View/>"])),
                "extra_params": st.one_of(extra, extra.map(json.dumps), json_values),
                "hostname": json_values,
            },
        )
    if route == "/webhook":
        ids = _often(st.integers(min_value=-3, max_value=2**32))
        return st.fixed_dictionaries(
            {
                "action": _often(
                    st.sampled_from(
                        [
                            "ANNOTATION_CREATED",
                            "ANNOTATION_UPDATED",
                            "ANNOTATIONS_DELETED",
                            "START_TRAINING",
                            "PROJECT_UPDATED",
                        ]
                    )
                ),  # fmt: skip
            },
            optional={
                "project": st.one_of(st.fixed_dictionaries({"id": ids}), ids),
                "annotation": _often(
                    st.fixed_dictionaries(
                        {}, optional={"id": ids, "task": ids, "project": ids, "was_cancelled": json_values}
                    )
                ),  # fmt: skip
                "task": _often(st.fixed_dictionaries({}, optional={"id": ids, "project": ids})),
            },
        )
    return st.fixed_dictionaries({}, optional={"project": projects})


header_text = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=40)
content_types = st.sampled_from(
    [None, "application/json", "application/json; charset=utf-8", "text/plain", "application/x-www-form-urlencoded",
     "multipart/form-data", "multipart/form-data; boundary=xyz", "application/vnd.api+json", "image/png"]
) | header_text  # fmt: skip
headers = st.dictionaries(
    st.sampled_from(["Authorization", "Accept", "Content-Encoding", "X-Forwarded-For", "Accept-Encoding", "Cookie"]),
    header_text,
    max_size=3,
)


def _body_bytes(route: str) -> st.SearchStrategy[bytes]:
    as_json = (_route_body(route) | json_values).map(lambda v: json.dumps(v).encode())
    return as_json | st.binary(max_size=200) | as_json.map(lambda b: b[: len(b) // 2])


@pytest.fixture
def fuzz_client(make_client, publish, redis_url):
    publish(7)
    return make_client(redis_url=redis_url, train_batch_size=1000)


def _check(response, text_ok: bool = False) -> None:
    assert response.status_code < 500, response.get_data(as_text=True)[:500]
    if text_ok and response.status_code == 200 and response.mimetype == "text/plain":
        return  # /metrics?format=prometheus
    assert response.is_json, response.get_data(as_text=True)[:200]
    assert isinstance(response.get_json(), dict)


@pytest.mark.parametrize(("method", "route"), ROUTES, ids=[f"{m} {r}" for m, r in ROUTES])
def test_fuzzed_requests_never_get_a_5xx(fuzz_client, method, route):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(
        body=_body_bytes(route),
        content_type=content_types,
        extra_headers=headers,
        query=st.dictionaries(
            st.sampled_from(["project", "details", "format", "x"]),
            st.sampled_from(["1", "7", "prometheus", "0"]) | header_text,
            max_size=2,
        ),
    )
    def fuzz(body: bytes, content_type: str | None, extra_headers: dict, query: dict) -> None:
        kwargs = {"headers": extra_headers, "query_string": query}
        if method == "POST":
            kwargs.update(data=body, content_type=content_type)
        _check(fuzz_client.open(route, method=method, **kwargs), text_ok=route == "/metrics")

    fuzz()
    # still serving: a good prediction after everything the fuzzer sent
    r = fuzz_client.post("/predict", json={"tasks": [task(1, "t0.png")], "project": "7.1", "label_config": DENSE_XML})
    assert r.status_code == 200 and r.get_json()["results"][0]["result"]


@pytest.mark.parametrize("route", ["/predict", "/setup", "/webhook", "/versions"])
def test_fuzzed_route_shaped_bodies_never_get_a_5xx(fuzz_client, route):
    """JSON bodies shaped like the route's, with valid and wrong values mixed field by field."""

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(body=_route_body(route))
    def fuzz(body: dict) -> None:
        _check(fuzz_client.post(route, json=body))

    fuzz()
    assert fuzz_client.post("/setup", json={"project": "7.1", "schema": DENSE_XML}).status_code == 200


@settings(max_examples=200, deadline=None, database=None)
@given(value=json_values)
def test_json_depth_scan_bounds_what_the_parser_sees(value):
    """The pre-parse depth scan never under-counts the real nesting, and is exact once it scans (brackets inside
    strings, escaped quotes and backslashes included: hypothesis' text draws them)."""
    from ml_backend.server.schemas import json_depth

    def depth(v) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    text = json.dumps(value)
    assert json_depth(text) >= depth(value)
    padded = json.dumps({"pad": '[{"\\' * 40, "v": value}, ensure_ascii=False)  # forces the full scan
    assert json_depth(padded) == depth(value) + 1
