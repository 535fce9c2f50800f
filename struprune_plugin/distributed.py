"""Data-parallel calibration over torch.distributed: each rank streams its share of the windows.

Launched under `torchrun` (or `accelerate launch`, or inside llm-compressor's distributed
`oneshot`), every rank holds the same model and the same calibration ids; `shard_windows` gives
rank r its contiguous block of windows, so the ranks' tokens, concatenated in rank order, are the
one-process run's tokens in the same order. Every sum over tokens (feature moments, Gram matrices,
the ADMM solver's cross terms, losses, KL totals) goes through `all_sum`, so every rank takes the
same decisions from the same numbers, and only rank 0 writes (`is_writer`).

Without an initialised process group every function here is the identity: one process is the
special case world = 1, not a separate code path. `join_process_group` joins the group a launcher
(torchrun) describes in its environment variables, checking them first and bounding the wait for
the other processes (STRUPRUNE_RENDEZVOUS_TIMEOUT).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import DistributedSetupError, first_line


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes outputs (rank 0, or the only process)."""
    return rank() == 0


def window_range(count: int) -> tuple[int, int]:
    """[start, stop) of this rank's block of `count` windows: the first `count % world` ranks
    take one more, so blocks differ by at most one window."""
    w, r = world(), rank()
    base, extra = divmod(count, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


_ALREADY_SHARDED = False


@contextlib.contextmanager
def windows_already_sharded() -> Iterator[None]:
    """Within the block, calibration ids are taken to be this rank's own share already (as in
    llm-compressor, whose users partition the dataset per rank), so `shard_windows` keeps them."""
    global _ALREADY_SHARDED
    previous, _ALREADY_SHARDED = _ALREADY_SHARDED, True
    try:
        yield
    finally:
        _ALREADY_SHARDED = previous


def shard_windows(ids: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous block of calibration windows (rows of `ids`)."""
    if not active() or _ALREADY_SHARDED:
        return ids
    if ids.shape[0] < world():
        from .errors import CalibrationDataError

        raise CalibrationDataError(
            f"{ids.shape[0]} calibration windows cannot be shared by {world()} processes. Fix: "
            f"calibrate on at least {world()} windows, or launch fewer processes"
        )
    start, stop = window_range(ids.shape[0])
    return ids[start:stop]


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks (in place, returned), on the device the backend reduces on
    (gloo: CPU, NCCL: the rank's GPU). Callers pass float64 sums, so rank order barely matters."""
    if not active():
        return tensor
    target = _device()
    work = tensor if tensor.device.type == target.type else tensor.to(target)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_sum_scalar(value: float) -> float:
    if not active():
        return value
    return float(all_sum(torch.tensor([value], dtype=torch.float64, device=_device()))[0])


def all_sum_int(value: int) -> int:
    if not active():
        return value
    return int(all_sum(torch.tensor([value], dtype=torch.int64, device=_device()))[0])


def row_offset(local_rows: int) -> tuple[int, int]:
    """(first global row of this rank's rows, total rows): ranks hold consecutive blocks of the
    one-process row order, so a seeded subsample of the global rows can be taken locally."""
    if not active():
        return 0, local_rows
    counts = torch.zeros(world(), dtype=torch.int64, device=_device())
    counts[rank()] = local_rows
    all_sum(counts)
    return int(counts[: rank()].sum()), int(counts.sum())


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Joining a process group from a launcher's environment ------------------------------------------
#
# torch's own env:// rendezvous waits up to its collective timeout (30 minutes) for processes that
# were never started, without printing anything, and reads the variables with a bare int(). Here the
# variables are checked first, and the meeting is bounded by its own, short timeout, while the
# collectives keep torch's long one: during pruning, ranks legitimately wait minutes on each other.

#: Environment variable: seconds a process waits for all WORLD_SIZE processes to join.
RENDEZVOUS_TIMEOUT_ENV = "STRUPRUNE_RENDEZVOUS_TIMEOUT"
#: Long enough for every process of a node to import torch and start, even on a busy machine.
DEFAULT_RENDEZVOUS_TIMEOUT = 120.0
#: One day: a larger wait only hides a launch that failed (and overflows timedelta far above it).
_MAX_RENDEZVOUS_TIMEOUT = 86400.0

_LAUNCH_FIX = (
    "launch with torchrun (e.g. torchrun --nproc-per-node 2 -m struprune_plugin.cli prune ...), which "
    "sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process, or unset "
    "WORLD_SIZE to run one process"
)
_INTEGER = re.compile(r"[+-]?[0-9]+")
_joins = 0  # process groups joined by this process: keeps each join's check-in keys apart


@dataclass(frozen=True)
class Launch:
    """The launcher's description of this process's place in a group of `world_size` processes."""

    world_size: int
    rank: int
    local_rank: int
    master_addr: str
    master_port: int
    timeout: float  # seconds to wait for every process to join
    agent_store: bool  # torchrun's agent already serves the store; every rank is its client
    attempt: str  # torchrun's restart count: a restarted group does not meet the old one's keys


def _shown(raw: str) -> str:
    """`raw` quoted for a one-line message: newlines escaped, length bounded."""
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def _env_int(environ: Mapping[str, str], name: str, meaning: str, fix: str, minimum: int) -> int | None:
    """The integer in `environ[name]` (None when unset or empty, as torch reads it), refused with
    `fix` when it is not a plain decimal integer of at least `minimum`: int() alone would accept
    '1_0' and other-script digits, and fail on the rest with a message naming neither the variable
    nor the fix."""
    raw = environ.get(name, "")
    if not raw.strip():
        return None
    if not _INTEGER.fullmatch(raw.strip()):
        raise DistributedSetupError(f"{name}={_shown(raw)} is not a whole number ({meaning}). Fix: {fix}")
    value = int(raw)
    if value < minimum:
        raise DistributedSetupError(f"{name}={value} is below {minimum} ({meaning}). Fix: {fix}")
    return value


def _rendezvous_timeout(environ: Mapping[str, str]) -> float:
    raw = environ.get(RENDEZVOUS_TIMEOUT_ENV, "")
    if not raw.strip():
        return DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0 < value <= _MAX_RENDEZVOUS_TIMEOUT):  # also refuses nan
        raise DistributedSetupError(
            f"{RENDEZVOUS_TIMEOUT_ENV}={_shown(raw)} is not a number of seconds in (0, "
            f"{_MAX_RENDEZVOUS_TIMEOUT:g}]. Fix: set it to how long processes may take to start, e.g. "
            f"{RENDEZVOUS_TIMEOUT_ENV}=300, or unset it for {DEFAULT_RENDEZVOUS_TIMEOUT:g} s"
        )
    return value


def launch_env(environ: Mapping[str, str] | None = None) -> Launch | None:
    """This process's place in a process group as the launcher's variables describe it, or None when
    they ask for none (WORLD_SIZE unset, or 1). Every inconsistency is refused here, before any
    socket is opened: a RANK outside the world, or a world without a meeting address, would
    otherwise wait for processes that cannot exist."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", "the number of processes", _LAUNCH_FIX, minimum=1)
    if world is None:
        return None
    place_fix = (
        f"give each of the {world} processes its own RANK from 0 to {world - 1} (torchrun does), "
        "or set WORLD_SIZE to the number of processes launched"
    )
    rank = _env_int(environ, "RANK", "this process's place among WORLD_SIZE", place_fix, minimum=0)
    if rank is None and world > 1:
        raise DistributedSetupError(
            f"WORLD_SIZE={world} but RANK is not set, so this process cannot tell which of the {world} "
            f"it is. Fix: {_LAUNCH_FIX}"
        )
    if rank is not None and rank >= world:
        raise DistributedSetupError(
            f"RANK={rank} is outside 0..{world - 1} for WORLD_SIZE={world}: no group can hold it. "
            f"Fix: {place_fix}"
        )
    local_fix = (
        "give each process on a machine its own LOCAL_RANK from 0 up (torchrun does), or unset LOCAL_RANK"
    )
    local_rank = _env_int(environ, "LOCAL_RANK", "this process's place on its machine", local_fix, 0)
    if local_rank is not None and local_rank >= world:
        raise DistributedSetupError(
            f"LOCAL_RANK={local_rank} is outside 0..{world - 1} for WORLD_SIZE={world}. Fix: {local_fix}"
        )
    if world == 1:
        return None  # one process needs no group
    master_addr = environ.get("MASTER_ADDR", "").strip()
    if not master_addr:
        raise DistributedSetupError(
            f"WORLD_SIZE={world} but MASTER_ADDR is not set, so the processes have no address to meet at. "
            "Fix: set MASTER_ADDR to the host of RANK 0 and MASTER_PORT to a free port there, the same in "
            f"every process, or {_LAUNCH_FIX}"
        )
    if len(master_addr) > 253 or not all(c.isprintable() and not c.isspace() for c in master_addr):
        raise DistributedSetupError(
            f"MASTER_ADDR={_shown(master_addr)} is not a host name or IP address. Fix: set MASTER_ADDR to "
            "the host of RANK 0 (a name or address every process can reach), the same in every process"
        )
    port_fix = "set MASTER_PORT to a free TCP port (1..65535) on MASTER_ADDR, the same in every process"
    port = _env_int(environ, "MASTER_PORT", "the TCP port RANK 0 listens on", port_fix, minimum=1)
    if port is None:
        raise DistributedSetupError(
            f"WORLD_SIZE={world} but MASTER_PORT is not set, so the processes have no port to meet at. "
            f"Fix: {port_fix}"
        )
    if port > 65535:
        raise DistributedSetupError(f"MASTER_PORT={port} is not a TCP port (1..65535). Fix: {port_fix}")
    return Launch(
        world_size=world,
        rank=int(rank or 0),
        local_rank=int(local_rank or 0),
        master_addr=master_addr,
        master_port=port,
        timeout=_rendezvous_timeout(environ),
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        attempt=environ.get("TORCHELASTIC_RESTART_COUNT", "0"),
    )


def join_process_group(device: str) -> tuple[bool, str]:
    """Join the process group a launcher (torchrun) describes: NCCL with the LOCAL_RANK-th GPU for a
    `cuda` device, gloo otherwise. Returns (whether this call started the group, the device this
    rank computes on). Nothing happens for one process, or when the caller already joined a group.

    The launcher's variables are checked first and the processes then meet through a TCPStore
    created here (rank 0 serves it, unless torchrun's agent already does), within the rendezvous
    timeout; only then does torch build the group on that store, with its own long timeout for
    collectives."""
    if dist.is_available() and dist.is_initialized():
        return False, device
    launch = launch_env()
    if launch is None:
        return False, device
    if not dist.is_available():
        raise DistributedSetupError(
            f"WORLD_SIZE={launch.world_size} asks for a process group, but this torch build "
            f"({torch.__version__}) has no torch.distributed. Fix: install a torch build with distributed "
            "support, or unset WORLD_SIZE to run one process"
        )
    cuda = device.startswith("cuda")
    if cuda:
        device = _rank_gpu(launch)
    store = _rendezvous(launch)
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=store, rank=launch.rank, world_size=launch.world_size
    )
    return True, device


def _rank_gpu(launch: Launch) -> str:
    """The GPU of this rank (cuda:LOCAL_RANK), made current; refused when the machine has fewer GPUs,
    which torch reports only as an 'invalid device ordinal' deep inside CUDA."""
    from .devices import resolve_device

    resolve_device("cuda")  # no CUDA at all: DeviceError with its own fix
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise DistributedSetupError(
            f"LOCAL_RANK={launch.local_rank} needs cuda:{launch.local_rank}, but only {count} GPU(s) are "
            f"visible here. Fix: launch at most {count} processes per machine (--nproc-per-node {count}), "
            "or make more GPUs visible (CUDA_VISIBLE_DEVICES)"
        )
    torch.cuda.set_device(launch.local_rank)
    return f"cuda:{launch.local_rank}"


def _rendezvous(launch: Launch) -> dist.Store:
    """A store on which all `launch.world_size` processes have checked in, or a DistributedSetupError
    after `launch.timeout` seconds naming who is missing."""
    deadline = time.monotonic() + launch.timeout
    where = f"{launch.master_addr}:{launch.master_port}"
    serve = launch.rank == 0 and not launch.agent_store
    try:
        if serve:
            _await_name(launch, deadline)
            store = dist.TCPStore(
                launch.master_addr,
                launch.master_port,
                launch.world_size,
                is_master=True,
                timeout=timedelta(seconds=launch.timeout),
                wait_for_workers=False,  # the check-in below waits, and names who is missing
                multi_tenant=True,
                use_libuv=os.environ.get("USE_LIBUV", "1") == "1",  # as torch's env:// reads it
            )
        else:
            _await_listener(launch, deadline)
            store = dist.TCPStore(
                launch.master_addr,
                launch.master_port,
                launch.world_size,
                is_master=False,
                timeout=timedelta(seconds=max(deadline - time.monotonic(), 1.0)),
            )
    except dist.DistError as err:
        role = "serve" if serve else "reach"
        raise DistributedSetupError(
            f"RANK {launch.rank} could not {role} the rendezvous store at {where}: {first_line(err).rstrip('.')}. "
            "Fix: set MASTER_PORT to a port that is free on the RANK 0 host, and MASTER_ADDR to an "
            "address of that host every process can reach"
        ) from err
    try:
        _check_in(store, launch, deadline)
    except dist.DistError as err:
        raise DistributedSetupError(
            f"RANK {launch.rank} lost the rendezvous store at {where} while the processes met: "
            f"{first_line(err).rstrip('.')}. Fix: see the error of RANK 0 (it serves the store) and start all "
            "processes again"
        ) from err
    from torch.distributed.constants import default_pg_timeout

    store.set_timeout(default_pg_timeout)  # from here on, as torch's own rendezvous leaves it
    return dist.PrefixStore("default_pg", store)  # the key space torch's own rendezvous gives the group


def _await_name(launch: Launch, deadline: float) -> None:
    """Wait until MASTER_ADDR resolves. RANK 0's store also connects to it as a client, which for a
    name that never resolves retries until the timeout with a C++ stack trace per retry."""
    while True:
        try:
            socket.getaddrinfo(launch.master_addr, launch.master_port, type=socket.SOCK_STREAM)
            return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedSetupError(
                    f"MASTER_ADDR={_shown(launch.master_addr)} does not resolve to an address ({err}). Fix: "
                    "set MASTER_ADDR to the host name or IP address of RANK 0's machine"
                ) from err
        time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))


def _await_listener(launch: Launch, deadline: float) -> None:
    """Wait until the store's port accepts connections. Probed with plain sockets because a TCPStore
    client retrying against a closed port prints a C++ stack trace per retry."""
    last: OSError | None = None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            socket.create_connection((launch.master_addr, launch.master_port), timeout=min(left, 2.0)).close()
            return
        except OSError as err:
            last = err
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))
    serving = "torchrun's agent" if launch.agent_store else "RANK 0"
    raise DistributedSetupError(
        f"RANK {launch.rank} of WORLD_SIZE={launch.world_size}: nothing answered at MASTER_ADDR:MASTER_PORT"
        f" = {launch.master_addr}:{launch.master_port} within {launch.timeout:g} s ({last}), so "
        f"{serving}, which serves the rendezvous store there, never started or listens elsewhere. Fix: "
        "start the RANK 0 process with the same MASTER_ADDR and MASTER_PORT (torchrun does), or raise "
        f"{RENDEZVOUS_TIMEOUT_ENV} if it starts late"
    )


def _check_in(store: dist.Store, launch: Launch, deadline: float) -> None:
    """Record this rank on the store and wait, until `deadline`, for every rank to do the same. A
    second process claiming an already-taken RANK is refused: it would otherwise wait for ever in
    the backend's own connection step. Polled with `check` rather than a blocking `wait`, which
    prints socket warnings when it times out."""
    global _joins
    _joins += 1
    keys = dist.PrefixStore(f"struprune/join/{launch.attempt}/{_joins}", store)
    if keys.add(f"rank{launch.rank}", 1) != 1:
        raise DistributedSetupError(
            f"another process already joined as RANK={launch.rank} (WORLD_SIZE={launch.world_size}). "
            f"Fix: give each of the {launch.world_size} processes its own RANK from 0 to "
            f"{launch.world_size - 1} (torchrun does)"
        )
    everyone = [f"rank{r}" for r in range(launch.world_size)]
    pause = 0.01
    while not keys.check(everyone):
        left = deadline - time.monotonic()
        if left <= 0:
            missing = [r for r in range(launch.world_size) if not keys.check([f"rank{r}"])]
            shown = ", ".join(map(str, missing[:8])) + (", ..." if len(missing) > 8 else "")
            raise DistributedSetupError(
                f"only {launch.world_size - len(missing)} of WORLD_SIZE={launch.world_size} processes "
                f"joined within {launch.timeout:g} s; missing RANK {shown}. Fix: start all "
                f"{launch.world_size} processes with the same MASTER_ADDR and MASTER_PORT (torchrun "
                f"--nproc-per-node {launch.world_size} does), or raise {RENDEZVOUS_TIMEOUT_ENV} if they "
                "start late"
            )
        time.sleep(min(pause, left))
        pause = min(pause * 2, 0.5)
