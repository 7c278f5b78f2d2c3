"""The HTTP API of the serving app, described once: request and response models (the OpenAPI
page at ``/docs``) and the error handlers that answer every refusal with one line.

Every error the app answers has one shape, ``{"error": "<one line>"}``: 404 (no such path),
405 (a method the path does not take), 422 (a request the API refuses: malformed or too
deeply nested JSON, wrong types, empty ids, text that is not valid Unicode), 500 (the app
failed), 503 (no model loaded). ``HEAD`` is answered wherever ``GET`` is.
"""

# (no `from __future__ import annotations`: FastAPI reads the models from the signatures)
import logging
from typing import Annotated, Any, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException


def _valid_text(value: Union[str, int]) -> Union[str, int]:
    """Ids must be valid Unicode: JSON can carry a lone surrogate (``"\\ud800"``), which no
    id holds and which cannot be encoded as UTF-8 further on."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = value[e.start]
            raise PydanticCustomError(
                "invalid_unicode", "contains a lone surrogate (U+{code}), which is not valid "
                "Unicode text", {"code": f"{ord(bad):04X}"}) from None
    return value


def _user_id(value: Union[str, int]) -> Union[str, int]:
    """A user id names someone: empty or blank text is refused, not answered with
    popularity as an unknown user would be."""
    if isinstance(value, str) and not value.strip():
        raise PydanticCustomError("blank_id", "must not be empty or blank")
    return _valid_text(value)


# text or integer ids, matched by their exact text
Id = Annotated[Union[StrictStr, StrictInt], AfterValidator(_valid_text)]
UserId = Annotated[Union[StrictStr, StrictInt], AfterValidator(_user_id)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UserId = Field(description="the user's id, as in the ratings (text or integer; "
                                        "not empty)")
    k: StrictInt = Field(20, description="how many items (1 to the server's max_k)")
    history: Optional[list[Id]] = Field(
        None, description="the user's recent item ids, oldest first: a new user is "
                          "recommended from them, a known user's replace the stored ones; "
                          "ids the model does not know are ignored and counted, and a "
                          "history with no known item counts as none")
    exclude_rated: StrictBool = Field(
        True, description="leave out the items the user rated and the history's items")


class Item(BaseModel):
    item_id: str
    score: float
    title: Optional[str] = None


class RecommendResponse(BaseModel):
    model_version: str
    user_known: bool
    source: Literal["model", "history", "popularity"] = Field(
        description="model: the user's stored profile; history: the given history; "
                    "popularity: neither (the most popular items, score = positives)")
    unknown_history_items: int = Field(
        0, description="items of the given history the model does not know (ignored)")
    items: list[Item]


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: UserId
    item_id: Id


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[Pair] = Field(min_length=1, description="pairs to score (at most max_pairs)")


class PairScore(BaseModel):
    user_id: str
    item_id: str
    score: Optional[float] = Field(description="the towers' dot product; null for an "
                                               "unknown id")
    probability: Optional[float] = Field(description="calibrated probability of a positive")
    known_user: bool
    known_item: bool


class ScoreResponse(BaseModel):
    model_version: str
    pairs: list[PairScore]


class Health(BaseModel):
    status: Literal["ready"]
    model_version: str


class Pending(BaseModel):
    version: Optional[str] = Field(description="the version refused (null: its name could "
                                               "not be read)")
    error: str = Field(description="why, in one line")


class VersionInfo(BaseModel):
    model_version: str
    model: str = Field(description="what the app serves: a folder, or an MLflow model URI")
    weights_sha256: str
    users: int
    items: int
    loaded_unix: float
    swaps: int = Field(description="model versions swapped in since the replica started")
    pending: Optional[Pending] = Field(
        None, description="a newer version this replica refused to load, and why (null when "
                          "none): the served version stays until that version's files change")




def _printable(text: str) -> str:
    """``text`` as valid Unicode: a lone surrogate echoed from a request (a field name) is
    written as its escape, so the error itself can be sent."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}"
    if tuple(e.get("loc", ())) == ("body",) and e.get("type") == "model_attributes_type":
        return ("the body must be a JSON object, sent with the header Content-Type: "
                "application/json")
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {e.get('msg')}{more}"


def error(status: int, message: str, headers: Optional[dict[str, str]] = None
          ) -> JSONResponse:
    """The one error shape: ``{"error": "<one line>"}``."""
    line = _printable(" ".join(str(message).split()))[:500]
    return JSONResponse(status_code=status, content={"error": line}, headers=headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, _one_line(exc))


async def _refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTP refusal, FastAPI's and Starlette's (404 no route, 405 wrong method) alike.
    A body too deeply nested for the JSON parser (FastAPI answers 400 "error parsing the
    body") is a refused request like any malformed one: 422."""
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError):
        return error(422, "malformed JSON: nested too deeply")
    if exc.status_code == 404 and exc.detail == "Not Found":
        return error(404, f"no such path: {request.url.path} (the API: POST /recommend, "
                          f"POST /score, GET /healthz, GET /version, GET /docs)")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        return error(405, f"{request.method} {request.url.path}: method not allowed"
                          f"{f' (allowed: {allowed})' if allowed else ''}", exc.headers)
    return error(exc.status_code, str(exc.detail), exc.headers)


class Guard:
    """ASGI middleware around the API: ``HEAD`` is answered as ``GET`` without the body, and
    an exception of the app becomes a 500 in the one error shape (Serve's own answer would
    be plain text)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"
        if head:
            scope = {**scope, "method": "GET"}
        started = False

        async def reply(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        try:
            await self.app(scope, receive, reply)
        except Exception as e:  # noqa: BLE001 (answered in the one shape, logged by Serve)
            if started:
                raise
            logging.getLogger("ray.serve").exception("request failed")
            first = (str(e).splitlines() or [""])[0][:300]
            await error(500, f"internal error: {type(e).__name__}: {first}")(
                scope, receive, reply)


def new_api() -> FastAPI:
    """The FastAPI app with the API's error handlers and :class:`Guard` (the deployment
    declares its routes on :data:`api`)."""
    app = FastAPI(title="Two-tower recommender",
                  description="Top-K recommendations and pair scores from a two-tower model.")
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _refused)
    app.add_middleware(Guard)
    return app


api = new_api()
