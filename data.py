"""Image-text pairs: sources, image loading, transforms, tokenizer and the training dataset.

Every source of image-text pairs shares one interface, DataSource:

* synthetic: procedurally drawn chest radiographs with template reports. They are generated
  on first use, so every script runs without a download.
* medpix: the MedPix 2.0 release (CT and MR images with captions).
* iu_xray and openi: IU X-ray chest radiographs and reports, in the report-generation layout
  (annotation.json) or as the original OpenI release (report XML files).
* mimic_cxr: MIMIC-CXR-JPG chest radiographs with their free-text reports and CheXpert labels.
* roco: radiology images from PubMed Central articles with their captions.
* manifest: any JSONL or CSV file that lists image paths and texts.

PairDataset turns a list of pairs into model inputs: a normalised image, token ids, an
attention mask and a group id. Pairs that share a group (for example two images with the
same report) must not be used as each other's negatives in the contrastive loss.
"""

import csv
import gzip
import hashlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

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

    name: str  # one of FORMATS
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
    Raises FileNotFoundError for a missing file. Raises ValueError for a file that Pillow cannot
    decode (empty, truncated or not an image), an image without pixels, a float image with NaN or
    infinite pixels, and an image above Pillow's decompression-bomb limit Image.MAX_IMAGE_PIXELS.
    Pillow itself only warns between one and two times that limit.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    path = Path(path)
    try:
        # NOTE: catch_warnings changes process-wide filters, so this is not thread-safe.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
                    raise ValueError("non-finite pixel values (NaN or infinity)")
                pixels = _decode_pixels(image)
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot decode image {path}: {error} Raise PIL.Image.MAX_IMAGE_PIXELS "
                         f"if the image is trusted") from error
    except (OSError, ValueError, SyntaxError) as error:  # Pillow raises SyntaxError for some broken PNGs
        raise ValueError(f"cannot decode image {path}: {error}") from error
    if pixels.size == 0:
        raise ValueError(f"image {path} has no pixels (shape {pixels.shape})")

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
    train: random resized crop (80-100 % of the area, aspect ratio 7/8 to 8/7) resized to
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
    # Milder than the usual (0.08, 1) of natural images: a radiograph's findings sit at fixed
    # places (apices, costophrenic angles), and a small crop would cut them out of the image
    # while the report still names them.
    CROP_SCALE = (0.8, 1.0)
    CROP_RATIO = (7 / 8, 8 / 7)

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
    """Train a lowercase WordPiece tokenizer that encodes each text as [CLS] text [SEP].

    NOTE: the `tokenizers` WordPiece trainer breaks ties between equally frequent merges in
    hash-map order (huggingface/tokenizers issue #1794, open in 0.23), so two trainings on the
    same texts can give different vocabularies. train.py saves the one it used beside the
    checkpoint, and its --tokenizer flag reuses a saved one.
    """
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

FORMATS = ("synthetic", "medpix", "iu_xray", "openi", "mimic_cxr", "roco", "manifest")
FORMAT_HELP = (
    "Expected a MedPix 2.0 folder (Descriptions.json and splitted_dataset/), an IU X-ray folder "
    "with annotation.json and images/, an OpenI folder with ecgen-radiology/, a MIMIC-CXR-JPG "
    "folder with mimic-cxr-2.0.0-split.csv(.gz), a ROCO folder with train/radiology/captions.txt "
    "or train/radiologytraindata.csv, a .jsonl or .csv manifest file, or a synthetic dataset "
    "folder (dataset.json and manifest.jsonl). Prefix the path with medpix:, iu_xray:, openi:, "
    "mimic_cxr:, roco:, manifest: or synthetic: to choose the format."
)
MANIFEST_ROLES = ("image", "text", "group", "split")
MEDPIX_LABELS = ("Type", "Location Category", "Plane")
KNOWN_SPLITS = ("train", "val", "dev", "test")  # listed in this order, other split names after them


