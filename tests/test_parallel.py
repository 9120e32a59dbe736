"""Forward and checkpoints across layouts: TP, PP and TP×PP equal TP=1; save at one layout,
load at another."""

import pytest
import torch

from megatron_minitron import adapter, parallel
from megatron_minitron.checkpoint.io import load_checkpoint, load_config, save_checkpoint
from megatron_minitron.evaluation import lm_loss
from megatron_minitron.model.forward import full_logits
from megatron_minitron.testing import spawn, tiny_config

SAMPLES = 8
SEQ = 16


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (SAMPLES, SEQ + 1), generator=generator)


def _micro_batches(data, dp_rank=0, dp_size=1, mbs=2):
    mine = data[dp_rank::dp_size]
    return [{"tokens": mine[i:i + mbs, :-1], "labels": mine[i:i + mbs, 1:]}
            for i in range(0, mine.shape[0], mbs)]


def _make_reference(ckpt, ref):
    parallel.initialize(1, 1)
    cfg = tiny_config()
    model = adapter.build_gpt_model(cfg)
    save_checkpoint(model, cfg, ckpt)
    data = _data()
    torch.save({"logits": full_logits(model, data[:, :-1], 2),
                "loss": lm_loss(model, _micro_batches(data))["loss"]}, ref)


def _check_layout(ckpt, ref, tp, pp, resave=None):
    layout = parallel.initialize(tp, pp)
    model, _ = load_checkpoint(ckpt)
    expected = torch.load(ref)
    data = _data()
    logits = full_logits(model, data[:, :-1], 2)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    from megatron.core import parallel_state

    loss = lm_loss(model, _micro_batches(data, parallel_state.get_data_parallel_rank(), layout.dp))
    assert abs(loss["loss"] - expected["loss"]) <= 1e-6 * expected["loss"]
    assert loss["tokens"] == SAMPLES * SEQ
    if resave:
        save_checkpoint(model, load_config(ckpt), resave)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    ckpt, ref = str(root / "tp1"), str(root / "ref.pt")
    spawn(_make_reference, 1, ckpt, ref)
    return root, ckpt, ref


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (2, 2, 4), (1, 2, 4)])
def test_layout_matches_tp1(reference, tp, pp, world):
    _, ckpt, ref = reference
    spawn(_check_layout, world, ckpt, ref, tp, pp)


def test_save_tp2_load_tp1_and_pp2(reference):
    root, ckpt, ref = reference
    tp2 = str(root / "saved_at_tp2")
    spawn(_check_layout, 2, ckpt, ref, 2, 1, tp2)
    spawn(_check_layout, 1, tp2, ref, 1, 1)
    spawn(_check_layout, 2, tp2, ref, 1, 2)


def test_rank_before_the_group_exists_comes_from_the_launcher(monkeypatch):
    """Under torchrun, rank-0-only work done before ``initialize`` (a search writing its config)
    must stay on rank 0: rank 1 once wrote the same file concurrently and the rename failed."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert parallel.rank() == 1 and not parallel.is_rank0()
    with pytest.raises(RuntimeError, match="before the process group exists"):
        parallel.broadcast_object("x")
    monkeypatch.setenv("RANK", "0")
    assert parallel.is_rank0()
