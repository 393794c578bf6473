"""`drp codec serve`: the codec endpoint of the Temporal Web UI and CLI.

With encryption on, Temporal stores ciphertext; a person allowed to read runs points the Web UI
(Settings -> Codec Server, or TEMPORAL_CODEC_ENDPOINT) or the CLI (`temporal workflow show
--codec-endpoint URL --codec-auth "Bearer TOKEN"`) here, and sees inputs and results in clear.

Protocol: POST /decode and POST /encode, body and answer `{"payloads": [<Payload as proto JSON>]}`,
header `X-Namespace`. Every POST needs `Authorization: Bearer <codec_server.bearer_token>` (401
otherwise; the keys never leave this process). A namespace not in `codec_server.namespaces` is 403.
Browsers preflight with OPTIONS (no credentials): answered with the CORS headers for the configured
origins only. A payload that cannot be decrypted (unknown key id, wrong key) is 400 with the reason.
"""

import hmac
import json

import structlog
from aiohttp import hdrs, web
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads

from workers.codec import EncryptionCodec, PayloadDecryptionError
from workers.deploy_settings import CodecServerSettings

log = structlog.get_logger()
ALLOWED_HEADERS = "authorization,content-type,x-namespace"


def build_app(codec: EncryptionCodec, settings: CodecServerSettings, default_namespace: str) -> web.Application:
    namespaces = set(settings.namespaces or [default_namespace])
    if settings.bearer_token is None:
        raise ValueError("codec_server.bearer_token is not set: the codec server never runs unauthenticated")
    token = settings.bearer_token.get_secret_value().encode()

    def cors(request: web.Request, response: web.Response) -> web.Response:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin and origin in settings.cors_origins:
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "POST, OPTIONS"
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOWED_HEADERS
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
            response.headers[hdrs.VARY] = "Origin"
        return response

    def answer(request: web.Request, status: int, body: dict) -> web.Response:
        return cors(request, web.Response(status=status, text=json.dumps(body), content_type="application/json"))

    async def preflight(request: web.Request) -> web.Response:
        return cors(request, web.Response(status=204))

    def refused(request: web.Request) -> web.Response | None:
        auth = request.headers.get(hdrs.AUTHORIZATION, "")
        if not (auth.startswith("Bearer ") and hmac.compare_digest(auth.removeprefix("Bearer ").encode(), token)):
            log.warning("codec request refused: unauthenticated", peer=request.remote, path=request.path)
            return answer(request, 401, {"error": "unauthenticated: send Authorization: Bearer <codec token>"})
        namespace = request.headers.get("X-Namespace")
        if namespace is not None and namespace not in namespaces:
            log.warning("codec request refused: namespace", namespace=namespace, path=request.path)
            return answer(request, 403, {"error": f"namespace {namespace!r} is not served here"})
        return None

    def handler(transform):
        async def handle(request: web.Request) -> web.Response:
            if (refusal := refused(request)) is not None:
                return refusal
            try:
                payloads = json_format.Parse(await request.read(), Payloads(), ignore_unknown_fields=True)
            except (json_format.ParseError, ValueError) as err:
                return answer(request, 400, {"error": f'not a {{"payloads": [...]}} body: {err}'})
            try:
                out = Payloads(payloads=await transform(payloads.payloads))
            except PayloadDecryptionError as err:
                return answer(request, 400, {"error": str(err)})
            log.info(
                "codec request",
                path=request.path,
                payloads=len(out.payloads),
                namespace=request.headers.get("X-Namespace"),
            )
            return cors(request, web.Response(text=json_format.MessageToJson(out), content_type="application/json"))

        return handle

    async def healthy(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/decode", handler(codec.decode))
    app.router.add_post("/encode", handler(codec.encode))
    app.router.add_route("OPTIONS", "/decode", preflight)
    app.router.add_route("OPTIONS", "/encode", preflight)
    app.router.add_get("/-/healthy", healthy)
    return app


async def serve(codec: EncryptionCodec, settings: CodecServerSettings, default_namespace: str) -> web.AppRunner:
    """Start listening; the caller owns the runner (`await runner.cleanup()` to stop)."""
    runner = web.AppRunner(build_app(codec, settings, default_namespace), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.port).start()
    log.info("codec server listening", url=f"http://{settings.host}:{settings.port}")
    return runner
