"""bench.py: FLOP counting, equal compute in the ablation, and each subcommand end to end on a tiny model."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import bench
from conftest import TINY_FLAGS


def test_cpu_attention_flops_counted():
    B, H, T, D = 2, 4, 10, 8
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as forward:
        y = F.scaled_dot_product_attention(q, k, v)
    with FlopCounterMode(display=False) as backward:
        y.sum().backward()
    assert forward.get_total_flops() == 4 * B * H * T * T * D  # QK^T and attention-weighted V
    # five products, as the counter counts them: the recomputed scores QK^T, dO V^T, and the gradients of Q, K, V
    assert backward.get_total_flops() == 10 * B * H * T * T * D


def test_ablation_configs_equal_pair_passes():
    K, B, pair_passes = 4, 32, 4096
    for name, flags in bench.ablation_configs(K, B, pair_passes).items():
        steps = int(flags[flags.index("--steps") + 1])
        accum = int(flags[flags.index("--accum") + 1])
        batch_size = int(flags[flags.index("--batch-size") + 1])
        assert steps * accum * batch_size == pair_passes, name


def test_ablation_configs_differ_only_in_method():
    configs = bench.ablation_configs(4, 32, 4096)
    assert "--alpha" not in configs["msd"]
    assert configs["keys_alpha0"][configs["keys_alpha0"].index("--alpha") + 1] == "0"
    assert configs["clip_accum"][configs["clip_accum"].index("--accum") + 1] == "4"
    assert configs["clip_KB"][configs["clip_KB"].index("--batch-size") + 1] == "128"


def test_flatten_scores_picks_headline_numbers():
    result = {
        "retrieval": {"scores": {"i2t_R@1": 1.0, "i2t_R@10": 10.0, "t2i_R@1": 2.0, "t2i_R@10": 20.0}},
        "zeroshot": {"labels": {"effusion": {"kind": "binary", "auc_roc": 0.8},
                                "Type": {"kind": "multiclass", "accuracy": 75.0, "macro_auc_roc": 0.7}},
                     "mean_auc_roc": 0.8},
        "fewshot": {"labels": {"Type": {"regimes": {"1-shot": {"auc_roc": {"mean": 0.6}}}}}},
    }
    scores = bench.flatten_scores(result)
    assert scores["mean_R@10"] == 15.0
    assert scores["zeroshot_auc/effusion"] == 0.8
    assert scores["zeroshot_acc/Type"] == 75.0
    assert scores["zeroshot_auc/Type"] == 0.7
    assert scores["fewshot_auc/Type/1-shot"] == 0.6


def tiny_args(tiny_synthetic, tmp_path) -> list[str]:
    return ["--data", f"synthetic:{tiny_synthetic}", "--out", str(tmp_path / "bench"), "--batch-size", "4"]


def test_speed_runs(tmp_path, tiny_synthetic, one_torch_thread):
    result = bench.main(["speed", *tiny_args(tiny_synthetic, tmp_path), "--accum", "2", "--steps", "2", "--repeats", "2",
                         "--warmup", "1", "--precisions", "fp32", "--train-args", *TINY_FLAGS])
    assert [(r["method"], r["precision"]) for r in result["results"]] == [("msd", "fp32"), ("clip", "fp32")]
    msd, clip = result["results"]
    assert msd["flops_per_pair"] > clip["flops_per_pair"] > 0  # the teacher's forward pass costs FLOPs
    assert msd["pairs_per_sec_without_data"][1] >= msd["pairs_per_sec"][1]
    assert 0 < msd["mfu"] < 1
    assert len(msd["run_medians_without_data"]) == 2
    assert msd["steps"] == 4  # 2 measured steps in each of 2 runs
    assert (tmp_path / "bench" / "speed" / "speed.json").is_file()


def test_profile_runs(tmp_path, tiny_synthetic, one_torch_thread):
    result = bench.main(["profile", *tiny_args(tiny_synthetic, tmp_path), "--accum", "2", "--steps", "1",
                         "--warmup", "1", "--train-args", *TINY_FLAGS])
    assert "aten::" in result["table"]
    assert (tmp_path / "bench" / "profile" / "trace_msd_auto.json").is_file()


def test_memory_runs(tmp_path, tiny_synthetic, one_torch_thread):
    result = bench.main(["memory", *tiny_args(tiny_synthetic, tmp_path), "--steps", "1", "--methods", "clip",
                         "--train-args", *TINY_FLAGS])
    configs = [(r["batch_size"], r["accum"]) for r in result["results"]]
    assert configs == [(4, 1), (4, 2), (4, 4), (4, 8), (32, 1)]
    assert all(r["peak_mb"] >= r["start_mb"] > 0 for r in result["results"])
    assert "clip_peak_mb_accum8_over_batch8B" in result["ratios"]


def test_ablation_runs_and_continues(tmp_path, tiny_synthetic, one_torch_thread):
    argv = ["ablation", *tiny_args(tiny_synthetic, tmp_path), "--accum", "2", "--pair-passes", "16",
            "--seeds", "2", "--configs", "clip_B", "msd", "--shots", "1", "--probe-seeds", "1",
            "--train-args", *TINY_FLAGS]
    result = bench.main(argv)
    summary = result["summary"]
    assert summary["clip_B"]["steps"] == 4
    assert summary["msd"]["steps"] == 2
    assert summary["msd"]["student"]["mean_R@10"]["n"] == 2
    assert "teacher" in summary["msd"]
    assert "teacher" not in summary["clip_B"]
    assert "zeroshot_auc/mean" in summary["msd"]["student"]

    # a second call reuses the finished runs instead of training them again
    [saved] = (tmp_path / "bench" / "ablation").glob("synthetic-*/msd/seed1/result.json")
    before = saved.stat().st_mtime_ns
    again = bench.main(argv)
    assert saved.stat().st_mtime_ns == before
    assert json.dumps(again["summary"]) == json.dumps(summary)

    # but not when the settings changed
    with pytest.raises(SystemExit, match="was run with other settings"):
        bench.main([*argv[:argv.index("--shots")], "--shots", "2", *argv[argv.index("--shots") + 2:]])


def test_ablation_rejects_uneven_budget(tmp_path, tiny_synthetic):
    with pytest.raises(SystemExit, match="--pair-passes 10 is not a multiple"):
        bench.main(["ablation", *tiny_args(tiny_synthetic, tmp_path), "--accum", "2", "--pair-passes", "10"])


def test_data_name_keeps_paths_apart():
    assert bench.data_name(None) == "synthetic"
    assert bench.data_name("/data/reports.jsonl").startswith("data-")
    assert bench.data_name("medpix:/a").startswith("medpix-")
    assert bench.data_name("medpix:/a") != bench.data_name("medpix:/b")
    assert "/" not in bench.data_name("manifest:/data/reports.jsonl")


def test_train_args_may_not_set_compared_flags(capsys):
    with pytest.raises(SystemExit):
        bench.get_args(["ablation", "--train-args", "--lr", "1e-3", "--steps", "3"])
    assert "may not set ['--steps']" in capsys.readouterr().err
