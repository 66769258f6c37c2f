"""Runs that survive a stop and bad data: resume, checkpoint files, signals, hostile datasets and NaN.

Subprocess tests run train.py through a small wrapper script that patches one function to print
a marker, and to hang where the test needs a fixed point. The test sends its signal once it
reads the marker.
Every run here uses one torch thread, so that runs in this process and in subprocesses compute
bit-identical results and finish quickly on a busy machine.
"""

import csv
import io
import json
import logging
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer

import data
import evaluate
import train
from conftest import TINY_FLAGS
from momentum import EMATeacher, FeatureQueue

REPO = Path(__file__).resolve().parents[1]
STATE_KEYS = ("model", "teacher", "image_queue", "text_queue", "optimizer")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_argv(dataset, out, *flags):
    return ["--data", f"synthetic:{dataset}", "--out", str(out), *TINY_FLAGS, *flags]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_state(a, b, where):
    """Assert that two nested state dicts are bit-identical, naming the first entry that differs."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# -----------------------------------------------------------------------------
# train.py in a subprocess, stopped at a known point

WRAPPER = """
import io, sys, time
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads(1)
import train

{patch}

train.main(sys.argv[1:])
"""

HANG_AFTER_SAVE = """
save_checkpoints = train.save_checkpoints

def save_then_hang(out, state, keep, best):
    save_checkpoints(out, state, keep, best)
    if state["step"] == {step}:
        print("SAVED", state["step"], flush=True)
        time.sleep(600)

train.save_checkpoints = save_then_hang
"""

HANG_INSIDE_SAVE = """
torch_save = torch.save

def save_half_then_hang(state, file):
    if state["step"] != {step}:
        return torch_save(state, file)
    buffer = io.BytesIO()
    torch_save(state, buffer)
    file.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    file.flush()
    print("WRITING", flush=True)
    time.sleep(600)

torch.save = save_half_then_hang
"""

PRINT_STEPS = """
learning_rate = train.learning_rate

def print_step(step, args):
    print("STEP", step + 1, flush=True)
    return learning_rate(step, args)

