"""Pretrain an image-text model with momentum self-distillation (MSD) and exact gradient accumulation.

    python train.py --accum 8                                  # embedded synthetic chest X-rays
    python train.py --accum 8 --data medpix:path/to/medpix-2.0 --out runs/medpix
    python train.py --accum 8 --method clip                    # baseline: naive in-batch accumulation
    python train.py --accum 8 --resume                         # continue runs/default after a stop

One optimizer step is one window of K = --accum micro-batches of B = --batch-size pairs:
  1. the EMA teacher encodes all K micro-batches first (no gradients): the window's K*B keys;
  2. each micro-batch's student queries are contrasted with all K*B keys plus the queue, and
     `(1 - alpha) * InfoNCE + alpha * KL(teacher || student)` is back-propagated, divided by K;
  3. then: clip, optimizer step, clamp the temperature, EMA update, enqueue the keys, once.
Because the keys carry no gradient, the K micro-batch losses add up to the loss of one batch of
K*B, so the gradient is that of the large batch while the student's activation memory is that of B.
"""

import argparse
import ctypes
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import resource
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tokenizers import Tokenizer
from tqdm import tqdm

from data import PairDataset, load_tokenizer, open_source, train_tokenizer
from evaluate import embed_pairs, retrieval_metrics
from loss import clip_loss, msd_loss
from model import ImageTextModel, ModelConfig
from momentum import EMATeacher, FeatureQueue


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=None,
                   help="dataset as FORMAT:PATH (medpix, iu_xray, openi, mimic_cxr, roco, manifest, "
                        "synthetic) or a PATH whose format is detected; a manifest's columns can be named "
                        "as manifest:FILE?image=COL&text=COL&group=COL. Default: the embedded synthetic "
                        "chest X-ray set, generated on first use")
    g.add_argument("--out", default="runs/default", help="folder for checkpoint, tokenizer and metrics (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=64, help="input image side in pixels (default: %(default)s)")
    g.add_argument("--channels", type=int, default=1, choices=[1, 3], help="1 = grey, 3 = RGB (default: %(default)s)")
    g.add_argument("--max-len", type=int, default=64, help="text length in tokens, [CLS] and [SEP] included (default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=4000, help="WordPiece vocabulary size, trained on the training texts (default: %(default)s)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="reuse this tokenizer.json instead of training one on the training texts, e.g. to "
                        "compare runs on identical token ids (default: train a new one)")
    g.add_argument("--workers", type=int, default=0,
                   help="data loader processes; 0 loads in the training process, which is fastest on a "
                        "2-core CPU because images are already decoded into memory and only cropped per "
                        "step. A resumed run repeats "
                        "the random crops of an uninterrupted one only with 0 (default: %(default)s)")
    g.add_argument("--strict", action="store_true",
                   help="stop with an error at the first manifest row or image that would be skipped "
                        "(missing or undecodable image, empty text, duplicate, path outside the "
                        "manifest's folder) instead of skipping it with a logged count")

    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["msd", "clip"], default="msd",
                   help="msd: momentum keys, queue and KL distillation; clip: in-batch InfoNCE with "
                        "naive accumulation, the baseline (default: %(default)s)")
    g.add_argument("--accum", type=int, default=1,
                   help="micro-batches per optimizer step (K); effective batch = K x batch size (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="pairs per micro-batch (B) (default: %(default)s)")
    g.add_argument("--queue-size", type=int, default=1024,
                   help="teacher features kept per queue as extra negatives, in pairs; 0 disables the "
                        "queue (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.995,
                   help="EMA momentum m of the teacher: theta_t <- m theta_t + (1 - m) theta_s, once per "
                        "optimizer step (default: %(default)s)")
    g.add_argument("--momentum-warmup", action=argparse.BooleanOptionalAction, default=False,
                   help="use momentum min(m, (1 + n) / (10 + n)) at the n-th update, so the teacher of a "
                        "model trained from scratch follows it closely at first (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=0.4,
                   help="weight of the KL distillation term, 0 = momentum keys without distillation (default: %(default)s)")
    g.add_argument("--alpha-ramp-steps", type=int, default=200,
                   help="optimizer steps over which alpha rises linearly from 0, while the teacher is "
                        "still poor (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.07, help="initial temperature of the softmax (default: %(default)s)")
    g.add_argument("--min-temperature", type=float, default=0.01,
                   help="lower clamp on the learned temperature, applied after each optimizer step (default: %(default)s)")
    g.add_argument("--max-temperature", type=float, default=0.5, help="upper clamp on the temperature (default: %(default)s)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=500, help="optimizer steps (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of AdamW (default: %(default)s)")
    g.add_argument("--min-lr", type=float, default=1e-5, help="learning rate at the end of the cosine decay (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=20, help="optimizer steps of linear learning-rate warm-up (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay on weight matrices only; biases, norms, embeddings and the "
                        "temperature are not decayed (default: %(default)s)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm, 0 = no clipping (default: %(default)s)")
    g.add_argument("--skip-nonfinite", action="store_true",
                   help="skip an optimizer step whose loss or gradient norm is NaN or infinite (no "
                        "update, EMA or enqueue) with a warning, instead of stopping the run")

    g = p.add_argument_group("model size")
    g.add_argument("--patch-size", type=int, default=8, help="ViT patch side in pixels (default: %(default)s)")
    g.add_argument("--width", type=int, default=128, help="transformer width of both encoders (default: %(default)s)")
    g.add_argument("--depth", type=int, default=2, help="transformer blocks per encoder (default: %(default)s)")
    g.add_argument("--heads", type=int, default=4, help="attention heads per block (default: %(default)s)")
    g.add_argument("--embed-dim", type=int, default=128, help="size of the joint embedding space (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout of the student; the teacher never uses it (default: %(default)s)")

    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=100, help="optimizer steps between validation retrieval scores and checkpoints (default: %(default)s)")
    g.add_argument("--keep", type=int, default=3,
                   help="newest numbered checkpoints kept in --out, besides checkpoint.pt and "
                        "checkpoint_best.pt (default: %(default)s)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue the run saved in checkpoint PATH; without PATH, the latest checkpoint "
                        "in --out, or a new run when --out has none")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of every random generator; the tokenizer's training cannot be seeded, so pass "
                        "--tokenizer too for identical runs (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast dtype of the encoders; auto = bf16 on CUDA, fp32 on CPU. Master weights, "
                        "logits, softmax and loss are always fp32 (default: %(default)s)")
    g.add_argument("--compile", action="store_true",
                   help="compile the student and teacher with torch.compile. Steps get faster after a "
                        "compilation that took 25-50 s on a 2-core CPU, so it pays off in long runs only")
    args = p.parse_args(argv)
    validate_args(p, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject settings that cannot train, before any data is read."""
    checks = [
        (args.accum >= 1, f"--accum must be >= 1, got {args.accum}"),
        (args.batch_size >= 2, f"--batch-size must be >= 2 (a contrastive loss needs negatives), got {args.batch_size}"),
        (0.0 <= args.momentum <= 1.0, f"--momentum must be in [0, 1], got {args.momentum}"),
        (0.0 <= args.alpha <= 1.0, f"--alpha must be in [0, 1], got {args.alpha}"),
        (args.queue_size >= 0, f"--queue-size must be >= 0, got {args.queue_size}"),
        (0 < args.min_temperature <= args.temperature <= args.max_temperature,
         f"temperatures must satisfy 0 < --min-temperature <= --temperature <= --max-temperature, got "
         f"{args.min_temperature}, {args.temperature}, {args.max_temperature}"),
        (args.steps >= 1, f"--steps must be >= 1, got {args.steps}"),
        (args.eval_every >= 1, f"--eval-every must be >= 1, got {args.eval_every}"),
        (args.keep >= 1, f"--keep must be >= 1, got {args.keep}"),
        (args.workers >= 0, f"--workers must be >= 0, got {args.workers}"),
        (args.image_size % args.patch_size == 0,
         f"--image-size {args.image_size} must be a multiple of --patch-size {args.patch_size}"),
        (args.width % args.heads == 0, f"--width {args.width} must be divisible by --heads {args.heads}"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)


# -----------------------------------------------------------------------------
# schedules, counted in optimizer steps (never in micro-batches)

def learning_rate(step: int, args) -> float:
    """Linear warm-up to --lr, then cosine decay to --min-lr at the last step."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def alpha_at(step: int, args) -> float:
    """Linear ramp of the distillation weight from 0 to --alpha over --alpha-ramp-steps."""
    if args.alpha_ramp_steps <= 0:
        return args.alpha
    return args.alpha * min(1.0, step / args.alpha_ramp_steps)


# -----------------------------------------------------------------------------
# setup helpers

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """Return the --device to run on; exit with a message for an invalid or unavailable one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        sys.exit(f"error: invalid --device {name!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name} requested, but this PyTorch build sees no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        sys.exit(f"error: --device {name} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for the encoders, or nothing; the loss casts its inputs back to fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def model_config(args, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        image_size=args.image_size, patch_size=args.patch_size, channels=args.channels,
        vision_width=args.width, vision_depth=args.depth, vision_heads=args.heads,
        vocab_size=vocab_size, max_len=args.max_len,
        text_width=args.width, text_depth=args.depth, text_heads=args.heads,
        embed_dim=args.embed_dim, dropout=args.dropout, temperature=args.temperature,
    )


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (ndim >= 2) except embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_embedding = "embed" in name or "cls_token" in name
        (decay if param.ndim >= 2 and not is_embedding else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def reset_peak_memory(device: torch.device) -> float:
    """Start measuring peak memory from now and return the memory in use now, in MiB.

    On CUDA the peak and the return value count CUDA tensors. On CPU they are the process's RSS,
    and outside Linux the peak cannot be reset, so it includes the set-up and the return value is 0.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        # glibc keeps memory that the set-up freed; hand it back, so that it does not count as in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc
    try:
        # Linux 4.0 and later: writing 5 to clear_refs resets VmHWM to the current RSS (man 5 proc)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return read_proc_status("VmRSS:")
    except OSError:
        return 0.0


def read_proc_status(field: str) -> float:
    """Return a memory field of /proc/self/status, such as "VmRSS:", in MiB. Raises OSError outside Linux."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024  # the file gives kB
    raise OSError(f"{field} not found in /proc/self/status")


def peak_memory_mb(device: torch.device) -> float:
    """Return the peak memory since reset_peak_memory in MiB: CUDA tensors on CUDA, else the process's RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return read_proc_status("VmHWM:")
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def trim_padding(batch: dict) -> dict:
    """Cut the text columns that are padding in every row, so short reports cost less compute."""
    length = int(batch["attention_mask"].sum(dim=1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :length], "attention_mask": batch["attention_mask"][:, :length]}


def load_data(args, tokenizer: Tokenizer | None):
    """Open the dataset and build the train and val sets, training a tokenizer unless one is given.

    Returns (source, tokenizer, tokenizer JSON, train set, val set). Exits with the error before
    training starts when the data cannot be read or cannot train a contrastive model.
    """
    try:
        source = open_source(args.data, strict=args.strict)
        train_pairs, val_pairs = source.pairs("train"), source.pairs("val")
        if tokenizer is None:
            tokenizer = train_tokenizer([pair.text for pair in train_pairs], vocab_size=args.vocab_size)
        tokenizer_json = tokenizer.to_str(pretty=True)  # before tokenize() sets padding and truncation
        data_kwargs = dict(tokenizer=tokenizer, image_size=args.image_size, channels=args.channels,
                           max_len=args.max_len, strict=args.strict)
        train_set = PairDataset(train_pairs, train=True, **data_kwargs)
        val_set = PairDataset(val_pairs, train=False, **data_kwargs)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    if len(train_set) < args.batch_size:
        sys.exit(f"error: the training split of {source.name} has {len(train_set)} usable pairs, fewer than "
                 f"--batch-size {args.batch_size}; contrastive training needs at least 2 pairs per "
                 f"micro-batch, so add pairs or lower --batch-size")
    if len(train_set.group_names) < 2:
        sys.exit(f"error: all {len(train_set)} training pairs of {source.name} share one group (identical "
                 f"texts), so no pair has a negative to contrast with; add pairs with other texts")
    return source, tokenizer, tokenizer_json, train_set, val_set


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# data order: a pure function of (seed, epoch), so a checkpoint can store its position

class EpochBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of dataset indices, reshuffled every epoch, with the last partial batch dropped.

    The order of an epoch depends only on the seed and the epoch number. A resumed run sets epoch
    and start (the micro-batches of the epoch already used), so it draws exactly the batches that
    the stopped run would have drawn next.

    With world_size > 1 every rank computes the same order and keeps only its share. The
    micro-batches, read as one stream across epochs, form windows of block * world_size, and rank r
    takes the r-th run of `block` micro-batches of each window. Rank 0's micro-batches of a window,
    then rank 1's and so on, are thus the window of one process with block * world_size. phase is
    the number of micro-batches of the current window that come before `start`.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 block: int = 1):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.block = block
        self.epoch = 0
        self.start = 0
        self.phase = 0

    def batches_per_epoch(self) -> int:
        return self.dataset_size // self.batch_size

    def rank_batches(self) -> list[int]:
        """Return the numbers of this rank's micro-batches in the epoch, from start on."""
        window = self.block * self.world_size
        return [batch for batch in range(self.start, self.batches_per_epoch())
                if (self.phase + batch - self.start) % window // self.block == self.rank]

    def __len__(self) -> int:
        return len(self.rank_batches())

    def __iter__(self):
        # distinct for every (seed, epoch) with seed >= 0 and epoch < 1_000_003
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        for batch in self.rank_batches():
            yield order[batch * self.batch_size:(batch + 1) * self.batch_size]


def endless(loader, position: dict):
    """Yield this rank's micro-batches forever, starting at position {"epoch", "batch"}.

    position must be the start of a window, and it is read once. Windows may span epochs.
    """
    sampler = loader.batch_sampler
    window = sampler.block * sampler.world_size
    epoch, start, phase = position["epoch"], position["batch"], 0
    while True:
        sampler.epoch, sampler.start, sampler.phase = epoch, start, phase
        yield from loader
        phase = (phase + sampler.batches_per_epoch() - start) % window
        epoch, start = epoch + 1, 0


def advance_position(position: dict, micro_batches: int, per_epoch: int) -> None:
    """Move the data position {"epoch", "batch"} on by micro_batches, counted over all ranks."""
    batch = position["batch"] + micro_batches
    position["epoch"] += batch // per_epoch
    position["batch"] = batch % per_epoch


def ignore_stop_signals(worker_id: int) -> None:
    """Let DataLoader workers ignore Ctrl-C and SIGTERM: the training process handles them, and
    the workers end with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# -----------------------------------------------------------------------------
# random generators, captured as tensors and plain lists

def rng_states(loader_rng: torch.Generator, device: torch.device) -> dict:
    """Capture the state of every random generator the run draws from."""
    version, mersenne_twister, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": numpy_state["state"]["key"].tolist(), "pos": numpy_state["state"]["pos"]}
    return {
        "python": [version, list(mersenne_twister), gauss_next],
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),  # augmentation (with --workers 0) and dropout
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "loader": loader_rng.get_state(),  # seeds the DataLoader workers
    }


def restore_rng_states(states: dict, loader_rng: torch.Generator, device: torch.device) -> None:
    version, mersenne_twister, gauss_next = states["python"]
    random.setstate((version, tuple(mersenne_twister), gauss_next))
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {"key": np.array(numpy_state["state"]["key"], dtype=np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    loader_rng.set_state(states["loader"])


# -----------------------------------------------------------------------------
# checkpoints
#
# Every save writes checkpoint_stepNNNNNN.pt and makes checkpoint.pt (and checkpoint_best.pt,
# when validation improves) hard links to it, so the aliases cost no space. A checkpoint holds
# only tensors, numbers, strings, lists and dicts, and is loaded with weights_only=True, so
# loading one never runs code from the file.

LATEST_CHECKPOINT = "checkpoint.pt"
BEST_CHECKPOINT = "checkpoint_best.pt"
STEP_CHECKPOINT = re.compile(r"checkpoint_step(\d+)\.pt")
RESUME_KEYS = ("model", "teacher", "image_queue", "text_queue", "optimizer", "step", "data_position",
               "rng", "args", "model_config", "tokenizer", "train_pairs", "val", "best_step", "best_recall",
               "skipped_steps")

# ModelConfig fields and the flags that set them, for messages about a mismatched checkpoint
CONFIG_FLAGS = {
    "image_size": "--image-size", "patch_size": "--patch-size", "channels": "--channels",
    "vision_width": "--width", "vision_depth": "--depth", "vision_heads": "--heads",
    "text_width": "--width", "text_depth": "--depth", "text_heads": "--heads",
    "max_len": "--max-len", "embed_dim": "--embed-dim", "dropout": "--dropout",
    "temperature": "--temperature", "vocab_size": "--vocab-size",
}
# other settings that a resumed run must share with its checkpoint: they fix the shapes of
# the saved state or the meaning of its data position
RESUME_FIXED_ARGS = ("data", "method", "batch_size", "queue_size", "vocab_size", "seed")


def validation_recall(scores: dict[str, float]) -> float:
    """Return the mean of image-to-text and text-to-image R@10, the score that picks checkpoint_best.pt."""
    return (scores["i2t_R@10"] + scores["t2i_R@10"]) / 2


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill during the save leaves the previous checkpoint intact."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def link_checkpoint(source: Path, alias: Path, state: dict) -> None:
    """Replace `alias` atomically by a hard link to `source`, or by a new copy of `state` where the
    file system has no hard links."""
    tmp = alias.with_suffix(alias.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links
        save_checkpoint(alias, state)
        return
    os.replace(tmp, alias)


def step_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Return (step, path) of the numbered checkpoints in `out`, oldest first."""
    found = [(int(match[1]), path) for path in out.glob("checkpoint_step*.pt")
             if (match := STEP_CHECKPOINT.fullmatch(path.name))]
    return sorted(found)


def save_checkpoints(out: Path, state: dict, keep: int, best: bool) -> None:
    """Write the numbered checkpoint of state["step"], point the aliases at it, and keep the newest `keep`.

    Numbered checkpoints of later steps, left by an earlier run in the same folder, are not deleted.
    """
    path = out / f"checkpoint_step{state['step']:06d}.pt"
    save_checkpoint(path, state)
    link_checkpoint(path, out / LATEST_CHECKPOINT, state)
    if best:
        link_checkpoint(path, out / BEST_CHECKPOINT, state)
    older = [old for step, old in step_checkpoints(out) if step <= state["step"]]
    for old in older[:-keep]:
        old.unlink()


def describe_checkpoints(out: Path, step: int, best_step: int | None, best_recall: float | None) -> str:
    names = [f"{LATEST_CHECKPOINT} (latest, step {step})"]
    if best_step is not None:
        names.append(f"{BEST_CHECKPOINT} (step {best_step}, best mean of i2t and t2i R@10: {best_recall:.1f})")
    names += [path.name for _, path in step_checkpoints(out)]
    return f"checkpoints in {out}: " + ", ".join(names)


def find_resume_checkpoint(resume: str | None, out: Path) -> Path | None:
    """Return the checkpoint that --resume names, or None for a new run.

    --resume PATH must exist (a folder means its checkpoint.pt). --resume alone takes
    checkpoint.pt in --out, else the newest numbered one, and starts a new run when there is
    none, so that one command line both starts a run and continues it after a stop.
    """
    if resume is None:
        return None
    if resume:
        path = Path(resume)
        path = path / LATEST_CHECKPOINT if path.is_dir() else path
        if not path.is_file():
            sys.exit(f"error: --resume {resume}: checkpoint {path} not found")
        return path
    if (out / LATEST_CHECKPOINT).is_file():
        return out / LATEST_CHECKPOINT
    numbered = step_checkpoints(out)
    if numbered:
        return numbered[-1][1]
    print(f"note: no checkpoint in {out} to resume; starting a new run")
    return None


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by this script for resuming. Exits with an error for any other file.

    weights_only=True makes torch.load build only tensors and plain containers, so a file that
    names any other class or function is rejected before anything in it runs.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = re.search(r"WeightsUnpickler error: (.*?\.)(?: |$)", str(error), re.MULTILINE)
        detail = reason[1] if reason else str(error).splitlines()[0]
        sys.exit(f"error: rejected {path}: it holds more than tensors and plain data ({detail}), and "
                 f"train.py never runs code from a checkpoint. Use a checkpoint that train.py wrote")
    except (RuntimeError, EOFError, OSError) as error:
        sys.exit(f"error: cannot read checkpoint {path}: {str(error).splitlines()[0]}")
    missing = [key for key in RESUME_KEYS if key not in checkpoint] if isinstance(checkpoint, dict) else RESUME_KEYS
    if missing:
        sys.exit(f"error: {path} lacks {', '.join(missing)}; it was not written by this version of "
                 f"train.py and cannot be resumed")
    return checkpoint


def resume_tokenizer(checkpoint: dict, path: Path) -> Tokenizer:
    """Return the checkpoint's tokenizer. Exits if the tokenizer.json beside the checkpoint differs."""
    beside = path.parent / "tokenizer.json"
    if beside.is_file():
        def vocabulary_and_rules(text: str) -> dict:
            # padding and truncation are set at tokenisation time, not by training
            return {k: v for k, v in json.loads(text).items() if k not in ("padding", "truncation")}
        try:
            same = vocabulary_and_rules(beside.read_text()) == vocabulary_and_rules(checkpoint["tokenizer"])
        except ValueError:  # not JSON
            same = False
        if not same:
            sys.exit(f"error: {beside} differs from the tokenizer stored in {path}, so the checkpoint's token "
                     f"ids would not match it; restore that tokenizer.json or resume from another checkpoint")
    return Tokenizer.from_str(checkpoint["tokenizer"])


def check_resume_settings(checkpoint: dict, path: Path, args, cfg: ModelConfig) -> None:
    """Exit with an error that names each setting the saved state depends on and that differs from
    the checkpoint's run. Print a note that lists the other changed flags."""
    saved_args = checkpoint["args"]
    errors = {}
    for field, saved in checkpoint["model_config"].items():
        flag = CONFIG_FLAGS.get(field, field)
        current = getattr(cfg, field, None)
        if current != saved:
            errors.setdefault(flag, f"{flag}: checkpoint {saved}, this run {current}")
    for name in RESUME_FIXED_ARGS:
        flag = "--" + name.replace("_", "-")
        if saved_args.get(name) != getattr(args, name):
            errors.setdefault(flag, f"{flag}: checkpoint {saved_args.get(name)}, this run {getattr(args, name)}")
    if errors:
        sys.exit(f"error: cannot resume from {path}, which was trained with other settings: " +
                 "; ".join(errors.values()) + ". Use the checkpoint's settings, or a new --out for a new run")
    changed = [f"--{name.replace('_', '-')} {value} (checkpoint {saved_args.get(name)})"
               for name, value in vars(args).items() if name != "resume" and saved_args.get(name) != value]
    if changed:
        print("note: resuming with changed settings: " + ", ".join(changed))


def restore_training_state(checkpoint: dict, stateful: dict, train_pairs: int, loader_rng, device) -> None:
    """Check that the training split has the checkpoint's size, then load the saved state of every
    module and the optimizer, and of every random generator."""
    if checkpoint["train_pairs"] != train_pairs:
        sys.exit(f"error: the training split has {train_pairs} usable pairs, but the checkpoint's run had "
                 f"{checkpoint['train_pairs']}; resume with the same --data")
    for name, module in stateful.items():
        if module is not None:
            module.load_state_dict(checkpoint[name])
    restore_rng_states(checkpoint["rng"], loader_rng, device)


def open_metrics(path: Path, resume_step: int | None):
    """Open metrics.jsonl, as a new file for a new run or for appending on resume.

    On resume it first drops the rows of the steps after resume_step, which the run repeats,
    and any row cut short by a kill.
    """
    if resume_step is None:
        return open(path, "w")
    kept = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= resume_step:
            kept.append(line + "\n")
    write_text_atomically(path, "".join(kept))
    return open(path, "a")


# -----------------------------------------------------------------------------
# stopping: signals and non-finite values

class StopSignal:
    """Turn the first SIGINT (Ctrl-C) or SIGTERM into a request, read by the loop, to save and exit.

    A second signal takes its usual effect at once: SIGINT raises KeyboardInterrupt and SIGTERM
    ends the process. Outside the main thread Python cannot install handlers, so none are.
    """

    def __init__(self):
        self.signum = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.signum = signum
        # print could fail with a reentrant call if the loop is printing, so write to stderr directly
        os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this optimizer "
                    f"step, then stopping; send it again to stop at once\n".encode())

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}


def describe_nonfinite(terms: dict[str, float], grad_norm: float) -> str:
    """Describe a non-finite loss or gradient norm with every loss term, or return "" if all are finite."""
    if all(math.isfinite(value) for value in [*terms.values(), grad_norm]):
        return ""
    what = "gradient norm" if all(math.isfinite(value) for value in terms.values()) else "loss"
    values = ", ".join(f"{name}={value:.4g}" for name, value in {**terms, "grad_norm": grad_norm}.items())
    return f"non-finite {what} ({values})"


@torch.no_grad()
def encode_window(teacher: EMATeacher, window: list[dict], amp) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher features of every micro-batch of the window, one micro-batch at a time: (K*B, D) each."""
    image_keys, text_keys = [], []
    for mb in window:
        with amp:
            image_features, text_features = teacher(mb["image"], mb["input_ids"], mb["attention_mask"])
        image_keys.append(image_features.float())
        text_keys.append(text_features.float())
    return torch.cat(image_keys), torch.cat(text_keys)


def validate(model, pairs_loader, device, amp) -> dict[str, float]:
    image_features, text_features, groups = embed_pairs(model, pairs_loader, device, amp)
    return retrieval_metrics(image_features @ text_features.T, groups)


# -----------------------------------------------------------------------------
# several processes, one per GPU or CPU share, as torchrun starts them (WORLD_SIZE > 1)

def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """Join the process group that torchrun describes in the environment, if any.

    Returns (rank, world size, device). NCCL on CUDA, where each process takes GPU LOCAL_RANK
    whatever --device names; gloo on CPU. A single process gets (0, 1, --device) and no group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def describe_batch(K: int, B: int, world_size: int) -> str:
    if world_size == 1:
        return f"{K} x {B} = {K * B}"
    return f"{world_size} ranks x {K} x {B} = {world_size * K * B}"


def broadcast_from_rank0(value):
    """Return rank 0's value on every rank; any picklable object."""
    values = [value]
    dist.broadcast_object_list(values, src=0)
    return values[0]


def gather_from_ranks(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, rank 0's rows first. No gradient flows back."""
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def average_over_ranks(values: dict[str, torch.Tensor], world_size: int) -> dict[str, torch.Tensor]:
    """Average scalar tensors over ranks, so that every rank logs and checks the global values."""
    if world_size == 1:
        return values
    stacked = torch.stack(list(values.values()))
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / world_size))


def any_rank(flag: bool, world_size: int, device: torch.device) -> bool:
    """Return True on every rank when the flag is True on at least one, so all ranks take one branch."""
    if world_size == 1:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_rng_states(loader_rng: torch.Generator, device: torch.device, world_size: int) -> list[dict]:
    """Return the random generator states of every rank, rank 0's first."""
    states = rng_states(loader_rng, device)
    if world_size == 1:
        return [states]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, states)
    return gathered


