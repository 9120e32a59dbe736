"""Collectives: every torch.distributed collective of the package goes through parallel.py, which
runs it on the device the group's backend takes (CUDA for NCCL) and gives results back on the
caller's device."""

import ast
import pathlib

import pytest
import torch
import torch.distributed as dist

from megatron_minitron import parallel
from megatron_minitron.testing import spawn

PACKAGE = pathlib.Path(parallel.__file__).parent
COLLECTIVES = {
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor",
    "all_gather_coalesced", "all_gather_object", "_all_gather_base", "reduce_scatter",
    "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast", "broadcast_object_list",
    "gather", "gather_object", "scatter", "scatter_object_list", "reduce", "all_to_all",
    "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list",
    "recv_object_list",
}
DIST_MODULES = ("torch.distributed", "torch.distributed.distributed_c10d")


def _dotted(node):
    """``a.b.c`` of a Name/Attribute chain, or None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def direct_collectives(source: str):
    """(line, name) of every torch.distributed collective named in ``source``, however
    torch.distributed was imported (``dist.x``, ``torch.distributed.x``, ``from ... import x``)."""
    tree = ast.parse(source)
    aliases = set(DIST_MODULES)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for name in node.names:
                if name.name in DIST_MODULES and name.asname:
                    aliases.add(name.asname)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for name in node.names:
                if node.module == "torch" and name.name == "distributed":
                    aliases.add(name.asname or "distributed")
                elif node.module in DIST_MODULES and name.name in COLLECTIVES:
                    found.append((node.lineno, name.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in COLLECTIVES
                and _dotted(node.value) in aliases):
            found.append((node.lineno, node.attr))
    return sorted(found)


def test_scanner_catches_every_import_form():
    source = "\n".join([
        "import torch.distributed as dist", "import torch", "import torch.distributed",
        "from torch import distributed as tdist", "from torch.distributed import all_gather",
        "from torch.distributed import new_group",
        "def f(x, g):",
        "    dist.all_reduce(x, group=g)",
        "    torch.distributed.broadcast(x, 0)",
        "    tdist.reduce_scatter_tensor(x, x)",
        "    fn = dist.isend",
        "    dist.barrier(); dist.get_rank(); parallel.all_reduce(x)",
    ])
    assert direct_collectives(source) == [(5, "all_gather"), (8, "all_reduce"),
                                          (9, "broadcast"), (10, "reduce_scatter_tensor"),
                                          (11, "isend")]


def test_only_parallel_calls_torch_distributed_collectives():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "parallel.py":
            continue
        found = direct_collectives(path.read_text())
        if found:
            offenders[str(path.relative_to(PACKAGE))] = found
    assert not offenders, ("call the collectives of megatron_minitron.parallel instead of "
                           f"torch.distributed: {offenders}")
    helpers = {name for _, name in direct_collectives((PACKAGE / "parallel.py").read_text())}
    assert {"all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
            "broadcast_object_list"} <= helpers


# ----------------------------------------------------------------------------- placement


@pytest.fixture
def fake_nccl(monkeypatch):
    """A two-rank NCCL world on CUDA device 0, whose collectives record the device of every
    tensor they get and refuse any other than CUDA (as NCCL does)."""
    seen = []

    def collective(name):
        def run(*tensors, **kwargs):
            flat = [t for arg in tensors for t in (arg if isinstance(arg, list) else [arg])]
            devices = {t.device for t in flat}
            if devices != {torch.device("cuda", 0)}:
                raise RuntimeError(f"{name}: No backend type associated with device type "
                                   f"{sorted(d.type for d in devices)}")
            seen.append(name)
        return run

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast"):
        monkeypatch.setattr(dist, name, collective(name))
    return seen


def test_backend_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert parallel.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert parallel.backend_device() == torch.device("cpu")


def test_host_tensors_reach_nccl_on_cuda_and_come_back(fake_nccl):
    from torch._subclasses.fake_tensor import FakeTensorMode

    cuda = torch.device("cuda", 0)
    with FakeTensorMode(allow_non_fake_inputs=True):  # CUDA tensors without a GPU
        host = torch.zeros(4, 3, dtype=torch.float64)  # as parallel_sum and block BI made them
        assert parallel.all_reduce(host, "max") is host and host.device.type == "cpu"
        parts = parallel.all_gather(host.t())  # non-contiguous, too
        assert [p.device.type for p in parts] == ["cpu", "cpu"] and parts[0].shape == (3, 4)
        stacked = parallel.all_gather_into_tensor(host)
        assert stacked.device.type == "cpu" and stacked.shape == (8, 3)
        assert parallel.broadcast(host, src=1) is host
        on_gpu = torch.zeros(2, device=cuda)  # already where NCCL wants it
        assert parallel.all_reduce(on_gpu).device == cuda
    assert fake_nccl == ["all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
                         "all_reduce"]


def test_one_rank_skips_the_collective(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    values = torch.arange(3.0)
    assert parallel.all_reduce(values) is values
    assert parallel.all_gather(values)[0] is values
    assert parallel.broadcast_object({"a": 1}) == {"a": 1}


def _exchange():
    parallel.initialize(1, 1)
    rank = parallel.rank()
    group = dist.new_group([0, 1])
    grid = torch.arange(6, dtype=torch.float64).view(2, 3) + 10 * rank
    view = grid.t()  # non-contiguous: reduced through a contiguous copy, written back in place
    assert parallel.all_reduce(view, group=group) is view
    assert torch.equal(grid, 2 * torch.arange(6, dtype=torch.float64).view(2, 3) + 10)
    peak = torch.tensor([rank, -rank])
    parallel.all_reduce(peak, "max", group)
    assert peak.tolist() == [1, 0]
    parallel.all_reduce(peak, "min", group)
    assert peak.tolist() == [1, 0]
    mine = torch.full((2,), float(rank))
    assert [p.tolist() for p in parallel.all_gather(mine, group)] == [[0.0, 0.0], [1.0, 1.0]]
    assert parallel.all_gather_into_tensor(mine[None], group).tolist() == [[0.0, 0.0],
                                                                            [1.0, 1.0]]
    box = torch.tensor([rank + 5])
    parallel.broadcast(box, src=1, group=group)
    assert box.tolist() == [6]
    assert parallel.broadcast_object(f"from {rank}", src=1, group=group) == "from 1"
    assert parallel.global_rank(group, 1) == 1 and parallel.group_rank(group) == rank


def test_helpers_on_two_gloo_ranks():
    spawn(_exchange, 2)
