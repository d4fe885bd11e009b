"""The aiohttp application: routes, request ids, typed JSON errors, the body limit, OpenAPI."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

from aiohttp import web

from .. import handoff
from .. import metrics as relay_metrics
from ..config import Config
from ..errors import ValidationError
from ..feedback.tracking import Tokens, TrackingRoutes, UnsubscribeRoutes, load_key
from ..feedback.webhooks_mailchannels import Signer
from ..store import SQLiteStore
from ..submit import Submitter
from . import accesslog, auth, metrics
from .connections import ConnectionGuard
from .contacts import ContactsApi, UpsertContact
from .dashboard import Dashboard
from .dialects import mailerlogic, piisend, plunk
from .dialects.common import reshaped
from .dialects.mailchannels import PREFIX as MAILCHANNELS_PREFIX
from .dialects.mailchannels import MailChannelsApi
from .dialects.mailchannels import error_body as mailchannels_error
from .dialects.mailchannels_manage import MailChannelsManageApi
from .dialects.mailchannels_metrics import MailChannelsMetricsApi
from .dialects.mailerlogic import MailerLogicApi
from .dialects.piisend import PiiSendApi
from .dialects.plunk import PlunkApi
from .domains import DomainsApi
from .errors import ApiError
from .health import HealthRoutes, Readiness
from .hooks import HooksApi
from .manage import ManageApi
from .native import NativeApi
from .request_ids import REQUEST_ID, request_id
from .requests import Handler
from .schemas import (
    AddSuppression,
    BatchResults,
    Cancelled,
    CreateApiKey,
    CreateWebhook,
    EmailDetail,
    Page,
    Queued,
    Redeliver,
    ReplyEmail,
    SendBatch,
    SendEmail,
    UpdateWebhook,
)
from .stats import StatsApi
from .templates import CreateTemplate, TemplatesApi, UpdateTemplate

log = logging.getLogger(__name__)

class Draining:
    """Set when the process stops serving: answers from then on say `Connection: close`, so
    that a client does not send its next request down a connection about to be closed
    (aiohttp finishes the requests in progress, then closes every connection)."""

    on = False


BODY_LIMIT = web.AppKey("body_limit", int)
DRAINING = web.AppKey("draining", Draining)
CONNECTIONS = web.AppKey("connections", ConnectionGuard)  # serve with its protocol_factory
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection
# seconds a stopping server gives the requests it is answering (aiohttp's default is 60): the
# API's requests are bounded (body limits, read deadlines) and answer in well under a second
SHUTDOWN_TIMEOUT = 15.0


def body_limit(config: Config) -> int:
    """Base64 is 4/3 of what it carries; the limits are stated in decoded octets."""
    limits = config.limits
    largest = max(limits.max_message_size, limits.max_attachments_size)
    return largest * 4 // 3 + 1024 * 1024


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer carries X-Request-Id (the client's, when it sent a sane one), and every
    failure becomes {"error": {"type", "message", "param"?}}: never HTML or a trace."""
    given = request.headers.get("X-Request-Id", "")
    request[REQUEST_ID] = request_id(given)
    response = await _answer(request, handler)
    response.headers["X-Request-Id"] = request[REQUEST_ID]
    if request.app[DRAINING].on:
        response.force_close()
    return response


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except ValidationError as exc:  # bad input found below the handlers: still a 422
        too_large = exc.smtp.startswith("552")  # or a 413, like SMTP's 552
        return ApiError(413 if too_large else 422, str(exc), param=exc.param).response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 413:
            return ApiError(413, "the request body is larger than this server takes "
                            f"({request.app[BODY_LIMIT]} octets)").response()
        message = {404: f"no route {request.method} {request.path}",
                   405: f"{request.method} is not allowed on {request.path}"}.get(
            exc.status, exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return in_dialect(request, ApiError(exc.status, message, headers=headers))
    except ConnectionResetError:
        if not _client_gone(request):
            raise
        # The client closed its connection mid-request (wrk at its end, an impatient app):
        # nobody to answer and nothing wrong here. Raised on, aiohttp would log it as an
        # ERROR with a traceback; answered, its write fails quietly and the access log says
        # 499, as nginx does.
        log.debug("%s %s: the client went away (request %s)", request.method, request.path,
                  request[REQUEST_ID])
        return web.Response(status=CLIENT_GONE)
    except Exception:
        log.exception("%s %s failed (request %s)", request.method, request.path,
                      request[REQUEST_ID])
        return ApiError(500, "an internal error; the request id names it in relay's log",
                        type="internal_error").response()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def in_dialect(request: web.Request, error: ApiError) -> web.StreamResponse:
    """A 404 or 405 in the shape of the dialect whose paths the request is under (its
    clients read their own shape): MailChannels /tx/v1/, MailerLogic /api/v1/send, PiiSend
    the rest of /api/v1/, Plunk /v1/send and /v1/track; relay's own otherwise."""
    path = request.path
    if path.startswith(MAILCHANNELS_PREFIX):
        return reshaped(error, mailchannels_error).response()
    if path == mailerlogic.PATH or path.startswith(mailerlogic.PATH + "/"):
        return reshaped(error, mailerlogic.error_body, mailerlogic.STATUSES).response()
    if path.startswith("/api/v1/"):
        return reshaped(error, piisend.error_body).response()
    if path in plunk.PATHS:
        return plunk.respond(error, request)
    return error.response()


def make_app(config: Config, store: SQLiteStore, submitter: Submitter, *,
             readiness: Readiness | None = None) -> web.Application:
    guard = ConnectionGuard(config.limits)
    # the guard first: it must see a request arrive before anything awaits its body; the
    # access log next, so its line has the final status and the refusals of neither
    app = web.Application(middlewares=[guard.middleware,
                                       accesslog.middleware(config.log.access_log), errors],
                          client_max_size=body_limit(config))
    app[BODY_LIMIT] = body_limit(config)
    app[DRAINING] = Draining()
    app[CONNECTIONS] = guard
    app.add_routes(NativeApi(config, store, submitter).routes())
    app.add_routes(ManageApi(store).routes())
    app.add_routes(DomainsApi(config, store).routes())
    app.add_routes(HooksApi(config, store).routes())
    app.add_routes(TemplatesApi(store).routes())
    app.add_routes(ContactsApi(config, store).routes())
    app.add_routes(PiiSendApi(config, store, submitter).routes())
    app.add_routes(MailerLogicApi(config, store, submitter).routes())
    app.add_routes(PlunkApi(config, store, submitter).routes())
    tokens = Tokens(load_key(config.server.data_dir))
    app.add_routes(UnsubscribeRoutes(store, tokens).routes())
    app.add_routes(TrackingRoutes(store, tokens).routes())
    app.add_routes(MailChannelsApi(config, store, submitter,
                                   Signer.load(config.server.data_dir)).routes())
    app.add_routes(MailChannelsManageApi(store).routes())
    app.add_routes(MailChannelsMetricsApi(store).routes())
    app.add_routes([web.get("/v1/openapi.json", openapi_handler)])
    metrics.add_route(app, config, store)
    app.add_routes(StatsApi(store).routes())
    app.add_routes(Dashboard().routes())
    app.add_routes(HealthRoutes(readiness).routes())
    auth.check_routes(app)
    return app


def per_process(config: Config, processes: int) -> Config:
    """The config one of `processes` API processes serves with: the cap on open connections
    (max_http_connections) shared out among them, so that together they hold no more than it
    says; the cap per client holds in each (a client's connections are spread over them)."""
    if processes <= 1:
        return config
    limits = config.limits
    share = -(-limits.max_http_connections // processes)
    return dataclasses.replace(config, limits=dataclasses.replace(
        limits, max_http_connections=share))


async def serve(app: web.Application, address: str, port: int, *, backlog: int
                ) -> tuple[web.AppRunner, asyncio.base_events.Server]:
    """The app on a server of its own: aiohttp's protocol factory behind the connection
    guard (caps and read deadlines), rather than a TCPSite, which would serve it unguarded.
    Raises OSError."""
    runner, protocols = await _runner(app)
    try:
        server = await asyncio.get_running_loop().create_server(
            protocols, address, port, reuse_address=True, backlog=backlog)
    except BaseException:
        await runner.cleanup()
        raise
    return runner, server


async def serve_shared(app: web.Application, address: str, port: int, *, backlog: int
                       ) -> tuple[web.AppRunner, handoff.Acceptor]:
    """As serve, for a master with workers: it accepts every connection and hands the
    workers their turns (handoff.py). Raises OSError."""
    runner, protocols = await _runner(app)
    try:
        acceptor = handoff.Acceptor(handoff.listening_socket(address, port, backlog),
                                    handoff.Serving(protocols), tag=handoff.API,
                                    counted=relay_metrics.api_connection, what="API")
    except BaseException:
        await runner.cleanup()
        raise
    return runner, acceptor


async def serve_handed(app: web.Application) -> tuple[web.AppRunner, handoff.Serving]:
    """As serve, for a worker: how to serve the connections the master hands it (its
    handoff.Receiver serves them so)."""
    runner, protocols = await _runner(app)
    return runner, handoff.Serving(protocols)


async def _runner(app: web.Application) -> tuple[web.AppRunner, handoff.Protocols]:
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    assert runner.server is not None
    return runner, app[CONNECTIONS].protocol_factory(runner.server)


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(openapi())


def openapi() -> dict[str, Any]:
    """OpenAPI 3.1, generated from the same pydantic models the handlers validate with."""
    defs: dict[str, Any] = {}

    def schema(model: Any) -> dict[str, Any]:
        s = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        defs.update(s.pop("$defs", {}))
        defs[model.__name__] = s
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"description": "a typed error", "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Error"}}}}
    id_param = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]
    errors_ = {str(c): error for c in (400, 401, 403, 404, 409, 413, 415, 422, 500, 503)}

    def op(summary: str, *, body: Any = None, status: str = "200", answer: Any = None,
           params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        shape = schema(answer) if answer is not None else {"type": "object"}
        ok = {"description": "OK", "content": {"application/json": {"schema": shape}}}
        out: dict[str, Any] = {"summary": summary, "responses": {status: ok, **errors_}}
        if body is not None:
            out["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": schema(body)}}}
        if params:
            out["parameters"] = params
        return out

    list_params = [{"name": n, "in": "query", "required": False, "schema": {"type": t}}
                   for n, t in (("status", "string"), ("limit", "integer"),
                                ("cursor", "string"), ("tag", "string"), ("to", "string"),
                                ("from", "string"), ("since", "string"))]
    paths = {
        "/v1/emails": {"post": op("Send an email", body=SendEmail, status="202", answer=Queued),
                       "get": op("List emails, newest first", params=list_params,
                                 answer=Page)},
        "/v1/emails/batch": {"post": op("Send up to 100 emails", body=SendBatch, status="207",
                                        answer=BatchResults)},
        "/v1/emails/{id}": {"get": op("An email: recipients, attempts, events",
                                      params=id_param, answer=EmailDetail)},
        "/v1/emails/{id}/body": {"get": op("An email's text, html and raw bytes",
                                           params=id_param)},
        "/v1/emails/{id}/cancel": {"post": op("Cancel a scheduled email", params=id_param,
                                              answer=Cancelled)},
        "/v1/emails/{id}/reply": {"post": op("Reply in the thread of an email (In-Reply-To, "
                                             "References, Re: subject)", body=ReplyEmail,
                                             status="202", params=id_param, answer=Queued)},
        "/v1/emails/{id}/attachments": {"get": op("An email's attachments: metadata, no bytes "
                                                  "(410 once retention dropped the body)",
                                                  params=id_param)},
        "/v1/domains": {"get": op("The key's sending domains and the DNS records each needs",
                                  answer=Page, params=[
            {"name": n, "in": "query", "required": False, "schema": {"type": t}}
            for n, t in (("status", "string"), ("limit", "integer"), ("cursor", "string"))])},
        "/v1/stats": {"get": op("Relay-wide queue, outcomes, failures and webhook backlog "
                                "(an admin key without domains)")},
        "/v1/api-keys": {"post": op("Create an API key (its secret is shown once)",
                                    body=CreateApiKey, status="201"),
                         "get": op("List API keys", answer=Page)},
        "/v1/api-keys/{id}": {"delete": op("Revoke an API key", params=id_param)},
        "/v1/suppressions": {
            "get": op("The suppression list, by address", answer=Page, params=[
                {"name": n, "in": "query", "required": False, "schema": {"type": t}}
                for n, t in (("email", "string"), ("limit", "integer"), ("cursor", "string"))]),
            "post": op("Suppress an address (all mail, or one domain's broadcast mail)",
                       body=AddSuppression, status="201")},
        "/v1/webhooks": {"post": op("Add a webhook endpoint (its signing secret is shown once)",
                                    body=CreateWebhook, status="201"),
                         "get": op("List webhook endpoints", answer=Page)},
        "/v1/webhooks/{id}": {"get": op("A webhook endpoint", params=id_param),
                              "patch": op("Enable or disable an endpoint", body=UpdateWebhook,
                                          params=id_param),
                              "delete": op("Delete an endpoint", params=id_param)},
        "/v1/webhooks/{id}/rotate-secret": {"post": op("A new signing secret, shown once",
                                                       params=id_param)},
        "/v1/webhooks/{id}/redeliver": {"post": op("Send an event to the endpoint again",
                                                   body=Redeliver, status="202",
                                                   params=id_param)},
        "/v1/suppressions/{email}": {"delete": op("Remove an address's suppressions", params=[
            {"name": "email", "in": "path", "required": True, "schema": {"type": "string"}},
            {"name": "scope", "in": "query", "required": False,
             "schema": {"type": "string"}}])},
        "/v1/templates": {"post": op("Store a template", body=CreateTemplate, status="201"),
                          "get": op("List templates, oldest first", answer=Page)},
        "/v1/templates/{id}": {"get": op("A template", params=id_param),
                               "patch": op("Change a template", body=UpdateTemplate,
                                           params=id_param),
                               "delete": op("Delete a template", params=id_param)},
        "/v1/contacts": {"post": op("Add or change a contact (a null in data deletes the "
                                    "field)", body=UpsertContact),
                         "get": op("List contacts, by address", answer=Page)},
        "/v1/contacts/{id}": {"get": op("A contact, by id or address", params=id_param),
                              "delete": op("Delete a contact", params=id_param)},
    }
    defs["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["type", "message"], "additionalProperties": False,
        "properties": {"type": {"type": "string"}, "message": {"type": "string"},
                       "param": {"type": "string"}}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "relay", "version": "1"},
        "components": {"schemas": defs,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": paths,
    }