def restore_rank_rng(checkpoint: dict, rank: int, seed: int, loader_rng: torch.Generator, device) -> None:
    """Restore the random generators of a rank other than 0 from the checkpoint's per-rank states.

    A checkpoint of a run with fewer ranks has no state for this rank, which then re-seeds
    from seed + rank, so its augmentation stream restarts rather than continues.
    """
    states = checkpoint.get("rng_by_rank", [])
    if rank < len(states):
        restore_rng_states(states[rank], loader_rng, device)
        return
    print(f"note: rank {rank}: the checkpoint has no random generator state for this rank; "
          f"re-seeding from --seed + rank = {seed + rank}")
    seed_everything(seed + rank)
    loader_rng.manual_seed(seed + rank)


# -----------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = get_args(argv)
    seed_everything(args.seed)  # the same on every rank, so every rank builds the same initial weights
    rank, world_size, device = init_distributed(args.device)
    is_main = rank == 0  # only rank 0 prints, validates and writes files
    amp = autocast_context(device, args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    K, B = args.accum, args.batch_size  # per rank: one optimizer step takes K * B * world_size pairs

    # resume: the checkpoint to continue from, checked against this run's settings before data is read
    resume_path = find_resume_checkpoint(args.resume, out)
    checkpoint = load_checkpoint(resume_path) if resume_path else None
    tokenizer = resume_tokenizer(checkpoint, resume_path) if checkpoint else None
    if tokenizer is None and args.tokenizer:
        try:
            tokenizer = load_tokenizer(Path(args.tokenizer))
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"error: --tokenizer: {error}")
    if checkpoint:
        check_resume_settings(checkpoint, resume_path, args, model_config(args, tokenizer.get_vocab_size()))

    # data: tokenizer trained on the training texts (or the checkpoint's), every text tokenised once
    # With several ranks, rank 0 trains the tokenizer and sends it to the others. WordPiece training
    # breaks ties in hash-map order, so ranks that trained their own could get other token ids
    share_tokenizer = world_size > 1 and tokenizer is None
    if share_tokenizer and not is_main:
        tokenizer = Tokenizer.from_str(broadcast_from_rank0(None))  # waits until rank 0 has trained it
    source, tokenizer, tokenizer_json, train_set, val_set = load_data(args, tokenizer)
    if share_tokenizer and is_main:
        broadcast_from_rank0(tokenizer_json)
    if is_main:
        write_text_atomically(out / "tokenizer.json", tokenizer_json)
    # every rank takes its own K micro-batches of each global window of K * world_size
    sampler = EpochBatchSampler(len(train_set), B, args.seed, rank, world_size, block=K)
    # seeds the workers, while the sampler fixes the order
    loader_rng = torch.Generator().manual_seed(args.seed + rank)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, generator=loader_rng, worker_init_fn=ignore_stop_signals,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    # its own generator, so that validation draws nothing from the global RNG that augmentation uses
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=args.workers,
                                             generator=torch.Generator(), worker_init_fn=ignore_stop_signals)

    # model: the student, its EMA teacher and the two queues of teacher features
    cfg = model_config(args, tokenizer.get_vocab_size())
    model = ImageTextModel(cfg).to(device)
    # the student's forward runs through DDP, which all-reduces the gradients in the backward; the
    # loop reads parameters, temperature and state dict from the unwrapped `model`
    student = model
    if world_size > 1:
        student = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, args)
    use_teacher = args.method == "msd"
    teacher = EMATeacher(model, args.momentum, args.momentum_warmup).to(device) if use_teacher else None
    image_queue = FeatureQueue(args.queue_size if use_teacher else 0, cfg.embed_dim).to(device)
    text_queue = FeatureQueue(args.queue_size if use_teacher else 0, cfg.embed_dim).to(device)
    if args.compile:
        # Speed only. Module.compile() compiles the forward in place, so parameter names, state dicts
        # and the EMA update see the plain modules.
        # NOTE: run on CPU in one process only; not yet run under DDP or on CUDA
        model.compile()
        if teacher is not None:
            teacher.compile()
    stateful = {"model": model, "teacher": teacher, "image_queue": image_queue, "text_queue": text_queue,
                "optimizer": optimizer}
    if rank > 0:
        seed_everything(args.seed + rank)  # its own stream of random crops and dropout
    counts = model.param_counts()
    if is_main:
        print(f"data: {source.name} at {source.root}, {len(train_set)} train / {len(val_set)} val pairs; "
              f"vocabulary {cfg.vocab_size}")
        print(f"model: {counts['total'] / 1e6:.2f}M parameters (image {counts['image'] / 1e6:.2f}M, "
              f"text {counts['text'] / 1e6:.2f}M); method {args.method}, effective batch {describe_batch(K, B, world_size)}, "
              f"queue {image_queue.size}, device {device}")
        print("config: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
        if K * B * world_size > len(train_set):
            print(f"note: a window of {K * B * world_size} pairs is larger than the {len(train_set)} training "
                  f"pairs, so pairs repeat within a window; lower --accum or --batch-size")
        if use_teacher and args.queue_size < K * B * world_size:
            print(f"note: --queue-size {args.queue_size} is smaller than a window of {K * B * world_size} keys, so each "
                  f"enqueue keeps only the newest {args.queue_size}")

    # resume: weights, teacher, queues, optimizer, data position and every random generator
    start_step, position, skipped_steps = 0, {"epoch": 0, "batch": 0}, 0
    best_step, best_recall, val_scores = None, None, {}
    if checkpoint:
        restore_training_state(checkpoint, stateful, len(train_set), loader_rng, device)
        if rank > 0:
            restore_rank_rng(checkpoint, rank, args.seed, loader_rng, device)
        start_step, position = checkpoint["step"], dict(checkpoint["data_position"])
        skipped_steps, val_scores = checkpoint["skipped_steps"], checkpoint["val"]
        best_step, best_recall = checkpoint["best_step"], checkpoint["best_recall"]
        if is_main:
            print(f"resumed from {resume_path} at step {start_step}")

    batches = endless(train_loader, position)
    if is_main:
        metrics_file = open_metrics(out / "metrics.jsonl", start_step if checkpoint else None)
    else:
        metrics_file = open(os.devnull, "w")  # so the loop writes its rows the same way on every rank
    stop = StopSignal()  # SIGINT or SIGTERM: save a checkpoint after the current step, then exit
    failure, stop_now = None, False
    step = start_step - 1  # the last finished step, if the loop has nothing to do
    # peak_memory_mb in metrics.jsonl is the training loop's peak, not the set-up's
    memory_at_start = reset_peak_memory(device)
    progress = tqdm(range(start_step, args.steps), desc=f"{args.method} K={K} B={B}", dynamic_ncols=True,
                    initial=start_step, total=args.steps, disable=not is_main)
    for step in progress:
        t0 = time.perf_counter()

        # schedules for this optimizer step
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        alpha = alpha_at(step, args) if use_teacher else 0.0

        # load the window: this rank's K micro-batches of the global window of K * world_size
        window = [{k: v.to(device, non_blocking=True) for k, v in trim_padding(next(batches)).items()}
                  for _ in range(K)]
        advance_position(position, K * world_size, sampler.batches_per_epoch())
        data_seconds = time.perf_counter() - t0  # waiting for the data, part of `seconds` below
        window_groups = torch.cat([mb["group"] for mb in window])  # (K*B,)

        # teacher encodes the whole window first: the keys every micro-batch is contrasted with
        if use_teacher:
            image_keys, text_keys = encode_window(teacher, window, amp)  # (K*B, D) each
            image_queue_snapshot, queue_groups = image_queue.contents()  # (Q, D), (Q,)
            text_queue_snapshot, _ = text_queue.contents()

        # all-gather the keys, so every rank contrasts with the global window of K*B*world_size keys in
        # rank-major order: rank 0's K*B keys, then rank 1's, ...; this rank's rows start at first_row
        if use_teacher:
            image_keys = gather_from_ranks(image_keys, world_size)  # (K*B*world_size, D)
            text_keys = gather_from_ranks(text_keys, world_size)
            window_groups = gather_from_ranks(window_groups, world_size)  # (K*B*world_size,)
        first_row = rank * K * B

        # student forward, loss and backward, one micro-batch at a time. DDP all-reduces the gradients
        # in the last micro-batch's backward only, and averages them over ranks. Each rank's loss is
        # the mean over its own K*B rows, so that average is the gradient of the mean over all
        # K*B*world_size rows of the global window, as for one large batch
        terms_sum: dict[str, torch.Tensor] = {}
        for j, mb in enumerate(window):
            sync = student.no_sync() if world_size > 1 and j < K - 1 else nullcontext()
            with sync:
                with amp:
                    image_queries, text_queries = student(mb["image"], mb["input_ids"], mb["attention_mask"])  # (B, D)
                if use_teacher:
                    rows = slice(first_row + j * B, first_row + (j + 1) * B)
                    terms = msd_loss(
                        image_queries, text_queries, image_keys[rows], text_keys[rows],
                        image_keys, text_keys, window_groups,
                        image_queue_snapshot, text_queue_snapshot, queue_groups,
                        mb["group"], torch.arange(rows.start, rows.stop, device=device),
                        model.logit_scale, alpha)
                else:
                    terms = clip_loss(image_queries, text_queries, mb["group"], model.logit_scale)
                (terms["loss"] / K).backward()
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / K
        terms_sum = average_over_ranks(terms_sum, world_size)  # the loss of the global window
        terms_sum = {name: value.item() for name, value in terms_sum.items()}  # one sync per step

        # stop, or skip this step, before a non-finite loss or gradient reaches the weights, teacher or queue.
        # All ranks take the same branch, because a rank that stepped alone would wait forever in a collective
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")).item()
        nonfinite = describe_nonfinite(terms_sum, grad_norm)
        if any_rank(bool(nonfinite), world_size, device) and not nonfinite:
            nonfinite = "non-finite gradient norm on another rank"
        if nonfinite and not args.skip_nonfinite:
            failure = (f"error: {nonfinite} at step {step + 1}; checkpoints of earlier steps are in {out}. Try "
                       f"a lower --lr or a higher --min-temperature, or pass --skip-nonfinite to skip such steps")
            break
        if nonfinite:
            skipped_steps += 1
            if is_main:
                progress.write(f"warning: skipped step {step + 1}: {nonfinite}")
            optimizer.zero_grad(set_to_none=True)

        # optimizer step: step, clamp the temperature, zero the gradients
        if not nonfinite:
            optimizer.step()
            model.clamp_temperature(args.min_temperature, args.max_temperature)
            optimizer.zero_grad(set_to_none=True)

        # EMA update of the teacher, once per optimizer step. It needs no communication, because after
        # the all-reduce every rank has the same student and so computes the same teacher
        if use_teacher and not nonfinite:
            teacher.update(model)

        # enqueue the global window's keys, once per optimizer step: the same queue on every rank
        if use_teacher and not nonfinite:
            image_queue.enqueue(image_keys, window_groups)
            text_queue.enqueue(text_keys, window_groups)

        # log. On CUDA, wait for the optimizer step and EMA update, which run after the last .item(),
        # so that `seconds` covers the whole step and the next step's data time starts on an idle device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        timing = {"seconds": seconds, "data_seconds": data_seconds, "pairs_per_sec": K * B * world_size / seconds,
                  "peak_memory_mb": peak_memory_mb(device), "start_memory_mb": memory_at_start}
        if nonfinite:
            row = {"step": step + 1, "lr": lr, "alpha": alpha, "skipped": nonfinite, **timing}  # keeps NaN out of the JSON
        else:
            row = {"step": step + 1, "lr": lr, "alpha": alpha, "temperature": model.temperature.item(),
                   "grad_norm": grad_norm, **timing, **terms_sum}
        progress.set_postfix(loss=f"{terms_sum['loss']:.3f}", nce=f"{terms_sum['infonce']:.3f}",
                             kl=f"{terms_sum['kl']:.3f}", alpha=f"{alpha:.2f}", T=f"{model.temperature.item():.3f}",
                             pairs_s=f"{K * B * world_size / seconds:.0f}", batch=K * B * world_size)

        # validate every --eval-every steps and at the end, on rank 0, tracking the best mean R@10 for checkpoint_best.pt
        evaluate_now = (step + 1) % args.eval_every == 0 or step + 1 == args.steps
        is_best = False
        if evaluate_now and is_main:
            val_scores = validate(model, val_loader, device, amp)
            row["val"] = val_scores
            is_best = best_recall is None or validation_recall(val_scores) > best_recall
            if is_best:
                best_step, best_recall = step + 1, validation_recall(val_scores)
            progress.write(f"step {step + 1}: val " + ", ".join(f"{k} {v:.1f}" for k, v in val_scores.items()))
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

        # save a checkpoint after each validation, and after this step if SIGINT or SIGTERM came to any rank.
        # Rank 0 saves the unwrapped student (no "module." prefix) and the random generators of every rank
        stop_now = any_rank(stop.signum is not None, world_size, device)
        if evaluate_now or stop_now:
            rank_rng = gather_rng_states(loader_rng, device, world_size)
        if (evaluate_now or stop_now) and is_main:
            save_checkpoints(out, {
                **{name: module.state_dict() if module is not None else None for name, module in stateful.items()},
                "step": step + 1,
                "data_position": dict(position),
                "rng": rank_rng[0],
                **({"rng_by_rank": rank_rng} if world_size > 1 else {}),
                "args": vars(args),
                "model_config": dataclasses.asdict(cfg),
                "tokenizer": tokenizer_json,
                "train_pairs": len(train_set),
                "val": val_scores,
                "best_step": best_step,
                "best_recall": best_recall,
                "skipped_steps": skipped_steps,
            }, args.keep, best=is_best)
        if (evaluate_now or stop_now) and world_size > 1:
            dist.barrier()  # no rank moves on, or exits, before the checkpoint is complete
        if stop_now:
            break

    stop.restore()
    metrics_file.close()
    progress.close()
    if world_size > 1:
        dist.destroy_process_group()
    if failure:
        sys.exit(failure)
    if is_main:
        if skipped_steps:
            print(f"warning: skipped {skipped_steps} optimizer steps with a non-finite loss or gradient norm")
        if start_step >= args.steps:
            print(f"note: the checkpoint is at step {start_step}, so nothing is left of --steps {args.steps}")
        print(describe_checkpoints(out, step + 1, best_step, best_recall))
        print(f"tokenizer {out / 'tokenizer.json'}, metrics {out / 'metrics.jsonl'}")
    if stop_now:
        signum = stop.signum or signal.SIGTERM  # a rank that saw no signal stops because another did
        if is_main:
            name = signal.Signals(signum).name
            print(f"stopped by {name} after step {step + 1}; continue with the same command and --resume")
        sys.exit(128 + signum)  # the shell's convention for a process ended by a signal
    return val_scores


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except KeyboardInterrupt:  # during set-up; once training runs, Ctrl-C saves a checkpoint instead
        sys.exit("interrupted before the first optimizer step; nothing was saved")
