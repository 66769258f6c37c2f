"""Measure training speed, the memory of gradient accumulation, and the method ablation at equal compute.

    python bench.py speed        # pairs/s of msd and clip in fp32 and bf16, FLOPs per pair, FLOP utilisation
    python bench.py profile      # torch.profiler table of one msd step: where the time goes
    python bench.py memory       # peak memory of a step: micro-batch B with --accum 1, 2, 4, 8, and one batch of 8B
    python bench.py ablation     # CLIP, momentum keys and MSD at the same compute, over 3 seeds
    python bench.py ablation --data medpix:path/to/medpix-2.0

Every training run is `python train.py` in a fresh subprocess, so the numbers are those of the real
loop; bench.py reads them from the run's metrics.jsonl. Each subcommand prints its tables in Markdown
and writes them as JSON to --out. Run nothing else on the machine while it measures.
"""

import argparse
import contextlib
import hashlib
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

import evaluate
import train
from data import load_tokenizer, open_source, train_tokenizer
from loss import clip_loss, msd_loss
from momentum import EMATeacher, FeatureQueue

aten = torch.ops.aten


# -----------------------------------------------------------------------------
# running train.py

def run_train(train_args: list[str], out: Path, log_name: str = "train.log") -> tuple[list[dict], float]:
    """Run `python train.py TRAIN_ARGS --out OUT` in a subprocess: returns its metrics rows and wall seconds.

    The run's output goes to OUT/train.log. Exits with the end of that log if the run fails.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)  # a run must not resume from an earlier one
    command = [sys.executable, str(Path(__file__).with_name("train.py")), *train_args, "--out", str(out)]
    start = time.perf_counter()
    with open(out / log_name, "w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if finished.returncode != 0:
        tail = "".join((out / log_name).read_text().splitlines(keepends=True)[-15:])
        sys.exit(f"error: train.py failed with exit status {finished.returncode}:\n  {' '.join(command)}\n{tail}"
                 f"(the whole output is in {out / log_name})")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, seconds


def shared_tokenizer(data: str | None, train_args: list[str], out: Path) -> Path:
    """Train one tokenizer on the training texts and return its path, so every run uses the same token ids.

    WordPiece training in tokenizers 0.23 can break ties differently from one process to the next,
    so two runs that each train their own tokenizer could differ in more than what is compared.
    The file is kept per dataset and vocabulary size and reused by later calls.
    """
    args = train.get_args([*data_args(data), *train_args])  # train.py's defaults, --vocab-size included
    path = out / "tokenizers" / f"{data_name(data)}-vocab{args.vocab_size}.json"
    if not path.is_file():
        try:
            texts = [pair.text for pair in open_source(args.data).pairs("train")]
        except (FileNotFoundError, ValueError) as error:
            sys.exit(f"error: {error}")
        print(f"training the shared tokenizer in {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(train_tokenizer(texts, vocab_size=args.vocab_size).to_str(pretty=True))
    return path


def data_args(data: str | None) -> list[str]:
    return ["--data", data] if data else []


def data_name(data: str | None) -> str:
    """Return a folder name for a dataset spec: its format and a hash of the whole spec, as in medpix-1a2b3c4d."""
    if not data:
        return "synthetic"
    prefix = data.split(":", 1)[0] if ":" in data else "data"
    if not prefix.isidentifier():  # a Windows drive letter or a path, not a format name
        prefix = "data"
    return f"{prefix}-{hashlib.sha1(data.encode()).hexdigest()[:8]}"


# train.py flags that bench.py sets itself: --train-args must not change them
CONTROLLED_FLAGS = {"--data", "--out", "--steps", "--accum", "--batch-size", "--method", "--alpha", "--seed",
                    "--tokenizer", "--precision", "--device", "--eval-every", "--resume"}



def describe_machine() -> dict:
    """Return the machine and software versions that the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = {"cpu": cpu, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "torch": torch.__version__, "numpy": np.__version__, "tokenizers": tokenizers.__version__,
               "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": time.strftime("%Y-%m-%d")}
    if torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    return machine


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
    print(f"\nwritten to {path}")


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# speed: pairs per second, FLOPs per pair, matmul rate, model FLOP utilisation

