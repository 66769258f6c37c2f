"""Image-text pairs: sources, image loading, transforms, tokenizer and the training dataset.

Three sources of image-text pairs share one interface, DataSource:

* synthetic: procedurally drawn chest radiographs with template reports. They are generated
  on first use, so every script runs without a download.
* medpix: the MedPix 2.0 release (CT and MR images with captions).
* manifest: any JSONL or CSV file that lists image paths and texts.

PairDataset turns a list of pairs into model inputs: a normalised image, token ids, an
attention mask and a group id. Pairs that share a group (for example two images with the
same report) must not be used as each other's negatives in the contrastive loss.
"""

import csv
import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from tokenizers.processors import TemplateProcessing
from tokenizers.trainers import WordPieceTrainer
from tqdm import tqdm

logger = logging.getLogger("data")

DEFAULT_SYNTHETIC_ROOT = Path(__file__).resolve().parent / "data" / "synthetic-cxr"

# -----------------------------------------------------------------------------
# Pairs and data sources


@dataclass
class Pair:
    """One image and the text that describes it."""

    image_path: Path
    text: str
    group: str  # pairs that share a group are never used as each other's negatives
    labels: dict[str, object] = field(default_factory=dict)  # {"cardiomegaly": 1, ...} or {"Type": "CT", ...}


@dataclass
class DataSource:
    """A dataset: named splits of pairs plus the label names its pairs carry."""

    name: str  # "synthetic", "medpix" or "manifest"
    root: Path
    splits: tuple[str, ...]
    eval_split: str  # held-out split that evaluation uses by default
    label_names: tuple[str, ...]
    pairs_by_split: dict[str, list[Pair]] = field(default_factory=dict, repr=False)

    def pairs(self, split: str) -> list[Pair]:
        """Return a copy of the pairs in `split`. Raises ValueError for an unknown split."""
        if split not in self.pairs_by_split:
            raise ValueError(
                f"split {split!r} not found in the {self.name} dataset at {self.root}; "
                f"available splits: {', '.join(self.splits)}"
            )
        return list(self.pairs_by_split[split])


def _clean_text(text: object) -> str:
    """Collapse runs of whitespace; None becomes the empty string."""
    return " ".join(str(text).split()) if text is not None else ""


def _text_group(text: str) -> str:
    """Return a group id that two pairs share exactly when their texts are identical."""
    return "text-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _holdout_keys(keys: list[str], fraction: float = 0.1) -> set[str]:
    """Pick about `fraction` of the distinct keys, the same ones on every run and machine.

    Keys are ranked by a SHA-1 hash, so the choice does not depend on row order. At least one
    key is held out when there are two or more.
    """
    unique = sorted(set(keys), key=lambda key: hashlib.sha1(key.encode("utf-8")).hexdigest())
    if len(unique) < 2:
        return set()
    count = max(1, round(fraction * len(unique)))
    return set(unique[:count])


# -----------------------------------------------------------------------------
# Image loading

HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L"


def load_image(path: Path, channels: int = 1) -> np.ndarray:
    """Read an image file as float32 (H, W, channels) in [0, 1].

    8-bit modes are divided by 255. Alpha is composited onto black, so transparent pixels
    become black. 16-bit, 32-bit integer and float images are rescaled by their own min..max,
    which keeps their dynamic range. An image whose pixels are all equal becomes all zeros.
    channels=1 returns luminance and channels=3 returns RGB, with grey replicated.
    Raises FileNotFoundError for a missing file and ValueError for one Pillow cannot decode.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            pixels = _decode_pixels(image)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error

    if channels == 1 and pixels.shape[2] == 3:
        pixels = (pixels @ LUMA_WEIGHTS)[:, :, None]
    elif channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32)


def _decode_pixels(image: Image.Image) -> np.ndarray:
    """Convert a Pillow image to float32 (H, W, 1) or (H, W, 3) in [0, 1]."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        values = np.asarray(image, dtype=np.float64)
        low, high = values.min(), values.max()
        if high > low:
            scaled = (values - low) / (high - low)
        else:
            scaled = np.zeros_like(values)
        return scaled.astype(np.float32)[:, :, None]
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float32)[:, :, None] / 255
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255  # P, LA, RGB, CMYK, ...
    return rgba[:, :, :3] * rgba[:, :, 3:]


# -----------------------------------------------------------------------------
# Image transforms