train.learning_rate = print_step
"""


def start_until(tmp_path, patch, argv, marker, timeout=120):
    """Start train.py with `patch` applied and return (process, output so far) once it prints `marker`."""
    script = tmp_path / "run_train.py"
    script.write_text(WRAPPER.format(repo=str(REPO), patch=patch))
    process = subprocess.Popen([sys.executable, str(script), *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    output = []
    for line in process.stdout:
        output.append(line)
        if marker in line:
            watchdog.cancel()
            return process, output
    watchdog.cancel()
    process.wait()
    raise AssertionError(f"train.py ended (status {process.returncode}) before printing {marker!r}:\n"
                         + "".join(output)[-3000:])


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stdout.close()
    assert process.returncode == -signal.SIGKILL


# -----------------------------------------------------------------------------
# resume and checkpoint files

def test_resume_after_kill_is_bit_exact(tmp_path, tiny_synthetic, monkeypatch):
    # dropout and a queue that wraps around make every random generator and the queue pointer matter
    flags = ["--accum", "2", "--batch-size", "8", "--steps", "6", "--eval-every", "3", "--queue-size", "40",
             "--dropout", "0.1", "--alpha-ramp-steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    process, _ = start_until(tmp_path, HANG_AFTER_SAVE.format(step=3), tiny_argv(tiny_synthetic, resumed, *flags),
                             "SAVED 3")
    kill(process)
    assert load(resumed / "checkpoint.pt")["step"] == 3
    train.main(tiny_argv(tiny_synthetic, resumed, *flags, "--resume"))

    # WordPiece training breaks ties in hash-map order, so two trainings on the same texts can give
    # different vocabularies. The uninterrupted run therefore takes the interrupted run's tokenizer.
    tokenizer_json = load(resumed / "checkpoint.pt")["tokenizer"]
    monkeypatch.setattr(train, "train_tokenizer", lambda texts, vocab_size: Tokenizer.from_str(tokenizer_json))
    train.main(tiny_argv(tiny_synthetic, straight, *flags))

    expected, actual = load(straight / "checkpoint.pt"), load(resumed / "checkpoint.pt")
    assert actual["step"] == 6
    for key in STATE_KEYS:
        assert_same_state(expected[key], actual[key], key)
    assert actual["teacher"]["updates"].item() == 6
    assert torch.equal(expected["rng"]["torch"], actual["rng"]["torch"])
    assert expected["data_position"] == actual["data_position"]

    expected_rows, actual_rows = read_metrics(straight), read_metrics(resumed)
    assert [row["step"] for row in actual_rows] == [1, 2, 3, 4, 5, 6]
    for expected_row, actual_row in zip(expected_rows, actual_rows):
        assert expected_row["loss"] == actual_row["loss"]


def test_kill_during_save_keeps_previous(tmp_path, tiny_synthetic):
    run = tmp_path / "run"
    argv = tiny_argv(tiny_synthetic, run, "--accum", "2", "--batch-size", "8", "--steps", "6", "--eval-every", "3")
    process, _ = start_until(tmp_path, HANG_INSIDE_SAVE.format(step=6), argv, "WRITING")
    kill(process)

    assert (run / "checkpoint_step000006.pt.tmp").is_file()
    assert not (run / "checkpoint_step000006.pt").exists()
    checkpoint = train.load_checkpoint(run / "checkpoint.pt")
    assert checkpoint["step"] == 3
    assert train.find_resume_checkpoint("", run) == run / "checkpoint.pt"


def test_sigterm_saves_then_exits(tmp_path, tiny_synthetic):
    run = tmp_path / "run"
    argv = tiny_argv(tiny_synthetic, run, "--accum", "2", "--batch-size", "8", "--steps", "1000",
                     "--eval-every", "1000")
    process, output = start_until(tmp_path, PRINT_STEPS, argv, "STEP 2")
    process.send_signal(signal.SIGTERM)
    output += process.stdout.readlines()
    process.wait(timeout=60)
    process.stdout.close()
    text = "".join(output)

    assert process.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "stopped by SIGTERM after step" in text
    assert "--resume" in text
    checkpoint = load(run / "checkpoint.pt")
    assert 2 <= checkpoint["step"] < 1000
    assert read_metrics(run)[-1]["step"] == checkpoint["step"]


def test_checkpoint_files_kept_and_best(tmp_path, tiny_synthetic, capsys):
    run = tmp_path / "run"
    train.main(tiny_argv(tiny_synthetic, run, "--accum", "2", "--batch-size", "8", "--steps", "4",
                         "--eval-every", "1", "--keep", "2"))
    assert sorted(path.name for path in run.glob("checkpoint_step*.pt")) == [
        "checkpoint_step000003.pt", "checkpoint_step000004.pt"]
    assert os.path.samefile(run / "checkpoint.pt", run / "checkpoint_step000004.pt")
    assert not list(run.glob("*.tmp"))

    recalls = [train.validation_recall(row["val"]) for row in read_metrics(run)]
    best_step = 1 + recalls.index(max(recalls))  # the first step with the highest score
    best = load(run / "checkpoint_best.pt")
    assert best["step"] == best_step
    assert best["best_recall"] == max(recalls)
    assert "checkpoint_best.pt (step" in capsys.readouterr().out

    result = evaluate.main(["--checkpoint", str(run / "checkpoint_best.pt")])
    assert result["step"] == best_step


def test_resume_rejects_other_settings(tmp_path, tiny_synthetic):
    run = tmp_path / "run"
    flags = ["--accum", "1", "--batch-size", "8", "--steps", "2", "--eval-every", "1"]
    train.main(tiny_argv(tiny_synthetic, run, *flags, "--steps", "1"))

    with pytest.raises(SystemExit, match="--width: checkpoint 32, this run 48"):
        train.main(tiny_argv(tiny_synthetic, run, *flags, "--width", "48", "--resume"))
    with pytest.raises(SystemExit, match="--vocab-size: checkpoint 200, this run 300"):
        train.main(tiny_argv(tiny_synthetic, run, *flags, "--vocab-size", "300", "--resume"))
    with pytest.raises(SystemExit, match="--method: checkpoint msd, this run clip"):
        train.main(tiny_argv(tiny_synthetic, run, *flags, "--method", "clip", "--resume"))

    original = (run / "tokenizer.json").read_text()
    data.train_tokenizer(["another vocabulary entirely"] * 3, vocab_size=50).save(str(run / "tokenizer.json"))
    with pytest.raises(SystemExit, match="tokenizer.json differs from the tokenizer stored in"):
        train.main(tiny_argv(tiny_synthetic, run, *flags, "--resume"))

    (run / "tokenizer.json").write_text(original)
    train.main(tiny_argv(tiny_synthetic, run, *flags, "--resume"))  # a longer --steps is allowed
    assert load(run / "checkpoint.pt")["step"] == 2


class CreateFileOnLoad:
    """Pickles as a call to open(path, "w"), which creates the file when unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_pickle_rejected(tmp_path, tiny_synthetic):
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": CreateFileOnLoad(marker)}, run / "checkpoint.pt")

    with pytest.raises(SystemExit, match=r"rejected .*checkpoint.pt.*never runs code"):
        train.main(tiny_argv(tiny_synthetic, run, "--resume"))
    assert not marker.exists()
    with pytest.raises(SystemExit, match=r"rejected .*checkpoint.pt.*could run code"):
        evaluate.load_checkpoint(run / "checkpoint.pt", "student", torch.device("cpu"))
    assert not marker.exists()

    torch.load(run / "checkpoint.pt", weights_only=False)  # the payload works where code may run
    assert marker.exists()


