"""One rank of the listening-sockets test: join through calm_dist's init_process_group, run collectives on the
default group and on a new one (DeepSpeed builds its own groups the same way), then write the TCP sockets
this process listens on, read from /proc (the kernel's view, not a library's); under torchrun also its agent's.

argv: OUT [HOSTNAME NETNS]. With them the rank first joins the network namespace NETNS (made by the test, with
a non-loopback address on a dummy interface), then moves to its own UTS namespace (root) and takes HOSTNAME, as
a cluster node whose name resolves to a reachable address. No packet can reach any real network from there.
"""
import ctypes
import json
import os
import socket
import struct
import sys

import torch
import torch.distributed as dist

from calm_dist.training.dist_env import DistEnv, init_process_group, run_then_exit


CLONE_NEWUTS, CLONE_NEWNET = 0x04000000, 0x40000000


def join_network_namespace(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({name})")


def take_hostname(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    socket.sethostname(name)


def socket_inodes(pid: str) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed while listing
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


def decode_address(hex_address: str) -> str:
    """/proc/net/tcp* print addresses as native-endian 32-bit words in hex."""
    raw = bytes.fromhex(hex_address)
    native = b"".join(struct.pack("=I", int.from_bytes(raw[i:i + 4], "big")) for i in range(0, len(raw), 4))
    family = socket.AF_INET if len(native) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, native)


def listening_sockets(pid: str = "self") -> list[list]:
    """[address, port] of every TCP socket the process holds in state LISTEN (0A)."""
    mine, out = socket_inodes(pid), []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and inode in mine:
                    address, port = local.split(":")
                    out.append([decode_address(address), int(port, 16)])
    return sorted(out)


def main():
    if len(sys.argv) > 2:
        join_network_namespace(sys.argv[3])
        take_hostname(sys.argv[2])
    init_process_group(DistEnv.from_environ(), timeout_s=120)
    rank = dist.get_rank()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    second = dist.new_group([0, 1])
    dist.all_reduce(total, group=second)
    report = {"rank": rank, "sum": total.item(), "listening": listening_sockets(), "hostname": socket.gethostname(),
              "master_port": int(os.environ["MASTER_PORT"]), "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME")}
    if "TORCHELASTIC_RUN_ID" in os.environ:
        report["agent_listening"] = listening_sockets(str(os.getppid()))
    dist.barrier()  # every rank reads its sockets while the store and the peers still stand
    with open(f"{sys.argv[1]}.{rank}", "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    run_then_exit(main)
