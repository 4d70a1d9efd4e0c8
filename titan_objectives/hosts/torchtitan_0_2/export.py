"""torchtitan 0.2.2 models as Hugging Face ``transformers`` models: rebuilt from a run's
record, converted by torchtitan's own state-dict adapter, described by a ``config.json``
of the transformers class with the same computation."""

import copy
import re
from collections.abc import Callable
from typing import Any

import torch
from torchtitan.protocols.train_spec import get_train_spec

from titan_objectives.hosts.common.hf_export import (
    ExportableModel,
    Logits,
    Shapes,
    StateConversion,
    check_exportable,
    refuse_routing,
    settings_of,
    without_routing_bias,
)
from titan_objectives.hosts.common.run_record import ExportError, RunRecord, overlay

HOST = "torchtitan_0_2"


def _decoder(args: Any) -> dict[str, Any]:
    """What llama3's, llama4's and qwen3's ``config.json`` say the same way."""
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "head_dim": getattr(args, "head_dim", None) or args.dim // args.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": _rope_parameters(args),
        "tie_word_embeddings": getattr(args, "enable_weight_tying", False),
        "attention_bias": False,
    }


def _rope_parameters(args: Any) -> dict[str, Any]:
    """Plain rotary embeddings, or Llama 3's frequency scaling where the model has it."""
    rope = getattr(args, "rope_scaling_args", None)
    if rope is None:
        return {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    return {
        "rope_type": "llama3",
        "rope_theta": float(args.rope_theta),
        "factor": float(rope.scaling_factor),
        "low_freq_factor": float(rope.low_freq_factor),
        "high_freq_factor": float(rope.high_freq_factor),
        "original_max_position_embeddings": rope.original_max_position_embeddings,
    }


def _llama3(args: Any, shapes: Shapes) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **_decoder(args),
        # The SwiGLU width torchtitan computed from multiple_of / ffn_dim_multiplier.
        "intermediate_size": shapes["layers.0.feed_forward.w1.weight"][0],
        "mlp_bias": False,
    }


def _qwen3_moe(args: Any) -> dict[str, Any]:
    """Qwen3MoE routes every layer's tokens by softmax scores, weights the experts'
    outputs, and has no shared experts, groups, bias or scale: a run must too."""
    moe = args.moe_args
    refused = {
        "score_func": moe.score_func != "softmax",
        "route_scale": moe.route_scale != 1.0,
        "num_shared_experts": moe.num_shared_experts != 0,
        "gate_bias": moe.gate_bias,
        "score_before_experts": moe.score_before_experts,
        "num_expert_groups": moe.num_expert_groups is not None,
        "_debug_force_load_balance": moe._debug_force_load_balance,
    }
    refuse_routing("qwen3 with MoE", "Qwen3MoE", settings_of("moe_args.", moe, refused))
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "moe_intermediate_size": args.moe_inter_dim,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "norm_topk_prob": moe.route_norm,
        "decoder_sparse_step": 1,  # every block is a MoE block
        "mlp_only_layers": [],
    }


def _qwen3(args: Any, shapes: Shapes) -> dict[str, Any]:
    if not args.qk_norm:
        raise ExportError("model qwen3 without qk_norm: transformers' Qwen3 always has it")
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        **_decoder(args),
        "intermediate_size": args.hidden_dim,
        "use_sliding_window": False,
        **(_qwen3_moe(args) if args.moe_enabled else {}),
    }


def _llama4_moe(args: Any, shapes: Shapes, moe_layers: list[int]) -> dict[str, Any]:
    """Llama4's text MoE picks experts by their router logits, scales each expert's input
    by the sigmoid of its logit and adds one shared expert as wide as a routed one."""
    if not moe_layers:
        return {"moe_layers": []}
    moe = args.moe_args
    refused = {
        "score_func": moe.score_func != "sigmoid",
        "route_norm": moe.route_norm,
        "route_scale": moe.route_scale != 1.0,
        "score_before_experts": not moe.score_before_experts,
        "num_shared_experts": moe.num_shared_experts != 1,
        "gate_bias": moe.gate_bias,
        "num_expert_groups": moe.num_expert_groups is not None,
        "_debug_force_load_balance": moe._debug_force_load_balance,
    }
    refuse_routing("llama4", "Llama4", settings_of("moe_args.", moe, refused))
    return {
        "moe_layers": moe_layers,
        "num_local_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        # The routed experts' width, as torchtitan computed it (experts.w1: E x width x dim).
        "intermediate_size": shapes[f"layers.{moe_layers[0]}.moe.experts.w1"][1],
        "router_jitter_noise": 0.0,
    }


