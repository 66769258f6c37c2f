"""The training loop as a whole: timing of the EMA update and the enqueue, schedules, end to end runs."""

import json

import pytest
import torch

import data
import evaluate
import train
from model import ImageTextModel
from momentum import EMATeacher
from conftest import TINY_FLAGS



def run_train(tmp_path, tiny_synthetic, *flags):
    argv = ["--data", f"synthetic:{tiny_synthetic}", "--out", str(tmp_path / "run"), *TINY_FLAGS, *flags]
    train.main(argv)
    return tmp_path / "run"


def load_checkpoint(run):
    return torch.load(run / "checkpoint.pt", weights_only=True)


def record_msd_calls(monkeypatch):
    """Wrap the loss the loop calls, keeping a copy of what each micro-batch saw."""
    calls = []
    original = train.msd_loss

    def recording_msd_loss(*args):
        image_queue, text_queue, queue_groups = args[7], args[8], args[9]
        calls.append({"image_queue": image_queue.clone(), "text_queue": text_queue.clone(),
                      "queue_groups": queue_groups.clone(), "alpha": args[13],
                      "positive_index": args[11].clone()})
        return original(*args)

    monkeypatch.setattr(train, "msd_loss", recording_msd_loss)
    return calls


def test_ema_updates_once_per_optimizer_step(tmp_path, tiny_synthetic, monkeypatch):
    updates = []
    original = EMATeacher.update
    monkeypatch.setattr(EMATeacher, "update", lambda self, student: (updates.append(1), original(self, student)))
    run = run_train(tmp_path, tiny_synthetic, "--accum", "8", "--batch-size", "4", "--steps", "3", "--eval-every", "3")
    assert len(updates) == 3
    assert load_checkpoint(run)["teacher"]["updates"].item() == 3


def test_teacher_not_in_optimizer():
    args = train.get_args(TINY_FLAGS)
    model = ImageTextModel(train.model_config(args, vocab_size=200))
    teacher = EMATeacher(model)
    optimizer = train.make_optimizer(model, args)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters()}
    assert not optimized & {id(p) for p in teacher.parameters()}


def test_window_sees_one_queue_snapshot(tmp_path, tiny_synthetic, monkeypatch):
    calls = record_msd_calls(monkeypatch)
    K, B, steps, queue_size = 4, 4, 3, 40
    run = run_train(tmp_path, tiny_synthetic, "--accum", str(K), "--batch-size", str(B), "--steps", str(steps),
                    "--queue-size", str(queue_size), "--eval-every", "3")
    assert len(calls) == K * steps
    for step in range(steps):
        window = calls[step * K:(step + 1) * K]
        # the queue grows by one window per optimizer step, never within a window
        assert window[0]["image_queue"].shape[0] == min(step * K * B, queue_size)
        for call in window[1:]:
            assert torch.equal(call["image_queue"], window[0]["image_queue"])
            assert torch.equal(call["text_queue"], window[0]["text_queue"])
            assert torch.equal(call["queue_groups"], window[0]["queue_groups"])
        # each micro-batch's positives are its own rows of the window
        assert [c["positive_index"].tolist() for c in window] == [list(range(j * B, (j + 1) * B)) for j in range(K)]
    checkpoint = load_checkpoint(run)
    assert checkpoint["image_queue"]["ptr"].item() == (steps * K * B) % queue_size
    assert checkpoint["image_queue"]["count"].item() == min(steps * K * B, queue_size)
    assert checkpoint["text_queue"]["ptr"].item() == (steps * K * B) % queue_size


def test_alpha_ramp_counts_optimizer_steps(tmp_path, tiny_synthetic, monkeypatch):
    calls = record_msd_calls(monkeypatch)
    run_train(tmp_path, tiny_synthetic, "--accum", "4", "--batch-size", "4", "--steps", "4",
              "--alpha", "0.4", "--alpha-ramp-steps", "2", "--eval-every", "4")
    alphas = [call["alpha"] for call in calls]
    assert alphas == pytest.approx([0.0] * 4 + [0.2] * 4 + [0.4] * 8)


