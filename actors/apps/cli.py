"""The ``bide`` command line: ``dev``, ``worker``, ``run``, ``runs show|list|export|cancel``, ``replay``, ``serve``,
``event push|send``, ``events list``, ``status``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import re
import select
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from actors.apps.health import create_health_app
from actors.apps.http_api import serve_app, serve_http, url_of
from actors.apps.processes import Supervisor, die_with_supervisor, parse_count
from actors.engine.run_history import export_run
from actors.hosting import event_loop
from actors.store.runs_index import STATUSES
from actors.store.server import DEFAULT_SYNC, SYNC_ENV, EmbeddedServer, SyncSetting, cluster_url, local_cluster
from sdk import Bide, BideError, NonDeterminismError, Worker
from sdk.limits import MAX_DEPTH
from sdk.tasks import TaskDefinition


class CliError(Exception):
    """A user error: printed without a traceback, exit status 2."""


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{what} is not valid JSON: {e.msg} at position {e.pos} in {text[:200]!r}") from None
    except RecursionError:
        raise CliError(f"{what} is nested too deeply (Bide's limit is {MAX_DEPTH} levels of nesting)") from None


def load_worker(target: str, *, slots: int | None, durable_slots: int | None, name: str | None) -> Worker:
    """``module`` or ``module:attr`` naming a Worker, a Bide client, a task, or a list of tasks."""
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    mod_name, _, attr = target.partition(":")
    if mod_name.endswith(".py"):
        mod_name = mod_name[:-3].replace("/", ".")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise CliError(f"cannot import {mod_name!r} ({e}); run from the folder that contains it") from None
    if attr:
        if not hasattr(module, attr):
            raise CliError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(module, attr)
    else:
        found: list[Worker | Bide] = [v for v in vars(module).values() if isinstance(v, Worker)]
        found = found or [v for v in vars(module).values() if isinstance(v, Bide)]
        if not found:
            raise CliError(f"module {mod_name!r} defines no Worker or Bide client; name one as {mod_name}:ATTR")
        obj = found[0]
    if isinstance(obj, Worker):
        if name:
            obj.name = name
        if slots:
            obj.slots = slots
        if durable_slots:
            obj.durable_slots = durable_slots
        return obj
    if isinstance(obj, Bide):
        return obj.worker(name or f"{mod_name}-worker", slots=slots or 100, durable_slots=durable_slots or 1000)
    tasks = obj if isinstance(obj, list | tuple) else [obj]
    if not tasks or not all(isinstance(t, TaskDefinition) for t in tasks):
        raise CliError(f"{target!r} is not a Worker, a Bide client or a task definition")
    client = next(iter(v for v in vars(module).values() if isinstance(v, Bide)), None) or Bide()
    return client.worker(name or f"{mod_name}-worker", workflows=tasks, slots=slots or 100,
                         durable_slots=durable_slots or 1000)


async def _serve_workers(workers: list[Worker], stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
    readies = [asyncio.Event() for _ in workers]
    tasks = [asyncio.create_task(w.async_start(ready=r)) for w, r in zip(workers, readies, strict=True)]

    async def _all_ready() -> None:
        await asyncio.gather(*(r.wait() for r in readies))
        if ready is not None:
            ready.set()

    watcher = asyncio.create_task(_all_ready())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t is not stopper and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    for w in workers:
        await w.shutdown()
    await asyncio.gather(*tasks, return_exceptions=True)
    watcher.cancel()


def _worker_command(target: str, *, name: str | None = None, slots: int | None = None,
                    durable_slots: int | None = None) -> list[str]:
    """The command line of a ``bide worker`` child (NATS settings reach it in the environment it inherits)."""
    verbose = ["-v"] if logging.getLogger().isEnabledFor(logging.INFO) else []
    return [sys.executable, "-m", "actors.apps.cli", *verbose, "worker", target,
            *(["--name", name] if name else []), *(["--slots", str(slots)] if slots else []),
            *(["--durable-slots", str(durable_slots)] if durable_slots else [])]


def _is_worker_ready(line: str) -> bool:
    return line.startswith("bide worker ") and " ready: " in line


def _slot_count(value: str) -> int:
    """``--slots`` and ``--durable-slots``: a whole number of at least 1."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {value!r}")
    return n