def open_source(spec: str | None, *, synthetic_root: Path | None = None,
                columns: dict[str, str] | None = None, strict: bool = False) -> DataSource:
    """Open the dataset that `spec` names.

    None opens the synthetic dataset at synthetic_root (default: data/synthetic-cxr next to this
    file) and generates it on first use. Otherwise spec is "FORMAT:PATH", with FORMAT one of
    FORMATS, or a bare PATH whose format is detected from its files (see _detect_format).
    "synthetic:PATH" generates the default dataset at PATH if PATH has none. The loaders
    _medpix_source, _iu_xray_source, _openi_source, _mimic_cxr_source and _roco_source
    describe the layout that each reads and its splits, labels and groups.

    A manifest is a .jsonl or .csv file, or a folder that contains manifest.jsonl or
    manifest.csv. Its columns are image (relative to the manifest's folder, or absolute) and
    text, plus optional group and split. JSONL rows may carry a "labels" object. In CSV, every
    other column is a label. Without a group, identical texts share one. Without a split
    column, about 10 % of the groups go to val and the rest to train.
    `columns` maps these roles (image, text, group, split) to other column names, and so does
    a query after a manifest: spec, as in "manifest:pairs.csv?image=path&text=report&group=study_id".
    Settings in the spec override those in `columns`. Column names set in the spec cannot
    contain "&" or "=".

    With strict=True, a manifest row that would be skipped raises ValueError instead. The other
    formats still skip such rows and log a count.

    Raises FileNotFoundError for a missing path or a missing file of the format's layout, and
    ValueError for an unrecognised format, a missing column or a manifest without usable rows.
    """
    if spec is None:
        root = Path(synthetic_root) if synthetic_root is not None else DEFAULT_SYNTHETIC_ROOT
        return _synthetic_source(make_synthetic_dataset(root))

    prefix, colon, rest = spec.partition(":")
    kind, location = (prefix, rest) if colon and prefix in FORMATS else (None, spec)
    columns = dict(columns or {})
    if kind == "manifest":
        location, _, query = location.partition("?")
        columns.update(_parse_column_settings(query))
    path = Path(location).expanduser()
    if kind == "synthetic" and not (path / "dataset.json").exists():
        make_synthetic_dataset(path)
    if not path.exists():
        if colon and kind is None and len(prefix) > 1 and Path(rest).expanduser().exists():
            # "medpx:/data/medpix" names an existing folder with a mistyped format
            raise ValueError(f"unknown dataset format {prefix!r} in {spec!r}. {FORMAT_HELP}")
        raise FileNotFoundError(f"dataset path {path} does not exist. {FORMAT_HELP}")
    if kind is None:
        kind = _detect_format(path)

    if kind == "manifest":
        return _manifest_source(_manifest_file(path), columns, strict=strict)
    if columns:
        raise ValueError(f"column names can be set only for a manifest, but {path} is a {kind} dataset")
    loaders = {"synthetic": _synthetic_source, "medpix": _medpix_source, "iu_xray": _iu_xray_source,
               "openi": _openi_source, "mimic_cxr": _mimic_cxr_source, "roco": _roco_source}
    return loaders[kind](path)


def _parse_column_settings(query: str) -> dict[str, str]:
    """Parse "image=path&text=report" into {"image": "path", "text": "report"}."""
    columns = {}
    for setting in query.split("&") if query else []:
        role, equals, column = setting.partition("=")
        if not equals or not column:
            raise ValueError(f"invalid manifest column setting {setting!r}; expected ROLE=COLUMN as in "
                             "manifest:pairs.csv?image=path&text=report")
        columns[role] = column
    return columns


def _detect_format(path: Path) -> str:
    """Return the format of `path` from the files it contains. Raises ValueError if none matches."""
    if path.is_file() and path.suffix.lower() in (".jsonl", ".csv"):
        return "manifest"
    if path.is_dir():
        if (path / "Descriptions.json").is_file() and (path / "splitted_dataset").is_dir():
            return "medpix"
        if (path / "dataset.json").is_file() and (path / "manifest.jsonl").is_file():
            return "synthetic"
        if (path / "annotation.json").is_file() and (path / "images").is_dir():
            return "iu_xray"
        if (path / "ecgen-radiology").is_dir():
            return "openi"
        if _csv_or_gzip(path, "mimic-cxr-2.0.0-split.csv").is_file():
            return "mimic_cxr"
        if _roco_base(path) is not None:
            return "roco"
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


