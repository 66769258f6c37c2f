"""Dataset formats read from their native layouts, report cleaning and manifest column names.

The fixtures under tests/fixtures/ copy each dataset's file layout with a few invented reports
and 32 x 32 images (tests/fixtures/make_images.py writes the images).
"""

import csv
import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MIMIC_LABELS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
)


def open_both_ways(name):
    """Open a fixture as "name:PATH" and by detection, check both agree, and return the source."""
    path = FIXTURES / name
    named = data.open_source(f"{name}:{path}")
    detected = data.open_source(str(path))
    assert named.name == detected.name == name
    assert named.pairs_by_split == detected.pairs_by_split
    return named


def pairs_of(source, split):
    """Map image path, relative to the source's root, to its pair."""
    return {pair.image_path.relative_to(source.root).as_posix(): pair for pair in source.pairs(split)}


def write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(path)


# -----------------------------------------------------------------------------
# clean_report


def test_clean_report_keeps_findings_impression():
    report = (
        "                                 FINAL REPORT\n"
        " EXAMINATION:  CHEST (PA AND LAT)\n"
        " INDICATION:  ___ year old man with cough.\n"
        " FINDINGS: \n"
        " Lungs are clear.  No effusion.\n"
        " IMPRESSION: \n"
        " No acute process.\n"
    )
    assert data.clean_report(report) == "Lungs are clear. No effusion. No acute process."


def test_clean_report_combined_header():
    report = " COMPARISON:  None.\n FINDINGS AND IMPRESSION:  Normal chest.\n"
    assert data.clean_report(report) == "Normal chest."


def test_clean_report_fallbacks():
    with_headers = " INDICATION:  Fever.\n CONCLUSION:\n Right lower lobe pneumonia.\n"
    assert data.clean_report(with_headers) == "Right lower lobe pneumonia."
    without_headers = "FINAL REPORT\n PA and lateral views.  The lungs are clear.\n"
    assert data.clean_report(without_headers) == "PA and lateral views. The lungs are clear."


def test_clean_report_removes_placeholders():
    assert data.clean_report("There is no XXXX effusion. XXXX XXXX.") == "There is no effusion."
    assert data.clean_report("Discussed with Dr. ___ on ___ at 10:15.") == "Discussed with Dr. on at 10:15."
    assert data.clean_report("XXXX.") == ""
    assert data.clean_report(" FINDINGS:  ___\n IMPRESSION:  ___.\n") == ""
    assert data.clean_report(None) == ""


def test_clean_report_without_sections():
    caption = "CT: axial view showing a renal cyst."
    assert data.clean_report(caption, sections=False) == caption
    assert data.clean_report(caption) == "axial view showing a renal cyst."  # "CT:" reads as a header


# -----------------------------------------------------------------------------
# IU X-ray, report-generation layout (annotation.json)


def test_iu_xray_pairs_and_splits():
    source = open_both_ways("iu_xray")
    assert source.splits == ("train", "val", "test")
    assert source.eval_split == "test"
    assert source.label_names == ()
    assert {split: len(source.pairs(split)) for split in source.splits} == {"train": 8, "val": 2, "test": 2}
    train = pairs_of(source, "train")
    assert train["images/CXR10_IM-0002/0.png"].text == (
        "Heart size is normal. The lungs are clear. There is no pleural effusion. Dated of the thoracic spine.")
    assert pairs_of(source, "test")["images/CXR70_IM-2254/0.png"].text == (
        "The lungs are hyperinflated. No acute disease.")
    assert all(pair.labels == {} for pair in source.pairs("train"))


def test_iu_xray_groups():
    train = pairs_of(open_both_ways("iu_xray"), "train")
    study = [train[f"images/CXR20_IM-0651/{i}.png"] for i in range(3)]
    assert len({pair.group for pair in study}) == 1
    assert study[0].group != train["images/CXR10_IM-0002/0.png"].group
    # two studies with the same report share a group
    assert train["images/CXR40_IM-2019/0.png"].group == train["images/CXR41_IM-2050/0.png"].group


def test_iu_xray_logs_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="data"):
        source = data.open_source(str(FIXTURES / "iu_xray"))
    assert "skipped 2 studies with an empty report" in caplog.text
    assert "skipped 1 images whose file is missing" in caplog.text
    images = {pair.image_path.parent.name for split in source.splits for pair in source.pairs(split)}
    assert "CXR30_IM-1297" not in images  # empty report
    assert "CXR80_IM-2330" not in images  # "XXXX." only


