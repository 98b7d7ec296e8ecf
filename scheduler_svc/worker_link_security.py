"""Who may speak on the worker link: ZeroMQ CURVE keys (pyzmq's `zmq.auth`), and when none are needed.

Whoever registers on the scheduler's ROUTER receives every prompt and can forge every answer, so a
link that other machines can reach must be authenticated and encrypted. `omnibus keygen DIR`
writes ZeroMQ certificate files (`zmq.auth.create_certificates`) in this layout:

    DIR/                            mode 0700
      scheduler.key                 the scheduler's public key: every worker needs it
      scheduler.key_secret          the scheduler's key pair (0600): the scheduler host only
      workers/                      mode 0700
        worker-<rank>.key           the public keys the scheduler accepts, one per worker
        worker-<rank>.key_secret    that worker's key pair (0600): that worker's host only

The scheduler (`--worker-keys DIR`) reads `scheduler.key_secret` and accepts exactly the workers
whose public key is in `workers/*.key`; a worker of rank r (`--worker-keys DIR`) reads
`scheduler.key` and `workers/worker-<r>.key_secret`. A worker host needs only those two files.

Without keys the scheduler binds only where no other machine can connect: loopback TCP, `ipc://`
or `inproc://`. `omnibus serve` uses an `ipc://` socket in a fresh directory only its user can open
(`private_worker_endpoint`). `--insecure-worker-link` lifts the rule, with a warning in the log.

No torch here: the worker imports this module too.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

SCHEDULER_KEY_NAME = "scheduler"
WORKERS_DIR = "workers"
_PRIVATE_DIR_MODE = 0o700
_SECRET_FILE_MODE = 0o600
_LOCAL_TRANSPORTS = ("ipc", "inproc")


class WorkerLinkError(ValueError):
    """A worker link that cannot be set up safely: missing or unprotected keys, or an open bind."""


def worker_key_name(rank: int) -> str:
    return f"worker-{rank}"


# Key generation (`omnibus keygen`).

@dataclass(slots=True, frozen=True)
class KeygenResult:
    written: list[Path]  # files created now
    kept: list[Path]  # files that already existed and were left alone


def generate_keys(directory: Path, num_workers: int = 1) -> KeygenResult:
    """Write the scheduler's key pair and `num_workers` worker key pairs under `directory`.

    Existing pairs are kept (rerun with a larger `num_workers` to add workers); a secret is
    never overwritten.
    """
    if num_workers < 1:
        raise WorkerLinkError(f"the number of workers must be at least 1, got {num_workers}")
    workers_dir = directory / WORKERS_DIR
    _make_private_dir(directory)
    _make_private_dir(workers_dir)
    result = KeygenResult([], [])
    _generate_pair(directory, SCHEDULER_KEY_NAME, result)
    for rank in range(num_workers):
        _generate_pair(workers_dir, worker_key_name(rank), result)
    return result


def _make_private_dir(path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise WorkerLinkError(f"{path} exists and is not a directory")
        _check_private(path, "directory", "chmod 700")
        return
    path.mkdir(mode=_PRIVATE_DIR_MODE, parents=True)
    path.chmod(_PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask


def _generate_pair(directory: Path, name: str, result: KeygenResult) -> None:
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if secret.exists():
        if not public.exists():
            raise WorkerLinkError(f"{secret} exists without {public}; move it away to generate a new pair")
        result.kept.extend([public, secret])
        return
    # The directory is private, so the secret is unreadable by others before the chmod too.
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    Path(secret_file).chmod(_SECRET_FILE_MODE)
    Path(public_file).chmod(0o644)
    result.written.extend([Path(public_file), Path(secret_file)])


# Loading keys.

@dataclass(slots=True, frozen=True)
class SchedulerKeys:
    """The scheduler's CURVE key pair and the public keys of the workers it accepts (z85)."""

    public_key: bytes
    secret_key: bytes
    allowed_workers: frozenset[bytes]
    workers_dir: Path


@dataclass(slots=True, frozen=True)
class WorkerKeys:
    """A worker's CURVE key pair and the public key of the scheduler it may talk to (z85)."""

    public_key: bytes
    secret_key: bytes
    scheduler_public_key: bytes


def load_scheduler_keys(directory: Path) -> SchedulerKeys:
    public, secret = _load_secret(directory / f"{SCHEDULER_KEY_NAME}.key_secret")
    workers_dir = directory / WORKERS_DIR
    allowed = frozenset(zmq.auth.load_certificates(workers_dir)) if workers_dir.is_dir() else frozenset()
    if not allowed:
        raise WorkerLinkError(f"no worker public keys (*.key) in {workers_dir}: no worker could register "
                              f"(omnibus keygen {directory} writes them)")
    return SchedulerKeys(public, secret, allowed, workers_dir)


