"""The ``arcsim`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import grpc


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                                 "logger": record.name}
        try:
            parsed = json.loads(message)
            entry.update(parsed if isinstance(parsed, dict) else {"message": message})
        except ValueError:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, *, json_logs: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def _one_thread() -> None:
    """Every arcsim process: one torch thread (parallelism comes from processes) and malloc that
    reuses the per-round buffers (coordinator.inproc.reuse_freed_memory)."""
    import torch

    from coordinator.inproc import reuse_freed_memory

    torch.set_num_threads(1)
    reuse_freed_memory()


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _uvloop_run(coro):
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- TLS (arcsim.certs) -------------------------------------------------------------------------
def _tls_path(value: str | None, env: str) -> str | None:
    """A TLS flag's value, else its environment variable's (containers), else None (plaintext)."""
    return value or os.environ.get(env) or None


def _server_tls(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """The coordinator's ``grpc.ServerCredentials``, or None to serve plaintext (the default).

    --tls-cert and --tls-key: TLS; --tls-client-ca as well: mutual TLS (clients need a certificate
    signed by that CA). Each falls back to its $ARCSIM_TLS_SERVER_CERT / _SERVER_KEY / _CLIENT_CA.
    """
    from arcsim import certs

    cert = _tls_path(args.tls_cert, certs.SERVER_CERT_ENV)
    key = _tls_path(args.tls_key, certs.SERVER_KEY_ENV)
    client_ca = _tls_path(args.tls_client_ca, certs.CLIENT_CA_ENV)
    if (cert is None) != (key is None):
        raise ValueError(f"--tls-cert and --tls-key go together (or ${certs.SERVER_CERT_ENV} and "
                         f"${certs.SERVER_KEY_ENV}): give the coordinator's certificate and its key, or neither")
    if cert is None:
        if client_ca is not None:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: the coordinator serves TLS "
                             "before it can ask for client certificates")
        return None
    return certs.server_credentials(cert, key, client_ca=client_ca)


def _client_tls(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """A client's (worker, adversary, health) ``grpc.ChannelCredentials`` and the name to check the
    coordinator's certificate for; (None, None) for plaintext (the default).

    --tls-ca: TLS, trusting that CA; --tls-cert and --tls-key as well: mutual TLS. Each falls back
    to its $ARCSIM_TLS_CA / _CLIENT_CERT / _CLIENT_KEY / _SERVER_NAME.
    """
    from arcsim import certs

    ca = _tls_path(args.tls_ca, certs.CA_ENV)
    cert = _tls_path(args.tls_cert, certs.CLIENT_CERT_ENV)
    key = _tls_path(args.tls_key, certs.CLIENT_KEY_ENV)
    server_name = _tls_path(args.tls_server_name, certs.SERVER_NAME_ENV)
    if (cert is None) != (key is None):
        raise ValueError(f"--tls-cert and --tls-key go together (or ${certs.CLIENT_CERT_ENV} and "
                         f"${certs.CLIENT_KEY_ENV}): give the client certificate and its key, or neither")
    if ca is None:
        if cert is not None or server_name is not None:
            given = "--tls-cert/--tls-key" if cert is not None else "--tls-server-name"
            raise ValueError(f"{given} needs --tls-ca (or ${certs.CA_ENV}): the CA that signed the coordinator's "
                             "certificate")
        return None, None
    return certs.channel_credentials(ca, cert=cert, key=key), server_name


# --- commands ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from arcsim.config import load_config
    from arcsim.progress import Progress, format_summary
    from arcsim.tasks import load_dataset

    config_path = Path(args.config)
    config = load_config(config_path, _overrides(args.set))
    out_dir = Path(args.out) if args.out else Path("runs") / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and not (out_dir / "checkpoints").is_dir():
        raise ValueError(f"--resume: {out_dir} has no checkpoints to resume from")
    if not args.resume and (out_dir / "summary.json").exists():
        raise ValueError(f"{out_dir} already holds a finished run; choose another --out or pass --resume")
    load_dataset(config.task, root=config.data_root, seed=config.seed)  # fail early, with the fix, if data is missing
    _one_thread()
    if args.engine == "inproc":
        from coordinator.inproc import run_inproc

        display = Progress(config.rounds) if not args.no_progress else None
        metrics = None
        if args.metrics_port is not None:
            from coordinator.metrics import CoordinatorMetrics

            metrics = CoordinatorMetrics()
            metrics.serve(args.metrics_port)

        def on_round(state, record) -> None:
            if metrics is not None:
                metrics.observe_round(record)
            if display is not None:
                display.update(json.loads(record.to_json()))

        try:
            summary = run_inproc(config, out_dir, resume=args.resume, device=args.device, on_round=on_round,
                                 batch_workers=args.batch_workers)
        finally:
            if display is not None:
                display.close()
    else:
        if config_path.suffix not in (".yaml", ".yml") or args.set:
            resolved = out_dir / "config.requested.yaml"
            out_dir.mkdir(parents=True, exist_ok=True)
            resolved.write_text(config.to_yaml())
            config_path = resolved
        from arcsim.launcher import run_grpc

        summary = run_grpc(config_path, config, out_dir, resume=args.resume, metrics_port=args.metrics_port,
                           device=args.device, progress=not args.no_progress)
    print(format_summary(summary, str(out_dir)))
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from arcsim.auth import read_secret
    from arcsim.certs import CLIENT_CA_ENV
    from arcsim.config import load_config
    from coordinator.service import CoordinatorSettings, serve

    from arcsim.launcher import follow_parent

    server_credentials = _server_tls(args)  # bad TLS options fail before anything starts
    follow_parent()
    _setup_logging(args.log_level, json_logs=True)
    if server_credentials is not None:
        mutual = _tls_path(args.tls_client_ca, CLIENT_CA_ENV) is not None
        logging.getLogger("arcsim.coordinator").info(json.dumps({"event": "tls", "mutual": mutual}))
    _one_thread()
    config = load_config(args.config)
    resume = args.resume or (args.resume_if_present and any((Path(args.out) / "checkpoints").glob("*.ckpt")))
    settings = CoordinatorSettings(
        config=config, out_dir=Path(args.out), secret=read_secret(args.secret_file), host=args.host, port=args.port,
        metrics_port=args.metrics_port, metrics_host=args.metrics_host, resume=resume, quorum=args.quorum,
        join_timeout=args.join_timeout, device=args.device, linger=args.linger,
        server_credentials=server_credentials,
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = _uvloop_run(serve(settings))
    logging.getLogger("arcsim.coordinator").info(json.dumps({"event": "summary", **{
        k: summary[k] for k in ("status", "rounds_completed", "final_accuracy", "final_params_sha256")}}))
    return 0 if summary["status"] in ("completed", "stopped") else 1


def _worker_id(text: str) -> int:
    from arcsim.auth import ANY_ID

    if text == "auto":
        return ANY_ID
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a worker id is a non-negative integer or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a worker id is a non-negative integer or 'auto', got {text!r}")
    return value


def _worker_settings(args: argparse.Namespace, role: str) -> list:
    """One WorkerSettings per --worker-id, with its credentials.

    Credentials: --token-file (one token per line, in the order of the ids), else $ARCSIM_TOKEN
    (tokens separated by commas), else derived from $ARCSIM_SECRET on a trusted testbed. TLS: _client_tls.
    """
    from arcsim.auth import SECRET_ENV, TOKEN_ENV, worker_token
    from workers.service import WorkerSettings

    ids = args.worker_id if isinstance(args.worker_id, list) else [args.worker_id]
    if args.token_file:
        tokens = [line.strip() for line in Path(args.token_file).read_text().splitlines() if line.strip()]
    else:
        tokens = [t.strip() for t in os.environ.get(TOKEN_ENV, "").split(",") if t.strip()]
    if not tokens and os.environ.get(SECRET_ENV):
        # A trusted testbed hands every service the run secret; each derives its own credentials.
        tokens = [worker_token(os.environ[SECRET_ENV], role, worker_id) for worker_id in ids]
    if not tokens:
        raise ValueError(f"no credentials: pass --token-file, or set {TOKEN_ENV} (or {SECRET_ENV} on a trusted testbed)")
    if len(tokens) != len(ids):
        raise ValueError(f"{len(ids)} worker id(s) but {len(tokens)} token(s): give one token per id, in order")
    channel_credentials, server_name = _client_tls(args)
    return [WorkerSettings(coordinator=args.coordinator, worker_id=worker_id, token=token, device=args.device,
                           max_retry_seconds=args.max_retry_seconds, channel_credentials=channel_credentials,
                           tls_server_name=server_name) for worker_id, token in zip(ids, tokens)]


def cmd_worker(args: argparse.Namespace) -> int:
    from arcsim.launcher import follow_parent
    from workers.service import run_worker

    settings = _worker_settings(args, "honest")[0]
    follow_parent()
    _setup_logging(args.log_level, json_logs=True)
    _one_thread()
    _uvloop_run(run_worker(settings))
    return 0


def cmd_adversary(args: argparse.Namespace) -> int:
    from adversaries.service import run_adversaries
    from arcsim.launcher import follow_parent

    settings = _worker_settings(args, "byzantine")
    follow_parent()
    _setup_logging(args.log_level, json_logs=True)
    _one_thread()
    _uvloop_run(run_adversaries(settings))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the coordinator at --address (or $ARCSIM_HEALTH_ADDRESS) reports SERVING.

    With no address (a worker's container), the service is healthy while its process runs. A TLS
    coordinator is checked over TLS with the client's options (--tls-ca etc., or $ARCSIM_TLS_CA ...).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from arcsim.certs import SERVER_NAME_OPTION

    address = args.address or os.environ.get("ARCSIM_HEALTH_ADDRESS", "")
    if not address:
        return 0
    credentials, server_name = _client_tls(args)
    options = [(SERVER_NAME_OPTION, server_name)] if server_name else []
    channel = (grpc.secure_channel(address, credentials, options) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="arcsim.v1.Coordinator"), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"unhealthy: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0 if serving else 1


def cmd_certs(args: argparse.Namespace) -> int:
    """Make a testbed CA and the certificates for TLS and mutual TLS (arcsim.certs)."""
    from arcsim.certs import make_certs, server_names

    files = make_certs(args.dir, hosts=args.host, force=args.force)
    print(f"testbed CA and certificates in {Path(args.dir)} (keys mode 0600)\n"
          f"  coordinator: --tls-cert {files.server_cert} --tls-key {files.server_key}"
          f"  [--tls-client-ca {files.ca_cert} for mutual TLS]\n"
          f"  workers:     --tls-ca {files.ca_cert}  [--tls-cert {files.client_cert} --tls-key {files.client_key}]\n"
          f"  the coordinator's certificate is valid for: {', '.join(str(n.value) for n in server_names(args.host))}\n"
          f"  {files.ca_key} is only needed to issue certificates: give it to no service")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from arcsim.tasks.datasets import download_fashion_mnist, user_cache_dir

    dest = Path(args.dest) if args.dest else user_cache_dir() / "fashion-mnist"
    path = download_fashion_mnist(dest)
    print(f"fashion-mnist downloaded and verified in {path}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from arcsim.sweep import is_complete, load_sweep, run_sweep

    plan = load_sweep(args.config)
    out_dir = Path(args.out) if args.out else Path("runs") / plan.name  # fixed: a rerun resumes the same sweep
    print(plan.describe(), flush=True)
    if args.dry_run:
        for run in plan.runs:
            print(f"  {'complete' if is_complete(out_dir / run.name, run.config) else 'to run  '}  {run.name}")
        print(f"results would go to {out_dir}")
        return 0
    outcome = run_sweep(plan, out_dir, jobs=args.jobs, executor=args.executor, ray_address=args.ray_address,
                        device=args.device)
    return 0 if outcome.ok else 1


def cmd_report(args: argparse.Namespace) -> int:
    from arcsim.report import write_report

    result = write_report(args.dir)
    print(f"report of {result.runs} runs: {result.markdown} and {len(result.plots)} plots in "
          f"{result.markdown.parent / 'plots'}" + (f" ({len(result.left_out)} runs not complete, left out)"
                                                    if result.left_out else ""))
    return 0


def _add_client_tls(p: argparse.ArgumentParser) -> None:
    """TLS options of a client of the coordinator (worker, adversary, health); plaintext by default."""
    p.add_argument("--tls-ca", metavar="PEM",
                   help="connect over TLS, trusting this CA, e.g. ca.pem of `arcsim certs` (else $ARCSIM_TLS_CA)")
    p.add_argument("--tls-cert", metavar="PEM",
                   help="mutual TLS: present this client certificate, e.g. client.pem (else $ARCSIM_TLS_CLIENT_CERT)")
    p.add_argument("--tls-key", metavar="PEM", help="its private key (else $ARCSIM_TLS_CLIENT_KEY)")
    p.add_argument("--tls-server-name", metavar="NAME",
                   help="the name the coordinator's certificate must carry, when --coordinator/--address uses "
                        "another (e.g. an IP address the certificate lacks; else $ARCSIM_TLS_SERVER_NAME)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arcsim", description="Byzantine-robust distributed learning testbed (ARC).")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an experiment on this machine")
    run.add_argument("config", help="YAML run config (e.g. configs/default.yaml)")
    run.add_argument("--engine", choices=("grpc", "inproc"), default="grpc",
                     help="grpc: real services over loopback (default); inproc: one process, same results")
    run.add_argument("--out", help="results folder (default runs/<config>-<time>)")
    run.add_argument("--metrics-port", type=int, help="serve the coordinator's /metrics on this port")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where workers compute")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    run.add_argument("--no-progress", action="store_true", help="no live progress line")
    run.add_argument("--batch-workers", action="store_true",
                     help="inproc: honest gradients in one vmapped call (faster on GPU; equal up to rounding)")
    run.set_defaults(func=cmd_run)

    coord = sub.add_parser("coordinator", help="the coordinator service")
    coord.add_argument("--config", required=True)
    coord.add_argument("--out", required=True, help="results and checkpoints folder")
    coord.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    coord.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    coord.add_argument("--metrics-port", type=int, help="serve /metrics on this port")
    coord.add_argument("--metrics-host", default="127.0.0.1")
    coord.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    coord.add_argument("--resume-if-present", action="store_true",
                       help="resume when --out holds checkpoints, else start fresh (for restarting containers)")
    coord.add_argument("--secret-file", help="run secret (else $ARCSIM_SECRET)")
    coord.add_argument("--quorum", type=int, help="vectors that close a round early (default: all workers)")
    coord.add_argument("--join-timeout", type=float, default=120.0)
    coord.add_argument("--linger", type=float, default=0.0,
                       help="keep /metrics up this many seconds after the run ends (for Prometheus' last scrape)")
    coord.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    coord.add_argument("--log-level", default="info")
    coord.add_argument("--tls-cert", metavar="PEM",
                       help="serve TLS with this certificate, e.g. server.pem of `arcsim certs` "
                            "(else $ARCSIM_TLS_SERVER_CERT; default: plaintext)")
    coord.add_argument("--tls-key", metavar="PEM", help="its private key (else $ARCSIM_TLS_SERVER_KEY)")
    coord.add_argument("--tls-client-ca", metavar="PEM",
                       help="mutual TLS: require client certificates signed by this CA, e.g. ca.pem "
                            "(else $ARCSIM_TLS_CLIENT_CA)")
    coord.set_defaults(func=cmd_coordinator)

    for name, func, help_text in (("worker", cmd_worker, "an honest worker service"),
                                  ("adversary", cmd_adversary, "a Byzantine worker service")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--coordinator", required=True, help="host:port of the coordinator")
        if name == "adversary":
            p.add_argument("--worker-id", type=_worker_id, required=True, action="append",
                           help="a Byzantine id, or 'auto'; repeat it to hold several colluding ids in one process")
        else:
            p.add_argument("--worker-id", type=_worker_id, required=True,
                           help="this worker's id, or 'auto' for the first free id of its role")
        p.add_argument("--token-file", help="credentials (else $ARCSIM_TOKEN)")
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--max-retry-seconds", type=float, default=300.0)
        p.add_argument("--log-level", default="info")
        _add_client_tls(p)
        p.set_defaults(func=func)

    sweep = sub.add_parser("sweep", help="run a grid of experiments (any config value may be a list), resumable")
    sweep.add_argument("config", help="YAML sweep config: a run config whose values may be lists (see arcsim.sweep)")
    sweep.add_argument("--jobs", type=int, help="runs in parallel (default: CPU cores; ray: no limit)")
    sweep.add_argument("--out", help="sweep folder (default runs/<sweep name>); rerunning resumes it")
    sweep.add_argument("--executor", choices=("local", "ray"), default="local",
                       help="local: a process pool here (default); ray: tasks on a Ray cluster")
    sweep.add_argument("--ray-address", help="Ray cluster to join (default: start a local Ray instance)")
    sweep.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where each run computes")
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and which are complete; run nothing")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser("report", help="tables (markdown) and plots (PNG) of a run or a sweep")
    report.add_argument("dir", help="a run folder or a sweep folder")
    report.set_defaults(func=cmd_report)

    health = sub.add_parser("health", help="check a coordinator's gRPC health (container health checks)")
    health.add_argument("--address", help="host:port (default $ARCSIM_HEALTH_ADDRESS; none: healthy)")
    health.add_argument("--timeout", type=float, default=3.0)
    _add_client_tls(health)
    health.set_defaults(func=cmd_health)

    certs = sub.add_parser("certs", help="make a testbed CA and certificates for TLS and mutual TLS",
                           description="Write ca.pem, ca.key (the testbed CA), server.pem, server.key (the "
                                       "coordinator's) and client.pem, client.key (one client certificate for "
                                       "every worker, for mutual TLS) into DIR; keys mode 0600.")
    certs.add_argument("dir", help="folder for the PEM files (made if missing)")
    certs.add_argument("--host", action="append", default=[], metavar="NAME",
                       help="a DNS name or IP address workers reach the coordinator by; repeat it. Always "
                            "included: localhost, 127.0.0.1, coordinator (the compose service)")
    certs.add_argument("--force", action="store_true", help="replace the files of an earlier `arcsim certs`")
    certs.set_defaults(func=cmd_certs)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    download = data_sub.add_parser("download", help="download a dataset with checksum verification")
    download.add_argument("name", choices=("fashion-mnist",))
    download.add_argument("--dest")
    download.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("arcsim: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one clear line for the user; the services' logs keep the details
        from arcsim.config import ConfigError
        from arcsim.tasks import DatasetUnavailable

        known = (ConfigError, DatasetUnavailable, ValueError, OSError, RuntimeError)
        if not isinstance(error, known):
            raise
        print(f"arcsim: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (ConfigError, ValueError)) else 1


if __name__ == "__main__":
    sys.exit(main())