def _read_manifest_rows(path: Path, role_columns: dict[str, str] | None = None) -> list[tuple[int, dict]]:
    """Read a manifest as (line number, {"image", "text", "group"?, "split"?, "labels"}) rows.

    role_columns maps a role (image, text, group or split) to the column that contains it when
    the column has another name. Such a column must exist, in every row of a JSONL file.
    """
    role_columns = role_columns or {}
    unknown = [role for role in role_columns if role not in MANIFEST_ROLES]
    if unknown:
        raise ValueError(f"unknown manifest column role {unknown[0]!r}; "
                         f"expected one of {', '.join(MANIFEST_ROLES)}")
    names = {role: role_columns.get(role, role) for role in MANIFEST_ROLES}
    required = ("image", "text", *role_columns)
    _require_utf8(path)
    if path.suffix.lower() == ".jsonl":
        rows = _read_jsonl(path)
        for number, row in rows:
            for role in required:
                if names[role] not in row:
                    raise ValueError(f"manifest {path} line {number} has no {names[role]!r} column")
            row.update({role: row.pop(column) for role, column in names.items() if column in row})
            if not isinstance(row.setdefault("labels", {}), dict):
                raise ValueError(f"manifest {path} line {number}: 'labels' must be a JSON object")
        return rows

    with open(path, newline="", encoding="utf-8-sig") as file:  # -sig: drop the BOM that Excel writes
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        for role in required:
            if names[role] not in columns:
                raise ValueError(f"manifest {path} has no {names[role]!r} column; its columns are {columns}")
        label_columns = [c for c in columns if c not in names.values()]
        rows = []
        for number, record in enumerate(_csv_records(reader, path), start=2):  # line 1 is the header
            row = {"image": record[names["image"]] or "", "text": record[names["text"]] or ""}
            row.update({key: record[names[key]] for key in ("group", "split") if record.get(names[key])})
            row["labels"] = {c: _parse_csv_value(record[c] or "") for c in label_columns}
            rows.append((number, row))
        return rows


def _require_utf8(path: Path) -> None:
    """Raise ValueError naming the first line of `path` that is not valid UTF-8."""
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(f"manifest {path} line {line} is not valid UTF-8 (byte {raw[error.start]:#04x} at "
                         f"offset {error.start}); re-save the file as UTF-8") from error


def _csv_records(reader: csv.DictReader, path: Path):
    """Yield the records of `reader`, raising ValueError with the line number for a malformed one."""
    try:
        yield from reader
    except csv.Error as error:
        raise ValueError(f"manifest {path} line {reader.line_num}: {error}") from error


def _manifest_source(path: Path, role_columns: dict[str, str] | None = None, *,
                     strict: bool = False) -> DataSource:
    """Load a JSONL or CSV manifest (columns as open_source describes them).

    A row that cannot give a pair is skipped, and a warning counts the skipped rows of each
    reason that _check_manifest_row returns. With strict=True the first such row raises
    ValueError instead.
    """
    rows = _read_manifest_rows(path, role_columns)
    has_splits = any(row.get("split") for _, row in rows)
    pairs, splits, label_names = [], [], {}
    skipped: dict[str, list[str]] = {}  # reason -> "line N, image '...'" of each skipped row
    seen: set[tuple[str, str]] = set()
    for number, row in rows:
        text, image_path, reason = _check_manifest_row(path, row, seen)
        if reason and strict:
            raise ValueError(f"manifest {path} line {number} (image {row['image']!r}): a row {reason}; "
                             "fix or remove the row, or load without strict mode to skip it")
        if reason:
            skipped.setdefault(reason, []).append(f"line {number}, image {row['image']!r}")
            continue
        if has_splits and not row.get("split"):
            raise ValueError(f"manifest {path} line {number} has no split, but other rows do")
        group = str(row["group"]) if row.get("group") not in (None, "") else _text_group(text)
        pairs.append(Pair(image_path, text, group, row["labels"]))
        splits.append(str(row["split"]) if has_splits else "train")
        label_names.update(dict.fromkeys(row["labels"]))
    _log_skipped(path, [], 0, other=skipped)
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


MISSING_TEXT_MARKERS = ("nan", "null")  # how CSV exports often write a missing value


def _check_manifest_row(path: Path, row: dict, seen: set[tuple[str, str]]) -> tuple[str, Path | None, str]:
    """Return (text, image path, reason) for a manifest row; reason is "" when the row is usable.

    A relative image path must stay inside the manifest's folder, so a manifest cannot point
    at ../../etc/passwd; absolute paths are allowed. `seen` collects (image path, text) of the
    usable rows, so that a repeat of one is skipped.
    """
    text_value, image_value = row["text"], row["image"]
    if isinstance(text_value, float) and math.isnan(text_value):  # JSON NaN
        text_value = None
    if text_value is not None and not isinstance(text_value, str):
        return "", None, f"whose text is not a string but {type(text_value).__name__}"
    text = _clean_text(text_value)
    if not text or text.lower() in MISSING_TEXT_MARKERS:
        return "", None, "with an empty text (blank, null or NaN)"

    if not isinstance(image_value, str) or not image_value.strip():
        return text, None, "with no image path"
    image_path = Path(image_value)
    if not image_path.is_absolute():
        normalised = os.path.normpath(image_value)
        if normalised == os.pardir or normalised.startswith(os.pardir + os.sep):
            return text, None, "whose relative image path leaves the manifest's folder (use an absolute path)"
        image_path = path.parent / image_path
    if not image_path.is_file():
        return text, None, "whose image file is missing"

    key = (str(image_path), text)
    if key in seen:
        return text, None, "with the same image and text as an earlier row"
    seen.add(key)
    return text, image_path, ""


