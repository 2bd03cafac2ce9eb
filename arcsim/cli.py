"""The ``arcsim`` command line.

Exit status (the README's "Exit codes"): :data:`EXIT_OK` when the command did its work (a run
completed), :data:`EXIT_FAILURE` for a runtime failure, :data:`EXIT_USAGE` for a usage or config
error, :data:`EXIT_STOPPED` for a run that stopped before completing without arcsim itself being
signalled, and 128 + the signal's number when SIGINT or SIGTERM stopped it (130, 143). Errors are one
line, ``arcsim: error: ...``; the commands import torch only once the cheap checks have passed, so a
simple mistake is reported the same way on a machine without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from arcsim.flags import USAGE_ERROR, Parser
from arcsim.listing import add_parser as add_list_parser
from arcsim.tracking import TRACKERS

if TYPE_CHECKING:  # these import torch or grpc: the commands import them when they need them
    import grpc

    from arcsim.config import RunConfig
    from arcsim.engine.rounds import RoundRecord, RunState
    from arcsim.workers.service import WorkerSettings

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = USAGE_ERROR
EXIT_STOPPED = 3
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class UsageError(ValueError):
    """A mistake in what the user asked for (exit 2), found before anything heavy is imported."""


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
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
    reuses the per-round buffers (arcsim.engine.inproc.reuse_freed_memory)."""
    import torch

    from arcsim.engine.inproc import reuse_freed_memory

    torch.set_num_threads(1)
    reuse_freed_memory()


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            # The parser's one-line problem ("expected ',' or ']'"), not its multi-line context.
            reason = getattr(error, "problem", None) or " ".join(str(error).split())
            raise UsageError(f"--set {pair!r}: the value is not valid YAML ({reason})") from None
    return out


def _uvloop_run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.run(coro)
    return uvloop.run(coro)


