"""This process's place among the ranks: the rank environment, the process group, devices, and a clean exit.

Launchers: torchrun and the deepspeed launcher set RANK / LOCAL_RANK / WORLD_SIZE; `srun` one task
per rank sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS, which DeepSpeed never maps (gpt-neox does
it the same way); a bare `python train.py` is world 1 on 127.0.0.1.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from calm_dist.config import ConfigError

# torch and deepspeed are imported inside the functions that use them: validation, the CLI's argument errors and
# the launchers import this module and must not wait for them.
if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistEnv:
    """This process's rank and local rank, the number of ranks in all and on this node."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls, environ=os.environ) -> "DistEnv":
        """The launcher's layout (torchrun / deepspeed, else srun, else one process). A variable that is not a
        non-negative integer, an empty world or a rank outside it is a ConfigError naming the variable."""
        def number(name: str, default: int | str) -> int:
            raw = str(environ.get(name, default))
            try:
                value = int(raw.split("(")[0])  # Slurm writes a repeated per-node count as "2(x3)"
            except ValueError:
                value = -1
            if value < 0:
                raise ConfigError(f"{name}={raw!r} is not a non-negative integer")
            return value

        if "RANK" in environ:
            names = ("RANK", "WORLD_SIZE")
            world = number("WORLD_SIZE", 1)
            env = cls(number("RANK", 0), number("LOCAL_RANK", 0), world,
                      number("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", world)))
        elif "SLURM_PROCID" in environ and number("SLURM_NTASKS", 1) > 1:
            names = ("SLURM_PROCID", "SLURM_NTASKS")
            env = cls(number("SLURM_PROCID", 0), number("SLURM_LOCALID", 0), number("SLURM_NTASKS", 1),
                      number("SLURM_NTASKS_PER_NODE", 1))
        else:
            return cls(0, 0, 1, 1)
        if not 0 <= env.rank < env.world_size:
            raise ConfigError(f"{names[0]}={env.rank} is outside the world of {names[1]}={env.world_size} ranks")
        return env

    def export(self, environ=os.environ) -> None:
        """Make the torch/DeepSpeed variables agree with what we derived (SLURM, or single process)."""
        environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                       LOCAL_WORLD_SIZE=str(self.local_world_size), LOCAL_SIZE=str(self.local_world_size))
        if "MASTER_ADDR" not in environ:
            if "SLURM_JOB_NODELIST" in environ and self.world_size > 1:
                raise ConfigError("MASTER_ADDR is not set; slurm/train_composed.sh sets it from the node list")
            environ["MASTER_ADDR"] = "127.0.0.1"
        if "MASTER_PORT" not in environ:
            if "SLURM_JOB_ID" in environ:
                environ["MASTER_PORT"] = str(slurm_master_port(int(environ["SLURM_JOB_ID"])))
            elif self.world_size == 1:
                environ["MASTER_PORT"] = str(free_port())
            else:
                raise ConfigError("MASTER_PORT is not set for a multi-process run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port of a SLURM job: 20000-31999, below Linux's ephemeral range (32768-60999) so no
    outgoing connection on the first node can already hold it; the slurm/ scripts compute the same."""
    return 20000 + job_id % 12000


def init_process_group(env: DistEnv, timeout_s: int) -> None:
    """Join the process group through a rendezvous store that listens on MASTER_ADDR only, then let DeepSpeed
    adopt the group. Under torchrun the agent already hosts the store, and the ranks only connect to it."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    env.export()
    disable_shared_memory_allreduce()
    keep_gloo_on_loopback()
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized() and not torchrun_agent_hosts_store():
        accelerator = get_accelerator()
        # DeepSpeed binds each rank's GPU to the group on CUDA (eager NCCL set-up); so do we, as it would.
        bind_gpu = accelerator.device_name() == "cuda" and env.world_size > 1
        dist.init_process_group(accelerator.communication_backend_name(), store=rendezvous_store(env, timeout),
                                rank=env.rank, world_size=env.world_size, timeout=timeout,
                                device_id=torch.device("cuda", env.local_rank) if bind_gpu else None)
    deepspeed.init_distributed(dist_init_required=True, timeout=timeout)


def torchrun_agent_hosts_store(environ=os.environ) -> bool:
    """torchrun's agent sets this when its own store (on MASTER_ADDR:MASTER_PORT) serves the ranks too."""
    return environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def rendezvous_store(env: DistEnv, timeout):
    """Rank 0 hosts the TCPStore on a socket bound to MASTER_ADDR (torch's own listens on every interface);
    the other ranks connect to it."""
    from torch.distributed import TCPStore

    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    listen_fd = bound_listener(addr, port) if env.is_main else None
    return TCPStore(addr, port, env.world_size, is_master=env.is_main, timeout=timeout, master_listen_fd=listen_fd)


def bound_listener(addr: str, port: int) -> int | None:
    """A listening socket on `addr`:`port` whose descriptor the store takes over; None when `addr` is not an
    address of this host (a service or NAT address), where only torch's listener on every interface serves."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"MASTER_ADDR={addr} does not resolve: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a requeued job rebinds its port in TIME_WAIT
    try:
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        if e.errno != errno.EADDRNOTAVAIL:
            raise ConfigError(f"the rendezvous store cannot listen on MASTER_ADDR:MASTER_PORT={addr}:{port}: "
                              f"{e.strerror}") from None
        print(f"warning: MASTER_ADDR={addr} is not an address of this host: the rendezvous store listens on "
              "every interface", file=sys.stderr, flush=True)
        return None
    return sock.detach()


def keep_gloo_on_loopback(environ=os.environ, hostname: str | None = None) -> None:
    """Gloo listens on the address this host's name resolves to (unless GLOO_SOCKET_IFNAME names an interface).
    A loopback MASTER_ADDR puts every rank on this host, so when the name resolves elsewhere gloo is sent to
    the loopback interface instead of a reachable address."""
    if "GLOO_SOCKET_IFNAME" in environ or not only_loopback(environ["MASTER_ADDR"]):
        return
    if only_loopback(hostname or socket.gethostname()):
        return
    name = loopback_interface()
    if name:
        environ["GLOO_SOCKET_IFNAME"] = name


def only_loopback(host: str) -> bool:
    """Every address `host` resolves to is a loopback one (False when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def loopback_interface(net: Path = Path("/sys/class/net")) -> str | None:
    """The interface flagged IFF_LOOPBACK (Linux's `lo`); None where /sys/class/net does not exist."""
    for flags in sorted(net.glob("*/flags")):
        if int(flags.read_text(), 16) & 0x8:
            return flags.parent.name
    return None


def exit_process(code: int) -> None:
    """End an entry point's process without interpreter finalization, once everything is written and closed.
    destroy_process_group drops only torch's own references: DeepSpeed keeps its groups (and ZeRO its hooks)
    alive to the end, and when finalization then destroys gloo's backend while its worker threads still hold
    tensors, the process can abort ("terminate called without an active exception", pytorch PR #179291) and
    a finished run then ends as a failed job."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_then_exit(main) -> None:
    """Run an entry point's `main()` and end the process through exit_process whatever happens: an uncaught
    exception is printed by sys.excepthook (torch's names the rank) and exits 1, a SystemExit keeps its code.
    Letting an exception reach the interpreter would finalize it, which can abort a rank (exit_process)."""
    try:
        code = main() or 0
    except SystemExit as e:  # argparse and sys.exit: the message, if any, as Python itself prints it
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    exit_process(code)


def shut_down_process_group() -> None:
    """Leave the process group cleanly once every rank is done: a barrier, then destroy it. Exiting with it
    alive lets gloo's worker threads outlive the interpreter, which can abort a rank at exit
    ("terminate called without an active exception", pytorch#179291)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_device(env: DistEnv) -> torch.device:
    """This rank's accelerator (`cuda:LOCAL_RANK`, made current) or the CPU. Batches, augmenting states and the
    small tensors of our own collectives live here: NCCL reduces only device tensors."""
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(env.local_rank)
    return torch.device(accelerator.device_name(env.local_rank))


def to_device(tensors, device: torch.device):
    """A batch dict, or augmenting states (a list of {layer: tensor}), moved to `device` (no copy when there)."""
    if isinstance(tensors, dict):
        return {k: to_device(v, device) for k, v in tensors.items()}
    if isinstance(tensors, list):
        return [to_device(v, device) for v in tensors]
    return tensors.to(device, non_blocking=True)


def disable_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from building and starting its CPU shared-memory all-reduce.

    On CPU, DeepSpeed compiles that op at the first run (a slow build, behind a file lock that a killed
    build leaves behind), and every process then creates a /dev/shm buffer that nothing unlinks at exit,
    so repeated runs fill the machine's memory. Only `inference_all_reduce` uses it; ZeRO's collectives go
    through torch.distributed (gloo / NCCL) either way. The table edited here is the one `deepspeed.comm`
    consults, and DeepSpeed keeps it for that purpose.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
