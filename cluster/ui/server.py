"""The search page's HTTP server (aiohttp): one page, its static files, and a JSON API that
calls the search replicas through `genius.client.AsyncSearchClient`.

    GET  /                  the page (cluster/ui/static/index.html)
    GET  /static/<file>     app.js, style.css
    GET  /api/info          {address, shards, max_upload_bytes}
    POST /api/search        JSON {text, image (base64), k, beam, modalities, rerank}, or the same
                            fields as multipart/form-data (image as a file, modality repeated)
                            -> {version, partial, missing_shards, hits: [{key, modality, score, id
                            (hex), item, source, metadata, thumbnail_url, image_url, text}]}
    GET  /api/item?source=<shard file>/<key>&part=thumb|image|text
                            a hit's JPEG thumbnail, original image or text (cluster.ui.shard_media)

Errors are JSON {"error": "<plain message>"}: the service's gRPC status details with the status
mapped to HTTP (INVALID_ARGUMENT 400, UNAUTHENTICATED 401, RESOURCE_EXHAUSTED 429, UNAVAILABLE
503, DEADLINE_EXCEEDED 504), uploads over the limit 413; never a stack trace (that goes to the
log). `start_ui` runs the server in a background thread with its own event loop, for `genius ui`,
`genius serve local --ui` and the demo.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc
from aiohttp import web

from cluster.ui.shard_media import MediaError, ShardMedia

log = logging.getLogger("genius.ui")

STATIC = Path(__file__).with_name("static")
MAX_UPLOAD_BYTES = 20 << 20  # the replica's image limit (workers.replica.Limits.max_image_bytes)
MODALITIES = ("image", "text", "image_text")
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")
# Content-Security-Policy: everything from this server (the page works offline), nothing inline.
_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


@dataclass
class UIConfig:
    address: str  # the search replicas: host:port or a gRPC target such as dns:///search:50051
    tls_ca: bytes | None = None  # PEM CA to trust: reach the replicas over TLS
    token: str | None = None  # bearer token forwarded to the replicas
    timeout: float = 30.0  # seconds per search
    max_upload_bytes: int = MAX_UPLOAD_BYTES


class ApiError(Exception):
    """An error the page shows as it is: a plain message and an HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


CONFIG = web.AppKey("config", UIConfig)
MEDIA = web.AppKey("media", object)  # ShardMedia | None
CLIENT = web.AppKey("client", object)  # genius.client.AsyncSearchClient


def make_app(config: UIConfig, media: ShardMedia | None = None) -> web.Application:
    # The body limit leaves room for the form's other fields; the image itself is checked below.
    app = web.Application(client_max_size=config.max_upload_bytes + (1 << 20), middlewares=[_errors])
    app[CONFIG], app[MEDIA] = config, media
    app.router.add_get("/", _page)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    app.router.add_get("/api/info", _info)
    app.router.add_post("/api/search", _search)
    app.router.add_get("/api/item", _item)
    app.on_startup.append(_open_client)
    app.on_cleanup.append(_close_client)
    app.on_response_prepare.append(_headers)
    return app


async def _open_client(app: web.Application) -> None:
    from genius.client import AsyncSearchClient

    config = app[CONFIG]
    # Created here: a grpc.aio channel belongs to the event loop that runs the server.
    app[CLIENT] = AsyncSearchClient(config.address, tls_ca=config.tls_ca, token=config.token, timeout=config.timeout)


async def _close_client(app: web.Application) -> None:
    await app[CLIENT].close()


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    if request.path == "/" or request.path.startswith("/static/"):
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["Cache-Control"] = "no-cache"  # revalidate: an upgrade shows at once


@web.middleware
async def _errors(request: web.Request, handler):
    """Every failure as {"error": message}: the page shows it, the log keeps the trace."""
    try:
        return await handler(request)
    except ApiError as err:
        return web.json_response({"error": err.message}, status=err.status)
    except MediaError as err:
        if err.status >= 500:  # an unreadable shard is the operator's to see
            log.warning("%s: %s", request.path_qs, err)
        return web.json_response({"error": str(err)}, status=err.status)
    except web.HTTPRequestEntityTooLarge:
        limit = _mib(request.app[CONFIG].max_upload_bytes)
        return web.json_response({"error": f"the upload is too large: images up to {limit} are accepted"}, status=413)
    except web.HTTPException as err:
        if not request.path.startswith("/api/") or err.status < 400:
            raise
        return web.json_response({"error": err.reason}, status=err.status)
    except Exception:  # noqa: BLE001 - a bug here must not show the page a traceback
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": "the UI server failed on this request (its log has the details)"},
                                 status=500)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n} bytes"