def _process_count(value: str, flag: str) -> int:
    try:
        return parse_count(value, flag)
    except ValueError as e:
        raise CliError(str(e)) from None


def _install_stop(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


DEFAULT_HTTP_PORT = 8080


async def _start_http(client: Bide, host: str, port: int, token: str | None) -> asyncio.Task[None]:
    """``serve_http`` in a task, returned once it listens. ``OSError`` if it cannot listen."""
    ready = asyncio.Event()
    serving = asyncio.create_task(serve_http(client, host, port, token, ready))
    listening = asyncio.create_task(ready.wait())
    try:
        await asyncio.wait([serving, listening], return_when=asyncio.FIRST_COMPLETED)
    finally:
        listening.cancel()
    if not ready.is_set():
        await serving  # raises why it stopped
        raise RuntimeError(f"the HTTP server on {host}:{port} stopped before it listened")
    return serving


async def _stop_http(serving: asyncio.Task[None] | None) -> None:
    """Shut the HTTP server down; re-raise what it died of, if it died on its own."""
    if serving is None:
        return
    if serving.done():
        if not serving.cancelled() and serving.exception() is not None:
            raise serving.exception()  # type: ignore[misc]
        return
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


def _api_token(args: argparse.Namespace, client: Bide) -> str | None:
    """``bide serve``'s token: ``--token-file`` or ``BIDE_API_TOKEN``; none only with ``--no-auth``."""
    if args.token is not None:
        raise CliError("--token is not taken: a command line is visible to every user of the machine (ps); put the "
                       "token in BIDE_API_TOKEN or in a file given with --token-file")
    token = client.config.api_token
    if args.token_file is not None:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise CliError(f"--token-file {args.token_file!r}: {e.strerror or e}") from None
        if not token:
            raise CliError(f"--token-file {args.token_file!r} is empty")
    if token is None and not args.no_auth:
        raise CliError("bide serve needs a token (BIDE_API_TOKEN or --token-file FILE); to serve with none, "
                       "say so with --no-auth")
    if token is not None and args.no_auth:
        raise CliError("--no-auth and a token (BIDE_API_TOKEN or --token-file) contradict each other")
    return token


async def cmd_dev(args: argparse.Namespace) -> int:
    if args.http_port is not None and not 0 <= args.http_port < 65536:
        raise CliError(f"--http-port must be between 0 (no HTTP API) and 65535, got {args.http_port}")
    store = Path(args.store).resolve()
    try:
        sync = SyncSetting.parse(args.sync) if args.sync is not None else SyncSetting.from_env()
    except ValueError as e:
        raise CliError(f"--sync: {e}") from None
    if args.cluster not in (1, 3, 5):
        raise CliError(f"--cluster must be 1, 3 or 5 nodes (the replicas JetStream allows), got {args.cluster}")
    workers_each = _process_count(args.workers, "--workers")
    if args.cluster > 1:
        # One recipe for a local cluster (the cluster tests use it too); streams at as many replicas.
        store = store.with_name(f"{store.name}-cluster{args.cluster}")
        nodes = local_cluster(args.cluster, store, name="bide-dev", first_port=args.port, sync=sync)
        os.environ["BIDE_REPLICAS"] = str(args.cluster)
    else:
        nodes = [EmbeddedServer(port=args.port, store_dir=store, log_file=store.parent / "nats-server.log",
                                sync=sync)]
    # SIGTERM from here on stops dev gracefully, servers included (they run in their own sessions).
    stop = asyncio.Event()
    _install_stop(stop)
    extra = Supervisor([], label="bide dev")
    stopping: asyncio.Task[None] | None = None
    try:
        for node in nodes:
            try:
                node.start()
            except RuntimeError as e:
                raise CliError(f"could not start the embedded nats-server on port {node.port}: {e}") from None
            print(f"bide dev: JetStream at {node.url} (store {node.store_dir}, log {node.log_file})",
                  file=sys.stderr, flush=True)
        url = cluster_url(nodes)
        os.environ["BIDE_NATS_URL"] = url
        if args.cluster > 1:
            print(f"bide dev: a {args.cluster}-node cluster, streams at {args.cluster} replicas: "
                  f"BIDE_NATS_URL={url} BIDE_REPLICAS={args.cluster}", file=sys.stderr, flush=True)
        print(f"bide dev: sync {sync}: a power loss loses {sync.loses_on_power_loss}", file=sys.stderr, flush=True)
        workers = [load_worker(t, slots=None, durable_slots=None, name=None) for t in args.modules]
        # More workers, each its own process (this one hosts the first), kept running by a supervisor.
        extra = Supervisor([_worker_command(t) for t in args.modules for _ in range(workers_each - 1)],
                           is_ready=_is_worker_ready, label="bide dev")
        extra.start()
        stopping = extra.stop_on(stop)  # they drain while this process drains its own hosts
        client = Bide(url)
        http: asyncio.Task[None] | None = None
        try:
            http_port = DEFAULT_HTTP_PORT if args.http_port is None else args.http_port
            if http_port:
                try:
                    http = await _start_http(client, "127.0.0.1", http_port, client.config.api_token)
                except OSError as e:
                    if args.http_port is not None:  # asked for explicitly: a failure is an error
                        raise CliError(f"{e.strerror or e}; pick another --http-port, or 0 for none") from None
                    print(f"bide dev: warning: no HTTP API: {e.strerror or e} (pick another port with "
                          "--http-port, or 0 for none)", file=sys.stderr, flush=True)
                else:
                    http.add_done_callback(lambda _: stop.set())  # the server died: stop dev, report why
                    how = ("token from BIDE_API_TOKEN" if client.config.api_token else
                           "no token: loopback only, JSON POSTs only; set BIDE_API_TOKEN for one")
                    print(f"bide dev: HTTP API at {url_of('127.0.0.1', http_port)} ({how})", file=sys.stderr,
                          flush=True)
            ready = asyncio.Event()
            serving = asyncio.create_task(_serve_workers(workers, stop, ready))
            for up in (ready, extra.ready):  # this process's hosts, then every child's
                await asyncio.wait([asyncio.create_task(up.wait()), serving], return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                await serving
                return 0
            if workers:
                print(f"bide dev: worker(s) up for {', '.join(args.modules)}", file=sys.stderr, flush=True)
            if args.run:
                try:
                    result = await client.aio_run_by_name(args.run, _parse_json(args.input, "--input"))
                    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
                finally:
                    stop.set()
            await serving
            return 0
        finally:
            try:
                await _stop_http(http)
            finally:
                await client.aclose()
    finally:
        if stopping is not None:
            stopping.cancel()
        await extra.stop()  # SIGTERM: each drains its turns; SIGKILL after 30 s
        for node in nodes:
            node.stop()


async def cmd_worker(args: argparse.Namespace) -> int:
    die_with_supervisor()  # a child of `--processes N`: ends when its supervisor does
    processes = _process_count(args.processes, "--processes")
    worker = load_worker(args.target, slots=args.slots, durable_slots=args.durable_slots, name=args.name)
    # This process hosts the first; N-1 children the rest. Named NAME-2, NAME-3...: the host id
    # (name@hostname:pid) is unique per process anyway, the names tell them apart in `bide status`.
    children = Supervisor([_worker_command(args.target, name=f"{args.name}-{i}" if args.name else None,
                                           slots=args.slots, durable_slots=args.durable_slots)
                           for i in range(2, processes + 1)], is_ready=_is_worker_ready, label="bide worker")
    stop = asyncio.Event()
    _install_stop(stop)
    ready = asyncio.Event()
    health: asyncio.Task[None] | None = None
    if args.health_port is not None:
        if not 0 < args.health_port < 65536:
            raise CliError(f"--health-port must be between 1 and 65535, got {args.health_port}")
        listening = asyncio.Event()
        health = asyncio.create_task(serve_app(create_health_app([worker]), args.health_host, args.health_port,
                                               listening))
        await asyncio.wait([asyncio.create_task(listening.wait()), health], return_when=asyncio.FIRST_COMPLETED)
        if health.done():
            e = health.exception()
            raise CliError(f"--health-port: {getattr(e, 'strerror', None) or e}")
    stopping = children.stop_on(stop)  # the children drain while this process drains its own host
    try:
        serving = asyncio.create_task(_serve_workers([worker], stop, ready))
        await asyncio.wait([asyncio.create_task(ready.wait()), serving], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            children.start()  # once this host serves: a wrong target or URL fails here first, with no children
            await asyncio.wait([asyncio.create_task(children.ready.wait()), serving],
                               return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set() and children.ready.is_set():
            more = f" ({processes} processes)" if processes > 1 else ""
            print(f"bide worker {worker.name!r} ready: {', '.join(t.name for t in worker.tasks)}{more}", flush=True)
        await serving
    finally:
        stopping.cancel()
        await children.stop()
        if health is not None:
            health.cancel()
            await asyncio.gather(health, return_exceptions=True)
    return 0


def _timeout_seconds(text: str) -> float:
    """``--timeout``: a finite number of seconds, at least 0, refused before anything starts."""
    from sdk.runs import check_timeout

    try:
        value = float(text)
        check_timeout(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a number of seconds, at least 0") from e
    return value


async def cmd_run(args: argparse.Namespace) -> int:
    client = Bide()
    try:
        ref = await client.aio_run_no_wait_by_name(args.task, _parse_json(args.input, "--input"))
        if args.no_wait:
            print(ref.workflow_run_id)
            return 0
        trace = ""
        if client.tracing.enabled:  # where to find it in the trace backend
            trace = f"  trace {(await client.runs.aio_get(ref.workflow_run_id)).trace_id}"
        print(f"run {ref.workflow_run_id}{trace}", file=sys.stderr, flush=True)
        result = await ref.aio_result(timeout=args.timeout)
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        return 0
    finally:
        await client.aclose()


async def cmd_runs_show(args: argparse.Namespace) -> int:
    client = Bide()
    try:
        if args.json:
            from actors.apps.http_views import run_detail

            # The document GET /api/v1/runs/{id}?detail=full answers.
            _print_json((await run_detail(client, args.run_id)).model_dump(mode="json"))
            return 0
        info = await client.runs.aio_get(args.run_id)
        hist = await client.runs.aio_history(args.run_id)
        print(f"run {info.run_id}  task {info.task}  status {info.status.value}  trace {info.trace_id}")
        for i, (entry, ts) in enumerate(zip(hist.entries, hist.times, strict=False), 1):
            data = entry.model_dump(mode="json", exclude={"k"}, exclude_none=True)
            detail = " ".join(f"{k}={orjson.dumps(v).decode()}" for k, v in data.items() if k not in ("run_id",))
            print(f"  {i:>3}  {ts[:23]:<23}  {entry.k:<16} {detail}")
        return 0
    finally:
        await client.aclose()


async def cmd_runs_export(args: argparse.Namespace) -> int:
    client = Bide()
    try:
        doc = export_run(await client.runs.aio_history(args.run_id))
    finally:
        await client.aclose()
    text = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote the history of run {args.run_id} ({len(doc['entries'])} entries) to {args.output}",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


async def cmd_replay(args: argparse.Namespace) -> int:
    from sdk.testing import aio_replay

    tasks = load_worker(args.target, slots=None, durable_slots=None, name=None).tasks
    failed = 0
    for file in args.files:
        try:
            await aio_replay(Path(file), tasks)
        except NonDeterminismError as e:
            failed += 1
            print(f"{file}: NOT compatible: {e}")
            continue
        print(f"{file}: compatible")
    return 1 if failed else 0


def _meta_pairs(pairs: list[str] | None, flag: str = "--meta") -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"{flag} {pair!r} is not KEY=VALUE")
        out[key] = value
    return out


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, the last left free; control characters shown escaped.

    Keys, scopes and metadata can come from a raw ``nats pub``: a newline would add a row that
    is not there, and an escape sequence would reach the operator's terminal.
    """
    shown = [tuple(_UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in shown) for i in range(len(shown[0]) - 1)]
    for row in shown:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


async def cmd_runs_list(args: argparse.Namespace) -> int:
    client = Bide()
    try:
        page = await client.runs.aio_list(status=args.status, task=args.task, since=args.since, until=args.until,
                                          metadata=_meta_pairs(args.meta), limit=args.limit, cursor=args.cursor)
        if args.json:
            _print_json({"runs": [r.as_dict() for r in page.runs], "cursor": page.cursor})
            return 0
        rows = [("RUN ID", "TASK", "STATUS", "STARTED", "ENDED", "METADATA")] + [(
            r.run_id, r.task, r.status.value, r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
            r.ended_at.strftime("%Y-%m-%d %H:%M:%S") if r.ended_at else "-",
            " ".join(f"{k}={v}" for k, v in sorted(r.additional_metadata.items())) or "-") for r in page.runs]
        _print_table(rows)
        if page.cursor is not None:
            print(f"more: --cursor {page.cursor}", file=sys.stderr)
        return 0
    finally:
        await client.aclose()


async def cmd_events_list(args: argparse.Namespace) -> int:
    from actors.apps.http_views import event_list

    client = Bide()
    try:
        events = (await event_list(client, args.key, args.since, args.limit)).events
    finally:
        await client.aclose()
    if args.json:
        _print_json({"events": [e.model_dump(mode="json") for e in events]})  # as GET /api/v1/events
        return 0
    rows = [("SEQ", "STORED", "KEY", "SCOPE", "EVENT ID", "SIZE", "METADATA", "RUNS")] + [(
        str(e.seq), e.at[:19].replace("T", " "), e.key, e.scope or "-", e.event_id, str(e.size),
        orjson.dumps(e.metadata).decode() if e.metadata else "-",
        " ".join(f"{o.how}:{o.run_id}" for o in e.outcomes) or "-") for e in events]
    _print_table(rows)
    return 0


async def cmd_runs_cancel(args: argparse.Namespace) -> int:
    client = Bide()
    try:
        if await client.runs.aio_cancel(args.run_id, reason=args.reason):
            print(f"cancelled {args.run_id}")
        else:
            print(f"run {args.run_id} had already finished")
        return 0
    finally:
        await client.aclose()


async def cmd_serve(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be between 1 and 65535, got {args.port}")
    client = Bide()
    try:
        token = _api_token(args, client)
        await client._pool.get()  # connect now: a wrong BIDE_NATS_URL fails here, not on the first request
        stop = asyncio.Event()
        _install_stop(stop)
        try:
            http = await _start_http(client, args.host, args.port, token)
        except OSError as e:
            raise CliError(f"{e.strerror or e}; pick another --port") from None
        if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"bide serve: warning: --no-auth: anyone who can reach {args.host}:{args.port} can push events "
                  "and cancel runs", file=sys.stderr, flush=True)
        print(f"serving HTTP API on {url_of(args.host, args.port)}", flush=True)
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([http, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            await _stop_http(http)
        return 0
    finally:
        await client.aclose()


def _print_json(data: Any) -> None:
    print(orjson.dumps(data).decode(), flush=True)


async def cmd_event_push(args: argparse.Namespace) -> int:
    payload = _parse_json(args.data, "--data")
    client = Bide()
    try:
        ref = await client.event.aio_push(args.key, payload, scope=args.scope, event_id=args.event_id,
                                          metadata=_meta_pairs(args.meta) or None)
        _print_json({"event_id": ref.event_id, "key": ref.key, "scope": ref.scope, "seq": ref.seq})
        return 0
    finally:
        await client.aclose()


async def cmd_event_send(args: argparse.Namespace) -> int:
    payload = _parse_json(args.data, "--data")
    client = Bide()
    try:
        receipt = await client.event.aio_send(args.run_id, args.name, payload, event_id=args.event_id)
        _print_json(receipt.as_dict())
        return 0
    finally:
        await client.aclose()


async def cmd_status(args: argparse.Namespace) -> int:
    from actors.hosting.router_partitions import deployment_status

    client = Bide()
    try:
        conn = await client._pool.get()
        st = await deployment_status(conn.nc, conn.layout)
        if args.json:
            _print_json(st)
            return 0
        srv = st["server"]
        print(f"server {srv['name']} {srv['version']}" + (f" cluster {srv['cluster']}" if srv["cluster"] else ""))
        for x in st["streams"]:
            followers = " ".join(f"{f['name']}{'' if f['current'] else '(behind)'}" for f in x.get("followers", []))
            print(f"  stream {x['name']:<16} R{x.get('replicas')} leader {x.get('leader') or '-'}"
                  f"{' followers ' + followers if followers else ''}  {x.get('messages')} msgs")
        for h in st["hosts"]:
            print(f"  host {h['host']}: {', '.join(h.get('tasks') or []) or '-'}  turns {h.get('turns', '-')}"
                  f"  durable slots {(h.get('durable_slots') or {}).get('used', '-')}/"
                  f"{(h.get('durable_slots') or {}).get('of', '-')}  warm runs {h.get('warm_runs', '-')}"
                  f"  router partitions {h.get('owns') or []}")
        for r in st["router"]:
            owner = r["owner"] or ("(pinned, owner not yet known)" if r["pinned"]
                                   else "(none: a host is pinned when events arrive)")
            waits = "-" if r["pending_waits"] is None else r["pending_waits"]
            print(f"  router partition {r['partition']}: owner {owner}  pending waits {waits}"
                  f"  checkpoint {r['checkpoint']}  unhandled {r['unhandled']}")
        return 0
    finally:
        await client.aclose()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bide", description="Durable async Python tasks on NATS JetStream.")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    nats_opts = p.add_argument_group(
        "NATS credentials and TLS", "each sets the BIDE_NATS_* variable of the same name for this command and the "
        "workers it starts; a password or token is read from BIDE_NATS_PASSWORD / BIDE_NATS_TOKEN only (the "
        "command line is visible to every user of the machine)")
    for flag, env, what in _NATS_FLAGS:
        nats_opts.add_argument(flag, dest=env, metavar="FILE" if "user" not in flag else "NAME", help=f"{what} ({env})")
    sub = p.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="start a local JetStream server and workers for MODULEs")
    dev.add_argument("modules", nargs="*", help="module or module:attr holding a Worker, a Bide client or tasks")
    dev.add_argument("--port", type=int, default=4222,
                     help="client port (default 4222); with --cluster, node i listens on port + i")
    dev.add_argument("--cluster", type=int, default=1, metavar="N",
                     help="run N nodes (3 or 5) clustered on loopback, streams at N replicas (default 1)")
    dev.add_argument("--workers", default="1", metavar="N",
                     help="worker processes per module (default 1: this process; 'auto': one per CPU); more are "
                          "`bide worker` children, restarted if they exit")
    dev.add_argument("--store", default=".bide/jetstream", help="JetStream store folder (default .bide/jetstream)")
    dev.add_argument("--run", metavar="TASK", help="run TASK once the workers are up, print its result, exit")
    dev.add_argument("--input", default="{}", help="JSON input for --run (default {})")
    dev.add_argument("--sync", default=None, metavar="always|interval[=DURATION]",
                     help="when the server fsyncs to disk: 'always' (every write; a power loss loses nothing "
                          "acknowledged) or 'interval' (every 2m, or e.g. interval=1s; a power loss loses up to "
                          f"that much). Default: {SYNC_ENV}, else {DEFAULT_SYNC}")
    dev.add_argument("--http-port", type=int, default=None,
                     help=f"serve the HTTP API on 127.0.0.1:PORT (default {DEFAULT_HTTP_PORT}; 0 for none)")
    dev.set_defaults(func=cmd_dev)

    wk = sub.add_parser("worker", help="run an actor host for module[:attr]")
    wk.add_argument("target")
    wk.add_argument("--name")
    wk.add_argument("--slots", type=_slot_count, help="regular tasks run at once (at least 1; default 100)")
    wk.add_argument("--durable-slots", type=_slot_count, help="durable turns run at once (at least 1; default 1000)")
    wk.add_argument("--processes", default="1", metavar="N",
                    help="host processes (default 1; 'auto': one per CPU this process may run on): this one and "
                         "N-1 `bide worker` children, restarted if they exit, stopped with it")
    wk.add_argument("--health-port", type=int, default=None, metavar="P",
                    help="serve /healthz (alive) and /readyz (connected, streams set up, consumers bound) on P; with "
                         "--processes, of this process's host only")
    wk.add_argument("--health-host", default="0.0.0.0",
                    help="address for --health-port (default 0.0.0.0, for probes from outside the machine)")
    wk.set_defaults(func=cmd_worker)

    run = sub.add_parser("run", help="start a run of TASK and print its result")
    run.add_argument("task")
    run.add_argument("--input", default="{}", help="JSON input (default {})")
    run.add_argument("--no-wait", action="store_true", help="print the run id and return")
    run.add_argument("--timeout", type=_timeout_seconds, default=None, help="seconds to wait for the result")
    run.set_defaults(func=cmd_run)

    runs = sub.add_parser("runs", help="list, inspect or cancel runs")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    show = runs_sub.add_parser("show", help="print a run's state and history")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true",
                      help="print the whole run as JSON (as GET /api/v1/runs/RUN_ID?detail=full)")
    show.set_defaults(func=cmd_runs_show)
    export = runs_sub.add_parser("export", help="write a run's history (and untaken inbox) as JSON, for `bide replay`")
    export.add_argument("run_id")
    export.add_argument("--output", "-o", help="file to write (default: standard output)")
    export.set_defaults(func=cmd_runs_export)
    ls = runs_sub.add_parser("list", help="list runs, newest first, from the runs index")
    ls.add_argument("--status", choices=list(STATUSES))
    ls.add_argument("--task", help="runs of this task only")
    ls.add_argument("--since", help="started at or after: a time (ISO 8601) or a duration ago (1h, 30m)")
    ls.add_argument("--until", help="started at or before: a time (ISO 8601) or a duration ago")
    ls.add_argument("--meta", action="append", metavar="KEY=VALUE",
                    help="runs whose additional_metadata has KEY=VALUE (repeatable: all must match)")
    ls.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50, at most 1000)")
    ls.add_argument("--cursor", help="continue a listing (printed after a page that has more)")
    ls.add_argument("--json", action="store_true", help="print JSON: {runs, cursor}")
    ls.set_defaults(func=cmd_runs_list)
    cancel = runs_sub.add_parser("cancel", help="cancel a run, its children and its pending waits")
    cancel.add_argument("run_id")
    cancel.add_argument("--reason", default="cancelled by request",
                        help="why, recorded in the run's history (default 'cancelled by request')")
    cancel.set_defaults(func=cmd_runs_cancel)

    rp = sub.add_parser("replay", help="check exported runs against the code in module[:attr]; exit 1 on a mismatch")
    rp.add_argument("target", help="module or module:attr naming a Worker, a Bide client, a task or a list of tasks")
    rp.add_argument("files", nargs="+", metavar="FILE", help="files written by `bide runs export`")
    rp.set_defaults(func=cmd_replay)

    serve = sub.add_parser("serve", help="serve the HTTP API (push events, webhooks, delivery to a run)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help=f"port (default {DEFAULT_HTTP_PORT})")
    serve.add_argument("--token-file", default=None, metavar="FILE",
                       help="file holding the bearer token every /api/ request must carry (default: BIDE_API_TOKEN)")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve with no token (POSTs must then be JSON, and on loopback the Host a loopback name)")
    serve.add_argument("--token", default=None, help=argparse.SUPPRESS)  # refused: argv is visible in ps
    serve.set_defaults(func=cmd_serve)

    status = sub.add_parser("status", help="servers, streams (leader, replicas), router partitions (owner, waits)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    event = sub.add_parser("event", help="push an event, or send one to a run")
    event_sub = event.add_subparsers(dest="event_command", required=True)
    push = event_sub.add_parser("push", help="push event KEY; print its id, key, scope and sequence as JSON")
    push.add_argument("key")
    push.add_argument("--data", default="null", help="JSON payload (default null)")
    push.add_argument("--scope", help="narrows the event to waits with the same scope")
    push.add_argument("--id", dest="event_id", help="event id: pushing the same id again is a no-op")
    push.add_argument("--meta", action="append", metavar="KEY=VALUE",
                      help="event metadata (repeatable); runs the event starts inherit it")
    push.set_defaults(func=cmd_event_push)
    send = event_sub.add_parser("send", help="deliver event NAME to run RUN_ID (Zart's offer_event)")
    send.add_argument("run_id")
    send.add_argument("name")
    send.add_argument("--data", default="null", help="JSON payload (default null)")
    send.add_argument("--id", dest="event_id", help="event id (default: a new one)")
    send.set_defaults(func=cmd_event_send)
    events = sub.add_parser("events", help="list recent events and the runs each resumed or started")
    events_sub = events.add_subparsers(dest="events_command", required=True)
    els = events_sub.add_parser("list", help="recent events, newest first")
    els.add_argument("--key", help="events of this key only (any scope)")
    els.add_argument("--since", help="stored at or after: a time (ISO 8601) or a duration ago (10m, 1h)")
    els.add_argument("--limit", type=int, default=50, help="at most this many events (default 50, at most 1000)")
    els.add_argument("--json", action="store_true", help="print JSON: {events}, as GET /api/v1/events")
    els.set_defaults(func=cmd_events_list)
    return p


_NATS_FLAGS = (
    ("--nats-creds", "BIDE_NATS_CREDS", "a .creds file (JWT and NKey seed)"),
    ("--nats-nkey", "BIDE_NATS_NKEY", "a file holding an NKey seed"),
    ("--nats-user", "BIDE_NATS_USER", "user name; the password comes from BIDE_NATS_PASSWORD"),
    ("--nats-tls-ca", "BIDE_NATS_TLS_CA", "CA bundle that signed the server's certificate"),
    ("--nats-tls-cert", "BIDE_NATS_TLS_CERT", "client certificate, for mutual TLS"),
    ("--nats-tls-key", "BIDE_NATS_TLS_KEY", "the client certificate's key"),
)


def _stdout_closed() -> bool:
    """Whether standard output's reader has gone; if so, point it at /dev/null so exit's flush is quiet."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, ValueError, OSError):  # no poll() here, or no real file behind stdout
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for _, env, _ in _NATS_FLAGS:
        if getattr(args, env, None):
            os.environ[env] = getattr(args, env)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = event_loop.run(args.func(args))
        return code
    except BrokenPipeError as e:
        if not _stdout_closed():
            print(f"bide: error: {e}", file=sys.stderr)
            return 2
        return 141  # `bide runs show RUN | head -1`: the reader has what it wanted; a shell's SIGPIPE status
    except (CliError, BideError, ValueError, ConnectionError, TimeoutError, FileNotFoundError) as e:
        print(f"bide: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
