"""Image loading, transforms, tokenizer, synthetic generator, loaders and PairDataset."""

import csv
import json
import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

import data


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset, generated once for the module."""
    root = tmp_path_factory.mktemp("synthetic") / "cxr"
    return data.make_synthetic_dataset(root, n_train=20, n_val=5, n_test=5, size=64, seed=3)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["Small left pleural effusion.", "No pneumothorax.", "The heart is mildly enlarged.",
             "Patchy consolidation in the right lower zone."] * 5
    return data.train_tokenizer(texts, vocab_size=200)


def read_manifest(root):
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


def write_png(path, array, mode=None):
    image = Image.fromarray(array)
    if mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)  # exact for <= 256 colours
    elif mode is not None:
        image = image.convert(mode)
    image.save(path)
    return path


# -----------------------------------------------------------------------------
# load_image


def test_load_image_modes_agree(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 24).astype(np.uint8), (16, 1))  # (16, 24), brighter to the right
    rgba = np.dstack([ramp, ramp, ramp, np.full_like(ramp, 255)])
    sixteen_bit = (1000 + ramp.astype(np.uint16) * 8).astype(np.uint16)  # 1000..3040
    paths = {
        "L": write_png(tmp_path / "grey.png", ramp),
        "RGBA": write_png(tmp_path / "rgba.png", rgba),
        "P": write_png(tmp_path / "palette.png", np.dstack([ramp] * 3), mode="P"),
        "I;16": write_png(tmp_path / "sixteen.png", sixteen_bit),
    }
    for mode, path in paths.items():
        assert Image.open(path).mode == mode
        for channels in (1, 3):
            pixels = data.load_image(path, channels)
            assert pixels.shape == (16, 24, channels), mode
            assert pixels.dtype == np.float32, mode
            assert pixels.min() >= 0.0, mode
            assert pixels.max() <= 1.0, mode

    grey = data.load_image(paths["L"])
    np.testing.assert_allclose(data.load_image(paths["RGBA"]), grey, atol=1e-5)
    np.testing.assert_allclose(data.load_image(paths["P"]), grey, atol=1e-5)

    deep = data.load_image(paths["I;16"])[:, :, 0]
    assert deep.mean() < 0.9  # not clipped to white
    assert deep.min() == 0.0
    assert deep.max() == 1.0
    assert np.all(np.diff(deep[0]) > 0)  # ordering kept along the ramp
    expected = (sixteen_bit - 1000.0) / (sixteen_bit.max() - 1000.0)
    np.testing.assert_allclose(deep, expected, atol=1e-6)


@pytest.mark.parametrize("mode, dtype", [("I;16B", ">u2"), ("I", "<i4"), ("F", "<f4")])
def test_load_image_deep_modes_rescaled(tmp_path, mode, dtype):
    values = (np.arange(10 * 12).reshape(10, 12) * 300 + 5000).astype(dtype)  # 5000..40700, increasing
    path = tmp_path / "deep.tif"
    Image.frombytes(mode, (12, 10), values.tobytes()).save(path)
    assert Image.open(path).mode == mode
    pixels = data.load_image(path)[:, :, 0]
    expected = (values - 5000.0) / (values.max() - 5000.0)
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


def test_load_image_la_and_rgb(tmp_path):
    grey = np.full((4, 4), 100, dtype=np.uint8)
    la = write_png(tmp_path / "la.png", np.dstack([grey, np.full_like(grey, 255)]))
    rgb = write_png(tmp_path / "rgb.png", np.dstack([grey, grey, grey]))
    for path in (la, rgb):
        np.testing.assert_allclose(data.load_image(path, 3), np.full((4, 4, 3), 100 / 255), atol=1e-6)
        np.testing.assert_allclose(data.load_image(path, 1), np.full((4, 4, 1), 100 / 255), atol=1e-5)


def test_load_image_rgba_composites_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, :2, 3] = 255  # left half opaque, right half transparent
    pixels = data.load_image(write_png(tmp_path / "alpha.png", rgba))
    assert pixels[0, 0, 0] == pytest.approx(200 / 255, abs=1e-3)
    assert pixels[0, 3, 0] == 0.0


def test_load_image_constant_16bit_is_zero(tmp_path):
    path = write_png(tmp_path / "flat.png", np.full((8, 8), 2000, dtype=np.uint16))
    pixels = data.load_image(path)
    assert np.all(np.isfinite(pixels))
    assert np.all(pixels == 0.0)


def test_load_image_undecodable_names_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        data.load_image(path)
    with pytest.raises(FileNotFoundError):
        data.load_image(tmp_path / "missing.png")


# -----------------------------------------------------------------------------
# ImageTransform


def test_train_transform_never_flips():
    image = np.zeros((40, 60, 1), dtype=np.uint8)
    image[:, :30] = 255  # bright left half
    transform = data.ImageTransform(24, channels=1, train=True)
    torch.manual_seed(0)
    for _ in range(50):
        out = transform(image)
        assert out.shape == (1, 24, 24)
        assert out.dtype == torch.float32
        assert out[0, :, 0].mean() > out[0, :, -1].mean()  # the bright side stays on the left


def test_eval_transform_centre_crops():
    image = np.zeros((40, 80, 3), dtype=np.float32)
    image[:, 20:60] = 1.0  # the centre square is white, the sides black
    out = data.ImageTransform(16, channels=3, train=False)(image)
    assert out.shape == (3, 16, 16)
    # White maps to 1 with mean 0.5 and std 0.5. The bilinear filter reads a little past the
    # crop box, so the outermost columns are slightly darker.
    torch.testing.assert_close(out[:, :, 1:-1], torch.ones(3, 16, 14))
    assert out.min() > 0.5


def test_train_transform_seeded_repeats():
    image = np.random.default_rng(0).integers(0, 256, (32, 48, 1), dtype=np.uint8)
    transform = data.ImageTransform(16, train=True)
    torch.manual_seed(7)
    first = transform(image)
    torch.manual_seed(7)
    torch.testing.assert_close(transform(image), first)


def test_transform_rejects_wrong_channels():
    with pytest.raises(ValueError, match="shape"):
        data.ImageTransform(16, channels=3)(np.zeros((8, 8, 1), dtype=np.float32))


# -----------------------------------------------------------------------------
# Tokenizer


def test_tokenize_truncates_and_pads(tokenizer, tmp_path):
    cls_id, sep_id, pad_id = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    assert pad_id == 0
    long_text = " ".join(["small left pleural effusion"] * 20)
    ids, mask = data.tokenize(tokenizer, [long_text, "No pneumothorax."], max_len=12)
    assert ids.shape == (2, 12)
    assert ids.dtype == torch.long
    assert mask.shape == (2, 12)
    assert mask.dtype == torch.bool

    assert ids[0, 0] == cls_id
    assert ids[0, -1] == sep_id
    assert mask[0].all()

    length = int(mask[1].sum())
    assert ids[1, 0] == cls_id
    assert ids[1, length - 1] == sep_id
    assert not mask[1, length:].any()
    assert (ids[1, length:] == pad_id).all()

    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = data.load_tokenizer(tmp_path / "tokenizer.json")
    reloaded_ids, _ = data.tokenize(loaded, [long_text, "No pneumothorax."], max_len=12)
    torch.testing.assert_close(reloaded_ids, ids)


def test_load_tokenizer_missing_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.load_tokenizer(tmp_path)


# -----------------------------------------------------------------------------
# Synthetic dataset


def test_synthetic_is_deterministic(synthetic_root, tmp_path):
    again = data.make_synthetic_dataset(tmp_path / "again", n_train=20, n_val=5, n_test=5, size=64, seed=3)
    other = data.make_synthetic_dataset(tmp_path / "other", n_train=20, n_val=5, n_test=5, size=64, seed=4)
    rows = read_manifest(synthetic_root)
    assert read_manifest(again) == rows
    assert [r["text"] for r in read_manifest(other)] != [r["text"] for r in rows]
    for row in rows[:5]:
        first = np.asarray(Image.open(synthetic_root / row["image"]))
        second = np.asarray(Image.open(again / row["image"]))
        np.testing.assert_array_equal(first, second)


def test_synthetic_files_and_labels(synthetic_root):
    rows = read_manifest(synthetic_root)
    assert [r["split"] for r in rows].count("train") == 20
    assert [r["split"] for r in rows].count("val") == 5
    assert [r["split"] for r in rows].count("test") == 5
    for row in rows:
        image = Image.open(synthetic_root / row["image"])
        assert image.mode == "L"
        assert image.size == (64, 64)
        labels = row["labels"]
        assert tuple(labels) == data.SYNTHETIC_LABELS
        assert set(labels.values()) <= {0, 1}
        findings = sum(labels[name] for name in data.SYNTHETIC_LABELS if name != "normal")
        assert labels["normal"] == int(findings == 0)
        positive = {name for name, value in labels.items() if value and name != "normal"}
        assert {f["finding"] for f in row["findings"]} == positive
    assert not list(synthetic_root.parent.glob("*.partial-*"))  # the staging folder was renamed


FINDING_WORDS = {  # words that only the sentence of a present finding uses
    "pleural_effusion": ("effusion",),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodule",),
    "consolidation": ("consolidation", "airspace", "opacity"),
}


def test_synthetic_report_laterality():
    """Every lateralised finding's sentences name its side and never the other one."""
    checked = 0
    for index in range(300):
        rng = np.random.default_rng([0, index])
        findings = data._sample_study(rng)["findings"]
        sentences = re.split(r"(?<=\.) ", data._write_report(findings, rng))
        for finding in findings:
            if finding["finding"] not in FINDING_WORDS:
                continue
            words = FINDING_WORDS[finding["finding"]]
            mentions = [s.lower() for s in sentences if any(w in s.lower() for w in words)]
            assert mentions, (finding, sentences)
            for sentence in mentions:
                if finding["side"] == "bilateral":
                    assert "bilateral" in sentence or "both sides" in sentence, sentence
                else:
                    other = "left" if finding["side"] == "right" else "right"
                    assert finding["side"] in sentence, (finding, sentence)
                    assert other not in sentence, (finding, sentence)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("finding, brighter", [
    ({"finding": "pleural_effusion", "side": "left", "size": "large"}, True),
    ({"finding": "pleural_effusion", "side": "right", "size": "large"}, True),
    ({"finding": "pneumothorax", "side": "left", "size": "large"}, False),
    ({"finding": "consolidation", "side": "right", "zone": "lower"}, True),
])
def test_synthetic_finding_on_named_side(finding, brighter):
    """PA convention: a finding in the patient's left lung appears in the image's right half."""
    differences = []
    for index in range(4):
        images = []
        for findings in ([], [finding]):
            rng = np.random.default_rng([1, index])
            study = data._sample_study(rng)
            study["findings"] = findings
            images.append(data._draw_radiograph(study, 64, rng).astype(float))
        differences.append(images[1] - images[0])
    change = np.mean(differences, axis=0) * (1 if brighter else -1)
    left_half, right_half = change[:, :32].sum(), change[:, 32:].sum()
    expected, opposite = (right_half, left_half) if finding["side"] == "left" else (left_half, right_half)
    assert expected > 3 * abs(opposite) + 50