# --- TLS (arcsim.transport.certs) -------------------------------------------------------------------------
def _server_tls(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """The coordinator's ``grpc.ServerCredentials``, or None to serve plaintext (the default).

    --tls-cert and --tls-key: TLS; --tls-client-ca as well: mutual TLS (clients need a certificate
    signed by that CA). Each falls back to its $ARCSIM_TLS_SERVER_CERT / _SERVER_KEY / _CLIENT_CA (the parser).
    """
    from arcsim.transport import certs

    cert, key, client_ca = args.tls_cert or None, args.tls_key or None, args.tls_client_ca or None
    if (cert is None) != (key is None):
        raise UsageError(
            f"--tls-cert and --tls-key go together (or ${certs.SERVER_CERT_ENV} and "
            f"${certs.SERVER_KEY_ENV}): give the coordinator's certificate and its key, or neither"
        )
    if cert is None:
        if client_ca is not None:
            raise UsageError(
                "--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key: the coordinator serves TLS "
                "before it can ask for client certificates"
            )
        return None
    return certs.server_credentials(cert, key, client_ca=client_ca)


def _client_tls(args: argparse.Namespace) -> tuple[grpc.ChannelCredentials | None, str | None]:
    """A client's (worker, adversary, health) ``grpc.ChannelCredentials`` and the name to check the
    coordinator's certificate for; (None, None) for plaintext (the default).

    --tls-ca: TLS, trusting that CA; --tls-cert and --tls-key as well: mutual TLS. Each falls back
    to its $ARCSIM_TLS_CA / _CLIENT_CERT / _CLIENT_KEY / _SERVER_NAME (the parser).
    """
    from arcsim.transport import certs

    ca, cert, key = args.tls_ca or None, args.tls_cert or None, args.tls_key or None
    server_name = args.tls_server_name or None
    if (cert is None) != (key is None):
        raise UsageError(
            f"--tls-cert and --tls-key go together (or ${certs.CLIENT_CERT_ENV} and "
            f"${certs.CLIENT_KEY_ENV}): give the client certificate and its key, or neither"
        )
    if ca is None:
        if cert is not None or server_name is not None:
            given = "--tls-cert/--tls-key" if cert is not None else "--tls-server-name"
            raise UsageError(
                f"{given} needs --tls-ca (or ${certs.CA_ENV}): the CA that signed the coordinator's certificate"
            )
        return None, None
    return certs.channel_credentials(ca, cert=cert, key=key), server_name


# --- commands ---------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from arcsim.launcher import stop_on_sigterm
    from arcsim.progress import format_summary

    # The checks that need no torch come first, so that a mistake reads the same everywhere.
    config_path = Path(args.config)
    if not config_path.is_file():
        raise UsageError(f"config file not found: {config_path}")
    overrides = _overrides(args.set)
    if len(set(args.track)) != len(args.track):
        raise UsageError(f"--track: each tracker once, got {' '.join(args.track)}")
    out_dir = Path(args.out) if args.out else Path("runs") / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.resume and not (out_dir / "checkpoints").is_dir():
        raise UsageError(f"--resume: {out_dir} has no checkpoints to resume from")
    if not args.resume and (out_dir / "summary.json").exists():
        raise UsageError(f"{out_dir} already holds a {_run_status(out_dir)} run; choose another --out or pass --resume")

    from arcsim.config import load_config
    from arcsim.tasks import load_dataset

    config = load_config(config_path, overrides)
    if config.schedule != "sync" and args.engine == "batched":
        raise UsageError(
            f"schedule: {config.schedule} runs on the inproc and grpc engines (--engine inproc or grpc), not batched"
        )
    load_dataset(config.task, root=config.data_root, seed=config.seed)  # fail early, with the fix, if data is missing
    _one_thread()
    with stop_on_sigterm():  # SIGTERM stops like Ctrl-C: children stopped, last rounds checkpointed
        if args.engine in ("inproc", "batched"):
            summary = _run_in_process(args, config, out_dir)
        else:
            if config_path.suffix not in (".yaml", ".yml") or args.set:
                resolved = out_dir / "config.requested.yaml"
                out_dir.mkdir(parents=True, exist_ok=True)
                resolved.write_text(config.to_yaml())
                config_path = resolved
            from arcsim.launcher import run_grpc

            summary = run_grpc(
                config_path,
                config,
                out_dir,
                resume=args.resume,
                metrics_port=args.metrics_port,
                device=args.device,
                progress=not args.no_progress,
                track=args.track,
            )
    print(format_summary(summary, str(out_dir)))
    if summary["status"] == "diverged":  # the batched engine stops a run whose vectors turn non-finite
        print(
            f"arcsim: the run diverged after {summary['rounds_completed']} of {summary['config']['rounds']} rounds "
            f"(its vectors or parameters turned non-finite); {out_dir} holds its rounds up to there",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    if summary["status"] != "completed":
        # E.g. the coordinator alone got SIGTERM: it stopped at its last checkpoint and said so.
        print(
            f"arcsim: the run stopped before completing ({summary['status']}, {summary['rounds_completed']} of "
            f"{summary['config']['rounds']} rounds); continue it with --resume --out {out_dir}",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    return EXIT_OK


def _run_status(out_dir: Path) -> str:
    """'finished', or the status of a summary that says the run stopped early (e.g. 'stopped')."""
    try:
        status = json.loads((out_dir / "summary.json").read_text()).get("status", "completed")
    except (OSError, ValueError, AttributeError):
        return "finished"
    return "finished" if status == "completed" else str(status)


def _run_in_process(args: argparse.Namespace, config: RunConfig, out_dir: Path) -> dict[str, Any]:
    """The inproc engine, or the batched engine with a group of one run (on every core)."""
    import os

    from arcsim.engine.batched import run_batched
    from arcsim.engine.honest import resolve_device
    from arcsim.engine.inproc import run_inproc
    from arcsim.progress import Progress
    from arcsim.tracking import RoundTrackers

    display = Progress(config.rounds) if not args.no_progress else None
    metrics = None
    if args.metrics_port is not None:
        from arcsim.coordinator.metrics import CoordinatorMetrics

        metrics = CoordinatorMetrics(config=config)
        metrics.serve(args.metrics_port)

    with RoundTrackers(args.track, config=config, out_dir=out_dir) as sinks:

        def on_round(state: RunState, record: RoundRecord) -> None:
            if metrics is not None:
                metrics.observe_round(record)
            data = json.loads(record.to_json())
            sinks.log_round(data)
            if display is not None:
                display.update(data)

        try:
            if args.engine == "batched":
                import torch

                previous = torch.get_num_threads()  # main() may run inside a caller's process (tests)
                torch.set_num_threads(os.cpu_count() or 1)
                try:
                    device = resolve_device(args.device)
                    (summary,) = run_batched([config], [out_dir], resume=args.resume, device=device, on_round=on_round)
                finally:
                    torch.set_num_threads(previous)
            else:
                summary = run_inproc(
                    config,
                    out_dir,
                    resume=args.resume,
                    device=args.device,
                    on_round=on_round,
                    batch_workers=args.batch_workers,
                )
        finally:
            if display is not None:
                display.close()
        sinks.finish(summary)
        return summary


def cmd_coordinator(args: argparse.Namespace) -> int:
    from arcsim.launcher import follow_parent
    from arcsim.transport.auth import read_secret

    server_credentials = _server_tls(args)  # bad TLS options fail before anything starts
    secret = read_secret(args.secret_file)
    config_path = Path(args.config)
    if not config_path.is_file():
        raise UsageError(f"config file not found: {config_path}")

    from arcsim.config import load_config
    from arcsim.coordinator.service import CoordinatorSettings, serve
    from arcsim.engine import checkpoint

    follow_parent()
    _setup_logging(args.log_level, json_logs=True)
    if server_credentials is not None:
        mutual = bool(args.tls_client_ca)
        logging.getLogger("arcsim.coordinator").info(json.dumps({"event": "tls", "mutual": mutual}))
    _one_thread()
    config = load_config(config_path)
    resume = args.resume or (args.resume_if_present and checkpoint.any_checkpoint(Path(args.out) / "checkpoints"))
    settings = CoordinatorSettings(
        config=config,
        out_dir=Path(args.out),
        secret=secret,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        resume=resume,
        quorum=args.quorum,
        join_timeout=args.join_timeout,
        device=args.device,
        linger=args.linger,
        server_credentials=server_credentials,
    )
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = _uvloop_run(serve(settings))
    logging.getLogger("arcsim.coordinator").info(
        json.dumps(
            {
                "event": "summary",
                **{k: summary[k] for k in ("status", "rounds_completed", "final_accuracy", "final_params_sha256")},
            }
        )
    )
    # A service stopped on request (SIGTERM from its supervisor) has done its job: exit 0, so that a
    # restart policy "on-failure" leaves it stopped. `arcsim run` reads the summary's status instead.
    return EXIT_OK if summary["status"] in ("completed", "stopped") else EXIT_FAILURE


def _worker_id(text: str) -> int:
    from arcsim.transport.auth import ANY_ID

    if text == "auto":
        return ANY_ID
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a worker id is a non-negative integer or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a worker id is a non-negative integer or 'auto', got {text!r}")
    return value


def _worker_settings(args: argparse.Namespace, role: str) -> list[WorkerSettings]:
    """One WorkerSettings per --worker-id, with its credentials.

    Credentials: --token-file (one token per line, in the order of the ids), else $ARCSIM_TOKEN
    (tokens separated by commas), else derived from $ARCSIM_SECRET on a trusted testbed. TLS: _client_tls.
    """
    from arcsim.transport.auth import SECRET_ENV, TOKEN_ENV, worker_token

    ids = args.worker_id if isinstance(args.worker_id, list) else [args.worker_id]
    if args.token_file:
        tokens = [line.strip() for line in Path(args.token_file).read_text().splitlines() if line.strip()]
    else:
        tokens = [t.strip() for t in os.environ.get(TOKEN_ENV, "").split(",") if t.strip()]
    if not tokens and os.environ.get(SECRET_ENV):
        # A trusted testbed hands every service the run secret; each derives its own credentials.
        tokens = [worker_token(os.environ[SECRET_ENV], role, worker_id) for worker_id in ids]
    if not tokens:
        raise UsageError(
            f"no credentials: pass --token-file, or set {TOKEN_ENV} (or {SECRET_ENV} on a trusted testbed)"
        )
    if len(tokens) != len(ids):
        raise UsageError(f"{len(ids)} worker id(s) but {len(tokens)} token(s): give one token per id, in order")
    channel_credentials, server_name = _client_tls(args)

    from arcsim.workers.service import WorkerSettings

    return [
        WorkerSettings(
            coordinator=args.coordinator,
            worker_id=worker_id,
            token=token,
            device=args.device,
            max_retry_seconds=args.max_retry_seconds,
            channel_credentials=channel_credentials,
            tls_server_name=server_name,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
        )
        for worker_id, token in zip(ids, tokens)
    ]


def cmd_worker(args: argparse.Namespace) -> int:
    from arcsim.launcher import follow_parent

    settings = _worker_settings(args, "honest")[0]

    from arcsim.workers.service import run_worker

    follow_parent()
    _setup_logging(args.log_level, json_logs=True)
    _one_thread()
    _uvloop_run(run_worker(settings))
    return EXIT_OK


def cmd_adversary(args: argparse.Namespace) -> int:
    from arcsim.launcher import follow_parent

    settings = _worker_settings(args, "byzantine")

    from arcsim.adversaries.service import run_adversaries

    follow_parent()
    _setup_logging(args.log_level, json_logs=True)
    _one_thread()
    _uvloop_run(run_adversaries(settings))
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the coordinator at --address (or $ARCSIM_HEALTH_ADDRESS) reports SERVING.

    With no address (a worker's container), the service is healthy while its process runs. A TLS
    coordinator is checked over TLS with the client's options (--tls-ca etc., or $ARCSIM_TLS_CA ...).
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from arcsim.transport.certs import SERVER_NAME_OPTION

    address = args.address or ""
    if not address:
        return EXIT_OK
    credentials, server_name = _client_tls(args)
    options = [(SERVER_NAME_OPTION, server_name)] if server_name else []
    channel = (
        grpc.secure_channel(address, credentials, options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="arcsim.v1.Coordinator"), timeout=args.timeout
            )
        except grpc.RpcError as error:
            print(f"unhealthy: {error.code().name}: {error.details()}", file=sys.stderr)
            return EXIT_FAILURE
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print("serving" if serving else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return EXIT_OK if serving else EXIT_FAILURE


def cmd_certs(args: argparse.Namespace) -> int:
    """Make a testbed CA and the certificates for TLS and mutual TLS (arcsim.transport.certs)."""
    from arcsim.transport.certs import make_certs, server_names

    files = make_certs(args.dir, hosts=args.host, force=args.force)
    print(
        f"testbed CA and certificates in {Path(args.dir)} (keys mode 0600)\n"
        f"  coordinator: --tls-cert {files.server_cert} --tls-key {files.server_key}"
        f"  [--tls-client-ca {files.ca_cert} for mutual TLS]\n"
        f"  workers:     --tls-ca {files.ca_cert}  [--tls-cert {files.client_cert} --tls-key {files.client_key}]\n"
        f"  the coordinator's certificate is valid for: {', '.join(str(n.value) for n in server_names(args.host))}\n"
        f"  {files.ca_key} is only needed to issue certificates: give it to no service"
    )
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    from arcsim.tasks.datasets import download_dataset

    path = download_dataset(args.name, args.dest)
    print(f"{args.name} downloaded and verified in {path}")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from arcsim.sweep import is_complete, load_sweep, run_sweep

    if args.max_batch is not None and args.engine != "batched":
        raise UsageError("--max-batch needs --engine batched")
    if args.max_batch is not None and args.max_batch < 1:
        raise UsageError(f"--max-batch must be a positive integer, got {args.max_batch}")
    plan = load_sweep(args.config)
    out_dir = Path(args.out) if args.out else Path("runs") / plan.name  # fixed: a rerun resumes the same sweep
    print(plan.describe(), flush=True)
    if args.dry_run:
        if args.engine == "batched":
            _print_groups(plan, out_dir, args)
        else:
            for run in plan.runs:
                print(f"  {'complete' if is_complete(out_dir / run.name, run.config) else 'to run  '}  {run.name}")
        print(f"results would go to {out_dir}")
        return EXIT_OK
    outcome = run_sweep(
        plan,
        out_dir,
        jobs=args.jobs,
        executor=args.executor,
        ray_address=args.ray_address,
        device=args.device,
        engine=args.engine,
        max_batch=args.max_batch,
    )
    return EXIT_OK if outcome.ok else EXIT_FAILURE


def _print_groups(plan: Any, out_dir: Path, args: argparse.Namespace) -> None:
    """The batched engine's groups of the runs still to run, then the runs already complete."""
    import os

    from arcsim.engine.batched import GROUP_KEYS
    from arcsim.sweep import is_complete, plan_tasks

    todo = [run for run in plan.runs if not is_complete(out_dir / run.name, run.config)]
    slots = args.jobs or ((os.cpu_count() or 1) if args.executor == "local" else 1)
    threads = 1 if args.executor == "ray" else None
    tasks = plan_tasks(
        todo, engine="batched", jobs=slots, device=args.device, max_batch=args.max_batch, threads=threads
    )
    print(f"{len(todo)} runs to run in {len(tasks)} batched groups (runs of a group share {', '.join(GROUP_KEYS)}):")
    for number, task in enumerate(tasks, 1):
        shared = ", ".join(f"{key}={getattr(task.runs[0].config, key)}" for key in GROUP_KEYS)
        print(f"  group {number}: {len(task.runs)} runs, {task.threads} thread(s); {shared}")
        for run in task.runs:
            print(f"    {run.name}")
    done = len(plan.runs) - len(todo)
    if done:
        print(f"{done} runs already complete")


def cmd_replay(args: argparse.Namespace) -> int:
    from arcsim.progress import format_summary
    from arcsim.schedule import ARRIVALS_FILE, read_arrivals

    run_dir, out_dir = Path(args.run_dir), Path(args.out)
    for name in ("config.yaml", ARRIVALS_FILE):
        if not (run_dir / name).is_file():
            raise UsageError(f"{run_dir} has no {name}: replay takes the folder of an async run of the grpc engine")
    if out_dir.resolve() == run_dir.resolve():
        raise UsageError("--out must be another folder than the run's")
    if (out_dir / "summary.json").exists():
        raise UsageError(f"{out_dir} already holds a {_run_status(out_dir)} run; choose another --out")
    overrides = _overrides(args.set)

    from arcsim.config import load_config
    from arcsim.engine.replay import ReplayError, replay_arrivals, schedule_changes

    original = load_config(run_dir / "config.yaml")
    config = load_config(run_dir / "config.yaml", overrides)
    changed = schedule_changes(original, config)
    if changed:
        raise UsageError(f"--set cannot change what the log fixes (the schedule): {', '.join(changed)}")
    try:
        events = read_arrivals(run_dir / ARRIVALS_FILE)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _one_thread()
    try:
        summary = replay_arrivals(config, events, out_dir, device=args.device)
    except ReplayError as error:
        raise UsageError(f"cannot replay {run_dir}: {error}") from None
    print(format_summary(summary, str(out_dir)))
    try:
        source = json.loads((run_dir / "summary.json").read_text())["final_params_sha256"]
    except (OSError, ValueError, KeyError):
        source = None
    if source is None:
        print(f"{run_dir} has no summary (the run did not end): nothing to compare with")
    elif summary["final_params_sha256"] == source:
        print(f"same final parameters as the grpc run ({source[:16]}...)")
    elif overrides:
        print(f"other final parameters than the grpc run (as expected under --set): {source[:16]}...")
    else:
        print(
            f"arcsim: the replay ends on other parameters than the grpc run ({source[:16]}...); see arcsim/engine/"
            "replay.py for what a replay needs (same device and torch thread count, arcsim's own adversary)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def cmd_archive(args: argparse.Namespace) -> int:
    from arcsim.archive import archive_runs, extract_runs

    if args.extract:
        result = extract_runs(args.source, args.target)
        print(
            f"extracted {len(result.runs)} runs into {result.path}"
            + (f" ({len(result.skipped)} folders already there, left as they are)" if result.skipped else "")
        )
    else:
        result = archive_runs(args.source, args.target, all_rounds=args.all_rounds)
        print(
            f"archived {len(result.runs)} runs in {result.path} ({result.path.stat().st_size:,} bytes)"
            + (f"; {len(result.skipped)} run folders not complete, left out" if result.skipped else "")
        )
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from arcsim.report import write_report

    result = write_report(args.dir, select=args.select)
    print(
        f"report of {result.runs} runs: {result.markdown} (tables.csv, points.csv beside it) and "
        f"{len(result.plots)} plots in {result.markdown.parent / 'plots'}"
        + (f" ({len(result.left_out)} runs not complete, left out)" if result.left_out else "")
        + (f" ({len(result.diverged)} diverged runs at chance after they diverged)" if result.diverged else "")
        + (f"; selected on validation: {result.selected} (candidates.csv beside it)" if result.selected else "")
    )
    return EXIT_OK


# --- the parser ---------------------------------------------------------------------------------
def version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as distribution_version

    try:
        return distribution_version("arcsim")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from arcsim import __version__

        return __version__


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_service_common(p: Parser, *, device: tuple[str, ...], default_device: str) -> None:
    p.add_argument("--device", choices=device, default=default_device, help="where this service computes")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info", help="log threshold")


def _add_client_tls(p: Parser) -> None:
    """TLS options of a client of the coordinator (worker, adversary, health); plaintext by default."""
    from arcsim.transport import certs

    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        env=certs.CA_ENV,
        help="connect over TLS, trusting this CA, e.g. ca.pem of `arcsim certs`",
    )
    p.add_argument(
        "--tls-cert",
        metavar="PEM",
        env=certs.CLIENT_CERT_ENV,
        help="mutual TLS: present this client certificate, e.g. client.pem",
    )
    p.add_argument("--tls-key", metavar="PEM", env=certs.CLIENT_KEY_ENV, help="its private key")
    p.add_argument(
        "--tls-server-name",
        metavar="NAME",
        env=certs.SERVER_NAME_ENV,
        help="the name the coordinator's certificate must carry, when --coordinator/--address uses "
        "another (e.g. an IP address the certificate lacks)",
    )


def _add_run(sub: Any) -> None:
    run = sub.add_parser(
        "run",
        help="run an experiment on this machine",
        description="Run an experiment to its end: the coordinator, the honest workers and the adversaries as "
        "processes talking gRPC over loopback (--engine grpc), or the same rounds in one process "
        "(--engine inproc, bit-for-bit the same final parameters). Results go in --out: summary.json, "
        "rounds.jsonl, checkpoints/ (and logs/ for grpc).",
        epilog=_examples(
            "arcsim run configs/default.yaml",
            "arcsim run configs/small.yaml --engine inproc --set attack=sign_flip",
            "arcsim run configs/default.yaml --out runs/a --resume   # continue after a crash",
        )
        + "\n\nexit status: 0 completed, 1 runtime failure, 2 usage or config error, 3 stopped before "
        "completing,\n130/143 stopped by SIGINT/SIGTERM (resume with --resume)",
    )
    run.add_argument("config", help="YAML run config (e.g. configs/default.yaml)")
    run.add_argument(
        "--engine",
        choices=("grpc", "inproc", "batched"),
        default="grpc",
        help="grpc: real services over loopback; inproc: one process, same results; batched: the sweeps' "
        "batched engine on this one run (same data and draws, equal within rounding)",
    )
    run.add_argument("--out", help="results folder (default: runs/<config>-<time>)")
    run.add_argument("--metrics-port", type=int, help="serve the coordinator's /metrics on this port (default: none)")
    run.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    run.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where workers compute")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable; the value is YAML)",
    )
    run.add_argument("--no-progress", action="store_true", help="no live progress line")
    run.add_argument(
        "--batch-workers",
        action="store_true",
        help="inproc: honest gradients in one vmapped call (faster on GPU; equal up to rounding)",
    )
    run.add_argument(
        "--track",
        action="append",
        default=[],
        choices=TRACKERS,
        help="also log every round to a tracker (repeatable): tensorboard (OUT/tensorboard), mlflow "
        "($MLFLOW_TRACKING_URI, else a file store in OUT/mlruns); extras arcsim[tensorboard], "
        "arcsim[mlflow]",
    )
    run.set_defaults(func=cmd_run)


def _add_coordinator(sub: Any) -> None:
    from arcsim.transport import certs

    coord = sub.add_parser(
        "coordinator",
        help="the coordinator service",
        env_fallback=True,
        description="The coordinator: serves the gRPC Coordinator service, runs the rounds (aggregation, "
        "evaluation, checkpoints) and writes the results into --out. Every flag can be given as an "
        "environment variable instead (shown with each); the run secret comes from --secret-file or "
        "ARCSIM_SECRET. SIGTERM stops it at its last checkpoint (exit 0); --resume continues.",
        epilog=_examples(
            "ARCSIM_SECRET=... arcsim coordinator --config configs/default.yaml --out runs/x "
            "--host 0.0.0.0 --metrics-port 9464",
            "ARCSIM_CONFIG=configs/default.yaml ARCSIM_OUT=/runs/x ARCSIM_RESUME_IF_PRESENT=true arcsim coordinator",
        ),
    )
    coord.add_argument("--config", required=True, help="YAML run config")
    coord.add_argument("--out", required=True, help="results and checkpoints folder")
    coord.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    coord.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    coord.add_argument("--metrics-port", type=int, help="serve /metrics on this port (default: no /metrics)")
    coord.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics listens on")
    coord.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    coord.add_argument(
        "--resume-if-present",
        action="store_true",
        help="resume when --out holds checkpoints, else start fresh (for restarting containers)",
    )
    coord.add_argument("--secret-file", help="run secret (else ARCSIM_SECRET)")
    coord.add_argument("--quorum", type=int, help="vectors that close a round early (default: all workers)")
    coord.add_argument("--join-timeout", type=float, default=120.0, help="seconds to wait for every worker to join")
    coord.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="keep /metrics up this many seconds after the run ends (for Prometheus' last scrape)",
    )
    _add_service_common(coord, device=("cpu", "cuda"), default_device="cpu")
    coord.add_argument(
        "--tls-cert",
        metavar="PEM",
        env=certs.SERVER_CERT_ENV,
        help="serve TLS with this certificate, e.g. server.pem of `arcsim certs` (default: plaintext)",
    )
    coord.add_argument("--tls-key", metavar="PEM", env=certs.SERVER_KEY_ENV, help="its private key")
    coord.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        env=certs.CLIENT_CA_ENV,
        help="mutual TLS: require client certificates signed by this CA, e.g. ca.pem",
    )
    coord.set_defaults(func=cmd_coordinator)


def _add_workers(sub: Any) -> None:
    for name, func, help_text in (
        ("worker", cmd_worker, "an honest worker service"),
        ("adversary", cmd_adversary, "a Byzantine worker service"),
    ):
        if name == "worker":
            description = (
                "An honest worker: joins the coordinator, trains on its shard and sends its momentum "
                "vector every round; reconnects by itself after faults."
            )
            examples = _examples(
                "ARCSIM_TOKEN=... arcsim worker --coordinator HOST:50051 --worker-id 0",
                "ARCSIM_SECRET=... ARCSIM_COORDINATOR=coordinator:50051 ARCSIM_WORKER_ID=auto arcsim worker",
            )
        else:
            description = (
                "Byzantine workers: one process holds every --worker-id given (they collude, observing "
                "and crafting once per round) and runs the config's attack."
            )
            examples = _examples(
                "ARCSIM_TOKEN=t10,t11 arcsim adversary --coordinator HOST:50051 --worker-id 10 --worker-id 11",
                "ARCSIM_SECRET=... ARCSIM_COORDINATOR=coordinator:50051 ARCSIM_WORKER_ID=10,11 arcsim adversary",
            )
        p = sub.add_parser(
            name,
            help=help_text,
            env_fallback=True,
            epilog=examples,
            description=description + " Every flag can be given as an environment variable "
            "instead (shown with each); credentials come from "
            "--token-file, ARCSIM_TOKEN or ARCSIM_SECRET.",
        )
        p.add_argument("--coordinator", required=True, help="host:port of the coordinator")
        if name == "adversary":
            p.add_argument(
                "--worker-id",
                type=_worker_id,
                required=True,
                action="append",
                help="a Byzantine id, or 'auto'; repeat it to hold several colluding ids in one process "
                "(the variable: a comma-separated list)",
            )
        else:
            p.add_argument(
                "--worker-id",
                type=_worker_id,
                required=True,
                help="this worker's id, or 'auto' for the first free id of its role",
            )
        p.add_argument("--token-file", help="credentials, one token per id (else ARCSIM_TOKEN)")
        p.add_argument(
            "--max-retry-seconds",
            type=float,
            default=300.0,
            help="give up after this many seconds without reaching the coordinator",
        )
        p.add_argument("--metrics-port", type=int, help="serve this worker's /metrics on this port (default: none)")
        p.add_argument("--metrics-host", default="127.0.0.1", help="address /metrics listens on")
        _add_service_common(p, device=("auto", "cpu", "cuda"), default_device="auto")
        _add_client_tls(p)
        p.set_defaults(func=func)


def _add_sweep_and_report(sub: Any) -> None:
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of experiments (any config value may be a list), resumable",
        description="Run every combination of a sweep config's lists (see arcsim/sweep.py for bundles, exclusions "
        "and the f = 0 baseline), each run in its own folder under --out; rerunning resumes it. Exits 1 "
        "when a run failed.",
        epilog=_examples(
            "arcsim sweep configs/paper/fashion-extreme.yaml --jobs 2",
            "arcsim sweep configs/paper/fashion-extreme.yaml --dry-run",
            "arcsim sweep configs/paper/fashion-extreme.yaml --engine batched --dry-run   # the groups",
        ),
    )
    sweep.add_argument("config", help="YAML sweep config: a run config whose values may be lists (see arcsim.sweep)")
    sweep.add_argument("--jobs", type=int, help="runs in parallel (default: CPU cores; ray: no limit)")
    sweep.add_argument("--out", help="sweep folder (default: runs/<sweep name>); rerunning resumes it")
    sweep.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: a process pool here; ray: tasks on a Ray cluster",
    )
    sweep.add_argument("--ray-address", help="Ray cluster to join (default: start a local Ray instance)")
    sweep.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where each run computes")
    sweep.add_argument(
        "--engine",
        choices=("inproc", "batched"),
        default="inproc",
        help="inproc: a process per run; batched: groups of compatible runs in lockstep, one process per group",
    )
    sweep.add_argument(
        "--max-batch",
        type=int,
        metavar="R",
        help="batched: at most R runs per group (default: what half the free memory holds; docs/benchmarks.md)",
    )
    sweep.add_argument("--dry-run", action="store_true", help="list the runs and which are complete; run nothing")
    sweep.set_defaults(func=cmd_sweep)

    report = sub.add_parser(
        "report",
        help="tables (markdown) and plots (PNG) of a run or a sweep",
        description="Write DIR/report.md (per pipeline and attack, the maximum over evaluations of the "
        "seed-averaged accuracy, and the worst case over attacks), the same tables as DIR/tables.csv, "
        "the long-format table of every run's rounds as DIR/points.csv, and PNG plots in DIR/plots.",
        epilog=_examples(
            "arcsim report runs/paper-fashion-extreme", "arcsim report runs/paper-protocol --select validation"
        ),
    )
    report.add_argument("dir", help="a run folder or a sweep folder")
    report.add_argument(
        "--select",
        choices=("validation",),
        help="validation: per dataset, heterogeneity, f and pipeline, keep the hyperparameter point whose worst "
        "attack is best on the validation split and report its test accuracy (in report.md, selected.csv, "
        "candidates.csv, heatmaps); the runs need validation_fraction > 0",
    )
    report.set_defaults(func=cmd_report)

    replay = sub.add_parser(
        "replay",
        help="re-run an asynchronous grpc run in process, following its arrivals.jsonl",
        description="Follow the arrival log of an asynchronous run of the grpc engine (which worker's vector, "
        "computed at which step on which version, landed in which window) and compute the same run again in "
        "this process: without --set it ends on the run's final_params_sha256 (exit status 1 if not); with "
        "--set the same schedule (stragglers, windows, stale refusals) runs under another defence or attack. "
        "See arcsim/engine/replay.py.",
        epilog=_examples(
            "arcsim replay runs/async-grpc --out runs/async-grpc-replay",
            "arcsim replay runs/async-grpc --out runs/async-grpc-noarc --set pipeline='nnm > cwtm'",
        ),
    )
    replay.add_argument("run_dir", help="the folder of an asynchronous grpc run (config.yaml, arrivals.jsonl)")
    replay.add_argument("--out", required=True, help="the replay's results folder")
    replay.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key that does not fix the schedule (repeatable; the value is YAML)",
    )
    replay.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where to compute")
    replay.set_defaults(func=cmd_replay)

    archive = sub.add_parser(
        "archive",
        help="pack a sweep's complete runs into one small file to commit, or extract them again",
        description="Write one gzipped JSON line per complete run of a run or sweep folder (config, summary, and "
        "the records of the rounds that evaluated and of the last round: what arcsim report needs), or with "
        "--extract write those runs back as run folders, which arcsim report reads and arcsim sweep takes as "
        "complete (a sweep goes on elsewhere from what was committed). See arcsim/archive.py.",
        epilog=_examples(
            "arcsim archive runs/paper-protocol-cpu docs/results/paper-protocol-cpu.jsonl.gz",
            "arcsim archive --extract docs/results/paper-protocol-cpu.jsonl.gz runs/paper-protocol-cpu",
        ),
    )
    archive.add_argument("source", help="a run or sweep folder (with --extract: the archive)")
    archive.add_argument("target", help="the archive to write (with --extract: the folder to write the runs into)")
    archive.add_argument("--extract", action="store_true", help="write an archive's runs back as run folders")
    archive.add_argument(
        "--all-rounds", action="store_true", help="keep every round's record, not only the evaluated ones and the last"
    )
    archive.set_defaults(func=cmd_archive)


