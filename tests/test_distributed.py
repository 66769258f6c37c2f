"""Training in several processes: data sharding by rank, and one step of 2 gloo ranks on CPU
against the same global batch in one process."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import data
import train
from conftest import TINY_FLAGS
from momentum import EMATeacher, FeatureQueue


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -----------------------------------------------------------------------------
# data sharding

def rank_windows(dataset_size, batch_size, accum, rank, world_size, position, steps):
    """Return the dataset indices of each step's micro-batches on one rank, from a data position."""
    sampler = train.EpochBatchSampler(dataset_size, batch_size, seed=5, rank=rank, world_size=world_size,
                                      block=accum)
    loader = torch.utils.data.DataLoader(list(range(dataset_size)), batch_sampler=sampler)
    batches = train.endless(loader, dict(position))
    return [[next(batches).tolist() for _ in range(accum)] for _ in range(steps)]


def global_windows(dataset_size, batch_size, accum, world_size, position, steps):
    """Concatenate the ranks' micro-batches of each step, rank 0's first."""
    per_rank = [rank_windows(dataset_size, batch_size, accum, rank, world_size, position, steps)
                for rank in range(world_size)]
    return [sum((windows[step] for windows in per_rank), []) for step in range(steps)]


@pytest.mark.parametrize("world_size, accum", [(2, 3), (3, 1), (2, 2)])
def test_sharded_windows_match_one_process(world_size, accum):
    # 19 micro-batches of 5 per epoch, so windows of accum * world_size span epochs
    size, batch, steps = 96, 5, 9
    sharded = global_windows(size, batch, accum, world_size, {"epoch": 0, "batch": 0}, steps)
    single = rank_windows(size, batch, accum * world_size, 0, 1, {"epoch": 0, "batch": 0}, steps)
    assert sharded == single


def test_sharded_resume_continues_stream():
    size, batch, accum, world_size, steps = 96, 5, 3, 2, 7
    straight = global_windows(size, batch, accum, world_size, {"epoch": 0, "batch": 0}, steps)
    position = {"epoch": 0, "batch": 0}
    for _ in range(4):
        train.advance_position(position, accum * world_size, size // batch)
    assert position == {"epoch": 1, "batch": 5}
    resumed = global_windows(size, batch, accum, world_size, position, steps - 4)
    assert resumed == straight[4:]


# -----------------------------------------------------------------------------
# two gloo ranks against one process

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def install_recorders(patch, record: dict) -> None:
    """Record each step's gradients before clipping, the teacher after each EMA update and the
    queues after each enqueue. Turn off random augmentation, whose crops come from each rank's own
    generator and could not match one process's."""
    clip_grad_norm = torch.nn.utils.clip_grad_norm_
    update = EMATeacher.update
    enqueue = FeatureQueue.enqueue
    transform_init = data.ImageTransform.__init__

    def record_gradients(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        record.setdefault("gradients", []).append([p.grad.clone() for p in parameters])
        return clip_grad_norm(parameters, max_norm, *args, **kwargs)

    def record_teacher(self, student):
        update(self, student)
        record.setdefault("teacher", []).append({k: v.clone() for k, v in self.state_dict().items()})

    def record_queue(self, features, groups):
        enqueue(self, features, groups)
        record.setdefault("queues", []).append({k: v.clone() for k, v in self.state_dict().items()})

    def eval_transform(self, image_size, channels, train=False):
        transform_init(self, image_size, channels, False)

    patch(torch.nn.utils, "clip_grad_norm_", record_gradients)
    patch(EMATeacher, "update", record_teacher)
    patch(FeatureQueue, "enqueue", record_queue)
    patch(data.ImageTransform, "__init__", eval_transform)


def train_rank(rank: int, world_size: int, port: int, argv: list[str], record_dir: str) -> None:
    """Run train.main as one rank of a gloo group on 127.0.0.1, and save what it recorded."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    record = {}
    install_recorders(setattr, record)
    train.main(argv)
    torch.save(record, os.path.join(record_dir, f"rank{rank}.pt"))


def assert_all_close(actual, expected, where):
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if isinstance(a, dict):
            assert a.keys() == e.keys(), f"{where}[{i}]: keys differ"
            for key in a:
                torch.testing.assert_close(a[key], e[key], rtol=1e-4, atol=1e-6, msg=f"{where}[{i}].{key}")
        elif isinstance(a, list):
            assert_all_close(a, e, f"{where}[{i}]")
        else:
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6, msg=f"{where}[{i}]")


def test_two_ranks_match_one_process(tmp_path, tiny_synthetic, monkeypatch):
    """2 ranks x K=2 x B=4 take the steps of 1 process x K=4 x B=4: the rank-major window is its window."""
    common = ["--data", f"synthetic:{tiny_synthetic}", *TINY_FLAGS, "--batch-size", "4", "--steps", "2",
              "--eval-every", "2", "--alpha-ramp-steps", "0", "--seed", "3"]
    single = {}
    install_recorders(monkeypatch.setattr, single)
    train.main([*common, "--accum", "4", "--out", str(tmp_path / "single")])
    tokenizer = str(tmp_path / "single" / "tokenizer.json")  # WordPiece training is not deterministic

    argv = [*common, "--accum", "2", "--out", str(tmp_path / "ddp"), "--tokenizer", tokenizer]
    mp.spawn(train_rank, args=(2, free_port(), argv, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]

    for rank, record in enumerate(ranks):
        assert len(record["gradients"]) == 2
        assert_all_close(record["gradients"], single["gradients"], f"rank {rank} gradients")
        assert_all_close(record["teacher"], single["teacher"], f"rank {rank} teacher")
        assert_all_close(record["queues"], single["queues"], f"rank {rank} queues")
    for before, after in zip(ranks[0]["teacher"], ranks[1]["teacher"], strict=True):
        for key in before:
            assert torch.equal(before[key], after[key]), f"teacher {key} differs between ranks"

    expected = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=True)
    actual = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert actual["model"].keys() == expected["model"].keys()  # no "module." prefix
    assert_all_close([actual["model"]], [expected["model"]], "student")
    assert actual["data_position"] == expected["data_position"]
    assert len(actual["rng_by_rank"]) == 2

    single_rows = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    ddp_rows = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in ddp_rows] == [1, 2]
    for single_row, ddp_row in zip(single_rows, ddp_rows, strict=True):
        assert ddp_row["loss"] == pytest.approx(single_row["loss"], rel=1e-5)