# torch 2.13's FLOP counter has no formula for the CPU kernel of scaled_dot_product_attention, so
# without these two its FLOPs would count as zero. They reuse the counter's own attention formulas.
if aten._scaled_dot_product_flash_attention_for_cpu not in torch.utils.flop_counter.flop_registry:
    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                     out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def replay_steps(train_args: list[str], tokenizer: Path, skip: int, warmup: int, windows: int, around) -> int:
    """Run optimizer steps as train.py does, in this process and without logging; return the pairs per step.

    Takes the windows of the run that train.py makes of train_args, the same pairs in the same
    order, so the texts have the same lengths once cut to the longest in each micro-batch. Skips
    the first `skip` windows unread, computes `warmup` more, then computes `windows` more inside
    the context manager `around`, such as a FLOP counter or a profiler. The queues start full, as
    they are after the first steps of a run. Checkpoints, validation, DDP and the checks for
    non-finite values are left out.
    """
    args = train.get_args([*train_args, "--tokenizer", str(tokenizer)])
    train.seed_everything(args.seed)
    device = train.pick_device(args.device)
    amp = train.autocast_context(device, args.precision)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, tok, _, train_set, _ = train.load_data(args, load_tokenizer(tokenizer))
    cfg = train.model_config(args, tok.get_vocab_size())
    model = train.ImageTextModel(cfg).to(device)
    optimizer = train.make_optimizer(model, args)
    teacher = EMATeacher(model, args.momentum).to(device)
    image_queue = FeatureQueue(args.queue_size, cfg.embed_dim).to(device)
    text_queue = FeatureQueue(args.queue_size, cfg.embed_dim).to(device)
    full = torch.nn.functional.normalize(torch.randn(args.queue_size, cfg.embed_dim, device=device), dim=1)
    no_group = torch.arange(args.queue_size, device=device) + 10**9  # group ids that no pair has
    image_queue.enqueue(full, no_group)
    text_queue.enqueue(full, no_group)

    K, B = args.accum, args.batch_size
    sampler = train.EpochBatchSampler(len(train_set), B, args.seed, block=K)
    batches = train.endless(torch.utils.data.DataLoader(train_set, batch_sampler=sampler), {"epoch": 0, "batch": 0})
    for _ in range(skip * K):
        next(batches)

    def step():
        window = [{k: v.to(device) for k, v in train.trim_padding(next(batches)).items()} for _ in range(K)]
        groups = torch.cat([mb["group"] for mb in window])
        if args.method == "msd":
            image_keys, text_keys = train.encode_window(teacher, window, amp)
            image_queued, queue_groups = image_queue.contents()
            text_queued, _ = text_queue.contents()
        for j, mb in enumerate(window):
            with amp:
                image_queries, text_queries = model(mb["image"], mb["input_ids"], mb["attention_mask"])
            if args.method == "msd":
                rows = slice(j * B, (j + 1) * B)
                terms = msd_loss(image_queries, text_queries, image_keys[rows], text_keys[rows],
                                 image_keys, text_keys, groups, image_queued, text_queued, queue_groups,
                                 mb["group"], torch.arange(rows.start, rows.stop, device=device),
                                 model.logit_scale, args.alpha)
            else:
                terms = clip_loss(image_queries, text_queries, mb["group"], model.logit_scale)
            (terms["loss"] / K).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or float("inf"))
        optimizer.step()
        model.clamp_temperature(args.min_temperature, args.max_temperature)
        optimizer.zero_grad(set_to_none=True)
        if args.method == "msd":
            teacher.update(model)
            image_queue.enqueue(image_keys, groups)
            text_queue.enqueue(text_keys, groups)

    for _ in range(warmup):
        step()
    with around:
        for _ in range(windows):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return K * B