def _add_health_certs_data(sub: Any) -> None:
    health = sub.add_parser(
        "health",
        help="check a coordinator's gRPC health (container health checks)",
        env_fallback=True,
        description="Exit 0 when the coordinator at --address reports SERVING, 1 otherwise; with no address "
        "(a worker's container) exit 0. Every flag can be given as an environment variable instead.",
        epilog=_examples(
            "arcsim health --address 127.0.0.1:50051",
            "ARCSIM_HEALTH_ADDRESS=127.0.0.1:50051 ARCSIM_TLS_CA=/certs/ca.pem arcsim health",
        ),
    )
    health.add_argument("--address", env="ARCSIM_HEALTH_ADDRESS", help="host:port (none: healthy)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    _add_client_tls(health)
    health.set_defaults(func=cmd_health)

    certs = sub.add_parser(
        "certs",
        help="make a testbed CA and certificates for TLS and mutual TLS",
        description="Write ca.pem, ca.key (the testbed CA), server.pem, server.key (the coordinator's) and "
        "client.pem, client.key (one client certificate for every worker, for mutual TLS) into DIR; "
        "keys mode 0600.",
        epilog=_examples("arcsim certs certs/ --host coordinator.example.org --host 10.0.0.5"),
    )
    certs.add_argument("dir", help="folder for the PEM files (made if missing)")
    certs.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name or IP address workers reach the coordinator by; repeat it. Always "
        "included: localhost, 127.0.0.1, coordinator (the compose service)",
    )
    certs.add_argument("--force", action="store_true", help="replace the files of an earlier `arcsim certs`")
    certs.set_defaults(func=cmd_certs)

    data = sub.add_parser(
        "data",
        help="datasets",
        description="Fetch the datasets arcsim cannot find offline.",
        epilog=_examples("arcsim data download fashion-mnist"),
    )
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="{download}")
    download = data_sub.add_parser(
        "download",
        help="download a dataset with checksum verification",
        description="Download a dataset into --dest and verify its checksums.",
        epilog=_examples(
            "arcsim data download fashion-mnist",
            "arcsim data download mnist --dest /data/mnist",
            "arcsim data download cifar-10",
        ),
    )
    download.add_argument(
        "name",
        choices=("fashion-mnist", "mnist", "cifar-10"),
        help="the dataset: fashion-mnist and mnist as their four IDX .gz files, cifar-10 as the six batches of its "
        "binary archive (cifar-10-binary.tar.gz, never the pickled version), each checked against its SHA-256",
    )
    download.add_argument(
        "--dest", help="folder (default: the user cache, e.g. ~/.cache/arcsim/NAME, searched by the loaders)"
    )
    download.set_defaults(func=cmd_data)