# ----------------------------------------------------------------------------- endpoints


async def _page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def _info(request: web.Request) -> web.Response:
    media = request.app[MEDIA]
    config = request.app[CONFIG]
    return web.json_response({"address": config.address, "shards": len(media.by_name) if media else 0,
                              "max_upload_bytes": config.max_upload_bytes})


@dataclass
class Query:
    text: str = ""
    image: bytes = b""
    k: int = 12
    beam: int | None = None
    modalities: tuple[str, ...] = ()
    rerank: bool = True


async def _search(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    query = await _read_query(request, config.max_upload_bytes)
    if not query.text.strip() and not query.image:
        raise ApiError(400, "type some text or add an image to search with")
    started = time.perf_counter()
    try:
        result = await request.app[CLIENT].search(
            text=query.text.strip() or None, image=query.image or None, k=query.k, beam_size=query.beam,
            rerank=query.rerank, target_modalities=list(query.modalities) or None)
    except grpc.RpcError as err:
        raise _service_error(err, config) from None
    millis = (time.perf_counter() - started) * 1000
    hits = _hits(result)
    media = request.app[MEDIA]
    if media is not None and hits:
        # Reading texts from the shards blocks (file I/O, a first-use scan): off the event loop.
        await asyncio.get_running_loop().run_in_executor(None, _add_media, media, hits)
    log.debug("search (%d chars, %d image bytes) -> %d hits from %s in %.0f ms", len(query.text), len(query.image),
              len(hits), result.version, millis)
    return web.json_response({"version": result.version, "partial": result.partial,
                              "missing_shards": result.missing_shards, "hits": hits,
                              "milliseconds": round(millis, 1)})


async def _item(request: web.Request) -> web.Response:
    media = request.app[MEDIA]
    source = request.query.get("source", "")
    part = request.query.get("part", "thumb")
    if media is None:
        raise ApiError(404, "the UI was started without --shards: it has no pictures or texts of hits")
    if part not in ("thumb", "image", "text"):
        raise ApiError(400, f"part must be thumb, image or text, got {part!r}")
    loop = asyncio.get_running_loop()
    headers = {"Cache-Control": "private, max-age=600"}
    if part == "text":
        text = await loop.run_in_executor(None, media.text, source)
        return web.Response(text=text, content_type="text/plain", charset="utf-8", headers=headers)
    if part == "image":
        data, content_type = await loop.run_in_executor(None, media.image, source)
        return web.Response(body=data, content_type=content_type, headers=headers)
    return web.Response(body=await loop.run_in_executor(None, media.thumbnail, source), content_type="image/jpeg",
                        headers=headers)


# ----------------------------------------------------------------------------- helpers


async def _read_query(request: web.Request, limit: int) -> Query:
    if request.content_type == "multipart/form-data":
        form = await request.post()
        image = form.get("image")
        data = b""
        if isinstance(image, web.FileField):
            data = image.file.read(limit + 1)
        elif isinstance(image, str) and image:
            data = _base64(image)
        fields = {"text": form.get("text"), "k": form.get("k"), "beam": form.get("beam"),
                  "modalities": form.getall("modality", []), "rerank": form.get("rerank")}
    elif request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "send a JSON object: {\"text\": ..., \"image\": <base64>, \"k\": ...}")
        data = _base64(body.get("image") or "")
        fields = body
    else:
        raise ApiError(415, "send the query as JSON or multipart/form-data")
    if len(data) > limit:
        raise ApiError(413, f"the image is too large: images up to {_mib(limit)} are accepted")
    text = fields.get("text") or ""
    if not isinstance(text, str):
        raise ApiError(400, "text must be a string")
    modalities = fields.get("modalities") or []
    if isinstance(modalities, str):
        modalities = [modalities]
    if not isinstance(modalities, (list, tuple)) or not all(isinstance(m, str) for m in modalities):
        raise ApiError(400, "modalities must be a list of names: image, text, image_text")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise ApiError(400, f"unknown modality {unknown[0]!r}: use image, text or image_text")
    return Query(text=text, image=data, k=_number(fields.get("k"), "k", 12),
                 beam=_number(fields.get("beam"), "beam", None), modalities=tuple(dict.fromkeys(modalities)),
                 rerank=_flag(fields.get("rerank"), True))


def _base64(value) -> bytes:
    if not isinstance(value, str):
        raise ApiError(400, "image must be base64 text")
    if value.startswith("data:"):  # a data: URL as FileReader.readAsDataURL gives it
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image is not valid base64") from None