def _log_skipped(path: Path, missing_images: list[Path], empty_texts: int, *,
                 other: dict[str, list[str]] | None = None) -> None:
    """Log one warning per reason with the count of rows skipped for it and the first example.

    `other` maps a reason ("whose image file is missing") to an example of each row skipped for it.
    """
    if missing_images:
        logger.warning("%s: skipped %d rows whose image file is missing, e.g. %s",
                       path, len(missing_images), missing_images[0])
    if empty_texts:
        logger.warning("%s: skipped %d rows with an empty text", path, empty_texts)
    for reason, examples in (other or {}).items():
        logger.warning("%s: skipped %d rows %s, e.g. %s", path, len(examples), reason, examples[0])


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
# Radiology report datasets: IU X-ray, OpenI, MIMIC-CXR-JPG and ROCO
#
# Each loader reads its dataset's native layout. Texts go through clean_report, and pairs whose
# text is empty after cleaning, or whose report or image file is missing, are skipped with a
# logged count. The group is the cleaned text: a study has one report for all its images, so
# the images of one study share a group, and so do studies with identical reports.

PLACEHOLDER = re.compile(r"\bX{3,}\b|_{2,}")  # de-identification: IU X-ray "XXXX", MIMIC-CXR "___"
SECTION_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z ,&/()-]*[A-Z)])[ \t]*:", re.MULTILINE)
KEPT_SECTION = re.compile(r"\b(FINDINGS?|IMPRESSIONS?)\b")
REPORT_BANNER = re.compile(r"^[ \t]*FINAL REPORT[ \t]*$", re.MULTILINE)  # first line of MIMIC-CXR reports


def clean_report(text: str | None, sections: bool = True) -> str:
    """Reduce a radiology report to its FINDINGS and IMPRESSION as one line of plain text.

    With sections=True, upper-case headers at the start of a line ("FINDINGS:") split the
    report into sections, and every section whose header contains FINDINGS or IMPRESSION is
    kept, in report order ("FINDINGS AND IMPRESSION:" counts). A report with headers but
    neither section keeps its last section, and one without headers keeps all its text.
    sections=False skips this step, for texts that are one section already, or captions.
    Then de-identification placeholders (runs of three or more X, as IU X-ray's "XXXX", and
    of two or more underscores, as MIMIC-CXR's "___") and MIMIC-CXR's "FINAL REPORT" line are
    removed, whitespace is collapsed and spaces before punctuation are dropped.
    None and placeholder-only texts give "".
    """
    if text is None:
        return ""
    text = REPORT_BANNER.sub(" ", str(text))
    if sections:
        text = _findings_and_impression(text)
    text = PLACEHOLDER.sub(" ", text)
    text = " ".join(text.split())
    text = re.sub(r" ([.,;:!?])", r"\1", text)
    text = re.sub(r"\.{2,}", ".", text)  # "effusion. XXXX." leaves "effusion.."
    return text.lstrip(" .,;:")


def _findings_and_impression(text: str) -> str:
    """Select the sections of `text` that clean_report keeps."""
    headers = list(SECTION_HEADER.finditer(text))
    if not headers:
        return text
    ends = [header.start() for header in headers[1:]] + [len(text)]
    sections = [(header.group(1), text[header.end():end]) for header, end in zip(headers, ends)]
    kept = [body for name, body in sections if KEPT_SECTION.search(name)]
    if kept:
        return " ".join(kept)
    return sections[-1][1]


def _hash_split(key: str) -> str:
    """Assign `key` to train, val or test, about 80/10/10, by its SHA-1 hash.

    Unlike _holdout_keys, the split of a key does not depend on the other keys, so adding
    reports to a dataset leaves the old ones in their splits.
    """
    fraction = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) / 16**8
    if fraction < 0.8:
        return "train"
    if fraction < 0.9:
        return "val"
    return "test"


def _require_paths(dataset: str, root: Path, paths: list[Path], layout: str) -> None:
    """Raise FileNotFoundError for the first missing path, naming the layout `dataset` expects."""
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{dataset}: {path} not found; expected {layout} under {root}")


def _log_skipped_items(path: Path, count: int, reason: str, example: object = None) -> None:
    """Log a warning that `count` items of `path` were skipped for `reason`."""
    if count:
        example_text = f", e.g. {example}" if example is not None else ""
        logger.warning("%s: skipped %d %s%s", path, count, reason, example_text)


