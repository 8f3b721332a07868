#!/usr/bin/env python3
"""The Python stack mole is measured against, on the same shape, batch and GPU as `mole bench train`.

  peft:    Hugging Face transformers LlamaForCausalLM + PEFT LoRA (r, alpha 2r, dropout 0.05, all
           seven projections, fp32 adapter weights over a bf16 base: PEFT's autocast_adapter_dtype)
  mixlora: the MixLoRA authors' `mixlora` package (TUDB-Labs) on the same model: E experts top-K
           on gate/up/down plus LoRA on q/k/v/o, when the package can be imported

Each step: forward with labels, backward, gradient clipping at 1, fused AdamW; random-initialised
bf16 base on the GPU, random token ids. Prints one JSON line per variant with the fields of
`mole bench train --json` (tokens_per_s, step_ms_median, peak_gib from
torch.cuda.max_memory_allocated, ...). A variant that cannot run prints {"skipped": reason}.
"""
import argparse
import json
import statistics
import sys
import time

SHAPES = {  # the shapes of moe/model_presets.cpp
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=10000.0,
                 max_position_embeddings=1024),
    "tinyllama": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, rope_theta=10000.0,
                      max_position_embeddings=2048),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rope_theta=10000.0,
                       max_position_embeddings=4096),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                       max_position_embeddings=8192),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(args, torch, transformers):
    shape = dict(SHAPES[args.shape])
    if args.layers > 0:
        shape["num_hidden_layers"] = min(shape["num_hidden_layers"], args.layers)
    theta = shape.pop("rope_theta")
    if int(transformers.__version__.split(".")[0]) >= 5:  # RoPE settings moved to rope_parameters
        shape["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    else:
        shape["rope_theta"] = theta
    config = transformers.LlamaConfig(rms_norm_eps=1e-5, attn_implementation="sdpa", **shape)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, config


def attach_peft(model, args, torch):
    import peft
    lora = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.05, target_modules=TARGETS,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    return model, [p for p in model.parameters() if p.requires_grad], f"peft {peft.__version__}"


def attach_mixlora(model, args, torch):
    import mixlora  # the MixLoRA authors' package; not part of the device image unless carried
    config = mixlora.MixLoraConfig.from_config({
        "bias": "none", "peft_type": "MIXLORA", "r": args.r, "lora_alpha": 2 * args.r,
        "lora_dropout": 0.05, "target_modules": TARGETS, "routing_strategy": "mixtral",
        "num_experts": args.experts, "top_k": args.top_k, "act_fn": "silu",
        "base_model_name_or_path": "random", "task_type": "CAUSAL_LM"})
    config.adapter_name_ = "default"
    config.dtype_ = torch.float32
    hidden, inter = model.config.hidden_size, model.config.intermediate_size
    q = model.config.num_attention_heads * model.config.head_dim if hasattr(model.config, "head_dim") else hidden
    kv = model.config.num_key_value_heads * (q // model.config.num_attention_heads)
    io = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
          "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    weights = {}

    def lora_pair(prefix, proj):
        i, o = io[proj]
        a = torch.empty(args.r, i, device="cuda").uniform_(-i ** -0.5, i ** -0.5)
        weights[f"{prefix}.lora_A.weight"] = a
        weights[f"{prefix}.lora_B.weight"] = torch.zeros(o, args.r, device="cuda")

    for layer in range(model.config.num_hidden_layers):
        weights[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = (
            torch.randn(args.experts, hidden, device="cuda") * 0.02)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            for e in range(args.experts):
                lora_pair(f"mixlora.layers.{layer}.mlp.{proj}.experts.{e}", proj)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lora_pair(f"mixlora.layers.{layer}.self_attn.{proj}", proj)
    for t in weights.values():
        t.requires_grad_(True)
    mixlora.inject_adapter_in_model(model, config, weights)
    params = {id(p): p for p in model.parameters() if p.requires_grad}
    for t in weights.values():  # the router weights stay plain tensors in the package
        params.setdefault(id(t), t)
    version = getattr(mixlora, "__version__", "source")
    return model, list(params.values()), f"mixlora {version}"


def run_variant(name, args):
    import torch
    import transformers
    model, _ = build_base(args, torch, transformers)
    attach = attach_peft if name == "peft" else attach_mixlora
    model, params, software = attach(model, args, torch)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) * 1000.0
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(elapsed)
    med = statistics.median(times)
    tokens = args.batch * args.seq
    return {"bench": "peer", "variant": name, "software": software, "torch": torch.__version__,
            "transformers": transformers.__version__, "shape": args.shape,
            "layers": model.config.num_hidden_layers, "batch": args.batch, "seq": args.seq,
            "r": args.r, "experts": args.experts if name == "mixlora" else 0,
            "top_k": args.top_k if name == "mixlora" else 0, "warmup": args.warmup, "steps": args.steps,
            "step_ms_median": med, "step_ms_min": min(times), "tokens_per_s": 1000.0 * tokens / med,
            "peak_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "trainable_params": sum(p.numel() for p in params), "loss_first": losses[0],
            "loss_last": losses[-1]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-2-7b", choices=sorted(SHAPES))
    parser.add_argument("--variant", action="append", choices=["peft", "mixlora"],
                        help="repeatable; default: both")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--layers", type=int, default=0, help="keep the first N layers (0: all)")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    failed = False
    for name in args.variant or ["peft", "mixlora"]:
        try:
            result = run_variant(name, args)
        except ImportError as e:
            result = {"bench": "peer", "variant": name, "shape": args.shape, "skipped": f"cannot import: {e}"}
        except Exception as e:  # report and go on with the other variant
            result = {"bench": "peer", "variant": name, "shape": args.shape, "error": f"{type(e).__name__}: {e}"}
            failed = True
        print(json.dumps(result), flush=True)
        try:
            import gc
            import torch
            gc.collect()
            torch.cuda.empty_cache()
        except ImportError:
            pass
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