def load_worker_keys(directory: Path, rank: int) -> WorkerKeys:
    public, secret = _load_secret(directory / WORKERS_DIR / f"{worker_key_name(rank)}.key_secret")
    scheduler_public, _ = _load(directory / f"{SCHEDULER_KEY_NAME}.key")
    return WorkerKeys(public, secret, scheduler_public)


def _load_secret(path: Path) -> tuple[bytes, bytes]:
    public, secret = _load(path)
    if secret is None:
        raise WorkerLinkError(f"{path} holds no secret key")
    _check_private(path, "secret key file", "chmod 600")
    return public, secret


def _load(path: Path) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise WorkerLinkError(f"{path} does not exist (omnibus keygen {_keys_root(path)} writes it)")
    try:
        return zmq.auth.load_certificate(path)
    except (ValueError, OSError) as error:
        raise WorkerLinkError(f"{path} is not a ZeroMQ certificate file: {error}") from None


def _keys_root(path: Path) -> Path:
    return path.parent.parent if path.parent.name == WORKERS_DIR else path.parent


def _check_private(path: Path, what: str, fix: str) -> None:
    # As ssh does with private keys: a secret others can read is no secret.
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise WorkerLinkError(f"{what} {path} is accessible by other users (mode {mode:o}); {fix} {path}")


# Binding and connecting.

def is_local_endpoint(endpoint: str) -> bool:
    """Whether only this machine can connect to a ZeroMQ bind address (loopback, ipc, inproc)."""
    transport, _, address = endpoint.partition("://")
    if transport in _LOCAL_TRANSPORTS:
        return True
    if transport != "tcp":
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name: possibly reachable from outside


def worker_bind_refusal(endpoint: str, keyed: bool, insecure: bool) -> str | None:
    """Why a worker link may not be bound so, or None: one other machines can reach needs keys."""
    if keyed and insecure:
        return "--worker-keys and --insecure-worker-link contradict each other; pass one"
    if keyed or insecure or is_local_endpoint(endpoint):
        return None
    return (
        f"refusing to bind the worker link to {endpoint} without keys: any machine that reaches it could "
        f"register as a worker, read every prompt and forge every answer. Create keys with "
        f"`omnibus keygen DIR` and pass --worker-keys DIR to the scheduler and its workers, bind to "
        f"loopback, or pass --insecure-worker-link on a network you trust"
    )


def check_worker_bind(endpoint: str, keyed: bool, insecure: bool) -> None:
    """Raise `WorkerLinkError` for a refused bind; warn about one that `insecure` lets through."""
    refusal = worker_bind_refusal(endpoint, keyed, insecure)
    if refusal is not None:
        raise WorkerLinkError(refusal)
    if insecure and not is_local_endpoint(endpoint):
        logger.warning(
            "INSECURE WORKER LINK: %s is bound without authentication or encryption (--insecure-worker-link); "
            "anyone who can reach it can register as a worker, read every prompt and forge every answer",
            endpoint,
        )


class _AllowedWorkers:
    """zmq.auth's CURVE credentials callback: accept the listed keys, log each stranger's key once."""

    def __init__(self, allowed: frozenset[bytes]):
        self.allowed = allowed
        self.refused: dict[bytes, int] = {}  # z85 key -> handshakes refused

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        self.refused[key] = self.refused.get(key, 0) + 1
        if self.refused[key] == 1:
            logger.warning("refused a worker link handshake from an unknown CURVE key %s", key.decode("ascii"))
        return False


class CurveServer:
    """Authenticates and encrypts a ROUTER socket: only the keys in `keys.allowed_workers` connect."""

    def __init__(self, context: zmq.Context, keys: SchedulerKeys):
        self._allowed = _AllowedWorkers(keys.allowed_workers)
        self._keys = keys
        # A thread of its own: handshakes do not wait for the scheduler's event loop.
        self._authenticator = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
        self._authenticator.start()
        self._authenticator.configure_curve_callback("*", credentials_provider=self._allowed)

    @property
    def num_refused_handshakes(self) -> int:
        return sum(self._allowed.refused.values())

    def secure(self, socket: zmq.Socket) -> None:
        """Make `socket` (before it binds) a CURVE server with the scheduler's key pair."""
        socket.curve_secretkey = self._keys.secret_key
        socket.curve_publickey = self._keys.public_key
        socket.curve_server = True

    def stop(self) -> None:
        self._authenticator.stop()


def secure_worker_socket(socket: zmq.Socket, keys: WorkerKeys) -> None:
    """Make a worker's DEALER (before it connects) a CURVE client that talks only to our scheduler."""
    socket.curve_secretkey = keys.secret_key
    socket.curve_publickey = keys.public_key
    socket.curve_serverkey = keys.scheduler_public_key


@contextlib.contextmanager
def private_worker_endpoint() -> Iterator[str]:
    """An `ipc://` endpoint in a new directory only this user can open, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="omnibus-worker-link-") as directory:
        os.chmod(directory, _PRIVATE_DIR_MODE)  # mkdtemp's mode already; stated, not assumed
        yield f"ipc://{directory}/worker.sock"
