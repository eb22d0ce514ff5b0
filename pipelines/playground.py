"""The browser playground: one page at ``/`` that chats through the same OpenAI-compatible routes
the SDK uses (``/v1/models``, ``/v1/chat/completions`` streamed), plus the sample media its
examples attach.

The page (``playground.html``) is plain HTML, CSS and JavaScript in one file: no build step, no
CDN, nothing fetched from outside, so it works on a machine with no internet, behind any route
prefix and with any number of ingress replicas (it keeps no state on the server).
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException

from omnistage.cluster.config import OmnistageConfig

router = APIRouter()

SAMPLE_TYPES = {"sample.png": "image/png", "sample.mp4": "video/mp4", "sample.wav": "audio/wav"}


@cache
def _page() -> tuple[str, str]:
    """The page and its Content-Security-Policy. The policy allows the page's own inline script
    (by hash) and requests to this server only: model output can never run code or send the
    API key elsewhere."""
    html = resources.files("omnistage.pipelines").joinpath("playground.html").read_text()
    (script,) = re.findall(r"<script>(.*?)</script>", html, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; connect-src 'self'; "
        "img-src 'self' data: blob:; media-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, policy


@router.get("/", include_in_schema=False)
async def playground() -> HTMLResponse:
    html, policy = _page()
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})


@cache
def _sample_files() -> dict[str, bytes]:
    from omnistage.pipelines.demo import sample_files

    return sample_files()


@router.get("/samples/{name}", include_in_schema=False)
async def sample(name: str) -> Response:
    """The files `omnistage samples` writes, for the page's examples."""
    if name not in SAMPLE_TYPES:
        raise HTTPException(404, f"expected a sample among {list(SAMPLE_TYPES)}, got {name!r}")
    return Response(_sample_files()[name], media_type=SAMPLE_TYPES[name])


def describe_world(config: OmnistageConfig) -> dict[str, Any] | None:
    """What the served model knows, so that a person knows what to ask: a built-in preset says
    (the shapes preset with its whole vocabulary); a checkpoint's world is its own, so None."""
    from omnistage.actors.builtin import BUILTIN_PRESETS
    from omnistage.pipelines import shapes

    model = config.stages.llm.model
    if model not in BUILTIN_PRESETS:
        return None
    world: dict[str, Any] = {"preset": model, "description": BUILTIN_PRESETS[model]}
    if model == "shapes":
        world["vocabulary"] = {
            "colours": list(shapes.COLOURS),
            "shapes": list(shapes.SHAPES),
            "sizes": list(shapes.SIZES),
            "places": list(shapes.POSITIONS),
            "motions": list(shapes.MOTION_PHRASES.values()),
            "pitches": list(shapes.PITCHES),
            "lengths": list(shapes.LENGTHS),
            "counts": list(shapes.COUNTS),
            "timbres": list(shapes.TIMBRES),
        }
    return world
