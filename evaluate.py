"""Evaluate a pretrained checkpoint: retrieval, zero-shot classification and few-shot linear probes.

    python evaluate.py --task retrieval                       # the default run's checkpoint, test split
    python evaluate.py --task retrieval --model teacher       # the EMA teacher instead of the student
    python evaluate.py --task zeroshot --checkpoint runs/medpix/checkpoint.pt     # MedPix dev split
    python evaluate.py --task fewshot --shots 1 4 16 --seeds 3
    python evaluate.py --task all                             # the three tasks, one JSON

Retrieval: every image of the split is a query against every text (image-to-text), and every text
against every image (text-to-image). A retrieved item is correct when it belongs to the query's
group, so a report identical to the query's own is a correct match too. Ties are counted against
the model: a wrong item scored equal to the best correct one ranks ahead of it, so a collapsed
model that gives every pair the same score gets the worst rank, not the best. A PNG beside the
JSON shows the top 5 of a few queries in each direction.

Zero-shot: each class is described by a few prompts worded like the training texts. The prompt
embeddings are averaged and re-normalised (a prompt ensemble), and an image gets the class whose
ensemble is most similar. A binary finding is scored by a softmax over a positive and a negative
ensemble, at the model's temperature.

Few-shot: a logistic regression (linear probe) on frozen image embeddings. It is trained on k
examples per class or on a percentage of the training split, its L2 strength is picked on the val
split, and it is scored on the evaluation split, over several seeds.

Accuracy, balanced accuracy and recall@K are percentages, and AUC-ROC is in [0, 1]. An AUC-ROC
that is undefined because the labels contain a single class is NaN here and null in the JSON.
"""

import argparse
import json
import math
import pickle
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps
from tokenizers import Tokenizer

from data import Pair, PairDataset, load_image, load_tokenizer, open_source, tokenize
from model import ImageTextModel, ModelConfig

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


def auc_roc(scores, labels) -> float:
    """Compute the area under the ROC curve of binary labels (1 = positive) ranked by scores.

    Computed as the Mann-Whitney U statistic: the fraction of (positive, negative) pairs in which
    the positive scores higher, a tie counting one half. Returns NaN when the labels contain a
    single class, because the curve is then undefined.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positive = torch.as_tensor(labels).flatten().bool()
    n_positive = int(positive.sum())
    n_negative = positive.numel() - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")

    # 1-based ranks in ascending score order, where tied scores share the mean of the ranks they span
    _, tie_group, tie_counts = torch.unique(scores, return_inverse=True, return_counts=True)
    last_rank = tie_counts.cumsum(dim=0).double()
    ranks = (last_rank - (tie_counts - 1) / 2)[tie_group]            # (N,)
    u = ranks[positive].sum() - n_positive * (n_positive + 1) / 2    # pairs the positives win
    return (u / (n_positive * n_negative)).item()


def macro_auc_roc(probabilities: torch.Tensor, targets: torch.Tensor) -> float:
    """Average the one-vs-rest AUC-ROC of probabilities (N, C) against class indices targets (N,).

    Classes whose one-vs-rest AUC-ROC is undefined (no positives or no negatives) are left out of
    the mean. Returns NaN when no class is left.
    """
    per_class = [auc_roc(probabilities[:, c], targets == c) for c in range(probabilities.shape[1])]
    defined = [value for value in per_class if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else float("nan")


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Count (true class, predicted class) pairs: (C, C), one row per true class."""
    flat = targets.long() * n_classes + predictions.long()
    return torch.bincount(flat, minlength=n_classes * n_classes).view(n_classes, n_classes)


def accuracy(targets: torch.Tensor, predictions: torch.Tensor) -> float:
    """Return the percentage of predictions equal to their target."""
    return 100.0 * (targets == predictions).double().mean().item()


def balanced_accuracy(targets: torch.Tensor, predictions: torch.Tensor, n_classes: int) -> float:
    """Return the mean recall over the classes that occur in targets, in %."""
    matrix = confusion_matrix(targets, predictions, n_classes).double()
    support = matrix.sum(dim=1)                                       # (C,) examples per true class
    recall = matrix.diagonal()[support > 0] / support[support > 0]
    return 100.0 * recall.mean().item()


def classification_scores(probabilities: torch.Tensor, targets: torch.Tensor, class_names: list[str]) -> dict:
    """Score class probabilities (N, C) against targets (N,): accuracies, AUC-ROC, confusion matrix."""
    predictions = probabilities.argmax(dim=1)
    n_classes = len(class_names)
    return {
        "accuracy": accuracy(targets, predictions),
        "balanced_accuracy": balanced_accuracy(targets, predictions, n_classes),
        "macro_auc_roc": macro_auc_roc(probabilities, targets),
        "auc_roc": {name: auc_roc(probabilities[:, c], targets == c) for c, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(targets, predictions, n_classes).tolist(),
    }


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


def embed_split(model, tokenizer, pairs: list[Pair], device, batch_size: int = 256):
    """Encode a list of pairs with centre-cropped images: image (N, D), text (N, D), groups (N,)."""
    dataset = PairDataset(pairs, tokenizer, image_size=model.cfg.image_size, channels=model.cfg.channels,
                          train=False, max_len=model.cfg.max_len)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    return embed_pairs(model, loader, device)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: list[str], device) -> torch.Tensor:
    """Encode texts in eval mode: (N, D), fp32 on CPU."""
    input_ids, attention_mask = tokenize(tokenizer, texts, model.cfg.max_len)  # (N, L) each
    was_training = model.training
    model.eval()
    features = model.encode_text(input_ids.to(device), attention_mask.to(device)).float().cpu()
    model.train(was_training)
    return features


