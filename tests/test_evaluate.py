"""Evaluation: metrics against hand-computed cases, prompt ensembles, the linear probe, and evaluate.py end to end."""

import inspect
import json
import math

import pytest
import torch
from PIL import Image

import data
import evaluate
import train
from conftest import TINY_FLAGS
from model import ImageTextModel, ModelConfig

FEW_PROBES = ["--seeds", "2", "--shots", "1", "2", "--percents", "10", "100"]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory, tiny_synthetic):
    """A checkpoint trained for 3 steps on the tiny synthetic dataset."""
    run = tmp_path_factory.mktemp("train") / "run"
    train.main(["--data", f"synthetic:{tiny_synthetic}", "--out", str(run), *TINY_FLAGS,
                "--accum", "2", "--batch-size", "8", "--steps", "3", "--eval-every", "3"])
    return run


# -----------------------------------------------------------------------------
# metrics

@pytest.mark.parametrize("scores, labels, expected", [
    ([0.1, 0.4, 0.4, 0.8], [0, 0, 1, 1], 0.875),        # 0.4 vs 0.4 counts 1/2: (1 + 0.5 + 1 + 1) / 4
    ([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1], 1.0),
    ([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1], 0.0),
    ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),          # all tied
    ([0.5, 0.5, 0.5, 0.2], [1, 0, 0, 0], 2 / 3),        # (0.5 + 0.5 + 1) / 3
    ([0.2, 0.7, 0.7, 0.7, 0.9], [0, 1, 0, 0, 1], 5 / 6),  # 0.7: 1 + 0.5 + 0.5, 0.9: 3 wins
])
def test_auc_roc_hand_computed(scores, labels, expected):
    assert evaluate.auc_roc(scores, labels) == pytest.approx(expected)


def test_auc_roc_single_class_is_nan():
    assert math.isnan(evaluate.auc_roc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(evaluate.auc_roc([0.1, 0.2, 0.3], [0, 0, 0]))


def test_auc_roc_matches_pairwise_count():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=generator).float()  # many ties
    labels = torch.rand(60, generator=generator) < 0.3
    wins = 0.0
    for p in scores[labels]:
        for n in scores[~labels]:
            if p > n:
                wins += 1.0
            elif p == n:
                wins += 0.5
    expected = wins / (labels.sum().item() * (~labels).sum().item())
    assert evaluate.auc_roc(scores, labels) == pytest.approx(expected)


def test_macro_auc_roc_hand_computed():
    probabilities = torch.tensor([[0.7, 0.2, 0.1],
                                  [0.2, 0.5, 0.3],
                                  [0.1, 0.3, 0.6],
                                  [0.3, 0.4, 0.3]])
    targets = torch.tensor([0, 1, 2, 2])
    # Class 0: 0.7 beats all 3 negatives, so 1. Class 1: 0.5 beats all, so 1.
    # Class 2: 0.6 beats 0.1 and 0.3, and 0.3 beats 0.1 and ties 0.3, so 3.5 / 4.
    assert evaluate.macro_auc_roc(probabilities, targets) == pytest.approx((1 + 1 + 0.875) / 3)
    # a class with no examples has no one-vs-rest AUC-ROC and is left out of the mean
    with_absent_class = torch.cat([probabilities, torch.tensor([[0.1], [0.9], [0.2], [0.5]])], dim=1)
    assert evaluate.macro_auc_roc(with_absent_class, targets) == pytest.approx((1 + 1 + 0.875) / 3)