def _number(value, name: str, default: int | None) -> int | None:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a whole number, got {value!r}") from None
    if number < 1:
        raise ApiError(400, f"{name} must be at least 1, got {number}")
    return number


def _flag(value, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    return str(value).lower() not in ("0", "false", "off", "no")


def _service_error(err: grpc.RpcError, config: UIConfig) -> ApiError:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
    details = " ".join(_REPR.sub("", details).split())  # no "<_io.BytesIO object at 0x...>" from PIL
    status = _HTTP_STATUS.get(code, 502)
    # A bad query is the user's to fix (INFO); a service that fails is the operator's (WARNING).
    log.log(logging.INFO if status < 500 else logging.WARNING, "search failed: %s: %s", code.name, details)
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"the search service at {config.address} is unavailable ({details or 'no answer'})"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the search took longer than {config.timeout:g} s and was abandoned"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        hint = "the token of --token-file was refused" if config.token else "start the UI with --token-file"
        message = f"the search service wants a bearer token: {details or 'unauthenticated'} ({hint})"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        message = f"the search service is busy: {details or 'too many requests'}; try again in a moment"
    else:
        message = details or f"the search service answered {code.name}"
    return ApiError(status, message)


def _hits(result) -> list[dict]:
    hits = []
    for key, modality, score, id_, item, source, metadata in zip(
            result.keys[0], result.modalities[0], result.scores[0], result.ids[0], result.items[0],
            result.sources[0] if result.sources else [""] * len(result.keys[0]), result.metadata[0]):
        hits.append({"key": key, "modality": modality.name.lower(), "score": float(score), "id": bytes(id_).hex(),
                     "item": int(item), "source": source or None, "metadata": _metadata(metadata),
                     "thumbnail_url": None, "image_url": None, "text": None})
    return hits


def _metadata(text: str):
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _add_media(media: ShardMedia, hits: list[dict]) -> None:
    """Where each hit's picture is, and its text, from the shards; a hit whose source names no
    shard or record keeps only key and metadata."""
    for hit in hits:
        if not hit["source"]:
            continue
        try:
            found = media.describe(hit["source"])
        except MediaError as err:
            log.debug("hit %s: %s", hit["key"], err)
            continue
        if found["image"]:
            url = f"/api/item?source={quote(hit['source'], safe='')}"
            hit["thumbnail_url"], hit["image_url"] = url, url + "&part=image"
        hit["text"] = found["text"]


# ----------------------------------------------------------------------------- running it


class UIServer:
    """A running UI: `url`, `port`; `stop()` ends it (its thread and event loop)."""

    def __init__(self, host: str, port: int, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 media: ShardMedia | None):
        self.host, self.port, self._loop, self._thread, self._media = host, port, loop, thread, media

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else "[::1]" if self.host == "::" else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
        if self._media is not None:
            self._media.close()

    def __enter__(self) -> "UIServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_ui(address: str, shards=None, host: str = "127.0.0.1", port: int = 8080, *,
             tls_ca: str | bytes | None = None, token: str | None = None, timeout: float = 30.0,
             media: ShardMedia | None = None) -> UIServer:
    """Serve the search page for the replicas at `address` in a background thread.

    `shards`: what the index was built from (folder, pattern, URL, or a list of shard paths),
    to show pictures and texts of hits; None: keys and metadata only. `tls_ca`: a PEM file (or
    its bytes) to trust, for replicas serving TLS; `token`: a bearer token to forward. Port 0
    picks a free port. Raises OSError when the port is taken."""
    if media is None and shards:
        media = ShardMedia.from_spec(shards)
    ca = Path(tls_ca).read_bytes() if isinstance(tls_ca, (str, Path)) else tls_ca
    app = make_app(UIConfig(address, ca, token, timeout), media)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.TCPSite(runner, host, port).start())
            state["port"] = runner.addresses[0][1]
        except BaseException as err:  # noqa: BLE001 - handed to the caller, who raises it
            state["error"] = err
        ready.set()
        try:
            if "error" not in state:
                loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_default_executor())  # the shard readers' threads
            loop.close()

    thread = threading.Thread(target=run, name="genius-ui", daemon=True)
    thread.start()
    ready.wait()
    if "error" in state:
        thread.join()
        if media is not None:
            media.close()
        raise state["error"]  # type: ignore[misc]
    server = UIServer(host, int(state["port"]), loop, thread, media)  # type: ignore[arg-type]
    log.info("search page on %s (search replicas at %s)", server.url, address)
    return server
