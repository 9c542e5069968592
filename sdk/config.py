"""Client configuration, read from arguments first and ``BIDE_*`` environment variables second."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from urllib.parse import urlsplit, urlunsplit

from sdk.limits import DEFAULT_MAX_PAYLOAD, PayloadLimits, parse_size

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_HISTORY_RETENTION_S = 30 * 24 * 3600.0

MAX_ROUTER_PARTITIONS = 64
_MAX_RETENTION_S = 100 * 365 * 86400.0
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", re.IGNORECASE)
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: str, name: str = "duration") -> float:
    """Seconds in ``value``: a number of seconds, or a number followed by ``s``, ``m``, ``h`` or ``d``.

    ``30d``, ``2h``, ``90m``, ``5s``, ``1.5h`` and ``3600`` are accepted; anything else, and
    zero, raise a ``ValueError`` naming ``name``, the value and the accepted forms.
    """
    m = _DURATION.fullmatch(value)
    seconds = float(m.group(1)) * _UNIT_S[m.group(2).lower()] if m is not None else 0.0
    if seconds <= 0:
        raise ValueError(
            f"{name}={value!r} is not a positive duration: use a number of seconds or a number followed by "
            "s, m, h or d (for example 5s, 90m, 2h, 30d)"
        )
    return seconds
DEFAULT_ACK_WAIT_S = 3.0
"""A dead host's activations move to a live host after at most this long (live hosts heartbeat)."""
DEFAULT_MAX_DELIVERIES = 20
DEFAULT_GC_THRESHOLD = 50_000
"""Allocations between the cyclic collector's passes over young objects in a host's process."""
_MAX_GC_THRESHOLD = 100_000_000


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a whole number") from None


