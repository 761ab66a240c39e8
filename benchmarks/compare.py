"""MindSpore (this project) against the PyTorch reference (timm's VOLO), and for inference this project's ONNX
export in onnxruntime, alternating, on the same machine.

  python benchmarks/compare.py --rounds 3                       # volo_d1_224, batch 8, 224 px, infer + train
  python benchmarks/compare.py --rounds 3 --tasks infer --torch_python ~/torchenv/bin/python

Each round runs, for each task, one MindSpore run and one reference run back to back (each in its own fresh
process, see benchmark.py), so slow phases of a shared machine hit both sides. Prints every run as a JSON
line, then a table of medians over the rounds and the MindSpore / reference ratios (img/s: higher is
better for MindSpore above 1; peak memory: MindSpore below 1 is better). MindSpore runs in GRAPH_MODE,
float32 (O0), with the threads train.py would use; the reference in eager mode, float32,
torch.set_num_threads(2); onnxruntime (inference only) with as many threads as MindSpore. Every side is timed
at steady state (`--warmup auto`: see `_common.warm_up`; each record says how many calls that took).
"""
import argparse
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="volo_d1_224")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--img_size", "--img-size", type=int, default=224)
    parser.add_argument("--tasks", default="infer,train", help="comma-separated: infer, train")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=_common.warmup_count, default="auto",
                        help="untimed calls after the first; auto: until the step time settles")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--onnxruntime", type=lambda text: text.lower() in ("1", "true", "yes"), default=True,
                        help="True/False: the onnxruntime side for inference (needs `pip install -e .[onnx]`)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for the reference")
    parser.add_argument("--torch_python", "--torch-python", default=os.environ.get("TORCH_PYTHON", os.path.expanduser("~/torchenv/bin/python")),
                        help="python of the reference's virtualenv (torch + timm)")
    parser.add_argument("--baseline_path", "--baseline-path", help="also run benchmark.py with this folder first on PYTHONPATH "
                        "(e.g. an older checkout of mindcv_volo: `git archive REV mindcv_volo | tar -x -C DIR`), "
                        "as a third side, 'baseline'")
    parser.add_argument("--out", help="also append every run's JSON line to this file")
    parser.add_argument("--timeout", type=float, default=3600)
    return parser.parse_args()


def settings(args, task):
    return dict(model=args.model, batch_size=args.batch_size, img_size=args.img_size, task=task, device="CPU",
                warmup=args.warmup, iters=args.iters, num_classes=1000, seed=0)


def median(records, key):
    values = [r[key] for r in records if key in r]
    return statistics.median(values) if values else float("nan")


def table(results, tasks, sides):
    lines = ["| task | side | img/s (median) | step ms | first call s | compile s | peak RSS MB | warm-up calls | runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    ratios = ["| task | side | img/s side / reference (medians) | median of per-round ratios | "
              "peak RSS side / reference |", "|---|---|---|---|---|"]
    for task in tasks:
        rows = {side: [r for r in results[(task, side)] if "error" not in r] for side in sides
                if results[(task, side)]}  # onnxruntime has no training side
        for side, recs in rows.items():
            lines.append(f"| {task} | {side} | {median(recs, 'img_per_s'):.2f} | {median(recs, 'step_ms_median'):.0f} | "
                         f"{median(recs, 'first_call_s'):.1f} | {median(recs, 'compile_s'):.1f} | "
                         f"{median(recs, 'peak_rss_mb'):.0f} | {median(recs, 'warmup_calls'):.0f} | {len(recs)} |")
        ref = rows["reference"]
        for side in rows:
            if side == "reference":
                continue
            # each round's runs were back to back: the per-round ratio is the less noisy one
            paired = [m["img_per_s"] / r["img_per_s"] for m, r in zip(rows[side], ref)]
            ratios.append(f"| {task} | {side} | {median(rows[side], 'img_per_s') / median(ref, 'img_per_s'):.2f}x | "
                          f"{statistics.median(paired) if paired else float('nan'):.2f}x | "
                          f"{median(rows[side], 'peak_rss_mb') / median(ref, 'peak_rss_mb'):.2f} |")
    return "\n".join(lines + [""] + ratios)


def main():
    args = parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    sides = (("mindspore", "reference") + (("onnxruntime",) if args.onnxruntime and "infer" in tasks else ())
             + (("baseline",) if args.baseline_path else ()))
    results = {(task, side): [] for task in tasks for side in sides}
    baseline_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (args.baseline_path, os.environ.get("PYTHONPATH")) if p))
    for round_ in range(args.rounds):
        for task in tasks:
            runs = [("mindspore", os.path.join(HERE, "benchmark.py"), sys.executable,
                     dict(settings(args, task), mode="graph", amp_level="O0"), None),
                    ("reference", os.path.join(HERE, "reference_torch.py"), args.torch_python,
                     dict(settings(args, task), mode="eager", amp_level="O0", threads=args.threads), None)]
            if "onnxruntime" in sides and task == "infer":
                runs.append(("onnxruntime", os.path.join(HERE, "benchmark.py"), sys.executable,
                             dict(settings(args, task), framework="onnxruntime", mode="onnxruntime", amp_level="O0"),
                             None))
            if args.baseline_path:
                runs.append(("baseline", os.path.join(HERE, "benchmark.py"), sys.executable,
                             dict(settings(args, task), mode="graph", amp_level="O0"), baseline_env))
            # alternate the order, so no side always runs right after the same other side
            for side, script, python, child_args, env in (runs if round_ % 2 == 0 else runs[::-1]):
                record = dict(_common.run_child(script, child_args, timeout=args.timeout, python=python, env=env),
                              side=side, round=round_)
                results[(task, side)].append(record)
                line = json.dumps(record)
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")
    print()
    print(table(results, tasks, sides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
