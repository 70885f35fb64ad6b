"""The gateway's HTTP side (Starlette): the pages, the sign-in, and the JSON/SSE API they call.

    GET  /chat, /label            the pages (the sign-in page instead without a fitting token)
    POST /signin, /signout        set or clear the HttpOnly token cookie
    GET  /api/me                  the signed-in role and person id
    POST /api/chat/stream         a chat turn: two samples of one request, as server-sent events
    POST /api/label/item          a labeling prompt and K responses
    POST /api/feedback/{page}     comparisons, rankings, ratings -> FeedbackService.SubmitBatch

Every answer the pages act on comes from the gRPC services: feedback is reported saved only when
the feedback service said Kafka acknowledged it.
"""
from __future__ import annotations

import contextlib
import html
import json
import logging
from pathlib import Path
from string import Template
from urllib.parse import parse_qs

import grpc
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common.data import HH_PAIRS
from sim.traffic import first_turn_prompts

from . import convert
from .access import PAGE_ROLES, PERSON_COOKIE, TOKEN_COOKIE, Access, Person, cross_site_refusal, new_anonymous_id
from .backends import Backends, Failure
from .config import WebConfig

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MAX_BODY = 256 * 1024
MAX_SIGNIN_BODY = 4096
# the pages load only their own scripts and styles: no inline script, nothing from elsewhere
HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def load_prompts(path: str) -> list[str]:
    """The labeling queue: one user message per line of `path`, or the shipped hh dialogues' first human turns."""
    if path:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    else:
        prompts = [p.removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:") for p in first_turn_prompts(HH_PAIRS)]
    if not prompts:
        raise SystemExit(f"--prompts {path}: no prompts")
    return prompts


class TooLarge(ValueError):
    """A request body over the route's limit (413)."""


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (TooLarge) as soon as it is known to pass `limit` bytes: by its
    Content-Length, or while it streams in (a chunked body has none), so it is never held whole."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"body: more than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"body: more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _event(name: str, data: dict) -> str:
    """One server-sent event (data on one line: JSON escapes newlines)."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def bad_request(e: Exception, **fields) -> JSONResponse:
    """A request the gateway refuses as sent (the pages do not retry it): 413 past the size limit, else 400."""
    return JSONResponse({**fields, "retry": False, "error": str(e)}, status_code=413 if isinstance(e, TooLarge) else 400)


class Gateway:
    def __init__(self, cfg: WebConfig, on_ready=None):
        self.cfg, self.on_ready = cfg, on_ready
        self.access = Access(cfg.auth_tokens)
        self.prompts = load_prompts(cfg.prompts)
        self.backends: Backends | None = None
        self.signin_page = Template((HERE / "pages" / "signin.html").read_text())

    # ---- people ----
    def _person(self, request: Request) -> Person | None:
        return self.access.person(request.cookies)

    def _signin(self, page: str, message: str, status: int) -> HTMLResponse:
        body = self.signin_page.substitute(next=html.escape(page), message=html.escape(message),
                                           role=html.escape(PAGE_ROLES[page]))
        return HTMLResponse(body, status_code=status, headers=HEADERS)

    def _cookie(self, resp: Response, name: str, value: str) -> None:
        """HttpOnly: the page's scripts never see it; SameSite=Strict: no other site's page sends it."""
        resp.set_cookie(name, value, httponly=True, samesite="strict", secure=bool(self.cfg.tls_cert))

    async def page(self, request: Request) -> Response:
        page = request.url.path.strip("/")
        person = self._person(request)
        if person is None:
            return self._signin(page, "", 401)
        if not self.access.may_use(person, page):
            return self._signin(page, f"This page needs a {PAGE_ROLES[page]} token; yours is for {person.role}.", 403)
        resp = FileResponse(HERE / "pages" / f"{page}.html", headers=HEADERS)
        if not self.access.enabled and PERSON_COOKIE not in request.cookies:
            self._cookie(resp, PERSON_COOKIE, new_anonymous_id())   # the feedback's source id without auth
        return resp

    async def signin_form(self, request: Request) -> Response:
        page = request.query_params.get("next", "chat")
        return self._signin(page if page in PAGE_ROLES else "chat", "", 200)

    async def signin(self, request: Request) -> Response:
        """A form post (the token in the body, never in the URL) -> the cookie, and back to the page."""
        try:
            form = parse_qs((await _body(request, MAX_SIGNIN_BODY)).decode(errors="replace"))
        except TooLarge as e:
            return bad_request(e)
        token, page = form.get("token", [""])[0].strip(), form.get("next", ["chat"])[0]
        page = page if page in PAGE_ROLES else "chat"
        role = self.access.role_of(token)
        if self.access.enabled and role is None:
            return self._signin(page, "That token is not valid.", 401)
        if role is not None and role not in (PAGE_ROLES[page], "admin"):
            return self._signin(page, f"This page needs a {PAGE_ROLES[page]} token; that one is for {role}.", 403)
        resp = RedirectResponse(f"/{page}", status_code=303)
        if self.access.enabled:
            self._cookie(resp, TOKEN_COOKIE, token)
        return resp

    async def signout(self, request: Request) -> Response:
        resp = RedirectResponse("/signin", status_code=303)
        resp.delete_cookie(TOKEN_COOKIE, httponly=True, samesite="strict")
        return resp

    # ---- the API ----
    def _api_person(self, request: Request, page: str) -> Person | JSONResponse:
        person = self._person(request)
        if person is None:
            return JSONResponse({"error": "sign in", "signin": f"/signin?next={page}"}, status_code=401)
        if not self.access.may_use(person, page):
            return JSONResponse({"error": f"needs a {PAGE_ROLES[page]} token"}, status_code=403)
        return person

    @staticmethod
    async def _json(request: Request):
        """The body as JSON; TooLarge past MAX_BODY (read no further), BadInput if it is not JSON."""
        body = await _body(request, MAX_BODY)
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:   # RecursionError: nested deeper than the parser goes
            raise convert.BadInput(f"body: not JSON ({type(e).__name__})") from e

    async def me(self, request: Request) -> Response:
        page = request.query_params.get("page", "chat")
        person = self._api_person(request, page if page in PAGE_ROLES else "chat")
        if isinstance(person, Response):
            return person
        return JSONResponse({"role": person.role, "person": person.id, "auth": self.access.enabled}, headers=HEADERS)

    async def chat_stream(self, request: Request) -> Response:
        person = self._api_person(request, "chat")
        if isinstance(person, Response):
            return person
        try:
            req = convert.chat_request(await self._json(request), self.cfg.max_messages, self.cfg.max_message_chars,
                                       n=2, max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature)
        except (convert.BadInput, TooLarge) as e:
            return bad_request(e)
        return StreamingResponse(self._sse(req, person.token), media_type="text/event-stream",
                                 headers={**HEADERS, "X-Accel-Buffering": "no"})

    async def _sse(self, req, token: str):
        """The two samples' tokens as they come; an "error" event if the policy server fails, "end" last."""
        call = self.backends.stream(req, token)
        try:
            async for chunk in call:
                for name, data in convert.stream_events(chunk):
                    yield _event(name, data)
            yield _event("end", {})
        except grpc.aio.AioRpcError as e:
            yield _event("error", Failure.of(e.code(), e.details() or e.code().name).json())
        finally:
            call.cancel()   # the page went away: the policy server frees the request's KV slots

    async def label_item(self, request: Request) -> Response:
        person = self._api_person(request, "label")
        if isinstance(person, Response):
            return person
        try:
            index = (await self._json(request)).get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                raise convert.BadInput("index: expected an integer")
        except (convert.BadInput, TooLarge, AttributeError) as e:
            return bad_request(e)
        index %= len(self.prompts)
        req = convert.label_request(self.prompts[index], n=self.cfg.label_k, max_new_tokens=self.cfg.max_new_tokens,
                                    temperature=self.cfg.temperature)
        try:
            resp = await self.backends.generate(req, person.token)
        except grpc.aio.AioRpcError as e:
            f = Failure.of(e.code(), e.details() or e.code().name)
            return JSONResponse(f.json(), status_code=f.http)
        return JSONResponse(convert.label_item(index, self.prompts[index], resp), headers=HEADERS)

    async def submit(self, request: Request) -> Response:
        page = request.path_params["page"]
        if page not in PAGE_ROLES:
            return JSONResponse({"error": f"no page {page!r}"}, status_code=404)
        person = self._api_person(request, page)
        if isinstance(person, Response):
            return person
        try:
            batch = convert.feedback_batch(page, person.id, await self._json(request))
        except (convert.BadInput, TooLarge) as e:
            return bad_request(e, saved=False)
        failure = await self.backends.submit(batch, person.token)
        if failure is not None:
            log.info("feedback not saved: %s", failure.code)   # no ids or text: the log stays free of content
            return JSONResponse({"saved": False, **failure.json()}, status_code=failure.http)
        ids = [getattr(f, f.WhichOneof("kind")).event_id for f in batch.items]
        return JSONResponse({"saved": True, "event_ids": ids}, headers=HEADERS)

    # ---- assembly ----
    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        self.backends = Backends(self.cfg)   # grpc.aio channels belong to this event loop
        if self.on_ready:
            self.on_ready()
        try:
            yield
        finally:
            await self.backends.close()

    def app(self) -> Starlette:
        routes = [
            Route("/", lambda r: RedirectResponse("/chat", status_code=303)),
            Route("/chat", self.page), Route("/label", self.page),
            Route("/signin", self.signin_form, methods=["GET"]), Route("/signin", self.signin, methods=["POST"]),
            Route("/signout", self.signout, methods=["POST"]),
            Route("/api/me", self.me),
            Route("/api/chat/stream", self.chat_stream, methods=["POST"]),
            Route("/api/label/item", self.label_item, methods=["POST"]),
            Route("/api/feedback/{page}", self.submit, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return SameSitePosts(Starlette(routes=routes, lifespan=self.lifespan))


class SameSitePosts:
    """ASGI middleware: refuses posts from other sites' pages and API posts that are not JSON
    (access.cross_site_refusal) before any route runs."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = cross_site_refusal(scope["method"], scope["path"], Headers(scope=scope))
            if refusal is not None:
                status, reason = refusal
                await JSONResponse({"error": reason, "retry": False}, status_code=status, headers=HEADERS)(scope, receive, send)
                return
        await self.app(scope, receive, send)