class ImageTransform:
    """Crop, resize and normalise an (H, W, C) image into a float32 (C, S, S) tensor.

    eval: resize so the shorter side is image_size, then centre crop to a square.
    train: random resized crop (60-100 % of the area, aspect ratio 3/4 to 4/3) resized to
    image_size, then a random brightness shift (+-0.1) and contrast factor (0.8-1.2).
    Both map [0, 1] to [-1, 1] with mean 0.5 and std 0.5 for every channel.
    The input is uint8 (divided by 255) or float in [0, 1]. Randomness comes from torch's
    global RNG, which DataLoader seeds separately in every worker.

    There is deliberately no horizontal flip. Reports name sides ("small left pleural
    effusion"), and a flip would move the finding to the other side while the text still
    reads "left". It would also put the heart on the wrong side.
    """

    MEAN = 0.5
    STD = 0.5
    CROP_SCALE = (0.6, 1.0)
    CROP_RATIO = (3 / 4, 4 / 3)

    def __init__(self, image_size: int, channels: int = 1, train: bool = False):
        self.image_size = image_size
        self.channels = channels
        self.train = train

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(f"expected an (H, W, {self.channels}) image, got shape {image.shape}")
        if image.dtype == np.uint8:
            pixels = image.astype(np.float32) / 255
        else:
            pixels = image.astype(np.float32)

        height, width = pixels.shape[:2]
        box = self._random_crop_box(height, width) if self.train else self._centre_crop_box(height, width)
        size = (self.image_size, self.image_size)
        planes = []
        for c in range(self.channels):
            plane = Image.fromarray(np.ascontiguousarray(pixels[:, :, c]))  # mode "F"
            planes.append(np.asarray(plane.resize(size, Image.Resampling.BILINEAR, box=box)))
        out = torch.from_numpy(np.stack(planes))  # (C, S, S)

        if self.train:
            contrast = _uniform(0.8, 1.2)
            brightness = _uniform(-0.1, 0.1)
            out = ((out - out.mean()) * contrast + out.mean() + brightness).clamp(0.0, 1.0)
        return (out - self.MEAN) / self.STD

    def _centre_crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        side = min(height, width)
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)

    def _random_crop_box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """Sample a box with CROP_SCALE of the area and an aspect ratio in CROP_RATIO.

        After 10 tries that do not fit inside the image, return the centre square.
        """
        area = height * width
        log_ratio = (math.log(self.CROP_RATIO[0]), math.log(self.CROP_RATIO[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.CROP_SCALE)
            aspect = math.exp(_uniform(*log_ratio))
            crop_width = round(math.sqrt(target_area * aspect))
            crop_height = round(math.sqrt(target_area / aspect))
            if 0 < crop_width <= width and 0 < crop_height <= height:
                top = int(torch.randint(0, height - crop_height + 1, ()))
                left = int(torch.randint(0, width - crop_width + 1, ()))
                return (left, top, left + crop_width, top + crop_height)
        return self._centre_crop_box(height, width)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


# -----------------------------------------------------------------------------
# Tokenizer

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # in id order, so [PAD] = 0


def train_tokenizer(texts: list[str], vocab_size: int = 4000) -> Tokenizer:
    """Train a lowercase WordPiece tokenizer that encodes each text as [CLS] text [SEP]."""
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer saved with tokenizer.save() from tokenizer.json or its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found; train one with train_tokenizer() and save it "
            "with tokenizer.save(path)"
        )
    return Tokenizer.from_file(str(path))


def tokenize(tokenizer: Tokenizer, texts: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode texts as (N, max_len) token ids and an attention mask (True = real token).

    Longer texts are truncated with [CLS] kept first and [SEP] last. Shorter ones are padded
    with [PAD]. This sets the tokenizer's own truncation and padding to max_len.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 to fit [CLS] and [SEP], got {max_len}")
    pad_id = tokenizer.token_to_id("[PAD]")
    if pad_id is None:
        raise ValueError("tokenizer has no [PAD] token; create it with train_tokenizer()")
    tokenizer.enable_truncation(max_length=max_len)
    tokenizer.enable_padding(length=max_len, pad_id=pad_id, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long).reshape(len(texts), max_len)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.bool).reshape(len(texts), max_len)
    return ids, mask


# -----------------------------------------------------------------------------
# Synthetic chest radiographs
#
# Each study is drawn in "patient coordinates": x runs from -1 (image left) to 1 (image right)
# and y from -1 (top) to 1 (bottom) across the film. Films are posteroanterior (PA) and viewed
# as if facing the patient, so the patient's left side appears on the image's right.
# A random pose (scale, shift, rotation) maps the pixel grid into these coordinates.

SYNTHETIC_LABELS = (
    "cardiomegaly", "pleural_effusion", "pneumothorax", "nodule", "consolidation", "support_device", "normal",
)
SYNTHETIC_VERSION = 1  # bump when the images or reports change, so old folders are not reused
# Findings are sampled independently, so about 27 % of studies are normal.
PREVALENCE = {
    "cardiomegaly": 0.20, "pleural_effusion": 0.22, "pneumothorax": 0.16,
    "nodule": 0.22, "consolidation": 0.20, "support_device": 0.18,
}
IMAGE_X_SIGN = {"right": -1.0, "left": 1.0}  # the patient's right lung is on the image's left
MM_PER_UNIT = 180.0  # patient coordinates span 2 units, so the film is 36 cm wide
CARINA_Y = -0.30


def _sample_study(rng: np.random.Generator) -> dict:
    """Sample the patient's pose and anatomy and a list of findings."""
    pose = {
        "scale": rng.uniform(0.9, 1.05),
        "shift": (rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.06)),
        "angle": math.radians(rng.uniform(-5, 5)),
    }
    film = {  # exposure and image quality
        "window": (rng.uniform(-0.06, 0.06), rng.uniform(0.85, 1.1)),
        "gamma": rng.uniform(0.8, 1.25),
        "gradient": rng.uniform(-0.04, 0.04),  # uneven exposure from top to bottom
        "blur": rng.uniform(0.4, 0.9),  # Gaussian sigma in pixels at 128 px
        "noise": rng.uniform(0.01, 0.03),
    }
    anatomy = {
        "lung_x": rng.uniform(0.38, 0.43),  # distance of each lung's centre from the midline
        "lung_y": rng.uniform(-0.08, 0.0),
        "lung_half_width": rng.uniform(0.24, 0.29),
        "lung_half_height": rng.uniform(0.62, 0.70),
        "dome_y": {"right": rng.uniform(0.40, 0.48)},  # lateral end of each hemidiaphragm
        "dome_height": rng.uniform(0.08, 0.14),
        "cardiothoracic_ratio": rng.uniform(0.40, 0.49),
    }
    anatomy["dome_y"]["left"] = anatomy["dome_y"]["right"] + rng.uniform(0.02, 0.06)  # left sits lower

    findings = []
    present = {name for name, p in PREVALENCE.items() if rng.random() < p}
    if "support_device" in present:
        kinds = ["endotracheal_tube", "central_line", "pacemaker"]
        chosen = rng.choice(kinds, size=rng.choice([1, 1, 2]), replace=False)
        for device in sorted(chosen, key=kinds.index):
            finding = {"finding": "support_device", "device": str(device)}
            if device == "central_line":
                finding["side"] = str(rng.choice(["right", "right", "left"]))
                finding["route"] = str(rng.choice(["jugular", "subclavian"]))
            elif device == "pacemaker":
                finding["side"] = str(rng.choice(["left", "left", "left", "right"]))
            else:
                finding["tip_cm"] = int(rng.integers(2, 7))  # distance above the carina
            findings.append(finding)
    if "cardiomegaly" in present:
        severity = str(rng.choice(["mild", "moderate", "marked"], p=[0.45, 0.35, 0.2]))
        low, high = {"mild": (0.52, 0.56), "moderate": (0.56, 0.61), "marked": (0.61, 0.68)}[severity]
        anatomy["cardiothoracic_ratio"] = rng.uniform(low, high)
        findings.append({"finding": "cardiomegaly", "severity": severity})
    for name in ("consolidation", "nodule"):
        if name in present:
            finding = {"finding": name, "side": str(rng.choice(["right", "left"])),
                       "zone": str(rng.choice(["upper", "middle", "lower"]))}
            if name == "nodule":
                finding["size"] = str(rng.choice(["small", "large"], p=[0.6, 0.4]))
                low, high = (8, 14) if finding["size"] == "small" else (18, 30)
                finding["diameter_mm"] = int(rng.integers(low, high + 1))
            findings.append(finding)
    if "pleural_effusion" in present:
        side = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.4, 0.2]))
        size = str(rng.choice(["small", "moderate", "large"], p=[0.45, 0.35, 0.2]))
        findings.append({"finding": "pleural_effusion", "side": side, "size": size})
    if "pneumothorax" in present:
        size = str(rng.choice(["small", "moderate", "large"], p=[0.45, 0.35, 0.2]))
        findings.append({"finding": "pneumothorax", "side": str(rng.choice(["right", "left"])), "size": size})
    return {"pose": pose, "film": film, "anatomy": anatomy, "findings": findings}


