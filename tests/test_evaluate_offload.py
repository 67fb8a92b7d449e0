"""A large /evaluate body is parsed in a child process (service/offload.py), off the worker's event loop,
as large /predict bodies are, and its answers are the endpoint's: figures, paired comparison and refusals
in the endpoint's order."""

from __future__ import annotations

import asyncio
import json

import pytest

from service import offload
from service.guard import FastRoute, Guard
from tests.test_paired_evaluation import answer, pair, service  # noqa: F401 - `pair` is a fixture


def _fast(svc) -> FastRoute:
    from service.service import ImageClassifier

    return FastRoute(ImageClassifier.apis["evaluate"].input_spec, None, svc._parse_evaluate_body,
                     svc._evaluate_parsed)


@pytest.fixture
def children(monkeypatch):
    """The functions run in forked children, in order."""
    ran, real = [], offload.run

    async def spy(fn):
        ran.append(fn)
        return await real(fn)

    monkeypatch.setattr(offload, "run", spy)
    return ran


def _body(images, labels, **extra) -> bytes:
    return json.dumps({"images": images, "labels": labels, **extra}).encode()


def test_a_large_evaluate_body_is_parsed_in_a_child_and_answered_as_the_endpoint(pair, fashion, children):  # noqa: F811
    svc = service(*pair)
    images, labels = fashion.test_x[:600, 0].tolist(), fashion.test_y[:600].tolist()
    body = _body(images, labels, compare=True)
    assert len(body) > offload.LARGE_BODY_BYTES
    got = answer(asyncio.run(Guard._fast_answer(_fast(svc), body)))
    assert len(children) == 1  # parsed in a child
    assert got == answer(svc.evaluate(images=images, labels=labels, compare=True))
    assert got[0] == 200 and got[1]["n"] == 600 and "comparison" in got[1]


def test_a_small_evaluate_body_takes_bentomls_route(pair, children):  # noqa: F811
    assert asyncio.run(Guard._fast_answer(_fast(service(*pair)), _body([[[0] * 28] * 28], [0]))) is None
    assert children == []


def test_large_evaluate_refusals_are_the_endpoints_in_its_order(pair, fashion, children):  # noqa: F811
    champion, challenger = pair
    images, labels = fashion.test_x[:600, 0].tolist(), fashion.test_y[:600].tolist()
    cases = [  # (service, body): the refusal the endpoint gives for the same arguments
        (service(champion, challenger), _body(images, [*labels[:-1], 10])),  # a label out of range: 400 range
        (service(champion, challenger), _body(images, labels[:-1])),  # one label short: 400 count
        (service(champion, challenger), _body(images, labels, compare="yes")),  # 400 compare
        (service(champion, None), _body(images, labels, compare=True)),  # 409 no_challenger
        (service(champion, None), _body(images, [*labels[:-1], 10], compare=True)),  # the 409 comes first
    ]
    for svc, body in cases:
        args = json.loads(body)
        got = answer(asyncio.run(Guard._fast_answer(_fast(svc), body)))
        assert got == answer(svc.evaluate(**args)), got
        assert got[0] in (400, 409), got
    assert len(children) == len(cases)
    invalid = body.replace(b'"labels": [', b'"labels": [[')  # BentoML's input model refuses it: its route answers
    assert asyncio.run(Guard._fast_answer(_fast(svc), invalid)) is None


def test_a_large_v2_infer_body_is_parsed_in_a_child_with_the_same_result_and_refusals(pair, fashion, children):  # noqa: F811
    from service import v2
    from service.inference import InputError

    spec = pair[0].spec
    images = fashion.test_x[:600].numpy()  # (600, 1, 28, 28)

    def body(shape, data) -> bytes:
        return json.dumps({"id": "r1", "inputs": [{"name": "images", "datatype": "UINT8", "shape": shape,
                                                   "data": data}]}).encode()

    large = body([600, 1, 28, 28], images.tolist())
    assert len(large) > offload.LARGE_BODY_BYTES
    x, binary_out, request_id = asyncio.run(v2.parse_body(large, None, spec))
    assert len(children) == 1  # parsed in a child
    assert (x == images).all() and x.dtype == images.dtype and (binary_out, request_id) == (False, "r1")
    short = body([601, 1, 28, 28], images.tolist())  # the shape says one image more than the data holds
    with pytest.raises(InputError) as refused:
        asyncio.run(v2.parse_body(short, None, spec))
    with pytest.raises(InputError) as direct:
        v2.parse_infer_request(json.loads(short), b"", spec)
    assert (refused.value.status, refused.value.reason, str(refused.value)) == \
        (direct.value.status, direct.value.reason, str(direct.value))
    assert len(children) == 2
    small = body([1, 1, 28, 28], images[:1].tolist())
    assert (asyncio.run(v2.parse_body(small, None, spec))[0] == images[:1]).all()
    assert len(children) == 2  # a small body is parsed in place
