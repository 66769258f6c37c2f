"""Evaluate a pretrained checkpoint.

    python evaluate.py --task retrieval                       # the default run's checkpoint, test split
    python evaluate.py --task retrieval --model teacher       # the EMA teacher instead of the student
    python evaluate.py --task retrieval --checkpoint runs/medpix/checkpoint.pt --split dev

Retrieval: every image of the split is a query against every text (image-to-text), and every text
against every image (text-to-image). A retrieved item is correct when it belongs to the query's
group, so a report identical to the query's own is a correct match too. Ties are counted against
the model: a wrong item scored equal to the best correct one ranks ahead of it, so a collapsed
model that gives every pair the same score gets the worst rank, not the best.
"""

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

RECALL_AT = (1, 5, 10)


# -----------------------------------------------------------------------------
# metrics

def ranks_of_first_match(similarity: torch.Tensor, query_groups: torch.Tensor, item_groups: torch.Tensor) -> torch.Tensor:
    """1-based rank of the best-scored correct item for each query, ties counted as ranked ahead.

    similarity (Q, N), query_groups (Q,), item_groups (N,) -> ranks (Q,). A query with no correct
    item at all gets rank N + 1.
    """
    correct = query_groups[:, None] == item_groups[None, :]                     # (Q, N)
    best_correct = similarity.masked_fill(~correct, float("-inf")).max(dim=1).values  # (Q,)
    ahead = (similarity >= best_correct[:, None]) & ~correct                    # (Q, N)
    ranks = 1 + ahead.sum(dim=1)
    return torch.where(correct.any(dim=1), ranks, torch.full_like(ranks, similarity.shape[1] + 1))


def retrieval_metrics(similarity: torch.Tensor, image_groups: torch.Tensor, text_groups: torch.Tensor | None = None) -> dict[str, float]:
    """Recall@1/5/10 (in %) and median rank in both directions from an image-text similarity (N_img, N_txt)."""
    text_groups = image_groups if text_groups is None else text_groups
    scores = {}
    for direction, sim, queries, items in (("i2t", similarity, image_groups, text_groups),
                                           ("t2i", similarity.T, text_groups, image_groups)):
        ranks = ranks_of_first_match(sim.float(), queries, items).float()
        for k in RECALL_AT:
            scores[f"{direction}_R@{k}"] = 100.0 * (ranks <= k).float().mean().item()
        scores[f"{direction}_median_rank"] = ranks.median().item()
    return scores


# -----------------------------------------------------------------------------
# embeddings

@torch.no_grad()
def embed_pairs(model, loader, device, amp=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode every pair of a loader in eval mode: image (N, D), text (N, D), groups (N,), fp32 on CPU."""
    was_training = model.training
    model.eval()
    images, texts, groups = [], [], []
    for batch in loader:
        with amp or nullcontext():
            image_features, text_features = model(batch["image"].to(device), batch["input_ids"].to(device),
                                                  batch["attention_mask"].to(device))
        images.append(image_features.float().cpu())
        texts.append(text_features.float().cpu())
        groups.append(batch["group"])
    model.train(was_training)
    return torch.cat(images), torch.cat(texts), torch.cat(groups)


# -----------------------------------------------------------------------------
# loading a checkpoint

def load_checkpoint(path: Path, which: str, device: torch.device):
    """Return (model, tokenizer, checkpoint dict) with `which` = "student" or "teacher" weights loaded.

    Loading runs no code from the file: tensors and plain data only (weights_only=True), and the
    tokenizer is read from tokenizer.json beside the checkpoint.
    """
    from data import load_tokenizer
    from model import ImageTextModel, ModelConfig

    path = Path(path)
    if not path.is_file():
        sys.exit(f"error: checkpoint {path} not found; train one with `python train.py --accum 8` "
                 f"or pass --checkpoint PATH")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = ImageTextModel(ModelConfig(**checkpoint["model_config"]))
    if which == "teacher":
        if checkpoint.get("teacher") is None:
            sys.exit(f"error: {path} holds no teacher (trained with --method {checkpoint['args']['method']}); "
                     f"use --model student")
        # the teacher's state dict prefixes the model's keys with "model." and adds its update count
        state = {k.removeprefix("model."): v for k, v in checkpoint["teacher"].items() if k.startswith("model.")}
    else:
        state = checkpoint["model"]
    model.load_state_dict(state)
    tokenizer = load_tokenizer(path.parent / "tokenizer.json")
    return model.to(device).eval(), tokenizer, checkpoint


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["retrieval"], default="retrieval", help="what to evaluate (default: %(default)s)")
    p.add_argument("--checkpoint", default="runs/default/checkpoint.pt",
                   help="checkpoint written by train.py; tokenizer.json must be beside it (default: %(default)s)")
    p.add_argument("--model", choices=["student", "teacher"], default="student",
                   help="which encoders to evaluate: the trained student or its EMA teacher (default: %(default)s)")
    p.add_argument("--data", default=None, help="dataset spec as for train.py (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the dataset's held-out split, test or dev)")
    p.add_argument("--max-pairs", type=int, default=0,
                   help="evaluate a seeded random subset of this many pairs, 0 = all; use it to compare a "
                        "slice of the training split with the held-out split at equal size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON file for the scores (default: beside the checkpoint)")
    return p.parse_args(argv)


def print_table(scores: dict[str, float]) -> None:
    header = "".join(f"{f'R@{k}':>8}" for k in RECALL_AT) + f"{'median rank':>13}"
    print(f"{'':16}{header}")
    for direction, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        cells = "".join(f"{scores[f'{direction}_R@{k}']:8.1f}" for k in RECALL_AT)
        print(f"{name:16}{cells}{scores[f'{direction}_median_rank']:13.0f}")


def main(argv=None) -> dict:
    from data import PairDataset, open_source
    from train import pick_device

    args = get_args(argv)
    device = pick_device(args.device)
    model, tokenizer, checkpoint = load_checkpoint(Path(args.checkpoint), args.model, device)
    train_args = checkpoint["args"]
    spec = args.data if args.data is not None else train_args["data"]
    source = open_source(spec)
    split = args.split or source.eval_split
    pairs = source.pairs(split)
    if args.max_pairs and len(pairs) > args.max_pairs:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:args.max_pairs]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    dataset = PairDataset(pairs, tokenizer, image_size=model.cfg.image_size, channels=model.cfg.channels,
                          train=False, max_len=model.cfg.max_len)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)

    image_features, text_features, groups = embed_pairs(model, loader, device)
    scores = retrieval_metrics(image_features @ text_features.T, groups)
    n_groups = len(set(groups.tolist()))
    print(f"retrieval on {source.name} {split}: {len(pairs)} pairs ({n_groups} distinct groups), "
          f"{args.model} of {args.checkpoint} at step {checkpoint['step']}")
    print_table(scores)
    print(f"chance: R@10 about {100 * min(1.0, 10 / n_groups):.1f}")

    result = {"task": "retrieval", "checkpoint": str(args.checkpoint), "step": checkpoint["step"],
              "model": args.model, "data": source.name, "split": split, "pairs": len(pairs),
              "groups": n_groups, "scores": scores}
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"retrieval_{split}_{args.model}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"scores written to {out}")
    return result


if __name__ == "__main__":
    main()