def build_parser() -> Parser:
    parser = Parser(
        prog="arcsim",
        description="Byzantine-robust distributed learning testbed (ARC).",
        epilog=_examples("arcsim run configs/default.yaml", "arcsim run --help"),
    )
    parser.add_argument("--version", action="version", version=f"arcsim {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_coordinator(sub)
    _add_workers(sub)
    _add_sweep_and_report(sub)
    _add_health_certs_data(sub)
    add_list_parser(sub)
    return parser


def service_env_variables() -> frozenset[str]:
    """The ARCSIM_* variables the service commands read as flags (the launcher keeps them from its children)."""
    return build_parser().env_variables()


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (see the module's docstring)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) and usage errors (2), as a status like any other
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt as error:
        # Ctrl-C, or SIGTERM (arcsim.launcher.stop_on_sigterm): the children are stopped and the last
        # rounds checkpointed by now; exit as the shell reports a process ended by that signal.
        signum = getattr(error, "signum", signal.SIGINT)
        print(f"arcsim: interrupted by {signal.Signals(signum).name}; continue with --resume", file=sys.stderr)
        return 128 + signum
    except ImportError as error:
        # Reported without importing anything more (no chained tracebacks on a machine missing a package).
        print(
            f"arcsim: error: {error}: this command needs it (install arcsim's dependencies, e.g. make venv)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except (ValueError, OSError, RuntimeError) as error:
        # One clear line for the user; the services' logs keep the details. ValueError covers
        # arcsim.config.ConfigError; RuntimeError covers arcsim.tasks.DatasetUnavailable and LaunchError.
        print(f"arcsim: error: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ValueError) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