def _synthetic_labels(findings: list[dict]) -> dict[str, int]:
    present = {f["finding"] for f in findings}
    labels = {name: int(name in present) for name in SYNTHETIC_LABELS[:-1]}
    labels["normal"] = int(not present)
    return labels


def _soft(distance: np.ndarray, width: float) -> np.ndarray:
    """Soft step: about 0 for distance << -width, 0.5 at 0, about 1 for distance >> width."""
    return 0.5 * (1.0 + np.tanh(distance / width))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise: a cells x cells grid of N(0, 1) values, bicubically upsampled."""
    grid = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))


def _polyline_mask(x: np.ndarray, y: np.ndarray, points: list[tuple[float, float]],
                   width: float) -> np.ndarray:
    """Soft line of the given width (patient units) through `points`, 1 on the centre line."""
    distance = np.full(x.shape, np.inf, dtype=x.dtype)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        distance = np.minimum(distance, np.sqrt((x - x0 - t * dx) ** 2 + (y - y0 - t * dy) ** 2))
    return _soft(width / 2 - distance, width / 4)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Blur with a separable Gaussian kernel of `sigma` pixels, repeating the edge pixels."""
    radius = max(1, round(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    height, width = image.shape
    padded = np.pad(image, ((0, 0), (radius, radius)), mode="edge")
    image = sum(w * padded[:, i:i + width] for i, w in enumerate(kernel))
    padded = np.pad(image, ((radius, radius), (0, 0)), mode="edge")
    return sum(w * padded[i:i + height] for i, w in enumerate(kernel))


def _draw_radiograph(study: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw one PA chest radiograph as a (size, size) uint8 array (bright = dense)."""
    x, y = _patient_grid(study["pose"], size)
    anatomy = study["anatomy"]
    half_w, half_h = anatomy["lung_half_width"], anatomy["lung_half_height"]
    lung_shape, lung_fields = {}, {}
    for side, sign in IMAGE_X_SIGN.items():
        cx, cy = sign * anatomy["lung_x"], anatomy["lung_y"]
        lung_shape[side] = _lung_radius(x, y, cx, cy, half_w, half_h, sign)
        # The diaphragm dome cuts each lung from below and peaks near the lung's centre.
        dome_profile = np.clip(1 - ((x - cx - sign * 0.03) / half_w) ** 2, 0, 1)
        dome = anatomy["dome_y"][side] - anatomy["dome_height"] * dome_profile
        lung_fields[side] = _soft(1 - lung_shape[side], 0.06) * _soft(dome - y, 0.012)
    lungs = lung_fields["right"] + lung_fields["left"]

    # Soft tissue is bright. Air in the lungs subtracts from it, except where the heart lies in front.
    image = _draw_soft_tissue(x, y)
    air = lungs * (0.34 + 0.08 * np.clip(-y, 0, 1))  # apices hold less tissue, so they are darker
    air *= (1 + 0.06 * _smooth_noise(rng, size, 6)) * (1 - 0.95 * _draw_heart(x, y, anatomy))
    markings = _draw_lung_markings(x, y, lung_fields, rng)

    fluid, pneumothorax, pleural_line, opacity = (np.zeros_like(x) for _ in range(4))
    for finding in study["findings"]:
        kind = finding["finding"]
        if kind == "pleural_effusion":
            sides = ["right", "left"] if finding["side"] == "bilateral" else [finding["side"]]
            for side in sides:
                fluid = np.maximum(fluid, _draw_effusion(x, y, anatomy, side, finding["size"], rng))
        elif kind == "pneumothorax":
            space, line = _draw_pneumothorax(x, y, anatomy, lung_shape, finding, rng)
            pneumothorax = np.maximum(pneumothorax, space)
            pleural_line += line
        elif kind == "consolidation":
            opacity = np.maximum(opacity, _draw_consolidation(x, y, anatomy, finding, size, rng) * lungs)
        elif kind == "nodule":
            image += _draw_nodule(x, y, anatomy, finding, rng)
        elif kind == "support_device":
            image += _draw_device(x, y, finding)
    fluid *= _soft(1.15 - np.minimum(lung_shape["right"], lung_shape["left"]), 0.08)  # stay inside the chest
    air *= (1 - 0.92 * fluid) * (1 - 0.7 * opacity)
    air += 0.08 * pneumothorax * lungs  # the pleural space contains air but no lung tissue
    markings *= (1 - pneumothorax) * (1 - fluid)
    image += markings - air + 0.12 * pleural_line + _draw_bones_and_airway(x, y)
    return _expose(image, y, study["film"], size, rng)


def _patient_grid(pose: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the patient coordinates (x, y) of every pixel centre, each (size, size) float32."""
    pixel = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)  # float32 halves drawing time
    px, py = np.meshgrid(pixel, pixel)
    px, py = px - pose["shift"][0], py - pose["shift"][1]
    cos, sin = math.cos(pose["angle"]), math.sin(pose["angle"])
    return (cos * px + sin * py) / pose["scale"], (-sin * px + cos * py) / pose["scale"]


def _draw_soft_tissue(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Draw neck, shoulders and trunk on a dark background, thicker (brighter) at the midline."""
    half_width = 0.2 + 0.72 * _soft(y + 0.74, 0.1)
    body = _soft(half_width - np.abs(x), 0.02)
    image = 0.05 + body * (0.36 + 0.16 * np.sqrt(np.clip(1 - (x / half_width) ** 2, 0, 1)))
    return image + 0.08 * body * _soft(y - 0.45, 0.1)  # denser abdomen below the diaphragm


def _draw_lung_markings(x: np.ndarray, y: np.ndarray, lung_fields: dict,
                        rng: np.random.Generator) -> np.ndarray:
    """Draw vessels that radiate from each hilum and fade outwards, plus curved posterior ribs."""
    vessels = np.zeros_like(x)
    for side, sign in IMAGE_X_SIGN.items():
        hx, hy = sign * 0.16, -0.02
        angle = np.arctan2(y - hy, sign * (x - hx))
        dist = np.sqrt((x - hx) ** 2 + (y - hy) ** 2)
        streaks = (0.5 + 0.5 * np.cos(13 * angle + rng.uniform(0, 6.3) + 4 * dist)) ** 10
        streaks += (0.5 + 0.5 * np.cos(23 * angle + rng.uniform(0, 6.3) - 6 * dist)) ** 14
        vessels += lung_fields[side] * (streaks * np.exp(-dist / 0.3) + 0.6 * np.exp(-((dist / 0.1) ** 2)))
    lateral = np.abs(x)
    rib_phase = (y + 0.9 * lateral - 1.1 * lateral ** 2) / rng.uniform(0.15, 0.18)
    ribs = _soft(np.cos(2 * np.pi * rib_phase) - 0.5, 0.2) * (lung_fields["right"] + lung_fields["left"])
    return 0.1 * vessels + 0.03 * ribs


def _draw_bones_and_airway(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Draw the spine and clavicles (bright) and the trachea (dark) down to the carina."""
    image = _soft(0.06 - np.abs(x), 0.01) * (0.1 + 0.03 * np.cos(2 * np.pi * y / 0.11))
    for sign in (-1.0, 1.0):
        clavicle = [(sign * 0.07, -0.64), (sign * 0.3, -0.7), (sign * 0.62, -0.79)]
        image += 0.14 * _polyline_mask(x, y, clavicle, 0.045)
    return image - 0.12 * _soft(0.028 - np.abs(x), 0.008) * _soft(CARINA_Y - y, 0.02)


def _expose(image: np.ndarray, y: np.ndarray, film: dict, size: int, rng: np.random.Generator) -> np.ndarray:
    """Apply the film's window, gamma, exposure gradient, blur and noise, and return uint8."""
    low, high = film["window"]
    image = np.clip((image - low) / (high - low), 0, 1) ** film["gamma"]
    image += film["gradient"] * y
    image = _gaussian_blur(image, film["blur"] * size / 128)
    image += film["noise"] * rng.standard_normal(image.shape, dtype=np.float32)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _lung_radius(x, y, cx, cy, half_w, half_h, sign) -> np.ndarray:
    """Superellipse "radius" of a lung (< 1 inside) that widens medially towards its base."""
    t = (y - cy) / half_h  # -1 at the apex, 1 at the base
    centre = cx - sign * 0.05 * t
    width = half_w * (1 + 0.12 * t)
    return np.abs((x - centre) / width) ** 2.4 + np.abs(t) ** 2.4


def _draw_heart(x: np.ndarray, y: np.ndarray, anatomy: dict) -> np.ndarray:
    """Draw the heart shadow (plus the aortic knob): a third right of the midline, two thirds left."""
    chest_width = 2 * (anatomy["lung_x"] + anatomy["lung_half_width"])
    width = anatomy["cardiothoracic_ratio"] * chest_width
    cx, cy = width / 6, anatomy["dome_y"]["left"] - 0.14
    # An ellipse whose long axis runs down towards the apex at the image's right. The
    # semi-axes are chosen so that its horizontal extent equals `width`.
    tilt = math.radians(35)
    long_axis = width / 2 / math.sqrt(math.cos(tilt) ** 2 + (0.75 * math.sin(tilt)) ** 2)
    along = (x - cx) * math.cos(tilt) + (y - cy) * math.sin(tilt)
    across = -(x - cx) * math.sin(tilt) + (y - cy) * math.cos(tilt)
    heart = _soft(1 - (along / long_axis) ** 2 - (across / (0.75 * long_axis)) ** 2, 0.06)
    aortic_knob = _soft(1 - ((x - 0.11) / 0.07) ** 2 - ((y + 0.38) / 0.07) ** 2, 0.2)
    return np.maximum(heart, aortic_knob)


def _draw_effusion(x, y, anatomy, side, size, rng) -> np.ndarray:
    """Draw fluid at one lung base whose upper edge (meniscus) rises towards the chest wall."""
    sign = IMAGE_X_SIGN[side]
    cx = sign * anatomy["lung_x"]
    depth = rng.uniform(*{"small": (0.06, 0.12), "moderate": (0.24, 0.34), "large": (0.42, 0.54)}[size])
    level = anatomy["dome_y"][side] - depth  # fluid height above the costophrenic angle
    lateral = np.clip(sign * (x - cx) / anatomy["lung_half_width"], -1, 1)  # -1 medial .. 1 chest wall
    meniscus = level - rng.uniform(0.06, 0.12) * ((lateral + 1) / 2) ** 2
    half_of_chest = _soft(sign * x - 0.05, 0.03)
    return _soft(y - meniscus, 0.025) * half_of_chest


def _draw_pneumothorax(x, y, anatomy, lung_shape, finding, rng) -> tuple[np.ndarray, np.ndarray]:
    """Draw air between the chest wall and a collapsed lung, plus the visceral pleural line."""
    side, sign = finding["side"], IMAGE_X_SIGN[finding["side"]]
    rim_range = {"small": (0.04, 0.06), "moderate": (0.08, 0.11), "large": (0.13, 0.2)}[finding["size"]]
    rim = rng.uniform(*rim_range)  # width of the air rim at the chest wall
    half_w, half_h = anatomy["lung_half_width"], anatomy["lung_half_height"]
    cx = sign * (anatomy["lung_x"] - rim * 0.8)
    cy = anatomy["lung_y"] + rim * 0.9
    collapsed = _lung_radius(x, y, cx, cy, half_w - rim, half_h - rim, sign)
    reach = {"small": -0.1, "moderate": 0.1, "large": 0.35}[finding["size"]]  # lowest extent of the rim
    upper = _soft(reach - y, 0.08)
    inside_chest = _soft(1 - lung_shape[side], 0.06)
    space = _soft(collapsed - 1, 0.04) * inside_chest * upper
    line = np.exp(-(((collapsed - 1) / 0.035) ** 2)) * inside_chest * upper
    return space, line


def _zone_centre(anatomy, side, zone, rng) -> tuple[float, float]:
    sign = IMAGE_X_SIGN[side]
    top = anatomy["lung_y"] - anatomy["lung_half_height"]
    base = anatomy["dome_y"][side] - anatomy["dome_height"]
    fraction = {"upper": 0.3, "middle": 0.55, "lower": 0.8}[zone] + rng.uniform(-0.07, 0.07)
    x = sign * (anatomy["lung_x"] + rng.uniform(-0.25, 0.35) * anatomy["lung_half_width"])
    return x, top + fraction * (base - top)


def _draw_nodule(x, y, anatomy, finding, rng) -> np.ndarray:
    """Draw a round opacity. Small nodules also get lower contrast, so they are subtle."""
    cx, cy = _zone_centre(anatomy, finding["side"], finding["zone"], rng)
    radius = finding["diameter_mm"] / MM_PER_UNIT / 2
    contrast = rng.uniform(0.12, 0.18) if finding["size"] == "small" else rng.uniform(0.18, 0.28)
    dist = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) / radius
    return contrast * np.sqrt(np.clip(1 - dist ** 2, 0, 1))


def _draw_consolidation(x, y, anatomy, finding, size, rng) -> np.ndarray:
    """Draw a patchy opacity: a few overlapping blobs broken up by low-frequency noise."""
    cx, cy = _zone_centre(anatomy, finding["side"], finding["zone"], rng)
    patch = np.zeros_like(x)
    for _ in range(int(rng.integers(3, 6))):
        bx, by = cx + rng.uniform(-0.08, 0.08), cy + rng.uniform(-0.07, 0.07)
        radius = rng.uniform(0.05, 0.11)
        patch += np.exp(-((x - bx) ** 2 + (y - by) ** 2) / (2 * radius ** 2))
    texture = _smooth_noise(rng, size, 12)
    return np.clip(patch * (0.75 + 0.35 * texture), 0, 1) * rng.uniform(0.6, 0.9)


def _draw_device(x, y, finding) -> np.ndarray:
    """Draw a radiopaque tube, catheter or pacemaker as bright lines and a box."""
    device = finding["device"]
    if device == "endotracheal_tube":
        tip = CARINA_Y - finding["tip_cm"] * 10 / MM_PER_UNIT
        return 0.35 * _polyline_mask(x, y, [(0.0, -1.1), (0.0, tip)], 0.03)
    sign = IMAGE_X_SIGN[finding["side"]]
    svc = (-0.07, -0.2)  # the superior vena cava runs right of the midline (image left)
    if device == "central_line":
        if finding["route"] == "jugular":
            path = [(sign * 0.15, -1.1), (sign * 0.11, -0.62), (sign * 0.05 - 0.02, -0.45), svc]
        else:
            path = [(sign * 0.65, -0.72), (sign * 0.32, -0.66), (sign * 0.12, -0.56), svc]
        return 0.25 * _polyline_mask(x, y, path, 0.014)
    box = _soft(0.08 - np.abs(x - sign * 0.52), 0.01) * _soft(0.055 - np.abs(y + 0.66), 0.01)
    lead_start = (sign * 0.46, -0.63)
    atrial = [lead_start, (sign * 0.25, -0.58), (-0.06, -0.38), (-0.04, 0.05)]
    ventricular = [lead_start, (sign * 0.25, -0.56), (-0.04, -0.35), (0.0, 0.12), (0.12, 0.3)]
    leads = np.maximum(_polyline_mask(x, y, atrial, 0.014), _polyline_mask(x, y, ventricular, 0.014))
    return 0.6 * box + 0.3 * leads


# Report templates, filled from a finding's details. {side} is "left" or "right", {size} is
# "small", "moderate" or "large", and {zone} is "upper", "middle", "mid" or "lower".
FINDING_TEMPLATES = {
    "cardiomegaly": [
        "{severity} cardiomegaly.", "The heart is {severity_adverb} enlarged.",
        "The cardiac silhouette is {severity_adverb} enlarged.", "Cardiomegaly, {severity}.",
        "{severity} enlargement of the cardiac silhouette.",
    ],
    "pleural_effusion": [
        "{size} {side} pleural effusion.", "There is a {size} {side} pleural effusion.",
        "{size} {side}-sided pleural effusion.", "{side} pleural effusion, {size}.",
        "A {size} pleural effusion is present on the {side}.",
    ],
    "bilateral_effusion": [
        "{size} bilateral pleural effusions.", "There are {size} bilateral pleural effusions.",
        "Bilateral pleural effusions, {size}.", "{size} pleural effusions on both sides.",
    ],
    "pneumothorax": [
        "{size} {side} pneumothorax.", "There is a {size} {side} pneumothorax.",
        "{side} pneumothorax, {size}.", "A {size} {side}-sided pneumothorax is present.",
        "{size} {side} pneumothorax with a visible pleural line.",
    ],
    "nodule": [
        "{size} nodule in the {side} {zone} zone.", "There is a {size} nodule in the {side} {zone} zone.",
        "A {diameter_mm} mm nodule projects over the {side} {zone} lung.",
        "{side} {zone} zone nodule measuring {diameter_mm} mm.",
        "{size} pulmonary nodule in the {side} {zone} zone.",
    ],
    "consolidation": [
        "Patchy consolidation in the {side} {zone} zone.",
        "Airspace opacity in the {side} {zone} zone, concerning for pneumonia.",
        "There is {side} {zone} zone consolidation.", "Focal consolidation in the {side} {zone} lung.",
        "Patchy airspace disease in the {side} {zone} zone.",
    ],
    "endotracheal_tube": [
        "Endotracheal tube in place.", "The endotracheal tube tip is {tip_cm} cm above the carina.",
        "Endotracheal tube with tip {tip_cm} cm above the carina.",
    ],
    "central_line": [
        "{side} {route} central venous catheter with tip in the superior vena cava.",
        "{side} {route} line in place.", "{side} {route} catheter tip projects over the superior vena cava.",
    ],
    "pacemaker": [
        "{side} chest wall pacemaker with leads projecting over the heart.",
        "{side}-sided pacemaker in place.",
        "Dual-lead pacemaker in the {side} chest wall.",
    ],
}
NEGATION_TEMPLATES = {
    "cardiomegaly": ["The heart size is normal.", "Normal heart size.", "No cardiomegaly.",
                     "The cardiomediastinal silhouette is within normal limits."],
    "consolidation": ["No focal consolidation.", "No focal airspace opacity.", "There is no consolidation."],
    "nodule": ["No pulmonary nodules.", "No suspicious nodules or masses.", "There is no pulmonary nodule."],
    "pleural_effusion": ["No pleural effusion.", "There is no pleural effusion.",
                         "The costophrenic angles are sharp."],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."],
}
# Sentences that deny two absent findings at once.
PAIRED_NEGATION_TEMPLATES = {
    ("consolidation", "nodule"): ["The lungs are clear.",
                                  "The lungs are clear without focal opacity or nodule."],
    ("pleural_effusion", "pneumothorax"): ["No pleural effusion or pneumothorax.",
                                           "No pneumothorax or pleural effusion."],
}
NORMAL_IMPRESSIONS = [
    "No acute cardiopulmonary abnormality.", "No acute cardiopulmonary process.", "Normal chest radiograph.",
    "No acute intrathoracic abnormality.", "Normal chest.",
]


def _write_report(findings: list[dict], rng: np.random.Generator) -> str:
    """Write a report: one sentence per finding, some negations, a normal impression if normal."""
    sentences = []
    for finding in findings:
        key = finding.get("device", finding["finding"])
        if key == "pleural_effusion" and finding["side"] == "bilateral":
            key = "bilateral_effusion"
        words = dict(finding)
        if "severity" in finding:
            words["severity_adverb"] = finding["severity"] + "ly"  # mildly, moderately, markedly
        if "zone" in finding:
            words["zone"] = "mid" if finding["zone"] == "middle" and rng.random() < 0.5 else finding["zone"]
        if "route" in finding:
            words["route"] = {"jugular": "internal jugular", "subclavian": "subclavian"}[finding["route"]]
        template = str(rng.choice(FINDING_TEMPLATES[key]))
        sentences.append(_capitalise(template.format(**words)))

    present = {f["finding"] for f in findings}
    negated = [name for name in NEGATION_TEMPLATES if name not in present and rng.random() < 0.4]
    for pair, templates in PAIRED_NEGATION_TEMPLATES.items():
        if all(name in negated for name in pair) and rng.random() < 0.5:
            negated = [name for name in negated if name not in pair]
            sentences.append(str(rng.choice(templates)))
    sentences += [str(rng.choice(NEGATION_TEMPLATES[name])) for name in negated]
    if not findings:
        sentences.append(str(rng.choice(NORMAL_IMPRESSIONS)))
    return " ".join(sentences)


def _capitalise(sentence: str) -> str:
    return sentence[0].upper() + sentence[1:]


def make_synthetic_dataset(
    root: Path, *, n_train: int = 3000, n_val: int = 300, n_test: int = 500, size: int = 128, seed: int = 0
) -> Path:
    """Generate the synthetic chest radiograph dataset under `root` unless it exists; return root.

    Writes grey PNGs under images/<split>/, manifest.jsonl (one row per image: image, text,
    group, split, labels and the finding details) and dataset.json (the generator settings).
    Everything is written to <root>.partial-<pid> and renamed to root at the end, so a folder
    named root is always complete. An interrupted run leaves that partial folder behind,
    and it can be deleted. The same seed gives the same images and reports.
    Raises ValueError if root contains a dataset made with other settings.
    """
    root = Path(root)
    settings = {"generator": "synthetic-cxr", "version": SYNTHETIC_VERSION, "n_train": n_train,
                "n_val": n_val, "n_test": n_test, "size": size, "seed": seed}
    if (root / "dataset.json").exists():
        existing = json.loads((root / "dataset.json").read_text())
        if existing != settings:
            raise ValueError(
                f"{root} contains a synthetic dataset generated with {existing}, not the requested "
                f"{settings}; delete the folder to regenerate it or pass another root"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists but has no dataset.json, so it is not a synthetic dataset; "
                              "delete it or pass another root")

    staging = root.with_name(f"{root.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    logger.info("generating %d synthetic chest radiographs in %s", n_train + n_val + n_test, root)
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    rows = []
    for index, split in enumerate(tqdm(splits, desc="Generating synthetic radiographs", leave=False)):
        rng = np.random.default_rng([seed, index])  # one stream per image, independent of the others
        study = _sample_study(rng)
        text = _write_report(study["findings"], rng)
        relative = Path("images", split, f"{index:05d}.png")
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_draw_radiograph(study, size, rng)).save(staging / relative, compress_level=1)
        rows.append({"image": relative.as_posix(), "text": text, "group": _text_group(text), "split": split,
                     "labels": _synthetic_labels(study["findings"]), "findings": study["findings"]})

    with open(staging / "manifest.jsonl", "w") as manifest:
        for row in rows:
            manifest.write(json.dumps(row) + "\n")
    (staging / "dataset.json").write_text(json.dumps(settings, indent=2) + "\n")
    if root.exists():
        root.rmdir()  # empty, checked above
    try:
        staging.rename(root)
    except OSError:
        if not (root / "dataset.json").exists():
            raise
        shutil.rmtree(staging)  # another process finished the same dataset first
    return root


# -----------------------------------------------------------------------------
# Loaders

FORMATS = ("synthetic", "medpix", "manifest")
FORMAT_HELP = (
    "Expected a MedPix 2.0 folder (Descriptions.json and splitted_dataset/), a .jsonl or .csv "
    "manifest file, or a synthetic dataset folder (dataset.json and manifest.jsonl). Prefix the "
    "path with medpix:, manifest: or synthetic: to choose the format."
)
MEDPIX_LABELS = ("Type", "Location Category", "Plane")
KNOWN_SPLITS = ("train", "val", "dev", "test")  # listed in this order, other split names after them


def open_source(spec: str | None, *, synthetic_root: Path | None = None) -> DataSource:
    """Open the dataset that `spec` names.

    None opens the synthetic dataset at synthetic_root (default: data/synthetic-cxr next to this
    file) and generates it on first use. Otherwise spec is "medpix:PATH", "manifest:PATH",
    "synthetic:PATH" or a bare PATH whose format is detected from its files.
    "synthetic:PATH" generates the default dataset at PATH if PATH has none.

    A manifest is a .jsonl or .csv file, or a folder that contains manifest.jsonl or
    manifest.csv. Its columns are image (relative to the manifest's folder, or absolute) and
    text, plus optional group and split. JSONL rows may carry a "labels" object. In CSV, every
    other column is a label. Without a group, identical texts share one. Without a split
    column, about 10 % of the groups go to val and the rest to train.

    Raises FileNotFoundError for a missing path and ValueError for an unrecognised format, a
    missing column or a manifest without usable rows.
    """
    if spec is None:
        root = Path(synthetic_root) if synthetic_root is not None else DEFAULT_SYNTHETIC_ROOT
        return _synthetic_source(make_synthetic_dataset(root))

    prefix, colon, rest = spec.partition(":")
    kind, path = (prefix, Path(rest)) if colon and prefix in FORMATS else (None, Path(spec))
    path = path.expanduser()
    if kind == "synthetic":
        if not (path / "dataset.json").exists():
            make_synthetic_dataset(path)
        return _synthetic_source(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist. {FORMAT_HELP}")
    if kind is None:
        kind = _detect_format(path)
    if kind == "medpix":
        return _medpix_source(path)
    if kind == "synthetic":
        return _synthetic_source(path)
    return _manifest_source(_manifest_file(path))


def _detect_format(path: Path) -> str:
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        return "manifest"
    if path.is_dir():
        if (path / "Descriptions.json").is_file() and (path / "splitted_dataset").is_dir():
            return "medpix"
        if (path / "dataset.json").is_file() and (path / "manifest.jsonl").is_file():
            return "synthetic"
        if (path / "manifest.jsonl").is_file() or (path / "manifest.csv").is_file():
            return "manifest"
    raise ValueError(f"cannot detect the dataset format of {path}. {FORMAT_HELP}")


def _manifest_file(path: Path) -> Path:
    """Return the manifest file at `path`, or manifest.jsonl/manifest.csv inside a folder."""
    if path.is_dir():
        for name in ("manifest.jsonl", "manifest.csv"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"no manifest.jsonl or manifest.csv found in {path}. {FORMAT_HELP}")
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"manifest {path} must be a .jsonl or .csv file")
    return path


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """Return (line number, object) for every non-blank line of a JSON Lines file."""
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"invalid JSON on line {number} of {path}: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"line {number} of {path} is not a JSON object")
            rows.append((number, row))
    return rows


def _parse_csv_value(value: str) -> object:
    """Parse a CSV cell as int or float where possible, else keep the text. "" becomes None."""
    if value == "":
        return None
    for parse in (int, float):
        try:
            return parse(value)
        except ValueError:
            pass
    return value


def _read_manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """Read a manifest as (line number, {"image", "text", "group"?, "split"?, "labels"}) rows."""
    if path.suffix.lower() == ".jsonl":
        rows = _read_jsonl(path)
        for number, row in rows:
            for column in ("image", "text"):
                if column not in row:
                    raise ValueError(f"manifest {path} line {number} has no {column!r} column")
            if not isinstance(row.setdefault("labels", {}), dict):
                raise ValueError(f"manifest {path} line {number}: 'labels' must be a JSON object")
        return rows

    with open(path, newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        for column in ("image", "text"):
            if column not in columns:
                raise ValueError(f"manifest {path} has no {column!r} column; its columns are {columns}")
        label_columns = [c for c in columns if c not in ("image", "text", "group", "split")]
        rows = []
        for number, record in enumerate(reader, start=2):  # line 1 is the header
            row = {"image": record["image"] or "", "text": record["text"] or ""}
            row.update({key: record[key] for key in ("group", "split") if record.get(key)})
            row["labels"] = {c: _parse_csv_value(record[c] or "") for c in label_columns}
            rows.append((number, row))
        return rows


def _manifest_source(path: Path) -> DataSource:
    """Load a JSONL or CSV manifest (columns as open_source describes them)."""
    rows = _read_manifest_rows(path)
    has_splits = any(row.get("split") for _, row in rows)
    pairs, splits, label_names = [], [], {}
    missing_images, empty_texts = [], 0
    for number, row in rows:
        text = _clean_text(row["text"])
        image_path = Path(row["image"])
        if not image_path.is_absolute():
            image_path = path.parent / image_path
        if not text:
            empty_texts += 1
            continue
        if not image_path.is_file():
            missing_images.append(image_path)
            continue
        if has_splits and not row.get("split"):
            raise ValueError(f"manifest {path} line {number} has no split, but other rows do")
        group = str(row["group"]) if row.get("group") not in (None, "") else _text_group(text)
        pairs.append(Pair(image_path, text, group, row["labels"]))
        splits.append(str(row["split"]) if has_splits else "train")
        label_names.update(dict.fromkeys(row["labels"]))
    _log_skipped(path, missing_images, empty_texts)
    if not pairs:
        raise ValueError(f"manifest {path} lists no usable pairs (see the log for skipped rows)")

    if not has_splits:  # cut about 10 % of the groups to val, so no group spans both splits
        val_groups = _holdout_keys([pair.group for pair in pairs])
        splits = ["val" if pair.group in val_groups else "train" for pair in pairs]
    pairs_by_split = {}
    for pair, split in zip(pairs, splits):
        pairs_by_split.setdefault(split, []).append(pair)
    names = sorted(pairs_by_split, key=lambda s: (KNOWN_SPLITS.index(s) if s in KNOWN_SPLITS else 99, s))
    eval_split = next((s for s in ("test", "dev", "val") if s in pairs_by_split), names[-1])
    return DataSource("manifest", path.parent, tuple(names), eval_split, tuple(label_names), pairs_by_split)


def _log_skipped(path: Path, missing_images: list[Path], empty_texts: int) -> None:
    if missing_images:
        logger.warning("%s: skipped %d rows whose image file is missing, e.g. %s",
                       path, len(missing_images), missing_images[0])
    if empty_texts:
        logger.warning("%s: skipped %d rows with an empty text", path, empty_texts)


def _synthetic_source(root: Path) -> DataSource:
    """Open a folder written by make_synthetic_dataset."""
    source = _manifest_source(root / "manifest.jsonl")
    splits = tuple(s for s in ("train", "val", "test") if s in source.pairs_by_split)
    return DataSource("synthetic", root, splits, "test", SYNTHETIC_LABELS, source.pairs_by_split)


def _medpix_source(root: Path) -> DataSource:
    """Load MedPix 2.0: caption text, labels Type, Location Category and Plane.

    "dev" is the native dev split. "train" and "val" are cut from the native train split by
    case (U_id): about 10 % of the cases go to val, so no case spans both. A missing Plane
    becomes "unknown". Rows with a missing image file or an empty caption are skipped and logged.
    """
    files = {"train": root / "splitted_dataset" / "descriptions_train.jsonl",
             "dev": root / "splitted_dataset" / "descriptions_dev.jsonl"}
    for path in [*files.values(), root / "images"]:
        if not path.exists():
            raise FileNotFoundError(f"MedPix 2.0 file {path} not found; expected splitted_dataset/"
                                    f"descriptions_{{train,dev}}.jsonl and images/ under {root}")
    native = {split: [row for _, row in _read_jsonl(path)] for split, path in files.items()}
    val_cases = _holdout_keys([row["U_id"] for row in native["train"]])

    pairs_by_split = {"train": [], "val": [], "dev": []}
    for native_split, rows in native.items():
        missing_images, empty_texts = [], 0
        for row in rows:
            description = row.get("Description") or {}
            text = _clean_text(description.get("Caption"))
            image_path = root / "images" / f"{row['image']}.png"
            if not text:
                empty_texts += 1
                continue
            if not image_path.is_file():
                missing_images.append(image_path)
                continue
            labels = {"Type": row.get("Type"), "Location Category": row.get("Location Category"),
                      "Plane": description.get("Plane")}
            labels = {name: value if value is not None else "unknown" for name, value in labels.items()}
            if native_split == "dev":
                split = "dev"
            elif row["U_id"] in val_cases:
                split = "val"
            else:
                split = "train"
            pairs_by_split[split].append(Pair(image_path, text, _text_group(text), labels))
        _log_skipped(files[native_split], missing_images, empty_texts)
    return DataSource("medpix", root, ("train", "val", "dev"), "dev", MEDPIX_LABELS, pairs_by_split)


# -----------------------------------------------------------------------------
# Dataset


class PairDataset(torch.utils.data.Dataset):
    """Model inputs for a list of pairs.

    Texts are tokenised once here. Images are decoded once into a uint8 cache, downscaled so the
    shorter side is at most 2 * image_size to bound memory, and the transform (random when
    train=True) runs on every __getitem__. 16-bit images are therefore quantised to 256 levels
    after load_image rescales them. group_names[g] is the group string behind group id g.
    """

    def __init__(self, pairs: list[Pair], tokenizer: Tokenizer, image_size: int, channels: int = 1,
                 train: bool = False, max_len: int = 64):
        if not pairs:
            raise ValueError("PairDataset needs at least one pair")
        self.pairs = list(pairs)
        self.transform = ImageTransform(image_size, channels, train)
        self.input_ids, self.attention_mask = tokenize(tokenizer, [p.text for p in self.pairs], max_len)
        self.group_names = sorted({p.group for p in self.pairs})
        group_ids = {name: i for i, name in enumerate(self.group_names)}
        self.groups = torch.tensor([group_ids[p.group] for p in self.pairs], dtype=torch.long)
        self.images = [
            _cached_image(p.image_path, channels, 2 * image_size)
            for p in tqdm(self.pairs, desc="Decoding images", leave=False, disable=len(self.pairs) < 1000)
        ]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "image": self.transform(self.images[i]),  # (C, S, S)
            "input_ids": self.input_ids[i],  # (L,)
            "attention_mask": self.attention_mask[i],  # (L,)
            "group": self.groups[i],  # ()
            "index": torch.tensor(i, dtype=torch.long),  # ()
        }


def _cached_image(path: Path, channels: int, max_short_side: int) -> np.ndarray:
    """Load an image as uint8 (H, W, C) with the shorter side at most max_short_side."""
    pixels = np.round(load_image(path, channels) * 255).astype(np.uint8)
    height, width = pixels.shape[:2]
    scale = max_short_side / min(height, width)
    if scale >= 1:
        return pixels
    image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    return np.asarray(image).reshape(image.height, image.width, channels)