def count_flops_per_pair(train_args: list[str], tokenizer: Path, skip: int, windows: int) -> float:
    """Count the FLOPs of the training step per pair with torch.utils.flop_counter, on windows skip+1 to skip+windows.

    The counter counts matrix products, convolutions and attention: the teacher's forward pass of
    every micro-batch (msd), the student's forward and backward passes, and the loss against the
    window's keys and the queue. Element-wise work, the optimizer step and the EMA update count as
    nothing, as is usual for model FLOP utilisation. The attention backward includes the
    recomputed scores, as the counter's formula has it.
    """
    counter = FlopCounterMode(display=False)
    pairs_per_step = replay_steps([*train_args, "--precision", "fp32"], tokenizer, skip, 0, windows, counter)
    return counter.get_total_flops() / (windows * pairs_per_step)


def measure_matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 10) -> float:
    """Time square matrix products at dtype and return the median rate in FLOP/s.

    The matrices are 2048 x 2048 on a CPU and 8192 x 8192 on CUDA, large enough to reach the
    device's dense rate. On CUDA each repeat times 10 products between two CUDA events.
    """
    n = 8192 if device.type == "cuda" else 2048
    products = 10 if device.type == "cuda" else 1
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b  # warm-up: thread pool start-up, kernel selection
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            for _ in range(products):
                a @ b
            end.record()
            torch.cuda.synchronize(device)
            seconds.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - t0)
    return 2 * n**3 * products / statistics.median(seconds)


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """Return the 25th, 50th and 75th percentiles."""
    q1, q2, q3 = np.percentile(values, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def speed(args) -> dict:
    out = Path(args.out) / "speed"
    device = train.pick_device(args.device)
    tokenizer = shared_tokenizer(args.data, args.train_args, Path(args.out))
    K, B = args.accum, args.batch_size
    common = [*data_args(args.data), "--accum", str(K), "--batch-size", str(B), "--device", args.device,
              "--steps", str(args.warmup + args.steps), "--eval-every", str(10**9), "--keep", "1",
              "--tokenizer", str(tokenizer), "--workers", str(args.workers), *args.train_args]
    machine = describe_machine()
    print(f"machine: {machine}")

    flops = {method: count_flops_per_pair([*common, "--method", method], tokenizer, args.warmup, args.steps)
             for method in args.methods}
    # Whole runs are repeated in turn (msd, clip, msd, clip, ...), because the speed of a shared or
    # throttled machine drifts over minutes, and a drift should not favour the method that ran first
    measured_rows, matmul_rates, losses = {}, {precision: [] for precision in args.precisions}, {}
    for repeat in range(args.repeats):
        for precision in args.precisions:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            matmul_rates[precision].append(measure_matmul_rate(dtype, device))
            for method in args.methods:
                name = f"{method}_{precision}"
                rows, _ = run_train([*common, "--method", method, "--precision", precision], out / name / f"repeat{repeat}")
                losses.setdefault(name, [row.get("loss") for row in rows])  # None for a step skipped as non-finite
                measured_rows.setdefault(name, []).append(rows[args.warmup:])  # warm-up starts thread pools, allocators
                print(f"{name} repeat {repeat}: {statistics.median(K * B / row['seconds'] for row in rows[args.warmup:]):.0f} pairs/s")

    results = []
    for precision in args.precisions:
        rate = statistics.median(matmul_rates[precision])
        for method in args.methods:
            runs = measured_rows[f"{method}_{precision}"]
            with_data = [K * B / row["seconds"] for rows in runs for row in rows]
            without_data = [K * B / (row["seconds"] - row["data_seconds"]) for rows in runs for row in rows]
            run_medians = [statistics.median(K * B / (row["seconds"] - row["data_seconds"]) for row in rows) for rows in runs]
            achieved = flops[method] * statistics.median(without_data)
            results.append({
                "method": method, "precision": precision, "accum": K, "batch_size": B, "steps": len(with_data),
                "pairs_per_sec": quartiles(with_data), "pairs_per_sec_without_data": quartiles(without_data),
                "run_medians_without_data": run_medians, "flops_per_pair": flops[method], "achieved_flops": achieved,
                "matmul_flops": rate, "matmul_flops_repeats": matmul_rates[precision], "mfu": achieved / rate,
            })

    def with_quartiles(q: tuple[float, float, float]) -> str:
        return f"{q[1]:.0f} ({q[0]:.0f}-{q[2]:.0f})"

    table = []
    for r in results:
        run_medians = r["run_medians_without_data"]
        table.append([r["method"], r["precision"], with_quartiles(r["pairs_per_sec"]),
                      with_quartiles(r["pairs_per_sec_without_data"]), f"{min(run_medians):.0f}-{max(run_medians):.0f}",
                      f"{r['flops_per_pair'] / 1e6:.0f}", f"{r['achieved_flops'] / 1e9:.1f}",
                      f"{r['matmul_flops'] / 1e9:.1f}", f"{r['mfu']:.2f}"])
    print(f"\nspeed: window of {K} x {B} pairs, median (25th-75th percentile) over {args.repeats} runs x {args.steps} "
          f"optimizer steps, each run after {args.warmup} warm-up steps, device {device}\n")
    print(markdown_table(["method", "precision", "pairs/s", "pairs/s without data loading",
                          "range of run medians without data loading", "MFLOP/pair", "GFLOP/s", "matmul GFLOP/s", "MFU"],
                         table))

    ratios, loss_gaps = {}, {}
    by_name = {f"{r['method']}_{r['precision']}": r for r in results}
    for precision in args.precisions:
        if {"msd", "clip"} <= set(args.methods):
            ratios[f"msd_over_clip_{precision}"] = (by_name[f"msd_{precision}"]["pairs_per_sec_without_data"][1]
                                                    / by_name[f"clip_{precision}"]["pairs_per_sec_without_data"][1])
    for method in args.methods:
        if {"fp32", "bf16"} <= set(args.precisions):
            ratios[f"bf16_over_fp32_{method}"] = (by_name[f"{method}_bf16"]["pairs_per_sec_without_data"][1]
                                                  / by_name[f"{method}_fp32"]["pairs_per_sec_without_data"][1])
            # Same seed and data order, so the two loss curves differ only by precision. The gap is
            # compared with fp32's own step-to-step change, the noise of a loss curve
            fp32 = np.array(losses[f"{method}_fp32"], dtype=float)  # None becomes NaN
            bf16 = np.array(losses[f"{method}_bf16"], dtype=float)
            loss_gaps[f"{method}_max_abs_bf16_minus_fp32"] = float(np.nanmax(np.abs(bf16 - fp32)))
            loss_gaps[f"{method}_mean_abs_fp32_step_change"] = float(np.nanmean(np.abs(np.diff(fp32))))
    print("\n" + "\n".join(f"{name}: {value:.3f}" for name, value in {**ratios, **loss_gaps}.items()))

    result = {"machine": machine, "command": " ".join(sys.argv), "results": results, "ratios": ratios,
              "loss_gaps": loss_gaps, "losses": losses}
    write_json(out / "speed.json", result)
    return result


# -----------------------------------------------------------------------------
# profile: where the time of a training step goes

def profile(args) -> dict:
    out = Path(args.out) / "profile"
    out.mkdir(parents=True, exist_ok=True)
    device = train.pick_device(args.device)
    tokenizer = shared_tokenizer(args.data, args.train_args, Path(args.out))
    train_args = [*data_args(args.data), "--method", args.method, "--accum", str(args.accum),
                  "--batch-size", str(args.batch_size), "--precision", args.precision, "--device", args.device,
                  *args.train_args]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    replay_steps(train_args, tokenizer, 0, args.warmup, args.steps, profiler)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows)
    print(f"profile of {args.method}, optimizer steps: {args.steps}, window {args.accum} x {args.batch_size}, "
          f"{args.precision}, device {device}, after {args.warmup} warm-up steps\n")
    print(table)
    trace = out / f"trace_{args.method}_{args.precision}.json"
    profiler.export_chrome_trace(str(trace))
    (out / f"table_{args.method}_{args.precision}.txt").write_text(table)
    print(f"\ntrace for chrome://tracing or Perfetto written to {trace}")
    return {"table": table, "trace": str(trace)}


