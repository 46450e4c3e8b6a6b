"""The GPU check: one command, under 9 minutes on one H100/H200, one JSON and a table.

Nothing in the kit had run on a GPU beyond a first skeleton; this checks, in one go, what
only a GPU can tell:

1. `bf16_vs_fp32`: bf16-mixed training steps (autocast, float32 master weights, the frozen
   tower stored in bf16, as `fit` does) follow float32 steps from the same weights on the same
   batches, every step's loss within `BF16_RTOL` relative.
2. `packed_vs_unpacked`: for every attention backend usable here (the kit's sdpa, which is
   `sdpa_by_example`, transformers' sdpa, flex_attention on CUDA, flash_attention_2 when
   flash-attn imports), a packed batch gives the padded batch's
   loss and gradients (float32: loss 1e-5 relative, gradients 1e-3 of the largest).
3. `fsdp2_one_gpu`: the kit's FSDP2 sharding (`shard_model`) in a one-process group
   (NCCL on a GPU, gloo on a CPU): two steps whose losses equal the unsharded model's.
4. `qlora`: a 4-bit (nf4) LLM with LoRA adapters trains one step, or a skip saying why
   (bitsandbytes missing, no CUDA).
5. `train_step`: `benchmarks/train_step.py --preset gpu`: ours against transformers' Llava
   (SDPA, bf16) with the same weights and samples; `flex` (ours with FlexAttention) and
   `liger` (transformers' Llava with padding-free packing and Liger's fused linear
   cross-entropy, when liger_kernel imports), and ours padded where a fifth model copy fits
   (pack against pad on the GPU); tokens/s, MFU counting the tower's FLOPs
   (`src.training.callbacks.flops_model_of`), peak memory.
6. `data_loader`: `benchmarks/data_loader.py` with 8-16 workers: samples/s of our shard
   pipeline against the official LLaVA loader (needs webdataset and braceexpand).

Each check runs on its own (one failing or skipped does not stop the others) within a time
budget; what did not fit is reported as skipped. `--dry-run` runs all of it at a tiny size on
the CPU in about half a minute (the CI test: `tests/benchmarks/test_gpu_check.py`).

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU
    python benchmarks/gpu_check.py --dry-run --out /tmp/check.json  # anywhere, tiny

How to run it on the lent GPU machine (wheels carried): BENCHMARKS.md, "The GPU check".
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _load_train_step():
    """benchmarks/train_step.py as a module (benchmarks/ is not a package)."""
    name = "train_step_bench"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


ts = _load_train_step()

PACKED_LOSS_RTOL = 1e-5
PACKED_GRAD_TOL = 1e-3  # largest gradient difference / largest gradient, float32
FSDP_LOSS_RTOL = 1e-5


class CheckFailed(AssertionError):
    pass


# ---- shared set-up -------------------------------------------------------------------------


def setup(preset: str, device: torch.device, steps: int, seed: int = 0, **overrides) -> SimpleNamespace:
    """The base module (float32, on `device`) and `steps` steps of LLaVA-like samples, as train_step makes them."""
    args = ts.parse_args(["--preset", preset, "--steps", str(steps), "--warmup", "0", "--device", device.type,
                          "--seed", str(seed), "--memory-probe", "none"])  # fmt: skip
    for key, value in overrides.items():
        setattr(args, key, value)
    env = ts.prepare(args)
    env.base.to(device)
    return env


def train_losses(env, variant, batches: list[dict], dtype: str) -> list[float]:
    module, optimizer, schedule = ts.make_ours(env.base, variant, env.total)
    side = ts.ours_side(variant.name, module, optimizer, schedule, batches, env.device, dtype)
    for index in range(len(batches)):
        side.run(index, timed=False)
    return side.losses


# ---- the checks ------------------------------------------------------------------------------


def check_bf16_vs_fp32(cfg: SimpleNamespace) -> dict:
    env = setup(cfg.small_preset, cfg.device, cfg.short_steps, **cfg.small_overrides)
    batches = [ts.collate_ours(s, env.pad_id, env.preset.max_length, "pack-fit") for s in env.steps]
    fp32 = train_losses(env, ts.Variant(), batches, "float32")
    bf16 = train_losses(env, ts.Variant(tower_bf16=True), batches, "bfloat16")
    diffs = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16, strict=True)]
    result = {"fp32_losses": fp32, "bf16_losses": bf16, "max_rel_diff": max(diffs), "tolerance": ts.BF16_RTOL}
    if not all(math.isfinite(x) for x in bf16) or max(diffs) > ts.BF16_RTOL:
        raise CheckFailed(f"bf16 losses {bf16} differ from float32 {fp32} by up to {max(diffs):.2e}", result)
    return result | {"summary": f"{len(diffs)} steps, max rel loss diff {max(diffs):.1e} <= {ts.BF16_RTOL:.0e}"}


def usable_backends(device: torch.device) -> dict[str, str | None]:
    """Backend -> None (usable) or the reason it is skipped."""
    from src.model.language import _flash_attn_usable

    return {
        "sdpa_by_example": None,  # the kit's sdpa: SDPA per example of a packed row
        "sdpa": None,  # transformers' own: the row under the dense block-diagonal mask
        "eager": None if device.type == "cpu" else "the slowest; sdpa and flex cover the GPU",
        "flex_attention": None if device.type == "cuda" else "FlexAttention has no backward on a CPU",
        "flash_attention_2": None if _flash_attn_usable() else "flash-attn is not installed (no wheel on PyPI)",
    }


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(batch["input_ids"], batch.get("attention_mask"), batch["pixel_values"], batch["labels"],
                position_ids=batch.get("position_ids"))  # fmt: skip
    out.loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def check_packed_vs_unpacked(cfg: SimpleNamespace) -> dict:
    env = setup(cfg.small_preset, cfg.device, 1, **cfg.small_overrides)
    samples = env.steps[0]
    padded = ts._to(ts.collate_padded(samples, env.pad_id), env.device)
    packed = ts._to(ts.collate_ours(samples, env.pad_id, env.preset.max_length, "pack"), env.device)
    results, failures = {}, []
    for backend, reason in usable_backends(env.device).items():
        if reason:
            results[backend] = {"status": "skipped", "reason": reason}
            continue
        model = copy.deepcopy(env.base.model)
        model.llm.set_attn_implementation(backend)
        reference_loss, reference = loss_and_grads(model, padded)
        loss, grads = loss_and_grads(model, packed)
        largest = max(g.abs().max().item() for g in reference.values())
        worst = max((grads[n] - g).abs().max().item() for n, g in reference.items()) / largest
        loss_diff = abs(loss - reference_loss) / abs(reference_loss)
        ok = loss_diff <= PACKED_LOSS_RTOL and worst <= PACKED_GRAD_TOL and grads.keys() == reference.keys()
        results[backend] = {"status": "pass" if ok else "fail", "loss_rel_diff": loss_diff, "grad_rel_diff": worst,
                            "packed_loss": loss, "padded_loss": reference_loss}  # fmt: skip
        if not ok:
            failures.append(backend)
        del model
    summary = ", ".join(
        f"{b} {r['status']}" + (f" (loss {r['loss_rel_diff']:.0e}, grad {r['grad_rel_diff']:.0e})" if "loss_rel_diff"
                                in r else "") for b, r in results.items()
    )  # fmt: skip
    if failures:
        raise CheckFailed(f"packed != padded for {failures}: {summary}", results)
    return {"backends": results, "summary": summary}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_fsdp2(cfg: SimpleNamespace) -> dict:
    """Two steps of the kit's FSDP2 sharding in a one-process group, against the same steps unsharded."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from src.training.sharding import FSDPConfig, shard_model

    env = setup(cfg.small_preset, cfg.device, 2, **cfg.small_overrides)
    batches = [ts.collate_ours(s, env.pad_id, env.preset.max_length, "pack-fit") for s in env.steps]
    reference = train_losses(env, ts.Variant(), batches, "float32")
    started = not dist.is_initialized()
    if started:
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh(env.device.type, (1,))
        module = copy.deepcopy(env.base)
        units = shard_model(module.model, mesh, FSDPConfig())
        module.trainer = SimpleNamespace(estimated_stepping_batches=env.total)
        config = module.configure_optimizers()
        module.trainer = None
        side = ts.ours_side("fsdp2", module, config["optimizer"], config["lr_scheduler"]["scheduler"], batches,
                            env.device, "float32")  # fmt: skip
        for index in range(len(batches)):
            side.run(index, timed=False)
    finally:
        if started:
            dist.destroy_process_group()
    diffs = [abs(a - b) / abs(a) for a, b in zip(reference, side.losses, strict=True)]
    result = {"units": len(units), "losses": side.losses, "unsharded_losses": reference, "max_rel_diff": max(diffs)}
    if max(diffs) > FSDP_LOSS_RTOL:
        raise CheckFailed(f"FSDP2 losses {side.losses} != unsharded {reference}", result)
    return result | {"summary": f"{len(units)} units, 2 steps, max rel loss diff {max(diffs):.1e}"}