def test_iu_xray_labels_when_present(tmp_path):
    shutil.copytree(FIXTURES / "iu_xray" / "images", tmp_path / "images")
    studies = {split: [] for split in ("train", "val", "test")}
    studies["train"].append({"id": "CXR10_IM-0002", "report": "Normal chest.", "split": "train",
                              "image_path": ["CXR10_IM-0002/0.png"], "labels": {"normal": 1}})
    studies["test"].append({"id": "CXR20_IM-0651", "report": "Cardiomegaly.", "split": "test",
                             "image_path": ["CXR20_IM-0651/0.png"], "labels": {"cardiomegaly": 1, "normal": 0}})
    (tmp_path / "annotation.json").write_text(json.dumps(studies))
    source = data.open_source(f"iu_xray:{tmp_path}")
    assert source.label_names == ("normal", "cardiomegaly")
    assert source.pairs("test")[0].labels == {"cardiomegaly": 1, "normal": 0}
    assert source.pairs("val") == []


def test_iu_xray_missing_file_named(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"annotation\.json not found"):
        data.open_source(f"iu_xray:{tmp_path}")


# -----------------------------------------------------------------------------
# IU X-ray, original OpenI release (report XML files)


def test_openi_pairs_and_splits():
    source = open_both_ways("openi")
    assert source.splits == ("train", "val", "test")
    assert source.eval_split == "test"
    # CXR3 and CXR7 hash to val and test, the other reports to train
    assert {split: len(source.pairs(split)) for split in source.splits} == {"train": 6, "val": 2, "test": 1}
    train = pairs_of(source, "train")
    assert train["images/CXR1_1_IM-0001-3001.png"].text == (
        "The cardiac silhouette is normal in size. lungs are clear. No pneumothorax or effusion. "
        "No acute cardiopulmonary disease.")
    assert source.pairs("val")[0].text == "No acute cardiopulmonary disease."  # IMPRESSION only


def test_openi_mesh_labels():
    source = open_both_ways("openi")
    # CXR4 (empty report) and CXR6 (no image) are skipped, and so are their headings
    assert source.label_names == ("Calcified Granuloma", "Cardiomegaly", "normal", "Pleural Effusion",
                                  "Pulmonary Atelectasis")
    train = pairs_of(source, "train")
    study = train["images/CXR2_1_IM-0652-1001.png"].labels
    assert study == {"Calcified Granuloma": 0, "Cardiomegaly": 1, "normal": 0, "Pleural Effusion": 0,
                     "Pulmonary Atelectasis": 1}
    assert train["images/CXR1_1_IM-0001-3001.png"].labels["normal"] == 1
    assert train["images/CXR5_1_IM-2117-1001.png"].labels["Calcified Granuloma"] == 1
    assert source.pairs("test")[0].labels["Pleural Effusion"] == 1


def test_openi_groups_and_skips(caplog):
    with caplog.at_level(logging.WARNING, logger="data"):
        source = data.open_source(str(FIXTURES / "openi"))
    train = pairs_of(source, "train")
    study = [train[f"images/CXR2_1_IM-0652-{view}001.png"] for view in (1, 2, 3)]
    assert len({pair.group for pair in study}) == 1
    assert study[0].group != train["images/CXR1_1_IM-0001-3001.png"].group
    assert "skipped 1 reports with empty FINDINGS and IMPRESSION" in caplog.text
    assert "skipped 1 reports without a parentImage" in caplog.text
    assert "skipped 1 images whose file is missing" in caplog.text


def test_openi_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ecgen-radiology not found"):
        data.open_source(f"openi:{tmp_path}")
    (tmp_path / "ecgen-radiology").mkdir()
    with pytest.raises(FileNotFoundError, match="no report XML files"):
        data.open_source(f"openi:{tmp_path}")


# -----------------------------------------------------------------------------
# MIMIC-CXR-JPG


def test_mimic_pairs_and_splits():
    source = open_both_ways("mimic_cxr")
    assert source.splits == ("train", "val", "test")
    assert source.eval_split == "test"
    assert {split: len(source.pairs(split)) for split in source.splits} == {"train": 4, "val": 1, "test": 2}
    texts = {pair.image_path.parent.name: pair.text for split in source.splits for pair in source.pairs(split)}
    assert texts == {
        "s50000001": "The heart is moderately enlarged. There is mild pulmonary vascular congestion, possibly "
                     "early edema. No pleural effusion or pneumothorax. Cardiomegaly with possible mild edema, "
                     "discussed with Dr. at 10:15.",
        "s50000002": "No acute cardiopulmonary process.",  # IMPRESSION only
        "s50000003": "Right internal jugular catheter ends in the low superior vena cava. No pneumothorax.",
        "s50000004": "PA and lateral views of the chest. The lungs are clear. Heart size is normal.",
        "s50000005": "Normal chest radiograph. No acute process.",  # report under reports/files/
    }