# -----------------------------------------------------------------------------
# memory: peak memory of training steps, each configuration in its own process

def memory(args) -> dict:
    out = Path(args.out) / "memory"
    tokenizer = shared_tokenizer(args.data, args.train_args, Path(args.out))
    B = args.batch_size
    configs = [(B, K) for K in (1, 2, 4, 8)] + [(8 * B, 1)]
    machine = describe_machine()
    results = []
    for method in args.methods:
        for batch_size, K in configs:
            name = f"{method}_B{batch_size}_K{K}"
            rows, _ = run_train([*data_args(args.data), "--method", method, "--batch-size", str(batch_size),
                                 "--accum", str(K), "--steps", str(args.steps), "--eval-every", str(10**9),
                                 "--keep", "1", "--tokenizer", str(tokenizer), "--device", args.device,
                                 "--precision", args.precision, *args.train_args], out / name)
            peak = max(row["peak_memory_mb"] for row in rows)
            start = rows[0]["start_memory_mb"]
            results.append({"method": method, "batch_size": batch_size, "accum": K, "peak_mb": peak,
                            "start_mb": start, "step_mb": peak - start})
            print(f"{name}: peak {peak:.0f} MiB")

    def find_result(method, batch_size, K):
        return next(r for r in results if (r["method"], r["batch_size"], r["accum"]) == (method, batch_size, K))

    ratios = {}
    for method in args.methods:
        for key in ("peak_mb", "step_mb"):
            accum8 = find_result(method, B, 8)[key]
            accum1 = find_result(method, B, 1)[key]
            large = find_result(method, 8 * B, 1)[key]
            # a step that needed no memory beyond the set-up's leaves no ratio to take
            ratios[f"{method}_{key}_accum8_over_accum1"] = accum8 / accum1 if accum1 > 0 else None
            ratios[f"{method}_{key}_accum8_over_batch8B"] = accum8 / large if large > 0 else None
    measured_quantity = "CUDA tensors (max_memory_allocated)" if train.pick_device(args.device).type == "cuda" else "process RSS"
    print(f"\nmemory: {measured_quantity} over {args.steps} optimizer steps; 'start' is before the first step, after "
          f"data and model set-up; 'step' = peak - start\n")
    print(markdown_table(["method", "micro-batch", "--accum", "effective batch", "peak MiB", "start MiB", "step MiB"],
                         [[r["method"], r["batch_size"], r["accum"], r["batch_size"] * r["accum"], f"{r['peak_mb']:.0f}",
                           f"{r['start_mb']:.0f}", f"{r['step_mb']:.0f}"] for r in results]))
    print("\n" + "\n".join(f"{name}: {value:.3f}" if value is not None else f"{name}: none"
                            for name, value in ratios.items()))
    result = {"machine": machine, "command": " ".join(sys.argv), "measure": measured_quantity, "results": results, "ratios": ratios}
    write_json(out / "memory.json", result)
    return result


