"""torchtitan 0.2.2 models as Hugging Face ``transformers`` models: rebuilt from a run's
record, converted by torchtitan's own state-dict adapter, described by a ``config.json``
of the transformers class with the same computation."""

import copy
from collections.abc import Callable
from typing import Any

import torch
from torchtitan.protocols.train_spec import get_train_spec

from titan_objectives.hosts.common.hf_export import (
    ExportableModel,
    Logits,
    Shapes,
    check_exportable,
    without_routing_bias,
)
from titan_objectives.hosts.common.run_record import ExportError, RunRecord, overlay

HOST = "torchtitan_0_2"


def _llama3(args: Any, shapes: Shapes) -> dict[str, Any]:
    rope = args.rope_scaling_args
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        # The SwiGLU width torchtitan computed from multiple_of / ffn_dim_multiplier.
        "intermediate_size": shapes["layers.0.feed_forward.w1.weight"][0],
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads or args.n_heads,
        "head_dim": args.dim // args.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        # torchtitan's llama3 always applies Llama 3's frequency scaling.
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": float(args.rope_theta),
            "factor": rope.scaling_factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        },
        "tie_word_embeddings": False,
        "attention_bias": False,
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
    if any(refused.values()):
        raise ExportError(
            "model qwen3 with MoE: transformers' Qwen3MoE cannot route as this run did "
            f"(moe_args {', '.join(f'{k} = {getattr(moe, k)!r}' for k, v in refused.items() if v)})"
        )
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
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(args.rope_theta)},
        "tie_word_embeddings": args.enable_weight_tying,
        "attention_bias": False,
        "use_sliding_window": False,
        **(_qwen3_moe(args) if args.moe_enabled else {}),
    }


# Model name -> config.json of the transformers class that computes what it does.
HF_CONFIGS: dict[str, Callable[[Any, Shapes], dict[str, Any]]] = {
    "llama3": _llama3,
    "qwen3": _qwen3,
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

    return ExportableModel(shapes, without_routing_bias(adapter.to_hf), hf_config, logits_of)