def test_mimic_chexpert_labels():
    source = open_both_ways("mimic_cxr")
    assert source.label_names == MIMIC_LABELS
    labels = {pair.image_path.parent.name: pair.labels for split in source.splits for pair in source.pairs(split)}
    first = labels["s50000001"]
    assert first["Cardiomegaly"] == 1
    assert first["Edema"] == -1  # uncertain is kept
    assert first["Pleural Effusion"] == 0
    assert first["Atelectasis"] == 0  # not mentioned
    assert labels["s50000003"]["Support Devices"] == 1
    assert labels["s50000005"] == dict.fromkeys(MIMIC_LABELS)  # not in the CheXpert file


def test_mimic_groups_and_skips(caplog):
    with caplog.at_level(logging.WARNING, logger="data"):
        source = data.open_source(str(FIXTURES / "mimic_cxr"))
    train = source.pairs("train")
    same_study = [pair for pair in train if pair.image_path.parent.name == "s50000001"]
    assert len(same_study) == 2
    assert same_study[0].group == same_study[1].group
    assert len({pair.group for pair in train}) == 3
    assert "skipped 1 studies whose report file is missing" in caplog.text  # s50000006
    assert "skipped 1 studies with an empty report" in caplog.text  # s50000007
    assert "skipped 1 images whose file is missing" in caplog.text  # s50000008


def test_mimic_reads_gzipped_csv(tmp_path):
    root = tmp_path / "mimic"
    shutil.copytree(FIXTURES / "mimic_cxr", root)
    for name in ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-chexpert.csv"):
        with open(root / name, "rb") as plain, gzip.open(root / f"{name}.gz", "wb") as packed:
            shutil.copyfileobj(plain, packed)
        (root / name).unlink()
    source = data.open_source(str(root))
    assert source.name == "mimic_cxr"
    assert [len(source.pairs(split)) for split in source.splits] == [4, 1, 2]


def test_mimic_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-split\.csv not found"):
        data.open_source(f"mimic_cxr:{tmp_path}")
    shutil.copy(FIXTURES / "mimic_cxr" / "mimic-cxr-2.0.0-split.csv", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv not found"):
        data.open_source(f"mimic_cxr:{tmp_path}")


def test_mimic_unknown_split_rejected(tmp_path):
    root = tmp_path / "mimic"
    shutil.copytree(FIXTURES / "mimic_cxr", root)
    split_file = root / "mimic-cxr-2.0.0-split.csv"
    split_file.write_text(split_file.read_text().replace(",validate", ",valid"))
    with pytest.raises(ValueError, match="line 6: unknown split 'valid'"):
        data.open_source(str(root))


# -----------------------------------------------------------------------------
# ROCO


def test_roco_repository_layout():
    source = open_both_ways("roco")
    assert source.splits == ("train", "val", "test")
    assert source.eval_split == "test"
    assert source.label_names == ()
    train = pairs_of(source, "train")
    assert sorted(train) == [
        "train/radiology/images/PMC1000002_ajcr-3-12-g001.jpg",  # named after dlinks.txt
        "train/radiology/images/PMC1000003_gr1.jpg",
        "train/radiology/images/PMC1000004_gr1.jpg",
        "train/radiology/images/ROCO_00007.jpg",  # no dlinks.txt line
    ]
    assert train["train/radiology/images/ROCO_00007.jpg"].text == "Sagittal T2-weighted MRI of the lumbar spine."
    assert [pair.text for pair in source.pairs("val")] == ["Coronal MRI of the knee showing a medial meniscal tear."]
    assert len(source.pairs("test")) == 1  # the other test image is missing


def test_roco_groups_identical_captions():
    train = pairs_of(open_both_ways("roco"), "train")
    same = train["train/radiology/images/PMC1000003_gr1.jpg"], train["train/radiology/images/PMC1000004_gr1.jpg"]
    assert same[0].group == same[1].group
    assert same[0].group != train["train/radiology/images/ROCO_00007.jpg"].group
    assert all(pair.labels == {} for pair in train.values())


def test_roco_logs_skipped(caplog):
    with caplog.at_level(logging.WARNING, logger="data"):
        data.open_source(str(FIXTURES / "roco"))
    assert "skipped 1 empty captions" in caplog.text
    assert "skipped 1 images whose file is missing" in caplog.text


def test_roco_kaggle_layout(tmp_path):
    files = {"train": "radiologytraindata.csv", "validation": "radiologyvaldata.csv", "test": "radiologytestdata.csv"}
    for folder, file_name in files.items():
        (tmp_path / "all_data" / folder).mkdir(parents=True)
        with open(tmp_path / "all_data" / folder / file_name, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["id", "name", "caption"])
            for i in range(2):
                name = f"PMC{i}_{folder}-g00{i}.jpg"
                writer.writerow([f"ROCO_{folder}_{i}", name, f" Radiograph {i} of the {folder} split. "])
                write_image(tmp_path / "all_data" / folder / "radiology" / "images" / name)
    source = data.open_source(str(tmp_path))
    assert source.name == "roco"
    assert source.root == tmp_path / "all_data"
    assert [len(source.pairs(split)) for split in source.splits] == [2, 2, 2]
    assert source.pairs("val")[1].text == "Radiograph 1 of the validation split."


def test_roco_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no caption files"):
        data.open_source(f"roco:{tmp_path}")
    shutil.copytree(FIXTURES / "roco" / "train", tmp_path / "train")
    with pytest.raises(FileNotFoundError, match=r"validation/radiology/captions\.txt not found"):
        data.open_source(f"roco:{tmp_path}")


# -----------------------------------------------------------------------------
# Detection


def test_detect_unknown_folder_lists_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot detect") as error:
        data.open_source(str(tmp_path))
    for expected in ("annotation.json", "ecgen-radiology", "mimic-cxr-2.0.0-split.csv", "captions.txt", "roco:"):
        assert expected in str(error.value)


# -----------------------------------------------------------------------------
# Manifest column names


@pytest.fixture
def renamed_csv(tmp_path):
    """A CSV manifest whose columns are path, report, study, fold and finding."""
    for i in range(4):
        write_image(tmp_path / "images" / f"{i}.png")
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "report", "study", "fold", "finding"])
        for i in range(4):
            writer.writerow([f"images/{i}.png", f"report {i}", f"study-{i // 2}", ["train", "test"][i // 2], i % 2])
    return path


def test_manifest_columns_in_spec(renamed_csv):
    source = data.open_source(f"manifest:{renamed_csv}?image=path&text=report&group=study&split=fold")
    assert source.splits == ("train", "test")
    assert source.label_names == ("finding",)
    first, second = source.pairs("train")
    assert first.image_path == renamed_csv.parent / "images" / "0.png"
    assert first.text == "report 0"
    assert first.group == second.group == "study-0"
    assert second.labels == {"finding": 1}


def test_manifest_columns_keyword(tmp_path):
    write_image(tmp_path / "scan.png")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"file": "scan.png", "findings": "Clear lungs.", "text": "unused"}) + "\n")
    source = data.open_source(str(path), columns={"image": "file", "text": "findings"})
    assert [pair.text for pair in source.pairs("train")] == ["Clear lungs."]  # one group: no val split
    # the spec's setting overrides the keyword
    with pytest.raises(ValueError, match="'report'"):
        data.open_source(f"manifest:{path}?text=report", columns={"image": "file", "text": "findings"})