def test_resume_path_not_found(tmp_path, tiny_synthetic):
    with pytest.raises(SystemExit, match="absent.pt not found"):
        train.main(tiny_argv(tiny_synthetic, tmp_path / "run", "--resume", str(tmp_path / "absent.pt")))


# -----------------------------------------------------------------------------
# non-finite loss and gradient

def inject_nan(monkeypatch, step, K, where):
    """Make the loss ("loss") or only the gradient ("gradient") of optimizer step `step` (1-based) NaN."""
    calls = []
    original = train.msd_loss

    def nan_msd_loss(*args):
        calls.append(1)
        terms = original(*args)
        if (len(calls) - 1) // K + 1 == step:
            if where == "loss":
                terms = {**terms, "loss": terms["loss"] * float("nan")}
            else:
                args[0].register_hook(lambda grad: grad * float("nan"))  # the image queries' gradient
        return terms

    monkeypatch.setattr(train, "msd_loss", nan_msd_loss)


def count_calls(monkeypatch, cls, name):
    calls = []
    original = getattr(cls, name)

    def counting(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(cls, name, counting)
    return calls


@pytest.mark.parametrize("where, message", [("loss", "non-finite loss"), ("gradient", "non-finite gradient norm")])
def test_nonfinite_step_stops_run(tmp_path, tiny_synthetic, monkeypatch, where, message):
    inject_nan(monkeypatch, step=2, K=2, where=where)
    updates = count_calls(monkeypatch, EMATeacher, "update")
    enqueues = count_calls(monkeypatch, FeatureQueue, "enqueue")
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=rf"{message} \(loss=.*infonce=.*kl=.*\) at step 2"):
        train.main(tiny_argv(tiny_synthetic, run, "--accum", "2", "--batch-size", "8", "--steps", "4",
                             "--eval-every", "1"))
    assert len(updates) == 1  # step 1 only
    assert len(enqueues) == 2  # the image and the text queue of step 1
    assert load(run / "checkpoint.pt")["step"] == 1
    assert [row["step"] for row in read_metrics(run)] == [1]


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_nonfinite_step_skipped(tmp_path, tiny_synthetic, monkeypatch, capsys, where):
    inject_nan(monkeypatch, step=2, K=2, where=where)
    run = tmp_path / "run"
    train.main(tiny_argv(tiny_synthetic, run, "--accum", "2", "--batch-size", "8", "--steps", "3",
                         "--eval-every", "1", "--skip-nonfinite"))
    before, after, later = (load(run / f"checkpoint_step00000{step}.pt") for step in (1, 2, 3))
    for key in ("model", "teacher", "image_queue", "text_queue"):
        assert_same_state(before[key], after[key], key)
        for name, value in after[key].items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{key}.{name} is not finite"
    # the optimizer's moments and step counts; param_groups hold the scheduled learning rate of each step
    assert_same_state(before["optimizer"]["state"], after["optimizer"]["state"], "optimizer.state")
    assert after["image_queue"]["count"].item() == 2 * 8  # one window of K x B keys, from step 1
    assert later["image_queue"]["count"].item() == 2 * 2 * 8  # step 3 trained again
    assert later["skipped_steps"] == 1
    rows = read_metrics(run)
    assert "skipped" in rows[1]
    assert "skipped" not in rows[2]
    assert "skipped 1 optimizer steps" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# hostile datasets

