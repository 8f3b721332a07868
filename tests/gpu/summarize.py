#!/usr/bin/env python3
"""Summary of a tests/gpu/run.sh run: checks, benchmark table, and the ratios the GPU issue targets.

usage: summarize.py RESULTS.jsonl BENCH.jsonl SUMMARY.json ELAPSED_S
"""
import json
import sys


def read_lines(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("{"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    except FileNotFoundError:
        pass
    return rows


def main():
    results, bench, out, elapsed = read_lines(sys.argv[1]), read_lines(sys.argv[2]), sys.argv[3], sys.argv[4]
    trains = [b for b in bench if b.get("bench") in ("train", "peer") and "tokens_per_s" in b]

    def find(kind, shape, name):
        for b in trains:
            label = b.get("method") if b["bench"] == "train" else b.get("variant")
            if b["bench"] == kind and b.get("shape") == shape and label == name:
                return b
        return None

    ratios = {}
    for shape in sorted({b.get("shape") for b in trains}):
        peft = find("peer", shape, "peft")
        for method in ("lora", "mixlora"):
            mine = find("train", shape, method)
            if peft and mine:
                ratios[f"{shape}/{method}_vs_peft_tokens_per_s"] = mine["tokens_per_s"] / peft["tokens_per_s"]
                ratios[f"{shape}/{method}_vs_peft_peak_memory"] = mine["peak_gib"] / peft["peak_gib"]
        mix_peer, mix_mine = find("peer", shape, "mixlora"), find("train", shape, "mixlora")
        if mix_peer and mix_mine:
            ratios[f"{shape}/mixlora_vs_mixlora_package_tokens_per_s"] = (
                mix_mine["tokens_per_s"] / mix_peer["tokens_per_s"])
    kernels = [b for b in bench if b.get("bench") == "kernels"]
    summary = {"elapsed_s": int(elapsed), "checks": results, "bench": bench, "ratios": ratios}
    with open(out, "w") as f:
        json.dump(summary, f, indent=1)

    print("\n== checks")
    for r in results:
        print(f"  {r['check']:<22} {r['status']:<8} {r.get('detail', '')}")
    print("\n== training step, bf16 (tokens/s | step ms | peak GiB | MFU)")
    for b in trains:
        label = ("mole " + b.get("method", "")) if b["bench"] == "train" else ("peer " + b.get("variant", ""))
        mfu = f"{100 * b['mfu']:.1f}%" if "mfu" in b else "-"
        print(f"  {b.get('shape', ''):<11} {label:<14} {b['tokens_per_s']:>9.0f} {b['step_ms_median']:>9.1f}"
              f" {b['peak_gib']:>7.2f} {mfu:>6}")
    for b in bench:
        if "skipped" in b or "error" in b:
            print(f"  {b.get('shape', '')} peer {b.get('variant', '')}: {b.get('skipped') or b.get('error')}")
    if kernels:
        print("\n== kernels (GB/s, fraction of the measured copy bandwidth)")
        for k in kernels:
            for row in k.get("results", []):
                print(f"  {row['kernel']:<28} {row['gb_per_s']:>8.0f} {100 * row.get('fraction_of_copy', 0):>6.1f}%")
    print("\n== ratios")
    for k, v in ratios.items():
        print(f"  {k:<50} {v:.2f}")
    print(f"\nrun.sh took {elapsed} s; summary in {out}")


if __name__ == "__main__":
    main()