def _env_duration(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return parse_duration(raw, name)


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list) with any password or token in it replaced by ``***``."""
    out = []
    for one in url.split(","):
        try:
            parts = urlsplit(one.strip())
            netloc = parts.netloc
        except ValueError:
            out.append("***")
            continue
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, sep, _ = userinfo.partition(":")
            # ``nats://TOKEN@host`` carries a token where a user would be: hide it too.
            netloc = f"{user}:***@{host}" if sep else f"***@{host}"
        out.append(urlunsplit(parts._replace(netloc=netloc)))
    return ",".join(out)


@dataclass(frozen=True)
class NatsAuth:
    """How every Bide process proves itself to NATS, and checks the server: credentials and TLS.

    Read from ``BIDE_NATS_CREDS`` (a ``.creds`` file: JWT and NKey seed), ``BIDE_NATS_NKEY``
    (a file holding an NKey seed), ``BIDE_NATS_USER`` / ``BIDE_NATS_PASSWORD``,
    ``BIDE_NATS_TOKEN``, ``BIDE_NATS_TLS_CA`` (CA bundle to verify the server) and
    ``BIDE_NATS_TLS_CERT`` / ``BIDE_NATS_TLS_KEY`` (a client certificate, for mutual TLS).
    Passwords and tokens never appear in a repr, a log line or an error.
    """

    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls) -> NatsAuth:
        def env(name: str) -> str | None:
            return os.environ.get(name) or None

        auth = cls(creds=env("BIDE_NATS_CREDS"), nkey=env("BIDE_NATS_NKEY"), user=env("BIDE_NATS_USER"),
                   password=env("BIDE_NATS_PASSWORD"), token=env("BIDE_NATS_TOKEN"), tls_ca=env("BIDE_NATS_TLS_CA"),
                   tls_cert=env("BIDE_NATS_TLS_CERT"), tls_key=env("BIDE_NATS_TLS_KEY"))
        auth.validate()
        return auth

    def validate(self) -> None:
        ways = [name for name, value in (("BIDE_NATS_CREDS", self.creds), ("BIDE_NATS_NKEY", self.nkey),
                                         ("BIDE_NATS_USER", self.user), ("BIDE_NATS_TOKEN", self.token)) if value]
        if len(ways) > 1:
            raise ValueError(f"{' and '.join(ways)} are both set: give NATS one way to authenticate")
        if self.password and not self.user:
            raise ValueError("BIDE_NATS_PASSWORD is set without BIDE_NATS_USER")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("BIDE_NATS_TLS_CERT and BIDE_NATS_TLS_KEY go together (a client certificate and its key)")
        for name, path in (("BIDE_NATS_CREDS", self.creds), ("BIDE_NATS_NKEY", self.nkey),
                           ("BIDE_NATS_TLS_CA", self.tls_ca), ("BIDE_NATS_TLS_CERT", self.tls_cert),
                           ("BIDE_NATS_TLS_KEY", self.tls_key)):
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}={path!r}: no such file")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)


@dataclass(frozen=True)
class BideConfig:
    """Where to find JetStream and how Bide names and sizes its streams."""

    nats_url: str = DEFAULT_NATS_URL
    prefix: str = "bide"
    replicas: int = 1
    ack_wait_s: float = DEFAULT_ACK_WAIT_S
    connect_timeout_s: float = 2.0
    events_max_age_s: float = 24 * 3600.0
    """How long pushed events are kept for lookback (``BIDE_EVENTS_MAX_AGE``: seconds, or ``24h``, ``90m``, ...)."""
    api_token: str | None = None
    """Bearer token the HTTP API requires when set (``BIDE_API_TOKEN``)."""
    history_retention_s: float = DEFAULT_HISTORY_RETENTION_S
    """How long a finished run is kept before it is removed (``BIDE_HISTORY_RETENTION``, e.g. ``30d``).

    A live run never expires (DESIGN.md invariant 9): retention starts when the run ends.
    """
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD
    """Largest payload (event, run input, result) accepted, as JSON bytes (``BIDE_MAX_PAYLOAD``, e.g. ``256KiB``)."""
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    """An activation delivered more often than this fails its run (``BIDE_MAX_DELIVERIES``)."""
    max_history_bytes: int = 256 * 1024 * 1024
    """Largest history (with its untaken inbox) a run may have; past it the run fails with
    ``HistoryTooLargeError`` (``BIDE_MAX_HISTORY``, a size such as ``256MiB``)."""
    sweep_after_s: float = 10.0
    """A signal no turn took after this long gets the activation its sender did not publish
    (``BIDE_SWEEP_AFTER``, seconds)."""
    stream_check_s: float = 30.0
    """How often each host checks that the streams' guarded settings were not changed by hand,
    and puts them back if they were (``BIDE_STREAM_CHECK_INTERVAL``, seconds; see
    :mod:`actors.hosting.stream_guard`)."""
    wakeup_check_s: float = 60.0
    """How often one host looks for parked runs whose timer the server lost, and how overdue a
    wake-up must be to count as lost (``BIDE_WAKEUP_CHECK_INTERVAL``, seconds; see
    :mod:`actors.hosting.wakeup_check`)."""
    router_partitions: int = 4
    """Event router partitions (``BIDE_ROUTER_PARTITIONS``): fixed for the life of a store."""
    warm_runs: int = 500
    """Parked runs a host keeps in memory, their code suspended where it waits, so their next
    turn on this host goes on without replaying the history (``BIDE_WARM_RUNS``; 0: none)."""
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    """Credentials and TLS for NATS (``BIDE_NATS_CREDS``, ``BIDE_NATS_TLS_CA``, ...: :class:`NatsAuth`)."""
    warm_bytes: int = 64 * 1024 * 1024
    """The most history (in stored bytes) the warm runs of a host may hold together (``BIDE_WARM_BYTES``)."""
    gc_threshold: int = DEFAULT_GC_THRESHOLD
    """Allocations between passes of Python's cyclic garbage collector over young objects in a
    process that hosts runs (``BIDE_GC_THRESHOLD``; Python's own default is 700, and 0 leaves the
    process's collector as it is). A host's turns allocate many short-lived objects, and at 700
    the collector took about a fifth of a host's CPU (see :mod:`actors.hosting.collector`)."""

    @classmethod
    def from_env(
        cls,
        nats_url: str | None = None,
        prefix: str | None = None,
        replicas: int | None = None,
        ack_wait_s: float | None = None,
    ) -> BideConfig:
        cfg = cls(
            nats_url=nats_url or os.environ.get("BIDE_NATS_URL") or DEFAULT_NATS_URL,
            prefix=prefix or os.environ.get("BIDE_PREFIX") or "bide",
            replicas=replicas if replicas is not None else int(_env_float("BIDE_REPLICAS", 1)),
            ack_wait_s=ack_wait_s if ack_wait_s is not None else _env_float("BIDE_ACK_WAIT", DEFAULT_ACK_WAIT_S),
            connect_timeout_s=_env_float("BIDE_CONNECT_TIMEOUT", 2.0),
            events_max_age_s=_env_duration("BIDE_EVENTS_MAX_AGE", 24 * 3600.0),
            api_token=os.environ.get("BIDE_API_TOKEN") or None,
            history_retention_s=_env_duration("BIDE_HISTORY_RETENTION", DEFAULT_HISTORY_RETENTION_S),
            max_payload_bytes=parse_size(os.environ.get("BIDE_MAX_PAYLOAD") or DEFAULT_MAX_PAYLOAD),
            max_deliveries=_env_int("BIDE_MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES),
            sweep_after_s=_env_float("BIDE_SWEEP_AFTER", 10.0),
            max_history_bytes=parse_size(os.environ.get("BIDE_MAX_HISTORY") or 256 * 1024 * 1024,
                                         "BIDE_MAX_HISTORY"),
            stream_check_s=_env_float("BIDE_STREAM_CHECK_INTERVAL", 30.0),
            wakeup_check_s=_env_float("BIDE_WAKEUP_CHECK_INTERVAL", 60.0),
            router_partitions=_env_int("BIDE_ROUTER_PARTITIONS", 4),
            warm_runs=_env_int("BIDE_WARM_RUNS", 500),
            nats_auth=NatsAuth.from_env(),
            warm_bytes=parse_size(os.environ.get("BIDE_WARM_BYTES") or 64 * 1024 * 1024, "BIDE_WARM_BYTES"),
            gc_threshold=_env_int("BIDE_GC_THRESHOLD", DEFAULT_GC_THRESHOLD),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not self.prefix or not all(c.isalnum() or c in "_-" for c in self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must be a non-empty name of letters, digits, '_' or '-'")
        if self.replicas not in (1, 3, 5):
            raise ValueError(f"replicas={self.replicas} must be 1, 3 or 5")
        if self.ack_wait_s < 1:
            raise ValueError(f"ack_wait_s={self.ack_wait_s} must be at least 1 second")
        if self.max_deliveries < 1:
            raise ValueError(f"max_deliveries={self.max_deliveries} must be at least 1 (BIDE_MAX_DELIVERIES)")
        if self.events_max_age_s < 1:
            raise ValueError(f"events_max_age_s={self.events_max_age_s} must be at least 1 second")
        if not 1 <= self.history_retention_s <= _MAX_RETENTION_S:
            raise ValueError(f"history_retention_s={self.history_retention_s:g} must be between 1 second and 100 years")
        if not 1 <= self.router_partitions <= MAX_ROUTER_PARTITIONS:
            raise ValueError(f"BIDE_ROUTER_PARTITIONS={self.router_partitions} must be between 1 and "
                             f"{MAX_ROUTER_PARTITIONS}")
        if not 0.1 <= self.stream_check_s <= 86400:
            raise ValueError(f"BIDE_STREAM_CHECK_INTERVAL={self.stream_check_s:g} must be between 0.1 and 86400 "
                             "seconds")
        if not 1 <= self.wakeup_check_s <= 86400:
            raise ValueError(f"BIDE_WAKEUP_CHECK_INTERVAL={self.wakeup_check_s:g} must be between 1 and 86400 seconds")
        if self.warm_runs < 0:
            raise ValueError(f"BIDE_WARM_RUNS={self.warm_runs} must be 0 (keep none) or more")
        if not 0 <= self.gc_threshold <= _MAX_GC_THRESHOLD:
            raise ValueError(f"BIDE_GC_THRESHOLD={self.gc_threshold} must be 0 (leave Python's collector as it is) "
                             f"or a number of allocations up to {_MAX_GC_THRESHOLD}, such as 50000")
        PayloadLimits(max_bytes=self.max_payload_bytes)  # raises ValueError naming a bad limit

    @cached_property
    def payload_limits(self) -> PayloadLimits:
        """What every way in checks a payload against (see :mod:`sdk.limits`)."""
        return PayloadLimits(max_bytes=self.max_payload_bytes)