def write_png(path, array):
    Image.fromarray(array).save(path)
    return path


def make_hostile_dataset(folder):
    """Write a dataset with a row of every kind of bad input and return {case: (image, text)} of its rows.

    Good rows have 8x8 images. Tests lower Image.MAX_IMAGE_PIXELS to 1000, so the 40x40 image is
    above the limit (Pillow warns) and the 50x50 one above twice the limit (Pillow raises).
    """
    images = folder / "images"
    images.mkdir(parents=True)
    rows = {}
    for i in range(10):
        name = f"good {i}.png" if i % 2 else f"good-{i}.png"
        write_png(images / name, np.full((8, 8), 20 * i, dtype=np.uint8))
        rows[f"good {i}"] = (f"images/{name}", f"finding number {i} in the left lung")

    # noise, so that the pixel data is long and a cut leaves a valid header: Pillow opens the file
    # and fails while decoding it
    noise = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    png_bytes, jpeg_bytes = (_encode(noise, kind) for kind in ("PNG", "JPEG"))
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(png_bytes[:len(png_bytes) // 2])
    (images / "truncated.jpg").write_bytes(jpeg_bytes[:len(jpeg_bytes) // 2])
    (images / "notes.png").write_text("this is a text file, not an image\n")
    write_png(images / "over limit.png", np.zeros((40, 40), dtype=np.uint8))
    write_png(images / "bomb.png", np.zeros((50, 50), dtype=np.uint8))
    write_png(images / "one pixel.png", np.full((1, 1), 200, dtype=np.uint8))
    write_png(images / "flat16.png", np.full((8, 8), 2000, dtype=np.uint16))
    write_png(images / "Röntgen Thorax ü.png", np.full((8, 8), 77, dtype=np.uint8))
    rows.update({
        "missing file": ("images/absent.png", "a report whose image is missing"),
        "zero-byte file": ("images/empty.png", "a report with an empty image file"),
        "truncated png": ("images/truncated.png", "a report with a truncated png"),
        "truncated jpeg": ("images/truncated.jpg", "a report with a truncated jpeg"),
        "text as png": ("images/notes.png", "a report with a text file as image"),
        "over the pixel limit": ("images/over limit.png", "a report with a large image"),
        "over twice the pixel limit": ("images/bomb.png", "a report with a decompression bomb"),
        "one pixel": ("images/one pixel.png", "a report with a one pixel image"),
        "16-bit flat": ("images/flat16.png", "a report with a flat 16-bit image"),
        "non-ascii path": ("images/Röntgen Thorax ü.png", "a report with a non-ascii file name"),
        "empty text": ("images/good-2.png", ""),
        "whitespace text": ("images/good-4.png", " \t  "),
        "nan text": ("images/good-6.png", "nan"),
        "long text": ("images/good-8.png", "mild cardiomegaly " * 5556),  # 100,008 characters
        "duplicate": rows["good 1"],
        "outside folder": ("../../etc/passwd", "a report that points outside the dataset"),
    })
    return rows


def _encode(array, kind):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, kind)
    return buffer.getvalue()


def write_csv(path, rows, split=None):
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "text", "split"])
        for i, (image, text) in enumerate(rows):
            writer.writerow([image, text, split or ("val" if i in (0, 3, 5) else "train")])
    return path


SKIPPED_ROWS = {"missing file": "whose image file is missing",
                "empty text": "with an empty text", "whitespace text": "with an empty text",
                "nan text": "with an empty text", "duplicate": "with the same image and text as an earlier row",
                "outside folder": "leaves the manifest's folder"}
DROPPED_IMAGES = ("zero-byte file", "truncated png", "truncated jpeg", "text as png", "over the pixel limit",
                  "over twice the pixel limit")
KEPT = ("one pixel", "16-bit flat", "non-ascii path", "long text")


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "data set é"  # a space and a non-ASCII letter in every path
    return folder, make_hostile_dataset(folder)


def test_hostile_dataset_skips_with_counts(hostile, tmp_path, caplog, capsys):
    folder, rows = hostile
    manifest = write_csv(folder / "pairs.csv", rows.values())
    with caplog.at_level(logging.WARNING, logger="data"):
        train.main(["--data", str(manifest), "--out", str(tmp_path / "run"), *TINY_FLAGS, "--batch-size", "4",
                    "--accum", "2", "--queue-size", "4", "--steps", "2", "--eval-every", "2"])
    log = caplog.text
    assert "skipped 1 rows whose image file is missing" in log
    assert "skipped 3 rows with an empty text" in log
    assert "skipped 1 rows with the same image and text as an earlier row" in log
    assert "skipped 1 rows whose relative image path leaves the manifest's folder" in log
    assert f"dropped {len(DROPPED_IMAGES)} of " in log
    out = capsys.readouterr().out
    assert "note: --queue-size 4 is smaller than a window of 8 keys" in out
    assert load(tmp_path / "run" / "checkpoint.pt")["step"] == 2


def test_hostile_dataset_keeps_consistent_rows(hostile):
    folder, rows = hostile
    source = data.open_source(str(write_csv(folder / "pairs.csv", rows.values(), split="train")))
    pairs = source.pairs("train")
    tokenizer = data.train_tokenizer([pair.text for pair in pairs], vocab_size=100)
    started = time.perf_counter()
    dataset = data.PairDataset(pairs, tokenizer, image_size=16, channels=1, train=True, max_len=16)
    assert time.perf_counter() - started < 10  # the 100,000-character report is cut, not slow

    kept_texts = {pair.text for pair in dataset.pairs}
    for case in KEPT:
        assert rows[case][1].strip() in kept_texts, case
    for case in [*DROPPED_IMAGES, *SKIPPED_ROWS]:
        if case != "duplicate":
            assert rows[case][1] not in kept_texts, case
    assert len(dataset.dropped_images) == len(DROPPED_IMAGES)
    n = len(dataset)
    assert len(dataset.images) == dataset.input_ids.shape[0] == dataset.groups.shape[0] == n
    for i, pair in enumerate(dataset.pairs):  # row i of every array belongs to pair i
        assert dataset.group_names[int(dataset.groups[i])] == pair.group
        expected_ids, _ = data.tokenize(tokenizer, [pair.text], 16)
        assert torch.equal(dataset.input_ids[i], expected_ids[0])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=n)))
    assert torch.isfinite(batch["image"]).all()


