"""The demo's HTTP server (standard library, bound to 127.0.0.1).

GET  /                      the page (static/index.html, app.js, style.css)
GET  /api/info              the model, the methods, the samples
GET  /api/samples/<id>.png  a held-out synthetic scene
POST /api/caption?methods=baseline,sparc:tau=8+locore[&sample=<id>]
                            method settings as on the command line (neverfade.methods.spec), one pane each;
                            body: the image file's bytes (none with `sample`); answers a stream of JSON lines
                            (demo.stream), or a 4xx with {"error": "..."} for a bad request
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

MB = 1024 * 1024
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class DemoApp:
    """What the server serves: one model (one caption at a time), the method parameters given on the command line,
    and the sample scenes."""

    def __init__(
        self,
        captioner,
        method_params: dict[str, dict[str, Any]] | None = None,
        max_new_tokens: int = 200,
        prompt: str | None = None,
        samples: int = 8,
        max_upload_mb: float = 20,
        world: str = "default",
    ):
        from neverfade.api import DEFAULT_PROMPT
        from neverfade.scenes import HELD_OUT_SEEDS

        self.captioner, self.method_params = captioner, method_params or {}
        self.max_new_tokens, self.prompt = max_new_tokens, prompt or DEFAULT_PROMPT
        self.max_upload = int(max_upload_mb * MB)
        self.samples = {f"scene-{seed:05d}": seed for seed in HELD_OUT_SEEDS[:samples]}
        self.world = world
        self._sample_png: dict[str, bytes] = {}
        self.lock = threading.Lock()  # one model, one caption at a time

    def info(self) -> dict:
        from neverfade.methods import BASELINE, METHODS

        return {
            "model": self.captioner.name,
            "prompt": self.prompt,
            "max_new_tokens": self.max_new_tokens,
            "max_upload_mb": self.max_upload / MB,
            "methods": [BASELINE, *METHODS],
            "samples": [{"id": s, "url": f"/api/samples/{s}.png"} for s in self.samples],
        }

    def settings(self, text: str) -> list[tuple[str, list[str], dict]]:
        """ "baseline,sparc:tau=8+locore" (method settings as the command line writes them, separated by commas) ->
        one (label, names, parameters) per pane, the command line's method flags merged in; a bad setting is a 400."""
        from neverfade.methods import ParameterError, build_methods
        from neverfade.methods.spec import format_spec, parse_spec, setting, split_list

        settings = []
        for spec in split_list(text):
            spec = re.sub(r"[\s+]+", "+", spec)  # "+" arrives as a space when the query is not encoded
            try:
                names, params = setting(parse_spec(spec, self.method_params))
                build_methods(names, params)
                settings.append((format_spec(parse_spec(spec)), names, params))
            except ParameterError as err:
                raise RequestError(400, str(err)) from None
        if not settings:
            raise RequestError(400, "choose at least one method")
        return settings

    def sample(self, name: str) -> tuple[Image.Image, list[str]]:
        from neverfade.data.samples import make_world_scene

        if name not in self.samples:
            raise RequestError(404, f"no sample named {name!r}; pick one of the samples shown")
        scene = make_world_scene(self.samples[name], self.world)
        return scene.image.convert("RGB"), sorted(scene.kinds)

    def sample_png(self, name: str) -> bytes:
        if name not in self._sample_png:
            buffer = io.BytesIO()
            self.sample(name)[0].save(buffer, format="PNG")
            self._sample_png[name] = buffer.getvalue()
        return self._sample_png[name]

    def uploaded(self, body: bytes) -> Image.Image:
        if not body:
            raise RequestError(400, "no image: upload an image file or pick a sample")
        from neverfade.data.images import ImageError, ImageTooLarge, load_image

        try:
            return load_image(body)  # the command line's loader: EXIF orientation, 16-bit, transparency
        except ImageTooLarge:
            raise RequestError(413, "the image has too many pixels to read safely") from None
        except ImageError:
            raise RequestError(415, "the file is not an image (PNG, JPEG, GIF, BMP or WebP expected)") from None


class Handler(BaseHTTPRequestHandler):
    app: DemoApp  # set on the subclass made by make_server
    server_version = "neverfade-demo"

    def log_message(self, format, *args):  # quiet: errors are logged where they happen
        pass

    def do_GET(self):
        self._guarded(self._get)

    def do_POST(self):
        self._guarded(self._post)

    def _guarded(self, handle) -> None:
        try:
            handle(urlsplit(self.path))
        except RequestError as err:
            self._json(err.status, {"error": err.message})
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # no stack trace to the page; it goes to the server's stderr
            traceback.print_exc(file=sys.stderr)
            self._json(500, {"error": f"internal error ({type(err).__name__}); the server's log has the details"})

    def _get(self, url) -> None:
        path = url.path
        if path in ("/", "/index.html"):
            path = "/static/index.html"
        if path.startswith("/static/") and path[len("/static/") :] in STATIC:
            name = path[len("/static/") :]
            self._send(200, STATIC[name], resources.files("neverfade.demo").joinpath("static", name).read_bytes())
        elif path == "/api/info":
            self._json(200, self.app.info())
        elif path.startswith("/api/samples/") and path.endswith(".png"):
            self._send(200, "image/png", self.app.sample_png(path[len("/api/samples/") : -len(".png")]))
        elif path == "/api/caption":
            raise RequestError(405, "POST the image to /api/caption")
        else:
            raise RequestError(404, f"not found: {path}")

    def _post(self, url) -> None:
        if url.path != "/api/caption":
            raise RequestError(404, f"not found: {url.path}")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._body()
        settings = self.app.settings(query.get("methods", ""))
        if "sample" in query:
            if body:
                raise RequestError(400, "send either an image or a sample, not both")
            image, objects = self.app.sample(query["sample"])
        else:
            image, objects = self.app.uploaded(body), None
        from neverfade.demo.stream import caption_events

        with self.app.lock:
            self.send_response(200)
            self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            for event in caption_events(
                self.app.captioner, image, objects, settings, self.app.prompt, self.app.max_new_tokens
            ):
                self.wfile.write((json.dumps(event, ensure_ascii=False) + "\n").encode())
                self.wfile.flush()

    def _body(self) -> bytes:
        """The request body, refused past the upload limit (read and dropped up to 4x the limit, so that the browser
        gets the answer; past that the connection is closed unread)."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        limit = self.app.max_upload
        if length > limit:
            remaining = length if length <= 4 * limit else 0
            while remaining > 0:
                chunk = self.rfile.read(min(MB, remaining))
                if not chunk:
                    break
                remaining -= len(chunk)
            self.close_connection = True
            raise RequestError(413, f"the file is {length / MB:.1f} MB; the limit is {limit / MB:g} MB")
        return self.rfile.read(length) if length > 0 else b""

    def _json(self, status: int, data: dict) -> None:
        self._send(status, "application/json; charset=utf-8", json.dumps(data, ensure_ascii=False).encode())

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


def make_server(app: DemoApp, port: int = 8765) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0: any free port; `server.server_address[1]` tells which)."""
    handler = type("DemoHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    return server