# -----------------------------------------------------------------------------
# retrieval

def print_retrieval_table(scores: dict[str, float]) -> None:
    header = "".join(f"{f'R@{k}':>8}" for k in RECALL_AT) + f"{'median rank':>13}"
    print(f"{'':16}{header}")
    for direction, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        cells = "".join(f"{scores[f'{direction}_R@{k}']:8.1f}" for k in RECALL_AT)
        print(f"{name:16}{cells}{scores[f'{direction}_median_rank']:13.0f}")


def evaluate_retrieval(similarity: torch.Tensor, groups: torch.Tensor) -> dict:
    """Compute recall@K and median rank of an image-text similarity (N, N), print and return them."""
    scores = retrieval_metrics(similarity, groups)
    n_groups = len(set(groups.tolist()))
    print(f"retrieval: {len(groups)} pairs, {n_groups} distinct groups")
    print_retrieval_table(scores)
    print(f"chance: R@10 about {100 * min(1.0, 10 / n_groups):.1f}")
    return {"groups": n_groups, "scores": scores}


# -----------------------------------------------------------------------------
# zero-shot classification

# Default prompts: dataset name -> label name -> prompts. A multi-class label maps each class to
# its prompts. A binary finding maps "positive" and "negative" to prompts that assert and deny it.
# The prompts are worded like each dataset's texts (data.py's report templates for synthetic,
# the captions for MedPix), because the text encoder has only learned the words of its training texts.
# Only the classes listed here are evaluated, so rare MedPix planes such as "3D Reconstruction"
# or "Photograph" are left out.
PROMPTS = {
    "synthetic": {
        "cardiomegaly": {
            "positive": ["Cardiomegaly.", "The heart is enlarged.", "The cardiac silhouette is moderately enlarged.",
                         "Mild cardiomegaly."],
            "negative": ["Normal heart size.", "The heart size is normal.", "No cardiomegaly.",
                         "The cardiomediastinal silhouette is within normal limits."],
        },
        "pleural_effusion": {
            "positive": ["There is a moderate right pleural effusion.", "Small left pleural effusion.",
                         "Large bilateral pleural effusions.", "Pleural effusion."],
            "negative": ["No pleural effusion.", "There is no pleural effusion.", "The costophrenic angles are sharp."],
        },
        "pneumothorax": {
            "positive": ["There is a small right pneumothorax.", "Moderate left pneumothorax.",
                         "Large pneumothorax with a visible pleural line.", "Pneumothorax."],
            "negative": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
        },
        "nodule": {
            "positive": ["There is a small nodule in the right upper zone.", "Pulmonary nodule in the left lower zone.",
                         "A 12 mm nodule projects over the left mid lung.", "Pulmonary nodule."],
            "negative": ["No pulmonary nodules.", "No suspicious nodules or masses.", "There is no pulmonary nodule."],
        },
        "consolidation": {
            "positive": ["Patchy consolidation in the right lower zone.",
                         "Airspace opacity in the left lower zone, concerning for pneumonia.",
                         "Focal consolidation in the right middle lung.", "Consolidation."],
            "negative": ["No focal consolidation.", "No focal airspace opacity.", "There is no consolidation."],
        },
        # NOTE: the synthetic reports never mention an absent device, so these negative prompts
        # pair "No" with words the text encoder has only seen in positive sentences.
        "support_device": {
            "positive": ["Endotracheal tube in place.", "Right internal jugular line in place.",
                         "Left-sided pacemaker in place.",
                         "Right subclavian central venous catheter with tip in the superior vena cava."],
            "negative": ["No endotracheal tube.", "No central venous catheter.", "No pacemaker."],
        },
        # Reports have no generic "abnormal" sentence, so the negative side averages one short
        # sentence per finding.
        "normal": {
            "positive": ["No acute cardiopulmonary abnormality.", "Normal chest radiograph.",
                         "No acute cardiopulmonary process.", "Normal chest."],
            "negative": ["Cardiomegaly.", "Pleural effusion.", "Pneumothorax.", "Pulmonary nodule.",
                         "Focal consolidation."],
        },
    },
    "medpix": {
        "Type": {
            "CT": ["Axial CT image.", "Contrast enhanced CT.", "Noncontrast CT shows a hypodense lesion.",
                   "CT images demonstrate a mass with soft tissue attenuation."],
            "MR": ["Axial T2 weighted MR image.", "T1 weighted MRI.", "MRI shows abnormal signal.",
                   "FLAIR MR image shows increased signal intensity."],
        },
        "Location Category": {
            "Head": ["Axial image of the brain.", "MRI of the brain shows a mass in the frontal lobe.",
                     "Noncontrast CT of the head.", "Enhancing lesion in the cerebellum."],
            "Thorax": ["CT of the chest.", "Axial CT image of the lungs.", "Mass in the mediastinum.",
                       "Pleural effusion and pulmonary nodules."],
            "Abdomen": ["CT of the abdomen.", "Axial CT image through the liver.", "Mass in the pancreas.",
                        "Dilated loops of bowel."],
            "Spine and Muscles": ["Sagittal MR image of the spine.", "Lesion in the vertebral body.",
                                  "MRI of the knee.", "Bone lesion in the femur with surrounding muscle edema."],
            "Reproductive and Urinary System": ["CT of the kidneys.", "Renal mass.",
                                                "MR image of the pelvis shows the uterus.", "Mass in the bladder."],
        },
        "Plane": {
            "Axial": ["Axial CT image.", "Axial T2 weighted MR image.", "Axial image."],
            "Coronal": ["Coronal CT image.", "Coronal T1 weighted MR image.", "Coronal image."],
            "Sagittal": ["Sagittal CT image.", "Sagittal T2 weighted MR image.", "Sagittal image."],
        },
    },
}
PROMPT_FILE_FORMAT = ('{"LABEL": {"CLASS": ["prompt", ...], ...}} for a multi-class label, and '
                      '{"FINDING": {"positive": [...], "negative": [...]}} for a binary finding (label value 1 or 0)')


