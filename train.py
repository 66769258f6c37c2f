"""Pretrain an image-text model with momentum self-distillation (MSD) and exact gradient accumulation.

    python train.py --accum 8                                  # embedded synthetic chest X-rays
    python train.py --accum 8 --data medpix:path/to/medpix-2.0 --out runs/medpix
    python train.py --accum 8 --method clip                    # baseline: naive in-batch accumulation

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
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import PairDataset, open_source, train_tokenizer
from evaluate import embed_pairs, retrieval_metrics
from loss import clip_loss, msd_loss
from model import ImageTextModel, ModelConfig
from momentum import EMATeacher, FeatureQueue


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", default=None,
                   help="dataset as FORMAT:PATH (medpix, manifest, synthetic) or a PATH whose format is "
                        "detected; default: the embedded synthetic chest X-ray set, generated on first use")
    g.add_argument("--out", default="runs/default", help="folder for checkpoint, tokenizer and metrics (default: %(default)s)")
    g.add_argument("--image-size", type=int, default=64, help="input image side in pixels (default: %(default)s)")
    g.add_argument("--channels", type=int, default=1, choices=[1, 3], help="1 = grey, 3 = RGB (default: %(default)s)")
    g.add_argument("--max-len", type=int, default=64, help="text length in tokens, [CLS] and [SEP] included (default: %(default)s)")
    g.add_argument("--vocab-size", type=int, default=4000, help="WordPiece vocabulary size, trained on the training texts (default: %(default)s)")
    g.add_argument("--workers", type=int, default=0,
                   help="data loader processes; 0 loads in the training process, which is fastest on a "
                        "2-core CPU because images are decoded once into memory (default: %(default)s)")

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

    g = p.add_argument_group("model size")
    g.add_argument("--patch-size", type=int, default=8, help="ViT patch side in pixels (default: %(default)s)")
    g.add_argument("--width", type=int, default=128, help="transformer width of both encoders (default: %(default)s)")
    g.add_argument("--depth", type=int, default=2, help="transformer blocks per encoder (default: %(default)s)")
    g.add_argument("--heads", type=int, default=4, help="attention heads per block (default: %(default)s)")
    g.add_argument("--embed-dim", type=int, default=128, help="size of the joint embedding space (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout of the student; the teacher never uses it (default: %(default)s)")

    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=100, help="optimizer steps between validation retrieval scores and checkpoints (default: %(default)s)")
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


def endless(loader):
    """Yield micro-batches forever, reshuffling at each epoch; windows may span epochs."""
    while True:
        yield from loader


def trim_padding(batch: dict) -> dict:
    """Cut the text columns that are padding in every row, so short reports cost less compute."""
    length = int(batch["attention_mask"].sum(dim=1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :length], "attention_mask": batch["attention_mask"][:, :length]}


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill during the save leaves the previous checkpoint intact."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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

    # data: tokenizer trained on the training texts, every text tokenised once
    source = open_source(args.data)
    train_pairs = source.pairs("train")
    val_pairs = source.pairs("val")
    K, B = args.accum, args.batch_size
    if len(train_pairs) < B:
        sys.exit(f"error: the training split of {source.name} has {len(train_pairs)} pairs, fewer than "
                 f"--batch-size {B}; lower --batch-size")
    tokenizer = train_tokenizer([pair.text for pair in train_pairs], vocab_size=args.vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    data_kwargs = dict(tokenizer=tokenizer, image_size=args.image_size, channels=args.channels, max_len=args.max_len)
    train_set = PairDataset(train_pairs, train=True, **data_kwargs)
    val_set = PairDataset(val_pairs, train=False, **data_kwargs)
    loader_rng = torch.Generator().manual_seed(args.seed)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=B, shuffle=True, drop_last=True, generator=loader_rng,
        num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=args.workers > 0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=256, num_workers=args.workers)

    # model: the student, its EMA teacher and the two queues of teacher features
    cfg = model_config(args, tokenizer.get_vocab_size())
    model = ImageTextModel(cfg).to(device)
    optimizer = make_optimizer(model, args)
    use_teacher = args.method == "msd"
    teacher = EMATeacher(model, args.momentum, args.momentum_warmup).to(device) if use_teacher else None
    image_queue = FeatureQueue(args.queue_size if use_teacher else 0, cfg.embed_dim).to(device)
    text_queue = FeatureQueue(args.queue_size if use_teacher else 0, cfg.embed_dim).to(device)
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

    batches = endless(train_loader)
    metrics_file = open(out / "metrics.jsonl", "w")
    checkpoint_path = out / "checkpoint.pt"
    val_scores: dict[str, float] = {}
    progress = tqdm(range(args.steps), desc=f"{args.method} K={K} B={B}", dynamic_ncols=True)
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

        # stop before a non-finite loss reaches the weights, the teacher or the queue
        if not math.isfinite(terms_sum["loss"]):
            sys.exit(f"error: non-finite loss at step {step}: " +
                     ", ".join(f"{k}={v:.4g}" for k, v in terms_sum.items()) +
                     f"; the last checkpoint is {checkpoint_path}. Try a lower --lr or a higher --min-temperature.")

        # optimizer step: clip, step, clamp the temperature, zero the gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        model.clamp_temperature(args.min_temperature, args.max_temperature)
        optimizer.zero_grad(set_to_none=True)

        # EMA update of the teacher, once per optimizer step
        if use_teacher:
            teacher.update(model)

        # enqueue the window's keys, once per optimizer step
        if use_teacher:
            image_queue.enqueue(image_keys, window_groups)
            text_queue.enqueue(text_keys, window_groups)

        # log
        seconds = time.perf_counter() - t0
        row = {"step": step + 1, "lr": lr, "alpha": alpha, "temperature": model.temperature.item(),
               "grad_norm": grad_norm.item(), "pairs_per_sec": K * B / seconds, **terms_sum}
        progress.set_postfix(loss=f"{terms_sum['loss']:.3f}", nce=f"{terms_sum['infonce']:.3f}",
                             kl=f"{terms_sum['kl']:.3f}", alpha=f"{alpha:.2f}", T=f"{row['temperature']:.3f}",
                             pairs_s=f"{row['pairs_per_sec']:.0f}", batch=K * B)

        # validate and save a checkpoint every --eval-every steps and at the end
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last:
            val_scores = validate(model, val_loader, device, amp)
            row["val"] = val_scores
            progress.write(f"step {step + 1}: val " + ", ".join(f"{k} {v:.1f}" for k, v in val_scores.items()))
            save_checkpoint(checkpoint_path, {
                "model": model.state_dict(),
                "teacher": teacher.state_dict() if use_teacher else None,
                "image_queue": image_queue.state_dict(),
                "text_queue": text_queue.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step + 1,
                "args": vars(args),
                "model_config": dataclasses.asdict(cfg),
                "tokenizer": tokenizer.to_str(),
                "val": val_scores,
            })
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()

    metrics_file.close()
    print(f"done: checkpoint {checkpoint_path}, tokenizer {out / 'tokenizer.json'}, metrics {out / 'metrics.jsonl'}")
    return val_scores


if __name__ == "__main__":
    main()