def test_loop_accumulation_matches_large_batch(tmp_path, tiny_synthetic, monkeypatch):
    """train.py's first step with K=4, B=4 has the gradients of K=1, B=16 (same pairs, same crops)."""
    gradients = []
    original = torch.nn.utils.clip_grad_norm_

    def record_gradients(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        gradients.append([p.grad.clone() for p in parameters])
        return original(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record_gradients)
    common = ["--steps", "1", "--eval-every", "1", "--alpha-ramp-steps", "0", "--seed", "3"]
    first = run_train(tmp_path / "a", tiny_synthetic, "--accum", "4", "--batch-size", "4", *common)
    run_train(tmp_path / "b", tiny_synthetic, "--accum", "1", "--batch-size", "16", *common,
              "--tokenizer", str(first / "tokenizer.json"))
    accumulated, one_batch = gradients
    for g_accumulated, g_one in zip(accumulated, one_batch, strict=True):
        torch.testing.assert_close(g_accumulated, g_one, rtol=1e-4, atol=1e-6)


def test_temperature_stays_clamped_and_loss_finite(tmp_path, tiny_synthetic):
    run = run_train(tmp_path, tiny_synthetic, "--accum", "2", "--batch-size", "8", "--steps", "4", "--lr", "0.05",
                    "--temperature", "0.01", "--min-temperature", "0.01", "--max-temperature", "0.02",
                    "--eval-every", "4")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert 0.01 - 1e-6 <= row["temperature"] <= 0.02 + 1e-6
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "infonce", "kl"))


@pytest.mark.parametrize("flags, message", [
    (["--accum", "0"], "--accum"),
    (["--momentum", "1.5"], "--momentum"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "-1"], "temperature"),
])
def test_invalid_flags_rejected(flags, message, capsys):
    with pytest.raises(SystemExit):
        train.get_args(flags)
    assert message in capsys.readouterr().err


def test_batch_larger_than_dataset_rejected(tmp_path, tiny_synthetic):
    with pytest.raises(SystemExit, match="fewer than --batch-size"):
        run_train(tmp_path, tiny_synthetic, "--batch-size", "500", "--steps", "1")


@pytest.mark.parametrize("method", ["msd", "clip"])
def test_train_then_evaluate_synthetic(tmp_path, tiny_synthetic, method):
    run = run_train(tmp_path, tiny_synthetic, "--method", method, "--accum", "2", "--batch-size", "8",
                    "--steps", "3", "--eval-every", "2")
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 3
    assert (run / "tokenizer.json").is_file()
    assert set(checkpoint) >= {"model", "teacher", "image_queue", "text_queue", "optimizer", "args", "model_config"}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert "val" in rows[1]
    assert "val" in rows[2]

    models = ["student", "teacher"] if method == "msd" else ["student"]
    for which in models:
        result = evaluate.main(["--checkpoint", str(run / "checkpoint.pt"), "--model", which])
        assert result["split"] == "test"
        assert result["pairs"] == 24
        assert 0.0 <= result["scores"]["i2t_R@10"] <= 100.0
        assert (run / f"retrieval_test_{which}.json").is_file()


def test_train_then_evaluate_medpix(tmp_path, medpix_root):
    run = tmp_path / "medpix"
    train.main(["--data", f"medpix:{medpix_root}", "--out", str(run), *TINY_FLAGS, "--channels", "3",
                "--accum", "2", "--batch-size", "8", "--steps", "2", "--eval-every", "2"])
    result = evaluate.main(["--checkpoint", str(run / "checkpoint.pt")])
    assert result["data"] == "medpix"
    assert result["split"] == "dev"
    assert result["pairs"] == 197
    assert 0.0 <= result["scores"]["t2i_R@10"] <= 100.0
