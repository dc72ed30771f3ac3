"""`vitkit benchmark` and its library function: the report's fields, not its timings."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vitkit import create_model
from vitkit.benchmark import benchmark, matmul_peak
from vitkit.cli import main
from vitkit.engine.runtime import auto_precision
from vitkit.models.profile import count_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import interleaved, process_steps  # noqa: E402  (the comparison scripts' harness)

MODEL = "vit_pico_conv4_28"
FAST = dict(steps=2, warmup=1, batch_size=8, matmul_size=256)  # small matmuls: a fast, not a real, peak


def _pico_flops() -> int:
    with torch.device("meta"):
        model = create_model(MODEL)
    return count_flops(model, 28, 1)


def test_function_report(tmp_path):
    out = tmp_path / "bench.json"
    report = benchmark(MODEL, modes=["train", "infer"], precisions=["fp32", "auto"], json_path=out, log=None, **FAST)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    # auto resolves as training does; a precision asked for twice runs once.
    auto = auto_precision("cpu", create_model(MODEL))
    per_mode = [("fp32", "fp32,auto")] if auto == "fp32" else [("fp32", "fp32"), (auto, "auto")]
    assert [(r["mode"], r["precision"], r["requested"]) for r in report["results"]] == [
        (mode, prec, asked) for mode in ("train", "infer") for prec, asked in per_mode]
    flops = _pico_flops()
    assert report["gflops_per_image"] == pytest.approx(flops / 1e9)
    assert report["img_size"] == [28, 28] and report["batch_size"] == 8 and report["device"] == "cpu"
    assert report["matmul_peak_tflops"]["fp32"] > 0
    m = report["machine"]
    assert m["cpu"] and m["threads"] >= 1 and m["torch"] == torch.__version__
    for r in report["results"]:
        factor = 3 if r["mode"] == "train" else 1
        assert r["gflops_per_image"] == pytest.approx(flops / 1e9)
        assert r["gflops_per_image_step"] == pytest.approx(factor * flops / 1e9)
        assert r["images_per_s"] > 0 and r["batch_ms"] > 0 and r["tflops"] > 0 and r["peak_tflops"] > 0
        assert r["images_per_s"] == pytest.approx(8000 / r["batch_ms"])
        assert r["tflops"] == pytest.approx(factor * flops * r["images_per_s"] / 1e12)
        assert r["fraction_of_peak"] == pytest.approx(r["tflops"] / r["peak_tflops"])
        assert r["peak_mem_mib"] >= 0 and r["peak_mem_kind"] == "process_peak_rss_growth"
        assert (r["batch1_ms"] > 0) if r["mode"] == "infer" else r["batch1_ms"] is None


def test_cli_writes_json_and_prints_table(tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = ["benchmark", "--model", MODEL, "--mode", "infer", "--precision", "bf16", "--precision", "fp32", "auto",
            "--steps", "2", "--warmup", "1", "--batch-size", "4", "--matmul-size", "256", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"precision auto -> {auto_precision('cpu', create_model(MODEL))}" in text and "img/s" in text and "peak RSS" in text
    report = json.loads(out.read_text())
    assert [(r["mode"], r["precision"]) for r in report["results"]] == [("infer", "bf16"), ("infer", "fp32")]
    assert set(report["matmul_peak_tflops"]) == {"bf16", "fp32"}


@pytest.mark.parametrize("argv, message", [
    (["--model", "vit_nope"], "unknown model 'vit_nope'"),
    (["--model", MODEL, "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["--model", MODEL, "--precision", "fp16"], "fp16 needs a CUDA device"),
    (["--model", MODEL, "--steps", "0"], "steps must be at least 1"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(["benchmark", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_function_rejects_bad_values():
    with pytest.raises(ValueError, match="precision must be"):
        benchmark(MODEL, precisions=["fp64"], log=None)
    with pytest.raises(ValueError, match="mode must be"):
        benchmark(MODEL, modes=["eval"], log=None)
    with pytest.raises(ValueError, match="unknown model"):
        benchmark("nope", log=None)


def test_timing_helpers():
    rates = interleaved({"a": lambda: None, "b": lambda: None}, batch=4, warmup=1, rounds=2, target_s=0.0)
    assert set(rates) == {"a", "b"} and all(len(v) == 2 and min(v) > 0 for v in rates.values())
    assert matmul_peak("fp32", size=64, reps=1) > 0


_WORKER_SCRIPT = '''
import os

def build(tag):
    if tag == "broken":
        raise ValueError("no such model")
    calls = []

    def record():
        calls.append(os.environ["BENCH_TAG"])
        with open(os.environ["BENCH_OUT"], "w") as f:
            f.write(f"{os.getpid()} {len(calls)} {calls[-1]}")

    def fail():
        raise KeyError("lost")

    return {f"{tag} record": record, f"{tag} fail": fail}
'''


def test_process_steps_run_in_their_own_process_with_their_env(tmp_path):
    import os


    script, out = tmp_path / "bench_script.py", tmp_path / "out.txt"
    script.write_text(_WORKER_SCRIPT)
    worker = process_steps(str(script), "build", "a", env={"BENCH_TAG": "side-a", "BENCH_OUT": str(out)})
    try:
        assert worker.names == ["a record", "a fail"]
        record = worker.step("a record")
        record()
        record()
        pid, count, tag = out.read_text().split()
        assert int(pid) != os.getpid() and count == "2" and tag == "side-a"
        assert "BENCH_TAG" not in os.environ  # the env was the worker's, not ours
        with pytest.raises(RuntimeError, match="KeyError: 'lost'"):
            worker.step("a fail")()
        record()  # the worker survives a failed step
        assert out.read_text().split()[1] == "3"
    finally:
        worker.close()
    with pytest.raises(RuntimeError, match="no such model"):
        process_steps(str(script), "build", "broken")