def test_manifest_missing_column_named(renamed_csv, tmp_path):
    with pytest.raises(ValueError, match=r"pairs\.csv has no 'impression' column"):
        data.open_source(f"manifest:{renamed_csv}?image=path&text=impression")
    with pytest.raises(ValueError, match=r"pairs\.csv has no 'patient' column"):
        data.open_source(f"manifest:{renamed_csv}?image=path&text=report&group=patient")
    jsonl = tmp_path / "pairs.jsonl"
    rows = [{"file": "images/0.png", "findings": "a"}, {"file": "images/1.png", "text": "b"}]
    jsonl.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(ValueError, match=r"pairs\.jsonl line 2 has no 'findings' column"):
        data.open_source(f"manifest:{jsonl}?image=file&text=findings")


def test_manifest_invalid_column_settings(renamed_csv):
    with pytest.raises(ValueError, match="invalid manifest column setting 'image'"):
        data.open_source(f"manifest:{renamed_csv}?image")
    with pytest.raises(ValueError, match="unknown manifest column role 'caption'"):
        data.open_source(f"manifest:{renamed_csv}?caption=report")
    with pytest.raises(ValueError, match="only for a manifest"):
        data.open_source(str(FIXTURES / "roco"), columns={"text": "caption"})


# -----------------------------------------------------------------------------
# PairDataset on a loaded format


def test_pair_dataset_from_mimic():
    source = data.open_source(str(FIXTURES / "mimic_cxr"))
    pairs = source.pairs("train")
    tokenizer = data.train_tokenizer([pair.text for pair in pairs], vocab_size=120)
    dataset = data.PairDataset(pairs, tokenizer, image_size=16, channels=1, max_len=24)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=len(pairs))))
    assert batch["image"].shape == (4, 1, 16, 16)
    assert batch["image"].std() > 0  # the images decoded, not blank
    assert batch["group"][0] == batch["group"][1]  # the two images of study s50000001
    assert len(set(batch["group"].tolist())) == 3