# -----------------------------------------------------------------------------
# ablation: the methods at the same number of student pair-passes

def ablation_configs(K: int, B: int, pair_passes: int) -> dict[str, list[str]]:
    """Return each compared method as train.py arguments, with as many steps as pair_passes allows.

    Every method's student encodes pair_passes pairs in all, so a method with a window of K*B
    pairs takes K times fewer optimizer steps than CLIP with batch B. The teacher's forward
    passes in msd and keys_alpha0 are extra compute, recorded as wall-clock time.
    """
    methods = {
        "clip_B": (["--method", "clip", "--accum", "1", "--batch-size", str(B)], B),
        "clip_accum": (["--method", "clip", "--accum", str(K), "--batch-size", str(B)], K * B),
        "clip_KB": (["--method", "clip", "--accum", "1", "--batch-size", str(K * B)], K * B),
        "keys_alpha0": (["--method", "msd", "--accum", str(K), "--batch-size", str(B), "--alpha", "0"], K * B),
        "msd": (["--method", "msd", "--accum", str(K), "--batch-size", str(B)], K * B),
    }
    return {name: [*flags, "--steps", str(pair_passes // window)] for name, (flags, window) in methods.items()}


def flatten_scores(result: dict) -> dict[str, float]:
    """Pick the headline numbers out of an evaluate.py result: recall, zero-shot and few-shot scores."""
    scores = {}
    retrieval = result.get("retrieval", {}).get("scores", {})
    for key in ("i2t_R@1", "i2t_R@10", "t2i_R@1", "t2i_R@10"):
        if key in retrieval:
            scores[key] = retrieval[key]
    if retrieval:
        scores["mean_R@10"] = (retrieval["i2t_R@10"] + retrieval["t2i_R@10"]) / 2
    zeroshot = result.get("zeroshot", {})
    for label, entry in zeroshot.get("labels", {}).items():
        if entry["kind"] == "binary":
            scores[f"zeroshot_auc/{label}"] = entry["auc_roc"]
        else:
            scores[f"zeroshot_acc/{label}"] = entry["accuracy"]
            scores[f"zeroshot_auc/{label}"] = entry["macro_auc_roc"]
    if "mean_auc_roc" in zeroshot:
        scores["zeroshot_auc/mean"] = zeroshot["mean_auc_roc"]
    for label, entry in result.get("fewshot", {}).get("labels", {}).items():
        for regime, value in entry["regimes"].items():
            scores[f"fewshot_auc/{label}/{regime}"] = value["auc_roc"]["mean"]
    return scores


def evaluate_run(checkpoint: Path, model: str, eval_args: list[str]) -> dict[str, float]:
    """Score a checkpoint's student or teacher with evaluate.py, with its printed output kept in a log."""
    out = checkpoint.parent / f"eval_{model}.json"
    with open(checkpoint.parent / f"eval_{model}.log", "w") as log, contextlib.redirect_stdout(log):
        result = evaluate.main(["--task", "all", "--checkpoint", str(checkpoint), "--model", model,
                                "--out", str(out), "--picture-queries", "0", *eval_args])
    return flatten_scores(result)


def ablation(args) -> dict:
    out = Path(args.out) / "ablation" / data_name(args.data)
    K, B = args.accum, args.batch_size
    if args.pair_passes % (K * B):
        sys.exit(f"error: --pair-passes {args.pair_passes} is not a multiple of the window of {K} x {B} pairs; "
                 f"pass a multiple of {K * B}")
    configs = ablation_configs(K, B, args.pair_passes)
    names = list(dict.fromkeys(args.configs or configs))  # in the given order, each once
    unknown = [name for name in names if name not in configs]
    if unknown:
        sys.exit(f"error: unknown --configs {unknown}; choose from {list(configs)}")
    tokenizer = out / "tokenizer.json"  # one per dataset folder, so every run and seed shares its token ids
    if not tokenizer.is_file():
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.write_text(shared_tokenizer(args.data, args.train_args, Path(args.out)).read_text())
    eval_args = ["--shots", *map(str, args.shots), "--percents", "100", "--seeds", str(args.probe_seeds),
                 "--device", args.device]
    if args.labels:
        eval_args += ["--labels", *args.labels]

    runs = []
    for seed in range(args.seeds):
        for name in names:
            run_dir = out / name / f"seed{seed}"
            steps = int(configs[name][configs[name].index("--steps") + 1])
            train_args = [*data_args(args.data), *configs[name], "--seed", str(seed),
                          "--tokenizer", str(tokenizer), "--eval-every", str(max(steps // 4, 1)), "--keep", "1",
                          "--device", args.device, *args.train_args]
            done = run_dir / "result.json"
            if done.is_file():  # finished by an earlier call with the same settings: reuse it
                run = json.loads(done.read_text())
                if (run["train_args"], run.get("eval_args")) != (train_args, eval_args):
                    sys.exit(f"error: {done} was run with other settings ({run['train_args']}, evaluation "
                             f"{run.get('eval_args')}); pass another --out or delete {run_dir}")
                runs.append(run)
                continue
            rows, wall = run_train(train_args, run_dir)
            run = {"config": name, "seed": seed, "steps": steps, "train_args": train_args, "eval_args": eval_args,
                   "wall_seconds": wall, "loop_seconds": sum(row["seconds"] for row in rows),
                   "val": rows[-1].get("val", {}), "final_loss": rows[-1].get("loss"),
                   "student": evaluate_run(run_dir / "checkpoint.pt", "student", eval_args)}
            if "msd" in configs[name]:
                run["teacher"] = evaluate_run(run_dir / "checkpoint.pt", "teacher", eval_args)
            done.write_text(json.dumps(run, indent=2))
            runs.append(run)
            print(f"{name} seed {seed}: {steps} steps in {wall:.0f} s, "
                  f"student mean R@10 {run['student'].get('mean_R@10', float('nan')):.1f}")

    summary = summarise(runs, names)
    title = (f"ablation on {data_name(args.data)}: {args.pair_passes} pairs encoded by the student per run, "
             f"K = {K}, B = {B}, mean ± std over {args.seeds} seeds")
    print(f"\n{title}\n")
    print(ablation_table(summary, names))
    result = {"machine": describe_machine(), "command": " ".join(sys.argv), "data": args.data or "synthetic",
              "pair_passes": args.pair_passes, "accum": K, "batch_size": B, "seeds": args.seeds,
              "summary": summary, "runs": runs}
    write_json(out / "ablation.json", result)
    return result


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise(runs: list[dict], names: list[str]) -> dict:
    """Average every score over seeds: {config: {"student" | "teacher" | "val" | "time": {metric: mean, std, n}}}."""
    summary = {}
    for name in names:
        config_runs = [run for run in runs if run["config"] == name]
        entry = {"steps": config_runs[0]["steps"],
                 "time": {"wall_seconds": mean_std([run["wall_seconds"] for run in config_runs]),
                          "loop_seconds": mean_std([run["loop_seconds"] for run in config_runs])}}
        for model in ("student", "teacher", "val"):
            if config_runs[0].get(model):
                metrics = config_runs[0][model].keys()
                entry[model] = {metric: mean_std([run[model][metric] for run in config_runs]) for metric in metrics}
        val = [run["val"] for run in config_runs if "i2t_R@10" in run.get("val", {})]
        if val:
            entry["val"]["mean_R@10"] = mean_std([(scores["i2t_R@10"] + scores["t2i_R@10"]) / 2 for scores in val])
        summary[name] = entry
    return summary


def ablation_table(summary: dict, names: list[str]) -> str:
    """Format the summary as a Markdown table: one column per method, then one per teacher."""
    def cell(stats: dict | None) -> str:
        return "-" if stats is None else f"{stats['mean']:.3g} ± {stats['std']:.2g}"

    teachers = [name for name in names if "teacher" in summary[name]]
    header = ["metric"] + [f"{name} ({summary[name]['steps']} steps)" for name in names] + \
             [f"{name} teacher" for name in teachers]
    rows = [["train loop seconds"] + [cell(summary[name]["time"]["loop_seconds"]) for name in names] +
            ["" for _ in teachers]]
    rows.append(["val mean R@10 (slice of train)"] + [cell(summary[name].get("val", {}).get("mean_R@10"))
                                                      for name in names] + ["" for _ in teachers])
    for metric in summary[names[0]]["student"]:
        rows.append([metric] + [cell(summary[name]["student"].get(metric)) for name in names] +
                    [cell(summary[name]["teacher"].get(metric)) for name in teachers])
    n = summary[names[0]]["time"]["loop_seconds"]["n"]
    return markdown_table(header, rows) + f"\n\nmean ± sample std over n = {n} seeds; other rows: held-out split"


# -----------------------------------------------------------------------------
# command line

def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    def common(sub, methods: bool = True):
        sub.add_argument("--data", default=None, help="dataset spec as for train.py (default: the synthetic chest X-rays)")
        sub.add_argument("--out", default="runs/bench", help="folder for the runs and JSON results (default: %(default)s)")
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
        sub.add_argument("--batch-size", type=int, default=32, help="micro-batch size B (default: %(default)s)")
        if methods:
            sub.add_argument("--methods", nargs="+", choices=["msd", "clip"], default=["msd", "clip"],
                             help="training methods to measure (default: %(default)s)")
        sub.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                         help="further train.py arguments for every run, given last, e.g. --train-args --width 256")

    sub = commands.add_parser("speed", help="pairs per second, FLOPs per pair and model FLOP utilisation")
    common(sub)
    sub.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step (default: %(default)s)")
    sub.add_argument("--steps", type=int, default=20, help="measured optimizer steps per run (default: %(default)s)")
    sub.add_argument("--warmup", type=int, default=5, help="optimizer steps run before measuring (default: %(default)s)")
    sub.add_argument("--repeats", type=int, default=3,
                     help="runs of each method and precision, taken in turn (default: %(default)s)")
    sub.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                     help="precisions to measure (default: %(default)s)")
    sub.add_argument("--workers", type=int, default=0, help="data loader workers, as train.py --workers (default: %(default)s)")

    sub = commands.add_parser("profile", help="torch.profiler table of the operators that take the time of a step")
    common(sub, methods=False)
    sub.add_argument("--method", choices=["msd", "clip"], default="msd", help="training method (default: %(default)s)")
    sub.add_argument("--accum", type=int, default=8, help="micro-batches per optimizer step (default: %(default)s)")
    sub.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="as train.py --precision (default: %(default)s)")
    sub.add_argument("--steps", type=int, default=3, help="profiled optimizer steps (default: %(default)s)")
    sub.add_argument("--warmup", type=int, default=2, help="optimizer steps run before profiling (default: %(default)s)")
    sub.add_argument("--rows", type=int, default=15, help="operators in the printed table (default: %(default)s)")

    sub = commands.add_parser("memory", help="peak memory with accumulation against one large batch")
    common(sub)
    sub.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (default: %(default)s)")
    sub.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                     help="as train.py --precision (default: %(default)s)")

    sub = commands.add_parser("ablation", help="the methods compared at the same compute, over seeds; at the "
                              "defaults 15 training runs as long as `python train.py --accum 8`, so hours on a CPU")
    common(sub, methods=False)
    sub.add_argument("--accum", type=int, default=4,
                     help="micro-batches per optimizer step (K) of clip_accum, keys_alpha0 and msd; clip_KB takes "
                          "one batch of K x B (default: %(default)s)")
    sub.add_argument("--pair-passes", type=int, default=128000,
                     help="pairs the student encodes per run, the compute budget: steps = this / pairs per step "
                          "(default: %(default)s, as many as `python train.py --accum 8`)")
    sub.add_argument("--seeds", type=int, default=3, help="training seeds per method (default: %(default)s)")
    sub.add_argument("--configs", nargs="+", default=None,
                     help="methods to run (default: all): clip_B = CLIP with batch B; clip_accum = CLIP with "
                          "naive accumulation of K micro-batches; clip_KB = CLIP with one batch of K x B; "
                          "keys_alpha0 = momentum keys and queue, alpha 0; msd = full MSD")
    sub.add_argument("--labels", nargs="+", default=None,
                     help="labels to score zero-shot and few-shot, as evaluate.py --labels (default: all with prompts)")
    sub.add_argument("--shots", type=int, nargs="+", default=[1, 16],
                     help="few-shot examples per class, as evaluate.py --shots (default: %(default)s)")
    sub.add_argument("--probe-seeds", type=int, default=3, help="few-shot repeats, as evaluate.py --seeds (default: %(default)s)")
    args = p.parse_args(argv)
    positive = ["batch_size", "accum", "steps", "seeds", "pair_passes", "probe_seeds", "repeats", "rows"]
    for name in positive:
        if getattr(args, name, 1) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if getattr(args, "warmup", 0) < 0:
        p.error(f"--warmup must be 0 or more, got {args.warmup}")
    clashes = sorted({arg.split("=", 1)[0] for arg in args.train_args} & CONTROLLED_FLAGS)
    if clashes:
        p.error(f"--train-args may not set {clashes}, because bench.py sets them for the comparison; "
                f"use the bench.py options of the same name where there are any")
    return args


def main(argv=None) -> dict:
    args = get_args(argv)
    return {"speed": speed, "profile": profile, "memory": memory, "ablation": ablation}[args.command](args)


if __name__ == "__main__":
    main()
