"""A fault-injecting OpenAI-compatible upstream: per-key scripted failures and refused keys.

Built on FakeOpenAIUpstream (same recording, same wire parsing); adds what the key pool needs:
a reply per key for every edit, keys the upstream refuses (401 on edits and on GET /models,
the probe), and hangs that end when the test ends.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.fakes.openai_upstream import FakeOpenAIUpstream, RecordedRequest, Reply


def error_reply(status: int, code: str | None = None, **headers: str) -> Reply:
    body = {
        "error": {
            "message": f"scripted failure {status}",
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": None,
            "code": code,
        }
    }
    return Reply(
        status=status, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )


class FaultyUpstream(FakeOpenAIUpstream):
    def __init__(self) -> None:
        super().__init__()
        # key -> the reply every edit made with that key gets (absent: a normal answer).
        self.by_key: dict[str, Reply] = {}
        # Keys answered 401 on every path, the probe's GET /models included.
        self.refused_keys: set[str] = set()
        self.responder = self._by_key

    def _by_key(self, record: RecordedRequest) -> Reply:
        if record.key in self.refused_keys:
            return error_reply(401, "invalid_api_key")
        return self.by_key.get(record.key or "", Reply())

    def edits_with(self, key: str) -> int:
        return sum(1 for request in self.edits if request.key == key)

    @property
    def probes(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/models")]

    async def _models(self, request: Request) -> Response:
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        self.requests.append(record)
        if record.key in self.refused_keys:
            return JSONResponse(error_reply(401, "invalid_api_key").body, status_code=401)
        return JSONResponse({"object": "list", "data": []})