def is_binary(entry: dict) -> bool:
    """Return True if a prompt table entry describes a binary finding, not a multi-class label."""
    return set(entry) == {"positive", "negative"}


def load_prompts(path: Path) -> dict:
    """Read a prompt file in the PROMPTS format. Raises ValueError naming the first invalid entry."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"prompt file {path} is not valid JSON: {error}") from error
    if not isinstance(table, dict) or not table:
        raise ValueError(f"prompt file {path} must be a non-empty JSON object: {PROMPT_FILE_FORMAT}")
    for label, entry in table.items():
        if not isinstance(entry, dict) or len(entry) < 2:
            raise ValueError(f"prompt file {path}: label {label!r} needs at least two classes, or "
                             f"'positive' and 'negative'. Expected {PROMPT_FILE_FORMAT}")
        if ({"positive", "negative"} & set(entry)) and not is_binary(entry):
            raise ValueError(f"prompt file {path}: finding {label!r} must have exactly the keys "
                             f"'positive' and 'negative', got {sorted(entry)}")
        for name, prompts in entry.items():
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"prompt file {path}: {label!r} / {name!r} must be a non-empty list of "
                                 f"non-empty strings")
    return table


def binary_targets(pairs: list[Pair], label: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the pairs whose label is 0 or 1: their indices (M,) and that value (M,). Other values count as unlabelled."""
    index = [i for i, pair in enumerate(pairs) if pair.labels.get(label) in (0, 1)]
    targets = [int(pairs[i].labels[label]) for i in index]
    return torch.tensor(index, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def class_targets(pairs: list[Pair], label: str, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Select the pairs whose label is one of classes: their indices (M,) and class positions (M,)."""
    position = {name: c for c, name in enumerate(classes)}
    index = [i for i, pair in enumerate(pairs) if str(pair.labels.get(label)) in position]
    targets = [position[str(pairs[i].labels[label])] for i in index]
    return torch.tensor(index, dtype=torch.long), torch.tensor(targets, dtype=torch.long)


def classes_present(pairs: list[Pair], label: str, classes: list[str]) -> list[str]:
    """Return the classes, in their given order, that at least one pair has as its label."""
    values = {str(pair.labels.get(label)) for pair in pairs}
    return [name for name in classes if name in values]


def prompt_ensemble(model, tokenizer, prompts: list[str], device) -> torch.Tensor:
    """Embed each prompt, average the embeddings and re-normalise: (D,). Prompt order does not matter."""
    features = embed_texts(model, tokenizer, prompts, device)        # (P, D)
    return F.normalize(features.mean(dim=0), dim=0)


def zeroshot_binary(image_features: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor,
                    negative: torch.Tensor, temperature: float) -> dict:
    """Score images (N, D) by p(positive), a softmax over their similarities to the two prompt embeddings (D,).

    AUC-ROC only depends on the order of the scores, so it is computed on the log-odds of
    p(positive), (s_positive - s_negative) / temperature, which orders images the same way.
    p(positive) itself rounds to 1.0 for large log-odds, and such ties would distort the AUC-ROC.
    """
    similarity = image_features.double() @ torch.stack([positive, negative]).double().T  # (N, 2)
    log_odds = (similarity[:, 0] - similarity[:, 1]) / temperature                         # (N,)
    return {"kind": "binary", "examples": len(targets), "positives": int(targets.sum()),
            "auc_roc": auc_roc(log_odds, targets)}


def zeroshot_multiclass(image_features: torch.Tensor, targets: torch.Tensor, class_embeddings: torch.Tensor,
                        class_names: list[str], temperature: float) -> dict:
    """Classify images (N, D) by their most similar class embedding (C, D) and score the predictions."""
    logits = image_features.double() @ class_embeddings.double().T / temperature  # (N, C)
    probabilities = logits.softmax(dim=1)
    return {"kind": "multiclass", "classes": class_names, "examples": len(targets),
            **classification_scores(probabilities, targets, class_names)}


def evaluate_zeroshot(model, tokenizer, device, image_features: torch.Tensor, pairs: list[Pair],
                      prompts: dict) -> dict:
    """Classify the images zero-shot for every label of the prompt table, print the scores and return them.

    A label is skipped, with a printed note, when fewer than two of its classes have examples. A
    class without examples is removed from the candidates, and pairs whose class has no prompts
    are not evaluated.
    """
    temperature = model.temperature.item()
    results, skipped = {}, {}
    for label, entry in prompts.items():
        if is_binary(entry):
            index, targets = binary_targets(pairs, label)
            if targets.numel() == 0 or targets.min() == targets.max():
                skipped[label] = "the split has no positive or no negative example"
                continue
            positive = prompt_ensemble(model, tokenizer, entry["positive"], device)
            negative = prompt_ensemble(model, tokenizer, entry["negative"], device)
            results[label] = zeroshot_binary(image_features[index], targets, positive, negative, temperature)
            continue

        classes = classes_present(pairs, label, list(entry))
        missing = [name for name in entry if name not in classes]
        if missing:
            print(f"zero-shot {label}: no examples of {', '.join(missing)} in the split, so left out of the classes")
        if len(classes) < 2:
            skipped[label] = "fewer than two of its classes have examples in the split"
            continue
        index, targets = class_targets(pairs, label, classes)
        if len(index) < len(pairs):
            print(f"zero-shot {label}: {len(pairs) - len(index)} pairs whose class has no prompts are not evaluated")
        class_embeddings = torch.stack([prompt_ensemble(model, tokenizer, entry[name], device) for name in classes])
        results[label] = zeroshot_multiclass(image_features[index], targets, class_embeddings, classes, temperature)

    for label, reason in skipped.items():
        print(f"zero-shot {label}: skipped, {reason}")
    summary = {"temperature": temperature, "labels": results, "skipped": skipped}
    findings = [r["auc_roc"] for r in results.values() if r["kind"] == "binary"]
    if findings:
        summary["mean_auc_roc"] = sum(findings) / len(findings)
    print_zeroshot(summary)
    return summary


def print_zeroshot(summary: dict) -> None:
    print(f"zero-shot classification, temperature {summary['temperature']:.3f}")
    multiclass = {k: r for k, r in summary["labels"].items() if r["kind"] == "multiclass"}
    binary = {k: r for k, r in summary["labels"].items() if r["kind"] == "binary"}
    if multiclass:
        print(f"{'label':26}{'classes':>8}{'examples':>9}{'accuracy':>10}{'balanced':>10}{'macro AUC':>11}")
        for label, r in multiclass.items():
            print(f"{label:26}{len(r['classes']):8d}{r['examples']:9d}{r['accuracy']:10.1f}"
                  f"{r['balanced_accuracy']:10.1f}{r['macro_auc_roc']:11.3f}")
        for label, r in multiclass.items():
            print(f"confusion matrix of {label} (rows: true class, columns: predicted class)")
            print(" " * 36 + "".join(f"{c:>6d}" for c in range(len(r["classes"]))))
            for c, (name, row) in enumerate(zip(r["classes"], r["confusion_matrix"])):
                print(f"{c:>3d} {name[:32]:32}" + "".join(f"{count:6d}" for count in row))
    if binary:
        print(f"{'finding':26}{'positives':>10}{'examples':>9}{'AUC-ROC':>9}")
        for label, r in binary.items():
            print(f"{label:26}{r['positives']:10d}{r['examples']:9d}{r['auc_roc']:9.3f}")
        print(f"{'mean':26}{'':19}{summary['mean_auc_roc']:9.3f}")


# -----------------------------------------------------------------------------
# few-shot linear probe

SHOTS = (1, 2, 4, 8, 16)          # training examples per class (binary findings: positives and negatives)
PERCENTS = (1, 10, 100)           # percentages of the labelled training split
L2_GRID = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # strongest first, so a tie on val keeps the stronger one


@dataclass
class LinearProbe:
    """Multinomial logistic regression on embeddings: p(class | x) = softmax(x W + b)."""

    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor    # (C,)
    l2: float             # the L2 strength it was trained with

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.double() @ self.weight + self.bias              # (N, C)

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=1)                     # (N, C)


def train_logistic_regression(features: torch.Tensor, targets: torch.Tensor, n_classes: int, l2: float,
                              max_iter: int = 100) -> LinearProbe:
    """Minimise mean cross-entropy + l2 / 2 * ||W||^2 (the bias is not penalised) with full-batch L-BFGS.

    The weights start at zero and every step uses the whole training set, so the same data
    gives the same probe.
    """
    x = features.double()                                             # (N, D)
    y = targets.long()                                                # (N,)
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    # One thread, because at these sizes (thousands of rows, D columns) thread synchronisation
    # costs more than it saves. With 2 threads on a busy 2-core CPU, a fit took about 100 times longer.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            optimizer.step(closure)
    finally:
        torch.set_num_threads(threads)
    return LinearProbe(weight.detach(), bias.detach(), l2)


def probe_auc_roc(probe: LinearProbe, features: torch.Tensor, targets: torch.Tensor) -> float:
    """Return the macro AUC-ROC of a probe, or for two classes the AUC-ROC of class 1.

    With two classes, the images are ranked by the log-odds of class 1, which orders them like
    p(class 1) but does not round to 1.0 and tie when the probe is confident.
    """
    logits = probe.logits(features)                                   # (N, C)
    if logits.shape[1] == 2:
        return auc_roc(logits[:, 1] - logits[:, 0], targets == 1)
    return macro_auc_roc(logits.softmax(dim=1), targets)


def fit_probe(train_features: torch.Tensor, train_targets: torch.Tensor, val_features: torch.Tensor,
              val_targets: torch.Tensor, n_classes: int, l2_grid=L2_GRID) -> tuple[LinearProbe, dict[float, float]]:
    """Train one probe per L2 strength and keep the one with the best macro AUC-ROC on the val split.

    Returns the probe and the val score of every strength. The evaluation split is not an
    argument, so it cannot influence the choice. When val has a single class, its AUC-ROC is
    undefined and accuracy decides.
    """
    best, val_scores = None, {}
    for l2 in l2_grid:
        probe = train_logistic_regression(train_features, train_targets, n_classes, l2)
        score = probe_auc_roc(probe, val_features, val_targets)
        if math.isnan(score):
            score = accuracy(val_targets, probe.logits(val_features).argmax(dim=1))
        val_scores[l2] = score
        if best is None or score > val_scores[best.l2]:
            best = probe
    return best, val_scores


def sample_shots(targets: torch.Tensor, n_classes: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Sample the indices of k random examples of each class, or all of a class's examples if it has fewer."""
    chosen = []
    for c in range(n_classes):
        members = (targets == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen)


def sample_percent(n: int, percent: float, generator: torch.Generator) -> torch.Tensor:
    """Sample the indices of a random percent of n examples, at least one."""
    count = max(1, round(n * percent / 100))
    return torch.randperm(n, generator=generator)[:count]


def mean_and_std(values: list[float]) -> dict:
    """Summarise values: mean, sample standard deviation (0 for one value) and the values themselves."""
    array = np.array(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "values": [float(v) for v in array]}


def probe_regimes(train: tuple, val: tuple, evaluation: tuple, n_classes: int, shots, percents, seeds: int) -> dict:
    """Score probes on the evaluation split in every regime: k shots per class, then percentages.

    train, val and evaluation are (features (N, D), targets (N,)) pairs. Each k-shot regime and
    each percentage below 100 is drawn again for every seed. 100 % is the whole training split,
    so one run.
    """
    train_x, train_targets = train
    eval_x, eval_targets = evaluation
    regimes = [(f"{k}-shot", seeds, lambda g, k=k: sample_shots(train_targets, n_classes, k, g)) for k in shots]
    regimes += [(f"{p:g}%", seeds if p < 100 else 1, lambda g, p=p: sample_percent(len(train_targets), p, g))
                for p in percents]
    scores = {}
    for name, runs, sample in regimes:
        auc_values, accuracy_values, l2_values, sizes = [], [], [], []
        for seed in range(runs):
            chosen = sample(torch.Generator().manual_seed(seed))
            probe, _ = fit_probe(train_x[chosen], train_targets[chosen], *val, n_classes)
            auc_values.append(probe_auc_roc(probe, eval_x, eval_targets))
            accuracy_values.append(accuracy(eval_targets, probe.logits(eval_x).argmax(dim=1)))
            l2_values.append(probe.l2)
            sizes.append(len(chosen))
        scores[name] = {"auc_roc": mean_and_std(auc_values), "accuracy": mean_and_std(accuracy_values),
                        "l2": l2_values, "train_examples": sizes}
    return scores


def evaluate_fewshot(features: dict[str, torch.Tensor], pairs: dict[str, list[Pair]], tasks: dict,
                     shots=SHOTS, percents=PERCENTS, seeds: int = 5) -> dict:
    """Score linear probes for every label in tasks, print the scores and return them.

    features (image embeddings) and pairs have the keys "train", "val" and "eval". tasks maps a
    label name to its class names, or to None for a binary finding. A class without examples in
    the evaluation split is left out, and a label is skipped, with a printed note, when fewer
    than two classes remain or a split has no labelled example. "auc_roc" is the macro AUC-ROC
    for more than two classes and the AUC-ROC of the second class for two (a binary finding's positive).
    """
    results, skipped = {}, {}
    for label, classes in tasks.items():
        if classes is not None:
            classes = classes_present(pairs["eval"], label, classes)
            if len(classes) < 2:
                skipped[label] = "fewer than two of its classes have examples in the evaluation split"
                continue
        class_names = ["negative", "positive"] if classes is None else classes
        labelled = {}
        for split in ("train", "val", "eval"):
            if classes is None:
                index, targets = binary_targets(pairs[split], label)
            else:
                index, targets = class_targets(pairs[split], label, classes)
            labelled[split] = (features[split][index], targets)
        sizes = {split: len(targets) for split, (_, targets) in labelled.items()}
        if min(sizes.values()) == 0:
            skipped[label] = f"a split has no labelled example ({sizes})"
            continue
        if labelled["eval"][1].unique().numel() < 2:
            skipped[label] = "the evaluation split has a single class"
            continue

        counts = torch.bincount(labelled["train"][1], minlength=len(class_names)).tolist()
        short = [f"{name} ({count})" for name, count in zip(class_names, counts) if shots and count < max(shots)]
        if short:
            print(f"few-shot {label}: fewer training examples than {max(shots)} for {', '.join(short)}, "
                  f"so a k-shot sample with a larger k takes all of them")
        results[label] = {
            "kind": "binary" if classes is None else "multiclass", "classes": class_names, "examples": sizes,
            "regimes": probe_regimes(labelled["train"], labelled["val"], labelled["eval"], len(class_names),
                                     shots, percents, seeds),
        }

    for label, reason in skipped.items():
        print(f"few-shot {label}: skipped, {reason}")
    summary = {"l2_grid": list(L2_GRID), "seeds": seeds, "labels": results, "skipped": skipped}
    findings = [r for r in results.values() if r["kind"] == "binary"]
    if findings:
        # For each run, the mean over findings. Then the mean and spread of that over the runs.
        summary["mean_auc_roc"] = {
            name: mean_and_std(np.mean([r["regimes"][name]["auc_roc"]["values"] for r in findings], axis=0).tolist())
            for name in findings[0]["regimes"]
        }
    print_fewshot(summary)
    return summary


def print_fewshot(summary: dict) -> None:
    print(f"few-shot linear probe, {summary['seeds']} seeds, L2 picked on val from {summary['l2_grid']}")
    if not summary["labels"]:
        return
    regimes = list(next(iter(summary["labels"].values()))["regimes"])
    print(f"{'':34}" + "".join(f"{name:>14}" for name in regimes))

    def row(title: str, stats: list[dict], digits: int) -> None:
        cells = [f"{s['mean']:.{digits}f}+-{s['std']:.{digits}f}" for s in stats]
        print(f"{title[:34]:34}" + "".join(f"{cell:>14}" for cell in cells))

    for label, r in summary["labels"].items():
        if r["kind"] == "multiclass":
            row(f"{label} macro AUC", [r["regimes"][n]["auc_roc"] for n in regimes], 3)
            row(f"{label} accuracy", [r["regimes"][n]["accuracy"] for n in regimes], 1)
        else:
            row(f"{label} AUC", [r["regimes"][n]["auc_roc"] for n in regimes], 3)
    if "mean_auc_roc" in summary:
        row("mean AUC over findings", [summary["mean_auc_roc"][n] for n in regimes], 3)


# -----------------------------------------------------------------------------
# picture of retrieval examples

THUMBNAIL = 112       # side of an image in the picture, in pixels
PICTURE_WIDTH = 860   # pixels
MARGIN = 10           # pixels
GREEN = (0, 150, 60)
GREY = (170, 170, 170)
INK = (25, 25, 25)


def load_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow before 10.1 has only a fixed-size bitmap font
        return ImageFont.load_default()


def wrap_text(text: str, font, width: int, max_lines: int) -> list[str]:
    """Break text into lines at most width pixels wide and keep max_lines, marking a cut with '...'."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += " ..."
    return lines


def thumbnail(pair: Pair) -> Image.Image:
    pixels = load_image(pair.image_path, channels=3)                  # (H, W, 3) in [0, 1]
    image = Image.fromarray(np.round(pixels * 255).astype(np.uint8))
    return ImageOps.pad(image, (THUMBNAIL, THUMBNAIL), color=(0, 0, 0))


def draw_text_query(pair: Pair, pairs: list[Pair], top: list[int], correct: list[bool], scores: list[float],
                    rank: int) -> Image.Image:
    """Draw one text query: its wrapped text above its top images, correct ones outlined in green."""
    font, small = load_font(14), load_font(12)
    line_height = 18
    lines = wrap_text(f'query (first correct image at rank {rank}): "{pair.text}"', font,
                      PICTURE_WIDTH - 2 * MARGIN, max_lines=3)
    height = len(lines) * line_height + THUMBNAIL + 2 * line_height
    block = Image.new("RGB", (PICTURE_WIDTH, height), "white")
    draw = ImageDraw.Draw(block)
    for i, line in enumerate(lines):
        draw.text((MARGIN, i * line_height), line, font=font, fill=INK)
    y = len(lines) * line_height + 4
    for position, (j, is_correct, score) in enumerate(zip(top, correct, scores)):
        x = MARGIN + position * (THUMBNAIL + 3 * MARGIN)
        block.paste(thumbnail(pairs[j]), (x, y))
        outline = (GREEN, 5) if is_correct else (GREY, 1)
        draw.rectangle((x - 3, y - 3, x + THUMBNAIL + 2, y + THUMBNAIL + 2), outline=outline[0], width=outline[1])
        draw.text((x, y + THUMBNAIL + 4), f"{position + 1}. similarity {score:.2f}", font=small,
                  fill=GREEN if is_correct else INK)
    return block


def draw_image_query(pair: Pair, pairs: list[Pair], top: list[int], correct: list[bool], rank: int) -> Image.Image:
    """Draw one image query: the image on the left, its top reports on the right, correct ones in green."""
    font, small = load_font(13), load_font(12)
    line_height = 17
    left = 2 * MARGIN + THUMBNAIL
    entries = []
    for position, (j, is_correct) in enumerate(zip(top, correct)):
        mark = "[correct] " if is_correct else ""
        entries.append((wrap_text(f"{position + 1}. {mark}{pairs[j].text}", font, PICTURE_WIDTH - left - MARGIN, 2),
                        GREEN if is_correct else INK))
    text_height = sum(len(lines) * line_height + 4 for lines, _ in entries)
    block = Image.new("RGB", (PICTURE_WIDTH, max(THUMBNAIL + line_height, text_height) + MARGIN), "white")
    block.paste(thumbnail(pair), (MARGIN, 0))
    draw = ImageDraw.Draw(block)
    draw.text((MARGIN, THUMBNAIL + 2), f"first correct: rank {rank}", font=small, fill=INK)
    y = 0
    for lines, colour in entries:
        for line in lines:
            draw.text((left, y), line, font=font, fill=colour)
            y += line_height
        y += 4
    return block


def draw_retrieval_examples(pairs: list[Pair], similarity: torch.Tensor, groups: torch.Tensor, path: Path,
                            title: str, n_queries: int = 4, top_k: int = 5) -> Path:
    """Write a PNG with the top_k retrieved items of a few text queries and a few image queries.

    similarity (N_img, N_txt) and groups (N,) index pairs. Queries are spread evenly over the
    split, and an item is correct when it shares the query's group, as in retrieval_metrics.
    """
    n = len(pairs)
    top_k = min(top_k, n)
    queries = sorted(set(np.linspace(0, n - 1, min(n_queries, n)).round().astype(int).tolist()))
    heading = load_font(16)

    def header(text: str) -> Image.Image:
        block = Image.new("RGB", (PICTURE_WIDTH, 30), "white")
        ImageDraw.Draw(block).text((MARGIN, 6), text, font=heading, fill=INK)
        return block

    text_ranks = ranks_of_first_match(similarity.T, groups, groups)  # (N,) for each text query
    image_ranks = ranks_of_first_match(similarity, groups, groups)   # (N,) for each image query

    blocks = [header(title), header(f"text -> image: top {top_k} images per report (green outline: correct)")]
    for q in queries:
        scores, top = similarity[:, q].topk(top_k)                    # images ranked for text q
        correct = (groups[top] == groups[q]).tolist()
        blocks.append(draw_text_query(pairs[q], pairs, top.tolist(), correct, scores.tolist(), int(text_ranks[q])))
    blocks.append(header(f"image -> text: top {top_k} reports per image (green, [correct]: correct)"))
    for q in queries:
        _, top = similarity[q].topk(top_k)                            # texts ranked for image q
        correct = (groups[top] == groups[q]).tolist()
        blocks.append(draw_image_query(pairs[q], pairs, top.tolist(), correct, int(image_ranks[q])))

    picture = Image.new("RGB", (PICTURE_WIDTH, sum(b.height for b in blocks) + MARGIN), "white")
    y = 0
    for block in blocks:
        picture.paste(block, (0, y))
        y += block.height
    picture.save(path)
    return path


# -----------------------------------------------------------------------------
# loading a checkpoint

def load_checkpoint(path: Path, which: str, device: torch.device):
    """Return (model, tokenizer, checkpoint dict) with `which` = "student" or "teacher" weights loaded.

    Loading runs no code from the file: tensors and plain data only (weights_only=True). The
    tokenizer is the one stored in the checkpoint, so a tokenizer.json that a later run wrote
    into the same folder cannot silently change the token ids. A checkpoint without a stored
    tokenizer falls back to tokenizer.json beside it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        sys.exit(f"error: checkpoint {path} not found; train one with `python train.py --accum 8` "
                 f"or pass --checkpoint PATH")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[-1]
        sys.exit(f"error: rejected {path}: it holds objects other than tensors and plain data, and "
                 f"loading them could run code ({reason}); pass a checkpoint written by train.py")
    except (RuntimeError, EOFError) as error:
        sys.exit(f"error: cannot read checkpoint {path} ({error}); it may be truncated, so pass an "
                 f"earlier checkpoint of the run")
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
    if checkpoint.get("tokenizer"):
        tokenizer = Tokenizer.from_str(checkpoint["tokenizer"])
    else:
        try:
            tokenizer = load_tokenizer(path.parent / "tokenizer.json")
        except FileNotFoundError:
            sys.exit(f"error: {path} stores no tokenizer and there is no tokenizer.json beside it; "
                     f"copy the tokenizer.json of the training run there")
    return model.to(device).eval(), tokenizer, checkpoint


# -----------------------------------------------------------------------------
# command line

def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["retrieval", "zeroshot", "fewshot", "all"], default="retrieval",
                   help="what to evaluate; all runs the three and writes one JSON (default: %(default)s)")
    p.add_argument("--checkpoint", default="runs/default/checkpoint.pt",
                   help="checkpoint written by train.py; tokenizer.json must be beside it (default: %(default)s)")
    p.add_argument("--model", choices=["student", "teacher"], default="student",
                   help="which encoders to evaluate: the trained student or its EMA teacher (default: %(default)s)")
    p.add_argument("--data", default=None, help="dataset spec as for train.py (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the dataset's held-out split, test or dev)")
    p.add_argument("--max-pairs", type=int, default=0,
                   help="evaluate a seeded random subset of this many pairs of --split, 0 = all; use it to compare "
                        "a slice of the training split with the held-out split at equal size (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="pairs per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="JSON file for the scores; the retrieval picture is written beside it as .png "
                        "(default: TASK_SPLIT_MODEL.json beside the checkpoint)")

    g = p.add_argument_group("zero-shot and few-shot")
    g.add_argument("--prompts", default=None, metavar="FILE.json",
                   help=f"prompts to use in place of the built-in ones for the dataset: {PROMPT_FILE_FORMAT}. "
                        "Multi-class values are compared as strings with the class names")
    g.add_argument("--labels", nargs="+", default=None, metavar="LABEL",
                   help="label names to evaluate (default: every label with prompts; few-shot without any "
                        "prompts for the dataset: every label of the dataset)")
    g.add_argument("--shots", type=int, nargs="+", default=list(SHOTS),
                   help="few-shot training examples per class (default: %(default)s)")
    g.add_argument("--percents", type=float, nargs="+", default=list(PERCENTS),
                   help="few-shot percentages of the labelled training split (default: %(default)s)")
    g.add_argument("--seeds", type=int, default=5,
                   help="few-shot repeats with different samples of the training split (default: %(default)s)")
    g.add_argument("--picture-queries", type=int, default=4,
                   help="text and image queries drawn in the retrieval picture, 0 = no picture (default: %(default)s)")

    args = p.parse_args(argv)
    if any(k < 1 for k in args.shots):
        p.error(f"--shots must be positive integers, got {args.shots}")
    if any(not 0 < percent <= 100 for percent in args.percents):
        p.error(f"--percents must be in (0, 100], got {args.percents}")
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.picture_queries < 0:
        p.error(f"--picture-queries must be 0 or more, got {args.picture_queries}")
    return args


def choose_prompts(args, source) -> dict:
    """Return the prompt table entries to evaluate: --prompts or the built-in table, limited to --labels."""
    if args.prompts:
        try:
            table = load_prompts(Path(args.prompts))
        except (OSError, ValueError) as error:
            sys.exit(f"error: {error}")
    else:
        table = PROMPTS.get(source.name, {})
    if args.labels:
        unknown = [name for name in args.labels if name not in source.label_names]
        if unknown:
            sys.exit(f"error: --labels {unknown} not found in the {source.name} dataset. "
                     f"Its labels are {list(source.label_names)}")
        return {name: table[name] for name in args.labels if name in table}
    for name in table:
        if name not in source.label_names:
            print(f"note: prompts for {name!r} ignored because the {source.name} dataset has no such label")
    return {name: entry for name, entry in table.items() if name in source.label_names}


def infer_classes(pairs: list[Pair], label: str) -> list[str] | None:
    """Infer the classes of a label without prompts from its values: None (binary) when all are 0 or 1."""
    values = [pair.labels.get(label) for pair in pairs if pair.labels.get(label) is not None]
    if values and all(value in (0, 1) for value in values):
        return None
    return sorted({str(value) for value in values})


def fewshot_tasks(args, source, prompts: dict, train_pairs: list[Pair]) -> dict:
    """Return the labels to probe, each mapped to its class names, or to None for a binary finding."""
    names = args.labels or list(prompts) or list(source.label_names)
    tasks = {}
    for name in names:
        if name in prompts:
            tasks[name] = None if is_binary(prompts[name]) else list(prompts[name])
        else:
            tasks[name] = infer_classes(train_pairs, name)
    return tasks


def run_fewshot(args, model, tokenizer, device, source, split: str, pairs: list[Pair],
                image_features: torch.Tensor, prompts: dict) -> dict:
    """Embed the train and val splits and score the probes on the evaluation pairs.

    Returns {"not_run": reason} when the dataset lacks a train or val split, or when --split is
    one of them, because the probe would then be scored on data it was trained or tuned on.
    """
    if split in ("train", "val") or not {"train", "val"} <= set(source.splits):
        note = (f"the probe trains on the train split and picks L2 on the val split, so it needs both and "
                f"a third split to score on, but the {source.name} dataset has {list(source.splits)} "
                f"and --split is {split}")
        print(f"few-shot: not run, {note}")
        return {"not_run": note}
    fewshot_pairs = {"train": source.pairs("train"), "val": source.pairs("val"), "eval": pairs}
    features = {"eval": image_features}
    for name in ("train", "val"):
        features[name] = embed_split(model, tokenizer, fewshot_pairs[name], device, args.batch_size)[0]
    tasks = fewshot_tasks(args, source, prompts, fewshot_pairs["train"])
    return evaluate_fewshot(features, fewshot_pairs, tasks, args.shots, args.percents, args.seeds)


def to_json(value):
    """Replace NaN with None, since JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def main(argv=None) -> dict:
    from train import pick_device  # imported here because train imports this module

    args = get_args(argv)
    device = pick_device(args.device)
    model, tokenizer, checkpoint = load_checkpoint(Path(args.checkpoint), args.model, device)
    train_args = checkpoint["args"]
    spec = args.data if args.data is not None else train_args["data"]
    try:
        source = open_source(spec)
        split = args.split or source.eval_split
        pairs = source.pairs(split)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    if args.max_pairs and len(pairs) > args.max_pairs:
        keep = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:args.max_pairs]
        pairs = [pairs[i] for i in sorted(keep.tolist())]
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / f"{args.task}_{split}_{args.model}.json"
    print(f"{args.task} on {source.name} {split}: {len(pairs)} pairs, "
          f"{args.model} of {args.checkpoint} at step {checkpoint['step']}")
    result = {"task": args.task, "checkpoint": str(args.checkpoint), "step": checkpoint["step"],
              "model": args.model, "data": source.name, "split": split, "pairs": len(pairs),
              "train_config": train_args}

    image_features, text_features, groups = embed_split(model, tokenizer, pairs, device, args.batch_size)

    if args.task in ("retrieval", "all"):
        similarity = image_features @ text_features.T                 # (N, N)
        section = evaluate_retrieval(similarity, groups)
        if args.picture_queries:
            picture = out.with_suffix(".png")
            title = f"retrieval on {source.name} {split}, {args.model} at step {checkpoint['step']}"
            draw_retrieval_examples(pairs, similarity, groups, picture, title, n_queries=args.picture_queries)
            section["picture"] = str(picture)
            print(f"retrieval examples drawn in {picture}")
        if args.task == "retrieval":
            result.update(section)
        else:
            result["retrieval"] = section

    prompts = choose_prompts(args, source) if args.task in ("zeroshot", "fewshot", "all") else {}

    if args.task in ("zeroshot", "all"):
        if prompts:
            result["zeroshot"] = evaluate_zeroshot(model, tokenizer, device, image_features, pairs, prompts)
        else:
            note = f"no prompts for the {source.name} dataset and the chosen labels, so pass --prompts FILE.json"
            print(f"zero-shot: not run, {note}")
            result["zeroshot"] = {"not_run": note}

    if args.task in ("fewshot", "all"):
        result["fewshot"] = run_fewshot(args, model, tokenizer, device, source, split, pairs, image_features, prompts)

    out.write_text(json.dumps(to_json(result), indent=2, default=str))
    print(f"scores written to {out}")
    return result


if __name__ == "__main__":
    main()