def test_synthetic_groups_follow_text(synthetic_root):
    rows = read_manifest(synthetic_root)
    text_of_group = {}
    for row in rows:
        assert text_of_group.setdefault(row["group"], row["text"]) == row["text"]
    assert len(text_of_group) == len({row["text"] for row in rows})


def test_synthetic_other_settings_rejected(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="delete the folder"):
        data.make_synthetic_dataset(synthetic_root, n_train=21, n_val=5, n_test=5, size=64, seed=3)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.jsonl").write_text("")
    with pytest.raises(FileExistsError, match="unfinished"):
        data.make_synthetic_dataset(unfinished)


def test_open_source_synthetic(synthetic_root):
    for spec in (f"synthetic:{synthetic_root}", str(synthetic_root)):
        source = data.open_source(spec)
        assert source.name == "synthetic"
        assert source.splits == ("train", "val", "test")
        assert source.eval_split == "test"
        assert source.label_names == data.SYNTHETIC_LABELS
        assert [len(source.pairs(s)) for s in source.splits] == [20, 5, 5]
        assert all(p.image_path.is_file() for p in source.pairs("test"))
    with pytest.raises(ValueError, match=r"'dev'.*train, val, test"):
        source.pairs("dev")


def test_pair_dataset_items(synthetic_root, tokenizer):
    pairs = data.open_source(str(synthetic_root)).pairs("train")
    pairs = pairs + pairs[:3]  # three repeated texts share their group
    dataset = data.PairDataset(pairs, tokenizer, image_size=16, channels=1, train=True, max_len=20)
    assert len(dataset) == 23
    item = dataset[21]
    expected = {  # key: (shape, dtype)
        "image": ((1, 16, 16), torch.float32),
        "input_ids": ((20,), torch.long),
        "attention_mask": ((20,), torch.bool),
        "group": ((), torch.long),
        "index": ((), torch.long),
    }
    for key, (shape, dtype) in expected.items():
        assert item[key].shape == shape, key
        assert item[key].dtype == dtype, key
    assert int(item["index"]) == 21
    assert int(dataset[21]["group"]) == int(dataset[1]["group"])
    assert dataset.group_names[int(item["group"])] == pairs[21].group
    assert min(dataset.images[0].shape[:2]) == 32  # 64 px cached at 2 * image_size
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 1, 16, 16)
    assert batch["group"].shape == (4,)