def _open_text(path: Path):
    """Open a text file for csv, decompressing it first if its name ends in .gz."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8")
    return open(path, newline="", encoding="utf-8")


def _dict_reader(file, path: Path, required: tuple[str, ...]) -> csv.DictReader:
    """Return a csv.DictReader over `file`. Raises ValueError when a required column is missing."""
    reader = csv.DictReader(file)
    columns = reader.fieldnames or []
    for column in required:
        if column not in columns:
            raise ValueError(f"{path} has no {column!r} column; its columns are {columns}")
    return reader


IU_XRAY_LAYOUT = "annotation.json and images/"


def _iu_xray_source(root: Path) -> DataSource:
    """Load IU X-ray in the report-generation layout: annotation.json and images/.

    annotation.json maps "train", "val" and "test" to lists of studies {"id", "report",
    "image_path": [paths under images/], "split"}, which are the splits here. Every image of
    a study is a pair with the study's cleaned report. A study's "labels" object, where
    present, becomes its pairs' labels, and label_names is the union of their keys. This
    layout usually has none, so label_names is empty.
    """
    annotation = root / "annotation.json"
    _require_paths("IU X-ray", root, [annotation, root / "images"], IU_XRAY_LAYOUT)
    try:
        with open(annotation, encoding="utf-8") as file:
            studies_by_split = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"invalid JSON in {annotation}: {error}") from error
    if not isinstance(studies_by_split, dict) or not {"train", "val", "test"} & set(studies_by_split):
        raise ValueError(f"{annotation} must be a JSON object with the keys train, val and test")

    pairs_by_split, label_names = {}, {}
    missing_images, empty_reports = [], 0
    for split in ("train", "val", "test"):
        pairs_by_split[split] = []
        for study in studies_by_split.get(split, []):
            text = clean_report(study.get("report"), sections=False)
            if not text:
                empty_reports += 1
                continue
            labels = study.get("labels") if isinstance(study.get("labels"), dict) else {}
            label_names.update(dict.fromkeys(labels))
            for relative in study.get("image_path", []):
                image_path = root / "images" / relative
                if not image_path.is_file():
                    missing_images.append(image_path)
                    continue
                pairs_by_split[split].append(Pair(image_path, text, _text_group(text), dict(labels)))
    _log_skipped_items(annotation, empty_reports, "studies with an empty report")
    _log_skipped_items(annotation, len(missing_images), "images whose file is missing",
                 missing_images[0] if missing_images else None)
    return DataSource("iu_xray", root, ("train", "val", "test"), "test", tuple(label_names), pairs_by_split)


OPENI_LAYOUT = "ecgen-radiology/*.xml and the PNG images in images/ or beside ecgen-radiology/"


def _openi_source(root: Path) -> DataSource:
    """Load the original IU X-ray release from OpenI: report XML files and PNG images.

    Reports: ecgen-radiology/*.xml. Images: ID.png in images/, or else in the root folder,
    for every <parentImage id="ID"> of a report. Text: the FINDINGS and IMPRESSION sections,
    cleaned. Labels: the MeSH major headings, cut before the first "/" ("Cardiomegaly/mild"
    becomes "Cardiomegaly", "normal" stays "normal"), as 0/1 over label_names, which is the
    sorted set of headings of all loaded reports. There is no native split: each report goes
    to train, val or test by the hash of its id (the uId, else the file name), about 80/10/10.
    """
    reports = root / "ecgen-radiology"
    _require_paths("OpenI", root, [reports], OPENI_LAYOUT)
    xml_files = sorted(reports.glob("*.xml"))
    if not xml_files:
        raise FileNotFoundError(f"OpenI: no report XML files in {reports}; expected {OPENI_LAYOUT} under {root}")
    image_folder = root / "images" if (root / "images").is_dir() else root

    studies = []  # (split, text, image paths, headings)
    missing_images, empty_reports, no_images = [], 0, 0
    for xml_file in xml_files:
        report_id, text, image_ids, headings = _read_openi_report(xml_file)
        if not text:
            empty_reports += 1
            continue
        if not image_ids:
            no_images += 1
            continue
        image_paths = []
        for image_id in image_ids:
            image_path = image_folder / f"{image_id}.png"
            if image_path.is_file():
                image_paths.append(image_path)
            else:
                missing_images.append(image_path)
        if image_paths:
            studies.append((_hash_split(report_id), text, image_paths, headings))
    _log_skipped_items(reports, empty_reports, "reports with empty FINDINGS and IMPRESSION")
    _log_skipped_items(reports, no_images, "reports without a parentImage")
    _log_skipped_items(reports, len(missing_images), "images whose file is missing",
                 missing_images[0] if missing_images else None)

    label_names = tuple(sorted({h for *_, headings in studies for h in headings}, key=str.casefold))
    pairs_by_split = {"train": [], "val": [], "test": []}
    for split, text, image_paths, headings in studies:
        labels = {name: int(name in headings) for name in label_names}
        for image_path in image_paths:
            pairs_by_split[split].append(Pair(image_path, text, _text_group(text), dict(labels)))
    return DataSource("openi", root, ("train", "val", "test"), "test", label_names, pairs_by_split)


def _read_openi_report(path: Path) -> tuple[str, str, list[str], set[str]]:
    """Read an OpenI report as (report id, cleaned text, parentImage ids, MeSH major headings)."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise ValueError(f"invalid OpenI report XML {path}: {error}") from error
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None and uid.get("id") else path.stem
    sections = {node.get("Label", "").upper(): "".join(node.itertext()) for node in root.iter("AbstractText")}
    text = clean_report(f"{sections.get('FINDINGS', '')} {sections.get('IMPRESSION', '')}", sections=False)
    image_ids = [node.get("id") for node in root.iter("parentImage") if node.get("id")]
    headings = set()
    for mesh in root.iter("MeSH"):
        for major in mesh.findall("major"):
            heading = (major.text or "").split("/")[0].strip()
            if heading:
                headings.add(heading)
    return report_id, text, image_ids, headings


MIMIC_SPLITS = {"train": "train", "validate": "val", "test": "test"}  # native name -> split name
MIMIC_LAYOUT = (
    "mimic-cxr-2.0.0-split.csv(.gz), mimic-cxr-2.0.0-chexpert.csv(.gz) and files/pXX/pSUBJECT/sSTUDY/"
    "DICOM.jpg, with the reports at files/pXX/pSUBJECT/sSTUDY.txt or reports/files/pXX/pSUBJECT/sSTUDY.txt"
)


def _mimic_cxr_source(root: Path) -> DataSource:
    """Load MIMIC-CXR-JPG 2.0.0 with the free-text reports of MIMIC-CXR.

    Images: files/pXX/pSUBJECT/sSTUDY/DICOM.jpg for each row of mimic-cxr-2.0.0-split.csv.
    Reports come from a separate archive with the same folder structure. This reads
    files/pXX/pSUBJECT/sSTUDY.txt, beside the study's image folder, or else the same path
    under reports/. Text: clean_report of the report. Splits: train, val (native "validate")
    and test, per image as the split file lists them. Labels: the CheXpert columns of
    mimic-cxr-2.0.0-chexpert.csv as 1 (positive), 0 (negative or not mentioned) and -1
    (uncertain, kept so that an evaluation can skip it), all None for a study that the
    CheXpert file does not list. Both CSV files may be gzipped (.csv.gz), as distributed.
    """
    split_file = _csv_or_gzip(root, "mimic-cxr-2.0.0-split.csv")
    label_file = _csv_or_gzip(root, "mimic-cxr-2.0.0-chexpert.csv")
    _require_paths("MIMIC-CXR-JPG", root, [split_file, label_file, root / "files"], MIMIC_LAYOUT)
    label_names, labels_by_study = _read_chexpert_labels(label_file)
    unlabelled = dict.fromkeys(label_names)

    pairs_by_split = {split: [] for split in MIMIC_SPLITS.values()}
    texts = {}  # study id -> cleaned report, "" when missing or empty
    missing_reports, missing_images, empty_reports = [], [], 0
    with _open_text(split_file) as file:
        reader = _dict_reader(file, split_file, ("dicom_id", "study_id", "subject_id", "split"))
        for number, row in enumerate(reader, start=2):  # line 1 is the header
            split = MIMIC_SPLITS.get(row["split"])
            if split is None:
                raise ValueError(f"{split_file} line {number}: unknown split {row['split']!r}; "
                                 f"expected one of {', '.join(MIMIC_SPLITS)}")
            subject, study = row["subject_id"], row["study_id"]
            study_folder = Path("files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
            if study not in texts:
                report = _mimic_report_path(root, study_folder)
                if report is None:
                    missing_reports.append(root / study_folder.with_suffix(".txt"))
                    texts[study] = ""
                else:
                    texts[study] = clean_report(report.read_text(encoding="utf-8"))
                    if not texts[study]:
                        empty_reports += 1
            text = texts[study]
            if not text:
                continue
            image_path = root / study_folder / f"{row['dicom_id']}.jpg"
            if not image_path.is_file():
                missing_images.append(image_path)
                continue
            labels = labels_by_study.get(study, unlabelled)
            pairs_by_split[split].append(Pair(image_path, text, _text_group(text), dict(labels)))
    _log_skipped_items(split_file, len(missing_reports), "studies whose report file is missing",
                 missing_reports[0] if missing_reports else None)
    _log_skipped_items(split_file, empty_reports, "studies with an empty report")
    _log_skipped_items(split_file, len(missing_images), "images whose file is missing",
                 missing_images[0] if missing_images else None)
    return DataSource("mimic_cxr", root, ("train", "val", "test"), "test", label_names, pairs_by_split)


def _csv_or_gzip(root: Path, name: str) -> Path:
    """Return root/name, or root/name.gz when only that exists."""
    gzipped = root / f"{name}.gz"
    return gzipped if gzipped.is_file() and not (root / name).is_file() else root / name


def _mimic_report_path(root: Path, study_folder: Path) -> Path | None:
    """Return the study's report file, beside its image folder or under reports/, or None."""
    for base in (root, root / "reports"):
        path = base / study_folder.with_suffix(".txt")
        if path.is_file():
            return path
    return None


def _read_chexpert_labels(path: Path) -> tuple[tuple[str, ...], dict[str, dict[str, int]]]:
    """Read a CheXpert label file as (label names, {study id: {name: 1, 0 or -1}})."""
    labels_by_study = {}
    with _open_text(path) as file:
        reader = _dict_reader(file, path, ("subject_id", "study_id"))
        names = tuple(c for c in reader.fieldnames if c not in ("subject_id", "study_id"))
        for number, row in enumerate(reader, start=2):
            labels_by_study[row["study_id"]] = {name: _chexpert_value(row[name], path, number, name) for name in names}
    return names, labels_by_study


def _chexpert_value(cell: str | None, path: Path, number: int, name: str) -> int:
    """Map a CheXpert cell to 1, 0 or -1. An empty cell (not mentioned) counts as 0."""
    if not cell:
        return 0
    try:
        value = float(cell)
    except ValueError:
        value = None
    if value not in (1.0, 0.0, -1.0):
        raise ValueError(f"{path} line {number}: invalid {name} value {cell!r}; expected 1.0, 0.0, -1.0 or empty")
    return int(value)


ROCO_SPLITS = {"train": "train", "validation": "val", "test": "test"}  # native folder -> split name
ROCO_CSV_FILES = {"train": "radiologytraindata.csv", "validation": "radiologyvaldata.csv",
                  "test": "radiologytestdata.csv"}
ROCO_LAYOUT = (
    "{train,validation,test}/radiology/captions.txt with images/ beside it (ROCO repository), or "
    "{train,validation,test}/radiology{train,val,test}data.csv with radiology/images/ (Kaggle copy), "
    "in PATH, PATH/data or PATH/all_data"
)


def _roco_source(path: Path) -> DataSource:
    """Load the radiology images of ROCO and their captions.

    Two layouts are read, in PATH, PATH/data or PATH/all_data. The ROCO repository, after its
    scripts/fetch.py: {train,validation,test}/radiology/captions.txt ("ROCO_00001<TAB>caption"
    lines), dlinks.txt and images/. fetch.py names each image PMCID_FILE after the archive and
    the file name on the id's dlinks.txt line, and an id without such a line is looked up as
    images/ROCO_00001.jpg. The Kaggle copy: {split}/radiology{train,val,test}data.csv (columns
    id, name, caption) with the images at {split}/radiology/images/NAME.
    Splits: train, val (native "validation") and test. No labels. Group: identical captions.
    """
    base = _roco_base(path)
    if base is None:
        raise FileNotFoundError(f"ROCO: no caption files found under {path}; expected {ROCO_LAYOUT}")
    pairs_by_split = {}
    for folder, split in ROCO_SPLITS.items():
        radiology = base / folder / "radiology"
        captions_file, csv_file = radiology / "captions.txt", base / folder / ROCO_CSV_FILES[folder]
        if captions_file.is_file():
            source_file, entries = captions_file, _read_roco_captions(captions_file)
        elif csv_file.is_file():
            source_file, entries = csv_file, _read_roco_csv(csv_file)
        else:
            raise FileNotFoundError(f"ROCO: {captions_file} not found (nor {csv_file}); expected {ROCO_LAYOUT}")

        pairs_by_split[split] = []
        missing_images, empty_captions = [], 0
        for image_name, caption in entries:
            text = clean_report(caption, sections=False)
            image_path = radiology / "images" / image_name
            if not text:
                empty_captions += 1
                continue
            if not image_path.is_file():
                missing_images.append(image_path)
                continue
            pairs_by_split[split].append(Pair(image_path, text, _text_group(text), {}))
        _log_skipped_items(source_file, empty_captions, "empty captions")
        _log_skipped_items(source_file, len(missing_images), "images whose file is missing",
                     missing_images[0] if missing_images else None)
    return DataSource("roco", base, ("train", "val", "test"), "test", (), pairs_by_split)


def _roco_base(path: Path) -> Path | None:
    """Return the folder among PATH, PATH/data and PATH/all_data that contains ROCO's splits."""
    for base in (path, path / "data", path / "all_data"):
        for folder in ROCO_SPLITS:
            captions_file = base / folder / "radiology" / "captions.txt"
            if captions_file.is_file() or (base / folder / ROCO_CSV_FILES[folder]).is_file():
                return base
    return None


def _read_roco_captions(path: Path) -> list[tuple[str, str]]:
    """Read a ROCO captions.txt as (image file name, caption), naming images after dlinks.txt."""
    file_names = {}
    dlinks = path.parent / "dlinks.txt"
    if dlinks.is_file():
        for line in dlinks.read_text(encoding="utf-8").splitlines():
            fields = line.split("\t")  # id, "wget -r ftp://.../PMC123.tar.gz -P /path/to/Dir", file name
            archives = [word for word in fields[1].split() if word.endswith(".tar.gz")] if len(fields) == 3 else []
            if archives:
                pmc_id = archives[0].rsplit("/", 1)[-1].removesuffix(".tar.gz")
                file_names[fields[0].strip()] = f"{pmc_id}_{fields[2].strip()}"

    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        roco_id, tab, caption = line.partition("\t")
        if not tab:
            raise ValueError(f"{path} line {number}: expected a ROCO id, a tab and a caption")
        roco_id = roco_id.strip()
        entries.append((file_names.get(roco_id, f"{roco_id}.jpg"), caption))
    return entries


def _read_roco_csv(path: Path) -> list[tuple[str, str]]:
    """Read a ROCO CSV file of the Kaggle copy (id, name, caption) as (image file name, caption)."""
    with open(path, newline="", encoding="utf-8") as file:
        return [(row["name"], row["caption"]) for row in _dict_reader(file, path, ("name", "caption"))]


# -----------------------------------------------------------------------------
# Dataset


class PairDataset(torch.utils.data.Dataset):
    """Model inputs for a list of pairs.

    Texts are tokenised once here. Images are decoded once into a uint8 cache, downscaled so the
    shorter side is at most 2 * image_size to bound memory, and the transform (random when
    train=True) runs on every __getitem__. 16-bit images are therefore quantised to 256 levels
    after load_image rescales them. group_names[g] is the group string behind group id g.

    A pair whose image is missing or cannot be decoded is dropped here, before training starts,
    and counted in a warning of the "data" logger. dropped_images lists those image paths.
    With strict=True the first such image raises its error instead.
    """

    def __init__(self, pairs: list[Pair], tokenizer: Tokenizer, image_size: int, channels: int = 1,
                 train: bool = False, max_len: int = 64, *, strict: bool = False):
        if not pairs:
            raise ValueError("PairDataset needs at least one pair")
        self.transform = ImageTransform(image_size, channels, train)
        self.pairs, self.images, self.dropped_images = [], [], []
        errors = []
        for pair in tqdm(pairs, desc="Decoding images", leave=False, disable=len(pairs) < 1000):
            try:
                self.images.append(_cached_image(pair.image_path, channels, 2 * image_size))
            except (FileNotFoundError, ValueError) as error:
                if strict:
                    raise
                self.dropped_images.append(pair.image_path)
                errors.append(error)
                continue
            self.pairs.append(pair)
        if errors:
            logger.warning("dropped %d of %d pairs whose image cannot be loaded, e.g. %s",
                           len(errors), len(pairs), errors[0])
        if not self.pairs:
            raise ValueError(f"none of the {len(pairs)} images could be loaded, e.g. {errors[0]}")

        # texts and groups of the kept pairs only, so row i of every array is pair i
        self.input_ids, self.attention_mask = tokenize(tokenizer, [p.text for p in self.pairs], max_len)
        self.group_names = sorted({p.group for p in self.pairs})
        group_ids = {name: i for i, name in enumerate(self.group_names)}
        self.groups = torch.tensor([group_ids[p.group] for p in self.pairs], dtype=torch.long)

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
