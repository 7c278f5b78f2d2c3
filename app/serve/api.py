"""The HTTP API of the serving app, described once: request and response models (the OpenAPI
page at ``/docs``) and the error handlers that answer every refusal with one line.
"""

# (no `from __future__ import annotations`: FastAPI reads the models from the signatures)
from typing import Literal, Optional, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Id = Union[StrictStr, StrictInt]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id = Field(description="the user's id, as in the ratings (text or integer)")
    k: StrictInt = Field(20, description="how many items (1 to the server's max_k)")
    history: Optional[list[Id]] = Field(
        None, description="the user's recent item ids, oldest first: a new user is "
                          "recommended from them, a known user's replace the stored ones")
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
    items: list[Item]


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Id
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


class VersionInfo(BaseModel):
    model_version: str
    model: str = Field(description="what the app serves: a folder, or an MLflow model URI")
    weights_sha256: str
    users: int
    items: int
    loaded_unix: float
    swaps: int = Field(description="model versions swapped in since the replica started")


api = FastAPI(title="Two-tower recommender",
              description="Top-K recommendations and pair scores from a two-tower model.")


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


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"error": _one_line(exc)})


@api.exception_handler(HTTPException)
async def _refused(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)})