@pytest.mark.parametrize("case", [*SKIPPED_ROWS, *DROPPED_IMAGES])
def test_strict_names_bad_row(hostile, case):
    folder, rows = hostile
    good = [rows[f"good {i}"] for i in range(10)]
    manifest = write_csv(folder / "pairs.csv", [*good, rows[case]], split="train")
    if case in SKIPPED_ROWS:
        expected = f"line 12 .*: a row .*{SKIPPED_ROWS[case]}"
    else:
        expected = f"cannot decode image .*{re.escape(Path(rows[case][0]).name)}"
    with pytest.raises(ValueError, match=expected):
        source = data.open_source(str(manifest), strict=True)
        pairs = source.pairs("train")
        tokenizer = data.train_tokenizer([pair.text for pair in pairs], vocab_size=100)
        data.PairDataset(pairs, tokenizer, image_size=16, strict=True)


def test_strict_flag_stops_training(hostile, tmp_path):
    folder, rows = hostile
    manifest = write_csv(folder / "pairs.csv", rows.values())
    with pytest.raises(SystemExit, match=r"line 12 \(image 'images/absent.png'\): a row whose image file is missing"):
        train.main(["--data", str(manifest), "--out", str(tmp_path / "run"), *TINY_FLAGS, "--strict",
                    "--batch-size", "4", "--steps", "1"])