def test_confusion_matrix_hand_counted():
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 0])
    assert evaluate.confusion_matrix(targets, predictions, 3).tolist() == [[2, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert evaluate.accuracy(targets, predictions) == pytest.approx(100 * 4 / 6)


def test_balanced_accuracy_hand_computed():
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    predictions = torch.tensor([0, 0, 1, 1, 2, 0])
    # recalls 2/3, 1/1 and 1/2
    assert evaluate.balanced_accuracy(targets, predictions, 3) == pytest.approx(100 * (2 / 3 + 1 + 1 / 2) / 3)


def test_balanced_accuracy_skips_absent_class():
    targets = torch.tensor([0, 0, 1, 1])
    predictions = torch.tensor([0, 2, 1, 1])  # class 2 is predicted but never true
    assert evaluate.balanced_accuracy(targets, predictions, 3) == pytest.approx(100 * (0.5 + 1) / 2)


def test_to_json_writes_nan_as_null():
    converted = evaluate.to_json({"auc_roc": float("nan"), "values": [0.5, float("nan")], "name": "cardiomegaly"})
    assert converted == {"auc_roc": None, "values": [0.5, None], "name": "cardiomegaly"}
    assert json.loads(json.dumps(converted, allow_nan=False)) == converted


# -----------------------------------------------------------------------------
# zero-shot

@pytest.fixture(scope="module")
def text_model():
    texts = ["No pleural effusion.", "Small left pleural effusion.", "The heart is enlarged.",
             "Normal heart size.", "There is no pneumothorax."] * 4
    tokenizer = data.train_tokenizer(texts, vocab_size=80)
    config = ModelConfig(image_size=16, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2,
                         vocab_size=tokenizer.get_vocab_size(), max_len=16, text_width=32, text_depth=1,
                         text_heads=2, embed_dim=16)
    torch.manual_seed(0)
    return ImageTextModel(config).eval(), tokenizer


def test_prompt_ensemble_of_one_equals_prompt(text_model):
    model, tokenizer = text_model
    prompt = "Small left pleural effusion."
    ids, mask = data.tokenize(tokenizer, [prompt], max_len=16)
    with torch.no_grad():
        single = model.encode_text(ids, mask)[0]
    ensemble = evaluate.prompt_ensemble(model, tokenizer, [prompt], "cpu")
    torch.testing.assert_close(ensemble, single)


def test_prompt_ensemble_ignores_order(text_model):
    model, tokenizer = text_model
    prompts = ["No pleural effusion.", "There is no pneumothorax.", "Normal heart size."]
    ensemble = evaluate.prompt_ensemble(model, tokenizer, prompts, "cpu")
    for permuted in (prompts[::-1], prompts[1:] + prompts[:1]):
        torch.testing.assert_close(evaluate.prompt_ensemble(model, tokenizer, permuted, "cpu"), ensemble)


def test_prompt_ensemble_is_normalised_mean(text_model):
    model, tokenizer = text_model
    prompts = ["No pleural effusion.", "The heart is enlarged."]
    one_by_one = torch.stack([evaluate.prompt_ensemble(model, tokenizer, [p], "cpu") for p in prompts])
    mean = one_by_one.mean(dim=0)
    torch.testing.assert_close(evaluate.prompt_ensemble(model, tokenizer, prompts, "cpu"), mean / mean.norm())


def test_zeroshot_binary_hand_computed():
    positive, negative = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    targets = torch.tensor([1, 0, 1, 0])
    # p(positive) rises with x - y = 1, -1, -0.2, 0.2, so only the pair (-0.2, 0.2) is ordered wrongly
    result = evaluate.zeroshot_binary(images, targets, positive, negative, temperature=0.1)
    assert result["auc_roc"] == pytest.approx(0.75)
    assert result["positives"] == 2
    assert result["examples"] == 4


def test_zeroshot_multiclass_picks_nearest_class():
    class_embeddings = torch.eye(3)
    images = torch.nn.functional.normalize(torch.eye(3) + 0.1, dim=1)[[0, 1, 2, 2]]
    targets = torch.tensor([0, 1, 2, 1])
    result = evaluate.zeroshot_multiclass(images, targets, class_embeddings, ["a", "b", "c"], temperature=0.07)
    assert result["accuracy"] == pytest.approx(75.0)
    assert result["confusion_matrix"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert result["balanced_accuracy"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)


def test_load_prompts_rejects_invalid(tmp_path):
    cases = {
        "one_class.json": {"Type": {"CT": ["Axial CT image."]}},
        "no_negative.json": {"nodule": {"positive": ["Nodule."], "other": ["No nodule."]}},
        "empty_list.json": {"Type": {"CT": [], "MR": ["MRI."]}},
        "not_a_list.json": {"Type": {"CT": "Axial CT image.", "MR": ["MRI."]}},
    }
    for name, table in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(table))
        with pytest.raises(ValueError, match="prompt file"):
            evaluate.load_prompts(path)


# -----------------------------------------------------------------------------
# few-shot probe

def two_d_blobs(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    noise = 0.3 * torch.randn(3 * n_per_class, 2, generator=torch.Generator().manual_seed(seed))
    return centres.repeat_interleave(n_per_class, dim=0) + noise, torch.arange(3).repeat_interleave(n_per_class)


def test_probe_separable_2d_reaches_accuracy_1():
    train_x, train_y = two_d_blobs(10, seed=0)
    val_x, val_y = two_d_blobs(5, seed=1)
    test_x, test_y = two_d_blobs(20, seed=2)
    probe, _ = evaluate.fit_probe(train_x, train_y, val_x, val_y, n_classes=3)
    predictions = probe.predict_proba(test_x).argmax(dim=1)
    assert evaluate.accuracy(test_y, predictions) == 100.0


def test_probe_is_deterministic():
    x, y = two_d_blobs(4, seed=0)
    first = evaluate.train_logistic_regression(x, y, 3, l2=1e-3)
    second = evaluate.train_logistic_regression(x, y, 3, l2=1e-3)
    assert torch.equal(first.weight, second.weight)
    assert torch.equal(first.bias, second.bias)


def test_probe_takes_no_evaluation_split():
    names = list(inspect.signature(evaluate.fit_probe).parameters)
    assert names == ["train_features", "train_targets", "val_features", "val_targets", "n_classes", "l2_grid"]


def test_probe_l2_follows_val_split():
    # Strong L2 points the probe along the class-mean difference (0.75, -0.66), and weak L2 turns
    # it towards the max-margin direction (1, 0). A val pair whose difference is (1, 2) is ordered correctly
    # only by the weaker ones, and the reversed pair only by the strongest.
    train_x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3.0, -10.0]])
    train_y = torch.tensor([0, 0, 1, 1])
    val_x = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    favours_weak, val_scores = evaluate.fit_probe(train_x, train_y, val_x, torch.tensor([0, 1]), n_classes=2)
    favours_strong, _ = evaluate.fit_probe(train_x, train_y, val_x, torch.tensor([1, 0]), n_classes=2)
    assert favours_strong.l2 == max(evaluate.L2_GRID)
    assert favours_weak.l2 < favours_strong.l2
    assert val_scores[favours_weak.l2] == max(val_scores.values())