def check_qlora(cfg: SimpleNamespace) -> dict:
    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "summary": "bitsandbytes is not installed: carry its wheel (BENCHMARKS.md)"}
    if cfg.device.type != "cuda":
        return {"status": "skipped", "summary": "bitsandbytes' 4-bit kernels need a CUDA GPU"}
    env = setup(cfg.small_preset, cfg.device, 1, **cfg.small_overrides)
    with tempfile.TemporaryDirectory() as folder:
        env.base.model.llm.save_pretrained(folder)  # a pretrained-weights folder for `llm.name`
        env.base.tokenizer.save_pretrained(folder)
        from src.model.projector import ProjectorConfig
        from src.training.module import LlavaLitModule
        from src.training.stage import FreezeConfig, OptimizerConfig

        module = LlavaLitModule(
            folder,
            vision=env.base.vision_config,  # the same tower and projector as the other checks
            projector=ProjectorConfig("mlp", {"depth": 2}),
            llm={"name": folder, "quantization": "4bit", "attn_implementation": "sdpa"},
            freeze=FreezeConfig(vision="frozen", projector="full", llm="lora"),
            optimizer=OptimizerConfig(lr=1e-4, warmup_steps=0),
        )
        module.configure_model()
    module.model.vision.to(cfg.device)  # the 4-bit LLM was placed on the GPU as it loaded (device_map)
    module.model.projector.to(cfg.device)
    quantized = sum("Linear4bit" in type(m).__name__ for m in module.model.llm.modules())
    trainable = [n for n, p in module.model.named_parameters() if p.requires_grad]
    batch = ts._to(ts.collate_ours(env.steps[0], env.pad_id, env.preset.max_length, "pack-fit"), cfg.device)
    module.trainer = SimpleNamespace(estimated_stepping_batches=1)
    optimizer = module.configure_optimizers()["optimizer"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = module(batch).loss
    loss.backward()
    lora_grads = [n for n, p in module.model.named_parameters() if p.grad is not None and "lora_" in n]
    optimizer.step()
    result = {"loss": loss.item(), "linear4bit_layers": quantized, "trainable": len(trainable),
              "lora_params_with_grad": len(lora_grads)}  # fmt: skip
    if not math.isfinite(loss.item()) or quantized == 0 or not lora_grads:
        raise CheckFailed("QLoRA step did not train 4-bit layers with LoRA gradients", result)
    return result | {"summary": f"loss {loss.item():.3f}, {quantized} 4-bit layers, {len(lora_grads)} LoRA grads"}


def check_train_step(cfg: SimpleNamespace) -> dict:
    keys = ["ours"]
    skipped = {}
    if cfg.device.type == "cuda":
        keys.append("flex")
    else:
        skipped["flex"] = "FlexAttention has no backward on a CPU"
    reason = ts.liger_unavailable()
    if reason:
        skipped["liger"] = reason
    else:
        keys.append("liger")
    # each side holds ~15-18 GB of weights, gradients and AdamW state at the GPU preset: padding as a
    # fifth side only where it fits (an H200's 141 GB, not an H100's 80)
    big = cfg.device.type == "cuda" and torch.cuda.get_device_properties(0).total_memory > 120 * 2**30
    if cfg.dry_run or big:
        keys.append("padded")
    else:
        skipped["padded"] = "a fifth copy of the model does not fit next to the others on this GPU"
    argv = ["--preset", cfg.bench_preset, "--variants", ",".join(keys), "--memory-probe", "none", *cfg.bench_args]
    results = ts.main(argv)
    sides = {
        name: {k: s.get(k) for k in ("tokens_per_s", "tokens_per_s_ratio_median", "mfu", "peak_mb",
                                     "peak_memory_ratio", "max_loss_rel_diff", "settings")}
        for name, s in results["sides"].items()
    }  # fmt: skip
    ours = results["sides"]["ours"]
    mfu = f", MFU {ours['mfu']:.1%}" if "mfu" in ours else ""
    return {"argv": argv, "sides": sides, "skipped_variants": skipped, "attention": results["attention"],
            "useful_tflops_per_step": results["useful_tflops_per_step"], "peak_flops": results["peak_flops"],
            "summary": f"ours {ours['tokens_per_s_ratio_median']:.2f}x transformers' Llava tokens/s{mfu}, "
                       f"peak memory {ours['peak_memory_ratio']:.2f}x"}  # fmt: skip


def check_data_loader(cfg: SimpleNamespace) -> dict:
    missing = [name for name in ("webdataset", "braceexpand") if importlib.util.find_spec(name) is None]
    if missing:
        return {"status": "skipped", "summary": f"{', '.join(missing)} not installed: carry the wheels (BENCHMARKS.md)"}
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "loader.json"
        argv = [sys.executable, str(HERE / "data_loader.py"), "--workdir", str(Path(folder) / "work"), "--out", str(out),
                *cfg.loader_args]  # fmt: skip
        timeout = max(30.0, min(cfg.loader_timeout, cfg.deadline - time.perf_counter()))  # inside the budget
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise CheckFailed(f"data_loader.py failed:\n{done.stderr[-1500:]}", {"argv": argv[1:]})
        results = json.loads(out.read_text())
    keep = {k: v for k, v in results.items() if not isinstance(v, (list, dict))}
    rate, ratio = results.get("ours_samples_per_s"), results.get("ratio")
    summary = (
        f"{cfg.loader_workers} workers: ours {rate:.0f} samples/s, {ratio:.2f}x the LLaVA loader" if rate else "ran"
    )
    return {"argv": argv[1:], "results": keep, "summary": summary}


CHECKS: dict[str, Callable[[SimpleNamespace], dict]] = {
    "bf16_vs_fp32": check_bf16_vs_fp32,
    "packed_vs_unpacked": check_packed_vs_unpacked,
    "fsdp2_one_gpu": check_fsdp2,
    "qlora": check_qlora,
    "train_step": check_train_step,
    "data_loader": check_data_loader,
}


# ---- the run ---------------------------------------------------------------------------------


def config(args: argparse.Namespace) -> SimpleNamespace:
    device = torch.device("cpu" if args.dry_run else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run:
        torch.set_num_threads(1)
        return SimpleNamespace(
            dry_run=True, device=device, small_preset="tiny", small_overrides={}, short_steps=2,
            bench_preset="tiny", bench_args=["--steps", "1", "--warmup", "1", "--dtype", "bfloat16",
                                             "--peak-flops", "1e11"],
            loader_workers=2, loader_timeout=60,
            loader_args=["--images", "24", "--per-shard", "12", "--workers", "2", "--batches", "1", "--rounds", "1",
                         "--settle", "0", "--cpu-rounds", "0", "--stage-samples", "0", "--warmup", "1",
                         "--batch-size", "4", "--image-size", "56", "--image-tokens", "16", "--max-length", "512"],
        )  # fmt: skip
    workers = max(8, min(16, (os.cpu_count() or 8) - 2))
    return SimpleNamespace(
        dry_run=False, device=device,
        # a 4-layer decoder of the GPU preset's width: correctness checks need the real kernels, not depth
        small_preset="gpu", small_overrides={"llm_layers": 4, "tower_layers": 4, "samples_per_step": 4},
        short_steps=5,
        bench_preset="gpu", bench_args=["--steps", "12", "--warmup", "3"],
        loader_workers=workers, loader_timeout=150,
        loader_args=["--images", "800", "--workers", str(workers), "--batches", "20", "--rounds", "4",
                     "--settle", "0.5", "--cpu-rounds", "1", "--stage-samples", "0"],
    )  # fmt: skip


def run_checks(names: list[str], cfg: SimpleNamespace, budget_s: float) -> dict:
    start = time.perf_counter()
    cfg.deadline = start + budget_s
    results = {}
    for name in names:
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            results[name] = {"status": "skipped", "summary": f"out of time ({elapsed:.0f} s of {budget_s:.0f})"}
            continue
        began = time.perf_counter()
        try:
            result = CHECKS[name](cfg)
            result.setdefault("status", "pass")
        except CheckFailed as failure:
            detail = failure.args[1] if len(failure.args) > 1 else {}
            result = {"status": "fail", "summary": str(failure.args[0]), "detail": detail}
        except Exception as error:  # one broken check must not hide the others' results
            result = {"status": "error", "summary": f"{type(error).__name__}: {error}"[:500],
                      "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
        result["seconds"] = round(time.perf_counter() - began, 1)
        if cfg.device.type == "cuda":
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        results[name] = result
        print(f"[{name}] {result['status']} in {result['seconds']} s: {result.get('summary', '')}", flush=True)
    return results


def table(report: dict) -> str:
    lines = [f"GPU check on {report['machine'].get('gpu') or report['machine'].get('cpu')} "
             f"({'dry run' if report['dry_run'] else 'full'}), {report['seconds']:.0f} s",
             f"{'check':<20} {'status':<8} {'s':>6}  summary"]  # fmt: skip
    for name, r in report["checks"].items():
        lines.append(f"{name:<20} {r['status']:<8} {r.get('seconds', 0):>6}  {r.get('summary', '')}")
    bench = report["checks"].get("train_step", {})
    if "sides" in bench:
        lines.append(f"{'train_step side':<34} {'tok/s':>9} {'x base':>7} {'MFU':>6} {'peak MB':>8} {'x mem':>6}")
        for side, s in bench["sides"].items():
            ratio = f"{s['tokens_per_s_ratio_median']:.2f}x" if s.get("tokens_per_s_ratio_median") else "1"
            mfu = f"{s['mfu']:.1%}" if s.get("mfu") is not None else "-"
            mem = f"{s['peak_memory_ratio']:.2f}" if s.get("peak_memory_ratio") else "1"
            lines.append(f"{side:<34} {s['tokens_per_s']:>9.0f} {ratio:>7} {mfu:>6} {s['peak_mb']:>8.0f} {mem:>6}")
        for variant, reason in bench.get("skipped_variants", {}).items():
            lines.append(f"  {variant}: skipped ({reason})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="everything at a tiny size on the CPU (CI)")
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {list(CHECKS)}")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no check after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    args = parser.parse_args(argv)
    names = args.checks.split(",")
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise SystemExit(f"unknown checks {unknown}; choose from {list(CHECKS)}")
    cfg = config(args)
    if not args.dry_run and cfg.device.type != "cuda":
        raise SystemExit("no CUDA GPU here: run with --dry-run for the tiny CPU version")
    start = time.perf_counter()
    checks = run_checks(names, cfg, args.budget_s)
    report = {
        "dry_run": args.dry_run,
        "device": str(cfg.device),
        "machine": ts.machine(),
        "checks": checks,
        "seconds": time.perf_counter() - start,
        "passed": all(c["status"] in ("pass", "skipped") for c in checks.values()),
    }
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(table(report))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    report = main()
    sys.exit(0 if report["passed"] else 1)