# -----------------------------------------------------------------------------
# Manifest files and open_source


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(30):
        write_png(folder / f"{i}.png", np.full((8, 8), i * 8, dtype=np.uint8))
    return folder


def test_manifest_jsonl_with_splits(tmp_path, image_folder):
    rows = [{"image": f"images/{i}.png", "text": f"text {i % 12}", "split": ["train", "val", "test"][i % 3],
             "labels": {"finding": i % 2}} for i in range(30)]
    rows[0]["group"] = "patient-7"
    rows[1]["image"] = str(image_folder / "1.png")  # absolute paths work too
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    source = data.open_source(str(path))
    assert source.name == "manifest"
    assert source.splits == ("train", "val", "test")
    assert source.eval_split == "test"
    assert source.label_names == ("finding",)
    assert len(source.pairs("train")) == 10
    first, second = source.pairs("train")[:2]
    assert first.group == "patient-7"
    assert first.labels == {"finding": 0}
    assert source.pairs("val")[0].image_path == image_folder / "1.png"
    same_text = [p for p in source.pairs("train") if p.text == second.text]
    assert len(same_text) > 1
    assert len({p.group for p in same_text}) == 1


def test_manifest_csv_without_split(tmp_path, image_folder):
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "text", "modality", "score"])
        for i in range(30):
            writer.writerow([f"images/{i}.png", f"caption {i}", "CT" if i % 2 else "MR", str(i)])

    source = data.open_source(f"manifest:{path}")
    assert source.splits == ("train", "val")
    assert source.eval_split == "val"
    assert source.label_names == ("modality", "score")
    train, val = source.pairs("train"), source.pairs("val")
    assert len(val) == 3  # 10 % of 30 groups
    assert len(train) + len(val) == 30
    assert not {p.group for p in train} & {p.group for p in val}
    assert train[0].labels["score"] in range(30)  # numbers parsed
    assert data.open_source(f"manifest:{path}").pairs("val") == val  # same cut every time