def test_sample_shots_per_class():
    targets = torch.tensor([0] * 5 + [1] * 3 + [2] * 1)
    chosen = evaluate.sample_shots(targets, 3, k=2, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(targets[chosen], minlength=3).tolist() == [2, 2, 1]
    again = evaluate.sample_shots(targets, 3, k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chosen, again)


def test_sample_percent_counts():
    generator = torch.Generator().manual_seed(0)
    assert len(evaluate.sample_percent(200, 1, generator)) == 2
    assert len(evaluate.sample_percent(200, 10, generator)) == 20
    assert sorted(evaluate.sample_percent(200, 100, generator).tolist()) == list(range(200))
    assert len(evaluate.sample_percent(20, 1, generator)) == 1


# -----------------------------------------------------------------------------
# end to end

def test_task_all_synthetic(synthetic_run, tmp_path):
    out = tmp_path / "all.json"
    result = evaluate.main(["--task", "all", "--checkpoint", str(synthetic_run / "checkpoint.pt"),
                            "--out", str(out), *FEW_PROBES])
    written = json.loads(out.read_text())
    assert set(written) >= {"checkpoint", "step", "split", "model", "train_config", "retrieval", "zeroshot", "fewshot"}
    assert written["step"] == 3
    assert written["split"] == "test"
    assert written["model"] == "student"
    assert written["train_config"] == torch.load(synthetic_run / "checkpoint.pt", weights_only=True)["args"]

    assert 0.0 <= written["retrieval"]["scores"]["i2t_R@10"] <= 100.0
    picture = out.with_suffix(".png")
    assert written["retrieval"]["picture"] == str(picture)
    with Image.open(picture) as image:
        assert image.width == evaluate.PICTURE_WIDTH
        assert image.height > 4 * evaluate.THUMBNAIL

    zeroshot = written["zeroshot"]
    assert set(zeroshot["labels"]) | set(zeroshot["skipped"]) == set(evaluate.PROMPTS["synthetic"])
    for finding in zeroshot["labels"].values():
        assert 0.0 <= finding["auc_roc"] <= 1.0
    assert 0.0 <= zeroshot["mean_auc_roc"] <= 1.0

    fewshot = written["fewshot"]
    cardiomegaly = fewshot["labels"]["cardiomegaly"]["regimes"]
    assert list(cardiomegaly) == ["1-shot", "2-shot", "10%", "100%"]
    assert len(cardiomegaly["1-shot"]["auc_roc"]["values"]) == 2
    assert cardiomegaly["1-shot"]["train_examples"] == [2, 2]  # one positive and one negative per seed
    assert cardiomegaly["100%"]["auc_roc"]["std"] == 0.0  # the whole split: one run
    assert set(fewshot["mean_auc_roc"]) == set(cardiomegaly)
    assert result["fewshot"]["seeds"] == 2


def test_task_all_teacher(synthetic_run, tmp_path):
    out = tmp_path / "teacher.json"
    result = evaluate.main(["--task", "all", "--checkpoint", str(synthetic_run / "checkpoint.pt"), "--model", "teacher",
                            "--out", str(out), "--seeds", "1", "--shots", "1", "--percents", "100",
                            "--labels", "cardiomegaly", "normal", "--picture-queries", "2"])
    assert result["model"] == "teacher"
    assert set(result["zeroshot"]["labels"]) == {"cardiomegaly", "normal"}
    assert set(result["fewshot"]["labels"]) == {"cardiomegaly", "normal"}
    assert out.with_suffix(".png").is_file()


def test_retrieval_writes_picture_beside_json(synthetic_run):
    result = evaluate.main(["--task", "retrieval", "--checkpoint", str(synthetic_run / "checkpoint.pt")])
    assert result["pairs"] == 24
    assert (synthetic_run / "retrieval_test_student.json").is_file()
    assert (synthetic_run / "retrieval_test_student.png").is_file()


def test_prompt_file_replaces_table(synthetic_run, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"pleural_effusion": {"positive": ["Large left pleural effusion."],
                                                        "negative": ["No pleural effusion."]}}))
    result = evaluate.main(["--task", "zeroshot", "--checkpoint", str(synthetic_run / "checkpoint.pt"),
                            "--prompts", str(prompts), "--out", str(tmp_path / "zeroshot.json")])
    assert list(result["zeroshot"]["labels"]) == ["pleural_effusion"]


