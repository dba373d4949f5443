"""The error hierarchy: an error is built whole, and a copy carries what is added later."""

from __future__ import annotations

from app.errors import InvalidRequest, ModelNotFound, NotFound, UpstreamRejected


def test_errors_with_headers_answers_a_copy_and_leaves_the_raised_error_alone() -> None:
    raised = UpstreamRejected(
        422,
        "bad prompt",
        error_type="invalid_request_error",
        param="prompt",
        code="bad",
        headers={"x-request-id": "req_up"},
        upstream_headers={"retry-after": "2"},
    )
    final = raised.with_headers({"x-should-retry": "false"})
    assert type(final) is UpstreamRejected and final is not raised
    assert final.headers == {"x-request-id": "req_up", "x-should-retry": "false"}
    assert raised.headers == {"x-request-id": "req_up"}
    assert (final.status_code, final.failure, final.upstream_headers, final.envelope()) == (
        422,
        "rejected",
        {"retry-after": "2"},
        raised.envelope(),
    )


def test_errors_not_found_is_a_404_invalid_request() -> None:
    error = NotFound("No such image file.", code="file_not_found")
    assert isinstance(error, InvalidRequest)
    assert (error.status_code, error.error_type, error.code) == (
        404,
        "invalid_request_error",
        "file_not_found",
    )
    assert (NotFound("x").code, ModelNotFound("x").status_code) == ("not_found", 404)