def test_manifest_missing_column_named(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("image,caption\na.png,hello\n")
    with pytest.raises(ValueError, match="'text'"):
        data.open_source(str(csv_path))
    jsonl_path = tmp_path / "bad.jsonl"
    jsonl_path.write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl line 1 has no 'image'"):
        data.open_source(str(jsonl_path))


def test_manifest_skips_missing_images(tmp_path, image_folder, caplog):
    rows = [{"image": "images/0.png", "text": "kept"}, {"image": "images/absent.png", "text": "skipped"},
            {"image": "images/1.png", "text": " "}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING, logger="data"):
        source = data.open_source(str(path))
    assert [p.text for p in source.pairs("train")] == ["kept"]
    assert "1 rows whose image file is missing" in caplog.text
    assert "1 rows with an empty text" in caplog.text


def test_open_source_bad_paths_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*medpix:"):
        data.open_source(str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.open_source(f"medpix:{missing}")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown.*Descriptions.json"):
        data.open_source(str(unknown))
    with pytest.raises(FileNotFoundError, match="unknown"):
        data.open_source(f"medpix:{unknown}")


# -----------------------------------------------------------------------------
# MedPix 2.0 (skipped without a local copy)


@pytest.fixture(scope="module")
def medpix(medpix_root):
    return data.open_source(str(medpix_root))


def test_medpix_splits(medpix, medpix_root):
    assert medpix.name == "medpix"
    assert medpix.splits == ("train", "val", "dev")
    assert medpix.eval_split == "dev"
    native = {}
    for split in ("train", "dev"):
        lines = (medpix_root / "splitted_dataset" / f"descriptions_{split}.jsonl").read_text().splitlines()
        native[split] = [json.loads(line) for line in lines if line.strip()]
    sizes = {split: len(medpix.pairs(split)) for split in medpix.splits}
    assert sizes["train"] + sizes["val"] == len(native["train"])
    assert sizes["dev"] == len(native["dev"])
    assert 0.05 < sizes["val"] / len(native["train"]) < 0.2

    case_of = {(medpix_root / "images" / f"{row['image']}.png"): row["U_id"] for row in native["train"]}
    train_cases = {case_of[p.image_path] for p in medpix.pairs("train")}
    val_cases = {case_of[p.image_path] for p in medpix.pairs("val")}
    assert val_cases
    assert not train_cases & val_cases


def test_medpix_labels_and_groups(medpix):
    pairs = [p for split in medpix.splits for p in medpix.pairs(split)]
    assert medpix.label_names == ("Type", "Location Category", "Plane")
    for pair in pairs:
        assert set(pair.labels) == set(medpix.label_names)
        assert all(isinstance(value, str) for value in pair.labels.values())
        assert pair.text
    group_of_text = {}
    for pair in pairs:
        assert group_of_text.setdefault(pair.text, pair.group) == pair.group
    assert len(group_of_text) < len(pairs)  # some captions repeat


def test_medpix_pair_dataset(medpix, tokenizer):
    pairs = medpix.pairs("dev")[:8]
    dataset = data.PairDataset(pairs, tokenizer, image_size=32, channels=3, train=False, max_len=16)
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32)
    assert item["input_ids"].shape == (16,)
    assert item["attention_mask"].shape == (16,)
    assert item["group"].shape == ()
    assert item["image"].min() >= -1.0
    assert item["image"].max() <= 1.0
