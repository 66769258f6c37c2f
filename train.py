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
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
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
                        "2-core CPU because images are decoded once into memory. A resumed run repeats "
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
    g.add_argument("--seed", type=int, default=0, help="seed of every random generator (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="autocast dtype of the encoders; auto = bf16 on CUDA, fp32 on CPU. Master weights, "
                        "logits, softmax and loss are always fp32 (default: %(default)s)")
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int):
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def __len__(self) -> int:
        return self.dataset_size // self.batch_size - self.start

    def __iter__(self):
        # distinct for every (seed, epoch) with seed >= 0 and epoch < 1_000_003
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        for batch in range(self.start, self.dataset_size // self.batch_size):
            yield order[batch * self.batch_size:(batch + 1) * self.batch_size]


def endless(loader, position: dict):
    """Yield micro-batches forever from position {"epoch", "batch"}, advancing it per micro-batch.

    Windows may span epochs. position counts what the loop has taken, not what workers prefetched.
    """
    sampler = loader.batch_sampler
    while True:
        sampler.epoch, sampler.start = position["epoch"], position["batch"]
        for batch in loader:
            position["batch"] += 1
            yield batch
        position["epoch"] += 1
        position["batch"] = 0


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
RESUME_FIXED_ARGS = ("method", "batch_size", "queue_size", "vocab_size", "seed")


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

def main(argv=None) -> dict:
    args = get_args(argv)
    seed_everything(args.seed)
    device = pick_device(args.device)
    amp = autocast_context(device, args.precision)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    K, B = args.accum, args.batch_size

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
    source, tokenizer, tokenizer_json, train_set, val_set = load_data(args, tokenizer)
    write_text_atomically(out / "tokenizer.json", tokenizer_json)
    sampler = EpochBatchSampler(len(train_set), B, args.seed)
    loader_rng = torch.Generator().manual_seed(args.seed)  # seeds the workers, while the sampler fixes the order
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_sampler=sampler, generator=loader_rng, worker_init_fn=ignore_stop_signals,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    # its own generator, so that validation draws nothing from the global RNG that augmentation uses
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=args.workers,
                                             generator=torch.Generator(), worker_init_fn=ignore_stop_signals)

    # model: the student, its EMA teacher and the two queues of teacher features
    cfg = model_config(args, tokenizer.get_vocab_size())
    model = ImageTextModel(cfg).to(device)
    optimizer = make_optimizer(model, args)
    use_teacher = args.method == "msd"
    teacher = EMATeacher(model, args.momentum, args.momentum_warmup).to(device) if use_teacher else None
    image_queue = FeatureQueue(args.queue_size if use_teacher else 0, cfg.embed_dim).to(device)
    text_queue = FeatureQueue(args.queue_size if use_teacher else 0, cfg.embed_dim).to(device)
    stateful = {"model": model, "teacher": teacher, "image_queue": image_queue, "text_queue": text_queue,
                "optimizer": optimizer}
    counts = model.param_counts()
    print(f"data: {source.name} at {source.root}, {len(train_set)} train / {len(val_set)} val pairs; "
          f"vocabulary {cfg.vocab_size}")
    print(f"model: {counts['total'] / 1e6:.2f}M parameters (image {counts['image'] / 1e6:.2f}M, "
          f"text {counts['text'] / 1e6:.2f}M); method {args.method}, effective batch {K} x {B} = {K * B}, "
          f"queue {image_queue.size}, device {device}")
    print("config: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()))
    if use_teacher and args.queue_size < K * B:
        print(f"note: --queue-size {args.queue_size} is smaller than a window of {K * B} keys, so each "
              f"enqueue keeps only the newest {args.queue_size}")

    # resume: weights, teacher, queues, optimizer, data position and every random generator
    start_step, position, skipped_steps = 0, {"epoch": 0, "batch": 0}, 0
    best_step, best_recall, val_scores = None, None, {}
    if checkpoint:
        restore_training_state(checkpoint, stateful, len(train_set), loader_rng, device)
        start_step, position = checkpoint["step"], dict(checkpoint["data_position"])
        skipped_steps, val_scores = checkpoint["skipped_steps"], checkpoint["val"]
        best_step, best_recall = checkpoint["best_step"], checkpoint["best_recall"]
        print(f"resumed from {resume_path} at step {start_step}")

    batches = endless(train_loader, position)
    metrics_file = open_metrics(out / "metrics.jsonl", start_step if checkpoint else None)
    stop = StopSignal()  # SIGINT or SIGTERM: save a checkpoint after the current step, then exit
    failure = None
    step = start_step - 1  # the last finished step, if the loop has nothing to do
    progress = tqdm(range(start_step, args.steps), desc=f"{args.method} K={K} B={B}", dynamic_ncols=True,
                    initial=start_step, total=args.steps)
    for step in progress:
        t0 = time.perf_counter()

        # schedules for this optimizer step
        lr = learning_rate(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        alpha = alpha_at(step, args) if use_teacher else 0.0

        # load the window: K micro-batches
        window = [{k: v.to(device, non_blocking=True) for k, v in trim_padding(next(batches)).items()}
                  for _ in range(K)]
        window_groups = torch.cat([mb["group"] for mb in window])  # (K*B,)

        # teacher encodes the whole window first: the keys every micro-batch is contrasted with
        if use_teacher:
            image_keys, text_keys = encode_window(teacher, window, amp)  # (K*B, D) each
            image_queue_snapshot, queue_groups = image_queue.contents()  # (Q, D), (Q,)
            text_queue_snapshot, _ = text_queue.contents()

        # student forward, loss and backward, one micro-batch at a time
        terms_sum: dict[str, torch.Tensor] = {}
        for j, mb in enumerate(window):
            with amp:
                image_queries, text_queries = model(mb["image"], mb["input_ids"], mb["attention_mask"])  # (B, D)
            if use_teacher:
                rows = slice(j * B, (j + 1) * B)
                terms = msd_loss(
                    image_queries, text_queries, image_keys[rows], text_keys[rows],
                    image_keys, text_keys, window_groups,
                    image_queue_snapshot, text_queue_snapshot, queue_groups,
                    mb["group"], torch.arange(j * B, (j + 1) * B, device=device),
                    model.logit_scale, alpha)
            else:
                terms = clip_loss(image_queries, text_queries, mb["group"], model.logit_scale)
            (terms["loss"] / K).backward()
            for name, value in terms.items():
                terms_sum[name] = terms_sum.get(name, 0.0) + value.detach() / K
        terms_sum = {name: value.item() for name, value in terms_sum.items()}  # one sync per step

        # stop, or skip this step, before a non-finite loss or gradient reaches the weights, teacher or queue
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf")).item()
        nonfinite = describe_nonfinite(terms_sum, grad_norm)
        if nonfinite and not args.skip_nonfinite:
            failure = (f"error: {nonfinite} at step {step + 1}; checkpoints of earlier steps are in {out}. Try "
                       f"a lower --lr or a higher --min-temperature, or pass --skip-nonfinite to skip such steps")
            break
        if nonfinite:
            skipped_steps += 1
            progress.write(f"warning: skipped step {step + 1}: {nonfinite}")
            optimizer.zero_grad(set_to_none=True)

        # optimizer step: step, clamp the temperature, zero the gradients
        if not nonfinite:
            optimizer.step()
            model.clamp_temperature(args.min_temperature, args.max_temperature)
            optimizer.zero_grad(set_to_none=True)

        # EMA update of the teacher, once per optimizer step
        if use_teacher and not nonfinite:
            teacher.update(model)

        # enqueue the window's keys, once per optimizer step
        if use_teacher and not nonfinite:
            image_queue.enqueue(image_keys, window_groups)
            text_queue.enqueue(text_keys, window_groups)

        # log
        seconds = time.perf_counter() - t0
        if nonfinite:
            row = {"step": step + 1, "lr": lr, "alpha": alpha, "skipped": nonfinite}  # keeps NaN out of the JSON
        else:
            row = {"step": step + 1, "lr": lr, "alpha": alpha, "temperature": model.temperature.item(),
                   "grad_norm": grad_norm, "pairs_per_sec": K * B / seconds, **terms_sum}
        progress.set_postfix(loss=f"{terms_sum['loss']:.3f}", nce=f"{terms_sum['infonce']:.3f}",
                             kl=f"{terms_sum['kl']:.3f}", alpha=f"{alpha:.2f}", T=f"{model.temperature.item():.3f}",
                             pairs_s=f"{K * B / seconds:.0f}", batch=K * B)

        # validate every --eval-every steps and at the end, tracking the best mean R@10 for checkpoint_best.pt
        evaluate_now = (step + 1) % args.eval_every == 0 or step + 1 == args.steps
        is_best = False
        if evaluate_now:
            val_scores = validate(model, val_loader, device, amp)
            row["val"] = val_scores
            is_best = best_recall is None or validation_recall(val_scores) > best_recall
            if is_best:
                best_step, best_recall = step + 1, validation_recall(val_scores)
            progress.write(f"step {step + 1}: val " + ", ".join(f"{k} {v:.1f}" for k, v in val_scores.items()))
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

        # save a checkpoint after each validation, and after this step if SIGINT or SIGTERM came
        if evaluate_now or stop.signum:
            save_checkpoints(out, {
                **{name: module.state_dict() if module is not None else None for name, module in stateful.items()},
                "step": step + 1,
                "data_position": dict(position),
                "rng": rng_states(loader_rng, device),
                "args": vars(args),
                "model_config": dataclasses.asdict(cfg),
                "tokenizer": tokenizer_json,
                "train_pairs": len(train_set),
                "val": val_scores,
                "best_step": best_step,
                "best_recall": best_recall,
                "skipped_steps": skipped_steps,
            }, args.keep, best=is_best)
        if stop.signum:
            break

    stop.restore()
    metrics_file.close()
    progress.close()
    if failure:
        sys.exit(failure)
    if skipped_steps:
        print(f"warning: skipped {skipped_steps} optimizer steps with a non-finite loss or gradient norm")
    if start_step >= args.steps:
        print(f"note: the checkpoint is at step {start_step}, so nothing is left of --steps {args.steps}")
    print(describe_checkpoints(out, step + 1, best_step, best_recall))
    print(f"tokenizer {out / 'tokenizer.json'}, metrics {out / 'metrics.jsonl'}")
    if stop.signum:
        name = signal.Signals(stop.signum).name
        print(f"stopped by {name} after step {step + 1}; continue with the same command and --resume")
        sys.exit(128 + stop.signum)  # the shell's convention for a process ended by a signal
    return val_scores


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    main()