def _llama4(args: Any, shapes: Shapes) -> dict[str, Any]:
    """Llama4's text model with torchtitan's block layout: MoE every
    ``interleave_moe_layer_step`` blocks, rotary except every ``every_n_layers_nope``,
    causal attention over the whole sequence (no chunks, no query temperature)."""
    if args.attn_type != "sdpa":
        raise ExportError(
            f"model llama4 with attn_type {args.attn_type!r}: only 'sdpa' (causal attention "
            "over the whole sequence) is mapped to transformers' Llama4"
        )
    layers = range(args.n_layers)
    # torchtitan: block i is MoE when (i + 1) % step == 0, without rotary when i % n == 0.
    moe_layers = [i for i in layers if (i + 1) % args.interleave_moe_layer_step == 0]
    dense = [i for i in layers if i not in moe_layers]
    nope = args.every_n_layers_nope
    config = {
        "architectures": ["Llama4ForCausalLM"],
        "model_type": "llama4_text",
        **_decoder(args),
        "no_rope_layers": [int(nope is None or i % nope != 0) for i in layers],
        "use_qk_norm": False,
        "attn_temperature_tuning": False,
        "attention_chunk_size": None,
        "layer_types": ["full_attention"] * args.n_layers,
        "interleave_moe_layer_step": args.interleave_moe_layer_step,
        **_llama4_moe(args, shapes, moe_layers),
    }
    if dense:  # the dense blocks' SwiGLU width, as torchtitan computed it
        config["intermediate_size_mlp"] = shapes[f"layers.{dense[0]}.feed_forward.w1.weight"][0]
    return config


DENSE_FEED_FORWARD = re.compile(r"layers\.(\d+)\.feed_forward\.(w1|w2|w3)\.weight")
DENSE_NAMES = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def _llama4_to_hf(to_hf: StateConversion) -> StateConversion:
    """torchtitan's llama4 adapter writes the multimodal checkpoint's text model
    (``language_model.`` keys) and leaves the dense blocks' feed-forward out;
    ``Llama4ForCausalLM`` reads ``model.`` keys and needs both."""

    def converted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hf_state = {k.removeprefix("language_model."): v for k, v in to_hf(state).items()}
        for key, value in state.items():
            if match := DENSE_FEED_FORWARD.fullmatch(key):
                layer, name = match.groups()
                hf_state[f"model.layers.{layer}.feed_forward.{DENSE_NAMES[name]}.weight"] = value
        return hf_state

    return converted


# Model name -> config.json of the transformers class that computes what it does.
HF_CONFIGS: dict[str, Callable[[Any, Shapes], dict[str, Any]]] = {
    "llama3": _llama3,
    "llama4": _llama4,
    "qwen3": _qwen3,
}
# Model name -> what its transformers class needs on top of torchtitan's adapter.
ADAPTER_FIXES: dict[str, Callable[[StateConversion], StateConversion]] = {"llama4": _llama4_to_hf}
# Model name -> why torchtitan's Hugging Face save of it cannot be exported.
HF_SAVE_GAPS = {
    "llama4": "torchtitan's llama4 adapter leaves the dense blocks' feed-forward out of it",
}


def model_args_of(record: RunRecord) -> Any:
    """The arguments the run trained its model with: its flavor's, as the record says."""
    flavors = get_train_spec(record.model_name).model_args
    if record.flavor not in flavors:
        raise ExportError(
            f"the run's model {record.model_name} flavor {record.flavor!r} is not in this "
            f"torchtitan; its flavors: {', '.join(flavors)}"
        )
    return overlay(copy.deepcopy(flavors[record.flavor]), record.model_args)


def exportable(record: RunRecord) -> ExportableModel:
    check_exportable(record, HOST, list(HF_CONFIGS))
    spec = get_train_spec(record.model_name)
    args = model_args_of(record)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in spec.model_cls(args).state_dict().items()}
    adapter = spec.state_dict_adapter(args, None)

    def hf_config(token_ids: dict[str, int]) -> dict[str, Any]:
        return {**HF_CONFIGS[record.model_name](args, shapes), **token_ids}

    def logits_of(state: dict[str, torch.Tensor]) -> Logits:
        exact = copy.deepcopy(args)
        if hasattr(exact, "moe_args"):
            exact.moe_args.use_grouped_mm = False  # experts in fp32, as transformers runs them
        with torch.device("meta"):
            model = spec.model_cls(exact)
        model.to_empty(device="cpu")
        with torch.no_grad():
            model.init_weights()  # the buffers (rotary tables), then the trained weights
        model.load_state_dict(state)
        return model

    to_hf = ADAPTER_FIXES.get(record.model_name, lambda conversion: conversion)(adapter.to_hf)
    return ExportableModel(
        shapes,
        without_routing_bias(to_hf),
        hf_config,
        logits_of,
        HF_SAVE_GAPS.get(record.model_name),
    )