@pytest.mark.parametrize("value", [None, float("nan"), "", "  ", "null", 42])
def test_jsonl_missing_text_skipped(tmp_path, caplog, value):
    write_png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    write_png(tmp_path / "b.png", np.ones((8, 8), dtype=np.uint8))
    rows = [{"image": "a.png", "text": "kept"}, {"image": "b.png", "text": value}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))  # json.dumps writes NaN for nan
    with caplog.at_level(logging.WARNING, logger="data"):
        source = data.open_source(str(path))
    assert [pair.text for pair in source.pairs("train")] == ["kept"]
    assert "skipped 1 rows" in caplog.text
    with pytest.raises(ValueError, match="line 2"):
        data.open_source(str(path), strict=True)


def test_non_utf8_row_rejected(tmp_path, tiny_synthetic):
    write_png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    path = tmp_path / "pairs.csv"
    path.write_bytes(b"image,text\na.png,fine\na.png,caf\xe9 au lait\n")
    with pytest.raises(SystemExit, match=r"line 3 is not valid UTF-8 \(byte 0xe9"):
        train.main(["--data", str(path), "--out", str(tmp_path / "run"), *TINY_FLAGS, "--steps", "1"])


def test_csv_with_byte_order_mark(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8), dtype=np.uint8))
    path = tmp_path / "pairs.csv"
    path.write_bytes("image,text\na.png,fine\n".encode("utf-8-sig"))  # as Excel writes CSV
    assert [pair.text for pair in data.open_source(str(path)).pairs("train")] == ["fine"]


@pytest.mark.parametrize("texts, message", [
    (["only one pair"], "1 usable pairs, fewer than --batch-size 2"),
    (["the same text"] * 4, "share one group"),
])
def test_too_little_data_rejected(tmp_path, texts, message):
    rows = []
    for i, text in enumerate(texts):
        write_png(tmp_path / f"{i}.png", np.full((8, 8), i, dtype=np.uint8))
        rows.append({"image": f"{i}.png", "text": text, "split": "train"})
    write_png(tmp_path / "val.png", np.zeros((8, 8), dtype=np.uint8))
    rows.append({"image": "val.png", "text": "validation", "split": "val"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    with pytest.raises(SystemExit, match=message):
        train.main(["--data", str(path), "--out", str(tmp_path / "run"), *TINY_FLAGS, "--batch-size", "2",
                    "--steps", "1"])


def test_float_image_with_nan_rejected(tmp_path):
    pixels = np.ones((8, 8), dtype=np.float32)
    pixels[2, 3] = math.nan
    path = tmp_path / "nan.tiff"
    Image.fromarray(pixels, mode="F").save(path)
    with pytest.raises(ValueError, match="non-finite"):
        data.load_image(path)