def test_unknown_label_rejected(synthetic_run, tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        evaluate.main(["--task", "zeroshot", "--checkpoint", str(synthetic_run / "checkpoint.pt"),
                       "--labels", "fracture", "--out", str(tmp_path / "zeroshot.json")])


def test_fewshot_skipped_on_val_split(synthetic_run, tmp_path):
    result = evaluate.main(["--task", "fewshot", "--checkpoint", str(synthetic_run / "checkpoint.pt"),
                            "--split", "val", "--out", str(tmp_path / "fewshot.json")])
    assert "--split is val" in result["fewshot"]["not_run"]


def test_zeroshot_medpix(tmp_path, medpix_root):
    run = tmp_path / "medpix"
    train.main(["--data", f"medpix:{medpix_root}", "--out", str(run), *TINY_FLAGS, "--channels", "3",
                "--accum", "2", "--batch-size", "8", "--steps", "2", "--eval-every", "2"])
    result = evaluate.main(["--task", "zeroshot", "--checkpoint", str(run / "checkpoint.pt")])
    assert result["split"] == "dev"
    labels = result["zeroshot"]["labels"]
    for name in ("Type", "Location Category"):
        assert 0.0 <= labels[name]["accuracy"] <= 100.0
        assert 0.0 <= labels[name]["balanced_accuracy"] <= 100.0
        assert sum(map(sum, labels[name]["confusion_matrix"])) == labels[name]["examples"] == 197
    assert labels["Type"]["classes"] == ["CT", "MR"]
    # rare planes have no prompts and are not evaluated
    assert labels["Plane"]["classes"] == ["Axial", "Coronal", "Sagittal"]
    assert labels["Plane"]["examples"] < 197
